//! Await anywhere: `await_`, `run_anywhere` and the coroutine wrapper that
//! makes a task await-anywhere capable.
//!
//! How an `await_` inside a fiber works: `await_(x)` gets `x`'s await
//! iterator and drives it *on the fiber*, exactly as an `await` expression
//! would: values sent in and exceptions thrown in are forwarded to it, and
//! whatever it yields (an asyncio future, or None for a bare yield) is
//! handed up by suspending the fiber. The fiber's resumer (a
//! [`RunAnywhere`] or an [`AnywhereCoroutine`] that an asyncio Task is
//! stepping) returns that value from its own `send`, so the Task sees an
//! ordinary coroutine yielding a future. When the Task sends the result (or
//! throws CancelledError), the resumer resumes the fiber with it, and
//! `await_` forwards it to the iterator. Everything the awaited coroutine
//! runs therefore runs on the fiber, so sync code it calls can `await_` too.
//! An awaitable that completes without yielding (a done future) never
//! suspends the fiber.
use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::exceptions::{
    PyGeneratorExit, PyRuntimeError, PyStopIteration, PyTypeError, PyValueError,
};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};
use pyo3::{PyTraverseError, PyVisit};

use super::core::{
    self, iter_send, throw_method, Body, Fiber, In, Kind, LeakReason, Outcome, Resumed, Ret,
    Status, Step, StepAction,
};

/// Python fallback for `await_` outside an await-capable fiber (set by
/// tokioloop._anywhere at import).
static FALLBACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

#[pyfunction]
pub(crate) fn _set_await_fallback(py: Python<'_>, func: Py<PyAny>) -> PyResult<()> {
    FALLBACK
        .set(py, func)
        .map_err(|_| PyRuntimeError::new_err("await_ fallback already set"))
}

const CO_ITERABLE_COROUTINE: i64 = 0x0100;

/// The iterator `await x` would drive, with the same errors as `await`.
pub(crate) fn awaitable_iter<'py>(
    py: Python<'py>,
    aw: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let p = aw.as_ptr();
    // SAFETY: type pointer comparisons and slot reads on a live object.
    unsafe {
        let tp = ffi::Py_TYPE(p);
        if tp == &raw mut ffi::PyCoro_Type {
            // `await` refuses a coroutine another await is driving.
            let yf = aw.getattr(pyo3::intern!(py, "cr_await"))?;
            if !yf.is_none() {
                return Err(PyRuntimeError::new_err(
                    "coroutine is being awaited already",
                ));
            }
            return Ok(aw.clone());
        }
        if tp == &raw mut ffi::PyGen_Type {
            let flags: i64 = aw
                .getattr(pyo3::intern!(py, "gi_code"))?
                .getattr(pyo3::intern!(py, "co_flags"))?
                .extract()?;
            if flags & CO_ITERABLE_COROUTINE != 0 {
                return Ok(aw.clone());
            }
        }
        let am = (*tp).tp_as_async;
        if !am.is_null() {
            if let Some(am_await) = (*am).am_await {
                let it = am_await(p);
                if it.is_null() {
                    return Err(PyErr::fetch(py));
                }
                let it = Bound::from_owned_ptr(py, it);
                let itp = ffi::Py_TYPE(it.as_ptr());
                if itp == &raw mut ffi::PyCoro_Type {
                    return Err(PyTypeError::new_err("__await__() returned a coroutine"));
                }
                if ffi::PyIter_Check(it.as_ptr()) == 0 {
                    return Err(PyTypeError::new_err(format!(
                        "__await__() returned non-iterator of type '{}'",
                        it.get_type().name()?
                    )));
                }
                return Ok(it);
            }
        }
    }
    Err(PyTypeError::new_err(format!(
        "object {} can't be used in 'await' expression",
        aw.get_type().name()?
    )))
}

/// Throws `e` into an await iterator the way `await` (yield from) does:
/// GeneratorExit closes the iterator and is raised here; other exceptions
/// go to its `throw()` if it has one, else are raised here.
fn throw_into(py: Python<'_>, it: &Bound<'_, PyAny>, e: PyErr) -> Outcome {
    if e.is_instance_of::<PyGeneratorExit>(py) {
        if let Ok(close) = it.getattr(pyo3::intern!(py, "close")) {
            if let Err(err) = close.call0() {
                return Outcome::Raised(err);
            }
        }
        return Outcome::Raised(e);
    }
    match it.getattr(pyo3::intern!(py, "throw")) {
        Ok(_) => throw_method(py, it, e),
        Err(_) => Outcome::Raised(e),
    }
}

const IN_GREENLET: &str = "tokioloop.await_() cannot suspend inside a greenlet other than the \
thread's main one (greenback's portal, gevent, SQLAlchemy's greenlet_spawn): greenlet keeps one \
current greenlet per thread, and greenlet switches that other tasks make while this fiber waits \
would be taken for this greenlet's and corrupt the stack. Await there with that library's own \
means (greenback.await_), or call await_ outside the greenlet.";

const START_IN_GREENLET: &str = "a tokioloop fiber (run_anywhere(), a step of an \
await-anywhere task) cannot start inside a greenlet other than the thread's main one \
(greenback's portal, gevent): greenlet cannot switch between the fiber's stack and that \
greenlet's (code on the fiber calling greenback.await_ would abort the process). Use either \
greenback's portal or tokioloop's await-anywhere in a task, not both.";

