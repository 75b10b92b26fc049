"""`/healthz` (the process is up) and `/readyz` (every store is usable).

`/readyz` answers 200 only when Redis answers, has the search and JSON modules
and every index, PostgreSQL answers with no migration pending, and the
embedding model is loaded and has run once (`model`: the app warms it at
start, so the first turn does not wait for it), and with AUTH_JWKS_URL the
identity provider's keys were fetched at least once (`identity`; later a
failing fetch keeps the cached keys serving and readiness unchanged); otherwise 503 with the same
JSON, so a load balancer drops the node until it recovers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from app.state import AppState, app_state
from app.stores import indexes, migrations
from app.stores.clients import REQUIRED_MODULES, async_module_versions

CHECK_TIMEOUT = 2.0


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def _redis_checks(state: AppState) -> dict[str, bool]:
    r = state.redis
    out = {"redis": False, "redis_modules": False, "indexes": False}
    out["redis"] = bool(await r.ping())
    names = await async_module_versions(r)
    out["redis_modules"] = all(m in names for m in REQUIRED_MODULES)
    raw = await r.execute_command("FT._LIST")  # type: ignore[no-untyped-call]
    listed = {x.decode() if isinstance(x, bytes) else x for x in raw}
    out["indexes"] = all(indexes.index_name(n) in listed for n in indexes.NAMES)
    return out


async def _postgres_checks(state: AppState) -> dict[str, bool]:
    async with state.pg.connection() as conn:
        await conn.execute("SELECT 1")
        cur = await conn.execute("SELECT version FROM schema_migrations")
        done = {row[0] for row in await cur.fetchall()}
    return {"postgres": True, "migrations": all(m.version in done for m in migrations.available())}


async def _guarded(coro: Any, fallback: dict[str, bool]) -> tuple[dict[str, bool], str | None]:
    try:
        return await asyncio.wait_for(coro, CHECK_TIMEOUT), None
    except Exception as e:
        return fallback, f"{type(e).__name__}: {e}"


async def readyz(request: Request) -> JSONResponse:
    state = app_state(request)
    (rc, rerr), (pc, perr) = await asyncio.gather(
        _guarded(_redis_checks(state), {"redis": False, "redis_modules": False, "indexes": False}),
        _guarded(_postgres_checks(state), {"postgres": False, "migrations": False}),
    )
    checks = {**rc, **pc, "model": state.embedder.ready, "identity": state.auth.ready}
    body: dict[str, Any] = {"ready": all(checks.values()), "checks": checks}
    merr = state.embedder.warm_error
    errors = {k: v for k, v in (("redis", rerr), ("postgres", perr), ("model", merr),
                                ("identity", state.auth.error)) if v}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
