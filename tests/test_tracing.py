"""OpenTelemetry traces (app.ops.tracing): one turn is one trace, from the route through
Redis and PostgreSQL into the worker's extraction; no user content unless switched on;
nothing imported without an endpoint; a real OTLP/HTTP receiver decodes what is sent."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aredis
from live import app_process
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from otlp_receiver import receiver
from rq import Queue, SimpleWorker
from sse import frames
from starlette.testclient import TestClient
from waits import wait_until

from app.api import create_app
from app.chat.stream_slots import StreamSlots
from app.memory.queue import dispatch_all
from app.ops import tracing
from app.settings import Settings

Headers = Callable[[str], dict[str, str]]
# In the user's message only: it must reach no span unless content capture is on.
SECRET_WORD = "quokkaventure"
QUESTION = f"I'm allergic to peanuts. How does Redis Stack search vectors? {SECRET_WORD}"


@contextlib.contextmanager
def traced(**environ: str) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.setup("backbone-test", processor=SimpleSpanProcessor(exporter),
                         environ=environ)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _turn(c: TestClient, sid: str, h: dict[str, str], text: str) -> None:
    with c.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                  json={"content": text}) as res:
        assert res.status_code == 200
        assert frames(res.iter_lines())[-1].event == "message.done"


def _by_name(spans: list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def _system(s: ReadableSpan) -> str:
    attrs = s.attributes or {}
    return str(attrs.get("db.system.name") or attrs.get("db.system") or "")


def _one_turn_and_its_extraction(
    stores_env: Settings, r: redis.Redis, h: dict[str, str], text: str,
    exporter: InMemorySpanExporter,
) -> tuple[list[ReadableSpan], ReadableSpan]:
    """One turn (its session a fresh one), the worker's extraction; the turn's trace."""
    with TestClient(create_app(stores_env)) as c:
        sid = c.post("/v1/sessions", headers=h).json()["id"]
        _turn(c, sid, h, text)
        wait_until(lambda: r.zscore("memory-due", sid) is not None, "the turn's due mark")
        wait_until(lambda: _by_name(exporter.get_finished_spans(), "turn"), "the turn span")
    assert dispatch_all(r) >= 1
    SimpleWorker([Queue("memory", connection=r)], connection=r).work(burst=True)
    spans = list(exporter.get_finished_spans())
    [turn] = [s for s in _by_name(spans, "turn")
              if (s.attributes or {}).get("gen_ai.conversation.id") == sid]
    trace_id = turn.context.trace_id
    return [s for s in spans if s.context.trace_id == trace_id], turn


def test_one_turn_is_one_trace_from_the_route_through_redis_and_postgres_into_the_worker(
    stores_env: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    with traced() as exporter:
        spans, turn = _one_turn_and_its_extraction(stores_env, r, token_for(user), QUESTION,
                                                   exporter)
    by_id = {s.context.span_id: s for s in spans}
    if os.environ.get("SHOW_TREE"):
        for s in sorted(spans, key=lambda s: s.start_time or 0):
            p = by_id.get(s.parent.span_id) if s.parent else None
            print(f"{s.name:40} <- {p.name if p else '-'}  {dict(s.attributes or {})}")

    def parent(s: ReadableSpan) -> ReadableSpan | None:
        return by_id.get(s.parent.span_id) if s.parent else None

    [server] = [s for s in spans if s.kind is SpanKind.SERVER]
    assert server.name == "POST /v1/sessions/{sid}/messages"
    assert parent(turn) is server
    chats = _by_name(spans, "chat ")
    assert len(chats) == 2  # the step that asks for kb_search, the step that answers
    for chat in chats:
        assert parent(chat) is turn
        assert chat.attributes is not None
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "offline"
        assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert [c.attributes["gen_ai.response.finish_reasons"] for c in chats  # type: ignore[index]
            ] == [("tool_calls",), ("stop",)]
    [tool] = _by_name(spans, "execute_tool ")
    assert parent(tool) is turn
    assert tool.attributes is not None
    assert tool.attributes["gen_ai.tool.name"] == "kb_search"
    assert tool.attributes["backbone.cache.outcome"] == "miss"  # a question never asked
    # The question is embedded once, for the recall; the tool's query reuses the vector.
    [embed] = _by_name(spans, "embeddings ")
    assert parent(parent(embed)) is turn  # type: ignore[arg-type]
    assert [parent(s) for s in _by_name(spans, "recall")] == [turn]
    [persist] = _by_name(spans, "persist")
    assert parent(persist) is turn
    # Its unpersisted mark's ZSCORE and script make no span; PostgreSQL's write does.
    assert {_system(s) for s in spans if parent(s) is persist} == {"postgresql"}
    redis_spans = [s for s in spans if _system(s) == "redis"]
    pg_spans = [s for s in spans if _system(s) == "postgresql"]
    assert redis_spans and pg_spans
    # Admission (the erase fence's EXISTS, the stream slot's script and ZREM, the rate
    # limit's script) makes no span: below the server span, only the session's read.
    assert [s.name for s in redis_spans if parent(s) is server] == ["EVALSHA"]
    assert not _by_name(redis_spans, "ZREM")
    assert all(s.kind is SpanKind.CLIENT for s in redis_spans + pg_spans)
    # The worker's extraction joined the trace, a child of the turn that marked it,
    # with its own store spans below it.
    [job] = _by_name(spans, "memory.extract")
    assert job.kind is SpanKind.CONSUMER and parent(job) is turn
    below_job = {s.context.span_id for s in spans if parent(s) is job}
    assert any(_system(by_id[i]) == "redis" for i in below_job)
    assert any(_system(by_id[i]) == "postgresql" for i in below_job)
    # No user content by default: not in any attribute or event of the trace.
    for s in spans:
        assert SECRET_WORD not in repr(dict(s.attributes or {})), s.name
        assert all(SECRET_WORD not in repr(dict(e.attributes or {})) for e in s.events), s.name


def test_a_repeated_question_is_an_exact_hit_on_its_tool_span_and_its_audit_joins_the_trace(
    stores_env: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    text = f"What does a semantic cache key hold? {user}"
    audited = dataclasses.replace(stores_env, retrieval_cache_audit_rate=1.0)
    with traced() as exporter:
        with TestClient(create_app(audited)) as c:
            h = token_for(user)
            for _ in range(2):
                _turn(c, c.post("/v1/sessions", headers=h).json()["id"], h, text)
            wait_until(lambda: len(_by_name(exporter.get_finished_spans(), "turn")) >= 2,
                       "both turns' spans")
        # The lifespan's end waited for the audit enqueue; the worker runs it.
        SimpleWorker([Queue("audit", connection=r)], connection=r).work(burst=True)
        spans = list(exporter.get_finished_spans())
    tools = _by_name(spans, "execute_tool ")[-2:]
    outcomes = [(s.attributes or {}).get("backbone.cache.outcome") for s in tools]
    assert outcomes == ["miss", "exact_hit"]
    assert (tools[-1].attributes or {}).get("backbone.cache.distance") == 0.0
    hit = tools[-1]
    [audit] = [s for s in _by_name(spans, "cache.audit")
               if s.context.trace_id == hit.context.trace_id]
    assert audit.kind is SpanKind.CONSUMER
    assert audit.parent is not None and audit.parent.span_id == hit.context.span_id


@pytest.mark.anyio
async def test_the_stream_slots_acquire_and_release_make_no_span_and_a_command_beside_them_does(
    settings: Settings, user: str
) -> None:
    client = aredis.Redis.from_url(settings.redis_url or "")
    with traced() as exporter:
        slots = StreamSlots(client, client, per_user=8, per_node=256)
        with tracing.span("request"):
            slot = await slots.acquire(user)
            await client.get(f"unrelated:{user}")
            slot.release()
        await slots.aclose()  # waits for the release's ZREM
        names = [s.name for s in exporter.get_finished_spans()]
    await client.aclose()
    assert names == ["GET", "request"]


def test_content_capture_puts_the_messages_on_the_chat_span_only_when_switched_on(
    stores_env: Settings, r: redis.Redis, token_for: Headers, user: str
) -> None:
    with traced(OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true") as exporter:
        spans, _ = _one_turn_and_its_extraction(stores_env, r, token_for(user), QUESTION,
                                                exporter)
    first = _by_name(spans, "chat ")[0].attributes or {}
    assert SECRET_WORD in str(first["gen_ai.input.messages"])
    tool = _by_name(spans, "execute_tool ")[0].attributes or {}
    assert SECRET_WORD in str(tool["gen_ai.tool.call.arguments"])


def test_without_an_endpoint_no_tracing_is_imported_and_no_client_is_patched(
    project_root: Any,
) -> None:
    """redis-py imports a few OpenTelemetry API modules itself when they are installed (for
    its own metrics, off unless initialised), and the `mcp` SDK imports the API's
    `opentelemetry.propagate` (its spans are no-ops without an SDK); the tracing SDK, the
    exporter and the instrumentations stay out, and no client's methods are wrapped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = (
        "import sys, redis, psycopg, httpx; import app.api, app.cli, workers.worker, "
        "workers.memory_job, workers.audit\n"
        "from app.ops import tracing\n"
        "assert not tracing.setup('x') and not tracing.enabled()\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter', 'opentelemetry.instrumentation'))))\n"
        "print([f for f in (redis.Redis.execute_command, psycopg.Connection.connect, "
        "httpx.Client.send) if hasattr(f, '__wrapped__')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=project_root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def _spans(got: list[ExportTraceServiceRequest]) -> list[tuple[str, Any]]:
    """(service.name, span) for every span received."""
    out = []
    for req in got:
        for rs in req.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes
                           if a.key == "service.name")
            out.extend((service, s) for ss in rs.scope_spans for s in ss.spans)
    return out


