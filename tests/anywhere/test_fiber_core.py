"""The fiber layer itself (tokioloop._tokioloop.Fiber): switching, state
that must follow a fiber, unwinding, thread binding, GC."""

from __future__ import annotations

import contextvars
import ctypes
import ctypes.util
import gc
import sys
import threading
import traceback
import weakref
from typing import Any

import pytest

from tokioloop import _tokioloop as T

from .conftest import Unraisables, run_py

Fiber = T.Fiber
suspend = T.fiber_suspend


def test_values_in_and_out() -> None:
    def body(x: int) -> int:
        y = suspend(x + 1)
        z = suspend(y * 2)
        return z + 100

    fb = Fiber(body, 1)
    assert fb.status == "new"
    assert fb.switch() == 2
    assert fb.status == "suspended"
    assert fb.switch(10) == 20
    assert fb.switch(5) == 105
    assert fb.status == "done"
    with pytest.raises(RuntimeError, match="finished"):
        fb.switch()


def test_kwargs_are_passed() -> None:
    assert Fiber(lambda a, *, b: (a, b), 1, b=2).switch() == (1, 2)


def test_exception_traceback_lists_resumer_then_fiber_frames() -> None:
    def inner() -> None:
        raise ValueError("boom")

    def body() -> None:
        suspend()
        inner()

    fb = Fiber(body)
    fb.switch()

    def resumer() -> None:
        fb.switch()

    with pytest.raises(ValueError) as ei:
        resumer()
    names = [f.name for f in traceback.extract_tb(ei.value.__traceback__)]
    assert names.index("resumer") < names.index("body") < names.index("inner")
    assert fb.status == "done"


def test_throw_into_suspended_fiber_is_caught_inside() -> None:
    def body() -> Any:
        try:
            suspend("waiting")
        except KeyError as e:
            return ("caught", e.args)

    fb = Fiber(body)
    assert fb.switch() == "waiting"
    assert fb.throw(KeyError("k")) == ("caught", ("k",))
    assert fb.status == "done"


def test_throw_into_unstarted_fiber_raises_at_caller_without_running() -> None:
    ran: list[int] = []
    fb = Fiber(lambda: ran.append(1))
    with pytest.raises(KeyError):
        fb.throw(KeyError)
    assert ran == [] and fb.status == "done"


@pytest.mark.parametrize(
    "where",
    ["map", "filter", "sorted", "generator", "listcomp", "dunders", "ctypes"],
)
def test_suspend_under_c_frames(where: str) -> None:
    """The whole C stack between the fiber's root and the suspension point
    survives: builtins, generators, slots called from C, foreign code."""

    def work() -> Any:
        if where == "map":
            return list(map(lambda v: suspend(v) * 10, range(3)))
        if where == "filter":
            return list(filter(lambda v: suspend(v) % 2, range(4)))
        if where == "sorted":
            return sorted(["b", "c", "a"], key=lambda s: suspend(s))
        if where == "generator":

            def gen() -> Any:
                for i in range(3):
                    yield suspend(i)

            return list(gen())
        if where == "listcomp":
            return [suspend(i) for i in range(3)]
        if where == "dunders":

            class K:
                def __init__(self) -> None:
                    self.v = suspend("init")

                def __hash__(self) -> int:
                    return suspend("hash")  # type: ignore[no-any-return]

                def __eq__(self, other: object) -> bool:
                    return suspend("eq")  # type: ignore[no-any-return]

                def __getattr__(self, name: str) -> Any:
                    return suspend(("getattr", name))

            k = K()
            d = {k: 1}
            return (k.v, k.missing, d[k])
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        cmp_t = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)
        )
        arr = (ctypes.c_int * 5)(5, 3, 1, 4, 2)
        cb = cmp_t(lambda a, b: suspend(("cmp", a[0], b[0])))
        libc.qsort(arr, 5, ctypes.sizeof(ctypes.c_int), cb)  # the GIL is released around qsort
        return list(arr)

    def answer(req: Any) -> Any:
        if isinstance(req, tuple) and req[0] == "cmp":
            return (req[1] > req[2]) - (req[1] < req[2])
        if isinstance(req, tuple) and req[0] == "getattr":
            return "m"
        return {"init": "v", "hash": 7, "eq": True, "a": 1, "b": 2, "c": 3}.get(req, req)

    fb = Fiber(work)
    out = fb.switch()
    while fb.status != "done":
        out = fb.switch(answer(out))
    expected = {
        "map": [0, 10, 20],
        "filter": [1, 3],
        "sorted": ["a", "b", "c"],
        "generator": [0, 1, 2],
        "listcomp": [0, 1, 2],
        "dunders": ("v", "m", 1),
        "ctypes": [1, 2, 3, 4, 5],
    }[where]
    assert out == expected


