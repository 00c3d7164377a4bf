"""Network suite: each server (benchmarks/servers/*.py on a named loop, or the
pure-Tokio ceiling) in its own process pinned to one CPU, driven by the Rust
load generator (benchmarks/loadgen) pinned to the other CPU.

The load generator runs one closed loop per connection, warms up, then reads
the server process's CPU time (all threads, /proc/PID/task/*/schedstat) at the
start and end of the measured window: CPU time per request is the figure that
decides, request rate and latency are reported beside it.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import HERE, ROOT, Log, LoopInfo, Settings, describe_exit, pin_to
from report import (
    NA,
    fmt_rate,
    fmt_ratio,
    fmt_size,
    fmt_spread,
    fmt_us,
    footnotes,
    markdown_table,
    median,
    spread,
    tail,
)

TOKIO = "tokio"
CARGO_TARGET = ROOT / "target" / "bench"
KiB = 1024


@dataclass(frozen=True)
class Kind:
    label: str
    script: str
    mode: str  # loadgen --mode
    tokio_mode: str | None  # tokio_echo --mode for the ceiling column


KINDS: dict[str, Kind] = {
    "protocol": Kind("TCP echo, Protocol", "tcp_protocol.py", "tcp", "tcp"),
    "streams": Kind("TCP echo, streams", "tcp_streams.py", "tcp", "tcp"),
    "sock": Kind("TCP echo, sock_*", "tcp_sock.py", "tcp", "tcp"),
    "http": Kind("HTTP/1.1 keep-alive, httptools", "http_httptools.py", "http", "http"),
    "udp": Kind("UDP echo", "udp_echo.py", "udp", "udp"),
    "tls": Kind("TLS echo, Protocol", "tls_echo.py", "tls", None),
}


@dataclass(frozen=True)
class Case:
    kind: str
    size: int  # message size (HTTP: the fixed request, size unused)
    conns: int

    @property
    def name(self) -> str:
        size = "-" if self.kind == "http" else fmt_size(self.size)
        return f"{self.kind}/{size}/{self.conns}"


def grid(quick: bool) -> list[Case]:
    if quick:
        return [Case(kind, KiB, 10) for kind in KINDS]
    cases: list[Case] = []
    for kind in ("protocol", "streams", "sock"):
        cases += [Case(kind, s, c) for s in (KiB, 10 * KiB, 100 * KiB) for c in (1, 10, 100)]
    cases += [Case("http", KiB, c) for c in (1, 10, 100)]
    cases += [Case("udp", KiB, c) for c in (1, 10)]
    cases += [Case("tls", KiB, c) for c in (1, 10, 100)]
    return cases


def tokio_case(case: Case) -> tuple[str, int, int] | None:
    """Which Tokio ceiling measurement stands beside a case (the TCP echo one
    for all three TCP APIs)."""
    mode = KINDS[case.kind].tokio_mode
    return None if mode is None else (mode, case.size, case.conns)


# --- building the Rust parts -------------------------------------------------


def build_rust(name: str, log: Log) -> Path | str:
    """cargo build --release benchmarks/NAME; the binary's path, or why not."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(cargo).exists():
        return "cargo not found"
    manifest = HERE / name / "Cargo.toml"
    log(f"[net] cargo build --release {manifest.relative_to(ROOT)}")
    env = dict(os.environ, CARGO_TARGET_DIR=str(CARGO_TARGET))
    proc = subprocess.run(
        [cargo, "build", "--release", "--locked", "-q", "--manifest-path", str(manifest)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return f"cargo build {name} failed: {tail(proc.stderr, 5)}"
    return CARGO_TARGET / "release" / name


# --- TLS certificate ------------------------------------------------------------


def make_certificate(directory: Path, log: Log) -> tuple[str, str | None, str]:
    """A certificate for the TLS server: (certfile, keyfile or None if the key
    is in certfile, how it was made). Self-signed at run time with the openssl
    CLI, else the `cryptography` package, else CPython's own test certificate."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl:
        proc = subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            return str(cert), str(key), "self-signed P-256, openssl CLI"
        log(f"[net] openssl req failed: {tail(proc.stderr)}")
    try:
        return _cert_with_cryptography(cert, key)
    except ImportError:
        pass
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for candidate in (
        stdlib / "test" / "certdata" / "keycert.pem",
        stdlib / "test" / "keycert.pem",
    ):
        if candidate.exists():
            return str(candidate), None, f"CPython test certificate {candidate}"
    raise RuntimeError("no openssl CLI, no cryptography package, no CPython test certificate")


def _cert_with_cryptography(cert: Path, key: Path) -> tuple[str, str, str]:
    import datetime
    import ipaddress

    from cryptography import x509  # type: ignore[import-not-found,unused-ignore]
    from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found,unused-ignore]
    from cryptography.hazmat.primitives.asymmetric import ec  # type: ignore[import-not-found,unused-ignore]
    from cryptography.x509.oid import NameOID  # type: ignore[import-not-found,unused-ignore]

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert), str(key), "self-signed P-256, cryptography package"


# --- servers ------------------------------------------------------------------


class ServerUnavailable(Exception):
    """The server could not start (unsupported feature, crash); str() = reason."""


class Server:
    def __init__(self, cmd: list[str], cpu: int | None) -> None:
        self.cmd = cmd
        self.stderr: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            preexec_fn=pin_to(cpu),
        )
        self.port = self._wait_for_port(timeout=60.0)

    def _wait_for_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                self.stop()
                raise ServerUnavailable(f"no port announced within {timeout:.0f} s")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
        sel.close()
        text = line.decode(errors="replace").strip()
        if text.startswith("PORT "):
            return int(text.split()[1])
        if text.startswith("UNSUPPORTED"):
            self.stop()
            raise ServerUnavailable(text.removeprefix("UNSUPPORTED").strip() or "unsupported")
        self.stop()
        raise ServerUnavailable(
            describe_exit(self.proc.returncode or 0, self.stderr_text()) if text == "" else text
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def death(self) -> str:
        return describe_exit(self.proc.returncode or 0, self.stderr_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- measuring ------------------------------------------------------------------


def run_client(
    loadgen: Path,
    mode: str,
    server: Server,
    case: Case,
    warmup: float,
    duration: float,
    cpu: int | None,
) -> dict[str, Any]:
    cmd = [
        str(loadgen),
        "--mode",
        mode,
        "--addr",
        f"127.0.0.1:{server.port}",
        "--conns",
        str(case.conns),
        "--size",
        str(case.size),
        "--warmup",
        str(warmup),
        "--duration",
        str(duration),
        "--server-pid",
        str(server.pid),
        "--stall",
        "5",
    ]
    timeout = warmup + duration + 30
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=pin_to(cpu)
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"load generator timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        reason = "loadgen " + describe_exit(proc.returncode, proc.stderr)
        if not server.alive():
            reason += "; server " + server.death()
        elif server.stderr_text().strip():
            reason += "; server stderr: " + tail(server.stderr_text())
        return {"ok": False, "reason": reason}
    result: dict[str, Any] = json.loads(proc.stdout)
    n = result["requests"]
    seconds = result["seconds"]
    if not n:
        return {"ok": False, "reason": "no request completed in the measured window"}
    result["ok"] = True
    result["cpu_us_per_req"] = result["server_cpu_s"] / n * 1e6
    result["server_util"] = result["server_cpu_s"] / seconds
    # Share of the window the load generator was not waiting for answers
    # (near 100%: the client, not the server, set the pace).
    result["client_util"] = 1 - result["client_idle_s"] / seconds
    busy = result.get("machine_busy_s")
    result["other_load"] = (
        None if busy is None else (busy - result["server_cpu_s"] - result["client_cpu_s"]) / seconds
    )
    return result


@dataclass
class Target:
    """One server to start: a Python loop on a kind, or the Tokio ceiling."""

    server: str  # loop name or TOKIO
    key: str  # kind, or the tokio mode
    cases: list[Case]

    def command(self, tokio_bin: Path | None, cert: tuple[str, str | None]) -> list[str]:
        if self.server == TOKIO:
            assert tokio_bin is not None
            return [str(tokio_bin), "--mode", self.key]
        cmd = [
            sys.executable,
            str(HERE / "servers" / KINDS[self.key].script),
            "--loop",
            self.server,
        ]
        if self.key == "tls":
            cmd += ["--certfile", cert[0]]
            if cert[1]:
                cmd += ["--keyfile", cert[1]]
        return cmd

    def result_key(self, case: Case) -> tuple[str, str]:
        if self.server == TOKIO:
            return (f"tokio-{self.key}/{case.size}/{case.conns}", TOKIO)
        return (case.name, self.server)


class Runner:
    """Starts one target's server, runs its cases against it (restarting it if
    it died), records results, failures and unavailability."""

    def __init__(
        self,
        loadgen: Path,
        tokio_bin: Path | None,
        cert: tuple[str, str | None],
        settings: Settings,
    ) -> None:
        self.loadgen = loadgen
        self.tokio_bin = tokio_bin
        self.cert = cert
        self.settings = settings
        self.warmup = 0.25
        self.duration = 0.8
        self.tag = "[net]"

    def warm_up_server(self, target: Target, server: Server, case: Case) -> None:
        """Serve some traffic on a fresh server, closing its connections, before
        anything is measured: a long-running server is past its first
        connections. (This matters: e.g. asyncio's first reads each map and
        unmap a 256 KiB buffer until a connection's EOF read frees one whole,
        after which glibc serves those buffers from the heap.)"""
        mode = target.key if target.server == TOKIO else KINDS[case.kind].mode
        warm = Case(case.kind, min(case.size, 16 * KiB), 10)
        for _ in range(2):
            result = run_client(
                self.loadgen, mode, server, warm, 0.0, 0.2, self.settings.client_cpu
            )
            if not result["ok"]:
                # The measured cases will report the failure with its reason.
                return

    def target(
        self,
        target: Target,
        measured: dict[tuple[str, str], list[dict[str, Any]]],
        failed: dict[tuple[str, str], str],
        unavailable: dict[tuple[str, str], str],
    ) -> None:
        log = self.settings.log
        server: Server | None = None
        try:
            for case in target.cases:
                rkey = target.result_key(case)
                if rkey in failed:
                    continue
                if server is None or not server.alive():
                    if server is not None:
                        server.stop()
                    try:
                        server = Server(
                            target.command(self.tokio_bin, self.cert), self.settings.server_cpu
                        )
                    except ServerUnavailable as exc:
                        unavailable[(target.server, target.key)] = str(exc)
                        log(f"{self.tag} {target.server} {target.key}: n/a ({exc})")
                        return
                    self.warm_up_server(target, server, case)
                mode = target.key if target.server == TOKIO else KINDS[case.kind].mode
                result = run_client(
                    self.loadgen,
                    mode,
                    server,
                    case,
                    self.warmup,
                    self.duration,
                    self.settings.client_cpu,
                )
                if result["ok"]:
                    measured.setdefault(rkey, []).append(result)
                    shown = (
                        f"{fmt_rate(result['rps'])} req/s, "
                        f"{fmt_us(result['cpu_us_per_req'])} us CPU/req, "
                        f"server {result['server_util']:.0%}, "
                        f"client busy {result['client_util']:.0%}"
                    )
                else:
                    failed[rkey] = result["reason"]
                    shown = "n/a: " + result["reason"]
                log(f"{self.tag} {rkey[0]:22} {target.server:10} {shown}")
        finally:
            if server is not None:
                server.stop()


def _group(key: str) -> int:
    """Position of a target's kind in the run order (Tokio modes with theirs)."""
    kind = {"tcp": "protocol"}.get(key, key)
    return list(KINDS).index(kind)


def run(settings: Settings, infos: dict[str, LoopInfo]) -> tuple[str, dict[str, Any]]:
    log = settings.log
    quick = settings.quick
    warmup, duration, rounds = (0.1, 0.3, 1) if quick else (0.25, 0.8, settings.rounds)
    cases = [c for c in grid(quick) if settings.selected(c.name)]
    reasons: dict[str, str] = {n: i.reason for n, i in infos.items() if not i.ok}
    loops = [lp for lp in settings.loops if infos[lp].ok]

    loadgen = build_rust("loadgen", log)
    if isinstance(loadgen, str):
        text = f"Network suite not run: the load generator could not be built ({loadgen})."
        return text, {"error": loadgen}
    tokio_bin = build_rust("tokio_echo", log)
    if isinstance(tokio_bin, str):
        reasons[TOKIO] = tokio_bin

    certdir = Path(tempfile.mkdtemp(prefix="tokioloop-bench-"))
    try:
        certfile, keyfile, cert_how = make_certificate(certdir, log)
    except RuntimeError as exc:
        certfile, keyfile, cert_how = "", None, ""
        reasons["TLS"] = str(exc)
        cases = [c for c in cases if c.kind != "tls"]

    targets: list[Target] = []
    for kind in KINDS:
        kind_cases = [c for c in cases if c.kind == kind]
        if kind_cases:
            targets += [Target(lp, kind, kind_cases) for lp in loops]
    if not isinstance(tokio_bin, str):
        tokio_modes: dict[str, list[Case]] = {}
        for case in cases:
            mode = KINDS[case.kind].tokio_mode
            if mode is None:
                continue
            same = [
                c
                for c in tokio_modes.setdefault(mode, [])
                if (c.size, c.conns) == (case.size, case.conns)
            ]
            if not same:
                tokio_modes[mode].append(case)
        targets += [Target(TOKIO, mode, cs) for mode, cs in tokio_modes.items()]

    measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
    failed: dict[tuple[str, str], str] = {}
    unavailable: dict[tuple[str, str], str] = {}  # (server, kind or tokio mode) -> reason
    run_one = Runner(
        loadgen, None if isinstance(tokio_bin, str) else tokio_bin, (certfile, keyfile), settings
    )
    run_one.warmup, run_one.duration = warmup, duration
    started = time.monotonic()
    try:
        for rnd in range(rounds):
            run_one.tag = f"[net {rnd + 1}/{rounds}]"
            # Rotate the servers from round to round, keeping kinds together.
            shift = rnd % len(targets) if targets else 0
            order = sorted(targets[shift:] + targets[:shift], key=lambda t: _group(t.key))
            for target in order:
                if (target.server, target.key) in unavailable:
                    continue
                run_one.target(target, measured, failed, unavailable)
    finally:
        shutil.rmtree(certdir, ignore_errors=True)
    elapsed = time.monotonic() - started

    # --- tables ---
    subject = settings.subject
    columns = list(settings.loops) + ([TOKIO] if TOKIO not in reasons else [])
    others = [lp for lp in settings.loops if lp != subject]

    def results_for(case: Case, server: str) -> tuple[list[dict[str, Any]], str, str | None]:
        """The rounds measured for a cell, else a footnote key and reason."""
        label = KINDS[case.kind].label
        if server == TOKIO:
            tk = tokio_case(case)
            if tk is None:
                return [], f"{TOKIO} / {label}", "the Tokio ceiling has no TLS server"
            rkey = (f"tokio-{tk[0]}/{tk[1]}/{tk[2]}", TOKIO)
            whole = unavailable.get((TOKIO, tk[0]))
        else:
            rkey = (case.name, server)
            whole = unavailable.get((server, case.kind))
        if whole is not None:
            return [], f"{server} / {label}", whole
        return measured.get(rkey, []), f"{server} / {case.name}", failed.get(rkey)

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in rs if r.get(key) is not None]) if rs else float("nan")

    na_notes: dict[str, str] = {}
    summary_rows: list[list[str]] = []
    detail_rows: list[list[str]] = []
    data: list[dict[str, Any]] = []
    for case in cases:
        label = KINDS[case.kind].label
        size = "-" if case.kind == "http" else fmt_size(case.size)
        srow = [label, size, str(case.conns)]
        cpu: dict[str, float] = {}
        for server in columns:
            rs, note_key, why = results_for(case, server)
            if rs:
                if why:  # measured in some rounds, failed in a later one
                    na_notes[f"{note_key} (one round failed, cell from {len(rs)})"] = why
                values = [r["cpu_us_per_req"] for r in rs]
                cpu[server] = median(values)
                srow.append(f"{fmt_us(cpu[server])} {fmt_spread(spread(values))}".strip())
                detail_rows.append(
                    [
                        label,
                        size,
                        str(case.conns),
                        server,
                        fmt_rate(med(rs, "rps")),
                        fmt_us(med(rs, "p50_us")),
                        fmt_us(med(rs, "p99_us")),
                        fmt_us(cpu[server]),
                        f"{med(rs, 'server_util'):.0%}",
                        f"{med(rs, 'client_util'):.0%}",
                        f"{max(0.0, med(rs, 'other_load')):.2f}",
                    ]
                )
            else:
                srow.append(NA)
                if server not in reasons:
                    na_notes[note_key] = why or "no result"
            data.append({"case": case.name, "server": server, "rounds": rs, "n/a": why})
        for other in others:
            if subject in cpu and other in cpu:
                srow.append(fmt_ratio(cpu[other] / cpu[subject]))
            else:
                srow.append(NA)
        summary_rows.append(srow)
    all_notes = {**reasons, **na_notes}

    summary_headers = (
        ["scenario", "msg", "conns"]
        + [f"{s} (ceiling)" if s == TOKIO else s for s in columns]
        + [f"{o}/{subject}" for o in others]
    )
    detail_headers = [
        "scenario",
        "msg",
        "conns",
        "server",
        "req/s",
        "p50 us",
        "p99 us",
        "CPU us/req",
        "server CPU",
        "client busy",
        "other load",
    ]
    text = "\n".join(
        [
            f"Network: server CPU time per request in microseconds (lower is better), median of "
            f"{rounds} round(s) of {duration} s after {warmup} s warm-up; ± is half the min-max "
            f"range. Ratios are the other loop's CPU per request over {subject}'s "
            f"(> 1: {subject} uses less CPU). Server pinned to CPU {settings.server_cpu}, "
            f"load generator to CPU {settings.client_cpu}.",
            "",
            markdown_table(summary_headers, summary_rows, right=2),
            "",
            "Details (medians): requests/s and latency of the closed-loop client; CPU "
            "utilisation of the server; share of the window the (busy-polling) load "
            "generator was not waiting for answers (near 100%: the client set the pace); "
            "other load on the machine during the window (CPUs busy with anything else).",
            "",
            markdown_table(detail_headers, detail_rows, right=4),
            footnotes(all_notes),
        ]
    ).rstrip()
    meta = {
        "rounds": rounds,
        "warmup_seconds": warmup,
        "duration_seconds": duration,
        "server_cpu": settings.server_cpu,
        "client_cpu": settings.client_cpu,
        "tls_certificate": cert_how,
        "elapsed_seconds": elapsed,
        "subject": subject,
    }
    return text, {"settings": meta, "results": data, "n/a": all_notes}
