"""Hypothesis strategies for the fuzzing and tenant-isolation tests: request messages of any
type built from their protobuf descriptors, and raw bytes that do not quite decode as one.

`messages(descriptor, vocabulary)` fills random fields of any message: strings from the
vocabulary a field's name suggests (workspace ids, tables, columns, tokens, JSON, paths)
or random and huge text, integers at and beyond their bounds, NaN and infinities in
floating-point fields, unknown enum numbers, out-of-range timestamps, random oneof
members, and now and then a filter, value or struct nested far deeper than the server
allows (or than protobuf decodes). `raw_requests` turns such messages into bytes that
are not what they seem: truncated, with a flipped byte, with invalid UTF-8 in a string
field at any depth, with a length that runs past the end, with unknown fields, or plain
random bytes.
"""

from __future__ import annotations

import base64
import functools
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

# Workspace ids of the fuzzing tests: derived, so a run is reproducible, and in a
# namespace no other test uses, so whatever a fuzzed write does stays there.
FUZZ_NAMESPACE = uuid.UUID("5f0e6c1a-3c1e-4a8e-9d77-0f2a9b7c4d11")


def workspace_in_namespace(name: str) -> str:
    """A workspace id of the fuzzing tests' own namespace."""
    return str(uuid.uuid5(FUZZ_NAMESPACE, name))


@dataclass(frozen=True)
class Vocabulary:
    """Names that get a fuzzed request past the first checks and into the server's depths."""

    workspaces: tuple[str, ...]
    """Workspace ids requests may name (the tests' own); malformed ones are added."""
    tables: tuple[str, ...]
    """Table names: exposed ones, and names of things no request may reach."""
    columns: tuple[str, ...]
    """Column names: real ones, odd ones, and names no table has."""
    job_ids: tuple[str, ...] = ()
    """Ids of jobs that exist, for GetJob, WatchJob and CancelJob."""


# Text that has tripped parsers, quoting and encoders somewhere.
NASTY_TEXT = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "'",
    '"',
    "\\",
    "%",
    "_",
    "*",
    "..",
    "'; DROP TABLE campaigns; --",
    '" OR 1=1 --',
    "$1",
    "NULL",
    "null",
    "NaN",
    "-Infinity",
    "\u202eevil",
    "é",
    "😀",
    "\ufeff",
    "\u0000\u0001\u001f",
    "a" * 256,
    "{time}",
    "%s%n%x",
)
MALFORMED_UUIDS = (
    "",
    "not-a-uuid",
    "00000000-0000-0000-0000-00000000000",
    "00000000-0000-0000-0000-0000000000000",
    "00000000-0000-0000-0000-00000000000g",
    "00000000000000000000000000000000",
    "{00000000-0000-0000-0000-000000000000",
    "urn:uuid:",
    "*",
    "' OR ''='",
)
JSON_TEXT = (
    "{}",
    "[]",
    "null",
    "1",
    '"x"',
    '{"tier": "gold"}',
    '{"a": {"b": {"c": [1, 2, {"d": null}]}}}',
    '{"\\u0000": 1}',
    '{"x": "\\ud800"}',
    "[" * 600 + "]" * 600,
    '{"a": 1e400}',
    "NaN",
    "{",
    "{'single': 'quotes'}",
    "",
)
DECIMAL_TEXT = (
    "0",
    "-0",
    "1.5",
    "NaN",
    "Infinity",
    "-Infinity",
    "sNaN",
    "1e1000000",
    "1e-1000000",
    "9" * 200,
    "0x10",
    "1_000",
    " 1 ",
    "",
)
PATHS = (
    "",
    "backup.rfb",
    "../escape.rfb",
    "/etc/passwd",
    "a/../../b",
    "dir/",
    "nul\x00byte",
    "{time}.rfb",
    "{time}/{time}",
    "." * 300,
)
CRON_TEXT = ("", "* * * * *", "61 * * * *", "@daily", "nightly", "a" * 100)
INT32_EDGES = (0, 1, -1, 2, 100, 1000, 1001, 4096, 4 << 20, 65_535, 2**31 - 1, -(2**31))
INT64_EDGES = (*INT32_EDGES, 2**31, 2**32, 2**53 + 1, 2**63 - 1, -(2**63))
DOUBLE_EDGES = (
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    1e20,
)
FLOAT_EDGES = (math.nan, math.inf, -math.inf, -0.0, 1e-45, 3.4028234663852886e38)
# Seconds of a Timestamp at and beyond the range it may hold (0001-01-01 to 9999-12-31).
TIMESTAMP_SECONDS = (
    -62135596800,
    -62135596801,
    253402300799,
    253402300800,
    0,
    -1,
    2**63 - 1,
    -(2**63),
)
# Byte sequences that are not UTF-8: a bad continuation, a lone high byte, an encoded
# surrogate, an overlong slash, a code point past U+10FFFF, a stray continuation byte.
INVALID_UTF8 = (
    b"\xc3\x28",
    b"\xff",
    b"\xed\xa0\x80",
    b"\xc0\xaf",
    b"\xf4\x90\x80\x80",
    b"a\x80b",
)
REPEATED_SIZES = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(4, 12))


