"""N concurrent chats over SSE against a real uvicorn on loopback (offline provider).

    .venv/bin/python bench/sse_load.py [--concurrency 50 200 500] [--pace-ms 10]

Each simulated user creates a session and sends one question; the offline
provider calls kb_search and streams a cited answer at a fixed token pace. We
print turns/s, time to first event (p50/p99), errors, and the app's own
overhead per turn as the server measured it in `message.done` (wall time minus
model time minus tool time: event logging, appends, persistence, SSE).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._redis import percentile
from bench._stack import post_turn, servers, stores, token

QUESTIONS = [
    "How does AOF persistence work?", "What is an HNSW index?", "How do rq workers retry jobs?",
    "What does MVCC mean in PostgreSQL?", "How do Server-Sent Events reconnect?",
    "When does Redis evict keys?", "Why use Lua scripts in Redis?", "What is semantic caching?",
]


@dataclass
class Result:
    ttfe: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turns: int = 0


async def chat(client: httpx.AsyncClient, base: str, i: int, out: Result) -> None:
    h = {"Authorization": f"Bearer {token(f'load-{i}')}"}
    try:
        sid = (await client.post(f"{base}/v1/sessions", headers=h)).json()["id"]
    except httpx.HTTPError as e:
        out.errors.append(type(e).__name__)
        return
    turn = await post_turn(client, base, sid, h, QUESTIONS[i % len(QUESTIONS)])
    if turn.error is not None:
        out.errors.append(turn.error)
        return
    assert turn.done is not None and turn.ttfe_ms is not None
    out.ttfe.append(turn.ttfe_ms)
    out.overhead.append(turn.done["timing"]["overhead_ms"])  # type: ignore[index]
    out.turns += 1


async def run_level(base: str, n: int) -> tuple[Result, float]:
    out = Result()
    limits = httpx.Limits(max_connections=n * 2, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(chat(client, base, i, out) for i in range(n)))
        return out, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[50, 200, 500])
    p.add_argument("--pace-ms", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="runs per level, samples pooled")
    args = p.parse_args()
    rows = []
    with stores() as settings, servers(settings, OFFLINE_TOKEN_DELAY_MS=str(args.pace_ms)) as urls:
        asyncio.run(run_level(urls[0], 5))  # warm up: model load, first connections
        for n in args.concurrency:
            pooled, walls = Result(), 0.0
            for _ in range(args.rounds):
                out, wall = asyncio.run(run_level(urls[0], n))
                pooled.ttfe += out.ttfe
                pooled.overhead += out.overhead
                pooled.errors += out.errors
                pooled.turns += out.turns
                walls += wall
            rows.append((n, pooled, walls))
    print(f"one uvicorn process, offline provider at {args.pace_ms} ms/token, loopback, 2 cores, "
          f"{args.rounds} rounds per level\n")
    print("| concurrent chats | turns | turns/s | first event p50 ms | first event p99 ms "
          "| errors | overhead p50 ms | overhead p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, out, wall in rows:
        print(f"| {n} | {out.turns} | {out.turns / wall:.1f} | {percentile(out.ttfe, 50):.1f} "
              f"| {percentile(out.ttfe, 99):.1f} | {len(out.errors)} "
              f"| {percentile(out.overhead, 50):.2f} | {percentile(out.overhead, 99):.2f} |")
        if out.errors:
            print(f"  errors at {n}: {sorted(set(out.errors))}")


if __name__ == "__main__":
    main()
