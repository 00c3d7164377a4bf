"""TLS over the native socket transport with peers that do not speak TLS,
or do not speak at all: handshakes fail as asyncio's do, handshake timeouts
are honoured, servers keep serving."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import time
from typing import Any

import pytest

from ._util import LOOPS, fds_released, on_both, outcome, run_on
from .conftest import Certs


class Echo(asyncio.Protocol):
    made = 0

    def connection_made(self, transport: Any) -> None:
        Echo.made += 1
        self.tr = transport

    def data_received(self, data: bytes) -> None:
        self.tr.write(data)


async def tls_echo_works(loop: asyncio.AbstractEventLoop, addr: Any, certs: Certs) -> bytes:
    reader, writer = await asyncio.open_connection(
        *addr, ssl=certs.client_context(), server_hostname="localhost"
    )
    writer.write(b"still serving")
    got = await reader.readexactly(13)
    writer.close()
    await writer.wait_closed()
    return got


async def read_until_closed(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> str:
    """How the peer ended the connection: 'eof' or the exception name."""
    try:
        while await loop.sock_recv(sock, 65536):
            pass
    except OSError as exc:
        return type(exc).__name__
    return "eof"


@pytest.mark.parametrize("debug", [False, True], ids=["normal", "debug"])
def test_plain_bytes_to_a_tls_server(certs: Certs, debug: bool) -> None:
    """A client that sends HTTP to a TLS port: the handshake fails, the
    connection is dropped, the application protocol never sees it, the
    exception handler hears what asyncio's does (nothing; in debug mode the
    failed incoming connection), the server goes on serving TLS clients."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
        Echo.made = 0
        server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=certs.server_context())
        addr = server.sockets[0].getsockname()
        raw = socket.socket()
        raw.setblocking(False)
        await loop.sock_connect(raw, addr)
        await loop.sock_sendall(raw, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n" * 20)
        ended = await read_until_closed(loop, raw)
        raw.close()
        made_before = Echo.made
        got = await tls_echo_works(loop, addr, certs)
        server.close()
        await server.wait_closed()
        return ended, made_before, got

    with fds_released():
        runs = on_both(main, debug=debug)
    for name, run in runs.items():
        ended, made_before, got = run.result
        assert ended in {"eof", "ConnectionResetError"}, (name, ended)
        assert made_before == 0 and got == b"still serving", name
    handled = {
        name: sorted((str(c.get("message")), type(c.get("exception")).__name__) for c in run.errors)
        for name, run in runs.items()
    }
    assert handled["tokioloop"] == handled["asyncio"]


PLAIN_SERVERS = [
    "http_reply",
    "close_at_once",
    "reset_at_once",
    "garbage_then_close",
]


@pytest.mark.parametrize("behaviour", PLAIN_SERVERS)
def test_tls_client_to_a_plain_server(certs: Certs, behaviour: str) -> None:
    """create_connection(ssl=...) to a server that is not TLS: the same
    exception (class and message) as asyncio's loop raises."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, str]:
        class Plain(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                if behaviour == "close_at_once":
                    transport.close()
                elif behaviour == "reset_at_once":
                    transport.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
                    )
                    transport.abort()

            def data_received(self, data: bytes) -> None:
                if behaviour == "http_reply":
                    self.tr.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                else:
                    # Fixed bytes, not random ones: about 1 in 1000 random
                    # payloads starts like a long TLS record, so the
                    # handshake waits for the rest and then sees EOF.
                    self.tr.write(b"not a TLS record " * 60)
                    self.tr.close()

        server = await loop.create_server(Plain, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        result = await outcome(
            loop.create_connection(
                asyncio.Protocol, *addr, ssl=certs.client_context(), server_hostname="localhost"
            )
        )
        server.close()
        await server.wait_closed()
        return result

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ref[0] != "ok"
    assert ours == ref


def test_client_handshake_timeout(certs: Certs) -> None:
    """The server accepts and never answers the ClientHello: with
    ssl_handshake_timeout=0.3 the client gives up after about 0.3 s with
    asyncio's exception."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[tuple[str, str], float]:
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        t0 = time.monotonic()
        result = await outcome(
            loop.create_connection(
                asyncio.Protocol,
                *silent.getsockname(),
                ssl=certs.client_context(),
                server_hostname="localhost",
                ssl_handshake_timeout=0.3,
            )
        )
        elapsed = time.monotonic() - t0
        silent.close()
        return result, elapsed

    with fds_released():
        runs = on_both(main)
    (ours, t_ours), (ref, _) = runs["tokioloop"].result, runs["asyncio"].result
    assert ours == ref and ours[0] != "ok"
    assert 0.25 <= t_ours < 2.0, t_ours


def test_server_handshake_timeout(certs: Certs) -> None:
    """A client connects to a TLS server and says nothing: with
    ssl_handshake_timeout=0.3 the server drops it after about 0.3 s and
    goes on serving."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, float, bytes]:
        server = await loop.create_server(
            Echo, "127.0.0.1", 0, ssl=certs.server_context(), ssl_handshake_timeout=0.3
        )
        addr = server.sockets[0].getsockname()
        mute = socket.socket()
        mute.setblocking(False)
        await loop.sock_connect(mute, addr)
        t0 = time.monotonic()
        ended = await read_until_closed(loop, mute)
        elapsed = time.monotonic() - t0
        mute.close()
        got = await tls_echo_works(loop, addr, certs)
        server.close()
        await server.wait_closed()
        return ended, elapsed, got

    with fds_released():
        runs = on_both(main)
    for name, run in runs.items():
        ended, elapsed, got = run.result
        assert ended in {"eof", "ConnectionResetError"}, (name, ended)
        assert 0.25 <= elapsed < 2.0, (name, elapsed)
        assert got == b"still serving"
    assert runs["tokioloop"].result[0] == runs["asyncio"].result[0]


def test_tls_bulk_round_trip_and_close(certs: Certs) -> None:
    """8 MiB each way through TLS streams (flow control through
    SSLProtocol over the native transport), then a clean TLS shutdown."""
    payload = os.urandom(8 << 20)

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[bytes, str]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while chunk := await r.read(65536):
                w.write(chunk)
                await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=certs.server_context())
        reader, writer = await asyncio.open_connection(
            *server.sockets[0].getsockname(),
            ssl=certs.client_context(),
            server_hostname="localhost",
        )
        h = hashlib.sha256()

        async def pump() -> None:
            view = memoryview(payload)
            for off in range(0, len(payload), 1 << 20):
                writer.write(view[off : off + (1 << 20)])
                await writer.drain()

        sender = asyncio.ensure_future(pump())
        n = 0
        while n < len(payload):
            chunk = await reader.read(1 << 20)
            assert chunk
            h.update(chunk)
            n += len(chunk)
        await sender
        writer.close()
        closed = await outcome(writer.wait_closed())
        server.close()
        await server.wait_closed()
        return h.digest(), closed[0]

    with fds_released():
        run = run_on(LOOPS["tokioloop"], main, timeout=30)
    assert run.result == (hashlib.sha256(payload).digest(), "ok")
    assert run.errors == []


def test_start_tls_upgrade_then_peer_sends_garbage(certs: Certs) -> None:
    """start_tls() on a native transport, data through it, then the peer's
    raw socket (behind our back) sends bytes that are not TLS records: the
    TLS layer fails the connection (connection_lost with an SSLError or a
    reset), as on asyncio, and the loop stays healthy."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, bytes]:
        lost: asyncio.Future[BaseException | None] = loop.create_future()
        got = bytearray()
        got_some = asyncio.Event()

        class App(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                got.extend(data)
                got_some.set()

            def connection_lost(self, exc: BaseException | None) -> None:
                lost.set_result(exc)

        a, b = socket.socketpair()
        # the peer: blocking TLS in a thread over socket b, via MemoryBIO
        sctx = certs.server_context()
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        sobj = sctx.wrap_bio(incoming, outgoing, server_side=True)

        def peer_handshake() -> None:
            b.settimeout(5)
            while True:
                try:
                    sobj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        b.sendall(outgoing.read())
                    incoming.write(b.recv(65536))
            if outgoing.pending:
                b.sendall(outgoing.read())
            sobj.write(b"hello over tls")
            b.sendall(outgoing.read())

        tr, proto = await loop.create_connection(App, sock=a)
        fut = loop.run_in_executor(None, peer_handshake)
        tls_tr = await loop.start_tls(
            tr, proto, certs.client_context(), server_hostname="localhost"
        )
        await fut
        await got_some.wait()
        b.sendall(b"\x17\x03\x03\x00\x10" + os.urandom(16))  # a bogus record
        exc = await lost
        tls_tr.close()
        b.close()
        return type(exc).__name__, bytes(got)

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ref[0] in {"SSLError", "ConnectionResetError"}
    assert ours == ref
    assert ours[1] == b"hello over tls"
