"""Can a learned verifier serve more hits at <= 1 % false hits? Plain distance, the shipped
decision and a logistic verifier over richer pair features, fitted on FIT, judged on REPORT.

    .venv/bin/python bench/experiments/cache_verifiers.py [--pairs N] [--seed S]

Same data, split, embeddings, labels and definitions as `bench/cache_quality.py`
(its helpers are reused). The nearest stored question is found by exact cosine
in numpy rather than through Redis: one entry per canonical text, the last
stored winning, as `SemanticCache.store` keys them. At the default policy this
gives the figures the cache serves (the run prints them to compare with
`cache_quality.py`'s).

Three rules, each turned into one score with a cut:

- plain: the cosine distance;
- decision: the shipped `HitPolicy()` rule (three vetoes, then
  `distance - lexical_weight * (1 - lexical)`);
- verifier: a logistic regression fitted on FIT over the distance, the three
  vetoes and eight pair features (`pair_features`), on the FIT lookups whose
  distance is <= VERIFIER_MAX_DISTANCE (the only ones it could serve).

Every cut is fitted on FIT for each false-hit bound and then applied to REPORT,
so the "FIT cut" columns are what a deployment would get. The "best cut"
columns pick the cut on REPORT itself, the comparison `cache_quality.py`
prints; they are an upper bound, not a result. The rule to ship is chosen
by 2-fold cross-validation inside FIT at FIT_TARGET_FALSE_HITS.

Last, the per-entry audit question: replaying REPORT in a random order through
the default decision with the 5 % audit, how many hits land on an entry that
already had an audited hit (the only hits a per-entry threshold could move)?
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

# Its neighbours here, and cache_quality (a product benchmark) one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cache_quality as cq

from app.cache import decision as cd

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
BOUNDS = (0.005, 0.01, 0.02, 0.05, 0.10)
VERIFIER_MAX_DISTANCE = 0.12
# What a question asks, by its first question word: "how" and "why" ask different things.
QUESTION_WORDS = frozenset(cd._list("what how why which who where when is are can do does should"))


def question_word(s: str) -> str:
    return next((w for w in cd.words(s) if w in QUESTION_WORDS), "")


def pair_features(q: str, c: str) -> list[float]:
    """Content-word and trigram overlap, how many content words one side has alone (both,
    their difference, the smaller), length ratio, total length, question word differs."""
    wq, wc = cd.content_words(q), cd.content_words(c)
    only_q, only_c = len(wq - wc), len(wc - wq)
    lq, lc = len(cd.words(q)), len(cd.words(c))
    return [
        cd._jaccard(wq, wc),
        cd._jaccard(cd._trigrams(q), cd._trigrams(c)),
        float(only_q + only_c),
        float(abs(only_q - only_c)),
        float(min(only_q, only_c)),
        float(abs(np.log((lq + 1) / (lc + 1)))),
        float(np.log(lq + lc + 2)),
        float(question_word(q) != question_word(c)),
    ]


def nearest(pairs: Sequence[cq.Pair], vectors: dict[str, npt.NDArray[np.float32]]
            ) -> tuple[list[cq.Lookup], Counter[str]]:
    """Each `b` against the split's stored `a`s (exact cosine), and how often each stored
    entry is the nearest."""
    stored: dict[str, str] = {}
    for a in sorted({p.a for p in pairs}):
        stored[cd.canonical_text(a)] = a
    entries = sorted(stored.values())
    m = np.stack([vectors[a] for a in entries])
    sims = np.stack([vectors[p.b] for p in pairs]) @ m.T
    best = sims.argmax(axis=1)
    found = [cq.Lookup(p, entries[j], float(1.0 - sims[i, j]))
             for i, (p, j) in enumerate(zip(pairs, best, strict=True))]
    return found, Counter(lk.nearest for lk in found)


def design(f: cq.Features, lookups: Sequence[cq.Lookup]) -> Array:
    text = np.array([pair_features(lk.pair.b, lk.nearest) for lk in lookups])
    vetoes = np.stack([f.veto[k] for k in cq.CHECKS], axis=1).astype(np.float64)
    return np.hstack([f.distance[:, None], vetoes, text])


def fit_logistic(x: Array, y: Mask, l2: float = 1.0, rounds: int = 30) -> Callable[[Array], Array]:
    """L2-regularised logistic regression by Newton's method on standardised columns; returns
    the log-odds of "serving is right" for new rows (numpy only: no new dependency)."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    ridge = l2 * np.eye(z.shape[1])
    ridge[-1, -1] = 0.0  # the intercept is not shrunk
    target = y.astype(np.float64)
    for _ in range(rounds):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - target) + ridge @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break

    def log_odds(rows: Array) -> Array:
        out: Array = np.hstack([(rows - mean) / std, np.ones((len(rows), 1))]) @ w
        return out

    return log_odds


