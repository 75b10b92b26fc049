"""An embedded Redis Cluster for the session plane: 3 primaries, 3 replicas.

The same `redis-server` as the embedded single node (app/stack/embedded.py),
with cluster mode on and only the JSON module (the session plane runs no
search). `redis-cli --cluster create` is not shipped with the wheels, so the
cluster is formed here with plain commands: every node MEETs the first, each
primary takes a third of the slots (CLUSTER ADDSLOTSRANGE), each replica
REPLICATEs its primary, and `start` returns once every node says
`cluster_state:ok` and every replica's link to its primary is up.

Each node keeps its data and its `nodes.conf` under `<data_dir>/<port>`, so a
restart on the same ports finds the cluster already formed and only waits for
it. `in_folder` (what `backbone up --cluster` uses) keeps the ports in
`<data_dir>/ports.json`, so the next run finds the same cluster. `ClusterNode.kill`
(SIGKILL) is for the failover test and the bench.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from app.errors import EmbeddedStartError
from app.stack.embedded import (
    _ping,
    _probe,
    free_port,
    free_ports,
    redis_module_paths,
    redis_server_binary,
    stop_together,
    terminate,
)

SLOTS = 16384
PRIMARIES = 3
# How long a primary may be silent before its replica takes over. Short, so a
# failover in the tests takes seconds; the Redis default is 15 s.
NODE_TIMEOUT_MS = 2000


def _json_module() -> Path:
    return next(p for p in redis_module_paths() if p.name == "rejson.so")


@dataclass
class ClusterNode:
    data_dir: Path
    port: int
    # The bus port, named explicitly: the default (port + 10000) overflows for the
    # ephemeral ports the tests use.
    bus_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def command(self) -> list[str]:
        return [
            str(redis_server_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(self.data_dir / "redis.log"),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--cluster-port", str(self.bus_port),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--loadmodule", str(_json_module()),
        ]

    def start(self) -> None:
        if _ping(self.port):
            raise EmbeddedStartError(f"port {self.port} already answers as a Redis")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def client(self) -> redis.Redis:
        return _probe(self.port, decode_responses=True)

    def wait_answering(self, timeout: float = 30.0) -> None:
        """Until it answers PING (its AOF replayed); EmbeddedStartError if it exits."""
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.process is None or self.process.poll() is not None:
                raise EmbeddedStartError(f"cluster node {self.port} exited at start; see "
                                         f"{self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                raise EmbeddedStartError(f"cluster node {self.port} did not answer in time")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        terminate(self.process, timeout)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no AOF flush, no goodbye to the cluster (the failover test)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


def _info(client: redis.Redis, section: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.info(section).items()}


def _cluster_info(client: redis.Redis) -> dict[str, str]:
    raw = str(client.execute_command("CLUSTER", "INFO"))  # type: ignore[no-untyped-call]
    return dict(line.split(":", 1) for line in raw.split() if ":" in line)


@dataclass
class EmbeddedCluster:
    """Three primaries and three replicas on `ports` (six of them), data in `data_dir`."""

    data_dir: Path
    ports: list[int] = field(default_factory=lambda: free_ports(2 * PRIMARIES))
    bus_ports: list[int] | None = None
    nodes: list[ClusterNode] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if len(self.ports) != 2 * PRIMARIES:
            raise ValueError(f"an embedded cluster has {2 * PRIMARIES} nodes")
        if self.bus_ports is None:
            # Distinct from each other and from the client ports (held together).
            taken = set(self.ports)
            self.bus_ports = [p for p in free_ports(4 * PRIMARIES) if p not in taken][
                : 2 * PRIMARIES]
        self.nodes = [ClusterNode(self.data_dir / str(p), p, b)
                      for p, b in zip(self.ports, self.bus_ports, strict=True)]

    @classmethod
    def in_folder(cls, data_dir: Path) -> EmbeddedCluster:
        """The cluster of `data_dir`, on the ports it had last time (its nodes.conf files
        name each other by them), or on free ones recorded for next time."""
        record = data_dir / "ports.json"
        if record.exists():
            saved = json.loads(record.read_text())
            return cls(data_dir, list(saved["ports"]), list(saved["bus_ports"]))
        cluster = cls(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"ports": cluster.ports, "bus_ports": cluster.bus_ports}))
        return cluster

    def describe(self) -> str:
        return (f"Redis Cluster, {PRIMARIES} primaries + {PRIMARIES} replicas on ports "
                f"{', '.join(map(str, self.ports))} (seed {self.url})")

    @property
    def url(self) -> str:
        """A seed node; the cluster client discovers the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 30.0) -> str:
        try:
            for node in self.nodes:
                node.start()
            deadline = time.monotonic() + timeout
            self._wait(lambda c: bool(c.ping()), deadline, "answer")
            if not self._formed():
                self._form(deadline)
            self._wait_ok(deadline)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _formed(self) -> bool:
        with self.nodes[0].client() as c:
            return _cluster_info(c).get("cluster_slots_assigned") == str(SLOTS)

    def _form(self, deadline: float) -> None:
        seed = self.nodes[0]
        for node in self.nodes[1:]:
            with node.client() as c:
                c.execute_command("CLUSTER", "MEET", "127.0.0.1", seed.port, seed.bus_port)
        per = SLOTS // PRIMARIES
        for i, node in enumerate(self.nodes[:PRIMARIES]):
            last = SLOTS - 1 if i == PRIMARIES - 1 else (i + 1) * per - 1
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        # A replica can only REPLICATE a node it already knows as a primary.
        self._wait(lambda c: len(str(c.execute_command("CLUSTER", "NODES")).splitlines())
                   == len(self.nodes), deadline, "see every node")
        for primary, replica in zip(self.nodes[:PRIMARIES], self.nodes[PRIMARIES:], strict=True):
            with primary.client() as c:
                node_id = str(c.execute_command("CLUSTER", "MYID"))
            with replica.client() as c:
                c.execute_command("CLUSTER", "REPLICATE", node_id)

    def _wait_ok(self, deadline: float) -> None:
        self._wait(lambda c: _cluster_info(c).get("cluster_state") == "ok", deadline,
                   "reach cluster_state:ok")

        def synced(c: redis.Redis) -> bool:
            repl = _info(c, "replication")
            return repl.get("role") == "master" or repl.get("master_link_status") == "up"

        self._wait(synced, deadline, "finish the first sync of every replica")

    def _wait(self, check: object, deadline: float, what: str) -> None:
        assert callable(check)
        pending = [n for n in self.nodes if n.process is not None]
        while pending:
            for node in list(pending):
                if node.process is not None and node.process.poll() is not None:
                    raise EmbeddedStartError(f"cluster node {node.port} exited: {self._tail(node)}")
                try:
                    with node.client() as c:
                        if check(c):
                            pending.remove(node)
                except redis.RedisError:
                    pass
            if pending and time.monotonic() > deadline:
                raise EmbeddedStartError(
                    f"cluster nodes {[n.port for n in pending]} did not {what} in time")
            if pending:
                time.sleep(0.05)

    def _tail(self, node: ClusterNode) -> str:
        log = node.data_dir / "redis.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return " | ".join(text.strip().splitlines()[-5:]) or "(no output)"

    def primaries(self) -> list[ClusterNode]:
        """The nodes serving slots now (after a failover, a former replica)."""
        out = []
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                with node.client() as c:
                    if _info(c, "replication").get("role") == "master":
                        out.append(node)
            except redis.RedisError:
                pass
        return out

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok (e.g. after a failover)."""
        self._wait(lambda c: _cluster_info(c).get("cluster_state") == "ok",
                   time.monotonic() + timeout, "reach cluster_state:ok")

    def stop(self) -> None:
        stop_together([node.stop for node in self.nodes])

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
