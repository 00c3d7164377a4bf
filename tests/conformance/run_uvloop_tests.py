#!/usr/bin/env python3
"""Run uvloop's own test suite (from its PyPI sdist) in place against an event loop.

    python tests/conformance/run_uvloop_tests.py --loop {asyncio,uvloop,tokioloop} [--check]
        [-j N] [--group core|network|all] [--modules m1,m2] [--json out.json] [--markdown out.md]

The sdist (uvloop==UVLOOP_VERSION) is fetched with ``pip download --no-binary :all: --no-deps``
into ``.cache/uvloop-tests/`` (git-ignored), checked against a pinned SHA-256, and only its
``tests/`` folder is extracted; the downloaded files are never edited. The tests import the
*installed* uvloop (for ``uvloop._testbase``), which must be the same version.

uvloop's test classes come in pairs: ``*_UV_*`` classes derive from ``_testbase.UVTestCase``
(loops from ``uvloop.new_event_loop()``), ``*_AIO_*`` classes from ``AIOTestCase`` (asyncio's
loop). With ``--loop uvloop`` everything runs as upstream runs it. With ``--loop tokioloop`` or
``--loop asyncio`` the runner patches, at runtime and before the test modules are imported:

* ``UVTestCase.new_loop`` / ``new_policy`` / ``implementation``: the chosen loop, its policy class,
  its name (tests branch on ``self.implementation == 'asyncio'`` and format it into programs
  they run in subprocesses);
* uvloop's public API ``uvloop.new_event_loop``, ``uvloop.Loop``, ``uvloop.EventLoopPolicy``,
  ``uvloop.run``, so tests that call uvloop directly get the chosen loop too;
* ``NEW_LOOP`` class attributes (the loop expression test_signals puts into its child programs).

The AIO twins then measure nothing new (asyncio's loop) and are reported as not applicable, as
are the tests of uvloop's own extension API (``uvloop.loop.*``). Nothing is skipped silently:
every test not run is counted with its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import unittest
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402
import _loops  # noqa: E402

UVLOOP_VERSION = "0.23.0"
UVLOOP_SDIST_SHA256 = "28d160f51ab4da3b187063652e643dea6831072add4adc1e6d62afbe73b6be27"
REPO = HERE.parent.parent
DEFAULT_CACHE = REPO / ".cache" / "uvloop-tests"
GROUPS = ("core", "network")

T = TypeVar("T")


@dataclass(frozen=True)
class Spec:
    name: str
    group: str
    weight: float = 1.0
    # reason the whole module does not measure a loop other than uvloop (None: it does)
    uvloop_only: str | None = None


UVLOOP_API = "tests uvloop's own extension API (uvloop.loop.*), which other loops do not have"

MODULES: tuple[Spec, ...] = (
    Spec("test_base", "core", weight=12),
    Spec("test_executors", "core", weight=1),
    Spec("test_signals", "core", weight=10),
    Spec("test_runner", "core", weight=1),
    Spec("test_testbase", "core", weight=1),
    Spec("test_dealloc", "core", weight=1),
    Spec("test_cython", "core", weight=1, uvloop_only=UVLOOP_API),
    Spec("test_libuv_api", "core", weight=1, uvloop_only=UVLOOP_API),
    Spec(
        "test_fs_event",
        "core",
        weight=1,
        uvloop_only="uvloop.loop.FileSystemEvent and the private loop._monitor_fs()",
    ),
    Spec("test_tcp", "network", weight=25),
    Spec("test_unix", "network", weight=10),
    Spec("test_udp", "network", weight=3),
    Spec("test_sockets", "network", weight=4),
    Spec("test_pipes", "network", weight=2),
    Spec("test_process", "network", weight=12),
    Spec("test_process_spawning", "network", weight=2),
    Spec("test_context", "network", weight=6),
    Spec("test_dns", "network", weight=2),
    Spec("test_regr1", "network", weight=2),
    Spec("test_aiohttp", "network", weight=2),
)
NOT_APPLICABLE = {
    "test_sourcecode": "runs flake8 and mypy over uvloop's source tree, which is not extracted "
    "(only tests/ is); it checks uvloop's code style, not a loop",
}
SPEC_BY_NAME = {s.name: s for s in MODULES}


# ---------------------------------------------------------------------------------------------
# The sdist
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_tests(cache: Path) -> Path:
    """The extracted tests/ folder of the pinned sdist, downloading it on first use."""
    root = cache / f"uvloop-{UVLOOP_VERSION}"
    tests = root / "tests"
    stamp = root / ".sdist-sha256"
    if tests.is_dir() and stamp.exists() and stamp.read_text().strip() == UVLOOP_SDIST_SHA256:
        return tests
    sdist_dir = cache / "sdist"
    sdist = sdist_dir / f"uvloop-{UVLOOP_VERSION}.tar.gz"
    if not sdist.exists():
        sdist_dir.mkdir(parents=True, exist_ok=True)
        print(f"downloading the uvloop {UVLOOP_VERSION} sdist from PyPI into {sdist_dir}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"uvloop=={UVLOOP_VERSION}",
                "-d",
                str(sdist_dir),
            ],
            check=True,
        )
    actual = _sha256(sdist)
    if actual != UVLOOP_SDIST_SHA256:
        raise SystemExit(
            f"{sdist}: SHA-256 {actual} is not the pinned {UVLOOP_SDIST_SHA256}; delete it"
        )
    if root.exists():
        shutil.rmtree(root)
    prefix = f"uvloop-{UVLOOP_VERSION}/tests/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise SystemExit(f"{sdist} has no {prefix}")
        kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(cache, members=members, **kwargs)
    stamp.write_text(UVLOOP_SDIST_SHA256 + "\n")
    return tests


def installed_uvloop_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("uvloop")
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


def _stdlib_run(choice: _loops.LoopChoice) -> Callable[..., Any]:
    """uvloop.run()'s signature, running on asyncio (for --loop asyncio)."""

    def run(
        main: Coroutine[Any, Any, T],
        *,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        debug: bool | None = None,
        **run_kwargs: Any,
    ) -> T:
        factory = loop_factory or choice.new_loop
        if sys.version_info >= (3, 12):
            return asyncio.run(main, loop_factory=factory, debug=debug, **run_kwargs)
        if sys.version_info >= (3, 11):
            with asyncio.Runner(loop_factory=factory, debug=debug) as runner:
                return runner.run(main)
        # 3.10: asyncio.run() has no loop_factory; give it a policy that makes our loops
        base = _loops.STDLIB_DEFAULT_POLICY

        class OnePolicy(base):  # type: ignore[valid-type,misc]
            def new_event_loop(self) -> asyncio.AbstractEventLoop:
                return factory()

        old = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(OnePolicy())
        try:
            return asyncio.run(main, debug=bool(debug))
        finally:
            asyncio.set_event_loop_policy(old)

    return run


