"""Sync streams: one snapshot, then the change log read in epochs, with exact resume tokens.

Change capture (migration 0002, `sync/capture.py`) logs every row change with
the writer's transaction id (`xid`) and a sequence value (`seq`) taken in the
row trigger, after the row lock.

Snapshot. One REPEATABLE READ READ ONLY transaction, scoped to the workspace
(`Database.workspace_connection`; its SET LOCAL statements take no snapshot);
its first query takes `pg_current_snapshot()` = S, which in REPEATABLE READ is
the snapshot every later statement reads. Each table (in request order) is read
in primary-key order through a server-side cursor, `batch_size` rows per
message. S becomes the first epoch's `prev`.

Changes, in epochs. Take `cur = pg_current_snapshot()`; deliver the entries
visible in `cur` and not in `prev`, in `seq` order; then `prev := cur`.
- Nothing lost, nothing repeated: snapshots taken later see everything earlier
  ones saw, so every committed entry has a first epoch whose `cur` sees it, and
  it is delivered in that epoch only. Commit order does not matter: a
  transaction that took an early `seq` and commits late is simply not visible
  until some later `cur`. Changes committed during the snapshot are not
  visible in S, so they come once, in the first epoch.
- One row's changes arrive in the order they happened: a writer takes its
  `seq` while it holds the row lock, so a later change of the row (which had
  to wait for that lock, and so for the earlier commit) has a larger `seq`
  and is visible in no earlier epoch. Transaction ids do not order anything
  here; a lower xid may well change a row after a higher one committed.
- Resume tokens carry `prev`, and mid-epoch also `cur` and the last `seq`
  sent, so a new stream (on any replica) finishes an epoch exactly where the
  last one stopped. A token after an epoch carries only `cur` as `prev`.
- Pages (`sql.change_page`): an epoch's first page finds its entries through
  the (workspace_id, xid) index, from `xmin(prev)` (older transactions are
  visible in `prev`); later pages walk the (workspace_id, seq) index from the
  last `seq` sent up to `high`, the sequence's value read just after `cur` was
  taken, so each page costs the same however large the epoch.

Snapshot-phase resume. A token of the snapshot phase carries S, the table and
the primary key of the last row sent. A resumed stream reads the rest (that
table after the key, then the later tables) under a new snapshot S2, and
records (S, table, key) as a boundary: rows up to it were read under S, so the
first epoch after the snapshot delivers, for those rows, the entries not
visible in S (rather than S2); rows after it only those not visible in S2. The
comparison is made in SQL, on the row decoded to the table's own row type. An
update that changes a key is logged as a delete and an insert, so each entry
concerns one key. Interrupted again, the stream adds another boundary; after
the first full epoch every boundary is paid and the token drops them.

Wake-ups and reads (`sync/fanout.py`). One LISTEN connection per server
(`Database.add_change_listener`) routes each NOTIFY payload, a workspace id, to
that workspace's follow streams only; one poll per server every
`sync_poll_seconds` wakes the streams of workspaces with entries committed
since the previous poll; when the LISTEN connection is lost, and again once it
is back, every stream is woken (a lost database then ends them with
UNAVAILABLE). A woken stream reads its own entries from its own position, each read a short
pool acquisition: a following stream holds no connection while it waits for
changes or for its client. Streams share reads: all streams woken by one
notification share one `cur`, and streams of one workspace and table list at
the same position share each page, so once they have shared one epoch they
stay together, and a NOTIFY costs them all one epoch-target query and one page
read (one short transaction). A stream that falls behind reads on from its own
position.

Flow control. A stream yields one message at a time, and grpc.aio asks for the
next only once the previous is written; a consumer that stops reading stops
the reads for it. Nothing beyond the current page is held per stream. A
snapshot does hold its pool connection (its transaction) until it is done;
snapshots and page reads each take at most half the pool.

Shutdown. `close()` ends every stream that is waiting for changes or reading
with UNAVAILABLE (SERVER_SHUTTING_DOWN) at once. A stream whose client has
stopped reading is parked inside grpc.aio's write, out of reach without its
servicer context; it ends with UNAVAILABLE when the grace period cancels it.

Consumers. A named consumer is registered at Sync and moved by
AcknowledgeSync; pruning (`sync/pruning.py`) deletes what every live consumer
acknowledged, and what is older than the retention; a token that needs a
pruned entry is refused with RESNAPSHOT_REQUIRED.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import values
from raptorflow.data.server.db.catalog import CatalogCache, Table
from raptorflow.data.server.db.columnar import ColumnEncoder
from raptorflow.data.server.db.compiler import workspace_value
from raptorflow.data.server.db.connections import Database, Deadline
from raptorflow.data.server.errors import Code, ServiceError, invalid_argument
from raptorflow.data.server.sync import capture, pruning, sql
from raptorflow.data.server.sync.fanout import SharedReads, Waiter, Wakeups
from raptorflow.data.server.sync.tokens import (
    Boundary,
    Position,
    ResumeTokens,
    covers,
    fingerprint,
)
from raptorflow.data.server.tasks import cancel_and_wait
from raptorflow.data.v1 import memory_sync_service_pb2, value_pb2

pb = memory_sync_service_pb2
log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 1_000
MAX_BATCH_SIZE = 10_000
MAX_TABLES = 100
MAX_CONSUMER_ID = 128

_OPERATIONS: Mapping[str, pb.ChangeOperation.ValueType] = {
    "I": pb.CHANGE_OPERATION_INSERT,
    "U": pb.CHANGE_OPERATION_UPDATE,
    "D": pb.CHANGE_OPERATION_DELETE,
}
_NO_DEADLINE = Deadline(None)


def shutting_down() -> ServiceError:
    return ServiceError(
        Code.UNAVAILABLE,
        "SERVER_SHUTTING_DOWN",
        "the server is shutting down; resume with the last resume token",
    )


def resnapshot_required() -> ServiceError:
    return ServiceError(
        Code.FAILED_PRECONDITION,
        "RESNAPSHOT_REQUIRED",
        "changes after the resume token were pruned from the change log; "
        "start again without a resume token",
    )


@dataclass(frozen=True)
class _TablePlan:
    """One table of a stream: how its rows are read, decoded and encoded."""

    table: Table
    index: int
    workspace: object
    """The workspace id as bound for this table's workspace column."""
    encoder: ColumnEncoder
    key_indexes: tuple[int, ...]
    """Where the primary-key columns sit in a row."""
    change_rows: str

    def key_of(self, record: Any) -> tuple[Any, ...]:
        columns = self.table.columns
        return tuple(values.to_value(columns[i], record[i]) for i in self.key_indexes)


