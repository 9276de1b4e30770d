"""`db/columnar.py` on its own: column kinds, NULLs, empty batches, unrepresentable values."""

from __future__ import annotations

import decimal
import uuid
from typing import Any

import pytest
from raptorflow.data.server.db.catalog import Column, Kind
from raptorflow.data.server.db.codecs import TIMESTAMP_INFINITY, PgDate, PgTimestamp
from raptorflow.data.server.db.columnar import ColumnEncoder
from raptorflow.data.server.errors import Code, ServiceError


def column(name: str, kind: Kind, type_name: str = "", **changes: Any) -> Column:
    fields: dict[str, Any] = {
        "name": name,
        "database_type": type_name,
        "bind_type": type_name,
        "type_name": type_name,
        "kind": kind,
        "element_kind": None,
        "element_type_name": "",
        "nullable": True,
        "has_default": False,
        "generated": False,
        "as_text": False,
    }
    fields.update(changes)
    return Column(**fields)


COLUMNS = [
    column("b", Kind.BOOL),
    column("i", Kind.INT64),
    column("d", Kind.DOUBLE),
    column("s", Kind.STRING),
    column("u", Kind.UUID),
    column("n", Kind.DECIMAL),
    column("t", Kind.TIMESTAMP),
    column("day", Kind.DATE),
    column("a", Kind.ARRAY, "_int8", element_kind=Kind.INT64, element_type_name="int8"),
]
UUID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_columns_are_packed_lists_with_nulls_listed() -> None:
    records = [
        (True, 1, 0.5, "x", UUID, decimal.Decimal("1E-7"), PgTimestamp(0), PgDate(0), [1, None]),
        (None, None, None, None, None, None, None, None, None),
    ]
    batch = ColumnEncoder("t", COLUMNS).encode(records)
    assert batch.table == "t"
    assert batch.row_count == 2
    by_name = {c.name: c for c in batch.columns}
    assert list(by_name["b"].bool_values.values) == [True, False]
    assert list(by_name["i"].int64_values.values) == [1, 0]
    assert list(by_name["s"].string_values.values) == ["x", ""]
    assert list(by_name["u"].string_values.values) == [str(UUID), ""]
    assert list(by_name["n"].string_values.values) == ["0.0000001", ""]
    assert list(by_name["t"].timestamp_micros.values) == [946_684_800_000_000, 0]
    assert list(by_name["day"].date_days.values) == [10_957, 0]
    first, second = by_name["a"].other_values.values
    assert [v.int64_value for v in first.array_value.values[:1]] == [1]
    assert second.WhichOneof("kind") == "null_value"
    for c in batch.columns:
        assert list(c.null_rows) == [1], c.name
        assert c.kind == COLUMNS[[x.name for x in COLUMNS].index(c.name)].kind.value


def test_an_empty_batch_still_names_each_columns_list() -> None:
    batch = ColumnEncoder("t", COLUMNS).encode([])
    assert batch.row_count == 0
    assert [c.WhichOneof("values") for c in batch.columns] == [
        "bool_values",
        "int64_values",
        "double_values",
        "string_values",
        "string_values",
        "string_values",
        "timestamp_micros",
        "date_days",
        "other_values",
    ]


def test_leading_fields_can_be_skipped() -> None:
    batch = ColumnEncoder("t", [column("i", Kind.INT64)]).encode([(7, "U", 3)], skip=2)
    assert list(batch.columns[0].int64_values.values) == [3]


@pytest.mark.parametrize(
    ("kind", "cell"),
    [(Kind.TIMESTAMP, PgTimestamp(TIMESTAMP_INFINITY)), (Kind.DATE, PgDate(2**31 - 1))],
)
def test_infinite_values_are_out_of_range(kind: Kind, cell: object) -> None:
    with pytest.raises(ServiceError) as raised:
        ColumnEncoder("t", [column("c", kind)]).encode([(cell,)])
    assert raised.value.code is Code.OUT_OF_RANGE
    assert raised.value.metadata == {"column": "c"}
