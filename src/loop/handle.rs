//! Native `Handle` and `TimerHandle`: what call_soon/call_later return and
//! what the ready queue holds. They follow asyncio.Handle/TimerHandle: cancel,
//! cancelled, get_context, when, the private attributes libraries peek at,
//! reprs in asyncio's format, and asyncio's exception reporting when the
//! callback raises.
//!
//! They are the hottest objects of the loop (one per callback), so they are
//! written directly against the C API rather than as pyo3 classes: objects
//! come from a free list of their own and go back to it, without pyo3's
//! generic construction and destruction path. `HandleRef` is the typed,
//! reference-counted Rust handle on such an object.

use std::ffi::{c_int, c_void, CStr};
use std::mem::ManuallyDrop;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemError, PySystemExit, PyTypeError};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple, PyType};
use pyo3::PyTraverseError;

use super::cell::GilCell;
use super::core::LoopCore;
use super::pyobjs;

// ---------------------------------------------------------------------------
// GC visiting, from pyo3's __traverse__ (the loop's) or from our tp_traverse

pub(crate) enum Visitor<'a, 'b> {
    Pyo3(&'a PyVisit<'b>),
    Raw(ffi::visitproc, *mut c_void),
}

pub(crate) enum VisitErr {
    Pyo3(PyTraverseError),
    Raw(c_int),
}

