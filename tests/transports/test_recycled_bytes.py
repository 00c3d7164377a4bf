"""The bytes object handed to data_received()/datagram_received() is reused
for the next read when the callback kept no reference to it
(src/loop/recycle.rs). Whatever a protocol does with its data (keeps it,
keeps a memoryview of it, hashes it, drops it), what it sees must be what
it would see on asyncio: objects it kept never change, and a reused object
has the right length, content and hash."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from typing import Any

from ._util import fds_released, on_both

# Sizes within 2x of each other (so that objects are reused) and outside
# (so that new ones are made), in one read each. The transport reads into
# the last object it gave back (when free) and past it into its own buffer:
# a message within 2x of that object lands in it, a larger one spans both.
SIZES = [1024, 700, 1024, 1000, 513, 1024, 3000, 1600, 2900, 40, 30, 64, 1024, 1, 2, 1024]
SIZES = (SIZES + [10_000, 9_000, 20_000, 30_000, 12_000, 5_000, 31_000, 16_000]) * 3


def _message(i: int, size: int) -> bytes:
    block = hashlib.sha256(str(i).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


class Checker:
    """Does something different with each chunk and checks it."""

    def __init__(self) -> None:
        self.kept: list[tuple[Any, bytes]] = []
        self.problems: list[str] = []
        self.count = 0

    def see(self, data: bytes) -> None:
        i = self.count
        self.count += 1
        if type(data) is not bytes:
            self.problems.append(f"{i}: {type(data).__name__}")
            return
        copy = bytes(bytearray(data))
        if hash(data) != hash(copy):
            self.problems.append(f"{i}: stale hash")
        if data != copy or len(data) != len(copy):
            self.problems.append(f"{i}: content")
        mode = i % 4
        if mode == 0:
            self.kept.append((data, copy))  # the object itself
        elif mode == 1:
            self.kept.append((memoryview(data), copy))  # a buffer export
        elif mode == 2:
            _ = {data: i}  # hashed as a dict key, then dropped
        # mode 3: dropped untouched

    def check_kept(self) -> None:
        for obj, copy in self.kept:
            if bytes(obj) != copy:
                self.problems.append("a kept chunk changed")


def _check_data_received(sizes: list[int]) -> None:
    """Send messages of these sizes one at a time to a Protocol whose
    Checker keeps, views, hashes or drops each chunk; on both loops every
    byte arrives and no chunk is seen wrong or changed."""

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[bytes, list[str], int]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        checker = Checker()
        received: list[bytes] = []
        got: asyncio.Queue[int] = asyncio.Queue()

        class P(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                checker.see(data)
                received.append(bytes(bytearray(data)))
                got.put_nowait(len(data))

        tr, _ = await loop.connect_accepted_socket(P, sock=a)
        for i, n in enumerate(sizes):
            await loop.sock_sendall(b, _message(i, n))
            left = n
            while left:  # one message at a time
                left -= await asyncio.wait_for(got.get(), 10)
        checker.check_kept()
        tr.close()
        b.close()
        await asyncio.sleep(0)
        return b"".join(received), checker.problems, len(checker.kept)

    with fds_released():
        runs = on_both(main, timeout=60)
    want = b"".join(_message(i, n) for i, n in enumerate(sizes))
    for name in ("asyncio", "tokioloop"):
        data, problems, kept = runs[name].result
        assert data == want, name
        assert problems == [], (name, problems)
        assert kept >= len(sizes) // 2


def test_data_received_objects_reused_only_when_free() -> None:
    _check_data_received(SIZES)


KiB = 1024
# Large messages: read straight into a bytes object with room for 126 KiB
# (the spare one when nothing kept it), kept whole when half full or more,
# shrunk otherwise; messages over 126 KiB take two reads.
BIG_SIZES = [100 * KiB, 90 * KiB, 126 * KiB, 64 * KiB, 20 * KiB, 130 * KiB, 100 * KiB]
BIG_SIZES += [70 * KiB, 40 * KiB, 127 * KiB, 63 * KiB, 1 * KiB, 100 * KiB, 250 * KiB] * 2


def test_large_reads_reuse_only_free_objects() -> None:
    """The same checks with large messages, which the transport reads
    straight into bytes objects (and reuses those, room and all)."""
    _check_data_received(BIG_SIZES)


def test_streams_see_every_byte_with_reused_objects() -> None:
    """StreamReader copies what it receives: chunks of readexactly() stay
    intact while the transport reuses its objects."""

    async def main(loop: asyncio.AbstractEventLoop) -> list[bytes]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=a)
        out = []
        for i, n in enumerate(SIZES):
            await loop.sock_sendall(b, _message(i, n))
            out.append(await asyncio.wait_for(reader.readexactly(n), 10))
        writer.close()
        b.close()
        await asyncio.sleep(0)
        return out

    with fds_released():
        runs = on_both(main, timeout=60)
    want = [_message(i, n) for i, n in enumerate(SIZES)]
    assert runs["asyncio"].result == want
    assert runs["tokioloop"].result == want


def test_datagram_received_objects_reused_only_when_free() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> tuple[list[bytes], list[str]]:
        checker = Checker()
        received: list[bytes] = []
        got: asyncio.Queue[None] = asyncio.Queue()

        class P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                checker.see(data)
                received.append(bytes(bytearray(data)))
                got.put_nowait(None)

        tr, _ = await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", 0))
        port = tr.get_extra_info("sockname")[1]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            for i, n in enumerate(SIZES):
                s.sendto(_message(i, n), ("127.0.0.1", port))
                await asyncio.wait_for(got.get(), 10)
        finally:
            s.close()
        checker.check_kept()
        tr.close()
        await asyncio.sleep(0)
        return received, checker.problems

    with fds_released():
        runs = on_both(main, timeout=60)
    want = [_message(i, n) for i, n in enumerate(SIZES)]
    for name in ("asyncio", "tokioloop"):
        data, problems = runs[name].result
        assert data == want, name
        assert problems == [], (name, problems)
