"""`/v1/sessions`: create, list, read and delete conversations.

Every route needs `Authorization: Bearer <token>` (401), validates the session
id before it touches a key (400), and answers 404 for an unknown session and
403 for another user's. Creating sessions is rate limited per user (429).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app import limits
from app.auth import bearer_token
from app.identity import Identity
from app.privacy.fence import check_not_erased
from app.state import AppState, app_state
from app.stores import keys


async def identified(request: Request) -> tuple[AppState, Identity]:
    """The app state and the caller's verified identity (user, tenant); 401 otherwise."""
    state = app_state(request)
    who = await state.auth.identity(bearer_token(request))
    await check_not_erased(state.sessions.redis, who.user)  # 410 once erased (app.privacy)
    return state, who


async def caller(request: Request) -> tuple[AppState, str]:
    state, who = await identified(request)
    return state, who.user


def session_id(request: Request) -> str:
    return keys.check_session_id(str(request.path_params["sid"]))


async def create_session(request: Request) -> JSONResponse:
    state, user = await caller(request)
    await limits.check_session_rate(state.sessions.redis, state.settings, user)
    sid = await state.sessions.create(user)
    return JSONResponse({"id": sid}, status_code=201)


async def list_sessions(request: Request) -> JSONResponse:
    state, user = await caller(request)
    return JSONResponse({"sessions": await state.sessions.listing(user)})


async def get_session(request: Request) -> JSONResponse:
    state, user = await caller(request)
    sid = session_id(request)
    loaded = await state.sessions.full_history(sid, user)
    return JSONResponse({"id": sid, "user": loaded.owner, "messages": loaded.messages})


async def delete_session(request: Request) -> Response:
    state, user = await caller(request)
    await state.sessions.delete(session_id(request), user)
    return Response(status_code=204)


routes = [
    Route("/v1/sessions", create_session, methods=["POST"]),
    Route("/v1/sessions", list_sessions, methods=["GET"]),
    Route("/v1/sessions/{sid}", get_session, methods=["GET"]),
    Route("/v1/sessions/{sid}", delete_session, methods=["DELETE"]),
]
