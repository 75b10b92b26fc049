"""The memory-extraction job and collapsing mined history.

`extract_memories(sid)` mines the messages after the content-hash cursor:

1. take `memory-task-lock:{sid}` with the rq job's id as token (held by another:
   skip; held by an earlier run of this very job, whose worker died: take over);
2. read cursor, summary and history; the delta is what follows the message whose
   `hash` is the cursor (found in the Redis history, else its seq is looked up in
   PostgreSQL, which keeps every message after older ones were collapsed);
3. extract facts from the delta with the summary, and keep the
   MEMORY_MAX_FACTS_PER_JOB best ranked (`app.memory.facts.rank`; the rest are
   dropped and counted);
4. `extend_lock` right before writing: 0 means the lock expired and another worker
   may own the session now, so stop without writing anything;
5. store the facts (idempotent: `app.memory.store`), roll the summary forward and
   `advance_cursor` (compare-and-set, lock holder only, and only to a message with
   a later seq than the cursor's: an order, not just "different"), then mirror cursor and
   summary into PostgreSQL `sessions` while still holding the lock;
6. release the lock (only our own token) whatever happened.

A worker that lost its lock between 4 and 5 may have written facts another worker
writes again; the store makes the second write a no-op, so nothing is counted twice.

A deleted session is not mined: after taking the lock the job checks the delete
fence (`session:{<sid>}:deleted`, else PostgreSQL's tombstone) and skips. A
delete during a run removes the lock, so `extend_lock` fails and nothing more is
written. Memories extracted before the delete stay: they are the user's
long-term memories (listed and deleted through /v1/memories), not the chat.

The app enqueues it through `app.memory.queue` (one waiting job per session).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import redis
from rq.job import Job, get_current_job

from app.chat import context
from app.embeddings import Embedder, shared_embedder
from app.memory import Extractor, make_extractor, update_summary
from app.memory.facts import cap
from app.memory.queue import enqueue_after_lock
from app.memory.store import MemoryStore
from app.ops import metrics, tracing
from app.sessions.messages import Message
from app.settings import Settings
from app.stores import keys, scripts
from app.stores.clients import pg_connect, redis_client, session_redis_client

log = logging.getLogger("backbone.memory")

SUMMARY_CHARS = 1200


def _text(raw: Any) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else (None if raw is None else str(raw))


# -- the job ---------------------------------------------------------------------


@tracing.traced_job("memory.extract")
def extract_memories(sid: str) -> dict[str, Any]:
    """rq job: mine the messages of `sid` after its cursor; return counts."""
    settings = Settings.from_env()
    client = redis_client(settings.redis_url or "")
    sessions = session_redis_client(settings) if settings.session_redis_url else client
    started = time.perf_counter()
    result: dict[str, Any] | None = None  # stays None if the job raises
    try:
        with pg_connect(settings.database_url or "", autocommit=True) as pg:
            embedder = shared_embedder(settings.embedding_model)
            result = run_extraction(client, pg, sid, settings, make_extractor(settings), embedder,
                                    token=lock_token(get_current_job()), sessions=sessions)
        if result.get("skipped") == "locked":
            # The holder may be dead: look again once its lock has run out.
            left_ms = max(int(sessions.pttl(keys.memory_lock(sid))), 0)
            enqueue_after_lock(client, sid, left_ms / 1000 + 1)
        return result
    finally:
        metrics.memory_job_done(result, time.perf_counter() - started)
        if sessions is not client:
            sessions.close()
        client.close()


def lock_token(job: Job | None) -> str | None:
    """The lock token of a run under rq: its job's id, so a retry of a run whose worker
    died mid-job (rq re-runs it once the worker's heartbeat lapses) takes over the
    lock the dead run left instead of waiting out its TTL (MEMORY_LOCK_TTL_SECONDS):
    rq re-runs a job only when no live worker holds it, and a job id waits behind a
    started job of the same id (`app.memory.queue`). Outside rq: random."""
    return f"job:{job.id}" if job is not None else None


def read_history(
    client: redis.Redis, pg: psycopg.Connection[Any], sid: str
) -> tuple[str | None, list[Message]]:
    """(owner, history): the live copy in Redis, else what PostgreSQL persisted."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.session_user(sid))
    pipe.execute_command("JSON.GET", keys.session(sid), ".")  # type: ignore[no-untyped-call]
    owner, raw = pipe.execute()
    if owner is not None and raw is not None:
        return _text(owner), json.loads(raw)
    row = pg.execute("SELECT user_id FROM sessions WHERE id = %s", (sid,)).fetchone()
    if row is None:
        return None, []
    rows = pg.execute(
        "SELECT body::text FROM messages WHERE session_id = %s ORDER BY seq", (sid,)
    ).fetchall()
    return str(row[0]), [json.loads(r[0]) for r in rows]


def select_delta(
    history: Sequence[Message], cursor: str | None, cursor_seq: int | None = None
) -> list[Message] | None:
    """Messages after the cursor message; None when the cursor is not in `history`.

    `cursor_seq` (the cursor message's seq, from PostgreSQL) locates it when the
    message itself was collapsed out of the history.
    """
    if cursor is None:
        return list(history)
    for i, message in enumerate(history):
        if message.get("hash") == cursor:
            return list(history[i + 1 :])
    if cursor_seq is None:
        return None
    return [m for m in history if int(m["seq"]) > cursor_seq]


def _seq_in(history: Sequence[Message], cursor: str | None) -> int | None:
    if cursor is None:
        return None
    return next((int(m["seq"]) for m in history if m.get("hash") == cursor), None)


def _cursor_seq(pg: psycopg.Connection[Any], sid: str, cursor: str) -> int | None:
    row = pg.execute(
        "SELECT seq FROM messages WHERE session_id = %s AND hash = %s", (sid, cursor)
    ).fetchone()
    return int(row[0]) if row else None


def _deleted(client: redis.Redis, pg: psycopg.Connection[Any], sid: str) -> bool:
    if client.exists(keys.session_deleted(sid)):
        return True
    return pg.execute("SELECT 1 FROM deleted_sessions WHERE id = %s", (sid,)).fetchone() is not None


def _state(
    client: redis.Redis, pg: psycopg.Connection[Any], sid: str
) -> tuple[str | None, str | None, str]:
    """(cursor in Redis, cursor to mine from, summary); PostgreSQL's mirror fills a lost Redis."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.memory_cursor(sid))
    pipe.get(keys.memory_summary(sid))
    raw_cursor, raw_summary = pipe.execute()
    cursor, summary = _text(raw_cursor), _text(raw_summary) or ""
    if cursor is not None:
        return cursor, cursor, summary
    row = pg.execute("SELECT cursor_hash, summary FROM sessions WHERE id = %s", (sid,)).fetchone()
    if row is None or row[0] is None:
        return None, None, summary
    return None, str(row[0]), str(row[1] or "")


def run_extraction(
    client: redis.Redis,
    pg: psycopg.Connection[Any],
    sid: str,
    settings: Settings,
    extractor: Extractor,
    embedder: Embedder,
    *,
    token: str | None = None,
    sessions: redis.Redis | None = None,
) -> dict[str, Any]:
    """The job's body with its dependencies passed in (tests and the benchmark).

    `client` is the search plane (long-term memories); `sessions` the session plane
    (lock, cursor, summary, history), by default the same Redis."""
    store_client = client
    client = sessions or client
    keys.check_session_id(sid)
    token = token or secrets.token_hex(16)
    ttl_ms = settings.memory_lock_ttl_seconds * 1000
    if not scripts.run(client, scripts.acquire_lock(sid, token, ttl_ms)):
        return {"skipped": "locked"}
    try:
        if _deleted(client, pg, sid):
            return {"skipped": "deleted"}
        expected, cursor, summary = _state(client, pg, sid)
        owner, history = read_history(client, pg, sid)
        if owner is None:
            return {"skipped": "no_session"}
        cursor_seq = _seq_in(history, cursor)
        if cursor_seq is None and cursor is not None:
            cursor_seq = _cursor_seq(pg, sid, cursor)
        delta = select_delta(history, cursor, cursor_seq)
        if delta is None:
            # The cursor names a message neither store has: mine everything again,
            # which the idempotent store turns into no new rows for what was mined.
            log.warning("session %s: cursor %s not found; re-mining the history", sid, cursor)
            delta = list(history)
        if not delta:
            return {"delta": 0}
        # One message of many "I like x." sentences must not become hundreds of memories
        # (each an embedding, a KNN and an index entry): keep the best ranked.
        facts, dropped = cap(extractor.extract(delta, summary), settings.memory_max_facts_per_job)
        if not scripts.run(client, scripts.extend_lock(sid, token, ttl_ms)):
            return {"skipped": "lock_lost", "delta": len(delta)}
        store = MemoryStore(store_client, pg, embedder, max_per_user=settings.memory_max_per_user)
        stored = store.write(owner, sid, facts, delta[-1]["hash"])
        new_summary = update_summary(summary, delta, SUMMARY_CHARS)
        code = scripts.run(
            client,
            scripts.advance_cursor(
                sid, token, expected, delta[-1]["hash"], new_summary, settings.memory_ttl_seconds,
                expected_seq=cursor_seq, new_seq=int(delta[-1]["seq"]),
            ),
        )
        collapsed = 0
        if code == 1:
            pg.execute(
                "UPDATE sessions SET cursor_hash = %s, summary = %s WHERE id = %s",
                (delta[-1]["hash"], new_summary, sid),
            )
            collapsed = collapse_if_over_budget(client, pg, sid, token, history)
        return {
            "collapsed": collapsed,
            "delta": len(delta),
            "facts": len(facts),
            "dropped": dropped,
            "inserted": stored.inserted,
            "updated": stored.updated,
            "unchanged": stored.unchanged,
            "evicted": stored.evicted,
            "advanced": code == 1,
        }
    finally:
        scripts.run(client, scripts.release_lock(sid, token))


# -- collapse (not wired: see collapse_mined) -----------------------------------------


def collapsible(history: Sequence[Message], cursor: str | None, keep_last: int) -> int:
    """How many leading messages may leave Redis: mined, and not among the last keep_last.

    The cursor message itself stays, so the next job finds its place without PostgreSQL.
    """
    if cursor is None:
        return 0
    for i, message in enumerate(history):
        if message.get("hash") == cursor:
            return max(0, min(i, len(history) - max(keep_last, 0)))
    return 0


def collapse_if_over_budget(
    client: redis.Redis, pg: psycopg.Connection[Any], sid: str, token: str,
    history: Sequence[Message],
) -> int:
    """When the history no longer fits the context budget, collapse what was mined
    and is safely in PostgreSQL, keeping the messages the context still sends."""
    keep = len(context.recent(history))
    if keep >= len(history) or client.zscore(keys.unpersisted(sid), sid) is not None:
        return 0  # fits, or PostgreSQL may lack some of it: never trim those
    # Seqs are unique per session: all of 0..last are persisted iff there are last+1.
    last = int(history[-keep - 1]["seq"])
    row = pg.execute("SELECT count(*) FROM messages WHERE session_id = %s AND seq <= %s",
                     (sid, last)).fetchone()
    if row is None or int(row[0]) != last + 1:
        return 0
    return collapse_mined(client, sid, token, keep_last=keep)


def collapse_mined(client: redis.Redis, sid: str, token: str, keep_last: int) -> int:
    """Trim mined messages off the Redis history, for the lock holder; return how many.

    The summary already covers them and PostgreSQL keeps them. WATCH makes it all or
    nothing against a concurrent append or a lost lock (then 0 and nothing changes).
    Messages keep their seq (appends number from the last seq, not the array
    length), so nothing after a collapse reuses a seq.
    """
    lock, session, cursor_key = keys.memory_lock(sid), keys.session(sid), keys.memory_cursor(sid)
    with client.pipeline() as pipe:
        try:
            pipe.watch(lock, session, cursor_key)  # type: ignore[no-untyped-call]
            if _text(pipe.get(lock)) != token:
                return 0
            raw = pipe.execute_command("JSON.GET", session, ".")  # type: ignore[no-untyped-call]
            if raw is None:
                return 0
            history = json.loads(raw)
            n = collapsible(history, _text(pipe.get(cursor_key)), keep_last)
            if n == 0:
                return 0
            pipe.multi()
            pipe.execute_command(  # type: ignore[no-untyped-call]
                "JSON.ARRTRIM", session, ".", n, len(history) - 1
            )
            pipe.execute()
        except redis.WatchError:
            return 0
    return n
