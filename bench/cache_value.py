"""What the semantic cache saves per tool on a realistic mix of calls.

    .venv/bin/python bench/cache_value.py [--calls 300] [--web-ms 600] [--seed 7]

A throwaway Redis Stack (REDIS_URL when set) with the production indexes and the
sample corpus ingested (global) plus one private document per user. Each tool
gets the same stream of calls from 20 users: questions drawn with Zipf weights
from 30 topics, asked as written, as a near-identical variant (case, spacing)
or reworded, plus one call in four a question nobody asked before. Every call
goes through the real ToolRouter and SemanticCache, one at a time, and the
bench times the cache's own work (lookup, single-flight claim, store) and the
tool's. `web_search` runs against the local stand-in engine answering after
`--web-ms` (a SearxNG query usually takes 0.5 to 1.5 s). The embedding is left
out of both sides: the router embeds each query once whether or not a cache
sits in front (retrieval needs the vector anyway).

Net saved per 1,000 calls = 1,000 x (hit rate x mean tool time of a miss -
mean cache time per call): what caching gains over calling the tool every time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench._redis import bench_redis  # noqa: E402

T = TypeVar("T")

TOPICS = [
    ("How does Redis persist data to disk?", "In what way does Redis save its data to disk?"),
    ("What is an AOF rewrite?", "What does rewriting the append-only file do?"),
    ("How do hash tags work in Redis Cluster?", "How do Redis Cluster hash tags work?"),
    ("What does EXPIRE do to a key?", "What happens to a key after EXPIRE?"),
    ("How are keys evicted when memory is full?",
     "Which keys does Redis evict when memory is full?"),
    ("What is HNSW?", "What is an HNSW index?"),
    ("How do I run a Lua script atomically?", "How can I run a Lua script atomically?"),
    ("What is MVCC in PostgreSQL?", "How does PostgreSQL MVCC work?"),
    ("How do rq workers pick up jobs?", "How does an rq worker take jobs from a queue?"),
    ("What are server-sent events?", "What is SSE (server-sent events)?"),
    ("How should I chunk documents for RAG?", "What is a good way to chunk documents for RAG?"),
    ("What is a semantic cache?", "What does a semantic cache do?"),
    ("Which Redis data types are there?", "What data types does Redis offer?"),
    ("How does RDB snapshotting work?", "How do RDB snapshots work?"),
    ("What is the difference between AOF and RDB?", "How do AOF and RDB differ?"),
    ("How do I retry failed rq jobs?", "How can failed rq jobs be retried?"),
    ("What is EF_RUNTIME in vector search?", "What does EF_RUNTIME change in a KNN query?"),
    ("Why use cosine distance for embeddings?", "Why is cosine distance used for embeddings?"),
    ("How do transactions isolate readers in PostgreSQL?",
     "How are readers isolated by PostgreSQL transactions?"),
    ("What does the Last-Event-ID header do?", "What is the Last-Event-ID header for?"),
    ("How large should a chunk overlap be?", "How much should chunks overlap?"),
    ("What is a sorted set used for?", "What are sorted sets good for?"),
    ("How does Redis replicate to replicas?", "How do Redis replicas get their data?"),
    ("What is a TTL?", "What does TTL mean for a key?"),
    ("Can Lua scripts touch keys in different slots?",
     "May a Lua script use keys from several slots?"),
    ("How do I cancel a queued rq job?", "How can a queued rq job be cancelled?"),
    ("What is the maxmemory-policy setting?", "What does maxmemory-policy control?"),
    ("How do embeddings capture meaning?", "How do embeddings represent meaning?"),
    ("What is a vacuum in PostgreSQL?", "What does VACUUM do in PostgreSQL?"),
    ("When should a cache entry be invalidated?", "When must a cached entry be invalidated?"),
]
USERS = [f"user{n}" for n in range(20)]


def mix(calls: int, seed: int) -> list[tuple[str, str]]:
    """(user, question): popular topics often, as written / near-identical / reworded,
    and one call in four a question nobody asked before."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(TOPICS))]  # Zipf
    out = []
    for n in range(calls):
        user = rng.choice(USERS)
        if rng.random() < 0.25:
            novel = f"What does note {n} of the operations log say about shard {n % 97}?"
            out.append((user, novel))
            continue
        asked, reworded = rng.choices(TOPICS, weights)[0]
        form = rng.random()
        question = asked if form < 0.5 else f"  {asked.lower()} " if form < 0.7 else reworded
        out.append((user, question))
    return out


