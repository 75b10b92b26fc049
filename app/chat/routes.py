"""The chat turn over Server-Sent Events, and its resumption on any node.

`POST /v1/sessions/{sid}/messages` `{"content": "..."}` validates everything
and appends the user message before the stream starts, so every rejection is a
plain 4xx JSON error; then it streams `message.delta`, `tool.call`,
`tool.result`, `message.done` or `error`, each with an `id:`.
`GET /v1/sessions/{sid}/events` with `Last-Event-ID` (or `?after=<id>`)
replays the rest of that turn from Redis.

Both are streams: each holds a slot of `state.streams` (app.chat.stream_slots)
from before its first Redis command to its end, at most MAX_STREAMS_PER_USER per
user and MAX_STREAMS_PER_NODE per node, else `429 too_many_streams`. A resume's
blocking reads use the slots' own pool of readers.

The POST's response carries `X-Stream-Token`: a token for this user's events of
this session only, for STREAM_TOKEN_SECONDS (app.auth). The events route takes
it as `?token=` in place of the Authorization header, so a browser's own
EventSource (which sends no headers, but sends Last-Event-ID on its automatic
reconnect) can resume the turn. Logs never show it (app.ops.logs masks anything
shaped like a JWT, and the access line has no query).

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
from dataclasses import dataclass

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.routing import Route

from app import limits
from app.auth import issue_stream_token, verify_stream_token
from app.chat import event_log
from app.chat.event_log import Event, EventLog
from app.chat.stream_slots import Slot, SlotStream
from app.chat.turn import Turn
from app.errors import BadRequest, RateLimited
from app.ops import tracing
from app.privacy.fence import check_not_erased
from app.sessions import messages
from app.sessions.routes import caller, identified, session_id
from app.state import AppState, app_state
from app.stores import scripts

PING_SECONDS = 15
# How long a live stream stays open past the grace for its stopped turn's last
# event and persist; uvicorn's graceful-shutdown timeout leaves room for it.
STOP_MARGIN_SECONDS = 3.0
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


async def check_rate(state: AppState, user: str) -> None:
    """429 with Retry-After once the user's sliding window is full (Lua, one round trip)."""
    s = state.settings
    with tracing.untraced():  # admission, as the stream slot: no span (app.ops.tracing)
        ok, value = await scripts.arun(state.sessions.redis, scripts.rate_limit(
            user, int(time.time() * 1000), s.rate_limit_window_seconds * 1000,
            s.rate_limit_messages, secrets.token_hex(8),
        ))
    if not ok:
        raise RateLimited(
            f"at most {s.rate_limit_messages} messages per {s.rate_limit_window_seconds} s",
            retry_after=math.ceil(value / 1000),
        )


