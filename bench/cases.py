"""The measured workloads: each call, its requests, and the statements of its asyncpg ceiling.

Every workload is measured against three targets, in the same run, alternating:

- `service`: `raptorflow-data serve` with its defaults (authentication, row
  security, monitoring), called by the load generator (`bench/load.py`);
- `echo`: a bare grpc.aio server on uvloop (`bench/echo.py`) serving the same
  method, parsing the same request bytes and answering with the bytes of a
  real response that the run captured from the service for this workload, so
  both send payloads of the same size. No database;
- `asyncpg`: the statements the service runs for the call, run directly by N
  tasks in one uvloop process on an asyncpg pool of the service's size. Plain:
  as the database URL's user (the tables' owner, for whom the row-level
  security policies let every row through), with no workspace transaction,
  no role switch and no per-call timeout; a batch runs in one transaction, as
  the service runs it.

The requests are built here, deterministically from a `Spec`, both by the run
(to capture responses and check the ceilings) and by each load worker (which
pre-serializes them once and keeps them for the whole run).
"""

from __future__ import annotations

import array
import math
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from google.protobuf import timestamp_pb2
from raptorflow.data.server.db import compiler
from raptorflow.data.server.db.catalog import Catalog
from raptorflow.data.server.memory import queries, store
from raptorflow.data.v1 import (
    memory_sync_service_pb2,
    query_pb2,
    value_pb2,
    workspace_service_pb2,
)

from bench import database

TARGETS = ("service", "echo", "asyncpg")
"""What each workload is measured against; ratios are the service's rps over the others'."""

_WORKSPACE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
_MEMORY = memory_sync_service_pb2.DESCRIPTOR.services_by_name["MemorySyncService"]

# How many different requests a unary workload cycles through; random, so
# PostgreSQL reads across the table.
VARIETY = 4096
# The service's default page size: what a select that names none returns.
PAGE_SIZE = 100
# bench_items.score is id / 10000 (bench/database.py); ranges are counted in ids.
SCORE_STEP = 1 / 10_000
LIST_SPAN = 150
"""Ids in a list select's score range: 150 match, the first 100 by created_at are returned."""
COUNT_SPAN = 1000
"""Ids in a count's score range: each count counts 1,000 rows."""
MIN_ROWS = COUNT_SPAN + 1000

DIMENSION = 384
"""Embedding components (a MiniLM-sized embedding)."""
UPSERT_BLOCKS = 256
"""Distinct upsert calls; each writes its own block of records, filled before the run so that
every measured upsert updates existing records."""
UPSERT_BATCHES = 3
RECORDS_PER_BATCH = 10
SEARCH_QUERIES = 256
TOP_K = 10


@dataclass(frozen=True)
class Spec:
    """What the requests of a run are built from; sent to the load workers as JSON."""

    workspace_id: str
    rows: int
    search_records: int
    seed: int = 7

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Spec:
        return cls(**data)

    @property
    def memory_workspace_id(self) -> str:
        """The workspace the memory upserts write (its records are filled before the run)."""
        return str(uuid.uuid5(uuid.UUID(self.workspace_id), "memory-upsert"))

    @property
    def search_workspace_id(self) -> str:
        """The workspace searched: `search_records` records, never written during the run."""
        return str(uuid.uuid5(uuid.UUID(self.workspace_id), "memory-search"))


@dataclass(frozen=True)
class Workload:
    """One kind of call: its gRPC method and how its requests look."""

    name: str
    service: str
    method_name: str
    client_streaming: bool
    summary: str
    """The service call."""
    asyncpg_summary: str
    """What the asyncpg ceiling runs."""

    @property
    def method(self) -> str:
        return f"/{self.service}/{self.method_name}"


@dataclass(frozen=True)
class Step:
    """One statement of an asyncpg ceiling call: `fetch` when it returns rows, else `execute`."""

    sql: str
    args: tuple[object, ...]
    fetch: bool


@dataclass(frozen=True)
class Plan:
    """The statements of one asyncpg ceiling call; `transaction` runs them in one."""

    steps: tuple[Step, ...]
    transaction: bool = False


