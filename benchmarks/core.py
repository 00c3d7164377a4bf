"""Loop-core suite: every benchmark of core_worker.py, for every loop, each in a
fresh process pinned to one CPU, in interleaved rounds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from common import HERE, LoopInfo, Settings, describe_exit, pin_to
from report import (
    NA,
    fmt_rate,
    fmt_ratio,
    fmt_spread,
    footnotes,
    markdown_table,
    median,
    spread,
)

#: benchmark name (core_worker.BENCHMARKS) -> row label
ROWS: dict[str, str] = {
    "call_soon_chained": "call_soon chained (callbacks/s)",
    "call_soon_chained_reader": "call_soon chained, a reader set (callbacks/s)",
    "call_soon_batched": "call_soon batched x1000 (callbacks/s)",
    "timers_plain": "timers, 10k in flight (fired/s)",
    "timers_90pct_cancelled": "timers, 90% cancelled (armed/s)",
    "future_round_trip": "future round trip (/s)",
    "task_create_await": "task create + await (tasks/s)",
    "sleep0_ping_pong": "sleep(0) ping-pong, 2 tasks (sleeps/s)",
    "queue_ping_pong": "Queue ping-pong, 2 tasks (round trips/s)",
}


def _run_worker(
    loop: str, bench: str, target: float, samples: int, cpu: int | None
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(HERE / "core_worker.py"),
        "--loop",
        loop,
        "--bench",
        bench,
        "--target",
        str(target),
        "--samples",
        str(samples),
    ]
    timeout = 60 + 10 * (samples + 2) * target
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=pin_to(cpu)
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"ok": False, "reason": "worker " + describe_exit(proc.returncode, proc.stderr)}
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "reason": f"worker printed {proc.stdout[-200:]!r}"}
    return result


def run(settings: Settings, infos: dict[str, LoopInfo]) -> tuple[str, dict[str, Any]]:
    """Run the suite; return the markdown report and the JSON-able results."""
    if settings.quick:
        target, samples, rounds = 0.05, 1, 1
    else:
        target, samples, rounds = 0.3, 2, settings.rounds
    benches = [b for b in ROWS if settings.selected(b)]
    loops = settings.loops
    samples_by: dict[str, dict[str, list[float]]] = {b: {lp: [] for lp in loops} for b in benches}
    reasons: dict[str, str] = {}
    ops_by: dict[str, dict[str, list[int]]] = {b: {lp: [] for lp in loops} for b in benches}
    wall_by: dict[str, dict[str, list[float]]] = {b: {lp: [] for lp in loops} for b in benches}
    busy_by: dict[str, dict[str, list[float]]] = {b: {lp: [] for lp in loops} for b in benches}
    fired_by: dict[str, dict[str, int]] = {b: {lp: 0 for lp in loops} for b in benches}
    for name, info in infos.items():
        if not info.ok:
            reasons[name] = info.reason
    started = time.monotonic()
    for rnd in range(rounds):
        order = loops[rnd % len(loops) :] + loops[: rnd % len(loops)]
        for bench in benches:
            for loop in order:
                if loop in reasons or f"{loop} / {bench}" in reasons:
                    continue
                result = _run_worker(loop, bench, target, samples, settings.core_cpu)
                if result.get("ok"):
                    samples_by[bench][loop].extend(result["samples"])
                    wall_by[bench][loop].extend(result["wall_samples"])
                    busy_by[bench][loop].extend(result["busy"])
                    ops_by[bench][loop].append(int(result["ops"]))
                    fired_by[bench][loop] += int(result.get("timeouts_fired", 0))
                    shown = fmt_rate(median(result["samples"]))
                else:
                    reasons[f"{loop} / {bench}"] = str(result.get("reason", "?"))
                    shown = NA
                settings.log(f"[core {rnd + 1}/{rounds}] {bench:24} {loop:10} {shown}")
    elapsed = time.monotonic() - started

    subject = settings.subject
    others = [lp for lp in loops if lp != subject]
    headers = ["benchmark", *loops] + [f"{subject}/{o}" for o in others]
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    for bench in benches:
        row = [ROWS[bench]]
        medians: dict[str, float] = {}
        for loop in loops:
            xs = samples_by[bench][loop]
            if xs:
                medians[loop] = median(xs)
                cell = f"{fmt_rate(medians[loop])} {fmt_spread(spread(xs))}".strip()
                busy = median(busy_by[bench][loop])
                if busy < 0.9:
                    cell += " (idle)"
                    reasons[f"{loop} / {bench} (idle)"] = (
                        f"the process ran or waited for a CPU only {busy:.0%} of the wall "
                        f"time: the loop slept in a CPU-bound benchmark (wall-clock rate "
                        f"{fmt_rate(median(wall_by[bench][loop]))}/s)"
                    )
                row.append(cell)
            else:
                row.append(NA)
        for other in others:
            if subject in medians and other in medians:
                row.append(fmt_ratio(medians[subject] / medians[other]))
            else:
                row.append(NA)
        rows.append(row)
        data[bench] = {
            loop: {
                "ops_per_cpu_s_samples": samples_by[bench][loop],
                "ops_per_wall_s_samples": wall_by[bench][loop],
                "busy_samples": busy_by[bench][loop],
                "timeouts_fired": fired_by[bench][loop],
                "ops_per_sample": ops_by[bench][loop],
                "median": medians.get(loop),
                "spread": spread(samples_by[bench][loop]) if samples_by[bench][loop] else None,
            }
            for loop in loops
        }
    text = "\n".join(
        [
            f"Loop core: operations per second of CPU time, median of {rounds} round(s) x "
            f"{samples} sample(s) of ~{target} s, each loop in a fresh process per benchmark"
            + (f", pinned to CPU {settings.core_cpu}" if settings.core_cpu is not None else "")
            + f"; ± is half the min-max range. Ratios > 1 mean {subject} is faster.",
            "",
            markdown_table(headers, rows),
            footnotes(reasons),
        ]
    ).rstrip()
    meta = {
        "rounds": rounds,
        "samples_per_process": samples,
        "target_seconds": target,
        "cpu": settings.core_cpu,
        "elapsed_seconds": elapsed,
        "subject": subject,
    }
    return text, {"settings": meta, "results": data, "n/a": reasons}
