"""Keep what `backbone up` started running: restart a child that exits, with backoff.

Children: the embedded Redis and PostgreSQL (when `up` started them), the
nodes of the embedded session-plane cluster (`up --cluster`; a node that dies
comes back on its port and data folder and rejoins, as a replica when its
replica took over meanwhile), the app
(`backbone serve`), one worker (`backbone worker`) and the rq dashboard
(`rq-dashboard`, on 127.0.0.1 only: it can delete and requeue jobs). The supervisor polls them;
one that is gone is started again after a delay that doubles with each crash
in a row (BACKOFF_FIRST up to BACKOFF_MAX), and each restart is logged with its
cause (exit code, signal, or the start error). Redis comes back on the same
port and data folder, so it replays its AOF; PostgreSQL on the same data
folder and socket. The app and the worker are not restarted when a store
dies: they reconnect by themselves.

A child that crashes GIVE_UP_AFTER times in a row, each time within
STABLE_SECONDS of its start, is given up on: `run` logs why and returns 1, and
the caller stops everything. Ctrl-C, SIGTERM and SIGHUP end `run` with 0;
`stop` then signals the app and the worker (SIGINT, like Ctrl-C) and stops the
stores last.

Each child runs in its own process group, so the terminal's Ctrl-C reaches only
`up`, and each child gets exactly one SIGINT, from `stop`. A second one is a
forced quit to uvicorn (turns cut without their `server_stopping` event) and a
cold shutdown to rq (the running job killed).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from types import FrameType
from typing import Protocol

from app.stack.cluster import ClusterNode, EmbeddedCluster
from app.stack.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedStack,
    free_port,
    stop_together,
)

log = logging.getLogger("backbone.supervisor")

POLL_SECONDS = 0.2
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
STABLE_SECONDS = 20.0
GIVE_UP_AFTER = 5
STOP_WAIT_SECONDS = 15.0


class Child(Protocol):
    name: str

    def start(self) -> None:
        """Start it and return once it serves; raise if it cannot."""

    def exit_cause(self) -> str | None:
        """None while it runs; else why it is gone."""

    def stop(self) -> None: ...


def exit_cause_of(process: subprocess.Popen[bytes] | None) -> str | None:
    """None while `process` runs; else why it is gone (a child's `exit_cause`)."""
    if process is None:
        return "not started"
    rc = process.poll()
    return None if rc is None else describe_exit(rc)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


@dataclass
class ProcessChild:
    """A `python -m app.cli <command>` process (or `argv`, when given), in its own
    process group (the terminal's Ctrl-C reaches `up` only, which relays it once)."""

    name: str
    command: str
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    argv: list[str] | None = None
    # How long a stop waits for it after its SIGINT: the app's is its own drain
    # (SHUTDOWN_GRACE_SECONDS and the streams' margin), set by `up`.
    stop_wait: float = STOP_WAIT_SECONDS
    _interrupted: int | None = field(default=None, init=False, repr=False)  # pid signalled

    def start(self) -> None:
        argv = self.argv or [sys.executable, "-m", "app.cli", self.command]
        self.process = subprocess.Popen(argv, env=self.env, process_group=0)

    def exit_cause(self) -> str | None:
        return exit_cause_of(self.process)

    def interrupt(self) -> None:
        """One SIGINT per process, however often called: a second one is uvicorn's
        forced quit and rq's cold shutdown."""
        process = self.process
        if process is not None and process.poll() is None and self._interrupted != process.pid:
            self._interrupted = process.pid
            process.send_signal(signal.SIGINT)

    def wait_stopped(self, deadline: float) -> None:
        """Wait for the interrupted process until `deadline` (monotonic), then SIGKILL it."""
        if self.process is None:
            return
        try:
            self.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of its SIGINT: killing it",
                        self.name, self.stop_wait)
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self.interrupt()
        self.wait_stopped(time.monotonic() + self.stop_wait)


@dataclass
class RedisChild:
    """The embedded redis-server: restarted in place (same port, same AOF)."""

    redis: EmbeddedRedis
    name: str = "redis"

    def start(self) -> None:
        self.redis.process = None
        self.redis.start()  # waits out the AOF replay (PING answers -LOADING meanwhile)

    def exit_cause(self) -> str | None:
        return exit_cause_of(self.redis.process)

    def stop(self) -> None:
        self.redis.stop()


@dataclass
class PostgresChild:
    """The embedded PostgreSQL. pg_ctl daemonizes it, so it is watched by the pid
    in its postmaster.pid rather than as our child, and has no exit code to report."""

    postgres: EmbeddedPostgres
    name: str = "postgres"

    def _pid(self) -> int | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs, as in app.embedded
            from pgserver.utils import PostmasterInfo
        info = PostmasterInfo.read_from_pgdata(self.postgres.data_dir)
        return info.pid if info is not None and info.is_running() else None

    def start(self) -> None:
        self.postgres.stop()  # forget the dead server's handle; its stale pid file is fine
        self.postgres.start()

    def exit_cause(self) -> str | None:
        return None if self._pid() is not None else "postmaster is gone"

    def stop(self) -> None:
        self.postgres.stop()