@dataclass(frozen=True)
class _Plan:
    """One stream's request, checked."""

    workspace: str
    tables: tuple[_TablePlan, ...]
    by_name: Mapping[str, _TablePlan]
    bound: str
    """The token binding of workspace and table list."""
    batch_size: int
    consumer_id: str
    follow: bool

    @property
    def names(self) -> list[str]:
        return [t.table.name for t in self.tables]


@dataclass(frozen=True)
class _Page:
    """Up to `batch_size` entries of an epoch, as messages; shared by streams at one position."""

    messages: tuple[pb.SyncResponse, ...]
    next: Position
    """The position after the page (the last message's, when there are messages)."""
    epoch_done: bool


class SyncStreams:
    """Serves every sync stream of one server process."""

    def __init__(self, settings: Settings, database: Database, catalog: CatalogCache) -> None:
        self._settings = settings
        self._database = database
        self._catalog = catalog
        # Without a shared key (already warned about for page tokens), tokens only
        # resume on this process.
        self._tokens = ResumeTokens(settings.token_key or secrets.token_bytes(32))
        self._wakeups = Wakeups()
        self._currents: SharedReads[None, tuple[str, int]] = SharedReads(
            self._wakeups.tick, keep_result=True
        )
        self._pages: SharedReads[tuple[str, str, int, Position], _Page] = SharedReads(
            self._wakeups.tick
        )
        # Sync never takes the whole query pool: snapshots hold a connection for
        # as long as they stream, reads only briefly; both queue here, not in the pool.
        slots = max(1, settings.pool_max_size // 2)
        self._snapshot_slots = asyncio.Semaphore(slots)
        self._read_slots = asyncio.Semaphore(slots)
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.page_reads = 0
        """Epoch pages read from the change log by this server (tests watch it)."""
        self.open_streams = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Starts the shared change reader and the pruning task."""
        self._database.add_change_listener(
            sql.CHANNEL,
            self._wakeups.wake,
            self._wakeups.wake_all,
            keepalive=self._settings.sync_poll_seconds,
        )
        self._tasks = [
            asyncio.create_task(self._poll_forever(), name="sync-poll"),
            asyncio.create_task(self._prune_forever(), name="sync-prune"),
        ]

    async def close(self) -> None:
        """Ends every open stream with UNAVAILABLE (server shutdown) and stops the tasks."""
        self._closed.set()
        # Waiting streams wake and see `_closed`; reading streams get UNAVAILABLE from
        # their (shared) read.
        self._wakeups.wake_all()
        self._currents.cancel_all(shutting_down)
        self._pages.cancel_all(shutting_down)
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise shutting_down()

    async def _sleep(self, waiter: Waiter, seconds: float | None) -> None:
        """Until woken, `seconds` pass (None: no limit), or shutdown (then UNAVAILABLE).

        A follow stream's waiter is subscribed, and `close()` wakes every subscribed
        waiter: waiting on its event alone is enough (and costs no task per wait).
        """
        self._check_open()
        if seconds is None:
            await waiter.event.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await waiter.event.wait()
        self._check_open()

    # -- requests --------------------------------------------------------------

    async def _plan(self, request: pb.SyncRequest) -> _Plan:
        if not request.workspace_id:
            raise invalid_argument(
                "workspace_id", "a workspace id is required", reason="INVALID_UUID"
            )
        workspace = str(values.parse_uuid(request.workspace_id, "workspace_id"))
        if not request.tables:
            raise invalid_argument("tables", "at least one table is required")
        if len(request.tables) > MAX_TABLES:
            raise invalid_argument("tables", f"at most {MAX_TABLES} tables per stream")
        plans: list[_TablePlan] = []
        for i, name in enumerate(request.tables):
            if name in request.tables[:i]:
                raise invalid_argument(f"tables[{i}]", f"table {name!r} is named twice")
            table = await self._catalog.table(name, f"tables[{i}]")
            columns = [c.name for c in table.columns]
            plans.append(
                _TablePlan(
                    table=table,
                    index=i,
                    workspace=workspace_value(table, request.workspace_id),
                    encoder=ColumnEncoder(table.name, table.columns),
                    key_indexes=tuple(columns.index(k) for k in table.primary_key),
                    change_rows=sql.change_rows(table),
                )
            )
        batch_size = request.batch_size or DEFAULT_BATCH_SIZE
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise invalid_argument(
                "batch_size", f"must be from 1 to {MAX_BATCH_SIZE:,} (0 means the default)"
            )
        if len(request.consumer_id) > MAX_CONSUMER_ID:
            raise invalid_argument(
                "consumer_id", f"a consumer id has at most {MAX_CONSUMER_ID} characters"
            )
        names = [p.table.name for p in plans]
        return _Plan(
            workspace=workspace,
            tables=tuple(plans),
            by_name={p.table.name: p for p in plans},
            bound=fingerprint(workspace, names),
            batch_size=batch_size,
            consumer_id=request.consumer_id,
            follow=request.follow,
        )

    def _issue(self, plan: _Plan, position: Position) -> str:
        return self._tokens.issue(plan.workspace, plan.bound, position)

    async def open(self, request: pb.SyncRequest) -> AsyncIterator[pb.SyncResponse]:
        """The messages of one stream, in order."""
        self._check_open()
        plan = await self._plan(request)
        position: Position | None = None
        if request.resume_token:
            position = self._tokens.verify(request.resume_token, plan.workspace, plan.bound)
        async with self._database.connection(_NO_DEADLINE) as conn:
            await capture.check(conn, self._settings.schema, [p.table for p in plan.tables])
            if position is not None and await conn.fetchval(
                sql.PRUNED, plan.workspace, position.lowest
            ):
                raise resnapshot_required()
            if plan.consumer_id:
                # Held from where this stream starts: the token's oldest snapshot, or
                # (for a snapshot) now, which is no later than the snapshot itself.
                await conn.execute(
                    sql.UPSERT_CONSUMER,
                    plan.workspace,
                    plan.consumer_id,
                    plan.names,
                    position.lowest if position is not None else None,
                )
        # Subscribed before the first read, so no notification after it is missed.
        waiter = self._wakeups.subscribe(plan.workspace) if plan.follow else Waiter(0)
        waiter.woken_at = self._wakeups.tick()
        self.open_streams += 1
        try:
            if position is None or position.in_snapshot:
                async for message, after in self._snapshot(plan, position):
                    yield message
                    position = after
                # The first epoch's `cur` must be newer than the snapshot.
                waiter.woken_at = self._wakeups.tick()
            assert position is not None
            async for message in self._changes(plan, position, waiter):
                yield message
        finally:
            self.open_streams -= 1
            if plan.follow:
                self._wakeups.unsubscribe(plan.workspace, waiter)

    async def acknowledge(self, request: pb.AcknowledgeSyncRequest, deadline: Deadline) -> None:
        """Records a named consumer's progress."""
        if not request.workspace_id:
            raise invalid_argument(
                "workspace_id", "a workspace id is required", reason="INVALID_UUID"
            )
        workspace = str(values.parse_uuid(request.workspace_id, "workspace_id"))
        if not 1 <= len(request.consumer_id) <= MAX_CONSUMER_ID:
            raise invalid_argument(
                "consumer_id", f"a consumer id of 1 to {MAX_CONSUMER_ID} characters is required"
            )
        if not request.resume_token:
            raise invalid_argument(
                "resume_token", "a resume token is required", reason="INVALID_RESUME_TOKEN"
            )
        position = self._tokens.verify(request.resume_token, workspace, None)
        async with self._database.connection(deadline) as conn:
            await conn.execute(
                sql.UPSERT_CONSUMER,
                workspace,
                request.consumer_id,
                None,
                position.lowest,
                timeout=deadline.timeout(self._settings.statement_timeout),
            )

    # -- snapshot --------------------------------------------------------------

    async def _snapshot(
        self, plan: _Plan, resume: Position | None
    ) -> AsyncIterator[tuple[pb.SyncResponse, Position]]:
        """The snapshot's messages, each with the position after it; SNAPSHOT_DONE last."""
        start = 0
        after: tuple[value_pb2.Value, ...] = ()
        boundaries: tuple[Boundary, ...] = ()
        if resume is not None:
            start, after = resume.table_index, resume.key
            boundaries = (
                *resume.boundaries,
                Boundary(resume.snapshot, resume.table_index, resume.key),
            )
        # Held for the whole snapshot, for as long as the client takes to read it:
        # long-lived, so the leak watchdog leaves it alone. Scoped to the workspace
        # (the row-level security net); BEGIN, the scope and the plan setting go in
        # one round trip.
        async with (
            self._snapshot_slots,
            self._database.workspace_connection(
                _NO_DEADLINE,
                uuid.UUID(plan.workspace),
                transaction=True,
                isolation="repeatable_read",
                readonly=True,
                prelude=sql.CUSTOM_PLANS,
                long_lived=True,
            ) as conn,
        ):
            snapshot = str(await conn.fetchval(sql.CURRENT_SNAPSHOT))
            for table in plan.tables[start:]:
                params = sql.Params(table.workspace)
                query = sql.snapshot_rows(
                    table.table, params, after if table.index == start else ()
                )
                cursor = await conn.cursor(query, *params.values)
                while records := await cursor.fetch(plan.batch_size):
                    position = Position(
                        snapshot,
                        in_snapshot=True,
                        table_index=table.index,
                        key=table.key_of(records[-1]),
                        boundaries=boundaries,
                    )
                    message = pb.SyncResponse(
                        event=pb.SYNC_EVENT_SNAPSHOT_ROWS, resume_token=self._issue(plan, position)
                    )
                    table.encoder.encode_into(message.rows, records)
                    self._check_open()
                    yield message, position
                    if len(records) < plan.batch_size:
                        break
        done = Position(snapshot, boundaries=boundaries)
        self._check_open()
        message = pb.SyncResponse(
            event=pb.SYNC_EVENT_SNAPSHOT_DONE, resume_token=self._issue(plan, done)
        )
        yield message, done

    # -- changes ---------------------------------------------------------------

    async def _changes(
        self, plan: _Plan, position: Position, waiter: Waiter
    ) -> AsyncIterator[pb.SyncResponse]:
        """Epoch after epoch: every change after `position`, then (following) each as it commits."""
        interval = self._settings.sync_checkpoint_seconds
        sent, sent_at = position, time.monotonic()
        while True:
            fresh = not position.cur
            if fresh:
                # Any wake-up from here on means a new epoch is needed.
                woken_at = waiter.woken_at
                waiter.event.clear()
                self._check_open()
                cur, high = await self._currents.get(
                    None, self._epoch_target, started_after=woken_at
                )
                if not covers(cur, position.snapshot):
                    # Shared, and taken just before this stream's `prev`: take a newer one.
                    waiter.woken_at = self._wakeups.tick()
                    continue
                position = position.epoch(cur, high)
            while True:
                key = (plan.workspace, plan.bound, plan.batch_size, position)
                self._check_open()
                page = await self._pages.get(
                    key, functools.partial(self._read_page, plan, position)
                )
                for message in page.messages:
                    self._check_open()
                    yield message
                position = page.next
                if page.messages:
                    sent, sent_at = position, time.monotonic()
                if page.epoch_done:
                    break
            if not fresh:
                continue  # finished the epoch a token was cut in; changes may wait beyond it
            if not plan.follow:
                if position != sent:
                    yield self._checkpoint(plan, position)
                return
            # Wait for a wake-up; meanwhile a position that moved without a message
            # is checkpointed, at most every `interval` seconds.
            while not waiter.event.is_set():
                if position == sent:
                    await self._sleep(waiter, None)
                    continue
                due = sent_at + interval - time.monotonic()
                if due > 0:
                    await self._sleep(waiter, due)
                    continue
                yield self._checkpoint(plan, position)
                sent, sent_at = position, time.monotonic()

    def _checkpoint(self, plan: _Plan, position: Position) -> pb.SyncResponse:
        return pb.SyncResponse(
            event=pb.SYNC_EVENT_CHECKPOINT, resume_token=self._issue(plan, position)
        )

    async def _epoch_target(self) -> tuple[str, int]:
        async with self._read_slots, self._database.connection(_NO_DEADLINE) as conn:
            row = await conn.fetchrow(sql.EPOCH)
        assert row is not None
        return str(row["cur"]), int(row["high"])

    async def _read_page(self, plan: _Plan, position: Position) -> _Page:
        """The next page of the epoch at `position`, as messages with their tokens."""
        self.page_reads += 1
        tables = [t.table for t in plan.tables]
        listing, args = sql.change_page(plan.workspace, tables, position, plan.batch_size + 1)
        runs: list[tuple[_TablePlan, list[asyncpg.Record]]] = []
        async with (
            self._read_slots,
            self._database.connection(
                _NO_DEADLINE,
                transaction=True,
                isolation="repeatable_read",
                readonly=True,
                prelude=sql.PAGE_PLANS,
            ) as conn,
        ):
            # One snapshot for the mark and the entries: an entry pruned before it is
            # seen in the mark, one pruned after it is still read here.
            if await conn.fetchval(sql.PRUNED, plan.workspace, position.lowest):
                raise resnapshot_required()
            entries = await conn.fetch(listing, *args)
            more = len(entries) > plan.batch_size
            del entries[plan.batch_size :]
            start = 0
            while start < len(entries):
                name = entries[start]["table_name"]
                end = start + 1
                while end < len(entries) and entries[end]["table_name"] == name:
                    end += 1
                table = plan.by_name[name]
                sequences = [e["seq"] for e in entries[start:end]]
                records = await conn.fetch(table.change_rows, sequences)
                if [r[0] for r in records] != sequences or any(
                    r[2] != plan.workspace for r in records
                ):
                    raise AssertionError("change-log entries changed under a repeatable read")
                runs.append((table, records))
                start = end
        messages = []
        for i, (table, records) in enumerate(runs):
            last_seq = int(records[-1][0])
            after = position.sent(last_seq) if more or i < len(runs) - 1 else position.epoch_done()
            message = pb.SyncResponse(
                event=pb.SYNC_EVENT_CHANGES,
                operations=[_OPERATIONS[r[1]] for r in records],
                sequences=[r[0] for r in records],
                resume_token=self._issue(plan, after),
            )
            table.encoder.encode_into(message.rows, records, skip=3)
            messages.append(message)
        if more:
            return _Page(tuple(messages), position.sent(int(entries[-1]["seq"])), False)
        return _Page(tuple(messages), position.epoch_done(), True)

    # -- background --------------------------------------------------------------

    async def _poll_forever(self) -> None:
        """Wakes streams whose workspaces got entries since the last poll (a missed NOTIFY)."""
        previous: str | None = None
        while True:
            await asyncio.sleep(self._settings.sync_poll_seconds)
            try:
                async with self._database.connection(
                    _NO_DEADLINE, transaction=True, readonly=True, prelude=sql.CUSTOM_PLANS
                ) as conn:
                    row = await conn.fetchrow(sql.POLL, self._wakeups.workspaces(), previous)
            except Exception as exc:  # the streams find out what is wrong when they read
                log.warning("change-log poll failed: %s", exc or type(exc).__name__)
                self._wakeups.wake_all()
                continue
            assert row is not None
            for workspace in row["woken"]:
                self._wakeups.wake(workspace)
            previous = row["cur"]

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sync_prune_seconds)
            try:
                await pruning.prune_once(self._database, self._settings)
            except Exception as exc:  # the next run tries again
                log.warning("change-log pruning failed: %s", exc or type(exc).__name__)

    def stats(self) -> Mapping[str, int]:
        """Counters for tests and operators."""
        return {
            "open_streams": self.open_streams,
            "waiting_streams": len(self._wakeups),
            "page_reads": self.page_reads,
            "current_snapshot_reads": self._currents.started,
        }