impl Visitor<'_, '_> {
    fn call<T>(&self, obj: &Py<T>) -> Result<(), VisitErr> {
        match self {
            Visitor::Pyo3(v) => v.call(obj).map_err(VisitErr::Pyo3),
            Visitor::Raw(visit, arg) => {
                // SAFETY: a visitproc/arg pair CPython passed to our
                // tp_traverse, used during that call; `obj` is a live object.
                let rc = unsafe { visit(obj.as_ptr(), *arg) };
                if rc == 0 {
                    Ok(())
                } else {
                    Err(VisitErr::Raw(rc))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Callback data

/// The positional arguments of a callback. Most callbacks take none or one
/// (a task step, a future's done callback), so those are kept without a
/// tuple and called through vectorcall.
pub(crate) enum Args {
    Empty,
    One(ManuallyDrop<Py<PyAny>>),
    Many(ManuallyDrop<Py<PyTuple>>),
}

impl Args {
    /// From a slice of borrowed argument pointers.
    ///
    /// # Safety
    /// Every pointer must be a valid object reference for the duration of
    /// the call (new references are taken here).
    pub(crate) unsafe fn from_slice(py: Python<'_>, args: &[*mut ffi::PyObject]) -> PyResult<Args> {
        Ok(match args.len() {
            0 => Args::Empty,
            // SAFETY: see the contract: a valid, borrowed reference.
            1 => Args::One(ManuallyDrop::new(
                unsafe { Bound::from_borrowed_ptr(py, args[0]) }.unbind(),
            )),
            _ => {
                // SAFETY: as above, for each element.
                let items = args
                    .iter()
                    .map(|&a| unsafe { Bound::from_borrowed_ptr(py, a) });
                Args::Many(ManuallyDrop::new(PyTuple::new(py, items)?.unbind()))
            }
        })
    }

    pub(crate) fn from_tuple(t: &Bound<'_, PyTuple>) -> Args {
        match t.len() {
            0 => Args::Empty,
            1 => Args::One(ManuallyDrop::new(
                t.get_item(0).expect("index 0 of a 1-tuple").unbind(),
            )),
            _ => Args::Many(ManuallyDrop::new(t.clone().unbind())),
        }
    }

    fn visit(&self, visit: &Visitor<'_, '_>) -> Result<(), VisitErr> {
        match self {
            Args::Empty => Ok(()),
            Args::One(a) => visit.call(&**a),
            Args::Many(t) => visit.call(&**t),
        }
    }
}

pub(crate) struct Callback {
    func: ManuallyDrop<Py<PyAny>>,
    args: Args,
}

/// Release a reference on a thread that is attached to the interpreter,
/// without pyo3's check of that (a thread-local lookup per reference, which
/// is measurable on the callback hot path).
///
/// # Safety
/// The caller must be attached (hold the GIL). Handle data is only dropped
/// by the handle's tp_dealloc, by cancel()/tp_clear and by the loop's
/// garbage release, all of which run attached.
#[inline]
unsafe fn release_attached<T>(obj: &mut ManuallyDrop<Py<T>>) {
    // SAFETY: the reference is owned (taken exactly once, here) and the
    // caller guarantees the thread is attached.
    unsafe { ffi::Py_DECREF(ManuallyDrop::take(obj).into_ptr()) }
}

impl Drop for Callback {
    fn drop(&mut self) {
        // SAFETY: see release_attached: callbacks are dropped attached.
        // (`args` releases its own references after this.)
        unsafe { release_attached(&mut self.func) }
    }
}

impl Drop for Args {
    fn drop(&mut self) {
        // SAFETY: see release_attached: arguments are dropped attached, in
        // their callback or, when scheduling fails (a closed loop, a bad
        // callback), by the call_soon & co. that took them.
        unsafe {
            match self {
                Args::Empty => {}
                Args::One(a) => release_attached(a),
                Args::Many(t) => release_attached(t),
            }
        }
    }
}

/// What a handle holds.
pub(crate) struct Handle {
    /// None once cancelled (asyncio drops the callback and its arguments on
    /// cancel so that they can be collected at once).
    cb: GilCell<Option<Callback>>,
    context: ManuallyDrop<Py<PyAny>>,
    loop_: ManuallyDrop<Py<PyAny>>,
    cancelled: AtomicBool,
    source_traceback: Option<Py<PyAny>>,
    /// Repr frozen at cancel time in debug mode (asyncio keeps it for logs).
    repr: GilCell<Option<Py<PyAny>>>,
    /// True while the loop holds this handle in exactly one queue entry and
    /// has taken it off the garbage collector's lists (see `untrack`).
    untracked: AtomicBool,
    /// The int given to call_at(), which when()/_when return as asyncio's
    /// TimerHandle does (it keeps the object it was given). Only exact ints
    /// are kept: they hold no references, so they cannot form a cycle with
    /// this (possibly untracked) handle.
    when_given: Option<Py<PyAny>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: see release_attached: handles are dropped attached.
        unsafe {
            release_attached(&mut self.context);
            release_attached(&mut self.loop_);
        }
    }
}

impl Handle {
    pub(crate) fn new(
        func: Py<PyAny>,
        args: Args,
        context: Py<PyAny>,
        loop_: Py<PyAny>,
        source_traceback: Option<Py<PyAny>>,
    ) -> Self {
        Handle {
            cb: GilCell::new(Some(Callback {
                func: ManuallyDrop::new(func),
                args,
            })),
            context: ManuallyDrop::new(context),
            loop_: ManuallyDrop::new(loop_),
            cancelled: AtomicBool::new(false),
            source_traceback,
            repr: GilCell::new(None),
            untracked: AtomicBool::new(false),
            when_given: None,
        }
    }

    /// Keep `when` for when()/_when if it is an exact int (see `when_given`).
    pub(crate) fn keep_when(&mut self, when: &Bound<'_, PyAny>) {
        if when.is_exact_instance_of::<pyo3::types::PyInt>() {
            self.when_given = Some(when.clone().unbind());
        }
    }

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn visit_contents(&self, visit: &Visitor<'_, '_>) -> Result<(), VisitErr> {
        let r = self.cb.try_with(|c| -> Result<(), VisitErr> {
            if let Some(c) = c.as_ref() {
                visit.call(&*c.func)?;
                c.args.visit(visit)?;
            }
            Ok(())
        });
        if let Some(r) = r {
            r?;
        }
        visit.call(&*self.context)?;
        visit.call(&*self.loop_)?;
        if let Some(t) = &self.source_traceback {
            visit.call(t)?;
        }
        if let Some(r) = self.repr.try_with(|r| r.as_ref().map(|r| visit.call(r))) {
            r.transpose()?;
        }
        Ok(())
    }

    /// The callback and its arguments as a tuple (for reprs and getters).
    fn callback_parts<'py>(
        &self,
        py: Python<'py>,
    ) -> Option<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        let parts = self.cb.with(py, |c| {
            c.as_ref().map(|c| {
                let args: (Option<Bound<'py, PyAny>>, Option<Bound<'py, PyTuple>>) = match &c.args {
                    Args::Empty => (None, None),
                    Args::One(a) => (Some(a.bind(py).clone()), None),
                    Args::Many(t) => (None, Some(t.bind(py).clone())),
                };
                (c.func.bind(py).clone(), args)
            })
        })?;
        let (func, (one, many)) = parts;
        let tuple = match (one, many) {
            (Some(a), _) => PyTuple::new(py, [a]).expect("a 1-tuple"),
            (None, Some(t)) => t,
            (None, None) => PyTuple::empty(py),
        };
        Some((func, tuple))
    }
}

// ---------------------------------------------------------------------------
// The Python objects

#[repr(C)]
struct HandleObject {
    ob_base: ffi::PyObject,
    weakrefs: *mut ffi::PyObject,
    data: ManuallyDrop<Handle>,
}

#[repr(C)]
struct TimerObject {
    base: HandleObject,
    when: f64,
    /// True while the handle sits in the loop's timer heap.
    scheduled: AtomicBool,
}

struct Types {
    handle: Py<PyType>,
    timer: Py<PyType>,
}

static TYPES: OnceLock<Types> = OnceLock::new();

fn types() -> &'static Types {
    TYPES
        .get()
        .expect("tokioloop: handle types used before module init")
}

/// A strong reference to a Handle or TimerHandle object.
pub(crate) struct HandleRef(Py<PyAny>);

impl HandleRef {
    #[inline]
    fn obj(&self) -> *mut HandleObject {
        self.0.as_ptr().cast()
    }

