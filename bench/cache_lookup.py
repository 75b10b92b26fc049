"""Semantic-cache lookup cost and HNSW recall at 1k / 10k / 100k entries, next to redisvl.

    .venv/bin/python bench/cache_lookup.py [--sizes 1000,10000,100000] [--queries 200]

Bulk entries carry random unit vectors (the model would take far too long for
100k); KNN queries are stored vectors plus noise, so each has a true nearest
neighbour. Recall@1 compares the HNSW index (idx:cache's own settings) with an
exact FLAT index over the same hashes. "ours" is the real path,
`SemanticCache.lookup` (exact HMGET, threshold, KNN 1 with the tool+scope filter
in one round trip, `decide`; its counters run after it returns, as in the app).
redisvl's `SemanticCache.check` is loaded with the same vectors under its own
prefix, with the same model as its vectorizer. Both are timed given the vector
and as a whole lookup that embeds a short question first.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.cache.semantic import EF_RUNTIME, SemanticCache
from app.embeddings import Vector, shared_embedder
from app.llm.base import ToolSpec
from app.settings import Settings
from app.stores.clients import async_redis_client
from app.stores.indexes import schema
from app.tools.base import QUERY_PARAMETERS, CachePolicy, ToolContext, ToolResult
from app.tools.kb_search import parse_search_reply
from bench._redis import bench_redis, percentile

DIMS = 384
PREFIX = "bcache:"
HNSW, FLAT = "idx:bcache", "idx:bcache-flat"
RVL = "rvlbench"
TOOL = "bench_tool"
BATCH = 1000
QUESTIONS = [f"How do I configure setting number {i} of service {i % 7}?" for i in range(50)]


class BenchTool:
    spec = ToolSpec(TOOL, "bench", QUERY_PARAMETERS)
    policy: CachePolicy | None = CachePolicy(0.12, 3600, "global")

    def query_text(self, arguments: dict[str, Any]) -> str:
        return str(arguments["query"])

    async def run(self, arguments: dict[str, Any], ctx: ToolContext,
                  query_vector: Vector | None = None) -> ToolResult:  # fmt: skip
        return ToolResult("unused")


def create_indexes(client: redis.Redis) -> None:
    for name, algo in ((HNSW, "HNSW"), (FLAT, "FLAT")):
        vec = ["TYPE", "FLOAT32", "DIM", DIMS, "DISTANCE_METRIC", "COSINE"]
        if algo == "HNSW":
            attrs = schema("cache").fields["embedding"].attrs
            vec += ["M", attrs.m, "EF_CONSTRUCTION", attrs.ef_construction]
        client.execute_command(
            "FT.CREATE", name, "ON", "HASH", "PREFIX", 1, PREFIX, "SCHEMA",
            "tool", "TAG", "scope", "TAG", "query", "TEXT", "created_at", "NUMERIC",
            "embedding", "VECTOR", algo, len(vec), *vec,
        )  # type: ignore[no-untyped-call]  # fmt: skip


def unit(rng: np.random.Generator, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    v = rng.standard_normal((n, DIMS)).astype(np.float32)
    out: np.ndarray[Any, np.dtype[np.float32]] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def load(client: redis.Redis, vectors: np.ndarray[Any, Any], start: int) -> None:
    for lo in range(0, len(vectors), BATCH):
        pipe = client.pipeline(transaction=False)
        for j, v in enumerate(vectors[lo : lo + BATCH], start=start + lo):
            blob = v.tobytes()
            pipe.hset(f"{PREFIX}{j}", mapping={
                "tool": TOOL, "scope": "global", "query": f"synthetic question {j}",
                "created_at": j, "embedding": blob, "result": '{"content":"x","items":[]}',
                "tool_ms": 1.0,
            })  # fmt: skip
            pipe.hset(f"{RVL}:{j}", mapping={
                "entry_id": str(j), "prompt": f"synthetic question {j}", "response": "x",
                "prompt_vector": blob, "inserted_at": j, "updated_at": j,
            })  # fmt: skip
        pipe.execute()


def wait_indexed(client: redis.Redis, *names: str) -> None:
    for name in names:
        while True:
            info = client.ft(name).info()  # type: ignore[no-untyped-call]
            if int(info.get("indexing", 0)) == 0 and float(info.get("percent_indexed", 1)) >= 1:
                break
            time.sleep(0.2)


def knn_top1(client: redis.Redis, index: str, v: np.ndarray[Any, Any]) -> tuple[str, float]:
    # The production query (EF_RUNTIME as in app.semantic_cache); FLAT takes no EF_RUNTIME.
    ef = "" if index == FLAT else " EF_RUNTIME $ef"
    params = ["vec", v.tobytes()] + ([] if index == FLAT else ["ef", EF_RUNTIME])
    t0 = time.perf_counter()
    reply = client.execute_command(
        "FT.SEARCH", index,
        f"(@tool:{{{TOOL}}} @scope:{{global}})=>[KNN 1 @embedding $vec{ef} AS distance]",
        "PARAMS", len(params), *params, "SORTBY", "distance", "ASC",
        "RETURN", 1, "distance", "LIMIT", 0, 1, "DIALECT", 2,
    )  # type: ignore[no-untyped-call]  # fmt: skip
    elapsed = (time.perf_counter() - t0) * 1000
    _, rows = parse_search_reply(reply)
    return (rows[0][0] if rows else ""), elapsed


def ms(samples: list[float]) -> str:
    return f"{percentile(samples, 50):.2f} / {percentile(samples, 99):.2f}"


@dataclass
class Lookups:
    embed: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)  # given the vector
    theirs: list[float] = field(default_factory=list)  # given the vector
    ours_whole: list[float] = field(default_factory=list)  # embed + lookup
    theirs_whole: list[float] = field(default_factory=list)  # check(prompt=...) embeds itself


async def lookups(url: str, questions: list[str], rvl: Any) -> Lookups:
    """Ours and redisvl's check, taking turns going first, so machine noise hits both.

    Both embed with the same model, which is most of either lookup and the noisiest
    part on a shared machine, so the lookups are also timed given the vector.
    """
    client = async_redis_client(url)
    embedder = shared_embedder()
    cache = SemanticCache(client, Settings(retrieval_cache_audit_rate=0.0), None,
                          index=HNSW, embedder=embedder)  # fmt: skip
    tool, ctx = BenchTool(), ToolContext("bench")
    out = Lookups()

    async def ours(q: str, vector: Vector | None) -> None:
        if vector is None:
            vector = await asyncio.to_thread(embedder.embed, q)  # as the router does
        await cache.lookup(tool, {"query": q}, q, vector, ctx)

    def theirs(q: str, vector: Vector | None) -> None:
        if vector is None:
            rvl.check(prompt=q, num_results=1)  # embeds with the same model
        else:
            rvl.check(vector=vector.tolist(), num_results=1)

    async def timed(samples: list[float], q: str, vector: Vector | None, mine: bool) -> None:
        t0 = time.perf_counter()
        await ours(q, vector) if mine else theirs(q, vector)
        samples.append((time.perf_counter() - t0) * 1000)
        await cache.drain()  # our counters, off the clock as in the app

    try:
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            vector = await asyncio.to_thread(embedder.embed, q)
            out.embed.append((time.perf_counter() - t0) * 1000)
            # Whoever goes first after a wait runs on colder caches: alternate.
            order = (True, False) if i % 2 == 0 else (False, True)
            for mine in order:
                await timed(out.ours if mine else out.theirs, q, vector, mine)
            for mine in order:
                await timed(out.ours_whole if mine else out.theirs_whole, q, None, mine)
    finally:
        await client.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--noise", type=float, default=0.012, help="per-dimension noise sigma")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    from redisvl.extensions.cache.llm import SemanticCache as RvlCache
    from redisvl.utils.vectorize import CustomVectorizer

    embedder = shared_embedder()
    embedder.embed_many(QUESTIONS)  # load and warm the model outside the timings

    rng = np.random.default_rng(0)
    rows = []
    with bench_redis() as client:
        url = client.connection_pool.connection_kwargs
        redis_url = f"redis://{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}"
        create_indexes(client)
        vectorizer = CustomVectorizer(
            embed=lambda t: embedder.embed(t).tolist(),
            embed_many=lambda ts: embedder.embed_many(ts).tolist(),
        )
        rvl = RvlCache(name=RVL, distance_threshold=0.12, vectorizer=vectorizer,
                       redis_client=client, overwrite=True)  # fmt: skip
        stored = np.zeros((0, DIMS), dtype=np.float32)
        for n in sizes:
            t0 = time.perf_counter()
            fresh = unit(rng, n - len(stored))
            load(client, fresh, len(stored))
            stored = np.vstack([stored, fresh])
            wait_indexed(client, HNSW, FLAT, RVL)
            load_s = time.perf_counter() - t0
            picks = rng.integers(0, n, args.queries)
            noisy = stored[picks] + rng.normal(0, args.noise, (args.queries, DIMS))
            noisy = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
            # HNSW timings first, then the exact answers: a FLAT scan between two
            # timed queries would evict the graph from the CPU caches.
            found = [knn_top1(client, HNSW, v) for v in noisy]
            truth = [knn_top1(client, FLAT, v)[0] for v in noisy]
            knn_ms = [t for _, t in found]
            hits = sum(got == want for (got, _), want in zip(found, truth, strict=True))
            qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(min(args.queries, 100))]
            lk = asyncio.run(lookups(redis_url, qs, rvl))
            rows.append(
                (
                    n,
                    load_s,
                    ms(lk.embed),
                    ms(knn_ms),
                    hits / len(noisy),
                    ms(lk.ours),
                    ms(lk.theirs),
                    ms(lk.ours_whole),
                    ms(lk.theirs_whole),
                )
            )
            print(f"... {n} entries done ({load_s:.1f} s to load and index)", file=sys.stderr)
        rvl.delete()
    print(
        "\n| entries | load+index s | embed p50 / p99 ms | KNN p50 / p99 ms "
        "| recall@1 HNSW vs FLAT | given the vector: ours p50 / p99 ms | redisvl p50 / p99 ms "
        "| whole lookup: ours p50 / p99 ms | redisvl p50 / p99 ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, load_s, emb, knn, recall, *lookup in rows:
        print(
            f"| {n:,} | {load_s:.1f} | {emb} | {knn} | {recall:.3f} | " + " | ".join(lookup) + " |"
        )


if __name__ == "__main__":
    main()
