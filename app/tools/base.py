"""What a tool promises the tool router and the orchestrator.

A tool never raises out of `run()`: bad arguments and failing services come back
as `ToolResult(error=...)`, whose `content` tells the model what went wrong so it
can recover. The orchestrator still wraps `run()` in TOOL_TIMEOUT_SECONDS.

The semantic cache embeds `query_text(arguments)` once and passes the vector into
`run()`, so retrieval does not embed twice. An empty `query_text` means the
arguments are invalid: skip the cache and let `run()` return the error.

Retrieval tools give the model numbered passages (`app.tools.passages`) that it
can cite as [1], [2].

A cacheable tool's `content` must not quote the query: the semantic cache serves
it to later callers whose question was only close (for a `global` tool, other
users), and the first asker's words would travel with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from app.embeddings import Vector
from app.llm.base import ToolSpec

MAX_QUERY_CHARS = 2000

QUERY_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "query": {
            "type": "string",
            "description": "What to look for, as a full question or a few keywords.",
            "minLength": 1,
            "maxLength": MAX_QUERY_CHARS,
        }
    },
    "required": ["query"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class CachePolicy:
    """How the semantic cache may reuse a tool's results."""

    max_distance: float  # cosine distance under which a cached query counts as the same
    ttl_seconds: int
    scope: Literal["global", "tenant", "user"]  # who may share one cached result
    # The result depends on the knowledge base of the entry's scope: an entry records
    # `kb-version:<scope>` and is never served once that version has moved on.
    versioned: bool = False
    # False: the tool opts out, its calls bypass the cache (CACHE_SKIP_TOOLS sets it per
    # deployment); for a tool whose run costs less than a lookup (bench/cache_value.py).
    enabled: bool = True


@dataclass(frozen=True)
class ToolContext:
    user_id: str
    tenant_id: str | None = None


@dataclass
class ToolResult:
    """`content` goes back to the model; `items` identify what was found.

    Each item has "id" (a kb chunk key or a URL) plus "title", "text", "url" and
    "score" (higher is better); the cache audit compares results by their ids.
    """

    content: str
    items: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def failed(cls, error: str) -> ToolResult:
        return cls(content=f"Tool error: {error}", items=[], error=error)


class Tool(Protocol):
    spec: ToolSpec
    policy: CachePolicy | None  # None: never cached

    def query_text(self, arguments: dict[str, Any]) -> str:
        """The text to embed for the cache and retrieval; '' when the arguments are invalid."""
        ...

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult: ...


class SplitTool(Tool, Protocol):
    """A tool whose result is the merge of independent parts, each over one scope (a
    retrieval over global documents and one over the caller's). The router caches each
    part in its own scope, so the part everyone may read is shared by everyone."""

    def parts(self, ctx: ToolContext) -> list[Tool]:
        """The parts for this caller, each a cacheable tool of one scope."""
        ...

    async def parts_to_run(self, ctx: ToolContext) -> list[Tool]:
        """The parts that can find anything for this caller: a part whose result is
        known to be empty (a private scope nothing was ever written to) is left out."""
        ...

    def merge(self, results: list[ToolResult]) -> ToolResult:
        """The whole result from the parts' results, in the order `parts` gave them."""
        ...


def split_of(tool: Tool) -> SplitTool | None:
    return tool if callable(getattr(tool, "parts", None)) else None  # type: ignore[return-value]


class ArgumentError(ValueError):
    """A tool's arguments are unusable; the text is shown to the model."""


def check_query(arguments: Any) -> str:
    """The stripped `query` argument, or ArgumentError saying what is wrong with it."""
    if not isinstance(arguments, dict):
        raise ArgumentError("arguments must be a JSON object with a 'query' string")
    query = arguments.get("query")
    if query is None:
        raise ArgumentError("missing required argument 'query'")
    if not isinstance(query, str):
        raise ArgumentError(f"'query' must be a string, got {type(query).__name__}")
    query = query.strip()
    if not query:
        raise ArgumentError("'query' is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ArgumentError(f"'query' is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    return query


def query_text_of(arguments: Any) -> str:
    try:
        return check_query(arguments)
    except ArgumentError:
        return ""
