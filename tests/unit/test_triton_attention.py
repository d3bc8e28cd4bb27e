"""Paged decode attention (Triton) against a plain torch reference.

The CPU tests run the kernels in Triton's interpreter, which must be chosen before triton is first imported in
the process: ``import triton`` jits its own library (``tl.sum``, ``tl.max``, ``tl.cdiv``) in the mode
``TRITON_INTERPRET`` selects at that moment. So, before anything here imports triton, this module sets
``TRITON_INTERPRET=1`` when triton is not imported yet and there is no GPU. That is not enough on its own: a test
module collected earlier may already have imported triton in compiled mode (``transformers``' Llama modelling and
``torch._dynamo`` import it), and on a GPU box the compiled test needs compiled mode. In those cases the
interpreter tests are skipped in-process and ``test_interpreter_suite_in_subprocess`` runs this file again in a
fresh interpreter-mode process.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from brigade.kernels import triton_attention as ta  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Whether kernels launched in this process run in the interpreter (imports triton, after the env var above).
INTERP = HAS_TRITON and ta.interpreter_mode()
interp_only = pytest.mark.skipif(
    not INTERP, reason="triton is in compiled mode in this process; see test_interpreter_suite_in_subprocess"
)
cuda_only = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERP, reason="needs CUDA with triton in compiled mode"
)


def reference_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """Gather each sequence's blocks, then softmax(q k^T * scale) v in fp32 (returned in fp32); with a window,
    over the last `window` keys only."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32)
    for b in range(batch):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : math.ceil(n / block_size)].long().cpu()
        k = k_cache.cpu()[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        v = v_cache.cpu()[blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        if window:
            k, v = k[max(0, n - window):], v[max(0, n - window):]
        k = k.repeat_interleave(group, dim=1)  # [n, H, D]: head h reads kv head h // group
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].cpu().float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)
    return out


def make_case(
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    pad_value: int = -1,
    extra_table_cols: int = 2,
    device: str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """Random q and a paged cache whose sequences own scattered, shuffled blocks.

    Block 0 and every unowned slot hold NaN, so reading anything outside a sequence's context shows up as NaN.
    """
    gen = torch.Generator().manual_seed(seed)
    need = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = 1 + 2 * sum(need) + 3  # spare blocks so ids are scattered, not consecutive
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # never block 0 (the poison block)
    width = max(need, default=0) + extra_table_cols
    block_tables = torch.full((len(context_lens), width), pad_value, dtype=torch.int32)
    for b, (n, nb) in enumerate(zip(context_lens, need, strict=True)):
        mine = [ids.pop() for _ in range(nb)]
        block_tables[b, :nb] = torch.tensor(mine, dtype=torch.int32)
        for i, blk in enumerate(mine):
            valid = min(block_size, n - i * block_size)
            k_cache[blk, :valid] = torch.randn(valid, num_kv_heads, head_dim, generator=gen)
            v_cache[blk, :valid] = torch.randn(valid, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=gen)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, lens))


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (context_lens, heads, kv_heads, head_dim, block_size): lengths cover 1, exact block multiples, non-multiples,
# a 0-length padded row, and sequences longer than one 32-token tile.
CASES = [
    pytest.param([1, 16, 37, 0], 2, 2, 32, 16, id="g1-bs16"),
    pytest.param([8, 40, 3, 0], 4, 2, 16, 8, id="g2-bs8"),
    pytest.param([48, 70, 1], 8, 2, 64, 16, id="g4-bs16"),
]


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(("lens", "heads", "kv_heads", "head_dim", "block_size"), CASES)
def test_matches_reference(
    lens: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, num_splits: int, dtype: torch.dtype
) -> None:
    q, k, v, bt, cl = make_case(lens, heads, kv_heads, head_dim, block_size, dtype, seed=len(lens) + heads)
    scale = head_dim**-0.5
    out = ta.paged_decode(q, k, v, bt, cl, scale, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    ref = reference_decode(q, k, v, bt, cl, scale)
    assert not out.isnan().any()
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err}"
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[b] == 0)


@interp_only
def test_more_splits_than_tiles_and_zero_pad() -> None:
    """Splits with no tiles (short sequences, many splits) must merge away; pad entries of 0 hit the NaN block."""
    q, k, v, bt, cl = make_case([5, 33, 0], 4, 1, 16, 16, torch.float32, seed=7, pad_value=0)
    out = ta.paged_decode(q, k, v, bt, cl, 0.3, num_splits=8)
    ref = reference_decode(q, k, v, bt, cl, 0.3)
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.all(out[2] == 0)


@interp_only
def test_non_power_of_two_head_dim_and_strided_cache() -> None:
    """D=24 is masked up to 32; K/V are strided views into one combined [blocks, 2, bs, kvh, d] tensor."""
    q, k, v, bt, cl = make_case([19, 7], 4, 2, 24, 8, torch.float32, seed=3)
    kv = torch.stack([k, v], dim=1)
    out = ta.paged_decode(q, kv[:, 0], kv[:, 1], bt, cl, 0.2, num_splits=2)
    ref = reference_decode(q, k, v, bt, cl, 0.2)
    assert (out - ref).abs().max().item() <= 1e-5


