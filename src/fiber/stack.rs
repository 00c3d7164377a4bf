//! Fiber stacks: large, lazily committed, pooled, carved from slabs.
//!
//! # Design
//!
//! Requirements that shape this: CPython code must be able to recurse on a
//! fiber as deep as on a thread (tasks may run on fibers by default), a
//! suspended fiber should cost a few KiB, and 100k suspended fibers must
//! work although Linux caps a process at `vm.max_map_count` (65530 by
//! default) memory mappings.
//!
//! * **Size.** Every slot reserves the same virtual size as a thread's stack
//!   (8 MiB, `TOKIOLOOP_FIBER_STACK_KB` overrides it). Nothing is committed
//!   up front (`MAP_NORESERVE`, and `MADV_NOHUGEPAGE` so that a
//!   transparent huge page never turns the few touched KiB into 2 MiB), so a
//!   fiber costs the pages it touches: its C stack top and, on 3.11+, the
//!   first page of its frame data stack, which lives at the top of the slot
//!   (see `Geometry`). Deep recursion is bounded by the interpreter (see
//!   core.rs, `c_budget`), not by this allocator.
//! * **Slabs, not one mapping per stack.** A guard page splits a mapping in
//!   two, so one guarded stack per `mmap` costs two mappings and caps a
//!   process near 32k fibers. Slots are therefore carved from slabs (one
//!   `mmap` for many slots). The first slots get a guard page each (two
//!   mappings per slot) until `max_map_count / 8` guarded slots exist; later
//!   slabs are unguarded (one mapping for 64 slots, a guard only below the
//!   lowest). Free guarded slots are always handed out first, so a process
//!   with fewer than ~8k live fibers runs every fiber on a guarded stack.
//!   Unguarded slots rely on the interpreter's recursion budgets, which are
//!   sized for the slot (3.12+: C recursion budget scaled to the stack;
//!   3.10/3.11: the recursion limit times the worst measured C stack use per
//!   level fits in 8 MiB at the default limit).
//! * **Reuse.** A slot whose fiber finished goes to a small per-thread cache
//!   (no lock, no syscall, pages stay committed) after trimming: if the page
//!   `HOT_KEEP` below the stack top is resident (one `mincore`), everything
//!   below that is decommitted with `MADV_DONTNEED`. Beyond the cache, slots
//!   are fully decommitted and go back to the process-wide free lists. Slabs
//!   are never unmapped: a suspended frame's memory must stay mapped for as
//!   long as a frame object might point into it, and reuse makes unmapping
//!   unnecessary.
//! * **Leaks.** A fiber that cannot be unwound (see core.rs) keeps its slot
//!   forever; that memory is never reused.
use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::sync::{Mutex, OnceLock};

use corosensei::stack::{Stack, StackPointer};

/// Slots per guarded slab (each costs two mappings).
const GUARDED_SLAB_SLOTS: usize = 16;
/// Slots per unguarded slab (the slab costs two mappings in total).
const UNGUARDED_SLAB_SLOTS: usize = 64;
/// Slots a thread keeps committed for reuse.
const THREAD_CACHE: usize = 16;
/// Bytes below the stack top kept committed when a slot is cached.
const HOT_KEEP: usize = 64 * 1024;

/// Layout of every slot (all slots of a process have the same geometry).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub(crate) page: usize,
    /// Bytes of C stack (excluding the guard page and the chunk region).
    pub(crate) stack_size: usize,
    /// Bytes of the frame data-stack root chunk at the top of the slot
    /// (3.11+), 0 on 3.10. Not a multiple of the page size on purpose: the
    /// chunk starts `C_SHARE` bytes into a page, and the C stack grows down
    /// from the same address, so a shallow suspended fiber touches one page
    /// for both.
    pub(crate) chunk_size: usize,
    /// Guard page + C stack + chunk region (page multiple).
    pub(crate) slot_size: usize,
    /// Guarded slots allowed before slabs go unguarded.
    pub(crate) guard_budget: usize,
}

static GEOMETRY: OnceLock<Geometry> = OnceLock::new();

/// Bytes of C stack that share the first touched page with the chunk. A
/// fiber that ran into `await_` and suspended has touched at most 2.4-3.0
/// KiB of C stack (3.11-3.13; 1.6-2.0 KiB in use while suspended); its
/// first Python frames take ~100-200 bytes of chunk each.
const C_SHARE: usize = 3200;

