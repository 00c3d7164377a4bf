//! TLS over any stream transport: a native version of the SSL protocol layer
//! asyncio puts between a socket transport and the application
//! (asyncio.sslproto on Python 3.11+), with the same states, flow control,
//! timeouts and error reporting.
//!
//! The crypto is the user's `ssl.SSLContext`: the context wraps two
//! `ssl.MemoryBIO`s in an `SSLObject`, and this layer moves bytes between
//! the BIOs, the lower transport and the application protocol. The `_ssl`
//! methods are called straight from Rust (cached bound methods of the C
//! `_ssl._SSLSocket` behind a plain `ssl.SSLObject`; the Python wrapper's
//! own methods when the context makes a subclass of it).
//!
//! The Python-facing classes are in tokioloop/_tls.py: `SSLProtocol` (this
//! core plus `asyncio.BufferedProtocol`, what the lower transport talks to)
//! and `_SSLProtocolTransport` (an `asyncio.Transport` whose hot methods are
//! bound methods of this core).
//!
//! States: UNWRAPPED -> DO_HANDSHAKE -> WRAPPED -> FLUSHING -> SHUTDOWN,
//! and back to UNWRAPPED from anywhere (abort, errors, connection lost).
//!
//! All mutable state is in one `GilCell`; Python code (the application's
//! callbacks, the ssl module, the lower transport) is only ever called with
//! the cell released, since any of it may call back into this object.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ptr::NonNull;

use pyo3::exceptions::{
    PyAssertionError, PyConnectionAbortedError, PyConnectionResetError, PyException,
    PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView, PySlice, PyTuple};
use pyo3::PyTraverseError;

use crate::event_loop::handle::loop_debug;
use crate::transports::stream::is_base_exit;

/// asyncio's SSLProtocol.max_size: the most one read of the lower
/// transport brings in.
const MAX_SIZE: usize = 256 * 1024;
/// The largest plaintext one TLS record carries: the most one `read()` of
/// the SSL object returns, so no read allocates more than this.
const MAX_RECORD: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum SslState {
    Unwrapped,
    DoHandshake,
    Wrapped,
    Flushing,
    Shutdown,
}

impl SslState {
    fn name(self) -> &'static str {
        match self {
            SslState::Unwrapped => "UNWRAPPED",
            SslState::DoHandshake => "DO_HANDSHAKE",
            SslState::Wrapped => "WRAPPED",
            SslState::Flushing => "FLUSHING",
            SslState::Shutdown => "SHUTDOWN",
        }
    }

    /// The transitions the state machine allows (to UNWRAPPED: always).
    fn may_become(self, new: SslState) -> bool {
        use SslState::*;
        matches!(
            (self, new),
            (_, Unwrapped)
                | (Unwrapped, DoHandshake)
                | (DoHandshake, Wrapped)
                | (Wrapped, Flushing)
                | (Flushing, Shutdown)
        )
    }
}

/// Where the application protocol is: INIT -> CON_MADE [-> EOF] -> CON_LOST.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AppState {
    Init,
    ConMade,
    Eof,
    ConLost,
}

/// Python objects looked up once per interpreter.
struct Consts {
    want_read: Py<PyAny>,
    syscall_error: Py<PyAny>,
    ssl_error: Py<PyAny>,
    zero_return: Py<PyAny>,
    certificate_error: Py<PyAny>,
    cancelled_error: Py<PyAny>,
    timeout_error: Py<PyAny>,
    memory_bio: Py<PyAny>,
    ssl_object: Py<PyAny>,
    ssl_module: Py<PyAny>,
    buffered_protocol: Py<PyAny>,
    logger: Py<PyAny>,
    /// asyncio.sslproto.SSLProtocolState (3.11+), for `_state`.
    state_enum: Option<Py<PyAny>>,
    log_threshold: u32,
    handshake_timeout: Py<PyAny>,
    shutdown_timeout: Py<PyAny>,
    read_high_kib: i64,
    write_high_kib: i64,
}

fn consts(py: Python<'_>) -> PyResult<&'static Consts> {
    static CELL: PyOnceLock<Consts> = PyOnceLock::new();
    CELL.get_or_try_init(py, || {
        let ssl = py.import("ssl")?;
        let constants = py.import("asyncio.constants")?;
        let get_const = |name: &str, default: f64| -> PyResult<Py<PyAny>> {
            match constants.getattr(name) {
                Ok(v) => Ok(v.unbind()),
                Err(_) => Ok(default.into_pyobject(py)?.into_any().unbind()),
            }
        };
        let kib = |name: &str, default: i64| -> i64 {
            constants
                .getattr(name)
                .and_then(|v| v.extract())
                .unwrap_or(default)
        };
        let state_enum = py
            .import("asyncio.sslproto")?
            .getattr("SSLProtocolState")
            .ok()
            .map(Bound::unbind);
        Ok(Consts {
            want_read: ssl.getattr("SSLWantReadError")?.unbind(),
            syscall_error: ssl.getattr("SSLSyscallError")?.unbind(),
            ssl_error: ssl.getattr("SSLError")?.unbind(),
            zero_return: ssl.getattr("SSLZeroReturnError")?.unbind(),
            certificate_error: ssl.getattr("CertificateError")?.unbind(),
            cancelled_error: py
                .import("asyncio.exceptions")?
                .getattr("CancelledError")?
                .unbind(),
            timeout_error: py
                .import("asyncio.exceptions")?
                .getattr("TimeoutError")?
                .unbind(),
            memory_bio: ssl.getattr("MemoryBIO")?.unbind(),
            ssl_object: ssl.getattr("SSLObject")?.unbind(),
            ssl_module: ssl.clone().into_any().unbind(),
            buffered_protocol: py.import("asyncio")?.getattr("BufferedProtocol")?.unbind(),
            logger: py.import("asyncio.log")?.getattr("logger")?.unbind(),
            state_enum,
            log_threshold: constants
                .getattr("LOG_THRESHOLD_FOR_CONNLOST_WRITES")
                .and_then(|v| v.extract())
                .unwrap_or(5),
            handshake_timeout: get_const("SSL_HANDSHAKE_TIMEOUT", 60.0)?,
            shutdown_timeout: get_const("SSL_SHUTDOWN_TIMEOUT", 30.0)?,
            read_high_kib: kib("FLOW_CONTROL_HIGH_WATER_SSL_READ", 256),
            write_high_kib: kib("FLOW_CONTROL_HIGH_WATER_SSL_WRITE", 512),
        })
    })
}

thread_local! {
    /// The buffer the lower transport reads into (get_buffer), shared by
    /// all TLS protocols made on the thread (the thread of their loop):
    /// buffer_updated() copies what arrived into the incoming BIO at once,
    /// so it is free again before any other protocol can ask for it.
    static READ_BUFFER: RefCell<Option<Py<PyMemoryView>>> = const { RefCell::new(None) };
}

fn read_buffer(py: Python<'_>) -> PyResult<Py<PyMemoryView>> {
    if let Some(b) = READ_BUFFER.with(|c| c.borrow().as_ref().map(|b| b.clone_ref(py))) {
        return Ok(b);
    }
    let array = PyByteArray::new(py, &vec![0u8; MAX_SIZE]);
    let view = PyMemoryView::from(&array)?.unbind();
    READ_BUFFER.with(|c| *c.borrow_mut() = Some(view.clone_ref(py)));
    Ok(view)
}

/// The application protocol and its callbacks the data path uses.
struct App {
    protocol: Py<PyAny>,
    buffered: bool,
    data_received: Option<Py<PyAny>>,
    get_buffer: Option<Py<PyAny>>,
    buffer_updated: Option<Py<PyAny>>,
}

struct St {
    state: SslState,
    app_state: AppState,
    transport: Option<Py<PyAny>>,
    /// The lower transport's bound `write`.
    transport_write: Option<Py<PyAny>>,
    app: Option<App>,
    app_transport: Option<Py<PyAny>>,
    app_transport_created: bool,
    /// The application transport's `_closed`.
    app_closed: bool,
    waiter: Option<Py<PyAny>>,
    /// Application data not yet handed to the SSL object.
    backlog: VecDeque<Py<PyAny>>,
    write_buffer_size: usize,
    conn_lost: u32,
    ssl_writing_paused: bool,
    app_reading_paused: bool,
    ssl_reading_paused: bool,
    eof_received: bool,
    app_writing_paused: bool,
    incoming_high: i64,
    incoming_low: i64,
    outgoing_high: i64,
    outgoing_low: i64,
    handshake_timeout_handle: Option<Py<PyAny>>,
    shutdown_timeout_handle: Option<Py<PyAny>>,
    handshake_start: Option<f64>,
    /// The incoming BIO is known to be empty (see incoming_pending()).
    incoming_empty: bool,
    /// The connection's context: a copy of the one the lower transport
    /// called connection_made() in. The application's callbacks run in it
    /// whatever context the application's transport is called from (as
    /// uvloop does), see in_app_context().
    ctx: Option<Py<PyAny>>,
    /// Non-zero while a callback of the lower transport (which runs in its
    /// own context, of the same values) or one of ours is running.
    in_ctx: u32,
}

/// The native SSL protocol. Exposed as `tokioloop._tokioloop.SSLProtocolCore`;
/// subclassed in Python by `tokioloop._tls.SSLProtocol`.
#[pyclass(
    frozen,
    subclass,
    module = "tokioloop._tokioloop",
    name = "SSLProtocolCore"
)]
pub struct TlsProtocol {
    lp: Py<PyAny>,
    sslcontext: Py<PyAny>,
    /// The `ssl.SSLObject` (what `ssl_object` extra info returns).
    sslobj: Py<PyAny>,
    incoming: Py<PyAny>,
    outgoing: Py<PyAny>,
    extra: Py<PyDict>,
    server_side: bool,
    server_hostname: Option<Py<PyAny>>,
    handshake_timeout: Py<PyAny>,
    shutdown_timeout: Py<PyAny>,
    // Bound methods of the data path.
    incoming_write: Py<PyAny>,
    outgoing_read: Py<PyAny>,
    ssl_read: Py<PyAny>,
    ssl_write: Py<PyAny>,
    ssl_pending: Py<PyAny>,
    ssl_do_handshake: Py<PyAny>,
    ssl_shutdown: Py<PyAny>,
    /// The thread's shared buffer for the lower transport (see READ_BUFFER).
    read_buffer: Py<PyMemoryView>,
    /// `ssl_read` is the C `_ssl._SSLSocket.read` (a plain SSLObject), which
    /// may be given a view of memory we own: it keeps no reference to it.
    raw_reads: bool,
    /// start_tls(): see on_handshake_complete().
    defer_first_read: bool,
    /// Python 3.10: why the SSL object could not be made (see new()).
    wrap_error: Option<Py<PyAny>>,
    st: crate::event_loop::cell::GilCell<St>,
}

