"""Conversion between `raptorflow.data.v1.Value` and the Python values asyncpg binds and returns.

Input is converted to the type of the column it is written to or compared with,
so a mismatch is reported with the request field that carried it; output is
written in place into the response by one setter function per column kind,
chosen once per statement and never built per call.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from raptorflow.data.server.db.catalog import INT_BOUNDS, Column, Kind
from raptorflow.data.server.db.codecs import (
    DATE_INFINITY,
    DATE_MINUS_INFINITY,
    TIMESTAMP_INFINITY,
    TIMESTAMP_MINUS_INFINITY,
    PgDate,
    PgTimestamp,
)
from raptorflow.data.server.errors import Code, ServiceError, invalid_argument
from raptorflow.data.v1 import value_pb2

_PG_EPOCH_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z, where PostgreSQL counts from
_PG_EPOCH_DATE = dt.date(2000, 1, 1)
_MIN_SECONDS = -62135596800  # 0001-01-01T00:00:00Z, the proto Timestamp range
_MAX_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


def _mismatch(path: str, column: Column, got: str) -> ServiceError:
    return invalid_argument(
        path,
        f"column {column.name!r} ({column.database_type}) does not take a {got}",
        reason="INVALID_VALUE",
        metadata={"column": column.name},
    )


def _out_of_range(path: str, description: str) -> ServiceError:
    return invalid_argument(path, description, reason="OUT_OF_RANGE", code=Code.OUT_OF_RANGE)


def parse_uuid(text: str, path: str) -> uuid.UUID:
    """A UUID from text, or INVALID_ARGUMENT naming `path`."""
    try:
        return uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise invalid_argument(path, f"not a UUID: {text[:64]!r}", reason="INVALID_UUID") from None


def timestamp_to_db(ts: timestamp_pb2.Timestamp, path: str) -> PgTimestamp:
    """The instant as PostgreSQL stores it; for `timestamp` columns, its UTC wall-clock time."""
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise _out_of_range(path, "timestamp outside 0001-01-01 to 9999-12-31")
    if ts.nanos % 1000:
        raise invalid_argument(
            path,
            "timestamp has sub-microsecond precision, which PostgreSQL cannot store",
            reason="INVALID_VALUE",
        )
    return PgTimestamp((ts.seconds - _PG_EPOCH_SECONDS) * 1_000_000 + ts.nanos // 1000)


def _text(value: str, path: str) -> str:
    if "\x00" in value:
        raise invalid_argument(path, "text cannot contain NUL characters", reason="INVALID_VALUE")
    return value


def _scalar_to_db(
    kind: Kind, type_name: str, column: Column, value: value_pb2.Value, path: str
) -> object:
    which = value.WhichOneof("kind")
    if which is None:
        raise invalid_argument(path, "a value must set exactly one kind", reason="INVALID_VALUE")
    if which == "null_value":
        return None
    if column.as_text:
        if which != "string_value":
            raise _mismatch(path, column, which)
        return _text(value.string_value, path)
    match kind:
        case Kind.BOOL if which == "bool_value":
            return value.bool_value
        case Kind.INT64 if which == "int64_value":
            low, high = INT_BOUNDS.get(type_name, INT_BOUNDS["int8"])
            if not low <= value.int64_value <= high:
                raise _out_of_range(
                    path, f"{value.int64_value} does not fit {column.database_type}"
                )
            return value.int64_value
        case Kind.DOUBLE if which == "double_value":
            return value.double_value
        case Kind.DOUBLE if which == "int64_value":
            return float(value.int64_value)
        case Kind.DECIMAL if which in ("decimal_value", "string_value"):
            text = getattr(value, which)
            try:
                return decimal.Decimal(text)
            except decimal.InvalidOperation:
                raise invalid_argument(
                    path, f"not a decimal number: {text[:64]!r}", reason="INVALID_VALUE"
                ) from None
        case Kind.DECIMAL if which == "int64_value":
            return decimal.Decimal(value.int64_value)
        case Kind.DECIMAL if which == "double_value":
            return decimal.Decimal(repr(value.double_value))
        case Kind.STRING if which == "string_value":
            return _text(value.string_value, path)
        case Kind.BYTES if which == "bytes_value":
            return value.bytes_value
        case Kind.TIMESTAMP if which == "timestamp_value":
            return timestamp_to_db(value.timestamp_value, path)
        case Kind.DATE if which == "date_value":
            d = value.date_value
            try:
                return PgDate((dt.date(d.year, d.month, d.day) - _PG_EPOCH_DATE).days)
            except ValueError as exc:
                raise invalid_argument(
                    path, f"not a valid date: {exc}", reason="INVALID_VALUE"
                ) from None
        case Kind.UUID if which in ("uuid_value", "string_value"):
            return parse_uuid(getattr(value, which), path)
        case Kind.JSON if which == "json_value":
            try:
                json.loads(value.json_value)
            except ValueError:
                raise invalid_argument(
                    path, "not a JSON document", reason="INVALID_VALUE"
                ) from None
            return _text(value.json_value, path)
    raise _mismatch(path, column, which)


def to_db(column: Column, value: value_pb2.Value, path: str) -> object:
    """The Python value asyncpg binds for `value` written to or compared with `column`."""
    which = value.WhichOneof("kind")
    if column.kind is Kind.VECTOR and not column.as_text:
        if which == "vector_value":
            return list(value.vector_value.values)
        if which == "array_value":
            return [
                _scalar_to_db(Kind.DOUBLE, "float4", column, v, f"{path}.array_value.values[{i}]")
                for i, v in enumerate(value.array_value.values)
            ]
    elif column.kind is Kind.VECTOR:  # pgvector's text form
        if which == "vector_value":
            return "[" + ",".join(repr(float(x)) for x in value.vector_value.values) + "]"
    elif column.kind is Kind.ARRAY:
        assert column.element_kind is not None
        if which == "array_value":
            out = []
            for i, element in enumerate(value.array_value.values):
                element_path = f"{path}.array_value.values[{i}]"
                if element.WhichOneof("kind") in ("array_value", "vector_value"):
                    raise invalid_argument(
                        element_path, "nested arrays are not supported", reason="INVALID_VALUE"
                    )
                out.append(
                    _scalar_to_db(
                        column.element_kind, column.element_type_name, column, element, element_path
                    )
                )
            return out
        if which == "vector_value" and column.element_kind is Kind.DOUBLE:
            return [float(x) for x in value.vector_value.values]
    if which in ("array_value", "vector_value") or (
        which != "null_value" and column.kind in (Kind.ARRAY, Kind.VECTOR) and not column.as_text
    ):
        raise _mismatch(path, column, which or "value")
    return _scalar_to_db(column.kind, column.type_name, column, value, path)


# ---------------------------------------------------------------------------
# Output
#
# Output values are written in place: each cell is a `Value` added to its row
# (`row.values.add()`), and a setter fills its field. upb copies a message that
# is handed to a constructor or to `append`/`extend`, so building `Value`s first
# and passing them on would copy every cell once more. The setters are plain
# functions chosen by column kind, so nothing is built per call.

Setter = Callable[[value_pb2.Value, Any], None]
"""Fills an empty `Value` from one non-NULL asyncpg value of a column."""


class _Unrepresentable(Exception):
    """A stored value the API has no form for; the caller names the column."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _unrepresentable(column_name: str, what: str) -> ServiceError:
    return ServiceError(
        Code.OUT_OF_RANGE,
        "OUT_OF_RANGE",
        f"column {column_name!r} holds {what}",
        metadata={"column": column_name},
    )


