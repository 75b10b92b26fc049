"""`make bench`: every product benchmark in `bench/`, each followed by where its table goes.

    .venv/bin/python bench/run_all.py [--full] [--dry-run] [NAME ...]

The scripts are the rows of the table in docs/benchmarks.md (which also says where
each table lives); `bench/experiments/` (research that ended negative, see its
README) is not run. A script that fails stops the run.

By default each script runs with the light arguments of `QUICK`: every table with
every column, on fewer pairs, sizes, turns and seconds, so the whole run ends in
minutes on two cores. `--full` runs each script with its own defaults, the sizes
the figures in docs/ come from (or the command line stated beside a table).
`--dry-run` prints the command lines and runs nothing.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TABLE = ROOT / "docs" / "benchmarks.md"
ROW = re.compile(r"^\| `bench/(\w+)\.py` \|[^|]*\| \[([^\]]+)\]\(([^)]*)\)[^|]*\|$")

# The quick pass: each script's arguments, and why that size still says something.
QUICK: dict[str, list[str]] = {
    # 300 resumers still pass the per-user cap (8) and the node's cap (256) by far;
    # the scrape counts SCAN calls, which a fixed-cost scrape makes none of at any size.
    "abuse": ["--resumers", "300", "--keys", "50000"],
    # 10k is where the lookup's plan (KNN over a filter) and HNSW recall first matter;
    # 100k only grows the load time.
    "cache_lookup": ["--sizes", "1000,10000"],
    # 3,000 pairs a split is ~1,000 duplicates: precision and recall to about ±1.5 %.
    "cache_quality": ["--pairs", "3000"],
    # 100 calls per tool still repeat the Zipf head, so every tool has hits and misses.
    "cache_value": ["--calls", "100"],
    # No arguments: 20 users and one SIGKILL of each process; already under a minute.
    "chaos": [],
    # 500 ops give p50 and p99 per operation; 10 s of 50 users still spread keys.
    "cluster": ["--ops", "500", "--users", "50", "--seconds", "10"],
    # 100 sentences: per-sentence CPU is a mean, steady after a few dozen.
    "embed_cpu": ["--sentences", "100"],
    # 20 turns of 200 events is 4,000 XADDs a round; 2,000 GETs a block of 500 each way.
    "event_log": ["--turns", "20", "--rounds", "2", "--gets", "2000"],
    # 100 users for 20 s still saturate two cores, and every acknowledged message is checked.
    "load_test": ["--users", "100", "--seconds", "20"],
    # One stage at 10k memories: both populations, search against the list.
    "memory_search": ["--sizes", "10000", "--requests", "100"],
    # Every section still runs: 20 extractions, 8 jobs each way through rq, 2 s of contention.
    "memory_worker": ["--sessions", "20", "--rq-jobs", "8", "--cold-jobs", "8",
                      "--seconds", "2"],
    # 200 appends at each history length: enough for p50 and p99 of each.
    "session_append": ["--appends", "200"],
    # 50 and 200 chats, one round each: the curve's knee without the 500-chat level.
    "sse_load": ["--concurrency", "50", "200", "--rounds", "1"],
    # 100 turns per configuration; both worker classes still side by side.
    "turn_cpu": ["--turns", "100"],
}


def destinations() -> dict[str, str]:
    """Each product benchmark's script name → the docs page (and anchor) of its table."""
    out = {}
    for line in TABLE.read_text().splitlines():
        m = ROW.match(line)
        if m:
            name, _, target = m.groups()
            page, _, anchor = target.partition("#")
            where = f"docs/{page or TABLE.name}"
            out[name] = f"{where}#{anchor}" if anchor else where
    return out


def scripts() -> list[str]:
    """The benchmarks `make bench` runs: bench/*.py but the helpers (`_*.py`) and this."""
    return sorted(p.stem for p in BENCH.glob("*.py")
                  if not p.name.startswith("_") and p.name != Path(__file__).name)


def arguments(name: str, full: bool) -> list[str]:
    """A script's arguments: none with `--full` (its own defaults), else its quick ones."""
    return [] if full else QUICK[name]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help="only these scripts (default: all)")
    ap.add_argument("--full", action="store_true",
                    help="each script with its own defaults (the docs' figures)")
    ap.add_argument("--dry-run", action="store_true", help="print the command lines only")
    args = ap.parse_args(argv)
    known = scripts()
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        ap.error(f"no such benchmark: {', '.join(unknown)} (known: {', '.join(known)})")
    names = args.names or known
    mode = "full (each script's own defaults)" if args.full else "quick (run_all.QUICK)"
    where = destinations()
    if args.dry_run:
        for name in names:
            print(shlex.join([f"bench/{name}.py", *arguments(name, args.full)]))
        return 0
    print(f"bench/run_all.py: {mode}, {len(names)} scripts", flush=True)
    took: list[tuple[str, float]] = []
    for name in names:
        line = [f"bench/{name}.py", *arguments(name, args.full)]
        print(f"\n=== {shlex.join(line)}  (its table goes in {where.get(name, '?')}) ===",
              flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, *line], cwd=ROOT)
        took.append((name, time.monotonic() - started))
        if done.returncode != 0:
            print(f"bench/{name}.py failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
    print(f"\n{mode}:\n\n| script | arguments | wall s | its table goes in |\n"
          "| --- | --- | ---: | --- |")
    for name, seconds in took:
        given = arguments(name, args.full)
        shown = f"`{shlex.join(given)}`" if given else "its defaults"
        print(f"| `bench/{name}.py` | {shown} | {seconds:.0f} | {where.get(name, '?')} |")
    print(f"\nall: {sum(s for _, s in took):.0f} s, {mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