/// How a call into the SSL object ended.
enum SslCall<T> {
    Done(T),
    /// SSLWantReadError or SSLSyscallError: more input is needed.
    Again,
    /// Another SSLError.
    Failed(PyErr),
}

fn add_flowcontrol_defaults(
    high: Option<&Bound<'_, PyAny>>,
    low: Option<&Bound<'_, PyAny>>,
    kib: i64,
) -> PyResult<(i64, i64)> {
    let as_int = |v: &Bound<'_, PyAny>| -> PyResult<i64> {
        match v.extract::<i64>() {
            Ok(i) => Ok(i),
            Err(_) => Ok(v.extract::<f64>()?.floor() as i64),
        }
    };
    let high = high.filter(|h| !h.is_none());
    let low = low.filter(|l| !l.is_none());
    let hi = match (high, low) {
        (Some(h), _) => as_int(h)?,
        (None, Some(l)) => 4 * as_int(l)?,
        (None, None) => kib * 1024,
    };
    let lo = match low {
        Some(l) => as_int(l)?,
        None => hi.div_euclid(4),
    };
    if !(hi >= lo && lo >= 0) {
        return Err(PyValueError::new_err(format!(
            "high ({hi}) must be >= low ({lo}) must be >= 0"
        )));
    }
    Ok((hi, lo))
}

fn is_exception(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyException>(py)
}

fn pending(bio: &Bound<'_, PyAny>) -> PyResult<usize> {
    bio.getattr(pyo3::intern!(bio.py(), "pending"))?.extract()
}

impl TlsProtocol {
    /// Run `f` in the connection's context: for the application transport's
    /// methods, which may call the application's protocol synchronously
    /// (write() -> pause_writing(), close() -> eof_received()) or schedule
    /// its callbacks (resume_reading()), from any context.
    fn in_app_context<R>(slf: &Bound<'_, Self>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
        let py = slf.py();
        let this = slf.get();
        let ctx = this.st.with(py, |s| {
            if s.in_ctx > 0 {
                None
            } else {
                s.ctx.as_ref().map(|c| c.clone_ref(py))
            }
        });
        let Some(ctx) = ctx else {
            return f();
        };
        // SAFETY: `ctx` is a live contextvars.Context we hold a reference
        // to; Enter and Exit are paired below, with the GIL held.
        if unsafe { ffi::PyContext_Enter(ctx.as_ptr()) } < 0 {
            // Already entered: a callback of this connection that the loop
            // runs in it is on the stack, so its values are current.
            drop(PyErr::fetch(py));
            return Self::in_lower_callback(slf, f);
        }
        let r = Self::in_lower_callback(slf, f);
        // SAFETY: as above; the context entered just before.
        if unsafe { ffi::PyContext_Exit(ctx.as_ptr()) } < 0 {
            let e = PyErr::fetch(py);
            return r.and(Err(e));
        }
        r
    }

    /// Mark that the connection's context (or the lower transport's, which
    /// holds the same values) is current while `f` runs.
    fn in_lower_callback<R>(slf: &Bound<'_, Self>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
        let py = slf.py();
        let this = slf.get();
        this.st.with(py, |s| s.in_ctx += 1);
        let r = f();
        this.st.with(py, |s| s.in_ctx -= 1);
        r
    }

    /// loop.call_soon(cb, *args) in the connection's context.
    fn call_soon_in_ctx<'py>(
        slf: &Bound<'py, Self>,
        cb: Bound<'py, PyAny>,
        args: &[Bound<'py, PyAny>],
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let mut items = Vec::with_capacity(args.len() + 1);
        items.push(cb);
        items.extend(args.iter().cloned());
        let call = PyTuple::new(py, items)?;
        let kwargs = PyDict::new(py);
        if let Some(ctx) = this
            .st
            .with(py, |s| s.ctx.as_ref().map(|c| c.clone_ref(py)))
        {
            kwargs.set_item(pyo3::intern!(py, "context"), ctx)?;
        }
        this.lp(py)
            .call_method(pyo3::intern!(py, "call_soon"), call, Some(&kwargs))?;
        Ok(())
    }

