"""Shared machinery of the conformance runners (standard library only).

Parent side: one worker subprocess per job (a test module, or the part of one that belongs to a
group), ``-j`` of them at a time, a per-test timeout (enforced inside the worker with
faulthandler) and a per-worker timeout (enforced here). A worker that hangs or crashes loses only
the test in flight: that test is recorded as ``hang`` or ``crash`` and a new worker carries on
with the tests that have no result yet. Every outcome is then classified against the expectation
rules (``xfail`` / ``exclude``, per loop and Python version range), printed as a table, and
optionally written as JSON and Markdown.

Worker side: a ``unittest.TestResult`` that appends one JSON line per event to a file with
``os.write`` (no Python-level buffering), so the parent can read everything that happened up to
the moment a worker died.
"""

from __future__ import annotations

import argparse
import faulthandler
import fnmatch
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import unittest
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Union

LOOPS: tuple[str, ...] = ("asyncio", "uvloop", "tokioloop")
ALL_LOOPS: tuple[str, ...] = LOOPS
THIRD_PARTY: tuple[str, ...] = ("uvloop", "tokioloop")

Kind = Literal["xfail", "flaky", "exclude"]
ExcInfo = Union[
    tuple[type[BaseException], BaseException, TracebackType],
    tuple[None, None, None],
]

# Raw outcomes of a test, as observed.
FAILING_OUTCOMES = frozenset({"failed", "error", "hang", "crash"})
STDERR_FD = 2  # the worker's stderr file: faulthandler writes there, whatever sys.stderr is

# ---------------------------------------------------------------------------------------------
# Expectation rules
# ---------------------------------------------------------------------------------------------


def _parse_version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


@dataclass(frozen=True)
class Rule:
    """One expectation: tests whose id matches ``pattern`` (fnmatch syntax) are expected to fail
    (``xfail``) or are not run at all (``exclude``) on ``loops`` for Python versions in ``py``
    ("" = all, "3.12" = exactly, "3.12+" = from, "-3.11" = up to, "3.10-3.11" = range)."""

    kind: Kind
    pattern: str
    reason: str
    loops: tuple[str, ...]
    py: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("xfail", "flaky", "exclude"):
            raise ValueError(f"bad rule kind {self.kind!r}")
        if not self.reason.strip():
            raise ValueError(f"rule for {self.pattern!r} has no reason")
        unknown = set(self.loops) - set(LOOPS)
        if unknown or not self.loops:
            raise ValueError(f"rule for {self.pattern!r}: bad loops {self.loops!r}")
        self.version_range()  # validates the py spec

    def version_range(self) -> tuple[tuple[int, int], tuple[int, int]]:
        spec = self.py.strip()
        low, high = (0, 0), (99, 99)
        if not spec:
            return low, high
        if spec.endswith("+"):
            return _parse_version(spec[:-1]), high
        if spec.startswith("-"):
            return low, _parse_version(spec[1:])
        if "-" in spec:
            a, b = spec.split("-")
            return _parse_version(a), _parse_version(b)
        v = _parse_version(spec)
        return v, v

    def applies_to(self, loop: str, version: tuple[int, int]) -> bool:
        low, high = self.version_range()
        return loop in self.loops and low <= version <= high

    def matches(self, test_id: str) -> bool:
        return fnmatch.fnmatchcase(test_id, self.pattern)

    @property
    def module(self) -> str:
        return self.pattern.split(".", 1)[0]

    def describe(self) -> str:
        py = f" py{self.py}" if self.py else ""
        return f"{self.kind} {self.pattern} [{','.join(self.loops)}{py}]: {self.reason}"


def _loops(loops: str | Sequence[str]) -> tuple[str, ...]:
    return (loops,) if isinstance(loops, str) else tuple(loops)


def xfail(pattern: str, reason: str, *, loops: str | Sequence[str], py: str = "") -> Rule:
    """The matching tests are expected to fail (failed, error, hang or crash)."""
    return Rule("xfail", pattern, reason, _loops(loops), py)


def flaky(pattern: str, reason: str, *, loops: str | Sequence[str], py: str = "") -> Rule:
    """The matching tests sometimes fail: a failure counts as expected, a pass as a pass (no
    "expected to fail but passed" warning). For races in the measured loop, not in the test."""
    return Rule("flaky", pattern, reason, _loops(loops), py)


