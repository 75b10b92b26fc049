"""The offline extractor: regular expressions over what the user says about themselves.

Only the user's own messages are mined, sentence by sentence, and a clause
yields a fact only when it *starts* with the user as the subject ("I live in
...", "my name is ..."), after greetings and fillers ("hi", "oh and", "btw").
That anchoring keeps out third parties ("my brother lives in Rome"), reported
speech ("she said I'm going to love it"), most hypotheticals ("I'd love to live
in Paris"), past states ("I lived in Rome") and negations ("I don't live in
Paris"). Questions ("do I like jazz?") and sentences opening with a condition
("if I lived in Paris, ...") are skipped whole.

References are resolved modestly. A short confirmation ("yes, book that one",
"the second one", "option 2 please") is matched against the assistant's latest
proposals: those of the last assistant message in the delta, or else the
summary's last proposing turn (`summary.latest_proposals`). When that turn lists
options ("Option N: ..."), "that one" is the last option and "the second one" is
option 2. Nothing else is resolved (not "yes please", not pronouns inside longer
sentences): a wrong memory is worse than a missing one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from app.memory.facts import Fact, Kind, dedupe, make_fact, message_text
from app.memory.patterns import (
    ADV,
    CLAUSE_BREAK,
    HYPOTHETICAL,
    LEAD_IN,
    QUESTION,
    clean_object,
    is_name,
    sentences,
    third_person,
)
from app.memory.summary import is_proposal, latest_proposals, split_sentences

Rule = Callable[[re.Match[str]], Fact | None]

_ORDINALS = {"first": 1, "1st": 1, "second": 2, "2nd": 2, "third": 3, "3rd": 3,
             "fourth": 4, "4th": 4, "fifth": 5, "5th": 5}
_VERB_3RD = {"like": "likes", "love": "loves", "enjoy": "enjoys", "prefer": "prefers",
             "adore": "adores", "hate": "hates", "dislike": "dislikes", "detest": "detests",
             "loathe": "loathes", "cannot stand": "can't stand", "plan": "plans",
             "intend": "intends", "hope": "hopes", "planning": "plans", "going": "plans",
             "intending": "intends", "hoping": "hopes"}
# "I'm going to need a taxi" is a moment in the conversation, not a plan.
_NOT_PLANS = re.compile(
    r"^(?:need|have|ask|tell|say|think|check|wait|let|go with|go ahead|answer|pick|choose)\b",
    re.IGNORECASE,
)
_PLACE = re.compile(r"^(?:the|a|an|their|[A-Z])")  # "I'm going to Paris / the beach"


def _object(kind: Kind, template: str) -> Rule:
    """A rule writing the clause's object `o` into `template`."""

    def rule(m: re.Match[str]) -> Fact | None:
        obj = clean_object(m["o"], kind)
        return None if obj is None else make_fact(kind, template.format(obj))

    return rule


def _verb(kind: Kind) -> Rule:
    """A rule whose statement is the third-person verb `v` and the object `o`."""

    def rule(m: re.Match[str]) -> Fact | None:
        obj = clean_object(m["o"], kind)
        verb = _VERB_3RD[m["v"].lower()]
        return None if obj is None else make_fact(kind, f"{verb} {obj}")

    return rule


def _name(explicit: bool) -> Rule:
    def rule(m: re.Match[str]) -> Fact | None:
        name = m["name"].strip()
        if not is_name(name, explicit=explicit):
            return None
        return make_fact("name", "is named " + " ".join(w[0].upper() + w[1:] for w in name.split()))

    return rule


def _plan(m: re.Match[str]) -> Fact | None:
    obj = clean_object(m["o"], "plan")
    if obj is None or _NOT_PLANS.match(obj):
        return None
    verb = m["v"].lower()
    if verb == "going":
        if m["to"].lower() == "on":
            return make_fact("plan", f"plans to go on {obj}")  # "going on a trip"
        if _PLACE.match(obj):
            return make_fact("plan", f"plans to go to {obj}")
    return make_fact("plan", f"{_VERB_3RD[verb]} {m['to'].lower()} {obj}")


def _rx(body: str) -> re.Pattern[str]:
    return re.compile(body, re.IGNORECASE)


