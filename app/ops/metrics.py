"""Every Prometheus metric of the backbone, defined here once.

Two kinds:

- **Process metrics** (turns, latencies, events, memory jobs, audit overlap) are
  prometheus-client counters and histograms, updated where things happen. With
  `PROMETHEUS_MULTIPROC_DIR` set (`backbone up` sets it to `<data_dir>/prometheus`
  for the app and the worker, and empties it at start), every process, rq's
  forked work horses included, writes its own file there and `/metrics` sums
  them; without it, each process counts for itself (one app process: fine).
- **Shared state read at scrape time** (cache counters, persist lag, rq queue
  depths) comes from Redis, so it is the same on every node and counts what
  every process and worker did: the cache's `cache-stats:<tool>` hashes are
  already the cluster-wide counters, so the cache path pays nothing extra.
  Only bounded keys are read (the tools from the registry and `cache-tools`,
  never a SCAN), so a scrape costs the same at any keyspace size.

The "Metrics" table of docs/operations.md lists every name below.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aredis
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from app.stores import keys

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CACHE_COUNTERS = keys.CACHE_STATS_COUNTERS
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TURNS = Counter("backbone_turns", "Chat turns ended, by outcome (done, an error code, "
                "or cancelled: the client went away)", ["outcome"])
FIRST_EVENT = Histogram("backbone_turn_first_event_seconds",
                        "From the start of a turn to its first SSE event", buckets=_LATENCY)
TURN_SECONDS = Histogram("backbone_turn_seconds", "Whole turn, start to its last event",
                         buckets=_LATENCY)
EVENTS = Counter("backbone_events_sent", "SSE events produced by turns, by event (a turn's "
                 "are added when it ends)", ["event"])
AUDIT_OVERLAP = Histogram("backbone_cache_audit_overlap",
                          "Overlap of a cached result with the fresh one, per audit",
                          ["tool"], buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
MEMORY_JOBS = Counter("backbone_memory_jobs", "Memory-extraction jobs, by result "
                      "(done, empty, locked: another extractor held the lock, deleted, "
                      "no_session, lock_lost, failed)", ["result"])
MEMORY_JOB_SECONDS = Histogram("backbone_memory_job_seconds", "Memory-extraction job duration",
                               buckets=_LATENCY)
MEMORY_DELTA = Histogram("backbone_memory_delta_messages",
                         "Messages mined per extraction (the delta after the cursor)",
                         buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128))
STREAMS_OPEN = Gauge("backbone_streams_open", "Event streams (live turns and resumes) "
                     "open on this node, summed over live processes", multiprocess_mode="livesum")
STREAMS_REFUSED = Counter("backbone_streams_refused", "Event streams refused with "
                          "429 too_many_streams, by the limit that refused them (user, node)",
                          ["limit"])
MEMORY_FACTS_DROPPED = Counter("backbone_memory_facts_dropped",
                               "Facts an extraction found beyond MEMORY_MAX_FACTS_PER_JOB, "
                               "dropped (the lowest ranked)")
MEMORY_EVICTED = Counter("backbone_memory_evicted",
                         "Memories deleted to keep a user within MEMORY_MAX_PER_USER "
                         "(the least recently recalled or updated)")
# Where a request waits rather than works (bench/sse_load.py prints them per turn).
REDIS_POOL_WAIT = Counter("backbone_redis_pool_wait_seconds",
                          "Time commands waited for a free connection of a full Redis pool, "
                          "by pool (requests, readers)", ["pool"])
PG_POOL_WAIT = Counter("backbone_pg_pool_wait_seconds",
                       "Time spent getting a connection from the PostgreSQL pool")
EMBED_WAIT = Counter("backbone_embed_wait_seconds",
                     "Time texts waited in the embedding queue for their batch to start")
LOOP_LAG = Histogram("backbone_event_loop_lag_seconds",
                     "How late the event loop ran a timer it was given (every "
                     "LOOP_LAG_INTERVAL seconds): the wait of everything ready to run",
                     buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
LOOP_LAG_INTERVAL = 0.25


async def watch_loop_lag() -> None:
    """Run for the app's life: observe how late each timer of ours fires."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LOOP_LAG_INTERVAL
        await asyncio.sleep(LOOP_LAG_INTERVAL)
        LOOP_LAG.observe(max(loop.time() - due, 0.0))


