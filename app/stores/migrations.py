"""Versioned PostgreSQL migrations: `schemas/postgres/NNNN_name.sql`, applied in order, once.

Each file runs in its own transaction and is recorded in `schema_migrations`.
An advisory lock serialises concurrent starters (two app nodes and a worker
booting together), so a migration never runs twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "schemas" / "postgres"
FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
# Any fixed 64-bit number, the same in every process.
ADVISORY_LOCK_ID = 0x6B62_6F6E_6500

TRACKING_DDL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def available() -> list[Migration]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = FILE_NAME.match(path.name)
        if m is None:
            raise RuntimeError(f"{path.name}: migrations are named NNNN_name.sql")
        found.append(Migration(int(m["version"]), m["name"], path))
    return found


def applied(conn: psycopg.Connection[Any]) -> set[int]:
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def pending(conn: psycopg.Connection[Any]) -> list[Migration]:
    done = applied(conn)
    return [m for m in available() if m.version not in done]


def migrate(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply what is pending; return what this call applied."""
    ran: list[Migration] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))
        conn.execute(TRACKING_DDL)
    for migration in available():
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))
            if migration.version in applied(conn):
                continue
            conn.execute(migration.path.read_text().encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            ran.append(migration)
    return ran
