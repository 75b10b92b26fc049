"""The semantic cache in front of tools and retrieval (the router's `Cache`).

One entry is one hash `cache:<tool>:<sha256(scope + model + canonical arguments)>`
indexed by `idx:cache`. A lookup tries, in one round trip:

1. the exact entry (same scope, same canonical arguments): served without
   any vector, distance 0;
2. else the single nearest entry of the same tool, the same scope *and* the
   same other arguments (`KNN 1` behind a TAG pre-filter; `args_digest` covers
   every argument but the query), served when its distance is within the
   tool's current threshold and `cache_decision.decide` agrees on the texts.

Both paths see only entries of the embedding model in use (its id is in the key
hash and in the KNN filter), so vectors of two models are never compared. For a
`versioned` policy (kb_search's parts) the same round trip reads
`kb-version:<scope>`; an entry records the version read before its tool ran
(by `join_flight`, carried to `store` on the call's `Flight`), and one older
than the current is never served: it is a miss, and the lookup unlinks it.

The scope is part of both the key hash and the KNN filter, so an entry is
never served outside it: a `user`-scoped result reaches only that user, even
for an identical question. Both paths then compare the entry's stored `scope`
with the caller's, exactly (`app.scope_guard`): an entry of another scope, be
it from a case-folding index or a key that names another scope's entry, is a
logged miss, never a hit. An entry keeps the question as it was asked
(`query`; the canonical text only goes into the key hash), so `decide` always
compares two texts as users wrote them: its names check needs the capitals, its
negation and numbers checks the apostrophes and digit groups. The threshold starts at the tool's
`CachePolicy.max_distance` and then moves with the audit outcomes
(`AdaptiveThreshold`, stored in `cache-threshold:<tool>`, read by each process at
most once a second).

`SemanticCache.probe` is the whole "is this a hit" path (exact entry, filtered
KNN, scope re-check, threshold state, `decide`) and says what it found either
way; `lookup` is `probe` plus the memo, counters and audit. `bench/cache_quality.py`
calls `store` and `probe` itself, so its figures are those of this code.

A sampled share of hits (RETRIEVAL_CACHE_AUDIT_RATE) is handed to
`enqueue_audit` (see `app.cache.audit_queue.audit_enqueuer`); the job re-runs the tool
and invalidates entries whose results drifted. Cache trouble never fails a
call: a Redis error on lookup is a miss, on store is a skipped store.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis.asyncio as aredis
import redis.exceptions as rexc

from app.cache import flight
from app.cache.decision import AdaptiveThreshold, Decision, HitPolicy, canonical_text, decide
from app.cache.knn import QueryCounts, knn_command, knn_filter
from app.cache.protocol import CacheHit, Flight
from app.embeddings import Embedder, Vector, shared_embedder
from app.identity import user_digest
from app.settings import Settings
from app.stores import keys
from app.stores.batch import as_dict, batch
from app.stores.scope_guard import admitted
from app.tools.base import CachePolicy, Tool, ToolContext, ToolResult
from app.tools.kb_search import parse_search_reply

log = logging.getLogger("backbone.cache")

AuditEnqueuer = Callable[[dict[str, Any]], None]
ENTRY_FIELDS = ("result", "tool_ms", "scope", "query", "version")
# Entries this process stored or served exactly: `needs_vector` is sync and must not
# wait on Redis, so it trusts this memo and `lookup` still checks the key itself.
MEMO_SIZE = 4096
# Scope values enter keys and tag queries; the same syntax as a user id.
_SCOPE_ID = keys.USER_ID
_TOOL = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# Lookup counters are written to Redis at most this often (one pipeline for all tools).
COUNTS_FLUSH_SECONDS = 1.0
# A tool's threshold state is read from Redis at most this often per process.
THRESHOLD_READ_SECONDS = 1.0

def threshold_key(tool: str) -> str:
    """`cache-threshold:<tool>`: the tool's AdaptiveThreshold state (hash, no TTL)."""
    return keys.cache_threshold(tool)


