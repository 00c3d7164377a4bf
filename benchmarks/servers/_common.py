"""Shared start-up for the benchmark servers.

A server script calls :func:`main` with a coroutine that starts serving on
the loop and returns the bound port. The script then prints ``PORT <n>`` on
stdout and serves until it is killed; if the loop is not importable or the
feature is missing (e.g. ``NotImplementedError``) it prints
``UNSUPPORTED <reason>`` instead and exits with status 3, which the harness
shows as "n/a" with that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loops import LoopUnavailable, loop_factory  # noqa: E402

Starter = Callable[[asyncio.AbstractEventLoop, argparse.Namespace], Coroutine[Any, Any, int]]


def tcp_listener(host: str, port: int) -> socket.socket:
    """A listening, non-blocking TCP socket (handed to the loop with ``sock=``
    so that every loop serves the same kind of socket and the port is known)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def udp_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Keep the default report on stderr: the harness shows its tail when a
    # measurement fails.
    loop.default_exception_handler(context)
    sys.stderr.flush()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(
    description: str, start: Starter, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--loop", required=True, help="asyncio, uvloop, rloop or tokioloop")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        loop = loop_factory(args.loop)()
    except LoopUnavailable as exc:
        _say(f"UNSUPPORTED {exc}")
        sys.exit(3)
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_exception_handler)
    try:
        port = loop.run_until_complete(start(loop, args))
    except Exception as exc:
        _say(f"UNSUPPORTED {type(exc).__name__}: {exc}".rstrip(": "))
        sys.exit(3)
    _say(f"PORT {port}")
    try:
        loop.run_forever()
    finally:
        loop.close()
