//! The loop's clock: CLOCK_MONOTONIC as float seconds, computed exactly as
//! CPython's `time.monotonic()` does (integer nanoseconds, then one division),
//! so `loop.time()` and `time.monotonic()` agree to the last bit.

pub(crate) fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes into the timespec we own; CLOCK_MONOTONIC
    // exists on every Linux kernel this crate supports, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: ~4 ns to read, advances once per
/// kernel tick (1-4 ms). Good enough to notice that "a while" has passed.
pub(crate) fn coarse_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above; CLOCK_MONOTONIC_COARSE exists on Linux >= 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

pub(crate) fn monotonic() -> f64 {
    monotonic_ns() as f64 / 1e9
}

/// asyncio's `_clock_resolution` (time.get_clock_info('monotonic').resolution).
pub(crate) fn resolution() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above, clock_getres writes into our timespec.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 1e-9;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
