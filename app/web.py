"""`GET /`: the chat page, one static HTML file with plain JS (no build step)."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse

PAGE = Path(__file__).resolve().parent / "static" / "index.html"


async def index(request: Request) -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers={"Cache-Control": "no-cache"})
