"""Networking, pipes and subprocesses for tokioloop.Loop.

The argument handling and the connection set-up of the public methods
(create_connection with happy eyeballs, create_server, create_unix_*,
create_datagram_endpoint, connect_accepted_socket, start_tls, sendfile,
connect_*_pipe, subprocess_*) are the standard library's own functions for
the running Python version, so they behave as asyncio's argument by
argument. They build transports through the `_make_*_transport` methods
below, which is where tokioloop plugs in its native transports.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import selectors
import socket
import threading
import weakref
from asyncio import base_events, selector_events, unix_events
from typing import Any

from . import _tls
from ._tokioloop import LoopCore
from ._transports import (
    DatagramTransport,
    ReadPipeTransport,
    SocketTransport,
    WritePipeTransport,
)

logger = logging.getLogger("asyncio")

_B = base_events.BaseEventLoop
_S = selector_events.BaseSelectorEventLoop
_U = unix_events._UnixSelectorEventLoop


class _SelectorView:
    """`loop._selector` for code that inspects it (asyncio's own transport
    reprs and a few tests): answers get_key() from the loop's watchers."""

    def __init__(self, loop: Any) -> None:
        self._loop = weakref.ref(loop)

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        loop = self._loop()
        if loop is None or loop.is_closed():
            raise KeyError(fileobj)
        fd = selectors._fileobj_to_fd(fileobj)  # type: ignore[attr-defined]
        events = 0
        if loop._has_watcher(fd, "r"):
            events |= selectors.EVENT_READ
        if loop._has_watcher(fd, "w"):
            events |= selectors.EVENT_WRITE
        if not events:
            raise KeyError(f"{fileobj!r} is not registered")
        return selectors.SelectorKey(fileobj, fd, events, None)


