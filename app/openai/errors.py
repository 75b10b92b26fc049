"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, for this face.

The statuses are the backbone's own (app.errors), which are the ones the `openai`
SDK maps to its classes: 400 BadRequestError, 401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, 409 ConflictError, 422
UnprocessableEntityError, 429 RateLimitError (with Retry-After), 5xx
InternalServerError. `openai_route` is the one place that renders them, for the
routes of this face only; the native routes keep `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.errors import BackboneError, RateLimited, translate

TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
Endpoint = Callable[[Request], Awaitable[Response]]


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return TYPES.get(status, "invalid_request_error")


def body(err: BackboneError) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": err.message, "type": error_type(err.status),
                      "param": err.param, "code": err.code}}


def error_response(err: BackboneError) -> JSONResponse:
    headers = {"Retry-After": str(err.retry_after)} if isinstance(err, RateLimited) else None
    return JSONResponse(body(err), status_code=err.status, headers=headers)


def openai_route(endpoint: Endpoint) -> Endpoint:
    """The endpoint, its errors (ours and the stores', via `translate`) in OpenAI's
    shape; anything else goes on to the app's handler (a 500)."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:
            err = translate(exc)
            if err is None:
                raise
            return error_response(err)

    return wrapped
