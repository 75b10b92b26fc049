"""Memory workers: extraction throughput, and the Lua lock under contention.

    .venv/bin/python bench/memory_worker.py [--sessions 60] [--rq-jobs 20] [--cold-jobs 20]
                                            [--procs 16] [--seconds 4]
                                            [--only inprocess|rq|lock]

1. Extraction: N prepared sessions (two turns each, two facts), one
   `run_extraction` per session in-process with the offline extractor and the
   shared embedding model; then the same N jobs again, which find no delta.
   Needs PostgreSQL: REDIS_URL/DATABASE_URL when set, else an embedded stack in
   a temporary folder.
2. Extraction through a real rq worker: `workers.worker.run_worker` in a
   subprocess (rq's `Worker` forks a work horse per job, as `backbone worker`
   does), twice side by side on one stack: as shipped ("warm before fork":
   `run_worker` calls `app.embeddings.warm` before rq forks) and with that call
   made a no-op ("nothing loaded before fork", each horse loads the model, the
   behaviour issue 18 item 1 reported). Jobs are enqueued one at a time with
   `enqueue_extraction`, each after the previous one finished, so each is timed
   alone: latency is rq's enqueued_at to ended_at (what a user waits for the
   memories of a turn, two facts each), "in horse" is started_at to ended_at.
   CPU per job is the worker's CPU, its reaped horses included
   (/proc/<pid>/stat utime+stime+cutime+cstime), over the jobs, startup excluded.
3. Lock contention: P processes hammer `acquire_lock` / `release_lock` on one
   session for a few seconds. Inside the critical section each holder INCRs a
   `holders` counter and DECRs it on the way out; a value above 1 is an overlap
   (two holders at once). The same loop with a naive GET-then-SET lock shows the
   counter does catch overlaps when the lock is broken.

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
import redis
from rq import Queue, Worker
from rq.job import JobStatus

from app.embeddings import shared_embedder
from app.memory import RuleExtractor
from app.memory.queue import enqueue_extraction, job_ids
from app.sessions import messages
from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stack.embedded import EmbeddedStack, free_port
from app.stores import keys, scripts
from bench._redis import bench_redis, percentile
from workers.memory_job import run_extraction

ROOT = Path(__file__).resolve().parent.parent

TURN = [
    ("Hi, I'm allergic to peanuts and I live in Lisbon.", "Noted, thanks."),
    ("Can you suggest a dinner place?", "How about Taberna da Rua das Flores?"),
]


def _session(r: redis.Redis, pg: psycopg.Connection[Any], user: str) -> str:
    sid = keys.new_session_id()
    history = []
    for i, (said, answer) in enumerate(TURN):
        history += [messages.build(sid, 2 * i, "user", said),
                    messages.build(sid, 2 * i + 1, "assistant", answer)]
    pg.execute("INSERT INTO sessions (id, user_id) VALUES (%s, %s)", (sid, user))
    r.set(keys.session_user(sid), user, ex=3600)
    r.execute_command(  # type: ignore[no-untyped-call]
        "JSON.SET", keys.session(sid), ".", "[" + ",".join(map(messages.canonical_json, history))
        + "]",
    )
    r.expire(keys.session(sid), 3600)
    return sid


def _timed_jobs(
    r: redis.Redis, pg: psycopg.Connection[Any], sids: list[str], settings: Settings
) -> tuple[list[float], list[dict[str, Any]]]:
    extractor, embedder = RuleExtractor(), shared_embedder(settings.embedding_model)
    times, outs = [], []
    for sid in sids:
        t = time.perf_counter()
        outs.append(run_extraction(r, pg, sid, settings, extractor, embedder))
        times.append(time.perf_counter() - t)
    return times, outs


def extraction(n: int) -> list[dict[str, Any]]:
    env = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        base = dataclasses.replace(env, data_dir=Path(tmp))
        stack = EmbeddedStack(base, redis_port=free_port())
        settings = stack.start()
        try:
            prepare(settings)
            shared_embedder(settings.embedding_model).embed("warm up")
            r = redis.Redis.from_url(settings.redis_url or "")
            with psycopg.connect(settings.database_url or "", autocommit=True) as pg:
                sids = [_session(r, pg, f"bench-{secrets.token_hex(4)}") for _ in range(n)]
                rows = []
                for label in ("first run (2 facts each)", "re-run (no delta)"):
                    times, outs = _timed_jobs(r, pg, sids, settings)
                    rows.append({
                        "run": label, "jobs": n, "jobs/s": n / sum(times),
                        "p50 ms": percentile(times, 50) * 1000,
                        "p95 ms": percentile(times, 95) * 1000,
                        "inserted": sum(o.get("inserted", 0) for o in outs),
                    })
            r.close()
        finally:
            stack.stop()
    return rows


def _worker_cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of `pid`: its own CPU and its reaped horses'."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def serve_worker(warm: bool) -> None:
    """The worker subprocess: `run_worker` as `backbone worker` runs it; with
    warm=False its pre-fork `app.embeddings.warm` call does nothing."""
    import app.embeddings
    from workers.worker import run_worker

    if not warm:
        # run_worker imports `warm` from app.embeddings when it starts: this is what it gets.
        def skip(settings: Settings) -> None:
            return None

        app.embeddings.warm = skip  # type: ignore[assignment]
    run_worker(Settings.from_env(), burst=False)


def _rq_worker_run(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection[Any], jobs: int, warm: bool
) -> dict[str, Any]:
    sids = [_session(r, pg, f"bench-{secrets.token_hex(4)}") for _ in range(jobs)]
    env = {**os.environ, "REDIS_URL": settings.redis_url or "",
           "DATABASE_URL": settings.database_url or "", "AUTH_SECRET": settings.auth_secret or "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    # rq logs every job to stdout, which would bury the tables.
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-worker", "warm" if warm else "cold"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    try:
        while not Worker.all(connection=r):  # registered: the warm call (if any) is done
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}")
            time.sleep(0.05)
        ready = time.perf_counter() - started
        cpu0 = _worker_cpu_seconds(proc.pid)
        q = Queue("memory", connection=r)
        latency, in_horse, inserted = [], [], 0
        for sid in sids:
            assert enqueue_extraction(r, sid)
            jid = job_ids(sid)[0]
            while True:
                job = q.fetch_job(jid)
                status = job.get_status(refresh=False) if job is not None else None
                if status in (JobStatus.FINISHED, JobStatus.FAILED):
                    break
                time.sleep(0.01)
            assert job is not None and status == JobStatus.FINISHED, f"{jid}: {status}"
            assert job.enqueued_at and job.started_at and job.ended_at
            latency.append((job.ended_at - job.enqueued_at).total_seconds())
            in_horse.append((job.ended_at - job.started_at).total_seconds())
            inserted += int((job.return_value() or {}).get("inserted", 0))
        cpu = _worker_cpu_seconds(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)  # warm shutdown of the worker this bench started
        proc.wait(timeout=60)
    return {
        "worker": "warm before fork (run_worker)" if warm else "nothing loaded before fork",
        "worker ready s": ready, "jobs": jobs,
        "p50 ms": percentile(latency, 50) * 1000, "p95 ms": percentile(latency, 95) * 1000,
        "in horse p50 ms": percentile(in_horse, 50) * 1000,
        "CPU ms/job": cpu / jobs * 1000, "facts inserted": inserted,
    }


def rq_extraction(jobs: int, cold_jobs: int) -> list[dict[str, Any]]:
    env = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="bench-memory-rq-") as tmp:
        base = dataclasses.replace(env, data_dir=Path(tmp))
        stack = EmbeddedStack(base, redis_port=free_port())
        settings = stack.start()
        try:
            prepare(settings)
            r = redis.Redis.from_url(settings.redis_url or "")
            with psycopg.connect(settings.database_url or "", autocommit=True) as pg:
                rows = [_rq_worker_run(settings, r, pg, jobs, warm=True),
                        _rq_worker_run(settings, r, pg, cold_jobs, warm=False)]
            r.close()
        finally:
            stack.stop()
    return rows


def _hammer(url: str, sid: str, seconds: float, naive: bool, out: Any) -> None:
    r = redis.Redis.from_url(url)
    lock, holders = keys.memory_lock(sid), f"bench-holders:{sid}"
    attempts = acquired = overlaps = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        token = secrets.token_hex(8)
        attempts += 1
        if naive:
            got = r.get(lock) is None and bool(r.set(lock, token, px=5000))
        else:
            got = scripts.run(r, scripts.acquire_lock(sid, token, 5000)) == 1
        if not got:
            continue
        acquired += 1
        if int(r.incr(holders)) > 1:
            overlaps += 1
        r.decr(holders)
        if naive:
            r.delete(lock)
        else:
            scripts.run(r, scripts.release_lock(sid, token))
    out.put((attempts, acquired, overlaps))
    r.close()


def contention(procs: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with bench_redis() as r:
        kw = r.connection_pool.connection_kwargs
        conn_url = os.environ.get("REDIS_URL") or f"redis://{kw['host']}:{kw['port']}/0"
        for naive in (False, True):
            sid = keys.new_session_id()
            ctx = mp.get_context("fork")
            out = ctx.Queue()
            ps = [ctx.Process(target=_hammer, args=(conn_url, sid, seconds, naive, out))
                  for _ in range(procs)]
            for p in ps:
                p.start()
            results = [out.get() for _ in ps]
            for p in ps:
                p.join()
            attempts = sum(a for a, _, _ in results)
            acquired = sum(b for _, b, _ in results)
            rows.append({
                "lock": "naive GET then SET" if naive else "acquire_lock / release_lock (Lua)",
                "processes": procs, "seconds": seconds,
                "attempts/s": attempts / seconds, "acquisitions/s": acquired / seconds,
                "overlaps": sum(c for _, _, c in results),
            })
            r.delete(keys.memory_lock(sid), f"bench-holders:{sid}")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])

    def cell(v: Any) -> str:
        return f"{v:,.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=60)
    ap.add_argument("--procs", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rq-jobs", type=int, default=20,
                    help="jobs through the worker that warms before fork")
    ap.add_argument("--cold-jobs", type=int, default=20,
                    help="jobs through the worker with nothing loaded before fork")
    ap.add_argument("--only", choices=("inprocess", "rq", "lock"))
    ap.add_argument("--serve-worker", choices=("warm", "cold"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_worker:
        serve_worker(warm=args.serve_worker == "warm")
        return
    if args.only in (None, "inprocess"):
        print("## Extraction jobs (offline extractor, in-process)\n")
        print(table(extraction(args.sessions)))
    if args.only in (None, "rq"):
        print("\n## Extraction jobs through a real rq worker (forks a horse per job)\n")
        print(table(rq_extraction(args.rq_jobs, args.cold_jobs)))
    if args.only not in (None, "lock"):
        return
    print(f"\n## Lock under contention ({args.procs} processes, one session)\n")
    print(table(contention(args.procs, args.seconds)))


if __name__ == "__main__":
    main()
