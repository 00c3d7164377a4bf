//! The hot paths of datagram (UDP) transports.
//!
//! The transport class is the standard library's datagram transport for
//! the running Python version (tokioloop/_transports.py subclasses it), so
//! buffering, flow control and version differences are asyncio's own. Two
//! things are native: receiving (a level-triggered reader on the loop that
//! receives into the loop's shared buffer, converts the peer address and
//! calls datagram_received, instead of a 256 KiB bytes object and a Python
//! call per datagram) and the common case of sendto (nothing buffered).

use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyMemoryView, PyString, PyTuple};

use crate::event_loop::cell::GilCell;
use crate::event_loop::core::LoopCore;
use crate::event_loop::handle::{copy_context, run_in_context};
use crate::event_loop::selector::NativeReader;

/// Datagrams received per readiness event at most (then other callbacks
/// get their turn; the fd stays ready and is served next iteration).
const BATCH: usize = 16;

/// The protocol's callbacks, bound once. asyncio looks them up only when it
/// calls them, so a protocol may lack one it never needs (a send-only
/// protocol has no datagram_received(); asyncio.BaseProtocol has no
/// error_received()): a missing one is looked up again at the call, which
/// then fails as asyncio's would.
struct Cached {
    protocol: Py<PyAny>,
    datagram_received: Option<Py<PyAny>>,
    error_received: Option<Py<PyAny>>,
}

/// One protocol callback: the bound method, or the protocol to look it up on
/// (`Bound`s: dropping them is a plain decref, no check for the GIL).
enum Callback<'py> {
    Method(Bound<'py, PyAny>),
    Missing(Bound<'py, PyAny>, &'static str),
}

