"""Reprs and log lines for native handles, in asyncio's formats."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import reprlib
from typing import Any

logger = logging.getLogger("asyncio")


def _source(func: Any) -> tuple[str, int] | None:
    func = inspect.unwrap(func)
    if inspect.isfunction(func):
        code = func.__code__
        return code.co_filename, code.co_firstlineno
    if isinstance(func, functools.partial):
        return _source(func.func)
    if isinstance(func, functools.partialmethod):
        return _source(func.func)
    return None


def _args_repr(args: Any, kwargs: Any, debug: bool) -> str:
    show = repr if debug else reprlib.repr
    items: list[str] = []
    if args:
        items.extend(show(a) for a in args)
    if kwargs:
        items.extend(f"{k}={show(v)}" for k, v in kwargs.items())
    return "({})".format(", ".join(items))


def _callback_name(func: Any, args: Any, kwargs: Any, suffix: str, debug: bool) -> str:
    if isinstance(func, functools.partial):
        suffix = _args_repr(args, kwargs, debug) + suffix
        return _callback_name(func.func, func.args, func.keywords, suffix, debug)
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None)
    text = name if isinstance(name, str) and name else repr(func)
    return text + _args_repr(args, kwargs, debug) + suffix


def format_callback(func: Any, args: Any, debug: bool = False) -> str:
    """`qualname(args) at file:line`, as asyncio describes a callback."""
    text = _callback_name(func, args, None, "", debug)
    src = _source(func)
    if src:
        text += f" at {src[0]}:{src[1]}"
    return text


def handle_repr(handle: Any) -> str:
    info = [type(handle).__name__]
    if handle._cancelled:
        info.append("cancelled")
    when = getattr(handle, "_when", None)
    if when is not None:
        info.append(f"when={when}")
    callback = handle._callback
    if callback is not None:
        loop = handle._loop
        debug = bool(loop.get_debug()) if loop is not None else False
        info.append(format_callback(callback, handle._args, debug))
    tb = handle._source_traceback
    if tb:
        frame = tb[-1]
        info.append(f"created at {frame[0]}:{frame[1]}")
    return "<{}>".format(" ".join(info))


def _describe_for_log(handle: Any) -> str:
    # A task's step callback is described by the task, as asyncio does.
    owner = getattr(handle._callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        return repr(owner)
    return str(handle)


def warn_slow_callback(handle: Any, seconds: float) -> None:
    """Debug mode: a callback ran longer than loop.slow_callback_duration."""
    logger.warning("Executing %s took %.3f seconds", _describe_for_log(handle), seconds)
