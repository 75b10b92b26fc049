"""The README's commands run as printed on a fresh clone: the `backbone` table is
complete, no command relies on the venv being on PATH, the resume example works."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from live import app_process

from app.cli import parser
from app.embeddings import shared_embedder
from app.kb.ingest import ingest_paths
from app.settings import Settings

Headers = Callable[[str], dict[str, str]]
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SCRIPTS = ("backbone", "rq-dashboard")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_no_readme_command_assumes_the_venv_is_on_path() -> None:
    bare = re.compile(r"(?<!\.venv/bin/)\b(?:backbone [a-z]|rq-dashboard --)")
    assert [line for line in README.splitlines() if bare.search(line)] == []
    for script in SCRIPTS:  # the name the README gives is the script pip installs
        assert f".venv/bin/{script}" in README
        assert (Path(sys.executable).parent / script).exists()


def test_the_readme_table_lists_every_backbone_subcommand_and_its_actions() -> None:
    rows = [line for line in README.splitlines() if line.startswith("| `.venv/bin/backbone ")]
    for name, sub in _subcommands().items():
        row = next((r for r in rows if r.startswith(f"| `.venv/bin/backbone {name}")), None)
        assert row is not None, f"backbone {name} is missing from the README table"
        for action in sub._actions:
            if action.choices and not action.option_strings:
                assert "\\|".join(str(c) for c in action.choices) in row, row


def _resume_example() -> str:
    start = README.index("Resuming with curl")
    block = README[README.index("```sh\n", start) + 6:]
    return block[: block.index("```")]


def test_the_readmes_resume_example_runs_as_printed(
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
        # The trap the README warns about: the id line really ends in CRLF.
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