    #[inline]
    pub(crate) fn get(&self) -> &Handle {
        // SAFETY: a HandleRef only ever holds Handle/TimerHandle objects
        // (checked where one is made from an arbitrary object), whose layout
        // starts with HandleObject; `data` is initialised for the object's
        // whole life (written before the first HandleRef exists, dropped in
        // tp_dealloc when no reference is left).
        unsafe { &(*self.obj()).data }
    }

    /// For TimerHandles: (when, scheduled flag).
    #[inline]
    pub(crate) fn timer(&self) -> Option<(f64, &AtomicBool)> {
        // SAFETY: the type check tells a TimerObject apart; see `get`.
        unsafe {
            let obj = self.0.as_ptr();
            if ffi::Py_TYPE(obj) == types().timer.as_ptr().cast() {
                let t = obj.cast::<TimerObject>();
                Some(((*t).when, &(*t).scheduled))
            } else {
                None
            }
        }
    }

    pub(crate) fn clone_ref(&self, py: Python<'_>) -> HandleRef {
        HandleRef(self.0.clone_ref(py))
    }

    pub(crate) fn bind<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.0.bind(py)
    }

    pub(crate) fn into_ptr(self) -> *mut ffi::PyObject {
        self.0.into_ptr()
    }

    pub(crate) fn as_py(&self) -> &Py<PyAny> {
        &self.0
    }

    /// A HandleRef for `obj` if it is a Handle (or TimerHandle).
    pub(crate) fn from_object(obj: &Bound<'_, PyAny>) -> PyResult<HandleRef> {
        let t = types();
        // SAFETY: plain type checks on a live object.
        let ok = unsafe { ffi::PyObject_TypeCheck(obj.as_ptr(), t.handle.as_ptr().cast()) != 0 };
        if ok {
            Ok(HandleRef(obj.clone().unbind()))
        } else {
            Err(PyTypeError::new_err("a tokioloop Handle was expected"))
        }
    }

    /// Release this reference (the caller is attached) without pyo3's
    /// thread-local check.
    #[inline]
    pub(crate) fn release(self, py: Python<'_>) {
        drop(self.0.into_bound(py));
    }

    // ---- GC bookkeeping of queued handles ----

    /// The loop is about to hold this (new) handle in exactly one queue
    /// entry: take it off the GC's lists, so that a queue of many pending
    /// callbacks does not make every young-generation collection scan them.
    /// While untracked, the loop's own tp_traverse visits what the handle
    /// references (`visit_queued`), so cycles through the loop are still
    /// found.
    pub(crate) fn untrack(&self) {
        // SAFETY: a live GC object; untracking is always allowed (a no-op
        // for an untracked one).
        unsafe { ffi::PyObject_GC_UnTrack(self.0.as_ptr().cast()) };
        self.get().untracked.store(true, Ordering::Relaxed);
    }

    /// The queue entry is gone: give the handle back to the GC. When ours
    /// is the last reference the handle is about to be freed, so tracking it
    /// would be wasted work.
    #[inline]
    pub(crate) fn retrack(&self) {
        if self.get().untracked.swap(false, Ordering::Relaxed) {
            // SAFETY: the IsTracked check makes Track legal (it must not be
            // called on an object that is already tracked).
            unsafe {
                let p = self.0.as_ptr();
                if ffi::Py_REFCNT(p) > 1 && ffi::PyObject_GC_IsTracked(p) == 0 {
                    ffi::PyObject_GC_Track(p.cast());
                }
            }
        }
    }

    /// A handle the loop does not queue once (reader, signal handler):
    /// make sure the GC tracks it (free-list objects start untracked).
    pub(crate) fn ensure_tracked(&self) {
        // SAFETY: as in retrack.
        unsafe {
            let p = self.0.as_ptr();
            if ffi::PyObject_GC_IsTracked(p) == 0 {
                ffi::PyObject_GC_Track(p.cast());
            }
        }
    }

    /// The loop's tp_traverse for one queue entry: the handle itself if the
    /// GC tracks it, else (exactly once, as there is one entry) its contents.
    pub(crate) fn visit_queued(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        let h = self.get();
        if h.untracked.load(Ordering::Relaxed) {
            match h.visit_contents(&Visitor::Pyo3(visit)) {
                Ok(()) => Ok(()),
                Err(VisitErr::Pyo3(e)) => Err(e),
                Err(VisitErr::Raw(_)) => unreachable!("a pyo3 visitor reports pyo3 errors"),
            }
        } else {
            visit.call(&self.0)
        }
    }

    // ---- behaviour ----

