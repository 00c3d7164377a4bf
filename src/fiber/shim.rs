//! FFI to csrc/fiber_shim.c, the per-version interpreter-state swap, plus a
//! heap block type that owns one `tlf_state`.
//!
//! `PyThreadState` is opaque in pyo3-ffi, and its layout changes with every
//! minor version and with debug/free-threaded builds, so the fields are only
//! touched from C compiled against the target interpreter's headers
//! (build.rs).
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;

use pyo3::ffi;

/// Opaque `tlf_state` (see the C file for its fields).
#[repr(C)]
pub(crate) struct RawState {
    _opaque: [u8; 0],
}

extern "C" {
    fn tlf_state_size() -> usize;
    fn tlf_state_align() -> usize;
    pub(crate) fn tlf_py_version_hex() -> c_int;
    pub(crate) fn tlf_c_recursion_default() -> c_int;
    pub(crate) fn tlf_is_finalizing() -> c_int;
    fn tlf_state_init(
        s: *mut RawState,
        ts: *mut ffi::PyThreadState,
        context: *mut ffi::PyObject,
        c_budget: c_int,
        chunk: *mut c_void,
        chunk_size: usize,
    );
    pub(crate) fn tlf_switch_in(
        ts: *mut ffi::PyThreadState,
        resumer: *mut RawState,
        fiber: *mut RawState,
        link_exc: c_int,
    );
    pub(crate) fn tlf_switch_out(
        ts: *mut ffi::PyThreadState,
        fiber: *mut RawState,
        resumer: *mut RawState,
    );
    fn tlf_state_finish(s: *mut RawState);
    fn tlf_state_refs(s: *mut RawState, out: *mut *mut ffi::PyObject) -> c_int;
    fn tlf_state_is_idle(s: *mut RawState) -> c_int;
    pub(crate) fn tlf_context_ensure(ts: *mut ffi::PyThreadState) -> c_int;
    pub(crate) fn tlf_py_depth(ts: *mut ffi::PyThreadState) -> c_int;
    pub(crate) fn tlf_c_remaining(ts: *mut ffi::PyThreadState) -> c_int;
    pub(crate) fn tlf_set_c_remaining(ts: *mut ffi::PyThreadState, v: c_int);
    pub(crate) fn tlf_datastack_top(ts: *mut ffi::PyThreadState) -> *mut c_void;
    fn tlf_state_top_frame(s: *mut RawState, ts: *mut ffi::PyThreadState) -> *mut ffi::PyObject;
}

/// Size of the on-stack buffer a resumer saves its own state into while a
/// fiber runs. Checked against the real size at module init.
pub(crate) const RESUMER_STATE_WORDS: usize = 64;

/// Storage for the resumer's state during a switch: lives on the resumer's
/// own stack for exactly one `resume()` call (switches are asymmetric, so
/// resumer states nest LIFO).
/// Uninitialised: `tlf_switch_in` writes every field `tlf_switch_out` reads.
#[repr(C, align(16))]
pub(crate) struct ResumerState(std::mem::MaybeUninit<[u64; RESUMER_STATE_WORDS]>);

impl ResumerState {
    #[inline]
    pub(crate) fn new() -> Self {
        ResumerState(std::mem::MaybeUninit::uninit())
    }
    #[inline]
    pub(crate) fn as_raw(&mut self) -> *mut RawState {
        self.0.as_mut_ptr().cast()
    }
}

/// Checks at module init that the C block fits the Rust-side buffers.
pub(crate) fn check_layout() -> Result<(), String> {
    // SAFETY: pure functions returning compile-time constants.
    let (size, align) = unsafe { (tlf_state_size(), tlf_state_align()) };
    if size > RESUMER_STATE_WORDS * 8 || align > 16 {
        return Err(format!(
            "fiber state block is {size} bytes (align {align}); the build supports at most {} bytes",
            RESUMER_STATE_WORDS * 8
        ));
    }
    Ok(())
}

/// A fiber's own state block (heap, stable address: the C block contains the
/// fiber's root CFrame, which the fiber's eval loops link to by address).
pub(crate) struct StateBlock(NonNull<u8>);

fn state_layout() -> std::alloc::Layout {
    // SAFETY: pure function returning a compile-time constant.
    let size = unsafe { tlf_state_size() };
    std::alloc::Layout::from_size_align(size, 16).expect("state block layout")
}

impl StateBlock {
    pub(crate) fn new() -> Self {
        let layout = state_layout();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        match NonNull::new(p) {
            Some(p) => StateBlock(p),
            None => std::alloc::handle_alloc_error(layout),
        }
    }

    pub(crate) fn raw(&self) -> *mut RawState {
        self.0.as_ptr().cast()
    }

    /// # Safety
    /// GIL held; `ts` is the current thread state; `context` is an owned
    /// reference or null; `chunk` is null or points to `chunk_size` writable
    /// bytes that outlive the fiber.
    pub(crate) unsafe fn init(
        &mut self,
        ts: *mut ffi::PyThreadState,
        context: *mut ffi::PyObject,
        c_budget: i32,
        chunk: *mut u8,
        chunk_size: usize,
    ) {
        tlf_state_init(self.raw(), ts, context, c_budget, chunk.cast(), chunk_size);
    }

    /// # Safety
    /// GIL held, the block is switched out and its fiber has finished.
    pub(crate) unsafe fn finish(&mut self) {
        tlf_state_finish(self.raw());
    }

    /// The strong references the (switched-out) block holds.
    ///
    /// # Safety
    /// GIL held, block switched out.
    pub(crate) unsafe fn refs(&self) -> ([*mut ffi::PyObject; 4], usize) {
        let mut out = [std::ptr::null_mut(); 4];
        let n = tlf_state_refs(self.raw(), out.as_mut_ptr());
        (out, n as usize)
    }

    /// # Safety
    /// Block switched out.
    pub(crate) unsafe fn is_idle(&self) -> bool {
        tlf_state_is_idle(self.raw()) != 0
    }

    /// # Safety
    /// GIL held, `ts` current, block switched out (fiber suspended).
    pub(crate) unsafe fn top_frame(&self, ts: *mut ffi::PyThreadState) -> *mut ffi::PyObject {
        tlf_state_top_frame(self.raw(), ts)
    }
}

impl Drop for StateBlock {
    fn drop(&mut self) {
        // SAFETY: allocated by Box::new in `new` with this exact type.
        unsafe {
            drop(Box::from_raw(
                self.0.as_ptr().cast::<[u64; RESUMER_STATE_WORDS]>(),
            ))
        }
    }
}
