"""TCP echo server on asyncio streams (asyncio.start_server)."""

from __future__ import annotations

import argparse
import asyncio

from _common import main, tcp_listener


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def start(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> int:
    sock = tcp_listener(args.host, args.port)
    port = int(sock.getsockname()[1])  # before the loop takes (or detaches) it
    await asyncio.start_server(handle, sock=sock)
    return port


if __name__ == "__main__":
    main(__doc__ or "", start)
