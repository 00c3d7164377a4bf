"""Child process for test_loop_close: build a loop full of open transports,
close (or drop) the loop without closing them, then let the garbage
collector at them. Run in a child so that a crash or a hang fails the test
instead of killing or blocking the test run.

usage: python _close_scenarios.py LOOP SCENARIO CERTFILE KEYFILE
LOOP is "asyncio" or "tokioloop". Prints one JSON object: the ResourceWarnings
(object reprs normalised), what reached the exception handler, and the fds
left open (socket/pipe/anon-inode kinds) after gc.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import select
import signal
import socket
import ssl
import sys
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import tokioloop


def norm(text: str) -> str:
    prev = None
    while prev != text:
        prev, text = text, re.sub(r"<[^<>]*>", "{obj}", text)
    return re.sub(r"subprocess \d+", "subprocess {pid}", text)


def fd_kinds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out[int(name)] = re.sub(r"\[\d+\]|:\d+$", "", target)
    return out


class Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.tr = transport

    def data_received(self, data: bytes) -> None:
        self.tr.write(data)


async def streams_open(loop: asyncio.AbstractEventLoop, certs: tuple[str, str]) -> list[Any]:
    """A TCP server with a connection that has megabytes queued, a Unix
    server, streams, both kinds of pipe (one with a full buffer)."""
    keep: list[Any] = []
    accepted: asyncio.Queue[Any] = asyncio.Queue()

    class Accepted(Echo):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            accepted.put_nowait(transport)

    server = await loop.create_server(Accepted, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()
    tr, _ = await loop.create_connection(asyncio.Protocol, *addr)
    srv_tr = await accepted.get()
    srv_tr.pause_reading()
    tr.write(b"x" * (8 << 20))  # stays buffered: the peer does not read
    keep += [server, tr, srv_tr]

    path = os.path.join(os.environ["SCENARIO_TMP"], "unix.sock")
    userver = await loop.create_unix_server(Accepted, path)
    utr, _ = await loop.create_unix_connection(asyncio.Protocol, path)
    keep += [userver, utr, await accepted.get()]

    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"ping")
    keep += [reader, writer, await accepted.get()]

    r1, w1 = os.pipe()
    rtr, _ = await loop.connect_read_pipe(asyncio.Protocol, os.fdopen(r1, "rb", 0))
    r2, w2 = os.pipe()
    wtr, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(w2, "wb", 0))
    wtr.write(b"y" * (1 << 20))  # more than the pipe holds: buffered
    keep += [rtr, wtr, os.fdopen(w1, "wb"), os.fdopen(r2, "rb")]
    return keep


async def datagram_open(loop: asyncio.AbstractEventLoop, certs: tuple[str, str]) -> list[Any]:
    """UDP: an unconnected endpoint and a connected one."""
    udp, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    conn, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=udp.get_extra_info("sockname")
    )
    conn.sendto(b"hello")
    return [udp, conn]


async def tls_handshake_pending(
    loop: asyncio.AbstractEventLoop, certs: tuple[str, str]
) -> list[Any]:
    """A TLS client whose server never answers: the loop is closed in the
    middle of the handshake."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    silent.setblocking(False)
    ctx = ssl.create_default_context(cafile=certs[0])
    task = asyncio.ensure_future(
        loop.create_connection(
            asyncio.Protocol, *silent.getsockname(), ssl=ctx, server_hostname="localhost"
        )
    )
    conn, _ = await loop.sock_accept(silent)
    # the ClientHello has arrived: the handshake is under way
    while not select.select([conn], [], [], 0)[0]:
        await asyncio.sleep(0.001)
    return [silent, conn, task]


async def subprocess_running(loop: asyncio.AbstractEventLoop, certs: tuple[str, str]) -> list[Any]:
    """A child with all three pipes open, still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import time; time.sleep(30)",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    proc.stdin.write(b"hello")  # type: ignore[union-attr]
    return [proc, proc.pid]


SCENARIOS: dict[str, Callable[..., Coroutine[Any, Any, list[Any]]]] = {
    "streams_open": streams_open,
    "datagram_open": datagram_open,
    "tls_handshake_pending": tls_handshake_pending,
    "subprocess_running": subprocess_running,
}


def main() -> None:
    which, scenario, certfile, keyfile = sys.argv[1:5]
    drop_loop = scenario.endswith("+drop_loop")
    scenario = scenario.removesuffix("+drop_loop")
    factory = asyncio.SelectorEventLoop if which == "asyncio" else tokioloop.new_event_loop
    # process-wide resources (Tokio's signal driver socket pair) first
    warm = tokioloop.new_event_loop()
    warm.run_until_complete(asyncio.sleep(0))
    warm.close()
    del warm
    gc.collect()
    before = fd_kinds()
    handled: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = factory()
        if which == "asyncio" and sys.version_info < (3, 12) and scenario.startswith("subprocess"):
            # the reference for tokioloop's pidfd child watcher is asyncio's
            # (its default from 3.12 on; 3.10/3.11 default to a thread per
            # child, which keeps the transports alive while the child runs)
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(loop)
            asyncio.set_child_watcher(watcher)
        loop.set_exception_handler(
            lambda _lp, ctx: handled.append(
                f"{ctx.get('message')} | {type(ctx.get('exception')).__name__}"
            )
        )
        asyncio.set_event_loop(loop)
        objs = loop.run_until_complete(SCENARIOS[scenario](loop, (certfile, keyfile)))
        pids = [o for o in objs if isinstance(o, int)]
        asyncio.set_event_loop(None)
        if drop_loop:
            del loop
        else:
            loop.close()
            del loop
        gc.collect()
        del objs
        gc.collect()
        gc.collect()
    for pid in pids:
        # the loop's child watcher may have reaped it already (asyncio's
        # watcher thread does when the child died of the transport's kill)
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    after = fd_kinds()
    leaked = sorted(v for k, v in after.items() if k not in before)
    resource_warnings = sorted(
        (str(w.message) if os.environ.get("RAW") else norm(str(w.message)))
        for w in caught
        if issubclass(w.category, ResourceWarning)
    )
    print(
        json.dumps(
            {"warnings": resource_warnings, "handled": sorted(handled), "leaked": leaked},
            sort_keys=True,
        )
    )


if __name__ == "__main__":
    main()
