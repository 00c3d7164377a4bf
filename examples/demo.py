"""tokioloop in one minute.

The same asyncio program runs twice: on the standard library's event loop
and on tokioloop. Each step prints what it did; the table at the end shows
how long each step took on each loop.

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
    """10,000 timers at random-ish delays, a third of them cancelled."""
    loop = asyncio.get_running_loop()
    fired = [0]
    done = loop.create_future()
    handles = []
    for i in range(10_000):
        handles.append(loop.call_later((i * 7 % 100) / 10_000, fired.__setitem__, 0, fired[0]))
    for h in handles[::3]:
        h.cancel()
    loop.call_later(0.02, done.set_result, None)
    await done
    return f"scheduled 10,000 timers, cancelled {len(handles[::3])}"


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


STEPS: list[tuple[str, Step]] = [
    ("callbacks", callbacks),
    ("tasks", tasks),
    ("timers", timers),
    ("sockets", sockets),
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
