"""A health probe client for exec probes, with grpc_health_probe's exit codes.

It speaks plaintext, TLS (`ProbeTls`: the server checked against a CA bundle or
the system's roots, optionally under another name) and mutual TLS (a client
certificate and key as well). Health stays open on every port, so the probe
sends no token.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ProbeResult(enum.IntEnum):
    """Exit codes, as grpc_health_probe uses them."""

    SERVING = 0
    INVALID_ARGUMENTS = 1
    CONNECTION_FAILURE = 2
    RPC_FAILURE = 3
    UNHEALTHY = 4


@dataclass(frozen=True)
class ProbeTls:
    """How the probe speaks TLS; every field is optional."""

    ca_file: str = ""
    """PEM bundle of the CAs the server's certificate must chain to; empty: the system's."""
    cert_file: str = ""
    """PEM client certificate chain, for a port that requires mutual TLS (with key_file)."""
    key_file: str = ""
    """PEM private key of cert_file."""
    server_name: str = ""
    """The name the server's certificate is checked against instead of the address's host
    (for example "localhost" when probing 127.0.0.1)."""

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files. Raises ValueError naming the option that is
        unusable (a file that cannot be read, a certificate without its key)."""
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read("--tls-ca-file", self.ca_file),
            private_key=_read("--tls-key-file", self.key_file),
            certificate_chain=_read("--tls-cert-file", self.cert_file),
        )

    def options(self) -> list[tuple[str, str]]:
        """Channel arguments: the SSL target name override, when one is given."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(option: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise ValueError(f"{option}: cannot read {path!r}: {exc.strerror or exc}") from exc


def _channel(address: str, tls: ProbeTls | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, tls.credentials(), options=tls.options())


async def probe(
    address: str, service: str = "", timeout_seconds: float = 1.0, tls: ProbeTls | None = None
) -> tuple[ProbeResult, str]:
    """Checks `service` once at `address`, plaintext or (with `tls`) over TLS; returns the
    exit code and a line to print. A TLS handshake that fails counts as a connection
    failure, as it does for grpc_health_probe."""
    try:
        channel = _channel(address, tls)
    except ValueError as exc:
        return ProbeResult.INVALID_ARGUMENTS, f"error: {exc}"
    async with channel:
        try:
            async with asyncio.timeout(timeout_seconds):
                await channel.channel_ready()
        except TimeoutError:
            return (
                ProbeResult.CONNECTION_FAILURE,
                f"timeout: failed to connect to {address} within {timeout_seconds:g}s"
                + (" (TLS)" if tls is not None else ""),
            )
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_seconds
            )
        except grpc.aio.AioRpcError as exc:
            return (
                ProbeResult.RPC_FAILURE,
                f"error: health rpc failed: {exc.code().name} {exc.details()}",
            )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status == health_pb2.HealthCheckResponse.SERVING:
        return ProbeResult.SERVING, f"status: {status}"
    return ProbeResult.UNHEALTHY, f"service unhealthy (responded with {status!r})"