impl<'py> Callback<'py> {
    fn call1(&self, args: impl pyo3::call::PyCallArgs<'py>) -> PyResult<Bound<'py, PyAny>> {
        match self {
            Callback::Method(f) => f.call1(args),
            Callback::Missing(protocol, name) => protocol.call_method1(*name, args),
        }
    }
}

/// A peer address seen lately, as raw sockaddr and as Python object: a
/// server answers the address it got, so both directions hit it.
struct AddrCache {
    raw: Vec<u8>,
    obj: Py<PyAny>,
}

/// A destination address on the stack (a server answering a cached peer
/// allocates nothing).
struct AddrBuf {
    buf: [u8; std::mem::size_of::<libc::sockaddr_storage>()],
    len: usize,
}

impl AddrBuf {
    fn from(raw: &[u8]) -> Self {
        let mut a = AddrBuf {
            buf: [0; std::mem::size_of::<libc::sockaddr_storage>()],
            len: raw.len().min(std::mem::size_of::<libc::sockaddr_storage>()),
        };
        a.buf[..a.len].copy_from_slice(&raw[..a.len]);
        a
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The last ADDR_CACHE_SIZE peer addresses (a server talking to a few
/// clients at once converts each address once, not once per datagram).
#[derive(Default)]
struct AddrCaches {
    entries: Vec<AddrCache>,
    /// Where the next new address goes once the cache is full.
    next: usize,
}

const ADDR_CACHE_SIZE: usize = 16;

impl AddrCaches {
    fn by_raw(&self, raw: &[u8]) -> Option<&AddrCache> {
        self.entries.iter().find(|c| c.raw == raw)
    }

    fn by_obj(&self, obj: *mut ffi::PyObject) -> Option<&AddrCache> {
        self.entries.iter().find(|c| c.obj.as_ptr() == obj)
    }

    /// Add an entry; returns the one it evicts (to be dropped outside the
    /// cell: dropping a Python reference may run code).
    fn insert(&mut self, entry: AddrCache) -> Option<AddrCache> {
        if self.entries.len() < ADDR_CACHE_SIZE {
            self.entries.push(entry);
            return None;
        }
        let i = self.next % ADDR_CACHE_SIZE;
        self.next = i + 1;
        Some(std::mem::replace(&mut self.entries[i], entry))
    }
}

#[pyclass(frozen, module = "tokioloop._tokioloop", name = "DatagramCore")]
pub struct DatagramCore {
    lp: Py<LoopCore>,
    fd: RawFd,
    family: i32,
    connected: bool,
    /// The Python transport: kept alive by the loop's reader while
    /// receiving, as asyncio's selector keeps its transport alive.
    transport: Py<PyAny>,
    /// The context the transport was made in (protocol callbacks run in it).
    ctx: Py<PyAny>,
    /// True while `ctx` is entered by us (it cannot be entered twice).
    in_ctx: std::sync::atomic::AtomicBool,
    cb: GilCell<Option<Cached>>,
    addr: GilCell<AddrCaches>,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Python's (host, port[, flowinfo, scope_id]) for an IP sockaddr, as
/// socket.recvfrom() makes it; None for other families.
fn sockaddr_to_py<'py>(py: Python<'py>, raw: &[u8]) -> PyResult<Option<Bound<'py, PyAny>>> {
    if raw.len() < std::mem::size_of::<libc::sa_family_t>() {
        return Ok(None);
    }
    let family = u16::from_ne_bytes([raw[0], raw[1]]) as i32;
    if family == libc::AF_INET && raw.len() >= std::mem::size_of::<libc::sockaddr_in>() {
        // SAFETY: length checked; sockaddr_in has no invalid bit patterns.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        let port = u16::from_be(sin.sin_port);
        return Ok(Some(
            PyTuple::new(
                py,
                [
                    PyString::new(py, &ip.to_string()).into_any(),
                    port.into_pyobject(py)?.into_any(),
                ],
            )?
            .into_any(),
        ));
    }
    if family == libc::AF_INET6 && raw.len() >= std::mem::size_of::<libc::sockaddr_in6>() {
        // SAFETY: as above.
        let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
        // The host text is getnameinfo(NI_NUMERICHOST)'s, exactly what the
        // socket module produces (a scope suffix on link-local addresses).
        let mut host = [0 as libc::c_char; 64];
        // SAFETY: `raw` holds a sockaddr_in6 of the given length; `host` is
        // a writable buffer of the size passed.
        let rc = unsafe {
            libc::getnameinfo(
                raw.as_ptr().cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                host.as_mut_ptr(),
                host.len() as libc::socklen_t,
                std::ptr::null_mut(),
                0,
                libc::NI_NUMERICHOST,
            )
        };
        let text = if rc == 0 {
            // SAFETY: getnameinfo NUL-terminated it.
            unsafe { std::ffi::CStr::from_ptr(host.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        } else {
            Ipv6Addr::from(sin6.sin6_addr.s6_addr).to_string()
        };
        let port = u16::from_be(sin6.sin6_port);
        return Ok(Some(
            PyTuple::new(
                py,
                [
                    PyString::new(py, &text).into_any(),
                    port.into_pyobject(py)?.into_any(),
                    u32::from_be(sin6.sin6_flowinfo)
                        .into_pyobject(py)?
                        .into_any(),
                    sin6.sin6_scope_id.into_pyobject(py)?.into_any(),
                ],
            )?
            .into_any(),
        ));
    }
    Ok(None)
}

/// Python's address for a non-IP sockaddr from recvfrom, as the socket
/// module makes it: None for an empty address, for AF_UNIX the abstract
/// name as bytes or the path as str (the file system encoding), else None.
fn other_sockaddr_to_py<'py>(py: Python<'py>, raw: &[u8]) -> Bound<'py, PyAny> {
    const PATH: usize = std::mem::size_of::<libc::sa_family_t>();
    if raw.len() < PATH || u16::from_ne_bytes([raw[0], raw[1]]) as i32 != libc::AF_UNIX {
        return py.None().into_bound(py);
    }
    let path = &raw[PATH..];
    if path.first() == Some(&0) {
        return PyBytes::new(py, path).into_any();
    }
    let len = path.iter().position(|&b| b == 0).unwrap_or(path.len());
    // SAFETY: `path[..len]` is a valid buffer of `len` bytes; the call
    // returns a new reference or NULL with an exception set.
    unsafe {
        let obj =
            ffi::PyUnicode_DecodeFSDefaultAndSize(path.as_ptr().cast(), len as ffi::Py_ssize_t);
        Bound::from_owned_ptr_or_opt(py, obj).unwrap_or_else(|| {
            PyErr::fetch(py);
            PyBytes::new(py, &path[..len]).into_any()
        })
    }
}

/// The sockaddr for a Python (host, port...) address whose host is an IP
/// literal; None when the socket module must handle it (names, scopes).
fn py_to_sockaddr(family: i32, addr: &Bound<'_, PyAny>) -> Option<Vec<u8>> {
    let t = addr.cast::<PyTuple>().ok()?;
    let host = t.get_item(0).ok()?;
    let host = host.cast::<PyString>().ok()?.to_str().ok()?.to_owned();
    let port: u16 = t.get_item(1).ok()?.extract().ok()?;
    if family == libc::AF_INET && t.len() == 2 {
        let ip: Ipv4Addr = host.parse().ok()?;
        // SAFETY: an all-zero sockaddr_in is valid; fields set below.
        let mut sin: libc::sockaddr_in = unsafe { MaybeUninit::zeroed().assume_init() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = u32::from(ip).to_be();
        // SAFETY: viewing a plain-old-data struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&sin as *const libc::sockaddr_in).cast::<u8>(),
                std::mem::size_of_val(&sin),
            )
        };
        return Some(bytes.to_vec());
    }
    if family == libc::AF_INET6 && (2..=4).contains(&t.len()) && !host.contains('%') {
        let ip: Ipv6Addr = host.parse().ok()?;
        let flow: u32 = if t.len() > 2 {
            t.get_item(2).ok()?.extract().ok()?
        } else {
            0
        };
        let scope: u32 = if t.len() > 3 {
            t.get_item(3).ok()?.extract().ok()?
        } else {
            0
        };
        // SAFETY: as above.
        let mut sin6: libc::sockaddr_in6 = unsafe { MaybeUninit::zeroed().assume_init() };
        sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sin6.sin6_port = port.to_be();
        sin6.sin6_flowinfo = flow.to_be();
        sin6.sin6_addr.s6_addr = ip.octets();
        sin6.sin6_scope_id = scope;
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&sin6 as *const libc::sockaddr_in6).cast::<u8>(),
                std::mem::size_of_val(&sin6),
            )
        };
        return Some(bytes.to_vec());
    }
    None
}

