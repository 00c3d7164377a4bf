//! call_soon, call_soon_threadsafe, call_later and call_at as raw
//! METH_FASTCALL|METH_KEYWORDS methods of LoopCore.
//!
//! These four are the hottest entry points of the loop (asyncio's own
//! futures and tasks call call_soon for every wake-up). Written against the
//! C API, they take their arguments straight from the vectorcall array: no
//! argument tuple is built, and a callback's one argument is kept as is.

use std::os::raw::c_char;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

use pyo3::exceptions::{PySystemError, PyTypeError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyString;

use super::core::LoopCore;
use super::handle::Args;

/// Parsed `(fixed..., callback, *args, context=None)`.
struct Parsed<'py> {
    fixed: Option<Bound<'py, PyAny>>,
    callback: Bound<'py, PyAny>,
    args: &'py [*mut ffi::PyObject],
    context: Option<Bound<'py, PyAny>>,
}

/// # Safety
/// `args`/`nargsf`/`kwnames` must be a vectorcall argument vector as
/// CPython passes it to a METH_FASTCALL|METH_KEYWORDS function.
unsafe fn parse<'py>(
    py: Python<'py>,
    name: &str,
    with_fixed: Option<&str>,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> PyResult<Parsed<'py>> {
    let nargs = ffi::PyVectorcall_NARGS(nargsf as usize) as usize;
    let nkw = if kwnames.is_null() {
        0
    } else {
        // SAFETY: kwnames is a tuple when not NULL (vectorcall protocol).
        unsafe { ffi::PyTuple_GET_SIZE(kwnames) as usize }
    };
    // SAFETY: the vector holds nargs positional then nkw keyword values.
    let all: &'py [*mut ffi::PyObject] = if nargs + nkw == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(args, nargs + nkw) }
    };
    let need = if with_fixed.is_some() { 2 } else { 1 };
    if nargs < need {
        let missing = if nargs == 0 {
            with_fixed.unwrap_or("callback")
        } else {
            "callback"
        };
        return Err(PyTypeError::new_err(format!(
            "{name}() missing required positional argument: '{missing}'"
        )));
    }
    let mut context = None;
    if nkw == 1 && kwnames == CONTEXT_KWNAMES.load(Ordering::Acquire) {
        // SAFETY: the value of the one keyword follows the positionals and
        // is a borrowed reference valid for the call.
        context = Some(unsafe { Bound::from_borrowed_ptr(py, all[nargs]) });
    }
    for i in 0..nkw * usize::from(context.is_none()) {
        // SAFETY: items of the kwnames tuple are str; values follow the positionals.
        let key = unsafe { Bound::from_borrowed_ptr(py, ffi::PyTuple_GET_ITEM(kwnames, i as _)) };
        // Callers that pass the interned name (any Python call site with
        // `context=`, asyncio's C tasks and futures on some versions) match
        // by identity; anything else is compared by value, and a C caller's
        // `("context",)` tuple is remembered (see CONTEXT_KWNAMES).
        let interned = key.is(pyo3::intern!(py, "context"));
        let key_is_context = interned || key.cast::<PyString>()?.to_str()? == "context";
        if key_is_context {
            if nkw == 1 && !interned {
                remember_context_kwnames(kwnames);
            }
            // SAFETY: the value of keyword i follows the positionals and is
            // a borrowed reference valid for the call.
            context = Some(unsafe { Bound::from_borrowed_ptr(py, all[nargs + i]) });
        } else {
            return Err(PyTypeError::new_err(format!(
                "{name}() got an unexpected keyword argument '{}'",
                key.cast::<PyString>()?.to_str()?
            )));
        }
    }
    // SAFETY: positional items are valid borrowed references.
    let mut pos = all[..nargs]
        .iter()
        .map(|&p| unsafe { Bound::from_borrowed_ptr(py, p) });
    let fixed = if with_fixed.is_some() {
        pos.next()
    } else {
        None
    };
    let callback = pos.next().expect("checked above");
    Ok(Parsed {
        fixed,
        callback,
        args: &all[need..nargs],
        context,
    })
}

