"""Every connection to PostgreSQL: the query pool, the owner pool and one session connection.

Nothing else in the server connects. The query pool runs callers' statements as
the non-owner application role; the owner pool runs migrations and maintenance;
a small job pool, also the owner's, keeps the job history table; the session
connection answers health checks, so a busy pool never makes the service look
dead. Pooled connections carry no session state:
the per-call deadline travels with each statement, so the pool needs no reset
query on release. What the module records about its own use (holds, slow
statements, checks) is in `activity.py`.

Workspace scoping (`Database.workspace_connection`): with `row_security` on,
every statement a caller runs for one workspace runs in a transaction whose
first statements set `raptorflow.workspace_id` locally (SET LOCAL), so the
row-level security policies of `row_security.py` let it see that workspace's
rows only, and nothing of the setting outlives the transaction. Owner-pool
connections carry `raptorflow.all_workspaces = on` for their whole session,
which the owner's own policy asks for: maintenance keeps seeing every row.

PgBouncer mode (`settings.pgbouncer`): the query pool and the session connection
reach PostgreSQL through PgBouncer in transaction pooling mode, where two
statements outside a transaction may run on two different server connections,
and a server connection carries other clients' transactions in between. So
those connections keep no prepared statements (asyncpg's cache names them, and
the next call may land where that name was never prepared), send no startup
parameter but `application_name` (PgBouncer 1.18 refuses the rest), and run
every block in an explicit transaction whose BEGIN script also sets the query
role and `statement_timeout` locally. The
LISTEN connections need a session of their own and go to `listen_url` (direct);
the owner and job pools use the owner's URL, which must be direct too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import asyncpg
import tenacity
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import codecs
from raptorflow.data.server.db.activity import (
    MAX_STATEMENT_CHARS,
    DatabaseCheck,
    Hold,
    PoolSnapshot,
    SlowStatement,
    caller_name,
    current_caller,
)
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.server.tasks import cancel_and_wait

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

# Connections of the job pool (`open_jobs`): short statements only, so a few suffice.
JOB_POOL_MAX_SIZE = 3

WORKSPACE_SETTING = "raptorflow.workspace_id"
"""The transaction-local setting that names the one workspace whose rows a statement may see
or write; the row-level security policies compare each row with it (`row_security.py`)."""
ALL_WORKSPACES_SETTING = "raptorflow.all_workspaces"
"""'on' for the whole session of every owner-pool connection: the owner's own policy lets
maintenance (backups, retention, pruning) reach every workspace's rows only where it is on."""

WORKSPACE_PLACEHOLDER = "$workspace"
"""What the status view shows instead of the workspace id `begin_script` writes into its text."""
# The one value a query-pool statement carries in its text rather than as a bound
# parameter: the workspace id of `begin_script` (a simple-protocol script takes none).
_WORKSPACE_LITERAL = re.compile(rf"(SET LOCAL {re.escape(WORKSPACE_SETTING)} = )'[^']*'")

Isolation: TypeAlias = Literal["read_committed", "repeatable_read", "serializable"]

# The query role's name when row-level security cannot bind it; NULL when it can.
_UNBOUND_ROLE_SQL = """
SELECT rolname FROM pg_catalog.pg_roles
WHERE rolname = current_user AND (rolsuper OR rolbypassrls)
"""


def begin_script(
    workspace: uuid.UUID | None,
    *,
    isolation: Isolation | None = None,
    readonly: bool = False,
    prelude: str = "",
) -> str:
    """BEGIN, then the workspace setting and `prelude` (fixed SQL), as one simple-protocol
    script: a transaction scoped to a workspace costs one round trip to open, not two.

    The workspace is rendered into the text, which is safe only because it is a
    uuid.UUID: its text form is 32 hex digits and four hyphens, nothing else. What
    records statements (the slow-query list) takes the text through `statement_shape`,
    which puts a placeholder in its place.
    """
    begin = "BEGIN"
    if isolation is not None:
        begin += " ISOLATION LEVEL " + isolation.replace("_", " ").upper()
    if readonly:
        begin += " READ ONLY"
    parts = [begin]
    if workspace is not None:
        if type(workspace) is not uuid.UUID:
            raise TypeError(f"a workspace is a uuid.UUID, not {type(workspace).__name__}")
        parts.append(f"SET LOCAL {WORKSPACE_SETTING} = '{workspace}'")
    if prelude:
        parts.append(prelude)
    return "; ".join(parts)


