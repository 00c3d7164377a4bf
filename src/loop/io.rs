//! Waiting for I/O: the loop's Tokio current-thread runtime.
//!
//! Tokio's reactor does the sleeping. It watches (1) the private
//! level-triggered epoll that holds add_reader/add_writer fds and pending
//! sock_* operations (selector.rs), (2) a `Notify` that other threads
//! (call_soon_threadsafe, DNS results) use to wake the loop, and (3) a Tokio
//! timer for the nearest scheduled call. The GIL is released by the caller
//! for exactly the duration of `wait`.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::pin;
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

struct EpollFd(OwnedFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct Io {
    // Field order matters: the AsyncFd deregisters from the runtime's
    // reactor when dropped, so it goes before the runtime.
    afd: AsyncFd<EpollFd>,
    rt: Runtime,
}

pub(crate) struct Driver {
    io: RwLock<Option<Io>>,
    epfd: RawFd,
    pub(crate) notify: Arc<Notify>,
}

pub(crate) type Events = Vec<libc::epoll_event>;

pub(crate) fn new_events() -> Events {
    Vec::with_capacity(256)
}

fn epoll_wait_now(epfd: RawFd, events: &mut Events) {
    events.clear();
    let cap = events.capacity().min(i32::MAX as usize) as libc::c_int;
    loop {
        // SAFETY: the buffer has `cap` writable epoll_event slots; the kernel
        // writes at most `cap` of them and returns how many.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), cap, 0) };
        if n >= 0 {
            // SAFETY: the kernel initialised the first `n` <= cap entries.
            unsafe { events.set_len(n as usize) };
            return;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

impl Driver {
    pub(crate) fn new() -> io::Result<Driver> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .thread_name("tokioloop-blocking")
            .build()?;
        // SAFETY: epoll_create1 returns a new fd we exclusively own, or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        let afd = {
            let _guard = rt.enter();
            // SAFETY: EpollFd owns the fd (OwnedFd), so it stays open and
            // refers to the same epoll instance until the AsyncFd is dropped.
            unsafe {
                AsyncFd::register_with_interest(EpollFd(owned), tokio::io::Interest::READABLE)
            }
            .map_err(|e| e.into_parts().1)?
        };
        Ok(Driver {
            io: RwLock::new(Some(Io { afd, rt })),
            epfd: raw,
            notify: Arc::new(Notify::new()),
        })
    }

    /// The private epoll fd, or None once closed (the number may be reused
    /// by then, so it must not be used).
    pub(crate) fn epfd(&self) -> Option<RawFd> {
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|_| self.epfd)
    }

    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Run `f` on the runtime's blocking pool (None once closed).
    pub(crate) fn spawn_blocking<F>(&self, f: F) -> bool
    where
        F: FnOnce() + Send + 'static,
    {
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(io) => {
                io.rt.spawn_blocking(f);
                true
            }
            None => false,
        }
    }

    /// Wait for I/O readiness, a wake-up or the timeout, whichever is
    /// first, and collect the ready fds of the private epoll into `events`.
    /// `Some(ZERO)` polls without blocking. Must be called without the GIL.
    pub(crate) fn wait(&self, timeout: Option<Duration>, has_fds: bool, events: &mut Events) {
        events.clear();
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        let Some(io) = g.as_ref() else {
            return;
        };
        if timeout == Some(Duration::ZERO) {
            // Nothing but the private epoll needs polling yet, so skip the
            // runtime entirely: one epoll_wait(0), as asyncio's select(0).
            if has_fds {
                epoll_wait_now(self.epfd, events);
            }
            return;
        }
        let epfd = self.epfd;
        let notify = &self.notify;
        io.rt.block_on(async {
            if has_fds {
                // Readiness Tokio saw earlier may be stale: clear it first,
                // then look at the epoll itself. Anything that becomes ready
                // after this look makes the epoll fd readable again (it goes
                // from no ready entries to some), so nothing is lost.
                std::future::poll_fn(|cx| {
                    if let Poll::Ready(Ok(mut guard)) = io.afd.poll_read_ready(cx) {
                        guard.clear_ready();
                    }
                    Poll::Ready(())
                })
                .await;
                epoll_wait_now(epfd, events);
                if !events.is_empty() {
                    return;
                }
            }
            let notified = pin!(notify.notified());
            let readable = pin!(io.afd.readable());
            let sleep = pin!(sleep_or_forever(timeout));
            race3(notified, readable, sleep).await;
        });
        if has_fds && events.is_empty() {
            epoll_wait_now(epfd, events);
        }
    }

    /// Stop the runtime (blocking-pool work still running is abandoned, its
    /// results are dropped) and close the private epoll.
    pub(crate) fn close(&self) -> bool {
        let Ok(mut g) = self.io.try_write() else {
            return false;
        };
        if let Some(io) = g.take() {
            let Io { afd, rt } = io;
            drop(afd);
            rt.shutdown_background();
        }
        true
    }
}

async fn sleep_or_forever(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending::<()>().await,
    }
}

/// Complete when any of the three futures completes (their outputs are not
/// needed). Written out instead of `tokio::select!` to keep the polled
/// order fixed and the generated code small.
async fn race3<A, B, C>(
    mut a: std::pin::Pin<&mut A>,
    mut b: std::pin::Pin<&mut B>,
    mut c: std::pin::Pin<&mut C>,
) where
    A: Future,
    B: Future,
    C: Future,
{
    std::future::poll_fn(|cx| {
        if a.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        if b.as_mut().poll(cx).is_ready() {
            // The readiness stays set in Tokio; the next wait clears it
            // before looking at the epoll (see `wait`).
            return Poll::Ready(());
        }
        if c.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}
