"""The semantic-cache audit: re-run a served entry's tool and judge the cached result.

`SemanticCache` samples RETRIEVAL_CACHE_AUDIT_RATE of its hits and hands them
to `app.cache.audit_queue.audit_enqueuer`, which puts `audit_cache_entry` on the `audit` queue. The
job runs the real tool for the same caller and arguments, and compares the
identities of the results (item ids or URLs; content words for plain text).
It then, for that tool:

- writes one `cache_audits` row in PostgreSQL and one `cache audit` log line;
- bumps `cache-stats:<tool>` (audits, overlap_sum, invalidations);
- feeds the tool's AdaptiveThreshold (correct = overlap >= CACHE_AUDIT_MIN_OVERLAP);
- deletes the entry when the overlap is below that bound and the entry is
  still the one it audited (a re-store in between is left alone).

The job's one argument is the key of its input (`cache-audit:<token>`, read
and deleted with GETDEL): the caller's query and id never sit in rq's job hash,
its logs or the dashboard. A second run finds the input gone (status
"expired"); an entry deleted meanwhile is "gone".
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any, cast

import psycopg
import redis

from app.cache.decision import AdaptiveThreshold, content_words
from app.cache.semantic import decode_result, threshold_key, threshold_state
from app.cache.stats import record_audit
from app.embeddings import shared_embedder
from app.ops import tracing
from app.settings import Settings
from app.stores import keys
from app.stores.clients import async_redis_client, redis_client
from app.tools import make_tools
from app.tools.base import CachePolicy, ToolContext, ToolResult, split_of

log = logging.getLogger("backbone.audit")


_INSERT = """
INSERT INTO cache_audits (entry_key, tool, distance, overlap, invalidated)
VALUES (%s, %s, %s, %s, %s)
"""


def _identities(result: ToolResult) -> set[str]:
    ids = {str(i.get("id") or i.get("url") or "") for i in result.items}
    return {i for i in ids if i}


def overlap(cached: ToolResult, fresh: ToolResult) -> float:
    """Jaccard similarity of the two results' item ids (URLs when no id); for results
    without items, of their content words. Two empty results agree (1.0)."""
    a, b = _identities(cached), _identities(fresh)
    if not a and not b:
        a, b = content_words(cached.content), content_words(fresh.content)
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


async def _run_tool(
    settings: Settings, tool: str, arguments: dict[str, Any], ctx: ToolContext,
    part: str | None = None,
) -> tuple[ToolResult, CachePolicy | None] | None:
    client = async_redis_client(settings.redis_url or "")
    try:
        tools = make_tools(settings, client, shared_embedder(settings.embedding_model))
        found = tools.get(tool)
        if found is None:
            return None
        split = split_of(found)
        if split is not None:  # the entry holds one part: compare it with that part afresh
            parts = [p for p in split.parts(ctx) if p.policy and p.policy.scope == part]
            if not parts:
                return None
            found = parts[0]
        return await found.run(arguments, ctx), found.policy
    finally:
        await client.aclose()


def _delete_if_unchanged(client: redis.Redis, key: str, created_at: Any) -> bool:
    """DEL the entry only if it is still the version audited (same created_at)."""
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)  # type: ignore[no-untyped-call]
            if pipe.hget(key, "created_at") != created_at:
                return False
            pipe.multi()
            pipe.delete(key)
            return bool(pipe.execute()[0])
        except redis.WatchError:
            return False


def _feed_threshold(
    client: redis.Redis, tool: str, policy: CachePolicy, distance: float, correct: bool
) -> AdaptiveThreshold:
    key = threshold_key(tool)

    def step(pipe: redis.client.Pipeline) -> None:
        state = threshold_state(pipe.hgetall(key), policy)
        pipe.multi()
        pipe.hset(key, mapping=state.update(distance, correct).to_dict())  # type: ignore[arg-type]

    client.transaction(step, key)
    return AdaptiveThreshold.from_dict(cast(Mapping[bytes, bytes], client.hgetall(key)))


def _insert_row(
    settings: Settings, key: str, tool: str, distance: float, score: float, invalidated: bool
) -> bool:
    try:
        with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
            conn.execute(_INSERT, (key, tool, distance, score, invalidated))
        return True
    except psycopg.Error as e:
        log.warning("cache audit of %s not recorded in PostgreSQL: %s", key, e)
        return False


@tracing.traced_job("cache.audit")
def audit_cache_entry(entry: str) -> dict[str, Any]:
    """Audit one served entry; return what was found (status, overlap, invalidated).

    `entry` is `cache-audit:<token>` (`app.cache.audit_queue`): the input is read
    and deleted in one GETDEL, so the caller's text lives no longer than the audit
    needs it. Gone (expired, or a second run): status "expired", nothing done."""
    if not keys.AUDIT_ENTRY.fullmatch(entry):
        raise ValueError("not an audit entry key")
    settings = Settings.from_env()
    client = redis_client(settings.redis_url or "")
    try:
        raw = client.getdel(entry)
        if raw is None:
            return {"status": "expired"}
        payload = json.loads(raw)
        return _audit(client, settings, str(payload["entry_key"]), str(payload["tool"]),
                      dict(payload["arguments"]),
                      ToolContext(str(payload["user_id"]), payload.get("tenant_id")),
                      float(payload["distance"]), payload.get("part"))  # fmt: skip
    finally:
        client.close()


def _audit(
    client: redis.Redis, settings: Settings, key: str, tool: str, arguments: dict[str, Any],
    ctx: ToolContext, distance: float, part: str | None = None,
) -> dict[str, Any]:
    raw, created_at = client.hmget(key, ["result", "created_at"])
    if raw is None:
        return {"status": "gone", "entry_key": key}
    ran = asyncio.run(_run_tool(settings, tool, arguments, ctx, part))
    if ran is None or ran[1] is None:
        log.warning("cache audit of %s: tool %r is not offered here", key, tool)
        return {"status": "unknown_tool", "entry_key": key}
    fresh, policy = ran[0], ran[1]
    if fresh.error is not None:
        # A failing service says nothing about the entry; judge it another time.
        return {"status": "tool_error", "entry_key": key, "error": fresh.error}
    score = overlap(decode_result(raw), fresh)
    invalidated = score < settings.cache_audit_min_overlap
    deleted = _delete_if_unchanged(client, key, created_at) if invalidated else False
    recorded = _insert_row(settings, key, tool, distance, score, invalidated)
    with client.pipeline(transaction=False) as pipe:
        record_audit(pipe, tool, score, invalidated)
        pipe.execute()
    state = _feed_threshold(client, tool, policy, distance, correct=not invalidated)
    outcome = {
        "status": "audited",
        "entry_key": key,
        "tool": tool,
        "distance": round(distance, 6),
        "overlap": round(score, 4),
        "invalidated": invalidated,
        "deleted": deleted,
        "recorded": recorded,
        "threshold": round(state.max_distance, 6),
    }
    log.info("cache audit %s", json.dumps(outcome, sort_keys=True))
    return outcome
