"""await_() inside run_anywhere() on every asyncio loop."""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import ctypes.util
import functools
import gc
import json
import re
import sqlite3
import sys
import threading
import traceback
import types
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from tokioloop import _tokioloop as T
from tokioloop._anywhere import AnywhereCoroutine, RunAnywhere, await_, run_anywhere

from .conftest import Unraisables

R = TypeVar("R")
Run = Callable[[Coroutine[Any, Any, Any]], Any]


async def value_later(v: R, delay: float = 0.001) -> R:
    await asyncio.sleep(delay)
    return v


def test_result_and_args(run: Run) -> None:
    def sync(a: int, b: int, *, c: int) -> tuple[int, Any]:
        return a + b + c, await_(value_later("x"))

    async def main() -> Any:
        return await run_anywhere(sync, 1, 2, c=3)

    assert run(main()) == (6, "x")


def test_awaitable_kinds(run: Run) -> None:
    class Custom:
        def __await__(self) -> Any:
            yield from asyncio.sleep(0).__await__()
            return "custom"

    @types.coroutine
    def legacy() -> Any:
        yield from asyncio.sleep(0)
        return "legacy"

    def sync() -> list[Any]:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        done.set_result("done-future")
        later = loop.create_future()
        loop.call_soon(later.set_result, "future")
        out = [await_(done), await_(later), await_(value_later("coroutine")), await_(Custom())]
        out.append(await_(asyncio.ensure_future(value_later("task"))))
        out.append(await_(legacy()))
        return out

    async def main() -> Any:
        return await run_anywhere(sync)

    assert run(main()) == ["done-future", "future", "coroutine", "custom", "task", "legacy"]


def test_exception_and_traceback_show_sync_and_coroutine_frames(run: Run) -> None:
    async def failing_coro() -> None:
        await asyncio.sleep(0)
        raise KeyError("from coroutine")

    def sync_leaf() -> None:
        await_(failing_coro())

    def sync_top() -> None:
        sync_leaf()

    async def main() -> BaseException:
        try:
            await run_anywhere(sync_top)
        except KeyError as e:
            return e
        raise AssertionError("no exception")

    e = run(main())
    names = [f.name for f in traceback.extract_tb(e.__traceback__)]
    assert names.index("main") < names.index("sync_top") < names.index("sync_leaf")
    assert names.index("sync_leaf") < names.index("failing_coro")


def test_exception_raised_by_sync_code_propagates(run: Run) -> None:
    def sync() -> None:
        await_(asyncio.sleep(0))
        raise ValueError("sync")

    async def main() -> None:
        await run_anywhere(sync)

    with pytest.raises(ValueError, match="sync"):
        run(main())


@pytest.mark.parametrize("suspend_first", [False, True])
def test_stop_iteration_out_of_sync_code_becomes_runtime_error(
    run: Run, suspend_first: bool
) -> None:
    """PEP 479, as for a coroutine: a StopIteration escaping the function
    must not read as the awaitable's return (`await` gave its value)."""

    def sync() -> None:
        if suspend_first:
            await_(asyncio.sleep(0))
        raise StopIteration(42)

    async def main() -> Any:
        return await run_anywhere(sync)

    with pytest.raises(RuntimeError, match="raised StopIteration") as info:
        run(main())
    assert isinstance(info.value.__cause__, StopIteration)
    assert info.value.__cause__.value == 42


def _under_c(kind: str) -> Any:
    """await_ through one kind of C frame; returns what the C code built."""

    def aw(v: Any) -> Any:
        return await_(value_later(v, 0))

    if kind == "map":
        return list(map(aw, [1, 2, 3]))
    if kind == "filter":
        return list(filter(lambda v: aw(v % 2), [1, 2, 3]))
    if kind == "sorted":
        return sorted([3, 1, 2], key=lambda v: aw(-v))
    if kind == "reduce":
        return functools.reduce(lambda a, b: aw(a + b), [1, 2, 3])
    if kind == "re.sub":
        return re.sub(r"\d", lambda m: aw(m.group() * 2), "a1b2")
    if kind == "json.dumps":
        return json.dumps({"x": object()}, default=lambda o: aw("obj"))
    if kind == "dict dunders":

        class Key:
            def __init__(self, v: int) -> None:
                self.v = v

            def __hash__(self) -> int:
                return aw(hash(self.v))  # type: ignore[no-any-return]

            def __eq__(self, other: object) -> bool:
                return aw(isinstance(other, Key) and other.v == self.v)  # type: ignore[no-any-return]

        d = {Key(1): "one"}
        return d[Key(1)]
    if kind == "property+getattr":

        class Obj:
            @property
            def prop(self) -> Any:
                return aw("prop")

            def __getattr__(self, name: str) -> Any:
                return aw("attr:" + name)

        o = Obj()
        return (o.prop, o.missing)
    if kind == "sqlite3":
        db = sqlite3.connect(":memory:")
        try:
            db.create_function("aw", 1, aw)
            return db.execute("select aw(21) * 2").fetchone()[0]
        finally:
            db.close()
    if kind == "ctypes":
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        cmp_t = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)
        )
        arr = (ctypes.c_int * 4)(4, 2, 3, 1)
        cb = cmp_t(lambda a, b: aw((a[0] > b[0]) - (a[0] < b[0])))
        libc.qsort(arr, 4, ctypes.sizeof(ctypes.c_int), cb)
        return list(arr)
    if kind == "generator in map":

        def gen() -> Any:
            for i in range(3):
                yield aw(i * 10)

        return list(map(lambda x: x + 1, gen()))
    raise AssertionError(kind)


