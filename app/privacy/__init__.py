"""The user's own data: exported (`export`), erased (`erase`), kept only so long (`retention`).

- `GET /v1/me/export` streams, as one JSON object, everything held about the
  caller: sessions with every message (PostgreSQL, so collapsed history too, plus
  what is only in Redis yet), memories, and the ids and titles of the caller's
  private documents.
- `DELETE /v1/me` (and `backbone erase --user ID`) fences the user first
  (`erased_users` in PostgreSQL under the user's advisory lock, `erased:{<digest>}`
  in Redis), so no request (410 `user_erased`), turn persist, new session or memory
  write of theirs lands afterwards; then removes every trace, step by step, each
  step idempotent, so an erase cut half way is finished by running it again (the
  privacy sweep does so for one left unfinished). `coverage.COVERAGE` says, for
  every Redis key family and PostgreSQL table, how an erase treats it; a test holds
  it equal to the key table and the live tables.
- Retention (HISTORY_RETENTION_DAYS) and the trimming of tombstones run in the
  privacy sweep (workers/privacy.py), in bounded batches.
"""

from __future__ import annotations

# How long an erased user's requests stay 410 and `erased_users` keeps its row.
ERASED_DAYS = 30
ERASED_SECONDS = ERASED_DAYS * 86400
