"""The app on a real uvicorn on loopback, and the official `openai` SDK pointed at it."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import uvicorn

from app.api import create_app
from app.auth import issue_token
from app.settings import Settings
from app.stack.embedded import free_port


@contextlib.contextmanager
def served(settings: Settings, **changes: Any) -> Iterator[str]:
    """create_app(settings with `changes`) with its lifespan, in a thread; yields the base URL."""
    port = free_port()
    app = create_app(dataclasses.replace(settings, **changes))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name=f"app-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the app on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def sdk(base: str, settings: Settings, user: str) -> openai.OpenAI:
    """The SDK as a user of this server would set it up; no retries (a 429 is the answer).
    Tests take it from the `sdk` fixture (conftest), which closes every client it made."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key=issue_token(settings.auth_secret or "",
                                                                     user), max_retries=0)


class Clients:
    """SDK clients made during one test, closed at its end (their sockets, pooled)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.made: list[openai.OpenAI] = []

    def __call__(self, base: str, user: str) -> openai.OpenAI:
        client = sdk(base, self.settings, user)
        self.made.append(client)
        return client

    def close(self) -> None:
        for client in self.made:
            client.close()
