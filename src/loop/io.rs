//! Waiting for I/O: the loop's Tokio current-thread runtime.
//!
//! Tokio's reactor does the sleeping. It watches the transports' fds and
//! (1) the private level-triggered epoll that holds add_reader/add_writer
//! fds and pending sock_* operations (selector.rs), and (2) a timerfd set
//! for the nearest scheduled call (timerfd.rs). Everything that can end a wait (a
//! transport's fd, the private epoll, call_soon_threadsafe and DNS results
//! from other threads) reports through one `Signal`: a flag plus the waker
//! of the blocked wait. The GIL is released by the caller for exactly the
//! duration of `wait`.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use corosensei::{ScopedCoroutine, ScopedCoroutineRef, Yielder};
use tokio::io::unix::AsyncFd;
use tokio::runtime::Runtime;

use super::timerfd::WakeTimer;
use crate::fiber::stack::FiberStack;

struct EpollFd(OwnedFd);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct Io {
    // Field order matters: the AsyncFds deregister from the runtime's
    // reactor when dropped, so they go before the runtime.
    afd: AsyncFd<EpollFd>,
    timer: WakeTimer,
    rt: Runtime,
}

pub(crate) struct Driver {
    io: RwLock<Option<Io>>,
    epfd: RawFd,
    /// Tokens of Tokio-registered fds (transports) that became ready.
    pub(crate) ready: Arc<ReadyTokens>,
    /// How many fds are registered with Tokio (zero-timeout polls must run
    /// the reactor only if there are any).
    sources: Arc<AtomicUsize>,
    /// Wakes the loop: shared with `ready` and the private epoll's waker.
    signal: Arc<Signal>,
    /// Tokio saw the private epoll become readable since our last look (set
    /// by its `FlagWaker`; the next `look` clears it and registers the waker
    /// again).
    epoll_signalled: Arc<AtomicBool>,
    /// The waker registered for the private epoll's readiness.
    epoll_waker: Waker,
    /// The last look at the private epoll found events (see `wait`). Only
    /// the loop's thread waits; an atomic keeps the Driver Sync.
    maybe_ready: AtomicBool,
    /// The stack of the reactor session (`run_session`), kept between runs
    /// (a slot of the fibers' pool).
    session_stack: Mutex<Option<FiberStack>>,
}

/// What ends a wait: `woken` says something happened (read and reset by
/// the loop's thread), `waker` is the blocked wait's (registered before it
/// checks `woken`, so no wake-up is lost in between).
pub(crate) struct Signal {
    woken: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    fn raise(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn take(&self) -> bool {
        self.woken.swap(false, Ordering::AcqRel)
    }
}

/// Readiness of transports' fds, as reported by Tokio's reactor through
/// `TokenWaker`s: (token, kind) pairs, drained by the loop each iteration.
pub(crate) struct ReadyTokens {
    list: Mutex<Vec<(u64, u8)>>,
    signal: Arc<Signal>,
}

impl ReadyTokens {
    pub(crate) fn take(&self, out: &mut Vec<(u64, u8)>) {
        let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::swap(&mut *l, out);
    }

    fn push(&self, token: u64, kind: u8) {
        let was_empty = {
            let mut l = self.list.lock().unwrap_or_else(|e| e.into_inner());
            l.push((token, kind));
            l.len() == 1
        };
        if was_empty {
            // Wakes a loop blocked in `wait`; later events of the same
            // reactor turn find the list non-empty and need no wake-up.
            self.signal.raise();
        }
    }
}

/// The waker Tokio's reactor calls when a transport's fd becomes readable
/// (kind 0) or writable (kind 1).
pub(crate) struct TokenWaker {
    token: u64,
    kind: u8,
    ready: Arc<ReadyTokens>,
}

impl Wake for TokenWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.token, self.kind);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.token, self.kind);
    }
}

