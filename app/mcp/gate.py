"""The bearer gate in front of `/mcp`: the same token as `/v1`, checked before the SDK sees
the request.

The SDK's own auth (`token_verifier` + `AuthSettings`) is built for an OAuth
resource server and needs issuer and resource URLs this project does not have;
its tokens are ours (app.auth). A request without a valid token is answered
401 with the `/v1` error body; one with a token reaches the MCP app with the
caller's user id in the ASGI scope (`USER`), where the tools read it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth import authenticated_user
from app.errors import Unauthorized
from app.settings import Settings

USER = "backbone.user"


class BearerGate:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.secret = settings.auth_secret or ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            user = authenticated_user(Request(scope), self.secret)
        except Unauthorized as e:
            response = JSONResponse(e.to_body(), status_code=e.status,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app({**scope, USER: user}, receive, send)
