"""Each turn's SSE events, also kept in a Redis Stream so any node can resume them.

API nodes hold no state: the node running a turn XADDs every event to
`events:{<sid>}:<turn>` (10-minute TTL) and uses the entry id as the SSE `id:`,
written `<turn>.<entry-id>`. The turn is the stream's only writer, so it picks
the entry ids itself (`<turn start ms>-<n>`) and need not wait for Redis before
sending an event: one background writer per node pipelines the pending events of
all turns in one round trip, and a terminal event is sent only after everything
before it is stored.

A client that lost its connection sends that id as `Last-Event-ID` (or
`?after=`) to `GET /v1/sessions/{sid}/events` on any node and gets the rest,
live, until the turn's `message.done` or `error`.

A failed write (Redis refused or was unreachable) fails only the `flush` that
waits for those events; later events are written afresh. It costs resumption,
not the turn: the live client already has every event, so the turn still ends
with `message.done` when its reply is stored (the client and the history
agree), and a resumer missing the terminal event gets `stream_stalled`, which
tells it to reload the session.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aredis

from app.errors import BadRequest, NotFound
from app.stores import keys
from app.stores.batch import batch

log = logging.getLogger("backbone.events")
TTL_SECONDS = 600
WRITER_LINGER_SECONDS = 1.0
# How long the writer lets events gather before a round trip (only resumers see it);
# a turn waiting to send its terminal event cuts it short. Each round trip costs
# the node a write, a wake-up and a parse whatever it carries, so under load a
# longer pause is CPU saved; 20 ms stays below what a reader notices.
COALESCE_SECONDS = 0.02
MAXLEN = 20_000
# How often the writer looks for a turn's session delete fence, in a batch it sends
# anyway (no round trip of its own): a deleted session stops paying for tokens
# within about this.
FENCE_CHECK_SECONDS = 0.5
TERMINAL = frozenset({"message.done", "error"})
# ASCII digits only (`\d` would take any script's digits), and each entry part must
# fit Redis's unsigned 64-bit stream ids, or XREAD refuses it.
EVENT_ID = re.compile(r"^(?P<turn>[0-9]{1,9})\.(?P<ms>[0-9]{1,20})-(?P<n>[0-9]{1,20})$")
MAX_ENTRY_PART = 2**64 - 1
# A reader waits this long for the next event before declaring the turn stalled
# (its node died mid-turn).
STALL_MS = 30_000
BLOCK_SLICE_MS = 1_000


class Event(NamedTuple):  # a tuple: built once per token, so cheaper than a dataclass
    id: str
    event: str
    payload: bytes  # the data as JSON, encoded once: the Stream entry and the SSE frame share it

    @property
    def data(self) -> Any:
        return orjson.loads(self.payload)

    def sse(self) -> bytes:
        """The whole SSE frame, ready for the socket (sse-starlette sends bytes as they are).

        The JSON holds no raw line break (encoders escape them), so one `data:` line.
        """
        return b"".join((b"id: ", self.id.encode(), b"\r\nevent: ", self.event.encode(),
                         b"\r\ndata: ", self.payload, b"\r\n\r\n"))


def encode(data: dict[str, Any]) -> bytes:
    """JSON of an event's data: orjson, or the standard library for what orjson refuses
    (an integer past 64 bits in a model's tool arguments, say)."""
    try:
        return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(data, ensure_ascii=False).encode()


def parse_event_id(raw: str) -> tuple[int, str]:
    m = EVENT_ID.fullmatch(raw.strip())
    if m is None or max(int(m["ms"]), int(m["n"])) > MAX_ENTRY_PART:
        raise BadRequest("event ids look like <turn>.<ms>-<n>", code="invalid_event_id")
    return int(m["turn"]), f"{m['ms']}-{m['n']}"


class EventLog:
    """The writer side, one per turn."""

    def __init__(self, redis: aredis.Redis, sid: str, turn: int) -> None:
        self.key = keys.events(sid, turn)
        self.turn = turn
        self._writer = _writer_for(redis)
        self._base_ms = int(time.time() * 1000)
        self._n = 0  # events emitted
        self.written = 0  # events known to be in Redis
        self.failed = 0  # events whose write failed
        self.error: Exception | None = None  # why a write failed since the last flush
        self.progress = asyncio.Event()
        self.expires_at = 0.0  # monotonic time the stream's TTL runs out, as last set
        self.fence = keys.session_deleted(sid)
        self.fence_checked = time.monotonic()  # the route checked it just before the turn
        self.deleted = False  # the writer saw the session's delete fence

    def emit(self, event: str, data: dict[str, Any]) -> Event:
        """The event with its id, now; it reaches Redis with the writer's next batch."""
        entry = f"{self._base_ms}-{self._n}"
        self._n += 1
        encoded = encode(data)
        self._writer.add(self, entry, event, encoded)
        return Event(f"{self.turn}.{entry}", event, encoded)

    async def flush(self) -> None:
        """Wait until every event emitted so far was written; raise if a write of one
        of them (since the last flush) failed. The error is this flush's alone."""
        target = self._n
        if self.written + self.failed < target:
            self._writer.hurry.set()
        while self.written + self.failed < target:
            self.progress.clear()
            await self.progress.wait()
        error, self.error = self.error, None
        if error is not None:
            raise error


class _Writer:
    """One per Redis client (so per event loop): every turn's events in one pipeline.

    Under load a round trip carries the events of all the turns streaming on this
    node, instead of one per token per turn. A short pause before each batch lets
    the events of one loop cycle join it; a quiet writer ends and the next event
    starts a new one.
    """

    def __init__(self, redis: aredis.Redis) -> None:
        self.redis = redis
        self.pending: list[tuple[EventLog, str, str, bytes]] = []
        self.wake = asyncio.Event()
        self.hurry = asyncio.Event()  # a turn is flushing: write without the pause
        self.task: asyncio.Task[None] | None = None

    def add(self, owner: EventLog, entry: str, event: str, data: bytes) -> None:
        self.pending.append((owner, entry, event, data))
        self.wake.set()
        if self.task is None or self.task.done():
            # It writes every turn's events: it starts from an empty context, not the
            # context of the turn that woke it (that turn's log ids, its trace).
            self.task = asyncio.create_task(self._run(), context=contextvars.Context())

    async def _run(self) -> None:
        while True:
            if not self.pending:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), WRITER_LINGER_SECONDS)
                except TimeoutError:
                    if not self.pending:  # an event may have slipped in as it fired
                        return
                    continue
            if not self.hurry.is_set():
                # The pause ends early when a turn flushes; a timer, not wait_for,
                # so no inner task is made per batch.
                timer = asyncio.get_running_loop().call_later(COALESCE_SECONDS, self.hurry.set)
                try:
                    await self.hurry.wait()
                finally:
                    timer.cancel()
            self.hurry.clear()
            events, self.pending = self.pending, []
            await self._write(events)

    async def _write(self, events: list[tuple[EventLog, str, str, bytes]]) -> None:
        commands: list[tuple[Any, ...]] = [
            ("XADD", owner.key, "MAXLEN", "~", MAXLEN, entry, "event", event, "data", data)
            for owner, entry, event, data in events
        ]
        # The TTL is set with a stream's first write, renewed once half of it is gone
        # and with the terminal event (a stream removed mid-turn and re-created by a
        # later XADD still expires), not with every batch: a few EXPIREs per turn
        # instead of one per event.
        now = time.monotonic()
        renew = {owner for owner, _, event, _ in events
                 if event in TERMINAL or owner.expires_at - now < TTL_SECONDS / 2}
        commands += [("EXPIRE", owner.key, TTL_SECONDS) for owner in renew]
        fenced = {owner for owner, *_ in events if now - owner.fence_checked >= FENCE_CHECK_SECONDS}
        for owner in fenced:
            owner.fence_checked = now
            commands.append(("EXISTS", owner.fence))
        results: list[Any]
        try:
            # Per command: one turn's refused XADD must not count as another's failure.
            results = await batch(self.redis, commands)
        except Exception as exc:  # Redis unreachable: the whole batch failed
            results = [exc] * len(events)
        failed = 0
        for owner, result in zip(renew, results[len(events):], strict=False):
            if not isinstance(result, Exception):
                owner.expires_at = now + TTL_SECONDS
        for owner, result in zip(fenced, results[len(events) + len(renew):], strict=False):
            if result == 1:
                owner.deleted = True
        for (owner, *_), result in zip(events, results, strict=False):
            if isinstance(result, Exception):
                failed += 1
                owner.failed += 1
                owner.error = result  # each turn learns it at its next flush, and only then
            else:
                owner.written += 1
            owner.progress.set()
        if failed:
            log.warning("%d of %d events not logged (resumption will miss them): %s",
                        failed, len(events), next(r for r in results if isinstance(r, Exception)))


