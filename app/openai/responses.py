"""`/v1/responses`: one turn of a session, seen through the Responses API.

    POST /v1/responses          {input, model?, conversation? | previous_response_id?,
                                 instructions?, metadata?, stream?, store?}
    GET  /v1/responses/{id}     the response as it stands (from the event log, or
                                from the history once the log has expired)
    GET  /v1/responses/{id}?stream=true&starting_after=N
                                the stream events after N, replayed and then live
                                from the turn's event log, on any node

The turn is started by `app.chat.routes.start_turn`, exactly as a native
`POST /v1/sessions/{sid}/messages`: same checks, rate limit, append, tools,
cache, event log, persist and shutdown behaviour. Without a conversation or a
previous response a new session is made. `previous_response_id` continues that
response's session and must name its latest response (409 otherwise: a session
does not branch). `store: false` runs the turn in a new session that is deleted
(fenced, like DELETE) as soon as the turn has ended, so the response cannot be
retrieved or continued. `model` is echoed; the provider is the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import limits
from app.chat import event_log
from app.chat.event_log import Event
from app.chat.routes import HEADERS, PING_SECONDS, LiveTurn, live_response, start_turn
from app.chat.stream_slots import Slot, SlotStream
from app.errors import BadRequest, Conflict, NotFound
from app.openai import ids, items, records
from app.openai.errors import openai_route
from app.openai.events import Projection, sse
from app.sessions.messages import Message
from app.sessions.routes import caller, identified
from app.state import AppState

MAX_MODEL_CHARS = 128
DIGITS = re.compile(r"[0-9]{1,9}")


def default_model(state: AppState) -> str:
    provider = state.turn_deps.provider
    return "offline" if provider.name == "offline" else state.settings.llm_model


def _optional(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is not None and not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be a {kind.__name__}", param=name)
    return value


async def _session(state: AppState, user: str, body: dict[str, Any], store: bool
                   ) -> tuple[str, bool]:
    """The session this response runs in, and whether it was made for it."""
    conv, prev = body.get("conversation"), body.get("previous_response_id")
    if conv is not None and prev is not None:
        raise BadRequest("send conversation or previous_response_id, not both",
                         param="previous_response_id")
    if not store and (conv is not None or prev is not None):
        raise BadRequest("store: false runs alone (no conversation, no previous response): "
                         "a conversation keeps what it is given", param="store")
    if conv is not None:
        return ids.parse_conversation(conv.get("id") if isinstance(conv, dict) else conv), False
    if prev is not None:
        sid, turn = ids.parse_response(prev, param="previous_response_id")
        loaded = await state.sessions.load(sid, user)  # 404 / 403
        latest = max((int(m["seq"]) for m in loaded.messages if m.get("role") == "user"),
                     default=-1)
        if turn > latest:
            raise NotFound("no such response", param="previous_response_id")
        if turn < latest:
            raise Conflict("previous_response_id must be the latest response of its "
                           f"conversation ({ids.response_id(sid, latest)})",
                           param="previous_response_id")
        return sid, False
    await limits.check_session_rate(state.sessions.redis, state.settings, user)
    return await state.sessions.create(user), True


def _forget_when_done(state: AppState, live: LiveTurn, user: str) -> None:
    """store: false — delete the session once its turn has ended (persisted, hooks run)."""

    async def forget() -> None:
        await asyncio.wait({live.task})
        await state.sessions.delete(live.sid, user)

    task = asyncio.create_task(forget(), name=f"forget-{live.sid}")
    state.turns.add(task)
    task.add_done_callback(state.turns.discard)


async def create(request: Request) -> Response:
    state, who = await identified(request)
    user = who.user
    body = await limits.json_body(request)
    content, extra = items.request_input(body.get("input"))
    instructions = _optional(body, "instructions", str)
    if extra:
        instructions = f"{instructions}\n\n{extra}" if instructions else extra
    model = _optional(body, "model", str) or default_model(state)
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"'model' is at most {MAX_MODEL_CHARS} characters", param="model")
    meta = items.metadata(body.get("metadata"))
    stream = _optional(body, "stream", bool, False)
    store = _optional(body, "store", bool, True)
    # A streamed response is a stream like the native route's: its slot first.
    async with (state.streams.opening(user) if stream else _no_slot()) as slot:
        sid, made = await _session(state, user, body, store)
        try:
            live = await start_turn(state, user, sid, content, instructions=instructions,
                                  tenant=who.tenant)
        except BaseException:
            if made:  # refused (rate limit, say): leave no empty session behind
                with contextlib.suppress(Exception):
                    await state.sessions.delete(sid, user)
            raise
        record = records.new(model, instructions, meta, body.get("previous_response_id"),
                             body.get("conversation") is not None)
        if store:
            await records.save(state.sessions.redis, sid, live.turn, record, state.settings
                               .session_ttl_seconds)
        else:
            _forget_when_done(state, live, user)
    skeleton = records.skeleton(sid, live.turn, record, model, record["created_at"])
    projection = Projection(sid, live.turn, {**skeleton, "store": store})
    if not stream:
        async for events in live.batches():
            for event in events:
                projection.feed(event)
        return JSONResponse(projection.snapshot())

    async def body_() -> AsyncIterator[bytes]:
        yield b"".join(sse(e) for e in projection.start())
        async for events in live.batches():
            yield b"".join(sse(e) for event in events for e in projection.feed(event))

    assert slot is not None
    return live_response(state, live, body_(), slot)


@contextlib.asynccontextmanager
async def _no_slot() -> AsyncIterator[Slot | None]:
    yield None


async def _turn_of(
    state: AppState, user: str, request: Request
) -> tuple[str, int, list[Message]]:
    """(sid, turn, history) of the caller's response id; 404 / 403 as a session."""
    sid, turn = ids.parse_response(str(request.path_params["rid"]))
    loaded = await state.sessions.load(sid, user)  # 404 / 403 before anything else
    first = int(loaded.messages[0]["seq"]) if loaded.messages else 0
    history = loaded.messages
    if turn < first:  # collapsed out of the hot copy: PostgreSQL has it
        history = (await state.sessions.full_history(sid, user)).messages
    if not any(int(m["seq"]) == turn and m.get("role") == "user" for m in history):
        raise NotFound("no such response")
    return sid, turn, history


