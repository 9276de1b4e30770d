"""The `raptorflow-data` command: serve, migrate, health."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from raptorflow.data.server import config
from raptorflow.data.server.observability import logs

T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raptorflow-data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC server")
    config.add_arguments(serve)
    migrate = commands.add_parser("migrate", help="apply schema migrations and exit")
    config.add_arguments(
        migrate,
        [
            "database_url",
            "owner_database_url",
            "app_role",
            "schema",
            "tables",
            "connect_timeout",
            "connect_retry_seconds",
            "log_level",
        ],
    )
    migrate.add_argument(
        "--sync-tables",
        metavar="all|TABLE[,TABLE...]",
        help="also install change capture for sync streams on these exposed tables "
        "('all': every exposed table with a primary key); idempotent",
    )
    health = commands.add_parser(
        "health", help="probe a server's health; exit 0 only when it reports SERVING"
    )
    health.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server")
    health.add_argument(
        "--service",
        default="",
        help="service name; '' is liveness, 'readiness' follows the database",
    )
    health.add_argument(
        "--timeout", type=float, default=1.0, help="seconds to connect and to answer"
    )
    return parser


async def _migrate(settings: config.Settings, sync_tables: str | None) -> None:
    from raptorflow.data.server.app import run_migrations
    from raptorflow.data.server.db.connections import Database
    from raptorflow.data.server.sync import capture

    database = Database(settings)
    try:
        await database.open_owner()
        applied = await run_migrations(settings, database)
        print(f"applied migrations: {applied}" if applied else "schema is up to date")
        if sync_tables is not None:
            installed = await capture.install(database, settings, sync_tables)
            print(f"change capture installed on: {', '.join(installed) or 'no table'}")
    finally:
        await database.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "health":
        from raptorflow.data.server.probe import probe

        code, line = _run(probe(args.address, args.service, args.timeout))
        print(line, file=sys.stdout if code == 0 else sys.stderr)
        return int(code)
    settings = config.load(args)
    logs.setup(settings.log_level, settings.log_format)
    if not settings.database_url:
        print("error: set DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    if args.command == "migrate":
        _run(_migrate(settings, args.sync_tables))
        return 0
    from raptorflow.data.server.app import serve

    _run(serve(settings))
    return 0
