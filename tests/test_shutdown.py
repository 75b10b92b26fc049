"""Stopping a node mid-turn: the live client is told (an `error` event, code
`server_stopping`, also in the turn's event log for a resumer), what the turn
stored is persisted, and the shutdown logs no traceback. A real `backbone serve`
stopped with SIGTERM, as systemd and Kubernetes stop it; `backbone up` relays its
Ctrl-C to each child once."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from live import app_process
from sse import frames
from waits import wait_until

from app.auth import issue_token
from app.chat import event_log
from app.settings import Settings
from app.stack.embedded import free_port
from app.stack.supervisor import ProcessChild, Supervisor
from app.stores import keys

Headers = Callable[[str], dict[str, str]]
QUESTION = "How does Redis persist data with AOF?"


def _lines(res: httpx.Response) -> Iterator[str]:
    """The response's lines; a cut connection ends them (the assertions say what was missed)."""
    with contextlib.suppress(httpx.RemoteProtocolError):
        yield from res.iter_lines()


def test_a_node_stopped_mid_turn_tells_its_client_and_persists_the_question(
    stores_env: Settings, token_for: Headers, user: str, sr: redis.Redis,
    pg: psycopg.Connection[Any],
) -> None:
    h = token_for(user)
    # 300 ms a token: the answer outlasts the 1 s grace a stopping server gives it.
    with app_process(stores_env, OFFLINE_TOKEN_DELAY_MS="300", SHUTDOWN_GRACE_SECONDS="1",
                     LOG_LEVEL="INFO") as (base, proc):
        sid = httpx.post(f"{base}/v1/sessions", headers=h).json()["id"]
        lines: list[str] = []
        stopped = False
        with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{base}/v1/sessions/{sid}/messages", headers=h, json={"content": QUESTION},
        ) as res:
            assert res.status_code == 200
            for line in _lines(res):
                lines.append(line)
                if not stopped and line == "" and [
                        f.event for f in frames(lines)].count("message.delta") >= 2:
                    proc.send_signal(signal.SIGTERM)
                    stopped = True
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
        got = frames([*lines, ""])
    assert stopped
    assert got[-1].event == "error", [f.event for f in got]
    assert got[-1].data["code"] == "server_stopping"
    assert "message.done" not in [f.event for f in got]
    # A client resuming elsewhere gets the same ending from the event log.
    turn, _ = event_log.parse_event_id(got[-1].id or "")
    logged = sr.xrevrange(keys.events(sid, turn), count=1)
    assert logged and logged[0][1][b"event"] == b"error"
    assert b"server_stopping" in logged[0][1][b"data"]
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "CancelledError" not in output, output
    rows = pg.execute("SELECT role, content FROM messages WHERE session_id = %s ORDER BY seq",
                      (sid,)).fetchall()
    assert ("user", QUESTION) in rows


CHILD = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
open(os.environ["READY"], "w").close()
while not got:
    time.sleep(0.01)
time.sleep(0.5)  # a second SIGINT would land here
open(os.environ["OUT"], "w").write(str(len(got)))
"""


def test_up_children_sit_outside_its_process_group_and_get_one_sigint_on_stop(
    tmp_path: Path,
) -> None:
    # The terminal's Ctrl-C goes to the foreground process group: were the app in
    # `up`'s group, `stop` would send it a second SIGINT, uvicorn's forced quit.
    env = {**os.environ, "READY": str(tmp_path / "ready"), "OUT": str(tmp_path / "out")}
    child = ProcessChild("probe", "", env, argv=[sys.executable, "-c", CHILD])
    child.start()
    assert child.process is not None
    try:
        wait_until(lambda: (tmp_path / "ready").exists(), "the child to start")
        assert os.getpgid(child.process.pid) != os.getpgrp()
    finally:
        child.stop()
    assert (tmp_path / "out").read_text() == "1"


SLOW_CHILD = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(time.time()))
open(os.environ["READY"], "w").close()
while not got:
    time.sleep(0.01)
time.sleep(0.6)  # a slow stop; a second SIGINT would land here
open(os.environ["OUT"], "w").write(f"{len(got)} {got[0]} {time.time()}")
"""


def test_stop_signals_every_child_once_at_the_same_time_before_any_has_exited(
    tmp_path: Path,
) -> None:
    # Were they stopped one after the other, the stop would take the sum of their
    # stops; were one signalled again while stopping, that is a forced quit.
    children = []
    for name in ("app", "worker", "dashboard"):
        env = {**os.environ, "READY": str(tmp_path / f"{name}.ready"),
               "OUT": str(tmp_path / f"{name}.out")}
        children.append(ProcessChild(name, "", env, argv=[sys.executable, "-c", SLOW_CHILD]))
    supervisor = Supervisor(list(children))
    supervisor.start()
    try:
        wait_until(lambda: all((tmp_path / f"{c.name}.ready").exists() for c in children),
                   "the children to start")
    finally:
        supervisor.stop()
    outs = [(tmp_path / f"{c.name}.out").read_text().split() for c in children]
    assert [o[0] for o in outs] == ["1", "1", "1"], outs
    signalled, exited = [float(o[1]) for o in outs], [float(o[2]) for o in outs]
    assert max(signalled) < min(exited), "a child was signalled only after another had exited"


