"""Long-term memory extraction: the pure pieces the extraction job calls.

    facts          Fact, Kind, validate_facts, the Extractor protocol
    rules          RuleExtractor: the offline default, regular expressions
    llm_extractor  LLMExtractor: JSON from an OpenAI-compatible server
    summary        update_summary: the extractive rolling summary

The job's order: read the delta and the stored summary, `extract(delta,
summary)`, store the facts, then `update_summary(summary, delta)` and advance
the cursor with it. Extraction gets the summary *before* the delta, since the
delta's own assistant messages are read in order by the extractor.
"""

from __future__ import annotations

from app.memory.facts import Extractor, Fact, Kind, validate_facts
from app.memory.llm_extractor import LLMExtractor, LLMUnavailable
from app.memory.rules import RuleExtractor
from app.memory.summary import update_summary
from app.settings import Settings

__all__ = [
    "Extractor",
    "Fact",
    "Kind",
    "LLMExtractor",
    "LLMUnavailable",
    "RuleExtractor",
    "make_extractor",
    "update_summary",
    "validate_facts",
]


def make_extractor(settings: Settings) -> Extractor:
    """The LLM extractor when `LLM_BASE_URL` is set, else the offline rules."""
    if settings.llm_base_url:
        return LLMExtractor.from_settings(settings)
    return RuleExtractor()
