"""Make the stores ready: modules checked, tables migrated, indexes created, scripts loaded.

Scripts are loaded into REDIS_URL and, when the session plane is elsewhere
(SESSION_REDIS_URL), there too: into every primary of a cluster. A script cache
emptied later (a restart, a failover, SCRIPT FLUSH) costs one EVAL, never an
error (`app.stores.scripts`, `app.stores.replicated`).

Called by `backbone up`, `serve` and `worker` at start and by the test
fixtures, so every entry point fails the same clear way on a wrong Redis.

Redis's `maxmemory-policy` is checked too: anything but `noeviction` may evict a
session's history before the sweep persisted it (session keys carry TTLs, so
the volatile-* policies pick them as well). That is warned about loudly, naming
the setting, rather than refused: a managed Redis may not let the operator
change it, and with `noeviction` a full Redis refuses writes (a 503) instead of
losing acknowledged messages. Read from INFO, which the app's ACL user may run
(CONFIG is a dangerous command it may not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import redis

from app.embeddings import shared_embedder
from app.settings import Settings
from app.stores import indexes, migrations, scripts
from app.stores.clients import check_modules, pg_connect, redis_client, session_redis_client

log = logging.getLogger("backbone.bootstrap")


@dataclass
class Prepared:
    modules: dict[str, int]
    indexes_created: list[str] = field(default_factory=list)
    migrations_applied: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def eviction_warning(client: redis.Redis) -> str | None:
    """Why Redis could drop unpersisted history, or None when it cannot (`noeviction`)."""
    policy = str(client.info("memory").get("maxmemory_policy", "noeviction"))
    if policy == "noeviction":
        return None
    return (
        f"Redis maxmemory-policy is {policy!r}: under memory pressure Redis may evict a "
        "session before the sweep persisted it, losing acknowledged messages. Set "
        "maxmemory-policy noeviction (redis.conf or CONFIG SET maxmemory-policy noeviction)."
    )


def _separate_session_plane(settings: Settings) -> bool:
    """Whether session scripts run on another Redis than REDIS_URL (a second node or a
    cluster), which then needs the scripts loaded too."""
    url = settings.session_redis_url
    return url is not None and (settings.session_redis_cluster or url != settings.redis_url)


def prepare(settings: Settings, dims: int | None = None) -> Prepared:
    assert settings.redis_url and settings.database_url, "start the embedded stack first"
    client = redis_client(settings.redis_url)
    try:
        modules = check_modules(client)
        created = indexes.create_all(client, dims)
        scripts.preload(client)
        indexes.tag_untagged(client, shared_embedder(
            settings.embedding_model, settings.embedding_backend).model_id)
        indexes.version_unversioned(client)
        risk = eviction_warning(client)
    finally:
        client.close()
    if _separate_session_plane(settings):
        sessions = session_redis_client(settings)
        try:
            scripts.preload(sessions)
        finally:
            sessions.close()
    with pg_connect(settings.database_url, autocommit=True) as conn:
        ran = migrations.migrate(conn)
        client = redis_client(settings.redis_url)
        try:
            indexes.tag_memory_sessions(client, conn)  # reads the migrated memories table
        finally:
            client.close()
    if risk is not None:
        log.warning("%s", risk)
    return Prepared(modules, created, [f"{m.version:04d}_{m.name}" for m in ran],
                    [risk] if risk else [])
