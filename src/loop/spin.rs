//! Whether the loop spins before it sleeps (the polling itself is
//! `Driver::wait`'s spin in io.rs).
//!
//! A wait that polls for a few microseconds instead of sleeping saves the
//! sleep and the wake-up, and the cold caches after them; it costs the CPU
//! time it polls. Which is cheaper depends on the machine and on the load:
//! on this project's 2-vCPU VM, over one connection with 1 KiB messages,
//! spinning cost 0.76x sleeping's CPU per byte for a `sock_*` echo, 1.18x
//! for a Protocol echo (its server has less to do per request, so waking up
//! costs it less than polling through the client's turnaround) and about
//! the same for a streams echo.
//! So the loop measures: now and then it runs a few hundred waits spinning
//! and as many sleeping, compares its own CPU time per unit of work between
//! them, and keeps the cheaper way until the next measurement. The unit is
//! a byte read (by transports, datagram endpoints, sock_recv and
//! sock_recv_into) when both ways read some, else a job run (a callback or
//! an I/O event): a spin catches a large message in more, smaller reads
//! than a sleep does (one connection echoing 100 KiB: two reads per message
//! instead of one), so per job it looked cheaper while it cost 10-20% more
//! per message. (sock_recvfrom's bytes are not counted: a loop reading
//! only through it is compared per job.)
//!
//! The policy belongs to the loop and outlives its runs, so that a program
//! of many short runs (run_until_complete() per call, await_() from a
//! thread without a loop) keeps what was measured; CPU time spent between
//! two runs falls into the epoch that spans them.
//!
//! The CPU time is the loop thread's own. What a sleep costs elsewhere (the
//! waking thread's work, the CPU leaving and re-entering an idle state) is
//! not in it, so the comparison leans toward sleeping; the server CPU per
//! request the benchmarks report has the same blind spot.
//!
//! Within a spinning stretch a spin that did not catch work quickly pauses
//! spinning for a while (`spin_paid`), so an idle or slow-paced loop sleeps
//! as asyncio's does.

use std::time::Duration;

/// Idle waits (waits with nothing ready to run) per measured epoch.
const EPOCH_WAITS: u32 = 128;
/// Epochs the chosen way is kept between two measurements.
const HOLD_EPOCHS: u32 = 30;
/// A measurement: spinning, sleeping, sleeping, spinning. The symmetric
/// order cancels a load that grows or shrinks steadily meanwhile.
const PROBE: [bool; 4] = [true, false, false, true];
/// Spinning is kept while it costs at most this much more per unit of work
/// than sleeping (it answers sooner; a difference this small is noise).
const TIE: f64 = 1.03;
/// The longest pause of the spin after misses in a row, in waits.
const MAX_SPIN_PAUSE: u32 = 64;

/// Whether a spin that ended after `elapsed` paid for itself: it caught the
/// work within a quarter of its limit. A spin that polls for longer loses
/// CPU even when it catches the work (one connection echoing 100 KiB: the
/// client turns a message around in 30-50 us; spinning through that doubled
/// the CPU per request), and one that runs out loses its whole length.
fn spin_paid(elapsed: Duration, limit: Duration) -> bool {
    elapsed <= limit / 4
}

/// This thread's CPU time (user and system); None if the clock cannot be
/// read (then the policy stops measuring).
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration,
    // and the clock id is a constant the kernel knows (or rejects with an
    // error, which is checked).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// A loop's spin decisions (kept by the loop across its runs).
pub(crate) struct SpinPolicy {
    /// The longest spin (TOKIOLOOP_SPIN_US); zero: never spin, measure nothing.
    limit: Duration,
    /// Whether this epoch spins at all.
    spinning: bool,
    /// Position in PROBE while measuring; None while keeping a choice.
    probe: Option<usize>,
    /// Epochs left before the next measurement.
    hold_left: u32,
    /// False once the CPU clock failed: no more measurements.
    measuring: bool,
    /// Idle waits so far in this epoch.
    waits: u32,
    /// CPU time, jobs run and bytes read when the epoch began (measured
    /// epochs only).
    start: Work,
    /// What the measured epochs used: [sleeping, spinning].
    cost: [Work; 2],
    /// Waits left before spinning again after a spin that did not pay.
    skip: u32,
    /// How many waits the next miss pauses spinning for.
    pause: u32,
}

