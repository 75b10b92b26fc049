"""bench/ holds the product's benchmarks; bench/experiments/ the research that ended
negative, which `make bench` does not run. `make bench` is a quick pass (`run_all.QUICK`),
`--full` each script's own defaults."""

from __future__ import annotations

import contextlib
import io
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


# Runs a bench script as __main__ up to its argparse and stops there: the arguments are
# checked by the script's own parser (names, types, choices), and no benchmark runs.
PARSE_ONLY = """
import argparse, runpy, sys
class Parsed(Exception):
    pass
real = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    real(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except Parsed:
    sys.exit(0)
sys.exit("the script ran without parsing its arguments")
"""


def test_every_benchmark_has_quick_arguments_and_full_mode_passes_none() -> None:
    assert sorted(run_all.QUICK) == run_all.scripts()
    for name in run_all.scripts():
        assert run_all.arguments(name, full=True) == []
        assert run_all.arguments(name, full=False) == run_all.QUICK[name]


@pytest.mark.parametrize("name", sorted(run_all.QUICK))
def test_each_quick_argument_is_one_its_script_accepts(name: str) -> None:
    script = ROOT / "bench" / f"{name}.py"
    if "ArgumentParser" not in script.read_text():
        # chaos.py takes no arguments, and `--help` would run it.
        assert run_all.QUICK[name] == [], f"{name} has no parser for its quick arguments"
        return
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, str(script), *run_all.QUICK[name]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_docs_state_each_quick_argument_and_how_to_run_the_full_figures() -> None:
    docs = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "bench/run_all.py --full" in docs
    for name, args in run_all.QUICK.items():
        shown = f"`{' '.join(args)}`" if args else "(none"
        assert f"| `bench/{name}.py` | {shown}" in docs, f"docs/benchmarks.md: {name}'s quick row"


def _dry_run(*argv: str) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_all.main(["--dry-run", *argv]) == 0
    return out.getvalue().splitlines()


def test_the_dry_run_prints_quick_full_and_selected_command_lines() -> None:
    quick = _dry_run()
    assert quick == [" ".join([f"bench/{n}.py", *run_all.QUICK[n]]) for n in run_all.scripts()]
    assert _dry_run("--full") == [f"bench/{n}.py" for n in run_all.scripts()]
    assert _dry_run("turn_cpu", "chaos") == [
        " ".join(["bench/turn_cpu.py", *run_all.QUICK["turn_cpu"]]), "bench/chaos.py"]
    with pytest.raises(SystemExit):
        run_all.main(["--dry-run", "no_such_bench"])
