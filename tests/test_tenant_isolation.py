"""A tenant's documents answer that tenant's users and no one else.

The tenant comes from the token (AUTH_TENANT_CLAIM, here `org_id`) and reaches
kb_search through the turn's ToolContext. Two tenants whose ids differ only by
case are two tenants; a lookalike id (a Cyrillic a, U+0430) is refused at the door; a
user of another tenant, or of none, never reads a tenant's document, neither
from the search nor from a cache entry that tenant's users made.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import redis
from sse import Frame
from starlette.testclient import TestClient
from test_fuzz import _turn

from app.api import create_app
from app.auth import issue_token
from app.cli import main
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings

QUESTION = "What is the heron gate code?"
CODES = {"upper": "7731-TEAL-MAPLE", "lower": "5590-RUST-CEDAR"}


@pytest.fixture(scope="module")
def tenants() -> dict[str, str]:
    base = f"Acme{uuid.uuid4().hex[:8]}"
    return {"upper": base, "lower": base.lower()}  # one id in two cases: two tenants


@pytest.fixture(scope="module")
def tenant_client(
    settings: Settings, tenants: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TestClient]:
    r = redis.Redis.from_url(settings.redis_url or "")
    for which, tid in tenants.items():
        folder: Path = tmp_path_factory.mktemp(f"kb-{which}")
        (folder / "heron-gate.md").write_text(
            f"# Heron gate\n\nThe heron gate code is {CODES[which]}. Staff of this company "
            "open the heron gate at the east dock with it.\n")
        ingest_paths(r, shared_embedder(), [folder], scope=f"tenant:{tid}", progress=False)
    r.close()
    s = dataclasses.replace(settings, auth_tenant_claim="org_id")
    with TestClient(create_app(s)) as c:
        yield c


def _headers(settings: Settings, user: str, tenant: str | None) -> dict[str, str]:
    claims = {"org_id": tenant} if tenant is not None else None
    token = issue_token(settings.auth_secret or "", user, claims=claims)
    return {"Authorization": f"Bearer {token}"}


def _ask(client: TestClient, settings: Settings, user: str, tenant: str | None,
         r: redis.Redis, pg: psycopg.Connection[Any]) -> tuple[str, list[Frame]]:
    h = _headers(settings, user, tenant)
    sid = client.post("/v1/sessions", headers=h).json()["id"]
    got = _turn(client, r, pg, sid, h, {"content": QUESTION})
    history = client.get(f"/v1/sessions/{sid}", headers=h).json()
    return json.dumps([f.data for f in got]) + json.dumps(history), got


def _cached_parts(frames: list[Frame]) -> set[str]:
    return {p for f in frames if f.event == "tool.result" for p in f.data.get("cached_parts", ())}


def test_a_tenants_document_answers_its_users_and_no_one_else(
    tenant_client: TestClient, settings: Settings, tenants: dict[str, str],
    r: redis.Redis, pg: psycopg.Connection[Any],
) -> None:
    upper, lower = tenants["upper"], tenants["lower"]
    run = uuid.uuid4().hex[:6]
    first, _ = _ask(tenant_client, settings, f"ann-{run}", upper, r, pg)
    assert CODES["upper"] in first and CODES["lower"] not in first

    # A second user of the same tenant reads it too, from the tenant's cache entry.
    second, frames = _ask(tenant_client, settings, f"ben-{run}", upper, r, pg)
    assert CODES["upper"] in second and CODES["lower"] not in second
    assert "tenant" in _cached_parts(frames)

    # The tenant whose id differs only by case is another tenant: its own code only,
    # never a cache entry of the other's.
    other_case, frames = _ask(tenant_client, settings, f"cat-{run}", lower, r, pg)
    assert CODES["lower"] in other_case and CODES["upper"] not in other_case
    assert "tenant" not in _cached_parts(frames)

    # Another tenant, and a user with no tenant, read neither.
    for tenant in (f"Globex{run}", None):
        text, _ = _ask(tenant_client, settings, f"dan-{run}", tenant, r, pg)
        assert CODES["upper"] not in text and CODES["lower"] not in text


@pytest.mark.parametrize("lookalike", ["\u0430", "\uff41", "\u200b"])
def test_a_token_for_a_lookalike_tenant_id_is_refused(
    tenant_client: TestClient, settings: Settings, tenants: dict[str, str], lookalike: str,
) -> None:
    base = tenants["upper"]
    tid = base + lookalike if lookalike == "\u200b" else lookalike + base[1:]
    token = jwt.encode({"sub": "eve", "org_id": tid, "exp": int(time.time()) + 60},
                       settings.auth_secret or "", "HS256")
    res = tenant_client.get("/v1/sessions", headers={"Authorization": f"Bearer {token}"})
    assert res.status_code == 401 and "tenant" in res.json()["error"]["message"]


def test_without_a_tenant_claim_setting_a_tokens_org_id_is_ignored(
    client: TestClient, settings: Settings, tenants: dict[str, str],
    r: redis.Redis, pg: psycopg.Connection[Any],
) -> None:
    """The embedded default reads no tenant, whatever the token carries."""
    text, _ = _ask(client, settings, f"fay-{uuid.uuid4().hex[:6]}", tenants["upper"], r, pg)
    assert CODES["upper"] not in text


def test_backbone_token_puts_the_tenant_in_the_configured_claim(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    secret = "a-cli-test-secret-of-sufficient-length-0123"
    monkeypatch.setenv("AUTH_SECRET", secret)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AUTH_TENANT_CLAIM", "org_id")
    assert main(["token", "--user", "gil", "--tenant", "Acme"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), secret, algorithms=["HS256"])
    assert claims["sub"] == "gil" and claims["org_id"] == "Acme"
    monkeypatch.delenv("AUTH_TENANT_CLAIM")
    assert main(["token", "--user", "gil", "--tenant", "Acme"]) == 2  # no claim to put it in
