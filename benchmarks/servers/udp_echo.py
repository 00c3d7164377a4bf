"""UDP echo server on an asyncio.DatagramProtocol (create_datagram_endpoint)."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, cast

from _common import main, udp_socket


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's and rloop's transports do not
        # derive from asyncio's classes.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


async def start(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> int:
    sock = udp_socket(args.host, args.port)
    port = int(sock.getsockname()[1])  # before the loop takes (or detaches) it
    await loop.create_datagram_endpoint(UdpEcho, sock=sock)
    return port


if __name__ == "__main__":
    main(__doc__ or "", start)