/// Whether this thread is running inside a greenlet other than its main
/// one (only if greenlet is loaded). A fiber must not suspend then: see
/// `IN_GREENLET`.
fn in_child_greenlet(py: Python<'_>) -> bool {
    if !greenlet_loaded(py) {
        return false;
    }
    static GETCURRENT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let Ok(getcurrent) = GETCURRENT.get_or_try_init(py, || {
        py.import("greenlet")?
            .getattr("getcurrent")
            .map(Bound::unbind)
    }) else {
        return false;
    };
    match getcurrent
        .bind(py)
        .call0()
        .and_then(|g| g.getattr(pyo3::intern!(py, "parent")))
    {
        Ok(parent) => !parent.is_none(),
        Err(_) => false,
    }
}

/// `await_` on an await-capable fiber.
///
/// # Safety
/// `fp == core::current()`, GIL held.
unsafe fn await_in_fiber(
    py: Python<'_>,
    fp: *mut Fiber,
    aw: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let it = awaitable_iter(py, aw)?;
    let mut r = iter_send(py, it.as_ptr(), ffi::Py_None());
    loop {
        match r {
            Outcome::Returned(v) => return Ok(v),
            Outcome::Raised(e) => return Err(e),
            Outcome::Yielded(y) => {
                if in_child_greenlet(py) {
                    drop(y);
                    r = throw_into(py, &it, PyRuntimeError::new_err(IN_GREENLET));
                    continue;
                }
                r = match core::suspend(fp, core::Out::Yield(y)) {
                    In::Send(v) => {
                        let v = v.into_bound(py);
                        iter_send(py, it.as_ptr(), v.as_ptr())
                    }
                    In::Throw(e) => throw_into(py, &it, e),
                    In::Step(_) | In::Quit => Outcome::Raised(PyRuntimeError::new_err(
                        "internal error: a fiber waiting in await_() got a step request",
                    )),
                };
            }
        }
    }
}

fn await_impl(py: Python<'_>, awaitable: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let fp = core::current();
    // SAFETY: a non-null current() is the live fiber this code runs on.
    if !fp.is_null() && unsafe { (*fp).kind } == Kind::Await {
        // SAFETY: fp == current(), GIL held.
        return unsafe { await_in_fiber(py, fp, awaitable) };
    }
    match FALLBACK.get(py) {
        Some(f) => f.call1(py, (awaitable,)),
        None => Err(PyRuntimeError::new_err(
            "await_() outside a fiber needs the tokioloop package to be imported",
        )),
    }
}

/// Runs the body of a raw C-API function: GIL assumed, panics caught,
/// `PyResult` turned into a new reference or NULL with an exception set.
///
/// # Safety
/// Called by CPython with the GIL held.
pub(crate) unsafe fn raw_call(
    f: impl FnOnce(Python<'_>) -> PyResult<Py<PyAny>>,
) -> *mut ffi::PyObject {
    let py = Python::assume_attached();
    match catch_unwind(AssertUnwindSafe(|| f(py))) {
        Ok(Ok(v)) => v.into_ptr(),
        Ok(Err(e)) => {
            e.restore(py);
            std::ptr::null_mut()
        }
        Err(_) => {
            PyRuntimeError::new_err("internal error: panic in tokioloop fiber code").restore(py);
            std::ptr::null_mut()
        }
    }
}

/// `tokioloop.await_(awaitable)` (METH_O). A raw C-API function rather than
/// a pyo3 one on purpose: it suspends fibers, and a pyo3 trampoline
/// suspended on a fiber would leave pyo3's per-thread attach count raised
/// while the thread runs other code (its counting assumes nested calls).
unsafe extern "C" fn await_raw(
    _module: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    raw_call(|py| await_impl(py, &Bound::from_borrowed_ptr(py, arg)))
}

/// Adds a raw C-API function to the module.
///
/// # Safety
/// GIL held; `meth` matches `flags`.
pub(crate) unsafe fn add_raw_function(
    m: &Bound<'_, PyModule>,
    name: &'static std::ffi::CStr,
    meth: ffi::PyMethodDefPointer,
    flags: std::os::raw::c_int,
    doc: &'static std::ffi::CStr,
) -> PyResult<()> {
    let py = m.py();
    // The definition must outlive the function object: leaked once per
    // module initialisation.
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: meth,
        ml_flags: flags,
        ml_doc: doc.as_ptr(),
    }));
    let modname = m.name()?;
    let f = ffi::PyCFunction_NewEx(def, std::ptr::null_mut(), modname.as_ptr());
    if f.is_null() {
        return Err(PyErr::fetch(py));
    }
    m.add(
        name.to_str().expect("ascii name"),
        Bound::from_owned_ptr(py, f),
    )
}

/// Where the calling code runs: None (not on a fiber), "plain" or "await".
#[pyfunction]
pub(crate) fn fiber_kind() -> Option<&'static str> {
    let fp = core::current();
    if fp.is_null() {
        None
    } else {
        // SAFETY: a non-null current() is the live fiber this code runs on.
        Some(match unsafe { (*fp).kind } {
            Kind::Plain => "plain",
            Kind::Await => "await",
        })
    }
}

