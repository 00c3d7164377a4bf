//! The native half of stream transports: TCP and Unix sockets, and the
//! read and write ends of pipes.
//!
//! The fd is registered with the loop's Tokio reactor (edge-triggered);
//! readiness reaches the loop through `TokenWaker`s and runs here as jobs of
//! the ready queue, in order with other callbacks. Reads go into the loop's
//! shared buffer and reach `protocol.data_received()` as bytes (or straight
//! into the buffer of a `BufferedProtocol`). Writes try the fd at once and
//! keep what did not fit in a native buffer, with asyncio's flow control.
//!
//! The Python object protocols see is a `tokioloop._transports` class (an
//! `asyncio.Transport`); it holds this core and binds the hot methods of it.

use std::os::fd::RawFd;
use std::task::{Context, Poll};

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView};
use pyo3::PyTraverseError;

use crate::event_loop::cell::GilCell;
use crate::event_loop::core::LoopCore;
use crate::event_loop::handle::{copy_context, run_in_context};
use crate::event_loop::io::Registration;
use crate::event_loop::job::Job;
use crate::event_loop::recycle::Made;
use crate::event_loop::selector::NativeReader;

use super::{Source, READ, WRITE};

/// asyncio's `max_size`: at most this much is read per readiness event.
pub(crate) const MAX_READ: usize = 256 * 1024;
/// Reads at least this large make the next read go straight into a bytes
/// object with room for DIRECT_READ bytes (no copy; for small reads, copying
/// out of the shared buffer is cheaper than the allocation).
pub(crate) const DIRECT_READ_MIN: usize = 32 * 1024;
/// Size of a direct read: the bytes object (data plus CPython's header)
/// stays under glibc's default mmap threshold (128 KiB), so that even with
/// malloc untuned a read never costs an mmap/munmap pair.
const DIRECT_READ: usize = 126 * 1024;
/// asyncio's LOG_THRESHOLD_FOR_CONNLOST_WRITES.
const LOG_THRESHOLD_FOR_CONNLOST_WRITES: u32 = 5;
const DEFAULT_HIGH_WATER: usize = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Socket,
    ReadPipe,
    WritePipe,
}

/// Unsent data: one contiguous region `data[start..]`, compacted lazily.
#[derive(Default)]
struct WriteBuffer {
    data: Vec<u8>,
    start: usize,
}

impl WriteBuffer {
    fn len(&self) -> usize {
        self.data.len() - self.start
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.data.len() / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.extend_from_slice(bytes);
    }
    fn pending(&self) -> &[u8] {
        &self.data[self.start..]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }
    fn clear(&mut self) {
        self.data = Vec::new();
        self.start = 0;
    }
}

struct Callbacks {
    protocol: Py<PyAny>,
    buffered: bool,
    data_received: Option<Py<PyAny>>,
    get_buffer: Option<Py<PyAny>>,
    buffer_updated: Option<Py<PyAny>>,
}

struct State {
    reg: Option<Registration>,
    cb: Option<Callbacks>,
    /// The Python transport object handed to protocols.
    wrapper: Option<Py<PyAny>>,
    /// The Python object owning the fd (socket or pipe file), closed last.
    file: Option<Py<PyAny>>,
    protocol_connected: bool,
    paused: bool,
    /// The peer's end of file was read and the protocol kept the
    /// connection open: no more reading, though not "paused".
    read_eof: bool,
    closing: bool,
    eof: bool,
    conn_lost: u32,
    buf: WriteBuffer,
    high_water: usize,
    low_water: usize,
    protocol_paused: bool,
    /// A future loop.sendfile() waits on until the buffer is empty.
    empty_waiter: Option<Py<PyAny>>,
    started: bool,
    /// True while loop-initiated work runs in the transport's context.
    in_context: bool,
    /// The last read was large (DIRECT_READ_MIN or more): read straight
    /// into a new bytes object instead of copying out of the shared buffer.
    big_reads: bool,
    /// The loop holds this transport weakly (see `hold`).
    held_weakly: bool,
}

