//! Descriptor queues: register state, lifecycle and interrupt coalescing.
//!
//! Each queue is a [`QueueSlot`] shared between the register front end (which holds the
//! transport's device lock) and the queue's worker thread (which never does). The slot's
//! mutex guards the registers and the hand-over between the two: the front end records a
//! doorbell and wakes the worker; the worker takes one descriptor at a time, marks itself
//! in flight, runs it without the lock and comes back to complete it. Stopping a queue
//! (disable, reset) bumps the slot's epoch, which the worker checks between chunks, and waits
//! until the worker is no longer in flight.
//!
//! The ring's progress (head, tail, the completion counters and whether the queue runs) is
//! kept in atomics beside the registers ([`Progress`]), so that a worker whose queue stays
//! busy goes from one descriptor to the next without the lock (see `engine::worker`).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::stats::QueueCounters;
use crate::spec::*;

/// Why a queue halted (`Q_HALT_REASON`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaltReason {
    /// Enabled with a misaligned base, a bad size or a domain that does not exist.
    BadConfig,
    /// The doorbell was written with this index, beyond the ring.
    BadTail(u32),
    /// The descriptor at this IOVA could not be fetched.
    DescriptorFetch(u64),
    /// A descriptor faulted with `Q_CTRL_HALT_ON_FAULT` set.
    Fault,
}

impl HaltReason {
    /// The `HALT_*` code.
    pub fn code(&self) -> u32 {
        match self {
            Self::BadConfig => HALT_BAD_CONFIG,
            Self::BadTail(_) => HALT_BAD_TAIL,
            Self::DescriptorFetch(_) => HALT_DESC_FETCH,
            Self::Fault => HALT_FAULT,
        }
    }
}

/// Lifecycle of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Not enabled; doorbells are ignored.
    Disabled,
    /// Enabled; the worker processes descriptors from head to tail.
    Running,
    /// Enabled but stopped until the driver resumes or re-enables it.
    Halted(HaltReason),
}

/// How the descriptor in flight is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Abort {
    /// `Q_CTRL` disable: complete it with `STATUS_ABORTED`.
    Disable,
    /// Device reset or shutdown: stop without writing anything.
    Silent,
}

/// Limits the register front end checks queue writes against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// MSI-X vectors.
    pub vectors: u16,
    /// DMA domains.
    pub domains: u32,
}

/// Registers and engine bookkeeping of one queue, under the slot's mutex.
#[derive(Debug)]
pub(crate) struct QueueRegs {
    pub base: u64,
    pub size: u32,
    pub vector: u16,
    pub domain: u32,
    pub coal_count: u32,
    pub coal_usec: u32,
    pub halt_on_fault: bool,
    pub state: QueueState,
    /// The worker is running a descriptor (taken at head) without the lock.
    pub in_flight: bool,
    /// Threads waiting on `QueueSlot::idle` for `in_flight` to clear (the worker signals
    /// only when there are some: an unconditional notify costs a futex system call per
    /// descriptor).
    pub drain_waiters: u32,
    /// What stopping the descriptor in flight means (valid when the epoch moved).
    pub abort: Abort,
    /// Completions that asked for an interrupt since the vector was last raised.
    pub coal_pending: u32,
    /// When the pending interrupt is due (`Q_COAL_USEC` after the first pending one).
    pub coal_deadline: Option<Instant>,
    /// The worker must exit.
    pub shutdown: bool,
    /// The worker waits on the condition variable (else it runs or spins on the kick count).
    pub sleeping: bool,
}

impl QueueRegs {
    fn new(index: u16) -> Self {
        Self {
            base: 0,
            size: 0,
            vector: index,
            domain: 0,
            coal_count: 0,
            coal_usec: 0,
            halt_on_fault: false,
            state: QueueState::Disabled,
            in_flight: false,
            drain_waiters: 0,
            abort: Abort::Silent,
            coal_pending: 0,
            coal_deadline: None,
            shutdown: false,
            sleeping: false,
        }
    }

    /// Registers, counters and coalescing back to their reset values. The worker's own
    /// bookkeeping stays: it may be asleep on the condition variable, or shutting down.
    fn reset(&mut self, index: u16) {
        *self = Self {
            in_flight: self.in_flight,
            drain_waiters: self.drain_waiters,
            abort: self.abort,
            shutdown: self.shutdown,
            sleeping: self.sleeping,
            ..Self::new(index)
        };
    }

