from __future__ import annotations

from pathlib import Path

import pytest

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
     ("RETRIEVAL_CACHE_AUDIT_RATE", "often"), ("MEMORY_LOCK_TTL_SECONDS", "0")],
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


def test_every_variable_is_in_the_readme_settings_table(project_root: Path) -> None:
    source = (project_root / "app" / "settings.py").read_text()
    import re

    readme = (project_root / "README.md").read_text()
    for name in set(re.findall(r'_(?:str|int|float|bool|choice)\(\s*e,\s*"([A-Z_]+)"', source)):
        assert f"`{name}`" in readme, f"{name} missing from the README settings table"