impl DatagramCore {
    /// Run `f` in the transport's context (directly if already in it).
    fn in_own_context<R>(&self, py: Python<'_>, f: impl FnOnce() -> PyResult<R>) -> PyResult<R> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.in_ctx.load(Relaxed) {
            return f();
        }
        run_in_context(py, &self.ctx, || {
            self.in_ctx.store(true, Relaxed);
            let r = f();
            self.in_ctx.store(false, Relaxed);
            r
        })
    }

    /// error_received() (`error`) or datagram_received(), out of the cell
    /// (the call may replace the protocol); None once closed.
    fn callback<'py>(&self, py: Python<'py>, error: bool) -> Option<Callback<'py>> {
        self.cb.with(py, |c| {
            c.as_ref().map(|c| {
                let (bound, name) = if error {
                    (&c.error_received, "error_received")
                } else {
                    (&c.datagram_received, "datagram_received")
                };
                match bound {
                    Some(f) => Callback::Method(f.bind(py).clone()),
                    None => Callback::Missing(c.protocol.bind(py).clone(), name),
                }
            })
        })
    }

    fn addr_object<'py>(&self, py: Python<'py>, raw: &[u8]) -> PyResult<Option<Bound<'py, PyAny>>> {
        if let Some(o) = self
            .addr
            .with(py, |c| c.by_raw(raw).map(|c| c.obj.bind(py).clone()))
        {
            return Ok(Some(o));
        }
        let Some(obj) = sockaddr_to_py(py, raw)? else {
            return Ok(None);
        };
        let entry = AddrCache {
            raw: raw.to_vec(),
            obj: obj.clone().unbind(),
        };
        let old = self.addr.with(py, |c| c.insert(entry));
        drop(old);
        Ok(Some(obj))
    }

    /// One recvfrom; Ok(false) when there is nothing to read.
    fn receive_one(&self, py: Python<'_>) -> PyResult<bool> {
        let lp = self.lp.bind(py).get();
        let mut storage = MaybeUninit::<libc::sockaddr_storage>::zeroed();
        let mut alen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let got = lp.with_read_buffer(py, |buf| {
            // SAFETY: `buf` is writable for its length; `storage` can hold
            // any address; the fd stays open while the reader is registered.
            let n = unsafe {
                libc::recvfrom(
                    self.fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    storage.as_mut_ptr().cast(),
                    &mut alen,
                )
            };
            if n < 0 {
                Err(errno())
            } else {
                lp.count_read(n as usize);
                Ok(lp.recycler.make(py, &buf[..n as usize]))
            }
        });
        match got {
            Err(libc::EAGAIN) | Err(libc::EINTR) => Ok(false),
            Err(e) => {
                let Some(error_received) = self.callback(py, true) else {
                    return Ok(false);
                };
                // As asyncio: an OSError from recvfrom goes to error_received().
                let exc = crate::event_loop::oserror::from_errno(py, e);
                error_received.call1((exc.value(py),))?;
                Ok(false)
            }
            Ok(data) => {
                let Some(datagram_received) = self.callback(py, false) else {
                    return Ok(false);
                };
                let alen = (alen as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
                // SAFETY: the kernel wrote `alen` bytes of address.
                let raw =
                    unsafe { std::slice::from_raw_parts(storage.as_ptr().cast::<u8>(), alen) };
                let addr = match self.addr_object(py, raw)? {
                    Some(a) => a,
                    None => other_sockaddr_to_py(py, raw),
                };
                datagram_received.call1((&data.obj, addr))?;
                lp.recycler.give_back(py, data);
                Ok(true)
            }
        }
    }
}