POINT_SELECT = Workload(
    name="point_select",
    service=_WORKSPACE.full_name,
    method_name="Select",
    client_streaming=False,
    summary=(
        "Select on bench_items, filter id = <random existing id> (primary key), every column, "
        "page_size 1: one row."
    ),
    asyncpg_summary="the compiled SELECT ... WHERE workspace_id = $1 AND id = $2 ... LIMIT 2",
)
LIST_SELECT = Workload(
    name="list_select",
    service=_WORKSPACE.full_name,
    method_name="Select",
    client_streaming=False,
    summary=(
        f"Select on bench_items, filter score >= lo AND score < lo + {LIST_SPAN * SCORE_STEP:g} "
        f"(random lo; indexed by (workspace_id, score); {LIST_SPAN} rows match), ORDER BY "
        f"created_at DESC (unindexed: sorted), every column, page_size {PAGE_SIZE}: "
        f"{PAGE_SIZE} rows and a next_page_token."
    ),
    asyncpg_summary=f"the compiled SELECT ... ORDER BY created_at DESC, id LIMIT {PAGE_SIZE + 1}",
)
COUNT = Workload(
    name="count",
    service=_WORKSPACE.full_name,
    method_name="Count",
    client_streaming=False,
    summary=(
        f"Count on bench_items, filter score >= lo AND score < lo + {COUNT_SPAN * SCORE_STEP:g} "
        f"(random lo; indexed): {COUNT_SPAN:,} rows counted."
    ),
    asyncpg_summary="the compiled SELECT count(*) ... WHERE workspace_id = $1 AND ...",
)
INSERT = Workload(
    name="insert",
    service=_WORKSPACE.full_name,
    method_name="Insert",
    client_streaming=False,
    summary=(
        f"Insert of one row into {database.EVENTS_TABLE} (name, score, created_at; the id comes "
        "from its identity column), returning id. The table is emptied before each measurement."
    ),
    asyncpg_summary="the compiled INSERT ... SELECT $1, u.c0, ... FROM unnest(...) RETURNING id",
)
BATCH = Workload(
    name="batch",
    service=_WORKSPACE.full_name,
    method_name="ExecuteBatch",
    client_streaming=False,
    summary=(
        "ExecuteBatch, one transaction: Update bench_items SET score (to its own value) WHERE "
        f"id = <random id>, then Insert of one row into {database.EVENTS_TABLE}."
    ),
    asyncpg_summary="the compiled UPDATE and INSERT in one transaction (BEGIN, both, COMMIT)",
)
MEMORY_UPSERT = Workload(
    name="memory_upsert",
    service=_MEMORY.full_name,
    method_name="UpsertMemoryRecords",
    client_streaming=True,
    summary=(
        f"UpsertMemoryRecords stream of {UPSERT_BATCHES} batches of {RECORDS_PER_BATCH} records "
        f"(embedding of {DIMENSION} floats, small metadata), each batch its own statement; "
        f"every record exists already (one of {UPSERT_BLOCKS} blocks), so each is updated."
    ),
    asyncpg_summary=f"the store's UPSERT_SQL once per batch ({UPSERT_BATCHES} statements)",
)
MEMORY_SEARCH = Workload(
    name="memory_search",
    service=_MEMORY.full_name,
    method_name="SearchMemoryRecords",
    client_streaming=False,
    summary=(
        f"SearchMemoryRecords, top_k {TOP_K}, a random unit query of {DIMENSION} floats over a "
        "workspace of --search-records records (exact cosine; pgvector preselects when the "
        "database has it): 10 records with their embeddings."
    ),
    asyncpg_summary="the store's search statement: pgvector's or the plain SQL one, as the service",
)

ALL = (POINT_SELECT, LIST_SELECT, COUNT, INSERT, BATCH, MEMORY_UPSERT, MEMORY_SEARCH)
BY_NAME = {w.name: w for w in ALL}


def case_name(workload: str, target: str) -> str:
    """The name of one measured (workload, target) pair in the results: `count.echo`."""
    return f"{workload}.{target}"


# -- requests ------------------------------------------------------------------


def point_select(workspace_id: str, table: str, row_id: int) -> workspace_service_pb2.SelectRequest:
    """The point select: one row by primary key, every column, page size 1."""
    return workspace_service_pb2.SelectRequest(
        workspace_id=workspace_id,
        table=table,
        filter=query_pb2.Filter(
            condition=query_pb2.Condition(
                column="id",
                operator=query_pb2.OPERATOR_EQ,
                value=value_pb2.Value(int64_value=row_id),
            )
        ),
        page_size=1,
    )


def _score_range(low_id: int, span: int) -> query_pb2.Filter:
    def bound(operator: query_pb2.Operator.ValueType, ids: int) -> query_pb2.Filter:
        return query_pb2.Filter(
            condition=query_pb2.Condition(
                column="score", operator=operator, value=value_pb2.Value(double_value=ids / 10_000)
            )
        )

    return query_pb2.Filter(
        group=query_pb2.FilterGroup(
            operator=query_pb2.GROUP_OPERATOR_AND,
            filters=[
                bound(query_pb2.OPERATOR_GTE, low_id),
                bound(query_pb2.OPERATOR_LT, low_id + span),
            ],
        )
    )


def _low_ids(spec: Spec, span: int, salt: int) -> list[int]:
    rng = random.Random(spec.seed * 1000 + salt)
    return [rng.randint(1, spec.rows - span + 1) for _ in range(VARIETY)]


