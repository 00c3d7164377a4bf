"""TLS echo server: an asyncio.Protocol echo under create_server(ssl=...),
with the user's ssl.SSLContext as asyncio takes it."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from typing import cast

from _common import main, tcp_listener


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's and rloop's transports do not
        # derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--certfile", required=True)
    parser.add_argument("--keyfile", default=None, help="default: the key is in --certfile")


async def start(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> int:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.certfile, args.keyfile)
    sock = tcp_listener(args.host, args.port)
    port = int(sock.getsockname()[1])  # before the loop takes (or detaches) it
    await loop.create_server(EchoProtocol, sock=sock, ssl=context)
    return port


if __name__ == "__main__":
    main(__doc__ or "", start, options)
