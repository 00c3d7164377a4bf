#!/usr/bin/env python3
"""Run CPython's own test.test_asyncio (installed with the interpreter) against an event loop.

    python tests/conformance/run_test_asyncio.py --loop {asyncio,uvloop,tokioloop} [--check]
        [-j N] [--group core|network|all] [--modules m1,m2] [--json out.json] [--markdown out.md]

The tests are imported from where the interpreter keeps them and run in place; nothing of them is
copied. How the chosen loop gets in:

* asyncio's *default policy class* is replaced by a subclass whose ``new_event_loop()`` returns
  the chosen loop (``_loops.install_default_policy``), so ``asyncio.new_event_loop()``,
  ``asyncio.run()``, ``asyncio.Runner`` and ``unittest.IsolatedAsyncioTestCase`` all create it,
  also after a test resets the policy with ``asyncio.set_event_loop_policy(None)``.
* Modules whose concrete test classes hard-code asyncio's own loops (``SelectorEventLoop(...)``
  per selector, ``ProactorEventLoop``) get one class of their own instead, built here from the
  module's mixins (or by subclassing the selector variant) with the loop factory returning the
  chosen loop. The replaced classes are listed in ``MODULES`` below (``drop``).
* ``test_utils.TestCase.close_loop`` reads ``loop._default_executor``, an attribute of asyncio's
  BaseEventLoop; for loops without it the runner closes the loop through the public API instead
  (``shutdown_default_executor()`` then ``close()``).

Each job (a module, or the core/network half of one) runs in its own worker process; see
_harness.py for timeouts, hang/crash handling and reporting, and expectations_test_asyncio.py for
the expected failures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import os
import re
import sys
import unittest
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _harness as h  # noqa: E402
import _loops  # noqa: E402

PACKAGE = "test.test_asyncio"
GROUPS = ("core", "network")


@dataclass(frozen=True)
class Bind:
    """A test class the runner adds to a module: ``bases`` (names in the module, dotted names
    allowed) plus a loop factory of the given ``kind``:

    * ``create_event_loop`` / ``new_loop``: the method the module's mixins call for a loop;
    * ``setUp``: the class gets ``self.loop`` made in setUp (test_subprocess's mixin);
    * ``recording_new_loop``: test_runners' ``new_loop``, returning a subclass of the chosen loop
      that records ``shutdown_asyncgens()`` calls, which the module's tearDown checks.
    """

    name: str
    bases: tuple[str, ...]
    kind: str
    since: tuple[int, int] = (3, 10)  # first Python version whose module has the bases


@dataclass(frozen=True)
class Spec:
    name: str
    group: str  # group of the module's tests unless `network` says otherwise
    weight: float = 1.0  # rough seconds, for scheduling
    drop: tuple[str, ...] = ()  # loop-bound classes replaced by `bind`
    bind: tuple[Bind, ...] = ()
    network: tuple[str, ...] = ()  # "Class.test" patterns that belong to the network group
    na: tuple[tuple[str, str], ...] = ()  # ("Class.test" pattern, reason): not applicable
    keep: tuple[str, ...] = ()  # patterns exempt from `na`

    def group_of(self, rel_id: str) -> str:
        if self.group == "core" and h.match_any(rel_id, self.network):
            return "network"
        return self.group

    def na_reason(self, rel_id: str) -> str | None:
        if h.match_any(rel_id, self.keep):
            return None
        for pattern, reason in self.na:
            if h.match_any(rel_id, [pattern]):
                return reason
        return None

    @property
    def groups(self) -> tuple[str, ...]:
        return ("core", "network") if self.network else (self.group,)


SELECTOR_VARIANTS = (
    "EPollEventLoopTests",
    "PollEventLoopTests",
    "SelectEventLoopTests",
    "KqueueEventLoopTests",
    "ProactorEventLoopTests",
)
WINDOWS_ONLY = "Windows-only class (ProactorEventLoop)"
WATCHERS = "asyncio's own child-watcher classes (deprecated API of the stdlib loop)"

MODULES: tuple[Spec, ...] = (
    # ---------------------------------------------------------------- core
    Spec(
        "test_events",
        "core",
        weight=30,
        drop=SELECTOR_VARIANTS,
        bind=(
            Bind(
                "EventLoopTests",
                ("EventLoopTestsMixin", "SubprocessTestsMixin", "test_utils.TestCase"),
                "create_event_loop",
            ),
        ),
        network=(
            "EventLoopTests.test_create_*",
            "EventLoopTests.test_connect_*",
            "EventLoopTests.test_ssl_*",
            "EventLoopTests.test_server_*",
            "EventLoopTests.test_datagram_*",
            "EventLoopTests.test_*pipe*",
            "EventLoopTests.test_*pty*",
            "EventLoopTests.test_subprocess_*",
            "EventLoopTests.test_prompt_cancellation",
            "TestServer.*",
        ),
    ),
    Spec("test_tasks", "core", weight=25),
    Spec("test_locks", "core", weight=6),
    Spec("test_queues", "core", weight=3),
    Spec("test_futures", "core", weight=4),
    Spec("test_futures2", "core", weight=1),
    Spec("test_context", "core", weight=1),
    Spec("test_pep492", "core", weight=1),
    Spec("test_waitfor", "core", weight=8),
    Spec("test_timeouts", "core", weight=3),
    Spec("test_taskgroups", "core", weight=3),
    Spec("test_eager_task_factory", "core", weight=2),
    Spec("test_staggered", "core", weight=1),
    Spec("test_threads", "core", weight=1),
    Spec(
        "test_runners",
        "core",
        weight=3,
        drop=("RunTests", "RunnerTests"),
        bind=(
            Bind("RunTests", ("RunTests",), "recording_new_loop"),
            Bind("RunnerTests", ("RunnerTests",), "recording_new_loop", since=(3, 11)),
        ),
    ),
    Spec(
        "test_base_events",
        "core",
        weight=2,
        na=(
            (
                "*",
                "tests asyncio's BaseEventLoop/BaseSelectorEventLoop internals with mocks",
            ),
        ),
        keep=(
            "RunningLoopTests.*",
            "BaseEventLoopTests.test_create_task_error_closes_coro",
            "BaseEventLoopTests.test_create_named_task_with_*",
        ),
    ),
    Spec(
        "test_unix_events",
        "core",
        weight=4,
        network=("TestFork.test_fork_asyncio_subprocess",),
        na=(
            (
                "SelectorEventLoopUnixSockSendfileTests.*",
                "the selector loop's private _sock_sendfile_native* with mocked sockets",
            ),
            (
                "SelectorEventLoopSignalTests.*",
                "asyncio.SelectorEventLoop's signal code with a mocked signal module",
            ),
            (
                "SelectorEventLoopUnixSocketTests.*",
                "asyncio.SelectorEventLoop created directly, sockets mocked",
            ),
            ("Unix*PipeTransportTests.*", "asyncio's pipe transport classes with mocks"),
            ("*ChildWatcherTests.*", WATCHERS),
            ("PolicyTests.*", "asyncio's unix policy child-watcher API"),
        ),
    ),
    # ---------------------------------------------------------------- network
    Spec("test_streams", "network", weight=8),
    Spec(
        "test_server",
        "network",
        weight=2,
        drop=("SelectorStartServerTests", "ProactorStartServerTests"),
        bind=(Bind("StartServerTests", ("SelectorStartServerTests",), "new_loop"),),
    ),
    Spec(
        "test_sock_lowlevel",
        "network",
        weight=4,
        drop=SELECTOR_VARIANTS,
        bind=(
            Bind(
                "SockLowlevelTests",
                ("BaseSockTestsMixin", "test_utils.TestCase"),
                "create_event_loop",
            ),
        ),
    ),
    Spec(
        "test_sendfile",
        "network",
        weight=4,
        drop=SELECTOR_VARIANTS,
        bind=(
            Bind(
                "SendfileTests", ("SendfileTestsBase", "test_utils.TestCase"), "create_event_loop"
            ),
        ),
    ),
    Spec(
        "test_buffered_proto",
        "network",
        weight=1,
        drop=("BufferedProtocolSelectorTests", "BufferedProtocolProactorTests"),
        bind=(Bind("BufferedProtocolTests", ("BufferedProtocolSelectorTests",), "new_loop"),),
    ),
    Spec(
        "test_subprocess",
        "network",
        weight=20,
        drop=(
            "SubprocessThreadedWatcherTests",
            "SubprocessMultiLoopWatcherTests",
            "SubprocessSafeWatcherTests",
            "SubprocessFastWatcherTests",
            "SubprocessPidfdWatcherTests",
            "SubprocessProactorTests",
        ),
        bind=(Bind("SubprocessTests", ("SubprocessMixin", "test_utils.TestCase"), "setUp"),),
        na=(
            (
                "SubprocessTransportTests.*",
                "asyncio's BaseSubprocessTransport with a mocked process",
            ),
            ("MultiLoopChildWatcherTests.*", WATCHERS),
            ("GenericWatcherTests.*", WATCHERS),
        ),
    ),
    Spec(
        "test_sslproto",
        "network",
        weight=6,
        drop=("SelectorStartTLSTests", "ProactorStartTLSTests"),
        bind=(Bind("StartTLSTests", ("SelectorStartTLSTests",), "new_loop"),),
        na=(
            (
                "SslProtoHandshakeTests.*",
                "asyncio's sslproto.SSLProtocol class driven with mocked transports",
            ),
        ),
    ),
    Spec("test_ssl", "network", weight=10),
)

NOT_APPLICABLE: dict[str, str] = {
    "test_selector_events": "asyncio's BaseSelectorEventLoop and selector transports, with "
    "mocked selectors and sockets",
    "test_proactor_events": "asyncio's proactor loop and transports (Windows design), mocked",
    "test_windows_events": "Windows only (IOCP ProactorEventLoop)",
    "test_windows_utils": "Windows only",
    "test_transports": "the abstract asyncio.*Transport base classes; no loop involved",
    "test_protocols": "the abstract asyncio.*Protocol base classes; no loop involved",
}

SPEC_BY_NAME = {s.name: s for s in MODULES}


def rel_id(test: unittest.TestCase) -> str:
    return test.id().replace(PACKAGE + ".", "")


def installed_modules() -> list[str]:
    pkg = importlib.util.find_spec(PACKAGE)
    if pkg is None or not pkg.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed with this interpreter ({sys.executable})")
    names = []
    for location in pkg.submodule_search_locations:
        for path in sorted(Path(location).glob("test_*.py")):
            names.append(path.stem)
    return names


# ---------------------------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------------------------


def _resolve(mod: Any, dotted: str) -> Any:
    obj = mod
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _recording_loop_class(choice: _loops.LoopChoice) -> type[Any]:
    base = choice.loop_class
    try:

        class RecordingLoop(base):  # type: ignore[valid-type,misc]
            """The chosen loop, noting that shutdown_asyncgens() ran (test_runners checks)."""

            shutdown_ag_run = False

            async def shutdown_asyncgens(self) -> None:
                self.shutdown_ag_run = True
                await super().shutdown_asyncgens()

    except TypeError as exc:
        raise RuntimeError(
            f"test_runners needs a subclass of {base.__module__}.{base.__qualname__}, which "
            f"cannot be subclassed ({exc})"
        ) from exc
    return RecordingLoop


def _make_class(mod: Any, bind: Bind, bases: tuple[type, ...], choice: _loops.LoopChoice) -> type:
    attrs: dict[str, Any] = {"__module__": mod.__name__, "__qualname__": bind.name}
    holder: list[type] = []
    if bind.kind in ("create_event_loop", "new_loop"):

        def factory(self: Any) -> asyncio.AbstractEventLoop:
            return choice.new_loop()

        attrs[bind.kind] = factory
    elif bind.kind == "setUp":

        def set_up(self: Any) -> None:
            super(cast(Any, holder[0]), self).setUp()
            self.loop = choice.new_loop()
            self.set_event_loop(self.loop)

        attrs["setUp"] = set_up
    elif bind.kind == "recording_new_loop":
        recording = _recording_loop_class(choice)

        def new_loop(self: Any) -> asyncio.AbstractEventLoop:
            choice.note_created()
            return cast(asyncio.AbstractEventLoop, recording())

        attrs["new_loop"] = new_loop
    else:
        raise ValueError(f"unknown bind kind {bind.kind!r}")
    cls = type(bind.name, bases, attrs)
    holder.append(cls)
    return cls


def _patch_close_loop(test_utils: Any) -> None:
    original = test_utils.TestCase.close_loop

    def close_loop(loop: asyncio.AbstractEventLoop) -> None:
        if hasattr(loop, "_default_executor"):
            original(loop)  # asyncio's own loops (and TestLoop): the upstream code
            return
        if not loop.is_closed():
            loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    test_utils.TestCase.close_loop = staticmethod(close_loop)


_LOOP_LITERAL = re.compile(r"\b(SelectorEventLoop|ProactorEventLoop)\s*\(")


def _hardcodes_stdlib_loop(cls: type) -> bool:
    for name in ("create_event_loop", "new_loop", "setUp"):
        fn = cls.__dict__.get(name)
        if fn is None:
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if _LOOP_LITERAL.search(source):
            return True
    return False


def collect(
    spec: Spec, group: str, choice: _loops.LoopChoice, loop: str, run_excluded: bool
) -> h.Collected:
    _loops.install_default_policy(choice)
    from test.test_asyncio import utils as test_utils

    _patch_close_loop(test_utils)
    mod = importlib.import_module(f"{PACKAGE}.{spec.name}")
    # The replaced classes stay in the module (tests refer to them by name); they are only left
    # out of the suite. The runner's classes are not added to the module either: they carry its
    # __module__ (for ids and setUpModule/tearDownModule) and are loaded directly.
    loader = unittest.defaultTestLoader
    dropped = {getattr(mod, name) for name in spec.drop if hasattr(mod, name)}
    tests = [t for t in h.iter_tests(loader.loadTestsFromModule(mod)) if type(t) not in dropped]
    for b in spec.bind:
        if h.python_version() < b.since:
            continue
        cls = _make_class(mod, b, tuple(_resolve(mod, name) for name in b.bases), choice)
        tests.extend(h.iter_tests(loader.loadTestsFromTestCase(cls)))

    from expectations_test_asyncio import RULES

    exp = h.Expectations(RULES, loop, h.python_version())
    run: list[unittest.TestCase] = []
    excluded: list[tuple[str, str, str]] = []
    outside: list[str] = []
    runs_stdlib_loop: set[str] = set()
    for test in tests:
        tid = rel_id(test)
        rel = tid.split(".", 1)[1] if "." in tid else tid
        if spec.group_of(rel) != group:
            outside.append(tid)
            continue
        reason = spec.na_reason(rel)
        if reason is not None:
            excluded.append((tid, "n/a", reason))
            continue
        rule = exp.find(tid, "exclude")
        if rule is not None and not run_excluded:
            excluded.append((tid, "exclude", rule.reason))
            continue
        run.append(test)
        if _hardcodes_stdlib_loop(type(test)) and type(test).__module__ == mod.__name__:
            runs_stdlib_loop.add(type(test).__name__)
    if runs_stdlib_loop:
        raise RuntimeError(
            f"{spec.name}: classes {sorted(runs_stdlib_loop)} create asyncio's own loop "
            "classes directly; add them to the module's `drop`/`bind` or `na` in "
            "run_test_asyncio.py"
        )
    return h.Collected(run, excluded, outside)


def worker(args: argparse.Namespace) -> int:
    module, group = args.worker.split(":")
    spec = SPEC_BY_NAME[module]
    choice = _loops.LoopChoice(args.loop)
    return h.worker_main(
        events_path=args.events,
        skip_path=args.skip_file,
        test_timeout=args.test_timeout,
        collect=lambda: collect(spec, group, choice, args.loop, args.run_excluded),
        id_of=rel_id,
        loops_created=lambda: choice.created,
    )


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> tuple[list[h.Job], dict[str, str], list[str]]:
    installed = installed_modules()
    wanted = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown_wanted = [m for m in wanted if m not in SPEC_BY_NAME and m not in NOT_APPLICABLE]
    if unknown_wanted:
        raise SystemExit(f"unknown module(s): {', '.join(unknown_wanted)}")
    jobs: list[h.Job] = []
    not_applicable: dict[str, str] = {}
    unclassified = [m for m in installed if m not in SPEC_BY_NAME and m not in NOT_APPLICABLE]
    for spec in MODULES:
        if spec.name not in installed or (wanted and spec.name not in wanted):
            continue
        for group in spec.groups:
            if args.group not in ("all", group):
                continue
            name = spec.name if len(spec.groups) == 1 else f"{spec.name} [{group}]"
            weight = spec.weight / len(spec.groups)
            jobs.append(
                h.Job(
                    name,
                    spec.name,
                    group,
                    weight,
                    ("--worker", f"{spec.name}:{group}"),
                )
            )
    for name, reason in NOT_APPLICABLE.items():
        if name in installed and (not wanted or name in wanted):
            not_applicable[name] = reason
    for name in wanted:
        if name not in installed:
            print(f"note: {PACKAGE}.{name} does not exist in Python {sys.version.split()[0]}")
    return jobs, not_applicable, unclassified


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    h.add_common_args(parser, groups=GROUPS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    jobs, not_applicable, unclassified = plan(args)
    if args.list:
        for job in jobs:
            spec = SPEC_BY_NAME[job.module]
            extra = f"  (replaces {', '.join(spec.drop)})" if spec.drop else ""
            print(f"{job.name:<32} group={job.group}{extra}")
        for name, reason in not_applicable.items():
            print(f"{name:<32} not applicable: {reason}")
        return 0
    problem = _loops.check_available(args.loop)
    if problem is not None:
        print(f"error: cannot measure loop {args.loop!r}: {problem}", file=sys.stderr)
        return 2
    for name in unclassified:
        print(
            f"WARNING: {PACKAGE}.{name} is not classified in run_test_asyncio.py; not run",
            flush=True,
        )
    from expectations_test_asyncio import RULES

    env = dict(os.environ)
    env.pop("PYTHONASYNCIODEBUG", None)
    base_cmd = [
        sys.executable,
        "-X",
        "faulthandler",
        str(Path(__file__).resolve()),
        "--loop",
        args.loop,
        "--test-timeout",
        str(args.test_timeout),
        *(["--run-excluded"] if args.run_excluded else []),
    ]
    print(
        f"test_asyncio of Python {sys.version.split()[0]} on loop {args.loop}: "
        f"{len(jobs)} jobs, -j{args.jobs}",
        flush=True,
    )
    report = h.run_all(
        runner="test_asyncio",
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
    for name in unclassified:
        report.not_applicable[name] = "NOT CLASSIFIED in run_test_asyncio.py (not run)"
    return h.finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
