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
//! through C code do, and both are counted against that one limit; at the
//! default limit (1000) the worst C stack use we measured per level
//! (`BYTES_PER_LEVEL`, a `sorted(key=...)` recursion) fits in the 8 MiB
//! default fiber stack, the same size a thread gets. 3.12+ count C-level
//! recursion separately against a fixed budget that assumes a thread's
//! 8 MiB stack; a fiber gets `(stack - RESERVE) / BYTES_PER_LEVEL`, capped
//! at the thread default.
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

mod anywhere;
mod core;
mod pyfiber;
mod shim;
mod stack;

/// Default virtual size of a fiber's C stack (a thread's default).
const DEFAULT_STACK: usize = 8 << 20;
/// Smallest stack `TOKIOLOOP_FIBER_STACK_KB` may ask for.
const MIN_STACK: usize = 256 << 10;
/// Largest stack `TOKIOLOOP_FIBER_STACK_KB` may ask for.
const MAX_STACK: usize = 1 << 30;
/// Frame data-stack root chunk at the top of each slot (3.11+).
const CHUNK: usize = 16 << 10;
/// Worst C stack bytes per recursion unit/level we measured, with margin
/// (benchmarks/anywhere/measure_stack.py).
const BYTES_PER_LEVEL: usize = 6 << 10;
/// C stack kept free below the deepest budgeted level: our own frames, a
/// signal handler, and the overshoot of the last level.
const RESERVE: usize = 128 << 10;

fn stack_size_from_env() -> usize {
    std::env::var("TOKIOLOOP_FIBER_STACK_KB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|kb| (kb.saturating_mul(1024)).clamp(MIN_STACK, MAX_STACK))
        .unwrap_or(DEFAULT_STACK)
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
    let stack_size = stack_size_from_env();
    let chunk_size = if minor >= 11 { CHUNK } else { 0 };
    let c_budget = if minor >= 12 {
        let fit = (stack_size.saturating_sub(RESERVE) / BYTES_PER_LEVEL) as i32;
        fit.min(c_default).max(1)
    } else {
        0
    };
    let cfg = core::set_config(core::Config {
        c_budget,
        c_default,
        bytes_per_level: BYTES_PER_LEVEL,
        stack_size,
        chunk_size,
        py_version: version,
    });
    stack::init_geometry(cfg.stack_size, cfg.chunk_size);
    anywhere::register(m)?;
    pyfiber::register(m)?;
    Ok(())
}
