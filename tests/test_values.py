"""Every value kind round-trips exactly through Insert and Select, and bad values are refused."""

from __future__ import annotations

import decimal
import json
import math
import struct
import uuid
from collections.abc import Sequence

import grpc
import pytest
from conftest import ODD_TABLE
from google.protobuf import timestamp_pb2
from messages import NULL, Value, eq
from raptorflow.data.v1 import query_pb2, value_pb2, workspace_service_pb2
from statuses import Failure, rpc_error

pb = workspace_service_pb2
PG_EPOCH_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z
MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z


def ts(seconds: int, nanos: int = 0) -> Value:
    return Value(timestamp_value=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))


def date(year: int, month: int, day: int) -> Value:
    return Value(date_value=value_pb2.Date(year=year, month=month, day=day))


def array(*items: Value) -> Value:
    return Value(array_value=value_pb2.ArrayValue(values=items))


def required(table: str, i: int = 0) -> tuple[str, Value]:
    """The NOT NULL column every insert into `table` needs, and a value for row `i`."""
    if table == "campaigns":
        return "name", Value(string_value=f"row {i}")  # unique per workspace
    return "kind", Value(string_value="opened")


async def round_trip(
    stub, workspace: str, table: str, column: str, values: Sequence[Value]
) -> list[int]:
    """Inserts one row per value, checks RETURNING and Select give each value back; the ids."""
    req_name, _ = required(table)
    rows = [value_pb2.Row(values=[required(table, i)[1], v]) for i, v in enumerate(values)]
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table=table,
            columns=[req_name, column],
            rows=rows,
            returning=["id", column],
        )
    )
    assert inserted.affected_count == len(values)
    assert list(inserted.returning.columns) == ["id", column]
    ids = [r.values[0].int64_value for r in inserted.returning.rows]
    assert [r.values[1] for r in inserted.returning.rows] == list(values)
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table=table,
            columns=["id", column],
            order_by=[query_pb2.OrderBy(column="id")],
            page_size=1000,
        )
    )
    assert [r.values[0].int64_value for r in page.rows] == ids
    assert [r.values[1] for r in page.rows] == list(values)
    return ids


async def select_one(stub, workspace: str, table: str, column: str) -> Value:
    page = await stub.Select(
        pb.SelectRequest(workspace_id=workspace, table=table, columns=[column])
    )
    assert len(page.rows) == 1
    return page.rows[0].values[0]


async def insert_failure(stub, workspace: str, table: str, column: str, *values: Value) -> Failure:
    req_name, _ = required(table)
    rows = [value_pb2.Row(values=[required(table, i)[1], v]) for i, v in enumerate(values)]
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace, table=table, columns=[req_name, column], rows=rows
            )
        )
    )
    assert failure.domain == "data.raptorflow.dev"
    return failure


async def count_rows(db, table: str, workspace: str) -> int:
    return await db.fetchval(f"SELECT count(*) FROM {table} WHERE workspace_id = $1", workspace)


# ---------------------------------------------------------------------------
# Scalars


CAMPAIGN_NULLABLE = [
    "status",
    "priority",
    "budget",
    "score",
    "active",
    "starts_on",
    "external_id",
    "payload",
    "meta",
    "tags",
    "embedding",
]
EVENT_NULLABLE = [
    "campaign_id",
    "happened_at",
    "counts",
    "info",
    "note",
    "address",
    "small",
    "ratio",
    "big",
]


async def test_null_round_trips_in_every_nullable_column(stub, db, workspace):
    for table, columns in (("campaigns", CAMPAIGN_NULLABLE), ("campaign_events", EVENT_NULLABLE)):
        req_name, req_value = required(table)
        inserted = await stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table=table,
                columns=[req_name, *columns],
                rows=[value_pb2.Row(values=[req_value] + [NULL] * len(columns))],
                returning=columns,
            )
        )
        assert list(inserted.returning.rows[0].values) == [NULL] * len(columns)
        page = await stub.Select(
            pb.SelectRequest(workspace_id=workspace, table=table, columns=columns)
        )
        assert list(page.rows[0].values) == [NULL] * len(columns)
        record = await db.fetchrow(
            f"SELECT {', '.join(columns)} FROM {table} WHERE workspace_id = $1", workspace
        )
        assert list(record.values()) == [None] * len(columns)


