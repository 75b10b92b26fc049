"""Every Redis key the project writes, built here and nowhere else.

| key                                  | type        | TTL                        | holds                                   |
| ------------------------------------ | ----------- | -------------------------- | --------------------------------------- |
| `session:{<sid>}`                    | JSON array  | SESSION_TTL_SECONDS, renewed | the live history                      |
| `session:{<sid>}:user`               | string      | same as the session        | the owning user id                      |
| `session:{<sid>}:deleted`            | string      | SESSION_TTL_SECONDS        | fence: the session was deleted          |
| `session:{<sid>}:responses`          | hash        | SESSION_TTL_SECONDS, renewed | turn -> its Responses API record (app.openai) |
| `sessions:unpersisted:{<n>}`         | sorted set  | none                       | sid -> ms of its last unpersisted write (n = 0..15, from the sid) |
| `persist-sweep-tick`                 | string      | SWEEP_INTERVAL_SECONDS     | one sweep enqueued per interval         |
| `retention-sweep-tick`               | string      | 1 h                        | one retention sweep enqueued per hour   |
| `memory-due`                         | sorted set  | none                       | sid -> ms of its last turn not yet handed to the memory queue |
| `memory-due-trace:{<sid>}`           | string      | 1 hour                     | W3C trace context of the turn that marked it (tracing on only) |
| `memory-task-lock:{<sid>}`           | string      | MEMORY_LOCK_TTL_SECONDS    | owner token of the one extractor        |
| `memory-last-extracted:{<sid>}`      | string      | MEMORY_TTL_SECONDS         | SHA-256 of the last mined message       |
| `memory-last-extracted:{<sid>}:seq`  | string      | MEMORY_TTL_SECONDS         | seq of that message (cursor order)      |
| `memory-summary:{<sid>}`             | string      | MEMORY_TTL_SECONDS         | rolling prose summary                   |
| `events:{<sid>}:<turn>`              | stream      | 10 min                     | one turn's SSE events, for resumption   |
| `ratelimit:{<uid>}`                  | sorted set  | window                     | message-post times (sliding window)     |
| `ratelimit:{<uid>}:sessions`         | sorted set  | window                     | session-creation times (sliding window) |
| `streams:{<uid>}`                    | sorted set  | the slot lease, renewed    | the user's open event streams: slot id -> ms its lease ends |
| `cache:<tool>:<hash>`                | hash + HNSW | per tool                   | one cached tool or retrieval result     |
| `cache-stats:<tool>`                 | hash        | none                       | lookup/hit/audit counters               |
| `cache-threshold:<tool>`             | hash        | none                       | the tool's adaptive hit threshold       |
| `cache-tools`                        | set         | none                       | names of the tools with cache counters (read instead of a SCAN) |
| `cache-flight:<tool>:<hash>`         | string      | TOOL_TIMEOUT_SECONDS       | single-flight: owner token of the one run of a missed call |
| `cache-audit:<token>`                | string      | AUDIT_ENTRY_TTL_SECONDS (1 h) | one sampled hit's audit input (tool, arguments, caller), JSON; the audit job's only argument names it, and the job GETDELs it |
| `kb:<doc>:<chunk>`                   | hash + HNSW | none                       | one knowledge-base chunk                |
| `kb-file:<doc>`                      | string      | none                       | content hash of an ingested file        |
| `kb-version:<scope>`                 | string      | none                       | counter: bumped by every ingest or delete in the scope (global, user:<uid>, tenant:<tid>) |
| `memory:<uid>:<id>`                  | hash + HNSW | none (MEMORY_MAX_PER_USER) | one long-term memory (recall copy)      |
| `erased:{<digest>}`                  | string      | ERASED_SECONDS (30 days)   | fence: this user's data was erased (410 `user_erased`); digest, never the id |
| `idx:cache`, `idx:kb`, `idx:memory`  | indexes     |                            | RediSearch indexes over the hashes      |
| `idx:<name>:model-tagged`, `idx:kb:versioned`, `idx:memory:session-tagged` | string | none | start-up backfills done, once per Redis |
| `rq:*`                               | rq's own    | rq's                       | queues, jobs, registries                |

The `{<sid>}` hash tag puts every key of one session in the same cluster slot,
so a Lua script may touch several of them. The unpersisted marks are split in
UNPERSISTED_SHARDS sorted sets (the shard from the sid's first hex digit), so
no single key is written by every append; on a cluster they spread over the
primaries, and the sweep walks every shard. Session and user ids are validated
here before they become part of a key: user text never reaches a key name.
"""