def _int_range(field: FieldDescriptor) -> tuple[int, int]:
    fd = FieldDescriptor
    if field.type in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32, fd.TYPE_ENUM):
        return -(2**31), 2**31 - 1
    if field.type in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return 0, 2**32 - 1
    if field.type in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return 0, 2**64 - 1
    return -(2**63), 2**63 - 1


def _integers(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _int_range(field)
    edges = [e for e in INT64_EDGES if low <= e <= high]
    container = getattr(field.containing_type, "full_name", "")
    if field.name == "seconds" and container == "google.protobuf.Timestamp":
        edges = [*edges, *TIMESTAMP_SECONDS]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def huge_text() -> st.SearchStrategy[str]:
    """One character repeated up to a million times (up to 4 MB of UTF-8)."""
    return st.builds(
        lambda c, n: c * n,
        st.sampled_from(["x", "é", "😀", "'", "\x00"]),
        st.sampled_from([10_000, 100_000, 1_000_000]),
    )


@st.composite
def _text(draw: st.DrawFn) -> str:
    roll = draw(st.integers(0, 31))
    if roll < 12:
        return draw(st.sampled_from(NASTY_TEXT))
    if roll < 31:
        return draw(st.text(max_size=24))
    return draw(huge_text())


def text() -> st.SearchStrategy[str]:
    """Any text: nasty, random, or (one in 32) huge. Never a lone surrogate: protobuf refuses
    to hold one, so invalid UTF-8 goes in through `raw_requests`."""
    return _text()


def _uuid_text() -> st.SearchStrategy[str]:
    return st.one_of(st.uuids().map(str), st.sampled_from(MALFORMED_UUIDS))


def workspace_ids(vocabulary: Vocabulary) -> st.SearchStrategy[str]:
    """Mostly the tests' own workspace ids, in every spelling `uuid.UUID` accepts, or not ids."""
    own = st.sampled_from(vocabulary.workspaces)
    spelled = own.flatmap(
        lambda w: st.sampled_from(
            [w, w.upper(), "{" + w + "}", "urn:uuid:" + w, w.replace("-", ""), " " + w, w + "\x00"]
        )
    )
    return st.one_of(own, own, spelled, st.sampled_from(MALFORMED_UUIDS), huge_text())


def tokens() -> st.SearchStrategy[str]:
    """Page and resume tokens: base64 of random bytes (both alphabets), junk, huge."""
    raw = st.binary(max_size=80)
    return st.one_of(
        raw.map(lambda b: base64.urlsafe_b64encode(b).decode()),
        raw.map(lambda b: base64.urlsafe_b64encode(b).decode().rstrip("=")),
        raw.map(lambda b: base64.b64encode(b).decode()),
        text(),
    )


def _strings_for(field: FieldDescriptor, vocabulary: Vocabulary) -> st.SearchStrategy[str]:
    """Strings for a field, by what its name says it holds."""
    name = field.name
    tables = st.sampled_from(vocabulary.tables)
    columns = st.sampled_from(vocabulary.columns)
    if name == "workspace_id":
        return workspace_ids(vocabulary)
    if name in ("table", "tables", "source_table") or (
        name == "name" and getattr(field.containing_type, "name", "") == "BackupTable"
    ):
        return st.one_of(tables, tables, text())
    if name in (
        "column",
        "columns",
        "returning",
        "conflict_columns",
        "update_columns",
        "key",
        "column_types",
    ):
        return st.one_of(columns, columns, text())
    if name in ("job_id", "uuid_value", "ids", "source_row_ids", "id"):
        known = st.sampled_from(vocabulary.job_ids) if vocabulary.job_ids else _uuid_text()
        return st.one_of(_uuid_text(), known, text())
    if name in ("page_token", "resume_token"):
        return tokens()
    if name in ("json_value", "metadata_contains"):
        return st.one_of(st.sampled_from(JSON_TEXT), text())
    if name == "decimal_value":
        return st.one_of(st.sampled_from(DECIMAL_TEXT), text())
    if name == "path":
        return st.one_of(st.sampled_from(PATHS), text())
    if name in ("cron", "schedule"):
        return st.one_of(st.sampled_from(CRON_TEXT), text())
    if name in ("sha256", "snapshot_time"):
        return st.one_of(st.text("0123456789abcdef", min_size=64, max_size=64), text())
    return text()


def _scalars(field: FieldDescriptor, vocabulary: Vocabulary) -> st.SearchStrategy[Any]:
    fd = FieldDescriptor
    kind = field.type
    if kind == fd.TYPE_STRING:
        return _strings_for(field, vocabulary)
    if kind == fd.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from([b"", b"\x00" * 32, b"PGCOPY\n\xff\r\n\x00"]),
            st.sampled_from([100_000, 1_000_000]).map(lambda n: b"\xff" * n),
        )
    if kind == fd.TYPE_BOOL:
        return st.booleans()
    if kind == fd.TYPE_DOUBLE:
        return st.one_of(st.sampled_from(DOUBLE_EDGES), st.floats())
    if kind == fd.TYPE_FLOAT:
        # Embedding components: mostly finite, so a vector now and then is a valid one.
        finite = st.floats(-1e3, 1e3, width=32)
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32), finite, finite, finite)
    if kind == fd.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        # proto3 enums are open: any int32 is a valid wire value the server must handle.
        return st.one_of(st.sampled_from(known), st.sampled_from(known), _integers(field))
    return _integers(field)