impl NativeReader for DatagramCore {
    fn on_ready(&self, py: Python<'_>) -> PyResult<()> {
        self.in_own_context(py, || {
            for i in 0..BATCH {
                // A datagram_received() may have paused reading or closed
                // the transport (its reader is then gone): no more then.
                if i > 0 && !self.lp.bind(py).get().has_native_reader(py, self.fd) {
                    break;
                }
                if !self.receive_one(py)? {
                    break;
                }
            }
            Ok(())
        })
    }

    fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.lp)?;
        visit.call(&self.transport)?;
        visit.call(&self.ctx)?;
        if let Some(r) = self.cb.try_with(|c| -> Result<(), pyo3::PyTraverseError> {
            if let Some(c) = c {
                visit.call(&c.protocol)?;
                visit.call(&c.datagram_received)?;
                visit.call(&c.error_received)?;
            }
            Ok(())
        }) {
            r?;
        }
        if let Some(r) = self
            .addr
            .try_with(|c| c.entries.iter().try_for_each(|c| visit.call(&c.obj)))
        {
            r?;
        }
        Ok(())
    }
}

#[pymethods]
impl DatagramCore {
    #[new]
    fn new(
        lp: Bound<'_, LoopCore>,
        sock: Bound<'_, PyAny>,
        transport: Bound<'_, PyAny>,
        protocol: Bound<'_, PyAny>,
        connected: bool,
    ) -> PyResult<Self> {
        let py = sock.py();
        let fd: RawFd = sock.call_method0("fileno")?.extract()?;
        let family: i32 = sock.getattr("family")?.extract()?;
        let core = DatagramCore {
            lp: lp.unbind(),
            fd,
            family,
            connected,
            transport: transport.unbind(),
            ctx: copy_context(py)?,
            in_ctx: std::sync::atomic::AtomicBool::new(false),
            cb: GilCell::new(None),
            addr: GilCell::new(AddrCaches::default()),
        };
        core.set_protocol(py, &protocol)?;
        Ok(core)
    }

    fn __traverse__(&self, visit: pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        NativeReader::visit(self, &visit)
    }

    /// Breaks the cycles through the protocol (protocol -> transport ->
    /// this core -> bound protocol methods) and the address cache.
    fn __clear__(&self) {
        let old = (
            self.cb.try_with(|c| c.take()),
            self.addr.try_with(std::mem::take),
        );
        drop(old);
    }

