"""Run CPython's own asyncio test modules in place against a chosen loop.

    python tests/tls/cpython_suite.py LOOP MODULE [unittest args...]

LOOP is `tokioloop` or `asyncio` (the stdlib loop, for comparison); MODULE is
a test module name such as `test.test_asyncio.test_ssl`. With `tokioloop`,
both the event loop policy and `asyncio.SelectorEventLoop` (which several
test classes construct directly) give tokioloop loops. Nothing of the tests
is copied: they are imported from the interpreter's own Lib/test.
"""

from __future__ import annotations

import asyncio
import sys
import unittest
from typing import Any


def _use_tokioloop() -> None:
    import tokioloop

    class Policy(asyncio.DefaultEventLoopPolicy):  # type: ignore[misc, valid-type]
        # The Unix default policy (its child-watcher API is what some test
        # classes set up), making tokioloop loops.
        def _loop_factory(self) -> Any:
            return tokioloop.new_event_loop()

    asyncio.set_event_loop_policy(Policy())

    def selector_event_loop(selector: Any = None) -> Any:
        return tokioloop.new_event_loop()

    asyncio.SelectorEventLoop = selector_event_loop  # type: ignore[misc, assignment]
    asyncio.unix_events.SelectorEventLoop = selector_event_loop  # type: ignore[misc, assignment]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] not in ("tokioloop", "asyncio"):
        sys.exit(__doc__)
    if argv[1] == "tokioloop":
        _use_tokioloop()
    unittest.main(module=argv[2], argv=[argv[0], *argv[3:]])


if __name__ == "__main__":
    main(sys.argv)
