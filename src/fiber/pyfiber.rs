//! `tokioloop._tokioloop.Fiber`: the fiber layer itself, exposed for tests
//! and advanced use (symmetric to greenlet's switch/throw, but asymmetric:
//! a fiber always returns to whoever resumed it). Not part of the public
//! tokioloop API.
use std::cell::UnsafeCell;

use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use super::anywhere::{add_raw_function, exc_from_throw_args, raw_call, with_obj};
use super::core::{self, Body, Fiber, In, Kind, Out, Resumed, Ret, Status};
use super::shim;
use super::stack;

#[pyclass(frozen, weakref, module = "tokioloop._tokioloop", name = "Fiber")]
pub(crate) struct PyFiber {
    inner: UnsafeCell<Box<Fiber>>,
}

// SAFETY: every access happens with the GIL held (GIL builds only), and
// `core::resume` refuses threads other than the fiber's own.
unsafe impl Send for PyFiber {}
// SAFETY: see Send.
unsafe impl Sync for PyFiber {}

impl PyFiber {
    fn fp(&self) -> *mut Fiber {
        // SAFETY: the box is never replaced; only its address is taken.
        unsafe { &mut **self.inner.get() }
    }

    fn go(&self, py: Python<'_>, msg: In) -> PyResult<Py<PyAny>> {
        // SAFETY: GIL held, the boxed fiber lives as long as `self`.
        match unsafe { core::resume(py, self.fp(), msg)? } {
            Resumed::Yield(v) => Ok(v),
            Resumed::Finished(Ret::Value(v)) => Ok(v),
            Resumed::Finished(Ret::Error(e)) => Err(e),
            Resumed::Finished(Ret::Quit) => Ok(py.None()),
            Resumed::StepDone(_) => Err(PyRuntimeError::new_err(
                "internal error: step on a plain fiber",
            )),
        }
    }
}

#[pymethods]
impl PyFiber {
    /// Fiber(func, *args, **kwargs): runs func(*args, **kwargs) on its own
    /// stack when first switched to.
    #[new]
    #[pyo3(signature = (func, /, *args, **kwargs))]
    fn new(py: Python<'_>, func: Py<PyAny>, args: Py<PyTuple>, kwargs: Option<Py<PyDict>>) -> Self {
        let args = if args.bind(py).is_empty() {
            None
        } else {
            Some(args)
        };
        PyFiber {
            inner: UnsafeCell::new(Fiber::new(Body::Call { func, args, kwargs }, Kind::Plain)),
        }
    }

    /// Resume the fiber; returns what it passes to `fiber_suspend()`, or
    /// its return value when it finishes.
    #[pyo3(signature = (value = None))]
    fn switch(&self, py: Python<'_>, value: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        self.go(py, In::Send(value.unwrap_or_else(|| py.None())))
    }

    /// Raise an exception at the fiber's suspension point.
    #[pyo3(signature = (typ, val = None, tb = None))]
    fn throw(
        &self,
        py: Python<'_>,
        typ: &Bound<'_, PyAny>,
        val: Option<&Bound<'_, PyAny>>,
        tb: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let e = exc_from_throw_args(py, typ, val, tb)?;
        self.go(py, In::Throw(e))
    }

    /// Unwind a suspended fiber (GeneratorExit at its suspension point).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        // SAFETY: GIL held, fiber live.
        match unsafe { core::kill(py, self.fp(), "a Fiber") } {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    #[getter]
    fn status(&self) -> &'static str {
        // SAFETY: GIL held; reads one field.
        match unsafe { (*self.fp()).status } {
            Status::New => "new",
            Status::Running => "running",
            Status::Suspended => "suspended",
            Status::Done => "done",
            Status::Leaked => "leaked",
        }
    }

    /// Innermost frame of a suspended fiber (None otherwise).
    #[getter]
    fn frame(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // SAFETY: GIL held.
        unsafe { (*self.fp()).top_frame(py) }
    }

    /// Whether the fiber's stack has a guard page.
    #[getter]
    fn guarded(&self) -> bool {
        // SAFETY: GIL held.
        unsafe { (*self.fp()).guarded() }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        // SAFETY: tp_traverse runs with the GIL held.
        unsafe { (*self.fp()).traverse(&visit) }
    }

    fn __clear__(&self) {
        // SAFETY: tp_clear runs with the GIL held.
        unsafe { (*self.fp()).clear() }
    }
}

impl Drop for PyFiber {
    fn drop(&mut self) {
        let fp = self.fp();
        // SAFETY: pyo3 drops pyclass contents in tp_dealloc with the GIL.
        unsafe {
            // Never Running here: whoever resumed it holds a reference to
            // this object until the resume returns.
            if (*fp).status == Status::Suspended {
                let py = Python::assume_attached();
                let saved = PyErr::take(py);
                if let Some(e) = core::kill(py, fp, "a suspended Fiber") {
                    e.write_unraisable(py, None);
                }
                if let Some(e) = saved {
                    e.restore(py);
                }
            }
        }
    }
}

/// Suspend the current plain fiber, handing `value` to its resumer; returns
/// what the next `switch()` sends (or raises what `throw()` throws). A raw
/// METH_FASTCALL function, like await_ (see there).
unsafe extern "C" fn fiber_suspend_raw(
    _module: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    raw_call(|py| {
        let value = match nargs {
            0 => None,
            1 => Some(Bound::from_borrowed_ptr(py, *args).unbind()),
            _ => {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "fiber_suspend() takes at most 1 argument",
                ))
            }
        };
        fiber_suspend(py, value)
    })
}

