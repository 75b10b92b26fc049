"""The commands of the README and the docs/ pages run as printed on a fresh clone: the
`backbone` table is complete, no command relies on the venv being on PATH, the README's
tour and the resume example work."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from docs_pages import DOCS, README, ROOT, pages, section, shell_blocks
from live import app_process

from app.cli import parser
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings

Headers = Callable[[str], dict[str, str]]
SCRIPTS = ("backbone", "rq-dashboard")
OPERATIONS = (DOCS / "operations.md").read_text()
CHAT = (DOCS / "chat-and-streaming.md").read_text()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_no_command_in_the_readme_or_docs_assumes_the_venv_is_on_path() -> None:
    bare = re.compile(r"(?<!\.venv/bin/)\b(?:backbone [a-z]|rq-dashboard --)")
    texts = pages()
    assert len(texts) > 2
    assert [(p.name, line) for p, t in texts.items() for line in t.splitlines()
            if bare.search(line)] == []
    everything = "\n".join(texts.values())
    for script in SCRIPTS:  # the name the docs give is the script pip installs
        assert f".venv/bin/{script}" in everything
        assert (Path(sys.executable).parent / script).exists()


def test_the_backbone_table_lists_every_subcommand_and_its_actions() -> None:
    table = section(OPERATIONS, "The `backbone` command")
    rows = [line for line in table.splitlines() if line.startswith("| `.venv/bin/backbone ")]
    for name, sub in _subcommands().items():
        row = next((r for r in rows if r.startswith(f"| `.venv/bin/backbone {name}")), None)
        assert row is not None, f"backbone {name} is missing from the docs/operations.md table"
        for action in sub._actions:
            if action.choices and not action.option_strings:
                assert "\\|".join(str(c) for c in action.choices) in row, row


def test_every_backbone_subcommand_a_shell_block_runs_exists() -> None:
    known = set(_subcommands())
    used = {m for t in pages().values() for block in shell_blocks(t)
            for m in re.findall(r"\.venv/bin/backbone ([a-z-]+)", block)}
    assert used and used <= known, used - known


def _resume_example() -> str:
    start = CHAT.index("Resuming with curl")
    block = CHAT[CHAT.index("```sh\n", start) + 6:]
    return block[: block.index("```")]


def _tour(redis_url: str, user: str) -> str:
    """The tour's shell blocks as one script, aimed at the test's stores: the embedded
    port 6380 becomes the test's Redis URL, alice the test's fresh user."""
    script = "\n".join(shell_blocks(section(README.read_text(), "A two-minute tour")))
    assert script.startswith("BASE=http://127.0.0.1:8000\n")
    assert script.count("redis-cli -p 6380 ") >= 3 and "--user alice" in script
    script = script.replace("redis-cli -p 6380 ", f"redis-cli -u {redis_url} ")
    return script.replace("--user alice", f"--user {user}").split("\n", 1)[1]


NO_REDIS_CLI = "no redis-cli (apt install redis-tools)"


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason=NO_REDIS_CLI)
def test_the_readmes_tour_runs_as_printed(
    settings: Settings, token_for: Headers, user: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(), [ROOT / "app" / "kb" / "corpus"], progress=False)
    client.close()
    (tmp_path / ".venv").mkdir()  # the tour runs .venv/bin/backbone from the clone's root
    (tmp_path / ".venv" / "bin").symlink_to(Path(sys.executable).parent)
    with app_process(settings) as (base, _):
        run = subprocess.run(
            ["bash", "-ec", f"BASE={base}\n{_tour(settings.redis_url or '', user)}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=180,
            env={**os.environ, "AUTH_SECRET": settings.auth_secret or "",
                 "REDIS_URL": settings.redis_url or "",
                 "DATABASE_URL": settings.database_url or ""},
        )
        assert run.returncode == 0, run.stderr
        out = run.stdout.replace("\r", "")
        sid = re.search(r"^session ([0-9a-f]{32})$", out, re.M)
        assert sid, out[:500]
        # The token the tour made is the user's: the session is theirs.
        got = httpx.get(f"{base}/v1/sessions/{sid.group(1)}", headers=token_for(user))
        assert got.status_code == 200
        roles = [m["role"] for m in got.json()["messages"]]
    assert "event: tool.call" in out and out.count("event: message.done") == 1
    assert f"{base}/#token=" in out
    assert re.search(r'^backbone_turns_total\{outcome="done"\} [1-9]', out, re.M)
    assert re.search(r"^idx:cache$", out, re.M) and re.search(r"^idx:kb$", out, re.M)
    # redis-cli exits 0 on an error reply: each inspection shows what it should instead.
    assert re.search(r"^kb_search\nquery\n", out, re.M)  # FT.SEARCH idx:cache ... RETURN
    assert re.search(r"^index_name\nidx:kb$", out, re.M)  # FT.INFO idx:kb
    assert json.dumps(roles, separators=(",", ":")) in out  # JSON.GET ... '$[*].role'
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert "session:{<sid>}" in out  # backbone keys' family table


def test_the_resume_example_runs_as_printed(
    settings: Settings, token_for: Headers, user: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(settings.redis_url or "")
    ingest_paths(client, shared_embedder(), [ROOT / "app" / "kb" / "corpus"], progress=False)
    client.close()
    h = token_for(user)
    token = h["Authorization"].removeprefix("Bearer ")
    script = _resume_example()
    assert script.startswith("BASE=")
    with app_process(settings, OFFLINE_TOKEN_DELAY_MS="40") as (base, _):
        body = script.split("\n", 1)[1]
        run = subprocess.run(
            ["bash", "-ec", f"BASE={base}; TOKEN={token}\n{body}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        first = (tmp_path / "first.txt").read_bytes().decode()
        # The trap the docs warn about: the id line really ends in CRLF.
        assert re.search(r"^id: \S+\r$", first, re.MULTILINE)
        resumed = run.stdout.replace("\r", "")
        assert resumed.count("event: message.done") == 2  # once per resume
        assert "event: tool.call" not in resumed  # neither replays what was already read

        last_id = re.findall(r"^id: (\S+)\r$", first, re.MULTILINE)[-1]
        # Unstripped, curl sends the \r inside the header and uvicorn refuses it.
        raw = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
             "-H", f"Authorization: {h['Authorization']}", "-H", f"Last-Event-ID: {last_id}\r",
             f"{base}/v1/sessions/{'0' * 32}/events"],
            capture_output=True, text=True, timeout=30,
        )
        assert raw.stdout == "400"

        # A trailing \r that reaches the app (percent-encoded) is stripped, not a 400.
        listed = httpx.get(f"{base}/v1/sessions", headers=h).json()["sessions"]
        got = httpx.get(f"{base}/v1/sessions/{listed[0]['id']}/events",  # the script's
                        params={"after": last_id + "\r"}, headers=h, timeout=30)
        assert got.status_code == 200 and "event: message.done" in got.text
