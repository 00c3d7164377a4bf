"""TCP echo server on the loop's socket methods (sock_accept, sock_recv,
sock_sendall), one task per connection."""

from __future__ import annotations

import argparse
import asyncio
import socket

from _common import main, tcp_listener

_tasks: set[asyncio.Task[None]] = set()


async def handle(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    try:
        while True:
            data = await loop.sock_recv(conn, 65536)
            if not data:
                break
            await loop.sock_sendall(conn, data)
    except ConnectionError:
        pass
    finally:
        conn.close()


async def accept_forever(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setblocking(False)
        # asyncio's transports set TCP_NODELAY; raw sockets do not get it.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(handle(loop, conn))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)


async def start(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> int:
    listener = tcp_listener(args.host, args.port)
    acceptor = loop.create_task(accept_forever(loop, listener))
    _tasks.add(acceptor)
    await asyncio.sleep(0)  # let a failing sock_accept surface here
    if acceptor.done():
        acceptor.result()
    return int(listener.getsockname()[1])


if __name__ == "__main__":
    main(__doc__ or "", start)
