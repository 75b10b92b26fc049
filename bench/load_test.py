"""Bounded load test: N users chat for T seconds against two app processes and two
workers sharing one Redis and one PostgreSQL, then every message the clients were
acknowledged is counted in PostgreSQL.

    .venv/bin/python bench/load_test.py [--users 500] [--seconds 60] [--pace-ms 20]

Traffic goes only to loopback. Each user opens one session on one of the two
nodes (alternating) and sends questions back to back until the time is up,
each turn read to its `message.done`. Each `message.done` acknowledges one
stored message: its (session, seq, hash) is collected, exactly. After the run
(and one sweep interval) each acknowledged triple is looked up in PostgreSQL:
`lost` (absent, or another hash at that seq) must be 0. A missing seq 3 can no
longer hide behind a stored seq 4, as a per-session row count let it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._redis import percentile
from bench._stack import cpu_seconds, post_turn, servers, stores, token, workers
from bench.sse_load import QUESTIONS


@dataclass
class Run:
    ttfe: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    acked: set[tuple[str, int, str]] = field(default_factory=set)  # (sid, seq, hash)
    turns: int = 0


async def user_loop(client: httpx.AsyncClient, bases: list[str], i: int, until: float,
                    run: Run) -> None:
    base = bases[i % len(bases)]
    h = {"Authorization": f"Bearer {token(f'load-{i}')}"}
    try:
        sid = (await client.post(f"{base}/v1/sessions", headers=h)).json()["id"]
    except httpx.HTTPError as e:
        run.errors[type(e).__name__] = run.errors.get(type(e).__name__, 0) + 1
        return
    n = 0
    while time.monotonic() < until:
        turn = await post_turn(client, base, sid, h, QUESTIONS[(i + n) % len(QUESTIONS)])
        n += 1
        if turn.error is not None:
            run.errors[turn.error] = run.errors.get(turn.error, 0) + 1
            await asyncio.sleep(0.5)
            continue
        assert turn.done is not None and turn.ttfe_ms is not None
        run.turns += 1
        run.ttfe.append(turn.ttfe_ms)
        run.total.append(turn.total_ms)
        message: dict[str, object] = turn.done["message"]  # type: ignore[assignment]
        run.acked.add((sid, int(message["seq"]), str(message["hash"])))  # type: ignore[call-overload]


async def drive(bases: list[str], users: int, seconds: float) -> tuple[Run, float]:
    run = Run()
    limits = httpx.Limits(max_connections=users * 2, max_keepalive_connections=users)
    async with httpx.AsyncClient(timeout=180, limits=limits) as client:
        warm = Run()  # load each node's embedding model before the clock starts
        await asyncio.gather(*(user_loop(client, [b], 0, time.monotonic() + 0.1, warm)
                               for b in bases))
        started = time.monotonic()
        await asyncio.gather(*(user_loop(client, bases, i, started + seconds, run)
                               for i in range(users)))
        return run, time.monotonic() - started


def count_lost(database_url: str, acked: set[tuple[str, int, str]]) -> tuple[int, int]:
    """(acknowledged, lost): each acknowledged (sid, seq, hash) must be a row of
    `messages` with that very hash."""
    sids = sorted({sid for sid, _, _ in acked})
    with psycopg.connect(database_url) as conn:
        stored = {(sid, int(seq), str(h)) for sid, seq, h in conn.execute(
            "SELECT session_id, seq, hash FROM messages WHERE session_id = ANY(%s)",
            (sids,)).fetchall()}
    return len(acked), len(acked - stored)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--pace-ms", type=int, default=20)
    args = p.parse_args()
    env = {"OFFLINE_TOKEN_DELAY_MS": str(args.pace_ms), "RATE_LIMIT_MESSAGES": "100000",
           "RATE_LIMIT_SESSIONS": "100000", "SWEEP_INTERVAL_SECONDS": "5"}
    pids: list[int] = []
    with stores() as settings, servers(settings, 2, pids=pids, **env) as bases, \
            workers(settings, 2, **env):
        cpu_before = cpu_seconds(pids)
        run, wall = asyncio.run(drive(bases, args.users, args.seconds))
        cpu = cpu_seconds(pids) - cpu_before
        time.sleep(12)  # one sweep interval (5 s) + the 5 s quiet period, for anything left
        expected, lost = count_lost(settings.database_url or "", run.acked)
    print(f"{args.users} users for {args.seconds:.0f} s, 2 app processes + 2 workers, one Redis "
          f"and one PostgreSQL, offline provider at {args.pace_ms} ms/token, loopback, 2 cores\n")
    print("| turns | turns/s | app CPU ms/turn | first event p50 ms | p99 ms | turn p50 ms "
          "| p99 ms | errors | acknowledged (sid, seq) | lost |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {run.turns} | {run.turns / wall:.1f} | {cpu * 1000 / max(run.turns, 1):.1f} "
          f"| {percentile(run.ttfe, 50):.0f} "
          f"| {percentile(run.ttfe, 99):.0f} | {percentile(run.total, 50):.0f} "
          f"| {percentile(run.total, 99):.0f} | {sum(run.errors.values())} | {expected} "
          f"| {lost} |")
    if run.errors:
        print(f"\nerrors: {run.errors}")
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
