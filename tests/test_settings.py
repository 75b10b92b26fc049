from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from docs_pages import section

from app.errors import SettingsError
from app.settings import Settings


def test_with_no_environment_everything_defaults_to_the_embedded_stack() -> None:
    s = Settings.from_env({})
    assert s.redis_url is None and s.database_url is None and s.embedded
    assert s.retrieval_cache_audit_rate == 0.05
    assert s.session_ttl_seconds == 86400
    assert s.memory_lock_ttl_seconds == 300


@pytest.mark.parametrize(
    ("name", "value"),
    [("SESSION_TTL_SECONDS", "soon"), ("PORT", "-1"), ("RETRIEVAL_CACHE_AUDIT_RATE", "1.5"),
     ("RETRIEVAL_CACHE_AUDIT_RATE", "often"), ("MEMORY_LOCK_TTL_SECONDS", "0"),
     ("PG_POOL_SIZE", "0")],
)
def test_a_malformed_variable_fails_loudly_naming_it(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_every_variable_read_is_listed_in_env_example(project_root: Path) -> None:
    source = (project_root / "app" / "settings.py").read_text()
    import re

    read = set(re.findall(r'_(?:str|int|float|bool|choice)\(\s*e,\s*"([A-Z_]+)"', source))
    listed = set(re.findall(r"^#?\s*([A-Z_]+)=", (project_root / ".env.example").read_text(), re.M))
    assert read == listed


def _settings_rows(text: str) -> dict[str, str]:
    return {m.group(1): line for line in text.splitlines()
            if (m := re.match(r"^\| `([A-Z_]+)` \|", line))}


def _variables_read(project_root: Path) -> set[str]:
    source = (project_root / "app" / "settings.py").read_text()
    return set(re.findall(r'_(?:str|int|float|bool|choice)\(\s*e,\s*"([A-Z_]+)"', source))


def test_every_variable_has_a_row_in_the_docs_settings_table(project_root: Path) -> None:
    full = _settings_rows(section((project_root / "docs" / "operations.md").read_text(),
                                  "Settings"))
    read = _variables_read(project_root)
    assert read - set(full) == set(), "missing from the settings table of docs/operations.md"
    assert set(full) - read == set(), "in the settings table but not read by app/settings.py"


def test_the_readmes_main_settings_are_rows_of_the_full_table(project_root: Path) -> None:
    full = _settings_rows(section((project_root / "docs" / "operations.md").read_text(),
                                  "Settings"))
    main = _settings_rows(section((project_root / "README.md").read_text(), "Main settings"))
    assert len(main) >= 8
    for name, row in main.items():
        assert name in full, f"{name} in the README is not a setting"
        # Same default and meaning; only a link into the docs may be added in the README.
        unlinked = [re.sub(r" \(\[[^\]]*\]\([^)]*\)\)", "", r) for r in (row, full[name])]
        assert unlinked[0] == unlinked[1], name


def test_the_app_holds_at_most_pg_pool_size_postgresql_connections(settings: Settings) -> None:
    from starlette.testclient import TestClient

    from app.api import create_app

    sized = dataclasses.replace(settings, pg_pool_size=3)
    with TestClient(create_app(sized)) as client:
        pool = client.app_state["backbone"].pg
        assert (pool.min_size, pool.max_size) == (1, 3)
    assert Settings.from_env({}).pg_pool_size == 10
