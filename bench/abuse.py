"""What one user (or an anonymous caller) can do to everyone else: issue #23's floods.

    .venv/bin/python bench/abuse.py [--against DIR] [--resumers 600] [--probes 30]
                                    [--keys 200000]

One stack (stores embedded, or REDIS_URL / DATABASE_URL); this checkout's app,
and with `--against DIR` the app of the checkout in DIR (`git archive <commit> |
tar -x -C DIR`), each measured on its own, on the same stores, one after the
other.

1. **Resume flood.** User `mallory` starts a slow turn (the offline provider
   at 3 s a token), reads its first event, drops the connection, then opens
   `--resumers` `GET /v1/sessions/{sid}/events` streams on it and holds every
   admitted one open. Meanwhile user `alice` reads her own session
   `--probes` times, one after the other: her latency (p50, p99, max) and errors
   are the table, next to how many of mallory's streams were admitted or refused.
2. **Scrape cost.** `--keys` unrelated keys are written, then one `GET /metrics`
   and one `GET /v1/cache/stats` are made: the SCAN calls Redis counted
   (`INFO commandstats`, `cmdstat_scan`) and each request's time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._redis import percentile
from bench._stack import servers, stores, token

TOKEN_DELAY_MS = "3000"  # a turn that lasts minutes: the resumers stay idle in XREAD


@dataclass
class Flood:
    admitted: int = 0
    refused: int = 0
    other_errors: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _h(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


async def _first_event_id(base: str, sid: str, h: dict[str, str]) -> str:
    async with httpx.AsyncClient(timeout=60) as client, client.stream(
        "POST", f"{base}/v1/sessions/{sid}/messages", headers=h,
        json={"content": "How does Redis persist data with AOF?"},
    ) as res:
        res.raise_for_status()
        async for line in res.aiter_lines():
            if line.startswith("id:"):
                return line[3:].strip()
    raise RuntimeError("the turn sent no event")


async def flood(base: str, resumers: int, probes: int) -> Flood:
    tag = uuid.uuid4().hex[:6]
    mallory, alice = _h(f"mallory-{tag}"), _h(f"alice-{tag}")
    out = Flood()
    async with httpx.AsyncClient(timeout=60) as c:
        sid = (await c.post(f"{base}/v1/sessions", headers=mallory)).json()["id"]
        own = (await c.post(f"{base}/v1/sessions", headers=alice)).json()["id"]
    after = await _first_event_id(base, sid, mallory)
    await asyncio.sleep(1)  # the dropped POST's stream ends
    limits = httpx.Limits(max_connections=resumers + 10, max_keepalive_connections=0)
    answered = 0
    all_answered = asyncio.Event()
    release = asyncio.Event()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def resume() -> None:
            nonlocal answered
            try:
                async with client.stream("GET", f"{base}/v1/sessions/{sid}/events",
                                         headers={**mallory, "Last-Event-ID": after}) as res:
                    if res.status_code == 200:
                        out.admitted += 1
                    elif res.status_code == 429:
                        out.refused += 1
                    else:
                        out.other_errors.append(
                            f"{res.status_code} {(await res.aread()).decode()[:200]}")
                    answered += 1
                    if answered == resumers:
                        all_answered.set()
                    if res.status_code == 200:
                        await release.wait()
            except httpx.HTTPError as e:
                out.other_errors.append(type(e).__name__)
                answered += 1
                if answered == resumers:
                    all_answered.set()

        tasks = [asyncio.create_task(resume()) for _ in range(resumers)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_answered.wait(), 60)
        await asyncio.sleep(2)  # the admitted ones settle into their XREADs
        async with httpx.AsyncClient(timeout=30) as probe:
            for _ in range(probes):
                started = time.perf_counter()
                try:
                    res = await probe.get(f"{base}/v1/sessions/{own}", headers=alice)
                    if res.status_code != 200:
                        out.errors.append(f"{res.status_code} "
                                          f"{res.json().get('error', {}).get('code', '')}")
                except httpx.HTTPError as e:
                    out.errors.append(type(e).__name__)
                out.latencies_ms.append((time.perf_counter() - started) * 1000)
        release.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return out


def noise(client: redis.Redis, n: int) -> None:
    prefix = f"noise-{uuid.uuid4().hex[:6]}:"
    for start in range(0, n, 5000):
        client.mset({f"{prefix}{i}": "x" for i in range(start, min(n, start + 5000))})


def scans(client: redis.Redis) -> int:
    stat = client.info("commandstats").get("cmdstat_scan")
    return int(stat["calls"]) if stat else 0


def scrape(base: str, client: redis.Redis) -> tuple[int, float, float]:
    """(SCAN calls, /metrics ms, /v1/cache/stats ms) of one of each."""
    before = scans(client)
    started = time.perf_counter()
    httpx.get(f"{base}/metrics", timeout=60).raise_for_status()
    metrics_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    httpx.get(f"{base}/v1/cache/stats", headers=_h("scraper"), timeout=60).raise_for_status()
    stats_ms = (time.perf_counter() - started) * 1000
    return scans(client) - before, metrics_ms, stats_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", help="another checkout's folder: its app measured the same way")
    p.add_argument("--resumers", type=int, default=600)
    p.add_argument("--probes", type=int, default=30)
    p.add_argument("--keys", type=int, default=200_000)
    args = p.parse_args()
    apps: list[tuple[str, Path | None]] = [("this checkout", None)]
    if args.against:
        apps.append((str(Path(args.against).resolve()), Path(args.against).resolve()))
    floods: list[tuple[str, Flood]] = []
    scrapes: list[tuple[str, tuple[int, float, float]]] = []
    with stores() as settings:
        client = redis.Redis.from_url(settings.redis_url or "")
        for label, cwd in apps:
            with servers(settings, cwd=cwd, OFFLINE_TOKEN_DELAY_MS=TOKEN_DELAY_MS) as (base,):
                floods.append((label, asyncio.run(flood(base, args.resumers, args.probes))))
        noise(client, args.keys)
        for label, cwd in apps:
            with servers(settings, cwd=cwd) as (base,):
                scrape(base, client)  # warm: the first request pays imports and connections
                scrapes.append((label, scrape(base, client)))
        client.close()
    print(f"Resume flood: {args.resumers} resumers of one user's turn, then {args.probes} "
          f"reads of another user's session, one after the other\n")
    print("| app | resumers admitted | refused (429) | resumers failed | other user: p50 ms "
          "| p99 ms | max ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, f in floods:
        lat = sorted(f.latencies_ms)
        errors = ", ".join(sorted({f"{e} x{f.errors.count(e)}" for e in f.errors})) or "0"
        failed = sorted({e.split(" ", 1)[0] for e in f.other_errors})
        print(f"| {label} | {f.admitted} | {f.refused} | {len(f.other_errors)} "
              f"{'(' + ', '.join(failed) + ') ' if failed else ''}"
              f"| {percentile(lat, 50):.0f} | {percentile(lat, 99):.0f} | {lat[-1]:.0f} "
              f"| {errors} |")
    for label, f in floods:
        if f.other_errors:
            print(f"\n{label}, a failed resumer's answer: {f.other_errors[0]}")
    print(f"\nScrape cost at {args.keys:,} unrelated keys: one GET /metrics and one "
          f"GET /v1/cache/stats\n")
    print("| app | SCAN calls | /metrics ms | /v1/cache/stats ms |")
    print("|---|---:|---:|---:|")
    for label, (n, metrics_ms, stats_ms) in scrapes:
        print(f"| {label} | {n} | {metrics_ms:.0f} | {stats_ms:.0f} |")


if __name__ == "__main__":
    main()
