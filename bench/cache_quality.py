"""Semantic-cache hit quality on labelled question pairs: plain distance vs the full decision.

    .venv/bin/python bench/cache_quality.py [--pairs N] [--seed S] [--fit]

What it does: loads `/work/shared/data/qqp-pairs/pairs.jsonl`, splits it
deterministically into a FIT part and a REPORT part (N pairs each, default
15,000; the split is by the stored question `a`, so one `a` never lands in
both), embeds every question with `app.embeddings.shared_embedder()`, stores
each split's `a` side with `SemanticCache.store` (the project's
`schemas/cache.yaml` index in one throwaway `EmbeddedRedis`, each split a tool
of its own in the `user:bench` scope) and looks up every `b` with
`SemanticCache.probe`, the code `lookup` runs: exact key, the scope-filtered
KNN at the production `EF_RUNTIME`, the scope re-check, the tool's threshold
state and `decide` on the two texts as asked. The default figures are what the
cache served; the other policies of the tables replay `decide`'s rule (`hits`)
on the same candidates, and the run stops if that replay and the cache ever
disagree at the default.

Definitions (per lookup of one `b`):

- correct hit: the pair is a duplicate, the lookup hits, and the nearest
  stored `a` is its own partner (same text);
- false hit: any other hit: a hit on a non-duplicate pair, or a hit on
  someone else's `a`;
- precision = correct hits / hits;
- recall = correct hits / lookups of duplicate pairs;
- false-hit rate = hits on lookups of non-duplicate pairs / lookups of
  non-duplicate pairs (the "wrong answer served" rate of the issue). Hits of
  duplicates on a wrong partner are rare; they lower precision only.

`--fit` also runs the grid search on the FIT split that produced the
constants in `app/cache/decision.py` and prints the best policy; the defaults
are never changed by a run. Embeddings are cached under `bench/results/` (git
ignores it), so a second run skips the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAIRS = Path("/work/shared/data/qqp-pairs/pairs.jsonl")
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    duplicate: bool


def load_pairs(path: Path = PAIRS) -> list[Pair]:
    with path.open() as f:
        return [Pair(r["a"], r["b"], bool(r["duplicate"])) for r in map(json.loads, f)]


def split(pairs: Sequence[Pair], n: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """FIT and REPORT, n pairs each, grouped by `a` so no stored question is in both."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.a, []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    fit = [p for k in keys[0::2] for p in groups[k]]
    report = [p for k in keys[1::2] for p in groups[k]]
    rng = random.Random(seed + 1)
    rng.shuffle(fit)
    rng.shuffle(report)
    return fit[:n], report[:n]


def embed(texts: Sequence[str], batch: int = 512) -> npt.NDArray[np.float32]:
    """Normalised embeddings in input order, cached on disk by model and texts."""
    from tqdm import tqdm

    from app.embeddings import shared_embedder

    embedder = shared_embedder()
    digest = hashlib.sha256(
        "\n".join([embedder.model_name, *texts]).encode()
    ).hexdigest()[:16]
    cached = RESULTS / f"embeddings-{digest}.npy"
    if cached.exists():
        loaded: npt.NDArray[np.float32] = np.load(cached)
        return loaded
    # Shortest first: batches of like lengths pad least.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), embedder.dims), dtype=np.float32)
    with tqdm(total=len(texts), desc="embedding", unit="q") as bar:
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            out[idx] = embedder.embed_many([texts[i] for i in idx], batch_size=64)
            bar.update(len(idx))
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.save(cached, out)
    return out


@dataclass(frozen=True)
class Lookup:
    """One `b` looked up: the stored `a` the cache judged, its distance, and (when the
    lookup went through the cache) whether the cache served it and why."""

    pair: Pair
    nearest: str
    distance: float
    served: bool | None = None
    reason: str = ""


# Every split is one tool in one `user` scope, so each lookup runs the scope filter.
BENCH_USER = "bench"


class SplitTool:
    """One split as a cacheable tool: the cache reads only its name and policy. The
    policy is the shipped tools' (`kb_search`: fitted bound, user scope), so the
    threshold state starts where theirs does and `decide` gets `HitPolicy()`."""

    def __init__(self, name: str) -> None:
        from app.cache.decision import FITTED_MAX_DISTANCE
        from app.llm.base import ToolSpec
        from app.tools.base import QUERY_PARAMETERS, CachePolicy

        self.spec = ToolSpec(name, "a bench split", QUERY_PARAMETERS)
        self.policy = CachePolicy(FITTED_MAX_DISTANCE, 86_400, "user")

    def query_text(self, arguments: dict[str, object]) -> str:
        return str(arguments["query"])

    async def run(self, arguments: dict[str, object], ctx: object,
                  query_vector: object = None) -> object:
        raise AssertionError("the bench never runs a split's tool")