/// The first `("context",)` keyword-names tuple seen whose string is not the
/// interned one: asyncio's C futures and tasks pass the same such tuple on
/// every call (3.12 builds it once per module state), which is then matched
/// by one pointer comparison instead of a text comparison.
static CONTEXT_KWNAMES: AtomicPtr<ffi::PyObject> = AtomicPtr::new(std::ptr::null_mut());

/// Remember `kwnames` (a tuple whose one item is the text "context") if no
/// tuple is remembered yet. The reference taken is never released: one
/// small tuple, kept alive so that the pointer can never name another
/// object.
fn remember_context_kwnames(kwnames: *mut ffi::PyObject) {
    if !CONTEXT_KWNAMES.load(Ordering::Relaxed).is_null() {
        return;
    }
    if CONTEXT_KWNAMES
        .compare_exchange(
            std::ptr::null_mut(),
            kwnames,
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
    {
        // SAFETY: kwnames is a live tuple (the call's keyword names), and
        // the caller is attached; the new reference is the cache's.
        unsafe { ffi::Py_INCREF(kwnames) };
    }
}

/// Run `f` with the token of the thread CPython called a C slot or method
/// of ours on. CPython only calls them attached, also while it finalizes:
/// a `__del__` run by the last collection that cancels a handle or calls
/// `call_soon_threadsafe()` (aiodns' resolver does) comes when
/// `Py_IsInitialized()` is already false, where `Python::attach` panics, and
/// a panic there aborts the process.
pub(crate) fn in_c_slot<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
    // SAFETY: reads a flag of the runtime, valid at any time.
    if unsafe { ffi::Py_IsInitialized() } != 0 {
        Python::attach(f)
    } else {
        // SAFETY: the caller is a C slot or method CPython called, which it
        // does only with this thread attached.
        f(unsafe { Python::assume_attached() })
    }
}

/// Run `f` as the body of a C method: with the thread attached (pyo3's
/// accounting of it included), errors set as the Python exception, panics
/// turned into exceptions instead of unwinding into C.
fn trampoline(f: impl FnOnce(Python<'_>) -> PyResult<*mut ffi::PyObject>) -> *mut ffi::PyObject {
    in_c_slot(
        |py| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(py))) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                e.restore(py);
                std::ptr::null_mut()
            }
            Err(_) => {
                PySystemError::new_err("tokioloop: internal error (panic) in a loop method")
                    .restore(py);
                std::ptr::null_mut()
            }
        },
    )
}

/// # Safety
/// Called by CPython with `slf` an instance of LoopCore (the descriptor is
/// installed on that type) and a valid vectorcall argument vector.
unsafe fn with_loop<'py>(
    py: Python<'py>,
    slf: *mut ffi::PyObject,
) -> PyResult<Bound<'py, LoopCore>> {
    // SAFETY: `slf` is a borrowed reference to the bound instance, and the
    // method descriptor has checked that it is a LoopCore (or subclass).
    let obj = unsafe { Bound::from_borrowed_ptr(py, slf) };
    // SAFETY: as just said, the type is right.
    Ok(unsafe { obj.cast_into_unchecked::<LoopCore>() })
}

unsafe extern "C" fn call_soon(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: see `with_loop` and `parse`: CPython's calling convention.
        let lp = unsafe { with_loop(py, slf)? };
        let p = unsafe { parse(py, "call_soon", None, args, nargsf, kwnames)? };
        let a = unsafe { Args::from_slice(py, p.args)? };
        let h = LoopCore::schedule_soon(&lp, &p.callback, a, p.context.as_ref(), false)?;
        Ok(h.into_ptr())
    })
}