/// Builds an exception from `throw(typ[, val[, tb]])` arguments.
pub(crate) fn exc_from_throw_args(
    py: Python<'_>,
    typ: &Bound<'_, PyAny>,
    val: Option<&Bound<'_, PyAny>>,
    tb: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyErr> {
    let val = val.filter(|v| !v.is_none());
    let exc = if typ.is_instance_of::<pyo3::exceptions::PyBaseException>() {
        if val.is_some() {
            return Err(PyTypeError::new_err(
                "instance exception may not have a separate value",
            ));
        }
        typ.clone()
    } else if let Ok(t) = typ.cast::<PyType>() {
        if !t.is_subclass_of::<pyo3::exceptions::PyBaseException>()? {
            return Err(PyTypeError::new_err(
                "exceptions must be classes or instances deriving from BaseException",
            ));
        }
        match val {
            Some(v) if v.is_instance(t)? => v.clone(),
            Some(v) if v.is_instance_of::<PyTuple>() => t.call1(v.cast::<PyTuple>()?)?.into_any(),
            Some(v) => t.call1((v,))?.into_any(),
            None => t.call0()?.into_any(),
        }
    } else {
        return Err(PyTypeError::new_err(
            "exceptions must be classes or instances deriving from BaseException",
        ));
    };
    if let Some(tb) = tb.filter(|t| !t.is_none()) {
        exc.setattr(pyo3::intern!(py, "__traceback__"), tb)?;
    }
    Ok(PyErr::from_value(exc))
}

/// Converts an [`Outcome`] into the result of a `send()`/`throw()` method.
fn outcome_to_method_result(py: Python<'_>, o: Outcome) -> PyResult<Py<PyAny>> {
    match o {
        Outcome::Yielded(v) => Ok(v),
        Outcome::Returned(v) => Err(PyStopIteration::new_err((v,))),
        Outcome::Raised(e) => {
            let _ = py;
            Err(e)
        }
    }
}

/// Converts an [`Outcome`] into a `tp_iternext` result (None return: plain
/// exhaustion, no StopIteration object).
fn outcome_to_next(py: Python<'_>, o: Outcome) -> PyResult<Option<Py<PyAny>>> {
    match o {
        Outcome::Yielded(v) => Ok(Some(v)),
        Outcome::Returned(v) if v.is_none(py) => Ok(None),
        Outcome::Returned(v) => Err(PyStopIteration::new_err((v,))),
        Outcome::Raised(e) => Err(e),
    }
}

/// Writes an outcome into an `am_send` result.
///
/// # Safety
/// `presult` valid for writing; GIL held.
unsafe fn outcome_to_send(
    py: Python<'_>,
    o: Outcome,
    presult: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    match o {
        Outcome::Yielded(v) => {
            *presult = v.into_ptr();
            ffi::PySendResult::PYGEN_NEXT
        }
        Outcome::Returned(v) => {
            *presult = v.into_ptr();
            ffi::PySendResult::PYGEN_RETURN
        }
        Outcome::Raised(e) => {
            e.restore(py);
            *presult = std::ptr::null_mut();
            ffi::PySendResult::PYGEN_ERROR
        }
    }
}

// ---------------------------------------------------------------------------
// run_anywhere
// ---------------------------------------------------------------------------

/// The awaitable `run_anywhere(fn, *args, **kwargs)` returns: a coroutine
/// (it passes `asyncio.iscoroutine`) that runs `fn` on its own fiber.
#[pyclass(frozen, weakref, module = "tokioloop._tokioloop", name = "RunAnywhere")]
pub(crate) struct RunAnywhere {
    func: Py<PyAny>,
    inner: UnsafeCell<RaInner>,
}

struct RaInner {
    fiber: Option<Box<Fiber>>,
    awaited: bool,
}

// SAFETY: all access happens with the GIL held (GIL builds only, enforced by
// the shim), and the fiber itself refuses every thread but its own.
unsafe impl Send for RunAnywhere {}
// SAFETY: see Send.
unsafe impl Sync for RunAnywhere {}

enum Action {
    Send(Py<PyAny>),
    Throw(PyErr),
}

impl RunAnywhere {
    fn inner(&self) -> *mut RaInner {
        self.inner.get()
    }

    fn name(&self, py: Python<'_>) -> String {
        let f = self.func.bind(py);
        let n = f
            .getattr(pyo3::intern!(py, "__qualname__"))
            .or_else(|_| f.getattr(pyo3::intern!(py, "__name__")))
            .and_then(|n| n.extract::<String>())
            .unwrap_or_else(|_| "<callable>".to_string());
        format!("run_anywhere({n})")
    }

    /// One step: send or throw into the fiber.
    fn drive(&self, py: Python<'_>, action: Action) -> Outcome {
        let inner = self.inner();
        // SAFETY: GIL held; the box stays alive (it is only dropped below,
        // after the fiber finished); no reference into `inner` is held
        // across the resume, only the raw fiber pointer.
        unsafe {
            let fp: *mut Fiber = match (*inner).fiber.as_mut() {
                Some(b) => &mut **b,
                None => {
                    return match action {
                        Action::Throw(e) => Outcome::Raised(e),
                        Action::Send(_) => Outcome::Raised(PyRuntimeError::new_err(
                            "cannot reuse already awaited run_anywhere()",
                        )),
                    }
                }
            };
            match (*fp).status {
                Status::Running => {
                    return Outcome::Raised(PyValueError::new_err(
                        "run_anywhere() already executing",
                    ))
                }
                Status::New => {
                    if let Action::Send(v) = &action {
                        if !v.is_none(py) {
                            return Outcome::Raised(PyTypeError::new_err(
                                "can't send non-None value to a just-started run_anywhere()",
                            ));
                        }
                    }
                    (*inner).awaited = true;
                    if in_child_greenlet(py) {
                        (*inner).fiber = None;
                        return Outcome::Raised(PyRuntimeError::new_err(START_IN_GREENLET));
                    }
                }
                _ => {}
            }
            let msg = match action {
                Action::Send(v) => In::Send(v),
                Action::Throw(e) => In::Throw(e),
            };
            match core::resume(py, fp, msg) {
                Ok(Resumed::Yield(y)) => Outcome::Yielded(y),
                Ok(Resumed::Finished(ret)) => {
                    (*inner).fiber = None;
                    match ret {
                        Ret::Value(v) => Outcome::Returned(v),
                        // PEP 479, as for a coroutine: a StopIteration out
                        // of the function would read as this awaitable's
                        // return (`await` would give its value).
                        Ret::Error(e) if e.is_instance_of::<PyStopIteration>(py) => {
                            let err = PyRuntimeError::new_err(format!(
                                "{} raised StopIteration",
                                self.name(py)
                            ));
                            err.set_cause(py, Some(e));
                            Outcome::Raised(err)
                        }
                        Ret::Error(e) => Outcome::Raised(e),
                        Ret::Quit => Outcome::Returned(py.None()),
                    }
                }
                Ok(Resumed::StepDone(_)) => Outcome::Raised(PyRuntimeError::new_err(
                    "internal error: run_anywhere fiber reported a coroutine step",
                )),
                Err(e) => Outcome::Raised(e),
            }
        }
    }

    /// Unwinds a suspended fiber (close / finalizer).
    fn close_impl(&self, py: Python<'_>) -> Option<PyErr> {
        let inner = self.inner();
        // SAFETY: GIL held; see `drive`.
        unsafe {
            let fp: *mut Fiber = match (*inner).fiber.as_mut() {
                Some(b) => &mut **b,
                None => return None,
            };
            let err = core::kill(py, fp, &self.name(py));
            match (*fp).status {
                Status::Done => (*inner).fiber = None,
                // A leaked fiber's stack is already out of the pool and its
                // references are never released; the box itself can go.
                Status::Leaked => (*inner).fiber = None,
                _ => {}
            }
            err
        }
    }

    fn finalize(&self, py: Python<'_>) {
        // SAFETY: GIL held.
        let suspended = unsafe {
            (*self.inner())
                .fiber
                .as_ref()
                .is_some_and(|f| f.status == Status::Suspended)
        };
        if suspended {
            if let Some(e) = self.close_impl(py) {
                e.write_unraisable(py, None);
            }
        }
    }
}

#[pymethods]
impl RunAnywhere {
    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        outcome_to_next(py, self.drive(py, Action::Send(py.None())))
    }

    fn send(&self, py: Python<'_>, value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        outcome_to_method_result(py, self.drive(py, Action::Send(value)))
    }

    #[pyo3(signature = (typ, val = None, tb = None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let e = exc_from_throw_args(py, typ, val, tb)?;
        outcome_to_method_result(py, self.drive(py, Action::Throw(e)))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        match self.close_impl(py) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    #[getter]
    fn cr_running(&self) -> bool {
        // SAFETY: GIL held (pymethod).
        unsafe {
            (*self.inner())
                .fiber
                .as_ref()
                .is_some_and(|f| f.status == Status::Running)
        }
    }

    #[getter]
    fn cr_suspended(&self) -> bool {
        // SAFETY: GIL held (pymethod).
        unsafe {
            (*self.inner())
                .fiber
                .as_ref()
                .is_some_and(|f| f.status == Status::Suspended)
        }
    }

    /// Innermost frame of the synchronous code while it is suspended.
    #[getter]
    fn cr_frame(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // SAFETY: GIL held (pymethod).
        unsafe {
            match (*self.inner()).fiber.as_ref() {
                Some(f) => f.top_frame(py),
                None => Ok(None),
            }
        }
    }

    #[getter]
    fn cr_await(&self) -> Option<Py<PyAny>> {
        None
    }

    #[getter]
    fn cr_code(&self) -> Option<Py<PyAny>> {
        None
    }

    /// The callable this runs.
    #[getter]
    fn func(&self, py: Python<'_>) -> Py<PyAny> {
        self.func.clone_ref(py)
    }

    #[getter]
    fn __name__(&self, py: Python<'_>) -> String {
        self.name(py)
    }

    #[getter]
    fn __qualname__(&self, py: Python<'_>) -> String {
        self.name(py)
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!("<{} object at {:p}>", self.name(py), self as *const Self)
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.func)?;
        // SAFETY: tp_traverse runs with the GIL held and never concurrently
        // with a resume of this fiber on another thread (GIL builds).
        unsafe {
            if let Some(f) = (*self.inner()).fiber.as_ref() {
                f.traverse(&visit)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        // SAFETY: GIL held (tp_clear).
        unsafe {
            if let Some(f) = (*self.inner()).fiber.as_mut() {
                f.clear();
            }
        }
    }
}

impl Drop for RunAnywhere {
    fn drop(&mut self) {
        // SAFETY: pyo3 drops pyclass contents in tp_dealloc, with the GIL.
        let py = unsafe { Python::assume_attached() };
        let inner = self.inner.get_mut();
        let status = inner.fiber.as_ref().map(|f| f.status);
        match status {
            Some(Status::Running) => {
                // Unreachable in practice: whoever resumed the fiber holds a
                // reference to this object until the resume returns. Were it
                // to happen, the fiber's box and stack are in use by the code
                // running on them: keep both forever rather than free them.
                std::mem::forget(inner.fiber.take());
            }
            Some(Status::Suspended) => {
                let saved = PyErr::take(py);
                self.finalize(py);
                if let Some(e) = saved {
                    e.restore(py);
                }
            }
            Some(Status::New) if !inner.awaited => {
                let saved = PyErr::take(py);
                let msg = format!("{} was never awaited", self.name(py));
                let cat = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
                if let Err(e) = PyErr::warn(
                    py,
                    &cat,
                    &std::ffi::CString::new(msg).unwrap_or_default(),
                    1,
                ) {
                    e.write_unraisable(py, None);
                }
                if let Some(e) = saved {
                    e.restore(py);
                }
            }
            _ => {}
        }
    }
}

/// `await tokioloop.run_anywhere(fn, *args, **kwargs)`: run the synchronous
/// `fn` on a fiber inside the current task; `await_` works at any depth in
/// it. Works on every asyncio event loop.
#[pyfunction]
#[pyo3(signature = (func, /, *args, **kwargs))]
pub(crate) fn run_anywhere(
    py: Python<'_>,
    func: Py<PyAny>,
    args: Py<PyTuple>,
    kwargs: Option<Py<PyDict>>,
) -> PyResult<RunAnywhere> {
    if !func.bind(py).is_callable() {
        return Err(PyTypeError::new_err(format!(
            "run_anywhere() needs a callable, got {}",
            func.bind(py).get_type().name()?
        )));
    }
    let args = if args.bind(py).is_empty() {
        None
    } else {
        Some(args)
    };
    let body = Body::Call {
        func: func.clone_ref(py),
        args,
        kwargs,
    };
    Ok(RunAnywhere {
        func,
        inner: UnsafeCell::new(RaInner {
            fiber: Some(Fiber::new(body, Kind::Await)),
            awaited: false,
        }),
    })
}

// ---------------------------------------------------------------------------
// Await-anywhere task coroutines
// ---------------------------------------------------------------------------

/// Wraps a coroutine so that each of its steps runs on a runner fiber:
/// synchronous code anywhere inside the coroutine can `await_`. A runner is
/// held only while such code is suspended in `await_`; otherwise it goes
/// back to the thread's idle runners when the step ends, unless greenlet
/// is loaded (see `AcInner::pinned`).
#[pyclass(
    frozen,
    weakref,
    module = "tokioloop._tokioloop",
    name = "AnywhereCoroutine"
)]
pub(crate) struct AnywhereCoroutine {
    coro: Py<PyAny>,
    inner: UnsafeCell<AcInner>,
}

