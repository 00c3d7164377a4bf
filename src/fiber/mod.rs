//! Fibers: CPython code on corosensei stacks, and await from synchronous
//! code built on them.
//!
//! Layout:
//! * `shim` (+ csrc/fiber_shim.c): saving/restoring the interpreter's
//!   per-thread state for each supported CPython version.
//! * `stack`: the stack pool (slabs, guard pages, reuse, memory).
//! * `core`: the fiber engine (resume/suspend, thread binding, kill/leak,
//!   runner fibers for coroutine steps).
//! * `anywhere`: `await_`, `run_anywhere`, `AnywhereCoroutine`.
//! * `pyfiber`: the low-level `Fiber` class (tests, advanced use).
//!
//! Supported: CPython 3.10-3.13, GIL builds, x86-64/aarch64 Linux and macOS
//! (corosensei's targets). The shim refuses to compile for 3.14+ and for
//! free-threaded builds: 3.14 checks the C stack pointer against per-thread
//! bounds that must be swapped per fiber (`c_stack_soft_limit`/
//! `c_stack_hard_limit`, or `PyUnstable_ThreadState_SetStackProtection`),
//! and free-threaded builds need per-fiber critical sections and GC visits
//! of suspended frames' deferred references.
//!
//! Recursion budgets (why a fiber raises RecursionError instead of
//! crashing): a fiber starts at Python recursion depth 0 with the thread's
//! recursion limit. On 3.10 every Python call uses C stack, on 3.11 calls
//! through C code do, and both are counted against that one limit: with
//! `BYTES_PER_LEVEL` per unit the 8 MiB default fiber stack (what a thread
//! gets) covers recursion limits up to ~2000, twice the default, like a
//! thread. 3.12+ count C-level recursion separately against a fixed budget
//! that assumes a thread's 8 MiB stack (1500 units on 3.12, 10000 on 3.13,
//! which can overflow a thread's stack through heavy C paths); a fiber gets
//! `(stack - RESERVE) / BYTES_PER_LEVEL` units (2016 at 8 MiB), capped at
//! the thread default, whatever the Python recursion limit is.
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod anywhere;
mod core;
mod pyfiber;
mod shim;
pub(crate) mod stack;

/// Default virtual size of a fiber's C stack (a thread's default).
const DEFAULT_STACK: usize = 8 << 20;
/// Smallest stack `TOKIOLOOP_FIBER_STACK_KB` may ask for.
const MIN_STACK: usize = 256 << 10;
/// Largest stack `TOKIOLOOP_FIBER_STACK_KB` may ask for.
const MAX_STACK: usize = 1 << 30;
/// Pages at the top of each slot for the frame data-stack root chunk
/// (3.11+; CPython's own chunks are 16 KiB). See stack::Geometry.
const CHUNK_PAGES: usize = 5;
/// C stack bytes assumed per counted recursion unit: 3.12+ C recursion
/// units, 3.10/3.11 recursion-limit units. The worst we measured on
/// 3.10-3.13 is 1.65 KB (`sorted(key=...)`; ctypes callbacks 0.96 KB,
/// sqlite3 functions 0.56 KB, most paths 0.2-0.7 KB), see
/// benchmarks/anywhere/measure_stack.py; 4 KiB leaves a 2.4x margin.
const BYTES_PER_LEVEL: usize = 4 << 10;
/// C stack kept free below the deepest budgeted level: our own frames, a
/// signal handler, and the overshoot of the last level.
const RESERVE: usize = 128 << 10;
/// Smallest fiber stack on 3.10/3.11: CPython's default recursion limit
/// (1000) of levels plus the reserve.
const PY310_MIN_STACK: usize = 1000 * BYTES_PER_LEVEL + RESERVE;

fn stack_size_from_env() -> usize {
    std::env::var("TOKIOLOOP_FIBER_STACK_KB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|kb| (kb.saturating_mul(1024)).clamp(MIN_STACK, MAX_STACK))
        .unwrap_or(DEFAULT_STACK)
}

pub(crate) use anywhere::needs_thread_stack;
pub(crate) use core::on_thread_stack;

/// `AnywhereCoroutine(coro)`: the coroutine of an await-anywhere task.
pub(crate) fn anywhere_coroutine<'py>(
    py: Python<'py>,
    coro: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    Ok(Bound::new(py, anywhere::AnywhereCoroutine::wrap(coro.clone().unbind()))?.into_any())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    shim::check_layout().map_err(PyRuntimeError::new_err)?;
    // SAFETY: pure functions returning compile-time constants.
    let (version, c_default) = unsafe {
        (
            shim::tlf_py_version_hex() as u32,
            shim::tlf_c_recursion_default(),
        )
    };
    let minor = (version >> 16) & 0xff;
    let mut stack_size = stack_size_from_env();
    if minor < 12 {
        // 3.10/3.11 have no C recursion budget to scale to a small stack:
        // only the recursion limit (a fiber starts at depth 0) bounds the
        // C stack a fiber uses, so a stack must hold the default limit's
        // worth of levels, or deep recursion through C frames would
        // overflow it (SIGSEGV) instead of raising RecursionError.
        stack_size = stack_size.max(PY310_MIN_STACK);
    }
    let chunk_pages = if minor >= 11 { CHUNK_PAGES } else { 0 };
    let c_budget = if minor >= 12 {
        let fit = (stack_size.saturating_sub(RESERVE) / BYTES_PER_LEVEL) as i32;
        fit.min(c_default).max(1)
    } else {
        0
    };
    let geometry = stack::init_geometry(stack_size, chunk_pages);
    core::set_config(core::Config {
        c_budget,
        c_default,
        bytes_per_level: BYTES_PER_LEVEL,
        stack_size: geometry.stack_size,
        chunk_size: geometry.chunk_size,
        py_version: version,
    });
    anywhere::register(m)?;
    pyfiber::register(m)?;
    Ok(())
}
