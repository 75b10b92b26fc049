"""Bearer tokens: HS256 JWTs signed with AUTH_SECRET, subject = user id.

With no AUTH_SECRET set, `backbone up` (and `serve`, `token`) use a secret kept
in `<DATA_DIR>/auth-secret`, created once with mode 0600, so tokens printed by
one command are accepted by the app of the next.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import replace

import jwt
from starlette.requests import Request

from app.errors import Unauthorized
from app.settings import Settings
from app.stores.keys import USER_ID

ALGORITHM = "HS256"
DEFAULT_TTL_SECONDS = 30 * 86400
# A stream token opens one session's event streams, and nothing else, for as long as
# a turn's events are kept (app.chat.event_log.TTL_SECONDS).
STREAM_SCOPE = "session-events"
STREAM_TOKEN_SECONDS = 600


def with_secret(settings: Settings) -> Settings:
    """Settings whose auth_secret is set: from the environment, else from the data folder."""
    if settings.auth_secret:
        return settings
    path = settings.data_dir / "auth-secret"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return replace(settings, auth_secret=path.read_text().strip())


def issue_token(secret: str, user: str, ttl_seconds: int = DEFAULT_TTL_SECONDS,
                claims: dict[str, str] | None = None) -> str:
    """An HS256 token for `user`; `claims` adds more (a tenant claim, say)."""
    if not USER_ID.fullmatch(user):
        raise ValueError("user ids are 1-64 of A-Z a-z 0-9 _ . @ -")
    now = int(time.time())
    body = {**(claims or {}), "sub": user, "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(body, secret, ALGORITHM)


def verify_token(secret: str, token: str) -> str:
    try:
        # A token without `exp` would be valid forever: refuse it rather than trust it.
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the token has expired") from None
    except jwt.PyJWTError as e:
        raise Unauthorized(f"invalid token: {e}") from None
    if "scope" in claims:  # a stream token: useless as a bearer token
        raise Unauthorized("a stream token only opens its session's event stream "
                           "(GET /v1/sessions/{sid}/events?token=...)")
    user = claims.get("sub")
    if not isinstance(user, str) or not USER_ID.fullmatch(user):
        raise Unauthorized("the token's subject is not a valid user id")
    return user


def issue_stream_token(secret: str, user: str, sid: str,
                       ttl_seconds: int = STREAM_TOKEN_SECONDS) -> str:
    """A short-lived token for one user's one session's event streams: what a browser's
    EventSource, which cannot send headers, puts in the URL to resume a turn."""
    now = int(time.time())
    return jwt.encode({"sub": user, "sid": sid, "scope": STREAM_SCOPE, "iat": now,
                       "exp": now + ttl_seconds}, secret, ALGORITHM)


def verify_stream_token(secret: str, token: str, sid: str) -> str:
    """The user of a stream token for this session; 401 for anything else (a bearer
    token, another session's stream token, an expired or forged one)."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM],
                            options={"require": ["sub", "exp", "sid", "scope"]})
    except jwt.ExpiredSignatureError:
        raise Unauthorized("the stream token has expired") from None
    except jwt.PyJWTError as e:
        raise Unauthorized(f"invalid stream token: {e}") from None
    user = claims.get("sub")
    if claims.get("scope") != STREAM_SCOPE or claims.get("sid") != sid:
        raise Unauthorized("this stream token is for another session's events")
    if not isinstance(user, str) or not USER_ID.fullmatch(user):
        raise Unauthorized("the token's subject is not a valid user id")
    return user


def bearer_token(request: Request) -> str:
    """The token of a request's `Authorization: Bearer <token>`; 401 without one.
    `app.identity.Authenticator` verifies it."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send Authorization: Bearer <token> (make one with `backbone token`)")
    return token.strip()
