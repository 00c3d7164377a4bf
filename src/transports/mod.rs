//! Native transports: the hot paths of stream transports (TCP, Unix
//! sockets, pipes) on the loop's Tokio reactor. The asyncio-facing classes
//! and the slow paths (connection set-up, servers, TLS) are in
//! tokioloop/_transports.py and tokioloop/_network.py.

use pyo3::gc::PyVisit;
use pyo3::prelude::*;
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
}

impl Source {
    pub(crate) fn clone_ref(&self, py: Python<'_>) -> Source {
        match self {
            Source::Stream(s) => Source::Stream(s.clone_ref(py)),
        }
    }

    pub(crate) fn on_ready(self, py: Python<'_>, kind: u8) -> PyResult<()> {
        match self {
            Source::Stream(s) => stream::StreamCore::on_ready(s.bind(py), kind),
        }
    }

    pub(crate) fn visit(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        match self {
            Source::Stream(s) => visit.call(s),
        }
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<stream::StreamCore>()?;
    m.add_class::<datagram::DatagramCore>()?;
    m.add_class::<tls::TlsProtocol>()?;
    Ok(())
}