def _patch_uvloop(choice: _loops.LoopChoice) -> None:
    import uvloop
    from uvloop import _testbase as tb

    if choice.name == "uvloop":
        # upstream behaviour; only count the loops UVTestCase makes
        original: Callable[[Any], Any] = tb.UVTestCase.new_loop

        def counted_new_loop(self: Any) -> asyncio.AbstractEventLoop:
            choice.note_created()
            return cast(asyncio.AbstractEventLoop, original(self))

        setattr(tb.UVTestCase, "new_loop", counted_new_loop)  # noqa: B010
        return

    policy_class = _loops.own_policy_class(choice)

    def new_loop(self: Any) -> asyncio.AbstractEventLoop:
        return choice.new_loop()

    def new_policy(self: Any) -> asyncio.AbstractEventLoopPolicy:
        return policy_class()

    patches: dict[tuple[Any, str], Any] = {
        (tb.UVTestCase, "new_loop"): new_loop,
        (tb.UVTestCase, "new_policy"): new_policy,
        (tb.UVTestCase, "implementation"): choice.name,
        (uvloop, "new_event_loop"): choice.new_loop,
        (uvloop, "Loop"): choice.loop_class,
        (uvloop, "EventLoopPolicy"): policy_class,
    }
    if choice.name == "tokioloop":
        import tokioloop

        patches[(uvloop, "run")] = getattr(tokioloop, "run")  # noqa: B009
    else:
        patches[(uvloop, "run")] = _stdlib_run(choice)
    for (owner, name), value in patches.items():
        setattr(owner, name, value)


def _loop_expression(loop: str) -> str:
    if loop == "asyncio":
        return "__import__('asyncio').new_event_loop()"
    return f"__import__('{loop}').new_event_loop()"


def _patch_module(mod: Any, loop: str) -> None:
    if loop == "uvloop":
        return
    for value in vars(mod).values():
        if isinstance(value, type) and value.__dict__.get("NEW_LOOP") == (
            "uvloop.new_event_loop()"
        ):
            setattr(value, "NEW_LOOP", _loop_expression(loop))  # noqa: B010


