"""TCP echo server on an asyncio.Protocol (create_server)."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from _common import main, tcp_listener


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's and rloop's transports do not
        # derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def start(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> int:
    sock = tcp_listener(args.host, args.port)
    port = int(sock.getsockname()[1])  # before the loop takes (or detaches) it
    await loop.create_server(EchoProtocol, sock=sock)
    return port


if __name__ == "__main__":
    main(__doc__ or "", start)
