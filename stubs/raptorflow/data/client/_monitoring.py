"""The monitoring call: one status view of a server replica's pool, queries and jobs.

::

    status = await client.monitoring.get_status()
    if status.pool.utilization > status.pool.utilization_target:
        ...
    for method in status.methods:
        print(method.method, method.p50_ms, method.p99_ms)

GetStatus retries UNAVAILABLE and ABORTED, like the reads. It describes the
replica that answers: behind a load balancer, each call may reach another one
(`GetStatusResponse.replica` says which).
"""

# `timeout` is the gRPC deadline sent along with each call (the server cancels the
# statement when it passes), which asyncio.timeout around the await cannot express.

from __future__ import annotations

from typing import TYPE_CHECKING

from raptorflow.data.client._config import USE_CLIENT_DEFAULT, MetadataLike, Timeout
from raptorflow.data.v1 import monitoring_service_pb2, monitoring_service_pb2_grpc

if TYPE_CHECKING:
    from raptorflow.data.client._client import DataClient


class Monitoring:
    """MonitoringService: the status of the server replica that answers.

    Reach it as `client.monitoring`.
    """

    def __init__(self, client: DataClient) -> None:
        self._client = client
        self._stub = monitoring_service_pb2_grpc.MonitoringServiceStub(client.channel)

    @property
    def stub(self) -> monitoring_service_pb2_grpc.MonitoringServiceStub:
        """The generated stub on the client's channel, for calls this class does not cover.

        Calls made through it bypass the default timeout, the default metadata
        and the conversion to `DataError`.
        """
        return self._stub

    async def get_status(
        self,
        *,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> monitoring_service_pb2.GetStatusResponse:
        """The replica's pool (size, in use, idle, waiting, utilisation against the 80 %
        target), latency percentiles per RPC method, slow queries, connections held
        past the leak limit, the database's reachability and version, and each
        schedule's latest job and success rate.

        Answers even when the database is down (`database.reachable` is False then).
        """
        return await self._client._call(
            self._stub.GetStatus,
            monitoring_service_pb2.GetStatusRequest(),
            timeout=timeout,
            metadata=metadata,
        )
