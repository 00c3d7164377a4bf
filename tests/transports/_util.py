"""Helpers for the transport fault tests: run one scenario on a fresh loop
(tokioloop's or the standard library's) with a hang guard, record what
reached the exception handler, and describe outcomes so the two loops can
be compared in the same test."""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tokioloop

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

#: The loops a scenario is compared on: the standard library's selector
#: loop (the reference) and tokioloop.
LOOPS: dict[str, LoopFactory] = {
    "asyncio": asyncio.SelectorEventLoop,
    "tokioloop": tokioloop.new_event_loop,
}

#: How long one scenario may take before it counts as a hang.
TIMEOUT = 10.0


@dataclass
class Run:
    """The result of a scenario and the exception handler calls it caused."""

    result: Any
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error_messages(self) -> list[str]:
        return [str(c.get("message")) for c in self.errors]


def run_on(
    factory: LoopFactory,
    main: Callable[[Any], Awaitable[T]],
    timeout: float = TIMEOUT,
    *,
    debug: bool = False,
) -> Run:
    """Run `main(loop)` on a new loop made by `factory`; a hang longer than
    `timeout` raises TimeoutError. The loop is closed afterwards."""
    loop = factory()
    loop.set_debug(debug)
    run = Run(None)
    loop.set_exception_handler(lambda _lp, ctx: run.errors.append(ctx))
    asyncio.set_event_loop(loop)
    try:
        run.result = loop.run_until_complete(asyncio.wait_for(main(loop), timeout))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return run


def on_both(
    main: Callable[[Any], Awaitable[T]], timeout: float = TIMEOUT, *, debug: bool = False
) -> dict[str, Run]:
    """Run the same scenario on the standard library's loop and on tokioloop."""
    return {name: run_on(f, main, timeout, debug=debug) for name, f in LOOPS.items()}


async def outcome(aw: Awaitable[Any]) -> tuple[str, str]:
    """("ok", "") or (exception class name, message) for comparisons."""
    try:
        await aw
    except Exception as exc:  # noqa: BLE001 - the outcome is the point
        return type(exc).__name__, str(exc)
    return "ok", ""


def call_outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)
    return "ok", ""


def exc_name(exc: BaseException | None) -> str:
    return "None" if exc is None else type(exc).__name__


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@contextmanager
def fds_released() -> Iterator[None]:
    """Fail if the block leaves file descriptors open (after a gc)."""
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = open_fds() - before
    details = {fd: _fd_target(fd) for fd in sorted(leaked)}
    assert not leaked, f"file descriptors leaked: {details}"


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


@contextmanager
def nofile_limit(soft: int) -> Iterator[None]:
    """Set RLIMIT_NOFILE's soft limit for the block; restored in any case."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def free_port(family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on (bound and released: free right now)."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def set_linger_reset(sock: socket.socket) -> None:
    """Make close() send a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def pending_bytes(sock_or_fd: Any) -> int:
    """Bytes waiting in a socket's (or pipe's) receive queue (FIONREAD)."""
    import array
    import fcntl
    import termios

    fd = sock_or_fd if isinstance(sock_or_fd, int) else sock_or_fd.fileno()
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf, True)
    return int(buf[0])


async def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition that no event reports (kernel state), yielding to
    the loop in between; TimeoutError if it does not become true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.001)


async def quiet_window() -> None:
    """Give the loop many iterations and a little time, for checks that
    something does NOT happen (no event exists for that)."""
    for _ in range(20):
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)


#: tokioloop's DatagramTransport starts its native receiver from
#: `_add_reader`, which asks `self.is_reading()`; on 3.10 asyncio's datagram
#: transport has no is_reading() (only the socket transport has), so the
#: inherited ReadTransport.is_reading raises NotImplementedError in the
#: callback asyncio schedules from __init__: nothing is ever received.
PY310 = sys.version_info < (3, 11)
