"""The transport objects protocols see.

They are instances of asyncio's transport classes. The work is done by a
native core (`StreamTransportCore`, Rust) whose hot methods (write,
is_closing, pause/resume_reading, ...) are bound on each instance, so a call
goes straight to Rust. What is left here is asyncio's slow-path
bookkeeping: extra info, reprs, error reporting, servers, finalization.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import stat
import warnings
from asyncio import constants, selector_events, transports, trsock
from typing import Any

from ._tokioloop import DatagramCore, StreamTransportCore

logger = logging.getLogger("asyncio")

_SERVER_TAKES_TRANSPORT = len(inspect.signature(asyncio.Server._attach).parameters) > 1

# Methods of the core exposed as the transport's own: those asyncio's
# transport of the same kind has (a read pipe cannot write; a write pipe's
# pause_reading() is the abstract one that raises NotImplementedError).
_READING = ("is_reading", "pause_reading", "resume_reading")
_WRITING = (
    "write",
    "writelines",
    "get_write_buffer_size",
    "get_write_buffer_limits",
    "set_write_buffer_limits",
)
_COMMON = ("is_closing", "get_protocol", "close")


class _NativeStreamTransport:
    """Shared by the socket and pipe transports below."""

    _core: StreamTransportCore
    _kind = "socket"
    _server: Any = None
    _bound: tuple[str, ...] = _COMMON + _READING + _WRITING

    def _setup(
        self,
        loop: Any,
        fileobj: Any,
        fd: int,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None,
        server: Any = None,
    ) -> None:
        self._loop = loop
        self._fileobj = fileobj
        self._fd = fd
        self._server = server
        core = StreamTransportCore(loop, fileobj, fd, protocol, self, self._kind)
        self._core = core
        for name in self._bound:
            setattr(self, name, getattr(core, name))
        if server is not None:
            if _SERVER_TAKES_TRANSPORT:
                server._attach(self)
            else:
                server._attach()
        loop._transports[fd] = self
        # As asyncio: connection_made first, then reading, then the waiter.
        loop.call_soon(protocol.connection_made, self)
        core._start()
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._core.set_protocol(protocol)

    def abort(self) -> None:
        self._core._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        self._core._force_close(exc)

    def _copy_context(self) -> Any:
        # For start_tls(): a copy of the context the protocol's callbacks run in.
        return self._core._copy_context()

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        # As asyncio: OSErrors (resets, broken pipes) are logged in debug mode
        # only; anything else goes to the exception handler.
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._core.get_protocol(),
                }
            )
        self._core._force_close(exc)

    def _log_eof(self) -> None:
        if self._kind == "socket":
            logger.debug("%r received EOF", self)
        else:
            logger.info("%r was closed by peer", self)

    def _connection_lost_done(self) -> None:
        """Called by the core once connection_lost() ran and the fd is closed."""
        server, self._server = self._server, None
        if server is not None:
            if _SERVER_TAKES_TRANSPORT:
                server._detach(self)
            else:
                server._detach()
        self._fileobj = None
        self._loop = None

    def _make_empty_waiter(self) -> asyncio.Future[None]:
        return self._core._make_empty_waiter()

    def _reset_empty_waiter(self) -> None:
        self._core._reset_empty_waiter()

    @property
    def _closing(self) -> bool:
        return bool(self._core.is_closing())

    @property
    def _conn_lost(self) -> int:
        return int(self._core._conn_lost)

    @property
    def _protocol(self) -> Any:
        return self._core.get_protocol()

    @property
    def _paused(self) -> bool:
        return bool(self._core._paused)

    @property
    def _protocol_paused(self) -> bool:
        return bool(self._core._protocol_paused)

    @property
    def _high_water(self) -> int:
        return int(self._core.get_write_buffer_limits()[1])

    @property
    def _low_water(self) -> int:
        return int(self._core.get_write_buffer_limits()[0])

    def __repr__(self) -> str:
        if "_core" not in self.__dict__:
            # Its construction failed (an fd epoll refuses): reprs of it in
            # tracebacks and debuggers must not raise.
            return f"<{self.__class__.__name__} not set up>"
        if self._kind != "socket":
            return self._pipe_repr()
        info = [self.__class__.__name__]
        if self._core._closed:
            info.append("closed")
        elif self._core.is_closing():
            info.append("closing")
        info.append(f"fd={self._fd}")
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._core._closed:
            reading, writing = self._core._polling()
            if self._kind not in ("write_pipe", "write_tty"):
                info.append("read=polling" if reading else "read=idle")
            if self._kind != "read_pipe":
                state = "polling" if writing else "idle"
                info.append(f"write=<{state}, bufsize={self._core.get_write_buffer_size()}>")
        return "<{}>".format(" ".join(info))

    def _pipe_repr(self) -> str:
        info = [self.__class__.__name__]
        closed = self._core._closed
        if closed:
            info.append("closed")
        elif self._core.is_closing():
            info.append("closing")
        info.append(f"fd={self._fd}")
        loop = self._loop
        if not closed and loop is not None and not loop.is_closed():
            if self._kind == "read_pipe":
                reading, _ = self._core._polling()
                info.append("polling" if reading else "idle")
            else:
                _, writing = self._core._polling()
                info.append("polling" if writing else "idle")
                info.append(f"bufsize={self._core.get_write_buffer_size()}")
        else:
            info.append("closed" if closed else "open")
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn: Any = warnings.warn) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core._closed:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            core._close_now()


class SocketTransport(_NativeStreamTransport, transports._FlowControlMixin):
    """TCP and Unix stream sockets."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
    ) -> None:
        asyncio.Transport.__init__(self, extra)  # the mixin's own state lives in the core
        self._extra["socket"] = trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        if "peername" not in self._extra:
            try:
                self._extra["peername"] = sock.getpeername()
            except OSError:
                self._extra["peername"] = None
        _set_nodelay(sock)
        self._sock = sock
        self._sock_fd = sock.fileno()
        self._setup(loop, sock, sock.fileno(), protocol, waiter, server)

    def write_eof(self) -> None:
        self._core.write_eof()

    def can_write_eof(self) -> bool:
        return True


