"""kb_search: KNN over the knowledge base (`idx:kb`), limited to what the caller may see.

A chunk's `scope` tag is `global`, `user:<uid>` or `tenant:<tid>`; a search
sees `global`, the caller's own user scope and, when the context names one, its
tenant's, and only chunks embedded by the same model (`model` tag).

Through the cache the search runs in parts (`KbSearch.parts`): one per scope,
each cached in its own scope and versioned by `kb-version:<scope>`, then merged
(`KbSearch.merge`: the k nearest of the parts' k nearest each, which is the k
nearest of the union). So a retrieval over global documents is shared by every
user, the caller's private part stays in the caller's scope, and a document
change makes only its own scope's entries stale.

Scope values are escaped before they enter the query, and the query vector
travels as a PARAMS blob, so no user text is ever query syntax. The scope of
every chunk the index returns is compared again, exactly, with the caller's
(`app.scope_guard`): a chunk outside them is dropped and logged.

The raw FT.SEARCH reply is read in both shapes Redis sends (a flat RESP2 array
or the RESP3 map), whichever protocol the client negotiated.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import redis.asyncio as aredis
import redis.exceptions as rexc

from app.cache.decision import FITTED_MAX_DISTANCE
from app.embeddings import Embedder, Vector
from app.llm.base import ToolSpec
from app.stores import keys
from app.stores.indexes import escape_tag
from app.stores.scope_guard import admitted
from app.tools.base import (
    QUERY_PARAMETERS,
    ArgumentError,
    CachePolicy,
    Tool,
    ToolContext,
    ToolResult,
    check_query,
    query_text_of,
)
from app.tools.passages import format_passages

RETURN_FIELDS = ("doc", "scope", "source", "title", "text", "chunk", "distance")
TTL_SECONDS = 3600
PartScope = Literal["global", "tenant", "user"]
# A cached result serves reworded questions too: its text never quotes the asker's words.
HEADING = "Knowledge-base passages:"
NOTHING_FOUND = "The knowledge base has no passage relevant to this query."
def scopes_for(ctx: ToolContext) -> list[str]:
    """The scope tags a caller may read; raises ArgumentError for an invalid id."""
    if not keys.USER_ID.fullmatch(ctx.user_id):
        raise ArgumentError("the caller's user id is not valid")
    scopes = ["global", f"user:{ctx.user_id}"]
    if ctx.tenant_id is not None:
        if not keys.USER_ID.fullmatch(ctx.tenant_id):
            raise ArgumentError("the caller's tenant id is not valid")
        scopes.append(f"tenant:{ctx.tenant_id}")
    return scopes


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def parse_search_reply(reply: Any) -> tuple[int, list[tuple[str, dict[str, str]]]]:
    """(total, [(key, fields)]) from a raw FT.SEARCH reply, RESP2 or RESP3."""
    if isinstance(reply, dict):
        m = {_s(k): v for k, v in reply.items()}
        rows = []
        for row in m.get("results") or []:
            r = {_s(k): v for k, v in row.items()}
            attrs = r.get("extra_attributes") or {}
            rows.append((_s(r["id"]), {_s(k): _s(v) for k, v in attrs.items()}))
        return int(m.get("total_results", len(rows))), rows
    total, rest = int(reply[0]), list(reply[1:])
    rows = []
    i = 0
    while i < len(rest):
        key = _s(rest[i])
        fields: dict[str, str] = {}
        if i + 1 < len(rest) and isinstance(rest[i + 1], list):
            flat = rest[i + 1]
            fields = {_s(flat[j]): _s(flat[j + 1]) for j in range(0, len(flat) - 1, 2)}
            i += 1
        rows.append((key, fields))
        i += 1
    return total, rows


class KbSearch:
    """The `kb_search` tool: top-k knowledge-base chunks for a query."""

    spec = ToolSpec(
        name="kb_search",
        description=(
            "Search the knowledge base (project documents and the user's own files) "
            "for passages relevant to a question. Returns numbered passages to cite as [n]."
        ),
        parameters=QUERY_PARAMETERS,
    )
    # The fitted hit bound (app.cache_decision): at most 1 % false hits on QQP. The router
    # caches the parts (each in its own scope); this policy says the tool is cacheable.
    policy: CachePolicy | None = CachePolicy(
        max_distance=FITTED_MAX_DISTANCE, ttl_seconds=TTL_SECONDS, scope="user", versioned=True
    )

    def __init__(
        self,
        client: aredis.Redis,
        embedder: Embedder,
        *,
        k: int = 4,
        max_distance: float = 0.8,
        index: str = keys.INDEX_KB,
    ) -> None:
        self.client = client
        self.embedder = embedder
        self.k = k
        # Cosine distance past which a nearest neighbour is unrelated noise, not an answer.
        self.max_distance = max_distance
        self.index = index

    def query_text(self, arguments: dict[str, Any]) -> str:
        return query_text_of(arguments)

    def parts(self, ctx: ToolContext) -> list[Tool]:
        """The global part, the caller's own part and, with a tenant, the tenant's."""
        kinds: list[PartScope] = ["global", "user"]
        if ctx.tenant_id is not None:
            kinds.append("tenant")
        return [KbPart(self, kind) for kind in kinds]

    async def parts_to_run(self, ctx: ToolContext) -> list[Tool]:
        """`parts`, less the private ones (user, tenant) whose scope has no
        `kb-version`: nothing was ever ingested there, so their search finds nothing.
        One MGET instead of a part's lookup, single flight, search and store (four
        round trips) for the many users with no document of their own. Every ingest
        and delete sets the version in the MULTI that writes the chunks, and start-up
        gives one to any scope holding chunks from before versions
        (`app.stores.indexes.version_unversioned`)."""
        parts = self.parts(ctx)
        try:
            scopes = {s.split(":", 1)[0]: s for s in scopes_for(ctx)}
        except ArgumentError:
            return parts  # each part fails with the reason
        private = [p for p in parts if isinstance(p, KbPart) and p.kind != "global"]
        try:
            versions = await self.client.mget([keys.kb_version(scopes[p.kind]) for p in private])
        except rexc.RedisError:
            return parts  # the parts meet the same trouble and say so
        empty = {p.kind for p, v in zip(private, versions, strict=True) if v is None}
        return [p for p in parts if not (isinstance(p, KbPart) and p.kind in empty)]

    def merge(self, results: list[ToolResult]) -> ToolResult:
        for result in results:
            if result.error is not None:
                return result
        items = sorted((i for r in results for i in r.items), key=lambda i: i["distance"])
        return self._result(items[: self.k])

    def _result(self, items: list[dict[str, Any]]) -> ToolResult:
        if not items:
            return ToolResult(NOTHING_FOUND, [])
        return ToolResult(format_passages(HEADING, items), items)

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult:
        try:
            scopes = scopes_for(ctx)
        except ArgumentError as e:
            return ToolResult.failed(str(e))
        return await self.run_in(arguments, scopes, query_vector)

    async def run_in(
        self, arguments: dict[str, Any], scopes: list[str], query_vector: Vector | None
    ) -> ToolResult:
        """The search over `scopes` (already checked to be the caller's)."""
        try:
            query = check_query(arguments)
        except ArgumentError as e:
            return ToolResult.failed(str(e))
        try:
            if query_vector is None:
                # The model is CPU-bound; keep it off the event loop.
                query_vector = await self.embedder.aembed(query)
            items = await self.search(np.asarray(query_vector, dtype=np.float32), scopes)
        except rexc.RedisError as e:
            return ToolResult.failed(f"the knowledge base is unavailable: {e}")
        return self._result(items)

    async def search(self, vector: Vector, scopes: list[str]) -> list[dict[str, Any]]:
        """The k nearest chunks in `scopes` embedded by this model, nearest first, within
        max_distance."""
        tags = "|".join(escape_tag(s) for s in scopes)
        model = escape_tag(self.embedder.model_id)
        reply = await self.client.execute_command(
            "FT.SEARCH", self.index,
            f"(@scope:{{{tags}}} @model:{{{model}}})=>[KNN {self.k} @embedding $vec AS distance]",
            "PARAMS", 2, "vec", vector.tobytes(),
            "SORTBY", "distance", "ASC",
            "RETURN", len(RETURN_FIELDS), *RETURN_FIELDS,
            "LIMIT", 0, self.k,
            "DIALECT", 2,
        )  # type: ignore[no-untyped-call]  # fmt: skip
        _, rows = parse_search_reply(reply)
        items = []
        for key, f in admitted(rows, "scope", scopes, "kb_search"):
            distance = float(f.get("distance", "1"))
            if distance > self.max_distance:
                continue
            items.append(
                {
                    "id": key,
                    "title": f.get("title", ""),
                    "text": f.get("text", ""),
                    "url": None,
                    "source": f.get("source", ""),
                    "scope": f.get("scope", ""),
                    "chunk": int(float(f.get("chunk", "0"))),
                    "distance": round(distance, 6),
                    "score": round(1.0 - distance, 6),
                }
            )
        return items


class KbPart:
    """kb_search over one scope of the caller's: the unit the cache stores and shares."""

    def __init__(self, whole: KbSearch, kind: PartScope) -> None:
        self.whole = whole
        self.kind = kind
        self.spec = whole.spec
        policy = whole.policy
        assert policy is not None
        self.policy: CachePolicy | None = CachePolicy(
            policy.max_distance, policy.ttl_seconds, kind, versioned=True
        )

    def query_text(self, arguments: dict[str, Any]) -> str:
        return query_text_of(arguments)

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult:
        try:
            mine = [s for s in scopes_for(ctx) if s.split(":", 1)[0] == self.kind]
        except ArgumentError as e:
            return ToolResult.failed(str(e))
        if not mine:
            return ToolResult.failed(f"the caller has no {self.kind} scope")
        return await self.whole.run_in(arguments, mine, query_vector)
