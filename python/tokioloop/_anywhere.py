"""Await anywhere: synchronous code that awaits.

``await_(x)`` called from plain ``def`` code returns ``x``'s result. What it
does depends on where it is called:

* on a fiber (inside ``await run_anywhere(fn)``, or in a task created by
  :func:`anywhere_task`): the fiber is suspended while the enclosing task
  awaits ``x`` (native code, ``tokioloop._tokioloop.await_``);
* on a thread with no running event loop: ``x`` runs on that thread's own
  persistent event loop (kept between calls, so objects bound to a loop,
  such as a client's connection pool, stay usable);
* on a worker thread an event loop started (``run_in_executor``,
  ``asyncio.to_thread``, asgiref's ``sync_to_async``, once the loop wraps
  submitted functions with :func:`wrap_for_executor`): ``x`` is submitted to
  that loop and the worker blocks until it is done;
* on the thread-sensitive worker of an asgiref ``ThreadSensitiveContext``
  (a Django sync view): through asgiref's ``async_to_sync``, which serves
  the thread-sensitive ``sync_to_async`` calls the awaitable makes (Django's
  async ORM) on this thread while it waits, instead of hanging on them;
* on a thread whose loop is running, outside a fiber: RuntimeError.
"""

from __future__ import annotations

import _thread
import asyncio
import atexit
import contextvars
import functools
import inspect
import sys
import threading
import types
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
)
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

from . import _tokioloop

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "AnywhereCoroutine",
    "RunAnywhere",
    "anywhere_task",
    "async_context",
    "async_iter",
    "await_",
    "run_anywhere",
    "sync_or_async",
    "wrap_for_executor",
]

#: ``await_(awaitable)``: wait for ``awaitable`` from synchronous code.
await_ = _tokioloop.await_
#: ``await run_anywhere(fn, *args, **kwargs)``: run ``fn`` on a fiber.
run_anywhere = _tokioloop.run_anywhere
RunAnywhere = _tokioloop.RunAnywhere
AnywhereCoroutine = _tokioloop.AnywhereCoroutine

_ON_LOOP_MESSAGE = (
    "tokioloop.await_() was called from synchronous code on a thread whose event loop "
    "is running, outside a fiber, so there is nothing it could suspend. Run the "
    "synchronous code with `await tokioloop.run_anywhere(fn, *args, **kwargs)`, or run "
    "the task as an await-anywhere task (task factory tokioloop.anywhere_task)."
)


def _new_private_loop() -> asyncio.AbstractEventLoop:
    """The event loop a thread without a running loop uses for await_()."""
    from ._loop import new_event_loop

    return new_event_loop()


def _discard(aw: object) -> None:
    """Close a coroutine we refuse to run (no "never awaited" warning)."""
    if inspect.iscoroutine(aw):
        aw.close()


class _ThreadState(threading.local):
    """Per-thread state. Class-level defaults: a missing attribute of a
    threading.local costs an AttributeError (0.5 us) on every lookup."""

    #: The loop that started this worker thread (while a function wrapped
    #: by wrap_for_executor runs).
    owner: asyncio.AbstractEventLoop | None = None
    #: Holder of this thread's private loop.
    closer: _LoopCloser | None = None


_thread_state = _ThreadState()
_get_running_loop = asyncio._get_running_loop
_CoroutineType = types.CoroutineType

# -- worker threads started by a loop ---------------------------------------


def wrap_for_executor(loop: asyncio.AbstractEventLoop, func: Callable[..., T]) -> Callable[..., T]:
    """Wrap ``func`` for a loop's executor: while it runs on the worker
    thread, ``await_`` there submits awaitables to ``loop``."""

    def call_in_worker(*args: Any) -> T:
        state = _thread_state
        prev = state.owner
        state.owner = loop
        try:
            return func(*args)
        finally:
            state.owner = prev

    return call_in_worker


def _await_on_owner(loop: asyncio.AbstractEventLoop, aw: Awaitable[T]) -> T:
    if loop.is_closed():
        _discard(aw)
        raise RuntimeError("await_(): the event loop that started this worker thread is closed")
    if getattr(loop, "_thread_id", None) == threading.get_ident():
        _discard(aw)
        raise RuntimeError(_ON_LOOP_MESSAGE)
    done = _thread.allocate_lock()
    done.acquire()
    outcome: list[tuple[bool, Any]] = []
    started: list[bool] = []

    def on_done(fut: asyncio.Future[T]) -> None:
        if fut.cancelled():
            try:
                fut.result()
            except BaseException as e:  # CancelledError with its message
                outcome.append((False, e))
        else:
            exc = fut.exception()
            outcome.append((True, fut.result()) if exc is None else (False, exc))
        done.release()

    def start() -> None:
        started.append(True)
        try:
            fut = asyncio.ensure_future(aw, loop=loop)
        except BaseException as e:
            outcome.append((False, e))
            done.release()
            return
        fut.add_done_callback(on_done)

    loop.call_soon_threadsafe(start, context=contextvars.copy_context())
    while not done.acquire(timeout=0.25):
        if loop.is_closed():
            if not started:
                _discard(aw)
            raise RuntimeError(
                "await_(): the event loop that started this worker thread was closed "
                "before the awaitable finished"
            )
    ok, value = outcome.pop()
    if ok:
        return cast(T, value)
    try:
        raise value
    finally:
        del value  # no traceback -> frame -> exception cycle


