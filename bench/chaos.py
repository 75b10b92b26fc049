"""The chaos run of tests/test_chaos.py, printing its figures table (docs/reliability.md's).

    python bench/chaos.py

Starts `backbone up` (the supervisor `make run` uses) on free ports with a
temporary data folder, runs 20 users posting turns back to back, SIGKILLs
Redis, the app, the worker and PostgreSQL in turn and reports, per kill, how
long until the process was back and `/readyz` answered 200, how the turns
ending meanwhile ended, and then acknowledged messages lost or duplicated and
sessions never mined. Also prints the supervisor's CPU seconds (a poller).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from chaos_support import run_chaos  # noqa: E402


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-bench-") as logs:
        report = run_chaos(Path(logs))
    wall = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(report.table())
    print(f"turn outcomes: {dict(Counter(o.kind for o in report.outcomes))}")
    print(f"wall {wall:.0f} s; CPU of `backbone up` and what it ran (reaped): "
          f"{children.ru_utime + children.ru_stime:.1f} s; `up` exit {report.up_exit}")
    return 0 if report.lost == report.duplicated == report.unmined == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