async def through_cache(
    client: object,
    settings: object,
    splits: dict[str, list[Pair]],
    vectors: dict[str, npt.NDArray[np.float32]],
    user: str = BENCH_USER,
    batch: int = 64,
) -> dict[str, list[Lookup]]:
    """Store each split's `a` side with `SemanticCache.store`, then look up every `b` with
    `SemanticCache.probe`: the exact key, the scope-filtered KNN at the production
    `EF_RUNTIME`, the scope re-check, the threshold state and `decide`, as `lookup`
    runs them (lookup = probe + memo, counters, audit)."""
    import asyncio

    from tqdm import tqdm

    from app.cache.semantic import SemanticCache
    from app.tools.base import ToolContext, ToolResult

    cache = SemanticCache(client, settings)  # type: ignore[arg-type]
    ctx = ToolContext(user)
    out: dict[str, list[Lookup]] = {}
    for name, pairs in splits.items():
        tool = SplitTool(name)
        stored = sorted({p.a for p in pairs})
        for start in tqdm(range(0, len(stored), batch), desc=f"store {name}", unit="batch"):
            await asyncio.gather(*[
                cache.store(tool, {"query": a}, a, vectors[a], ctx,  # type: ignore[arg-type]
                            ToolResult(content=a), 0.0)
                for a in stored[start : start + batch]
            ])  # fmt: skip
        found: list[Lookup] = []
        for start in tqdm(range(0, len(pairs), batch), desc=f"lookup {name}", unit="batch"):
            chunk = pairs[start : start + batch]
            probes = await asyncio.gather(*[
                cache.probe(tool, {"query": p.b}, p.b, vectors[p.b], ctx)  # type: ignore[arg-type]
                for p in chunk
            ])  # fmt: skip
            for p, probe in zip(chunk, probes, strict=True):
                assert probe is not None, "a split's lookups are always cacheable"
                found.append(Lookup(
                    p, probe.candidate or "", 2.0 if probe.distance is None else probe.distance,
                    probe.hit is not None, probe.decision.reason))  # fmt: skip
        out[name] = found
    return out


def nearest_in_redis(
    splits: dict[str, list[Pair]], vectors: dict[str, npt.NDArray[np.float32]]
) -> dict[str, list[Lookup]]:
    """`through_cache` against a throwaway Redis Stack with the project's cache index."""
    import asyncio
    import dataclasses

    from app.settings import Settings
    from app.stack.embedded import EmbeddedRedis, free_port
    from app.stores import indexes
    from app.stores.clients import async_redis_client, redis_client

    with tempfile.TemporaryDirectory(prefix="cache-quality-") as tmp:
        server = EmbeddedRedis(Path(tmp), free_port())
        url = server.start()
        client = redis_client(url)
        try:
            indexes.index(client, "cache", dims=384).create(overwrite=True)
            settings = dataclasses.replace(Settings.from_env(), redis_url=url,
                                           retrieval_cache_audit_rate=0.0)

            async def run() -> dict[str, list[Lookup]]:
                aclient = async_redis_client(url)
                try:
                    return await through_cache(aclient, settings, splits, vectors)
                finally:
                    await aclient.aclose()

            return asyncio.run(run())
        finally:
            client.close()
            server.stop()


class Labels:
    """What the whole file says about two questions: duplicates are merged transitively
    (union-find on canonical text), a non-duplicate label separates two groups."""

    def __init__(self, pairs: Sequence[Pair]) -> None:
        from app.cache.decision import canonical_text

        self._canon = canonical_text
        self._parent: dict[str, str] = {}
        for p in pairs:
            if p.duplicate:
                self._parent[self._find(self._canon(p.a))] = self._find(self._canon(p.b))

    def _find(self, x: str) -> str:
        parent = self._parent
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def same(self, a: str, b: str) -> bool:
        return self._find(self._canon(a)) == self._find(self._canon(b))


@dataclass
class Features:
    """Everything the decision looks at, per lookup, as arrays (one row per lookup)."""

    distance: npt.NDArray[np.float64]
    lexical: npt.NDArray[np.float64]
    exact: npt.NDArray[np.bool_]
    veto: dict[str, npt.NDArray[np.bool_]]  # check name -> that check vetoes
    duplicate: npt.NDArray[np.bool_]  # the looked-up pair is labelled a duplicate
    correct: npt.NDArray[np.bool_]  # serving this candidate would be right


