"""connect_read_pipe / connect_write_pipe: a round trip through a pipe, the
writer closing first, the reader closing first (idle and with data
queued), and what is not a pipe."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import tempfile
from typing import Any

import pytest

from ._util import (
    LOOPS,
    call_outcome,
    exc_name,
    fds_released,
    on_both,
    outcome,
    pending_bytes,
    quiet_window,
    run_on,
    wait_until,
)


class Reader(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.h = hashlib.sha256()
        self.n = 0
        self.events: list[tuple[Any, ...]] = []
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport
        self.events.append(("made",))

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def eof_received(self) -> None:
        self.events.append(("eof", self.n))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(("lost", exc_name(exc)))
        self.lost.set_result(None)


class Writer(asyncio.BaseProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.lost: asyncio.Future[None] = loop.create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: Any) -> None:
        self.events.append(("made",))

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(("lost", exc_name(exc)))
        self.lost.set_result(None)


async def pipe_pair(loop: asyncio.AbstractEventLoop) -> tuple[Any, Reader, Any, Writer]:
    r, w = os.pipe()
    rtr, rp = await loop.connect_read_pipe(lambda: Reader(loop), os.fdopen(r, "rb", 0))
    wtr, wp = await loop.connect_write_pipe(lambda: Writer(loop), os.fdopen(w, "wb", 0))
    return rtr, rp, wtr, wp


def test_round_trip_writer_closes_first() -> None:
    """8 MiB through a pipe with flow control; the writer closes (with data
    still queued): the reader gets every byte, then EOF, then
    connection_lost(None)."""
    payload = os.urandom(8 << 20)

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        rtr, rp, wtr, wp = await pipe_pair(loop)
        view = memoryview(payload)
        max_buffered = 0
        for off in range(0, len(payload), 1 << 18):
            await wp.can_write.wait()
            wtr.write(view[off : off + (1 << 18)])
            max_buffered = max(max_buffered, wtr.get_write_buffer_size())
        queued = wtr.get_write_buffer_size()
        wtr.close()  # flushes first
        closing = wtr.is_closing()
        await rp.lost
        await wp.lost
        write_after_close = call_outcome(lambda: wtr.write(b"x"))
        return {
            "digest": rp.h.digest(),
            "reader": rp.events,
            "writer": wp.events,
            "queued": queued > 0,
            "closing": closing,
            "max_buffered": max_buffered,
            "write_after_close": write_after_close,
            "reader_closing": rtr.is_closing(),
        }

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ours["digest"] == hashlib.sha256(payload).digest()
    assert ours["reader"] == [("made",), ("eof", len(payload)), ("lost", "None")]
    assert ours["writer"] == [("made",), ("lost", "None")]
    # bounded by the default limits (64 KiB high water) plus one write
    assert ours["max_buffered"] <= 64 * 1024 + (1 << 18)
    for key in ("reader", "writer", "closing", "write_after_close", "reader_closing"):
        assert ours[key] == ref[key], key


@pytest.mark.parametrize(
    "queued",
    [
        pytest.param(False, id="idle"),
        pytest.param(True, id="data_queued"),
    ],
)
def test_reader_closes_first(queued: bool) -> None:
    """The read end goes away. The write transport notices it (asyncio
    watches the write end for the hang-up) and closes: connection_lost(None)
    when idle, BrokenPipeError when data was still queued. Later writes
    are dropped."""

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        rtr, rp, wtr, wp = await pipe_pair(loop)
        if queued:
            rtr.pause_reading()
            wtr.write(b"q" * (1 << 20))  # fills the pipe, the rest stays queued
            assert wtr.get_write_buffer_size() > 0
        else:
            wtr.write(b"hello")
            await wait_until(lambda: rp.n >= 5)
        rtr.close()
        await rp.lost
        await asyncio.wait_for(wp.lost, 1)  # asyncio: at once
        after = [call_outcome(lambda: wtr.write(b"late")) for _ in range(3)]
        return {
            "reader": rp.events,
            "writer": wp.events,
            "after": after,
            "closing": wtr.is_closing(),
            "size": wtr.get_write_buffer_size(),
        }

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    want = "BrokenPipeError" if queued else "None"
    assert ref["writer"] == [("made",), ("lost", want)]
    assert ours == ref


def test_writer_fd_closed_by_the_other_side_of_a_socketpair() -> None:
    """A socket works as a 'pipe' too (asyncio allows it): the peer closing
    is EOF for the reader, and the write side sees its reader go away."""

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        rtr, rp = await loop.connect_read_pipe(lambda: Reader(loop), a)
        wtr, wp = await loop.connect_write_pipe(lambda: Writer(loop), c)
        b.sendall(b"via a socket")
        b.close()
        await rp.lost
        wtr.write(b"to d")
        assert d.recv(100) == b"to d"
        d.close()
        await wp.lost
        return {"reader": rp.events, "writer": wp.events}

    with fds_released():
        runs = on_both(main)
    assert runs["tokioloop"].result == runs["asyncio"].result
    assert runs["tokioloop"].result["reader"][1] == ("eof", 12)


@pytest.mark.parametrize("direction", ["read", "write"])
def test_not_a_pipe(direction: str) -> None:
    """A regular file is refused with asyncio's ValueError; the fd stays
    the caller's."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, str]:
        with tempfile.TemporaryFile() as f:
            if direction == "read":
                result = await outcome(loop.connect_read_pipe(asyncio.Protocol, f))
            else:
                result = await outcome(loop.connect_write_pipe(asyncio.BaseProtocol, f))
            assert not f.closed
            f.write(b"still mine")
            return result

    with fds_released():
        runs = on_both(main)
    assert runs["tokioloop"].result == runs["asyncio"].result
    assert runs["tokioloop"].result[0] == "ValueError"


