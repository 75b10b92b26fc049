"""The privacy sweep: retention, tombstones, unfinished erasures (app.privacy.retention).

Part of the hourly retention sweep (workers.retention.sweep). Safe to run twice:
every part finds only what is left.
"""

from __future__ import annotations

import asyncio
import logging

from app.privacy import retention
from app.privacy.erase import own_eraser
from app.settings import Settings

log = logging.getLogger("backbone.privacy")


def privacy_sweep() -> dict[str, int]:
    """One sweep with the worker's settings; returns what it removed."""
    return asyncio.run(run_sweep(Settings.from_env()))


async def run_sweep(settings: Settings) -> dict[str, int]:
    async with own_eraser(settings) as eraser:
        counts = await retention.sweep(eraser, settings.history_retention_days,
                                       settings.session_ttl_seconds)
    if any(counts.values()):
        log.info("privacy sweep: %s", counts)
    return counts
