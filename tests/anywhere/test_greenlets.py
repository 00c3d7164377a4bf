"""Greenlets inside await-anywhere tasks (SQLAlchemy's asyncio layer and
greenback's portal start greenlets inside a task and resume them in later
steps).

A greenlet keeps its C stack at the addresses where it was started, so it
may only be resumed from that same stack. Once greenlet is loaded, every step
of an await-anywhere task runs on the same runner stack. Without that, a
step running on another runner resumed the greenlet over the stack of
whichever task held the first runner meanwhile (suspended in await_): the
process aborted in greenlet or that task's frames were overwritten.
Run in a child process: the failure is a crash.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, greenlet, tokioloop

    async def starts_a_greenlet(i):
        def body():
            local = list(range(i, i + 8))
            got = greenlet.getcurrent().parent.switch("started")
            more = greenlet.getcurrent().parent.switch(sum(local) + got)
            return more * 2
        g = greenlet.greenlet(body)
        assert g.switch() == "started"  # started in this step, on its stack
        await asyncio.sleep(0)  # the step ends; another task takes the runner
        await asyncio.sleep(0.02)
        first = g.switch(1000)  # resumed in a later step
        await asyncio.sleep(0)
        second = g.switch(21)
        return first, second

    async def holds_a_runner(i):
        def sync():
            marker = list(range(100))
            tokioloop.await_(asyncio.sleep(0.06))  # suspended on its runner
            return sum(marker) + i
        return sync()

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(tokioloop.anywhere_task)
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(starts_a_greenlet(i)))
            tasks.append(asyncio.create_task(holds_a_runner(i)))
        results = await asyncio.gather(*tasks)
        for i in range(6):
            assert results[2 * i] == (sum(range(i, i + 8)) + 1000, 42), results[2 * i]
            assert results[2 * i + 1] == 4950 + i, results[2 * i + 1]
        print("ok")

    tokioloop.run(main())
    """
)


def test_greenlets_resumed_in_later_steps_of_anywhere_tasks() -> None:
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["ok"]


SQLA_LIKE = textwrap.dedent(
    """
    # The shape of SQLAlchemy's greenlet_spawn/await_only: sync code in a
    # child greenlet hands awaitables to its parent, which awaits them in the
    # task; many tasks at once, some of them suspended in tokioloop.await_.
    import asyncio, greenlet, tokioloop

    def await_only(aw):
        return greenlet.getcurrent().parent.switch(aw)

    async def greenlet_spawn(fn, *args):
        g = greenlet.greenlet(fn)
        result = g.switch(*args)
        while not g.dead:
            value = await result
            result = g.switch(value)
        return result

    async def query(x):
        await asyncio.sleep(0.001 * (x % 3))
        return x + 1

    def sync_work(i):
        total = 0
        for k in range(5):
            total += await_only(query(i * 10 + k))
        return total

    async def user(i):
        r = await greenlet_spawn(sync_work, i)
        if i % 2:
            r += tokioloop.await_(query(0))  # a runner held across a suspension
        return r

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(tokioloop.anywhere_task)
        got = await asyncio.gather(*(asyncio.create_task(user(i)) for i in range(40)))
        want = [sum(i * 10 + k + 1 for k in range(5)) + (1 if i % 2 else 0) for i in range(40)]
        assert got == want, (got, want)
        print("ok")

    tokioloop.run(main())
    """
)