UNDER_C = {
    "map": [1, 2, 3],
    "filter": [1, 3],
    "sorted": [3, 2, 1],
    "reduce": 6,
    "re.sub": "a11b22",
    "json.dumps": '{"x": "obj"}',
    "dict dunders": "one",
    "property+getattr": ("prop", "attr:missing"),
    "sqlite3": 42,
    "ctypes": [1, 2, 3, 4],
    "generator in map": [1, 11, 21],
}


@pytest.mark.parametrize("kind", list(UNDER_C))
def test_await_under_c_frames(run: Run, kind: str) -> None:
    async def main() -> Any:
        return await run_anywhere(_under_c, kind)

    assert run(main()) == UNDER_C[kind]


def test_current_task_inside_sync_code_is_the_enclosing_task(run: Run) -> None:
    seen: list[Any] = []

    def sync() -> None:
        seen.append(asyncio.current_task())
        await_(asyncio.sleep(0))
        seen.append(asyncio.current_task())

    async def main() -> Any:
        await run_anywhere(sync)
        return asyncio.current_task()

    task = run(main())
    assert seen == [task, task]


def test_contextvars_are_one_context_with_the_task(run: Run) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def sync() -> str:
        seen = var.get()
        var.set("set-in-sync")
        await_(asyncio.sleep(0))
        return seen + "/" + var.get()

    async def main() -> Any:
        var.set("set-in-task")
        inner = await run_anywhere(sync)
        return inner, var.get()

    assert run(main()) == ("set-in-task/set-in-sync", "set-in-sync")


def test_contextvars_of_other_tasks_are_isolated(run: Run) -> None:
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)

    def sync(i: int) -> list[int]:
        var.set(i)
        seen = []
        for _ in range(3):
            await_(asyncio.sleep(0))
            seen.append(var.get())
        return seen

    async def main() -> Any:
        return await asyncio.gather(*(run_anywhere(sync, i) for i in range(5)))

    assert run(main()) == [[i] * 3 for i in range(5)]


def test_sys_exc_info_is_per_fiber(run: Run) -> None:
    seen: dict[str, Any] = {}

    def sync() -> None:
        seen["start"] = sys.exc_info()[1]
        try:
            raise KeyError("sync")
        except KeyError:
            await_(asyncio.sleep(0.01))
            seen["after"] = sys.exc_info()[1]

    async def other() -> None:
        await asyncio.sleep(0.001)
        seen["other"] = sys.exc_info()[1]

    async def main() -> None:
        try:
            raise ValueError("task")
        except ValueError:
            await asyncio.gather(run_anywhere(sync), other())
            seen["task"] = sys.exc_info()[1]

    run(main())
    assert seen["start"] is None
    assert isinstance(seen["after"], KeyError)
    assert seen["other"] is None
    assert isinstance(seen["task"], ValueError)


