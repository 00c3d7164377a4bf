"""Many connections at once, and a server whose accept() runs out of file
descriptors."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import sys
from typing import Any

import pytest

import tokioloop

from ._util import fds_released, lowest_free_fd, nofile_limit, outcome, run_on

N_CONNECTIONS = 10_000
CLIENTS = os.path.join(os.path.dirname(__file__), "_echo_clients.py")


def test_ten_thousand_concurrent_connections() -> None:
    """A tokioloop echo server holds 10,000 connections from a child
    process (tokioloop too) open at the same time, echoing on all of them
    concurrently; all of them close cleanly and release their fds."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = N_CONNECTIONS + 200
    if hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}: cannot hold the connections")

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        state = {"open": 0, "peak": 0, "lines": 0, "made": 0}
        all_closed = asyncio.Event()
        errors: list[BaseException] = []

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                state["made"] += 1
                state["open"] += 1
                state["peak"] = max(state["peak"], state["open"])

            def data_received(self, data: bytes) -> None:
                state["lines"] += data.count(b"\n")
                self.tr.write(data)

            def connection_lost(self, exc: BaseException | None) -> None:
                if exc is not None:
                    errors.append(exc)
                state["open"] -= 1
                if state["open"] == 0 and state["made"] == N_CONNECTIONS:
                    all_closed.set()

        server = await loop.create_server(Echo, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            CLIENTS,
            "127.0.0.1",
            str(port),
            str(N_CONNECTIONS),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, (proc.returncode, err.decode()[-3000:])
        await all_closed.wait()
        server.close()
        await server.wait_closed()
        return {"out": out.decode().split("\n"), "errors": errors, **state}

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with nofile_limit(hard), fds_released():
        run = run_on(tokioloop.new_event_loop, main, timeout=60)
    r = run.result
    assert r["out"][:2] == [f"OPEN {N_CONNECTIONS}", f"DONE {N_CONNECTIONS}"]
    assert r["peak"] == N_CONNECTIONS
    assert r["lines"] == 2 * N_CONNECTIONS
    assert r["open"] == 0 and r["errors"] == []
    assert run.errors == []


def test_accept_survives_fd_exhaustion(monkeypatch: pytest.MonkeyPatch) -> None:
    """accept() fails with EMFILE: the server reports 'socket.accept() out of
    system resource' through the exception handler, stops accepting for
    ACCEPT_RETRY_DELAY, and serves the waiting clients (and new ones) once
    fds are free again."""
    # asyncio reads the delay at the time of the error; keep the test short.
    monkeypatch.setattr(asyncio.constants, "ACCEPT_RETRY_DELAY", 0.1)
    K = 3

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        exhausted: asyncio.Future[dict[str, Any]] = loop.create_future()
        default = loop.get_exception_handler()

        def handler(lp: Any, ctx: dict[str, Any]) -> None:
            if not exhausted.done():
                exhausted.set_result(ctx)
            if default is not None:
                default(lp, ctx)

        loop.set_exception_handler(handler)
        accepted: list[Any] = []
        enough = asyncio.Event()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.tr = transport
                accepted.append(transport)
                if len(accepted) == K + 1:
                    enough.set()

            def data_received(self, data: bytes) -> None:
                self.tr.write(data)

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        clients = [socket.socket() for _ in range(K)]
        for c in clients:
            c.setblocking(False)
        # Nothing can open a new fd now: accept() will fail.
        with nofile_limit(lowest_free_fd()):
            for c in clients:
                await loop.sock_connect(c, addr)  # completes in the kernel's backlog
            ctx = await exhausted
            # What else fails while there are no fds: as asyncio, an OSError.
            connect_outcome = await outcome(loop.create_connection(asyncio.Protocol, *addr))
        assert server.is_serving()
        for i, c in enumerate(clients):
            await loop.sock_sendall(c, b"ping %d" % i)
            assert await loop.sock_recv(c, 100) == b"ping %d" % i
        # and a new client after the storm
        reader, writer = await asyncio.open_connection(*addr)
        await enough.wait()
        writer.write(b"new")
        got = await reader.readexactly(3)
        writer.close()
        await writer.wait_closed()
        for c in clients:
            c.close()
        for tr in accepted:
            tr.close()
        server.close()
        await server.wait_closed()
        return {"ctx": ctx, "connect": connect_outcome, "got": got, "accepted": len(accepted)}

    with fds_released():
        runs = {
            name: run_on(factory, main)
            for name, factory in (
                ("asyncio", asyncio.SelectorEventLoop),
                ("tokioloop", tokioloop.new_event_loop),
            )
        }
    for name, run in runs.items():
        r = run.result
        ctx = r["ctx"]
        assert ctx["message"] == "socket.accept() out of system resource", (name, ctx)
        assert isinstance(ctx["exception"], OSError) and ctx["exception"].errno == errno.EMFILE
        assert r["got"] == b"new" and r["accepted"] == K + 1
    assert runs["tokioloop"].result["connect"] == runs["asyncio"].result["connect"]
    assert runs["tokioloop"].result["connect"][0] == "OSError"
