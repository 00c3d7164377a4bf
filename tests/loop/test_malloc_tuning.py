"""The first loop tunes glibc's malloc so that per-request buffers are not
handed back to the kernel and faulted in again on every request (see
src/loop/malloc.rs): a buffer below 1 MiB then comes from the heap, not
from a fresh mmap. Checked in a fresh interpreter with mallinfo2()."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys

import pytest


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not _has_mallinfo2(),
    reason="the tuning applies to glibc; mallinfo2() is glibc 2.33+",
)

CHILD = r"""
import ctypes, tokioloop

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
loop = tokioloop.new_event_loop()
before = libc.mallinfo2().hblks
p = libc.malloc(900 * 1024)   # a large read buffer
print(libc.mallinfo2().hblks - before)   # 1: a fresh mmap; 0: from the heap
libc.free(p)
loop.close()
"""


def mmapped(**env: str) -> int:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    e.pop("TOKIOLOOP_MALLOC_TUNING", None)
    e.update(env)
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=e, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_buffers_below_1_mib_come_from_the_heap() -> None:
    assert mmapped() == 0


def test_opting_out_leaves_glibc_alone() -> None:
    assert mmapped(TOKIOLOOP_MALLOC_TUNING="0") == 1


def test_user_tuning_is_left_alone() -> None:
    assert mmapped(MALLOC_MMAP_THRESHOLD_="131072") == 1
    assert mmapped(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072") == 1
