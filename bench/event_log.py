"""Client CPU per logged event: the app's async client (hiredis packing) vs redis-py's own.

    .venv/bin/python bench/event_log.py [--turns 50] [--events 200] [--rounds 3]

`--turns` turns stream at once on one event loop (uvloop, as the app), each
emitting `--events` `message.delta` events 5 ms apart through `EventLog`, whose
one writer per client pipelines the XADDs of every turn. CPU per event is this
process's CPU (time.process_time) over the run, minus the same loop with the
emits left out, divided by the events. Both clients run in every round, one after
the other, so a shared machine's noise falls on both; rounds are pooled.

- hiredis packing: `app.stores.clients.async_redis_client` (`LeanCommands`), what the app uses;
- redis-py packer: the same pool with redis-py's async connection class, which
  packs every command in Python.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import redis.asyncio as aredis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.chat.event_log import EventLog
from app.stores.clients import async_redis_client
from bench._redis import bench_redis

PACE_SECONDS = 0.005


async def stream(client: aredis.Redis, turns: int, events: int, emit: bool) -> float:
    """CPU seconds to run `turns` paced turns of `events` each (with or without emits)."""

    async def turn(i: int) -> None:
        log = EventLog(client, f"{i:032x}", 1)
        for _ in range(events):
            if emit:
                log.emit("message.delta", {"text": " a token"})
            await asyncio.sleep(PACE_SECONDS)
        await log.flush()

    started = time.process_time()
    await asyncio.gather(*(turn(i) for i in range(turns)))
    return time.process_time() - started


async def measure(url: str, turns: int, events: int, rounds: int) -> dict[str, float]:
    fast = async_redis_client(url)
    plain = async_redis_client(url)
    plain.connection_pool.connection_class = aredis.Connection  # redis-py's packer
    clients = {"lean connections (the app)": fast, "redis-py packer": plain}
    spent = dict.fromkeys(clients, 0.0)
    for _ in range(rounds):
        for label, client in clients.items():
            await client.flushdb()
            cost = await stream(client, turns, events, emit=True)
            spent[label] += cost - await stream(client, turns, events, emit=False)
    for client in clients.values():
        await client.aclose()
    return {label: s * 1e6 / (rounds * turns * events) for label, s in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=50)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with bench_redis() as client:
        kw = client.connection_pool.connection_kwargs
        url = os.environ.get("REDIS_URL") or f"redis://{kw['host']}:{kw['port']}"
        per_event = uvloop.run(measure(url, args.turns, args.events, args.rounds))
    print(f"{args.turns} turns at once x {args.events} events, {args.rounds} rounds pooled, "
          f"one event loop (uvloop)\n")
    print("| client | CPU µs per logged event |")
    print("|---|---:|")
    for label, us in per_event.items():
        print(f"| {label} | {us:.1f} |")


if __name__ == "__main__":
    main()