    /// A completion that asked for an interrupt: returns the vector to raise now, if any.
    pub fn coalesce(&mut self, now: Instant) -> Option<u16> {
        self.coal_pending = self.coal_pending.saturating_add(1);
        if self.coal_count <= 1 || self.coal_pending >= self.coal_count {
            return self.flush();
        }
        if self.coal_usec != 0 && self.coal_deadline.is_none() {
            self.coal_deadline = Some(now + Duration::from_micros(self.coal_usec.into()));
        }
        None
    }

    /// The coalescing timer: returns the vector to raise when the deadline has passed.
    pub fn timer(&mut self, now: Instant) -> Option<u16> {
        match self.coal_deadline {
            Some(d) if now >= d => self.flush(),
            _ => None,
        }
    }

    /// Raise a pending interrupt now (returns its vector), clearing the pending state.
    pub fn flush(&mut self) -> Option<u16> {
        let pending = self.coal_pending != 0;
        self.coal_pending = 0;
        self.coal_deadline = None;
        pending.then_some(self.vector)
    }
}

/// The ring's progress, beside the registers: what a worker reads and writes between two
/// descriptors without the queue lock.
///
/// Writers: `tail` and `running` change under the queue lock only (the doorbell, enable,
/// disable, halts, resume); `head`, `completed` and `errors` belong to the worker while it
/// is in flight (it stores them with or without the lock), and to the register front end,
/// under the lock, only while it is not (enable, disable once the worker has left, reset).
/// Each has one writer at a time, so a plain load and store update it.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// `Q_HEAD`: the next descriptor the engine takes. Stored (release) after the
    /// completion record of the descriptor before it.
    pub head: AtomicU32,
    /// `Q_TAIL`: stored (release) by the doorbell.
    pub tail: AtomicU32,
    /// `Q_COMPLETED`.
    pub completed: AtomicU32,
    /// `Q_ERRORS`.
    pub errors: AtomicU32,
    /// The queue's state is `Running` (the worker may go on without the lock).
    pub running: AtomicBool,
}

/// Add one to a counter that one thread at a time changes (see [`Progress`]).
pub(crate) fn bump(counter: &AtomicU32) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

/// One queue, shared by the register front end and the queue's worker.
#[derive(Debug)]
pub(crate) struct QueueSlot {
    pub index: u16,
    regs: Mutex<QueueRegs>,
    /// Wakes the sleeping worker: doorbell, resume, coalescing, bus master, shutdown.
    pub wake: Condvar,
    /// Counts those events, for a worker that spins a little before it sleeps.
    pub kicks: AtomicU64,
    /// Wakes whoever waits for the worker to leave a descriptor.
    pub idle: Condvar,
    /// Bumped when the descriptor in flight must stop; the worker compares between chunks.
    pub epoch: AtomicU64,
    /// A coalescing deadline is armed (saves the worker a lock between chunks).
    pub timer_armed: AtomicBool,
    /// Head, tail, completion counters and whether the queue runs.
    pub progress: Progress,
    /// Statistics.
    pub counters: QueueCounters,
}

impl QueueSlot {
    pub fn new(index: u16) -> Self {
        Self {
            index,
            regs: Mutex::new(QueueRegs::new(index)),
            wake: Condvar::new(),
            kicks: AtomicU64::new(0),
            idle: Condvar::new(),
            epoch: AtomicU64::new(0),
            timer_armed: AtomicBool::new(false),
            progress: Progress::default(),
            counters: QueueCounters::default(),
        }
    }

    /// `Q_HEAD`.
    pub fn head(&self) -> u32 {
        self.progress.head.load(Ordering::Acquire)
    }

    /// `Q_TAIL`.
    pub fn tail(&self) -> u32 {
        self.progress.tail.load(Ordering::Acquire)
    }

    /// A descriptor is ready for the engine: running with head != tail. Call with the lock
    /// held (`r`).
    pub fn has_work(&self, r: &QueueRegs) -> bool {
        r.state == QueueState::Running && self.head() != self.tail()
    }

    /// Change the queue's state (call with the lock held), mirrored in
    /// [`Progress::running`].
    pub fn set_state(&self, r: &mut QueueRegs, state: QueueState) {
        r.state = state;
        self.progress
            .running
            .store(state == QueueState::Running, Ordering::Release);
    }

