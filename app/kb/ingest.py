"""Knowledge-base ingestion: chunk text and markdown files, embed them, store them for kb_search.

Each file is one document, `doc` = the first 32 hex characters of SHA-256 over its
resolved path. Its chunks live at `kb:<doc>:<n>` (hash: doc, scope, source, model,
title, text, chunk, embedding as float32 bytes) and its fingerprint at
`kb-file:<doc>` (SHA-256 over the content, the scope, the chunker version and the
model id).

An unchanged file is skipped. A changed one is replaced in one MULTI/EXEC: its
old chunk keys are deleted and the new ones written together, so a search never
sees a half-replaced document and no stale chunk outlives the change. The same
MULTI bumps `kb-version:<scope>` of the document's scope (and of its old scope,
when it moved): a cached retrieval records the version it was computed from,
and the cache never serves one older than the current (`app.cache.semantic`).
`delete_paths` removes documents the same way.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import redis
from tqdm import tqdm

from app.embeddings import Embedder, Vector
from app.errors import BadRequest, NotFound
from app.stores import keys
from app.tools.kb_search import parse_search_reply

CHUNK_CHARS = 800
OVERLAP_CHARS = 120
BATCH = 64
SUFFIXES = frozenset({".md", ".markdown", ".txt", ".rst"})
CHUNKER_VERSION = "1"
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_BOUNDARY = re.compile(r"[.!?]\s+|\n\s*\n")  # sentence end or paragraph break


@dataclass(frozen=True)
class IngestReport:
    files_seen: int
    files_ingested: int
    files_unchanged: int
    chunks_written: int


@dataclass
class _Doc:
    path: Path
    doc: str
    fingerprint: str
    title: str
    chunks: list[str]
    vectors: list[Vector | None] = field(default_factory=list)


def doc_id(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]


def check_scope(scope: str) -> str:
    if not keys.KB_SCOPE.fullmatch(scope):
        raise BadRequest(
            f"scope must be 'global', 'user:<id>' or 'tenant:<id>', got {scope!r}",
            code="invalid_scope",
        )
    return scope


def title_of(text: str, path: Path) -> str:
    """The first markdown heading, else the file name made readable."""
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        m = None if in_fence else _HEADING.match(line)
        if m:
            return m.group(1).strip()
    return path.stem.replace("_", " ").replace("-", " ").strip() or path.name


def _blocks(text: str) -> Iterator[tuple[str, bool]]:
    """(paragraph, starts a section) pairs; '#' lines inside code fences are not headings."""
    in_fence = False
    para: list[str] = []
    heading = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        is_heading = not in_fence and bool(_HEADING.match(line))
        if (is_heading or (not in_fence and not line.strip())) and para:
            yield "\n".join(para).strip(), heading
            para, heading = [], False
        if is_heading:
            heading = True
        if line.strip() or in_fence:
            para.append(line)
    if para:
        yield "\n".join(para).strip(), heading


def _pieces(paragraph: str, size: int) -> list[str]:
    """A paragraph cut to at most `size` characters, at sentence ends where possible."""
    if len(paragraph) <= size:
        return [paragraph]
    out: list[str] = []
    current = ""
    for sentence in _SENTENCE.split(paragraph):
        while len(sentence) > size:  # one enormous "sentence": cut at a space
            cut = sentence.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            out.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if current and len(current) + 1 + len(sentence) > size:
            out.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        out.append(current)
    return out


def _tail(text: str, overlap: int) -> str:
    """The last ~`overlap` characters, from a sentence or paragraph start if one is there."""
    if len(text) <= overlap:
        return text
    window = text[len(text) - overlap :]
    m = _BOUNDARY.search(window)
    if m and m.end() < len(window):
        return window[m.end() :]
    space = window.find(" ")
    return window[space + 1 :] if space != -1 else ""


def chunk_text(text: str, size: int = CHUNK_CHARS, overlap: int = OVERLAP_CHARS) -> list[str]:
    """Chunks of about `size` characters, split at headings, then paragraphs, then sentences.

    A chunk that had to be cut mid-section starts with the last ~`overlap`
    characters of the one before, so a sentence pair split at the boundary is
    still found together; a new section starts clean.
    """
    chunks: list[str] = []
    current = ""
    for paragraph, section in _blocks(text):
        for piece in _pieces(paragraph, size - overlap):
            # A heading ends a chunk that is already reasonably full.
            if current and section and len(current) >= size * 0.4:
                chunks.append(current)
                current = ""
            elif current and len(current) + 2 + len(piece) > size:
                chunks.append(current)
                current = _tail(current, overlap)
            current = f"{current}\n\n{piece}" if current else piece
            section = False
    if current.strip():
        chunks.append(current)
    return chunks


def _files(paths: Sequence[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            out.append(p)  # named explicitly: taken whatever its suffix
        else:
            raise NotFound(f"no such file or directory: {p}")
    unique: dict[Path, Path] = {}
    for f in out:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


@dataclass(frozen=True)
class _Old:
    """What is stored for a document now: its chunk keys and the scopes they are in."""

    chunks: list[str]
    scopes: set[str]


def _old_chunks(client: redis.Redis, doc: str) -> _Old:
    """The chunk keys stored for `doc` and their scopes (a SCAN if there is no index)."""
    try:
        reply = client.execute_command(  # type: ignore[no-untyped-call]
            "FT.SEARCH", keys.INDEX_KB, f"@doc:{{{doc}}}", "RETURN", 1, "scope",
            "LIMIT", 0, 10_000, "DIALECT", 2,
        )  # fmt: skip
        rows = parse_search_reply(reply)[1]
        return _Old([key for key, _ in rows], {f["scope"] for _, f in rows if "scope" in f})
    except redis.ResponseError:
        found = [k.decode() if isinstance(k, bytes) else k
                 for k in client.scan_iter(match=f"kb:{doc}:*", count=1000)]  # fmt: skip
        scopes = {v.decode() for v in (client.hget(k, "scope") for k in found)
                  if isinstance(v, bytes)}  # fmt: skip
        return _Old(found, scopes)


def _bump(pipe: redis.client.Pipeline, scopes: set[str]) -> None:
    """INCR the version of every scope whose documents this MULTI changes."""
    for scope in sorted(s for s in scopes if keys.KB_SCOPE.fullmatch(s)):
        pipe.incr(keys.kb_version(scope))


def _write(client: redis.Redis, d: _Doc, scope: str, model: str, old: _Old) -> None:
    pipe = client.pipeline(transaction=True)
    if old.chunks:
        pipe.delete(*old.chunks)
    for n, (text, vector) in enumerate(zip(d.chunks, d.vectors, strict=True)):
        assert vector is not None
        mapping: dict[str | bytes, str | bytes | int] = {
            "doc": d.doc,
            "scope": scope,
            "source": str(d.path.resolve()),
            "model": model,
            "title": d.title,
            "text": text,
            "chunk": n,
            "embedding": np.asarray(vector, dtype=np.float32).tobytes(),
        }
        pipe.hset(keys.kb_chunk(d.doc, n), mapping=mapping)  # type: ignore[arg-type]
    pipe.set(keys.kb_file(d.doc), d.fingerprint)
    _bump(pipe, old.scopes | {scope})
    pipe.execute()


def ingest_paths(
    client: redis.Redis,
    embedder: Embedder,
    paths: Sequence[Path],
    scope: str = "global",
    progress: bool = True,
) -> IngestReport:
    """Ingest files and directories (recursively: .md .markdown .txt .rst) into `scope`."""
    check_scope(scope)
    files = _files([Path(p) for p in paths])
    model = embedder.model_id
    todo: list[_Doc] = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        doc = doc_id(path)
        basis = f"{CHUNKER_VERSION}\0{scope}\0{embedder.model_name}\0{model}\0{text}"
        fingerprint = hashlib.sha256(basis.encode()).hexdigest()
        stored = client.get(keys.kb_file(doc))
        if isinstance(stored, bytes):
            stored = stored.decode()
        if stored == fingerprint:
            continue
        todo.append(_Doc(path, doc, fingerprint, title_of(text, path), chunk_text(text)))

    written = 0
    batch: list[tuple[_Doc, int]] = []

    def flush() -> None:
        nonlocal written
        if not batch:
            return
        texts = [f"{d.title}\n\n{d.chunks[n]}" for d, n in batch]
        vectors = embedder.embed_many(texts, batch_size=BATCH)
        for (d, n), v in zip(batch, vectors, strict=True):
            d.vectors[n] = v
            if n == len(d.chunks) - 1:  # chunks arrive in order: this file is complete
                _write(client, d, scope, model, _old_chunks(client, d.doc))
                written += len(d.chunks)
                d.vectors = []
        bar.update(len(batch))
        batch.clear()

    with tqdm(total=sum(len(d.chunks) for d in todo), unit="chunk", disable=not progress) as bar:
        for d in todo:
            d.vectors = [None] * len(d.chunks)
            if not d.chunks:  # emptied file: drop its old chunks, remember the new state
                _write(client, d, scope, model, _old_chunks(client, d.doc))
            for n in range(len(d.chunks)):
                batch.append((d, n))
                if len(batch) == BATCH:
                    flush()
        flush()
    return IngestReport(len(files), len(todo), len(files) - len(todo), written)


def delete_paths(client: redis.Redis, paths: Sequence[Path]) -> int:
    """Remove the documents ingested from these files (or from the files under these
    folders); a path that is gone from disk is still removed. Returns how many
    documents were stored. Each goes in one MULTI that bumps its scope's version."""
    removed = 0
    for path in paths:
        path = Path(path)
        files = _files([path]) if path.exists() else [path]
        for f in files:
            doc = doc_id(f)
            old = _old_chunks(client, doc)
            if not old.chunks and not client.exists(keys.kb_file(doc)):
                continue
            pipe = client.pipeline(transaction=True)
            if old.chunks:
                pipe.delete(*old.chunks)
            pipe.delete(keys.kb_file(doc))
            _bump(pipe, old.scopes)
            pipe.execute()
            removed += 1
    return removed


def sample_corpus_dir() -> Path:
    """The sample corpus shipped with the project (CC0 markdown about Redis and friends)."""
    return Path(__file__).resolve().parent / "corpus"


def kb_is_empty(client: redis.Redis) -> bool:
    """True when no knowledge-base chunk is stored (so a first run may load the sample)."""
    return next(iter(client.scan_iter(match="kb:*", count=1000)), None) is None