impl SpinPolicy {
    pub(crate) fn new(limit: Duration) -> Self {
        SpinPolicy {
            limit,
            // The first epoch spins unmeasured (a short run, such as most
            // run_until_complete() calls, reads no clock).
            spinning: !limit.is_zero(),
            probe: None,
            hold_left: 1,
            measuring: true,
            waits: 0,
            start: Work::ZERO,
            cost: [Work::ZERO; 2],
            skip: 0,
            pause: 0,
        }
    }

    /// How long the idle wait about to start may poll before it sleeps.
    /// `jobs` and `bytes` are the run's counts of jobs run and the loop's
    /// of bytes read so far; `clock` reads the thread's CPU time
    /// (`thread_cpu_time`; tests pass a made-up one).
    pub(crate) fn next_wait(
        &mut self,
        jobs: u64,
        bytes: u64,
        clock: &mut dyn FnMut() -> Option<Duration>,
    ) -> Duration {
        if self.limit.is_zero() {
            return Duration::ZERO;
        }
        self.waits += 1;
        if self.waits > EPOCH_WAITS {
            self.waits = 1;
            // The clock is read only around measured epochs.
            let mut read = |jobs, bytes| clock().map(|cpu| Work { cpu, jobs, bytes });
            let used = match self.probe {
                None => Some(Work::ZERO),
                Some(_) => read(jobs, bytes).map(|now| now.since(&self.start)),
            };
            match used {
                Some(used) => self.end_epoch(used),
                None => self.stop_measuring(),
            }
            if self.probe.is_some() {
                match read(jobs, bytes) {
                    Some(now) => self.start = now,
                    None => self.stop_measuring(),
                }
            }
        }
        if !self.spinning {
            return Duration::ZERO;
        }
        if self.skip > 0 {
            // Pausing after a spin that did not pay.
            self.skip -= 1;
            return Duration::ZERO;
        }
        self.limit
    }

    /// After a wait that was allowed to spin: it ended after `elapsed`.
    pub(crate) fn spun(&mut self, elapsed: Duration) {
        // Spin again next time if this one paid; else pause, twice as long
        // after each miss in a row, so that an idle or slow-paced loop only
        // tries now and then.
        if spin_paid(elapsed, self.limit) {
            self.pause = 0;
        } else {
            self.pause = (self.pause * 2).clamp(1, MAX_SPIN_PAUSE);
            self.skip = self.pause;
        }
    }

    /// The CPU clock failed: spin (with the back-off) from now on, without
    /// measuring, as the loop did before it measured.
    fn stop_measuring(&mut self) {
        self.probe = None;
        self.measuring = false;
        self.spinning = true;
    }

    /// An epoch ended having used `used` (only measured while probing):
    /// move through the measurement or the hold. Each epoch starts with the
    /// back-off cleared, so that a spinning epoch does not inherit a pause
    /// from the last one and sleep through part of its measurement.
    fn end_epoch(&mut self, used: Work) {
        self.skip = 0;
        self.pause = 0;
        match self.probe {
            Some(i) => {
                let c = &mut self.cost[usize::from(self.spinning)];
                c.cpu += used.cpu;
                c.jobs += used.jobs;
                c.bytes += used.bytes;
                if i + 1 < PROBE.len() {
                    self.probe = Some(i + 1);
                    self.spinning = PROBE[i + 1];
                } else {
                    self.spinning = spin_is_cheaper(self.cost);
                    self.cost = [Work::ZERO; 2];
                    self.probe = None;
                    self.hold_left = HOLD_EPOCHS;
                }
            }
            None if !self.measuring => {}
            None => {
                self.hold_left = self.hold_left.saturating_sub(1);
                if self.hold_left == 0 {
                    self.probe = Some(0);
                    self.spinning = PROBE[0];
                }
            }
        }
    }
}

