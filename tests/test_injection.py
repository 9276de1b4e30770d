"""SQL injection attempts through every name and value a request carries go nowhere."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from conftest import ODD_TABLE, SECRET
from messages import Row, Value, cond, v
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2
from statuses import rpc_error

pb = workspace_service_pb2
q = query_pb2


@pytest.fixture(autouse=True)
async def schema_intact(db):
    """After every test: no table dropped or emptied, the secret still there and unread."""
    yield
    tables = await db.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind = 'r' ORDER BY relname"
    )
    assert {"campaigns", "campaign_events", ODD_TABLE, "internal_secrets"} <= {
        r["relname"] for r in tables
    }
    assert not {r["relname"] for r in tables} & {"x", "t"}
    assert await db.fetch("SELECT id, secret FROM internal_secrets") == [(1, SECRET)]


# ---------------------------------------------------------------------------
# Table names

BAD_TABLES = [
    "campaigns; DROP TABLE campaigns",
    "campaigns; DROP TABLE campaigns; --",
    'campaigns"; DROP TABLE campaigns; --',
    "internal_secrets",
    "public.internal_secrets",
    "pg_catalog.pg_user",
    "pg_user",
    "pg_authid",
    "information_schema.tables",
    "raptorflow_data.schema_migrations",
    "public.campaigns",
    '"campaigns"',
    '"Odd ""Name"" table"',
    "Campaigns",
    "campaigns ",
    "campaigns\x00",
    "(SELECT * FROM internal_secrets)",
    "campaigns c, internal_secrets s",
    "",
]


def _calls(table: str, workspace: str) -> dict[str, Callable[[Any], Awaitable[object]]]:
    filt = cond("name", q.OPERATOR_IS_NOT_NULL)
    return {
        "select": lambda s: s.Select(pb.SelectRequest(workspace_id=workspace, table=table)),
        "count": lambda s: s.Count(pb.CountRequest(workspace_id=workspace, table=table)),
        "insert": lambda s: s.Insert(
            pb.InsertRequest(
                workspace_id=workspace, table=table, columns=["name"], rows=[Row(values=[v("x")])]
            )
        ),
        "upsert": lambda s: s.Upsert(
            pb.UpsertRequest(
                workspace_id=workspace,
                table=table,
                columns=["name"],
                rows=[Row(values=[v("x")])],
                on_conflict=pb.CONFLICT_ACTION_IGNORE,
            )
        ),
        "update": lambda s: s.Update(
            pb.UpdateRequest(
                workspace_id=workspace, table=table, values={"name": v("x")}, filter=filt
            )
        ),
        "delete": lambda s: s.Delete(
            pb.DeleteRequest(workspace_id=workspace, table=table, allow_unfiltered=True)
        ),
    }


@pytest.mark.parametrize("table", BAD_TABLES)
async def test_table_names_must_be_exposed_tables(stub, workspace, table):
    for rpc, call in _calls(table, workspace).items():
        failure = await rpc_error(call(stub), echoed=table)
        assert (failure.code, failure.reason, failure.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_TABLE",
            ["table"],
        ), rpc
    described = await rpc_error(
        stub.DescribeTables(pb.DescribeTablesRequest(tables=[table])), echoed=table
    )
    assert (described.code, described.reason, described.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_TABLE",
        ["tables[0]"],
    )
    batch = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=workspace,
                operations=[
                    pb.BatchOperation(delete=pb.DeleteRequest(table=table, allow_unfiltered=True))
                ],
            )
        ),
        echoed=table,
    )
    assert (batch.code, batch.reason, batch.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_TABLE",
        ["operations[0].delete.table"],
    )


async def test_internal_secrets_never_described(stub):
    described = await stub.DescribeTables(pb.DescribeTablesRequest())
    assert "internal_secrets" not in [t.name for t in described.tables]
    for table in described.tables:
        assert "secret" not in [c.name for c in table.columns]


# ---------------------------------------------------------------------------
# Column names

BAD_COLUMNS = [
    "name; --",
    '"name"',
    "name) OR (1=1",
    "name, secret",
    "secret",
    "name FROM internal_secrets --",
    "id::text",
    "pg_sleep(5)",
    "1",
    "*",
    "NAME",
    "name\x00",
    "",
]


@pytest.fixture
async def named_rows(stub, workspace) -> str:
    await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status"],
            rows=[Row(values=[v("a"), v("x")]), Row(values=[v("b"), v("y")])],
        )
    )
    return workspace


@pytest.mark.parametrize("column", BAD_COLUMNS)
async def test_column_names_must_be_columns(stub, db, named_rows, column):
    workspace = named_rows
    requests: list[tuple[Awaitable[object], str]] = [
        (
            stub.Select(
                pb.SelectRequest(workspace_id=workspace, table="campaigns", columns=["id", column])
            ),
            "columns[1]",
        ),
        (
            stub.Select(
                pb.SelectRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    filter=cond(column, q.OPERATOR_EQ, v("a")),
                )
            ),
            "filter.condition.column",
        ),
        (
            stub.Select(
                pb.SelectRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    order_by=[q.OrderBy(column="name"), q.OrderBy(column=column, descending=True)],
                )
            ),
            "order_by[1].column",
        ),
        (
            stub.Count(
                pb.CountRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    filter=q.Filter(negation=q.Negation(filter=cond(column, q.OPERATOR_IS_NULL))),
                )
            ),
            "filter.negation.filter.condition.column",
        ),
        (
            stub.Insert(
                pb.InsertRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    columns=["name", column],
                    rows=[Row(values=[v("c"), v("x")])],
                )
            ),
            "columns[1]",
        ),
        (
            stub.Insert(
                pb.InsertRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    columns=["name"],
                    rows=[Row(values=[v("c")])],
                    returning=["id", column],
                )
            ),
            "returning[1]",
        ),
        (
            stub.Update(
                pb.UpdateRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    values={column: v("x")},
                    allow_unfiltered=True,
                )
            ),
            f'values["{column}"]',
        ),
        (
            stub.Upsert(
                pb.UpsertRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    columns=["name", "status"],
                    rows=[Row(values=[v("a"), v("z")])],
                    conflict_columns=["workspace_id", column],
                    on_conflict=pb.CONFLICT_ACTION_UPDATE,
                )
            ),
            "conflict_columns[1]",
        ),
        (
            stub.Upsert(
                pb.UpsertRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    columns=["name", "status"],
                    rows=[Row(values=[v("a"), v("z")])],
                    conflict_columns=["workspace_id", "name"],
                    on_conflict=pb.CONFLICT_ACTION_UPDATE,
                    update_columns=[column],
                )
            ),
            "update_columns[0]",
        ),
        (
            stub.Delete(
                pb.DeleteRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    filter=cond(column, q.OPERATOR_LIKE, v("%")),
                    returning=["name"],
                )
            ),
            "filter.condition.column",
        ),
    ]
    for call, field in requests:
        failure = await rpc_error(call)
        assert (failure.code, failure.reason, failure.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_COLUMN",
            [field],
        )
        assert failure.metadata == {"table": "campaigns", "column": column}
    # Nothing was written, changed or deleted.
    rows = await db.fetch(
        "SELECT name, status FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [tuple(r) for r in rows] == [("a", "x"), ("b", "y")]


# ---------------------------------------------------------------------------
# Values are only ever values

HOSTILE_TEXT = [
    "' OR '1'='1",
    "'; DROP TABLE campaigns; --",
    "a'); DELETE FROM campaigns; --",
    '" OR ""="',
    "$1",
    "\\'; SELECT pg_sleep(10); --",
    "%' OR name LIKE '%",
    "Robert'); DROP TABLE internal_secrets;--",
]


async def test_hostile_text_is_stored_and_matched_literally(stub, db, workspace):
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status"],
            rows=[Row(values=[v(t), v(t)]) for t in HOSTILE_TEXT]
            + [Row(values=[v("plain"), v("x")])],
            returning=["name"],
        )
    )
    assert [r.values[0].string_value for r in inserted.returning.rows] == [*HOSTILE_TEXT, "plain"]
    stored = await db.fetch(
        "SELECT name, status FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [tuple(r) for r in stored] == [(t, t) for t in HOSTILE_TEXT] + [("plain", "x")]
    for text in HOSTILE_TEXT:
        page = await stub.Select(
            pb.SelectRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name"],
                filter=cond("status", q.OPERATOR_EQ, v(text)),
            )
        )
        assert [r.values[0].string_value for r in page.rows] == [text]
        updated = await stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace,
                table="campaigns",
                values={"status": v(text + "!")},
                filter=cond("name", q.OPERATOR_EQ, v(text)),
            )
        )
        assert updated.affected_count == 1
    # A value that looks like a tautology matches nothing else.
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            filter=cond("name", q.OPERATOR_EQ, v("x' OR '1'='1")),
        )
    )
    assert list(page.rows) == []
    count = await stub.Count(
        pb.CountRequest(
            workspace_id=workspace,
            table="campaigns",
            filter=cond("name", q.OPERATOR_IN, values=[v("' OR 1=1 --"), v("plain")]),
        )
    )
    assert count.count == 1
    assert await db.fetchval(
        "SELECT count(*) FROM campaigns WHERE workspace_id = $1 AND status LIKE '%!'", workspace
    ) == len(HOSTILE_TEXT)


@pytest.mark.parametrize(
    ("pattern", "operator", "expected"),
    [
        ("%' OR '1'='1", q.OPERATOR_LIKE, []),
        ("%' OR name LIKE '%", q.OPERATOR_LIKE, ["%' OR name LIKE '%"]),
        ("%'; DROP TABLE campaigns; --%", q.OPERATOR_LIKE, []),
        ("%'; DROP TABLE campaigns; --%", q.OPERATOR_ILIKE, ["x'; drop table campaigns; --"]),
        ("%DROP%", q.OPERATOR_ILIKE, ["x'; drop table campaigns; --"]),
        ("%\\%%", q.OPERATOR_LIKE, ["%' OR name LIKE '%"]),
        ("_' OR '1'='1", q.OPERATOR_LIKE, []),
    ],
)
async def test_like_patterns_are_values(stub, workspace, pattern, operator, expected):
    names = ["plain", "%' OR name LIKE '%", "x'; drop table campaigns; --"]
    await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            rows=[Row(values=[v(n)]) for n in names],
        )
    )
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            filter=cond("name", operator, v(pattern)),
            order_by=[q.OrderBy(column="id")],
        )
    )
    assert [r.values[0].string_value for r in page.rows] == expected


async def test_json_values_are_values(stub, db, workspace):
    doc = {"k": "'; DROP TABLE campaigns; --", "q": "\"}'::jsonb OR 1=1 --"}
    await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "meta"],
            rows=[
                Row(values=[v("hostile"), Value(json_value=json.dumps(doc))]),
                Row(values=[v("plain"), Value(json_value='{"k": "v"}')]),
            ],
        )
    )
    assert (
        json.loads(
            await db.fetchval(
                "SELECT meta::text FROM campaigns WHERE workspace_id = $1 AND name = 'hostile'",
                workspace,
            )
        )
        == doc
    )
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            filter=cond(
                "meta",
                q.OPERATOR_JSON_CONTAINS,
                Value(json_value=json.dumps({"k": doc["k"]})),
            ),
        )
    )
    assert [r.values[0].string_value for r in page.rows] == ["hostile"]
    for text in ("{}' OR '1'='1", "1); DROP TABLE campaigns; --", "'{}'::jsonb"):
        failure = await rpc_error(
            stub.Select(
                pb.SelectRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    filter=cond("meta", q.OPERATOR_JSON_CONTAINS, Value(json_value=text)),
                )
            )
        )
        assert (failure.code, failure.reason, failure.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_VALUE",
            ["filter.condition.value"],
        )


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        (
            "external_id",
            Value(uuid_value="00000000-0000-0000-0000-000000000000' OR '1'='1"),
            "INVALID_UUID",
        ),
        ("budget", Value(decimal_value="1; DROP TABLE campaigns"), "INVALID_VALUE"),
        ("priority", Value(string_value="1 OR 1=1"), "INVALID_VALUE"),
        ("created_at", Value(string_value="now()"), "INVALID_VALUE"),
    ],
)
async def test_typed_values_reject_sql(stub, db, workspace, column, value, reason):
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name", column],
                rows=[Row(values=[v("n"), value])],
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        ["rows[0].values[1]"],
    )
    assert (
        await db.fetchval("SELECT count(*) FROM campaigns WHERE workspace_id = $1", workspace) == 0
    )


async def test_unmodelled_type_text_is_a_value(stub, db, workspace):
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table="campaign_events",
                columns=["kind", "address"],
                rows=[Row(values=[v("k"), v("1.1.1.1'::inet); DROP TABLE campaigns; --")])],
            )
        )
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE")
    filtered = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaign_events",
            filter=cond("address", q.OPERATOR_LIKE, v("%' OR '1'='1")),
        )
    )
    assert list(filtered.rows) == []


@pytest.mark.parametrize(
    "workspace_id",
    [
        "' OR '1'='1",
        "00000000-0000-0000-0000-000000000000' OR workspace_id IS NOT NULL --",
        "00000000-0000-0000-0000-000000000000; DROP TABLE campaigns",
    ],
)
async def test_workspace_ids_are_uuids(stub, workspace_id):
    for call in _calls("campaigns", workspace_id).values():
        failure = await rpc_error(call(stub))
        assert (failure.code, failure.reason, failure.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_UUID",
            ["workspace_id"],
        )


@pytest.mark.parametrize(
    "token",
    [
        "' OR '1'='1",
        "1; DROP TABLE campaigns; --",
        base64.urlsafe_b64encode(b"\x01" + b"' OR 1=1; DROP TABLE campaigns; --" * 2).decode(),
        base64.urlsafe_b64encode(
            value_pb2.ArrayValue(values=[v("' OR '1'='1")]).SerializeToString()
        ).decode(),
    ],
)
async def test_page_tokens_are_opaque_and_signed(stub, named_rows, token):
    failure = await rpc_error(
        stub.Select(
            pb.SelectRequest(
                workspace_id=named_rows,
                table="campaigns",
                order_by=[q.OrderBy(column="name")],
                page_token=token,
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
        ["page_token"],
    )


# ---------------------------------------------------------------------------
# Identifiers that need quoting work normally


async def test_odd_table_and_column_names_work(stub, db, workspace):
    base = uuid.UUID(workspace).int % 10**12 * 10
    columns = ["id", "select", "drop table x; --"]
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            columns=columns,
            rows=[Row(values=[v(base + i), v(f"s{i}"), v(f"d{i % 2}")]) for i in range(5)],
            returning=["*"],
        )
    )
    assert list(inserted.returning.columns) == ["id", "workspace_id", *columns[1:]]
    assert inserted.affected_count == 5
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            columns=["select", "drop table x; --"],
            filter=cond("drop table x; --", q.OPERATOR_EQ, v("d1")),
            order_by=[q.OrderBy(column="select", descending=True)],
        )
    )
    assert list(page.columns) == ["select", "drop table x; --"]
    assert [[x.string_value for x in r.values] for r in page.rows] == [["s3", "d1"], ["s1", "d1"]]
    # Pages through the odd table with a page token.
    request = pb.SelectRequest(
        workspace_id=workspace,
        table=ODD_TABLE,
        columns=["select"],
        order_by=[
            q.OrderBy(column="drop table x; --"),
            q.OrderBy(column="select", descending=True),
        ],
        page_size=2,
    )
    walked = []
    while True:
        result = await stub.Select(request)
        walked.extend(r.values[0].string_value for r in result.rows)
        if not result.next_page_token:
            break
        request.page_token = result.next_page_token
    assert walked == ["s4", "s2", "s0", "s3", "s1"]
    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            values={"select": v("updated"), "drop table x; --": v("also")},
            filter=cond("select", q.OPERATOR_IN, values=[v("s0"), v("s1")]),
            returning=["id"],
        )
    )
    assert sorted(r.values[0].int64_value for r in updated.returning.rows) == [base, base + 1]
    upserted = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            columns=["id", "select"],
            rows=[Row(values=[v(base + 2), v("upserted")]), Row(values=[v(base + 9), v("new")])],
            conflict_columns=["id"],
            on_conflict=pb.CONFLICT_ACTION_UPDATE,
            update_columns=["select"],
        )
    )
    assert upserted.affected_count == 2
    counted = await stub.Count(
        pb.CountRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            filter=cond("drop table x; --", q.OPERATOR_IS_NULL),
        )
    )
    assert counted.count == 1
    deleted = await stub.Delete(
        pb.DeleteRequest(
            workspace_id=workspace,
            table=ODD_TABLE,
            filter=cond("select", q.OPERATOR_LIKE, v("s%")),
            returning=["select"],
        )
    )
    assert sorted(r.values[0].string_value for r in deleted.returning.rows) == ["s3", "s4"]
    stored = await db.fetch(
        'SELECT id, "select", "drop table x; --" FROM "Odd ""Name"" table"'
        " WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert [tuple(r) for r in stored] == [
        (base, "updated", "also"),
        (base + 1, "updated", "also"),
        (base + 2, "upserted", "d0"),
        (base + 9, "new", None),
    ]
    described = await stub.DescribeTables(pb.DescribeTablesRequest(tables=[ODD_TABLE]))
    assert [c.name for c in described.tables[0].columns] == [
        "id",
        "workspace_id",
        "select",
        "drop table x; --",
    ]
