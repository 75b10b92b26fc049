"""`Alice` and `alice` are two accounts: no search path lets one read the other's data.

RediSearch TAG fields fold case unless declared CASESENSITIVE. Each path is
tested twice, through the real code and the real Redis Stack:

- on the production indexes (`schemas/*.yaml`, now CASESENSITIVE), which must
  not match the other case at all;
- on a *folding* copy of the index (the definition a deployment made before the
  fix still has until its next start), built over this test's keys only, whose
  filter does match the other case: the Python re-check (`app.scope_guard`)
  must drop the row and log it.

And the upgrade itself: an old, folding deployment is fixed by `create_all`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
import redis
import yaml
from redisvl.index import SearchIndex
from redisvl.schema import IndexSchema
from test_semantic_cache import CountingEmbedder, CountingTool

from app.cache.semantic import SemanticCache, entry_key
from app.chat.tool_router import Routed, ToolRouter
from app.embeddings import Embedder, shared_embedder
from app.kb.ingest import doc_id, ingest_paths
from app.llm.base import ToolCall
from app.memory.facts import Fact
from app.memory.recall import recall
from app.memory.store import MemoryStore, memory_id
from app.settings import Settings
from app.stack.embedded import EmbeddedRedis, free_port
from app.stores import indexes, keys
from app.stores.clients import async_redis_client, redis_client
from app.stores.indexes import escape_tag
from app.tools import KbSearch
from app.tools.base import Tool, ToolContext, ToolResult
from app.tools.kb_search import parse_search_reply

SECRET = "the spare key to the lamp room hides under the third blue step"
DOC = f"""# Lamp room