def test_unpollable_character_device_is_refused_with_errno() -> None:
    """/dev/null passes the pipe check (a character device) but epoll
    refuses it. asyncio creates the transport and reports the registration's
    PermissionError to the exception handler later; tokioloop raises it from
    connect_read_pipe(), as the socket module would raise it: with `errno`
    and CPython's message (it had neither: "Operation not permitted (os
    error 1)")."""

    async def main(loop: asyncio.AbstractEventLoop) -> Any:
        with open("/dev/null", "rb") as f:
            try:
                tr, _ = await loop.connect_read_pipe(asyncio.Protocol, f)
            except OSError as e:
                # The half-made transport in the traceback (pytest and
                # debuggers show it) has a repr that does not raise.
                tb = e.__traceback__
                while tb is not None:
                    obj = tb.tb_frame.f_locals.get("self")
                    if isinstance(obj, asyncio.BaseTransport):
                        assert "not set up" in repr(obj)
                    tb = tb.tb_next
                return type(e).__name__, e.errno, str(e)
            await asyncio.sleep(0.01)
            tr.close()
            return None

    with fds_released():
        runs = on_both(main)
    assert runs["asyncio"].result is None
    reported = [c.get("exception") for c in runs["asyncio"].errors]
    assert any(isinstance(e, PermissionError) for e in reported), runs["asyncio"].errors
    assert runs["tokioloop"].result == (
        "PermissionError",
        errno.EPERM,
        "[Errno 1] Operation not permitted",
    )


def test_read_pipe_pause_resume_and_many_small_writes() -> None:
    """Pausing a read pipe stops data_received; 10,000 small writes arrive
    in order once resumed."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[bytes, int]:
        rtr, rp, wtr, wp = await pipe_pair(loop)
        rtr.pause_reading()
        expected = hashlib.sha256()
        for i in range(10_000):
            chunk = b"%05d," % i
            expected.update(chunk)
            wtr.write(chunk)
        # all of it is in the pipe (60 KB fit), waiting for us
        rfd = rtr.get_extra_info("pipe").fileno()
        await wait_until(lambda: wtr.get_write_buffer_size() == 0)
        assert pending_bytes(rfd) == 60_000
        await quiet_window()
        seen_while_paused = rp.n
        rtr.resume_reading()
        wtr.close()
        await rp.lost
        assert rp.h.digest() == expected.digest()
        return rp.h.digest(), seen_while_paused

    with fds_released():
        run = run_on(LOOPS["tokioloop"], main)
    assert run.result[1] == 0
