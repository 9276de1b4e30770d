"""Backups and restores of exposed tables: COPY out in one snapshot, COPY in in one transaction.

Export: one REPEATABLE READ READ ONLY transaction on an owner connection,
which locks its tables (ACCESS SHARE) before its snapshot and reads their
columns from pg_attribute; each table in scope is read with `COPY (SELECT
...) TO STDOUT (FORMAT binary)` (a query, because COPY refuses a partitioned
table by name), cut into chunks of at most `chunk_bytes`, each with its
SHA-256 and a gap-free sequence, between a header (tables, columns and their
types) and a manifest (row counts, chunk count, bytes, SHA-256 of all the
data). A task runs the COPY and hands chunks over a small bounded queue, so a
slow reader holds the COPY back instead of a table piling up in memory.

Restore: the chunks are checked as they arrive (sequence, SHA-256) and fed to
`COPY ... FROM STDIN (FORMAT binary)`, table by table, in one transaction on
an owner connection; the manifest is checked before COMMIT. Anything wrong, or
a caller that goes away, rolls the whole restore back. A workspace's restore
copies with `WHERE workspace_id = '<the backup's workspace>'`, so a backup
that carries rows of another workspace never writes them: they are left out,
and the row counts then disagree with the manifest. DEFERRABLE foreign keys
are checked at COMMIT, so tables that reference each other restore.

COPY takes no bound parameters: the workspace id reaches its statement only as
the text of a parsed `uuid.UUID` (hex digits and hyphens), never as the
caller's text. Table and column names come from the catalog, quoted.

Backup files (jobs) hold the same message stream (`backup_file.py`) and are
restored through the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.catalog import CatalogCache
from raptorflow.data.server.db.connections import Connection, Database, Deadline
from raptorflow.data.server.db.values import parse_uuid
from raptorflow.data.server.errors import Code, ServiceError, combine
from raptorflow.data.server.maintenance import backup_file, backup_stream, backup_tables
from raptorflow.data.server.maintenance.backup_stream import FORMAT_VERSION, Incoming, malformed
from raptorflow.data.server.maintenance.backup_tables import CopyShape, Scope
from raptorflow.data.server.maintenance.progress import Progress
from raptorflow.data.v1 import job_pb2, maintenance_service_pb2

pb = maintenance_service_pb2
log = logging.getLogger(__name__)

# True when row-level security applies to the restoring role on a table ($1, regclass text).
_ROW_SECURITY_ACTIVE = "SELECT row_security_active($1::regclass)"
# The temporary table a restore loads such a table through.
_STAGING = "raptorflow_restore"

# Messages waiting between an export's COPY and its reader: the memory an export holds
# is about this many chunks, however large the tables.
_QUEUED_MESSAGES = 4
_SNAPSHOT_SQL = "SELECT current_setting('server_version_num')::int AS version, now() AS taken"


def _timed_out(budget: float) -> ServiceError:
    return ServiceError(
        Code.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        f"the backup or restore did not finish within {budget:.3g} s; it was rolled back",
    )


def _rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _log_done(
    what: str,
    scope: Scope,
    counts: Sequence[pb.BackupTableCount],
    data_bytes: int,
    started: float,
) -> None:
    log.info(
        "%s of %s done: %s; %d bytes in %.2f s",
        what,
        f"workspace {scope.workspace}" if scope.workspace else "every workspace",
        ", ".join(f"{c.table} {c.row_count} rows" for c in counts),
        data_bytes,
        time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Loaded:
    counts: list[pb.BackupTableCount]
    replaced: int
    data_bytes: int


class Backups:
    """Exports and restores backups, streamed or through files under the backup directory."""

    def __init__(self, settings: Settings, database: Database, catalog: CatalogCache) -> None:
        self._settings = settings
        self._database = database
        self._catalog = catalog
        # Exports' COPY tasks, referenced until they end (the loop keeps only weak references).
        self._tasks: set[asyncio.Task[None]] = set()

    # -- RPCs --------------------------------------------------------------------------

    async def export(
        self, request: pb.ExportBackupRequest, deadline: Deadline
    ) -> AsyncGenerator[pb.ExportBackupResponse, None]:
        """Streams header, chunks and manifest of one consistent snapshot."""
        scope = await self.resolve_scope(request.scope, "scope")
        chunk_bytes = backup_stream.chunk_bytes(
            request.chunk_bytes, self._settings.max_message_bytes
        )
        budget = deadline.timeout(self._settings.backup_timeout)
        messages = self._export(
            scope, chunk_bytes, budget, self._settings.acquire_timeout, backup_stream.Report()
        )
        async with contextlib.aclosing(messages):
            async for message in messages:
                yield message

    async def restore(
        self, requests: AsyncIterator[pb.RestoreBackupRequest], deadline: Deadline
    ) -> pb.RestoreBackupResponse:
        """Loads a streamed backup in one transaction, after verifying it whole."""
        budget = deadline.timeout(self._settings.backup_timeout)
        incoming = Incoming(requests)
        try:
            async with asyncio.timeout(budget):
                first = await incoming.first()
                assert isinstance(first, pb.RestoreBackupRequest)
                loaded = await self._load(
                    incoming,
                    first.header,
                    first.replace_existing,
                    budget,
                    self._settings.acquire_timeout,
                    backup_stream.Report(),
                )
        except TimeoutError:
            raise _timed_out(budget) from None
        return pb.RestoreBackupResponse(
            tables=loaded.counts, replaced_row_count=loaded.replaced, data_bytes=loaded.data_bytes
        )

    # -- jobs --------------------------------------------------------------------------

    async def check_backup_file(self, spec: job_pb2.BackupToFileJob, field_path: str) -> None:
        """Raises ServiceError if the job could not run (bad scope, path outside the directory).

        A path with `{time}` is checked as it would be expanded now; each run names a
        new file, so whether today's name exists says nothing about a run's.
        """
        path_field = f"{field_path}.path"
        sample = backup_file.expand(spec.path, dt.datetime.now(dt.UTC), path_field)
        path = await backup_file.locate(self._settings.backup_dir, sample, path_field)
        await self.resolve_scope(spec.scope, f"{field_path}.scope")
        if not backup_file.is_template(spec.path) and await backup_file.exists(path):
            raise backup_file.already_exists(path, path_field)

    async def check_restore_file(self, spec: job_pb2.RestoreFromFileJob, field_path: str) -> None:
        """Raises ServiceError if the job could not run (path outside the directory, no file)."""
        path = await backup_file.locate(self._settings.backup_dir, spec.path, f"{field_path}.path")
        reader = backup_file.BackupReader(path, f"{field_path}.path")
        try:
            # The header only: enough to refuse a file that is no backup, or one of tables
            # this server does not expose, before a job is made.
            async with contextlib.aclosing(reader.messages()) as messages:
                first = await Incoming(messages).first()
            await self._header_scope(first.header)
        except ServiceError as error:
            raise error.prefixed(f"{field_path}.path") from None

    async def backup_to_file(
        self,
        spec: job_pb2.BackupToFileJob,
        progress: Progress,
        started: dt.datetime | None = None,
    ) -> job_pb2.JobResult:
        """Writes a backup file (the ExportBackup stream, framed); its name appears when whole.

        `{time}` in the path becomes `started` (default: now), in UTC. The result's
        backup_path is the expanded path; backup_bytes and backup_sha256 are the
        file's size and SHA-256.
        """
        path_field = "spec.backup_to_file.path"
        moment = dt.datetime.now(dt.UTC) if started is None else started
        expanded = backup_file.expand(spec.path, moment, path_field)
        path = await backup_file.locate(self._settings.backup_dir, expanded, path_field)
        scope = await self.resolve_scope(spec.scope, "spec.backup_to_file.scope")
        writer = backup_file.BackupWriter(path, path_field)
        report = backup_stream.Report(progress, lambda: (writer.bytes, 0))
        try:
            # Inside: a failed first write (the magic line) must still close and remove
            # the temporary file that open() created.
            await writer.open()
            budget = self._settings.backup_timeout
            async for message in self._export(
                scope, backup_stream.DEFAULT_CHUNK_BYTES, budget, None, report
            ):
                await writer.write(message)
            await writer.commit()
            await report.enter("commit")
        except BaseException:
            await writer.abort()
            raise
        return job_pb2.JobResult(
            tables=report.tables,
            backup_path=path.relative,
            backup_bytes=writer.bytes,
            backup_sha256=writer.sha256,
        )

    async def restore_from_file(
        self, spec: job_pb2.RestoreFromFileJob, progress: Progress
    ) -> job_pb2.JobResult:
        """Restores a backup file through the same checks and transaction as RestoreBackup."""
        field_path = "spec.restore_from_file.path"
        path = await backup_file.locate(self._settings.backup_dir, spec.path, field_path)
        reader = backup_file.BackupReader(path, field_path)
        report = backup_stream.Report(progress, lambda: (reader.bytes, reader.size))
        budget = self._settings.backup_timeout
        try:
            async with (
                asyncio.timeout(budget),
                contextlib.aclosing(reader.messages()) as messages,
            ):
                incoming = Incoming(messages)
                first = await incoming.first()
                await self._load(
                    incoming, first.header, spec.replace_existing, budget, None, report
                )
        except TimeoutError:
            raise _timed_out(budget) from None
        return job_pb2.JobResult(
            tables=report.tables,
            backup_path=path.relative,
            backup_bytes=reader.bytes,
            backup_sha256=reader.sha256,
        )

    # -- scope -------------------------------------------------------------------------

    async def resolve_scope(self, scope: job_pb2.BackupScope, field_path: str) -> Scope:
        """The workspace and exposed tables a request names; INVALID_ARGUMENT for bad ones."""
        errors: list[ServiceError] = []
        workspace: uuid.UUID | None = None
        if scope.workspace_id:
            try:
                workspace = parse_uuid(scope.workspace_id, f"{field_path}.workspace_id")
            except ServiceError as error:
                errors.append(error)
        tables = await self._catalog.tables(scope.tables, f"{field_path}.tables", errors)
        combined = combine(errors)
        if combined is not None:
            raise combined
        if not scope.tables:
            current = self._catalog.current.tables
            tables = [current[name] for name in sorted(current)]
        if not tables:
            raise ServiceError(
                Code.FAILED_PRECONDITION, "NO_EXPOSED_TABLES", "this server exposes no tables"
            )
        return Scope(workspace, tuple(tables))

    async def _header_scope(self, header: pb.BackupHeader) -> Scope:
        """The scope a backup's header declares, checked against this server's tables."""
        if header.format_version != FORMAT_VERSION:
            raise malformed(
                f"backup format {header.format_version} is not one this server reads "
                f"({FORMAT_VERSION})",
                "header.format_version",
            )
        workspace = None
        if header.scope.workspace_id:
            workspace = parse_uuid(header.scope.workspace_id, "header.scope.workspace_id")
        if not header.tables:
            raise malformed("the header lists no tables", "header.tables")
        for index, table in enumerate(header.tables):
            if len(table.columns) != len(table.column_types):
                raise malformed(
                    "columns and column_types differ in length",
                    f"header.tables[{index}].column_types",
                )
        errors: list[ServiceError] = []
        names = [t.name for t in header.tables]
        tables = await self._catalog.tables(names, "header.tables", errors)
        combined = combine(errors)
        if combined is not None:
            raise combined
        return Scope(workspace, tuple(tables))

    # -- connections -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _owner_connection(self, wait: float | None) -> AsyncIterator[Connection]:
        """An owner-pool connection; RESOURCE_EXHAUSTED after `wait` seconds (None: no limit)."""
        pool = self._database.owner_pool
        try:
            connection = await pool.acquire(timeout=wait)
        except TimeoutError:
            raise ServiceError(
                Code.RESOURCE_EXHAUSTED,
                "POOL_EXHAUSTED",
                f"no owner connection became free within {wait:g} s (backups, restores and "
                "maintenance share them)",
            ) from None
        try:
            yield connection
        finally:
            # asyncpg rolls back an open transaction on release and waits for a cancelled
            # COPY to end first; the hand-back itself runs shielded.
            await pool.release(connection, timeout=self._settings.connect_timeout + 5.0)

    # -- export ------------------------------------------------------------------------

    async def _export(
        self,
        scope: Scope,
        chunk_bytes: int,
        budget: float,
        wait: float | None,
        report: backup_stream.Report,
    ) -> AsyncGenerator[pb.ExportBackupResponse, None]:
        queue: asyncio.Queue[pb.ExportBackupResponse | backup_stream.Ended] = asyncio.Queue(
            _QUEUED_MESSAGES
        )
        held: list[Connection] = []
        copy = functools.partial(
            self._copy_out, scope, chunk_bytes, budget, wait, queue, report, held
        )
        producer = asyncio.create_task(self._produce(copy, budget, queue), name="backup-export")
        self._tasks.add(producer)
        producer.add_done_callback(self._tasks.discard)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, backup_stream.Ended):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            if not producer.done():
                # The reader went away (cancelled, failed or closed the stream). Closing
                # the connection ends the COPY and its read-only transaction in PostgreSQL
                # at once. Cancelling the producer inside COPY's output callback alone left
                # asyncpg waiting, now and then for good, for the end of a COPY that had
                # already sent its last rows: the connection stayed idle in transaction and
                # its owner-pool slot was lost (tests/test_faults.py, random stream ends).
                for connection in held:
                    # A connection already handed back has a detached proxy, which refuses.
                    with contextlib.suppress(Exception):
                        connection.terminate()
                producer.cancel()
                # Room for how it ended, which nobody reads any more: it must not wait.
                while not queue.empty():
                    queue.get_nowait()
                await asyncio.wait([producer])

    @staticmethod
    async def _produce(
        copy: Callable[[], Awaitable[None]],
        budget: float,
        queue: asyncio.Queue[pb.ExportBackupResponse | backup_stream.Ended],
    ) -> None:
        """Runs the export's COPY (`copy` queues its messages), then queues how it ended."""
        ended = backup_stream.Ended()
        try:
            async with asyncio.timeout(budget):
                await copy()
        except TimeoutError:
            ended = backup_stream.Ended(_timed_out(budget))
        except Exception as error:  # handed to the reader, which raises it
            ended = backup_stream.Ended(error)
        await queue.put(ended)

    async def _copy_out(
        self,
        scope: Scope,
        chunk_bytes: int,
        budget: float,
        wait: float | None,
        queue: asyncio.Queue[pb.ExportBackupResponse | backup_stream.Ended],
        report: backup_stream.Report,
        held: list[Connection] | None = None,
    ) -> None:
        """The export's COPY, its messages queued; `held` has the connection while it runs
        (emptied before the connection is handed back)."""
        held = held if held is not None else []
        async with self._owner_connection(wait) as conn:
            held.append(conn)
            try:
                await self._copy_in_transaction(conn, scope, chunk_bytes, budget, queue, report)
            finally:
                held.clear()

    async def _copy_in_transaction(
        self,
        conn: Connection,
        scope: Scope,
        chunk_bytes: int,
        budget: float,
        queue: asyncio.Queue[pb.ExportBackupResponse | backup_stream.Ended],
        report: backup_stream.Report,
    ) -> None:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await backup_tables.limit_statements(conn, budget)
            # Before the first query, which takes the snapshot: see lock_tables.
            await backup_tables.lock_tables(conn, scope.tables, "ACCESS SHARE")
            snapshot = await conn.fetchrow(_SNAPSHOT_SQL)
            assert snapshot is not None
            shapes = await backup_tables.copy_shapes(
                conn, await backup_tables.dependency_order(conn, scope.tables)
            )
            names = [s.table.name for s in shapes]
            header = pb.BackupHeader(
                format_version=FORMAT_VERSION,
                scope=job_pb2.BackupScope(workspace_id=scope.workspace_text, tables=names),
                tables=[s.header() for s in shapes],
                server_version_num=snapshot["version"],
                snapshot_time=_rfc3339(snapshot["taken"]),
            )
            await queue.put(pb.ExportBackupResponse(header=header))
            started = time.perf_counter()
            state = backup_stream.Outgoing()
            counts = []
            for shape in shapes:
                rows = await self._copy_table_out(
                    conn, scope, shape, chunk_bytes, state, queue, report
                )
                counts.append(pb.BackupTableCount(table=shape.table.name, row_count=rows))
            manifest = pb.BackupManifest(
                tables=counts,
                chunk_count=state.sequence,
                data_bytes=state.data_bytes,
                sha256=state.sha256.hexdigest(),
            )
            await queue.put(pb.ExportBackupResponse(manifest=manifest))
        _log_done("backup", scope, counts, state.data_bytes, started)

    async def _copy_table_out(
        self,
        conn: Connection,
        scope: Scope,
        shape: CopyShape,
        chunk_bytes: int,
        state: backup_stream.Outgoing,
        queue: asyncio.Queue[pb.ExportBackupResponse | backup_stream.Ended],
        report: backup_stream.Report,
    ) -> int:
        table = shape.table
        await report.start(table.name)
        chunker = backup_stream.Chunker(table.name, chunk_bytes, state, queue, report)
        condition = scope.copy_filter(table)
        where = "" if condition is None else f" WHERE {condition}"
        columns = ", ".join(c.quoted for c in shape.columns)
        # A query even for every workspace: `COPY table TO` refuses partitioned tables.
        status = await conn.copy_from_query(
            f"SELECT {columns} FROM {table.qualified}{where}",
            output=chunker.write,
            format="binary",
        )
        await chunker.flush()
        rows = backup_tables.copied_rows(status)
        report.finish(table.name, "COPY TO", rows)
        return rows

    # -- restore -----------------------------------------------------------------------

    async def _load(
        self,
        incoming: Incoming,
        header: pb.BackupHeader,
        replace_existing: bool,
        budget: float,
        wait: float | None,
        report: backup_stream.Report,
    ) -> _Loaded:
        scope = await self._header_scope(header)
        started = time.perf_counter()
        async with self._owner_connection(wait) as conn, conn.transaction():
            await backup_tables.limit_statements(conn, budget)
            await backup_tables.defer_constraints(conn)
            await backup_tables.lock_scope(conn, scope)
            shapes = await backup_tables.copy_shapes(conn, scope.tables)
            backup_tables.check_columns(header, shapes)
            cycle = backup_tables.immediate_cycles(
                await backup_tables.foreign_keys(conn, scope.tables)
            )
            try:
                replaced = await backup_tables.clear_scope(
                    conn, scope, shapes, replace_existing, report
                )
                counts = []
                for shape in shapes:
                    rows = await self._copy_table_in(conn, scope, shape, incoming, report)
                    counts.append(pb.BackupTableCount(table=shape.table.name, row_count=rows))
            except asyncpg.ForeignKeyViolationError as error:
                explained = backup_tables.cycle_violation(error, cycle)
                if explained is None:
                    raise
                raise explained from None
            manifest = await incoming.manifest()
            backup_stream.check_manifest(manifest, incoming, counts)
            await report.enter("commit")
            await backup_tables.advance_sequences(conn, shapes)
        _log_done("restore", scope, counts, incoming.data_bytes, started)
        return _Loaded(counts, replaced, incoming.data_bytes)

    async def _copy_table_in(
        self,
        conn: Connection,
        scope: Scope,
        shape: CopyShape,
        incoming: Incoming,
        report: backup_stream.Report,
    ) -> int:
        table = shape.table
        await report.start(table.name)
        data = incoming.table_data(table.name, report)
        # COPY FROM refuses a table whose row-level security applies to this role: an
        # owner that is neither superuser nor BYPASSRLS, under FORCE (db/row_security.py).
        # Such a table is loaded into a temporary copy first, then INSERTed, which the
        # owner's all-workspaces policy admits.
        staged = await conn.fetchval(_ROW_SECURITY_ACTIVE, table.qualified)
        target, schema = (_STAGING, "pg_temp") if staged else (table.name, table.schema)
        try:
            if staged:
                await conn.execute(
                    f"CREATE TEMPORARY TABLE {_STAGING} (LIKE {table.qualified}) ON COMMIT DROP"
                )
            status = await conn.copy_to_table(
                target,
                schema_name=schema,
                columns=shape.column_names,
                source=data,
                format="binary",
                where=scope.copy_filter(table),
            )
        finally:
            await data.aclose()
        if staged:
            columns = ", ".join(c.quoted for c in shape.columns)
            status = await conn.execute(
                f"INSERT INTO {table.qualified} ({columns}) OVERRIDING SYSTEM VALUE"
                f" SELECT {columns} FROM pg_temp.{_STAGING}"
            )
            await conn.execute(f"DROP TABLE pg_temp.{_STAGING}")
        rows = backup_tables.copied_rows(status)
        report.finish(table.name, "COPY FROM", rows)
        return rows