    fn lp<'py>(&self, py: Python<'py>) -> &Bound<'py, PyAny> {
        self.lp.bind(py)
    }

    fn debug(&self, py: Python<'_>) -> bool {
        loop_debug(self.lp(py))
    }

    fn state(&self, py: Python<'_>) -> SslState {
        self.st.with(py, |s| s.state)
    }

    fn set_state(&self, py: Python<'_>, new: SslState) -> PyResult<()> {
        self.st
            .with(py, |s| {
                if s.state.may_become(new) {
                    s.state = new;
                    Ok(())
                } else {
                    Err(s.state)
                }
            })
            .map_err(|old| {
                PyRuntimeError::new_err(format!(
                    "cannot switch state from SSLProtocolState.{} to SSLProtocolState.{}",
                    old.name(),
                    new.name()
                ))
            })
    }

    fn classify<T>(py: Python<'_>, r: PyResult<T>) -> PyResult<SslCall<T>> {
        match r {
            Ok(v) => Ok(SslCall::Done(v)),
            Err(e) => {
                let c = consts(py)?;
                if e.is_instance(py, c.want_read.bind(py))
                    || e.is_instance(py, c.syscall_error.bind(py))
                {
                    Ok(SslCall::Again)
                } else if e.is_instance(py, c.ssl_error.bind(py)) {
                    Ok(SslCall::Failed(e))
                } else {
                    Err(e)
                }
            }
        }
    }

    fn transport(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.st
            .with(py, |s| s.transport.as_ref().map(|t| t.clone_ref(py)))
    }

    fn app_protocol(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.st
            .with(py, |s| s.app.as_ref().map(|a| a.protocol.clone_ref(py)))
    }

    fn app_transport(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.st
            .with(py, |s| s.app_transport.as_ref().map(|t| t.clone_ref(py)))
    }

    fn make_app(py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<App> {
        let has_get_buffer = protocol.hasattr(pyo3::intern!(py, "get_buffer"))?;
        // An asyncio.BufferedProtocol; or, as uvloop (and tokioloop's own
        // transports), one with get_buffer()/buffer_updated() and no
        // data_received(), on which asyncio would fail.
        let buffered = has_get_buffer
            && (protocol.is_instance(consts(py)?.buffered_protocol.bind(py))?
                || (protocol.hasattr(pyo3::intern!(py, "buffer_updated"))?
                    && !protocol.hasattr(pyo3::intern!(py, "data_received"))?));
        let get = |name: &Bound<'_, pyo3::types::PyString>| {
            protocol.getattr(name).ok().map(Bound::unbind)
        };
        Ok(App {
            protocol: protocol.clone().unbind(),
            buffered,
            data_received: if buffered {
                None
            } else {
                get(pyo3::intern!(py, "data_received"))
            },
            get_buffer: if buffered {
                get(pyo3::intern!(py, "get_buffer"))
            } else {
                None
            },
            buffer_updated: if buffered {
                get(pyo3::intern!(py, "buffer_updated"))
            } else {
                None
            },
        })
    }

    fn log(&self, py: Python<'_>, level: &str, args: Bound<'_, PyTuple>) -> PyResult<()> {
        consts(py)?.logger.bind(py).call_method1(level, args)?;
        Ok(())
    }

    fn wakeup_waiter(&self, py: Python<'_>, exc: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let Some(w) = self.st.with(py, |s| s.waiter.take()) else {
            return Ok(());
        };
        let w = w.bind(py);
        if !w
            .call_method0(pyo3::intern!(py, "cancelled"))?
            .is_truthy()?
        {
            match exc {
                Some(e) => w.call_method1(pyo3::intern!(py, "set_exception"), (e,))?,
                None => w.call_method1(pyo3::intern!(py, "set_result"), (py.None(),))?,
            };
        }
        Ok(())
    }

    fn cancel_handle(py: Python<'_>, h: Option<Py<PyAny>>) -> PyResult<()> {
        if let Some(h) = h {
            h.bind(py).call_method0(pyo3::intern!(py, "cancel"))?;
        }
        Ok(())
    }

    /// asyncio's `_fatal_error`: close the lower transport with `exc`, and
    /// report it (OSErrors in debug mode only, cancellations never).
    fn fatal_error(slf: &Bound<'_, Self>, exc: &Bound<'_, PyAny>, message: &str) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let transport = this.transport(py);
        if let Some(t) = &transport {
            if t.bind(py).is_truthy()? {
                t.bind(py)
                    .call_method1(pyo3::intern!(py, "_force_close"), (exc,))?;
            }
        }
        if exc.is_instance_of::<pyo3::exceptions::PyOSError>() {
            if this.debug(py) {
                let kwargs = PyDict::new(py);
                kwargs.set_item("exc_info", exc)?;
                consts(py)?.logger.bind(py).call_method(
                    "debug",
                    ("%r: %s", slf, message),
                    Some(&kwargs),
                )?;
            }
        } else if !exc.is_instance(consts(py)?.cancelled_error.bind(py))? {
            let ctx = PyDict::new(py);
            ctx.set_item("message", message)?;
            ctx.set_item("exception", exc)?;
            ctx.set_item("transport", this.transport(py))?;
            ctx.set_item("protocol", slf)?;
            this.lp(py)
                .call_method1(pyo3::intern!(py, "call_exception_handler"), (ctx,))?;
        }
        Ok(())
    }

    /// Run `f`; an `Exception` it raises becomes a fatal error with
    /// `message` (asyncio's `except Exception: self._fatal_error(...)`).
    fn guarded(
        slf: &Bound<'_, Self>,
        message: &str,
        f: impl FnOnce() -> PyResult<()>,
    ) -> PyResult<()> {
        let py = slf.py();
        match f() {
            Ok(()) => Ok(()),
            Err(e) if is_exception(py, &e) => Self::fatal_error(slf, e.value(py).as_any(), message),
            Err(e) => Err(e),
        }
    }

    // ---- handshake --------------------------------------------------------

    fn start_handshake(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let start = if this.debug(py) {
            this.log(
                py,
                "debug",
                PyTuple::new(
                    py,
                    [
                        "%r starts SSL handshake".into_pyobject(py)?.into_any(),
                        slf.clone().into_any(),
                    ],
                )?,
            )?;
            Some(
                this.lp(py)
                    .call_method0(pyo3::intern!(py, "time"))?
                    .extract()?,
            )
        } else {
            None
        };
        this.st.with(py, |s| s.handshake_start = start);
        this.set_state(py, SslState::DoHandshake)?;
        let cb = slf.getattr(pyo3::intern!(py, "_check_handshake_timeout"))?;
        let h = this.lp(py).call_method1(
            pyo3::intern!(py, "call_later"),
            (this.handshake_timeout.bind(py), cb),
        )?;
        let old = this
            .st
            .with(py, |s| s.handshake_timeout_handle.replace(h.unbind()));
        drop(old);
        Self::do_handshake(slf)
    }

    fn do_handshake(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if let Some(e) = &this.wrap_error {
            return Self::on_handshake_complete(slf, Some(e.bind(py).clone()));
        }
        match Self::classify(py, this.ssl_do_handshake.bind(py).call0())? {
            SslCall::Again => Self::process_outgoing(slf),
            SslCall::Failed(e) => {
                Self::on_handshake_complete(slf, Some(e.value(py).clone().into_any()))
            }
            SslCall::Done(_) => Self::on_handshake_complete(slf, None),
        }
    }

    fn on_handshake_complete(
        slf: &Bound<'_, Self>,
        handshake_exc: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let h = this.st.with(py, |s| s.handshake_timeout_handle.take());
        Self::cancel_handle(py, h)?;

        let sslobj = this.sslobj.bind(py);
        let peercert = (|| -> PyResult<Bound<'_, PyAny>> {
            match &handshake_exc {
                None => this.set_state(py, SslState::Wrapped)?,
                Some(e) => {
                    // An exception class (ConnectionResetError on EOF) is
                    // raised as an instance of it, as `raise cls` does.
                    let e = if e.is_instance_of::<pyo3::types::PyType>() {
                        e.call0()?
                    } else {
                        e.clone()
                    };
                    return Err(PyErr::from_value(e));
                }
            }
            sslobj.call_method0(pyo3::intern!(py, "getpeercert"))
        })();
        let peercert = match peercert {
            Ok(p) => p,
            Err(e) if is_exception(py, &e) => {
                this.set_state(py, SslState::Unwrapped)?;
                let exc = e.value(py).clone().into_any();
                let msg = if exc.is_instance(consts(py)?.certificate_error.bind(py))? {
                    "SSL handshake failed on verifying the certificate"
                } else {
                    "SSL handshake failed"
                };
                Self::fatal_error(slf, &exc, msg)?;
                return this.wakeup_waiter(py, Some(&exc));
            }
            Err(e) => return Err(e),
        };

        if this.debug(py) {
            if let Some(start) = this.st.with(py, |s| s.handshake_start) {
                let now: f64 = this
                    .lp(py)
                    .call_method0(pyo3::intern!(py, "time"))?
                    .extract()?;
                this.log(
                    py,
                    "debug",
                    PyTuple::new(
                        py,
                        [
                            "%r: SSL handshake took %.1f ms"
                                .into_pyobject(py)?
                                .into_any(),
                            slf.clone().into_any(),
                            ((now - start) * 1e3).into_pyobject(py)?.into_any(),
                        ],
                    )?,
                )?;
            }
        }
        let extra = this.extra.bind(py);
        extra.set_item("peercert", peercert)?;
        extra.set_item("cipher", sslobj.call_method0(pyo3::intern!(py, "cipher"))?)?;
        extra.set_item(
            "compression",
            sslobj.call_method0(pyo3::intern!(py, "compression"))?,
        )?;
        extra.set_item("ssl_object", sslobj)?;
        let make = this.st.with(py, |s| {
            if s.app_state == AppState::Init {
                s.app_state = AppState::ConMade;
                true
            } else {
                false
            }
        });
        if make {
            let tr = Self::get_app_transport(slf)?;
            if let Some(app) = this.app_protocol(py) {
                app.bind(py)
                    .call_method1(pyo3::intern!(py, "connection_made"), (tr,))?;
            }
        }
        this.wakeup_waiter(py, None)?;
        if this.defer_first_read {
            // start_tls(): the application gets its new transport from the
            // waiter; data that came with the end of the handshake is
            // delivered after that (as uvloop does), not before the
            // application can know where to answer it.
            let again = slf.getattr(pyo3::intern!(py, "_do_read"))?;
            Self::call_soon_in_ctx(slf, again, &[])?;
            return Ok(());
        }
        Self::do_read(slf)
    }

    fn get_app_transport(slf: &Bound<'_, Self>) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let (tr, created) = slf.get().st.with(py, |s| {
            (
                s.app_transport.as_ref().map(|t| t.clone_ref(py)),
                s.app_transport_created,
            )
        });
        match tr {
            Some(t) => Ok(t),
            None if created => Err(PyRuntimeError::new_err(
                "Creating _SSLProtocolTransport twice",
            )),
            None => Err(PyRuntimeError::new_err(
                "the SSL protocol has no application transport",
            )),
        }
    }

    // ---- shutdown ----------------------------------------------------------

    fn start_shutdown(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let state = this.st.with(py, |s| {
            if matches!(
                s.state,
                SslState::Flushing | SslState::Shutdown | SslState::Unwrapped
            ) {
                return None;
            }
            if s.app_transport.is_some() {
                s.app_closed = true;
            }
            Some(s.state)
        });
        match state {
            None => Ok(()),
            Some(SslState::DoHandshake) => Self::abort(slf, None),
            Some(_) => {
                this.set_state(py, SslState::Flushing)?;
                let cb = slf.getattr(pyo3::intern!(py, "_check_shutdown_timeout"))?;
                let h = this.lp(py).call_method1(
                    pyo3::intern!(py, "call_later"),
                    (this.shutdown_timeout.bind(py), cb),
                )?;
                let old = this
                    .st
                    .with(py, |s| s.shutdown_timeout_handle.replace(h.unbind()));
                drop(old);
                Self::do_flush(slf)
            }
        }
    }

    fn do_flush(slf: &Bound<'_, Self>) -> PyResult<()> {
        // After the application's close(), what still arrives is dropped
        // (as a plain transport stops reading at close(); uvloop does the
        // same); a flush the peer's EOF started delivers it first.
        // The write backlog still goes out first.
        if slf.get().st.with(slf.py(), |s| s.app_closed) {
            Self::guarded(slf, "Fatal error on SSL protocol", || {
                Self::do_write(slf)?;
                Self::control_ssl_reading(slf)
            })?;
        } else {
            Self::do_read(slf)?;
        }
        slf.get().set_state(slf.py(), SslState::Shutdown)?;
        Self::do_shutdown(slf)
    }

    fn do_shutdown(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let r = if this.st.with(py, |s| s.eof_received) {
            Ok(())
        } else {
            // Application data still arriving after our close() is dropped
            // (as uvloop does): OpenSSL 3 would fail the shutdown on it
            // (APPLICATION_DATA_AFTER_CLOSE_NOTIFY).
            match this.discard_app_data(py)? {
                SslCall::Failed(e) => Err(e),
                _ => this.ssl_shutdown.bind(py).call0().map(|_| ()),
            }
        };
        match Self::classify(py, r)? {
            SslCall::Again => Self::process_outgoing(slf),
            SslCall::Failed(e) => Self::on_shutdown_complete(slf, Some(e.value(py).as_any())),
            SslCall::Done(()) => {
                Self::process_outgoing(slf)?;
                Self::call_eof_received(slf)?;
                Self::on_shutdown_complete(slf, None)
            }
        }
    }

    /// Read and drop whatever application data can be decrypted now.
    fn discard_app_data(&self, py: Python<'_>) -> PyResult<SslCall<()>> {
        let read = self.ssl_read.bind(py);
        loop {
            let n = self.readable(py)?;
            if n == 0 {
                return Ok(SslCall::Again);
            }
            match Self::classify(py, read.call1((n,)))? {
                SslCall::Done(chunk) => {
                    if !chunk.is_truthy()? {
                        // close_notify: unwrap() completes now.
                        return Ok(SslCall::Done(()));
                    }
                }
                SslCall::Again => return Ok(SslCall::Again),
                // close_notify after ours was sent.
                SslCall::Failed(e) if e.is_instance(py, consts(py)?.zero_return.bind(py)) => {
                    return Ok(SslCall::Done(()))
                }
                SslCall::Failed(e) => return Ok(SslCall::Failed(e)),
            }
        }
    }

    fn on_shutdown_complete(
        slf: &Bound<'_, Self>,
        shutdown_exc: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let h = this.st.with(py, |s| s.shutdown_timeout_handle.take());
        Self::cancel_handle(py, h)?;
        match shutdown_exc {
            Some(e) => Self::fatal_error(slf, e, "Fatal error on transport"),
            None => {
                if let Some(t) = this.transport(py) {
                    let close = t.bind(py).getattr(pyo3::intern!(py, "close"))?;
                    this.lp(py)
                        .call_method1(pyo3::intern!(py, "call_soon"), (close,))?;
                }
                Ok(())
            }
        }
    }

    fn abort(slf: &Bound<'_, Self>, exc: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        this.set_state(py, SslState::Unwrapped)?;
        if let Some(t) = this.transport(py) {
            match exc {
                None => t.bind(py).call_method0(pyo3::intern!(py, "abort"))?,
                Some(e) => t
                    .bind(py)
                    .call_method1(pyo3::intern!(py, "_force_close"), (e,))?,
            };
        }
        Ok(())
    }

    // ---- outgoing ------------------------------------------------------------

    fn write_appdata<'py>(
        slf: &Bound<'py, Self>,
        items: impl Iterator<Item = PyResult<Bound<'py, PyAny>>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let threshold = consts(py)?.log_threshold;
        let (closed, warn) = this.st.with(py, |s| {
            if matches!(
                s.state,
                SslState::Flushing | SslState::Shutdown | SslState::Unwrapped
            ) {
                let warn = s.conn_lost >= threshold;
                s.conn_lost += 1;
                (true, warn)
            } else {
                (false, false)
            }
        });
        if closed {
            if warn {
                this.log(
                    py,
                    "warning",
                    PyTuple::new(py, ["SSL connection is closed"])?,
                )?;
            }
            return Ok(());
        }
        for data in items {
            let data = data?;
            let n = data.len()?;
            this.st.with(py, |s| {
                s.backlog.push_back(data.unbind());
                s.write_buffer_size += n;
            });
        }
        if this.state(py) == SslState::Wrapped {
            Self::guarded(slf, "Fatal error on SSL protocol", || Self::do_write(slf))?;
        }
        Ok(())
    }

    fn do_write(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let write = this.ssl_write.bind(py);
        loop {
            let Some(data) = this
                .st
                .with(py, |s| s.backlog.front().map(|d| d.clone_ref(py)))
            else {
                break;
            };
            let data = data.bind(py);
            let count = match Self::classify(py, write.call1((data,)))? {
                SslCall::Done(c) => c.extract::<usize>()?,
                SslCall::Again => break,
                SslCall::Failed(e) => return Err(e),
            };
            let len = data.len()?;
            let rest = if count < len {
                Some(data.get_item(PySlice::new(py, count as isize, isize::MAX, 1))?)
            } else {
                None
            };
            // (The front is checked to still be `data`: the SSL object's
            // callbacks are Python code, which could have written too.)
            let old = this.st.with(py, |s| match s.backlog.front_mut() {
                Some(front) if front.is(data) => {
                    s.write_buffer_size = s.write_buffer_size.saturating_sub(count.min(len));
                    match rest {
                        Some(rest) => Some(std::mem::replace(front, rest.unbind())),
                        None => s.backlog.pop_front(),
                    }
                }
                _ => None,
            });
            drop(old);
        }
        Self::process_outgoing(slf)
    }

    /// Hand what the SSL object produced to the lower transport (unless it
    /// asked us to stop), then apply the application's write flow control.
    fn process_outgoing(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let outgoing = this.outgoing.bind(py);
        let mut pend = pending(outgoing)?;
        let (paused, write) = this.st.with(py, |s| {
            (
                s.ssl_writing_paused,
                s.transport_write.as_ref().map(|w| w.clone_ref(py)),
            )
        });
        if !paused && pend > 0 {
            let data = this.outgoing_read.bind(py).call0()?;
            // Everything pending was read.
            pend = 0;
            if let Some(w) = write {
                w.bind(py).call1((data,))?;
            }
        }
        Self::control_app_writing(slf, pend)
    }

    fn control_app_writing(slf: &Bound<'_, Self>, outgoing_pending: usize) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let action = this.st.with(py, |s| {
            let size = (outgoing_pending + s.write_buffer_size) as i64;
            if size >= s.outgoing_high && !s.app_writing_paused {
                s.app_writing_paused = true;
                Some("pause_writing")
            } else if size <= s.outgoing_low && s.app_writing_paused {
                s.app_writing_paused = false;
                Some("resume_writing")
            } else {
                None
            }
        });
        let Some(name) = action else {
            return Ok(());
        };
        let Some(app) = this.app_protocol(py) else {
            return Ok(());
        };
        if let Err(e) = Self::in_app_context(slf, || app.bind(py).call_method0(name)) {
            if is_base_exit(py, &e) {
                return Err(e);
            }
            let ctx = PyDict::new(py);
            ctx.set_item("message", format!("protocol.{name}() failed"))?;
            ctx.set_item("exception", e.value(py))?;
            ctx.set_item("transport", this.app_transport(py))?;
            ctx.set_item("protocol", slf)?;
            this.lp(py)
                .call_method1(pyo3::intern!(py, "call_exception_handler"), (ctx,))?;
        }
        Ok(())
    }

    // ---- incoming ------------------------------------------------------------

    fn do_read(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if !matches!(this.state(py), SslState::Wrapped | SslState::Flushing) {
            return Ok(());
        }
        Self::guarded(slf, "Fatal error on SSL protocol", || {
            let (paused, buffered) = this.st.with(py, |s| {
                (
                    s.app_reading_paused,
                    s.app.as_ref().map(|a| a.buffered).unwrap_or(false),
                )
            });
            if !paused {
                if buffered {
                    Self::do_read_buffered(slf)?;
                } else {
                    Self::do_read_copied(slf)?;
                }
                if this.st.with(py, |s| !s.backlog.is_empty()) {
                    Self::do_write(slf)?;
                } else {
                    Self::process_outgoing(slf)?;
                }
            }
            Self::control_ssl_reading(slf)
        })
    }

    /// How much plaintext may be ready: 0 when a read would certainly fail
    /// with SSLWantReadError (nothing in the incoming BIO, nothing decrypted
    /// and unread in the SSL object), so that the common case costs no
    /// exception. Otherwise an upper bound for one read.
    fn readable(&self, py: Python<'_>) -> PyResult<usize> {
        let cipher = self.incoming_pending(py)?;
        let plain: usize = self.ssl_pending.bind(py).call0()?.extract()?;
        Ok(if cipher == 0 && plain == 0 {
            0
        } else {
            (cipher + plain).clamp(1, MAX_RECORD)
        })
    }

    /// `incoming.pending`, remembering when it is 0: it grows only in
    /// buffer_updated(), so until then it stays 0 without asking again.
    fn incoming_pending(&self, py: Python<'_>) -> PyResult<usize> {
        if self.st.with(py, |s| s.incoming_empty) {
            return Ok(0);
        }
        let n = pending(self.incoming.bind(py))?;
        if n == 0 {
            self.st.with(py, |s| s.incoming_empty = true);
        }
        Ok(n)
    }

    fn do_read_copied(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let read = this.ssl_read.bind(py);
        let mut eof = false;
        // The common case: one record, one read, one bytes object of the
        // right size, handed on as is.
        let mut first: Option<Bound<'_, PyBytes>> = None;
        let cipher = this.incoming_pending(py)?;
        let n = if cipher > 0 {
            cipher.min(MAX_RECORD)
        } else {
            this.readable(py)?
        };
        if n > 0 {
            match Self::classify(py, read.call1((n,)))? {
                SslCall::Done(chunk) => {
                    let chunk = chunk.cast_into::<PyBytes>()?;
                    if chunk.as_bytes().is_empty() {
                        eof = true;
                    } else {
                        first = Some(chunk);
                    }
                }
                SslCall::Again => {}
                SslCall::Failed(e) => return Err(e),
            }
        }
        let mut data = first;
        if let Some(chunk) = data.take() {
            let more = this.readable(py)?;
            data = Some(if more == 0 {
                chunk
            } else {
                // More records: read them all, in one call to the
                // application, as asyncio does.
                let (joined, got_eof) = this.read_rest(py, chunk)?;
                eof = got_eof;
                joined
            });
        }
        if let Some(data) = data {
            let cb = this.st.with(py, |s| {
                s.app
                    .as_ref()
                    .and_then(|a| a.data_received.as_ref().map(|f| f.clone_ref(py)))
            });
            match cb {
                Some(cb) => cb.bind(py).call1((data,))?,
                None => match this.app_protocol(py) {
                    Some(p) => p
                        .bind(py)
                        .call_method1(pyo3::intern!(py, "data_received"), (data,))?,
                    None => return Err(PyRuntimeError::new_err("no application protocol")),
                },
            };
        }
        if eof {
            Self::call_eof_received(slf)?;
            Self::start_shutdown(slf)?;
        }
        Ok(())
    }

    /// Everything decryptable after `first`, joined to it; and whether the
    /// stream ended (close_notify).
    fn read_rest<'py>(
        &self,
        py: Python<'py>,
        first: Bound<'py, PyBytes>,
    ) -> PyResult<(Bound<'py, PyBytes>, bool)> {
        let read = self.ssl_read.bind(py);
        if !self.raw_reads {
            // Through a Python SSLObject subclass: plain reads, then join.
            let mut chunks = vec![first];
            loop {
                let n = self.readable(py)?;
                if n == 0 {
                    return Ok((join(py, &chunks)?, false));
                }
                match Self::classify(py, read.call1((n,)))? {
                    SslCall::Done(chunk) => {
                        let chunk = chunk.cast_into::<PyBytes>()?;
                        if chunk.as_bytes().is_empty() {
                            return Ok((join(py, &chunks)?, true));
                        }
                        chunks.push(chunk);
                    }
                    SslCall::Again => return Ok((join(py, &chunks)?, false)),
                    SslCall::Failed(e) => return Err(e),
                }
            }
        }
        // The plaintext is at most the ciphertext still buffered plus what
        // the SSL object holds decrypted: read it all straight into one
        // bytes object of that size (no per-record objects, no join).
        let cipher = self.incoming_pending(py)?;
        let plain: usize = self.ssl_pending.bind(py).call0()?.extract()?;
        let head = first.as_bytes();
        let mut w = PlainWriter::new(py, head.len() + cipher + plain)?;
        w.push(head);
        let mut eof = false;
        while w.room() > 0 {
            match Self::classify(py, w.read_into(py, read))? {
                SslCall::Done(0) => {
                    eof = true;
                    break;
                }
                SslCall::Done(n) => {
                    w.filled(n);
                    if self.readable(py)? == 0 {
                        break;
                    }
                }
                SslCall::Again => break,
                SslCall::Failed(e) => return Err(e),
            }
        }
        Ok((w.finish(py)?, eof))
    }

    fn do_read_buffered(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let (get_buffer, buffer_updated) = match this.st.with(py, |s| {
            s.app.as_ref().map(|a| {
                (
                    a.get_buffer.as_ref().map(|f| f.clone_ref(py)),
                    a.buffer_updated.as_ref().map(|f| f.clone_ref(py)),
                )
            })
        }) {
            Some((Some(g), Some(u))) => (g, u),
            _ => return Err(PyRuntimeError::new_err("no application protocol")),
        };
        let hint = this.incoming_pending(py)?;
        let buf = get_buffer.bind(py).call1((hint,))?;
        let wants = buf.len()?;
        let read = this.ssl_read.bind(py);
        let mut offset = 0usize;
        // Whether the last read ended the stream (returned 0).
        let mut eof = false;
        let mut first = true;
        loop {
            if !first && this.readable(py)? == 0 {
                break;
            }
            let target = if first {
                buf.clone()
            } else {
                // The rest of the buffer, through a memoryview of it: a
                // slice of a bytearray would be a copy.
                let view = match buf.cast::<PyMemoryView>() {
                    Ok(v) => v.clone(),
                    Err(_) => PyMemoryView::from(&buf)?,
                };
                view.get_item(PySlice::new(py, offset as isize, isize::MAX, 1))?
            };
            let r = read.call1((wants - offset, target));
            first = false;
            match Self::classify(py, r)? {
                SslCall::Done(c) => {
                    let count: usize = c.extract()?;
                    if count == 0 {
                        eof = true;
                        break;
                    }
                    offset += count;
                    if offset >= wants {
                        // The application's buffer is full: come back for
                        // the rest on the next iteration.
                        let again = slf.getattr(pyo3::intern!(py, "_do_read"))?;
                        Self::call_soon_in_ctx(slf, again, &[])?;
                        break;
                    }
                }
                SslCall::Again => break,
                SslCall::Failed(e) => return Err(e),
            }
        }
        if offset > 0 {
            buffer_updated.bind(py).call1((offset,))?;
        }
        if eof {
            Self::call_eof_received(slf)?;
            Self::start_shutdown(slf)?;
        }
        Ok(())
    }

    fn call_eof_received(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let app = this.st.with(py, |s| {
            if s.app_state == AppState::ConMade {
                s.app_state = AppState::Eof;
                s.app
                    .as_ref()
                    .map(|a| (a.protocol.clone_ref(py), a.buffered))
            } else {
                None
            }
        });
        let Some((app, buffered)) = app else {
            return Ok(());
        };
        let app = app.bind(py);
        // A duck-typed buffered protocol (asyncio.BaseProtocol plus
        // get_buffer/buffer_updated) may have no eof_received(): as if it
        // returned None.
        if buffered && !app.hasattr(pyo3::intern!(py, "eof_received"))? {
            return Ok(());
        }
        let r = (|| -> PyResult<()> {
            let keep_open = app.call_method0(pyo3::intern!(py, "eof_received"))?;
            if keep_open.is_truthy()? {
                this.log(
                    py,
                    "warning",
                    PyTuple::new(
                        py,
                        ["returning true from eof_received() has no effect when using ssl"],
                    )?,
                )?;
            }
            Ok(())
        })();
        match r {
            Err(e) if !is_base_exit(py, &e) => {
                Self::fatal_error(slf, e.value(py).as_any(), "Error calling eof_received()")
            }
            r => r,
        }
    }

    fn control_ssl_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let size = this.incoming_pending(py)? as i64;
        let action = this.st.with(py, |s| {
            if size >= s.incoming_high && !s.ssl_reading_paused {
                s.ssl_reading_paused = true;
                Some("pause_reading")
            } else if size <= s.incoming_low && s.ssl_reading_paused {
                s.ssl_reading_paused = false;
                Some("resume_reading")
            } else {
                None
            }
        });
        if let Some(name) = action {
            if let Some(t) = this.transport(py) {
                t.bind(py).call_method0(name)?;
            }
        }
        Ok(())
    }

    fn write_buffer_size(&self, py: Python<'_>) -> PyResult<usize> {
        let out = pending(self.outgoing.bind(py))?;
        Ok(out + self.st.with(py, |s| s.write_buffer_size))
    }
}

