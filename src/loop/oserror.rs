//! OSError exceptions exactly as CPython's socket and os modules raise
//! them (the errno-specific subclass, `errno` and `strerror` set).

use pyo3::ffi;
use pyo3::prelude::*;

/// The exception CPython would raise for `errno` (PyErr_SetFromErrno).
pub(crate) fn from_errno(py: Python<'_>, errno: i32) -> PyErr {
    // SAFETY: __errno_location is this thread's errno; PyErr_SetFromErrno
    // reads it and sets the exception, which we take back at once (the GIL
    // is held: we have `py`).
    unsafe {
        *libc::__errno_location() = errno;
        ffi::PyErr_SetFromErrno(ffi::PyExc_OSError);
    }
    PyErr::fetch(py)
}
