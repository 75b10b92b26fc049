from __future__ import annotations

import redis
from starlette.testclient import TestClient

from app import indexes
from app.api import create_app
from app.settings import Settings


def test_healthz_answers_while_the_process_is_up(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        res = client.get("/healthz")
    assert res.status_code == 200 and res.json() == {"status": "ok"}


def test_readyz_is_200_with_every_check_true_on_prepared_stores(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        res = client.get("/readyz")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["ready"] is True
    assert set(body["checks"]) == {"redis", "redis_modules", "indexes", "postgres", "migrations"}
    assert all(body["checks"].values())


def test_readyz_is_503_naming_the_failed_check_when_an_index_is_missing(
    settings: Settings, r: redis.Redis
) -> None:
    indexes.index(r, "memory").delete(drop=False)
    try:
        with TestClient(create_app(settings)) as client:
            res = client.get("/readyz")
        assert res.status_code == 503
        assert res.json()["checks"]["indexes"] is False
        assert res.json()["checks"]["postgres"] is True
    finally:
        indexes.create_all(r)


def test_an_unknown_route_gets_the_json_error_body(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        res = client.get("/no/such/thing")
    assert res.status_code == 404
    assert res.json()["error"]["code"] == "not_found"
