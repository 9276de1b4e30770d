"""A TCP proxy in front of PostgreSQL that, when armed, loses the reply to one COMMIT.

It forwards every byte both ways, like harness.tcp_proxy.TcpProxy. Once `arm()`ed, the
next connection that sends the simple-protocol query `COMMIT` (what
`Database.workspace_connection` sends) gets it delivered to PostgreSQL; the
proxy then waits for PostgreSQL's answer, drops it and aborts both sides. So the
transaction is committed for certain, yet the server under test only sees its
connection die in the middle of COMMIT: the one failure whose outcome the server
cannot know.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse

from harness.tcp_proxy import Upstream

# A simple Query message: 'Q', its length (4 + the text and its NUL), "COMMIT\0".
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"
_CHUNK = 64 * 1024


class LostCommitProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; `async with` starts and closes it."""

    def __init__(self, database_url: str) -> None:
        self._upstream = Upstream.of_database_url(database_url)
        self._listener: asyncio.Server | None = None
        self._armed = False
        self._handlers: set[asyncio.Task[None]] = set()
        self.lost_commits = 0
        """COMMITs delivered whose reply was dropped."""
        self.lost = asyncio.Event()
        """Set when the armed COMMIT's reply was dropped."""

    def arm(self) -> None:
        """The next COMMIT through the proxy is delivered and its reply lost."""
        self.lost.clear()
        self._armed = True

    def database_url(self, database_url: str) -> str:
        assert self._listener is not None
        port = self._listener.sockets[0].getsockname()[1]
        parts = urllib.parse.urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        query = [
            (key, value)
            for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if key not in {"host", "port"}
        ]
        return urllib.parse.urlunsplit(
            parts._replace(
                netloc=f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}",
                query=urllib.parse.urlencode(query),
            )
        )

    async def __aenter__(self) -> LostCommitProxy:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._listener is not None
        self._listener.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._listener.wait_closed()

    async def _accept(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream = await self._upstream.connect()
            committing = asyncio.Event()
            pipes = [
                asyncio.ensure_future(self._to_database(client_reader, upstream, committing)),
                asyncio.ensure_future(self._to_client(upstream_reader, client, committing)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            client.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
            self._handlers.discard(task)

    async def _to_database(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        committing: asyncio.Event,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                if self._armed and data.endswith(COMMIT_MESSAGE):
                    self._armed = False
                    # Set before the COMMIT goes out: whatever comes back from now on
                    # is its reply (the client sends nothing before it has its answer).
                    committing.set()
                writer.write(data)
                await writer.drain()

    async def _to_client(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        committing: asyncio.Event,
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                if committing.is_set():
                    # PostgreSQL has answered the COMMIT: it is done. Drop the answer.
                    self.lost_commits += 1
                    self.lost.set()
                    return
                writer.write(data)
                await writer.drain()
