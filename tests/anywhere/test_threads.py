"""await_() on threads: no running loop (a persistent private loop per
thread) and worker threads a loop started (submitted to that loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest

import tokioloop._anywhere as anywhere
from tokioloop._anywhere import await_, wrap_for_executor

from .conftest import LoopFactory, run_py


async def later(v: Any, delay: float = 0.001) -> Any:
    await asyncio.sleep(delay)
    return v


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run fn on a fresh thread; return its result or raise its error."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn).result(timeout=30)


# -- no running loop ----------------------------------------------------------


def test_no_loop_runs_on_a_private_loop() -> None:
    def work() -> Any:
        return await_(later("value")), asyncio._get_running_loop()

    value, running = in_thread(work)
    assert value == "value" and running is None


def test_private_loop_persists_between_calls() -> None:
    """Objects bound to a loop (a queue, a connection) stay usable."""

    def work() -> Any:
        async def loop_of() -> asyncio.AbstractEventLoop:
            return asyncio.get_running_loop()

        first = await_(loop_of())
        q: asyncio.Queue[int] = asyncio.Queue()
        await_(q.put(1))  # binds q to the loop
        got = await_(q.get())
        assert await_(loop_of()) is first
        return got

    assert in_thread(work) == 1


def test_private_loop_keeps_a_tcp_connection_between_calls() -> None:
    def work() -> Any:
        handled = asyncio.Event()

        async def serve() -> Any:
            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                while data := await r.readline():
                    w.write(data.upper())
                w.close()
                await w.wait_closed()
                handled.set()

            return await asyncio.start_server(handle, "127.0.0.1", 0)

        server = await_(serve())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await_(asyncio.open_connection("127.0.0.1", port))
        replies = []
        for word in (b"one\n", b"two\n"):  # one await_ call per request
            writer.write(word)
            replies.append(await_(reader.readline()))
        writer.close()
        await_(writer.wait_closed())
        await_(handled.wait())
        server.close()
        await_(server.wait_closed())
        return replies

    assert in_thread(work) == [b"ONE\n", b"TWO\n"]


def test_each_thread_has_its_own_private_loop_closed_at_thread_exit() -> None:
    async def loop_of() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    refs = [in_thread(lambda: weakref.ref(await_(loop_of()))) for _ in range(2)]
    gc.collect()
    for r in refs:
        loop = r()
        assert loop is None or loop.is_closed()


def test_no_loop_exceptions_propagate() -> None:
    async def fail() -> None:
        raise KeyError("private")

    def work() -> None:
        await_(fail())

    with pytest.raises(KeyError, match="private"):
        in_thread(work)


def test_private_loop_uses_new_private_loop_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[asyncio.AbstractEventLoop] = []

    def factory() -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        made.append(loop)
        return loop

    monkeypatch.setattr(anywhere, "_new_private_loop", factory)

    async def loop_of() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    assert in_thread(lambda: await_(loop_of())) is made[0]


def test_private_loop_of_main_thread_is_closed_at_exit() -> None:
    rc, out, err = run_py(
        """
        import asyncio, warnings
        warnings.simplefilter("error")
        import tokioloop._anywhere as A
        async def f():
            return asyncio.get_running_loop()
        loop = A.await_(f())
        print(A.await_(asyncio.sleep(0, result="ok")), loop.is_closed())
        """
    )
    assert rc == 0 and out.strip() == "ok False" and "Error" not in err, (out, err)


# -- worker threads -----------------------------------------------------------


def test_worker_thread_submits_to_owning_loop(loop_factory: LoopFactory) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def on_loop(v: str) -> Any:
        await asyncio.sleep(0.001)
        return v, threading.get_ident(), var.get()

    def blocking(v: str) -> Any:
        var.set("worker")
        return await_(on_loop(v))

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        r = await loop.run_in_executor(None, wrap_for_executor(loop, blocking), "x")
        return r, threading.get_ident()

    loop = loop_factory()
    try:
        (v, ran_on, ctx_value), loop_thread = loop.run_until_complete(main())
    finally:
        loop.close()
    assert v == "x" and ran_on == loop_thread and ctx_value == "worker"


def test_worker_thread_exception_propagates(loop_factory: LoopFactory) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("on loop")

    def blocking() -> None:
        await_(fail())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, wrap_for_executor(loop, blocking))

    loop = loop_factory()
    try:
        with pytest.raises(KeyError, match="on loop"):
            loop.run_until_complete(main())
    finally:
        loop.close()


class WrappingLoop(asyncio.SelectorEventLoop):
    """What tokioloop's Loop.run_in_executor does: wrap every submitted func."""

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> Any:
        return super().run_in_executor(executor, wrap_for_executor(self, func), *args)


