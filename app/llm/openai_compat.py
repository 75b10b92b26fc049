"""A provider for any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, ...).

`base_url` is used as-is: `{base_url}/chat/completions` is what gets POSTed, so it
normally ends in `/v1`, e.g. `http://localhost:11434/v1` or `https://api.openai.com/v1`.

Every failure leaves as `ProviderError` (code llm_unavailable, HTTP 503) with a
message naming the server and what went wrong; `_fail()` is the one place that
maps httpx's errors onto it:

    httpx.HTTPStatusError   -> "answered HTTP 401: <the server's error.message>"
    httpx.ConnectError      -> "cannot connect"
    httpx.TimeoutException  -> "sent nothing for N s" (a stalled stream counts)
    bad JSON / no [DONE]    -> "sent a malformed chunk" / "ended the stream early"

`timeout` bounds each wait (connect, and the gap between two chunks), not the
whole reply, so a long answer that keeps streaming is never cut off.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.llm.base import (
    ProviderError,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
)


@dataclass
class _PartialCall:
    """A tool call as its deltas arrive: id and name first, arguments in fragments."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class OpenAICompatProvider:
    """Streams one chat-completions step from `{base_url}/chat/completions`."""

    name = "openai_compat"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self._transport = transport
        self.url = f"{self.base_url}/chat/completions"

    def payload(self, messages: list[dict[str, Any]], tools: list[ToolSpec]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if tools:
            body["tools"] = [t.to_openai() for t in tools]
        return body

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec]
    ) -> AsyncIterator[ProviderEvent]:
        headers = {"Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        # One client per step: an httpx client is bound to the event loop that
        # first used it, and a step's cost is dominated by the model, not the dial.
        try:
            async with (
                httpx.AsyncClient(timeout=self.timeout, transport=self._transport) as client,
                client.stream(
                    "POST", self.url, json=self.payload(messages, tools), headers=headers
                ) as response,
            ):
                if response.status_code >= 400:
                    await response.aread()
                    raise ProviderError(
                        f"LLM server at {self.url} answered HTTP {response.status_code}: "
                        f"{_error_message(response)}"
                    )
                async for event in self._events(response):
                    yield event
        except httpx.HTTPError as e:
            raise self._fail(e) from e

    async def _events(self, response: httpx.Response) -> AsyncIterator[ProviderEvent]:
        calls: dict[int, _PartialCall] = {}
        finish: str | None = None
        usage: dict[str, int] = {}
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, ": keep-alive" comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = self._parse(data)
            if isinstance(chunk.get("usage"), dict):
                usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if isinstance(text, str) and text:
                    yield TextDelta(text)
                for position, part in enumerate(delta.get("tool_calls") or []):
                    _merge(calls, position, part)
                if choice.get("finish_reason"):
                    finish = str(choice["finish_reason"])
        if not done and finish is None:
            raise ProviderError(
                f"LLM server at {self.url} ended the stream before the model finished"
            )
        for index in sorted(calls):
            yield ToolCallRequest(self._complete(index, calls[index]))
        # Some servers say "stop" even when they asked for tools; the calls decide.
        yield StreamEnd("tool_calls" if calls else (finish or "stop"), usage)

    def _parse(self, data: str) -> dict[str, Any]:
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            raise ProviderError(
                f"LLM server at {self.url} sent a malformed chunk: {data[:200]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise ProviderError(f"LLM server at {self.url} sent a malformed chunk: {data[:200]!r}")
        if isinstance(chunk.get("error"), dict | str):
            # Servers that fail mid-stream send the error as one more data line.
            raise ProviderError(f"LLM server at {self.url} failed mid-stream: {_message(chunk)}")
        return chunk

    def _complete(self, index: int, partial: _PartialCall) -> ToolCall:
        raw = "".join(partial.arguments).strip() or "{}"
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict) or not partial.name:
            raise ProviderError(
                f"LLM server at {self.url} sent an unusable tool call #{index} "
                f"({partial.name or 'no name'}): arguments {raw[:200]!r}"
            )
        return ToolCall(partial.id or f"call_{secrets.token_hex(8)}", partial.name, arguments)

    def _fail(self, e: httpx.HTTPError) -> ProviderError:
        if isinstance(e, httpx.TimeoutException):
            return ProviderError(
                f"LLM server at {self.url} sent nothing for {self.timeout:g} s ({type(e).__name__})"
            )
        if isinstance(e, httpx.ConnectError):
            return ProviderError(f"cannot connect to the LLM server at {self.url}: {e}")
        return ProviderError(f"LLM request to {self.url} failed: {type(e).__name__}: {e}")


def _merge(calls: dict[int, _PartialCall], position: int, part: dict[str, Any]) -> None:
    # "index" is the spec; a few servers omit it and send each call whole, in order.
    index = part.get("index", position)
    call = calls.setdefault(int(index), _PartialCall())
    if part.get("id"):
        call.id = str(part["id"])
    fn = part.get("function") or {}
    if fn.get("name"):
        call.name = str(fn["name"])
    if isinstance(fn.get("arguments"), str):
        call.arguments.append(fn["arguments"])
    elif isinstance(fn.get("arguments"), dict):
        call.arguments.append(json.dumps(fn["arguments"]))


def _usage(raw: dict[str, Any]) -> dict[str, int]:
    return {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return json.dumps(body)[:300]


def _error_message(response: httpx.Response) -> str:
    """OpenAI's `{"error": {"message"}}` when the server sends it, else the body's start."""
    try:
        return _message(response.json())
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
