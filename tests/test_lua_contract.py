"""Every script in lua/ keeps the contract its file name and header promise."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.crc import key_slot

from app.stores import keys, scripts

SCRIPTS = sorted(scripts.load_all().values(), key=lambda s: s.name)


def header(script: scripts.LuaScript) -> str:
    m = re.match(r"--\[\[(.*?)\]\]", script.source, re.S)
    assert m, f"{script.path.name} must open with a --[[ ... ]] header"
    return m.group(1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_header_names_the_script_and_documents_every_key_argv_and_return(
    script: scripts.LuaScript,
) -> None:
    text = header(script)
    assert text.strip().startswith(f"{script.name}:"), "header opens with '<name>: what it does'"
    documented = [int(n) for n in re.findall(r"^\s*KEYS\[(\d+)\]\s+\S+\s+\S+\s+\S", text, re.M)]
    assert documented == list(range(1, script.numkeys + 1)), (
        f"{script.path.name}: header must list KEYS[1..{script.numkeys}] with name, type and role"
    )
    assert re.search(r"^\s*ARGV\[1\]", text, re.M), "header lists ARGV"
    assert re.search(r"^\s*Returns:", text, re.M), "header lists the return codes"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_body_touches_no_key_beyond_the_count_in_its_file_name(script: scripts.LuaScript) -> None:
    body = script.source.split("]]", 1)[1]
    used = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
    assert used == set(range(1, script.numkeys + 1))
    argv_documented = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", header(script))}
    argv_used = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    assert argv_used <= argv_documented, f"undocumented ARGV in {script.path.name}"


def test_a_call_with_the_wrong_number_of_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="takes 1 KEYS"):
        scripts._call("release_lock", ["a", "b"], ["token"], int)


def test_keys_of_each_multi_key_script_share_one_cluster_slot() -> None:
    sid = keys.new_session_id()
    calls: list[scripts.Call[Any]] = [
        scripts.create_session(sid, "u", 60),
        scripts.append_messages(sid, "u", 0, ["{}"], 60),
        scripts.read_session(sid, 60),
        scripts.restore_session(sid, "u", "[]", 60),
        scripts.advance_cursor(sid, "t", None, "ab", "s", 60, expected_seq=None, new_seq=1),
    ]
    for call in calls:
        slots = {key_slot(k.encode()) for k in call.keys}
        assert len(slots) == 1, f"{call.script.name}: {call.keys} span slots {slots}"


def test_every_script_file_has_a_wrapper() -> None:
    wrapped = {
        name for name in scripts.load_all() if callable(getattr(scripts, name, None))
    }
    assert wrapped == set(scripts.load_all())
