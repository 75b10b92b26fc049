"""Helpers for the fault tests: private stores and processes a test may kill.

The session-wide servers of conftest.py are shared by every other test, so a
fault test never touches them: it starts its own Redis and PostgreSQL
(`private_stack`), its own `backbone serve` (`serve`) and `backbone worker`
(`worker`), each logging to a file the test shows when it fails.

    with private_stack(settings, folder) as stack:
        with serve(stack.settings, folder, OFFLINE_TOKEN_DELAY_MS="50") as app:
            with httpx.Client(timeout=20) as c, c.stream("POST", ...) as res:
                events = Events(res)
                head = events.until(lambda f: f.event == "message.delta")
            os.kill(app.proc.pid, signal.SIGKILL)

(tests/ has no __init__.py: import this module as `faults_support`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from redis import Redis
from rq import Queue, SimpleWorker
from rq.job import JobStatus
from sse import Frame, frames

from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stack.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedStack, free_port
from app.stores.clients import redis_client

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# -- private stores ----------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    """A private Redis + PostgreSQL that a test may kill and start again in place."""

    embedded: EmbeddedStack
    settings: Settings

    @property
    def redis(self) -> EmbeddedRedis:
        assert self.embedded.redis is not None
        return self.embedded.redis

    @property
    def postgres(self) -> EmbeddedPostgres:
        assert self.embedded.postgres is not None
        return self.embedded.postgres

    def kill_redis(self) -> None:
        """SIGKILL: no SHUTDOWN, no final AOF flush, as in a crash."""
        proc = self.redis.process
        assert proc is not None and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.redis.process = None

    def restart_redis(self) -> None:
        """A new redis-server on the same port and data folder: it replays the AOF."""
        fresh = EmbeddedRedis(self.redis.data_dir, self.redis.port)
        fresh.start()
        self.embedded.redis = fresh

    def stop_postgres(self) -> None:
        self.postgres.stop()

    def start_postgres(self) -> None:
        fresh = EmbeddedPostgres(self.postgres.data_dir)
        assert fresh.start() == self.settings.database_url  # same socket, same URL
        self.embedded.postgres = fresh

    def client(self) -> Redis:
        return redis_client(self.settings.redis_url or "")


@contextlib.contextmanager
def private_stack(base: Settings, data_dir: Path) -> Iterator[Stack]:
    """Start, prepare and finally stop a stack of our own under `data_dir`.

    `data_dir` should be short: PostgreSQL listens on a Unix socket inside it,
    and socket paths are limited to about 100 bytes.
    """
    embedded = EmbeddedStack(
        dataclasses.replace(base, redis_url=None, database_url=None, data_dir=data_dir),
        redis_port=free_port(),
    )
    resolved = embedded.start()
    try:
        prepare(resolved)
        yield Stack(embedded, resolved)
    finally:
        embedded.stop()


def store_env(settings: Settings) -> dict[str, str]:
    return {
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "AUTH_SECRET": settings.auth_secret or "",
    }


# -- private processes -------------------------------------------------------------


@dataclasses.dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL its whole process group (it was started in a session of its own)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        # Its own session, so a kill reaches rq's work horse too, and only ours.
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, cwd=PROJECT_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Process(proc, log)


def _end(p: Process) -> None:
    if p.proc.poll() is None:
        p.proc.send_signal(signal.SIGINT)
        try:
            p.proc.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


@contextlib.contextmanager
def serve(settings: Settings, folder: Path, **env: str) -> Iterator[Process]:
    """A private `backbone serve` on a free port, ready (`/readyz` 200) when yielded."""
    port = free_port()
    full_env = {**os.environ, **store_env(settings), "PORT": str(port), "LOG_LEVEL": "WARNING",
                **env}
    p = _spawn(["serve"], full_env, folder / f"serve-{port}.log")
    p.url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if p.proc.poll() is not None:
                raise RuntimeError(f"backbone serve exited: {p.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"backbone serve did not become ready: {p.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(p.url + "/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield p
    finally:
        _end(p)


@contextlib.contextmanager
def worker(settings: Settings, folder: Path, **env: str) -> Iterator[Process]:
    """A private `backbone worker` (not burst) on the stack's queues."""
    full_env = {**os.environ, **store_env(settings), "LOG_LEVEL": "WARNING", **env}
    p = _spawn(["worker"], full_env, folder / f"worker-{time.monotonic_ns()}.log")
    try:
        yield p
    finally:
        _end(p)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def ready_status(url: str) -> int:
    try:
        return httpx.get(url + "/readyz", timeout=5).status_code
    except httpx.HTTPError:
        return 0


