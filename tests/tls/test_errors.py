"""TLS failures: timeouts, bad certificates, garbage from the peer, closing
and aborting in the middle of a handshake. Nothing may crash, hang or leak
a file descriptor (the `loop` fixture counts them), and what the
application and the exception handler see is what asyncio shows."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import tokioloop

from .conftest import (
    PY311,
    SIGNED_CERTFILE,
    Handled,
    client_context,
    needs_new_sslproto,
    run,
    server_context,
)

# SO_LINGER on, 0 seconds: close() sends a reset.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class Recorder(asyncio.Protocol):
    instances: list[Recorder] = []

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.lost = asyncio.get_event_loop().create_future()
        Recorder.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.events.append(("data", data))

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(("lost", type(exc).__name__ if exc else None))
        if not self.lost.done():
            self.lost.set_result(exc)


@pytest.fixture(autouse=True)
def _fresh_recorders() -> Iterator[None]:
    Recorder.instances = []
    yield
    Recorder.instances = []


@contextmanager
def peer(prog: Callable[[socket.socket], None]) -> Iterator[tuple[str, int]]:
    """A blocking TCP peer in a thread running `prog` on one accepted socket."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            failure.append(exc)
            return
        with conn:
            conn.settimeout(10)
            try:
                prog(conn)
            except OSError:
                pass  # the loop side went away: what several tests do
            except BaseException as exc:  # noqa: BLE001 - reported below
                failure.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()
    finally:
        thread.join(15)
        listener.close()
    assert not thread.is_alive(), "peer thread hung"
    if failure:
        raise failure[0]


def read_until_closed(conn: socket.socket) -> None:
    while conn.recv(65536):
        pass