def _set_bool(value: value_pb2.Value, v: Any) -> None:
    value.bool_value = v


def _set_int64(value: value_pb2.Value, v: Any) -> None:
    value.int64_value = v


def _set_double(value: value_pb2.Value, v: Any) -> None:
    value.double_value = v


def _set_decimal(value: value_pb2.Value, v: Any) -> None:
    # Positional notation, as PostgreSQL prints numeric ("0.0000001", not "1E-7").
    value.decimal_value = format(v, "f")


def _set_string(value: value_pb2.Value, v: Any) -> None:
    value.string_value = v


def _set_text(value: value_pb2.Value, v: Any) -> None:
    value.string_value = str(v)


def _set_bytes(value: value_pb2.Value, v: Any) -> None:
    value.bytes_value = v


def _set_uuid(value: value_pb2.Value, v: Any) -> None:
    value.uuid_value = str(v)


def _set_json(value: value_pb2.Value, v: Any) -> None:
    value.json_value = v


def _set_timestamp(value: value_pb2.Value, v: Any) -> None:
    assert isinstance(v, PgTimestamp)
    if v.microseconds in (TIMESTAMP_INFINITY, TIMESTAMP_MINUS_INFINITY):
        raise _Unrepresentable("an infinite timestamp, which has no Timestamp form")
    seconds, micros = divmod(v.microseconds, 1_000_000)
    seconds += _PG_EPOCH_SECONDS
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise _Unrepresentable("a timestamp outside the years 1 to 9999")
    timestamp = value.timestamp_value
    timestamp.seconds = seconds
    timestamp.nanos = micros * 1000