def rel_id(test: unittest.TestCase) -> str:
    return test.id()


def collect(spec: Spec, group: str, loop: str, tests_dir: str, run_excluded: bool) -> h.Collected:
    sys.path.insert(0, tests_dir)
    choice = _loops.LoopChoice(loop)
    _patch_uvloop(choice)
    from uvloop import _testbase as tb

    mod = importlib.import_module(spec.name)
    _patch_module(mod, loop)

    from expectations_uvloop import RULES

    exp = h.Expectations(RULES, loop, h.python_version())
    tests = list(h.iter_tests(unittest.defaultTestLoader.loadTestsFromModule(mod)))
    run: list[unittest.TestCase] = []
    excluded: list[tuple[str, str, str]] = []
    for test in tests:
        tid = rel_id(test)
        na: str | None = None
        if loop != "uvloop":
            if spec.uvloop_only is not None:
                na = spec.uvloop_only
            elif isinstance(test, tb.AIOTestCase):
                na = "AIO twin: runs asyncio's own loop (its UV twin runs the chosen loop)"
        if na is not None:
            excluded.append((tid, "n/a", na))
            continue
        rule = exp.find(tid, "exclude")
        if rule is not None and not run_excluded:
            excluded.append((tid, "exclude", rule.reason))
            continue
        run.append(test)
    _WORKER_STATE["choice"] = choice
    return h.Collected(run, excluded, [])


_WORKER_STATE: dict[str, _loops.LoopChoice] = {}


def _created() -> int:
    choice = _WORKER_STATE.get("choice")
    return 0 if choice is None else choice.created


def worker(args: argparse.Namespace) -> int:
    module, group = args.worker.split(":")
    spec = SPEC_BY_NAME[module]
    return h.worker_main(
        events_path=args.events,
        skip_path=args.skip_file,
        test_timeout=args.test_timeout,
        collect=lambda: collect(spec, group, args.loop, args.tests_dir, args.run_excluded),
        id_of=rel_id,
        loops_created=_created,
    )


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


_UPSTREAM_SCRIPT = r"""
import json, sys, unittest

# signals as in a foreground shell, even if the runner was started in the background
sys.path.insert(0, sys.argv[2])
import _harness
_harness.restore_default_signals()
del sys.path[0]

class Result(unittest.TestResult):
    def __init__(self):
        super().__init__()
        self.outcomes = {}
    def _set(self, test, outcome):
        if self.outcomes.get(test.id()) not in ("failed", "error"):
            self.outcomes[test.id()] = outcome
    def addSuccess(self, test): self._set(test, "passed")
    def addSkip(self, test, reason): self._set(test, "skipped")
    def addError(self, test, err): self._set(test, "error")
    def addFailure(self, test, err): self._set(test, "failed")
    def addExpectedFailure(self, test, err): self._set(test, "passed")
    def addUnexpectedSuccess(self, test): self._set(test, "failed")
    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._set(test, "failed")

result = Result()
unittest.TestLoader().discover("tests").run(result)
json.dump(result.outcomes, open(sys.argv[1], "w"))
"""


