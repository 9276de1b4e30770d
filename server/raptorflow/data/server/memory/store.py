"""Memory records in `raptorflow_data.memory_records`: batched upserts and deletes, exact search.

A batch is validated whole (every bad field is reported at once, up to a few),
then written by one statement, so it commits entirely or not at all; so is a
delete. Search is exact cosine similarity; `queries.py` explains how the
pgvector path and the plain SQL path come to return identical results. Every
statement runs scoped to its workspace (`Database.workspace_connection`), which
the table's row-level security policy checks (`db/row_security.py`).
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import asyncpg
from google.protobuf import json_format, struct_pb2
from raptorflow.data.server.config import Settings
from raptorflow.data.server.db.connections import Database, Deadline
from raptorflow.data.server.db.values import parse_uuid
from raptorflow.data.server.errors import ServiceError, combine, invalid_argument
from raptorflow.data.server.memory import queries
from raptorflow.data.v1 import memory_sync_service_pb2

pb = memory_sync_service_pb2
log = logging.getLogger(__name__)

MAX_RECORDS_PER_BATCH = 1000
MAX_ID_LENGTH = 256
MAX_KIND_LENGTH = 64
MAX_DIMENSION = 16_000
MAX_TOP_K = 1000
# Ids, and source row ids, one delete may name.
MAX_DELETE_SELECTORS = 1000
# Field violations reported for one call: a status travels in a trailer, which
# gRPC caps at 8 KiB by default, so a batch of 1,000 bad records cannot list them all.
MAX_VIOLATIONS = 10


class MemoryStore:
    """Writes and searches one service's memory records."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self._settings = settings
        self._database = database
        self._vector_search_sql: str | None = None

    @property
    def uses_pgvector(self) -> bool:
        """Whether search preselects with pgvector (known after `prepare`)."""
        return self._vector_search_sql is not None

    async def prepare(self) -> None:
        """Learns at start-up whether pgvector is there (after migrations ran).

        It is used only if the generated `embedding_vector` column exists and
        pgvector's cast, `<=>` and norm work for the query role; otherwise
        search keeps to the plain SQL path, which gives the same results.
        """
        self._vector_search_sql = None
        deadline = Deadline(None)
        cap = self._settings.statement_timeout
        async with self._database.connection(deadline) as conn:
            schema = await conn.fetchval(queries.VECTOR_COLUMN_SQL, timeout=deadline.timeout(cap))
            if schema is None:
                log.info("memory search: no pgvector column, using the SQL scan")
                return
            try:
                answer = await conn.fetchval(
                    queries.vector_probe_sql(schema), timeout=deadline.timeout(cap)
                )
            except asyncpg.PostgresError as exc:
                log.warning("memory search: pgvector is not usable (%s), using the SQL scan", exc)
                return
        if answer != 6.0:
            log.warning("memory search: pgvector answered %r for 6, using the SQL scan", answer)
            return
        log.info("memory search: pgvector in schema %s preselects", schema)
        self._vector_search_sql = queries.vector_search_sql(schema)

    async def upsert(
        self, batch: pb.UpsertMemoryRecordsRequest, field_prefix: str, deadline: Deadline
    ) -> tuple[int, int]:
        """Writes one batch in one transaction; returns (inserted, updated)."""
        workspace = parse_uuid(batch.workspace_id, f"{field_prefix}.workspace_id")
        records = batch.records
        if not 1 <= len(records) <= MAX_RECORDS_PER_BATCH:
            raise invalid_argument(
                f"{field_prefix}.records",
                f"a batch carries 1 to {MAX_RECORDS_PER_BATCH:,} records, not {len(records):,}",
                reason="INVALID_VALUE" if not records else "TOO_MANY_RECORDS",
            )
        errors: list[ServiceError] = []
        metadata: list[str | None] = []
        first_index: dict[str, int] = {}
        for i, record in enumerate(records):
            path = f"{field_prefix}.records[{i}]"
            errors.extend(_record_errors(record, path))
            if record.id in first_index:
                errors.append(
                    invalid_argument(
                        f"{path}.id",
                        f"repeats the id of records[{first_index[record.id]}]",
                        reason="DUPLICATE_RECORD_ID",
                    )
                )
            else:
                first_index[record.id] = i
            text, error = _metadata_json(record, f"{path}.metadata")
            metadata.append(text)
            if error is not None:
                errors.append(error)
            if len(errors) >= MAX_VIOLATIONS:
                break
        failure = combine(errors[:MAX_VIOLATIONS])
        if failure is not None:
            raise failure

        args = upsert_arguments(workspace, records, metadata)
        async with self._database.workspace_connection(deadline, workspace) as conn:
            rows = await conn.fetch(
                queries.UPSERT_SQL,
                *args,
                timeout=deadline.timeout(self._settings.statement_timeout),
            )
        inserted = sum(1 for row in rows if row["inserted"])
        return inserted, len(rows) - inserted

    async def delete(self, request: pb.DeleteMemoryRecordsRequest, deadline: Deadline) -> int:
        """Deletes the records the request selects, in one statement; returns how many went."""
        failure = combine(itertools.islice(_delete_errors(request), MAX_VIOLATIONS))
        if failure is not None:
            raise failure
        workspace = parse_uuid(request.workspace_id, "workspace_id")
        async with self._database.workspace_connection(deadline, workspace) as conn:
            deleted = await conn.fetchval(
                queries.DELETE_SQL,
                workspace,
                list(request.ids),
                request.source_table or None,
                list(request.source_row_ids),
                timeout=deadline.timeout(self._settings.statement_timeout),
            )
        return int(deleted)

    async def search(
        self, request: pb.SearchMemoryRecordsRequest, deadline: Deadline
    ) -> list[pb.ScoredMemoryRecord]:
        """The workspace's records nearest to the embedding, most similar first."""
        workspace, metadata_contains = _validated_search(request)
        embedding = list(request.embedding)
        args: list[Any] = [
            workspace,
            embedding,
            list(request.kinds) or None,
            request.source_table or None,
            metadata_contains,
            request.top_k,
        ]
        sql = queries.SEARCH_SQL
        low, high = queries.FLOAT32_SAFE_NORMS
        # pgvector's float32 arithmetic is bounded only for query norms in the safe range.
        if self._vector_search_sql is not None and low <= _norm(embedding) <= high:
            sql = self._vector_search_sql
            args.append(2 * queries.float32_cosine_error(len(embedding)))
        async with self._database.workspace_connection(deadline, workspace, readonly=True) as conn:
            rows = await conn.fetch(
                sql, *args, timeout=deadline.timeout(self._settings.statement_timeout)
            )
        return [_scored(row) for row in rows]


