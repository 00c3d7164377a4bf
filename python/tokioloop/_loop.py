"""`tokioloop.Loop`: the asyncio event loop users see.

The hot paths (call_soon & co., timers, the run loop, create_future,
create_task, add_reader & co., sock_* I/O, DNS off the loop thread) are
native, in `LoopCore`. This class adds what asyncio does in Python around
them. Where asyncio's own logic is pure bookkeeping over public loop
methods (exception handler, async generator hooks, default executor
shutdown, run_until_complete), the stdlib's implementation for the running
Python version is used as is, so behaviour matches each version exactly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import socket
import sys
import threading
import warnings
import weakref
from asyncio import base_events as _base_events
from asyncio import events as _events
from collections.abc import Callable
from typing import Any

from ._anywhere import unwind_abandoned_fibers, wrap_for_executor
from ._network import NetworkMixin
from ._tokioloop import Handle, LoopCore

__all__ = ["Loop", "new_event_loop"]

logger = logging.getLogger("asyncio")

_Future = asyncio.Future
_HAS_IPV6 = hasattr(socket, "AF_INET6")
_SENDFILE_FALLBACK_CHUNK = 256 * 1024

try:
    from ssl import SSLSocket as _SSLSocket
except ImportError:  # pragma: no cover - CPython is built with ssl here

    class _SSLSocket:  # type: ignore[no-redef]
        pass


_B = _base_events.BaseEventLoop


def _debug_from_environment() -> bool:
    # asyncio's own test of PYTHONASYNCIODEBUG and -X dev, looked up at each
    # loop creation as asyncio does (so patching it works the same way).
    is_debug = getattr(asyncio.coroutines, "_is_debug_mode", None)
    if is_debug is not None:
        return bool(is_debug())
    return sys.flags.dev_mode or (
        not sys.flags.ignore_environment and bool(os.environ.get("PYTHONASYNCIODEBUG"))
    )


class Loop(LoopCore, NetworkMixin, asyncio.AbstractEventLoop):  # type: ignore[misc]
    """An asyncio event loop driven by a Tokio current-thread runtime.

    ``anywhere_tasks=True`` makes every task the loop creates (without a
    task factory) await-anywhere capable: synchronous code called by the
    task can use ``tokioloop.await_`` directly, without ``run_anywhere``.
    The default comes from the TOKIOLOOP_ANYWHERE_TASKS environment
    variable ("1" turns it on); it costs a fiber switch per task step.
    """

    def __init__(self, *, anywhere_tasks: bool | None = None) -> None:
        if anywhere_tasks is None:
            anywhere_tasks = os.environ.get("TOKIOLOOP_ANYWHERE_TASKS", "") not in ("", "0")
        self._anywhere_tasks = bool(anywhere_tasks)
        self._debug = _debug_from_environment()
        self._exception_handler: Any = None
        self._current_handle: Any = None
        self._default_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_shutdown_called = False
        self._asyncgens: weakref.WeakSet[Any] = weakref.WeakSet()
        self._asyncgens_shutdown_called = False
        self._coroutine_origin_tracking_enabled = False
        self._coroutine_origin_tracking_saved_depth: int | None = None
        self._old_agen_hooks: Any = None
        self._signal_handlers: dict[int, Handle] = {}
        self._ssock: socket.socket | None = None
        self._csock: socket.socket | None = None
        self._wakeup_restore: int | None = None
        self._wakeup_forward = -1
        self._init_network()
        # A subclass's own time() (a test loop's virtual clock) sets the
        # loop's deadlines, as in asyncio.
        self._refresh_time_hook()

    def __repr__(self) -> str:
        return (
            f"<{self.__class__.__name__} running={self.is_running()} "
            f"closed={self.is_closed()} debug={self.get_debug()}>"
        )

    # ---- running and stopping -------------------------------------------

    _check_closed = _B._check_closed
    _check_running = _B._check_running
    run_until_complete = _B.run_until_complete
    _set_coroutine_origin_tracking = _B._set_coroutine_origin_tracking
    set_debug = _B.set_debug

    def _run_forever_setup(self) -> None:
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        self._old_agen_hooks = sys.get_asyncgen_hooks()
        self._thread_id = threading.get_ident()
        sys.set_asyncgen_hooks(
            firstiter=self._asyncgen_firstiter_hook,
            finalizer=self._asyncgen_finalizer_hook,
        )
        self._install_wakeup_fd()
        _events._set_running_loop(self)

    def _run_forever_cleanup(self) -> None:
        self._stopping = False
        self._thread_id = None
        _events._set_running_loop(None)
        self._restore_wakeup_fd()
        self._set_coroutine_origin_tracking(False)
        if self._old_agen_hooks is not None:
            sys.set_asyncgen_hooks(*self._old_agen_hooks)
            self._old_agen_hooks = None

    def run_forever(self) -> None:
        """Run until stop() is called."""
        # Set up outside the try, as asyncio: a refused run (the loop is
        # already running, or closed) must not tear down the running one's
        # state (the thread's running loop, its wake-up fd, hooks).
        self._run_forever_setup()
        try:
            self._run_forever_native()
        finally:
            self._run_forever_cleanup()

    def close(self) -> None:
        """Close the loop: drop pending callbacks, stop the reactor, shut the
        default executor down without waiting. The loop must not be running."""
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if self._debug:
            logger.debug("Close %r", self)
        if self._signal_handlers:
            if sys.is_finalizing():
                warnings.warn(
                    f"Closing the loop {self!r} on interpreter shutdown "
                    "stage, skipping signal handlers removal",
                    ResourceWarning,
                    stacklevel=2,
                    source=self,
                )
                self._signal_handlers.clear()
            else:
                for sig in list(self._signal_handlers):
                    self.remove_signal_handler(sig)
        self._close_native()
        unwind_abandoned_fibers(self)
        self._close_network()
        self._close_self_pipe()
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        try:
            closed = self.is_closed()
        except Exception:  # half-initialised object
            return
        if not closed:
            _warn(f"unclosed event loop {self!r}", ResourceWarning, source=self)
            if not self.is_running():
                self.close()

    # ---- exceptions, async generators, executor: asyncio's bookkeeping ----

    get_exception_handler = _B.get_exception_handler
    set_exception_handler = _B.set_exception_handler
    default_exception_handler = _B.default_exception_handler
    call_exception_handler = _B.call_exception_handler
    _asyncgen_firstiter_hook = _B._asyncgen_firstiter_hook
    _asyncgen_finalizer_hook = _B._asyncgen_finalizer_hook
    shutdown_asyncgens = _B.shutdown_asyncgens
    set_default_executor = _B.set_default_executor
    shutdown_default_executor = _B.shutdown_default_executor
    _check_default_executor = _B._check_default_executor
    if hasattr(_B, "_do_shutdown"):
        _do_shutdown = _B._do_shutdown

    def run_in_executor(self, executor: Any, func: Callable[..., Any], *args: Any) -> Any:
        self._check_closed()
        if self._debug:
            _B._check_callback(self, func, "run_in_executor")
        if executor is None:
            executor = self._default_executor
            self._check_default_executor()
            if executor is None:
                executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="asyncio")
                self._default_executor = executor
        if isinstance(executor, concurrent.futures.ThreadPoolExecutor):
            # The worker learns which loop started it: await_() there submits
            # to it. (Only threads: a process pool must pickle `func` as is.)
            func = wrap_for_executor(self, func)
        return asyncio.wrap_future(executor.submit(func, *args), loop=self)

    # ---- fd watchers: the public ones refuse fds a transport uses -------

    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self._ensure_fd_no_transport(fd)
        LoopCore.add_reader(self, fd, callback, *args)

    def remove_reader(self, fd: Any) -> bool:
        self._ensure_fd_no_transport(fd)
        return LoopCore.remove_reader(self, fd)

    def add_writer(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self._ensure_fd_no_transport(fd)
        LoopCore.add_writer(self, fd, callback, *args)

    def remove_writer(self, fd: Any) -> bool:
        self._ensure_fd_no_transport(fd)
        return LoopCore.remove_writer(self, fd)

    # ---- DNS --------------------------------------------------------------

    async def getaddrinfo(
        self,
        host: Any,
        port: Any,
        *,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        if not self._debug:
            return await self._getaddrinfo_native(host, port, family, type, proto, flags)
        t0 = self.time()
        result = await self._getaddrinfo_native(host, port, family, type, proto, flags)
        dt = self.time() - t0
        msg = f"Getting address info {host!r}:{port!r} took {dt * 1e3:.3f}ms: {result!r}"
        if dt >= self.slow_callback_duration:
            logger.info(msg)
        else:
            logger.debug(msg)
        return result

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> tuple[str, str]:
        return await self._getnameinfo_native(sockaddr, flags)

    # ---- low-level socket operations -------------------------------------

    def _check_sock(self, sock: Any) -> None:
        if type(sock) is not socket.socket and isinstance(sock, _SSLSocket):
            raise TypeError("Socket cannot be of type SSLSocket")
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")
        if self._transports.data:  # the WeakValueDictionary's dict: cheap to test
            self._ensure_fd_no_transport(sock)

    async def _sock_wait(self, sock: Any, fut: asyncio.Future[Any]) -> Any:
        try:
            return await fut
        except BaseException:
            # Cancelled (a timeout) or interrupted: stop the native operation
            # that would have resolved the future.
            self._sock_abandon(sock, fut)
            raise
        finally:
            # The future holds the exception, whose traceback holds this
            # frame: break the cycle, as asyncio's sock_* methods do.
            fut = None  # type: ignore[assignment]

    async def sock_recv(self, sock: socket.socket, n: int) -> bytes:
        self._check_sock(sock)
        r = self._sock_recv(sock, n)
        if isinstance(r, _Future):
            try:
                return await r
            except BaseException:
                self._sock_abandon(sock, r)
                raise
            finally:
                r = None  # see _sock_wait
        return r

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        self._check_sock(sock)
        r = self._sock_recv_into(sock, buf)
        if isinstance(r, _Future):
            try:
                return await self._sock_wait(sock, r)
            finally:
                r = None  # see _sock_wait
        return r

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, Any]:
        self._check_sock(sock)
        r = self._sock_recvfrom(sock, bufsize)
        if isinstance(r, _Future):
            try:
                return await self._sock_wait(sock, r)
            finally:
                r = None  # see _sock_wait
        return r

    async def sock_recvfrom_into(
        self, sock: socket.socket, buf: Any, nbytes: int = 0
    ) -> tuple[int, Any]:
        self._check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        r = self._sock_recvfrom_into(sock, buf, nbytes)
        if isinstance(r, _Future):
            try:
                return await self._sock_wait(sock, r)
            finally:
                r = None  # see _sock_wait
        return r

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        self._check_sock(sock)
        r = self._sock_sendall(sock, data)
        if r is not None:
            try:
                await r
            except BaseException:
                self._sock_abandon(sock, r)
                raise
            finally:
                r = None

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        self._check_sock(sock)
        r = self._sock_sendto(sock, data, address)
        if isinstance(r, _Future):
            try:
                return await self._sock_wait(sock, r)
            finally:
                r = None  # see _sock_wait
        return r

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (_HAS_IPV6 and sock.family == socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            _, _, _, _, address = resolved[0]
        r = self._sock_connect(sock, address)
        if r is not None:
            try:
                await self._sock_wait(sock, r)
            finally:
                r = None

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        self._check_sock(sock)
        r = self._sock_accept(sock)
        if isinstance(r, _Future):
            try:
                return await self._sock_wait(sock, r)
            finally:
                r = None  # see _sock_wait
        return r

    _ensure_resolved = _B._ensure_resolved

    async def sock_sendfile(
        self,
        sock: socket.socket,
        file: Any,
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool = True,
    ) -> int:
        self._check_sock(sock)
        _check_sendfile_params(sock, file, offset, count)
        try:
            return await self._sock_sendfile_native(sock, file, offset, count)
        except asyncio.SendfileNotAvailableError:
            if not fallback:
                raise
        return await self._sock_sendfile_fallback(sock, file, offset, count)

    async def _sock_sendfile_native(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        if not hasattr(os, "sendfile"):
            raise asyncio.SendfileNotAvailableError("os.sendfile() is not available")
        try:
            fileno = file.fileno()
        except (AttributeError, OSError) as exc:
            raise asyncio.SendfileNotAvailableError("not a regular file") from exc
        try:
            fsize = os.fstat(fileno).st_size
        except OSError as exc:
            raise asyncio.SendfileNotAvailableError("not a regular file") from exc
        blocksize = count if count else fsize
        if not blocksize:
            return 0
        # os.sendfile() takes a C ssize_t (a count meaning "everything", such
        # as 2**64, is sent in blocks, as asyncio does from 3.13 on).
        blocksize = min(blocksize, sys.maxsize // 2 + 1)
        fd = sock.fileno()
        total = 0
        try:
            while True:
                want = min(count - total, blocksize) if count else blocksize
                if want <= 0:
                    break
                try:
                    sent = os.sendfile(fd, fileno, offset + total, want)
                except (BlockingIOError, InterruptedError):
                    await self._wait_fd(fd, writable=True)
                    continue
                except OSError as exc:
                    if total == 0:
                        raise asyncio.SendfileNotAvailableError("os.sendfile call failed") from exc
                    if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                        raise ConnectionError("socket is not connected", errno.ENOTCONN) from exc
                    raise
                if sent == 0:
                    break
                total += sent
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)
        return total

    async def _sock_sendfile_fallback(
        self, sock: socket.socket, file: Any, offset: int, count: int | None
    ) -> int:
        if offset:
            file.seek(offset)
        blocksize = min(count, _SENDFILE_FALLBACK_CHUNK) if count else _SENDFILE_FALLBACK_CHUNK
        buf = bytearray(blocksize)
        total = 0
        try:
            while True:
                if count:
                    blocksize = min(count - total, blocksize)
                    if blocksize <= 0:
                        break
                view = memoryview(buf)[:blocksize]
                read = await self.run_in_executor(None, file.readinto, view)
                if not read:
                    break
                await self.sock_sendall(sock, view[:read])
                total += read
            return total
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)

    def _wait_fd(self, fd: int, *, writable: bool) -> asyncio.Future[None]:
        """A future that completes once `fd` is readable (or writable)."""
        fut = self.create_future()
        add = self.add_writer if writable else self.add_reader
        remove = self.remove_writer if writable else self.remove_reader

        def ready() -> None:
            remove(fd)
            if not fut.done():
                fut.set_result(None)

        add(fd, ready)
        fut.add_done_callback(lambda _f: remove(fd))
        return fut

    # ---- signals ----------------------------------------------------------

    def _ensure_self_pipe(self) -> socket.socket:
        if self._csock is None:
            ssock, csock = socket.socketpair()
            ssock.setblocking(False)
            csock.setblocking(False)
            self._ssock, self._csock = ssock, csock
            self.add_reader(ssock.fileno(), self._read_from_self)
            self._set_self_pipe(ssock.fileno())
        return self._csock

    def _close_self_pipe(self) -> None:
        self._set_self_pipe(-1)
        if self._ssock is not None:
            self._ssock.close()
            self._ssock = None
        if self._csock is not None:
            self._csock.close()
            self._csock = None

    def _read_from_self(self) -> None:
        ssock = self._ssock
        while ssock is not None:
            try:
                data = ssock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            if self._wakeup_forward != -1:
                self._forward_wakeup(data)
            for signum in data:
                if signum:
                    self._handle_signal(signum)

    def _handle_signal(self, sig: int) -> None:
        handle = self._signal_handlers.get(sig)
        if handle is None:
            return
        if handle.cancelled():
            self.remove_signal_handler(sig)
        else:
            self._call_handle_threadsafe(handle)

    def _install_wakeup_fd(self) -> None:
        """While running on the main thread, signals wake the loop (so that
        Ctrl-C interrupts a loop sleeping in Tokio at once).

        A wakeup fd the application installed before (Twisted's reactor hears
        SIGCHLD through one) is not lost: while the loop's is in its place,
        every signal byte is passed on to it, and it is put back afterwards."""
        self._wakeup_restore = None
        if threading.current_thread() is not threading.main_thread():
            return
        csock = self._ensure_self_pipe()
        try:
            old = signal.set_wakeup_fd(csock.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError):
            return
        self._wakeup_restore = old
        if old not in (-1, csock.fileno()):
            self._wakeup_forward = old

    def _forward_wakeup(self, data: bytes) -> None:
        try:
            os.write(self._wakeup_forward, data)
        except OSError:
            # Full (Python itself drops the byte then) or closed by its owner.
            pass

    def _restore_wakeup_fd(self) -> None:
        old, self._wakeup_restore = self._wakeup_restore, None
        if old is None or self._signal_handlers:
            # Signal handlers keep our wakeup fd installed, as asyncio does
            # (and the forwarding to the application's, if any).
            return
        ours = self._csock.fileno() if self._csock is not None else -1
        try:
            current = signal.set_wakeup_fd(old)
            if current not in (-1, ours):
                # Somebody installed another one while the loop ran: theirs stays.
                signal.set_wakeup_fd(current)
        except (ValueError, OSError):
            pass
        # Bytes that came between the last read and the restore.
        self._read_from_self()
        self._wakeup_forward = -1

    def _check_signal(self, sig: Any) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig: int, callback: Callable[..., Any], *args: Any) -> None:
        if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        csock = self._ensure_self_pipe()
        try:
            # Raises ValueError off the main thread: a loop running in
            # another thread cannot handle signals.
            signal.set_wakeup_fd(csock.fileno(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc)) from None
        self._signal_handlers[sig] = self._make_handle(callback, args)
        try:
            signal.signal(sig, _sighandler_noop)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                try:
                    signal.set_wakeup_fd(-1)
                except (ValueError, OSError) as nexc:
                    logger.info("set_wakeup_fd(-1) failed: %s", nexc)
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise

    def remove_signal_handler(self, sig: int) -> bool:
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise
        if not self._signal_handlers and not self.is_running():
            try:
                signal.set_wakeup_fd(-1)
            except (ValueError, OSError) as exc:
                logger.info("set_wakeup_fd(-1) failed: %s", exc)
        return True


def _sighandler_noop(signum: int, frame: Any) -> None:
    """Python-level handler: the real work happens in the loop, woken by the
    byte Python writes to the wakeup fd."""


def _check_sendfile_params(sock: socket.socket, file: Any, offset: Any, count: Any) -> None:
    if "b" not in getattr(file, "mode", "b"):
        raise ValueError("file should be opened in binary mode")
    if not sock.type == socket.SOCK_STREAM:
        raise ValueError("only SOCK_STREAM type sockets are supported")
    if count is not None:
        if not isinstance(count, int):
            raise TypeError(f"count must be a positive integer (got {count!r})")
        if count <= 0:
            raise ValueError(f"count must be a positive integer (got {count!r})")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative integer (got {offset!r})")


def new_event_loop(*, anywhere_tasks: bool | None = None) -> Loop:
    """A new tokioloop event loop (asyncio.new_event_loop's counterpart).

    ``anywhere_tasks``: see :class:`Loop`."""
    return Loop(anywhere_tasks=anywhere_tasks)
