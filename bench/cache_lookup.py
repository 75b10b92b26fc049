"""Semantic-cache lookup cost and HNSW recall at 1k / 10k / 100k entries, next to redisvl.

    .venv/bin/python bench/cache_lookup.py [--sizes 1000,10000,100000] [--queries 200]

Bulk entries carry random unit vectors (the model would take far too long for
100k); KNN queries are stored vectors plus noise, so each has a true nearest
neighbour. All bulk entries share one tool and scope, so the filter selects them
all; SMALL_SCOPE more entries sit in a scope of their own, as a user's would.
The KNN is `knn_command` itself, timed with the plan the cache picks from the
filter's count and with RediSearch's own choice (no count). Recall@1 compares
the HNSW index (idx:cache's own settings) with an exact FLAT index over the
same hashes. "ours" is the real path,
`SemanticCache.lookup` (exact HMGET, threshold, KNN 1 with the tool + scope +
model + args-digest filter in one round trip, `decide`; its counters run after it
returns, as in the app).

redisvl's `SemanticCache` is loaded with the same vectors under its own prefix,
with the same model as its vectorizer, and with the same four tags as
`filterable_fields` (each entry carries them as `store(filters=...)` writes them,
checked against one real `store`; the same SMALL_SCOPE entries in the small
scope). It is asked with `filter_expression` made of redisvl `Tag`s equal to our
filter (both counted to select the same entries) both ways: `check` (sync) and
`acheck` (async, what an asyncio app like this one would call; ours runs on
uvloop, as `backbone serve` runs the app). These three are timed in the bulk
scope given the vector and as a whole lookup that embeds a short question first;
given the vector, ours and `check` are also timed in the small scope, and `check`
without a filter, as the earlier tables asked it; all take turns going first.
The questions are real ones and the entries random vectors, so every lookup is a
miss. redisvl asks a VECTOR_RANGE at its threshold, which on a miss finds nothing
before the filter is read; ours asks for the nearest entry (`probe` reports it, hit
or not), which reads every entry the filter selects when it scans. CPU per lookup
given the vector is this process's thread time and the Redis server's own time
for the commands it ran (INFO commandstats, read off the clock), medians of each:
less swayed than wall time by what else the machine runs.
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
import uvloop
from redis.typing import EncodableT, FieldT

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redisvl.index import SearchIndex
from redisvl.query.filter import FilterExpression, Tag
from redisvl.schema import IndexSchema

from app.cache.knn import knn_command, knn_filter
from app.cache.semantic import SemanticCache, args_digest
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
MODEL = shared_embedder().model_id  # the cache filters every KNN on its model
DIGEST = args_digest({})  # and on its other arguments: none for a query-only tool
BATCH = 1000
FLAT_ATTRS = ("dims", "distance_metric", "datatype")  # what a FLAT field keeps of HNSW's
SMALL_SCOPE = 10  # entries in the user-like scope, apart from the bulk ones
SMALL_USER = "small"  # whose scope that is: f"user:{SMALL_USER}"
# The tags our entries carry and our KNN filters on, as redisvl filterable fields.
FILTER_TAGS = ("tool", "scope", "model", "args_digest")
CASE_SENSITIVE = {"case_sensitive": True}  # as idx:cache's tags; redisvl's default folds case
QUESTIONS = [f"How do I configure setting number {i} of service {i % 7}?" for i in range(50)]


class BenchTool:
    spec = ToolSpec(TOOL, "bench", QUERY_PARAMETERS)
    policy: CachePolicy | None = CachePolicy(0.12, 3600, "global")

    def query_text(self, arguments: dict[str, Any]) -> str:
        return str(arguments["query"])

    async def run(self, arguments: dict[str, Any], ctx: ToolContext,
                  query_vector: Vector | None = None) -> ToolResult:  # fmt: skip
        return ToolResult("unused")


class UserBenchTool(BenchTool):
    """The same tool with a per-user policy: for `ToolContext(SMALL_USER)` it searches
    the small scope."""

    policy: CachePolicy | None = CachePolicy(0.12, 3600, "user")


def create_indexes(client: redis.Redis) -> None:
    """idx:cache's own schema (its fields, tags and HNSW settings) under the bench's name
    and prefix, and a FLAT twin of it for the exact answers: a field the cache filters on
    can never be missing here (a hand-written field list once lacked `model`, and every
    KNN found nothing)."""
    for name, algorithm in ((HNSW, "hnsw"), (FLAT, "flat")):
        spec = schema("cache", DIMS).to_dict()
        spec["index"].update(name=name, prefix=PREFIX)
        for f in spec["fields"]:
            if f["type"] == "vector" and algorithm == "flat":
                f["attrs"] = {k: v for k, v in f["attrs"].items() if k in FLAT_ATTRS}
                f["attrs"]["algorithm"] = "flat"
        SearchIndex(IndexSchema.from_dict(spec), redis_client=client).create()


def unit(rng: np.random.Generator, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    v = rng.standard_normal((n, DIMS)).astype(np.float32)
    out: np.ndarray[Any, np.dtype[np.float32]] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


Hash = dict[FieldT, EncodableT]


def tags(scope: str) -> Hash:
    """The tags an entry of `scope` carries: ours in its hash, redisvl's as `filters`."""
    return {"tool": TOOL, "scope": scope, "model": MODEL, "args_digest": DIGEST}


