"""Statistics and markdown formatting shared by the core and network suites."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"

NA = "n/a"


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> float | None:
    """Half the range of the samples, relative to their median (0.02 = ±2%);
    None for fewer than two samples."""
    if len(xs) < 2:
        return None
    mid = statistics.median(xs)
    return (max(xs) - min(xs)) / 2 / mid if mid else 0.0


def fmt_rate(x: float) -> str:
    """Operations per second, 3 significant digits with a k/M suffix."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def fmt_us(x: float) -> str:
    if x != x:  # NaN
        return NA
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_spread(s: float | None) -> str:
    if s is None:
        return ""
    return f"±{s * 100:.1f}%" if s >= 0.001 else "±0%"


def fmt_ratio(x: float | None) -> str:
    if x is None or x != x:
        return NA
    return f"{x:.2f}x"


def fmt_size(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A markdown table; columns from index ``right`` on are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i >= right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = [("-" * (w - 1) + ":") if i >= right else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(headers), "| " + " | ".join(rule) + " |", *(line(r) for r in rows)])


def footnotes(reasons: dict[str, str]) -> str:
    if not reasons:
        return ""
    lines = ["", "n/a:"]
    lines += [f"- {key}: {reason}" for key, reason in sorted(reasons.items())]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
    }


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def save_results(kind: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def tail(text: str, lines: int = 3, width: int = 300) -> str:
    """The last non-empty lines of a process's output, on one line."""
    kept = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][-lines:]
    joined = " / ".join(kept)
    return joined if len(joined) <= width else "..." + joined[-width:]