def test_run_anywhere_sees_the_exception_its_awaiter_handles(run: Run) -> None:
    """Like a coroutine awaited in an `except` block: the sync code sees the
    awaiter's exception in sys.exc_info() and as the __context__ of what it
    raises, also after a suspension; not once the awaiter left the block."""

    def sync(tag: str) -> tuple[Any, Any, Any]:
        before = sys.exc_info()[1]
        await_(asyncio.sleep(0.001))
        after = sys.exc_info()[1]
        try:
            raise ValueError(tag)
        except ValueError as e:
            ctx = e.__context__
        return before, after, ctx

    def fails() -> None:
        await_(asyncio.sleep(0))
        raise ValueError("from the fiber")

    async def main() -> None:
        try:
            raise KeyError("outer")
        except KeyError as k:
            assert await run_anywhere(sync, "in except") == (k, k, k)
            assert sys.exc_info()[1] is k
            with pytest.raises(ValueError) as info:
                await run_anywhere(fails)
            assert info.value.__context__ is k
        assert await run_anywhere(sync, "after") == (None, None, None)

        def on_fiber() -> None:
            try:
                raise KeyError("on the fiber")
            except KeyError as k2:
                assert await_(run_anywhere(sync, "nested")) == (k2, k2, k2)
            assert await_(run_anywhere(sync, "nested after")) == (None, None, None)

        await run_anywhere(on_fiber)

    run(main())


def test_recursion_depth_is_per_fiber(run: Run) -> None:
    def sync() -> int:
        d = T._fiber_py_depth()
        await_(asyncio.sleep(0))
        return T._fiber_py_depth() - d

    async def deep(n: int) -> int:
        return await deep(n - 1) if n else await run_anywhere(sync)

    assert run(deep(50)) == 0


def test_deep_recursion_in_sync_code_raises_recursion_error(run: Run) -> None:
    def rec(n: int) -> int:
        return rec(n + 1) if n % 50 else list(map(rec, [n + 1]))[0]

    def sync() -> str:
        await_(asyncio.sleep(0))
        try:
            rec(1)
        except RecursionError:
            return "RecursionError"
        return "none"

    async def main() -> str:
        return await run_anywhere(sync)

    assert run(main()) == "RecursionError"


def test_nested_run_anywhere_and_await_inside_sync_code(run: Run) -> None:
    def inner(v: int) -> int:
        return await_(value_later(v)) * 2

    def outer() -> list[int]:
        # sync code awaits a run_anywhere() call: a nested fiber
        return [await_(run_anywhere(inner, i)) for i in range(3)]

    async def main() -> Any:
        return await run_anywhere(outer)

    assert run(main()) == [0, 2, 4]


def test_await_of_coroutine_calling_sync_code_that_awaits(run: Run) -> None:
    """The awaited coroutine's steps run on the fiber too, so sync code it
    calls can await_ again."""

    def deepest() -> str:
        return await_(value_later("deep"))

    async def middle() -> str:
        await asyncio.sleep(0)
        return deepest() + "+middle"

    def sync() -> str:
        return await_(middle())

    async def main() -> str:
        return await run_anywhere(sync)

    assert run(main()) == "deep+middle"


def test_many_concurrent_fibers_interleave(run: Run) -> None:
    order: list[tuple[int, int]] = []

    def sync(i: int) -> int:
        for step in range(3):
            await_(asyncio.sleep(0))
            order.append((i, step))
        return i

    async def main() -> Any:
        return await asyncio.gather(*(run_anywhere(sync, i) for i in range(50)))

    assert run(main()) == list(range(50))
    # interleaved: every fiber's first step happens before any third step
    first_third = min(k for k, (_, s) in enumerate(order) if s == 2)
    assert all(s != 0 for _, s in order[first_third:])


def test_cancel_raises_cancelled_error_out_of_await_and_runs_finally(run: Run) -> None:
    log: list[str] = []

    def sync(ev: asyncio.Event) -> None:
        try:
            ev.set()
            await_(asyncio.sleep(10))
        except asyncio.CancelledError:
            log.append("cancelled in sync")
            raise
        finally:
            log.append("finally")

    async def main() -> Any:
        ev = asyncio.Event()
        t = asyncio.ensure_future(run_anywhere(sync, ev))
        await ev.wait()
        await asyncio.sleep(0)
        t.cancel("why")
        with pytest.raises(asyncio.CancelledError):
            await t
        counts = (t.cancelling(), t.uncancel()) if sys.version_info >= (3, 11) else None
        return t.cancelled(), counts

    cancelled, counts = run(main())
    assert cancelled and log == ["cancelled in sync", "finally"]
    if counts is not None:
        assert counts == (1, 0)


def test_cancellation_caught_in_sync_code(run: Run) -> None:
    def sync() -> str:
        try:
            await_(asyncio.sleep(10))
        except asyncio.CancelledError:
            if sys.version_info >= (3, 11):
                task = asyncio.current_task()
                assert task is not None and task.cancelling() == 1
                task.uncancel()
            return "swallowed"
        return "not cancelled"

    async def main() -> Any:
        t = asyncio.ensure_future(run_anywhere(sync))
        await asyncio.sleep(0.01)
        t.cancel()
        r = await t
        return r, t.cancelled(), (t.cancelling() if sys.version_info >= (3, 11) else 0)

    assert run(main()) == ("swallowed", False, 0)


