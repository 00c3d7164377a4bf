"""Child process for test_many_connections: open N TCP connections to an
echo server (in batches, so the listen backlog is not the bottleneck), echo
a line on each as it opens, then, with all N open at once, echo another
line on every one of them concurrently; then close them all.

usage: python _echo_clients.py HOST PORT N
Prints "OPEN <n>" once all are open and echoed, "DONE <n>" at the end.
"""

from __future__ import annotations

import asyncio
import resource
import sys
from typing import Any

import tokioloop

BATCH = 500


class Client(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = b""
        self.reply: asyncio.Future[bytes] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.tr = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.buf.endswith(b"\n") and self.reply is not None and not self.reply.done():
            self.reply.set_result(self.buf)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionError(f"lost before the echo: {exc!r}"))
        self.lost.set_result(None)

    async def echo(self, line: bytes) -> None:
        self.buf = b""
        self.reply = self.loop.create_future()
        self.tr.write(line)
        got = await self.reply
        if got != line:
            raise AssertionError(f"echo mismatch: {got!r} != {line!r}")


async def main(host: str, port: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    clients: list[Client] = []
    for start in range(0, n, BATCH):
        batch = await asyncio.gather(
            *(
                loop.create_connection(lambda: Client(loop), host, port)
                for _ in range(min(BATCH, n - start))
            )
        )
        fresh = [p for _, p in batch]
        await asyncio.gather(*(c.echo(b"hello %d\n" % (start + i)) for i, c in enumerate(fresh)))
        clients.extend(fresh)
    print("OPEN", len(clients), flush=True)
    await asyncio.gather(*(c.echo(b"again %d\n" % i) for i, c in enumerate(clients)))
    for c in clients:
        c.tr.close()
    await asyncio.gather(*(c.lost for c in clients))
    print("DONE", len(clients), flush=True)


if __name__ == "__main__":
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tokioloop.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
