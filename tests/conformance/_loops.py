"""The event loops the conformance runners can measure, and how each one is created."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, cast


class LoopUnavailable(RuntimeError):
    pass


def _stdlib_default_policy() -> type[asyncio.AbstractEventLoopPolicy]:
    # 3.14 deprecates the public name; the private one is what asyncio itself instantiates there
    if sys.platform == "win32":
        from asyncio import windows_events as platform_events
    else:
        from asyncio import unix_events as platform_events
    private = getattr(platform_events, "_DefaultEventLoopPolicy", None)
    if isinstance(private, type):
        return private
    return cast(type[asyncio.AbstractEventLoopPolicy], asyncio.DefaultEventLoopPolicy)


# The stdlib's default policy class, captured before a runner replaces it.
STDLIB_DEFAULT_POLICY: type[asyncio.AbstractEventLoopPolicy] = _stdlib_default_policy()


class LoopChoice:
    """Creates loops of the measured implementation and counts how many were made, so that the
    report can tell tests that ran on the chosen loop from tests that never created one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.created = 0
        factory: Callable[[], asyncio.AbstractEventLoop]
        loop_class: type[Any]
        if name == "asyncio":
            # what asyncio.new_event_loop() makes by default on this platform
            loop_class = STDLIB_DEFAULT_POLICY._loop_factory  # type: ignore[attr-defined]
            factory = loop_class
        elif name == "uvloop":
            try:
                import uvloop
            except ImportError as exc:
                raise LoopUnavailable(f"uvloop is not installed: {exc}") from exc
            factory = uvloop.new_event_loop
            loop_class = uvloop.Loop
        elif name == "tokioloop":
            try:
                import tokioloop
            except ImportError as exc:
                raise LoopUnavailable(f"tokioloop is not importable: {exc}") from exc
            missing = [n for n in ("new_event_loop", "Loop") if not hasattr(tokioloop, n)]
            if missing:
                raise LoopUnavailable(
                    f"tokioloop ({tokioloop.__file__}) does not provide {', '.join(missing)} yet"
                )
            factory = tokioloop.new_event_loop
            loop_class = tokioloop.Loop
        else:
            raise LoopUnavailable(f"unknown loop {name!r}")
        self._factory = factory
        self.loop_class = loop_class

    def new_loop(self) -> asyncio.AbstractEventLoop:
        self.created += 1
        return self._factory()

    def note_created(self) -> None:
        """For loops made some other way (e.g. an instance of a subclass of loop_class)."""
        self.created += 1


def check_available(name: str) -> str | None:
    """None if the loop can be created in this interpreter, else why not."""
    try:
        choice = LoopChoice(name)
        loop = choice.new_loop()
        loop.close()
    except LoopUnavailable as exc:
        return str(exc)
    except Exception as exc:  # a broken build: say so instead of failing every test
        return f"creating a {name} loop failed: {type(exc).__name__}: {exc}"
    return None


def install_default_policy(choice: LoopChoice) -> None:
    """Make asyncio's *default* policy produce the chosen loop.

    The policy keeps the stdlib's semantics (get_event_loop, set_event_loop, child watchers);
    only the loops it creates change. test_asyncio modules reset the policy with
    ``asyncio.set_event_loop_policy(None)`` in tearDownModule and in many tests; that re-creates
    ``asyncio.DefaultEventLoopPolicy()``, which is why the class itself is replaced.
    """
    base = STDLIB_DEFAULT_POLICY

    class ConformancePolicy(base):  # type: ignore[valid-type,misc]
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return choice.new_loop()

    ConformancePolicy.__qualname__ = f"ConformancePolicy[{choice.name}]"
    if sys.platform == "win32":
        from asyncio import windows_events as platform_events
    else:
        from asyncio import unix_events as platform_events
    # every name asyncio may instantiate its default policy from (3.14: the private one)
    for owner in (asyncio, platform_events):
        for name in ("DefaultEventLoopPolicy", "_DefaultEventLoopPolicy"):
            if name in vars(owner):
                setattr(owner, name, ConformancePolicy)
    asyncio.set_event_loop_policy(None)


def own_policy_class(choice: LoopChoice) -> type[asyncio.AbstractEventLoopPolicy]:
    """The measured loop's *own* policy class (uvloop.EventLoopPolicy,
    tokioloop.EventLoopPolicy; asyncio's default policy for asyncio), subclassed so that the
    loops it creates are counted."""
    base: type[asyncio.AbstractEventLoopPolicy]
    if choice.name == "tokioloop":
        import tokioloop

        base = getattr(tokioloop, "EventLoopPolicy", None)  # type: ignore[assignment]
        if base is None:
            raise LoopUnavailable("tokioloop does not provide EventLoopPolicy yet")
    elif choice.name == "uvloop":
        import uvloop

        base = uvloop.EventLoopPolicy
    else:
        base = STDLIB_DEFAULT_POLICY

    class CountingPolicy(base):  # type: ignore[valid-type,misc]
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return choice.new_loop()

    CountingPolicy.__qualname__ = f"{base.__qualname__}[counted]"
    return CountingPolicy
