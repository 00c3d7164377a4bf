"""Exceptions in callbacks, the exception handler, and debug mode."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

import tokioloop


def test_callback_exception_goes_to_handler(loop: tokioloop.Loop) -> None:
    contexts: list[dict[str, object]] = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    assert loop.get_exception_handler() is not None

    def boom() -> None:
        raise ZeroDivisionError("x")

    seen: list[int] = []
    h = loop.call_soon(boom)
    loop.call_soon(seen.append, 1)  # the loop goes on after the error
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [1]
    assert len(contexts) == 1
    ctx = contexts[0]
    assert isinstance(ctx["exception"], ZeroDivisionError)
    assert ctx["handle"] is h
    assert str(ctx["message"]).startswith("Exception in callback ")
    assert "boom" in str(ctx["message"])


def test_default_exception_handler_logs(
    loop: tokioloop.Loop, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> None:
        raise ValueError("logged")

    loop.call_soon(boom)
    loop.call_soon(loop.stop)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.run_forever()
    assert any("Exception in callback" in r.getMessage() for r in caplog.records)
    assert any(r.exc_info and r.exc_info[0] is ValueError for r in caplog.records)


def test_failing_exception_handler_is_logged(
    loop: tokioloop.Loop, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_handler(lp: object, ctx: object) -> None:
        raise RuntimeError("handler broke")

    loop.set_exception_handler(bad_handler)
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(loop.stop)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        loop.run_forever()
    assert any("Unhandled error in exception handler" in r.getMessage() for r in caplog.records)


def test_set_exception_handler_type_check(loop: tokioloop.Loop) -> None:
    with pytest.raises(TypeError):
        loop.set_exception_handler(42)  # type: ignore[arg-type]
    loop.set_exception_handler(None)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_base_exceptions_propagate_and_keep_the_queue(
    loop: tokioloop.Loop, exc: type[BaseException]
) -> None:
    seen: list[int] = []

    def raiser() -> None:
        raise exc()

    loop.call_soon(seen.append, 1)
    loop.call_soon(raiser)
    loop.call_soon(seen.append, 2)
    with pytest.raises(exc):
        loop.run_forever()
    assert not loop.is_running()
    assert seen == [1]
    # what was not run is still queued, ahead of anything new
    loop.call_soon(seen.append, 3)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [1, 2, 3]


def test_cancelled_error_in_callback_is_reported(loop: tokioloop.Loop) -> None:
    contexts: list[dict[str, object]] = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    def raiser() -> None:
        raise asyncio.CancelledError()

    loop.call_soon(raiser)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert isinstance(contexts[0]["exception"], asyncio.CancelledError)


def test_callback_that_closes_the_loop(loop: tokioloop.Loop) -> None:
    contexts: list[dict[str, object]] = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))
    loop.call_soon(loop.close)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert isinstance(contexts[0]["exception"], RuntimeError)
    assert not loop.is_closed()
    loop.close()
    assert loop.is_closed()


def test_run_until_complete_exception(loop: tokioloop.Loop) -> None:
    async def fail() -> None:
        await asyncio.sleep(0)
        raise KeyError("k")

    with pytest.raises(KeyError):
        loop.run_until_complete(fail())


def test_run_until_complete_stopped_early(loop: tokioloop.Loop) -> None:
    async def slow() -> None:
        await asyncio.sleep(10)

    loop.call_soon(loop.stop)
    task = loop.create_task(slow())
    with pytest.raises(RuntimeError, match="Event loop stopped before Future completed"):
        loop.run_until_complete(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        loop.run_until_complete(task)


def test_set_debug(loop: tokioloop.Loop) -> None:
    assert loop.get_debug() is False or os.environ.get("PYTHONASYNCIODEBUG")
    loop.set_debug(True)
    assert loop.get_debug() is True
    h = loop.call_soon(print)
    assert h._source_traceback, "debug mode records where a handle was created"
    assert "created at" in repr(h)
    h.cancel()
    loop.set_debug(False)
    h = loop.call_soon(print)
    assert h._source_traceback is None
    h.cancel()
    # Any object, by its truth, as asyncio's (aiohttp's tests pass 0 and 1).
    loop.set_debug(1)
    assert loop.get_debug()
    loop.set_debug(0)
    assert not loop.get_debug()
    loop.set_debug([])
    assert not loop.get_debug()


def _creation_sites(loop: asyncio.AbstractEventLoop) -> dict[str, object]:
    """The last frame of each kind of object's creation traceback."""

    async def child() -> None:
        pass

    def last(obj: object) -> object:
        tb = obj._source_traceback  # type: ignore[attr-defined]
        return (os.path.basename(tb[-1].filename), tb[-1].name)

    async def main() -> dict[str, object]:
        lp = asyncio.get_running_loop()
        sites: dict[str, object] = {}
        h = lp.call_soon(print)
        sites["call_soon"] = last(h)
        h.cancel()
        h = lp.call_later(9, print)
        sites["call_later"] = last(h)
        h.cancel()
        t = lp.create_task(child())
        sites["loop.create_task"] = last(t)
        await t
        t = asyncio.create_task(child())
        sites["asyncio.create_task"] = last(t)
        await t
        t = asyncio.ensure_future(child())
        sites["ensure_future"] = last(t)
        await t
        return sites

    loop.set_debug(True)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_creation_tracebacks_end_where_asyncio_ends_them() -> None:
    """The "created at" of debug messages: loop.create_task() called directly
    ends at its caller, asyncio.create_task() at asyncio's wrapper, as on the
    stdlib loop (the native create_task dropped one frame too many: psycopg's
    debug-mode tests print the caller's line)."""
    ours = _creation_sites(tokioloop.new_event_loop())
    stdlib = _creation_sites(asyncio.SelectorEventLoop())
    assert ours == stdlib
    assert ours["loop.create_task"] == (os.path.basename(__file__), "main")