fn fiber_suspend(py: Python<'_>, value: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
    let fp = core::current();
    // SAFETY: a non-null current() is the live fiber this code runs on.
    if fp.is_null() || unsafe { (*fp).kind } != Kind::Plain {
        return Err(PyRuntimeError::new_err(
            "fiber_suspend() called outside of a plain Fiber",
        ));
    }
    let v = value.unwrap_or_else(|| py.None());
    // SAFETY: fp == current(), GIL held, no error set.
    match unsafe { core::suspend(fp, Out::Yield(v)) } {
        In::Send(v) => Ok(v.into_bound(py).unbind()),
        In::Throw(e) => Err(e),
        In::Step(_) | In::Quit => Err(PyRuntimeError::new_err("internal error: bad message")),
    }
}

/// Python recursion depth of the running code (for tests).
#[pyfunction]
fn _fiber_py_depth() -> i32 {
    // SAFETY: reads the current thread state (GIL held in a pyfunction).
    unsafe { shim::tlf_py_depth(ffi::PyThreadState_Get()) }
}

/// C recursion budget left (3.12+, else -1; for tests).
#[pyfunction]
fn _fiber_c_remaining() -> i32 {
    // SAFETY: as above.
    unsafe { shim::tlf_c_remaining(ffi::PyThreadState_Get()) }
}

/// Approximate stack pointer of the caller (for stack-use measurements).
#[pyfunction]
fn _fiber_sp() -> usize {
    let x = 0u8;
    std::hint::black_box(&x) as *const u8 as usize
}

/// (C stack bytes in use at the caller, data-stack bytes in use, address of
/// the C stack top) on the current fiber, for memory measurements; None
/// outside fibers.
#[pyfunction]
fn _fiber_stack_use() -> Option<(usize, usize, usize)> {
    let fp = core::current();
    if fp.is_null() {
        return None;
    }
    let x = 0u8;
    let sp = std::hint::black_box(&x) as *const u8 as usize;
    // SAFETY: a non-null current() is the live fiber this code runs on; the
    // thread state read is the current one (GIL held in a pyfunction).
    unsafe {
        let (top, chunk) = (*fp).stack_addresses();
        let ds = shim::tlf_datastack_top(ffi::PyThreadState_Get()) as usize;
        let ds_used = if chunk != 0 && ds >= chunk {
            ds - chunk
        } else {
            0
        };
        Some((top.saturating_sub(sp), ds_used, top))
    }
}

/// Decommit this thread's cached fiber stacks (for memory measurements).
#[pyfunction]
fn _fiber_flush_cache() {
    stack::flush_thread_cache();
}

/// Fiber layer configuration and statistics.
#[pyfunction]
fn fiber_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let c = core::config();
    let g = stack::geometry();
    let s = core::pool_stats();
    d.set_item("python_version_hex", c.py_version)?;
    d.set_item("stack_size", c.stack_size)?;
    d.set_item("chunk_size", c.chunk_size)?;
    d.set_item("c_budget", c.c_budget)?;
    d.set_item("c_default", c.c_default)?;
    d.set_item("bytes_per_level", c.bytes_per_level)?;
    d.set_item("page_size", g.page)?;
    d.set_item("guard_budget", g.guard_budget)?;
    d.set_item("slabs", s.slabs)?;
    d.set_item("total_slots", s.total_slots)?;
    d.set_item("guarded_slots", s.guarded_slots)?;
    d.set_item("free_slots", s.free_slots)?;
    d.set_item("cached_slots", s.cached_slots)?;
    d.set_item("leaked_slots", s.leaked_slots)?;
    d.set_item("leaked_fibers", core::leaked_count())?;
    d.set_item("idle_runners", core::idle_runner_count())?;
    d.set_item("last_suspend_depth", core::last_suspend_depth())?;
    Ok(d)
}

/// tp_finalize (PEP 442): the cyclic GC unwinds a suspended fiber before it
/// clears anything.
unsafe extern "C" fn fiber_finalize(obj: *mut ffi::PyObject) {
    let py = Python::assume_attached();
    let saved = PyErr::take(py);
    with_obj::<PyFiber, _>(obj, |py, f| {
        let fp = f.fp();
        if (*fp).status == Status::Suspended {
            if let Some(e) = core::kill(py, fp, "a suspended Fiber") {
                e.write_unraisable(py, None);
            }
        }
    });
    if let Some(e) = saved {
        e.restore(py);
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFiber>()?;
    // SAFETY: GIL held; the heap type was just created and has no instance.
    unsafe {
        let tp = m.py().get_type::<PyFiber>().as_type_ptr();
        (*tp).tp_finalize = Some(fiber_finalize);
        ffi::PyType_Modified(tp);
    }
    // SAFETY: GIL held; fiber_suspend_raw is a METH_FASTCALL function.
    unsafe {
        add_raw_function(
            m,
            c"fiber_suspend",
            ffi::PyMethodDefPointer {
                PyCFunctionFast: fiber_suspend_raw,
            },
            ffi::METH_FASTCALL,
            c"fiber_suspend(value=None, /)\n--\n\nSuspend the current plain Fiber.",
        )?;
    }
    m.add_function(wrap_pyfunction!(fiber_info, m)?)?;
    m.add_function(wrap_pyfunction!(_fiber_py_depth, m)?)?;
    m.add_function(wrap_pyfunction!(_fiber_c_remaining, m)?)?;
    m.add_function(wrap_pyfunction!(_fiber_sp, m)?)?;
    m.add_function(wrap_pyfunction!(_fiber_flush_cache, m)?)?;
    m.add_function(wrap_pyfunction!(_fiber_stack_use, m)?)?;
    Ok(())
}
