"""The PostgreSQL side of sessions: the durable truth of every history.

Writes are idempotent: a message's primary key is (session_id, seq), and a
second write of the same message does nothing. `body` holds the message's
canonical JSON text exactly as it was appended to Redis, so a restore rebuilds
the identical history.

A deleted session leaves a tombstone in `deleted_sessions`. `persist` and
`delete_session` take the same per-session advisory lock inside their
transaction, so they are ordered: a persist either lands before the delete (and
is deleted with it) or sees the tombstone and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from app.errors import Gone, NotFound
from app.sessions.messages import Message, canonical_json

TITLE_CHARS = 80
# Namespace of the per-session advisory locks (two-int form: apart from the
# migrations' one-bigint lock).
SESSION_LOCK_SPACE = 0x6B62


def session_deleted_error() -> NotFound:
    return NotFound("this session was deleted", code="session_deleted")


@dataclass(frozen=True)
class SessionRow:
    id: str
    user_id: str
    title: str | None
    created_at: datetime
    updated_at: datetime
    messages: int


def user_erased_error() -> Gone:
    return Gone("this user's data was erased", code="user_erased")


async def insert_session(
    conn: AsyncConnection[Any], sid: str, user: str, metadata: dict[str, str] | None = None
) -> None:
    """The session's row with its metadata (`create_session_row`, migrations 0005 and
    0006); 410 `user_erased` once the user's erase has begun."""
    cur = await conn.execute("SELECT create_session_row(%s, %s, %s)",
                             (sid, user, Jsonb(metadata or {})))
    row = await cur.fetchone()
    if not (row and row[0]):
        raise user_erased_error()


@dataclass(frozen=True)
class SessionMeta:
    user_id: str
    created_at: datetime
    metadata: dict[str, str]


async def session_meta(conn: AsyncConnection[Any], sid: str) -> SessionMeta | None:
    """Owner, creation time and metadata (migration 0005) of a session; None if unknown."""
    cur = await conn.execute(
        "SELECT user_id, created_at, metadata FROM sessions WHERE id = %s", (sid,)
    )
    row = await cur.fetchone()
    return SessionMeta(str(row[0]), row[1], dict(row[2] or {})) if row else None


async def set_metadata(
    conn: AsyncConnection[Any], sid: str, user: str, metadata: dict[str, str]
) -> SessionMeta | None:
    """Replace the metadata of the user's session; None when it is not theirs or gone."""
    cur = await conn.execute(
        "UPDATE sessions SET metadata = %s WHERE id = %s AND user_id = %s"
        " RETURNING user_id, created_at, metadata",
        (Jsonb(metadata), sid, user),
    )
    row = await cur.fetchone()
    return SessionMeta(str(row[0]), row[1], dict(row[2] or {})) if row else None


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


@dataclass(frozen=True)
class Persisted:
    inserted: int  # messages that were new
    whole: bool  # every message from seq 0 through the last one given is in PostgreSQL


async def persist(
    conn: AsyncConnection[Any], sid: str, user: str, messages: list[Message]
) -> Persisted:
    """Write messages, idempotently, in one statement (`persist_turn`, migration 0003:
    one round trip, its own transaction in autocommit or part of the caller's).

    Raises NotFound (code `session_deleted`) and writes nothing when the session
    is tombstoned.
    """
    if not messages:
        return Persisted(0, True)
    title = next((m["content"] for m in messages if m.get("role") == "user"), None)
    cur = await conn.execute(
        "SELECT inserted, whole FROM persist_turn(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            SESSION_LOCK_SPACE, sid, user, title[:TITLE_CHARS] if title else None,
            [m["seq"] for m in messages], [m["role"] for m in messages],
            [m.get("content") or "" for m in messages], [m["hash"] for m in messages],
            [m["created_at"] for m in messages], [canonical_json(m) for m in messages],
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    if row[0] < 0:
        raise session_deleted_error()
    return Persisted(int(row[0]), bool(row[1]))


async def persisted_since(conn: AsyncConnection[Any], sid: str, epoch_seconds: float) -> bool:
    """True when the session's last persist came after `epoch_seconds` (its last
    unpersisted write): then that write is in PostgreSQL."""
    cur = await conn.execute(
        "SELECT updated_at >= to_timestamp(%s) FROM sessions WHERE id = %s",
        (epoch_seconds, sid),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def list_sessions(conn: AsyncConnection[Any], user: str, limit: int) -> list[SessionRow]:
    cur = await conn.execute(
        "SELECT s.id, s.user_id, s.title, s.created_at, s.updated_at,"
        " (SELECT count(*) FROM messages m WHERE m.session_id = s.id)"
        " FROM sessions s WHERE s.user_id = %s ORDER BY s.updated_at DESC, s.created_at DESC"
        " LIMIT %s",
        (user, limit),
    )
    return [SessionRow(*row) for row in await cur.fetchall()]


async def _lock_and_check_deleted(conn: AsyncConnection[Any], sid: str) -> bool:
    """Take the session's advisory lock (until the transaction ends); True if tombstoned."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (SESSION_LOCK_SPACE, sid)
    )
    # A second statement: its snapshot is taken after the lock is held (read
    # committed), so it sees a tombstone committed while this waited.
    return await is_deleted(conn, sid)


async def is_deleted(conn: AsyncConnection[Any], sid: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM deleted_sessions WHERE id = %s", (sid,))
    return await cur.fetchone() is not None


async def delete_session(conn: AsyncConnection[Any], sid: str, user: str) -> None:
    """Tombstone the session and drop its row and messages, in one transaction."""
    async with conn.transaction():
        await _lock_and_check_deleted(conn, sid)
        await conn.execute(
            "INSERT INTO deleted_sessions (id, user_id) VALUES (%s, %s)"
            " ON CONFLICT (id) DO NOTHING",
            (sid, user),
        )
        await conn.execute("DELETE FROM sessions WHERE id = %s", (sid,))