def exclude(pattern: str, reason: str, *, loops: str | Sequence[str], py: str = "") -> Rule:
    """The matching tests are not run at all (they hang, take the machine down, ...)."""
    return Rule("exclude", pattern, reason, _loops(loops), py)


class Expectations:
    """The rules that apply to one loop on one Python version."""

    def __init__(self, rules: Iterable[Rule], loop: str, version: tuple[int, int]) -> None:
        self.rules = [r for r in rules if r.applies_to(loop, version)]

    def find(self, test_id: str, *kinds: Kind) -> Rule | None:
        for rule in self.rules:
            if rule.kind in kinds and rule.matches(test_id):
                return rule
        return None


def match_any(test_id: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(test_id, p) for p in patterns)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


# Signals a launcher may leave ignored: a non-interactive shell's background job ignores INT
# and QUIT, nohup ignores HUP. Ignored dispositions survive exec, so every program the tests
# spawn would inherit them and tests that signal a child would hang. Workers run in their own
# session (no controlling terminal), so restoring the defaults there is safe.
_RESTORE = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGCHLD")


def restore_default_signals() -> None:
    """Give the tests the signal dispositions of a process started from a terminal."""
    for name in _RESTORE:
        signum = getattr(signal, name, None)
        if signum is None or signal.getsignal(signum) != signal.SIG_IGN:
            continue
        handler = signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL
        signal.signal(signum, handler)


class EventWriter:
    """Appends JSON lines to a file; every line reaches the kernel before the call returns."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(self, **event: Any) -> None:
        os.write(self._fd, (json.dumps(event) + "\n").encode())


@dataclass
class Collected:
    """What a worker found in its module: the tests to run, in order, and the rest with why."""

    tests: list[unittest.TestCase]
    excluded: list[tuple[str, str, str]]  # (test id, "exclude" | "n/a", reason)
    outside: list[str]  # ids that belong to the other group of the same module


@dataclass
class _Current:
    test_id: str
    started: float
    loops_before: int
    outcome: str | None = None
    details: list[str] = field(default_factory=list)
    success: bool = False
    skip_reason: str | None = None


_PRECEDENCE = {"error": 3, "failed": 2}


class Recorder(unittest.TestResult):
    """Streams each test's outcome to the parent as soon as it is known."""

    def __init__(
        self,
        events: EventWriter,
        id_of: Callable[[unittest.TestCase], str],
        loops_created: Callable[[], int],
        test_timeout: float,
    ) -> None:
        super().__init__()
        self._events = events
        self._id_of = id_of
        self._loops_created = loops_created
        self._timeout = test_timeout
        self._cur: _Current | None = None
        self._loops_mark = loops_created()

    # -- helpers ------------------------------------------------------------------------------

    def _fmt(self, err: ExcInfo, test: unittest.TestCase) -> str:
        try:
            # unittest's own formatting (drops its internal frames); private but stable
            text = str(getattr(self, "_exc_info_to_string")(err, test))  # noqa: B009
        except Exception:  # formatting must never kill the worker
            text = "".join(traceback.format_exception(*err))
        return text[-6000:]

    def _mark(self, outcome: str, detail: str) -> None:
        cur = self._cur
        if cur is None:
            return
        if _PRECEDENCE.get(outcome, 0) >= _PRECEDENCE.get(cur.outcome or "", 0):
            cur.outcome = outcome
        cur.details.append(detail)

    def _standalone(self, test: unittest.TestCase, outcome: str, detail: str) -> None:
        # Class/module fixture results (setUpClass, tearDownModule, ...) have no startTest.
        self._events.emit(
            ev="result",
            id=self._id_of(test),
            outcome=outcome,
            seconds=0.0,
            on_loop=False,
            fixture=True,
            detail=detail,
        )

    # -- unittest.TestResult API --------------------------------------------------------------

    def startTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        super().startTest(test)
        test_id = self._id_of(test)
        # Loops are counted from the end of the previous test: IsolatedAsyncioTestCase (3.10)
        # and class fixtures create theirs before startTest is called.
        self._cur = _Current(test_id, time.perf_counter(), self._loops_mark)
        self._events.emit(ev="start", id=test_id)
        faulthandler.dump_traceback_later(self._timeout, exit=True, file=STDERR_FD)

    def stopTest(self, test: unittest.TestCase) -> None:  # noqa: N802
        faulthandler.cancel_dump_traceback_later()
        cur = self._cur
        if cur is not None:
            if cur.outcome is not None:
                outcome = cur.outcome
            elif cur.success:
                outcome = "passed"
            elif cur.skip_reason is not None:
                outcome = "skipped"
                cur.details.append(cur.skip_reason)
            else:
                outcome = "error"
                cur.details.append("the test reported no result")
            self._events.emit(
                ev="result",
                id=cur.test_id,
                outcome=outcome,
                seconds=round(time.perf_counter() - cur.started, 3),
                on_loop=self._loops_created() > cur.loops_before,
                detail="\n".join(cur.details)[-8000:],
            )
        self._loops_mark = self._loops_created()
        self._cur = None
        super().stopTest(test)

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        if self._cur is not None:
            self._cur.success = True

    def addFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:  # noqa: N802
        self._mark("failed", self._fmt(err, test))

    def addError(self, test: unittest.TestCase, err: ExcInfo) -> None:  # noqa: N802
        if self._cur is None or not isinstance(test, unittest.TestCase) or _is_holder(test):
            self._standalone(test, "error", self._fmt(err, test))
        else:
            self._mark("error", self._fmt(err, test))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        if self._cur is None or _is_holder(test):
            self._standalone(test, "skipped", reason)
        elif self._cur.skip_reason is None:
            self._cur.skip_reason = reason

    def addExpectedFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:  # noqa: N802
        # unittest.expectedFailure in the upstream test: it behaved as its authors expect.
        if self._cur is not None:
            self._cur.success = True
            self._cur.details.append("(upstream @expectedFailure)")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        self._mark("failed", "unexpected success of an upstream @expectedFailure test")

    def addSubTest(
        self,
        test: unittest.TestCase,
        subtest: unittest.TestCase,
        err: ExcInfo | None,
    ) -> None:  # noqa: N802
        if err is None or err[0] is None:
            return
        kind = "failed" if issubclass(err[0], test.failureException) else "error"
        self._mark(kind, f"[subtest {subtest.id()}]\n{self._fmt(err, test)}")


