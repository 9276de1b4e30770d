"""A real PgBouncer (Debian's `pgbouncer` package, 1.18) in transaction pooling mode, started
on loopback with its own configuration, port and directory (tests and `bench.pgbouncer`).

PgBouncer refuses to run as root, so as root it runs as the `postgres` system user,
or, in front of a PostgreSQL on a Unix socket (the embedded pgserver cluster), as the
socket's owner, who can reach it; `setpriv` drops the privileges, so it works under
any event loop (uvloop's subprocesses take no `user=`). Where it cannot run (no
binary, no user to run as), `start()` raises `PgBouncerUnavailable` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import pwd
import shutil
import signal
import socket
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

BINARY = "pgbouncer"
RUN_AS = ("postgres", "pgserver")
# The admin console's own database name.
ADMIN_DATABASE = "pgbouncer"


def binary() -> str | None:
    return shutil.which(BINARY) or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.path.exists(p)), None
    )


class PgBouncerUnavailable(Exception):
    """PgBouncer cannot run here; the message says why."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _backend(database_url: str) -> tuple[str, int]:
    """PostgreSQL's host (or socket directory) and port as `database_url` names them."""
    parts = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    return host, port


def _user(database_url: str) -> str:
    return urllib.parse.urlsplit(database_url).username or "postgres"


def through(database_url: str, port: int, database: str | None = None) -> str:
    """`database_url` with its host and port replaced by PgBouncer's (and its database by
    `database`, if given)."""
    parts = urllib.parse.urlsplit(database_url)
    netloc = f"{parts.username or 'postgres'}@127.0.0.1:{port}"
    path = parts.path if database is None else "/" + database
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, path=path, query=""))


class PgBouncer:
    """One pgbouncer process in front of the PostgreSQL of `database_url`."""

    def __init__(self, database_url: str, *, pool_size: int = 3, users: tuple[str, ...] = ()):
        self.database_url = database_url
        self.pool_size = pool_size
        self.users = (_user(database_url), *users)
        self.port = 0
        self.directory = ""
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """`database_url` through PgBouncer."""
        return through(self.database_url, self.port)

    def config(self, host: str, port: int) -> str:
        auth = "\n".join(f'"{u}" ""' for u in self.users)
        Path(self.directory, "userlist.txt").write_text(auth + "\n")
        return f"""[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
pidfile = {self.directory}/pgbouncer.pid
logfile = {self.directory}/pgbouncer.log
auth_type = trust
auth_file = {self.directory}/userlist.txt
admin_users = {self.users[0]}
stats_users = {self.users[0]}
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 2000
server_login_retry = 1
log_connections = 0
log_disconnections = 0
"""

    async def start(self) -> None:
        executable = binary()
        if executable is None:
            raise PgBouncerUnavailable(
                "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
            )
        host, port = _backend(self.database_url)
        socket_owner = None
        if not host or host.startswith("/"):
            # The embedded pgserver cluster listens on a Unix socket only. Its user (as
            # root, `pgserver`) can reach it, so PgBouncer runs as the socket's owner.
            host = host or "/var/run/postgresql"
            try:
                socket_owner = _socket_owner(f"{host}/.s.PGSQL.{port}")
            except OSError as exc:
                raise PgBouncerUnavailable(
                    f"cannot reach PostgreSQL's socket in {host}: {exc}"
                ) from exc
        run_as = None
        if os.geteuid() == 0:
            run_as = socket_owner or next((u for u in RUN_AS if _exists(u)), None)
            if run_as is None or run_as == "root":
                raise PgBouncerUnavailable(
                    "running as root and no postgres user exists to run pgbouncer as"
                )
        config = self._write_files(host, port, run_as)
        command = [executable, str(config)]
        if run_as is not None:
            drop = ["setpriv", f"--reuid={run_as}", f"--regid={run_as}", "--clear-groups"]
            command = [*drop, *command]
        self._process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await self._wait_until_accepting()

    def _write_files(self, host: str, port: int, run_as: str | None) -> Path:
        """The directory, the configuration and the auth file, owned by PgBouncer's user."""
        self.directory = tempfile.mkdtemp(prefix="raptorflow-pgbouncer-")
        self.port = _free_port()
        config = Path(self.directory, "pgbouncer.ini")
        config.write_text(self.config(host, port))
        if run_as is not None:
            user = pwd.getpwnam(run_as)
            for path in (Path(self.directory), *Path(self.directory).iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        return config

    async def _wait_until_accepting(self, within: float = 20.0) -> None:
        started = time.monotonic()
        while True:
            if self._process is not None and self._process.returncode is not None:
                raise RuntimeError(f"pgbouncer exited at start-up: {self.log()}")
            try:
                conn = await asyncpg.connect(self.url, statement_cache_size=0, timeout=2.0)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() - started >= within:
                    raise RuntimeError(
                        f"pgbouncer never accepted connections: {self.log()}"
                    ) from None
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            return

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.directory, "pgbouncer.log").read_text()[-4000:]
        return ""

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                async with asyncio.timeout(10.0):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def show(self, what: str) -> list[dict[str, str]]:
        """`SHOW <what>` on the admin console, as rows of text (psql: the console speaks only
        the simple query protocol, and asyncpg reads rows only through the extended one)."""
        psql = shutil.which("psql")
        assert psql is not None, "psql is needed to read PgBouncer's admin console"
        process = await asyncio.create_subprocess_exec(
            psql,
            "--no-psqlrc",
            "--csv",
            "--command",
            f"SHOW {what}",
            through(self.database_url, self.port, ADMIN_DATABASE),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(20.0):
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return list(csv.DictReader(io.StringIO(out.decode())))

    async def admin(self, command: str) -> None:
        """Runs an admin console command (RECONNECT, KILL, ...)."""
        conn = await asyncpg.connect(
            through(self.database_url, self.port, ADMIN_DATABASE), statement_cache_size=0
        )
        try:
            await conn.execute(command)
        finally:
            await conn.close()


def _socket_owner(path: str) -> str:
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@contextlib.asynccontextmanager
async def running_pgbouncer(database_url: str, **options: object) -> AsyncIterator[PgBouncer]:
    """A started PgBouncer in front of `database_url`'s PostgreSQL, stopped afterwards."""
    bouncer = PgBouncer(database_url, **options)  # type: ignore[arg-type]
    try:
        await bouncer.start()
        yield bouncer
    finally:
        await bouncer.stop()