def rvl_filter(scope: str) -> FilterExpression:
    """redisvl's filter equal to ours (`knn_filter`): one `Tag` per tag, all required."""
    tag = tags(scope)
    expression = Tag(FILTER_TAGS[0]) == str(tag[FILTER_TAGS[0]])
    for name in FILTER_TAGS[1:]:
        expression &= Tag(name) == str(tag[name])
    return expression


def rvl_entry(j: int | str, prompt: str, blob: bytes, scope: str) -> Hash:
    """A redisvl cache hash as `store(filters=tags(scope))` writes it (`check_rvl_entry`)."""
    return {"entry_id": str(j), "prompt": prompt, "response": "x", "prompt_vector": blob,
            "inserted_at": 0, "updated_at": 0, **tags(scope)}  # fmt: skip


def check_rvl_entry(client: redis.Redis, rvl: Any) -> None:
    """The bulk-loaded redisvl hashes have the fields a real `store` with filters writes:
    100k `store`s (one round trip and a model validation each) would take minutes."""
    key = rvl.store("probe question", "x", vector=[1.0] + [0.0] * (DIMS - 1),
                    filters=tags("global"))  # fmt: skip
    stored = {k.decode() for k in client.hkeys(key)}  # type: ignore[union-attr]
    rvl.drop(keys=[key])
    ours = {str(k) for k in rvl_entry(0, "", b"", "global")}
    if stored != ours:
        raise SystemExit(f"redisvl's store writes {sorted(stored)}, the bench {sorted(ours)}")


def load(client: redis.Redis, vectors: np.ndarray[Any, Any], start: int) -> None:
    for lo in range(0, len(vectors), BATCH):
        pipe = client.pipeline(transaction=False)
        for j, v in enumerate(vectors[lo : lo + BATCH], start=start + lo):
            blob = v.tobytes()
            pipe.hset(f"{PREFIX}{j}", mapping={
                "query": f"synthetic question {j}", "created_at": j, "embedding": blob,
                "result": '{"content":"x","items":[]}', "tool_ms": 1.0, **tags("global"),
            })  # fmt: skip
            pipe.hset(f"{RVL}:{j}", mapping=rvl_entry(j, f"synthetic question {j}", blob, "global"))
        pipe.execute()


def wait_indexed(client: redis.Redis, *names: str) -> None:
    for name in names:
        while True:
            info = client.ft(name).info()  # type: ignore[no-untyped-call]
            if int(info.get("indexing", 0)) == 0 and float(info.get("percent_indexed", 1)) >= 1:
                break
            time.sleep(0.2)


def store_small_scope(client: redis.Redis, vectors: np.ndarray[Any, Any]) -> None:
    pipe = client.pipeline(transaction=False)
    for j, v in enumerate(vectors):
        prompt = f"small scope question {j}"
        pipe.hset(f"{PREFIX}small:{j}", mapping={
            "query": prompt, "created_at": j, "embedding": v.tobytes(),
            "result": '{"content":"x","items":[]}', "tool_ms": 1.0, **tags(f"user:{SMALL_USER}"),
        })  # fmt: skip
        pipe.hset(f"{RVL}:small:{j}",
                  mapping=rvl_entry(f"small:{j}", prompt, v.tobytes(), f"user:{SMALL_USER}"))
    pipe.execute()


def selected(client: redis.Redis, index: str, query: str) -> int:
    reply = client.execute_command("FT.SEARCH", index, query, "LIMIT", 0, 0, "DIALECT", 2)  # type: ignore[no-untyped-call]
    total, _ = parse_search_reply(reply)
    return total


