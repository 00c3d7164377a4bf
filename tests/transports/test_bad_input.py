"""Refused connections and invalid addresses or arguments: each call is made
on the standard library's loop and on tokioloop in the same test, and must
fail (or succeed) the same way: same exception class, same message (object
reprs aside)."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import re
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ._util import LOOPS, fds_released, free_port, ipv6_available, run_on


@dataclass
class Env:
    closed_port: int
    busy_port: int
    tmpdir: str
    datafile: str
    certs: Any


Case = Callable[[asyncio.AbstractEventLoop, Env], Awaitable[Any]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


def _norm(text: str) -> str:
    """Drop object reprs: their class names differ between the loops (and
    asyncio names a socket used by a transport by its fd number, tokioloop
    by its repr)."""
    prev = None
    while prev != text:
        prev, text = text, re.sub(r"<[^<>]*>", "{obj}", text)
    return re.sub(r"File descriptor (\d+|\{obj\})", "File descriptor {fd}", text)


class P(asyncio.Protocol):
    pass


# ---- sock_* on a closed socket ------------------------------------------


def _closed_socket() -> socket.socket:
    s = socket.socket()
    s.setblocking(False)
    s.close()
    return s


@case
async def sock_recv_closed_socket(loop: Any, env: Env) -> Any:
    return await loop.sock_recv(_closed_socket(), 10)


@case
async def sock_recv_into_closed_socket(loop: Any, env: Env) -> Any:
    return await loop.sock_recv_into(_closed_socket(), bytearray(10))


@case
async def sock_sendall_closed_socket(loop: Any, env: Env) -> Any:
    return await loop.sock_sendall(_closed_socket(), b"data")


@case
async def sock_sendfile_closed_socket(loop: Any, env: Env) -> Any:
    with open(env.datafile, "rb") as f:
        return await loop.sock_sendfile(_closed_socket(), f)


@case
async def sock_recvfrom_closed_socket(loop: Any, env: Env) -> Any:
    if sys.version_info < (3, 11):
        pytest.skip("sock_recvfrom is new in 3.11")
    return await loop.sock_recvfrom(_closed_socket(), 10)


# ---- create_connection -------------------------------------------------


@case
async def connect_closed_port(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", env.closed_port)


@case
async def connect_closed_port_ipv6(loop: Any, env: Env) -> Any:
    if not ipv6_available():
        pytest.skip("no IPv6 loopback")
    return await loop.create_connection(P, "::1", env.closed_port)


@case
async def connect_closed_port_both_families(loop: Any, env: Env) -> Any:
    # host None: getaddrinfo gives ::1 and 127.0.0.1 (in the system's
    # order); both refuse: "Multiple exceptions: ..." in that order
    return await loop.create_connection(P, None, env.closed_port)


@case
async def connect_closed_port_happy_eyeballs(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, None, env.closed_port, happy_eyeballs_delay=0.01)


@case
async def connect_closed_port_all_errors(loop: Any, env: Env) -> Any:
    if sys.version_info < (3, 12):
        pytest.skip("all_errors is new in 3.12")
    try:
        await loop.create_connection(P, None, env.closed_port, all_errors=True)
    except ExceptionGroup as eg:  # noqa: F821 - 3.11+
        raise RuntimeError(f"group of {[type(e).__name__ for e in eg.exceptions]}") from None


@case
async def connect_unknown_host(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "no-such-host.invalid", 80)


@case
async def connect_bad_service_name(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", "no-such-service")


@case
async def connect_port_out_of_range(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", 70000)


@case
async def connect_negative_port(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", -1)


@case
async def connect_port_wrong_type(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", 1.5)


@case
async def connect_host_wrong_type(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, 12345, 80)


@case
async def connect_host_with_nul(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1\0", 80)


@case
async def connect_family_mismatch(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", 80, family=socket.AF_INET6)


@case
async def connect_unbindable_local_addr(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", 80, local_addr=("192.0.2.1", 0))


@case
async def connect_nothing(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P)


@case
async def connect_host_and_sock(loop: Any, env: Env) -> Any:
    with socket.socket() as s:
        return await loop.create_connection(P, "127.0.0.1", 80, sock=s)


@case
async def connect_server_hostname_without_ssl(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", 80, server_hostname="x")


@case
async def connect_handshake_timeout_without_ssl(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", 80, ssl_handshake_timeout=1)


@case
async def connect_ssl_not_a_context(loop: Any, env: Env) -> Any:
    return await loop.create_connection(P, "127.0.0.1", env.busy_port, ssl="yes")


@case
async def connect_datagram_sock(loop: Any, env: Env) -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return await loop.create_connection(P, sock=s)


@case
async def connect_closed_sock(loop: Any, env: Env) -> Any:
    s = socket.socket()
    s.close()
    return await loop.create_connection(P, sock=s)


@case
async def connect_unconnected_sock(loop: Any, env: Env) -> Any:
    """An unconnected TCP socket is accepted (as asyncio does); reading
    from it fails and the protocol learns of it through connection_lost."""
    lost: asyncio.Future[Any] = loop.create_future()

    class Proto(asyncio.Protocol):
        def connection_lost(self, exc: BaseException | None) -> None:
            lost.set_result(exc)

    s = socket.socket()
    tr, _ = await loop.create_connection(Proto, sock=s)
    tr.write(b"data")  # the send fails: the transport closes itself
    exc = await lost
    return type(exc).__name__, getattr(exc, "errno", None), tr.is_closing()


@case
async def unix_connect_missing_path(loop: Any, env: Env) -> Any:
    return await loop.create_unix_connection(P, os.path.join(env.tmpdir, "nope"))


@case
async def unix_connect_not_a_socket(loop: Any, env: Env) -> Any:
    return await loop.create_unix_connection(P, env.datafile)


@case
async def unix_connect_path_too_long(loop: Any, env: Env) -> Any:
    return await loop.create_unix_connection(P, "/tmp/" + "x" * 200)


@case
async def open_connection_refused(loop: Any, env: Env) -> Any:
    return await asyncio.open_connection("127.0.0.1", env.closed_port)


@case
async def open_connection_zero_limit(loop: Any, env: Env) -> Any:
    return await asyncio.open_connection("127.0.0.1", env.busy_port, limit=0)


@case
async def open_unix_connection_missing(loop: Any, env: Env) -> Any:
    return await asyncio.open_unix_connection(os.path.join(env.tmpdir, "nope"))


# ---- create_server -----------------------------------------------------


@case
async def server_port_in_use(loop: Any, env: Env) -> Any:
    return await loop.create_server(P, "127.0.0.1", env.busy_port)


@case
async def server_foreign_address(loop: Any, env: Env) -> Any:
    return await loop.create_server(P, "192.0.2.1", 0)


@case
async def server_unknown_host(loop: Any, env: Env) -> Any:
    return await loop.create_server(P, "no-such-host.invalid", 0)


@case
async def server_bad_service(loop: Any, env: Env) -> Any:
    return await loop.create_server(P, "127.0.0.1", "no-such-service")


@case
async def server_nothing(loop: Any, env: Env) -> Any:
    return await loop.create_server(P)


@case
async def server_datagram_sock(loop: Any, env: Env) -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return await loop.create_server(P, sock=s)


@case
async def server_ssl_true(loop: Any, env: Env) -> Any:
    return await loop.create_server(P, "127.0.0.1", 0, ssl=True)


@case
async def server_handshake_timeout_without_ssl(loop: Any, env: Env) -> Any:
    return await loop.create_server(P, "127.0.0.1", 0, ssl_handshake_timeout=1)


@case
async def server_on_a_closed_sock(loop: Any, env: Env) -> Any:
    s = socket.socket()
    s.close()
    return await loop.create_server(P, sock=s)


@case
async def unix_server_missing_directory(loop: Any, env: Env) -> Any:
    return await loop.create_unix_server(P, os.path.join(env.tmpdir, "no", "dir"))


@case
async def unix_server_path_too_long(loop: Any, env: Env) -> Any:
    return await loop.create_unix_server(P, "/tmp/" + "x" * 200)


@case
async def unix_server_path_and_sock(loop: Any, env: Env) -> Any:
    with socket.socket(socket.AF_UNIX) as s:
        return await loop.create_unix_server(P, os.path.join(env.tmpdir, "a"), sock=s)


@case
async def start_server_port_in_use(loop: Any, env: Env) -> Any:
    return await asyncio.start_server(lambda r, w: None, "127.0.0.1", env.busy_port)


# ---- create_datagram_endpoint ------------------------------------------


class D(asyncio.DatagramProtocol):
    pass


@case
async def datagram_nothing(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(D)


@case
async def datagram_unbindable_local_addr(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(D, local_addr=("192.0.2.1", 0))


@case
async def datagram_unknown_remote_host(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(D, remote_addr=("no-such-host.invalid", 9))


@case
async def datagram_bad_local_service(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(D, local_addr=("127.0.0.1", "no-such-service"))


@case
async def datagram_stream_sock(loop: Any, env: Env) -> Any:
    with socket.socket() as s:
        return await loop.create_datagram_endpoint(D, sock=s)


@case
async def datagram_sock_and_address(loop: Any, env: Env) -> Any:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return await loop.create_datagram_endpoint(D, local_addr=("127.0.0.1", 0), sock=s)


@case
async def datagram_family_mismatch(loop: Any, env: Env) -> Any:
    if not ipv6_available():
        pytest.skip("no IPv6 loopback")
    return await loop.create_datagram_endpoint(
        D, local_addr=("127.0.0.1", 0), remote_addr=("::1", 9)
    )


@case
async def datagram_unix_with_ip_address(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(
        D, local_addr=("127.0.0.1", 0), family=socket.AF_UNIX
    )


@case
async def datagram_reuse_address(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(D, local_addr=("127.0.0.1", 0), reuse_address=True)


@case
async def datagram_address_wrong_shape(loop: Any, env: Env) -> Any:
    return await loop.create_datagram_endpoint(D, local_addr="127.0.0.1")


BAD_SENDTO: dict[str, tuple[Any, Any]] = {
    "text": ("text", ("127.0.0.1", 9)),
    "str_address": (b"x", "not an address"),
    "short_address": (b"x", ("127.0.0.1",)),
    "port_out_of_range": (b"x", ("127.0.0.1", 70000)),
    "unknown_host": (b"x", ("no-such-host.invalid", 9)),
    "no_address": (b"x", None),
    "ipv6_address_on_ipv4": (b"x", ("::1", 9, 0, 0)),
}


def _bad_sendto_case(data: Any, addr: Any) -> Case:
    async def fn(loop: Any, env: Env) -> Any:
        # asyncio: TypeErrors escape, other errors are fatal errors of the
        # transport (exception handler, transport closed)
        tr, _ = await loop.create_datagram_endpoint(D, local_addr=("127.0.0.1", 0))
        try:
            tr.sendto(data, addr)
            await asyncio.sleep(0)
            return tr.is_closing()
        finally:
            tr.close()

    return fn


for _name, (_data, _addr) in BAD_SENDTO.items():
    CASES[f"datagram_sendto_{_name}"] = _bad_sendto_case(_data, _addr)


@case
async def connected_datagram_sendto_other_address(loop: Any, env: Env) -> Any:
    tr, _ = await loop.create_datagram_endpoint(D, remote_addr=("127.0.0.1", env.closed_port))
    try:
        tr.sendto(b"x", ("127.0.0.1", env.busy_port))
    finally:
        tr.close()


# ---- start_tls ---------------------------------------------------------


async def _pair(loop: Any) -> tuple[Any, socket.socket]:
    a, b = socket.socketpair()
    tr, _ = await loop.create_connection(P, sock=a)
    return tr, b


@case
async def start_tls_not_a_context(loop: Any, env: Env) -> Any:
    tr, b = await _pair(loop)
    try:
        return await loop.start_tls(tr, tr.get_protocol(), "not a context")
    finally:
        tr.close()
        b.close()


@case
async def start_tls_datagram_transport(loop: Any, env: Env) -> Any:
    tr, _ = await loop.create_datagram_endpoint(D, local_addr=("127.0.0.1", 0))
    try:
        return await loop.start_tls(tr, tr.get_protocol(), env.certs.client_context())
    finally:
        tr.close()


@case
async def start_tls_closing_transport(loop: Any, env: Env) -> Any:
    tr, b = await _pair(loop)
    tr.close()
    try:
        return await loop.start_tls(
            tr, tr.get_protocol(), env.certs.client_context(), server_hostname="localhost"
        )
    finally:
        b.close()


@case
async def start_tls_peer_closes(loop: Any, env: Env) -> Any:
    tr, b = await _pair(loop)
    b.close()
    return await loop.start_tls(
        tr, tr.get_protocol(), env.certs.client_context(), server_hostname="localhost"
    )


@case
async def start_tls_no_server_hostname(loop: Any, env: Env) -> Any:
    tr, b = await _pair(loop)
    try:
        return await asyncio.wait_for(
            loop.start_tls(tr, tr.get_protocol(), env.certs.client_context()), 0.3
        )
    finally:
        tr.close()
        b.close()


# ---- sendfile ----------------------------------------------------------


async def _sendfile(loop: Any, env: Env, **kw: Any) -> Any:
    tr, b = await _pair(loop)
    mode = kw.pop("mode", "rb")
    file: Any = kw.pop("file", None)
    try:
        if file is None:
            file = open(env.datafile, mode)  # noqa: SIM115
        with file:
            return await loop.sendfile(tr, file, **kw)
    finally:
        tr.close()
        b.close()


@case
async def sendfile_text_file(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, mode="r")


@case
async def sendfile_negative_offset(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, offset=-1)


@case
async def sendfile_float_offset(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, offset=1.5)


@case
async def sendfile_zero_count(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, count=0)


@case
async def sendfile_negative_count(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, count=-5)


@case
async def sendfile_str_count(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, count="10")


@case
async def sendfile_write_only_file(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, mode="ab")


@case
async def sendfile_offset_past_the_end(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, offset=10_000_000)


@case
async def sendfile_not_a_real_file(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, file=io.BytesIO(b"in memory"))


@case
async def sendfile_not_a_real_file_no_fallback(loop: Any, env: Env) -> Any:
    return await _sendfile(loop, env, file=io.BytesIO(b"in memory"), fallback=False)


@case
async def sendfile_closing_transport(loop: Any, env: Env) -> Any:
    tr, b = await _pair(loop)
    tr.close()
    try:
        with open(env.datafile, "rb") as f:
            return await loop.sendfile(tr, f)
    finally:
        b.close()


@case
async def sendfile_datagram_transport(loop: Any, env: Env) -> Any:
    tr, _ = await loop.create_datagram_endpoint(D, remote_addr=("127.0.0.1", env.closed_port))
    try:
        with open(env.datafile, "rb") as f:
            return await loop.sendfile(tr, f)
    finally:
        tr.close()


@case
async def sock_sendfile_transport_socket(loop: Any, env: Env) -> Any:
    # the socket belongs to a transport: asyncio refuses to touch it
    tr, b = await _pair(loop)
    try:
        with open(env.datafile, "rb") as f:
            return await loop.sock_sendfile(tr.get_extra_info("socket")._sock, f)
    finally:
        tr.close()
        b.close()


@pytest.fixture(scope="module")
def env(certs: Any) -> Iterator[Env]:
    with tempfile.TemporaryDirectory(prefix="tlb", dir="/tmp") as d:
        datafile = os.path.join(d, "data.bin")
        with open(datafile, "wb") as f:
            f.write(os.urandom(100_000))
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        try:
            yield Env(free_port(), busy.getsockname()[1], d, datafile, certs)
        finally:
            busy.close()


def _describe(exc: BaseException | None, result: Any) -> tuple[str, str]:
    if exc is None:
        if isinstance(result, tuple) and result and isinstance(result[0], asyncio.BaseTransport):
            result[0].close()
            return "ok", "transport"
        if isinstance(result, asyncio.AbstractServer):
            result.close()
            return "ok", "server"
        return "ok", _norm(repr(result))
    return type(exc).__name__, _norm(str(exc))


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_outcome_as_asyncio(name: str, env: Env) -> None:
    fn = CASES[name]

    async def main(loop: Any) -> tuple[str, str]:
        try:
            result = await fn(loop, env)
        except (asyncio.CancelledError, pytest.skip.Exception):
            raise
        except Exception as exc:  # noqa: BLE001
            return _describe(exc, None)
        out = _describe(None, result)
        await asyncio.sleep(0)  # let closed transports finish
        return out

    with fds_released():
        got = {loop_name: run_on(f, main) for loop_name, f in LOOPS.items()}
    ours, ref = got["tokioloop"].result, got["asyncio"].result
    assert ours == ref, f"tokioloop {ours!r} != asyncio {ref!r}"
    assert _handled(got["tokioloop"].errors) == _handled(got["asyncio"].errors)


def _handled(contexts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What reached the exception handler: message and exception class."""
    return [(str(c.get("message")), type(c.get("exception")).__name__) for c in contexts]


