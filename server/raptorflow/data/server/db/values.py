"""Conversion between `raptorflow.data.v1.Value` and the Python values asyncpg binds and returns.

Input is converted to the type of the column it is written to or compared with,
so a mismatch is reported with the request field that carried it; output is
converted by column kind, with one encoder function per column chosen once per
statement rather than per cell.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
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

Encoder = Callable[[object], value_pb2.Value]


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


def _null() -> value_pb2.Value:
    return value_pb2.Value(null_value=struct_pb2.NULL_VALUE)


def _unrepresentable(column_name: str, what: str) -> ServiceError:
    return ServiceError(
        Code.OUT_OF_RANGE,
        "OUT_OF_RANGE",
        f"column {column_name!r} holds {what}",
        metadata={"column": column_name},
    )


def _timestamp(column_name: str) -> Encoder:
    def encode(v: object) -> value_pb2.Value:
        if v is None:
            return _null()
        assert isinstance(v, PgTimestamp)
        if v.microseconds in (TIMESTAMP_INFINITY, TIMESTAMP_MINUS_INFINITY):
            raise _unrepresentable(
                column_name, "an infinite timestamp, which has no Timestamp form"
            )
        seconds, micros = divmod(v.microseconds, 1_000_000)
        seconds += _PG_EPOCH_SECONDS
        if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
            raise _unrepresentable(column_name, "a timestamp outside the years 1 to 9999")
        return value_pb2.Value(
            timestamp_value=timestamp_pb2.Timestamp(seconds=seconds, nanos=micros * 1000)
        )

    return encode


def _date(column_name: str) -> Encoder:
    def encode(v: object) -> value_pb2.Value:
        if v is None:
            return _null()
        assert isinstance(v, PgDate)
        if v.days in (DATE_INFINITY, DATE_MINUS_INFINITY):
            raise _unrepresentable(column_name, "an infinite date, which has no Date form")
        try:
            d = _PG_EPOCH_DATE + dt.timedelta(days=v.days)
        except OverflowError:
            raise _unrepresentable(column_name, "a date outside the years 1 to 9999") from None
        return value_pb2.Value(date_value=value_pb2.Date(year=d.year, month=d.month, day=d.day))

    return encode


def _element_encoder(kind: Kind | None) -> Callable[[object], value_pb2.Value]:
    match kind:
        case Kind.BOOL:
            return lambda v: value_pb2.Value(bool_value=v)  # type: ignore[arg-type]
        case Kind.INT64:
            return lambda v: value_pb2.Value(int64_value=v)  # type: ignore[arg-type]
        case Kind.DOUBLE:
            return lambda v: value_pb2.Value(double_value=v)  # type: ignore[arg-type]
        case Kind.DECIMAL:
            # Positional notation, as PostgreSQL prints numeric ("0.0000001", not "1E-7").
            return lambda v: value_pb2.Value(decimal_value=format(v, "f"))
        case Kind.STRING:
            return lambda v: value_pb2.Value(string_value=v)  # type: ignore[arg-type]
        case Kind.BYTES:
            return lambda v: value_pb2.Value(bytes_value=v)  # type: ignore[arg-type]
        case Kind.UUID:
            return lambda v: value_pb2.Value(uuid_value=str(v))
        case Kind.JSON:
            return lambda v: value_pb2.Value(json_value=v)  # type: ignore[arg-type]
    raise AssertionError(f"no element encoder for {kind}")


def _nullable(encode: Callable[[object], value_pb2.Value]) -> Encoder:
    def encode_or_null(v: object) -> value_pb2.Value:
        return _null() if v is None else encode(v)

    return encode_or_null


def _parse_pgvector(text: str) -> list[float]:
    inner = text.strip()[1:-1]
    return [float(x) for x in inner.split(",")] if inner else []


def encoder(column: Column) -> Encoder:
    """The function that turns this column's asyncpg values into `Value`s."""
    if column.kind is Kind.VECTOR:
        if column.as_text:
            return _nullable(
                lambda v: value_pb2.Value(
                    vector_value=value_pb2.FloatVector(values=_parse_pgvector(str(v)))
                )
            )
        return _nullable(
            lambda v: value_pb2.Value(vector_value=value_pb2.FloatVector(values=v))  # type: ignore[arg-type]
        )
    if column.as_text:
        return _nullable(lambda v: value_pb2.Value(string_value=str(v)))
    if column.kind is Kind.TIMESTAMP:
        return _timestamp(column.name)
    if column.kind is Kind.DATE:
        return _date(column.name)
    if column.kind is Kind.ARRAY:
        if column.element_kind is Kind.TIMESTAMP:
            element = _timestamp(column.name)
        elif column.element_kind is Kind.DATE:
            element = _date(column.name)
        else:
            element = _nullable(_element_encoder(column.element_kind))

        def encode_array(v: object) -> value_pb2.Value:
            assert isinstance(v, Sequence)
            return value_pb2.Value(array_value=value_pb2.ArrayValue(values=[element(x) for x in v]))

        return _nullable(encode_array)
    return _nullable(_element_encoder(column.kind))


def encode_rows(
    columns: Sequence[Column], records: Sequence[Any], width: int | None = None
) -> list[value_pb2.Row]:
    """Rows of `Value`s from asyncpg records; `width` keeps only the leading columns."""
    encoders = [encoder(c) for c in columns[: width if width is not None else len(columns)]]
    return [
        value_pb2.Row(values=[encode(cell) for encode, cell in zip(encoders, record, strict=False)])
        for record in records
    ]


def row_set(columns: Sequence[Column], records: Sequence[Any]) -> value_pb2.RowSet:
    return value_pb2.RowSet(columns=[c.name for c in columns], rows=encode_rows(columns, records))