def knn_top1(
    client: redis.Redis, scope: str, v: np.ndarray[Any, Any], counts: tuple[int, int] | None
) -> tuple[str, float]:
    """The production query (`knn_command`), timed: with the plan for `counts` (entries the
    filter selects, entries indexed) or, for None, RediSearch's own."""
    command = knn_command(HNSW, TOOL, scope, v, *(counts or (None, None)), model=MODEL,
                          args_digest=DIGEST)
    t0 = time.perf_counter()
    reply = client.execute_command(*command)  # type: ignore[no-untyped-call]
    elapsed = (time.perf_counter() - t0) * 1000
    _, rows = parse_search_reply(reply)
    return (rows[0][0] if rows else ""), elapsed


def exact_top1(client: redis.Redis, scope: str, v: np.ndarray[Any, Any]) -> str:
    where = knn_filter(TOOL, scope, MODEL, DIGEST)
    reply = client.execute_command(
        "FT.SEARCH", FLAT, f"{where}=>[KNN 1 @embedding $vec AS distance]",
        "PARAMS", 2, "vec", v.tobytes(), "SORTBY", "distance", "ASC",
        "RETURN", 1, "distance", "LIMIT", 0, 1, "DIALECT", 2,
    )  # type: ignore[no-untyped-call]  # fmt: skip
    _, rows = parse_search_reply(reply)
    return rows[0][0] if rows else ""


def noisy(
    rng: np.random.Generator, stored: np.ndarray[Any, Any], n: int, sigma: float
) -> np.ndarray[Any, np.dtype[np.float32]]:
    picks = stored[rng.integers(0, len(stored), n)]
    out = picks + rng.normal(0, sigma, (n, DIMS))
    result: np.ndarray[Any, np.dtype[np.float32]] = (
        out / np.linalg.norm(out, axis=1, keepdims=True)
    ).astype(np.float32)
    return result


@dataclass
class Knn:
    ours: list[float] = field(default_factory=list)  # the plan from the filter's count
    planner: list[float] = field(default_factory=list)  # RediSearch's own choice
    hits: int = 0
    small: list[float] = field(default_factory=list)  # ours, in the small scope
    small_hits: int = 0


def knn_figures(
    client: redis.Redis, n: int, queries: np.ndarray[Any, Any], small: np.ndarray[Any, Any]
) -> Knn:
    out, indexed = Knn(), n + SMALL_SCOPE
    # HNSW timings first, then the exact answers: a FLAT scan between two timed
    # queries would evict the graph from the CPU caches.
    found = []
    for i, v in enumerate(queries):
        plans = (((n, indexed), out.ours), (None, out.planner))
        for counts, samples in plans if i % 2 == 0 else plans[::-1]:
            key, elapsed = knn_top1(client, "global", v, counts)
            samples.append(elapsed)
            if counts is not None:
                found.append(key)
    small_found = []
    for v in small:
        key, elapsed = knn_top1(client, f"user:{SMALL_USER}", v, (SMALL_SCOPE, indexed))
        out.small.append(elapsed)
        small_found.append(key)
    exact = [exact_top1(client, "global", v) for v in queries]
    # A KNN that found nothing is a miss even where the exact search found nothing too
    # (a filter on a field the index lacks matches no entry, and "" == "").
    out.hits = sum(a == b != "" for a, b in zip(found, exact, strict=True))
    exact = [exact_top1(client, f"user:{SMALL_USER}", v) for v in small]
    out.small_hits = sum(a == b != "" for a, b in zip(small_found, exact, strict=True))
    return out


def server_usec(client: redis.Redis) -> float:
    """Redis's own time spent in commands so far, INFO itself left out."""
    stats = client.info("commandstats")
    return sum(
        float(v["usec"]) for k, v in stats.items() if k != "cmdstat_info" and isinstance(v, dict)
    )


def cpu_split(samples: list[tuple[float, float]]) -> str:
    """CPU ms per lookup as "client + Redis", the median of each."""
    client = percentile([c for c, _ in samples], 50)
    server = percentile([s for _, s in samples], 50)
    return f"{client:.2f} + {server:.2f}"


def ms(samples: list[float]) -> str:
    return f"{percentile(samples, 50):.2f} / {percentile(samples, 99):.2f}"


# Ours (async, as the app runs it); redisvl's `check` (sync) and `acheck` (async: what an
# asyncio app like this one would call), both with our filter; then, given the vector
# only, `check` without a filter and both sides in the small scope.
WHOLE = ("ours", "check", "acheck")
CONTENDERS = (*WHOLE, "check unfiltered", "ours, small scope", "check, small scope")


