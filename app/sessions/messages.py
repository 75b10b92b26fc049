"""Messages: their shape, canonical JSON, and the content hash that names them.

A message is a JSON object with `seq` (its position), `role`, `content`,
optional tool fields (`tool_calls`, `tool_call_id`, `name`), `created_at`
(ISO-8601 UTC) and `hash`: SHA-256 over the session id, the seq and the
canonical JSON of every other field. The hash never changes once written, so it
identifies a message even after older ones were collapsed into the summary.
Redis Lua has no SHA-256, so hashes are made here, never in a script.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

ROLES = frozenset({"system", "user", "assistant", "tool"})
Message = dict[str, Any]


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: one text per value, the same in every process."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_hash(sid: str, message: Message) -> str:
    body = {k: v for k, v in message.items() if k != "hash"}
    digest = hashlib.sha256()
    digest.update(f"{sid}\n{int(message['seq'])}\n".encode())
    digest.update(canonical_json(body).encode())
    return digest.hexdigest()


def build(
    sid: str,
    seq: int,
    role: str,
    content: str,
    *,
    created_at: str | None = None,
    **fields: Any,
) -> Message:
    """A complete message with its hash; `fields` are the optional tool fields."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    message: Message = {
        "seq": seq,
        "role": role,
        "content": content,
        "created_at": created_at or now_iso(),
        **{k: v for k, v in fields.items() if v is not None},
    }
    message["hash"] = message_hash(sid, message)
    return message


def renumber(sid: str, message: Message, seq: int) -> Message:
    """The same message at another position (after losing an append race)."""
    moved = {k: v for k, v in message.items() if k != "hash"}
    moved["seq"] = seq
    moved["hash"] = message_hash(sid, moved)
    return moved


def next_seq(history: list[Message]) -> int:
    """The seq the next message gets: not len(history), which a collapse shortens."""
    return int(history[-1]["seq"]) + 1 if history else 0


def is_intact(sid: str, message: Message) -> bool:
    return message.get("hash") == message_hash(sid, message)
