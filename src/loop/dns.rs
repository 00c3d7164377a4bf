//! getaddrinfo/getnameinfo off the loop thread, on the loop's Tokio
//! blocking pool. The lookup itself is the socket module's (so hosts, ports,
//! flags and results are exactly what socket.getaddrinfo gives); the result
//! comes back to the loop through its thread-safe queue.

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::core::LoopCore;
use super::job::Job;
use super::pyobjs;

type Lookup = for<'py> fn(Python<'py>) -> PyResult<Bound<'py, PyAny>>;

pub(crate) fn resolve(py: Python<'_>, fut: Py<PyAny>, res: PyResult<Py<PyAny>>) -> PyResult<()> {
    let fut = fut.bind(py);
    if fut.call_method0(pyo3::intern!(py, "done"))?.is_truthy()? {
        return Ok(());
    }
    match res {
        Ok(v) => fut.call_method1(pyo3::intern!(py, "set_result"), (v,))?,
        Err(e) => fut.call_method1(pyo3::intern!(py, "set_exception"), (e.value(py),))?,
    };
    Ok(())
}

impl LoopCore {
    fn run_blocking<'py>(
        slf: &Bound<'py, Self>,
        func: Lookup,
        args: Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        let fut = slf.call_method0(pyo3::intern!(py, "create_future"))?;
        let lp: Py<LoopCore> = slf.clone().unbind();
        let fut_ret = fut.clone();
        let fut = fut.unbind();
        let args = args.unbind();
        let spawned = slf.get().driver.spawn_blocking(move || {
            Python::attach(|py| {
                let res = func(py)
                    .and_then(|f| f.call1(args.bind(py)))
                    .map(Bound::unbind);
                let job = Job::Resolve(fut, res);
                lp.get().push_threadsafe(py, job);
            })
        });
        if !spawned {
            return Err(PyRuntimeError::new_err("Event loop is closed"));
        }
        Ok(fut_ret)
    }
}

#[pymethods]
impl LoopCore {
    /// socket.getaddrinfo(*args) on the blocking pool; returns a future.
    #[pyo3(signature = (*args))]
    fn _getaddrinfo_native<'py>(
        slf: &Bound<'py, Self>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::run_blocking(slf, pyobjs::socket_getaddrinfo, args.clone())
    }

    /// socket.getnameinfo(*args) on the blocking pool; returns a future.
    #[pyo3(signature = (*args))]
    fn _getnameinfo_native<'py>(
        slf: &Bound<'py, Self>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Self::run_blocking(slf, pyobjs::socket_getnameinfo, args.clone())
    }
}
