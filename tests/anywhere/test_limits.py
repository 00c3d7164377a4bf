"""Things that would crash the process if the fiber layer got them wrong:
deep recursion, many fibers, thread exit. Each runs in a subprocess."""

from __future__ import annotations

import sys

import pytest

from .conftest import run_py

RECURSION_PATHS = """
import asyncio, ctypes, ctypes.util, sqlite3, sys
import tokioloop._anywhere as A

def pure(n):
    return pure(n + 1)

def via_map(n):
    return list(map(via_map, [n + 1]))

def via_sorted(n):
    return sorted([0], key=lambda _: via_sorted(n + 1))

def via_init(n):
    class K:
        def __init__(self):
            via_init(n + 1)
    return K()

db = sqlite3.connect(":memory:")
db.create_function("rec", 1, lambda n: via_sqlite(n + 1))
def via_sqlite(n):
    return db.execute("select rec(?)", (n,)).fetchone()

libc = ctypes.CDLL(ctypes.util.find_library("c"))
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
ctypes_hits = []
# ctypes swallows exceptions raised in (or when entering) callbacks: it
# reports them as unraisable and returns 0 to C. The hook is a builtin so
# that it works at the recursion limit.
sys.unraisablehook = ctypes_hits.append
def via_ctypes(n):
    def cmp(a, b):
        try:
            via_ctypes(n + 1)
        except RecursionError:
            ctypes_hits.append(n)
        return 0
    arr = (ctypes.c_int * 2)(1, 2)
    libc.qsort(arr, 2, ctypes.sizeof(ctypes.c_int), CMP(cmp))

PATHS = [pure, via_map, via_sorted, via_init, via_sqlite, via_ctypes]

# sqlite3 turns exceptions in user functions into OperationalError.
def attempt(fn):
    A.await_(asyncio.sleep(0))
    ctypes_hits.clear()
    try:
        fn(0)
    except RecursionError:
        return "RecursionError"
    except sqlite3.OperationalError as e:
        if "user-defined function raised exception" in str(e):
            return "RecursionError"
        raise
    return "RecursionError" if ctypes_hits else "no error"
"""


@pytest.mark.parametrize("limit", [None, 2000])
def test_deep_recursion_in_run_anywhere_raises_recursion_error(limit: int | None) -> None:
    rc, out, err = run_py(
        RECURSION_PATHS
        + f"""
if {limit!r}:
    sys.setrecursionlimit({limit!r})
async def main():
    return [await A.run_anywhere(attempt, p) for p in PATHS]
print(asyncio.run(main()))
"""
    )
    assert rc == 0, (rc, err[-2000:])
    assert out.strip() == str(["RecursionError"] * 6), out


@pytest.mark.skipif(sys.version_info < (3, 12), reason="3.12+ budget C recursion separately")
def test_c_recursion_budget_holds_with_huge_recursion_limit() -> None:
    rc, out, err = run_py(
        RECURSION_PATHS
        + """
sys.setrecursionlimit(1_000_000)
async def main():
    return [await A.run_anywhere(attempt, p) for p in PATHS[1:]]
print(asyncio.run(main()))
"""
    )
    assert rc == 0, (rc, err[-2000:])
    assert out.strip() == str(["RecursionError"] * 5), out


def test_deep_recursion_in_anywhere_tasks_raises_recursion_error() -> None:
    rc, out, err = run_py(
        RECURSION_PATHS
        + """
async def one(p):
    return attempt(p)
async def main():
    asyncio.get_running_loop().set_task_factory(A.anywhere_task)
    return await asyncio.gather(*(one(p) for p in PATHS))
print(asyncio.run(main()))
"""
    )
    assert rc == 0, (rc, err[-2000:])
    assert out.strip() == str(["RecursionError"] * 6), out


def test_small_stack_setting_still_raises_recursion_error() -> None:
    """TOKIOLOOP_FIBER_STACK_KB shrinks stacks; 3.12+ scale the C budget,
    3.10/3.11 (no C budget) keep room for the default recursion limit (a
    1 MiB stack used to overflow there: SIGSEGV)."""
    want = 512 * 1024 if sys.version_info >= (3, 12) else 1000 * 4096 + 128 * 1024
    rc, out, err = run_py(
        RECURSION_PATHS
        + f"""
from tokioloop import _tokioloop as T
info = T.fiber_info()
assert info["stack_size"] == {want}, info"""
        + """
async def main():
    return [await A.run_anywhere(attempt, p) for p in PATHS]
print(asyncio.run(main()))
""",
        env={"TOKIOLOOP_FIBER_STACK_KB": "512"},
    )
    assert rc == 0, (rc, err[-2000:])
    assert out.strip() == str(["RecursionError"] * 6), out


def test_100k_suspended_fibers() -> None:
    """Beyond the kernel's map-count limit for one mapping per guarded stack
    (~32k at vm.max_map_count=65530)."""
    rc, out, err = run_py(
        """
        import asyncio, gc
        from tokioloop import _tokioloop as T
        import tokioloop._anywhere as A
        N = 100_000
        def sync(fut):
            return A.await_(fut)
        async def main():
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            coros = [A.run_anywhere(sync, fut) for _ in range(N)]
            for c in coros:
                assert c.send(None) is fut  # suspended in await_
                fut._asyncio_future_blocking = False  # what a Task does
            info = T.fiber_info()
            maps = sum(1 for _ in open("/proc/self/maps"))
            fut.set_result(7)
            results = []
            for c in coros:
                try:
                    c.send(None)
                except StopIteration as e:
                    results.append(e.value)
            return info, maps, results
        info, maps, results = asyncio.run(main())
        assert results == [7] * N
        assert info["total_slots"] >= N and info["guarded_slots"] <= info["guard_budget"]
        print("ok", maps)
        """,
        timeout=120,
    )
    assert rc == 0, (rc, err[-2000:])
    assert out.startswith("ok"), out
    assert int(out.split()[1]) < 30_000  # mappings of the whole process


def test_thread_exit_with_idle_runners_and_suspended_fibers() -> None:
    rc, out, err = run_py(
        """
        import asyncio, threading, gc
        from tokioloop import _tokioloop as T
        import tokioloop._anywhere as A
        keep = []
        def thread_main():
            async def body():
                return A.await_(asyncio.sleep(0, result=1))
            async def main():
                asyncio.get_running_loop().set_task_factory(A.anywhere_task)
                r = await asyncio.gather(*(body() for _ in range(10)))
                c = A.run_anywhere(A.await_, asyncio.get_running_loop().create_future())
                c.send(None)
                keep.append(c)  # suspended fiber outlives its thread
                return r
            print(asyncio.run(main()))
        for _ in range(3):
            t = threading.Thread(target=thread_main)
            t.start()
            t.join()
        keep.clear()   # dropped on the main thread: leaked and reported
        gc.collect()
        print("free", T.fiber_info()["free_slots"] > 0)
        """
    )
    assert rc == 0, (rc, err[-2000:])
    assert out.splitlines()[-1] == "free True", out
    assert err.count("another thread") == 3, err