def test_nested_fibers_return_to_their_own_resumer() -> None:
    def inner() -> str:
        suspend("inner-1")
        return "inner-done"

    def outer() -> Any:
        i = Fiber(inner)
        a = i.switch()
        b = suspend(("outer", a))
        c = i.switch()  # resumed from a different stack than the first time
        return (a, b, c)

    o = Fiber(outer)
    assert o.switch() == ("outer", "inner-1")
    assert o.switch("x") == ("inner-1", "x", "inner-done")


def test_recursion_depth_is_per_fiber() -> None:
    def nest(n: int, fb: Any) -> Any:
        return nest(n - 1, fb) if n else fb.switch()

    def body() -> int:
        suspend(T._fiber_py_depth())
        return T._fiber_py_depth()

    before = T._fiber_py_depth()
    fb = Fiber(body)
    assert nest(100, fb) <= 3
    assert T._fiber_py_depth() == before
    assert fb.switch() <= 3
    assert T._fiber_py_depth() == before


def test_recursion_error_on_fiber_leaves_resumer_intact() -> None:
    def rec(n: int) -> int:
        return rec(n + 1)

    def body() -> str:
        try:
            rec(0)
        except RecursionError:
            return "recursion-error"
        return "no error"

    before = T._fiber_py_depth()
    assert Fiber(body).switch() == "recursion-error"
    assert T._fiber_py_depth() == before
    assert Fiber(lambda: T._fiber_py_depth()).switch() <= 3


def test_setrecursionlimit_while_suspended_keeps_depth() -> None:
    old = sys.getrecursionlimit()

    def body() -> int:
        d = T._fiber_py_depth()
        suspend()
        return T._fiber_py_depth() - d

    fb = Fiber(body)
    fb.switch()
    sys.setrecursionlimit(old + 500)
    try:
        assert fb.switch() == 0
    finally:
        sys.setrecursionlimit(old)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="C recursion budget exists on 3.12+")
def test_c_recursion_budget_is_per_fiber_and_scaled() -> None:
    info = T.fiber_info()
    assert 0 < info["c_budget"] <= info["c_default"]
    # the budget fits the stack with the measured worst bytes per unit
    assert info["c_budget"] * info["bytes_per_level"] <= info["stack_size"]
    main_left = T._fiber_c_remaining()
    in_fiber = Fiber(T._fiber_c_remaining).switch()
    assert info["c_budget"] - 5 <= in_fiber <= info["c_budget"]
    assert T._fiber_c_remaining() == main_left


def test_gc_of_suspended_fiber_unwinds_it() -> None:
    log: list[str] = []

    class Local:
        pass

    refs: list[weakref.ref[Local]] = []

    def body() -> None:
        loc = Local()
        refs.append(weakref.ref(loc))
        try:
            suspend()
        except GeneratorExit:
            log.append("exit")
            raise
        finally:
            log.append("finally")

    fb = Fiber(body)
    fb.switch()
    del fb
    gc.collect()
    assert log == ["exit", "finally"]
    assert refs[0]() is None


def test_kill_runs_finally_and_with_exit() -> None:
    log: list[Any] = []

    class CM:
        def __enter__(self) -> None:
            pass

        def __exit__(self, typ: Any, *a: Any) -> None:
            log.append(typ.__name__)

    def body() -> None:
        with CM():
            suspend()

    fb = Fiber(body)
    fb.switch()
    fb.kill()
    assert log == ["GeneratorExit"] and fb.status == "done"


def test_fiber_refusing_to_die_is_leaked_and_reported(unraisables: Unraisables) -> None:
    def body() -> None:
        while True:
            try:
                suspend()
            except GeneratorExit:
                pass

    fb = Fiber(body)
    fb.switch()
    leaked_before = T.fiber_info()["leaked_slots"]
    del fb
    gc.collect()
    msgs = unraisables.messages()
    assert len(msgs) == 1 and "kept suspending after GeneratorExit" in msgs[0]
    assert T.fiber_info()["leaked_slots"] == leaked_before + 1


def test_exception_raised_while_unwinding_is_reported(unraisables: Unraisables) -> None:
    def body() -> None:
        try:
            suspend()
        finally:
            raise KeyError("in finally")

    fb = Fiber(body)
    fb.switch()
    del fb
    assert any("in finally" in m for m in unraisables.messages())


