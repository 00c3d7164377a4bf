//! tokioloop: an asyncio event loop driven by Tokio, with await from
//! synchronous code on stackful coroutines ("fibers").
//!
//! Layers (see README): `loop` owns the ready queue, timers, I/O readiness
//! and the run loop; `fiber` owns stacks and interpreter-state switching;
//! `transports` owns sockets, pipes and processes.

use pyo3::prelude::*;

#[path = "loop/mod.rs"]
mod event_loop;
mod fiber;
mod transports;

#[pymodule]
fn _tokioloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    event_loop::register(m)?;
    transports::register(m)?;
    fiber::register(m)?;
    Ok(())
}
