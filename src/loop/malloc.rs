//! glibc malloc tuning for an event loop's allocation pattern.
//!
//! A server loop allocates and frees buffers of a few KiB to a few hundred
//! KiB per request (`bytes` read from a socket, a StreamReader's bytearray
//! growing and shrinking). With glibc's defaults, freeing such a buffer at
//! the top of the heap returns the memory to the kernel once more than 128
//! KiB is free there (`M_TRIM_THRESHOLD`), and the next allocation takes it
//! back, page fault by page fault: on the streams echo benchmark that was
//! thousands of `brk` calls a second and 20-45% of the server's CPU time at
//! 10-100 KiB messages. glibc raises both thresholds by itself the first
//! time the process frees a large `mmap`ed block (its "dynamic threshold"),
//! which uvloop and rloop happen to do early; a process running tokioloop
//! might never do it. So the first loop sets what that adjustment would
//! set, once per process:
//!
//! * `M_MMAP_THRESHOLD` 1 MiB: blocks below it come from the heap;
//! * `M_TRIM_THRESHOLD` 4 MiB: up to that much free memory stays at the
//!   top of the heap instead of going back to the kernel;
//! * `M_TOP_PAD` 16 MiB: and when the heap is trimmed, 16 MiB stay. With
//!   many connections the heap's top swings by more than the trim
//!   threshold (100 connections x 100 KiB messages on the streams echo: 16k
//!   `brk` calls and 27 page faults per request, 70 us of CPU per request;
//!   with the pad 12 `brk` calls, 0.07 page faults, 40 us). A process that
//!   frees a burst keeps at most this much more resident than glibc would.
//!
//! Nothing is changed when the user tuned malloc already
//! (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, `GLIBC_TUNABLES`
//! with a `glibc.malloc.` setting) or set `TOKIOLOOP_MALLOC_TUNING=0`, nor
//! on other C libraries (musl, macOS).

use std::sync::Once;

/// Blocks below this size come from the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1 << 20;
/// Free memory kept at the top of the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 4 << 20;
/// Free memory a trim leaves at the top of the heap.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 16 << 20;

static TUNE: Once = Once::new();

fn user_tuned() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if std::env::var("TOKIOLOOP_MALLOC_TUNING").is_ok_and(|v| v.trim() == "0") {
        return true;
    }
    set("MALLOC_MMAP_THRESHOLD_")
        || set("MALLOC_TRIM_THRESHOLD_")
        || set("MALLOC_TOP_PAD_")
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|v| v.contains("glibc.malloc."))
}

/// Apply the tuning (once per process); see the module documentation.
pub(crate) fn tune_once() {
    TUNE.call_once(|| {
        if user_tuned() {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets glibc's malloc parameters (under its own
        // lock); the values are in range for each parameter.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
        }
    });
}