struct AcInner {
    /// Runner bound to this coroutine while sync code waits in `await_`.
    runner: Option<Box<Fiber>>,
    /// Idle runner kept for this coroutine's next steps once greenlet is
    /// loaded. A greenlet keeps its C stack at the addresses where it was
    /// started and can only be switched to from that same stack: one started
    /// in a step (SQLAlchemy's asyncio layer, greenback's portal) and resumed
    /// in a later step that ran on another runner's stack would have its
    /// saved stack copied over that other stack (another task's live frames),
    /// or make greenlet abort. Running every step of the coroutine on one
    /// stack keeps greenlet's picture of a single C stack true for it.
    pinned: Option<Box<Fiber>>,
    running: bool,
}

/// Whether a call that may run another task's first step at once (an eager
/// task factory) must move to the thread's own C stack (`on_thread_stack`):
/// the caller is on a fiber (not inside a child greenlet). That step belongs
/// to the new task, not to the fiber's: an `await_` in it must not suspend
/// the creating fiber (that would leave asyncio's "current task" pointing at
/// the new task while the creating one goes on: "Leaving task ... does not
/// match the current task", a wedged loop), so it runs with no fiber current
/// and `await_` raises there, as in the task's later steps on the loop's
/// stack. And a greenlet it starts (SQLAlchemy's `greenlet_spawn`) must
/// start on the stack the task's later steps run on, the loop's, or
/// switching back into that greenlet later would copy its saved stack over
/// this fiber's. (Inside a child greenlet, moving to another stack would
/// break greenlet's picture of that greenlet's stack instead, so the call
/// stays.)
pub(crate) fn needs_thread_stack(py: Python<'_>) -> bool {
    !core::current().is_null() && !in_child_greenlet(py)
}