def statement_shape(statement: str) -> str:
    """`statement` as the status view may show it: the workspace id a `begin_script` wrote
    into it replaced by `WORKSPACE_PLACEHOLDER`, so that its shape is the same for every
    workspace and names none. Every other value of a query-pool statement is a bound
    parameter ($n) already."""
    if WORKSPACE_SETTING not in statement:
        return statement
    return _WORKSPACE_LITERAL.sub(rf"\g<1>{WORKSPACE_PLACEHOLDER}", statement)


def pooled_session_settings(settings: Settings) -> str:
    """What a connection through PgBouncer sets per transaction instead of per session (SET
    LOCAL statements, for `begin_script`'s prelude): its role and statement_timeout."""
    if not settings.pgbouncer:
        return ""
    # Imported here: the catalog module imports this one.
    from raptorflow.data.server.db.catalog import quote_ident

    parts = []
    if settings.query_role:
        parts.append(f"SET LOCAL ROLE {quote_ident(settings.query_role)}")
    parts.append(f"SET LOCAL statement_timeout = {int(settings.statement_timeout * 1000)}")
    return "; ".join(parts)


def owner_pool_max_size(settings: Settings) -> int:
    """Two connections for catalog reloads, pruning and streamed backups, plus one per job
    slot: a running job (VACUUM, a backup) holds an owner connection for as long as it runs."""
    return 2 + settings.max_running_jobs


