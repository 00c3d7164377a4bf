//! Native halves of the sock_* methods (asyncio's "low-level socket
//! operations"). Each tries the operation at once; if the socket would block
//! it registers a native operation on the loop's private epoll and returns a
//! future that the operation resolves when the socket is ready. The Python
//! wrappers in tokioloop/_loop.py check arguments, resolve addresses and
//! await the future when one is returned (and drop the operation if that
//! await is cancelled).
//!
//! recv, recv_into and sendall are plain syscalls on the socket's fd (with
//! the socket module's error reporting); accept, connect, recvfrom, sendto
//! go through the socket object's own methods (address formats, new socket
//! objects).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pyo3::exceptions::{
    PyBlockingIOError, PyInterruptedError, PyKeyboardInterrupt, PySystemExit, PyValueError,
};
use pyo3::ffi;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use pyo3::PyTraverseError;

use super::core::{fileobj_to_fd, LoopCore};
use super::oserror;
use super::recycle;
use super::selector::{Watcher, READ, WRITE};

/// The fd of a sock_* method's socket. A closed socket.socket (fileno()
/// -1) gives OSError(EBADF), as the socket's own methods raise for it,
/// rather than the ValueError of an invalid fd.
fn sock_fd(sock: &Bound<'_, PyAny>) -> PyResult<RawFd> {
    fileobj_to_fd(sock).map_err(|e| {
        let py = sock.py();
        let closed = e.is_instance_of::<PyValueError>(py)
            && sock
                .call_method0(pyo3::intern!(py, "fileno"))
                .and_then(|f| f.extract::<i64>())
                .is_ok_and(|f| f == -1);
        if closed {
            oserror::from_errno(py, libc::EBADF)
        } else {
            e
        }
    })
}

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

/// While a native operation is pending on a socket.socket, the socket's
/// close() is deferred, through the socket's own io-ref count (the one
/// makefile() streams use): the fd cannot be closed, and its number reused
/// by another file, under the operation. Dropping the IoRef (the operation
/// finished, was abandoned or the loop closed) completes a deferred close.
pub(crate) struct IoRef(Option<Py<PyAny>>);

impl IoRef {
    pub(crate) fn take(sock: &Bound<'_, PyAny>) -> IoRef {
        let py = sock.py();
        let name = pyo3::intern!(py, "_io_refs");
        // Only socket.socket (and subclasses) have the io-ref protocol.
        let Ok(n) = sock.getattr(name).and_then(|n| n.extract::<isize>()) else {
            return IoRef(None);
        };
        if sock.setattr(name, n + 1).is_err() {
            return IoRef(None);
        }
        IoRef(Some(sock.clone().unbind()))
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.0)
    }
}

impl Drop for IoRef {
    fn drop(&mut self) {
        if let Some(sock) = self.0.take() {
            // Watchers are dropped outside the loop-state borrow, on the
            // loop's thread; attach is a no-op when the GIL is held.
            Python::attach(|py| {
                let sock = sock.bind(py);
                if let Err(e) = sock.call_method0(pyo3::intern!(py, "_decref_socketios")) {
                    e.write_unraisable(py, Some(sock));
                }
            });
        }
    }
}

fn would_block(py: Python<'_>, e: &PyErr) -> bool {
    e.is_instance_of::<PyBlockingIOError>(py) || e.is_instance_of::<PyInterruptedError>(py)
}

fn fut_done(fut: &Bound<'_, PyAny>) -> PyResult<bool> {
    fut.call_method0(pyo3::intern!(fut.py(), "done"))?
        .is_truthy()
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Run a ready operation (called from the loop's ready queue).
pub(crate) fn run_op(
    slf: &Bound<'_, LoopCore>,
    fd: RawFd,
    kind: u32,
    op: Arc<dyn SockOp>,
) -> PyResult<()> {
    let py = slf.py();
    if !slf.get().has_op(py, fd, kind, op.id()) {
        // Replaced or abandoned since the event was queued: its socket may
        // be closed by now, so do not touch the fd.
        return Ok(());
    }
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
            fut.call_method1(pyo3::intern!(py, "set_result"), (v,))?;
            Ok(())
        }
        Err(e) => {
            slf.get().remove_op(py, fd, kind, op.id());
            fut.call_method1(pyo3::intern!(py, "set_exception"), (e.value(py),))?;
            Ok(())
        }
    }
}