/// Whether the greenlet module has been imported (once it has, it stays
/// true: a module that was loaded may have left greenlets behind).
fn greenlet_loaded(py: Python<'_>) -> bool {
    static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SEEN.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    // SAFETY: GIL held; PyImport_GetModuleDict returns a borrowed reference
    // to sys.modules, a dict that lives as long as the interpreter.
    let modules = unsafe {
        Bound::from_borrowed_ptr(py, ffi::PyImport_GetModuleDict()).cast_into_unchecked::<PyDict>()
    };
    let found = modules
        .contains(pyo3::intern!(py, "greenlet"))
        .unwrap_or(false);
    if found {
        SEEN.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    found
}

/// Lets go of a coroutine's pinned idle runner: back to this thread's idle
/// runners, or, off its thread or at interpreter shutdown, dropped (its
/// stack holds only the runner loop and no references; `Fiber::drop` keeps
/// the slot out of the pool rather than unwind it).
///
/// # Safety
/// GIL held; `r` is idle (its last resume returned StepDone).
unsafe fn let_go_pinned(py: Python<'_>, r: Box<Fiber>) {
    if r.on_owner_thread() && !core::finalizing() {
        core::release_runner(py, r);
    } else {
        drop(r);
    }
}

// SAFETY: as for RunAnywhere.
unsafe impl Send for AnywhereCoroutine {}
// SAFETY: as for RunAnywhere.
unsafe impl Sync for AnywhereCoroutine {}

impl AnywhereCoroutine {
    fn inner(&self) -> *mut AcInner {
        self.inner.get()
    }

    fn drive(&self, py: Python<'_>, action: Action) -> Outcome {
        let inner = self.inner();
        // SAFETY: GIL held. The runner box is moved in and out of `inner`
        // only here and in close_impl; `running` refuses re-entry, so no
        // two resumes of this coroutine overlap.
        unsafe {
            if (*inner).running {
                return Outcome::Raised(PyValueError::new_err("coroutine already executing"));
            }
            (*inner).running = true;
            let result = match (*inner).runner.take() {
                Some(mut r) => {
                    let fp: *mut Fiber = &mut *r;
                    let msg = match action {
                        Action::Send(v) => In::Send(v),
                        Action::Throw(e) => In::Throw(e),
                    };
                    let res = core::resume(py, fp, msg);
                    self.settle(py, r, res)
                }
                None if in_child_greenlet(py) => {
                    Outcome::Raised(PyRuntimeError::new_err(START_IN_GREENLET))
                }
                None => {
                    let mut r = match (*inner).pinned.take() {
                        Some(p) if p.on_owner_thread() => p,
                        other => {
                            // Another thread steps it: a runner of its own
                            // (greenlets cannot cross threads anyway).
                            (*inner).pinned = other;
                            core::take_runner()
                        }
                    };
                    let step = Step {
                        coro: self.coro.clone_ref(py),
                        action: match action {
                            Action::Send(v) => StepAction::Send(v),
                            Action::Throw(e) => StepAction::Throw(e),
                        },
                    };
                    let res = core::resume_runner_step(py, &mut r, step);
                    self.settle(py, r, res)
                }
            };
            (*inner).running = false;
            result
        }
    }

    /// Bind or release the runner after a resume.
    ///
    /// # Safety
    /// GIL held, called from `drive` with `running` set.
    unsafe fn settle(&self, py: Python<'_>, r: Box<Fiber>, res: PyResult<Resumed>) -> Outcome {
        match res {
            Ok(Resumed::Yield(y)) => {
                (*self.inner()).runner = Some(r);
                Outcome::Yielded(y)
            }
            Ok(Resumed::StepDone(o)) => {
                let inner = self.inner();
                let more = matches!(o, Outcome::Yielded(_));
                if more && (*inner).pinned.is_none() && greenlet_loaded(py) {
                    // More steps come and greenlets may be about: they run
                    // on this runner's stack.
                    (*inner).pinned = Some(r);
                } else {
                    core::release_runner(py, r);
                    if !more {
                        // Finished: nothing steps it again.
                        if let Some(p) = (*inner).pinned.take() {
                            let_go_pinned(py, p);
                        }
                    }
                }
                o
            }
            Ok(Resumed::Finished(_)) => Outcome::Raised(PyRuntimeError::new_err(
                "internal error: a runner fiber ended during a step",
            )),
            Err(e) => {
                if r.status == Status::Suspended {
                    // Refused (e.g. wrong thread): the runner stays bound.
                    (*self.inner()).runner = Some(r);
                }
                Outcome::Raised(e)
            }
        }
    }

    /// close(): like a coroutine's close(), including the synchronous code
    /// suspended in `await_`, which sees GeneratorExit.
    fn close_impl(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner();
        // SAFETY: GIL held; see `drive`.
        unsafe {
            if (*inner).running {
                return Err(PyValueError::new_err("coroutine already executing"));
            }
            if let Some(p) = (*inner).pinned.take() {
                let_go_pinned(py, p);
            }
            let Some(mut r) = (*inner).runner.take() else {
                self.coro
                    .bind(py)
                    .call_method0(pyo3::intern!(py, "close"))?;
                return Ok(());
            };
            let fp: *mut Fiber = &mut *r;
            let what = "an await-anywhere task's fiber";
            if !r.on_owner_thread() {
                core::leak(py, fp, what, LeakReason::WrongThread);
                return Ok(());
            }
            if core::finalizing() {
                core::leak(py, fp, what, LeakReason::Finalizing);
                return Ok(());
            }
            (*inner).running = true;
            let mut result: Option<PyResult<()>> = None;
            for _ in 0..8 {
                match core::resume(py, fp, In::Throw(PyGeneratorExit::new_err(()))) {
                    Ok(Resumed::Yield(_)) => continue,
                    Ok(Resumed::StepDone(o)) => {
                        core::release_runner(py, r);
                        (*inner).running = false;
                        return match o {
                            Outcome::Raised(e)
                                if e.is_instance_of::<PyGeneratorExit>(py)
                                    || e.is_instance_of::<PyStopIteration>(py) =>
                            {
                                Ok(())
                            }
                            Outcome::Raised(e) => Err(e),
                            Outcome::Returned(_) => Ok(()),
                            Outcome::Yielded(_) => {
                                Err(PyRuntimeError::new_err("coroutine ignored GeneratorExit"))
                            }
                        };
                    }
                    Ok(Resumed::Finished(_)) => {
                        result = Some(Err(PyRuntimeError::new_err(
                            "internal error: a runner fiber ended during close()",
                        )));
                        break;
                    }
                    Err(e) => {
                        result = Some(Err(e));
                        break;
                    }
                }
            }
            (*inner).running = false;
            if r.status == Status::Suspended {
                core::leak(py, fp, what, LeakReason::Ignored);
            }
            result.unwrap_or(Ok(()))
        }
    }

    fn finalize(&self, py: Python<'_>) {
        // SAFETY: GIL held.
        let bound = unsafe { (*self.inner()).runner.is_some() };
        if bound {
            if let Err(e) = self.close_impl(py) {
                e.write_unraisable(py, None);
            }
        }
    }
}

impl AnywhereCoroutine {
    pub(crate) fn wrap(coro: Py<PyAny>) -> Self {
        Self::new(coro)
    }
}

#[pymethods]
impl AnywhereCoroutine {
    #[new]
    fn new(coro: Py<PyAny>) -> Self {
        AnywhereCoroutine {
            coro,
            inner: UnsafeCell::new(AcInner {
                runner: None,
                pinned: None,
                running: false,
            }),
        }
    }

    fn __await__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        outcome_to_next(py, self.drive(py, Action::Send(py.None())))
    }

    fn send(&self, py: Python<'_>, value: Py<PyAny>) -> PyResult<Py<PyAny>> {
        outcome_to_method_result(py, self.drive(py, Action::Send(value)))
    }

    #[pyo3(signature = (typ, val = None, tb = None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let e = exc_from_throw_args(py, typ, val, tb)?;
        outcome_to_method_result(py, self.drive(py, Action::Throw(e)))
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.close_impl(py)
    }

    /// Whether a step of the coroutine is suspended on a fiber (its
    /// synchronous code waits in `await_`).
    #[getter]
    fn fiber_suspended(&self) -> bool {
        // SAFETY: GIL held (pymethod).
        unsafe { (*self.inner()).runner.is_some() }
    }

    /// The wrapped coroutine.
    #[getter]
    fn __wrapped__(&self, py: Python<'_>) -> Py<PyAny> {
        self.coro.clone_ref(py)
    }

    #[getter]
    fn cr_running(&self, py: Python<'_>) -> PyResult<bool> {
        // SAFETY: GIL held (pymethod).
        if unsafe { (*self.inner()).running } {
            return Ok(true);
        }
        self.coro
            .bind(py)
            .getattr(pyo3::intern!(py, "cr_running"))
            .and_then(|v| v.is_truthy())
            .or(Ok(false))
    }

    #[getter]
    fn cr_frame(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "cr_frame"))
    }

    #[getter]
    fn cr_code(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "cr_code"))
    }

    #[getter]
    fn cr_await(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "cr_await"))
    }

    #[getter]
    fn cr_origin(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "cr_origin"))
    }

    #[getter]
    fn __name__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__name__"))
    }

    #[getter]
    fn __qualname__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.forward(py, pyo3::intern!(py, "__qualname__"))
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "<AnywhereCoroutine wrapping {}>",
            self.coro.bind(py).repr()?
        ))
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.coro)?;
        // SAFETY: tp_traverse runs with the GIL held.
        unsafe {
            if let Some(r) = (*self.inner()).runner.as_ref() {
                r.traverse(&visit)?;
            }
        }
        Ok(())
    }
}

