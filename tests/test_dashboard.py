"""The rq dashboard `backbone up` supervises, started the same way against the test Redis."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

import httpx
import redis
from rq import Queue, Worker

from app.settings import Settings
from app.stack.embedded import free_port
from app.stack.supervisor import dashboard_child


def _get_json(url: str, child_alive: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cause = child_alive()
        if cause is not None:
            raise AssertionError(f"rq-dashboard exited: {cause}")
        try:
            res = httpx.get(url, timeout=2)
            if res.status_code == 200:
                return res.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never answered")


def test_dashboard_starts_on_loopback_and_lists_our_queue_and_worker(
    settings: Settings, r: redis.Redis
) -> None:
    name = f"dash-{uuid.uuid4().hex[:8]}"
    q = Queue(name, connection=r)
    q.enqueue_call("workers.jobs.does_not_matter", args=(1,))
    worker = Worker([q], connection=r, name=f"{name}-worker")
    worker.register_birth()
    port = free_port()
    child = dashboard_child(settings.redis_url or "", port, dict(os.environ))
    child.start()
    try:
        base = f"http://127.0.0.1:{port}/0/data"
        queues = _get_json(f"{base}/queues.json", child.exit_cause)
        mine = [x for x in queues["queues"] if x["name"] == name]
        assert mine and mine[0]["count"] == 1, queues
        workers = _get_json(f"{base}/workers.json", child.exit_cause)
        assert any(w["name"] == f"{name}-worker" and name in w["queues"]
                   for w in workers["workers"]), workers
        assert child.argv is not None and settings.redis_url not in child.argv
    finally:
        child.stop()
        worker.register_death()
        q.delete(delete_jobs=True)
    assert child.exit_cause() is not None
