"""`sync/tokens.py` on its own: positions round-trip through signed tokens, bound to the
workspace and table list; snapshot order."""

from __future__ import annotations

import pytest
from raptorflow.data.server.errors import ServiceError
from raptorflow.data.server.signing import Signer
from raptorflow.data.server.sync.tokens import (
    Boundary,
    Position,
    ResumeTokens,
    covers,
    fingerprint,
)
from raptorflow.data.v1 import value_pb2

WORKSPACE = "6fe1d066-6745-4ed9-82fd-89bfab28d213"
BOUND = fingerprint(WORKSPACE, ["campaigns", "campaign_events"])
KEY = (value_pb2.Value(int64_value=42),)
POSITIONS = [
    Position("10:12:10,11", in_snapshot=True, table_index=1, key=KEY),
    Position("10:12:", boundaries=(Boundary("9:9:", 0, KEY),)),
    Position("10:12:").epoch("11:14:11", 99).sent(57),
    Position("10:12:"),
]


@pytest.mark.parametrize("position", POSITIONS)
def test_positions_round_trip(position: Position) -> None:
    tokens = ResumeTokens(b"key")
    token = tokens.issue(WORKSPACE, BOUND, position)
    assert tokens.verify(token, WORKSPACE, BOUND) == position
    assert tokens.verify(token, WORKSPACE, None) == position
    assert len(token) < 200


def test_tokens_are_bound_and_signed() -> None:
    tokens = ResumeTokens(b"key")
    token = tokens.issue(WORKSPACE, BOUND, POSITIONS[0])
    refused = [
        lambda: tokens.verify(token, "7fe1d066-6745-4ed9-82fd-89bfab28d213", BOUND),
        lambda: tokens.verify(token, WORKSPACE, fingerprint(WORKSPACE, ["campaigns"])),
        lambda: ResumeTokens(b"other key").verify(token, WORKSPACE, BOUND),
        lambda: tokens.verify(token[:-2] + "AA", WORKSPACE, BOUND),
        # A page token signed with the same key is no resume token.
        lambda: tokens.verify(Signer(b"key").seal(b"\x01" + bytes(16)), WORKSPACE, BOUND),
    ]
    for verify in refused:
        with pytest.raises(ServiceError) as raised:
            verify()
        assert raised.value.reason == "INVALID_RESUME_TOKEN"


def test_snapshot_order() -> None:
    earlier = "100:105:100,103"
    assert covers(earlier, earlier)
    assert covers("100:105:100", earlier)  # 103 committed since
    assert covers("100:108:100,106", earlier)  # 106 began after `earlier`
    assert not covers("100:104:100", earlier)  # 104 is visible in `earlier`
    assert not covers("99:105:99,100,103", earlier)  # 99 is visible in `earlier`
    assert not covers(earlier, "100:105:100")
