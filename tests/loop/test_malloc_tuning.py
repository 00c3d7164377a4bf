"""The first loop tunes glibc's malloc so that per-request buffers are not
handed back to the kernel and faulted in again on every request (see
src/loop/malloc.rs): a buffer below 1 MiB then comes from the heap, not
from a fresh mmap, and a trim of the heap leaves 16 MiB in place. Checked
in a fresh interpreter with mallinfo2()."""

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


# A burst of 100 KiB buffers freed newest first: the free space gathers at the
# top of the heap, past the trim threshold. keepcost is what stays there. How
# much of the burst lands at the top (rather than in holes the imports left)
# depends on the heap's history: ~16 MiB stay when the package was compiled
# from source at import, ~7 MiB when it was loaded from .pyc files.
BURST = (
    CHILD.split("loop = tokioloop")[0]
    + r"""
loop = tokioloop.new_event_loop()
blocks = [libc.malloc(100 * 1024) for _ in range(100)]
for b in blocks:
    ctypes.memset(b, 1, 100 * 1024)
for b in reversed(blocks):
    libc.free(b)
print(libc.mallinfo2().keepcost // 1024)
loop.close()
"""
)


def _child(code: str, **env: str) -> int:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    e.pop("TOKIOLOOP_MALLOC_TUNING", None)
    e.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def mmapped(**env: str) -> int:
    return _child(CHILD, **env)


def test_buffers_below_1_mib_come_from_the_heap() -> None:
    assert mmapped() == 0


def test_opting_out_leaves_glibc_alone() -> None:
    assert mmapped(TOKIOLOOP_MALLOC_TUNING="0") == 1


def test_user_tuning_is_left_alone() -> None:
    assert mmapped(MALLOC_MMAP_THRESHOLD_="131072") == 1
    assert mmapped(GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072") == 1


def test_a_trim_keeps_16_mib_of_heap() -> None:
    """10 MiB freed at the top of the heap stay there (glibc alone would
    trim all but 128 KiB of it, and fault it in again on the next burst)."""
    assert _child(BURST) >= 4 * 1024
    assert _child(BURST, TOKIOLOOP_MALLOC_TUNING="0") < 1024
    assert _child(BURST, MALLOC_TOP_PAD_="0") < 1024
