"""The bearer gate in front of `/mcp`: the same token as `/v1`, checked before the SDK sees
the request.

The SDK's own auth (`token_verifier` + `AuthSettings`) is built for an OAuth
resource server and needs issuer and resource URLs this project does not have;
its tokens are the `/v1` routes' (app.identity: the local HS256 ones or an
identity provider's). A request without a valid token is answered 401 (an
erased user's 410) with the `/v1` error body; one with a token reaches the MCP
app with the caller's identity (user, tenant) in the ASGI scope (`WHO`), where
the tools read it.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ClientError
from app.sessions.routes import identified

WHO = "backbone.identity"


class BearerGate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            _state, who = await identified(Request(scope))
        except ClientError as e:
            response = JSONResponse(e.to_body(), status_code=e.status,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app({**scope, WHO: who}, receive, send)
