"""Long-term memory facts: the `Fact` type, its validation, and the `Extractor` protocol.

A fact is one atomic statement about the user, written in the third person
without a subject ("is allergic to peanuts", "works at Acme", "prefers window
seats"), tagged with a `Kind`. Both extractors (rules and LLM) return facts that
went through `validate_facts` or the same cleaning, so storage sees one shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, get_args

Kind = Literal["name", "location", "work", "preference", "dislike", "allergy", "plan", "note"]
KINDS: frozenset[str] = frozenset(get_args(Kind))
MAX_CONTENT_CHARS = 200

# An LLM often writes "The user is allergic to ..." despite the prompt; the stored
# form has no subject so that both extractors' facts about the same thing dedupe.
_SUBJECT = re.compile(r"^(?:the\s+)?user(?:'s)?\s+(?=\w)", re.IGNORECASE)
_SPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Fact:
    """One atomic statement about the user."""

    kind: Kind
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "content": self.content}


class Extractor(Protocol):
    """Mines the new messages of a conversation for facts about the user."""

    def extract(self, messages: list[dict[str, Any]], summary: str) -> list[Fact]:
        """`messages` is the delta since the last run; `summary` resolves references."""
        ...


def clean_content(content: str) -> str:
    """Collapse whitespace, drop a leading "the user" and a trailing full stop."""
    text = _SPACE.sub(" ", content).strip()
    text = _SUBJECT.sub("", text)
    return text.rstrip(" .").strip()


def fact_key(fact: Fact) -> tuple[str, str]:
    """What makes two facts the same: kind and case-folded content."""
    return fact.kind, fact.content.casefold()


def dedupe(facts: list[Fact]) -> list[Fact]:
    """Facts in first-seen order, without repeats (see `fact_key`)."""
    seen: set[tuple[str, str]] = set()
    out: list[Fact] = []
    for fact in facts:
        key = fact_key(fact)
        if key not in seen:
            seen.add(key)
            out.append(fact)
    return out


# What a capped extraction keeps first (`rank`): what it would be harmful to forget
# (allergies), then who and where the user is, then what they plan, then tastes.
KIND_PRIORITY: tuple[Kind, ...] = (
    "allergy", "name", "location", "work", "plan", "dislike", "preference", "note",
)
_PRIORITY = {kind: i for i, kind in enumerate(KIND_PRIORITY)}


def rank(facts: list[Fact]) -> list[Fact]:
    """Facts in the order a capped extraction keeps them: by kind (`KIND_PRIORITY`),
    then in the extractor's own order (an LLM is asked for the most important first)."""
    return sorted(facts, key=lambda f: _PRIORITY[f.kind])  # sorted() is stable


def cap(facts: list[Fact], limit: int) -> tuple[list[Fact], int]:
    """(the `limit` best facts by `rank`, how many were dropped)."""
    ranked = rank(facts)
    return ranked[: max(limit, 0)], max(len(ranked) - max(limit, 0), 0)


def make_fact(kind: Kind, content: str) -> Fact | None:
    """A cleaned fact, or None when the content is empty or oversized."""
    text = clean_content(content)
    if not text or len(text) > MAX_CONTENT_CHARS:
        return None
    return Fact(kind, text)


def validate_facts(raw: Any) -> list[Fact]:
    """Facts from parsed JSON `{"facts": [{"kind", "content"}, ...]}`.

    Raises ValueError when the shape is wrong (not an object, no `facts` list, an
    item that is not an object, an unknown kind, a content that is not a string):
    a model that answers off-format should be asked again, not half-trusted.
    Empty or oversized (> 200 characters) contents are dropped, repeats removed.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    items = raw.get("facts")
    if not isinstance(items, list):
        raise ValueError('expected a "facts" array')
    facts: list[Fact] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"facts[{i}] is not an object")
        kind, content = item.get("kind"), item.get("content")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"facts[{i}].kind must be one of {sorted(KINDS)}, got {kind!r}")
        if not isinstance(content, str):
            raise ValueError(f"facts[{i}].content must be a string")
        fact = make_fact(cast(Kind, kind), content)  # checked against KINDS above
        if fact is not None:
            facts.append(fact)
    return dedupe(facts)


def message_text(message: dict[str, Any]) -> str:
    """The text of a chat message; content may be a string, None or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""
