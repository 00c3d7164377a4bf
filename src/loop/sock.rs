//! Native halves of the sock_* methods (asyncio's "low-level socket
//! operations"). Each tries the operation at once; if the socket would block
//! it registers a native watcher on the loop's level-triggered epoll and
//! returns a future that the watcher resolves. The Python wrappers in
//! tokioloop/_loop.py do argument checks and address resolution and await
//! the future when one is returned.
//!
//! Operations go through the Python socket object's own methods, so errors,
//! timeouts and address formats are exactly the socket module's.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pyo3::exceptions::{
    PyBlockingIOError, PyInterruptedError, PyKeyboardInterrupt, PyOSError, PySystemExit,
};
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::PyTraverseError;

use super::core::{fileobj_to_fd, LoopCore};
use super::selector::{Watcher, READ, WRITE};

/// An operation retried each time its fd is ready, until it finishes.
pub(crate) trait SockOp: Send + Sync {
    fn id(&self) -> u64;
    fn fut(&self) -> &Py<PyAny>;
    /// Ok(Some(result)): finished. Ok(None) or a BlockingIOError: try again
    /// on the next readiness.
    fn attempt<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>>;
    fn refs(&self) -> Vec<&Py<PyAny>>;
    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(self.fut())?;
        for r in self.refs() {
            visit.call(r)?;
        }
        Ok(())
    }
}

fn would_block(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyBlockingIOError>(py) || e.is_instance_of::<PyInterruptedError>(py)
}

fn fut_done(fut: &Bound<'_, PyAny>) -> PyResult<bool> {
    fut.call_method0(pyo3::intern!(fut.py(), "done"))?
        .is_truthy()
}

/// Run a ready operation (called from the loop's ready queue).
pub(crate) fn run_op(
    slf: &Bound<'_, LoopCore>,
    fd: RawFd,
    kind: u32,
    op: Arc<dyn SockOp>,
) -> PyResult<()> {
    let py = slf.py();
    let fut = op.fut().bind(py);
    if fut_done(fut)? {
        slf.get().remove_op(py, fd, kind, op.id());
        return Ok(());
    }
    match op.attempt(py) {
        Ok(None) => Ok(()),
        Err(e) if would_block(py, &e) => Ok(()),
        Err(e)
            if e.is_instance_of::<PyKeyboardInterrupt>(py)
                || e.is_instance_of::<PySystemExit>(py) =>
        {
            Err(e)
        }
        Ok(Some(v)) => {
            slf.get().remove_op(py, fd, kind, op.id());
            if !fut_done(fut)? {
                fut.call_method1(pyo3::intern!(py, "set_result"), (v,))?;
            }
            Ok(())
        }
        Err(e) => {
            slf.get().remove_op(py, fd, kind, op.id());
            if !fut_done(fut)? {
                fut.call_method1(pyo3::intern!(py, "set_exception"), (e.value(py),))?;
            }
            Ok(())
        }
    }
}

/// Done-callback of a pending operation's future: when the future finishes
/// (typically: cancelled by a timeout), stop watching the fd.
#[pyclass(frozen, module = "tokioloop._tokioloop")]
struct SockOpDone {
    lp: Py<LoopCore>,
    fd: RawFd,
    kind: u32,
    id: u64,
}

#[pymethods]
impl SockOpDone {
    fn __call__(&self, py: Python<'_>, _fut: &Bound<'_, PyAny>) {
        self.lp
            .bind(py)
            .get()
            .remove_op(py, self.fd, self.kind, self.id);
    }
}

macro_rules! simple_op {
    ($name:ident { $($field:ident),* }, |$self_:ident, $py:ident| $body:expr) => {
        struct $name {
            id: u64,
            fut: Py<PyAny>,
            $($field: Py<PyAny>,)*
        }
        impl SockOp for $name {
            fn id(&self) -> u64 { self.id }
            fn fut(&self) -> &Py<PyAny> { &self.fut }
            fn attempt<'py>(&$self_, $py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
                $body.map(Some)
            }
            fn refs(&self) -> Vec<&Py<PyAny>> { vec![$(&self.$field),*] }
        }
    };
}