def _event_insert(workspace_id: str, n: int) -> workspace_service_pb2.InsertRequest:
    # Fixed-width values: every insert request, and response, has the same size.
    return workspace_service_pb2.InsertRequest(
        workspace_id=workspace_id,
        table=database.EVENTS_TABLE,
        columns=["name", "score", "created_at"],
        rows=[
            value_pb2.Row(
                values=[
                    value_pb2.Value(string_value=f"event-{n:08d}"),
                    value_pb2.Value(double_value=0.5),
                    value_pb2.Value(timestamp_value=timestamp_pb2.Timestamp(seconds=1_717_243_200)),
                ]
            )
        ],
    )


def _unit_vectors(rng: random.Random, count: int) -> list[list[float]]:
    """Random unit vectors, rounded to float32 (what a protobuf float carries)."""
    out = []
    for _ in range(count):
        raw = [rng.gauss(0.0, 1.0) for _ in range(DIMENSION)]
        norm = math.sqrt(math.fsum(c * c for c in raw))
        out.append(array.array("f", [c / norm for c in raw]).tolist())
    return out


def _memory_batch(
    workspace_id: str, block: int, batch: int, embeddings: Sequence[Sequence[float]]
) -> memory_sync_service_pb2.UpsertMemoryRecordsRequest:
    request = memory_sync_service_pb2.UpsertMemoryRecordsRequest(workspace_id=workspace_id)
    for k in range(RECORDS_PER_BATCH):
        n = batch * RECORDS_PER_BATCH + k
        record = request.records.add(
            id=f"rec-{block:05d}-{n:03d}",
            kind="note",
            content=f"memory {block:05d} {n:03d}: what the agent noted",
            source_table=database.TABLE,
            source_row_id=str(block * 100 + n),
            embedding=embeddings[n % len(embeddings)],
        )
        record.metadata.update({"topic": f"t{n % 7}", "block": block})
    return request


def memory_upsert_calls(
    spec: Spec,
) -> list[list[memory_sync_service_pb2.UpsertMemoryRecordsRequest]]:
    """Each upsert call's batches: block b holds records rec-b-000 to rec-b-029."""
    embeddings = _unit_vectors(random.Random(spec.seed + 11), UPSERT_BATCHES * RECORDS_PER_BATCH)
    return [
        [
            _memory_batch(spec.memory_workspace_id, block, batch, embeddings)
            for batch in range(UPSERT_BATCHES)
        ]
        for block in range(UPSERT_BLOCKS)
    ]


def search_records(spec: Spec) -> list[memory_sync_service_pb2.UpsertMemoryRecordsRequest]:
    """The searched workspace's records, in batches of at most 1,000."""
    embeddings = _unit_vectors(random.Random(spec.seed + 13), spec.search_records)
    batches = []
    for start in range(0, spec.search_records, 1000):
        batch = memory_sync_service_pb2.UpsertMemoryRecordsRequest(
            workspace_id=spec.search_workspace_id
        )
        for n in range(start, min(start + 1000, spec.search_records)):
            record = batch.records.add(
                id=f"doc-{n:06d}",
                kind="note",
                content=f"document {n:06d}: something worth remembering",
                source_table=database.TABLE,
                source_row_id=str(n + 1),
                embedding=embeddings[n],
            )
            record.metadata.update({"topic": f"t{n % 7}"})
        batches.append(batch)
    return batches


def requests(workload: str, spec: Spec) -> list[Any]:
    """The workload's requests, in the order callers cycle through them.

    A client-streaming workload gives one list of messages per call.
    """
    ws = spec.workspace_id
    if workload == POINT_SELECT.name:
        ids = random.Random(spec.seed).choices(range(1, spec.rows + 1), k=VARIETY)
        return [point_select(ws, database.TABLE, i) for i in ids]
    if workload == LIST_SELECT.name:
        return [
            workspace_service_pb2.SelectRequest(
                workspace_id=ws,
                table=database.TABLE,
                filter=_score_range(low, LIST_SPAN),
                order_by=[query_pb2.OrderBy(column="created_at", descending=True)],
                page_size=PAGE_SIZE,
            )
            for low in _low_ids(spec, LIST_SPAN, 1)
        ]
    if workload == COUNT.name:
        return [
            workspace_service_pb2.CountRequest(
                workspace_id=ws, table=database.TABLE, filter=_score_range(low, COUNT_SPAN)
            )
            for low in _low_ids(spec, COUNT_SPAN, 2)
        ]
    if workload == INSERT.name:
        out = []
        for n in range(VARIETY):
            request = _event_insert(ws, n)
            request.returning.append("id")
            out.append(request)
        return out
    if workload == BATCH.name:
        ids = random.Random(spec.seed + 3).choices(range(1, spec.rows + 1), k=VARIETY)
        return [
            workspace_service_pb2.ExecuteBatchRequest(
                workspace_id=ws,
                operations=[
                    workspace_service_pb2.BatchOperation(
                        update=workspace_service_pb2.UpdateRequest(
                            table=database.TABLE,
                            values={"score": value_pb2.Value(double_value=i / 10_000)},
                            filter=query_pb2.Filter(
                                condition=query_pb2.Condition(
                                    column="id",
                                    operator=query_pb2.OPERATOR_EQ,
                                    value=value_pb2.Value(int64_value=i),
                                )
                            ),
                        )
                    ),
                    workspace_service_pb2.BatchOperation(insert=_event_insert("", n)),
                ],
            )
            for n, i in enumerate(ids)
        ]
    if workload == MEMORY_UPSERT.name:
        return [list(call) for call in memory_upsert_calls(spec)]
    if workload == MEMORY_SEARCH.name:
        return [
            memory_sync_service_pb2.SearchMemoryRecordsRequest(
                workspace_id=spec.search_workspace_id, embedding=query, top_k=TOP_K
            )
            for query in _unit_vectors(random.Random(spec.seed + 17), SEARCH_QUERIES)
        ]
    raise ValueError(f"unknown workload {workload!r}")


