"""The shared clients of one app process, held in Starlette's lifespan state.

No module globals: everything a request needs comes from `app_state(request)`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aredis
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request

from app.cache.stats import Memo
from app.chat.stream_slots import StreamSlots
from app.chat.turn import TurnDeps
from app.embeddings import Embedder
from app.identity import Authenticator
from app.memory.service import MemoryService
from app.sessions.store import Sessions
from app.settings import Settings


@dataclass
class AppState:
    settings: Settings
    redis: aredis.Redis
    pg: AsyncConnectionPool[Any]
    embedder: Embedder
    sessions: Sessions
    turn_deps: TurnDeps
    streams: StreamSlots  # open-stream limits and the blocking readers' pool
    auth: Authenticator
    memories: MemoryService
    turns: set[asyncio.Task[None]] = field(default_factory=set)  # turns still running
    cache_report: Memo = field(default_factory=Memo)  # /v1/cache/stats, once a second


def app_state(request: Request) -> AppState:
    state: AppState = request.state.backbone
    return state
