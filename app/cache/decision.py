"""When a semantic-cache candidate may be served: the hit decision, pure functions, no Redis.

A wrong cached answer is worse than a miss, and cosine distance alone cannot
tell "What is the capital of France?" from "... of Germany?". So the nearest
candidate is served when its canonical text equals the query's, or when it
passes, in order:

1. `distance <= max_distance` (cosine distance, as RediSearch reports it);
2. second checks on the two texts, each a veto: numbers or dates that differ,
   a negation on one side only, capitalised names that were swapped;
3. `score >= min_score`, score = (1 - distance) + lexical_weight * (1 - lexical),
   lexical being word and character-trigram overlap of the canonical texts. The
   sign is the data's: at equal distance, a near copy is the likelier change of
   meaning, a rewording the likelier same question.

The defaults were fitted on question pairs; `bench/cache_quality.py` has the
definitions, the data, the grid search and both precision/recall curves.

`AdaptiveThreshold` then moves one tool's `max_distance` with the outcomes of
the background audit, so each tool settles where its own wrong-hit rate meets
a target (in the spirit of vCache, which learns where to stop trusting the
similarity from verified outcomes instead of fixing one number for all).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace

# Fitted by `bench/cache_quality.py --fit` on the FIT split (15,000 pairs, seed 0) of
# /work/shared/data/qqp-pairs/pairs.jsonl, all-MiniLM-L6-v2, nearest `a` from the Redis
# HNSW index: weight and distance chosen by 2-fold cross-validation inside FIT, the score
# cut for false hits <= FIT_TARGET_FALSE_HITS on FIT (0.79 %; 0.995 % on REPORT). The
# cut reads: effective distance = distance - 0.1 * (1 - lexical) <= 0.0043.
FITTED_MAX_DISTANCE = 0.06
FITTED_MIN_SCORE = 0.9957
FITTED_LEXICAL_WEIGHT = 0.10
FIT_TARGET_FALSE_HITS = 0.008


def _list(s: str) -> list[str]:
    """Word lists kept as prose: easier to read and extend than list literals."""
    return s.split()


NEGATIONS = frozenset(
    _list("not no never cannot cant without none nobody nothing nowhere neither nor")
)
# "one" and "zero" are left out: "which one", "no one" are not quantities.
NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(_list("_ _ two three four five six seven eight nine ten eleven twelve"))
}
MONTHS = frozenset(
    _list(
        """january february march april may june july august september october november
        december monday tuesday wednesday thursday friday saturday sunday"""
    )
)
STOPWORDS = frozenset(
    _list(
        """a an the of to in on for at by with from into about as and or but if so than then
        is are was were be been being am do does did doing have has had having can could
        will would shall should may might must i me my we our you your he she it its they
        them their this that these those what which who whom whose why how when where there
        here some any all most more very just also s t whats hows"""
    )
)
# Capitalised words that begin questions or are capitalised anyway: never names.
NOT_NAMES = STOPWORDS | frozenset(
    _list("is are can do does did what why how which who where when whats hows im ive")
)

_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
# Kept inside words because they change meaning: c++, c#, .net, 3.5, $5, 20%.
_DROP = re.compile(r"(?<![\w+#])[.](?!\w)|[^\w\s+#$%.]|(?<=\w)[.](?!\d)")
_WORD = re.compile(r"[\w+#$%.]+")
# Digits anywhere, also inside model names (M604n, 6s); a scale word multiplies.
_NUMBER = re.compile(
    r"(?<![\d.,])(\d+(?:[.,]\d+)*)(?:\s*(k|m|bn|thousand|million|billion)\b)?", re.I
)
_SCALE = {"k": 1e3, "thousand": 1e3, "m": 1e6, "million": 1e6, "bn": 1e9, "billion": 1e9}
_NAME = re.compile(r"\b[A-Z][\w+#]*")


@functools.lru_cache(maxsize=4096)  # one call's key, memo and flight each ask again
def canonical_text(s: str) -> str:
    """Lowercase, NFKC, curly quotes made straight, meaningless punctuation dropped,
    whitespace collapsed: two questions with equal canonical text are the same question."""
    s = unicodedata.normalize("NFKC", s).translate(_QUOTES).lower()
    s = s.replace("'", "").replace("-", " ")
    return " ".join(_DROP.sub(" ", s).split()).strip(" .")


def words(s: str) -> list[str]:
    return [w.strip(".") for w in _WORD.findall(canonical_text(s)) if w.strip(".")]


def _stem(w: str) -> str:
    """Plural and possessive 's' dropped (signals, year's): enough for overlap, not grammar."""
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def content_words(s: str) -> set[str]:
    """Canonical words minus stop words, stemmed."""
    return {_stem(w) for w in words(s) if w not in STOPWORDS}


def numbers(s: str) -> set[str]:
    """Numbers (20k == 20,000 == 20000), small number words, months and weekdays."""
    found: set[str] = set()
    text = unicodedata.normalize("NFKC", s)
    for digits, scale in _NUMBER.findall(text):
        plain = digits.replace(",", "")
        if plain.count(".") > 1:  # a version, 9.2.1: compared as written
            found.add(plain)
            continue
        found.add(f"{float(plain) * _SCALE.get(scale.lower(), 1.0):g}")
    for w in words(text):
        if w in NUMBER_WORDS:
            found.add(NUMBER_WORDS[w])
        elif w in MONTHS:
            found.add(w)
    return found


# "... or not?", "why not", "no. 1", "non-stop" ask or count; they negate nothing.
_NOT_NEGATION = re.compile(r"\b(?:or|why) not\b|\bno\.\s*\d|\bnon-")


def negated(s: str) -> bool:
    text = _NOT_NEGATION.sub(" ", unicodedata.normalize("NFKC", s).translate(_QUOTES).lower())
    return "n't" in text or any(w in NEGATIONS for w in words(text))


def names(s: str) -> set[str]:
    """Capitalised words past the first, and acronyms anywhere (digits are `numbers`' job)."""
    text = unicodedata.normalize("NFKC", s).translate(_QUOTES)
    found = set()
    for i, m in enumerate(_NAME.finditer(text)):
        w = m.group(0)
        first = i == 0 and m.start() < 3
        if (first and not w.isupper()) or w.lower() in NOT_NAMES or any(c.isdigit() for c in w):
            continue
        found.add(_stem(canonical_text(w)))
    return found


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def _trigrams(s: str) -> set[str]:
    t = f" {canonical_text(s)} "
    return {t[i : i + 3] for i in range(len(t) - 2)}


def lexical_similarity(a: str, b: str) -> float:
    """Mean of content-word and character-trigram Jaccard similarity, in [0, 1]."""
    return 0.5 * _jaccard(content_words(a), content_words(b)) + 0.5 * _jaccard(
        _trigrams(a), _trigrams(b)
    )


@dataclass(frozen=True)
class HitPolicy:
    """How close a candidate must be, and which second checks may veto it."""

    max_distance: float = FITTED_MAX_DISTANCE
    min_score: float = FITTED_MIN_SCORE
    lexical_weight: float = FITTED_LEXICAL_WEIGHT
    check_numbers: bool = True
    check_negation: bool = True
    check_names: bool = True

    @classmethod
    def distance_only(cls, max_distance: float) -> HitPolicy:
        """The plain threshold, for comparison: no second checks, no score."""
        return cls(max_distance, -1.0, 0.0, False, False, False)


@dataclass(frozen=True)
class Decision:
    hit: bool
    score: float
    reason: str  # "exact", "hit", or why not: "distance", "numbers differ", ...


def combined_score(distance: float, lexical: float, lexical_weight: float) -> float:
    """Vector similarity plus a bonus for saying it in other words.

    On the cosine-similarity scale (1 - distance) when lexical_weight is 0, so
    `min_score = 1 - t` reads as "effective distance <= t". At equal distance, the
    pair that shares fewer words is the more likely paraphrase: a near copy that
    still lands that far away changed a word that matters. The fit on labelled
    pairs chose this sign (see docs/cache-quality.md).
    """
    return (1.0 - distance) + lexical_weight * (1.0 - lexical)


def second_check(query: str, candidate: str, policy: HitPolicy) -> str | None:
    """The first veto that applies to this pair, or None."""
    if policy.check_numbers:
        nq, nc = numbers(query), numbers(candidate)
        if nq and nc and nq != nc:
            return "numbers differ"
    if policy.check_negation and negated(query) != negated(candidate):
        return "negation differs"
    if policy.check_names:
        wq = {_stem(w) for w in words(query)}
        wc = {_stem(w) for w in words(candidate)}
        # A swap (France -> Germany), not one side naming more (Trump -> Donald Trump).
        if names(query) - wc and names(candidate) - wq:
            return "entities differ"
    return None


def decide(query: str, candidate: str, distance: float, policy: HitPolicy) -> Decision:
    """Whether the nearest cached entry (its query text and cosine distance) may be served."""
    if canonical_text(query) == canonical_text(candidate):
        return Decision(True, 1.0, "exact")
    lexical = lexical_similarity(query, candidate) if policy.lexical_weight else 0.0
    score = combined_score(distance, lexical, policy.lexical_weight)
    if distance > policy.max_distance:
        return Decision(False, score, "distance")
    veto = second_check(query, candidate, policy)
    if veto is not None:
        return Decision(False, score, veto)
    if score < policy.min_score:
        return Decision(False, score, "low combined score")
    return Decision(True, score, "hit")


@dataclass(frozen=True)
class AdaptiveThreshold:
    """One tool's `max_distance`, moved by audit outcomes (a staircase, Robbins-Monro style).

    Each audited hit says whether the served entry was right. A wrong one
    tightens by `step`; a right one relaxes by `step * target / (1 - target)`.
    The expected move is zero exactly where the audited wrong-hit rate equals
    `target`, so the threshold drifts to the loosest value that keeps its
    tool's error rate there (vCache's idea, a learned per-context bound under a
    user-set error rate, reduced to one number per tool). It never goes past
    `ceiling` nor below `floor`. Audits of hits served above the current
    threshold (before a tightening) are counted but move nothing: they speak
    about distances the tool no longer serves.
    """

    max_distance: float = FITTED_MAX_DISTANCE
    floor: float = 0.02
    ceiling: float = FITTED_MAX_DISTANCE + 0.04
    target: float = 0.01
    step: float = 0.005
    audits: int = 0
    wrong: int = 0

    def update(self, distance: float, correct: bool) -> AdaptiveThreshold:
        counted = replace(self, audits=self.audits + 1, wrong=self.wrong + (not correct))
        if distance > self.max_distance:
            return counted
        if correct:
            moved = self.max_distance + self.step * self.target / (1.0 - self.target)
        else:
            moved = self.max_distance - self.step
        return replace(counted, max_distance=min(self.ceiling, max(self.floor, moved)))

    def policy(self, base: HitPolicy) -> HitPolicy:
        """The base policy under this tool's bound. Tightening moves the whole boundary
        (distance ceiling, and the score cut by the same amount, since the score is on
        the similarity scale); relaxing raises the distance ceiling only. The base's
        score cut is the fitted 1 % point, and no run of clean audits loosens it."""
        shift = self.max_distance - base.max_distance
        return replace(
            base, max_distance=self.max_distance, min_score=base.min_score - min(shift, 0.0)
        )

    @property
    def error_rate(self) -> float:
        return self.wrong / self.audits if self.audits else 0.0

    def to_dict(self) -> dict[str, str]:
        """For HSET: every field a string."""
        return {
            "max_distance": repr(self.max_distance),
            "floor": repr(self.floor),
            "ceiling": repr(self.ceiling),
            "target": repr(self.target),
            "step": repr(self.step),
            "audits": str(self.audits),
            "wrong": str(self.wrong),
        }

    @classmethod
    def from_dict(
        cls, fields: Mapping[str, str | float] | Mapping[bytes, bytes]
    ) -> AdaptiveThreshold:
        """From HGETALL (bytes or str, with or without decode_responses); absent fields
        take the defaults, so an empty hash is a fresh tool."""
        raw: dict[str, str | bytes | float] = {
            (k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()
        }

        def num(name: str, default: float) -> float:
            v = raw.get(name)
            if v is None:
                return default
            return float(v.decode() if isinstance(v, bytes) else v)

        d = cls()
        return cls(
            max_distance=num("max_distance", d.max_distance),
            floor=num("floor", d.floor),
            ceiling=num("ceiling", d.ceiling),
            target=num("target", d.target),
            step=num("step", d.step),
            audits=int(num("audits", d.audits)),
            wrong=int(num("wrong", d.wrong)),
        )


def update(state: AdaptiveThreshold, distance: float, correct: bool) -> AdaptiveThreshold:
    """One audit outcome in, the tool's next state out (`state.update`, as a function)."""
    return state.update(distance, correct)
