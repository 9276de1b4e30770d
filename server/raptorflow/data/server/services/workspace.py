"""WorkspaceService: workspace-scoped table access, kept thin.

Each method looks the table up in the catalog, has the compiler build the
statement, runs it on a pool connection scoped to the request's workspace
(`Database.workspace_connection`: the row-level security net's transaction)
within the call's deadline, and shapes the response. SQL lives in
`db/compiler.py`; errors are mapped by `@rpc_errors`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db import compiler, values
from raptorflow.data.server.db.catalog import CatalogCache, Table
from raptorflow.data.server.db.connections import Connection, Database, Deadline
from raptorflow.data.server.db.failures import to_service_error
from raptorflow.data.server.db.page_tokens import PageTokenCodec
from raptorflow.data.server.errors import ServiceError, invalid_argument
from raptorflow.data.server.services.status import rpc_errors
from raptorflow.data.v1 import value_pb2, workspace_service_pb2, workspace_service_pb2_grpc

pb = workspace_service_pb2
Context = grpc.aio.ServicerContext[Any, Any]

MAX_BATCH_OPERATIONS = 100


def _affected(status: str) -> int:
    # asyncpg returns the command tag, e.g. "INSERT 0 5" or "UPDATE 3".
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class _Outcome:
    """What a mutation did: its affected-row count and any returned rows."""

    def __init__(self, count: int, returning: value_pb2.RowSet) -> None:
        self.count = count
        self.returning = returning


class WorkspaceServicer(workspace_service_pb2_grpc.WorkspaceServiceServicer):
    """Serves raptorflow.data.v1.WorkspaceService."""

    def __init__(
        self, settings: Settings, database: Database, catalog: CatalogCache, tokens: PageTokenCodec
    ) -> None:
        self._settings = settings
        self._database = database
        self._catalog = catalog
        self._tokens = tokens

    # -- helpers ---------------------------------------------------------------

    def _deadline(self, context: Context) -> Deadline:
        return Deadline.after(context.time_remaining())

    @staticmethod
    def _workspace(workspace_id: str) -> uuid.UUID:
        # After compiling, which refused a missing or malformed workspace id already.
        return values.parse_uuid(workspace_id, "workspace_id")

    async def _run(
        self, conn: Connection, statements: Sequence[compiler.Statement], deadline: Deadline
    ) -> _Outcome:
        count = 0
        output: tuple[Any, ...] = statements[0].output if statements else ()
        records: list[asyncpg.Record] = []
        cap = self._settings.statement_timeout
        for statement in statements:
            if statement.output:
                fetched = await conn.fetch(
                    statement.sql, *statement.args, timeout=deadline.timeout(cap)
                )
                records.extend(fetched)
                count += len(fetched)
            else:
                status = await conn.execute(
                    statement.sql, *statement.args, timeout=deadline.timeout(cap)
                )
                count += _affected(status)
        returning = values.row_set(output, records) if output else value_pb2.RowSet()
        return _Outcome(count, returning)

    async def _mutate(
        self, statements: Sequence[compiler.Statement], workspace_id: str, context: Context
    ) -> _Outcome:
        deadline = self._deadline(context)
        async with self._database.workspace_connection(
            deadline, self._workspace(workspace_id), transaction=len(statements) > 1
        ) as conn:
            return await self._run(conn, statements, deadline)

    def _check_row_count(self, rows: int) -> None:
        if rows > self._settings.max_rows_per_request:
            raise invalid_argument(
                "rows",
                f"at most {self._settings.max_rows_per_request} rows per request",
                reason="TOO_MANY_ROWS",
            )

    async def _compile_insert(self, request: pb.InsertRequest) -> list[compiler.Statement]:
        table = await self._catalog.table(request.table)
        self._check_row_count(len(request.rows))
        return compiler.compile_insert(table, request)

    async def _compile_upsert(self, request: pb.UpsertRequest) -> list[compiler.Statement]:
        table = await self._catalog.table(request.table)
        self._check_row_count(len(request.rows))
        return compiler.compile_upsert(table, request)

    async def _compile_update(self, request: pb.UpdateRequest) -> list[compiler.Statement]:
        return [compiler.compile_update(await self._catalog.table(request.table), request)]

    async def _compile_delete(self, request: pb.DeleteRequest) -> list[compiler.Statement]:
        return [compiler.compile_delete(await self._catalog.table(request.table), request)]

    # -- RPCs --------------------------------------------------------------------

    @rpc_errors
    async def DescribeTables(
        self, request: pb.DescribeTablesRequest, context: Context
    ) -> pb.DescribeTablesResponse:
        if request.tables:
            tables = [
                await self._catalog.table(name, f"tables[{i}]")
                for i, name in enumerate(request.tables)
            ]
        else:
            tables = list(self._catalog.current.tables.values())
        return pb.DescribeTablesResponse(
            tables=[_describe(t) for t in sorted(tables, key=lambda t: t.name)]
        )

    @rpc_errors
    async def Select(self, request: pb.SelectRequest, context: Context) -> pb.SelectResponse:
        table = await self._catalog.table(request.table)
        if request.page_size < 0:
            raise invalid_argument("page_size", "must not be negative")
        page_size = min(
            request.page_size or self._settings.default_page_size, self._settings.max_page_size
        )
        cursor = self._tokens.verify(request) if request.page_token else None
        plan = compiler.compile_select(table, request, page_size=page_size, cursor=cursor)
        deadline = self._deadline(context)
        statement = plan.statement
        workspace = self._workspace(request.workspace_id)
        async with self._database.workspace_connection(deadline, workspace, readonly=True) as conn:
            records = await conn.fetch(
                statement.sql,
                *statement.args,
                timeout=deadline.timeout(self._settings.statement_timeout),
            )
        page = records[:page_size]
        response = pb.SelectResponse()
        if len(records) > page_size and plan.paginated:
            last = page[-1]
            cursor_values = [
                values.to_value(statement.output[p], last[p]) for p in plan.key_positions
            ]
            response.next_page_token = self._tokens.issue(request, cursor_values)
        # Filled in place: upb would copy rows handed to the constructor.
        response.columns.extend(c.name for c in statement.output[: plan.visible])
        values.encode_rows(response.rows, statement.output, page, plan.visible)
        return response

    @rpc_errors
    async def Count(self, request: pb.CountRequest, context: Context) -> pb.CountResponse:
        table = await self._catalog.table(request.table)
        statement = compiler.compile_count(table, request)
        deadline = self._deadline(context)
        workspace = self._workspace(request.workspace_id)
        async with self._database.workspace_connection(deadline, workspace, readonly=True) as conn:
            count = await conn.fetchval(
                statement.sql,
                *statement.args,
                timeout=deadline.timeout(self._settings.statement_timeout),
            )
        return pb.CountResponse(count=count)

    @rpc_errors
    async def Insert(self, request: pb.InsertRequest, context: Context) -> pb.InsertResponse:
        statements = await self._compile_insert(request)
        outcome = await self._mutate(statements, request.workspace_id, context)
        return pb.InsertResponse(affected_count=outcome.count, returning=outcome.returning)

    @rpc_errors
    async def Upsert(self, request: pb.UpsertRequest, context: Context) -> pb.UpsertResponse:
        statements = await self._compile_upsert(request)
        outcome = await self._mutate(statements, request.workspace_id, context)
        return pb.UpsertResponse(affected_count=outcome.count, returning=outcome.returning)

    @rpc_errors
    async def Update(self, request: pb.UpdateRequest, context: Context) -> pb.UpdateResponse:
        statements = await self._compile_update(request)
        outcome = await self._mutate(statements, request.workspace_id, context)
        return pb.UpdateResponse(affected_count=outcome.count, returning=outcome.returning)

    @rpc_errors
    async def Delete(self, request: pb.DeleteRequest, context: Context) -> pb.DeleteResponse:
        statements = await self._compile_delete(request)
        outcome = await self._mutate(statements, request.workspace_id, context)
        return pb.DeleteResponse(affected_count=outcome.count, returning=outcome.returning)

    @rpc_errors
    async def ExecuteBatch(
        self, request: pb.ExecuteBatchRequest, context: Context
    ) -> pb.ExecuteBatchResponse:
        if not request.operations:
            raise invalid_argument("operations", "at least one operation is required")
        if len(request.operations) > MAX_BATCH_OPERATIONS:
            raise invalid_argument(
                "operations", f"at most {MAX_BATCH_OPERATIONS} operations per batch"
            )
        compiled: list[tuple[str, list[compiler.Statement]]] = []
        total_rows = 0
        for i, operation in enumerate(request.operations):
            which = operation.WhichOneof("operation")
            if which is None:
                raise invalid_argument(
                    f"operations[{i}]", "an operation must set insert, upsert, update or delete"
                )
            kind: str = which
            prefix = f"operations[{i}].{kind}"
            inner = getattr(operation, kind)
            if inner.workspace_id and inner.workspace_id != request.workspace_id:
                raise invalid_argument(
                    f"{prefix}.workspace_id",
                    "must be empty or the batch's workspace",
                    reason="WORKSPACE_MISMATCH",
                )
            inner.workspace_id = request.workspace_id
            try:
                if kind == "insert":
                    statements = await self._compile_insert(inner)
                    total_rows += len(inner.rows)
                elif kind == "upsert":
                    statements = await self._compile_upsert(inner)
                    total_rows += len(inner.rows)
                elif kind == "update":
                    statements = await self._compile_update(inner)
                else:
                    statements = await self._compile_delete(inner)
            except ServiceError as exc:
                raise exc.prefixed(prefix) from None
            compiled.append((kind, statements))
        self._check_row_count(total_rows)
        deadline = self._deadline(context)
        workspace = self._workspace(request.workspace_id)
        results = []
        async with self._database.workspace_connection(
            deadline, workspace, transaction=True
        ) as conn:
            for i, (op_kind, statements) in enumerate(compiled):
                try:
                    outcome = await self._run(conn, statements, deadline)
                except asyncpg.PostgresError as exc:
                    # Field violations of a failing operation point into the batch.
                    raise to_service_error(exc).prefixed(f"operations[{i}].{op_kind}") from exc
                result = pb.BatchResult()
                getattr(result, op_kind).affected_count = outcome.count
                getattr(result, op_kind).returning.CopyFrom(outcome.returning)
                results.append(result)
        return pb.ExecuteBatchResponse(results=results)


def _describe(table: Table) -> pb.TableDescription:
    return pb.TableDescription(
        name=table.name,
        columns=[
            pb.ColumnDescription(
                name=c.name,
                database_type=c.database_type,
                kind=c.kind.value,  # type: ignore[arg-type]  # Kind mirrors ValueKind's numbers
                element_kind=c.element_kind.value if c.element_kind else 0,  # type: ignore[arg-type]
                nullable=c.nullable,
                has_default=c.has_default,
            )
            for c in table.columns
        ],
        primary_key=list(table.primary_key),
        unique_keys=[pb.UniqueKey(columns=list(k)) for k in table.unique_keys],
    )
