"""asyncio streams over tokioloop's transports: readuntil / readexactly /
readline past EOF and past the limit raise asyncio's exceptions, the
reader's flow control pauses the transport, wait_closed() returns (or
raises) as on asyncio's loop."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ._util import fds_released, on_both, set_linger_reset

LIMIT = 1024


def describe(exc: BaseException) -> tuple[Any, ...]:
    """An exception with the attributes asyncio's stream errors carry."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return ("IncompleteReadError", exc.partial, exc.expected)
    if isinstance(exc, asyncio.LimitOverrunError):
        return ("LimitOverrunError", str(exc), exc.consumed)
    return (type(exc).__name__, str(exc))


async def with_stream(
    loop: asyncio.AbstractEventLoop,
    feed: bytes,
    body: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]],
    *,
    eof: bool = True,
) -> Any:
    """A client stream (limit LIMIT) whose peer sends `feed` (then EOF)."""
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a, limit=LIMIT)
    await loop.sock_sendall(b, feed)
    if eof:
        b.shutdown(socket.SHUT_WR)
    try:
        return await body(reader, writer)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        b.close()


async def steps(reader: asyncio.StreamReader, calls: list[Any]) -> list[Any]:
    """Run reader calls in turn, recording each result or exception."""
    out: list[Any] = []
    for name, *args in calls:
        try:
            out.append(("ok", await getattr(reader, name)(*args)))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            out.append(describe(exc))
    return out


SCENARIOS: dict[str, tuple[bytes, bool, list[Any]]] = {
    "readuntil_found": (b"abc\r\ndef", True, [("readuntil", b"\r\n"), ("read",)]),
    "readuntil_eof_first": (b"no separator here", True, [("readuntil", b"\r\n"), ("read",)]),
    "readuntil_over_limit_separator_beyond": (
        b"x" * (LIMIT + 10) + b"\r\nrest",
        True,
        [("readuntil", b"\r\n"), ("readexactly", 5), ("readuntil", b"\r\n"), ("read",)],
    ),
    "readuntil_over_limit_no_separator": (
        b"y" * (3 * LIMIT),
        True,
        [("readuntil", b"\r\n"), ("read", 10)],
    ),
    "readuntil_empty_separator": (b"abc", True, [("readuntil", b"")]),
    "readline_over_limit": (
        b"z" * (LIMIT + 1) + b"\nnext line\n",
        True,
        [("readline",), ("readline",), ("readline",)],
    ),
    "readline_last_line_without_newline": (b"one\ntwo", True, [("readline",), ("readline",)]),
    "readexactly_past_eof": (b"12345", True, [("readexactly", 10), ("read",)]),
    "readexactly_zero_and_negative": (b"abc", True, [("readexactly", 0), ("readexactly", -1)]),
    "readexactly_more_than_limit": (
        os.urandom(5 * LIMIT),
        True,
        [("readexactly", 5 * LIMIT), ("read",)],
    ),
    "read_all": (b"q" * (10 * LIMIT), True, [("read", -1), ("read", -1)]),
    "read_zero": (b"abc", True, [("read", 0), ("read", 2)]),
}
if sys.version_info >= (3, 13):
    SCENARIOS["readuntil_several_separators"] = (
        b"a;b,c",
        True,
        [("readuntil", (b",", b";")), ("readuntil", (b",", b";")), ("readuntil", (b",",))],
    )


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_reader_results_and_errors(name: str) -> None:
    feed, eof, calls = SCENARIOS[name]

    async def main(loop: asyncio.AbstractEventLoop) -> list[Any]:
        async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
            return await steps(reader, calls)

        return await with_stream(loop, feed, body, eof=eof)

    with fds_released():
        runs = on_both(main)
    assert runs["tokioloop"].result == runs["asyncio"].result
    assert runs["tokioloop"].errors == []


