"""call_soon_threadsafe, tasks and futures, executors, async generators."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import sys
import threading
import time

import pytest

import tokioloop

from ..conftest import PY311, PY312, PY313


def test_call_soon_threadsafe_from_many_threads(loop: tokioloop.Loop) -> None:
    n_threads, per_thread = 8, 2000
    seen: list[tuple[int, int]] = []
    done = threading.Barrier(n_threads + 1)

    def worker(t: int) -> None:
        for i in range(per_thread):
            loop.call_soon_threadsafe(seen.append, (t, i))
        done.wait()

    async def main() -> None:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        await loop.run_in_executor(None, done.wait)
        for th in threads:
            th.join()
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert len(seen) == n_threads * per_thread
    for t in range(n_threads):  # each thread's calls keep their order
        assert [i for (tt, i) in seen if tt == t] == list(range(per_thread))


def test_call_soon_threadsafe_wakes_a_sleeping_loop(loop: tokioloop.Loop) -> None:
    woke: list[float] = []

    def later() -> None:
        time.sleep(0.05)
        t = time.monotonic()
        loop.call_soon_threadsafe(lambda: (woke.append(time.monotonic() - t), loop.stop()))

    threading.Thread(target=later).start()
    loop.call_later(30, loop.stop)  # the loop would sleep 30 s without a wake-up
    t0 = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - t0 < 5
    assert woke and woke[0] < 0.5


def test_stop_from_another_thread(loop: tokioloop.Loop) -> None:
    threading.Timer(0.05, loop.stop).start()
    loop.call_later(30, loop.stop)
    t0 = time.monotonic()
    loop.run_forever()
    assert time.monotonic() - t0 < 5


def test_run_coroutine_threadsafe(loop: tokioloop.Loop) -> None:
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.001)
        return a + b

    results: list[int] = []

    def client() -> None:
        for i in range(50):
            results.append(asyncio.run_coroutine_threadsafe(add(i, 1), loop).result(5))
        loop.call_soon_threadsafe(loop.stop)

    threading.Thread(target=client).start()
    loop.run_forever()
    assert results == [i + 1 for i in range(50)]


def test_tasks_are_c_tasks(loop: tokioloop.Loop) -> None:
    async def coro() -> int:
        return 1

    t = loop.create_task(coro(), name="named")
    assert type(t) is asyncio.Task
    assert t.get_name() == "named"
    assert loop.run_until_complete(t) == 1
    f = loop.create_future()
    assert type(f) is asyncio.Future and f.get_loop() is loop
    f.cancel()


@pytest.mark.skipif(not PY311, reason="create_task(context=) is new in 3.11")
def test_create_task_context(loop: tokioloop.Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("v", default="none")
    ctx = contextvars.copy_context()
    ctx.run(var.set, "in ctx")

    async def read() -> str:
        return var.get()

    assert loop.run_until_complete(loop.create_task(read(), context=ctx)) == "in ctx"
    assert loop.run_until_complete(loop.create_task(read())) == "none"


def test_create_task_context_rejected_on_310(loop: tokioloop.Loop) -> None:
    if PY311:
        pytest.skip("3.10 only")

    async def c() -> None:
        pass

    coro = c()
    with pytest.raises(TypeError):
        loop.create_task(coro, context=contextvars.copy_context())
    coro.close()


@pytest.mark.skipif(not PY313, reason="keyword pass-through is 3.13+")
def test_create_task_eager_start_passthrough(loop: tokioloop.Loop) -> None:
    ran: list[bool] = []

    async def c() -> None:
        ran.append(loop.is_running())

    async def main() -> None:
        t = loop.create_task(c(), eager_start=True)
        assert ran == [True]  # ran eagerly, before the first await
        await t

    loop.run_until_complete(main())


def test_create_task_kwargs_rejected_before_313(loop: tokioloop.Loop) -> None:
    if PY313:
        pytest.skip("3.12 and older")

    async def c() -> None:
        pass

    coro = c()
    with pytest.raises(TypeError, match="eager_start"):
        loop.create_task(coro, eager_start=True)  # type: ignore[call-arg]
    coro.close()


def test_task_factory(loop: tokioloop.Loop) -> None:
    made: list[object] = []

    def factory(lp: asyncio.AbstractEventLoop, coro: object, **kw: object) -> asyncio.Task[object]:
        made.append(kw)
        return asyncio.Task(coro, loop=lp, **kw)  # type: ignore[arg-type]

    assert loop.get_task_factory() is None
    loop.set_task_factory(factory)
    assert loop.get_task_factory() is factory

    async def c() -> int:
        return 5

    t = loop.create_task(c(), name="via-factory")
    assert t.get_name() == "via-factory"
    assert loop.run_until_complete(t) == 5
    if PY311:
        loop.run_until_complete(loop.create_task(c(), context=contextvars.copy_context()))
        assert "context" in made[-1]  # type: ignore[operator]
    with pytest.raises(TypeError):
        loop.set_task_factory(42)  # type: ignore[arg-type]
    loop.set_task_factory(None)
    assert loop.get_task_factory() is None


@pytest.mark.skipif(not PY312, reason="eager_task_factory is new in 3.12")
def test_eager_task_factory(loop: tokioloop.Loop) -> None:
    loop.set_task_factory(asyncio.eager_task_factory)

    async def c() -> str:
        return "eager"

    async def main() -> str:
        t = asyncio.create_task(c())
        assert t.done()  # completed synchronously
        return await t

    assert loop.run_until_complete(main()) == "eager"


def test_run_in_executor(loop: tokioloop.Loop) -> None:
    async def main() -> tuple[int, str]:
        a = await loop.run_in_executor(None, sum, [1, 2, 3])
        b = await asyncio.to_thread(lambda: threading.current_thread().name)
        return a, b

    a, name = loop.run_until_complete(main())
    assert a == 6 and name.startswith("asyncio")
    loop.run_until_complete(loop.shutdown_default_executor())
    with pytest.raises(RuntimeError, match="Executor shutdown has been called"):
        loop.run_until_complete(loop.run_in_executor(None, print))  # type: ignore[arg-type]


def test_run_in_process_pool(loop: tokioloop.Loop) -> None:
    """A process pool gets the function itself (it must pickle it), not
    the wrapper thread pools get for await_()."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        got = loop.run_until_complete(asyncio.wait_for(loop.run_in_executor(pool, pow, 2, 10), 60))
    assert got == 1024


