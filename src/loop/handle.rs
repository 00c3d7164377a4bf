//! Native `Handle` and `TimerHandle`: what call_soon/call_later return and
//! what the ready queue holds. They follow asyncio.Handle/TimerHandle: cancel,
//! cancelled, get_context, when, the private attributes libraries peek at,
//! reprs in asyncio's format, and asyncio's exception reporting when the
//! callback raises.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::pyclass::CompareOp;
use pyo3::types::{PyDict, PyTuple};
use pyo3::PyTraverseError;

use super::cell::GilCell;
use super::core::LoopCore;
use super::pyobjs;

pub(crate) struct Callback {
    pub(crate) func: ManuallyDrop<Py<PyAny>>,
    pub(crate) args: ManuallyDrop<Py<PyTuple>>,
}

/// Release a reference on a thread that is attached to the interpreter,
/// without pyo3's check of that (a thread-local lookup per reference, which
/// is measurable on the callback hot path).
///
/// # Safety
/// The caller must be attached (hold the GIL). Handles and callbacks are
/// only dropped by tp_dealloc of their Python object, by cancel()/tp_clear
/// and by the loop's garbage release, all of which run attached.
#[inline]
unsafe fn release_attached<T>(obj: &mut ManuallyDrop<Py<T>>) {
    // SAFETY: the reference is owned (taken exactly once, here) and the
    // caller guarantees the thread is attached.
    unsafe { ffi::Py_DECREF(ManuallyDrop::take(obj).into_ptr()) }
}

impl Drop for Callback {
    fn drop(&mut self) {
        // SAFETY: see release_attached: callbacks are dropped attached.
        unsafe {
            release_attached(&mut self.func);
            release_attached(&mut self.args);
        }
    }
}

#[pyclass(
    frozen,
    subclass,
    weakref,
    freelist = 1024,
    module = "tokioloop._tokioloop",
    name = "Handle"
)]
pub struct Handle {
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
}

impl Handle {
    pub(crate) fn new(
        func: Py<PyAny>,
        args: Py<PyTuple>,
        context: Py<PyAny>,
        loop_: Py<PyAny>,
        source_traceback: Option<Py<PyAny>>,
    ) -> Self {
        Handle {
            cb: GilCell::new(Some(Callback {
                func: ManuallyDrop::new(func),
                args: ManuallyDrop::new(args),
            })),
            context: ManuallyDrop::new(context),
            loop_: ManuallyDrop::new(loop_),
            cancelled: AtomicBool::new(false),
            source_traceback,
            repr: GilCell::new(None),
            untracked: AtomicBool::new(false),
        }
    }

    /// The loop is about to hold this (new) handle in exactly one queue
    /// entry: take it off the GC's lists, so that a queue of many pending
    /// callbacks does not make every young-generation collection scan them.
    /// While untracked, the loop's own tp_traverse visits what the handle
    /// references (`visit_queued`), so cycles through the loop are still
    /// found.
    pub(crate) fn untrack(slf: &Bound<'_, Handle>) {
        // SAFETY: `slf` is a live GC-enabled object (pyclasses with
        // __traverse__ are) and we hold the GIL; untracking a tracked object
        // is always allowed.
        unsafe { ffi::PyObject_GC_UnTrack(slf.as_ptr().cast()) };
        slf.get().untracked.store(true, Ordering::Relaxed);
    }

    /// A handle that the loop does not queue (reader, signal handler):
    /// make sure the GC tracks it (objects reused from the free list start
    /// untracked).
    pub(crate) fn ensure_tracked(slf: &Bound<'_, Handle>) {
        // SAFETY: live GC object, GIL held; Track only if not tracked yet.
        unsafe {
            let p = slf.as_ptr();
            if ffi::PyObject_GC_IsTracked(p) == 0 {
                ffi::PyObject_GC_Track(p.cast());
            }
        }
    }