UNREPLICATED = Counter("backbone_session_unreplicated_appends",
                       "Session appends acknowledged although WAIT saw fewer replicas than "
                       "SESSION_REDIS_WAIT_REPLICAS within SESSION_REDIS_WAIT_TIMEOUT_MS")


def fresh_multiproc_dir(data_dir: Path) -> Path:
    """`<data_dir>/prometheus`, emptied: counters start from zero with each `backbone up`
    (Prometheus handles the reset), and files of dead pids do not pile up."""
    path = data_dir / "prometheus"
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("*.db"):
        old.unlink()
    return path


@dataclass
class TurnWatch:
    """Times and counts one turn: `sent` on each event, `finish` once at the end."""

    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last_event: str | None = None
    error_code: str | None = None
    # Events counted here and added to EVENTS once, at the end: a labelled inc() per
    # event (a lock and a lookup each, ~60 a turn) for a counter read at scrape time.
    counts: dict[str, int] = field(default_factory=dict)

    def sent(self, event: Any) -> Any:
        name = str(event.event)
        if self.first is None:
            self.first = time.perf_counter()
            FIRST_EVENT.observe(self.first - self.started)
        self.counts[name] = self.counts.get(name, 0) + 1
        self.last_event = name
        if name == "error":
            self.error_code = str(event.data.get("code", "error"))
        return event

    def finish(self) -> None:
        for name, n in self.counts.items():
            EVENTS.labels(name).inc(n)
        self.counts.clear()
        outcome = {"message.done": "done", "error": self.error_code or "error"}.get(
            self.last_event or "", "cancelled")
        TURNS.labels(outcome).inc()
        TURN_SECONDS.observe(time.perf_counter() - self.started)


def memory_job_done(result: dict[str, Any] | None, seconds: float) -> None:
    """Count one extraction job from what `run_extraction` returned (None: it raised)."""
    if result is None:
        outcome = "failed"
    elif "skipped" in result:
        outcome = str(result["skipped"])
    else:
        outcome = "done" if result.get("delta") else "empty"
    MEMORY_JOBS.labels(outcome).inc()
    MEMORY_JOB_SECONDS.observe(seconds)
    if result is not None and "delta" in result and outcome != "lock_lost":
        MEMORY_DELTA.observe(int(result["delta"]))
    if result is not None:
        if result.get("dropped"):
            MEMORY_FACTS_DROPPED.inc(int(result["dropped"]))
        if result.get("evicted"):
            MEMORY_EVICTED.inc(int(result["evicted"]))


# -- read at scrape time ------------------------------------------------------


