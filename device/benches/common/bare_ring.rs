//! The ring protocol alone, with no device: the ceiling of any engine built on it.
//!
//! A worker thread takes descriptors from a ring (the driver publishes its tail with a
//! release store), copies each one's bytes, and publishes its completion status with a
//! release store that the driver polls: the cache-line traffic between the two CPUs that a
//! descriptor ring and completion records cost, and nothing else. `locks` adds that many
//! uncontended mutex lock / unlock pairs per descriptor (two locked read-modify-writes
//! each, the first after the copy waiting for its stores to drain), to measure what the
//! engine's own locking costs beside it (device/DESIGN.md "Performance").

use std::hint::spin_loop;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// One cache line.
#[repr(align(64))]
#[derive(Default)]
struct Line<T>(T);

struct Shared {
    /// Each slot's transfer length (the descriptor).
    descs: Vec<Line<AtomicU64>>,
    /// Each slot's completion status (the record): 1 when done.
    records: Vec<Line<AtomicU32>>,
    tail: AtomicU64,
    stop: AtomicBool,
    locks: usize,
    lock: Mutex<u64>,
}

/// A bare ring and its worker; stops the worker when dropped.
pub struct BareRing {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    tail: u64,
    /// The slots of the batch submitted last, not yet waited for.
    queued: Option<(u64, usize)>,
}

impl BareRing {
    /// A ring of `slots` descriptors whose worker copies from `from` to `to` and takes
    /// `locks` lock pairs per descriptor.
    ///
    /// # Safety
    ///
    /// `from` and `to` must point at two disjoint ranges, each as long as any transfer
    /// later submitted, alive until the ring is dropped, that nothing else touches while a
    /// batch is in flight.
    pub unsafe fn new(slots: usize, from: *const u8, to: *mut u8, locks: usize) -> Self {
        let shared = Arc::new(Shared {
            descs: (0..slots).map(|_| Line::default()).collect(),
            records: (0..slots).map(|_| Line::default()).collect(),
            tail: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            locks,
            lock: Mutex::new(0),
        });
        let (from, to) = (from as usize, to as usize);
        let worker = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || run(&shared, from, to))
        };
        Self {
            shared,
            worker: Some(worker),
            tail: 0,
            queued: None,
        }
    }

    /// Submit `n` COPYs of `len` bytes with one tail update, then wait for the batch
    /// submitted by the call before (so one batch is always queued behind the running
    /// one, as in the engine's `copy_stream`).
    pub fn stream(&mut self, n: usize, len: u64) {
        let s = &self.shared;
        let slots = s.descs.len() as u64;
        let first = self.tail;
        for k in 0..n as u64 {
            let i = ((first + k) % slots) as usize;
            s.records[i].0.store(0, Ordering::Relaxed);
            s.descs[i].0.store(len, Ordering::Relaxed);
        }
        self.tail += n as u64;
        s.tail.store(self.tail, Ordering::Release);
        if let Some((from, count)) = self.queued.replace((first, n)) {
            self.wait(from, count);
        }
    }

    fn wait(&self, from: u64, count: usize) {
        let s = &self.shared;
        let slots = s.descs.len() as u64;
        for k in 0..count as u64 {
            let i = ((from + k) % slots) as usize;
            while s.records[i].0.load(Ordering::Acquire) == 0 {
                spin_loop();
            }
        }
    }
}

impl Drop for BareRing {
    fn drop(&mut self) {
        if let Some((from, count)) = self.queued.take() {
            self.wait(from, count);
        }
        self.shared.stop.store(true, Ordering::Release);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn run(s: &Shared, from: usize, to: usize) {
    let slots = s.descs.len() as u64;
    let mut head = 0u64;
    loop {
        let tail = loop {
            let t = s.tail.load(Ordering::Acquire);
            if t != head {
                break t;
            }
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            spin_loop();
        };
        while head != tail {
            let i = (head % slots) as usize;
            let len = s.descs[i].0.load(Ordering::Relaxed) as usize;
            // SAFETY: `BareRing::new`'s contract: two disjoint live ranges at least as long
            // as any transfer submitted, which nothing else touches while it is in flight.
            unsafe { std::ptr::copy_nonoverlapping(from as *const u8, to as *mut u8, len) };
            for _ in 0..s.locks {
                *s.lock.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            }
            s.records[i].0.store(1, Ordering::Release);
            head += 1;
        }
    }
}
