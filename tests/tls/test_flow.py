"""Flow control both ways, BufferedProtocol applications, start_tls, and a
loop closed under open TLS connections."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import warnings
from typing import Any

import pytest

from .conftest import PY311, Handled, client_context, run, server_context

CHUNK = 256 * 1024


class Sink(asyncio.Protocol):
    """Collects what arrives; starts with reading paused."""

    def __init__(self) -> None:
        self.made = asyncio.get_event_loop().create_future()
        self.received = 0
        self.digest = hashlib.sha256()
        self.calls_while_paused = 0
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        transport.pause_reading()  # type: ignore[attr-defined]
        self.paused = True
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        if self.paused:
            self.calls_while_paused += 1
        self.received += len(data)
        self.digest.update(data)


class Source(asyncio.Protocol):
    def __init__(self) -> None:
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.pauses = 0
        self.resumes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def pause_writing(self) -> None:
        self.pauses += 1
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.resumes += 1
        self.can_write.set()


def test_flow_control_both_ways(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """A receiver that does not read: the sender is paused, and neither side
    buffers more than its limits (plus one read or write) meanwhile; once
    the receiver reads again, everything arrives intact."""
    total = 48 * 1024 * 1024
    payload = os.urandom(CHUNK)
    sinks: list[Sink] = []

    def make_sink() -> Sink:
        s = Sink()
        sinks.append(s)
        return s

    async def main() -> None:
        server = await loop.create_server(make_sink, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        tr, src = await loop.create_connection(Source, "127.0.0.1", port, ssl=client_context())
        tr.set_write_buffer_limits(high=512 * 1024)
        server_tr = await sinks[0].made
        if PY311:
            server_tr.set_read_buffer_limits(high=256 * 1024)
        assert not server_tr.is_reading()

        sent = 0
        sender_buffer_max = 0
        reader_buffer_max = 0
        expect = hashlib.sha256()
        while sent < total:
            if not src.can_write.is_set():
                break
            tr.write(payload)
            expect.update(payload)
            sent += len(payload)
            sender_buffer_max = max(sender_buffer_max, tr.get_write_buffer_size())
            await asyncio.sleep(0)
        # The receiver does not read: the sender must have been paused long
        # before everything was written.
        assert src.pauses == 1
        assert sent < total
        for _ in range(20):
            await asyncio.sleep(0.01)
            if PY311:
                reader_buffer_max = max(reader_buffer_max, server_tr.get_read_buffer_size())
        assert sinks[0].received == 0
        assert sinks[0].calls_while_paused == 0
        assert sender_buffer_max <= 512 * 1024 + CHUNK
        if PY311:
            # What the TLS layer holds for the paused reader is bounded by
            # its limit plus what one read of the socket brings.
            assert reader_buffer_max <= 256 * 1024 + 256 * 1024 + 16 * 1024

        # Read again; write the rest as flow control allows.
        sinks[0].paused = False
        server_tr.resume_reading()
        while sent < total:
            await src.can_write.wait()
            tr.write(payload)
            expect.update(payload)
            sent += len(payload)
            sender_buffer_max = max(sender_buffer_max, tr.get_write_buffer_size())
        while sinks[0].received < total:
            await asyncio.sleep(0.01)
        assert sinks[0].received == total
        assert sinks[0].digest.digest() == expect.digest()
        assert src.resumes >= 1
        assert sender_buffer_max <= 512 * 1024 + CHUNK
        tr.close()
        server.close()
        await server.wait_closed()

    run(loop, main(), timeout=120)
    assert handled.contexts == []


def test_pause_reading_holds_data_back(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def main() -> None:
        sinks: list[Sink] = []

        def make() -> Sink:
            s = Sink()
            sinks.append(s)
            return s

        server = await loop.create_server(make, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        server_tr = await sinks[0].made
        writer.write(b"x" * 100_000)
        await writer.drain()
        await asyncio.sleep(0.2)
        assert sinks[0].received == 0
        assert server_tr.is_reading() is False
        sinks[0].paused = False
        server_tr.resume_reading()
        assert server_tr.is_reading() is True
        while sinks[0].received < 100_000:
            await asyncio.sleep(0.01)
        server_tr.pause_reading()
        sinks[0].paused = True
        writer.write(b"y" * 1000)
        await asyncio.sleep(0.2)
        assert sinks[0].received == 100_000
        assert sinks[0].calls_while_paused == 0
        # (A reader that stays paused would not see the close_notify either.)
        sinks[0].paused = False
        server_tr.resume_reading()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


class BufferedEcho(asyncio.BufferedProtocol):
    instances: list[BufferedEcho] = []

    kind: Any = memoryview

    def __init__(self) -> None:
        self.buf = self.kind(bytearray(1000))
        self.hints: list[int] = []
        BufferedEcho.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def get_buffer(self, sizehint: int) -> Any:
        self.hints.append(sizehint)
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        assert 0 < nbytes <= len(self.buf)
        self.transport.write(bytes(self.buf[:nbytes]))

    def eof_received(self) -> None:
        pass


@pytest.mark.parametrize("kind", [memoryview, bytearray])
def test_buffered_protocol_application(
    loop: asyncio.AbstractEventLoop, handled: Handled, loop_name: str, kind: Any
) -> None:
    """An application BufferedProtocol with a small buffer: the TLS layer
    fills it as often as needed; every byte comes back in order."""
    if kind is bytearray and loop_name == "asyncio":
        pytest.skip(
            "asyncio fills the rest of a buffer through buf[offset:], a copy for "
            "a bytearray: it loses data (tokioloop slices a memoryview of it)"
        )
    BufferedEcho.instances = []
    BufferedEcho.kind = kind
    payload = os.urandom(2 * 1024 * 1024 + 17)

    async def main() -> None:
        server = await loop.create_server(BufferedEcho, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        writer.write(payload)
        got = await reader.readexactly(len(payload))
        assert got == payload
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main(), timeout=60)
    proto = BufferedEcho.instances[0]
    assert len(proto.hints) > len(payload) // 1000
    assert all(h >= 0 for h in proto.hints)
    assert handled.contexts == []


class LineProtocol(asyncio.Protocol):
    """Plain text until STARTTLS, then whatever the TLS transport brings."""

    def __init__(self, server_side: bool) -> None:
        self.server_side = server_side
        self.data = bytearray()
        self.got = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    upgrading = False

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.upgrading:
            # As with asyncio, data that came with the end of the handshake
            # arrives before start_tls() returns the new transport: keep it.
            return
        if self.server_side and self.data == b"STARTTLS\n":
            self.data.clear()
            self.transport.write(b"GO\n")
            self.upgrading = True
            asyncio.ensure_future(self.upgrade())
        elif self.server_side and self.data.endswith(b"\n") and self.data != b"":
            self.transport.write(b"echo:" + bytes(self.data))
            self.data.clear()
        elif not self.got.done() and self.data.endswith(b"\n"):
            self.got.set_result(bytes(self.data))
            self.data.clear()

    async def upgrade(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport = await loop.start_tls(
            self.transport, self, server_context(), server_side=True
        )
        self.upgrading = False
        if self.data:
            self.data_received(b"")


def test_start_tls_upgrade(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def main() -> None:
        server = await loop.create_server(lambda: LineProtocol(True), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(lambda: LineProtocol(False), "127.0.0.1", port)
        tr.write(b"STARTTLS\n")
        assert await proto.got == b"GO\n"
        ctx = client_context()
        tls = await loop.start_tls(tr, proto, ctx)
        assert isinstance(tls, asyncio.Transport)
        assert tls is not tr
        assert tls.get_extra_info("sslcontext") is ctx
        assert tls.get_extra_info("cipher") is not None
        assert tls.get_protocol() is proto
        proto.transport = tls
        proto.got = loop.create_future()
        tls.write(b"secret\n")
        assert await proto.got == b"echo:secret\n"
        tls.close()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


@pytest.mark.skipif(not PY311, reason="StreamWriter.start_tls is new in Python 3.11")
def test_stream_writer_start_tls(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"STARTTLS\n"
        writer.write(b"GO\n")
        await writer.drain()
        await writer.start_tls(server_context())
        line = await reader.readline()
        writer.write(b"tls:" + line)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        await writer.start_tls(client_context())
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"hello\n")
        assert await reader.readline() == b"tls:hello\n"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_start_tls_wrong_arguments(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        with pytest.raises(TypeError, match="SSLContext, got 'ctx'"):
            await loop.start_tls(tr, proto, "ctx")  # type: ignore[arg-type]

        class Unsupported(asyncio.Transport):
            pass

        with pytest.raises(TypeError, match="is not supported by start_tls"):
            await loop.start_tls(Unsupported(), proto, client_context())
        tr.close()
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_loop_closed_with_tls_connections_open(loop: asyncio.AbstractEventLoop) -> None:
    """Closing the loop under open TLS connections: no crash, no hang; the
    sockets are closed when the transports go away (the fixture checks for
    leaked file descriptors)."""
    keep: list[Any] = []

    class Hold(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            keep.append(transport)

        def data_received(self, data: bytes) -> None:
            keep[0].write(data)

    async def main() -> None:
        server = await loop.create_server(Hold, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context())
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        keep.extend([server, reader, writer])

    run(loop, main())
    loop.close()
    client_tr = keep[3].transport
    server_tr = keep[0]
    for tr in (client_tr, server_tr):
        assert not tr.is_closing()
        # The loop is gone: these may raise RuntimeError, never crash.
        for name, args in (
            ("write", (b"late",)),
            ("pause_reading", ()),
            ("resume_reading", ()),
            ("close", ()),
        ):
            try:
                getattr(tr, name)(*args)
            except RuntimeError:
                pass
    keep.clear()
    del client_tr, server_tr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
