"""Append latency vs history length: the Lua append against the naive read-modify-write.

    .venv/bin/python bench/session_append.py [--appends 1000]

For histories of 10, 100, 1,000 and 5,000 messages (about 250 bytes each), one
client appends one message at a time and we time each call:

- lua:   the `append_messages` script (owner check, length check, JSON.ARRAPPEND,
         two EXPIREs), on a RedisJSON array;
- naive: GET the history string, json.loads, append, json.dumps, SET.

After each timed append the history is put back to its length (untimed), so
every sample sees the stated size. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.sessions import messages
from app.stores import keys, scripts
from bench._redis import bench_redis, percentile

SIZES = (10, 100, 1_000, 5_000)
USER = "bench-user"
TTL = 86400


def history(sid: str, n: int) -> list[messages.Message]:
    text = "The quick brown fox jumps over the lazy dog; " * 3
    return [messages.build(sid, i, "user" if i % 2 else "assistant", text) for i in range(n)]


def run(appends: int) -> list[dict[str, float]]:
    rows = []
    with bench_redis() as r:
        for n in SIZES:
            sid = keys.new_session_id()
            base = history(sid, n)
            r.execute_command("JSON.SET", keys.session(sid), "$", json.dumps(base))
            r.set(keys.session_user(sid), USER)
            naive_key = f"bench-naive:{sid}"
            base_text = json.dumps(base)
            r.set(naive_key, base_text)
            new = messages.canonical_json(messages.build(sid, n, "user", "one more message"))

            lua: list[float] = []
            call = scripts.append_messages(sid, USER, n, [new], TTL)
            for _ in range(appends):
                t = time.perf_counter()
                code, _length = scripts.run(r, call)
                lua.append(time.perf_counter() - t)
                assert code == 1
                r.execute_command("JSON.ARRPOP", keys.session(sid), ".", "-1")

            naive: list[float] = []
            for _ in range(appends):
                t = time.perf_counter()
                doc = json.loads(r.get(naive_key) or b"[]")
                doc.append(json.loads(new))
                r.set(naive_key, json.dumps(doc))
                naive.append(time.perf_counter() - t)
                r.set(naive_key, base_text)

            r.delete(keys.session(sid), keys.session_user(sid), naive_key)
            rows.append({
                "n": n,
                "lua_p50": percentile(lua, 50) * 1e3, "lua_p99": percentile(lua, 99) * 1e3,
                "lua_rate": appends / sum(lua),
                "naive_p50": percentile(naive, 50) * 1e3,
                "naive_p99": percentile(naive, 99) * 1e3,
                "naive_rate": appends / sum(naive),
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--appends", type=int, default=1000)
    args = p.parse_args()
    rows = run(args.appends)
    print(f"append latency, {args.appends} appends per size, one client, loopback\n")
    print("| messages | Lua p50 ms | Lua p99 ms | Lua appends/s | naive p50 ms | naive p99 ms "
          "| naive appends/s | naive/Lua p50 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['n']:,} | {x['lua_p50']:.3f} | {x['lua_p99']:.3f} | {x['lua_rate']:,.0f} "
              f"| {x['naive_p50']:.3f} | {x['naive_p99']:.3f} | {x['naive_rate']:,.0f} "
              f"| {x['naive_p50'] / x['lua_p50']:.1f}x |")
    first, last = rows[0], rows[-1]
    print(f"\nLua p50 at {last['n']:,} / at {first['n']:,}: "
          f"{last['lua_p50'] / first['lua_p50']:.2f}x (aim <= 1.3x)")
    print(f"naive / Lua p50 at {last['n']:,}: "
          f"{last['naive_p50'] / last['lua_p50']:.1f}x (aim >= 20x)")


if __name__ == "__main__":
    main()
