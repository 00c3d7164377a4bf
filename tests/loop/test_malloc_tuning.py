"""The first loop tunes glibc's malloc so that per-request buffers are not
handed back to the kernel and faulted in again on every request (see
src/loop/malloc.rs). Measured by minor page faults in a fresh interpreter."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only"
)

CHILD = r"""
import resource, tokioloop
loop = tokioloop.new_event_loop()
def churn():
    for _ in range(300):
        # Buffers below glibc's default mmap threshold (128 KiB), as a
        # stream's reads: they come from the top of the heap, and freeing
        # them leaves more than 128 KiB free there.
        bufs = [bytearray(100 * 1024) for _ in range(4)]
        for b in bufs:
            b[::4096] = b"x" * len(b[::4096])  # touched, as a read would
        del bufs, b
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
loop.close()
"""


def faults(**env: str) -> int:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    e.pop("TOKIOLOOP_MALLOC_TUNING", None)
    e.update(env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=e, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_buffers_are_not_faulted_in_again_per_use() -> None:
    tuned = faults()
    untuned = faults(TOKIOLOOP_MALLOC_TUNING="0")
    # Untuned, the heap top is trimmed after each round and faulted in again.
    assert untuned > 300 * 20, untuned
    assert tuned < untuned / 20, (tuned, untuned)


def test_user_tuning_is_left_alone() -> None:
    assert faults(MALLOC_MMAP_THRESHOLD_="131072") > 300 * 20
