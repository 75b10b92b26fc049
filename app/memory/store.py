"""Long-term memories: PostgreSQL `memories` is the truth, `memory:<uid>:<id>` the recall copy.

A memory's id is `memory_id(user, kind, content)`: SHA-256 over the user, the
kind and the case-folded, whitespace-collapsed content, first 32 hex digits. So
the same fact written twice (a job re-run after it lost its lock, two sessions
of one user saying the same thing) lands on one row (`ON CONFLICT DO UPDATE`)
and one hash.

A fact *close* to an existing memory of the same user and kind (cosine distance
below `merge_distance`, by KNN over `idx:memory`) updates that memory instead
of adding a near-duplicate: "is allergic to peanuts and tree nuts" replaces
"is allergic to peanuts". Newer wording wins; the id stays the first one.
The neighbour's `user` is compared again, exactly (`app.scope_guard`), so
another user's memory (`Alice`'s for `alice`) never suppresses or absorbs one.

Writes for one user are serialised by a PostgreSQL transaction-scoped advisory
lock, so two workers mining two sessions of the same user cannot both miss each
other's near-duplicate; an erase's fence takes the same lock, and nothing is
written for an erased user. The Redis copy is written inside that transaction,
before the commit, so the next writer's KNN already sees it. If the commit then
fails, the copy names a row that does not exist until the job's retry writes it.

At most `max_per_user` memories per user (MEMORY_MAX_PER_USER). Past it, a write
evicts the user's least recently used ones: by `used_at`, which an insert, an
update or an exact repeat sets and a recall moves (`app.memory.usage`, in
batches). The row and its recall copy go together, in the same transaction
and under the same lock as the write that overflowed; a failed commit brings
the rows back without their copies, and they are the first the next overflow
evicts.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import redis
from redis.typing import EncodableT, FieldT

from app.embeddings import Embedder, Vector
from app.errors import DuplicateMemory, NotFound
from app.memory.facts import Fact
from app.stores import keys
from app.stores.indexes import escape_tag
from app.stores.scope_guard import admitted
from app.tools.kb_search import parse_search_reply

# Measured with all-MiniLM-L6-v2: a refinement of the same fact sits near 0.1 ("is allergic
# to peanuts" / "... and tree nuts" 0.098, "works at Acme" / "... Acme Corp" 0.087), a
# different fact of the same kind past 0.3 ("lives in Lisbon" / "lives in Porto" 0.301).
MERGE_DISTANCE = 0.15
MEMORY_ID = re.compile(r"^[0-9a-f]{32}$")
_SPACE = re.compile(r"\s+")


def canonical_content(content: str) -> str:
    return _SPACE.sub(" ", content).strip().casefold()


def memory_id(user: str, kind: str, content: str) -> str:
    digest = hashlib.sha256(f"{user}\n{kind}\n{canonical_content(content)}".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class Stored:
    """What `MemoryStore.write` did with a batch of facts."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    evicted: int = 0
    # The memory each fact landed on, in order (its own, or the one it duplicates).
    ids: tuple[str, ...] = ()

    def __add__(self, other: Stored) -> Stored:
        return Stored(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
            self.evicted + other.evicted,
            self.ids + other.ids,
        )


@dataclass(frozen=True)
class Neighbour:
    id: str
    content: str
    distance: float


def nearest(
    client: redis.Redis, vector: Vector, user: str, kind: str | None = None, k: int = 1,
    *, model: str, index: str = keys.INDEX_MEMORY,
) -> list[Neighbour]:
    """The k memories of `user` (of `kind`, when given) nearest to `vector`, nearest first,
    among those embedded by `model` (the only vectors `vector` may be compared with)."""
    keys.check_user_id(user)
    filt = f"@user:{{{escape_tag(user)}}} @model:{{{escape_tag(model)}}}"
    if kind is not None:
        filt += f" @kind:{{{escape_tag(kind)}}}"
    reply = client.execute_command(
        "FT.SEARCH", index,
        f"({filt})=>[KNN {k} @embedding $vec AS distance]",
        "PARAMS", 2, "vec", np.asarray(vector, dtype=np.float32).tobytes(),
        "SORTBY", "distance", "ASC",
        "RETURN", 3, "user", "content", "distance",
        "LIMIT", 0, k,
        "DIALECT", 2,
    )  # type: ignore[no-untyped-call]  # fmt: skip
    _, rows = parse_search_reply(reply)
    return [
        Neighbour(key.rsplit(":", 1)[-1], f.get("content", ""), float(f.get("distance", "2")))
        for key, f in admitted(rows, "user", (user,), "memory dedupe")
    ]


def _hash_fields(
    user: str, kind: str, content: str, vector: Vector, model: str, sid: str | None = None
) -> dict[FieldT, EncodableT]:
    return {
        "user": user,
        "kind": kind,
        "model": model,
        # '' is not indexed: a memory from no session matches no session filter.
        "session": sid or "",
        "content": content,
        "updated_at": time.time(),
        "embedding": np.asarray(vector, dtype=np.float32).tobytes(),
    }


