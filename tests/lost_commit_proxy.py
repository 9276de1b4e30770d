"""A TCP proxy in front of PostgreSQL that, when armed, loses the reply to one COMMIT.

It is harness.tcp_proxy.TcpProxy with a filter on each link. Once `arm()`ed, the
next connection that sends the simple-protocol query `COMMIT` (what
`Database.workspace_connection` sends) gets it delivered to PostgreSQL; the
proxy then drops PostgreSQL's answer and aborts both sides. So the transaction
is committed for certain, yet the server under test only sees its connection
die in the middle of COMMIT: the one failure whose outcome the server cannot
know.
"""

from __future__ import annotations

import asyncio

from harness.tcp_proxy import Filter, TcpProxy, Upstream

# A simple Query message: 'Q', its length (4 + the text and its NUL), "COMMIT\0".
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"


class LostCommitProxy(TcpProxy):
    """Forwards 127.0.0.1:<port> to PostgreSQL; `async with` starts and closes it."""

    def __init__(self, database_url: str) -> None:
        super().__init__(Upstream.of_database_url(database_url))
        self._armed = False
        self.lost_commits = 0
        """COMMITs delivered whose reply was dropped."""
        self.lost = asyncio.Event()
        """Set when the armed COMMIT's reply was dropped."""

    def arm(self) -> None:
        """The next COMMIT through the proxy is delivered and its reply lost."""
        self.lost.clear()
        self._armed = True

    def _link_filters(self) -> tuple[Filter, Filter]:
        committing = False

        def to_database(data: bytes) -> bool:
            nonlocal committing
            if self._armed and data.endswith(COMMIT_MESSAGE):
                self._armed = False
                # Marked before the COMMIT goes out: whatever comes back from now on
                # is its reply (the client sends nothing before it has its answer).
                committing = True
            return True

        def to_client(data: bytes) -> bool:
            if committing:
                # PostgreSQL has answered the COMMIT: it is done. Drop the answer.
                self.lost_commits += 1
                self.lost.set()
                return False
            return True

        return to_database, to_client
