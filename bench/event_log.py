"""Client CPU per logged event and per round trip: the app's lean connections vs redis-py's.

    .venv/bin/python bench/event_log.py [--turns 50] [--events 200] [--rounds 3]

`--turns` turns stream at once on one event loop (uvloop, as the app), each
emitting `--events` `message.delta` events 5 ms apart through `EventLog`, whose
one writer per client pipelines the XADDs of every turn. CPU per event is this
process's CPU (time.process_time) over the run, minus the same loop with the
emits left out, divided by the events. Both clients run in every round, one after
the other, so a shared machine's noise falls on both; rounds are pooled.

- hiredis packing: `app.stores.clients.async_redis_client` (`LeanCommands`), what the app uses;
- redis-py's connection: the same pool with redis-py's async connection class,
  which packs every command in Python and bounds each write with a Task.

Then one GET at a time (`--gets`), the round trip every turn makes a few dozen
times: CPU per call for each client, alternating in blocks of 500.
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


async def measure(url: str, turns: int, events: int, rounds: int, gets: int
                  ) -> dict[str, tuple[float, float]]:
    fast = async_redis_client(url)
    plain = async_redis_client(url)
    plain.connection_pool.connection_class = aredis.Connection  # redis-py's packer
    clients = {"lean connections (the app)": fast, "redis-py's connection": plain}
    spent = dict.fromkeys(clients, 0.0)
    for _ in range(rounds):
        for label, client in clients.items():
            await client.flushdb()
            cost = await stream(client, turns, events, emit=True)
            spent[label] += cost - await stream(client, turns, events, emit=False)
    per_event = {label: s * 1e6 / (rounds * turns * events) for label, s in spent.items()}
    per_get = dict.fromkeys(clients, 0.0)
    await fast.set("bench-get", "v")
    for _ in range(gets // 500):
        for label, client in clients.items():
            started = time.process_time()
            for _ in range(500):
                await client.get("bench-get")
            per_get[label] += time.process_time() - started
    for client in clients.values():
        await client.aclose()
    return {label: (per_event[label], per_get[label] * 1e6 / max(gets, 1)) for label in clients}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=50)
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gets", type=int, default=10_000)
    args = p.parse_args()
    with bench_redis() as client:
        kw = client.connection_pool.connection_kwargs
        url = os.environ.get("REDIS_URL") or f"redis://{kw['host']}:{kw['port']}"
        per_event = uvloop.run(measure(url, args.turns, args.events, args.rounds, args.gets))
    print(f"{args.turns} turns at once x {args.events} events, {args.rounds} rounds pooled, "
          f"one event loop (uvloop)\n")
    print("| client | CPU µs per logged event | CPU µs per GET round trip |")
    print("|---|---:|---:|")
    for label, (event, get) in per_event.items():
        print(f"| {label} | {event:.1f} | {get:.1f} |")


if __name__ == "__main__":
    main()
