"""Live sessions: the hot copy in Redis, the durable copy in PostgreSQL.

- Create writes PostgreSQL first (the truth), then Redis, so an acknowledged
  session always survives.
- Append is the `append_messages` Lua script: owner check, optimistic length
  check, O(1) append, TTLs renewed. Before it, the session is marked in
  its shard of `sessions:unpersisted:{<n>}`; the sweep (workers/jobs.py) persists whatever a dead
  app left behind, so an acknowledged message is never only in Redis for long.
- With `wait_replicas` (SESSION_REDIS_WAIT_REPLICAS; 1 on a cluster) the append
  returns only after `WAIT` on its own connection (app.stores.replicated): an
  acknowledged message is on a replica too, so a primary's death does not take
  it. A WAIT that times out short of that still acknowledges (the write is
  already applied and cannot be taken back; a 503 would only invite a duplicate
  on retry, and one dead replica would take its primary's sessions down) but is
  logged and counted (`backbone_session_unreplicated_appends_total`). To refuse
  instead, set `min-replicas-to-write` on the primaries: Redis then refuses the
  write before applying it (NOREPLICAS, a 503).
- A connection that fails mid-append leaves unknown whether the script ran. The
  script itself settles it: sent again with the same batch, it finds the history
  moved on by exactly this batch's hashes and answers "already appended" (2), so
  the batch is acknowledged once and never stored twice, whoever re-sent it
  (redis-py's cluster client re-sends by itself; on a cluster, with or without
  WAIT, the append also waits for the new topology and tries again).
- Load reads Redis; when the copy is gone (TTL, eviction, a Redis restart
  without persistence) it restores from PostgreSQL with `restore_session`,
  which writes only if the key is still absent: racing restores write once.
- Delete fences the session before removing it: `session:{<sid>}:deleted` in
  Redis (append and restore refuse while it stands, so a turn still streaming
  stops at its next append) and a tombstone in PostgreSQL (`persist` refuses in
  the same transaction, for the turn's own persist and for the sweep). Nothing
  of a deleted session comes back; see history_db for the ordering.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis
from psycopg_pool import AsyncConnectionPool

from app.errors import Conflict, Forbidden, NotFound, RedisUnavailable, translate
from app.ops import metrics, tracing
from app.sessions import history_db
from app.sessions.messages import Message, canonical_json, renumber
from app.stores import keys, replicated, scripts
from app.stores.clients import is_cluster

log = logging.getLogger("backbone.sessions")

APPEND_ATTEMPTS = 64
# Jittered backoff after a lost race, so many writers converge instead of colliding in lockstep.
BACKOFF_SECONDS = 0.002
# How long a turn's persist waits for a pool connection. The SSE stream closes
# only after it, and with PostgreSQL down the pool's own wait is 30 s; the sweep
# persists whatever this gives up on.
PERSIST_WAIT_SECONDS = 5.0
# How long an append whose outcome a dying primary left unknown keeps trying the
# new topology (the cluster client's own retries wait within each try).
UNCERTAIN_SECONDS = 15.0
UNCERTAIN_PAUSE_SECONDS = 0.1
UNREPLICATED_LOG_SECONDS = 10.0


def _owned(owner: str | None, user: str) -> str:
    """The owner if it is the caller; 404 for no session, 403 for someone else's."""
    if owner is None:
        raise NotFound("no such session")
    if owner != user:
        raise Forbidden("this session belongs to another user")
    return owner


@dataclass(frozen=True)
class Loaded:
    owner: str
    messages: list[Message]
    restored: bool = False
    # The rolling summary (memory-summary:{sid}), read with the history (None: none yet):
    # a turn's context needs it, and this saves the turn a round trip.
    summary: str | None = None