def test_refused_is_connection_refused_error() -> None:
    """The plain fact, on its own: a closed port refuses with
    ConnectionRefusedError (errno ECONNREFUSED) on tokioloop."""
    port = free_port()

    async def main(loop: Any) -> OSError:
        with pytest.raises(ConnectionRefusedError) as ei:
            await loop.create_connection(P, "127.0.0.1", port)
        return ei.value

    exc = run_on(LOOPS["tokioloop"], main).result
    assert exc.errno == errno.ECONNREFUSED


def _odd_payloads() -> dict[str, Any]:
    import array

    return {
        "non_contiguous": memoryview(b"abcdef")[::2],
        "int_items": memoryview(array.array("i", [1, 2, 3])),
        "readonly_view": memoryview(bytearray(b"xyz")).toreadonly(),
        "slice_view": memoryview(b"0123456789")[2:5],
        "empty_view": memoryview(b""),
        "bytearray": bytearray(b"ba"),
        "str": "text",
        "int": 12345,
        "list": [b"in a list"],
        "none": None,
        "writelines_with_str": ("lines", [b"one", bytearray(b"two"), memoryview(b"3"), "4", b"5"]),
        "writelines_ok": ("lines", [b"one", bytearray(b"two"), memoryview(b"three")]),
        "writelines_not_iterable": ("lines", 42),
        "released_view": _released_view(),
    }


