"""Stream transports (TCP and Unix sockets) under faults: a peer that
resets in the middle of our writes, half-closed connections, a slow reader
with a fast writer, and pause_reading()."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

import tokioloop

from ._util import (
    call_outcome,
    exc_name,
    fds_released,
    on_both,
    outcome,
    pending_bytes,
    quiet_window,
    run_on,
    set_linger_reset,
    wait_until,
)

KINDS = ["tcp", "unix"]


@pytest.fixture
def sockdir() -> Iterator[str]:
    # short: AF_UNIX paths are limited to 107 bytes
    with tempfile.TemporaryDirectory(prefix="tlf", dir="/tmp") as d:
        yield d


_counter = iter(range(1 << 30))


async def serve(
    loop: asyncio.AbstractEventLoop, kind: str, factory: Any, sockdir: str
) -> tuple[asyncio.AbstractServer, Any]:
    if kind == "tcp":
        server = await loop.create_server(factory, "127.0.0.1", 0)
        return server, server.sockets[0].getsockname()
    path = os.path.join(sockdir, f"s{next(_counter)}")
    server = await loop.create_unix_server(factory, path)
    return server, path


async def connect(
    loop: asyncio.AbstractEventLoop, kind: str, factory: Any, addr: Any
) -> tuple[asyncio.Transport, Any]:
    if kind == "tcp":
        return await loop.create_connection(factory, *addr)  # type: ignore[return-value]
    return await loop.create_unix_connection(factory, addr)  # type: ignore[return-value]


async def raw_peer(loop: asyncio.AbstractEventLoop, kind: str, addr: Any) -> socket.socket:
    family = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    peer = socket.socket(family, socket.SOCK_STREAM)
    peer.setblocking(False)
    await loop.sock_connect(peer, addr)
    return peer


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


LOST_AFTER_RESET = {"None", "ConnectionResetError", "BrokenPipeError"}


@pytest.mark.parametrize("kind", KINDS)
def test_peer_reset_in_the_middle_of_a_write(kind: str, sockdir: str) -> None:
    """We have megabytes queued when the peer resets (SO_LINGER 0 close;
    for Unix sockets: close with unread data). connection_lost() gets a
    reset/broken pipe (or None), nothing reaches the exception handler,
    later writes are dropped with asyncio's warning, no fd stays open."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
        made: asyncio.Future[asyncio.Transport] = loop.create_future()
        lost: asyncio.Future[BaseException | None] = loop.create_future()
        calls: list[str] = []

        class Writer(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                made.set_result(transport)

            def pause_writing(self) -> None:
                calls.append("pause")

            def resume_writing(self) -> None:
                calls.append("resume")

            def connection_lost(self, exc: BaseException | None) -> None:
                calls.append("lost")
                lost.set_result(exc)

        server, addr = await serve(loop, kind, Writer, sockdir)
        peer = await raw_peer(loop, kind, addr)
        tr = await made
        tr.write(os.urandom(16 << 20))  # far more than the socket buffers hold
        buffered = tr.get_write_buffer_size()
        first = await loop.sock_recv(peer, 65536)
        if kind == "tcp":
            set_linger_reset(peer)
        peer.close()
        exc = await lost
        log = _ListHandler()
        logging.getLogger("asyncio").addHandler(log)
        try:
            for _ in range(8):
                tr.write(b"after the reset")  # dropped; warned from the 6th on
        finally:
            logging.getLogger("asyncio").removeHandler(log)
        state = (tr.is_closing(), tr.get_write_buffer_size())
        server.close()
        await server.wait_closed()
        warned = sum("socket.send() raised exception." in m for m in log.messages)
        return buffered > 0, len(first) > 0, exc_name(exc), calls, state, warned

    with fds_released():
        runs = on_both(main)
    for name, run in runs.items():
        buffered, got_some, exc, calls, state, warned = run.result
        assert buffered and got_some, name
        assert exc in LOST_AFTER_RESET, (name, exc)
        assert calls[0] == "pause" and calls[-1] == "lost" and calls.count("lost") == 1, calls
        assert state == (True, 0), (name, state)
        assert run.errors == [], (name, run.error_messages())
    assert runs["tokioloop"].result[5] == runs["asyncio"].result[5]


@pytest.mark.parametrize("kind", KINDS)
def test_peer_reset_while_streams_write_and_drain(kind: str, sockdir: str) -> None:
    """A StreamWriter writing in a write()/drain() loop: the reset surfaces as
    ConnectionResetError/BrokenPipeError from drain(), on both loops."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, int]:
        accepted: asyncio.Future[socket.socket] = loop.create_future()

        def on_client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.set_result(w)  # type: ignore[arg-type]

        if kind == "tcp":
            server = await asyncio.start_server(on_client, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        else:
            path = os.path.join(sockdir, f"s{next(_counter)}")
            server = await asyncio.start_unix_server(on_client, path)
            reader, writer = await asyncio.open_unix_connection(path)
        server_writer: Any = await accepted
        peer = server_writer.get_extra_info("socket")
        chunk = b"y" * 65536
        written = 0

        async def pump() -> None:
            nonlocal written
            while True:
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()

        task = asyncio.ensure_future(pump())
        # Let the writer fill the socket buffers, then reset from the peer.
        await wait_until(lambda: writer.transport.get_write_buffer_size() > 0)
        if kind == "tcp":
            set_linger_reset(peer)
        server_writer.transport.abort()
        result = await asyncio.gather(task, return_exceptions=True)
        writer.close()
        closed = await outcome(writer.wait_closed())  # raises what connection_lost got
        server.close()
        await server.wait_closed()
        return exc_name(result[0]), written, closed[0]

    with fds_released():
        runs = on_both(main)
    for name, run in runs.items():
        exc, written, closed = run.result
        assert exc in {"ConnectionResetError", "BrokenPipeError"}, (name, exc)
        assert closed in {"ok", "ConnectionResetError", "BrokenPipeError"}, (name, closed)
        assert written > 65536, name
        assert run.errors == [], (name, run.error_messages())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep_open", [True, False], ids=["keep_open", "close_on_eof"])
def test_half_close(kind: str, keep_open: bool, sockdir: str) -> None:
    """write_eof() on the client: the server gets eof_received(). If that
    returns True the server's transport stays open for writing (it answers
    after the EOF and then closes); else the transport closes itself."""

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        seen: dict[str, Any] = {"server": [], "client": []}
        server_lost: asyncio.Future[BaseException | None] = loop.create_future()
        client_lost: asyncio.Future[BaseException | None] = loop.create_future()

        class Server(asyncio.Protocol):
            data = b""

            def connection_made(self, transport: Any) -> None:
                self.tr = transport

            def data_received(self, data: bytes) -> None:
                self.data += data

            def eof_received(self) -> bool | None:
                seen["server"].append(("eof", self.data, self.tr.is_closing()))
                if not keep_open:
                    loop.call_soon(lambda: seen["server"].append(("after", self.tr.is_closing())))
                    return None
                self.tr.write(b"reply to " + self.data)
                loop.call_soon(self.after_eof)
                return True

            def after_eof(self) -> None:
                # eof_received() returned True: still open, still writable
                seen["server"].append(("after", self.tr.is_closing()))
                self.tr.write(b"!")
                self.tr.close()

            def connection_lost(self, exc: BaseException | None) -> None:
                server_lost.set_result(exc)

        class Client(asyncio.Protocol):
            data = b""

            def data_received(self, data: bytes) -> None:
                self.data += data

            def eof_received(self) -> None:
                seen["client"].append(("eof", self.data))

            def connection_lost(self, exc: BaseException | None) -> None:
                client_lost.set_result(exc)

        server, addr = await serve(loop, kind, Server, sockdir)
        tr, _ = await connect(loop, kind, Client, addr)
        seen["can_write_eof"] = tr.can_write_eof()
        tr.write(b"hello")
        tr.write_eof()
        seen["write_after_eof"] = call_outcome(lambda: tr.write(b"more"))
        seen["closing_after_write_eof"] = tr.is_closing()
        seen["lost"] = (exc_name(await server_lost), exc_name(await client_lost))
        server.close()
        await server.wait_closed()
        return seen

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ours == ref
    if keep_open:
        assert ref["client"] == [("eof", b"reply to hello!")]
        assert ref["server"] == [("eof", b"hello", False), ("after", False)]
    else:
        assert ref["client"] == [("eof", b"")]
        assert ref["server"] == [("eof", b"hello", False), ("after", True)]
    assert ours["write_after_eof"][0] == "RuntimeError"
    assert ours["lost"] == ("None", "None")
    for run in runs.values():
        assert run.errors == []


@pytest.mark.parametrize("kind", KINDS)
def test_write_eof_after_a_large_buffered_write(kind: str, sockdir: str) -> None:
    """write_eof() with megabytes still buffered: the EOF goes out after the
    last byte (the peer gets everything, then eof_received())."""
    payload = os.urandom(6 << 20)

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[int, bytes, bool]:
        done: asyncio.Future[tuple[bytes, bool]] = loop.create_future()

        class Sink(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.h = hashlib.sha256()
                self.eof_first = False

            def data_received(self, data: bytes) -> None:
                self.h.update(data)

            def eof_received(self) -> None:
                done.set_result((self.h.digest(), True))

        server, addr = await serve(loop, kind, Sink, sockdir)
        tr, _ = await connect(loop, kind, asyncio.Protocol, addr)
        tr.write(payload)
        pending = tr.get_write_buffer_size()
        tr.write_eof()
        digest, eof = await done
        tr.close()
        server.close()
        await server.wait_closed()
        return pending, digest, eof

    with fds_released():
        run = run_on(tokioloop.new_event_loop, main)
    pending, digest, eof = run.result
    assert pending > 0  # the EOF really had to wait for the buffer
    assert digest == hashlib.sha256(payload).digest() and eof
    assert run.errors == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reader_kind", ["protocol", "buffered"])
def test_slow_reader_fast_writer(kind: str, reader_kind: str, sockdir: str) -> None:
    """The writer writes as fast as flow control lets it, the reader reads
    with pauses. Memory stays bounded by the write buffer limits:
    pause_writing() above `high`, resume_writing() at or below `low`, the
    buffer never more than one chunk above `high`; every byte arrives, in
    order."""
    HIGH, LOW, CHUNK = 128 * 1024, 32 * 1024, 16 * 1024
    payload = os.urandom(8 << 20)
    want = hashlib.sha256(payload).digest()

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        events: list[tuple[str, int]] = []
        sizes: list[int] = []
        writer_paused = asyncio.Event()
        can_write = asyncio.Event()
        can_write.set()
        finished: asyncio.Future[bytes] = loop.create_future()
        reader_state: dict[str, int] = {"calls": 0, "bytes": 0}

        def shrink_buffers(transport: Any) -> None:
            # No autotuning: keep the kernel's share of the backlog small,
            # so that most of it is ours to bound.
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)

        class Writer(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                shrink_buffers(transport)
                transport.set_write_buffer_limits(high=HIGH, low=LOW)

            def pause_writing(self) -> None:
                events.append(("pause", self.tr.get_write_buffer_size()))
                can_write.clear()
                writer_paused.set()

            def resume_writing(self) -> None:
                events.append(("resume", self.tr.get_write_buffer_size()))
                can_write.set()

        class SlowReader:
            """Starts paused; after each chunk it pauses and resumes a
            little later."""

            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                self.h = hashlib.sha256()
                shrink_buffers(transport)
                transport.pause_reading()
                loop.create_task(self.start_when_writer_blocks())

            async def start_when_writer_blocks(self) -> None:
                await writer_paused.wait()
                self.tr.resume_reading()

            def got(self, data: bytes | memoryview) -> None:
                assert self.tr.is_reading()
                self.h.update(data)
                reader_state["calls"] += 1
                reader_state["bytes"] += len(data)
                if reader_state["bytes"] == len(payload):
                    finished.set_result(self.h.digest())
                    return
                self.tr.pause_reading()
                loop.call_later(0.0005, self.tr.resume_reading)

            def eof_received(self) -> None:
                pass

            def connection_lost(self, exc: BaseException | None) -> None:
                if not finished.done():
                    finished.set_exception(AssertionError(f"lost early: {exc!r}"))

        class PlainReader(SlowReader, asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                self.got(data)

        class BufferedReader(SlowReader, asyncio.BufferedProtocol):
            buf = bytearray(50001)  # odd size: reads never line up with writes

            def get_buffer(self, sizehint: int) -> bytearray:
                return self.buf

            def buffer_updated(self, nbytes: int) -> None:
                self.got(memoryview(self.buf)[:nbytes])

        reader_cls = PlainReader if reader_kind == "protocol" else BufferedReader
        server, addr = await serve(loop, kind, reader_cls, sockdir)
        tr, _ = await connect(loop, kind, Writer, addr)
        limits = tr.get_write_buffer_limits()
        view = memoryview(payload)
        for off in range(0, len(payload), CHUNK):
            await can_write.wait()
            tr.write(view[off : off + CHUNK])
            sizes.append(tr.get_write_buffer_size())
        digest = await finished
        tr.close()
        server.close()
        await server.wait_closed()
        return {
            "events": events,
            "max_size": max(sizes),
            "digest": digest,
            "limits": limits,
            "reads": reader_state["calls"],
        }

    with fds_released():
        run = run_on(tokioloop.new_event_loop, main, timeout=20)
    r = run.result
    assert r["limits"] == (LOW, HIGH)
    assert r["digest"] == want
    events = r["events"]
    assert len(events) >= 4, events
    for i, (what, size) in enumerate(events):
        assert what == ("pause" if i % 2 == 0 else "resume"), events
        if what == "pause":
            assert HIGH < size <= HIGH + CHUNK, events
        else:
            assert size <= LOW, events
    assert r["max_size"] <= HIGH + CHUNK, r["max_size"]
    assert run.errors == []


@pytest.mark.parametrize("kind", KINDS)
def test_pause_reading_stops_data_received(kind: str, sockdir: str) -> None:
    """While paused, data waits in the kernel (FIONREAD shows it) and
    data_received() is not called, not even for the rest of a burst that
    was being read when pause_reading() was called; an EOF is not seen
    either. resume_reading() delivers it all, in order."""

    async def main(loop: asyncio.AbstractEventLoop) -> None:
        made: asyncio.Future[Any] = loop.create_future()
        chunks: list[bytes] = []
        eof: list[bool] = []
        lost: asyncio.Future[BaseException | None] = loop.create_future()

        class Reader(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                made.set_result(transport)

            def data_received(self, data: bytes) -> None:
                chunks.append(data)
                self.tr.pause_reading()  # at most one call per resume

            def eof_received(self) -> None:
                eof.append(True)

            def connection_lost(self, exc: BaseException | None) -> None:
                lost.set_result(exc)

        server, addr = await serve(loop, kind, Reader, sockdir)
        peer = await raw_peer(loop, kind, addr)
        tr = await made
        fd = tr.get_extra_info("socket").fileno()

        tr.pause_reading()
        assert not tr.is_reading()
        await loop.sock_sendall(peer, b"a" * 1000)
        await wait_until(lambda: pending_bytes(fd) == 1000)
        await quiet_window()
        assert chunks == [] and pending_bytes(fd) == 1000

        tr.resume_reading()
        assert tr.is_reading()
        await wait_until(lambda: len(chunks) == 1)
        assert chunks == [b"a" * 1000]
        assert not tr.is_reading()  # paused by data_received

        # A burst larger than one read: the protocol pauses after the first
        # chunk and must not get the rest until it resumes.
        burst = os.urandom(3 << 20)
        sender = loop.create_task(loop.sock_sendall(peer, burst))
        await wait_until(lambda: pending_bytes(fd) > 0)
        tr.resume_reading()
        await wait_until(lambda: len(chunks) == 2)
        await quiet_window()
        assert len(chunks) == 2
        while sum(map(len, chunks)) < 1000 + len(burst):
            n = len(chunks)
            tr.resume_reading()
            await wait_until(lambda: len(chunks) > n)  # noqa: B023
            assert len(chunks) == n + 1
        await sender
        assert b"".join(chunks) == b"a" * 1000 + burst

        # EOF while paused: not reported until resumed.
        peer.close()
        await quiet_window()
        assert eof == [] and not lost.done()
        tr.resume_reading()
        assert await lost is None
        assert eof == [True]
        server.close()
        await server.wait_closed()

    with fds_released():
        runs = on_both(main)
    for run in runs.values():
        assert run.errors == []


@pytest.mark.parametrize("where", ["write", "read"])
def test_transport_oserrors_carry_errno(where: str) -> None:
    """connection_lost() gets an OSError with errno and strerror set, as
    the socket module makes them: EPIPE from a write to a closed peer,
    ECONNRESET from a read after the peer reset."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
        lost: asyncio.Future[BaseException | None] = loop.create_future()

        class Proto(asyncio.Protocol):
            def connection_lost(self, exc: BaseException | None) -> None:
                lost.set_result(exc)

        if where == "write":
            a, b = socket.socketpair()
            tr, _ = await loop.create_connection(Proto, sock=a)
            b.close()
            tr.write(b"x" * 100)
        else:
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen()
            tr, _ = await loop.create_connection(Proto, *lsock.getsockname())
            peer, _ = lsock.accept()
            lsock.close()
            tr.write(b"unread")  # unread data makes the close a reset
            await wait_until(lambda: pending_bytes(peer) > 0)
            set_linger_reset(peer)
            peer.close()
        exc = await lost
        assert isinstance(exc, OSError)
        return type(exc).__name__, exc.errno, exc.strerror, str(exc)

    runs = on_both(main)
    ref = runs["asyncio"].result
    assert ref[1] is not None
    assert runs["tokioloop"].result == ref


