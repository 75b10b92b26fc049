"""N concurrent chats over SSE against a real uvicorn on loopback (offline provider).

    .venv/bin/python bench/sse_load.py [--concurrency 50 200 500] [--pace-ms 10]
                                       [--coalesce-ms 0 25] [--clients lean httpx]
                                       [--protocol native responses]

Each simulated user creates a session and sends one question; the offline
provider calls kb_search and streams a cited answer at a fixed token pace. We
print turns/s, time to first event (p50/p99), errors, the app's and the load
generator's CPU per turn (from /proc), and where a turn's time goes, each
column named for what it is. The load generator is `bench._sse_client` (bare
asyncio streams) by default; `--clients lean httpx` runs httpx's client too,
side by side: on two shared cores httpx's own CPU per event is what saturates
the machine first. `--protocol native responses` asks the same questions through
both faces, the native route (`POST /v1/sessions/{id}/messages`) and the
OpenAI-compatible one (`POST /v1/responses`, streamed), their rounds interleaved
against the same server so both see the same machine; one reader
(`bench._stack.TurnOutcome.on_event`) counts both streams.

- inter-event gap: the time between two consecutive events of one stream (ping
  comments aside), pooled over every stream of the level, from the stream's first
  event (the Responses face's `response.created` and `response.in_progress` come
  before the turn has done anything: their wait is the first event's);
- text chars/s: characters of the text deltas received (`message.delta` /
  `response.output_text.delta`), all streams over the level's wall time, and
  one stream's from its first text delta to its last (p50);

- client turn: POST sent to the stream closed, as the client sees it (the stream
  closes after `message.done`; the turn's persistence to PostgreSQL follows it);
- model: the server's `timing.model_ms`, waiting on the (paced) provider;
- tool calls: the server's `timing.tool_ms`, the whole `kb_search` call:
  query embedding, cache lookup, the tool on a miss, the cache store;
- rest: client turn minus model, tool calls and memory recall: auth, session
  load, appends, event log, persistence, SSE writes, loopback and parsing;
- server before done: the server's own `overhead_ms`, taken when it builds
  `message.done` (before persistence and the SSE writes, so narrower than rest);

and from the app's /metrics around each round (app.ops.metrics), per turn:
- waited for Redis / PostgreSQL / embedder: time commands waited for a free
  connection of a full Redis pool, time spent getting a PostgreSQL connection
  (the turn's persist after `message.done` and the chat's session creation
  included), time its texts waited for an embedding batch;
- event loop lag: how late the loop ran a 250 ms timer, mean and p99 (the upper
  bound of its histogram bucket), the level's last round;
- app peak RSS: the app process's VmHWM after the level.
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
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _sse_client as lean
from bench._redis import percentile
from bench._stack import FACES, NATIVE, Face, cpu_seconds, read_turn, servers, stores, token

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
    gaps: list[float] = field(default_factory=list)
    stream_rate: list[float] = field(default_factory=list)  # one stream's text chars/s
    errors: list[str] = field(default_factory=list)
    turns: int = 0
    text_chars: int = 0

    def add(self, other: Result) -> None:
        for name in ("ttfe", "client", "model", "tools", "rest", "overhead", "gaps",
                     "stream_rate", "errors"):
            getattr(self, name).extend(getattr(other, name))
        self.turns += other.turns
        self.text_chars += other.text_chars


async def chat(client: httpx.AsyncClient | None, base: str, i: int, out: Result,
               face: Face = NATIVE) -> None:
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
    turn = await (lean.post_turn(base, sid, h, question, face) if client is None
                  else read_turn(client, base, sid, h, question, face))
    out.gaps.extend(turn.gaps_ms)
    out.text_chars += turn.text_chars
    if turn.error is not None:
        out.errors.append(turn.error)
        return
    assert turn.done is not None and turn.ttfe_ms is not None
    out.ttfe.append(turn.ttfe_ms)
    out.client.append(turn.total_ms)
    out.turns += 1
    if turn.text_span_ms > 0:
        out.stream_rate.append(turn.text_chars * 1000 / turn.text_span_ms)
    if "timing" not in turn.done:
        return  # the Responses face's response carries no server timing
    timing: dict[str, float] = turn.done["timing"]  # type: ignore[assignment]
    out.model.append(timing["model_ms"])
    out.tools.append(timing["tool_ms"])
    out.rest.append(turn.total_ms - timing["model_ms"] - timing["tool_ms"]
                    - timing.get("recall_ms", 0.0))
    out.overhead.append(timing["overhead_ms"])


async def run_level(base: str, n: int, client_kind: str = "httpx",
                    face: Face = NATIVE) -> tuple[Result, float]:
    out = Result()
    if client_kind == "lean":
        started = time.perf_counter()
        await asyncio.gather(*(chat(None, base, i, out, face) for i in range(n)))
        return out, time.perf_counter() - started
    limits = httpx.Limits(max_connections=n * 2, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(chat(client, base, i, out, face) for i in range(n)))
        return out, time.perf_counter() - started


WAITS = {  # /metrics sample -> column: where a turn waited rather than worked
    "backbone_redis_pool_wait_seconds_total": "redis",
    "backbone_pg_pool_wait_seconds_total": "pg",
    "backbone_embed_wait_seconds_total": "embed",
    "backbone_event_loop_lag_seconds_sum": "lag_sum",
    "backbone_event_loop_lag_seconds_count": "lag_count",
}


def scrape(url: str) -> dict[str, float]:
    """The app's wait counters (summed over labels) and its loop-lag histogram buckets."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = dict.fromkeys(WAITS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WAITS:
                out[WAITS[sample.name]] += sample.value
            elif sample.name == "backbone_event_loop_lag_seconds_bucket":
                out[f"le {sample.labels['le']}"] = sample.value
    return out