#[pyclass(
    frozen,
    weakref,
    module = "tokioloop._tokioloop",
    name = "StreamTransportCore"
)]
pub struct StreamCore {
    lp: Py<LoopCore>,
    token: u64,
    fd: RawFd,
    kind: Kind,
    /// Write pipes: a readable event means the reader closed its end.
    watch_hangup: bool,
    /// The context the transport was made in: the loop runs the protocol's
    /// callbacks in it, as asyncio does.
    ctx: Py<PyAny>,
    st: GilCell<State>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn os_error(py: Python<'_>, err: i32) -> PyErr {
    crate::event_loop::oserror::from_errno(py, err)
}

#[derive(Clone, Copy)]
enum ReadOutcome {
    Nothing,
    /// Bytes read, and whether that was less than asked (drained for now).
    Data(usize, bool),
    Eof,
    Error(i32),
}

impl ReadOutcome {
    fn data_len(self) -> Option<usize> {
        match self {
            ReadOutcome::Data(n, _) => Some(n),
            _ => None,
        }
    }
}

impl StreamCore {
    fn lp<'py>(&self, py: Python<'py>) -> &Bound<'py, LoopCore> {
        self.lp.bind(py)
    }

    fn wrapper<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.st
            .with(py, |s| s.wrapper.as_ref().map(|w| w.bind(py).clone()))
    }

    /// Ask Tokio to report readability (read interest) through our waker.
    /// Returns true when the fd is ready now (then a job was queued).
    fn arm(slf: &Bound<'_, Self>, kind: u8) {
        let py = slf.py();
        let this = slf.get();
        if kind == WRITE {
            // A write backlog: the loop keeps the transport until it drained.
            Self::hold(slf);
        }
        let ready = this.st.with(py, |s| {
            let Some(reg) = s.reg.as_ref() else {
                return false;
            };
            if kind == READ {
                let mut cx = Context::from_waker(&reg.read_waker);
                matches!(reg.afd.poll_read_ready(&mut cx), Poll::Ready(_))
            } else {
                let mut cx = Context::from_waker(&reg.write_waker);
                matches!(reg.afd.poll_write_ready(&mut cx), Poll::Ready(_))
            }
        });
        if ready {
            this.lp(py)
                .get()
                .push_ready(py, Job::Source(Source::Stream(slf.clone().unbind()), kind));
        }
    }

    /// Whether the loop keeps this transport alive: as asyncio's selector
    /// does, only while it waits for something from it, reading or a write
    /// backlog. Reading paused or done (the peer's EOF, kept half-open) with
    /// nothing to write (an idle keep-alive connection an HTTP client paused
    /// and then dropped; a server connection whose peer left), the loop holds
    /// it weakly, so the GC can free it once nothing else refers to it,
    /// instead of keeping it and its socket until the loop closes.
    fn hold(slf: &Bound<'_, Self>) {
        let py = slf.py();
        let this = slf.get();
        let change = this.st.with(py, |s| {
            let weak = (s.paused || s.read_eof)
                && !s.closing
                && s.buf.is_empty()
                && s.empty_waiter.is_none()
                && s.reg.is_some();
            if weak == s.held_weakly {
                return None;
            }
            s.held_weakly = weak;
            Some(weak)
        });
        let source = match change {
            None => return,
            Some(false) => Source::Stream(slf.clone().unbind()),
            Some(true) => match pyo3::types::PyWeakrefReference::new(slf) {
                Ok(w) => Source::WeakStream(w.unbind()),
                Err(_) => {
                    this.st.with(py, |s| s.held_weakly = false);
                    return;
                }
            },
        };
        this.lp(py).get().replace_source(py, this.token, source);
    }

    /// Clear Tokio's readiness (after EAGAIN or a short read/write) and
    /// re-arm the waker.
    fn clear_and_arm(slf: &Bound<'_, Self>, kind: u8) {
        let py = slf.py();
        if kind == WRITE {
            Self::hold(slf);
        }
        slf.get().st.with(py, |s| {
            if let Some(reg) = s.reg.as_ref() {
                let waker = if kind == READ {
                    &reg.read_waker
                } else {
                    &reg.write_waker
                };
                let mut cx = Context::from_waker(waker);
                let r = if kind == READ {
                    reg.afd.poll_read_ready(&mut cx)
                } else {
                    reg.afd.poll_write_ready(&mut cx)
                };
                if let Poll::Ready(Ok(mut g)) = r {
                    g.clear_ready();
                }
            }
        });
        Self::arm(slf, kind);
    }

    fn call_protocol0<'py>(
        &self,
        py: Python<'py>,
        name: &str,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let proto = self
            .st
            .with(py, |s| s.cb.as_ref().map(|c| c.protocol.clone_ref(py)));
        match proto {
            Some(p) => Ok(Some(p.bind(py).call_method0(name)?)),
            None => Ok(None),
        }
    }

    /// Report a fatal error through the Python wrapper (which logs or calls
    /// the exception handler as asyncio does) and close at once.
    fn fatal(slf: &Bound<'_, Self>, err: PyErr, message: &str) -> PyResult<()> {
        let py = slf.py();
        if let Some(w) = slf.get().wrapper(py) {
            w.call_method1(pyo3::intern!(py, "_fatal_error"), (err.value(py), message))?;
        } else {
            Self::force_close(slf, Some(err.value(py).clone().into_any().unbind()))?;
        }
        Ok(())
    }

    pub(crate) fn on_ready(slf: &Bound<'_, Self>, kind: u8) -> PyResult<()> {
        let py = slf.py();
        slf.get()
            .in_own_context(py, || Self::on_ready_in_context(slf, kind))
    }

    /// Run loop-initiated work (reads, writes, hang-ups, connection_lost)
    /// in the transport's context, remembering that we are inside it.
    fn in_own_context<R>(&self, py: Python<'_>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
        run_in_context(py, &self.ctx, || {
            let was = self
                .st
                .with(py, |s| std::mem::replace(&mut s.in_context, true));
            let r = f();
            self.st.with(py, |s| s.in_context = was);
            r
        })
    }

    fn on_ready_in_context(slf: &Bound<'_, Self>, kind: u8) -> PyResult<()> {
        if kind == WRITE {
            return Self::on_writable(slf);
        }
        if slf.get().kind == Kind::WritePipe {
            if slf.get().watch_hangup {
                return Self::on_write_pipe_hangup(slf);
            }
            return Ok(());
        }
        Self::on_readable(slf)
    }

    /// The write end of a pipe became "readable": the reader went away.
    fn on_write_pipe_hangup(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.lp(py)
            .get()
            .remove_watcher(py, this.fd, crate::event_loop::selector::READ)?;
        let (live, pending) = this.st.with(py, |s| {
            let live = s.reg.is_some() && s.started && s.conn_lost == 0;
            (live, !s.buf.is_empty())
        });
        if !live {
            return Ok(());
        }
        if this.lp(py).get().debug() {
            if let Some(w) = this.wrapper(py) {
                w.call_method0(pyo3::intern!(py, "_log_eof"))?;
            }
        }
        let exc = if pending {
            Some(
                pyo3::exceptions::PyBrokenPipeError::new_err(())
                    .value(py)
                    .clone()
                    .into_any()
                    .unbind(),
            )
        } else {
            None
        };
        Self::force_close(slf, exc)
    }

    fn read_error_message(&self) -> &'static str {
        if self.kind == Kind::Socket {
            "Fatal read error on socket transport"
        } else {
            "Fatal read error on pipe transport"
        }
    }

    fn write_error_message(&self) -> &'static str {
        if self.kind == Kind::Socket {
            "Fatal write error on socket transport"
        } else {
            "Fatal write error on pipe transport"
        }
    }

    fn reading_enabled(&self, s: &State) -> bool {
        self.kind != Kind::WritePipe
            && !s.closing
            && !s.paused
            && !s.read_eof
            && s.conn_lost == 0
            && s.started
    }

    fn on_readable(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (buffered, big_reads) = match this.st.with(py, |s| {
            if !this.reading_enabled(s) || s.reg.is_none() {
                return None;
            }
            s.cb.as_ref().map(|c| (c.buffered, s.big_reads))
        }) {
            Some(b) => b,
            None => return Ok(()),
        };
        if buffered {
            return Self::read_buffered(slf);
        }
        let lp = this.lp(py).get();
        let (outcome, data) = if big_reads {
            Self::read_direct(slf)?
        } else {
            // Read into the bytes object the last callback gave back and on
            // into the loop's shared buffer: data of about the last read's
            // size is then delivered in that object, with no copy and no
            // allocation; other sizes are copied into a new one.
            lp.with_read_buffer(py, |buf| {
                lp.recycler.read_into_spare(py, buf, |room, rest| {
                    let outcome = this.st.with(py, |s| this.read_into(s, room, rest));
                    (outcome, outcome.data_len())
                })
            })?
        };
        let big = matches!(outcome, ReadOutcome::Data(n, _) if n >= DIRECT_READ_MIN);
        this.st.with(py, |s| s.big_reads = big);
        let r = Self::after_read(slf, outcome, data.as_ref().map(|m| &m.obj));
        if let Some(made) = data {
            lp.recycler.give_back(py, made);
        }
        r
    }

    /// One read straight into a bytes object with room for DIRECT_READ
    /// bytes: the loop's spare from an earlier large read when nothing kept
    /// it, else a new one; it keeps its room when the data fills half of it
    /// or more, else it is shrunk to the data (recycle.rs `read_into_room`).
    /// With the spare, a large read costs no allocation: callgrind, Protocol
    /// echo of 100 KiB, ~1,200 of ~6,000 instructions per request went to
    /// allocating, shrinking and freeing a bytes object per read.
    fn read_direct<'py>(slf: &Bound<'py, Self>) -> PyResult<(ReadOutcome, Option<Made<'py>>)> {
        let py = slf.py();
        let this = slf.get();
        let lp = this.lp(py).get();
        lp.recycler.read_into_room(py, DIRECT_READ, |buf| {
            let outcome = this.st.with(py, |s| this.read_into(s, buf, &mut []));
            (outcome, outcome.data_len())
        })
    }

    /// One read syscall into `buf` and on into `more` (readv when `more` is
    /// not empty), honouring Tokio's readiness.
    fn read_into(&self, s: &mut State, buf: &mut [u8], more: &mut [u8]) -> ReadOutcome {
        let Some(reg) = s.reg.as_ref() else {
            return ReadOutcome::Nothing;
        };
        let mut cx = Context::from_waker(&reg.read_waker);
        let mut guard = match reg.afd.poll_read_ready(&mut cx) {
            Poll::Pending => return ReadOutcome::Nothing,
            Poll::Ready(Err(e)) => {
                return ReadOutcome::Error(e.raw_os_error().unwrap_or(libc::EIO))
            }
            Poll::Ready(Ok(g)) => g,
        };
        let (buf, more) = if buf.is_empty() {
            (more, buf)
        } else {
            (buf, more)
        };
        let want = buf.len() + more.len();
        loop {
            // SAFETY: `buf` and `more` are valid writable regions of their
            // lengths, and `self.fd` stays open while the registration exists.
            let n = unsafe {
                if more.is_empty() {
                    libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len())
                } else {
                    let iov = [
                        libc::iovec {
                            iov_base: buf.as_mut_ptr().cast(),
                            iov_len: buf.len(),
                        },
                        libc::iovec {
                            iov_base: more.as_mut_ptr().cast(),
                            iov_len: more.len(),
                        },
                    ];
                    libc::readv(self.fd, iov.as_ptr(), 2)
                }
            };
            if n > 0 {
                let n = n as usize;
                let short = n < want;
                if short {
                    // Less than asked: the socket is drained for now.
                    guard.clear_ready();
                }
                return ReadOutcome::Data(n, short);
            }
            if n == 0 {
                return ReadOutcome::Eof;
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => {
                    guard.clear_ready();
                    return ReadOutcome::Nothing;
                }
                e => return ReadOutcome::Error(e),
            }
        }
    }

    fn after_read(
        slf: &Bound<'_, Self>,
        outcome: ReadOutcome,
        data: Option<&Bound<'_, PyBytes>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        match outcome {
            ReadOutcome::Nothing => {
                Self::arm(slf, READ);
                Ok(())
            }
            ReadOutcome::Error(e) => Self::fatal(slf, os_error(py, e), this.read_error_message()),
            ReadOutcome::Eof => Self::on_eof(slf),
            ReadOutcome::Data(n, short) => {
                this.lp(py).get().count_read(n);
                // Out of the cell (the call may replace the protocol); the
                // protocol only when it has no data_received. `Bound`s: their
                // drop is a plain decref.
                let (cb, proto) = this.st.with(py, |s| match s.cb.as_ref() {
                    Some(c) => match &c.data_received {
                        Some(f) => (Some(f.bind(py).clone()), None),
                        None => (None, Some(c.protocol.bind(py).clone())),
                    },
                    None => (None, None),
                });
                if let Some(data) = data {
                    let res = match (cb, proto) {
                        (Some(cb), _) => cb.call1((data,)),
                        // No data_received: the call fails as asyncio's would.
                        (None, Some(p)) => p.call_method1("data_received", (data,)),
                        (None, None) => Ok(py.None().into_bound(py)),
                    };
                    if let Err(e) = res {
                        if is_base_exit(py, &e) {
                            return Err(e);
                        }
                        return Self::fatal(
                            slf,
                            e,
                            "Fatal error: protocol.data_received() call failed.",
                        );
                    }
                }
                if short {
                    Self::arm(slf, READ);
                } else {
                    // The buffer filled up: there may be more. Read again on
                    // the next iteration, after other callbacks had a turn.
                    this.lp(py)
                        .get()
                        .push_ready(py, Job::Source(Source::Stream(slf.clone().unbind()), READ));
                }
                Ok(())
            }
        }
    }

    fn read_buffered(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (get_buffer, buffer_updated) = match this.st.with(py, |s| {
            s.cb.as_ref().map(|c| {
                (
                    c.get_buffer.as_ref().map(|f| f.bind(py).clone()),
                    c.buffer_updated.as_ref().map(|f| f.bind(py).clone()),
                )
            })
        }) {
            Some((Some(g), Some(u))) => (g, u),
            _ => return Ok(()),
        };
        // Is there something to read? (Do not ask the protocol for a buffer
        // just to find out there is nothing.)
        let ready = this.st.with(py, |s| {
            s.reg.as_ref().is_some_and(|reg| {
                let mut cx = Context::from_waker(&reg.read_waker);
                matches!(reg.afd.poll_read_ready(&mut cx), Poll::Ready(Ok(_)))
            })
        });
        if !ready {
            return Ok(());
        }
        let buf = match get_buffer.call1((-1,)) {
            Ok(b) => b,
            Err(e) => {
                if is_base_exit(py, &e) {
                    return Err(e);
                }
                return Self::fatal(slf, e, "Fatal error: protocol.get_buffer() call failed.");
            }
        };
        // As asyncio: len(buf) failing or zero is get_buffer's fault...
        match buf.len() {
            Ok(0) => {
                return Self::fatal(
                    slf,
                    PyRuntimeError::new_err("get_buffer() returned an empty buffer"),
                    "Fatal error: protocol.get_buffer() call failed.",
                )
            }
            Ok(_) => {}
            Err(e) => {
                return Self::fatal(slf, e, "Fatal error: protocol.get_buffer() call failed.")
            }
        }
        let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
        // SAFETY: PyObject_GetBuffer fills `view` on success; we release it
        // below on every path. PyBUF_WRITABLE asks for a contiguous writable
        // buffer, which is what recv_into needs too.
        if unsafe { ffi::PyObject_GetBuffer(buf.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_WRITABLE) }
            < 0
        {
            // ... while a buffer recv_into() cannot fill is a read error
            // with recv_into's TypeError.
            drop(PyErr::fetch(py));
            let err = PyTypeError::new_err(format!(
                "recv_into() argument 'buffer' must be read-write bytes-like object, not {}",
                buf.get_type().name()?
            ));
            return Self::fatal(slf, err, this.read_error_message());
        }
        // SAFETY: initialised by the successful PyObject_GetBuffer above.
        let mut view = unsafe { view.assume_init() };
        let len = view.len as usize;
        let outcome = if len == 0 {
            None
        } else {
            // SAFETY: view.buf points to `len` writable bytes that stay valid
            // until PyBuffer_Release.
            let target = unsafe { std::slice::from_raw_parts_mut(view.buf.cast::<u8>(), len) };
            Some(this.st.with(py, |s| this.read_into(s, target, &mut [])))
        };
        // SAFETY: releases the view obtained above, exactly once.
        unsafe { ffi::PyBuffer_Release(&mut view) };
        let Some(outcome) = outcome else {
            return Self::fatal(
                slf,
                PyRuntimeError::new_err("get_buffer() returned an empty buffer"),
                "Fatal error: protocol.get_buffer() call failed.",
            );
        };
        match outcome {
            ReadOutcome::Data(n, short) => {
                this.lp(py).get().count_read(n);
                if let Err(e) = buffer_updated.call1((n,)) {
                    if is_base_exit(py, &e) {
                        return Err(e);
                    }
                    return Self::fatal(
                        slf,
                        e,
                        "Fatal error: protocol.buffer_updated() call failed.",
                    );
                }
                if short {
                    Self::arm(slf, READ);
                } else {
                    this.lp(py)
                        .get()
                        .push_ready(py, Job::Source(Source::Stream(slf.clone().unbind()), READ));
                }
                Ok(())
            }
            other => Self::after_read(slf, other, None),
        }
    }

    fn on_eof(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if this.lp(py).get().debug() {
            if let Some(w) = this.wrapper(py) {
                w.call_method0(pyo3::intern!(py, "_log_eof"))?;
            }
        }
        if this.kind == Kind::ReadPipe {
            // As asyncio's read pipes: eof_received() and connection_lost()
            // are both scheduled; eof_received's answer does not matter.
            let proto = this.st.with(py, |s| {
                s.closing = true;
                s.conn_lost += 1;
                s.cb.as_ref().map(|c| c.protocol.clone_ref(py))
            });
            if let Some(p) = proto {
                let eof = p
                    .bind(py)
                    .getattr(pyo3::intern!(py, "eof_received"))?
                    .unbind();
                this.lp(py).get().push_ready_open(
                    py,
                    Job::Stream(slf.clone().unbind(), StreamJob::Call0(eof)),
                )?;
            }
            return Self::schedule_connection_lost(slf, None);
        }
        // A duck-typed buffered protocol (asyncio.BaseProtocol plus
        // get_buffer/buffer_updated) may have no eof_received(): as if it
        // returned None.
        let missing = this.st.with(py, |s| {
            s.cb.as_ref()
                .filter(|c| c.buffered)
                .map(|c| c.protocol.clone_ref(py))
        });
        if let Some(p) = missing {
            if !p.bind(py).hasattr(pyo3::intern!(py, "eof_received"))? {
                return Self::do_close(slf);
            }
        }
        let keep_open = match this.call_protocol0(py, "eof_received") {
            Ok(r) => r.map(|v| v.is_truthy()).transpose()?.unwrap_or(false),
            Err(e) => {
                if is_base_exit(py, &e) {
                    return Err(e);
                }
                return Self::fatal(slf, e, "Fatal error: protocol.eof_received() call failed.");
            }
        };
        if keep_open && this.kind == Kind::Socket {
            // Keep the connection open for writing; stop reading.
            this.st.with(py, |s| s.read_eof = true);
            Self::hold(slf);
            Ok(())
        } else {
            Self::do_close(slf)
        }
    }

    fn on_writable(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.lp(py).get().touch_io();
        enum W {
            Nothing,
            Rearm,
            Drained,
            Error(i32),
        }
        let w = this.st.with(py, |s| {
            if s.buf.is_empty() || s.conn_lost > 0 {
                return W::Nothing;
            }
            let Some(reg) = s.reg.as_ref() else {
                return W::Nothing;
            };
            let mut cx = Context::from_waker(&reg.write_waker);
            let mut guard = match reg.afd.poll_write_ready(&mut cx) {
                Poll::Pending => return W::Nothing,
                Poll::Ready(Err(e)) => return W::Error(e.raw_os_error().unwrap_or(libc::EIO)),
                Poll::Ready(Ok(g)) => g,
            };
            loop {
                let pending = s.buf.pending();
                match this.write_raw(pending) {
                    Ok(n) => {
                        let all = n == pending.len();
                        s.buf.consume(n);
                        if all {
                            return W::Drained;
                        }
                        guard.clear_ready();
                        return W::Rearm;
                    }
                    Err(libc::EINTR) => continue,
                    Err(libc::EAGAIN) => {
                        guard.clear_ready();
                        return W::Rearm;
                    }
                    Err(e) => return W::Error(e),
                }
            }
        });
        match w {
            W::Nothing => Ok(()),
            W::Rearm => {
                Self::arm(slf, WRITE);
                Self::maybe_resume_protocol(slf)
            }
            W::Error(e) => {
                this.st.with(py, |s| s.buf.clear());
                Self::fatal(slf, os_error(py, e), this.write_error_message())
            }
            W::Drained => {
                Self::maybe_resume_protocol(slf)?;
                Self::after_drain(slf)
            }
        }
    }

    /// The write buffer just became empty.
    fn after_drain(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        Self::hold(slf);
        let (closing, eof, waiter) = this.st.with(py, |s| {
            (
                s.closing,
                s.eof,
                s.empty_waiter.as_ref().map(|w| w.clone_ref(py)),
            )
        });
        if let Some(w) = waiter {
            let w = w.bind(py);
            if !w.call_method0("done")?.is_truthy()? {
                w.call_method1("set_result", (py.None(),))?;
            }
        }
        if closing {
            this.st.with(py, |s| s.conn_lost += 1);
            Self::schedule_connection_lost(slf, None)?;
        } else if eof {
            Self::half_close(slf)?;
        }
        Ok(())
    }

    /// shutdown(SHUT_WR) of a socket (a pipe's write end has none).
    /// Err(errno) when it fails: ENOTCONN once the peer reset the connection.
    fn shutdown_write(&self) -> Result<(), i32> {
        if self.kind == Kind::Socket {
            // SAFETY: shutdown on our fd, open while the transport is.
            if unsafe { libc::shutdown(self.fd, libc::SHUT_WR) } < 0 {
                return Err(errno());
            }
        }
        Ok(())
    }

    /// The half-close of write_eof(), now or once the buffer drained. A
    /// failure is the transport's fatal error (connection_lost(exc)), as
    /// uvloop reports it: asyncio raises it from write_eof() (or logs it from
    /// its writer callback) and leaves a dead transport open, so a server's
    /// wait_closed() waits on it until someone calls close().
    fn half_close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        let res = this.shutdown_write();
        this.lp(slf.py()).get().touch_io();
        match res {
            Ok(()) => Ok(()),
            Err(e) => Self::fatal(slf, os_error(slf.py(), e), "Fatal error on transport"),
        }
    }

    /// One write/send syscall; Err(errno) on failure.
    fn write_raw(&self, data: &[u8]) -> Result<usize, i32> {
        if data.is_empty() {
            return Ok(0);
        }
        // SAFETY: `data` is a valid readable region; fd open while registered.
        // MSG_NOSIGNAL: a reset peer gives EPIPE, never SIGPIPE.
        let n = unsafe {
            if self.kind == Kind::Socket {
                libc::send(
                    self.fd,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(self.fd, data.as_ptr().cast(), data.len())
            }
        };
        if n < 0 {
            Err(errno())
        } else {
            Ok(n as usize)
        }
    }

    fn maybe_pause_protocol(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let pause = this.st.with(py, |s| {
            if s.buf.len() <= s.high_water || s.protocol_paused {
                return false;
            }
            s.protocol_paused = true;
            true
        });
        if pause {
            Self::call_flow_control(slf, "pause_writing")?;
        }
        Ok(())
    }

    fn maybe_resume_protocol(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let resume = this.st.with(py, |s| {
            if !s.protocol_paused || s.buf.len() > s.low_water {
                return false;
            }
            s.protocol_paused = false;
            true
        });
        if resume {
            Self::call_flow_control(slf, "resume_writing")?;
        }
        Ok(())
    }

    fn call_flow_control(slf: &Bound<'_, Self>, name: &str) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        // pause_writing() comes from write(), in whatever context the writer
        // runs; run it in the protocol's context like its other callbacks
        // (uvloop does; asyncio uses the writer's).
        let res = if this.st.with(py, |s| s.in_context) {
            this.call_protocol0(py, name).map(|_| ())
        } else {
            run_in_context(py, &this.ctx, || this.call_protocol0(py, name).map(|_| ()))
        };
        if let Err(e) = res {
            if is_base_exit(py, &e) {
                return Err(e);
            }
            let ctx = PyDict::new(py);
            ctx.set_item("message", format!("protocol.{name}() failed"))?;
            ctx.set_item("exception", e.value(py))?;
            ctx.set_item("transport", this.wrapper(py))?;
            let proto = this
                .st
                .with(py, |s| s.cb.as_ref().map(|c| c.protocol.clone_ref(py)));
            ctx.set_item("protocol", proto)?;
            this.lp(py)
                .call_method1(pyo3::intern!(py, "call_exception_handler"), (ctx,))?;
        }
        Ok(())
    }

    /// As asyncio's `call_soon(self._call_connection_lost, exc)`: raises
    /// RuntimeError once the loop is closed.
    fn schedule_connection_lost(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        slf.get().lp(py).get().push_ready_open(
            py,
            Job::Stream(slf.clone().unbind(), StreamJob::ConnectionLost(exc)),
        )
    }

    /// Run deferred work queued as a Job::Stream.
    pub(crate) fn run_job(slf: &Bound<'_, Self>, job: StreamJob) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        match job {
            StreamJob::Start => Self::start_reading(slf),
            StreamJob::ConnectionLost(exc) => {
                this.in_own_context(py, || Self::call_connection_lost(slf, exc))
            }
            StreamJob::Call0(f) => run_in_context(py, &this.ctx, || f.bind(py).call0().map(|_| ())),
        }
    }

    /// The first step once connection_made() has run: start reading (or,
    /// for write pipes, watching for the reader going away).
    fn start_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.st.with(py, |s| s.started = true);
        if this.kind != Kind::WritePipe {
            // A new registration learns of data already waiting only from
            // the reactor: poll on the next iteration, as asyncio's (which
            // polls every iteration) sees it one iteration after its
            // add_reader.
            this.lp(py).get().touch_io();
            StreamCore::arm(slf, READ);
        } else if this.watch_hangup {
            // The reader going away shows as an error/hang-up on the write
            // end, which Tokio reports only to writers: watch it
            // level-triggered, as asyncio does.
            let reader: std::sync::Arc<dyn NativeReader> =
                std::sync::Arc::new(WritePipeHangup(slf.clone().unbind()));
            this.lp(py).get().add_native_reader(py, this.fd, reader)?;
        }
        Ok(())
    }

    fn call_connection_lost(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (connected, proto) = this.st.with(py, |s| {
            (
                s.protocol_connected,
                s.cb.as_ref().map(|c| c.protocol.clone_ref(py)),
            )
        });
        let res = match (connected, proto) {
            (true, Some(p)) => p
                .bind(py)
                .call_method1(pyo3::intern!(py, "connection_lost"), (exc,))
                .map(|_| ()),
            _ => Ok(()),
        };
        // Whatever the protocol did: unregister, close the fd's owner, let go.
        let (reg, file, cb, wrapper, waiter) = this.st.with(py, |s| {
            s.buf.clear();
            (
                s.reg.take(),
                s.file.take(),
                s.cb.take(),
                s.wrapper.take(),
                s.empty_waiter.take(),
            )
        });
        drop(reg);
        this.lp(py).get().unregister_source(py, this.token);
        if this.watch_hangup && !this.lp(py).get().closed() {
            this.lp(py)
                .get()
                .remove_watcher(py, this.fd, crate::event_loop::selector::READ)?;
        }
        let mut close_err = None;
        if let Some(f) = file {
            if let Err(e) = f.bind(py).call_method0(pyo3::intern!(py, "close")) {
                close_err = Some(e);
            }
            this.lp(py).get().touch_io();
        }
        if let Some(w) = &wrapper {
            w.bind(py)
                .call_method0(pyo3::intern!(py, "_connection_lost_done"))?;
        }
        drop((cb, wrapper, waiter));
        res?;
        if let Some(e) = close_err {
            return Err(e);
        }
        Ok(())
    }

    fn do_close(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let lost_now = this.st.with(py, |s| {
            if s.closing {
                return false;
            }
            s.closing = true;
            if s.buf.is_empty() {
                s.conn_lost += 1;
                true
            } else {
                false
            }
        });
        if lost_now {
            Self::schedule_connection_lost(slf, None)?;
        }
        Ok(())
    }

    fn force_close(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let go = this.st.with(py, |s| {
            if s.conn_lost > 0 {
                return false;
            }
            s.buf.clear();
            s.closing = true;
            s.conn_lost += 1;
            true
        });
        if go {
            Self::schedule_connection_lost(slf, exc)?;
        }
        Ok(())
    }

    fn set_callbacks(py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<Callbacks> {
        let buffered_type = py
            .import("asyncio")?
            .getattr(pyo3::intern!(py, "BufferedProtocol"))?;
        // As uvloop: a protocol with get_buffer()/buffer_updated() and no
        // data_received() is buffered even if it does not subclass
        // asyncio.BufferedProtocol (asyncio would fail on it).
        let buffered = protocol.is_instance(&buffered_type)?
            || (protocol.hasattr(pyo3::intern!(py, "get_buffer"))?
                && protocol.hasattr(pyo3::intern!(py, "buffer_updated"))?
                && !protocol.hasattr(pyo3::intern!(py, "data_received"))?);
        let get = |name: &str| protocol.getattr(name).ok().map(Bound::unbind);
        Ok(Callbacks {
            protocol: protocol.clone().unbind(),
            buffered,
            data_received: if buffered { None } else { get("data_received") },
            get_buffer: if buffered { get("get_buffer") } else { None },
            buffer_updated: if buffered {
                get("buffer_updated")
            } else {
                None
            },
        })
    }

    /// Bytes-like data as asyncio's transports accept it.
    fn check_data(data: &Bound<'_, PyAny>) -> PyResult<()> {
        if data.is_instance_of::<PyMemoryView>() {
            // asyncio's write() takes len(data) first: a released view
            // raises its ValueError from write(), the transport unharmed.
            data.len()?;
            Ok(())
        } else if data.is_instance_of::<PyBytes>() || data.is_instance_of::<PyByteArray>() {
            Ok(())
        } else {
            Err(PyTypeError::new_err(format!(
                "data argument must be a bytes-like object, not '{}'",
                data.get_type().name()?
            )))
        }
    }
}

