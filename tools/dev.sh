#!/usr/bin/env bash
# One entry point for building and testing tokioloop on every CPython 3.10-3.13
# that pyenv (or PATH) provides. Used by `make demo`, `make test` and .ci/run.
#
#   tools/dev.sh demo            build for the newest interpreter, run examples/demo.py
#   tools/dev.sh test            lint, then build + test on each interpreter
#   tools/dev.sh build [VER]     build into .venvs/VER (default: every version)
#   tools/dev.sh bench [ARGS]    build for the newest interpreter, run benchmarks/run.py
#
# TOKIOLOOP_PYTHONS="3.12 3.13" restricts the versions (default: 3.10 3.11 3.12 3.13).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
versions=${TOKIOLOOP_PYTHONS:-"3.10 3.11 3.12 3.13"}

log() { printf '\n== %s\n' "$*" >&2; }

find_python() {
    local v=$1 cand best=""
    local proot=${PYENV_ROOT:-$HOME/.pyenv}
    if command -v pyenv >/dev/null 2>&1; then proot=$(pyenv root); fi
    # newest pyenv install of this minor version (skip free-threaded "t" builds)
    for cand in $(ls -d "$proot"/versions/"$v".* 2>/dev/null | grep -E "/$v\.[0-9]+$" | sort -V); do
        [ -x "$cand/bin/python$v" ] && best="$cand/bin/python$v"
    done
    if [ -z "$best" ] && command -v "python$v" >/dev/null 2>&1; then best=$(command -v "python$v"); fi
    printf '%s' "$best"
}

venv_for() { printf '%s/.venvs/%s' "$root" "$1"; }

setup_venv() {
    local v=$1 py venv stamp want
    py=$(find_python "$v")
    if [ -z "$py" ]; then
        echo "CPython $v not found (pyenv or PATH)" >&2
        return 1
    fi
    venv=$(venv_for "$v")
    if [ ! -x "$venv/bin/python" ]; then
        log "creating $venv from $py"
        "$py" -m venv "$venv"
    fi
    stamp="$venv/.requirements.sha"
    want=$(sha256sum requirements/dev.txt | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        log "installing requirements into $venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -r requirements/dev.txt
        echo "$want" >"$stamp"
    fi
}

build() {
    local v=$1 venv
    setup_venv "$v"
    venv=$(venv_for "$v")
    log "building tokioloop for Python $v (release)"
    (
        export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
        export CARGO_TARGET_DIR="$root/target/py$v"
        maturin develop --release -q
    )
}

available_versions() {
    local v out=""
    for v in $versions; do
        if [ -n "$(find_python "$v")" ]; then out="$out $v"; else echo "note: CPython $v not available, skipped" >&2; fi
    done
    [ -n "$out" ] || { echo "no CPython 3.10-3.13 interpreter found" >&2; exit 1; }
    printf '%s' "$out"
}

newest_version() { available_versions | tr ' ' '\n' | grep . | sort -V | tail -n 1; }

lint() {
    local v venv
    v=$(newest_version)
    setup_venv "$v"
    venv=$(venv_for "$v")
    log "lint: cargo fmt --check, cargo clippy -D warnings, ruff"
    cargo fmt --check
    PYO3_PYTHON="$venv/bin/python" CARGO_TARGET_DIR="$root/target/clippy" \
        cargo clippy --all-targets -q -- -D warnings
    local dirs=""
    for d in python tests benchmarks examples; do [ -d "$d" ] && dirs="$dirs $d"; done
    # shellcheck disable=SC2086
    "$venv/bin/ruff" check $dirs
    # shellcheck disable=SC2086
    "$venv/bin/ruff" format --check $dirs
}

run_tests() {
    local v=$1 venv
    venv=$(venv_for "$v")
    log "tests on Python $v"
    (
        cd "$root"
        "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
        "$venv/bin/python" tests/conformance/run_test_asyncio.py --loop tokioloop --check
        "$venv/bin/python" tests/conformance/run_uvloop_tests.py --loop tokioloop --check
    )
}

cmd=${1:-test}
shift || true
case "$cmd" in
demo)
    v=$(newest_version)
    build "$v"
    "$(venv_for "$v")/bin/python" examples/demo.py "$@"
    ;;
build)
    for v in ${1:-$(available_versions)}; do build "$v"; done
    ;;
test)
    lint
    failed=""
    for v in $(available_versions); do
        build "$v"
        run_tests "$v" || failed="$failed $v"
    done
    if [ -n "$failed" ]; then
        log "FAILED on Python:$failed"
        exit 1
    fi
    log "all tests passed on:$(available_versions)"
    ;;
bench)
    v=$(newest_version)
    build "$v"
    "$(venv_for "$v")/bin/python" benchmarks/run.py "$@"
    ;;
*)
    echo "usage: tools/dev.sh demo|test|build [VER]|bench [ARGS]" >&2
    exit 2
    ;;
esac
