"""`GET /v1/me/export`: everything held about the caller, streamed as one JSON object.

    {"user", "tenant", "exported_at",
     "sessions": [{id, title, created_at, updated_at, messages: [...]}],
     "memories": [{id, kind, content, session_id, created_at, updated_at}],
     "documents": [{id, title}]}

Sessions are read from PostgreSQL (so history a collapse moved out of Redis is
there) plus whatever only Redis holds yet (a turn not persisted), one session
at a time, so the export of a long history never sits whole in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import redis.asyncio as aredis

from app.errors import ClientError
from app.identity import Identity
from app.sessions.store import Sessions
from app.stores import keys
from app.stores.indexes import escape_tag
from app.tools.kb_search import parse_search_reply

DOCS_LIMIT = 10_000


def _iso(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


async def export(who: Identity, sessions: Sessions, redis: aredis.Redis) -> AsyncIterator[bytes]:
    user = who.user
    head = {"user": user, "tenant": who.tenant, "exported_at": time.time()}
    yield orjson.dumps(head)[:-1] + b',"sessions":['
    async with sessions.pg.connection() as conn:
        cur = await conn.execute(
            "SELECT id, title, created_at, updated_at FROM sessions WHERE user_id = %s"
            " ORDER BY created_at", (user,))
        rows = await cur.fetchall()
    for n, (sid, title, created, updated) in enumerate(rows):
        try:
            loaded = await sessions.full_history(str(sid), user)
            history: list[Any] = loaded.messages
        except ClientError:  # deleted meanwhile
            continue
        item = {"id": sid, "title": title, "created_at": _iso(created),
                "updated_at": _iso(updated), "messages": history}
        yield (b"," if n else b"") + orjson.dumps(item)
    yield b'],"memories":'
    async with sessions.pg.connection() as conn:
        cur = await conn.execute(
            "SELECT id, kind, content, session_id, created_at, updated_at FROM memories"
            " WHERE user_id = %s ORDER BY created_at", (user,))
        memories = [{"id": r[0], "kind": r[1], "content": r[2], "session_id": r[3],
                     "created_at": _iso(r[4]), "updated_at": _iso(r[5])}
                    for r in await cur.fetchall()]
    yield orjson.dumps(memories)
    yield b',"documents":' + json.dumps(await _documents(redis, user)).encode() + b"}"


async def _documents(redis: aredis.Redis, user: str) -> list[dict[str, str]]:
    """The caller's private documents (scope `user:<uid>`): id and title, once each."""
    reply = await redis.execute_command(  # type: ignore[no-untyped-call]
        "FT.SEARCH", keys.INDEX_KB, f"@scope:{{{escape_tag(f'user:{user}')}}}",
        "RETURN", 2, "doc", "title", "LIMIT", 0, DOCS_LIMIT, "DIALECT", 2)
    seen: dict[str, str] = {}
    for _, f in parse_search_reply(reply)[1]:
        if "doc" in f:
            seen.setdefault(f["doc"], f.get("title", ""))
    return [{"id": doc, "title": title} for doc, title in sorted(seen.items())]
