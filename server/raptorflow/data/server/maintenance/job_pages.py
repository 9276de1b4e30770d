"""ListJobs page tokens (AIP-158): the keyset of the last job returned, bound to the filters.

A token holds the (create time, id) of the last job of its page and a
fingerprint of the request's filters (states, schedule); it is signed with the
key replicas share (`Settings.token_key`), under a context of its own so it can
never pass for a Select page token. Any replica accepts it; it is refused when
altered, signed with another key, or reused with other filters.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import struct
import uuid

from raptorflow.data.server.errors import ServiceError, invalid_argument
from raptorflow.data.server.signing import Signer
from raptorflow.data.v1 import maintenance_service_pb2

_VERSION = b"\x01"
_FINGERPRINT_BYTES = 16
_MICROS = struct.Struct(">q")
_BODY_BYTES = 1 + _FINGERPRINT_BYTES + _MICROS.size + 16
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_CONTEXT = b"raptorflow.data.v1.MaintenanceService.ListJobs"


class JobPageTokens:
    """Issues and verifies ListJobs page tokens with one signing key."""

    def __init__(self, key: bytes) -> None:
        self._signer = Signer(key, _CONTEXT)

    @staticmethod
    def fingerprint(request: maintenance_service_pb2.ListJobsRequest) -> bytes:
        # page_size may change between pages; the states are a set, in any order.
        bound = maintenance_service_pb2.ListJobsRequest(
            states=sorted(set(request.states)), schedule=request.schedule
        )
        return hashlib.sha256(bound.SerializeToString(deterministic=True)).digest()[
            :_FINGERPRINT_BYTES
        ]

    def issue(
        self,
        request: maintenance_service_pb2.ListJobsRequest,
        created_at: datetime.datetime,
        job_id: uuid.UUID,
    ) -> str:
        micros = (created_at - _EPOCH) // datetime.timedelta(microseconds=1)
        return self._signer.seal(
            _VERSION + self.fingerprint(request) + _MICROS.pack(micros) + job_id.bytes
        )

    def verify(
        self, request: maintenance_service_pb2.ListJobsRequest
    ) -> tuple[datetime.datetime, uuid.UUID]:
        """The keyset the request's page token continues after, or INVALID_ARGUMENT."""
        body = self._signer.open(request.page_token)
        if body is None or len(body) != _BODY_BYTES or body[:1] != _VERSION:
            raise _invalid("is not a token this service issued")
        fingerprint = body[1 : 1 + _FINGERPRINT_BYTES]
        if not hmac.compare_digest(fingerprint, self.fingerprint(request)):
            raise _invalid(
                "was issued for other filters (states, schedule); only page_size may change"
                " between pages"
            )
        offset = 1 + _FINGERPRINT_BYTES
        (micros,) = _MICROS.unpack_from(body, offset)
        created_at = _EPOCH + datetime.timedelta(microseconds=micros)
        return created_at, uuid.UUID(bytes=body[offset + _MICROS.size :])


def _invalid(description: str) -> ServiceError:
    return invalid_argument(
        "page_token", f"the page token {description}", reason="INVALID_PAGE_TOKEN"
    )