# -- validation ----------------------------------------------------------------


def _length_error(value: str, path: str, most: int) -> ServiceError | None:
    if not 1 <= len(value) <= most:
        return invalid_argument(
            path, f"must be 1 to {most} characters, not {len(value)}", reason="INVALID_VALUE"
        )
    return _text_error(value, path)


def _text_error(value: str, path: str) -> ServiceError | None:
    if "\x00" in value:
        return invalid_argument(path, "text cannot contain NUL characters", reason="INVALID_VALUE")
    return None


def _embedding_error(embedding: Sequence[float], path: str) -> ServiceError | None:
    if not 1 <= len(embedding) <= MAX_DIMENSION:
        return invalid_argument(
            path,
            f"must have 1 to {MAX_DIMENSION:,} components, not {len(embedding):,}",
            reason="INVALID_VALUE",
        )
    # The sum of up to 16,000 finite float32 values cannot overflow a float64, so it
    # is finite exactly when every component is; only then is each one looked at.
    if not math.isfinite(sum(embedding)):
        index = next(i for i, c in enumerate(embedding) if not math.isfinite(c))
        description = f"component {index} is {embedding[index]}, not a finite number"
        return invalid_argument(path, description, reason="INVALID_VALUE")
    return None


def _record_errors(record: pb.MemoryRecord, path: str) -> Iterable[ServiceError]:
    checks = (
        _length_error(record.id, f"{path}.id", MAX_ID_LENGTH),
        _length_error(record.kind, f"{path}.kind", MAX_KIND_LENGTH),
        _text_error(record.content, f"{path}.content"),
        _text_error(record.source_table, f"{path}.source_table"),
        _text_error(record.source_row_id, f"{path}.source_row_id"),
        _embedding_error(record.embedding, f"{path}.embedding"),
    )
    return [error for error in checks if error is not None]


