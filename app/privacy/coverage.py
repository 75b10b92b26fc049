"""For every Redis key family and PostgreSQL table: how an erase treats it.

tests/test_erase.py holds these maps equal to the key table of app.stores.keys
(through app.ops.keyspace.families) and to the tables of the live database: a new
family or table fails that test until someone says here what becomes of it.
"""

from __future__ import annotations

KEY_FAMILIES: dict[str, str] = {
    "session:{<sid>}": "erased: sessions (the user's words)",
    "session:{<sid>}:user": "erased: sessions (holds the user id)",
    "session:{<sid>}:responses": "erased: sessions (responses' instructions, metadata)",
    "session:{<sid>}:deleted": "written by sessions: value '1', never the id; expires",
    "sessions:unpersisted:{<n>}": "sessions: the sid's mark removed (sids only)",
    "persist-sweep-tick": "no user data",
    "retention-sweep-tick": "no user data",
    "streams:{<uid>}": "erased: limits (slot ids; the id is in its name)",
    "cache-tools": "no user data: tool names",
    "cache-audit:<token>": "erased: cache (inputs naming the user, one SCAN); expires in 1 h",
    "memory-due": "sessions: the sid's mark removed (sids only)",
    "memory-due-trace:{<sid>}": "no user data: a W3C trace context (tracing on); expires in 1 h",
    "memory-task-lock:{<sid>}": "erased: sessions",
    "memory-last-extracted:{<sid>}": "erased: sessions",
    "memory-last-extracted:{<sid>}:seq": "erased: sessions",
    "memory-summary:{<sid>}": "erased: sessions (a summary of the user's words)",
    "events:{<sid>}:<turn>": "erased: sessions (by the history, then one SCAN)",
    "ratelimit:{<uid>}": "erased: limits",
    "ratelimit:{<uid>}:sessions": "erased: limits",
    "cache:<tool>:<hash>": "erased: cache (the user's scope, and shared entries by creator)",
    "cache-stats:<tool>": "no user data: counters per tool",
    "cache-threshold:<tool>": "no user data: one number per tool",
    "cache-flight:<tool>:<hash>": "no user data: an owner token; expires in seconds",
    "kb:<doc>:<chunk>": "erased: documents (chunks of scope user:<uid>)",
    "kb-file:<doc>": "erased: documents",
    "kb-version:<scope>": "erased: documents (kb-version:user:<uid>)",
    "memory:<uid>:<id>": "erased: memories",
    "erased:{<digest>}": "the fence itself: a digest, never the id; expires after 30 days",
    "idx:<name>:model-tagged": "no user data",
    "idx:memory:session-tagged": "no user data",
    "idx:kb:versioned": "no user data: scope names of old chunks, once (user scopes "
                        "included until their chunks are re-ingested)",
    "rq:*": "no user data: audit jobs carry a cache-audit key, memory jobs sids only",
}

TABLES: dict[str, str] = {
    "sessions": "erased: sessions",
    "messages": "erased: sessions (ON DELETE CASCADE)",
    "memories": "erased: memories",
    "cache_audits": "erased: cache (rows of the deleted entries; they hold entry keys only)",
    "deleted_sessions": "kept as tombstones, the user id replaced by its digest (finish)",
    "erased_users": "the fence: the id until the erase finishes, then the digest only",
    "schema_migrations": "no user data",
}
