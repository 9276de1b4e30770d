"""Conversion between Python values and the service's typed `Value` messages."""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Final, TypeAlias, cast
from uuid import UUID

from google.protobuf import struct_pb2
from raptorflow.data.v1 import value_pb2

JsonValue: TypeAlias = (
    bool | int | float | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"] | None
)
"""A parsed JSON document, as `json.loads` returns it."""

PyValue: TypeAlias = (
    bool
    | int
    | float
    | str
    | bytes
    | datetime
    | date
    | UUID
    | Decimal
    | Sequence["PyValue"]
    | Mapping[str, JsonValue]
    | None
)
"""A cell value as the client returns it.

Timestamps are aware datetimes in UTC, decimals `Decimal`, JSON documents
parsed, arrays and vectors lists. Sequence and Mapping rather than list and
dict, so that a row read back type-checks as input to insert or update.
"""

Row: TypeAlias = dict[str, PyValue]
"""One row, by column name, in the column order of the response."""


@dataclass(frozen=True)
class Json:
    """Marks a value as a JSON document, for `json`/`jsonb` columns.

    A dict converts to JSON by itself; a list or a string would otherwise be sent
    as an array or as text, so wrap those: ``Json(["a", "b"])``, ``Json("text")``.
    """

    value: object
    """Anything `json.dumps` accepts."""


@dataclass(frozen=True, init=False)
class Vector:
    """Marks a sequence of floats as a vector of 32-bit floats, for embedding columns."""

    values: tuple[float, ...]
    """The components, in order."""

    def __init__(self, values: Iterable[float]) -> None:
        # Copied into a tuple so that later changes to the caller's list (or
        # numpy array) do not change a query already built.
        object.__setattr__(self, "values", tuple(float(v) for v in values))


ScalarLike: TypeAlias = (
    bool
    | int
    | float
    | str
    | bytes
    | bytearray
    | memoryview
    | datetime
    | date
    | UUID
    | Decimal
    | Json
    | Vector
    | Mapping[str, object]
    | None
)
"""A Python value that converts to one `Value` of a scalar kind (or JSON, or vector)."""

ValueLike: TypeAlias = ScalarLike | Sequence["ValueLike"]
"""A Python value that converts to a `Value`; a list or tuple becomes an array.

Arrays are one-dimensional: a nested list is rejected with ValueError when
converted, as the service rejects nested arrays.
"""

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def json_text(obj: object) -> str:
    """Compact JSON text of `obj`, as sent for json/jsonb values and JSON filters."""
    # allow_nan=False: NaN and Infinity are not JSON (RFC 8259) and PostgreSQL
    # rejects them, so fail here with the Python traceback instead.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _timestamp_value(moment: datetime) -> value_pb2.Value:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"naive datetime {moment.isoformat()} has no time zone, so the instant it "
            "means is ambiguous; pass an aware datetime, for example "
            "moment.replace(tzinfo=timezone.utc) if it is in UTC"
        )
    # Integer arithmetic on the timedelta keeps every microsecond, which a
    # float timestamp() would round away for dates far from 1970.
    delta = moment - _EPOCH
    value = value_pb2.Value()
    value.timestamp_value.seconds = delta.days * 86_400 + delta.seconds
    value.timestamp_value.nanos = delta.microseconds * 1_000
    return value


