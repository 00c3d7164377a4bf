"""Select an event loop implementation by name.

Every benchmark process (core workers and network servers) creates its loop
through :func:`loop_factory`, so a loop is chosen the same way everywhere and
an unavailable one is reported with a reason instead of crashing the run.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

#: Names accepted by ``--loops`` / ``--loop``, in table column order.
KNOWN_LOOPS: tuple[str, ...] = ("asyncio", "uvloop", "rloop", "tokioloop")
#: Also accepted (not run by default): tokioloop with await-anywhere tasks
#: on, and tokioloop that never spins before sleeping (TOKIOLOOP_SPIN_US=0).
VARIANT_LOOPS: tuple[str, ...] = ("tokioloop-anywhere", "tokioloop-nospin")
#: ``tokioloop@DIR``: the tokioloop package found in DIR (say a copy of
#: python/ built at another revision), for A/B runs of two builds side by side.


class LoopUnavailable(Exception):
    """The named loop cannot be used here; ``str(exc)`` says why."""


def _module_factory(module_name: str) -> LoopFactory:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a broken native module
        raise LoopUnavailable(f"import {module_name} failed: {type(exc).__name__}: {exc}")
    factory = getattr(module, "new_event_loop", None)
    if not callable(factory):
        raise LoopUnavailable(f"{module_name} has no new_event_loop()")
    return factory  # type: ignore[no-any-return]


def loop_factory(name: str) -> LoopFactory:
    """Return a callable creating a fresh loop of the named implementation.

    The loop is created and closed once here, so that a loop which imports but
    cannot be constructed is reported as unavailable up front.
    """
    if name == "asyncio":
        factory: LoopFactory = asyncio.SelectorEventLoop
    elif name in ("uvloop", "rloop", "tokioloop"):
        factory = _module_factory(name)
    elif name == "tokioloop-anywhere":
        # tokioloop with await-anywhere tasks (every task step on a fiber)
        base = _module_factory("tokioloop")

        def factory() -> asyncio.AbstractEventLoop:
            return base(anywhere_tasks=True)  # type: ignore[call-arg]
    elif name == "tokioloop-nospin":
        # read once, when the process makes its first tokioloop loop
        os.environ["TOKIOLOOP_SPIN_US"] = "0"
        factory = _module_factory("tokioloop")
    elif name.startswith("tokioloop@"):
        where = os.path.abspath(name.split("@", 1)[1])
        sys.path.insert(0, where)
        factory = _module_factory("tokioloop")
        origin = getattr(sys.modules["tokioloop"], "__file__", None) or ""
        if not os.path.abspath(origin).startswith(where + os.sep):
            raise LoopUnavailable(f"tokioloop was imported from {origin}, not from {where}")
    else:
        known = ", ".join(KNOWN_LOOPS + VARIANT_LOOPS + ("tokioloop@DIR",))
        raise LoopUnavailable(f"unknown loop {name!r} (known: {known})")
    try:
        probe = factory()
    except Exception as exc:
        raise LoopUnavailable(f"{name}.new_event_loop() failed: {type(exc).__name__}: {exc}")
    if not isinstance(probe, asyncio.AbstractEventLoop):
        raise LoopUnavailable(f"{name}.new_event_loop() returned {type(probe).__name__}")
    probe.close()
    return factory


def loop_version(name: str) -> str:
    """A version string for the results file ("?" if unknown)."""
    if name == "asyncio":
        return sys.version.split()[0]
    name = name.split("@")[0].split("-")[0]
    try:
        module = importlib.import_module(name)
    except Exception:
        return "unavailable"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(name)
        except Exception:
            version = "?"
    return str(version)


def run_with_loop(
    name: str, main: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, T]]
) -> T:
    """Create the named loop, make it current, run ``main(loop)`` (a coroutine
    factory) to completion, then close the loop."""
    factory = loop_factory(name)
    loop = factory()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main(loop))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def probe(name: str) -> dict[str, Any]:
    """Whether the named loop can be used here, with its version or the reason."""
    try:
        loop_factory(name)
    except LoopUnavailable as exc:
        return {"ok": False, "reason": str(exc)}
    return {"ok": True, "version": loop_version(name)}


if __name__ == "__main__":
    # `python loops.py NAME...` prints one JSON object per loop: the harness
    # probes loops in a subprocess, so a loop that crashes on import cannot
    # take the harness down with it.
    import json

    print(json.dumps({name: probe(name) for name in sys.argv[1:]}))
