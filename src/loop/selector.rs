//! Level-triggered readiness for `add_reader`/`add_writer` and the sock_*
//! methods, with asyncio's semantics: a callback is called on every loop
//! iteration while its fd stays ready.
//!
//! The fds live in a private epoll instance in level-triggered mode. That
//! epoll fd is itself registered with Tokio's reactor (see io.rs), so the
//! loop still sleeps in Tokio; when Tokio reports the private epoll readable,
//! or on any iteration that polls I/O, one `epoll_wait(0)` collects the ready
//! fds, exactly what asyncio's selector does.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use pyo3::prelude::*;
use rustc_hash::FxHashMap;

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
    /// An internal operation (sock_recv and friends), retried on readiness,
    /// with the io-ref that keeps its socket open while it is pending.
    Native(Arc<dyn super::sock::SockOp>, super::sock::IoRef),
}

impl Watcher {
    fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        match self {
            Watcher::Py(h) => visit.call(h.as_py()),
            Watcher::Native(op, io) => {
                op.visit(visit)?;
                io.visit(visit)
            }
            Watcher::Reader(r) => r.visit(visit),
        }
    }
}

#[derive(Default)]
pub(crate) struct Entry {
    pub(crate) reader: Option<Watcher>,
    pub(crate) writer: Option<Watcher>,
    /// Directions a native socket operation registered edge-triggered and
    /// left registered when it finished, so that the next operation on the
    /// same socket needs no epoll_ctl (sock_recv/sock_sendall on a
    /// connection pay no register/unregister syscalls per call).
    sticky: u32,
    /// The socket those operations were for: the registration is only
    /// reused for the same (still open) socket object, never for another
    /// socket that got the same fd number after a close.
    owner: Option<Py<PyAny>>,
    /// The object add_reader/add_writer got (a socket, a file, an int), as
    /// asyncio's SelectorKey.fileobj: remove_reader finds the fd of a socket
    /// closed since (fileno() -1) by it.
    fileobj: Option<Py<PyAny>>,
    /// What epoll has for this fd now (0: not registered).
    registered: u32,
}

const ET: u32 = libc::EPOLLET as u32;

impl Entry {
    fn slot(&mut self, kind: u32) -> &mut Option<Watcher> {
        if kind == READ {
            &mut self.reader
        } else {
            &mut self.writer
        }
    }

    fn is_active(&self) -> bool {
        self.reader.is_some() || self.writer.is_some()
    }

    fn has_callback(&self) -> bool {
        matches!(self.reader, Some(Watcher::Py(_))) || matches!(self.writer, Some(Watcher::Py(_)))
    }

    /// The epoll mask this entry needs: level-triggered (asyncio's
    /// semantics) as soon as any Python callback or native reader is
    /// there; edge-triggered when only native socket operations are, with
    /// their finished directions kept.
    fn desired(&self) -> u32 {
        let level =
            |w: &Option<Watcher>| matches!(w, Some(Watcher::Py(_)) | Some(Watcher::Reader(_)));
        let r = self.reader.is_some();
        let w = self.writer.is_some();
        if level(&self.reader) || level(&self.writer) {
            return (if r { READ } else { 0 }) | (if w { WRITE } else { 0 });
        }
        let m = (if r || self.sticky & READ != 0 {
            READ
        } else {
            0
        }) | (if w || self.sticky & WRITE != 0 {
            WRITE
        } else {
            0
        });
        if m == 0 {
            0
        } else {
            m | ET
        }
    }
}

#[derive(Default)]
pub(crate) struct Selector {
    /// By fd (FxHash: an fd is a small int, and the map is looked up on
    /// every readiness event).
    entries: FxHashMap<RawFd, Entry>,
    /// Entries with at least one watcher.
    active: usize,
    /// Entries with a Python callback (add_reader/add_writer), which busy
    /// iterations look at (see `LoopCore::run_once`), not counting `quiet`.
    with_callbacks: usize,
    /// The loop's own self-pipe (signals), whose callback does not count.
    quiet: Option<RawFd>,
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

/// Register, modify or unregister `fd` so that epoll watches exactly `new`.
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

/// Old watchers and socket references that leave the selector; the caller
/// drops them once the loop state is not borrowed.
pub(crate) type Leftovers = (Option<Watcher>, Option<Py<PyAny>>);

impl Selector {
    /// Whether any fd has a watcher (then the private epoll must be polled).
    pub(crate) fn is_empty(&self) -> bool {
        self.active == 0
    }

    /// How many fds have an add_reader/add_writer callback, the quiet one
    /// aside.
    pub(crate) fn with_callbacks(&self) -> usize {
        self.with_callbacks
    }

