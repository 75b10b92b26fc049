"""Memory workers: extraction throughput, and the Lua lock under contention.

    .venv/bin/python bench/memory_worker.py [--sessions 60] [--procs 16] [--seconds 4]

1. Extraction: N prepared sessions (two turns each, two facts), one
   `run_extraction` per session in-process with the offline extractor and the
   shared embedding model; then the same N jobs again, which find no delta.
   Needs PostgreSQL: REDIS_URL/DATABASE_URL when set, else an embedded stack in
   a temporary folder.
2. Lock contention: P processes hammer `acquire_lock` / `release_lock` on one
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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
import redis

from app.embeddings import shared_embedder
from app.memory import RuleExtractor
from app.sessions import messages
from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stack.embedded import EmbeddedStack, free_port
from app.stores import keys, scripts
from bench._redis import bench_redis, percentile
from workers.memory_job import run_extraction

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
    args = ap.parse_args()
    print("## Extraction jobs (offline extractor, in-process)\n")
    print(table(extraction(args.sessions)))
    print(f"\n## Lock under contention ({args.procs} processes, one session)\n")
    print(table(contention(args.procs, args.seconds)))


if __name__ == "__main__":
    main()
