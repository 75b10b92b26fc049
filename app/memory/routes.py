"""`/v1/memories`: the caller's long-term memories, listed, added, edited, searched, forgotten.

Every route needs `Authorization: Bearer <token>` (401). A memory id is 32
lowercase hex characters (400). Another user's memory answers 404, exactly like
one that does not exist, so ids of other users' memories leak nothing. Bodies
are checked by `app.memory.requests` (422 before anything is touched); the work
is `app.memory.service`, shared with the MCP tools. PostgreSQL is the truth: a
delete removes the row first, then the recall copy.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.errors import BadRequest
from app.limits import json_body
from app.memory import requests
from app.memory.service import COLUMNS, as_memory
from app.memory.store import MEMORY_ID
from app.sessions.routes import caller

LIST_LIMIT = 500


def memory_id(request: Request) -> str:
    return check_memory_id(str(request.path_params["mid"]))


def check_memory_id(mid: str) -> str:
    if not MEMORY_ID.fullmatch(mid):
        raise BadRequest("memory id must be 32 lowercase hex characters", code="invalid_memory_id")
    return mid


async def list_memories(request: Request) -> JSONResponse:
    """The caller's memories, most recently updated first."""
    state, user = await caller(request)
    async with state.pg.connection() as conn:
        cur = await conn.execute(
            f"SELECT {COLUMNS} FROM memories"
            " WHERE user_id = %s ORDER BY updated_at DESC, id LIMIT %s",
            (user, LIST_LIMIT),
        )
        rows = await cur.fetchall()
    return JSONResponse({"memories": [as_memory(r) for r in rows]})


async def add_memory(request: Request) -> JSONResponse:
    """201 with the new memory; 200 with the existing one when this repeats it exactly or
    nearly (a near duplicate takes the new wording, as the extractor's facts do)."""
    state, user = await caller(request)
    req = requests.add_request(await json_body(request))
    memory, created = await state.memories.add(user, req)
    return JSONResponse(memory, status_code=201 if created else 200)


async def update_memory(request: Request) -> JSONResponse:
    """The memory with its new kind and/or content (re-embedded); 409 `duplicate_memory`
    with the other memory's `id` when it would repeat another one."""
    state, user = await caller(request)
    mid = memory_id(request)
    req = requests.update_request(await json_body(request))
    return JSONResponse(await state.memories.update(user, mid, req))


async def search_memories(request: Request) -> JSONResponse:
    """The caller's memories nearest to `text`, filtered, nearest first."""
    state, user = await caller(request)
    req = requests.search_request(await json_body(request))
    return JSONResponse({"memories": await state.memories.search(user, req)})


async def delete_memory(request: Request) -> Response:
    """Forget one memory: 204, or 404 when the caller has no memory with this id."""
    state, user = await caller(request)
    await state.memories.forget(user, memory_id(request))
    return Response(status_code=204)


routes = [
    Route("/v1/memories", list_memories, methods=["GET"]),
    Route("/v1/memories", add_memory, methods=["POST"]),
    Route("/v1/memories/search", search_memories, methods=["POST"]),
    Route("/v1/memories/{mid}", update_memory, methods=["PATCH"]),
    Route("/v1/memories/{mid}", delete_memory, methods=["DELETE"]),
]
