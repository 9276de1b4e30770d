"""Several server processes on one gRPC port (`serve --workers N`): a supervisor and its workers.

One grpc.aio process keeps one core busy at most; N workers, each a whole server
(`app.serve`), share the port with SO_REUSEPORT, and the kernel spreads new
connections among them (a connection, and so a channel, stays with one worker).

- The port: the supervisor binds the listen address first, with SO_REUSEPORT but
  without listening, and keeps that socket until it exits. Port 0 so becomes one
  free port for every worker, and no other program can take the port meanwhile.
  A fixed port already in use (by anyone, another supervisor's workers included)
  is refused before any worker starts: the workers share the port with each
  other, never with a stranger. A bound socket that does not listen receives no
  connection.
- The budget: pool_max_size, pool_min_size and max_running_jobs stay totals of the
  replica, split among the workers (the first ones get the remainder). Every worker
  needs a query connection, so pool_max_size below workers is refused; every worker
  runs jobs, so each gets at least one job slot. The rest is per worker: an owner
  pool (2 + its job slots), the job pool (3), the health session and two LISTEN
  connections. `connection_budget` counts it all: pool_max_size + max(max_running_jobs,
  workers) + 8 x workers.
- Start-up: every worker starts as one server does. Migrations and the row-security
  net serialize on the migrations' advisory lock: the first worker applies them, the
  others find them applied. An empty token_key becomes one random key of the
  supervisor, shared by its workers, so page and resume tokens of one worker open on
  any other (other replicas still need the same RAPTORFLOW_TOKEN_KEY).
- Ports beside the gRPC one: worker i serves metrics on the metrics port + i (each
  worker's own figures: scrape all N; port 0 gives each a free port of its own). Only
  worker 0 serves the health-only port; the others' health is the same as worker 0's
  by construction, since a worker that dies takes the replica down.
- Each worker is a replica of its own for jobs, schedules and the status view: its
  replica id names its process id, and claims in the database keep one job on one.
- Stop: SIGTERM or SIGINT to the supervisor becomes SIGTERM to every worker, which
  stops gracefully (drain, grace period, pools last); the supervisor waits for all,
  killing any still running past drain + grace + STOP_MARGIN_SECONDS, and exits 0
  when every worker stopped cleanly. A terminal's Ctrl-C reaches the whole process
  group: workers start with SIGINT ignored, and once they serve stop on it as on SIGTERM.
- A worker that ends while no stop was asked for takes the replica down: the
  supervisor stops the other workers gracefully and exits 1. The orchestrator
  (Kubernetes, systemd) then restarts the replica and sees the failure; restarting
  only the worker here would hide a crash loop. The dead worker's jobs fail by their
  lease, as any dead replica's do. A worker whose supervisor dies stops on its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import JOB_POOL_MAX_SIZE, owner_pool_max_size
from raptorflow.data.server.observability import logs

log = logging.getLogger(__name__)

STOP_MARGIN_SECONDS = 30.0
"""Seconds a worker may take to stop beyond drain and grace (jobs marked, pools closed)."""

# Connections of a server process besides its pools: the health session, and the
# LISTEN connections of sync streams and of jobs.
_SESSION_CONNECTIONS = 3

# How often the supervisor looks at the clock while it waits for its workers.
_POLL_SECONDS = 0.5


def _share(total: int, workers: int, index: int) -> int:
    """Worker `index`'s part of `total` split as evenly as it goes, the first ones getting the
    remainder."""
    return total // workers + (1 if index < total % workers else 0)


def _with_port(address: str, port: int) -> str:
    host = address.rpartition(":")[0]
    return f"{host}:{port}"


def _port_of(setting: str, address: str) -> int:
    _, separator, port_text = address.rpartition(":")
    if not separator or not port_text.isdigit():
        raise SystemExit(f"invalid {setting} {address!r}: expected HOST:PORT")
    return int(port_text)


def check(settings: Settings) -> None:
    """Refuses settings a group of workers cannot run with (SystemExit naming the setting)."""
    if settings.workers < 1:
        raise SystemExit(f"invalid RAPTORFLOW_WORKERS: {settings.workers} (at least 1)")
    if settings.pool_max_size < settings.workers:
        raise SystemExit(
            f"invalid RAPTORFLOW_POOL_MAX_SIZE: {settings.pool_max_size} connections in all "
            f"cannot give each of {settings.workers} workers one"
        )
    _port_of("RAPTORFLOW_LISTEN", settings.listen)
    if settings.metrics_listen:
        _port_of("RAPTORFLOW_METRICS_LISTEN", settings.metrics_listen)


def worker_settings(settings: Settings, index: int) -> Settings:
    """The settings worker `index` of `settings.workers` runs with: its share of the pools and
    job slots, its metrics port, and the health-only port for worker 0 only."""
    count = settings.workers
    pool_max_size = _share(settings.pool_max_size, count, index)
    metrics_listen = settings.metrics_listen
    if metrics_listen:
        port = _port_of("RAPTORFLOW_METRICS_LISTEN", metrics_listen)
        if port:
            metrics_listen = _with_port(metrics_listen, port + index)
    return dataclasses.replace(
        settings,
        pool_max_size=pool_max_size,
        pool_min_size=min(_share(settings.pool_min_size, count, index), pool_max_size),
        max_running_jobs=max(1, _share(settings.max_running_jobs, count, index)),
        metrics_listen=metrics_listen,
        health_listen=settings.health_listen if index == 0 else "",
    )


def process_connections(settings: Settings) -> int:
    """The most database connections one server process with `settings` opens."""
    return (
        settings.pool_max_size
        + owner_pool_max_size(settings)
        + JOB_POOL_MAX_SIZE
        + _SESSION_CONNECTIONS
    )


def connection_budget(settings: Settings) -> int:
    """The most database connections a replica with `settings` opens, all workers together."""
    if settings.workers <= 1:
        return process_connections(settings)
    return sum(process_connections(worker_settings(settings, i)) for i in range(settings.workers))


def _refuse_if_taken(family: int, address: tuple[Any, ...], listen: str) -> None:
    # SO_REUSEADDR ignores connections lingering in TIME_WAIT (a restart) but not a
    # socket that listens: exactly "someone serves here".
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"cannot listen on RAPTORFLOW_LISTEN {listen!r}: the port is in use"
                ) from exc
            raise SystemExit(f"cannot listen on RAPTORFLOW_LISTEN {listen!r}: {exc}") from exc


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Binds `listen` (HOST:PORT; port 0 picks a free port) with SO_REUSEPORT, without
    listening; the bound socket and `listen` with its port. The workers then bind the same."""
    port = _port_of("RAPTORFLOW_LISTEN", listen)
    host = listen.rpartition(":")[0]
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise SystemExit(f"cannot listen on RAPTORFLOW_LISTEN {listen!r}: {exc}") from exc
    if port:
        _refuse_if_taken(family, address, listen)
    reservation = socket.socket(family, kind, proto)
    try:
        reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reservation.bind(address)
    except OSError as exc:
        reservation.close()
        raise SystemExit(f"cannot listen on RAPTORFLOW_LISTEN {listen!r}: {exc}") from exc
    bound: int = reservation.getsockname()[1]
    return reservation, _with_port(listen, bound)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


