"""Closing (or dropping) a loop that still has open transports, servers,
handshakes and children: no crash, no hang, the ResourceWarnings asyncio
gives, and every fd released once the garbage collector has run."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import warnings
import weakref
from collections import Counter
from typing import Any

import pytest

import tokioloop

from .conftest import Certs

SCRIPT = os.path.join(os.path.dirname(__file__), "_close_scenarios.py")

DATAGRAM_CYCLE = (
    "DatagramCore (src/transports/datagram.rs) holds strong references to the loop, the "
    "socket, the transport and the protocol but has no __traverse__/__clear__, so the cycle "
    "transport._native <-> DatagramCore.transport is invisible to the GC: a datagram "
    "transport is never freed, its socket is never closed by the finalizer and no "
    "'unclosed transport' ResourceWarning is given"
)
QUEUED_CLOSURE = (
    "Job::Call closures in the ready queue are not visited by LoopCore.__traverse__ "
    "(src/loop/job.rs Job::visit: `Job::Call(_) => Ok(())`): a loop dropped unclosed while "
    "a transport's connection_lost() is queued (here: StreamWriter.__del__ closed the "
    "transport) is never collected: no 'unclosed event loop' warning, and the loop's "
    "epoll/eventfd and every transport's fd leak"
)

PIDFD_LEAK = (
    "closing (or dropping) the loop while a child runs leaks the child's pidfd: "
    "_watch_child (python/tokioloop/_network.py) closes it only in its reader callback, "
    "which never runs once the loop is closed; asyncio 3.11's PidfdChildWatcher does not "
    "leak it (3.12+'s does, so there the two agree)"
)
PRE_312 = sys.version_info < (3, 12)

SCENARIOS = [
    pytest.param("streams_open", id="streams_open"),
    pytest.param(
        "datagram_open",
        id="datagram_open",
        marks=pytest.mark.xfail(strict=True, reason=DATAGRAM_CYCLE),
    ),
    pytest.param("tls_handshake_pending", id="tls_handshake_pending"),
    pytest.param(
        "subprocess_running",
        id="subprocess_running",
        marks=pytest.mark.xfail(PRE_312, strict=True, reason=PIDFD_LEAK),
    ),
    pytest.param(
        "streams_open+drop_loop",
        id="streams_open+drop_loop",
        # StreamWriter.__del__ (3.11+) closes the transport: a closure queued
        marks=pytest.mark.xfail(
            "__del__" in vars(asyncio.StreamWriter), strict=True, reason=QUEUED_CLOSURE
        ),
    ),
    pytest.param(
        "datagram_open+drop_loop",
        id="datagram_open+drop_loop",
        marks=pytest.mark.xfail(strict=True, reason=DATAGRAM_CYCLE),
    ),
    pytest.param("tls_handshake_pending+drop_loop", id="tls_handshake_pending+drop_loop"),
    pytest.param(
        "subprocess_running+drop_loop",
        id="subprocess_running+drop_loop",
        marks=pytest.mark.xfail(PRE_312, strict=True, reason=PIDFD_LEAK),
    ),
]


def _run_scenario(which: str, scenario: str, certs: Certs) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tlc", dir="/tmp") as d:
        proc = subprocess.run(
            [sys.executable, SCRIPT, which, scenario, str(certs.certfile), str(certs.keyfile)],
            capture_output=True,
            timeout=30,  # a hang fails the test
            env={**os.environ, "SCENARIO_TMP": d, "PYTHONWARNINGS": "always"},
        )
    assert proc.returncode == 0, (
        f"{which}/{scenario} exited with {proc.returncode} "
        f"(negative: killed by a signal):\n{proc.stderr.decode()[-4000:]}"
    )
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_close_with_open_transports(scenario: str, certs: Certs) -> None:
    ref = _run_scenario("asyncio", scenario, certs)
    ours = _run_scenario("tokioloop", scenario, certs)
    assert ours["handled"] == ref["handled"]
    # asyncio's pidfd child watcher leaks its pidfd when the loop goes away
    # with the child running (tokioloop's does the same); nothing else may
    # stay open.
    assert [k for k in ours["leaked"] if "pidfd" not in k] == []
    assert ours["leaked"].count("anon_inode:[pidfd]") <= ref["leaked"].count("anon_inode:[pidfd]")
    # Every ResourceWarning asyncio gives, we give. We may give more only
    # for objects asyncio leaks instead (3.13's asyncio keeps a Unix server
    # socket alive forever: no warning, an fd leaked; we warn and close it).
    missing = Counter(ref["warnings"]) - Counter(ours["warnings"])
    extra = Counter(ours["warnings"]) - Counter(ref["warnings"])
    assert not missing, (missing, ref, ours)
    ref_leaks = [k for k in ref["leaked"] if "pidfd" not in k]
    assert sum(extra.values()) == len(ref_leaks), (extra, ref, ours)


@pytest.mark.xfail(strict=True, reason=QUEUED_CLOSURE)
def test_dropped_loop_with_queued_connection_lost_is_collected() -> None:
    """Minimal form of the streams_open+drop_loop failure above."""
    results = {}
    for name, factory in (
        ("asyncio", asyncio.SelectorEventLoop),
        ("tokioloop", tokioloop.new_event_loop),
    ):
        loop = factory()
        a, b = socket.socketpair()
        tr, _ = loop.run_until_complete(loop.create_connection(asyncio.Protocol, sock=a))
        tr.close()  # connection_lost() is now queued
        ref = weakref.ref(loop)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del loop, tr
            gc.collect()
        b.close()
        results[name] = (
            ref() is None,
            sorted(str(w.message).split(" <")[0] for w in caught if w.category is ResourceWarning),
        )
        left = ref()
        if left is not None:
            left.close()
    assert results["asyncio"] == (True, ["unclosed event loop", "unclosed transport"])
    assert results["tokioloop"] == results["asyncio"]
