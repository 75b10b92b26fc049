"""Logging: plain text, or one JSON object per record with `LOG_FORMAT=json`.

Each record carries the ids of what it happened in, from contextvars set by
the request middleware (`request_id`, `session`) and by the turn (`turn`); an
asyncio task started during a request inherits them. Secrets never reach the
output: the formatter masks bearer tokens (`Bearer <jwt>`), anything shaped like
a JWT, and the literal values registered with `redact` (AUTH_SECRET, store
passwords), whatever the message or traceback holds.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)
SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar("session", default=None)
TURN: contextvars.ContextVar[int | None] = contextvars.ContextVar("turn", default=None)

_BEARER = re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_SESSION_PATH = re.compile(r"^/v1/sessions/([0-9a-f]{32})(?:/|$)")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_secrets: set[str] = set()

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]
log = logging.getLogger("backbone.http")


def redact(*values: str | None) -> None:
    """Never print these (secrets of 8 characters or more)."""
    _secrets.update(v for v in values if v and len(v) >= 8)


def scrub(text: str) -> str:
    text = _BEARER.sub("Bearer [redacted]", text)
    text = _JWT.sub("[redacted-jwt]", text)
    for secret in _secrets:
        text = text.replace(secret, "[redacted]")
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for name, var in (("request_id", REQUEST_ID), ("session", SESSION), ("turn", TURN)):
            value = var.get()
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record))


def setup(level: str, fmt: str) -> None:
    """Configure the root logger once: `fmt` is "json" or "text"."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class RequestIds:
    """ASGI middleware: a request id (the caller's X-Request-ID if sane, else new),
    echoed in the response, and the session id of the path, for every log line;
    one access line per request (method, path, status, ms; never headers or query)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        path = str(scope.get("path", ""))
        m = _SESSION_PATH.match(path)
        tokens = (REQUEST_ID.set(rid), SESSION.set(m.group(1) if m else None))
        started, status = time.perf_counter(), 0

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %d %.1f ms", scope.get("method"), path, status,
                     (time.perf_counter() - started) * 1000)
            REQUEST_ID.reset(tokens[0])
            SESSION.reset(tokens[1])