def scope_value(policy: CachePolicy, ctx: ToolContext) -> str | None:
    """The scope tag an entry is stored and searched under; None for an unusable id."""
    if policy.scope == "global":
        return "global"
    owner = ctx.user_id if policy.scope == "user" else (ctx.tenant_id or ctx.user_id)
    if not _SCOPE_ID.fullmatch(owner):
        return None
    return f"{policy.scope}:{owner}"


def canonical_arguments(arguments: Mapping[str, Any], query: str) -> str:
    """Canonical JSON of the arguments, the query replaced by its canonical text."""
    # A lookup needs it three times (memo, entry key, store): remembered. Types are in
    # the key, since 1, 1.0 and True are equal but are three different JSON texts.
    try:
        return _canonical_arguments(
            tuple((k, type(v), v) for k, v in sorted(arguments.items())), query)
    except TypeError:  # a list or dict value: not hashable, so not remembered
        return _dump_arguments(arguments, query)


@functools.lru_cache(maxsize=1024)
def _canonical_arguments(items: tuple[tuple[str, type, Any], ...], query: str) -> str:
    return _dump_arguments({k: v for k, _, v in items}, query)


def _dump_arguments(arguments: Mapping[str, Any], query: str) -> str:
    args = dict(arguments)
    args["query"] = canonical_text(query)
    return json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def args_digest(arguments: Mapping[str, Any]) -> str:
    """The `args_digest` TAG: SHA-256 of the canonical JSON of every argument but the
    query (1, 1.0 and true are three texts). The KNN filters on it, so a neighbour's
    result is only ever one computed with the same other arguments."""
    if arguments.keys() <= {"query"}:
        return _QUERY_ONLY
    rest = {k: v for k, v in arguments.items() if k != "query"}
    return _digest(json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                              default=str))


def entry_digest(scope: str, arguments: Mapping[str, Any], query: str, model: str) -> str:
    """The hash both the entry and its single-flight lock are named by."""
    return _digest(f"{scope}\n{model}\n{canonical_arguments(arguments, query)}")


@functools.lru_cache(maxsize=1024)
def _digest(basis: str) -> str:
    return hashlib.sha256(basis.encode()).hexdigest()


def entry_key(
    tool: str, scope: str, arguments: Mapping[str, Any], query: str, *, model: str
) -> str:
    return keys.cache_entry(tool, entry_digest(scope, arguments, query, model))


_QUERY_ONLY = _digest("{}")  # every shipped tool's calls: the query and nothing else


def initial_threshold(policy: CachePolicy) -> AdaptiveThreshold:
    """A fresh tool starts at its own policy's bound, with room to relax a little."""
    return AdaptiveThreshold(max_distance=policy.max_distance, ceiling=policy.max_distance + 0.04)


def threshold_state(fields: Mapping[Any, Any], policy: CachePolicy) -> AdaptiveThreshold:
    """The stored state, or the policy's starting point when the hash is empty."""
    return AdaptiveThreshold.from_dict(fields) if fields else initial_threshold(policy)


def encode_result(result: ToolResult) -> str:
    return json.dumps({"content": result.content, "items": result.items}, default=str)


def decode_result(raw: str | bytes) -> ToolResult:
    data = json.loads(raw)
    return ToolResult(content=str(data["content"]), items=list(data.get("items") or []))


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _version(value: Any) -> int:
    """A stored or current version; an entry without one (stored before versions) is -1."""
    try:
        return int(_s(value)) if value is not None else -1
    except ValueError:
        return -1


def _current(raw: Any) -> int:
    """A scope's current version as read; no counter yet: nothing was ever ingested there."""
    return max(_version(raw), 0)


@dataclass(frozen=True)
class Probe:
    """One lookup's finding, hit or not: the candidate entry the decision judged (None when
    there was none), the distance, the decision, and the hit served (None on a miss)."""

    key: str | None
    candidate: str | None  # the entry's question, as its asker wrote it
    distance: float | None
    decision: Decision
    hit: CacheHit | None
    exact_entry: bool = False  # found by the exact key, not the KNN
    # A neighbour older than its scope's knowledge base, for `lookup` to unlink (an old
    # entry under the caller's own key is left to the store that follows the miss).
    stale: str | None = None


_NOTHING = Decision(False, 0.0, "no candidate")


