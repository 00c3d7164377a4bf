//! Reusing the bytes object of the last `data_received`/`datagram_received`
//! call for the next read, when the callback kept no reference to it.
//!
//! Why: a read of 1 KiB makes a bytes object of 1057 bytes, above glibc's
//! per-thread cache (1032 bytes) and obmalloc's limit (512), so every read
//! paid a full `malloc` and `free` (callgrind, Protocol echo at 1 KiB: about
//! 800 instructions of 5,800 per request). Most protocols consume the data
//! and drop it (an echo writes it, asyncio's StreamReader copies it into its
//! bytearray, httptools parses it), so the object is free again when the
//! callback returns. A read goes into that object's room and on into the
//! loop's buffer (`read_into_spare`, one readv), so that data of about the
//! last read's size is not even copied: a 10 KiB Protocol echo copied 10 KiB
//! per request out of the loop's buffer before. Large reads (`read_into_room`) go straight into an
//! object with room for a whole read, the spare one when it has that room,
//! and a large object keeps its room while the data fills half of it: a
//! 100 KiB echo spent ~1,200 of ~6,000 instructions per request allocating,
//! shrinking and freeing one per read.
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

    /// Read into the spare's room and, past it, into `rest` (the loop's
    /// read buffer; one readv): when the data fits the room and fills at
    /// least half of it (as `make` allows), the spare is the object the
    /// callback gets, with no copy and no allocation. Otherwise the data is
    /// copied out into a new object and the spare stays the spare. `read`
    /// gets the room (empty when there is no spare) and the part of `rest`
    /// that keeps the whole read within `rest.len()`, and says how much it
    /// read (None: nothing).
    pub(crate) fn read_into_spare<'py, R>(
        &self,
        py: Python<'py>,
        rest: &mut [u8],
        read: impl FnOnce(&mut [u8], &mut [u8]) -> (R, Option<usize>),
    ) -> PyResult<(R, Option<Made<'py>>)> {
        let spare = if cfg!(Py_GIL_DISABLED) {
            None
        } else {
            self.spare
                .with(py, |s| s.take_if(|(_, cap)| *cap <= rest.len()))
        };
        let Some((obj, cap)) = spare else {
            let (r, got) = read(&mut [], rest);
            return Ok((r, got.map(|n| Made::new(PyBytes::new(py, &rest[..n])))));
        };
        let obj = obj.into_bound(py);
        // SAFETY: the spare is an exact bytes object allocated for `cap`
        // bytes whose one reference, ours, was the only one when it was
        // given back; nothing else could reach it since. This is the only
        // slice of it.
        let room = unsafe { room_of(&obj, cap) };
        let keep = rest.len() - cap;
        let (r, got) = read(room, &mut rest[..keep]);
        let made = match got {
            Some(n) if n <= cap && n.saturating_mul(2) >= cap => {
                set_len(&obj, n);
                return Ok((r, Some(Made { obj, cap })));
            }
            Some(n) if n <= cap => Some(Made::new(PyBytes::new(py, &room[..n]))),
            Some(n) => {
                let new = uninit_bytes(py, n)?;
                // SAFETY: a new object of `n` bytes, ours alone; the one slice of it.
                let whole = unsafe { room_of(&new, n) };
                whole[..cap].copy_from_slice(room);
                whole[cap..].copy_from_slice(&rest[..n - cap]);
                Some(Made::new(new))
            }
            None => None,
        };
        // The data went elsewhere (or nothing came): the spare stays the
        // spare, unseen by anyone.
        let old = self.spare.with(py, |s| s.replace((obj.unbind(), cap)));
        drop(old);
        Ok((r, made))
    }

    /// Read into a bytes object with room for `cap` bytes: the spare when it
    /// has exactly that room (the object of an earlier large read that
    /// nothing kept), else a new one; no copy and, with the spare, no
    /// allocation. `read` fills a prefix of the room and says how much (None:
    /// nothing was read; the spare stays the spare). The object keeps its
    /// room when the data fills at least half of it (as `make` allows), else
    /// it is shrunk to the data.
    pub(crate) fn read_into_room<'py, R>(
        &self,
        py: Python<'py>,
        cap: usize,
        read: impl FnOnce(&mut [u8]) -> (R, Option<usize>),
    ) -> PyResult<(R, Option<Made<'py>>)> {
        let spare = self.spare.with(py, |s| match s {
            Some((_, c)) if *c == cap => s.take(),
            _ => None,
        });
        let obj = match spare {
            Some((obj, _)) => obj.into_bound(py),
            None => uninit_bytes(py, cap)?,
        };
        // SAFETY: `obj` is an exact bytes object allocated for `cap` bytes
        // (plus CPython's NUL), ours alone (new, or the spare, whose
        // reference count was 1 when it was given back and which nothing
        // else can reach since); the one slice of it.
        let buf = unsafe { room_of(&obj, cap) };
        let (r, got) = read(buf);
        let Some(n) = got else {
            // Nothing read: keep the object as the spare for the next read.
            if !cfg!(Py_GIL_DISABLED) {
                let old = self.spare.with(py, |s| s.replace((obj.unbind(), cap)));
                drop(old);
            }
            return Ok((r, None));
        };
        let n = n.min(cap);
        if n.saturating_mul(2) >= cap {
            set_len(&obj, n);
            return Ok((r, Some(Made { obj, cap })));
        }
        Ok((r, Some(Made::new(shrink(obj, n)?))))
    }

    /// Drop the spare (the loop is closing).
    pub(crate) fn clear(&self, py: Python<'_>) {
        let old = self.spare.with(py, |s| s.take());
        drop(old);
    }
}

