"""The stack `backbone up` runs, recorded in the data folder for the other commands.

`backbone up` writes `<DATA_DIR>/running-stack.json` (its pid, the Redis and
PostgreSQL URLs it resolved, the app's URL and, with `--cluster`, a node of its
session-plane cluster) once its stores answer, and removes
it when it stops. Every other command that needs the stores (`ingest`,
`doctor`, `index`, `cache`, `serve`, `worker`) reads it first: while that `up`
is alive (its pid exists and its Redis answers) they use its stores, whatever
EMBEDDED_REDIS_PORT they were started with; otherwise they start their own
embedded servers (or fail, for the commands that only inspect). A record left
by an `up` that was killed is ignored, and replaced by the next `up`.

REDIS_URL / DATABASE_URL (and SESSION_REDIS_URL), when set, always win over the
record.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from app.settings import Settings

FILE_NAME = "running-stack.json"


@dataclass(frozen=True)
class RunningStack:
    pid: int
    redis_url: str
    database_url: str
    app_url: str
    session_redis_url: str = ""  # a node of `up --cluster`'s session plane, else ""

    def describe(self) -> str:
        cluster = (f", session-plane cluster {self.session_redis_url}"
                   if self.session_redis_url else "")
        return (f"the running `backbone up` (pid {self.pid}, app {self.app_url}): "
                f"redis {self.redis_url}, postgres {self.database_url}{cluster}")


def path(data_dir: Path) -> Path:
    return data_dir / FILE_NAME


def record(
    resolved: Settings, pid: int | None = None, *, session_redis_url: str = ""
) -> RunningStack:
    """Write the record for `resolved` (settings with both URLs filled in)."""
    stack = RunningStack(
        pid=os.getpid() if pid is None else pid,
        redis_url=resolved.redis_url or "",
        database_url=resolved.database_url or "",
        app_url=f"http://{resolved.host}:{resolved.port}",
        session_redis_url=session_redis_url,
    )
    resolved.data_dir.mkdir(parents=True, exist_ok=True)
    # Written aside then renamed: a reader never sees half a file. 0600: the URLs
    # may carry passwords when REDIS_URL / DATABASE_URL were set.
    tmp = path(resolved.data_dir).with_suffix(f".{stack.pid}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(stack), f)
    tmp.replace(path(resolved.data_dir))
    return stack


def forget(data_dir: Path, pid: int | None = None) -> None:
    """Remove the record, only if it is this process's (another `up` may have replaced it)."""
    found = _read(data_dir)
    if found is not None and found.pid == (os.getpid() if pid is None else pid):
        path(data_dir).unlink(missing_ok=True)


def find(data_dir: Path) -> RunningStack | None:
    """The recorded stack if its `up` process lives and its Redis answers; else None."""
    found = _read(data_dir)
    if found is None or not _pid_alive(found.pid) or not _answers(found.redis_url):
        return None
    return found


def _read(data_dir: Path) -> RunningStack | None:
    try:
        raw = json.loads(path(data_dir).read_text())
        return RunningStack(pid=int(raw["pid"]), redis_url=str(raw["redis_url"]),
                            database_url=str(raw["database_url"]), app_url=str(raw["app_url"]),
                            session_redis_url=str(raw.get("session_redis_url") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, or not ours to understand: as if nothing ran


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2,
                                  retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError):
        return True
    except redis.RedisError:
        return False
    finally:
        client.close()


def use(settings: Settings) -> tuple[Settings, RunningStack | None]:
    """`settings` with the running stack's URLs filled in where the environment left
    them unset, and the stack used (None: nothing recorded is alive, or nothing unset)."""
    if settings.redis_url is not None and settings.database_url is not None:
        return settings, None
    found = find(settings.data_dir)
    if found is None:
        return settings, None
    used = settings.with_urls(settings.redis_url or found.redis_url,
                              settings.database_url or found.database_url)
    if found.session_redis_url and used.session_redis_url is None:
        # A worker or serve started beside `up --cluster` must write sessions where it does.
        used = replace(used, session_redis_url=found.session_redis_url,
                       session_redis_cluster=True)
    return used, found
