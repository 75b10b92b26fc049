"""How a turn gets its memory extraction (the job itself is `workers.memory_job`).

The app only marks the session due: one ZADD on `memory-due` (sid -> ms of the
turn's end), on the event loop, after the turn persisted. A worker's dispatcher
(`dispatch_due`, a thread of `backbone worker`) reads the oldest marks, enqueues
each session's job, then clears the marks it handled unless a turn marked the
session again meanwhile (`lua/clear_marks-1.lua`). A session whose two job ids
are both running keeps its mark, put off by a second (`dispatch_due`). Enqueueing through rq takes
five to seven round trips of a sync client; done per turn on the API node it cost
about a tenth of the node's CPU per turn (bench/turn_cpu.py), in a thread that
fought the event loop for the GIL. A worker killed between the enqueue and the
clear leaves the mark, so the next pass enqueues it again (rq dedupes a waiting
job): a due session is never dropped, at worst mined twice (the job is
idempotent). With no worker running, marks wait, one per session.

One waiting job per session. The job id is `memory-extract-<sid>`; while that
one runs, a follow-up goes under `memory-extract-<sid>-next`, so a turn that
ends during extraction is mined right after it rather than at the next turn.
The job is named by its import path, so the app never imports `workers`.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Literal

import redis
import redis.asyncio as aredis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job, JobStatus

from app.errors import BadRequest
from app.ops import tracing
from app.sessions.messages import Message
from app.stores import keys, scripts
from app.stores.batch import batch

log = logging.getLogger("backbone.memory")

QUEUE = "memory"
JOB = "workers.memory_job.extract_memories"
RETRIES = 2  # safe: the job is idempotent (lock, compare-and-set cursor, idempotent store)
_WAITING = {JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED, JobStatus.CREATED}


def job_ids(sid: str) -> tuple[str, str]:
    keys.check_session_id(sid)
    return f"memory-extract-{sid}", f"memory-extract-{sid}-next"


def _state(q: Queue, job: Job | None) -> str:
    """'free' (none, or ended), 'waiting' (it will run by itself), 'running' or 'lost'.

    A worker takes a job out of the queue list before it marks it started; one killed
    in between leaves it QUEUED. A worker on one queue moved it into rq's intermediate
    list (BLMOVE), whose cleanup retries it after a minute: running until then. A
    worker on several queues (ours: persist, memory, audit) popped it with BLPOP
    into no list: nothing would ever run it again, so it is lost and queued anew.
    Read as waiting instead, every later turn of the session would enqueue nothing.
    """
    status = job.get_status(refresh=False) if job is not None else None
    if job is None or status not in {*_WAITING, JobStatus.STARTED}:
        return "free"
    if status == JobStatus.STARTED:
        return "running"
    if status != JobStatus.QUEUED or q.connection.lpos(q.key, job.id) is not None:
        return "waiting"
    if q.connection.lpos(q.intermediate_queue_key, job.id) is not None:
        return "running"
    return "lost"


def _free(job: Job) -> None:
    """Delete an ended job, freeing its id for the next one.

    A job whose worker was killed mid-run can leave its execution registry naming an
    execution whose record has since expired; rq's `delete` then raises ValueError
    ("Execution ... not found in Redis") on every try, and the session could never be
    queued again. That registry only lists the job's past runs: drop it and delete."""
    try:
        job.delete()
    except ValueError:
        job.connection.delete(job.execution_registry.key)
        job.delete()


def _fetch(q: Queue, jid: str) -> Job | None:
    """rq's `fetch_job`, except that a job rq cannot read back (it raises, and not for
    Redis: seen after a crash mid-failure) counts as no job: nothing could ever run
    it, and every later turn of its session would trip on it. It is dropped."""
    try:
        return q.fetch_job(jid)
    except redis.RedisError:
        raise
    except Exception:
        log.exception("could not queue memory extraction for %s: dropping its unreadable "
                      "job and queueing it afresh", jid.removeprefix("memory-extract-"))
        q.connection.delete(Job.key_for(jid))
        q.remove(jid)
        return None


Enqueued = Literal["queued", "waiting", "busy"]


def _trace_meta(client: redis.Redis, sid: str) -> dict[str, object] | None:
    """The job meta carrying the marking turn's trace (tracing on, in this worker)."""
    if not tracing.enabled():
        return None
    raw = client.get(keys.memory_due_trace(sid))
    try:
        found = json.loads(raw) if raw else None
    except ValueError:
        found = None
    return {"otel": found} if isinstance(found, dict) else None


def enqueue_extraction(client: redis.Redis, sid: str, *, queue: str = QUEUE) -> bool:
    """Enqueue one extraction for `sid` unless one is already waiting; True if enqueued."""
    return try_enqueue(client, sid, queue=queue) == "queued"


