"""Side-by-side benchmarks of tokioloop against asyncio, uvloop and rloop.

    python benchmarks/run.py [core|net|all] [--loops asyncio,uvloop,rloop,tokioloop] [--quick]

Prints markdown tables (ready for the README) with the exact command line, and
saves the raw results as JSON under benchmarks/results/. See
benchmarks/README.md for what each row measures and how.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import core  # noqa: E402
import net  # noqa: E402
from common import ROOT, Settings, available_cpus, log_stderr, probe_loop  # noqa: E402
from loops import KNOWN_LOOPS  # noqa: E402
from report import git_revision, machine_info, save_results  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark tokioloop side by side with asyncio, uvloop and rloop."
    )
    parser.add_argument("suite", nargs="?", default="all", choices=["core", "net", "all"])
    parser.add_argument(
        "--loops",
        default=",".join(KNOWN_LOOPS),
        help="comma-separated loop names, in column order (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds, not minutes")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SUBSTRING",
        help="run only rows whose name contains this (repeatable), e.g. timers, protocol/1 KiB",
    )
    parser.add_argument(
        "--subject",
        default=None,
        help="loop the ratios are about (default: tokioloop if selected, else the last loop)",
    )
    cpus = available_cpus()
    parser.add_argument(
        "--core-cpu", type=int, default=cpus[-1], help="CPU for core workers (default: %(default)s)"
    )
    parser.add_argument(
        "--server-cpu", type=int, default=cpus[-1], help="CPU for servers (default: %(default)s)"
    )
    parser.add_argument(
        "--client-cpu",
        type=int,
        default=cpus[0],
        help="CPU for the load generator (default: %(default)s)",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write results JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    if not loops:
        print("--loops: no loop named", file=sys.stderr)
        return 2
    subject = args.subject or ("tokioloop" if "tokioloop" in loops else loops[-1])
    if subject not in loops:
        print(f"--subject {subject} is not among --loops", file=sys.stderr)
        return 2
    if args.server_cpu == args.client_cpu and len(available_cpus()) > 1:
        print("note: server and load generator share a CPU", file=sys.stderr)
    settings = Settings(
        loops=loops,
        subject=subject,
        quick=args.quick,
        rounds=max(1, args.rounds),
        only=args.only,
        core_cpu=args.core_cpu,
        server_cpu=args.server_cpu,
        client_cpu=args.client_cpu,
        log=log_stderr,
    )
    command = "python " + shlex.join(
        ["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]
    )
    started = time.monotonic()
    infos = {name: probe_loop(name) for name in loops}
    for info in infos.values():
        shown = info.version if info.ok else f"n/a ({info.reason})"
        log_stderr(f"[loops] {info.name}: {shown}")
    header: dict[str, Any] = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "revision": git_revision(),
        "machine": machine_info(),
        "loops": {n: (i.version if i.ok else None) for n, i in infos.items()},
        "root": str(ROOT),
    }
    sections: list[str] = []
    for suite, module in (("core", core), ("net", net)):
        if args.suite not in (suite, "all"):
            continue
        text, data = module.run(settings, infos)
        sections.append(text)
        if not args.no_save:
            saved: dict[str, Any] = {**header, "suite": suite, **data}
            path = save_results(suite, saved)
            log_stderr(f"[{suite}] results saved to {path.relative_to(ROOT)}")
    elapsed = time.monotonic() - started
    versions = ", ".join(
        f"{n} {i.version}" if i.ok else f"{n} n/a" for n, i in infos.items() if n != "asyncio"
    )
    machine = header["machine"]
    print(f"Command: `{command}` ({elapsed / 60:.1f} min)")
    print()
    print(
        f"CPython {machine['python']}, {versions}; {machine['cpus']} x {machine['cpu']}; "
        f"revision {header['revision']}, {header['date']}."
    )
    for text in sections:
        print()
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
