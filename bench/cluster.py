"""The session plane on one Redis vs the embedded 3-primary Redis Cluster, same run.

    .venv/bin/python bench/cluster.py [--ops 2000] [--users 200] [--seconds 20]

1. Per-operation latency, one operation in flight at a time, through the app's
   own async code: the append (`Sessions.append`: unpersisted mark + the
   `append_messages` Lua), with WAIT off and with `WAIT 1` (the single node gets
   a replica of its own for that row, so both sides wait for one replica), one
   event-log write (`EventLog.emit` + `flush`: the writer's XADD pipeline), the
   memory lock (`acquire_lock` + `release_lock`), and the rate-limit check. Also
   the CPU the Redis servers spent per operation (INFO cpu, summed over every
   node, replicas included) and the bench client's own CPU per operation.
2. A short load run on the cluster: `backbone serve` + a worker with the session
   plane on the cluster, N users chatting back to back (bench/load_test.py's
   driver), then every acknowledged (session, seq, hash) is looked up in the
   cluster's histories and in PostgreSQL, and the keys are counted per primary.

Prints markdown tables. On 2 shared cores a cluster cannot show more
throughput; what this measures is the latency a cluster adds and how evenly it
spreads the keys (goals: <= 20 % p50 overhead, no primary above 40 % of keys).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.chat.event_log import EventLog
from app.sessions import messages
from app.sessions.store import Sessions
from app.settings import Settings
from app.stack.cluster import EmbeddedCluster
from app.stack.embedded import EmbeddedRedis, free_port
from app.stores import keys, scripts
from app.stores.clients import async_session_redis_client
from bench._redis import percentile
from bench._stack import servers, stores, workers
from bench.load_test import drive

USER = "bench-user"
TTL = 86400
WAIT_TIMEOUT_MS = 500
Op = Callable[[], Awaitable[object]]


@dataclasses.dataclass
class Plane:
    name: str
    url: str
    cluster: bool
    nodes: list[int]  # every server's port, replicas included (for INFO cpu)


def server_cpu(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        with contextlib.suppress(redis.RedisError), redis.Redis(port=port) as c:
            info = c.info("cpu")
            total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


async def timed(op: Op, n: int, ports: list[int]) -> tuple[list[float], float, float]:
    """(latencies in ms, server CPU µs/op, client CPU µs/op)."""
    for _ in range(min(50, n)):  # warm connections and script caches
        await op()
    samples = []
    cpu0, own0 = server_cpu(ports), time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        await op()
        samples.append((time.perf_counter() - t) * 1000)
    server = (server_cpu(ports) - cpu0) * 1e6 / n
    own = (time.process_time() - own0) * 1e6 / n
    return samples, server, own


async def measure(plane: Plane, n: int, wait: bool) -> dict[str, tuple[list[float], float, float]]:
    settings = Settings(redis_url=plane.url, session_redis_url=plane.url,
                        session_redis_cluster=plane.cluster)
    client = async_session_redis_client(settings)
    store = Sessions(client, cast(Any, None), TTL, wait_replicas=1 if wait else 0,
                     wait_timeout_ms=WAIT_TIMEOUT_MS)
    sid = keys.new_session_id()
    await scripts.arun(client, scripts.create_session(sid, USER, TTL))
    seq = 0

    async def append() -> None:
        nonlocal seq
        await store.append(sid, USER, [messages.build(sid, seq, "user", "one more")], seq)
        seq += 1

    out = {"append (WAIT 1)" if wait else "append": await timed(append, n, plane.nodes)}
    if not wait:
        log = EventLog(client, sid, 0)

        async def event() -> None:
            log.emit("message.delta", {"text": "a few words of a reply"})
            await log.flush()

        token = secrets.token_hex(8)

        async def lock() -> None:
            await scripts.arun(client, scripts.acquire_lock(sid, token, 60_000))
            await scripts.arun(client, scripts.release_lock(sid, token))

        async def rate() -> None:
            await scripts.arun(client, scripts.rate_limit(
                USER, int(time.time() * 1000), 60_000, 10**9, secrets.token_hex(8)))

        out["event write (XADD pipeline)"] = await timed(event, n, plane.nodes)
        out["lock acquire + release"] = await timed(lock, n, plane.nodes)
        out["rate-limit check"] = await timed(rate, n, plane.nodes)
    await client.aclose()
    return out


@contextlib.contextmanager
def single_with_replica(tmp: Path) -> Iterator[Plane]:
    """The embedded single Redis with one replica: the cluster's primaries have one
    each, so both sides pay for feeding a replica, and both can WAIT for one."""
    primary = EmbeddedRedis(tmp / "primary", free_port())
    replica = EmbeddedRedis(tmp / "replica", free_port())
    url = primary.start()
    replica.start()
    try:
        with redis.Redis(port=replica.port) as c:
            c.replicaof("127.0.0.1", str(primary.port))
            while c.info("replication").get("master_link_status") != "up":
                time.sleep(0.05)
        yield Plane("one node + replica", url, False, [primary.port, replica.port])
    finally:
        replica.stop()
        primary.stop()


def latency_table(ops: int) -> None:
    rows: dict[str, dict[str, tuple[list[float], float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, \
            single_with_replica(Path(tmp)) as one:
        cluster = EmbeddedCluster(Path(tmp) / "cluster")
        with cluster as seed:
            many = Plane("cluster", seed, True, list(cluster.ports))

            async def run_all() -> None:
                for name, plane in (("one", one), ("cluster", many)):
                    rows[name] = await measure(plane, ops, wait=False)
                    rows[name].update(await measure(plane, ops, wait=True))

            asyncio.run(run_all())
    _print_latency(rows, ops)


def _print_latency(rows: dict[str, dict[str, tuple[list[float], float, float]]], ops: int) -> None:
    print(f"### Per operation, one in flight, {ops} each (ms; CPU in µs per operation)\n")
    print("| operation | one node p50 | p99 | cluster p50 | p99 | p50 overhead "
          "| Redis CPU one / cluster | client CPU one / cluster |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for op, (one, s_cpu, c_cpu) in rows["one"].items():
        many, s_cpu2, c_cpu2 = rows["cluster"][op]
        p50a, p50b = percentile(one, 50), percentile(many, 50)
        print(f"| {op} | {p50a:.3f} | {percentile(one, 99):.3f} | {p50b:.3f} "
              f"| {percentile(many, 99):.3f} | {(p50b / p50a - 1) * 100:+.0f} % "
              f"| {s_cpu:.0f} / {s_cpu2:.0f} | {c_cpu:.0f} / {c_cpu2:.0f} |")
    print()


def load_run(users: int, seconds: float) -> None:
    env = {"OFFLINE_TOKEN_DELAY_MS": "20", "RATE_LIMIT_MESSAGES": "100000",
           "RATE_LIMIT_SESSIONS": "100000", "SWEEP_INTERVAL_SECONDS": "5"}
    with stores() as settings, tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        cluster = EmbeddedCluster(Path(tmp))
        with cluster as seed:
            env.update(SESSION_REDIS_URL=seed, SESSION_REDIS_CLUSTER="1")
            with servers(settings, 1, pids=None, **env) as bases, \
                    workers(settings, 1, **env):
                run, wall = asyncio.run(drive(bases, users, seconds))
                time.sleep(12)  # a sweep interval and its quiet period
            lost_redis = _lost_in_cluster(seed, run.acked)
            from bench.load_test import count_lost

            acked, lost_pg = count_lost(settings.database_url or "", run.acked)
            shares = _keys_per_primary(cluster)
    print(f"### Load on the cluster: {users} users, {seconds:.0f} s, one app process + one "
          "worker, offline provider at 20 ms/token\n")
    print("| turns | turns/s | turn p50 ms | p99 ms | errors | acknowledged "
          "| lost (cluster) | lost (PostgreSQL) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {run.turns} | {run.turns / wall:.1f} | {percentile(run.total, 50):.0f} "
          f"| {percentile(run.total, 99):.0f} | {sum(run.errors.values())} | {acked} "
          f"| {lost_redis} | {lost_pg} |")
    if run.errors:
        print(f"\nerrors: {run.errors}")
    print("\n| primary | session histories | share | all session-plane keys | share |")
    print("|---|---:|---:|---:|---:|")
    total_s = sum(s for s, _ in shares.values()) or 1
    total_k = sum(k for _, k in shares.values()) or 1
    for port, (s, k) in sorted(shares.items()):
        print(f"| {port} | {s} | {s / total_s:.0%} | {k} | {k / total_k:.0%} |")
    print()


def _lost_in_cluster(seed: str, acked: set[tuple[str, int, str]]) -> int:
    client = redis.RedisCluster.from_url(seed)
    held: set[tuple[str, int, str]] = set()
    try:
        for sid in {sid for sid, _, _ in acked}:
            raw = client.execute_command("JSON.GET", keys.session(sid), "$")  # type: ignore[no-untyped-call]
            for m in json.loads(raw)[0] if raw else []:
                held.add((sid, int(m["seq"]), str(m["hash"])))
    finally:
        client.close()
    return len(acked - held)


def _keys_per_primary(cluster: EmbeddedCluster) -> dict[int, tuple[int, int]]:
    """port -> (session:{<sid>} histories, every key) on each primary."""
    out = {}
    for node in cluster.primaries():
        with node.client() as c:
            histories = sum(1 for k in c.scan_iter("session:{*", count=1000)
                            if str(k).endswith("}"))
            out[node.port] = (histories, int(c.dbsize()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--skip-load", action="store_true")
    args = p.parse_args()
    latency_table(args.ops)
    if not args.skip_load:
        load_run(args.users, args.seconds)


if __name__ == "__main__":
    main()
