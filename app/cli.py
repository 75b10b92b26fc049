"""The `backbone` command.

    backbone up [--cluster]     embedded stores + app + one worker (what `make run` runs);
                                --cluster: the session plane on an embedded Redis Cluster
    backbone serve              the API on HOST:PORT
    backbone worker             one rq worker
    backbone doctor             versions, modules, ports, index and table status
    backbone index create|info|drop
    backbone ingest PATH...     chunk + embed files into the knowledge base (idempotent per file)
    backbone ingest --delete PATH...  remove those documents
    backbone cache stats|clear [--tool T]
    backbone keys [--json]      count, TTL range, memory per key family of the live Redis
    backbone token --user NAME  a bearer token signed with AUTH_SECRET (or .data/auth-secret)
    backbone erase --user NAME  erase everything held about a user (as DELETE /v1/me)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from app.auth import issue_token, with_secret
from app.errors import BackboneError
from app.ops import gc_tuning, logs, metrics, tracing
from app.settings import Settings
from app.stack import running as running_stack
from app.stack.bootstrap import eviction_warning, prepare
from app.stack.cluster import EmbeddedCluster
from app.stack.embedded import EmbeddedStack, check_port_free, running_urls
from app.stores import indexes, keys, migrations
from app.stores.clients import check_modules, pg_connect, redis_client

Command = Callable[[Settings, argparse.Namespace], int]
LOCAL_USER = "local"
KEEP_ALIVE_SECONDS = 30
# The event loop uvicorn runs (an import string: uvicorn imports it in `serve`).
SERVE_LOOP = "app.ops.event_loop:AcceptingLoop"
ENDS_WITHOUT_TEARDOWN = ("up", "serve", "worker")


def _dims(settings: Settings) -> int | None:
    """The vector width for the indexes: the YAML's unless another model is configured."""
    if settings.embedding_model is None:
        return None
    from app.embeddings import shared_embedder

    return shared_embedder(settings.embedding_model).dims


@contextlib.contextmanager
def _stores(settings: Settings, *, attach: bool = True) -> Iterator[Settings]:
    """Resolved settings, the embedded servers started (or reused) for as long as needed."""
    stack = EmbeddedStack(settings)
    resolved = stack.start(attach=attach)
    print(f"backbone: {stack.describe()}", file=sys.stderr, flush=True)
    try:
        yield resolved
    finally:
        stack.stop()


def _running(settings: Settings) -> Settings:
    _say_which(settings)
    redis_url, db_url = running_urls(settings)
    if redis_url is None or db_url is None:
        missing = " and ".join(
            n for n, u in (("Redis", redis_url), ("PostgreSQL", db_url)) if u is None
        )
        raise BackboneError(
            f"embedded {missing} not running: start them with `make run` (or `backbone up`), "
            "or set REDIS_URL / DATABASE_URL"
        )
    return settings.with_urls(redis_url, db_url)


