//! `LoopCore`: the native half of `tokioloop.Loop`.
//!
//! It owns the ready queue, the timer heap, the fd watchers and the run
//! loop, and implements the hot methods (call_soon & co., time,
//! create_future, create_task, add_reader & co.). The Python class
//! `tokioloop.Loop(LoopCore, asyncio.AbstractEventLoop)` adds the rest.
//!
//! Locking: `state` is a `GilCell` (a RefCell under the GIL, a mutex on
//! free-threaded builds). No Python code may run while it is borrowed:
//! nothing is allocated or released (decref'd) inside. Whatever leaves the
//! state is moved into a local "garbage" vector and released afterwards.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};
use pyo3::PyTraverseError;
use rustc_hash::FxHashMap;

use super::cell::GilCell;
use super::clock;
use super::handle::{self, Args, Handle, HandleRef};
use super::io::{self, Driver};
use super::job::Job;
use super::oserror;
use super::pyobjs;
use super::recycle::BytesRecycler;
use super::selector::{Selector, Watcher, READ, WRITE};
use super::spin::{thread_cpu_time, SpinPolicy};
use super::timers::Timers;
use crate::transports::stream::{StreamCore, MAX_READ};
use crate::transports::Source;

/// asyncio's MAXIMUM_SELECT_TIMEOUT: never sleep longer than a day at once.
const MAX_SELECT_TIMEOUT: f64 = 24.0 * 3600.0;
/// While callbacks keep the ready queue non-empty, I/O is polled every
/// BUSY_POLL_ITERATIONS iterations, and at least once per kernel clock tick
/// (1-4 ms), whichever comes first. Polling on every iteration would cost a
/// syscall per step of a callback chain for nothing.
const BUSY_POLL_ITERATIONS: u32 = 64;
// Except right after the loop itself did I/O (`LoopCore::io_touched`).

/// Per-run bookkeeping of the run loop.
pub(crate) struct RunState {
    batch: VecDeque<Job>,
    events: io::Events,
    busy_iterations: u32,
    last_poll_coarse: i64,
    garbage: Garbage,
    tokens: Vec<(u64, u8)>,
    /// Jobs of the sources `tokens` named (kept to reuse its allocation).
    woken: Vec<Job>,
}

impl RunState {
    fn new() -> Self {
        RunState {
            batch: VecDeque::new(),
            events: io::new_events(),
            busy_iterations: BUSY_POLL_ITERATIONS,
            last_poll_coarse: 0,
            garbage: Garbage::default(),
            tokens: Vec::new(),
            woken: Vec::new(),
        }
    }
}

pub(crate) struct State {
    pub(crate) ready: VecDeque<Job>,
    pub(crate) timers: Timers,
    pub(crate) selector: Selector,
}

impl State {
    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        for j in &self.ready {
            j.visit(visit)?;
        }
        self.timers.visit(visit)?;
        self.selector.visit(visit)
    }

    fn drain(&mut self, epfd: Option<RawFd>, garbage: &mut Garbage) {
        garbage.jobs.extend(self.ready.drain(..));
        self.timers.drain(&mut garbage.timers);
        if let Some(epfd) = epfd {
            self.selector
                .drain(epfd, &mut garbage.watchers, &mut garbage.objects);
        }
    }
}

/// Things taken out of the state, released once the state is not borrowed.
#[derive(Default)]
struct Garbage {
    timers: Vec<HandleRef>,
    watchers: Vec<Watcher>,
    jobs: Vec<Job>,
    objects: Vec<Py<PyAny>>,
}

impl Garbage {
    /// Give queued handles back to the GC, then drop everything. The vectors
    /// keep their capacity: a Garbage lives in the RunState and is reused.
    #[inline]
    fn release(&mut self, py: Python<'_>) {
        if self.timers.is_empty()
            && self.jobs.is_empty()
            && self.watchers.is_empty()
            && self.objects.is_empty()
        {
            return;
        }
        self.release_slow(py);
    }

    #[inline(never)]
    fn release_slow(&mut self, py: Python<'_>) {
        for t in self.timers.drain(..) {
            t.retrack();
            t.release(py);
        }
        for j in self.jobs.drain(..) {
            if let Job::Handle(h) = j {
                h.retrack();
                h.release(py);
            }
        }
        self.watchers.clear();
        self.objects.clear();
    }
}

#[pyclass(
    frozen,
    subclass,
    weakref,
    module = "tokioloop._tokioloop",
    name = "LoopCore"
)]
pub struct LoopCore {
    state: GilCell<State>,
    pub(crate) driver: Driver,
    stopping: AtomicBool,
    closed: AtomicBool,
    debug: AtomicBool,
    /// `time` is replaced on the instance (`mock.patch.object(loop, "time")`)
    /// or overridden by a subclass: the loop's deadlines then come from
    /// `self.time()`, as asyncio's do, instead of the native clock.
    py_time: AtomicBool,
    /// The loop wrote, connected, closed or started watching something since
    /// its last look at I/O, so something may be ready now: the next
    /// iteration looks, as every asyncio iteration does (a transport's peer
    /// in the same loop gets its data_received one iteration after write()).
    io_touched: AtomicBool,
    /// threading.get_ident() of the thread running the loop, 0 if none.
    thread_id: AtomicU64,
    cancelled_timers: AtomicUsize,
    task_factory: GilCell<Option<Py<PyAny>>>,
    slow_callback_duration: AtomicU64,
    clock_resolution: f64,
    /// Tasks made without a factory get an AnywhereCoroutine around their
    /// coroutine (await-anywhere tasks).
    anywhere_tasks: AtomicBool,
    next_op_id: AtomicU64,
    next_token: AtomicU64,
    /// Transports registered with the reactor, by token.
    sources: GilCell<FxHashMap<u64, Source>>,
    /// One receive buffer for all transports of the loop.
    read_buf: GilCell<Vec<u8>>,
    /// The bytes object of the last data_received/datagram_received call,
    /// refilled for the next read when nothing kept it (see recycle.rs).
    pub(crate) recycler: BytesRecycler,
    /// Whether and how long idle waits poll before they sleep (see
    /// spin.rs and Driver::wait), up to TOKIOLOOP_SPIN_US (default
    /// DEFAULT_SPIN_US). Kept across runs, so that a program of many short
    /// runs (run_until_complete() per call, await_() from a thread without
    /// a loop) keeps what was measured.
    spin: GilCell<SpinPolicy>,
    /// Jobs run so far (the spin policy's measure of work done when no
    /// bytes are read). Only the loop's thread writes it.
    jobs_run: AtomicU64,
    /// The last sock_recv() read DIRECT_READ_MIN bytes or more: the next
    /// large one reads straight into its bytes object (see sock.rs).
    pub(crate) big_sock_reads: AtomicBool,
    /// Bytes read by transports, datagram endpoints, sock_recv() and
    /// sock_recv_into() so far (the spin policy's measure of work done, see
    /// spin.rs). Only the loop's thread writes it.
    bytes_read: AtomicU64,
}