    /// Leave `fd`'s callback out of `with_callbacks` (None: count every fd).
    pub(crate) fn set_quiet(&mut self, fd: Option<RawFd>) {
        let counted = |s: &Self, fd: Option<RawFd>| {
            fd.and_then(|fd| s.entries.get(&fd))
                .is_some_and(Entry::has_callback)
        };
        if counted(self, self.quiet) {
            self.with_callbacks += 1;
        }
        if counted(self, fd) {
            self.with_callbacks -= 1;
        }
        self.quiet = fd;
    }

    /// Keep the counts true across a change of `fd`'s entry: `was`/`now` are
    /// (has a watcher, has a Python callback) before and after.
    fn recount(&mut self, fd: RawFd, was: (bool, bool), now: (bool, bool)) {
        match (was.0, now.0) {
            (false, true) => self.active += 1,
            (true, false) => self.active -= 1,
            _ => {}
        }
        if self.quiet == Some(fd) {
            return;
        }
        match (was.1, now.1) {
            (false, true) => self.with_callbacks += 1,
            (true, false) => self.with_callbacks -= 1,
            _ => {}
        }
    }

    /// Bring epoll in line with the entry (`force`: even if the mask looks
    /// the same, as the registration may belong to a closed file).
    fn sync(epfd: RawFd, fd: RawFd, e: &mut Entry, force: bool) -> io::Result<()> {
        let want = e.desired();
        if want == e.registered && !force {
            return Ok(());
        }
        let old = if force && e.registered == want {
            want
        } else {
            e.registered
        };
        let r = apply(epfd, fd, old, want);
        e.registered = if r.is_ok() { want } else { 0 };
        if want == 0 {
            e.registered = 0;
        }
        r
    }

    /// Install `w` as the reader (`kind == READ`) or writer of `fd`; the
    /// watcher it replaces is returned for the caller to cancel and drop
    /// outside any lock. `owner`: the socket a native operation is for.
    pub(crate) fn add(
        &mut self,
        epfd: RawFd,
        fd: RawFd,
        kind: u32,
        w: Watcher,
        owner: Option<&Bound<'_, PyAny>>,
    ) -> Result<Leftovers, (io::Error, Watcher)> {
        let entry = self.entries.entry(fd).or_default();
        let was_active = entry.is_active();
        let was_cb = entry.has_callback();
        let mut old_owner = None;
        let force = match owner {
            // A native operation: reuse the registration only for the very
            // socket object it was made for.
            Some(o) => {
                let same = entry
                    .owner
                    .as_ref()
                    .is_some_and(|p| p.as_ptr() == o.as_ptr());
                if !same {
                    old_owner = entry.owner.replace(o.clone().unbind());
                    entry.sticky = 0;
                }
                !same
            }
            None => {
                // Python callbacks are level-triggered: drop stickiness.
                if entry.sticky != 0 || entry.owner.is_some() {
                    entry.sticky = 0;
                    old_owner = entry.owner.take();
                }
                false
            }
        };
        let prev = entry.slot(kind).replace(w);
        if let Err(e) = Self::sync(epfd, fd, entry, force || was_active != entry.is_active()) {
            // Undo: put back what was there and hand the new watcher back to
            // the caller, who drops it once no lock is held.
            let failed = std::mem::replace(entry.slot(kind), prev).expect("just set");
            let _ = Self::sync(epfd, fd, entry, false);
            if !entry.is_active() && entry.sticky == 0 {
                self.entries.remove(&fd);
            }
            drop(old_owner);
            return Err((e, failed));
        }
        let now = (entry.is_active(), entry.has_callback());
        self.recount(fd, (was_active, was_cb), now);
        Ok((prev, old_owner))
    }

    /// Remember `obj` as the object `fd` was registered for (see
    /// `Entry::fileobj`); returns what it replaces (or `obj` itself when
    /// nothing is registered), to be released outside the state.
    pub(crate) fn set_fileobj(&mut self, fd: RawFd, obj: Py<PyAny>) -> Option<Py<PyAny>> {
        match self.entries.get_mut(&fd) {
            Some(e) => e.fileobj.replace(obj),
            None => Some(obj),
        }
    }

    /// The fd registered for the object `obj` (by identity), as asyncio's
    /// selectors find a key when the object no longer has a valid fileno().
    pub(crate) fn fd_of(&self, obj: &Bound<'_, PyAny>) -> Option<RawFd> {
        self.entries
            .iter()
            .find(|(_, e)| e.fileobj.as_ref().is_some_and(|o| o.is(obj)))
            .map(|(fd, _)| *fd)
    }

