"""POST /v1/memories/search (KNN with pre-filters) beside GET /v1/memories, by index size.

One real `backbone serve` on loopback, embedded stores. The index is filled in
stages, each adding memories to two populations at once:

- `one user`: every memory belongs to one user (the filter keeps them all);
- `1,000 users`: the same number spread over 1,000 users (the filter keeps 1/1,000).

A row measures one caller of one population: `--requests` sequential requests,
each search with a text not asked before (so every request embeds its text, as a
real one does), nearest 10. Latency is the client's (loopback); app CPU is the
server process's user + system CPU over the row, per request.

Memories are written straight to PostgreSQL (COPY) and the recall copies with
a pipeline, not through `MemoryStore.write` (its per-fact dedupe KNN would make
100k writes take an hour): their vectors are the embeddings of 2,000 generated
facts plus a little noise, so neighbours are as close as real ones.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.embeddings import shared_embedder
from app.stores import keys
from bench._redis import percentile
from bench._stack import cpu_seconds, servers, stores, token

KINDS = ["location", "work", "preference", "dislike", "allergy", "plan", "note"]
PLACES = ["Lisbon", "Porto", "Kyoto", "Oslo", "Lima", "Accra", "Hanoi", "Quito", "Perth", "Riga"]
THINGS = ["olives", "jazz", "window seats", "green tea", "hiking", "chess", "sushi", "opera",
          "cycling", "peanuts", "cats", "rain", "early flights", "spicy food", "board games",
          "trains", "museums", "sailing", "poetry", "coffee"]
TEMPLATES = ["lives near {p}", "plans a trip to {p} with friends", "likes {t}",
             "doesn't like {t}", "is allergic to {t}", "works on {t} projects in {p}",
             "wants to learn about {t}", "visited {p} for {t}", "keeps notes about {t}",
             "prefers {t} over anything in {p}"]
QUESTIONS = ["What does the user think about {t}?", "Has the user been to {p}?",
             "Any plans involving {p}?", "Is the user allergic to {t}?",
             "Where does the user live, near {p}?", "What about {t} and {p}?"]


def facts(n: int) -> list[str]:
    rng = random.Random(7)
    out = set()
    while len(out) < n:
        t = rng.choice(TEMPLATES)
        out.add(t.format(p=rng.choice(PLACES), t=rng.choice(THINGS)) + f" ({rng.randint(1, 99)})")
    return sorted(out)


def fill(r: redis.Redis, pg: psycopg.Connection[Any], owners: list[str], base: np.ndarray,
         texts: list[str], model: str, rng: np.random.Generator) -> None:
    """One memory per entry of `owners`, in both stores."""
    picks = rng.integers(0, len(texts), len(owners))
    noise = rng.normal(0, 0.02, (len(owners), base.shape[1])).astype(np.float32)
    vectors = base[picks] + noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    now = time.time()
    pipe = r.pipeline(transaction=False)
    with pg.cursor() as cur, cur.copy(
        "COPY memories (id, user_id, kind, content) FROM STDIN"
    ) as copy:
        for i, user in enumerate(owners):
            mid = uuid.uuid4().hex
            kind = KINDS[int(picks[i]) % len(KINDS)]
            content = texts[int(picks[i])]
            copy.write_row((mid, user, kind, content))
            pipe.hset(keys.memory(user, mid), mapping={
                "user": user, "kind": kind, "model": model, "session": "", "content": content,
                "updated_at": now - i, "embedding": vectors[i].tobytes()})
            if len(pipe) >= 2000:
                pipe.execute()
    pipe.execute()


def wait_indexed(r: redis.Redis) -> None:
    while True:
        info = r.ft(keys.INDEX_MEMORY).info()  # type: ignore[no-untyped-call]
        if not int(info.get("indexing", 0)):
            return
        time.sleep(0.5)


def measure(client: httpx.Client, base: str, user: str, requests: int, pid: int,
            rng: random.Random) -> dict[str, float]:
    h = {"Authorization": f"Bearer {token(user)}"}
    out: dict[str, float] = {}
    for name in ("search", "list"):
        times = []
        cpu0 = cpu_seconds([pid])
        for i in range(requests):
            started = time.perf_counter()
            if name == "search":
                q = rng.choice(QUESTIONS).format(p=rng.choice(PLACES), t=rng.choice(THINGS))
                res = client.post(f"{base}/v1/memories/search", headers=h,
                                  json={"text": f"{q} #{uuid.uuid4().hex[:6]}", "limit": 10})
            else:
                res = client.get(f"{base}/v1/memories", headers=h)
            times.append(time.perf_counter() - started)
            assert res.status_code == 200, res.text
            if i == 0:
                found = len(res.json()["memories"])
                assert found > 0, (name, user)
        out[f"{name} p50"] = percentile(times, 50) * 1000
        out[f"{name} p99"] = percentile(times, 99) * 1000
        out[f"{name} cpu"] = (cpu_seconds([pid]) - cpu0) / requests * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000",
                    help="memories per population at each stage, ascending")
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(11)
    pick = random.Random(3)
    solo = "bench-solo"
    many = [f"bench-u{i:04d}" for i in range(1000)]
    embedder = shared_embedder()
    texts = facts(2000)
    base = np.asarray(embedder.embed_many(texts), dtype=np.float32)
    rows = []
    with stores() as settings:
        r = redis.Redis.from_url(settings.redis_url or "")
        with psycopg.connect(settings.database_url or "", autocommit=True) as pg:
            have = 0
            pids: list[int] = []
            for size in sizes:
                add = size - have
                started = time.perf_counter()
                fill(r, pg, [solo] * add, base, texts, embedder.model_id, rng)
                fill(r, pg, [many[i % 1000] for i in range(have, size)], base, texts,
                     embedder.model_id, rng)
                wait_indexed(r)
                have = size
                print(f"stage {size:,}: filled and indexed in "
                      f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
                with servers(settings, pids=pids) as [url], httpx.Client(timeout=30) as client:
                    for _ in range(20):  # warm the connection pools and the model
                        client.post(f"{url}/v1/memories/search", json={"text": "warm up"},
                                    headers={"Authorization": f"Bearer {token(solo)}"})
                    for label, user, own in (("one user", solo, size),
                                             ("1,000 users", many[0], size // 1000)):
                        m = measure(client, url, user, args.requests, pids[-1], pick)
                        rows.append({"memories": f"{size:,} of {label}", "index holds":
                                     f"{2 * size:,}", "caller's": f"{own:,}", **m})
        r.close()
    print(table(rows))


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    head = [c if not c.endswith(("p50", "p99", "cpu")) else
            c.replace("cpu", "app CPU ms/req") if c.endswith("cpu") else c + " ms"
            for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(v if isinstance(v, str) else f"{v:,.1f}" for v in row.values())
              + " |" for row in rows]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
