"""MonitoringService: the status view of this replica, from `observability.monitoring`."""

from __future__ import annotations

from typing import Any

import grpc
from raptorflow.data.server.observability.monitoring import Monitoring
from raptorflow.data.server.services.status import rpc_errors
from raptorflow.data.v1 import monitoring_service_pb2, monitoring_service_pb2_grpc

pb = monitoring_service_pb2
Context = grpc.aio.ServicerContext[Any, Any]


class MonitoringServicer(monitoring_service_pb2_grpc.MonitoringServiceServicer):
    """Serves raptorflow.data.v1.MonitoringService."""

    def __init__(self, monitoring: Monitoring) -> None:
        self._monitoring = monitoring

    @rpc_errors
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        return await self._monitoring.status()
