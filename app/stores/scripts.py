"""The Lua scripts in `lua/`, loaded once, each behind one typed wrapper.

A file is named `<verb_noun>-<N>.lua`, N being how many KEYS it takes; the
loader reads N from the name and refuses a call with another count. A wrapper
builds a `Call` (keys, args, how to read the reply); `run` executes it on a
sync client (workers) and `arun` on an async one (the app), by EVALSHA with a
fallback to EVAL when the server has not seen the script (after a restart or a
SCRIPT FLUSH), which also caches it again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson
import redis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError

from app.stores import keys
from app.stores.batch import batch

LUA_DIR = Path(__file__).resolve().parents[2] / "lua"
FILE_NAME = re.compile(r"^(?P<name>[a-z][a-z_]*)-(?P<numkeys>\d+)\.lua$")

T = TypeVar("T")
Arg = str | int | float


@dataclass(frozen=True)
class LuaScript:
    name: str
    numkeys: int
    source: str
    sha: str
    path: Path


@cache
def load_all() -> dict[str, LuaScript]:
    """Every script in `lua/`, by name. Read from disk once per process."""
    scripts: dict[str, LuaScript] = {}
    for path in sorted(LUA_DIR.glob("*.lua")):
        m = FILE_NAME.match(path.name)
        if m is None:
            raise RuntimeError(f"{path.name}: Lua files are named <verb_noun>-<N>.lua")
        source = path.read_text()
        scripts[m["name"]] = LuaScript(
            name=m["name"],
            numkeys=int(m["numkeys"]),
            source=source,
            sha=hashlib.sha1(source.encode()).hexdigest(),
            path=path,
        )
    return scripts


@dataclass(frozen=True)
class Call(Generic[T]):
    script: LuaScript
    keys: tuple[str, ...]
    args: tuple[Arg, ...]
    parse: Callable[[Any], T]


def _call(
    name: str, keys_: Sequence[str], args: Sequence[Arg], parse: Callable[[Any], T]
) -> Call[T]:
    script = load_all()[name]
    if len(keys_) != script.numkeys:
        raise ValueError(f"{name} takes {script.numkeys} KEYS, got {len(keys_)}")
    return Call(script, tuple(keys_), tuple(args), parse)


def run(client: redis.Redis, call: Call[T]) -> T:
    s = call.script
    try:
        raw = client.evalsha(s.sha, s.numkeys, *call.keys, *call.args)
    except NoScriptError:
        raw = client.eval(s.source, s.numkeys, *call.keys, *call.args)
    return call.parse(raw)


async def arun(client: aredis.Redis, call: Call[T]) -> T:
    s = call.script
    try:
        raw = await client.evalsha(s.sha, s.numkeys, *call.keys, *call.args)
    except NoScriptError:
        raw = await client.eval(s.source, s.numkeys, *call.keys, *call.args)
    return call.parse(raw)


async def arun_after(
    client: aredis.Redis, before: Sequence[tuple[Any, ...]], call: Call[T]
) -> T:
    """`arun`, in the same round trip as the commands `before` (they run first, in
    order; an error of theirs is raised)."""
    s = call.script
    *replies, raw = await batch(
        client, [*before, ("EVALSHA", s.sha, s.numkeys, *call.keys, *call.args)])
    for result in replies:
        if isinstance(result, Exception):
            raise result
    if isinstance(raw, NoScriptError):  # the commands before ran: only the script again
        raw = await client.eval(s.source, s.numkeys, *call.keys, *call.args)
        return call.parse(raw)
    if isinstance(raw, Exception):
        raise raw
    return call.parse(raw)


def preload(client: redis.Redis) -> None:
    """SCRIPT LOAD every script, so the first request pays no EVAL. A Redis Cluster
    client sends it to every primary; a replica a failover promotes starts without
    them (Redis does not replicate SCRIPT LOAD) and pays one EVAL per script."""
    for s in load_all().values():
        client.script_load(s.source)


def _int(raw: Any) -> int:
    return int(raw)


def _pair(raw: Any) -> tuple[int, int]:
    return int(raw[0]), int(raw[1])


def _text(raw: Any) -> str | None:
    if raw is None or raw is False:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _owner_history_summary(
    raw: Any,
) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    # orjson: twice the standard library's speed on the history every turn reads (RedisJSON
    # writes only what it parses: 64-bit integers and doubles, no NaN).
    history = None if raw[1] is None or raw[1] is False else orjson.loads(raw[1])
    return _text(raw[0]), history, _text(raw[2])


# -- sessions ---------------------------------------------------------------


def create_session(sid: str, user: str, ttl: int) -> Call[int]:
    """1 created | 0 the id is taken."""
    return _call("create_session", [keys.session(sid), keys.session_user(sid)], [user, ttl], _int)


def append_messages(
    sid: str, user: str, next_seq: int, messages_json: Sequence[str], ttl: int
) -> Call[tuple[int, int]]:
    """(code, next seq): 1 appended | 2 already appended (a re-sent call) | 0 no session
    | -1 not the owner | -2 conflict | -3 deleted."""
    return _call(
        "append_messages",
        [keys.session(sid), keys.session_user(sid), keys.session_deleted(sid)],
        [user, next_seq, ttl, *messages_json],
        _pair,
    )


def read_session(
    sid: str, ttl: int
) -> Call[tuple[str | None, list[dict[str, Any]] | None, str | None]]:
    """(owner, history, rolling summary); owner and history None when the session is not
    in Redis, the summary None when there is none yet."""
    return _call(
        "read_session",
        [keys.session(sid), keys.session_user(sid), keys.memory_summary(sid)],
        [ttl],
        _owner_history_summary,
    )


def restore_session(sid: str, user: str, history_json: str, ttl: int) -> Call[int]:
    """1 restored | 0 already present | -1 deleted."""
    return _call(
        "restore_session",
        [keys.session(sid), keys.session_user(sid), keys.session_deleted(sid)],
        [user, history_json, ttl],
        _int,
    )


def clear_marks(key: str, marks: Sequence[tuple[str, float]]) -> Call[int]:
    """How many of `marks` (sid, score as read) left the sorted set `key`; a sid marked
    again after it was read stays."""
    return _call("clear_marks", [key], [a for sid, score in marks for a in (sid, repr(score))],
                 _int)


def clear_unpersisted(sid: str, score: float) -> Call[int]:
    """1 cleared | 0 the session was written again after the sweep read it."""
    return clear_marks(keys.unpersisted(sid), [(sid, score)])


def clear_due(marks: Sequence[tuple[str, float]]) -> Call[int]:
    """`memory-due` marks a worker handed to the memory queue (`clear_marks`)."""
    return clear_marks(keys.MEMORY_DUE, marks)


def rate_limit(
    user: str, now_ms: int, window_ms: int, limit: int, member: str, *, key: str | None = None
) -> Call[tuple[int, int]]:
    """(1, remaining) accepted | (0, retry_after_ms) refused. `key` names another of the
    user's windows (e.g. `keys.session_rate_limit`); the default is message posts."""
    return _call(
        "rate_limit", [key or keys.rate_limit(user)], [now_ms, window_ms, limit, member], _pair
    )