class ReadPipeTransport(_NativeStreamTransport, asyncio.ReadTransport):
    _kind = "read_pipe"
    _bound = _COMMON + _READING

    def __init__(
        self,
        loop: Any,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        asyncio.ReadTransport.__init__(self, extra)
        self._extra["pipe"] = pipe
        fd, _ = _check_pipe(pipe, read=True)
        self._pipe = pipe
        self._fileno = fd
        self._setup(loop, pipe, fd, protocol, waiter)


class WritePipeTransport(_NativeStreamTransport, transports._FlowControlMixin):
    _kind = "write_pipe"
    _bound = _COMMON + _WRITING

    def __init__(
        self,
        loop: Any,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        asyncio.Transport.__init__(self, extra)  # the mixin's own state lives in the core
        self._extra["pipe"] = pipe
        fd, is_chr = _check_pipe(pipe, read=False)
        self._pipe = pipe
        self._fileno = fd
        # A pipe or socket reports the reader going away as readable; a tty
        # reports input that way, so it is not watched.
        self._kind = "write_tty" if is_chr else "write_pipe"
        self._setup(loop, pipe, fd, protocol, waiter)

    def write_eof(self) -> None:
        # A pipe's end of file is its close.
        self._core.close()

    def can_write_eof(self) -> bool:
        return True


def _check_pipe(pipe: Any, *, read: bool) -> tuple[int, bool]:
    """The pipe's fd (made non-blocking) and whether it is a character
    device (a tty), as asyncio's pipe transports check them."""
    fd = pipe.fileno()
    mode = os.fstat(fd).st_mode
    is_chr = stat.S_ISCHR(mode)
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or is_chr):
        if read:
            raise ValueError("Pipe transport is for pipes/sockets only.")
        raise ValueError("Pipe transport is only for pipes, sockets and character devices")
    os.set_blocking(fd, False)
    return fd, is_chr


def _set_nodelay(sock: socket.socket) -> None:
    if (
        hasattr(socket, "TCP_NODELAY")
        and sock.family in (socket.AF_INET, socket.AF_INET6)
        and sock.type == socket.SOCK_STREAM
        and sock.proto == socket.IPPROTO_TCP
    ):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _set_result_unless_cancelled(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)


class DatagramTransport(selector_events._SelectorDatagramTransport):
    """UDP and Unix datagram sockets: asyncio's own datagram transport for
    this Python version, with receiving and unbuffered sends done natively."""

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: asyncio.DatagramProtocol,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        try:
            connected = sock.getpeername() is not None
        except OSError:
            connected = False
        self._native = DatagramCore(loop, sock, self, protocol, connected)
        super().__init__(loop, sock, protocol, address, waiter, extra)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        # In the transport's context, as the stream transports and uvloop do
        # (asyncio: the context of whoever called close()).
        self._native.call_in_context(super()._call_connection_lost, exc)

    def set_protocol(self, protocol: Any) -> None:
        super().set_protocol(protocol)
        native = getattr(self, "_native", None)
        if native is not None:
            native.set_protocol(protocol)

    def _add_reader(self, fd: int, callback: Any, *args: Any) -> None:
        # Not is_reading(): 3.10's datagram transport has no pause/resume, so
        # its is_reading() is the abstract one that raises.
        if self._closing or getattr(self, "_paused", False):
            return
        if callback == self._read_ready and not args:
            self._native.start()
        else:
            self._loop._add_reader(fd, callback, *args)

    def sendto(self, data: Any, addr: Any = None) -> None:
        if (
            self._conn_lost
            and not self._address
            and isinstance(data, (bytes, bytearray, memoryview))
        ):
            # asyncio (3.10-3.13) fails here with an AttributeError from its
            # released socket; count it as asyncio counts a connected
            # endpoint's sends after close.
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer and not self._conn_lost:
            if self._address:
                if addr not in (None, self._address):
                    raise ValueError(f"Invalid address: must be None or {self._address}")
                if self._native.try_sendto(data, None):
                    return
            elif self._native.try_sendto(data, addr):
                return
        super().sendto(data, addr)
