"""N concurrent chats over SSE against a real uvicorn on loopback (offline provider).

    .venv/bin/python bench/sse_load.py [--concurrency 50 200 500] [--pace-ms 10]
                                       [--coalesce-ms 0 25] [--clients lean httpx]

Each simulated user creates a session and sends one question; the offline
provider calls kb_search and streams a cited answer at a fixed token pace. We
print turns/s, time to first event (p50/p99), errors, the app's and the load
generator's CPU per turn (from /proc), and where a turn's time goes, each
column named for what it is. The load generator is `bench._sse_client` (bare
asyncio streams) by default; `--clients lean httpx` runs httpx's client too,
side by side: on two shared cores httpx's own CPU per event is what saturates
the machine first.

- client turn: POST sent to the stream closed, as the client sees it (this
  includes the persistence to PostgreSQL, which ends the stream);
- model: the server's `timing.model_ms`, waiting on the (paced) provider;
- tool calls: the server's `timing.tool_ms`, the whole `kb_search` call:
  query embedding, cache lookup, the tool on a miss, the cache store;
- rest: client turn minus model, tool calls and memory recall: auth, session
  load, appends, event log, persistence, SSE writes, loopback and parsing;
- server before done: the server's own `overhead_ms`, taken when it builds
  `message.done` (before persistence and the SSE writes, so narrower than rest).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _sse_client as lean
from bench._redis import percentile
from bench._stack import cpu_seconds, post_turn, servers, stores, token

QUESTIONS = [
    "How does AOF persistence work?", "What is an HNSW index?", "How do rq workers retry jobs?",
    "What does MVCC mean in PostgreSQL?", "How do Server-Sent Events reconnect?",
    "When does Redis evict keys?", "Why use Lua scripts in Redis?", "What is semantic caching?",
]


@dataclass
class Result:
    ttfe: list[float] = field(default_factory=list)
    client: list[float] = field(default_factory=list)
    model: list[float] = field(default_factory=list)
    tools: list[float] = field(default_factory=list)
    rest: list[float] = field(default_factory=list)
    overhead: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turns: int = 0


async def chat(client: httpx.AsyncClient | None, base: str, i: int, out: Result) -> None:
    """One chat: with `client` None through the lean client (`bench._sse_client`)."""
    h = {"Authorization": f"Bearer {token(f'load-{i}')}"}
    try:
        if client is None:
            sid = await lean.create_session(base, h)
        else:
            sid = (await client.post(f"{base}/v1/sessions", headers=h)).json()["id"]
    except (httpx.HTTPError, OSError, RuntimeError) as e:
        out.errors.append(type(e).__name__)
        return
    question = QUESTIONS[i % len(QUESTIONS)]
    turn = await (lean.post_turn(base, sid, h, question) if client is None
                  else post_turn(client, base, sid, h, question))
    if turn.error is not None:
        out.errors.append(turn.error)
        return
    assert turn.done is not None and turn.ttfe_ms is not None
    out.ttfe.append(turn.ttfe_ms)
    timing: dict[str, float] = turn.done["timing"]  # type: ignore[assignment]
    out.client.append(turn.total_ms)
    out.model.append(timing["model_ms"])
    out.tools.append(timing["tool_ms"])
    out.rest.append(turn.total_ms - timing["model_ms"] - timing["tool_ms"]
                    - timing.get("recall_ms", 0.0))
    out.overhead.append(timing["overhead_ms"])
    out.turns += 1


async def run_level(base: str, n: int, client_kind: str = "httpx") -> tuple[Result, float]:
    out = Result()
    if client_kind == "lean":
        started = time.perf_counter()
        await asyncio.gather(*(chat(None, base, i, out) for i in range(n)))
        return out, time.perf_counter() - started
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
    p.add_argument("--coalesce-ms", type=int, nargs="+", default=[25],
                   help="STREAM_COALESCE_MS values, one fresh server each (0: a delta per token)")
    p.add_argument("--clients", nargs="+", default=["lean"], choices=["lean", "httpx"],
                   help="load generator: lean (bare asyncio streams) and/or httpx, side by side")
    args = p.parse_args()
    rows = []
    with stores() as settings:
        for coalesce in args.coalesce_ms:
            pids: list[int] = []
            env = {"OFFLINE_TOKEN_DELAY_MS": str(args.pace_ms), "RATE_LIMIT_SESSIONS": "100000",
                   "STREAM_COALESCE_MS": str(coalesce)}
            with servers(settings, 1, pids=pids, **env) as urls:
                asyncio.run(run_level(urls[0], 5))  # warm up: model load, first connections
                for n, kind in itertools.product(args.concurrency, args.clients):
                    pooled, walls = Result(), 0.0
                    cpu_before = cpu_seconds(pids)
                    gen_before = cpu_seconds([os.getpid()])
                    for _ in range(args.rounds):
                        out, wall = asyncio.run(run_level(urls[0], n, kind))
                        for name in ("ttfe", "client", "model", "tools", "rest", "overhead",
                                     "errors"):
                            getattr(pooled, name).extend(getattr(out, name))
                        pooled.turns += out.turns
                        walls += wall
                    rows.append((coalesce, n, kind, pooled, walls, cpu_seconds(pids) - cpu_before,
                                 cpu_seconds([os.getpid()]) - gen_before))
    print(f"one uvicorn process, offline provider at {args.pace_ms} ms/token, loopback, 2 cores, "
          f"{args.rounds} rounds per level, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| coalesce ms | concurrent chats | client | turns | turns/s | app CPU ms/turn "
          "| load generator CPU ms/turn "
          "| first event p50 / p99 ms "
          "| errors | client turn p50 / p99 ms | model p50 ms | tool calls p50 ms "
          "| rest p50 / p99 ms | server before done p50 / p99 ms |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def pair(xs: list[float]) -> str:
        return f"{percentile(xs, 50):.1f} / {percentile(xs, 99):.1f}"

    for coalesce, n, kind, out, wall, cpu, gen in rows:
        print(f"| {coalesce} | {n} | {kind} | {out.turns} | {out.turns / wall:.1f} "
              f"| {cpu * 1000 / max(out.turns, 1):.1f} | {gen * 1000 / max(out.turns, 1):.1f} "
              f"| {pair(out.ttfe)} | {len(out.errors)} "
              f"| {pair(out.client)} | {percentile(out.model, 50):.1f} "
              f"| {percentile(out.tools, 50):.1f} | {pair(out.rest)} | {pair(out.overhead)} |")
        if out.errors:
            print(f"  errors at {n}: {sorted(set(out.errors))}")


if __name__ == "__main__":
    main()