class SemanticCache:
    """Implements `app.tool_router.Cache` over one async Redis client."""

    def __init__(
        self,
        redis: aredis.Redis,
        settings: Settings,
        enqueue_audit: AuditEnqueuer | None = None,
        *,
        base_policy: HitPolicy | None = None,
        index: str = keys.INDEX_CACHE,
        rng: random.Random | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.enqueue_audit = enqueue_audit
        self.base_policy = base_policy or HitPolicy()
        self.index = index
        self.rng = rng or random.Random()
        self.embedder = embedder or shared_embedder(settings.embedding_model)
        self._memo: OrderedDict[str, float] = OrderedDict()  # call -> monotonic expiry
        # Vectors `lookup` had to make itself, handed on to the `store` after the miss.
        self._pending: OrderedDict[str, Vector] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts: Counter[tuple[str, str]] = Counter()  # (tool, field) -> not yet written
        self._thresholds: dict[str, tuple[float, Any]] = {}  # tool -> (read again after, state)
        self._flusher: asyncio.Task[None] | None = None
        self.counts = QueryCounts(redis, index, self._background)

    def needs_vector(self, tool: Tool, arguments: dict[str, Any], query: str) -> bool:
        """False when this process recently stored or served this exact call (any scope)."""
        memo = self._memo_key(tool, arguments, query)
        if memo is None:
            return True
        expires = self._memo.get(memo)
        if expires is None:
            return True
        if expires < time.monotonic():
            self._memo.pop(memo, None)
            return True
        return False

    async def lookup(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext,
    ) -> CacheHit | None:
        memo = self._memo_key(tool, arguments, query)
        if memo is None or tool.policy is None:
            return None
        name = tool.spec.name
        try:
            found = await self.probe(tool, arguments, query, vector, ctx)
        except rexc.RedisError as e:
            log.warning("cache lookup for %s failed, treated as a miss: %s", name, e)
            return None
        if found is None:
            return None
        if found.stale is not None:
            self._background(self._unlink(found.stale))
        hit = found.hit
        kind = "exact_hits" if found.exact_entry else "hits"
        if hit is None:
            self._memo.pop(memo, None)
        elif kind == "exact_hits":
            self._remember(memo, tool.policy)
        # Counters and the audit enqueue never hold up the caller.
        self._count(name, hit, kind)
        if hit is not None:
            self._background(self._maybe_audit(name, hit, arguments, ctx, tool.policy.scope))
        return hit

    async def probe(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext,
    ) -> Probe | None:
        """The hit decision and what it judged, with no side effect but the embedding a
        wrong memo costs and a due count of the KNN's filter (`QueryCounts`, in the
        background); None for a call the cache cannot take. Raises RedisError."""
        policy = tool.policy
        scope = scope_value(policy, ctx) if policy is not None else None
        if policy is None or scope is None or self._memo_key(tool, arguments, query) is None:
            return None
        name = tool.spec.name
        key = self._key(name, scope, arguments, query)
        version = keys.kb_version(scope) if policy.versioned else None
        digest = args_digest(arguments)
        replies = await self._fetch(name, scope, key, vector, version, digest)
        current = _current(replies[2]) if version is not None else None
        found = self._exact(key, replies[0], scope, current)
        if found is not None and found.hit is not None:
            return found
        if vector is None:  # the memo was wrong for this caller: embed after all
            vector = await self.embedder.aembed(query)
            self._pending[key] = vector
            while len(self._pending) > 64:  # stores that never came (tool failed)
                self._pending.popitem(last=False)
            replies = await self._fetch(name, scope, key, vector, version, digest)
            current = _current(replies[2]) if version is not None else None
        threshold = threshold_state(replies[1], policy)
        near = self._nearest(query, replies[3], threshold, scope, current)
        if near.stale == key:
            # This caller's own key: the store after the miss replaces it. Unlinking it
            # in the background could remove that fresh result instead.
            return dataclasses.replace(near, stale=None)
        return near

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)  # a strong reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Write the counts now and wait for audit enqueues still in flight (tests,
        shutdown)."""
        if self._flusher is not None:
            self._flusher.cancel()  # no need to wait out its pause: flushed below
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.flush_counts()

    async def store(
        self, tool: Tool, arguments: dict[str, Any], query: str, vector: Vector | None,
        ctx: ToolContext, result: ToolResult, tool_ms: float, flight_: Flight | None = None,
    ) -> bool:
        policy = tool.policy
        scope = scope_value(policy, ctx) if policy is not None else None
        memo = self._memo_key(tool, arguments, query)
        if policy is None or scope is None or memo is None or result.error is not None:
            return False
        key = self._key(tool.spec.name, scope, arguments, query)
        vector = self._pending.pop(key, vector)
        version = flight_.version if flight_ is not None and policy.versioned else None
        if policy.versioned and version is None:
            return False  # the version this result was computed on is unknown: not safe
        fields: dict[str, str | bytes | float] = {
            "tool": tool.spec.name,
            "scope": scope,
            "model": self.embedder.model_id,
            # As asked: `decide` needs the capitals, apostrophes and digit groups.
            "query": query,
            "created_at": time.time(),
            "result": encode_result(result),
            "tool_ms": tool_ms,
            "args": json.dumps(arguments, sort_keys=True, default=str),
            "args_digest": args_digest(arguments),
            # Whose question made the entry (a digest): an erase finds the shared
            # entries holding the user's words by it (app.privacy.erase).
            "creator": user_digest(ctx.user_id),
        }
        if version is not None:
            fields["version"] = version
        if vector is not None:
            # Without a vector the entry still serves exact repeats, just not neighbours.
            fields["embedding"] = np.asarray(vector, dtype=np.float32).tobytes()
        held = flight_.claim if flight_ is not None else None
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.expire(key, policy.ttl_seconds)
            if isinstance(held, flight.Claim):
                # After the entry, in the same MULTI: a waiter that sees the lock gone
                # finds the result.
                flight.release_in(pipe, held)
            await pipe.execute()
        except rexc.RedisError as e:
            log.warning("cache store for %s failed, not cached: %s", tool.spec.name, e)
            return False
        self._remember(memo, policy)
        return isinstance(held, flight.Claim)

    def _key(self, tool: str, scope: str, arguments: Mapping[str, Any], query: str) -> str:
        return entry_key(tool, scope, arguments, query, model=self.embedder.model_id)

    async def join_flight(
        self, tool: Tool, arguments: dict[str, Any], query: str, ctx: ToolContext,
        *, wait_seconds: float, lock_seconds: float,
    ) -> Flight:
        policy = tool.policy
        scope = scope_value(policy, ctx) if policy is not None else None
        if policy is None or scope is None or self._memo_key(tool, arguments, query) is None:
            return Flight()
        name = tool.spec.name
        digest = entry_digest(scope, arguments, query, self.embedder.model_id)
        key, lock = keys.cache_entry(name, digest), keys.cache_flight(name, digest)
        version = keys.kb_version(scope) if policy.versioned else None

        async def poll() -> tuple[CacheHit | None, bool]:
            hit, locked, _, _ = await self._poll(key, scope, lock, version)
            return hit, locked

        try:
            # The claim, then a second look at the entry (stored between this caller's
            # lookup and its claim?) and the kb version, in one round trip.
            hit, _, held, now = await self._poll(key, scope, lock, version,
                                                 claim_seconds=lock_seconds)
            assert held is not None
            if held.leader:
                if hit is None:
                    return Flight(claim=held, version=now)
                await flight.release(self.redis, held)
            elif hit is None:
                hit = await flight.wait(poll, wait_seconds)
        except rexc.RedisError as e:
            log.warning("single flight for %s unavailable, running the tool: %s", name, e)
            return Flight()  # no version: a versioned result is then not stored
        if hit is not None:
            self._count(name, hit, "flight_hits")
            return Flight(hit=hit)
        return Flight(version=now)  # the wait ran out: this caller runs the tool unled

    async def land(self, flight_: Flight) -> None:
        if isinstance(flight_.claim, flight.Claim):
            try:
                await flight.release(self.redis, flight_.claim)
            except rexc.RedisError as e:  # the lock expires on its own
                log.warning("single-flight lock %s left to expire: %s", flight_.claim.lock, e)

    async def _poll(
        self, key: str, scope: str, lock: str, version: str | None,
        *, claim_seconds: float | None = None,
    ) -> tuple[CacheHit | None, bool, flight.Claim | None, int | None]:
        """The entry's hit (if it may be served), whether the lock is held, the claim and
        the current kb version (None: not versioned); with `claim_seconds`, the lock is
        claimed first, in the same round trip."""
        pipe = self.redis.pipeline(transaction=False)
        token = flight.claim_in(pipe, lock, claim_seconds) if claim_seconds else None
        pipe.hmget(key, list(ENTRY_FIELDS))
        pipe.exists(lock)
        if version is not None:
            pipe.get(version)
        replies = await pipe.execute()
        held = flight.claimed(lock, token, replies.pop(0)) if token is not None else None
        entry, locked, *current = replies
        now = _current(current[0]) if current else None
        found = self._exact(key, entry, scope, now)
        return (found.hit if found is not None else None), bool(locked), held, now

    async def _fetch(
        self, tool: str, scope: str, key: str, vector: Vector | None, version: str | None,
        digest: str,
    ) -> list[Any]:
        """[exact entry fields, threshold state, current version or None, KNN reply or
        None], in one round trip. The threshold state is read at most every
        THRESHOLD_READ_SECONDS per tool (only audits in workers move it)."""
        now = time.monotonic()
        known = self._thresholds.get(tool)
        fresh = known is not None and known[0] > now
        commands: list[tuple[Any, ...]] = [("HMGET", key, *ENTRY_FIELDS)]
        if not fresh:
            commands.append(("HGETALL", threshold_key(tool)))
        if version is not None:
            commands.append(("GET", version))
        if vector is not None:
            commands.append(self._knn(tool, scope, vector, digest))
        replies = await batch(self.redis, commands)
        for reply in replies[:len(commands) - (vector is not None)]:
            if isinstance(reply, Exception):
                raise reply
        if fresh:
            assert known is not None
            replies.insert(1, known[1])
        else:
            replies[1] = as_dict(replies[1])
            self._thresholds[tool] = (now + THRESHOLD_READ_SECONDS, replies[1])
        if version is None:
            replies.insert(2, None)
        return replies if vector is not None else [*replies, None]

    def _memo_key(self, tool: Tool, arguments: dict[str, Any], query: str) -> str | None:
        # needs_vector gets no caller, so the memo cannot hold the scope: a repeat by
        # another user of the same question is a memo false positive, which `lookup`
        # repairs by embedding itself (one embedding, as without the memo).
        if tool.policy is None or not _TOOL.fullmatch(tool.spec.name):
            return None
        return f"{tool.spec.name}\n{canonical_arguments(arguments, query)}"

    def _knn(self, tool: str, scope: str, vector: Vector, digest: str) -> tuple[Any, ...]:
        model = self.embedder.model_id
        selected = self.counts.count(knn_filter(tool, scope, model, digest))
        return knn_command(self.index, tool, scope, vector, selected, self.counts.count("*"),
                           model=model, args_digest=digest)

    def _exact(self, key: str, reply: Any, scope: str, current: int | None) -> Probe | None:
        raw, tool_ms, stored_scope, stored_query, stored_version = reply
        if raw is None:
            return None
        fields = {"scope": _s(stored_scope)} if stored_scope is not None else {}
        if not admitted([(key, fields)], "scope", (scope,), "cache exact"):
            return None
        text = _s(stored_query) if stored_query is not None else None
        if current is not None and _version(stored_version) < current:
            return Probe(key, text, 0.0, Decision(False, 0.0, "stale"), None, True)
        hit = CacheHit(decode_result(raw), 0.0, key, float(_s(tool_ms or b"0")), exact=True)
        return Probe(key, text, 0.0, Decision(True, 1.0, "exact"), hit, True)

    def _nearest(
        self, query: str, reply: Any, state: AdaptiveThreshold, scope: str, current: int | None
    ) -> Probe:
        if reply is None:
            return Probe(None, None, None, _NOTHING, None)
        if isinstance(reply, Exception):
            log.warning("cache KNN failed, treated as a miss: %s", reply)
            return Probe(None, None, None, Decision(False, 0.0, "knn failed"), None)
        _, rows = parse_search_reply(reply)
        rows = admitted(rows, "scope", (scope,), "cache KNN")
        if not rows:
            return Probe(None, None, None, _NOTHING, None)
        key, f = rows[0]
        distance = float(f.get("distance", "2"))
        candidate = f.get("query", "")
        if distance > state.max_distance or "result" not in f:
            return Probe(key, candidate, distance, Decision(False, 0.0, "distance"), None)
        if current is not None and _version(f.get("version")) < current:
            return Probe(key, candidate, distance, Decision(False, 0.0, "stale"), None, stale=key)
        decision = decide(query, candidate, distance, state.policy(self.base_policy))
        if not decision.hit:
            log.debug("cache near miss on %s at %.4f: %s", key, distance, decision.reason)
            return Probe(key, candidate, distance, decision, None)
        hit = CacheHit(decode_result(f["result"]), distance, key, float(f.get("tool_ms", "0")))
        return Probe(key, candidate, distance, decision, hit)

    async def _unlink(self, key: str) -> None:
        try:
            await self.redis.unlink(key)
        except rexc.RedisError as e:
            log.warning("stale cache entry %s not removed (never served): %s", key, e)

    def _remember(self, memo: str, policy: CachePolicy) -> None:
        self._memo[memo] = time.monotonic() + policy.ttl_seconds
        self._memo.move_to_end(memo)
        while len(self._memo) > MEMO_SIZE:
            self._memo.popitem(last=False)

    def _count(self, tool: str, hit: CacheHit | None, kind: str) -> None:
        """Counted in memory and written at most every COUNTS_FLUSH_SECONDS in one round
        trip for all tools: a task and a round trip per lookup cost more CPU than the
        lookup itself. A crash loses at most that second of counts (they are statistics)."""
        counts = self._counts
        if kind == "flight_hits":  # a miss already counted, answered by another's run
            counts[tool, kind] += 1
        elif hit is None:
            counts[tool, "lookups"] += 1
            counts[tool, "misses"] += 1
        else:
            counts[tool, "lookups"] += 1
            counts[tool, "hits"] += 1
            if kind == "exact_hits":
                counts[tool, "exact_hits"] += 1
        if self._flusher is None or self._flusher.done():
            # Counts of many turns: not in the context (log ids, trace) of this one.
            self._flusher = asyncio.create_task(self._flush_later(), context=contextvars.Context())
            self._tasks.add(self._flusher)
            self._flusher.add_done_callback(self._tasks.discard)

    async def _flush_later(self) -> None:
        await asyncio.sleep(COUNTS_FLUSH_SECONDS)
        await self.flush_counts()

    async def flush_counts(self) -> None:
        """Write the counts gathered since the last flush (the stats route calls it)."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for (tool, field), n in counts.items():
                pipe.hincrby(keys.cache_stats(tool), field, n)
            # The names, so reports read them instead of scanning for `cache-stats:*`.
            pipe.sadd(keys.CACHE_TOOLS, *{tool for tool, _ in counts})
            await pipe.execute()
        except rexc.RedisError as e:
            log.warning("cache counters not updated (%d increments dropped): %s",
                        sum(counts.values()), e)

    async def _maybe_audit(
        self, tool: str, hit: CacheHit, arguments: dict[str, Any], ctx: ToolContext, part: str
    ) -> None:
        rate = self.settings.retrieval_cache_audit_rate
        if self.enqueue_audit is None or rate <= 0.0 or self.rng.random() >= rate:
            return
        payload = {
            "entry_key": hit.entry,
            "tool": tool,
            "arguments": dict(arguments),
            "user_id": ctx.user_id,
            "tenant_id": ctx.tenant_id,
            "distance": hit.distance,
            "part": part,  # a tool run in parts (kb_search): the audit re-runs this part only
        }
        try:
            # One fast enqueue (a sync rq client), off the event loop.
            await asyncio.to_thread(self.enqueue_audit, payload)
        except Exception as e:  # an audit is best effort; the hit is still served
            log.warning("could not enqueue a cache audit for %s: %s", hit.entry, e)