def _is_holder(test: object) -> bool:
    return type(test).__name__ == "_ErrorHolder"


def iter_tests(suite: unittest.TestSuite | unittest.TestCase) -> Iterator[unittest.TestCase]:
    if isinstance(suite, unittest.TestSuite):
        for item in suite:
            yield from iter_tests(item)
    else:
        yield suite


def worker_main(
    *,
    events_path: str,
    skip_path: str | None,
    test_timeout: float,
    collect: Callable[[], Collected],
    id_of: Callable[[unittest.TestCase], str],
    loops_created: Callable[[], int],
) -> int:
    """Run one job inside a worker process. Always exits 0 unless the interpreter dies."""
    faulthandler.enable(file=STDERR_FD, all_threads=True)
    restore_default_signals()
    events = EventWriter(events_path)
    skip: set[str] = set()
    if skip_path:
        skip = set(Path(skip_path).read_text().split("\n")) - {""}
    try:
        collected = collect()
    except unittest.SkipTest as exc:
        events.emit(ev="module_skip", reason=str(exc))
        events.emit(ev="done")
        return 0
    except BaseException:
        events.emit(ev="module_error", detail=traceback.format_exc()[-8000:])
        events.emit(ev="done")
        return 0
    ids = [id_of(t) for t in collected.tests]
    events.emit(ev="collected", ids=ids, outside=collected.outside)
    for test_id, kind, reason in collected.excluded:
        events.emit(ev="excluded", id=test_id, kind=kind, reason=reason)
    to_run = [t for t, i in zip(collected.tests, ids, strict=True) if i not in skip]
    result = Recorder(events, id_of, loops_created, test_timeout)
    unittest.TestSuite(to_run).run(result)
    events.emit(ev="done")
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    name: str  # shown in the table, e.g. "test_events [core]"
    module: str  # e.g. "test_events"
    group: str
    weight: float  # rough cost, for longest-first scheduling
    worker_args: tuple[str, ...]


@dataclass
class TestRecord:
    id: str
    outcome: str  # passed / failed / error / skipped / hang / crash
    seconds: float = 0.0
    on_loop: bool = False
    detail: str = ""
    fixture: bool = False


