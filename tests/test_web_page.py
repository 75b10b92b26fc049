"""The chat page in a real headless Chromium, driven over the DevTools protocol."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from live import app_process
from waits import wait_until
from websockets.sync.client import ClientConnection, connect

from app.auth import issue_token
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings
from app.stack.embedded import free_port

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: tests/system-deps.sh should install it")
        pytest.skip("no Chromium here (tests/system-deps.sh installs Debian's chromium as root)")
    return exe


class Page:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = count(1)
        self.events: list[dict[str, Any]] = []  # CDP events received while awaiting a reply

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result. Events arriving meanwhile are kept in order."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise DevToolsError(reply)
                result: dict[str, Any] = reply["result"]
                return result
            if "method" in reply:
                self.events.append(reply)

    def next_event(self, method: str, timeout: float = 30) -> dict[str, Any] | None:
        """The params of the first `method` event not yet taken, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["method"] == method:
                    params: dict[str, Any] = self.events.pop(i)["params"]
                    return params
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                return None
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                         awaitPromise=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except DevToolsError as e:
                if NAVIGATED not in str(e):
                    raise
                value = None  # the page navigated under the evaluation: ask the new one
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {expression}")


class DevToolsError(AssertionError):
    """A DevTools command answered with an error."""


# What Chromium answers to an evaluation cut short by a navigation (location.href = ...).
NAVIGATED = "Inspected target navigated or closed"


@contextlib.contextmanager
def chromium_page() -> Iterator[Page]:
    """A headless Chromium with a fresh profile, its first tab driven over DevTools."""
    exe = _chromium()
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        port = free_port()
        proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            targets: list[dict[str, Any]] = []
            while not targets:
                if time.monotonic() > deadline:
                    raise AssertionError("Chromium's DevTools endpoint did not come up")
                try:
                    targets = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                               if t["type"] == "page"]
                except httpx.HTTPError:
                    time.sleep(0.2)
            with connect(targets[0]["webSocketDebuggerUrl"], max_size=None) as ws:
                yield Page(ws)
        finally:
            proc.terminate()
            proc.wait(10)


@pytest.fixture
def browser_page(settings: Settings) -> Iterator[tuple[Page, str]]:
    _chromium()  # skip before anything starts when there is none
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(),
                 [Path(__file__).resolve().parent.parent / "app" / "kb" / "corpus"], progress=False)
    client.close()
    with app_process(settings, OFFLINE_TOKEN_DELAY_MS="5") as (base, _), \
            chromium_page() as page:
        yield page, base


def test_a_reply_streams_into_the_page_with_a_tool_badge(
    browser_page: tuple[Page, str], settings: Settings
) -> None:
    page, base = browser_page
    token = issue_token(settings.auth_secret or "", "web-user")
    page.eval(f"location.href = {json.dumps(base + '/#token=' + token)}")
    page.wait_for("document.readyState === 'complete' && !!document.getElementById('composer')")
    page.eval("document.getElementById('input').value = 'How does AOF persistence work?';"
              "document.getElementById('send').click(); true")

    # Tokens arrive one by one: catch the reply while it is still growing.
    first = page.wait_for("document.querySelector('.msg.assistant .body')?.textContent || ''")
    done = page.wait_for(
        "document.getElementById('status').textContent.startsWith('done') && "
        "document.querySelector('.msg.assistant .body').textContent")
    assert len(done) > len(first) > 0, "the reply should stream in, not arrive at once"
    assert "[1]" in done
    assert page.eval("document.querySelector('.tool .name').textContent") == "🔧 kb_search"
    assert page.eval("document.querySelector('.tool .badge').textContent").startswith("fresh")
    # The list is refreshed after the stream ends, a moment after `done` shows: wait for it.
    assert page.wait_for("document.querySelectorAll('#sessions li').length", 10) >= 1


