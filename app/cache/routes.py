"""`GET /v1/cache/stats`: per-tool lookups, hits, hit rate, audits, overlap, invalidations."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.cache.stats import cache_stats
from app.sessions.routes import caller
from app.state import AppState


async def flush_counts(state: AppState) -> None:
    """This node's lookup counts of the last second, written before a report reads
    them (here and `/metrics`): the cache writes them at most once a second."""
    cache = state.turn_deps.router.cache
    if cache is not None:
        await cache.flush_counts()


async def stats(request: Request) -> JSONResponse:
    """The report, computed at most once a second per node (`app.cache.stats.Memo`)."""
    state, _user = await caller(request)

    async def report() -> dict[str, Any]:
        await flush_counts(state)
        return await cache_stats(state.redis, state.pg)

    return JSONResponse({"tools": await state.cache_report.get(report)})


routes = [Route("/v1/cache/stats", stats, methods=["GET"])]