@pytest.mark.parametrize("kind", KINDS)
def test_eof_kept_open_then_resume_reading(kind: str, sockdir: str) -> None:
    """eof_received() returns True (keep the transport open for writing);
    the application then calls resume_reading(), as StreamReader's flow
    control may."""

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        seen: dict[str, Any] = {"eof_calls": 0}
        made: asyncio.Future[Any] = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                made.set_result(transport)

            def eof_received(self) -> bool:
                seen["eof_calls"] += 1
                return True

        server, addr = await serve(loop, kind, Server, sockdir)
        peer = await raw_peer(loop, kind, addr)
        tr = await made
        peer.shutdown(socket.SHUT_WR)
        await wait_until(lambda: seen["eof_calls"] > 0)
        seen["reading_after_eof"] = tr.is_reading()
        tr.resume_reading()  # not paused: nothing to do
        await quiet_window()
        seen["eof_calls_after_resume"] = seen["eof_calls"]
        seen["writable"] = call_outcome(lambda: tr.write(b"still open"))
        seen["peer_got"] = await loop.sock_recv(peer, 100)
        tr.close()
        peer.close()
        server.close()
        await server.wait_closed()
        return seen

    with fds_released():
        runs = on_both(main)
    assert runs["asyncio"].result["eof_calls"] == 1
    assert runs["tokioloop"].result == runs["asyncio"].result


