"""Does a cross-encoder fine-tuned on all layers buy more hits at <= 1 % false hits? As a
second stage on MiniLM's nearest candidate, trained and cut on FIT only.

    .venv/bin/python bench/experiments/cache_crossenc.py \\
        [--train N] [--epochs E] [--pairs N] [--seed S]

The model: the packaged all-MiniLM-L6-v2 weights (`default_model_path()`) as a BertModel
reading "[CLS] query [SEP] candidate [SEP]" (max 64 tokens), a linear head on the
mean-pooled output, every layer fine-tuned (AdamW, lr 5e-5, warm-up then linear decay,
batches of 32 of like lengths, one CPU thread).

Data: `cache_quality.split`'s FIT half untruncated (disjoint by `a` from REPORT) is split
by `a` in two. HELD-OUT is the FIT lookups (of the --pairs truncated FIT, as
`cache_verifiers` builds them) whose `a` falls in one half; it chooses the checkpoint and
every cut. TRAIN is the other half: its labelled (b, a) pairs, plus the (b, nearest stored
question) pairs of its FIT lookups within VERIFIER_MAX_DISTANCE whose candidate is not the
partner, labelled `correct` as `cache_quality.features` defines it; subsampled to --train
pairs (all nearest-candidate pairs kept). REPORT is never seen before the last tables.

Evaluation as `bench/experiments/cache_mpnet.py` part 1: lookups whose MiniLM nearest is within 0.12
keep that candidate and are scored by the cross-encoder (alone, and after the decision's
vetoes), cuts fitted on HELD-OUT for each bound and applied to REPORT, next to MiniLM
plain distance and the shipped decision cut on the same HELD-OUT lookups. The checkpoint
is chosen by HELD-OUT recall at FIT_TARGET_FALSE_HITS (evaluated at each half epoch).

Cost: the chosen model exported to ONNX (fp32, and int8 by ONNX Runtime's dynamic
quantisation; the int8 model's cut is fitted on its own HELD-OUT scores), CPU ms per pair
scored one at a time on one thread, and the files' sizes. The model is cached in
`bench/results/` (git-ignored) by configuration: the first run at the defaults trains for
about 20 CPU minutes (45 CPU ms a training pair), later runs take about 3.
"""

from __future__ import annotations

import argparse
import hashlib
import random
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

import cache_mpnet as cm
import cache_quality as cq
import cache_verifiers as cv

from app.cache import decision as cd

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]
Apply = Callable[[cq.Features, Array], tuple[Mask, Array]]
NEAR = cv.VERIFIER_MAX_DISTANCE
MAX_LEN = 64
BATCH = 32
LR = 5e-5
FAR = 1e9  # key of rows the cross-encoder did not score (never eligible anyway)
# (query, candidate, serving it is right)
Example = tuple[str, str, bool]


def build_model() -> tuple[object, object]:
    import torch
    from transformers import AutoTokenizer, BertModel

    from app.embeddings import default_model_path

    folder = str(default_model_path())

    class CrossEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel.from_pretrained(folder, attn_implementation="eager")
            self.head = torch.nn.Linear(self.bert.config.hidden_size, 1)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(out.dtype)
            logit: torch.Tensor = self.head((out * m).sum(1) / m.sum(1)).squeeze(-1)
            return logit

    return CrossEncoder(), AutoTokenizer.from_pretrained(folder)


def batches(examples: Sequence[Example], tok: object, rng: random.Random | None
            ) -> list[tuple[dict[str, object], list[int]]]:
    """Batches of like lengths (shuffled in pools of 20 batches when training), each with the
    indices of its examples."""
    order = list(range(len(examples)))
    pool = BATCH * 20
    if rng is not None:
        rng.shuffle(order)
    out = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool],
                       key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        for s in range(0, len(chunk), BATCH):
            idx = chunk[s:s + BATCH]
            enc = tok([examples[i][0] for i in idx], [examples[i][1] for i in idx],  # type: ignore[operator]
                      truncation=True, max_length=MAX_LEN, padding=True, return_tensors="pt")
            out.append((dict(enc), idx))
    if rng is not None:
        rng.shuffle(out)
    return out


def score_torch(model: object, tok: object, pairs: Sequence[tuple[str, str]]) -> Array:
    import torch

    out = np.zeros(len(pairs))
    model.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        for enc, idx in batches([(q, c, False) for q, c in pairs], tok, None):
            out[idx] = model(**enc).numpy()  # type: ignore[operator]
    return out


