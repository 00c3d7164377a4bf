"""One loop-core benchmark in one process (started by ``run.py core``).

    python benchmarks/core_worker.py --loop uvloop --bench call_soon_chained

calibrates the operation count so that one sample takes about ``--target``
seconds, runs one warm-up sample, then ``--samples`` measured samples, and
prints one JSON object on stdout: ``{"ok": true, "ops": N, "samples": [ops/s,
...]}`` or ``{"ok": false, "reason": "..."}`` when the loop is unavailable or
the benchmark fails on it.

Each benchmark is a coroutine ``bench(loop, n, stopwatch)`` that performs ``n``
operations (the unit is given in ``BENCHMARKS``) and brackets its measured
part with a Stopwatch from inside the loop, so loop start-up is not counted.

The figure is operations per second of CPU time (all threads of the process,
from /proc/self/task/*/schedstat): on a shared machine a sample's wall time
includes the time other processes held the CPU, its CPU time does not. The
wall-clock rates and the share of wall time the process was running or
runnable ("busy") are reported too; busy well below 1 means the loop slept,
which none of these CPU-bound benchmarks should make it do.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loops import LoopUnavailable, run_with_loop  # noqa: E402


def _schedstat() -> tuple[int, int]:
    """(CPU time, time waiting for a CPU) of every thread of this process, ns."""
    cpu = delay = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                fields = f.read().split()
        except OSError:  # the thread has just exited
            continue
        cpu += int(fields[0])
        delay += int(fields[1])
    return cpu, delay


class Stopwatch:
    """Wall-clock time, CPU time and run-queue wait of this process between
    start() and stop(), called by a benchmark around its measured part."""

    def __init__(self) -> None:
        self.wall = self.cpu = self.delay = 0.0
        self.extra: dict[str, int] = {}
        self._t0 = 0.0
        self._s0 = (0, 0)

    def start(self) -> None:
        self._s0 = _schedstat()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        cpu, delay = _schedstat()
        self.cpu = (cpu - self._s0[0]) / 1e9
        self.delay = (delay - self._s0[1]) / 1e9


Bench = Callable[[asyncio.AbstractEventLoop, int, Stopwatch], Coroutine[Any, Any, None]]

# Delays for the timer benchmarks: 1009 distinct values spread over (0, 1 ms],
# visited in a scrambled order so that consecutive timers do not arrive sorted.
_DELAYS: tuple[float, ...] = tuple(((i * 7919) % 1009 + 1) / 1009 * 1e-3 for i in range(1009))


async def call_soon_chained(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """Each callback schedules the next one with call_soon; n callbacks."""
    done = loop.create_future()
    remaining = n

    def step() -> None:
        nonlocal remaining
        remaining -= 1
        if remaining > 0:
            loop.call_soon(step)
        else:
            done.set_result(None)

    sw.start()
    loop.call_soon(step)
    await done
    sw.stop()


async def call_soon_chained_with_reader(
    loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch
) -> None:
    """call_soon_chained while an add_reader() callback is registered on an
    idle socket (as a pyzmq or tornado application has): loops that poll
    their selector on every iteration pay for it here."""
    a, b = socket.socketpair()
    loop.add_reader(b.fileno(), b.recv, 1)
    try:
        await call_soon_chained(loop, n, sw)
    finally:
        loop.remove_reader(b.fileno())
        a.close()
        b.close()


BATCH = 1000


async def call_soon_batched(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """Schedule BATCH callbacks with call_soon, let the loop run them; repeat.

    Counts scheduling and running; n is rounded up to a multiple of BATCH.
    """

    def noop(_: int) -> None:
        pass

    call_soon = loop.call_soon
    batches = max(1, n // BATCH)
    sw.start()
    for _ in range(batches):
        fut = loop.create_future()
        for i in range(BATCH - 1):
            call_soon(noop, i)
        call_soon(fut.set_result, None)
        await fut
    sw.stop()


TIMERS_IN_FLIGHT = 10_000


async def timers_plain(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """Steady state of TIMERS_IN_FLIGHT call_later timers with delays spread
    over (0, 1 ms]; each firing timer re-arms itself with the next delay.

    With that many timers in flight the loop is never idle (the timers come due
    faster than any loop can fire them), so the figure is CPU-bound: n timers
    fired, in deadline order, while the heap holds ~TIMERS_IN_FLIGHT entries.
    """
    done = loop.create_future()
    handles: list[asyncio.TimerHandle | None] = [None] * TIMERS_IN_FLIGHT
    delays = _DELAYS
    ndelays = len(delays)
    fired = 0
    di = 0

    def fire(slot: int) -> None:
        nonlocal fired, di
        fired += 1
        if fired >= n:
            handles[slot] = None
            if fired == n:
                done.set_result(None)
            return
        di += 1
        if di == ndelays:
            di = 0
        handles[slot] = loop.call_later(delays[di], fire, slot)

    for slot in range(TIMERS_IN_FLIGHT):
        handles[slot] = loop.call_later(delays[slot % ndelays], fire, slot)
    sw.start()
    await done
    sw.stop()
    for handle in handles:
        if handle is not None:
            handle.cancel()


FIRING_IN_FLIGHT = 1_000
TIMEOUTS_PER_FIRE = 9
TIMEOUT_RING = 9_000


async def timers_cancelled(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """90% of timers cancelled: the timeout pattern of a server.

    FIRING_IN_FLIGHT short timers (delays over (0, 1 ms]) fire and re-arm as in
    timers_plain; each firing also arms TIMEOUTS_PER_FIRE timeouts (100-200 ms)
    kept in a ring of TIMEOUT_RING, and cancels the ones they evict, i.e. each
    timeout is cancelled about a thousand firings (a few ms) after it was armed.
    The timeouts are short so that a loop which keeps cancelled timers in its
    heap until they are due reaches its steady state within the warm-up (a
    10 s timeout would make the figure depend on the sample length). n counts
    timers armed (9 of every 10 get cancelled). A timeout fires only if the
    process stalls for ~100 ms (preempted on a busy machine); more than 0.1%
    of them firing makes the sample fail.
    """
    done = loop.create_future()
    fires_needed = max(1, n // (TIMEOUTS_PER_FIRE + 1))
    handles: list[asyncio.TimerHandle | None] = [None] * FIRING_IN_FLIGHT
    ring: list[asyncio.TimerHandle | None] = [None] * TIMEOUT_RING
    delays = _DELAYS
    ndelays = len(delays)
    fired = 0
    di = 0
    ri = 0

    expired = 0

    def timeout() -> None:  # must not run: cancelled long before it is due
        nonlocal expired
        expired += 1

    def fire(slot: int) -> None:
        nonlocal fired, di, ri
        fired += 1
        if fired >= fires_needed:
            handles[slot] = None
            if fired == fires_needed:
                done.set_result(None)
            return
        for k in range(TIMEOUTS_PER_FIRE):
            old = ring[ri]
            if old is not None:
                old.cancel()
            ring[ri] = loop.call_later(0.1 + delays[(di + k) % ndelays] * 100, timeout)
            ri += 1
            if ri == TIMEOUT_RING:
                ri = 0
        di += 1
        if di == ndelays:
            di = 0
        handles[slot] = loop.call_later(delays[di], fire, slot)

    for slot in range(FIRING_IN_FLIGHT):
        handles[slot] = loop.call_later(delays[slot % ndelays], fire, slot)
    sw.start()
    await done
    sw.stop()
    for handle in handles + ring:
        if handle is not None:
            handle.cancel()
    sw.extra["timeouts_fired"] = expired
    if expired > n // 1000:
        raise RuntimeError(
            f"{expired} of {n} timeouts fired: the loop is too slow for this benchmark"
        )


async def future_round_trip(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """create_future, a call_soon'd set_result, await it: the task suspends and
    is woken by the future's done callback. n round trips."""
    create_future = loop.create_future
    call_soon = loop.call_soon
    sw.start()
    for _ in range(n):
        fut = create_future()
        call_soon(fut.set_result, None)
        await fut
    sw.stop()