/// CPU time and work done (a point in time, or what a stretch used).
#[derive(Clone, Copy)]
struct Work {
    cpu: Duration,
    jobs: u64,
    bytes: u64,
}

impl Work {
    const ZERO: Work = Work {
        cpu: Duration::ZERO,
        jobs: 0,
        bytes: 0,
    };

    fn since(&self, start: &Work) -> Work {
        Work {
            cpu: self.cpu.saturating_sub(start.cpu),
            jobs: self.jobs.wrapping_sub(start.jobs),
            bytes: self.bytes.wrapping_sub(start.bytes),
        }
    }
}

/// Whether spinning cost at most TIE times sleeping's CPU per unit of
/// work: per byte read when both ways read some, else (either read
/// nothing) per job run. A way that did neither (an idle loop) tells
/// nothing: then sleep.
fn spin_is_cheaper(cost: [Work; 2]) -> bool {
    let [sleep, spin] = cost;
    let (sleep_units, spin_units) = if sleep.bytes > 0 && spin.bytes > 0 {
        (sleep.bytes, spin.bytes)
    } else {
        (sleep.jobs, spin.jobs)
    };
    if sleep_units == 0 || spin_units == 0 {
        return false;
    }
    let per_unit = |cpu: Duration, units: u64| cpu.as_secs_f64() / units as f64;
    per_unit(spin.cpu, spin_units) <= per_unit(sleep.cpu, sleep_units) * TIE
}

/// Replay of the policy's choices over made-up epochs, for tests: each item
/// is one epoch's (CPU microseconds, jobs run, bytes read), as a
/// measurement would have read them (ignored while a choice is kept);
/// returns whether each epoch, and the one after the last, spins.
#[pyo3::pyfunction]
pub(crate) fn _spin_policy_replay(epochs: Vec<(f64, u64, u64)>) -> Vec<bool> {
    let mut p = SpinPolicy::new(Duration::from_micros(50));
    let mut out = Vec::with_capacity(epochs.len() + 1);
    for (cpu_us, jobs, bytes) in epochs {
        out.push(p.spinning);
        let used = if p.probe.is_some() {
            Work {
                cpu: micros(cpu_us),
                jobs,
                bytes,
            }
        } else {
            Work::ZERO
        };
        p.end_epoch(used);
    }
    out.push(p.spinning);
    out
}

/// The policy driven wait by wait, for tests: each item is one idle wait,
/// (CPU microseconds, jobs, bytes) used since the previous one, and how
/// long its spin lasted if it spun (microseconds); the CPU clock is made up
/// from the items. Returns each wait's spin limit in microseconds (0: it
/// slept at once).
#[pyo3::pyfunction]
pub(crate) fn _spin_policy_drive(waits: Vec<(f64, u64, u64, f64)>) -> Vec<u64> {
    let mut p = SpinPolicy::new(Duration::from_micros(50));
    let (mut cpu, mut jobs, mut bytes) = (Duration::ZERO, 0u64, 0u64);
    let mut out = Vec::with_capacity(waits.len());
    for (cpu_us, j, b, spun_us) in waits {
        cpu += micros(cpu_us);
        jobs += j;
        bytes += b;
        let spin = p.next_wait(jobs, bytes, &mut || Some(cpu));
        if !spin.is_zero() {
            p.spun(micros(spun_us));
        }
        out.push(spin.as_micros() as u64);
    }
    out
}

/// A test's microseconds (negative: none).
fn micros(us: f64) -> Duration {
    Duration::from_secs_f64(us.max(0.0) / 1e6)
}

/// The policy's constants, for tests: (waits per epoch, epochs kept,
/// measured epochs, tie factor).
#[pyo3::pyfunction]
pub(crate) fn _spin_policy_constants() -> (u32, u32, usize, f64) {
    (EPOCH_WAITS, HOLD_EPOCHS, PROBE.len(), TIE)
}
