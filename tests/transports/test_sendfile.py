"""loop.sendfile() over transports: files larger than the socket buffers,
offset and count, data queued before it, writes during it, a peer that
goes away, TLS (the fallback path)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from ._util import LOOPS, call_outcome, fds_released, on_both, outcome, run_on, set_linger_reset
from .conftest import Certs

SIZE = 24 << 20


@pytest.fixture(scope="module")
def bigfile() -> Iterator[tuple[str, bytes]]:
    data = os.urandom(SIZE)
    with tempfile.NamedTemporaryFile(prefix="tlsf", delete=False) as f:
        f.write(data)
    try:
        yield f.name, data
    finally:
        os.unlink(f.name)


class Sink(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, want: int) -> None:
        self.h = hashlib.sha256()
        self.n = 0
        self.want = want
        self.done: asyncio.Future[bytes] = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)
        if self.n >= self.want and not self.done.done():
            self.done.set_result(self.h.digest())

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_exception(AssertionError(f"lost after {self.n} bytes: {exc!r}"))


async def connected_pair(
    loop: asyncio.AbstractEventLoop, kind: str, sink: Sink, sockdir: str
) -> tuple[Any, Any]:
    if kind == "tcp":
        server = await loop.create_server(lambda: sink, "127.0.0.1", 0)
        tr, _ = await loop.create_connection(asyncio.Protocol, *server.sockets[0].getsockname())
    else:
        path = os.path.join(sockdir, f"sf-{id(sink)}")
        server = await loop.create_unix_server(lambda: sink, path)
        tr, _ = await loop.create_unix_connection(asyncio.Protocol, path)
    return server, tr


@pytest.mark.parametrize("kind", ["tcp", "unix"])
@pytest.mark.parametrize(
    ("offset", "count"),
    [(0, None), (12_345, None), (1_000_001, 7 << 20), (SIZE - 10, 100)],
    ids=["whole", "offset", "offset+count", "count_past_end"],
)
def test_sendfile_large_file(
    bigfile: tuple[str, bytes], kind: str, offset: int, count: int | None
) -> None:
    """The peer gets exactly file[offset:offset+count]; sendfile returns the
    number of bytes sent and leaves the file position after them; the
    transport reads again afterwards."""
    path, data = bigfile
    want = data[offset : None if count is None else offset + count]

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
        with tempfile.TemporaryDirectory(prefix="tlsf", dir="/tmp") as d:
            sink = Sink(loop, len(want))
            server, tr = await connected_pair(loop, kind, sink, d)
            with open(path, "rb") as f:
                sent = await loop.sendfile(tr, f, offset, count)
                pos = f.tell()
            digest = await sink.done
            reading = tr.is_reading()
            tr.close()
            server.close()
            await server.wait_closed()
        return sent, pos, digest, reading

    with fds_released():
        runs = on_both(main, timeout=30)
    ours = runs["tokioloop"].result
    assert ours == (len(want), offset + len(want), hashlib.sha256(want).digest(), True)
    assert ours == runs["asyncio"].result


def test_sendfile_after_buffered_writes_and_writes_during_it(
    bigfile: tuple[str, bytes],
) -> None:
    """Data written before sendfile() goes first (sendfile waits for the
    buffer to drain); write() while sendfile runs raises RuntimeError."""
    path, data = bigfile
    prefix = os.urandom(4 << 20)

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[Any, ...]:
        with tempfile.TemporaryDirectory(prefix="tlsf", dir="/tmp") as d:
            sink = Sink(loop, len(prefix) + len(data))
            server, tr = await connected_pair(loop, "tcp", sink, d)
            tr.write(prefix)
            queued = tr.get_write_buffer_size() > 0
            with open(path, "rb") as f:
                task = asyncio.ensure_future(loop.sendfile(tr, f))
                await asyncio.sleep(0)
                during = call_outcome(lambda: tr.write(b"x"))
                sent = await task
            digest = await sink.done
            after = call_outcome(lambda: tr.write(b"more"))
            tr.close()
            server.close()
            await server.wait_closed()
        return queued, during, sent, digest, after

    with fds_released():
        runs = on_both(main, timeout=30)
    ours = runs["tokioloop"].result
    assert ours[0]
    assert ours[1] == ("RuntimeError", "unable to write; sendfile is in progress")
    assert ours[2] == len(data)
    assert ours[3] == hashlib.sha256(prefix + data).digest()
    assert ours == runs["asyncio"].result


def test_sendfile_peer_goes_away(bigfile: tuple[str, bytes]) -> None:
    """The peer resets after reading a little: sendfile raises (the same
    class as asyncio's: a ConnectionError) and the transport is closed."""
    path, _ = bigfile

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, bool]:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        tr, _ = await loop.create_connection(asyncio.Protocol, *lsock.getsockname())
        peer, _ = await loop.sock_accept(lsock)

        async def reset_soon() -> None:
            await loop.sock_recv(peer, 65536)
            set_linger_reset(peer)
            peer.close()

        resetter = asyncio.ensure_future(reset_soon())
        with open(path, "rb") as f:
            result = await outcome(loop.sendfile(tr, f))
        await resetter
        # The reset reaches the transport's reader within a few iterations
        # (how many depends on when each loop polls); both loops close it.
        for _ in range(100):
            if tr.is_closing():
                break
            await asyncio.sleep(0.01)
        closing = tr.is_closing()
        tr.close()
        lsock.close()
        return result[0], closing

    with fds_released():
        runs = on_both(main, timeout=30)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ref[0] in {"ConnectionResetError", "BrokenPipeError", "ConnectionError"}
    assert ours[0] in {"ConnectionResetError", "BrokenPipeError", "ConnectionError"}
    assert ours[1] == ref[1] is True


