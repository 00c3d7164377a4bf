//! What the ready queue holds.

use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::PyTraverseError;

use super::handle::HandleRef;
use super::selector::NativeReader;
use super::sock::SockOp;
use crate::transports::Source;

pub(crate) type NativeFn = Box<dyn FnOnce(Python<'_>) -> PyResult<()> + Send>;

pub(crate) enum Job {
    /// A Python callback scheduled with call_soon & co., or a reader/writer.
    Handle(HandleRef),
    /// A native socket operation whose fd became ready: retry it.
    Io(RawFd, u32, Arc<dyn SockOp>),
    /// Native work handed over from another thread (DNS results, ...).
    Call(NativeFn),
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
            Job::Call(_) => Ok(()),
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
