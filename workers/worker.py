"""The rq worker entry point: one process serving every queue of the project.

Queues, in priority order: `persist` (turns left unpersisted), `memory`
(long-term memory extraction), `audit` (semantic-cache audits).
"""

from __future__ import annotations

import os
import socket

from rq import Queue, Worker

from app.settings import Settings
from app.stores import redis_client

QUEUES = ("persist", "memory", "audit")


def queues(settings: Settings) -> list[Queue]:
    conn = redis_client(settings.redis_url or "")
    return [Queue(name, connection=conn) for name in QUEUES]


def run_worker(settings: Settings, *, burst: bool = False) -> bool:
    qs = queues(settings)
    name = f"backbone-{socket.gethostname()}-{os.getpid()}"
    worker = Worker(qs, connection=qs[0].connection, name=name)
    return bool(worker.work(burst=burst, with_scheduler=True))