def test_sendfile_over_tls(bigfile: tuple[str, bytes], certs: Certs) -> None:
    """TLS transports cannot sendfile natively: asyncio's fallback reads the
    file and writes it through the TLS layer."""
    path, data = bigfile
    count = 5 << 20
    want = data[777 : 777 + count]

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[int, bytes]:
        sink = Sink(loop, len(want))
        server = await loop.create_server(lambda: sink, "127.0.0.1", 0, ssl=certs.server_context())
        tr, _ = await loop.create_connection(
            asyncio.Protocol,
            *server.sockets[0].getsockname(),
            ssl=certs.client_context(),
            server_hostname="localhost",
        )
        with open(path, "rb") as f:
            sent = await loop.sendfile(tr, f, 777, count)
        digest = await sink.done
        tr.close()
        server.close()
        await server.wait_closed()
        return sent, digest

    with fds_released():
        run = run_on(LOOPS["tokioloop"], main, timeout=30)
    assert run.result == (count, hashlib.sha256(want).digest())


def test_sendfile_fallback_over_a_native_transport() -> None:
    """A file object without a usable fd (BytesIO): the fallback path."""
    payload = os.urandom(3 << 20)

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[int, bytes]:
        sink = Sink(loop, len(payload))
        with tempfile.TemporaryDirectory(prefix="tlsf", dir="/tmp") as d:
            server, tr = await connected_pair(loop, "tcp", sink, d)
            sent = await loop.sendfile(tr, io.BytesIO(payload))
            digest = await sink.done
            tr.close()
            server.close()
            await server.wait_closed()
        return sent, digest

    runs = on_both(main)
    assert runs["asyncio"].result == (len(payload), hashlib.sha256(payload).digest())
    assert runs["tokioloop"].result == runs["asyncio"].result


def test_sock_sendfile_count_beyond_ssize_t_sends_the_file() -> None:
    """A count of 2**64 ("everything"): the file is sent, in blocks
    os.sendfile() takes (asyncio 3.12 raises OverflowError; 3.13 sends it)."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[int, bytes]:
        a, b = socket.socketpair()
        a.setblocking(False)
        with tempfile.TemporaryFile() as f:
            f.write(b"0123456789" * 100)
            f.flush()
            f.seek(0)
            sent = await loop.sock_sendfile(a, f, 0, 2**64)
        a.close()
        got = b""
        while chunk := await loop.sock_recv(b, 65536):
            got += chunk
        b.close()
        return sent, got

    with fds_released():
        run = run_on(LOOPS["tokioloop"], main)
    assert run.result == (1000, b"0123456789" * 100)