/// recv(2) of at most `n` bytes into a new bytes object; None on EAGAIN.
fn recv_bytes<'py>(
    lp: &LoopCore,
    py: Python<'py>,
    fd: RawFd,
    n: usize,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    if n == 0 {
        return Ok(Some(PyBytes::new(py, b"").into_any()));
    }
    // Reads into the loop's buffer, then exactly what arrived is copied into
    // bytes; once reads come in large (or can be larger than that buffer)
    // they go straight into a bytes object of n bytes, shrunk to what
    // arrived, which saves copying them (as for transports, stream.rs).
    use crate::transports::stream::{DIRECT_READ_MIN, MAX_READ};
    let direct =
        n > MAX_READ || (n >= DIRECT_READ_MIN && lp.big_sock_reads.load(Ordering::Relaxed));
    let r = if direct {
        recv_direct(py, fd, n)
    } else {
        recv_copy(lp, py, fd, n)
    };
    if let Ok(Some((_, got))) = &r {
        lp.count_read(*got);
        lp.big_sock_reads
            .store(*got >= DIRECT_READ_MIN, Ordering::Relaxed);
    }
    r.map(|o| o.map(|(b, _)| b))
}

/// recv_bytes through the loop's read buffer (n <= MAX_READ).
fn recv_copy<'py>(
    lp: &LoopCore,
    py: Python<'py>,
    fd: RawFd,
    n: usize,
) -> PyResult<Option<(Bound<'py, PyAny>, usize)>> {
    let r = lp.with_read_buffer(py, |buf| loop {
        // SAFETY: `buf` is writable for at least MAX_READ >= n bytes; fd
        // is the socket's (a bad fd is reported through errno).
        let got = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), n, libc::MSG_DONTWAIT) };
        if got >= 0 {
            let got = got as usize;
            break Ok((PyBytes::new(py, &buf[..got]), got));
        }
        match errno() {
            libc::EINTR => continue,
            e => break Err(e),
        }
    });
    match r {
        Ok((b, got)) => Ok(Some((b.into_any(), got))),
        Err(libc::EAGAIN) => Ok(None),
        Err(e) => Err(oserror::from_errno(py, e)),
    }
}

/// recv_bytes straight into a new bytes object of n bytes.
fn recv_direct<'py>(
    py: Python<'py>,
    fd: RawFd,
    n: usize,
) -> PyResult<Option<(Bound<'py, PyAny>, usize)>> {
    let obj = recycle::uninit_bytes(py, n)?;
    let got = loop {
        // SAFETY: the new bytes object's buffer holds n writable bytes.
        let got = unsafe {
            libc::recv(
                fd,
                ffi::PyBytes_AsString(obj.as_ptr()).cast(),
                n,
                libc::MSG_DONTWAIT,
            )
        };
        if got >= 0 || errno() != libc::EINTR {
            break got;
        }
    };
    if got < 0 {
        let e = errno();
        return if e == libc::EAGAIN {
            Ok(None)
        } else {
            Err(oserror::from_errno(py, e))
        };
    }
    let got = got as usize;
    Ok(Some((recycle::shrink(obj, got)?.into_any(), got)))
}

/// Run `f` on a contiguous buffer view of `obj` (writable if asked).
fn with_view<R>(
    obj: &Bound<'_, PyAny>,
    writable: bool,
    f: impl FnOnce(*mut u8, usize) -> R,
) -> PyResult<R> {
    let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
    let flags = if writable {
        ffi::PyBUF_WRITABLE
    } else {
        ffi::PyBUF_SIMPLE
    };
    // SAFETY: the view is released below on every path after success.
    if unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), view.as_mut_ptr(), flags) } < 0 {
        return Err(PyErr::fetch(obj.py()));
    }
    // SAFETY: initialised by the successful call above.
    let mut view = unsafe { view.assume_init() };
    let r = f(view.buf.cast(), view.len as usize);
    // SAFETY: released exactly once.
    unsafe { ffi::PyBuffer_Release(&mut view) };
    Ok(r)
}

/// recv(2) into a writable buffer; None on EAGAIN.
fn recv_into<'py>(
    lp: &LoopCore,
    py: Python<'py>,
    fd: RawFd,
    buf: &Bound<'py, PyAny>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    let r = with_view(buf, true, |p, len| loop {
        if len == 0 {
            break Ok(0usize);
        }
        // SAFETY: `p` points to `len` writable bytes for the view's life.
        let got = unsafe { libc::recv(fd, p.cast(), len, libc::MSG_DONTWAIT) };
        if got >= 0 {
            break Ok(got as usize);
        }
        match errno() {
            libc::EINTR => continue,
            e => break Err(e),
        }
    })?;
    match r {
        Ok(n) => {
            lp.count_read(n);
            Ok(Some(n.into_pyobject(py)?.into_any()))
        }
        Err(libc::EAGAIN) => Ok(None),
        Err(e) => Err(oserror::from_errno(py, e)),
    }
}

