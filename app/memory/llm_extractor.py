"""The LLM extractor: facts as JSON from any OpenAI-compatible chat-completions server.

One non-streaming `POST {LLM_BASE_URL}/chat/completions` with
`response_format: {"type": "json_object"}` and temperature 0. The reply must be
`{"facts": [{"kind", "content"}, ...]}` and pass `validate_facts`; a reply that
does not is shown back to the model with what was wrong, once. Errors:

    DependencyError (app.errors)
    └── ProviderError (app.llm.base)   llm_unavailable, 503
        └── LLMUnavailable             the server could not be reached or timed
                                       out, answered an HTTP error, answered
                                       something that is not a chat completion,
                                       or gave invalid facts twice

On LLMUnavailable the job should leave the cursor where it was, so that a
later run mines the same messages again.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from app.llm.base import ProviderError
from app.memory.facts import Fact, message_text, validate_facts
from app.settings import Settings

MAX_MESSAGE_CHARS = 2000
MAX_TRANSCRIPT_CHARS = 12000

SYSTEM_PROMPT = """\
You extract long-term memories about the user from a conversation.

Answer with only a JSON object of this shape:
{"facts": [{"kind": "<kind>", "content": "<statement>"}]}

kind is one of: name, location, work, preference, dislike, allergy, plan, note.
content is one short atomic statement about the user, in the third person and
without a subject, for example "is named Ana", "lives in Lisbon", "works at Acme",
"prefers window seats", "dislikes olives", "is allergic to peanuts",
"plans to visit Japan in April". At most 200 characters; one fact per item.

Rules:
- Only what the user states about themselves in the NEW MESSAGES. Use the
  SUMMARY only to understand references such as "yes, book that one".
- Not questions, hypotheticals, wishes, or facts about other people.
- Nothing the assistant said, unless the user confirmed it.
- Things the user asks you to remember are kind "note".
- Most important first: only the first facts of a long list are kept.
- If there is nothing worth remembering, answer {"facts": []}.
"""

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)


class LLMUnavailable(ProviderError):
    """Extraction could not get valid facts from the model; the message says why."""


def parse_facts(reply: str) -> list[Fact]:
    """Facts from the model's reply text; ValueError when it is not valid."""
    fenced = _FENCE.match(reply)  # some servers wrap JSON in a fence even in JSON mode
    text = fenced[1] if fenced else reply
    return validate_facts(json.loads(text))  # JSONDecodeError is a ValueError


def transcript(messages: list[dict[str, Any]]) -> str:
    """The user and assistant turns as `role: text` lines, newest kept when too long."""
    lines: list[str] = []
    for message in messages:
        role = message.get("role")
        text = message_text(message).strip()
        if role in ("user", "assistant") and text:
            lines.append(f"{role}: {text[:MAX_MESSAGE_CHARS]}")
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        used += len(line) + 1
        if used > MAX_TRANSCRIPT_CHARS and kept:
            break
        kept.append(line)
    return "\n".join(reversed(kept))


class LLMExtractor:
    """The `Extractor` used when `LLM_BASE_URL` is set."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        """`client`, when given, is used as is and left open (the caller owns it)."""
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMExtractor:
        if not settings.llm_base_url:
            raise ValueError("LLMExtractor needs LLM_BASE_URL")
        return cls(
            settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key,
            timeout=settings.llm_timeout_seconds,
        )

    def extract(self, messages: list[dict[str, Any]], summary: str) -> list[Fact]:
        """Facts from the delta; raises LLMUnavailable (see the module docstring)."""
        if not any(m.get("role") == "user" and message_text(m).strip() for m in messages):
            return []  # nothing the user said: no call to make
        prompt = (
            f"SUMMARY:\n{summary.strip() or '(none)'}\n\n"
            f"NEW MESSAGES:\n{transcript(messages)}"
        )
        chat: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
        ]
        if self._client is not None:
            return self._extract(self._client, chat)
        with httpx.Client(timeout=self.timeout) as client:
            return self._extract(client, chat)

    def _extract(self, client: httpx.Client, chat: list[dict[str, str]]) -> list[Fact]:
        reply = self._complete(client, chat)
        try:
            return parse_facts(reply)
        except ValueError as first:
            # Show the model its own answer and what was wrong with it, once.
            chat = [
                *chat,
                {"role": "assistant", "content": reply},
                {
                    "role": "user",
                    "content": f"That answer was invalid ({first}). Answer again with only "
                    'the JSON object {"facts": [{"kind": ..., "content": ...}]}.',
                },
            ]
        reply = self._complete(client, chat)
        try:
            return parse_facts(reply)
        except ValueError as second:
            raise LLMUnavailable(
                f"the model at {self.url} gave invalid facts twice: {second}"
            ) from second

    def _complete(self, client: httpx.Client, chat: list[dict[str, str]]) -> str:
        body = {
            "model": self.model,
            "messages": chat,
            "response_format": {"type": "json_object"},
            "temperature": 0,
            "stream": False,
        }
        try:
            response = client.post(self.url, json=body, headers=self._headers)
        except httpx.HTTPError as e:
            raise LLMUnavailable(f"the model at {self.url} is unreachable: {e!r}") from e
        if response.status_code >= 400:
            raise LLMUnavailable(
                f"the model at {self.url} answered HTTP {response.status_code}: "
                f"{response.text[:200]}"
            )
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise LLMUnavailable(
                f"the model at {self.url} did not answer a chat completion: {response.text[:200]}"
            ) from e
        # A refusal or tool call has no text: an invalid answer, worth the one retry.
        return content if isinstance(content, str) else ""