/// Sets up the geometry once per process (module init). `chunk_pages` is
/// the chunk region in pages (0 on 3.10).
pub(crate) fn init_geometry(stack_size: usize, chunk_pages: usize) -> Geometry {
    *GEOMETRY.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => 4096,
        };
        let round = |n: usize| n.div_ceil(page) * page;
        let stack_size = round(stack_size);
        let chunk_region = chunk_pages * page;
        let chunk_size = if chunk_pages == 0 {
            0
        } else {
            chunk_region - C_SHARE
        };
        let max_maps = std::fs::read_to_string("/proc/sys/vm/max_map_count")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(65530);
        Geometry {
            page,
            stack_size,
            chunk_size,
            slot_size: page + stack_size + chunk_region,
            guard_budget: max_maps / 8,
        }
    })
}

pub(crate) fn geometry() -> &'static Geometry {
    GEOMETRY
        .get()
        .expect("fiber stack geometry not initialised")
}

struct Pool {
    /// Decommitted free slots (lowest address of the slot).
    guarded: Vec<usize>,
    unguarded: Vec<usize>,
    guarded_slots: usize,
    total_slots: usize,
    slabs: usize,
    leaked: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    guarded: Vec::new(),
    unguarded: Vec::new(),
    guarded_slots: 0,
    total_slots: 0,
    slabs: 0,
    leaked: 0,
});

/// Per-thread cache of committed ("hot") slots, returned to the process pool
/// (decommitted) when the thread exits.
struct ThreadCache(Vec<(usize, bool)>);

impl Drop for ThreadCache {
    fn drop(&mut self) {
        for (slot, guarded) in self.0.drain(..) {
            give_back(slot, guarded);
        }
    }
}

thread_local! {
    static CACHE: RefCell<ThreadCache> = const { RefCell::new(ThreadCache(Vec::new())) };
}

/// One slot, owned by exactly one fiber (or by the pool).
pub(crate) struct FiberStack {
    slot: usize,
    guarded: bool,
}

impl FiberStack {
    /// Takes a slot: the thread's cache first, then the process free lists
    /// (guarded first), then a new slab.
    pub(crate) fn take() -> std::io::Result<FiberStack> {
        if let Ok(Some((slot, guarded))) = CACHE.try_with(|c| c.borrow_mut().0.pop()) {
            return Ok(FiberStack { slot, guarded });
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = pool.guarded.pop() {
            return Ok(FiberStack {
                slot,
                guarded: true,
            });
        }
        if let Some(slot) = pool.unguarded.pop() {
            return Ok(FiberStack {
                slot,
                guarded: false,
            });
        }
        let g = geometry();
        let guarded = pool.guarded_slots + GUARDED_SLAB_SLOTS <= g.guard_budget;
        let slots = new_slab(g, guarded)?;
        pool.slabs += 1;
        pool.total_slots += slots.len();
        if guarded {
            pool.guarded_slots += slots.len();
        }
        let (first, rest) = slots.split_first().expect("empty slab");
        let list = if guarded {
            &mut pool.guarded
        } else {
            &mut pool.unguarded
        };
        // Hand out low addresses last: keeps reuse compact.
        list.extend(rest.iter().rev().copied());
        Ok(FiberStack {
            slot: *first,
            guarded,
        })
    }

    /// Lowest address of the frame data-stack root chunk (3.11+).
    pub(crate) fn chunk(&self) -> *mut u8 {
        let g = geometry();
        (self.slot + g.slot_size - g.chunk_size) as *mut u8
    }

    pub(crate) fn guarded(&self) -> bool {
        self.guarded
    }

    /// Keeps the slot out of the pool forever (its fiber could not be
    /// unwound and frames may still point into it).
    pub(crate) fn leak(self) {
        POOL.lock().unwrap_or_else(|e| e.into_inner()).leaked += 1;
        std::mem::forget(self);
    }
}

impl Drop for FiberStack {
    /// Returns the slot: trimmed into this thread's cache, or decommitted
    /// into the process pool.
    fn drop(&mut self) {
        let (slot, guarded) = (self.slot, self.guarded);
        let cached = CACHE
            .try_with(|c| {
                let mut c = c.borrow_mut();
                if c.0.len() < THREAD_CACHE {
                    trim(slot);
                    c.0.push((slot, guarded));
                    true
                } else {
                    false
                }
            })
            .unwrap_or(false);
        if !cached {
            give_back(slot, guarded);
        }
    }
}

// SAFETY: `base()` is the top of the slot's C stack region and `limit()` the
// lowest address of the slot (its guard page when it has one). The region in
// between is mapped read/write for the life of the process (slabs are never
// unmapped) and owned exclusively by this FiberStack. Stack overflow: guarded
// slots fault on their guard page; unguarded slots (only once more than
// `guard_budget` fibers exist at the same time) rely on the interpreter's
// recursion budgets, which core.rs sizes so that CPython raises
// RecursionError long before `limit()` is reached; our own Rust frames on a
// fiber have bounded depth.
unsafe impl Stack for FiberStack {
    fn base(&self) -> StackPointer {
        let g = geometry();
        let top = self.slot + g.slot_size - g.chunk_size;
        NonZeroUsize::new(top & !15).expect("null stack base")
    }

