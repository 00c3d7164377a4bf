//! What the ready queue holds.

use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::PyTraverseError;

use super::handle::HandleRef;
use super::selector::NativeReader;
use super::sock::SockOp;
use crate::transports::stream::{StreamCore, StreamJob};
use crate::transports::Source;

pub(crate) enum Job {
    /// A Python callback scheduled with call_soon & co., or a reader/writer.
    Handle(HandleRef),
    /// A native socket operation whose fd became ready: retry it.
    Io(RawFd, u32, Arc<dyn SockOp>),
    /// A blocking-pool result (getaddrinfo & co.) for its future.
    Resolve(Py<PyAny>, PyResult<Py<PyAny>>),
    /// Deferred work of a stream transport (start, connection_lost, ...).
    Stream(Py<StreamCore>, StreamJob),
    /// A transport's fd is ready (kind: READ or WRITE).
    Source(Source, u8),
    /// A native reader's fd is readable.
    Reader(Arc<dyn NativeReader>),
}

impl Job {
    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Job::Handle(h) => h.visit_queued(visit),
            Job::Io(_, _, op) => op.visit(visit),
            Job::Resolve(fut, res) => {
                visit.call(fut)?;
                match res {
                    Ok(v) => visit.call(v),
                    // An exception's references are not reachable through
                    // PyErr without normalising it; it is short-lived.
                    Err(_) => Ok(()),
                }
            }
            Job::Stream(core, job) => {
                visit.call(core)?;
                job.visit(visit)
            }
            Job::Source(s, _) => s.visit(visit),
            Job::Reader(r) => r.visit(visit),
        }
    }
}

/// `push` for both Vec and VecDeque.
pub(crate) trait Extend1<T> {
    fn push1(&mut self, v: T);
}
impl<T> Extend1<T> for Vec<T> {
    fn push1(&mut self, v: T) {
        self.push(v)
    }
}
impl<T> Extend1<T> for std::collections::VecDeque<T> {
    fn push1(&mut self, v: T) {
        self.push_back(v)
    }
}
