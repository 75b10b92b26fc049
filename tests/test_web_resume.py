"""The page resumes a dropped turn with the browser's own EventSource.

A small TCP proxy between Chromium and the app cuts the POST's stream after some
bytes (mid-turn), and then the first resumed stream too, so the resume goes
through EventSource's automatic Last-Event-ID reconnect. The page must end with
the whole answer as stored, each event once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from live import app_process
from test_web_page import Page, chromium_page

from app.auth import issue_token
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings


class CuttingProxy:
    """Loopback TCP to `target`; for each of `cuts`, the first connection carrying a
    request whose first line holds it is closed after `after` bytes of its response."""

    def __init__(self, target: int, cuts: list[bytes], after: int) -> None:
        self.target, self.after = target, after
        self.pending = list(cuts)
        self.cut: list[bytes] = []  # which requests were cut, in order
        self.requests: list[bytes] = []  # every request head seen
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            armed: list[int] = []  # bytes of response left before the cut, once armed
            threading.Thread(target=self._up, args=(client, upstream, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, armed),
                             daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, armed: list[int]) -> None:
        while data := _recv(client):
            with self.lock:
                self.requests.append(data.split(b"\r\n\r\n")[0])
                line = data.split(b"\r\n", 1)[0]
                hit = next((c for c in self.pending if c in line), None)
                if hit is not None and not armed:
                    self.pending.remove(hit)
                    self.cut.append(hit)
                    armed.append(self.after)
            try:
                upstream.sendall(data)
            except OSError:
                break
        _close(client, upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, armed: list[int]) -> None:
        while data := _recv(upstream):
            if armed:
                if len(data) >= armed[0]:
                    client.sendall(data[: armed[0]])
                    break  # cut mid-stream: both sides close
                armed[0] -= len(data)
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client, upstream)

    def close(self) -> None:
        self.server.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@pytest.fixture
def chromium() -> Iterator[Page]:
    with chromium_page() as page:
        yield page


def test_the_page_resumes_a_dropped_turn_with_eventsource_and_shows_each_event_once(
    chromium: Page, settings: Settings, user: str
) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(),
                 [Path(__file__).resolve().parent.parent / "app" / "kb" / "corpus"],
                 progress=False)
    client.close()
    page = chromium
    token = issue_token(settings.auth_secret or "", user)
    auth = {"Authorization": f"Bearer {token}"}
    with app_process(settings, OFFLINE_TOKEN_DELAY_MS="20") as (base, _):
        proxy = CuttingProxy(int(base.rsplit(":", 1)[1]), after=1500,
                             cuts=[b"/messages HTTP", b"/events?"])
        try:
            front = f"http://127.0.0.1:{proxy.port}"
            page.eval(f"location.href = {json.dumps(front + '/#token=' + token)}")
            page.wait_for("document.readyState === 'complete' && "
                          "!!document.getElementById('composer')")
            page.eval("document.getElementById('input').value = 'How does AOF persistence "
                      "work?'; document.getElementById('send').click(); true")
            shown = page.wait_for(
                "document.getElementById('status').textContent.startsWith('done') && "
                "document.querySelector('.msg.assistant .body').textContent")
            tools = page.eval("document.querySelectorAll('.tool').length")
            errors = page.eval("document.querySelectorAll('.msg.error').length")
        finally:
            proxy.close()
        posts = [r.decode() for r in proxy.requests if b"/messages HTTP" in r]
        sid = posts[0].split("/")[3]
        history = httpx.get(f"{base}/v1/sessions/{sid}", headers=auth).json()["messages"]
    assert len(proxy.cut) == 2, proxy.cut  # both the POST and the first resume were cut
    heads = [r.decode() for r in proxy.requests if r.startswith(b"GET /v1/sessions/")]
    resumes = [h for h in heads if "/events?" in h]
    assert len(resumes) >= 2 and "token=" in resumes[0]
    assert "authorization" not in resumes[0].lower()  # EventSource sends no header of ours
    assert "last-event-id:" in resumes[-1].lower()  # its own reconnect
    assert shown == history[-1]["content"]  # the whole answer, no event twice
    assert tools == 1 and errors == 0
