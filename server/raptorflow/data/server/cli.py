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
            "direct_database_url",
            "pgbouncer",
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
    token = commands.add_parser(
        "token",
        help="print an HS256 bearer token signed with RAPTORFLOW_JWT_SECRET (development, "
        "tests, deployments that issue their own tokens)",
    )
    config.add_arguments(token, ["jwt_secret", "jwt_issuer", "jwt_audience"])
    token.add_argument(
        "--role",
        action="append",
        dest="roles",
        metavar="ROLE",
        help="agent, memory, job or admin; repeat for several (default admin)",
    )
    token.add_argument(
        "--workspace",
        action="append",
        dest="workspaces",
        metavar="UUID",
        help="a workspace the token grants; repeat for several; '*' for every workspace "
        "(the default)",
    )
    token.add_argument("--subject", default="developer", help="the token's sub (who calls)")
    token.add_argument(
        "--ttl", type=float, default=12 * 3600, help="seconds until it expires (default 12 h)"
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
    health.add_argument(
        "--tls",
        action="store_true",
        help="connect with TLS, checking the server against the system's trusted CAs "
        "(implied by any --tls-* option)",
    )
    health.add_argument(
        "--tls-ca-file", default="", metavar="PEM", help="CA bundle the server must chain to"
    )
    health.add_argument(
        "--tls-cert-file",
        default="",
        metavar="PEM",
        help="client certificate chain, for a port requiring mutual TLS (with --tls-key-file)",
    )
    health.add_argument(
        "--tls-key-file", default="", metavar="PEM", help="private key of --tls-cert-file"
    )
    health.add_argument(
        "--tls-server-name",
        default="",
        metavar="NAME",
        help="name to check the server's certificate against instead of the address's host",
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
        from raptorflow.data.server.probe import ProbeTls, probe

        tls_options = (args.tls_ca_file, args.tls_cert_file, args.tls_key_file)
        tls = (
            ProbeTls(*tls_options, server_name=args.tls_server_name)
            if args.tls or args.tls_server_name or any(tls_options)
            else None
        )
        code, line = _run(probe(args.address, args.service, args.timeout, tls))
        print(line, file=sys.stdout if code == 0 else sys.stderr)
        return int(code)
    settings = config.load(args)
    if args.command == "token":
        from raptorflow.data.server.auth.tokens import mint

        print(
            mint(
                settings,
                subject=args.subject,
                roles=args.roles or ["admin"],
                workspaces=args.workspaces or ["*"],
                ttl_seconds=args.ttl,
            )
        )
        return 0
    logs.setup(settings.log_level, settings.log_format)
    if not settings.database_url:
        print("error: set DATABASE_URL or pass --database-url", file=sys.stderr)
        return 2
    if args.command == "migrate":
        _run(_migrate(settings, args.sync_tables))
        return 0
    if settings.workers != 1:
        from raptorflow.data.server import workers

        # A supervisor of several server processes on one port (workers.py).
        return workers.supervise(settings)
    from raptorflow.data.server.app import serve

    _run(serve(settings))
    return 0