@pytest.mark.slow
def test_a_turn_sent_to_an_otlp_http_receiver_arrives_as_one_trace_with_the_workers_job(
    stores_env: Settings, token_for: Headers, user: str
) -> None:
    with receiver() as (endpoint, got):
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        with app_process(stores_env, **otel) as (base, _):
            h = token_for(user)
            sid = httpx.post(f"{base}/v1/sessions", headers=h).json()["id"]
            with httpx.stream("POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
                              json={"content": QUESTION}, timeout=60) as res:
                assert frames(res.iter_lines())[-1].event == "message.done"
            wait_until(lambda: any(s.name == "turn" for _, s in _spans(got)), "the turn span")
        # A burst worker dispatches what is due, then runs it, and exports at exit.
        worker = subprocess.run(
            [sys.executable, "-m", "app.cli", "worker", "--burst"],
            env={**os.environ, "REDIS_URL": stores_env.redis_url or "",
                 "DATABASE_URL": stores_env.database_url or "", **otel},
            capture_output=True, text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr[-2000:]
    spans = _spans(got)
    [turn] = [s for _, s in spans if s.name == "turn" and any(
        a.key == "gen_ai.conversation.id" and a.value.string_value == sid for a in s.attributes)]
    trace = [(svc, s) for svc, s in spans if s.trace_id == turn.trace_id]
    names = {(svc, s.name) for svc, s in trace}
    assert ("backbone-api", "POST /v1/sessions/{sid}/messages") in names
    assert ("backbone-api", "chat offline") in names
    assert ("backbone-api", "execute_tool kb_search") in names
    assert ("backbone-worker", "memory.extract") in names
    services_with_redis = {svc for svc, s in trace for a in s.attributes
                           if a.key in ("db.system", "db.system.name")
                           and a.value.string_value == "redis"}
    assert services_with_redis == {"backbone-api", "backbone-worker"}
    assert not any(SECRET_WORD in str(s) for _, s in trace)
