"""Runs a command against a local PostgreSQL 16 kept under .devdb/ (a dev tool).

    python tools/embedded_postgres.py [--database NAME] -- COMMAND [ARG...]

The cluster comes from `pgserver` (PyPI), which bundles PostgreSQL 16: its data
lives in .devdb/pgdata and survives between runs; the server listens on a Unix
socket only (inside the data directory when the path is short enough), so it
never collides with a PostgreSQL on port 5432. As root, pgserver runs the server
as a system user `pgserver` that it creates itself.

The command gets DATABASE_URL (`postgresql://postgres@/NAME?host=SOCKET_DIR`,
which asyncpg and libpq both accept) plus PGHOST, PGPORT, PGUSER and PGDATABASE
for psql. The database is created when missing. SIGINT, SIGTERM and SIGHUP are
passed on to the command, which decides when it is done. The command's exit
status becomes ours (128 + N when signal N ended it).

Several runs may share the cluster at once (say `make run` beside `make test`):
the first starts it, each registers its pid in the data directory, and the last
one to finish stops it. Pids of runs that died without cleaning up are dropped
before registering, so a killed run never keeps the cluster up for good.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

try:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, containers, root
        # shells) and falls back to /tmp/runtime-UID, which is fine for a lock file.
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
        from pgserver.postgres_server import PostgresServer, get_server
except ModuleNotFoundError:
    # Started by a Python without the dev dependencies: rerun under the project's venv.
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        os.execv(VENV_PYTHON, [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    sys.exit("embedded_postgres: pgserver is not installed; run `make venv` first")

DEFAULT_PGDATA = REPO / ".devdb" / "pgdata"
SUPERUSER = "postgres"  # pgserver runs initdb with -U postgres and trust auth.

# Signals passed on to the command. SIGCHLD only wakes the wait loop.
FORWARDED = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
WAITED = FORWARDED | {signal.SIGCHLD}

# Creates the database unless it exists; psql quotes :'db' itself.
CREATE_DATABASE_SQL = """\
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')
\\gexec
"""


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # Signal 0 only asks whether the pid exists.
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # It exists, under another user.
    return True


def forget_dead_holders(pgdata: Path) -> None:
    """Drop pids of runs that died from pgserver's list of processes using the cluster.

    pgserver stops the server only when the last registered pid cleans up, so a
    run killed with SIGKILL would otherwise keep every later run from stopping it.
    """
    holders_path = pgdata / ".handle_pids.json"
    # pgserver 0.1.4 guards this file with this lock; the version is pinned.
    with PostgresServer._lock:
        if not holders_path.exists():
            return
        holders = json.loads(holders_path.read_text())
        alive = [pid for pid in holders if process_exists(pid)]
        if alive != holders:
            holders_path.write_text(json.dumps(alive))


def database_url(socket_dir: Path, port: int, database: str) -> str:
    url = f"postgresql://{SUPERUSER}@/{quote(database, safe='')}?host={quote(str(socket_dir))}"
    return url if port == 5432 else f"{url}&port={port}"


def ensure_database(socket_dir: Path, port: int, database: str) -> None:
    subprocess.run(
        [
            str(POSTGRES_BIN_PATH / "psql"),
            "--no-psqlrc",
            "--quiet",
            "--set=ON_ERROR_STOP=1",
            f"--set=db={database}",
            database_url(socket_dir, port, "postgres"),
        ],
        input=CREATE_DATABASE_SQL,
        text=True,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def unblock_forwarded_signals() -> None:
    """Runs in the child between fork and exec: it must not inherit our blocked mask."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED)


def run_command(command: list[str], env: dict[str, str]) -> int:
    """Run `command`, passing signals on, and return its exit status.

    The caller has blocked WAITED, so signals queue up and are read here with
    sigtimedwait instead of interrupting whatever Python is doing.
    """
    try:
        # preexec_fn is unsafe only with threads, and this tool starts none.
        child = subprocess.Popen(command, env=env, preexec_fn=unblock_forwarded_signals)  # noqa: PLW1509
    except OSError as error:
        print(f"embedded_postgres: cannot run {command[0]}: {error}", file=sys.stderr)
        return 127
    while child.poll() is None:
        info = signal.sigtimedwait(WAITED, 1.0)
        if info is None or info.si_signo not in FORWARDED:
            continue
        # A positive si_code means the kernel sent it: Ctrl-C or a hangup from
        # the terminal, which went to the child's process group as well.
        if info.si_code > 0 and os.getpgid(child.pid) == os.getpgrp():
            continue
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(info.si_signo)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


def drain_pending_signals() -> None:
    """Consume signals that came after the command ended, so unblocking is quiet."""
    while signal.sigtimedwait(WAITED, 0) is not None:
        pass


def exit_on_sigterm(signum: int, _frame: Any) -> NoReturn:
    # Turns SIGTERM during start-up into SystemExit, so `finally` still stops the server.
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a command with DATABASE_URL pointing at a local PostgreSQL under .devdb/.",
        usage="%(prog)s [--pgdata DIR] [--database NAME] -- COMMAND [ARG...]",
    )
    parser.add_argument(
        "--pgdata",
        type=Path,
        default=DEFAULT_PGDATA,
        help="data directory, created when missing (default: %(default)s)",
    )
    parser.add_argument(
        "--database",
        default="postgres",
        help="database that DATABASE_URL names, created when missing (default: %(default)s)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run, after --")
    args = parser.parse_args(argv)
    command: list[str] = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    # pgserver logs the server log through `logging` when start-up fails.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    pgdata: Path = args.pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    forget_dead_holders(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    try:
        info = server.get_postmaster_info()
        if info.socket_dir is None or info.port is None:
            raise RuntimeError(f"pgserver reported no socket for {pgdata}: {info}")
        ensure_database(info.socket_dir, info.port, args.database)
        url = database_url(info.socket_dir, info.port, args.database)
        print(f"embedded_postgres: DATABASE_URL={url}", file=sys.stderr, flush=True)
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "PGHOST": str(info.socket_dir),
            "PGPORT": str(info.port),
            "PGUSER": SUPERUSER,
            "PGDATABASE": args.database,
        }
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
        return run_command(command, env)
    finally:
        # Stops the server unless another run still uses it. Signals stay
        # blocked meanwhile, so a second Ctrl-C cannot cut the shutdown short.
        signal.pthread_sigmask(signal.SIG_BLOCK, WAITED)
        server.cleanup()
        drain_pending_signals()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WAITED)


if __name__ == "__main__":
    sys.exit(main())