def test_wait_for_timeout_around_run_anywhere(run: Run) -> None:
    log: list[str] = []

    def sync() -> None:
        try:
            await_(asyncio.sleep(10))
        finally:
            log.append("finally")

    async def main() -> None:
        await asyncio.wait_for(run_anywhere(sync), 0.01)

    with pytest.raises(asyncio.TimeoutError):
        run(main())
    assert log == ["finally"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is 3.11+")
def test_asyncio_timeout_around_and_inside_sync_code(run: Run) -> None:
    from tokioloop._anywhere import async_context

    def sync_inner_timeout() -> str:
        try:
            with async_context(asyncio.timeout(0.01)):
                await_(asyncio.sleep(10))
        except TimeoutError:
            task = asyncio.current_task()
            assert task is not None
            return f"inner timeout, cancelling={task.cancelling()}"
        return "no timeout"

    def sync_sleeps() -> None:
        await_(asyncio.sleep(10))

    async def main() -> Any:
        inner = await run_anywhere(sync_inner_timeout)
        try:
            async with asyncio.timeout(0.01):
                await run_anywhere(sync_sleeps)
        except TimeoutError:
            outer = f"outer timeout, cancelling={asyncio.current_task().cancelling()}"  # type: ignore[union-attr]
        return inner, outer

    assert run(main()) == ("inner timeout, cancelling=0", "outer timeout, cancelling=0")


def test_await_outside_fiber_on_loop_thread_names_run_anywhere(run: Run) -> None:
    async def main() -> None:
        coro = value_later(1)
        with pytest.raises(RuntimeError, match="run_anywhere"):
            await_(coro)
        assert coro.cr_frame is None  # closed, no "never awaited" warning

    run(main())


def test_await_of_non_awaitable_is_type_error(run: Run) -> None:
    def sync() -> None:
        await_(42)

    async def main() -> None:
        await run_anywhere(sync)

    with pytest.raises(TypeError, match="can't be used in 'await' expression"):
        run(main())
    with pytest.raises(TypeError, match="can't be used in 'await' expression"):
        await_(42)  # no loop, no fiber: same error


def test_await_of_coroutine_awaited_elsewhere_raises_like_await(run: Run) -> None:
    async def main() -> list[str]:
        coro = value_later("v", 0.01)
        t = asyncio.ensure_future(coro)
        await asyncio.sleep(0)  # the task now awaits inside coro

        errors = []

        def sync() -> None:
            for c in (coro,):
                try:
                    await_(c)
                except RuntimeError as e:
                    errors.append(str(e))
            done = value_later("x", 0)
            await_(done)
            try:
                await_(done)
            except RuntimeError as e:
                errors.append(str(e))

        await run_anywhere(sync)
        await t
        return errors

    errors = run(main())
    assert "being awaited already" in errors[0]
    assert "cannot reuse already awaited coroutine" in errors[1]


def test_run_anywhere_object_behaves_like_a_coroutine(run: Run) -> None:
    def sync() -> str:
        return await_(value_later("ok"))

    async def main() -> Any:
        c = run_anywhere(sync)
        assert asyncio.iscoroutine(c) and isinstance(c, RunAnywhere)
        assert "run_anywhere" in repr(c) and c.cr_running is False
        t = asyncio.get_running_loop().create_task(c)
        r = await t
        with pytest.raises(RuntimeError, match="cannot reuse"):
            c.send(None)
        return r, repr(t)

    r, task_repr = run(main())
    assert r == "ok" and "run_anywhere(" in task_repr


def test_run_anywhere_argument_checks() -> None:
    with pytest.raises(TypeError):
        run_anywhere(42)  # type: ignore[arg-type]
    c = run_anywhere(lambda: None)
    with pytest.raises(TypeError, match="non-None"):
        c.send(1)
    c.close()


def test_run_anywhere_never_awaited_warns() -> None:
    with pytest.warns(RuntimeWarning, match="was never awaited"):
        run_anywhere(lambda: None)
        gc.collect()


def test_suspended_fiber_dropped_is_unwound(run: Run) -> None:
    log: list[str] = []

    def sync() -> None:
        try:
            await_(asyncio.sleep(10))
        except GeneratorExit:
            log.append("GeneratorExit")
            raise
        finally:
            log.append("finally")

    async def main() -> None:
        c = run_anywhere(sync)
        fut = c.send(None)  # runs until the sync code waits
        assert isinstance(fut, asyncio.Future)
        assert c.cr_frame is not None and c.cr_frame.f_code.co_name == "sync"
        del c
        gc.collect()
        fut.cancel()

    run(main())
    assert log == ["GeneratorExit", "finally"]


def test_close_closes_the_awaited_coroutine_first(run: Run) -> None:
    log: list[str] = []

    async def inner() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            log.append("inner finally")

    def sync() -> None:
        try:
            await_(inner())
        finally:
            log.append("sync finally")

    async def main() -> None:
        c = run_anywhere(sync)
        fut = c.send(None)
        c.close()
        fut.cancel()
        assert c.cr_suspended is False

    run(main())
    assert log == ["inner finally", "sync finally"]


def test_close_send_throw_from_inside_the_running_fiber_are_refused(run: Run) -> None:
    """As a generator's own code calling its close(): ValueError, and the
    fiber runs on. close() used to "leak" the running fiber, resetting its
    coroutine and freeing it under the code running on it (heap corruption,
    SIGABRT or SIGSEGV a few runs later)."""
    holder: dict[str, Any] = {}
    errors: list[str] = []

    def sync(n: int) -> int:
        me = holder["c"]
        for call in (me.close, lambda: me.send(None), lambda: me.throw(KeyError)):
            try:
                call()
            except ValueError as e:
                errors.append(str(e))
        assert me.cr_running is True
        return await_(value_later(n))

    async def main() -> list[int]:
        out = []
        for i in range(30):
            holder["c"] = c = run_anywhere(sync, i)
            out.append(await c)
            del c, holder["c"]
            gc.collect()
        return out

    assert run(main()) == list(range(30))
    assert len(errors) == 90 and all("already executing" in e for e in errors), errors[:3]


def test_pending_task_in_sync_code_is_unwound_when_the_run_ends(loop_factory: Any) -> None:
    """asyncio.run-style shutdown cancels pending tasks: a task suspended in
    sync code sees CancelledError and its finally blocks run. (A pending
    task that is only garbage is not collectable while suspended in sync
    code: the suspended frames' references count as external, see
    test_fiber_core.test_frames_of_a_suspended_fiber_are_not_traversed_like_greenlet.)"""
    log: list[str] = []

    def sync() -> None:
        try:
            await_(asyncio.get_running_loop().create_future())
        except asyncio.CancelledError:
            log.append("cancelled")
            raise
        finally:
            log.append("finally")

    async def main() -> None:
        asyncio.ensure_future(run_anywhere(sync))
        await asyncio.sleep(0.001)

    loop = loop_factory()
    try:
        loop.run_until_complete(main())
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        loop.close()
    assert log == ["cancelled", "finally"]


def test_resume_from_another_thread_is_refused(run: Run) -> None:
    async def main() -> str:
        def sync() -> str:
            return str(await_(asyncio.sleep(0, result="done")))

        c = run_anywhere(sync)
        c.send(None)
        errors: list[str] = []

        def other() -> None:
            try:
                c.send(None)
            except RuntimeError as e:
                errors.append(str(e))

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert errors and "thread" in errors[0], errors
        try:
            c.send(None)
        except StopIteration as e:
            return str(e.value)
        raise AssertionError("not finished")

    assert run(main()) == "done"


def test_await_done_future_does_not_switch(run: Run) -> None:
    """A done future completes inside await_ without suspending the fiber:
    the enclosing task takes no extra loop iteration."""

    def sync(fut: asyncio.Future[int]) -> int:
        return sum(await_(fut) for _ in range(1000))

    async def main() -> int:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(1)
        c = run_anywhere(sync, fut)
        try:
            c.send(None)
        except StopIteration as e:
            return int(e.value)
        raise AssertionError("suspended on a done future")

    assert run(main()) == 1000


def test_anywhere_coroutine_requires_no_loop_to_construct() -> None:
    async def coro() -> int:
        return 1

    c = coro()
    w = AnywhereCoroutine(c)
    assert w.__wrapped__ is c
    with pytest.raises(StopIteration):
        w.send(None)


def test_no_reports_for_normal_runs(run: Run, unraisables: Unraisables) -> None:
    async def main() -> None:
        await asyncio.gather(*(run_anywhere(await_, value_later(i)) for i in range(10)))

    run(main())
    gc.collect()
    assert unraisables.items == []