def _say_which(settings: Settings) -> str:
    """Tell the user (on stderr) which stores an inspecting command reads."""
    live = running_stack.use(settings)[1]
    which = (f"using {live.describe()}" if live is not None else
             f"no running `backbone up` recorded in {settings.data_dir}: using the "
             "environment's URLs, else the embedded servers of that data folder")
    print(f"backbone: {which}", file=sys.stderr, flush=True)
    return which


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from app.stack.supervisor import (
        ProcessChild,
        Supervisor,
        cluster_children,
        dashboard_child,
        dashboard_port,
        store_children,
    )

    # A SIGTERM (systemd, a supervisor, `kill`) or SIGHUP (the terminal closed) stops
    # everything like Ctrl-C does: the children, in their own process groups, get neither.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    settings = with_secret(settings)
    # Before anything starts or the banner is printed (uvicorn would fail to bind last).
    check_port_free(settings.host, settings.port, "the app", "PORT")
    stack = EmbeddedStack(settings)
    print("starting the stores ...", flush=True)
    resolved = stack.start()
    try:
        cluster = _start_session_cluster(resolved) if args.cluster else None
    except BaseException:
        stack.stop()
        raise
    # The other commands find these stores (and the session cluster) from here.
    running_stack.record(resolved, session_redis_url=cluster.url if cluster else "")
    env = {**os.environ, "REDIS_URL": resolved.redis_url or "",
           "DATABASE_URL": resolved.database_url or "",
           "AUTH_SECRET": resolved.auth_secret or ""}
    if cluster is not None:
        env.update(SESSION_REDIS_URL=cluster.url, SESSION_REDIS_CLUSTER="1")
    if not env.get(metrics.MULTIPROC_ENV):  # the app and the worker share their metrics
        env[metrics.MULTIPROC_ENV] = str(metrics.fresh_multiproc_dir(resolved.data_dir))
    # From here on a child that exits is restarted, not a reason to stop (app.supervisor).
    board_port = dashboard_port()
    # The app's stop is its drain: past it uvicorn itself cuts what still runs.
    app = ProcessChild("app", "serve", env, stop_wait=_drain_seconds(resolved) + 5)
    supervisor = Supervisor([*store_children(stack), *cluster_children(cluster), app,
                             ProcessChild("worker", "worker", env),
                             dashboard_child(resolved.redis_url or "", board_port, env)])
    try:
        prepared = prepare(resolved, _dims(resolved))
        _ingest_sample_if_empty(resolved)
        supervisor.start()
        _print_banner(resolved, prepared.indexes_created, prepared.migrations_applied,
                      board_port, cluster)
        return supervisor.run()
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        supervisor.stop()
        running_stack.forget(resolved.data_dir)
        if cluster is not None:
            cluster.stop()
        stack.stop()
        print("stopped everything `backbone up` started.", flush=True)


def _start_session_cluster(settings: Settings) -> EmbeddedCluster:
    """`up --cluster`: the session plane on 3 primaries + 3 replicas under
    `<DATA_DIR>/cluster`, on the ports of the last run (app.stack.cluster)."""
    cluster = EmbeddedCluster.in_folder(settings.data_dir / "cluster")
    print(f"starting the session-plane cluster ({cluster.url}) ...", flush=True)
    cluster.start()
    return cluster


def _ingest_sample_if_empty(settings: Settings) -> None:
    from app.embeddings import shared_embedder
    from app.kb.ingest import ingest_paths, kb_is_empty, sample_corpus_dir

    client = redis_client(settings.redis_url or "")
    try:
        if kb_is_empty(client):
            print("the knowledge base is empty: ingesting the sample corpus ...", flush=True)
            report = ingest_paths(client, shared_embedder(settings.embedding_model),
                                  [sample_corpus_dir()])
            print(f"ingested {report.files_ingested} files, {report.chunks_written} chunks",
                  flush=True)
    finally:
        client.close()


def backbone_command() -> str:
    """`backbone` as the user can type it where they stand: `.venv/bin/backbone` under
    `make run` (the venv is not on PATH), plain `backbone` when PATH finds this one."""
    script = Path(sys.executable).parent / "backbone"
    if not script.exists() or shutil.which("backbone") == str(script):
        return "backbone"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _print_banner(s: Settings, created: list[str], applied: list[str],
                  board_port: int, cluster: EmbeddedCluster | None = None) -> None:
    base = f"http://{s.host}:{s.port}"
    backbone = backbone_command()
    lines = [
        "",
        "redis-backbone is up",
        f"  app          {base}/   (readiness: {base}/readyz)",
        f"  redis        {s.redis_url}",
        f"  postgres     {s.database_url}",
        f"  data folder  {s.data_dir}",
    ]
    if s.redis_url and s.redis_url.startswith("redis://127.0.0.1:"):
        port = s.redis_url.rsplit(":", 1)[1].split("/")[0]
        lines.append(f"  inspect      redis-cli -p {port}    (FT._LIST; no redis-cli? apt install "
                     f"redis-tools, or {backbone} keys)")
    if cluster is not None:
        lines.append(f"  sessions     {cluster.describe()}")
        lines.append(f"               redis-cli -c -p {cluster.ports[0]}    (CLUSTER NODES)")
    lines.append(f"  rq dashboard http://127.0.0.1:{board_port}/   (queues, workers, jobs)")
    who = ("with Authorization: Bearer $METRICS_TOKEN" if s.metrics_token
           else "from this machine only; set METRICS_TOKEN to scrape from elsewhere")
    lines.append(f"  metrics      {base}/metrics   (Prometheus, app and worker together; {who})")
    token = issue_token(s.auth_secret or "", LOCAL_USER)
    lines.append(f"  chat page    {base}/#token={token}")
    lines.append(f"  token        {token}")
    lines.append(f"               (user '{LOCAL_USER}'; another: {backbone} token --user NAME)")
    if created:
        lines.append(f"  created indexes: {', '.join(created)}")
    if applied:
        lines.append(f"  applied migrations: {', '.join(applied)}")
    lines.append("  Ctrl-C stops everything started here; the data stays for the next run.")
    print("\n".join(lines), flush=True)


