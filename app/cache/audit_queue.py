"""How the cache hands a sampled hit to the audit (the job itself is `workers.audit`).

The audit needs the caller's query, arguments and id, which are private: rq
keeps a job's arguments in `rq:job:<id>` for up to a day, logs them at INFO and
shows them in the dashboard. So the input goes into `cache-audit:<token>`
(a random token, `AUDIT_ENTRY_TTL_SECONDS`), and the job's one argument is that
key; the job reads and deletes it in one GETDEL. An enqueue that fails after
the SET leaves the entry to expire unread. The job is named by its import path,
so the app never imports `workers`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue

from app.ops import tracing
from app.stores import keys

AUDIT_QUEUE = "audit"
JOB = "workers.audit.audit_cache_entry"


def audit_enqueuer(connection: redis.Redis) -> Callable[[dict[str, Any]], None]:
    """The `enqueue_audit` callable for SemanticCache: one SET and one rq enqueue on a
    sync client."""
    q = Queue(AUDIT_QUEUE, connection=connection)

    def enqueue(payload: dict[str, Any]) -> None:
        entry = keys.cache_audit()
        connection.set(entry, json.dumps(payload, sort_keys=True),
                       ex=keys.AUDIT_ENTRY_TTL_SECONDS)
        # Runs in a thread that copied the turn's context: the audit joins its trace.
        q.enqueue_call(JOB, args=(entry,), timeout=120, result_ttl=600, failure_ttl=86400,
                       meta=tracing.job_meta())

    return enqueue
