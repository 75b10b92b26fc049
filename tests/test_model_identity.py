"""The embedding model is part of every cache, kb and memory entry: after a switch of
EMBEDDING_MODEL, no query compares its vectors with the old model's.

`OtherModel` gives the very same vectors under another model id, the hardest case:
only the `model` tag can keep the two apart (a model of another width is kept apart
by the index's dimension as well). Real Redis Stack, PostgreSQL and model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
from test_cli import BACKBONE, _env
from test_semantic_cache import CountingTool, ask

from app.embeddings import Embedder, Vector, shared_embedder
from app.kb.ingest import ingest_paths
from app.memory.facts import Fact
from app.memory.recall import recall
from app.memory.store import MemoryStore
from app.settings import Settings
from app.stores import indexes, keys, scripts
from app.stores.clients import async_redis_client
from app.tools import KbSearch
from app.tools.base import ToolContext


class OtherModel(Embedder):
    """The packaged model's vectors under another identity."""

    def __init__(self) -> None:
        self.inner = shared_embedder()
        self.model_name = "other-model"
        self.calls = 0

    @property
    def model_id(self) -> str:
        return "other-model:384"

    def embed(self, text: str) -> Vector:
        return self.inner.embed(text)

    def embed_many(self, texts: Sequence[str], batch_size: int = 64) -> Vector:
        return self.inner.embed_many(texts, batch_size)

    async def aembed(self, text: str) -> Vector:
        self.calls += 1
        return await self.inner.aembed(text)


def test_the_model_id_names_the_model_and_its_width_whatever_the_backend() -> None:
    assert shared_embedder(backend="onnx").model_id == "all-MiniLM-L6-v2:384"
    assert shared_embedder(backend="torch").model_id == "all-MiniLM-L6-v2:384"


def test_a_cache_entry_of_one_model_is_never_served_after_a_switch(
    settings: Settings, r: redis.Redis, user: str,
) -> None:
    tool = CountingTool()
    asked, reworded = "How do I renew my boat licence?", "How can I renew my boat licence?"
    first, second = ask(settings, tool, [(user, asked), (user, reworded)])
    assert not first.cached and second.cached and tool.runs == 1
    [key] = list(r.scan_iter(match=f"{keys.cache_prefix(tool.spec.name)}*"))
    assert r.hget(key, "model") == b"all-MiniLM-L6-v2:384"

    # The rewording first: with the same vectors, only the model filter keeps the KNN
    # from the old entry (and only the model in the key hash keeps `asked` from it).
    other: Any = OtherModel()
    routed = ask(settings, tool, [(user, reworded), (user, asked)], embedder=other)
    assert [x.cached for x in routed] == [False, True]  # the new model's own entry serves
    assert tool.runs == 2


def ferry(r: redis.Redis, pg: psycopg.Connection[Any], tmp_path: Path, user: str,
          place: str) -> None:
    """A private kb document about `place`'s ferry and a memory of living on `place`."""
    path = tmp_path / f"{place}.md"
    path.write_text(f"# {place} ferry\n\nThe {place} ferry carries bicycles free on Sundays.\n")
    ingest_paths(r, shared_embedder(), [path], scope=f"user:{user}", progress=False)
    MemoryStore(r, pg, shared_embedder()).write(user, None, [Fact("note", f"lives on {place}")])


def ask_about(settings: Settings, emb: Embedder, user: str, place: str) -> tuple[str, list[str]]:
    """What kb_search answers and what recall finds about `place`, through `emb`."""
    async def search() -> tuple[str, list[str]]:
        client = async_redis_client(settings.redis_url or "")
        try:
            found = await KbSearch(client, emb).run(
                {"query": f"Does the {place} ferry carry bicycles?"}, ToolContext(user))
            memories = await recall(client, emb, user, f"Where do I live, {place}?")
            return found.content, memories
        finally:
            await client.aclose()

    return asyncio.run(search())


def test_kb_chunks_and_memories_of_one_model_are_never_found_by_another(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection[Any], tmp_path: Path, user: str,
) -> None:
    name = f"Kvitsoy{uuid.uuid4().hex[:6]}"
    ferry(r, pg, tmp_path, user, name)
    kb, memories = ask_about(settings, shared_embedder(), user, name)
    assert "bicycles free" in kb and any(name in m for m in memories)
    kb, memories = ask_about(settings, OtherModel(), user, name)
    assert "bicycles free" not in kb and memories == []


def test_index_info_says_which_model_built_what(
    settings: Settings, r: redis.Redis, user: str,
) -> None:
    r.hset(keys.memory(user, uuid.uuid4().hex), mapping={
        "user": user, "kind": "note", "content": "x", "model": "other-model:384",
        "embedding": shared_embedder().embed("x").tobytes()})  # fmt: skip
    assert indexes.models(r, keys.INDEX_MEMORY).get("other-model:384", 0) >= 1
    res = subprocess.run(
        [*BACKBONE, "index", "info"], capture_output=True, text=True, timeout=60,
        env=_env(REDIS_URL=settings.redis_url or "", DATABASE_URL=settings.database_url or ""),
    )
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["idx:memory"]["models"]["other-model:384"] >= 1
    assert info["idx:memory"]["models"]["all-MiniLM-L6-v2:384"] >= 0
    assert set(info["idx:kb"]["models"]) >= {"all-MiniLM-L6-v2:384"}


def test_entries_from_before_model_tags_are_tagged_once_at_start_and_found_again(
    settings: Settings, r: redis.Redis, pg: psycopg.Connection[Any], tmp_path: Path, user: str,
) -> None:
    # An upgrade must not leave the knowledge base answering nothing and memories unrecalled.
    name = f"Utsira{uuid.uuid4().hex[:6]}"
    ferry(r, pg, tmp_path, user, name)
    untagged = [k for prefix in ("kb:", "memory:") for k in r.scan_iter(match=f"{prefix}*")
                if name.encode() in b" ".join(v for v in r.hgetall(k).values()
                                              if isinstance(v, bytes) and len(v) < 4000)]
    assert untagged
    for key in untagged:  # as written before the upgrade
        r.hdel(key, "model")
    kb, memories = ask_about(settings, shared_embedder(), user, name)
    assert "bicycles free" not in kb and memories == []  # what an upgrade left
    for name_ in ("idx:kb", "idx:memory", "idx:cache"):
        r.delete(f"{name_}:model-tagged")
    model = shared_embedder().model_id
    done = indexes.tag_untagged(r, model)
    assert done["idx:kb"] >= 1 and done["idx:memory"] >= 1
    assert all(r.hget(k, "model") == model.encode() for k in untagged)
    kb, memories = ask_about(settings, shared_embedder(), user, name)
    assert "bicycles free" in kb and any(name in m for m in memories)
    assert indexes.tag_untagged(r, model) == {}  # once: the markers stand
    gone = f"memory:{uuid.uuid4().hex}"
    assert scripts.run(r, scripts.tag_model(gone, model)) == 0 and not r.exists(gone)