def _json_problem(value: object) -> str | None:
    """Why a parsed JSON value cannot be stored or matched as jsonb, if it cannot."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            return "JSON numbers must fit a float64"
        elif isinstance(item, str):
            if "\x00" in item:
                return "JSON strings cannot contain NUL (\\u0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "JSON strings cannot contain unpaired surrogates"
    return None


def upsert_arguments(
    workspace: uuid.UUID, records: Sequence[pb.MemoryRecord], metadata: Sequence[str | None]
) -> tuple[object, ...]:
    """UPSERT_SQL's arguments for validated `records` and their metadata JSON texts."""
    # Sorted by id, so two batches that share ids lock their rows in the same order.
    order = sorted(range(len(records)), key=lambda i: records[i].id)
    # Compact (4 bytes a component): a full batch can carry 16 million of them.
    components = array.array("f")
    starts: list[int] = []
    dimensions: list[int] = []
    for i in order:
        embedding = records[i].embedding
        starts.append(len(components))
        dimensions.append(len(embedding))
        components.extend(embedding)
    return (
        workspace,
        [records[i].id for i in order],
        [records[i].kind for i in order],
        [records[i].content or None for i in order],
        [metadata[i] for i in order],
        [records[i].source_table or None for i in order],
        [records[i].source_row_id or None for i in order],
        starts,
        dimensions,
        components,
    )


def metadata_json(record: pb.MemoryRecord) -> str | None:
    """The record's metadata as the store writes it (JSON text, None without metadata);
    ValueError when it cannot be stored."""
    text, error = _metadata_json(record, "metadata")
    if error is not None:
        raise ValueError(error.message)
    return text


def _metadata_json(record: pb.MemoryRecord, path: str) -> tuple[str | None, ServiceError | None]:
    """The record's metadata as JSON text (None when it has none), or why it cannot be stored."""
    if not record.HasField("metadata"):
        return None, None
    try:
        value = json_format.MessageToDict(record.metadata)
    except (ValueError, json_format.Error) as exc:
        # NaN and infinities have no JSON form.
        return None, invalid_argument(path, str(exc), reason="INVALID_VALUE")
    problem = _json_problem(value)
    if problem is not None:
        return None, invalid_argument(path, problem, reason="INVALID_VALUE")
    return json.dumps(value, ensure_ascii=False, allow_nan=False), None


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _metadata_filter(text: str, path: str) -> tuple[str | None, ServiceError | None]:
    """metadata_contains checked as a JSON object, passed on as the caller wrote it."""
    if not text:
        return None, None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None, invalid_argument(path, "is not valid JSON", reason="INVALID_VALUE")
    if not isinstance(value, dict):
        return None, invalid_argument(path, "must be a JSON object", reason="INVALID_VALUE")
    problem = _json_problem(value)
    if problem is not None:
        return None, invalid_argument(path, problem, reason="INVALID_VALUE")
    return text, None