def test_to_thread_and_asgiref_sync_to_async_reach_owning_loop() -> None:
    from asgiref.sync import sync_to_async

    async def on_loop() -> int:
        await asyncio.sleep(0)
        return threading.get_ident()

    def blocking() -> Any:
        return await_(on_loop()), threading.get_ident()

    async def main() -> Any:
        me = threading.get_ident()
        a = await asyncio.to_thread(blocking)
        b = await sync_to_async(blocking, thread_sensitive=False)()
        return me, a, b

    loop = WrappingLoop()
    try:
        me, (a_loop, a_worker), (b_loop, b_worker) = loop.run_until_complete(main())
    finally:
        loop.close()
    assert a_loop == me and b_loop == me
    assert a_worker != me and b_worker != me


def test_inline_executor_on_loop_thread_raises_instead_of_deadlocking() -> None:
    class InlineExecutor(concurrent.futures.Executor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            f: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                f.set_result(fn(*args, **kwargs))
            except BaseException as e:
                f.set_exception(e)
            return f

    def blocking() -> Any:
        return await_(later(1))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(InlineExecutor(), wrap_for_executor(loop, blocking))

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="run_anywhere"):
            loop.run_until_complete(main())
    finally:
        loop.close()


def test_worker_with_closed_owner_loop_raises() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    coro = later(1)
    fn = wrap_for_executor(loop, lambda: await_(coro))
    with pytest.raises(RuntimeError, match="closed"):
        in_thread(fn)


def test_owner_loop_closing_while_worker_waits_raises() -> None:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def blocking() -> None:
        started.set()
        await_(asyncio.sleep(10))

    result: list[BaseException] = []

    def worker() -> None:
        try:
            wrap_for_executor(loop, blocking)()
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=worker)
    t.start()
    started.wait(5)
    # the loop never runs; closing it releases the worker
    loop.close()
    t.join(10)
    assert not t.is_alive()
    assert result and isinstance(result[0], RuntimeError) and "closed" in str(result[0])


@pytest.mark.skipif(sys.platform != "linux", reason="thread ids")
def test_wrapped_function_restores_previous_owner() -> None:
    loop1 = asyncio.new_event_loop()
    loop2 = asyncio.new_event_loop()
    try:
        seen: list[Any] = []

        def inner() -> None:
            seen.append(anywhere._thread_state.owner)

        def outer() -> None:
            seen.append(anywhere._thread_state.owner)
            wrap_for_executor(loop2, inner)()
            seen.append(anywhere._thread_state.owner)

        in_thread(wrap_for_executor(loop1, outer))
        assert seen == [loop1, loop2, loop1]
    finally:
        loop1.close()
        loop2.close()


THREAD_SENSITIVE = """
import asyncio, sys, threading, tokioloop
from asgiref.sync import ThreadSensitiveContext, sync_to_async

def db_work():
    return threading.current_thread().name

async def uses_the_orm():
    await asyncio.sleep(0.001)
    return await sync_to_async(db_work)()  # thread_sensitive=True, as Django's ORM

def sync_view():
    me = threading.current_thread().name
    return me, tokioloop.await_(uses_the_orm())

async def main():
    async with ThreadSensitiveContext():  # Django's ASGIHandler, per request
        view, orm = await asyncio.wait_for(sync_to_async(sync_view)(), 10)
    assert view == orm, (view, orm)  # served on the view's own thread
    print("ok")

if sys.argv[1] == "tokioloop":
    tokioloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.parametrize("loop_kind", ["tokioloop", "asyncio"])
def test_await_in_a_thread_sensitive_sync_view_serves_the_orm(loop_kind: str) -> None:
    # A Django sync view runs on the worker of the request's asgiref
    # ThreadSensitiveContext; an awaitable that calls thread-sensitive
    # sync_to_async (the async ORM) needs that very thread. await_ there goes
    # through async_to_sync, which serves those calls while it waits; it
    # hung before.
    p = subprocess.run(
        [sys.executable, "-c", THREAD_SENSITIVE, loop_kind],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["ok"]
