//! Level-triggered readiness for `add_reader`/`add_writer` and the sock_*
//! methods, with asyncio's semantics: a callback is called on every loop
//! iteration while its fd stays ready.
//!
//! The fds live in a private epoll instance in level-triggered mode. That
//! epoll fd is itself registered with Tokio's reactor (see io.rs), so the
//! loop still sleeps in Tokio; when Tokio reports the private epoll readable,
//! or on any iteration that polls I/O, one `epoll_wait(0)` collects the ready
//! fds, exactly what asyncio's selector does.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::prelude::*;

use super::handle::HandleRef;
use super::job::{Extend1, Job};

pub(crate) const READ: u32 = libc::EPOLLIN as u32;
pub(crate) const WRITE: u32 = libc::EPOLLOUT as u32;

/// A native callback run on every readiness event of its fd (level
/// triggered), like a reader Handle but without a Python call to get there.
pub(crate) trait NativeReader: Send + Sync {
    fn on_ready(&self, py: Python<'_>) -> PyResult<()>;
    fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError>;
}

/// What a readiness event runs.
pub(crate) enum Watcher {
    /// A native reader (datagram transports).
    Reader(Arc<dyn NativeReader>),
    /// A user callback (add_reader/add_writer).
    Py(HandleRef),
    /// An internal operation (sock_recv and friends), retried on readiness.
    Native(Arc<dyn super::sock::SockOp>),
}

impl Watcher {
    fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        match self {
            Watcher::Py(h) => visit.call(h.as_py()),
            Watcher::Native(op) => op.visit(visit),
            Watcher::Reader(r) => r.visit(visit),
        }
    }
}

#[derive(Default)]
pub(crate) struct Entry {
    pub(crate) reader: Option<Watcher>,
    pub(crate) writer: Option<Watcher>,
}

impl Entry {
    fn mask(&self) -> u32 {
        (if self.reader.is_some() { READ } else { 0 })
            | (if self.writer.is_some() { WRITE } else { 0 })
    }
}

#[derive(Default)]
pub(crate) struct Selector {
    entries: HashMap<RawFd, Entry>,
}

fn ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, mask: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: mask,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads the event struct we own; invalid fds are
    // reported through errno, never undefined behaviour.
    let rc = unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Register, modify or unregister `fd` so that epoll watches exactly `mask`.
/// Copes with fds that were closed (and maybe reused) behind our back, as
/// the kernel drops closed fds from epoll silently.
fn apply(epfd: RawFd, fd: RawFd, old: u32, new: u32) -> io::Result<()> {
    if new == 0 {
        if old != 0 {
            // ENOENT/EBADF: the fd was closed already; nothing to undo.
            let _ = ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0);
        }
        return Ok(());
    }
    if old == 0 {
        match ctl(epfd, libc::EPOLL_CTL_ADD, fd, new) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                ctl(epfd, libc::EPOLL_CTL_MOD, fd, new)
            }
            r => r,
        }
    } else {
        match ctl(epfd, libc::EPOLL_CTL_MOD, fd, new) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                ctl(epfd, libc::EPOLL_CTL_ADD, fd, new)
            }
            r => r,
        }
    }
}

impl Selector {
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Install `w` as the reader (`kind == READ`) or writer of `fd`; the
    /// watcher it replaces is returned for the caller to cancel and drop
    /// outside any lock.
    pub(crate) fn add(
        &mut self,
        epfd: RawFd,
        fd: RawFd,
        kind: u32,
        w: Watcher,
    ) -> Result<Option<Watcher>, (io::Error, Watcher)> {
        let entry = self.entries.entry(fd).or_default();
        let old_mask = entry.mask();
        let slot = if kind == READ {
            &mut entry.reader
        } else {
            &mut entry.writer
        };
        let prev = slot.replace(w);
        let new_mask = entry.mask();
        if let Err(e) = apply(epfd, fd, old_mask, new_mask) {
            // Undo: put back what was there and hand the new watcher back to
            // the caller, who drops it once no lock is held.
            let entry = self.entries.get_mut(&fd).expect("just inserted");
            let slot = if kind == READ {
                &mut entry.reader
            } else {
                &mut entry.writer
            };
            let failed = std::mem::replace(slot, prev).expect("just set");
            if entry.mask() == 0 {
                self.entries.remove(&fd);
            }
            return Err((e, failed));
        }
        Ok(prev)
    }

