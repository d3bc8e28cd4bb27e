"""OpenTelemetry tracing: one trace per request across every service (DESIGN §6).

Configured by the standard variables: tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, `OTEL_SDK_DISABLED` is not true and `OTEL_TRACES_EXPORTER` is not
`none`; `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` picks `http/protobuf` (default) or `grpc`; `OTEL_SERVICE_NAME`
overrides `brigade-<service>`; `OTEL_BSP_*` tune the batch processor. The SDK and exporters are imported only
then. Off, spans come from the API's no-op tracer: a few microseconds per request, no I/O, no threads.

W3C trace context travels in NATS headers (`traceparent`, `tracestate`): a sender passes `headers(span)` to
the bus, the receiver starts its span with `parent=context_of(msg)`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("brigade.tracing")

__all__ = ["Span", "SpanKind", "context_of", "enabled", "fail", "headers", "setup", "shutdown", "start"]

# Attribute names as vLLM's tracing uses them (gen_ai.*), plus Brigade's own (brigade.*).
REQUEST_ID = "gen_ai.request.id"
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_N = "gen_ai.request.n"
USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
USAGE_NUM_SEQUENCES = "gen_ai.usage.num_sequences"
LATENCY_TTFT = "gen_ai.latency.time_to_first_token"
LATENCY_E2E = "gen_ai.latency.e2e"
LATENCY_QUEUE = "gen_ai.latency.time_in_queue"
LATENCY_PREFILL = "gen_ai.latency.time_in_model_prefill"
LATENCY_DECODE = "gen_ai.latency.time_in_model_decode"
WORKER = "brigade.worker"
ROLE = "brigade.role"
DECODE_WORKER = "brigade.decode_worker"
CACHED_TOKENS = "brigade.cached_tokens"
POLICY = "brigade.routing.policy"
TRANSPORT = "brigade.kv.transport"
TRANSFER_BYTES = "brigade.kv.transfer_bytes"
TRANSFER_SECONDS = "brigade.kv.transfer_seconds"
TRANSFER_BLOCKS = "brigade.kv.transfer_blocks"

_TRUE = ("1", "true", "yes", "on")
_propagator = TraceContextTextMapPropagator()
_provider: Any = None  # the SDK TracerProvider once set up
_tracer: trace.Tracer = trace.NoOpTracer()


def wanted() -> bool:
    """Whether the OTEL_* environment asks for traces to be exported."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").lower() in _TRUE:
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def enabled() -> bool:
    return _provider is not None


def _exporter() -> Any:
    env = os.environ
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        return GrpcExporter()
    if protocol not in ("http/protobuf", "http"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    return HttpExporter()


def setup(service: str, instance: str = "", exporter: Any = None) -> bool:
    """Install the exporting tracer for this process if the environment asks for it; True when on.

    `service`: the role (gateway, router, prefill, ...); `instance`: e.g. the worker id; `exporter`: a
    SpanExporter to use instead of OTLP (turns tracing on regardless of the environment).
    """
    global _provider, _tracer
    if _provider is not None or (exporter is None and not wanted()):
        return _provider is not None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attrs = {"service.name": os.environ.get("OTEL_SERVICE_NAME") or f"brigade-{service}", "brigade.role": service}
    if instance:
        attrs["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(exporter or _exporter()))
    _provider = provider
    _tracer = provider.get_tracer("brigade")
    log.info("tracing on: %s -> %s", attrs["service.name"],
             os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return True


def shutdown() -> None:
    """Flush the spans still queued and stop exporting (at service exit)."""
    global _provider, _tracer
    if _provider is None:
        return
    try:
        _provider.shutdown()
    except Exception as e:  # an unreachable collector must not fail the exit
        log.warning("trace export at shutdown failed: %s", e)
    _provider = None
    _tracer = trace.NoOpTracer()


def start(name: str, parent: Context | Span | None = None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: Mapping[str, Any] | None = None) -> Span:
    """Start a span (end it with `span.end()`); `parent`: a context from `context_of` or a span."""
    ctx = trace.set_span_in_context(parent) if isinstance(parent, Span) else parent
    return _tracer.start_span(name, context=ctx, kind=kind, attributes=attributes)


def headers(span: Span) -> dict[str, str] | None:
    """NATS headers carrying `span`'s context, or None when there is nothing to carry (tracing off)."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def context_of(source: Any) -> Context | None:
    """The trace context in a NATS message's headers (or any str mapping, e.g. HTTP headers)."""
    if not enabled():
        return None
    carrier = source if isinstance(source, Mapping) else getattr(source, "headers", None)
    if not carrier:
        return None
    return _propagator.extract(carrier)


def fail(span: Span, message: str) -> None:
    """Mark `span` as failed."""
    span.set_status(Status(StatusCode.ERROR, message))