def acquire_stream_slot(
    user: str, slot: str, now_ms: int, lease_ms: int, limit: int
) -> Call[tuple[int, int]]:
    """(1, held) admitted | (0, held) refused: the user holds `limit` live slots."""
    return _call("acquire_stream_slot", [keys.streams(user)], [now_ms, lease_ms, limit, slot],
                 _pair)


# -- memory extraction --------------------------------------------------------


def acquire_lock(sid: str, token: str, ttl_ms: int) -> Call[int]:
    """1 acquired | 0 held by another token."""
    return _call("acquire_lock", [keys.memory_lock(sid)], [token, ttl_ms], _int)


def extend_lock(sid: str, token: str, ttl_ms: int) -> Call[int]:
    """1 extended | 0 not held by this token."""
    return _call("extend_lock", [keys.memory_lock(sid)], [token, ttl_ms], _int)


def release_lock(sid: str, token: str) -> Call[int]:
    """1 released | 0 not held by this token."""
    return _call("release_lock", [keys.memory_lock(sid)], [token], _int)


def tag_model(key: str, model: str) -> Call[int]:
    """1 tagged | 0 already tagged or gone. `key` is an entry of idx:cache, idx:kb or
    idx:memory (`app.stores.indexes.tag_untagged`)."""
    return _call("tag_model", [key], [model], _int)


def tag_session(key: str, sid: str) -> Call[int]:
    """1 tagged | 0 already tagged or gone. `key` is a memory's recall copy
    (`app.stores.indexes.tag_memory_sessions`)."""
    return _call("tag_session", [key], [sid], _int)


def release_flight(lock: str, token: str) -> Call[int]:
    """1 released | 0 not held by this token. `lock` comes from `keys.cache_flight`."""
    return _call("release_flight", [lock], [token], _int)


def advance_cursor(
    sid: str, token: str, expected: str | None, new: str, summary: str, ttl: int,
    *, expected_seq: int | None, new_seq: int,
) -> Call[int]:
    """1 advanced | 0 lock lost | -1 cursor moved meanwhile | -2 not forward
    (`new_seq` is not after the current cursor's seq: stored, else `expected_seq`)."""
    return _call(
        "advance_cursor",
        [keys.memory_cursor(sid), keys.memory_lock(sid), keys.memory_summary(sid),
         keys.memory_cursor_seq(sid)],
        [token, expected or "", new, summary, ttl,
         -1 if expected_seq is None else expected_seq, new_seq],
        _int,
    )
