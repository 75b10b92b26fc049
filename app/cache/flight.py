"""Single-flight: of concurrent misses for one cache entry, on any node, one runs the tool.

The entry's key hash names a lock, `cache-flight:<tool>:<hash>` (the same hash
as the entry, so the same scope, model and canonical arguments: identical and
near-identical questions, `What is X?` and `  what is x`, share it). The first
miss takes it with `SET NX PX` and a random token (in one round trip with a
second look at the entry), runs the tool, stores the result and releases the
lock in the store's round trip (`release_flight`, only with its token). Every
other miss meanwhile waits: it polls the entry and the lock in one round trip,
10 ms apart at first and then up to 50 ms, and takes the leader's result as
soon as it is stored. It stops waiting after its bound, or as soon as the lock
is gone without an entry (the leader's tool failed, or its node died and the
lock expired), and runs the tool itself. The lock lives as long as the tool
may run (TOOL_TIMEOUT_SECONDS), so a dead leader holds the others up at most
that long, and each of them at most its own bound.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis

from app.cache.protocol import CacheHit
from app.stores import scripts

FIRST_POLL_SECONDS = 0.01
LAST_POLL_SECONDS = 0.05
# Poll: (the entry's hit if it is there and may be served, whether the lock is still held).
Poll = Callable[[], Awaitable[tuple[CacheHit | None, bool]]]


@dataclass(frozen=True)
class Claim:
    lock: str
    token: str
    leader: bool


def claim_in(pipe: Any, lock: str, ttl_seconds: float) -> str:
    """Queue the claim (`SET NX PX`) on a pipeline, so the look at the entry that must
    follow it shares its round trip; returns the token. The pipeline's reply to it
    says whether this caller leads (`claimed`)."""
    token = secrets.token_hex(16)
    pipe.set(lock, token, nx=True, px=max(int(ttl_seconds * 1000), 1))
    return token


def claimed(lock: str, token: str, reply: Any) -> Claim:
    return Claim(lock, token, bool(reply))


def release_in(pipe: Any, held: Claim) -> None:
    """Queue the release on a pipeline (the store's: one round trip for both)."""
    if held.leader:
        call = scripts.release_flight(held.lock, held.token)
        # EVAL, not EVALSHA: after a Redis restart the script cache is empty, and a
        # NOSCRIPT inside the store's MULTI would fail the whole store.
        pipe.eval(call.script.source, call.script.numkeys, *call.keys, *call.args)


async def release(redis: aredis.Redis, held: Claim) -> None:
    """Drop the lock, only if this claim still holds it (it may have expired)."""
    if held.leader:
        await scripts.arun(redis, scripts.release_flight(held.lock, held.token))


async def wait(poll: Poll, bound_seconds: float) -> CacheHit | None:
    """The leader's result once stored; None when the bound passes or the leader gave up."""
    deadline = time.monotonic() + bound_seconds
    pause = FIRST_POLL_SECONDS
    while True:
        hit, held = await poll()
        if hit is not None:
            return hit
        if not held:
            # One more look: the leader stores, then releases.
            hit, _ = await poll()
            return hit
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, LAST_POLL_SECONDS)