# Text is normalised first ("I'm" -> "I am", "don't" -> "do not"). First match wins.
RULES: list[tuple[re.Pattern[str], Rule]] = [
    (_rx(r"^(?:my name is|call me|I go by|the name is)\s+(?P<name>[a-z][a-z' -]*?)[\s.!]*$"),
     _name(explicit=True)),
    # Case-sensitive name: "I am Ana" is a name, "I am tired" is not.
    (re.compile(r"^(?i:I am)\s+(?P<name>[A-Z][a-z'-]+(?:\s+[A-Z][a-z'-]+){0,2})[\s.!]*$"),
     _name(explicit=False)),
    (_rx(rf"^I{ADV}\s+(?:live|reside|am (?:living|based|staying)|have{ADV}\s+(?:been living|lived)"
         rf"|(?:have{ADV}\s+)?(?:moved|relocated))\s+(?:in|to)\s+(?P<o>.+)"),
     _object("location", "lives in {}")),
    (_rx(rf"^I am{ADV}\s+from\s+(?P<o>.+)"), _object("location", "is from {}")),
    (_rx(rf"^I{ADV}\s+(?:work|am working|have been working)\s+as\s+(?P<a>an?\s+)?(?P<o>.+)"),
     lambda m: _object("work", "works as " + (m["a"] or "").lower() + "{}")(m)),
    (_rx(rf"^I{ADV}\s+(?:work|am working|have been working)\s+(?P<p>at|for)\s+(?P<o>.+)"),
     lambda m: _object("work", f"works {m['p'].lower()} " + "{}")(m)),
    (_rx(rf"^I am{ADV}\s+employed\s+(?:at|by)\s+(?P<o>.+)"), _object("work", "works at {}")),
    (_rx(rf"^I am{ADV}\s+(?:(?:severely|deathly|mildly|highly|seriously)\s+)?allergic\s+to\s+"
         r"(?P<o>.+)"), _object("allergy", "is allergic to {}")),
    (_rx(rf"^I{ADV}\s+(?:have got|have|got)\s+an?\s+(?:\w+\s+)?allergy\s+to\s+(?P<o>.+)"),
     _object("allergy", "is allergic to {}")),
    (_rx(rf"^I{ADV}\s+(?:have got|have|got)\s+(?P<a>an?\s+)?(?P<o>[\w ,-]+?)\s+"
         r"allerg(?P<y>y|ies)\b"),
     lambda m: _object("allergy", "has " + (m["a"] or "").lower() + "{} allerg" + m["y"])(m)),
    (_rx(rf"^I{ADV}\s+do not\s+(?:really\s+|much\s+|particularly\s+)?(?P<v>like|enjoy|love)\s+"
         r"(?P<o>.+)"), lambda m: _object("dislike", f"doesn't {m['v'].lower()} " + "{}")(m)),
    (_rx(rf"^I{ADV}\s+(?P<v>hate|dislike|detest|loathe|cannot stand)\s+(?P<o>.+)"),
     _verb("dislike")),
    (_rx(rf"^I am{ADV}\s+not\s+(?:a\s+)?(?:big\s+|huge\s+)?fan\s+of\s+(?P<o>.+)"),
     _object("dislike", "is not a fan of {}")),
    (_rx(rf"^I{ADV}\s+(?P<v>like|love|enjoy|prefer|adore)\s+(?P<o>.+)"), _verb("preference")),
    (_rx(rf"^I am{ADV}\s+an?\s+(?:big\s+|huge\s+)?fan\s+of\s+(?P<o>.+)"),
     _object("preference", "is a fan of {}")),
    (_rx(r"^my\s+(?:absolute\s+)?favou?rite\s+(?P<t>[\w ]{1,30}?)\s+(?:is|are)\s+(?P<o>.+)"),
     lambda m: _object("preference", f"favourite {m['t'].lower()} is " + "{}")(m)),
    (_rx(rf"^I am{ADV}\s+(?P<v>planning|going|hoping|intending)\s+(?P<to>to|on)\s+(?P<o>.+)"),
     _plan),
    (_rx(rf"^I{ADV}\s+(?P<v>plan|intend|hope)\s+(?P<to>to|on)\s+(?P<o>.+)"), _plan),
    # "I'm planning a trip to Kyoto": the plan is the thing planned, not an infinitive.
    (_rx(rf"^I(?: am)?{ADV}\s+(?:planning|plan)\s+(?P<o>(?:a|an|my|our)\s+"
         r"(?!lot\b|bit\b|little\b|few\b|couple\b).+)"), _object("plan", "plans {}")),
]

