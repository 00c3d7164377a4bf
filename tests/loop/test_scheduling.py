"""call_soon / call_later / call_at / handles: asyncio's semantics."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import math
import time
import weakref
from unittest import mock

import pytest

import tokioloop


def run_briefly(loop: tokioloop.Loop) -> None:
    loop.call_soon(loop.stop)
    loop.run_forever()


def test_is_an_abstract_event_loop(loop: tokioloop.Loop) -> None:
    assert isinstance(loop, asyncio.AbstractEventLoop)
    assert isinstance(loop, tokioloop.Loop)
    assert "running=False" in repr(loop) and "closed=False" in repr(loop)


def test_time_is_monotonic_clock(loop: tokioloop.Loop) -> None:
    a = time.monotonic()
    t = loop.time()
    b = time.monotonic()
    assert a <= t <= b


def test_replaced_time_sets_deadlines(loop: tokioloop.Loop) -> None:
    """As asyncio's, the loop reads deadlines off self.time(): a test that
    replaces loop.time (aiohttp's do) fast-forwards timers; put back, the
    native clock rules again."""
    fired: list[str] = []

    async def main() -> None:
        now = loop.time()
        with mock.patch.object(loop, "time") as t:
            t.return_value = now
            loop.call_at(now + 75, fired.append, "at")
            loop.call_later(75, fired.append, "later")  # 75 s after the fake now
            t.return_value = now + 74
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert fired == []
            t.return_value = now + 75
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert fired == ["at", "later"]
        assert "time" not in vars(loop)
        start = time.monotonic()
        await asyncio.sleep(0.05)  # the native clock again
        assert 0.04 <= time.monotonic() - start < 5

    loop.run_until_complete(main())


def test_subclass_time_sets_deadlines() -> None:
    """A loop subclass with a virtual clock (as asyncio's own test loop)."""

    class VirtualClockLoop(tokioloop.Loop):
        virtual = 1000.0

        def time(self) -> float:
            return self.virtual

    loop = VirtualClockLoop()
    try:
        fired: list[float] = []

        async def main() -> None:
            loop.call_later(3600, lambda: fired.append(loop.time()))
            sleeper = asyncio.ensure_future(asyncio.sleep(7200))
            for _ in range(3):
                await asyncio.sleep(0)
            assert fired == [] and not sleeper.done()
            loop.virtual += 7200
            await sleeper  # due at once: an hour of virtual time has passed
            assert fired == [8200.0]

        start = time.monotonic()
        loop.run_until_complete(main())
        assert time.monotonic() - start < 5
    finally:
        loop.close()


def test_call_soon_order_and_args(loop: tokioloop.Loop) -> None:
    seen: list[object] = []
    for i in range(100):
        loop.call_soon(seen.append, i)
    loop.call_soon(lambda *a: seen.append(a), 1, "x", None)
    run_briefly(loop)
    assert seen == list(range(100)) + [(1, "x", None)]


def test_callbacks_scheduled_during_iteration_run_next_iteration(loop: tokioloop.Loop) -> None:
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon(order.append, "third")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    loop.call_soon(loop.stop)
    loop.run_forever()
    # stop() ends the run after the current iteration: "third" is still pending
    assert order == ["first", "second"]
    run_briefly(loop)
    assert order == ["first", "second", "third"]


def test_stop_before_run_forever_runs_one_iteration(loop: tokioloop.Loop) -> None:
    seen: list[int] = []
    loop.call_soon(seen.append, 1)
    loop.stop()
    loop.run_forever()
    assert seen == [1]
    assert not loop.is_running()


def test_timers_ordered_by_time_then_insertion(loop: tokioloop.Loop) -> None:
    seen: list[int] = []
    when = loop.time() + 0.02
    for i in range(5):
        loop.call_at(when, seen.append, i)
    loop.call_at(when - 0.01, seen.append, -1)
    loop.call_later(0.05, loop.stop)
    loop.run_forever()
    assert seen == [-1, 0, 1, 2, 3, 4]


def test_call_later_waits(loop: tokioloop.Loop) -> None:
    t0 = loop.time()
    fired: list[float] = []
    loop.call_later(0.05, lambda: (fired.append(loop.time()), loop.stop()))
    loop.run_forever()
    assert fired and 0.049 <= fired[0] - t0 < 0.5


def test_negative_and_zero_delays_fire_soon(loop: tokioloop.Loop) -> None:
    seen: list[str] = []
    loop.call_later(-10, seen.append, "neg")
    loop.call_later(0, seen.append, "zero")
    loop.call_at(0, seen.append, "past")
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    assert sorted(seen) == ["neg", "past", "zero"]


def test_infinite_delay_never_fires(loop: tokioloop.Loop) -> None:
    h = loop.call_later(math.inf, pytest.fail)
    assert h.when() == math.inf
    loop.call_later(0.01, loop.stop)
    loop.run_forever()
    h.cancel()


@pytest.mark.parametrize("bad", [math.nan, float("nan")])
def test_nan_delay_is_rejected(loop: tokioloop.Loop, bad: float) -> None:
    with pytest.raises(ValueError):
        loop.call_later(bad, lambda: None)
    with pytest.raises(ValueError):
        loop.call_at(bad, lambda: None)


def test_bad_delay_types(loop: tokioloop.Loop) -> None:
    with pytest.raises(TypeError, match="delay must not be None"):
        loop.call_later(None, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="when cannot be None"):
        loop.call_at(None, lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        loop.call_later("1", lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        loop.call_at(object(), lambda: None)  # type: ignore[arg-type]


def test_bad_callbacks(loop: tokioloop.Loop) -> None:
    # As asyncio and uvloop: checked in debug mode only. Otherwise a
    # non-callable is accepted and fails when it runs, through the exception
    # handler (Sanic's tests hand call_later() a Task and rely on that).
    async def coro() -> None:
        pass

    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    loop.call_soon(42)  # type: ignore[arg-type]
    loop.call_later(0.001, "nope")  # type: ignore[arg-type]
    loop.run_until_complete(asyncio.sleep(0.01))
    assert [str(e["message"]).split()[:3] for e in errors] == [["Exception", "in", "callback"]] * 2
    assert all(isinstance(e["exception"], TypeError) for e in errors)
    loop.set_exception_handler(None)

    loop.set_debug(True)
    c = coro()
    with pytest.raises(TypeError, match="coroutines cannot be used with call_soon"):
        loop.call_soon(c)  # type: ignore[arg-type]
    c.close()
    for meth in (loop.call_soon, loop.call_soon_threadsafe):
        with pytest.raises(TypeError, match="a callable object was expected"):
            meth(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a callable object was expected by call_later"):
        loop.call_later(1, "nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coroutines cannot be used with call_soon"):
        loop.call_soon(coro)  # coroutine function: rejected in debug mode
    with pytest.raises(TypeError, match="context must be a contextvars.Context"):
        loop.call_soon(print, context=123)  # type: ignore[arg-type]


def test_handle_api(loop: tokioloop.Loop) -> None:
    ctx = contextvars.copy_context()
    h = loop.call_soon(print, 1, context=ctx)
    assert not h.cancelled()
    assert h.get_context() is ctx
    assert h._callback is print and h._args == (1,)
    assert "Handle print(1)" in repr(h)
    h.cancel()
    assert h.cancelled()
    assert h._callback is None and h._args is None
    assert "cancelled" in repr(h)
    h.cancel()  # idempotent
    run_briefly(loop)

    t = loop.call_later(10, print)
    assert isinstance(t, tokioloop._tokioloop.TimerHandle)
    assert isinstance(t, tokioloop._tokioloop.Handle)
    assert abs(t.when() - (loop.time() + 10)) < 0.1
    assert "when=" in repr(t)
    t2 = loop.call_at(t.when() + 1, print)
    assert t < t2 and t2 > t and t != t2 and t == t
    assert hash(t) == hash(t.when())
    t.cancel()
    t2.cancel()


def test_call_at_keeps_the_int_it_was_given(loop: tokioloop.Loop) -> None:
    """asyncio's TimerHandle keeps the `when` object call_at() got: an int
    stays an int in when() and _when (aiohttp rounds its timeouts up to
    whole seconds and its tests check the type); it still orders among
    float deadlines."""
    fired: list[str] = []
    now = loop.time()
    at_int = math.ceil(now) + 1
    h_int = loop.call_at(at_int, fired.append, "int")
    h_float = loop.call_at(at_int - 0.5, fired.append, "float")
    h_later = loop.call_later(0.01, fired.append, "later")
    assert h_int.when() == at_int and type(h_int.when()) is int
    assert type(h_int._when) is int  # type: ignore[attr-defined]
    assert type(h_float.when()) is float and type(h_later.when()) is float
    assert h_float < h_int and hash(h_int) == hash(float(at_int))
    assert f"when={at_int}" in repr(h_int)
    h_later.cancel()
    assert type(h_int.when()) is int
    with mock.patch.object(loop, "time", return_value=at_int + 1.0):
        run_briefly(loop)
    assert fired == ["float", "int"]


def test_cancelled_handles_do_not_run(loop: tokioloop.Loop) -> None:
    seen: list[int] = []
    hs = [loop.call_soon(seen.append, i) for i in range(10)]
    ts = [loop.call_later(0.001, seen.append, 100 + i) for i in range(10)]
    for h in hs[::2] + ts[::2]:
        h.cancel()
    loop.call_later(0.02, loop.stop)
    loop.run_forever()
    assert seen == [1, 3, 5, 7, 9, 101, 103, 105, 107, 109]


def test_cancel_releases_callback(loop: tokioloop.Loop) -> None:
    class Obj:
        def meth(self) -> None:
            pass

    o = Obj()
    ref = weakref.ref(o)
    h = loop.call_later(3600, o.meth)
    del o
    gc.collect()
    assert ref() is not None
    h.cancel()
    gc.collect()
    assert ref() is None


def test_cancelled_timers_are_compacted(loop: tokioloop.Loop) -> None:
    hs = [loop.call_later(1000 + i, lambda: None) for i in range(300)]
    assert loop._timer_count() == 300
    for h in hs[:200]:
        h.cancel()
    run_briefly(loop)
    # more than half cancelled (and > 100 timers): the heap is compacted
    assert loop._timer_count() == 100
    for h in hs[200:]:
        h.cancel()


def test_cancelled_timers_at_head_are_dropped(loop: tokioloop.Loop) -> None:
    hs = [loop.call_later(1000 + i, lambda: None) for i in range(10)]
    for h in hs[:3]:
        h.cancel()
    run_briefly(loop)
    assert loop._timer_count() == 7
    for h in hs:
        h.cancel()


def test_context_is_honoured(loop: tokioloop.Loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="default")
    seen: list[str] = []

    def read() -> None:
        seen.append(var.get())

    def write() -> None:
        var.set("changed")

    var.set("outer")
    loop.call_soon(read)  # copy of the current context
    loop.call_soon(write)  # writes into its own copy
    loop.call_soon(read)
    ctx = contextvars.Context()
    loop.call_soon(read, context=ctx)
    ctx2 = contextvars.copy_context()
    loop.call_soon(write, context=ctx2)
    loop.call_soon(read, context=ctx2)
    run_briefly(loop)
    assert seen == ["outer", "outer", "default", "changed"]
    assert var.get() == "outer"


def test_context_already_entered_is_reported(loop: tokioloop.Loop) -> None:
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    ctx = contextvars.copy_context()

    def nested() -> None:
        loop.call_soon(lambda: None, context=ctx)
        loop.call_soon(loop.stop)

    ctx.run(lambda: None)
    loop.call_soon(lambda: ctx.run(lambda: None), context=ctx)
    loop.call_soon(nested)
    loop.run_forever()
    assert errors and isinstance(errors[0]["exception"], RuntimeError)


def test_closed_loop_rejects_everything(loop: tokioloop.Loop) -> None:
    loop.close()
    assert loop.is_closed()
    loop.close()  # idempotent
    for call in (
        lambda: loop.call_soon(print),
        lambda: loop.call_later(1, print),
        lambda: loop.call_at(1, print),
        lambda: loop.call_soon_threadsafe(print),
        lambda: loop.run_forever(),
        lambda: loop.add_reader(0, print),
    ):
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            call()
    for use in (loop.run_until_complete, loop.create_task):
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            use(coro)
        coro.close()


def test_close_running_loop_is_refused(loop: tokioloop.Loop) -> None:
    errors: list[BaseException] = []

    def closer() -> None:
        try:
            loop.close()
        except RuntimeError as e:
            errors.append(e)
        loop.stop()

    loop.call_soon(closer)
    loop.run_forever()
    assert errors and "running" in str(errors[0])
    assert not loop.is_closed()


def test_is_running(loop: tokioloop.Loop) -> None:
    seen: list[bool] = []
    loop.call_soon(lambda: seen.append(loop.is_running()))
    run_briefly(loop)
    assert seen == [True]
    assert not loop.is_running()


def test_run_forever_twice_refused(loop: tokioloop.Loop) -> None:
    errors: list[BaseException] = []

    def nested() -> None:
        try:
            loop.run_forever()
        except RuntimeError as e:
            errors.append(e)

    loop.call_soon(nested)
    run_briefly(loop)
    assert errors and "already running" in str(errors[0])


@pytest.mark.parametrize("call", ["run_forever", "run_until_complete"])
def test_refused_nested_run_leaves_the_running_loop_intact(loop: tokioloop.Loop, call: str) -> None:
    """The refused nested run must not tear down the running one's state:
    it used to clear the thread's running loop (asyncio.sleep() and
    create_task() then failed with "no running event loop")."""

    async def main() -> str:
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already running"):
            if call == "run_forever":
                loop.run_forever()
            else:
                loop.run_until_complete(coro)
        coro.close()
        assert asyncio.get_running_loop() is loop and loop.is_running()
        await asyncio.sleep(0.001)
        return await asyncio.create_task(asyncio.sleep(0, "ok"))

    assert loop.run_until_complete(main()) == "ok"


def test_other_running_loop_refused(loop: tokioloop.Loop) -> None:
    other = tokioloop.new_event_loop()
    errors: list[BaseException] = []

    def nested() -> None:
        try:
            other.run_forever()
        except RuntimeError as e:
            errors.append(e)

    loop.call_soon(nested)
    run_briefly(loop)
    other.close()
    assert errors and "another loop is running" in str(errors[0])


def test_unclosed_loop_warns() -> None:
    lp = tokioloop.new_event_loop()
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        del lp
        gc.collect()


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
def test_loop_with_pending_callbacks_is_collected() -> None:
    lp = tokioloop.new_event_loop()
    ref = weakref.ref(lp)

    async def never() -> None:
        await asyncio.sleep(3600)

    task = lp.create_task(never())
    lp.call_later(3600, print)
    lp.call_soon(lp.stop)
    del task
    with pytest.warns(ResourceWarning):
        del lp
        gc.collect()
    gc.collect()
    assert ref() is None


def test_many_loops_do_not_leak_fds(no_fd_leak: None) -> None:
    for _ in range(200):
        lp = tokioloop.new_event_loop()
        lp.run_until_complete(asyncio.sleep(0))
        lp.close()


def test_scheduling_on_a_closed_loop_keeps_no_reference_to_the_arguments() -> None:
    """call_soon() & co. on a closed loop raise RuntimeError and let go of
    the callback's arguments (each call kept one reference)."""

    class Arg:
        pass

    loop = tokioloop.new_event_loop()
    loop.close()
    arg = Arg()
    ref = weakref.ref(arg)
    calls: list[tuple[str, tuple[object, ...]]] = [
        ("call_soon", (print, arg)),
        ("call_soon", (print, arg, arg)),
        ("call_soon_threadsafe", (print, arg)),
        ("call_later", (1, print, arg)),
        ("call_at", (1, print, arg, 2)),
    ]
    for method, args in calls:
        with pytest.raises(RuntimeError, match="Event loop is closed"):
            getattr(loop, method)(*args)
    del arg, calls, args
    gc.collect()
    assert ref() is None