# -- reading a turn ------------------------------------------------------------------


class Events:
    """SSE frames of a streaming httpx response, read as far as a test asks."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.iter_lines()
        self.seen: list[Frame] = []
        self.ended = False

    def _next(self) -> Frame | None:
        block: list[str] = []
        for line in self._lines:
            block.append(line)
            if line == "":
                parsed = frames(block)
                block = []
                if parsed:  # a ping comment parses to nothing
                    self.seen.append(parsed[0])
                    return parsed[0]
        self.ended = True
        return None

    def until(self, stop: Callable[[Frame], bool]) -> list[Frame]:
        """Read until a frame satisfies `stop` (inclusive) or the stream ends."""
        while (frame := self._next()) is not None:
            if stop(frame):
                break
        return self.seen

    def rest(self) -> list[Frame]:
        """Read to the end of the stream."""
        while self._next() is not None:
            pass
        return self.seen


def count(events: list[Frame], name: str) -> int:
    return sum(1 for f in events if f.event == name)


# -- stores, seen from the test ------------------------------------------------------


def redis_history(client: Redis, sid: str) -> list[dict[str, Any]]:
    from app.stores import keys

    raw = client.execute_command("JSON.GET", keys.session(sid), ".")  # type: ignore[no-untyped-call]
    return [] if raw is None else list(json.loads(raw))


def pg_history(database_url: str, sid: str) -> list[dict[str, Any]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT body::text FROM messages WHERE session_id = %s ORDER BY seq", (sid,)
        ).fetchall()
    return [json.loads(r[0]) for r in rows]


def run_sweep(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """`sweep_unpersisted(0)` through rq, in process, as a worker would run it."""
    for name, value in store_env(settings).items():
        monkeypatch.setenv(name, value)
    client = redis_client(settings.redis_url or "")
    try:
        q = Queue("persist", connection=client)
        job = q.enqueue("workers.jobs.sweep_unpersisted", 0)
        SimpleWorker([q], connection=client).work(burst=True)
        assert job.get_status(refresh=True) == JobStatus.FINISHED, job.latest_result()
        counts = job.return_value()
        assert isinstance(counts, dict)
        return counts
    finally:
        client.close()


# -- services that misbehave ----------------------------------------------------------


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers; yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


@dataclasses.dataclass
class HoldingModel:
    """A chat-completions server for the memory extractor whose first request hangs.

    The first POST is held until `release` is set (it marks `holding` on arrival,
    so the test knows the job is mid-extraction); later ones answer `facts`.
    """

    facts: list[dict[str, str]]
    url: str = ""
    holding: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    requests: int = 0

    def reply(self) -> bytes:
        content = json.dumps({"facts": self.facts})
        return json.dumps({
            "id": "chatcmpl-fault", "object": "chat.completion", "model": "fault-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
        }).encode()


@contextlib.contextmanager
def holding_model(facts: list[dict[str, str]]) -> Iterator[HoldingModel]:
    model = HoldingModel(facts)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                model.requests += 1
                first = model.requests == 1
            if first:
                model.holding.set()
                model.release.wait(60)
                return  # the client is gone by now; answer nothing
            data = model.reply()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    model.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield model
    finally:
        model.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
