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


class Named(asyncio.Protocol):
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    def data_received(self, data: bytes) -> None:
        self.events.append(f"{self.name}.data({data.decode()})")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(f"{self.name}.lost")


async def _new_transport_order(loop: asyncio.AbstractEventLoop, kind: str) -> list[str]:
    events: list[str] = []

    async def make(name: str, sock: socket.socket) -> asyncio.BaseTransport:
        if kind == "read pipe":
            pipe = open(sock.detach(), "rb", buffering=0)  # noqa: SIM115 - the transport owns it
            t, _ = await loop.connect_read_pipe(lambda: Named(name, events), pipe)
        else:
            t, _ = await loop.connect_accepted_socket(lambda: Named(name, events), sock)
        return t

    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    a1.send(b"x")
    b1.send(b"y")
    t1 = await make("1", a2)
    await asyncio.sleep(0.02)
    t2 = await make("2", b2)  # "y" is readable already
    t1.close()  # its connection_lost comes in a later iteration
    await asyncio.sleep(0.02)
    t2.close()
    a1.close()
    b1.close()
    await asyncio.sleep(0.01)
    return events


def test_data_waiting_for_a_new_transport_comes_before_later_callbacks() -> None:
    """A transport made over an fd that is readable already gets its data
    on the iteration after it starts, before what the coroutine that made it
    schedules next (found by asyncssh's tests, which replace a channel's
    stdin and expect the new one's data before the old one's
    connection_lost)."""

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, list[str]]:
        return {kind: await _new_transport_order(loop, kind) for kind in ("socket", "read pipe")}

    with fds_released():
        runs = on_both(main, timeout=30)
    want = ["1.data(x)", "2.data(y)", "1.lost", "2.lost"]
    assert runs["asyncio"].result == {"socket": want, "read pipe": want}
    assert runs["tokioloop"].result == {"socket": want, "read pipe": want}


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
