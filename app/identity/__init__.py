"""Who is calling: a bearer token verified into an `Identity` (user, tenant).

Two ways, chosen by the settings, never both:

- the embedded default (no AUTH_JWKS_URL): HS256 tokens signed with AUTH_SECRET,
  as `backbone token` makes them (app.auth);
- an identity provider (AUTH_JWKS_URL): RS256/ES256 tokens (AUTH_ALGORITHMS) checked
  against the provider's published keys (app.identity.jwks), its issuer
  (AUTH_ISSUER) and audience (AUTH_AUDIENCE). A token whose header names another
  algorithm is refused before any key is looked at: an HS256 token "signed" with
  the provider's public key (algorithm confusion) and `alg: none` are 401.

Either way `exp` is required (from a provider with LEEWAY_SECONDS of clock
skew; the local HS256 tokens with none, as before), the user id is the
AUTH_USER_CLAIM claim (default `sub`) and must match the id rules of
app.stores.keys, and with AUTH_TENANT_CLAIM set the tenant id is that claim (same
rules; absent: no tenant). A verified token is remembered until it expires
(at most CACHE_SIZE of them), so a turn pays for no signature check.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

from app.auth import STREAM_SCOPE
from app.errors import Unauthorized
from app.identity.jwks import JwksKeys
from app.settings import Settings
from app.stores.keys import USER_ID

LEEWAY_SECONDS = 30
CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Identity:
    user: str
    tenant: str | None = None


def user_digest(user: str) -> str:
    """What names an erased user (app.privacy) or a shared cache entry's creator
    without holding the id itself: SHA-256 hex, first 32 digits."""
    return hashlib.sha256(f"backbone-user\n{user}".encode()).hexdigest()[:32]


class Authenticator:
    def __init__(self, settings: Settings) -> None:
        self.secret = settings.auth_secret or ""
        self.issuer = settings.auth_issuer
        self.audience = settings.auth_audience
        self.user_claim = settings.auth_user_claim
        self.tenant_claim = settings.auth_tenant_claim
        self.jwks = JwksKeys(settings.auth_jwks_url) if settings.auth_jwks_url else None
        self.algorithms = list(settings.auth_algorithms) if self.jwks else ["HS256"]
        # The embedded default stays as strict as it always was: its tokens are made
        # on the same machine's clock.
        self.leeway = LEEWAY_SECONDS if self.jwks else 0
        self._verified: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    async def start(self) -> None:
        """The first JWKS fetch (the app's lifespan runs it; /readyz reports it)."""
        if self.jwks is not None:
            await self.jwks.refresh()

    @property
    def ready(self) -> bool:
        return self.jwks is None or self.jwks.loaded

    @property
    def error(self) -> str | None:
        return None if self.jwks is None or self.jwks.loaded else (
            self.jwks.error or "the JWKS was not fetched yet")

    async def identity(self, token: str) -> Identity:
        now = time.time()
        hit = self._verified.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        claims = await self._claims(token)
        who = self._identity(claims)
        self._verified[token] = (who, float(claims["exp"]) + self.leeway)
        if len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return who

    async def _claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthorized(f"the token's algorithm {alg!r} is not accepted "
                               f"(accepted: {', '.join(self.algorithms)})")
        key: Any = self.secret
        if self.jwks is not None:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise Unauthorized("the token's kid is not a string")
            found = await self.jwks.key(kid)
            if found is None:
                raise Unauthorized(f"the token's signing key {kid!r} is not in the JWKS")
            key = found  # PyJWT verifies with the key's own algorithm, never the header's
        required = ["exp", self.user_claim]
        if self.issuer:
            required.append("iss")
        if self.audience:
            required.append("aud")
        try:
            # A token without `exp` would be valid forever: refuse it rather than trust it.
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], issuer=self.issuer, audience=self.audience,
                leeway=self.leeway,
                options={"require": required, "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("the token has expired") from None
        except jwt.PyJWTError as e:
            raise Unauthorized(f"invalid token: {e}") from None
        if self.jwks is None and claims.get("scope") == STREAM_SCOPE:
            # Signed with the same secret, but it opens one session's events only.
            raise Unauthorized("a stream token only opens its session's event stream "
                               "(GET /v1/sessions/{sid}/events?token=...)")
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        user = claims.get(self.user_claim)
        if not isinstance(user, str) or not USER_ID.fullmatch(user):
            raise Unauthorized(f"the token's {self.user_claim} is not a valid user id "
                               "(1-64 of A-Z a-z 0-9 _ . @ -)")
        tenant = claims.get(self.tenant_claim) if self.tenant_claim else None
        if tenant is not None and (not isinstance(tenant, str) or not USER_ID.fullmatch(tenant)):
            raise Unauthorized(f"the token's {self.tenant_claim} is not a valid tenant id "
                               "(1-64 of A-Z a-z 0-9 _ . @ -)")
        return Identity(user, tenant)