async def test_null_into_not_null_column_is_invalid_argument(stub, workspace):
    failure = await rpc_error(
        stub.Insert(
            pb.InsertRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name"],
                rows=[value_pb2.Row(values=[NULL])],
            )
        )
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "NOT_NULL_VIOLATION",
        ["name"],
    )


async def test_bool(stub, db, workspace):
    await round_trip(
        stub, workspace, "campaigns", "active", [Value(bool_value=True), Value(bool_value=False)]
    )
    stored = await db.fetch(
        "SELECT active FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [r["active"] for r in stored] == [True, False]


async def test_int64_extremes_in_bigint(stub, db, workspace):
    extremes = [2**63 - 1, -(2**63), 0, -1]
    # campaigns.id is the only plain bigint column; write it directly.
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["id", "name"],
            rows=[
                value_pb2.Row(values=[Value(int64_value=n), Value(string_value=f"n{n}")])
                for n in extremes[:2]
            ],
            returning=["id"],
        )
    )
    try:
        assert [r.values[0].int64_value for r in inserted.returning.rows] == extremes[:2]
        page = await stub.Select(
            pb.SelectRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["id"],
                order_by=[query_pb2.OrderBy(column="id", descending=True)],
            )
        )
        assert [r.values[0].int64_value for r in page.rows] == [2**63 - 1, -(2**63)]
        found = await stub.Select(
            pb.SelectRequest(
                workspace_id=workspace,
                table="campaigns",
                columns=["name"],
                filter=eq("id", Value(int64_value=-(2**63))),
            )
        )
        assert [r.values[0].string_value for r in found.rows] == [f"n{-(2**63)}"]
        stored = await db.fetch(
            "SELECT id FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
        )
        assert [r["id"] for r in stored] == [-(2**63), 2**63 - 1]
    finally:
        await db.execute("DELETE FROM campaigns WHERE workspace_id = $1", workspace)
    # bigint[] carries the same extremes, element by element.
    counts = array(*(Value(int64_value=n) for n in extremes), NULL)
    await round_trip(stub, workspace, "campaign_events", "counts", [counts])
    stored_counts = await db.fetchval(
        "SELECT counts FROM campaign_events WHERE workspace_id = $1", workspace
    )
    assert stored_counts == [*extremes, None]


async def test_smallint_and_integer_limits(stub, db, workspace):
    await round_trip(
        stub,
        workspace,
        "campaign_events",
        "small",
        [Value(int64_value=32767), Value(int64_value=-32768), Value(int64_value=0)],
    )
    await round_trip(stub, workspace, "campaigns", "priority", [Value(int64_value=2**31 - 1)])
    assert (
        await db.fetchval("SELECT priority FROM campaigns WHERE workspace_id = $1", workspace)
        == 2**31 - 1
    )


@pytest.mark.parametrize(
    ("table", "column", "number"),
    [
        ("campaign_events", "small", 32768),
        ("campaign_events", "small", -32769),
        ("campaigns", "priority", 2**31),
        ("campaigns", "priority", -(2**31) - 1),
    ],
)
async def test_integer_overflow_is_out_of_range(stub, db, workspace, table, column, number):
    failure = await insert_failure(
        stub, workspace, table, column, Value(int64_value=1), Value(int64_value=number)
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "OUT_OF_RANGE",
        ["rows[1].values[1]"],
    )
    assert await count_rows(db, table, workspace) == 0


def _bits(x: float) -> bytes:
    return struct.pack(">d", x)


