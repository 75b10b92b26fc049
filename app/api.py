"""The Starlette application: `create_app(settings)`.

The app keeps no state of its own between requests; the lifespan opens the
shared clients (async Redis, a PostgreSQL pool, the embedding model) and hands
them to every request through the lifespan state. Errors raised by routes are
rendered once, here, as `{"error": {"code", "message"}}` with their status.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from psycopg_pool import AsyncConnectionPool, ConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import health, web
from app.cache import routes as cache_routes
from app.cache.audit_queue import audit_enqueuer
from app.cache.semantic import SemanticCache
from app.chat import routes as chat_routes
from app.chat.stream_slots import StreamSlots
from app.chat.tool_router import ToolRouter
from app.chat.turn import TurnDeps
from app.embeddings import shared_embedder
from app.errors import (
    BackboneError,
    Forbidden,
    RateLimited,
    Unauthorized,
    store_errors,
    translate,
)
from app.identity import Authenticator
from app.llm import make_provider
from app.mcp import server as mcp_server
from app.memory import routes as memory_routes
from app.memory.queue import AfterTurnMark
from app.memory.recall import make_recall
from app.memory.service import MemoryService
from app.memory.usage import UsageMarks
from app.openai import conversations as openai_conversations
from app.openai import responses as openai_responses
from app.ops import logs, metrics, tracing
from app.privacy import routes as privacy_routes
from app.sessions import routes as session_routes
from app.sessions.store import Sessions
from app.settings import Settings
from app.state import AppState, app_state
from app.stores.clients import (
    MeteredPgPool,
    async_redis_client,
    async_session_reader_client,
    async_session_redis_client,
    redis_client,
)
from app.tools import make_tools

log = logging.getLogger("backbone.api")
# On a forced quit, how long the cut turns may take to persist what they stored.
FORCED_PERSIST_SECONDS = 5.0


def error_response(err: BackboneError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, RateLimited) else None
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


async def _backbone_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BackboneError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    """Any error no route turned into a response. A store's own error classes are
    routed here through Starlette's ExceptionMiddleware (`store_errors`), which
    answers and is done; a handler for plain `Exception` sits in its outermost
    middleware, which answers and then re-raises, so uvicorn printed a traceback for
    every 503 of a Redis outage (hundreds a second under load)."""
    mapped = translate(exc)
    if mapped is not None:
        log.warning("dependency failure on %s: %s", request.url.path, mapped.message)
        return error_response(mapped)
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse(
        {"error": {"code": "internal", "message": "internal error"}}, status_code=500
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_scraper(request: Request, token: str | None) -> None:
    """With METRICS_TOKEN set, only `Authorization: Bearer <it>` (what Prometheus'
    `authorization` scrape setting sends) may read /metrics (401 otherwise); without
    it, only a caller on this machine's loopback (403 otherwise)."""
    if token is None:
        host = request.client.host if request.client else ""
        if not _loopback(host):
            raise Forbidden("/metrics answers loopback callers only; set METRICS_TOKEN "
                            "to scrape it from elsewhere", code="metrics_forbidden")
        return
    sent = request.headers.get("authorization", "")
    if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("/metrics needs Authorization: Bearer <METRICS_TOKEN>")


async def metrics_endpoint(request: Request) -> Response:
    """`GET /metrics`: Prometheus text; see app.ops.metrics and docs/operations.md."""
    state = app_state(request)
    check_scraper(request, state.settings.metrics_token)
    await cache_routes.flush_counts(state)
    shared = await metrics.read_shared(state.redis, state.sessions.redis,
                                       tools=state.turn_deps.router.tools)
    body, content_type = metrics.render(shared)
    return Response(body, media_type=content_type)


def routes() -> list[Route]:
    return [
        Route("/", web.index, methods=["GET"]),
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *session_routes.routes,
        *chat_routes.routes,
        *memory_routes.routes,
        *cache_routes.routes,
        *openai_conversations.routes,
        *openai_responses.routes,
        *privacy_routes.routes,
    ]