def train(examples: Sequence[Example], epochs: int, seed: int,
          judge: Callable[[object], float], save: Path) -> tuple[object, object, list[str]]:
    """Fine-tune; `judge(model)` is HELD-OUT recall, called at each half epoch; the best
    state is saved to `save`."""
    import torch

    torch.manual_seed(seed)
    model, tok = build_model()
    rng = random.Random(seed)
    plan = [batches(examples, tok, rng) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)  # type: ignore[attr-defined]
    warm = max(total // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(total - s, 0) / max(total - warm, 1)))
    log, best, step = [], -1.0, 0
    started = time.process_time()
    for epoch, plan_e in enumerate(plan, start=1):
        marks = {len(plan_e) // 2, len(plan_e)}
        loss_sum = 0.0
        for n, (enc, idx) in enumerate(plan_e, start=1):
            model.train()  # type: ignore[attr-defined]
            y = torch.tensor([float(examples[i][2]) for i in idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**enc), y)  # type: ignore[operator]
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss)
            if n % 50 == 0:
                cpu = time.process_time() - started
                print(f"  epoch {epoch} step {n}/{len(plan_e)} loss {loss_sum / n:.3f} "
                      f"{cpu:.0f} CPU s", flush=True)
            if n in marks:
                recall = judge(model)
                at = f"epoch {epoch - 1 + n / len(plan_e):.1f}"
                log.append(f"| {at} | {loss_sum / n:.3f} | {recall:.3f} | "
                           f"{time.process_time() - started:.0f} |")
                print(log[-1], flush=True)
                if recall > best:
                    best = recall
                    torch.save(model.state_dict(), save)  # type: ignore[attr-defined]
                # Written as it goes: a run stopped early is evaluated from its best state.
                save.with_suffix(".log.md").write_text("\n".join(log))
    model.load_state_dict(torch.load(save))  # type: ignore[attr-defined]
    return model, tok, log


def export(model: object, out: Path) -> tuple[Path, Path]:
    """fp32 ONNX (legacy exporter, opset 17, dynamic axes) and its int8 dynamic quantisation."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = out.with_suffix(".int8.onnx")
    if not out.is_file():
        ids = torch.tensor([[101, 7592, 102, 2088, 102], [101, 7592, 102, 2088, 102]])
        mask, types = torch.ones_like(ids), torch.tensor([[0, 0, 0, 1, 1]] * 2)
        dyn = {0: "batch", 1: "sequence"}
        model.eval()  # type: ignore[attr-defined]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (ids, mask, types), str(out),  # type: ignore[arg-type]
                              input_names=["input_ids", "attention_mask", "token_type_ids"],
                              output_names=["logit"],
                              dynamic_axes={"input_ids": dyn, "attention_mask": dyn,
                                            "token_type_ids": dyn, "logit": {0: "batch"}},
                              opset_version=17, dynamo=False)
    if not int8.is_file():
        quantize_dynamic(str(out), str(int8), weight_type=QuantType.QInt8)
    return out, int8


def onnx_scorer(path: Path, tok: object) -> Callable[[Sequence[tuple[str, str]]], Array]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def score(pairs: Sequence[tuple[str, str]]) -> Array:
        out = np.zeros(len(pairs))
        for enc, idx in batches([(q, c, False) for q, c in pairs], tok, None):
            feed = {k: v.numpy() for k, v in enc.items()}  # type: ignore[attr-defined]
            out[idx] = sess.run(None, feed)[0]
        return out

    return score


def column(i: int, vetoes: bool) -> cv.Rule:
    """A second stage: eligible within NEAR (after the vetoes if asked), key column i."""
    def learn(_f: cq.Features, _x: Array) -> Apply:
        def apply(f: cq.Features, x: Array) -> tuple[Mask, Array]:
            ok = f.distance <= NEAR
            if vetoes:
                for k in cq.CHECKS:
                    ok &= ~f.veto[k]
            return ok, x[:, i]

        return apply

    return learn


def first(rule: cv.Rule, n: int) -> cv.Rule:
    """A `cache_verifiers` rule on the first n columns of the design matrix."""
    def learn(f: cq.Features, x: Array) -> Apply:
        apply = rule(f, x[:, :n])
        return lambda g, y: apply(g, y[:, :n])

    return learn


def verifier_with(n: int) -> cv.Rule:
    """`cache_verifiers`' logistic verifier with column n (the cross-encoder's key) added."""
    def learn(f: cq.Features, x: Array) -> Apply:
        near = f.distance <= NEAR
        log_odds = cv.fit_logistic(x[near][:, :n + 1], f.correct[near])
        return lambda g, y: (g.distance <= NEAR, -log_odds(y[:, :n + 1]))

    return learn


def recall_at(f: cq.Features, key: Array, bound: float) -> float:
    return cq.best_recall(f, f.distance <= NEAR, key, bound)[0]


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=12_000, help="training pairs (subsample)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=15_000, help="pairs in each split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    started = time.process_time()

    everything = cq.load_pairs()
    fit_pairs, report_pairs = cq.split(everything, args.pairs, args.seed)
    full_fit, _ = cq.split(everything, len(everything), args.seed)
    assert full_fit[:args.pairs] == fit_pairs
    texts = sorted({t for p in fit_pairs + report_pairs for t in (p.a, p.b)})
    vectors = dict(zip(texts, cq.embed(texts), strict=True))
    labels = cq.Labels(everything)
    found = {"FIT": cv.nearest(fit_pairs, vectors)[0],
             "REPORT": cv.nearest(report_pairs, vectors)[0]}
    feats = {k: cq.features(v, labels) for k, v in found.items()}

    stored = sorted({p.a for p in full_fit})
    random.Random(args.seed + 2).shuffle(stored)
    held_a = set(stored[0::2])
    held = np.array([lk.pair.a in held_a for lk in found["FIT"]])
    fit_f = feats["FIT"]
    own = {(p.b, p.a) for p in full_fit}
    near_pairs = [(lk.pair.b, lk.nearest, bool(c)) for lk, c, d, e, h in zip(
        found["FIT"], fit_f.correct, fit_f.distance, fit_f.exact, held, strict=True)
        if not h and d <= NEAR and not e and (lk.pair.b, lk.nearest) not in own]
    labelled = [(p.b, p.a, p.duplicate) for p in full_fit if p.a not in held_a]
    rng = random.Random(args.seed + 3)
    rng.shuffle(labelled)
    rng.shuffle(near_pairs)
    examples = near_pairs[:args.train] + labelled[:max(args.train - len(near_pairs), 0)]
    print(f"TRAIN: {len(examples)} pairs ({min(len(near_pairs), args.train)} nearest-candidate "
          f"pairs, the rest "
          f"labelled (b, a) of {len(labelled)}; {np.mean([e[2] for e in examples]):.3f} "
          f"positive). HELD-OUT: {int(held.sum())} FIT lookups, "
          f"{int((held & (fit_f.distance <= NEAR)).sum())} within {NEAR}.")

    ho_f = cq.subset(fit_f, held)
    ho_found = [lk for lk, h in zip(found["FIT"], held, strict=True) if h]
    rep_f, rep_found = feats["REPORT"], found["REPORT"]

    def near_of(f: cq.Features, lks: Sequence[cq.Lookup]) -> tuple[npt.NDArray[np.int64],
                                                                  list[tuple[str, str]]]:
        rows = np.flatnonzero(f.distance <= NEAR)
        return rows, [(lks[int(i)].pair.b, lks[int(i)].nearest) for i in rows]

    ho_rows, ho_pairs = near_of(ho_f, ho_found)
    rep_rows, rep_pairs = near_of(rep_f, rep_found)

    def key_of(n: int, rows: npt.NDArray[np.int64], logits: Array) -> Array:
        key = np.full(n, FAR)
        key[rows] = -logits
        return key

    config = f"{args.train}:{args.epochs}:{args.pairs}:{args.seed}:{LR}:{MAX_LEN}:{BATCH}:mean"
    digest = hashlib.sha256(config.encode()).hexdigest()[:12]
    cq.RESULTS.mkdir(parents=True, exist_ok=True)
    weights = cq.RESULTS / f"crossenc-{digest}.pt"
    log_file = weights.with_suffix(".log.md")
    if weights.is_file() and log_file.is_file():
        model, tok = build_model()
        model.load_state_dict(torch.load(weights))  # type: ignore[attr-defined]
        log = log_file.read_text().splitlines()
    else:
        def judge(m: object) -> float:
            key = key_of(len(ho_found), ho_rows, score_torch(m, tok_, ho_pairs))
            return recall_at(ho_f, key, cd.FIT_TARGET_FALSE_HITS)

        _, tok_ = build_model()
        model, tok, log = train(examples, args.epochs, args.seed, judge, weights)
    print(f"\nHELD-OUT recall at {100 * cd.FIT_TARGET_FALSE_HITS:g} % false hits (best cut on "
          "HELD-OUT, the checkpoint choice):\n")
    print("| checkpoint | mean train loss | HELD-OUT recall | CPU s |\n| --- | --- | --- | --- |")
    print("\n".join(log))

    fp32, int8 = export(model, weights.with_suffix(".onnx"))
    check = ho_pairs[:200]
    gap = np.abs(score_torch(model, tok, check) - onnx_scorer(fp32, tok)(check)).max()
    print(f"\nlargest |torch - ONNX fp32| logit gap on {len(check)} HELD-OUT pairs: {gap:.2e}")
    keys = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        score = onnx_scorer(path, tok)
        keys[name] = (key_of(len(ho_found), ho_rows, score(ho_pairs)),
                      key_of(len(rep_found), rep_rows, score(rep_pairs)))
    data = {}
    for i, (name, f, lks) in enumerate((("FIT", ho_f, ho_found), ("REPORT", rep_f, rep_found))):
        x = cv.design(f, lks)
        data[name] = (f, np.hstack([x, keys["fp32"][i][:, None], keys["int8"][i][:, None]]))
    n = data["FIT"][1].shape[1] - 2
    rules: dict[str, cv.Rule] = {
        "MiniLM plain": first(cv.plain, n), "decision": first(cv.decision, n),
        "xenc": column(n, False), "xenc+vetoes": column(n, True),
        "xenc verifier": verifier_with(n),
        "xenc int8": column(n + 1, False), "xenc int8+vetoes": column(n + 1, True),
    }
    print(f"\n## Second stage on MiniLM's nearest candidate (<= {NEAR}); 'FIT' below is "
          f"HELD-OUT ({int(held.sum())} lookups)")
    cm.tables(data, rules)
    bound = cd.FIT_TARGET_FALSE_HITS
    print(f"\nREPORT with the cut fitted on HELD-OUT for <= {100 * bound:g} % (the README's "
          "shipping cut):\n")
    print("| rule | precision | recall | false hits |\n| --- | --- | --- | --- |")
    for name, rule in rules.items():
        apply = rule(*data["FIT"])
        cut = cv.fitted_cut(*data["FIT"], apply, bound)
        fig = cq.figures(rep_f, cv.served(rep_f, data["REPORT"][1], apply, cut))
        print(f"| {name} | {fig.row()} |")

    cost(model, tok, fp32, int8, rep_pairs, float((rep_f.distance <= NEAR).mean()))
    print(f"\n{time.process_time() - started:.0f} CPU s")


def cost(model: object, tok: object, fp32: Path, int8: Path,
         pairs: Sequence[tuple[str, str]], near_share: float) -> None:
    import torch

    sample = [pairs[i] for i in np.random.default_rng(0).choice(len(pairs), 300, replace=False)]

    def per_pair(score: Callable[[Sequence[tuple[str, str]]], object]) -> float:
        for p in sample[:5]:
            score([p])
        t0 = time.process_time()
        for p in sample:
            score([p])
        return 1000 * (time.process_time() - t0) / len(sample)

    model.eval()  # type: ignore[attr-defined]
    rows = [("torch fp32", per_pair(lambda p: score_torch(model, tok, p)), None),
            ("ONNX fp32", per_pair(onnx_scorer(fp32, tok)), fp32),
            ("ONNX int8 (dynamic)", per_pair(onnx_scorer(int8, tok)), int8)]
    print(f"\nCPU ms to score one pair at a time, one thread, {len(sample)} REPORT near pairs:\n")
    print("| model | CPU ms / pair | on disk |\n| --- | --- | --- |")
    for name, ms, path in rows:
        size = f"{path.stat().st_size / 2**20:.1f} MiB" if path else "-"
        print(f"| {name} | {ms:.1f} | {size} |")
    del torch
    print(f"\nlookups per 1,000 whose MiniLM nearest is within {NEAR}: {1000 * near_share:.0f} "
          "(each would score one pair)")


if __name__ == "__main__":
    main()