def try_enqueue(client: redis.Redis, sid: str, *, queue: str = QUEUE) -> Enqueued:
    """Enqueue one extraction for `sid`: "queued"; "waiting" when a job that has not
    started yet will mine the delta; "busy" when both job ids are taken by running
    jobs, neither of which is sure to see the latest turn (the caller keeps its mark)."""
    q = Queue(queue, connection=client)
    slots = []
    for jid in job_ids(sid):
        job = _fetch(q, jid)
        state = _state(q, job)
        if job is not None and state == "lost":
            q.enqueue_job(job)
            log.warning("memory job %s was queued but in no queue (its worker died as it "
                        "dequeued it): queued again", jid)
            return "queued"
        if state == "waiting":
            return "waiting"
        slots.append((jid, job, state))
    for jid, job, state in slots:
        if state == "running":
            continue
        if job is not None:
            _free(job)  # finished, failed or stopped: free its id
        try:
            # Retry: a job whose worker died is re-run once rq finds it abandoned
            # (StartedJobRegistry.cleanup), instead of landing in the failed registry.
            q.enqueue_call(JOB, args=(sid,), job_id=jid, unique=True, timeout=600,
                           result_ttl=300, failure_ttl=86400, retry=Retry(max=RETRIES),
                           meta=_trace_meta(client, sid))
        except DuplicateJobError:
            return "waiting"  # another node enqueued it between our read and our write
        return "queued"
    return "busy"


def enqueue_after_lock(client: redis.Redis, sid: str, delay_seconds: float, *,
                       queue: str = QUEUE) -> bool:
    """Mine `sid` again once its lock can have expired; True if scheduled.

    A job that finds the session locked would otherwise leave its delta to the next
    turn, and the holder may be dead (a worker killed mid-job keeps the lock until
    its TTL): without this, a session whose last turn came then is never mined."""
    q = Queue(queue, connection=client)
    jid = f"memory-extract-{keys.check_session_id(sid)}-after-lock"
    job = _fetch(q, jid)
    if _state(q, job) == "waiting":
        return False
    if job is not None:
        _free(job)
    q.enqueue_in(timedelta(seconds=delay_seconds), JOB, sid, job_id=jid, job_timeout=600,
                 result_ttl=300, failure_ttl=86400, retry=Retry(max=RETRIES),
                 meta=tracing.job_meta())
    return True


# Marks a dispatcher pass reads at once (oldest first).
DISPATCH_BATCH = 100
# A session whose two jobs are both running is looked at again this much later.
BUSY_PUT_OFF_MS = 1000


def dispatch_due(client: redis.Redis, *, batch: int = DISPATCH_BATCH,
                 queue: str = QUEUE) -> int:
    """One pass: enqueue extraction for the `batch` oldest due sessions, then clear
    their marks (each unless marked again meanwhile). How many marks it cleared.

    A session whose two job ids are both taken by running jobs keeps its mark, put
    off by BUSY_PUT_OFF_MS (its score moved forward, and a pass reads only marks
    whose time has come): clearing it would leave the turn that set it to the next
    turn, which may never come, and the running jobs may have read the history
    before that turn was appended."""
    now_ms = int(time.time() * 1000)
    due: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
        keys.MEMORY_DUE, "-inf", now_ms, start=0, num=batch, withscores=True)
    handled: list[tuple[str, float]] = []
    busy: list[str] = []
    try:
        for raw, score in due:
            sid = raw.decode() if isinstance(raw, bytes) else str(raw)
            try:
                if try_enqueue(client, sid, queue=queue) == "busy":
                    busy.append(sid)
                    continue
            except BadRequest:  # not a session id (written by hand?): nothing to mine
                log.warning("dropping memory-due mark %r: not a session id", sid)
            except redis.RedisError:
                raise  # Redis is away: the marks not cleared wait for the next pass
            except Exception:
                # rq choking on one session: it waits for its next turn, as a failed
                # enqueue in the turn itself used to; the rest of the batch goes on.
                log.exception("memory extraction for %s not queued", sid)
            handled.append((sid, score))
    finally:  # on a Redis error mid-batch, what was enqueued is still cleared
        if busy:
            # XX: a mark cleared meanwhile stays cleared; GT: never earlier than it is.
            client.zadd(keys.MEMORY_DUE, dict.fromkeys(busy, now_ms + BUSY_PUT_OFF_MS),
                        xx=True, gt=True)
        cleared = scripts.run(client, scripts.clear_due(handled)) if handled else 0
    return cleared


def dispatch_all(client: redis.Redis, *, batch: int = DISPATCH_BATCH, queue: str = QUEUE) -> int:
    """Passes until a pass clears nothing (a burst worker's start, tests); how many."""
    total = 0
    while n := dispatch_due(client, batch=batch, queue=queue):
        total += n
    return total


async def mark_due(client: aredis.Redis, sid: str) -> None:
    """This session's last turn awaits extraction (a later mark raises its score).
    With tracing on, the turn's trace context goes beside the mark, in the same round
    trip, so the job the dispatcher enqueues continues the turn's trace."""
    mark = {keys.check_session_id(sid): int(time.time() * 1000)}
    carrier = tracing.carrier()
    if not carrier:
        await client.zadd(keys.MEMORY_DUE, mark)
        return
    for reply in await batch(client, [
        ("ZADD", keys.MEMORY_DUE, mark[sid], sid),
        ("SET", keys.memory_due_trace(sid), json.dumps(carrier), "EX",
         keys.MEMORY_DUE_TRACE_SECONDS),
    ]):
        if isinstance(reply, redis.RedisError):
            raise reply


class AfterTurnMark:
    """The orchestrator's after-turn hook: mark the session due, one round trip."""

    def __init__(self, client: aredis.Redis) -> None:
        self.client = client

    async def __call__(self, sid: str, user: str, stored: list[Message]) -> None:
        if not stored:
            return
        try:
            await mark_due(self.client, sid)
        except redis.RedisError as e:
            # Losing one mark loses nothing: the next turn's job mines this delta too.
            log.warning("could not mark %s due for memory extraction: %s", sid, e)
