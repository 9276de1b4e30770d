"""Tokens signed with RS256 and ES256 keys (a PEM public key file, a JWKS file), the
start-up checks of key settings, clock skew, and a server with authentication off.

Keys are made here with `cryptography`. The EC and JWKS servers trust their key
file only; the RSA server also trusts the tests' HS256 secret, as a deployment
moving from one to the other would, which is where algorithm confusion bites.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import start_server
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from messages import row
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import (
    job_pb2,
    maintenance_service_pb2,
    maintenance_service_pb2_grpc,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from server_process import COMMAND, command_environment
from statuses import rpc_error
from tokens import AUDIENCE, ISSUER, bearer, mint

ws = workspace_service_pb2
TIMEOUT = 10.0
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# ---------------------------------------------------------------------------
# Keys and key files


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    """The public JWK of `key`, with its kid, use and alg."""
    if isinstance(key, rsa.RSAPrivateKey):
        entry: Any = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        alg = "RS256"
    else:
        entry = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        alg = "ES256"
    return {**entry, "kid": kid, "use": "sig", "alg": alg}


def write_jwks(path: Path, keys: dict[str, PrivateKey]) -> None:
    """Replaces the JWKS file at once (a rename), as a key-rotation job would."""
    staged = path.with_suffix(".staged")
    staged.write_text(json.dumps({"keys": [jwk(key, kid) for kid, key in keys.items()]}))
    os.replace(staged, path)


def signed(key: PrivateKey, *, kid: str | None = None, algorithm: str = "", **claims: Any) -> str:
    """An admin token of every workspace signed with `key` (RS256 or ES256 by its type)."""
    algorithm = algorithm or ("RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256")
    headers = {"kid": kid} if kid is not None else None
    return mint("admin", key=key, algorithm=algorithm, headers=headers, **claims)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hmac_forged(secret: bytes, *, kid: str | None = None) -> str:
    """An HS256 token whose HMAC key is `secret` (PyJWT refuses to make one with a PEM key,
    which is the point: a verifier that let the token pick the algorithm would accept it)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    claims = {
        "sub": "forger",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 3600,
        "role": "admin",
        "workspaces": ["*"],
    }
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


@dataclasses.dataclass
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    stranger_rsa: rsa.RSAPrivateKey
    stranger_ec: ec.EllipticCurvePrivateKey
    directory: Path

    @property
    def rsa_pem(self) -> Path:
        return self.directory / "rsa.pem"

    @property
    def ec_pem(self) -> Path:
        return self.directory / "ec.pem"

    @property
    def jwks(self) -> Path:
        return self.directory / "jwks.json"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    made = Keys(rsa_key(), ec_key(), rsa_key(), ec_key(), tmp_path_factory.mktemp("keys"))
    made.rsa_pem.write_bytes(public_pem(made.rsa))
    made.ec_pem.write_bytes(public_pem(made.ec))
    write_jwks(made.jwks, {"rsa-1": made.rsa, "ec-1": made.ec})
    return made


@contextlib.asynccontextmanager
async def serving(settings: Settings, **changes: Any) -> AsyncIterator[grpc.aio.Channel]:
    """A server of the test's own and a channel to it that sends no token by itself."""
    running = await start_server(settings, **changes)
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            yield channel
    finally:
        await running.stop(grace=0.5)


@pytest.fixture(scope="module")
async def rsa_server(settings: Settings, keys: Keys) -> AsyncIterator[grpc.aio.Channel]:
    """Trusts the RSA key's PEM file and (as a mixed deployment would) the HS256 secret."""
    async with serving(settings, jwt_public_key_file=str(keys.rsa_pem)) as channel:
        yield channel


@pytest.fixture(scope="module")
async def ec_server(settings: Settings, keys: Keys) -> AsyncIterator[grpc.aio.Channel]:
    """Trusts only the P-256 key's PEM file."""
    async with serving(settings, jwt_secret=b"", jwt_public_key_file=str(keys.ec_pem)) as channel:
        yield channel