@dataclass
class Sessions:
    redis: aredis.Redis  # the session plane (app.stores.clients.async_session_redis_client)
    pg: AsyncConnectionPool[Any]
    ttl: int
    wait_replicas: int = 0  # Settings.session_wait_replicas
    wait_timeout_ms: int = 500
    _unreplicated_logged: float = field(default=0.0, init=False, repr=False)
    _short: replicated.ShortOfReplicas = field(
        default_factory=replicated.ShortOfReplicas, init=False, repr=False)

    @functools.cached_property
    def cluster(self) -> bool:
        return is_cluster(self.redis)

    async def create(self, user: str, metadata: dict[str, str] | None = None) -> str:
        sid = keys.new_session_id()
        async with self.pg.connection() as conn:
            await history_db.insert_session(conn, sid, user, metadata)
        await scripts.arun(self.redis, scripts.create_session(sid, user, self.ttl))
        return sid

    async def load(self, sid: str, user: str) -> Loaded:
        """The whole history for its owner; 404 unknown, 403 someone else's."""
        owner, history, summary = await scripts.arun(
            self.redis, scripts.read_session(sid, self.ttl))
        if owner is not None and history is not None:
            return Loaded(_owned(owner, user), history, summary=summary)
        return await self._restore(sid, user)

    async def full_history(self, sid: str, user: str) -> Loaded:
        """Like `load`, plus the messages a collapse moved out of Redis, from PostgreSQL."""
        loaded = await self.load(sid, user)
        first = int(loaded.messages[0]["seq"]) if loaded.messages else 0
        if first == 0:
            return loaded
        async with self.pg.connection() as conn:
            older = json.loads(await history_db.history_json(conn, sid, before=first))
        return Loaded(loaded.owner, [*older, *loaded.messages], loaded.restored, loaded.summary)

    async def _restore(self, sid: str, user: str) -> Loaded:
        async with self.pg.connection() as conn:
            owner = _owned(await history_db.owner(conn, sid), user)
            text = await history_db.history_json(conn, sid)
        wrote = await scripts.arun(self.redis, scripts.restore_session(sid, owner, text, self.ttl))
        if wrote == -1:  # read PostgreSQL just before a delete: do not bring it back
            raise history_db.session_deleted_error()
        if wrote == 1:
            raw = await self.redis.get(keys.memory_summary(sid))
            return Loaded(owner, json.loads(text), restored=True,
                          summary=raw.decode() if isinstance(raw, bytes) else raw)
        # Another request restored it first; read what it wrote.
        owner_now, history, summary = await scripts.arun(
            self.redis, scripts.read_session(sid, self.ttl))
        if owner_now is None or history is None:
            await self.check_not_deleted(sid)  # deleted just after it was restored
            raise Conflict("the session changed while it was being restored; retry")
        return Loaded(owner_now, history, summary=summary)

    async def append(
        self,
        sid: str,
        user: str,
        messages: Sequence[Message],
        next_seq: int,
        *,
        retry: bool = True,
    ) -> list[Message]:
        """Append messages whose seq starts at next_seq; return them as stored.

        On a lost race (another writer appended first) the messages are renumbered
        after the current end and retried when `retry` is set; otherwise, or after
        APPEND_ATTEMPTS, the caller gets a 409.
        """
        batch = list(messages)
        uncertain_until: float | None = None  # set once an attempt's outcome is unknown
        for attempt in range(APPEND_ATTEMPTS):
            try:
                code, current = await self._write(sid, user, batch, next_seq)
            except Exception as exc:
                if not self._may_retry_unknown(exc, uncertain_until):
                    raise
                uncertain_until = uncertain_until or time.monotonic() + UNCERTAIN_SECONDS
                log.warning("append to %s: outcome unknown (%s); retrying on the new "
                            "topology", sid, exc)
                with contextlib.suppress(Exception):  # the deadline above bounds the wait
                    await self.redis.exists(keys.session(sid))  # refreshes the slot map
                await asyncio.sleep(UNCERTAIN_PAUSE_SECONDS)
                continue
            if code in (1, 2):  # 2: an attempt whose reply was lost had stored it
                return batch
            if code == 0:
                await self.load(sid, user)  # restores, or raises 404/403
                continue
            if code == -1:
                raise Forbidden("this session belongs to another user")
            if code == -3:
                # The mark above was made for a deleted session: take it back.
                await self.redis.zrem(keys.unpersisted(sid), sid)
                raise history_db.session_deleted_error()
            if not retry:
                raise Conflict(f"the history moved on to seq {current}; reload and retry")
            next_seq = current
            batch = [renumber(sid, m, current + i) for i, m in enumerate(batch)]
            await asyncio.sleep(random.uniform(0, BACKOFF_SECONDS * (attempt + 1)))
        raise Conflict("too many concurrent writers on this session; retry")

    async def _write(
        self, sid: str, user: str, batch: Sequence[Message], next_seq: int
    ) -> tuple[int, int]:
        """The unpersisted mark, then the append (and WAIT, when configured)."""
        # Mark first: if this process dies right after the append, the sweep
        # still finds the session. The score moves on every write, so a sweep
        # that read an older score will not clear a newer write.
        mark = ("ZADD", keys.unpersisted(sid), time.time() * 1000, sid)
        append = scripts.append_messages(
            sid, user, next_seq, [canonical_json(m) for m in batch], self.ttl
        )
        if self.cluster:
            # The mark's shard is on another node: mark and append go out together
            # and the append counts only once both answered, so every acknowledged
            # message is marked (one round trip, not two; the sweep's quiet period
            # covers the microseconds either may land before the other).
            marked, written = await asyncio.gather(
                self.redis.execute_command(*mark),  # type: ignore[no-untyped-call]
                self._script(append, None),
                return_exceptions=True)
            for result in (marked, written):
                if isinstance(result, BaseException):
                    raise result
            assert not isinstance(written, BaseException)
            return written
        # One round trip: the mark goes first on the same connection.
        return await self._script(append, mark)

    async def _script(
        self, append: scripts.Call[tuple[int, int]], mark: tuple[Any, ...] | None
    ) -> tuple[int, int]:
        before = [mark] if mark is not None else []
        if self.wait_replicas <= 0:
            if mark is None:
                return await scripts.arun(self.redis, append)
            return await scripts.arun_after(self.redis, before, append)
        (code, current), acked = await replicated.arun_waited(
            self.redis, append, self.wait_replicas, self.wait_timeout_ms,
            before=before, short=self._short,
        )
        # Code 2 (a re-sent call) renewed the TTLs: its WAIT covers the first call's write.
        if code in (1, 2) and acked < self.wait_replicas:
            self._unreplicated(append.keys[0], acked)
        return code, current

    def _may_retry_unknown(self, exc: Exception, until: float | None) -> bool:
        """Only a cluster retries a failed append: there a primary's death is expected,
        and the script tells whether the failed attempt had stored it (code 2)."""
        if not self.cluster:
            return False
        if until is not None and time.monotonic() > until:
            return False
        return isinstance(translate(exc), RedisUnavailable)

    def _unreplicated(self, sid: str, acked: int) -> None:
        metrics.UNREPLICATED.inc()
        now = time.monotonic()
        if now - self._unreplicated_logged >= UNREPLICATED_LOG_SECONDS:
            self._unreplicated_logged = now
            log.warning("append to %s acknowledged by %d of %d replicas within %d ms (more "
                        "such appends are counted in backbone_session_unreplicated_appends"
                        "_total, logged at most every %.0f s)", sid, acked,
                        self.wait_replicas, self.wait_timeout_ms, UNREPLICATED_LOG_SECONDS)

    async def check_not_deleted(self, sid: str) -> None:
        """NotFound (code `session_deleted`) once the session's delete fence stands."""
        if await self.redis.exists(keys.session_deleted(sid)):
            raise history_db.session_deleted_error()

    async def persist(self, sid: str, user: str, messages: Sequence[Message]) -> int:
        """Write a completed turn to PostgreSQL in one transaction (idempotent).

        NotFound (code `session_deleted`) when the session was deleted meanwhile:
        nothing is written and its unpersisted mark is dropped.
        """
        # The unpersisted mark's reads and writes are the sweep's bookkeeping: no client
        # span (app.ops.tracing); the persist span holds PostgreSQL's.
        with tracing.untraced():
            score = await self.redis.zscore(keys.unpersisted(sid), sid)
        batch = list(messages)
        async with self.pg.connection(timeout=PERSIST_WAIT_SECONDS) as conn:
            try:
                done = await history_db.persist(conn, sid, user, batch)
            except NotFound:
                with tracing.untraced():
                    await self.redis.zrem(keys.unpersisted(sid), sid)
                raise
        # An earlier turn whose persist failed is only in Redis: keep the mark (not
        # `whole`), so the sweep (which writes the whole history) persists it.
        if score is not None and done.whole:
            with tracing.untraced():
                await scripts.arun(self.redis, scripts.clear_unpersisted(sid, score))
        return done.inserted

    async def delete(self, sid: str, user: str) -> None:
        """Fence the session, then remove it from both stores with its memory keys and
        its turns' event streams (404/403 as load)."""
        raw = await self.redis.get(keys.session_user(sid))
        owner = raw.decode() if isinstance(raw, bytes) else raw
        if owner is None:
            async with self.pg.connection() as conn:
                owner = await history_db.owner(conn, sid)
        owner = _owned(owner, user)
        # Redis first, fence and removal in one MULTI (one slot): from here no
        # append or restore writes, and no live copy is left for the sweep.
        fence = self.redis.pipeline(transaction=True)
        fence.set(keys.session_deleted(sid), 1, ex=self.ttl)  # no user id: erase leaves none
        fence.execute_command("JSON.GET", keys.session(sid), '$[?(@.role=="user")].seq')
        fence.delete(*keys.session_keys(sid))
        _, turns_raw, _ = await fence.execute()
        turns = json.loads(turns_raw) if turns_raw else []
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(keys.unpersisted(sid), sid)
        for turn in turns:  # a turn's events are keyed by its user message's seq
            pipe.delete(keys.events(sid, int(turn)))
        await pipe.execute()
        async with self.pg.connection() as conn:
            await history_db.delete_session(conn, sid, owner)

    async def listing(self, user: str, limit: int = 100) -> list[dict[str, Any]]:
        """The caller's sessions, newest first: PostgreSQL rows, live counts from Redis."""
        async with self.pg.connection() as conn:
            rows = await history_db.list_sessions(conn, user, limit)
        pipe = self.redis.pipeline(transaction=False)
        for row in rows:
            pipe.execute_command("JSON.ARRLEN", keys.session(row.id), ".")
        live = await pipe.execute(raise_on_error=False) if rows else []
        out = []
        for row, length in zip(rows, live, strict=True):
            in_redis = isinstance(length, int)
            out.append({
                "id": row.id,
                "title": row.title,
                "created_at": row.created_at.isoformat(),
                "updated_at": row.updated_at.isoformat(),
                "messages": max(row.messages, length) if in_redis else row.messages,
                "live": in_redis,
            })
        return out
