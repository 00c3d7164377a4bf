//! Reusing the bytes object of the last `data_received`/`datagram_received`
//! call for the next read, when the callback kept no reference to it.
//!
//! Why: a read of 1 KiB makes a bytes object of 1057 bytes, above glibc's
//! per-thread cache (1032 bytes) and obmalloc's limit (512), so every read
//! paid a full `malloc` and `free` (callgrind, Protocol echo at 1 KiB: about
//! 800 instructions of 5,800 per request). Most protocols consume the data
//! and drop it (an echo writes it, asyncio's StreamReader copies it into its
//! bytearray, httptools parses it), so the object is free again when the
//! callback returns.
//!
//! Sound because a bytes object is only refilled when its reference count is
//! 1 and that one reference is ours: nothing else (a list, a memoryview, a
//! buffer export, a frame) can see it change. The refill writes within the
//! object's original allocation (`cap` bytes of data plus the NUL CPython
//! keeps after them), sets the new size and clears the cached hash, exactly
//! as CPython's own resizing of an unshared bytes object does.
//! Free-threaded builds do not recycle: there a reference count of 1 read
//! by one thread does not exclude another thread's borrowed use.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::cell::GilCell;

/// A bytes object that the loop made and may refill, with its capacity
/// (the size it was allocated with).
pub(crate) struct Made<'py> {
    pub(crate) obj: Bound<'py, PyBytes>,
    cap: usize,
}

impl<'py> Made<'py> {
    /// A bytes object made elsewhere by the loop (its capacity is its size).
    pub(crate) fn new(obj: Bound<'py, PyBytes>) -> Self {
        let cap = obj.as_bytes().len();
        Made { obj, cap }
    }
}

pub(crate) struct BytesRecycler {
    spare: GilCell<Option<(Py<PyBytes>, usize)>>,
}

impl BytesRecycler {
    pub(crate) const fn new() -> Self {
        BytesRecycler {
            spare: GilCell::new(None),
        }
    }

    /// A bytes object holding `data`: the spare one refilled when its
    /// capacity fits (at most twice what is asked, so that a kept object
    /// never holds much more memory than its data), else a new one.
    pub(crate) fn make<'py>(&self, py: Python<'py>, data: &[u8]) -> Made<'py> {
        let n = data.len();
        if let Some((obj, cap)) = self.spare.with(py, |s| match s {
            Some((_, cap)) if n <= *cap && n.saturating_mul(2) >= *cap => s.take(),
            _ => None,
        }) {
            let obj = obj.into_bound(py);
            refill(&obj, data);
            return Made { obj, cap };
        }
        Made {
            obj: PyBytes::new(py, data),
            cap: n,
        }
    }

    /// Give back an object from `make` once the callback it was passed to
    /// has returned: it becomes the spare if nothing else refers to it.
    pub(crate) fn give_back(&self, py: Python<'_>, made: Made<'_>) {
        if cfg!(Py_GIL_DISABLED) || !only_ours(&made.obj) {
            return;
        }
        let old = self
            .spare
            .with(py, |s| s.replace((made.obj.unbind(), made.cap)));
        // Dropped outside the cell: a decref may run Python code.
        drop(old);
    }

    /// Drop the spare (the loop is closing).
    pub(crate) fn clear(&self, py: Python<'_>) {
        let old = self.spare.with(py, |s| s.take());
        drop(old);
    }
}

/// Whether `obj` (a reference the caller holds) is its only reference.
fn only_ours(obj: &Bound<'_, PyBytes>) -> bool {
    // SAFETY: `obj` is a live object (the caller holds a reference).
    unsafe { pyo3::ffi::Py_REFCNT(obj.as_ptr()) == 1 }
}

/// Write `data` into `obj`, which has a reference count of 1 (ours) and was
/// allocated for at least `data.len()` bytes.
fn refill(obj: &Bound<'_, PyBytes>, data: &[u8]) {
    use pyo3::ffi;
    let p = obj.as_ptr();
    debug_assert!(only_ours(obj));
    // SAFETY: `p` is an exact bytes object made by the loop (PyBytes::new or
    // the bytes writer of a direct read, see `Made`) whose only
    // reference is `obj`, held by the loop's thread with the GIL, so no other
    // code can observe the change. Its allocation holds the header plus
    // `cap` >= data.len() bytes plus a NUL (CPython allocates
    // offsetof(ob_sval) + size + 1), so writing data.len() + 1 bytes at
    // ob_sval stays inside it; the pointer is derived from the object
    // pointer, not from the one-element ob_sval array. The size is set
    // before anyone reads the object again and the hash cache is reset, as
    // CPython's _PyBytes_Resize does.
    unsafe {
        let base = p.cast::<u8>();
        let sval = base.add(std::mem::offset_of!(ffi::PyBytesObject, ob_sval));
        std::ptr::copy_nonoverlapping(data.as_ptr(), sval, data.len());
        *sval.add(data.len()) = 0;
        let b = p.cast::<ffi::PyBytesObject>();
        (*b).ob_base.ob_size = data.len() as ffi::Py_ssize_t;
        #[allow(deprecated)]
        {
            (*b).ob_shash = -1;
        }
    }
}
