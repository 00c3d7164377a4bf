"""Where tokioloop's TLS does what uvloop does because asyncio's fails:

* an application protocol with get_buffer()/buffer_updated() and no
  data_received() is served as a buffered one (asyncio calls the missing
  data_received());
* after start_tls(), data that came with the end of the handshake reaches
  the protocol after start_tls() has returned the new transport (asyncio
  delivers it before, when the protocol cannot yet answer over TLS);
* application data arriving after close() is dropped (asyncio's shutdown
  fails on it with OpenSSL 3: APPLICATION_DATA_AFTER_CLOSE_NOTIFY);
* the application protocol's callbacks run in the connection's context
  whatever context the transport is called from (asyncio runs
  pause_writing() in the writer's and data after resume_reading() in the
  resumer's), start_tls() included (asyncio uses start_tls()'s caller's).

These run on tokioloop only.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import ssl
import threading
from typing import Any

import pytest

from .conftest import Handled, client_context, run, server_context
from .test_errors import peer


@pytest.fixture(params=["tokioloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def bio_handshake(
    sock: socket.socket, sslobj: ssl.SSLObject, out: ssl.MemoryBIO, inc: ssl.MemoryBIO
) -> None:
    while True:
        try:
            sslobj.do_handshake()
            return
        except ssl.SSLWantReadError:
            if out.pending:
                sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError from None
            inc.write(data)


def test_duck_typed_buffered_application(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    class Duck(asyncio.BaseProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(64)
            self.got = bytearray()
            self.done = asyncio.get_event_loop().create_future()

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.got += self.buf[:nbytes]
            if len(self.got) >= 1000 and not self.done.done():
                self.done.set_result(bytes(self.got))

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(bytes(range(250)) * 4)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await loop.create_server(Hello, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(Duck, "127.0.0.1", port, ssl=client_context())
        assert await proto.done == bytes(range(250)) * 4
        tr.close()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_start_tls_data_with_the_handshake(
    loop: asyncio.AbstractEventLoop, handled: Handled
) -> None:
    """The client's first data rides with its last handshake message; the
    server's protocol answers on the transport start_tls() gave it."""
    cctx = client_context()
    answer: list[bytes] = []

    def client(sock: socket.socket) -> None:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = cctx.wrap_bio(inc, out)
        sock.sendall(b"STARTTLS\n")
        assert sock.recv(3) == b"GO\n"
        bio_handshake(sock, sslobj, out, inc)
        sslobj.write(b"hello")
        sock.sendall(out.read())  # Finished and the data, in one segment
        while True:
            try:
                answer.append(sslobj.read(1024))
                return
            except ssl.SSLWantReadError:
                inc.write(sock.recv(65536))

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.tr: Any = transport

        def data_received(self, data: bytes) -> None:
            if data == b"STARTTLS\n":
                self.tr.write(b"GO\n")
                asyncio.ensure_future(self.upgrade())
            else:
                self.tr.write(b"echo:" + data)

        async def upgrade(self) -> None:
            self.tr = await asyncio.get_running_loop().start_tls(
                self.tr, self, server_context(), server_side=True
            )

    async def main() -> None:
        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        thread = threading.Thread(
            target=lambda: client(socket.create_connection(("127.0.0.1", port), timeout=10))
        )
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert answer == [b"echo:hello"]
    assert handled.contexts == []