Alice's private note: {SECRET}. Nobody else knows where the spare key is.
"""
QUESTION = "Where is the spare key to the lamp room?"


@pytest.fixture
def pair() -> tuple[str, str]:
    """Two accounts whose ids differ only in case."""
    tail = uuid.uuid4().hex[:10]
    return f"Alice-{tail}", f"alice-{tail}"


@pytest.fixture(scope="module")
def pg(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def embedder(settings: Settings) -> Embedder:
    return shared_embedder(settings.embedding_model)


def variant(
    name: str, *, index_name: str, prefixes: list[str], case_sensitive: bool
) -> IndexSchema:
    """The YAML schema `name` under another index name and prefixes, tags folding or not."""
    spec: dict[str, Any] = yaml.safe_load((indexes.SCHEMA_DIR / f"{name}.yaml").read_text())
    spec["index"]["name"] = index_name
    spec["index"]["prefix"] = prefixes
    for field in spec["fields"]:
        if field["type"] == "tag":
            field.setdefault("attrs", {})["case_sensitive"] = case_sensitive
    return IndexSchema.from_dict(spec)


def wait_indexed(r: redis.Redis, index_name: str, docs: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = r.ft(index_name).info()  # type: ignore[no-untyped-call]
        if not int(info["indexing"]) and int(info["num_docs"]) >= docs:
            return
        assert time.monotonic() < deadline, f"{index_name} never indexed {docs} docs: {info}"
        time.sleep(0.05)


@pytest.fixture
def folding(r: redis.Redis) -> Iterator[Any]:
    """make(name, prefixes) -> index name: a case-folding copy of a production index."""
    made: list[str] = []

    def make(name: str, prefixes: list[str], docs: int = 0) -> str:
        index_name = f"idx:test-folding-{name}-{uuid.uuid4().hex[:8]}"
        schema = variant(name, index_name=index_name, prefixes=prefixes, case_sensitive=False)
        SearchIndex(schema, redis_client=r).create()
        made.append(index_name)
        wait_indexed(r, index_name, docs)
        return index_name

    yield make
    for index_name in made:
        r.ft(index_name).dropindex(delete_documents=False)  # the keys are the tests' own


def folds(r: redis.Redis, index_name: str, field: str, value: str) -> int:
    """How many rows a TAG query for `value` matches: proves the copy really folds."""
    reply = r.execute_command(
        "FT.SEARCH", index_name, f"@{field}:{{{escape_tag(value)}}}", "NOCONTENT", "DIALECT", 2
    )  # type: ignore[no-untyped-call]
    return parse_search_reply(reply)[0]


def dropped(caplog: pytest.LogCaptureFixture, where: str) -> list[str]:
    return [
        rec.getMessage() for rec in caplog.records
        if rec.name == "backbone.scope" and rec.levelno == logging.WARNING
        and rec.getMessage().startswith(f"{where}: dropped")
    ]  # fmt: skip


# ---- the indexes ---------------------------------------------------------------------


def test_every_id_tag_of_the_production_indexes_is_case_sensitive(r: redis.Redis) -> None:
    tags = {}
    for name in indexes.NAMES:
        info = r.ft(indexes.index_name(name)).info()  # type: ignore[no-untyped-call]
        for attrs in info["attributes"]:
            flat = [a.decode() if isinstance(a, bytes) else str(a) for a in attrs]
            if flat[flat.index("type") + 1] == "TAG":
                tags[f"{name}.{flat[1]}"] = "CASESENSITIVE" in flat
    assert tags == {
        "cache.tool": True, "cache.scope": True, "cache.model": True, "cache.args_digest": True,
        "cache.creator": True,
        "kb.doc": True, "kb.scope": True, "kb.source": True, "kb.model": True,
        "memory.user": True, "memory.kind": True, "memory.model": True, "memory.session": True,
    }  # fmt: skip


def test_ensure_rebuilds_a_folding_index_case_sensitive_and_keeps_its_hashes(
    r: redis.Redis, pair: tuple[str, str],
) -> None:
    upper, lower = pair
    tag = uuid.uuid4().hex[:8]
    prefix, name = f"kbtest-{tag}:", f"idx:test-upgrade-{tag}"
    old = variant("kb", index_name=name, prefixes=[prefix], case_sensitive=False)
    new = variant("kb", index_name=name, prefixes=[prefix], case_sensitive=True)
    SearchIndex(old, redis_client=r).create()
    vector = np.ones(384, dtype=np.float32).tobytes()
    for who in (upper, lower):
        r.hset(f"{prefix}{who}", mapping={"scope": f"user:{who}", "text": who, "embedding": vector})
    try:
        wait_indexed(r, name, 2)
        assert folds(r, name, "scope", f"user:{lower}") == 2  # the defect, reproduced

        assert indexes.ensure(r, new) == "upgraded"
        wait_indexed(r, name, 2)
        assert folds(r, name, "scope", f"user:{lower}") == 1
        assert folds(r, name, "scope", f"user:{upper}") == 1
        assert r.exists(f"{prefix}{upper}", f"{prefix}{lower}") == 2  # no DD: the data stays
        assert indexes.ensure(r, new) is None  # up to date: left alone, no second rebuild
    finally:
        r.ft(name).dropindex(delete_documents=True)


def test_create_all_fixes_a_deployment_made_before_the_tags_were_case_sensitive(
    scratch_dir: Path, pair: tuple[str, str],
) -> None:
    """A whole old deployment on its own Redis: three folding indexes and a private chunk."""
    upper, lower = pair
    server = EmbeddedRedis(scratch_dir / "redis", free_port())
    client = redis_client(server.start())
    try:
        for name in indexes.NAMES:
            spec = indexes.schema(name).to_dict()
            old = variant(name, index_name=spec["index"]["name"],
                          prefixes=[spec["index"]["prefix"]], case_sensitive=False)
            SearchIndex(old, redis_client=client).create()
        vector = np.ones(384, dtype=np.float32).tobytes()
        client.hset(keys.kb_chunk("0" * 32, 0),
                    mapping={"scope": f"user:{upper}", "text": SECRET, "embedding": vector})
        wait_indexed(client, keys.INDEX_KB, 1)
        assert folds(client, keys.INDEX_KB, "scope", f"user:{lower}") == 1

        assert sorted(indexes.create_all(client)) == ["idx:cache", "idx:kb", "idx:memory"]
        wait_indexed(client, keys.INDEX_KB, 1)
        assert folds(client, keys.INDEX_KB, "scope", f"user:{lower}") == 0
        assert folds(client, keys.INDEX_KB, "scope", f"user:{upper}") == 1
        assert indexes.create_all(client) == []  # the next start changes nothing
    finally:
        client.close()
        server.stop()


# ---- kb_search -----------------------------------------------------------------------


def kb_ask(settings: Settings, user: str, index: str = keys.INDEX_KB) -> ToolResult:
    async def run() -> ToolResult:
        client = async_redis_client(settings.redis_url or "")
        try:
            kb = KbSearch(client, shared_embedder(settings.embedding_model), index=index)
            return await kb.run({"query": QUESTION}, ToolContext(user))
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_kb_search_never_hands_alice_the_private_chunks_of_Alice(
    settings: Settings, r: redis.Redis, embedder: Embedder, pair: tuple[str, str],
    tmp_path: Path, folding: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    upper, lower = pair
    path = tmp_path / f"lamp-{upper}.md"
    path.write_text(DOC)
    ingest_paths(r, embedder, [path], scope=f"user:{upper}", progress=False)

    assert "blue step" in kb_ask(settings, upper).content  # the owner finds it
    assert "blue step" not in kb_ask(settings, lower).content

    old = folding("kb", [f"kb:{doc_id(path)}:"], docs=1)
    assert folds(r, old, "scope", f"user:{lower}") >= 1
    with caplog.at_level(logging.WARNING, logger="backbone.scope"):
        got = kb_ask(settings, lower, index=old)
    assert "blue step" not in got.content and got.items == []
    assert dropped(caplog, "kb_search")
    assert "blue step" in kb_ask(settings, upper, index=old).content


# ---- the semantic cache --------------------------------------------------------------


def route(
    settings: Settings, make: Callable[[Any, Embedder], Tool], calls: list[tuple[str, str]],
    index: str = keys.INDEX_CACHE,
) -> list[Routed]:
    """Each (user, question) in order through one real ToolRouter + SemanticCache, to
    the tool `make(client, embedder)` builds."""
    emb = CountingEmbedder()

    async def main() -> list[Routed]:
        client = async_redis_client(settings.redis_url or "")
        try:
            cache = SemanticCache(client, settings, embedder=emb, index=index)
            tool = make(client, emb)
            router = ToolRouter({tool.spec.name: tool}, emb, 30.0, cache=cache)
            out = []
            for i, (user, question) in enumerate(calls):
                call = ToolCall(id=f"c{i}", name=tool.spec.name, arguments={"query": question})
                out.append(await router.run(call, ToolContext(user)))
            await cache.drain()
            return out
        finally:
            await client.aclose()

    return asyncio.run(main())


def cache_ask(
    settings: Settings, tool: CountingTool, calls: list[tuple[str, str]],
    index: str = keys.INDEX_CACHE,
) -> list[Routed]:
    return route(settings, lambda _client, _emb: tool, calls, index)


def test_a_cached_private_retrieval_of_Alice_never_serves_alice_by_knn(
    settings: Settings, r: redis.Redis, pair: tuple[str, str], folding: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upper, lower = pair
    asked, reworded = "How do I reset my password?", "How can I reset my password?"
    tool = CountingTool(scope="user")
    routed = cache_ask(settings, tool, [(upper, asked), (upper, reworded), (lower, reworded)])
    assert [x.cached for x in routed] == [False, True, False]  # the cache is live for Alice
    assert upper not in routed[2].result.content and tool.runs == 2

    tool = CountingTool(scope="user")
    old = folding("cache", [f"cache:{tool.spec.name}:"])
    cache_ask(settings, tool, [(upper, asked)], index=old)
    assert folds(r, old, "scope", f"user:{lower}") == 1
    with caplog.at_level(logging.WARNING, logger="backbone.scope"):
        (got,) = cache_ask(settings, tool, [(lower, reworded)], index=old)
    assert not got.cached and upper not in got.result.content and tool.runs == 2
    assert dropped(caplog, "cache KNN")


def test_a_cache_entry_of_Alice_under_alices_exact_key_is_a_logged_miss(
    settings: Settings, r: redis.Redis, pair: tuple[str, str], caplog: pytest.LogCaptureFixture,
) -> None:
    upper, lower = pair
    tool = CountingTool(scope="user")
    args = {"query": QUESTION}
    (first,) = cache_ask(settings, tool, [(upper, QUESTION)])
    model = shared_embedder().model_id
    theirs = entry_key(tool.spec.name, f"user:{upper}", args, QUESTION, model=model)
    mine = entry_key(tool.spec.name, f"user:{lower}", args, QUESTION, model=model)
    assert theirs != mine  # the scope is in the key hash: the plain path never meets
    # The exact path reads a key, not an index: put Alice's entry where alice's would be.
    r.copy(theirs, mine, replace=True)
    with caplog.at_level(logging.WARNING, logger="backbone.scope"):
        (got,) = cache_ask(settings, tool, [(lower, QUESTION)])
    assert not got.cached and got.result.content != first.result.content
    assert upper not in got.result.content and tool.runs == 2
    assert dropped(caplog, "cache exact")
    assert r.hget(mine, "scope") == f"user:{lower}".encode()  # alice's own result replaced it


# ---- memory --------------------------------------------------------------------------


def recall_of(settings: Settings, user: str, index: str = keys.INDEX_MEMORY) -> list[str]:
    async def run() -> list[str]:
        client = async_redis_client(settings.redis_url or "")
        try:
            emb = shared_embedder(settings.embedding_model)
            return await recall(client, emb, user, QUESTION, index=index)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_recall_never_brings_Alices_memories_into_alices_turn(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection[Any], embedder: Embedder,
    pair: tuple[str, str], folding: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    upper, lower = pair
    MemoryStore(r, pg, embedder).write(upper, None, [Fact("note", SECRET)])
    assert any("blue step" in line for line in recall_of(settings, upper))
    assert recall_of(settings, lower) == []

    old = folding("memory", [f"memory:{upper}:", f"memory:{lower}:"], docs=1)
    assert folds(r, old, "user", lower) == 1
    with caplog.at_level(logging.WARNING, logger="backbone.scope"):
        assert recall_of(settings, lower, index=old) == []
    assert dropped(caplog, "memory recall")


def test_Alices_memory_never_suppresses_alices_identical_one_as_a_duplicate(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection[Any], embedder: Embedder,
    pair: tuple[str, str], folding: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    upper, lower = pair
    fact = Fact("note", SECRET)
    assert MemoryStore(r, pg, embedder).write(upper, None, [fact]).inserted == 1
    assert MemoryStore(r, pg, embedder).write(lower, None, [fact]).inserted == 1
    assert r.exists(keys.memory(lower, memory_id(lower, "note", SECRET)))

    upper2, lower2 = f"{upper}-2", f"{lower}-2"
    old = folding("memory", [f"memory:{upper2}:", f"memory:{lower2}:"])
    assert MemoryStore(r, pg, embedder).write(upper2, None, [fact]).inserted == 1
    assert folds(r, old, "user", lower2) == 1
    with caplog.at_level(logging.WARNING, logger="backbone.scope"):
        stored = MemoryStore(r, pg, embedder, index=old).write(lower2, None, [fact])
    assert stored.inserted == 1 and stored.unchanged == 0
    assert dropped(caplog, "memory dedupe")
    users = {u for (u,) in pg.execute(
        "SELECT user_id FROM memories WHERE user_id IN (%s, %s, %s, %s)",
        (upper, lower, upper2, lower2))}  # fmt: skip
    assert users == {upper, lower, upper2, lower2}


# ---- kb_search through the cache: the global part is shared, the private part never -----


def kb_cached(settings: Settings, calls: list[tuple[str, str]]) -> list[Routed]:
    """kb_search through the real router and cache, each (user, question) in order."""
    return route(settings, KbSearch, calls)


def test_every_user_is_served_alices_cached_global_retrieval_and_never_her_private_passage(
    settings: Settings, r: redis.Redis, embedder: Embedder, pair: tuple[str, str],
    tmp_path: Path, user: str,
) -> None:
    upper, lower = pair
    tower = f"Vardo{uuid.uuid4().hex[:6]}"
    question = f"Where is the spare key to the {tower} lamp room?"
    public, private = tmp_path / "public", tmp_path / "private"
    public.mkdir()
    private.mkdir()
    (public / f"{tower}.md").write_text(
        f"# {tower} lamp room\n\nVisitors to the {tower} lamp room ask the harbour office "
        "for the visitors' key; the spare key is never lent out.\n")
    (private / f"{tower}.md").write_text(DOC.replace("lamp room", f"{tower} lamp room"))
    ingest_paths(r, embedder, [public], progress=False)
    ingest_paths(r, embedder, [private], scope=f"user:{upper}", progress=False)

    (own,) = kb_cached(settings, [(upper, question)])
    assert "blue step" in own.result.content and "harbour office" in own.result.content
    assert dict(own.parts) == {"global": False, "user": False}

    others = {
        "case variant": lower,
        "UPPER": upper.upper(),
        "fresh": user,
        "tag syntax": f"x.{upper}@example-org.com",
    }
    # The case variant has a document of its own, so its private part runs (and must
    # miss Alice's entry); the others have none, so theirs is not run at all.
    own_doc = tmp_path / "variant"
    own_doc.mkdir()
    (own_doc / f"{tower}-tides.md").write_text(f"# {tower} tides\n\nHigh tide at noon.\n")
    ingest_paths(r, embedder, [own_doc], scope=f"user:{lower}", progress=False)
    got = kb_cached(settings, [(other, question) for other in others.values()])
    for (who, _), routed in zip(others.items(), got, strict=True):
        expected = {"global": True, "user": False} if who == "case variant" else {"global": True}
        assert dict(routed.parts) == expected, who
        assert "harbour office" in routed.result.content, who
        assert "blue step" not in routed.result.content and SECRET not in routed.result.content

    for lookalike in ("\u0430" + lower[1:], "\uff41" + lower[1:], lower + "\u200b"):
        (odd,) = kb_cached(settings, [(lookalike, question)])
        assert odd.result.error is not None and not odd.cached, lookalike  # refused, not folded
        assert "blue step" not in odd.result.content