def _scalar(obj: object) -> value_pb2.Value | None:
    """The Value for anything but a list or tuple, or None for an unsupported type."""
    if obj is None:
        return value_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    # bool before int: True is an int to Python but a boolean to PostgreSQL.
    if isinstance(obj, bool):
        return value_pb2.Value(bool_value=obj)
    if isinstance(obj, int):
        if not _INT64_MIN <= obj <= _INT64_MAX:
            raise OverflowError(
                f"integer {obj} does not fit in 64 bits; send Decimal({obj}) for a numeric column"
            )
        return value_pb2.Value(int64_value=obj)
    if isinstance(obj, float):
        return value_pb2.Value(double_value=obj)
    if isinstance(obj, str):
        return value_pb2.Value(string_value=obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return value_pb2.Value(bytes_value=bytes(obj))
    # datetime before date: a datetime is a date to Python.
    if isinstance(obj, datetime):
        return _timestamp_value(obj)
    if isinstance(obj, date):
        return value_pb2.Value(
            date_value=value_pb2.Date(year=obj.year, month=obj.month, day=obj.day)
        )
    if isinstance(obj, UUID):
        return value_pb2.Value(uuid_value=str(obj))
    if isinstance(obj, Decimal):
        if obj.is_snan():
            raise ValueError("a signalling NaN Decimal cannot be stored; use Decimal('NaN')")
        return value_pb2.Value(decimal_value=str(obj))
    if isinstance(obj, Json):
        return value_pb2.Value(json_value=json_text(obj.value))
    if isinstance(obj, Mapping):
        return value_pb2.Value(json_value=json_text(obj))
    if isinstance(obj, Vector):
        return value_pb2.Value(vector_value=value_pb2.FloatVector(values=obj.values))
    return None


def to_value(obj: ValueLike) -> value_pb2.Value:
    """Converts a Python value to a `Value`.

    None is NULL; bool, int (64-bit), float, str and bytes map to their kinds;
    an aware datetime is a timestamp (microseconds kept), a date a date, a UUID
    a uuid, a Decimal a decimal with every digit; a dict or `Json(...)` is a
    JSON document; `Vector(...)` a float vector; a list or tuple an array.

    Raises TypeError for other types, ValueError for a naive datetime or a
    nested list, OverflowError for an int outside 64 bits.
    """
    value = _scalar(obj)
    if value is not None:
        return value
    if isinstance(obj, Sequence):
        array = value_pb2.Value()
        array.array_value.SetInParent()
        for index, element in enumerate(obj):
            if isinstance(element, Vector) or (
                isinstance(element, Sequence) and not isinstance(element, str | bytes)
            ):
                raise ValueError(
                    f"element {index} of an array is itself a list; arrays are one-dimensional"
                    " (wrap a JSON list in Json(...))"
                )
            converted = _scalar(element)
            if converted is None:
                raise TypeError(_unsupported(element))
            array.array_value.values.append(converted)
        return array
    raise TypeError(_unsupported(obj))


def _unsupported(obj: object) -> str:
    return (
        f"cannot convert {type(obj).__name__} to a Value; for types the API does not model "
        "(time, interval, inet...) send PostgreSQL's text form as a str"
    )


def from_value(value: value_pb2.Value) -> PyValue:
    """Converts a `Value` back to Python, the inverse of `to_value`.

    A timestamp becomes an aware datetime in UTC, a uuid a UUID, a decimal a
    Decimal, a JSON document the parsed object, an array or vector a list.
    Raises ValueError for a Value with no kind set.
    """
    kind = value.WhichOneof("kind")
    match kind:
        case "null_value":
            return None
        case "bool_value":
            return value.bool_value
        case "int64_value":
            return value.int64_value
        case "double_value":
            return value.double_value
        case "string_value":
            return value.string_value
        case "bytes_value":
            return value.bytes_value
        case "timestamp_value":
            stamp = value.timestamp_value
            return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1_000)
        case "date_value":
            return date(value.date_value.year, value.date_value.month, value.date_value.day)
        case "uuid_value":
            return UUID(value.uuid_value)
        case "decimal_value":
            return Decimal(value.decimal_value)
        case "json_value":
            return cast("JsonValue", json.loads(value.json_value))
        case "array_value":
            return [from_value(element) for element in value.array_value.values]
        case "vector_value":
            return list(value.vector_value.values)
        case None:
            raise ValueError("the Value has no kind set")


def canonical_workspace_id(workspace_id: str | UUID) -> str:
    """The canonical text form of a workspace id. Raises ValueError if it is not a UUID."""
    # The service wants the canonical text form; normalising here also turns a
    # malformed id into an immediate ValueError instead of a round trip.
    try:
        return str(workspace_id if isinstance(workspace_id, UUID) else UUID(workspace_id))
    except ValueError as err:
        raise ValueError(f"workspace id {workspace_id!r} is not a UUID") from err
