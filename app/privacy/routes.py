"""`/v1/me`: the caller's own data, exported or erased.

`GET /v1/me/export` streams the JSON of app.privacy.export. `DELETE /v1/me`
fences the caller, then erases; it answers 200 with what was removed when the
erase finishes within ERASE_INLINE_SECONDS, else 202 while it goes on in the
background (a stopping server cancels it, and the privacy sweep finishes it). From
the fence on, every request of the caller's is 410 `user_erased`.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.privacy.erase import Eraser
from app.privacy.export import export
from app.sessions.routes import identified

log = logging.getLogger("backbone.privacy")

ERASE_INLINE_SECONDS = 10.0


async def export_me(request: Request) -> StreamingResponse:
    state, who = await identified(request)
    return StreamingResponse(
        export(who, state.sessions, state.redis), media_type="application/json",
        headers={"Cache-Control": "no-store",
                 "Content-Disposition": 'attachment; filename="backbone-export.json"'})


async def erase_me(request: Request) -> JSONResponse:
    state, who = await identified(request)
    eraser = Eraser(state.redis, state.sessions, state.settings.redis_url or "")
    task: asyncio.Task[dict[str, int]] = asyncio.create_task(
        eraser.erase(who.user), name="erase")
    state.turns.add(task)  # type: ignore[arg-type]  # awaited or cancelled at shutdown too
    task.add_done_callback(state.turns.discard)
    done, _ = await asyncio.wait({task}, timeout=ERASE_INLINE_SECONDS)
    if not done:
        task.add_done_callback(_log_outcome)
        return JSONResponse({"status": "erasing"}, status_code=202)
    return JSONResponse({"status": "erased", "removed": task.result()})


def _log_outcome(task: asyncio.Task[dict[str, int]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background erase failed (the privacy sweep resumes it): %s",
                    task.exception())


routes = [
    Route("/v1/me/export", export_me, methods=["GET"]),
    Route("/v1/me", erase_me, methods=["DELETE"]),
]
