//! The fiber engine: a corosensei coroutine on a pooled stack plus the
//! interpreter state that goes with it.
//!
//! Protocol. A fiber is resumed with an [`In`] message and comes back with
//! a [`Resumed`]. All interpreter-state switching happens on the resumer's
//! side, around `Coroutine::resume` (see [`resume`]): the resumer's own
//! state is saved into a buffer on its own stack, the fiber's block is
//! installed, the stacks are switched, and on the way back the reverse.
//! Nothing between `tlf_switch_in` and `tlf_switch_out` may call into
//! Python (an allocation could run the GC, a finalizer, and a nested
//! switch). A fiber runs in its resumer's contextvars Context (see the C
//! shim), so a task and the sync code it runs share one Context.
//!
//! Invariants:
//! * `current()` is the fiber whose stack the thread is executing (null: the
//!   thread's own stack). Only that fiber may call [`suspend`].
//! * A fiber is bound to the OS thread (and PyThreadState) that first ran it;
//!   it is never resumed anywhere else: suspended eval-loop frames on its
//!   stack hold that thread state's address.
//! * corosensei's `Drop` must never run on a suspended coroutine: its forced
//!   unwind would resume the stack without our state switch and unwind Rust
//!   panics through CPython frames. A suspended fiber is either resumed to
//!   completion (`kill`) or leaked (`leak`: the stack slot is never reused,
//!   the Python references it holds are never released).
//! * The GIL is held (the thread is attached) whenever a fiber is created,
//!   resumed, killed or dropped, except for the raw quit of idle runners in
//!   thread-exit destructors, which runs no Python code at all.
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use corosensei::{Coroutine, CoroutineResult, Yielder};
use pyo3::exceptions::{
    PyGeneratorExit, PyMemoryError, PyRuntimeError, PyStopIteration, PyValueError,
};
use pyo3::ffi;
use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use super::shim::{self, ResumerState, StateBlock};
use super::stack::{self, FiberStack};

/// Message into a fiber.
pub(crate) enum In {
    /// Resume with a value (the result of what the fiber waited for).
    Send(Py<PyAny>),
    /// Resume by raising this exception at the suspension point.
    Throw(PyErr),
    /// Runner fibers: run one step of a coroutine.
    Step(Step),
    /// Runner fibers: leave the runner loop (no Python code runs).
    Quit,
}

/// What a runner fiber does to a coroutine in one step.
pub(crate) struct Step {
    pub(crate) coro: Py<PyAny>,
    pub(crate) action: StepAction,
}

pub(crate) enum StepAction {
    Send(Py<PyAny>),
    Throw(PyErr),
}

/// Message out of a suspended fiber.
pub(crate) enum Out {
    /// The fiber waits: this is what its `await_` (or `fiber_suspend`)
    /// hands to the resumer.
    Yield(Py<PyAny>),
    /// Runner fibers: a step finished; the runner is idle again.
    StepDone(Outcome),
}

/// Result of driving an iterator one step (like `PySendResult`).
pub(crate) enum Outcome {
    Yielded(Py<PyAny>),
    Returned(Py<PyAny>),
    Raised(PyErr),
}

/// How a fiber's body ended.
pub(crate) enum Ret {
    Value(Py<PyAny>),
    Error(PyErr),
    Quit,
}

/// What `resume` observed.
pub(crate) enum Resumed {
    Yield(Py<PyAny>),
    StepDone(Outcome),
    Finished(Ret),
}

/// What a fiber runs.
pub(crate) enum Body {
    /// Call `func(*args, **kwargs)`.
    Call {
        func: Py<PyAny>,
        args: Option<Py<PyTuple>>,
        kwargs: Option<Py<PyDict>>,
    },
    /// A runner: executes coroutine steps sent to it, one after another.
    Runner,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Status {
    New,
    Running,
    Suspended,
    Done,
    Leaked,
}

/// Whether code on the fiber may use `await_` (its resumer drives the
/// yielded awaitables from an asyncio task) or only `fiber_suspend`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    Plain,
    Await,
}

type Co = Coroutine<In, Out, Ret, FiberStack>;