CHECKS = ("check_numbers", "check_negation", "check_names")


def features(lookups: Sequence[Lookup], labels: Labels | None) -> Features:
    """With labels: a candidate other than the partner is judged by the file's labels."""
    from app.cache import decision as cd

    only = {c: cd.HitPolicy(**{k: k == c for k in CHECKS}) for c in CHECKS}
    rows = []
    for lk in lookups:
        q, c = lk.pair.b, lk.nearest
        # Questions of equal canonical text share one entry (one key): the last one stored.
        own = cd.canonical_text(c) == cd.canonical_text(lk.pair.a)
        correct = lk.pair.duplicate if own else labels is not None and labels.same(q, c)
        vetoes = [cd.second_check(q, c, only[k]) is not None for k in CHECKS]
        exact = cd.canonical_text(q) == cd.canonical_text(c)
        rows.append((lk.distance, cd.lexical_similarity(q, c), exact, lk.pair.duplicate,
                     correct or exact, *vetoes))
    cols = list(zip(*rows, strict=True))
    return Features(
        distance=np.array(cols[0], dtype=np.float64),
        lexical=np.array(cols[1], dtype=np.float64),
        exact=np.array(cols[2], dtype=bool),
        duplicate=np.array(cols[3], dtype=bool),
        correct=np.array(cols[4], dtype=bool),
        veto={k: np.array(cols[5 + i], dtype=bool) for i, k in enumerate(CHECKS)},
    )


def effective(f: Features, weight: float) -> npt.NDArray[np.float64]:
    """1 - combined_score for every row: the decision's score cut on the distance scale."""
    from app.cache.decision import combined_score

    out = 1.0 - combined_score(f.distance, f.lexical, weight)  # type: ignore[arg-type]
    return np.asarray(out, dtype=np.float64)


def hits(f: Features, policy: object) -> npt.NDArray[np.bool_]:
    """`decide` for every row at once (the test suite checks they agree)."""
    from app.cache.decision import HitPolicy

    assert isinstance(policy, HitPolicy)
    ok = f.distance <= policy.max_distance
    for k in CHECKS:
        if getattr(policy, k):
            ok &= ~f.veto[k]
    ok &= 1.0 - effective(f, policy.lexical_weight) >= policy.min_score
    result: npt.NDArray[np.bool_] = ok | f.exact
    return result


@dataclass(frozen=True)
class Figures:
    precision: float
    recall: float
    false_hits: float
    hits: int

    def row(self) -> str:
        return f"{self.precision:.3f} | {self.recall:.3f} | {100 * self.false_hits:.2f} %"

    def __str__(self) -> str:
        return f"precision {self.precision:.4f}, recall {self.recall:.4f}, " \
            f"false hits {100 * self.false_hits:.3f} % ({self.hits} hits)"


def figures(f: Features, hit: npt.NDArray[np.bool_]) -> Figures:
    good = hit & f.correct
    dup_lookups = max(int(f.duplicate.sum()), 1)
    other_lookups = max(int((~f.duplicate).sum()), 1)
    return Figures(
        precision=float(good.sum() / max(int(hit.sum()), 1)),
        recall=float((good & f.duplicate).sum() / dup_lookups),
        false_hits=float((hit & ~f.duplicate & ~f.correct).sum() / other_lookups),
        hits=int(hit.sum()),
    )


THRESHOLDS = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20, 0.25, 0.30)


def subset(f: Features, rows: npt.NDArray[np.bool_]) -> Features:
    return Features(f.distance[rows], f.lexical[rows], f.exact[rows],
                    {k: v[rows] for k, v in f.veto.items()}, f.duplicate[rows], f.correct[rows])


def fit(f: Features, target: float) -> tuple[object, Figures]:
    """Grid search on FIT: for each (lexical weight, max distance), the score cut that keeps
    false hits <= target. The pair is chosen by 2-fold cross-validation inside FIT (cut
    fitted on one half, recall counted on the other), which stops the grid from buying
    recall with noise; the cut is then refitted on the whole of FIT."""
    halves = np.arange(len(f.exact)) % 2 == 0
    folds = [(subset(f, halves), subset(f, ~halves)), (subset(f, ~halves), subset(f, halves))]
    best: tuple[float, float, float] | None = None
    for weight in np.round(np.arange(0.0, 0.21, 0.02), 2):
        for max_distance in (0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20):
            held_out = []
            for train, test in folds:
                policy = _cut(train, weight, max_distance, target)
                held_out.append(figures(test, hits(test, policy)).recall)
            if best is None or np.mean(held_out) > best[0]:
                best = (float(np.mean(held_out)), float(weight), max_distance)
    assert best is not None
    policy = _cut(f, best[1], best[2], target)
    return policy, figures(f, hits(f, policy))


