"""tokioloop: a Tokio-driven asyncio event loop for CPython.

import asyncio, tokioloop
asyncio.run(main(), loop_factory=tokioloop.new_event_loop)   # 3.12+
tokioloop.run(main())                                        # any version
"""

from __future__ import annotations

import asyncio as _asyncio
import sys as _sys
import warnings as _warnings
from typing import Any

from ._anywhere import (
    anywhere_task,
    async_context,
    async_iter,
    await_,
    run_anywhere,
    sync_or_async,
)
from ._loop import Loop, new_event_loop
from ._runner import run

__all__ = [
    "Loop",
    "new_event_loop",
    "run",
    "EventLoopPolicy",
    "await_",
    "run_anywhere",
    "anywhere_task",
    "async_context",
    "async_iter",
    "sync_or_async",
]
__version__ = "0.1.0"

_BasePolicy: Any = getattr(_asyncio.events, "BaseDefaultEventLoopPolicy", None)
if _BasePolicy is None:  # Python 3.14+
    _BasePolicy = _asyncio.events._BaseDefaultEventLoopPolicy


class _EventLoopPolicy(_BasePolicy):  # type: ignore[misc, valid-type]
    """An asyncio event loop policy whose loops are tokioloop loops.

    asyncio.set_event_loop_policy(tokioloop.EventLoopPolicy())
    """

    def _loop_factory(self) -> Loop:
        return new_event_loop()


_EventLoopPolicy.__name__ = _EventLoopPolicy.__qualname__ = "EventLoopPolicy"

if _sys.version_info < (3, 14):
    EventLoopPolicy = _EventLoopPolicy
else:

    def __getattr__(name: str) -> Any:
        # Event loop policies are deprecated from 3.14 on, as asyncio's own.
        if name == "EventLoopPolicy":
            _warnings.warn(
                "tokioloop.EventLoopPolicy is deprecated and slated for removal in "
                "Python 3.16, as asyncio's policies are; use "
                "asyncio.run(..., loop_factory=tokioloop.new_event_loop)",
                DeprecationWarning,
                stacklevel=2,
            )
            return _EventLoopPolicy
        raise AttributeError(f"module 'tokioloop' has no attribute {name!r}")