pub(crate) struct Fiber {
    co: Option<Co>,
    state: StateBlock,
    yielder: *const Yielder<In, Out>,
    pub(crate) status: Status,
    pub(crate) kind: Kind,
    owner_tid: u64,
    owner_ts: *mut ffi::PyThreadState,
    body: Option<Body>,
    guarded: bool,
    /// Top of the C stack and start of the data-stack chunk (measurements).
    stack_top: usize,
    chunk: usize,
    /// While running: the fiber that resumed this one (null: the thread's
    /// own stack did), and the C recursion budget its resumer had left then
    /// (see `on_thread_stack`).
    resumer: *mut Fiber,
    resumer_c_remaining: i32,
}

/// Per-process fiber configuration, fixed at module init.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    /// C recursion budget of a fresh fiber (3.12+; 0 = not applicable).
    pub(crate) c_budget: i32,
    /// Thread default C recursion budget (3.12+), for reference.
    pub(crate) c_default: i32,
    /// Assumed worst C stack bytes per C recursion unit (3.12+) or per
    /// recursion level (3.10/3.11).
    pub(crate) bytes_per_level: usize,
    pub(crate) stack_size: usize,
    pub(crate) chunk_size: usize,
    pub(crate) py_version: u32,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

pub(crate) fn config() -> &'static Config {
    CONFIG.get().expect("fiber configuration not initialised")
}

pub(crate) fn set_config(c: Config) -> &'static Config {
    CONFIG.get_or_init(|| c)
}

/// Per-thread fiber state, in one thread-local so that a resume costs one
/// TLS lookup (`__tls_get_addr` in a shared library). No destructor, so no
/// lazy-registration check on access.
struct FiberTls {
    /// The fiber whose stack the thread is running on (null: its own stack).
    current: Cell<*mut Fiber>,
    /// Process-unique id of the thread (0: not assigned yet).
    token: Cell<u64>,
}

thread_local! {
    static FTLS: FiberTls = const {
        FiberTls {
            current: Cell::new(std::ptr::null_mut()),
            token: Cell::new(0),
        }
    };
    static IDLE: RefCell<IdleRunners> = const { RefCell::new(IdleRunners(Vec::new())) };
}

/// C stack bytes in use at the last suspension (memory measurements only;
/// process-wide, last writer wins).
static LAST_SUSPEND_DEPTH: AtomicU64 = AtomicU64::new(0);

