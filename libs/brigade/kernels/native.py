"""Builds and loads `cpu_kernels.cpp` (float32 CPU kernels) and wraps each entry point for torch tensors.

The library is compiled once per source, compiler flags and CPU with the system's C++ compiler (~1 s) into
Brigade's cache directory and loaded with ctypes; `available()` is False where no compiler works, and callers
then keep the torch path. `BRIGADE_NATIVE=0` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger("brigade.kernels")
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# -ffp-contract=off: no fused multiply-adds the eager torch ops do not do, so results stay within rounding of
# the reference path; -march=native: the library is built on the machine that runs it.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "paged_decode_attention": [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _i64, _f32,
                               _int],
    "add_rms_norm": [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int],
    "rotary": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _int],
    "silu_mul": [_ptr, _ptr, _i64, _i64, _int],
}


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _cache_dir() -> Path:
    """Brigade's cache, or a per-user temp folder where that is read-only (a container's baked-in cache)."""
    from brigade.model.make import cache_dir

    path = cache_dir() / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"brigade-kernels-{os.getuid()}"


def build(force: bool = False) -> Path:
    """Compile the library (unless a build for this source, flags and CPU exists); return its path."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *FLAGS]).encode() + _cpu_id().encode())
    out = _cache_dir() / f"brigade_cpu_{key.hexdigest()[:16]}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the native CPU kernels into %s", out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp_out)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)  # atomic: processes building at once each install a complete file
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; None when disabled or they cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is not None or _failed:
            return _lib
        if os.environ.get("BRIGADE_NATIVE", "1") in ("0", "false", "off"):
            _failed = True
            return None
        try:
            lib = ctypes.CDLL(str(build()))
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            log.warning("native CPU kernels unavailable, using the torch path: %s", e)
            _failed = True
            return None
        for name, args in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        _lib = lib
    return _lib


def available() -> bool:
    return library() is not None


def release_omp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (omp_pause_resource_all); True when libgomp did.

    libgomp keeps one pool of workers per thread that ever ran a parallel region, and once it manages more
    threads than there are cores it throttles their spin-wait to ~100 rounds, so every parallel region wakes
    its workers from a futex. A worker that loaded its model on the main thread and then steps on an engine
    thread has two pools: measured here, a batch-1 step of a 30-layer model took 65 instead of 42 ms, and a
    one-row kernel 100 instead of 8 us. Called on the main thread before the engine thread starts.
    """
    try:
        gomp = ctypes.CDLL("libgomp.so.1")  # the copy torch loaded (matched by soname)
        return int(gomp.omp_pause_resource_all(2)) == 0  # omp_pause_hard
    except (OSError, AttributeError):
        return False


def _p(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check(*ts: torch.Tensor) -> None:
    # Runs several times per layer: plain attribute checks only (`t.device.type` alone costs ~1 us).
    for t in ts:
        if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
            raise ValueError("native kernels take contiguous float32 CPU tensors")


def _lib_or_raise() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError("native CPU kernels are not available")
    return lib


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           lens: torch.Tensor, block_size: int, scale: float, window: int = 0) -> torch.Tensor:
    """q [n, H, D] over caches [slots, KVH, D] through int32 block tables [n, B] and lengths [n] -> [n, H, D].

    `window` > 0: each query sees only its last `window` keys; table entries before them are not read.
    """
    _check(q, k_cache, v_cache)
    assert tables.dtype == torch.int32 and lens.dtype == torch.int32 and tables.is_contiguous()
    n, heads, dim = q.shape
    out = torch.empty_like(q)
    if n:
        _lib_or_raise().paged_decode_attention(
            _p(q), _p(k_cache), _p(v_cache), _p(tables), _p(lens), _p(out), n, heads, k_cache.shape[1], dim,
            block_size, tables.shape[1], window, scale, torch.get_num_threads())
    return out


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x in place (when x is given); return RMSNorm(residual) * weight."""
    _check(residual, weight, *([x] if x is not None else []))
    out = torch.empty_like(residual)
    rows, hidden = residual.shape
    if rows:
        _lib_or_raise().add_rms_norm(None if x is None else _p(x), _p(residual), _p(weight), _p(out), rows, hidden,
                                     eps, torch.get_num_threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first `rot_heads` heads of each row of x [T, stride]; cos/sin [T, head_dim / 2]."""
    _check(x, cos, sin)
    if x.shape[0]:
        _lib_or_raise().rotary(_p(x), _p(cos), _p(sin), x.shape[0], x.shape[1], rot_heads, head_dim,
                               torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [T, 2I] -> [T, I]."""
    _check(gate_up)
    rows, two = gate_up.shape
    out = gate_up.new_empty(rows, two // 2)
    if rows:
        _lib_or_raise().silu_mul(_p(gate_up), _p(out), rows, two // 2, torch.get_num_threads())
    return out