# Fields most requests need to get past the first checks: set seven times in eight, so
# more requests reach the database than if every field were a coin toss.
USUALLY_SET = frozenset(
    {
        "workspace_id",
        "table",
        "column",
        "operator",
        "value",
        "spec",
        "scope",
        "embedding",
        "top_k",
        "records",
        "kind",
        "id",
        "rows",
        "job_id",
        "filters",
        "filter",
        "format_version",
    }
)


def _present(field: FieldDescriptor) -> st.SearchStrategy[bool]:
    if field.name in USUALLY_SET:
        return st.integers(0, 7).map(bool)
    return st.booleans()


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


# ---------------------------------------------------------------------------
# Deep nesting
#
# Built as bytes: upb copies and parses messages with a depth limit of 100, so a
# message nested deeper can exist only on the wire.


def _field_number(descriptor: Descriptor | None, name: str) -> int:
    assert descriptor is not None
    number: int = descriptor.fields_by_name[name].number
    return number


def deep_bytes(descriptor: Descriptor, levels: int) -> bytes | None:
    """A `descriptor` message nested `levels` times in itself (through its nesting field and
    the message in between), serialized; None for types that do not nest."""
    cls = message_factory.GetMessageClass(descriptor)
    name = descriptor.full_name
    if name == "raptorflow.data.v1.Filter":
        leaf: Any = cls()
        leaf.condition.column = "id"
        leaf.condition.operator = 8  # IS NULL
        current: bytes = leaf.SerializeToString()
        group = descriptor.fields_by_name["group"]
        negation = descriptor.fields_by_name["negation"]
        for level in range(levels):
            if level % 2:
                inner = length_delimited(_field_number(negation.message_type, "filter"), current)
                current = length_delimited(negation.number, inner)
            else:
                operator = _field_number(group.message_type, "operator")
                inner = (
                    _varint(operator << 3)
                    + b"\x01"
                    + length_delimited(_field_number(group.message_type, "filters"), current)
                )
                current = length_delimited(group.number, inner)
        return current
    if name == "raptorflow.data.v1.Value":
        current = cls(int64_value=1).SerializeToString()
        array = descriptor.fields_by_name["array_value"]
        for _ in range(levels):
            inner = length_delimited(_field_number(array.message_type, "values"), current)
            current = length_delimited(array.number, inner)
        return current
    if name == "google.protobuf.Struct":
        current = b""
        fields = descriptor.fields_by_name["fields"]
        assert fields.message_type is not None
        value = fields.message_type.fields_by_name["value"].message_type
        struct_value = _field_number(value, "struct_value")
        for level in range(levels):
            entry = length_delimited(1, f"k{level}".encode()) + length_delimited(
                2, length_delimited(struct_value, current)
            )
            current = length_delimited(fields.number, entry)
        return current
    return None