@dataclass
class JobOutcome:
    job: Job
    collected: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    records: dict[str, TestRecord] = field(default_factory=dict)
    excluded: dict[str, tuple[str, str]] = field(default_factory=dict)
    module_skip: str | None = None
    module_error: str | None = None
    seconds: float = 0.0
    workers: int = 0


@dataclass
class _Attempt:
    events: list[dict[str, Any]]
    returncode: int
    timed_out: bool
    stderr_tail: str


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _spawn(cmd: list[str], skip: set[str], worker_timeout: float, env: dict[str, str]) -> _Attempt:
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        events_path = os.path.join(tmp, "events.jsonl")
        skip_path = os.path.join(tmp, "skip.txt")
        Path(skip_path).write_text("\n".join(sorted(skip)))
        full = [*cmd, "--events", events_path, "--skip-file", skip_path]
        with (
            open(os.path.join(tmp, "out.txt"), "wb") as out,
            open(os.path.join(tmp, "err.txt"), "wb") as err,
        ):
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                env=env,
                cwd=tmp,
            )
            timed_out = False
            try:
                returncode = proc.wait(timeout=worker_timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc.pid)
                returncode = proc.wait()
            finally:
                # also ends whatever the tests left behind in the worker's session
                kill_group(proc.pid)
        events: list[dict[str, Any]] = []
        if os.path.exists(events_path):
            for line in Path(events_path).read_text().splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by a crash
        stderr_text = Path(os.path.join(tmp, "err.txt")).read_bytes().decode(errors="replace")
        return _Attempt(events, returncode, timed_out, stderr_text[-6000:])


def _fixture_outcome_for(test_id: str, fixtures: Iterable[TestRecord]) -> TestRecord | None:
    # "setUpClass (test_x.Cls)" covers test_x.Cls.*; "setUpModule (test_x)" covers test_x.*
    for rec in fixtures:
        if "(" not in rec.id:
            continue
        scope = rec.id.split("(", 1)[1].rstrip(")")
        if test_id.startswith(scope + "."):
            return rec
    return None


def run_job(
    job: Job,
    base_cmd: list[str],
    *,
    worker_timeout: float,
    env: dict[str, str],
    max_workers: int = 40,
) -> JobOutcome:
    result = JobOutcome(job)
    t0 = time.perf_counter()
    have_list = False
    done = False
    while not done:
        result.workers += 1
        skip = set(result.records)
        attempt = _spawn([*base_cmd, *job.worker_args], skip, worker_timeout, env)
        in_flight: str | None = None
        progressed = False
        for ev in attempt.events:
            kind = ev.get("ev")
            if kind == "collected" and not have_list:
                result.collected = list(ev["ids"])
                result.outside = list(ev.get("outside", []))
                have_list = True
            elif kind == "excluded":
                result.excluded[ev["id"]] = (ev["kind"], ev["reason"])
            elif kind == "start":
                in_flight = ev["id"]
            elif kind == "result":
                rec = TestRecord(
                    ev["id"],
                    ev["outcome"],
                    float(ev.get("seconds", 0.0)),
                    bool(ev.get("on_loop", False)),
                    ev.get("detail", ""),
                    bool(ev.get("fixture", False)),
                )
                result.records[rec.id] = rec
                progressed = True
                if in_flight == rec.id:
                    in_flight = None
            elif kind == "module_skip":
                result.module_skip = ev["reason"]
            elif kind == "module_error":
                result.module_error = ev["detail"]
            elif kind == "done":
                done = True
        if done:
            break
        how = _signal_name(attempt.returncode)
        hang = attempt.timed_out or "Timeout (" in attempt.stderr_tail
        if not have_list:
            result.module_error = (
                f"worker died before collecting tests ({how}"
                f"{', timed out' if attempt.timed_out else ''})\n{attempt.stderr_tail}"
            )
            break
        if in_flight is not None:
            what = "hang: no result within the test timeout" if hang else f"crash ({how})"
            result.records[in_flight] = TestRecord(
                in_flight,
                "hang" if hang else "crash",
                detail=f"worker {what}\n{attempt.stderr_tail}",
            )
        elif not progressed:
            result.module_error = (
                f"worker died outside any test and made no progress ({how})\n{attempt.stderr_tail}"
            )
            break
        remaining = [
            i for i in result.collected if i not in result.records and i not in result.excluded
        ]
        if not remaining:
            break
        if result.workers >= max_workers:
            result.module_error = f"gave up after {result.workers} worker restarts"
            break
    # tests that never produced a result (their class/module fixture failed or was skipped,
    # or the job gave up)
    fixtures = [r for r in result.records.values() if r.fixture]
    for test_id in result.collected:
        if test_id in result.records or test_id in result.excluded:
            continue
        fixture = _fixture_outcome_for(test_id, fixtures)
        if fixture is not None:
            verb = "was skipped" if fixture.outcome == "skipped" else "failed"
            result.records[test_id] = TestRecord(
                test_id,
                fixture.outcome,
                detail=f"not run: {fixture.id} {verb}\n{fixture.detail}",
            )
        else:
            result.records[test_id] = TestRecord(
                test_id, "error", detail="not run (the worker stopped before reaching it)"
            )
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------
# Classification and reporting
# ---------------------------------------------------------------------------------------------