/// The waker Tokio's reactor calls when the private epoll becomes readable
/// or the wake-up timer fires: it sets the fd's flag (so the loop polls
/// that fd's readiness only when the reactor saw it signal, instead of on
/// every wait) and ends the wait.
struct FlagWaker {
    signalled: Arc<AtomicBool>,
    signal: Arc<Signal>,
}

impl FlagWaker {
    fn waker(signalled: &Arc<AtomicBool>, signal: &Arc<Signal>) -> Waker {
        Waker::from(Arc::new(FlagWaker {
            signalled: signalled.clone(),
            signal: signal.clone(),
        }))
    }
}

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.signalled.store(true, Ordering::Release);
        self.signal.raise();
    }
}

/// A raw fd that somebody else (a Python socket or file object) owns.
pub(crate) struct FdRef(pub(crate) RawFd);

impl AsRawFd for FdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// An fd registered with the loop's Tokio reactor, with the wakers that
/// report its readiness to the loop.
pub(crate) struct Registration {
    pub(crate) afd: AsyncFd<FdRef>,
    pub(crate) read_waker: Waker,
    pub(crate) write_waker: Waker,
    driver_sources: Arc<AtomicUsize>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.driver_sources.fetch_sub(1, Ordering::Relaxed);
    }
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
        // No Tokio timer: the loop's wake-ups come from its timerfd.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .thread_name("tokioloop-blocking")
            .build()?;
        // SAFETY: epoll_create1 returns a new fd we exclusively own, or -1.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        // Set: the first look at the private epoll registers its waker.
        let epoll_signalled = Arc::new(AtomicBool::new(true));
        let epoll_waker = FlagWaker::waker(&epoll_signalled, &signal);
        let (afd, timer) = {
            let _guard = rt.enter();
            // SAFETY: EpollFd owns the fd (OwnedFd), so it stays open and
            // refers to the same epoll instance until the AsyncFd is dropped.
            let afd = unsafe {
                AsyncFd::register_with_interest(EpollFd(owned), tokio::io::Interest::READABLE)
            }
            .map_err(|e| e.into_parts().1)?;
            // Set: the first wait registers the timer's waker.
            let timer_signalled = Arc::new(AtomicBool::new(true));
            let timer_waker = FlagWaker::waker(&timer_signalled, &signal);
            (afd, WakeTimer::new(timer_signalled, timer_waker)?)
        };
        Ok(Driver {
            io: RwLock::new(Some(Io { afd, timer, rt })),
            epfd: raw,
            ready: Arc::new(ReadyTokens {
                list: Mutex::new(Vec::new()),
                signal: signal.clone(),
            }),
            sources: Arc::new(AtomicUsize::new(0)),
            signal,
            epoll_signalled,
            epoll_waker,
            // Nothing looked yet: the first wait looks.
            maybe_ready: AtomicBool::new(true),
            session_stack: Mutex::new(None),
        })
    }

    /// Register `fd` (owned by the caller, who must keep it open until the
    /// Registration is dropped) with the reactor, for reading and writing.
    pub(crate) fn register(&self, fd: RawFd, token: u64) -> io::Result<Registration> {
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        let Some(io) = g.as_ref() else {
            return Err(io::Error::other("Event loop is closed"));
        };
        let afd = {
            let _guard = io.rt.enter();
            // SAFETY: the caller keeps `fd` open and pointing to the same
            // file for the life of the Registration: transports drop their
            // Registration before they close their socket or pipe.
            unsafe {
                AsyncFd::register_with_interest(
                    FdRef(fd),
                    tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
                )
            }
            .map_err(|e| e.into_parts().1)?
        };
        self.sources.fetch_add(1, Ordering::Relaxed);
        let waker = |kind| {
            Waker::from(Arc::new(TokenWaker {
                token,
                kind,
                ready: self.ready.clone(),
            }))
        };
        Ok(Registration {
            afd,
            read_waker: waker(0),
            write_waker: waker(1),
            driver_sources: self.sources.clone(),
        })
    }

    /// The private epoll fd, or None once closed (the number may be reused
    /// by then, so it must not be used).
    pub(crate) fn epfd(&self) -> Option<RawFd> {
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|_| self.epfd)
    }

    /// Whether any fd is registered with the reactor (transports).
    pub(crate) fn has_sources(&self) -> bool {
        self.sources.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn wake(&self) {
        self.signal.raise();
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
    /// `Some(ZERO)` polls without blocking. Before sleeping, polls without
    /// blocking for up to `spin` (see `spin_wait`). Must be called without
    /// the GIL.
    pub(crate) fn wait(
        &self,
        timeout: Option<Duration>,
        spin: Duration,
        has_fds: bool,
        events: &mut Events,
    ) {
        events.clear();
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        let Some(io) = g.as_ref() else {
            return;
        };
        if timeout == Some(Duration::ZERO) {
            // A wake-up it consumes is for what the caller takes next.
            let _ = self.poll_now(io, has_fds, events);
            return;
        }
        let mut timeout = timeout;
        if !spin.is_zero() {
            let limit = timeout.map_or(spin, |t| t.min(spin));
            let start = Instant::now();
            if self.spin_wait(io, limit, has_fds, events) {
                return;
            }
            if let Some(t) = timeout {
                // Sleep only for what is left of the timeout (none when the
                // spin already covered it: the timers are due).
                match t.checked_sub(start.elapsed()) {
                    Some(rest) if !rest.is_zero() => timeout = Some(rest),
                    _ => return,
                }
            }
        }
        if has_fds && self.look_needed() {
            self.look(io, events);
            if !events.is_empty() {
                return;
            }
        }
        self.block(io, Block::Sleep(timeout));
        // Woken: look at the private epoll if it signalled (if it did not
        // yet, its signal ends the next wait).
        if has_fds && self.epoll_signalled.load(Ordering::Acquire) {
            self.look(io, events);
        }
    }

    /// One epoll_wait(0) on the private epoll alone (add_reader/add_writer
    /// watchers and pending sock_* operations), without a reactor turn; for
    /// the busy iterations that do not poll everything. Needs no GIL release.
    /// Returns the epoll's fd to dispatch the events with (None once closed).
    pub(crate) fn look_watchers(&self, events: &mut Events) -> Option<RawFd> {
        events.clear();
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        let io = g.as_ref()?;
        self.look(io, events);
        Some(self.epfd)
    }

    /// Whether the private epoll may hold events: Tokio saw it signal since
    /// the last look, or the last look found events (level-triggered ones
    /// stay ready without signalling again). Otherwise the last look found
    /// it empty and everything since has signalled through Tokio's reactor.
    fn look_needed(&self) -> bool {
        self.epoll_signalled.load(Ordering::Acquire) || self.maybe_ready.load(Ordering::Relaxed)
    }

    /// epoll_wait(0) on the private epoll, remembering whether it found
    /// anything. If Tokio reported it readable, that readiness is cleared
    /// and the waker registered again first, so that whatever becomes ready
    /// after this look signals again.
    fn look(&self, io: &Io, events: &mut Events) {
        if self.epoll_signalled.swap(false, Ordering::AcqRel) {
            self.rearm_epoll(io);
        }
        epoll_wait_now(self.epfd, events);
        self.maybe_ready
            .store(!events.is_empty(), Ordering::Relaxed);
    }

    /// Clear Tokio's readiness of the private epoll and register
    /// `epoll_waker` for the next. Tokio watches it edge-triggered and only
    /// its reactor sets readiness, which does not run here: the second poll
    /// registers (the bound is only a guard).
    fn rearm_epoll(&self, io: &Io) {
        let mut cx = std::task::Context::from_waker(&self.epoll_waker);
        for _ in 0..4 {
            match io.afd.poll_read_ready(&mut cx) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                // Pending: registered. Err: the reactor is shutting down.
                _ => return,
            }
        }
    }

    /// One look at everything without sleeping: the reactor (transports'
    /// fds, signals, ...) and the private epoll. Returns whether a wake-up
    /// was signalled (by the reactor just now, or by another thread since
    /// the last wait), and consumes it: the caller goes on to take the
    /// ready tokens and the ready queue, which is what a wake-up announces,
    /// so the next sleep need not end at once for it.
    fn poll_now(&self, io: &Io, has_fds: bool, events: &mut Events) -> bool {
        let polled = self.sources.load(Ordering::Relaxed) > 0;
        if polled {
            // Let the reactor look at transports' fds once, without
            // sleeping: yield_now makes the scheduler poll the driver
            // with a zero timeout before resuming us.
            self.block(io, Block::Turn);
        }
        // The private epoll: one epoll_wait(0), as asyncio's select(0);
        // when the reactor just ran, only if it may hold something.
        if has_fds && (!polled || self.look_needed()) {
            self.look(io, events);
        }
        self.signal.take()
    }

    /// Poll without sleeping until something is ready or `limit` has
    /// passed; true if something is (events collected, or a wake-up or
    /// reactor readiness is pending for the loop).
    ///
    /// Why: a loop that answers one peer at a time (a request/response
    /// exchange on one connection) would otherwise go to sleep right after
    /// each reply and be woken a few microseconds later by the next
    /// request; on virtual machines that sleep/wake-up pair costs more CPU
    /// and latency than the work itself. The caller decides when spinning
    /// pays (see spin.rs); the limit keeps it bounded.
    fn spin_wait(&self, io: &Io, limit: Duration, has_fds: bool, events: &mut Events) -> bool {
        let start = Instant::now();
        loop {
            // A wake-up that came before the spin began also ends it: the
            // loop has work either way.
            if self.poll_now(io, has_fds, events) || !events.is_empty() {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            // Let another runnable thread of this CPU (an executor worker
            // the loop waits for) have it.
            std::thread::yield_now();
        }
    }

    /// Run the reactor for one request: in this thread's session when one
    /// is open for this driver, else in a block_on of its own.
    fn block(&self, io: &Io, req: Block) {
        let active = current_session();
        if !active.co.is_null() && std::ptr::eq(active.driver, self) {
            // SAFETY: SESSION points at the session coroutine of this driver
            // while `run_session` (further up this thread's stack) is in its
            // scope, and only then (the guard resets it before the scope
            // ends). The coroutine is suspended: it is only resumed here and
            // by the guard's drop, never from its own stack (it runs no code
            // that waits), and this thread is not inside it. Every access
            // goes through this same raw pointer (the guard keeps no
            // reference), so the `&mut` made here is the only one alive.
            let co = unsafe { &mut *active.co.cast::<Reactor<'_, '_>>() };
            co.resume(req);
            return;
        }
        let signal = &*self.signal;
        match req {
            Block::Turn => io.rt.block_on(tokio::task::yield_now()),
            Block::Sleep(t) => io.rt.block_on(sleep_until_signalled(signal, &io.timer, t)),
            Block::Finish => {}
        }
    }

    /// Run `f` (the loop's run_forever) with one long-lived block_on open on
    /// the reactor instead of one per wait. The block_on runs on a corosensei
    /// stack; each wait resumes it with a request, and it suspends back to
    /// the loop inside its future's poll when the request is done (the
    /// future's next poll, after Tokio parked, continues from there). What
    /// this saves per wait is Tokio's runtime entry and exit (context
    /// guards, scheduler core hand-over, RNG seed): callgrind, Protocol echo
    /// at 1 KiB: ~400 of 1,800 instructions per wait.
    ///
    /// While the session is open, this thread is inside the runtime as far
    /// as Tokio's thread-locals go. That is sound for what the loop does in
    /// between (registering fds, AsyncFd polls, spawn_blocking: none of them
    /// require being outside a runtime), and the future runs `unconstrained`
    /// so the AsyncFd polls transports make between waits never hit Tokio's
    /// cooperative budget. Another loop cannot block on its runtime in this
    /// thread meanwhile (Tokio forbids nested block_on); asyncio forbids
    /// running two loops in a thread anyway, and `in_foreign_session`
    /// lets the hand-driven `_run_once` say so. A nested run of this same
    /// loop reuses the session.
    pub(crate) fn run_session<R>(&self, f: impl FnOnce() -> R) -> R {
        if !current_session().co.is_null() {
            return f();
        }
        let g = self.io.read().unwrap_or_else(|e| e.into_inner());
        let Some(io) = g.as_ref() else {
            return f();
        };
        // The driver's own stack, from the fibers' pool on its first run: a
        // run costs no syscall for it (a fresh corosensei stack per
        // run_until_complete() doubled that call's cost, 7 -> 15 us).
        let kept = self
            .session_stack
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(mut stack) = kept.or_else(|| FiberStack::take().ok()) else {
            return f();
        };
        let signal = &*self.signal;
        let co = ScopedCoroutine::with_stack(&mut stack, |y: &Yielder<Block, ()>, first: Block| {
            io.rt.block_on(tokio::task::unconstrained(async {
                let mut req = first;
                loop {
                    match req {
                        Block::Finish => return,
                        Block::Turn => tokio::task::yield_now().await,
                        Block::Sleep(t) => sleep_until_signalled(signal, &io.timer, t).await,
                    }
                    req = y.suspend(());
                }
            }))
        });
        let r = co.scope(|mut co| {
            let mut co = co.as_mut();
            let _open = SessionGuard::open(self, &mut co);
            f()
        });
        // The coroutine is done (the guard finished it; had that failed,
        // dropping the ScopedCoroutine at the end of `scope` unwinds it), so
        // its stack is free for the next run.
        *self.session_stack.lock().unwrap_or_else(|e| e.into_inner()) = Some(stack);
        r
    }

    /// Whether another driver's session is open in this thread (its loop is
    /// running here), so that this one cannot block on its runtime.
    pub(crate) fn in_foreign_session(&self) -> bool {
        let active = current_session();
        !active.co.is_null() && !std::ptr::eq(active.driver, self)
    }

    /// Stop the runtime (blocking-pool work still running is abandoned, its
    /// results are dropped) and close the private epoll.
    pub(crate) fn close(&self) -> bool {
        let Ok(mut g) = self.io.try_write() else {
            return false;
        };
        if let Some(io) = g.take() {
            let Io { afd, timer, rt } = io;
            drop(afd);
            drop(timer);
            rt.shutdown_background();
        }
        true
    }
}

/// What a wait asks of the reactor: one turn without sleeping (Tokio polls
/// its driver with a zero timeout before resuming a task that yielded), a
/// sleep until the signal or the timeout, or (for a session) the end.
#[derive(Clone, Copy)]
enum Block {
    Turn,
    Sleep(Option<Duration>),
    Finish,
}

/// The session coroutine as the loop's thread sees it while it is open.
type Reactor<'a, 's> = ScopedCoroutineRef<'a, Block, (), (), &'s mut FiberStack>;

/// The open session of this thread, if any: its driver and coroutine, and
/// the fork generation it was opened in.
#[derive(Clone, Copy)]
struct Active {
    driver: *const Driver,
    co: *mut (),
    fork_gen: u64,
}

const NO_SESSION: Active = Active {
    driver: std::ptr::null(),
    co: std::ptr::null_mut(),
    fork_gen: 0,
};

thread_local! {
    static SESSION: Cell<Active> = const { Cell::new(NO_SESSION) };
}

/// How many times this process is a fork()ed child of a process that had
/// loaded tokioloop (counted by a pthread_atfork handler).
static FORK_GEN: AtomicU64 = AtomicU64::new(0);

extern "C" fn after_fork_in_child() {
    FORK_GEN.fetch_add(1, Ordering::Relaxed);
}

fn fork_generation() -> u64 {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a child handler that only increments an atomic
        // (async-signal-safe); nothing else is registered.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    FORK_GEN.load(Ordering::Relaxed)
}

/// This thread's open session. A session inherited through fork() (a
/// callback of a running loop forked: the child is a copy of this thread,
/// inside the parent's run) is ended first: its coroutine, a copy in the
/// child's memory, is resumed to finish its block_on, which restores
/// Tokio's thread-locals, so that the child can run loops of its own (as
/// multiprocessing's fork start method does). The child's copy of the
/// parent's run, if the child ever returns into it, then waits without a
/// session (its guard finds the coroutine done).
fn current_session() -> Active {
    let active = SESSION.get();
    if active.co.is_null() || active.fork_gen == FORK_GEN.load(Ordering::Relaxed) {
        return active;
    }
    SESSION.set(NO_SESSION);
    // SAFETY: as in `Driver::block`: the pointer is the session coroutine
    // of a run further up this (forked) thread's stack, suspended, and
    // SESSION no longer publishes it. The child has only this thread, so
    // nothing else touches the copied runtime while its block_on exits.
    finish(unsafe { &mut *active.co.cast::<Reactor<'_, '_>>() });
    NO_SESSION
}

/// End a session coroutine's block_on. One that never waited has not
/// entered the runtime; one that did is suspended inside its future and
/// finishes. (If it panicked it is done and there is nothing to end.)
fn finish(co: &mut Reactor<'_, '_>) {
    if co.started() && !co.done() {
        co.resume(Block::Finish);
    }
}

/// Publishes a session in SESSION for its scope, and ends it (the block_on
/// returns, restoring Tokio's thread-locals) however the scope is left. It
/// holds the coroutine as the raw pointer SESSION publishes, borrowed
/// exclusively for `'g`, so that `block` and the guard use one pointer.
struct SessionGuard<'g, 'a, 's> {
    co: *mut Reactor<'a, 's>,
    _borrow: std::marker::PhantomData<&'g mut Reactor<'a, 's>>,
}

