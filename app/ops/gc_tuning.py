"""The cyclic garbage collector of `backbone serve`, tuned for many open streams.

With 1,000 streams open the app holds hundreds of thousands of live objects
(tasks, frames, events), and CPython's default thresholds (700, 10, 10) ran a
full collection every few seconds that stopped the event loop for 300-450 ms:
every stream's next event waited that long (inter-event gap p99 583 ms at 1,000
chats, 180 ms with these settings; bench/sse_load.py, docs/benchmarks.md).

- `gc.freeze()` after start-up moves what is alive then (modules, the app, its
  clients) out of every later collection: it lives as long as the process.
- Higher thresholds make young collections rarer and full ones much rarer; the
  turn's garbage is mostly freed by reference counting anyway, and CPython
  still skips a full collection until a quarter of the long-lived objects is new.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 50, 100)


def tune() -> None:
    """Call once, with the app built and before serving."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