    pub(crate) fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        let h = self.get();
        if let Some((_, scheduled)) = self.timer() {
            if !h.is_cancelled() && scheduled.load(Ordering::Acquire) {
                if let Ok(core) = h.loop_.bind(py).cast::<LoopCore>() {
                    core.get().timer_cancelled();
                }
            }
        }
        if h.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if loop_debug(h.loop_.bind(py)) {
            let r = pyobjs::handle_repr(py)?.call1((self.bind(py),))?.unbind();
            let old = h.repr.with(py, |slot| slot.replace(r));
            drop(old);
        }
        // Take the callback out; drop it (which may run arbitrary
        // finalizers) after the cell is released.
        let old = h.cb.with(py, |c| c.take());
        drop(old);
        Ok(())
    }

    /// Run the callback in its context. Exceptions other than SystemExit and
    /// KeyboardInterrupt go to the loop's exception handler, as asyncio does;
    /// those two (and anything the exception handler raises) propagate.
    #[inline]
    pub(crate) fn run(&self, py: Python<'_>) -> PyResult<()> {
        let h = self.get();
        // New references: the callback may cancel its own handle, which
        // drops the handle's references while the call is still running.
        let parts = h.cb.with(py, |c| {
            c.as_ref().map(|c| {
                let func = c.func.bind(py).clone();
                let (n, arg) = match &c.args {
                    Args::Empty => (0, None),
                    Args::One(a) => (1, Some(a.bind(py).clone())),
                    Args::Many(t) => (2, Some(t.bind(py).clone().into_any())),
                };
                (func, n, arg)
            })
        });
        let Some((func, nargs, arg)) = parts else {
            return Ok(());
        };
        let ctx = h.context.as_ptr();
        // SAFETY: ctx is a live contextvars.Context (checked when the handle
        // was created) that we hold a reference to; PyContext_Enter/Exit and
        // the calls run with the GIL held (we have `py`); `func`/`arg` are
        // owned references kept alive across the call; a NULL result always
        // comes with a Python exception set, which PyErr::fetch takes.
        let err = unsafe {
            if ffi::PyContext_Enter(ctx) < 0 {
                Some(PyErr::fetch(py))
            } else {
                let res = match (nargs, &arg) {
                    (1, Some(a)) => {
                        let argv = [a.as_ptr()];
                        super::exit_safe::vectorcall(func.as_ptr(), argv.as_ptr(), 1)
                    }
                    (2, Some(t)) => super::exit_safe::call(func.as_ptr(), t.as_ptr()),
                    _ => super::exit_safe::vectorcall(func.as_ptr(), ptr::null(), 0),
                };
                let err = if res.is_null() {
                    Some(PyErr::fetch(py))
                } else {
                    ffi::Py_DECREF(res);
                    None
                };
                if ffi::PyContext_Exit(ctx) < 0 {
                    let exit_err = PyErr::fetch(py);
                    Some(err.unwrap_or(exit_err))
                } else {
                    err
                }
            }
        };
        drop(func);
        drop(arg);
        match err {
            None => Ok(()),
            Some(e) => self.report(py, e),
        }
    }

    fn report(&self, py: Python<'_>, err: PyErr) -> PyResult<()> {
        if err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py) {
            return Err(err);
        }
        let h = self.get();
        let desc = match h.callback_parts(py) {
            Some((f, a)) => pyobjs::format_callback(py)?
                .call1((f, a, loop_debug(h.loop_.bind(py))))?
                .str()?
                .to_string(),
            None => "None".to_string(),
        };
        let ctx = PyDict::new(py);
        ctx.set_item("message", format!("Exception in callback {desc}"))?;
        ctx.set_item("exception", err.value(py))?;
        ctx.set_item("handle", self.bind(py))?;
        if let Some(tb) = &h.source_traceback {
            if tb.bind(py).is_truthy()? {
                ctx.set_item("source_traceback", tb)?;
            }
        }
        h.loop_
            .bind(py)
            .call_method1(pyo3::intern!(py, "call_exception_handler"), (ctx,))?;
        Ok(())
    }
}

/// Run `f` with `ctx` (a contextvars.Context) entered, as Context.run()
/// does; for protocol callbacks that the loop makes, which asyncio runs in
/// the context their transport was created in.
pub(crate) fn run_in_context<R>(
    py: Python<'_>,
    ctx: &Py<PyAny>,
    f: impl FnOnce() -> PyResult<R>,
) -> PyResult<R> {
    // SAFETY: `ctx` is a live contextvars.Context we hold a reference to;
    // Enter/Exit are paired and called with the GIL held.
    if unsafe { ffi::PyContext_Enter(ctx.as_ptr()) } < 0 {
        return Err(PyErr::fetch(py));
    }
    let r = f();
    // SAFETY: as above.
    if unsafe { ffi::PyContext_Exit(ctx.as_ptr()) } < 0 {
        let e = PyErr::fetch(py);
        return r.and(Err(e));
    }
    r
}

/// A copy of the current context (contextvars.copy_context()).
pub(crate) fn copy_context(py: Python<'_>) -> PyResult<Py<PyAny>> {
    // SAFETY: a new reference, or NULL with an exception set.
    unsafe { Ok(Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent())?.unbind()) }
}

pub(crate) fn loop_debug(lp: &Bound<'_, PyAny>) -> bool {
    match lp.cast::<LoopCore>() {
        Ok(core) => core.get().debug(),
        Err(_) => lp
            .call_method0("get_debug")
            .and_then(|v| v.is_truthy())
            .unwrap_or(false),
    }
}