simple_op!(Recv { sock, n }, |self, py| self
    .sock
    .bind(py)
    .call_method1(pyo3::intern!(py, "recv"), (&self.n,)));
simple_op!(RecvInto { sock, buf }, |self, py| self
    .sock
    .bind(py)
    .call_method1(pyo3::intern!(py, "recv_into"), (&self.buf,)));
simple_op!(RecvFrom { sock, bufsize }, |self, py| self
    .sock
    .bind(py)
    .call_method1(pyo3::intern!(py, "recvfrom"), (&self.bufsize,)));
simple_op!(RecvFromInto { sock, buf, nbytes }, |self, py| self
    .sock
    .bind(py)
    .call_method1(
        pyo3::intern!(py, "recvfrom_into"),
        (&self.buf, &self.nbytes)
    ));
simple_op!(
    SendTo {
        sock,
        data,
        address
    },
    |self, py| self
        .sock
        .bind(py)
        .call_method1(pyo3::intern!(py, "sendto"), (&self.data, &self.address))
);
simple_op!(Accept { sock }, |self, py| accept_now(self.sock.bind(py)));
simple_op!(Connect { sock, address }, |self, py| connect_result(
    self.sock.bind(py),
    self.address.bind(py)
));

/// The rest of a sock_sendall: a memoryview of the data and how much of it
/// is sent.
struct SendAll {
    id: u64,
    fut: Py<PyAny>,
    sock: Py<PyAny>,
    view: Py<PyAny>,
    len: usize,
    pos: AtomicUsize,
}

impl SockOp for SendAll {
    fn id(&self) -> u64 {
        self.id
    }
    fn fut(&self) -> &Py<PyAny> {
        &self.fut
    }
    fn attempt<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let pos = self.pos.load(Ordering::Relaxed);
        let rest = self.view.bind(py).get_item(pyo3::types::PySlice::new(
            py,
            pos as isize,
            self.len as isize,
            1,
        ))?;
        let n: usize = self
            .sock
            .bind(py)
            .call_method1(pyo3::intern!(py, "send"), (rest,))?
            .extract()?;
        let pos = pos + n;
        self.pos.store(pos, Ordering::Relaxed);
        if pos >= self.len {
            Ok(Some(py.None().into_bound(py)))
        } else {
            Ok(None)
        }
    }
    fn refs(&self) -> Vec<&Py<PyAny>> {
        vec![&self.sock, &self.view]
    }
}

fn accept_now<'py>(sock: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = sock.py();
    let pair = sock.call_method0(pyo3::intern!(py, "accept"))?;
    let conn = pair.get_item(0)?;
    conn.call_method1(pyo3::intern!(py, "setblocking"), (false,))?;
    Ok(pair)
}

/// After a non-blocking connect() reported writability: did it succeed?
fn connect_result<'py>(
    sock: &Bound<'py, PyAny>,
    address: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = sock.py();
    let err: i32 = sock
        .call_method1(
            pyo3::intern!(py, "getsockopt"),
            (libc::SOL_SOCKET, libc::SO_ERROR),
        )?
        .extract()?;
    if err != 0 {
        return Err(PyOSError::new_err((
            err,
            format!("Connect call failed {}", address.repr()?),
        )));
    }
    Ok(py.None().into_bound(py))
}

impl LoopCore {
    /// Register `op` on `fd` and arrange for it to be unregistered when its
    /// future finishes; return the future.
    fn pend<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        kind: u32,
        fut: Bound<'py, PyAny>,
        op: Arc<dyn SockOp>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let fd = fileobj_to_fd(sock)?;
        let id = op.id();
        slf.get().set_watcher(py, fd, kind, Watcher::Native(op))?;
        let done = Py::new(
            py,
            SockOpDone {
                lp: slf.clone().unbind(),
                fd,
                kind,
                id,
            },
        )?;
        fut.call_method1(pyo3::intern!(py, "add_done_callback"), (done,))?;
        Ok(fut)
    }

    fn new_future<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        slf.call_method0(pyo3::intern!(slf.py(), "create_future"))
    }
}

