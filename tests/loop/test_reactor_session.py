"""run_forever() keeps one block_on open on the loop's Tokio runtime for the
whole run (Driver::run_session in src/loop/io.rs): each wait resumes it
instead of entering the runtime anew. The session must end however the run
ends (stop, an exception out of a callback, KeyboardInterrupt), leaving the
thread free for the next run of this loop or of another loop; while it is
open, other loops may still be created, used and closed from callbacks."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import warnings

import pytest

import tokioloop


async def _echo_once(loop: asyncio.AbstractEventLoop) -> bytes:
    """A connection, a timer and a thread-safe wake-up: every kind of wait."""
    a, b = socket.socketpair()
    a.setblocking(False)
    got: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if not got.done():
                got.set_result(data)

    tr, _ = await loop.connect_accepted_socket(P, sock=a)
    await asyncio.sleep(0.001)
    threading.Timer(0.01, b.send, (b"ping",)).start()
    fut: asyncio.Future[None] = loop.create_future()
    threading.Timer(0.005, loop.call_soon_threadsafe, (fut.set_result, None)).start()
    await fut
    data = await asyncio.wait_for(got, 5)
    tr.close()
    b.close()
    await asyncio.sleep(0)
    return data


def test_runs_one_after_another_on_one_thread() -> None:
    loops = [tokioloop.new_event_loop() for _ in range(3)]
    try:
        for _ in range(3):
            for lp in loops:
                assert lp.run_until_complete(_echo_once(lp)) == b"ping"
    finally:
        for lp in loops:
            lp.close()


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt, SystemExit])
def test_session_ends_when_a_callback_raises_out_of_the_run(exc: type[BaseException]) -> None:
    lp = tokioloop.new_event_loop()
    other = tokioloop.new_event_loop()
    try:

        async def main() -> None:
            await asyncio.sleep(0.001)  # the session has waited: it is open

            def raise_it() -> None:
                raise exc()

            # BaseExceptions leave run_forever directly; an Exception goes
            # to the handler unless it is the result of the awaited future.
            if issubclass(exc, Exception):
                raise exc()
            lp.call_soon(raise_it)
            await asyncio.sleep(10)

        with pytest.raises(exc):
            lp.run_until_complete(main())
        # The thread is out of the runtime: both loops run again here.
        assert other.run_until_complete(_echo_once(other)) == b"ping"
        assert lp.run_until_complete(_echo_once(lp)) == b"ping"
    finally:
        for task in asyncio.all_tasks(lp):
            task.cancel()
        lp.run_until_complete(asyncio.sleep(0))
        lp.close()
        other.close()


def test_other_loops_used_from_a_running_loops_callbacks() -> None:
    """Another loop can be made, given transports and closed from inside a
    run; driving it by hand there is refused as asyncio refuses nested runs."""
    lp = tokioloop.new_event_loop()
    try:

        async def main() -> tuple[str, str]:
            await asyncio.sleep(0.001)
            other = tokioloop.new_event_loop()
            a, b = socket.socketpair()
            sleeper = asyncio.sleep(0)
            try:
                other.run_until_complete(sleeper)
            except RuntimeError as e:
                nested = str(e)
            else:
                nested = "no error"
            sleeper.close()
            try:
                other._run_once()  # type: ignore[attr-defined]
            except RuntimeError as e:
                by_hand = str(e)
            else:
                by_hand = "no error"
            coro = other.connect_accepted_socket(asyncio.Protocol, sock=a)
            coro.close()  # made, not run: other is not running
            other.close()
            a.close()
            b.close()
            await asyncio.sleep(0.001)
            return nested, by_hand

        nested, by_hand = lp.run_until_complete(main())
        assert "another loop is running" in nested
        assert "another loop is running" in by_hand
        assert lp.run_until_complete(_echo_once(lp)) == b"ping"
    finally:
        lp.close()


def test_loop_runs_in_one_thread_then_another() -> None:
    lp = tokioloop.new_event_loop()
    try:
        assert lp.run_until_complete(_echo_once(lp)) == b"ping"
        out: list[bytes] = []
        t = threading.Thread(target=lambda: out.append(lp.run_until_complete(_echo_once(lp))))
        t.start()
        t.join(30)
        assert out == [b"ping"]
        assert lp.run_until_complete(_echo_once(lp)) == b"ping"
    finally:
        lp.close()


def test_a_child_forked_inside_a_run_runs_loops_of_its_own() -> None:
    """The child of a fork() made inside a run (multiprocessing's fork start
    method from a coroutine) is a copy of the thread inside that run; it must
    still be able to run new loops, waits included."""
    lp = tokioloop.new_event_loop()
    try:

        async def main() -> int:
            await asyncio.sleep(0.001)  # the run has waited: its session is open
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
                pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    child = tokioloop.new_event_loop()
                    ok = child.run_until_complete(_echo_once(child)) == b"ping"
                    ok = ok and child.run_until_complete(_echo_once(child)) == b"ping"
                    child.close()
                    code = 0 if ok else 2
                finally:
                    os._exit(code)
            _, status = await lp.run_in_executor(None, os.waitpid, pid, 0)
            return os.waitstatus_to_exitcode(status)

        assert lp.run_until_complete(main()) == 0
        assert lp.run_until_complete(_echo_once(lp)) == b"ping"
    finally:
        lp.close()
