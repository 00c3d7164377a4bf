"""Before it sleeps, the loop polls for a short while (TOKIOLOOP_SPIN_US,
see Driver::wait in src/loop/io.rs), but only while its waits are short:
a loop whose waits outlast the spin stops spinning, so an idle or slow-paced
loop does not burn CPU; and only while spinning costs less CPU per byte read
(or per job run) than sleeping, which the loop measures now and then
(src/loop/spin.rs).
The process checks run in a fresh interpreter because the setting is read
once per process; the measurement's decisions are replayed over made-up
epochs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tokioloop import _tokioloop


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


SHORT_RUNS = """
    import asyncio, socket, time
    import tokioloop

    loop = tokioloop.new_event_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    loop.add_reader(a, lambda: None)       # an fd the loop watches, never ready
    cpu0, wall0 = time.thread_time(), time.monotonic()
    for _ in range(300):
        # one short run per call, as run_until_complete() per request or
        # await_() from a thread without a loop do; each waits ~2 ms
        loop.run_until_complete(asyncio.sleep(0.002))
    cpu, wall = time.thread_time() - cpu0, time.monotonic() - wall0
    loop.remove_reader(a)
    loop.close()
    a.close(); b.close()
    print(f"{cpu / wall:.3f}")
"""


def test_short_runs_keep_what_the_spin_learned() -> None:
    """The spin's state outlives a run: a program of many short runs whose
    waits outlast the spin does not spin afresh in every run (with a fresh
    state per run each 2 ms wait spun for the whole 1 ms limit)."""
    share = float(_run(SHORT_RUNS, "1000"))
    assert share < 0.2, f"loop thread busy {share:.0%} of the time over short runs"


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


EPOCH_WAITS, HOLD, PROBED, TIE = _tokioloop._spin_policy_constants()

Epoch = tuple[float, int, int]  # CPU microseconds, jobs run, bytes read


def _measured(spin_cost: Epoch, sleep_cost: Epoch) -> list[Epoch]:
    """One unmeasured epoch, then a measurement (spin, sleep, sleep, spin)
    in which each epoch used the given (CPU us, jobs, bytes), then the hold."""
    probe = [spin_cost, sleep_cost, sleep_cost, spin_cost]
    assert len(probe) == PROBED
    return [(0.0, 0, 0)] + probe + [(0.0, 0, 0)] * HOLD


def _choice(spin_cost: Epoch, sleep_cost: Epoch) -> bool:
    """Whether the policy spins after measuring these costs."""
    return _tokioloop._spin_policy_replay(_measured(spin_cost, sleep_cost))[1 + PROBED]


def test_spin_policy_constants_are_sane() -> None:
    assert EPOCH_WAITS >= 64
    assert HOLD >= 10
    assert 1.0 <= TIE < 1.1


def test_spin_policy_measures_spinning_against_sleeping() -> None:
    """The first epoch spins unmeasured; the measurement spins, sleeps,
    sleeps, spins; then the cheaper way is kept for HOLD epochs, after which
    the next measurement starts (spinning)."""
    out = _tokioloop._spin_policy_replay(_measured((100.0, 100, 0), (150.0, 100, 0)))
    assert out[:5] == [True, True, False, False, True]
    assert out[5 : 5 + HOLD] == [True] * HOLD
    assert out[5 + HOLD] is True

    out = _tokioloop._spin_policy_replay(_measured((150.0, 100, 0), (100.0, 100, 0)))
    assert out[:5] == [True, True, False, False, True]
    assert out[5 : 5 + HOLD] == [False] * HOLD
    assert out[5 + HOLD] is True  # measuring again


def test_spin_policy_compares_cpu_per_job() -> None:
    """Without bytes read, a way that ran more jobs in its epochs is charged
    per job, not per epoch; a difference within the tie factor keeps
    spinning (it answers sooner); a way that ran no job at all (an idle
    loop) means sleeping."""
    assert _choice((200.0, 200, 0), (150.0, 100, 0)) is True
    assert _choice((150.0, 100, 0), (200.0, 200, 0)) is False
    within = 100.0 * (1 + (TIE - 1) / 2)
    beyond = 100.0 * (TIE + 0.02)
    assert _choice((within, 100, 0), (100.0, 100, 0)) is True
    assert _choice((beyond, 100, 0), (100.0, 100, 0)) is False
    assert _choice((0.0, 0, 0), (0.0, 0, 0)) is False
    assert _choice((10.0, 100, 0), (10.0, 0, 0)) is False


def test_spin_policy_compares_cpu_per_byte_when_both_read() -> None:
    """A spin catches a large message in more, smaller reads (more jobs for
    the same bytes): with bytes read on both sides the cost is per byte, so
    more jobs do not make spinning look cheaper. Bytes on one side only
    (a burst that ended) fall back to jobs."""
    # Same bytes, spinning used more CPU in twice the jobs: sleep.
    assert _choice((120.0, 200, 100_000), (100.0, 100, 100_000)) is False
    # Spinning read more bytes for its CPU: spin.
    assert _choice((120.0, 100, 150_000), (100.0, 100, 100_000)) is True
    # Bytes only while sleeping: per job, where spinning is cheaper.
    assert _choice((80.0, 100, 0), (100.0, 100, 5_000)) is True


def test_spin_policy_follows_a_change_of_load() -> None:
    """Each measurement starts afresh: a load for which sleeping became
    cheaper turns spinning off at the next measurement, and back on at the
    one after when spinning is cheaper again."""
    spin_cheap = _measured((100.0, 100, 0), (150.0, 100, 0))[1:]
    sleep_cheap = _measured((150.0, 100, 0), (100.0, 100, 0))[1:]
    out = _tokioloop._spin_policy_replay([(0.0, 0, 0)] + spin_cheap + sleep_cheap + spin_cheap)
    period = PROBED + HOLD
    assert out[1 + PROBED] is True
    assert out[1 + period + PROBED] is False
    assert out[1 + 2 * period + PROBED] is True


SPIN_US = 50  # the limit the drive uses
PAID_US = 1.0  # a spin that caught its work at once
MISSED_US = float(SPIN_US)  # a spin that ran out
# The first epochs' ways: one unmeasured spinning epoch, then the measurement.
SCHEDULE = [True, True, False, False, True]


def _drive(
    cost: dict[bool, tuple[float, int, int]],
    epochs: int,
    spun: dict[int, float] | None = None,
) -> list[int]:
    """Drive the policy through `epochs` epochs of idle waits. The work
    after each wait (CPU us, jobs, bytes) is cost[way of that wait's epoch]
    (by the known schedule of the first epochs, then the way the policy
    reported); `spun` gives some waits' spin lengths (else PAID_US)."""
    spun = spun or {}
    items = []
    for w in range(epochs * EPOCH_WAITS):
        epoch = (w - 1) // EPOCH_WAITS  # the previous wait's epoch
        way = SCHEDULE[epoch] if 0 <= epoch < len(SCHEDULE) else None
        used = (0.0, 0, 0) if w == 0 or way is None else cost[way]
        items.append((*used, spun.get(w, PAID_US)))
    return _tokioloop._spin_policy_drive(items)


def _epoch(out: list[int], e: int) -> list[int]:
    return out[e * EPOCH_WAITS : (e + 1) * EPOCH_WAITS]


def test_spin_policy_driven_wait_by_wait() -> None:
    """Through the real wait-by-wait path with a made-up CPU clock: epochs
    of EPOCH_WAITS waits in the scheduled order, then the cheaper way."""
    cheap_spin = {True: (1.0, 1, 0), False: (2.0, 1, 0)}
    out = _drive(cheap_spin, len(SCHEDULE) + 1)
    for e, way in enumerate(SCHEDULE):
        assert _epoch(out, e) == [SPIN_US if way else 0] * EPOCH_WAITS, e
    assert _epoch(out, len(SCHEDULE)) == [SPIN_US] * EPOCH_WAITS

    cheap_sleep = {True: (2.0, 1, 0), False: (1.0, 1, 0)}
    out = _drive(cheap_sleep, len(SCHEDULE) + 1)
    assert _epoch(out, len(SCHEDULE)) == [0] * EPOCH_WAITS


def test_spin_policy_driven_per_byte() -> None:
    """Spinning ran twice the jobs for the same bytes at 1.5x the CPU:
    cheaper per job, dearer per byte; the policy sleeps."""
    out = _drive({True: (1.5, 2, 1000), False: (1.0, 1, 1000)}, len(SCHEDULE) + 1)
    assert _epoch(out, len(SCHEDULE)) == [0] * EPOCH_WAITS


def test_spin_policy_back_off_is_per_epoch() -> None:
    """A spin that runs out pauses spinning (1, 2, 4, ... waits); a pause
    left at the end of an epoch does not carry into the next spinning
    epoch, whose measurement would then be partly of sleeping."""
    even = {True: (1.0, 1, 0), False: (1.0, 1, 0)}
    # A miss at wait 10: wait 11 sleeps, wait 12 spins again.
    out = _drive(even, 1, {10: MISSED_US})
    assert out[10:13] == [SPIN_US, 0, SPIN_US]
    # Misses in a row at the end of the first epoch (pauses up to 64
    # waits), then the measurement's first epoch spins from its first wait.
    tail = {w: MISSED_US for w in range(EPOCH_WAITS - 40, EPOCH_WAITS)}
    out = _drive(even, 2, tail)
    assert out[EPOCH_WAITS - 1] == 0  # pausing
    assert _epoch(out, 1) == [SPIN_US] * EPOCH_WAITS
    # The same at the end of the measurement's first (spinning) epoch,
    # followed by two sleeping epochs: the fourth spins from its first wait.
    tail = {w: MISSED_US for w in range(2 * EPOCH_WAITS - 40, 2 * EPOCH_WAITS)}
    out = _drive(even, 5, tail)
    assert _epoch(out, 4) == [SPIN_US] * EPOCH_WAITS
