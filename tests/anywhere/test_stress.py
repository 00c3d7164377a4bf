"""Randomized stress of the fiber layer (deterministic seeds, subprocesses so
that a crash is a failed test, not a dead test run)."""

from __future__ import annotations

import pytest

from .conftest import run_py

FIBER_STRESS = """
import gc, random, sys
from tokioloop import _tokioloop as T
Fiber, suspend = T.Fiber, T.fiber_suspend
random.seed({seed})

class Boom(Exception):
    pass

def body(depth):
    acc = []
    def rec(n):
        if n == 0:
            for i in range(random.randint(1, 4)):
                try:
                    acc.append(suspend(i))
                except Boom:
                    acc.append("boom")
                if random.random() < 0.1:
                    inner = Fiber(lambda: suspend("inner") or "inner-done")
                    inner.switch()
                    if random.random() < 0.5:
                        inner.switch()
            return len(acc)
        kind = n % 4
        if kind == 0:
            return list(map(rec, [n - 1]))[0]
        if kind == 1:
            out = []
            sorted([1], key=lambda _: out.append(rec(n - 1)) or 0)
            return out[0]
        if kind == 2:
            try:
                raise KeyError(n)
            except KeyError:
                return rec(n - 1)
        return rec(n - 1)
    return rec(depth)

fibers = []
stats = dict(created=0, killed=0, thrown=0, switched=0, dropped=0)
for step in range({steps}):
    r = random.random()
    if r < 0.06 or not fibers:
        stats["created"] += 1
        fb = Fiber(body, random.randint(0, 25))
        fb.switch()
        fibers.append(fb)
    elif r < 0.08:
        stats["dropped"] += 1
        fibers.pop(random.randrange(len(fibers)))  # unwound by dealloc
    elif r < 0.10:
        stats["killed"] += 1
        fibers.pop(random.randrange(len(fibers))).kill()
    else:
        fb = random.choice(fibers)
        if fb.status == "done":
            fibers.remove(fb)
            continue
        try:
            if random.random() < 0.1:
                stats["thrown"] += 1
                fb.throw(Boom)
            else:
                stats["switched"] += 1
                fb.switch(step)
        except Boom:
            pass
    if step % 1000 == 0:
        gc.collect()
fibers.clear()
gc.collect()
info = T.fiber_info()
assert info["leaked_fibers"] == 0, info
print("stress ok", stats)
"""

ASYNC_STRESS = """
import asyncio, gc, random
from tokioloop import _tokioloop as T
import tokioloop._anywhere as A
random.seed({seed})

def sync_work(depth, steps):
    total = 0
    def rec(n):
        nonlocal total
        if n == 0:
            for _ in range(steps):
                choice = random.random()
                if choice < 0.4:
                    total += A.await_(asyncio.sleep(0, result=1))
                elif choice < 0.6:
                    total += A.await_(A.run_anywhere(lambda: A.await_(asyncio.sleep(0, result=2))))
                elif choice < 0.8:
                    fut = asyncio.get_running_loop().create_future()
                    fut.set_result(3)
                    total += A.await_(fut)
                else:
                    total += A.await_(asyncio.sleep(random.random() / 1000, result=4))
            return total
        return list(map(rec, [n - 1]))[0] if n % 2 else rec(n - 1)
    try:
        return rec(depth)
    finally:
        total = -1

async def in_task(depth, steps):
    return sync_work(depth, steps)

async def main():
    loop = asyncio.get_running_loop()
    loop.set_task_factory(A.anywhere_task)
    tasks = []
    for i in range({tasks}):
        if random.random() < 0.5:
            t = asyncio.ensure_future(A.run_anywhere(sync_work, random.randint(0, 30), 5))
        else:
            t = asyncio.ensure_future(in_task(random.randint(0, 30), 5))
        tasks.append(t)
        if random.random() < 0.2:
            await asyncio.sleep(0)
        if random.random() < 0.15:
            random.choice(tasks).cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    bad = [r for r in results if not isinstance(r, (int, asyncio.CancelledError))]
    assert not bad, bad[:3]
    return sum(isinstance(r, int) for r in results)

done = asyncio.run(main())
gc.collect()
info = T.fiber_info()
assert info["leaked_fibers"] == 0, info
print("stress ok", done)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fiber_stress(seed: int) -> None:
    rc, out, err = run_py(FIBER_STRESS.format(seed=seed, steps=20000), timeout=120)
    assert rc == 0 and "stress ok" in out, (rc, out, err[-3000:])


@pytest.mark.parametrize("seed", [1, 2])
def test_asyncio_stress(seed: int) -> None:
    rc, out, err = run_py(ASYNC_STRESS.format(seed=seed, tasks=1500), timeout=120)
    assert rc == 0 and "stress ok" in out, (rc, out, err[-3000:])
