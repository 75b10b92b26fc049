"""bench/ holds the product's benchmarks; bench/experiments/ the research that ended
negative, which `make bench` does not run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ("cache_crossenc", "cache_mpnet", "cache_verifiers")
sys.path.insert(0, str(ROOT / "bench"))

import run_all  # noqa: E402


def test_make_bench_runs_every_product_benchmark_and_knows_where_each_table_goes() -> None:
    names = run_all.scripts()
    assert names, "no benchmark found"
    where = run_all.destinations()
    # A benchmark without its row in docs/benchmarks.md, or a row without its script:
    assert sorted(where) == names
    for name, target in where.items():
        page = ROOT / target.partition("#")[0]
        assert page.is_file(), (name, target)
    assert "run_all.py" in (ROOT / "Makefile").read_text()


def test_the_negative_research_sits_in_experiments_out_of_make_bench() -> None:
    readme = (ROOT / "bench" / "experiments" / "README.md").read_text()
    for name in EXPERIMENTS:
        assert not (ROOT / "bench" / f"{name}.py").exists(), f"{name} is back in bench/"
        assert (ROOT / "bench" / "experiments" / f"{name}.py").is_file()
        assert f"`{name}.py" in readme, f"the README does not say what {name} showed"
        assert name not in run_all.scripts()
    assert "cache-quality.md" in readme


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_moved_experiment_still_finds_the_helpers_it_imports(name: str) -> None:
    # `--help` runs the imports (cache_quality one folder up, its neighbours here) and stops.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "experiments" / f"{name}.py"),
                           "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