def test_cycle_through_an_unstarted_fiber_is_collected() -> None:
    class Box:
        fiber: Any = None

    def make() -> weakref.ref[Box]:
        box = Box()
        box.fiber = Fiber(lambda: box)  # box -> fiber -> lambda -> box
        return weakref.ref(box)

    r = make()
    gc.collect()
    assert r() is None


def test_traverse_reports_what_a_fiber_owns() -> None:
    """tp_traverse: the body of an unstarted fiber; the Context a suspended
    fiber keeps (it suspended inside Context.run of another Context) and the
    exception it is handling. (A cycle through such a Context is still
    kept alive by the suspended frame calling ctx.run; frames are not
    traversed.)"""

    def target(*a: Any) -> None:
        pass

    fb = Fiber(target, "arg")
    refs = gc.get_referents(fb)
    assert target in refs and ("arg",) in refs

    ctx = contextvars.Context()
    exc = KeyError("handled")

    def inside() -> None:
        try:
            raise exc
        except KeyError:
            suspend()

    fb = Fiber(lambda: ctx.run(inside))
    fb.switch()
    refs = gc.get_referents(fb)
    assert ctx in refs and exc in refs
    fb.switch()
    assert [r for r in gc.get_referents(fb) if r is not type(fb)] == []


def test_cycle_through_handled_exception_is_collected_and_unwound() -> None:
    """GC traversal: a fiber suspended in an except block owns the exception
    being handled; the exception holds the fiber."""
    log: list[str] = []

    def body(box: list[Any]) -> None:
        try:
            raise KeyError(box)
        except KeyError:
            box.clear()
            try:
                suspend()
            finally:
                log.append("finally")

    def setup() -> weakref.ref[Any]:
        box: list[Any] = []
        fb = Fiber(body, box)
        box.append(fb)
        fb.switch()
        return weakref.ref(fb)

    r = setup()
    gc.collect()
    assert log == ["finally"]
    assert r() is None


def test_frames_of_a_suspended_fiber_are_not_traversed_like_greenlet() -> None:
    """Documented limitation: a cycle through a suspended fiber's frames is
    not collected (its frames' references count as external, as a thread's
    do)."""

    class Marker:
        pass

    box: list[Any] = []

    def body() -> None:
        m = Marker()
        me = box[0]  # the fiber references itself from its own frame
        suspend(weakref.ref(m))
        del me

    fb = Fiber(body)
    box.append(fb)
    r = fb.switch()
    box.clear()
    del fb
    gc.collect()
    assert r() is not None


def test_sys_exc_info_is_per_fiber() -> None:
    seen: dict[str, Any] = {}

    def body() -> None:
        seen["start"] = sys.exc_info()[1]
        try:
            raise KeyError("fiber")
        except KeyError:
            suspend("in-except")
            seen["after"] = sys.exc_info()[1]
        seen["end"] = sys.exc_info()[1]

    fb = Fiber(body)
    try:
        raise ValueError("main")
    except ValueError:
        assert fb.switch() == "in-except"
        assert isinstance(sys.exc_info()[1], ValueError)
    assert sys.exc_info()[1] is None
    fb.switch()
    assert seen["start"] is None
    assert isinstance(seen["after"], KeyError)
    assert seen["end"] is None


def test_exception_context_chains_across_a_suspension() -> None:
    def body() -> None:
        try:
            raise KeyError("first")
        except KeyError:
            suspend()
            raise ValueError("second")  # noqa: B904

    fb = Fiber(body)
    fb.switch()
    with pytest.raises(ValueError) as ei:
        fb.switch()
    assert isinstance(ei.value.__context__, KeyError)


def test_exception_leaving_a_fiber_gets_no_context_from_the_resumer() -> None:
    def body() -> None:
        raise KeyError("in fiber")

    fb = Fiber(body)
    try:
        raise ValueError("outer")
    except ValueError:
        try:
            fb.switch()
        except KeyError as e:
            ctx = e.__context__
    assert ctx is None


