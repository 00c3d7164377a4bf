//! Fibers: CPython code on corosensei stacks (issue 3 fills this in).
use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
