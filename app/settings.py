"""Typed settings, read once from the environment.

Every variable is listed in `.env.example` and in the settings table of docs/operations.md.
A malformed value fails loudly at start (`SettingsError`), never at first use.
With no variable set, everything runs on the embedded default: a local Redis
with the search and JSON modules and a local PostgreSQL under `DATA_DIR`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from app.errors import SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name, "").strip()
    return value or default


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, lo: float, hi: float) -> float:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = (_str(env, name, "0") or "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{name} must be 1 or 0, got {raw!r}")
    return raw in ("1", "true", "yes")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first is the default), case-insensitive."""
    value = (_str(env, name, choices[0]) or choices[0]).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {choices}, got {value!r}")
    return value


EMBEDDING_BACKENDS = ("onnx", "torch")
WORKER_CLASSES = ("simple", "fork")  # the first is the default


def embedding_backend(env: Mapping[str, str] | None = None) -> str:
    """EMBEDDING_BACKEND: `onnx` (default, ONNX Runtime) or `torch` (sentence-transformers)."""
    e = os.environ if env is None else env
    value = (_str(e, "EMBEDDING_BACKEND", "onnx") or "").lower()
    if value not in EMBEDDING_BACKENDS:
        raise SettingsError(f"EMBEDDING_BACKEND must be one of {EMBEDDING_BACKENDS}, got {value!r}")
    return value


# What an identity provider's JWKS may sign with: never HS* (a public key is no secret)
# nor `none`.
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512", "EdDSA")


def _algorithms(raw: str) -> tuple[str, ...]:
    algs = tuple(a.strip() for a in raw.split(",") if a.strip())
    bad = [a for a in algs if a not in ASYMMETRIC_ALGORITHMS]
    if bad or not algs:
        raise SettingsError(f"AUTH_ALGORITHMS takes asymmetric algorithms only "
                            f"{ASYMMETRIC_ALGORITHMS}, got {raw!r}")
    return algs


def _claim(name: str, value: str | None) -> str | None:
    if value is not None and not value.replace("_", "").replace(".", "").replace(
            "-", "").replace(":", "").replace("/", "").isalnum():
        raise SettingsError(f"{name} must be a claim name, got {value!r}")
    return value


def _session_cluster(env: Mapping[str, str], cluster: bool) -> bool:
    if cluster and _str(env, "SESSION_REDIS_URL") is None:
        raise SettingsError("SESSION_REDIS_CLUSTER=1 needs SESSION_REDIS_URL (a cluster node)")
    return cluster


