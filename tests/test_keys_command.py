"""`backbone keys` against a real Redis: families, counts, TTL ranges, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import redis

from app.ops.keyspace import UNNAMED, families, survey
from app.settings import Settings
from app.stores import keys


def _row(rows: list[dict[str, object]], family: str) -> dict[str, object]:
    return next(r for r in rows if r["family"] == family)


def test_every_key_family_of_the_table_is_surveyed_and_an_unnamed_key_is_reported() -> None:
    assert {"session:{<sid>}", "memory-task-lock:{<sid>}", "cache:<tool>:<hash>",
            "sessions:unpersisted:{<n>}", "rq:*"} <= set(families())
    # Indexes are not keys; the start-up backfills' markers under idx: are.
    assert not {"idx:cache", "idx:kb", "idx:memory"} & set(families())
    assert {"idx:<name>:model-tagged", "idx:kb:versioned", "memory-due"} <= set(families())


def test_keys_counts_ttl_range_and_memory_of_what_it_finds(
    settings: Settings, r: redis.Redis
) -> None:
    sids = [uuid.uuid4().hex for _ in range(3)]
    stray = f"stray-{uuid.uuid4().hex}"
    before = {f.pattern: f for f in survey(r)}
    for i, sid in enumerate(sids):
        r.set(keys.memory_summary(sid), "x" * 2000, ex=600 + i * 600)
    r.set(stray, "1")
    try:
        env = {**os.environ, "REDIS_URL": settings.redis_url or "",
               "DATABASE_URL": settings.database_url or "", "DATA_DIR": str(settings.data_dir)}
        out = subprocess.run([sys.executable, "-m", "app.cli", "keys", "--json"], env=env,
                             check=True, capture_output=True, text=True).stdout
        rows = json.loads(out)
        summary = _row(rows, "memory-summary:{<sid>}")
        old = before["memory-summary:{<sid>}"]
        assert summary["keys"] == old.count + 3
        # Ours live 600 to 1800 s; other tests' keys of the family can only widen the range.
        assert int(summary["ttl_min_ms"]) <= 600_000  # type: ignore[call-overload]
        assert int(summary["ttl_max_ms"]) >= 1_700_000  # type: ignore[call-overload]
        assert int(summary["memory_bytes"]) >= 3 * 2000  # type: ignore[call-overload]
        unnamed = _row(rows, UNNAMED)
        assert unnamed["keys"] == (before[UNNAMED].count if UNNAMED in before else 0) + 1
        assert unnamed["no_ttl"] >= 1  # type: ignore[operator]
        table = subprocess.run([sys.executable, "-m", "app.cli", "keys"], env=env, check=True,
                               capture_output=True, text=True).stdout
        assert "memory-summary:{<sid>}" in table and "TTL max" in table
    finally:
        r.delete(stray, *(keys.memory_summary(s) for s in sids))
