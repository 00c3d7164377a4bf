"""TLS connections through the loop: data, transport API, extra info."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from typing import Any

import pytest

from .conftest import (
    PY311,
    SIGNED_CERTFILE,
    Handled,
    client_context,
    needs_new_sslproto,
    run,
    server_context,
)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.made = asyncio.get_event_loop().create_future()
        self.lost = asyncio.get_event_loop().create_future()
        self.eof = False
        self.events: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.events.append("made")
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        if not self.events or self.events[-1] != "data":
            self.events.append("data")
        self.data += data

    def eof_received(self) -> None:
        self.events.append("eof")
        self.eof = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


async def echo_server(
    loop: asyncio.AbstractEventLoop, ctx: ssl.SSLContext | None = None
) -> tuple[asyncio.AbstractServer, int]:
    server = await loop.create_server(Echo, "127.0.0.1", 0, ssl=ctx or server_context())
    return server, server.sockets[0].getsockname()[1]


def test_transport_classes_and_extra_info(
    loop: asyncio.AbstractEventLoop, handled: Handled
) -> None:
    async def main() -> None:
        server, port = await echo_server(loop, server_context(SIGNED_CERTFILE, None))
        ctx = client_context(verify=True)
        tr, proto = await loop.create_connection(
            Collect, "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        assert isinstance(tr, asyncio.Transport)
        assert isinstance(tr, asyncio.WriteTransport)
        assert tr.get_protocol() is proto
        assert tr.get_extra_info("sslcontext") is ctx
        sslobj = tr.get_extra_info("ssl_object")
        assert isinstance(sslobj, ssl.SSLObject)
        assert sslobj.server_hostname == "localhost"
        peercert = tr.get_extra_info("peercert")
        assert dict(x[0] for x in peercert["subject"])["commonName"] == "localhost"
        cipher = tr.get_extra_info("cipher")
        assert isinstance(cipher, tuple) and len(cipher) == 3
        assert tr.get_extra_info("compression") is None
        assert tr.get_extra_info("peername") == ("127.0.0.1", port)
        assert tr.get_extra_info("sockname")[0] == "127.0.0.1"
        sock = tr.get_extra_info("socket")
        assert sock.family == socket.AF_INET
        assert tr.get_extra_info("no such key", "dflt") == "dflt"
        assert tr.can_write_eof() is False
        with pytest.raises(NotImplementedError):
            tr.write_eof()
        assert tr.is_reading()
        assert not tr.is_closing()
        tr.write(b"hello")
        tr.writelines([b" ", bytearray(b"wor"), memoryview(b"ld")])
        while len(proto.data) < 11:
            await asyncio.sleep(0.01)
        assert bytes(proto.data) == b"hello world"
        with pytest.raises(TypeError, match="data: expecting a bytes-like instance, got str"):
            tr.write("text")
        tr.close()
        assert tr.is_closing()
        assert await proto.lost is None
        # Our close_notify is answered by the peer's: the protocol sees EOF too.
        assert proto.events == ["made", "data", "eof", "lost"]
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_write_buffer_limits_api(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def main() -> None:
        server, port = await echo_server(loop)
        tr, _ = await loop.create_connection(Collect, "127.0.0.1", port, ssl=client_context())
        if PY311:
            assert tr.get_write_buffer_limits() == (128 * 1024, 512 * 1024)
            assert tr.get_read_buffer_limits() == (64 * 1024, 256 * 1024)
            tr.set_read_buffer_limits(high=1000)
            assert tr.get_read_buffer_limits() == (250, 1000)
            assert tr.get_read_buffer_size() == 0
        tr.set_write_buffer_limits(high=1000)
        assert tr.get_write_buffer_limits() == (250, 1000)
        tr.set_write_buffer_limits(low=100)
        assert tr.get_write_buffer_limits() == (100, 400)
        with pytest.raises(ValueError, match=r"high \(1\) must be >= low \(2\) must be >= 0"):
            tr.set_write_buffer_limits(high=1, low=2)
        assert tr.get_write_buffer_size() == 0
        tr.close()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


@pytest.mark.parametrize("size", [1, 16 * 1024 + 1, 3 * 1024 * 1024])
def test_large_transfer_byte_exact(
    loop: asyncio.AbstractEventLoop, handled: Handled, size: int
) -> None:
    payload = os.urandom(size)

    async def main() -> None:
        server, port = await echo_server(loop)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())

        async def send() -> None:
            view = memoryview(payload)
            for i in range(0, size, 100_000):
                writer.write(view[i : i + 100_000])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        got = await reader.readexactly(size)
        await sender
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_many_connections(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def one(port: int, i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        msg = b"%d" % i * 1000
        for _ in range(5):
            writer.write(msg)
            assert await reader.readexactly(len(msg)) == msg
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        server, port = await echo_server(loop)
        await asyncio.gather(*(one(port, i) for i in range(30)))
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_peer_close_notify_reaches_eof_received(
    loop: asyncio.AbstractEventLoop, handled: Handled, loop_name: str
) -> None:
    """The server closes: the client's protocol sees data, EOF, then
    connection_lost(None), in that order."""
    needs_new_sslproto(loop_name)

    class CloseAfterHello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            t: Any = transport
            t.write(b"bye")
            t.close()

    async def main() -> None:
        server = await loop.create_server(CloseAfterHello, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        _, proto = await loop.create_connection(Collect, "127.0.0.1", port, ssl=client_context())
        assert await proto.lost is None
        assert bytes(proto.data) == b"bye"
        assert proto.events == ["made", "data", "eof", "lost"]
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_write_after_close_is_ignored(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def main() -> None:
        server, port = await echo_server(loop)
        tr, proto = await loop.create_connection(Collect, "127.0.0.1", port, ssl=client_context())
        tr.close()
        tr.write(b"late")  # as asyncio: dropped, counted, warned about only when repeated
        tr.close()  # a second close is harmless
        assert tr.is_closing()
        assert await proto.lost is None
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_unix_socket(loop: asyncio.AbstractEventLoop, handled: Handled, tmp_path: Any) -> None:
    path = str(tmp_path / "tls.sock")

    async def main() -> None:
        server = await loop.create_unix_server(Echo, path, ssl=server_context())
        reader, writer = await asyncio.open_unix_connection(
            path, ssl=client_context(), server_hostname=""
        )
        writer.write(b"unix")
        assert await reader.readexactly(4) == b"unix"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_start_tls_takes_any_truth_value_for_server_side(loop: asyncio.AbstractEventLoop) -> None:
    """server_side=1 on one end and 0 on the other (asyncio takes any truth
    value; tokioloop's native protocol wanted an exact bool)."""

    async def main() -> bytes:
        a, b = socket.socketpair()
        ta, pa = await loop.create_connection(Collect, sock=a)
        tb, pb = await loop.create_connection(Echo, sock=b)
        server = loop.start_tls(tb, pb, server_context(), server_side=1)
        client = loop.start_tls(ta, pa, client_context(), server_side=0, server_hostname="")
        tls_b, tls_a = await asyncio.gather(server, client)
        pb.transport = tls_b
        tls_a.write(b"ping")
        while bytes(pa.data) != b"ping":
            await asyncio.sleep(0.01)
        tls_a.close()
        tls_b.close()
        await asyncio.sleep(0.05)
        return bytes(pa.data)

    assert run(loop, main()) == b"ping"