from __future__ import annotations

import re
import secrets

from app.errors import BadRequest

SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
# User ids come from a verified token, but still never carry key syntax.
USER_ID = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
HEX = re.compile(r"^[0-9a-f]{1,64}$")
# A knowledge-base scope: `global`, `user:<uid>` or `tenant:<tid>` (ids as USER_ID).
KB_SCOPE = re.compile(r"^(global|(user|tenant):[A-Za-z0-9_.@-]{1,64})$")

UNPERSISTED_SHARDS = 16
SWEEP_TICK = "persist-sweep-tick"
RETENTION_TICK = "retention-sweep-tick"
# Every tool with `cache-stats:<tool>` counters, so reports and /metrics read the
# names instead of scanning the keyspace for them.
CACHE_TOOLS = "cache-tools"
INDEX_CACHE = "idx:cache"
INDEX_KB = "idx:kb"
INDEX_MEMORY = "idx:memory"
# Start-up backfill marker: memories from before the `session` TAG were tagged (app.stores.indexes).
MEMORY_SESSION_TAGGED = "idx:memory:session-tagged"
# Sessions whose last turn awaits memory extraction: the app marks them, a worker
# enqueues their jobs (app.memory.queue). On REDIS_URL, beside rq's queues.
MEMORY_DUE = "memory-due"
# With tracing on: the marking turn's trace context, for the job the dispatcher enqueues.
MEMORY_DUE_TRACE_SECONDS = 3600


def new_session_id() -> str:
    return secrets.token_hex(16)


def memory_due_trace(sid: str) -> str:
    return f"memory-due-trace:{{{check_session_id(sid)}}}"


def check_session_id(sid: str) -> str:
    if not SESSION_ID.fullmatch(sid):
        raise BadRequest("session id must be 32 lowercase hex characters", code="invalid_session_id")
    return sid


def check_user_id(uid: str) -> str:
    if not USER_ID.fullmatch(uid):
        raise BadRequest("user id must be 1-64 of A-Z a-z 0-9 _ . @ -", code="invalid_user_id")
    return uid


def check_tool(tool: str) -> str:
    if not TOOL_NAME.fullmatch(tool):
        raise BadRequest("tool names are lowercase letters, digits and _", code="invalid_tool")
    return tool


def _hex(value: str) -> str:
    if not HEX.fullmatch(value):
        raise ValueError(f"not a hex digest: {value!r}")
    return value


def session(sid: str) -> str:
    return f"session:{{{check_session_id(sid)}}}"


def session_user(sid: str) -> str:
    return f"{session(sid)}:user"


def session_deleted(sid: str) -> str:
    """The delete fence: append and restore refuse while it stands (PostgreSQL's
    `deleted_sessions` keeps the durable tombstone after it expires)."""
    return f"{session(sid)}:deleted"


def session_responses(sid: str) -> str:
    """The session's turns started through `POST /v1/responses`: turn -> the request's
    model, instructions, metadata, previous response (app.openai.records)."""
    return f"{session(sid)}:responses"


def unpersisted(sid: str) -> str:
    """The shard of `sessions:unpersisted` that holds this session's mark."""
    return unpersisted_shard(int(check_session_id(sid)[0], 16) % UNPERSISTED_SHARDS)


def unpersisted_shard(n: int) -> str:
    if not 0 <= n < UNPERSISTED_SHARDS:
        raise ValueError(f"no unpersisted shard {n}")
    return f"sessions:unpersisted:{{{n}}}"


def unpersisted_shards() -> list[str]:
    return [unpersisted_shard(n) for n in range(UNPERSISTED_SHARDS)]


