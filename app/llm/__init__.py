"""Model providers: an OpenAI-compatible server when LLM_BASE_URL is set, else offline."""

from __future__ import annotations

from app.llm.base import (
    Provider,
    ProviderError,
    ProviderEvent,
    StreamEnd,
    TextDelta,
    ToolCall,
    ToolCallRequest,
    ToolSpec,
)
from app.llm.offline import OfflineProvider
from app.llm.openai_compat import OpenAICompatProvider
from app.settings import Settings

__all__ = [
    "OfflineProvider",
    "OpenAICompatProvider",
    "Provider",
    "ProviderError",
    "ProviderEvent",
    "StreamEnd",
    "TextDelta",
    "ToolCall",
    "ToolCallRequest",
    "ToolSpec",
    "make_provider",
]


def make_provider(settings: Settings) -> Provider:
    """The provider the settings ask for; building it does no I/O."""
    if settings.llm_base_url:
        return OpenAICompatProvider(
            settings.llm_base_url,
            settings.llm_model,
            settings.llm_api_key,
            settings.llm_timeout_seconds,
        )
    return OfflineProvider(settings.offline_token_delay_ms)
