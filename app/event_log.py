"""Each turn's SSE events, also kept in a Redis Stream so any node can resume them.

API nodes hold no state: the node running a turn XADDs every event to
`events:{<sid>}:<turn>` (10-minute TTL) and uses the entry id as the SSE `id:`,
written `<turn>.<entry-id>`. A client that lost its connection sends that id as
`Last-Event-ID` (or `?after=`) to `GET /v1/sessions/{sid}/events` on any node
and gets the rest, live, until the turn's `message.done` or `error`.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis

from app import keys
from app.errors import BadRequest, NotFound

TTL_SECONDS = 600
MAXLEN = 20_000
TERMINAL = frozenset({"message.done", "error"})
EVENT_ID = re.compile(r"^(?P<turn>\d{1,9})\.(?P<entry>\d{1,20}-\d{1,20})$")
# A reader waits this long for the next event before declaring the turn stalled
# (its node died mid-turn).
STALL_MS = 30_000


@dataclass(frozen=True)
class Event:
    id: str
    event: str
    data: dict[str, Any]

    def sse(self) -> dict[str, str]:
        return {"id": self.id, "event": self.event, "data": json.dumps(self.data)}


def parse_event_id(raw: str) -> tuple[int, str]:
    m = EVENT_ID.fullmatch(raw.strip())
    if m is None:
        raise BadRequest("event ids look like <turn>.<ms>-<n>", code="invalid_event_id")
    return int(m["turn"]), m["entry"]


class EventLog:
    """The writer side, one per turn."""

    def __init__(self, redis: aredis.Redis, sid: str, turn: int) -> None:
        self.redis = redis
        self.key = keys.events(sid, turn)
        self.turn = turn

    async def emit(self, event: str, data: dict[str, Any]) -> Event:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self.key, {"event": event, "data": json.dumps(data)},
                  maxlen=MAXLEN, approximate=True)
        pipe.expire(self.key, TTL_SECONDS)
        entry, _ = await pipe.execute()
        entry_id = entry.decode() if isinstance(entry, bytes) else str(entry)
        return Event(f"{self.turn}.{entry_id}", event, data)


async def replay(
    redis: aredis.Redis, sid: str, turn: int, after: str, *, stall_ms: int = STALL_MS
) -> AsyncIterator[Event]:
    """Events of a turn after entry id `after` ('0-0' for all), live until a terminal one."""
    key = keys.events(sid, turn)
    if not await redis.exists(key):
        raise NotFound("no events for this turn (they are kept for 10 minutes)")
    last = after
    while True:
        batch: Any = await redis.xread({key: last}, count=100, block=stall_ms)
        if not batch:
            yield Event(f"{turn}.{last}", "error", {
                "code": "stream_stalled",
                "message": "the turn produced no event for a while; its node may have "
                           "stopped. Reload the session to see what was saved.",
            })
            return
        for entry_id, fields in batch[0][1]:
            last = entry_id.decode()
            event = fields[b"event"].decode()
            yield Event(f"{turn}.{last}", event, json.loads(fields[b"data"]))
            if event in TERMINAL:
                return
