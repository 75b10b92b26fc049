"""Recall: the caller's long-term memories nearest to a question, for the turn's context.

KNN over `idx:memory`, filtered by the user tag (escaped: user text never
becomes query syntax) and by the embedding model's tag (a memory embedded by
another model is never compared with this one's vector), bounded by cosine
distance so an unrelated memory does not reach the prompt. What reaches it is
marked used (`app.memory.usage`: in memory now, in PostgreSQL in batches), so
MEMORY_MAX_PER_USER evicts what recall no longer finds first. Each row's `user` is
compared again, exactly, with the caller (`app.scope_guard`): another user's
memory is dropped and logged. The embedding model is CPU-bound, so it runs in a
thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np
import redis.asyncio as aredis

from app.embeddings import Embedder
from app.memory.usage import UsageMarks
from app.stores import keys
from app.stores.indexes import escape_tag
from app.stores.scope_guard import admitted
from app.tools.kb_search import parse_search_reply

# With all-MiniLM-L6-v2 a question about a stored fact sits at 0.65-0.8 from it
# ("Where do I live?" / "lives in Lisbon" 0.68); an unrelated fact past 0.9.
MAX_DISTANCE = 0.8
Recall = Callable[[str, str], Awaitable[list[str]]]


async def recall(
    redis_async: aredis.Redis,
    embedder: Embedder,
    user: str,
    question: str,
    k: int = 5,
    *,
    max_distance: float = MAX_DISTANCE,
    index: str = keys.INDEX_MEMORY,
    marks: UsageMarks | None = None,
) -> list[str]:
    """Up to k "kind: content" lines of `user`'s memories nearest to `question`."""
    keys.check_user_id(user)
    if not question.strip() or k <= 0:
        return []
    vector = await embedder.aembed(question)
    filt = f"@user:{{{escape_tag(user)}}} @model:{{{escape_tag(embedder.model_id)}}}"
    reply = await redis_async.execute_command(
        "FT.SEARCH", index,
        f"({filt})=>[KNN {int(k)} @embedding $vec AS distance]",
        "PARAMS", 2, "vec", np.asarray(vector, dtype=np.float32).tobytes(),
        "SORTBY", "distance", "ASC",
        "RETURN", 4, "user", "kind", "content", "distance",
        "LIMIT", 0, int(k),
        "DIALECT", 2,
    )  # type: ignore[no-untyped-call]  # fmt: skip
    _, rows = parse_search_reply(reply)
    out, used = [], []
    for key, f in admitted(rows, "user", (user,), "memory recall"):
        if float(f.get("distance", "2")) > max_distance:
            continue
        out.append(f"{f.get('kind', 'note')}: {f.get('content', '')}")
        used.append(key.rsplit(":", 1)[-1])
    if marks is not None and used:
        marks.mark(user, used)
    return out


def make_recall(
    redis_async: aredis.Redis, embedder: Embedder, k: int = 5, max_distance: float = MAX_DISTANCE,
    marks: UsageMarks | None = None,
) -> Recall:
    """A `TurnDeps.recall` bound to the app's clients."""

    async def bound(user: str, question: str) -> list[str]:
        return await recall(redis_async, embedder, user, question, k, max_distance=max_distance,
                            marks=marks)

    return bound