// ---------------------------------------------------------------------------
// Allocation: a free list per type

/// Dead objects kept for reuse: their memory and GC header, untracked,
/// with `data` dropped.
struct FreeList(Vec<NonNull<HandleObject>>);
// SAFETY: the pointers are only used by the thread that holds the
// FreeList's GilCell (the GIL, or the mutex on free-threaded builds).
unsafe impl Send for FreeList {}

/// Free-threaded builds manage object headers differently: no reuse there.
#[cfg(not(Py_GIL_DISABLED))]
const FREE_LIST_MAX: usize = 4096;
#[cfg(Py_GIL_DISABLED)]
const FREE_LIST_MAX: usize = 0;
static FREE_HANDLES: GilCell<FreeList> = GilCell::new(FreeList(Vec::new()));
static FREE_TIMERS: GilCell<FreeList> = GilCell::new(FreeList(Vec::new()));

fn free_list(timer: bool) -> &'static GilCell<FreeList> {
    if timer {
        &FREE_TIMERS
    } else {
        &FREE_HANDLES
    }
}

/// Create a Handle (or, with `when`, a TimerHandle) holding `data`.
/// Objects reused from the free list are not tracked by the GC; fresh ones
/// are (PyType_GenericAlloc tracks): callers decide with untrack() or
/// ensure_tracked().
pub(crate) fn new_handle(py: Python<'_>, data: Handle, when: Option<f64>) -> PyResult<HandleRef> {
    let t = types();
    let (ty, timer) = match when {
        Some(_) => (t.timer.as_ptr().cast::<ffi::PyTypeObject>(), true),
        None => (t.handle.as_ptr().cast::<ffi::PyTypeObject>(), false),
    };
    let reused = free_list(timer).with(py, |l| l.0.pop());
    // SAFETY: `ty` is one of our two live heap types. A reused block has
    // exactly that type's size and an untracked GC header; PyObject_Init
    // sets its type (taking a reference to it) and refcount. A fresh block
    // from PyType_GenericAlloc is zeroed with type and refcount set.
    let obj = unsafe {
        match reused {
            Some(p) => {
                let o = p.as_ptr().cast::<ffi::PyObject>();
                ffi::PyObject_Init(o, ty);
                o
            }
            None => {
                let o = ffi::PyType_GenericAlloc(ty, 0);
                if o.is_null() {
                    return Err(PyErr::fetch(py));
                }
                o
            }
        }
    };
    // SAFETY: `obj` is a new object of our type: write its fields (the block
    // is ours alone; `data` is written once and dropped in tp_dealloc).
    unsafe {
        let h = obj.cast::<HandleObject>();
        ptr::write(ptr::addr_of_mut!((*h).weakrefs), ptr::null_mut());
        ptr::write(ptr::addr_of_mut!((*h).data), ManuallyDrop::new(data));
        if let Some(w) = when {
            let t = obj.cast::<TimerObject>();
            ptr::write(ptr::addr_of_mut!((*t).when), w);
            ptr::write(ptr::addr_of_mut!((*t).scheduled), AtomicBool::new(true));
        }
        Ok(HandleRef(Bound::from_owned_ptr(py, obj).unbind()))
    }
}

unsafe extern "C" fn handle_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: tp_dealloc runs attached, on an object of our types whose
    // refcount reached zero; each step below is the standard dealloc
    // sequence for a GC heap type (untrack, clear weakrefs, drop fields,
    // free or keep the memory, release the type reference).
    unsafe {
        let py = Python::assume_attached();
        ffi::PyObject_GC_UnTrack(obj.cast());
        let h = obj.cast::<HandleObject>();
        if !(*h).weakrefs.is_null() {
            ffi::PyObject_ClearWeakRefs(obj);
        }
        ManuallyDrop::drop(&mut (*h).data);
        let ty = ffi::Py_TYPE(obj);
        let t = types();
        let timer = ty == t.timer.as_ptr().cast();
        let exact = timer || ty == t.handle.as_ptr().cast();
        let kept = exact
            && free_list(timer).with(py, |l| {
                if l.0.len() < FREE_LIST_MAX {
                    l.0.push(NonNull::new_unchecked(h));
                    true
                } else {
                    false
                }
            });
        if !kept {
            ffi::PyObject_GC_Del(obj.cast());
        }
        ffi::Py_DECREF(ty.cast());
    }
}

unsafe extern "C" fn handle_traverse(
    obj: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: called by the GC (attached) on a live object of our types; the
    // heap type reference is visited as CPython requires for heap types.
    unsafe {
        let r = ffi::Py_TYPE(obj).cast::<ffi::PyObject>();
        let rc = visit(r, arg);
        if rc != 0 {
            return rc;
        }
        let h = &(*obj.cast::<HandleObject>()).data;
        match h.visit_contents(&Visitor::Raw(visit, arg)) {
            Ok(()) => 0,
            Err(VisitErr::Raw(rc)) => rc,
            Err(VisitErr::Pyo3(_)) => unreachable!("a raw visitor reports raw errors"),
        }
    }
}

