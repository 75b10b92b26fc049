"""The whole stack for load benchmarks: stores (REDIS_URL / DATABASE_URL or embedded)
and N real `backbone serve` processes on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import redis

from app.auth import issue_token
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths, sample_corpus_dir
from app.settings import Settings
from app.stack.bootstrap import prepare
from app.stack.embedded import EmbeddedStack, free_port

SECRET = "bench-secret-bench-secret-bench-secret!!"


@contextlib.contextmanager
def stores() -> Iterator[Settings]:
    with tempfile.TemporaryDirectory(prefix="bench-stack-") as tmp:
        base = dataclasses.replace(Settings.from_env(), data_dir=Path(tmp), auth_secret=SECRET)
        stack = EmbeddedStack(base, redis_port=free_port())
        settings = stack.start()
        try:
            prepare(settings)
            client = redis.Redis.from_url(settings.redis_url or "")
            ingest_paths(client, shared_embedder(), [sample_corpus_dir()], progress=False)
            client.close()
            yield settings
        finally:
            stack.stop()


@contextlib.contextmanager
def servers(
    settings: Settings, count: int = 1, *, pids: list[int] | None = None,
    cwd: Path | None = None, **env: str,
) -> Iterator[list[str]]:
    """`count` app processes; their pids are appended to `pids` (for `cpu_seconds`).
    `cwd`: run the `app` package of another checkout (a side-by-side comparison)."""
    procs, urls = [], []
    try:
        for _ in range(count):
            port = free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "app.cli", "serve"],
                env={**os.environ, "REDIS_URL": settings.redis_url or "",
                     "DATABASE_URL": settings.database_url or "", "AUTH_SECRET": SECRET,
                     "PORT": str(port), "LOG_LEVEL": "WARNING", **env},
                cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
            if pids is not None:
                pids.append(procs[-1].pid)
        for url in urls:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not become ready")
                time.sleep(0.2)
        yield urls
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes have used so far (from /proc), so a bench can
    charge the app's CPU per turn and not only wall time on a shared machine."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def token(user: str) -> str:
    return issue_token(SECRET, user)


@contextlib.contextmanager
def workers(settings: Settings, count: int = 1, **env: str) -> Iterator[None]:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker"],
        env={**os.environ, "REDIS_URL": settings.redis_url or "",
             "DATABASE_URL": settings.database_url or "", "AUTH_SECRET": SECRET,
             "LOG_LEVEL": "WARNING", **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


@dataclasses.dataclass(frozen=True)
class Face:
    """How one protocol streams a turn, so one reader serves both faces: the route and
    body of a turn, the event that ends it (its data, or its `done_key`, is `done`), the
    text delta event and its text field, and what the server sends before the turn has
    done anything (`preamble`, not counted as the first event)."""

    name: str
    last: str
    delta: str
    delta_key: str
    preamble: tuple[str, ...] = ()
    done_key: str | None = None

    def request(self, sid: str, content: str) -> tuple[str, dict[str, object]]:
        if self.name == "responses":
            return "/v1/responses", {"model": "bench", "conversation": f"conv_{sid}",
                                     "input": content, "stream": True}
        return f"/v1/sessions/{sid}/messages", {"content": content}


NATIVE = Face("native", "message.done", "message.delta", "text")
RESPONSES = Face("responses", "response.completed", "response.output_text.delta", "delta",
                 preamble=("response.created", "response.in_progress"), done_key="response")
FACES = {f.name: f for f in (NATIVE, RESPONSES)}


@dataclasses.dataclass
class TurnOutcome:
    ttfe_ms: float | None = None
    total_ms: float = 0.0
    done: dict[str, object] | None = None
    error: str | None = None
    gaps_ms: list[float] = dataclasses.field(default_factory=list)  # between events
    text_chars: int = 0  # characters of the text deltas received
    text_span_ms: float = 0.0  # first text delta to the last
    _last_ms: float = dataclasses.field(default=0.0, repr=False)
    _first_text_ms: float | None = dataclasses.field(default=None, repr=False)

    def on_event(self, face: Face, event: str, data: bytes | str, started: float) -> None:
        """One named SSE event (not a ping comment) as it arrives: the first event, the
        gap since the previous one, the text deltas, the end or an error. The preamble
        counts for neither: its wait for the turn's first event is the first event's."""
        now = (time.perf_counter() - started) * 1000
        if self.ttfe_ms is None:
            if event in face.preamble:
                return
            self.ttfe_ms = now
        else:
            self.gaps_ms.append(now - self._last_ms)
        self._last_ms = now
        if event == face.delta:
            if self._first_text_ms is None:
                self._first_text_ms = now
            self.text_chars += len(json.loads(data)[face.delta_key])
            self.text_span_ms = now - self._first_text_ms
        elif event == face.last:
            parsed = json.loads(data)
            self.done = parsed[face.done_key] if face.done_key else parsed
        elif event == "error":
            self.error = str(json.loads(data)["code"])



async def post_turn(
    client: httpx.AsyncClient, base: str, sid: str, headers: dict[str, str], content: str
) -> TurnOutcome:
    """One chat turn over SSE, read to its end."""
    return await read_turn(client, base, sid, headers, content, NATIVE)


async def post_response(
    client: httpx.AsyncClient, base: str, sid: str, headers: dict[str, str], content: str
) -> TurnOutcome:
    """The same turn through the OpenAI-compatible face: `POST /v1/responses` streamed in
    the session's conversation, read to `response.completed` (its response is `done`)."""
    return await read_turn(client, base, sid, headers, content, RESPONSES)


async def read_turn(
    client: httpx.AsyncClient, base: str, sid: str, headers: dict[str, str], content: str,
    face: Face,
) -> TurnOutcome:
    """POST a turn through `face` with httpx, read the SSE stream to its end."""
    out = TurnOutcome()
    path, body = face.request(sid, content)
    started = time.perf_counter()
    event = ""
    try:
        async with client.stream("POST", base + path, headers=headers, json=body) as res:
            if res.status_code != 200:
                out.error = f"HTTP {res.status_code}"
                return out
            async for line in res.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event:
                    out.on_event(face, event, line[5:], started)
                    event = ""
    except httpx.HTTPError as e:
        out.error = type(e).__name__
    out.total_ms = (time.perf_counter() - started) * 1000
    if out.done is None and out.error is None:
        out.error = f"stream ended without {face.last}"
    return out
