"""HTTP/1.1 keep-alive server: an asyncio.Protocol parsing requests with
httptools and answering each with a fixed 13-byte body (the same response as
the Tokio ceiling server's http mode)."""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

import httptools  # type: ignore[import-untyped,unused-ignore]
from _common import main, tcp_listener

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!"


class HttpProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's and rloop's transports do not
        # derive from asyncio's classes.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        self.transport.write(RESPONSE)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def start(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> int:
    sock = tcp_listener(args.host, args.port)
    port = int(sock.getsockname()[1])  # before the loop takes (or detaches) it
    await loop.create_server(HttpProtocol, sock=sock)
    return port


if __name__ == "__main__":
    main(__doc__ or "", start)
