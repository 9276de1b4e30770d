"""Decoding of `ColumnBatch` messages, the column-wise row form of streams, into Python values.

A column is decoded as a whole: the list the column's `values` oneof holds is
converted with one function chosen once per column, never per cell, and NULL
rows are blanked from `null_rows`. Rows, when wanted, are zipped from the
decoded columns afterwards. The Python types are those of `from_value`, so a
row from a sync stream and a row from `select()` compare equal.
"""

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Final, TypeVar, cast
from uuid import UUID

from raptorflow.data.client._values import JsonValue, PyValue, Row, from_value
from raptorflow.data.v1 import column_batch_pb2, value_pb2

_T = TypeVar("_T")

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()


def _timestamp(micros: int) -> datetime:
    # timedelta arithmetic is integral, so every microsecond survives, before
    # 1970 too; datetime.fromtimestamp would go through a float.
    return _EPOCH + timedelta(microseconds=micros)


def _date(days: int) -> date:
    return date.fromordinal(_EPOCH_ORDINAL + days)


def _json(text: str) -> PyValue:
    return cast("JsonValue", json.loads(text))


# string_values carries four kinds; the column's kind says how to read the text.
_TEXT_DECODERS: Final[Mapping[int, Callable[[str], PyValue]]] = {
    value_pb2.VALUE_KIND_UUID: UUID,
    value_pb2.VALUE_KIND_DECIMAL: Decimal,
    value_pb2.VALUE_KIND_JSON: _json,
}


def _check_length(raw: Sequence[object], row_count: int) -> None:
    if len(raw) != row_count:
        # A short or long column would shift every later value onto the wrong
        # row, so it is refused rather than padded or cut.
        raise ValueError(f"the column has {len(raw)} values for {row_count} rows")


def _plain(raw: Sequence[PyValue], row_count: int, null_rows: Sequence[int]) -> list[PyValue]:
    _check_length(raw, row_count)
    values: list[PyValue] = list(raw)
    for index in null_rows:
        values[index] = None
    return values


def _converted(
    raw: Sequence[_T], row_count: int, null_rows: Sequence[int], convert: Callable[[_T], PyValue]
) -> list[PyValue]:
    _check_length(raw, row_count)
    if not null_rows:
        return [convert(value) for value in raw]
    # A NULL row holds the list's zero value ("", 0), which the converter may
    # reject ("" is no UUID), so NULL rows are blanked before converting.
    blanked: list[_T | None] = list(raw)
    for index in null_rows:
        blanked[index] = None
    return [None if value is None else convert(value) for value in blanked]


def _column_values(column: column_batch_pb2.ColumnValues, row_count: int) -> list[PyValue]:
    nulls = column.null_rows
    if nulls and (min(nulls) < 0 or max(nulls) >= row_count):
        raise ValueError(f"null_rows holds an index outside the batch's {row_count} rows")
    match column.WhichOneof("values"):
        case "bool_values":
            return _plain(column.bool_values.values, row_count, nulls)
        case "int64_values":
            return _plain(column.int64_values.values, row_count, nulls)
        case "double_values":
            return _plain(column.double_values.values, row_count, nulls)
        case "string_values":
            decoder = _TEXT_DECODERS.get(column.kind)
            if decoder is None:
                return _plain(column.string_values.values, row_count, nulls)
            return _converted(column.string_values.values, row_count, nulls, decoder)
        case "bytes_values":
            return _plain(column.bytes_values.values, row_count, nulls)
        case "timestamp_micros":
            return _converted(column.timestamp_micros.values, row_count, nulls, _timestamp)
        case "date_days":
            return _converted(column.date_days.values, row_count, nulls, _date)
        case "other_values":
            return _converted(column.other_values.values, row_count, nulls, from_value)
        case None:
            # No list at all is only consistent with rows that are all NULL.
            if len(nulls) != row_count:
                raise ValueError("the column has no values but not every row is NULL")
            return [None] * row_count


def from_column_batch(batch: column_batch_pb2.ColumnBatch) -> dict[str, list[PyValue]]:
    """Decodes a `ColumnBatch` into one list of Python values per column, in column order.

    Values have the types `from_value` returns: int64, double, bool, text and
    bytes as they are; a UUID column gives `UUID`, a decimal `Decimal` (every
    digit), JSON the parsed document, a timestamp an aware `datetime` in UTC
    (exact to the microsecond), a date a `date`, arrays and vectors lists.
    NULL rows are None.

    Raises ValueError when the batch is inconsistent (a column with more or
    fewer values than `row_count`, a NULL index out of range, a repeated
    column name) or a value cannot be read, naming the column.
    """
    columns: dict[str, list[PyValue]] = {}
    for column in batch.columns:
        if column.name in columns:
            raise ValueError(f"column {column.name!r} appears twice in a batch of {batch.table!r}")
        try:
            columns[column.name] = _column_values(column, batch.row_count)
        except (ValueError, ArithmeticError) as err:
            # ArithmeticError: decimal.InvalidOperation for bad decimal text,
            # OverflowError for a date or timestamp outside years 1 to 9999.
            raise ValueError(f"column {column.name!r} of table {batch.table!r}: {err}") from err
    return columns


def rows_from_columns(columns: Mapping[str, Sequence[PyValue]], row_count: int) -> list[Row]:
    """Zips decoded columns into one dict per row, keys in column order."""
    names = list(columns)
    if not names:
        return [{} for _ in range(row_count)]
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