/// The loop-side watcher of a write pipe's hang-up.
struct WritePipeHangup(Py<StreamCore>);

impl NativeReader for WritePipeHangup {
    fn on_ready(&self, py: Python<'_>) -> PyResult<()> {
        let me = self.0.bind(py);
        me.get()
            .in_own_context(py, || StreamCore::on_write_pipe_hangup(me))
    }

    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.0)
    }
}

/// Deferred work of a stream transport, queued on the loop as
/// `Job::Stream` (a plain enum, so the GC sees what it holds).
pub(crate) enum StreamJob {
    /// Start reading once connection_made() has run.
    Start,
    /// Call the protocol's connection_lost(exc) and release the fd.
    ConnectionLost(Option<Py<PyAny>>),
    /// Call this callable with no arguments in the transport's context.
    Call0(Py<PyAny>),
}

impl StreamJob {
    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            StreamJob::Start => Ok(()),
            StreamJob::ConnectionLost(exc) => visit.call(exc),
            StreamJob::Call0(f) => visit.call(f),
        }
    }
}

pub(crate) fn is_base_exit(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py)
        || e.is_instance_of::<pyo3::exceptions::PySystemExit>(py)
}

/// Run `f` on the contents of a bytes-like object.
fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = data.cast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    // SAFETY: as in read_buffered: the view is released on every path.
    if unsafe { ffi::PyObject_GetBuffer(data.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_SIMPLE) } < 0 {
        return Err(PyErr::fetch(data.py()));
    }
    // SAFETY: initialised by the successful call above.
    let mut view = unsafe { view.assume_init() };
    // SAFETY: a PyBUF_SIMPLE view is `len` contiguous readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(view.buf.cast::<u8>(), view.len as usize) };
    let r = f(bytes);
    // SAFETY: released exactly once.
    unsafe { ffi::PyBuffer_Release(&mut view) };
    Ok(r)
}

