"""How many event streams one user and one node may hold open (issue #23).

A stream is an open SSE response that follows a turn: the live `POST .../messages`
and every resume (`GET .../events`), and any other face that streams a turn. Each
holds a slot from the start of its response to its end, whatever ends it (the
last event, a client that went away, a server stopping, an error):

- **per node**: an in-process counter, at most MAX_STREAMS_PER_NODE. It is
  checked first, so a refused stream costs no Redis work at all;
- **per user**: `streams:{<uid>}`, a sorted set of slot ids scored by the ms
  their lease ends (`lua/acquire_stream_slot-1.lua`: drop lapsed slots, count,
  admit below MAX_STREAMS_PER_USER). The node renews the leases of the slots it
  holds every LEASE_SECONDS / 3 (one batch for all), so the slots of a node
  that died lapse within LEASE_SECONDS and never lock a user out for good.

Beyond either: `429 too_many_streams` (`TooManyStreams`, with Retry-After),
answered before anything else of the request touches Redis.

Blocking reads (a resumer's XREAD) go through `reader`, a session-plane client
with a pool of its own sized MAX_STREAMS_PER_NODE: every admitted stream has a
connection to wait on, and none of them can take one the request path needs.

Releasing is synchronous (the counter, then the ZREM in a task of its own), so
it also works from a `finally` inside a cancelled task, where anyio refuses
every further await. A ZREM that fails leaves the slot to lapse with its lease.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aredis
import redis.exceptions as rexc
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from app.errors import TooManyStreams
from app.ops import metrics, tracing
from app.stores import keys, scripts
from app.stores.batch import batch

log = logging.getLogger("backbone.streams")
LEASE_SECONDS = 60.0


class Slot:
    """One admitted stream; `release()` is idempotent."""

    def __init__(self, owner: StreamSlots, user: str, slot_id: str) -> None:
        self.owner = owner
        self.user = user
        self.id = slot_id
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._release(self)


class StreamSlots:
    """The node's stream limits and its pool of blocking readers (`AppState.streams`)."""

    def __init__(self, redis: aredis.Redis, reader: aredis.Redis, *, per_user: int,
                 per_node: int, lease_seconds: float = LEASE_SECONDS) -> None:
        self.redis = redis  # the session plane, request pool: the slot sets
        self.reader = reader  # the session plane, readers' pool: blocking reads only
        self.per_user = per_user
        self.per_node = per_node
        self.lease_seconds = lease_seconds
        self.held: dict[str, Slot] = {}  # slot id -> slot, on this node
        self._opening = 0  # admitted by the counter, waiting for the user's script
        self._renewer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def open(self) -> int:
        """Streams this node holds (or is admitting) right now."""
        return len(self.held) + self._opening

    async def acquire(self, user: str) -> Slot:
        """A slot for one of `user`'s streams, or TooManyStreams."""
        if self.open >= self.per_node:
            metrics.STREAMS_REFUSED.labels("node").inc()
            raise TooManyStreams(f"this server holds {self.per_node} open streams; retry shortly")
        slot = Slot(self, user, secrets.token_hex(8))
        self._opening += 1
        try:
            # Admission bookkeeping: no span of its own (app.ops.tracing), as the release.
            with tracing.untraced():
                ok, _held = await scripts.arun(self.redis, scripts.acquire_stream_slot(
                    user, slot.id, int(time.time() * 1000), int(self.lease_seconds * 1000),
                    self.per_user,
                ))
        finally:
            self._opening -= 1
        if not ok:
            metrics.STREAMS_REFUSED.labels("user").inc()
            raise TooManyStreams(
                f"at most {self.per_user} open streams per user; close one (or wait) first")
        self.held[slot.id] = slot
        metrics.STREAMS_OPEN.inc()
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_while_held())
        return slot

    @asynccontextmanager
    async def opening(self, user: str) -> AsyncIterator[Slot]:
        """`async with state.streams.opening(user) as slot:` around what opens a stream:
        the slot is given back if the block raises (the request was refused after all);
        otherwise the block hands it to the `SlotStream` that holds it to its end."""
        slot = await self.acquire(user)
        try:
            yield slot
        except BaseException:
            slot.release()
            raise

    def _release(self, slot: Slot) -> None:
        if self.held.pop(slot.id, None) is None:
            return
        metrics.STREAMS_OPEN.dec()
        try:
            task = asyncio.get_running_loop().create_task(self._zrem(slot))
        except RuntimeError:  # no loop (the app is gone): the lease lapses instead
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _zrem(self, slot: Slot) -> None:
        try:
            with tracing.untraced():
                await self.redis.zrem(keys.streams(slot.user), slot.id)
        except rexc.RedisError as e:
            log.warning("stream slot not released (it lapses within %.0f s): %s",
                        self.lease_seconds, e)

    async def _renew_while_held(self) -> None:
        """Push the leases of every slot held here forward, one batch per period."""
        while self.held:
            await asyncio.sleep(self.lease_seconds / 3)
            await self.renew()

    async def renew(self) -> None:
        slots = list(self.held.values())
        if not slots:
            return
        ends = int((time.time() + self.lease_seconds) * 1000)
        lease_ms = int(self.lease_seconds * 1000)
        commands: list[tuple[Any, ...]] = [
            ("ZADD", keys.streams(s.user), "XX", ends, s.id) for s in slots]
        commands += [("PEXPIRE", k, lease_ms) for k in {keys.streams(s.user) for s in slots}]
        try:
            await batch(self.redis, commands)
        except rexc.RedisError as e:  # the next period tries again; a lapse frees a slot early
            log.warning("stream slot leases not renewed: %s", e)

    async def aclose(self) -> None:
        """At shutdown: stop renewing, release what is still held, close the readers."""
        if self._renewer is not None:
            self._renewer.cancel()
        for slot in list(self.held.values()):
            slot.release()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        if self._renewer is not None:
            with suppress(asyncio.CancelledError):
                await self._renewer
        await self.reader.aclose()


class SlotStream(EventSourceResponse):
    """An SSE response that releases its stream slot when it ends, however it ends."""

    def __init__(self, slot: Slot, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        """sse-starlette's, without its per-send cancel scope when there is no send
        timeout (ours): `move_on_after(None)` still costs a scope, a task lookup and a
        backend lookup per frame: about 4 % of the app's CPU at 60 frames a turn."""
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # as the library's: no closing frame after it
            raise