@pytest.fixture(scope="module")
async def jwks_server(settings: Settings, keys: Keys) -> AsyncIterator[grpc.aio.Channel]:
    """Trusts only the JWKS file's keys (rsa-1, ec-1)."""
    async with serving(settings, jwt_secret=b"", jwt_jwks_file=str(keys.jwks)) as channel:
        yield channel


async def describe(channel: grpc.aio.Channel, token: str) -> None:
    """A call every role may make."""
    await workspace_service_pb2_grpc.WorkspaceServiceStub(channel).DescribeTables(
        ws.DescribeTablesRequest(tables=["campaigns"]), metadata=bearer(token), timeout=TIMEOUT
    )


async def refusal(channel: grpc.aio.Channel, token: str) -> str:
    """The reason the server refuses `token` with UNAUTHENTICATED."""
    failure = await rpc_error(describe(channel, token))
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED, failure.message
    return failure.reason


# ---------------------------------------------------------------------------
# PEM public key files


async def test_rs256_with_a_pem_public_key(rsa_server: grpc.aio.Channel, keys: Keys) -> None:
    await describe(rsa_server, signed(keys.rsa))
    await describe(rsa_server, mint("agent"))  # the HS256 secret still works beside it
    assert await refusal(rsa_server, signed(keys.stranger_rsa)) == "TOKEN_SIGNATURE_INVALID"
    assert await refusal(rsa_server, signed(keys.rsa, ttl=-3600)) == "TOKEN_EXPIRED"
    assert await refusal(rsa_server, signed(keys.rsa, audience="other")) == "TOKEN_AUDIENCE_INVALID"
    # No ES256 key is configured; RS512 is not accepted at all.
    assert await refusal(rsa_server, signed(keys.ec)) == "TOKEN_KEY_UNKNOWN"
    assert await refusal(rsa_server, signed(keys.rsa, algorithm="RS512")) == "TOKEN_KEY_UNKNOWN"


async def test_es256_with_a_pem_public_key(ec_server: grpc.aio.Channel, keys: Keys) -> None:
    await describe(ec_server, signed(keys.ec))
    await describe(ec_server, signed(keys.ec, kid="any-kid"))  # a PEM key has no kid to match
    assert await refusal(ec_server, signed(keys.stranger_ec)) == "TOKEN_SIGNATURE_INVALID"
    assert await refusal(ec_server, signed(keys.rsa)) == "TOKEN_KEY_UNKNOWN"
    # No HS256 secret is configured: a token signed with the tests' secret has no key here.
    assert await refusal(ec_server, mint("admin")) == "TOKEN_KEY_UNKNOWN"


async def test_an_hs256_token_keyed_with_the_public_key_is_refused(
    rsa_server: grpc.aio.Channel, ec_server: grpc.aio.Channel, keys: Keys
) -> None:
    """Algorithm confusion: the public key is public, so an HMAC keyed with it proves
    nothing. Where an HS256 secret exists the token is checked against the secret (and
    fails); where none does, HS256 has no key at all."""
    forged_rsa = hmac_forged(public_pem(keys.rsa))
    assert await refusal(rsa_server, forged_rsa) == "TOKEN_SIGNATURE_INVALID"
    assert await refusal(ec_server, hmac_forged(public_pem(keys.ec))) == "TOKEN_KEY_UNKNOWN"
    # The secret really is what HS256 tokens are checked with there.
    assert await refusal(rsa_server, hmac_forged(b"s" * 40)) == "TOKEN_SIGNATURE_INVALID"


# ---------------------------------------------------------------------------
# JWKS files