def test_slow_callback_warning(loop: tokioloop.Loop, caplog: pytest.LogCaptureFixture) -> None:
    loop.set_debug(True)
    loop.slow_callback_duration = 0.01

    def slow() -> None:
        time.sleep(0.03)

    loop.call_soon(slow)
    loop.call_soon(loop.stop)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        loop.run_forever()
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Executing <Handle") and "took" in m for m in msgs), msgs


def test_wrong_thread_in_debug_mode(loop: tokioloop.Loop) -> None:
    loop.set_debug(True)
    errors: list[BaseException] = []

    def from_thread() -> None:
        for call in (lambda: loop.call_soon(print), lambda: loop.call_later(1, print)):
            try:
                call()
            except RuntimeError as e:
                errors.append(e)
        loop.call_soon_threadsafe(loop.stop)  # this one is allowed

    loop.call_soon(lambda: threading.Thread(target=from_thread).start())
    loop.run_forever()
    assert len(errors) == 2
    assert all("Non-thread-safe operation" in str(e) for e in errors)


@pytest.mark.parametrize(
    "env,args",
    [({"PYTHONASYNCIODEBUG": "1"}, []), ({}, ["-X", "dev"]), ({}, [])],
)
def test_debug_from_environment(env: dict[str, str], args: list[str]) -> None:
    code = "import tokioloop; lp = tokioloop.new_event_loop(); print(lp.get_debug()); lp.close()"
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    full_env.update(env)
    out = subprocess.run(
        [sys.executable, *args, "-c", code],
        env=full_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == ("True" if env or args else "False")


AT_SHUTDOWN = """
import asyncio, sys, tokioloop

class Holder:
    # Freed only by the collector: at interpreter shutdown, by its last
    # collection, when Py_IsInitialized() is already false.
    def __init__(self, loop):
        self.loop = loop
        self.timer = loop.call_later(100, print, "never")
        self.handle = loop.call_at(loop.time() + 50, print, "never")
        self.cycle = self

    def __del__(self):
        self.timer.cancel()
        self.handle.cancel()
        assert self.timer.cancelled() and self.handle.cancelled()
        self.timer.when()
        try:
            self.loop.call_soon_threadsafe(print, "never")
            self.loop.call_soon(print, "never")
        except RuntimeError:
            pass  # the loop is closed: asyncio raises too
        sys.stderr.write("del ran\\n")

async def main():
    Holder(asyncio.get_running_loop())
    Holder(asyncio.get_running_loop()).loop = tokioloop.new_event_loop()  # one open loop

tokioloop.run(main())
print("exiting", flush=True)
"""


def test_handles_and_loop_methods_from_del_at_interpreter_shutdown() -> None:
    # aiodns' resolver cancels its timer in __del__: the process aborted
    # (a panic in pyo3's attach) when that ran during the final collection.
    p = subprocess.run(
        [sys.executable, "-c", AT_SHUTDOWN], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.split() == ["exiting"]
    assert p.stderr.count("del ran") == 2, p.stderr[-2000:]
