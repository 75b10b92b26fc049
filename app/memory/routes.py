"""`/v1/memories`: the caller's long-term memories, listed and deleted one by one.

Every route needs `Authorization: Bearer <token>` (401). A memory id is 32
lowercase hex characters (400). Another user's memory answers 404, exactly like
one that does not exist, so ids of other users' memories leak nothing.
PostgreSQL is the truth: a delete removes the row first, then the recall copy.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.errors import BadRequest, NotFound
from app.memory.store import MEMORY_ID
from app.sessions.routes import caller
from app.stores import keys

LIST_LIMIT = 500


def memory_id(request: Request) -> str:
    mid = str(request.path_params["mid"])
    if not MEMORY_ID.fullmatch(mid):
        raise BadRequest("memory id must be 32 lowercase hex characters", code="invalid_memory_id")
    return mid


async def list_memories(request: Request) -> JSONResponse:
    """The caller's memories, most recently updated first."""
    state, user = await caller(request)
    async with state.pg.connection() as conn:
        cur = await conn.execute(
            "SELECT id, kind, content, session_id, created_at, updated_at FROM memories"
            " WHERE user_id = %s ORDER BY updated_at DESC, id LIMIT %s",
            (user, LIST_LIMIT),
        )
        rows = await cur.fetchall()
    return JSONResponse({
        "memories": [
            {"id": r[0], "kind": r[1], "content": r[2], "session_id": r[3],
             "created_at": r[4].isoformat(), "updated_at": r[5].isoformat()}
            for r in rows
        ]
    })


async def delete_memory(request: Request) -> Response:
    """Forget one memory: 204, or 404 when the caller has no memory with this id."""
    state, user = await caller(request)
    mid = memory_id(request)
    async with state.pg.connection() as conn:
        cur = await conn.execute(
            "DELETE FROM memories WHERE id = %s AND user_id = %s RETURNING id", (mid, user)
        )
        deleted = await cur.fetchone()
    if deleted is None:
        raise NotFound("no such memory")
    await state.redis.delete(keys.memory(user, mid))
    return Response(status_code=204)


routes = [
    Route("/v1/memories", list_memories, methods=["GET"]),
    Route("/v1/memories/{mid}", delete_memory, methods=["DELETE"]),
]