/// send(2) of `data[pos..]` until done or EAGAIN; the new position.
fn send_from(
    py: Python<'_>,
    fd: RawFd,
    data: &Bound<'_, PyAny>,
    mut pos: usize,
) -> PyResult<(usize, usize)> {
    let r = with_view(data, false, |p, len| {
        while pos < len {
            // SAFETY: `p` points to `len` readable bytes for the view's life.
            let n = unsafe {
                libc::send(
                    fd,
                    p.add(pos).cast(),
                    len - pos,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                pos += n as usize;
                continue;
            }
            match errno() {
                libc::EINTR => continue,
                libc::EAGAIN => break,
                e => return Err(e),
            }
        }
        Ok((pos, len))
    })?;
    r.map_err(|e| oserror::from_errno(py, e))
}

struct Recv {
    id: u64,
    fut: Py<PyAny>,
    lp: Py<LoopCore>,
    fd: RawFd,
    n: usize,
}

impl SockOp for Recv {
    fn id(&self) -> u64 {
        self.id
    }
    fn fut(&self) -> &Py<PyAny> {
        &self.fut
    }
    fn attempt<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        recv_bytes(self.lp.get(), py, self.fd, self.n)
    }
    fn refs(&self) -> Vec<&Py<PyAny>> {
        vec![]
    }
    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        // The loop too: a loop dropped unclosed with a pending sock_recv()
        // is a cycle through this operation (loop -> its selector -> here).
        visit.call(&self.fut)?;
        visit.call(&self.lp)
    }
}

struct RecvInto {
    id: u64,
    fut: Py<PyAny>,
    lp: Py<LoopCore>,
    fd: RawFd,
    buf: Py<PyAny>,
}

impl SockOp for RecvInto {
    fn id(&self) -> u64 {
        self.id
    }
    fn fut(&self) -> &Py<PyAny> {
        &self.fut
    }
    fn attempt<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        recv_into(self.lp.get(), py, self.fd, self.buf.bind(py))
    }
    fn refs(&self) -> Vec<&Py<PyAny>> {
        vec![&self.buf]
    }
    fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.fut)?;
        visit.call(&self.buf)?;
        visit.call(&self.lp)
    }
}

/// The rest of a sock_sendall: the data and how much of it is sent.
struct SendAll {
    id: u64,
    fut: Py<PyAny>,
    fd: RawFd,
    data: Py<PyAny>,
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
        let (pos, len) = send_from(
            py,
            self.fd,
            self.data.bind(py),
            self.pos.load(Ordering::Relaxed),
        )?;
        self.pos.store(pos, Ordering::Relaxed);
        Ok(if pos >= len {
            Some(py.None().into_bound(py))
        } else {
            None
        })
    }
    fn refs(&self) -> Vec<&Py<PyAny>> {
        vec![&self.data]
    }
}

macro_rules! method_op {
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

method_op!(RecvFrom { sock, bufsize }, |self, py| self
    .sock
    .bind(py)
    .call_method1(pyo3::intern!(py, "recvfrom"), (&self.bufsize,)));
method_op!(RecvFromInto { sock, buf, nbytes }, |self, py| self
    .sock
    .bind(py)
    .call_method1(
        pyo3::intern!(py, "recvfrom_into"),
        (&self.buf, &self.nbytes)
    ));
method_op!(
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
method_op!(Accept { sock }, |self, py| accept_now(self.sock.bind(py)));
method_op!(Connect { sock, address }, |self, py| connect_result(
    self.sock.bind(py),
    self.address.bind(py)
));

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
        return Err(pyo3::exceptions::PyOSError::new_err((
            err,
            format!("Connect call failed {}", address.repr()?),
        )));
    }
    Ok(py.None().into_bound(py))
}

fn bufsize(n: &Bound<'_, PyAny>) -> PyResult<usize> {
    let n: isize = n.extract()?;
    if n < 0 {
        return Err(PyValueError::new_err("negative buffersize in recv"));
    }
    Ok(n as usize)
}

