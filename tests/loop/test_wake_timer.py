"""The loop's wake-up timer (a timerfd): a sleeping loop wakes for its next
timer, every time, however else it was woken in between.

The timer's readiness is looked at only after the reactor reported it, so
each of these fails if the timer's waker is not registered again after an
expiry was consumed or after a wait that something else ended.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

import tokioloop

# A missed wake-up would otherwise hang until the watchdog's next ping.
LATE = 0.5


@pytest.fixture
def watchdog(loop: tokioloop.Loop) -> Iterator[None]:
    """Wakes the loop now and then from another thread, so that a broken
    timer shows up as a late sleep instead of a hung test."""
    stop = threading.Event()

    def ping() -> None:
        while not stop.wait(2.0):
            if loop.is_closed():
                return
            loop.call_soon_threadsafe(lambda: None)

    t = threading.Thread(target=ping, daemon=True)
    t.start()
    yield
    stop.set()
    t.join()


def test_consecutive_sleeps_each_end_on_time(loop: tokioloop.Loop, watchdog: None) -> None:
    async def main() -> list[float]:
        overshoots = []
        for i in range(40):
            delay = 0.001 * (1 + i % 3)
            t0 = time.monotonic()
            await asyncio.sleep(delay)
            overshoots.append(time.monotonic() - t0 - delay)
        return overshoots

    overshoots = loop.run_until_complete(main())
    assert min(overshoots) >= -0.001  # never early (allowing clock granularity)
    assert max(overshoots) < LATE, overshoots


def test_timer_fires_after_waits_ended_by_other_threads(
    loop: tokioloop.Loop, watchdog: None
) -> None:
    async def main() -> float:
        lp = asyncio.get_running_loop()

        def poke() -> None:
            for _ in range(10):
                time.sleep(0.01)
                lp.call_soon_threadsafe(lambda: None)

        t = threading.Thread(target=poke)
        t.start()
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        elapsed = time.monotonic() - t0
        t.join()
        return elapsed

    elapsed = loop.run_until_complete(main())
    assert 0.3 - 0.001 <= elapsed < 0.3 + LATE


def test_timer_moved_earlier_and_later(loop: tokioloop.Loop, watchdog: None) -> None:
    # A far timer arms the timerfd; a nearer one must re-arm it earlier; after
    # the near one fired and the far one is cancelled, a third still fires.
    fired: list[str] = []

    async def main() -> float:
        lp = asyncio.get_running_loop()
        far = lp.call_later(30, fired.append, "far")
        await asyncio.sleep(0.02)
        far.cancel()
        lp.call_later(0.05, fired.append, "third")
        t0 = time.monotonic()
        while "third" not in fired:
            await asyncio.sleep(0.005)
            if time.monotonic() - t0 > 5:
                break
        return time.monotonic() - t0

    elapsed = loop.run_until_complete(main())
    assert fired == ["third"]
    assert elapsed < 0.05 + LATE


def test_timer_wakes_a_loop_idle_between_runs(loop: tokioloop.Loop, watchdog: None) -> None:
    # Each run_until_complete() waits on the timer alone; the expiry of one
    # run's timer is consumed before the next run sleeps.
    for delay in (0.01, 0.002, 0.05, 0.001):
        t0 = time.monotonic()
        loop.run_until_complete(asyncio.sleep(delay))
        elapsed = time.monotonic() - t0
        assert delay - 0.001 <= elapsed < delay + LATE, (delay, elapsed)