# A rule: from (features, design matrix) of the rows it may learn from, a function giving
# (eligible, key) for any rows; served = exact | (eligible & key <= cut).
Rule = Callable[[cq.Features, Array], Callable[[cq.Features, Array], tuple[Mask, Array]]]


def plain(_f: cq.Features, _x: Array) -> Callable[[cq.Features, Array], tuple[Mask, Array]]:
    return lambda f, x: (np.ones_like(f.exact), f.distance)


def decision(_f: cq.Features, _x: Array) -> Callable[[cq.Features, Array], tuple[Mask, Array]]:
    policy = cd.HitPolicy()

    def apply(f: cq.Features, x: Array) -> tuple[Mask, Array]:
        ok = np.ones_like(f.exact)
        for k in cq.CHECKS:
            ok &= ~f.veto[k]
        return ok, cq.effective(f, policy.lexical_weight)

    return apply


def verifier(f: cq.Features, x: Array) -> Callable[[cq.Features, Array], tuple[Mask, Array]]:
    near = f.distance <= VERIFIER_MAX_DISTANCE
    log_odds = fit_logistic(x[near], f.correct[near])
    return lambda g, y: (g.distance <= VERIFIER_MAX_DISTANCE, -log_odds(y))


RULES: dict[str, Rule] = {"plain": plain, "decision": decision, "verifier": verifier}


def served(f: cq.Features, x: Array, apply: Callable[[cq.Features, Array], tuple[Mask, Array]],
           cut: float) -> Mask:
    eligible, key = apply(f, x)
    hit: Mask = f.exact | (eligible & (key <= cut))
    return hit


def fitted_cut(f: cq.Features, x: Array, apply: Callable[[cq.Features, Array],
               tuple[Mask, Array]], bound: float) -> float:
    eligible, key = apply(f, x)
    return cq.best_recall(f, eligible, key, bound)[1]


def cross_validated(f: cq.Features, x: Array, rule: Rule, bound: float) -> cq.Figures:
    """Mean held-out figures over FIT's two halves: learned and cut on one, counted on the
    other."""
    half = np.arange(len(f.exact)) % 2 == 0
    held = []
    for train in (half, ~half):
        ft, fh = cq.subset(f, train), cq.subset(f, ~train)
        apply = rule(ft, x[train])
        cut = fitted_cut(ft, x[train], apply, bound)
        held.append(cq.figures(fh, served(fh, x[~train], apply, cut)))
    def mean(k: str) -> float:
        return float(np.mean([getattr(h, k) for h in held]))

    return cq.Figures(mean("precision"), mean("recall"), mean("false_hits"),
                      sum(h.hits for h in held))


