"""The extractive rolling summary kept in `memory-summary:{<sid>}`.

The summary is a handful of sentences lifted verbatim from the conversation, one
per line, each prefixed with who said it (`User: ` / `Assistant: `). Keeping the
speaker lets the rules extractor find the assistant's last proposal when the user
later says "yes, book that one". Nothing is generated, so the summary never says
anything the conversation did not.

A quoted passage is never split ("You wrote: "I plan a trip. Any tips?""):
its second half would be filed as the quoting speaker's own sentence.

Each sentence is scored for how much it is worth keeping: numbers, names and
places, facts the user states about themselves, requests, and the assistant's
proposals score; greetings and thanks do not. When the old summary plus the new
sentences exceed the budget, the lowest-scoring go first, and among equals the
oldest, so newer information wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from app.memory.facts import message_text
from app.memory.patterns import split_outside_quotes

MAX_SENTENCE_CHARS = 280
ROLES = {"user": "User", "assistant": "Assistant"}

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"\u201d]))\s+(?=[\"'(\[\u201c]?[A-Z0-9])")
_NUMBERED = re.compile(r"^\s*(\d{1,2})[.)]\s+(?=\S)")
_BULLET = re.compile(r"^\s*(?:[-*•]|#{1,6})\s+")
_EMPHASIS = re.compile(r"\*\*|__|`")
_PREFIX = re.compile(r"^(User|Assistant):\s*(.*)$")
_DIGIT = re.compile(r"\d")
# Capitalised words after the first one: a cheap stand-in for named entities.
_ENTITY = re.compile(r"(?<=\s)(?!I\b|I')[A-Z][\w'\u2019-]+")
_FILLER = re.compile(
    r"^(?:ok(?:ay)?|thanks?(?: you)?(?: so much| very much)?|great|cool|nice|sure|hi|hello|hey"
    r"|bye|goodbye|yes|no|yep|yeah|nope|got it|sounds good|perfect|you're welcome"
    r"|no problem|of course|certainly|absolutely|alright|all right)(?:\s+there)?[\s!.,]*$",
    re.IGNORECASE,
)
_USER_FACT = re.compile(
    r"\b(?:my name|i'?m|i am|i live|i moved|i work|i like|i love|i enjoy|i prefer|i hate"
    r"|i dislike|i don't like|allergic|allergy|i plan|planning|going to|remember)\b",
    re.IGNORECASE,
)
_REQUEST = re.compile(
    r"^(?:please\s+)?(?:can|could|would|will) you\b|\bplease\b|^(?:yes|yeah|ok(?:ay)?|sure)?[,\s]*"
    r"(?:book|find|get|show|tell|reserve|order|buy|search|look|send|check|cancel|change|do|take|"
    r"pick|choose|go with|add|remind)\b",
    re.IGNORECASE,
)
PROPOSAL = re.compile(
    r"^option \d+\b|\b(?:how|what) about\b|\bi (?:would |'d )?(?:suggest|recommend|propose)\b"
    r"|\bi (?:can|could) (?:book|reserve|order|get|schedule|find|add|set up)\b"
    r"|\bwould you like\b|\bshall i\b|\bshould i (?:book|reserve|order|go ahead)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _Line:
    role: str | None  # "User", "Assistant", or None for a line of unknown origin
    text: str
    fresh: bool  # from the new messages rather than the old summary

    def render(self) -> str:
        return f"{self.role}: {self.text}" if self.role else self.text


def split_sentences(text: str) -> list[str]:
    """Sentences of a message; a numbered list item becomes "Option N: ..."."""
    out: list[str] = []
    for raw_line in text.splitlines():
        line = _EMPHASIS.sub("", raw_line)
        numbered = _NUMBERED.match(line)
        if numbered:
            # Numbered items are how assistants lay out choices; naming them
            # "Option N" lets "the second one" find its referent later.
            line = f"Option {numbered[1]}: {line[numbered.end():]}"
        line = _BULLET.sub("", line).strip()
        pieces = split_outside_quotes(_SENTENCE_END, line)
        out.extend(s.strip() for s in pieces if s.strip())
    return out


def is_proposal(sentence: str) -> bool:
    return PROPOSAL.search(sentence) is not None


def score(role: str | None, sentence: str) -> int:
    """How much a sentence is worth keeping; 0 or less means never keep it."""
    if _FILLER.match(sentence):
        return 0
    points = 0 if len(sentence.split()) < 3 else 1
    if _DIGIT.search(sentence):
        points += 2
    entities = min(len(_ENTITY.findall(sentence)), 3)
    points += entities
    if role != "Assistant":
        if _USER_FACT.search(sentence):
            points += 3
        if sentence.endswith("?") or _REQUEST.search(sentence):
            points += 2
    if role != "User" and is_proposal(sentence):
        # "Would you like me to book one?" proposes nothing concrete by itself.
        concrete = sentence.startswith("Option ") or _DIGIT.search(sentence) or entities
        points += 3 if concrete else 1
    return points


def _truncate(sentence: str, limit: int = MAX_SENTENCE_CHARS) -> str:
    if len(sentence) <= limit:
        return sentence
    cut = sentence[: limit - 1].rsplit(" ", 1)[0]
    return cut + "…"


def _parse(summary: str) -> list[_Line]:
    lines: list[_Line] = []
    for raw in summary.splitlines():
        m = _PREFIX.match(raw.strip())
        if m:
            lines.append(_Line(m[1], m[2].strip(), fresh=False))
        else:
            # A summary written by something else (or by hand): keep its sentences.
            lines.extend(_Line(None, s, fresh=False) for s in split_sentences(raw))
    return [line for line in lines if line.text]


def _from_messages(messages: list[dict[str, Any]]) -> list[_Line]:
    lines: list[_Line] = []
    for message in messages:
        role = ROLES.get(str(message.get("role", "")))
        if role is None:
            # Tool results and system prompts are long and not the conversation.
            continue
        for sentence in split_sentences(message_text(message)):
            lines.append(_Line(role, _truncate(sentence), fresh=True))
    return lines


def update_summary(summary: str, messages: list[dict[str, Any]], max_chars: int = 1200) -> str:
    """The old summary rolled forward over new messages, at most `max_chars` long.

    Deterministic: the same inputs give the same summary. Sentences are kept in
    conversation order; when over budget the least informative go first, and
    among equally informative ones the oldest.
    """
    lines = _parse(summary) + _from_messages(messages)
    # A sentence said again counts once, at its latest position.
    latest: dict[tuple[str | None, str], int] = {}
    for i, line in enumerate(lines):
        latest[(line.role, line.text.casefold())] = i
    candidates: list[tuple[int, int, _Line]] = []
    for i, line in enumerate(lines):
        if latest[(line.role, line.text.casefold())] != i:
            continue
        points = score(line.role, line.text)
        if points > 0:
            candidates.append((points + (1 if line.fresh else 0), i, line))
    kept: list[tuple[int, _Line]] = []
    used = 0
    for _points, i, line in sorted(candidates, key=lambda c: (-c[0], -c[1])):
        cost = len(line.render()) + (1 if kept else 0)
        if used + cost <= max_chars:
            kept.append((i, line))
            used += cost
    return "\n".join(line.render() for _i, line in sorted(kept, key=lambda k: k[0]))


def latest_proposals(summary: str) -> list[str]:
    """The proposals of the assistant's last proposing turn in a summary, in order.

    A turn is a run of consecutive `Assistant:` lines; lines of unknown origin
    count as the assistant's, since only proposals are picked from them.
    """
    found: list[str] = []
    for line in reversed(_parse(summary)):
        if line.role == "User":
            if found:
                break
            continue
        if is_proposal(line.text):
            found.append(line.text)
    return found[::-1]
