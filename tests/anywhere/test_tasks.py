"""Await-anywhere tasks: anywhere_task() as a loop's task factory."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from tokioloop import _tokioloop as T
from tokioloop._anywhere import AnywhereCoroutine, anywhere_task, await_, run_anywhere

from .conftest import LoopFactory, Unraisables

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture
def arun(loop_factory: LoopFactory) -> Any:
    """run(coro) as the main task of a fresh loop whose tasks are
    await-anywhere tasks."""
    loops: list[asyncio.AbstractEventLoop] = []

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        loop = loop_factory()
        loops.append(loop)
        loop.set_task_factory(anywhere_task)  # type: ignore[arg-type]
        return loop.run_until_complete(coro)

    yield runner
    for loop in loops:
        loop.close()


async def later(v: Any, delay: float = 0.001) -> Any:
    await asyncio.sleep(delay)
    return v


def sync_fetch(v: Any) -> Any:
    """Plain synchronous code that awaits."""
    return await_(later(v))


def test_sync_code_awaits_directly_in_a_task(arun: Run) -> None:
    async def main() -> Any:
        assert isinstance(asyncio.current_task().get_coro(), AnywhereCoroutine)  # type: ignore[union-attr]
        direct = sync_fetch("direct")
        in_map = list(map(sync_fetch, [1, 2, 3]))
        in_sorted = sorted([3, 1, 2], key=lambda v: sync_fetch(-v))
        return direct, in_map, in_sorted

    assert arun(main()) == ("direct", [1, 2, 3], [3, 2, 1])


def test_child_tasks_are_anywhere_tasks_too(arun: Run) -> None:
    async def child(i: int) -> int:
        return int(sync_fetch(i)) * 2

    async def main() -> Any:
        return await asyncio.gather(*(child(i) for i in range(20)))

    assert arun(main()) == [i * 2 for i in range(20)]


def test_task_repr_stack_and_coro(arun: Run) -> None:
    async def waiter(ev: asyncio.Event) -> None:
        await ev.wait()

    async def main() -> Any:
        ev = asyncio.Event()
        t = asyncio.ensure_future(waiter(ev))
        await asyncio.sleep(0)
        r = repr(t)
        stack = t.get_stack()
        coro = t.get_coro()
        ev.set()
        await t
        return r, stack, coro, repr(t)

    r, stack, coro, done_repr = arun(main())
    assert "coro=<test_task_repr_stack_and_coro.<locals>.waiter() running at" in r
    assert [f.f_code.co_name for f in stack] == ["waiter"]
    assert isinstance(coro, AnywhereCoroutine) and coro.__wrapped__.__name__ == "waiter"
    assert "waiter() done, defined at" in done_repr


def test_exception_traceback_has_sync_and_coroutine_frames(arun: Run) -> None:
    async def failing() -> None:
        await asyncio.sleep(0)
        raise KeyError("deep")

    def sync_layer() -> None:
        await_(failing())

    async def task_body() -> None:
        sync_layer()

    async def main() -> BaseException:
        try:
            await asyncio.ensure_future(task_body())
        except KeyError as e:
            return e
        raise AssertionError

    e = arun(main())
    names = [f.name for f in traceback.extract_tb(e.__traceback__)]
    assert names.index("task_body") < names.index("sync_layer") < names.index("failing")


def test_cancel_while_sync_code_waits(arun: Run) -> None:
    log: list[str] = []

    def sync_wait() -> None:
        try:
            await_(asyncio.sleep(10))
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    async def body() -> None:
        sync_wait()

    async def main() -> Any:
        t = asyncio.ensure_future(body())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        return t.cancelled(), (t.cancelling() if sys.version_info >= (3, 11) else 0)

    assert arun(main()) == (True, 1 if sys.version_info >= (3, 11) else 0)
    assert log == ["cancelled", "finally"]


def test_wait_for_timeout_reaches_sync_code(arun: Run) -> None:
    log: list[str] = []

    def sync_wait() -> None:
        try:
            await_(asyncio.sleep(10))
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    async def body() -> None:
        sync_wait()

    async def main() -> list[str]:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(body(), 0.01)
        return log

    assert arun(main()) == ["cancelled"]


def test_current_task_and_contextvars(arun: Run) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def sync() -> Any:
        seen = var.get()
        var.set("from-sync")
        await_(asyncio.sleep(0))
        return asyncio.current_task(), seen

    async def main() -> Any:
        var.set("from-task")
        task, seen = sync()
        return task is asyncio.current_task(), seen, var.get()

    assert arun(main()) == (True, "from-task", "from-sync")


def test_run_anywhere_inside_an_anywhere_task(arun: Run) -> None:
    async def main() -> Any:
        return await run_anywhere(lambda: [sync_fetch(i) for i in range(3)])

    assert arun(main()) == [0, 1, 2]


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_eager_anywhere_task(loop_factory: LoopFactory) -> None:
    loop = loop_factory()

    def eager_factory(loop: Any, coro: Any, **kw: Any) -> Any:
        kw["eager_start"] = True
        return anywhere_task(loop, coro, **kw)

    loop.set_task_factory(eager_factory)

    async def quick() -> str:
        return "eager"

    async def slow() -> Any:
        return sync_fetch("slow")

    async def main() -> Any:
        t1 = asyncio.ensure_future(quick())
        done_at_once = t1.done()
        return done_at_once, await t1, await asyncio.ensure_future(slow())

    try:
        assert loop.run_until_complete(main()) == (True, "eager", "slow")
    finally:
        loop.close()


def test_runners_are_reused_and_released(arun: Run) -> None:
    async def step_only() -> int:
        await asyncio.sleep(0)
        return 1

    async def waits_in_sync() -> int:
        return int(sync_fetch(1))

    async def main() -> Any:
        for _ in range(3):
            await asyncio.gather(*(step_only() for _ in range(50)))
            await asyncio.gather(*(waits_in_sync() for _ in range(50)))
        before = T.fiber_info()
        for _ in range(5):
            await asyncio.gather(*(step_only() for _ in range(50)))
            await asyncio.gather(*(waits_in_sync() for _ in range(50)))
        after = T.fiber_info()
        return before, after

    before, after = arun(main())
    assert after["total_slots"] == before["total_slots"]  # no growth: stacks reused
    assert 1 <= after["idle_runners"] <= 4


def test_dropped_wrapper_with_waiting_sync_code_is_unwound(run: Run) -> None:
    log: list[str] = []

    def sync() -> None:
        try:
            await_(asyncio.sleep(10))
        finally:
            log.append("finally")

    async def body() -> None:
        sync()

    async def main() -> None:
        w = AnywhereCoroutine(body())
        fut = w.send(None)
        assert isinstance(fut, asyncio.Future)
        del w
        gc.collect()
        fut.cancel()

    run(main())
    assert log == ["finally"]


def test_wrapper_close_semantics(run: Run, unraisables: Unraisables) -> None:
    async def plain() -> None:
        await asyncio.sleep(0)

    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0)

    async def main() -> None:
        # unstarted: closes the coroutine
        w = AnywhereCoroutine(plain())
        w.close()
        with pytest.raises(RuntimeError, match="cannot reuse"):
            w.send(None)
        # a coroutine that awaits in finally while closing
        w2 = AnywhereCoroutine(stubborn())
        w2.send(None)
        with pytest.raises(RuntimeError, match="ignored GeneratorExit"):
            w2.close()
        # sync code suspended in await_ while the wrapper is closed
        log: list[str] = []

        def sync() -> None:
            try:
                await_(asyncio.sleep(10))
            except GeneratorExit:
                log.append("GeneratorExit")
                raise

        async def body() -> None:
            sync()

        w3 = AnywhereCoroutine(body())
        w3.send(None)
        w3.close()
        assert log == ["GeneratorExit"]

    run(main())
    gc.collect()


def test_wrapper_resumed_from_another_thread_is_refused(run: Run) -> None:
    async def body() -> str:
        return str(sync_fetch("done"))

    async def main() -> str:
        w = AnywhereCoroutine(body())
        w.send(None)
        errors: list[str] = []

        def other() -> None:
            try:
                w.send(None)
            except RuntimeError as e:
                errors.append(str(e))

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert errors and "thread" in errors[0]
        await asyncio.sleep(0.01)
        while True:
            try:
                w.send(None)
            except StopIteration as e:
                return str(e.value)

    assert run(main()) == "done"


def test_anywhere_task_rejects_non_coroutines(loop_factory: LoopFactory) -> None:
    loop = loop_factory()
    try:
        with pytest.raises(TypeError, match="coroutine was expected"):
            anywhere_task(loop, 42)  # type: ignore[arg-type]
    finally:
        loop.close()


def test_plain_coroutines_unaffected_by_wrapper(arun: Run) -> None:
    """Generators-based and native awaits, exceptions, return values."""

    async def raises() -> None:
        raise ValueError("x")

    async def main() -> Any:
        with pytest.raises(ValueError):
            await asyncio.ensure_future(raises())
        r = await asyncio.ensure_future(later((1, 2)))
        return r

    assert arun(main()) == (1, 2)
