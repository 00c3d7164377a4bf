"""Protocols that misbehave (callbacks that raise, get_buffer() returning
nonsense) and transports used after their loop was closed: the errors
reach the exception handler as asyncio's do, the connection is closed as
asyncio closes it, the loop goes on, nothing crashes."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
import weakref
from typing import Any

import pytest

import tokioloop

from ._util import call_outcome, exc_name, fds_released, on_both, open_fds, wait_until

FAULTS = [
    "data_received",
    "eof_received",
    "connection_made",
    "connection_lost",
    "pause_writing",
    "resume_writing",
    "get_buffer_raises",
    "get_buffer_empty",
    "get_buffer_readonly",
    "get_buffer_not_a_buffer",
    "buffer_updated",
]


def make_protocol(fault: str, loop: asyncio.AbstractEventLoop, record: list[Any]) -> Any:
    class Boom(Exception):
        pass

    def boom(where: str) -> None:
        if where == fault:
            raise Boom(where)

    class Plain(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.tr = transport
            record.append("made")
            transport.set_write_buffer_limits(high=1024)
            boom("connection_made")

        def data_received(self, data: bytes) -> None:
            record.append("data")
            boom("data_received")

        def eof_received(self) -> None:
            record.append("eof")
            boom("eof_received")

        def pause_writing(self) -> None:
            record.append("pause")
            boom("pause_writing")

        def resume_writing(self) -> None:
            record.append("resume")
            boom("resume_writing")

        def connection_lost(self, exc: BaseException | None) -> None:
            record.append(("lost", exc_name(exc)))
            boom("connection_lost")

    class Buffered(Plain, asyncio.BufferedProtocol):
        buf = bytearray(100)

        def get_buffer(self, sizehint: int) -> Any:
            record.append("get_buffer")
            if fault == "get_buffer_raises":
                raise Boom(fault)
            if fault == "get_buffer_empty":
                return bytearray()
            if fault == "get_buffer_readonly":
                return b"read-only bytes"
            if fault == "get_buffer_not_a_buffer":
                return 42
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            record.append("data")
            boom("buffer_updated")

    buffered = fault.startswith("get_buffer") or fault == "buffer_updated"
    return Buffered() if buffered else Plain()


@pytest.mark.parametrize("fault", FAULTS)
def test_protocol_callback_faults(fault: str) -> None:
    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        record: list[Any] = []
        a, b = socket.socketpair()
        b.setblocking(False)
        tr, _ = await loop.create_connection(lambda: make_protocol(fault, loop, record), sock=a)
        await asyncio.sleep(0)

        async def read_peer(n: int | None) -> int:
            """Read up to n bytes (None: to the end) from the peer socket."""
            got = 0
            while n is None or got < n:
                try:
                    chunk = await loop.sock_recv(b, 65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += len(chunk)
            return got

        def lost() -> bool:
            return any(isinstance(r, tuple) for r in record)

        # 1. flow control: over the high-water mark, then drained
        if not tr.is_closing():
            tr.write(b"w" * 300_000)
            await read_peer(300_000)
            await wait_until(lambda: "resume" in record or lost())
        # 2. data, then EOF from the peer
        if not lost():
            await loop.sock_sendall(b, b"some data")
            await wait_until(lambda: "data" in record or lost())
        if not lost():
            b.shutdown(socket.SHUT_WR)
            await wait_until(lambda: "eof" in record or lost())
        # 3. our close
        tr.close()
        await read_peer(None)
        await wait_until(lost)
        b.close()
        return {
            "record": record,
            "closing": tr.is_closing(),
        }

    with fds_released():
        runs = on_both(main, timeout=5)
    handled = {
        name: [(str(c.get("message")), exc_name(c.get("exception"))) for c in run.errors]
        for name, run in runs.items()
    }
    # "Exception in callback <handle repr>": asyncio names the handle (the
    # transport's class in it differs); tokioloop's native callbacks run
    # without a Handle and say "(tokioloop native)". Compare the prefix.
    for name in handled:
        handled[name] = [
            ("Exception in callback" if m.startswith("Exception in callback") else m, e)
            for m, e in handled[name]
        ]
    assert handled["tokioloop"] == handled["asyncio"], handled
    assert runs["tokioloop"].result == runs["asyncio"].result


def _poke_all(tr: Any) -> dict[str, tuple[str, str]]:
    calls = {
        "pause_reading": tr.pause_reading,
        "resume_reading": tr.resume_reading,
        "get_write_buffer_size": tr.get_write_buffer_size,
        "set_write_buffer_limits": lambda: tr.set_write_buffer_limits(10, 5),
        "is_closing": tr.is_closing,
        "abort": tr.abort,
    }
    return {k: call_outcome(f) for k, f in calls.items()}


def test_transport_used_after_its_loop_closed() -> None:
    """Every method of a socket transport after loop.close(): no crash, the
    same outcomes as asyncio's, and the loop and socket are freed."""
    results: dict[str, Any] = {}
    for name, factory in (
        ("asyncio", asyncio.SelectorEventLoop),
        ("tokioloop", tokioloop.new_event_loop),
    ):
        gc.collect()
        before = open_fds()
        loop = factory()
        a, b = socket.socketpair()
        tr, _ = loop.run_until_complete(loop.create_connection(asyncio.Protocol, sock=a))
        del a
        loop.close()
        outcomes = _poke_all(tr)
        ref = weakref.ref(loop)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del loop, tr
            gc.collect()
        b.close()
        results[name] = (outcomes, ref() is None, sorted(open_fds() - before))
    assert results["asyncio"][1:] == (True, [])
    assert results["tokioloop"] == results["asyncio"]