    /// Remove the reader or writer of `fd`, returning it.
    pub(crate) fn remove(&mut self, epfd: RawFd, fd: RawFd, kind: u32) -> Option<Watcher> {
        let entry = self.entries.get_mut(&fd)?;
        let old_mask = entry.mask();
        let prev = if kind == READ {
            entry.reader.take()
        } else {
            entry.writer.take()
        };
        prev.as_ref()?;
        let new_mask = entry.mask();
        if new_mask == 0 {
            self.entries.remove(&fd);
        }
        let _ = apply(epfd, fd, old_mask, new_mask);
        prev
    }

    pub(crate) fn has(&self, fd: RawFd, kind: u32) -> bool {
        self.entries.get(&fd).is_some_and(|e| {
            if kind == READ {
                e.reader.is_some()
            } else {
                e.writer.is_some()
            }
        })
    }

    /// Turn raw epoll events into ready-queue work. Everything stays
    /// registered (level-triggered, as asyncio) except cancelled handles;
    /// native operations unregister themselves when they finish.
    pub(crate) fn dispatch(
        &mut self,
        py: Python<'_>,
        epfd: RawFd,
        events: &[libc::epoll_event],
        ready: &mut impl Extend1<Job>,
        garbage: &mut Vec<Watcher>,
    ) {
        for ev in events {
            let fd = ev.u64 as RawFd;
            let bits = ev.events;
            // As selectors.EpollSelector: anything but EPOLLOUT (HUP, ERR)
            // wakes the reader, anything but EPOLLIN wakes the writer.
            let readable = bits & !WRITE != 0;
            let writable = bits & !READ != 0;
            for (kind, hit) in [(READ, readable), (WRITE, writable)] {
                if !hit {
                    continue;
                }
                let Some(entry) = self.entries.get(&fd) else {
                    continue;
                };
                let slot = if kind == READ {
                    &entry.reader
                } else {
                    &entry.writer
                };
                let take = match slot {
                    Some(Watcher::Py(h)) if !h.get().is_cancelled() => {
                        ready.push1(Job::Handle(h.clone_ref(py)));
                        false
                    }
                    Some(Watcher::Py(_)) => true,
                    // Native operations stay registered until they finish.
                    Some(Watcher::Native(op)) => {
                        ready.push1(Job::Io(fd, kind, op.clone()));
                        false
                    }
                    Some(Watcher::Reader(r)) => {
                        ready.push1(Job::Reader(r.clone()));
                        false
                    }
                    None => false,
                };
                if take {
                    if let Some(w) = self.remove(epfd, fd, kind) {
                        garbage.push(w);
                    }
                }
            }
        }
    }

    /// The id of the native operation registered on `fd`, if any.
    pub(crate) fn op_id(&self, fd: RawFd, kind: u32) -> Option<u64> {
        let e = self.entries.get(&fd)?;
        match if kind == READ { &e.reader } else { &e.writer } {
            Some(Watcher::Native(op)) => Some(op.id()),
            _ => None,
        }
    }

    /// Unregister everything (loop closing); the watchers go to `garbage`.
    pub(crate) fn drain(&mut self, epfd: RawFd, garbage: &mut Vec<Watcher>) {
        for (fd, e) in std::mem::take(&mut self.entries) {
            let _ = ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0);
            garbage.extend(e.reader);
            garbage.extend(e.writer);
        }
    }

    pub(crate) fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        for e in self.entries.values() {
            if let Some(w) = &e.reader {
                w.visit(visit)?;
            }
            if let Some(w) = &e.writer {
                w.visit(visit)?;
            }
        }
        Ok(())
    }
}
