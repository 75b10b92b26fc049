"""Imports run downward only: the layer order of `app/` is written down here, once.

A module may import its own layer or any layer below it, never one above. The
HTTP edge (`*.routes`, the app factory, state, health, the page) sits above the
packages whose routes it serves; the CLI and the local stack's processes sit on
top. `workers/` imports `app`; `app` never imports `workers`, except the CLI,
the program's one entry point, whose `backbone worker` command starts the worker
(`workers.worker`) in its own process.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("app.errors", "app.settings", "app.__init__"),
    # app.cache.decision is pure text logic (no app imports); tools read its fitted bound
    ("app.stores", "app.embeddings", "app.auth", "app.identity", "app.cache.decision", "app.ops"),
    ("app.llm", "app.tools", "app.kb"),
    ("app.sessions", "app.cache", "app.memory", "app.privacy"),
    ("app.chat",),
    # the HTTP edge: every package's routes, and what builds and serves the app
    ("app.sessions.routes", "app.cache.routes", "app.memory.routes", "app.chat.routes",
     "app.privacy.routes",
     "app.limits", "app.state", "app.health", "app.web", "app.api",
     # the OpenAI-compatible face: a projection of the chat routes' turn
     "app.openai", "app.mcp"),
    ("app.stack", "app.cli"),
]


# The only modules of app that may import workers (see the docstring).
MAY_START_WORKERS = {"app.cli"}


def layer_of(module: str) -> int:
    best, depth = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > depth:
                best, depth = i, len(name)
    if best < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every `app.*` / `workers.*` import, including `from app import x`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # `from app import keys` imports the module app.keys
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if (ROOT / Path(*node.module.split("."), a.name)).exists()
                      or (ROOT / Path(*node.module.split("."), f"{a.name}.py")).exists()]
    return [(line, m) for line, m in found if m.split(".")[0] in ("app", "workers")]


def upward_imports(modules: list[tuple[str, Path]]) -> list[str]:
    """Each import of a (module name, file) that runs to a higher layer, as 'file:line: ...'."""
    bad = []
    for here, path in modules:
        mine = layer_of(here)
        for line, target in imports_of(path):
            if target in ("app", "workers"):
                continue
            rel = f"{path.name}:{line}"
            if target.startswith("workers"):
                if here in MAY_START_WORKERS:
                    continue
                bad.append(f"{rel}: {here} imports {target} (app never imports workers)")
            elif layer_of(target) > mine:
                bad.append(f"{rel}: {here} (layer {mine}) imports {target} "
                           f"(layer {layer_of(target)})")
    return bad


def app_modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for p in sorted((ROOT / "app").rglob("*.py"))]


def test_no_module_of_app_imports_a_layer_above_its_own() -> None:
    assert upward_imports(app_modules()) == []


def test_the_check_reports_an_upward_import_and_an_import_of_workers(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from app.chat.turn import Turn\nfrom app import sessions\n"
                     "from app.stores import keys\nimport workers.jobs\n")
    assert upward_imports([("app.stores.probe", probe)]) == [
        "probe.py:1: app.stores.probe (layer 1) imports app.chat.turn (layer 4)",
        "probe.py:2: app.stores.probe (layer 1) imports app.sessions (layer 3)",
        "probe.py:4: app.stores.probe imports workers.jobs (app never imports workers)",
    ]


def test_app_has_at_most_ten_top_level_modules_besides_its_packages() -> None:
    top = sorted(p.name for p in (ROOT / "app").glob("*.py"))
    assert len(top) <= 10, top
