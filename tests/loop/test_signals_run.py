"""Signals, tokioloop.run, asyncio.run/Runner with loop_factory, the policy."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import tokioloop

from ..conftest import PY311, PY312


def test_add_signal_handler(loop: tokioloop.Loop) -> None:
    got: list[int] = []
    loop.add_signal_handler(signal.SIGUSR1, lambda *a: (got.append(a), loop.stop()), 7)
    loop.call_later(0.01, os.kill, os.getpid(), signal.SIGUSR1)
    loop.call_later(10, loop.stop)
    loop.run_forever()
    assert got == [(7,)]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_an_applications_wakeup_fd_still_hears_its_signals(loop: tokioloop.Loop) -> None:
    # Twisted's reactor on an asyncio loop hears SIGCHLD through a wakeup fd
    # of its own, watched with add_reader. While run_forever() has the loop's
    # wakeup fd in its place, the signal bytes must still reach it, and it
    # must be installed again when the run ends.
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    heard: list[bytes] = []

    def on_wakeup() -> None:
        heard.append(r.recv(100))
        loop.stop()

    old_handler = signal.signal(signal.SIGUSR2, lambda *a: None)
    previous = signal.set_wakeup_fd(w.fileno())
    try:
        loop.add_reader(r, on_wakeup)
        loop.call_later(0.01, os.kill, os.getpid(), signal.SIGUSR2)
        loop.call_later(10, loop.stop)
        loop.run_forever()
        loop.remove_reader(r)
        assert heard == [bytes([signal.SIGUSR2])]
        # The application's wakeup fd is the installed one again.
        assert signal.set_wakeup_fd(w.fileno()) == w.fileno()
    finally:
        signal.set_wakeup_fd(previous)
        signal.signal(signal.SIGUSR2, old_handler)
        r.close()
        w.close()


def test_a_wakeup_fd_installed_during_the_run_stays(loop: tokioloop.Loop) -> None:
    r, w = socket.socketpair()
    w.setblocking(False)
    previous = signal.set_wakeup_fd(-1)
    try:
        loop.call_soon(signal.set_wakeup_fd, w.fileno())
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert signal.set_wakeup_fd(-1) == w.fileno()
    finally:
        signal.set_wakeup_fd(previous)
        r.close()
        w.close()


def test_signal_handler_errors(loop: tokioloop.Loop) -> None:
    with pytest.raises(TypeError, match="sig must be an int"):
        loop.add_signal_handler("SIGINT", print)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid signal number"):
        loop.add_signal_handler(100000, print)
    with pytest.raises(RuntimeError, match="cannot be caught"):
        loop.add_signal_handler(signal.SIGKILL, print)

    async def coro() -> None:
        pass

    with pytest.raises(TypeError, match="coroutines cannot be used"):
        loop.add_signal_handler(signal.SIGUSR2, coro)
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            loop.add_signal_handler(signal.SIGUSR2, print)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert errors, "signal handlers can only be added from the main thread"
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.add_signal_handler(signal.SIGUSR2, print)


def test_close_removes_signal_handlers() -> None:
    lp = tokioloop.new_event_loop()
    lp.add_signal_handler(signal.SIGUSR2, print)
    assert signal.getsignal(signal.SIGUSR2) != signal.SIG_DFL
    lp.close()
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


def test_run_returns_result_and_closes() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def main() -> int:
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return 42

    assert tokioloop.run(main()) == 42
    assert isinstance(loops[0], tokioloop.Loop) and loops[0].is_closed()
    with pytest.raises(ValueError):
        tokioloop.run(main)  # type: ignore[arg-type]


def test_run_debug_and_nested() -> None:
    async def main() -> bool:
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="cannot be called from a running event loop"):
            tokioloop.run(coro)
        coro.close()
        return asyncio.get_running_loop().get_debug()

    assert tokioloop.run(main(), debug=True) is True


def test_run_cancels_leftover_tasks() -> None:
    cancelled: list[bool] = []

    async def bg() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def main() -> None:
        asyncio.ensure_future(bg())
        await asyncio.sleep(0)

    tokioloop.run(main())
    assert cancelled == [True]


@pytest.mark.skipif(not PY312, reason="asyncio.run(loop_factory=) is new in 3.12")
def test_asyncio_run_loop_factory() -> None:
    async def main() -> type:
        return type(asyncio.get_running_loop())

    assert asyncio.run(main(), loop_factory=tokioloop.new_event_loop) is tokioloop.Loop


@pytest.mark.skipif(not PY311, reason="asyncio.Runner is new in 3.11")
def test_asyncio_runner_loop_factory() -> None:
    async def main() -> type:
        return type(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=tokioloop.new_event_loop) as r:
        assert r.run(main()) is tokioloop.Loop
        assert r.run(main()) is tokioloop.Loop


def test_policy() -> None:
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(tokioloop.EventLoopPolicy())
    try:
        lp = asyncio.new_event_loop()
        assert isinstance(lp, tokioloop.Loop)
        lp.close()

        async def main() -> type:
            return type(asyncio.get_running_loop())

        assert asyncio.run(main()) is tokioloop.Loop
    finally:
        asyncio.set_event_loop_policy(old)


CTRL_C = textwrap.dedent(
    """
    import asyncio, os, signal, sys, tokioloop
    # a test run started in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    async def main():
        try:
            print("ready", flush=True)
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            print("main cancelled", flush=True)
            raise
        finally:
            print("finally ran", flush=True)
    try:
        tokioloop.run(main())
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
        sys.exit(3)
    """
)


def test_ctrl_c_cancels_main_then_raises_keyboard_interrupt() -> None:
    p = subprocess.Popen(
        [sys.executable, "-c", CTRL_C], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=20)
    assert out.split() == ["main", "cancelled", "finally", "ran", "KeyboardInterrupt"]
    assert p.returncode == 3


CTRL_C_PLAIN = textwrap.dedent(
    """
    import asyncio, signal, sys, tokioloop
    # a test run started in the background inherits SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    loop = tokioloop.new_event_loop()
    loop.call_later(60, loop.stop)
    loop.call_soon(lambda: print("ready", flush=True))  # once the loop runs
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        print("interrupted", loop.is_running(), flush=True)
        loop.close()
        sys.exit(4)
    """
)


def test_ctrl_c_interrupts_a_sleeping_run_forever() -> None:
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_PLAIN], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=20)
    assert out.strip() == "interrupted False"
    assert p.returncode == 4
