"""Semantic-cache counters, the per-tool stats report and clearing entries.

`cache-stats:<tool>` (hash, no TTL) holds integer counters: lookups, hits,
exact_hits, misses (written by `SemanticCache.lookup`), audits, invalidations,
and overlap_sum as a float (written by the audit job). Percentiles of the audit
overlap come from PostgreSQL's `cache_audits`, the durable record of every
audit, over each tool's latest AUDIT_WINDOW audits (the worker's retention
sweep trims the table, CACHE_AUDIT_RETENTION_DAYS); when PostgreSQL is
unreachable the report says None for them.

No report scans the keyspace: the tools are the registry's plus the small set
`cache-tools` that every counter write adds its tool to. The route's report is
kept for REPORT_SECONDS per node (`Memo`), so a caller polling it costs Redis
and PostgreSQL one report a second, whatever the rate.

`threshold` is the bound lookups use right now: the audited state in
`cache-threshold:<tool>` once an audit has moved it, else the tool's policy
value (what `SemanticCache` starts from), so the report never says None for a
tool it knows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aredis
from psycopg_pool import AsyncConnectionPool

from app.cache.decision import AdaptiveThreshold
from app.cache.semantic import threshold_key, threshold_state
from app.ops import metrics
from app.stores import keys
from app.tools.base import CachePolicy
from app.tools.kb_search import KbSearch
from app.tools.web_search import WebSearch

log = logging.getLogger("backbone.cache")

COUNTERS = keys.CACHE_STATS_COUNTERS
STATS_PREFIX = "cache-stats:"
THRESHOLD_PREFIX = "cache-threshold:"
CLEAR_BATCH = 1000

# Each tool's latest AUDIT_WINDOW audits (cache_audits_by_tool), not the whole table:
# the report costs the same however many audits were ever recorded.
AUDIT_WINDOW = 1000
_OVERLAP_SQL = """
SELECT t.tool, avg(a.overlap), percentile_cont(0.1) WITHIN GROUP (ORDER BY a.overlap)
FROM unnest(%s::text[]) AS t(tool)
CROSS JOIN LATERAL (
    SELECT overlap FROM cache_audits WHERE tool = t.tool ORDER BY created_at DESC LIMIT %s
) AS a
GROUP BY t.tool
"""


def builtin_policies() -> dict[str, CachePolicy]:
    """tool name -> cache policy of the tools the app ships (class attributes, no I/O)."""
    return {t.spec.name: t.policy for t in (KbSearch, WebSearch) if t.policy is not None}


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def record_audit(
    pipe: redis.client.Pipeline, tool: str, overlap: float, invalidated: bool
) -> None:
    """Queue the counter updates of one audit on `pipe` (the caller executes it)."""
    stats = keys.cache_stats(tool)
    metrics.AUDIT_OVERLAP.labels(tool).observe(overlap)
    pipe.sadd(keys.CACHE_TOOLS, tool)
    pipe.hincrby(stats, "audits", 1)
    pipe.hincrbyfloat(stats, "overlap_sum", overlap)
    if invalidated:
        pipe.hincrby(stats, "invalidations", 1)


async def tool_names(client: aredis.Redis, known: Iterable[str] = ()) -> list[str]:
    """The tools a report covers: `known` (the registry's) and `cache-tools` (every tool
    that counted a lookup or an audit). A small set, never a scan of the keyspace."""
    found = {_s(t) for t in await client.smembers(keys.CACHE_TOOLS)} | set(known)
    return sorted(t for t in found if keys.TOOL_NAME.fullmatch(t))


async def _overlaps(
    pg_pool: AsyncConnectionPool[Any] | None, tools: list[str]
) -> dict[str, tuple[float, float]]:
    if pg_pool is None or not tools:
        return {}
    try:
        async with pg_pool.connection() as conn:
            cur = await conn.execute(_OVERLAP_SQL, (tools, AUDIT_WINDOW))
            rows = await cur.fetchall()
    except Exception as e:  # psycopg and pool errors alike: the report goes on without
        log.warning("cache audit percentiles unavailable: %s", e)
        return {}
    return {str(r[0]): (float(r[1]), float(r[2])) for r in rows}


async def cache_stats(
    client: aredis.Redis,
    pg_pool: AsyncConnectionPool[Any] | None,
    policies: Mapping[str, CachePolicy] | None = None,
) -> dict[str, dict[str, Any]]:
    """tool -> lookups, hits, exact_hits, misses, flight_hits, hit_rate, audits, mean_overlap,
    p10_overlap, invalidations, threshold (the audited bound, else the policy's;
    None only for a tool with neither). `policies` defaults to the shipped tools'."""
    known = builtin_policies() if policies is None else policies
    tools = await tool_names(client, known)
    pipe = client.pipeline(transaction=False)
    for tool in tools:
        pipe.hgetall(keys.cache_stats(tool))
        pipe.hgetall(threshold_key(tool))
    replies = await pipe.execute()
    from_pg = await _overlaps(pg_pool, tools)
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not replies[2 * i] and not replies[2 * i + 1] and tool not in known:
            continue  # listed once, its counters since removed: nothing to report
        raw = {_s(k): _s(v) for k, v in replies[2 * i].items()}
        row: dict[str, Any] = {name: int(raw.get(name, "0")) for name in COUNTERS}
        row["hit_rate"] = round(row["hits"] / row["lookups"], 4) if row["lookups"] else 0.0
        mean_pg, p10 = from_pg.get(tool, (None, None))
        overlap_sum = float(raw.get("overlap_sum", "0"))
        mean = overlap_sum / row["audits"] if row["audits"] else mean_pg
        row["mean_overlap"] = None if mean is None else round(mean, 4)
        row["p10_overlap"] = None if p10 is None else round(p10, 4)
        state, policy = replies[2 * i + 1], known.get(tool)
        if state:
            row["threshold"] = round(AdaptiveThreshold.from_dict(state).max_distance, 4)
        elif policy is not None:
            row["threshold"] = round(threshold_state({}, policy).max_distance, 4)
        else:
            row["threshold"] = None
        out[tool] = row
    return out


def clear_cache(client: redis.Redis, tool: str | None = None) -> int:
    """UNLINK every `cache:<tool>:*` entry (all tools when None); return how many.

    SCAN in batches, so a large cache never blocks the server. Counters and
    thresholds stay: they describe the tool, not the entries.
    """
    match = f"{keys.cache_prefix(tool)}*"
    removed = 0
    batch: list[bytes | str] = []
    for raw in client.scan_iter(match=match, count=CLEAR_BATCH):
        batch.append(raw)
        if len(batch) >= CLEAR_BATCH:
            removed += int(client.unlink(*batch))
            batch = []
    if batch:
        removed += int(client.unlink(*batch))
    return removed


REPORT_SECONDS = 1.0
T = TypeVar("T")


class Memo:
    """One value, computed at most once per `seconds` on this node; concurrent callers
    of a stale memo share one computation."""

    def __init__(self, seconds: float = REPORT_SECONDS) -> None:
        self.seconds = seconds
        self._value: Any = None
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, compute: Callable[[], Awaitable[T]]) -> T:
        if time.monotonic() - self._at < self.seconds:
            return cast(T, self._value)
        async with self._lock:
            if time.monotonic() - self._at >= self.seconds:
                self._value = await compute()
                self._at = time.monotonic()
            return cast(T, self._value)
