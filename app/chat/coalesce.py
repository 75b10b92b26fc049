"""Consecutive text deltas of a model stream, merged into one at most every window.

A model streams a token every few milliseconds; each `message.delta` costs an
XADD entry, an SSE frame and a socket write. `coalesce` passes the first delta
of a quiet stream through at once (no added first-token latency), then gathers
the following ones and sends them as one delta when the window since the last
one sent has passed, by a timer, so text never waits for the next token while
the model pauses. Anything else the model sends (a tool call, the stream's
end) first flushes the gathered text, so the order is kept. The text is only
joined, never cut or altered: the concatenation is byte-identical.

The provider's stream is read by a task of its own (cancelled when the
consumer stops), because a timer cannot interrupt an `await` on the stream
itself without cancelling the stream. That task does the gathering, and hands
over only what is to be sent: the consumer wakes once per merged delta, not
once per token. A window of 0 passes every item through as it comes, with no
task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

from app.llm.base import ProviderEvent, TextDelta


class _End:
    pass


class _Failed:
    def __init__(self, exc: Exception) -> None:
        self.exc = exc


_END = _End()


async def coalesce(
    items: AsyncIterator[ProviderEvent], window_ms: int
) -> AsyncGenerator[ProviderEvent, None]:
    """`items` with runs of TextDelta merged, at most one delta per `window_ms`."""
    if window_ms <= 0:
        async for item in items:
            yield item
        return
    window = window_ms / 1000
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[ProviderEvent | _End | _Failed] = asyncio.Queue()
    pending: list[str] = []
    sent_at = float("-inf")
    timer: asyncio.TimerHandle | None = None

    def send() -> None:
        """Hand the gathered text over as one delta (also the timer's callback)."""
        nonlocal sent_at, timer
        if timer is not None:
            timer.cancel()
            timer = None
        if pending:
            queue.put_nowait(TextDelta("".join(pending)))
            pending.clear()
            sent_at = loop.time()

    async def pump() -> None:
        nonlocal timer
        try:
            async for item in items:
                if isinstance(item, TextDelta):
                    pending.append(item.text)
                    if loop.time() - sent_at >= window:
                        send()
                    elif timer is None:  # the model may pause: send by the window's end
                        timer = loop.call_at(sent_at + window, send)
                    continue
                send()
                queue.put_nowait(item)
        except Exception as exc:  # the consumer raises it, in order, after the text before it
            send()
            queue.put_nowait(_Failed(exc))
            return
        send()
        queue.put_nowait(_END)

    reader = asyncio.create_task(pump(), name="model-stream")
    try:
        while True:
            got = await queue.get()
            if isinstance(got, _End):
                return
            if isinstance(got, _Failed):
                raise got.exc
            yield got
    finally:
        if timer is not None:
            timer.cancel()
        reader.cancel()
        # Closes the provider's stream (its HTTP response) before the turn goes on.
        await asyncio.gather(reader, return_exceptions=True)
