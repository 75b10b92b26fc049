"""The provider used when no LLM_BASE_URL is set: deterministic, and honest about it.

It is not a language model. Given a user message and the kb_search tool, it asks
for kb_search with the user's words; given tool results, it streams an answer
stitched from the top passages with citations [1], [2] and a "Sources:" line.
Anything else gets a plain statement that this is an offline stand-in.
Token counts in `usage` are word counts. Tool-call ids are random, as a real
model's are: the context is budget-trimmed, so anything counted from it repeats
within a long session.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

from app.llm.base import ProviderEvent, StreamEnd, TextDelta, ToolCall, ToolCallRequest, ToolSpec
from app.tools.passages import Passage, parse_passages

TOP_PASSAGES = 3
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_TOKEN = re.compile(r"\S+\s*|\s+")

STAND_IN = "I am the offline stand-in, not a language model (no LLM_BASE_URL is set)"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def _excerpt(passage: Passage, limit: int = 320) -> str:
    """The passage's first sentences up to `limit` characters, headings dropped."""
    lines = [ln for ln in passage.text.splitlines() if ln.strip() and not ln.startswith("#")]
    sentences = _SENTENCE.split(" ".join(ln.strip() for ln in lines))
    if len(sentences) > 1 and sentences[0][:1].islower():
        sentences = sentences[1:]  # a fragment carried over from the previous chunk
    out = ""
    for sentence in sentences:
        if out and len(out) + len(sentence) > limit:
            break
        out = f"{out} {sentence}".strip()
    return out[: limit * 2]


class OfflineProvider:
    """Deterministic stand-in for a model; see the module docstring."""

    name = "offline"

    def __init__(self, token_delay_ms: int = 20) -> None:
        self.token_delay = max(token_delay_ms, 0) / 1000

    async def stream(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec]
    ) -> AsyncIterator[ProviderEvent]:
        prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)
        last = messages[-1] if messages else {}
        question = self._last_user_text(messages)
        if last.get("role") == "user" and any(t.name == "kb_search" for t in tools):
            call = ToolCall(
                f"offline_{secrets.token_hex(8)}", "kb_search", {"query": question[:2000]}
            )
            yield ToolCallRequest(call)
            yield StreamEnd("tool_calls", self._usage(prompt_tokens, 0))
            return
        if last.get("role") == "tool":
            answer = self._answer(question, self._trailing_tool_results(messages))
        elif question:
            answer = f'{STAND_IN}, so I cannot answer freely. You wrote: "{question}"'
        else:
            answer = f"{STAND_IN}, and there is no question to answer."
        for i, token in enumerate(_TOKEN.findall(answer)):
            if i:
                await asyncio.sleep(self.token_delay)
            yield TextDelta(token)
        yield StreamEnd("stop", self._usage(prompt_tokens, len(answer.split())))

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    @staticmethod
    def _last_user_text(messages: list[dict[str, Any]]) -> str:
        for m in reversed(messages):
            if m.get("role") == "user":
                return " ".join(_text(m.get("content")).split())
        return ""

    @staticmethod
    def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[str]:
        results: list[str] = []
        for m in reversed(messages):
            if m.get("role") != "tool":
                break
            results.insert(0, _text(m.get("content")))
        return results

    @staticmethod
    def _answer(question: str, results: list[str]) -> str:
        passages = [p for content in results for p in parse_passages(content)][:TOP_PASSAGES]
        if not passages:
            return (
                f"{STAND_IN}, and the knowledge base returned nothing for "
                f'"{question}", so I have no passage to quote.'
            )
        parts = [f"{STAND_IN}. The closest knowledge-base passages say:"]
        sources: dict[str, list[str]] = {}  # title -> its citation marks, in first-seen order
        for n, passage in enumerate(passages, start=1):
            parts.append(f"{_excerpt(passage)} [{n}]")
            sources.setdefault(passage.title, []).append(f"[{n}]")
        cited = "; ".join(f"{''.join(marks)} {title}" for title, marks in sources.items())
        return "\n\n".join(parts) + "\n\nSources: " + cited