/// Add `n` to a counter that only the loop's thread writes (others may
/// read it): a plain load and store, no locked read-modify-write.
#[inline]
fn add_by_owner(counter: &AtomicU64, n: usize) {
    let total = counter.load(Ordering::Relaxed);
    counter.store(total.wrapping_add(n as u64), Ordering::Relaxed);
}

/// Default of TOKIOLOOP_SPIN_US.
const DEFAULT_SPIN_US: u64 = 50;
/// Largest TOKIOLOOP_SPIN_US taken (larger values are clamped).
const MAX_SPIN_US: u64 = 1000;

/// The spin limit from the environment (read once per process).
fn spin_limit() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("TOKIOLOOP_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(DEFAULT_SPIN_US)
            .min(MAX_SPIN_US);
        Duration::from_micros(us)
    })
}

fn current_thread_ident() -> u64 {
    // SAFETY: PyThread_get_thread_ident has no preconditions.
    unsafe { ffi::PyThread_get_thread_ident() as u64 }
}

fn is_context(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: a type check on a live object we hold a reference to.
    unsafe { ffi::PyContext_CheckExact(obj.as_ptr()) != 0 }
}

impl LoopCore {
    #[inline]
    pub(crate) fn with_state<R>(&self, py: Python<'_>, f: impl FnOnce(&mut State) -> R) -> R {
        self.state.with(py, f)
    }

    #[inline]
    pub(crate) fn debug(&self) -> bool {
        self.debug.load(Ordering::Relaxed)
    }

    pub(crate) fn timer_cancelled(&self) {
        self.cancelled_timers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn new_token(&self) -> u64 {
        self.next_token.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register_source(&self, py: Python<'_>, token: u64, source: Source) {
        let old = self.sources.with(py, |m| m.insert(token, source));
        drop(old);
    }

    /// Replace what is registered under `token`, if anything is (a closed
    /// transport stays unregistered).
    pub(crate) fn replace_source(&self, py: Python<'_>, token: u64, source: Source) {
        let old = self.sources.with(py, |m| match m.get_mut(&token) {
            Some(slot) => Some(std::mem::replace(slot, source)),
            None => Some(source),
        });
        drop(old);
    }

    pub(crate) fn unregister_source(&self, py: Python<'_>, token: u64) {
        let old = self.sources.with(py, |m| m.remove(&token));
        drop(old);
    }

    /// Count `n` bytes read by a transport, sock_recv() or sock_recv_into()
    /// (see `bytes_read`).
    #[inline]
    pub(crate) fn count_read(&self, n: usize) {
        add_by_owner(&self.bytes_read, n);
    }

    /// Run `f` on the loop's receive buffer (MAX_READ bytes).
    pub(crate) fn with_read_buffer<R>(&self, py: Python<'_>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.read_buf.with(py, |b| {
            if b.len() < MAX_READ {
                b.resize(MAX_READ, 0);
            }
            f(b)
        })
    }

    /// Another loop's run is open in this thread (Driver::run_session):
    /// this one cannot block on its own runtime, as asyncio refuses nested
    /// runs of two loops.
    fn check_no_foreign_session(&self) -> PyResult<()> {
        if self.driver.in_foreign_session() {
            return Err(PyRuntimeError::new_err(
                "Cannot run the event loop while another loop is running",
            ));
        }
        Ok(())
    }

    /// Something the loop did may have made an fd ready (see `io_touched`).
    #[inline]
    pub(crate) fn touch_io(&self) {
        self.io_touched.store(true, Ordering::Relaxed);
    }

