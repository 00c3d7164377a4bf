//! The loop's wake-up timer: one timerfd watched by Tokio's reactor.
//!
//! Why not Tokio's timer: its wheel counts whole milliseconds and rounds a
//! deadline up to the next one, and the reactor's epoll_wait rounds up
//! again, so `asyncio.sleep(0.001)` took about 2.1 ms (asyncio's own loop:
//! 1.1 ms; websockets' keepalive tests, which measure a 3 ms ping, failed).
//! Its driver also locked, read the clock and walked the wheel on every
//! park, ~300 instructions per wait (callgrind, Protocol echo on one
//! connection). A timerfd fires at the nanosecond (plus the kernel's timer
//! slack, 50 µs by default) and costs nothing while its expiry stands.
//!
//! The loop arms it for the nearest timer before it sleeps, and leaves it
//! alone when an earlier expiry is already set: a server that moves a
//! timeout forward on every request (keep-alive timers) re-arms once per
//! timeout, when the old expiry wakes the loop early, not once per request.
//!
//! Its readiness is polled only after the reactor reported it (the waker
//! registered with the reactor sets `signalled`): a poll that registers the
//! waker again on every wait cost ~120 instructions per wait (callgrind,
//! HTTP on one connection), for a timer that mostly does not fire.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

struct TimerFd(OwnedFd);

impl AsRawFd for TimerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

pub(crate) struct WakeTimer {
    afd: AsyncFd<TimerFd>,
    /// CLOCK_MONOTONIC nanoseconds of the expiry set and not yet consumed
    /// (0: none). Only the loop's thread arms and reads the timer.
    armed: AtomicU64,
    /// Set by `waker` when the reactor saw the timer fire, and while the
    /// waker is not registered (at first, and after an expiry was consumed).
    signalled: Arc<AtomicBool>,
    /// The waker the reactor calls when the timer fires: it sets
    /// `signalled` and wakes the loop.
    waker: Waker,
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of `time.monotonic()`).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

impl WakeTimer {
    /// A disarmed timer registered with the reactor of the runtime the
    /// caller has entered; `waker` must set `signalled` (which starts set)
    /// and wake the loop.
    pub(crate) fn new(signalled: Arc<AtomicBool>, waker: Waker) -> io::Result<WakeTimer> {
        // SAFETY: timerfd_create returns a new fd we exclusively own, or -1.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = TimerFd(unsafe { OwnedFd::from_raw_fd(raw) });
        // SAFETY: TimerFd owns the fd (OwnedFd), so it stays open and refers
        // to the same timer until the AsyncFd (which deregisters first) drops.
        let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(WakeTimer {
            afd,
            armed: AtomicU64::new(0),
            signalled,
            waker,
        })
    }

    /// Make the timer fire `after` from now at the latest: it is set unless
    /// an earlier expiry is pending (or has fired and not been consumed,
    /// which makes the next wait return at once all the same).
    pub(crate) fn arm(&self, after: Duration) {
        let deadline = monotonic_ns()
            .saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX))
            .max(1);
        let armed = self.armed.load(Ordering::Relaxed);
        if armed != 0 && armed <= deadline {
            return;
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: the fd is our open timerfd; `spec` is a valid itimerspec
        // (a non-zero absolute expiry, no interval) and the old value is not
        // asked for.
        let r = unsafe {
            libc::timerfd_settime(
                self.afd.as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        // It cannot fail with these arguments; if it did, the old expiry
        // (or none) stays, and `armed` says so.
        if r == 0 {
            self.armed.store(deadline, Ordering::Relaxed);
        }
    }

    /// Ready once the timer has fired (the expiry is consumed); makes sure
    /// the timer's waker is registered with the reactor otherwise.
    pub(crate) fn poll_fired(&self) -> Poll<()> {
        // Not signalled: the waker is registered and has not been called,
        // so the timer has not fired.
        if !self.signalled.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut cx = Context::from_waker(&self.waker);
        loop {
            let mut guard = match self.afd.poll_read_ready(&mut cx) {
                Poll::Pending => return Poll::Pending,
                // The reactor is shutting down: end the wait (and end any
                // later one at once too).
                Poll::Ready(Err(_)) => {
                    self.signalled.store(true, Ordering::Release);
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(g)) => g,
            };
            let mut expirations = [0u8; 8];
            let n = loop {
                // SAFETY: reading 8 bytes (the expiration count) into an
                // 8-byte buffer from our open, non-blocking timerfd.
                let n = unsafe {
                    libc::read(
                        self.afd.as_raw_fd(),
                        expirations.as_mut_ptr().cast(),
                        expirations.len(),
                    )
                };
                if n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break n;
                }
            };
            if n == 8 {
                self.armed.store(0, Ordering::Relaxed);
                // Edge-triggered readiness: reading it empty is what the
                // next expiry signals again from.
                guard.clear_ready();
                // The waker is not registered now: the next poll does it.
                self.signalled.store(true, Ordering::Release);
                return Poll::Ready(());
            }
            // EAGAIN: not fired after all (readiness was stale); register
            // the waker again.
            guard.clear_ready();
        }
    }
}
