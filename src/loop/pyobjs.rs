//! Python objects the native loop needs, imported once per interpreter.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

macro_rules! cached_attr {
    ($fn_name:ident, $module:expr, $attr:expr) => {
        pub(crate) fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
            static CELL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            CELL.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
                Ok(py.import($module)?.getattr($attr)?.unbind())
            })
            .map(|v| v.bind(py))
        }
    };
}

macro_rules! cached_module {
    ($fn_name:ident, $module:expr) => {
        pub(crate) fn $fn_name(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
            static CELL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            CELL.get_or_try_init(py, || -> PyResult<Py<PyAny>> {
                Ok(py.import($module)?.into_any().unbind())
            })
            .map(|v| v.bind(py))
        }
    };
}

// The C Future and Task (as uvloop, they are looked up once).
cached_attr!(future_type, "asyncio.futures", "Future");
cached_attr!(task_type, "asyncio.tasks", "Task");
cached_attr!(iscoroutinefunction, "asyncio", "iscoroutinefunction");
cached_attr!(extract_stack, "asyncio.format_helpers", "extract_stack");
cached_attr!(getframe, "sys", "_getframe");
cached_attr!(format_callback, "tokioloop._format", "format_callback");
cached_attr!(handle_repr, "tokioloop._format", "handle_repr");
cached_attr!(
    warn_slow_callback,
    "tokioloop._format",
    "warn_slow_callback"
);
cached_module!(socket_module, "socket");

/// socket.getaddrinfo, looked up at each use so that patching it works.
pub(crate) fn socket_getaddrinfo(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    socket_module(py)?.getattr(pyo3::intern!(py, "getaddrinfo"))
}

/// socket.getnameinfo, looked up at each use so that patching it works.
pub(crate) fn socket_getnameinfo(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    socket_module(py)?.getattr(pyo3::intern!(py, "getnameinfo"))
}

/// `format_helpers.extract_stack(sys._getframe(0))`: the creation traceback
/// asyncio records on handles, futures and tasks in debug mode. Called from
/// native methods, so frame 0 is the Python code that called the loop method.
pub(crate) fn creation_traceback(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let frame = getframe(py)?.call1((0,))?;
    Ok(extract_stack(py)?.call1((frame,))?.unbind())
}