    pub(crate) fn new_op_id(&self) -> u64 {
        self.next_op_id.fetch_add(1, Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn check_closed(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Relaxed) {
            Err(PyRuntimeError::new_err("Event loop is closed"))
        } else {
            Ok(())
        }
    }

    fn check_thread(&self) -> PyResult<()> {
        let running = self.thread_id.load(Ordering::Relaxed);
        if running != 0 && running != current_thread_ident() {
            return Err(PyRuntimeError::new_err(
                "Non-thread-safe operation invoked on an event loop other than the current one",
            ));
        }
        Ok(())
    }

    /// asyncio's `_check_callback`, done in debug mode only, as asyncio
    /// and uvloop do: otherwise a non-callable is accepted and fails when
    /// it runs, through the exception handler ("Exception in callback").
    /// Sanic's tests pass a Task to call_later() and expect just that.
    fn check_callback(
        py: Python<'_>,
        cb: &Bound<'_, PyAny>,
        method: &str,
        debug: bool,
    ) -> PyResult<()> {
        if !debug {
            return Ok(());
        }
        if !cb.is_callable() {
            if cb.hasattr("send").unwrap_or(false) && cb.hasattr("throw").unwrap_or(false) {
                return Err(PyTypeError::new_err(format!(
                    "coroutines cannot be used with {method}()"
                )));
            }
            return Err(PyTypeError::new_err(format!(
                "a callable object was expected by {method}(), got {}",
                cb.repr()?
            )));
        }
        if pyobjs::iscoroutinefunction(py)?.call1((cb,))?.is_truthy()? {
            return Err(PyTypeError::new_err(format!(
                "coroutines cannot be used with {method}()"
            )));
        }
        Ok(())
    }

    fn make_context(py: Python<'_>, context: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        match context {
            Some(c) if !c.is_none() => {
                if !is_context(c) {
                    return Err(PyTypeError::new_err(format!(
                        "context must be a contextvars.Context, got {}",
                        c.get_type().name()?
                    )));
                }
                Ok(c.clone().unbind())
            }
            // SAFETY: PyContext_CopyCurrent returns a new reference or NULL
            // with an exception set, which from_owned_ptr_or_err handles.
            _ => unsafe {
                Ok(Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent())?.unbind())
            },
        }
    }

    fn new_handle(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
        debug: bool,
    ) -> PyResult<Handle> {
        let py = slf.py();
        let ctx = Self::make_context(py, context)?;
        let tb = if debug {
            Some(pyobjs::creation_traceback(py)?)
        } else {
            None
        };
        Ok(Handle::new(
            callback.clone().unbind(),
            args,
            ctx,
            slf.clone().into_any().unbind(),
            tb,
        ))
    }

    #[inline]
    pub(crate) fn push_ready(&self, py: Python<'_>, job: Job) {
        self.state.with(py, |st| st.ready.push_back(job));
    }

    /// Queue work as call_soon would: refused once the loop is closed.
    pub(crate) fn push_ready_open(&self, py: Python<'_>, job: Job) -> PyResult<()> {
        self.check_closed()?;
        self.push_ready(py, job);
        Ok(())
    }

    /// Queue work from any thread and wake the loop.
    pub(crate) fn push_threadsafe(&self, py: Python<'_>, job: Job) {
        self.push_ready(py, job);
        self.driver.wake();
    }

    /// Queue a new handle, held by this single queue entry (see HandleRef::untrack).
    #[inline]
    fn push_new_handle(&self, py: Python<'_>, h: &HandleRef, threadsafe: bool) {
        h.untrack();
        let job = Job::Handle(h.clone_ref(py));
        if threadsafe {
            self.push_threadsafe(py, job);
        } else {
            self.push_ready(py, job);
        }
    }

    /// call_soon / call_soon_threadsafe.
    pub(crate) fn schedule_soon(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
        threadsafe: bool,
    ) -> PyResult<HandleRef> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed()?;
        let debug = this.debug();
        let method = if threadsafe {
            "call_soon_threadsafe"
        } else {
            if debug {
                this.check_thread()?;
            }
            "call_soon"
        };
        Self::check_callback(py, callback, method, debug)?;
        let h = handle::new_handle(
            py,
            Self::new_handle(slf, callback, args, context, debug)?,
            None,
        )?;
        this.push_new_handle(py, &h, threadsafe);
        Ok(h)
    }

    /// The loop's time: the native clock, or `self.time()` when that is
    /// replaced (see `py_time`).
    pub(crate) fn now(slf: &Bound<'_, Self>) -> PyResult<f64> {
        if slf.get().py_time.load(Ordering::Relaxed) {
            return slf
                .call_method0(pyo3::intern!(slf.py(), "time"))?
                .extract::<f64>();
        }
        Ok(clock::monotonic())
    }

    /// call_later's delay as a deadline.
    pub(crate) fn deadline_after(slf: &Bound<'_, Self>, delay: &Bound<'_, PyAny>) -> PyResult<f64> {
        if delay.is_none() {
            return Err(PyTypeError::new_err("delay must not be None"));
        }
        let d: f64 = delay.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "delay must be a real number, got {}",
                delay
                    .get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        if d.is_nan() {
            return Err(PyValueError::new_err("delay must not be NaN"));
        }
        Ok(Self::now(slf)? + d)
    }

    /// call_at's `when`, checked.
    pub(crate) fn deadline_at(when: &Bound<'_, PyAny>) -> PyResult<f64> {
        if when.is_none() {
            return Err(PyTypeError::new_err("when cannot be None"));
        }
        let w: f64 = when.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "when must be a real number, got {}",
                when.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_default()
            ))
        })?;
        if w.is_nan() {
            return Err(PyValueError::new_err("when must not be NaN"));
        }
        Ok(w)
    }

    /// A timer handle at `when`; `given`: the object call_at() was given
    /// (see `Handle::keep_when`).
    pub(crate) fn schedule_at(
        slf: &Bound<'_, Self>,
        when: f64,
        given: Option<&Bound<'_, PyAny>>,
        callback: &Bound<'_, PyAny>,
        args: Args,
        context: Option<&Bound<'_, PyAny>>,
        method: &str,
    ) -> PyResult<HandleRef> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed()?;
        let debug = this.debug();
        if debug {
            this.check_thread()?;
        }
        Self::check_callback(py, callback, method, debug)?;
        let mut base = Self::new_handle(slf, callback, args, context, debug)?;
        if let Some(g) = given {
            base.keep_when(g);
        }
        let th = handle::new_handle(py, base, Some(when))?;
        th.untrack();
        let entry = th.clone_ref(py);
        this.with_state(py, |st| st.timers.push(when, entry));
        Ok(th)
    }

    /// Install a watcher for `fd`; the one it replaces (if any) is cancelled.
    /// `owner`: the socket object of a native operation.
    pub(crate) fn set_watcher(
        &self,
        py: Python<'_>,
        fd: RawFd,
        kind: u32,
        w: Watcher,
        owner: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        self.touch_io();
        let Some(epfd) = self.driver.epfd() else {
            return Err(PyRuntimeError::new_err("Event loop is closed"));
        };
        let res = self.with_state(py, |st| st.selector.add(epfd, fd, kind, w, owner));
        match res {
            Ok((old, old_owner)) => {
                drop(old_owner);
                match old {
                    Some(Watcher::Py(old)) => old.cancel(py),
                    other => {
                        drop(other);
                        Ok(())
                    }
                }
            }
            Err((e, failed)) => {
                drop(failed);
                // EPERM is what asyncio's epoll selector reports for regular files.
                Err(oserror::from_io(py, e))
            }
        }
    }

    pub(crate) fn remove_watcher(&self, py: Python<'_>, fd: RawFd, kind: u32) -> PyResult<bool> {
        let Some(epfd) = self.driver.epfd() else {
            return Ok(false);
        };
        let old = self.with_state(py, |st| st.selector.remove(epfd, fd, kind));
        match old {
            Some((Some(Watcher::Py(h)), owner)) => {
                drop(owner);
                h.cancel(py)?;
                Ok(true)
            }
            Some(leftovers) => {
                drop(leftovers);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The fd of `obj` for removing its watcher: its fileno(), or, when it
    /// has none any more (a socket closed since it was registered), the fd
    /// it was registered with, found by identity as asyncio's selectors do.
    fn registered_fd(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<RawFd> {
        match fileobj_to_fd(obj) {
            Ok(fd) => Ok(fd),
            Err(e) => self.with_state(py, |st| st.selector.fd_of(obj)).ok_or(e),
        }
    }

    /// Watch `fd` for reading with a native reader (replacing any reader).
    pub(crate) fn add_native_reader(
        &self,
        py: Python<'_>,
        fd: RawFd,
        reader: std::sync::Arc<dyn super::selector::NativeReader>,
    ) -> PyResult<()> {
        self.check_closed()?;
        self.set_watcher(py, fd, READ, Watcher::Reader(reader), None)
    }

    /// Whether `fd`'s reader is a native reader (a datagram endpoint that
    /// is receiving, not paused or closed).
    pub(crate) fn has_native_reader(&self, py: Python<'_>, fd: RawFd) -> bool {
        self.with_state(py, |st| st.selector.has_native_reader(fd))
    }

    /// The id of the native operation on `fd` that resolves `fut`.
    pub(crate) fn op_for_future(
        &self,
        py: Python<'_>,
        fd: RawFd,
        kind: u32,
        fut: &Bound<'_, PyAny>,
    ) -> Option<u64> {
        self.with_state(py, |st| st.selector.op_for_future(fd, kind, fut.as_ptr()))
    }

    /// Whether the native operation `id` is still the one registered on
    /// `fd` (a readiness job may outlive its operation's registration).
    pub(crate) fn has_op(&self, py: Python<'_>, fd: RawFd, kind: u32, id: u64) -> bool {
        self.with_state(py, |st| st.selector.has_op(fd, kind, id))
    }

    /// The native operation `id` on `fd` finished (or was cancelled): take
    /// it out if it is still the one registered there.
    pub(crate) fn remove_op(&self, py: Python<'_>, fd: RawFd, kind: u32, id: u64) {
        let Some(epfd) = self.driver.epfd() else {
            return;
        };
        let old = self.with_state(py, |st| st.selector.finish_op(epfd, fd, kind, id));
        drop(old);
    }

    fn add_handle_watcher(
        slf: &Bound<'_, Self>,
        obj: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
        kind: u32,
        method: &str,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed()?;
        let fd = fileobj_to_fd(obj)?;
        let debug = this.debug();
        Self::check_callback(py, callback, method, debug)?;
        let data = Self::new_handle(slf, callback, Args::from_tuple(args), None, debug)?;
        let h = handle::new_handle(py, data, None)?;
        h.ensure_tracked();
        this.set_watcher(py, fd, kind, Watcher::Py(h), None)?;
        let old = this.with_state(py, |st| st.selector.set_fileobj(fd, obj.clone().unbind()));
        // Released outside the state: a decref may run Python code.
        drop(old);
        Ok(())
    }

    // ---- the run loop ----

    /// One iteration, as asyncio's `_run_once`: poll I/O (without blocking
    /// if anything is ready), move due timers to the ready queue, then run
    /// everything that was ready when the iteration started.
    fn run_once(slf: &Bound<'_, Self>, rs: &mut RunState) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let stopping = this.stopping.load(Ordering::Relaxed);
        // A replaced time() is Python code: called before the state is borrowed.
        let py_now = if this.py_time.load(Ordering::Relaxed) {
            Some(Self::now(slf)?)
        } else {
            None
        };
        // The common case of a busy loop: callbacks are ready and it is not
        // time to poll I/O: one pass over the state does the iteration.
        let fast = {
            let RunState {
                batch,
                garbage,
                busy_iterations,
                last_poll_coarse,
                events,
                ..
            } = &mut *rs;
            this.with_state(py, |st| {
                // stop() makes the iteration poll I/O once more, as asyncio.
                if st.ready.is_empty() || stopping || this.io_touched.load(Ordering::Relaxed) {
                    return false;
                }
                *busy_iterations += 1;
                if *busy_iterations >= BUSY_POLL_ITERATIONS
                    || (*busy_iterations % 8 == 0 && clock::coarse_ns() != *last_poll_coarse)
                {
                    return false;
                }
                // add_reader/add_writer callbacks are looked at on every
                // iteration, as asyncio's selector is: code that chains
                // callbacks expects a ready reader to run within an iteration
                // or two (tornado's TLS handshake over add_reader). One
                // epoll_wait(0) on the private epoll, no reactor turn; the
                // loop's own self-pipe does not count, nor do pending sock_*
                // operations (their events come with the next full poll).
                if st.selector.with_callbacks() > 0 {
                    if let Some(epfd) = this.driver.look_watchers(events) {
                        st.selector.dispatch(
                            py,
                            epfd,
                            events,
                            &mut st.ready,
                            &mut garbage.watchers,
                        );
                    }
                    events.clear();
                }
                if st.timers.len() > 0 {
                    st.timers
                        .purge_cancelled(&this.cancelled_timers, &mut garbage.timers);
                    let end = py_now.unwrap_or_else(clock::monotonic) + this.clock_resolution;
                    st.timers.pop_due(
                        end,
                        &this.cancelled_timers,
                        &mut st.ready,
                        &mut garbage.timers,
                    );
                }
                std::mem::swap(&mut st.ready, batch);
                true
            })
        };
        if fast {
            rs.garbage.release(py);
            if other_threads() {
                // asyncio (in select()) and uvloop (around epoll) release
                // the GIL once per iteration, so another thread that waits
                // for it gets it between iterations rather than through the
                // interpreter's forced switch, which can come between two
                // callbacks of one iteration (Litestar's WebSocket test
                // client hands an event to one of two polling tasks and counts
                // on the first one getting it).
                py.detach(|| ());
            }
            Self::run_batch(slf, rs)?;
            if this.stopping.load(Ordering::Relaxed) {
                // stop() was called in an iteration that did not poll: what
                // I/O is ready now still runs in it, as in asyncio, whose
                // iterations all poll (a server's last bytes and EOF are read
                // before run_until_complete() returns).
                Self::run_ready_io(slf, rs)?;
            }
            return Ok(());
        }
        let garbage = &mut rs.garbage;
        let (busy, next_when, has_fds, has_timers) = this.with_state(py, |st| {
            st.timers
                .purge_cancelled(&this.cancelled_timers, &mut garbage.timers);
            (
                !st.ready.is_empty() || stopping,
                st.timers.next_when(),
                !st.selector.is_empty(),
                st.timers.len() > 0,
            )
        });
        garbage.release(py);

        // Not busy, or time to look at I/O (the fast path was not taken).
        let timeout = match next_when {
            _ if busy => Some(Duration::ZERO),
            None => None,
            Some(when) => {
                let now = match py_now {
                    Some(now) => now,
                    None => clock::monotonic(),
                };
                let t = (when - now).clamp(0.0, MAX_SELECT_TIMEOUT);
                Some(Duration::from_secs_f64(t))
            }
        };
        if has_fds || !busy || this.driver.has_sources() {
            let events = &mut rs.events;
            if busy {
                py.detach(|| this.driver.wait(timeout, Duration::ZERO, has_fds, events));
            } else {
                let jobs = this.jobs_run.load(Ordering::Relaxed);
                let bytes = this.bytes_read.load(Ordering::Relaxed);
                let spin = this
                    .spin
                    .with(py, |p| p.next_wait(jobs, bytes, &mut thread_cpu_time));
                if spin.is_zero() {
                    py.detach(|| this.driver.wait(timeout, spin, has_fds, events));
                } else {
                    let start = std::time::Instant::now();
                    py.detach(|| this.driver.wait(timeout, spin, has_fds, events));
                    let elapsed = start.elapsed();
                    this.spin.with(py, |p| p.spun(elapsed));
                }
            }
        }
        rs.busy_iterations = 0;
        rs.last_poll_coarse = clock::coarse_ns();
        this.io_touched.store(false, Ordering::Relaxed);
        // A signal that arrived while we slept (Ctrl-C) is raised now, not at
        // the next bytecode boundary, which may be far away.
        // SAFETY: called with the GIL held; it only runs Python signal
        // handlers on the main thread and is a no-op elsewhere.
        if unsafe { ffi::PyErr_CheckSignals() } < 0 {
            return Err(PyErr::fetch(py));
        }

        let garbage = &mut rs.garbage;
        let epfd = if rs.events.is_empty() {
            None
        } else {
            this.driver.epfd()
        };
        let end = if has_timers {
            Self::now(slf)? + this.clock_resolution
        } else {
            0.0
        };
        let batch = &mut rs.batch;
        let events = &rs.events;
        let woken = &mut rs.woken;
        this.woken_sources(py, &mut rs.tokens, woken);
        this.with_state(py, |st| {
            let State {
                ready,
                timers,
                selector,
            } = st;
            if let Some(epfd) = epfd {
                selector.dispatch(py, epfd, events, ready, &mut garbage.watchers);
            }
            ready.extend(woken.drain(..));
            if has_timers {
                timers.pop_due(end, &this.cancelled_timers, ready, &mut garbage.timers);
            }
            std::mem::swap(ready, batch);
        });
        rs.events.clear();
        garbage.release(py);
        Self::run_batch(slf, rs)
    }

    /// Jobs for the native sources (signals, child pidfds, ...) the reactor
    /// found ready.
    fn woken_sources(&self, py: Python<'_>, tokens: &mut Vec<(u64, u8)>, woken: &mut Vec<Job>) {
        self.driver.ready.take(tokens);
        if !tokens.is_empty() {
            self.sources.with(py, |m| {
                for (token, kind) in tokens.drain(..) {
                    if let Some(src) = m.get(&token).and_then(|s| s.live(py)) {
                        woken.push(Job::Source(src, kind));
                    }
                }
            });
        }
    }

    /// Poll I/O without blocking and run the callbacks of what is ready
    /// (only those: what the iteration's callbacks scheduled stays queued).
    fn run_ready_io(slf: &Bound<'_, Self>, rs: &mut RunState) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let has_fds = this.with_state(py, |st| !st.selector.is_empty());
        if !has_fds && !this.driver.has_sources() {
            return Ok(());
        }
        let events = &mut rs.events;
        py.detach(|| {
            this.driver
                .wait(Some(Duration::ZERO), Duration::ZERO, has_fds, events)
        });
        let epfd = if rs.events.is_empty() {
            None
        } else {
            this.driver.epfd()
        };
        this.woken_sources(py, &mut rs.tokens, &mut rs.woken);
        let batch = &mut rs.batch;
        let garbage = &mut rs.garbage;
        let events = &rs.events;
        this.with_state(py, |st| {
            if let Some(epfd) = epfd {
                st.selector
                    .dispatch(py, epfd, events, batch, &mut garbage.watchers);
            }
        });
        batch.extend(rs.woken.drain(..));
        rs.events.clear();
        rs.garbage.release(py);
        Self::run_batch(slf, rs)
    }

    /// Run what the iteration took from the ready queue.
    #[inline]
    fn run_batch(slf: &Bound<'_, Self>, rs: &mut RunState) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let debug = this.debug();
        let batch = &mut rs.batch;
        add_by_owner(&this.jobs_run, batch.len());
        while let Some(job) = batch.pop_front() {
            let res = if debug {
                Self::run_job_debug(slf, job)
            } else {
                Self::run_job(slf, job)
            };
            if let Err(e) = res {
                // KeyboardInterrupt/SystemExit: leave what was not run at
                // the head of the ready queue, as asyncio does.
                this.with_state(py, |st| {
                    while let Some(j) = batch.pop_back() {
                        st.ready.push_front(j);
                    }
                });
                return Err(e);
            }
        }
        Ok(())
    }

    #[inline]
    fn run_job(slf: &Bound<'_, Self>, job: Job) -> PyResult<()> {
        let py = slf.py();
        match job {
            Job::Handle(h) => {
                let res = if h.get().is_cancelled() {
                    Ok(())
                } else {
                    h.run(py)
                };
                h.retrack();
                h.release(py);
                res
            }
            Job::Io(fd, kind, op) => super::sock::run_op(slf, fd, kind, op),
            Job::Resolve(fut, res) => Self::report_native(slf, super::dns::resolve(py, fut, res)),
            Job::Stream(core, job) => {
                Self::report_native(slf, StreamCore::run_job(core.bind(py), job))
            }
            Job::Source(src, kind) => Self::report_native(slf, src.on_ready(py, kind)),
            Job::Reader(r) => Self::report_native(slf, r.on_ready(py)),
        }
    }

    /// An error out of native work (a protocol callback that raised where
    /// asyncio would report it through the exception handler too): report
    /// it; only SystemExit/KeyboardInterrupt stop the loop.
    #[cold]
    fn report_error(slf: &Bound<'_, Self>, err: PyErr) -> PyResult<()> {
        let py = slf.py();
        if crate::transports::stream::is_base_exit(py, &err) {
            return Err(err);
        }
        let ctx = PyDict::new(py);
        ctx.set_item("message", "Exception in callback (tokioloop native)")?;
        ctx.set_item("exception", err.value(py))?;
        slf.call_method1(pyo3::intern!(py, "call_exception_handler"), (ctx,))?;
        Ok(())
    }

    #[inline]
    fn report_native(slf: &Bound<'_, Self>, res: PyResult<()>) -> PyResult<()> {
        match res {
            Ok(()) => Ok(()),
            Err(e) => Self::report_error(slf, e),
        }
    }

    fn run_job_debug(slf: &Bound<'_, Self>, job: Job) -> PyResult<()> {
        let py = slf.py();
        let Job::Handle(h) = job else {
            return Self::run_job(slf, job);
        };
        if h.get().is_cancelled() {
            h.retrack();
            return Ok(());
        }
        slf.setattr(pyo3::intern!(py, "_current_handle"), h.bind(py))?;
        let t0 = clock::monotonic();
        let res = h.run(py);
        let dt = clock::monotonic() - t0;
        h.retrack();
        slf.setattr(pyo3::intern!(py, "_current_handle"), py.None())?;
        res?;
        let slow = f64::from_bits(slf.get().slow_callback_duration.load(Ordering::Relaxed));
        if dt >= slow {
            pyobjs::warn_slow_callback(py)?.call1((h.bind(py), dt))?;
        }
        Ok(())
    }

    fn vectorcall<'py>(
        py: Python<'py>,
        callable: &Bound<'py, PyAny>,
        args: &[&Bound<'py, PyAny>],
        kwnames: Option<&Bound<'py, PyTuple>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut ptrs = [std::ptr::null_mut::<ffi::PyObject>(); 8];
        assert!(
            args.len() <= ptrs.len(),
            "vectorcall with too many arguments"
        );
        for (p, a) in ptrs.iter_mut().zip(args) {
            *p = a.as_ptr();
        }
        let nkw = kwnames.map_or(0, |k| k.len());
        let npos = args.len() - nkw;
        // SAFETY: `ptrs` holds borrowed pointers to objects kept alive by
        // `args` for the whole call; the last `nkw` of them are the keyword
        // values named by `kwnames` (a tuple of str), as vectorcall requires.
        unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyObject_Vectorcall(
                    callable.as_ptr(),
                    ptrs.as_ptr(),
                    npos,
                    kwnames.map_or(std::ptr::null_mut(), |k| k.as_ptr()),
                ),
            )
        }
    }
}

fn is_time(name: &Bound<'_, PyString>) -> bool {
    name.to_str().is_ok_and(|n| n == "time")
}

/// object's attribute assignment (`value` NULL: deletion).
fn generic_setattr(
    obj: &Bound<'_, PyAny>,
    name: &Bound<'_, PyString>,
    value: *mut ffi::PyObject,
) -> PyResult<()> {
    // SAFETY: `obj` and `name` are live objects; `value` is a live object
    // or NULL, which PyObject_GenericSetAttr takes as a deletion. It returns
    // -1 with an exception set on failure.
    if unsafe { ffi::PyObject_GenericSetAttr(obj.as_ptr(), name.as_ptr(), value) } < 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    Ok(())
}

/// selectors' `_fileobj_to_fd`: an int, or an object with fileno().
///
/// The type is tested before converting: converting a socket to an int
/// first and falling back on failure made CPython format a TypeError that
/// was thrown away, on every sock_* call (callgrind, `sock_*` echo at 1 KiB:
/// ~1,800 instructions per call, a fifth of the server's).
pub(crate) fn fileobj_to_fd(obj: &Bound<'_, PyAny>) -> PyResult<RawFd> {
    let fd: i64 = if obj.is_instance_of::<pyo3::types::PyInt>() {
        match obj.extract::<i64>() {
            Ok(i) => i,
            Err(_) => {
                return Err(PyValueError::new_err(format!(
                    "Invalid file descriptor: {obj}"
                )))
            }
        }
    } else {
        match obj
            .call_method0(pyo3::intern!(obj.py(), "fileno"))
            .and_then(|r| r.extract::<i64>())
        {
            Ok(i) => i,
            Err(_) => {
                return Err(PyValueError::new_err(format!(
                    "Invalid file object: {}",
                    obj.repr()?
                )))
            }
        }
    };
    if fd < 0 || fd > i32::MAX as i64 {
        return Err(PyValueError::new_err(format!(
            "Invalid file descriptor: {fd}"
        )));
    }
    Ok(fd as RawFd)
}

/// A tuple of keyword names for vectorcall, built once.
macro_rules! kwnames {
    ($py:expr, $($name:literal),+) => {{
        static NAMES: pyo3::sync::PyOnceLock<Py<PyTuple>> = pyo3::sync::PyOnceLock::new();
        NAMES
            .get_or_init($py, || {
                PyTuple::new($py, [$(pyo3::types::PyString::intern($py, $name)),+])
                    .expect("a tuple of str")
                    .unbind()
            })
            .bind($py)
    }};
}

/// Whether the interpreter has thread states besides this thread's
/// (threads that may be waiting for the GIL).
fn other_threads() -> bool {
    // SAFETY: called with the GIL held (from run_once): the thread state and
    // the interpreter's list of thread states are stable while it is held;
    // only pointers are read.
    unsafe {
        let ts = ffi::PyThreadState_Get();
        let head = ffi::PyInterpreterState_ThreadHead(ffi::PyThreadState_GetInterpreter(ts));
        !head.is_null() && (head != ts || !ffi::PyThreadState_Next(head).is_null())
    }
}

#[pymethods]
impl LoopCore {
    /// The read end of the loop's self-pipe (-1: none), so that its watcher
    /// does not make every busy iteration look at the private epoll.
    fn _set_self_pipe(&self, py: Python<'_>, fd: RawFd) {
        self.with_state(py, |st| st.selector.set_quiet((fd >= 0).then_some(fd)));
    }

    /// Arguments are for the Python subclass's __init__ (Loop(anywhere_tasks=...)).
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        super::malloc::tune_once();
        let driver = Driver::new().map_err(|e| {
            PyOSError::new_err((
                e.raw_os_error().unwrap_or(0),
                format!("cannot create the loop's reactor: {e}"),
            ))
        })?;
        Ok(LoopCore {
            state: GilCell::new(State {
                ready: VecDeque::new(),
                timers: Timers::default(),
                selector: Selector::default(),
            }),
            driver,
            stopping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            debug: AtomicBool::new(false),
            py_time: AtomicBool::new(false),
            io_touched: AtomicBool::new(false),
            thread_id: AtomicU64::new(0),
            cancelled_timers: AtomicUsize::new(0),
            task_factory: GilCell::new(None),
            slow_callback_duration: AtomicU64::new(0.1f64.to_bits()),
            clock_resolution: clock::resolution(),
            anywhere_tasks: AtomicBool::new(false),
            next_op_id: AtomicU64::new(1),
            next_token: AtomicU64::new(1),
            sources: GilCell::new(FxHashMap::default()),
            read_buf: GilCell::new(Vec::new()),
            recycler: BytesRecycler::new(),
            spin: GilCell::new(SpinPolicy::new(spin_limit())),
            jobs_run: AtomicU64::new(0),
            big_sock_reads: AtomicBool::new(false),
            bytes_read: AtomicU64::new(0),
        })
    }

    fn time(&self) -> f64 {
        clock::monotonic()
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        // If stop() comes from another thread (it should not, but asyncio
        // users do it), make a sleeping loop notice.
        self.driver.wake();
    }

    fn is_running(&self) -> bool {
        self.thread_id.load(Ordering::Relaxed) != 0
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn get_debug(&self) -> bool {
        self.debug()
    }

    /// Attribute assignment as object's. Replacing `time` on the instance
    /// (`mock.patch.object(loop, "time")`, as aiohttp's tests do) makes the
    /// loop's deadlines come from it, as asyncio's come from `self.time()`.
    fn __setattr__(
        slf: &Bound<'_, Self>,
        name: &Bound<'_, PyString>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        generic_setattr(slf.as_any(), name, value.as_ptr())?;
        if is_time(name) {
            slf.get().py_time.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn __delattr__(slf: &Bound<'_, Self>, name: &Bound<'_, PyString>) -> PyResult<()> {
        generic_setattr(slf.as_any(), name, std::ptr::null_mut())?;
        if is_time(name) {
            Self::_refresh_time_hook(slf)?;
        }
        Ok(())
    }

    /// Whether `time` is the loop's own: not replaced on the instance nor
    /// overridden by a subclass (Loop.__init__ asks, for subclasses).
    fn _refresh_time_hook(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let name = pyo3::intern!(py, "time");
        let own = py.get_type::<LoopCore>().getattr(name)?;
        // Not through `__dict__`: reading it makes CPython create the
        // instance's dict, which turns off the specialised attribute loads
        // (a chained `loop.call_soon` cost ~270 more instructions a callback). Without an
        // instance attribute, `slf.time` is our method bound to `slf`.
        let replaced = !slf.get_type().getattr(name)?.is(&own) || {
            let got = slf.getattr(name)?;
            !(got.cast::<pyo3::types::PyCFunction>().is_ok()
                && got.getattr(pyo3::intern!(py, "__self__"))?.is(slf))
        };
        slf.get().py_time.store(replaced, Ordering::Relaxed);
        Ok(())
    }

    #[getter(_debug)]
    fn get_debug_attr(&self) -> bool {
        self.debug()
    }

    /// Any object, by its truth (asyncio's set_debug stores what it gets,
    /// and callers pass 0 and 1 too).
    #[setter(_debug)]
    fn set_debug_attr(&self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.debug.store(value.is_truthy()?, Ordering::Relaxed);
        Ok(())
    }

    #[getter]
    fn get_slow_callback_duration(&self) -> f64 {
        f64::from_bits(self.slow_callback_duration.load(Ordering::Relaxed))
    }

    #[setter]
    fn set_slow_callback_duration(&self, value: f64) {
        self.slow_callback_duration
            .store(value.to_bits(), Ordering::Relaxed);
    }

    #[getter(_anywhere_tasks)]
    fn get_anywhere_tasks(&self) -> bool {
        self.anywhere_tasks.load(Ordering::Relaxed)
    }

    #[setter(_anywhere_tasks)]
    fn set_anywhere_tasks(&self, value: bool) {
        self.anywhere_tasks.store(value, Ordering::Relaxed);
    }

    #[getter(_clock_resolution)]
    fn get_clock_resolution(&self) -> f64 {
        self.clock_resolution
    }

    #[getter(_stopping)]
    fn get_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    #[setter(_stopping)]
    fn set_stopping(&self, value: bool) {
        self.stopping.store(value, Ordering::Relaxed);
    }

    #[getter(_closed)]
    fn get_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    #[getter(_thread_id)]
    fn get_thread_id(&self) -> Option<u64> {
        match self.thread_id.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    #[setter(_thread_id)]
    fn set_thread_id(&self, value: Option<u64>) {
        self.thread_id.store(value.unwrap_or(0), Ordering::Relaxed);
    }

    #[getter(_task_factory)]
    fn get_task_factory_attr(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.task_factory
            .with(py, |f| f.as_ref().map(|f| f.clone_ref(py)))
    }

    #[setter(_task_factory)]
    fn set_task_factory_attr(&self, py: Python<'_>, value: Option<Py<PyAny>>) {
        let old = self.task_factory.with(py, |f| std::mem::replace(f, value));
        drop(old);
    }

    fn get_task_factory(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.get_task_factory_attr(py)
    }

    fn set_task_factory(&self, py: Python<'_>, factory: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let factory = factory.filter(|f| !f.is_none());
        if let Some(f) = factory {
            if !f.is_callable() {
                return Err(PyTypeError::new_err(
                    "task factory must be a callable or None",
                ));
            }
        }
        self.set_task_factory_attr(py, factory.map(|f| f.clone().unbind()));
        Ok(())
    }

    fn create_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let fut_type = pyobjs::future_type(py)?;
        Self::vectorcall(py, fut_type, &[slf.as_any()], Some(kwnames!(py, "loop")))
    }

    #[pyo3(signature = (coro, *, name=None, context=None, **kwargs))]
    fn create_task<'py>(
        slf: &Bound<'py, Self>,
        coro: &Bound<'py, PyAny>,
        name: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed()?;
        let name = name.filter(|n| !n.is_none());
        let context = context.filter(|c| !c.is_none());
        let kwargs = kwargs.filter(|k| !k.is_empty());
        if let Some(k) = kwargs.filter(|_| py.version_info() < (3, 13)) {
            let k = k.keys().get_item(0)?;
            return Err(PyTypeError::new_err(format!(
                "create_task() got an unexpected keyword argument {}",
                k.repr()?
            )));
        }
        let factory = this.get_task_factory_attr(py);
        if (factory.is_some() || kwargs.is_some()) && crate::fiber::needs_thread_stack(py) {
            // A factory, or Task(eager_start=True) on 3.13+, may run the new
            // task's first step right here: run it where the task's later
            // steps will run (see needs_thread_stack).
            let (s, c) = (slf.clone().unbind(), coro.clone().unbind());
            let (n, x) = (
                name.map(|n| n.clone().unbind()),
                context.map(|c| c.clone().unbind()),
            );
            let k = kwargs.map(|k| k.clone().unbind());
            let made = crate::fiber::on_thread_stack(move || {
                Python::attach(|py| {
                    Self::create_task_impl(
                        s.bind(py),
                        c.bind(py),
                        n.as_ref().map(|n| n.bind(py)),
                        x.as_ref().map(|x| x.bind(py)),
                        k.as_ref().map(|k| k.bind(py)),
                        factory,
                    )
                    .map(Bound::unbind)
                })
            });
            return made.map(|t| t.into_bound(py));
        }
        Self::create_task_impl(slf, coro, name, context, kwargs, factory)
    }
}

impl LoopCore {
    /// create_task() once its arguments are checked.
    fn create_task_impl<'py>(
        slf: &Bound<'py, Self>,
        coro: &Bound<'py, PyAny>,
        name: Option<&Bound<'py, PyAny>>,
        context: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
        factory: Option<Py<PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        if let Some(factory) = factory {
            let factory = factory.bind(py);
            let task = if context.is_none() && kwargs.is_none() {
                factory.call1((slf, coro))?
            } else {
                let kw = PyDict::new(py);
                if let Some(c) = context {
                    kw.set_item("context", c)?;
                }
                if let Some(k) = kwargs {
                    kw.update(k.as_mapping())?;
                }
                factory.call((slf, coro), Some(&kw))?
            };
            if let Some(n) = name {
                task.call_method1(pyo3::intern!(py, "set_name"), (n,))?;
            }
            return Ok(task);
        }
        let task_type = pyobjs::task_type(py)?;
        let wrapped;
        // SAFETY: a type check on a live object.
        let is_coro = unsafe { ffi::PyCoro_CheckExact(coro.as_ptr()) } != 0;
        // (Anything but a native coroutine goes to Task unchanged, which
        // accepts or rejects it as usual.)
        let coro = if is_coro && this.anywhere_tasks.load(Ordering::Relaxed) {
            wrapped = crate::fiber::anywhere_coroutine(py, coro)?;
            &wrapped
        } else {
            coro
        };
        let task = if let Some(k) = kwargs {
            let kw = PyDict::new(py);
            kw.set_item("loop", slf)?;
            if let Some(n) = name {
                kw.set_item("name", n)?;
            }
            if let Some(c) = context {
                kw.set_item("context", c)?;
            }
            kw.update(k.as_mapping())?;
            task_type.call((coro,), Some(&kw))?
        } else {
            match (name, context) {
                (None, None) => Self::vectorcall(
                    py,
                    task_type,
                    &[coro, slf.as_any()],
                    Some(kwnames!(py, "loop")),
                )?,
                (Some(n), None) => Self::vectorcall(
                    py,
                    task_type,
                    &[coro, slf.as_any(), n],
                    Some(kwnames!(py, "loop", "name")),
                )?,
                (None, Some(c)) => Self::vectorcall(
                    py,
                    task_type,
                    &[coro, slf.as_any(), c],
                    Some(kwnames!(py, "loop", "context")),
                )?,
                (Some(n), Some(c)) => Self::vectorcall(
                    py,
                    task_type,
                    &[coro, slf.as_any(), n, c],
                    Some(kwnames!(py, "loop", "name", "context")),
                )?,
            }
        };
        // No frame to drop from the task's creation traceback (asyncio drops
        // its own create_task frame): this method has none, so the last frame
        // is already the caller's.
        Ok(task)
    }
}

#[pymethods]
impl LoopCore {
    /// A Handle for `callback(*args)` in a copy of the current context,
    /// not scheduled (asyncio's `events.Handle(callback, args, loop, None)`).
    fn _make_handle(
        slf: &Bound<'_, Self>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let debug = slf.get().debug();
        Self::check_callback(py, callback, "Handle", debug)?;
        let data = Self::new_handle(slf, callback, Args::from_tuple(args), None, debug)?;
        let h = handle::new_handle(py, data, None)?;
        h.ensure_tracked();
        Ok(h.as_py().clone_ref(py))
    }

    /// Queue an existing handle (signal handlers reuse theirs) and wake the loop.
    fn _call_handle_threadsafe(&self, py: Python<'_>, handle: &Bound<'_, PyAny>) -> PyResult<()> {
        self.check_closed()?;
        self.push_threadsafe(py, Job::Handle(HandleRef::from_object(handle)?));
        Ok(())
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn add_reader(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        Self::add_handle_watcher(slf, fd, callback, args, READ, "add_reader")
    }

    #[pyo3(signature = (fd, callback, *args))]
    fn add_writer(
        slf: &Bound<'_, Self>,
        fd: &Bound<'_, PyAny>,
        callback: &Bound<'_, PyAny>,
        args: &Bound<'_, PyTuple>,
    ) -> PyResult<()> {
        Self::add_handle_watcher(slf, fd, callback, args, WRITE, "add_writer")
    }

    fn remove_reader(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        let fd = self.registered_fd(py, fd)?;
        if self.is_closed() {
            return Ok(false);
        }
        self.remove_watcher(py, fd, READ)
    }

    fn remove_writer(&self, py: Python<'_>, fd: &Bound<'_, PyAny>) -> PyResult<bool> {
        let fd = self.registered_fd(py, fd)?;
        if self.is_closed() {
            return Ok(false);
        }
        self.remove_watcher(py, fd, WRITE)
    }

    /// Whether `fd` has a reader (kind="r") or writer ("w") registered.
    fn _has_watcher(&self, py: Python<'_>, fd: &Bound<'_, PyAny>, kind: &str) -> PyResult<bool> {
        let fd = fileobj_to_fd(fd)?;
        let k = if kind == "r" { READ } else { WRITE };
        Ok(self.with_state(py, |st| st.selector.has(fd, k)))
    }

    /// The native run loop: iterate until stop(). run_forever() in Python
    /// does asyncio's set-up and clean-up around it.
    fn _run_forever_native(slf: &Bound<'_, Self>) -> PyResult<()> {
        let this = slf.get();
        this.check_no_foreign_session()?;
        let mut rs = RunState::new();
        // One block_on on the reactor for the whole run (see run_session).
        this.driver.run_session(|| loop {
            Self::run_once(slf, &mut rs)?;
            if this.stopping.load(Ordering::Relaxed) {
                return Ok(());
            }
        })
    }

    /// One iteration (asyncio's `_run_once`), for code that drives loops by hand.
    fn _run_once(slf: &Bound<'_, Self>) -> PyResult<()> {
        slf.get().check_no_foreign_session()?;
        Self::run_once(slf, &mut RunState::new())
    }

    /// Number of callbacks ready to run (asyncio's `len(loop._ready)`).
    fn _ready_count(&self, py: Python<'_>) -> usize {
        self.with_state(py, |st| st.ready.len())
    }

    /// Number of scheduled timers (asyncio's `len(loop._scheduled)`).
    fn _timer_count(&self, py: Python<'_>) -> usize {
        self.with_state(py, |st| st.timers.len())
    }

    /// Native part of close(): release everything queued or watched and
    /// stop the reactor. The caller (Loop.close) checks is_running first.
    fn _close_native(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut garbage = Garbage::default();
        let epfd = self.driver.epfd();
        self.with_state(py, |st| st.drain(epfd, &mut garbage));
        let factory = self.task_factory.with(py, |f| f.take());
        drop(factory);
        // Transports left open stay usable for their finalizers (which
        // close their fds), but the loop no longer holds them.
        let sources = self.sources.with(py, std::mem::take);
        drop(sources);
        self.recycler.clear(py);
        garbage.release(py);
        if !self.driver.close() {
            return Err(PyRuntimeError::new_err("Cannot close a running event loop"));
        }
        Ok(())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Some(r) = self.state.try_with(|st| st.visit(&visit)) {
            r?;
        }
        if let Some(r) = self.sources.try_with(|m| -> Result<(), PyTraverseError> {
            for s in m.values() {
                s.visit(&visit)?;
            }
            Ok(())
        }) {
            r?;
        }
        if let Some(r) = self
            .task_factory
            .try_with(|f| f.as_ref().map(|f| visit.call(f)))
        {
            r.transpose()?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let mut garbage = Garbage::default();
        let epfd = self.driver.epfd();
        self.state.try_with(|st| st.drain(epfd, &mut garbage));
        let old = self.task_factory.try_with(|f| f.take());
        drop(old);
        let old = self.sources.try_with(std::mem::take);
        drop(old);
        // SAFETY: tp_clear runs with the GIL held (it is called by the GC).
        let py = unsafe { Python::assume_attached() };
        garbage.release(py);
    }
}