unsafe extern "C" fn handle_clear(obj: *mut ffi::PyObject) -> c_int {
    // SAFETY: called by the GC (attached) on a live object of our types.
    unsafe {
        let h = &(*obj.cast::<HandleObject>()).data;
        // Only the callback and the cached repr can form a cycle back to
        // this handle that the GC must break (context and loop are cleared
        // by their own tp_clear).
        let old = h.cb.try_with(|c| c.take());
        drop(old);
        let old = h.repr.try_with(|r| r.take());
        drop(old);
    }
    0
}

// ---------------------------------------------------------------------------
// Methods and attributes

/// Body of a C slot or method: attached, errors raised, panics contained.
fn guard(f: impl FnOnce(Python<'_>) -> PyResult<*mut ffi::PyObject>) -> *mut ffi::PyObject {
    super::fastcall::in_c_slot(|py| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(py))) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                e.restore(py);
                ptr::null_mut()
            }
            Err(_) => {
                PySystemError::new_err("tokioloop: internal error (panic) in a Handle method")
                    .restore(py);
                ptr::null_mut()
            }
        }
    })
}

/// # Safety
/// `obj` must be a Handle object passed by CPython (borrowed).
unsafe fn href(py: Python<'_>, obj: *mut ffi::PyObject) -> HandleRef {
    // SAFETY: method descriptors and slots of our types are only called
    // with instances of them; a new reference is taken for the HandleRef.
    HandleRef(unsafe { Bound::from_borrowed_ptr(py, obj) }.unbind())
}

fn obj_or_none(py: Python<'_>, o: Option<Bound<'_, PyAny>>) -> *mut ffi::PyObject {
    match o {
        Some(o) => o.into_ptr(),
        None => py.None().into_ptr(),
    }
}

unsafe extern "C" fn m_cancel(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        h.cancel(py)?;
        Ok(py.None().into_ptr())
    })
}

unsafe extern "C" fn m_cancelled(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        Ok(pyo3::types::PyBool::new(py, h.get().is_cancelled())
            .to_owned()
            .into_any()
            .into_ptr())
    })
}

unsafe extern "C" fn m_get_context(
    slf: *mut ffi::PyObject,
    _: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        Ok(h.get().context.clone_ref(py).into_ptr())
    })
}

unsafe extern "C" fn m_run(slf: *mut ffi::PyObject, _: *mut ffi::PyObject) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        if !h.get().is_cancelled() {
            h.run(py)?;
        }
        Ok(py.None().into_ptr())
    })
}

unsafe extern "C" fn m_when(slf: *mut ffi::PyObject, _: *mut ffi::PyObject) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        Ok(when_of(py, &h))
    })
}

/// A timer's when()/_when: the int call_at() was given, else the float.
fn when_of(py: Python<'_>, h: &HandleRef) -> *mut ffi::PyObject {
    if let Some(w) = &h.get().when_given {
        return w.clone_ref(py).into_ptr();
    }
    let when = h.timer().map(|t| t.0).unwrap_or(f64::NAN);
    pyo3::types::PyFloat::new(py, when).into_ptr()
}

macro_rules! getter {
    ($name:ident, |$py:ident, $h:ident| $body:expr) => {
        unsafe extern "C" fn $name(slf: *mut ffi::PyObject, _: *mut c_void) -> *mut ffi::PyObject {
            guard(|$py| {
                // SAFETY: see href.
                let $h = unsafe { href($py, slf) };
                $body
            })
        }
    };
}

getter!(g_callback, |py, h| Ok(obj_or_none(
    py,
    h.get().callback_parts(py).map(|(f, _)| f)
)));
getter!(g_args, |py, h| Ok(obj_or_none(
    py,
    h.get().callback_parts(py).map(|(_, a)| a.into_any())
)));
getter!(g_cancelled, |py, h| Ok(pyo3::types::PyBool::new(
    py,
    h.get().is_cancelled()
)
.to_owned()
.into_any()
.into_ptr()));
getter!(g_loop, |py, h| Ok(h.get().loop_.clone_ref(py).into_ptr()));
getter!(g_context, |py, h| Ok(h
    .get()
    .context
    .clone_ref(py)
    .into_ptr()));
getter!(g_source_traceback, |py, h| Ok(obj_or_none(
    py,
    h.get()
        .source_traceback
        .as_ref()
        .map(|t| t.bind(py).clone())
)));
getter!(g_repr, |py, h| Ok(obj_or_none(
    py,
    h.get()
        .repr
        .with(py, |r| r.as_ref().map(|r| r.bind(py).clone()))
)));
getter!(g_when, |py, h| Ok(when_of(py, &h)));
getter!(g_scheduled, |py, h| Ok(pyo3::types::PyBool::new(
    py,
    h.timer().is_some_and(|t| t.1.load(Ordering::Relaxed))
)
.to_owned()
.into_any()
.into_ptr()));

