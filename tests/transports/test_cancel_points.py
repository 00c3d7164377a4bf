"""Cancellation at every await point of the loop's I/O API.

Each case starts an operation that cannot finish on its own (the peer stays
silent, the socket buffer is full, nobody connects), lets the loop run it
for a few iterations, cancels it, and checks: the awaiting task ends with
CancelledError, no exception reaches the loop's handler, every descriptor
the case opened is released once it closes what it owns, and the loop
still works afterwards (a fresh round trip over a socket pair).
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

import tokioloop

from ._util import open_fds

Case = Callable[[asyncio.AbstractEventLoop, AsyncExitStack], Awaitable[Any]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def kill_on_exit(stack: AsyncExitStack, proc: asyncio.subprocess.Process) -> None:
    """Kill and reap the child when the case's stack unwinds."""

    async def reap() -> None:
        proc.kill()
        await proc.wait()

    stack.push_async_callback(reap)


def pair(stack: AsyncExitStack) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    stack.callback(a.close)
    stack.callback(b.close)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


@asynccontextmanager
async def silent_server(loop: asyncio.AbstractEventLoop) -> AsyncIterator[tuple[str, int]]:
    """A server whose connections never send nor read anything."""
    conns: list[asyncio.BaseTransport] = []

    class Silent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conns.append(transport)
            transport.pause_reading()  # type: ignore[attr-defined]

    server = await loop.create_server(Silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        for t in conns:
            t.close()
        server.close()
        await server.wait_closed()


def fill(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass


@case
async def sock_recv(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    a, _ = pair(stack)
    return await loop.sock_recv(a, 100)


@case
async def sock_recv_into(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    a, _ = pair(stack)
    return await loop.sock_recv_into(a, bytearray(100))


@case
async def sock_sendall(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    a, _ = pair(stack)
    fill(a)
    return await loop.sock_sendall(a, b"y" * (1 << 20))


@case
async def sock_accept(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    s = socket.socket()
    stack.callback(s.close)
    s.bind(("127.0.0.1", 0))
    s.listen()
    s.setblocking(False)
    return await loop.sock_accept(s)


async def sock_recvfrom(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stack.callback(s.close)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return await loop.sock_recvfrom(s, 100)


if sys.version_info >= (3, 11):  # sock_recvfrom is new in 3.11
    case(sock_recvfrom)


@case
async def create_connection_tls_handshake(
    loop: asyncio.AbstractEventLoop, stack: AsyncExitStack
) -> Any:
    host, port = await stack.enter_async_context(silent_server(loop))
    ctx = ssl.create_default_context()
    return await loop.create_connection(asyncio.Protocol, host, port, ssl=ctx)


@case
async def stream_read(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    host, port = await stack.enter_async_context(silent_server(loop))
    reader, writer = await asyncio.open_connection(host, port)
    stack.callback(writer.close)
    return await reader.read(100)


@case
async def stream_readexactly(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    a, b = pair(stack)
    reader, writer = await asyncio.open_connection(sock=a)
    stack.callback(writer.close)
    b.send(b"partial")
    return await reader.readexactly(100)


@case
async def stream_drain(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    a, _ = pair(stack)
    _, writer = await asyncio.open_connection(sock=a)
    stack.callback(writer.close)
    writer.write(b"z" * (8 << 20))
    return await writer.drain()


@case
async def start_tls(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    host, port = await stack.enter_async_context(silent_server(loop))
    tr, proto = await loop.create_connection(asyncio.Protocol, host, port)
    stack.callback(tr.close)
    ctx = ssl.create_default_context()
    return await loop.start_tls(tr, proto, ctx, server_hostname="localhost")


@case
async def sendfile(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    f = tempfile.TemporaryFile()
    stack.callback(f.close)
    f.write(b"f" * (4 << 20))
    f.seek(0)
    host, port = await stack.enter_async_context(silent_server(loop))
    tr, _ = await loop.create_connection(asyncio.Protocol, host, port)
    stack.callback(tr.close)
    return await loop.sendfile(tr, f)


@case
async def getaddrinfo(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    # Resolved on a worker: cancelling the await must not wait for it.
    return await loop.getaddrinfo("localhost", 80)


@case
async def run_in_executor(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    return await loop.run_in_executor(None, time.sleep, 0.3)


@case
async def subprocess_wait(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(30)", stdout=subprocess.DEVNULL
    )
    kill_on_exit(stack, proc)
    return await proc.wait()


@case
async def subprocess_communicate(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys, time; sys.stdout.write('x'); sys.stdout.flush(); time.sleep(30)",
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE,
    )
    kill_on_exit(stack, proc)
    return await proc.communicate(b"in")


@case
async def datagram_sendto_then_wait(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    got: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    tr, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
    stack.callback(tr.close)
    return await got


@case
async def server_serve_forever(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    stack.push_async_callback(close)
    return await server.serve_forever()


@case
async def connect_read_pipe(loop: asyncio.AbstractEventLoop, stack: AsyncExitStack) -> Any:
    r, w = os.pipe()
    stack.callback(os.close, w)
    reader = asyncio.StreamReader()
    tr, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(r, "rb", 0)
    )
    stack.callback(tr.close)
    return await reader.read(10)


async def round_trip(loop: asyncio.AbstractEventLoop) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        await loop.sock_sendall(a, b"ping")
        assert await asyncio.wait_for(loop.sock_recv(b, 4), 5) == b"ping"


# Operations that may legitimately finish within the 50 ms of the longest wait.
QUICK = {"getaddrinfo"}


@pytest.mark.parametrize(
    ("name", "iterations"),
    [(n, i) for n in sorted(CASES) for i in (0, 1, 5) if not (i == 5 and n in QUICK)],
)
def test_cancel_at_await_point(name: str, iterations: int) -> None:
    loop = tokioloop.new_event_loop()
    handled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: handled.append(ctx))
    before = open_fds()

    async def main() -> None:
        async with AsyncExitStack() as stack:
            task = loop.create_task(CASES[name](loop, stack))
            for _ in range(iterations):
                await asyncio.sleep(0)
            if iterations == 5:
                await asyncio.sleep(0.05)
            assert not task.done(), task
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await round_trip(loop)

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 20))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    gc.collect()
    assert handled == [], handled
    leaked = open_fds() - before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"