def test_data_after_close_is_dropped(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """The peer answers our close_notify with more data, then its own
    close_notify: the connection still ends cleanly, without that data."""
    sctx = server_context()

    def prog(sock: socket.socket) -> None:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        sslobj = sctx.wrap_bio(inc, out, server_side=True)
        bio_handshake(sock, sslobj, out, inc)
        if out.pending:
            sock.sendall(out.read())
        while True:  # wait for the client's close_notify
            try:
                if sslobj.read(1024) == b"":
                    break
            except ssl.SSLWantReadError:
                inc.write(sock.recv(65536))
            except ssl.SSLZeroReturnError:
                break
        sslobj.write(b"too late")
        sock.sendall(out.read())
        try:
            sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass
        sock.sendall(out.read())
        while sock.recv(65536):
            pass

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.lost = asyncio.get_event_loop().create_future()

        def data_received(self, data: bytes) -> None:
            self.data += data

        def connection_lost(self, exc: BaseException | None) -> None:
            self.lost.set_result(exc)

    with peer(prog) as addr:
        tr, proto = run(loop, loop.create_connection(Client, *addr, ssl=client_context()))
        tr.close()
        assert run(loop, proto.lost) is None
    assert proto.data == b""
    assert handled.contexts == []


CVAR: contextvars.ContextVar[str] = contextvars.ContextVar("tls_test_cvar", default="unset")


class Recorder(asyncio.Protocol):
    """Records the context variable's value in each callback."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.transport: Any = None
        self.data = asyncio.get_event_loop().create_future()
        self.lost = asyncio.get_event_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.seen.append(("connection_made", CVAR.get()))

    def data_received(self, data: bytes) -> None:
        self.seen.append(("data_received", CVAR.get()))
        if not self.data.done():
            self.data.set_result(data)

    def pause_writing(self) -> None:
        self.seen.append(("pause_writing", CVAR.get()))

    def resume_writing(self) -> None:
        self.seen.append(("resume_writing", CVAR.get()))

    def eof_received(self) -> None:
        self.seen.append(("eof_received", CVAR.get()))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.seen.append(("connection_lost", CVAR.get()))
        self.lost.set_result(exc)


def test_callbacks_run_in_the_connection_context(
    loop: asyncio.AbstractEventLoop, handled: Handled
) -> None:
    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            transport.pause_reading()  # type: ignore[attr-defined]
            sinks.append(self)

        def data_received(self, data: bytes) -> None:
            pass

    sinks: list[Sink] = []

    async def main() -> None:
        server = await loop.create_server(Sink, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        CVAR.set("connect")
        tr, proto = await loop.create_connection(Recorder, "127.0.0.1", port, ssl=client_context())

        async def fill() -> None:
            CVAR.set("writer")
            tr.set_write_buffer_limits(high=256, low=128)
            while not tr.get_write_buffer_size():
                tr.write(b"q" * 16384)

        await fill_in_other_context(fill)
        assert ("pause_writing", "connect") in proto.seen
        while not sinks:
            await asyncio.sleep(0.01)
        sinks[0].transport.resume_reading()
        for _ in range(500):
            if ("resume_writing", "connect") in proto.seen:
                break
            await asyncio.sleep(0.01)
        assert ("resume_writing", "connect") in proto.seen

        # Data held while paused reaches data_received() in the connection's
        # context, not in that of the code that resumed reading.
        tr.pause_reading()
        sinks[0].transport.write(b"hello")
        await asyncio.sleep(0.05)
        assert not proto.data.done()

        def resume() -> None:
            CVAR.set("resumer")
            tr.resume_reading()

        contextvars.copy_context().run(resume)
        assert await proto.data == b"hello"

        def close() -> None:
            CVAR.set("closer")
            tr.close()

        contextvars.copy_context().run(close)
        await proto.lost
        server.close()
        await server.wait_closed()
        assert {ctx for _, ctx in proto.seen} == {"connect"}, proto.seen

    async def fill_in_other_context(fill: Any) -> None:
        await asyncio.ensure_future(fill())

    run(loop, main())
    assert handled.contexts == []


def test_start_tls_callbacks_run_in_the_transport_context(
    loop: asyncio.AbstractEventLoop, handled: Handled
) -> None:
    class Greeter(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            # Plain "starttls" from the client: answer "ok", then upgrade.
            self.transport.write(b"ok")  # type: ignore[attr-defined]

            async def upgrade() -> None:
                tls = await loop.start_tls(
                    self.transport,  # type: ignore[arg-type]
                    self,
                    server_context(),
                    server_side=True,
                )
                tls.write(b"secret")

            self.data_received = lambda data: None  # type: ignore[method-assign]
            loop.create_task(upgrade())

    async def main() -> None:
        server = await loop.create_server(Greeter, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        CVAR.set("connect")
        tr, proto = await loop.create_connection(Recorder, "127.0.0.1", port)
        tr.write(b"starttls")
        assert await proto.data == b"ok"
        proto.data = loop.create_future()
        CVAR.set("start_tls")
        tls = await loop.start_tls(tr, proto, client_context(), server_hostname="localhost")
        assert await proto.data == b"secret"
        tls.close()
        await proto.lost
        server.close()
        await server.wait_closed()
        assert {ctx for _, ctx in proto.seen} == {"connect"}, proto.seen

    run(loop, main())
    assert handled.contexts == []
