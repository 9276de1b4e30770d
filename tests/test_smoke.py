"""The server starts, serves a round trip, and reports readiness."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from raptorflow.data.v1 import value_pb2, workspace_service_pb2


async def test_insert_then_select(stub, workspace):
    inserted = await stub.Insert(
        workspace_service_pb2.InsertRequest(
            workspace_id=workspace,
            table="campaigns",
            columns=["name"],
            rows=[value_pb2.Row(values=[value_pb2.Value(string_value="first")])],
        )
    )
    assert inserted.affected_count == 1
    page = await stub.Select(
        workspace_service_pb2.SelectRequest(
            workspace_id=workspace, table="campaigns", columns=["name"]
        )
    )
    assert [r.values[0].string_value for r in page.rows] == ["first"]


async def test_readiness_serving(channel: grpc.aio.Channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "readiness", "raptorflow.data.v1.WorkspaceService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
