"""The project's errors, each carrying the HTTP status and stable code it maps to.

    BackboneError
    ├── SettingsError              bad environment variable (raised at start)
    ├── ClientError                the request is wrong; nothing was changed
    │   ├── BadRequest             400 bad_request / invalid_session_id
    │   ├── Unauthorized           401 unauthorized
    │   ├── Forbidden              403 forbidden
    │   ├── NotFound               404 not_found
    │   ├── Conflict               409 conflict
    │   ├── PayloadTooLarge        413 payload_too_large
    │   ├── Unprocessable          422 invalid_body
    │   └── RateLimited            429 rate_limited
    └── DependencyError            a store or service failed; 503
        ├── RedisUnavailable       redis_unavailable
        ├── MissingModules         Redis lacks the search or JSON module (start-up)
        ├── DatabaseUnavailable    database_unavailable
        ├── ServerStopping         server_stopping: this node stopped the turn (shutdown)
        └── EmbeddedStartError     the embedded Redis or PostgreSQL did not start

Route bodies raise these and never catch; `app.api` renders them as
`{"error": {"code", "message"}}`, and inside an SSE stream as an `error` event.
`translate()` is the one place that maps redis-py and psycopg errors onto them.
"""

from __future__ import annotations

from typing import ClassVar


class BackboneError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
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


class EmbeddedStartError(DependencyError):
    code = "embedded_start_failed"


def translate(exc: BaseException) -> BackboneError | None:
    """Map a lower-level store error onto ours; None if it is not a store error."""
    import psycopg
    import psycopg_pool
    import redis.exceptions as rexc

    if isinstance(exc, BackboneError):
        return exc
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | rexc.BusyLoadingError):
        return RedisUnavailable(f"Redis is unavailable: {exc}")
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolTimeout):
        return DatabaseUnavailable(f"PostgreSQL is unavailable: {exc}")
    return None