def _s(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


@dataclass
class SharedState:
    cache: dict[str, dict[str, float]]  # tool -> counter -> value
    oldest_unpersisted_ms: float | None
    queues: dict[str, tuple[int, int]]  # queue -> (waiting, failed)
    now_ms: float
    memory_due: int = 0  # sessions marked due for extraction, not yet queued


async def read_shared(
    client: aredis.Redis, sessions: aredis.Redis | None = None, tools: Iterable[str] = (),
) -> SharedState:
    """One read of what every process shares: cache stats (of `tools`, the registry's,
    and of every tool in `cache-tools`), unpersisted marks (on the session plane,
    `sessions`, when it is apart), rq queues. Bounded keys only, never a SCAN: three
    round trips whatever the size of the keyspace."""
    pipe = client.pipeline(transaction=False)
    pipe.smembers(keys.CACHE_TOOLS)
    pipe.smembers("rq:queues")
    listed, queue_keys = await pipe.execute()
    names = sorted(t for t in {_s(t) for t in listed} | set(tools) if keys.TOOL_NAME.fullmatch(t))
    queue_names = sorted(_s(q).removeprefix("rq:queue:") for q in queue_keys)
    pipe = client.pipeline(transaction=False)
    for tool in names:
        pipe.hgetall(keys.cache_stats(tool))
    for name in queue_names:
        pipe.llen(f"rq:queue:{name}")
        pipe.zcard(f"rq:failed:{name}")
    pipe.zcard(keys.MEMORY_DUE)
    replies = await pipe.execute()
    cache = {tool: {_s(k): float(v) for k, v in fields.items()}
             for tool, fields in zip(names, replies, strict=False) if fields}
    counts, due = replies[len(names):-1], replies[-1]
    queues = {n: (int(counts[2 * i]), int(counts[2 * i + 1])) for i, n in enumerate(queue_names)}
    # The oldest mark over every shard: one small read each, in one round trip.
    marks = sessions if sessions is not None else client
    pipe = marks.pipeline(transaction=False)
    for shard in keys.unpersisted_shards():
        pipe.zrange(shard, 0, 0, withscores=True)
    firsts = await pipe.execute()
    oldest = min((f[0] for f in firsts if f), key=lambda m: float(m[1]), default=None)
    return SharedState(cache, float(oldest[1]) if oldest else None, queues,
                       time.time() * 1000, int(due))


class _SharedCollector:
    def __init__(self, state: SharedState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        families = {name: CounterMetricFamily(f"backbone_cache_{name}",
                                              f"Semantic-cache {name} (cache-stats:<tool>)",
                                              labels=["tool"]) for name in CACHE_COUNTERS}
        for tool, fields in sorted(s.cache.items()):
            for name in CACHE_COUNTERS:
                families[name].add_metric([tool], fields.get(name, 0.0))
        yield from families.values()
        lag = GaugeMetricFamily("backbone_persist_lag_seconds", "Age of the oldest "
                                "sessions:unpersisted mark (0: everything is in PostgreSQL)")
        lag.add_metric([], 0.0 if s.oldest_unpersisted_ms is None
                       else max(0.0, (s.now_ms - s.oldest_unpersisted_ms) / 1000))
        yield lag
        depth = GaugeMetricFamily("backbone_rq_queue_jobs", "Jobs waiting in an rq queue",
                                  labels=["queue"])
        failed = GaugeMetricFamily("backbone_rq_failed_jobs", "Jobs in an rq queue's failed "
                                   "registry", labels=["queue"])
        for name, (waiting, nfailed) in s.queues.items():
            depth.add_metric([name], waiting)
            failed.add_metric([name], nfailed)
        yield depth
        yield failed
        due = GaugeMetricFamily("backbone_memory_due_sessions", "Sessions whose last turn "
                                "awaits a worker's dispatch to the memory queue (memory-due)")
        due.add_metric([], s.memory_due)
        yield due


def _own_registry() -> CollectorRegistry:
    if os.environ.get(MULTIPROC_ENV):
        own = CollectorRegistry()
        MultiProcessCollector(own)  # type: ignore[no-untyped-call]
        return own
    return REGISTRY  # this process only, with its process and platform metrics


def serve_own(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve this process's metrics (every process's with PROMETHEUS_MULTIPROC_DIR) on
    `port` from a daemon thread: the worker's WORKER_METRICS_PORT. Returns the server."""
    server, _thread = start_http_server(port, addr=addr, registry=_own_registry())
    return server


def render(state: SharedState) -> tuple[bytes, str]:
    """The exposition text: this process's (or every process's) metrics plus `state`."""
    shared = CollectorRegistry(auto_describe=True)
    shared.register(_SharedCollector(state))
    return generate_latest(_own_registry()) + generate_latest(shared), CONTENT_TYPE_LATEST
