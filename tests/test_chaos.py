"""Chaos: under `backbone up` (what `make run` runs) and 20 users posting turns,
SIGKILL Redis, the app, the worker and PostgreSQL one after another.

The supervisor brings each back; the stack serves again by itself; no
acknowledged message is lost or duplicated; every session is mined; and no
client ever sees a 500 or a hung stream. The figures table goes to stdout and
to chaos-figures.md in pytest's temp folder (bench/chaos.py prints the same).
"""

from __future__ import annotations

from pathlib import Path

from chaos_support import run_chaos


def test_killing_each_process_in_turn_under_load_loses_nothing_and_the_stack_heals(
    tmp_path: Path,
) -> None:
    report = run_chaos(tmp_path)
    table = report.table()
    print("\n" + table)
    (tmp_path / "chaos-figures.md").write_text(table + "\n")
    tail = report.log[-4000:]
    for phase in report.phases:
        assert phase.back_after is not None, f"{phase.target} never came back\n{tail}"
        assert phase.ready_after is not None, f"/readyz stayed down after {phase.target}\n{tail}"
    assert report.acked > 0, tail
    assert report.lost == 0, table
    assert report.duplicated == 0, table
    assert report.unmined == 0, f"{table}\n{tail}"
    # What each bad outcome was, and when, from the kill of its phase's target.
    kills = {p.target: p.killed_at for p in report.phases}
    bad = [(o.kind, {t: (round(o.started - k, 2), round(o.ended - k, 2))
                     for t, k in kills.items() if k and o.started - 30 < k < o.ended + 30})
           for o in report.bad()]
    assert bad == [], table
    assert report.up_exit == 0, tail
    for phase in report.phases:
        assert f"{phase.target} stopped unexpectedly (killed by SIGKILL" in report.log or (
            phase.target == "postgres" and "postgres stopped unexpectedly" in report.log), tail