    fn set_protocol(&self, py: Python<'_>, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let get = |name: &str| protocol.getattr(name).ok().map(Bound::unbind);
        let c = Cached {
            protocol: protocol.clone().unbind(),
            datagram_received: get("datagram_received"),
            error_received: get("error_received"),
        };
        let old = self.cb.with(py, |s| s.replace(c));
        drop(old);
        Ok(())
    }

    /// `f(*args)` in the transport's context, where asyncio's callbacks
    /// that the loop makes run (connection_lost() included, wherever
    /// close() was called from).
    #[pyo3(signature = (f, *args))]
    fn call_in_context<'py>(
        &self,
        f: &Bound<'py, PyAny>,
        args: &Bound<'py, PyTuple>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.in_own_context(f.py(), || f.call1(args))
    }

    /// Start (or resume) receiving: a native reader on the loop.
    fn start(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let reader: std::sync::Arc<dyn NativeReader> =
            std::sync::Arc::new(DatagramReaderRef(slf.clone().unbind()));
        this.lp
            .bind(py)
            .get()
            .add_native_reader(py, this.fd, reader)
    }

    /// Try to send without buffering: True if the datagram went out (or an
    /// OSError was reported to error_received, as asyncio does); False when
    /// the caller must take asyncio's path (would block, odd addresses).
    fn try_sendto(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        addr: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        self.lp.bind(py).get().touch_io();
        if !(data.is_instance_of::<PyBytes>()
            || data.is_instance_of::<PyByteArray>()
            || data.is_instance_of::<PyMemoryView>())
        {
            return Ok(false);
        }
        let sockaddr: Option<AddrBuf> = if self.connected || addr.is_none() {
            None
        } else {
            let cached = self.addr.with(py, |c| {
                c.by_obj(addr.as_ptr()).map(|c| AddrBuf::from(&c.raw))
            });
            match cached.or_else(|| py_to_sockaddr(self.family, addr).map(|v| AddrBuf::from(&v))) {
                Some(s) => Some(s),
                None => return Ok(false),
            }
        };
        if !self.connected && sockaddr.is_none() {
            return Ok(false);
        }
        let mut view = MaybeUninit::<ffi::Py_buffer>::uninit();
        // SAFETY: a simple contiguous view, released below on every path.
        if unsafe { ffi::PyObject_GetBuffer(data.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_SIMPLE) }
            < 0
        {
            return Err(PyErr::fetch(py));
        }
        // SAFETY: initialised by the successful call above.
        let mut view = unsafe { view.assume_init() };
        if view.len == 0 {
            // Empty datagrams: asyncio's handling differs per version.
            // SAFETY: releasing the view taken above.
            unsafe { ffi::PyBuffer_Release(&mut view) };
            return Ok(false);
        }
        // SAFETY: view.buf/len describe the data; the address bytes are a
        // sockaddr of their length; the fd is open.
        let n = unsafe {
            match &sockaddr {
                Some(sa) => libc::sendto(
                    self.fd,
                    view.buf,
                    view.len as usize,
                    0,
                    sa.as_slice().as_ptr().cast(),
                    sa.len as libc::socklen_t,
                ),
                None => libc::send(self.fd, view.buf, view.len as usize, 0),
            }
        };
        let err = if n < 0 { errno() } else { 0 };
        // SAFETY: releasing the view taken above.
        unsafe { ffi::PyBuffer_Release(&mut view) };
        if n >= 0 {
            return Ok(true);
        }
        if err == libc::EAGAIN || err == libc::EINTR {
            return Ok(false);
        }
        let exc = crate::event_loop::oserror::from_errno(py, err);
        if let Some(error_received) = self.callback(py, true) {
            error_received.call1((exc.value(py),))?;
        }
        Ok(true)
    }
}

/// The reader registered on the loop: a strong reference to the core.
struct DatagramReaderRef(Py<DatagramCore>);

impl NativeReader for DatagramReaderRef {
    fn on_ready(&self, py: Python<'_>) -> PyResult<()> {
        self.0.get().on_ready(py)
    }

    fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        visit.call(&self.0)
    }
}