def _drain_seconds(settings: Settings) -> int:
    """uvicorn's graceful-shutdown timeout: past the streams' own shutdown grace
    (app.chat.routes) and the margin for their last event."""
    from app.chat.routes import STOP_MARGIN_SECONDS

    return int(settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS) + 2


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.api import create_app

    # SIGTERM stops like Ctrl-C: uvicorn drains, then re-raises the signal it caught,
    # which must end in KeyboardInterrupt (uvicorn.run returns), not kill us before
    # the stores this command started are stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    # Only with OTEL_EXPORTER_OTLP_ENDPOINT set; before the app opens its clients.
    tracing.setup("backbone-api")
    with _stores(with_secret(settings)) as resolved:
        prepare(resolved, _dims(resolved))
        drain = _drain_seconds(resolved)
        app = create_app(resolved)
        gc_tuning.tune()  # start-up's objects out of every collection, rarer collections
        uvicorn.run(
            app, host=resolved.host, port=resolved.port,
            log_level=resolved.log_level.lower(),
            # Past the streams' own shutdown grace (app.chat.routes): uvicorn cancels
            # what still runs after this, cutting a turn's last event.
            timeout_graceful_shutdown=drain,
            # uvicorn's 5 s default closes idle keep-alive connections while busy
            # clients are about to reuse them (ReadErrors at 500 streams); proxies
            # in front should time out idle connections sooner than this.
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            # uvloop and httptools: less CPU per event written than asyncio + h11;
            # uvloop accepting every waiting connection at once (app.ops.event_loop).
            loop=SERVE_LOOP, http="httptools",
        )
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from workers.worker import run_worker

    tracing.setup("backbone-worker")
    with _stores(settings) as resolved:
        # run_worker prepares the stores itself, once they answer: it may start before them.
        run_worker(resolved, burst=args.burst, dims=_dims(resolved))
    return 0


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("redis", "redisvl", "sentence-transformers", "torch", "starlette",
                 "sse-starlette", "psycopg", "rq"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    report: dict[str, object] = {"versions": _versions(), "data_dir": str(settings.data_dir),
                                 "stack": _say_which(settings)}
    ok = True
    redis_url, db_url = running_urls(settings)
    redis_report: dict[str, object] = {"url": redis_url or settings.redis_url}
    if redis_url is None:
        ok = False
        redis_report["error"] = (
            f"embedded Redis not running on port {settings.embedded_redis_port} (make run)"
        )
    else:
        client = redis_client(redis_url)
        try:
            redis_report["server"] = client.info("server").get("redis_version")
            redis_report["modules"] = check_modules(client)
            redis_report["indexes"] = indexes.status(client)
            redis_report["eviction_warning"] = eviction_warning(client)
            ok = ok and all(i["exists"] for i in redis_report["indexes"].values())  # type: ignore[attr-defined]
        except Exception as e:
            ok = False
            redis_report["error"] = str(e)
        finally:
            client.close()
    report["redis"] = redis_report
    pg_report: dict[str, object] = {"url": db_url or settings.database_url}
    if db_url is None:
        ok = False
        pg_report["error"] = "embedded PostgreSQL not running (make run)"
    else:
        try:
            with pg_connect(db_url, autocommit=True) as conn:
                row = conn.execute("SHOW server_version").fetchone()
                pg_report["server"] = row[0] if row else None
                pg_report["migrations_applied"] = sorted(migrations.applied(conn))
                pg_report["migrations_pending"] = [m.version for m in migrations.pending(conn)]
                ok = ok and not pg_report["migrations_pending"]
        except Exception as e:
            ok = False
            pg_report["error"] = str(e)
    report["postgres"] = pg_report
    report["ok"] = ok
    print(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


def cmd_index(settings: Settings, args: argparse.Namespace) -> int:
    resolved = _running(settings)
    client = redis_client(resolved.redis_url or "")
    try:
        if args.action == "create":
            check_modules(client)
            created = indexes.create_all(client, _dims(resolved))
            print(f"created: {', '.join(created) or 'nothing (all exist)'}")
        elif args.action == "drop":
            dropped = indexes.drop_all(client, with_documents=args.with_documents)
            print(f"dropped: {', '.join(dropped) or 'nothing'}")
        else:
            info: dict[str, dict[str, object]] = indexes.status(client)
            for name, row in info.items():
                if row["exists"]:  # which embedding model built what
                    row["models"] = indexes.models(client, name)
            print(json.dumps(info, indent=2))
    finally:
        client.close()
    return 0


def cmd_ingest(settings: Settings, args: argparse.Namespace) -> int:
    from app.embeddings import shared_embedder
    from app.kb.ingest import delete_paths, ingest_paths

    with _stores(settings) as resolved:
        prepare(resolved, _dims(resolved))
        client = redis_client(resolved.redis_url or "")
        try:
            if args.delete:
                removed = delete_paths(client, [Path(p) for p in args.paths])
            else:
                report = ingest_paths(client, shared_embedder(resolved.embedding_model),
                                      [Path(p) for p in args.paths], scope=args.scope,
                                      progress=not args.quiet)
        finally:
            client.close()
    if args.delete:
        print(f"{removed} documents removed")
        return 0
    print(f"{report.files_seen} files: {report.files_ingested} ingested "
          f"({report.chunks_written} chunks), {report.files_unchanged} unchanged")
    return 0


def cmd_cache(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    from app.cache.stats import cache_stats, clear_cache
    from app.stores.clients import async_redis_client

    resolved = _running(settings)
    if args.action == "clear":
        client = redis_client(resolved.redis_url or "")
        try:
            print(f"removed {clear_cache(client, args.tool)} cache entries")
        finally:
            client.close()
        return 0

    async def report() -> dict[str, dict[str, object]]:
        redis = async_redis_client(resolved.redis_url or "")
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            resolved.database_url or "", min_size=1, max_size=1, open=False)
        await pool.open()
        try:
            return await cache_stats(redis, pool)
        finally:
            await pool.close()
            await redis.aclose()

    rows = asyncio.run(report())
    if args.tool:
        rows = {k: v for k, v in rows.items() if k == args.tool}
    print(json.dumps(rows, indent=2))
    return 0


def cmd_keys(settings: Settings, args: argparse.Namespace) -> int:
    from app.ops.keyspace import survey, table

    client = redis_client(_running(settings).redis_url or "")
    try:
        rows = survey(client, sample=args.sample)
    finally:
        client.close()
    if args.json:
        print(json.dumps([{"family": f.pattern, "keys": f.count, "no_ttl": f.no_ttl,
                           "ttl_min_ms": f.ttl_min_ms, "ttl_max_ms": f.ttl_max_ms,
                           "memory_bytes": f.memory_bytes(), "memory_sampled": len(f.sampled)}
                          for f in rows], indent=2))
    else:
        print(table(rows))
    return 0


def cmd_erase(settings: Settings, args: argparse.Namespace) -> int:
    """Erase everything held about one user (as `DELETE /v1/me`); safe to run again."""
    import asyncio

    from app.privacy.erase import erase_user

    removed = asyncio.run(erase_user(_running(settings), keys.check_user_id(args.user)))
    print(json.dumps({"user": args.user, "status": "erased", "removed": removed}, indent=2))
    return 0


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    secret = with_secret(settings).auth_secret or ""
    claims = None
    if args.tenant is not None:
        if not settings.auth_tenant_claim:
            raise BackboneError("--tenant needs AUTH_TENANT_CLAIM (the claim to put it in)")
        claims = {settings.auth_tenant_claim: keys.check_user_id(args.tenant)}
    print(issue_token(secret, args.user, ttl_seconds=args.days * 86400, claims=claims))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backbone", description="redis-backbone")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up", help="embedded stores + app + worker (make run)")
    u.add_argument("--cluster", action="store_true",
                   help="the session plane on an embedded 3-primary, 3-replica Redis Cluster")
    u.set_defaults(fn=cmd_up)
    sub.add_parser("serve", help="run the API").set_defaults(fn=cmd_serve)
    w = sub.add_parser("worker", help="run one rq worker")
    w.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    w.set_defaults(fn=cmd_worker)
    sub.add_parser("doctor", help="check versions, modules, indexes, tables").set_defaults(
        fn=cmd_doctor
    )
    g = sub.add_parser("ingest", help="chunk, embed and index text/markdown files for kb_search")
    g.add_argument("paths", nargs="+", help="files or folders (.md .markdown .txt .rst)")
    g.add_argument("--scope", default="global", help="global (default) or user:<id>")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--delete", action="store_true",
                   help="remove the documents ingested from these paths instead")
    g.set_defaults(fn=cmd_ingest)
    c = sub.add_parser("cache", help="semantic cache statistics, or clear it")
    c.add_argument("action", choices=["stats", "clear"])
    c.add_argument("--tool", help="only this tool (e.g. kb_search)")
    c.set_defaults(fn=cmd_cache)
    k = sub.add_parser("keys", help="count, TTL range and memory per key family (one SCAN)")
    k.add_argument("--sample", type=int, default=20,
                   help="MEMORY USAGE of this many keys per family (default 20)")
    k.add_argument("--json", action="store_true", help="JSON instead of a table")
    k.set_defaults(fn=cmd_keys)
    t = sub.add_parser("token", help="print a bearer token for a user")
    t.add_argument("--user", required=True)
    t.add_argument("--days", type=int, default=30, help="validity (default 30)")
    t.add_argument("--tenant", help="the tenant id, in the AUTH_TENANT_CLAIM claim")
    t.set_defaults(fn=cmd_token)
    e = sub.add_parser("erase", help="erase everything held about a user (idempotent)")
    e.add_argument("--user", required=True)
    e.set_defaults(fn=cmd_erase)
    i = sub.add_parser("index", help="manage the RediSearch indexes")
    i.add_argument("action", choices=["create", "info", "drop"])
    i.add_argument("--with-documents", action="store_true",
                   help="with drop: delete the indexed hashes too")
    i.set_defaults(fn=cmd_index)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        # LOG_FORMAT=json: one JSON object per line, with request, session and turn ids.
        logs.setup(settings.log_level, settings.log_format)
        # pgserver narrates every initdb and pg_ctl at INFO; keep the banner readable.
        logging.getLogger("pgserver").setLevel(logging.WARNING)
        fn: Command = args.fn
        code = fn(settings, args)
    except BackboneError as e:
        print(f"backbone: {e.message}", file=sys.stderr)
        return 2
    if args.command in ENDS_WITHOUT_TEARDOWN:
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """End a stopped `up`, `serve` or `worker` without the interpreter's teardown.

    Everything they started is stopped and closed by now (pools, clients, stores,
    children); what is left is unloading modules, and with sentence-transformers and
    torch imported that took 0.3 s idle and up to 3 s on a busy machine: a good part
    of each Ctrl-C, paid once by every process (docs/reliability.md).
    """
    tracing.flush()  # spans still batched: the exporter's own atexit hook will not run
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
