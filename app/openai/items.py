"""Messages as Responses items, and the request shapes that become messages.

A session's history projects onto items: a user (or system) message is a
`message` with `input_text`; an assistant's text a `message` with `output_text`;
each of its tool calls a `file_search_call` (kb_search), a `web_search_call`
(web_search) or a `function_call` (any other tool), its tool message folded in
as the item's status and, when `include` asks, its results. The messages after a
user message up to the next one are that turn's output, numbered as the stream
numbered them (app.openai.events), so ids agree.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from app import limits
from app.errors import BadRequest
from app.openai import ids
from app.sessions.messages import Message
from app.tools.passages import parse_passages

Item = dict[str, Any]
MAX_METADATA_KEYS = 16
_URL = re.compile(r"^\[\d+\] .+? <([^>]*)>$", re.MULTILINE)  # format_passages' head line
RESULTS_INCLUDE = {"file_search_call": "file_search_call.results",
                   "web_search_call": "web_search_call.action.sources"}


def tool_kind(name: str) -> str:
    return {"kb_search": "file_search_call", "web_search": "web_search_call"}.get(
        name, "function_call")


def tool_item(item_id: str, name: str, arguments: dict[str, Any], status: str,
              call_id: str) -> Item:
    """A tool call's item, without results (the stream's shape when it starts)."""
    kind = tool_kind(name)
    query = str(arguments.get("query", ""))
    if kind == "file_search_call":
        return {"id": item_id, "type": kind, "status": status, "queries": [query],
                "results": None}
    if kind == "web_search_call":
        return {"id": item_id, "type": kind, "status": status,
                "action": {"type": "search", "query": query}}
    return {"id": item_id, "type": kind, "status": status, "call_id": call_id,
            "name": name, "arguments": json.dumps(arguments)}


def output_message(item_id: str, text: str, status: str = "completed") -> Item:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text)]}


def text_part(text: str) -> Item:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _with_results(item: Item, content: str) -> Item:
    passages = parse_passages(content)
    if item["type"] == "file_search_call":
        return {**item, "results": [{"file_id": f"kb_{p.number}", "filename": p.title,
                                     "text": p.text, "score": None, "attributes": {}}
                                    for p in passages]}
    if item["type"] == "web_search_call":
        sources = [{"type": "url", "url": m[1]} for m in _URL.finditer(content)]
        return {**item, "action": {**item["action"], "sources": sources}}
    return item


def project(sid: str, history: list[Message], include: frozenset[str] = frozenset()
            ) -> Iterator[tuple[int | None, Item]]:
    """(turn or None, item) for every item of the history, in order."""
    results = {m.get("tool_call_id"): m for m in history if m.get("role") == "tool"}
    turn: int | None = None
    k = 0
    for m in history:
        role, seq = m.get("role"), int(m["seq"])
        if role in ("user", "system"):
            if role == "user":
                turn, k = seq, 0
            yield None, {"id": ids.message_item_id(sid, seq), "type": "message", "role": role,
                         "status": "completed",
                         "content": [{"type": "input_text", "text": m.get("content") or ""}]}
            continue
        if role != "assistant":
            continue  # tool messages are folded into their calls' items
        calls = m.get("tool_calls") or []
        text = m.get("content") or ""
        if text or not calls:
            item_id = (ids.output_item_id("message", sid, turn, k) if turn is not None
                       else ids.message_item_id(sid, seq))
            k += 1
            yield turn, output_message(item_id, text)
        for call in calls:
            fn = call.get("function") or {}
            name = str(fn.get("name", ""))
            try:
                arguments = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                arguments = {}
            kind = tool_kind(name)
            item_id = ids.output_item_id(kind, sid, turn if turn is not None else seq, k)
            k += 1
            answer = results.get(call.get("id"))
            item = tool_item(item_id, name, arguments if isinstance(arguments, dict) else {},
                             "completed" if answer is not None else "incomplete",
                             str(call.get("id")))
            if answer is not None and RESULTS_INCLUDE.get(kind) in include:
                item = _with_results(item, str(answer.get("content") or ""))
            yield turn, item


def turn_output(sid: str, turn: int, history: list[Message]) -> tuple[list[Item], bool]:
    """The items a turn produced, and whether it has its final answer."""
    out = [item for t, item in project(sid, history) if t == turn and not _is_input(item)]
    after = [m for m in history if int(m["seq"]) > turn]
    ends = next((i for i, m in enumerate(after) if m.get("role") == "user"), len(after))
    done = any(m.get("role") == "assistant" and not m.get("tool_calls") for m in after[:ends])
    return out, done


def _is_input(item: Item) -> bool:
    return bool(item["type"] == "message" and item["role"] != "assistant")


# ---- what requests send -------------------------------------------------------------


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[Any] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text",
                                                                       "text"):
                raise BadRequest("only text content parts (input_text) are supported",
                                 code="unsupported_content", param=param)
            texts.append(part.get("text"))
        if all(isinstance(t, str) for t in texts):
            return "\n".join(texts)
    raise BadRequest("content must be a string or a list of input_text parts",
                     code="invalid_content", param=param)


def message_items(raw: Any, param: str) -> list[tuple[str, str]]:
    """(role, text) of each message item of an `input` or `items` list."""
    if not isinstance(raw, list):
        raise BadRequest(f"'{param}' must be a list of message items", param=param)
    out = []
    for i, item in enumerate(raw):
        where = f"{param}[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise BadRequest("only message items are supported here",
                             code="unsupported_item", param=where)
        role = {"developer": "system"}.get(str(item.get("role")), item.get("role"))
        if role not in ("user", "assistant", "system"):
            raise BadRequest("a message's role is user, assistant, system or developer",
                             param=f"{where}.role")
        text = _text_of(item.get("content"), f"{where}.content")
        limits.message_content({"content": text})  # the native route's checks
        out.append((str(role), text))
    return out


def request_input(raw: Any) -> tuple[str, str | None]:
    """A response's `input` as (the user's message, extra instructions from its
    system/developer items): one user message per response, as one turn has."""
    if isinstance(raw, str):
        return limits.message_content({"content": raw}), None
    given = message_items(raw, "input")
    users = [text for role, text in given if role == "user"]
    if len(users) != 1 or given[-1][0] != "user":
        raise BadRequest("input holds exactly one user message, last (a response is one "
                         "turn; seed earlier messages with POST /v1/conversations items)",
                         param="input")
    system = [text for role, text in given if role == "system"]
    if any(role == "assistant" for role, _ in given):
        raise BadRequest("assistant messages go into a conversation's items, not input",
                         param="input")
    return users[0], "\n\n".join(system) or None


def metadata(raw: Any) -> dict[str, str]:
    """At most 16 string keys (64 characters) with string values (512 characters)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_METADATA_KEYS or not all(
        isinstance(k, str) and 0 < len(k) <= 64 and isinstance(v, str) and len(v) <= 512
        for k, v in raw.items()
    ):
        raise BadRequest("metadata is at most 16 string keys (up to 64 characters) with "
                         "string values (up to 512 characters)", param="metadata")
    return dict(raw)
