//! The event loop core: ready queue, timers, I/O readiness, wake-ups from
//! other threads, and the run loop (see core.rs).

pub(crate) mod cell;
mod clock;
pub(crate) mod core;
mod dns;
pub(crate) mod exit_safe;
mod fastcall;
pub(crate) mod handle;
pub(crate) mod io;
pub(crate) mod job;
mod malloc;
pub(crate) mod oserror;
mod pyobjs;
pub(crate) mod recycle;
pub(crate) mod selector;
pub(crate) mod sock;
mod spin;
mod timerfd;
mod timers;

use pyo3::prelude::*;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<core::LoopCore>()?;
    handle::register(m)?;
    m.add_function(wrap_pyfunction!(spin::_spin_policy_replay, m)?)?;
    m.add_function(wrap_pyfunction!(spin::_spin_policy_drive, m)?)?;
    m.add_function(wrap_pyfunction!(spin::_spin_policy_constants, m)?)?;
    fastcall::install(m.py())?;
    Ok(())
}
