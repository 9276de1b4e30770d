"""Where a sync stream stands (`Position`), and the signed resume tokens that carry it.

A position is one of two phases:

- snapshot: the stream is reading the rows visible in `snapshot`, table by
  table in request order, each in primary-key order; it has sent everything up
  to table `table_index`, key `key`.
- changes: the stream has applied every change visible in `snapshot` (its
  epoch's `prev`). Mid-epoch, `cur` is the epoch's target snapshot, `high` a
  sequence value no entry visible in `cur` exceeds, and `last_seq` the last
  change-log sequence value sent of the epoch.

In both phases `boundaries` lists where earlier snapshots of this stream were
interrupted (a snapshot resumed under a newer one): rows up to a boundary were
read under that boundary's older snapshot, so their changes since it are still
owed. See `sync/streams.py` for how they are paid.

A token is compact JSON, signed with the key replicas share and bound to the
workspace and the exact, ordered table list of the stream.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from raptorflow.data.server.errors import invalid_argument
from raptorflow.data.server.signing import Signer
from raptorflow.data.v1 import value_pb2

_VERSION = 1
_CONTEXT = b"raptorflow.data.v1.MemorySyncService/resume_token\x00"
FIELD = "resume_token"
REASON = "INVALID_RESUME_TOKEN"


@dataclass(frozen=True)
class Boundary:
    """Rows up to (`table_index`, `key`) in stream order were read under `snapshot`."""

    snapshot: str
    table_index: int
    key: tuple[value_pb2.Value, ...]


@dataclass(frozen=True)
class Position:
    """Where a stream stands; immutable, so pages of a shared read can be keyed by it."""

    snapshot: str
    """pg_snapshot text: the snapshot being read (snapshot phase) or `prev` (changes)."""
    in_snapshot: bool = False
    table_index: int = 0
    """Snapshot phase: the table being read, as an index into the request's tables."""
    key: tuple[value_pb2.Value, ...] = ()
    """Snapshot phase: the primary key of the last row sent of that table; () for none."""
    cur: str = ""
    """Changes phase, mid-epoch: the epoch's target snapshot; '' between epochs."""
    high: int = 0
    """Changes phase, mid-epoch: the sequence's value read just after `cur` was taken. Every
    entry visible in `cur` took its value before, so none is higher: pages stop there."""
    last_seq: int = 0
    """Changes phase, mid-epoch: the last sequence value sent of the epoch."""
    boundaries: tuple[Boundary, ...] = ()

    @property
    def lowest(self) -> str:
        """The oldest snapshot this position still reads changes from."""
        return self.boundaries[0].snapshot if self.boundaries else self.snapshot

    def epoch(self, cur: str, high: int) -> Position:
        """The start of the epoch from here to `cur`."""
        assert not self.in_snapshot
        assert not self.cur
        return dataclasses.replace(self, cur=cur, high=high, last_seq=0)

    def sent(self, last_seq: int) -> Position:
        """Mid-epoch, after the change with sequence value `last_seq`."""
        return dataclasses.replace(self, last_seq=last_seq)

    def epoch_done(self) -> Position:
        """Every change visible in `cur` applied: `prev := cur`, boundaries paid."""
        return Position(snapshot=self.cur)

    def __hash__(self) -> int:
        return hash((self.snapshot, self.in_snapshot, self.table_index, self.cur, self.last_seq))


def covers(later: str, earlier: str) -> bool:
    """True when snapshot `later` sees every transaction `earlier` sees (pg_snapshot text).

    Snapshots of one cluster are ordered in time, but two taken at nearly the same
    moment on two connections may reach the server in either order; an epoch must
    never end at a snapshot older than where it starts.
    """
    later_xmax, later_xip = _parse(later)
    earlier_xmax, earlier_xip = _parse(earlier)
    # Visible in `earlier` (below its xmax, not in progress) but in progress in `later`?
    return later_xmax >= earlier_xmax and all(
        x in earlier_xip for x in later_xip if x < earlier_xmax
    )


def _parse(snapshot: str) -> tuple[int, set[int]]:
    """xmax and the in-progress xids of pg_snapshot text `xmin:xmax:xip,...`."""
    _, xmax, xip = snapshot.split(":")
    return int(xmax), {int(x) for x in xip.split(",") if x}


def _values_text(key: Sequence[value_pb2.Value]) -> str:
    raw = value_pb2.ArrayValue(values=key).SerializeToString(deterministic=True)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _values_of(text: str) -> tuple[value_pb2.Value, ...]:
    holder = value_pb2.ArrayValue()
    holder.ParseFromString(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return tuple(holder.values)


def fingerprint(workspace: str, tables: Sequence[str]) -> str:
    """Binds a token to one workspace and one ordered table list."""
    digest = hashlib.sha256("\x00".join([workspace, *tables]).encode()).digest()[:12]
    return base64.urlsafe_b64encode(digest).decode()


def _invalid(description: str) -> Exception:
    return invalid_argument(FIELD, f"the resume token {description}", reason=REASON)


class ResumeTokens:
    """Issues and verifies resume tokens with the shared key."""

    def __init__(self, key: bytes) -> None:
        self._signer = Signer(key, _CONTEXT)

    def issue(self, workspace: str, bound: str, position: Position) -> str:
        body: dict[str, Any] = {"v": _VERSION, "w": workspace, "f": bound, "s": position.snapshot}
        if position.in_snapshot:
            body["i"] = position.table_index
            if position.key:
                body["k"] = _values_text(position.key)
        if position.cur:
            body["c"] = position.cur
            body["h"] = position.high
            body["q"] = position.last_seq
        if position.boundaries:
            body["b"] = [
                [b.snapshot, b.table_index, _values_text(b.key)] for b in position.boundaries
            ]
        return self._signer.seal(json.dumps(body, separators=(",", ":")).encode())

    def verify(self, token: str, workspace: str, bound: str | None) -> Position:
        """The position in a token of this workspace (and, unless None, this table binding)."""
        raw = self._signer.open(token)
        if raw is None:
            raise _invalid("is not a token this service issued")
        try:
            body = json.loads(raw)
            if body["v"] != _VERSION:
                raise _invalid("is of an unknown version")
            if body["w"] != workspace:
                raise _invalid("was issued for another workspace")
            if bound is not None and body["f"] != bound:
                raise _invalid("was issued for another table list (tables and their order)")
            boundaries = tuple(
                Boundary(str(snapshot), int(index), _values_of(key))
                for snapshot, index, key in body.get("b", ())
            )
            return Position(
                snapshot=str(body["s"]),
                in_snapshot="i" in body,
                table_index=int(body.get("i", 0)),
                key=_values_of(body["k"]) if "k" in body else (),
                cur=str(body.get("c", "")),
                high=int(body.get("h", 0)),
                last_seq=int(body.get("q", 0)),
                boundaries=boundaries,
            )
        except (KeyError, TypeError, ValueError, binascii.Error, DecodeError) as exc:
            # Signed by us yet unreadable: only a bug could do this, but refuse it cleanly.
            raise _invalid("is not a token this service issued") from exc
