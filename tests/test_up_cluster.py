"""`backbone up --cluster`: the session plane on the embedded Redis Cluster, for real."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import redis

from app.auth import issue_token
from app.stack.embedded import free_port
from app.stores import keys
from tests.sse import frames
from tests.test_cli import _env, _port_is_free, _wait_ready

SECRET = "up-cluster-test-secret-long-enough-for-hs256"


def test_up_with_cluster_keeps_sessions_on_the_cluster_and_stops_it_on_ctrl_c(
    scratch_dir: Path,
) -> None:
    data = scratch_dir / "data"
    redis_port, app_port = free_port(), free_port()
    env = _env(DATA_DIR=str(data), EMBEDDED_REDIS_PORT=str(redis_port), PORT=str(app_port),
               AUTH_SECRET=SECRET, OFFLINE_TOKEN_DELAY_MS="0")
    env.pop("SESSION_REDIS_URL", None)
    env.pop("SESSION_REDIS_CLUSTER", None)
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "up", "--cluster"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{app_port}"
        _wait_ready(f"{base}/readyz", proc)
        ports = json.loads((data / "cluster" / "ports.json").read_text())["ports"]
        h = {"Authorization": f"Bearer {issue_token(SECRET, 'carol')}"}
        sid = httpx.post(f"{base}/v1/sessions", headers=h, timeout=10).json()["id"]
        with httpx.stream("POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
                          json={"content": "What is Redis?"}, timeout=60) as res:
            assert res.status_code == 200
            got = frames(res.iter_lines())
        assert got[-1].event == "message.done"

        sessions = redis.RedisCluster(host="127.0.0.1", port=ports[0])
        single = redis.Redis(port=redis_port)
        try:
            history = json.loads(sessions.execute_command(  # type: ignore[no-untyped-call]
                "JSON.GET", keys.session(sid), "$"))[0]
            assert history[0]["role"] == "user"
            assert history[-1]["role"] == "assistant"
            assert not single.exists(keys.session(sid))  # not on the search/queue plane
        finally:
            sessions.close()
            single.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "Redis Cluster, 3 primaries + 3 replicas" in out
    assert all(_port_is_free(p) for p in [*ports, redis_port, app_port])
