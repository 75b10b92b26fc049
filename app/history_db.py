"""The PostgreSQL side of sessions: the durable truth of every history.

Writes are idempotent: a message's primary key is (session_id, seq), and a
second write of the same message does nothing. `body` holds the message's
canonical JSON text exactly as it was appended to Redis, so a restore rebuilds
the identical history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection

from app.messages import Message, canonical_json

TITLE_CHARS = 80


@dataclass(frozen=True)
class SessionRow:
    id: str
    user_id: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    messages: int


async def insert_session(conn: AsyncConnection[Any], sid: str, user: str) -> None:
    await conn.execute(
        "INSERT INTO sessions (id, user_id) VALUES (%s, %s) ON CONFLICT (id) DO NOTHING",
        (sid, user),
    )


async def owner(conn: AsyncConnection[Any], sid: str) -> str | None:
    cur = await conn.execute("SELECT user_id FROM sessions WHERE id = %s", (sid,))
    row = await cur.fetchone()
    return str(row[0]) if row else None


async def history_json(conn: AsyncConnection[Any], sid: str, before: int | None = None) -> str:
    """The persisted history (messages with seq < `before`, if given) as one JSON array
    text, in seq order."""
    cur = await conn.execute(
        "SELECT body::text FROM messages WHERE session_id = %s AND seq < %s ORDER BY seq",
        (sid, before if before is not None else 2**31 - 1),
    )
    return "[" + ",".join(row[0] for row in await cur.fetchall()) + "]"


async def has_all_through(conn: AsyncConnection[Any], sid: str, seq: int) -> bool:
    """True when every message with seq 0..`seq` is persisted (seqs are unique per session)."""
    cur = await conn.execute(
        "SELECT count(*) FROM messages WHERE session_id = %s AND seq <= %s", (sid, seq)
    )
    row = await cur.fetchone()
    return row is not None and int(row[0]) == seq + 1


async def persist(conn: AsyncConnection[Any], sid: str, user: str, messages: list[Message]) -> int:
    """Write messages in one transaction; return how many were new."""
    if not messages:
        return 0
    title = next((m["content"] for m in messages if m.get("role") == "user"), None)
    async with conn.transaction():
        await insert_session(conn, sid, user)
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO messages (session_id, seq, role, content, hash, created_at, body)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (session_id, seq) DO NOTHING",
                [
                    (sid, m["seq"], m["role"], m.get("content") or "", m["hash"],
                     m["created_at"], canonical_json(m))
                    for m in messages
                ],
            )
            inserted = max(cur.rowcount, 0)
        await conn.execute(
            "UPDATE sessions SET updated_at = now(), title = COALESCE(title, %s) WHERE id = %s",
            (title[:TITLE_CHARS] if title else None, sid),
        )
    return inserted


async def list_sessions(conn: AsyncConnection[Any], user: str, limit: int) -> list[SessionRow]:
    cur = await conn.execute(
        "SELECT s.id, s.user_id, s.title, s.created_at, s.updated_at,"
        " (SELECT count(*) FROM messages m WHERE m.session_id = s.id)"
        " FROM sessions s WHERE s.user_id = %s ORDER BY s.updated_at DESC, s.created_at DESC"
        " LIMIT %s",
        (user, limit),
    )
    return [SessionRow(*row) for row in await cur.fetchall()]


async def delete_session(conn: AsyncConnection[Any], sid: str) -> None:
    await conn.execute("DELETE FROM sessions WHERE id = %s", (sid,))