@dataclass
class Lookups:
    embed: list[float] = field(default_factory=list)
    # Given the vector, wall ms per lookup, and (this process's CPU ms, Redis's ms) per
    # lookup, for each contender; whole (embed + lookup) wall ms.
    given: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CONTENDERS})
    cpu: dict[str, list[tuple[float, float]]] = field(
        default_factory=lambda: {c: [] for c in CONTENDERS})
    whole: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in WHOLE})


async def lookups(url: str, questions: list[str], rvl: Any, sync: redis.Redis) -> Lookups:
    """Ours and redisvl's, taking turns going first, so machine noise hits all alike.

    All embed with the same model, which is most of any lookup and the noisiest
    part on a shared machine, so the lookups are also timed given the vector.
    """
    client = async_redis_client(url)
    embedder = shared_embedder()
    cache = SemanticCache(client, Settings(retrieval_cache_audit_rate=0.0), None,
                          index=HNSW, embedder=embedder)  # fmt: skip
    # Ours: the bulk scope (a "global" policy) and the small one (a "user" policy).
    ours = {"ours": (BenchTool(), ToolContext("bench")),
            "ours, small scope": (UserBenchTool(), ToolContext(SMALL_USER))}  # fmt: skip
    # redisvl's: the same filters, and none.
    theirs = {"check": rvl_filter("global"), "acheck": rvl_filter("global"),
              "check unfiltered": None,
              "check, small scope": rvl_filter(f"user:{SMALL_USER}")}  # fmt: skip
    out = Lookups()
    # redisvl keeps its async client once made; each size runs on a new event loop.
    rvl._async_redis_client, rvl._aindex = None, None

    async def run(who: str, q: str, vector: Vector | None) -> None:
        if who in ours:
            tool, ctx = ours[who]
            if vector is None:
                vector = await asyncio.to_thread(embedder.embed, q)  # as the router does
            await cache.lookup(tool, {"query": q}, q, vector, ctx)
            return
        # Given no vector, redisvl embeds the prompt with the same model.
        ask: dict[str, Any] = {"prompt": q} if vector is None else {"vector": vector.tolist()}
        if who == "acheck":
            await rvl.acheck(**ask, num_results=1, filter_expression=theirs[who])
        else:
            rvl.check(**ask, num_results=1, filter_expression=theirs[who])

    async def timed(who: str, q: str, vector: Vector | None) -> None:
        server0 = server_usec(sync)
        cpu0, t0 = time.thread_time(), time.perf_counter()
        await run(who, q, vector)
        (out.given if vector is not None else out.whole)[who].append(
            (time.perf_counter() - t0) * 1000)
        if vector is not None:
            out.cpu[who].append(
                ((time.thread_time() - cpu0) * 1000, (server_usec(sync) - server0) / 1000))
        await cache.drain()  # our counters, off the clock as in the app

    try:
        # The filters' counts, which pick the KNN plans, are taken once a minute per
        # process in the background: in before the timings, as in a running app.
        # redisvl's async client is made on its first acheck: before the timings too.
        first = await asyncio.to_thread(embedder.embed, questions[0])
        for who in (*ours, "acheck"):
            await run(who, questions[0], first)
        await cache.drain()
        for i, q in enumerate(questions):
            t0 = time.perf_counter()
            vector = await asyncio.to_thread(embedder.embed, q)
            out.embed.append((time.perf_counter() - t0) * 1000)
            # Whoever goes first after a wait runs on colder caches: rotate.
            turn = i % len(CONTENDERS)
            order = CONTENDERS[turn:] + CONTENDERS[:turn]
            for who in order:
                await timed(who, q, vector)
            for who in order:
                if who in WHOLE:
                    await timed(who, q, None)
    finally:
        await client.aclose()
    return out