#[pymethods]
impl StreamCore {
    /// `kind`: "socket", "read_pipe" or "write_pipe". `file` owns `fd`.
    #[new]
    fn new(
        py: Python<'_>,
        lp: Bound<'_, LoopCore>,
        file: Bound<'_, PyAny>,
        fd: RawFd,
        protocol: Bound<'_, PyAny>,
        wrapper: Bound<'_, PyAny>,
        kind: &str,
    ) -> PyResult<Self> {
        let kind_name = kind;
        let kind = match kind {
            "socket" => Kind::Socket,
            "read_pipe" => Kind::ReadPipe,
            "write_pipe" | "write_tty" => Kind::WritePipe,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown transport kind {other:?}"
                )))
            }
        };
        lp.get().check_closed()?;
        let token = lp.get().new_token();
        let reg = lp
            .get()
            .driver
            .register(fd, token)
            .map_err(|e| crate::event_loop::oserror::from_io(py, e))?;
        Ok(StreamCore {
            lp: lp.unbind(),
            token,
            fd,
            kind,
            watch_hangup: kind_name == "write_pipe",
            ctx: copy_context(py)?,
            st: GilCell::new(State {
                reg: Some(reg),
                cb: Some(Self::set_callbacks(py, &protocol)?),
                wrapper: Some(wrapper.unbind()),
                file: Some(file.unbind()),
                protocol_connected: true,
                paused: false,
                read_eof: false,
                closing: false,
                eof: false,
                conn_lost: 0,
                buf: WriteBuffer::default(),
                high_water: DEFAULT_HIGH_WATER,
                low_water: DEFAULT_HIGH_WATER / 4,
                protocol_paused: false,
                empty_waiter: None,
                started: false,
                in_context: false,
                big_reads: false,
                held_weakly: false,
            }),
        })
    }

    /// Register with the loop and start reading (as asyncio's transports
    /// do right after connection_made, which the caller scheduled).
    fn _start(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.lp(py)
            .get()
            .register_source(py, this.token, Source::Stream(slf.clone().unbind()));
        this.lp(py)
            .get()
            .push_ready_open(py, Job::Stream(slf.clone().unbind(), StreamJob::Start))?;
        Ok(())
    }

    fn write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        Self::check_data(data)?;
        this.lp(py).get().touch_io();
        enum Next {
            Done,
            Buffered(bool),
            Warn,
            Error(i32),
        }
        // A buffer that cannot be taken (a non-contiguous view) fails as
        // asyncio's socket.send() of it does: a fatal write error.
        let next = match with_bytes(data, |bytes| {
            this.st.with(py, |s| -> PyResult<Next> {
                if s.eof {
                    return Err(PyRuntimeError::new_err(
                        "Cannot call write() after write_eof()",
                    ));
                }
                if s.empty_waiter.is_some() {
                    return Err(PyRuntimeError::new_err(
                        "unable to write; sendfile is in progress",
                    ));
                }
                if bytes.is_empty() {
                    return Ok(Next::Done);
                }
                if s.conn_lost > 0 {
                    s.conn_lost += 1;
                    return Ok(if s.conn_lost > LOG_THRESHOLD_FOR_CONNLOST_WRITES {
                        Next::Warn
                    } else {
                        Next::Done
                    });
                }
                if !s.buf.is_empty() {
                    s.buf.push(bytes);
                    return Ok(Next::Buffered(false));
                }
                let mut off = 0;
                loop {
                    match this.write_raw(&bytes[off..]) {
                        Ok(n) => {
                            off += n;
                            if off == bytes.len() {
                                return Ok(Next::Done);
                            }
                        }
                        Err(libc::EINTR) => continue,
                        Err(libc::EAGAIN) => break,
                        Err(e) => return Ok(Next::Error(e)),
                    }
                    // A partial write: the socket buffer is full.
                    break;
                }
                s.buf.push(&bytes[off..]);
                Ok(Next::Buffered(true))
            })
        }) {
            Ok(next) => next?,
            Err(e) => return Self::fatal(slf, e, this.write_error_message()),
        };
        match next {
            Next::Done => Ok(()),
            Next::Warn => {
                let log = py
                    .import("logging")?
                    .call_method1("getLogger", ("asyncio",))?;
                log.call_method1("warning", ("socket.send() raised exception.",))?;
                Ok(())
            }
            Next::Error(e) => Self::fatal(slf, os_error(py, e), this.write_error_message()),
            Next::Buffered(arm) => {
                if arm {
                    Self::clear_and_arm(slf, WRITE);
                }
                Self::maybe_pause_protocol(slf)
            }
        }
    }

    fn writelines(slf: &Bound<'_, Self>, list_of_data: &Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if this.kind != Kind::Socket || py.version_info() < (3, 12) {
            // asyncio's WriteTransport.writelines: one write of the join.
            let joined =
                PyBytes::new(py, b"").call_method1(pyo3::intern!(py, "join"), (list_of_data,))?;
            return Self::write(slf, &joined);
        }
        // 3.12+ socket transports: every item taken as a memoryview before
        // anything is sent, so a bad item sends nothing.
        this.st.with(py, |s| {
            if s.eof {
                Err(PyRuntimeError::new_err(
                    "Cannot call writelines() after write_eof()",
                ))
            } else if s.empty_waiter.is_some() {
                Err(PyRuntimeError::new_err(
                    "unable to writelines; sendfile is in progress",
                ))
            } else {
                Ok(())
            }
        })?;
        let items = list_of_data
            .try_iter()?
            .map(|item| PyMemoryView::from(&item?))
            .collect::<PyResult<Vec<_>>>()?;
        for item in items {
            Self::write(slf, item.as_any())?;
        }
        Ok(())
    }

    fn write_eof(slf: &Bound<'_, Self>) -> PyResult<()> {
        let shutdown = slf.get().st.with(slf.py(), |s| {
            if s.closing || s.eof {
                return false;
            }
            s.eof = true;
            s.buf.is_empty()
        });
        if shutdown {
            Self::half_close(slf)?;
        }
        Ok(())
    }

    fn can_write_eof(&self) -> bool {
        self.kind == Kind::Socket
    }

    fn close(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::do_close(slf)
    }

    fn _force_close(slf: &Bound<'_, Self>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        Self::force_close(slf, exc)
    }

    fn is_closing(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.closing)
    }

    fn is_reading(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| !s.paused && !s.closing)
    }

    fn pause_reading(slf: &Bound<'_, Self>) {
        slf.get().st.with(slf.py(), |s| {
            if !s.closing {
                s.paused = true;
            }
        });
        Self::hold(slf);
    }

    fn resume_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        slf.get().lp(py).get().touch_io();
        let resume = slf.get().st.with(py, |s| {
            if s.closing || !s.paused {
                return false;
            }
            s.paused = false;
            true
        });
        if resume {
            Self::hold(slf);
            // As asyncio's (which adds its reader again): refused on a
            // closed loop.
            slf.get().lp(py).get().check_closed()?;
            // Data may have arrived while paused: look now.
            Self::arm(slf, READ);
        }
        Ok(())
    }

    fn get_write_buffer_size(&self, py: Python<'_>) -> usize {
        self.st.with(py, |s| s.buf.len())
    }

    fn get_write_buffer_limits(&self, py: Python<'_>) -> (usize, usize) {
        self.st.with(py, |s| (s.low_water, s.high_water))
    }

    #[pyo3(signature = (high=None, low=None))]
    fn set_write_buffer_limits(
        slf: &Bound<'_, Self>,
        high: Option<&Bound<'_, PyAny>>,
        low: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let high = high.filter(|h| !h.is_none());
        let low = low.filter(|l| !l.is_none());
        let (h, l): (i64, i64) = match (high, low) {
            (None, None) => (DEFAULT_HIGH_WATER as i64, DEFAULT_HIGH_WATER as i64 / 4),
            (None, Some(l)) => {
                let l: i64 = l.extract()?;
                (4 * l, l)
            }
            (Some(h), None) => {
                let h: i64 = h.extract()?;
                (h, h / 4)
            }
            (Some(h), Some(l)) => (h.extract()?, l.extract()?),
        };
        if !(h >= l && l >= 0) {
            return Err(PyValueError::new_err(format!(
                "high ({h}) must be >= low ({l}) must be >= 0"
            )));
        }
        slf.get().st.with(py, |s| {
            s.high_water = h as usize;
            s.low_water = l as usize;
        });
        Self::maybe_pause_protocol(slf)
    }

    fn set_protocol(&self, py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let cb = Self::set_callbacks(py, protocol)?;
        let old = self.st.with(py, |s| {
            s.protocol_connected = true;
            s.cb.replace(cb)
        });
        drop(old);
        Ok(())
    }

    fn get_protocol(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.st
            .with(py, |s| s.cb.as_ref().map(|c| c.protocol.clone_ref(py)))
    }

    /// For loop.sendfile(): a future that completes when the write buffer
    /// is empty (asyncio's `_make_empty_waiter`).
    fn _make_empty_waiter(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        let fut = this
            .lp(py)
            .call_method0(pyo3::intern!(py, "create_future"))?;
        let (busy, empty) = this
            .st
            .with(py, |s| (s.empty_waiter.is_some(), s.buf.is_empty()));
        if busy {
            return Err(PyRuntimeError::new_err("Empty waiter is already set"));
        }
        // Kept until _reset_empty_waiter(): write() refuses data meanwhile.
        let f = fut.clone().unbind();
        this.st.with(py, |s| s.empty_waiter = Some(f));
        if empty {
            fut.call_method1("set_result", (py.None(),))?;
        }
        Ok(fut.unbind())
    }

    /// Unregister and close the fd now, without protocol callbacks (for a
    /// transport garbage-collected unclosed, as asyncio's __del__ does).
    fn _close_now(&self, py: Python<'_>) -> PyResult<()> {
        let (reg, file) = self.st.with(py, |s| {
            s.closing = true;
            s.conn_lost += 1;
            s.buf.clear();
            (s.reg.take(), s.file.take())
        });
        drop(reg);
        self.lp(py).get().unregister_source(py, self.token);
        if self.watch_hangup && !self.lp(py).get().closed() {
            self.lp(py)
                .get()
                .remove_watcher(py, self.fd, crate::event_loop::selector::READ)?;
        }
        if let Some(f) = file {
            self.lp(py).get().touch_io();
            f.bind(py).call_method0(pyo3::intern!(py, "close"))?;
        }
        Ok(())
    }

    fn _reset_empty_waiter(&self, py: Python<'_>) {
        let old = self.st.with(py, |s| s.empty_waiter.take());
        drop(old);
    }

    /// (read polling, write polling) for reprs.
    fn _polling(&self, py: Python<'_>) -> (bool, bool) {
        self.st.with(py, |s| {
            let open = s.reg.is_some() && s.started;
            (
                open && !s.paused && !s.read_eof && !s.closing && self.kind != Kind::WritePipe,
                open && !s.buf.is_empty(),
            )
        })
    }

    #[getter]
    fn _fd(&self) -> RawFd {
        self.fd
    }

    /// A copy of the context the protocol's callbacks run in (for
    /// start_tls(), whose TLS layer runs the application's callbacks in
    /// it; a copy, because this transport enters its own).
    fn _copy_context(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self
            .ctx
            .bind(py)
            .call_method0(pyo3::intern!(py, "copy"))?
            .unbind())
    }

    #[getter]
    fn _paused(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.paused)
    }

    #[getter]
    fn _protocol_paused(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.protocol_paused)
    }

    #[getter]
    fn _conn_lost(&self, py: Python<'_>) -> u32 {
        self.st.with(py, |s| s.conn_lost)
    }

    #[getter]
    fn _closed(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.reg.is_none())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.lp)?;
        visit.call(&self.ctx)?;
        if let Some(r) = self.st.try_with(|s| -> Result<(), PyTraverseError> {
            if let Some(c) = &s.cb {
                visit.call(&c.protocol)?;
                visit.call(&c.data_received)?;
                visit.call(&c.get_buffer)?;
                visit.call(&c.buffer_updated)?;
            }
            visit.call(&s.wrapper)?;
            visit.call(&s.file)?;
            visit.call(&s.empty_waiter)?;
            Ok(())
        }) {
            r?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let old = self
            .st
            .try_with(|s| (s.cb.take(), s.wrapper.take(), s.empty_waiter.take()));
        drop(old);
    }
}
