//! Calls of loop callbacks that survive CPython ending a daemon thread at
//! interpreter exit.
//!
//! Python 3.10-3.13 end a thread that wants the GIL back during
//! finalization (for instance at the eval loop's periodic hand-over, inside
//! a callback's Python code) with `pthread_exit()`, a forced unwind. Out of a
//! function declared `extern "C"` that unwind is undefined behaviour, and
//! the first Rust frame with cleanups or a catch on its way aborts the
//! process (pyo3's trampolines: "FATAL: exception not rethrown", SIGABRT).
//! Declared "C-unwind" and guarded the way pyo3 guards its own GIL
//! re-acquisition, the unwind stops in the guard's destructor, which parks
//! the thread for good: what Python 3.14 does with such threads. Task steps
//! and other handle callbacks (handle.rs) are called through here. (Code
//! running on a fiber is not covered: gdb shows the unwind failing from the
//! fiber's stack before it reaches any guard.)

use std::ptr;

use pyo3::ffi;

// The same libpython functions pyo3-ffi declares "C" (an extension links no
// libpython: they are resolved from the interpreter when it is loaded).
extern "C-unwind" {
    /// PyObject_Vectorcall, exported from 3.11 on; 3.10 only inlines it, so
    /// there PyObject_VectorcallDict, the same call with a (null) kwargs dict.
    #[cfg_attr(Py_3_11, link_name = "PyObject_Vectorcall")]
    #[cfg_attr(not(Py_3_11), link_name = "PyObject_VectorcallDict")]
    fn vectorcall_raw(
        callable: *mut ffi::PyObject,
        args: *const *mut ffi::PyObject,
        nargsf: usize,
        kwnames_or_dict: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
    #[link_name = "PyObject_Call"]
    fn object_call(
        callable: *mut ffi::PyObject,
        args: *mut ffi::PyObject,
        kwargs: *mut ffi::PyObject,
    ) -> *mut ffi::PyObject;
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

/// Runs `call` (a "C-unwind" call into Python) under the guard.
#[inline(always)]
fn guarded<R>(call: impl FnOnce() -> R) -> R {
    let guard = ParkThread;
    let r = call();
    std::mem::forget(guard);
    r
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
    // SAFETY: the caller's contract; a null kwnames/kwargs is "none".
    guarded(|| unsafe { vectorcall_raw(func, args, n, ptr::null_mut()) })
}

/// `callable(*args)`.
///
/// # Safety
/// GIL held; `func` live, `args` a live tuple.
#[inline]
pub(crate) unsafe fn call(
    func: *mut ffi::PyObject,
    args: *mut ffi::PyObject,
) -> *mut ffi::PyObject {
    // SAFETY: the caller's contract; a null kwargs is "none".
    guarded(|| unsafe { object_call(func, args, ptr::null_mut()) })
}
