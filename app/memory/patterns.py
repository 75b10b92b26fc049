"""Text plumbing for the rules extractor: normalising, splitting, cleaning objects.

Contractions are expanded first ("I'm" -> "I am", "don't" -> "do not"), so the
rules in `app.memory.rules` each spell one form and stay readable.
"""

from __future__ import annotations

import re

# Adverbs allowed between the subject and the verb: "I currently live in ...".
ADV = (
    r"(?:\s+(?:really|also|actually|currently|now|still|usually|just|absolutely|totally"
    r"|definitely|generally|mostly|always|genuinely|truly|honestly|do|recently|kind of|sort of"
    r"|so|very|pretty|originally))*"
)
LEAD_IN = re.compile(
    r"^(?:(?:hi|hello|hey|well|oh|ah|ok|okay|so|also|and|but|actually|btw|by the way|yes|yeah"
    r"|yep|no|nope|honestly|anyway|anyways|um|uh|fyi|just so you know|for the record|fwiw"
    r"|right|alright|great|perfect|sure|sounds good)(?:\s+there)?\b[\s,!.:;-]*)+",
    re.IGNORECASE,
)
# A clause break before a new subject, or before a verb whose subject ("I") is shared.
CLAUSE_BREAK = re.compile(
    r"\s*[,;]?\s*\b(?:and|but|although|though|while|whereas|plus)\s+(?=(?:also\s+)?(?:i|my"
    r"|live|work|like|love|enjoy|prefer|hate|dislike|am|moved|plan|have)\b)|,\s+(?=(?:i|my)\b)",
    re.IGNORECASE,
)
QUESTION = re.compile(
    r"\?\s*$|^(?:do|does|did|am|is|are|was|were|can|could|would|should|will|shall|have|has|what"
    r"|where|who|whom|whose|when|why|how|which)\b",
    re.IGNORECASE,
)
HYPOTHETICAL = re.compile(
    r"^(?:if|even if|suppose|supposing|imagine|imagining|hypothetically|assuming|assume|pretend"
    r"|what if|let us say|let's say|say|in case|unless|when|once|were)\b",
    re.IGNORECASE,
)

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
_CONTRACTIONS = [
    (re.compile(r"\bi'?m\b", re.IGNORECASE), "I am"),
    (re.compile(r"\bi've\b", re.IGNORECASE), "I have"),
    (re.compile(r"\bi'd\b", re.IGNORECASE), "I would"),
    (re.compile(r"\bi'll\b", re.IGNORECASE), "I will"),
    (re.compile(r"\b(do|does|did)n'?t\b", re.IGNORECASE), r"\1 not"),
    (re.compile(r"\bcan'?t\b", re.IGNORECASE), "cannot"),
    (re.compile(r"\bwon't\b", re.IGNORECASE), "will not"),
    (re.compile(r"\bname's\b", re.IGNORECASE), "name is"),
    (re.compile(r"\blet's\b", re.IGNORECASE), "let us"),
]
_QUOTE_MARK = re.compile(r'["\u201c\u201d]')
# A sentence may end inside its closing quote: 'She said "go." I stayed.'
_BOUNDARY = re.compile(r"(?:(?<=[.!?;])|(?<=[.!?;]\"))\s+|\s*\n+\s*")
_ABBREVIATION = re.compile(
    r"(?:\b(?:st|dr|mr|mrs|ms|mt|jr|sr|vs|etc|approx|e\.g|i\.e|a\.m|p\.m)|(?:^|\s)[A-Z])\.$",
    re.IGNORECASE,
)

# What ends the object of a statement: "I hate flying because ..." -> "flying".
_CUT = re.compile(
    r",?\s+(?:because|cause|since|but|if|unless|although|though|so that|as long as|which|so"
    r"|whereas|while)\b.*$|\s*[(:].*$|\s+-\s+.*$"
    # a request tacked on after a comma: "... peanuts, please keep that in mind"
    r"|,\s+(?:please|thanks|thank you|keep|remember|can you|could you|so please)\b.*$",
    re.IGNORECASE,
)
_TRAILING = re.compile(
    r"(?:,?\s+(?:a lot|a little|a bit|very much|so much|too|as well|anyway|though|actually"
    r"|currently|now|nowadays|these days|at the moment|right now|for now|lol|haha|please"
    r"|originally))+$",
    re.IGNORECASE,
)
# Where someone lives or works is a state; when it began is not part of the fact.
_DURATION = re.compile(
    r"(?:\s+for\s+(?:\d+|a|an|one|two|three|four|five|six|seven|eight|nine|ten|many|several"
    r"|a few|a couple of)\s+(?:years?|months?|weeks?|days?|decades?)|\s+(?:last|this)\s+\w+"
    r"|\s+(?:a|an|\w+)\s+(?:years?|months?|weeks?|days?)\s+ago|\s+recently|\s+in\s+\d{4})+$",
    re.IGNORECASE,
)
_DEICTIC = re.compile(
    r"^(?:it|that|this|these|those|them|you|your|yours|him|her|what|how|where|which|one|some"
    r"|something|anything|everything|nothing|so|too|here|there)\b",
    re.IGNORECASE,
)
_DEICTIC_END = re.compile(r"\b(?:it|that|this|them|one)$", re.IGNORECASE)
MAX_OBJECT_WORDS = 12

