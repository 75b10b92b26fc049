"""Stand-ins for services that cannot run here, speaking their real wire formats.

A real uvicorn serves each one on 127.0.0.1 in a thread, so the code under test
goes through httpx, sockets and chunked encoding exactly as in production.

    from fakes import FakeOpenAI, FakeSearxng, Failure, Stream, text_reply, tool_call_reply

    fake = FakeOpenAI()
    fake.script(tool_call_reply("kb_search", {"query": "hnsw"}), text_reply("Done."))
    with fake.serve() as base:                 # base = "http://127.0.0.1:<port>"
        provider = OpenAICompatProvider(base + "/v1", "test-model", timeout=5)
        ...
    fake.requests                              # every JSON body POSTed, in order

Replies are taken from the script in order; when it runs out, `fake.responder`
(a function of the request body) is asked, else the fake answers HTTP 500.
`FakeSearxng(results)` serves `/search`; set `.failure = Failure(500, "...")` to
make it fail. (tests/ has no __init__.py: pytest puts it on sys.path, so the
module is imported as `fakes`.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.stack.embedded import free_port


@dataclass
class Stream:
    """A 200 text/event-stream reply: each chunk becomes one `data:` event.

    dicts are JSON-encoded, strings sent as they are (to send malformed data).
    `stall_after` chunks, the server goes silent for `stall_seconds`.
    """

    chunks: list[dict[str, Any] | str]
    done: bool = True
    stall_after: int | None = None
    stall_seconds: float = 30.0


@dataclass
class Failure:
    status: int
    body: dict[str, Any] | str = field(default_factory=dict)


Reply = Stream | Failure


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(prompt: int = 11, completion: int = 7) -> dict[str, Any]:
    """The last chunk OpenAI sends with stream_options.include_usage: no choices."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def text_reply(text: str, *, pieces: int = 3, usage: bool = True) -> Stream:
    """The text split over `pieces` content deltas, then finish "stop", usage, [DONE]."""
    step = max(1, -(-len(text) // pieces))
    chunks: list[dict[str, Any] | str] = [_chunk({"role": "assistant", "content": ""})]
    chunks += [_chunk({"content": text[i : i + step]}) for i in range(0, len(text), step)]
    chunks.append(_chunk({}, "stop"))
    if usage:
        chunks.append(usage_chunk())
    return Stream(chunks)


def tool_call_reply(
    name: str, arguments: dict[str, Any], *, call_id: str = "call_fake_1", index: int = 0
) -> Stream:
    """One tool call the way OpenAI streams it: id and name, then the arguments in pieces."""
    raw = json.dumps(arguments)
    third = max(1, len(raw) // 3)
    head = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }
    chunks: list[dict[str, Any] | str] = [
        _chunk({"role": "assistant", "content": None, "tool_calls": [head]})
    ]
    for i in range(0, len(raw), third):
        part = {"index": index, "function": {"arguments": raw[i : i + third]}}
        chunks.append(_chunk({"tool_calls": [part]}))
    chunks += [_chunk({}, "tool_calls"), usage_chunk()]
    return Stream(chunks)


class FakeOpenAI:
    """POST /v1/chat/completions (and /chat/completions) with streamed replies."""

    def __init__(self, responder: Callable[[dict[str, Any]], Reply] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.responder = responder
        self._script: deque[Reply] = deque()
        self.closing = threading.Event()
        routes = [
            Route("/v1/chat/completions", self._completions, methods=["POST"]),
            Route("/chat/completions", self._completions, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    def script(self, *replies: Reply) -> None:
        self._script.extend(replies)

    def serve(self) -> AbstractContextManager[str]:
        """Serve on a free loopback port; yields the base URL (append "/v1")."""
        return serve(self.app, closing=self.closing)

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self._script:
            reply = self._script.popleft()
        elif self.responder is not None:
            reply = self.responder(body)
        else:
            reply = Failure(500, {"error": {"message": "the fake has no reply scripted"}})
        if isinstance(reply, Failure):
            if isinstance(reply.body, str):
                return Response(reply.body, status_code=reply.status, media_type="text/plain")
            return JSONResponse(reply.body, status_code=reply.status)
        return StreamingResponse(self._sse(reply), media_type="text/event-stream")

    async def _sse(self, reply: Stream) -> AsyncIterator[str]:
        for n, chunk in enumerate(reply.chunks):
            if reply.stall_after is not None and n == reply.stall_after:
                await self._stall(reply.stall_seconds)
            yield f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}\n\n"
        if reply.stall_after is not None and reply.stall_after >= len(reply.chunks):
            await self._stall(reply.stall_seconds)
        if reply.done:
            yield "data: [DONE]\n\n"

    async def _stall(self, seconds: float) -> None:
        # Short sleeps, so stopping the server never waits for a long stall.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.closing.is_set():
            await asyncio.sleep(0.05)


class FakeSearxng:
    """GET /search?q=...&format=json answering SearxNG's JSON shape."""

    def __init__(self, results: list[dict[str, Any]] | None = None, delay: float = 0.0) -> None:
        self.results = results if results is not None else []
        self.delay = delay  # seconds each answer takes: a real engine's latency
        self.failure: Failure | None = None
        self.queries: list[dict[str, str]] = []
        self.closing = threading.Event()
        self.app = Starlette(routes=[Route("/search", self._search, methods=["GET"])])

    def serve(self) -> AbstractContextManager[str]:
        return serve(self.app, closing=self.closing)

    async def _search(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.queries.append(params)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failure is not None:
            body = self.failure.body
            if isinstance(body, str):
                return Response(body, status_code=self.failure.status, media_type="text/html")
            return JSONResponse(body, status_code=self.failure.status)
        if params.get("format") != "json":
            # What SearxNG does when the json format is not enabled in settings.yml.
            return Response("Forbidden", status_code=403)
        return JSONResponse(
            {
                "query": params.get("q", ""),
                "number_of_results": len(self.results),
                "results": self.results,
                "answers": [],
                "corrections": [],
                "infoboxes": [],
                "suggestions": [],
                "unresponsive_engines": [],
            }
        )


def searx_result(url: str, title: str, content: str, score: float = 1.0) -> dict[str, Any]:
    return {
        "url": url,
        "title": title,
        "content": content,
        "engine": "fake",
        "engines": ["fake"],
        "score": score,
        "category": "general",
    }


@contextmanager
def serve(app: Starlette, *, closing: threading.Event | None = None) -> Iterator[str]:
    """Run `app` on a free loopback port in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="error",
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"fake-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"fake server on port {port} did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        if closing is not None:
            closing.set()
        server.should_exit = True
        thread.join(timeout=10)
