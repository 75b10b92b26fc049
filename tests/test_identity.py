"""Tokens from an identity provider: RS256/ES256 verified against a JWKS served over HTTP.

The JWKS server is real HTTP on loopback (tests/jwks_server.py) with real keys;
the app fetches it with its own client. Rotation, forged kids, algorithm
confusion, `alg: none`, issuer, audience, expiry, claims and an unreachable
provider are each driven through `Authenticator` and, where the HTTP answer
matters, through the app.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import jwt
import pytest
from jwks_server import AUDIENCE, ISSUER, JwksServer, SigningKey, serve_jwks
from starlette.testclient import TestClient

from app.api import create_app
from app.errors import IdentityUnavailable, SettingsError, Unauthorized
from app.identity import Authenticator, Identity
from app.settings import Settings

pytestmark = pytest.mark.anyio

KEY_A = SigningKey.rsa("rsa-a")
KEY_B = SigningKey.rsa("rsa-b")
KEY_EC = SigningKey.ec("ec-1")


def idp_settings(url: str, **more: object) -> Settings:
    return dataclasses.replace(
        Settings.from_env({}), auth_secret="unused-local-secret-0123456789abcdef",
        auth_jwks_url=url, auth_issuer=ISSUER, auth_audience=AUDIENCE, **more)


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    with serve_jwks(KEY_A, KEY_EC) as server:
        yield server


async def started(server: JwksServer, **more: object) -> Authenticator:
    auth = Authenticator(idp_settings(server.url, **more))
    await auth.start()
    return auth


def _age(auth: Authenticator, seconds: float) -> None:
    """As if the last JWKS fetch had been `seconds` ago (no sleeping in tests)."""
    assert auth.jwks is not None
    auth.jwks.tried_at = (auth.jwks.tried_at or 0) - seconds
    auth.jwks.fetched_at = (auth.jwks.fetched_at or 0) - seconds


async def test_an_rs256_and_an_es256_token_from_the_jwks_are_accepted(idp: JwksServer) -> None:
    auth = await started(idp)
    assert await auth.identity(KEY_A.sign()) == Identity("alice")
    assert await auth.identity(KEY_EC.sign(sub="bob")) == Identity("bob")


async def test_a_rotated_key_is_fetched_once_for_its_new_kid(idp: JwksServer) -> None:
    auth = await started(idp)
    assert idp.hits == 1
    idp.keys = [KEY_A, KEY_B]  # the provider publishes the next key, then signs with it
    _age(auth, 60)
    assert await auth.identity(KEY_B.sign(sub="carol")) == Identity("carol")
    assert idp.hits == 2
    idp.keys = [KEY_B]  # A retired: tokens A signed stop working at the next refetch
    _age(auth, 600)
    with pytest.raises(Unauthorized, match="rsa-a"):
        await auth.identity(KEY_A.sign(sub="dave"))
    assert await auth.identity(KEY_B.sign(sub="erin")) == Identity("erin")


async def test_forged_kids_make_at_most_one_refetch(idp: JwksServer) -> None:
    auth = await started(idp)
    _age(auth, 60)
    for n in range(50):
        with pytest.raises(Unauthorized, match="not in the JWKS"):
            await auth.identity(KEY_A.sign(kid=f"forged-{n}"))
    assert idp.hits == 2  # the start, then one refetch for all fifty


async def test_an_hs256_token_signed_with_the_public_key_is_refused(idp: JwksServer) -> None:
    auth = await started(idp)
    now = int(time.time())
    body = {"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300}
    # What a confused verifier would accept: HMAC keyed with the public key's PEM.
    pem = KEY_A.public_pem()
    signing_input = b".".join(
        base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=")
        for part in ({"alg": "HS256", "typ": "JWT", "kid": KEY_A.kid}, body))
    sig = base64.urlsafe_b64encode(hmac.new(pem, signing_input, hashlib.sha256).digest())
    forged = (signing_input + b"." + sig.rstrip(b"=")).decode()
    with pytest.raises(Unauthorized, match="HS256"):
        await auth.identity(forged)


async def test_an_unsigned_alg_none_token_is_refused(idp: JwksServer) -> None:
    auth = await started(idp)
    now = int(time.time())
    unsigned = jwt.encode({"sub": "mallory", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 60},
                          None, algorithm="none", headers={"kid": KEY_A.kid})
    with pytest.raises(Unauthorized, match="none"):
        await auth.identity(unsigned)


async def test_an_rsa_key_cannot_verify_a_token_whose_header_says_es256(
    idp: JwksServer,
) -> None:
    auth = await started(idp)
    token = KEY_EC.sign(kid=KEY_A.kid)  # ES256 signature, naming the RSA key
    with pytest.raises(Unauthorized):
        await auth.identity(token)


@pytest.mark.parametrize(("claims", "reason"), [
    ({"exp": None}, "exp"),
    ({"iss": "https://evil.test/realms/acme"}, "issuer|iss"),
    ({"iss": None}, "iss"),
    ({"aud": "another-client"}, "audience|aud"),
    ({"aud": None}, "aud"),
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"sub": None}, "sub"),
    ({"sub": "al ice"}, "not a valid user id"),
])
async def test_a_token_failing_a_claim_check_is_refused(
    idp: JwksServer, claims: dict[str, object], reason: str,
) -> None:
    auth = await started(idp)
    with pytest.raises(Unauthorized, match=f"(?i){reason}"):
        await auth.identity(KEY_A.sign(claims))


async def test_a_token_just_past_exp_is_accepted_within_the_clock_skew_leeway(
    idp: JwksServer,
) -> None:
    auth = await started(idp)
    assert await auth.identity(KEY_A.sign(exp=int(time.time()) - 5)) == Identity("alice")


async def test_the_user_and_tenant_come_from_the_configured_claims(idp: JwksServer) -> None:
    auth = await started(idp, auth_user_claim="preferred_username",
                         auth_tenant_claim="org_id")
    token = KEY_A.sign(sub="0f9c-uuid", preferred_username="alice@acme", org_id="Acme")
    assert await auth.identity(token) == Identity("alice@acme", "Acme")
    assert await auth.identity(KEY_A.sign(preferred_username="bob")) == Identity("bob")
    lookalike = KEY_A.sign(preferred_username="carol", org_id="\u0430cme")  # Cyrillic a (U+0430)
    with pytest.raises(Unauthorized, match="tenant"):
        await auth.identity(lookalike)


async def test_a_jwks_unreachable_at_start_refuses_with_503_then_recovers(
    idp: JwksServer,
) -> None:
    idp.down = True
    auth = await started(idp)
    assert not auth.ready and "503" in (auth.error or "")
    with pytest.raises(IdentityUnavailable):
        await auth.identity(KEY_A.sign())
    idp.down = False
    _age(auth, 60)
    assert await auth.identity(KEY_A.sign()) == Identity("alice")
    assert auth.ready


async def test_a_stale_cache_keeps_serving_while_the_jwks_is_down(idp: JwksServer) -> None:
    auth = await started(idp)
    idp.down = True
    _age(auth, 3600)  # long past the cache's TTL
    assert await auth.identity(KEY_A.sign(sub="frank")) == Identity("frank")
    assert idp.hits == 2 and auth.ready  # it tried, failed, and served the cached key


def test_hs_and_none_algorithms_are_refused_as_settings() -> None:
    for bad in ("HS256", "none", "RS256,HS512", ""):
        env = {"AUTH_ALGORITHMS": bad} if bad else {"AUTH_ALGORITHMS": " , "}
        with pytest.raises(SettingsError, match="AUTH_ALGORITHMS"):
            Settings.from_env(env)


def test_the_api_accepts_provider_tokens_and_readyz_reports_the_jwks(
    idp: JwksServer, settings: Settings,
) -> None:
    s = dataclasses.replace(settings, auth_jwks_url=idp.url, auth_issuer=ISSUER,
                            auth_audience=AUDIENCE)
    with TestClient(create_app(s)) as client:
        ok = client.get("/v1/sessions", headers={"Authorization": f"Bearer {KEY_A.sign()}"})
        assert ok.status_code == 200, ok.text
        local = client.get("/v1/sessions", headers={
            "Authorization": f"Bearer {jwt.encode({'sub': 'alice', 'exp': 2**31}, s.auth_secret or '', 'HS256')}"})  # noqa: E501
        assert local.status_code == 401  # the local secret no longer signs tokens
        ready = client.get("/readyz").json()
        assert ready["checks"]["identity"] is True


def test_readyz_is_503_while_the_jwks_was_never_fetched(settings: Settings) -> None:
    with serve_jwks(KEY_A) as idp:
        idp.down = True
        s = dataclasses.replace(settings, auth_jwks_url=idp.url)
        with TestClient(create_app(s)) as client:
            for _ in range(100):
                if idp.hits:
                    break
                time.sleep(0.05)
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["identity"] is False
            assert "JWKS" in ready.json()["errors"]["identity"]
            res = client.get("/v1/sessions", headers={"Authorization": f"Bearer {KEY_A.sign()}"})
            assert res.status_code == 503
            assert res.json()["error"]["code"] == "identity_unavailable"