COLUMNS = ("pass", "FAIL", "xfail", "xpass", "skip", "excl", "n/a", "hang", "crash", "on-loop")


@dataclass
class Classified:
    counts: dict[str, int]
    problems: list[dict[str, Any]]  # unexpected failures
    expected: list[dict[str, Any]]  # expected failures
    xpasses: list[dict[str, Any]]  # listed as xfail, or excluded (--run-excluded), but passed


def _first_line(detail: str) -> str:
    """The line of a failure's detail that says most: the exception, or the hang/crash note."""
    lines = [ln for ln in detail.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    if lines[0].startswith(("worker hang", "worker crash", "not run")):
        return lines[0][:300]
    return lines[-1][:300]


def classify(job: JobOutcome, exp: Expectations) -> Classified:
    counts = dict.fromkeys(COLUMNS, 0)
    problems: list[dict[str, Any]] = []
    expected: list[dict[str, Any]] = []
    xpasses: list[dict[str, Any]] = []
    for _test_id, (kind, _reason) in job.excluded.items():
        counts["excl" if kind == "exclude" else "n/a"] += 1
    if job.module_skip is not None:
        counts["skip"] += 1
    if job.module_error is not None:
        rule = exp.find(job.job.module, "xfail", "flaky")
        entry = {
            "id": job.job.module,
            "outcome": "module error",
            "detail": job.module_error[-3000:],
        }
        if rule is not None:
            counts["xfail"] += 1
            expected.append({**entry, "reason": rule.reason})
        else:
            counts["FAIL"] += 1
            problems.append(entry)
    for rec in job.records.values():
        if rec.on_loop:
            counts["on-loop"] += 1
        if rec.outcome in ("hang", "crash"):
            counts[rec.outcome] += 1
        rule = exp.find(rec.id, "xfail", "flaky")
        entry = {"id": rec.id, "outcome": rec.outcome, "detail": rec.detail[-3000:]}
        if rec.outcome == "skipped":
            counts["skip"] += 1
        elif rec.outcome == "passed":
            if rule is not None and rule.kind == "xfail":
                counts["xpass"] += 1
                xpasses.append({"id": rec.id, "reason": rule.reason})
            else:
                counts["pass"] += 1
                excluded_by = exp.find(rec.id, "exclude")  # run with --run-excluded
                if excluded_by is not None:
                    xpasses.append({"id": rec.id, "reason": f"excluded: {excluded_by.reason}"})
        elif rule is not None:
            counts["xfail"] += 1
            expected.append({**entry, "reason": rule.reason})
        else:
            counts["FAIL"] += 1
            problems.append(entry)
    return Classified(counts, problems, expected, xpasses)


def stale_rules(rules: Iterable[Rule], outcomes: Iterable[JobOutcome]) -> list[Rule]:
    """Rules (for this loop and version) that match no test id in the modules that ran."""
    seen: dict[str, list[str]] = {}
    for o in outcomes:
        ids = seen.setdefault(o.job.module, [o.job.module])
        ids.extend(o.collected)
        ids.extend(o.outside)
        ids.extend(o.records)
        ids.extend(o.excluded)
    stale = []
    for rule in rules:
        module_ids = seen.get(rule.module)
        if module_ids is None:
            continue  # its module was not part of this run
        if not any(rule.matches(i) for i in module_ids):
            stale.append(rule)
    return stale


def python_version() -> tuple[int, int]:
    return sys.version_info[0], sys.version_info[1]


def _fmt_row(name: str, counts: dict[str, int], seconds: float, width: int) -> str:
    cells = " ".join(f"{counts[c]:>7}" for c in COLUMNS)
    return f"{name:<{width}} {cells} {seconds:>7.1f}"


@dataclass
class RunReport:
    runner: str
    loop: str
    group: str
    outcomes: list[JobOutcome]
    classified: list[Classified]
    stale: list[Rule]
    wall_seconds: float
    not_applicable: dict[str, str]

    def totals(self) -> dict[str, int]:
        total = dict.fromkeys(COLUMNS, 0)
        for c in self.classified:
            for k, v in c.counts.items():
                total[k] += v
        return total

    def ok(self) -> bool:
        return all(not c.problems for c in self.classified)

    def print(self, *, verbose: bool, file: Any = None) -> None:
        out = file or sys.stdout
        width = max([len(o.job.name) for o in self.outcomes] + [10])
        head = " ".join(f"{c:>7}" for c in COLUMNS)
        print(f"\n{'module':<{width}} {head} {'secs':>7}", file=out)
        for o, c in zip(self.outcomes, self.classified, strict=True):
            note = ""
            if o.module_skip is not None:
                note = f"  (module skipped: {o.module_skip})"
            elif o.module_error is not None:
                note = "  (MODULE ERROR)"
            if o.workers > 1:
                note += f"  ({o.workers} workers)"
            print(_fmt_row(o.job.name, c.counts, o.seconds, width) + note, file=out)
        print(_fmt_row("TOTAL", self.totals(), self.wall_seconds, width), file=out)
        ver = platform.python_version()
        print(
            f"\n{self.runner} on loop={self.loop} group={self.group} Python {ver}: "
            f"wall clock {self.wall_seconds:.1f}s",
            file=out,
        )
        if self.not_applicable:
            print("\nnot applicable (not run):", file=out)
            for name, reason in self.not_applicable.items():
                print(f"  {name}: {reason}", file=out)
        for c in self.classified:
            for x in c.xpasses:
                print(f"WARNING: expected to fail but passed: {x['id']} ({x['reason']})", file=out)
        for rule in self.stale:
            print(f"WARNING: rule matches no test: {rule.describe()}", file=out)
        problems = [p for c in self.classified for p in c.problems]
        if problems:
            print(f"\nunexpected failures ({len(problems)}):", file=out)
            for p in problems:
                print(f"  {p['outcome']:>6}  {p['id']}", file=out)
                if verbose:
                    for line in p["detail"].rstrip().splitlines()[-25:]:
                        print(f"          | {line}", file=out)
                else:
                    print(f"          | {_first_line(p['detail'])}", file=out)

    def to_json(self, *, with_tests: bool = False) -> dict[str, Any]:
        modules: dict[str, Any] = {}
        for o, c in zip(self.outcomes, self.classified, strict=True):
            modules[o.job.name] = {
                **c.counts,
                "seconds": round(o.seconds, 1),
                "workers": o.workers,
                "module_skip": o.module_skip,
                "module_error": _first_line(o.module_error) if o.module_error else None,
            }
        return {
            "runner": self.runner,
            "loop": self.loop,
            "group": self.group,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(self.wall_seconds, 1),
            "totals": self.totals(),
            "modules": modules,
            "unexpected_failures": [
                {"id": p["id"], "outcome": p["outcome"], "detail": _first_line(p["detail"])}
                for c in self.classified
                for p in c.problems
            ],
            "expected_failures": [
                {"id": p["id"], "outcome": p["outcome"], "reason": p["reason"]}
                for c in self.classified
                for p in c.expected
            ],
            "xpass": [x for c in self.classified for x in c.xpasses],
            "slowest": [
                {"id": r.id, "outcome": r.outcome, "seconds": r.seconds}
                for r in sorted(
                    (r for o in self.outcomes for r in o.records.values()),
                    key=lambda r: -r.seconds,
                )[:15]
            ],
            "stale_rules": [r.describe() for r in self.stale],
            "not_applicable": self.not_applicable,
            **({"tests": self.test_outcomes()} if with_tests else {}),
        }

    def test_outcomes(self) -> dict[str, str]:
        """Every test id with its raw outcome, or "excluded"/"n/a"."""
        out: dict[str, str] = {}
        for o in self.outcomes:
            for test_id, (kind, _reason) in o.excluded.items():
                out[test_id] = "excluded" if kind == "exclude" else "n/a"
            for rec in o.records.values():
                out[rec.id] = rec.outcome
        return dict(sorted(out.items()))

    def to_markdown(self) -> str:
        ver = platform.python_version()
        lines = [
            f"### {self.runner}: loop `{self.loop}`, group `{self.group}`, Python {ver}",
            "",
            f"Wall clock {self.wall_seconds:.1f}s.",
            "",
            "| module | " + " | ".join(COLUMNS) + " | secs |",
            "|---" * (len(COLUMNS) + 2) + "|",
        ]
        for o, c in zip(self.outcomes, self.classified, strict=True):
            cells = " | ".join(str(c.counts[k]) for k in COLUMNS)
            lines.append(f"| {o.job.name} | {cells} | {o.seconds:.1f} |")
        total = self.totals()
        cells = " | ".join(f"**{total[k]}**" for k in COLUMNS)
        lines.append(f"| **total** | {cells} | {self.wall_seconds:.1f} |")
        return "\n".join(lines) + "\n"


def run_all(
    *,
    runner: str,
    loop: str,
    group: str,
    jobs: list[Job],
    base_cmd: list[str],
    rules: list[Rule],
    parallel: int,
    worker_timeout: float,
    env: dict[str, str],
    not_applicable: dict[str, str],
    quiet: bool = False,
) -> RunReport:
    exp = Expectations(rules, loop, python_version())
    t0 = time.perf_counter()
    order = sorted(jobs, key=lambda j: -j.weight)
    finished: dict[str, JobOutcome] = {}
    lock = threading.Lock()

    def one(job: Job) -> JobOutcome:
        outcome = run_job(job, base_cmd, worker_timeout=worker_timeout, env=env)
        c = classify(outcome, exp)
        with lock:
            finished[job.name] = outcome
            if not quiet:
                n = len(finished)
                counts = ", ".join(f"{k} {v}" for k, v in c.counts.items() if v)
                print(
                    f"[{n:>2}/{len(jobs)}] {job.name}: {counts or 'no tests'} "
                    f"({outcome.seconds:.1f}s)",
                    flush=True,
                )
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, order))
    outcomes = [finished[j.name] for j in jobs]
    classified = [classify(o, exp) for o in outcomes]
    stale = stale_rules(exp.rules, outcomes)
    return RunReport(
        runner,
        loop,
        group,
        outcomes,
        classified,
        stale,
        time.perf_counter() - t0,
        not_applicable,
    )


