//! The timer heap: ordered exactly as asyncio orders scheduled calls (the
//! `call_at` time, then insertion order), cancelled timers removed from the
//! head lazily and the whole heap compacted when more than half of it is
//! cancelled (asyncio's rule, with its threshold of 100 timers).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtOrd};

use pyo3::prelude::*;

use std::collections::VecDeque;

use super::handle::{Handle, TimerHandle};
use super::job::Job;

const MIN_SCHEDULED_TIMER_HANDLES: usize = 100;

pub(crate) struct TimerEntry {
    when: f64,
    seq: u64,
    handle: Py<TimerHandle>,
}

impl TimerEntry {
    fn cancelled(&self, py: Python<'_>) -> bool {
        self.handle.bind(py).as_super().get().is_cancelled()
    }
}

impl PartialEq for TimerEntry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for TimerEntry {}
impl PartialOrd for TimerEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TimerEntry {
    /// Reversed, so that std's max-heap pops the earliest (when, seq) first.
    /// `when` is never NaN (call_at rejects it), so total_cmp is the numeric order.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .when
            .total_cmp(&self.when)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<TimerEntry>,
    seq: u64,
}

impl Timers {
    pub(crate) fn push(&mut self, when: f64, handle: Py<TimerHandle>) {
        self.seq += 1;
        self.heap.push(TimerEntry {
            when,
            seq: self.seq,
            handle,
        });
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    pub(crate) fn next_when(&self) -> Option<f64> {
        self.heap.peek().map(|e| e.when)
    }

    /// Drop cancelled timers: all of them if they are more than half of a
    /// large heap, else those at the head. Removed handles go to `garbage`,
    /// to be released once the caller has dropped its locks.
    pub(crate) fn purge_cancelled(
        &mut self,
        py: Python<'_>,
        cancelled: &AtomicUsize,
        garbage: &mut Vec<Py<TimerHandle>>,
    ) {
        let n = self.heap.len();
        let c = cancelled.load(AtOrd::Relaxed);
        if n > MIN_SCHEDULED_TIMER_HANDLES && c * 2 > n {
            let old = std::mem::take(&mut self.heap).into_vec();
            let mut keep = Vec::with_capacity(n - c.min(n));
            for e in old {
                if e.cancelled(py) {
                    e.handle.get().scheduled.store(false, AtOrd::Relaxed);
                    garbage.push(e.handle);
                } else {
                    keep.push(e);
                }
            }
            self.heap = BinaryHeap::from(keep);
            cancelled.store(0, AtOrd::Relaxed);
        } else {
            while self.heap.peek().is_some_and(|e| e.cancelled(py)) {
                let e = self.heap.pop().expect("peeked");
                e.handle.get().scheduled.store(false, AtOrd::Relaxed);
                decrement(cancelled);
                garbage.push(e.handle);
            }
        }
    }

    /// Move every timer due before `end` into `out` (cancelled ones are dropped).
    pub(crate) fn pop_due(
        &mut self,
        py: Python<'_>,
        end: f64,
        cancelled: &AtomicUsize,
        out: &mut VecDeque<Job>,
        garbage: &mut Vec<Py<TimerHandle>>,
    ) {
        while self.heap.peek().is_some_and(|e| e.when < end) {
            let e = self.heap.pop().expect("peeked");
            e.handle.get().scheduled.store(false, AtOrd::Relaxed);
            if e.cancelled(py) {
                decrement(cancelled);
                garbage.push(e.handle);
            } else {
                out.push_back(Job::Handle(e.handle.into_bound(py).into_super().unbind()));
            }
        }
    }

    /// Empty the heap (loop closing).
    pub(crate) fn drain(&mut self, garbage: &mut Vec<Py<TimerHandle>>) {
        for e in std::mem::take(&mut self.heap).into_vec() {
            e.handle.get().scheduled.store(false, AtOrd::Relaxed);
            garbage.push(e.handle);
        }
    }

    pub(crate) fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        for e in self.heap.iter() {
            // SAFETY: Py<TimerHandle> and Py<Handle> point to the same object;
            // TimerHandle extends Handle, so the pointer is a valid Handle.
            let base: &Py<Handle> =
                unsafe { &*(&e.handle as *const Py<TimerHandle>).cast::<Py<Handle>>() };
            Handle::visit_queued(base, visit)?;
        }
        Ok(())
    }
}

fn decrement(c: &AtomicUsize) {
    let _ = c.fetch_update(AtOrd::Relaxed, AtOrd::Relaxed, |v| {
        Some(v.saturating_sub(1))
    });
}
