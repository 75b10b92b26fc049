"""A lean HTTP/1.1 + SSE client for the load benches, on bare asyncio streams.

httpx spends more CPU per streamed event than the server does to send it: at
100 concurrent chats on these two cores the load generator used 3 s of CPU per
100-turn burst against the app's 1.8 s, so the first-event latency measured the
client's saturation. This client parses only what the benches need (status,
Content-Length or chunked bodies, `event:` and `data:` lines) and keeps no pool:
one connection per request (`Connection: close`).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from bench._stack import NATIVE, Face, TurnOutcome


async def _request(base: str, method: str, path: str, headers: dict[str, str],
                   body: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int,
                                               dict[str, str]]:
    url = urlsplit(base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    head = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", "Connection: close",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    if body:
        head.append("Content-Type: application/json")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    fields: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        fields[name.strip().lower()] = value.strip()
    return reader, writer, status, fields


async def _chunks(reader: asyncio.StreamReader, fields: dict[str, str]) -> Any:
    if fields.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in fields:
        yield await reader.readexactly(int(fields["content-length"]))
    else:
        yield await reader.read()


async def create_session(base: str, headers: dict[str, str]) -> str:
    reader, writer, status, fields = await _request(base, "POST", "/v1/sessions", headers)
    try:
        body = b"".join([c async for c in _chunks(reader, fields)])
        if status != 201 and status != 200:
            raise RuntimeError(f"POST /v1/sessions: HTTP {status}: {body[:200]!r}")
        return str(json.loads(body)["id"])
    finally:
        writer.close()


async def post_turn(base: str, sid: str, headers: dict[str, str], content: str,
                    face: Face = NATIVE) -> TurnOutcome:
    """One chat turn over SSE through `face`, read to its end (the same outcome, from
    the same per-event code, as bench._stack's httpx reader)."""
    out = TurnOutcome()
    path, payload = face.request(sid, content)
    started = time.perf_counter()
    body = json.dumps(payload).encode()
    try:
        reader, writer, status, fields = await _request(base, "POST", path, headers, body)
    except OSError as e:
        out.error = type(e).__name__
        return out
    try:
        if status != 200:
            out.error = f"HTTP {status}"
            return out
        buffer = b""
        async for chunk in _chunks(reader, fields):
            # The native route ends lines with CRLF (sse-starlette), the Responses face LF.
            buffer = (buffer + chunk).replace(b"\r\n", b"\n")
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                event, data = "", b""
                for line in frame.split(b"\n"):
                    if line.startswith(b"event:"):
                        event = line[6:].strip().decode()
                    elif line.startswith(b"data:"):
                        data = line[5:].strip()
                if event:  # not a ping comment
                    out.on_event(face, event, data, started)
    except (OSError, asyncio.IncompleteReadError) as e:
        out.error = type(e).__name__
    finally:
        writer.close()
    out.total_ms = (time.perf_counter() - started) * 1000
    if out.done is None and out.error is None:
        out.error = f"stream ended without {face.last}"
    return out
