"""Opaque keyset page tokens (AIP-158), signed so any replica sharing the key accepts them.

A token holds the sort-key values of the last row returned and a fingerprint of
the request it continues (workspace, table, columns, filter, order); it is
refused when it was altered, signed with another key, or reused with other
parameters. The values are carried as `ValueList`-shaped protobuf, so they keep
their exact types.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from raptorflow.data.server.errors import invalid_argument
from raptorflow.data.server.signing import Signer
from raptorflow.data.v1 import value_pb2, workspace_service_pb2

_VERSION = b"\x01"
_FINGERPRINT_BYTES = 16
_FIELD = "page_token"


class PageTokenCodec:
    """Issues and verifies page tokens with one signing key."""

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a page token key is required")
        self._signer = Signer(key)

    @staticmethod
    def fingerprint(request: workspace_service_pb2.SelectRequest) -> bytes:
        # page_size may change between pages (AIP-158); everything else binds the token.
        bound = workspace_service_pb2.SelectRequest()
        bound.CopyFrom(request)
        bound.page_size = 0
        bound.page_token = ""
        return hashlib.sha256(bound.SerializeToString(deterministic=True)).digest()[
            :_FINGERPRINT_BYTES
        ]

    def issue(
        self, request: workspace_service_pb2.SelectRequest, cursor: Sequence[value_pb2.Value]
    ) -> str:
        payload = value_pb2.ArrayValue(values=cursor).SerializeToString(deterministic=True)
        return self._signer.seal(_VERSION + self.fingerprint(request) + payload)

    def verify(self, request: workspace_service_pb2.SelectRequest) -> list[value_pb2.Value]:
        """The cursor values of the request's page token, or INVALID_ARGUMENT."""
        body = self._signer.open(request.page_token)
        if body is None or len(body) < 1 + _FINGERPRINT_BYTES or body[:1] != _VERSION:
            raise self._invalid("is not a token this service issued")
        if not hmac.compare_digest(body[1 : 1 + _FINGERPRINT_BYTES], self.fingerprint(request)):
            raise self._invalid(
                "was issued for a request with other parameters (workspace, table, columns, "
                "filter or order); only page_size may change between pages"
            )
        cursor = value_pb2.ArrayValue()
        cursor.ParseFromString(body[1 + _FINGERPRINT_BYTES :])
        return list(cursor.values)

    @staticmethod
    def _invalid(description: str) -> Exception:
        return invalid_argument(
            _FIELD, f"the page token {description}", reason="INVALID_PAGE_TOKEN"
        )
