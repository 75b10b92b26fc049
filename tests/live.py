"""Real `backbone serve` processes on loopback, for tests that need a real server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

from app.settings import Settings
from app.stack.embedded import free_port


@contextlib.contextmanager
def app_process(settings: Settings, **env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `backbone serve` against the test stores; yield (base URL, process)."""
    port = free_port()
    full_env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "SESSION_REDIS_URL": settings.session_redis_url or "",
        "SESSION_REDIS_CLUSTER": "1" if settings.session_redis_cluster else "0",
        "AUTH_SECRET": settings.auth_secret or "",
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        **env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"backbone serve exited: {proc.communicate()[0]}")
            if time.monotonic() > deadline:
                raise RuntimeError("backbone serve did not become ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout:
            proc.stdout.close()
