"""OpenTelemetry traces: off unless an OTLP endpoint is set, standard when on.

`setup(service)` runs once at a process's start (`backbone serve`, `backbone
worker`). Without `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) it
returns False and imports nothing of OpenTelemetry: every `span()` below is one
`None` check. With it, the SDK exports over OTLP/HTTP through a batch
processor (`OTEL_BSP_*`; the SDK's exporter, encoding with app.ops.otlp),
configured only from the standard `OTEL_*` variables (service name, resource
attributes, sampler, headers); and the official
instrumentations trace the ASGI server (`asgi_middleware`), redis-py, psycopg
and httpx (the LLM provider).

Own spans only for what is the project's (docs/observability.md): the turn, each
model step (`chat`, GenAI conventions), each tool call (`execute_tool`, with the
cache outcome), each embedding, the memory recall, the persistence, and the jobs
a turn causes in the worker, which join the turn's trace through the W3C
context carried in the rq job's meta (`job_meta`, `traced_job`).

What is kept out, for cost and privacy:
- client spans with no parent (rq's polling and heartbeats, the dispatcher's and
  ticker's rounds, background flushes) are not sampled;
- the ASGI middleware's per-message `send`/`receive` spans (one per SSE frame);
- the round trips of admission run inside `untraced()`: the erase fence
  (app.privacy.fence), the stream slot's acquire and release (app.chat.stream_slots)
  and the rate limits (app.chat.routes, app.limits), four client spans a turn; and
  the persist's unpersisted-mark reads and writes (app.sessions.store), two more;
- user content: the redis instrumentation adds every document an FT.SEARCH
  returns (passages, cached answers, a user's memories) as attributes of a span
  named `redis.search`; renaming that span before the reply arrives keeps them
  out. Message and tool content goes into spans only with
  OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
CAPTURE_VAR = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
# Server spans not worth their cost: probes and scrapes (OTEL_PYTHON_STARLETTE_EXCLUDED_URLS wins).
EXCLUDED_URLS = "healthz,readyz,metrics"

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_setup_pid = 0
_instrumentors: list[Any] = []
capture_content = False
_NULL: AbstractContextManager[None] = nullcontext()

P = ParamSpec("P")
R = TypeVar("R")


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """An OTLP endpoint is set and the SDK is not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name) for name in ENDPOINT_VARS)


def enabled() -> bool:
    return _tracer is not None


def setup(service: str, *, processor: SpanProcessor | None = None,
          environ: Mapping[str, str] = os.environ) -> bool:
    """Start tracing in this process if an endpoint is set (or, in tests, with
    `processor`); True when on. `service` is the default OTEL_SERVICE_NAME."""
    global _tracer, _provider, _setup_pid, capture_content
    if _tracer is not None:
        return True
    if processor is None and not wanted(environ):
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create(
        {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service})
    # The sampler the OTEL_TRACES_SAMPLER* variables ask for, minus orphan client spans.
    sampler = _no_orphan_clients(TracerProvider(shutdown_on_exit=False).sampler)
    provider = TracerProvider(resource=resource, sampler=sampler)
    if processor is None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from app.ops.otlp import Exporter  # the SDK's, with a leaner encoder

        processor = BatchSpanProcessor(Exporter())
    provider.add_span_processor(processor)
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(provider)  # once per process; tests may set up again
    _instrument(provider)
    _provider, _setup_pid = provider, os.getpid()
    capture_content = environ.get(CAPTURE_VAR, "").strip().lower() == "true"
    _tracer = provider.get_tracer("backbone")
    return True


def shutdown() -> None:
    """Flush, stop the instrumentations and turn tracing off (the end of a test)."""
    global _tracer, _provider
    for inst in _instrumentors:
        inst.uninstrument()
    _instrumentors.clear()
    if _provider is not None:
        _provider.force_flush()
        _provider.shutdown()
    _tracer = _provider = None


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def _instrument(provider: TracerProvider) -> None:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    def redis_request(span: Span, instance: Any, args: Any, kwargs: Any) -> None:
        if args and args[0] == "FT.SEARCH":  # see the module docstring: no documents
            span.update_name("FT.SEARCH")

    redis_inst = RedisInstrumentor()
    redis_inst.instrument(tracer_provider=provider, request_hook=redis_request)
    pg = PsycopgInstrumentor()
    pg.instrument(tracer_provider=provider, enable_commenter=False)
    http = HTTPXClientInstrumentor()
    http.instrument(tracer_provider=provider)
    _instrumentors.extend([redis_inst, pg, http])


