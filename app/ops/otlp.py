"""The OTLP/HTTP span exporter, with spans written straight to protobuf wire bytes.

`OTLPSpanExporter` of the SDK encodes a batch by building a protobuf object for
every span, every attribute and every attribute value, then serializing the tree;
and to group the spans by resource it hashes the resource once per span, which
JSON-dumps the resource's attributes. In the batch processor's thread that was
about 35 µs a span here, more than the span cost to start and end on the request
path. `encode` writes the same `ExportTraceServiceRequest` as bytes: a span is a
few concatenations, and an attribute seen before (`db.system=redis`, the peer's
address, `gen_ai.operation.name=chat`, a command's shape) is one dict lookup for
bytes encoded once, about a quarter of the SDK's time.

`Exporter` is the SDK's exporter (endpoint, headers, compression, timeout and
retries from the same OTEL_EXPORTER_OTLP_* variables) with only the encoding
swapped. A batch holding something `encode` does not write (an attribute value
of another type, an int beyond int64) goes through the SDK's encoder instead.
tests/test_otlp.py checks that both encoders' bytes decode to equal messages.

Field numbers: opentelemetry/proto/trace/v1/trace.proto and common/v1/common.proto.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.http._common import _is_request_too_large as _too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import SpanContext, StatusCode

# Span.flags (SpanFlags): the parent's remoteness is known, and whether it is remote.
HAS_IS_REMOTE = 0x100
IS_REMOTE = 0x200
# Encoded attributes kept for reuse; cleared when full (ids and counts would fill it).
CACHE_SIZE = 4096

_u64 = struct.Struct("<Q").pack
_u32 = struct.Struct("<I").pack
_f64 = struct.Struct("<d").pack
_SMALL = [bytes((n,)) for n in range(128)]
_attributes: dict[tuple[str, type, Any], bytes] = {}


class Unsupported(Exception):
    """A value `encode` does not write: the batch goes to the SDK's encoder."""


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte(s), the length, the payload."""
    return tag + _varint(len(payload)) + payload


def _value(v: Any) -> bytes:
    """AnyValue, as the SDK's encoder builds it (bool before int: bool is an int)."""
    if isinstance(v, bool):
        return b"\x10\x01" if v else b"\x10\x00"
    if isinstance(v, str):
        return _field(b"\x0a", v.encode())
    if isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise Unsupported(v)
        return b"\x18" + _varint(v & 0xFFFFFFFFFFFFFFFF)
    if isinstance(v, float):
        return b"\x21" + _f64(v)
    if isinstance(v, bytes):
        return _field(b"\x3a", v)
    if isinstance(v, (tuple, list)):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(x)) for x in v))
    raise Unsupported(type(v))


def _key_value(tag: bytes, key: str, v: Any) -> bytes:
    return _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", _value(v)))


def _span_attributes(attributes: Mapping[str, Any] | None) -> list[bytes]:
    """Span.attributes (field 9), each from the cache when seen before."""
    out = []
    for key, v in (attributes or {}).items():
        cache_key = (key, type(v), v)
        try:
            out.append(_attributes[cache_key])
            continue
        except KeyError:
            pass
        except TypeError:  # an unhashable value: encoded every time
            out.append(_key_value(b"\x4a", key, v))
            continue
        if len(_attributes) >= CACHE_SIZE:
            _attributes.clear()
        out.append(_attributes.setdefault(cache_key, _key_value(b"\x4a", key, v)))
    return out


