"""The ceiling: a bare grpc.aio server that answers one method with canned bytes, no database.

    python -m bench.echo --listen 127.0.0.1:50052 [--method PATH] [--response-file PATH]

It serves one method path of the real service (default
`/raptorflow.data.v1.WorkspaceService/Select`), so the load generator sends it
the very same request bytes. Each call parses its request (for a
client-streaming method, each message of the stream), as the real handler
does, and answers with pre-serialized response bytes: the bytes of a real
response that `python -m bench` captured from the service for the workload
(`--response-file`), so both servers send payloads of the same size. Without
one it answers a one-row point select shaped like bench_items. Like
`raptorflow-data serve`, it runs on uvloop with the same server options. It
prints `ready HOST:PORT` once it listens and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.protobuf import descriptor_pool, message_factory, timestamp_pb2
from raptorflow.data.v1 import memory_sync_service_pb2, value_pb2, workspace_service_pb2

SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"].full_name
DEFAULT_METHOD = f"/{SERVICE}/Select"
# Imported for their descriptors: every method of these services can be echoed.
_FILES = (workspace_service_pb2.DESCRIPTOR, memory_sync_service_pb2.DESCRIPTOR)


def synthetic_response() -> bytes:
    """A one-row response shaped like a bench_items point select, for standalone use."""
    row = value_pb2.Row(
        values=[
            value_pb2.Value(int64_value=4242),
            value_pb2.Value(uuid_value=str(uuid.UUID(int=1))),
            value_pb2.Value(string_value="item-00004242"),
            value_pb2.Value(double_value=0.4242),
            value_pb2.Value(timestamp_value=timestamp_pb2.Timestamp(seconds=1_700_000_000)),
        ]
    )
    response = workspace_service_pb2.SelectResponse(
        columns=["id", "workspace_id", "name", "score", "created_at"], rows=[row]
    )
    return response.SerializeToString()


def build_server(response: bytes, method: str = DEFAULT_METHOD) -> grpc.aio.Server:
    """A server answering `method` (a /package.Service/Method path) with `response`."""
    service_name, _, method_name = method.strip("/").rpartition("/")
    descriptor = descriptor_pool.Default().FindServiceByName(service_name)
    method_descriptor = descriptor.methods_by_name[method_name]
    parse = message_factory.GetMessageClass(method_descriptor.input_type).FromString
    if method_descriptor.server_streaming:
        raise ValueError(f"{method} streams responses: not an echo case")

    handler: grpc.RpcMethodHandler[Any, Any]
    if method_descriptor.client_streaming:

        async def consume(requests: AsyncIterator[Any], context: Any) -> bytes:
            async for _ in requests:
                pass
            return response

        handler = grpc.stream_unary_rpc_method_handler(
            consume,
            request_deserializer=parse,
            # The bytes are already serialized: sent as they are.
            response_serializer=None,
        )
    else:

        async def answer(request: Any, context: Any) -> bytes:
            return response

        handler = grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=parse, response_serializer=None
        )
    handlers = {method_name: handler}
    # The same options as the real server (app.build_server), so neither gets a head start.
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    # Registered as the generated add_...Servicer_to_server does: both ways.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)  # type: ignore[attr-defined]
    return server


async def serve(listen: str, response: bytes, method: str = DEFAULT_METHOD) -> None:
    server = build_server(response, method)
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rsplit(":", 1)[0]
    print(f"ready {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT; port 0 picks one")
    parser.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"the method path to answer (default {DEFAULT_METHOD})",
    )
    parser.add_argument(
        "--response-file", type=Path, help="serialized response message to answer with"
    )
    args = parser.parse_args()
    response = args.response_file.read_bytes() if args.response_file else synthetic_response()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.listen, response, args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
