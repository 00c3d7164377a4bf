//! `GilCell`: interior mutability for state that is only touched with the
//! interpreter attached, cheaper than a mutex on the hot paths.
//!
//! On GIL builds it is a RefCell that is `Sync` because every access takes a
//! `Python<'_>` token (the GIL is held) and runs a closure that must not run
//! Python code or release the GIL: nothing else can touch the cell while
//! the closure runs. Re-entrant access (a closure that, against that rule,
//! ends up back here) panics instead of aliasing. On free-threaded builds,
//! where a `Python` token does not exclude other threads, it is a Mutex.

#[cfg(not(Py_GIL_DISABLED))]
pub(crate) struct GilCell<T>(std::cell::RefCell<T>);

// SAFETY: see the module comment: all access is serialised by the GIL (the
// `Python` token proves it is held) and closures never release it.
#[cfg(not(Py_GIL_DISABLED))]
unsafe impl<T: Send> Sync for GilCell<T> {}

#[cfg(not(Py_GIL_DISABLED))]
impl<T> GilCell<T> {
    pub(crate) const fn new(v: T) -> Self {
        GilCell(std::cell::RefCell::new(v))
    }

    /// Run `f` on the contents. `f` must not run Python code (no calls, no
    /// allocation of Python objects, no dropping of Python references).
    #[inline]
    pub(crate) fn with<R>(&self, _py: pyo3::Python<'_>, f: impl FnOnce(&mut T) -> R) -> R {
        let mut g = self
            .0
            .try_borrow_mut()
            .expect("tokioloop: re-entrant access to loop state (a bug)");
        f(&mut g)
    }

    /// For tp_traverse/tp_clear, which run under the GIL but without a token:
    /// None if the cell is in use (then the caller skips it).
    #[inline]
    pub(crate) fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.0.try_borrow_mut().ok().map(|mut g| f(&mut g))
    }
}

#[cfg(Py_GIL_DISABLED)]
pub(crate) struct GilCell<T>(std::sync::Mutex<T>);

#[cfg(Py_GIL_DISABLED)]
impl<T> GilCell<T> {
    pub(crate) const fn new(v: T) -> Self {
        GilCell(std::sync::Mutex::new(v))
    }

    #[inline]
    pub(crate) fn with<R>(&self, _py: pyo3::Python<'_>, f: impl FnOnce(&mut T) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    #[inline]
    pub(crate) fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        self.0.try_lock().ok().map(|mut g| f(&mut g))
    }
}