def test_greenlet_spawn_pattern_in_many_anywhere_tasks() -> None:
    p = subprocess.run(
        [sys.executable, "-c", SQLA_LIKE], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["ok"]


MIXED = textwrap.dedent(
    """
    import asyncio, greenback, greenlet, tokioloop

    async def later(v):
        await asyncio.sleep(0.001)
        return v

    async def portal_then_fiber():
        # greenback's portal runs the task's steps in a child greenlet; a
        # fiber started there could not switch back to it (greenlet aborted
        # the process when greenback.await_ ran on the fiber).
        await greenback.ensure_portal()
        def fn():
            return greenback.await_(later(1))
        try:
            await tokioloop.run_anywhere(fn)
        except RuntimeError as e:
            return "start" if "cannot start inside a greenlet" in str(e) else repr(e)
        return "ran"

    async def await_in_child_greenlet():
        # On a fiber, inside a greenlet started there: await_ must not
        # suspend (greenlet's current greenlet would be wrong for every other
        # task meanwhile); one that completes at once is fine.
        def fn():
            done = asyncio.get_running_loop().create_future()
            done.set_result(7)
            g1 = greenlet.greenlet(lambda: tokioloop.await_(done))
            first = g1.switch()
            g2 = greenlet.greenlet(lambda: tokioloop.await_(later(2)))
            try:
                g2.switch()
            except RuntimeError as e:
                return first, "suspend" if "cannot suspend inside a greenlet" in str(e) else repr(e)
            return first, "suspended"
        return await tokioloop.run_anywhere(fn)

    async def main():
        print(await asyncio.create_task(portal_then_fiber()))  # a task of its own
        print(*await await_in_child_greenlet())
        print(await tokioloop.run_anywhere(lambda: tokioloop.await_(later(3))))

    tokioloop.run(main())
    """
)


def test_fibers_refuse_what_greenlet_cannot_do() -> None:
    p = subprocess.run([sys.executable, "-c", MIXED], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["start", "7", "suspend", "3"], p.stdout


EAGER = textwrap.dedent(
    """
    import asyncio, sys, greenlet, tokioloop

    async def greenlet_spawn(fn):  # the core of SQLAlchemy's greenlet_spawn
        g = greenlet.greenlet(fn, greenlet.getcurrent())
        result = g.switch()
        while not g.dead:
            result = g.switch(await result)
        return result

    def body():
        return sum(greenlet.getcurrent().parent.switch(asyncio.sleep(0.005, i)) for i in range(5))

    async def query():
        return await greenlet_spawn(body)

    def deep(n, aw):
        # the creator's fiber goes deeper than where the eager step ran, and
        # waits there while the task's greenlet is resumed
        if n == 0:
            buf = bytearray(b"x" * 256)
            r = tokioloop.await_(aw)
            assert buf == bytearray(b"x" * 256)
            return r
        return sum(map(lambda _: deep(n - 1, aw), [0]))

    async def in_anywhere_task():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)
        t = loop.create_task(query())  # first step runs now, inside this call
        loop.set_task_factory(None)
        return deep(40, asyncio.sleep(0.05, 1000)), await t

    async def in_run_anywhere(make):
        loop = asyncio.get_running_loop()
        def sync():
            t = make(loop)
            return deep(40, asyncio.sleep(0.05, 1000)), tokioloop.await_(t)
        return await tokioloop.run_anywhere(sync)

    def with_factory(loop):
        loop.set_task_factory(asyncio.eager_task_factory)
        try:
            return loop.create_task(query())
        finally:
            loop.set_task_factory(None)

    def with_eager_start(loop):
        return loop.create_task(query(), eager_start=True)

    async def await_in_eager_step():
        def sync_await():
            return tokioloop.await_(asyncio.sleep(0))
        async def step():
            sync_await()
        loop = asyncio.get_running_loop()
        def sync():
            loop.set_task_factory(asyncio.eager_task_factory)
            try:
                t = loop.create_task(step())
            finally:
                loop.set_task_factory(None)
            return tokioloop.await_(asyncio.gather(t, return_exceptions=True))
        (err,) = await tokioloop.run_anywhere(sync)
        return type(err).__name__

    loop = tokioloop.new_event_loop(anywhere_tasks=True)
    for _ in range(3):
        assert loop.run_until_complete(in_anywhere_task()) == (1000, 10)
    loop.close()
    for _ in range(3):
        assert tokioloop.run(in_run_anywhere(with_factory)) == (1000, 10)
    if sys.version_info >= (3, 13):
        assert tokioloop.run(in_run_anywhere(with_eager_start)) == (1000, 10)
    assert tokioloop.run(await_in_eager_step()) == "RuntimeError"
    print("ok")
    """
)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_task_started_on_a_fiber_keeps_its_greenlet_on_the_loop_stack() -> None:
    """An eager task created by code on a fiber runs its first step inside
    create_task(); a greenlet that step starts (SQLAlchemy's greenlet_spawn)
    is resumed by the task's later steps on the loop's stack. The first step
    runs on the loop's stack too, so the greenlet does not copy its stack
    over the creator's fiber (it crashed the process)."""
    p = subprocess.run([sys.executable, "-c", EAGER], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert p.stdout.strip().endswith("ok")
