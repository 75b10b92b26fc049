"""What a response's request said, kept beside its session: `session:{<sid>}:responses`.

One hash field per turn started through `POST /v1/responses`: the `model`
echoed, `instructions`, `metadata`, `previous_response_id`, whether it named a
conversation, and its creation time. Any node rebuilds the response object from
it and the turn's events or messages. It lives as long as the session's hot copy
(renewed by each response) and is removed by the session's fenced delete; a
turn without a record (a native turn, or one whose record expired) reads with
the server's model name and no metadata.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis.asyncio as aredis

from app.openai import ids
from app.stores import keys
from app.stores.batch import batch

Record = dict[str, Any]


def new(model: str, instructions: str | None, metadata: dict[str, str],
        previous: str | None, conversation: bool) -> Record:
    return {"model": model, "instructions": instructions, "metadata": metadata,
            "previous_response_id": previous, "conversation": conversation,
            "created_at": int(time.time())}


async def save(redis: aredis.Redis, sid: str, turn: int, record: Record, ttl: int) -> None:
    key = keys.session_responses(sid)
    for reply in await batch(redis, [("HSET", key, str(turn), orjson.dumps(record)),
                                     ("EXPIRE", key, ttl)]):
        if isinstance(reply, Exception):
            raise reply


async def load(redis: aredis.Redis, sid: str, turn: int) -> Record | None:
    raw = await redis.hget(keys.session_responses(sid), str(turn))
    return orjson.loads(raw) if raw else None


def skeleton(sid: str, turn: int, record: Record | None, model: str,
             created_at: int) -> dict[str, Any]:
    """The response object before any output: what `response.created` carries."""
    r = record or {}
    return {
        "id": ids.response_id(sid, turn),
        "object": "response",
        "created_at": r.get("created_at", created_at),
        "status": "in_progress",
        "model": r.get("model", model),
        "instructions": r.get("instructions"),
        "metadata": r.get("metadata", {}),
        "previous_response_id": r.get("previous_response_id"),
        "conversation": {"id": ids.conversation_id(sid)} if r.get("conversation") else None,
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "temperature": None,
        "top_p": None,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "background": False,
        "store": True,
    }