def _cut(f: Features, weight: float, max_distance: float, target: float) -> object:
    from app.cache.decision import HitPolicy

    eligible = f.distance <= max_distance
    for k in CHECKS:
        eligible &= ~f.veto[k]
    cut = best_recall(f, eligible, effective(f, weight), target)[1]
    # Rounded so the constant can be written down; the 5e-5 stays on the safe side.
    return HitPolicy(max_distance, round(1.0 - cut + 5e-5, 4), weight)


def table(f: Features, policy: object) -> list[str]:
    """Plain distance vs the full decision at the same t: score >= 1 - t, with the
    distance ceiling raised by the most the lexical term can add."""
    from app.cache.decision import HitPolicy

    assert isinstance(policy, HitPolicy)
    lines = [
        "| t | plain: precision | recall | false hits "
        "| decision: precision | recall | false hits |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in THRESHOLDS:
        plain = figures(f, hits(f, HitPolicy.distance_only(t)))
        full = HitPolicy(t + policy.lexical_weight, 1.0 - t, policy.lexical_weight)
        lines.append(f"| {t:.2f} | {plain.row()} | {figures(f, hits(f, full)).row()} |")
    return lines


def best_recall(
    f: Features, eligible: npt.NDArray[np.bool_], key: npt.NDArray[np.float64], bound: float
) -> tuple[float, float]:
    """(recall, cut): the most recall from `exact | (eligible & key <= cut)` over every cut
    whose false-hit rate stays <= bound (cumulative counts: one sort, not a pass per cut)."""
    other = max(int((~f.duplicate).sum()), 1)
    dup = max(int(f.duplicate.sum()), 1)
    wrong = ~f.duplicate & ~f.correct
    right = f.duplicate & f.correct
    free_wrong = int((f.exact & wrong).sum())
    free_right = int((f.exact & right).sum())
    rows = np.flatnonzero(eligible & ~f.exact)
    rows = rows[np.argsort(key[rows], kind="stable")]
    bad = np.cumsum(wrong[rows]) + free_wrong
    good = np.cumsum(right[rows]) + free_right
    # Only cut between distinct keys: equal keys hit together.
    last = np.r_[key[rows][1:] != key[rows][:-1], True] if len(rows) else np.zeros(0, bool)
    ok = last & (bad <= bound * other)
    if not ok.any():
        return (free_right / dup if free_wrong <= bound * other else 0.0), -np.inf
    at = int(np.flatnonzero(ok)[np.argmax(good[ok])])
    return float(good[at] / dup), float(key[rows][at])


def at_bound(f: Features, bound: float) -> float:
    """Plain distance's best recall under a false-hit bound."""
    return best_recall(f, np.ones_like(f.exact), f.distance, bound)[0]


def iso_table(f: Features, policy: object) -> list[str]:
    """For each false-hit bound: plain distance's best recall, and the decision's (default
    checks and lexical weight, its score cut moved to the bound on this split)."""

    eligible = np.ones_like(f.exact)
    for k in CHECKS:
        if getattr(policy, k):
            eligible &= ~f.veto[k]
    weight = float(getattr(policy, "lexical_weight"))  # noqa: B009
    key = effective(f, weight)
    lines = ["| false-hit bound | plain distance: recall | decision: recall |",
             "| --- | --- | --- |"]
    for bound in (0.005, 0.01, 0.02, 0.05, 0.10):
        lines.append(f"| {100 * bound:g} % | {at_bound(f, bound):.3f} | "
                     f"{best_recall(f, eligible, key, bound)[0]:.3f} |")
    return lines


def contributions(f: Features, policy: object) -> list[str]:
    """Recall under 1 % and 5 % false hits for plain distance, each piece alone, and the
    full decision without one piece at a time."""

    weight = float(getattr(policy, "lexical_weight"))  # noqa: B009
    cases: list[tuple[str, tuple[str, ...], float]] = [
        ("plain distance", (), 0.0),
        *[(f"{k} only", (k,), 0.0) for k in CHECKS],
        (f"lexical term only (weight {weight:g})", (), weight),
        *[(f"full decision without {k}", tuple(c for c in CHECKS if c != k), weight)
          for k in CHECKS],
        ("full decision without lexical term", CHECKS, 0.0),
        ("full decision", CHECKS, weight),
    ]
    lines = ["| configuration | recall at 1 % false hits | recall at 5 % false hits |",
             "| --- | --- | --- |"]
    for name, checks, w in cases:
        eligible = np.ones_like(f.exact)
        for k in checks:
            eligible &= ~f.veto[k]
        key = effective(f, w)
        r1, r5 = (best_recall(f, eligible, key, b)[0] for b in (0.01, 0.05))
        lines.append(f"| {name} | {r1:.3f} | {r5:.3f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    from app.cache import decision as cd

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=15_000, help="pairs in each split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit", action="store_true", help="grid-search the policy on FIT")
    args = ap.parse_args(argv)

    started = time.monotonic()
    everything = load_pairs()
    fit_pairs, report_pairs = split(everything, args.pairs, args.seed)
    texts = sorted({t for p in fit_pairs + report_pairs for t in (p.a, p.b)})
    vectors = dict(zip(texts, embed(texts), strict=True))
    found = nearest_in_redis({"fit": fit_pairs, "report": report_pairs}, vectors)
    labels = Labels(everything)
    # The measurement: each b against its own labelled partner only.
    partner = {
        tool: [Lookup(p, p.a, 1.0 - float(vectors[p.a] @ vectors[p.b])) for p in pairs]
        for tool, pairs in (("fit", fit_pairs), ("report", report_pairs))
    }
    nearest_f = {tool: features(found[tool], labels) for tool in found}
    partner_f = {tool: features(partner[tool], None) for tool in partner}
    # What the cache served, lookup by lookup. The tables below sweep other policies with
    # `hits` over the same candidates; at the default it must be the cache's own answer.
    served = {tool: np.array([lk.served for lk in found[tool]], dtype=bool) for tool in found}
    for tool, f in nearest_f.items():
        differ = int((hits(f, cd.HitPolicy()) != served[tool]).sum())
        print(f"{tool}: the cache served {int(served[tool].sum())} of {len(served[tool])}; "
              f"the bench's replay of HitPolicy() differs on {differ}")
        if differ:
            raise SystemExit("the bench no longer measures what the cache decides")

    policy: object = cd.HitPolicy()
    bound = cd.FIT_TARGET_FALSE_HITS
    if args.fit:
        policy, fig = fit(nearest_f["fit"], bound)
        print(f"\nfitted on FIT (nearest in Redis), false hits <= {100 * bound:.1f} %: {policy}")
        print(f"  on FIT: precision | recall | false hits = {fig.row()}")
    assert isinstance(policy, cd.HitPolicy)

    for name, feats in (("nearest stored question (SemanticCache.probe)", nearest_f),
                        ("own labelled partner only (decide alone, no cache)", partner_f)):
        rep = feats["report"]
        print(f"\n### REPORT split, candidate = {name}: {len(rep.distance)} lookups, "
              f"{int(rep.duplicate.sum())} duplicates\n")
        print("\n".join(table(rep, policy)))
        print("\nrecall at equal false-hit rate (each side at its best setting under the bound):\n")
        print("\n".join(iso_table(rep, policy)))
        live = name.startswith("nearest") and policy == cd.HitPolicy()
        chosen = figures(rep, served["report"] if live else hits(rep, policy))
        source = "served by SemanticCache" if live else "decide() replayed on the pair"
        print(f"\ndefault {policy}\n  decision ({source}): {chosen}\n  plain distance at the same "
              f"false-hit rate: recall {at_bound(rep, chosen.false_hits):.4f}")
        print("\nwhat each piece adds: recall at equal false-hit rate, score cut refitted "
              "on this split\n")
        print("\n".join(contributions(rep, policy)))
        print("\nwhat each check vetoes among plain-distance hits at t = 0.10 "
              "(hits removed: false / correct):")
        base = hits(rep, cd.HitPolicy.distance_only(0.10))
        print(f"  all hits at 0.10: {int((base & ~rep.correct).sum())} false / "
              f"{int((base & rep.correct).sum())} correct")
        for k in CHECKS:
            gone = base & rep.veto[k]
            print(f"  {k:15s} {int((gone & ~rep.correct).sum())} / "
                  f"{int((gone & rep.correct).sum())}")
    print(f"\n{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
