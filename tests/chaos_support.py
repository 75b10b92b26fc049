"""The chaos run: `backbone up` under load, each process SIGKILLed in turn.

Shared by tests/test_chaos.py (asserts) and bench/chaos.py (prints the table of
docs/reliability.md). It starts the same supervisor `make run` uses (`python -m
app.cli up`) on free ports with a temporary data folder, runs WRITERS users posting turns
back to back, and SIGKILLs Redis, the app, the worker and PostgreSQL one after
another. For each kill it records how long until `/readyz` answers 200 again
and how the requests that started meanwhile ended; at the end it checks every
acknowledged `message.done` against PostgreSQL and waits for every session to
be mined by the memory extractor.

(tests/ has no __init__.py: import this module as `chaos_support`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import redis

from app.auth import issue_token
from app.stack.embedded import free_port
from app.stores import keys

# How long a SIGKILL takes to land: the process's sockets closed, its pid gone.
KILL_LANDS = 0.2

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WRITERS = 20
TARGETS = ("redis", "app", "worker", "postgres")
READ_TIMEOUT = 20.0  # a stream silent this long counts as hung
SECRET = "chaos-" + "s" * 40


@dataclasses.dataclass
class Outcome:
    started: float
    kind: str  # done | error:<code> | http:<status> | refused | hung | broken
    sid: str = ""
    ended: float = 0.0
    seq: int = -1
    hash: str = ""


@dataclasses.dataclass
class Phase:
    target: str
    killed_at: float = 0.0
    ready_after: float | None = None  # seconds until /readyz 200 again
    back_after: float | None = None  # seconds until the supervisor restarted it


@dataclasses.dataclass
class Report:
    phases: list[Phase]
    outcomes: list[Outcome]
    acked: int = 0
    lost: int = 0
    duplicated: int = 0
    sessions: int = 0
    unmined: int = 0
    up_exit: int | None = None
    log: str = ""

    def during(self, phase: Phase) -> list[Outcome]:
        later = [p.killed_at for p in self.phases if p.killed_at > phase.killed_at]
        end = min(later) if later else float("inf")
        return [o for o in self.outcomes if phase.killed_at <= o.ended < end]

    def bad(self) -> list[Outcome]:
        """Failures a client must never see: a 500 (or other 5xx but 503), a hung stream,
        a stream that ended without `message.done` or `error` while the app lived."""
        return [o for o in self.outcomes
                if o.kind == "hung" or (o.kind.startswith("http:5") and o.kind != "http:503")
                or (o.kind == "broken" and not self._app_killed_during(o))]

    def _app_killed_during(self, o: Outcome) -> bool:
        """The app was killed while `o` ran, or just before it began: a request sent
        within KILL_LANDS of the SIGKILL goes to a process the kernel is still tearing
        down (a keep-alive connection then resets), cut by the kill all the same."""
        return any(p.target == "app" and o.started - KILL_LANDS <= p.killed_at <= o.ended
                   for p in self.phases)

    def table(self) -> str:
        rows = ["| SIGKILL | back (s) | /readyz 200 (s) | turns ok | 503 | `error` event "
                "| cut by the kill | refused | 500 / hung |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in self.phases:
            outs = self.during(p)
            c = Counter(o.kind.split(":")[0] for o in outs)
            bad = [o for o in self.bad() if o in outs]
            rows.append(
                f"| {p.target} | {_f(p.back_after)} | {_f(p.ready_after)} | {c['done']} | "
                f"{sum(1 for o in outs if o.kind == 'http:503')} | {c['error']} | "
                f"{c['broken']} | {c['refused']} | {len(bad)} |")
        rows.append("")
        rows.append(f"acknowledged messages: {self.acked}, lost {self.lost}, duplicated "
                    f"{self.duplicated}; sessions {self.sessions}, never mined {self.unmined}")
        return "\n".join(rows)


def _f(x: float | None) -> str:
    return "never" if x is None else f"{x:.1f}"


# -- the stack under `backbone up` ---------------------------------------------------


@dataclasses.dataclass
class Up:
    proc: subprocess.Popen[bytes]
    data: Path
    url: str
    redis_port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=5)

    def database_url(self) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs, as in app.embedded
            from pgserver.utils import PostmasterInfo

        info = PostmasterInfo.read_from_pgdata(self.data / "postgres")
        assert info is not None
        return str(info.get_uri())

    def pid(self, target: str) -> int | None:
        """The pid of one supervised process, found the way an operator would."""
        try:
            if target == "redis":
                with self.redis() as r:
                    return int(r.info("server")["process_id"])
            if target == "postgres":
                pidfile = self.data / "postgres" / "postmaster.pid"
                pid = int(pidfile.read_text().split()[0])
                return pid if Path(f"/proc/{pid}").exists() else None
        except (redis.RedisError, OSError, ValueError):
            return None
        command = {"app": "serve", "worker": "worker"}[target]
        for child in _children(self.proc.pid):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"app.cli" in argv and command.encode() in argv:
                return child
        return None


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def backbone_up(log_dir: Path, **env: str) -> Iterator[Up]:
    """`python -m app.cli up` with its own data folder and ports, ready when yielded."""
    # Short and outside pytest's basetemp: PostgreSQL's Unix socket lives in it.
    data = Path(tempfile.mkdtemp(prefix="chaos-"))
    port, redis_port = free_port(), free_port()
    full_env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    full_env.update({
        "DATA_DIR": str(data), "PORT": str(port), "EMBEDDED_REDIS_PORT": str(redis_port),
        "AUTH_SECRET": SECRET, "LOG_LEVEL": "WARNING", "OFFLINE_TOKEN_DELAY_MS": "2",
        "RATE_LIMIT_MESSAGES": "100000", "MEMORY_LOCK_TTL_SECONDS": "10",
        "SWEEP_INTERVAL_SECONDS": "3", **env,
    })
    log = log_dir / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], env=full_env,
                                cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    up = Up(proc, data, f"http://127.0.0.1:{port}", redis_port, log)
    try:
        deadline = time.monotonic() + 150
        while not ready(up.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"backbone up did not become ready: {up.output()[-3000:]}")
            time.sleep(0.3)
        yield up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: the supervisor stops all in order
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(data, ignore_errors=True)


# -- the load ------------------------------------------------------------------------


def _turn(client: httpx.Client, url: str, sid: str, n: int) -> Outcome:
    """One turn; how it ended. Only `message.done` acknowledges a message."""
    out = Outcome(time.monotonic(), "broken", sid)
    try:
        with client.stream("POST", f"{url}/v1/sessions/{sid}/messages",
                           json={"content": f"turn {n}: what does the AOF keep?"}) as res:
            if res.status_code != 200:
                res.read()
                out.kind = f"http:{res.status_code}"
                return out
            event = ""
            for line in res.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event in ("message.done", "error"):
                    import json

                    data = json.loads(line[5:])
                    if event == "error":
                        out.kind = f"error:{data.get('code')}"
                    else:
                        out.kind, out.seq, out.hash = ("done", int(data["message"]["seq"]),
                                                       str(data["message"]["hash"]))
            return out  # a stream that ends without either stays "broken"
    except httpx.ConnectError:
        out.kind = "refused"
    except httpx.ReadTimeout:
        out.kind = "hung"
    except httpx.HTTPError:
        out.kind = "broken"  # the app was killed mid-stream: the connection dropped
    return out


def _writer(url: str, user: str, stop: threading.Event, outcomes: list[Outcome],
            sids: set[str]) -> None:
    headers = {"Authorization": f"Bearer {issue_token(SECRET, user)}"}
    timeout = httpx.Timeout(10, read=READ_TIMEOUT)
    with httpx.Client(timeout=timeout, headers=headers) as client:
        sid = ""
        n = 0
        while not stop.is_set():
            if not sid:
                with contextlib.suppress(httpx.HTTPError):
                    res = client.post(f"{url}/v1/sessions")
                    if res.status_code in (200, 201):
                        sid = str(res.json()["id"])
                        sids.add(sid)
                if not sid:
                    stop.wait(0.2)
                    continue
            outcome = _turn(client, url, sid, n)
            outcome.ended = time.monotonic()
            n += 1
            outcomes.append(outcome)
            if outcome.kind != "done":
                stop.wait(0.2)  # a client backs off a little after a failure


# -- the run -------------------------------------------------------------------------


def _until(check: object, timeout: float) -> float | None:
    """Seconds until `check()` is true, or None after `timeout`."""
    assert callable(check)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def _served(outcomes: list[Outcome], since: float, n: int, timeout: float) -> None:
    """Wait until n turns that started after `since` were acknowledged."""
    _until(lambda: sum(1 for o in list(outcomes)
                       if o.kind == "done" and o.started >= since) >= n, timeout)


def _kill(up: Up, phase: Phase, outcomes: list[Outcome], settle: int) -> None:
    # Before each kill the stack has served some turns since the last one.
    wait = _until(lambda: up.pid(phase.target) is not None, 30)
    assert wait is not None, f"no {phase.target} process to kill"
    old = up.pid(phase.target)
    assert old is not None
    phase.killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    time.sleep(KILL_LANDS)  # let the kill land before asking /readyz
    phase.ready_after = _until(lambda: ready(up.url), 60)
    if phase.ready_after is not None:
        phase.ready_after += KILL_LANDS
    if _until(lambda: up.pid(phase.target) not in (None, old), 60) is not None:
        phase.back_after = time.monotonic() - phase.killed_at
    # Serving again means turns started after the recovery complete.
    _served(outcomes, time.monotonic(), settle, 60)


def _stored(database_url: str, sids: set[str]) -> dict[tuple[str, int], str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT session_id, seq, body->>'hash' FROM messages WHERE session_id = ANY(%s)",
            (list(sids),)).fetchall()
    return {(str(r[0]), int(r[1])): str(r[2]) for r in rows}


def _unmined(up: Up, stored: dict[tuple[str, int], str]) -> list[str]:
    """Sessions whose extraction cursor is not yet at their last stored message."""
    last: dict[str, tuple[int, str]] = {}
    for (sid, seq), h in stored.items():
        if sid not in last or seq > last[sid][0]:
            last[sid] = (seq, h)
    with up.redis() as r:
        cursors = r.mget([keys.memory_cursor(s) for s in last])
    return [sid for (sid, (_, h)), c in zip(last.items(), cursors, strict=True)
            if (c.decode() if isinstance(c, bytes) else c) != h]


def run_chaos(log_dir: Path, *, settle: int = WRITERS // 2) -> Report:
    """Kill each of TARGETS in turn once `settle` turns have completed since the last
    recovery (WRITERS turns before the first kill)."""
    outcomes: list[Outcome] = []
    sids: set[str] = set()
    phases = [Phase(t) for t in TARGETS]
    report = Report(phases, outcomes)
    with backbone_up(log_dir) as up:
        stop = threading.Event()
        writers = [threading.Thread(target=_writer, args=(up.url, f"chaos{i}", stop, outcomes,
                                                          sids), daemon=True)
                   for i in range(WRITERS)]
        for w in writers:
            w.start()
        try:
            _served(outcomes, 0.0, WRITERS, 90)
            for phase in phases:
                _kill(up, phase, outcomes, settle)
        finally:
            stop.set()
            for w in writers:
                w.join(READ_TIMEOUT + 15)
        acked = [o for o in outcomes if o.kind == "done"]
        report.acked = len(acked)
        seen = Counter((o.sid, o.seq) for o in acked)
        report.duplicated = sum(n - 1 for n in seen.values() if n > 1)
        db = up.database_url()

        def missing() -> list[Outcome]:
            stored = _stored(db, sids)
            return [o for o in acked if stored.get((o.sid, o.seq)) != o.hash]

        # A turn acknowledged while PostgreSQL was down is persisted by the sweep.
        _until(lambda: not missing(), 30)
        report.lost = len(missing())
        stored = _stored(db, sids)
        report.sessions = len({sid for sid, _ in stored})
        _until(lambda: not _unmined(up, stored), 60)
        report.unmined = len(_unmined(up, stored))
        up.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            report.up_exit = up.proc.wait(60)
        report.log = up.output()
    return report