/// A new bytes object of `n` bytes whose contents are uninitialised: the
/// caller writes them, or cuts them off (`shrink`, `set_len`), before the
/// object is seen by anyone else.
pub(crate) fn uninit_bytes(py: Python<'_>, n: usize) -> PyResult<Bound<'_, PyBytes>> {
    use pyo3::ffi;
    // SAFETY: NULL data asks CPython for an object of `n` bytes left
    // uninitialised (the caller's contract above); the result is a new
    // reference to an exact bytes object, or NULL with an exception set.
    unsafe {
        let p = ffi::PyBytes_FromStringAndSize(std::ptr::null(), n as ffi::Py_ssize_t);
        Ok(Bound::from_owned_ptr_or_err(py, p)?.cast_into_unchecked::<PyBytes>())
    }
}

extern "C" {
    // Documented C API (Objects/bytesobject.c), not bound by pyo3-ffi.
    fn _PyBytes_Resize(
        bytes: *mut *mut pyo3::ffi::PyObject,
        newsize: pyo3::ffi::Py_ssize_t,
    ) -> std::ffi::c_int;
}

/// Cut `obj`, an exact bytes object whose only reference is this one (one
/// the loop made and filled), to its first `n` bytes, in place when the
/// allocator allows.
pub(crate) fn shrink(obj: Bound<'_, PyBytes>, n: usize) -> PyResult<Bound<'_, PyBytes>> {
    let py = obj.py();
    debug_assert!(only_ours(&obj));
    let mut p = obj.into_ptr();
    // SAFETY: `p` is the only reference to an exact bytes object (the
    // caller's contract), which _PyBytes_Resize requires (it checks the
    // reference count and fails cleanly otherwise); it replaces `p` with
    // the resized object, or releases it and sets NULL with an exception.
    if unsafe { _PyBytes_Resize(&mut p, n as pyo3::ffi::Py_ssize_t) } != 0 {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: on success `p` is a new reference to a bytes object.
    Ok(unsafe { Bound::from_owned_ptr(py, p).cast_into_unchecked::<PyBytes>() })
}

/// The `cap` bytes of room of `obj`, to write into.
///
/// # Safety
///
/// `obj` must be an exact bytes object allocated for at least `cap` bytes
/// (plus CPython's NUL) that is ours alone: new (`uninit_bytes`), or the
/// spare, whose reference count was 1 when it was given back and which
/// nothing else can reach since. The caller writes it only before anyone
/// else can see it, and ends with `set_len`/`shrink` or drops it. At most
/// one slice of an object is alive at a time.
#[allow(clippy::mut_from_ref)]
unsafe fn room_of<'a>(obj: &'a Bound<'_, PyBytes>, cap: usize) -> &'a mut [u8] {
    use pyo3::ffi;
    debug_assert!(only_ours(obj));
    // SAFETY: per the caller's contract no other code reads or writes these
    // bytes while the slice lives (nothing else holds a reference to the
    // object, the loop's thread holds the GIL, no other slice), and the allocation holds
    // `cap` bytes at ob_sval; the pointer is derived from the object
    // pointer, not from the one-element ob_sval array.
    unsafe {
        let sval = obj
            .as_ptr()
            .cast::<u8>()
            .add(std::mem::offset_of!(ffi::PyBytesObject, ob_sval));
        std::slice::from_raw_parts_mut(sval, cap)
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
    // `uninit_bytes` for a direct read, see `Made`) whose only
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
    }
    set_len(obj, data.len());
}

/// Make `obj`, which has a reference count of 1 (ours), allocated for at
/// least `n` bytes and holding the data in its first `n`, a bytes object of
/// those `n` bytes.
fn set_len(obj: &Bound<'_, PyBytes>, n: usize) {
    use pyo3::ffi;
    let p = obj.as_ptr();
    // SAFETY: as in `refill`: nothing else can observe the object; byte `n`
    // (the NUL CPython keeps after the data) is inside the allocation, and
    // the size and the hash cache are reset as CPython's _PyBytes_Resize does.
    unsafe {
        let sval = p
            .cast::<u8>()
            .add(std::mem::offset_of!(ffi::PyBytesObject, ob_sval));
        *sval.add(n) = 0;
        let b = p.cast::<ffi::PyBytesObject>();
        (*b).ob_base.ob_size = n as ffi::Py_ssize_t;
        #[allow(deprecated)]
        {
            (*b).ob_shash = -1;
        }
    }
}
