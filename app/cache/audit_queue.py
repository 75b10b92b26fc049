"""How the cache hands a sampled hit to the audit (the job itself is `workers.audit`).

The job is named by its import path, so the app never imports `workers`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from rq import Queue

from app.ops import tracing

AUDIT_QUEUE = "audit"
JOB = "workers.audit.audit_cache_entry"


def audit_enqueuer(connection: redis.Redis) -> Callable[[dict[str, Any]], None]:
    """The `enqueue_audit` callable for SemanticCache: one rq enqueue on a sync client."""
    q = Queue(AUDIT_QUEUE, connection=connection)

    def enqueue(payload: dict[str, Any]) -> None:
        # Runs in a thread that copied the turn's context: the audit joins its trace.
        q.enqueue_call(
            JOB, kwargs=payload, timeout=120, result_ttl=600, failure_ttl=86400,
            meta=tracing.job_meta(),
        )

    return enqueue
