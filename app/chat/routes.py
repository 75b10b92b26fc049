"""The chat turn over Server-Sent Events, and its resumption on any node.

`POST /v1/sessions/{sid}/messages` `{"content": "..."}` validates everything
and appends the user message before the stream starts, so every rejection is a
plain 4xx JSON error; then it streams `message.delta`, `tool.call`,
`tool.result`, `message.done` or `error`, each with an `id:`.
`GET /v1/sessions/{sid}/events` with `Last-Event-ID` (or `?after=<id>`)
replays the rest of that turn from Redis.

The turn runs as its own task, not inside the response: a client that
disconnects only stops reading, and the turn completes, stores and persists
its messages and keeps logging events, so the client can reconnect to any node
and get the rest. A client disconnect is not an error.

When the server stops (SIGTERM, SIGINT), sse-starlette notices within half a
second and would cut every stream. A live turn instead gets
SHUTDOWN_GRACE_SECONDS to finish; then its task is cancelled, and the turn ends
with `error` `server_stopping`, which still reaches its client (the stream is
held open STOP_MARGIN_SECONDS longer for it) before the connection closes. A
resumed stream (`GET .../events`) is just closed: its turn may run on another
node, and the client's reconnect with Last-Event-ID finds the rest there.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.routing import Route

from app import limits
from app.chat import event_log
from app.chat.event_log import Event, EventLog
from app.chat.turn import Turn
from app.errors import BadRequest, RateLimited
from app.sessions import messages
from app.sessions.routes import caller, identified, session_id
from app.state import AppState
from app.stores import scripts

PING_SECONDS = 15
# How long a live stream stays open past the grace for its stopped turn's last
# event and persist; uvicorn's graceful-shutdown timeout leaves room for it.
STOP_MARGIN_SECONDS = 3.0
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


async def check_rate(state: AppState, user: str) -> None:
    """429 with Retry-After once the user's sliding window is full (Lua, one round trip)."""
    s = state.settings
    ok, value = await scripts.arun(state.sessions.redis, scripts.rate_limit(
        user, int(time.time() * 1000), s.rate_limit_window_seconds * 1000,
        s.rate_limit_messages, secrets.token_hex(8),
    ))
    if not ok:
        raise RateLimited(
            f"at most {s.rate_limit_messages} messages per {s.rate_limit_window_seconds} s",
            retry_after=math.ceil(value / 1000),
        )


async def post_message(request: Request) -> EventSourceResponse:
    state, who = await identified(request)
    user = who.user
    sid = session_id(request)
    content = limits.message_content(await limits.json_body(request))
    loaded = await state.sessions.load(sid, user)
    seq = messages.next_seq(loaded.messages)
    limits.check_room(seq)
    await check_rate(state, user)  # last check: a refused request spends no allowance
    stored = await state.sessions.append(
        sid, user, [messages.build(sid, seq, "user", content)], seq
    )
    history = [*loaded.messages, *stored]
    if stored[0]["seq"] != seq:  # another tab wrote meanwhile: re-read
        loaded = await state.sessions.load(sid, user)
        history = loaded.messages
    log_ = EventLog(state.sessions.redis, sid, stored[0]["seq"])
    turn = Turn(state.turn_deps, sid, user, history, log_,
                coalesce_ms=state.settings.stream_coalesce_ms, summary=loaded.summary,
                tenant=who.tenant)
    queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def drive() -> None:
        try:
            async for event in turn.events():
                queue.put_nowait(event)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(drive(), name=f"turn-{sid}-{stored[0]['seq']}")
    state.turns.add(task)  # a strong reference until done; the lifespan awaits leftovers
    task.add_done_callback(state.turns.discard)

    async def stream() -> AsyncIterator[bytes]:
        while True:
            # Events that queued up meanwhile go out in one write (one send, one syscall).
            frames = []
            event = await queue.get()
            while event is not None:
                frames.append(event.sse())
                if event.event in event_log.TERMINAL or queue.empty():
                    break
                event = queue.get_nowait()
            if frames:
                yield b"".join(frames)
            if event is None or event.event in event_log.TERMINAL:
                return  # the turn still persists in its task; the client need not wait

    grace = state.settings.shutdown_grace_seconds
    stopping = anyio.Event()  # set by sse-starlette when the server begins to stop

    async def stop_turn_on_shutdown() -> None:
        """Runs as long as the response: once the server stops, the turn gets
        `grace` seconds, then is cancelled (it ends with `server_stopping`)."""
        await stopping.wait()
        await asyncio.wait({task}, timeout=grace)
        task.cancel()  # a no-op when it is done

    return EventSourceResponse(
        stream(), ping=PING_SECONDS, headers=HEADERS, shutdown_event=stopping,
        shutdown_grace_period=grace + STOP_MARGIN_SECONDS,
        data_sender_callable=stop_turn_on_shutdown,
    )


async def get_events(request: Request) -> EventSourceResponse:
    state, user = await caller(request)
    sid = session_id(request)
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if not raw:
        raise BadRequest("send Last-Event-ID or ?after=<event id>", code="invalid_event_id")
    turn, after = event_log.parse_event_id(raw)
    await state.sessions.load(sid, user)  # 404 / 403 before anything is streamed
    events = event_log.replay(state.sessions.redis, sid, turn, after)
    first = await anext(events)  # 404 when the turn's events are gone

    async def stream() -> AsyncIterator[bytes]:
        yield first.sse()
        if first.event in event_log.TERMINAL:
            return
        async for event in events:
            yield event.sse()

    return EventSourceResponse(stream(), ping=PING_SECONDS, headers=HEADERS)


routes = [
    Route("/v1/sessions/{sid}/messages", post_message, methods=["POST"]),
    Route("/v1/sessions/{sid}/events", get_events, methods=["GET"]),
]