# -- threads without a running loop -----------------------------------------

_private_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


class _LoopCloser:
    """Closes a thread's private loop when the thread's locals go away."""

    __slots__ = ("loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __del__(self) -> None:
        loop = self.loop
        if not loop.is_closed() and not loop.is_running():
            loop.close()


@atexit.register
def _close_private_loops() -> None:
    for loop in list(_private_loops):
        if not loop.is_closed() and not loop.is_running():
            loop.close()


def _new_thread_loop() -> asyncio.AbstractEventLoop:
    loop = _new_private_loop()
    _thread_state.closer = _LoopCloser(loop)
    _private_loops.add(loop)
    return loop


def _thread_sensitive_worker() -> Any:
    """asgiref's sync module when this thread is the thread-sensitive worker
    of the current asgiref ``ThreadSensitiveContext`` (a Django sync view
    runs on one), else None."""
    sync = sys.modules.get("asgiref.sync")
    if sync is None:
        return None
    s2a = getattr(sync, "SyncToAsync", None)
    var = getattr(s2a, "thread_sensitive_context", None)
    ctx = var.get(None) if var is not None else None
    if ctx is None:
        return None
    executor = getattr(s2a, "context_to_thread_executor", {}).get(ctx)
    if executor is None:
        return None
    me = threading.current_thread()
    # A ThreadPoolExecutor adds a worker to _threads only after starting it,
    # which may be after the worker took its first job: its name tells too.
    prefix = getattr(executor, "_thread_name_prefix", None)
    if me in getattr(executor, "_threads", ()) or (prefix and me.name.startswith(prefix + "_")):
        return sync
    return None


async def _await_it(aw: Awaitable[T]) -> T:
    return await aw


def _await_outside_fiber(aw: Awaitable[T]) -> T:
    """await_() where no fiber can be suspended (called by the native
    await_)."""
    if type(aw) is not _CoroutineType and not inspect.isawaitable(aw):
        raise TypeError(f"object {type(aw).__name__} can't be used in 'await' expression")
    if _get_running_loop() is not None:
        _discard(aw)
        raise RuntimeError(_ON_LOOP_MESSAGE)
    sync = _thread_sensitive_worker()
    if sync is not None:
        # Thread-sensitive sync_to_async calls made by the awaitable (Django's
        # async ORM) are routed to this very thread: blocking it would hang
        # them and the request. asgiref's async_to_sync runs the awaitable on
        # the outer loop and serves them on this thread while it waits.
        return cast(T, sync.async_to_sync(_await_it)(aw))
    state = _thread_state
    owner = state.owner
    if owner is not None:
        return _await_on_owner(owner, aw)
    closer = state.closer
    if closer is None or closer.loop.is_closed():
        loop = _new_thread_loop()
    else:
        loop = closer.loop
    # A traceback through this frame (the awaitable's exception) may live in
    # a reference cycle: it must not keep the closer alive past thread exit.
    del closer
    return loop.run_until_complete(aw)


try:
    _tokioloop._set_await_fallback(_await_outside_fiber)
except RuntimeError:  # module re-imported: the first registration stays
    pass


# -- tasks ------------------------------------------------------------------


def _suspended_fiber_of(task: asyncio.Task[Any]) -> Any:
    """The run_anywhere() or await-anywhere coroutine whose fiber `task`
    waits on (the first one down its chain of awaits), or None."""
    obj: Any = task.get_coro()
    for _ in range(10_000):  # a chain of awaits, not a cycle
        if obj is None:
            return None
        if type(obj) is RunAnywhere:
            return obj if obj.cr_suspended else None
        if type(obj) is AnywhereCoroutine:
            if obj.fiber_suspended:
                return obj
            obj = obj.__wrapped__
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None)
    return None