@dataclass
class LiveTurn:
    """A turn started by `start_turn`: its task runs on, whoever reads its events."""

    sid: str
    turn: int  # the seq of its user message, which names its event log
    task: asyncio.Task[None]
    queue: asyncio.Queue[Event | None]

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The turn's events as they come, those queued meanwhile together (one
        write, one syscall), ending with its terminal event."""
        while True:
            events = []
            event = await self.queue.get()
            while event is not None:
                events.append(event)
                if event.event in event_log.TERMINAL or self.queue.empty():
                    break
                event = self.queue.get_nowait()
            if events:
                yield events
            if event is None or event.event in event_log.TERMINAL:
                return  # the turn still persists in its task; the client need not wait


async def start_turn(
    state: AppState, user: str, sid: str, content: str, *, instructions: str | None = None,
    tenant: str | None = None,
) -> LiveTurn:
    """Check, append the user message and start the turn's task: the one way a turn
    starts, for the native route and the OpenAI-compatible face (app.openai) alike.

    Every refusal (404/403, a full session, the rate limit) comes before anything
    is written; `instructions` are this turn's alone (not stored in the history);
    `tenant` is the caller's (AUTH_TENANT_CLAIM), whose knowledge kb_search reads.
    """
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
    turn_no = int(stored[0]["seq"])
    log_ = EventLog(state.sessions.redis, sid, turn_no)
    turn = Turn(state.turn_deps, sid, user, history, log_,
                coalesce_ms=state.settings.stream_coalesce_ms, summary=loaded.summary,
                instructions=instructions, tenant=tenant)
    queue: asyncio.Queue[Event | None] = asyncio.Queue()

    async def drive() -> None:
        try:
            async for event in turn.events():
                queue.put_nowait(event)
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(drive(), name=f"turn-{sid}-{turn_no}")
    state.turns.add(task)  # a strong reference until done; the lifespan awaits leftovers
    task.add_done_callback(state.turns.discard)
    return LiveTurn(sid, turn_no, task, queue)


def live_response(
    state: AppState, live: LiveTurn, body: AsyncIterator[bytes], slot: Slot,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """The SSE response of a live turn, with its shutdown behaviour (module docstring);
    it gives `slot` back when it ends."""
    grace = state.settings.shutdown_grace_seconds
    stopping = anyio.Event()  # set by sse-starlette when the server begins to stop

    async def stop_turn_on_shutdown() -> None:
        """Runs as long as the response: once the server stops, the turn gets
        `grace` seconds, then is cancelled (it ends with `server_stopping`)."""
        await stopping.wait()
        await asyncio.wait({live.task}, timeout=grace)
        live.task.cancel()  # a no-op when it is done

    return SlotStream(
        slot, body, ping=PING_SECONDS, headers={**HEADERS, **(headers or {})},
        shutdown_event=stopping, shutdown_grace_period=grace + STOP_MARGIN_SECONDS,
        data_sender_callable=stop_turn_on_shutdown,
    )


async def post_message(request: Request) -> EventSourceResponse:
    state, who = await identified(request)
    user = who.user
    sid = session_id(request)
    content = limits.message_content(await limits.json_body(request))
    # The stream's slot first: a refused one costs no other Redis work.
    async with state.streams.opening(user) as slot:
        live = await start_turn(state, user, sid, content, tenant=who.tenant)

    async def stream() -> AsyncIterator[bytes]:
        async for events in live.batches():
            yield b"".join(event.sse() for event in events)

    token = issue_stream_token(state.settings.auth_secret or "", user, sid)
    return live_response(state, live, stream(), slot, headers={"X-Stream-Token": token})


async def events_caller(request: Request) -> tuple[AppState, str, str]:
    """(state, user, sid): the bearer token's user, or without an Authorization header
    the user of the `?token=` stream token, which must be for this session."""
    token = request.query_params.get("token")
    if token and "authorization" not in request.headers:
        state, sid = app_state(request), session_id(request)
        user = verify_stream_token(state.settings.auth_secret or "", token, sid)
        await check_not_erased(state.sessions.redis, user)  # as for a bearer token
        return state, user, sid
    state, user = await caller(request)
    return state, user, session_id(request)


async def get_events(request: Request) -> EventSourceResponse:
    state, user, sid = await events_caller(request)
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    if not raw:
        raise BadRequest("send Last-Event-ID or ?after=<event id>", code="invalid_event_id")
    turn, after = event_log.parse_event_id(raw)
    async with state.streams.opening(user) as slot:  # 429 before any other Redis work
        await state.sessions.load(sid, user)  # 404 / 403 before anything is streamed
        # Blocking reads on the readers' pool, never on the one the request path needs.
        events = event_log.replay(state.streams.reader, sid, turn, after)
        first = await anext(events)  # 404 when the turn's events are gone

    async def stream() -> AsyncIterator[bytes]:
        yield first.sse()
        if first.event in event_log.TERMINAL:
            return
        async for event in events:
            yield event.sse()

    return SlotStream(slot, stream(), ping=PING_SECONDS, headers=HEADERS)


routes = [
    Route("/v1/sessions/{sid}/messages", post_message, methods=["POST"]),
    Route("/v1/sessions/{sid}/events", get_events, methods=["GET"]),
]