def memory_lock(sid: str) -> str:
    return f"memory-task-lock:{{{check_session_id(sid)}}}"


def memory_cursor(sid: str) -> str:
    return f"memory-last-extracted:{{{check_session_id(sid)}}}"


def memory_cursor_seq(sid: str) -> str:
    """The cursor message's seq, beside the cursor: `advance_cursor` compares seqs, so
    the cursor only moves to a later message. Same prefix as the cursor (ACL patterns)."""
    return f"{memory_cursor(sid)}:seq"


def memory_summary(sid: str) -> str:
    return f"memory-summary:{{{check_session_id(sid)}}}"


def events(sid: str, turn: int) -> str:
    return f"events:{{{check_session_id(sid)}}}:{int(turn)}"


def rate_limit(uid: str) -> str:
    return f"ratelimit:{{{check_user_id(uid)}}}"


def session_rate_limit(uid: str) -> str:
    return f"ratelimit:{{{check_user_id(uid)}}}:sessions"


def streams(uid: str) -> str:
    """The user's open event streams (app.chat.stream_slots): slot id -> lease end (ms)."""
    return f"streams:{{{check_user_id(uid)}}}"


def cache_entry(tool: str, digest: str) -> str:
    return f"cache:{check_tool(tool)}:{_hex(digest)}"


def cache_prefix(tool: str | None = None) -> str:
    return "cache:" if tool is None else f"cache:{check_tool(tool)}:"


# The counters of a `cache-stats:<tool>` hash (besides `overlap_sum`): what
# `cache stats` shows and `/metrics` exports. flight_hits: misses answered by
# another caller's run of the same call (single flight).
CACHE_STATS_COUNTERS = (
    "lookups", "hits", "exact_hits", "misses", "flight_hits", "audits", "invalidations",
)


def cache_stats(tool: str) -> str:
    return f"cache-stats:{check_tool(tool)}"


def cache_threshold(tool: str) -> str:
    return f"cache-threshold:{check_tool(tool)}"


def cache_flight(tool: str, digest: str) -> str:
    """Single-flight lock of one cache entry's key: the one caller running the tool."""
    return f"cache-flight:{check_tool(tool)}:{_hex(digest)}"


# How long a sampled hit waits for its audit: an older one is dropped unread.
AUDIT_ENTRY_TTL_SECONDS = 3600
AUDIT_ENTRY = re.compile(r"^cache-audit:[0-9a-f]{32}$")


def cache_audit(token: str | None = None) -> str:
    """The key of one pending audit's input; a fresh random token when none is given.
    The key is all the audit job carries: no user text or id lands in rq's job hash."""
    key = f"cache-audit:{_hex(token or secrets.token_hex(16))}"
    if not AUDIT_ENTRY.fullmatch(key):
        raise ValueError(f"not an audit entry key: {key!r}")
    return key


def kb_version(scope: str) -> str:
    """The knowledge-base version of one scope; cached retrievals record it."""
    if not KB_SCOPE.fullmatch(scope):
        raise ValueError(f"not a knowledge-base scope: {scope!r}")
    return f"kb-version:{scope}"


def kb_chunk(doc: str, chunk: int) -> str:
    return f"kb:{_hex(doc)}:{int(chunk)}"


def kb_file(doc: str) -> str:
    return f"kb-file:{_hex(doc)}"


def memory(uid: str, memory_id: str) -> str:
    return f"memory:{check_user_id(uid)}:{_hex(memory_id)}"


def memory_prefix(uid: str) -> str:
    return f"memory:{check_user_id(uid)}:"


def erased_user(digest: str) -> str:
    """The erase fence of one user, named by `app.identity.user_digest` (session plane)."""
    return f"erased:{{{_hex(digest)}}}"


def session_keys(sid: str) -> list[str]:
    """Every per-session key, for deletion (not the fence, which must outlive them)."""
    return [
        session(sid),
        session_user(sid),
        session_responses(sid),
        memory_lock(sid),
        memory_cursor(sid),
        memory_cursor_seq(sid),
        memory_summary(sid),
    ]
