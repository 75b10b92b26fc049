from __future__ import annotations

import threading

import pytest
import redis
from starlette.testclient import TestClient

from app import api
from app.api import create_app
from app.embeddings import Embedder
from app.settings import Settings
from app.stores import indexes
from tests.waits import wait_until


class SlowToLoad(Embedder):
    """The packaged model, whose warm-up waits until the test lets it go."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.release = threading.Event()
        self.fail = fail

    def warm(self) -> None:
        assert self.release.wait(30)
        if self.fail:
            raise OSError("model file unreadable")
        super().warm()


def test_healthz_answers_while_the_process_is_up(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        res = client.get("/healthz")
    assert res.status_code == 200 and res.json() == {"status": "ok"}


def test_readyz_is_200_with_every_check_true_on_prepared_stores(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, "the model to warm up", 60)
        res = client.get("/readyz")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["ready"] is True
    assert set(body["checks"]) == {
        "redis", "redis_modules", "indexes", "postgres", "migrations", "model", "identity"
    }
    assert all(body["checks"].values())


def test_readyz_waits_for_the_embedding_model_while_healthz_answers_at_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowToLoad()
    monkeypatch.setattr(api, "shared_embedder", lambda *a, **k: slow)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        res = client.get("/readyz")
        assert res.status_code == 503
        checks = res.json()["checks"]
        assert checks.pop("model") is False and all(checks.values()), checks
        slow.release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, "the model to load", 60)
        assert client.get("/readyz").json()["checks"]["model"] is True


def test_readyz_names_the_error_when_the_model_fails_to_load(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = SlowToLoad(fail=True)
    broken.release.set()
    monkeypatch.setattr(api, "shared_embedder", lambda *a, **k: broken)
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: broken.warm_error is not None, "the warm-up to fail")
        res = client.get("/readyz")
    assert res.status_code == 503
    assert res.json()["checks"]["model"] is False
    assert "model file unreadable" in res.json()["errors"]["model"]


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