async def test_double_keeps_every_bit(stub, db, workspace):
    doubles = [
        0.1,
        -0.0,
        0.0,
        math.inf,
        -math.inf,
        math.nan,
        5e-324,
        1.7976931348623157e308,
        -2.2250738585072014e-308,
        1 / 3,
    ]
    req = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "score"],
            rows=[
                value_pb2.Row(values=[Value(string_value=f"d{i}"), Value(double_value=d)])
                for i, d in enumerate(doubles)
            ],
            returning=["score"],
        )
    )
    assert [_bits(r.values[0].double_value) for r in req.returning.rows] == [
        _bits(d) for d in doubles
    ]
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["score"],
            order_by=[query_pb2.OrderBy(column="id")],
        )
    )
    assert [r.values[0].WhichOneof("kind") for r in page.rows] == ["double_value"] * len(doubles)
    assert [_bits(r.values[0].double_value) for r in page.rows] == [_bits(d) for d in doubles]
    stored = await db.fetch(
        "SELECT score FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [_bits(r["score"]) for r in stored] == [_bits(d) for d in doubles]


async def test_real_column_keeps_float32_precision(stub, workspace):
    as_float32 = struct.unpack("<f", struct.pack("<f", 0.1))[0]
    await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaign_events",
            columns=["kind", "ratio"],
            rows=[value_pb2.Row(values=[required("campaign_events")[1], Value(double_value=0.1)])],
        )
    )
    value = await select_one(stub, workspace, "campaign_events", "ratio")
    assert value.double_value == as_float32
    assert value.double_value != 0.1


async def test_int64_into_double_and_numeric_columns(stub, workspace):
    await round_trip(stub, workspace, "campaigns", "status", [Value(string_value="x")])
    updated = await stub.Update(
        pb.UpdateRequest(
            workspace_id=workspace,
            table="campaigns",
            values={"score": Value(int64_value=7), "budget": Value(int64_value=7)},
            allow_unfiltered=True,
            returning=["score", "budget"],
        )
    )
    assert list(updated.returning.rows[0].values) == [
        Value(double_value=7.0),
        Value(decimal_value="7.00"),
    ]


async def test_numeric_keeps_every_digit(stub, db, workspace):
    texts = [
        "12345678901234567890.123456789",
        "NaN",
        "-0.000000000000000000000000000001",
        "100000000000000000000",
        "0",
        "-42.10",
    ]
    await round_trip(
        stub,
        workspace,
        "campaign_events",
        "big",
        [Value(decimal_value=t) for t in texts],
    )
    stored = await db.fetch(
        "SELECT big::text AS big FROM campaign_events WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert [r["big"] for r in stored] == texts


async def test_numeric_with_scale(stub, db, workspace):
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "budget"],
            rows=[
                value_pb2.Row(values=[Value(string_value="a"), Value(decimal_value="12.5")]),
                value_pb2.Row(
                    values=[Value(string_value="b"), Value(decimal_value="999999999999.99")]
                ),
                value_pb2.Row(values=[Value(string_value="c"), Value(decimal_value="-0.005")]),
            ],
            returning=["budget"],
        )
    )
    # numeric(14, 2) rounds to two places, as PostgreSQL does.
    assert [r.values[0].decimal_value for r in inserted.returning.rows] == [
        "12.50",
        "999999999999.99",
        "-0.01",
    ]
    stored = await db.fetch(
        "SELECT budget FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [r["budget"] for r in stored] == [
        decimal.Decimal("12.50"),
        decimal.Decimal("999999999999.99"),
        decimal.Decimal("-0.01"),
    ]


async def test_numeric_overflow_and_garbage(stub, db, workspace):
    overflow = await insert_failure(
        stub, workspace, "campaigns", "budget", Value(decimal_value="1000000000000.00")
    )
    assert (overflow.code, overflow.reason) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "NUMERIC_OUT_OF_RANGE",
    )
    garbage = await insert_failure(
        stub, workspace, "campaigns", "budget", Value(decimal_value="12,5")
    )
    assert (garbage.code, garbage.reason, garbage.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )
    assert await count_rows(db, "campaigns", workspace) == 0


