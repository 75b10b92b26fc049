"""The bodies of the memory routes (REST and the MCP tools alike), checked into typed requests.

Anything wrong is a 422 `invalid_body` (400 `invalid_session_id` for a malformed
session id) raised before anything is read or written. Fields a body may not
carry are refused too, so a misspelt filter (`kind` for `kinds`) does not
silently search everything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from app.errors import Unprocessable
from app.memory.facts import KINDS, MAX_CONTENT_CHARS, Kind, clean_content
from app.stores import keys

DEFAULT_KIND: Kind = "note"
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
MAX_QUERY_CHARS = 2_000


@dataclass(frozen=True)
class AddRequest:
    content: str
    kind: Kind = DEFAULT_KIND
    session_id: str | None = None


@dataclass(frozen=True)
class UpdateRequest:
    content: str | None = None
    kind: Kind | None = None


@dataclass(frozen=True)
class SearchRequest:
    text: str
    kinds: tuple[Kind, ...] = ()
    session_id: str | None = None
    since: float | None = None  # seconds since the epoch, bounds updated_at (inclusive)
    until: float | None = None
    limit: int = DEFAULT_LIMIT
    max_distance: float | None = None  # cosine distance, 0..2; None: no bound


def _only(body: Mapping[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise Unprocessable(f"unknown field(s) {', '.join(map(repr, extra))}; "
                            f"expected some of {', '.join(sorted(allowed))}")


def content(value: Any) -> str:
    """A memory's text: cleaned as the extractors clean theirs, 1-200 characters."""
    if not isinstance(value, str):
        raise Unprocessable("'content' must be a string")
    if "\x00" in value:
        raise Unprocessable("'content' may not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Unprocessable("'content' must be valid Unicode (no lone surrogates)") from None
    text = clean_content(value)
    if not text:
        raise Unprocessable("'content' is empty")
    if len(text) > MAX_CONTENT_CHARS:
        raise Unprocessable(f"'content' is limited to {MAX_CONTENT_CHARS} characters")
    return text


def kind(value: Any, field: str = "kind") -> Kind:
    if not isinstance(value, str) or value not in KINDS:
        raise Unprocessable(f"'{field}' must be one of {', '.join(sorted(KINDS))}")
    return cast(Kind, value)


def session_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Unprocessable("'session_id' must be a string")
    return keys.check_session_id(value)


def _time(value: Any, field: str) -> float | None:
    """Seconds since the epoch, or an ISO 8601 time with its offset."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed.timestamp()
    raise Unprocessable(
        f"'{field}' must be seconds since the epoch or an ISO 8601 time with an offset"
    )


def add_request(body: Mapping[str, Any]) -> AddRequest:
    _only(body, {"content", "kind", "session_id"})
    return AddRequest(
        content(body.get("content")),
        kind(body.get("kind", DEFAULT_KIND)),
        session_id(body.get("session_id")),
    )


def update_request(body: Mapping[str, Any]) -> UpdateRequest:
    _only(body, {"content", "kind"})
    if body.get("content") is None and body.get("kind") is None:
        raise Unprocessable("send 'content', 'kind' or both")
    return UpdateRequest(
        None if body.get("content") is None else content(body["content"]),
        None if body.get("kind") is None else kind(body["kind"]),
    )


def search_request(body: Mapping[str, Any]) -> SearchRequest:
    _only(body, {"text", "kinds", "session_id", "since", "until", "limit", "max_distance"})
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise Unprocessable("'text' must be a non-empty string")
    if len(text) > MAX_QUERY_CHARS or "\x00" in text:
        raise Unprocessable(f"'text' must be at most {MAX_QUERY_CHARS} characters, no NUL")
    kinds = body.get("kinds")
    if kinds is not None and not isinstance(kinds, list):
        raise Unprocessable("'kinds' must be a list of kinds")
    limit = body.get("limit", DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise Unprocessable(f"'limit' must be an integer from 1 to {MAX_LIMIT}")
    bound = body.get("max_distance")
    if bound is not None and (
        isinstance(bound, bool) or not isinstance(bound, int | float) or not 0 <= bound <= 2
    ):
        raise Unprocessable("'max_distance' must be a number from 0 to 2 (cosine distance)")
    since, until = _time(body.get("since"), "since"), _time(body.get("until"), "until")
    if since is not None and until is not None and since > until:
        raise Unprocessable("'since' is after 'until'")
    return SearchRequest(
        text=text,
        kinds=tuple(dict.fromkeys(kind(k, "kinds") for k in kinds or ())),
        session_id=session_id(body.get("session_id")),
        since=since,
        until=until,
        limit=limit,
        max_distance=None if bound is None else float(bound),
    )