impl LoopCore {
    /// Register `op` on `fd` for `sock`; return its future.
    fn pend<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        fd: RawFd,
        kind: u32,
        fut: Bound<'py, PyAny>,
        op: Arc<dyn SockOp>,
    ) -> PyResult<Bound<'py, PyAny>> {
        slf.get().set_watcher(
            slf.py(),
            fd,
            kind,
            Watcher::Native(op, IoRef::take(sock)),
            Some(sock),
        )?;
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
        let this = slf.get();
        this.check_closed()?;
        let fd = sock_fd(sock)?;
        let n = bufsize(n)?;
        if let Some(data) = recv_bytes(this, py, fd, n)? {
            return Ok(data);
        }
        let fut = Self::new_future(slf)?;
        let op = Arc::new(Recv {
            id: this.new_op_id(),
            fut: fut.clone().unbind(),
            lp: slf.clone().unbind(),
            fd,
            n,
        });
        Self::pend(slf, sock, fd, READ, fut, op)
    }

    fn _sock_recv_into<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        buf: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        let this = slf.get();
        this.check_closed()?;
        let fd = sock_fd(sock)?;
        if let Some(n) = recv_into(this, py, fd, buf)? {
            return Ok(n);
        }
        let fut = Self::new_future(slf)?;
        let op = Arc::new(RecvInto {
            id: this.new_op_id(),
            fut: fut.clone().unbind(),
            lp: slf.clone().unbind(),
            fd,
            buf: buf.clone().unbind(),
        });
        Self::pend(slf, sock, fd, READ, fut, op)
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
        let fd = sock_fd(sock)?;
        let fut = Self::new_future(slf)?;
        let op = Arc::new(RecvFrom {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            bufsize: bufsize.clone().unbind(),
        });
        Self::pend(slf, sock, fd, READ, fut, op)
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
        let fd = sock_fd(sock)?;
        let fut = Self::new_future(slf)?;
        let op = Arc::new(RecvFromInto {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            buf: buf.clone().unbind(),
            nbytes: nbytes.clone().unbind(),
        });
        Self::pend(slf, sock, fd, READ, fut, op)
    }

    fn _sock_sendto<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
        address: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().touch_io();
        slf.get().check_closed()?;
        try_now!(
            py,
            sock.call_method1(pyo3::intern!(py, "sendto"), (data, address))
        );
        let fd = sock_fd(sock)?;
        let fut = Self::new_future(slf)?;
        let op = Arc::new(SendTo {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            data: data.clone().unbind(),
            address: address.clone().unbind(),
        });
        Self::pend(slf, sock, fd, WRITE, fut, op)
    }

    /// Returns None when everything was sent at once, else a future.
    fn _sock_sendall<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().touch_io();
        let this = slf.get();
        this.check_closed()?;
        let fd = sock_fd(sock)?;
        let (pos, len) = send_from(py, fd, data, 0)?;
        if pos >= len {
            return Ok(py.None().into_bound(py));
        }
        // Keep what send() did not take; bytes are immutable, anything else
        // (bytearray, memoryview) is copied so later changes do not leak in.
        let data = if data.is_instance_of::<PyBytes>() {
            data.clone()
        } else {
            with_view(data, false, |p, len| {
                // SAFETY: `p` points to `len` readable bytes during the call.
                PyBytes::new(py, unsafe { std::slice::from_raw_parts(p, len) })
            })?
            .into_any()
        };
        let fut = Self::new_future(slf)?;
        let op = Arc::new(SendAll {
            id: this.new_op_id(),
            fut: fut.clone().unbind(),
            fd,
            data: data.unbind(),
            pos: AtomicUsize::new(pos),
        });
        Self::pend(slf, sock, fd, WRITE, fut, op)
    }

    /// `address` is already resolved. Returns None if connected at once.
    fn _sock_connect<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
        address: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().touch_io();
        slf.get().check_closed()?;
        match sock.call_method1(pyo3::intern!(py, "connect"), (address,)) {
            Ok(_) => return Ok(py.None().into_bound(py)),
            Err(e) if would_block(py, &e) => {}
            Err(e) => return Err(e),
        }
        let fd = sock_fd(sock)?;
        let fut = Self::new_future(slf)?;
        let op = Arc::new(Connect {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
            address: address.clone().unbind(),
        });
        Self::pend(slf, sock, fd, WRITE, fut, op)
    }

    fn _sock_accept<'py>(
        slf: &Bound<'py, Self>,
        sock: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        slf.get().check_closed()?;
        try_now!(py, accept_now(sock));
        let fd = sock_fd(sock)?;
        let fut = Self::new_future(slf)?;
        let op = Arc::new(Accept {
            id: slf.get().new_op_id(),
            fut: fut.clone().unbind(),
            sock: sock.clone().unbind(),
        });
        Self::pend(slf, sock, fd, READ, fut, op)
    }

    /// An awaited sock_* future was cancelled (or its await failed): stop
    /// the operation that would resolve it.
    fn _sock_abandon(
        &self,
        py: Python<'_>,
        sock: &Bound<'_, PyAny>,
        fut: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let Ok(fd) = fileobj_to_fd(sock) else {
            return Ok(()); // closed socket: its registration is gone with it
        };
        for kind in [READ, WRITE] {
            if let Some(id) = self.op_for_future(py, fd, kind, fut) {
                self.remove_op(py, fd, kind, id);
            }
        }
        Ok(())
    }
}