def _attributes_field(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    return b"".join(_key_value(tag, k, v) for k, v in (attributes or {}).items())


def _flags(parent: SpanContext | None) -> int:
    return HAS_IS_REMOTE | IS_REMOTE if parent is not None and parent.is_remote \
        else HAS_IS_REMOTE


def _span(span: ReadableSpan) -> bytes:
    """Span, as the field of ScopeSpans (2) it goes into."""
    ctx = span.context
    parent = span.parent
    if ctx is None or span.start_time is None or span.end_time is None:
        raise Unsupported("a span without context or times")
    parts = [b"\x0a\x10", ctx.trace_id.to_bytes(16, "big"),
             b"\x12\x08", ctx.span_id.to_bytes(8, "big")]
    if ctx.trace_state:
        state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
        parts.append(_field(b"\x1a", state.encode()))
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (_field(b"\x2a", span.name.encode()), b"\x30", _SMALL[span.kind.value + 1],
              b"\x39", _u64(span.start_time), b"\x41", _u64(span.end_time))
    parts += _span_attributes(span.attributes)
    if span.dropped_attributes:
        parts += (b"\x50", _varint(span.dropped_attributes))
    for event in span.events:
        parts.append(_field(b"\x5a", b"".join((
            b"\x09", _u64(event.timestamp), _field(b"\x12", event.name.encode()),
            _attributes_field(b"\x1a", event.attributes),
            b"\x20" + _varint(event.dropped_attributes) if event.dropped_attributes else b"",
        ))))
    if span.dropped_events:
        parts += (b"\x60", _varint(span.dropped_events))
    for link in span.links:
        parts.append(_field(b"\x6a", b"".join((
            b"\x0a\x10", link.context.trace_id.to_bytes(16, "big"),
            b"\x12\x08", link.context.span_id.to_bytes(8, "big"),
            _attributes_field(b"\x22", link.attributes),
            b"\x28" + _varint(link.dropped_attributes) if link.dropped_attributes else b"",
            b"\x35", _u32(_flags(link.context)),
        ))))
    if span.dropped_links:
        parts += (b"\x70", _varint(span.dropped_links))
    status = span.status
    parts.append(_field(b"\x7a", b"".join((
        _field(b"\x12", status.description.encode()) if status.description else b"",
        b"\x18" + _SMALL[status.status_code.value]
        if status.status_code is not StatusCode.UNSET else b"",
    ))))
    parts += (b"\x85\x01", _u32(_flags(parent)))
    return _field(b"\x12", b"".join(parts))


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    return b"".join((
        _field(b"\x0a", scope.name.encode()) if scope.name else b"",
        _field(b"\x12", scope.version.encode()) if scope.version else b"",
        _attributes_field(b"\x1a", scope.attributes),
    ))


def _groups(spans: Iterable[ReadableSpan]
            ) -> list[tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]]:
    """The spans by resource, then by scope, in first-seen order (as the SDK groups
    them). Resources are told apart by identity first (one provider shares one
    resource object); equal ones are merged after, so no hash is taken per span."""
    by_id: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
    for span in spans:
        resource = span.resource
        group = by_id.get(id(resource))
        if group is None:
            group = by_id[id(resource)] = (resource, {})
        group[1].setdefault(span.instrumentation_scope or None, []).append(_span(span))
    merged: list[tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = []
    for resource, scopes in by_id.values():
        same = next((m for m in merged if m[0] == resource), None)
        if same is None:
            merged.append((resource, scopes))
            continue
        for scope, encoded in scopes.items():
            same[1].setdefault(scope, []).extend(encoded)
    return merged


def encode(spans: Sequence[ReadableSpan]) -> bytes:
    """ExportTraceServiceRequest for `spans`, serialized; Unsupported for what only the
    SDK's encoder writes."""
    out = []
    for resource, scopes in _groups(spans):
        body = [_field(b"\x0a", _attributes_field(b"\x0a", resource.attributes))]
        for scope, encoded in scopes.items():
            schema = scope.schema_url if scope is not None else None
            body.append(_field(b"\x12", b"".join((
                _field(b"\x0a", _scope(scope)), *encoded,
                _field(b"\x1a", schema.encode()) if schema else b"",
            ))))
        if resource.schema_url:
            body.append(_field(b"\x1a", resource.schema_url.encode()))
        out.append(_field(b"\x0a", b"".join(body)))
    return b"".join(out)


class Exporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, encoding with `encode`."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            data = encode(spans)
        except Unsupported:
            return super().export(spans)
        if self._shutdown or _too_large(data, self._max_request_size):
            return super().export(spans)  # the SDK's own refusal: its log, its metrics
        # As OTLPSpanExporter.export (1.45.1) does with the bytes it encoded.
        with self._metrics.export_operation(len(spans)) as result:
            sent = self._client.export(data)
            if not sent.success:
                result.error = sent.error
                if sent.status_code is not None:
                    result.error_attrs = {HTTP_RESPONSE_STATUS_CODE: sent.status_code}
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