def add_common_args(parser: argparse.ArgumentParser, *, groups: Sequence[str]) -> None:
    parser.add_argument("--loop", choices=LOOPS, required=True, help="event loop to measure")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit non-zero if a test fails that the expectations do not list as xfail",
    )
    parser.add_argument("-j", "--jobs", type=int, default=2, help="parallel workers (default 2)")
    parser.add_argument(
        "--modules", default="", help="comma-separated module names to run (default: all)"
    )
    parser.add_argument(
        "--group", choices=[*groups, "all"], default="all", help="test group (default: all)"
    )
    parser.add_argument("--json", dest="json_path", help="write a JSON summary here")
    parser.add_argument(
        "--json-tests", action="store_true", help="include every test's outcome in the JSON"
    )
    parser.add_argument("--markdown", dest="md_path", help="write a Markdown table here")
    parser.add_argument(
        "--test-timeout",
        type=float,
        default=60.0,
        help="seconds one test may run before it is reported as a hang (default 60)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=900.0,
        help="seconds one worker process may run in total (default 900)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show failure tracebacks")
    parser.add_argument("--list", action="store_true", help="list the jobs and exit")
    parser.add_argument(
        "--run-excluded",
        action="store_true",
        help="also run the tests excluded by rules (to see whether an exclusion still holds)",
    )
    # internal: worker mode
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--events", help=argparse.SUPPRESS)
    parser.add_argument("--skip-file", help=argparse.SUPPRESS)


def finish(report: RunReport, args: argparse.Namespace) -> int:
    report.print(verbose=args.verbose)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        data = report.to_json(with_tests=args.json_tests)
        Path(args.json_path).write_text(json.dumps(data, indent=1) + "\n")
    if args.md_path:
        Path(args.md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md_path).write_text(report.to_markdown())
    if args.check:
        if report.ok():
            print("\ncheck: OK (every failure is listed as expected)")
            return 0
        print("\ncheck: FAILED (unexpected failures above)")
        return 1
    return 0