def _validated_search(request: pb.SearchMemoryRecordsRequest) -> tuple[uuid.UUID, str | None]:
    """The workspace UUID and metadata filter of a valid request; raises for a bad one."""
    errors: list[ServiceError | None] = []
    workspace: uuid.UUID | None = None
    try:
        workspace = parse_uuid(request.workspace_id, "workspace_id")
    except ServiceError as exc:
        errors.append(exc)
    embedding_error = _embedding_error(request.embedding, "embedding")
    if embedding_error is None and not any(request.embedding):
        embedding_error = invalid_argument(
            "embedding",
            "is all zeros: a zero vector has no direction, so no cosine similarity",
            reason="INVALID_VALUE",
        )
    errors.append(embedding_error)
    if not 1 <= request.top_k <= MAX_TOP_K:
        errors.append(
            invalid_argument(
                "top_k", f"must be 1 to {MAX_TOP_K:,}, not {request.top_k}", reason="INVALID_VALUE"
            )
        )
    errors.extend(_text_error(kind, f"kinds[{i}]") for i, kind in enumerate(request.kinds))
    errors.append(_text_error(request.source_table, "source_table"))
    metadata_contains, metadata_error = _metadata_filter(
        request.metadata_contains, "metadata_contains"
    )
    errors.append(metadata_error)
    failure = combine([e for e in errors if e is not None][:MAX_VIOLATIONS])
    if failure is not None:
        raise failure
    assert workspace is not None
    return workspace, metadata_contains


def _selector_errors(
    values: Sequence[str], path: str, value_error: Callable[[str, str], ServiceError | None]
) -> Iterator[ServiceError]:
    if len(values) > MAX_DELETE_SELECTORS:
        # Checking each of a huge list would only describe a request refused anyway.
        yield invalid_argument(
            path,
            f"a delete names at most {MAX_DELETE_SELECTORS:,}, not {len(values):,}",
            reason="TOO_MANY_RECORDS",
        )
        return
    for i, value in enumerate(values):
        error = value_error(value, f"{path}[{i}]")
        if error is not None:
            yield error


def _row_id_error(value: str, path: str) -> ServiceError | None:
    # Upsert stores an empty source_row_id as NULL, so no record has one to match.
    if not value:
        return invalid_argument(path, "must not be empty", reason="INVALID_VALUE")
    return _text_error(value, path)


def _delete_errors(request: pb.DeleteMemoryRecordsRequest) -> Iterator[ServiceError]:
    """What is wrong with a delete request, in field order; nothing for a valid one."""
    try:
        parse_uuid(request.workspace_id, "workspace_id")
    except ServiceError as exc:
        yield exc
    ids, table, row_ids = request.ids, request.source_table, request.source_row_ids
    if not ids and not table and not row_ids:
        yield invalid_argument(
            "ids",
            "select records by ids, or by source_table and source_row_ids",
            reason="SELECTOR_REQUIRED",
        )
    yield from _selector_errors(
        ids, "ids", lambda value, path: _length_error(value, path, MAX_ID_LENGTH)
    )
    if row_ids and not table:
        yield invalid_argument(
            "source_table", "is required with source_row_ids", reason="SELECTOR_REQUIRED"
        )
    if table and not row_ids:
        # Never read as "every record of the table": that is not what a deleted row means.
        yield invalid_argument(
            "source_row_ids",
            "name the rows of source_table whose records to delete; a table alone selects none",
            reason="SELECTOR_REQUIRED",
        )
    table_error = _text_error(table, "source_table")
    if table_error is not None:
        yield table_error
    yield from _selector_errors(row_ids, "source_row_ids", _row_id_error)


def _norm(embedding: Sequence[float]) -> float:
    return math.sqrt(math.fsum(c * c for c in embedding))


# -- results -------------------------------------------------------------------


def _scored(row: asyncpg.Record) -> pb.ScoredMemoryRecord:
    record = pb.MemoryRecord(
        id=row["id"],
        kind=row["kind"],
        content=row["content"] or "",
        source_table=row["source_table"] or "",
        source_row_id=row["source_row_id"] or "",
        # real[] comes back as the float32 values themselves, which protobuf floats hold exactly.
        embedding=row["embedding"],
    )
    if row["metadata"] is not None:
        record.metadata.CopyFrom(json_format.Parse(row["metadata"], struct_pb2.Struct()))
    return pb.ScoredMemoryRecord(record=record, similarity=row["similarity"])
