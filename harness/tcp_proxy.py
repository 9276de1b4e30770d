"""A real TCP proxy in front of PostgreSQL that a test can cut and restore.

`cut()` stops listening (new connections are refused, as by a host that went
away) and aborts every open connection on both sides; `restore()` listens on
the same port again. The server under test only ever sees the proxy's address,
so it meets a real network failure, not a mock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

_CHUNK = 64 * 1024

Filter = Callable[[bytes], bool]
"""Looks at a chunk on its way through a link: True forwards it, False drops it and ends the
link (both sides aborted)."""


@dataclass(frozen=True)
class Upstream:
    """Where the proxy forwards to: a TCP host and port, or a Unix socket path."""

    host: str = "127.0.0.1"
    port: int = 5432
    unix_path: str = ""

    @classmethod
    def of_database_url(cls, url: str) -> Upstream:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        port = parts.port or int(query.get("port", ["5432"])[0])
        host = query.get("host", [parts.hostname or ""])[0]
        if not host or host.startswith("/"):
            # libpq convention: a directory holding the socket file `.s.PGSQL.<port>`.
            directory = host or "/var/run/postgresql"
            return cls(port=port, unix_path=os.path.join(directory, f".s.PGSQL.{port}"))
        return cls(host=host, port=port)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.unix_path:
            return await asyncio.open_unix_connection(self.unix_path)
        return await asyncio.open_connection(self.host, self.port)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream; `async with` starts and closes it."""

    def __init__(self, upstream: Upstream) -> None:
        self._upstream = upstream
        self._listener: asyncio.Server | None = None
        self._port = 0
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.accepted = 0
        """Connections accepted since start, cut or not."""

    @classmethod
    def for_database(cls, database_url: str) -> TcpProxy:
        return cls(Upstream.of_database_url(database_url))

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def is_cut(self) -> bool:
        return self._listener is None

    @property
    def open_connections(self) -> int:
        return len(self._links)

    def database_url(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        parts = urllib.parse.urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        query = [
            (key, value)
            for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if key not in {"host", "port"}
        ]
        return urllib.parse.urlunsplit(
            parts._replace(netloc=netloc, query=urllib.parse.urlencode(query))
        )

    async def start(self) -> None:
        await self._listen(0)

    async def cut(self) -> None:
        """Refuses new connections and aborts every open one."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for link in list(self._links):
            for writer in link:
                writer.transport.abort()
        if listener is not None:
            await listener.wait_closed()

    async def restore(self) -> None:
        """Accepts connections again, on the same port."""
        if self._listener is None:
            await self._listen(self.port)

    async def close(self) -> None:
        await self.cut()
        # Aborted links end their handlers on the next loop turn; cancel only stragglers.
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=1.0)
        for task in list(self._handlers):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _link_filters(self) -> tuple[Filter, Filter]:
        """For each new link: what looks at every chunk towards the upstream, and every chunk
        towards the client, before it is forwarded. Forwarding everything here; a subclass
        that injects a fault returns False to drop a chunk and end the link."""
        return _forward_all, _forward_all

    async def _listen(self, port: int) -> None:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self._port = self._listener.sockets[0].getsockname()[1]

    async def _accept(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        try:
            await self._forward(client_reader, client)
        except asyncio.CancelledError:
            # Only close() cancels a handler. Returning (rather than ending cancelled)
            # keeps asyncio's stream callback from logging the cancellation as an error.
            client.transport.abort()
        finally:
            self._handlers.discard(task)

    async def _forward(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        if self.is_cut:
            client.transport.abort()
            return
        try:
            upstream_reader, upstream = await self._upstream.connect()
        except OSError:
            client.transport.abort()
            return
        if self.is_cut:  # cut while this connection was being made
            client.transport.abort()
            upstream.transport.abort()
            return
        link = (client, upstream)
        self._links.add(link)
        to_upstream, to_client = self._link_filters()
        pipes = {
            asyncio.ensure_future(_pipe(client_reader, upstream, to_upstream)),
            asyncio.ensure_future(_pipe(upstream_reader, client, to_client)),
        }
        try:
            # Either side closing ends the link: PostgreSQL has no use for half-closed sockets.
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._links.discard(link)
            for writer in link:
                writer.transport.abort()
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)


def _forward_all(data: bytes) -> bool:
    return True


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, forward: Filter
) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            if not forward(data):
                return
            writer.write(data)
            await writer.drain()