impl<'g, 'a, 's> SessionGuard<'g, 'a, 's> {
    fn open(driver: &Driver, co: &'g mut Reactor<'a, 's>) -> Self {
        let co: *mut Reactor<'a, 's> = co;
        SESSION.set(Active {
            driver,
            co: co.cast(),
            fork_gen: fork_generation(),
        });
        SessionGuard {
            co,
            _borrow: std::marker::PhantomData,
        }
    }
}

impl Drop for SessionGuard<'_, '_, '_> {
    fn drop(&mut self) {
        SESSION.set(NO_SESSION);
        // SAFETY: `co` comes from the `&'g mut` given to `open`, which this
        // guard borrows for its whole life; SESSION no longer publishes it,
        // and `block` is not running (we are on the loop's stack, outside
        // any resume), so this is the only reference.
        finish(unsafe { &mut *self.co });
    }
}

/// Sleep until something signals (the waker is registered before the flag
/// is read, so a signal in between is not lost) or the timeout, which the
/// loop's timer measures. The timer's expiry raises the signal too; it is
/// consumed here when it fired, so that it does not end the next wait.
async fn sleep_until_signalled(signal: &Signal, timer: &WakeTimer, timeout: Option<Duration>) {
    if let Some(t) = timeout {
        timer.arm(t);
    }
    std::future::poll_fn(|cx| {
        signal.waker.register(cx.waker());
        // Polled with or without a timeout: an earlier expiry that fired is
        // consumed either way (the loop then looks at its timers).
        let fired = timer.poll_fired().is_ready();
        if signal.take() || fired {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await
}
