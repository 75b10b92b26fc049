"""CPU and wall time per sentence of each embedding backend, one at a time and batched.

    .venv/bin/python bench/embed_cpu.py [--sentences 300]

One sentence at a time is what a lone chat turn costs; batches of 64 are what
the cross-request batcher reaches under load and what ingestion does. CPU is
this process's (all its threads), so a backend that spends two cores for a
lower latency shows it. Also the cosine of each backend's vectors to torch's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.embeddings import Embedder
from bench._redis import percentile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=300)
    args = p.parse_args()
    singles = [f"How does question {i} about HNSW indexes and Redis persistence work?"
               for i in range(args.sentences)]
    batched = [f"Batch sentence {i}: semantic caching keeps a reworded question's result."
               for i in range(args.sentences)]
    variants = [("torch (sentence-transformers, 2 threads)", Embedder(backend="torch")),
                ("onnx, 1 intra-op thread (default)", Embedder(backend="onnx", threads=1)),
                ("onnx, 2 intra-op threads", Embedder(backend="onnx", threads=2))]
    reference = variants[0][1].embed_many(singles)
    print(f"{args.sentences} sentences, each timed alone, then in batches of 64\n")
    print("| backend | one sentence p50 ms | CPU ms per sentence | batched wall ms/sentence "
          "| batched CPU ms/sentence | min cosine to torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, e in variants:
        e.warm()
        lat = []
        c0 = time.process_time()
        for s in singles:
            t = time.perf_counter()
            e.embed(s)
            lat.append((time.perf_counter() - t) * 1000)
        single_cpu = (time.process_time() - c0) * 1000 / len(singles)
        c1, w1 = time.process_time(), time.perf_counter()
        e.embed_many(batched, batch_size=64)
        batch_cpu = (time.process_time() - c1) * 1000 / len(batched)
        batch_wall = (time.perf_counter() - w1) * 1000 / len(batched)
        cos = float((e.embed_many(singles) * reference).sum(axis=1).min())
        print(f"| {name} | {percentile(lat, 50):.2f} | {single_cpu:.2f} | {batch_wall:.2f} "
              f"| {batch_cpu:.2f} | {cos:.7f} |")


if __name__ == "__main__":
    main()
