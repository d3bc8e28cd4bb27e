"""The fused Triton MoE kernel against the torch path (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from brigade.kernels import triton_attention as ta  # noqa: E402
from brigade.kernels.moe import flatten_routes, run_assignments, run_experts  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERP = HAS_TRITON and ta.interpreter_mode()
interp_only = pytest.mark.skipif(not INTERP, reason="triton is not in interpreter mode in this process")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs CUDA with compiled triton")


def _case(tokens: int, hidden: int, inter: int, experts: int, k: int, dtype: torch.dtype, device: str = "cpu",
          seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g)
    w = w / w.sum(-1, keepdim=True)
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                 for t in (x, ids, w, gate_up, down))


@interp_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_fused_matches_torch(dtype: torch.dtype, tol: float) -> None:
    from brigade.kernels.triton_moe import TritonExperts

    x, ids, w, gate_up, down = _case(tokens=7, hidden=64, inter=96, experts=4, k=2, dtype=dtype)
    want = run_experts(x.float(), ids, w.float(), gate_up.float(), down.float())
    got = TritonExperts([(gate_up, down)])(0, x, ids, w)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= tol * want.abs().max()


@interp_only
def test_fused_shard_part_and_ragged_sizes() -> None:
    """A shard's subset of experts (others skipped), hidden/intermediate not multiples of the tiles."""
    from brigade.kernels.triton_moe import fused_moe

    x, ids, w, gate_up, down = _case(tokens=5, hidden=48, inter=40, experts=4, k=2, dtype=torch.float32, seed=3)
    tok, expert, weight = flatten_routes(ids, w)
    held = [1, 3]
    want = run_assignments(x, tok, expert, weight, gate_up[held], down[held], held)
    got = fused_moe(x, tok, expert, weight, gate_up[held], down[held], held)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_cuda(dtype: torch.dtype, tol: float) -> None:
    from brigade.kernels.moe import default_experts
    from brigade.kernels.triton_moe import TritonExperts

    x, ids, w, gate_up, down = _case(tokens=300, hidden=512, inter=1408, experts=8, k=2, dtype=dtype, device="cuda")
    want = run_experts(x.float(), ids, w.float(), gate_up.float(), down.float())
    ex = default_experts([(gate_up, down)])
    assert isinstance(ex, TritonExperts)
    got = ex(0, x, ids, w)
    assert (got.float() - want).abs().max() <= tol * want.abs().max()
