"""Sliding-window attention in every backend against a dense reference, and the KV manager's freeing of blocks
that left the window. Freed table entries point at a NaN-filled block, so any read of one shows up as NaN
(the placeholder is -1 in the engine; a valid poison block makes a stray read visible rather than a crash)."""

from __future__ import annotations

import pytest
import torch

from brigade.kernels import native
from brigade.kernels.attention import AttnMeta, DecodeGroup, NativeAttention, PrefillSpan, TorchAttention
from brigade.kv.manager import NULL_BLOCK, KvManager
from brigade.kv.pool import BlockPool

BS, KVH, H, D = 4, 2, 4, 16


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, window: int,
           scale: float) -> torch.Tensor:
    """q [T, H, D] at positions q_pos over keys k/v [S, KVH, D] at positions 0..S-1, masked as HF does."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    allowed = sliding_window_causal_mask_function(window) if window else (lambda b, h, qi, ki: ki <= qi)
    mask = allowed(0, 0, q_pos[:, None], torch.arange(k.shape[0])[None, :])
    rep = H // KVH
    s = torch.einsum("thd,shd->ths", q, k.repeat_interleave(rep, 1)) * scale
    s = s.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("ths,shd->thd", s.softmax(-1), v.repeat_interleave(rep, 1))


def _paged(lens: list[int], window: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A paged cache holding one context per row (shuffled blocks), entries before each window freed."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lens]
    nblocks = 2 + sum(need)  # block 0: padding (finite, masked out); the last block: poison
    kc, vc = torch.randn(nblocks * BS, KVH, D, generator=g), torch.randn(nblocks * BS, KVH, D, generator=g)
    kc[-BS:], vc[-BS:] = float("nan"), float("nan")
    ids = (torch.randperm(nblocks - 2, generator=g) + 1).tolist()
    width = max(need)
    tables = torch.zeros((len(lens), width), dtype=torch.int64)
    for r, nb in enumerate(need):
        tables[r, :nb] = torch.tensor([ids.pop() for _ in range(nb)])
    keys = [(tables[r, torch.arange(n) // BS] * BS + torch.arange(n) % BS) for r, n in enumerate(lens)]
    if window:  # what the KV manager frees: blocks whose every slot is before the window of position n - 1
        for r, n in enumerate(lens):
            tables[r, :max(0, n - window) // BS] = nblocks - 1
    return kc, vc, tables, keys


@pytest.mark.parametrize("window", [0, 1, 5, 8, 13])
def test_decode_window_torch_and_native(window: int) -> None:
    lens = [1, 3, 8, 9, 14, 23, 40]
    kc, vc, tables, keys = _paged(lens, window)
    q = torch.randn(len(lens), H, D, generator=torch.Generator().manual_seed(1))
    want = torch.stack([_dense(q[r:r + 1], kc[keys[r]], vc[keys[r]], torch.tensor([n - 1]), window, 0.3)[0]
                        for r, n in enumerate(lens)])
    lens_t = torch.tensor(lens)
    nb = tables.shape[1]
    mask = (torch.arange(nb * BS)[None, :] < lens_t[:, None])[:, None, None, :]
    for with_lens in (True, False):
        group = DecodeGroup(0, len(lens), tables, mask, lens_t if with_lens else None)
        meta = AttnMeta(torch.zeros(0, dtype=torch.int64), len(lens), [group], None, None, [])
        none = torch.zeros(0, KVH, D)
        got = TorchAttention()(q, none, none, kc, vc, meta, 0.3, window=window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if native.available():
        got = native.paged_decode_attention(q, kc, vc, tables.to(torch.int32), lens_t.to(torch.int32), BS, 0.3,
                                            window)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 4, 7, 30])
def test_prefill_window_fresh_and_over_cached_prefix(window: int) -> None:
    """A 20-token fresh prefill and a 9-token chunk over 25 cached keys (keys before k_start unreadable)."""
    g = torch.Generator().manual_seed(2)
    fresh, done, chunk = 20, 25, 9
    ctx = done + chunk
    kc, vc = torch.randn(64, KVH, D, generator=g), torch.randn(64, KVH, D, generator=g)
    k_start = max(0, done - window + 1) if window else 0
    kc[:k_start], vc[:k_start] = float("nan"), float("nan")  # as if their blocks were freed
    t = fresh + chunk
    q = torch.randn(t, H, D, generator=g)
    k, v = torch.randn(t, KVH, D, generator=g), torch.randn(t, KVH, D, generator=g)
    # The fresh sequence writes slots 40..59; the chunk writes slots done..ctx of an identity-mapped context.
    slot_mapping = torch.cat([torch.arange(40, 40 + fresh), torch.arange(done, ctx)])
    causal = torch.arange(k_start, ctx)[None, :] <= torch.arange(done, ctx)[:, None]
    spans = [PrefillSpan(0, fresh, fresh, None, None),
             PrefillSpan(fresh, chunk, ctx, torch.arange(k_start, ctx), causal, k_start)]
    meta = AttnMeta(slot_mapping, 0, [], None, None, spans)
    backends = [TorchAttention()] + ([NativeAttention(BS)] if native.available() else [])
    for attn in backends:
        kk, vv = kc.clone(), vc.clone()
        got = attn(q, k, v, kk, vv, meta, 0.25, window=window)
        want_fresh = _dense(q[:fresh], k[:fresh], v[:fresh], torch.arange(fresh), window, 0.25)
        torch.testing.assert_close(got[:fresh], want_fresh, rtol=1e-5, atol=1e-5)
        if window:  # with window 0 the dropped keys are (wrongly) needed: only the windowed case is defined
            want = _dense(q[fresh:], kk[:ctx].nan_to_num(), vv[:ctx].nan_to_num(), torch.arange(done, ctx),
                          window, 0.25)
            torch.testing.assert_close(got[fresh:], want, rtol=1e-5, atol=1e-5)


def test_full_attention_layer_refuses_dropped_keys() -> None:
    span = PrefillSpan(0, 2, 10, torch.arange(4, 10), torch.ones(2, 6, dtype=torch.bool), 4)
    meta = AttnMeta(torch.arange(2), 0, [], None, None, [span])
    x = torch.zeros(2, H, D)
    with pytest.raises(AssertionError):
        TorchAttention()(x, x[:, :KVH], x[:, :KVH], torch.zeros(16, KVH, D), torch.zeros(16, KVH, D), meta, 1.0)


# ---- the KV manager ---------------------------------------------------------------------------------------


def _seq(tokens: list[int], prefill_only: bool = False):  # noqa: ANN202
    from brigade.engine.sampling import SamplingParams
    from brigade.engine.sequence import Sequence

    seq = Sequence("r", list(tokens), len(tokens), SamplingParams())
    seq.prefill_only = prefill_only
    return seq


def test_manager_frees_blocks_that_left_the_window() -> None:
    pool = BlockPool(16, BS)
    kv = KvManager(pool, True, window=6)
    seq = _seq(list(range(30)))
    assert kv.allocate(seq, 30)
    seq.num_computed = 30
    kv.commit(seq)
    orig = list(seq.block_ids)
    assert kv.allocate(seq, 1)  # the next query is at 30: it sees 25..30, so blocks 0..5 (slots < 24) go
    assert seq.block_ids == [NULL_BLOCK] * 6 + orig[6:]
    assert pool.num_used == 2 and all(pool.ref[b] == 0 for b in orig[:6])
    # A sibling with the same 30 tokens + 1 matches 7 blocks (28 tokens) needing only blocks 5 and 6 (>= 23):
    # block 5 is revived from the prefix cache, block 6 shared.
    sib = _seq(list(range(30)) + [99])
    hits = kv.match_prefix(sib)
    assert hits == [NULL_BLOCK] * 5 + orig[5:7]
    assert kv.allocate(sib, 3, hits)
    assert pool.ref[orig[5]] == 1 and pool.ref[orig[6]] == 2 and pool.num_used == 4
    kv.free(seq)
    kv.free(sib)
    assert pool.num_used == 0


def test_window_match_needs_only_the_window_blocks() -> None:
    pool = BlockPool(32, BS)
    kv = KvManager(pool, True, window=6)
    seq = _seq(list(range(40)))
    assert kv.allocate(seq, 40)
    seq.num_computed = 40
    kv.commit(seq)
    kv.free(seq)
    # Evict the cached copies of blocks 0..2 (the oldest): a plain prefix match would now find nothing.
    for h in seq.hashes[:3]:  # as `allocate` evicts a cached block
        pool.hash[pool.by_hash.pop(h)] = None
    hits = KvManager(pool, True).match_prefix(_seq(list(range(41))))
    assert hits == []
    hits = kv.match_prefix(_seq(list(range(41))))
    assert len(hits) == 10 and hits[:8] == [NULL_BLOCK] * 8 and NULL_BLOCK not in hits[8:]
    # Disaggregated prefill keeps every block: the plain match.
    assert kv.match_prefix(_seq(list(range(41)), prefill_only=True)) == []
