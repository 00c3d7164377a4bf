"""tokioloop in one minute.

The same asyncio program runs twice: on the standard library's event loop
and on tokioloop. Each step prints what it did; the table at the end shows
how long each step took on each loop. The last step is tokioloop's other
half: plain synchronous code (here a sorted() key function, called by C
code) awaiting a coroutine with tokioloop.await_().

    make demo            (or: python examples/demo.py)
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import tokioloop

Step = Callable[[], Awaitable[str]]


async def callbacks() -> str:
    """A chain of 200,000 loop.call_soon callbacks."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [200_000]

    def tick() -> None:
        left[0] -= 1
        if left[0]:
            loop.call_soon(tick)
        else:
            done.set_result(None)

    loop.call_soon(tick)
    await done
    return "ran 200,000 chained callbacks"


async def tasks() -> str:
    """50,000 tasks, each yielding to the loop twice."""

    async def work(i: int) -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return i

    results = await asyncio.gather(*(work(i) for i in range(50_000)))
    return f"gathered 50,000 tasks, sum of results {sum(results)}"


async def timers() -> str:
    """100,000 timers due within 1 ms, a third of them cancelled."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    n = 100_000
    cancelled = range(0, n, 3)
    left = [n - len(cancelled)]

    def fire() -> None:
        left[0] -= 1
        if not left[0]:
            done.set_result(None)

    handles = [loop.call_later((i % 100) / 100_000, fire) for i in range(n)]
    for i in cancelled:
        handles[i].cancel()
    await done
    return f"fired {n - len(cancelled):,} timers, {len(cancelled):,} cancelled"


async def sockets() -> str:
    """10,000 request/response round trips over a socket pair (sock_* API)."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def echo() -> None:
        while data := await loop.sock_recv(b, 1024):
            await loop.sock_sendall(b, data)

    server = asyncio.ensure_future(echo())
    for i in range(10_000):
        await loop.sock_sendall(a, b"ping %d" % i)
        await loop.sock_recv(a, 1024)
    a.close()
    await server
    b.close()
    return "10,000 ping/pong round trips over a socketpair"


async def anywhere() -> str:
    """Synchronous code that awaits: sorted(key=...) whose key function
    awaits a coroutine, 10,000 times, from under the C code of sorted()."""

    async def score(word: str) -> int:  # stands in for an async client call
        await asyncio.sleep(0)
        return sum(map(ord, word)) % 997

    def rank(words: list[str]) -> list[str]:  # plain def code, no async in sight
        return sorted(words, key=lambda w: tokioloop.await_(score(w)))

    words = [f"word{i}" for i in range(10_000)]
    ranked = await tokioloop.run_anywhere(rank, words)
    return f"sorted 10,000 words by an async key from sync code, first {ranked[0]!r}"


STEPS: list[tuple[str, Step]] = [
    ("callbacks", callbacks),
    ("tasks", tasks),
    ("timers", timers),
    ("sockets", sockets),
    ("await_", anywhere),
]


async def program(label: str, timings: dict[str, float]) -> None:
    loop = asyncio.get_running_loop()
    print(f"\n--- on {label}: {type(loop).__module__}.{type(loop).__name__}")
    for name, step in STEPS:
        t0 = time.perf_counter()
        what = await step()
        timings[name] = time.perf_counter() - t0
        print(f"  {name:10s} {what}")


def run_on(label: str, factory: Callable[[], asyncio.AbstractEventLoop]) -> dict[str, float]:
    timings: dict[str, float] = {}
    loop = factory()
    try:
        loop.run_until_complete(program(label, timings))
    finally:
        loop.close()
    return timings


def main() -> None:
    print(f"Python {sys.version.split()[0]}, tokioloop {tokioloop.__version__}")
    std = run_on("asyncio (stdlib)", asyncio.new_event_loop)
    tok = run_on("tokioloop", tokioloop.new_event_loop)
    print("\n| step | asyncio | tokioloop | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for name, _ in STEPS:
        print(
            f"| {name} | {std[name] * 1e3:.1f} ms | {tok[name] * 1e3:.1f} ms "
            f"| {std[name] / tok[name]:.1f}x |"
        )


if __name__ == "__main__":
    main()