def _up_env(data: Path, **extra: str) -> tuple[dict[str, str], int, int]:
    redis_port, app_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(DATA_DIR=str(data), EMBEDDED_REDIS_PORT=str(redis_port), PORT=str(app_port),
               AUTH_SECRET="shutdown-test-secret-long-enough-for-hs256", **extra)
    return env, redis_port, app_port


def _stream_until_it_ends(base: str, token: str, endings: list[str],
                          streaming: threading.Event) -> None:
    h = {"Authorization": f"Bearer {token}"}
    sid = httpx.post(f"{base}/v1/sessions", headers=h).json()["id"]
    lines: list[str] = []
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", f"{base}/v1/sessions/{sid}/messages", headers=h, json={"content": QUESTION},
    ) as res:
        for line in _lines(res):
            lines.append(line)
            if line.startswith("event: message.delta"):
                streaming.set()
    got = frames([*lines, ""])
    endings.append(f"{got[-1].event} {got[-1].data.get('code', '')}" if got else "nothing")


@pytest.mark.parametrize("streams", [0, 3], ids=["idle", "streaming"])
def test_ctrl_c_stops_up_within_three_seconds_past_the_streams_grace(
    scratch_dir: Path, streams: int,
) -> None:
    # The terminal's Ctrl-C: SIGINT to `backbone up`'s process group (its children
    # sit in groups of their own and hear of it from `up` only). Idle, the whole
    # stack is down within 3 s; with turns streaming (300 ms a token outlasts the
    # 1 s grace), within SHUTDOWN_GRACE_SECONDS + 3 s, each turn ending with
    # `server_stopping`.
    grace = 1.0
    env, redis_port, app_port = _up_env(scratch_dir / "data", SHUTDOWN_GRACE_SECONDS=str(grace),
                                        OFFLINE_TOKEN_DELAY_MS="300")
    base = f"http://127.0.0.1:{app_port}"
    up = subprocess.Popen([sys.executable, "-m", "app.cli", "up"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          process_group=0)
    output = ""
    try:
        wait_until(lambda: _ready(base) or up.poll() is not None, "`backbone up` to be ready",
                   timeout=180)
        assert up.poll() is None, up.communicate()[0]
        r = redis.Redis(port=redis_port)
        wait_until(lambda: bool(r.smembers("rq:workers")), "the worker to register")
        r.close()
        endings: list[str] = []
        turns = []
        for _ in range(streams):
            streaming = threading.Event()
            t = threading.Thread(target=_stream_until_it_ends, args=(
                base, issue_token(env["AUTH_SECRET"], "stopper"), endings, streaming))
            t.start()
            assert streaming.wait(60), "the turn did not start streaming"
            turns.append(t)
        started = time.monotonic()
        os.killpg(up.pid, signal.SIGINT)
        output = up.communicate(timeout=120)[0]
        took = time.monotonic() - started
        for t in turns:
            t.join(30)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.communicate()
    assert up.returncode == 0, output
    bound = 3.0 + (grace if streams else 0.0)
    assert took <= bound, f"the stop took {took:.1f} s (bound {bound} s): {output[-3000:]}"
    assert endings == ["error server_stopping"] * streams, endings
    assert "forced quit" not in output and "Traceback" not in output, output[-3000:]
    for port in (redis_port, app_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


def _ready(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    return False


def test_a_stopping_worker_leaves_its_pubsub_channel_at_once_whatever_its_thread_is_doing(
    settings: Settings,
) -> None:
    # rq's own unsubscribe raced its pubsub thread: when the thread read the
    # UNSUBSCRIBE reply before being told to stop, it waited in its next read for up
    # to a minute, and the worker's exit with it. A thread that keeps the GIL busy
    # (as a loaded machine does) makes the thread win that race about once in five.
    from rq import Queue

    from workers.worker import _SimpleWorker

    conn = redis.Redis.from_url(settings.redis_url or "")
    busy = threading.Event()

    def spin() -> None:
        while not busy.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    took = []
    try:
        for i in range(20):
            worker = _SimpleWorker([Queue(f"unsubscribe-{i}", connection=conn)], connection=conn,
                                   name=f"unsubscribe-{os.getpid()}-{i}")
            worker.subscribe()
            time.sleep(0.1)  # its thread now waits in get_message
            started = time.monotonic()
            worker.unsubscribe()
            took.append(time.monotonic() - started)
            assert not worker.pubsub_thread.is_alive()
    finally:
        busy.set()
        conn.close()
    assert max(took) < 5, [round(t, 2) for t in took]


def test_a_stop_signalled_just_before_rq_installs_its_handlers_ends_the_worker_at_once(
    settings: Settings,
) -> None:
    """The window between run_worker's last look at its stop and rq's own handlers: a
    SIGINT there reached only our handler, and rq then blocked in its dequeue (minutes)."""
    from workers.worker import MAINTENANCE_SECONDS, QUEUES, _SimpleWorker, queue

    conn = redis.Redis.from_url(settings.redis_url or "")
    worker = _SimpleWorker([queue(settings, name, conn) for name in QUEUES], connection=conn,
                           name=f"window-{os.getpid()}-{time.monotonic_ns()}",
                           maintenance_interval=MAINTENANCE_SECONDS)
    worker.stop_event = threading.Event()
    worker.stop_event.set()  # what our handler did with the signal
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    started = time.monotonic()
    try:
        assert worker.work(burst=False) is False
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
        conn.close()
    assert time.monotonic() - started < 10  # rq's dequeue would have blocked for minutes
