"""A throwaway PostgreSQL 16 cluster (pgserver's binaries) that a test stops and starts
again: a real database restart, on a Unix socket, without touching the session's PostgreSQL.

initdb refuses to run as root, so as root the cluster belongs to pgserver's system user
`pgserver` (created when missing, as pgserver itself does) and every command runs through
`runuser`. pgserver's own wrapper passes `user=` to subprocess instead, which makes Python
fork() rather than vfork(): in a process where gRPC threads are busy, gRPC's fork handlers
then crashed the child (pg_ctl "died with SIGSEGV"), so this helper calls the binaries
itself. The blocking calls run in a thread: the server under test shares the test's event
loop and must keep running while PostgreSQL goes away and comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

SUPERUSER = "postgres"
SYSTEM_USER = "pgserver"
PORT = 5432  # on a socket in the cluster's own directory: no clash with any other server
StopMode = Literal["smart", "fast", "immediate"]


def _binaries() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset.
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    path: Path = POSTGRES_BIN_PATH
    return path


def _open_to_others(path: Path) -> None:
    """Lets another user traverse every directory above `path` (as pgserver does)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        parent.chmod(mode | stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)


class EmbeddedCluster:
    """One cluster in a temporary directory; use with `running_cluster()`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_dir = data_dir
        self.log = data_dir / "log"
        self._bin = _binaries()
        self._as_user: list[str] = []
        self.running = False
        self.restarts = 0

    def url(self, database: str = "postgres") -> str:
        """A superuser URL of `database` over the cluster's Unix socket."""
        query = urllib.parse.urlencode({"host": str(self.socket_dir), "port": str(PORT)})
        return f"postgresql://{SUPERUSER}@/{urllib.parse.quote(database, safe='')}?{query}"

    def _run(self, program: str, *args: str) -> None:
        command = [*self._as_user, str(self._bin / program), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                + (self.log.read_text() if self.log.exists() else "")
            )

    def _init(self) -> None:
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                subprocess.run(["useradd", "-s", "/bin/bash", SYSTEM_USER], check=True)
                entry = pwd.getpwnam(SYSTEM_USER)
            _open_to_others(self.data_dir)
            _open_to_others(self._bin)
            for directory in (self._bin, self._bin.parent / "lib"):
                for path in [directory, *directory.rglob("*")]:
                    mode = path.stat().st_mode
                    path.chmod(mode | stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root needs runuser to start PostgreSQL as pgserver")
            self._as_user = [runuser, "-u", SYSTEM_USER, "--"]
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--auth-local=trust",
            "--encoding=utf8",
            "-U",
            SUPERUSER,
        )
        self._start()

    def _start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-o",
            f'-h "" -k {self.socket_dir} -p {PORT}',
            "-l",
            str(self.log),
            "start",
        )
        self.running = True

    def _stop(self, mode: StopMode) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", mode, "stop")
        self.running = False

    async def stop(self, mode: StopMode = "fast") -> None:
        """Stops PostgreSQL: `fast` ends every session (SQLSTATE 57P01), `immediate` is a
        crash (no shutdown checkpoint; recovery replays the WAL at the next start)."""
        await asyncio.to_thread(self._stop, mode)

    async def start(self) -> None:
        """Starts it again on the same socket; returns once it accepts connections."""
        await asyncio.to_thread(self._start)
        self.restarts += 1


@contextlib.contextmanager
def running_cluster(prefix: str = "raptorflow-restart-") -> Iterator[EmbeddedCluster]:
    """A new running cluster, stopped and deleted at the end."""
    with tempfile.TemporaryDirectory(prefix=prefix) as data_dir:
        cluster = EmbeddedCluster(Path(data_dir))
        cluster._init()
        try:
            yield cluster
        finally:
            if cluster.running:
                with contextlib.suppress(RuntimeError):
                    cluster._stop("immediate")
