"""The cache audit job, run in-process by an rq SimpleWorker against real Redis and PostgreSQL.

The job builds its tools with `make_tools`; the tests hand it their own test
tool through that one seam, so a second run can return other ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import zlib
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from test_semantic_cache import CountingTool, ask

from app.cache.audit_queue import audit_enqueuer
from app.cache.decision import AdaptiveThreshold
from app.cache.semantic import threshold_key
from app.settings import Settings
from app.stores import keys
from app.tools.base import ToolResult
from workers import audit
from workers.audit import overlap

QUESTIONS = ["How do I reset my password?", "How can I reset my password?"]


def _audit_one(
    settings: Settings, r: redis.Redis, tool: CountingTool, user: str, new_version: int,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Any]:
    always = dataclasses.replace(settings, retrieval_cache_audit_rate=1.0)
    routed = ask(always, tool, [(user, q) for q in QUESTIONS], audit_enqueuer(r))
    assert [x.cached for x in routed] == [False, True]
    tool.version = new_version
    monkeypatch.setattr(audit, "make_tools", lambda *_: {tool.spec.name: tool})
    q = Queue("audit", connection=r)
    jobs = [j for j in q.jobs if _payload(r, j).get("tool") == tool.spec.name]
    assert len(jobs) == 1
    SimpleWorker([q], connection=r).work(burst=True)
    jobs[0].refresh()  # type: ignore[no-untyped-call]
    assert jobs[0].is_finished, jobs[0].latest_result()
    outcome = jobs[0].return_value()
    assert isinstance(outcome, dict)
    return outcome


def _payload(r: redis.Redis, job: Job) -> dict[str, Any]:
    """The input an audit job's one argument names (empty once read or expired)."""
    raw = r.get(job.args[0]) if job.args and isinstance(job.args[0], str) else None
    return json.loads(raw) if raw else {}