async def test_jwks_keys_are_chosen_by_kid(jwks_server: grpc.aio.Channel, keys: Keys) -> None:
    await describe(jwks_server, signed(keys.rsa, kid="rsa-1"))
    await describe(jwks_server, signed(keys.ec, kid="ec-1"))
    refused = {
        "unknown kid": signed(keys.rsa, kid="rsa-9"),
        "no kid": signed(keys.rsa),
        "kid of a key of the other algorithm": signed(keys.ec, kid="rsa-1"),
        "HS256 keyed with the JWK's PEM": hmac_forged(public_pem(keys.rsa), kid="rsa-1"),
        "HS256 keyed with the JWK": hmac_forged(
            json.dumps(jwk(keys.rsa, "rsa-1")).encode(), kid="rsa-1"
        ),
        "HS256 keyed with the tests' secret": mint("admin", headers={"kid": "rsa-1"}),
    }
    for case, token in refused.items():
        assert await refusal(jwks_server, token) == "TOKEN_KEY_UNKNOWN", case
    assert (
        await refusal(jwks_server, signed(keys.stranger_rsa, kid="rsa-1"))
        == "TOKEN_SIGNATURE_INVALID"
    )
    assert (
        await refusal(jwks_server, signed(keys.stranger_ec, kid="ec-1"))
        == "TOKEN_SIGNATURE_INVALID"
    )


async def poll(check: Any, what: str, within: float = 10.0) -> None:
    """Calls `check()` until it returns True (the verifier rereads the file once a second)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_a_replaced_jwks_file_is_picked_up_without_a_restart(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = rsa_key(), ec_key()
    jwks = tmp_path / "jwks.json"
    write_jwks(jwks, {"old": old})
    async with serving(settings, jwt_secret=b"", jwt_jwks_file=str(jwks)) as channel:
        old_token, new_token = signed(old, kid="old"), signed(new, kid="new")
        await describe(channel, old_token)
        assert await refusal(channel, new_token) == "TOKEN_KEY_UNKNOWN"

        write_jwks(jwks, {"new": new})

        async def new_key_works() -> bool:
            try:
                await describe(channel, new_token)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                return False
            return True

        await poll(new_key_works, "the new key was never trusted")
        # The old key is gone, also for the token verified (and cached) before.
        assert await refusal(channel, old_token) == "TOKEN_KEY_UNKNOWN"

        # A broken file keeps the keys of the last good one, with a warning.
        with caplog.at_level(logging.WARNING, logger="raptorflow.data.server.auth.tokens"):
            jwks.write_text("{not json")

            async def warned() -> bool:
                await describe(channel, new_token)
                return any("keeping the previous JWKS" in r.getMessage() for r in caplog.records)

            await poll(warned, "no warning about the broken JWKS file")
        await describe(channel, new_token)


# ---------------------------------------------------------------------------
# Start-up checks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def unusable_key_files(directory: Path) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(case, settings changes, the setting the refusal must name)."""
    missing = str(directory / "missing.pem")
    garbage = directory / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    private = directory / "private.pem"
    private.write_bytes(
        rsa_key().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    p384 = directory / "p384.pem"
    p384.write_bytes(public_pem(ec_key(ec.SECP384R1())))
    broken_jwks = directory / "broken.json"
    broken_jwks.write_text('{"keys": [')
    hmac_only = directory / "hmac.json"
    hmac_only.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "h", "k": b64url(b"k" * 32)}]}))
    no_kid = directory / "no-kid.json"
    entry = jwk(rsa_key(), "x")
    del entry["kid"]
    no_kid.write_text(json.dumps({"keys": [entry]}))
    secret, pem, jwks = (
        "RAPTORFLOW_JWT_SECRET",
        "RAPTORFLOW_JWT_PUBLIC_KEY_FILE",
        "RAPTORFLOW_JWT_JWKS_FILE",
    )
    yield "no key at all", {"jwt_secret": b""}, secret
    yield "a 31-byte secret", {"jwt_secret": b"s" * 31}, secret
    yield "a missing PEM file", {"jwt_public_key_file": missing}, pem
    yield "a PEM file that does not decode", {"jwt_public_key_file": str(garbage)}, pem
    yield "a private key, not a public one", {"jwt_public_key_file": str(private)}, pem
    yield "a P-384 key (ES256 is P-256)", {"jwt_public_key_file": str(p384)}, pem
    yield "a missing JWKS file", {"jwt_jwks_file": missing}, jwks
    yield "a JWKS file that is no JSON", {"jwt_jwks_file": str(broken_jwks)}, jwks
    yield "a JWKS of an HMAC key only", {"jwt_jwks_file": str(hmac_only)}, jwks
    yield "a JWKS key without a kid", {"jwt_jwks_file": str(no_kid)}, jwks