_NOTE = _rx(
    r"^(?:please\s+|(?:can|could|would|will)\s+you\s+(?:please\s+)?)?"
    r"(?:remember|do not forget|keep in mind|note|make a note)"
    r"(?:\s+that\b|\s*:|\s+(?!that\b|to\b|when\b|me\b|how\b|what\b|this\b|it\b))\s*(?P<o>.+)"
)
_CONFIRM = _rx(
    r"^(?:(?:can|could|would|will) you\s+)?(?:please\s+)?"
    r"(?:(?:let us|I will|I would like to|we will)\s+)?"
    r"(?P<v>book|reserve|order|buy|get|take|choose|pick|go with|do|use)?\s*"
    r"(?P<ref>that(?: one)?|this(?: one)?|it|the (?P<ord>\w+) one|(?:the )?option (?P<n>\d+)"
    r"|number (?P<n2>\d+))(?:\s+(?:please|then|for me|thanks))*[\s!.?]*$"
)
_LABEL = re.compile(r"^option (\d+):\s*", re.IGNORECASE)
_LEAD = re.compile(
    r"^(?:(?:how|what) about|I (?:would )?(?:suggest|recommend|propose)|I (?:can|could) "
    r"(?=book|reserve|order|get|schedule|find|add|set up)|(?:would you like|shall I|should I)"
    r"(?: me)?(?: to)?)\s+",
    re.IGNORECASE,
)


def _clauses(sentence: str) -> list[str]:
    out: list[str] = []
    for i, part in enumerate(CLAUSE_BREAK.split(sentence)):
        part = LEAD_IN.sub("", part.strip(" ,;")).strip()
        if i and part and not re.match(r"^(?:I|my)\b", part, re.IGNORECASE):
            part = "I " + part  # "I live in Lisbon and work at Acme": the subject is shared
        if part:
            out.append(part)
    return out


def facts_in_clause(clause: str) -> list[Fact]:
    """The fact the user states about themselves in one clause, if any."""
    for pattern, rule in RULES:
        m = pattern.match(clause)
        if m:
            fact = rule(m)
            return [] if fact is None else [fact]
    return []


def _note(body: str) -> list[Fact]:
    found = [f for clause in _clauses(body) for f in facts_in_clause(clause)]
    if found:
        return found  # "remember that I'm allergic to nuts" is an allergy, not a note
    fact = make_fact("note", third_person(body.rstrip(" .!?")))
    return [] if fact is None else [fact]


def _pick(proposals: list[str], m: re.Match[str]) -> str | None:
    options = [p for p in proposals if _LABEL.match(p)]
    pool = options or proposals
    ordinal = (m["ord"] or "").lower()
    number = m["n"] or m["n2"] or _ORDINALS.get(ordinal)
    if not pool or (ordinal and ordinal != "last" and number is None):
        return None
    if number is None:
        # A bare "that" or "it" needs a verb ("book it") to be a choice at all.
        bare = m["ref"].lower() in ("that", "this", "it")
        return None if bare and not m["v"] else pool[-1]
    for option in options:
        label = _LABEL.match(option)
        if label and int(label[1]) == int(number):
            return option
    index = int(number) - 1
    return pool[index] if 0 <= index < len(pool) else None


def _confirmation(body: str, proposals: list[str]) -> list[Fact]:
    m = _CONFIRM.match(body)
    chosen = None if m is None else _pick(proposals, m)
    if m is None or chosen is None:
        return []
    what = _LEAD.sub("", _LABEL.sub("", chosen)).rstrip(" ?.!")
    if what[1:2].islower():  # "Aisle seat" mid-sentence, but keep "LH1167"
        what = what[0].lower() + what[1:]
    verb = (m["v"] or "").lower()
    done = f"wants to {verb}" if verb in ("book", "reserve", "order", "buy", "get") else "chose"
    fact = make_fact("plan", f"{done} {what}")
    return [] if fact is None else [fact]


def facts_in_user_text(text: str, proposals: list[str]) -> list[Fact]:
    """Facts in one user message; `proposals` resolve a short confirmation."""
    found: list[Fact] = []
    for sentence in sentences(text):
        body = LEAD_IN.sub("", sentence).strip()
        note = _NOTE.match(body)
        if note:
            found.extend(_note(note["o"]))
            continue
        confirmed = _confirmation(body, proposals)
        if confirmed:
            found.extend(confirmed)
            continue
        if QUESTION.search(body) or HYPOTHETICAL.match(body):
            continue
        for clause in _clauses(body):
            found.extend(facts_in_clause(clause))
    return found


class RuleExtractor:
    """The offline `Extractor`: deterministic, no network, common phrasings only."""

    def extract(self, messages: list[dict[str, Any]], summary: str) -> list[Fact]:
        """Facts from the user messages of the delta.

        `summary` is the rolling summary as it was *before* these messages; each
        assistant message of the delta that proposes something supersedes it.
        """
        proposals = latest_proposals(summary)
        found: list[Fact] = []
        for message in messages:
            role, text = message.get("role"), message_text(message)
            if role == "assistant":
                offered = [s for s in split_sentences(text) if is_proposal(s)]
                proposals = offered or proposals
            elif role == "user":
                found.extend(facts_in_user_text(text, proposals))
        return dedupe(found)
