//! Native transports: the hot paths of stream transports (TCP, Unix
//! sockets, pipes) on the loop's Tokio reactor. The asyncio-facing classes
//! and the slow paths (connection set-up, servers, TLS) are in
//! tokioloop/_transports.py and tokioloop/_network.py.

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::types::PyWeakrefReference;
use pyo3::PyTraverseError;

pub(crate) mod datagram;
pub(crate) mod stream;
pub(crate) mod tls;

/// Readiness kinds reported by the reactor.
pub(crate) const READ: u8 = 0;
pub(crate) const WRITE: u8 = 1;

/// Something registered with the loop's reactor, woken by token.
pub(crate) enum Source {
    Stream(Py<stream::StreamCore>),
    /// A stream transport the loop does not keep alive: reading paused and
    /// nothing to write, so the loop waits for nothing from it, and asyncio's
    /// selector would hold no reference to it either. Once nothing else refers
    /// to it, the GC frees it (its finalizer warns and closes the socket).
    WeakStream(Py<PyWeakrefReference>),
}

impl Source {
    /// A strong reference to what is registered, if it is still alive.
    pub(crate) fn live(&self, py: Python<'_>) -> Option<Source> {
        match self {
            Source::Stream(s) => Some(Source::Stream(s.clone_ref(py))),
            Source::WeakStream(w) => w
                .bind(py)
                .upgrade_as::<stream::StreamCore>()
                .ok()
                .flatten()
                .map(|s| Source::Stream(s.unbind())),
        }
    }

    pub(crate) fn on_ready(self, py: Python<'_>, kind: u8) -> PyResult<()> {
        match self {
            Source::Stream(s) => stream::StreamCore::on_ready(s.bind(py), kind),
            Source::WeakStream(_) => Ok(()),
        }
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Source::Stream(s) => visit.call(s),
            Source::WeakStream(_) => Ok(()),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<stream::StreamCore>()?;
    m.add_class::<datagram::DatagramCore>()?;
    m.add_class::<tls::TlsProtocol>()?;
    Ok(())
}
