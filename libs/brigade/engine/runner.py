"""Turns a scheduled batch into flat tensors, runs the model, returns logits of the sampling rows."""

from __future__ import annotations

import torch

from brigade.engine.scheduler import Batch
from brigade.engine.sequence import Sequence
from brigade.kernels.attention import AttnMeta, PrefillSpan
from brigade.model.llama import Model


class Runner:
    """Owns the paged KV cache tensors of one model."""

    def __init__(self, model: Model, num_blocks: int, block_size: int, device: str | torch.device = "cpu") -> None:
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        slots = num_blocks * block_size
        # One allocation for every layer's K and V: [layers, 2, slots, kv_heads, head_dim].
        self.cache = torch.zeros(cfg.num_layers, 2, slots, cfg.num_kv_heads, cfg.head_dim,
                                 dtype=model.dtype, device=self.device)
        self.kv = [(self.cache[i, 0], self.cache[i, 1]) for i in range(cfg.num_layers)]

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_ids, dtype=torch.int64)
        return table[pos // bs] * bs + pos % bs

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttnMeta, torch.Tensor, list[Sequence]]:
        """Inputs, positions, attention metadata, logits rows and the sequences that sample."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_parts: list[torch.Tensor] = []
        logits_index: list[int] = []
        samplers: list[Sequence] = []
        decode = [s for s, n in zip(batch.seqs, batch.num_new, strict=True) if n == 1]
        nd = len(decode)
        prefills: list[PrefillSpan] = []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.token_ids[start:end])
            positions.append(torch.arange(start, end))
            slot_parts.append(self._slots(seq, start, end))
            if n > 1:
                if start == 0:
                    prefills.append(PrefillSpan(offset, n, end, None, None))
                else:
                    ctx = torch.arange(end)
                    mask = ctx[None, :] <= torch.arange(start, end)[:, None]
                    prefills.append(PrefillSpan(offset, n, end, self._slots(seq, 0, end), mask))
            offset += n
            if end == seq.num_tokens:
                logits_index.append(offset - 1)
                samplers.append(seq)
        decode_slots = decode_mask = tables = lens = None
        if nd:
            ctx_lens = torch.tensor([s.num_computed + 1 for s in decode], dtype=torch.int64)
            width = max(len(s.block_ids) for s in decode)
            tables = torch.zeros(nd, width, dtype=torch.int64)
            for r, s in enumerate(decode):
                tables[r, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int64)
            lmax = int(ctx_lens.max())
            j = torch.arange(lmax)
            decode_slots = tables[:, j // bs] * bs + j % bs
            valid = j[None, :] < ctx_lens[:, None]
            decode_slots = decode_slots.masked_fill(~valid, 0)
            decode_mask = valid[:, None, None, :]
            lens = ctx_lens.to(torch.int32)
            tables = tables.to(torch.int32)
        dev = self.device
        meta = AttnMeta(
            slot_mapping=torch.cat(slot_parts).to(dev),
            num_decode=nd,
            decode_slots=None if decode_slots is None else decode_slots.to(dev),
            decode_mask=None if decode_mask is None else decode_mask.to(dev),
            block_tables=None if tables is None else tables.to(dev),
            context_lens=None if lens is None else lens.to(dev),
            prefills=[_to(p, dev) for p in prefills],
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        rows = torch.tensor(logits_index, dtype=torch.int64, device=dev)
        return input_ids, torch.cat(positions).to(dev), meta, rows, samplers

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward pass; logits [len(samplers), vocab] on the CPU in fp32."""
        input_ids, positions, meta, logits_index, samplers = self.prepare(batch)
        logits = self.model.forward(input_ids, positions, meta, self.kv, logits_index)
        return logits.cpu(), samplers


def _to(p: PrefillSpan, dev: torch.device) -> PrefillSpan:
    if p.slots is None or dev.type == "cpu":
        return p
    assert p.mask is not None
    return PrefillSpan(p.q_start, p.q_len, p.ctx_len, p.slots.to(dev), p.mask.to(dev))
