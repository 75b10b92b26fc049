"""Stopping a node mid-turn: the live client is told (an `error` event, code
`server_stopping`, also in the turn's event log for a resumer), what the turn
stored is persisted, and the shutdown logs no traceback. A real `backbone serve`
stopped with SIGTERM, as systemd and Kubernetes stop it; `backbone up` relays its
Ctrl-C to each child once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from live import app_process
from sse import frames
from waits import wait_until

from app.chat import event_log
from app.settings import Settings
from app.stack.supervisor import ProcessChild
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