unsafe extern "C" fn call_soon_threadsafe(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: as in call_soon.
        let lp = unsafe { with_loop(py, slf)? };
        let p = unsafe { parse(py, "call_soon_threadsafe", None, args, nargsf, kwnames)? };
        let a = unsafe { Args::from_slice(py, p.args)? };
        let h = LoopCore::schedule_soon(&lp, &p.callback, a, p.context.as_ref(), true)?;
        Ok(h.into_ptr())
    })
}

unsafe extern "C" fn call_later(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: as in call_soon.
        let lp = unsafe { with_loop(py, slf)? };
        let p = unsafe { parse(py, "call_later", Some("delay"), args, nargsf, kwnames)? };
        let when = LoopCore::deadline_after(&lp, p.fixed.as_ref().expect("parsed"))?;
        let a = unsafe { Args::from_slice(py, p.args)? };
        let h = LoopCore::schedule_at(
            &lp,
            when,
            None,
            &p.callback,
            a,
            p.context.as_ref(),
            "call_later",
        )?;
        Ok(h.into_ptr())
    })
}

unsafe extern "C" fn call_at(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargsf: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    trampoline(|py| {
        // SAFETY: as in call_soon.
        let lp = unsafe { with_loop(py, slf)? };
        let p = unsafe { parse(py, "call_at", Some("when"), args, nargsf, kwnames)? };
        let given = p.fixed.as_ref().expect("parsed");
        let when = LoopCore::deadline_at(given)?;
        let a = unsafe { Args::from_slice(py, p.args)? };
        let h = LoopCore::schedule_at(
            &lp,
            when,
            Some(given),
            &p.callback,
            a,
            p.context.as_ref(),
            "call_at",
        )?;
        Ok(h.into_ptr())
    })
}

struct Defs([ffi::PyMethodDef; 4]);
// SAFETY: the method table is immutable after construction and only read
// by CPython; its pointers refer to 'static strings and functions.
unsafe impl Send for Defs {}
// SAFETY: as above.
unsafe impl Sync for Defs {}

fn def(
    name: &'static [u8],
    f: ffi::PyCFunctionFastWithKeywords,
    doc: &'static [u8],
) -> ffi::PyMethodDef {
    ffi::PyMethodDef {
        ml_name: name.as_ptr() as *const c_char,
        ml_meth: ffi::PyMethodDefPointer {
            PyCFunctionFastWithKeywords: f,
        },
        ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
        ml_doc: doc.as_ptr() as *const c_char,
    }
}

static DEFS: OnceLock<Defs> = OnceLock::new();

/// Install the four methods on LoopCore (called once, at module init).
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    let defs = DEFS.get_or_init(|| {
        Defs([
            def(b"call_soon\0", call_soon, b"call_soon(callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called soon.\0"),
            def(b"call_soon_threadsafe\0", call_soon_threadsafe, b"call_soon_threadsafe(callback, *args, context=None)\n--\n\nLike call_soon(), from any thread.\0"),
            def(b"call_later\0", call_later, b"call_later(delay, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called after delay seconds.\0"),
            def(b"call_at\0", call_at, b"call_at(when, callback, *args, context=None)\n--\n\nArrange for callback(*args) to be called at loop time `when`.\0"),
        ])
    });
    let ty = py.get_type::<LoopCore>();
    for d in defs.0.iter() {
        // SAFETY: `d` lives for the program ('static OnceLock); the type is
        // a live heap type; PyDescr_NewMethod returns a new reference or
        // NULL with an exception.
        let descr = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyDescr_NewMethod(ty.as_ptr().cast(), d as *const ffi::PyMethodDef as *mut _),
            )?
        };
        // SAFETY: ml_name is a NUL-terminated static string.
        let name = unsafe { std::ffi::CStr::from_ptr(d.ml_name) }
            .to_str()
            .expect("ascii");
        ty.setattr(name, descr)?;
    }
    Ok(())
}