async def test_text_unicode(stub, db, workspace):
    texts = ["", "plain", "héllo wörld — 日本語 🦖", "quote ' \" \\ back", "x" * 100_000, "\t\n\r"]
    await round_trip(stub, workspace, "campaigns", "status", [Value(string_value=t) for t in texts])
    stored = await db.fetch(
        "SELECT status FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [r["status"] for r in stored] == texts


async def test_text_with_nul_is_invalid_argument(stub, db, workspace):
    failure = await insert_failure(
        stub, workspace, "campaigns", "status", Value(string_value="a\x00b")
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )
    assert await count_rows(db, "campaigns", workspace) == 0


async def test_varchar_too_long_is_invalid_argument(stub, workspace):
    await round_trip(stub, workspace, "campaign_events", "note", [Value(string_value="n" * 40)])
    failure = await insert_failure(
        stub, workspace, "campaign_events", "note", Value(string_value="n" * 41)
    )
    assert (failure.code, failure.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE")


async def test_bytes(stub, db, workspace):
    blobs = [b"\x00", b"", bytes(range(256)), b"\xff\x00\xfe" * 20_000]
    await round_trip(stub, workspace, "campaigns", "payload", [Value(bytes_value=b) for b in blobs])
    stored = await db.fetch(
        "SELECT payload FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [r["payload"] for r in stored] == blobs


# ---------------------------------------------------------------------------
# Time


INSTANTS = [
    (0, 0),  # 1970-01-01
    (-1, 999_999_000),  # 1969-12-31T23:59:59.999999Z
    (-2_208_988_800, 1_000),  # 1900-01-01T00:00:00.000001Z
    (1_483_228_799, 999_999_000),  # 2016-12-31T23:59:59.999999Z, before a leap second
    (951_827_696, 789_012_000),  # 2000-02-29T12:34:56.789012Z
    (PG_EPOCH_SECONDS, 0),  # PostgreSQL's own epoch
    (MIN_SECONDS, 0),  # 0001-01-01T00:00:00Z
    (MIN_SECONDS, 1_000),
    (MAX_SECONDS, 0),  # 9999-12-31T23:59:59Z
    (MAX_SECONDS, 999_999_000),  # the last representable microsecond
]


def _epoch_text(seconds: int, nanos: int) -> decimal.Decimal:
    return decimal.Decimal(seconds) + decimal.Decimal(nanos // 1000) / 1_000_000


async def test_timestamptz_keeps_the_instant(stub, db, workspace):
    values = [ts(s, n) for s, n in INSTANTS]
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "created_at"],
            rows=[
                value_pb2.Row(values=[Value(string_value=f"t{i}"), v]) for i, v in enumerate(values)
            ],
            returning=["created_at"],
        )
    )
    assert [r.values[0] for r in inserted.returning.rows] == values
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["created_at"],
            order_by=[query_pb2.OrderBy(column="id")],
        )
    )
    assert [r.values[0] for r in page.rows] == values
    # What PostgreSQL holds: finite instants, to the microsecond.
    stored = await db.fetch(
        "SELECT isfinite(created_at) AS finite, extract(epoch FROM created_at) AS epoch"
        " FROM campaigns WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert [(r["finite"], r["epoch"]) for r in stored] == [
        (True, _epoch_text(s, n)) for s, n in INSTANTS
    ]


async def test_timestamp_without_time_zone_is_utc_wall_clock(stub, db, workspace):
    values = [ts(s, n) for s, n in INSTANTS]
    await round_trip(stub, workspace, "campaign_events", "happened_at", values)
    stored = await db.fetch(
        "SELECT to_char(happened_at, 'YYYY-MM-DD HH24:MI:SS.US') AS wall"
        " FROM campaign_events WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert [r["wall"] for r in stored] == [
        "1970-01-01 00:00:00.000000",
        "1969-12-31 23:59:59.999999",
        "1900-01-01 00:00:00.000001",
        "2016-12-31 23:59:59.999999",
        "2000-02-29 12:34:56.789012",
        "2000-01-01 00:00:00.000000",
        "0001-01-01 00:00:00.000000",
        "0001-01-01 00:00:00.000001",
        "9999-12-31 23:59:59.000000",
        "9999-12-31 23:59:59.999999",
    ]


