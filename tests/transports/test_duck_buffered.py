"""A duck-typed buffered protocol (asyncio.BaseProtocol with get_buffer()
and buffer_updated(), as uvloop accepts) without eof_received(): the
peer's EOF closes the connection as if eof_received() returned None."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import tokioloop


def test_duck_typed_buffered_protocol_without_eof_received() -> None:
    loop = tokioloop.new_event_loop()
    handled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: handled.append(ctx))

    class Duck(asyncio.BaseProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(16)
            self.got = bytearray()
            self.lost: asyncio.Future[BaseException | None] = loop.create_future()

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.got += self.buf[:nbytes]

        def connection_lost(self, exc: BaseException | None) -> None:
            self.lost.set_result(exc)

    async def main() -> None:
        a, b = socket.socketpair()
        with b:
            _, proto = await loop.connect_accepted_socket(Duck, a)
            b.sendall(b"hello, duck" * 3)
            b.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(proto.lost, 5) is None
            assert bytes(proto.got) == b"hello, duck" * 3

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert handled == []