def test_fiber_runs_in_its_resumers_context() -> None:
    """Like a coroutine, which runs in its awaiter's Context."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def body() -> list[str]:
        seen = [var.get()]
        suspend()
        seen.append(var.get())
        return seen

    fb = Fiber(body)
    contextvars.copy_context().run(lambda: (var.set("first"), fb.switch()))
    out = contextvars.copy_context().run(lambda: (var.set("second"), fb.switch())[1])
    assert out == ["first", "second"]


def test_contextvars_one_context_shared_with_the_resumer() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    def body() -> str:
        seen = var.get()
        var.set("from-fiber")
        suspend()
        return seen + "/" + var.get()

    def scenario() -> Any:
        var.set("outer")
        fb = Fiber(body)
        fb.switch()
        after_fiber_set = var.get()
        var.set("outer-again")
        return after_fiber_set, fb.switch()

    assert contextvars.copy_context().run(scenario) == ("from-fiber", "outer/outer-again")


def test_context_entered_inside_fiber_is_restored_around_switches() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="base")
    other = contextvars.copy_context()

    def inside() -> str:
        var.set("other")
        suspend()
        return var.get()

    fb = Fiber(lambda: other.run(inside))
    fb.switch()
    assert var.get() == "base"  # the resumer is back in its own Context
    assert fb.switch() == "other"
    assert other[var] == "other"


def test_resume_from_another_thread_is_refused() -> None:
    fb = Fiber(lambda: suspend(1) or 2)
    assert fb.switch() == 1
    errors: list[str] = []

    def other() -> None:
        try:
            fb.switch()
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors and "thread" in errors[0]
    assert fb.switch() == 2


def test_fiber_dropped_on_another_thread_is_leaked_and_reported(unraisables: Unraisables) -> None:
    log: list[str] = []

    def body() -> None:
        try:
            suspend()
        finally:
            log.append("finally")

    holder = [Fiber(body)]
    holder[0].switch()
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    assert log == []  # cannot be unwound on that thread
    msgs = unraisables.messages()
    assert len(msgs) == 1 and "another thread" in msgs[0]


def test_misuse_errors() -> None:
    with pytest.raises(RuntimeError, match="outside of a plain Fiber"):
        suspend()
    holder: list[Any] = []
    fb = Fiber(lambda: holder[0].switch())
    holder.append(fb)
    with pytest.raises(RuntimeError, match="already running"):
        fb.switch()
    with pytest.raises(RuntimeError, match="finished"):
        fb.switch()


def test_frame_of_suspended_fiber_walks_its_own_frames_only() -> None:
    def leaf() -> None:
        suspend()

    def mid() -> None:
        leaf()

    fb = Fiber(mid)
    assert fb.frame is None
    fb.switch()
    fr = fb.frame
    names = []
    while fr is not None:
        names.append(fr.f_code.co_name)
        fr = fr.f_back
    assert names == ["leaf", "mid"]
    fb.switch()
    assert fb.frame is None


def test_traceback_extract_stack_inside_fiber_has_only_fiber_frames() -> None:
    def body() -> list[str]:
        return [f.name for f in traceback.extract_stack()]

    assert Fiber(body).switch() == ["body"]


def test_settrace_and_setprofile_follow_switches() -> None:
    events: list[tuple[str, str]] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_name in ("body", "leaf"):
            events.append((frame.f_code.co_name, event))
        return tracer

    def leaf() -> Any:
        return suspend()

    def body() -> int:
        leaf()
        return 2

    fb = Fiber(body)
    sys.settrace(tracer)
    try:
        fb.switch()
        fb.switch()
    finally:
        sys.settrace(None)
    assert ("body", "call") in events and ("leaf", "call") in events
    assert ("body", "return") in events

    calls: list[str] = []

    def prof(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    fb = Fiber(body)
    sys.setprofile(prof)
    try:
        fb.switch()
        fb.switch()
    finally:
        sys.setprofile(None)
    assert "body" in calls and "leaf" in calls


def test_threading_local_is_shared_with_the_thread() -> None:
    tl = threading.local()
    tl.x = "thread"

    def body() -> str:
        seen = str(tl.x)
        tl.x = "fiber"
        return seen

    assert Fiber(body).switch() == "thread"
    assert tl.x == "fiber"


def test_gc_keeps_objects_held_by_suspended_frames() -> None:
    class Obj:
        me: Any = None

    def body() -> bool:
        o = Obj()
        o.me = o  # a cycle only a suspended frame references
        r = weakref.ref(o)
        suspend(r)
        return r() is o

    fibers = [Fiber(body) for _ in range(20)]
    for fb in fibers:
        fb.switch()
    for _ in range(3):
        gc.collect()
    assert all(fb.switch() is True for fb in fibers)


def test_generator_running_in_suspended_fiber_is_busy() -> None:
    def gen() -> Any:
        yield suspend("in-gen")

    g = gen()
    fb = Fiber(lambda: next(g))
    assert fb.switch() == "in-gen"
    with pytest.raises(ValueError, match="already executing"):
        next(g)
    assert fb.switch(5) == 5


def test_kill_from_inside_the_running_fiber_is_refused() -> None:
    """As a generator's close() from its own code: ValueError, and the fiber
    runs on (it used to be "leaked" while running: its coroutine reset under
    the code running on it, heap corruption a few runs later)."""
    box: list[Any] = []

    def body() -> str:
        me = box[0]
        with pytest.raises(ValueError, match="already executing"):
            me.kill()
        assert me.status == "running"
        return "finished"

    for _ in range(30):
        box.append(Fiber(body))
        assert box[0].switch() == "finished" and box[0].status == "done"
        box.clear()
        gc.collect()


def test_thread_locks_are_per_thread_not_per_fiber() -> None:
    """Documented: Lock/RLock belong to the OS thread."""
    rl = threading.RLock()
    lk = threading.Lock()

    def body() -> None:
        with rl, lk:
            suspend()

    fb = Fiber(body)
    fb.switch()
    assert rl.acquire(blocking=False) is True  # same thread: re-entered
    rl.release()
    assert lk.acquire(timeout=0.01) is False  # held by the suspended fiber
    fb.switch()
    assert lk.acquire(blocking=False) is True
    lk.release()


def test_many_switches_do_not_leak_memory() -> None:
    import tracemalloc

    def body() -> None:
        x = 0
        while True:
            x = suspend(x)

    fb = Fiber(body)
    fb.switch()
    for i in range(1000):
        fb.switch(i)
    tracemalloc.start()
    try:
        s0 = tracemalloc.take_snapshot()
        for i in range(50_000):
            fb.switch(i)
        s1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(st.size_diff for st in s1.compare_to(s0, "filename"))
    assert growth < 20_000, growth
    fb.kill()


def test_stacks_are_pooled_and_guarded() -> None:
    T._fiber_flush_cache()
    fb = Fiber(lambda: suspend())
    fb.switch()
    assert fb.guarded  # far below the guard budget
    fb.kill()
    before = T.fiber_info()
    for _ in range(2000):
        Fiber(lambda: None).switch()
    after = T.fiber_info()
    assert after["total_slots"] == before["total_slots"]  # reused, no new slabs
    assert after["cached_slots"] >= 1


def test_many_fibers_do_not_grow_rss() -> None:
    import resource

    def body() -> int:
        suspend()
        return sum(range(10))

    def burst(n: int) -> None:
        for _ in range(n):
            fb = Fiber(body)
            fb.switch()
            fb.switch()

    burst(2000)
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    burst(20000)
    r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert r1 - r0 < 10_000, (r0, r1)  # KiB


def test_keyboard_interrupt_lands_in_the_running_fiber() -> None:
    rc, out, err = run_py(
        """
        import os, signal, threading
        from tokioloop import _tokioloop as T
        # a test run started in the background inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
        def body():
            try:
                while True:
                    pass
            except KeyboardInterrupt:
                return "fiber-got-KI"
        threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        print(T.Fiber(body).switch())
        """
    )
    assert rc == 0 and "fiber-got-KI" in out, (rc, out, err)


def test_faulthandler_dump_inside_fiber_shows_fiber_frames() -> None:
    rc, out, err = run_py(
        """
        import faulthandler, sys
        from tokioloop import _tokioloop as T
        def leaf():
            faulthandler.dump_traceback(sys.stdout, all_threads=False)
        def body():
            leaf()
        def resumer():
            T.Fiber(body).switch()
        resumer()
        """
    )
    assert rc == 0 and "leaf" in out and "resumer" not in out, (out, err)


def test_suspended_fibers_dropped_at_interpreter_exit_are_reported_once() -> None:
    """During finalization a suspended fiber is not unwound (no finally
    blocks run then); dropping it is reported once per process. The body is
    defined outside __main__ so that finalization drops the fibers (a
    suspended frame keeps its function's globals alive)."""
    rc, out, err = run_py(
        """
        from tokioloop import _tokioloop as T
        ns = {"T": T}
        exec(
            "def body():\\n"
            "    try:\\n"
            "        T.fiber_suspend()\\n"
            "    finally:\\n"
            "        print('finally ran')\\n",
            ns,
        )
        keep = [T.Fiber(ns["body"]) for _ in range(3)]
        del ns
        for f in keep:
            f.switch()
        print("main done")
        """
    )
    assert rc == 0, err
    assert "main done" in out and "finally ran" not in out
    assert err.count("shutting down while fibers are suspended") == 1, err


def test_suspended_fibers_alive_at_exit_do_not_break_shutdown() -> None:
    rc, out, err = run_py(
        """
        from tokioloop import _tokioloop as T
        def body():
            try:
                T.fiber_suspend()
            finally:
                print("finally ran")
        keep = [T.Fiber(body) for _ in range(3)]
        for f in keep:
            f.switch()
        print("main done")
        """
    )
    assert rc == 0 and out.strip() == "main done", (out, err)