def test_set_default_executor(loop: tokioloop.Loop) -> None:
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mine")
    loop.set_default_executor(ex)
    name = loop.run_until_complete(
        loop.run_in_executor(None, lambda: threading.current_thread().name)
    )
    assert name.startswith("mine")
    if PY311:
        with pytest.raises(TypeError):
            loop.set_default_executor(object())  # type: ignore[arg-type]
    loop.run_until_complete(loop.shutdown_default_executor())
    ex.shutdown()


@pytest.mark.skipif(not PY312, reason="shutdown_default_executor(timeout) is new in 3.12")
def test_shutdown_default_executor_timeout(loop: tokioloop.Loop) -> None:
    ev = threading.Event()
    fut = loop.run_in_executor(None, ev.wait, 5)
    threading.Timer(0.05, ev.set).start()
    loop.run_until_complete(loop.shutdown_default_executor(timeout=2))
    assert loop.run_until_complete(fut) is True
    assert loop._default_executor is not None
    assert loop._default_executor._shutdown  # type: ignore[attr-defined]


def test_executor_exception(loop: tokioloop.Loop) -> None:
    def fail() -> None:
        raise OSError("from worker")

    with pytest.raises(OSError, match="from worker"):
        loop.run_until_complete(loop.run_in_executor(None, fail))


