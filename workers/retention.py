"""rq job: drop what the stores keep longer than they should.

`sweep` is the hourly job: `trim_cache_audits` below, then the privacy sweep
(workers.privacy: history past HISTORY_RETENTION_DAYS, old tombstones, erasures
left unfinished). Every worker's ticker enqueues it at most once per
RETENTION_SWEEP_SECONDS over all workers (`retention-sweep-tick`, `SET NX EX`),
beside the persistence sweep.

`trim_cache_audits` deletes `cache_audits` rows older than
CACHE_AUDIT_RETENTION_DAYS, in batches of TRIM_BATCH rows (each its own short
statement, so the table is never locked for long), until none is left or
TRIM_BUDGET_SECONDS have passed (the next run goes on).

The cache report reads a bounded window of audits anyway (app.cache.stats):
the trim keeps the table, and its index, from growing without end.
"""

from __future__ import annotations

import logging
import time

from app.settings import Settings
from app.stores.clients import pg_connect

log = logging.getLogger("backbone.jobs")

RETENTION_SWEEP_SECONDS = 3600
TRIM_BATCH = 10_000
TRIM_BUDGET_SECONDS = 60.0

_TRIM_SQL = """
DELETE FROM cache_audits WHERE id IN (
    SELECT id FROM cache_audits WHERE created_at < now() - make_interval(days => %s) LIMIT %s
)
"""


def sweep() -> dict[str, int]:
    """The hourly retention sweep; returns what each part removed."""
    from workers.privacy import privacy_sweep  # the privacy part imports the app's stores

    return {f"cache_audits_{k}": v for k, v in trim_cache_audits().items()} | privacy_sweep()


def trim_cache_audits(days: int | None = None, batch: int = TRIM_BATCH) -> dict[str, int]:
    """Delete audits older than `days` (default CACHE_AUDIT_RETENTION_DAYS); return counts."""
    settings = Settings.from_env()
    keep = settings.cache_audit_retention_days if days is None else days
    deleted = batches = 0
    deadline = time.monotonic() + TRIM_BUDGET_SECONDS
    with pg_connect(settings.database_url or "", autocommit=True) as conn:
        while time.monotonic() < deadline:
            n = conn.execute(_TRIM_SQL, (keep, batch)).rowcount
            deleted += max(n, 0)
            batches += 1
            if n < batch:
                break
    if deleted:
        log.info("retention: %d cache audits older than %d days deleted", deleted, keep)
    return {"deleted": deleted, "batches": batches}