def ratio(ours: list[float], theirs: list[float]) -> str:
    return f"{percentile(ours, 50) / percentile(theirs, 50):.2f}x"


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
    bulk: list[tuple[str, ...]] = []
    user: list[tuple[str, ...]] = []
    knns: list[tuple[str, ...]] = []
    with bench_redis() as client:
        url = client.connection_pool.connection_kwargs
        redis_url = f"redis://{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}"
        create_indexes(client)
        vectorizer = CustomVectorizer(
            embed=lambda t: embedder.embed(t).tolist(),
            embed_many=lambda ts: embedder.embed_many(ts).tolist(),
        )
        rvl = RvlCache(name=RVL, distance_threshold=0.12, vectorizer=vectorizer,
                       filterable_fields=[{"name": t, "type": "tag", "attrs": CASE_SENSITIVE}
                                          for t in FILTER_TAGS],
                       redis_client=client, overwrite=True)  # fmt: skip
        check_rvl_entry(client, rvl)
        stored = np.zeros((0, DIMS), dtype=np.float32)
        small = unit(rng, SMALL_SCOPE)
        store_small_scope(client, small)
        for n in sizes:
            t0 = time.perf_counter()
            fresh = unit(rng, n - len(stored))
            load(client, fresh, len(stored))
            stored = np.vstack([stored, fresh])
            wait_indexed(client, HNSW, FLAT, RVL)
            load_s = time.perf_counter() - t0
            for scope, want in (("global", n), (f"user:{SMALL_USER}", SMALL_SCOPE)):
                got = (selected(client, HNSW, knn_filter(TOOL, scope, MODEL, DIGEST)),
                       selected(client, RVL, str(rvl_filter(scope))))  # fmt: skip
                if got != (want, want):
                    raise SystemExit(f"{scope}: the filters select {got}, not {want} each")
            knn = knn_figures(
                client, n, noisy(rng, stored, args.queries, args.noise),
                noisy(rng, small, args.queries, args.noise),
            )  # fmt: skip
            qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(min(args.queries, 100))]
            # On uvloop, as `backbone serve` runs the app.
            lk = uvloop.run(lookups(redis_url, qs, rvl, client))
            g, cpu = lk.given, lk.cpu
            bulk.append((
                f"{n:,}", ratio(g["ours"], g["check"]), ratio(g["ours"], g["acheck"]),
                *(ms(g[c]) for c in WHOLE), *(cpu_split(cpu[c]) for c in WHOLE),
                *(ms(lk.whole[c]) for c in WHOLE),
            ))  # fmt: skip
            small_scope = ("ours, small scope", "check, small scope")
            user.append((
                f"{n:,}", ratio(g[small_scope[0]], g[small_scope[1]]),
                *(ms(g[c]) for c in small_scope), *(cpu_split(cpu[c]) for c in small_scope),
            ))  # fmt: skip
            knns.append((
                f"{n:,}", f"{load_s:.1f}", ms(lk.embed), ms(knn.ours), ms(knn.planner),
                f"{knn.hits / args.queries:.3f}",
                f"{percentile(knn.small, 50):.2f} / {knn.small_hits / args.queries:.3f}",
                ms(g["check unfiltered"]), cpu_split(cpu["check unfiltered"]),
            ))  # fmt: skip
            counts = []  # what QueryCounts costs Redis once a minute per process
            for query in (knn_filter(TOOL, "global", MODEL, DIGEST), "*"):
                before = server_usec(client)
                selected(client, HNSW, query)
                counts.append((server_usec(client) - before) / 1000)
            print(
                f"... {n} entries done ({load_s:.1f} s to load and index; counting the filter "
                f"took Redis {counts[0]:.2f} ms, the index {counts[1]:.2f} ms)",
                file=sys.stderr,
            )
        rvl.delete()
    print(table(
        "Bulk scope (the filter selects every bulk entry), redisvl with the same filter",
        ["entries", "ours / redisvl check, p50 given the vector", "ours / redisvl acheck",
         "given the vector, p50 / p99 ms: ours", "redisvl check", "redisvl acheck",
         "CPU ms per lookup given the vector, client + Redis: ours", "redisvl check",
         "redisvl acheck", "whole lookup (embed + lookup), p50 / p99 ms: ours",
         "redisvl check", "redisvl acheck"], bulk))  # fmt: skip
    print(table(
        f"{SMALL_SCOPE}-entry scope (a user's), redisvl with the same filter, given the vector",
        ["entries", "ours / redisvl check, p50", "p50 / p99 ms: ours", "redisvl check",
         "CPU ms per lookup, client + Redis: ours", "redisvl check"], user))  # fmt: skip
    print(table(
        "KNN plan and recall; redisvl check without a filter (as the earlier tables asked it)",
        ["entries", "load+index s", "embed p50 / p99 ms", "KNN p50 / p99 ms: ours",
         "RediSearch's plan", "recall@1 HNSW vs FLAT",
         f"{SMALL_SCOPE}-entry scope: KNN p50 ms / recall@1",
         "redisvl check, no filter: p50 / p99 ms given the vector",
         "CPU ms, client + Redis"], knns))  # fmt: skip


def table(title: str, header: list[str], rows: list[tuple[str, ...]]) -> str:
    lines = [f"\n{title}:\n", "| " + " | ".join(header) + " |", "| ---: " * len(header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


if __name__ == "__main__":
    main()
