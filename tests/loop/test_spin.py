"""Before it sleeps, the loop polls for a short while (TOKIOLOOP_SPIN_US,
see Driver::wait in src/loop/io.rs), but only while its waits are short:
a loop whose waits outlast the spin stops spinning, so an idle or slow-paced
loop does not burn CPU. Each check runs in a fresh interpreter because the
setting is read once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _run(code: str, spin_us: str) -> str:
    env = dict(os.environ, TOKIOLOOP_SPIN_US=spin_us)
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


SLOW_PACED = """
    import asyncio, socket, time
    import tokioloop

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        loop.add_reader(a, lambda: None)   # an fd the loop watches, never ready
        cpu0, wall0 = time.thread_time(), time.monotonic()
        for _ in range(150):
            await asyncio.sleep(0.002)     # every wait lasts ~2 ms
        cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
        loop.remove_reader(a)
        a.close(); b.close()
        print(f"{cpu / wall:.3f}")

    tokioloop.run(main())
"""


def test_slow_paced_loop_does_not_spin() -> None:
    """Even with the largest spin (1 ms), a loop whose waits are 2 ms spends
    most of the time asleep: the spin turns itself off after one miss."""
    share = float(_run(SLOW_PACED, "1000"))
    assert share < 0.3, f"loop thread busy {share:.0%} of the time while waiting 2 ms at a time"


def test_idle_loop_sleeps() -> None:
    """A loop with nothing to do sleeps (one bounded spin at most)."""
    code = """
        import asyncio, time
        import tokioloop

        async def main():
            cpu0, wall0 = time.thread_time(), time.monotonic()
            await asyncio.sleep(0.3)
            print(f"{(time.thread_time() - cpu0) / (time.monotonic() - wall0):.3f}")

        tokioloop.run(main())
    """
    assert float(_run(code, "1000")) < 0.2


PING_PONG = """
    import asyncio, socket, threading
    import tokioloop

    N = 2000

    def echo(sock):
        sock.setblocking(True)
        for _ in range(N):
            data = sock.recv(16)
            sock.sendall(data)

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        t = threading.Thread(target=echo, args=(b,))
        t.start()
        got = 0
        for _ in range(N):
            await loop.sock_sendall(a, b"x")
            got += len(await loop.sock_recv(a, 16))
        # call_soon_threadsafe wakes a spinning loop as well as a sleeping one
        for i in range(200):
            fut = loop.create_future()
            threading.Thread(target=loop.call_soon_threadsafe, args=(fut.set_result, i)).start()
            assert await fut == i
        # a timer shorter than the spin fires, and the spin does not delay it
        # past its deadline by more than the spin limit
        t0 = loop.time()
        await asyncio.sleep(0.0003)
        late = loop.time() - t0
        t.join()
        a.close(); b.close()
        print(got, late < 1.0)

    tokioloop.run(main())
"""


def test_ping_pong_with_spin_and_without() -> None:
    """One request at a time against a peer thread (the case the spin is
    for), thread-safe wake-ups and short timers: same results with the
    spin on (default and maximum) and off."""
    for spin in ("0", "50", "1000"):
        assert _run(PING_PONG, spin) == "2000 True", spin


WITH_TRANSPORTS = """
    import asyncio, socket, threading, time
    import tokioloop

    N = 300

    def echo(sock):
        sock.setblocking(True)
        for i in range(N):
            data = sock.recv(16)
            if i % 10 == 0:
                time.sleep(0.002)          # longer than the spin: the loop sleeps
            sock.sendall(data)

    async def main():
        loop = asyncio.get_running_loop()
        # An open connection keeps fds registered with the reactor, so the
        # private epoll's readiness reaches the loop through the reactor.
        srv = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        tr, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        a, b = socket.socketpair()
        a.setblocking(False)
        t = threading.Thread(target=echo, args=(b,))
        t.start()
        got = 0
        for _ in range(N):
            await loop.sock_sendall(a, b"x")
            got += len(await asyncio.wait_for(loop.sock_recv(a, 16), 5))
        t.join()
        # add_reader callbacks woken by another thread while the loop sleeps
        for i in range(50):
            fut = loop.create_future()
            loop.add_reader(a, lambda: fut.done() or fut.set_result(a.recv(16)))
            threading.Timer(0.001 * (i % 3), b.send, args=(b"y",)).start()
            assert await asyncio.wait_for(fut, 5) == b"y"
            loop.remove_reader(a)
        tr.close()
        srv.close()
        await srv.wait_closed()
        a.close(); b.close()
        print(got)

    tokioloop.run(main())
"""


def test_private_epoll_wakes_a_loop_with_transports() -> None:
    """add_reader and sock_* readiness wakes a sleeping or spinning loop
    that also has transports open (their fds and the private epoll are both
    watched by the reactor); a lost wake-up would show as a 5 s timeout."""
    for spin in ("0", "50"):
        assert _run(WITH_TRANSPORTS, spin) == "300", spin
