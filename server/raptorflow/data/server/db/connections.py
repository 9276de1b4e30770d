"""Every connection to PostgreSQL: the query pool, the owner pool and one session connection.

Nothing else in the server connects. The query pool runs callers' statements as
the non-owner application role; the owner pool runs migrations (and later
maintenance); the session connection answers health checks, so a busy pool
never makes the service look dead. Pooled connections carry no session state:
the per-call deadline travels with each statement, so the pool needs no reset
query on release.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
import tenacity
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import codecs
from raptorflow.data.server.errors import Code, ServiceError

log = logging.getLogger(__name__)

# Errors that mean "the database cannot be reached", as opposed to "the statement failed".
UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
)

_CLOSE_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *UNREACHABLE_ERRORS)
_CHECK_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    asyncpg.PostgresError,
    *UNREACHABLE_ERRORS,
)

# What callers get: a pooled connection proxy or a plain connection, used alike.
Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)


@dataclass(frozen=True)
class Deadline:
    """When a call must be done, on the monotonic clock; None means no deadline."""

    expires_at: float | None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def remaining(self) -> float | None:
        if self.expires_at is None:
            return None
        return self.expires_at - time.monotonic()

    def timeout(self, cap: float) -> float:
        """Seconds the next statement may run: the deadline's remainder, at most `cap`."""
        remaining = self.remaining()
        if remaining is None:
            return cap
        if remaining <= 0:
            raise deadline_exceeded()
        return min(remaining, cap)


