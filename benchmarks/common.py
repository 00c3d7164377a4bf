"""Harness plumbing shared by the core and network suites: probing loops in a
subprocess, CPU pinning, settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from report import tail

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class LoopInfo:
    name: str
    ok: bool
    version: str = ""
    reason: str = ""


def probe_loop(name: str, python: str = sys.executable) -> LoopInfo:
    """Import and construct the loop in a fresh interpreter (a loop that
    crashes on import is then reported, not fatal)."""
    try:
        proc = subprocess.run(
            [python, str(HERE / "loops.py"), name],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return LoopInfo(name, False, reason="probe timed out after 120 s")
    if proc.returncode != 0:
        return LoopInfo(name, False, reason=describe_exit(proc.returncode, proc.stderr))
    try:
        info: dict[str, Any] = json.loads(proc.stdout)[name]
    except (ValueError, KeyError):
        return LoopInfo(name, False, reason=f"probe printed {proc.stdout!r}")
    if info["ok"]:
        return LoopInfo(name, True, version=str(info["version"]))
    return LoopInfo(name, False, reason=str(info["reason"]))


def describe_exit(returncode: int, stderr: str) -> str:
    """Why a child process failed, for an "n/a" footnote."""
    if returncode < 0:
        import signal

        try:
            what = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            what = f"killed by signal {-returncode}"
    else:
        what = f"exited with status {returncode}"
    detail = tail(stderr)
    return f"{what}: {detail}" if detail else what


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    """A preexec_fn pinning the child (and every thread it starts) to one CPU."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@dataclass
class Settings:
    """What one invocation of run.py asked for."""

    loops: list[str]
    subject: str
    quick: bool = False
    rounds: int = 3
    only: list[str] = field(default_factory=list)
    core_cpu: int | None = None
    server_cpu: int | None = None
    client_cpu: int | None = None
    log: Log = log_stderr

    def selected(self, name: str) -> bool:
        """Whether a row passes the --only filters (substring match)."""
        return not self.only or any(pattern in name for pattern in self.only)
