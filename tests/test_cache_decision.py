"""The semantic cache's hit decision: pure functions, no Redis, no model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from app.cache.decision import (
    FITTED_MAX_DISTANCE,
    AdaptiveThreshold,
    HitPolicy,
    canonical_text,
    decide,
    lexical_similarity,
    names,
    negated,
    numbers,
    update,
)

CLOSE = 0.01  # well inside any sensible threshold


def test_canonical_text_ignores_case_spacing_and_punctuation_that_means_nothing() -> None:
    assert canonical_text("  What is   the Capital of France?! ") == "what is the capital of france"
    assert canonical_text("What\u2019s up?") == canonical_text("What's up")
    assert canonical_text("off-page SEO") == "off page seo"


def test_canonical_text_keeps_the_symbols_that_change_meaning() -> None:
    assert canonical_text("Learn C++ or C#?") == "learn c++ or c#"
    assert canonical_text("Is 3.5 more than $20 or 20%?") == "is 3.5 more than $20 or 20%"
    assert canonical_text("C++") != canonical_text("C")


def test_an_identical_question_is_a_hit_whatever_the_distance_says() -> None:
    d = decide("How do I learn Python?", "how do i learn python", 0.2, HitPolicy())
    assert d.hit and d.reason == "exact"


def test_a_candidate_whose_numbers_differ_is_not_a_hit_even_when_close() -> None:
    d = decide("Should people over 91 not vote?", "Should people over 92 not vote?", CLOSE,
               HitPolicy())
    assert not d.hit and d.reason == "numbers differ"


def test_numbers_written_differently_are_the_same_number() -> None:
    assert numbers("a laptop under 20k") == numbers("a laptop under 20,000") == {"20000"}
    assert numbers("the HP M604n") != numbers("the HP M605x")
    assert numbers("in March") != numbers("in May")


def test_a_number_on_one_side_only_is_left_to_the_score() -> None:
    d = decide("How do I lose weight fast?", "How do I lose 10 kg of weight fast?", CLOSE,
               HitPolicy(min_score=0.0))
    assert d.reason != "numbers differ"


def test_a_negation_on_one_side_only_is_not_a_hit() -> None:
    d = decide("Is there life on other planets?", "Is there no life on other planets?", CLOSE,
               HitPolicy())
    assert not d.hit and d.reason == "negation differs"


def test_or_not_and_why_not_are_not_negations() -> None:
    assert negated("Why can't I sleep?")
    assert not negated("Should I buy a house or not?")
    assert not negated("What were your experiences with roll no. 1?")


def test_swapped_names_are_not_a_hit_even_when_close() -> None:
    d = decide("What is the capital of France?", "What is the capital of Germany?", CLOSE,
               HitPolicy())
    assert not d.hit and d.reason == "entities differ"


def test_a_name_given_in_full_on_one_side_is_not_a_swap() -> None:
    d = decide("Why is Trump popular?", "Why is Donald Trump so popular?", CLOSE,
               HitPolicy(min_score=0.0))
    assert d.reason != "entities differ"
    assert names("What is the best way to learn Python?") == {"python"}


def test_a_rewording_scores_higher_than_a_near_copy_at_the_same_distance() -> None:
    policy = HitPolicy()
    reworded = decide("How can I improve my English?", "Best ways to get better at English?",
                      0.03, policy)
    near_copy = decide("How can I improve my English?", "How can I improve my English accent?",
                       0.03, policy)
    assert reworded.score > near_copy.score
    assert lexical_similarity("a b c", "a b c") == 1.0


def test_a_near_copy_that_the_model_puts_far_apart_is_a_low_score_miss() -> None:
    d = decide("How can I improve my English?", "How can I improve my English accent?", 0.035,
               HitPolicy())
    assert not d.hit and d.reason == "low combined score"


def test_anything_beyond_the_distance_bound_is_a_miss() -> None:
    d = decide("How do I cook rice?", "What is the best rice cooker?", 0.2, HitPolicy())
    assert not d.hit and d.reason == "distance"


def test_the_plain_policy_is_the_distance_threshold_alone() -> None:
    plain = HitPolicy.distance_only(0.1)
    assert decide("capital of France?", "capital of Germany?", 0.09, plain).hit
    assert not decide("capital of France?", "capital of Germany?", 0.11, plain).hit


def test_adaptive_threshold_tightens_after_a_wrong_hit() -> None:
    state = AdaptiveThreshold()
    after = update(state, 0.03, correct=False)
    assert after.max_distance < state.max_distance
    assert (after.audits, after.wrong) == (1, 1)


def test_adaptive_threshold_relaxes_slowly_after_correct_hits_and_stops_at_the_ceiling() -> None:
    state = AdaptiveThreshold()
    once = update(state, 0.03, correct=True)
    assert state.max_distance < once.max_distance
    # One wrong hit outweighs many right ones: that is how the error rate stays at target.
    assert once.max_distance - state.max_distance < state.step / 50
    for _ in range(100_000):
        state = update(state, 0.0, correct=True)
    assert state.max_distance == state.ceiling


def test_adaptive_threshold_never_goes_below_its_floor() -> None:
    state = AdaptiveThreshold()
    for _ in range(100):
        state = update(state, 0.0, correct=False)
    assert state.max_distance == state.floor


def test_adaptive_threshold_ignores_audits_from_beyond_its_current_bound() -> None:
    state = AdaptiveThreshold(max_distance=0.04)
    after = update(state, 0.05, correct=False)
    assert after.max_distance == 0.04 and after.audits == 1


def test_adaptive_threshold_settles_where_the_error_rate_meets_its_target() -> None:
    # A tool whose hits at distance d are wrong with probability 2 * d: 1 % at d = 0.005.
    import random

    rng = random.Random(7)
    state = AdaptiveThreshold(max_distance=0.05, floor=0.0, ceiling=0.10, step=0.001)
    seen = []
    for i in range(60_000):
        d = rng.uniform(0.0, state.max_distance)
        state = update(state, d, correct=rng.random() >= 2 * d)
        if i > 30_000:
            seen.append(state.max_distance)
    # Hits are spread over [0, t], so their error rate is t; the target is 1 %.
    assert sum(seen) / len(seen) == pytest.approx(0.01, abs=0.004)


def test_adaptive_threshold_round_trips_through_a_redis_hash() -> None:
    state = update(AdaptiveThreshold(target=0.02), 0.01, correct=False)
    fields = state.to_dict()
    assert all(isinstance(v, str) for v in fields.values())
    as_bytes = {k.encode(): v.encode() for k, v in fields.items()}
    assert AdaptiveThreshold.from_dict(as_bytes) == state
    assert AdaptiveThreshold.from_dict({}) == AdaptiveThreshold()


def test_adaptive_threshold_moves_the_whole_boundary_of_the_policy() -> None:
    base = HitPolicy()
    tighter = AdaptiveThreshold(max_distance=FITTED_MAX_DISTANCE - 0.01).policy(base)
    assert tighter.max_distance == pytest.approx(base.max_distance - 0.01)
    assert tighter.min_score == pytest.approx(base.min_score + 0.01)


def test_a_relaxed_tool_never_loosens_the_fitted_score_cut() -> None:
    base = HitPolicy()
    looser = AdaptiveThreshold(max_distance=0.10, ceiling=0.14).policy(base)
    assert looser.max_distance == 0.10
    assert looser.min_score == base.min_score


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "cache_quality.py"
    spec = importlib.util.spec_from_file_location("cache_quality", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cache_quality"] = module
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_counts_hits_exactly_as_decide_does() -> None:
    bench = _bench()
    texts = [
        ("What is the capital of France?", "What is the capital of Germany?", 0.02, False),
        ("How do I learn Python?", "how do I learn python", 0.0, True),
        ("Is there life on Mars?", "Is there no life on Mars?", 0.01, False),
        ("How can I improve my English?", "Best ways to get better at English?", 0.03, True),
        ("What is your favorite anime?", "What is your favorite animals?", 0.008, False),
        ("Who will win the 2016 election?", "Who will win the 2020 election?", 0.01, False),
        ("How do I cook rice?", "What is the best rice cooker?", 0.2, False),
    ]
    lookups = [bench.Lookup(bench.Pair(c, q, dup), c, d) for q, c, d, dup in texts]
    f = bench.features(lookups, None)
    for policy in (HitPolicy(), HitPolicy.distance_only(0.05), HitPolicy(0.1, 0.9, 0.2)):
        expected = [decide(q, c, d, policy).hit for q, c, d, _ in texts]
        assert list(bench.hits(f, policy)) == expected


def _verifiers() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "bench" / "experiments" / "cache_verifiers.py"
    spec = importlib.util.spec_from_file_location("cache_verifiers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cache_verifiers"] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_the_verifier_bench_fits_a_logistic_rule_that_ranks_held_out_rows_right() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3))
    truth = 2.0 * x[:, 0] - x[:, 1]  # the third column is noise
    y = rng.random(2000) < 1.0 / (1.0 + np.exp(-truth))
    log_odds = _verifiers().fit_logistic(x[:1500], y[:1500])
    held = log_odds(x[1500:])
    assert np.corrcoef(held, truth[1500:])[0, 1] > 0.95


def test_the_verifier_features_see_a_changed_question_word_and_words_on_one_side() -> None:
    features = _verifiers().pair_features
    same = features("How do I learn Python?", "How do I learn Python fast?")
    other = features("How do I learn Python?", "Why do I learn Python?")
    assert same[7] == 0.0 and other[7] == 1.0
    assert same[2] == 1.0 and same[4] == 0.0  # "fast" on one side only
