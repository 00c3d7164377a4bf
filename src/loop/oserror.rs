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

/// An io::Error as CPython would raise it: from its errno when it has one
/// (the errno-specific OSError subclass with `errno` set), otherwise as
/// pyo3 converts it.
pub(crate) fn from_io(py: Python<'_>, e: std::io::Error) -> PyErr {
    match e.raw_os_error() {
        Some(errno) => from_errno(py, errno),
        None => PyErr::from(e),
    }
}
