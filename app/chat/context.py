"""What the model sees for a turn: instructions, summary, memories, recent messages.

Recent messages are taken newest first until CONTEXT_TOKEN_BUDGET (estimated
at four characters a token) is spent; a tool result is never sent without the
assistant message that asked for it, which the model API would reject.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.sessions.messages import Message

CONTEXT_TOKEN_BUDGET = 3000
SYSTEM_PROMPT = (
    "You are a helpful assistant. Use the tools when they help: kb_search for the "
    "knowledge base, web_search (when offered) for current events. Cite retrieved "
    "passages as [1], [2]."
)


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 1


def to_openai(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    for field in ("tool_calls", "tool_call_id", "name"):
        if message.get(field) is not None:
            out[field] = message[field]
    return out


def recent(history: Sequence[Message], budget: int = CONTEXT_TOKEN_BUDGET) -> list[Message]:
    picked: list[Message] = []
    spent = 0
    for message in reversed(history):
        cost = estimate_tokens(str(message.get("content") or "")) + 4
        if picked and spent + cost > budget:
            break
        picked.append(message)
        spent += cost
    picked.reverse()
    while picked and picked[0]["role"] == "tool":
        picked.pop(0)  # its assistant message fell outside the budget
    return picked


def build(
    history: Sequence[Message], summary: str | None, memories: Sequence[str],
    budget: int = CONTEXT_TOKEN_BUDGET, *, instructions: str | None = None,
) -> list[dict[str, Any]]:
    system = SYSTEM_PROMPT
    if instructions:
        system += f"\n\nInstructions for this answer:\n{instructions}"
    if summary:
        system += f"\n\nSummary of the earlier conversation:\n{summary}"
    if memories:
        system += "\n\nWhat you know about the user:\n" + "\n".join(f"- {m}" for m in memories)
    return [{"role": "system", "content": system}, *(to_openai(m) for m in recent(history, budget))]
