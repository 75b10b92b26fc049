"""What the tool router asks of a cache, and what a hit is.

The router (`app.chat.tool_router`) depends on this protocol, not on the
semantic cache itself, so a turn runs with any cache or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from app.embeddings import Vector
from app.tools.base import Tool, ToolContext, ToolResult


@dataclass(frozen=True)
class CacheHit:
    result: ToolResult
    distance: float
    entry: str
    tool_ms: float
    exact: bool = False  # served by the exact entry, not the KNN


@dataclass(frozen=True)
class Flight:
    """A miss's place in the single flight of its call (`app.cache.flight`)."""

    hit: CacheHit | None = None  # the result another caller's run stored while this one waited
    claim: Any = None  # the lock this caller holds while it runs the tool; `Cache.land` drops it
    # A versioned policy: the scope's kb version read when the call joined, before its
    # tool runs. `Cache.store` records it with the result (None: unknown, not stored),
    # so a result computed before an ingest or delete is never stored as current.
    version: int | None = None


class Cache(Protocol):
    async def lookup(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext,
    ) -> CacheHit | None: ...

    async def store(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext, result: ToolResult, tool_ms: float, flight: Flight | None = None,
    ) -> bool:
        """Store the result (for a versioned policy, at `flight.version`); True when
        `flight`'s claim was released with it (in the same round trip), so `land` is
        not needed."""
        ...

    def needs_vector(self, tool: Tool, arguments: dict[str, Any], query: str) -> bool: ...

    async def flush_counts(self) -> None: ...

    async def join_flight(
        self, tool: Tool, arguments: dict[str, Any], query: str, ctx: ToolContext,
        *, wait_seconds: float, lock_seconds: float,
    ) -> Flight:
        """After a miss: lead the call's one run (`claim` set), or wait up to `wait_seconds`
        for the leader's result (`hit`); neither: run the tool unled. Either way without
        a hit, `version` is what the result will be stored at."""
        ...

    async def land(self, flight: Flight) -> None:
        """Release what `join_flight` claimed, after the result is stored (or the run failed)."""
        ...
