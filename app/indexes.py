"""The RediSearch indexes, defined as redisvl YAML in `schemas/`, created idempotently.

The vector dimension in the YAML is all-MiniLM-L6-v2's (384); another
EMBEDDING_MODEL passes its own, and `create` builds the index with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import yaml
from redisvl.index import SearchIndex
from redisvl.schema import IndexSchema

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
NAMES = ("cache", "kb", "memory")


def schema(name: str, dims: int | None = None) -> IndexSchema:
    spec: dict[str, Any] = yaml.safe_load((SCHEMA_DIR / f"{name}.yaml").read_text())
    if dims is not None:
        for field in spec["fields"]:
            if field["type"] == "vector":
                field["attrs"]["dims"] = dims
    return IndexSchema.from_dict(spec)


def index(client: redis.Redis, name: str, dims: int | None = None) -> SearchIndex:
    return SearchIndex(schema(name, dims), redis_client=client)


def index_name(name: str) -> str:
    return str(schema(name).index.name)


def create_all(client: redis.Redis, dims: int | None = None) -> list[str]:
    """Create every index that does not exist yet; return the names created."""
    created = []
    for name in NAMES:
        idx = index(client, name, dims)
        if not idx.exists():
            idx.create(overwrite=False)
            created.append(idx.name)
    return created


def drop_all(client: redis.Redis, *, with_documents: bool = False) -> list[str]:
    dropped = []
    for name in NAMES:
        idx = index(client, name)
        if idx.exists():
            idx.delete(drop=with_documents)
            dropped.append(idx.name)
    return dropped


def status(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """name -> {exists, num_docs, indexing} for doctor and /readyz."""
    out: dict[str, dict[str, Any]] = {}
    for name in NAMES:
        idx = index(client, name)
        if not idx.exists():
            out[idx.name] = {"exists": False}
            continue
        info = idx.info()
        out[idx.name] = {
            "exists": True,
            "num_docs": int(info.get("num_docs", 0)),
            "indexing": bool(int(info.get("indexing", 0))),
        }
    return out
