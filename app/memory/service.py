"""Memory as a service: add, update, search and forget one user's memories.

The one implementation behind `/v1/memories` (app.memory.routes) and the MCP
tools (app.mcp): writes go through `MemoryStore` as the extraction job's do, so
dedupe, caps and the advisory lock per user are one code path. `MemoryStore`
is sync (the workers' clients); it runs here in a thread with its own small
PostgreSQL pool and a sync Redis client, held by the app's lifespan.

Search is a KNN over `idx:memory` with pre-filters (user and model always;
kinds, session and an `updated_at` range when asked), the rows' `user`
compared again exactly (`app.stores.scope_guard`), then read from PostgreSQL,
the truth: a recall copy whose row was deleted meanwhile is not served.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import redis.asyncio as aredis
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from redis import Redis

from app.embeddings import Embedder
from app.errors import NotFound
from app.memory.facts import Fact
from app.memory.requests import AddRequest, SearchRequest, UpdateRequest
from app.memory.store import MERGE_DISTANCE, MemoryStore
from app.stores import keys
from app.stores.indexes import escape_tag
from app.stores.scope_guard import admitted
from app.tools.kb_search import parse_search_reply

COLUMNS = "id, kind, content, session_id, created_at, updated_at"


def as_memory(row: tuple[Any, ...]) -> dict[str, Any]:
    """A `memories` row (`COLUMNS`) as the API shows it."""
    created: datetime = row[4]
    updated: datetime = row[5]
    return {"id": row[0], "kind": row[1], "content": row[2], "session_id": row[3],
            "created_at": created.isoformat(), "updated_at": updated.isoformat()}


def _bound(value: float | None, default: str) -> str:
    return default if value is None else repr(value)


def knn_query(user: str, model: str, q: SearchRequest) -> str:
    """The FT.SEARCH query: the pre-filters, every value escaped, then the KNN."""
    parts = [f"@user:{{{escape_tag(user)}}}", f"@model:{{{escape_tag(model)}}}"]
    if q.kinds:
        parts.append("@kind:{" + " | ".join(escape_tag(k) for k in q.kinds) + "}")
    if q.session_id is not None:
        parts.append(f"@session:{{{escape_tag(q.session_id)}}}")
    if q.since is not None or q.until is not None:
        parts.append(f"@updated_at:[{_bound(q.since, '-inf')} {_bound(q.until, '+inf')}]")
    return f"({' '.join(parts)})=>[KNN {q.limit} @embedding $vec AS distance]"


@dataclass
class MemoryService:
    redis: aredis.Redis
    pg: AsyncConnectionPool[Any]
    store_redis: Redis  # for MemoryStore, in a thread
    store_pg: ConnectionPool[Any]
    embedder: Embedder
    merge_distance: float = MERGE_DISTANCE
    index: str = keys.INDEX_MEMORY

    def _store(self, conn: Any) -> MemoryStore:
        return MemoryStore(self.store_redis, conn, self.embedder, self.merge_distance,
                           self.index)

    async def add(self, user: str, req: AddRequest) -> tuple[dict[str, Any], bool]:
        """(the memory, True) when added; (the one it repeats, updated to this wording when
        it was a near duplicate, False) otherwise."""
        keys.check_user_id(user)
        if req.session_id is not None:
            await self._check_session(user, req.session_id)
        return await asyncio.to_thread(self._add, user, req)

    def _add(self, user: str, req: AddRequest) -> tuple[dict[str, Any], bool]:
        with self.store_pg.connection() as conn:
            stored = self._store(conn).write(user, req.session_id, [Fact(req.kind, req.content)])
            row = conn.execute(f"SELECT {COLUMNS} FROM memories WHERE id = %s AND user_id = %s",
                               (stored.ids[0], user)).fetchone()
        if row is None:  # forgotten between the write and this read
            raise NotFound("the memory was deleted as it was written")
        return as_memory(row), stored.inserted == 1

    async def update(self, user: str, mid: str, req: UpdateRequest) -> dict[str, Any]:
        keys.check_user_id(user)
        return await asyncio.to_thread(self._update, user, mid, req)

    def _update(self, user: str, mid: str, req: UpdateRequest) -> dict[str, Any]:
        with self.store_pg.connection() as conn:
            row = conn.execute("SELECT kind, content FROM memories WHERE id = %s AND user_id = %s",
                               (mid, user)).fetchone()
            if row is None:
                raise NotFound("no such memory")
            # `rewrite` reads the row again under the user's lock: a delete meanwhile is a 404.
            self._store(conn).rewrite(user, mid, req.kind or row[0], req.content or row[1])
            new = conn.execute(f"SELECT {COLUMNS} FROM memories WHERE id = %s AND user_id = %s",
                               (mid, user)).fetchone()
        if new is None:
            raise NotFound("no such memory")
        return as_memory(new)

    async def forget(self, user: str, mid: str) -> None:
        """Delete the row, then the recall copy; NotFound when the user has no memory `mid`."""
        keys.check_user_id(user)
        async with self.pg.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM memories WHERE id = %s AND user_id = %s RETURNING id", (mid, user)
            )
            deleted = await cur.fetchone()
        if deleted is None:
            raise NotFound("no such memory")
        await self.redis.delete(keys.memory(user, mid))

    async def search(self, user: str, q: SearchRequest) -> list[dict[str, Any]]:
        """The user's memories nearest to `q.text` that pass its filters, nearest first,
        each with `score` = 1 - cosine distance."""
        keys.check_user_id(user)
        vector = await self.embedder.aembed(q.text)
        reply = await self.redis.execute_command(
            "FT.SEARCH", self.index, knn_query(user, self.embedder.model_id, q),
            "PARAMS", 2, "vec", np.asarray(vector, dtype=np.float32).tobytes(),
            "SORTBY", "distance", "ASC",
            "RETURN", 2, "user", "distance",
            "LIMIT", 0, q.limit,
            "DIALECT", 2,
        )  # type: ignore[no-untyped-call]  # fmt: skip
        _, rows = parse_search_reply(reply)
        found: dict[str, float] = {}
        for key, f in admitted(rows, "user", (user,), "memory search"):
            distance = float(f.get("distance", "2"))
            if q.max_distance is None or distance <= q.max_distance:
                found[key.rsplit(":", 1)[-1]] = distance
        if not found:
            return []
        async with self.pg.connection() as conn:
            cur = await conn.execute(
                f"SELECT {COLUMNS} FROM memories WHERE user_id = %s AND id = ANY(%s)",
                (user, list(found)),
            )
            by_id = {r[0]: r for r in await cur.fetchall()}
        return [
            {**as_memory(by_id[mid]), "score": round(1.0 - distance, 4)}
            for mid, distance in found.items() if mid in by_id
        ]

    async def _check_session(self, user: str, sid: str) -> None:
        """A memory may name only one of the caller's own sessions (404 otherwise, as for a
        memory: whether another user's session exists is not the caller's business)."""
        async with self.pg.connection() as conn:
            cur = await conn.execute(
                "SELECT 1 FROM sessions WHERE id = %s AND user_id = %s", (sid, user))
            if await cur.fetchone() is None:
                raise NotFound("no such session")