def _stop_when_orphaned(parent_sentinel: int) -> None:
    # The supervisor holds the other end of this pipe until it exits (even by SIGKILL).
    multiprocessing.connection.wait([parent_sentinel])
    log.warning("the supervisor is gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


def _serve_worker(settings: Settings) -> None:
    """A worker process: one whole server, stopped by SIGTERM (or SIGINT once it serves)."""
    logs.setup(settings.log_level, settings.log_format)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_stop_when_orphaned, args=(parent.sentinel,), name="orphan-watch", daemon=True
        ).start()
    from raptorflow.data.server.app import serve
    from raptorflow.data.server.cli import _run

    _run(serve(settings))


class Supervisor:
    """Starts the workers, forwards stop signals to them and waits for them all."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[BaseProcess] = []
        self._stop_deadline: float | None = None
        self._failed = False

    def _request_stop(self) -> None:
        if self._stop_deadline is None:
            grace = self._settings.shutdown_drain_seconds + self._settings.shutdown_grace_seconds
            self._stop_deadline = time.monotonic() + grace + STOP_MARGIN_SECONDS
        for worker in self._workers:
            # Only while it runs (is_alive reaps it otherwise): its pid cannot have been
            # reused by another process yet.
            if worker.is_alive() and worker.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._stop_deadline is None:
            log.info("%s: stopping %d workers", signal.Signals(signum).name, len(self._workers))
        self._request_stop()

    @contextlib.contextmanager
    def _signals_forwarded(self) -> Iterator[None]:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def run(self) -> int:
        """Runs the workers until a stop signal or a worker's end; the exit status."""
        with self._signals_forwarded():
            try:
                self._start_workers()
                self._wait_for_workers()
            finally:
                # Only on an error of the supervisor itself: nothing may outlive it.
                for worker in self._workers:
                    if worker.is_alive():
                        worker.kill()
                        worker.join()
                        self._failed = True
        return 1 if self._failed else 0

    def _start_workers(self) -> None:
        for index in range(self._settings.workers):
            if self._stop_deadline is not None:
                return
            worker = self._context.Process(
                target=_serve_worker,
                args=(worker_settings(self._settings, index),),
                name=f"raptorflow-data-worker-{index}",
            )
            # A terminal's Ctrl-C reaches the whole process group: a starting worker must
            # not end on it with a traceback (the supervisor forwards it as SIGTERM). An
            # ignored signal stays ignored through exec, until the server handles it.
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                worker.start()
            finally:
                signal.signal(signal.SIGINT, handler)
            self._workers.append(worker)
            log.info("worker %d started (pid %s)", index, worker.pid)
            if self._stop_deadline is not None:
                # The signal came while this one started: it gets the stop too.
                self._request_stop()

    def _wait_for_workers(self) -> None:
        running = {worker.sentinel: worker for worker in self._workers}
        while running:
            ended = multiprocessing.connection.wait(list(running), timeout=_POLL_SECONDS)
            for sentinel, worker in list(running.items()):
                if sentinel not in ended:
                    continue
                del running[sentinel]
                worker.join()
                self._worker_ended(worker)
            deadline = self._stop_deadline
            if running and deadline is not None and time.monotonic() > deadline:
                for worker in running.values():
                    log.error(
                        "%s (pid %s) did not stop in time: killing it", worker.name, worker.pid
                    )
                    worker.kill()
                    worker.join()
                self._failed = True
                return

    def _worker_ended(self, worker: BaseProcess) -> None:
        code = worker.exitcode
        if self._stop_deadline is None:
            log.error(
                "%s (pid %s) ended unexpectedly (%s): stopping the other workers",
                worker.name,
                worker.pid,
                _describe_exit(code),
            )
            self._failed = True
            self._request_stop()
        elif code not in (0, -signal.SIGTERM):
            # SIGTERM before a worker installed its handlers (still starting) ends it at once.
            log.error("%s (pid %s) stopped with %s", worker.name, worker.pid, _describe_exit(code))
            self._failed = True
        else:
            log.info("%s (pid %s) stopped", worker.name, worker.pid)


def supervise(settings: Settings) -> int:
    """Runs `settings.workers` server processes on one port until SIGTERM or SIGINT, or until
    one of them ends; the exit status (0 when every worker stopped cleanly on request)."""
    check(settings)
    reservation, listen = reserve_port(settings.listen)
    with reservation:
        token_key = settings.token_key
        if not token_key:
            log.warning(
                "RAPTORFLOW_TOKEN_KEY is not set: page tokens are signed with a random key "
                "that only these workers share; other replicas (or these after a restart) "
                "will refuse them"
            )
            token_key = secrets.token_bytes(32)
        settings = dataclasses.replace(settings, listen=listen, token_key=token_key)
        log.info(
            "%d workers on %s: query pool %d, job slots %d and at most %d database "
            "connections in all",
            settings.workers,
            listen,
            settings.pool_max_size,
            sum(worker_settings(settings, i).max_running_jobs for i in range(settings.workers)),
            connection_budget(settings),
        )
        return Supervisor(settings).run()