def test_the_side_panel_shows_memories_to_forget_and_the_cache_saving_time(
    browser_page: tuple[Page, str], settings: Settings
) -> None:
    page, base = browser_page
    user = f"web-{uuid.uuid4().hex[:8]}"
    mid = uuid.uuid4().hex
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        conn.execute("INSERT INTO memories (id, user_id, kind, content) VALUES (%s, %s, %s, %s)",
                     (mid, user, "preference", "prefers answers about Redis persistence"))
        token = issue_token(settings.auth_secret or "", user)
        page.eval(f"location.href = {json.dumps(base + '/#token=' + token)}")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('panel')")
        assert "persistence" in page.wait_for(
            "document.querySelector('#memories li .text')?.textContent || ''")
        assert page.eval("document.getElementById('cache-effect').textContent") == (
            "no tool calls yet")

        ask = ("document.getElementById('input').value = 'What is the RDB snapshot format?';"
               "document.getElementById('send').click(); true")
        r = redis.Redis.from_url(settings.redis_url or "")
        entries = set(r.scan_iter(match="cache:kb_search:*", count=1000))
        for turn in (1, 2):  # the same question twice: the second kb_search is a cache hit
            page.eval(ask)
            page.wait_for(f"document.querySelectorAll('.msg.assistant').length === {turn} && "
                          "document.getElementById('status').textContent.startsWith('done') && "
                          "!document.getElementById('send').disabled")
            # The cache stores its entry off the reply's path: on a busy machine it can
            # land after the next question's lookup, so wait for it before asking again.
            wait_until(lambda: set(r.scan_iter(match="cache:kb_search:*", count=1000))
                       - entries, "the first answer's cache entry")
        r.close()
        effect = page.wait_for(
            "document.querySelector('#cache-effect .calls')?.textContent === '2' && "
            "document.getElementById('cache-effect').textContent")
        assert effect.startswith("1 of 2 tool calls served from the cache"), effect
        saved = page.eval("Number(document.querySelector('#cache-effect .saved').textContent)")
        assert saved >= 0

        row = f"document.querySelector('#memories li[data-mid=\"{mid}\"]')"
        page.eval(f"{row}.querySelector('.forget').click(); true")
        page.wait_for(f"!{row}")
        left = conn.execute("SELECT count(*) FROM memories WHERE id = %s", (mid,)).fetchone()
    assert left == (0,)


def test_a_memories_refresh_answering_after_a_forget_does_not_bring_the_row_back(
    browser_page: tuple[Page, str], settings: Settings
) -> None:
    # The race of the test above, forced: a refresh of the list (as the end of a turn
    # starts one) is answered by the server with the row, but its answer is held in
    # Chromium (DevTools Fetch interception) until the forget button's DELETE has answered.
    page, base = browser_page
    user = f"web-{uuid.uuid4().hex[:8]}"
    mid = uuid.uuid4().hex
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        conn.execute("INSERT INTO memories (id, user_id, kind, content) VALUES (%s, %s, %s, %s)",
                     (mid, user, "preference", "prefers answers about Redis replication"))
        token = issue_token(settings.auth_secret or "", user)
        page.eval(f"location.href = {json.dumps(base + '/#token=' + token)}")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('panel')")
        row = f"document.querySelector('#memories li[data-mid=\"{mid}\"]')"
        page.wait_for(f"!!{row}")

        # Only the list's GET is held: `*/v1/memories` does not match `/v1/memories/<id>`.
        page.call("Fetch.enable", patterns=[{"urlPattern": "*/v1/memories",
                                             "requestStage": "Response"}])
        page.eval("refreshMemories(); true")
        stale = page.next_event("Fetch.requestPaused")
        assert stale is not None and stale["responseStatusCode"] == 200, stale
        page.eval("window.rowCameBack = false; new MutationObserver(() => {"
                  f"  if ({row}) window.rowCameBack = true;"
                  "}).observe(document.getElementById('memories'), {childList: true}); true")
        page.eval(f"{row}.querySelector('.forget').click(); true")
        page.wait_for(f"!{row}")
        assert conn.execute("SELECT count(*) FROM memories WHERE id = %s",
                            (mid,)).fetchone() == (0,)

        # Now the stale answer, then whatever the page asked for after the DELETE.
        held = [stale]
        while (paused := page.next_event("Fetch.requestPaused", timeout=2)) is not None:
            held.append(paused)
        done = ("performance.getEntriesByType('resource')"
                ".filter(e => e.name.endsWith('/v1/memories')).length")
        before = page.eval(done)
        for request in held:
            page.call("Fetch.continueRequest", requestId=request["requestId"])
            while (more := page.next_event("Fetch.requestPaused", timeout=0.5)) is not None:
                page.call("Fetch.continueRequest", requestId=more["requestId"])
        page.call("Fetch.disable")
        page.wait_for(f"{done} >= {before + len(held)}", 10)
        page.eval("new Promise(r => setTimeout(() => r(true), 500))")  # the answers are parsed
        assert page.eval(f"!{row} && !window.rowCameBack"), "a stale refresh put the row back"


