"""One chat turn: stream the model, route its tool calls, store every message.

The user message is appended before the stream starts (so a bad request is a
plain 4xx). Then, step by step: build the context, stream the model, and when
it asks for tools, run each through the tool router and append the assistant's
tool-call message together with its tool results in one atomic append, so the
history never holds a tool call without its answer. The final assistant message
ends the turn with `message.done`. Text deltas are merged into one
`message.delta` at most every STREAM_COALESCE_MS (`app.chat.coalesce`). Every
event also goes to the turn's Redis Stream (`app.chat.event_log`) so a client
can resume on any node.

Whatever happens (a provider or store failure becomes an `error` event; a
client disconnect cancels the generator), the messages already appended are
persisted to PostgreSQL in a shielded `finally`, and the after-turn hooks run
(memory extraction is enqueued there). If PostgreSQL is down the session stays
marked unpersisted and the sweep writes it later.

A session deleted mid-turn (`DELETE /v1/sessions/{sid}`) stops the turn: the
event writer looks for the fence every FENCE_CHECK_SECONDS while the model
streams (in the batches it sends anyway), and the next append refuses anyway.
The turn ends with an `error` event, code `session_deleted`; its persist is
refused by the tombstone, no after-turn hook runs (no extraction), and the
turn's event stream is removed once its last event is written.

A stopping server cancels the turn's task (app.chat.routes, app.api): the turn
ends with an `error` event, code `server_stopping`, sent to its live client and
logged for a resumer, then persists what it stored as always.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import anyio

from app.chat import context
from app.chat.coalesce import coalesce
from app.chat.event_log import Event, EventLog
from app.chat.tool_router import Routed, ToolRouter
from app.errors import BackboneError, NotFound, ServerStopping, translate
from app.llm.base import Provider, StreamEnd, TextDelta, ToolCall, ToolCallRequest
from app.ops import logs, metrics, tracing
from app.sessions import messages
from app.sessions.history_db import session_deleted_error
from app.sessions.messages import Message
from app.sessions.store import Sessions
from app.tools.base import ToolContext

log = logging.getLogger("backbone.turn")

MAX_STEPS = 6
# Text deltas merged into one `message.delta` at most this often (STREAM_COALESCE_MS).
COALESCE_MS = 25
# A stopping turn waits at most this long for its `server_stopping` event to be logged:
# on a forced quit the event writer may be cancelled too.
STOP_FLUSH_SECONDS = 2.0
STOPPING = ServerStopping(
    "the server answering this turn is stopping, so the turn ended early; your message and "
    "what was answered so far are saved. Send the message again to get a full answer "
    "(another server takes it)."
)
Recall = Callable[[str, str], Awaitable[list[str]]]
AfterTurn = Callable[[str, str, list[Message]], Awaitable[None]]


@dataclass
class TurnDeps:
    sessions: Sessions
    provider: Provider
    router: ToolRouter
    recall: Recall | None = None
    after_turn: list[AfterTurn] = field(default_factory=list)


@dataclass
class Timing:
    started: float = field(default_factory=time.perf_counter)
    model_ms: float = 0.0
    tool_ms: float = 0.0
    recall_ms: float = 0.0  # embedding the question and searching long-term memory

    def as_dict(self) -> dict[str, float]:
        total = (time.perf_counter() - self.started) * 1000
        waited = self.model_ms + self.tool_ms + self.recall_ms
        return {
            "total_ms": round(total, 2),
            "model_ms": round(self.model_ms, 2),
            "tool_ms": round(self.tool_ms, 2),
            "recall_ms": round(self.recall_ms, 2),
            "overhead_ms": round(total - waited, 2),
        }


class Turn:
    def __init__(
        self, deps: TurnDeps, sid: str, user: str, history: list[Message], log_: EventLog,
        *, coalesce_ms: int = COALESCE_MS, summary: str | None = None,
        instructions: str | None = None, tenant: str | None = None,
    ) -> None:
        self.deps = deps
        self.instructions = instructions  # this turn's own (the Responses API's), not stored
        self.summary = summary  # the rolling summary, read with the history (Sessions.load)
        self.coalesce_ms = coalesce_ms
        self.sid = sid
        self.user = user
        # The caller's tenant (AUTH_TENANT_CLAIM): kb_search reads `tenant:<tid>` for it.
        self.tool_context = ToolContext(user, tenant)
        self.history = history  # ends with this turn's user message
        self.log = log_
        self.stored: list[Message] = [history[-1]]
        self.timing = Timing()

    async def events(self) -> AsyncIterator[Event]:
        watch = metrics.TurnWatch()
        logs.TURN.set(self.log.turn)  # on every log line of this turn (app.ops.logs)
        # The turn's span (when tracing is on) holds every span below, persistence too.
        with tracing.span("turn", {"gen_ai.conversation.id": self.sid}) as span:
            try:
                async for event in self._steps():
                    yield watch.sent(event)
            except asyncio.CancelledError:
                # Only a stopping server cancels a turn's task (a client that goes away
                # just stops reading). Say so, then let the cancellation go on.
                yield watch.sent(await self._error(STOPPING, within=STOP_FLUSH_SECONDS))
                raise
            except Exception as exc:
                err = translate(exc)
                if err is None:
                    log.exception("turn failed in session %s", self.sid)
                    err = BackboneError("the turn failed unexpectedly")
                if span is not None:
                    span.set_attribute("error.type", err.code)
                yield watch.sent(await self._error(err))
            finally:
                watch.finish()
                with anyio.CancelScope(shield=True):
                    await self._finish()

    async def _steps(self) -> AsyncIterator[Event]:
        question = str(self.history[-1].get("content") or "")
        recalled = time.perf_counter()
        memories: list[str] = []
        if self.deps.recall:
            with tracing.span("recall"):
                memories = await self.deps.recall(self.user, question)
        self.timing.recall_ms += (time.perf_counter() - recalled) * 1000
        for step in range(MAX_STEPS):
            prompt = context.build(self.history, self.summary, memories,
                                   instructions=self.instructions)
            # The last step offers no tools, so a model looping on tools must answer.
            tools = self.deps.router.specs() if step < MAX_STEPS - 1 else []
            text: list[str] = []
            calls: list[ToolCall] = []
            usage: dict[str, int] = {}
            chat = tracing.chat(self.deps.provider.name,
                                getattr(self.deps.provider, "model", self.deps.provider.name))
            model = coalesce(self.deps.provider.stream(prompt, tools), self.coalesce_ms)
            with chat as chat_span:
                async with aclosing(model) as stream:
                    while True:
                        waited = time.perf_counter()
                        try:
                            item = await anext(stream)
                        except StopAsyncIteration:
                            break
                        finally:
                            self.timing.model_ms += (time.perf_counter() - waited) * 1000
                        if self.log.deleted:  # the event writer saw the delete fence
                            raise session_deleted_error()
                        if isinstance(item, TextDelta):
                            text.append(item.text)
                            yield self.log.emit("message.delta", {"text": item.text})
                        elif isinstance(item, ToolCallRequest):
                            calls.append(item.call)
                        elif isinstance(item, StreamEnd):
                            usage = item.usage
                            tracing.chat_ended(chat_span, item.finish_reason, usage, prompt,
                                               "".join(text))
            if not calls:
                stored = await self._append([self._message("assistant", "".join(text))])
                done = self.log.emit("message.done", {
                    "message": stored[0], "usage": usage, "timing": self.timing.as_dict(),
                })
                try:
                    await self.log.flush()  # a resuming client must find the whole turn
                except Exception as exc:
                    # The reply is stored: tell this client so. Only resumption lost
                    # events (a resumer is told the turn stalled and to reload).
                    log.warning("events of %s not all logged before message.done: %s",
                                self.sid, exc)
                yield done
                return
            results: list[tuple[ToolCall, Routed]] = []
            for call in calls:
                yield self.log.emit("tool.call", {
                    "id": call.id, "name": call.name, "arguments": call.arguments,
                })
                with tracing.execute_tool(call.name, call.id, call.arguments) as tool_span:
                    routed = await self.deps.router.run(call, self.tool_context)
                    if tool_span is not None:
                        tool_span.set_attributes(_tool_attributes(routed))
                # Tool time is the whole call: query embedding, cache lookup, the tool.
                self.timing.tool_ms += routed.elapsed_ms
                results.append((call, routed))
                yield self.log.emit("tool.result", _result_event(call, routed))
            await self._append([
                self._message("assistant", "".join(text),
                              tool_calls=[c.to_openai() for c in calls]),
                *(self._message("tool", routed.result.content, tool_call_id=call.id,
                                name=call.name) for call, routed in results),
            ])
        raise BackboneError(f"the model asked for tools {MAX_STEPS} times without answering")

    def _message(self, role: str, content: str, **fields: Any) -> Message:
        # seq is provisional: Sessions.append renumbers on a lost race.
        return messages.build(self.sid, 0, role, content, **fields)

    async def _append(self, batch: Sequence[Message]) -> list[Message]:
        length = messages.next_seq(self.history)
        numbered = [messages.renumber(self.sid, m, length + i) for i, m in enumerate(batch)]
        stored = await self.deps.sessions.append(self.sid, self.user, numbered, length)
        self.history.extend(stored)
        self.stored.extend(stored)
        return stored

    async def _error(self, err: BackboneError, *, within: float | None = None) -> Event:
        event = self.log.emit("error", {"code": err.code, "message": err.message})
        try:
            with anyio.move_on_after(within):
                await self.log.flush()
        except Exception as exc:
            # Redis itself is down: the error still reaches this client, not the log.
            log.warning("could not log the error event of %s: %s", self.sid, exc)
        return event

    async def _finish(self) -> None:
        try:
            with tracing.span("persist", {"backbone.messages": len(self.stored)}):
                await self.deps.sessions.persist(self.sid, self.user, self.stored)
        except NotFound as exc:  # session_deleted: the delete wins
            log.info("session %s deleted during its turn: nothing persisted (%s)", self.sid, exc)
            await self._forget_events()
            return
        except Exception as exc:
            log.warning("turn of %s not persisted now (the sweep will): %s", self.sid, exc)
        for hook in self.deps.after_turn:
            try:
                await hook(self.sid, self.user, self.stored)
            except Exception as exc:
                log.warning("after-turn hook %s failed for %s: %s", hook, self.sid, exc)

    async def _forget_events(self) -> None:
        """Remove this turn's event stream, after the writer stored all of it (a
        write after the DEL would re-create the stream)."""
        try:
            with anyio.move_on_after(5):
                await self.log.flush()
        except Exception as exc:
            log.warning("events of deleted session %s: last write failed: %s", self.sid, exc)
        try:
            await self.deps.sessions.redis.delete(self.log.key)
        except Exception as exc:
            log.warning("events of deleted session %s left to their TTL: %s", self.sid, exc)


def _tool_attributes(routed: Routed) -> dict[str, Any]:
    """The cache outcome of a tool call, for its `execute_tool` span: never its text
    (the result only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT)."""
    cached = [scope for scope, hit in routed.parts if hit]
    if routed.cached:
        outcome = "exact_hit" if routed.exact else "semantic_hit"
    else:
        outcome = "partial_hit" if cached else "miss"
    attrs: dict[str, Any] = {"backbone.cache.outcome": outcome,
                             "backbone.tool.items": len(routed.result.items)}
    if routed.distance is not None:
        attrs["backbone.cache.distance"] = routed.distance
    if routed.parts:
        attrs["backbone.cache.parts_cached"] = cached
    if routed.result.error is not None:
        attrs["error.type"] = "tool_error"
    if tracing.capture_content:
        attrs["gen_ai.tool.call.result"] = routed.result.content
    return attrs


def _result_event(call: ToolCall, routed: Routed) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": call.id,
        "name": call.name,
        "cached": routed.cached,
        "elapsed_ms": routed.elapsed_ms,
        "items": len(routed.result.items),
        "error": routed.result.error,
    }
    if routed.cached:
        data["distance"] = routed.distance
        data["saved_ms"] = routed.saved_ms
    if routed.parts:  # kb_search: which of its parts (global, user, tenant) were cached
        data["cached_parts"] = [scope for scope, cached in routed.parts if cached]
    return data
