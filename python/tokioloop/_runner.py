"""`tokioloop.run()`: asyncio.run() with a tokioloop loop.

On 3.11+ this is asyncio's own Runner with `loop_factory`. Python 3.10 has
no Runner, so a small one with the same behaviour (including Ctrl-C: the
main task is cancelled first, KeyboardInterrupt is raised after) is
provided here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._loop import new_event_loop

T = TypeVar("T")


def run(
    main: Coroutine[Any, Any, T],
    *,
    debug: bool | None = None,
    anywhere_tasks: bool | None = None,
) -> T:
    """Run `main` on a new tokioloop loop and return its result, as
    asyncio.run(main, debug=debug) does with the default loop.

    ``anywhere_tasks=True``: every task is await-anywhere capable (see
    tokioloop.Loop)."""
    if asyncio.events._get_running_loop() is not None:
        raise RuntimeError("tokioloop.run() cannot be called from a running event loop")
    factory = functools.partial(new_event_loop, anywhere_tasks=anywhere_tasks)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
            return runner.run(main)
    return _run_310(main, debug, factory)


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    to_cancel = asyncio.all_tasks(loop)
    if not to_cancel:
        return
    for task in to_cancel:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*to_cancel, return_exceptions=True))
    for task in to_cancel:
        if task.cancelled():
            continue
        if task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during asyncio.run() shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )


def _run_310(main: Coroutine[Any, Any, T], debug: bool | None, factory: Callable[[], Any]) -> T:
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = factory()
    interrupts = 0
    old_handler = None
    try:
        asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        context = contextvars.copy_context()
        task = loop.create_task(main)
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):

            def on_sigint(signum: int, frame: Any) -> None:
                nonlocal interrupts
                interrupts += 1
                if interrupts == 1 and not task.done():
                    task.cancel()
                    loop.call_soon_threadsafe(lambda: None)
                    return
                raise KeyboardInterrupt()

            old_handler = signal.signal(signal.SIGINT, on_sigint)
        del context
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupts > 0:
                raise KeyboardInterrupt() from None
            raise
    finally:
        if old_handler is not None and signal.getsignal(signal.SIGINT) is not old_handler:
            signal.signal(signal.SIGINT, old_handler)
        try:
            _cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
