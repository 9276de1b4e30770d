"""Rows read by asyncpg as a `ColumnBatch`: one packed list per column, every value exact.

Encoding one `Value` per cell costs about as much as reading the row; here the
records are transposed once (`zip(*records)`, in C) and each column is handed to
protobuf as one list, so most kinds never touch Python per value. Dates and
timestamps arrive as PostgreSQL's own integers (`db/codecs.py`) and only get
their epoch moved; decimals travel as positional text, as in `values.py`.
Arrays and vectors, rare in bulk, reuse `values.py`'s per-value setters.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from raptorflow.data.server.db import values
from raptorflow.data.server.db.catalog import Column, Kind
from raptorflow.data.server.db.codecs import (
    DATE_INFINITY,
    DATE_MINUS_INFINITY,
    TIMESTAMP_INFINITY,
    TIMESTAMP_MINUS_INFINITY,
)
from raptorflow.data.server.errors import Code, ServiceError
from raptorflow.data.v1 import column_batch_pb2, value_pb2

# PostgreSQL counts from 2000-01-01; ColumnBatch from 1970-01-01.
_EPOCH_SHIFT_MICROS = 946_684_800 * 1_000_000
_EPOCH_SHIFT_DAYS = 10_957
_INT64_MAX = 2**63 - 1

_first = operator.itemgetter(0)

Filler = Callable[[column_batch_pb2.ColumnValues, Sequence[Any]], None]
"""Fills one column's list (and null_rows) from its cells, one per row."""


def _out_of_range(column: Column, what: str) -> ServiceError:
    return ServiceError(
        Code.OUT_OF_RANGE,
        "OUT_OF_RANGE",
        f"column {column.name!r} holds {what}",
        metadata={"column": column.name},
    )


def _nulls(column_values: column_batch_pb2.ColumnValues, cells: Sequence[Any]) -> bool:
    """Records the NULL rows; True if there were any."""
    if None not in cells:
        return False
    column_values.null_rows.extend(i for i, cell in enumerate(cells) if cell is None)
    return True


def _packed(field: str, zero: object, convert: Callable[[Any], Any] | None = None) -> Filler:
    """A filler for kinds whose cells go into a packed list as they are (or converted)."""

    def fill(column_values: column_batch_pb2.ColumnValues, cells: Sequence[Any]) -> None:
        target = getattr(column_values, field)
        target.SetInParent()  # an empty batch still says which list the column uses
        has_nulls = _nulls(column_values, cells)
        if convert is None:
            target.values.extend([zero if c is None else c for c in cells] if has_nulls else cells)
        elif has_nulls:
            target.values.extend([zero if c is None else convert(c) for c in cells])
        else:
            target.values.extend(map(convert, cells))

    return fill


def _decimal_text(cell: Any) -> str:
    # Positional notation, as PostgreSQL prints numeric ("0.0000001", not "1E-7").
    return format(cell, "f")


def _timestamps(column: Column) -> Filler:
    def fill(column_values: column_batch_pb2.ColumnValues, cells: Sequence[Any]) -> None:
        target = column_values.timestamp_micros
        target.SetInParent()
        if _nulls(column_values, cells):
            # A NULL row's placeholder lands on 0 once the epoch is moved.
            micros = [-_EPOCH_SHIFT_MICROS if c is None else c[0] for c in cells]
        else:
            micros = list(map(_first, cells))
        if not micros:
            return
        if TIMESTAMP_INFINITY in micros or TIMESTAMP_MINUS_INFINITY in micros:
            raise _out_of_range(column, "an infinite timestamp, which has no micros form")
        if max(micros) > _INT64_MAX - _EPOCH_SHIFT_MICROS:
            raise _out_of_range(column, "a timestamp past the int64 microsecond range")
        target.values.extend(map(_EPOCH_SHIFT_MICROS.__add__, micros))

    return fill


def _dates(column: Column) -> Filler:
    def fill(column_values: column_batch_pb2.ColumnValues, cells: Sequence[Any]) -> None:
        target = column_values.date_days
        target.SetInParent()
        _nulls(column_values, cells)
        days = []
        for cell in cells:
            if cell is None:
                days.append(0)
                continue
            if cell[0] in (DATE_INFINITY, DATE_MINUS_INFINITY):
                raise _out_of_range(column, "an infinite date, which has no day count")
            days.append(cell[0] + _EPOCH_SHIFT_DAYS)
        target.values.extend(days)

    return fill


def _other(column: Column) -> Filler:
    def fill(column_values: column_batch_pb2.ColumnValues, cells: Sequence[Any]) -> None:
        target = column_values.other_values
        target.SetInParent()
        _nulls(column_values, cells)
        # to_value writes null_value for NULL cells, as ColumnValues asks of this list.
        target.values.extend([values.to_value(column, cell) for cell in cells])

    return fill


def filler(column: Column) -> Filler:
    """The function that writes this column's cells into a `ColumnValues`."""
    if column.kind in (Kind.ARRAY, Kind.VECTOR):
        return _other(column)
    if column.as_text:
        return _packed("string_values", "")
    match column.kind:
        case Kind.BOOL:
            return _packed("bool_values", False)
        case Kind.INT64:
            return _packed("int64_values", 0)
        case Kind.DOUBLE:
            return _packed("double_values", 0.0)
        case Kind.STRING | Kind.JSON:
            return _packed("string_values", "")
        case Kind.BYTES:
            return _packed("bytes_values", b"")
        case Kind.UUID:
            return _packed("string_values", "", str)
        case Kind.DECIMAL:
            return _packed("string_values", "", _decimal_text)
        case Kind.TIMESTAMP:
            return _timestamps(column)
        case Kind.DATE:
            return _dates(column)
    raise AssertionError(f"no column filler for {column.kind}")


class ColumnEncoder:
    """Encodes records of one table's columns; built once per table and stream."""

    def __init__(self, table: str, columns: Sequence[Column]) -> None:
        self._table = table
        self._columns = tuple(columns)
        self._plan = tuple((column, filler(column)) for column in self._columns)

    def encode(self, records: Sequence[Any], *, skip: int = 0) -> column_batch_pb2.ColumnBatch:
        """The records as a new batch; see `encode_into`."""
        batch = column_batch_pb2.ColumnBatch()
        self.encode_into(batch, records, skip=skip)
        return batch

    def encode_into(
        self, batch: column_batch_pb2.ColumnBatch, records: Sequence[Any], *, skip: int = 0
    ) -> None:
        """Fills an empty batch (in place: a message handed to a constructor would be
        copied); `skip` leading fields of each record are not columns."""
        batch.table = self._table
        batch.row_count = len(records)
        cells_by_column: Iterable[Sequence[Any]]
        if records:
            cells_by_column = list(zip(*records, strict=True))[skip:]
        else:
            cells_by_column = [()] * len(self._plan)
        for (column, fill), cells in zip(self._plan, cells_by_column, strict=True):
            column_values = batch.columns.add()
            column_values.name = column.name
            column_values.kind = value_pb2.ValueKind.ValueType(column.kind.value)
            fill(column_values, cells)