impl AnywhereCoroutine {
    fn forward(
        &self,
        py: Python<'_>,
        name: &Bound<'_, pyo3::types::PyString>,
    ) -> PyResult<Py<PyAny>> {
        match self.coro.bind(py).getattr(name) {
            Ok(v) => Ok(v.unbind()),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyAttributeError>(py) => Ok(py.None()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for AnywhereCoroutine {
    fn drop(&mut self) {
        if let Some(p) = self.inner.get_mut().pinned.take() {
            // SAFETY: pyo3 drops pyclass contents in tp_dealloc, with the
            // GIL; a pinned runner is idle.
            unsafe { let_go_pinned(Python::assume_attached(), p) };
        }
        if self.inner.get_mut().runner.is_some() {
            // SAFETY: pyo3 drops pyclass contents in tp_dealloc, with the GIL.
            let py = unsafe { Python::assume_attached() };
            let saved = PyErr::take(py);
            self.finalize(py);
            if let Some(e) = saved {
                e.restore(py);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Slots pyo3 does not generate: am_send (PyIter_Send without StopIteration
// objects, used by asyncio's C Task) and tp_finalize (PEP 442, so that the
// cyclic GC unwinds a suspended fiber before it clears anything).
// ---------------------------------------------------------------------------

/// Runs `f` on the Rust value of a pyclass instance from a raw slot call,
/// catching panics (they must not cross the C boundary).
///
/// # Safety
/// Called by CPython with the GIL held, `obj` an instance of `T`.
pub(crate) unsafe fn with_obj<T, R>(
    obj: *mut ffi::PyObject,
    f: impl FnOnce(Python<'_>, &T) -> R,
) -> Option<R>
where
    T: pyo3::PyClass<Frozen = pyo3::pyclass::boolean_struct::True> + Sync,
{
    let py = Python::assume_attached();
    let b = Bound::from_borrowed_ptr(py, obj);
    let b = b.cast_unchecked::<T>();
    catch_unwind(AssertUnwindSafe(|| f(py, b.get()))).ok()
}

unsafe extern "C" fn ra_am_send(
    obj: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
    presult: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    let r = with_obj::<RunAnywhere, _>(obj, |py, s| {
        let v = Bound::from_borrowed_ptr(py, arg).unbind();
        outcome_to_send(py, s.drive(py, Action::Send(v)), presult)
    });
    r.unwrap_or_else(|| {
        PyRuntimeError::new_err("internal error: panic in run_anywhere send")
            .restore(Python::assume_attached());
        ffi::PySendResult::PYGEN_ERROR
    })
}

unsafe extern "C" fn ac_am_send(
    obj: *mut ffi::PyObject,
    arg: *mut ffi::PyObject,
    presult: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    let r = with_obj::<AnywhereCoroutine, _>(obj, |py, s| {
        let v = Bound::from_borrowed_ptr(py, arg).unbind();
        outcome_to_send(py, s.drive(py, Action::Send(v)), presult)
    });
    r.unwrap_or_else(|| {
        PyRuntimeError::new_err("internal error: panic in coroutine send")
            .restore(Python::assume_attached());
        ffi::PySendResult::PYGEN_ERROR
    })
}

unsafe extern "C" fn ra_finalize(obj: *mut ffi::PyObject) {
    let py = Python::assume_attached();
    let saved = PyErr::take(py);
    with_obj::<RunAnywhere, _>(obj, |py, s| s.finalize(py));
    if let Some(e) = saved {
        e.restore(py);
    }
}

unsafe extern "C" fn ac_finalize(obj: *mut ffi::PyObject) {
    let py = Python::assume_attached();
    let saved = PyErr::take(py);
    with_obj::<AnywhereCoroutine, _>(obj, |py, s| s.finalize(py));
    if let Some(e) = saved {
        e.restore(py);
    }
}

/// Installs am_send and tp_finalize on a pyo3-created heap type.
///
/// # Safety
/// GIL held; `tp` is a heap type with an as_async struct (it defines
/// `__await__`), no instance exists yet.
unsafe fn patch_type(
    tp: *mut ffi::PyTypeObject,
    send: ffi::sendfunc,
    finalize: ffi::destructor,
) -> PyResult<()> {
    let am = (*tp).tp_as_async;
    if am.is_null() {
        return Err(PyRuntimeError::new_err(
            "internal error: type lacks async slots",
        ));
    }
    (*am).am_send = Some(send);
    (*tp).tp_finalize = Some(finalize);
    ffi::PyType_Modified(tp);
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<RunAnywhere>()?;
    m.add_class::<AnywhereCoroutine>()?;
    // SAFETY: GIL held; both types were just created by pyo3 as heap types
    // defining __await__ (so tp_as_async points into the heap type object),
    // and no instance exists yet.
    unsafe {
        patch_type(
            py.get_type::<RunAnywhere>().as_type_ptr(),
            ra_am_send,
            ra_finalize,
        )?;
        patch_type(
            py.get_type::<AnywhereCoroutine>().as_type_ptr(),
            ac_am_send,
            ac_finalize,
        )?;
    }
    // SAFETY: GIL held; await_raw is a METH_O function.
    unsafe {
        add_raw_function(
            m,
            c"await_",
            ffi::PyMethodDefPointer { PyCFunction: await_raw },
            ffi::METH_O,
            c"await_(awaitable, /)\n--\n\nWait for an awaitable from synchronous code and return its result.",
        )?;
    }
    m.add_function(wrap_pyfunction!(run_anywhere, m)?)?;
    m.add_function(wrap_pyfunction!(fiber_kind, m)?)?;
    m.add_function(wrap_pyfunction!(_set_await_fallback, m)?)?;
    Ok(())
}