/// A bytes object being filled with plaintext by the SSL object, through
/// CPython's PyBytesWriter (the C API's way to build a bytes object in place).
struct PlainWriter {
    w: NonNull<ffi::compat::PyBytesWriter>,
    cap: usize,
    len: usize,
    /// Set if a memory view of ours outlived a read (it never should): the
    /// memory is then never freed, and the data is copied out instead.
    leaked: bool,
}

impl PlainWriter {
    fn new(py: Python<'_>, cap: usize) -> PyResult<Self> {
        // SAFETY: called with the GIL held; NULL means an exception is set.
        let w = unsafe { ffi::compat::PyBytesWriter_Create(cap as ffi::Py_ssize_t) };
        match NonNull::new(w) {
            Some(w) => Ok(PlainWriter {
                w,
                cap,
                len: 0,
                leaked: false,
            }),
            None => Err(PyErr::fetch(py)),
        }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: `w` is a live writer of `cap` bytes (never resized).
        unsafe { ffi::compat::PyBytesWriter_GetData(self.w.as_ptr()).cast::<u8>() }
    }

    fn room(&self) -> usize {
        self.cap - self.len
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.room());
        // SAFETY: [len, len + n) is inside the writer's `cap` bytes, and
        // `bytes` (another object's memory) does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data().add(self.len), n) };
        self.len += n;
    }

    /// `read(room, view)` with a writable view of the unfilled part.
    fn read_into<'py>(&mut self, py: Python<'py>, read: &Bound<'py, PyAny>) -> PyResult<usize> {
        let room = self.room();
        // SAFETY: the view covers [len, cap) of the writer's buffer, which
        // stays allocated until finish()/drop; the view is dropped below,
        // before either can run, and is checked not to have been kept.
        let view = unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::PyMemoryView_FromMemory(
                    self.data().add(self.len).cast(),
                    room as ffi::Py_ssize_t,
                    ffi::PyBUF_WRITE,
                ),
            )?
        };
        let r = read.call1((room, &view));
        // SAFETY: `view` is a live object we hold a reference to.
        if unsafe { ffi::Py_REFCNT(view.as_ptr()) } != 1 {
            self.leaked = true;
        }
        drop(view);
        r?.extract::<usize>().map(|n| n.min(room))
    }

    fn filled(&mut self, n: usize) {
        self.len = (self.len + n).min(self.cap);
    }

    fn finish<'py>(self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let this = std::mem::ManuallyDrop::new(self);
        if this.leaked {
            // SAFETY: [0, len) was written; the writer is never freed.
            let bytes = unsafe { std::slice::from_raw_parts(this.data(), this.len) };
            return Ok(PyBytes::new(py, bytes));
        }
        // SAFETY: a live writer, consumed here exactly once (ManuallyDrop
        // keeps Drop from discarding it again); returns a new reference or
        // NULL with an exception set.
        unsafe {
            Bound::from_owned_ptr_or_err(
                py,
                ffi::compat::PyBytesWriter_FinishWithSize(
                    this.w.as_ptr(),
                    this.len as ffi::Py_ssize_t,
                ),
            )
            .map(|b| b.cast_into_unchecked::<PyBytes>())
        }
    }
}

