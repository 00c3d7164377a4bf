"""Measure C stack use per recursion level on a fiber, per call path.

Recurses LEVELS levels through each path inside a fiber, reads the stack
pointer and the interpreter's recursion counters at the bottom, and prints
bytes of C stack per level, recursion-limit units per level and (3.12+) C
recursion units per level. The fiber layer's BYTES_PER_LEVEL (src/fiber/
mod.rs) must stay above the largest "bytes/unit" printed here.

    python benchmarks/anywhere/measure_stack.py
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import re
import sqlite3
import sys
from collections.abc import Callable
from typing import Any

from tokioloop import _tokioloop as T

LEVELS = 40


def probe() -> tuple[int, int, int]:
    return T._fiber_sp(), T._fiber_py_depth(), T._fiber_c_remaining()


def path_pure(n: int) -> Any:
    return probe() if n == 0 else path_pure(n - 1)


def path_map(n: int) -> Any:
    return probe() if n == 0 else list(map(path_map, [n - 1]))[0]


def path_sorted(n: int) -> Any:
    out: list[Any] = []
    if n == 0:
        return probe()
    sorted([0], key=lambda _: out.append(path_sorted(n - 1)) or 0)
    return out[0]


def path_filter(n: int) -> Any:
    out: list[Any] = []
    if n == 0:
        return probe()
    list(filter(lambda _: out.append(path_filter(n - 1)), [0]))
    return out[0]


def path_reduce(n: int) -> Any:
    if n == 0:
        return probe()
    return functools.reduce(lambda a, b: path_reduce(n - 1), [0, 1])


class Init:
    def __init__(self, n: int) -> None:
        self.r = probe() if n == 0 else Init(n - 1).r


def path_init(n: int) -> Any:
    return Init(n).r


class GetAttr:
    def __init__(self, n: int) -> None:
        self.n = n

    def __getattr__(self, name: str) -> Any:
        return probe() if self.n == 0 else GetAttr(self.n - 1).value


def path_getattr(n: int) -> Any:
    return GetAttr(n).value


class Hash:
    def __init__(self, n: int) -> None:
        self.n = n

    def __hash__(self) -> int:
        self.r = probe() if self.n == 0 else path_hash(self.n - 1)
        return 1


def path_hash(n: int) -> Any:
    h = Hash(n)
    _ = {h: 1}
    return h.r


class Call:
    def __call__(self, n: int) -> Any:
        return probe() if n == 0 else Call()(n - 1)


def path_call(n: int) -> Any:
    return Call()(n)


class With:
    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> Any:
        return probe() if self.n == 0 else path_with(self.n - 1)

    def __exit__(self, *a: object) -> None:
        pass


def path_with(n: int) -> Any:
    with With(n) as r:
        return r


def path_gen(n: int) -> Any:
    def g() -> Any:
        yield probe() if n == 0 else path_gen(n - 1)

    return next(g())


def path_json(n: int) -> Any:
    out: list[Any] = []

    def default(o: object) -> int:
        out.append(probe() if n == 0 else path_json(n - 1))
        return 0

    json.dumps(object(), default=default)
    return out[0]


def path_re(n: int) -> Any:
    out: list[Any] = []

    def repl(m: re.Match[str]) -> str:
        out.append(probe() if n == 0 else path_re(n - 1))
        return ""

    re.sub("a", repl, "a")
    return out[0]


_db = sqlite3.connect(":memory:")
_out: list[Any] = []


def _sql_fn(n: int) -> int:
    _out.append(probe() if n == 0 else path_sqlite(n - 1))
    return 0


_db.create_function("rec", 1, _sql_fn)


def path_sqlite(n: int) -> Any:
    _db.execute("select rec(?)", (n,)).fetchone()
    return _out.pop()


_libc = ctypes.CDLL(ctypes.util.find_library("c"))
_CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def path_ctypes(n: int) -> Any:
    out: list[Any] = []

    def cmp(a: int, b: int) -> int:
        if not out:
            out.append(probe() if n == 0 else path_ctypes(n - 1))
        return 0

    arr = (ctypes.c_int * 2)(1, 2)
    cb = _CMP(cmp)
    _libc.qsort(arr, 2, ctypes.sizeof(ctypes.c_int), cb)
    return out[0]


PATHS: dict[str, Callable[[int], Any]] = {
    "pure python": path_pure,
    "map()": path_map,
    "sorted(key=)": path_sorted,
    "filter()": path_filter,
    "functools.reduce": path_reduce,
    "class __init__": path_init,
    "__getattr__": path_getattr,
    "dict __hash__": path_hash,
    "__call__": path_call,
    "with __enter__": path_with,
    "generator next()": path_gen,
    "json default=": path_json,
    "re.sub callback": path_re,
    "sqlite3 function": path_sqlite,
    "ctypes callback": path_ctypes,
}


def measure(fn: Callable[[int], Any]) -> tuple[float, float, float]:
    def body() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        top = probe()
        return top, fn(LEVELS)

    top, leaf = T.Fiber(body).switch()
    dsp = (top[0] - leaf[0]) / LEVELS
    ddepth = (leaf[1] - top[1]) / LEVELS
    dc = (top[2] - leaf[2]) / LEVELS if top[2] >= 0 else float("nan")
    return dsp, ddepth, dc


def main() -> None:
    info = T.fiber_info()
    print(f"Python {sys.version.split()[0]}; fiber stack {info['stack_size'] >> 10} KiB, ")
    print(f"C budget {info['c_budget']} (thread default {info['c_default']})")
    header = ("path", "bytes/level", "limit units", "C units", "bytes/unit")
    print(f"{header[0]:18s} {header[1]:>12s} {header[2]:>12s} {header[3]:>8s} {header[4]:>11s}")
    worst = 0.0
    for name, fn in PATHS.items():
        dsp, ddepth, dc = measure(fn)
        units = dc if dc == dc else ddepth  # 3.12+: C units; else the shared limit
        per_unit = dsp / units if units else 0.0
        worst = max(worst, per_unit)
        print(f"{name:18s} {dsp:12.0f} {ddepth:12.2f} {dc:8.2f} {per_unit:11.0f}")
    print(f"worst bytes per counted unit: {worst:.0f}")


if __name__ == "__main__":
    main()
