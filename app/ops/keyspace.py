"""`backbone keys`: what is in the live Redis, per key family of the key table.

The families are the first column of the table in `app.stores.keys` (parsed from
its docstring, so a new row shows up here without another list to keep). One
SCAN walks the keyspace; each key is classified by the first family whose
pattern matches it whole (`<name>` stands for one `:`-free part, `{<sid>}` for a
hash tag, `*` for anything), with a last row for keys the table does not name.
TTLs come from PTTL of every key; memory from `MEMORY USAGE` of the first
`sample` keys of each family, scaled up to the family's count (an estimate,
marked `~` when sampled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import redis

from app.stores import keys

UNNAMED = "(not in the key table)"
_ROW = re.compile(r"^\|\s*(`[^|]+`)\s*\|\s*([^|]+?)\s*\|")
BATCH = 1000


def families() -> list[str]:
    """The key patterns of the key table, in its order (indexes are not keys: left out)."""
    out = []
    for line in (keys.__doc__ or "").splitlines():
        m = _ROW.match(line)
        if m and "index" not in m.group(2):
            out.extend(re.findall(r"`([^`]+)`", m.group(1)))
    return out


def pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\{<[a-z]+>\}|<[a-z]+>|\*)", pattern)
    rx = "".join(
        r"\{[^}]+\}" if p.startswith("{<") else "[^:]+" if p.startswith("<")
        else ".*" if p == "*" else re.escape(p)
        for p in parts
    )
    return re.compile(rx)


@dataclass
class Family:
    pattern: str
    count: int = 0
    no_ttl: int = 0
    ttl_min_ms: int | None = None
    ttl_max_ms: int | None = None
    sampled: list[int] = field(default_factory=list)  # MEMORY USAGE of the first keys

    def memory_bytes(self) -> int:
        if not self.sampled:
            return 0
        return round(sum(self.sampled) / len(self.sampled) * self.count)

    def add_ttl(self, pttl: int) -> None:
        if pttl < 0:  # -1: no TTL (-2: gone since the SCAN, counted as none too)
            self.no_ttl += 1
            return
        self.ttl_min_ms = pttl if self.ttl_min_ms is None else min(self.ttl_min_ms, pttl)
        self.ttl_max_ms = pttl if self.ttl_max_ms is None else max(self.ttl_max_ms, pttl)


def survey(client: redis.Redis, sample: int = 20) -> list[Family]:
    """One SCAN of the live Redis: count, TTL range and memory per key family."""
    rows = [Family(p) for p in families()] + [Family(UNNAMED)]
    matchers = [(pattern_regex(f.pattern), f) for f in rows[:-1]]
    wanted: dict[str, int] = {}  # family -> MEMORY USAGE calls queued so far

    def flush(batch: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        ops: list[tuple[Family, bool]] = []  # (family, is a memory reading), per command
        for key in batch:
            fam = next((f for rx, f in matchers if rx.fullmatch(key)), rows[-1])
            fam.count += 1
            pipe.pttl(key)
            ops.append((fam, False))
            if wanted.get(fam.pattern, 0) < sample:
                wanted[fam.pattern] = wanted.get(fam.pattern, 0) + 1
                pipe.memory_usage(key, samples=5)
                ops.append((fam, True))
        for (fam, is_memory), value in zip(ops, pipe.execute(), strict=True):
            if not is_memory:
                fam.add_ttl(int(value))
            elif value is not None:
                fam.sampled.append(int(value))

    batch: list[str] = []
    for raw in client.scan_iter(count=BATCH):
        batch.append(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
        if len(batch) >= BATCH:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return [f for f in rows if f.count or f.pattern != UNNAMED]


def _ttl(ms: int | None) -> str:
    if ms is None:
        return "-"
    s = ms / 1000
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def table(rows: list[Family]) -> str:
    """The survey as a text table, one family a line."""
    head = ("family", "keys", "no TTL", "TTL min", "TTL max", "memory")
    lines = [head]
    for f in rows:
        approx = "~" if 0 < len(f.sampled) < f.count else ""
        lines.append((f.pattern, str(f.count), str(f.no_ttl), _ttl(f.ttl_min_ms),
                      _ttl(f.ttl_max_ms), approx + _size(f.memory_bytes())))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in lines)
