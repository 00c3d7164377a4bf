"""await-anywhere wired into tokioloop's loop: anywhere tasks, executor
threads, the per-thread private loop."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import threading
import weakref

import pytest

import tokioloop


def sync_fetch(x: int) -> int:
    # plain def code, called from a task, awaiting
    return tokioloop.await_(asyncio.sleep(0.001, x * 2))


def test_anywhere_tasks_option() -> None:
    async def main() -> list[int]:
        return [sync_fetch(i) for i in range(5)]

    assert tokioloop.run(main(), anywhere_tasks=True) == [0, 2, 4, 6, 8]


def test_without_the_option_await_names_run_anywhere() -> None:
    async def main() -> int:
        return sync_fetch(1)

    with pytest.raises(RuntimeError, match="run_anywhere"):
        tokioloop.run(main())


def test_anywhere_tasks_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKIOLOOP_ANYWHERE_TASKS", "1")
    loop = tokioloop.new_event_loop()
    try:
        assert loop._anywhere_tasks is True

        async def main() -> int:
            return sync_fetch(21)

        assert loop.run_until_complete(main()) == 42
    finally:
        loop.close()
    monkeypatch.setenv("TOKIOLOOP_ANYWHERE_TASKS", "0")
    loop = tokioloop.new_event_loop()
    assert loop._anywhere_tasks is False
    loop.close()


def test_anywhere_task_semantics_on_tokioloop() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def sync_part() -> tuple[bool, str]:
        var.set("set in sync code")
        task = asyncio.current_task()
        tokioloop.await_(asyncio.sleep(0))
        return task is not None, var.get()

    async def main() -> tuple[bool, str, str, str]:
        is_task, seen = sync_part()
        t = asyncio.current_task()
        assert t is not None
        coro_name = type(t.get_coro()).__name__
        return is_task, seen, var.get(), coro_name

    is_task, seen, after, coro_name = tokioloop.run(main(), anywhere_tasks=True)
    assert is_task and seen == "set in sync code" and after == "set in sync code"
    assert coro_name == "AnywhereCoroutine"


def test_anywhere_task_cancellation() -> None:
    cleaned: list[bool] = []

    def blocking_sync() -> None:
        try:
            tokioloop.await_(asyncio.sleep(3600))
        finally:
            cleaned.append(True)

    async def run_it() -> None:
        blocking_sync()

    async def main() -> None:
        t = asyncio.get_running_loop().create_task(run_it())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    tokioloop.run(main(), anywhere_tasks=True)
    assert cleaned == [True]


def test_close_unwinds_fibers_of_abandoned_pending_tasks() -> None:
    """A loop closed with tasks still pending (no asyncio.run() to cancel
    them): a task whose sync code waits in await_() is kept alive by
    references on its fiber's stack that the GC cannot see. close() unwinds
    those fibers (GeneratorExit, finally blocks), so the tasks and what they
    hold are freed as plain abandoned tasks are."""

    class Held:
        pass

    log: list[str] = []

    def sync_wait(fut: asyncio.Future[None], held: Held, tag: str) -> None:
        try:
            tokioloop.await_(fut)
        except GeneratorExit:
            log.append(f"{tag}: GeneratorExit")
            raise
        finally:
            log.append(f"{tag}: finally")

    async def awaits_run_anywhere(fut: asyncio.Future[None], held: Held) -> None:
        await tokioloop.run_anywhere(sync_wait, fut, held, "run_anywhere")

    async def anywhere_step(fut: asyncio.Future[None], held: Held) -> None:
        sync_wait(fut, held, "anywhere task")

    async def nested(fut: asyncio.Future[None], held: Held) -> None:
        # await_ of a run_anywhere() inside a run_anywhere()
        await tokioloop.run_anywhere(
            lambda: tokioloop.await_(tokioloop.run_anywhere(sync_wait, fut, held, "nested"))
        )

    refs: list[weakref.ref[Held]] = []
    leaked_before = tokioloop._tokioloop.fiber_info()["leaked_fibers"]
    for _ in range(3):
        loop = tokioloop.new_event_loop()
        loop.set_exception_handler(lambda _l, ctx: log.append(ctx["message"]))

        async def main(loop: asyncio.AbstractEventLoop = loop) -> None:
            for make in (awaits_run_anywhere, nested):
                held = Held()
                refs.append(weakref.ref(held))
                loop.create_task(make(loop.create_future(), held))
            held = Held()
            refs.append(weakref.ref(held))
            tokioloop.anywhere_task(loop, anywhere_step(loop.create_future(), held))
            await asyncio.sleep(0.01)

        loop.run_until_complete(main())
        loop.close()
        del loop, main
        gc.collect()
    expected = [
        f"{tag}: {what}"
        for tag in ("run_anywhere", "nested", "anywhere task")
        for what in ("GeneratorExit", "finally")
    ]
    assert sorted(set(log)) == sorted([*expected, "Task was destroyed but it is pending!"])
    assert [r() for r in refs] == [None] * 9
    assert tokioloop._tokioloop.fiber_info()["leaked_fibers"] == leaked_before


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks are 3.12+")
def test_await_in_the_eager_first_step_of_a_task_created_on_a_fiber_raises() -> None:
    """The eager first step belongs to the new task: an await_ there must not
    suspend the creating fiber (asyncio's current task would stay the new
    one: "Leaving task ... does not match the current task" and a wedged
    loop). It raises as on the loop's stack; the creator goes on."""

    async def child() -> str:
        tokioloop.await_(asyncio.sleep(0))
        return "unreachable"

    async def fine() -> str:
        await asyncio.sleep(0)
        return "fine"

    def on_fiber() -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        t = loop.create_task(child())
        assert t.done()  # the eager step ran, and raised
        with pytest.raises(RuntimeError, match="run_anywhere"):
            t.result()
        ok = loop.create_task(fine())
        assert asyncio.current_task() is creator
        return tokioloop.await_(ok), tokioloop.await_(asyncio.sleep(0, "after"))

    async def main() -> tuple[str, str]:
        nonlocal creator
        asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
        creator = asyncio.current_task()
        return await asyncio.wait_for(tokioloop.run_anywhere(on_fiber), 5)

    creator: asyncio.Task[object] | None = None
    assert tokioloop.run(main()) == ("fine", "after")


def test_worker_thread_submits_to_owning_loop() -> None:
    def in_worker() -> tuple[int, bool]:
        return (
            tokioloop.await_(asyncio.sleep(0.001, 7)),
            threading.current_thread() is not threading.main_thread(),
        )

    async def main() -> tuple[int, bool]:
        return await asyncio.to_thread(in_worker)

    assert tokioloop.run(main()) == (7, True)


def test_thread_without_loop_uses_a_persistent_tokioloop() -> None:
    loops: list[type] = []

    async def which() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def worker() -> None:
        a = tokioloop.await_(which())
        b = tokioloop.await_(which())
        assert a is b  # the same loop for the thread, between calls
        loops.append(type(a))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert loops == [tokioloop.Loop]