def compare_upstream(
    report: h.RunReport, tests_dir: Path, env: dict[str, str], timeout: float
) -> list[str]:
    """Run the suite the way uvloop's Makefile does (``python -m unittest discover tests``, one
    process, nothing patched) and list the tests whose outcome differs from this runner's."""
    out = tests_dir.parent / ".upstream-outcomes.json"
    print(f"\ncompare-upstream: running `unittest discover tests` in {tests_dir.parent} ...")
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", _UPSTREAM_SCRIPT, str(out), str(HERE)],
        cwd=tests_dir.parent,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        h.kill_group(proc.pid)  # also whatever the tests left running
        proc.wait()
    if not out.exists():
        print(f"compare-upstream: the upstream-style run did not finish ({proc.returncode})")
        return ["<upstream-style run did not finish>"]
    upstream: dict[str, str] = json.loads(out.read_text())
    mine = report.test_outcomes()
    diffs = []
    for test_id in sorted(set(upstream) | set(mine)):
        a, b = upstream.get(test_id), mine.get(test_id)
        if a != b:
            diffs.append(f"{test_id}: upstream {a}, runner {b}")
    same = len(set(upstream) & set(mine)) - sum(
        1 for t in set(upstream) & set(mine) if upstream[t] != mine[t]
    )
    print(f"compare-upstream: {same} tests with the same outcome, {len(diffs)} differ")
    for line in diffs:
        print(f"  {line}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_args(parser, groups=GROUPS)
    parser.add_argument(
        "--cache-dir",
        default=str(DEFAULT_CACHE),
        help=f"where the sdist and its tests/ go (default {DEFAULT_CACHE})",
    )
    parser.add_argument(
        "--asyncio-debug",
        action="store_true",
        help="run with PYTHONASYNCIODEBUG=1 (uvloop's `make test` runs both modes)",
    )
    parser.add_argument(
        "--compare-upstream",
        action="store_true",
        help="(with --loop uvloop) also run the suite as uvloop's Makefile does and compare "
        "every test's outcome; differences other than the not-applicable module fail --check",
    )
    parser.add_argument("--tests-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    wanted = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in SPEC_BY_NAME and m not in NOT_APPLICABLE]
    if unknown:
        raise SystemExit(f"unknown module(s): {', '.join(unknown)}")
    jobs = [
        h.Job(s.name, s.name, s.group, s.weight, ("--worker", f"{s.name}:{s.group}"))
        for s in MODULES
        if (not wanted or s.name in wanted) and args.group in ("all", s.group)
    ]
    if args.list:
        for job in jobs:
            print(f"{job.name:<24} group={job.group}")
        for name, reason in NOT_APPLICABLE.items():
            print(f"{name:<24} not applicable: {reason}")
        return 0

    installed = installed_uvloop_version()
    if installed != UVLOOP_VERSION:
        print(
            f"error: the tests need the installed uvloop (for uvloop._testbase) to be "
            f"{UVLOOP_VERSION}; found {installed}",
            file=sys.stderr,
        )
        return 2
    problem = _loops.check_available(args.loop)
    if problem is None and args.loop != "uvloop":
        try:
            _loops.own_policy_class(_loops.LoopChoice(args.loop))
        except _loops.LoopUnavailable as exc:
            problem = str(exc)
    if problem is not None:
        print(f"error: cannot measure loop {args.loop!r}: {problem}", file=sys.stderr)
        return 2
    tests_dir = ensure_tests(Path(args.cache_dir))
    present = sorted(p.stem for p in tests_dir.glob("test_*.py"))
    unclassified = [m for m in present if m not in SPEC_BY_NAME and m not in NOT_APPLICABLE]
    for name in unclassified:
        print(f"WARNING: uvloop tests/{name}.py is not classified in this runner; not run")
    not_applicable = {
        name: reason
        for name, reason in NOT_APPLICABLE.items()
        if name in present and (not wanted or name in wanted)
    }
    for name in unclassified:
        not_applicable[name] = "NOT CLASSIFIED in run_uvloop_tests.py (not run)"

    from expectations_uvloop import RULES

    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    if args.asyncio_debug:
        env["PYTHONASYNCIODEBUG"] = "1"
    base_cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        str(Path(__file__).resolve()),
        "--loop",
        args.loop,
        "--test-timeout",
        str(args.test_timeout),
        "--tests-dir",
        str(tests_dir),
        *(["--run-excluded"] if args.run_excluded else []),
    ]
    print(
        f"uvloop {UVLOOP_VERSION} tests on Python {sys.version.split()[0]}, loop {args.loop}"
        f"{' (PYTHONASYNCIODEBUG=1)' if args.asyncio_debug else ''}: "
        f"{len(jobs)} jobs, -j{args.jobs}",
        flush=True,
    )
    report = h.run_all(
        runner=f"uvloop-{UVLOOP_VERSION}-tests" + ("-asynciodebug" if args.asyncio_debug else ""),
        loop=args.loop,
        group=args.group,
        jobs=jobs,
        base_cmd=base_cmd,
        rules=RULES,
        parallel=args.jobs,
        worker_timeout=args.worker_timeout,
        env=env,
        not_applicable=not_applicable,
    )
    status = h.finish(report, args)
    if args.compare_upstream:
        if args.loop != "uvloop":
            print("compare-upstream: only meaningful with --loop uvloop; skipped")
            return status
        diffs = compare_upstream(report, tests_dir, env, args.worker_timeout)
        unexpected = [d for d in diffs if d.split(".", 1)[0] not in NOT_APPLICABLE]
        if unexpected and args.check:
            print("check: FAILED (outcomes differ from the upstream-style run)")
            return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