def test_reader_flow_control_pauses_the_transport() -> None:
    """A StreamReader holding more than twice its limit pauses the
    transport; reading it down resumes the transport."""

    async def main(loop: asyncio.AbstractEventLoop) -> list[Any]:
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a, limit=LIMIT)
        transport: Any = writer.transport
        sender = loop.create_task(loop.sock_sendall(b, b"p" * (64 * LIMIT)))
        while len(reader._buffer) <= 2 * LIMIT:  # type: ignore[attr-defined]
            await asyncio.sleep(0.001)
        seen = [transport.is_reading()]
        got = 0
        while got < 64 * LIMIT:
            got += len(await reader.read(LIMIT))
            seen.append(transport.is_reading())
        await sender
        writer.close()
        await writer.wait_closed()
        b.close()
        return [seen[0], seen[-1], got]

    with fds_released():
        runs = on_both(main)
    assert runs["tokioloop"].result == runs["asyncio"].result == [False, True, 64 * LIMIT]


def test_wait_closed() -> None:
    """wait_closed() after close() returns once the transport is gone;
    calling it again returns at once; on a reset connection it does what
    asyncio's does for this version (return or raise the error)."""

    async def main(loop: asyncio.AbstractEventLoop) -> list[Any]:
        out: list[Any] = []
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        writer.write(b"bye")
        writer.close()
        out.append(writer.is_closing())
        await writer.wait_closed()
        await writer.wait_closed()
        out.append(b.recv(10))
        out.append(b.recv(10))  # EOF: the transport closed the socket
        b.close()

        # the peer resets; the writer notices on its next writes
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        reader, writer = await asyncio.open_connection(*lsock.getsockname())
        peer, _ = lsock.accept()
        set_linger_reset(peer)
        peer.close()
        lsock.close()
        try:
            await reader.read()
            out.append("read ok")
        except OSError as exc:
            out.append(type(exc).__name__)
        writer.close()
        try:
            await writer.wait_closed()
            out.append("wait_closed ok")
        except OSError as exc:
            out.append(type(exc).__name__)
        return out

    with fds_released():
        runs = on_both(main)
    assert runs["tokioloop"].result == runs["asyncio"].result
    assert runs["tokioloop"].result[:3] == [True, b"bye", b""]


def test_server_side_streams_survive_a_misbehaving_client() -> None:
    """start_server: one client overruns the limit (the handler gets
    asyncio's ValueError from readline), one resets mid-line, one is fine;
    the server goes on serving."""

    async def main(loop: asyncio.AbstractEventLoop) -> list[Any]:
        results: list[Any] = []
        done = asyncio.Queue[None]()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                line = await r.readline()
                w.write(line.upper())
                await w.drain()
                results.append(("line", line))
            except (ValueError, OSError) as exc:
                # the class and, for ValueError, the message (OSError texts:
                # see test_stream_faults.test_transport_oserrors_carry_errno)
                results.append(describe(exc) if isinstance(exc, ValueError) else type(exc).__name__)
            finally:
                w.close()
                done.put_nowait(None)

        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=LIMIT)
        addr = server.sockets[0].getsockname()
        r1, w1 = await asyncio.open_connection(*addr)
        w1.write(b"a" * (3 * LIMIT) + b"\n")
        await done.get()
        s = socket.socket()
        await loop.sock_connect(s, addr)
        await loop.sock_sendall(s, b"half a li")
        set_linger_reset(s)
        s.close()
        await done.get()
        r3, w3 = await asyncio.open_connection(*addr)
        w3.write(b"fine\n")
        reply = await r3.readline()
        await done.get()
        for w in (w1, w3):
            w.close()
            try:
                await w.wait_closed()
            except OSError:
                pass
        server.close()
        await server.wait_closed()
        return [sorted(results, key=repr), reply]

    with fds_released():
        runs = on_both(main)
    ours = runs["tokioloop"].result
    assert ours == runs["asyncio"].result
    assert ours[1] == b"FINE\n"
