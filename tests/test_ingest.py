"""Ingestion into the real Redis: chunking, idempotency, replacement without stale chunks."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import redis

from app.embeddings import shared_embedder
from app.errors import BadRequest, NotFound
from app.kb.ingest import (
    CHUNK_CHARS,
    chunk_text,
    doc_id,
    ingest_paths,
    kb_is_empty,
    sample_corpus_dir,
    title_of,
)
from app.stores import keys

SECTION = (
    "Tide pools on the north shore of Varnholm fill twice a day. "
    "Each pool keeps its own small population of crabs, anemones and periwinkles. "
    "The ferry office posts the tide table every Monday morning. "
)


def chunk_keys(r: redis.Redis, doc: str) -> set[str]:
    return {k.decode() for k in r.scan_iter(match=f"kb:{doc}:*", count=1000)}


def long_doc(sections: int) -> str:
    return "# Varnholm field notes\n\n" + "\n\n".join(
        f"## Section {n}\n\n{SECTION * 3}" for n in range(sections)
    )


def test_chunks_split_at_headings_and_stay_under_the_size() -> None:
    chunks = chunk_text(long_doc(6))
    assert len(chunks) >= 6
    assert all(len(c) <= CHUNK_CHARS for c in chunks)
    assert chunks[1].startswith("## Section 1")


def test_a_hash_line_inside_a_code_fence_is_not_a_heading() -> None:
    text = "Intro paragraph.\n\n```sh\n# install it\npip install x\n```\n"
    assert title_of(text, Path("setup_notes.md")) == "setup notes"
    assert chunk_text(text) == ["Intro paragraph.\n\n```sh\n# install it\npip install x\n```"]


def test_a_long_paragraph_is_cut_at_sentences_with_overlap() -> None:
    sentences = [f"Sentence number {n} talks about tide pools and crabs." for n in range(40)]
    chunks = chunk_text(" ".join(sentences))
    assert len(chunks) > 2 and all(len(c) <= CHUNK_CHARS for c in chunks)
    # The next chunk repeats the end of the previous one.
    assert chunks[1].split(".")[0] + "." in chunks[0]


def test_reingesting_an_unchanged_file_writes_nothing(r: redis.Redis, tmp_path: Path) -> None:
    scope = f"user:ingest-{secrets.token_hex(4)}"
    (tmp_path / "notes.md").write_text(long_doc(3))
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored in a folder
    first = ingest_paths(r, shared_embedder(), [tmp_path], scope=scope, progress=False)
    assert (first.files_seen, first.files_ingested, first.files_unchanged) == (1, 1, 0)
    assert first.chunks_written >= 3
    doc = doc_id(tmp_path / "notes.md")
    assert len(chunk_keys(r, doc)) == first.chunks_written
    stored = r.hgetall(keys.kb_chunk(doc, 0))
    assert stored[b"scope"].decode() == scope and stored[b"title"] == b"Varnholm field notes"
    assert len(stored[b"embedding"]) == 384 * 4
    assert r.get(keys.kb_file(doc)) is not None

    second = ingest_paths(r, shared_embedder(), [tmp_path], scope=scope, progress=False)
    assert (second.files_ingested, second.files_unchanged, second.chunks_written) == (0, 1, 0)
    assert not kb_is_empty(r)


def test_a_changed_file_replaces_its_chunks_and_leaves_none_stale(
    r: redis.Redis, tmp_path: Path
) -> None:
    scope = f"user:ingest-{secrets.token_hex(4)}"
    path = tmp_path / "notes.md"
    path.write_text(long_doc(6))
    before = ingest_paths(r, shared_embedder(), [path], scope=scope, progress=False)
    doc = doc_id(path)
    assert before.chunks_written >= 6

    path.write_text("# Varnholm field notes\n\nThe pools are closed for the winter.\n")
    after = ingest_paths(r, shared_embedder(), [path], scope=scope, progress=False)
    assert (after.files_ingested, after.chunks_written) == (1, 1)
    assert chunk_keys(r, doc) == {keys.kb_chunk(doc, 0)}
    assert b"closed for the winter" in r.hget(keys.kb_chunk(doc, 0), "text")  # type: ignore[operator]

    path.write_text("")  # emptied: every chunk goes, the file is remembered as empty
    emptied = ingest_paths(r, shared_embedder(), [path], scope=scope, progress=False)
    assert (emptied.files_ingested, emptied.chunks_written) == (1, 0)
    assert chunk_keys(r, doc) == set()


def test_ingesting_into_another_scope_rewrites_the_chunks(r: redis.Redis, tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text(long_doc(1))
    one, two = (f"user:scope-{secrets.token_hex(4)}" for _ in range(2))
    ingest_paths(r, shared_embedder(), [path], scope=one, progress=False)
    report = ingest_paths(r, shared_embedder(), [path], scope=two, progress=False)
    assert report.files_ingested == 1
    assert r.hget(keys.kb_chunk(doc_id(path), 0), "scope") == two.encode()


def test_a_bad_scope_or_missing_path_is_refused(r: redis.Redis, tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="scope"):
        ingest_paths(r, shared_embedder(), [tmp_path], scope="user:{oops}", progress=False)
    with pytest.raises(NotFound):
        ingest_paths(r, shared_embedder(), [tmp_path / "nope.md"], progress=False)


def test_the_sample_corpus_is_markdown_with_a_license() -> None:
    corpus = sample_corpus_dir()
    docs = sorted(corpus.glob("*.md"))
    assert 8 <= len(docs) <= 15
    assert "CC0-1.0" in (corpus / "LICENSE").read_text()
    for doc in docs:
        words = len(doc.read_text().split())
        assert 300 <= words <= 800, (doc.name, words)
        assert doc.read_text().startswith("# ")