unsafe extern "C" fn handle_repr(slf: *mut ffi::PyObject) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        if let Some(r) = h
            .get()
            .repr
            .with(py, |r| r.as_ref().map(|r| r.clone_ref(py)))
        {
            return Ok(r.into_ptr());
        }
        Ok(pyobjs::handle_repr(py)?.call1((h.bind(py),))?.into_ptr())
    })
}

unsafe extern "C" fn timer_hash(slf: *mut ffi::PyObject) -> ffi::Py_hash_t {
    // hash(self._when), as asyncio.
    let r = guard(|py| {
        // SAFETY: see href.
        let h = unsafe { href(py, slf) };
        let when = h.timer().map(|t| t.0).unwrap_or(0.0);
        let hv = pyo3::types::PyFloat::new(py, when).hash()?;
        Ok(pyo3::types::PyInt::new(py, hv).into_any().into_ptr())
    });
    if r.is_null() {
        return -1;
    }
    // SAFETY: `r` is a new reference to an int we just made.
    unsafe {
        let v = ffi::PyLong_AsSsize_t(r);
        ffi::Py_DECREF(r);
        v as ffi::Py_hash_t
    }
}

unsafe extern "C" fn timer_richcompare(
    slf: *mut ffi::PyObject,
    other: *mut ffi::PyObject,
    op: c_int,
) -> *mut ffi::PyObject {
    guard(|py| {
        // SAFETY: see href; `other` is a borrowed reference to any object.
        let a = unsafe { href(py, slf) };
        let other = unsafe { Bound::from_borrowed_ptr(py, other) };
        let Ok(b) = HandleRef::from_object(&other) else {
            return Ok(py.NotImplemented().into_ptr());
        };
        let (Some((w1, _)), Some((w2, _))) = (a.timer(), b.timer()) else {
            return Ok(py.NotImplemented().into_ptr());
        };
        let same = || -> PyResult<bool> {
            let (ha, hb) = (a.get(), b.get());
            Ok(w1 == w2
                && ha.is_cancelled() == hb.is_cancelled()
                && match (ha.callback_parts(py), hb.callback_parts(py)) {
                    (Some((f1, a1)), Some((f2, a2))) => f1.eq(f2)? && a1.eq(a2)?,
                    (None, None) => true,
                    _ => false,
                })
        };
        let res = match op {
            ffi::Py_LT => w1 < w2,
            ffi::Py_GT => w1 > w2,
            ffi::Py_LE => w1 < w2 || same()?,
            ffi::Py_GE => w1 > w2 || same()?,
            ffi::Py_EQ => same()?,
            ffi::Py_NE => !same()?,
            _ => return Ok(py.NotImplemented().into_ptr()),
        };
        Ok(pyo3::types::PyBool::new(py, res)
            .to_owned()
            .into_any()
            .into_ptr())
    })
}

// ---------------------------------------------------------------------------
// Type objects

struct Tables {
    handle_methods: [ffi::PyMethodDef; 5],
    timer_methods: [ffi::PyMethodDef; 2],
    handle_getset: [ffi::PyGetSetDef; 8],
    timer_getset: [ffi::PyGetSetDef; 3],
    members: [ffi::PyMemberDef; 2],
}
// SAFETY: immutable after construction and only read by CPython; every
// pointer in it refers to 'static strings and functions.
unsafe impl Send for Tables {}
// SAFETY: as above.
unsafe impl Sync for Tables {}

fn cs(s: &'static CStr) -> *const std::ffi::c_char {
    s.as_ptr()
}

fn method(name: &'static CStr, f: ffi::PyCFunction, doc: &'static CStr) -> ffi::PyMethodDef {
    ffi::PyMethodDef {
        ml_name: cs(name),
        ml_meth: ffi::PyMethodDefPointer { PyCFunction: f },
        ml_flags: ffi::METH_NOARGS,
        ml_doc: cs(doc),
    }
}

fn getset(name: &'static CStr, get: ffi::getter) -> ffi::PyGetSetDef {
    ffi::PyGetSetDef {
        name: cs(name),
        get: Some(get),
        set: None,
        doc: ptr::null(),
        closure: ptr::null_mut(),
    }
}

const METHOD_END: ffi::PyMethodDef = ffi::PyMethodDef::zeroed();

fn getset_end() -> ffi::PyGetSetDef {
    ffi::PyGetSetDef {
        name: ptr::null(),
        get: None,
        set: None,
        doc: ptr::null(),
        closure: ptr::null_mut(),
    }
}

static TABLES: OnceLock<Tables> = OnceLock::new();