def _no_orphan_clients(inner: Any) -> Any:
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import SpanKind, get_current_span

    class NoOrphanClients(Sampler):
        """Drops a client span that starts a trace: a store call outside any turn or job."""

        def should_sample(self, parent_context: Any, trace_id: int, name: str,
                          kind: SpanKind | None = None, attributes: Any = None,
                          links: Any = None, trace_state: Any = None) -> SamplingResult:
            if kind is SpanKind.CLIENT and not get_current_span(
                    parent_context).get_span_context().is_valid:
                return SamplingResult(Decision.DROP)
            result: SamplingResult = inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state)
            return result

        def get_description(self) -> str:
            return f"NoOrphanClients{{{inner.get_description()}}}"

    return NoOrphanClients()


def asgi_middleware() -> list[Any]:
    """The OpenTelemetry ASGI middleware for `create_app`, or nothing when off."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.instrumentation.starlette import _get_default_span_details
    from opentelemetry.util.http import get_excluded_urls, parse_excluded_urls
    from starlette.middleware import Middleware

    excluded = get_excluded_urls("STARLETTE") or parse_excluded_urls(EXCLUDED_URLS)
    return [Middleware(
        OpenTelemetryMiddleware, excluded_urls=excluded, tracer_provider=_provider,
        default_span_details=_get_default_span_details, exclude_spans=["receive", "send"],
    )]  # fmt: skip


def span(name: str, attributes: Mapping[str, Any] | None = None
         ) -> AbstractContextManager[Span | None]:
    """A span of ours, current inside the `with`; yields None when tracing is off."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes)


def untraced() -> AbstractContextManager[object]:
    """No client spans inside: store round trips of bookkeeping no trace reader needs
    (their time stays in the parent's span). Nothing is imported when tracing is off."""
    if _tracer is None:
        return _NULL
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def as_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


# --- GenAI spans (OpenTelemetry semantic conventions for generative AI) ---

def chat(provider: str, model: str) -> AbstractContextManager[Span | None]:
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(f"chat {model}", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
        "gen_ai.request.model": model})


def chat_ended(sp: Span | None, finish: str | None, usage: Mapping[str, int],
               prompt: Any, output: str) -> None:
    if sp is None:
        return
    attrs: dict[str, Any] = {"gen_ai.response.finish_reasons": [finish or "error"]}
    if "prompt_tokens" in usage:
        attrs["gen_ai.usage.input_tokens"] = usage["prompt_tokens"]
    if "completion_tokens" in usage:
        attrs["gen_ai.usage.output_tokens"] = usage["completion_tokens"]
    if capture_content:
        attrs["gen_ai.input.messages"] = as_json(prompt)
        attrs["gen_ai.output.messages"] = as_json(
            [{"role": "assistant", "parts": [{"type": "text", "content": output}]}])
    sp.set_attributes(attrs)


def embeddings(model: str) -> AbstractContextManager[Span | None]:
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(f"embeddings {model}", attributes={
        "gen_ai.operation.name": "embeddings", "gen_ai.request.model": model})


def execute_tool(name: str, call_id: str, arguments: Any) -> AbstractContextManager[Span | None]:
    if _tracer is None:
        return _NULL
    attrs: dict[str, Any] = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name,
                             "gen_ai.tool.call.id": call_id}
    if capture_content:
        attrs["gen_ai.tool.call.arguments"] = as_json(arguments)
    return _tracer.start_as_current_span(f"execute_tool {name}", attributes=attrs)


# --- the worker's jobs join the turn's trace ---

def carrier() -> dict[str, str]:
    """The current span's W3C trace context (`traceparent`, `tracestate`), or {}."""
    if _tracer is None:
        return {}
    from opentelemetry.propagate import inject

    out: dict[str, str] = {}
    inject(out)
    return out


def job_meta() -> dict[str, Any]:
    """rq job meta that carries the current trace into the job (empty when off)."""
    found = carrier()
    return {"otel": found} if found else {}


@contextmanager
def job_span(name: str, queue: str, job_id: str, meta: Mapping[str, Any]) -> Iterator[None]:
    if _tracer is None:
        yield
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    found = meta.get("otel")
    parent = extract(found) if isinstance(found, dict) else None
    try:
        with _tracer.start_as_current_span(name, context=parent, kind=SpanKind.CONSUMER,
                                           attributes={"messaging.system": "rq",
                                                       "messaging.operation.type": "process",
                                                       "messaging.destination.name": queue,
                                                       "messaging.message.id": job_id}):
            yield
    finally:
        if os.getpid() != _setup_pid:
            flush()  # an rq work horse leaves with os._exit: no batch thread outlives it


def traced_job(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run an rq job inside a span that continues the trace in its meta."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def job(*args: P.args, **kwargs: P.kwargs) -> R:
            if _tracer is None:
                return fn(*args, **kwargs)
            from rq import get_current_job

            current = get_current_job()
            if current is None:  # called directly, not by a worker
                return fn(*args, **kwargs)
            with job_span(name, current.origin, current.id, current.meta):
                return fn(*args, **kwargs)

        return job

    return wrap