    /// Head, tail and the completion counters back to 0. Call with the lock held and the
    /// worker not in flight.
    fn clear_progress(&self) {
        self.rewind();
        self.progress.completed.store(0, Ordering::Release);
        self.progress.errors.store(0, Ordering::Release);
    }

    /// Head and tail back to 0. Call with the lock held and the worker not in flight.
    fn rewind(&self) {
        self.progress.head.store(0, Ordering::Release);
        self.progress.tail.store(0, Ordering::Release);
    }

    fn status(&self, r: &QueueRegs) -> u32 {
        match r.state {
            QueueState::Disabled => 0,
            QueueState::Running if self.head() != self.tail() => Q_STATUS_ENABLED | Q_STATUS_BUSY,
            QueueState::Running => Q_STATUS_ENABLED,
            QueueState::Halted(_) => Q_STATUS_ENABLED | Q_STATUS_ERROR,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, QueueRegs> {
        self.regs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tell the worker something changed (call with the lock held): a spinning worker sees
    /// the kick count move, a sleeping one is woken. No system call while it is not asleep.
    pub fn kick(&self, r: &QueueRegs) {
        self.kicks.fetch_add(1, Ordering::Release);
        if r.sleeping {
            self.wake.notify_one();
        }
    }

    /// Mirror the coalescing deadline into `timer_armed`.
    pub fn sync_timer(&self, regs: &QueueRegs) {
        self.timer_armed
            .store(regs.coal_deadline.is_some(), Ordering::Relaxed);
    }

    pub fn state(&self) -> QueueState {
        self.lock().state
    }

    /// Read queue register `reg` (offset within the queue's block).
    pub fn read(&self, reg: u64) -> u32 {
        let r = self.lock();
        match reg {
            Q_BASE_LO => r.base as u32,
            Q_BASE_HI => (r.base >> 32) as u32,
            Q_SIZE => r.size,
            Q_CTRL => {
                let enable = if r.state == QueueState::Disabled {
                    0
                } else {
                    Q_CTRL_ENABLE
                };
                let hof = if r.halt_on_fault {
                    Q_CTRL_HALT_ON_FAULT
                } else {
                    0
                };
                enable | hof
            }
            Q_HEAD => self.head(),
            Q_TAIL => self.tail(),
            Q_STATUS => self.status(&r),
            Q_MSIX_VECTOR => u32::from(r.vector),
            Q_COMPLETED => self.progress.completed.load(Ordering::Relaxed),
            Q_ERRORS => self.progress.errors.load(Ordering::Relaxed),
            Q_DOMAIN => r.domain,
            Q_COAL_COUNT => r.coal_count,
            Q_COAL_USEC => r.coal_usec,
            Q_HALT_REASON => match r.state {
                QueueState::Halted(h) => h.code(),
                _ => HALT_NONE,
            },
            _ => 0,
        }
    }

    /// Write queue register `reg` (offset within the queue's block). Disabling waits until
    /// the worker has left the descriptor in flight (at most one chunk).
    pub fn write(&self, reg: u64, value: u32, limits: Limits) {
        let q = self.index;
        let mut r = self.lock();
        let configurable = r.state == QueueState::Disabled;
        match reg {
            Q_BASE_LO | Q_BASE_HI | Q_SIZE | Q_DOMAIN if !configurable => {
                warn!(
                    q,
                    reg, value, "guest error: queue reconfigured while enabled; ignored"
                );
            }
            Q_BASE_LO => r.base = (r.base & !0xffff_ffff) | u64::from(value),
            Q_BASE_HI => r.base = (r.base & 0xffff_ffff) | u64::from(value) << 32,
            Q_SIZE => r.size = value,
            Q_DOMAIN => r.domain = value,
            Q_MSIX_VECTOR => match u16::try_from(value) {
                Ok(v) if v < limits.vectors => r.vector = v,
                _ => warn!(q, value, "guest error: MSI-X vector out of range; ignored"),
            },
            Q_COAL_COUNT => {
                r.coal_count = value;
                self.kick(&r);
            }
            Q_COAL_USEC => {
                r.coal_usec = value;
                self.kick(&r);
            }
            Q_CTRL => self.ctrl(r, value, limits),
            Q_TAIL => match r.state {
                QueueState::Disabled => {
                    debug!(q, value, "doorbell on a disabled queue; ignored")
                }
                QueueState::Halted(HaltReason::BadConfig) => {
                    // Halted queues accept doorbells; this one stays halted until disabled.
                    if value < r.size {
                        self.progress.tail.store(value, Ordering::Release);
                    }
                    debug!(q, value, "doorbell on a misconfigured queue");
                }
                _ if value >= r.size => {
                    warn!(
                        q,
                        value,
                        size = r.size,
                        "guest error: doorbell beyond the ring; queue halted"
                    );
                    self.set_state(&mut r, QueueState::Halted(HaltReason::BadTail(value)));
                }
                _ => {
                    // The kick count first: a worker that sees the new tail sees it moved,
                    // and lets go of a bus memory snapshot older than this doorbell
                    // (`engine::Exec::keep`). The worker wakes once the lock is let go.
                    self.kick(&r);
                    self.progress.tail.store(value, Ordering::Release);
                }
            },
            _ => debug!(q, reg, value, "write to a read-only queue register"),
        }
    }

    fn ctrl(&self, mut r: MutexGuard<'_, QueueRegs>, value: u32, limits: Limits) {
        let q = self.index;
        r.halt_on_fault = value & Q_CTRL_HALT_ON_FAULT != 0;
        let enable = value & Q_CTRL_ENABLE != 0;
        match (r.state, enable) {
            (QueueState::Disabled, true) => {
                // The worker is not in flight on a disabled queue. (The completion counters
                // run on across a disable and enable, as before; a reset clears them.)
                self.rewind();
                let size_ok =
                    (Q_SIZE_MIN..=Q_SIZE_MAX).contains(&r.size) && r.size.is_power_of_two();
                let base_ok = r.base % DESC_SIZE == 0;
                let domain_ok = r.domain < limits.domains;
                let state = if size_ok && base_ok && domain_ok {
                    QueueState::Running
                } else {
                    warn!(
                        q,
                        base = r.base,
                        size = r.size,
                        domain = r.domain,
                        "guest error: bad queue configuration; queue halted"
                    );
                    QueueState::Halted(HaltReason::BadConfig)
                };
                self.set_state(&mut r, state);
            }
            (QueueState::Disabled, false) => {}
            (_, false) => {
                drop(self.stop(r, Abort::Disable));
            }
            (
                QueueState::Halted(h @ (HaltReason::Fault | HaltReason::DescriptorFetch(_))),
                true,
            ) if value & Q_CTRL_RESUME != 0 => {
                debug!(q, halt = ?h, head = self.head(), "queue resumed");
                self.set_state(&mut r, QueueState::Running);
                self.kick(&r);
            }
            (QueueState::Running, true) if value & Q_CTRL_RESUME != 0 => {
                debug!(q, "resume of a running queue; nothing to do");
            }
            (state, true) if value & Q_CTRL_RESUME != 0 => {
                warn!(
                    q,
                    ?state,
                    "guest error: resume of a queue that cannot resume; ignored"
                );
            }
            (_, true) => {}
        }
    }

    /// Disable the queue: head = tail = 0, pending interrupts dropped; the descriptor in
    /// flight is stopped at its next chunk boundary (`abort` says whether it still gets an
    /// `STATUS_ABORTED` completion). Returns once the worker has left it.
    pub fn stop<'a>(
        &'a self,
        mut r: MutexGuard<'a, QueueRegs>,
        abort: Abort,
    ) -> MutexGuard<'a, QueueRegs> {
        self.set_state(&mut r, QueueState::Disabled);
        r.coal_pending = 0;
        r.coal_deadline = None;
        self.sync_timer(&r);
        if r.in_flight {
            r.abort = abort;
            self.epoch.fetch_add(1, Ordering::AcqRel);
            r.drain_waiters += 1;
            while r.in_flight {
                r = self.idle.wait(r).unwrap_or_else(PoisonError::into_inner);
            }
            r.drain_waiters -= 1;
        }
        // Only now: a worker in flight advances the head until it leaves.
        self.rewind();
        r
    }

    /// Device reset: stop silently, then every register and counter to its reset value.
    pub fn reset(&self) {
        let r = self.lock();
        let mut r = self.stop(r, Abort::Silent);
        r.reset(self.index);
        self.clear_progress();
        self.counters.clear();
    }

    /// Stop the worker for good (the device is being dropped).
    pub fn shutdown(&self) {
        let r = self.lock();
        let mut r = self.stop(r, Abort::Silent);
        r.shutdown = true;
        self.kick(&r);
    }
}