def _set_date(value: value_pb2.Value, v: Any) -> None:
    assert isinstance(v, PgDate)
    if v.days in (DATE_INFINITY, DATE_MINUS_INFINITY):
        raise _Unrepresentable("an infinite date, which has no Date form")
    try:
        d = _PG_EPOCH_DATE + dt.timedelta(days=v.days)
    except OverflowError:
        raise _Unrepresentable("a date outside the years 1 to 9999") from None
    date = value.date_value
    date.year, date.month, date.day = d.year, d.month, d.day


def _set_vector(value: value_pb2.Value, v: Any) -> None:
    vector = value.vector_value
    vector.SetInParent()  # an empty vector is still a vector, not an unset value
    vector.values.extend(v)


def _parse_pgvector(text: str) -> list[float]:
    inner = text.strip()[1:-1]
    return [float(x) for x in inner.split(",")] if inner else []


def _set_pgvector_text(value: value_pb2.Value, v: Any) -> None:
    _set_vector(value, _parse_pgvector(str(v)))


_SETTERS: Mapping[Kind, Setter] = {
    Kind.BOOL: _set_bool,
    Kind.INT64: _set_int64,
    Kind.DOUBLE: _set_double,
    Kind.DECIMAL: _set_decimal,
    Kind.STRING: _set_string,
    Kind.BYTES: _set_bytes,
    Kind.UUID: _set_uuid,
    Kind.JSON: _set_json,
    Kind.TIMESTAMP: _set_timestamp,
    Kind.DATE: _set_date,
}


def _array_setter(set_element: Setter) -> Setter:
    def set_array(value: value_pb2.Value, v: Any) -> None:
        assert isinstance(v, Sequence)
        array = value.array_value
        array.SetInParent()  # an empty array is still an array, not an unset value
        elements = array.values
        for x in v:
            element = elements.add()
            if x is None:
                element.null_value = struct_pb2.NULL_VALUE
            else:
                set_element(element, x)

    return set_array


# Built once: an array column's setter only depends on its element kind.
_ARRAY_SETTERS: Mapping[Kind, Setter] = {
    kind: _array_setter(set_element) for kind, set_element in _SETTERS.items()
}


def setter(column: Column) -> Setter:
    """The function that writes this column's non-NULL asyncpg values into a `Value`."""
    if column.kind is Kind.VECTOR:
        return _set_pgvector_text if column.as_text else _set_vector
    if column.as_text:
        return _set_text
    if column.kind is Kind.ARRAY:
        assert column.element_kind is not None  # the catalog sets it on every ARRAY column
        return _ARRAY_SETTERS[column.element_kind]
    return _SETTERS[column.kind]


def _fill(value: value_pb2.Value, column: Column, set_value: Setter, cell: Any) -> None:
    """Fills `value` from one cell; NULL is the same for every kind, so it is handled here."""
    if cell is None:
        value.null_value = struct_pb2.NULL_VALUE
        return
    try:
        set_value(value, cell)
    except _Unrepresentable as exc:
        raise _unrepresentable(column.name, exc.what) from None


def to_value(column: Column, cell: Any) -> value_pb2.Value:
    """One asyncpg value of `column` as a `Value`."""
    value = value_pb2.Value()
    _fill(value, column, setter(column), cell)
    return value


def encode_rows(
    rows: RepeatedCompositeFieldContainer[value_pb2.Row],
    columns: Sequence[Column],
    records: Sequence[Any],
    width: int | None = None,
) -> None:
    """Appends one `Row` per asyncpg record to `rows`; `width` keeps only the leading columns."""
    shown = columns[:width] if width is not None else columns
    writers = [(column, setter(column)) for column in shown]
    for record in records:
        cells = rows.add().values
        # zip stops at the shorter: records may carry trailing sort keys beyond `width`.
        for (column, set_value), cell in zip(writers, record, strict=False):
            _fill(cells.add(), column, set_value, cell)


def row_set(columns: Sequence[Column], records: Sequence[Any]) -> value_pb2.RowSet:
    result = value_pb2.RowSet()
    result.columns.extend(c.name for c in columns)
    encode_rows(result.rows, columns, records)
    return result
