"""The cache's KNN query: its filter, its plan and the counts the plan is chosen from.

`knn_command` is the one FT.SEARCH every lookup runs: the single nearest entry of
one tool in one scope and model, behind a TAG pre-filter (`knn_filter`). Which
way RediSearch runs it (`knn_plan`) follows how many entries that filter
selects, counted in the background by `QueryCounts`, never on a lookup's path.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import redis.asyncio as aredis
import redis.exceptions as rexc

from app.embeddings import Vector
from app.stores.indexes import escape_tag
from app.tools.kb_search import parse_search_reply

log = logging.getLogger("backbone.cache")

KNN_FIELDS = ("query", "scope", "result", "tool_ms", "version", "distance")
# HNSW candidates examined per KNN query, at most (`knn_plan` takes fewer in a smaller
# index). At 100k random 384-d entries the default (10) found the true nearest entry
# 34 % of the time, 64: 84 %, 160: 96-99 %, 200: 99.8 % with a KNN p99 near 2 ms; 256
# found no more (bench/cache_lookup.py).
EF_RUNTIME = 200
# The KNN plan by how many entries its filter selects (`knn_plan`): a scan up to
# ADHOC_MAX, else HNSW batches of KNN_BATCH_SIZE. Counts are retaken after
# COUNT_TTL_SECONDS, for at most COUNT_MEMO_SIZE filters per process.
ADHOC_MAX = 2000
KNN_BATCH_SIZE = 64
COUNT_TTL_SECONDS = 60.0
COUNT_MEMO_SIZE = 4096

@functools.lru_cache(maxsize=COUNT_MEMO_SIZE)  # every lookup builds one; escaping is regexes
def knn_filter(
    tool: str, scope: str, model: str | None = None, args_digest: str | None = None
) -> str:
    """The KNN's pre-filter: an entry must match every clause (another filter, one more).
    The cache always passes its model (vectors of two models are never compared) and
    the digest of the call's other arguments (another argument set's entry is never
    served)."""
    clauses = [f"@tool:{{{escape_tag(tool)}}}", f"@scope:{{{escape_tag(scope)}}}"]
    if model is not None:
        clauses.append(f"@model:{{{escape_tag(model)}}}")
    if args_digest is not None:
        clauses.append(f"@args_digest:{{{escape_tag(args_digest)}}}")
    return f"({' '.join(clauses)})"


def knn_plan(selected: int | None, indexed: int | None) -> str:
    """The KNN clause's attributes for a filter that selects `selected` of the `indexed`
    entries (None: not counted yet).

    RediSearch 2.10 either scans the selected entries (ADHOC_BF: cost grows with their
    number) or walks the HNSW graph in batches and drops what the filter rejects
    (BATCHES: about one search, whatever the filter selects). Its own choice, a decision
    tree fitted at EF_RUNTIME 10, scans up to 30,000 entries at k=1 and 384 dims: 2 to 6
    ms at 10k, where one batch takes 0.4 to 0.7 ms. Up to ADHOC_MAX entries a scan is as fast
    as a batch, and a batch in a small scope is a search for nothing, so the counts
    decide (bench/cache_lookup.py). The batch search needs a wider beam as the graph
    grows: at EF_RUNTIME 64 recall@1 is 1.000 at 10k but 0.995 at 30k and 0.84 at 100k,
    so it grows with the index up to EF_RUNTIME. BATCH_SIZE is fixed: RediSearch's
    default, k x index size / filter estimate, is a 10,000-wide first batch in a scope of
    10 among 100k (32 ms). After a batch that found nothing RediSearch may still switch
    to the scan, so a stale count only costs time, never a row.
    """
    if selected is None:
        return f"EF_RUNTIME {EF_RUNTIME}"  # the planner's choice until the count is in
    if selected <= ADHOC_MAX:
        return "HYBRID_POLICY ADHOC_BF"  # a scan takes no EF_RUNTIME
    ef = EF_RUNTIME if indexed is None else min(EF_RUNTIME, max(KNN_BATCH_SIZE, indexed // 250))
    return f"EF_RUNTIME {ef} HYBRID_POLICY BATCHES BATCH_SIZE {KNN_BATCH_SIZE}"


def knn_command(
    index: str, tool: str, scope: str, vector: Vector,
    selected: int | None = None, indexed: int | None = None, *, model: str | None = None,
    args_digest: str | None = None,
) -> tuple[Any, ...]:  # fmt: skip
    """The nearest entry of one tool in one scope (and model, and argument set): the
    FT.SEARCH every lookup runs.

    `selected` (entries the filter selects) and `indexed` (entries in the index), as
    counted by `QueryCounts`, pick the plan.
    """
    blob = np.asarray(vector, dtype=np.float32).tobytes()
    plan = knn_plan(selected, indexed)
    where = knn_filter(tool, scope, model, args_digest)
    return (
        "FT.SEARCH", index,
        f"{where}=>[KNN 1 @embedding $vec {plan} AS distance]",
        "PARAMS", 2, "vec", blob,
        "SORTBY", "distance", "ASC",
        "RETURN", len(KNN_FIELDS), *KNN_FIELDS,
        "LIMIT", 0, 1,
        "DIALECT", 2,
    )  # fmt: skip


class QueryCounts:
    """How many entries of one index each query (a KNN filter, or `*`) matched when last
    counted, in this process.

    A lookup never waits for a count: a missing one, or one older than
    COUNT_TTL_SECONDS, is retaken in the background (`spawn`) with FT.SEARCH ... LIMIT 0 0,
    and until it is in RediSearch's planner chooses the plan.
    """

    def __init__(
        self, redis: aredis.Redis, index: str,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:  # fmt: skip
        self.redis = redis
        self.index = index
        self.spawn = spawn
        self._counts: OrderedDict[str, tuple[int | None, float]] = OrderedDict()

    def count(self, query: str) -> int | None:
        """The last count (None before the first), starting a new one when it is due."""
        count, due = self._counts.get(query, (None, 0.0))
        now = time.monotonic()
        if due <= now:
            # Marked before the count runs, so concurrent lookups start only one.
            self._counts[query] = (count, now + COUNT_TTL_SECONDS)
            self.spawn(self._count(query))
        self._counts.move_to_end(query)
        while len(self._counts) > COUNT_MEMO_SIZE:
            self._counts.popitem(last=False)
        return count

    async def _count(self, query: str) -> None:
        try:
            reply = await self.redis.execute_command(  # type: ignore[no-untyped-call]
                "FT.SEARCH", self.index, query, "LIMIT", 0, 0, "DIALECT", 2
            )
        except rexc.RedisError as e:  # the planner keeps choosing; retried when due
            log.warning("cache count of %s failed: %s", query, e)
            return
        total, _ = parse_search_reply(reply)
        self._counts[query] = (total, time.monotonic() + COUNT_TTL_SECONDS)