def _released_view() -> memoryview:
    m = memoryview(b"released")
    m.release()
    return m


@pytest.mark.parametrize("case", list(_odd_payloads()))
def test_write_odd_payloads(case: str) -> None:
    """write() / writelines() with payloads asyncio sees in the wild, each on
    a fresh connection followed by a marker write: the same exception, the
    same bytes on the wire, the same exception handler calls."""

    async def main(loop: Any) -> tuple[tuple[str, str], bytes, bool]:
        payload = _odd_payloads()[case]
        a, b = socket.socketpair()
        b.setblocking(False)
        tr, _ = await loop.create_connection(P, sock=a)
        try:
            if isinstance(payload, tuple):
                tr.writelines(payload[1])
            else:
                tr.write(payload)
            result = ("ok", "")
        except Exception as exc:  # noqa: BLE001
            result = (type(exc).__name__, str(exc))
        await asyncio.sleep(0)
        tr.write(b"|marker")
        closing = tr.is_closing()
        tr.close()
        received = b""
        while chunk := await loop.sock_recv(b, 65536):
            received += chunk
        b.close()
        return result, received, closing

    with fds_released():
        got = {name: run_on(f, main) for name, f in LOOPS.items()}
    assert got["tokioloop"].result == got["asyncio"].result
    assert _handled(got["tokioloop"].errors) == _handled(got["asyncio"].errors)
