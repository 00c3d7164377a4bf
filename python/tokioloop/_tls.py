"""TLS for tokioloop: the Python face of the native SSL protocol layer.

`SSLProtocol` is what the socket transport below talks to: the native core
(`SSLProtocolCore`, Rust, src/transports/tls.rs) that runs asyncio's SSL
state machine, made an `asyncio.BufferedProtocol`. `_SSLProtocolTransport`
is what the application sees: an `asyncio.Transport` whose hot methods
(write, is_closing, get_extra_info, ...) are bound methods of the core, so
a call goes straight to Rust.

The loop builds them in `_make_ssl_transport` (create_connection,
create_server, connect_accepted_socket, create_unix_*) and in `start_tls`.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import warnings
from asyncio import constants, protocols, transports
from typing import Any

from ._tokioloop import SSLProtocolCore

_PY311 = sys.version_info >= (3, 11)


class SSLProtocol(SSLProtocolCore, protocols.BufferedProtocol):  # type: ignore[misc]
    """asyncio's SSL protocol, native. Arguments as asyncio.sslproto.SSLProtocol's."""

    max_size = 256 * 1024

    def __init__(self, loop: Any, *args: Any, **kwargs: Any) -> None:
        # The state is set up by the core's constructor; the application
        # transport exists from the start, as in asyncio.
        self._set_app_transport(_SSLProtocolTransport(loop, self))


class _SSLProtocolTransport(transports._FlowControlMixin, transports.Transport):
    """The transport a TLS connection's application protocol is given."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.FALLBACK

    _ssl_protocol: Any

    def __init__(self, loop: Any, ssl_protocol: SSLProtocol) -> None:
        self._loop = loop
        self._ssl_protocol = ssl_protocol
        # The hot paths: the core's methods, bound on the instance.
        d = self.__dict__
        for name, native in _NATIVE:
            d[name] = getattr(ssl_protocol, native)

    def _detach(self) -> None:
        # A second close() lets go of the protocol (as asyncio's), so that an
        # application protocol keeping its transport keeps nothing else.
        d = self.__dict__
        for name, _ in _NATIVE:
            d.pop(name, None)
        self._ssl_protocol = None

    # The methods below are also what the class itself offers (for code
    # that calls them through the class); instances use the bound ones.

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._ssl_protocol._get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._ssl_protocol._set_app_protocol(protocol)

    def get_protocol(self) -> Any:
        return self._ssl_protocol._app_protocol

    def is_closing(self) -> bool:
        return self._closed

    @property
    def _closed(self) -> bool:
        proto = self._ssl_protocol
        return True if proto is None else bool(proto._app_closed)

    @_closed.setter
    def _closed(self, value: bool) -> None:
        if self._ssl_protocol is not None:
            self._ssl_protocol._app_closed = value

    def close(self) -> None:
        """Flush what was written, shut TLS down, then close the connection;
        the protocol's connection_lost(None) follows."""
        proto = self._ssl_protocol
        if proto is not None and not proto._app_close():
            self._detach()

    def is_reading(self) -> bool:
        return bool(self._ssl_protocol._app_is_reading())

    def pause_reading(self) -> None:
        self._ssl_protocol._pause_reading()

    def resume_reading(self) -> None:
        self._ssl_protocol._resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._ssl_protocol._set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._ssl_protocol._get_write_buffer_limits()  # type: ignore[no-any-return]

    def get_write_buffer_size(self) -> int:
        return int(self._ssl_protocol._get_write_buffer_size())

    def set_read_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._ssl_protocol._set_read_buffer_limits(high, low)

    def get_read_buffer_limits(self) -> tuple[int, int]:
        return self._ssl_protocol._get_read_buffer_limits()  # type: ignore[no-any-return]

    def get_read_buffer_size(self) -> int:
        return int(self._ssl_protocol._get_read_buffer_size())

    @property
    def _protocol_paused(self) -> bool:  # type: ignore[override]
        # The sendfile fallback reads it.
        return bool(self._ssl_protocol._app_writing_paused)

    def write(self, data: Any) -> None:
        self._ssl_protocol._app_write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._ssl_protocol._app_writelines(list_of_data)

    def write_eof(self) -> None:
        """TLS transports cannot half-close: NotImplementedError, as asyncio."""
        raise NotImplementedError

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        """Close at once: buffered data is lost; connection_lost(None) follows."""
        self._ssl_protocol._abort(None)

    def _copy_context(self) -> Any:
        return self._ssl_protocol._copy_context()

    def _force_close(self, exc: BaseException | None) -> None:
        self._ssl_protocol._abort(exc)

    def _test__append_write_backlog(self, data: bytes) -> None:
        # asyncio's own tests fill the backlog through this.
        self._ssl_protocol._test__append_write_backlog(data)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        proto = self.__dict__.get("_ssl_protocol")
        if proto is None or proto._app_closed:
            return
        if _PY311:
            proto._app_closed = True
            _warn("unclosed transport <asyncio._SSLProtocolTransport object>", ResourceWarning)
        else:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self.close()


# (transport method, core method) bound on each transport instance.
_NATIVE = (
    ("write", "_app_write"),
    ("writelines", "_app_writelines"),
    ("is_closing", "_app_is_closing"),
    ("get_extra_info", "_get_extra_info"),
    ("is_reading", "_app_is_reading"),
    ("pause_reading", "_pause_reading"),
    ("resume_reading", "_resume_reading"),
    ("get_write_buffer_size", "_get_write_buffer_size"),
)

_UNSET: Any = object()


async def start_tls(
    self: Any,
    transport: asyncio.BaseTransport,
    protocol: asyncio.BaseProtocol,
    sslcontext: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = _UNSET,
) -> asyncio.Transport:
    """loop.start_tls(): upgrade `transport` to TLS on the native protocol.

    Returns the new transport `protocol` is to use from now on.
    """
    if ssl_shutdown_timeout is _UNSET:
        ssl_shutdown_timeout = None
    elif not _PY311:
        raise TypeError("start_tls() got an unexpected keyword argument 'ssl_shutdown_timeout'")
    if not isinstance(sslcontext, ssl.SSLContext):
        raise TypeError(
            f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
        )
    if not getattr(transport, "_start_tls_compatible", False):
        raise TypeError(f"transport {transport!r} is not supported by start_tls()")

    waiter = self.create_future()
    tls = SSLProtocol(
        self,
        protocol,
        sslcontext,
        waiter,
        server_side,
        server_hostname,
        call_connection_made=False,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout,
    )
    # No data may reach the TLS protocol before its connection_made(): stop
    # reading while the protocol is swapped, start again right after.
    transport.pause_reading()  # type: ignore[attr-defined]
    transport.set_protocol(tls)
    # The TLS layer runs the application's callbacks in the context the
    # transport runs its protocol's in (as uvloop), not start_tls()'s caller's.
    copy_context = getattr(transport, "_copy_context", None)
    context = copy_context() if copy_context is not None else None
    made = self.call_soon(tls.connection_made, transport, context=context)
    resumed = self.call_soon(transport.resume_reading)  # type: ignore[attr-defined]
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    return tls._app_transport  # type: ignore[no-any-return]