_PERSON = [
    (re.compile(r"\bI am\b", re.IGNORECASE), "they are"),
    (re.compile(r"\bI was\b", re.IGNORECASE), "they were"),
    (re.compile(r"\bI\b", re.IGNORECASE), "they"),
    (re.compile(r"\bmy\b", re.IGNORECASE), "their"),
    (re.compile(r"\bme\b", re.IGNORECASE), "them"),
    (re.compile(r"\bmine\b", re.IGNORECASE), "theirs"),
    (re.compile(r"\bmyself\b", re.IGNORECASE), "themselves"),
]

# Words that follow "I am" capitalised without being a name ("I am Italian").
_NOT_NAMES_TEXT = """
    a an the not so very really just here there back fine good ok okay sorry sure done ready
    tired busy hungry happy sad new from in at on going trying looking also still
    allergic planning afraid glad interested married single vegan vegetarian pregnant
    american british english french german italian spanish portuguese canadian australian
    indian chinese japanese korean brazilian mexican irish scottish welsh dutch swiss swedish
    norwegian danish finnish polish russian ukrainian greek turkish african european asian
    christian muslim jewish hindu buddhist catholic atheist male female retired unemployed
    home out off late early free available sick ill well right wrong confused curious"""
_NOT_NAMES = frozenset(_NOT_NAMES_TEXT.split())
_NAME_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


def normalise(text: str) -> str:
    """Straight quotes, expanded contractions, single spaces within lines."""
    text = text.translate(_QUOTES)
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    return re.sub(r"[ \t]+", " ", text)


def quoted_spans(line: str) -> list[tuple[int, int]]:
    """(start, end) of each double-quoted passage of one line, quotes included.

    Straight and curly quotes alike pair up in order; a quote left unpaired at
    the end of the line opens nothing, so a stray mark never swallows the rest.
    """
    marks = [m.start() for m in _QUOTE_MARK.finditer(line)]
    return [(marks[i], marks[i + 1] + 1) for i in range(0, len(marks) - 1, 2)]


def split_outside_quotes(pattern: re.Pattern[str], text: str) -> list[str]:
    """`pattern.split(text)`, except at matches inside a quoted passage.

    A sentence quoted inside another ('You wrote: "I plan a trip. Any tips?"')
    stays whole: split, its second half reads as the quoting speaker's own
    sentence, and a reported "I live in Rome." as the user's own fact.
    Quotes pair within a line (a newline always ends the passage).
    """
    spans: list[tuple[int, int]] = []
    start = 0
    for line in text.split("\n"):
        spans += [(start + a, start + b) for a, b in quoted_spans(line)]
        start += len(line) + 1
    pieces: list[str] = []
    last = 0
    for m in pattern.finditer(text):
        if any(a < m.start() < b for a, b in spans):
            continue
        pieces.append(text[last:m.start()])
        last = m.end()
    pieces.append(text[last:])
    return pieces


def sentences(text: str) -> list[str]:
    """Sentences, each with its closing punctuation (a question keeps its "?")."""
    out: list[str] = []
    buffer = ""
    for piece in split_outside_quotes(_BOUNDARY, normalise(text)):
        buffer = f"{buffer} {piece}" if buffer else piece
        if not _ABBREVIATION.search(buffer):  # "I live in St. Louis" is one sentence
            out.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        out.append(buffer.strip())
    return [s for s in out if s]


def third_person(text: str) -> str:
    """"my flight is at 9" -> "their flight is at 9"."""
    for pattern, replacement in _PERSON:
        text = pattern.sub(replacement, text)
    return text


def clean_object(raw: str, kind: str) -> str | None:
    """The object of a statement, trimmed to the fact, or None if it is not one.

    None for deictic objects ("I love it", "I'm going to do that"): they point
    into the conversation and mean nothing as a long-term memory.
    """
    text = _CUT.sub("", raw).strip(" \"'.,!;")
    text = _TRAILING.sub("", text)
    if kind in ("location", "work"):
        text = _DURATION.sub("", text)
    text = text.strip(" \"'.,!;")
    words = text.split()
    if not words or len(words) > MAX_OBJECT_WORDS or _DEICTIC.match(text):
        return None
    if len(words) <= 3 and _DEICTIC_END.search(text):
        return None
    return third_person(text)


def is_name(candidate: str, *, explicit: bool) -> bool:
    """Whether "I am <candidate>" / "my name is <candidate>" gives a person's name.

    After "I am" the words must be capitalised (so "I am tired" is not a name);
    after "my name is" lowercase is accepted, the user having said it is a name.
    """
    words = candidate.split()
    if not 1 <= len(words) <= 3:
        return False
    for word in words:
        if not _NAME_WORD.match(word) or word.lower() in _NOT_NAMES:
            return False
        if not explicit and not word[0].isupper():
            return False
    return True
