"""A turn survives its client: two app processes share one Redis, the client
disconnects from one and resumes on the other with Last-Event-ID, its text
deltas coalesced (a token every 10 ms, one delta at most every 25 ms)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from live import app_process
from sse import Frame, frames

from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings
from tests.conftest import BOTH_TOPOLOGIES

pytestmark = BOTH_TOPOLOGIES
Headers = Callable[[str], dict[str, str]]
CORPUS = Path(__file__).resolve().parent.parent / "app" / "kb" / "corpus"


def _read_some(base: str, sid: str, h: dict[str, str], n: int) -> list[Frame]:
    """POST a question, read n events, then drop the connection."""
    lines: list[str] = []
    with httpx.Client(timeout=60) as client, client.stream(
        "POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
        json={"content": "How does Redis persist data with AOF?"},
    ) as res:
        assert res.status_code == 200
        for line in res.iter_lines():
            lines.append(line)
            if len(frames([*lines, ""])) >= n and line == "":
                break
    return frames([*lines, ""])[:n]


def test_a_client_that_drops_mid_turn_resumes_on_another_node_and_gets_the_rest(
    settings: Settings, token_for: Headers, user: str
) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(), [CORPUS], progress=False)
    client.close()
    h = token_for(user)
    pace = {"OFFLINE_TOKEN_DELAY_MS": "10", "STREAM_COALESCE_MS": "25"}
    with app_process(settings, **pace) as (node_a, _), app_process(settings, **pace) as (node_b, _):
        sid = httpx.post(f"{node_a}/v1/sessions", headers=h).json()["id"]
        head = _read_some(node_a, sid, h, 4)
        assert [f.event for f in head[:2]] == ["tool.call", "tool.result"]
        assert head[-1].event == "message.delta"

        with httpx.Client(timeout=60) as c, c.stream(
            "GET", f"{node_b}/v1/sessions/{sid}/events",
            headers={**h, "Last-Event-ID": head[-1].id or ""},
        ) as res:
            assert res.status_code == 200
            tail = frames(res.iter_lines())

        assert tail[0].id != head[-1].id and tail[-1].event == "message.done"
        deltas = [f.data["text"] for f in [*head, *tail] if f.event == "message.delta"]
        answer = "".join(deltas)
        assert answer == tail[-1].data["message"]["content"]
        assert any(len(d.split()) > 1 for d in deltas)  # the resumed events were coalesced
        ids = [f.id or "" for f in [*head, *tail]]
        assert len(set(ids)) == len(ids)

        # The turn finished although its first client left: the history holds it.
        deadline = time.monotonic() + 10
        while True:
            history = httpx.get(f"{node_b}/v1/sessions/{sid}", headers=h).json()["messages"]
            if history[-1]["role"] == "assistant" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
        assert history[-1]["content"] == answer
