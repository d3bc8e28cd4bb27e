"""The native CPU kernels and packed matmuls against the eager torch reference path (float32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from brigade.kernels import linear as L
from brigade.kernels import native
from brigade.kernels.attention import AttnMeta, DecodeGroup, NativeAttention, TorchAttention, decode_group
from brigade.model.llama import rms_norm, rotate

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels did not build (no C++ compiler)")


def _cache(slots: int, kvh: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(slots, kvh, d, generator=g), torch.randn(slots, kvh, d, generator=g)


@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (4, 4), (9, 3), (8, 1)])
def test_paged_decode_attention_matches_gathered_reference(heads: int, kv_heads: int) -> None:
    bs, blocks, d = 16, 48, 64
    kc, vc = _cache(blocks * bs, kv_heads, d)
    lens = torch.tensor([1, 15, 16, 17, 130, 400], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    width = 26
    tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in lens]).to(torch.int32)
    q = torch.randn(len(lens), heads, d, generator=g)
    got = native.paged_decode_attention(q, kc, vc, tables, lens, bs, d ** -0.5)
    nb = -(-int(lens.max()) // bs)
    mask = (torch.arange(nb * bs)[None, :] < lens[:, None].long())[:, None, None, :]
    want = decode_group(q, kc, vc, DecodeGroup(0, len(lens), tables[:, :nb].long(), mask), d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_native_attention_mixed_step_matches_torch_attention() -> None:
    """Decode queries and a fresh prefill in one step: same output and same cache writes as the torch path."""
    bs, kvh, h, d = 16, 2, 8, 32
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = _cache(32 * bs, kvh, d)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    # two decode sequences (contexts 20 and 5, blocks [3, 4] and [7]) then a 6-token prefill in block 9
    slots = torch.tensor([4 * bs + 3, 7 * bs + 4, *range(9 * bs, 9 * bs + 6)])
    tables = torch.tensor([[3, 4], [7, 0]], dtype=torch.int32)
    lens = torch.tensor([20, 5], dtype=torch.int32)
    from brigade.kernels.attention import PrefillSpan

    t = 8
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (h, kvh, kvh))
    mask20 = (torch.arange(32) < 20)[None, None, None, :]
    mask5 = (torch.arange(16) < 5)[None, None, None, :]
    groups = [DecodeGroup(0, 1, torch.tensor([[3, 4]]), mask20), DecodeGroup(1, 2, torch.tensor([[7]]), mask5)]
    meta = AttnMeta(slots, 2, groups, tables, lens, [PrefillSpan(2, 6, 6, None, None)])
    got = NativeAttention(bs)(q, k, v, k_cache, v_cache, meta, d ** -0.5)
    want = TorchAttention()(q, k, v, ref_k, ref_v, meta, d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(with_residual: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x, res, w = torch.randn(7, 576, generator=g), torch.randn(7, 576, generator=g), torch.randn(576, generator=g)
    inout = res.clone()
    got = native.add_rms_norm(x if with_residual else None, inout, w, 1e-5)
    h = res + x if with_residual else res
    assert torch.equal(inout, h)
    torch.testing.assert_close(got, rms_norm(h, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rotary_in_place_on_fused_rows() -> None:
    """q and k heads of a fused qkv row rotate as `rotate` does; v is untouched."""
    h, kvh, d, t = 4, 2, 16, 9
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g)
    inv = 1 / (1e4 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(t).float()[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    got = qkv.clone()
    native.rotary(got, freqs.cos(), freqs.sin(), h + kvh, d)
    torch.testing.assert_close(got[:, :h * d].view(t, h, d), rotate(qkv[:, :h * d].view(t, h, d), cos, sin))
    torch.testing.assert_close(got[:, h * d:(h + kvh) * d].view(t, kvh, d),
                               rotate(qkv[:, h * d:(h + kvh) * d].view(t, kvh, d), cos, sin))
    assert torch.equal(got[:, (h + kvh) * d:], qkv[:, (h + kvh) * d:])


@pytest.mark.parametrize("inter", [96, 13])  # whole vectors of eight lanes, and a tail
def test_silu_mul(inter: int) -> None:
    gu = torch.randn(5, 2 * inter, generator=torch.Generator().manual_seed(5)) * 4
    gu[0, :6] = torch.tensor([-200.0, -88.0, -20.0, 0.0, 30.0, 200.0])  # both ends of exp's range
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(native.silu_mul(gu), F.silu(gate) * up)


@pytest.mark.parametrize("rows", [0, 1, 7, 64, 300])
def test_packed_linear_matches_f_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(6)
    w, b, x = torch.randn(96, 80, generator=g), torch.randn(96, generator=g), torch.randn(rows, 80, generator=g)
    packed = L.pack(w)
    assert packed.layout == torch._mkldnn  # type: ignore[attr-defined]
    torch.testing.assert_close(L.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    assert L.pack(w.to(torch.bfloat16)).layout == torch.strided  # only float32 is packed


def test_kernels_refuse_other_dtypes() -> None:
    with pytest.raises(ValueError, match="float32"):
        native.silu_mul(torch.randn(2, 8, dtype=torch.bfloat16))


def test_fast_model_logits_match_reference(tiny_models: dict[str, Path]) -> None:
    """Every step's logits for each tiny arch (prefill, then decodes over the paged cache): fast path against
    the eager reference."""
    from brigade.engine.engine import Engine, EngineConfig
    from brigade.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for arch in ("llama", "qwen2", "mixtral", "qwen3", "qwen3_moe", "phi3"):  # the archs with a fast path
        path = tiny_models[arch]
        logits: dict[bool, list[torch.Tensor]] = {True: [], False: []}
        for fast in (True, False):
            eng = Engine(EngineConfig(model=str(path), num_blocks=64, fast_path=fast))
            assert eng.model.fast is fast
            assert isinstance(eng.model.attention, NativeAttention if fast else TorchAttention)
            run = eng.runner.run

            def record(batch: object, run: object = run, out: list[torch.Tensor] = logits[fast]) -> object:
                result = run(batch)  # type: ignore[operator]
                out.append(result[0].clone())
                return result

            eng.runner.run = record  # type: ignore[method-assign]
            eng.generate([list(range(10, 40)), list(range(50, 59))], params)
        assert len(logits[True]) == len(logits[False]) == 6
        for got, want in zip(logits[True], logits[False], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=arch)


def test_disabled_by_environment(tmp_path: Path) -> None:
    """BRIGADE_NATIVE=0: nothing is built and models keep the reference path."""
    code = ("from brigade.kernels import native; from brigade.kernels.attention import make_attention;"
            "print(native.available(), type(make_attention('auto', 16)).__name__)")
    env = {**os.environ, "BRIGADE_NATIVE": "0", "BRIGADE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "TorchAttention"], out.stderr
    assert not (tmp_path / "kernels").exists()


def test_release_omp_threads_then_kernels_still_run() -> None:
    """libgomp frees this thread's pool on request and makes a new one at the next parallel region."""
    x = torch.randn(64, 256)
    before = native.add_rms_norm(None, x.clone(), torch.ones(256), 1e-5)
    assert native.release_omp_threads()
    torch.testing.assert_close(native.add_rms_norm(None, x.clone(), torch.ones(256), 1e-5), before)
