"""Stream transports read large arrivals straight into the bytes object they
hand to data_received() and small ones through the loop's shared buffer
(src/transports/stream.rs, on_readable). Whatever the mix of sizes, the
protocol sees every byte in order, as bytes objects, as on asyncio."""

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
