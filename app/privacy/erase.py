"""Erase one user: fence, then every step below; idempotent and resumable.

    fence        erased_users + erased:{<digest>} (app.privacy.fence)
    sessions     each session as DELETE /v1/sessions/{sid} does (Redis fence, history,
                 owner, memory lock/cursor/summary, unpersisted mark, event streams;
                 PostgreSQL tombstone, row, messages), its memory-due mark, and the
                 event streams a history no longer names (one SCAN)
    memories     PostgreSQL rows and `memory:<uid>:*` (under the user's lock)
    documents    the user's private documents: chunks, `kb-file:<doc>`, `kb-version:user:<uid>`
    cache        entries of the user's scope and shared entries the user's question
                 created (`creator` TAG), their audit rows, audit inputs naming the user
                 (`cache-audit:<token>`, one SCAN)
    limits       ratelimit:{<uid>}, ratelimit:{<uid>}:sessions and streams:{<uid>}
    finish       entries stored meanwhile by a turn already past the fence, once more;
                 tombstones keep the session ids but name the user by digest; the
                 erased_users row forgets the id and records the finish

A turn's tool call running across the whole erase may still store a cache entry
after it (within TOOL_TIMEOUT_SECONDS); the privacy sweep deletes such entries of
the users erased in the last day (`late_cache_entries`, by creator digest).

A step that fails raises; running `erase` again starts over from the fence, and
every step finds only what is left. A process that dies half way leaves the
erased_users row unfinished, and the privacy sweep runs it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from psycopg_pool import AsyncConnectionPool

from app.identity import user_digest
from app.privacy.fence import raise_fence
from app.sessions.store import Sessions
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client, async_session_redis_client, redis_client
from app.stores.indexes import escape_tag
from app.tools.kb_search import parse_search_reply

log = logging.getLogger("backbone.privacy")

PAGE = 500
STEPS = ("sessions", "memories", "documents", "cache", "limits", "finish")


@dataclass
class Eraser:
    redis: aredis.Redis  # the search plane: memories, kb, cache, rq, memory-due
    sessions: Sessions  # the session plane and the PostgreSQL pool
    redis_url: str  # for rq, which needs a sync client

    async def erase(self, user: str, steps: tuple[str, ...] = STEPS) -> dict[str, int]:
        """Fence the user, then run `steps` (all by default; tests cut it short)."""
        keys.check_user_id(user)
        counts: Counter[str] = Counter()
        async with self.sessions.pg.connection() as conn:
            await raise_fence(self.sessions.redis, conn, user)
        for step in steps:
            await getattr(self, f"_{step}")(user, counts)
        log.info("erase of a user: %s", dict(counts))
        return dict(counts)

    async def _sessions(self, user: str, counts: Counter[str]) -> None:
        async with self.sessions.pg.connection() as conn:
            cur = await conn.execute("SELECT id FROM sessions WHERE user_id = %s", (user,))
            sids = [str(row[0]) for row in await cur.fetchall()]
        for sid in sids:
            await self.sessions.delete(sid, user)
            await self.redis.zrem(keys.MEMORY_DUE, sid)
            counts["sessions"] += 1
        if sids:  # streams of turns a collapsed or expired history no longer names
            mine = set(sids)
            counts["event_streams"] += await self._delete_matching(
                self.sessions.redis, "events:*", lambda k: k.split(":")[1][1:-1] in mine)

    async def _memories(self, user: str, counts: Counter[str]) -> None:
        async with self.sessions.pg.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("memory:" + user,))
            cur = await conn.execute("DELETE FROM memories WHERE user_id = %s", (user,))
            counts["memories"] += cur.rowcount
            counts["memory_keys"] += await self._delete_matching(
                self.redis, keys.memory_prefix(user) + "*", lambda k: True)

    async def _documents(self, user: str, counts: Counter[str]) -> None:
        scope = f"user:{user}"
        rows = await self._search(keys.INDEX_KB, f"@scope:{{{escape_tag(scope)}}}", "doc")
        docs = {f["doc"] for _, f in rows if "doc" in f}
        for doc in docs:
            await self._delete_matching(self.redis, f"kb:{doc}:*", lambda k: True)
        if docs:
            await self.redis.delete(*[keys.kb_file(d) for d in docs])
        await self.redis.delete(keys.kb_version(scope))
        counts["documents"] += len(docs)

    async def _cache(self, user: str, counts: Counter[str]) -> None:
        scope = escape_tag(f"user:{user}")
        counts["cache_entries"] += await self.cache_entries(
            f"(@scope:{{{scope}}}) | (@creator:{{{user_digest(user)}}})")
        counts["audit_jobs"] += await asyncio.to_thread(self._drop_audit_jobs, user)

    async def cache_entries(self, query: str) -> int:
        """Delete the cache entries `query` finds, and their audit rows; how many."""
        entries = [key for key, _ in await self._search(keys.INDEX_CACHE, query, "scope")]
        if entries:
            async with self.sessions.pg.connection() as conn:
                await conn.execute("DELETE FROM cache_audits WHERE entry_key = ANY(%s)",
                                   (entries,))
            for i in range(0, len(entries), PAGE):
                await self.redis.delete(*entries[i:i + PAGE])
        return len(entries)

    async def late_cache_entries(self, digest: str) -> int:
        """Entries a turn already past the fence stored after the erase's cache step
        (its tool call was running): found by creator alone, the id being gone."""
        return await self.cache_entries(f"@creator:{{{keys.check_hex(digest)}}}")

    def _drop_audit_jobs(self, user: str) -> int:
        """Audit inputs waiting for their job (`cache-audit:<token>`, app.cache.audit_queue)
        that name the user: they carry its question. The jobs hold only the key; one
        whose input is gone finds nothing to audit."""
        client = redis_client(self.redis_url)
        try:
            dropped = 0
            for key in client.scan_iter(match="cache-audit:*", count=1000):
                raw = client.get(key)
                if raw is not None and json.loads(raw).get("user_id") == user:
                    dropped += int(client.delete(key))
            return dropped
        finally:
            client.close()

    async def _limits(self, user: str, counts: Counter[str]) -> None:
        counts["rate_limits"] += int(await self.sessions.redis.delete(
            keys.rate_limit(user), keys.session_rate_limit(user), keys.streams(user)))

    async def _finish(self, user: str, counts: Counter[str]) -> None:
        digest = user_digest(user)
        counts["cache_entries"] += await self.late_cache_entries(digest)
        async with self.sessions.pg.connection() as conn:
            # The tombstones stay (no late write may bring a session back); the id goes.
            await conn.execute("UPDATE deleted_sessions SET user_id = %s WHERE user_id = %s",
                               (f"erased:{digest}", user))
            await conn.execute("UPDATE erased_users SET user_id = NULL, finished_at = now()"
                               " WHERE user_digest = %s", (digest,))

    async def _search(self, index: str, query: str, field: str) -> list[tuple[str, dict[str, str]]]:
        """Every row of an FT.SEARCH (paged), with one field."""
        out: list[tuple[str, dict[str, str]]] = []
        while True:
            reply = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "FT.SEARCH", index, query, "RETURN", 1, field, "LIMIT", len(out), PAGE,
                "DIALECT", 2)
            total, rows = parse_search_reply(reply)
            out.extend(rows)
            if not rows or len(out) >= total:
                return out

    async def _delete_matching(self, client: Any, pattern: str, keep: Any) -> int:
        """DEL every key matching `pattern` for which `keep(key)` holds; how many."""
        found = []
        async for raw in client.scan_iter(match=pattern, count=1000):
            key = raw.decode() if isinstance(raw, bytes) else raw
            if keep(key):
                found.append(key)
        for key in found:  # one by one: on a cluster they live in many slots
            await client.delete(key)
        return len(found)


@asynccontextmanager
async def own_eraser(settings: Settings) -> AsyncIterator[Eraser]:
    """An Eraser on clients of its own, closed after (`backbone erase`, the privacy sweep)."""
    redis = async_redis_client(settings.redis_url or "")
    session_redis = async_session_redis_client(settings, main=redis)
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        settings.database_url or "", min_size=1, max_size=2, open=False,
        kwargs={"autocommit": True})
    await pool.open()
    try:
        sessions = Sessions(session_redis, pool, settings.session_ttl_seconds)
        yield Eraser(redis, sessions, settings.redis_url or "")
    finally:
        await pool.close()
        if session_redis is not redis:
            await session_redis.aclose()
        await redis.aclose()


async def erase_user(settings: Settings, user: str) -> dict[str, int]:
    """Erase `user` with clients of its own (`backbone erase`)."""
    async with own_eraser(settings) as eraser:
        return await eraser.erase(user)