def unwind_abandoned_fibers(loop: asyncio.AbstractEventLoop) -> None:
    """For a loop being closed: unwind (GeneratorExit) the fibers its pending
    tasks wait on. A task abandoned on a closed loop is freed by the cyclic
    GC, which closes its coroutine (asyncio prints "Task was destroyed but
    it is pending!"); one whose synchronous code waits in await_() cannot
    be: the references its suspended fiber's C frames hold are invisible to
    the GC, so the task, what it refers to and the fiber's stack would stay
    for the life of the process. Unwinding the fiber here, as closing its
    coroutine would, releases them; the rest then goes as a plain abandoned
    task does."""
    try:
        tasks = asyncio.all_tasks(loop)
    except Exception:  # a closing loop must not fail on this
        return
    for task in tasks:
        try:
            obj = _suspended_fiber_of(task)
            if obj is not None:
                obj.close()
        except Exception as exc:  # reported, as the GC would report it
            loop.call_exception_handler(
                {
                    "message": "closing the loop: unwinding the fiber of a pending task failed",
                    "exception": exc,
                    "task": task,
                }
            )


def anywhere_task(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], **kwargs: Any
) -> asyncio.Task[T]:
    """Task factory (``loop.set_task_factory(anywhere_task)``) whose tasks are
    await-anywhere capable: every step of ``coro`` runs on a fiber, so
    synchronous code anywhere inside it can call ``await_``."""
    if not asyncio.iscoroutine(coro):
        raise TypeError(f"a coroutine was expected, got {coro!r}")
    return asyncio.Task(AnywhereCoroutine(coro), loop=loop, **kwargs)


# -- helpers for synchronous code ---------------------------------------------


class async_context(Generic[T]):
    """``with async_context(acm) as x:`` uses an async context manager from
    synchronous code (``__aenter__``/``__aexit__`` through ``await_``)."""

    __slots__ = ("_cm", "_aexit")

    def __init__(self, cm: Any) -> None:
        self._cm = cm
        self._aexit: Callable[..., Awaitable[bool | None]] | None = None

    def __enter__(self) -> T:
        t = type(self._cm)
        try:
            aenter = t.__aenter__
            aexit = t.__aexit__
        except AttributeError:
            raise TypeError(
                f"'{t.__name__}' object does not support the asynchronous context manager protocol"
            ) from None
        value = await_(aenter(self._cm))
        self._aexit = aexit
        return cast(T, value)

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        aexit = self._aexit
        if aexit is None:
            raise RuntimeError("async_context exited without being entered")
        self._aexit = None
        return bool(await_(aexit(self._cm, typ, exc, tb)))


class async_iter(Generic[T]):
    """``for x in async_iter(aiterable):`` iterates an async iterable from
    synchronous code (``__anext__`` through ``await_``). As a context manager
    it closes the async iterator (``aclose()``) on exit."""

    __slots__ = ("_it", "_anext")

    def __init__(self, aiterable: AsyncIterable[T] | AsyncIterator[T]) -> None:
        aiter_ = getattr(type(aiterable), "__aiter__", None)
        if aiter_ is None:
            raise TypeError(
                "async_iter() requires an object with __aiter__ method, got "
                f"{type(aiterable).__name__}"
            )
        it = aiter_(aiterable)
        anext_ = getattr(type(it), "__anext__", None)
        if anext_ is None:
            raise TypeError(
                "async_iter(): __aiter__ returned an object that does not implement "
                f"__anext__: {type(it).__name__}"
            )
        self._it = it
        self._anext = anext_

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return cast(T, await_(self._anext(self._it)))
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Close the async iterator (``await it.aclose()``) if it can be."""
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:
            await_(aclose())

    def __enter__(self) -> async_iter[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_ASYNC_CODE_FLAGS = (
    inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
)


def _caller_is_async(depth: int) -> bool:
    return bool(sys._getframe(depth + 1).f_code.co_flags & _ASYNC_CODE_FLAGS)


def sync_or_async(fn: F) -> F:
    """Decorator: one function body for synchronous and asynchronous callers.

    Called from ``async`` code the decorated function returns an awaitable
    (``await f(x)``); called from synchronous code it returns the result.
    Decorate an ``async def`` (synchronous callers get it through
    ``await_``) or a ``def`` that uses ``await_`` inside (asynchronous
    callers get it through ``run_anywhere``). Which kind of caller it is
    comes from the calling frame's code (coroutine, async generator, or
    not)."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        def from_async(*args: Any, **kwargs: Any) -> Any:
            coro = fn(*args, **kwargs)
            if _caller_is_async(1):
                return coro
            return await_(coro)

        return cast(F, from_async)

    @functools.wraps(fn)
    def from_sync(*args: Any, **kwargs: Any) -> Any:
        if _caller_is_async(1):
            return run_anywhere(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    return cast(F, from_sync)