async def test_sub_microsecond_timestamp_is_invalid_argument(stub, db, workspace):
    failure = await insert_failure(stub, workspace, "campaigns", "created_at", ts(0, 1_000_001))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )
    failure = await insert_failure(
        stub, workspace, "campaign_events", "happened_at", ts(0, 0), ts(0, 999)
    )
    assert (failure.code, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["rows[1].values[1]"],
    )
    assert await count_rows(db, "campaigns", workspace) == 0
    assert await count_rows(db, "campaign_events", workspace) == 0


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(MAX_SECONDS + 1, 0), (MIN_SECONDS - 1, 999_999_000)]
)
async def test_timestamp_outside_years_1_to_9999_is_out_of_range(stub, workspace, seconds, nanos):
    failure = await insert_failure(stub, workspace, "campaigns", "created_at", ts(seconds, nanos))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.OUT_OF_RANGE,
        "OUT_OF_RANGE",
        ["rows[0].values[1]"],
    )


@pytest.mark.parametrize(
    ("table", "column", "stored"),
    [
        ("campaigns", "created_at", "infinity"),
        ("campaigns", "created_at", "-infinity"),
        ("campaigns", "created_at", "10000-01-01 00:00:00+00"),
        ("campaign_events", "happened_at", "infinity"),
        ("campaign_events", "happened_at", "-infinity"),
        ("campaign_events", "happened_at", "0001-01-01 00:00:00 BC"),
        ("campaigns", "starts_on", "infinity"),
        ("campaigns", "starts_on", "-infinity"),
        ("campaigns", "starts_on", "10000-01-01"),
    ],
)
async def test_unrepresentable_stored_time_reads_as_out_of_range(
    stub, db, workspace, table, column, stored
):
    required = "name" if table == "campaigns" else "kind"
    kind = "date" if column == "starts_on" else "timestamptz"
    await db.execute(
        f"INSERT INTO {table} (workspace_id, {required}, {column})"
        f" VALUES ($1, 'edge', $2::text::{kind})",
        workspace,
        stored,
    )
    try:
        failure = await rpc_error(
            stub.Select(
                pb.SelectRequest(workspace_id=workspace, table=table, columns=["id", column])
            )
        )
        assert (failure.code, failure.reason, failure.metadata.get("column")) == (
            grpc.StatusCode.OUT_OF_RANGE,
            "OUT_OF_RANGE",
            column,
        )
        # Other columns of the same row still read.
        page = await stub.Select(
            pb.SelectRequest(workspace_id=workspace, table=table, columns=[required])
        )
        assert [r.values[0].string_value for r in page.rows] == ["edge"]
    finally:
        await db.execute(f"DELETE FROM {table} WHERE workspace_id = $1", workspace)


async def test_date(stub, db, workspace):
    dates = [(2024, 2, 29), (1970, 1, 1), (1, 1, 1), (9999, 12, 31), (1999, 12, 31)]
    await round_trip(stub, workspace, "campaigns", "starts_on", [date(*d) for d in dates])
    stored = await db.fetch(
        "SELECT starts_on::text AS d FROM campaigns WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert [r["d"] for r in stored] == [
        "2024-02-29",
        "1970-01-01",
        "0001-01-01",
        "9999-12-31",
        "1999-12-31",
    ]


@pytest.mark.parametrize("bad", [(2023, 2, 29), (0, 1, 1), (2024, 13, 1), (10000, 1, 1)])
async def test_invalid_date_is_invalid_argument(stub, workspace, bad):
    failure = await insert_failure(stub, workspace, "campaigns", "starts_on", date(*bad))
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )


# ---------------------------------------------------------------------------
# Identifiers, JSON, arrays, unmodelled types