def test_a_token_link_for_another_user_replaces_the_stored_token_only_when_confirmed(
    browser_page: tuple[Page, str], settings: Settings
) -> None:
    # Token fixation: a link carrying someone else's token must not quietly switch the
    # page to that account (the victim's chats and memories would land there).
    page, base = browser_page
    secret = settings.auth_secret or ""
    mine = issue_token(secret, "alice-web")
    theirs = issue_token(secret, "mallory-web")
    page.call("Page.enable")
    stored = "localStorage.getItem('backbone-token')"

    def open_link(token: str, n: int) -> None:
        # A query that differs each time: a full load, as a link opened in a tab is.
        page.eval(f"location.href = {json.dumps(f'{base}/?n={n}#token={token}')}; true")

    open_link(mine, 1)  # nothing stored yet: taken without a question
    page.wait_for("document.readyState === 'complete' && location.search === '?n=1'")
    assert page.eval(stored) == mine

    for n, accept in ((2, False), (3, True)):
        open_link(theirs, n)
        dialog = page.next_event("Page.javascriptDialogOpening")
        assert dialog is not None, "no confirmation was asked"
        assert dialog["type"] == "confirm"
        assert "mallory-web" in dialog["message"] and "alice-web" in dialog["message"]
        page.call("Page.handleJavaScriptDialog", accept=accept)
        page.wait_for(f"document.readyState === 'complete' && location.search === '?n={n}'")
        expected = theirs if accept else mine
        assert page.eval(stored) == expected
        assert page.eval("document.getElementById('token').value") == expected
        assert page.eval("location.hash") == "", "the token should leave the address bar"

    open_link(theirs, 4)  # the token it now holds: nothing to ask
    page.wait_for("document.readyState === 'complete' && location.search === '?n=4'")
    assert page.next_event("Page.javascriptDialogOpening", timeout=1) is None
    assert page.eval(stored) == theirs


def test_the_memory_panel_adds_a_memory_and_searches_by_meaning(
    browser_page: tuple[Page, str], settings: Settings
) -> None:
    page, base = browser_page
    user = f"web-{uuid.uuid4().hex[:8]}"
    token = issue_token(settings.auth_secret or "", user)
    page.eval(f"location.href = {json.dumps(base + '/#token=' + token)}")
    page.wait_for("document.readyState === 'complete' && !!document.getElementById('memory-new')")
    page.wait_for("document.getElementById('memories-empty').textContent === 'none yet'")
    enter = "new KeyboardEvent('keydown', {key: 'Enter', bubbles: true})"
    for fact in ("prefers window seats on long flights", "keeps bees in the garden"):
        page.eval(f"{{ const box = document.getElementById('memory-new');"
                  f" box.value = {json.dumps(fact)}; box.dispatchEvent({enter}); }} true")
        page.wait_for(f"[...document.querySelectorAll('#memories li .text')]"
                      f".some(e => e.textContent === {json.dumps(fact)})")
    page.eval("{ const q = document.getElementById('memory-search');"
              " q.value = 'Which seat on a plane?'; q.dispatchEvent(" + enter + "); } true")
    first = page.wait_for("document.querySelector('#memories li .score') && "
                          "document.querySelector('#memories li .text').textContent")
    assert first == "prefers window seats on long flights"
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        stored = conn.execute("SELECT kind, content FROM memories WHERE user_id = %s"
                              " ORDER BY content", (user,)).fetchall()
    assert stored == [("note", "keeps bees in the garden"),
                      ("note", "prefers window seats on long flights")]