async def _stop_turns(turns: set[asyncio.Task[None]], grace: float) -> None:
    """Turns outlive their responses (a client that left, say): give them `grace`
    seconds, then cancel them. A cancelled turn logs `server_stopping` for its
    resumers and persists what it stored (its finish is shielded)."""
    if not turns:
        return
    _, pending = await asyncio.wait(set(turns), timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def create_app(settings: Settings) -> Starlette:
    """Build the app for settings whose REDIS_URL and DATABASE_URL are resolved."""
    assert settings.redis_url and settings.database_url, "resolve the store URLs first"
    assert settings.auth_secret, "resolve the auth secret first (app.auth.with_secret)"

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        redis = async_redis_client(settings.redis_url or "")
        pg: AsyncConnectionPool[Any] = MeteredPgPool(
            settings.database_url or "", min_size=1, max_size=settings.pg_pool_size, open=False,
            kwargs={"autocommit": True},
        )
        await pg.open(wait=False)
        embedder = shared_embedder(settings.embedding_model, settings.embedding_backend)
        # Warm start: the model loads (and, the first time on a machine, is exported
        # to ONNX) while the server already answers /healthz; /readyz says 503 until
        # it is done, so no first turn pays seconds of recall_ms for it.
        warming = asyncio.create_task(embedder.awarm())
        # The session plane: the same client unless SESSION_REDIS_URL is set.
        session_redis = async_session_redis_client(settings, main=redis)
        sessions = Sessions(session_redis, pg, settings.session_ttl_seconds,
                            wait_replicas=settings.session_wait_replicas,
                            wait_timeout_ms=settings.session_redis_wait_timeout_ms)
        audit_conn = redis_client(settings.redis_url or "")
        cache = SemanticCache(redis, settings, audit_enqueuer(audit_conn), embedder=embedder)
        router = ToolRouter(
            make_tools(settings, redis, embedder), embedder, settings.tool_timeout_seconds,
            cache=cache,
        )
        usage = UsageMarks(pg)  # recall's use marks, written in batches (MEMORY_MAX_PER_USER)
        marking = asyncio.create_task(usage.run())
        deps = TurnDeps(sessions, make_provider(settings), router,
                        recall=make_recall(redis, embedder, marks=usage),
                        after_turn=[AfterTurnMark(redis)])
        streams = StreamSlots(session_redis, async_session_reader_client(settings),
                              per_user=settings.max_streams_per_user,
                              per_node=settings.max_streams_per_node)
        auth = Authenticator(settings)
        # The identity provider's keys: /readyz says 503 until they are fetched once.
        auth_start = asyncio.create_task(auth.start())
        # MemoryStore is sync (the workers'): the memory service runs it in threads on
        # these, a few connections beside the async pool.
        store_pg: ConnectionPool[Any] = ConnectionPool(
            settings.database_url or "", min_size=1, max_size=4, open=False,
            kwargs={"autocommit": True},
        )
        store_pg.open(wait=False)
        store_redis = redis_client(settings.redis_url or "")
        memories = MemoryService(redis, pg, store_redis, store_pg, embedder)
        state = AppState(settings, redis, pg, embedder, sessions, deps, streams, auth,
                         memories)
        lag = asyncio.create_task(metrics.watch_loop_lag())
        forced = False
        try:
            async with mcp.session_manager.run():
                yield {"backbone": state}
        except asyncio.CancelledError:
            # A forced quit (a second Ctrl-C): uvicorn skips the lifespan shutdown and
            # asyncio cancels every task, turns and pool workers included. Close what
            # is left without a traceback, once the cancelled turns have persisted.
            forced = True
            log.warning("forced quit: turns in flight were cut without their grace")
        finally:
            warming.cancel()
            lag.cancel()
            auth_start.cancel()
            if forced:
                if state.turns:
                    await asyncio.wait(set(state.turns), timeout=FORCED_PERSIST_SECONDS)
            else:
                await _stop_turns(state.turns, settings.shutdown_grace_seconds)
                await cache.drain()
            audit_conn.close()
            await streams.aclose()
            marking.cancel()  # its last flush runs as it stops, before the pool closes
            await asyncio.gather(marking, return_exceptions=True)
            store_redis.close()
            # Sync, not awaited: a forced quit may cancel an await here; closing idle
            # connections takes milliseconds, and the wait for its workers is bounded.
            store_pg.close(timeout=1.0)
            try:
                await pg.close()
            except asyncio.CancelledError:
                if not forced:
                    raise
                # its workers were cancelled under it: the connections close with the process
            if session_redis is not redis:
                await session_redis.aclose()
            await redis.aclose()

    # Never log these, whatever a message or traceback holds (app.ops.logs).
    logs.redact(settings.auth_secret, settings.metrics_token, urlsplit(settings.redis_url).password,
                urlsplit(settings.database_url).password)
    mcp, mcp_app = mcp_server.build(settings)
    return Starlette(
        # The MCP server (app.mcp, its own bearer gate): its router answers this one path,
        # every method.
        routes=[*routes(), Route("/mcp", mcp_app)],
        # The OpenTelemetry ASGI middleware first, when tracing is on (app.ops.tracing).
        middleware=[*tracing.asgi_middleware(), Middleware(logs.RequestIds)],
        lifespan=lifespan,
        exception_handlers={
            BackboneError: _backbone_error,
            HTTPException: _http_error,
            **dict.fromkeys(store_errors(), _unexpected),
            Exception: _unexpected,
        },
    )
