"""The soak's TCP proxies in front of PostgreSQL, in a process of their own.

The soak (`bench/soak.py`) puts one in front of each server replica's database
connections so a fault can cut the database away from the replicas and give it
back (`harness.tcp_proxy.TcpProxy`, which the tests use too). Here they forward
bytes in a process of their own, driven over stdin, so they never wait on the
load generator's event loop:

    python -m bench.tcp_proxy --database-url URL --count 2
    -> {"ports": [P1, P2]}          one JSON line once listening
    <- cut 0 | restore 0 | cut all | restore all | stats
    -> {"ok": true, ...}            one JSON line per command; EOF on stdin stops it
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from harness.tcp_proxy import TcpProxy


async def serve_commands(proxies: list[TcpProxy]) -> None:
    """Answers commands from stdin (one a line) until it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ports": [p.port for p in proxies]}), flush=True)
    while line := await reader.readline():
        verb, _, which = line.decode().strip().partition(" ")
        chosen = proxies if which in ("", "all") else [proxies[int(which)]]
        if verb == "cut":
            for proxy in chosen:
                await proxy.cut()
        elif verb == "restore":
            for proxy in chosen:
                await proxy.restore()
        elif verb != "stats":
            print(json.dumps({"ok": False, "error": f"unknown command {verb!r}"}), flush=True)
            continue
        print(
            json.dumps(
                {
                    "ok": True,
                    "cut": [p.is_cut for p in proxies],
                    "open": [p.open_connections for p in proxies],
                    "accepted": [p.accepted for p in proxies],
                }
            ),
            flush=True,
        )


async def run(database_url: str, count: int) -> None:
    proxies = [TcpProxy.for_database(database_url) for _ in range(count)]
    for proxy in proxies:
        await proxy.start()
    try:
        await serve_commands(proxies)
    finally:
        for proxy in proxies:
            await proxy.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tcp_proxy", description=__doc__)
    parser.add_argument("--database-url", required=True, help="where the proxies forward to")
    parser.add_argument("--count", type=int, default=1, help="proxies to start (default 1)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.database_url, args.count))


if __name__ == "__main__":
    main()