def _rows(settings: Settings, key: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(settings.database_url or "") as conn:
        return conn.execute(
            "SELECT tool, distance, overlap, invalidated FROM cache_audits WHERE entry_key = %s",
            (key,),
        ).fetchall()


def _cleanup(r: redis.Redis, tool: str) -> None:
    r.delete(keys.cache_stats(tool), threshold_key(tool))


def test_an_audit_whose_fresh_run_returns_other_ids_invalidates_the_entry(
    stores_env: Settings, r: redis.Redis, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = CountingTool()
    got = _audit_one(stores_env, r, tool, user, 2, monkeypatch)
    assert got["status"] == "audited" and got["overlap"] == 0.0
    assert got["invalidated"] and got["deleted"] and got["recorded"]
    assert tool.runs == 2  # the first miss and the audit, never the served hit
    assert r.exists(got["entry_key"]) == 0
    [(name, distance, score, invalidated)] = _rows(stores_env, got["entry_key"])
    assert (name, score, invalidated) == (tool.spec.name, 0.0, True)
    assert 0 < distance <= 0.12
    stats = r.hgetall(keys.cache_stats(tool.spec.name))
    assert stats[b"audits"] == b"1" and stats[b"invalidations"] == b"1"
    state = AdaptiveThreshold.from_dict(r.hgetall(threshold_key(tool.spec.name)))
    assert state.audits == 1 and state.wrong == 1 and state.max_distance < 0.12
    _cleanup(r, tool.spec.name)


def test_an_audit_whose_fresh_run_agrees_keeps_the_entry_and_relaxes_the_threshold(
    stores_env: Settings, r: redis.Redis, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = CountingTool()
    got = _audit_one(stores_env, r, tool, user, 1, monkeypatch)
    assert got["overlap"] == 1.0 and not got["invalidated"] and not got["deleted"]
    assert r.exists(got["entry_key"]) == 1
    [(_, _, score, invalidated)] = _rows(stores_env, got["entry_key"])
    assert score == 1.0 and invalidated is False
    state = AdaptiveThreshold.from_dict(r.hgetall(threshold_key(tool.spec.name)))
    assert state.wrong == 0 and state.max_distance > 0.12
    r.delete(got["entry_key"])
    _cleanup(r, tool.spec.name)


def test_an_audit_of_an_entry_that_is_gone_does_nothing(
    stores_env: Settings, r: redis.Redis, user: str
) -> None:
    key = keys.cache_entry("kb_search", "ab" * 32)
    entry = keys.cache_audit()
    r.set(entry, json.dumps({"entry_key": key, "tool": "kb_search", "arguments": {"query": "x"},
                             "user_id": user, "distance": 0.01}), ex=60)
    got = audit.audit_cache_entry(entry)
    assert got == {"status": "gone", "entry_key": key}
    assert _rows(stores_env, key) == []
    assert r.exists(entry) == 0


PRIVATE = ["Where did I bury the zanzibar-7731 key?",
           "Where did I bury the zanzibar-7731 key again?"]


def _rq_blobs(r: redis.Redis) -> list[bytes]:
    """What rq keeps about jobs: every field of every `rq:job:*` hash (the pickled call
    decompressed too) and every entry of the `rq:results:*` streams."""
    out: list[bytes] = []
    for key in r.scan_iter("rq:job:*", count=1000):
        if r.type(key) != b"hash":
            continue
        for field, value in r.hgetall(key).items():
            out.append(value)
            if field == b"data":
                with contextlib.suppress(zlib.error):
                    out.append(zlib.decompress(value))
    for key in r.scan_iter("rq:results:*", count=1000):
        for _, fields in r.xrange(key):
            out.extend(fields.values())
    return out


def test_audit_jobs_carry_only_an_opaque_key_and_rq_keeps_no_user_text(
    stores_env: Settings, r: redis.Redis, user: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # rq keeps a job's arguments for a day, logs them and shows them in the dashboard.
    caplog.set_level(logging.INFO)
    tool = CountingTool()
    always = dataclasses.replace(stores_env, retrieval_cache_audit_rate=1.0)
    routed = ask(always, tool, [(user, q) for q in PRIVATE], audit_enqueuer(r))
    assert [x.cached for x in routed] == [False, True]
    q = Queue("audit", connection=r)
    [job] = [j for j in q.jobs if _payload(r, j).get("tool") == tool.spec.name]
    (entry,) = job.args
    assert keys.AUDIT_ENTRY.fullmatch(entry) and job.kwargs == {}
    assert _payload(r, job)["user_id"] == user and 0 < r.ttl(entry) <= 3600
    monkeypatch.setattr(audit, "make_tools", lambda *_: {tool.spec.name: tool})
    SimpleWorker([q], connection=r).work(burst=True)
    job.refresh()  # type: ignore[no-untyped-call]
    outcome = job.return_value()
    assert job.is_finished and isinstance(outcome, dict) and outcome["status"] == "audited"
    assert r.exists(entry) == 0  # read and deleted by the job
    blobs = _rq_blobs(r)
    assert any(job.id.encode() in b or entry.encode() in b for b in blobs)  # it does look
    for blob in blobs:
        assert user.encode() not in blob and b"zanzibar" not in blob
    assert user not in caplog.text and "zanzibar" not in caplog.text
    # A second run of the same job (a retry): its input is gone, nothing is redone.
    assert audit.audit_cache_entry(entry) == {"status": "expired"}
    r.delete(outcome["entry_key"])
    _cleanup(r, tool.spec.name)


def test_an_audit_job_refuses_an_argument_that_is_not_an_audit_entry_key() -> None:
    for bad in ("cache:kb_search:" + "ab" * 32, "cache-audit:*", "session:{x}", ""):
        with pytest.raises(ValueError):
            audit.audit_cache_entry(bad)


def test_overlap_compares_item_ids_and_falls_back_to_words_for_plain_text() -> None:
    def items(*ids: str) -> ToolResult:
        return ToolResult("x", [{"id": i} for i in ids])

    assert overlap(items("a", "b", "c"), items("a", "b", "c")) == 1.0
    assert overlap(items("a", "b"), items("b", "c")) == pytest.approx(1 / 3)
    assert overlap(items("a"), ToolResult("nothing found", [])) == 0.0
    url = ToolResult("x", [{"id": None, "url": "https://a.example/"}])
    assert overlap(url, url) == 1.0
    assert overlap(ToolResult("Paris is the capital"), ToolResult("the capital is Paris")) == 1.0
    assert overlap(ToolResult("Paris"), ToolResult("Berlin")) == 0.0


def test_the_audit_job_path_the_app_enqueues_resolves_to_the_job() -> None:
    # The app names the job by path (it never imports workers): the path must resolve.
    from rq.utils import import_attribute

    from app.cache import audit_queue
    from workers.audit import audit_cache_entry

    assert import_attribute(audit_queue.JOB) is audit_cache_entry