macro_rules! try_now {
    ($py:expr, $e:expr) => {
        match $e {
            Ok(v) => return Ok(v),
            Err(e) if would_block($py, &e) => {}
            Err(e) => return Err(e),
        }
    };
}

#[pymethods]
impl LoopCore {
    fn _sock_recv<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        n: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(py, sock.call_method1(pyo3::intern!(py, "recv"), (n,)));
        let fut = Self::new_future(slf)?;
        let op = Arc::new(Recv {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            n: n.clone().unbind(),
        });
        Self::pend(slf, sock, READ, fut, op)
    }

    fn _sock_recv_into<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        buf: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(
            py,
            sock.call_method1(pyo3::intern!(py, "recv_into"), (buf,))
        );
        let fut = Self::new_future(slf)?;
        let op = Arc::new(RecvInto {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            buf: buf.clone().unbind(),
        });
        Self::pend(slf, sock, READ, fut, op)
    }

    fn _sock_recvfrom<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        bufsize: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(
            py,
            sock.call_method1(pyo3::intern!(py, "recvfrom"), (bufsize,))
        );
        let fut = Self::new_future(slf)?;
        let op = Arc::new(RecvFrom {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            bufsize: bufsize.clone().unbind(),
        });
        Self::pend(slf, sock, READ, fut, op)
    }

    fn _sock_recvfrom_into<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        buf: &Bound<'py, PyAny>,
        nbytes: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(
            py,
            sock.call_method1(pyo3::intern!(py, "recvfrom_into"), (buf, nbytes))
        );
        let fut = Self::new_future(slf)?;
        let op = Arc::new(RecvFromInto {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            buf: buf.clone().unbind(),
            nbytes: nbytes.clone().unbind(),
        });
        Self::pend(slf, sock, READ, fut, op)
    }

    fn _sock_sendto<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        address: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(
            py,
            sock.call_method1(pyo3::intern!(py, "sendto"), (data, address))
        );
        let fut = Self::new_future(slf)?;
        let op = Arc::new(SendTo {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            data: data.clone().unbind(),
            address: address.clone().unbind(),
        });
        Self::pend(slf, sock, WRITE, fut, op)
    }

    /// Returns None when everything was sent at once, else a future.
    fn _sock_sendall<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        let view = pyo3::types::PyMemoryView::from(data)?;
        let len = view.len()?;
        let nbytes: usize = view.getattr(pyo3::intern!(py, "nbytes"))?.extract()?;
        let view = if nbytes != len {
            // Not a byte buffer: send it as bytes, as socket.send would see it.
            view.call_method1(pyo3::intern!(py, "cast"), ("B",))?
        } else {
            view.into_any()
        };
        let n: usize = match sock.call_method1(pyo3::intern!(py, "send"), (&view,)) {
            Ok(n) => n.extract()?,
            Err(e) if would_block(py, &e) => 0,
            Err(e) => return Err(e),
        };
        if n >= nbytes {
            return Ok(py.None().into_bound(py));
        }
        let fut = Self::new_future(slf)?;
        let op = Arc::new(SendAll {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            view: view.unbind(),
            len: nbytes,
            pos: AtomicUsize::new(n),
        });
        Self::pend(slf, sock, WRITE, fut, op)
    }

    /// `address` is already resolved. Returns None if connected at once.
    fn _sock_connect<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        address: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        match sock.call_method1(pyo3::intern!(py, "connect"), (address,)) {
            Ok(_) => return Ok(py.None().into_bound(py)),
            Err(e) if would_block(py, &e) => {}
            Err(e) => return Err(e),
        }
        let fut = Self::new_future(slf)?;
        let op = Arc::new(Connect {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            address: address.clone().unbind(),
        });
        Self::pend(slf, sock, WRITE, fut, op)
    }

    fn _sock_accept<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(py, accept_now(sock));
        let fut = Self::new_future(slf)?;
        let op = Arc::new(Accept {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
        });
        Self::pend(slf, sock, READ, fut, op)
    }
}