async def test_uuid(stub, db, workspace):
    one, two = uuid.uuid4(), uuid.uuid4()
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "external_id"],
            rows=[
                value_pb2.Row(values=[Value(string_value="a"), Value(uuid_value=str(one))]),
                # Upper case and string_value are accepted; output is canonical.
                value_pb2.Row(
                    values=[Value(string_value="b"), Value(string_value=str(two).upper())]
                ),
            ],
            returning=["external_id"],
        )
    )
    assert [r.values[0] for r in inserted.returning.rows] == [
        Value(uuid_value=str(one)),
        Value(uuid_value=str(two)),
    ]
    found = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name", "workspace_id"],
            filter=eq("external_id", Value(uuid_value=str(two))),
        )
    )
    assert list(found.rows[0].values) == [Value(string_value="b"), Value(uuid_value=workspace)]
    stored = await db.fetch(
        "SELECT external_id FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [r["external_id"] for r in stored] == [one, two]
    bad = await insert_failure(
        stub, workspace, "campaigns", "external_id", Value(uuid_value="not-a-uuid")
    )
    assert (bad.code, bad.reason, bad.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_UUID",
        ["rows[0].values[1]"],
    )


JSON_DOCUMENTS = [
    '{"b": [1, 2.5, "x", null, true, {"z": {}}], "a": "\\u00fc\\u00e9 🦖",'
    ' "n": 12345678901234567890}',
    "[]",
    '"just a string"',
    "null",
    "0.1",
    '{"nested": {"deep": [[1], [2, [3]]]}, "empty": ""}',
]


@pytest.mark.parametrize(("table", "column"), [("campaigns", "meta"), ("campaign_events", "info")])
async def test_json_documents_compare_equal(stub, db, workspace, table, column):
    values = [Value(json_value=d) for d in JSON_DOCUMENTS]
    req_name, _ = required(table)
    inserted = await stub.Insert(
        pb.InsertRequest(
            workspace_id=workspace,
            table=table,
            columns=[req_name, column],
            rows=[value_pb2.Row(values=[required(table, i)[1], v]) for i, v in enumerate(values)],
            returning=[column],
        )
    )
    page = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table=table,
            columns=[column],
            order_by=[query_pb2.OrderBy(column="id")],
        )
    )
    for rows in (inserted.returning.rows, page.rows):
        assert [r.values[0].WhichOneof("kind") for r in rows] == ["json_value"] * len(values)
        assert [json.loads(r.values[0].json_value) for r in rows] == [
            json.loads(d) for d in JSON_DOCUMENTS
        ]
    # JSON null is a document, not SQL NULL.
    stored = await db.fetch(
        f"SELECT {column} IS NULL AS missing FROM {table} WHERE workspace_id = $1 ORDER BY id",
        workspace,
    )
    assert [r["missing"] for r in stored] == [False] * len(values)


async def test_invalid_json_is_invalid_argument(stub, workspace):
    failure = await insert_failure(
        stub, workspace, "campaigns", "meta", Value(json_value="{'single': 'quotes'}")
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )


async def test_text_array_with_null_elements(stub, db, workspace):
    items = ["a", None, "", "ü 🦖", "with,comma", 'quote"', "NULL", "{braces}"]
    tags = array(*(NULL if t is None else Value(string_value=t) for t in items))
    await round_trip(stub, workspace, "campaigns", "tags", [tags, array()])
    stored = await db.fetch(
        "SELECT tags FROM campaigns WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [r["tags"] for r in stored] == [items, []]


async def test_array_element_of_wrong_kind_names_the_element(stub, workspace):
    failure = await insert_failure(
        stub,
        workspace,
        "campaign_events",
        "counts",
        array(Value(int64_value=1), Value(string_value="two")),
    )
    assert (failure.code, failure.reason, failure.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1].array_value.values[1]"],
    )


def _float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


async def test_real_array_via_vector_value_is_float32_exact(stub, db, workspace):
    components = [
        0.1,
        -2.5,
        1 / 3,
        3.4028234663852886e38,
        1.401298464324817e-45,
        -0.0,
        math.inf,
        -math.inf,
    ]
    vector = Value(vector_value=value_pb2.FloatVector(values=components))
    expected = [_float32(x) for x in components]
    assert list(vector.vector_value.values) == expected  # the wire already carries float32
    await round_trip(stub, workspace, "campaigns", "embedding", [vector])
    returned = await select_one(stub, workspace, "campaigns", "embedding")
    assert [struct.pack("<f", x) for x in returned.vector_value.values] == [
        struct.pack("<f", x) for x in expected
    ]
    stored = await db.fetchval("SELECT embedding FROM campaigns WHERE workspace_id = $1", workspace)
    assert [struct.pack("<f", x) for x in stored] == [struct.pack("<f", x) for x in expected]


