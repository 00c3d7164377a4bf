"""Run uvloop's own TLS tests in place against tokioloop.

    python tests/tls/uvloop_suite.py TESTS_DIR [--as-native] [unittest args...]

TESTS_DIR is the `tests` directory of an unpacked uvloop source
distribution (`pip download --no-binary :all: --no-deps uvloop==0.23.0`);
its test_tcp.py and test_unix.py need pyOpenSSL. The asyncio variants of the
SSL classes (`Test_AIO_TCPSSL`, `Test_AIO_UnixSSL`) are run with their loop
made by tokioloop. With --as-native their `implementation` attribute is not
'asyncio', which also runs the tests uvloop skips for asyncio (handshake and
shutdown timeouts, corrupted data, ...) and holds tokioloop to uvloop's
expectations there. Nothing is copied: the modules are imported from
TESTS_DIR (with the uvloop package installed, for uvloop._testbase).
"""

from __future__ import annotations

import asyncio
import sys
import unittest
from typing import Any


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    tests_dir = argv[1]
    rest = argv[2:]
    native = "--as-native" in rest
    rest = [a for a in rest if a != "--as-native"]

    from uvloop import _testbase as tb

    import tokioloop

    class Policy(asyncio.DefaultEventLoopPolicy):  # type: ignore[misc, valid-type]
        def _loop_factory(self) -> Any:
            return tokioloop.new_event_loop()

    tb.AIOTestCase.new_loop = lambda self: tokioloop.new_event_loop()  # type: ignore[method-assign]
    tb.AIOTestCase.new_policy = lambda self: Policy()  # type: ignore[method-assign]
    if native:
        tb.AIOTestCase.implementation = "tokioloop"  # type: ignore[attr-defined]

    sys.path.insert(0, tests_dir)
    import test_tcp  # type: ignore[import-not-found]
    import test_unix  # type: ignore[import-not-found]

    loader = unittest.TestLoader()
    names = [a for a in rest if not a.startswith("-")]
    flags = [a for a in rest if a.startswith("-")]
    if names:
        suite = loader.loadTestsFromNames(names)
    else:
        suite = unittest.TestSuite(
            [
                loader.loadTestsFromTestCase(test_tcp.Test_AIO_TCPSSL),
                loader.loadTestsFromTestCase(test_unix.Test_AIO_UnixSSL),
            ]
        )
    verbosity = 2 if "-v" in flags else 1
    result = unittest.TextTestRunner(verbosity=verbosity).run(suite)
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main(sys.argv)
