"""What the loop does becomes visible one iteration later, as on asyncio,
whose every iteration polls I/O: a transport's peer in the same loop gets
its data_received (or eof_received, connection_lost) after a couple of
`await asyncio.sleep(0)`. Libraries' own test suites rely on it
(websockets' waits two iterations for the other side); tokioloop, which
skips polls while callbacks keep it busy, polls right after its own I/O."""

from __future__ import annotations

import asyncio
import socket
import statistics
from typing import Any

from ._util import fds_released, on_both


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> None:
        self.eof = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True


async def _iterations_until(cond: Any) -> int:
    n = 0
    while not cond():
        await asyncio.sleep(0)
        n += 1
        if n > 1000:
            break
    return n


def test_peer_in_the_same_loop_sees_writes_eof_and_close_within_two_iterations() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> list[int]:
        a, b = socket.socketpair()
        ta, pa = await loop.create_connection(Recorder, sock=a)
        tb, pb = await loop.create_connection(Recorder, sock=b)
        # A busy neighbour keeps the ready queue non-empty throughout.
        busy = True

        def spin() -> None:
            if busy:
                loop.call_soon(spin)

        spin()
        worst = []
        for i in range(20):
            ta.write(b"x%d" % i)
            worst.append(await _iterations_until(lambda: len(pb.data) > 0))
            pb.data.clear()
        ta.write_eof()
        worst.append(await _iterations_until(lambda: pb.eof))
        tb.close()
        worst.append(await _iterations_until(lambda: pa.eof or pa.lost))
        busy = False
        ta.close()
        await asyncio.sleep(0.01)
        return worst

    with fds_released():
        runs = on_both(main, timeout=30)
    assert max(runs["asyncio"].result) <= 2, runs["asyncio"].result
    assert max(runs["tokioloop"].result) <= 2, runs["tokioloop"].result


def test_sock_sendall_reaches_a_same_loop_transport_within_two_iterations() -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> int:
        a, b = socket.socketpair()
        a.setblocking(False)
        _, pb = await loop.create_connection(Recorder, sock=b)
        worst = 0
        for i in range(10):
            await loop.sock_sendall(a, b"y%d" % i)
            worst = max(worst, await _iterations_until(lambda: len(pb.data) > 0))
            pb.data.clear()
        a.close()
        await asyncio.sleep(0.01)
        return worst

    with fds_released():
        runs = on_both(main, timeout=30)
    assert runs["asyncio"].result <= 2
    assert runs["tokioloop"].result <= 2


def test_short_sleeps_are_not_rounded_up_to_whole_milliseconds() -> None:
    """asyncio.sleep(0.001) waits about 1 ms (Tokio's timer wheel, which
    the loop no longer uses, rounded it up to 2.1 ms on average)."""

    async def main(loop: asyncio.AbstractEventLoop) -> float:
        took = []
        for _ in range(40):
            t0 = loop.time()
            await asyncio.sleep(0.001)
            took.append(loop.time() - t0)
        return statistics.median(took)

    runs = on_both(main, timeout=30)
    for name in ("asyncio", "tokioloop"):
        median = runs[name].result
        assert 0.001 <= median < 0.0016, (name, median)
