from __future__ import annotations

import pytest
from redis.crc import key_slot

from app.errors import BadRequest
from app.stores import keys


@pytest.mark.parametrize(
    "sid",
    ["*", "}", "abc", "a" * 31, "A" * 32, "0" * 31 + "}", "0" * 31 + ":", "0" * 31 + "\n",
     "0" * 33, "", "{" + "0" * 30 + "}", "0" * 16 + " " + "0" * 15],
)
def test_a_session_id_not_in_the_server_format_is_refused_before_it_becomes_a_key(sid: str) -> None:
    with pytest.raises(BadRequest) as info:
        keys.session(sid)
    assert info.value.status == 400
    assert info.value.code == "invalid_session_id"


@pytest.mark.parametrize("tool", ["*", "web:search", "kb}", "Web", "a\nb", "", "x" * 40])
def test_a_tool_name_with_key_syntax_is_refused(tool: str) -> None:
    with pytest.raises(BadRequest):
        keys.cache_prefix(tool)


def test_every_key_of_one_session_lands_in_the_same_cluster_slot() -> None:
    sid = keys.new_session_id()
    slots = {key_slot(k.encode()) for k in [*keys.session_keys(sid), keys.events(sid, 3)]}
    assert len(slots) == 1


def test_key_names_match_the_design_table() -> None:
    sid = "0123456789abcdef0123456789abcdef"
    assert keys.session(sid) == "session:{0123456789abcdef0123456789abcdef}"
    assert keys.session_user(sid) == "session:{0123456789abcdef0123456789abcdef}:user"
    assert keys.memory_lock(sid) == "memory-task-lock:{0123456789abcdef0123456789abcdef}"
    assert keys.memory_cursor(sid) == "memory-last-extracted:{0123456789abcdef0123456789abcdef}"
    assert keys.memory_summary(sid) == "memory-summary:{0123456789abcdef0123456789abcdef}"
    assert keys.cache_entry("web_search", "ab12") == "cache:web_search:ab12"


def test_new_session_ids_pass_their_own_validation_and_do_not_repeat() -> None:
    ids = {keys.new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(keys.check_session_id(i) == i for i in ids)