# What callers get: a pooled connection proxy or a plain connection, used alike.
Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)
_Pooled: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


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


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the database connection went away (rather than a statement failed).

    A timeout is not: TimeoutError is an OSError, but it means the deadline passed
    (DEADLINE_EXCEEDED, which gRPC already defines as "may have completed").
    """
    if isinstance(exc, TimeoutError):
        return False
    return isinstance(exc, UNREACHABLE_ERRORS) or (
        isinstance(exc, asyncpg.InterfaceError)
        and "connection" in str(exc)
        and "closed" in str(exc)
    )


def commit_outcome_unknown() -> ServiceError:
    """The connection was lost after COMMIT was sent: the transaction may have committed.

    UNAVAILABLE like any lost connection, but with a reason of its own, because
    DATABASE_UNAVAILABLE promises that nothing was written. The client's write
    retry policy never retries UNAVAILABLE, so the write is not applied twice.
    """
    return ServiceError(
        Code.UNAVAILABLE,
        "COMMIT_OUTCOME_UNKNOWN",
        "the database connection was lost during COMMIT: the write may or may not have been "
        "applied; read it back before retrying",
    )


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
        self._job_pool: asyncpg.Pool | None = None
        self._session: asyncpg.Connection | None = None
        self._session_lock = asyncio.Lock()
        self._listeners: list[asyncio.Task[None]] = []
        # Rollbacks of failed workspace transactions, referenced until they end.
        self._endings: set[asyncio.Future[None]] = set()
        # Observability (issue 4): who holds which query-pool connection, how many
        # callers wait for one, and the most held at once since `take_peak_in_use`.
        self._holds: set[Hold] = set()
        self._waiting = 0
        self._peak_in_use = 0
        self._slow_seconds = settings.slow_query_seconds
        self._server_version = ""
        self.last_check: DatabaseCheck | None = None
        """The latest check on the session connection; None before the first."""
        self.on_slow_query: Callable[[SlowStatement], None] | None = None
        """Called with every query-pool statement that ran at least `slow_query_seconds`."""
        self._pgbouncer = settings.pgbouncer
        # SET LOCAL statements every query-pool transaction starts with (PgBouncer mode).
        self._pooled_prelude = pooled_session_settings(settings)
        if settings.pgbouncer and not settings.listen_url:
            raise SystemExit(
                "RAPTORFLOW_PGBOUNCER needs a direct connection string for LISTEN and "
                "migrations: set RAPTORFLOW_DIRECT_DATABASE_URL or RAPTORFLOW_OWNER_DATABASE_URL"
            )

    # -- lifecycle ---------------------------------------------------------

    def _connect_kwargs(self, *, as_app_role: bool) -> dict[str, Any]:
        server_settings = {
            "application_name": "raptorflow-data",
            # A cap for any statement, even one whose client-side timer is lost.
            "statement_timeout": str(int(self._settings.statement_timeout * 1000)),
        }
        if as_app_role:
            if self._settings.query_role:
                server_settings["role"] = self._settings.query_role
        else:
            # Maintenance sees every workspace through the owner's own policy
            # (row_security.py). The query pool never carries this, so even queries
            # that run as the owner stay bound to one workspace.
            server_settings[ALL_WORKSPACES_SETTING] = "on"
        return {"timeout": self._settings.connect_timeout, "server_settings": server_settings}

    def _query_connect_kwargs(self) -> dict[str, Any]:
        """How query-pool and session connections connect to `database_url`."""
        if not self._pgbouncer:
            return self._connect_kwargs(as_app_role=True)
        # PgBouncer 1.18 refuses startup parameters it does not track ("unsupported startup
        # parameter"), and would hand session settings to other clients anyway: the role
        # and statement_timeout travel in each transaction's BEGIN script instead.
        # Without a statement cache asyncpg sends each statement unnamed, as parse,
        # describe and flush, then bind, execute and sync: PgBouncer hands the server
        # connection back only at the sync, so both halves run on the same one.
        return {
            "timeout": self._settings.connect_timeout,
            "server_settings": {"application_name": "raptorflow-data"},
            "statement_cache_size": 0,
        }

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
        """Connects the owner pool (migrations, catalog reloads, maintenance), retrying while the
        database is unreachable."""
        self._owner_pool = await self._connect_as_owner(owner_pool_max_size(self._settings))

    async def open_jobs(self) -> None:
        """Connects the job pool: the owner's own small pool for the job history table.

        Job bookkeeping (leases, progress, states, watches) must never queue behind
        maintenance work, which holds owner-pool connections for as long as a
        VACUUM or a backup runs: a lease that waits for a connection would expire.
        """
        # Every statement of the job runner, bounded on the client side too.
        self._job_pool = await self._connect_as_owner(
            JOB_POOL_MAX_SIZE, command_timeout=self._settings.statement_timeout
        )

    async def _connect_as_owner(self, max_size: int, **options: Any) -> asyncpg.Pool:
        """A pool on the owner's connection string, retrying while the database is unreachable."""
        async for attempt in self._retrying():
            with attempt:
                return await asyncpg.create_pool(
                    self._settings.effective_owner_url,
                    min_size=1,
                    max_size=max_size,
                    reset=_no_reset,
                    **options,
                    **self._connect_kwargs(as_app_role=False),
                )
        raise AssertionError("tenacity re-raises the last failure")

    async def open_queries(self) -> None:
        """Connects the query pool and the session connection."""
        async for attempt in self._retrying():
            with attempt:
                self._query_pool = await asyncpg.create_pool(
                    self._settings.database_url,
                    min_size=self._settings.pool_min_size,
                    max_size=self._settings.pool_max_size,
                    reset=_no_reset,
                    init=self._init_query_connection,
                    **self._query_connect_kwargs(),
                )
        await self._ensure_session()
        if self._settings.row_security:
            # Superusers and BYPASSRLS roles ignore every policy: say so once, loudly.
            unbound = await self._session_fetchval(_UNBOUND_ROLE_SQL)
            if unbound:
                log.warning(
                    "row security is on, but queries run as %s, a superuser or BYPASSRLS "
                    "role that no policy binds: set app_role, or a database_url of a plain role",
                    unbound,
                )

    async def _init_query_connection(self, connection: asyncpg.Connection) -> None:
        if self._pgbouncer:
            # The codecs' type lookups are statements too: one transaction, one server.
            async with connection.transaction():
                await codecs.register(connection)
        else:
            await codecs.register(connection)
        connection.add_query_logger(self._log_query)

    def _log_query(self, record: asyncpg.connection.LoggedQuery) -> None:
        # asyncpg calls this (via call_soon, in the statement's context) after every
        # statement on a query-pool connection: fast ones must cost one comparison.
        if record.elapsed < self._slow_seconds or self.on_slow_query is None:
            return
        exception = record.exception
        self.on_slow_query(
            SlowStatement(
                statement=statement_shape(str(record.query))[:MAX_STATEMENT_CHARS],
                caller=current_caller.get(),
                seconds=float(record.elapsed),
                end_time=time.time(),
                sqlstate=str(getattr(exception, "sqlstate", "") or "") if exception else "",
            )
        )

    async def close(self) -> None:
        """Closes everything; waits for released connections, then terminates stragglers."""
        await self._stop_listeners()
        for pool in (self._query_pool, self._job_pool, self._owner_pool):
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), timeout=5.0)
                except _CLOSE_ERRORS:
                    pool.terminate()
        self._query_pool = self._job_pool = self._owner_pool = None
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
                # A LISTEN lives as long as its session: never through PgBouncer.
                connection = await asyncpg.connect(
                    self._settings.listen_url, **self._connect_kwargs(as_app_role=True)
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
        await cancel_and_wait(listeners)

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

    @property
    def job_pool(self) -> asyncpg.Pool:
        if self._job_pool is None:
            raise RuntimeError("the job pool is not open")
        return self._job_pool

    @contextlib.asynccontextmanager
    async def connection(
        self,
        deadline: Deadline,
        *,
        long_lived: bool = False,
        transaction: bool = False,
        isolation: Isolation | None = None,
        readonly: bool = False,
        prelude: str = "",
    ) -> AsyncIterator[Connection]:
        """A query-pool connection, waited for at most min(deadline, acquire timeout).

        Running out of the acquire timeout first is RESOURCE_EXHAUSTED (the pool
        is saturated; retrying at once would only add load); running out of the
        caller's deadline first is DEADLINE_EXCEEDED.

        The hold is recorded (who, since when) for the status view; one held past
        `leak_seconds` is reclaimed by the leak watchdog (`reclaim`), unless
        `long_lived` says the caller holds it on purpose for as long as a stream
        runs (a sync snapshot). A reclaimed connection is not released again here.

        Statements on it are not scoped to a workspace: with `row_security` on
        they see no row of a protected table. Workspace calls use
        `workspace_connection`.

        With `transaction` (and always in PgBouncer mode) the block runs in one
        transaction, opened and ended as `workspace_connection` does it, with
        `isolation`, `readonly` and `prelude`; the block must not open one itself.
        """
        if transaction or self._pgbouncer:
            async with self.workspace_connection(
                deadline,
                None,
                transaction=True,
                isolation=isolation,
                readonly=readonly,
                prelude=prelude,
                long_lived=long_lived,
            ) as connection:
                yield connection
            return
        connection, hold = await self._acquire(deadline, long_lived)
        try:
            yield connection
        finally:
            await self._release(connection, hold)

    @contextlib.asynccontextmanager
    async def workspace_connection(
        self,
        deadline: Deadline,
        workspace: uuid.UUID | None,
        *,
        transaction: bool = False,
        isolation: Isolation | None = None,
        readonly: bool = False,
        prelude: str = "",
        long_lived: bool = False,
    ) -> AsyncIterator[Connection]:
        """A query-pool connection (as `connection` gives it) whose statements reach `workspace`.

        With `row_security` on, the block runs in one transaction that sets the
        workspace locally: committed when the block ends, rolled back when it
        raises (or is cancelled). Opening it is one round trip (`begin_script`),
        committing another. With it off, a transaction is opened only when the
        caller needs one (`transaction`, for atomicity or for `isolation`), and
        otherwise the connection is handed over as it is, as before the net.
        In PgBouncer mode every block is a transaction. `workspace` None scopes
        to no workspace (what `connection` gives).

        `isolation`, `readonly` and `prelude` (fixed SQL run right after BEGIN,
        such as SET LOCAL statements) apply whenever a transaction is opened.
        The block must not open a transaction of its own: it already is one.
        BEGIN and COMMIT are bounded by the deadline like any statement; a COMMIT
        past the deadline is not sent, so the call fails as DEADLINE_EXCEEDED
        with nothing written. A connection lost once COMMIT was sent fails a
        read-write block with UNAVAILABLE, reason COMMIT_OUTCOME_UNKNOWN: it may
        have committed (`readonly` blocks, having nothing to commit, say
        DATABASE_UNAVAILABLE like any lost connection).
        """
        scoped = self._settings.row_security
        connection, hold = await self._acquire(deadline, long_lived)
        if not scoped and not transaction and not self._pgbouncer:
            try:
                yield connection
            finally:
                await self._release(connection, hold)
            return
        cap = self._settings.statement_timeout
        if self._pooled_prelude:
            prelude = f"{self._pooled_prelude}; {prelude}" if prelude else self._pooled_prelude
        script = begin_script(
            workspace if scoped else None, isolation=isolation, readonly=readonly, prelude=prelude
        )
        committing = False
        try:
            await connection.execute(script, timeout=deadline.timeout(cap))
            yield connection
            commit_timeout = deadline.timeout(cap)
            committing = True
            await connection.execute("COMMIT", timeout=commit_timeout)
        except BaseException as exc:
            await self._end_failed(connection, hold)
            if committing and not readonly and connection_lost(exc):
                # PostgreSQL may have committed before the connection broke: saying
                # DATABASE_UNAVAILABLE (nothing written) could make the caller write twice.
                raise commit_outcome_unknown() from exc
            raise
        await self._release(connection, hold)

    async def _end_failed(self, connection: _Pooled, hold: Hold) -> None:
        """Rolls a failed block's transaction back, then releases its connection.

        Both run as a task of their own, shielded: grpc.aio may cancel a call's
        handler more than once (deadline, then the end of the call), and a cancel
        that cut the rollback short would leave the cancelled statement's backend
        running on (only terminating the connection would be left, and PostgreSQL
        does not notice a closed socket while it waits for a lock). A second
        cancel ends only this wait.
        """
        ending = asyncio.ensure_future(self._roll_back_and_release(connection, hold))
        self._endings.add(ending)
        ending.add_done_callback(self._endings.discard)
        try:
            await asyncio.shield(ending)
        except Exception as exc:  # the caller's own error is the one it reports
            log.debug("ending a failed transaction: %s", exc or type(exc).__name__)

    async def _roll_back_and_release(self, connection: _Pooled, hold: Hold) -> None:
        try:
            # A lost or reclaimed connection has left the pool already (asyncpg then
            # refuses every call on its proxy): there is nothing to roll back.
            if not connection.is_closed():
                # asyncpg first waits for the cancellation of a statement cut short.
                # Sent even when asyncpg thinks no transaction is open: a BEGIN cut
                # short may yet have opened one (asyncpg learns it only once the
                # cancellation is through); ROLLBACK outside one is a no-op.
                await connection.execute("ROLLBACK", timeout=self._settings.statement_timeout)
        except Exception as exc:
            # Never hand on a connection whose transaction may still be open.
            log.debug("rollback failed, closing the connection: %s", exc or type(exc).__name__)
            with contextlib.suppress(Exception):
                connection.terminate()
        finally:
            await self._release(connection, hold)

    async def _acquire(self, deadline: Deadline, long_lived: bool) -> tuple[_Pooled, Hold]:
        remaining = deadline.remaining()
        acquire_timeout = self._settings.acquire_timeout
        deadline_first = remaining is not None and remaining < acquire_timeout
        wait = max(0.0, remaining) if deadline_first and remaining is not None else acquire_timeout
        # asyncpg does not count its waiters; counting around the acquire is exact.
        self._waiting += 1
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
        finally:
            self._waiting -= 1
        hold = Hold(caller_name(), connection, long_lived)
        holds = self._holds
        holds.add(hold)
        self._peak_in_use = max(self._peak_in_use, len(holds))
        return connection, hold

    async def _release(self, connection: _Pooled, hold: Hold) -> None:
        self._holds.discard(hold)
        # A reclaimed connection was terminated by the watchdog, which already
        # gave its slot back: releasing it again is skipped.
        if hold.reclaimed:
            return
        # Shielded: a cancelled call must still hand its connection back, and
        # asyncpg waits for the server to confirm the cancelled query first.
        # Pool.release shields that work itself (it runs the hand-back under
        # asyncio.shield, as a task of its own), so a second cancel during
        # the release ends only our wait, never the release; shielding it
        # again here would only cost one more task per call.
        # The timeout is explicit because asyncpg would otherwise reuse the
        # acquire wait (often a few milliseconds of deadline) and, past it,
        # drop the connection without cancelling: the query would then run
        # on in PostgreSQL, and commit, after the caller was told it failed.
        # PostgreSQL ends any statement by statement_timeout in any case.
        release_timeout = self._settings.statement_timeout + self._settings.connect_timeout
        await self.query_pool.release(connection, timeout=release_timeout)

    def pool_stats(self) -> Mapping[str, int]:
        pool = self.query_pool
        size = pool.get_size()
        idle = pool.get_idle_size()
        return {"size": size, "idle": idle, "in_use": size - idle, "max": pool.get_max_size()}

    def pool_snapshot(self) -> PoolSnapshot | None:
        """The query pool's figures now; None while it is not open."""
        pool = self._query_pool
        if pool is None:
            return None
        size = pool.get_size()
        idle = pool.get_idle_size()
        return PoolSnapshot(size, size - idle, idle, self._waiting, pool.get_max_size())

    def take_peak_in_use(self) -> int:
        """The most connections held at once since the last call (at least those held now)."""
        peak, self._peak_in_use = self._peak_in_use, len(self._holds)
        return max(peak, self._peak_in_use)

    def holds_over(self, seconds: float) -> list[Hold]:
        """Connections held at least `seconds` now, longest first; long-lived holds excepted."""
        now = time.monotonic()
        over = [h for h in self._holds if not h.long_lived and now - h.acquired_at >= seconds]
        return sorted(over, key=lambda h: h.acquired_at)

    async def reclaim(self, hold: Hold) -> int | None:
        """Takes a held connection back from its holder: its backend pid, or None if released.

        The connection is terminated first, which hands the slot back to the pool
        at once and fails the holder's next statement; only then is its backend's
        query cancelled (through the owner pool), so the cancel can never reach a
        statement of whoever takes the slot next. With its query cancelled and its
        socket closed, the backend exits. The holder's own release later is a no-op.
        """
        if hold not in self._holds:
            return None
        self._holds.discard(hold)
        hold.reclaimed = True
        pid = hold.backend_pid()
        with contextlib.suppress(asyncpg.InterfaceError):  # released meanwhile: nothing to end
            hold.connection.terminate()
        # Through PgBouncer the pid is PgBouncer's key for the client, not a backend's:
        # PgBouncer closes the server connection of a client that left mid-transaction,
        # and the statement ends by its (local) statement_timeout at the latest.
        if pid and not self._pgbouncer:
            try:
                async with asyncio.timeout(self._settings.health_timeout):
                    async with self.owner_pool.acquire() as owner:
                        await owner.fetchval("SELECT pg_cancel_backend($1)", pid)
            except Exception as exc:  # the backend still ends, at the latest by statement_timeout
                log.warning(
                    "could not cancel the query of reclaimed backend %d: %s",
                    pid,
                    exc or type(exc).__name__,
                )
        return pid

    # -- health ----------------------------------------------------------------

    async def _ensure_session(self) -> asyncpg.Connection:
        if self._session is None or self._session.is_closed():
            self._session = await asyncpg.connect(
                self._settings.database_url, **self._query_connect_kwargs()
            )
            # Once per connection: a server upgrade means a new connection anyway.
            self._server_version = str(await self._session_fetchval("SHOW server_version"))
        return self._session

    async def _session_fetchval(self, query: str) -> Any:
        """One value from the session connection; in PgBouncer mode inside a transaction
        that sets the query role, like every query-pool statement."""
        session = self._session
        assert session is not None
        if not self._pgbouncer:
            return await session.fetchval(query)
        try:
            await session.execute(begin_script(None, readonly=True, prelude=self._pooled_prelude))
            value = await session.fetchval(query)
            await session.execute("ROLLBACK")
        except BaseException:
            # Never keep a session whose transaction may still be open (nor wait on a
            # ROLLBACK over a lost connection): the next check connects afresh.
            session.terminate()
            raise
        return value

    async def check(self) -> bool:
        """True when the database answers on the session connection within the health timeout.

        The outcome, with its latency and the server version, is kept in `last_check`.
        """
        async with self._session_lock:
            started = time.monotonic()
            try:
                async with asyncio.timeout(self._settings.health_timeout):
                    await self._ensure_session()
                    await self._session_fetchval("SELECT 1")
                reachable = True
            except _CHECK_ERRORS as exc:
                log.warning("database check failed: %s", exc or type(exc).__name__)
                if self._session is not None:
                    self._session.terminate()
                    self._session = None
                reachable = False
            seconds = time.monotonic() - started
            self.last_check = DatabaseCheck(
                reachable, seconds, time.time() - seconds, self._server_version
            )
            return reachable

    async def expire_pooled_connections(self) -> None:
        """Replaces pooled connections lazily, after an outage left them broken."""
        if self._query_pool is not None:
            await self._query_pool.expire_connections()