def deadline_exceeded() -> ServiceError:
    return ServiceError(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the call's deadline passed")


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()


async def _no_reset(connection: asyncpg.Connection) -> None:
    # asyncpg's default reset (unlock advisory locks, CLOSE ALL, UNLISTEN, RESET
    # ALL) costs a round trip per release. Pooled connections never take
    # session state, and asyncpg itself rolls back an open transaction before
    # this runs, so there is nothing left to reset.
    return None


class Database:
    """Owns the pools and the session connection for one server process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._query_pool: asyncpg.Pool | None = None
        self._owner_pool: asyncpg.Pool | None = None
        self._session: asyncpg.Connection | None = None
        self._session_lock = asyncio.Lock()
        self._listeners: list[asyncio.Task[None]] = []

    # -- lifecycle ---------------------------------------------------------

    def _connect_kwargs(self, *, as_app_role: bool) -> dict[str, Any]:
        server_settings = {
            "application_name": "raptorflow-data",
            # A cap for any statement, even one whose client-side timer is lost.
            "statement_timeout": str(int(self._settings.statement_timeout * 1000)),
        }
        if as_app_role and self._settings.query_role:
            server_settings["role"] = self._settings.query_role
        return {"timeout": self._settings.connect_timeout, "server_settings": server_settings}

    def _retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(self._settings.connect_retry_seconds),
            wait=tenacity.wait_exponential(multiplier=0.1, min=0.1, max=3.0),
            retry=tenacity.retry_if_exception_type((*UNREACHABLE_ERRORS, asyncio.TimeoutError)),
            before_sleep=lambda state: log.warning(
                "database not reachable yet (attempt %d): %s",
                state.attempt_number,
                state.outcome.exception() if state.outcome else "",
            ),
            reraise=True,
        )

    async def open_owner(self) -> None:
        """Connects the owner pool (migrations), retrying while the database is unreachable."""
        async for attempt in self._retrying():
            with attempt:
                self._owner_pool = await asyncpg.create_pool(
                    self._settings.effective_owner_url,
                    min_size=1,
                    max_size=2,
                    reset=_no_reset,
                    **self._connect_kwargs(as_app_role=False),
                )

    async def open_queries(self) -> None:
        """Connects the query pool and the session connection."""
        async for attempt in self._retrying():
            with attempt:
                self._query_pool = await asyncpg.create_pool(
                    self._settings.database_url,
                    min_size=self._settings.pool_min_size,
                    max_size=self._settings.pool_max_size,
                    reset=_no_reset,
                    init=codecs.register,
                    **self._connect_kwargs(as_app_role=True),
                )
        await self._ensure_session()

    async def close(self) -> None:
        """Closes everything; waits for released connections, then terminates stragglers."""
        await self._stop_listeners()
        for pool in (self._query_pool, self._owner_pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=5.0)
                except _CLOSE_ERRORS:
                    pool.terminate()
        self._query_pool = self._owner_pool = None
        if self._session is not None:
            self._session.terminate()
            self._session = None

    # -- change notifications ----------------------------------------------------

    def add_change_listener(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_gap: Callable[[], None],
        *,
        keepalive: float,
    ) -> None:
        """LISTENs on `channel` on a connection of its own, for as long as the database is open.

        `on_payload` gets each notification's payload. The connection is checked
        every `keepalive` seconds and reopened with back-off when it is lost.
        `on_gap` runs whenever notifications may have been missed: when the
        connection is lost (readers then find out whether the database is) and
        after every (re)connect, once LISTEN is in place.
        """
        task = asyncio.create_task(
            self._listen_forever(channel, on_payload, on_gap, keepalive),
            name=f"listen-{channel}",
        )
        self._listeners.append(task)

    async def _listen_forever(
        self,
        channel: str,
        on_payload: Callable[[str], None],
        on_gap: Callable[[], None],
        keepalive: float,
    ) -> None:
        delay = 0.1
        while True:
            connection: asyncpg.Connection | None = None
            listening = False
            try:
                connection = await asyncpg.connect(
                    self._settings.database_url, **self._connect_kwargs(as_app_role=True)
                )
                lost = asyncio.Event()
                connection.add_termination_listener(functools.partial(_set_event, lost))
                await connection.add_listener(
                    channel, lambda _connection, _pid, _channel, payload: on_payload(str(payload))
                )
                delay = 0.1
                listening = True
                on_gap()
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), keepalive)
                    if not lost.is_set():
                        await connection.fetchval("SELECT 1", timeout=self._settings.health_timeout)
            except Exception as exc:  # the listener outlives any failure; it reconnects
                log.warning("LISTEN %s connection lost: %s", channel, exc or type(exc).__name__)
            finally:
                if connection is not None:
                    connection.terminate()
            if listening:
                on_gap()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _stop_listeners(self) -> None:
        listeners, self._listeners = self._listeners, []
        for task in listeners:
            task.cancel()
        for task in listeners:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- access --------------------------------------------------------------

    @property
    def query_pool(self) -> asyncpg.Pool:
        if self._query_pool is None:
            raise RuntimeError("the query pool is not open")
        return self._query_pool

    @property
    def owner_pool(self) -> asyncpg.Pool:
        if self._owner_pool is None:
            raise RuntimeError("the owner pool is not open")
        return self._owner_pool

    @contextlib.asynccontextmanager
    async def connection(self, deadline: Deadline) -> AsyncIterator[Connection]:
        """A query-pool connection, waited for at most min(deadline, acquire timeout).

        Running out of the acquire timeout first is RESOURCE_EXHAUSTED (the pool
        is saturated; retrying at once would only add load); running out of the
        caller's deadline first is DEADLINE_EXCEEDED.
        """
        remaining = deadline.remaining()
        acquire_timeout = self._settings.acquire_timeout
        deadline_first = remaining is not None and remaining < acquire_timeout
        wait = max(0.0, remaining) if deadline_first and remaining is not None else acquire_timeout
        try:
            connection = await self.query_pool.acquire(timeout=wait)
        except TimeoutError:
            if deadline_first:
                raise deadline_exceeded() from None
            if self.query_pool.get_size() < self.query_pool.get_max_size():
                # Room in the pool, yet no connection: opening a new one hung.
                raise ServiceError(
                    Code.UNAVAILABLE,
                    "DATABASE_UNAVAILABLE",
                    "the database cannot be reached",
                ) from None
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                "POOL_EXHAUSTED",
                f"no database connection became free within {acquire_timeout:g} s",
            ) from None
        try:
            yield connection
        finally:
            # Shielded: a cancelled call must still hand its connection back, and
            # asyncpg waits for the server to confirm the cancelled query first.
            # Pool.release shields that work itself (it runs the hand-back under
            # asyncio.shield, as a task of its own), so a second cancel during
            # the release ends only our wait, never the release; shielding it
            # again here would only cost one more task per call.
            # The timeout is explicit because asyncpg would otherwise reuse the
            # acquire wait (often a few milliseconds of deadline) and, past it,
            # drop the connection without cancelling: the query would then run on
            # in PostgreSQL, and commit, after the caller was told it failed.
            # PostgreSQL ends any statement by statement_timeout in any case.
            release_timeout = self._settings.statement_timeout + self._settings.connect_timeout
            await self.query_pool.release(connection, timeout=release_timeout)

    def pool_stats(self) -> Mapping[str, int]:
        pool = self.query_pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        return {"size": size, "idle": idle, "in_use": size - idle, "max": pool.get_max_size()}

    # -- health ----------------------------------------------------------------

    async def _ensure_session(self) -> asyncpg.Connection:
        if self._session is None or self._session.is_closed():
            self._session = await asyncpg.connect(
                self._settings.database_url, **self._connect_kwargs(as_app_role=True)
            )
        return self._session

    async def check(self) -> bool:
        """True when the database answers on the session connection within the health timeout."""
        async with self._session_lock:
            try:
                async with asyncio.timeout(self._settings.health_timeout):
                    session = await self._ensure_session()
                    await session.fetchval("SELECT 1")
                return True
            except _CHECK_ERRORS as exc:
                log.warning("database check failed: %s", exc or type(exc).__name__)
                if self._session is not None:
                    self._session.terminate()
                    self._session = None
                return False

    async def expire_pooled_connections(self) -> None:
        """Replaces pooled connections lazily, after an outage left them broken."""
        if self._query_pool is not None:
            await self._query_pool.expire_connections()
