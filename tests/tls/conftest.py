"""Fixtures for the TLS tests.

Every test runs on tokioloop and on the standard library's loop, so that
each expectation written here is checked against asyncio's own behaviour as
well. Certificates are CPython's test certificates (Lib/test), used in place.
"""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

import tokioloop

try:
    from test.test_asyncio import utils as _aio_test_utils
except ImportError:  # pragma: no cover - an interpreter without its tests
    pytest.skip(
        "CPython's test package (its test certificates) is not installed",
        allow_module_level=True,
    )

PY311 = sys.version_info >= (3, 11)

ONLYCERT: str = _aio_test_utils.ONLYCERT
ONLYKEY: str = _aio_test_utils.ONLYKEY
SIGNED_CERTFILE: str = _aio_test_utils.SIGNED_CERTFILE  # CN=localhost, signed by SIGNING_CA
SIGNING_CA: str = _aio_test_utils.SIGNING_CA

LOOPS = ["tokioloop", "asyncio"]


def server_context(certfile: str = ONLYCERT, keyfile: str | None = ONLYKEY) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def client_context(*, verify: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(SIGNING_CA)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Handled:
    """What reached the loop's exception handler."""

    def __init__(self) -> None:
        self.contexts: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.contexts.append(context)


@pytest.fixture(scope="session", autouse=True)
def _process_wide_state() -> None:
    """Things made once per process (Tokio's signal driver, the stdlib's
    ssl module state) are made before any test counts file descriptors."""
    for make in (tokioloop.new_event_loop, asyncio.new_event_loop):
        lp = make()
        try:

            async def serve(lp: asyncio.AbstractEventLoop = lp) -> None:
                srv = await lp.create_server(asyncio.Protocol, "127.0.0.1", 0)
                srv.close()
                await srv.wait_closed()

            lp.run_until_complete(serve())
        finally:
            lp.close()


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def loop(loop_name: str) -> Iterator[asyncio.AbstractEventLoop]:
    gc.collect()
    fds = open_fds()
    lp = tokioloop.new_event_loop() if loop_name == "tokioloop" else asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    try:
        yield lp
    finally:
        asyncio.set_event_loop(None)
        if not lp.is_closed():
            # Let closing transports finish (connection_lost, fds closed).
            for _ in range(5):
                lp.run_until_complete(asyncio.sleep(0.01))
            lp.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        assert open_fds() <= fds, f"fd leak: {fds} -> {open_fds()}"


@pytest.fixture
def handled(loop: asyncio.AbstractEventLoop) -> Handled:
    h = Handled()
    loop.set_exception_handler(h)
    return h


def needs_new_sslproto(loop_name: str) -> None:
    """Skip the standard library's side of a test on Python 3.10, whose
    asyncio has the SSL protocol of old. tokioloop has the 3.11+ one on
    every version: on 3.10 it differs from asyncio where these tests look
    (eof_received() on close_notify, error messages)."""
    if loop_name == "asyncio" and not PY311:
        pytest.skip("Python 3.10's asyncio has the pre-3.11 SSL protocol")


def run(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = 30.0) -> Any:
    """Run `coro` on `loop`, failing (not hanging) after `timeout` seconds."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))
