"""DataClient: the async entry point that owns the channel and sends every call."""

# `timeout` is the gRPC deadline sent along with each call (the server cancels the
# statement when it passes), which asyncio.timeout around the await cannot express.

import asyncio
from types import TracebackType
from typing import Self, TypeVar
from uuid import UUID

import grpc
import grpc.aio
from raptorflow.data.client._auth import AUTHORIZATION, authorization_value
from raptorflow.data.client._config import (
    USE_CLIENT_DEFAULT,
    ClientConfig,
    MetadataLike,
    MetadataValue,
    Timeout,
    UseClientDefault,
    check_call_timeout,
    merge_metadata,
)
from raptorflow.data.client._errors import Unavailable, from_rpc_error
from raptorflow.data.client._maintenance import Maintenance
from raptorflow.data.client._memory import Memory
from raptorflow.data.client._monitoring import Monitoring
from raptorflow.data.client._query import Workspace
from raptorflow.data.client._values import canonical_workspace_id
from raptorflow.data.v1 import workspace_service_pb2, workspace_service_pb2_grpc

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class DataClient:
    """A connection to the RaptorFlow Data service, for agents and jobs.

    Use it as an async context manager, which closes the channel::

        async with DataClient("localhost:50051") as client:
            page = await client.workspace(ws).table("campaigns").select("id").execute()

    Calls fail with a `DataError` subclass. Reads are retried on UNAVAILABLE and
    ABORTED, writes on ABORTED only, by gRPC itself following the service config
    (see `ClientConfig.enable_retries`); the timeout covers all attempts.
    """

    def __init__(self, config: ClientConfig | str) -> None:
        """Creates the channel (a target string uses the defaults of `ClientConfig`).

        The channel connects lazily, on the first call; `connect()` waits for it.
        Create the client inside the event loop that will use it: grpc.aio
        binds the channel to the loop current at creation.
        """
        self._config = config if isinstance(config, ClientConfig) else ClientConfig(config)
        options = self._config.channel_arguments()
        credentials = self._config.channel_credentials
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self._config.target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(
                self._config.target, credentials, options=options
            )
        self._stub = workspace_service_pb2_grpc.WorkspaceServiceStub(self._channel)
        self._memory = Memory(self)
        self._maintenance = Maintenance(self)
        self._monitoring = Monitoring(self)

    @classmethod
    async def connect(
        cls, config: ClientConfig | str, *, timeout: Timeout = USE_CLIENT_DEFAULT
    ) -> Self:
        """Creates a client and waits until its channel is connected.

        Lets a job fail at start-up rather than at its first call when the
        server is unreachable. Raises `Unavailable` if it is not connected
        within `timeout` seconds (by default `ClientConfig.timeout`).
        """
        client = cls(config)
        seconds = client._config.timeout if isinstance(timeout, UseClientDefault) else timeout
        try:
            await asyncio.wait_for(client._channel.channel_ready(), seconds)
        except TimeoutError as err:
            await client.close()
            raise Unavailable(
                f"could not connect to {client._config.target} within {seconds} seconds"
            ) from err
        except BaseException:
            # Cancelled while waiting: the channel would otherwise leak.
            await client.close()
            raise
        return client

    @property
    def config(self) -> ClientConfig:
        """The configuration this client was created with."""
        return self._config

    @property
    def stub(self) -> workspace_service_pb2_grpc.WorkspaceServiceStub:
        """The generated stub on this client's channel, for calls the builder does not cover.

        Calls made through it bypass the default timeout, the default metadata
        (the token included) and the conversion to `DataError`.
        """
        return self._stub

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, for example for a health-check stub."""
        return self._channel

    @property
    def memory(self) -> Memory:
        """The memory system's calls (MemorySyncService): `sync` a workspace's rows,
        `acknowledge` progress, `upsert_records` and `search` memory records."""
        return self._memory

    @property
    def maintenance(self) -> Maintenance:
        """Backups, restores and maintenance jobs (MaintenanceService): `export_backup`,
        `restore_backup`, `backup_to_path`, `vacuum` and the other jobs, `wait_job`."""
        return self._maintenance

    @property
    def monitoring(self) -> Monitoring:
        """The server replica's status (MonitoringService): `get_status`."""
        return self._monitoring

    def workspace(self, workspace_id: str | UUID) -> Workspace:
        """The tables of one workspace. Raises ValueError if the id is not a UUID."""
        return Workspace(self, canonical_workspace_id(workspace_id))

    async def describe_tables(
        self,
        *tables: str,
        timeout: Timeout = USE_CLIENT_DEFAULT,
        metadata: MetadataLike | None = None,
    ) -> list[workspace_service_pb2.TableDescription]:
        """Describes the named exposed tables, or every exposed table when none are named."""
        response = await self._call(
            self._stub.DescribeTables,
            workspace_service_pb2.DescribeTablesRequest(tables=tables),
            timeout=timeout,
            metadata=metadata,
        )
        return list(response.tables)

    async def close(self) -> None:
        """Closes the channel, cancelling calls still in flight."""
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"DataClient({self._config.target!r})"

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        *,
        timeout: Timeout,
        metadata: MetadataLike | None,
    ) -> _Response:
        """Sends one call with the default timeout and metadata applied.

        The single place where unary calls leave the client, so every RPC gets
        the same defaults and the same error conversion. Streaming calls
        (`Memory.sync`, `Memory.upsert_records`, `Maintenance.export_backup`...)
        take the same defaults from `_call_options` and convert errors as they
        read and write.
        """
        deadline, merged = self._call_options(timeout, metadata)
        try:
            return await method(request, timeout=deadline, metadata=merged)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err

    def _call_options(
        self, timeout: Timeout, metadata: MetadataLike | None
    ) -> tuple[float | None, list[tuple[str, MetadataValue]]]:
        """The deadline in seconds (None for none) and the metadata a call is sent with.
        Raises ValueError for a timeout gRPC cannot send (`check_call_timeout`)."""
        if isinstance(timeout, UseClientDefault):
            deadline = self._config.timeout  # checked when the config was created
        else:
            check_call_timeout(timeout)
            deadline = timeout
        merged = merge_metadata(self._config.metadata, metadata)
        token = self._config.token
        if token is not None and all(key != AUTHORIZATION for key, _ in merged):
            # Per-call metadata rather than a channel interceptor: grpc.aio runs
            # interceptors as a task of their own per call, about 40 us of client CPU.
            merged.append(
                (AUTHORIZATION, authorization_value(token if isinstance(token, str) else token()))
            )
        return deadline, merged
