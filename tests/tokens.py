"""Bearer tokens for tests: minted with the test settings' HS256 secret (or any other key),
and channels that send one on every call."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import jwt
from raptorflow.data.client._auth import bearer_auth

TEST_JWT_SECRET = b"test-jwt-secret-of-at-least-32-bytes!"
ISSUER = "raptorflow"
AUDIENCE = "raptorflow-data"
ALL_WORKSPACES = "*"


def mint(
    role: str | Sequence[str] = "admin",
    workspaces: Iterable[str] = (ALL_WORKSPACES,),
    *,
    subject: str = "test-caller",
    ttl: float = 3600.0,
    key: Any = TEST_JWT_SECRET,
    algorithm: str = "HS256",
    issuer: str = ISSUER,
    audience: str = AUDIENCE,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A signed token; `role` becomes `roles` when it is a list. Extra claims override."""
    now = time.time()
    payload: dict[str, Any] = {
        "sub": subject,
        "iss": issuer,
        "aud": audience,
        "iat": int(now),
        "exp": now + ttl,
        "workspaces": list(workspaces),
    }
    if isinstance(role, str):
        payload["role"] = role
    else:
        payload["roles"] = list(role)
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


ADMIN_TOKEN = mint("admin", subject="test-admin", ttl=10 * 24 * 3600)
"""An admin of every workspace, for tests that are not about authorization."""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return (("authorization", f"Bearer {token}"),)


def authorized_channel(
    address: str, token: str | None = ADMIN_TOKEN, **kwargs: Any
) -> grpc.aio.Channel:
    """An insecure channel to `address` that sends `token` on every call (None: no token)."""
    interceptors = bearer_auth(token) if token is not None else []
    return grpc.aio.insecure_channel(address, interceptors=interceptors, **kwargs)
