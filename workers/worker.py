"""The rq worker entry point: one process serving every queue of the project.

Queues, in priority order: `persist` (turns left unpersisted), `memory`
(long-term memory extraction), `audit` (semantic-cache audits). Each worker
also runs a small ticker that enqueues the persistence sweep every
SWEEP_INTERVAL_SECONDS; a `SET NX EX` on `persist-sweep-tick` makes sure only
one worker of many enqueues it per interval.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis
from rq import Queue, Worker

from app import keys
from app.settings import Settings
from app.stores import redis_client

QUEUES = ("persist", "memory", "audit")
log = logging.getLogger("backbone.worker")


def queue(settings: Settings, name: str, connection: redis.Redis | None = None) -> Queue:
    return Queue(name, connection=connection or redis_client(settings.redis_url or ""))


def enqueue_sweep_if_due(settings: Settings, connection: redis.Redis) -> bool:
    """Enqueue one sweep unless another worker did within this interval."""
    if not connection.set(keys.SWEEP_TICK, "1", nx=True, ex=settings.sweep_interval_seconds):
        return False
    queue(settings, "persist", connection).enqueue(
        "workers.jobs.sweep_unpersisted", job_timeout=300, result_ttl=600, failure_ttl=86400
    )
    return True


def _ticker(settings: Settings, stop: threading.Event) -> None:
    conn = redis_client(settings.redis_url or "")
    while not stop.wait(min(5, settings.sweep_interval_seconds)):
        try:
            enqueue_sweep_if_due(settings, conn)
        except redis.RedisError as e:
            log.warning("could not enqueue the persistence sweep: %s", e)


def run_worker(settings: Settings, *, burst: bool = False) -> bool:
    # Jobs read Settings.from_env() in the work horse: hand them the resolved stores.
    os.environ["REDIS_URL"] = settings.redis_url or ""
    os.environ["DATABASE_URL"] = settings.database_url or ""
    conn = redis_client(settings.redis_url or "")
    qs = [queue(settings, name, conn) for name in QUEUES]
    worker = Worker(qs, connection=conn, name=f"backbone-{socket.gethostname()}-{os.getpid()}")
    stop = threading.Event()
    if not burst:
        threading.Thread(target=_ticker, args=(settings, stop), daemon=True).start()
    try:
        return bool(worker.work(burst=burst, with_scheduler=True))
    finally:
        stop.set()
