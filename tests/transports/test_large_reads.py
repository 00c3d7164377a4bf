"""Stream transports read large arrivals straight into the bytes object they
hand to data_received() and small ones through the loop's shared buffer
(src/transports/stream.rs, on_readable); sock_recv() does the same once its
reads come in large (src/loop/sock.rs, recv_bytes). Whatever the mix of
sizes, every byte arrives in order, as bytes objects, as on asyncio."""

from __future__ import annotations

import asyncio
import hashlib
import socket

from ._util import fds_released, on_both

# Large bursts (several reads of up to 256 KiB each) alternating with small
# messages, so that reads switch between the two ways many times.
PATTERN = [3 << 20, 100, 70_000, 1, 40_000, 5, 1 << 20, 33 * 1024, 200]


def _payload(i: int, size: int) -> bytes:
    block = hashlib.sha256(f"{i}:{size}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


class Collect(asyncio.Protocol):
    def __init__(self, want: int, done: asyncio.Future[None]) -> None:
        self.chunks: list[bytes] = []
        self.types: set[type] = set()
        self.want = want
        self.got = 0
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.types.add(type(data))
        self.chunks.append(data)
        self.got += len(data)
        if self.got >= self.want and not self.done.done():
            self.done.set_result(None)


def test_every_byte_in_order_whatever_the_read_sizes() -> None:
    expected = b"".join(_payload(i, n) for i, n in enumerate(PATTERN))

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, list[str]]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        done: asyncio.Future[None] = loop.create_future()
        tr, proto = await loop.connect_accepted_socket(lambda: Collect(len(expected), done), sock=a)
        for i, n in enumerate(PATTERN):
            await loop.sock_sendall(b, _payload(i, n))
            # let the reader catch up sometimes, so that reads are both
            # large (data piled up) and small (one message)
            if i % 2:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(done, 30)
        got = b"".join(proto.chunks)
        tr.close()
        b.close()
        await asyncio.sleep(0)
        return hashlib.sha256(got).hexdigest(), sorted(t.__name__ for t in proto.types)

    with fds_released():
        runs = on_both(main, timeout=60)
    want = hashlib.sha256(expected).hexdigest()
    assert runs["asyncio"].result == (want, ["bytes"])
    assert runs["tokioloop"].result == (want, ["bytes"])


def test_sock_recv_every_byte_in_order_whatever_the_read_sizes() -> None:
    """sock_recv() with buffer sizes under, around and over the loop's read
    buffer, against a peer sending large bursts and small messages."""
    expected = b"".join(_payload(i, n) for i, n in enumerate(PATTERN))
    sizes = [65536, 40_000, 16, 300_000, 33 * 1024, 1024]

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[str, list[str], int]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)

        async def send() -> None:
            for i, n in enumerate(PATTERN):
                await loop.sock_sendall(b, _payload(i, n))
                if i % 2:
                    await asyncio.sleep(0.01)

        sender = loop.create_task(send())
        chunks: list[bytes] = []
        got = 0
        k = 0
        while got < len(expected):
            n = sizes[k % len(sizes)]
            k += 1
            data = await asyncio.wait_for(loop.sock_recv(a, n), 30)
            assert 0 < len(data) <= n
            chunks.append(data)
            got += len(data)
            if k % 7 == 0:
                await asyncio.sleep(0.005)  # let data pile up: full reads
        await sender
        a.close()
        b.close()
        types = sorted({type(c).__name__ for c in chunks})
        return hashlib.sha256(b"".join(chunks)).hexdigest(), types, got

    with fds_released():
        runs = on_both(main, timeout=60)
    want = (hashlib.sha256(expected).hexdigest(), ["bytes"], len(expected))
    assert runs["asyncio"].result == want
    assert runs["tokioloop"].result == want