def test_write_eof_after_the_peer_reset_closes_the_transport() -> None:
    """shutdown(SHUT_WR) fails (ENOTCONN) once the peer reset the
    connection. asyncio raises that from write_eof() and leaves the dead
    transport open, so Server.wait_closed() (3.12+) waits until someone
    closes it (amqtt's broker never did: its shutdown hung). tokioloop
    reports it as uvloop does: the transport's fatal error, connection_lost()
    with the OSError, and the server's close completes."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
        lost: asyncio.Future[BaseException | None] = loop.create_future()
        got_eof = asyncio.Event()

        class Server(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                server_side.append(self)

            def eof_received(self) -> bool:
                got_eof.set()
                return True  # keep the transport open, as streams do

            def connection_lost(self, exc: BaseException | None) -> None:
                if not lost.done():
                    lost.set_result(exc)

        server_side: list[Server] = []
        srv = await loop.create_server(Server, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        peer = socket.create_connection(("127.0.0.1", port))
        peer.sendall(b"hello")
        peer.close()  # a FIN: the server sees EOF and stops reading
        await got_eof.wait()
        tr = server_side[0].tr
        tr.write(b"reply")  # the peer's kernel answers with a RST
        await asyncio.sleep(0.1)
        outcome_of_write_eof = call_outcome(tr.write_eof)
        exc = await asyncio.wait_for(lost, 2)
        srv.close()
        await asyncio.wait_for(srv.wait_closed(), 2)
        return outcome_of_write_eof, type(exc).__name__, getattr(exc, "errno", None)

    with fds_released():
        run = run_on(tokioloop.new_event_loop, main, timeout=5)
    assert run.result == (("ok", ""), "OSError", 107)
    assert run.errors == []  # an OSError is not logged, as asyncio's fatal errors
