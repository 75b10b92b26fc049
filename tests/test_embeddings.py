"""The embedder: offline model, normalised vectors, batched async calls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.embeddings import shared_embedder

pytestmark = pytest.mark.anyio


def test_the_packaged_model_gives_normalised_384_dim_vectors_that_rank_paraphrases_close() -> None:
    e = shared_embedder()
    a, b, c = e.embed_many(["How do I reset my password?", "How can I change my password?",
                            "What is the capital of France?"])
    assert e.dims == 384 and a.shape == (384,) and a.dtype == np.float32
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert float(a @ b) > float(a @ c) + 0.3


async def test_concurrent_async_calls_share_batches_and_equal_the_sync_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    e = shared_embedder()
    texts = [f"question number {i} about redis streams" for i in range(40)]
    calls: list[int] = []
    real = e.embed_many

    def counting(batch: list[str], batch_size: int = 64) -> np.ndarray:  # type: ignore[type-arg]
        calls.append(len(batch))
        return real(batch, batch_size)

    monkeypatch.setattr(e, "embed_many", counting)
    vectors = await asyncio.gather(*(e.aembed(t) for t in texts))
    assert sum(calls) == 40 and len(calls) < 40, "concurrent texts should share forward passes"
    expected = real(texts)
    assert all(np.allclose(v, x, atol=1e-5) for v, x in zip(vectors, expected, strict=True))
    # A repeat is answered from memory.
    calls.clear()
    await e.aembed(texts[0])
    assert calls == []