# Self-nesting types get as deep as protobuf still decodes inside a request (about
# 100 message levels: two or three per level of these types) in generated messages,
# and far deeper in raw bytes.
DECODABLE_LEVELS = 30
UNDECODABLE_LEVELS = (60, 200)


# ---------------------------------------------------------------------------
# Messages


@functools.cache
def messages(
    descriptor: Descriptor, vocabulary: Vocabulary, depth: int = 4
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with random fields set, nested up to `depth` levels
    (and now and then far deeper, for filters, values and structs)."""
    generic = _filled(descriptor, vocabulary, depth)
    if deep_bytes(descriptor, 1) is None:
        return generic
    cls = message_factory.GetMessageClass(descriptor)

    def nested(levels: int) -> Message:
        return cls.FromString(deep_bytes(descriptor, levels) or b"")

    deep = st.integers(2, DECODABLE_LEVELS).map(nested)
    return st.one_of(generic, generic, generic, deep)


def _filled(descriptor: Descriptor, vocabulary: Vocabulary, depth: int) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        chosen: set[str] = set()
        for oneof in descriptor.oneofs:
            pick = draw(st.sampled_from([None, *oneof.fields]))
            if pick is not None:
                chosen.add(pick.name)
        for field in descriptor.fields:
            if field.containing_oneof is not None:
                if field.name not in chosen:
                    continue
            elif not draw(_present(field)):
                continue
            if field.message_type is not None and depth <= 0 and not _is_map(field):
                continue
            _fill(draw, message, field, vocabulary, depth)
        return message

    return build()


def _fill(
    draw: st.DrawFn, message: Message, field: FieldDescriptor, vocabulary: Vocabulary, depth: int
) -> None:
    name = field.name
    if _is_map(field):
        entry = field.message_type
        assert entry is not None
        key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
        target = getattr(message, name)
        for _ in range(draw(st.integers(0, 3))):
            key = draw(_scalars(key_field, vocabulary))
            if value_field.message_type is not None:
                if depth <= 0:
                    continue
                target[key].CopyFrom(
                    draw(messages(value_field.message_type, vocabulary, depth - 1))
                )
            else:
                target[key] = draw(_scalars(value_field, vocabulary))
        return
    if field.message_type is not None:
        sub = messages(field.message_type, vocabulary, depth - 1)
        if field.is_repeated:
            container = getattr(message, name)
            for _ in range(draw(REPEATED_SIZES)):
                container.add().CopyFrom(draw(sub))
        else:
            getattr(message, name).CopyFrom(draw(sub))
        return
    if field.is_repeated:
        getattr(message, name).extend(draw(st.lists(_scalars(field, vocabulary), max_size=40)))
    else:
        setattr(message, name, draw(_scalars(field, vocabulary)))


# ---------------------------------------------------------------------------
# Raw bytes


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(number: int, payload: bytes) -> bytes:
    """Field `number` with wire type 2 (string, bytes, message) holding `payload`."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def field_paths(
    descriptor: Descriptor, wanted: Callable[[FieldDescriptor], bool], depth: int = 4
) -> list[tuple[FieldDescriptor, ...]]:
    """Paths through message fields to every field `wanted` picks, at most `depth` long."""
    paths: list[tuple[FieldDescriptor, ...]] = []

    def walk(current: Descriptor, prefix: tuple[FieldDescriptor, ...]) -> None:
        for field in current.fields:
            if wanted(field):
                paths.append((*prefix, field))
            elif field.message_type is not None and len(prefix) + 1 < depth:
                walk(field.message_type, (*prefix, field))

    walk(descriptor, ())
    return paths


