"""add_reader/add_writer, sock_* methods and DNS."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
import threading
import time

import pytest

import tokioloop


def run_until(loop: tokioloop.Loop, pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        loop.run_until_complete(asyncio.sleep(0.001))


def test_reader_is_level_triggered(loop: tokioloop.Loop) -> None:
    r, w = socket.socketpair()
    r.setblocking(False)
    got: list[bytes] = []

    def on_read() -> None:
        got.append(r.recv(1))  # one byte at a time: needs level triggering

    loop.add_reader(r, on_read)
    w.sendall(b"abcde")
    run_until(loop, lambda: len(got) == 5)
    assert b"".join(got) == b"abcde"
    assert loop.remove_reader(r) is True
    assert loop.remove_reader(r) is False
    r.close()
    w.close()


def test_reader_wakes_a_sleeping_loop(loop: tokioloop.Loop) -> None:
    r, w = socket.socketpair()
    got: list[bytes] = []
    loop.add_reader(r.fileno(), lambda: (got.append(r.recv(10)), loop.stop()))
    threading.Timer(0.05, w.sendall, (b"x",)).start()
    loop.call_later(30, loop.stop)
    t0 = time.monotonic()
    loop.run_forever()
    assert got == [b"x"] and time.monotonic() - t0 < 5
    loop.remove_reader(r.fileno())
    r.close()
    w.close()


def test_replacing_and_removing_watchers(loop: tokioloop.Loop) -> None:
    r, w = socket.socketpair()
    first: list[int] = []
    second: list[int] = []
    loop.add_reader(r, first.append, 1)
    loop.add_reader(r, second.append, 2)  # replaces the first callback
    w.send(b"x")
    run_until(loop, lambda: bool(second))
    assert not first
    loop.remove_reader(r)
    written: list[int] = []
    loop.add_writer(w, lambda: (written.append(1), loop.remove_writer(w)))
    run_until(loop, lambda: bool(written))
    assert loop.remove_writer(w) is False
    r.close()
    w.close()


def test_reader_and_writer_on_same_fd(loop: tokioloop.Loop) -> None:
    a, b = socket.socketpair()
    events: list[str] = []
    loop.add_writer(a, lambda: (events.append("w"), loop.remove_writer(a)))
    loop.add_reader(a, lambda: (events.append("r"), a.recv(10)))
    b.send(b"ping")
    run_until(loop, lambda: "r" in events and "w" in events)
    loop.remove_reader(a)
    a.close()
    b.close()


def test_bad_file_descriptors(loop: tokioloop.Loop) -> None:
    with pytest.raises(ValueError, match="Invalid file descriptor"):
        loop.add_reader(-1, print)
    with pytest.raises(ValueError, match="Invalid file descriptor"):
        loop.add_reader(2**70, print)
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.add_reader(object(), print)
    with pytest.raises(ValueError, match="Invalid file object"):
        loop.remove_writer("nope")
    with tempfile.TemporaryFile() as f:  # epoll cannot watch regular files
        with pytest.raises(PermissionError):
            loop.add_reader(f, print)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError) as ei:
        loop.add_reader(fd, print)  # closed fd
    assert ei.value.errno == errno.EBADF


def test_fd_closed_behind_our_back(loop: tokioloop.Loop) -> None:
    r, w = socket.socketpair()
    loop.add_reader(r, print)
    fd = r.fileno()
    r.close()
    w.close()
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.remove_reader(fd)  # no error, no crash
    r2, w2 = socket.socketpair()  # the fd number is likely reused
    got: list[bytes] = []
    loop.add_reader(r2, lambda: got.append(r2.recv(1)))
    w2.send(b"z")
    run_until(loop, lambda: bool(got))
    loop.remove_reader(r2)
    r2.close()
    w2.close()


def test_sock_recv_sendall_roundtrip(loop: tokioloop.Loop) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    payload = os.urandom(4 * 1024 * 1024)  # more than socket buffers: the pending path

    async def main() -> bytes:
        async def reader() -> bytes:
            chunks = []
            n = 0
            while n < len(payload):
                data = await loop.sock_recv(b, 65536)
                chunks.append(data)
                n += len(data)
            return b"".join(chunks)

        t = asyncio.ensure_future(reader())
        await loop.sock_sendall(a, payload)
        return await t

    assert loop.run_until_complete(main()) == payload
    a.close()
    b.close()


def test_sock_recv_into_and_eof(loop: tokioloop.Loop) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main() -> tuple[int, bytes, bytes]:
        buf = bytearray(10)
        loop.call_later(0.01, a.send, b"hello")
        n = await loop.sock_recv_into(b, buf)
        a.close()
        eof = await loop.sock_recv(b, 10)
        return n, bytes(buf[:n]), eof

    assert loop.run_until_complete(main()) == (5, b"hello", b"")
    b.close()


def test_sock_accept_connect(loop: tokioloop.Loop) -> None:
    srv = socket.socket()
    srv.setblocking(False)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    addr = srv.getsockname()

    async def main() -> bytes:
        cli = socket.socket()
        cli.setblocking(False)
        accept = asyncio.ensure_future(loop.sock_accept(srv))
        await loop.sock_connect(cli, addr)
        conn, peer = await accept
        assert conn.gettimeout() == 0 and peer == cli.getsockname()
        await loop.sock_sendall(cli, b"over tcp")
        data = await loop.sock_recv(conn, 100)
        conn.close()
        cli.close()
        return data

    assert loop.run_until_complete(main()) == b"over tcp"
    srv.close()


def test_sock_connect_resolves_names(loop: tokioloop.Loop) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.socket()
    cli.setblocking(False)
    loop.run_until_complete(loop.sock_connect(cli, ("localhost", port)))
    cli.close()
    srv.close()


def test_sock_connect_refused(loop: tokioloop.Loop) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    cli = socket.socket()
    cli.setblocking(False)
    with pytest.raises(ConnectionRefusedError):
        loop.run_until_complete(loop.sock_connect(cli, ("127.0.0.1", port)))
    cli.close()


def test_sock_udp(loop: tokioloop.Loop) -> None:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
        s.bind(("127.0.0.1", 0))

    async def main() -> tuple[bytes, object, int]:
        recv = asyncio.ensure_future(loop.sock_recvfrom(b, 100))
        await asyncio.sleep(0.01)
        n = await loop.sock_sendto(a, b"dgram", b.getsockname())
        data, addr = await recv
        buf = bytearray(3)
        await loop.sock_sendto(a, b"xyz", b.getsockname())
        nbytes, _ = await loop.sock_recvfrom_into(b, buf)
        assert nbytes == 3 and bytes(buf) == b"xyz"
        return data, addr, n

    data, addr, n = loop.run_until_complete(main())
    assert data == b"dgram" and addr == a.getsockname() and n == 5
    a.close()
    b.close()


def test_cancelled_sock_recv_unregisters(loop: tokioloop.Loop) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main() -> bytes:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(loop.sock_recv(b, 10), 0.01)
        await asyncio.sleep(0)
        assert not loop._has_watcher(b, "r")
        a.send(b"after")
        return await loop.sock_recv(b, 10)

    assert loop.run_until_complete(main()) == b"after"
    a.close()
    b.close()


def test_sock_checks(loop: tokioloop.Loop) -> None:
    import ssl

    blocking = socket.socket()
    loop.set_debug(True)
    with pytest.raises(ValueError, match="non-blocking"):
        loop.run_until_complete(loop.sock_recv(blocking, 1))
    blocking.close()
    ctx = ssl.create_default_context()
    s = ctx.wrap_socket(socket.socket(), do_handshake_on_connect=False, server_hostname="x")
    with pytest.raises(TypeError, match="SSLSocket"):
        loop.run_until_complete(loop.sock_recv(s, 1))
    s.close()


def test_sock_sendfile(loop: tokioloop.Loop, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(300_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main(count: int | None, offset: int) -> bytes:
        with open(path, "rb") as f:
            reader = asyncio.ensure_future(read_all(b, (count or len(data) - offset)))
            sent = await loop.sock_sendfile(a, f, offset, count)
            assert sent == (count or len(data) - offset)
            assert f.tell() == offset + sent
        return await reader

    async def read_all(sock: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            buf += await loop.sock_recv(sock, 65536)
        return buf

    assert loop.run_until_complete(main(None, 0)) == data
    assert loop.run_until_complete(main(1000, 10)) == data[10:1010]
    with open(path, "rb") as f:
        with pytest.raises(ValueError):
            loop.run_until_complete(loop.sock_sendfile(a, f, -1))
        with pytest.raises(TypeError):
            loop.run_until_complete(loop.sock_sendfile(a, f, 0, "x"))  # type: ignore[arg-type]
    with open(path) as tf:  # text mode
        with pytest.raises(ValueError, match="binary mode"):
            loop.run_until_complete(loop.sock_sendfile(a, tf))
    a.close()
    b.close()


def test_getaddrinfo_getnameinfo(loop: tokioloop.Loop) -> None:
    async def main() -> None:
        infos = await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        assert infos[0][4] == ("127.0.0.1", 80)
        host, port = await loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST)
        assert host == "127.0.0.1" and port in ("80", "http")
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo("no-such-host.invalid", 80)

    loop.run_until_complete(main())


def test_getaddrinfo_does_not_block_the_loop(
    loop: tokioloop.Loop, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo
    threads: list[str] = []

    def slow(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        time.sleep(0.2)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    async def main() -> None:
        t = asyncio.ensure_future(ticker())
        await loop.getaddrinfo("127.0.0.1", 80)
        t.cancel()

    loop.run_until_complete(main())
    assert len(ticks) >= 5  # the loop kept running during the lookup
    assert threads and threads[0] != threading.current_thread().name


def test_failed_sock_connect_leaves_no_cycle(loop: tokioloop.Loop) -> None:
    """The exception of a failed sock_* wait is referred to by nothing but
    its catcher: no finished future of the loop's keeps it (and with it a
    traceback's frames), as asyncio's sock_* methods take care of."""
    import gc
    import types

    caught: list[OSError] = []

    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        c = socket.socket()
        c.setblocking(False)
        try:
            await loop.sock_connect(c, ("127.0.0.1", port))
        except OSError as e:
            caught.append(e)
        finally:
            c.close()

    loop.run_until_complete(main())
    assert len(caught) == 1 and isinstance(caught[0], ConnectionRefusedError)
    refs = [
        r
        for r in gc.get_referrers(caught[0])
        if r is not caught and not isinstance(r, types.FrameType)
    ]
    assert refs == []


def test_remove_watchers_of_a_socket_closed_since(loop: tokioloop.Loop) -> None:
    """A socket closed after add_reader/add_writer (fileno() is -1 now) is
    still found by identity, as asyncio's selectors find their keys: the
    watchers go, and a new socket that gets the same fd number is watched
    afresh (anyio closes sockets before removing their watchers)."""
    a, b = socket.socketpair()
    loop.add_reader(a, print)
    loop.add_writer(a, print)
    a.close()
    assert a.fileno() == -1
    assert loop.remove_reader(a) is True
    assert loop.remove_writer(a) is True
    # Unregistered now: nothing to find it by (asyncio raises the same).
    with pytest.raises(ValueError, match="Invalid file descriptor"):
        loop.remove_reader(a)
    c, d = socket.socketpair()
    try:
        seen: list[bytes] = []
        loop.add_reader(c, lambda: seen.append(c.recv(10)))
        d.send(b"new")
        run_until(loop, lambda: seen == [b"new"])
        loop.remove_reader(c)
    finally:
        for s in (b, c, d):
            s.close()


def test_a_ready_reader_runs_within_a_chain_of_callbacks(loop: tokioloop.Loop) -> None:
    # asyncio polls its selector on every iteration: a reader whose socket
    # became readable runs after the next hop of a call_soon chain, not after
    # the whole chain (tornado's TLS tests count on it). The loop's native
    # transports are not involved here: only add_reader callbacks.
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    events: list[object] = []

    def reader() -> None:
        events.append("read")
        b.recv(100)

    def hop(i: int) -> None:
        events.append(i)
        if i == 0:
            a.send(b"x")
        if i < 50:
            loop.call_soon(hop, i + 1)
        else:
            loop.stop()

    loop.add_reader(b, reader)
    loop.call_soon(hop, 0)
    loop.run_forever()
    assert events.index("read") <= 3, events[:10]

    async def yields_until_read() -> int:
        events.clear()
        a.send(b"y")
        hops = 0
        while "read" not in events and hops < 1000:
            await asyncio.sleep(0)
            hops += 1
        return hops

    assert loop.run_until_complete(yields_until_read()) <= 3
    loop.remove_reader(b)
    a.close()
    b.close()