async def test_inet_is_read_and_written_as_text(stub, db, workspace):
    addresses = ["192.168.0.1", "10.0.0.0/8", "::1", "2001:db8::/32", "192.168.1.5/24"]
    await round_trip(
        stub,
        workspace,
        "campaign_events",
        "address",
        [Value(string_value=a) for a in addresses],
    )
    stored = await db.fetch(
        "SELECT address FROM campaign_events WHERE workspace_id = $1 ORDER BY id", workspace
    )
    assert [str(r["address"]) for r in stored] == [
        "192.168.0.1",
        "10.0.0.0/8",
        "::1",
        "2001:db8::/32",
        "192.168.1.5/24",
    ]
    found = await stub.Select(
        pb.SelectRequest(
            workspace_id=workspace,
            table="campaign_events",
            columns=["address"],
            filter=eq("address", Value(string_value="10.0.0.0/8")),
        )
    )
    assert [r.values[0].string_value for r in found.rows] == ["10.0.0.0/8"]
    bad = await insert_failure(
        stub, workspace, "campaign_events", "address", Value(string_value="not an address")
    )
    assert (bad.code, bad.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_VALUE")
    wrong_kind = await insert_failure(
        stub, workspace, "campaign_events", "address", Value(int64_value=1)
    )
    assert (wrong_kind.code, wrong_kind.reason, wrong_kind.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )


async def test_type_mismatch_names_the_field(stub, db, workspace):
    failure = await insert_failure(
        stub,
        workspace,
        "campaigns",
        "active",
        Value(bool_value=True),
        Value(string_value="true"),
    )
    assert (failure.code, failure.reason, failure.fields, failure.metadata) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[1].values[1]"],
        {"column": "active"},
    )
    assert await count_rows(db, "campaigns", workspace) == 0
    in_filter = await rpc_error(
        stub.Select(
            pb.SelectRequest(
                workspace_id=workspace,
                table="campaigns",
                filter=eq("active", Value(string_value="yes")),
            )
        )
    )
    assert (in_filter.code, in_filter.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["filter.condition.value"],
    )
    in_update = await rpc_error(
        stub.Update(
            pb.UpdateRequest(
                workspace_id=workspace,
                table="campaigns",
                values={"priority": Value(double_value=1.5)},
                allow_unfiltered=True,
            )
        )
    )
    assert (in_update.code, in_update.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ['values["priority"]'],
    )
    empty = await insert_failure(stub, workspace, "campaigns", "active", Value())
    assert (empty.code, empty.reason, empty.fields) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_VALUE",
        ["rows[0].values[1]"],
    )


# ---------------------------------------------------------------------------
# DescribeTables