/// C stack bytes the last suspended fiber had in use.
pub(crate) fn last_suspend_depth() -> u64 {
    LAST_SUSPEND_DEPTH.load(Ordering::Relaxed)
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

#[inline]
fn ftls() -> *const FiberTls {
    FTLS.with(|t| t as *const FiberTls)
}

/// # Safety
/// `t` comes from `ftls()` on the calling thread.
#[inline]
unsafe fn token_of(t: *const FiberTls) -> u64 {
    let v = (*t).token.get();
    if v != 0 {
        v
    } else {
        let v = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        (*t).token.set(v);
        v
    }
}

/// A process-unique id of the calling OS thread (never reused, unlike
/// PyThreadState addresses and pthread ids).
pub(crate) fn thread_token() -> u64 {
    // SAFETY: the pointer is this thread's own, used at once.
    unsafe { token_of(ftls()) }
}

/// The fiber whose stack this thread is running on (null: none).
#[inline]
pub(crate) fn current() -> *mut Fiber {
    FTLS.with(|t| t.current.get())
}

impl Fiber {
    pub(crate) fn new(body: Body, kind: Kind) -> Box<Fiber> {
        Box::new(Fiber {
            co: None,
            state: StateBlock::new(),
            yielder: std::ptr::null(),
            status: Status::New,
            kind,
            owner_tid: 0,
            owner_ts: std::ptr::null_mut(),
            body: Some(body),
            guarded: false,
            stack_top: 0,
            chunk: 0,
            resumer: std::ptr::null_mut(),
            resumer_c_remaining: -1,
        })
    }

    /// True if the calling thread is the one this fiber is bound to (or the
    /// fiber never ran).
    pub(crate) fn on_owner_thread(&self) -> bool {
        self.owner_tid == 0 || self.owner_tid == thread_token()
    }

    pub(crate) fn guarded(&self) -> bool {
        self.guarded
    }

    /// (C stack top, data-stack chunk start) of a started fiber.
    pub(crate) fn stack_addresses(&self) -> (usize, usize) {
        (self.stack_top, self.chunk)
    }

    /// GC support: visit what the fiber owns while it is not running (the
    /// body before it starts; its Context and handled exception while it is
    /// suspended). Frames of a suspended fiber are not visited: like a
    /// thread's, their references count as external.
    pub(crate) fn traverse(&self, visit: &pyo3::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        match self.status {
            Status::New => {
                if let Some(Body::Call { func, args, kwargs }) = &self.body {
                    visit.call(func)?;
                    visit.call(args)?;
                    visit.call(kwargs)?;
                }
            }
            Status::Suspended => {
                // SAFETY: the block is switched out (fiber suspended) and the
                // GC runs with the GIL held.
                let (refs, n) = unsafe { self.state.refs() };
                for &r in &refs[..n] {
                    if !r.is_null() {
                        // SAFETY: `r` is a live object the block owns a
                        // reference to; ManuallyDrop keeps the refcount
                        // untouched; tp_traverse runs with the GIL held.
                        let obj = std::mem::ManuallyDrop::new(unsafe {
                            Bound::from_owned_ptr(Python::assume_attached(), r).unbind()
                        });
                        visit.call(&*obj)?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// GC support (tp_clear): only an unstarted fiber can let go of what it
    /// owns; a suspended one is killed by its owner's finalizer instead.
    pub(crate) fn clear(&mut self) {
        if self.status == Status::New {
            self.body = None;
            self.status = Status::Done;
        }
    }

    /// Innermost frame of a suspended fiber.
    pub(crate) fn top_frame(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if self.status != Status::Suspended || !self.on_owner_thread() {
            return Ok(None);
        }
        // SAFETY: GIL held on the owner thread; the block is switched out.
        unsafe {
            let f = self.state.top_frame(ffi::PyThreadState_Get());
            if f.is_null() {
                return match PyErr::take(py) {
                    Some(e) => Err(e),
                    None => Ok(None),
                };
            }
            Ok(Some(Bound::from_owned_ptr(py, f).unbind()))
        }
    }
}

impl Drop for Fiber {
    fn drop(&mut self) {
        // Owners kill or leak suspended fibers before dropping them (with the
        // GIL). This is the last line of defence: never let corosensei unwind
        // a suspended stack; keep its slot out of the pool instead.
        if let Some(mut co) = self.co.take() {
            if co.done() {
                drop(co);
            } else {
                // SAFETY: marks the coroutine finished without running its
                // stack; the objects on that stack are leaked, never touched.
                unsafe { co.force_reset() };
                co.into_stack().leak();
            }
        }
    }
}

/// Errors `resume` itself raises (the fiber is not entered).
fn not_resumable(msg: &str) -> PyErr {
    PyRuntimeError::new_err(msg.to_string())
}

/// Resumes `fp` with `msg`.
///
/// # Safety
/// GIL held; `fp` points to a live boxed `Fiber` that stays at this address
/// until this call returns.
pub(crate) unsafe fn resume(py: Python<'_>, fp: *mut Fiber, msg: In) -> PyResult<Resumed> {
    let ts = ffi::PyThreadState_Get();
    let tls = ftls();
    match (*fp).status {
        Status::Running => return Err(not_resumable("fiber is already running")),
        Status::Done => {
            return match msg {
                In::Throw(e) => Ok(Resumed::Finished(Ret::Error(e))),
                In::Quit => Ok(Resumed::Finished(Ret::Quit)),
                _ => Err(not_resumable("cannot resume a finished fiber")),
            }
        }
        Status::Leaked => return Err(not_resumable("cannot resume a leaked fiber")),
        Status::New => {
            match msg {
                // Never started: nothing to unwind, the exception is the result.
                In::Throw(e) => {
                    (*fp).status = Status::Done;
                    (*fp).body = None;
                    return Ok(Resumed::Finished(Ret::Error(e)));
                }
                In::Quit => {
                    (*fp).status = Status::Done;
                    (*fp).body = None;
                    return Ok(Resumed::Finished(Ret::Quit));
                }
                _ => start(fp, ts)?,
            }
        }
        Status::Suspended => {
            if (*fp).owner_tid != token_of(tls) || (*fp).owner_ts != ts {
                return Err(not_resumable(
                    "cannot resume a fiber from a thread other than the one that started it \
                     (fibers are bound to their OS thread)",
                ));
            }
        }
    }

    let mut co = (*fp).co.take().expect("fiber without a coroutine");
    let mut saved = ResumerState::new();
    let prev = (*tls).current.replace(fp);
    (*fp).resumer = prev;
    (*fp).resumer_c_remaining = shim::tlf_c_remaining(ts);
    (*fp).status = Status::Running;
    debug_assert!(ffi::PyErr_Occurred().is_null());
    // ---- switch window: no Python API calls until tlf_switch_out ----
    // Await fibers are awaited like coroutines and see the exception their
    // resumer handles, as a coroutine does; plain ones are greenlet-like.
    let link_exc = std::os::raw::c_int::from((*fp).kind == Kind::Await);
    shim::tlf_switch_in(ts, saved.as_raw(), (*fp).state.raw(), link_exc);
    let r = catch_unwind(AssertUnwindSafe(|| co.resume(msg)));
    shim::tlf_switch_out(ts, (*fp).state.raw(), saved.as_raw());
    // ---- end of switch window ----
    (*tls).current.set(prev);

    match r {
        Ok(CoroutineResult::Yield(out)) => {
            (*fp).co = Some(co);
            (*fp).status = Status::Suspended;
            Ok(match out {
                Out::Yield(v) => Resumed::Yield(v),
                Out::StepDone(o) => Resumed::StepDone(o),
            })
        }
        Ok(CoroutineResult::Return(ret)) => {
            finish(fp, co);
            Ok(Resumed::Finished(ret))
        }
        Err(payload) => {
            // A Rust panic escaped the fiber body (corosensei caught it at the
            // coroutine root, so the coroutine is finished).
            finish(fp, co);
            let _ = py;
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic in fiber".to_string());
            Err(PanicException::new_err(msg))
        }
    }
}

/// Runs `f` on this thread's own C stack, also when called on a fiber:
/// then below the point where the thread resumed the outermost running
/// fiber (that part of the thread's stack is unused until that resume
/// returns), with corosensei's `on_parent_stack`. Only the C stack changes:
/// the Python thread state (frames, exception, context) stays the caller's,
/// as for any call, while the fiber bookkeeping says "no fiber" (an
/// `await_` inside raises as on the loop's stack, instead of suspending a
/// fiber from a stack that is not its own) and the C recursion budget is
/// capped at what the thread had left there.
///
/// For code that must run where the loop's own steps run: a greenlet keeps
/// its C stack at the addresses where it started, so one started by another
/// task's eager first step must start on the stack that task's later steps
/// run on (see `LoopCore::create_task`).
///
/// Python 3.14's stack-bound checks (`c_stack_soft_limit`) would need the
/// thread's bounds here too; the shim does not support 3.14 yet.
pub(crate) fn on_thread_stack<R>(f: impl FnOnce() -> R + Send) -> R {
    let tls = ftls();
    // SAFETY: this thread's own TLS block.
    let cur = unsafe { (*tls).current.get() };
    if cur.is_null() {
        return f();
    }
    struct Restore {
        tls: *const FiberTls,
        cur: *mut Fiber,
        ts: *mut ffi::PyThreadState,
        c_remaining: i32,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: the same thread's TLS block and thread state as when
            // the guard was made (on_parent_stack returns on this thread).
            unsafe {
                (*self.tls).current.set(self.cur);
                if self.c_remaining >= 0 {
                    shim::tlf_set_c_remaining(self.ts, self.c_remaining);
                }
            }
        }
    }
    // SAFETY: every fiber on the `resumer` chain from the current one is
    // Running: each is blocked in `resume` of the next, and `resume`'s
    // contract keeps its box at its address until that call returns, so the
    // pointers are live. The outermost one's `yielder` was set by
    // `fiber_main` when it started and lives on its stack while it runs;
    // its parent link (read by on_parent_stack) is the thread's stack
    // pointer inside that `resume`, below which nothing is in use until it
    // returns. The thread state is this thread's (GIL held: we are running
    // Python-called code), and the budget written is the smaller of two
    // valid budgets, restored by the guard (also on a panic, which
    // on_parent_stack carries back here).
    unsafe {
        let mut outer = cur;
        while !(*outer).resumer.is_null() {
            outer = (*outer).resumer;
        }
        let ts = ffi::PyThreadState_Get();
        let c_remaining = shim::tlf_c_remaining(ts);
        let _restore = Restore {
            tls,
            cur,
            ts,
            c_remaining,
        };
        (*tls).current.set(std::ptr::null_mut());
        let cap = (*outer).resumer_c_remaining;
        if c_remaining >= 0 && cap >= 0 && cap < c_remaining {
            shim::tlf_set_c_remaining(ts, cap);
        }
        (*(*outer).yielder).on_parent_stack(f)
    }
}

/// First resume: take a stack, build the coroutine, prepare the state block.
unsafe fn start(fp: *mut Fiber, ts: *mut ffi::PyThreadState) -> PyResult<()> {
    let cfg = config();
    let stack = FiberStack::take()
        .map_err(|e| PyMemoryError::new_err(format!("cannot allocate a fiber stack: {e}")))?;
    let (chunk, chunk_size) = if cfg.chunk_size > 0 {
        (stack.chunk(), cfg.chunk_size)
    } else {
        (std::ptr::null_mut(), 0)
    };
    // The fiber will run in its resumer's Context; make sure there is one,
    // so that a variable the fiber sets first lands in the shared object.
    if shim::tlf_context_ensure(ts) != 0 {
        return Err(PyErr::fetch(Python::assume_attached()));
    }
    (*fp).guarded = stack.guarded();
    (*fp).stack_top = {
        use corosensei::stack::Stack;
        stack.base().get()
    };
    (*fp).chunk = chunk as usize;
    let body = (*fp).body.take().expect("fiber body");
    let addr = fp as usize;
    let co: Co = Coroutine::with_stack(stack, move |y: &Yielder<In, Out>, first: In| {
        fiber_main(addr, y, first, body)
    });
    (*fp)
        .state
        .init(ts, std::ptr::null_mut(), cfg.c_budget, chunk, chunk_size);
    (*fp).owner_tid = thread_token();
    (*fp).owner_ts = ts;
    (*fp).co = Some(co);
    Ok(())
}

/// The fiber finished: release its interpreter state and its stack.
unsafe fn finish(fp: *mut Fiber, co: Co) {
    (*fp).status = Status::Done;
    (*fp).state.finish();
    // The coroutine returned (or its panic was caught at the root), so the
    // stack holds nothing; it goes back to the pool.
    drop(co.into_stack());
}

/// Entry point on the fiber's stack.
fn fiber_main(addr: usize, y: &Yielder<In, Out>, first: In, body: Body) -> Ret {
    let fp = addr as *mut Fiber;
    // SAFETY: `fp` is live for as long as the fiber runs (owners keep the box
    // alive and never free a running fiber); only this stack writes it now.
    unsafe { (*fp).yielder = y as *const _ };
    // SAFETY: the resumer is attached to the interpreter (holds the GIL) and
    // has installed this fiber's thread state.
    let py = unsafe { Python::assume_attached() };
    // Objects are dropped as `Bound` here (an immediate decref): code on a
    // fiber may run without a pyo3 frame below it (resumed from a raw slot
    // such as am_send), where dropping a `Py` would defer the decref.
    match body {
        Body::Call { func, args, kwargs } => match first {
            In::Send(v) => {
                drop(v.into_bound(py));
                let f = func.into_bound(py);
                let args = match args {
                    Some(a) => a.into_bound(py),
                    None => PyTuple::empty(py),
                };
                let kwargs = kwargs.map(|k| k.into_bound(py));
                match f.call(args, kwargs.as_ref()) {
                    Ok(v) => Ret::Value(v.unbind()),
                    Err(e) => Ret::Error(e),
                }
            }
            In::Throw(e) => Ret::Error(e),
            In::Quit => Ret::Quit,
            In::Step(_) => Ret::Error(PyRuntimeError::new_err(
                "internal error: step sent to a call fiber",
            )),
        },
        Body::Runner => runner_loop(py, y, first),
    }
}

/// A runner executes coroutine steps until told to quit. Between steps it
/// holds no Python object and no Python frame (it is "idle").
fn runner_loop(py: Python<'_>, y: &Yielder<In, Out>, first: In) -> Ret {
    let mut msg = first;
    loop {
        let outcome = match msg {
            In::Step(step) => run_step(py, step),
            In::Quit => return Ret::Quit,
            In::Send(_) | In::Throw(_) => Outcome::Raised(PyRuntimeError::new_err(
                "internal error: idle runner fiber resumed without a step",
            )),
        };
        msg = y.suspend(Out::StepDone(outcome));
    }
}

fn run_step(py: Python<'_>, step: Step) -> Outcome {
    let coro = step.coro.into_bound(py);
    match step.action {
        StepAction::Send(v) => {
            let v = v.into_bound(py);
            // SAFETY: `coro` and `v` are live objects.
            unsafe { iter_send(py, coro.as_ptr(), v.as_ptr()) }
        }
        StepAction::Throw(e) => throw_method(py, &coro, e),
    }
}

/// `PyIter_Send(it, v)` as an [`Outcome`].
///
/// # Safety
/// GIL held, `it` and `v` valid objects.
#[inline]
pub(crate) unsafe fn iter_send(
    py: Python<'_>,
    it: *mut ffi::PyObject,
    v: *mut ffi::PyObject,
) -> Outcome {
    let mut res: *mut ffi::PyObject = std::ptr::null_mut();
    match ffi::PyIter_Send(it, v, &mut res) {
        ffi::PySendResult::PYGEN_RETURN => {
            Outcome::Returned(Bound::from_owned_ptr(py, res).unbind())
        }
        ffi::PySendResult::PYGEN_NEXT => Outcome::Yielded(Bound::from_owned_ptr(py, res).unbind()),
        ffi::PySendResult::PYGEN_ERROR => Outcome::Raised(PyErr::fetch(py)),
    }
}

/// `it.throw(exc)` as an [`Outcome`] (StopIteration means it returned).
pub(crate) fn throw_method(py: Python<'_>, it: &Bound<'_, PyAny>, e: PyErr) -> Outcome {
    match it.call_method1(pyo3::intern!(py, "throw"), (e.into_value(py),)) {
        Ok(v) => Outcome::Yielded(v.unbind()),
        Err(err) => stop_iteration_value(py, err),
    }
}

/// Maps a StopIteration to `Returned(value)`, anything else to `Raised`.
pub(crate) fn stop_iteration_value(py: Python<'_>, err: PyErr) -> Outcome {
    if err.is_instance_of::<PyStopIteration>(py) {
        let v = err
            .value(py)
            .getattr(pyo3::intern!(py, "value"))
            .map(Bound::unbind)
            .unwrap_or_else(|_| py.None());
        Outcome::Returned(v)
    } else {
        Outcome::Raised(err)
    }
}

/// Suspends the running fiber `fp`, handing `out` to its resumer.
///
/// # Safety
/// Must be called on `fp`'s own stack, i.e. `fp == current()`, with the GIL
/// held and no Python error set.
#[inline]
pub(crate) unsafe fn suspend(fp: *mut Fiber, out: Out) -> In {
    debug_assert!(fp == current());
    let x = 0u8;
    let sp = std::hint::black_box(&x) as *const u8 as usize;
    LAST_SUSPEND_DEPTH.store((*fp).stack_top.saturating_sub(sp) as u64, Ordering::Relaxed);
    let y = (*fp).yielder;
    (*y).suspend(out)
}

/// Why a fiber was leaked instead of unwound.
#[derive(Clone, Copy, Debug)]
pub(crate) enum LeakReason {
    WrongThread,
    Finalizing,
    Ignored,
}

static SHUTDOWN_REPORTED: AtomicBool = AtomicBool::new(false);
static LEAKED: AtomicU64 = AtomicU64::new(0);

pub(crate) fn leaked_count() -> u64 {
    LEAKED.load(Ordering::Relaxed)
}

/// Gives up on a fiber that cannot be unwound: its stack slot leaves the
/// pool for good and the references its state holds are never released.
/// Reported once per fiber (once per process at interpreter shutdown).
///
/// # Safety
/// GIL held; `fp` live and not running on this thread's stack chain.
pub(crate) unsafe fn leak(py: Python<'_>, fp: *mut Fiber, what: &str, reason: LeakReason) {
    if let Some(mut co) = (*fp).co.take() {
        if !co.done() {
            // SAFETY: see Fiber::drop.
            co.force_reset();
        }
        co.into_stack().leak();
    }
    (*fp).status = Status::Leaked;
    LEAKED.fetch_add(1, Ordering::Relaxed);
    let msg = match reason {
        LeakReason::WrongThread => format!(
            "tokioloop: {what} was dropped while suspended on another thread (or after its \
             thread exited); it cannot be unwound there, so it was leaked and its finally \
             blocks did not run"
        ),
        LeakReason::Ignored => format!(
            "tokioloop: {what} kept suspending after GeneratorExit was thrown into it; it was \
             leaked and its remaining finally blocks did not run"
        ),
        LeakReason::Finalizing => {
            if !SHUTDOWN_REPORTED.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "tokioloop: the interpreter is shutting down while fibers are suspended; \
                     they are not unwound (their finally blocks do not run). Reported once."
                );
            }
            return;
        }
    };
    PyRuntimeWarningReport::report(py, msg);
}

/// Writes a report through `sys.unraisablehook` (a RuntimeWarning object).
struct PyRuntimeWarningReport;

impl PyRuntimeWarningReport {
    fn report(py: Python<'_>, msg: String) {
        let saved = PyErr::take(py);
        pyo3::exceptions::PyRuntimeWarning::new_err(msg).write_unraisable(py, None);
        if let Some(e) = saved {
            e.restore(py);
        }
    }
}

/// True while the interpreter is finalizing (fibers are not unwound then).
pub(crate) fn finalizing() -> bool {
    // SAFETY: reads a runtime flag; valid at any time.
    unsafe { shim::tlf_is_finalizing() != 0 }
}

/// Unwinds a suspended call fiber (plain or run_anywhere) by throwing
/// GeneratorExit at its suspension point, repeatedly if the code there
/// suspends again (bounded), and leaks it when that is impossible. Returns
/// an exception other than GeneratorExit that the unwinding raised, for the
/// caller to report or raise, or the ValueError refusing to close a fiber
/// that is running (its own code asked).
///
/// # Safety
/// GIL held; `fp` live.
pub(crate) unsafe fn kill(py: Python<'_>, fp: *mut Fiber, what: &str) -> Option<PyErr> {
    match (*fp).status {
        Status::New => {
            (*fp).body = None;
            (*fp).status = Status::Done;
            return None;
        }
        Status::Done | Status::Leaked => return None,
        // Only its own code can ask for that (close() from inside the
        // fiber): refused, as a generator's close() from inside itself. The
        // coroutine is executing on this very stack, so neither unwinding
        // nor leaking it (a reset of a running corosensei coroutine) is
        // possible; its owner keeps it and it finishes normally.
        Status::Running => {
            return Some(PyValueError::new_err(format!("{what} already executing")));
        }
        Status::Suspended => {}
    }
    if !(*fp).on_owner_thread() || (*fp).owner_ts != ffi::PyThreadState_Get() {
        leak(py, fp, what, LeakReason::WrongThread);
        return None;
    }
    if finalizing() {
        leak(py, fp, what, LeakReason::Finalizing);
        return None;
    }
    for _ in 0..8 {
        let exc = PyGeneratorExit::new_err(());
        match resume(py, fp, In::Throw(exc)) {
            Ok(Resumed::Finished(Ret::Error(e))) => {
                return if e.is_instance_of::<PyGeneratorExit>(py) {
                    None
                } else {
                    Some(e)
                };
            }
            Ok(Resumed::Finished(_)) => return None,
            Ok(Resumed::Yield(_)) | Ok(Resumed::StepDone(_)) => continue,
            Err(e) => {
                leak(py, fp, what, LeakReason::Ignored);
                return Some(e);
            }
        }
    }
    leak(py, fp, what, LeakReason::Ignored);
    None
}

/// Idle runner fibers kept per thread for coroutine steps. Boxed: a fiber's
/// address is captured by its coroutine and must not move.
#[allow(clippy::vec_box)]
struct IdleRunners(Vec<Box<Fiber>>);

/// Runners kept idle per thread.
const IDLE_RUNNERS: usize = 4;

impl Drop for IdleRunners {
    /// Thread exit: the interpreter may be gone, so idle runners are made to
    /// return without any Python involvement (an idle runner's stack holds
    /// only the runner loop, and its state block no references).
    fn drop(&mut self) {
        for mut f in self.0.drain(..) {
            let fp: *mut Fiber = &mut *f;
            // SAFETY: `fp` is an idle runner suspended at the top of its
            // loop; resuming it with Quit makes runner_loop return without
            // touching Python; no interpreter state is involved.
            unsafe {
                if let Some(mut co) = (*fp).co.take() {
                    match catch_unwind(AssertUnwindSafe(|| co.resume(In::Quit))) {
                        Ok(CoroutineResult::Return(_)) => drop(co.into_stack()),
                        Ok(CoroutineResult::Yield(_)) | Err(_) => {
                            co.force_reset();
                            co.into_stack().leak();
                        }
                    }
                }
                (*fp).status = Status::Done;
            }
            // The state block holds no references when idle; its memory is
            // freed, nothing is decref'd.
            drop(f);
        }
    }
}

/// An idle runner for this thread (reused or new).
pub(crate) fn take_runner() -> Box<Fiber> {
    IDLE.with(|i| i.borrow_mut().0.pop())
        .unwrap_or_else(|| Fiber::new(Body::Runner, Kind::Await))
}

/// Gives a runner whose step finished back to this thread.
///
/// # Safety
/// GIL held; `f` is idle (its last resume returned StepDone) and owned by
/// this thread.
pub(crate) unsafe fn release_runner(py: Python<'_>, f: Box<Fiber>) {
    debug_assert!(f.state.is_idle());
    let extra = IDLE.with(|i| {
        let mut i = i.borrow_mut();
        if i.0.len() < IDLE_RUNNERS {
            i.0.push(f);
            None
        } else {
            Some(f)
        }
    });
    if let Some(mut f) = extra {
        let fp: *mut Fiber = &mut *f;
        let _ = resume(py, fp, In::Quit);
    }
}

/// Runs one coroutine step on runner `f`.
///
/// # Safety
/// GIL held; `f` idle or new, owned by the calling thread.
pub(crate) unsafe fn resume_runner_step(
    py: Python<'_>,
    f: &mut Fiber,
    step: Step,
) -> PyResult<Resumed> {
    let fp: *mut Fiber = f;
    if (*fp).status == Status::New {
        // The coroutine's first resume delivers the step to runner_loop.
        start(fp, ffi::PyThreadState_Get())?;
        (*fp).status = Status::Suspended;
    }
    resume(py, fp, In::Step(step))
}

/// For tests: statistics of fibers and stacks.
pub(crate) fn idle_runner_count() -> usize {
    IDLE.try_with(|i| i.borrow().0.len()).unwrap_or(0)
}

pub(crate) fn pool_stats() -> stack::PoolStats {
    stack::stats()
}
