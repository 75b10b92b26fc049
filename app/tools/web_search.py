"""web_search: the SearxNG JSON API (`GET {SEARXNG_URL}/search?q=...&format=json`).

SearxNG answers 403 to `format=json` unless `json` is listed under
`search.formats` in its settings.yml; that case gets a message saying so.
Every failure becomes `ToolResult(error=...)`; nothing is raised.

The result is cached `global`ly and served to every later asker of a close
question, so its text never quotes the query: one user's wording must not reach
another (the model has its own tool call to tell what it asked).
"""

from __future__ import annotations

from typing import Any

import httpx

from app.cache.decision import FITTED_MAX_DISTANCE
from app.embeddings import Vector
from app.llm.base import ToolSpec
from app.tools.base import (
    QUERY_PARAMETERS,
    ArgumentError,
    CachePolicy,
    ToolContext,
    ToolResult,
    check_query,
    query_text_of,
)
from app.tools.passages import format_passages

MAX_TEXT_CHARS = 1000
HEADING = "Web results:"
NOTHING_FOUND = "The web search found nothing for this query."


class WebSearch:
    """The `web_search` tool: the top results of a SearxNG instance."""

    spec = ToolSpec(
        name="web_search",
        description=(
            "Search the public web for current information. Returns numbered results "
            "(title, URL, snippet) to cite as [n]."
        ),
        parameters=QUERY_PARAMETERS,
    )
    policy: CachePolicy | None = CachePolicy(
        max_distance=FITTED_MAX_DISTANCE, ttl_seconds=900, scope="global"
    )

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        max_results: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/search"
        self.timeout = timeout
        self.max_results = max_results
        self._transport = transport

    def query_text(self, arguments: dict[str, Any]) -> str:
        return query_text_of(arguments)

    async def run(
        self, arguments: dict[str, Any], ctx: ToolContext, query_vector: Vector | None = None
    ) -> ToolResult:
        # query_vector is unused: SearxNG takes words. It is accepted for the cache's sake.
        try:
            query = check_query(arguments)
        except ArgumentError as e:
            return ToolResult.failed(str(e))
        try:
            body = await self._get(query)
        except _Failed as e:
            return ToolResult.failed(str(e))
        items = _items(body, self.max_results)
        if not items:
            return ToolResult(NOTHING_FOUND, [])
        return ToolResult(format_passages(HEADING, items), items)

    async def _get(self, query: str) -> Any:
        params = {"q": query, "format": "json"}
        try:
            async with httpx.AsyncClient(timeout=self.timeout, transport=self._transport) as client:
                response = await client.get(
                    self.url, params=params, headers={"Accept": "application/json"}
                )
        except httpx.TimeoutException:
            raise _Failed(
                f"SearxNG at {self.url} did not answer within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as e:
            raise _Failed(f"cannot reach SearxNG at {self.url}: {type(e).__name__}: {e}") from e
        if response.status_code == 403:
            raise _Failed(
                f"SearxNG at {self.url} refused format=json (HTTP 403); "
                "enable 'json' under search.formats in its settings.yml"
            )
        if response.status_code != 200:
            snippet = " ".join(response.text.split())[:200]
            raise _Failed(f"SearxNG at {self.url} answered HTTP {response.status_code}: {snippet}")
        try:
            return response.json()
        except ValueError:
            raise _Failed(f"SearxNG at {self.url} sent a body that is not JSON") from None


class _Failed(Exception):
    pass


def _items(body: Any, limit: int) -> list[dict[str, Any]]:
    results = body.get("results") if isinstance(body, dict) else None
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for r in results if isinstance(results, list) else []:
        url = r.get("url") if isinstance(r, dict) else None
        if not isinstance(url, str) or not url or url in seen:
            continue
        seen.add(url)
        score = r.get("score")
        items.append(
            {
                "id": url,
                "url": url,
                "title": str(r.get("title") or url),
                "text": str(r.get("content") or "")[:MAX_TEXT_CHARS],
                "score": float(score) if isinstance(score, int | float) else None,
            }
        )
        if len(items) == limit:
            break
    return items
