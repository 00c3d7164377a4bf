from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Iterator

import pytest

import tokioloop


@pytest.fixture
def loop() -> Iterator[tokioloop.Loop]:
    lp = tokioloop.new_event_loop()
    asyncio.set_event_loop(lp)
    try:
        yield lp
    finally:
        asyncio.set_event_loop(None)
        if not lp.is_closed():
            lp.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    after = open_fds()
    assert after <= before, f"fd leak: {before} -> {after}"


PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
PY313 = sys.version_info >= (3, 13)
