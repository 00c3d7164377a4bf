"""Await-anywhere benchmarks: tokioloop vs greenback vs a bare greenlet
bridge vs asgiref, side by side in one run.

    python benchmarks/anywhere/bench_anywhere.py [--quick] [--pin] [--json FILE]

Timing: every number is the minimum over many short samples, and the
variants compared in one table are sampled in turn (round robin), so bursts
of load on a shared 2-vCPU VM hit them alike and the minimum finds the quiet
windows. `--pin` pins the loop thread and the worker thread to different
CPUs (off by default: on a loaded VM a pinned thread waits for its CPU).
Memory is measured in fresh subprocesses (RSS and page tables from
/proc/self/status). Prints markdown tables and the targets of issue 3.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import greenback
import greenlet
import uvloop
from asgiref.sync import async_to_sync, sync_to_async

import tokioloop._anywhere as anywhere
from tokioloop import _tokioloop as T
from tokioloop._anywhere import anywhere_task, await_, run_anywhere, wrap_for_executor

QUICK = False
PIN = False
NCPU = os.cpu_count() or 1


def pin(cpu: int) -> None:
    """With --pin: pin the calling thread (Linux: pid 0 = this thread) to
    one CPU. Off by default: on a loaded 2-vCPU VM a pinned thread waits for
    its CPU, which turns a 5 us cross-thread handoff into 150 us."""
    if PIN and hasattr(os, "sched_setaffinity") and NCPU > 1:
        os.sched_setaffinity(0, {cpu % NCPU})


ROUNDS = 25


def best(fn: Callable[[], float], rounds: int = ROUNDS) -> float:
    return min(fn() for _ in range(2 if QUICK else rounds))


def interleaved(variants: dict[str, Callable[[], float]], rounds: int = ROUNDS) -> dict[str, float]:
    """Minimum per variant over `rounds` samples, sampling the variants in
    turn so that load changes on a shared machine hit all of them alike."""
    out = {k: float("inf") for k in variants}
    for _ in range(2 if QUICK else rounds):
        for k, fn in variants.items():
            out[k] = min(out[k], fn())
    return out


def n(full: int) -> int:
    return max(1, full // 10) if QUICK else full


# -- a bare greenlet bridge (what greenback does, minus its portal plumbing) --


def gl_await(aw: Awaitable[Any]) -> Any:
    """From sync code running in a bridge greenlet: wait for aw."""
    parent = greenlet.getcurrent().parent
    assert parent is not None
    ok, value = parent.switch(aw)
    if ok:
        return value
    raise value


async def gl_run(fn: Callable[..., Any], *args: Any) -> Any:
    """Run sync fn in a child greenlet; await what it hands over."""
    child = greenlet.greenlet(fn)
    req = child.switch(*args)
    while not child.dead:
        try:
            value = (True, await req)
        except BaseException as e:
            value = (False, e)
        req = child.switch(value)
    return req


async def gb_run(fn: Callable[..., Any], *args: Any) -> Any:
    await greenback.ensure_portal()
    return fn(*args)


# -- runners --------------------------------------------------------------------

Runner = Callable[[Callable[..., Any]], Coroutine[Any, Any, Any]]
BRIDGES: dict[str, tuple[Runner, Callable[[Awaitable[Any]], Any]]] = {
    "tokioloop": (lambda fn: run_anywhere(fn), await_),  # type: ignore[dict-item]
    "greenback": (lambda fn: gb_run(fn), greenback.await_),
    "greenlet bridge": (lambda fn: gl_run(fn), gl_await),
}


def on_loop(
    factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, Any]
) -> Any:
    loop = factory()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def bench_done_future() -> dict[str, float]:
    """ns per await_ of an already-done future, from sync code in a fiber."""
    N = n(20_000)
    variants: dict[str, Callable[[], float]] = {}
    for name, (runner, aw) in BRIDGES.items():

        async def main(runner: Runner = runner, aw: Any = aw) -> float:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(1)

            def sync() -> float:
                t0 = time.perf_counter_ns()
                for _ in range(N):
                    aw(fut)
                return (time.perf_counter_ns() - t0) / N

            return await runner(sync)

        variants[name] = lambda main=main: on_loop(asyncio.new_event_loop, main())
    return interleaved(variants)


def bench_sleep0(factory: Callable[[], asyncio.AbstractEventLoop]) -> dict[str, float]:
    """ns per await_(asyncio.sleep(0)) from sync code, and native await."""
    N = n(5_000)
    variants: dict[str, Callable[[], float]] = {}

    async def native() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(N):
            await asyncio.sleep(0)
        return (time.perf_counter_ns() - t0) / N

    variants["native await"] = lambda: on_loop(factory, native())
    for name, (runner, aw) in BRIDGES.items():

        async def main(runner: Runner = runner, aw: Any = aw) -> float:
            def sync() -> float:
                t0 = time.perf_counter_ns()
                for _ in range(N):
                    aw(asyncio.sleep(0))
                return (time.perf_counter_ns() - t0) / N

            return await runner(sync)

        variants[name] = lambda main=main: on_loop(factory, main())

    async def in_task() -> float:
        asyncio.get_running_loop().set_task_factory(anywhere_task)  # type: ignore[arg-type]

        async def body() -> float:
            t0 = time.perf_counter_ns()
            for _ in range(N):
                await_(asyncio.sleep(0))
            return (time.perf_counter_ns() - t0) / N

        return await asyncio.ensure_future(body())

    variants["tokioloop (anywhere task)"] = lambda: on_loop(factory, in_task())
    return interleaved(variants)


async def answer(x: int) -> int:
    return x + 1


def bench_no_loop_thread() -> dict[str, float]:
    """us per call from a thread with no running loop to an async function."""
    N = n(2_000)
    M = n(200) // 10 or 1  # asgiref is ~100x slower
    result: dict[str, float] = {}

    def thread_main() -> None:
        pin(0)
        loops = {
            "tokioloop (private asyncio loop)": asyncio.new_event_loop(),
            "tokioloop (private uvloop loop)": uvloop.new_event_loop(),
        }
        saved = anywhere._new_private_loop

        # The thread's persistent loop is held by a closer (which closes it
        # when dropped); keep one per loop alive and swap them in.
        closers = {id(loop): anywhere._LoopCloser(loop) for loop in loops.values()}

        def tokio(loop: asyncio.AbstractEventLoop) -> float:
            anywhere._thread_state.closer = closers[id(loop)]
            t0 = time.perf_counter_ns()
            for i in range(N):
                await_(answer(i))
            return (time.perf_counter_ns() - t0) / N / 1000

        fn = async_to_sync(answer)

        def asgi() -> float:
            t0 = time.perf_counter_ns()
            for i in range(M):
                fn(i)
            return (time.perf_counter_ns() - t0) / M / 1000

        try:
            variants: dict[str, Callable[[], float]] = {
                k: (lambda loop=loop: tokio(loop)) for k, loop in loops.items()
            }
            variants["asgiref async_to_sync"] = asgi
            for f in variants.values():  # warm up
                f()
            result.update(interleaved(variants, 15))
            assert all(not loop.is_closed() for loop in loops.values())
        finally:
            anywhere._new_private_loop = saved
            anywhere._thread_state.__dict__.clear()
            for loop in loops.values():
                loop.close()

    t = threading.Thread(target=thread_main)
    t.start()
    t.join()
    return result


def bench_worker_to_loop(factory: Callable[[], asyncio.AbstractEventLoop]) -> dict[str, float]:
    """us per call from a loop's worker thread to the owning loop: the
    worker runs under asgiref's sync_to_async (so async_to_sync finds the
    loop) and wrap_for_executor (so await_ does), and samples both in turn."""
    N = n(300)
    M = max(10, N // 10)

    async def main() -> dict[str, float]:
        pin(0)
        loop = asyncio.get_running_loop()
        fn = async_to_sync(answer)

        def worker() -> dict[str, float]:
            pin(1)

            def tokio() -> float:
                t0 = time.perf_counter_ns()
                for i in range(N):
                    await_(answer(i))
                return (time.perf_counter_ns() - t0) / N / 1000

            def asgi() -> float:
                t0 = time.perf_counter_ns()
                for i in range(M):
                    fn(i)
                return (time.perf_counter_ns() - t0) / M / 1000

            tokio()
            asgi()
            return interleaved(
                {"tokioloop": tokio, "asgiref sync_to_async+async_to_sync": asgi}, 40
            )

        return await sync_to_async(wrap_for_executor(loop, worker), thread_sensitive=False)()

    out = on_loop(factory, main())
    if PIN and NCPU > 1:
        os.sched_setaffinity(0, set(range(NCPU)))
    return out  # type: ignore[no-any-return]


def rec_map(depth: int, leaf: Callable[[], Any]) -> Any:
    if depth == 0:
        return leaf()
    return list(map(lambda k: rec_map(k, leaf), [depth - 1]))[0]


def bench_switch_depth() -> dict[str, dict[int, float]]:
    """ns per switch round trip (resume + suspend) at a depth reached
    through map() (C frames on the stack), fiber vs greenlet."""
    N = n(20_000)
    variants: dict[str, Callable[[], float]] = {}
    for depth in (1, 50, 200):

        def fib_leaf(suspend: Callable[[], Any] = T.fiber_suspend) -> None:
            while True:
                suspend()

        fb = T.Fiber(rec_map, depth, fib_leaf)
        fb.switch()

        def gl_leaf() -> None:
            parent = greenlet.getcurrent().parent
            assert parent is not None
            while True:
                parent.switch()

        g = greenlet.greenlet(lambda depth=depth: rec_map(depth, gl_leaf))
        g.switch()

        def timed(sw: Callable[[], Any]) -> float:
            t0 = time.perf_counter_ns()
            for _ in range(N):
                sw()
            return (time.perf_counter_ns() - t0) / N

        variants[f"tokioloop fiber/{depth}"] = lambda sw=fb.switch: timed(sw)
        variants[f"greenlet/{depth}"] = lambda sw=g.switch: timed(sw)
    res = interleaved(variants)
    out: dict[str, dict[int, float]] = {"tokioloop fiber": {}, "greenlet": {}}
    for k, v in res.items():
        name, depth = k.split("/")
        out[name][int(depth)] = v
    return out


def bench_sleep0_depth() -> dict[str, dict[int, float]]:
    """ns per await_(sleep(0)) at depth 1 and 200 through map()."""
    N = n(3_000)
    variants: dict[str, Callable[[], float]] = {}
    for name, (runner, aw) in BRIDGES.items():
        for depth in (1, 200):

            async def main(runner: Runner = runner, aw: Any = aw, depth: int = depth) -> float:
                def leaf() -> float:
                    t0 = time.perf_counter_ns()
                    for _ in range(N):
                        aw(asyncio.sleep(0))
                    return (time.perf_counter_ns() - t0) / N

                return await runner(lambda: rec_map(depth, leaf))

            variants[f"{name}/{depth}"] = lambda main=main: on_loop(uvloop.new_event_loop, main())
    out: dict[str, dict[int, float]] = {}
    for k, v in interleaved(variants).items():
        name, depth = k.rsplit("/", 1)
        out.setdefault(name, {})[int(depth)] = v
    return out


# -- memory (subprocesses) --------------------------------------------------------


def _status() -> tuple[int, int]:
    s = open("/proc/self/status").read()
    rss = int(re.search(r"VmRSS:\s+(\d+)", s).group(1))  # type: ignore[union-attr]
    pte = int(re.search(r"VmPTE:\s+(\d+)", s).group(1))  # type: ignore[union-attr]
    return rss, pte


def memory_child(kind: str, count: int) -> None:
    """Suspend `count` fibers/greenlets waiting on one pending future;
    print KiB of RSS and page tables per suspended one."""
    gc.collect()
    gc.disable()

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        r0, p0 = _status()
        if kind == "tokioloop":
            coros = [run_anywhere(await_, fut) for _ in range(count)]
            for c in coros:
                c.send(None)
                fut._asyncio_future_blocking = False
        elif kind == "greenlet bridge":
            coros = [gl_run(gl_await, fut) for _ in range(count)]
            for c in coros:
                c.send(None)
                fut._asyncio_future_blocking = False
        elif kind == "greenback":
            coros = [asyncio.ensure_future(gb_run(greenback.await_, fut)) for _ in range(count)]
            while sum(1 for t in coros if t._fut_waiter is not None) < count:  # type: ignore[attr-defined]
                await asyncio.sleep(0)
        else:
            raise SystemExit(f"unknown kind {kind}")
        r1, p1 = _status()
        maps = sum(1 for _ in open("/proc/self/maps"))
        res = {
            "rss_kib": (r1 - r0) / count,
            "pte_kib": (p1 - p0) / count,
            "maps": maps,
        }
        os._exit(print(json.dumps(res), flush=True) or 0)  # no teardown of N fibers

    asyncio.run(main())


def bench_memory() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    sizes = {"tokioloop": 100_000, "greenlet bridge": 100_000, "greenback": 20_000}
    for kind, count in sizes.items():
        count = n(count)
        p = subprocess.run(
            [sys.executable, __file__, "--memory-child", kind, str(count)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if p.returncode != 0:
            out[kind] = {"error": p.stderr[-500:], "count": count}
            continue
        d = json.loads(p.stdout.strip().splitlines()[-1])
        d["count"] = count
        out[kind] = d
    return out


# -- await-anywhere tasks vs plain tasks -------------------------------------------


def plain_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
    return asyncio.Task(coro, loop=loop, **kw)


def bench_tasks(factory: Callable[[], asyncio.AbstractEventLoop]) -> dict[str, dict[str, float]]:
    N = n(3_000)

    async def noop() -> int:
        return 1

    async def create_await() -> float:
        t0 = time.perf_counter_ns()
        for _ in range(N):
            await asyncio.ensure_future(noop())
        return (time.perf_counter_ns() - t0) / N

    async def pingpong() -> float:
        async def worker(k: int) -> None:
            for _ in range(k):
                await asyncio.sleep(0)

        t0 = time.perf_counter_ns()
        await asyncio.gather(*(asyncio.ensure_future(worker(N // 10)) for _ in range(10)))
        return (time.perf_counter_ns() - t0) / N

    def run(task_factory: Any, body: Callable[[], Coroutine[Any, Any, float]]) -> float:
        loop = factory()
        loop.set_task_factory(task_factory)
        try:
            return loop.run_until_complete(loop.create_task(body()))
        finally:
            loop.close()

    out: dict[str, dict[str, float]] = {}
    for label, body in (("task create+await", create_await), ("sleep(0) ping-pong", pingpong)):
        out[label] = interleaved(
            {
                "plain (no factory)": lambda body=body: run(None, body),
                "plain (Python factory)": lambda body=body: run(plain_factory, body),
                "anywhere_task": lambda body=body: run(anywhere_task, body),
            },
            31,
        )
    return out


# -- report -------------------------------------------------------------------------


def fmt(v: float, unit: str) -> str:
    if unit == "ns":
        return f"{v:,.0f} ns"
    if unit == "us":
        return f"{v:,.1f} us"
    return f"{v:.2f} {unit}"


def main() -> None:
    global QUICK, PIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    ap.add_argument("--pin", action="store_true", help="pin loop and worker threads to CPUs")
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    QUICK = args.quick
    PIN = args.pin
    gc.disable()
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"# await anywhere benchmarks\n\n`{cmd}`\n")
    print(
        f"Python {sys.version.split()[0]}, greenlet {greenlet.__version__}, "
        f"greenback {getattr(greenback, '__version__', '?')}, uvloop {uvloop.__version__}, "
        f"{NCPU} CPUs; minimum of round-robin samples; "
        f"fiber stack {T.fiber_info()['stack_size'] >> 10} KiB\n"
    )
    raw: dict[str, Any] = {}

    done = raw["done_future"] = bench_done_future()
    print("## await_ of an already-done future, from sync code in a fiber (per call)\n")
    print("| bridge | time |\n| --- | --- |")
    for k, v in done.items():
        print(f"| {k} | {fmt(v, 'ns')} |")
    print("| asgiref | n/a (no in-loop bridge) |\n")

    print("## await_(asyncio.sleep(0)) from sync code vs native `await` (per iteration)\n")
    cols = (
        "native await",
        "tokioloop",
        "tokioloop (anywhere task)",
        "greenback",
        "greenlet bridge",
    )
    print("| loop | " + " | ".join(cols) + " |")
    print("| --- | --- | --- | --- | --- | --- |")
    raw["sleep0"] = {}
    for lname, lf in (("asyncio", asyncio.new_event_loop), ("uvloop", uvloop.new_event_loop)):
        s = raw["sleep0"][lname] = bench_sleep0(lf)
        print(
            f"| {lname} | {fmt(s['native await'], 'ns')} | {fmt(s['tokioloop'], 'ns')} "
            f"| {fmt(s['tokioloop (anywhere task)'], 'ns')} | {fmt(s['greenback'], 'ns')} "
            f"| {fmt(s['greenlet bridge'], 'ns')} |"
        )
    print()

    nl = raw["no_loop"] = bench_no_loop_thread()
    print("## sync thread without a loop calling an async function (per call, warm)\n")
    print("| bridge | time |\n| --- | --- |")
    for k, v in nl.items():
        print(f"| {k} | {fmt(v, 'us')} |")
    print("| greenback / greenlet bridge | n/a (need a running loop) |\n")

    print("## worker thread to its owning loop (per call)\n")
    print("| loop | tokioloop | asgiref sync_to_async+async_to_sync |\n| --- | --- | --- |")
    raw["worker"] = {}
    for lname, lf in (("asyncio", asyncio.new_event_loop), ("uvloop", uvloop.new_event_loop)):
        w = raw["worker"][lname] = bench_worker_to_loop(lf)
        print(
            f"| {lname} | {fmt(w['tokioloop'], 'us')} "
            f"| {fmt(w['asgiref sync_to_async+async_to_sync'], 'us')} |"
        )
    print()

    sd = raw["switch_depth"] = bench_switch_depth()
    print("## switch round trip (resume + suspend) vs stack depth through map()\n")
    print("| depth | tokioloop fiber | greenlet |\n| --- | --- | --- |")
    for d in (1, 50, 200):
        print(f"| {d} | {fmt(sd['tokioloop fiber'][d], 'ns')} | {fmt(sd['greenlet'][d], 'ns')} |")
    print()
    s0d = raw["sleep0_depth"] = bench_sleep0_depth()
    print("## await_(sleep(0)) at depth 1 and 200 through map(), uvloop (per iteration)\n")
    print("| bridge | depth 1 | depth 200 |\n| --- | --- | --- |")
    for k, v in s0d.items():
        print(f"| {k} | {fmt(v[1], 'ns')} | {fmt(v[200], 'ns')} |")
    print()

    mem = raw["memory"] = bench_memory()
    print("## memory per suspended fiber / greenlet (fresh process, all suspended at once)\n")
    print("| bridge | suspended | RSS per one | page tables per one | mappings |")
    print("| --- | --- | --- | --- | --- |")
    for k, v in mem.items():
        if "error" in v:
            print(f"| {k} | {v['count']:,} | failed: {v['error'][-120:]!r} | | |")
        else:
            print(
                f"| {k} | {v['count']:,} | {v['rss_kib']:.2f} KiB | {v['pte_kib']:.2f} KiB "
                f"| {v['maps']:,} |"
            )
    print()

    print("## await-anywhere tasks vs plain tasks (per task / per iteration)\n")
    print("| loop | benchmark | plain (no factory) | plain (Python factory) | anywhere_task |")
    print("| --- | --- | --- | --- | --- |")
    raw["tasks"] = {}
    for lname, lf in (("asyncio", asyncio.new_event_loop), ("uvloop", uvloop.new_event_loop)):
        tb = raw["tasks"][lname] = bench_tasks(lf)
        for label, row in tb.items():
            base = row["plain (no factory)"]
            cells = " | ".join(
                f"{fmt(v, 'ns')} ({(v / base - 1) * 100:+.0f}%)" for v in row.values()
            )
            print(f"| {lname} | {label} | {cells} |")
    print()

    # targets of issue 3
    sl = raw["sleep0"]
    tk = mem.get("tokioloop", {})
    targets = [
        (
            "await_ of a done future <= 300 ns",
            done["tokioloop"] <= 300,
            fmt(done["tokioloop"], "ns"),
        ),
        (
            "await_(sleep(0)) <= native + 0.5 us (asyncio, uvloop)",
            all(sl[x]["tokioloop"] <= sl[x]["native await"] + 500 for x in sl),
            ", ".join(f"{x}: +{sl[x]['tokioloop'] - sl[x]['native await']:,.0f} ns" for x in sl),
        ),
        (
            "no-loop thread -> async fn <= 10 us (warm)",
            min(v for k, v in nl.items() if k.startswith("tokioloop")) <= 10,
            ", ".join(f"{k}: {v:.1f} us" for k, v in nl.items() if k.startswith("tokioloop")),
        ),
        (
            "worker thread -> owning loop <= 25 us",
            all(w["tokioloop"] <= 25 for w in raw["worker"].values()),
            ", ".join(f"{k}: {w['tokioloop']:.1f} us" for k, w in raw["worker"].items()),
        ),
        (
            "switch cost flat with depth (1 vs 200 through map)",
            sd["tokioloop fiber"][200] <= 1.25 * sd["tokioloop fiber"][1],
            f"{sd['tokioloop fiber'][1]:.0f} ns / {sd['tokioloop fiber'][200]:.0f} ns",
        ),
        (
            "<= 8 KiB per suspended fiber (RSS)",
            bool(tk) and "error" not in tk and tk["rss_kib"] <= 8,
            f"{tk.get('rss_kib', float('nan')):.2f} KiB RSS (+{tk.get('pte_kib', float('nan')):.2f}"
            " KiB page tables)",
        ),
        (
            "100k suspended fibers work",
            bool(tk) and "error" not in tk and tk.get("count", 0) >= 100_000,
            f"{tk.get('count', 0):,} suspended, {tk.get('maps', 0):,} mappings",
        ),
    ]
    print("## targets\n")
    print("| target | measured | met |\n| --- | --- | --- |")
    for name, ok, measured in targets:
        print(f"| {name} | {measured} | {'yes' if ok else 'NO'} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1, default=str)


if __name__ == "__main__":
    main()
