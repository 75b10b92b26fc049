"""CPU seconds per chat turn, split by process, for each configuration side by side.

    .venv/bin/python bench/turn_cpu.py [--turns 200] [--concurrency 20] [--pace-ms 10]
                                       [--backends onnx torch] [--worker-classes fork simple]
                                       [--coalesce-ms 0 25] [--protocol native responses]

One stack (stores from REDIS_URL / DATABASE_URL or embedded); for each
configuration (every combination of embedding backend, WORKER_CLASS and
STREAM_COALESCE_MS given) a fresh `backbone serve` and `backbone worker`. The
first turn after /readyz says 200 gives the warm-start `recall_ms`; then a few
warm-up turns, then N turns by `--concurrency` chats, each chat asking one
unique question after another (the offline provider calls kb_search and
streams at `--pace-ms` per token). Each process's CPU (utime + stime, plus
cutime + cstime of children it reaped: rq's work horses, PostgreSQL's
backends, Redis's rewrite forks) is read from /proc/<pid>/stat before and
after the N turns; for PostgreSQL the postmaster and every live child. The
load generator is this process. Stores on another machine show as n/a.
With WORKER_CLASS=simple there are no work horses: the jobs' CPU is the worker's row.

`--against DIR` measures instead the app's CPU per turn of this checkout and of
the checkout in DIR (`git worktree add /tmp/base <commit>`), both servers on the
same stores and driven at the same time by the same load, so a shared machine's
noise falls on both alike; `--rounds` repeats it. `--memories N` gives each chat's
user N long-term memories close to its questions before each round (written
straight to the stores, outside the measurement), so every turn's recall finds
and puts memories into its prompt (and, where the checkout marks their use,
marks them).

`--protocol native responses` does the same with two apps of this checkout,
one driven through the native route (`POST /v1/sessions/{sid}/messages`), the
other through the OpenAI-compatible face (`POST /v1/responses`, streamed, in
the session's conversation): the same turns, the cost of the projection. With
one protocol (the default, native) the configurations above are driven with it.

`--otlp` turns tracing on in this checkout's app only (OTEL_EXPORTER_OTLP_ENDPOINT
at an OTLP/HTTP sink in this process that reads and acknowledges every export,
every turn sampled); `--otlp --against .` then gives tracing on against off in
one checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._redis import percentile
from bench._stack import post_response, post_turn, servers, stores, token, workers
from bench.sse_load import QUESTIONS

TICKS = os.sysconf("SC_CLK_TCK")
ROWS = ("app", "worker", "worker's work horses", "redis", "postgres", "load generator")


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def cpu_seconds(pid: int, *, reaped: bool = True) -> float:
    """utime + stime (+ cutime + cstime: children already waited for) of one process."""
    f = _stat(pid)
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if reaped else 0)
    return ticks / TICKS


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError):
                continue  # gone meanwhile
    return out


def tree_cpu(root: int) -> float:
    """A process, what it reaped, and its live children (PostgreSQL's backends)."""
    total = cpu_seconds(root)
    for child in children(root):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue  # exited between listing and reading: counted once reaped
    return total


def _env_pid(name: str, value: str, *cmd: str) -> list[int]:
    """Processes whose command line holds every `cmd` part and whose environment sets
    name=value (how a bench tells its own servers from anyone else's)."""
    want = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if all(c.encode() in argv for c in cmd) and want in (
                entry / "environ"
            ).read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    # rq's work horses are forks of the worker with the same command line: keep roots.
    roots = []
    for pid in found:
        try:
            if int(_stat(pid)[1]) not in found:
                roots.append(pid)
        except OSError:
            continue
    return roots


def _local(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


@dataclass
class Run:
    backend: str
    first_recall_ms: float = 0.0
    ttfe: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    turns: int = 0
    wall: float = 0.0
    cpu: dict[str, float | None] = field(default_factory=dict)


async def chat(client: httpx.AsyncClient, base: str, name: str, i: int, turns: int,
               run: Run, protocol: str = "native") -> None:
    h = {"Authorization": f"Bearer {token(name)}"}
    sid = (await client.post(f"{base}/v1/sessions", headers=h)).json()["id"]
    post = post_response if protocol == "responses" else post_turn
    for t in range(turns):
        # Unique text, so every turn embeds its question (no memo or exact-text reuse).
        q = f"{QUESTIONS[(i + t) % len(QUESTIONS)]} Asked by {name}, turn {t}."
        out = await post(client, base, sid, h, q)
        if out.error is not None:
            run.errors.append(out.error)
            continue
        assert out.ttfe_ms is not None
        run.ttfe.append(out.ttfe_ms)
        run.turns += 1


async def drive(base: str, run: Run, turns: int, concurrency: int, tag: str,
                protocol: str = "native") -> None:
    per_chat = [turns // concurrency + (1 if i < turns % concurrency else 0)
                for i in range(concurrency)]
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(chat(client, base, f"{tag}-{i}", i, n, run, protocol)
                               for i, n in enumerate(per_chat) if n))


async def first_turn(base: str, run: Run) -> None:
    slug = "".join(c for c in run.backend if c.isalnum())
    h = {"Authorization": f"Bearer {token('first-' + slug)}"}
    async with httpx.AsyncClient(timeout=120) as client:
        sid = (await client.post(f"{base}/v1/sessions", headers=h)).json()["id"]
        out = await post_turn(client, base, sid, h, "What does the first turn after a start cost?")
    assert out.done is not None, out.error
    run.first_recall_ms = float(out.done["timing"]["recall_ms"])  # type: ignore[index]


def drain(redis_url: str, timeout: float = 120.0) -> None:
    """Wait until the worker has no queued or running job (memory extraction, audits)."""
    from rq import Queue
    from rq.registry import StartedJobRegistry

    conn = redis.Redis.from_url(redis_url)
    queues = [Queue(name, connection=conn) for name in ("persist", "memory", "audit")]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(q.count or StartedJobRegistry(queue=q).count for q in queues):
            break
        time.sleep(0.2)
    conn.close()


def measure(settings_redis: str, settings_pg: str, port: str, backend: str,
            args: argparse.Namespace, base: str) -> Run:
    run = Run(backend)
    asyncio.run(first_turn(base, run))
    protocol = args.protocol[0]
    asyncio.run(drive(base, Run(backend), 2 * args.concurrency, args.concurrency, "warm",
                      protocol))
    probes: dict[str, Callable[[], float]] = {}
    apps = _env_pid("PORT", port, "app.cli", "serve")
    worker_pids = _env_pid("REDIS_URL", settings_redis, "app.cli", "worker")
    probes["app"] = lambda: sum(cpu_seconds(p) for p in apps)
    probes["worker"] = lambda: sum(cpu_seconds(p, reaped=False) for p in worker_pids)
    # rq forks a work horse per job: its CPU is the worker's reaped children (+ a live one).
    probes["worker's work horses"] = lambda: sum(
        tree_cpu(p) - cpu_seconds(p, reaped=False) for p in worker_pids
    )
    rpid = int(redis.Redis.from_url(settings_redis).info("server")["process_id"])
    with psycopg.connect(settings_pg) as conn:  # its backend's parent is the postmaster
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        backend_pid = int(row[0]) if row else -1
        postmaster = int(_stat(backend_pid)[1]) if _local(backend_pid) else -1
    if _local(rpid):
        probes["redis"] = lambda: cpu_seconds(rpid)
    if postmaster > 0:
        probes["postgres"] = lambda: tree_cpu(postmaster)
    probes["load generator"] = lambda: cpu_seconds(os.getpid(), reaped=False)
    assert apps and worker_pids, (apps, worker_pids)
    before = {k: f() for k, f in probes.items()}
    started = time.perf_counter()
    asyncio.run(drive(base, run, args.turns, args.concurrency, f"load-{port}", protocol))
    run.wall = time.perf_counter() - started
    drain(settings_redis)  # the jobs of these turns count here, not in the next configuration
    after = {k: f() for k, f in probes.items()}
    for k in ROWS:
        run.cpu[k] = (after[k] - before[k]) if k in probes else None
    return run


def seed_memories(settings_redis: str, settings_pg: str, users: list[str], n: int) -> None:
    """`n` memories per user, each close to one of the bench's questions."""
    from app.embeddings import shared_embedder
    from app.memory.facts import Fact
    from app.memory.store import MemoryStore

    facts = [Fact("note", f"wants to know: {QUESTIONS[k % len(QUESTIONS)]} (#{k})")
             for k in range(n)]
    conn = redis.Redis.from_url(settings_redis)
    with psycopg.connect(settings_pg, autocommit=True) as pg:
        store = MemoryStore(conn, pg, shared_embedder())
        for user in users:
            store.write(user, None, facts)
    conn.close()


class _Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that reads every export and says 200 (counts them)."""

    exports = [0, 0]  # requests, bytes

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.exports[0] += 1
        self.exports[1] += len(body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def side_by_side(args: argparse.Namespace) -> None:
    """Two apps under the same load at the same time: this checkout's and DIR's
    (`--against`), or this checkout's twice, one per `--protocol`."""
    if args.against:
        other = Path(args.against).resolve()
        mine = "this checkout" + (f", tracing on (OTLP sink, {args.otlp_ratio:g} of turns "
                                  "sampled)" if args.otlp else "")
        lanes = [(mine, None, args.protocol[0]),
                 (str(other), other, args.protocol[0])]
    else:
        lanes = [(f"{p} ({'POST /v1/responses' if p == 'responses' else 'POST .../messages'})",
                  None, p) for p in args.protocol]
    env = {"OFFLINE_TOKEN_DELAY_MS": str(args.pace_ms),
           "STREAM_COALESCE_MS": str(args.coalesce_ms[0])}
    totals = [[0.0, 0, 0] for _ in lanes]
    with stores() as settings, contextlib.ExitStack() as stack:
        traced = {}
        if args.otlp:  # the first lane only
            traced = {"OTEL_EXPORTER_OTLP_ENDPOINT": stack.enter_context(otlp_sink()),
                      "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                      "OTEL_TRACES_SAMPLER_ARG": str(args.otlp_ratio)}
        bases = [stack.enter_context(servers(settings, cwd=cwd, **env,
                                             **(traced if i == 0 else {})))[0]
                 for i, (_, cwd, _) in enumerate(lanes)]
        stack.enter_context(workers(settings, **env))
        apps = [_env_pid("PORT", b.rsplit(":", 1)[1], "app.cli", "serve")[0] for b in bases]
        for base, (_, _, protocol) in zip(bases, lanes, strict=True):
            asyncio.run(drive(base, Run("warm"), 2 * args.concurrency, args.concurrency,
                              f"warm-{base[-5:]}", protocol))
        for rnd in range(args.rounds):
            runs = [Run(label) for label, _, _ in lanes]
            if args.memories:
                seed_memories(settings.redis_url or "", settings.database_url or "",
                              [f"vs{rnd}-{i}-{b[-5:]}-{j}" for i, b in enumerate(bases)
                               for j in range(args.concurrency)], args.memories)
            before = [cpu_seconds(a) for a in apps]

            async def both(rnd: int = rnd, runs: list[Run] = runs) -> None:
                await asyncio.gather(*(drive(b, runs[i], args.turns, args.concurrency,
                                             f"vs{rnd}-{i}-{b[-5:]}", lanes[i][2])
                                       for i, b in enumerate(bases)))

            asyncio.run(both())
            for i, app in enumerate(apps):
                totals[i][0] += cpu_seconds(app) - before[i]
                totals[i][1] += runs[i].turns
                totals[i][2] += len(runs[i].errors)
    print(f"{args.rounds} x {args.turns} turns each, {args.concurrency} concurrent chats per "
          f"app, both apps at once, offline provider at {args.pace_ms} ms/token, coalesce "
          f"{args.coalesce_ms[0]} ms, {args.memories} memories per user, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| app | turns | errors | app CPU ms per turn |")
    print("|---|---:|---:|---:|")
    for (label, _, _), (cpu, turns, errors) in zip(lanes, totals, strict=True):
        print(f"| {label} | {turns} | {errors} | {cpu * 1000 / max(turns, 1):.1f} |")
    if args.otlp:
        print(f"\nOTLP sink: {_Sink.exports[0]} exports, {_Sink.exports[1] / 1e6:.1f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--pace-ms", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["onnx"], choices=["torch", "onnx"])
    p.add_argument("--worker-classes", nargs="+", default=["fork", "simple"],
                   choices=["fork", "simple"])
    p.add_argument("--coalesce-ms", nargs="+", type=int, default=[25])
    p.add_argument("--against", help="another checkout's folder: its app side by side")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of --against or of two protocols")
    p.add_argument("--protocol", nargs="+", default=["native"], choices=["native", "responses"],
                   help="the face that drives the turns; two: side by side")
    p.add_argument("--memories", type=int, default=0,
                   help="with --against: long-term memories per chat user, near its questions")
    p.add_argument("--otlp", action="store_true",
                   help="side by side: the first app traces to a local OTLP sink")
    p.add_argument("--otlp-ratio", type=float, default=1.0,
                   help="with --otlp: the share of turns sampled (OTEL_TRACES_SAMPLER_ARG)")
    args = p.parse_args()
    if args.against or len(args.protocol) > 1:
        side_by_side(args)
        return
    runs = []
    configs = list(itertools.product(args.backends, args.worker_classes, args.coalesce_ms))
    with stores() as settings:
        for backend, worker_class, coalesce_ms in configs:
            env = {"EMBEDDING_BACKEND": backend, "OFFLINE_TOKEN_DELAY_MS": str(args.pace_ms),
                   "WORKER_CLASS": worker_class, "STREAM_COALESCE_MS": str(coalesce_ms)}
            label = f"{backend}, {worker_class}, coalesce {coalesce_ms}"
            with servers(settings, **env) as urls, workers(settings, **env):
                port = urls[0].rsplit(":", 1)[1]
                runs.append(measure(settings.redis_url or "", settings.database_url or "",
                                    port, label, args, urls[0]))
    print(f"{args.turns} turns, {args.concurrency} concurrent chats, offline provider at "
          f"{args.pace_ms} ms/token, one app + one worker, loopback, 2 cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| CPU ms per turn | " + " | ".join(r.backend for r in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for k in ROWS:
        cells = [f"{v * 1000 / max(r.turns, 1):.1f}" if (v := r.cpu[k]) is not None else "n/a"
                 for r in runs]
        print(f"| {k} | " + " | ".join(cells) + " |")
    total = [sum(v for v in r.cpu.values() if v is not None) * 1000 / max(r.turns, 1)
             for r in runs]
    print("| **all processes** | " + " | ".join(f"**{t:.1f}**" for t in total) + " |")
    print("| turns/s | " + " | ".join(f"{r.turns / r.wall:.1f}" for r in runs) + " |")
    print("| first event p50 ms | " + " | ".join(
        f"{percentile(r.ttfe, 50):.1f}" for r in runs) + " |")
    print("| first event p99 ms | " + " | ".join(
        f"{percentile(r.ttfe, 99):.1f}" for r in runs) + " |")
    print("| recall_ms, first turn after ready | " + " | ".join(
        f"{r.first_recall_ms:.1f}" for r in runs) + " |")
    print("| errors | " + " | ".join(str(len(r.errors)) for r in runs) + " |")
    for r in runs:
        if r.errors:
            print(f"  errors ({r.backend}): {sorted(set(r.errors))}")


if __name__ == "__main__":
    main()