@dataclass
class Timings:
    cache_ms: list[float] = field(default_factory=list)  # lookup + claim + store, per call
    tool_ms: list[float] = field(default_factory=list)  # per miss
    hits: int = 0


def timed(sink: list[float], fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            sink.append((time.perf_counter() - started) * 1000)

    return wrapper


async def run_tool(
    settings: Any, client: Any, tool: Any, calls: list[tuple[str, str]], embedder: Any
) -> Timings:
    from app.cache.semantic import SemanticCache
    from app.chat.tool_router import ToolRouter
    from app.llm.base import ToolCall
    from app.tools.base import ToolContext

    cache = SemanticCache(client, settings, embedder=embedder)
    spent: list[float] = []
    for name in ("lookup", "join_flight", "store", "land"):
        setattr(cache, name, timed(spent, getattr(cache, name)))
    ran: list[float] = []
    out = Timings()
    router = ToolRouter({tool.spec.name: tool}, embedder, 30.0, cache=cache)
    inner = tool.parts if hasattr(tool, "parts") else None
    if inner is not None:  # time each part's own run
        def parts(ctx: Any) -> list[Any]:
            got = inner(ctx)
            for p in got:
                p.run = timed(ran, p.run)
            return got
        tool.parts = parts
    else:
        tool.run = timed(ran, tool.run)
    for query in {q for _, q in calls}:  # embeddings outside the timed calls
        await embedder.aembed(query)
    for i, (user, question) in enumerate(calls):
        before_spent, before_ran = len(spent), len(ran)
        routed = await router.run(
            ToolCall(id=f"c{i}", name=tool.spec.name, arguments={"query": question}),
            ToolContext(user),
        )
        out.cache_ms.append(sum(spent[before_spent:]))
        if routed.cached:
            out.hits += 1
        else:
            out.tool_ms.append(sum(ran[before_ran:]))
    await cache.drain()
    return out


def row(name: str, t: Timings, calls: int) -> str:
    hit_rate = t.hits / calls
    cache_ms = statistics.fmean(t.cache_ms)
    tool_ms = statistics.fmean(t.tool_ms) if t.tool_ms else 0.0
    saved_s = 1000 * (hit_rate * tool_ms - cache_ms) / 1000
    pays = "yes" if saved_s > 0 else "no"
    return (f"| {name} | {calls} | {hit_rate:.2f} | {cache_ms:.2f} | "
            f"{statistics.median(t.cache_ms):.2f} | {tool_ms:.2f} | {saved_s:+.2f} | {pays} |")


async def main(args: argparse.Namespace) -> None:
    import dataclasses

    from fakes import FakeSearxng, searx_result

    from app.embeddings import shared_embedder
    from app.kb.ingest import ingest_paths, sample_corpus_dir
    from app.settings import Settings
    from app.stores import indexes
    from app.stores.clients import async_redis_client
    from app.tools import KbSearch, WebSearch

    embedder = shared_embedder()
    embedder.warm()
    calls = mix(args.calls, args.seed)
    with bench_redis() as sync, tempfile.TemporaryDirectory() as tmp:
        url = f"redis://127.0.0.1:{sync.connection_pool.connection_kwargs['port']}/0"
        indexes.create_all(sync)
        ingest_paths(sync, embedder, [sample_corpus_dir()], progress=False)
        for user in USERS:
            private = Path(tmp) / f"{user}.md"
            private.write_text(f"# Notes of {user}\n\n{user} keeps the on-call rota here.\n")
            ingest_paths(sync, embedder, [private], scope=f"user:{user}", progress=False)
        settings = dataclasses.replace(Settings.from_env(), redis_url=url,
                                       retrieval_cache_audit_rate=0.0)
        client = async_redis_client(url)
        fake = FakeSearxng([searx_result(f"https://example.org/{n}", f"Result {n}", "Text.")
                            for n in range(5)], delay=args.web_ms / 1000)
        rows = []
        try:
            kb = await run_tool(settings, client, KbSearch(client, embedder), calls, embedder)
            rows.append(row("kb_search", kb, len(calls)))
            with fake.serve() as base:
                web = await run_tool(settings, client, WebSearch(base), calls, embedder)
            rows.append(row(f"web_search ({args.web_ms} ms engine)", web, len(calls)))
        finally:
            await client.aclose()
    print("| tool | calls | hit rate | cache ms/call mean | p50 | tool ms per miss | "
          "net saved per 1,000 calls (s) | caching pays |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--web-ms", type=int, default=600)
    p.add_argument("--seed", type=int, default=7)
    asyncio.run(main(p.parse_args()))
