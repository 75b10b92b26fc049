"""Waiting for what happens after a response: a turn's task persists after its stream ends."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import redis

from app.stores import keys


def settle(r: redis.Redis, pg: psycopg.Connection[Any], sid: str) -> None:
    """Wait until the turn's task has persisted it: the stream may end before that."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        live = r.execute_command("JSON.ARRLEN", keys.session(sid), "$") or [0]  # type: ignore[no-untyped-call]
        stored = pg.execute("SELECT count(*) FROM messages WHERE session_id = %s",
                            (sid,)).fetchone()
        if r.zscore(keys.unpersisted(sid), sid) is None and stored == (live[0],):
            return
        time.sleep(0.02)
    raise AssertionError(f"session {sid} was not persisted within 15 s")


def wait_until(check: Any, what: str, timeout: float = 15.0) -> None:
    """Poll `check()` until it is true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
