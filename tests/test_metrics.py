"""`GET /metrics` after real turns, a real cache audit and a real extraction job."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from rq import Queue, SimpleWorker
from sse import frames
from starlette.testclient import TestClient
from waits import wait_until

from app.api import create_app
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.memory.queue import dispatch_all
from app.settings import Settings

DOC = """# Metrics probe

The backbone exports Prometheus metrics: a turn counter by outcome, latency
histograms for the first event and the whole turn, and the rq queue depths.
"""
QUESTION = "Which Prometheus metrics does the backbone export for turns?"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


@pytest.fixture(scope="module")
def kb(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("kb-metrics")
    (folder / "metrics-probe.md").write_text(DOC)
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(), [folder], progress=False)
    client.close()


@pytest.fixture
def audited(settings: Settings, kb: None) -> Iterator[TestClient]:
    """Every cache hit audited, so one repeated question drives a real audit."""
    fast = dataclasses.replace(settings, offline_token_delay_ms=0,
                               retrieval_cache_audit_rate=1.0)
    # /metrics answers loopback callers when no METRICS_TOKEN is set.
    with TestClient(create_app(fast), client=("127.0.0.1", 50000)) as c:
        yield c


def _turn(client: TestClient, h: dict[str, str]) -> list[str]:
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    with client.stream("POST", f"/v1/sessions/{sid}/messages", headers=h,
                       json={"content": QUESTION}) as res:
        assert res.status_code == 200
        return [f.event for f in frames(res.iter_lines())]


def test_metrics_move_after_real_turns_an_audit_and_an_extraction(
    audited: TestClient, token_for: object, user: str, stores_env: Settings, r: redis.Redis
) -> None:
    h = token_for(user)  # type: ignore[operator]
    before = audited.get("/metrics").text
    first, second = _turn(audited, h), _turn(audited, h)
    assert first[-1] == second[-1] == "message.done"
    wait_until(lambda: Queue("audit", connection=r).count >= 1, "the audit to be enqueued")
    after_turns = audited.get("/metrics")
    assert after_turns.status_code == 200
    assert after_turns.headers["content-type"].startswith("text/plain")
    mid = after_turns.text

    def moved(name: str, text: str = mid, **labels: str) -> float:
        return sample(text, name, **labels) - sample(before, name, **labels)

    assert moved("backbone_turns_total", outcome="done") == 2
    assert moved("backbone_turn_first_event_seconds_count") == 2
    assert moved("backbone_turn_seconds_count") == 2
    assert moved("backbone_events_sent_total", event="message.done") == 2
    assert moved("backbone_events_sent_total", event="tool.result") == 2
    assert moved("backbone_cache_lookups_total", tool="kb_search") >= 2
    assert moved("backbone_cache_misses_total", tool="kb_search") >= 1
    hits = (moved("backbone_cache_hits_total", tool="kb_search")
            + moved("backbone_cache_exact_hits_total", tool="kb_search"))
    assert hits >= 1
    # The sessions wait to be dispatched, the audits in their queue: no worker runs yet.
    due_before = sample(before, "backbone_memory_due_sessions")
    wait_until(lambda: sample(audited.get("/metrics").text,
                              "backbone_memory_due_sessions") == due_before + 2,
               "both turns to mark their sessions due")
    assert sample(mid, "backbone_rq_queue_jobs", queue="audit") >= 1
    assert "backbone_persist_lag_seconds" in mid

    # The workers' jobs, run in this process as rq's SimpleWorker runs them, the memory
    # jobs once dispatched as a worker's dispatcher does.
    assert dispatch_all(r) >= 2
    for name in ("audit", "memory"):
        SimpleWorker([Queue(name, connection=r)], connection=r).work(burst=True)
    end = audited.get("/metrics").text
    assert moved("backbone_cache_audit_overlap_count", end, tool="kb_search") >= 1
    assert moved("backbone_cache_audits_total", end, tool="kb_search") >= 1
    assert moved("backbone_memory_job_seconds_count", end) >= 2
    assert moved("backbone_memory_jobs_total", end, result="done") >= 2
    assert moved("backbone_memory_delta_messages_count", end) >= 2
    assert sample(end, "backbone_rq_queue_jobs", queue="memory") == 0
    assert sample(end, "backbone_memory_due_sessions") == 0


_BUMP = """
import time
from types import SimpleNamespace
from app.ops import metrics
w = metrics.TurnWatch()
w.sent(SimpleNamespace(event="message.done", data={}))
w.finish()
"""
_RENDER = """
from app.ops import metrics
body, _ = metrics.render(metrics.SharedState({}, None, {}, 0.0))
print(body.decode())
"""


def test_with_a_multiprocess_dir_the_scrape_sums_every_process(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(3):  # three processes, as three app processes or work horses
        subprocess.run([sys.executable, "-c", _BUMP], env=env, check=True)
    out = subprocess.run([sys.executable, "-c", _RENDER], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert sample(out, "backbone_turns_total", outcome="done") == 3
    assert sample(out, "backbone_events_sent_total", event="message.done") == 3
    assert sample(out, "backbone_persist_lag_seconds") == 0


def test_a_worker_with_a_metrics_port_serves_its_own_metrics(
    settings: Settings, tmp_path: Path
) -> None:
    """What compose runs: the worker in its own container, its /metrics on its own port."""
    import signal

    import httpx

    from app.stack.embedded import free_port

    port = free_port()
    env = {**os.environ, "REDIS_URL": settings.redis_url or "",
           "DATABASE_URL": settings.database_url or "", "WORKER_METRICS_PORT": str(port),
           "LOG_LEVEL": "INFO"}
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    body: list[str] = []

    def served() -> bool:
        try:
            res = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        except httpx.HTTPError:
            return False
        body.append(res.text)
        return res.status_code == 200

    try:
        wait_until(served, "the worker's /metrics", timeout=90)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            # Once in a full run the worker did not stop: say what it was doing, and
            # leave no process behind to fail the next test with a ResourceWarning.
            proc.kill()
            proc.wait()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise AssertionError(
                f"the worker did not stop within 60 s of SIGINT:\n{tail}") from None
    names = {f.name for f in text_string_to_metric_families(body[-1])}
    assert {"backbone_memory_job_seconds", "backbone_memory_delta_messages"} <= names
