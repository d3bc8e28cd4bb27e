"""tracing: on only when the OTEL_* environment asks, W3C context round-trips through headers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from brigade import tracing


@pytest.fixture(autouse=True)
def clean(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
              "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(k, raising=False)
    yield
    tracing.shutdown()


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_wanted_follows_the_standard_variables(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                               on: bool) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert tracing.wanted() is on


def test_off_spans_are_free_and_carry_nothing() -> None:
    assert not tracing.setup("gateway")
    span = tracing.start("x")
    assert not span.is_recording()
    assert tracing.headers(span) is None
    assert tracing.context_of({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}) is None


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_setup_picks_the_exporter_by_protocol(monkeypatch: pytest.MonkeyPatch, protocol: str) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    exporter = tracing._exporter()
    assert ("grpc" in type(exporter).__module__) is (protocol == "grpc")


def test_bad_protocol_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="http/protobuf or grpc"):
        tracing.setup("router")


def test_context_round_trips_through_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom-name")
    exporter = InMemorySpanExporter()
    assert tracing.setup("prefill", "prefill-0", exporter=exporter)
    parent = tracing.start("parent", kind=tracing.SpanKind.SERVER, attributes={tracing.REQUEST_ID: "r1"})
    carried = tracing.headers(parent)
    assert carried is not None and set(carried) == {"traceparent"}
    child = tracing.start("child", tracing.context_of(carried))
    tracing.fail(child, "boom")
    child.end()
    parent.end()
    tracing.shutdown()  # flushes
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["child"].parent is not None
    assert spans["child"].parent.span_id == spans["parent"].context.span_id
    assert spans["child"].context.trace_id == spans["parent"].context.trace_id
    assert spans["child"].status.status_code.name == "ERROR"
    assert spans["parent"].attributes[tracing.REQUEST_ID] == "r1"
    res = spans["parent"].resource.attributes
    assert res["service.name"] == "custom-name" and res["service.instance.id"] == "prefill-0"
