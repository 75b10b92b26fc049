"""A Redis Stack for benchmarks: REDIS_URL when set, else the embedded launcher on a free port."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import redis

from app.stack.embedded import EmbeddedRedis, free_port


@contextlib.contextmanager
def bench_redis() -> Iterator[redis.Redis]:
    url = os.environ.get("REDIS_URL")
    if url:
        client = redis.Redis.from_url(url)
        yield client
        client.close()
        return
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp), free_port())
        client = redis.Redis.from_url(server.start())
        try:
            yield client
        finally:
            client.close()
            server.stop()


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
