"""Make the stores ready: modules checked, tables migrated, indexes created, scripts loaded.

Called by `backbone up`, `serve` and `worker` at start and by the test
fixtures, so every entry point fails the same clear way on a wrong Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app import indexes, migrations, scripts
from app.settings import Settings
from app.stores import check_modules, pg_connect, redis_client


@dataclass
class Prepared:
    modules: dict[str, int]
    indexes_created: list[str] = field(default_factory=list)
    migrations_applied: list[str] = field(default_factory=list)


def prepare(settings: Settings, dims: int | None = None) -> Prepared:
    assert settings.redis_url and settings.database_url, "start the embedded stack first"
    client = redis_client(settings.redis_url)
    try:
        modules = check_modules(client)
        created = indexes.create_all(client, dims)
        scripts.preload(client)
    finally:
        client.close()
    with pg_connect(settings.database_url, autocommit=True) as conn:
        ran = migrations.migrate(conn)
    return Prepared(modules, created, [f"{m.version:04d}_{m.name}" for m in ran])
