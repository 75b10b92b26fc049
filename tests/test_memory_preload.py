"""`run_worker` warms the model before rq forks: horses use it and never hang."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue
from rq.job import JobStatus
from test_memory_job import append, memories, new_session, turn

from app.memory.queue import enqueue_extraction, job_ids
from app.settings import Settings

# The worker process: `backbone worker`'s own `run_worker`, in burst mode, with
# loading the model made an error in any process but this one (a forked work
# horse has another pid). A horse that finds no model already loaded fails its job.
WORKER = """
import os
import app.embeddings as embeddings
from app.settings import Settings
from workers.worker import run_worker

parent = os.getpid()

def only_in_parent(runner):
    def load(*args, **kwargs):
        if os.getpid() != parent:
            raise RuntimeError("the work horse loaded the embedding model again")
        return runner(*args, **kwargs)
    return load

embeddings._OnnxRunner = only_in_parent(embeddings._OnnxRunner)
embeddings._TorchRunner = only_in_parent(embeddings._TorchRunner)
run_worker(Settings.from_env(), burst=True)
"""


@pytest.mark.slow
def test_run_worker_runs_jobs_in_forked_horses_on_the_model_it_loaded_before_forking(
    r: redis.Redis, pg: psycopg.Connection[Any], user: str, settings: Settings,
) -> None:
    sids = [new_session(r, pg, user) for _ in range(2)]
    for n, sid in enumerate(sids):
        append(r, pg, sid, turn(sid, 0, n))
        assert enqueue_extraction(r, sid)
    env = {**os.environ, "REDIS_URL": settings.redis_url or "",
           "DATABASE_URL": settings.database_url or "", "AUTH_SECRET": settings.auth_secret or ""}
    # A horse deadlocked on state inherited across fork would sit out rq's job timeout.
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                          text=True, timeout=90, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    q = Queue("memory", connection=r)
    for sid in sids:
        job = q.fetch_job(job_ids(sid)[0])
        assert job is not None and job.get_status() == JobStatus.FINISHED, proc.stderr[-2000:]
    assert memories(pg, user) == [("allergy", "is allergic to peanuts"),
                                  ("location", "lives in Lisbon")]
