//! Calls into Python that survive CPython ending a daemon thread at
//! interpreter exit.
//!
//! Python 3.10-3.13 end a thread that wants the GIL back during
//! finalization (for instance at the eval loop's periodic hand-over, inside
//! a callback's Python code) with `pthread_exit()`, a forced unwind. Out of a
//! function declared `extern "C"` that unwind is undefined behaviour, and
//! the first Rust frame with cleanups or a catch on its way aborts the
//! process (pyo3's trampolines, a fiber's entry: "FATAL: exception not
//! rethrown", SIGABRT). Declared "C-unwind" and guarded the way pyo3 guards
//! its own GIL re-acquisition, the unwind stops in the guard's destructor,
//! which parks the thread for good: what Python 3.14 does with such
//! threads. Task steps and other callbacks (handle.rs) and the code of
//! fibers (fiber/core.rs) are called through here.

use std::ptr;

use pyo3::ffi;

// The same libpython functions pyo3-ffi declares "C" (an extension links no
// libpython: they are resolved from the interpreter when it is loaded).
extern "C-unwind" {
    // 3.11+ export PyObject_Vectorcall itself (3.10 only inlines it).
    #[cfg(Py_3_11)]
    #[link_name = "PyObject_Vectorcall"]
    fn vectorcall_raw(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    #[cfg(not(Py_3_11))]
    #[link_name = "PyObject_VectorcallDict"]
    fn vectorcall_raw(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwdict: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    #[link_name = "PyObject_Call"]
    fn object_call(
        callable: *mut ffi::PyObject,
        args: *mut ffi::PyObject,
        kwargs: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    #[link_name = "PyIter_Send"]
    fn iter_send_raw(
        iter: *mut ffi::PyObject,
        arg: *mut ffi::PyObject,
        presult: *mut *mut ffi::PyObject,
    ) -> ffi::PySendResult;
}

/// Dropped only by a forced unwind out of the call it guards (a Rust panic
/// cannot come out of C code): parks the thread, which must not run again.
struct ParkThread;

impl Drop for ParkThread {
    fn drop(&mut self) {
        loop {
            // SAFETY: pause() only waits for a signal.
            unsafe {
                libc::pause();
            }
        }
    }
}

/// `callable(*args[:n])`.
///
/// # Safety
/// GIL held; `func` live; `args` points to `n` live references, or is null
/// with `n == 0`.
#[inline]
pub(crate) unsafe fn vectorcall(
    func: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    n: usize,
) -> *mut ffi::PyObject {
    let guard = ParkThread;
    let r = vectorcall_raw(func, args, n, ptr::null_mut());
    std::mem::forget(guard);
    r
}

/// `callable(*args, **kwargs)`.
///
/// # Safety
/// GIL held; `func` live, `args` a live tuple, `kwargs` a live dict or null.
#[inline]
pub(crate) unsafe fn call(
    func: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
    kwargs: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    let guard = ParkThread;
    let r = object_call(func, args, kwargs);
    std::mem::forget(guard);
    r
}

/// `PyIter_Send(it, v, &result)`.
///
/// # Safety
/// GIL held; `it` and `v` live; `result` writable.
#[inline]
pub(crate) unsafe fn iter_send(
    it: *mut ffi::PyObject,
    v: *mut ffi::PyObject,
    result: *mut *mut ffi::PyObject,
) -> ffi::PySendResult {
    let guard = ParkThread;
    let r = iter_send_raw(it, v, result);
    std::mem::forget(guard);
    r
}
