"""`/v1/conversations`: a conversation is a session, seen through the Conversations API.

    POST   /v1/conversations              {items?, metadata?} -> conversation
    GET    /v1/conversations/{id}         -> conversation
    POST   /v1/conversations/{id}         {metadata} -> conversation (metadata replaced)
    DELETE /v1/conversations/{id}         the session's fenced delete
    GET    /v1/conversations/{id}/items   ?order=asc|desc&limit=1..100&after=<item id>
                                          &include[]=file_search_call.results

Ownership is the session's: 404 unknown, 403 another user's (ids are compared
exactly, so a case variant or a lookalike of a user id owns nothing).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app import limits
from app.errors import BadRequest, Forbidden, NotFound
from app.openai import ids, items
from app.openai.errors import openai_route
from app.sessions import history_db, messages
from app.sessions.routes import caller

MAX_ITEMS = 20
MAX_LIST = 100


def conversation(sid: str, meta: history_db.SessionMeta) -> dict[str, Any]:
    return {"id": ids.conversation_id(sid), "object": "conversation",
            "created_at": int(meta.created_at.timestamp()), "metadata": meta.metadata}


def _sid(request: Request) -> str:
    return ids.parse_conversation(str(request.path_params["cid"]), param="conversation_id")


def _owned(meta: history_db.SessionMeta | None, user: str) -> history_db.SessionMeta:
    if meta is None:
        raise NotFound("no such conversation")
    if meta.user_id != user:
        raise Forbidden("this conversation belongs to another user")
    return meta


async def create(request: Request) -> JSONResponse:
    state, user = await caller(request)
    body = await limits.json_body(request)
    meta = items.metadata(body.get("metadata"))
    seed = items.message_items(body["items"], "items") if body.get("items") is not None else []
    if len(seed) > MAX_ITEMS:
        raise BadRequest(f"at most {MAX_ITEMS} items at creation", param="items")
    await limits.check_session_rate(state.sessions.redis, state.settings, user)
    sid = await state.sessions.create(user, meta)
    if seed:
        stored = await state.sessions.append(
            sid, user, [messages.build(sid, i, role, text) for i, (role, text) in enumerate(seed)],
            0, retry=False)
        await state.sessions.persist(sid, user, stored)
    async with state.pg.connection() as conn:
        row = _owned(await history_db.session_meta(conn, sid), user)
    return JSONResponse(conversation(sid, row))


async def retrieve(request: Request) -> JSONResponse:
    state, user = await caller(request)
    sid = _sid(request)
    async with state.pg.connection() as conn:
        row = _owned(await history_db.session_meta(conn, sid), user)
    return JSONResponse(conversation(sid, row))


async def update(request: Request) -> JSONResponse:
    state, user = await caller(request)
    sid = _sid(request)
    async with state.pg.connection() as conn:  # 404 / 403 before the body is read
        _owned(await history_db.session_meta(conn, sid), user)
    body = await limits.json_body(request)
    if "metadata" not in body:
        raise BadRequest("send the new 'metadata'", param="metadata")
    meta = items.metadata(body["metadata"])
    async with state.pg.connection() as conn:
        row = await history_db.set_metadata(conn, sid, user, meta)
    if row is None:  # deleted meanwhile
        raise NotFound("no such conversation")
    return JSONResponse(conversation(sid, row))


async def delete(request: Request) -> JSONResponse:
    state, user = await caller(request)
    sid = _sid(request)
    await state.sessions.delete(sid, user)
    return JSONResponse({"id": ids.conversation_id(sid), "object": "conversation.deleted",
                         "deleted": True})


def _include(request: Request) -> frozenset[str]:
    raw = [*request.query_params.getlist("include"), *request.query_params.getlist("include[]")]
    unknown = set(raw) - set(items.RESULTS_INCLUDE.values())
    if unknown:
        raise BadRequest(f"include takes {sorted(items.RESULTS_INCLUDE.values())}",
                         param="include")
    return frozenset(raw)


def _limit(raw: str | None) -> int:
    if raw is None:
        return 20
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_LIST:
        raise BadRequest(f"limit is 1 to {MAX_LIST}", param="limit")
    return int(raw)


async def list_items(request: Request) -> JSONResponse:
    state, user = await caller(request)
    sid = _sid(request)
    q = request.query_params
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order is asc or desc", param="order")
    limit, include = _limit(q.get("limit")), _include(request)
    loaded = await state.sessions.full_history(sid, user)
    data = [item for _, item in items.project(sid, loaded.messages, include)]
    if order == "desc":
        data.reverse()
    after = q.get("after")
    if after is not None:
        at = next((i for i, item in enumerate(data) if item["id"] == after), None)
        if at is None:
            raise BadRequest("'after' is not an item of this conversation", param="after")
        data = data[at + 1:]
    page = data[:limit]
    return JSONResponse({"object": "list", "data": page,
                         "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None,
                         "has_more": len(data) > limit})


routes = [
    Route("/v1/conversations", openai_route(create), methods=["POST"]),
    Route("/v1/conversations/{cid}", openai_route(retrieve), methods=["GET"]),
    Route("/v1/conversations/{cid}", openai_route(update), methods=["POST"]),
    Route("/v1/conversations/{cid}", openai_route(delete), methods=["DELETE"]),
    Route("/v1/conversations/{cid}/items", openai_route(list_items), methods=["GET"]),
]