_writers: weakref.WeakKeyDictionary[aredis.Redis, _Writer] = weakref.WeakKeyDictionary()


def _writer_for(redis: aredis.Redis) -> _Writer:
    writer = _writers.get(redis)
    if writer is None:
        writer = _writers[redis] = _Writer(redis)
    return writer


def _entry(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n)


async def replay(
    redis: aredis.Redis, sid: str, turn: int, after: str, *, stall_ms: int = STALL_MS,
    starting: bool = False,
) -> AsyncIterator[Event]:
    """Events of a turn after entry id `after` ('0-0' for all), live until a terminal one.

    404 when the turn's events are gone, and when `after` is its terminal event
    (an EventSource reconnects after every stream end; a 4xx tells it to stop).
    `starting`: the caller knows the turn is running, so no events yet means none
    logged yet (a busy node's first event can come after its client's first read),
    and the replay waits for them as for any next event.
    """
    key = keys.events(sid, turn)
    tail: Any = await redis.xrevrange(key, count=1)
    if tail:
        tail_id, tail_fields = tail[0][0].decode(), tail[0][1]
        if (tail_fields.get(b"event", b"").decode() in TERMINAL
                and _entry(after) >= _entry(tail_id)):
            raise NotFound("the turn has ended; no event follows this one",
                           code="turn_finished")
    elif not starting:
        raise NotFound("no events for this turn (they are kept for 10 minutes)")
    last = after
    waited = 0
    while True:
        # Block in short slices: one long BLOCK outlasts the client's socket timeout
        # (redis-py's default is 5 s) and would surface as a Redis failure.
        block = min(BLOCK_SLICE_MS, stall_ms)
        batch: Any = await redis.xread({key: last}, count=100, block=block)
        if not batch:
            waited += block
            if waited < stall_ms:
                continue
            yield Event(f"{turn}.{last}", "error", encode({
                "code": "stream_stalled",
                "message": "the turn produced no event for a while; its node may have "
                           "stopped. Reload the session to see what was saved.",
            }))
            return
        waited = 0
        for entry_id, fields in batch[0][1]:
            last = entry_id.decode()
            event = fields[b"event"].decode()
            # Sent as stored: no decode and re-encode on the way through.
            yield Event(f"{turn}.{last}", event, fields[b"data"])
            if event in TERMINAL:
                return


async def read_all(redis: aredis.Redis, sid: str, turn: int) -> list[Event]:
    """The turn's events logged so far, without waiting for more ([] when gone)."""
    entries: Any = await redis.xrange(keys.events(sid, turn))
    return [Event(f"{turn}.{entry_id.decode()}", fields[b"event"].decode(), fields[b"data"])
            for entry_id, fields in entries]