def test_handshake_timeout(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """A peer that never answers the ClientHello."""
    with peer(read_until_closed) as addr:
        started = time.monotonic()
        with pytest.raises(
            ConnectionAbortedError, match="SSL handshake is taking longer than 0.3 seconds"
        ):
            run(
                loop,
                loop.create_connection(
                    Recorder, *addr, ssl=client_context(), ssl_handshake_timeout=0.3
                ),
            )
        assert 0.25 < time.monotonic() - started < 5
    assert Recorder.instances[0].events == []
    # ConnectionAbortedError is an OSError: logged in debug mode only.
    assert handled.contexts == []


def test_handshake_timeout_must_be_positive(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        # Connections wait in the backlog: the check is made once connected.
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        with pytest.raises(
            ValueError, match="ssl_handshake_timeout should be a positive number, got -1"
        ):
            await loop.create_connection(
                Recorder, "127.0.0.1", port, ssl=client_context(), ssl_handshake_timeout=-1
            )
        listener.close()

    run(loop, main())


def test_handshake_timeout_must_not_be_nan(loop: asyncio.AbstractEventLoop) -> None:
    """NaN passes asyncio's "<= 0" check and no timer can be set for it:
    a clear ValueError at once, instead of a handshake that never ends."""
    if not isinstance(loop, tokioloop.Loop):
        pytest.skip("asyncio accepts NaN (listed in the README)")

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        args = ["ssl_handshake_timeout"]
        if sys.version_info >= (3, 11):
            args.append("ssl_shutdown_timeout")
        for arg in args:
            with pytest.raises(ValueError, match=f"{arg} should be a positive number, got nan"):
                await asyncio.wait_for(
                    loop.create_connection(
                        Recorder, "127.0.0.1", port, ssl=client_context(), **{arg: float("nan")}
                    ),
                    10,
                )
        listener.close()

    run(loop, main())


def test_certificate_verification_failure(
    loop: asyncio.AbstractEventLoop, handled: Handled, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that verifies against a server with a self-signed certificate."""
    loop.set_debug(True)

    async def main() -> None:
        server = await loop.create_server(Recorder, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            await loop.create_connection(
                Recorder,
                "127.0.0.1",
                port,
                ssl=client_context(verify=True),
                server_hostname="localhost",
            )
        await asyncio.sleep(0.2)  # let the server side see the alert
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        run(loop, main())
    # SSLError is an OSError: a debug log line, no exception handler call
    # for it. In debug mode the server reports the connection it could not
    # set up (the client's alert reset it), as asyncio's server does.
    assert all(
        c["message"] == "Error on transport creation for incoming connection"
        for c in handled.contexts
    )
    assert any(
        "SSL handshake failed on verifying the certificate" in r.getMessage()
        for r in caplog.records
    )
    # Neither application protocol saw a connection.
    assert all(r.events == [] for r in Recorder.instances)


def test_hostname_mismatch(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    async def main() -> None:
        server = await loop.create_server(
            Recorder, "127.0.0.1", 0, ssl=server_context(SIGNED_CERTFILE, None)
        )
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await loop.create_connection(
                Recorder,
                "127.0.0.1",
                port,
                ssl=client_context(verify=True),
                server_hostname="not-localhost.example",
            )
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []


def test_plaintext_client_to_tls_server(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """Garbage instead of a ClientHello: the server drops the connection
    without its application protocol ever hearing of it."""

    async def main() -> None:
        server = await loop.create_server(Recorder, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        # The server answers with an alert (or nothing) and closes.
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []
    assert all(r.events == [] for r in Recorder.instances)


def test_garbage_after_handshake(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """A peer that completes the handshake, then sends bytes that are not a
    TLS record: the application sees connection_lost(SSLError)."""
    sctx = server_context()

    def prog(conn: socket.socket) -> None:
        tls = sctx.wrap_socket(conn, server_side=True)
        with tls:
            tls.sendall(b"hi")
            time.sleep(0.1)
            # Straight to the socket, under TLS: a record that fails to decrypt.
            os.write(tls.fileno(), b"\x17\x03\x03\x00\x20" + b"\xff" * 32)
            while os.read(tls.fileno(), 65536):
                pass

    with peer(prog) as addr:
        _, proto = run(loop, loop.create_connection(Recorder, *addr, ssl=client_context()))
        exc = run(loop, proto.lost)
    assert isinstance(exc, ssl.SSLError)
    assert proto.events[0] == "made"
    assert proto.events[1] == ("data", b"hi")
    assert proto.events[-1] == ("lost", type(exc).__name__)
    assert handled.contexts == []


def test_peer_resets_mid_handshake(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    def prog(conn: socket.socket) -> None:
        conn.recv(100)  # part of the ClientHello
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)

    with peer(prog) as addr:
        with pytest.raises((ConnectionResetError, ssl.SSLError)):
            run(loop, loop.create_connection(Recorder, *addr, ssl=client_context()))
    assert Recorder.instances[0].events == []
    assert handled.contexts == []


def test_peer_closes_mid_handshake(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    with peer(lambda conn: conn.recv(100)) as addr:
        with pytest.raises(ConnectionResetError):
            run(loop, loop.create_connection(Recorder, *addr, ssl=client_context()))
    assert Recorder.instances[0].events == []
    assert handled.contexts == []


def test_cancel_during_handshake(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """Cancelling create_connection while the handshake waits closes the
    connection quietly (asyncio: no error is reported for it)."""
    with peer(read_until_closed) as addr:

        async def main() -> None:
            task = asyncio.ensure_future(
                loop.create_connection(Recorder, *addr, ssl=client_context())
            )
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.05)

        run(loop, main())
    assert Recorder.instances[0].events == []
    assert handled.contexts == []


def test_server_side_client_vanishes_mid_handshake(
    loop: asyncio.AbstractEventLoop, handled: Handled
) -> None:
    async def main() -> None:
        server = await loop.create_server(Recorder, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        for linger in (False, True):
            sock = socket.create_connection(("127.0.0.1", port))
            # Half a ClientHello, then go away (with a reset the second time).
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            if linger:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            await asyncio.sleep(0.05)
            sock.close()
        await asyncio.sleep(0.2)
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert handled.contexts == []
    assert all(r.events == [] for r in Recorder.instances)


def test_abort_during_start_tls_handshake(
    loop: asyncio.AbstractEventLoop, handled: Handled
) -> None:
    """abort() of the plain transport while start_tls() waits for the peer."""
    with peer(read_until_closed) as addr:

        async def main() -> None:
            tr, proto = await loop.create_connection(Recorder, *addr)
            upgrade = asyncio.ensure_future(loop.start_tls(tr, proto, client_context()))
            await asyncio.sleep(0.1)
            assert not upgrade.done()
            tr.abort()
            # asyncio: connection_lost(None) wakes the waiter with no error
            # and lets go of the TLS transport: start_tls() returns None.
            assert await upgrade is None

        run(loop, main())
    assert handled.contexts == []


@pytest.mark.skipif(not PY311, reason="ssl_shutdown_timeout is new in Python 3.11")
def test_shutdown_timeout(loop: asyncio.AbstractEventLoop, handled: Handled) -> None:
    """A peer that never answers our close_notify: after ssl_shutdown_timeout
    the connection is dropped and connection_lost gets the TimeoutError."""
    sctx = server_context()
    release = threading.Event()

    def prog(conn: socket.socket) -> None:
        with sctx.wrap_socket(conn, server_side=True):
            release.wait(10)  # read nothing, answer nothing

    with peer(prog) as addr:
        tr, proto = run(
            loop,
            loop.create_connection(Recorder, *addr, ssl=client_context(), ssl_shutdown_timeout=0.3),
        )
        started = time.monotonic()
        tr.close()
        exc = run(loop, proto.lost)
        release.set()
        assert 0.25 < time.monotonic() - started < 5
    assert isinstance(exc, TimeoutError)
    assert str(exc) == "SSL shutdown timed out"
    assert handled.contexts == []


@pytest.mark.skipif(not PY311, reason="ssl_shutdown_timeout is new in Python 3.11")
def test_shutdown_timeout_must_be_positive(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        # Connections wait in the backlog: the check is made once connected.
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        with pytest.raises(
            ValueError, match="ssl_shutdown_timeout should be a positive number, got 0"
        ):
            await loop.create_connection(
                Recorder, "127.0.0.1", port, ssl=client_context(), ssl_shutdown_timeout=0
            )
        listener.close()

    run(loop, main())


def test_app_error_in_data_received(
    loop: asyncio.AbstractEventLoop, handled: Handled, loop_name: str
) -> None:
    """An exception from the application's data_received() is a fatal error
    of the SSL protocol, reported with asyncio's message and context keys."""
    needs_new_sslproto(loop_name)

    class Boom(Recorder):
        def data_received(self, data: bytes) -> None:
            raise RuntimeError("boom")

    class Hello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"hello")  # type: ignore[attr-defined]

    async def main() -> None:
        server = await loop.create_server(Hello, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        _, proto = await loop.create_connection(Boom, "127.0.0.1", port, ssl=client_context())
        exc = await proto.lost
        assert isinstance(exc, RuntimeError)
        server.close()
        await server.wait_closed()

    run(loop, main())
    assert len(handled.contexts) == 1
    ctx = handled.contexts[0]
    assert ctx["message"] == "Fatal error on SSL protocol"
    assert isinstance(ctx["exception"], RuntimeError)
    assert set(ctx) >= {"message", "exception", "transport", "protocol"}


def test_eof_received_true_is_warned(
    loop: asyncio.AbstractEventLoop,
    handled: Handled,
    caplog: pytest.LogCaptureFixture,
    loop_name: str,
) -> None:
    needs_new_sslproto(loop_name)

    class KeepOpen(Recorder):
        def eof_received(self) -> bool:
            super().eof_received()
            return True

    class CloseAfterHello(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"x")  # type: ignore[attr-defined]
            transport.close()

    async def main() -> None:
        server = await loop.create_server(CloseAfterHello, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        _, proto = await loop.create_connection(KeepOpen, "127.0.0.1", port, ssl=client_context())
        await proto.lost
        server.close()
        await server.wait_closed()

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        run(loop, main())
    assert any("has no effect when using ssl" in r.getMessage() for r in caplog.records)
    assert handled.contexts == []
