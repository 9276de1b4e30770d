"""The ceiling: a bare grpc.aio server that answers Select with canned bytes, no database.

    python -m bench.echo --listen 127.0.0.1:50052 [--response-file PATH]

It serves the same method path as the real service
(`/raptorflow.data.v1.WorkspaceService/Select`), so the load generator sends it
the very same request bytes. Each call parses the SelectRequest, as the real
handler does, and answers with a pre-serialized SelectResponse: by default the
bytes of a real one-row point-select response that `python -m bench` captured
from the service (`--response-file`), so both servers send payloads of the same
size. Like `raptorflow-data serve`, it runs on uvloop with the same server
options. It prints `ready HOST:PORT` once it listens and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.protobuf import timestamp_pb2
from raptorflow.data.v1 import value_pb2, workspace_service_pb2

SERVICE = workspace_service_pb2.DESCRIPTOR.services_by_name["WorkspaceService"].full_name


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


def build_server(response: bytes) -> grpc.aio.Server:
    async def select(request: workspace_service_pb2.SelectRequest, context: Any) -> bytes:
        return response

    handlers = {
        "Select": grpc.unary_unary_rpc_method_handler(
            select,
            request_deserializer=workspace_service_pb2.SelectRequest.FromString,
            # The bytes are already serialized: sent as they are.
            response_serializer=None,
        )
    }
    # The same options as the real server (app.build_server), so neither gets a head start.
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    # Registered as the generated add_WorkspaceServiceServicer_to_server does: both ways.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    return server


async def serve(listen: str, response: bytes) -> None:
    server = build_server(response)
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
        "--response-file", type=Path, help="serialized SelectResponse to answer with"
    )
    args = parser.parse_args()
    response = args.response_file.read_bytes() if args.response_file else synthetic_response()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.listen, response))
    return 0


if __name__ == "__main__":
    sys.exit(main())