def serialized(workload: str, spec: Spec) -> list[bytes] | list[list[bytes]]:
    """The requests as the load generator sends them: raw bytes, serialized once."""
    built = requests(workload, spec)
    if BY_NAME[workload].client_streaming:
        return [[m.SerializeToString() for m in call] for call in built]
    return [m.SerializeToString() for m in built]


# -- the asyncpg ceiling -------------------------------------------------------


@dataclass(frozen=True)
class Search:
    """Which search statement the service uses, as `MemoryStore.prepare` decides it."""

    sql: str
    pgvector_schema: str | None


def upsert_args(batch: memory_sync_service_pb2.UpsertMemoryRecordsRequest) -> tuple[object, ...]:
    """UPSERT_SQL's arguments for one batch, built by the code `MemoryStore.upsert` uses."""
    metadata = [store.metadata_json(record) for record in batch.records]
    return store.upsert_arguments(uuid.UUID(batch.workspace_id), batch.records, metadata)


def _steps(statements: Sequence[compiler.Statement]) -> tuple[Step, ...]:
    # As WorkspaceServicer._run: fetch when the statement returns rows, execute otherwise.
    return tuple(Step(s.sql, s.args, bool(s.output)) for s in statements)


def _search_args(
    request: memory_sync_service_pb2.SearchMemoryRecordsRequest, search: Search
) -> tuple[object, ...]:
    args: list[object] = [
        uuid.UUID(request.workspace_id),
        list(request.embedding),
        None,
        None,
        None,
        request.top_k,
    ]
    if search.pgvector_schema is not None:
        # The margin MemoryStore.search adds for queries of a safe norm (unit vectors are).
        args.append(2 * queries.float32_cosine_error(len(request.embedding)))
    return tuple(args)


def plans(workload: str, spec: Spec, catalog: Catalog, search: Search) -> list[Plan]:
    """The asyncpg ceiling's calls: the statements the service runs for each request."""
    built = requests(workload, spec)
    items = catalog.table(database.TABLE)
    events = catalog.table(database.EVENTS_TABLE)
    compile_one: Callable[[Any], Plan]
    if workload in (POINT_SELECT.name, LIST_SELECT.name):

        def compile_one(r: Any) -> Plan:
            page = min(r.page_size or PAGE_SIZE, 1000)
            statement = compiler.compile_select(items, r, page_size=page, cursor=None).statement
            return Plan(_steps([statement]))

    elif workload == COUNT.name:

        def compile_one(r: Any) -> Plan:
            statement = compiler.compile_count(items, r)
            return Plan((Step(statement.sql, statement.args, fetch=True),))

    elif workload == INSERT.name:

        def compile_one(r: Any) -> Plan:
            return Plan(_steps(compiler.compile_insert(events, r)))

    elif workload == BATCH.name:

        def compile_one(r: Any) -> Plan:
            update, insert = r.operations
            update.update.workspace_id = insert.insert.workspace_id = r.workspace_id
            statements = [
                compiler.compile_update(items, update.update),
                *compiler.compile_insert(events, insert.insert),
            ]
            return Plan(_steps(statements), transaction=True)

    elif workload == MEMORY_UPSERT.name:

        def compile_one(r: Any) -> Plan:
            return Plan(tuple(Step(queries.UPSERT_SQL, upsert_args(b), fetch=True) for b in r))

    elif workload == MEMORY_SEARCH.name:

        def compile_one(r: Any) -> Plan:
            return Plan((Step(search.sql, _search_args(r, search), fetch=True),))

    else:
        raise ValueError(f"unknown workload {workload!r}")
    return [compile_one(r) for r in built]