def lag_p99_ms(before: dict[str, float], after: dict[str, float]) -> float:
    """The loop-lag histogram's p99 over the level, as the upper bound of its bucket."""
    bounds = sorted((float(k[3:]), after[k] - before.get(k, 0.0))
                    for k in after if k.startswith("le "))
    total = bounds[-1][1] if bounds else 0.0
    for bound, count in bounds:
        if total and count >= 0.99 * total:
            return bound * 1000
    return float("nan")


def peak_rss_mb(pids: list[int]) -> float:
    """The app processes' peak resident set so far (VmHWM), summed."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


@dataclass
class Level:
    """One protocol's rounds at one level, pooled: their samples, wall time and CPU."""

    out: Result = field(default_factory=Result)
    wall: float = 0.0
    cpu: float = 0.0  # the app's
    gen: float = 0.0  # the load generator's
    waits: dict[str, float] = field(default_factory=dict)  # counter deltas (scrape)
    lag_p99: float = 0.0  # ms, the level's last round
    rss_mb: float = 0.0  # the app's peak RSS after the level


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[50, 200, 500])
    p.add_argument("--pace-ms", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="runs per level, samples pooled")
    p.add_argument("--coalesce-ms", type=int, nargs="+", default=[25],
                   help="STREAM_COALESCE_MS values, one fresh server each (0: a delta per token)")
    p.add_argument("--clients", nargs="+", default=["lean"], choices=["lean", "httpx"],
                   help="load generator: lean (bare asyncio streams) and/or httpx, side by side")
    p.add_argument("--protocol", nargs="+", default=["native"], choices=sorted(FACES),
                   help="native route and/or the Responses face, rounds interleaved")
    args = p.parse_args()
    faces = [FACES[name] for name in args.protocol]
    streams = max(256, *args.concurrency)
    rows: list[tuple[int, int, str, str, Level]] = []
    load_before = os.getloadavg()[0]
    with stores() as settings:
        for coalesce in args.coalesce_ms:
            pids: list[int] = []
            # One node holds every stream of the level: above MAX_STREAMS_PER_NODE (256) the
            # rest would be refused with 429 too_many_streams, not measured.
            env = {"OFFLINE_TOKEN_DELAY_MS": str(args.pace_ms), "RATE_LIMIT_SESSIONS": "100000",
                   "STREAM_COALESCE_MS": str(coalesce), "MAX_STREAMS_PER_NODE": str(streams)}
            with servers(settings, 1, pids=pids, **env) as urls:
                for face in faces:  # warm up: model load, first connections
                    asyncio.run(run_level(urls[0], 5, face=face))
                for n, kind in itertools.product(args.concurrency, args.clients):
                    level = {face.name: Level() for face in faces}
                    for _, face in itertools.product(range(args.rounds), faces):
                        scraped = scrape(urls[0])
                        cpu_before = cpu_seconds(pids)
                        gen_before = cpu_seconds([os.getpid()])
                        out, wall = asyncio.run(run_level(urls[0], n, kind, face))
                        row = level[face.name]
                        row.cpu += cpu_seconds(pids) - cpu_before
                        row.gen += cpu_seconds([os.getpid()]) - gen_before
                        after = scrape(urls[0])
                        for name in WAITS.values():
                            row.waits[name] = (row.waits.get(name, 0.0)
                                               + after[name] - scraped[name])
                        row.lag_p99 = lag_p99_ms(scraped, after)
                        row.rss_mb = peak_rss_mb(pids)
                        row.out.add(out)
                        row.wall += wall
                    rows.extend((coalesce, n, kind, name, row) for name, row in level.items())
    print(f"one uvicorn process (MAX_STREAMS_PER_NODE {streams}), offline provider at "
          f"{args.pace_ms} ms/token, loopback, 2 cores, {args.rounds} rounds per level, "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} at the end\n")
    print("| coalesce ms | concurrent chats | client | protocol | turns | turns/s "
          "| app CPU ms/turn | load generator CPU ms/turn "
          "| first event p50 / p99 ms | inter-event gap p50 / p99 ms "
          "| text chars/s, all streams | text chars/s, one stream p50 "
          "| errors | client turn p50 / p99 ms | model p50 ms | tool calls p50 ms "
          "| rest p50 / p99 ms | server before done p50 / p99 ms "
          "| waited per turn for Redis / PostgreSQL / embedder, ms "
          "| event loop lag mean / p99 ms | app peak RSS MB |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
          "|---:|---:|---:|---:|---:|")

    def pair(xs: list[float]) -> str:
        return f"{percentile(xs, 50):.1f} / {percentile(xs, 99):.1f}" if xs else "n/a"

    def p50(xs: list[float]) -> str:
        return f"{percentile(xs, 50):.1f}" if xs else "n/a"

    for coalesce, n, kind, protocol, row in rows:
        out, wall, turns = row.out, row.wall, max(row.out.turns, 1)
        print(f"| {coalesce} | {n} | {kind} | {protocol} | {out.turns} | {out.turns / wall:.1f} "
              f"| {row.cpu * 1000 / turns:.1f} | {row.gen * 1000 / turns:.1f} "
              f"| {pair(out.ttfe)} | {pair(out.gaps)} | {out.text_chars / wall:.0f} "
              f"| {p50(out.stream_rate)} | {len(out.errors)} "
              f"| {pair(out.client)} | {p50(out.model)} "
              f"| {p50(out.tools)} | {pair(out.rest)} | {pair(out.overhead)} "
              f"| {row.waits['redis'] * 1000 / turns:.1f} / {row.waits['pg'] * 1000 / turns:.1f}"
              f" / {row.waits['embed'] * 1000 / turns:.1f} "
              f"| {row.waits['lag_sum'] * 1000 / max(row.waits['lag_count'], 1):.1f}"
              f" / {row.lag_p99:.0f} | {row.rss_mb:.0f} |")
        if out.errors:
            print(f"  errors at {n}: {sorted(set(out.errors))}")


if __name__ == "__main__":
    main()
