"""The embedder: offline model, normalised vectors, batched async calls, ONNX = torch."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest

from app.embeddings import Embedder, Vector, default_model_path, onnx_export, shared_embedder
from app.errors import SettingsError
from app.settings import Settings

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

    def counting(batch: list[str], batch_size: int = 64) -> Vector:
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


def _varied_sentences(n: int = 200) -> list[str]:
    """Short and long, questions and prose, code, numbers, accents, CJK, emoji, empty,
    and some past the model's 256-token limit (truncation must agree too)."""
    rng = random.Random(11)
    words = ["redis", "stream", "cache", "vector", "index", "persistence", "replica",
             "cluster", "session", "token", "latency", "throughput", "memory", "eviction",
             "postgres", "transaction", "lock", "cursor", "summary", "worker", "queue", "retry",
             "backoff", "snapshot", "append", "only", "file", "hnsw", "cosine", "distance"]
    fixed = ["", " ", "?", "a", "Hello!", "How do I reset my password?",
             "Wie funktioniert die Persistenz in Redis?", "東京の天気はどうですか",
             "naïve café résumé",
             "SELECT * FROM messages WHERE seq > 10;", "def f(x): return x ** 2  # square",
             "3.14159 2.71828 1.41421", "🙂🚀 emoji only 🔥", "URL: https://example.com/a?b=c&d=e",
             "word " * 400, "Ünïcödé " * 300]
    out = list(fixed)
    while len(out) < n:
        length = rng.choice([1, 3, 8, 15, 40, 120, 300])
        text = " ".join(rng.choice(words) for _ in range(length))
        if rng.random() < 0.5:
            text = text.capitalize() + rng.choice(["?", ".", "!", ""])
        out.append(text)
    return out


def test_onnx_vectors_equal_torch_vectors_within_cosine_0_9999_on_200_varied_sentences() -> None:
    texts = _varied_sentences()
    onnx, torch = shared_embedder(backend="onnx"), shared_embedder(backend="torch")
    assert onnx.backend == "onnx" and torch.backend == "torch"
    batched = (onnx.embed_many(texts) * torch.embed_many(texts)).sum(axis=1)
    assert float(batched.min()) >= 0.9999, texts[int(batched.argmin())][:80]
    # One at a time (no padding) as the app embeds a lone question.
    singles = [float(onnx.embed(t) @ torch.embed(t)) for t in texts[:30]]
    assert min(singles) >= 0.9999


def test_the_default_backend_is_onnx_and_torch_or_a_typo_is_a_setting() -> None:
    assert Settings.from_env({}).embedding_backend == "onnx"
    assert Settings.from_env({"EMBEDDING_BACKEND": "torch"}).embedding_backend == "torch"
    with pytest.raises(SettingsError, match="EMBEDDING_BACKEND"):
        Settings.from_env({"EMBEDDING_BACKEND": "tensorflow"})


def test_a_second_start_reuses_the_cached_onnx_file_without_exporting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared_embedder(backend="onnx").warm()  # the export happened at most once, before
    folder = Path(default_model_path())
    cached = onnx_export.onnx_path(folder, packaged=True)
    assert cached.is_file() and cached.parent.parent == onnx_export.cache_root()

    def no_export(model_dir: Path, out: Path) -> None:
        raise AssertionError("exported again although a cached file exists")

    monkeypatch.setattr(onnx_export, "export", no_export)
    fresh = Embedder(backend="onnx")  # what a new process does
    assert float(fresh.embed("cached") @ shared_embedder(backend="onnx").embed("cached")) > 0.9999


def test_two_processes_exporting_together_leave_one_whole_file_and_no_temp_folders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = Path(default_model_path())
    target = onnx_export.onnx_path(folder, packaged=True)

    def racing_export(model_dir: Path, out: Path) -> None:
        # The other process finishes its export and renames it into place first.
        target.parent.mkdir(parents=True)
        target.write_bytes(b"theirs")
        out.write_bytes(b"mine")

    monkeypatch.setattr(onnx_export, "export", racing_export)
    assert onnx_export.ensure_onnx(folder, packaged=True) == target
    assert target.read_bytes() == b"theirs"
    assert sorted(p.name for p in target.parent.parent.iterdir()) == [target.parent.name]


def test_a_warmed_embedder_still_embeds_in_a_forked_child_sync_and_async() -> None:
    # The worker warms the model before rq forks a work horse per job.
    e = shared_embedder(backend="onnx")
    e.warm()
    asyncio.run(e.aembed("the parent's model thread exists now"))
    expected = e.embed("in the child")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        ok = False
        try:
            got = e.embed("in the child")
            other = asyncio.run(e.aembed("asynchronously in the child"))
            ok = bool(np.allclose(got, expected, atol=1e-6)) and other.shape == (384,)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung embedding")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