impl Drop for PlainWriter {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: a live writer not finished yet; writers only exist
            // inside methods that hold the GIL.
            unsafe { ffi::compat::PyBytesWriter_Discard(self.w.as_ptr()) };
        }
    }
}

/// b''.join(chunks) for bytes objects.
fn join<'py>(py: Python<'py>, chunks: &[Bound<'py, PyBytes>]) -> PyResult<Bound<'py, PyBytes>> {
    let total: usize = chunks.iter().map(|c| c.as_bytes().len()).sum();
    PyBytes::new_with(py, total, |dst| {
        let mut off = 0;
        for c in chunks {
            let b = c.as_bytes();
            dst[off..off + b.len()].copy_from_slice(b);
            off += b.len();
        }
        Ok(())
    })
}

fn check_timeout(
    py: Python<'_>,
    name: &str,
    value: Option<Bound<'_, PyAny>>,
    default: &Py<PyAny>,
) -> PyResult<Py<PyAny>> {
    match value.filter(|v| !v.is_none()) {
        None => Ok(default.clone_ref(py)),
        Some(v) => {
            // NaN too: a timer that can never be set would leave the
            // handshake or shutdown waiting forever.
            if v.le(0)? || v.ne(&v)? {
                Err(PyValueError::new_err(format!(
                    "{name} should be a positive number, got {}",
                    v.str()?
                )))
            } else {
                Ok(v.unbind())
            }
        }
    }
}

#[pymethods]
impl TlsProtocol {
    #[new]
    #[pyo3(signature = (
        r#loop, app_protocol, sslcontext, waiter, server_side=None, server_hostname=None,
        call_connection_made=true, ssl_handshake_timeout=None, ssl_shutdown_timeout=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        r#loop: Bound<'_, PyAny>,
        app_protocol: Bound<'_, PyAny>,
        sslcontext: Option<Bound<'_, PyAny>>,
        waiter: Option<Bound<'_, PyAny>>,
        server_side: Option<Bound<'_, PyAny>>,
        server_hostname: Option<Bound<'_, PyAny>>,
        call_connection_made: bool,
        ssl_handshake_timeout: Option<Bound<'_, PyAny>>,
        ssl_shutdown_timeout: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        // Any truth value, as asyncio's SSLProtocol takes it.
        let server_side = match &server_side {
            Some(v) => v.is_truthy()?,
            None => false,
        };
        let c = consts(py)?;
        let handshake_timeout = check_timeout(
            py,
            "ssl_handshake_timeout",
            ssl_handshake_timeout,
            &c.handshake_timeout,
        )?;
        let shutdown_timeout = check_timeout(
            py,
            "ssl_shutdown_timeout",
            ssl_shutdown_timeout,
            &c.shutdown_timeout,
        )?;
        let hostname_given = match &server_hostname {
            Some(h) => h.is_truthy()?,
            None => false,
        };
        let sslcontext = match sslcontext {
            Some(ctx) if ctx.is_truthy()? => ctx,
            _ => {
                // ssl=True on a client: a default context (secure, but no
                // hostname check without a hostname).
                if server_side {
                    return Err(PyValueError::new_err(
                        "Server side SSL needs a valid SSLContext",
                    ));
                }
                // Looked up at each use, so that patching it works.
                let ctx = c
                    .ssl_module
                    .bind(py)
                    .call_method0(pyo3::intern!(py, "create_default_context"))?;
                if !hostname_given {
                    ctx.setattr("check_hostname", false)?;
                }
                ctx
            }
        };
        let server_hostname = if hostname_given && !server_side {
            server_hostname
        } else {
            None
        };
        let extra = PyDict::new(py);
        extra.set_item("sslcontext", &sslcontext)?;
        let app = Self::make_app(py, &app_protocol)?;
        let incoming = c.memory_bio.bind(py).call0()?;
        let outgoing = c.memory_bio.bind(py).call0()?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("server_side", server_side)?;
        kwargs.set_item("server_hostname", &server_hostname)?;
        let wrapped = sslcontext.call_method(
            pyo3::intern!(py, "wrap_bio"),
            (&incoming, &outgoing),
            Some(&kwargs),
        );
        let (sslobj, wrap_error) = match wrapped {
            Ok(o) => (o, None),
            // Python 3.10's asyncio makes the SSL object only when the
            // connection is made, and reports a failure to make it as a
            // failed handshake: so does this layer there.
            Err(e) if py.version_info() < (3, 11) && is_exception(py, &e) => (
                py.None().into_bound(py),
                Some(e.value(py).clone().into_any().unbind()),
            ),
            Err(e) => return Err(e),
        };
        // A plain SSLObject only forwards to its `_ssl._SSLSocket`: call that
        // directly. A subclass may add behaviour: go through its methods.
        let plain = wrap_error.is_none() && sslobj.get_type().is(c.ssl_object.bind(py));
        let method = |target: &Bound<'_, PyAny>, name: &str| -> PyResult<Py<PyAny>> {
            if wrap_error.is_some() {
                // Never called: the handshake fails first.
                Ok(py.None())
            } else {
                Ok(target.getattr(name)?.unbind())
            }
        };
        let (target, shutdown_name) = if plain {
            (sslobj.getattr(pyo3::intern!(py, "_sslobj"))?, "shutdown")
        } else {
            (sslobj.clone(), "unwrap")
        };
        let (read_high, read_low) = add_flowcontrol_defaults(None, None, c.read_high_kib)?;
        let (write_high, write_low) = add_flowcontrol_defaults(None, None, c.write_high_kib)?;
        Ok(TlsProtocol {
            lp: r#loop.unbind(),
            sslcontext: sslcontext.unbind(),
            incoming_write: incoming.getattr(pyo3::intern!(py, "write"))?.unbind(),
            outgoing_read: outgoing.getattr(pyo3::intern!(py, "read"))?.unbind(),
            ssl_read: method(&target, "read")?,
            ssl_write: method(&target, "write")?,
            ssl_pending: method(&target, "pending")?,
            ssl_do_handshake: method(&target, "do_handshake")?,
            ssl_shutdown: method(&target, shutdown_name)?,
            wrap_error,
            raw_reads: plain,
            defer_first_read: !call_connection_made,
            read_buffer: read_buffer(py)?,
            sslobj: sslobj.unbind(),
            incoming: incoming.unbind(),
            outgoing: outgoing.unbind(),
            extra: extra.unbind(),
            server_side,
            server_hostname: server_hostname.map(Bound::unbind),
            handshake_timeout,
            shutdown_timeout,
            st: crate::event_loop::cell::GilCell::new(St {
                state: SslState::Unwrapped,
                app_state: if call_connection_made {
                    AppState::Init
                } else {
                    AppState::ConMade
                },
                transport: None,
                transport_write: None,
                app: Some(app),
                app_transport: None,
                app_transport_created: false,
                app_closed: false,
                waiter: waiter.filter(|w| !w.is_none()).map(Bound::unbind),
                backlog: VecDeque::new(),
                write_buffer_size: 0,
                conn_lost: 0,
                ssl_writing_paused: false,
                app_reading_paused: false,
                ssl_reading_paused: false,
                eof_received: false,
                app_writing_paused: false,
                incoming_high: read_high,
                incoming_low: read_low,
                outgoing_high: write_high,
                outgoing_low: write_low,
                handshake_timeout_handle: None,
                shutdown_timeout_handle: None,
                handshake_start: None,
                incoming_empty: true,
                ctx: None,
                in_ctx: 0,
            }),
        })
    }

    /// Called once by the Python subclass with the application transport.
    fn _set_app_transport(&self, py: Python<'_>, transport: Bound<'_, PyAny>) -> PyResult<()> {
        let ok = self.st.with(py, |s| {
            if s.app_transport_created {
                return false;
            }
            s.app_transport_created = true;
            s.app_transport = Some(transport.unbind());
            true
        });
        if ok {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err(
                "Creating _SSLProtocolTransport twice",
            ))
        }
    }

    // ---- the lower transport's protocol interface ---------------------------

    fn connection_made(slf: &Bound<'_, Self>, transport: Bound<'_, PyAny>) -> PyResult<()> {
        let py = slf.py();
        let write = transport.getattr(pyo3::intern!(py, "write"))?.unbind();
        let old = slf.get().st.with(py, |s| {
            (
                s.transport.replace(transport.unbind()),
                s.transport_write.replace(write),
            )
        });
        drop(old);
        // The lower transport calls this in its context: the connection's
        // context is a copy of it (see St::ctx).
        let ctx = crate::event_loop::handle::copy_context(py)?;
        let old = slf.get().st.with(py, |s| s.ctx.replace(ctx));
        drop(old);
        Self::in_lower_callback(slf, || Self::start_handshake(slf))
    }

    fn connection_lost(slf: &Bound<'_, Self>, exc: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        Self::in_lower_callback(slf, || {
            let py = slf.py();
            let this = slf.get();
            let backlog = this.st.with(py, |s| std::mem::take(&mut s.backlog));
            drop(backlog);
            this.outgoing_read.bind(py).call0()?;
            let lost_cb = this.st.with(py, |s| {
                s.conn_lost += 1;
                if s.app_transport.is_some() {
                    s.app_closed = true;
                }
                if s.state != SslState::DoHandshake
                    && matches!(s.app_state, AppState::ConMade | AppState::Eof)
                {
                    s.app_state = AppState::ConLost;
                    s.app.as_ref().map(|a| a.protocol.clone_ref(py))
                } else {
                    None
                }
            });
            if let Some(app) = lost_cb {
                let cb = app.bind(py).getattr(pyo3::intern!(py, "connection_lost"))?;
                let arg = match &exc {
                    Some(e) => e.clone(),
                    None => py.None().into_bound(py),
                };
                Self::call_soon_in_ctx(slf, cb, &[arg])?;
            }
            this.set_state(py, SslState::Unwrapped)?;
            let old = this.st.with(py, |s| {
                (
                    s.transport.take(),
                    s.transport_write.take(),
                    s.app_transport.take(),
                    s.app.take(),
                )
            });
            drop(old);
            this.wakeup_waiter(py, exc.as_ref())?;
            let (h1, h2) = this.st.with(py, |s| {
                (
                    s.shutdown_timeout_handle.take(),
                    s.handshake_timeout_handle.take(),
                )
            });
            Self::cancel_handle(py, h1)?;
            Self::cancel_handle(py, h2)
        })
    }

    #[pyo3(signature = (n=-1))]
    fn get_buffer(&self, py: Python<'_>, n: isize) -> Py<PyMemoryView> {
        let _ = n; // the shared buffer is always max_size
        self.read_buffer.clone_ref(py)
    }

    fn buffer_updated(slf: &Bound<'_, Self>, nbytes: usize) -> PyResult<()> {
        Self::in_lower_callback(slf, || {
            let py = slf.py();
            let this = slf.get();
            let data = this.read_buffer.bind(py).get_item(PySlice::new(
                py,
                0,
                nbytes.min(MAX_SIZE) as isize,
                1,
            ))?;
            this.st.with(py, |s| s.incoming_empty = false);
            this.incoming_write.bind(py).call1((data,))?;
            match this.state(py) {
                SslState::DoHandshake => Self::do_handshake(slf),
                SslState::Wrapped => Self::do_read(slf),
                SslState::Flushing => Self::do_flush(slf),
                SslState::Shutdown => Self::do_shutdown(slf),
                SslState::Unwrapped => Ok(()),
            }
        })
    }

    fn eof_received(slf: &Bound<'_, Self>) -> PyResult<Option<bool>> {
        Self::in_lower_callback(slf, || {
            let py = slf.py();
            let this = slf.get();
            this.st.with(py, |s| s.eof_received = true);
            let r = (|| -> PyResult<Option<bool>> {
                if this.debug(py) {
                    this.log(
                        py,
                        "debug",
                        PyTuple::new(
                            py,
                            [
                                "%r received EOF".into_pyobject(py)?.into_any(),
                                slf.clone().into_any(),
                            ],
                        )?,
                    )?;
                }
                match this.state(py) {
                    SslState::DoHandshake => {
                        let exc = py.get_type::<PyConnectionResetError>().into_any();
                        Self::on_handshake_complete(slf, Some(exc))?;
                    }
                    SslState::Wrapped => {
                        this.set_state(py, SslState::Flushing)?;
                        if this.st.with(py, |s| s.app_reading_paused) {
                            return Ok(Some(true));
                        }
                        Self::do_flush(slf)?;
                    }
                    SslState::Flushing => {
                        Self::do_write(slf)?;
                        this.set_state(py, SslState::Shutdown)?;
                        Self::do_shutdown(slf)?;
                    }
                    SslState::Shutdown => Self::do_shutdown(slf)?,
                    SslState::Unwrapped => {}
                }
                Ok(None)
            })();
            match r {
                Err(e) if is_exception(py, &e) => {
                    if let Some(t) = this.transport(py) {
                        t.bind(py).call_method0(pyo3::intern!(py, "close"))?;
                    }
                    Err(e)
                }
                r => r,
            }
        })
    }

    /// The lower transport's buffer went over its high-water mark.
    fn pause_writing(&self, py: Python<'_>) -> PyResult<()> {
        let was = self
            .st
            .with(py, |s| std::mem::replace(&mut s.ssl_writing_paused, true));
        if was {
            return Err(PyAssertionError::new_err(()));
        }
        Ok(())
    }

    /// The lower transport's buffer drained below its low-water mark.
    fn resume_writing(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::in_lower_callback(slf, || {
            let py = slf.py();
            let was = slf
                .get()
                .st
                .with(py, |s| std::mem::replace(&mut s.ssl_writing_paused, false));
            if !was {
                return Err(PyAssertionError::new_err(()));
            }
            Self::process_outgoing(slf)
        })
    }

    // ---- callbacks the loop runs ----------------------------------------------

    fn _check_handshake_timeout(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if this.state(py) == SslState::DoHandshake {
            let msg = format!(
                "SSL handshake is taking longer than {} seconds: aborting the connection",
                this.handshake_timeout.bind(py).str()?
            );
            let exc = PyConnectionAbortedError::new_err(msg);
            Self::fatal_error(slf, exc.value(py).as_any(), "Fatal error on transport")?;
        }
        Ok(())
    }

    fn _check_shutdown_timeout(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if matches!(this.state(py), SslState::Flushing | SslState::Shutdown) {
            if let Some(t) = this.transport(py) {
                let exc = consts(py)?
                    .timeout_error
                    .bind(py)
                    .call1(("SSL shutdown timed out",))?;
                t.bind(py)
                    .call_method1(pyo3::intern!(py, "_force_close"), (exc,))?;
            }
        }
        Ok(())
    }

    fn _do_read(slf: &Bound<'_, Self>) -> PyResult<()> {
        // Scheduled in the connection's context.
        Self::in_lower_callback(slf, || Self::do_read(slf))
    }

    fn _start_shutdown(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::start_shutdown(slf)
    }

    /// Scheduled by resume_reading(): pick up where reading stopped.
    fn _resume_app_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        // Scheduled in the connection's context.
        Self::in_lower_callback(slf, || match slf.get().state(slf.py()) {
            SslState::Wrapped => Self::do_read(slf),
            SslState::Flushing => Self::do_flush(slf),
            SslState::Shutdown => Self::do_shutdown(slf),
            _ => Ok(()),
        })
    }

    // ---- the application transport ------------------------------------------------

    /// transport.write()
    fn _app_write(slf: &Bound<'_, Self>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        if !(data.is_instance_of::<PyBytes>()
            || data.is_instance_of::<PyByteArray>()
            || data.is_instance_of::<PyMemoryView>())
        {
            return Err(PyTypeError::new_err(format!(
                "data: expecting a bytes-like instance, got {}",
                data.get_type().name()?
            )));
        }
        if !data.is_truthy()? {
            return Ok(());
        }
        Self::write_appdata(slf, std::iter::once(Ok(data.clone())))
    }

    /// transport.writelines()
    fn _app_writelines(slf: &Bound<'_, Self>, list_of_data: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::write_appdata(slf, list_of_data.try_iter()?)
    }

    fn _app_is_closing(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.app_closed)
    }

    #[getter(_app_closed)]
    fn get_app_closed(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.app_closed)
    }

    #[setter(_app_closed)]
    fn set_app_closed(&self, py: Python<'_>, value: bool) {
        self.st.with(py, |s| s.app_closed = value);
    }

    /// transport.close(): flush, then shut TLS down. False when the
    /// transport was closed already.
    fn _app_close(slf: &Bound<'_, Self>) -> PyResult<bool> {
        let first = slf
            .get()
            .st
            .with(slf.py(), |s| !std::mem::replace(&mut s.app_closed, true));
        if first {
            Self::in_app_context(slf, || Self::start_shutdown(slf))?;
        }
        Ok(first)
    }

    /// transport.abort() / transport._force_close(exc).
    #[pyo3(signature = (exc=None))]
    fn _abort(slf: &Bound<'_, Self>, exc: Option<Bound<'_, PyAny>>) -> PyResult<()> {
        slf.get().st.with(slf.py(), |s| s.app_closed = true);
        Self::in_app_context(slf, || {
            Self::abort(slf, exc.as_ref().filter(|e| !e.is_none()))
        })
    }

    fn _app_is_reading(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| !s.app_reading_paused)
    }

    fn _pause_reading(&self, py: Python<'_>) {
        self.st.with(py, |s| s.app_reading_paused = true);
    }

    fn _resume_reading(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let was = slf
            .get()
            .st
            .with(py, |s| std::mem::replace(&mut s.app_reading_paused, false));
        if was {
            let cb = slf.getattr(pyo3::intern!(py, "_resume_app_reading"))?;
            Self::call_soon_in_ctx(slf, cb, &[])?;
        }
        Ok(())
    }

    /// A copy of the connection's context (None before connection_made()):
    /// for start_tls() over this transport.
    fn _copy_context(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self
            .st
            .with(py, |s| s.ctx.as_ref().map(|c| c.clone_ref(py)))
        {
            Some(c) => Ok(Some(
                c.bind(py).call_method0(pyo3::intern!(py, "copy"))?.unbind(),
            )),
            None => Ok(None),
        }
    }

    fn _get_write_buffer_size(&self, py: Python<'_>) -> PyResult<usize> {
        self.write_buffer_size(py)
    }

    fn _get_write_buffer_limits(&self, py: Python<'_>) -> (i64, i64) {
        self.st.with(py, |s| (s.outgoing_low, s.outgoing_high))
    }

    #[pyo3(signature = (high=None, low=None))]
    fn _set_write_buffer_limits(
        slf: &Bound<'_, Self>,
        high: Option<Bound<'_, PyAny>>,
        low: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let (hi, lo) =
            add_flowcontrol_defaults(high.as_ref(), low.as_ref(), consts(py)?.write_high_kib)?;
        slf.get().st.with(py, |s| {
            s.outgoing_high = hi;
            s.outgoing_low = lo;
        });
        let out = pending(slf.get().outgoing.bind(py))?;
        Self::in_app_context(slf, || Self::control_app_writing(slf, out))
    }

    fn _get_read_buffer_size(&self, py: Python<'_>) -> PyResult<usize> {
        self.incoming_pending(py)
    }

    fn _get_read_buffer_limits(&self, py: Python<'_>) -> (i64, i64) {
        self.st.with(py, |s| (s.incoming_low, s.incoming_high))
    }

    #[pyo3(signature = (high=None, low=None))]
    fn _set_read_buffer_limits(
        slf: &Bound<'_, Self>,
        high: Option<Bound<'_, PyAny>>,
        low: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let py = slf.py();
        let (hi, lo) =
            add_flowcontrol_defaults(high.as_ref(), low.as_ref(), consts(py)?.read_high_kib)?;
        slf.get().st.with(py, |s| {
            s.incoming_high = hi;
            s.incoming_low = lo;
        });
        Self::control_ssl_reading(slf)
    }

    #[pyo3(signature = (name, default=None))]
    fn _get_extra_info(
        slf: &Bound<'_, Self>,
        name: &Bound<'_, PyAny>,
        default: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let py = slf.py();
        let this = slf.get();
        if let Some(v) = this.extra.bind(py).get_item(name)? {
            return Ok(v.unbind());
        }
        // uvloop's key for its SSL protocol object: code written for uvloop
        // reaches the protocol (its flow-control interface) through it.
        if name.eq(pyo3::intern!(py, "uvloop.sslproto"))? {
            return Ok(slf.clone().into_any().unbind());
        }
        match this.transport(py) {
            Some(t) => Ok(t
                .bind(py)
                .call_method1(pyo3::intern!(py, "get_extra_info"), (name, default))?
                .unbind()),
            None => Ok(default.map(Bound::unbind).unwrap_or_else(|| py.None())),
        }
    }

    fn _set_app_protocol(&self, py: Python<'_>, protocol: Bound<'_, PyAny>) -> PyResult<()> {
        let app = Self::make_app(py, &protocol)?;
        let old = self.st.with(py, |s| s.app.replace(app));
        drop(old);
        Ok(())
    }

    /// transport._protocol_paused (the sendfile fallback reads it).
    #[getter]
    fn _app_writing_paused(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.app_writing_paused)
    }

    #[pyo3(name = "_test__append_write_backlog")]
    fn test_append_write_backlog(&self, py: Python<'_>, data: Bound<'_, PyAny>) -> PyResult<()> {
        let n = data.len()?;
        self.st.with(py, |s| {
            s.backlog.push_back(data.unbind());
            s.write_buffer_size += n;
        });
        Ok(())
    }

    // ---- asyncio's attribute names, for introspection ---------------------------

    #[getter]
    fn _app_protocol(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.app_protocol(py)
    }

    #[getter]
    fn _app_transport(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.app_transport(py)
    }

    #[getter]
    fn _transport(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.transport(py)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.lp.clone_ref(py)
    }

    #[getter]
    fn _sslcontext(&self, py: Python<'_>) -> Py<PyAny> {
        self.sslcontext.clone_ref(py)
    }

    #[getter]
    fn _sslobj(&self, py: Python<'_>) -> Py<PyAny> {
        self.sslobj.clone_ref(py)
    }

    #[getter]
    fn _incoming(&self, py: Python<'_>) -> Py<PyAny> {
        self.incoming.clone_ref(py)
    }

    #[getter]
    fn _outgoing(&self, py: Python<'_>) -> Py<PyAny> {
        self.outgoing.clone_ref(py)
    }

    #[getter]
    fn _extra(&self, py: Python<'_>) -> Py<PyDict> {
        self.extra.clone_ref(py)
    }

    #[getter]
    fn _server_side(&self) -> bool {
        self.server_side
    }

    #[getter]
    fn _server_hostname(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.server_hostname.as_ref().map(|h| h.clone_ref(py))
    }

    #[getter]
    fn _ssl_handshake_timeout(&self, py: Python<'_>) -> Py<PyAny> {
        self.handshake_timeout.clone_ref(py)
    }

    #[getter]
    fn _ssl_shutdown_timeout(&self, py: Python<'_>) -> Py<PyAny> {
        self.shutdown_timeout.clone_ref(py)
    }

    #[getter]
    fn _write_buffer_size(&self, py: Python<'_>) -> usize {
        self.st.with(py, |s| s.write_buffer_size)
    }

    #[getter]
    fn _conn_lost(&self, py: Python<'_>) -> u32 {
        self.st.with(py, |s| s.conn_lost)
    }

    #[getter]
    fn _eof_received(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.eof_received)
    }

    #[getter]
    fn _ssl_writing_paused(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.ssl_writing_paused)
    }

    #[getter]
    fn _ssl_reading_paused(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.ssl_reading_paused)
    }

    #[getter]
    fn _app_reading_paused(&self, py: Python<'_>) -> bool {
        self.st.with(py, |s| s.app_reading_paused)
    }

    /// The state as asyncio's SSLProtocolState member (its name before 3.11).
    #[getter]
    fn _state(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let name = self.state(py).name();
        match &consts(py)?.state_enum {
            Some(e) => Ok(e.bind(py).getattr(name)?.unbind()),
            None => Ok(pyo3::types::PyString::new(py, name).into_any().unbind()),
        }
    }

    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.lp)?;
        visit.call(&self.sslcontext)?;
        visit.call(&self.sslobj)?;
        visit.call(&self.incoming)?;
        visit.call(&self.outgoing)?;
        visit.call(&self.extra)?;
        visit.call(&self.server_hostname)?;
        visit.call(&self.handshake_timeout)?;
        visit.call(&self.shutdown_timeout)?;
        visit.call(&self.incoming_write)?;
        visit.call(&self.outgoing_read)?;
        visit.call(&self.ssl_read)?;
        visit.call(&self.ssl_write)?;
        visit.call(&self.ssl_pending)?;
        visit.call(&self.ssl_do_handshake)?;
        visit.call(&self.ssl_shutdown)?;
        visit.call(&self.read_buffer)?;
        visit.call(&self.wrap_error)?;
        if let Some(r) = self.st.try_with(|s| -> Result<(), PyTraverseError> {
            visit.call(&s.transport)?;
            visit.call(&s.transport_write)?;
            if let Some(a) = &s.app {
                visit.call(&a.protocol)?;
                visit.call(&a.data_received)?;
                visit.call(&a.get_buffer)?;
                visit.call(&a.buffer_updated)?;
            }
            visit.call(&s.app_transport)?;
            visit.call(&s.waiter)?;
            for d in &s.backlog {
                visit.call(d)?;
            }
            visit.call(&s.handshake_timeout_handle)?;
            visit.call(&s.shutdown_timeout_handle)?;
            visit.call(&s.ctx)?;
            Ok(())
        }) {
            r?;
        }
        Ok(())
    }

    fn __clear__(&self) {
        let old = self.st.try_with(|s| {
            (
                s.transport.take(),
                s.transport_write.take(),
                s.app.take(),
                s.app_transport.take(),
                s.waiter.take(),
                std::mem::take(&mut s.backlog),
                s.handshake_timeout_handle.take(),
                s.shutdown_timeout_handle.take(),
                s.ctx.take(),
            )
        });
        drop(old);
    }
}