@dataclass(frozen=True)
class Settings:
    """Everything the app and the workers read from the environment."""

    redis_url: str | None = None
    # The session plane (per-session and per-user keys); None: the one Redis above.
    session_redis_url: str | None = None
    session_redis_cluster: bool = False
    # WAIT for this many replicas before an append is acknowledged; None: 1 on a
    # cluster, 0 on a single node (see `session_wait_replicas`).
    session_redis_wait_replicas: int | None = None
    session_redis_wait_timeout_ms: int = 500
    database_url: str | None = None
    data_dir: Path = PROJECT_ROOT / ".data"
    embedded_redis_port: int = 6380
    host: str = "127.0.0.1"
    port: int = 8000
    auth_secret: str | None = None
    # An identity provider (app.identity): with AUTH_JWKS_URL set, tokens are verified
    # against its keys instead of AUTH_SECRET.
    auth_jwks_url: str | None = None
    auth_issuer: str | None = None
    auth_audience: str | None = None
    auth_algorithms: tuple[str, ...] = ("RS256", "ES256")
    auth_user_claim: str = "sub"
    auth_tenant_claim: str | None = None
    # Sessions untouched this long are removed by the privacy sweep; 0: kept.
    history_retention_days: int = 0
    session_ttl_seconds: int = 86400
    memory_lock_ttl_seconds: int = 300
    memory_ttl_seconds: int = 30 * 86400
    memory_max_facts_per_job: int = 20
    memory_max_per_user: int = 2000
    embedding_model: str | None = None
    embedding_backend: str = "onnx"
    llm_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_api_key: str | None = None
    searxng_url: str | None = None
    llm_timeout_seconds: float = 60.0
    offline_token_delay_ms: int = 20
    stream_coalesce_ms: int = 25
    shutdown_grace_seconds: float = 5.0
    worker_class: str = "simple"
    worker_metrics_port: int = 0  # 0: the worker serves no /metrics of its own
    tool_timeout_seconds: float = 10.0
    retrieval_cache_audit_rate: float = 0.05
    cache_audit_min_overlap: float = 0.5
    # Tools whose calls bypass the semantic cache (bench/cache_value.py: where it does not pay).
    cache_skip_tools: tuple[str, ...] = ()
    sweep_interval_seconds: int = 30
    rate_limit_messages: int = 30
    rate_limit_window_seconds: int = 60
    rate_limit_sessions: int = 10
    # Open event streams (a live turn's POST or a resume) one user may hold at once,
    # and one node; the node's limit also sizes its pool of blocking readers.
    max_streams_per_user: int = 8
    max_streams_per_node: int = 256
    # PostgreSQL connections one app process holds at most (sessions created, turns
    # persisted, histories restored); PostgreSQL's max_connections bounds all nodes' sum.
    pg_pool_size: int = 10
    # /metrics: a bearer token; None: answered to loopback callers only.
    metrics_token: str | None = None
    cache_audit_retention_days: int = 30
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per record (app.ops.logs)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        data_dir = Path(_str(e, "DATA_DIR", str(PROJECT_ROOT / ".data")) or ".data")
        return cls(
            redis_url=_str(e, "REDIS_URL"),
            session_redis_url=_str(e, "SESSION_REDIS_URL"),
            session_redis_cluster=_session_cluster(e, _bool(e, "SESSION_REDIS_CLUSTER")),
            session_redis_wait_replicas=(
                None if _str(e, "SESSION_REDIS_WAIT_REPLICAS") is None
                else _int(e, "SESSION_REDIS_WAIT_REPLICAS", 0)),
            session_redis_wait_timeout_ms=_int(
                e, "SESSION_REDIS_WAIT_TIMEOUT_MS", 500, minimum=1),
            database_url=_str(e, "DATABASE_URL"),
            data_dir=data_dir.resolve(),
            embedded_redis_port=_int(e, "EMBEDDED_REDIS_PORT", 6380, minimum=1),
            host=_str(e, "HOST", "127.0.0.1") or "127.0.0.1",
            port=_int(e, "PORT", 8000, minimum=1),
            auth_secret=_str(e, "AUTH_SECRET"),
            auth_jwks_url=_str(e, "AUTH_JWKS_URL"),
            auth_issuer=_str(e, "AUTH_ISSUER"),
            auth_audience=_str(e, "AUTH_AUDIENCE"),
            auth_algorithms=_algorithms(_str(e, "AUTH_ALGORITHMS", "RS256,ES256") or ""),
            auth_user_claim=_claim("AUTH_USER_CLAIM", _str(e, "AUTH_USER_CLAIM", "sub")) or "sub",
            auth_tenant_claim=_claim("AUTH_TENANT_CLAIM", _str(e, "AUTH_TENANT_CLAIM")),
            history_retention_days=_int(e, "HISTORY_RETENTION_DAYS", 0),
            session_ttl_seconds=_int(e, "SESSION_TTL_SECONDS", 86400, minimum=60),
            memory_lock_ttl_seconds=_int(e, "MEMORY_LOCK_TTL_SECONDS", 300, minimum=1),
            memory_ttl_seconds=_int(e, "MEMORY_TTL_SECONDS", 30 * 86400, minimum=60),
            memory_max_facts_per_job=_int(e, "MEMORY_MAX_FACTS_PER_JOB", 20, minimum=1),
            memory_max_per_user=_int(e, "MEMORY_MAX_PER_USER", 2000, minimum=1),
            embedding_model=_str(e, "EMBEDDING_MODEL"),
            embedding_backend=embedding_backend(e),
            llm_base_url=_str(e, "LLM_BASE_URL"),
            llm_model=_str(e, "LLM_MODEL", "gpt-4o-mini") or "gpt-4o-mini",
            llm_api_key=_str(e, "LLM_API_KEY"),
            searxng_url=_str(e, "SEARXNG_URL"),
            llm_timeout_seconds=_float(e, "LLM_TIMEOUT_SECONDS", 60.0, lo=1.0, hi=600.0),
            offline_token_delay_ms=_int(e, "OFFLINE_TOKEN_DELAY_MS", 20),
            stream_coalesce_ms=_int(e, "STREAM_COALESCE_MS", 25),
            shutdown_grace_seconds=_float(e, "SHUTDOWN_GRACE_SECONDS", 5.0, lo=0.0, hi=300.0),
            worker_class=_choice(e, "WORKER_CLASS", WORKER_CLASSES),
            worker_metrics_port=_int(e, "WORKER_METRICS_PORT", 0),
            tool_timeout_seconds=_float(e, "TOOL_TIMEOUT_SECONDS", 10.0, lo=0.1, hi=300.0),
            retrieval_cache_audit_rate=_float(
                e, "RETRIEVAL_CACHE_AUDIT_RATE", 0.05, lo=0.0, hi=1.0
            ),
            cache_audit_min_overlap=_float(e, "CACHE_AUDIT_MIN_OVERLAP", 0.5, lo=0.0, hi=1.0),
            cache_skip_tools=tuple(
                t.strip() for t in (_str(e, "CACHE_SKIP_TOOLS") or "").split(",") if t.strip()
            ),
            sweep_interval_seconds=_int(e, "SWEEP_INTERVAL_SECONDS", 30, minimum=1),
            rate_limit_messages=_int(e, "RATE_LIMIT_MESSAGES", 30, minimum=1),
            rate_limit_window_seconds=_int(e, "RATE_LIMIT_WINDOW_SECONDS", 60, minimum=1),
            rate_limit_sessions=_int(e, "RATE_LIMIT_SESSIONS", 10, minimum=1),
            max_streams_per_user=_int(e, "MAX_STREAMS_PER_USER", 8, minimum=1),
            max_streams_per_node=_int(e, "MAX_STREAMS_PER_NODE", 256, minimum=1),
            pg_pool_size=_int(e, "PG_POOL_SIZE", 10, minimum=1),
            metrics_token=_str(e, "METRICS_TOKEN"),
            cache_audit_retention_days=_int(e, "CACHE_AUDIT_RETENTION_DAYS", 30, minimum=1),
            log_level=(_str(e, "LOG_LEVEL", "INFO") or "INFO").upper(),
            log_format=_choice(e, "LOG_FORMAT", ("text", "json")),
        )

    @property
    def session_wait_replicas(self) -> int:
        """Replicas an append waits for (`WAIT`) before it is acknowledged: the setting,
        else 1 on a cluster (its primaries have replicas) and 0 on a single node."""
        if self.session_redis_wait_replicas is not None:
            return self.session_redis_wait_replicas
        return 1 if self.session_redis_cluster else 0

    @property
    def embedded(self) -> bool:
        """True when at least one store comes from the embedded launcher."""
        return self.redis_url is None or self.database_url is None

    def with_urls(self, redis_url: str, database_url: str) -> Settings:
        return replace(self, redis_url=redis_url, database_url=database_url)
