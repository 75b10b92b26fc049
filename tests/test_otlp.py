"""app.ops.otlp writes what the SDK's OTLP encoder writes: both encodings of the same
spans decode to equal ExportTraceServiceRequests, whatever the spans hold."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)
from otlp_receiver import receiver

from app.ops import otlp


def _spans(resource: Resource | None = None) -> list[ReadableSpan]:
    """Spans of every shape a provider makes: kinds, parents local and remote, trace
    state, attribute types (empty, negative, huge, arrays), events, links, status."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ours = provider.get_tracer("backbone")
    theirs = provider.get_tracer("opentelemetry.instrumentation.redis", "0.66b1",
                                 schema_url="https://opentelemetry.io/schemas/1.11.0",
                                 attributes={"scope.flag": True})
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True,
                         TraceFlags(1), TraceState([("vendor", "v1"), ("other", "x")]))
    with ours.start_as_current_span("POST /v1/sessions/{sid}/messages", kind=SpanKind.SERVER,
                                    context=set_span_in_context(NonRecordingSpan(remote)),
                                    attributes={"http.status_code": 200}):
        with ours.start_as_current_span("turn", attributes={
            "gen_ai.conversation.id": "f" * 32, "empty": "", "zero": 0, "neg": -7,
            "big": (1 << 63) - 1, "small": -(1 << 63), "ratio": 0.25, "nan": float("inf"),
            "yes": True, "no": False, "strings": ["a", "", "ü"], "ints": [1, -2],
            "floats": (0.5,), "bools": [True], "none": [],
        }) as turn:
            turn.add_event("first", {"seq": 1, "text": "ünïcode"})
            turn.add_event("bare")
            for i in range(3):  # the same attributes again: from the cache
                with theirs.start_as_current_span("EVALSHA", kind=SpanKind.CLIENT,
                                                  attributes={"db.system": "redis",
                                                              "db.redis.args_length": i}):
                    pass
            with ours.start_as_current_span("execute_tool kb_search", links=[
                Link(remote, {"link.kind": "audit"}),
                Link(turn.get_span_context()),
            ]) as tool:
                tool.set_status(Status(StatusCode.ERROR, "tool failed"))
            with ours.start_as_current_span("chat", kind=SpanKind.CONSUMER) as chat:
                chat.set_status(Status(StatusCode.OK))
        with ours.start_as_current_span("producer", kind=SpanKind.PRODUCER):
            pass
    provider.shutdown()
    return list(exporter.get_finished_spans())


def _decoded(data: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(data)


def test_our_bytes_decode_to_what_the_sdk_encodes_for_spans_of_every_shape() -> None:
    spans = _spans()
    for _ in range(2):  # the second time, every attribute comes from the cache
        assert _decoded(otlp.encode(spans)) == encode_spans(spans)


def test_spans_of_equal_resources_share_one_resource_spans_as_in_the_sdk() -> None:
    spans = _spans(Resource.create({"service.name": "a"})) + \
        _spans(Resource.create({"service.name": "a"})) + _spans(Resource.create({"x": "b"}))
    ours = _decoded(otlp.encode(spans))
    assert ours == encode_spans(spans)
    assert len(ours.resource_spans) == 2


def test_the_attribute_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp, "CACHE_SIZE", 8)
    monkeypatch.setattr(otlp, "_attributes", {})
    spans = _spans()  # more than 8 distinct attributes
    for _ in range(2):
        assert _decoded(otlp.encode(spans)) == encode_spans(spans)
        assert 0 < len(otlp._attributes) <= 8


def test_a_value_outside_int64_goes_through_the_sdk_encoder() -> None:
    span = _spans()[0]
    odd = ReadableSpan(name="odd", context=span.context, attributes={"huge": 1 << 64},
                       resource=span.resource, start_time=1, end_time=2)
    with pytest.raises(otlp.Unsupported):
        otlp.encode([odd])


def test_the_exporter_posts_our_encoding_and_falls_back_to_the_sdk_for_the_rest() -> None:
    spans = _spans()
    span = spans[0]
    odd = ReadableSpan(name="odd", context=span.context, attributes={"huge": 1 << 64},
                       resource=span.resource, start_time=1, end_time=2)
    with receiver() as (base, got):
        exporter = otlp.Exporter(endpoint=f"{base}/v1/traces")
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export([odd]) is SpanExportResult.SUCCESS
        exporter.shutdown()
    assert got == [encode_spans(spans), encode_spans([odd])]
    assert not got[1].resource_spans[0].scope_spans[0].spans[0].attributes