    /// Remove the reader or writer of `fd` (asyncio's remove_reader &
    /// co.), returning it; the fd is unregistered when nothing is left.
    pub(crate) fn remove(&mut self, epfd: RawFd, fd: RawFd, kind: u32) -> Option<Leftovers> {
        let entry = self.entries.get_mut(&fd)?;
        let was = (entry.is_active(), entry.has_callback());
        let prev = entry.slot(kind).take();
        entry.sticky &= !kind;
        prev.as_ref()?;
        let _ = Self::sync(epfd, fd, entry, false);
        let now_active = entry.is_active();
        let now_cb = entry.has_callback();
        let owner = if !now_active && entry.sticky == 0 {
            // The socket of a native operation, or else the object given to
            // add_reader/add_writer, is released by the caller outside the
            // state (both at once only when both were used on one fd: then
            // the same socket, which the owner keeps alive).
            self.entries.remove(&fd).and_then(|e| e.owner.or(e.fileobj))
        } else {
            None
        };
        self.recount(fd, was, (now_active, now_cb));
        Some((prev, owner))
    }

    /// A native operation finished: take it out but keep the fd registered
    /// (edge-triggered) for the next operation on the same socket.
    pub(crate) fn finish_op(
        &mut self,
        epfd: RawFd,
        fd: RawFd,
        kind: u32,
        id: u64,
    ) -> Option<Watcher> {
        let entry = self.entries.get_mut(&fd)?;
        match entry.slot(kind) {
            Some(Watcher::Native(op, _)) if op.id() == id => {}
            _ => return None,
        }
        let was = (entry.is_active(), entry.has_callback());
        let prev = entry.slot(kind).take();
        if entry.owner.is_some() {
            entry.sticky |= kind;
        }
        let _ = Self::sync(epfd, fd, entry, false);
        let now = (entry.is_active(), entry.has_callback());
        if !now.0 && entry.sticky == 0 {
            self.entries.remove(&fd);
        }
        self.recount(fd, was, now);
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

    pub(crate) fn has_native_reader(&self, fd: RawFd) -> bool {
        self.entries
            .get(&fd)
            .is_some_and(|e| matches!(e.reader, Some(Watcher::Reader(_))))
    }

    /// Turn raw epoll events into ready-queue work. Everything stays
    /// registered (level-triggered, as asyncio) except cancelled handles;
    /// native operations unregister themselves when they finish. Events of
    /// directions nobody waits on (sticky registrations) are ignored.
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
            let readable = bits & !(WRITE | ET) != 0;
            let writable = bits & !(READ | ET) != 0;
            for (kind, hit) in [(READ, readable), (WRITE, writable)] {
                if !hit {
                    continue;
                }
                let Some(entry) = self.entries.get_mut(&fd) else {
                    continue;
                };
                let take = match entry.slot(kind) {
                    Some(Watcher::Py(h)) if !h.get().is_cancelled() => {
                        ready.push1(Job::Handle(h.clone_ref(py)));
                        false
                    }
                    Some(Watcher::Py(_)) => true,
                    // Native operations stay registered until they finish.
                    Some(Watcher::Native(op, _)) => {
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
                    if let Some((w, owner)) = self.remove(epfd, fd, kind) {
                        garbage.extend(w);
                        drop(owner); // never set for Python callbacks
                    }
                }
            }
        }
    }

    pub(crate) fn has_op(&self, fd: RawFd, kind: u32, id: u64) -> bool {
        self.entries.get(&fd).is_some_and(|e| {
            matches!(
                if kind == READ { &e.reader } else { &e.writer },
                Some(Watcher::Native(op, _)) if op.id() == id
            )
        })
    }

    /// The id of the native operation on `fd` that resolves `fut`, if any.
    pub(crate) fn op_for_future(
        &self,
        fd: RawFd,
        kind: u32,
        fut: *mut pyo3::ffi::PyObject,
    ) -> Option<u64> {
        let e = self.entries.get(&fd)?;
        match if kind == READ { &e.reader } else { &e.writer } {
            Some(Watcher::Native(op, _)) if op.fut().as_ptr() == fut => Some(op.id()),
            _ => None,
        }
    }

    /// Unregister everything (loop closing); the watchers go to `garbage`,
    /// socket references to `owners`.
    pub(crate) fn drain(
        &mut self,
        epfd: RawFd,
        garbage: &mut Vec<Watcher>,
        owners: &mut Vec<Py<PyAny>>,
    ) {
        for (fd, e) in std::mem::take(&mut self.entries) {
            if e.registered != 0 {
                let _ = ctl(epfd, libc::EPOLL_CTL_DEL, fd, 0);
            }
            garbage.extend(e.reader);
            garbage.extend(e.writer);
            owners.extend(e.owner);
            owners.extend(e.fileobj);
        }
        self.active = 0;
        self.with_callbacks = 0;
    }

    pub(crate) fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        for e in self.entries.values() {
            if let Some(w) = &e.reader {
                w.visit(visit)?;
            }
            if let Some(w) = &e.writer {
                w.visit(visit)?;
            }
            visit.call(&e.owner)?;
            visit.call(&e.fileobj)?;
        }
        Ok(())
    }
}
