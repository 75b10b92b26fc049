"""The project's errors, each carrying the HTTP status and stable code it maps to.

    BackboneError
    ├── SettingsError              bad environment variable (raised at start)
    ├── ClientError                the request is wrong; nothing was changed
    │   ├── BadRequest             400 bad_request / invalid_session_id
    │   ├── Unauthorized           401 unauthorized
    │   ├── Forbidden              403 forbidden
    │   ├── NotFound               404 not_found
    │   ├── Conflict               409 conflict
    │   │   └── DuplicateMemory    409 duplicate_memory (+ the id of the memory it repeats)
    │   ├── Gone                   410 user_erased: the caller's data was erased
    │   ├── PayloadTooLarge        413 payload_too_large
    │   ├── Unprocessable          422 invalid_body
    │   └── RateLimited            429 rate_limited
    │       └── TooManyStreams     429 too_many_streams: the user's or node's open streams
    └── DependencyError            a store or service failed; 503
        ├── RedisUnavailable       redis_unavailable
        ├── MissingModules         Redis lacks the search or JSON module (start-up)
        ├── DatabaseUnavailable    database_unavailable
        ├── ServerStopping         server_stopping: this node stopped the turn (shutdown)
        ├── IdentityUnavailable    identity_unavailable: the identity provider's keys (JWKS)
        │                          were never fetched
        └── EmbeddedStartError     the embedded Redis or PostgreSQL did not start

Route bodies raise these and never catch; `app.api` renders them as
`{"error": {"code", "message"}}`, and inside an SSE stream as an `error` event.
`translate()` is the one place that maps redis-py and psycopg errors onto them,
including what redis-py raises while a Redis Cluster switches a primary to its
replica (see `_redis_switching`): those are a 503 `redis_unavailable` too.
"""

from __future__ import annotations

from types import TracebackType
from typing import ClassVar


class BackboneError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, when one is (the OpenAI face shows it)
        if code is not None:
            self.code = code  # type: ignore[misc]

    def to_body(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class SettingsError(BackboneError):
    code = "settings"


class ClientError(BackboneError):
    status = 400
    code = "bad_request"


class BadRequest(ClientError):
    pass


class Unauthorized(ClientError):
    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class Conflict(ClientError):
    status = 409
    code = "conflict"


class Gone(ClientError):
    status = 410
    code = "gone"


class DuplicateMemory(Conflict):
    """An edit would make a memory say what another of the user's memories says."""

    code = "duplicate_memory"

    def __init__(self, existing_id: str) -> None:
        super().__init__(f"memory {existing_id} already says this")
        self.existing_id = existing_id

    def to_body(self) -> dict[str, dict[str, str]]:
        body = super().to_body()
        body["error"]["id"] = self.existing_id
        return body


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class Unprocessable(ClientError):
    status = 422
    code = "invalid_body"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManyStreams(RateLimited):
    """Too many open event streams, the user's (MAX_STREAMS_PER_USER) or this node's
    (MAX_STREAMS_PER_NODE); refused before any other Redis work."""

    code = "too_many_streams"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, retry_after=retry_after)


class DependencyError(BackboneError):
    status = 503
    code = "dependency_unavailable"


class RedisUnavailable(DependencyError):
    code = "redis_unavailable"


class MissingModules(DependencyError):
    code = "redis_missing_modules"


class DatabaseUnavailable(DependencyError):
    code = "database_unavailable"


class ServerStopping(DependencyError):
    code = "server_stopping"


class IdentityUnavailable(DependencyError):
    code = "identity_unavailable"


class EmbeddedStartError(DependencyError):
    code = "embedded_start_failed"


def store_errors() -> tuple[type[Exception], ...]:
    """The store clients' own error classes: what `translate` may map (an API handler
    is registered for each, app.api)."""
    import psycopg
    import redis.exceptions as rexc

    return (rexc.RedisError, psycopg.Error)


def translate(exc: BaseException) -> BackboneError | None:
    """Map a lower-level store error onto ours; None if it is not a store error."""
    import psycopg
    import psycopg_pool
    import redis.exceptions as rexc

    if isinstance(exc, BackboneError):
        return exc
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | rexc.BusyLoadingError):
        return RedisUnavailable(f"Redis is unavailable: {exc}")
    if _redis_switching(exc):
        return RedisUnavailable(f"Redis is switching over, retry shortly: {exc}")
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return DatabaseUnavailable(f"PostgreSQL is unavailable: {exc}")
    return None


# RedisClusterException is also raised for our own mistakes (cross-slot keys, a
# keyless command); only these say the cluster itself is out of reach or moving.
_CLUSTER_OUT_OF_REACH = (
    "Redis Cluster cannot be connected",
    "startup_nodes could not agree",
    "All slots are not covered",
    "No targets were found",
)


def _redis_switching(exc: BaseException) -> bool:
    """What redis-py raises while a primary fails over (measured in
    tests/test_cluster_failover.py): the cluster says it is down or redirects
    (CLUSTERDOWN, TRYAGAIN, MOVED/ASK storms past the client's retries), a demoted
    primary refuses writes (READONLY), `min-replicas-to-write` refuses them
    (NOREPLICAS), the client cannot map a slot, or a connection another task tore
    down under a write fails inside redis-py with an AttributeError
    (`'NoneType' object has no attribute 'writelines'`). The AttributeError counts
    only when it was raised inside the redis package: one of ours stays a 500."""
    import redis.exceptions as rexc

    if isinstance(exc, rexc.ClusterError | rexc.TryAgainError | rexc.AskError
                  | rexc.ReadOnlyError | rexc.SlotNotCoveredError):
        return True
    if isinstance(exc, rexc.ResponseError) and str(exc).startswith("NOREPLICAS"):
        return True
    if isinstance(exc, rexc.RedisClusterException):
        return str(exc).startswith(_CLUSTER_OUT_OF_REACH)
    return isinstance(exc, AttributeError) and _raised_in(exc.__traceback__, "redis")


def _raised_in(tb: TracebackType | None, package: str) -> bool:
    """Whether the innermost frame of `tb` (where the error was raised) is in `package`."""
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module == package or module.startswith(package + ".")