@dataclass
class MemoryStore:
    """Writes facts for one user at a time; sync, for the workers."""

    redis: redis.Redis
    pg: psycopg.Connection[Any]
    embedder: Embedder
    merge_distance: float = MERGE_DISTANCE
    index: str = keys.INDEX_MEMORY
    max_per_user: int | None = None  # None: no cap

    def write(
        self, user: str, sid: str | None, facts: Sequence[Fact], source_hash: str | None = None
    ) -> Stored:
        """Insert new facts, update near-duplicates, skip exact repeats; idempotent.
        Then evict the user's least recently used memories beyond `max_per_user`."""
        keys.check_user_id(user)
        if not facts:
            return Stored()
        vectors = self.embedder.embed_many([f.content for f in facts])
        total = Stored()
        with self.pg.transaction():
            self.pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("memory:" + user,))
            if self.pg.execute("SELECT 1 FROM erased_users WHERE user_digest = user_digest(%s)",
                               (user,)).fetchone():
                return Stored()  # the user's erase began (app.privacy): write nothing
            for fact, vector in zip(facts, vectors, strict=True):
                total += self._write_one(user, sid, fact, vector, source_hash)
            if total.inserted and self.max_per_user is not None:
                total += Stored(evicted=self._evict(user, self.max_per_user))
        return total

    def _evict(self, user: str, keep: int) -> int:
        """Delete the user's memories past the `keep` most recently used, rows and copies."""
        gone = self.pg.execute(
            "DELETE FROM memories WHERE id IN (SELECT id FROM memories WHERE user_id = %s"
            " ORDER BY used_at DESC, id DESC OFFSET %s) AND user_id = %s RETURNING id",
            (user, keep, user),
        ).fetchall()
        if gone:
            self.redis.delete(*(keys.memory(user, str(row[0])) for row in gone))
        return len(gone)

    def _write_one(
        self, user: str, sid: str | None, fact: Fact, vector: Vector, source_hash: str | None
    ) -> Stored:
        mid = memory_id(user, fact.kind, fact.content)
        # An exact repeat is a use: it keeps the memory from eviction.
        row = self.pg.execute(
            "UPDATE memories SET used_at = now() WHERE id = %s RETURNING 1", (mid,)
        ).fetchone()
        if row is not None:
            return Stored(unchanged=1, ids=(mid,))
        near = nearest(self.redis, vector, user, fact.kind,
                       model=self.embedder.model_id, index=self.index)
        if near and near[0].distance < self.merge_distance:
            if canonical_content(near[0].content) == canonical_content(fact.content):
                self.pg.execute("UPDATE memories SET used_at = now() WHERE id = %s"
                                " AND user_id = %s", (near[0].id, user))
                return Stored(unchanged=1, ids=(near[0].id,))
            updated = self.pg.execute(
                "UPDATE memories SET content = %s, session_id = %s, source_hash = %s,"
                " updated_at = now(), used_at = now() WHERE id = %s AND user_id = %s",
                (fact.content, sid, source_hash, near[0].id, user),
            ).rowcount
            if updated:
                self.redis.hset(
                    keys.memory(user, near[0].id),
                    mapping=_hash_fields(user, fact.kind, fact.content, vector,
                                         self.embedder.model_id, sid),
                )
                return Stored(updated=1, ids=(near[0].id,))
            # The copy outlived its row (deleted meanwhile): insert afresh below.
        self.pg.execute(
            "INSERT INTO memories (id, user_id, session_id, kind, content, source_hash)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET used_at = now()",
            (mid, user, sid, fact.kind, fact.content, source_hash),
        )
        self.redis.hset(
            keys.memory(user, mid),
            mapping=_hash_fields(user, fact.kind, fact.content, vector, self.embedder.model_id,
                                 sid),
        )
        return Stored(inserted=1, ids=(mid,))

    def rewrite(self, user: str, mid: str, kind: str, content: str) -> bool:
        """Give the user's memory `mid` a new kind and content, re-embedded and re-deduped
        like a written fact; its id stays. False when it already said exactly this.

        Raises NotFound when the user has no memory `mid` (another user's, or deleted
        meanwhile: the row is read FOR UPDATE, so a delete either came first or waits
        for the commit and then removes the new copy too), and DuplicateMemory when
        another memory of the user and kind has the same or a near-duplicate content."""
        keys.check_user_id(user)
        [vector] = self.embedder.embed_many([content])
        with self.pg.transaction():
            self.pg.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("memory:" + user,))
            row = self.pg.execute(
                "SELECT kind, content, session_id FROM memories"
                " WHERE id = %s AND user_id = %s FOR UPDATE",
                (mid, user),
            ).fetchone()
            if row is None:
                raise NotFound("no such memory")
            if (row[0], row[1]) == (kind, content):
                return False
            others = [memory_id(user, kind, content)] + [
                n.id for n in nearest(self.redis, vector, user, kind, k=2,
                                      model=self.embedder.model_id, index=self.index)
                if n.distance < self.merge_distance
            ]  # fmt: skip
            for other in others:
                if other != mid and self.pg.execute(
                    "SELECT 1 FROM memories WHERE id = %s AND user_id = %s", (other, user)
                ).fetchone():
                    raise DuplicateMemory(other)
            self.pg.execute(
                "UPDATE memories SET kind = %s, content = %s, updated_at = now()"
                " WHERE id = %s AND user_id = %s",
                (kind, content, mid, user),
            )
            self.redis.hset(
                keys.memory(user, mid),
                mapping=_hash_fields(user, kind, content, vector, self.embedder.model_id, row[2]),
            )
        return True


def count(pg: psycopg.Connection[Any], user: str) -> int:
    row = pg.execute("SELECT count(*) FROM memories WHERE user_id = %s", (user,)).fetchone()
    return int(row[0]) if row else 0
