"""A turn's events as the Responses API's stream events, with sequence numbers.

The projection is a pure function of the turn's event log (app.chat.event_log)
and the response's record: the live route feeds it the events as the turn makes
them, a resume (`GET /v1/responses/{id}?stream=true&starting_after=N`) feeds it
the same events replayed from Redis on any node and sends only those after N.
So a client gets every event exactly once, whichever node it lands on.

    response.created, response.in_progress                  before the first event
    message.delta  -> (output_item.added, content_part.added) output_text.delta
    tool.call      -> (the open message closed) output_item.added,
                      <file_search_call|web_search_call>.in_progress, .searching
    tool.result    -> <...>.completed, output_item.done
    message.done   -> output_text.done, content_part.done, output_item.done,
                      response.completed (the whole response, with usage)
    error          -> error, response.failed
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from app.chat.event_log import TERMINAL, Event
from app.openai import ids
from app.openai.items import Item, output_message, text_part, tool_item

ResponseEvent = dict[str, Any]
CALL_EVENTS = {"file_search_call": "response.file_search_call",
               "web_search_call": "response.web_search_call"}


def sse(event: ResponseEvent) -> bytes:
    """One SSE frame: `event:` the type, `data:` the JSON (what the SDK parses)."""
    return b"".join((b"event: ", event["type"].encode(), b"\ndata: ", orjson.dumps(event),
                     b"\n\n"))


def usage(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    inp, out = int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0))
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": int(raw.get("total_tokens", inp + out))}


class Projection:
    """Feed it a turn's events in order; it returns the stream events each one makes
    and keeps the response as it stands."""

    def __init__(self, sid: str, turn: int, response: dict[str, Any]) -> None:
        self.sid = sid
        self.turn = turn
        self.response = response  # records.skeleton: status in_progress, no output yet
        self.output: list[Item] = []
        self.seq = -1
        self._text: list[str] | None = None  # the open message's text, None when closed
        self._calls: dict[str, int] = {}  # tool-call id -> output index

    def _event(self, kind: str, **fields: Any) -> ResponseEvent:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq, **fields}

    def snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": list(self.output)}

    def start(self) -> list[ResponseEvent]:
        return [self._event("response.created", response=self.snapshot()),
                self._event("response.in_progress", response=self.snapshot())]

    def feed(self, event: Event) -> list[ResponseEvent]:
        data = orjson.loads(event.payload)
        if event.event == "message.delta":
            return self._delta(data["text"])
        if event.event == "tool.call":
            return self._close(None) + self._call(data)
        if event.event == "tool.result":
            return self._result(data)
        if event.event == "message.done":
            text = str((data.get("message") or {}).get("content") or "")
            out = self._open() + self._close(text) if self._text is None else self._close(text)
            self.response = {**self.response, "status": "completed", "usage": usage(data.get(
                "usage")), "completed_at": _epoch(data.get("message") or {})}
            return [*out, self._event("response.completed", response=self.snapshot())]
        if event.event == "error":
            out = self._close(None, status="incomplete")
            code, message = str(data.get("code")), str(data.get("message"))
            self.response = {**self.response, "status": "failed", "error": {
                "code": "server_error", "message": f"{code}: {message}"}}
            return [*out, self._event("error", code=code, message=message, param=None),
                    self._event("response.failed", response=self.snapshot())]
        return []

    @property
    def finished(self) -> bool:
        return self.response["status"] in ("completed", "failed")

    def _item_id(self, kind: str) -> str:
        return ids.output_item_id(kind, self.sid, self.turn, len(self.output))

    def _open(self) -> list[ResponseEvent]:
        item_id, k = self._item_id("message"), len(self.output)
        self._text = []
        self.output.append(output_message(item_id, "", status="in_progress") | {"content": []})
        return [self._event("response.output_item.added", output_index=k, item=self.output[k]),
                self._event("response.content_part.added", item_id=item_id, output_index=k,
                            content_index=0, part=text_part(""))]

    def _delta(self, text: str) -> list[ResponseEvent]:
        out = self._open() if self._text is None else []
        assert self._text is not None
        self._text.append(text)
        k = len(self.output) - 1
        return [*out, self._event("response.output_text.delta", item_id=self.output[k]["id"],
                                  output_index=k, content_index=0, delta=text, logprobs=[])]

    def _close(self, final: str | None, status: str = "completed") -> list[ResponseEvent]:
        if self._text is None:
            return []
        text = "".join(self._text) if final is None or not final else final
        self._text = None
        k = len(self.output) - 1
        item = output_message(self.output[k]["id"], text, status=status)
        self.output[k] = item
        part = item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=k,
                            content_index=0, text=text, logprobs=[]),
                self._event("response.content_part.done", item_id=item["id"], output_index=k,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=k, item=item)]

    def _call(self, data: dict[str, Any]) -> list[ResponseEvent]:
        name = str(data.get("name", ""))
        arguments = data.get("arguments") if isinstance(data.get("arguments"), dict) else {}
        k = len(self.output)
        item = tool_item("", name, arguments or {}, "in_progress", str(data.get("id")))
        item["id"] = self._item_id(item["type"])
        self.output.append(item)
        self._calls[str(data.get("id"))] = k
        out = [self._event("response.output_item.added", output_index=k, item=item)]
        prefix = CALL_EVENTS.get(item["type"])
        if prefix:
            out += [self._event(f"{prefix}.in_progress", item_id=item["id"], output_index=k),
                    self._event(f"{prefix}.searching", item_id=item["id"], output_index=k)]
        return out

    def _result(self, data: dict[str, Any]) -> list[ResponseEvent]:
        k = self._calls.get(str(data.get("id")))
        if k is None:
            return []
        item = {**self.output[k], "status": "failed" if data.get("error") else "completed"}
        self.output[k] = item
        out = []
        prefix = CALL_EVENTS.get(item["type"])
        if prefix:
            out.append(self._event(f"{prefix}.completed", item_id=item["id"], output_index=k))
        return [*out, self._event("response.output_item.done", output_index=k, item=item)]


def is_terminal(event: Event) -> bool:
    return event.event in TERMINAL


def _epoch(message: dict[str, Any]) -> int | None:
    """The stored answer's time: the same in every replay (a clock read would not be)."""
    try:
        return int(datetime.fromisoformat(str(message["created_at"])).timestamp())
    except (KeyError, ValueError):
        return None