async def _noop() -> None:
    pass


async def task_create_await(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """loop.create_task(trivial coroutine), then await the task. n tasks."""
    create_task = loop.create_task
    sw.start()
    for _ in range(n):
        await create_task(_noop())
    sw.stop()


async def sleep0_ping_pong(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """Two tasks alternately doing ``await asyncio.sleep(0)``. n sleeps in all."""
    half = max(1, n // 2)

    async def spin() -> None:
        sleep = asyncio.sleep
        for _ in range(half):
            await sleep(0)

    sw.start()
    await asyncio.gather(loop.create_task(spin()), loop.create_task(spin()))
    sw.stop()


async def queue_ping_pong(loop: asyncio.AbstractEventLoop, n: int, sw: Stopwatch) -> None:
    """Two tasks pass a token back and forth over two asyncio.Queue objects.
    n round trips (each: two puts, two gets, two task switches)."""
    ping: asyncio.Queue[int] = asyncio.Queue()
    pong: asyncio.Queue[int] = asyncio.Queue()

    async def server() -> None:
        for _ in range(n):
            await pong.put(await ping.get())

    async def client() -> None:
        for i in range(n):
            await ping.put(i)
            await pong.get()

    sw.start()
    await asyncio.gather(loop.create_task(server()), loop.create_task(client()))
    sw.stop()


#: name -> (function, unit of one operation, first calibration size)
BENCHMARKS: dict[str, tuple[Bench, str, int]] = {
    "call_soon_chained": (call_soon_chained, "callback", 10_000),
    "call_soon_chained_reader": (call_soon_chained_with_reader, "callback", 10_000),
    "call_soon_batched": (call_soon_batched, "callback", 10_000),
    "timers_plain": (timers_plain, "timer fired", 20_000),
    "timers_90pct_cancelled": (timers_cancelled, "timer armed", 20_000),
    "future_round_trip": (future_round_trip, "round trip", 5_000),
    "task_create_await": (task_create_await, "task", 5_000),
    "sleep0_ping_pong": (sleep0_ping_pong, "sleep(0)", 5_000),
    "queue_ping_pong": (queue_ping_pong, "round trip", 2_000),
}


async def _sample(loop: asyncio.AbstractEventLoop, bench: Bench, n: int) -> Stopwatch:
    gc.collect()
    sw = Stopwatch()
    await bench(loop, n, sw)
    return sw


async def _measure(
    loop: asyncio.AbstractEventLoop, bench: Bench, first: int, target: float, samples: int
) -> dict[str, Any]:
    # Calibrate: grow n until one run takes >= 10% of the target, then scale.
    n = first
    while True:
        elapsed = (await _sample(loop, bench, n)).cpu
        if elapsed >= target / 10 or n >= 1 << 30:
            break
        n *= 4 if elapsed < target / 100 else 2
    n = max(first, int(n * target / max(elapsed, 1e-9)))
    await _sample(loop, bench, n)  # warm-up at the final size
    cpu_rates, wall_rates, busy = [], [], []
    extra: dict[str, int] = {}
    for _ in range(samples):
        sw = await _sample(loop, bench, n)
        cpu_rates.append(n / sw.cpu)
        wall_rates.append(n / sw.wall)
        # Share of the wall time this process was running or runnable; well
        # below 1 means the loop slept during a CPU-bound benchmark.
        busy.append(min(1.0, (sw.cpu + sw.delay) / sw.wall))
        for key, value in sw.extra.items():
            extra[key] = extra.get(key, 0) + value
    return {
        "ok": True,
        "ops": n,
        "samples": cpu_rates,
        "wall_samples": wall_rates,
        "busy": busy,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop", required=True)
    parser.add_argument("--bench", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--target", type=float, default=0.3, help="seconds per sample")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    bench, _unit, first = BENCHMARKS[args.bench]
    try:
        result = run_with_loop(
            args.loop, lambda loop: _measure(loop, bench, first, args.target, args.samples)
        )
    except LoopUnavailable as exc:
        result = {"ok": False, "reason": str(exc)}
    except Exception as exc:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        result = {"ok": False, "reason": f"{type(exc).__name__}: {exc}{where}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