K = value_pb2
CAMPAIGN_COLUMNS = [
    # name, database_type, kind, element_kind, nullable, has_default
    ("id", "bigint", K.VALUE_KIND_INT64, 0, False, True),
    ("workspace_id", "uuid", K.VALUE_KIND_UUID, 0, False, False),
    ("name", "text", K.VALUE_KIND_STRING, 0, False, False),
    ("status", "text", K.VALUE_KIND_STRING, 0, True, False),
    ("priority", "integer", K.VALUE_KIND_INT64, 0, True, False),
    ("budget", "numeric(14,2)", K.VALUE_KIND_DECIMAL, 0, True, False),
    ("score", "double precision", K.VALUE_KIND_DOUBLE, 0, True, False),
    ("active", "boolean", K.VALUE_KIND_BOOL, 0, True, False),
    ("created_at", "timestamp with time zone", K.VALUE_KIND_TIMESTAMP, 0, False, True),
    ("starts_on", "date", K.VALUE_KIND_DATE, 0, True, False),
    ("external_id", "uuid", K.VALUE_KIND_UUID, 0, True, False),
    ("payload", "bytea", K.VALUE_KIND_BYTES, 0, True, False),
    ("meta", "jsonb", K.VALUE_KIND_JSON, 0, True, False),
    ("tags", "text[]", K.VALUE_KIND_ARRAY, K.VALUE_KIND_STRING, True, False),
    ("embedding", "real[]", K.VALUE_KIND_VECTOR, 0, True, False),
]
EVENT_COLUMNS = [
    ("id", "bigint", K.VALUE_KIND_INT64, 0, False, True),
    ("workspace_id", "uuid", K.VALUE_KIND_UUID, 0, False, False),
    ("campaign_id", "bigint", K.VALUE_KIND_INT64, 0, True, False),
    ("kind", "text", K.VALUE_KIND_STRING, 0, False, False),
    ("happened_at", "timestamp without time zone", K.VALUE_KIND_TIMESTAMP, 0, True, False),
    ("counts", "bigint[]", K.VALUE_KIND_ARRAY, K.VALUE_KIND_INT64, True, False),
    ("info", "json", K.VALUE_KIND_JSON, 0, True, False),
    ("note", "character varying(40)", K.VALUE_KIND_STRING, 0, True, False),
    ("address", "inet", K.VALUE_KIND_STRING, 0, True, False),
    ("small", "smallint", K.VALUE_KIND_INT64, 0, True, False),
    ("ratio", "real", K.VALUE_KIND_DOUBLE, 0, True, False),
    ("big", "numeric", K.VALUE_KIND_DECIMAL, 0, True, False),
]
ODD_COLUMNS = [
    ("id", "bigint", K.VALUE_KIND_INT64, 0, False, False),
    ("workspace_id", "uuid", K.VALUE_KIND_UUID, 0, False, False),
    ("select", "text", K.VALUE_KIND_STRING, 0, True, False),
    ("drop table x; --", "text", K.VALUE_KIND_STRING, 0, True, False),
]


def _columns(table: pb.TableDescription) -> list[tuple[object, ...]]:
    return [
        (c.name, c.database_type, c.kind, c.element_kind, c.nullable, c.has_default)
        for c in table.columns
    ]


async def test_describe_tables_lists_exactly_the_exposed_tables(stub, db):
    described = await stub.DescribeTables(pb.DescribeTablesRequest())
    names = [t.name for t in described.tables]
    # Exposed: every table of the schema with a workspace_id column (other test modules of
    # this session may have added some); never internal_secrets.
    with_workspace = await db.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'workspace_id'"
        " AND NOT a.attisdropped WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
    )
    assert names == sorted(names)
    assert set(names) == {r["relname"] for r in with_workspace}
    assert {"campaigns", "campaign_events", ODD_TABLE} <= set(names)
    assert "internal_secrets" not in names
    by_name = {t.name: t for t in described.tables}

    campaigns = by_name["campaigns"]
    assert _columns(campaigns) == CAMPAIGN_COLUMNS
    assert list(campaigns.primary_key) == ["id"]
    assert [list(k.columns) for k in campaigns.unique_keys] == [["id"], ["workspace_id", "name"]]

    events = by_name["campaign_events"]
    assert _columns(events) == EVENT_COLUMNS
    assert list(events.primary_key) == ["id"]
    assert [list(k.columns) for k in events.unique_keys] == [["id"]]

    odd = by_name[ODD_TABLE]
    assert _columns(odd) == ODD_COLUMNS
    assert list(odd.primary_key) == ["id"]
    assert [list(k.columns) for k in odd.unique_keys] == [["id"]]


async def test_describe_named_tables(stub):
    described = await stub.DescribeTables(pb.DescribeTablesRequest(tables=[ODD_TABLE, "campaigns"]))
    # Ordered by name, in code point order.
    assert [t.name for t in described.tables] == [ODD_TABLE, "campaigns"]
    for name in ("internal_secrets", "pg_catalog.pg_user", "Campaigns", ""):
        failure = await rpc_error(
            stub.DescribeTables(pb.DescribeTablesRequest(tables=["campaigns", name]))
        )
        assert (failure.code, failure.reason, failure.fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "UNKNOWN_TABLE",
            ["tables[1]"],
        )
        assert "do not leak" not in failure.message
