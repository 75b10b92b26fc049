"""What a model provider promises the orchestrator.

One `Provider.stream()` call is one model step. It yields `TextDelta`s and/or
`ToolCallRequest`s, then exactly one `StreamEnd` (finish_reason "stop" or
"tool_calls"). The orchestrator runs the requested tools, appends their results
as `{"role": "tool", "tool_call_id", "content"}` messages and calls `stream()`
again. `messages` are OpenAI chat-format dicts.

    DependencyError (app.errors)
    └── ProviderError     llm_unavailable, 503: the model server failed, timed out,
                          refused us, or sent something we cannot parse
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from app.errors import DependencyError


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it; `parameters` is a JSON schema object."""

    name: str
    description: str
    parameters: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        """The entry for an assistant message's `tool_calls` list."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments)},
        }


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallRequest:
    call: ToolCall


@dataclass(frozen=True)
class StreamEnd:
    finish_reason: str
    usage: dict[str, int]


ProviderEvent = TextDelta | ToolCallRequest | StreamEnd


class ProviderError(DependencyError):
    """The model provider failed; the message says what failed and how."""

    code = "llm_unavailable"


class Provider(Protocol):
    name: str

    def stream(
        self, messages: list[dict[str, Any]], tools: list[ToolSpec]
    ) -> AsyncIterator[ProviderEvent]:
        """One model step: deltas and/or tool-call requests, then exactly one StreamEnd."""
        ...
