"""Which memories recall used: marked in memory, written to PostgreSQL in batches.

MEMORY_MAX_PER_USER evicts a user's least recently used memories first
(`app.memory.store`), so a memory recalled into a turn must count as used. The
turn only adds (user, id) pairs to a set (no I/O on the request path); a task
of the app writes them every `FLUSH_SECONDS` with one UPDATE for the whole
batch, and once more at shutdown. A failed write keeps its pairs for the next
one; pairs past `MAX_PENDING` are dropped (a use mark only orders evictions).
The row's user is matched too, so a pair can only mark its own user's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("backbone.memory")

FLUSH_SECONDS = 5.0
MAX_PENDING = 50_000

_UPDATE = """
UPDATE memories AS m SET used_at = now()
FROM unnest(%s::text[], %s::text[]) AS u (user_id, id)
WHERE m.id = u.id AND m.user_id = u.user_id
"""


class UsageMarks:
    """Recall's use marks, pending until the next batched write."""

    def __init__(self, pg: AsyncConnectionPool[Any], *, flush_seconds: float = FLUSH_SECONDS,
                 max_pending: int = MAX_PENDING) -> None:
        self.pg = pg
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self._pending: set[tuple[str, str]] = set()

    def mark(self, user: str, ids: list[str]) -> None:
        """These memories of `user` were recalled now (no I/O)."""
        if len(self._pending) < self.max_pending:
            self._pending.update((user, mid) for mid in ids)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> int:
        """Write the pending marks in one UPDATE; how many rows it touched."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, set()
        users, ids = [u for u, _ in batch], [m for _, m in batch]
        try:
            async with self.pg.connection() as conn:
                cur = await conn.execute(_UPDATE, (users, ids))
                return int(cur.rowcount)
        except (psycopg.Error, OSError) as e:
            # Kept for the next write: losing them would only age these memories.
            log.warning("memory use marks not written (%d kept for next time): %s", len(batch), e)
            if len(self._pending) < self.max_pending:
                self._pending.update(batch)
            return 0

    async def run(self) -> None:
        """Flush every `flush_seconds` until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.flush_seconds)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):  # the pool may be closing under it
                await self.flush()