def test_shutdown_asyncgens(loop: tokioloop.Loop) -> None:
    closed: list[bool] = []

    async def agen():  # type: ignore[no-untyped-def]
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def main() -> None:
        g = agen()
        assert await g.__anext__() == 1
        main.g = g  # type: ignore[attr-defined]  # keep it alive, unfinished

    loop.run_until_complete(main())
    assert not closed
    loop.run_until_complete(loop.shutdown_asyncgens())
    assert closed == [True]


def test_asyncgen_finalized_by_loop(loop: tokioloop.Loop) -> None:
    closed: list[bool] = []

    async def agen():  # type: ignore[no-untyped-def]
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def main() -> None:
        async for _ in agen():
            break  # the abandoned generator is finalized through the loop
        for _ in range(5):
            await asyncio.sleep(0)

    loop.run_until_complete(main())
    assert closed == [True]


def test_asyncgen_hooks_restored(loop: tokioloop.Loop) -> None:
    before = sys.get_asyncgen_hooks()
    loop.run_until_complete(asyncio.sleep(0))
    assert sys.get_asyncgen_hooks() == before


def test_wait_for_and_timeouts(loop: tokioloop.Loop) -> None:
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 0.02)
        assert await asyncio.wait_for(asyncio.sleep(0.001, "ok"), 1) == "ok"

    loop.run_until_complete(main())


def test_gather_many_tasks(loop: tokioloop.Loop) -> None:
    async def work(i: int) -> int:
        for _ in range(3):
            await asyncio.sleep(0)
        return i

    async def main() -> list[int]:
        return await asyncio.gather(*(work(i) for i in range(2000)))

    assert loop.run_until_complete(main()) == list(range(2000))


def test_a_thread_waiting_for_the_gil_gets_it_between_iterations() -> None:
    # asyncio (in select()) and uvloop release the GIL once per iteration, so
    # a thread that waits for it runs between iterations, not between two
    # callbacks of one iteration. Two tasks poll a queue.Queue with sleep(0);
    # another thread puts one item: the task that polls first in each
    # iteration gets it (Litestar's WebSocket test client relies on this).
    import queue

    loop = tokioloop.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        winners = []
        for _ in range(60):
            q: queue.Queue[int] = queue.Queue()
            got: list[str] = []

            async def poller(name: str, q: queue.Queue[int] = q, got: list[str] = got) -> None:
                while q.empty():
                    await asyncio.sleep(0)
                    if got:
                        return
                try:
                    q.get_nowait()
                    got.append(name)
                except queue.Empty:
                    pass

            async def both() -> None:
                await asyncio.gather(poller("first"), poller("second"))

            fut = asyncio.run_coroutine_threadsafe(both(), loop)
            time.sleep(0.0005)
            q.put(1)
            fut.result(10)
            winners.append(got[0])
        assert winners.count("second") <= 3, winners.count("second")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


_BUSY_DAEMON_LOOPS = """
import asyncio, threading, time
import tokioloop

def thread():
    loop = tokioloop.new_event_loop()
    async def forever():
        while True:
            await asyncio.sleep(0)
            sum(range(2000))
    loop.run_until_complete(forever())

for i in range(4):
    threading.Thread(target=thread, daemon=True).start()
time.sleep(0.2)
print("exiting", flush=True)
"""


def test_interpreter_exit_with_busy_daemon_loop_threads() -> None:
    """3.10-3.13 end a daemon thread that wants the GIL during finalization
    with pthread_exit(), a forced unwind; through the loop's Rust frames it
    aborted the process (SIGABRT in ~1 exit of 5). Callbacks are called so
    that the thread is parked instead, as 3.14 does."""
    import subprocess

    for _ in range(12):
        proc = subprocess.run(
            [sys.executable, "-c", _BUSY_DAEMON_LOOPS],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, (proc.returncode, proc.stderr.decode()[-2000:])
        assert proc.stdout.decode().strip() == "exiting"
