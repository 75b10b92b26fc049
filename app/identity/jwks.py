"""An identity provider's signing keys (its JWKS), fetched over HTTP and cached.

    JwksKeys.key(kid)
    ├── cached and fresh (younger than TTL_SECONDS)       the key
    ├── cache older than TTL_SECONDS                      refetch; on failure the stale keys serve
    ├── kid unknown                                       one refetch, at most every
    │                                                     REFETCH_MIN_SECONDS (forged kids cannot
    │                                                     make a storm), then None
    └── never fetched and the fetch fails                 IdentityUnavailable (503)

Rotation works by `kid`: a provider publishes the next key before it signs with it,
and a token naming a kid the cache has not seen yet triggers the refetch. The keys
are parsed by PyJWT (`PyJWKSet`); keys of a type PyJWT cannot use are skipped.
Fetches are single-flight: concurrent callers wait for the one in progress.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import jwt

from app.errors import IdentityUnavailable

log = logging.getLogger("backbone.identity")

TTL_SECONDS = 300.0
REFETCH_MIN_SECONDS = 30.0
FETCH_TIMEOUT_SECONDS = 5.0


class JwksKeys:
    def __init__(self, url: str, *, ttl: float = TTL_SECONDS,
                 refetch_min: float = REFETCH_MIN_SECONDS) -> None:
        self.url = url
        self.ttl = ttl
        self.refetch_min = refetch_min
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched_at: float | None = None  # monotonic time of the last good fetch
        self.tried_at: float | None = None  # of the last attempt, good or not
        self.error: str | None = None  # the last attempt's failure
        self.fetches = 0  # attempts made (tests read it)
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self.fetched_at is not None

    async def refresh(self) -> bool:
        """Fetch the JWKS now; True on success. A failure keeps the keys held."""
        async with self._lock:
            return await self._fetch()

    async def _fetch(self) -> bool:
        self.tried_at = time.monotonic()
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS) as client:
                reply = await client.get(self.url, headers={"Accept": "application/json"})
                reply.raise_for_status()
                data: Any = reply.json()
            found = jwt.PyJWKSet.from_dict(data)
        except (httpx.HTTPError, ValueError, jwt.PyJWKSetError) as e:
            self.error = f"JWKS {self.url} unusable: {type(e).__name__}: {e}"
            log.warning("%s%s", self.error, "; the cached keys keep serving" if self.keys else "")
            return False
        self.keys = {k.key_id: k for k in found.keys}
        self.fetched_at = time.monotonic()
        self.error = None
        return True

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The signing key named `kid` (None: the only key of a one-key set)."""
        now = time.monotonic()
        if self.fetched_at is None or now - self.fetched_at > self.ttl:
            await self._maybe_fetch(now)
        found = self._pick(kid)
        if found is None and self.loaded:
            await self._maybe_fetch(now)
            found = self._pick(kid)
        if found is None and not self.loaded:
            raise IdentityUnavailable(
                f"the identity provider's keys could not be fetched: {self.error}")
        return found

    def _pick(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        return self.keys.get(kid)

    async def _maybe_fetch(self, now: float) -> None:
        """Fetch unless another attempt was made within REFETCH_MIN_SECONDS."""
        tried = self.tried_at
        if self._lock.locked():  # a fetch is under way (the start's, say): use its outcome
            async with self._lock:
                return
        if tried is not None and now - tried < self.refetch_min:
            return
        async with self._lock:
            if self.tried_at != tried:  # another caller fetched while this one waited
                return
            await self._fetch()
