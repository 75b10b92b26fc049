"""`make bench`: every product benchmark in `bench/`, each followed by where its table goes.

    .venv/bin/python bench/run_all.py [NAME ...]

The scripts are the rows of the table in docs/benchmarks.md (which also says where
each table lives); `bench/experiments/` (research that ended negative, see its
README) is not run. A script that fails stops the run.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TABLE = ROOT / "docs" / "benchmarks.md"
ROW = re.compile(r"^\| `bench/(\w+)\.py` \|[^|]*\| \[([^\]]+)\]\(([^)]*)\)[^|]*\|$")


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


def main(argv: list[str]) -> int:
    where = destinations()
    names = argv or scripts()
    took: list[tuple[str, float]] = []
    for name in names:
        print(f"\n=== bench/{name}.py  (its table goes in {where.get(name, '?')}) ===",
              flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(BENCH / f"{name}.py")], cwd=ROOT)
        took.append((name, time.monotonic() - started))
        if done.returncode != 0:
            print(f"bench/{name}.py failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
    print("\n| script | wall s | its table goes in |\n| --- | --- | --- |")
    for name, seconds in took:
        print(f"| `bench/{name}.py` | {seconds:.0f} | {where.get(name, '?')} |")
    print(f"\nall: {sum(s for _, s in took):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