@dataclass
class ClusterNodeChild:
    """One node of the embedded cluster: restarted in place (same ports, nodes.conf, AOF)."""

    node: ClusterNode
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"cluster node {self.node.port}"

    def start(self) -> None:
        self.node.process = None
        self.node.start()
        self.node.wait_answering()

    def exit_cause(self) -> str | None:
        return exit_cause_of(self.node.process)

    def stop(self) -> None:
        self.node.stop()


def cluster_children(cluster: EmbeddedCluster | None) -> list[Child]:
    return [] if cluster is None else [ClusterNodeChild(n) for n in cluster.nodes]


DASHBOARD_PORT = 9181  # rq-dashboard's own default


def dashboard_port() -> int:
    """9181 when it is free on loopback, else any free port (printed by `up`)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", DASHBOARD_PORT)) != 0:
            return DASHBOARD_PORT
    return free_port()


def dashboard_child(redis_url: str, port: int, env: dict[str, str]) -> ProcessChild:
    """rq-dashboard on 127.0.0.1:port. The Redis URL goes in through the environment
    (rq-dashboard reads RQ_DASHBOARD_*), not argv, so a password never shows in `ps`."""
    argv = [sys.executable, "-m", "rq_dashboard", "--bind", "127.0.0.1", "--port", str(port)]
    return ProcessChild("dashboard", "", {**env, "RQ_DASHBOARD_REDIS_URL": redis_url},
                        argv=argv)


def store_children(stack: EmbeddedStack) -> list[Child]:
    """The stores this stack started (none when REDIS_URL and DATABASE_URL are set)."""
    out: list[Child] = []
    if stack.redis is not None:
        out.append(RedisChild(stack.redis))
    if stack.postgres is not None:
        out.append(PostgresChild(stack.postgres))
    return out


@dataclass
class _Watch:
    child: Child
    started_at: float = 0.0
    crashes: int = 0  # in a row, each soon after its start
    restart_at: float | None = None  # set while it is down


@dataclass
class Supervisor:
    """Start, watch and restart children; stop them in reverse order."""

    children: list[Child]
    stopping: threading.Event = field(default_factory=threading.Event)
    restarts: int = 0

    def __post_init__(self) -> None:
        self._watches = [_Watch(c) for c in self.children]

    def start(self) -> None:
        """Start every child not already running (the stores usually are)."""
        for w in self._watches:
            if w.child.exit_cause() is not None:
                w.child.start()
            w.started_at = time.monotonic()

    def _stop_on_signals(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.stopping.is_set():
                print("\nstopping ...", file=sys.stderr, flush=True)
            self.stopping.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        # A closed terminal: the children, in their own groups, get no SIGHUP of it.
        signal.signal(signal.SIGHUP, handler)

    def run(self) -> int:
        """Watch until Ctrl-C / SIGTERM / SIGHUP (0) or until a child is given up on (1)."""
        self._stop_on_signals()
        while not self.stopping.wait(POLL_SECONDS):
            for w in self._watches:
                if self.stopping.is_set():
                    break
                if not self._tend(w):
                    return 1
        return 0

    def _tend(self, w: _Watch) -> bool:
        now = time.monotonic()
        if w.restart_at is None:
            cause = w.child.exit_cause()
            if cause is not None:
                return self._crashed(w, cause, now)
        elif now >= w.restart_at:
            try:
                w.child.start()
            except Exception as e:
                return self._crashed(w, f"could not start: {e}", time.monotonic())
            w.restart_at, w.started_at = None, time.monotonic()
            self.restarts += 1
            log.warning("%s is back (restarted in %.1f s)", w.child.name, time.monotonic() - now)
        return True

    def _crashed(self, w: _Watch, cause: str, now: float) -> bool:
        ran = now - w.started_at
        w.crashes = w.crashes + 1 if ran < STABLE_SECONDS else 1
        if w.crashes >= GIVE_UP_AFTER:
            log.error("%s keeps crashing right after it starts (%d times in a row, last: %s): "
                      "giving up and stopping everything. Its log above says why.",
                      w.child.name, w.crashes, cause)
            return False
        delay = min(BACKOFF_FIRST * 2 ** (w.crashes - 1), BACKOFF_MAX)
        log.warning("%s stopped unexpectedly (%s) after %.1f s: restarting in %.1f s",
                    w.child.name, cause, ran, delay)
        w.restart_at = now + delay
        return True

    def stop(self) -> None:
        """The app, worker and dashboard first, then the stores: each group at once.

        One SIGINT to each process at the same moment, then one wait for them all
        (each until its own `stop_wait`, then SIGKILL): the slowest sets the time,
        not their sum. The stores (Redis, PostgreSQL, cluster nodes) only once those
        are gone, since the app persists its last turns while it stops, and then
        all together too.
        """
        procs = [c for c in self.children if isinstance(c, ProcessChild)]
        stores = [c for c in self.children if not isinstance(c, ProcessChild)]
        started = time.monotonic()
        for p in procs:
            p.interrupt()
        for p in procs:
            p.wait_stopped(started + p.stop_wait)
        stop_together([c.stop for c in stores])

