"""Subprocesses: children that exit before their output is read, children
killed while we write to them, and many short-lived children in a row."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
from typing import Any

from ._util import LOOPS, exc_name, fds_released, on_both, run_on

PY = sys.executable


def zombies() -> list[int]:
    """Our children in state Z (exited, not reaped)."""
    out = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == me and state == "Z":
            out.append(int(name))
    return out


class Recorder(asyncio.SubprocessProtocol):
    def __init__(self, done: asyncio.Future[None]) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.data: dict[int, bytes] = {1: b"", 2: b""}
        self.done = done

    def connection_made(self, transport: Any) -> None:
        self.events.append(("made",))

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.data[fd] += data

    def pipe_connection_lost(self, fd: int, exc: BaseException | None) -> None:
        self.events.append(("pipe_lost", fd, exc_name(exc)))

    def process_exited(self) -> None:
        self.events.append(("exited",))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append(("lost", exc_name(exc)))
        self.done.set_result(None)


def test_child_exits_before_its_pipes_are_read() -> None:
    """The child writes (less than a pipe holds) and exits; we only start
    reading after its exit was reported. Everything is still there, the
    returncode is right, and the protocol sees asyncio's event order."""
    out_len, err_len = 60_000, 3_000
    code = (
        f"import sys, os;os.write(1, b'o' * {out_len}); os.write(2, b'e' * {err_len}); sys.exit(7)"
    )

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        # high level: wait() first, read afterwards
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        rc = await proc.wait()
        out = await proc.stdout.read()  # type: ignore[union-attr]
        err = await proc.stderr.read()  # type: ignore[union-attr]

        # low level: the protocol's view
        done: asyncio.Future[None] = loop.create_future()
        tr, proto = await loop.subprocess_exec(lambda: Recorder(done), PY, "-c", code, stdin=None)
        await done
        low_rc = tr.get_returncode()
        tr.close()
        events = proto.events
        # the order of the two pipes' EOFs and the exit may vary; connection
        # lost comes last, once, after everything else
        return {
            "rc": rc,
            "out": len(out),
            "err": len(err),
            "low_rc": low_rc,
            "low_data": (len(proto.data[1]), len(proto.data[2])),
            "first": events[0],
            "last": events[-1],
            "middle": sorted(events[1:-1]),
        }

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ours == ref
    assert ours["rc"] == 7 and ours["low_rc"] == 7
    assert (ours["out"], ours["err"]) == (out_len, err_len)
    assert ours["low_data"] == (out_len, err_len)
    assert ours["last"] == ("lost", "None")
    assert ours["middle"] == [("exited",), ("pipe_lost", 1, "None"), ("pipe_lost", 2, "None")]
    assert zombies() == []


def test_child_killed_while_we_write_to_its_stdin() -> None:
    """The child never reads its stdin; we queue a megabyte for it and kill
    it. drain() raises the broken pipe, the stdin pipe's protocol gets
    connection_lost with it, the returncode is -SIGKILL."""
    code = "import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(30)"

    async def main(loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", code, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        assert await proc.stdout.readline() == b"ready\n"  # type: ignore[union-attr]
        stdin: Any = proc.stdin
        stdin.write(b"z" * (1 << 20))  # more than the pipe holds
        buffered = stdin.transport.get_write_buffer_size()
        proc.kill()
        try:
            await stdin.drain()
            drained = "ok"
        except (BrokenPipeError, ConnectionResetError) as exc:
            drained = type(exc).__name__
        rc = await proc.wait()
        after_kill = []
        for _ in range(3):
            stdin.write(b"more")  # dropped silently, as asyncio
            try:
                await stdin.drain()
                after_kill.append("ok")
            except (BrokenPipeError, ConnectionResetError) as exc:
                after_kill.append(type(exc).__name__)

        # low level: what the stdin pipe's protocol is told
        done: asyncio.Future[None] = loop.create_future()
        tr, proto = await loop.subprocess_exec(
            lambda: Recorder(done),
            PY,
            "-c",
            "import time; time.sleep(30)",
            stdout=None,
            stderr=None,
        )
        tr.get_pipe_transport(0).write(b"z" * (1 << 20))
        tr.kill()
        await done
        tr.close()
        return {
            "buffered": buffered > 0,
            "drained": drained,
            "rc": rc,
            "after_kill": after_kill,
            "pipe_events": sorted(e for e in proto.events if e[0] == "pipe_lost"),
            "low_rc": tr.get_returncode(),
        }

    with fds_released():
        runs = on_both(main)
    ours, ref = runs["tokioloop"].result, runs["asyncio"].result
    assert ours["buffered"] and ours["rc"] == -signal.SIGKILL
    assert ours["drained"] in {"BrokenPipeError", "ConnectionResetError"}
    assert ours["low_rc"] == -signal.SIGKILL
    assert ours["pipe_events"] == [("pipe_lost", 0, "BrokenPipeError")]
    assert ours == ref
    assert zombies() == []


def test_many_short_lived_children() -> None:
    """200 children one after the other and 50 at once: right exit codes,
    output read, no zombie and no fd left behind."""

    async def main(loop: asyncio.AbstractEventLoop) -> list[int]:
        codes = []
        for i in range(200):
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                f"echo {i}; exit {i % 5}",
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            assert out == b"%d\n" % i
            codes.append(proc.returncode)  # type: ignore[arg-type]

        async def one(i: int) -> int:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", f"exit {i % 7}", stdin=asyncio.subprocess.DEVNULL
            )
            return await proc.wait()

        codes += await asyncio.gather(*(one(i) for i in range(50)))
        return codes

    with fds_released():
        run = run_on(LOOPS["tokioloop"], main, timeout=30)
    assert run.result == [i % 5 for i in range(200)] + [i % 7 for i in range(50)]
    assert run.errors == []
    assert zombies() == []


def test_communicate_a_large_payload_both_ways() -> None:
    """stdin -> child -> stdout with 8 MiB: the write pipe's flow control
    and the read pipe together."""
    payload = os.urandom(8 << 20)

    async def main(loop: asyncio.AbstractEventLoop) -> tuple[int, bytes, int]:
        proc = await asyncio.create_subprocess_exec(
            "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate(payload)
        return len(out), hashlib.sha256(out).digest(), proc.returncode  # type: ignore[return-value]

    with fds_released():
        run = run_on(LOOPS["tokioloop"], main)
    assert run.result == (len(payload), hashlib.sha256(payload).digest(), 0)


def test_child_exits_with_our_stdin_pipe_idle() -> None:
    """We keep the child's stdin open and idle; the child exits. asyncio
    reports pipe_connection_lost(0), process_exited(), connection_lost()."""

    async def main(loop: asyncio.AbstractEventLoop) -> list[tuple[Any, ...]]:
        done: asyncio.Future[None] = loop.create_future()
        tr, proto = await loop.subprocess_exec(
            lambda: Recorder(done), PY, "-c", "pass", stdout=None, stderr=None
        )
        try:
            await asyncio.wait_for(asyncio.shield(done), 1)  # asyncio: at once
        finally:
            tr.close()
        return sorted(proto.events)

    runs = on_both(main)
    assert runs["asyncio"].result == [
        ("exited",),
        ("lost", "None"),
        ("made",),
        ("pipe_lost", 0, "None"),
    ]
    assert runs["tokioloop"].result == runs["asyncio"].result