def _created_at(event: Event) -> int:
    """Seconds of the turn's start, from its first event's id (`<turn>.<ms>-<n>`)."""
    return int(event.id.partition(".")[2].partition("-")[0]) // 1000


async def retrieve(request: Request) -> Response:
    state, user = await caller(request)
    sid, turn, history = await _turn_of(state, user, request)
    q = request.query_params
    after = q.get("starting_after")
    if after is not None and not DIGITS.fullmatch(after):  # ASCII: int() takes any script's
        raise BadRequest("starting_after is a sequence number", param="starting_after")
    record = await records.load(state.sessions.redis, sid, turn)
    model = default_model(state)
    if q.get("stream") in ("true", "1"):
        # The session's latest turn without its answer is running (or about to end):
        # a resume waits for its events rather than finding none logged yet.
        latest = max(int(m["seq"]) for m in history if m.get("role") == "user")
        running = turn == latest and not items.turn_output(sid, turn, history)[1]
        async with state.streams.opening(user) as slot:  # as the native resume route
            return await _resume(state, sid, turn, record, model,
                                 -1 if after is None else int(after), slot, running)
    logged = await event_log.read_all(state.sessions.redis, sid, turn)
    if logged:
        projection = Projection(sid, turn, records.skeleton(
            sid, turn, record, model, _created_at(logged[0])))
        for event in logged:
            projection.feed(event)
        return JSONResponse(projection.snapshot())
    history = (await state.sessions.full_history(sid, user)).messages
    output, done = items.turn_output(sid, turn, history)
    created = next(m for m in history if int(m["seq"]) == turn)["created_at"]
    skeleton = records.skeleton(sid, turn, record, model, _iso_epoch(created))
    return JSONResponse({**skeleton, "output": output,
                         "status": "completed" if done else "in_progress"})


async def _resume(state: AppState, sid: str, turn: int, record: records.Record | None,
                  model: str, after: int, slot: Slot, running: bool) -> EventSourceResponse:
    # Blocking reads on the readers' pool, never on the one the request path needs.
    replayed = event_log.replay(state.streams.reader, sid, turn, "0-0", starting=running)
    first = await anext(replayed)  # 404 when the turn's events are gone
    projection = Projection(sid, turn, records.skeleton(
        sid, turn, record, model, _created_at(first)))

    async def body_() -> AsyncIterator[bytes]:
        out = [e for e in projection.start() if e["sequence_number"] > after]
        out += [e for e in projection.feed(first) if e["sequence_number"] > after]
        if out:
            yield b"".join(sse(e) for e in out)
        if first.event in event_log.TERMINAL:
            return
        async for event in replayed:
            fresh = [e for e in projection.feed(event) if e["sequence_number"] > after]
            if fresh:
                yield b"".join(sse(e) for e in fresh)

    return SlotStream(slot, body_(), ping=PING_SECONDS, headers=HEADERS)


def _iso_epoch(value: str) -> int:
    return int(datetime.fromisoformat(value).timestamp())


routes = [
    Route("/v1/responses", openai_route(create), methods=["POST"]),
    Route("/v1/responses/{rid}", openai_route(retrieve), methods=["GET"]),
]
