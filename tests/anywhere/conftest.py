"""Shared fixtures for the await-anywhere tests."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

import tokioloop
import tokioloop._anywhere  # noqa: F401  (registers await_'s fallback)

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop_factory() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(_uvloop_factory, id="uvloop"),
    pytest.param(tokioloop.new_event_loop, id="tokioloop"),
]


@pytest.fixture(params=LOOPS)
def loop_factory(request: pytest.FixtureRequest) -> LoopFactory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def run(loop_factory: LoopFactory) -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    """run(coro) on a fresh loop of each kind; closes it afterwards."""
    loops: list[asyncio.AbstractEventLoop] = []

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        loop = loop_factory()
        loops.append(loop)
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        finally:
            asyncio.set_event_loop(None)

    yield runner
    for loop in loops:
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def run_py(
    code: str, timeout: float = 60, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run code in a fresh interpreter; (returncode, stdout, stderr)."""
    import os

    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    p = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    return p.returncode, p.stdout, p.stderr


class Unraisables:
    """Collects sys.unraisablehook reports."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __call__(self, u: Any) -> None:
        self.items.append((u.exc_type, str(u.exc_value), u.object))

    def messages(self) -> list[str]:
        return [m for _, m, _ in self.items]


@pytest.fixture
def unraisables(monkeypatch: pytest.MonkeyPatch) -> Unraisables:
    u = Unraisables()
    monkeypatch.setattr(sys, "unraisablehook", u)
    return u
