"""The RediSearch indexes, defined as redisvl YAML in `schemas/`, created idempotently.

The vector dimension in the YAML is all-MiniLM-L6-v2's (384); another
EMBEDDING_MODEL passes its own, and `create` builds the index with it.

An index that exists with another definition than its YAML (a deployment
created before the TAG fields became CASESENSITIVE, another vector dimension)
is upgraded by `create_all`, at every start and by `backbone index create`:
FT.DROPINDEX without DD, then FT.CREATE. The hashes stay where they are and
RediSearch re-indexes them in the background; until it is done, searches see
part of the data (a cache lookup misses, a kb search finds less), never
another scope's. Only the attributes in `definition` are compared, so a Redis
that reports extra defaults does not cause a rebuild at every start.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import psycopg
import redis
import yaml
from redisvl.exceptions import RedisSearchError
from redisvl.index import SearchIndex
from redisvl.schema import IndexSchema

from app.stores import keys, scripts

log = logging.getLogger("backbone.indexes")

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
NAMES = ("cache", "kb", "memory")
# Per field type, the attributes that change what a query matches or what a key holds.
_COMPARED: dict[str, tuple[str, ...]] = {
    "tag": ("case_sensitive", "separator", "sortable"),
    "text": ("no_stem", "sortable", "weight"),
    "numeric": ("sortable",),
    "vector": ("algorithm", "datatype", "dims", "distance_metric", "m", "ef_construction"),
}
Outcome = Literal["created", "upgraded"]


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


def definition(s: IndexSchema) -> dict[str, Any]:
    """The parts of a schema two indexes must share to hold and match the same keys."""
    spec = s.to_dict()
    prefix = spec["index"]["prefix"]
    fields = {}
    for f in spec["fields"]:
        attrs = f.get("attrs") or {}
        fields[f["name"]] = (f["type"], {
            a: _plain(attrs.get(a)) for a in _COMPARED.get(f["type"], ())
        })  # fmt: skip
    return {
        "prefix": sorted([prefix] if isinstance(prefix, str) else prefix),
        "storage_type": spec["index"]["storage_type"],
        "fields": fields,
    }


def _plain(value: Any) -> Any:
    # FT.INFO reports "COSINE" for cosine and 1.0 for a weight the YAML wrote as 1.
    if isinstance(value, str):
        return value.lower()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def ensure(client: redis.Redis, want: IndexSchema) -> Outcome | None:
    """Create the index, or rebuild it when its definition differs from `want`."""
    idx = SearchIndex(want, redis_client=client)
    if not idx.exists():
        _create(idx)
        return "created"
    try:
        have = SearchIndex.from_existing(idx.name, redis_client=client).schema
    except Exception as e:  # an FT.INFO this redisvl cannot read: keep what serves
        log.warning("index %s: cannot read its definition, left as it is: %s", idx.name, e)
        return None
    old, new = definition(have), definition(want)
    if old == new:
        return None
    changed = sorted(
        name for name in old["fields"].keys() | new["fields"].keys()
        if old["fields"].get(name) != new["fields"].get(name)
    )
    log.warning(
        "index %s differs from its schema (fields %s%s): dropping it (the keys stay) and "
        "creating it again; its hashes are re-indexed in the background",
        idx.name, ", ".join(changed) or "none",
        "" if old["prefix"] == new["prefix"] else "; prefix",
    )  # fmt: skip
    client.ft(idx.name).dropindex(delete_documents=False)
    _create(idx)
    return "upgraded"


def _create(idx: SearchIndex) -> None:
    try:
        idx.create(overwrite=False)
    except RedisSearchError:
        # Another node starting at the same moment created it first: the same YAML.
        if not idx.exists():
            raise


def create_all(client: redis.Redis, dims: int | None = None) -> list[str]:
    """Create every missing index and upgrade every outdated one; return their names."""
    done = []
    for name in NAMES:
        want = schema(name, dims)
        if ensure(client, want) is not None:
            done.append(str(want.index.name))
    return done


def tag_untagged(client: redis.Redis, model: str, batch: int = 1000) -> dict[str, int]:
    """Tag entries written before the `model` TAG existed; return how many per index.

    Every KNN filters on the model (so two models' vectors never meet), which makes
    an untagged entry invisible: after the upgrade the knowledge base would answer
    nothing and memories would not be recalled. The first start after it tags
    them with the configured model, the one that made them unless EMBEDDING_MODEL
    changed in the same upgrade. Once per index: `<index>:model-tagged` records it.
    """
    done: dict[str, int] = {}
    for name in NAMES:
        s = schema(name)
        marker = f"{s.index.name}:model-tagged"
        if client.exists(marker):
            continue
        # Loaded here, not trusted from start-up: EVALSHA in a pipeline has no EVAL
        # fallback, and the script cache may be empty (a restarted Redis).
        client.script_load(scripts.load_all()["tag_model"].source)
        tagged = sum(_tag(client, found, model)
                     for found in _batches(client, s.index.prefix, batch))
        client.set(marker, model)
        if tagged:
            log.warning("%s: tagged %d entries from before model tags with %s",
                        s.index.name, tagged, model)
        done[str(s.index.name)] = tagged
    return done


def version_unversioned(client: redis.Redis, batch: int = 1000) -> int:
    """Give `kb-version:<scope>` = 1 to every scope holding knowledge-base chunks but no
    version (chunks ingested before versions existed); return how many scopes.

    kb_search leaves out a private scope with no version as empty
    (`KbSearch.parts_to_run`), so such chunks would never be found. `SET NX`: a
    version an ingest set meanwhile stays. Once per Redis: `idx:kb:versioned`
    records it."""
    s = schema("kb")
    marker = f"{s.index.name}:versioned"
    if client.exists(marker):
        return 0
    scopes: set[str] = set()
    for found in _batches(client, s.index.prefix, batch):
        scopes |= _scopes(client, found)
    pipe = client.pipeline(transaction=False)
    for scope in sorted(s for s in scopes if keys.KB_SCOPE.fullmatch(s)):
        pipe.set(keys.kb_version(scope), 1, nx=True)
    given = sum(1 for r in pipe.execute() if r)
    client.set(marker, 1)
    if given:
        log.warning("idx:kb: %d scopes held chunks from before versions; versioned", given)
    return given


def tag_memory_sessions(client: redis.Redis, pg: psycopg.Connection[Any],
                        batch: int = 1000) -> int:
    """Give the recall copies of memories written before the `session` TAG existed the
    session their row names; return how many were tagged.

    A search filtered by session (`POST /v1/memories/search`) would not find them
    otherwise. `HSETNX`: a copy a writer tagged meanwhile keeps its value. Once per
    Redis: `idx:memory:session-tagged` (`keys.MEMORY_SESSION_TAGGED`) records it."""
    marker = keys.MEMORY_SESSION_TAGGED
    if client.exists(marker):
        return 0
    client.script_load(scripts.load_all()["tag_session"].source)
    tagged = 0
    # A server-side cursor (inside a transaction): the rows come a batch at a time.
    with pg.transaction(), pg.cursor(name="memory_sessions") as cur:
        cur.execute("SELECT user_id, id, session_id FROM memories WHERE session_id IS NOT NULL")
        while rows := cur.fetchmany(batch):
            pipe = client.pipeline(transaction=False)
            for user, mid, sid in rows:
                if not keys.USER_ID.fullmatch(user):
                    continue
                call = scripts.tag_session(keys.memory(user, mid), sid)
                pipe.evalsha(call.script.sha, call.script.numkeys, *call.keys, *call.args)
            tagged += sum(int(r) for r in pipe.execute())
    client.set(marker, 1)
    if tagged:
        log.warning("idx:memory: tagged %d memories from before session tags", tagged)
    return tagged


def _batches(client: redis.Redis, prefix: str, batch: int) -> Iterator[list[str]]:
    """The hash keys under `prefix`, `batch` at a time (one pipeline's worth each)."""
    found: list[str] = []
    for key in client.scan_iter(match=f"{prefix}*", count=batch, _type="HASH"):
        found.append(key.decode() if isinstance(key, bytes) else str(key))
        if len(found) >= batch:
            yield found
            found = []
    if found:
        yield found


def _scopes(client: redis.Redis, entries: list[str]) -> set[str]:
    pipe = client.pipeline(transaction=False)
    for key in entries:
        pipe.hget(key, "scope")
    return {v.decode() if isinstance(v, bytes) else str(v) for v in pipe.execute() if v}


def _tag(client: redis.Redis, entries: list[str], model: str) -> int:
    pipe = client.pipeline(transaction=False)
    for key in entries:
        call = scripts.tag_model(key, model)
        pipe.evalsha(call.script.sha, call.script.numkeys, *call.keys, *call.args)
    return sum(int(r) for r in pipe.execute())


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


# Everything but letters, digits and _ is tag syntax somewhere; escape it all.
_TAG_SPECIAL = re.compile(r"[^A-Za-z0-9_]")


@functools.lru_cache(maxsize=4096)
def escape_tag(value: str) -> str:
    """`value` as a TAG query term. Remembered: a turn's lookups escape the same tool,
    scope, model and digest again and again (re.sub expands its template per match)."""
    return _TAG_SPECIAL.sub(lambda m: "\\" + m[0], value)


def models(client: redis.Redis, index_name: str) -> dict[str, int]:
    """model id -> how many of the index's entries that embedding model made; entries
    written before entries carried one count under "(none)" (no query ever matches them)."""
    info = client.ft(index_name).info()  # type: ignore[no-untyped-call]
    total = int(info.get("num_docs", 0))
    raw = client.execute_command("FT.TAGVALS", index_name, "model")  # type: ignore[no-untyped-call]
    out: dict[str, int] = {}
    for value in raw or []:
        model = value.decode() if isinstance(value, bytes) else str(value)
        escaped = escape_tag(model)
        reply = client.execute_command(  # type: ignore[no-untyped-call]
            "FT.SEARCH", index_name, f"@model:{{{escaped}}}",
            "LIMIT", 0, 0, "DIALECT", 2,
        )  # fmt: skip
        if isinstance(reply, dict):  # RESP3
            reply = {(k.decode() if isinstance(k, bytes) else k): v for k, v in reply.items()}
            out[model] = int(reply["total_results"])
        else:
            out[model] = int(reply[0] if isinstance(reply, list) else reply)
    if total > sum(out.values()):
        out["(none)"] = total - sum(out.values())
    return out