def _is_string(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_STRING


def _nests(field: FieldDescriptor) -> bool:
    return field.message_type is not None and deep_bytes(field.message_type, 1) is not None


def at_path(path: Sequence[FieldDescriptor], payload: bytes) -> bytes:
    """Bytes that, appended to a message, merge `payload` into the field at `path`."""
    for field in reversed(path):
        payload = length_delimited(field.number, payload)
    return payload


def _flip(data: bytes, position: int, mask: int) -> bytes:
    if not data:
        return bytes([mask])
    position %= len(data)
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


def raw_requests(descriptor: Descriptor, vocabulary: Vocabulary) -> st.SearchStrategy[bytes]:
    """Bytes meant as a `descriptor` message that mostly do not decode as one, or decode to
    something no generated message holds."""
    serialized = messages(descriptor, vocabulary, 3).map(lambda m: m.SerializeToString())
    mutations: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=64),
        st.builds(
            lambda data, cut: data[: cut % (len(data) + 1)] if data else b"\x0a",
            serialized,
            st.integers(0, 2**16),
        ),
        st.builds(_flip, serialized, st.integers(0, 2**16), st.integers(1, 255)),
        # A length-delimited field whose length runs past the end of the message.
        st.builds(
            lambda data, number, claimed: data + _varint(number << 3 | 2) + _varint(claimed),
            serialized,
            st.integers(1, 20),
            st.sampled_from([1, 127, 2**31 - 1, 2**32, 2**63]),
        ),
        # Unknown fields of every wire type: they decode and must be ignored.
        st.builds(
            lambda data, number, wire, body: data + _varint(number << 3 | wire) + body,
            serialized,
            st.sampled_from([99, 1000, 2**29 - 1]),
            st.sampled_from([0, 1, 2, 5]),
            st.sampled_from([b"\x01", b"\x00" * 8, b"\x03abc", b"\x00" * 4]),
        ),
        # Wire types 3, 4 (groups), 6 and 7 (none) where a field is expected.
        st.builds(
            lambda data, number, wire: data + _varint(number << 3 | wire),
            serialized,
            st.integers(1, 20),
            st.sampled_from([3, 4, 6, 7]),
        ),
    ]
    strings = field_paths(descriptor, _is_string)
    if strings:
        mutations.append(
            st.builds(
                lambda data, path, bad: data + at_path(path, bad),
                serialized,
                st.sampled_from(strings),
                st.sampled_from(INVALID_UTF8),
            )
        )
    nesting = field_paths(descriptor, _nests, depth=3)
    if nesting:
        # A filter, value or struct nested deeper than protobuf decodes.
        mutations.append(
            st.builds(
                lambda data, path, levels: (
                    data + at_path(path, deep_bytes(path[-1].message_type, levels) or b"")
                ),
                serialized,
                st.sampled_from(nesting),
                st.integers(*UNDECODABLE_LEVELS),
            )
        )
    return st.one_of(*mutations)


def requests(descriptor: Descriptor, vocabulary: Vocabulary) -> st.SearchStrategy[bytes]:
    """One request's bytes: a well-formed random message (about two in three), or raw bytes."""
    serialized = messages(descriptor, vocabulary).map(lambda m: m.SerializeToString())
    raw = raw_requests(descriptor, vocabulary)
    # Drawn by a number, not st.one_of: hypothesis favours the branch with more to explore,
    # and the raw one has many, so one_of would send mostly bytes that never decode.
    return st.integers(0, 2).flatmap(lambda roll: raw if roll == 2 else serialized)


def request_streams(
    descriptor: Descriptor, vocabulary: Vocabulary, streaming: bool
) -> st.SearchStrategy[list[bytes]]:
    """What a call sends: one request, or for a request stream one to three."""
    return st.lists(requests(descriptor, vocabulary), min_size=1, max_size=3 if streaming else 1)