def audit_replay(f: cq.Features, lookups: Sequence[cq.Lookup], rate: float, seed: int,
                 checkpoints: int = 4) -> list[str]:
    """REPORT in a random order through the default decision, each hit audited with
    probability `rate`: cumulative hit and false-hit rates, and the share of hits whose
    entry already had an audited hit (what a per-entry threshold could learn from)."""
    hit = cq.hits(f, cd.HitPolicy())
    order = list(range(len(lookups)))
    random.Random(seed).shuffle(order)
    rng = random.Random(seed + 1)
    audited: set[str] = set()
    hits = informed = false = nondup = 0
    lines = ["| lookups | hit rate | false-hit rate | hits on an entry already audited |",
             "| --- | --- | --- | --- |"]
    marks = {len(order) * (i + 1) // checkpoints for i in range(checkpoints)}
    for n, i in enumerate(order, start=1):
        nondup += int(not f.duplicate[i])
        if hit[i]:
            hits += 1
            false += int(not f.duplicate[i] and not f.correct[i])
            entry = lookups[i].nearest
            informed += int(entry in audited)
            if rng.random() < rate:
                audited.add(entry)
        if n in marks:
            lines.append(f"| {n} | {hits / n:.3f} | {100 * false / max(nondup, 1):.2f} % | "
                         f"{informed} of {hits} |")
    return lines


@dataclass(frozen=True)
class Data:
    """The whole file, its FIT and REPORT splits, MiniLM vectors of every split text, labels."""

    everything: list[cq.Pair]
    fit: list[cq.Pair]
    report: list[cq.Pair]
    vectors: dict[str, npt.NDArray[np.float32]]
    labels: cq.Labels


def load(pairs: int, seed: int) -> Data:
    """What every hit-quality bench starts from (the embeddings cached on disk)."""
    everything = cq.load_pairs()
    fit, report = cq.split(everything, pairs, seed)
    texts = sorted({t for p in fit + report for t in (p.a, p.b)})
    return Data(everything, fit, report, dict(zip(texts, cq.embed(texts), strict=True)),
                cq.Labels(everything))


def main(argv: Sequence[str] | None = None) -> None:
    from app.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=15_000, help="pairs in each split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.process_time()

    loaded = load(args.pairs, args.seed)
    fit_pairs, report_pairs = loaded.fit, loaded.report
    vectors, labels = loaded.vectors, loaded.labels
    data = {}
    for name, pairs in (("FIT", fit_pairs), ("REPORT", report_pairs)):
        found, per_entry = nearest(pairs, vectors)
        f = cq.features(found, labels)
        data[name] = (f, design(f, found), found, per_entry)
    fit_f, fit_x, _, _ = data["FIT"]
    rep_f, rep_x, rep_found, rep_entries = data["REPORT"]
    print(f"REPORT, HitPolicy() replayed: {cq.figures(rep_f, cq.hits(rep_f, cd.HitPolicy()))}")

    bound = cd.FIT_TARGET_FALSE_HITS
    print(f"\n2-fold cross-validation inside FIT, cut for <= {100 * bound:g} % false hits:\n")
    print("| rule | held-out recall | held-out false hits |\n| --- | --- | --- |")
    for name, rule in RULES.items():
        cv = cross_validated(fit_f, fit_x, rule, bound)
        print(f"| {name} | {cv.recall:.3f} | {100 * cv.false_hits:.2f} % |")

    applied = {name: rule(fit_f, fit_x) for name, rule in RULES.items()}
    print("\nREPORT: recall (false hits) with the cut fitted on FIT for each bound; then recall"
          " with the best cut on REPORT itself (upper bound):\n")
    print("| bound | plain, FIT cut | decision, FIT cut | verifier, FIT cut "
          "| plain, best | decision, best | verifier, best |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for b in BOUNDS:
        cells, best = [], []
        for apply in applied.values():
            fig = cq.figures(rep_f, served(rep_f, rep_x, apply, fitted_cut(fit_f, fit_x, apply, b)))
            cells.append(f"{fig.recall:.3f} ({100 * fig.false_hits:.2f} %)")
            eligible, key = apply(rep_f, rep_x)
            best.append(f"{cq.best_recall(rep_f, eligible, key, b)[0]:.3f}")
        print(f"| {100 * b:g} % | " + " | ".join(cells + best) + " |")

    rate = Settings.from_env().retrieval_cache_audit_rate
    counts = Counter(rep_entries.values())
    print(f"\nREPORT lookups per stored entry that is someone's nearest: "
          f"{dict(sorted(counts.items()))}")
    print(f"\nREPORT replayed in a random order, audit rate {rate:g}:\n")
    print("\n".join(audit_replay(rep_f, rep_found, rate, args.seed)))
    print(f"\n{time.process_time() - started:.0f} CPU s")


if __name__ == "__main__":
    main()
