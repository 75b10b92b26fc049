"""The `backbone` command as a user runs it, against real processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from app.auth import verify_token
from app.settings import Settings
from app.stack.embedded import free_port

BACKBONE = [sys.executable, "-m", "app.cli"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(extra)
    return env


def _wait_ready(url: str, proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"backbone up exited early: {proc.communicate()[0]}")
        try:
            res = httpx.get(url, timeout=2)
            if res.status_code == 200:
                body: dict[str, object] = res.json()
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} never became ready")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    return out


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_up_starts_everything_stops_it_on_ctrl_c_and_a_second_run_keeps_the_data(
    scratch_dir: Path,
) -> None:
    tmp_path = scratch_dir
    redis_port, app_port = free_port(), free_port()
    env = _env(DATA_DIR=str(tmp_path / "data"), EMBEDDED_REDIS_PORT=str(redis_port),
               PORT=str(app_port), AUTH_SECRET="cli-test-secret-long-enough-for-hs256")
    proc = subprocess.Popen([*BACKBONE, "up"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        body = _wait_ready(f"http://127.0.0.1:{app_port}/readyz", proc)
        assert body["ready"] is True and all(body["checks"].values())  # type: ignore[attr-defined]
        r = redis.Redis(port=redis_port)
        assert {b"idx:cache", b"idx:kb", b"idx:memory"} <= set(r.execute_command("FT._LIST"))  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + 30
        while not r.smembers("rq:workers") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.smembers("rq:workers"), "the rq worker did not register"
        r.set("survives-restart", "1")
        r.close()
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert f"redis-cli -p {redis_port}" in out
    assert "data folder" in out
    # The app and the worker get the stores' URLs from `up`: nothing is missing.
    assert "no running `backbone up` recorded" not in out, out
    # The banner's command for another user's token runs as printed, from here.
    printed = re.search(r"another: (.+ token --user NAME)\)", out)
    assert printed is not None, out
    command = shlex.split(printed.group(1).replace("NAME", "banner-user"))
    assert "/" in command[0] or shutil.which(command[0]), command  # not a bare venv name
    made = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert verify_token(env["AUTH_SECRET"], made.stdout.strip()) == "banner-user"
    assert _port_is_free(redis_port) and _port_is_free(app_port)
    assert (tmp_path / "data" / "redis").is_dir() and (tmp_path / "data" / "postgres").is_dir()

    again = subprocess.Popen([*BACKBONE, "up"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(f"http://127.0.0.1:{app_port}/readyz", again)
        r = redis.Redis(port=redis_port)
        assert r.get("survives-restart") == b"1"
        r.close()
    finally:
        _stop(again)
    assert again.returncode == 0


def test_up_refuses_a_taken_app_port_before_starting_anything(scratch_dir: Path) -> None:
    redis_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        app_port = taken.getsockname()[1]
        env = _env(DATA_DIR=str(scratch_dir / "data"), EMBEDDED_REDIS_PORT=str(redis_port),
                   PORT=str(app_port), AUTH_SECRET="cli-test-secret-long-enough-for-hs256")
        done = subprocess.run([*BACKBONE, "up"], env=env, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"the app cannot listen on 127.0.0.1:{app_port}" in done.stderr
    assert "pick another with PORT" in done.stderr
    assert "starting the stores" not in done.stdout and "is up" not in done.stdout
    assert _port_is_free(redis_port)
    assert not (scratch_dir / "data" / "redis").exists()
    assert not (scratch_dir / "data" / "postgres").exists()


def test_doctor_reports_modules_indexes_and_migrations_and_exits_zero(settings: Settings) -> None:
    res = subprocess.run(
        [*BACKBONE, "doctor"], capture_output=True, text=True, timeout=60,
        env=_env(REDIS_URL=settings.redis_url or "", DATABASE_URL=settings.database_url or ""),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    assert {"search", "ReJSON"} <= set(report["redis"]["modules"])
    assert all(i["exists"] for i in report["redis"]["indexes"].values())
    # The embedded Redis runs noeviction: nothing can evict unpersisted history.
    assert report["redis"]["eviction_warning"] is None
    assert report["postgres"]["migrations_pending"] == []


def test_doctor_fails_clearly_when_the_embedded_stores_are_not_running(tmp_path: Path) -> None:
    res = subprocess.run(
        [*BACKBONE, "doctor"], capture_output=True, text=True, timeout=60,
        env=_env(DATA_DIR=str(tmp_path), EMBEDDED_REDIS_PORT=str(free_port())),
    )
    assert res.returncode == 1
    report = json.loads(res.stdout)
    assert "not running" in report["redis"]["error"]
    assert "not running" in report["postgres"]["error"]


def test_index_info_lists_every_index(settings: Settings) -> None:
    res = subprocess.run(
        [*BACKBONE, "index", "info"], capture_output=True, text=True, timeout=60,
        env=_env(REDIS_URL=settings.redis_url or "", DATABASE_URL=settings.database_url or ""),
    )
    assert res.returncode == 0, res.stderr
    assert set(json.loads(res.stdout)) == {"idx:cache", "idx:kb", "idx:memory"}


def test_commands_next_to_a_running_up_use_its_stores_whatever_port_they_were_given(
    scratch_dir: Path,
) -> None:
    data, redis_port, app_port = scratch_dir / "data", free_port(), free_port()
    up_env = _env(DATA_DIR=str(data), EMBEDDED_REDIS_PORT=str(redis_port), PORT=str(app_port),
                  AUTH_SECRET="cli-test-secret-long-enough-for-hs256")
    # The user forgot the port `make run` was given: nothing listens on this one.
    bare = _env(DATA_DIR=str(data), EMBEDDED_REDIS_PORT=str(free_port()))
    doc = scratch_dir / "note.md"
    doc.write_text("# Quokkas\n\nThe quokka of Rottnest Island smiles for photographs.\n")
    proc = subprocess.Popen([*BACKBONE, "up"], env=up_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(f"http://127.0.0.1:{app_port}/readyz", proc)
        recorded = json.loads((data / "running-stack.json").read_text())
        assert recorded["pid"] == proc.pid and f":{redis_port}/" in recorded["redis_url"]

        doctor = subprocess.run([*BACKBONE, "doctor"], capture_output=True, text=True,
                                timeout=120, env=bare)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        report = json.loads(doctor.stdout)
        assert f":{redis_port}/" in report["redis"]["url"]
        assert f"pid {proc.pid}" in report["stack"]

        ingest = subprocess.run([*BACKBONE, "ingest", "--quiet", str(doc)], capture_output=True,
                                text=True, timeout=300, env=bare)
        assert ingest.returncode == 0, ingest.stdout + ingest.stderr
        assert "using the running `backbone up`" in ingest.stderr
        assert "1 ingested" in ingest.stdout
        r = redis.Redis(port=redis_port)
        assert any(b"Rottnest" in (r.hget(k, "text") or b"") for k in r.scan_iter("kb:*"))
        r.close()

        for argv in (["index", "info"], ["cache", "stats"]):
            res = subprocess.run([*BACKBONE, *argv], capture_output=True, text=True,
                                 timeout=120, env=bare)
            assert res.returncode == 0, (argv, res.stderr)
            assert f"pid {proc.pid}" in res.stderr

        second = subprocess.run([*BACKBONE, "up"], capture_output=True, text=True, timeout=120,
                                env=bare)
        assert second.returncode == 2 and "already runs" in second.stderr
        # The commands above stopped nothing of the running stack.
        assert httpx.get(f"http://127.0.0.1:{app_port}/readyz", timeout=5).status_code == 200
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out
    assert not (data / "running-stack.json").exists()
    after = subprocess.run([*BACKBONE, "doctor"], capture_output=True, text=True, timeout=60,
                           env=bare)
    assert after.returncode == 1 and "no running `backbone up`" in json.loads(after.stdout)["stack"]