class NetworkMixin:
    """Loop methods for transports. Mixed into tokioloop.Loop."""

    _transports: weakref.WeakValueDictionary[int, Any]
    _unix_server_sockets: dict[socket.socket, int]

    def _init_network(self) -> None:
        self._transports = weakref.WeakValueDictionary()
        self._unix_server_sockets = {}
        self._selector = _SelectorView(self)
        # pidfds of children still running (closed with the loop).
        self._child_pidfds: set[int] = set()

    def _close_network(self) -> None:
        """Loop closing: release what child watching holds (the reactor
        has already dropped its readers)."""
        while self._child_pidfds:
            os.close(self._child_pidfds.pop())

    # ---- the standard library's slow paths ------------------------------

    create_connection = _B.create_connection
    _connect_sock = _B._connect_sock
    _create_connection_transport = _B._create_connection_transport
    create_server = _B.create_server
    _create_server_getaddrinfo = _B._create_server_getaddrinfo
    connect_accepted_socket = _B.connect_accepted_socket
    create_datagram_endpoint = _B.create_datagram_endpoint
    start_tls = _tls.start_tls
    sendfile = _B.sendfile
    _sendfile_fallback = _B._sendfile_fallback
    _sendfile_native = _S._sendfile_native
    connect_read_pipe = _B.connect_read_pipe
    connect_write_pipe = _B.connect_write_pipe
    subprocess_exec = _B.subprocess_exec
    subprocess_shell = _B.subprocess_shell
    _log_subprocess = _B._log_subprocess
    create_unix_connection = _U.create_unix_connection
    if "cleanup_socket" in inspect.signature(_U.create_unix_server).parameters:
        create_unix_server = _U.create_unix_server
    else:

        async def create_unix_server(
            self,
            protocol_factory: Any,
            path: Any = None,
            *,
            cleanup_socket: bool = False,
            **kwargs: Any,
        ) -> Any:
            """asyncio's create_unix_server() for this version, plus 3.13's
            cleanup_socket= (off by default here: before 3.13 asyncio never
            removes the socket file)."""
            server = await _U.create_unix_server(self, protocol_factory, path, **kwargs)
            if cleanup_socket:
                for sock in server._sockets:
                    name = sock.getsockname()
                    if name and name[0] not in (0, "\x00"):
                        try:
                            self._unix_server_sockets[sock] = os.stat(name).st_ino
                        except FileNotFoundError:
                            pass
            return server

    _start_serving = _S._start_serving
    _accept_connection = _S._accept_connection
    _accept_connection2 = _S._accept_connection2
    _ensure_fd_no_transport = _S._ensure_fd_no_transport
    if hasattr(_B, "_check_sendfile_params"):
        _check_sendfile_params = _B._check_sendfile_params

    # asyncio's internal watcher API (no transport check), used above
    _add_reader = LoopCore.add_reader
    _remove_reader = LoopCore.remove_reader
    _add_writer = LoopCore.add_writer
    _remove_writer = LoopCore.remove_writer

    def _stop_serving(self, sock: socket.socket) -> None:
        path = sock.getsockname() if sock in self._unix_server_sockets else None
        self._remove_reader(sock.fileno())
        sock.close()
        if path is not None:
            prev_ino = self._unix_server_sockets.pop(sock)
            try:
                if os.stat(path).st_ino == prev_ino:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)

    # ---- transports -------------------------------------------------------

    def _make_socket_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        *,
        extra: dict[str, Any] | None = None,
        server: Any = None,
    ) -> SocketTransport:
        self._ensure_fd_no_transport(sock)
        return SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_ssl_transport(
        self,
        rawsock: socket.socket,
        protocol: asyncio.BaseProtocol,
        sslcontext: Any,
        waiter: asyncio.Future[Any] | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
        call_connection_made: bool = True,
    ) -> asyncio.Transport:
        # TLS is the native SSL protocol (tokioloop._tls) between the socket
        # transport and the application's protocol.
        self._ensure_fd_no_transport(rawsock)
        ssl_protocol = _tls.SSLProtocol(
            self,
            protocol,
            sslcontext,
            waiter,
            server_side,
            server_hostname,
            call_connection_made=call_connection_made,
            ssl_handshake_timeout=ssl_handshake_timeout,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        SocketTransport(self, rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport  # type: ignore[no-any-return]

    def _make_datagram_transport(
        self,
        sock: socket.socket,
        protocol: asyncio.BaseProtocol,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.DatagramTransport:
        self._ensure_fd_no_transport(sock)
        return DatagramTransport(self, sock, protocol, address, waiter, extra)  # type: ignore[arg-type]

    def _make_read_pipe_transport(
        self,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ReadPipeTransport:
        return ReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(
        self,
        pipe: Any,
        protocol: asyncio.BaseProtocol,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> WritePipeTransport:
        return WritePipeTransport(self, pipe, protocol, waiter, extra)

    async def _make_subprocess_transport(
        self,
        protocol: asyncio.BaseProtocol,
        args: Any,
        shell: bool,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        bufsize: int,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> asyncio.SubprocessTransport:
        waiter = self.create_future()  # type: ignore[attr-defined]
        transp = unix_events._UnixSubprocessTransport(
            self,  # type: ignore[arg-type]
            protocol,  # type: ignore[arg-type]
            args,
            shell,
            stdin,
            stdout,
            stderr,
            bufsize,
            waiter=waiter,
            extra=extra,
            **kwargs,
        )
        _watch_child(self, transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp


def _watch_child(loop: Any, pid: int, transp: Any) -> None:
    """Call transp._process_exited(returncode) on the loop when `pid` exits:
    through a pidfd watched by the loop where the kernel has them, else
    from a thread blocked in waitpid (asyncio's two strategies)."""

    def exited(status: int) -> None:
        returncode = os.waitstatus_to_exitcode(status)
        if loop._debug:
            logger.debug("process %s exited with returncode %s", pid, returncode)
        transp._process_exited(returncode)

    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
    if pidfd >= 0:

        def on_pidfd() -> None:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 255 << 8  # reaped elsewhere: unknown status, as asyncio
                logger.warning(
                    "child process pid %d exit status already read:  will report returncode 255",
                    pid,
                )
            if got == 0:
                return
            loop._remove_reader(pidfd)
            loop._child_pidfds.discard(pidfd)
            os.close(pidfd)
            exited(status)

        try:
            loop._add_reader(pidfd, on_pidfd)
        except BaseException:
            os.close(pidfd)
            raise
        loop._child_pidfds.add(pidfd)
        return

    def wait_thread() -> None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 255 << 8
            logger.warning("Unknown child process pid %d, will report returncode 255", pid)
        if loop.is_closed():
            logger.warning("Loop %r that handles pid %r is closed", loop, pid)
            return
        loop.call_soon_threadsafe(exited, status)

    threading.Thread(target=wait_thread, name=f"waitpid-{pid}", daemon=True).start()
