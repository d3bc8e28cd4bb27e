"""A minimal OTLP/HTTP trace receiver: decodes every export it is sent (tests, the tracing-overhead bench).

`python -m brigade.bench.otlp --port 4318` runs one in the foreground and prints span counts per service.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter
from collections.abc import Set
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ERROR = 2  # Status.STATUS_CODE_ERROR


@dataclass
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    kind: int  # 2: server, 3: client
    attributes: dict[str, Any]
    error: bool


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ExportTraceServiceRequest (protobuf)."""
    out = []
    for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
        service = str({a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name"))
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(service, s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                        s.kind, {a.key: _value(a.value) for a in s.attributes},
                                        s.status.code == ERROR))
    return out


class OtlpReceiver:
    """Serves POST /v1/traces on a thread; keeps the spans (`keep`) or only counts them per service."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
                    self.send_error(415 if self.path == "/v1/traces" else 404)
                    return
                receiver._add(decode(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.keep = keep
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self.lock:
            self.counts.update(s.service for s in spans)
            if self.keep:
                self.spans.extend(spans)

    def trace_of(self, request_id: str, services: set[str], timeout: float = 20.0,
                 spans: Set[tuple[str, str]] = frozenset()) -> list[ReceivedSpan]:
        """Every span of the trace that holds a span with gen_ai.request.id `request_id`, once spans from all
        `services` and every (service, name) in `spans` are in (or at the timeout). A parent span ends, and is
        exported, after its children: waiting for services alone can return before a parent arrives."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                roots = [s for s in self.spans if s.attributes.get("gen_ai.request.id") == request_id]
                trace = [s for s in self.spans if roots and s.trace_id == roots[0].trace_id]
            have = {(s.service, s.name) for s in trace}
            if ({s.service for s in trace} >= services and have >= spans) or time.monotonic() > deadline:
                return trace
            time.sleep(0.1)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4318)
    p.add_argument("--every", type=float, default=10.0, help="print counts this often (seconds)")
    a = p.parse_args()
    r = OtlpReceiver(a.host, a.port, keep=False)
    print(f"OTLP/HTTP receiver on {r.url}/v1/traces", flush=True)
    try:
        while True:
            time.sleep(a.every)
            with r.lock:
                print(dict(r.counts), flush=True)
    except KeyboardInterrupt:
        r.close()


if __name__ == "__main__":
    main()
