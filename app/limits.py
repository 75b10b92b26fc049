"""Request limits, in one place; each is documented in docs/http-api.md."""

from __future__ import annotations

import json
import math
import secrets
import time
from typing import Any

import redis.asyncio as aredis
from starlette.requests import Request

from app.errors import PayloadTooLarge, RateLimited, Unprocessable
from app.ops import tracing
from app.settings import Settings
from app.stores import keys, scripts

MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 16_000
MAX_SESSION_MESSAGES = 5_000


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 413 when too large, 422 when not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Unprocessable("the body must be a JSON object") from None
    except RecursionError:  # e.g. 64 KiB of '[': within the size limit, past the parser's depth
        raise Unprocessable("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise Unprocessable("the body must be a JSON object")
    return body


def message_content(body: dict[str, Any]) -> str:
    content = body.get("content")
    if not isinstance(content, str):
        raise Unprocessable("'content' must be a string")
    if not content.strip():
        raise Unprocessable("'content' is empty")
    if len(content) > MAX_MESSAGE_CHARS:
        raise PayloadTooLarge(f"'content' is limited to {MAX_MESSAGE_CHARS} characters")
    if "\x00" in content:
        raise Unprocessable("'content' may not contain NUL characters")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is legal JSON, not storable text
        raise Unprocessable("'content' must be valid Unicode (no lone surrogates)") from None
    return content


def check_room(history_length: int, adding: int = 1) -> None:
    if history_length + adding > MAX_SESSION_MESSAGES:
        raise PayloadTooLarge(
            f"a session holds at most {MAX_SESSION_MESSAGES} messages; start a new one",
            code="session_full",
        )


async def check_session_rate(client: aredis.Redis, settings: Settings, user: str) -> None:
    """429 with Retry-After once the user created RATE_LIMIT_SESSIONS sessions within the
    window: one Lua round trip on `ratelimit:{<uid>}:sessions`, apart from message posts."""
    window = settings.rate_limit_window_seconds
    with tracing.untraced():  # admission: no span (app.ops.tracing)
        ok, value = await scripts.arun(client, scripts.rate_limit(
            user, int(time.time() * 1000), window * 1000, settings.rate_limit_sessions,
            secrets.token_hex(8), key=keys.session_rate_limit(user),
        ))
    if not ok:
        raise RateLimited(
            f"at most {settings.rate_limit_sessions} new sessions per {window} s",
            retry_after=math.ceil(value / 1000),
        )
