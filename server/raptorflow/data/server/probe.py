"""A health probe client for exec probes, with grpc_health_probe's exit codes."""

from __future__ import annotations

import asyncio
import enum

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class ProbeResult(enum.IntEnum):
    """Exit codes, as grpc_health_probe uses them."""

    SERVING = 0
    INVALID_ARGUMENTS = 1
    CONNECTION_FAILURE = 2
    RPC_FAILURE = 3
    UNHEALTHY = 4


async def probe(
    address: str, service: str = "", timeout_seconds: float = 1.0
) -> tuple[ProbeResult, str]:
    """Checks `service` once at `address`; returns the exit code and a line to print."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            async with asyncio.timeout(timeout_seconds):
                await channel.channel_ready()
        except TimeoutError:
            return (
                ProbeResult.CONNECTION_FAILURE,
                f"timeout: failed to connect to {address} within {timeout_seconds:g}s",
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
