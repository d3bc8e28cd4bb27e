"""Turns a scheduled batch into flat tensors, runs the model, returns logits of the sampling rows."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from brigade.engine.scheduler import Batch
from brigade.engine.sequence import Sequence
from brigade.kernels.attention import AttnMeta, DecodeGroup, PrefillSpan
from brigade.model.llama import Model


class Runner:
    """Owns the paged KV cache tensors of one model."""

    def __init__(self, model: Model, num_blocks: int, block_size: int, device: str | torch.device = "cpu",
                 allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                 window: int = 0) -> None:
        """`window`: every layer's sliding window when the KV manager frees blocks that left it (0: none);
        prefill chunks then read only the keys inside their window, never the freed blocks' placeholders."""
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.window = window
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        # One allocation for every layer's K and V: [layers, 2, slots, kv_heads, head_dim]. A worker
        # may pass `allocate` to place it in shared memory, where a prefill worker writes pages directly.
        shape = (cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        if allocate is None:
            self.cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        else:
            self.cache = allocate(shape, model.dtype)
        self.kv = [(self.cache[i, 0], self.cache[i, 1]) for i in range(cfg.num_layers)]

    def _slots(self, seq: Sequence, start: int, end: int) -> np.ndarray:
        bs = self.block_size
        pos = np.arange(start, end)
        return np.asarray(seq.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttnMeta, torch.Tensor, list[Sequence]]:
        """Inputs, positions, attention metadata, logits rows and the sequences that sample.

        Built in plain Python ints and numpy arrays, then turned into a handful of tensors: per-sequence
        tensors cost ~5 us each, which at a 192-sequence batch was milliseconds of every step.
        """
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list[np.ndarray] = []
        slot_parts: list[np.ndarray] = []
        dec_pos: list[int] = []
        dec_slots: list[int] = []
        logits_index: list[int] = []
        samplers: list[Sequence] = []
        decode: list[Sequence] = []
        prefills: list[PrefillSpan] = []
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start, end = seq.num_computed, seq.num_computed + n
            if n == 1:  # decode-like sequences come first (the scheduler orders them so)
                decode.append(seq)
                ids.append(seq.token_ids[start])
                dec_pos.append(start)
                dec_slots.append(seq.block_ids[start // bs] * bs + start % bs)
            else:
                ids.extend(seq.token_ids[start:end])
                pos_parts.append(np.arange(start, end))
                slot_parts.append(self._slots(seq, start, end))
                if start == 0:
                    prefills.append(PrefillSpan(offset, n, end, None, None))
                else:
                    k_start = max(0, start - self.window + 1) if self.window else 0
                    ctx = torch.arange(k_start, end)
                    mask = ctx[None, :] <= torch.arange(start, end)[:, None]
                    slots = torch.from_numpy(self._slots(seq, k_start, end))
                    prefills.append(PrefillSpan(offset, n, end, slots, mask, k_start))
            offset += n
            if end == seq.num_tokens:
                logits_index.append(offset - 1)
                samplers.append(seq)
        nd = len(decode)
        positions = np.concatenate([np.asarray(dec_pos, dtype=np.int64), *pos_parts])
        slot_mapping = np.concatenate([np.asarray(dec_slots, dtype=np.int64), *slot_parts])
        groups: list[DecodeGroup] = []
        tables_t = lens_t = None
        if nd:
            width = max(len(s.block_ids) for s in decode)
            tables = np.zeros((nd, width), dtype=np.int32)
            for r, s in enumerate(decode):
                tables[r, :len(s.block_ids)] = s.block_ids
            tables_t = torch.from_numpy(tables)
            lens_t = torch.from_numpy(np.asarray(dec_pos, dtype=np.int32) + 1)
            if not self.model.attention.reads_tables:
                ctx_lens = lens_t.to(torch.int64)
                wide = tables_t.to(torch.int64)
                groups = [self._group(wide, ctx_lens, a, b) for a, b in _buckets(ctx_lens.tolist())]
        dev = self.device
        meta = AttnMeta(
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            num_decode=nd,
            decode_groups=[DecodeGroup(g.start, g.end, g.blocks.to(dev), g.mask.to(dev), _lens(g, dev))
                           for g in groups],
            block_tables=None if tables_t is None else tables_t.to(dev),
            context_lens=None if lens_t is None else lens_t.to(dev),
            prefills=[_to(p, dev) for p in prefills],
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        rows = torch.tensor(logits_index, dtype=torch.int64, device=dev)
        return input_ids, torch.from_numpy(positions).to(dev), meta, rows, samplers

    def _group(self, tables: torch.Tensor, ctx_lens: torch.Tensor, a: int, b: int) -> DecodeGroup:
        lens = ctx_lens[a:b]
        nb = -(-int(lens.max()) // self.block_size)
        valid = torch.arange(nb * self.block_size)[None, :] < lens[:, None]
        return DecodeGroup(a, b, tables[a:b, :nb], valid[:, None, None, :], lens)

    def blocks(self) -> torch.Tensor:
        """The cache viewed per block: [layers, 2, num_blocks, block_size, kv_heads, head_dim]."""
        c = self.cache
        return c.view(c.shape[0], 2, self.num_blocks, self.block_size, *c.shape[3:])

    @torch.inference_mode()
    def run(self, batch: Batch) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward pass; logits [len(samplers), vocab] on the CPU in fp32."""
        input_ids, positions, meta, logits_index, samplers = self.prepare(batch)
        logits = self.model.forward(input_ids, positions, meta, self.kv, logits_index)
        return logits.cpu(), samplers


def _buckets(lens: list[int], min_size: int = 4) -> list[tuple[int, int]]:
    """Split ascending context lengths into runs whose longest is at most ~1.5x their shortest.

    Padding every decode query to the batch's longest context wastes gather bandwidth when lengths
    spread widely; a few groups cost a few more SDPA calls but copy far fewer padded slots.
    """
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(lens) + 1):
        if i == len(lens) or (i - start >= min_size and lens[i] > 1.5 * lens[start] + 16):
            out.append((start, i))
            start = i
    return out


def _to(p: PrefillSpan, dev: torch.device) -> PrefillSpan:
    if p.slots is None or dev.type == "cpu":
        return p
    assert p.mask is not None
    return PrefillSpan(p.q_start, p.q_len, p.ctx_len, p.slots.to(dev), p.mask.to(dev), p.k_start)


def _lens(g: DecodeGroup, dev: torch.device) -> torch.Tensor | None:
    return None if g.lens is None else g.lens.to(dev)