async def test_start_up_refuses_unusable_key_settings(settings: Settings, tmp_path: Path) -> None:
    """Each stops start-up with SystemExit naming the setting, before anything connects
    (the database here is unreachable: a later check would fail differently) or listens."""
    port = free_port()
    unreachable = dataclasses.replace(
        settings,
        listen=f"127.0.0.1:{port}",
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none",
    )
    tasks_before = asyncio.all_tasks()
    for case, changes, setting in unusable_key_files(tmp_path):
        with pytest.raises(SystemExit) as stopped:
            await start_server(unreachable, **changes)
        assert setting in str(stopped.value), (case, str(stopped.value))
        assert asyncio.all_tasks() == tasks_before, case
        assert port_is_free(port), case


async def test_serve_with_a_short_secret_exits_with_a_message(settings: Settings) -> None:
    process = await asyncio.create_subprocess_exec(
        *COMMAND,
        "serve",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--database-url",
        settings.database_url,
        "--jwt-secret",
        "too-short",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=command_environment(),
    )
    async with asyncio.timeout(20.0):
        _, stderr = await process.communicate()
    assert process.returncode not in (0, None)
    text = stderr.decode()
    assert "RAPTORFLOW_JWT_SECRET" in text
    assert "Traceback" not in text


# ---------------------------------------------------------------------------
# Authentication switched off


async def test_dev_disable_auth_admits_everyone_and_says_so_loudly(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        async with serving(settings, dev_disable_auth=True, jwt_secret=b"") as channel:
            warnings = [
                r.getMessage()
                for r in caplog.records
                if r.levelno >= logging.WARNING and r.name == "raptorflow.data.server.app"
            ]
            assert any("AUTHENTICATION IS OFF" in message for message in warnings), warnings
            # No token at all: an admin of every workspace.
            workspace = str(uuid.uuid4())
            stub = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
            await stub.Insert(
                ws.InsertRequest(
                    workspace_id=workspace, table="campaigns", columns=["name"], rows=[row("dev")]
                ),
                timeout=TIMEOUT,
            )
            selected = await stub.Select(
                ws.SelectRequest(workspace_id=workspace, table="campaigns", columns=["name"]),
                timeout=TIMEOUT,
            )
            assert [r.values[0].string_value for r in selected.rows] == ["dev"]
            maintenance = maintenance_service_pb2_grpc.MaintenanceServiceStub(channel)
            export = maintenance.ExportBackup(
                maintenance_service_pb2.ExportBackupRequest(
                    scope=job_pb2.BackupScope(tables=["campaign_events"])
                ),
                timeout=TIMEOUT,
            )
            first = await export.read()
            export.cancel()
            assert isinstance(first, maintenance_service_pb2.ExportBackupResponse)
            assert first.WhichOneof("part") == "header"


# ---------------------------------------------------------------------------
# Clock skew


async def test_clock_skew_within_the_leeway_is_allowed(rsa_server: grpc.aio.Channel) -> None:
    """The module's servers allow the default 30 s of skew on exp and nbf."""
    now = int(time.time())
    await describe(rsa_server, mint("agent", exp=now - 5))
    await describe(rsa_server, mint("agent", nbf=now + 5))
    assert await refusal(rsa_server, mint("agent", exp=now - 60)) == "TOKEN_EXPIRED"
    assert await refusal(rsa_server, mint("agent", nbf=now + 60)) == "TOKEN_NOT_YET_VALID"


async def test_an_issuer_clock_slightly_ahead_is_allowed(rsa_server: grpc.aio.Channel) -> None:
    await describe(rsa_server, mint("agent", iat=int(time.time()) + 5))


@pytest.mark.parametrize("claim", ["exp", "nbf"])
async def test_time_claims_out_of_range_are_invalid_claims(
    rsa_server: grpc.aio.Channel, claim: str
) -> None:
    """Only an issuer holding the key can send one, but no token may end a call UNKNOWN."""
    assert await refusal(rsa_server, mint("agent", **{claim: 10**400})) == "TOKEN_CLAIMS_INVALID"