@interp_only
def test_bf16_in_interpreter_and_default_splits() -> None:
    """bf16 goes through the interpreter's fp32 upcast path; num_splits=None picks a value itself."""
    q, k, v, bt, cl = make_case([21, 2], 4, 2, 16, 16, torch.bfloat16, seed=11)
    out = ta.paged_decode(q, k, v, bt, cl, 0.25)
    assert out.dtype == torch.bfloat16
    ref = reference_decode(q, k, v, bt, cl, 0.25)
    assert (out.float() - ref).abs().max().item() <= TOL[torch.bfloat16]


@interp_only
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [1, 7, 32, 45])
def test_sliding_window_skips_freed_blocks(window: int, num_splits: int) -> None:
    """Entries before each window point at the NaN block 0 (as freed blocks' placeholders): never read."""
    lens = [1, 9, 40, 70, 130, 0]
    q, k, v, bt, cl = make_case(lens, 4, 2, 16, 8, torch.float32, seed=5)
    ref = reference_decode(q, k, v, bt, cl, 0.3, window=window)
    for b, n in enumerate(lens):
        bt[b, :max(0, n - window) // 8] = 0
    out = ta.paged_decode(q, k, v, bt, cl, 0.3, num_splits=num_splits, window=window)
    assert not out.isnan().any()
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.all(out[5] == 0)


def test_empty_batch_and_validation() -> None:
    q, k, v, bt, cl = make_case([3], 4, 2, 16, 16, torch.float32)
    empty = ta.paged_decode(q[:0], k, v, bt[:0], cl[:0], 1.0)
    assert empty.shape == (0, 4, 16)
    with pytest.raises(ValueError):
        ta.paged_decode(q[:, :3], k, v, bt, cl, 1.0)  # 3 heads over 2 kv heads
    with pytest.raises(ValueError):
        ta.paged_decode(q.half(), k, v, bt, cl, 1.0)
    with pytest.raises(ValueError):
        ta.paged_decode(q, k[:, :12], v[:, :12], bt, cl, 1.0)  # block size 12


@pytest.mark.skipif(INTERP or not HAS_TRITON, reason="this process already runs the interpreter tests")
def test_interpreter_suite_in_subprocess() -> None:
    """Run this file's interpreter tests in a fresh process where TRITON_INTERPRET=1 precedes `import triton`."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-x", "-p", "no:cacheprovider"]
    cmd += ["-m", "not gpu", "-k", "not in_subprocess"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # A skip there would mean the child did not get interpreter mode either, i.e. nothing was really tested.
    assert "passed" in summary and "skipped" not in summary, summary


def test_default_num_splits() -> None:
    cpu = torch.device("cpu")
    assert ta.default_num_splits(4, 2, 4096, cpu) == 1
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        assert ta.default_num_splits(1, 8, 8192, dev) > 1  # 8 programs cannot fill a GPU
        assert ta.default_num_splits(1, 8, 16, dev) == 1  # too little context to be worth splitting
        assert ta.default_num_splits(256, 8, 8192, dev) == 1  # the batch already fills it


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("block_size", [16, 32])
def test_cuda_compiled(dtype: torch.dtype, num_splits: int | None, block_size: int) -> None:
    lens = [1, 16, 100, 0, 517, 2048, 1999, 33]
    q, k, v, bt, cl = make_case(lens, 32, 8, 128, block_size, dtype, seed=5, device="cuda")
    out = ta.paged_decode(q, k, v, bt, cl, 128**-0.5, num_splits=num_splits)
    torch.cuda.synchronize()
    ref = reference_decode(q, k, v, bt, cl, 128**-0.5)
    # On GPU the probabilities enter the P.V product in the input dtype (tensor cores), hence a relative term.
    atol, rtol = {torch.float16: (2e-3, 4e-3), torch.bfloat16: (1e-2, 2e-2), torch.float32: (1e-5, 1e-5)}[dtype]
    excess = (out.float().cpu() - ref).abs() - (atol + rtol * ref.abs())
    assert excess.max().item() <= 0, f"max abs error {(out.float().cpu() - ref).abs().max().item()}"
    assert torch.all(out[3] == 0)


@pytest.mark.gpu
@cuda_only
def test_cuda_speed_smoke() -> None:
    """Not a benchmark: guards against pathological slowness (e.g. an accidental fallback) on a decode shape."""
    q, k, v, bt, cl = make_case([4096] * 16, 32, 8, 128, 16, torch.float16, device="cuda")
    for _ in range(3):
        ta.paged_decode(q, k, v, bt, cl, 0.1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        ta.paged_decode(q, k, v, bt, cl, 0.1)
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / 20
    kv_bytes = 2 * 16 * 4096 * 8 * 128 * 2
    assert per_call < 5e-3, f"{per_call * 1e3:.2f} ms for {kv_bytes / 1e6:.0f} MB of KV"