    /// The queue entry is gone: give the handle back to the GC. When ours
    /// is the last reference the handle is about to be freed, so tracking it
    /// would be wasted work.
    #[inline]
    pub(crate) fn retrack(slf: &Bound<'_, Handle>) {
        if slf.get().untracked.swap(false, Ordering::Relaxed) {
            // SAFETY: as above; the IsTracked check makes Track legal (it
            // must not be called on an object that is already tracked).
            unsafe {
                let p = slf.as_ptr();
                if ffi::Py_REFCNT(p) > 1 && ffi::PyObject_GC_IsTracked(p) == 0 {
                    ffi::PyObject_GC_Track(p.cast());
                }
            }
        }
    }

    /// The loop's tp_traverse for one queue entry: the handle itself if the
    /// GC tracks it, else (exactly once, as there is one entry) its contents.
    pub(crate) fn visit_queued(h: &Py<Handle>, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        let this = h.get();
        if this.untracked.load(Ordering::Relaxed) {
            this.visit_contents(visit)
        } else {
            visit.call(h)
        }
    }

    fn visit_contents(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        let r = self.cb.try_with(|c| -> Result<(), PyTraverseError> {
            if let Some(c) = c.as_ref() {
                visit.call(&*c.func)?;
                visit.call(&*c.args)?;
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

    #[inline]
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn callback_parts<'py>(
        &self,
        py: Python<'py>,
    ) -> Option<(Bound<'py, PyAny>, Bound<'py, PyTuple>)> {
        self.cb.with(py, |c| {
            c.as_ref()
                .map(|c| (c.func.bind(py).clone(), c.args.bind(py).clone()))
        })
    }

    fn do_cancel(slf: &Bound<'_, Handle>) -> PyResult<()> {
        let h = slf.get();
        if h.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let py = slf.py();
        let debug = loop_debug(h.loop_.bind(py));
        if debug {
            let r = pyobjs::handle_repr(py)?.call1((slf,))?.unbind();
            let old = h.repr.with(py, |slot| slot.replace(r));
            drop(old);
        }
        // Take the callback out, drop it (which may run arbitrary
        // finalizers) after the cell is released.
        let old = h.cb.with(py, |c| c.take());
        drop(old);
        Ok(())
    }

    /// cancel() from native code.
    pub(crate) fn cancel_quiet(slf: &Bound<'_, Handle>) -> PyResult<()> {
        Handle::do_cancel(slf)
    }

    /// Run the callback in its context. Exceptions other than SystemExit and
    /// KeyboardInterrupt go to the loop's exception handler, as asyncio does;
    /// those two (and anything the exception handler raises) propagate.
    #[inline]
    pub(crate) fn run(slf: &Bound<'_, Handle>) -> PyResult<()> {
        let py = slf.py();
        let h = slf.get();
        // Bound clones: the callback may cancel its own handle, which drops
        // the handle's references while the call is still running.
        let Some((func, args)) = h.callback_parts(py) else {
            return Ok(());
        };
        let ctx = h.context.as_ptr();
        // SAFETY: ctx is a live contextvars.Context (checked when the handle
        // was created) that we hold a reference to; PyContext_Enter/Exit and
        // PyObject_Call are called with the GIL held (we have `py`), and a
        // NULL return always comes with a Python exception set, which
        // PyErr::fetch takes.
        let err = unsafe {
            if ffi::PyContext_Enter(ctx) < 0 {
                Some(PyErr::fetch(py))
            } else {
                let res = ffi::PyObject_Call(func.as_ptr(), args.as_ptr(), std::ptr::null_mut());
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
        drop(args);
        match err {
            None => Ok(()),
            Some(e) => Handle::report(slf, e),
        }
    }

    fn report(slf: &Bound<'_, Handle>, err: PyErr) -> PyResult<()> {
        let py = slf.py();
        if err.is_instance_of::<PyKeyboardInterrupt>(py) || err.is_instance_of::<PySystemExit>(py) {
            return Err(err);
        }
        let h = slf.get();
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
        ctx.set_item("handle", slf)?;
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

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: see release_attached: a Handle is only dropped by its
        // Python object's tp_dealloc (or a failed construction), attached.
        unsafe {
            release_attached(&mut self.context);
            release_attached(&mut self.loop_);
        }
    }
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

#[pymethods]
impl Handle {
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::do_cancel(slf)
    }

    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    fn get_context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }

    /// asyncio.Handle._run(): run the callback now, reporting its exception.
    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::run(slf)
    }

    #[getter]
    fn _callback<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        self.callback_parts(py).map(|(f, _)| f)
    }

    #[getter]
    fn _args<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyTuple>> {
        self.callback_parts(py).map(|(_, a)| a)
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.loop_.clone_ref(py)
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> Py<PyAny> {
        self.context.clone_ref(py)
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.source_traceback.as_ref().map(|t| t.clone_ref(py))
    }

    #[getter]
    fn _repr(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.repr.with(py, |r| r.as_ref().map(|r| r.clone_ref(py)))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        if let Some(r) = slf.get()._repr(py) {
            return Ok(r);
        }
        Ok(pyobjs::handle_repr(py)?.call1((slf,))?.unbind())
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        self.visit_contents(&visit)
    }

    fn __clear__(&self) {
        // Only the callback and the cached repr can form a cycle back to
        // this handle that the GC must break (context and loop are cleared by
        // their own tp_clear).
        let old = self.cb.try_with(|c| c.take());
        drop(old);
        let old = self.repr.try_with(|r| r.take());
        drop(old);
    }
}

#[pyclass(frozen, extends = Handle, freelist = 1024, module = "tokioloop._tokioloop", name = "TimerHandle")]
pub struct TimerHandle {
    when: f64,
    /// True while the handle sits in the loop's timer heap.
    pub(crate) scheduled: AtomicBool,
}

impl TimerHandle {
    pub(crate) fn new(when: f64) -> Self {
        TimerHandle {
            when,
            scheduled: AtomicBool::new(true),
        }
    }

    #[allow(clippy::type_complexity)]
    fn cmp_key<'py>(
        slf: &Bound<'py, Self>,
    ) -> (f64, Option<(Bound<'py, PyAny>, Bound<'py, PyTuple>)>, bool) {
        let base = slf.as_super().get();
        (
            slf.get().when,
            base.callback_parts(slf.py()),
            base.is_cancelled(),
        )
    }
}

#[pymethods]
impl TimerHandle {
    fn when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _when(&self) -> f64 {
        self.when
    }

    #[getter]
    fn _scheduled(&self) -> bool {
        self.scheduled.load(Ordering::Relaxed)
    }

    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        let base = slf.as_super();
        if !base.get().is_cancelled() && slf.get().scheduled.load(Ordering::Acquire) {
            if let Ok(core) = base.get().loop_.bind(slf.py()).cast::<LoopCore>() {
                core.get().timer_cancelled();
            }
        }
        Handle::do_cancel(base)
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        // hash(self._when), as asyncio.
        pyo3::types::PyFloat::new(py, self.when).hash()
    }

    fn __richcmp__(
        slf: &Bound<'_, Self>,
        other: &Bound<'_, PyAny>,
        op: CompareOp,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let Ok(other) = other.cast::<TimerHandle>() else {
            return Ok(py.NotImplemented());
        };
        let (w1, w2) = (slf.get().when, other.get().when);
        let res = match op {
            CompareOp::Lt => w1 < w2,
            CompareOp::Gt => w1 > w2,
            CompareOp::Le | CompareOp::Ge | CompareOp::Eq | CompareOp::Ne => {
                let (a, b) = (TimerHandle::cmp_key(slf), TimerHandle::cmp_key(other));
                let same = a.0 == b.0
                    && a.2 == b.2
                    && match (&a.1, &b.1) {
                        (Some((f1, a1)), Some((f2, a2))) => f1.eq(f2)? && a1.eq(a2)?,
                        (None, None) => true,
                        _ => false,
                    };
                match op {
                    CompareOp::Eq => same,
                    CompareOp::Ne => !same,
                    CompareOp::Le => w1 < w2 || same,
                    _ => w1 > w2 || same,
                }
            }
        };
        Ok(res.into_pyobject(py)?.to_owned().into_any().unbind())
    }
}