fn tables() -> &'static Tables {
    TABLES.get_or_init(|| Tables {
        handle_methods: [
            method(
                c"cancel",
                m_cancel,
                c"Cancel the callback (a no-op if it already ran or was cancelled).",
            ),
            method(
                c"cancelled",
                m_cancelled,
                c"Whether the callback was cancelled.",
            ),
            method(
                c"get_context",
                m_get_context,
                c"The contextvars.Context the callback runs in.",
            ),
            method(
                c"_run",
                m_run,
                c"Run the callback now, reporting its exception.",
            ),
            METHOD_END,
        ],
        timer_methods: [
            method(
                c"when",
                m_when,
                c"The loop time at which the callback is scheduled.",
            ),
            METHOD_END,
        ],
        handle_getset: [
            getset(c"_callback", g_callback),
            getset(c"_args", g_args),
            getset(c"_cancelled", g_cancelled),
            getset(c"_loop", g_loop),
            getset(c"_context", g_context),
            getset(c"_source_traceback", g_source_traceback),
            getset(c"_repr", g_repr),
            getset_end(),
        ],
        timer_getset: [
            getset(c"_when", g_when),
            getset(c"_scheduled", g_scheduled),
            getset_end(),
        ],
        members: [
            ffi::PyMemberDef {
                name: cs(c"__weaklistoffset__"),
                type_code: ffi::Py_T_PYSSIZET,
                offset: std::mem::offset_of!(HandleObject, weakrefs) as ffi::Py_ssize_t,
                flags: ffi::Py_READONLY,
                doc: ptr::null(),
            },
            ffi::PyMemberDef {
                name: ptr::null(),
                type_code: 0,
                offset: 0,
                flags: 0,
                doc: ptr::null(),
            },
        ],
    })
}

fn slot(slot: c_int, pfunc: *mut c_void) -> ffi::PyType_Slot {
    ffi::PyType_Slot { slot, pfunc }
}

/// Create the Handle and TimerHandle types and add them to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let t = tables();
    let mut handle_slots = [
        slot(ffi::Py_tp_dealloc, handle_dealloc as *mut c_void),
        slot(ffi::Py_tp_traverse, handle_traverse as *mut c_void),
        slot(ffi::Py_tp_clear, handle_clear as *mut c_void),
        slot(ffi::Py_tp_repr, handle_repr as *mut c_void),
        slot(ffi::Py_tp_methods, t.handle_methods.as_ptr() as *mut c_void),
        slot(ffi::Py_tp_getset, t.handle_getset.as_ptr() as *mut c_void),
        slot(ffi::Py_tp_members, t.members.as_ptr() as *mut c_void),
        slot(
            ffi::Py_tp_doc,
            cs(c"What call_soon() returns: a callback scheduled on a tokioloop loop.")
                as *mut c_void,
        ),
        slot(0, ptr::null_mut()),
    ];
    let mut spec = ffi::PyType_Spec {
        name: cs(c"tokioloop._tokioloop.Handle"),
        basicsize: std::mem::size_of::<HandleObject>() as c_int,
        itemsize: 0,
        flags: (ffi::Py_TPFLAGS_DEFAULT
            | ffi::Py_TPFLAGS_HAVE_GC
            | ffi::Py_TPFLAGS_BASETYPE
            | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION) as _,
        slots: handle_slots.as_mut_ptr(),
    };
    // SAFETY: the spec and its tables are valid for the call (the tables
    // are 'static, as CPython keeps pointers to method/getset/member defs);
    // a new reference or NULL with an exception comes back.
    let handle = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpec(&mut spec))? };
    let mut timer_slots = [
        slot(ffi::Py_tp_base, handle.as_ptr().cast()),
        slot(ffi::Py_tp_dealloc, handle_dealloc as *mut c_void),
        slot(ffi::Py_tp_traverse, handle_traverse as *mut c_void),
        slot(ffi::Py_tp_clear, handle_clear as *mut c_void),
        slot(ffi::Py_tp_methods, t.timer_methods.as_ptr() as *mut c_void),
        slot(ffi::Py_tp_getset, t.timer_getset.as_ptr() as *mut c_void),
        slot(ffi::Py_tp_hash, timer_hash as *mut c_void),
        slot(ffi::Py_tp_richcompare, timer_richcompare as *mut c_void),
        slot(
            ffi::Py_tp_doc,
            cs(c"What call_later()/call_at() return: a scheduled callback.") as *mut c_void,
        ),
        slot(0, ptr::null_mut()),
    ];
    let mut tspec = ffi::PyType_Spec {
        name: cs(c"tokioloop._tokioloop.TimerHandle"),
        basicsize: std::mem::size_of::<TimerObject>() as c_int,
        itemsize: 0,
        flags: (ffi::Py_TPFLAGS_DEFAULT
            | ffi::Py_TPFLAGS_HAVE_GC
            | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION) as _,
        slots: timer_slots.as_mut_ptr(),
    };
    // SAFETY: as above.
    let timer = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyType_FromSpec(&mut tspec))? };
    let handle = handle.cast_into::<PyType>()?;
    let timer = timer.cast_into::<PyType>()?;
    m.add("Handle", &handle)?;
    m.add("TimerHandle", &timer)?;
    let _ = TYPES.set(Types {
        handle: handle.unbind(),
        timer: timer.unbind(),
    });
    Ok(())
}
