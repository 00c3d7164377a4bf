//! The timer heap: ordered exactly as asyncio orders scheduled calls (the
//! `call_at` time, then insertion order), cancelled timers removed from the
//! head lazily and the whole heap compacted when more than half of it is
//! cancelled (asyncio's rule, with its threshold of 100 timers).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering as AtOrd};

use std::collections::VecDeque;

use super::handle::HandleRef;
use super::job::Job;

const MIN_SCHEDULED_TIMER_HANDLES: usize = 100;

pub(crate) struct TimerEntry {
    when: f64,
    seq: u64,
    handle: HandleRef,
}

impl TimerEntry {
    fn cancelled(&self) -> bool {
        self.handle.get().is_cancelled()
    }

    fn unschedule(&self) {
        if let Some((_, scheduled)) = self.handle.timer() {
            scheduled.store(false, AtOrd::Relaxed);
        }
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
    pub(crate) fn push(&mut self, when: f64, handle: HandleRef) {
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
        cancelled: &AtomicUsize,
        garbage: &mut Vec<HandleRef>,
    ) {
        let n = self.heap.len();
        let c = cancelled.load(AtOrd::Relaxed);
        if n > MIN_SCHEDULED_TIMER_HANDLES && c * 2 > n {
            let old = std::mem::take(&mut self.heap).into_vec();
            let mut keep = Vec::with_capacity(n - c.min(n));
            for e in old {
                if e.cancelled() {
                    e.unschedule();
                    garbage.push(e.handle);
                } else {
                    keep.push(e);
                }
            }
            self.heap = BinaryHeap::from(keep);
            cancelled.store(0, AtOrd::Relaxed);
        } else {
            while self.heap.peek().is_some_and(|e| e.cancelled()) {
                let e = self.heap.pop().expect("peeked");
                e.unschedule();
                decrement(cancelled);
                garbage.push(e.handle);
            }
        }
    }

    /// Move every timer due before `end` into `out` (cancelled ones are dropped).
    pub(crate) fn pop_due(
        &mut self,
        end: f64,
        cancelled: &AtomicUsize,
        out: &mut VecDeque<Job>,
        garbage: &mut Vec<HandleRef>,
    ) {
        while self.heap.peek().is_some_and(|e| e.when < end) {
            let e = self.heap.pop().expect("peeked");
            e.unschedule();
            if e.cancelled() {
                decrement(cancelled);
                garbage.push(e.handle);
            } else {
                out.push_back(Job::Handle(e.handle));
            }
        }
    }

    /// Empty the heap (loop closing).
    pub(crate) fn drain(&mut self, garbage: &mut Vec<HandleRef>) {
        for e in std::mem::take(&mut self.heap).into_vec() {
            e.unschedule();
            garbage.push(e.handle);
        }
    }

    pub(crate) fn visit(&self, visit: &pyo3::gc::PyVisit<'_>) -> Result<(), pyo3::PyTraverseError> {
        for e in self.heap.iter() {
            e.handle.visit_queued(visit)?;
        }
        Ok(())
    }
}

fn decrement(c: &AtomicUsize) {
    let _ = c.fetch_update(AtOrd::Relaxed, AtOrd::Relaxed, |v| {
        Some(v.saturating_sub(1))
    });
}