    fn limit(&self) -> StackPointer {
        NonZeroUsize::new(self.slot).expect("null stack limit")
    }
}

fn new_slab(g: &Geometry, guarded: bool) -> std::io::Result<Vec<usize>> {
    let n = if guarded {
        GUARDED_SLAB_SLOTS
    } else {
        UNGUARDED_SLAB_SLOTS
    };
    let len = n * g.slot_size;
    // SAFETY: anonymous private mapping at a kernel-chosen address; no
    // existing memory is affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = p as usize;
    // SAFETY: [p, p+len) is the mapping just created; madvise only changes
    // paging policy, mprotect turns single pages of it into guard pages
    // before any slot is handed out.
    unsafe {
        libc::madvise(p, len, libc::MADV_NOHUGEPAGE);
        let guards = if guarded { n } else { 1 };
        for i in 0..guards {
            if libc::mprotect((base + i * g.slot_size) as *mut _, g.page, libc::PROT_NONE) != 0 {
                let err = std::io::Error::last_os_error();
                libc::munmap(p, len);
                return Err(err);
            }
        }
    }
    Ok((0..n).map(|i| base + i * g.slot_size).collect())
}

/// Decommits the part of a slot more than HOT_KEEP below its top if the
/// fiber went that deep (one mincore probe).
fn trim(slot: usize) {
    let g = geometry();
    let top = slot + g.slot_size - g.chunk_size;
    if g.stack_size <= HOT_KEEP + g.page {
        return;
    }
    let probe = (top - HOT_KEEP) & !(g.page - 1);
    let mut vec = 0u8;
    // SAFETY: `probe` is a page-aligned address inside the slot's mapped
    // stack region; mincore writes one byte into `vec`.
    let resident = unsafe { libc::mincore(probe as *mut _, g.page, &mut vec) } == 0 && vec & 1 != 0;
    if resident {
        let start = slot + g.page;
        // SAFETY: [start, probe + page) lies inside the slot's stack region,
        // which no fiber uses any more (its fiber has finished).
        unsafe {
            libc::madvise(start as *mut _, probe + g.page - start, libc::MADV_DONTNEED);
        }
    }
}

/// Decommits a whole slot and returns it to the process free lists.
fn give_back(slot: usize, guarded: bool) {
    let g = geometry();
    let start = slot + g.page;
    // SAFETY: the slot's stack and chunk regions are mapped and unused (the
    // slot's fiber has finished); MADV_DONTNEED drops their pages.
    unsafe {
        libc::madvise(start as *mut _, g.slot_size - g.page, libc::MADV_DONTNEED);
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if guarded {
        pool.guarded.push(slot);
    } else {
        pool.unguarded.push(slot);
    }
}

/// Pool statistics for tests and benchmarks.
pub(crate) struct PoolStats {
    pub(crate) slabs: usize,
    pub(crate) total_slots: usize,
    pub(crate) guarded_slots: usize,
    pub(crate) free_slots: usize,
    pub(crate) cached_slots: usize,
    pub(crate) leaked_slots: usize,
}

pub(crate) fn stats() -> PoolStats {
    let cached = CACHE.try_with(|c| c.borrow().0.len()).unwrap_or(0);
    let pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    PoolStats {
        slabs: pool.slabs,
        total_slots: pool.total_slots,
        guarded_slots: pool.guarded_slots,
        free_slots: pool.guarded.len() + pool.unguarded.len(),
        cached_slots: cached,
        leaked_slots: pool.leaked,
    }
}

/// Decommits this thread's cached slots (tests measure memory with it).
pub(crate) fn flush_thread_cache() {
    let slots: Vec<(usize, bool)> = CACHE
        .try_with(|c| c.borrow_mut().0.drain(..).collect())
        .unwrap_or_default();
    for (slot, guarded) in slots {
        give_back(slot, guarded);
    }
}
