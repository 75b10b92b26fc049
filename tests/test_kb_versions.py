"""A cached retrieval is never older than the documents: every ingest or delete bumps its
scope's `kb-version:<scope>` in the MULTI that writes the chunks, and the cache never
serves an entry computed on an older version. Real Redis Stack, real model, real
kb_search through the real router and cache; each test writes its own made-up document.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from test_case_isolation import kb_cached as ask

from app.cache.protocol import CacheHit
from app.cache.semantic import MEMO_SIZE, SemanticCache, entry_digest, entry_key
from app.chat.tool_router import Routed, ToolRouter
from app.embeddings import Vector, shared_embedder
from app.kb.ingest import delete_paths, doc_id, ingest_paths
from app.llm.base import ToolCall, ToolSpec
from app.settings import Settings
from app.stores import indexes, keys
from app.stores.clients import async_redis_client
from app.tools.base import QUERY_PARAMETERS, CachePolicy, ToolContext, ToolResult, query_text_of


def doc(name: str, fact: str) -> str:
    return f"# The {name} lighthouse\n\nThe {name} lighthouse keeper's log says: {fact}.\n"


def ingest(r: redis.Redis, path: Path, fact: str, scope: str = "global") -> None:
    """(Re)write the made-up lighthouse document at `path` (named by its stem) and ingest it."""
    path.write_text(doc(path.stem, fact))
    ingest_paths(r, shared_embedder(), [path], scope=scope, progress=False)


def version(r: redis.Redis, scope: str) -> int:
    return int(r.get(keys.kb_version(scope)) or 0)


def cached_entries(r: redis.Redis, scope: str) -> dict[Any, Any]:
    """entry key -> recorded version, for kb_search entries of one scope."""
    out = {}
    for key in r.scan_iter(match=f"{keys.cache_prefix('kb_search')}*", count=1000):
        fields = r.hmget(key, ["scope", "version"])
        if fields[0] == scope.encode():
            out[key] = fields[1] or b""
    return out


def test_a_changed_global_document_is_served_fresh_to_the_same_and_a_reworded_question(
    settings: Settings, r: redis.Redis, tmp_path: Path, user: str,
) -> None:
    name = f"Skarv{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.md"
    before = version(r, "global")
    ingest(r, path, "the lamp is lit at dusk with whale oil")
    assert version(r, "global") == before + 1

    question = f"What does the {name} lighthouse keeper's log say?"
    reworded = f"What is written in the {name} lighthouse keeper's log?"
    first, again = ask(settings, [(user, question), (user, question)])
    assert "whale oil" in first.result.content and not first.cached
    assert again.cached and again.result.content == first.result.content  # the cache is live
    mine = entry_key("kb_search", "global", {"query": question}, question,
                     model=shared_embedder().model_id)
    assert r.hget(mine, "version") == str(before + 1).encode()  # cached in global scope

    ingest(r, path, "the lamp is now electric and needs no oil")
    assert version(r, "global") > before + 1

    same, other = ask(settings, [(user, question), (f"{user}-b", reworded)])
    for got in (same, other):
        assert "electric" in got.result.content and "whale oil" not in got.result.content
    # Not run at all: nothing was ever ingested in this user's own scope.
    assert dict(same.parts) == {"global": False}
    # The stale entry was replaced by the fresh result, at the version it was computed on.
    assert r.hget(mine, "version") == str(version(r, "global")).encode()


def test_a_private_change_leaves_the_shared_global_entries_alone(
    settings: Settings, r: redis.Redis, tmp_path: Path, user: str,
) -> None:
    name = f"Tern{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.md"
    ingest(r, path, "the fog horn sounds twice a minute", f"user:{user}")
    question = f"How often does the {name} fog horn sound?"
    first, = ask(settings, [(user, question)])
    assert "twice a minute" in first.result.content

    global_before = version(r, "global")
    ingest(r, path, "the fog horn sounds once every ten seconds", f"user:{user}")
    assert version(r, "global") == global_before  # only the user's own scope moved

    second, = ask(settings, [(user, question)])
    assert dict(second.parts) == {"global": True, "user": False}
    assert "ten seconds" in second.result.content and "twice" not in second.result.content


def test_deleting_a_document_bumps_its_scope_and_its_passages_stop_being_served(
    settings: Settings, r: redis.Redis, tmp_path: Path, user: str,
) -> None:
    name = f"Puffin{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.md"
    scope = f"user:{user}"
    ingest(r, path, "the keeper rings the bell at noon", scope)
    question = f"When does the {name} keeper ring the bell?"
    first, again = ask(settings, [(user, question), (user, question)])
    assert "at noon" in first.result.content and again.cached

    at = version(r, scope)
    assert delete_paths(r, [path]) == 1
    assert version(r, scope) == at + 1
    assert not list(r.scan_iter(match=f"kb:{doc_id(path)}:*"))
    gone, = ask(settings, [(user, question)])
    assert "at noon" not in gone.result.content
    assert dict(gone.parts)["user"] is False
    assert delete_paths(r, [path]) == 0  # nothing left: no bump
    assert version(r, scope) == at + 1


def test_an_entry_is_stored_with_the_version_read_before_its_tool_ran(
    settings: Settings, r: redis.Redis, user: str,
) -> None:
    scope = f"user:{user}"
    r.set(keys.kb_version(scope), 7)
    ask(settings, [(user, f"Which harbour does {uuid.uuid4().hex[:8]} sail from?")])
    assert set(cached_entries(r, scope).values()) == {b"7"}


def test_a_user_without_documents_runs_only_the_global_part_until_the_first_ingest(
    settings: Settings, r: redis.Redis, tmp_path: Path, user: str,
) -> None:
    name = f"Gannet{uuid.uuid4().hex[:6]}"
    question = f"What colour is the {name} lighthouse door?"
    before, = ask(settings, [(user, question)])
    assert dict(before.parts) == {"global": False}  # nothing of the user's: not searched
    assert r.get(keys.kb_version(f"user:{user}")) is None

    ingest(r, tmp_path / f"{name}.md", "the door is painted ox-blood red", f"user:{user}")
    after, = ask(settings, [(user, question)])
    assert dict(after.parts) == {"global": True, "user": False}  # the new part runs
    assert "ox-blood red" in after.result.content
    # A case variant of the user has no document: its private part stays out.
    variant, = ask(settings, [(user.upper(), question)])
    assert "user" not in dict(variant.parts) and "ox-blood" not in variant.result.content


def test_start_up_versions_a_scope_whose_chunks_came_before_versions(
    settings: Settings, r: redis.Redis, tmp_path: Path, user: str,
) -> None:
    name = f"Shag{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.md"
    scope, other = f"user:{user}", f"user:{user}-other"
    ingest(r, path, "the keeper keeps goats on the rock", scope)
    r.set(keys.kb_version(other), 5)  # a scope whose version is newer than the backfill's
    # As before versions existed: the chunks are there, their scope has no version.
    r.delete(keys.kb_version(scope), "idx:kb:versioned")
    question = f"What does the {name} keeper keep on the rock?"
    hidden, = ask(settings, [(user, question)])
    assert "goats" not in hidden.result.content  # why the start-up backfill is needed

    assert indexes.version_unversioned(r) >= 1
    assert r.get(keys.kb_version(scope)) == b"1"
    assert r.get(keys.kb_version(other)) == b"5"  # SET NX: an existing version stays
    assert indexes.version_unversioned(r) == 0  # once per Redis
    found, = ask(settings, [(user, question)])
    assert "goats" in found.result.content and dict(found.parts)["user"] is False


@dataclass
class GatedRetrieval:
    """A versioned, user-scoped tool whose run waits for the test to let it answer."""

    gate: asyncio.Event
    spec: ToolSpec
    policy: CachePolicy = field(default_factory=lambda: CachePolicy(
        max_distance=0.3, ttl_seconds=600, scope="user", versioned=True))

    def query_text(self, arguments: dict[str, Any]) -> str:
        return query_text_of(arguments)

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult:
        await self.gate.wait()
        return ToolResult("the passages as they were before the delete")


def test_a_result_computed_before_a_delete_is_never_stored_as_current(
    settings: Settings, r: redis.Redis, user: str,
) -> None:
    """A call reads version 3 and runs its tool; meanwhile more calls than the cache
    remembers go by, the scope's documents change (version 4) and another lookup of the
    same question reads 4. The first call's result is stored at 3, never served."""
    scope, question = f"user:{user}", f"Which quay does {uuid.uuid4().hex[:8]} moor at?"
    r.set(keys.kb_version(scope), 3)
    embedder = shared_embedder()
    vector = embedder.embed(question)
    name = f"gated_{uuid.uuid4().hex[:8]}"
    ctx = ToolContext(user)

    async def main() -> tuple[Routed, CacheHit | None]:
        client = async_redis_client(settings.redis_url or "")
        cache = SemanticCache(client, settings, embedder=embedder)
        tool = GatedRetrieval(asyncio.Event(), ToolSpec(name, "test retrieval",
                                                        QUERY_PARAMETERS))
        router = ToolRouter({tool.spec.name: tool}, embedder, 60.0, cache=cache)
        try:
            first = asyncio.create_task(router.run(ToolCall("c1", tool.spec.name,
                                                            {"query": question}), ctx))
            while not await client.exists(keys.cache_flight(tool.spec.name, entry_digest(
                    scope, {"query": question}, question, embedder.model_id))):
                await asyncio.sleep(0.01)  # the first call now runs its tool
            for start in range(0, MEMO_SIZE + 64, 256):  # more calls than any memo holds
                await asyncio.gather(*(
                    cache.lookup(tool, {"query": f"filler {n}"}, f"filler {n}", vector, ctx)
                    for n in range(start, start + 256)))
            r.incr(keys.kb_version(scope))  # a delete in the scope: version 4
            assert await cache.lookup(tool, {"query": question}, question, vector, ctx) is None
            tool.gate.set()
            routed = await first
            served = await cache.lookup(tool, {"query": question}, question, vector, ctx)
            await cache.drain()
            return routed, served
        finally:
            await client.aclose()

    routed, served = asyncio.run(main())
    assert not routed.cached and routed.result.error is None
    mine = entry_key(name, scope, {"query": question}, question, model=embedder.model_id)
    assert r.hget(mine, "version") == b"3"  # recorded at the version it was computed on
    assert served is None  # older than the scope's documents: never served
