"""Insert, Upsert, Update, Delete and ExecuteBatch, checked against what PostgreSQL really holds."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import grpc
import pytest
from conftest import CAMPAIGN_COLUMNS, start_server
from messages import NULL, Row, Value, eq, row, v
from raptorflow.data.v1 import (
    value_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from statuses import rpc_error
from tokens import authorized_channel

pb = workspace_service_pb2


def py(value: Value) -> Any:
    which = value.WhichOneof("kind")
    return None if which == "null_value" else getattr(value, which)  # type: ignore[arg-type]


def rows_of(row_set: value_pb2.RowSet) -> list[list[Any]]:
    return [[py(x) for x in r.values] for r in row_set.rows]


async def stored(db, workspace: str, columns: str = "name, status, priority") -> list[list[Any]]:
    records = await db.fetch(
        f"SELECT {columns} FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    return [list(r.values()) for r in records]


async def seed(stub, workspace: str, *rows: tuple[str, str | None, int | None]) -> list[int]:
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status", "priority"],
            rows=[row(*r) for r in rows],
            returning=["id"],
        )
    )
    return [r.values[0].int64_value for r in inserted.returning.rows]


# ---------------------------------------------------------------------------
# Insert


async def test_insert_one_returning_star(stub, db, workspace):
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["priority", "name"],
            rows=[row(7, "first")],
            returning=["*"],
        )
    )
    assert inserted.affected_count == 1
    assert list(inserted.returning.columns) == CAMPAIGN_COLUMNS
    cells = dict(zip(inserted.returning.columns, inserted.returning.rows[0].values, strict=True))
    record = await db.fetchrow("SELECT * FROM campaigns WHERE workspace_id = $1", workspace)
    assert cells["id"] == Value(int64_value=record["id"])
    assert cells["workspace_id"] == Value(uuid_value=workspace)
    assert cells["name"] == v("first")
    assert cells["priority"] == v(7)
    assert cells["status"] == NULL
    assert cells["created_at"].WhichOneof("kind") == "timestamp_value"  # the default, now()
    assert cells["created_at"].timestamp_value.ToDatetime().timestamp() == pytest.approx(
        record["created_at"].timestamp(), abs=1e-6
    )
    assert (record["name"], record["priority"], str(record["workspace_id"])) == (
        "first",
        7,
        workspace,
    )


async def test_insert_many_returning_named_columns_in_request_order(stub, db, workspace):
    names = ["c", "a", "b", "e", "d"]
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "score"],
            rows=[row(n, float(i)) for i, n in enumerate(names)],
            returning=["score", "name"],
        )
    )
    assert inserted.affected_count == 5
    assert list(inserted.returning.columns) == ["score", "name"]
    assert rows_of(inserted.returning) == [[float(i), n] for i, n in enumerate(names)]
    assert await stored(db, workspace, "name, score") == [
        [n, float(i)] for i, n in enumerate(names)
    ]


async def test_insert_without_returning_returns_no_rows(stub, db, workspace):
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace, table="campaigns", columns=["name"], rows=[row("a"), row("b")]
        )
    )
    assert inserted.affected_count == 2
    assert inserted.returning == value_pb2.RowSet()
    assert await stored(db, workspace, "name") == [["a"], ["b"]]


async def test_insert_twenty_thousand_rows_in_one_request(stub, db, workspace):
    count = 20_000
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "priority", "score", "active"],
            rows=[row(f"n{i:05d}", i, i / 4, i % 3 == 0) for i in range(count)],
            returning=["id", "name"],
        )
    )
    assert inserted.affected_count == count
    returned = rows_of(inserted.returning)
    assert [name for _, name in returned] == [f"n{i:05d}" for i in range(count)]
    ids = [i for i, _ in returned]
    assert ids == sorted(ids)
    summary = await db.fetchrow(
        "SELECT count(*) AS n, sum(priority) AS p, sum(score) AS s, count(*) FILTER (WHERE active)"
        " AS a, count(DISTINCT name) AS d FROM campaigns WHERE workspace_id = $1",
        workspace,
    )
    assert dict(summary) == {
        "n": count,
        "p": sum(range(count)),
        "s": sum(i / 4 for i in range(count)),
        "a": len(range(0, count, 3)),
        "d": count,
    }


def _embedding(i: int) -> Value:
    return Value(vector_value=value_pb2.FloatVector(values=[i / 3, -i, 0.1]))


def _array_rows(count: int) -> list[Row]:
    return [
        Row(
            values=[
                v(f"arr{i:05d}"),
                Value(array_value=value_pb2.ArrayValue(values=[v(f"t{i}"), NULL, v(str(i % 7))])),
                _embedding(i),
            ]
        )
        for i in range(count)
    ]


async def test_insert_array_columns_over_many_statements_in_one_transaction(stub, db, workspace):
    # Array columns cannot go through unnest(); 3 parameters a row over 32,000 is two statements.
    count = 12_000
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "tags", "embedding"],
            rows=_array_rows(count),
            returning=["name", "tags"],
        )
    )
    assert inserted.affected_count == count
    assert [r.values[0].string_value for r in inserted.returning.rows] == [
        f"arr{i:05d}" for i in range(count)
    ]
    assert inserted.returning.rows[11_999].values[1] == _array_rows(12_000)[11_999].values[1]
    records = await db.fetch(
        "SELECT name, tags, embedding FROM campaigns WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert len(records) == count
    f32 = [struct.unpack("<f", struct.pack("<f", x))[0] for x in (11_999 / 3, -11_999.0, 0.1)]
    assert (records[-1]["name"], records[-1]["tags"], records[-1]["embedding"]) == (
        "arr11999",
        ["t11999", None, str(11_999 % 7)],
        f32,
    )
    assert [r["name"] for r in records] == [f"arr{i:05d}" for i in range(count)]


async def test_many_statement_insert_is_all_or_nothing(stub, db, workspace):
    rows = _array_rows(12_000)
    # The last row repeats the first name: the unique violation comes from the second statement.
    rows[-1].values[0].CopyFrom(v("arr00000"))
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name", "tags", "embedding"],
                rows=rows,
            )
        )
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.ALREADY_EXISTS, "UNIQUE_VIOLATION")
    assert await stored(db, workspace) == []


async def test_workspace_id_in_columns_must_be_the_requests(stub, db, workspace, other_workspace):
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["workspace_id", "name"],
            rows=[
                row(Value(uuid_value=workspace), "same"),
                row(Value(string_value=workspace.upper()), "same, upper case"),
            ],
            returning=["workspace_id"],
        )
    )
    assert rows_of(inserted.returning) == [[workspace], [workspace]]
    for given in (Value(uuid_value=other_workspace), NULL):
        failure = await rpc_error(
            stub.Insert(
                pb.InsertRequest(
                    workspace_id=workspace,
                    table="campaigns",
                    columns=["name", "workspace_id"],
                    rows=[row("ok", Value(uuid_value=workspace)), row("other", given)],
                )
            )
        )
        assert (failure.code, failure.reason, failure.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "WORKSPACE_MISMATCH",
            ["rows[1].values[1]"],
        )
    assert await stored(db, workspace, "name") == [["same"], ["same, upper case"]]
    assert await stored(db, other_workspace) == []


@pytest.mark.parametrize(
    ("request_fields", "field", "reason"),
    [
        ({"columns": ["name", "nope"], "rows": [row("a", 1)]}, "columns[1]", "UNKNOWN_COLUMN"),
        ({"columns": ["name", "name"], "rows": [row("a", "b")]}, "columns[1]", "INVALID_ARGUMENT"),
        ({"columns": ["name"], "rows": []}, "rows", "INVALID_ARGUMENT"),
        (
            {"columns": ["name"], "rows": [row("a"), row("b", 1)]},
            "rows[1].values",
            "INVALID_ARGUMENT",
        ),
        (
            {"columns": ["name"], "rows": [row("a")], "returning": ["nope"]},
            "returning[0]",
            "UNKNOWN_COLUMN",
        ),
        ({"table": "nope", "columns": ["name"], "rows": [row("a")]}, "table", "UNKNOWN_TABLE"),
        (
            {"workspace_id": "", "columns": ["name"], "rows": [row("a")]},
            "workspace_id",
            "INVALID_UUID",
        ),
    ],
)
async def test_bad_insert_request(stub, db, workspace, request_fields, field, reason):
    request = {"workspace_id": workspace, "table": "campaigns", **request_fields}
    failure = await rpc_error(stub.Insert(pb.InsertRequest(**request)))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        [field],
    )
    assert await stored(db, workspace) == []


async def test_too_many_rows(settings, db, workspace):
    running = await start_server(settings, max_rows_per_request=3)
    try:
        async with authorized_channel(running.address) as channel:
            small = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
            insert = pb.InsertRequest(
                table="campaigns", columns=["name"], rows=[row(f"r{i}") for i in range(4)]
            )
            failure = await rpc_error(
                small.Insert(pb.InsertRequest(workspace_id=workspace, **_fields(insert)))
            )
            assert (failure.code, failure.reason, failure.fields) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "TOO_MANY_ROWS",
                ["rows"],
            )
            half = pb.InsertRequest(table="campaigns", columns=["name"], rows=[row("x"), row("y")])
            other = pb.InsertRequest(table="campaigns", columns=["name"], rows=[row("z"), row("w")])
            batch = await rpc_error(
                small.ExecuteBatch(
                    pb.ExecuteBatchRequest(
                        workspace_id=workspace,
                        operations=[
                            pb.BatchOperation(insert=half),
                            pb.BatchOperation(insert=other),
                        ],
                    )
                )
            )
            assert (batch.code, batch.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_ROWS")
    finally:
        await running.stop(grace=0.5)
    assert await stored(db, workspace) == []


def _fields(message: Any) -> dict[str, Any]:
    return {f.name: value for f, value in message.ListFields()}


# ---------------------------------------------------------------------------
# Upsert


async def test_upsert_update_on_workspace_and_name(stub, db, workspace):
    await seed(stub, workspace, ("a", "old", 1), ("keep", "old", 9))
    upserted = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status", "priority"],
            rows=[row("a", "new", 2), row("b", "fresh", 3)],
            conflict_columns=["workspace_id", "name"],
            on_conflict=pb.CONFLICT_ACTION_UPDATE,
            returning=["name", "status", "priority"],
        )
    )
    assert upserted.affected_count == 2
    assert rows_of(upserted.returning) == [["a", "new", 2], ["b", "fresh", 3]]
    assert await stored(db, workspace) == [["a", "new", 2], ["keep", "old", 9], ["b", "fresh", 3]]


async def test_upsert_update_only_the_update_columns(stub, db, workspace):
    await seed(stub, workspace, ("a", "old", 1))
    upserted = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status", "priority"],
            rows=[row("a", "new", 2)],
            conflict_columns=["workspace_id", "name"],
            on_conflict=pb.CONFLICT_ACTION_UPDATE,
            update_columns=["status"],
            returning=["*"],
        )
    )
    assert upserted.affected_count == 1
    assert await stored(db, workspace) == [["a", "new", 1]]


async def test_upsert_update_on_the_primary_key(stub, db, workspace):
    (first,) = await seed(stub, workspace, ("a", "old", 1))
    upserted = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["id", "name", "status"],
            rows=[row(first, "renamed", "new")],
            conflict_columns=["id"],
            on_conflict=pb.CONFLICT_ACTION_UPDATE,
            returning=["id", "name", "status", "priority"],
        )
    )
    assert rows_of(upserted.returning) == [[first, "renamed", "new", 1]]
    assert await stored(db, workspace, "id, name, status") == [[first, "renamed", "new"]]


async def test_upsert_ignore(stub, db, workspace):
    await seed(stub, workspace, ("a", "old", 1))
    upserted = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status", "priority"],
            rows=[row("a", "new", 2), row("b", "fresh", 3)],
            conflict_columns=["workspace_id", "name"],
            on_conflict=pb.CONFLICT_ACTION_IGNORE,
            returning=["name"],
        )
    )
    assert upserted.affected_count == 1
    assert rows_of(upserted.returning) == [["b"]]
    assert await stored(db, workspace) == [["a", "old", 1], ["b", "fresh", 3]]
    # Without conflict columns, IGNORE skips a conflict with any unique key.
    again = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            rows=[row("a"), row("c")],
            on_conflict=pb.CONFLICT_ACTION_IGNORE,
        )
    )
    assert again.affected_count == 1
    assert await stored(db, workspace, "name") == [["a"], ["b"], ["c"]]


@pytest.mark.parametrize(
    ("conflict", "update", "action", "field", "reason"),
    [
        (["status"], [], pb.CONFLICT_ACTION_UPDATE, "conflict_columns", "NOT_A_UNIQUE_KEY"),
        (["name", "status"], [], pb.CONFLICT_ACTION_IGNORE, "conflict_columns", "NOT_A_UNIQUE_KEY"),
        (
            ["workspace_id", "nope"],
            [],
            pb.CONFLICT_ACTION_UPDATE,
            "conflict_columns[1]",
            "UNKNOWN_COLUMN",
        ),
        (["id"], [], pb.CONFLICT_ACTION_UPDATE, "conflict_columns[0]", "INVALID_ARGUMENT"),
        ([], [], pb.CONFLICT_ACTION_UPDATE, "conflict_columns", "INVALID_ARGUMENT"),
        (
            ["workspace_id", "name"],
            [],
            pb.CONFLICT_ACTION_UNSPECIFIED,
            "on_conflict",
            "INVALID_ARGUMENT",
        ),
        (
            ["workspace_id", "name"],
            ["workspace_id"],
            pb.CONFLICT_ACTION_UPDATE,
            "update_columns[0]",
            "INVALID_ARGUMENT",
        ),
        (
            ["workspace_id", "name"],
            ["status", "priority"],
            pb.CONFLICT_ACTION_UPDATE,
            "update_columns[1]",
            "INVALID_ARGUMENT",
        ),
    ],
)
async def test_bad_upsert(stub, db, workspace, conflict, update, action, field, reason):
    await seed(stub, workspace, ("a", "old", 1))
    failure = await rpc_error(
        stub.Upsert(
            pb.UpsertRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name", "status"],
                rows=[row("a", "new")],
                conflict_columns=conflict,
                update_columns=update,
                on_conflict=action,
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        [field],
    )
    assert await stored(db, workspace) == [["a", "old", 1]]


# ---------------------------------------------------------------------------
# Update and Delete


async def test_update_by_filter(stub, db, workspace):
    await seed(stub, workspace, ("a", "x", 1), ("b", "y", 2), ("c", "x", None))
    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table="campaigns",
            values={"priority": v(10), "status": v("z")},
            filter=eq("status", "x"),
            returning=["name", "status", "priority"],
        )
    )
    assert updated.affected_count == 2
    assert sorted(rows_of(updated.returning)) == [["a", "z", 10], ["c", "z", 10]]
    assert await stored(db, workspace) == [["a", "z", 10], ["b", "y", 2], ["c", "z", 10]]
    to_null = await stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table="campaigns",
            values={"status": NULL},
            filter=eq("name", "b"),
        )
    )
    assert to_null.affected_count == 1
    assert to_null.returning == value_pb2.RowSet()
    assert await stored(db, workspace) == [["a", "z", 10], ["b", None, 2], ["c", "z", 10]]
    nothing = await stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table="campaigns",
            values={"status": v("never")},
            filter=eq("name", "missing"),
        )
    )
    assert nothing.affected_count == 0


async def test_update_requires_a_filter_unless_allowed(stub, db, workspace):
    await seed(stub, workspace, ("a", "x", 1), ("b", "y", 2))
    failure = await rpc_error(
        stub.Update(
            pb.UpdateRequest(workspace_id=workspace, table="campaigns", values={"status": v("z")})
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FILTER_REQUIRED",
        ["filter"],
    )
    assert await stored(db, workspace) == [["a", "x", 1], ["b", "y", 2]]
    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table="campaigns",
            values={"status": v("z")},
            allow_unfiltered=True,
        )
    )
    assert updated.affected_count == 2
    assert await stored(db, workspace) == [["a", "z", 1], ["b", "z", 2]]


@pytest.mark.parametrize(
    ("values", "field", "reason"),
    [
        (
            {"workspace_id": Value(uuid_value=str(uuid.uuid4()))},
            'values["workspace_id"]',
            "WORKSPACE_MISMATCH",
        ),
        ({"status": v("z"), "nope": v(1)}, 'values["nope"]', "UNKNOWN_COLUMN"),
        ({}, "values", "INVALID_ARGUMENT"),
        ({"priority": v("high")}, 'values["priority"]', "INVALID_VALUE"),
    ],
)
async def test_bad_update(stub, db, workspace, values, field, reason):
    await seed(stub, workspace, ("a", "x", 1))
    failure = await rpc_error(
        stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace, table="campaigns", values=values, allow_unfiltered=True
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        [field],
    )
    assert await stored(db, workspace, "workspace_id::text, name, status, priority") == [
        [workspace, "a", "x", 1]
    ]


async def test_delete_by_filter(stub, db, workspace):
    ids = await seed(stub, workspace, ("a", "x", 1), ("b", "y", 2), ("c", "x", 3))
    deleted = await stub.Delete(
        pb.DeleteRequest(
            workspace_id=workspace,
            table="campaigns",
            filter=eq("status", "x"),
            returning=["id", "name", "priority"],
        )
    )
    assert deleted.affected_count == 2
    assert sorted(rows_of(deleted.returning)) == [[ids[0], "a", 1], [ids[2], "c", 3]]
    assert await stored(db, workspace) == [["b", "y", 2]]


async def test_delete_requires_a_filter_unless_allowed(stub, db, workspace):
    await seed(stub, workspace, ("a", "x", 1), ("b", "y", 2))
    failure = await rpc_error(
        stub.Delete(pb.DeleteRequest(workspace_id=workspace, table="campaigns"))
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "FILTER_REQUIRED",
        ["filter"],
    )
    assert len(await stored(db, workspace)) == 2
    deleted = await stub.Delete(
        pb.DeleteRequest(workspace_id=workspace, table="campaigns", allow_unfiltered=True)
    )
    assert deleted.affected_count == 2
    assert await stored(db, workspace) == []


# ---------------------------------------------------------------------------
# ExecuteBatch


def _insert(
    *rows: tuple[object, ...], columns: tuple[str, ...] = ("name", "status")
) -> pb.BatchOperation:
    return pb.BatchOperation(
        insert=pb.InsertRequest(table="campaigns", columns=columns, rows=[row(*r) for r in rows])
    )


async def test_batch_runs_every_operation_in_order(stub, db, workspace):
    await seed(stub, workspace, ("old", "x", 1))
    result = await stub.ExecuteBatch(
        pb.ExecuteBatchRequest(
            workspace_id=workspace,
            operations=[
                pb.BatchOperation(
                    insert=pb.InsertRequest(
                        table="campaigns",
                        columns=["name", "status"],
                        rows=[row("a", "new"), row("b", "new")],
                        returning=["name"],
                    )
                ),
                pb.BatchOperation(
                    update=pb.UpdateRequest(
                        workspace_id=workspace,  # may repeat the batch's workspace
                        table="campaigns",
                        values={"priority": v(5)},
                        filter=eq("status", "new"),
                    )
                ),
                pb.BatchOperation(
                    upsert=pb.UpsertRequest(
                        table="campaigns",
                        columns=["name", "status"],
                        rows=[row("a", "upserted"), row("c", "upserted")],
                        conflict_columns=["workspace_id", "name"],
                        on_conflict=pb.CONFLICT_ACTION_UPDATE,
                        returning=["name", "priority"],
                    )
                ),
                pb.BatchOperation(
                    delete=pb.DeleteRequest(
                        table="campaigns", filter=eq("name", "old"), returning=["name"]
                    )
                ),
            ],
        )
    )
    kinds = [r.WhichOneof("result") for r in result.results]
    assert kinds == ["insert", "update", "upsert", "delete"]
    assert result.results[0].insert.affected_count == 2
    assert rows_of(result.results[0].insert.returning) == [["a"], ["b"]]
    assert result.results[1].update.affected_count == 2
    assert result.results[2].upsert.affected_count == 2
    assert rows_of(result.results[2].upsert.returning) == [["a", 5], ["c", None]]
    assert rows_of(result.results[3].delete.returning) == [["old"]]
    assert await stored(db, workspace) == [
        ["a", "upserted", 5],
        ["b", "new", 5],
        ["c", "upserted", None],
    ]


async def test_batch_is_all_or_nothing(stub, db, workspace):
    await seed(stub, workspace, ("old", "x", 1))
    before = await stored(db, workspace, "id, name, status, priority")
    failure = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=workspace,
                operations=[
                    _insert(("a", "new"), ("b", "new")),
                    pb.BatchOperation(
                        update=pb.UpdateRequest(
                            table="campaigns", values={"priority": v(99)}, allow_unfiltered=True
                        )
                    ),
                    # The third fails in PostgreSQL, after the first two ran.
                    _insert(("c", "new"), (None, "no name")),
                    pb.BatchOperation(
                        delete=pb.DeleteRequest(table="campaigns", allow_unfiltered=True)
                    ),
                ],
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_NULL_VIOLATION",
        ["operations[2].insert.name"],
    )
    assert await stored(db, workspace, "id, name, status, priority") == before


@pytest.mark.parametrize(
    ("third", "code", "reason", "fields"),
    [
        (
            _insert(("c", "ok"), ("d", True)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_VALUE",
            ["operations[2].insert.rows[1].values[1]"],
        ),
        (
            _insert(("a", "duplicate of the first operation")),
            grpc.StatusCode.ALREADY_EXISTS,
            "UNIQUE_VIOLATION",
            [],
        ),
        (
            pb.BatchOperation(
                update=pb.UpdateRequest(
                    table="campaigns", values={"priority": v(-1)}, filter=eq("name", "a")
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "CHECK_VIOLATION",
            ["operations[2].update.campaigns_priority_check"],
        ),
        (
            pb.BatchOperation(delete=pb.DeleteRequest(table="campaigns", filter=eq("nope", 1))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_COLUMN",
            ["operations[2].delete.filter.condition.column"],
        ),
        (
            pb.BatchOperation(
                upsert=pb.UpsertRequest(
                    table="campaigns",
                    columns=["name", "status"],
                    rows=[row("a", "x")],
                    conflict_columns=["status"],
                    on_conflict=pb.CONFLICT_ACTION_IGNORE,
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NOT_A_UNIQUE_KEY",
            ["operations[2].upsert.conflict_columns"],
        ),
        (
            pb.BatchOperation(delete=pb.DeleteRequest(table="campaigns")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "FILTER_REQUIRED",
            ["operations[2].delete.filter"],
        ),
        (
            pb.BatchOperation(
                insert=pb.InsertRequest(
                    table="campaign_events", columns=["kind", "campaign_id"], rows=[row("k", -1)]
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "FOREIGN_KEY_VIOLATION",
            [],
        ),
        (
            pb.BatchOperation(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            ["operations[2]"],
        ),
        (
            pb.BatchOperation(
                delete=pb.DeleteRequest(
                    workspace_id=str(uuid.uuid4()), table="campaigns", allow_unfiltered=True
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "WORKSPACE_MISMATCH",
            ["operations[2].delete.workspace_id"],
        ),
    ],
)
async def test_batch_failure_names_the_operation(stub, db, workspace, third, code, reason, fields):
    await seed(stub, workspace, ("old", "x", 1))
    before = await stored(db, workspace, "id, name, status, priority")
    failure = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=workspace,
                operations=[
                    _insert(("a", "new")),
                    pb.BatchOperation(
                        delete=pb.DeleteRequest(table="campaigns", filter=eq("name", "old"))
                    ),
                    third,
                ],
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (code, reason, fields)
    assert await stored(db, workspace, "id, name, status, priority") == before
    assert (
        await db.fetchval("SELECT count(*) FROM campaign_events WHERE workspace_id = $1", workspace)
        == 0
    )


@pytest.mark.parametrize("count", [0, 101])
async def test_batch_size_limits(stub, workspace, count):
    failure = await rpc_error(
        stub.ExecuteBatch(
            pb.ExecuteBatchRequest(
                workspace_id=workspace, operations=[_insert((f"n{i}", "x")) for i in range(count)]
            )
        )
    )
    assert (failure.code, failure.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["operations"])


async def test_batch_of_one_hundred(stub, db, workspace):
    result = await stub.ExecuteBatch(
        pb.ExecuteBatchRequest(
            workspace_id=workspace, operations=[_insert((f"n{i:03d}", "x")) for i in range(100)]
        )
    )
    assert [r.insert.affected_count for r in result.results] == [1] * 100
    assert await stored(db, workspace, "name") == [[f"n{i:03d}"] for i in range(100)]


# ---------------------------------------------------------------------------
# Database errors map to defined statuses


async def test_unique_violation_is_already_exists(stub, db, workspace):
    await seed(stub, workspace, ("taken", "x", 1))
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace, table="campaigns", columns=["name"], rows=[row("taken")]
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "UNIQUE_VIOLATION",
        [],
    )
    assert failure.metadata["constraint"] == "campaigns_workspace_id_name_key"
    assert "taken" not in failure.message  # the detail line with the key's values stays inside
    ids = await seed(stub, workspace, ("free", "x", 1))
    renamed = await rpc_error(
        stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace,
                table="campaigns",
                values={"name": v("taken")},
                filter=eq("id", ids[0]),
            )
        )
    )
    assert (renamed.code, renamed.reason) == (grpc.StatusCode.ALREADY_EXISTS, "UNIQUE_VIOLATION")
    assert await stored(db, workspace, "name") == [["taken"], ["free"]]


async def test_not_null_violation_names_the_column(stub, db, workspace):
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace, table="campaigns", columns=["status"], rows=[row("x")]
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_NULL_VIOLATION",
        ["name"],
    )
    assert failure.metadata["column"] == "name"
    # Every column left to its default: still the same violation.
    defaults = await rpc_error(
        stub.Insert(pb.InsertRequest(workspace_id=workspace, table="campaigns", rows=[Row()]))
    )
    assert (defaults.code, defaults.fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["name"])
    await seed(stub, workspace, ("a", "x", 1))
    cleared = await rpc_error(
        stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace,
                table="campaigns",
                values={"name": NULL},
                allow_unfiltered=True,
            )
        )
    )
    assert (cleared.code, cleared.reason, cleared.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_NULL_VIOLATION",
        ["name"],
    )
    assert await stored(db, workspace, "name") == [["a"]]


async def test_check_violation_is_invalid_argument(stub, db, workspace):
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name", "priority"],
                rows=[row("ok", 0), row("negative", -5)],
            )
        )
    )
    assert (failure.code, failure.reason, failure.metadata["constraint"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "CHECK_VIOLATION",
        "campaigns_priority_check",
    )
    assert "-5" not in failure.message
    assert await stored(db, workspace) == []


async def test_foreign_key_violation_is_failed_precondition(stub, db, workspace):
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table="campaign_events",
                columns=["kind", "campaign_id"],
                rows=[row("opened", -42)],
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "FOREIGN_KEY_VIOLATION",
        [],
    )
    assert failure.metadata["constraint"] == "campaign_events_campaign_id_fkey"
    assert "-42" not in failure.message
    (campaign,) = await seed(stub, workspace, ("parent", None, None))
    ok = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaign_events",
            columns=["kind", "campaign_id"],
            rows=[row("opened", campaign)],
        )
    )
    assert ok.affected_count == 1
    # Deleting the campaign cascades to its events.
    await stub.Delete(
        pb.DeleteRequest(workspace_id=workspace, table="campaigns", filter=eq("id", campaign))
    )
    assert (
        await db.fetchval("SELECT count(*) FROM campaign_events WHERE workspace_id = $1", workspace)
        == 0
    )


async def test_upsert_conflict_columns_imply_workspace_id(stub, db, workspace, other_workspace):
    """("name",) names the key (workspace_id, name): callers never write workspace_id."""
    await seed(stub, workspace, ("a", "old", 1))
    await seed(stub, other_workspace, ("a", "theirs", 1))
    response = await stub.Upsert(
        pb.UpsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "status"],
            rows=[row("a", "new"), row("b", "fresh")],
            conflict_columns=["name"],
            on_conflict=pb.CONFLICT_ACTION_UPDATE,
        )
    )
    assert response.affected_count == 2
    assert await stored(db, workspace, "name, status") == [["a", "new"], ["b", "fresh"]]
    assert await stored(db, other_workspace, "name, status") == [["a", "theirs"]]
