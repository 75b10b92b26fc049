"""`GET /v1/cache/stats`: per-tool lookups, hits, hit rate, audits, overlap, invalidations."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.cache.stats import cache_stats
from app.sessions.routes import caller


async def stats(request: Request) -> JSONResponse:
    state, _user = caller(request)
    cache = state.turn_deps.router.cache
    if cache is not None:  # this node's counts of the last second, written first
        await cache.flush_counts()
    return JSONResponse({"tools": await cache_stats(state.redis, state.pg)})


routes = [Route("/v1/cache/stats", stats, methods=["GET"])]
