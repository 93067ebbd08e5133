//! The DMA engine: one worker thread per queue.
//!
//! A worker sleeps on its queue's condition variable until the queue runs, has descriptors
//! (head != tail) and Bus Master Enable is set, or until its coalescing deadline. It then
//! takes the descriptor at head, marks itself in flight and runs it **without** the queue
//! lock: the descriptor fetch, the data and the completion record each go through the
//! queue's domain ([`Mmu::translate`], or a [`Translator`] for the pages of a chunk) and are
//! then checked against bus memory (one region lookup for a descriptor or a record, whose
//! bytes must lie in one region; one per piece of data). While the queue stays busy, the
//! completion record of one descriptor, the fetch of the next and its first chunk share one
//! hold of the gate (see `Exec::finish`).
//!
//! Data moves chunk by chunk. A chunk is at most [`CHUNK_MAX`] bytes, translated and moved
//! under one read hold of [`Mmu::chunk_gate`] and one snapshot of bus memory, so an
//! invalidation, a disable, a reset or an unmap barrier waits for at most one chunk per
//! worker. Inside a chunk every page of every side is translated through the IOTLB, in
//! offset order, before any byte of it moves; consecutive pages that are contiguous in bus
//! memory and inside one bus region on each side form a *piece*, checked with one region
//! lookup per side and moved with one copy (one `memcpy` for a 1 MiB chunk of contiguous
//! 4 KiB pages instead of 256). A fault stops the chunk at the exact first faulting page,
//! after the pieces before it have moved. Between chunks the worker checks its queue's
//! epoch (disable, reset) and coalescing timer.
//!
//! A descriptor that succeeded and asks for no interrupt, on a queue that still runs, is
//! completed without the queue lock (`Exec::complete_fast`): counted, its completion record
//! written (status last) under the hold its data moved under, the head advanced (an atomic,
//! see `queue::Progress`); and when the tail is ahead the worker takes the next
//! descriptor, still without the lock, fetching it under the same hold while no thread
//! waits for the gate's write side and no doorbell has rung since the hold was taken (a
//! descriptor rung since may use memory mapped since). The worker stays in flight all
//! along, so a disable or reset still waits for it. Anything else (a fault, an interrupt,
//! a halt, an abort, a coalescing deadline, an empty ring) comes back under the queue lock
//! to complete the descriptor, raise interrupts and halt — or, when the epoch moved, to
//! abort.
//!
//! Workers never take the transport's device lock, so a register access that waits for a
//! worker (disable, reset) cannot deadlock. Lock order: queue lock, then the chunk gate,
//! then the MMU's and the fault log's own locks; nothing takes a queue lock while holding
//! the gate.

use std::ops::ControlFlow;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, RwLockReadGuard};
use std::time::Instant;

use tracing::{debug, warn};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryLoadGuard,
    GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, VolatileMemory,
    VolatileSlice,
};

use super::bus::{self, is_lost, region_allows, Access};
use super::faults::{Fault, FaultLog};
use super::inject::{OnDescriptor, OnInterrupt};
use super::mmu::{Mmu, Remembered, Translation, Translator};
use super::queue::{bump, Abort, HaltReason, QueueRegs, QueueSlot, QueueState};
use super::remote;
use super::sigbus;
use super::stats::{add, add_locked};
use super::{BusMemory, DeviceConfig};
use crate::irq::InterruptSink;
use crate::spec::*;
use crate::trace::event::{FaultEvent, Injected};
use crate::trace::{Event, Tracer, NO_QUEUE};

/// Largest chunk translated and moved under one hold of the chunk gate (and one snapshot of
/// bus memory): bounds how long a disable, reset, invalidation or unmap waits for a worker.
pub const CHUNK_MAX: u64 = 1 << 20;

/// Size of a worker's scratch buffers (COMPARE, CRC32C and FILL work through them).
const BLOCK: usize = 64 << 10;

/// Translations of one address tried when walks keep finding newly lost memory (each try
/// marks one more region lost; see [`Exec::extent`]).
const LOST_TRIES: u32 = 4;

/// State shared by the register front end and the workers, reached without the transport's
/// device lock.
pub(crate) struct Shared {
    pub config: DeviceConfig,
    pub mem: BusMemory,
    pub irq: Arc<dyn InterruptSink>,
    pub bus_master: AtomicBool,
    pub inject: super::inject::Rules,
    pub trace: Tracer,
    pub recent_faults: super::view::RecentFaults,
    pub mmu: Mmu,
    pub faults: FaultLog,
    pub queues: Vec<QueueSlot>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("bus_master", &self.bus_master)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Follow the PCI command register's Bus Master Enable; setting it wakes every worker.
    pub fn set_bus_master(&self, on: bool) {
        self.bus_master.store(on, Ordering::Release);
        if on {
            for slot in &self.queues {
                // Taking the lock orders the store before the worker's next check.
                let r = slot.lock();
                slot.kick(&r);
            }
        }
    }

    /// Raise `vector` for queue `slot` and count it.
    fn raise(&self, slot: &QueueSlot, vector: Option<u16>) {
        if let Some(v) = vector {
            match self.inject.on_interrupt(slot.index) {
                None => {}
                Some(OnInterrupt::Drop) => {
                    debug!(q = slot.index, v, "injected: interrupt dropped");
                    self.trace.record(|| Event::Injected {
                        queue: slot.index,
                        what: Injected::DropInterrupt { vector: v },
                    });
                    return;
                }
                Some(OnInterrupt::Delay(delay)) => {
                    debug!(q = slot.index, v, ?delay, "injected: interrupt delayed");
                    self.trace.record(|| Event::Injected {
                        queue: slot.index,
                        what: Injected::DelayInterrupt {
                            vector: v,
                            us: delay.as_micros() as u64,
                        },
                    });
                    add(&slot.counters.interrupts, 1);
                    let (irq, trace, queue) = (self.irq.clone(), self.trace.clone(), slot.index);
                    // A thread per delayed interrupt: injection is about error paths, and a
                    // sleeping thread cannot hold anything up.
                    let sent = std::thread::Builder::new()
                        .name("domdma-delay".into())
                        .spawn(move || {
                            std::thread::sleep(delay);
                            irq.trigger(v);
                            trace.record(|| Event::Interrupt { vector: v, queue });
                        });
                    if sent.is_err() {
                        self.irq.trigger(v);
                    }
                    return;
                }
            }
            // Counted before it is delivered: a driver that reads QSTAT_INTERRUPTS after
            // taking the interrupt sees it counted.
            add(&slot.counters.interrupts, 1);
            self.irq.trigger(v);
            self.trace.record(|| Event::Interrupt {
                vector: v,
                queue: slot.index,
            });
        }
    }
}

/// What a descriptor's completion record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    status: u8,
    reason: u8,
    access: u8,
    bytes: u32,
    fault_addr: u64,
    result: u64,
}

impl Outcome {
    fn ok(bytes: u32, result: u64) -> Self {
        Self {
            status: STATUS_OK,
            reason: 0,
            access: 0,
            bytes,
            fault_addr: 0,
            result,
        }
    }

    fn fault(status: u8, f: &Fault, bytes: u32) -> Self {
        Self {
            status,
            reason: f.reason,
            access: f.access,
            bytes,
            fault_addr: f.iova,
            result: 0,
        }
    }

    /// A completion with `status` and nothing done (an injected error).
    fn status(status: u8) -> Self {
        Self {
            status,
            reason: 0,
            access: 0,
            bytes: 0,
            fault_addr: 0,
            result: 0,
        }
    }

    fn aborted(bytes: u32) -> Self {
        Self {
            status: STATUS_ABORTED,
            ..Self::ok(bytes, 0)
        }
    }

    /// The completion record of a descriptor with tag `tag`.
    fn record(&self, tag: u64) -> CompletionRecord {
        CompletionRecord {
            status: self.status,
            fault_reason: self.reason,
            fault_access: self.access,
            reserved: 0,
            bytes: self.bytes,
            fault_addr: self.fault_addr,
            result: self.result,
            tag,
        }
    }
}

/// How running a descriptor ended.
#[derive(Debug)]
enum RunResult {
    /// The descriptor could not be fetched (the fault is logged): halt with head at it.
    FetchFault(Fault),
    /// It ran to its end, successfully or not.
    Done(Descriptor, Outcome),
    /// Disable or reset stopped it between chunks, after `bytes` bytes.
    Aborted(Descriptor, u32),
}

/// Why a transfer stopped early.
#[derive(Debug)]
enum Stop {
    /// A fault after `done` bytes.
    Fault(Fault, u64),
    /// The queue's epoch moved after `done` bytes.
    Aborted(u64),
}

/// One side of a transfer.
#[derive(Debug, Clone, Copy)]
struct Side {
    iova: u64,
    access: Access,
    /// `ACCESS_*` flags of a fault on this side.
    flags: u8,
}

impl Side {
    fn read(iova: u64) -> Self {
        Self {
            iova,
            access: Access::Read,
            flags: 0,
        }
    }
    fn write(iova: u64) -> Self {
        Self {
            iova,
            access: Access::Write,
            flags: ACCESS_WRITE,
        }
    }
}

/// A small access (a descriptor, a completion record) translated and checked by
/// [`Exec::map_small`]: its bus address and the bus region holding all of it, so that the
/// access itself needs no second region lookup.
#[derive(Clone, Copy)]
struct Small<'m> {
    bus: u64,
    region: &'m GuestRegionMmap,
}

impl<'m> Small<'m> {
    /// The `len` bytes of the access (checked by [`Exec::map_small`]: in the region).
    fn slice(&self, len: u64) -> Option<VolatileSlice<'m, ()>> {
        let at = MemoryRegionAddress(self.bus - self.region.start_addr().0);
        self.region.get_slice(at, usize::try_from(len).ok()?).ok()
    }
}

/// Where a piece starts on one side, and the bus region holding it.
#[derive(Clone, Copy)]
struct Span<'m> {
    bus: u64,
    region: &'m GuestRegionMmap,
}

impl Span<'_> {
    /// Whether bus address `bus`, `len` bytes into the piece, continues it in its region.
    fn continues(&self, len: u64, bus: u64) -> bool {
        self.bus.wrapping_add(len) == bus && bus <= self.region.last_addr().0
    }

    /// Bytes from `bus` (in the region) to the end of the region.
    fn room(&self, bus: u64) -> u64 {
        (self.region.last_addr().0 - bus).saturating_add(1)
    }
}

/// Bytes of a chunk that are contiguous in bus memory and inside one bus region on each
/// side: what one call of the operation moves. `off` is the offset in the chunk.
struct Piece<'m> {
    off: u64,
    len: u64,
    a: Span<'m>,
    b: Option<Span<'m>>,
}

/// The translated pages holding the current offset of a chunk on one side, contiguous in
/// bus memory: offsets `[off, end)` of the chunk are at bus `bus` onwards.
#[derive(Debug, Clone, Copy, Default)]
struct Page {
    off: u64,
    bus: u64,
    end: u64,
}

impl Page {
    /// The pages of translation `t`, from chunk offset `off`.
    fn of(off: u64, t: &Translation) -> Self {
        Self {
            off,
            bus: t.bus,
            end: off.saturating_add(t.len),
        }
    }

    /// Bus address of chunk offset `o` (in `[off, end)`).
    fn bus_at(&self, o: u64) -> u64 {
        self.bus.wrapping_add(o - self.off)
    }
}

/// A worker's buffers, allocated once.
struct Scratch {
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Scratch {
    fn new() -> Self {
        Self {
            a: vec![0; BLOCK],
            b: vec![0; BLOCK + 8],
        }
    }
}

/// One read hold of the chunk gate and the snapshot of bus memory taken under it, inside
/// which the engine touches bus memory ([`Exec::hold`]). Hold at most one per thread (see
/// [`Mmu::chunk_gate`]) and never take a queue lock while holding it.
struct Hold<'s> {
    // Declared before the gate: the snapshot goes first, as a local taken after the gate
    // would.
    mem: GuestMemoryLoadGuard<GuestMemoryMmap>,
    _gate: RwLockReadGuard<'s, ()>,
    /// The queue's kick count read before the snapshot was taken: while it has not moved,
    /// no doorbell has published a descriptor since, so the snapshot has every mapping a
    /// descriptor of the ring may use (see [`Exec::keep`]).
    kicks: u64,
}

/// The smallest page of a mapping (4 KiB): bus addresses in one such page follow the IOVAs
/// mapped to it.
const SMALLEST_PAGE: u64 = 1 << 12;

/// Hint to the CPU that the line at bus address `bus` of `region` will be read soon. A
/// hint only: nothing is read (no fault, no signal, whatever the page's state), and
/// nothing happens outside the region.
#[inline]
fn prefetch(region: &GuestRegionMmap, bus: u64) {
    let Some(offset) = bus.checked_sub(region.start_addr().0) else {
        return;
    };
    let Ok(host) = region.get_host_address(MemoryRegionAddress(offset)) else {
        return;
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint that never faults and changes no memory or
    // architectural state (SSE, which it needs, is part of x86-64); `host` is inside the
    // region's mapping anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            host.cast_const().cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = host;
}

/// A descriptor's bytes as the trace records them: 8 little-endian words.
/// `crc` (a CRC32C so far) continued over the bytes of `s`, read through `buf` (bus memory
/// is copied out, never borrowed as a Rust slice).
fn crc32c_of(crc: u32, s: &VolatileSlice<'_, ()>, buf: &mut [u8]) -> u32 {
    let mut crc = crc;
    let mut off = 0;
    while off < s.len() {
        let k = (s.len() - off).min(buf.len());
        if let Ok(x) = s.subslice(off, k) {
            x.copy_to(&mut buf[..k]);
        }
        crc = crc32c::crc32c_append(crc, &buf[..k]);
        off += k;
    }
    crc
}

/// What XORing byte `at` of `len` bytes with `x` does to their CRC32C: the CRC is affine
/// in the data, `crc(m ^ e) = crc(m) ^ crc(e) ^ crc(0^len)` for messages of one length, so
/// the change is `crc(e) ^ crc(0^len)` with `e` all zeros but `x` at `at`. Costs two CRCs
/// of `len` zeros (an injected corruption only).
fn crc32c_flip(len: u64, at: u64, x: u8) -> u32 {
    const ZEROS: [u8; 4096] = [0; 4096];
    let zeros = |mut crc: u32, mut n: u64| {
        while n > 0 {
            let k = n.min(ZEROS.len() as u64) as usize;
            crc = crc32c::crc32c_append(crc, &ZEROS[..k]);
            n -= k as u64;
        }
        crc
    };
    let e = zeros(crc32c::crc32c_append(zeros(0, at), &[x]), len - at - 1);
    e ^ zeros(0, len)
}

fn words(raw: &[u8; DESC_SIZE as usize]) -> [u64; 8] {
    std::array::from_fn(|i| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&raw[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    })
}

/// A fault as the trace records it.
fn fault_event(f: &Fault, seq: u32, injected: bool) -> FaultEvent {
    FaultEvent {
        reason: f.reason,
        access: f.access,
        domain: f.domain,
        queue: f.queue,
        iova: f.iova,
        info: f.info,
        level: f.level,
        seq,
        injected,
    }
}

/// The work a worker took under the queue lock.
#[derive(Debug, Clone, Copy)]
struct Job {
    base: u64,
    /// Ring size (a power of two).
    size: u32,
    head: u32,
    domain: u16,
    epoch: u64,
}

/// The first lookups of a chunk, side `a`'s and side `b`'s (see `Exec::chunk_kept`).
type ChunkKept = (Remembered, Option<Remembered>);

/// What the worker does after [`Exec::complete_fast`].
enum Fast {
    /// The descriptor is complete; run this one next, still without the queue lock.
    Next(Job),
    /// The descriptor is complete; the worker goes back to the queue lock (to stop, wait,
    /// or do what the lock's path does).
    Done,
    /// Complete the descriptor under the queue lock ([`Exec::finish`], with the record
    /// already written or not and the counting already done or not).
    Locked(Option<bool>, Option<bool>),
}

/// Runs one descriptor of one queue. Every access to bus memory takes a fresh snapshot of
/// it under the chunk gate, so once the transport has removed a mapping and passed
/// [`Mmu::barrier`], no access reaches the old mapping.
struct Exec<'a> {
    shared: &'a Shared,
    slot: &'a QueueSlot,
    domain: u16,
    epoch: u64,
    /// Bus address the completion record was written at (0: none yet), for the trace.
    record_bus: std::cell::Cell<u64>,
    /// The last translations of small reads (descriptors, BATCH elements) and writes
    /// (completion records), used again without the IOTLB's lock while the IOTLB has not
    /// changed ([`crate::core::mmu::Mmu::recall`]); the worker keeps them from one
    /// descriptor to the next.
    remembered: [std::cell::Cell<Option<Remembered>>; 2],
    /// The lookups of the last chunk's first page on each side, remembered together and
    /// used again, both or neither, by a chunk that starts in the pages they cover
    /// ([`crate::core::mmu::Mmu::recall_pair`]); kept from one descriptor to the next.
    chunk_kept: std::cell::Cell<Option<ChunkKept>>,
}

/// The worker thread of queue `q`. Returns when the queue is shut down.
///
/// After a descriptor, a worker with nothing left to do spins for up to [`SPIN`] on its
/// queue's kick count before it sleeps on the condition variable: a driver that submits the
/// next descriptor as soon as it sees a completion then pays no thread wake-up.
pub(crate) fn worker(shared: Arc<Shared>, q: usize) {
    let Some(slot) = shared.queues.get(q) else {
        return;
    };
    let mut scratch = Scratch::new();
    crate::trace::recorder::bind_thread(&shared.trace, slot.index);
    // A descriptor has just been finished: spin for the next before sleeping.
    let mut just_done = false;
    // The translations of the ring's and the records' pages (see `Exec::remembered`).
    let mut remembered: [Option<Remembered>; 2] = [None; 2];
    let mut chunk_kept = None;
    // The hold the last completion record was written under, for the next fetch (see
    // `Exec::finish`); let go before anything that waits or takes a queue lock.
    let mut carried = None;
    let mut r = slot.lock();
    loop {
        if r.shutdown {
            return;
        }
        // The clock is read only when a coalescing deadline is armed (most descriptors
        // need no time at all).
        if r.coal_deadline.is_some() {
            let due = r.timer(Instant::now());
            shared.raise(slot, due);
        }
        slot.sync_timer(&r);
        if slot.has_work(&r) && shared.bus_master.load(Ordering::Acquire) {
            let mut job = Job {
                base: r.base,
                size: r.size,
                head: slot.head(),
                // Checked against the number of domains when the queue was enabled.
                domain: u16::try_from(r.domain).unwrap_or(u16::MAX),
                epoch: slot.epoch.load(Ordering::Acquire),
            };
            r.in_flight = true;
            drop(r);
            let exec = Exec {
                shared: &shared,
                slot,
                domain: job.domain,
                epoch: job.epoch,
                record_bus: std::cell::Cell::new(0),
                remembered: remembered.map(std::cell::Cell::new),
                chunk_kept: std::cell::Cell::new(chunk_kept),
            };
            // While the queue stays busy and nothing asks for the lock's work (a fault, an
            // interrupt, a halt, a disable or reset, a coalescing deadline), descriptors are
            // completed and the next taken without the queue lock (`Exec::complete_fast`).
            let pending = loop {
                let result = exec.run(&job, &mut scratch, &mut carried);
                if remote::any() {
                    // With memory only the client reaches, the completion record goes out
                    // before the queue lock is taken: no register access waits for the
                    // client. The counters are counted first (under the lock, briefly): the
                    // driver may read them as soon as it sees the record.
                    // (No hold of the gate while the queue lock is taken.)
                    drop(carried.take());
                    let counted = exec.count_early(&result);
                    let written = exec.complete_unlocked(&result);
                    break Some((result, written, counted));
                }
                match exec.complete_fast(&result, &job, &mut carried) {
                    Fast::Next(next) => job = next,
                    Fast::Done => break None,
                    Fast::Locked(early, counted) => break Some((result, early, counted)),
                }
            };
            // No hold of the gate while the queue lock is taken.
            carried = None;
            r = slot.lock();
            if let Some((result, early, counted)) = pending {
                carried = exec.finish(&mut r, result, early, counted);
                if let Some((reason, iova)) = shared.inject.after_descriptor(slot.index) {
                    // Reporting takes the gate, and no queue lock is held while it is.
                    carried = None;
                    drop(r);
                    exec.spurious_fault(reason, iova);
                    r = slot.lock();
                }
            }
            remembered = exec.remembered.each_ref().map(std::cell::Cell::get);
            chunk_kept = exec.chunk_kept.get();
            r.in_flight = false;
            if r.drain_waiters > 0 {
                slot.idle.notify_all();
            }
            if remote::has_deferred() {
                carried = None;
                // Writes to memory only the client reaches that a disable or reset
                // interrupted: sent now that it no longer waits for this descriptor.
                drop(r);
                let until = Instant::now() + DEFERRED_LIMIT;
                if let Err(bus) = remote::flush_deferred(|| Instant::now() > until) {
                    debug!(
                        q,
                        bus, "a write to client memory was refused after the descriptor"
                    );
                }
                r = slot.lock();
            }
            just_done = true;
            continue;
        }
        // Nothing to run: the gate is not held while waiting.
        carried = None;
        if std::mem::take(&mut just_done) {
            let mut until = Instant::now() + SPIN;
            if let Some(deadline) = r.coal_deadline {
                until = until.min(deadline);
            }
            let seen = slot.kicks.load(Ordering::Acquire);
            drop(r);
            spin_until(|| slot.kicks.load(Ordering::Acquire) != seen, until);
            r = slot.lock();
            continue;
        }
        r.sleeping = true;
        r = match r.coal_deadline {
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                slot.wake
                    .wait_timeout(r, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => slot.wake.wait(r).unwrap_or_else(|e| e.into_inner()),
        };
        r.sleeping = false;
    }
}

/// Pause before an access to memory only the client reaches is tried again after an
/// interruption (see [`remote`]).
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_micros(200);

/// How long a worker keeps trying to send interrupted writes after their descriptor.
const DEFERRED_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a stalled queue, or a descriptor held by an injection rule, looks again.
const INJECTED_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

/// How long an idle worker spins for the next doorbell before it sleeps.
pub const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// How long of [`SPIN`] the worker spins without yielding the CPU.
const SPIN_HOT: std::time::Duration = std::time::Duration::from_micros(5);

/// Spin until `cond` holds or `until` has passed: busy for [`SPIN_HOT`], then yielding the
/// CPU between checks (the thread that will ring the doorbell may need this core).
fn spin_until(cond: impl Fn() -> bool, until: Instant) {
    let hot_until = Instant::now() + SPIN_HOT;
    loop {
        for _ in 0..32 {
            if cond() {
                return;
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now >= until {
            return;
        }
        if now >= hot_until {
            std::thread::yield_now();
        }
    }
}

impl<'a> Exec<'a> {
    fn q(&self) -> u16 {
        self.slot.index
    }

    fn aborted(&self) -> bool {
        self.slot.epoch.load(Ordering::Relaxed) != self.epoch
    }

    /// Count a fault in the queue and the fault log, and log it. (The domain's counter
    /// counts translation faults in [`Mmu::translate`] and access faults in
    /// [`Exec::access_fault`].)
    fn report(&self, f: &Fault) {
        self.report_as(f, false);
    }

    /// [`Exec::report`] of a fault that is real or `injected`.
    fn report_as(&self, f: &Fault, injected: bool) {
        let _gate = self.shared.mmu.chunk_gate();
        let mem = self.shared.mem.memory();
        let (seq, vector) = self.shared.faults.report(&mem, self.shared.irq.as_ref(), f);
        add(&self.slot.counters.faults, 1);
        let event = fault_event(f, seq, injected);
        self.shared.recent_faults.push(event);
        let trace = &self.shared.trace;
        trace.record(|| Event::Fault(event));
        if let Some(vector) = vector {
            trace.record(|| Event::Interrupt {
                vector,
                queue: NO_QUEUE,
            });
        }
    }

    /// A fault the engine finds itself after translating (the translation was good but the
    /// access is not), counted in the domain as a translation fault is by the MMU. Only
    /// called for a fault that will be reported.
    fn access_fault(&self, reason: u8, iova: u64, bus: u64, flags: u8) -> Fault {
        match self.shared.mmu.counters_for(self.domain, Some(self.q())) {
            (Some(c), true) => add_locked(&c.faults, 1),
            (Some(c), false) => add(&c.faults, 1),
            (None, _) => {}
        }
        Fault {
            reason,
            access: flags,
            domain: self.domain,
            queue: self.q(),
            iova,
            info: bus,
            level: 0,
        }
    }

    /// The `FAULT_DESCRIPTOR_INVALID` fault of a malformed descriptor (or BATCH element) at
    /// `iova`, reported.
    fn invalid_descriptor(&self, iova: u64) -> Fault {
        let f = Fault {
            reason: FAULT_DESCRIPTOR_INVALID,
            access: ACCESS_DESCRIPTOR,
            domain: self.domain,
            queue: self.q(),
            iova,
            info: 0,
            level: 0,
        };
        self.report(&f);
        f
    }

    /// `FAULT_OUTSIDE_RAM` for the access to `iova` at bus address `bus`.
    fn outside_ram(&self, iova: u64, bus: u64, flags: u8) -> Fault {
        self.access_fault(FAULT_OUTSIDE_RAM, iova, bus, flags)
    }

    /// Translate and check a small access (a descriptor or a completion record) that must
    /// lie in one page and one region; returns its bus address and region. Call with the
    /// gate held and the thread armed with `mem` ([`sigbus::arm`]): a walk that finds lost
    /// memory marks it lost and translates again, so the fault is the walk's own
    /// (`FAULT_BUS_ERROR` with the level and table of the entry that could not be read).
    fn map_small<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        iova: u64,
        len: u64,
        access: Access,
        flags: u8,
    ) -> Result<Small<'m>, Fault> {
        for _ in 0..LOST_TRIES {
            let mapped = self.map_small_once(mem, iova, len, access, flags);
            match sigbus::take_fault() {
                None => return mapped,
                Some(page) => {
                    sigbus::lose(mem, page);
                }
            }
        }
        Err(self.access_fault(FAULT_BUS_ERROR, iova, 0, flags | ACCESS_PAGE_WALK))
    }

    /// [`Exec::map_small`] once: translate `iova`, find the bus region of its first byte
    /// (one lookup), check that the `len` bytes stay in that page and region and that the
    /// region allows the access.
    fn map_small_once<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        iova: u64,
        len: u64,
        access: Access,
        flags: u8,
    ) -> Result<Small<'m>, Fault> {
        // Recorded in the trace with the access it serves (Fetch, Element, Complete), not as
        // a translation event of its own.
        let mmu = &self.shared.mmu;
        let (q, d) = (self.q(), self.domain);
        let kept = &self.remembered[usize::from(access == Access::Write)];
        let recalled = kept
            .get()
            .and_then(|r| mmu.recall(&r, d, iova, access, len, Some(q)));
        let t = match recalled {
            Some(t) => t,
            None => {
                let (t, r) = mmu
                    .translator_for(mem, d, Some(q))
                    .translate_remembered(iova, access)
                    .map_err(|f| Fault::from_translation(f, flags, d, q))?;
                kept.set(r);
                t
            }
        };
        if t.len == 0 {
            // Never returned by the MMU; a chunk of 0 bytes would make no progress.
            debug_assert!(false, "translation of length 0");
            return Err(self.outside_ram(iova, t.bus, flags));
        }
        let region = mem
            .find_region(GuestAddress(t.bus))
            .ok_or_else(|| self.outside_ram(iova, t.bus, flags))?;
        let in_region = (region.last_addr().0 - t.bus).saturating_add(1);
        let room = t.len.min(in_region);
        if room < len {
            let bus = t.bus.wrapping_add(room);
            return Err(self.outside_ram(iova.wrapping_add(room), bus, flags));
        }
        // All `len` bytes are in `region`: its protection and loss decide for all of them.
        if !region_allows(region, access) {
            let reason = if is_lost(region) {
                FAULT_BUS_ERROR
            } else {
                FAULT_OUTSIDE_RAM
            };
            return Err(self.access_fault(reason, iova, t.bus, flags));
        }
        Ok(Small { bus: t.bus, region })
    }

    /// The `FAULT_BUS_ERROR` of a small access to `iova` (bus address `bus`, in one page)
    /// that found `page` lost (SIGBUS, recovered, see [`sigbus`]): the region is marked
    /// lost.
    fn bus_error(
        &self,
        mem: &GuestMemoryMmap,
        page: sigbus::LostPage,
        iova: u64,
        bus: u64,
        flags: u8,
    ) -> Fault {
        sigbus::lose(mem, page);
        self.access_fault(FAULT_BUS_ERROR, iova, bus, flags)
    }

    /// Take the chunk gate (read) and a snapshot of bus memory.
    fn hold(&self) -> Hold<'a> {
        let gate = self.shared.mmu.chunk_gate();
        let kicks = self.slot.kicks.load(Ordering::Acquire);
        Hold {
            mem: self.shared.mem.memory(),
            _gate: gate,
            kicks,
        }
    }

    /// Whether `hold` may be kept for the next descriptor or chunk: no thread waits for the
    /// gate's write side (an invalidation, an unmap barrier) and no doorbell rang since it
    /// was taken (a descriptor published since may use memory mapped since).
    fn keep(&self, hold: &Hold<'_>) -> bool {
        !self.shared.mmu.gate_wanted() && self.slot.kicks.load(Ordering::Acquire) == hold.kicks
    }

    /// Fetch the descriptor at `iova`; a fetch from memory only the client reaches that
    /// was interrupted (see [`remote`]) is tried again once nothing is held.
    ///
    /// With the descriptor comes the hold it was fetched under, for the descriptor's first
    /// chunk ([`Exec::transfer`]): one gate hold and one snapshot for both, rather than one
    /// each. (None while memory only the client reaches is mapped: that path keeps its
    /// holds apart.) `carried`: a hold to fetch under (the one the previous descriptor's
    /// completion record was written under, see [`Exec::finish`]).
    fn fetch(
        &self,
        iova: u64,
        carried: Option<Hold<'a>>,
    ) -> Result<([u8; DESC_SIZE as usize], u64, Option<Hold<'a>>), Fault> {
        let mut carried = carried;
        loop {
            let hold = carried.take().unwrap_or_else(|| self.hold());
            let r = self.fetch_in(&hold.mem, iova);
            match r {
                Err(_) if remote::take_interrupted() && !self.aborted() => {
                    drop(hold);
                    std::thread::sleep(RETRY_PAUSE);
                }
                Err(f) => return Err(f),
                Ok((raw, bus)) => return Ok((raw, bus, (!remote::any()).then_some(hold))),
            }
        }
    }

    /// Fetch the descriptor at `iova` from `mem`, under the caller's hold.
    fn fetch_in(
        &self,
        mem: &GuestMemoryMmap,
        iova: u64,
    ) -> Result<([u8; DESC_SIZE as usize], u64), Fault> {
        let _armed = sigbus::arm(mem);
        let at = self.map_small(mem, iova, DESC_SIZE, Access::Read, ACCESS_DESCRIPTOR)?;
        let bus = at.bus;
        remote::sync_in(mem, bus, DESC_SIZE).map_err(|bad| {
            let iova = iova.wrapping_add(bad - bus);
            self.access_fault(FAULT_BUS_ERROR, iova, bad, ACCESS_DESCRIPTOR)
        })?;
        let mut raw = [0u8; DESC_SIZE as usize];
        let read = at.slice(DESC_SIZE).map(|from| from.copy_to(&mut raw[..]));
        if let Some(page) = sigbus::take_fault() {
            return Err(self.bus_error(mem, page, iova, bus, ACCESS_DESCRIPTOR));
        }
        if is_lost(at.region) {
            // Lost by another thread while this one read it.
            return Err(self.access_fault(FAULT_BUS_ERROR, iova, bus, ACCESS_DESCRIPTOR));
        }
        read.ok_or_else(|| self.outside_ram(iova, bus, ACCESS_DESCRIPTOR))?;
        // The next descriptor of a ring (or BATCH list) usually follows in the same page:
        // ask the CPU for its line now, so that it is here (the driver wrote it, on
        // another CPU) when it is fetched, after this descriptor's data.
        let next = bus.wrapping_add(DESC_SIZE);
        if next % SMALLEST_PAGE != 0 {
            prefetch(at.region, next);
        }
        Ok((raw, bus))
    }

    /// Fetch, validate and execute the descriptor at the job's head. Faults are reported
    /// here; the completion is left to [`Exec::finish`].
    ///
    /// `carried`: the hold the previous descriptor's completion record was written under,
    /// to fetch this one under.
    fn run(&self, job: &Job, scratch: &mut Scratch, carried: &mut Option<Hold<'a>>) -> RunResult {
        self.record_bus.set(0);
        if self.shared.inject.stalled(self.q()) {
            // Injected: no fetch while the stall lasts; nothing held meanwhile.
            *carried = None;
            self.shared.trace.record(|| Event::Injected {
                queue: self.q(),
                what: Injected::Stall,
            });
            debug!(q = self.q(), "injected: queue stalled");
            while self.shared.inject.stalled(self.q()) && !self.aborted() {
                std::thread::sleep(INJECTED_WAIT);
            }
        }
        let offset = u64::from(job.head) * DESC_SIZE;
        let desc_iova = job.base.wrapping_add(offset);
        let fetched = match job.base.checked_add(offset) {
            Some(iova) => self.fetch(iova, carried.take()),
            None => {
                // Reporting takes the gate.
                *carried = None;
                Err(self.access_fault(FAULT_IOVA_WIDTH, desc_iova, 0, ACCESS_DESCRIPTOR))
            }
        };
        let (raw, desc_bus, mut hold) = match fetched {
            Ok(fetched) => fetched,
            Err(f) => {
                self.report(&f);
                return RunResult::FetchFault(f);
            }
        };
        self.shared.trace.record(|| Event::Fetch {
            queue: self.q(),
            slot: job.head,
            iova: desc_iova,
            bus: desc_bus,
            desc: words(&raw),
        });
        let d = Descriptor::decode(&raw);
        if let Err(why) = d.validate(self.shared.config.max_transfer) {
            // Reporting takes the gate.
            drop(hold);
            debug!(q = self.q(), ?d, %why, "guest error: malformed descriptor");
            let f = self.invalid_descriptor(desc_iova);
            return RunResult::Done(d, Outcome::fault(STATUS_INVALID_DESCRIPTOR, &f, 0));
        }
        if let Some(act) = self.shared.inject.on_descriptor(self.q()) {
            drop(hold);
            return self.injected(d, act);
        }
        if d.opcode == OP_BATCH {
            drop(hold);
            return self.batch(d, scratch);
        }
        let result = match d.opcode {
            OP_COPY => self.copy(&d, scratch, &mut hold),
            OP_FILL => self.fill(&d, scratch, &mut hold),
            OP_COMPARE => self.compare(&d, scratch, &mut hold),
            OP_CRC32C => self.crc32c(&d, scratch, &mut hold),
            _ => Ok(0),
        };
        // The hold the data moved under, for the completion record (`complete_fast`).
        *carried = hold.take().filter(|h| result.is_ok() && self.keep(h));
        match result {
            Ok(value) => RunResult::Done(d, Outcome::ok(d.len, value)),
            Err(Stop::Fault(f, done)) => {
                self.report(&f);
                RunResult::Done(d, Outcome::fault(STATUS_DMA_ERROR, &f, done as u32))
            }
            Err(Stop::Aborted(done)) => RunResult::Aborted(d, done as u32),
        }
    }

    /// A descriptor an injection rule acts on instead of the engine.
    fn injected(&self, d: Descriptor, act: OnDescriptor) -> RunResult {
        match act {
            OnDescriptor::Status(status) => {
                debug!(
                    q = self.q(),
                    status, "injected: descriptor completed with an error"
                );
                self.shared.trace.record(|| Event::Injected {
                    queue: self.q(),
                    what: Injected::ErrorStatus { status },
                });
                RunResult::Done(d, Outcome::status(status))
            }
            OnDescriptor::Hold => {
                debug!(q = self.q(), "injected: descriptor never completes");
                self.shared.trace.record(|| Event::Injected {
                    queue: self.q(),
                    what: Injected::NeverComplete,
                });
                // Until a disable or reset moves the epoch (or the device is dropped).
                while !self.aborted() {
                    std::thread::sleep(INJECTED_WAIT);
                }
                RunResult::Aborted(d, 0)
            }
        }
    }

    /// An injected fault nobody caused, reported as a real one (fault log record and
    /// interrupt), in the queue's domain. Call with nothing held.
    fn spurious_fault(&self, reason: u8, iova: u64) {
        self.shared.trace.record(|| Event::Injected {
            queue: self.q(),
            what: Injected::SpuriousFault,
        });
        let f = Fault {
            reason,
            access: 0,
            domain: self.domain,
            queue: self.q(),
            iova,
            info: 0,
            level: 0,
        };
        self.report_as(&f, true);
    }

    /// Between chunks: stop when the queue's epoch moved; raise a due coalesced interrupt.
    fn between_chunks(&self, done: u64) -> Result<(), Stop> {
        if self.aborted() {
            return Err(Stop::Aborted(done));
        }
        if self.slot.timer_armed.load(Ordering::Relaxed) {
            let mut r = self.slot.lock();
            let due = r.timer(Instant::now());
            self.slot.sync_timer(&r);
            self.shared.raise(self.slot, due);
        }
        Ok(())
    }

    /// Move `len` bytes chunk by chunk over one or two sides. `f` gets the offset of a
    /// piece and its slices; it may stop early (COMPARE) with `ControlFlow::Break`, and
    /// then `may_stop` must be set (see [`Exec::chunk`]).
    ///
    /// A chunk is at most [`CHUNK_MAX`] bytes translated and moved under one read hold of
    /// the chunk gate and one snapshot of bus memory; between chunks the worker checks its
    /// epoch and coalescing timer. `first`: the hold the descriptor was fetched under, for
    /// the first chunk; the epoch is checked inside it (one load), and a coalescing timer,
    /// which needs the queue lock, makes the chunk let it go and take its own.
    #[allow(clippy::too_many_arguments)]
    fn transfer<F>(
        &self,
        len: u64,
        a: Side,
        b: Option<Side>,
        may_stop: bool,
        held: &mut Option<Hold<'a>>,
        mut f: F,
    ) -> Result<(), Stop>
    where
        F: FnMut(u64, VolatileSlice<'_, ()>, Option<VolatileSlice<'_, ()>>) -> ControlFlow<()>,
    {
        let mut done = 0u64;
        let mut first = held
            .take()
            .filter(|_| !self.slot.timer_armed.load(Ordering::Relaxed));
        while done < len {
            let hold = match first.take() {
                Some(hold) if !self.aborted() => hold,
                Some(_) => return Err(Stop::Aborted(done)),
                None => {
                    self.between_chunks(done)?;
                    self.hold()
                }
            };
            let moved = {
                let _armed = sigbus::arm(&hold.mem);
                let limit = (len - done).min(CHUNK_MAX);
                self.chunk(&hold.mem, done, limit, a, b, may_stop, &mut f)
            };
            // The last chunk's hold is kept for the completion record; any other is let go
            // before the next chunk's checks (which may take the queue lock).
            let last = matches!(&moved, Ok((n, flow)) if done + n >= len || flow.is_break());
            if last && !remote::any() {
                *held = Some(hold);
            } else {
                drop(hold);
            }
            // Memory only the client reaches (see `remote`): writes interrupted while the
            // gate was held go out now; a read interrupted so is moved again, from the
            // first byte not moved, once the command that interrupted it is done.
            if remote::any() {
                // The bytes moved so far count as moved: what is interrupted goes out
                // after the descriptor, before its completion record.
                let n = match &moved {
                    Ok((n, _)) | Err((_, n)) => *n,
                };
                self.flush_writes(done + n, a, b)?;
            }
            let (n, flow) = match moved {
                Err((_, n)) if remote::take_interrupted() => {
                    if self.aborted() {
                        return Err(Stop::Aborted(done + n));
                    }
                    done += n;
                    std::thread::sleep(RETRY_PAUSE);
                    continue;
                }
                r => r.map_err(|(fault, n)| Stop::Fault(fault, done + n))?,
            };
            done += n;
            if flow.is_break() {
                break;
            }
        }
        Ok(())
    }

    /// Send this thread's interrupted writes to the client (see [`remote::flush_deferred`]),
    /// giving up when the queue's epoch moves; a write that fails is `FAULT_BUS_ERROR` on
    /// the written side at transfer offset `done`.
    fn flush_writes(&self, done: u64, a: Side, b: Option<Side>) -> Result<(), Stop> {
        if !remote::has_deferred() {
            return Ok(());
        }
        let flushed = remote::flush_deferred(|| self.aborted()).map_err(|bad| {
            let side = b.unwrap_or(a);
            let iova = side.iova.wrapping_add(done);
            Stop::Fault(
                self.access_fault(FAULT_BUS_ERROR, iova, bad, side.flags),
                done,
            )
        })?;
        if !flushed {
            // The queue is being disabled or reset: the writes go out after the descriptor
            // is finished (the worker loop sends what is left).
            return Err(Stop::Aborted(done));
        }
        Ok(())
    }

    /// Translate and move the `limit` bytes at offset `at` of the transfer: one chunk, with
    /// the chunk gate held by the caller and `mem` its snapshot of bus memory.
    ///
    /// Page by page, in offset order (side `a` before side `b` at the same offset), each
    /// side's page is translated through the IOTLB when the chunk reaches it, and its bus
    /// region is looked up and checked for the access when the bytes do not continue the
    /// current piece; only then are the bytes added to a piece. Consecutive pages that are
    /// contiguous in bus memory and in one region on both sides make one piece, moved with
    /// one call of `f` (after the IOTLB lock is released). So every byte is translated and
    /// checked before it moves, and a fault stops the chunk at the exact first faulting
    /// page: the pieces before it are moved, and the fault is returned with the bytes
    /// moved in this chunk.
    ///
    /// With `may_stop` every piece is moved before the next page is translated (so an `f`
    /// that stops leaves no translation of a page it will not touch, as with one chunk per
    /// page). Returns the bytes moved and whether `f` stopped.
    #[allow(clippy::too_many_arguments)]
    fn chunk<F>(
        &self,
        mem: &GuestMemoryMmap,
        at: u64,
        limit: u64,
        a: Side,
        b: Option<Side>,
        may_stop: bool,
        f: &mut F,
    ) -> Result<(u64, ControlFlow<()>), (Fault, u64)>
    where
        F: FnMut(u64, VolatileSlice<'_, ()>, Option<VolatileSlice<'_, ()>>) -> ControlFlow<()>,
    {
        let mut tr = self
            .shared
            .mmu
            .translator_for(mem, self.domain, Some(self.q()));
        let (mut pa, mut pb) = (Page::default(), Page::default());
        // The first page of each side as the last chunk looked them up, when those lookups
        // stand (both or neither): no lookup, nor the IOTLB's lock. Not while tracing, which
        // records every lookup.
        let want = if may_stop { 1 } else { limit };
        let recalled = (self.chunk_kept.get())
            .filter(|_| !self.shared.trace.on())
            .and_then(|(ra, rb)| {
                let sa = (&ra, a.iova.wrapping_add(at), a.access, want);
                let sb = match (rb.as_ref(), b) {
                    (Some(rb), Some(b)) => Some((rb, b.iova.wrapping_add(at), b.access, want)),
                    (None, None) => None,
                    _ => return None,
                };
                let mmu = &self.shared.mmu;
                mmu.recall_pair(self.domain, sa, sb, Some(self.q()))
            });
        if let Some((ta, tb)) = recalled {
            pa = Page::of(0, &ta);
            pb = tb.map_or(pb, |tb| Page::of(0, &tb));
        }
        let mut piece: Option<Piece<'_>> = None;
        let mut o = 0u64;
        while o < limit {
            if may_stop {
                if let Some(p) = piece.take() {
                    tr.release();
                    let flow = self.flush(mem, &p, at, a, b, f).map_err(|e| (e, p.off))?;
                    if flow.is_break() {
                        return Ok((o, flow));
                    }
                }
            }
            // Translate no further than this chunk needs, and page by page for an `f` that
            // may stop.
            let want = if may_stop { 1 } else { limit - o };
            let step = self.advance(
                &mut tr,
                mem,
                (at, o, want),
                (a, &mut pa),
                b.map(|b| (b, &mut pb)),
                &piece,
            );
            let next = match step {
                Ok(next) => next,
                Err(fault) => {
                    if let Some(p) = piece.take() {
                        tr.release();
                        // Moves everything before the fault.
                        let flow = self.flush(mem, &p, at, a, b, f).map_err(|e| (e, p.off))?;
                        if flow.is_break() {
                            return Ok((o, flow));
                        }
                    }
                    return Err((fault, o));
                }
            };
            if let Some((sa, sb)) = next {
                if let Some(p) = piece.take() {
                    tr.release();
                    let flow = self.flush(mem, &p, at, a, b, f).map_err(|e| (e, p.off))?;
                    if flow.is_break() {
                        return Ok((o, flow));
                    }
                }
                piece = Some(Piece {
                    off: o,
                    len: 0,
                    a: sa,
                    b: sb,
                });
            }
            let Some(p) = piece.as_mut() else {
                // `advance` starts a piece when there is none.
                break;
            };
            let mut n = (pa.end.min(limit) - o).min(p.a.room(pa.bus_at(o)));
            if let Some(sb) = p.b {
                n = n.min(pb.end - o).min(sb.room(pb.bus_at(o)));
            }
            p.len += n;
            o += n;
        }
        let mut flow = ControlFlow::Continue(());
        if let Some(p) = piece {
            tr.release();
            flow = self.flush(mem, &p, at, a, b, f).map_err(|e| (e, p.off))?;
        }
        Ok((o, flow))
    }

    /// Chunk offset `o`: translate each side's pages from `o` when `o` starts a new one
    /// (`a` first: a run of pages contiguous in bus memory covering up to `want` bytes;
    /// then `b`: a run no longer than `a`'s and its region need), and when the bytes there
    /// do not continue `piece` look their bus region up and check it allows the access
    /// (`a`'s lookup, `b`'s lookup, then the checks). Returns the spans of a new piece
    /// starting at `o`, or None when `o` continues `piece` on both sides.
    #[allow(clippy::type_complexity)]
    fn advance<'m>(
        &self,
        tr: &mut Translator<'_>,
        mem: &'m GuestMemoryMmap,
        (at, o, want): (u64, u64, u64),
        (a, pa): (Side, &mut Page),
        b: Option<(Side, &mut Page)>,
        piece: &Option<Piece<'m>>,
    ) -> Result<Option<(Span<'m>, Option<Span<'m>>)>, Fault> {
        // The chunk's first lookups (no recalled pair, see `Exec::chunk`) are remembered.
        let first = o == 0 && pa.end == 0;
        let two_sides = b.is_some();
        let (mut kept_a, mut kept_b) = (None, None);
        if o == pa.end {
            let kept = first.then_some(&mut kept_a);
            *pa = self.extent(tr, mem, a, at, o, want, kept)?;
        }
        let a_bus = pa.bus_at(o);
        let a_old = piece
            .as_ref()
            .filter(|p| p.a.continues(p.len, a_bus))
            .map(|p| p.a.region);
        let a_region = match a_old {
            Some(region) => region,
            None => self.region(mem, a, at + o, a_bus)?,
        };
        let mut b_span = None;
        let mut b_continues = true;
        if let Some((b, pb)) = b {
            if o == pb.end {
                let a_room = Span {
                    bus: a_bus,
                    region: a_region,
                }
                .room(a_bus);
                let want = want.min(pa.end - o).min(a_room);
                let kept = (first && kept_a.is_some()).then_some(&mut kept_b);
                *pb = self.extent(tr, mem, b, at, o, want, kept)?;
            }
            let b_bus = pb.bus_at(o);
            let b_old = piece
                .as_ref()
                .and_then(|p| p.b.filter(|s| s.continues(p.len, b_bus)))
                .map(|s| s.region);
            b_continues = b_old.is_some();
            let b_region = match b_old {
                Some(region) => region,
                None => self.region(mem, b, at + o, b_bus)?,
            };
            if a_old.is_none() {
                self.check_region(a_region, a, at + o, a_bus)?;
            }
            if !b_continues {
                self.check_region(b_region, b, at + o, b_bus)?;
            }
            b_span = Some((b, b_bus, b_region));
        } else if a_old.is_none() {
            self.check_region(a_region, a, at + o, a_bus)?;
        }
        if first {
            self.chunk_kept.set(match (kept_a, kept_b, two_sides) {
                (Some((ra, _)), None, false) => Some((ra, None)),
                (Some((mut ra, mark)), Some((rb, _)), true) => {
                    tr.refresh(&mut ra, mark).then_some((ra, Some(rb)))
                }
                _ => None,
            });
        }
        if a_old.is_some() && b_continues {
            return Ok(None);
        }
        let sa = Span {
            bus: a_bus,
            region: a_region,
        };
        let sb = b_span.map(|(_, bus, region)| Span { bus, region });
        Ok(Some((sa, sb)))
    }

    /// Translate side `side` from offset `o` of the chunk at `at`: the pages contiguous in
    /// bus memory from there, up to `want` bytes ([`Translator::translate_run`]).
    ///
    /// A walk that touched lost memory (a SIGBUS recovered while reading a page table, see
    /// [`sigbus`]) read zeros: its region is marked lost, the translator forgets what it
    /// derived from walks, and the run is translated again, which now faults exactly where
    /// the walk needs the lost table (`FAULT_BUS_ERROR`, `ACCESS_PAGE_WALK`).
    ///
    /// `remember`: where to put what may be remembered of the lookup (see
    /// `Exec::chunk_kept`), with the translator's mark after it.
    #[allow(clippy::too_many_arguments)]
    fn extent(
        &self,
        tr: &mut Translator<'_>,
        mem: &GuestMemoryMmap,
        side: Side,
        at: u64,
        o: u64,
        want: u64,
        remember: Option<&mut Option<(Remembered, u32)>>,
    ) -> Result<Page, Fault> {
        let iova = side.iova.wrapping_add(at + o);
        let mut tries = 0;
        let mut remember = remember;
        let run = loop {
            let run = match remember.as_deref_mut() {
                None => tr.translate_run(iova, side.access, want),
                Some(kept) => {
                    let (run, r) = tr.translate_run_remembered(iova, side.access, want);
                    *kept = r.map(|r| (r, tr.mark()));
                    run
                }
            };
            let Some(page) = sigbus::take_fault() else {
                break run;
            };
            if let Some(kept) = remember.as_deref_mut() {
                *kept = None;
            }
            let bus = sigbus::lose(mem, page).unwrap_or(0);
            tr.forget_walks();
            tries += 1;
            if tries == LOST_TRIES {
                let flags = side.flags | ACCESS_PAGE_WALK;
                return Err(self.access_fault(FAULT_BUS_ERROR, iova, bus, flags));
            }
        };
        let t = run.map_err(|f| Fault::from_translation(f, side.flags, self.domain, self.q()))?;
        if t.len == 0 {
            // Never returned by the MMU; a page of 0 bytes would make no progress.
            debug_assert!(false, "translation of length 0");
            return Err(self.outside_ram(iova, t.bus, side.flags));
        }
        Ok(Page::of(o, &t))
    }

    /// The bus region holding `bus`, the translation of `side`'s byte at transfer offset
    /// `off`.
    fn region<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        side: Side,
        off: u64,
        bus: u64,
    ) -> Result<&'m GuestRegionMmap, Fault> {
        mem.find_region(GuestAddress(bus))
            .ok_or_else(|| self.outside_ram(side.iova.wrapping_add(off), bus, side.flags))
    }

    /// Check that `region` allows `side`'s access (at transfer offset `off`, bus `bus`).
    fn check_region(
        &self,
        region: &GuestRegionMmap,
        side: Side,
        off: u64,
        bus: u64,
    ) -> Result<(), Fault> {
        if region_allows(region, side.access) {
            return Ok(());
        }
        let reason = if is_lost(region) {
            FAULT_BUS_ERROR
        } else {
            FAULT_OUTSIDE_RAM
        };
        Err(self.access_fault(reason, side.iova.wrapping_add(off), bus, side.flags))
    }

    /// Move piece `p` of the chunk at `at`: hand its slices to `f` (on a thread armed with
    /// `mem`, see [`Exec::transfer`]). When the move raised SIGBUS (recovered, see
    /// [`sigbus`]) the piece fails with `FAULT_BUS_ERROR` at the first lost byte, and none
    /// of it counts as moved.
    fn flush<F>(
        &self,
        mem: &GuestMemoryMmap,
        p: &Piece<'_>,
        at: u64,
        a: Side,
        b: Option<Side>,
        f: &mut F,
    ) -> Result<ControlFlow<()>, Fault>
    where
        F: FnMut(u64, VolatileSlice<'_, ()>, Option<VolatileSlice<'_, ()>>) -> ControlFlow<()>,
    {
        let off = at + p.off;
        if remote::any() {
            self.sync_piece(mem, p, off, a, b, Access::Read)?;
        }
        let sa = self.span_slice(p.a, p.len, a, off)?;
        let sb = match (b, p.b) {
            (Some(b), Some(span)) => Some(self.span_slice(span, p.len, b, off)?),
            _ => None,
        };
        let flow = f(off, sa, sb);
        if remote::any() {
            self.sync_piece(mem, p, off, a, b, Access::Write)?;
        }
        if let Some(page) = sigbus::take_fault() {
            return Err(self.lost_piece(mem, page, p, off, a, b));
        }
        if bus::any_lost() {
            // Another thread may have found this piece's memory lost while it moved (and
            // this one then read or wrote the page that replaced it).
            let lost = |side: Side, span: Span<'_>| {
                let iova = side.iova.wrapping_add(off);
                is_lost(span.region)
                    .then(|| self.access_fault(FAULT_BUS_ERROR, iova, span.bus, side.flags))
            };
            let on_b = || lost(b?, p.b?);
            if let Some(fault) = lost(a, p.a).or_else(on_b) {
                return Err(fault);
            }
        }
        Ok(flow)
    }

    /// For the sides of piece `p` with access `access` in memory only the client reaches
    /// (see [`remote`]): fetch their bytes before the move (reads) or send them after it
    /// (writes). A failed client access is `FAULT_BUS_ERROR` at its first byte.
    fn sync_piece(
        &self,
        mem: &GuestMemoryMmap,
        p: &Piece<'_>,
        off: u64,
        a: Side,
        b: Option<Side>,
        access: Access,
    ) -> Result<(), Fault> {
        let sides = [Some((a, p.a)), b.zip(p.b)];
        for (side, span) in sides.into_iter().flatten() {
            if side.access != access {
                continue;
            }
            let synced = match access {
                Access::Read => remote::sync_in(mem, span.bus, p.len),
                Access::Write => remote::sync_out(mem, span.bus, p.len),
            };
            if let Err(bad) = synced {
                let iova = side.iova.wrapping_add(off + (bad - span.bus));
                return Err(self.access_fault(FAULT_BUS_ERROR, iova, bad, side.flags));
            }
        }
        Ok(())
    }

    /// The `FAULT_BUS_ERROR` of piece `p` (at transfer offset `off`) whose move found
    /// `page` lost (SIGBUS, recovered): on the side whose bytes the page holds (side `a`
    /// when both do, or neither), at the IOVA of the piece's first byte in the page, with
    /// that byte's bus address as info.
    fn lost_piece(
        &self,
        mem: &GuestMemoryMmap,
        page: sigbus::LostPage,
        p: &Piece<'_>,
        off: u64,
        a: Side,
        b: Option<Side>,
    ) -> Fault {
        let lost = sigbus::lose(mem, page).map(|bus| (bus, bus.saturating_add(page.len as u64)));
        // Offset in the piece of its first byte in the lost page, on the side of `span`.
        let holds = |span: &Span<'_>| {
            let (start, end) = lost?;
            let span_end = span.bus.saturating_add(p.len);
            (start < span_end && end > span.bus).then(|| start.saturating_sub(span.bus))
        };
        let (side, span, at) = match (b, p.b) {
            (Some(b), Some(sb)) if holds(&p.a).is_none() && holds(&sb).is_some() => {
                (b, sb, holds(&sb))
            }
            _ => (a, p.a, holds(&p.a)),
        };
        let at = at.unwrap_or(0);
        let iova = side.iova.wrapping_add(off + at);
        self.access_fault(FAULT_BUS_ERROR, iova, span.bus.wrapping_add(at), side.flags)
    }

    /// The `len` bytes of `span` (checked: in its region, which allows the access).
    fn span_slice<'m>(
        &self,
        span: Span<'m>,
        len: u64,
        side: Side,
        off: u64,
    ) -> Result<VolatileSlice<'m, ()>, Fault> {
        let at = MemoryRegionAddress(span.bus - span.region.start_addr().0);
        span.region
            .get_slice(at, len as usize)
            .map_err(|_| self.outside_ram(side.iova.wrapping_add(off), span.bus, side.flags))
    }

    /// Record an operation's data checksums ([`Event::Data`]), when they are kept.
    fn record_data(&self, opcode: u8, bytes: u32, sums: Option<(u32, u32)>) {
        if let Some((src, dst)) = sums {
            self.shared.trace.record(|| Event::Data {
                queue: self.q(),
                opcode,
                bytes,
                src,
                dst,
            });
        }
    }

    fn copy(
        &self,
        d: &Descriptor,
        scratch: &mut Scratch,
        hold: &mut Option<Hold<'a>>,
    ) -> Result<u64, Stop> {
        // Data checksums for the trace (`--trace-data`): what was read, and what the
        // destination holds once written.
        let mut sums = self.shared.trace.data().then_some((0u32, 0u32));
        let buf = &mut scratch.a;
        self.transfer(
            d.len.into(),
            Side::read(d.src),
            Some(Side::write(d.dst)),
            false,
            hold,
            |_, from, to| {
                let Some(to) = to else {
                    return ControlFlow::Continue(());
                };
                match sums.as_mut() {
                    None => from.copy_to_volatile_slice(to),
                    // Through the scratch buffer, so that the source's checksum is of the
                    // bytes copied (the source may change meanwhile), and the
                    // destination's of what it holds once written.
                    Some((src, dst)) => {
                        let mut off = 0;
                        while off < from.len() {
                            let k = (from.len() - off).min(buf.len());
                            if let (Ok(x), Ok(y)) = (from.subslice(off, k), to.subslice(off, k)) {
                                x.copy_to(&mut buf[..k]);
                                *src = crc32c::crc32c_append(*src, &buf[..k]);
                                y.copy_from(&buf[..k]);
                            }
                            off += k;
                        }
                        *dst = crc32c_of(*dst, &to, buf);
                    }
                }
                ControlFlow::Continue(())
            },
        )?;
        if let Some((offset, xor)) = self.shared.inject.on_copy(self.q()) {
            // Corrupting takes the gate.
            *hold = None;
            if offset < d.len && self.corrupt(d.dst.wrapping_add(offset.into()), xor) {
                self.shared.trace.record(|| Event::Injected {
                    queue: self.q(),
                    what: Injected::CorruptCopy { offset, xor },
                });
                if let Some((_, dst)) = sums.as_mut() {
                    *dst ^= crc32c_flip(d.len.into(), offset.into(), xor);
                }
            }
        }
        self.record_data(OP_COPY, d.len, sums);
        Ok(0)
    }

    /// Injected corruption: XOR the byte at `iova` (of the queue's domain) with `xor`.
    /// Returns whether the byte was written.
    fn corrupt(&self, iova: u64, xor: u8) -> bool {
        let _gate = self.shared.mmu.chunk_gate();
        let mem = self.shared.mem.memory();
        let _armed = sigbus::arm(&mem);
        let mut written = false;
        if let Ok(Small { bus, .. }) = self.map_small(&mem, iova, 1, Access::Write, ACCESS_WRITE) {
            // Memory only the client reaches: the byte is fetched and sent like any other.
            if remote::sync_in(&mem, bus, 1).is_ok() {
                if let Ok(b) = mem.read_obj::<u8>(GuestAddress(bus)) {
                    written = mem.write_obj(b ^ xor, GuestAddress(bus)).is_ok()
                        && remote::sync_out(&mem, bus, 1).is_ok();
                }
            }
            if written {
                debug!(q = self.q(), iova, "injected: COPY byte corrupted");
            }
        }
        if let Some(page) = sigbus::take_fault() {
            sigbus::lose(&mem, page);
            written = false;
        }
        written
    }

    fn fill(
        &self,
        d: &Descriptor,
        scratch: &mut Scratch,
        hold: &mut Option<Hold<'a>>,
    ) -> Result<u64, Stop> {
        let pattern = d.src.to_le_bytes();
        for (i, b) in scratch.b.iter_mut().enumerate() {
            *b = pattern[i % 8];
        }
        let Scratch { a: back, b: buf } = scratch;
        let mut sums = self.shared.trace.data().then_some((0u32, 0u32));
        self.transfer(
            d.len.into(),
            Side::write(d.dst),
            None,
            false,
            hold,
            |at, to, _| {
                let mut off = 0;
                while off < to.len() {
                    let phase = ((at + off as u64) % 8) as usize;
                    let k = (to.len() - off).min(BLOCK);
                    if let Ok(dst) = to.subslice(off, k) {
                        dst.copy_from(&buf[phase..phase + k]);
                    }
                    off += k;
                }
                if let Some((_, dst)) = sums.as_mut() {
                    *dst = crc32c_of(*dst, &to, back);
                }
                ControlFlow::Continue(())
            },
        )?;
        self.record_data(OP_FILL, d.len, sums);
        Ok(0)
    }

    fn compare(
        &self,
        d: &Descriptor,
        scratch: &mut Scratch,
        hold: &mut Option<Hold<'a>>,
    ) -> Result<u64, Stop> {
        let mut result = 0u64;
        let Scratch { a, b } = scratch;
        let (sa, sb) = (Side::read(d.src), Side::read(d.dst));
        let mut sums = self.shared.trace.data().then_some((0u32, 0u32));
        self.transfer(d.len.into(), sa, Some(sb), true, hold, |at, x, y| {
            let Some(y) = y else {
                return ControlFlow::Continue(());
            };
            let mut off = 0;
            while off < x.len() {
                let k = (x.len() - off).min(BLOCK);
                let (xa, yb) = (&mut a[..k], &mut b[..k]);
                if let (Ok(xs), Ok(ys)) = (x.subslice(off, k), y.subslice(off, k)) {
                    xs.copy_to(xa);
                    ys.copy_to(yb);
                }
                let differs = xa.iter().zip(yb.iter()).position(|(p, q)| p != q);
                if let Some((src, dst)) = sums.as_mut() {
                    let n = differs.map_or(k, |i| i + 1);
                    *src = crc32c::crc32c_append(*src, &xa[..n]);
                    *dst = crc32c::crc32c_append(*dst, &yb[..n]);
                }
                if let Some(i) = differs {
                    result = 1 + at + (off + i) as u64;
                    return ControlFlow::Break(());
                }
                off += k;
            }
            ControlFlow::Continue(())
        })?;
        let bytes = match result {
            0 => d.len,
            r => u32::try_from(r).unwrap_or(d.len),
        };
        self.record_data(OP_COMPARE, bytes, sums);
        Ok(result)
    }

    fn crc32c(
        &self,
        d: &Descriptor,
        scratch: &mut Scratch,
        hold: &mut Option<Hold<'a>>,
    ) -> Result<u64, Stop> {
        let mut crc = 0u32;
        let buf = &mut scratch.a;
        self.transfer(
            d.len.into(),
            Side::read(d.src),
            None,
            false,
            hold,
            |_, x, _| {
                crc = crc32c_of(crc, &x, buf);
                ControlFlow::Continue(())
            },
        )?;
        // The checksum of what it read is its result.
        self.record_data(
            OP_CRC32C,
            d.len,
            self.shared.trace.data().then_some((crc, 0)),
        );
        Ok(crc.into())
    }

    /// Write `d`'s completion record: bytes 4..32, a release fence, then the first 4 bytes
    /// in one write. No record for a completion address of 0 (Ok) or a misaligned one.
    /// BATCH: fetch the list's elements one by one through the queue's domain (as ring
    /// descriptors are fetched) and run them in order; stop at the first that is malformed
    /// or faults. The batch's outcome: bytes moved by every element (saturating at
    /// `u32::MAX`), the number of elements completed as the result, and the stopping
    /// element's fault.
    fn batch(&self, d: Descriptor, scratch: &mut Scratch) -> RunResult {
        let mut bytes = 0u64;
        let sum = |bytes: u64| u32::try_from(bytes).unwrap_or(u32::MAX);
        for i in 0..d.len {
            if let Err(Stop::Aborted(_)) = self.between_chunks(bytes) {
                return RunResult::Aborted(d, sum(bytes));
            }
            let done = u64::from(i);
            // `src` is DESC_SIZE-aligned and i < BATCH_MAX, so this stays in u64 unless the
            // list runs off the end of the IOVA space, which faults like any other IOVA.
            let iova = d.src.checked_add(done * DESC_SIZE);
            let fetched = match iova {
                Some(iova) => self.fetch(iova, None),
                None => Err(self.access_fault(FAULT_IOVA_WIDTH, d.src, 0, ACCESS_DESCRIPTOR)),
            };
            let (raw, element_bus, hold) = match fetched {
                Ok(fetched) => fetched,
                Err(f) => {
                    self.report(&f);
                    let o = Outcome::fault(STATUS_DMA_ERROR, &f, sum(bytes));
                    return RunResult::Done(d, Outcome { result: done, ..o });
                }
            };
            self.shared.trace.record(|| Event::Element {
                queue: self.q(),
                index: i,
                bus: element_bus,
                desc: words(&raw),
            });
            let e = BatchElement::decode(&raw).0;
            if let Err(why) = BatchElement(e).validate(self.shared.config.max_transfer) {
                // Reporting takes the gate.
                drop(hold);
                let iova = iova.unwrap_or(0);
                debug!(
                    q = self.q(),
                    ?e,
                    element = i,
                    %why,
                    "guest error: bad BATCH element"
                );
                let f = self.invalid_descriptor(iova);
                let o = Outcome::fault(STATUS_INVALID_DESCRIPTOR, &f, sum(bytes));
                return RunResult::Done(d, Outcome { result: done, ..o });
            }
            let mut hold = hold;
            let ran = match e.opcode {
                OP_COPY => self.copy(&e, scratch, &mut hold),
                OP_FILL => self.fill(&e, scratch, &mut hold),
                _ => Ok(0),
            };
            // The next element's fetch (or a report) takes the gate.
            drop(hold);
            match ran {
                Ok(_) => bytes += u64::from(e.len),
                Err(Stop::Fault(f, moved)) => {
                    self.report(&f);
                    let o = Outcome::fault(STATUS_DMA_ERROR, &f, sum(bytes + moved));
                    return RunResult::Done(d, Outcome { result: done, ..o });
                }
                Err(Stop::Aborted(moved)) => return RunResult::Aborted(d, sum(bytes + moved)),
            }
        }
        RunResult::Done(d, Outcome::ok(sum(bytes), u64::from(d.len)))
    }

    fn write_completion(&self, d: &Descriptor, o: &Outcome) -> Result<bool, Fault> {
        let hold = self.hold();
        self.write_completion_in(&hold.mem, d, o)
    }

    /// [`Exec::write_completion`] to `mem`, under the caller's hold.
    fn write_completion_in(
        &self,
        mem: &GuestMemoryMmap,
        d: &Descriptor,
        o: &Outcome,
    ) -> Result<bool, Fault> {
        if d.completion == 0 {
            return Ok(true);
        }
        if d.completion % COMPLETION_SIZE != 0 {
            return Ok(false);
        }
        let flags = ACCESS_COMPLETION | ACCESS_WRITE;
        let _armed = sigbus::arm(mem);
        let at = self.map_small(mem, d.completion, COMPLETION_SIZE, Access::Write, flags)?;
        let bus = at.bus;
        let record = o.record(d.tag);
        let body_len = COMPLETION_SIZE - CompletionRecord::BODY_OFFSET;
        let written = at.slice(COMPLETION_SIZE).and_then(|to| {
            let body = to.subslice(CompletionRecord::BODY_OFFSET as usize, body_len as usize);
            body.ok()?.copy_from(&record.body());
            // The status must become visible only after the rest of the record.
            fence(Ordering::Release);
            // One 4-byte store (the record is COMPLETION_SIZE-aligned).
            to.get_ref::<u32>(0).ok()?.store(record.head().to_le());
            Some(())
        });
        if let Some(page) = sigbus::take_fault() {
            // The record went to a page that replaced the lost one: nobody sees it.
            return Err(self.bus_error(mem, page, d.completion, bus, flags));
        }
        if is_lost(at.region) {
            // Lost by another thread while this one wrote it.
            return Err(self.access_fault(FAULT_BUS_ERROR, d.completion, bus, flags));
        }
        written.ok_or_else(|| self.outside_ram(d.completion, bus, flags))?;
        self.record_bus.set(bus);
        // Memory only the client reaches: the body, then the head (see `remote`).
        let body = bus + CompletionRecord::BODY_OFFSET;
        remote::sync_out(mem, body, body_len)
            .and_then(|()| remote::sync_out(mem, bus, CompletionRecord::BODY_OFFSET))
            .map_err(|bad| self.access_fault(FAULT_BUS_ERROR, d.completion, bad, flags))?;
        Ok(true)
    }

    /// Count `result`'s descriptor in the queue's registers and statistics before its
    /// completion record goes out without the queue lock ([`Exec::complete_unlocked`]), so
    /// that a driver that sees the record reads counters that include it. Returns whether
    /// it was counted as failed (None: not counted, [`Exec::finish`] counts it).
    fn count_early(&self, result: &RunResult) -> Option<bool> {
        let outcome = match result {
            RunResult::Done(_, o) => *o,
            RunResult::Aborted(_, bytes) => Outcome::aborted(*bytes),
            RunResult::FetchFault(_) => return None,
        };
        let _r = self.slot.lock();
        if self.aborted() {
            return None;
        }
        let failed = outcome.status != STATUS_OK;
        self.count(outcome.bytes, failed);
        Some(failed)
    }

    /// Whether the worker may complete a descriptor and take the next without the queue
    /// lock: the queue still runs, its epoch has not moved (no disable or reset), bus
    /// mastering is on and no coalescing deadline is armed.
    fn may_go_on(&self) -> bool {
        !self.aborted()
            && self.slot.progress.running.load(Ordering::Acquire)
            && self.shared.bus_master.load(Ordering::Acquire)
            && !self.slot.timer_armed.load(Ordering::Acquire)
    }

    /// Complete `result`, the descriptor at `job`'s head, without the queue lock when it
    /// succeeded and asks for nothing the lock's path does (an interrupt, a halt): count
    /// it, write its completion record (under `held`, the hold its data moved under, or a
    /// new one), advance the head; then take the next descriptor when the tail is ahead
    /// and the queue may go on ([`Exec::may_go_on`]).
    ///
    /// A disable or reset that moves the epoch after the check finds the descriptor
    /// completed (as if it had come just after), and waits for the worker to leave: no
    /// record is written after it returns. `held` stays for the next fetch while
    /// [`Exec::keep`] allows.
    fn complete_fast(&self, result: &RunResult, job: &Job, held: &mut Option<Hold<'a>>) -> Fast {
        let RunResult::Done(d, outcome) = result else {
            return Fast::Locked(None, None);
        };
        if outcome.status != STATUS_OK || d.wants_interrupt() || !self.may_go_on() {
            return Fast::Locked(None, None);
        }
        // Counted before the record can be seen (see `finish`).
        self.count(outcome.bytes, false);
        let hold = held.get_or_insert_with(|| self.hold());
        let written = match self.write_completion_in(&hold.mem, d, outcome) {
            Ok(w) => w,
            Err(f) => {
                // Reporting takes the gate.
                *held = None;
                self.report(&f);
                false
            }
        };
        if !written {
            // The lock's path counts the error and halts the queue if it must.
            return Fast::Locked(Some(false), Some(false));
        }
        self.trace_complete(job.head, outcome, d.completion != 0);
        let head = self.advance_head(job.head, job.size);
        if let Some((reason, iova)) = self.shared.inject.after_descriptor(self.q()) {
            // Reporting takes the gate.
            *held = None;
            self.spurious_fault(reason, iova);
        }
        if !self.may_go_on() || self.slot.tail() == head {
            return Fast::Done;
        }
        if held.as_ref().is_some_and(|h| !self.keep(h)) {
            *held = None;
        }
        Fast::Next(Job { head, ..*job })
    }

    /// Record the completion of the descriptor at ring slot `slot` in the trace.
    fn trace_complete(&self, slot: u32, o: &Outcome, written: bool) {
        self.shared.trace.record(|| Event::Complete {
            queue: self.q(),
            slot,
            status: o.status,
            bytes: o.bytes,
            result: o.result,
            written,
            record_bus: self.record_bus.get(),
        });
    }

    /// Publish the head after `head` on a ring of `size` (release: after the record of the
    /// descriptor at `head`); returns it.
    fn advance_head(&self, head: u32, size: u32) -> u32 {
        let next = (head + 1) & size.wrapping_sub(1);
        self.slot.progress.head.store(next, Ordering::Release);
        next
    }

    /// Count a finished descriptor of `bytes`: the queue's statistics (`QSTAT_*`) and its
    /// `Q_COMPLETED` and `Q_ERRORS` registers. Call while in flight (the worker is then
    /// their only writer, see [`super::queue::Progress`]).
    fn count(&self, bytes: u32, failed: bool) {
        let counters = &self.slot.counters;
        add_locked(&counters.descriptors, 1);
        add_locked(&counters.bytes, u64::from(bytes));
        bump(&self.slot.progress.completed);
        if failed {
            self.count_error();
        }
    }

    /// Count one more error (`QSTAT_ERRORS`, `Q_ERRORS`). Call while in flight.
    fn count_error(&self) {
        add_locked(&self.slot.counters.errors, 1);
        bump(&self.slot.progress.errors);
    }

    /// Write the completion record of `result` without the queue lock (for memory only the
    /// client reaches); `Some(written)` when a record was due. A disable that moved the
    /// epoch meanwhile gets its aborted record; a reset, none.
    fn complete_unlocked(&self, result: &RunResult) -> Option<bool> {
        let (d, outcome) = match result {
            RunResult::FetchFault(_) => return None,
            RunResult::Done(d, o) if !self.aborted() => (d, *o),
            RunResult::Aborted(d, bytes) if !self.aborted() => (d, Outcome::aborted(*bytes)),
            RunResult::Aborted(d, bytes) | RunResult::Done(d, Outcome { bytes, .. }) => {
                if self.slot.lock().abort != Abort::Disable {
                    return None;
                }
                (d, Outcome::aborted(*bytes))
            }
        };
        let mut written = match self.write_completion(d, &outcome) {
            Ok(w) => w,
            Err(f) => {
                self.report(&f);
                false
            }
        };
        // Interrupted by a disable or a reset (which wait for this descriptor): the rest is
        // sent once the descriptor is finished (see `worker`).
        if remote::has_deferred() && remote::flush_deferred(|| self.aborted()).is_err() {
            written = false;
        }
        Some(written)
    }

    /// Complete (or abort) the descriptor that [`Exec::run`] ran. Called with the queue
    /// lock held. `early`: the record was written already ([`Exec::complete_unlocked`]).
    ///
    /// Returns the hold the completion record was written under, for the next descriptor's
    /// fetch (one gate hold and snapshot for the record, the next fetch and its first
    /// chunk); None when the descriptor was aborted, faulted writing its record, or when
    /// memory only the client reaches is mapped. The caller lets it go before it waits for
    /// anything or takes a queue lock.
    fn finish(
        &self,
        r: &mut QueueRegs,
        result: RunResult,
        early: Option<bool>,
        counted: Option<bool>,
    ) -> Option<Hold<'a>> {
        let slot = self.slot;
        if self.aborted() {
            if let (
                Abort::Disable,
                RunResult::Aborted(d, bytes) | RunResult::Done(d, Outcome { bytes, .. }),
            ) = (r.abort, &result)
            {
                let written = match early {
                    Some(w) => w,
                    None => match self.write_completion(d, &Outcome::aborted(*bytes)) {
                        Ok(w) => w,
                        Err(f) => {
                            self.report(&f);
                            false
                        }
                    },
                };
                debug!(q = self.q(), written, "descriptor aborted by disable");
                self.trace_complete(slot.head(), &Outcome::aborted(*bytes), written);
                match counted {
                    // Counted already, as a success: the abort makes it an error.
                    Some(false) => self.count_error(),
                    Some(true) => {}
                    None => self.count(*bytes, true),
                }
            }
            return None;
        }
        let (d, outcome) = match result {
            RunResult::FetchFault(f) => {
                warn!(
                    q = self.q(),
                    iova = f.iova,
                    "guest error: descriptor fetch faulted; queue halted"
                );
                slot.set_state(r, QueueState::Halted(HaltReason::DescriptorFetch(f.iova)));
                let pending = r.flush();
                slot.sync_timer(r);
                self.shared.raise(slot, pending);
                return None;
            }
            RunResult::Done(d, o) => (d, o),
            // The epoch did not move: nothing aborted it.
            RunResult::Aborted(d, bytes) => (d, Outcome::aborted(bytes)),
        };
        // The statistics count the descriptor before its completion record can be seen
        // (the registers are read under the queue lock held here, so they are consistent
        // anyway), so a driver that sees the completion reads counters that include it.
        let failed = outcome.status != STATUS_OK;
        if counted.is_none() {
            self.count(outcome.bytes, failed);
        }
        let mut carried = None;
        let written = match early {
            Some(w) => w,
            None => {
                let hold = self.hold();
                match self.write_completion_in(&hold.mem, &d, &outcome) {
                    Ok(w) => {
                        carried = Some(hold);
                        w
                    }
                    Err(f) => {
                        // Reporting takes the gate.
                        drop(hold);
                        self.report(&f);
                        false
                    }
                }
            }
        };
        let ok = !failed && written;
        self.trace_complete(slot.head(), &outcome, written && d.completion != 0);
        if !ok && !failed {
            // The completion record could not be written: an error all the same.
            self.count_error();
        }
        let head = self.advance_head(slot.head(), r.size);
        let mut vector = None;
        if d.wants_interrupt() {
            vector = r.coalesce(Instant::now());
        }
        if !ok && r.halt_on_fault && r.state == QueueState::Running {
            debug!(q = self.q(), head, "queue halted on a fault");
            slot.set_state(r, QueueState::Halted(HaltReason::Fault));
        }
        if matches!(r.state, QueueState::Halted(_)) {
            vector = vector.or(r.flush());
        }
        slot.sync_timer(r);
        self.shared.raise(slot, vector);
        carried.filter(|_| !remote::any())
    }
}

#[cfg(test)]
mod tests {
    //! The engine without its worker threads: an [`Exec`] over a [`Shared`] made here runs
    //! transfers and descriptors in the test's thread, so the pieces a transfer is cut into
    //! and each step's outcome can be looked at directly.

    use vm_memory::GuestMemoryAtomic;

    use super::*;
    use crate::core::mmu::DomainRegs;
    use crate::irq::RecordingInterrupts;

    /// Bus memory: [0, 4 MiB) and [4 MiB, 8 MiB), adjacent regions; a hole; [16, 20 MiB);
    /// and [`READ_ONLY`], mapped read-only.
    const REGIONS: [(u64, usize); 3] = [(0, 4 << 20), (4 << 20, 4 << 20), (16 << 20, 4 << 20)];
    /// A 1 MiB region the device may read but not write.
    const READ_ONLY: u64 = 24 << 20;
    /// A bus address in no region.
    const HOLE: u64 = 10 << 20;
    /// Page tables of the translated domain 1.
    const TABLES: u64 = 0x1_0000;
    /// A 4 KiB page.
    const PAGE: u64 = 4096;
    const RW: u64 = PTE_R | PTE_W;

    /// A device's shared state over [`REGIONS`], bus master on, no workers; domain 0 is in
    /// pass-through (its reset state), domain 1 translated with an empty table at
    /// [`TABLES`].
    fn shared() -> Shared {
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::MmapRegion;
        let config = DeviceConfig::default();
        let mut regions: Vec<_> = REGIONS
            .iter()
            .map(|&(a, l)| GuestRegionMmap::new(MmapRegion::new(l).unwrap(), GuestAddress(a)))
            .map(Option::unwrap)
            .collect();
        let ro = MmapRegionBuilder::new(1 << 20)
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            .build()
            .unwrap();
        regions.push(GuestRegionMmap::new(ro, GuestAddress(READ_ONLY)).unwrap());
        let gm = GuestMemoryMmap::from_regions(regions).unwrap();
        let s = Shared {
            mmu: Mmu::new(
                config.domains as u16,
                config.iova_width,
                config.iotlb_entries as usize,
                config.strict_iotlb,
            ),
            faults: FaultLog::new(config.queues as u16, config.msix_vectors()),
            queues: (0..config.queues as u16).map(QueueSlot::new).collect(),
            bus_master: AtomicBool::new(true),
            inject: Default::default(),
            trace: Default::default(),
            recent_faults: Default::default(),
            config,
            mem: GuestMemoryAtomic::new(gm),
            irq: Arc::new(RecordingInterrupts::new()),
        };
        s.mmu.set_domain(
            1,
            DomainRegs {
                root: TABLES,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        s
    }

    fn exec(shared: &Shared, domain: u16) -> Exec<'_> {
        Exec {
            shared,
            slot: &shared.queues[0],
            domain,
            epoch: shared.queues[0].epoch.load(Ordering::Relaxed),
            record_bus: std::cell::Cell::new(0),
            remembered: Default::default(),
            chunk_kept: Default::default(),
        }
    }

    /// Map the 4 KiB page at `iova` of domain 1 to `bus`, making tables (after the root at
    /// [`TABLES`], one page each) on the way.
    fn map(s: &Shared, iova: u64, bus: u64, perm: u64) {
        let mem = s.mem.memory();
        let mut table = TABLES;
        for level in (2..=4).rev() {
            let at = table + pte_index(iova, level) as u64 * 8;
            let mut e: u64 = mem.read_obj(GuestAddress(at)).unwrap();
            if e & RW == 0 {
                // The table slot k of a level-`level` table points to: page 1 + k of that
                // level's 512 pages after the root (one table per level is all a test uses).
                let next = TABLES + PAGE * (1 + u64::from(4 - level) * 512 + (at & 0xfff) / 8);
                e = Pte::table(next, RW).raw();
                mem.write_obj(e, GuestAddress(at)).unwrap();
            }
            table = e & PTE_ADDR_MASK;
        }
        let at = table + pte_index(iova, 1) as u64 * 8;
        mem.write_obj(Pte::leaf(bus, perm, false).raw(), GuestAddress(at))
            .unwrap();
    }

    /// Map `n` pages from `iova` to the bus pages `bus(i)`.
    fn map_pages(s: &Shared, iova: u64, n: u64, bus: impl Fn(u64) -> u64) {
        for i in 0..n {
            map(s, iova + i * PAGE, bus(i), RW);
        }
    }

    /// A piece as the operation sees it: transfer offset, bus address and length of each
    /// side.
    type Seen = (u64, (u64, usize), Option<(u64, usize)>);

    /// Run a transfer of `len` bytes over sides `a` and `b`; what it returned and the
    /// pieces it handed over.
    fn pieces(e: &Exec<'_>, len: u64, a: Side, b: Option<Side>) -> (Result<(), Stop>, Vec<Seen>) {
        let mem = e.shared.mem.memory();
        let bus = |s: &VolatileSlice<'_, ()>| {
            let host = s.ptr_guard().as_ptr() as usize;
            let region = REGIONS
                .iter()
                .map(|r| r.0)
                .chain([READ_ONLY])
                .find_map(|a| {
                    let start = mem.get_host_address(GuestAddress(a)).ok()? as usize;
                    let end = mem.find_region(GuestAddress(a))?.len() as usize + start;
                    (start..end)
                        .contains(&host)
                        .then(|| a + (host - start) as u64)
                })
                .expect("a slice of bus memory");
            (region, s.len())
        };
        let mut seen = Vec::new();
        let r = e.transfer(len, a, b, false, &mut None, |off, x, y| {
            seen.push((off, bus(&x), y.as_ref().map(bus)));
            ControlFlow::Continue(())
        });
        (r, seen)
    }

    #[test]
    fn contiguous_pages_in_one_region_move_as_one_piece() {
        let s = shared();
        let e = exec(&s, 1);
        // 16 pages each side, contiguous in bus memory, in the first region.
        map_pages(&s, 0x100_0000, 16, |i| 0x20_0000 + i * PAGE);
        map_pages(&s, 0x200_0000, 16, |i| 0x30_0000 + i * PAGE);
        let len = 16 * PAGE;
        let (r, seen) = pieces(
            &e,
            len,
            Side::read(0x100_0000),
            Some(Side::write(0x200_0000)),
        );
        assert!(r.is_ok());
        assert_eq!(
            seen,
            vec![(
                0,
                (0x20_0000, len as usize),
                Some((0x30_0000, len as usize))
            )]
        );
        // From an offset inside the first page, and one side alone.
        let (_, seen) = pieces(&e, len - 0x100 - 1, Side::read(0x100_0100), None);
        assert_eq!(seen, vec![(0, (0x20_0100, (len - 0x101) as usize), None)]);
    }

    #[test]
    fn a_gap_in_bus_memory_on_either_side_starts_a_piece() {
        let s = shared();
        let e = exec(&s, 1);
        // Source: pages 0..8 contiguous, page 8 elsewhere, pages 9..16 contiguous again.
        map_pages(&s, 0x100_0000, 16, |i| match i {
            8 => 0x28_0000,
            _ => 0x20_0000 + i * PAGE,
        });
        // Destination: contiguous but for page 12.
        map_pages(&s, 0x200_0000, 16, |i| match i {
            12 => 0x38_0000,
            _ => 0x30_0000 + i * PAGE,
        });
        let (r, seen) = pieces(
            &e,
            16 * PAGE,
            Side::read(0x100_0000),
            Some(Side::write(0x200_0000)),
        );
        assert!(r.is_ok());
        let p = |from: u64, to: u64, a: u64, b: u64| {
            let n = ((to - from) * PAGE) as usize;
            (from * PAGE, (a, n), Some((b, n)))
        };
        assert_eq!(
            seen,
            vec![
                p(0, 8, 0x20_0000, 0x30_0000),
                p(8, 9, 0x28_0000, 0x30_8000),
                p(9, 12, 0x20_9000, 0x30_9000),
                p(12, 13, 0x20_c000, 0x38_0000),
                p(13, 16, 0x20_d000, 0x30_d000),
            ]
        );
    }

    #[test]
    fn a_transfer_translates_its_own_pages_only() {
        let s = shared();
        let e = exec(&s, 1);
        // Pages 0..4 contiguous, then a jump: pages 4.. contiguous again, mapped well past
        // the end of the transfer (8 pages).
        map_pages(&s, 0x100_0000, 24, |i| match i {
            0..4 => 0x20_0000 + i * PAGE,
            _ => 0x28_0000 + i * PAGE,
        });
        let (r, seen) = pieces(&e, 8 * PAGE, Side::write(0x100_0000), None);
        assert!(r.is_ok());
        assert_eq!(
            seen,
            vec![
                (0, (0x20_0000, 4 * PAGE as usize), None),
                (4 * PAGE, (0x28_4000, 4 * PAGE as usize), None),
            ]
        );
        let st = s.mmu.stats()[1];
        assert_eq!(
            (st.translations, st.iotlb_misses, st.page_walks),
            (8, 8, 8),
            "each page once, none past the end"
        );
        assert_eq!(s.mmu.iotlb_len(), 8);
        // Both sides, the second from an offset: the same.
        map_pages(&s, 0x200_0000, 24, |i| 0x30_0000 + i * PAGE);
        let (r, _) = pieces(
            &e,
            8 * PAGE - 0x80,
            Side::read(0x200_0080),
            Some(Side::write(0x100_0000)),
        );
        assert!(r.is_ok());
        let st = s.mmu.stats()[1];
        assert_eq!((st.translations, st.iotlb_hits), (24, 8), "8 pages a side");
        assert_eq!(s.mmu.iotlb_len(), 16);
    }

    /// The `FAULT_OUTSIDE_RAM` fault of side `side` at transfer offset `off`, bus `bus`.
    fn outside(side: Side, off: u64, bus: u64) -> Fault {
        Fault {
            reason: FAULT_OUTSIDE_RAM,
            access: side.flags,
            domain: 1,
            queue: 0,
            iova: side.iova + off,
            info: bus,
            level: 0,
        }
    }

    /// Expect `r` to be a fault `f` after `done` bytes.
    #[track_caller]
    fn expect_fault(r: Result<(), Stop>, f: Fault, done: u64) {
        match r {
            Err(Stop::Fault(got, n)) => assert_eq!((got, n), (f, done)),
            other => panic!("expected {f:?} after {done} bytes, got {other:?}"),
        }
    }

    /// A page that translates but whose bus address is in no region, or in a region that
    /// does not allow the access, faults with its own IOVA and bus address, on either
    /// side, in the first chunk or a later one, after the bytes before it have moved.
    #[test]
    fn access_faults_name_the_iova_and_bus_address_of_their_side() {
        const A: u64 = 0x100_0000;
        const B: u64 = 0x200_0000;
        // Pages `bad` and `bad + 1` of a side at `bus` (so a run goes on past the first),
        // the others contiguous from the side's base.
        let setup = |a_bad: Option<(u64, u64)>, b_bad: Option<(u64, u64)>| {
            let s = shared();
            let pages = (CHUNK_MAX / PAGE) * 2;
            for (iova, base, bad) in [(A, 0x10_0000, a_bad), (B, 0x40_0000, b_bad)] {
                map_pages(&s, iova, pages, |i| match bad {
                    Some((p, bus)) if i == p || i == p + 1 => bus + (i - p) * PAGE,
                    _ => base + i * PAGE,
                });
            }
            s
        };
        for at_page in [3, CHUNK_MAX / PAGE + 2] {
            let off = at_page * PAGE;
            let len = off + 4 * PAGE;
            for bus in [HOLE, READ_ONLY] {
                // Side b, written, faults.
                let s = setup(None, Some((at_page, bus)));
                let (a, b) = (Side::read(A), Side::write(B));
                let (r, seen) = pieces(&exec(&s, 1), len, a, Some(b));
                expect_fault(r, outside(b, off, bus), off);
                assert_eq!(seen.last().map(|p| p.0 + p.1 .1 as u64), Some(off));
                // Side a, written, with a side b.
                let s = setup(Some((at_page, bus)), None);
                let (a, b) = (Side::write(A), Side::read(B));
                let (r, _) = pieces(&exec(&s, 1), len, a, Some(b));
                expect_fault(r, outside(a, off, bus), off);
                // Side a alone.
                let (r, _) = pieces(&exec(&s, 1), len, a, None);
                expect_fault(r, outside(a, off, bus), off);
            }
            // Side b, read, in no region.
            let s = setup(None, Some((at_page, HOLE)));
            let (a, b) = (Side::write(A), Side::read(B));
            let (r, _) = pieces(&exec(&s, 1), len, a, Some(b));
            expect_fault(r, outside(b, off, HOLE), off);
            // Reading a read-only region is fine.
            let s = setup(Some((at_page, READ_ONLY)), None);
            let (r, _) = pieces(&exec(&s, 1), len, Side::read(A), None);
            assert!(r.is_ok());
        }
    }

    /// Side b is translated no further than side a's run: when a faults, b has translated
    /// (and counted) nothing past that page.
    #[test]
    fn side_b_is_translated_no_further_than_side_a() {
        const A: u64 = 0x100_0000;
        const B: u64 = 0x200_0000;
        let s = shared();
        // a: pages 0..3 contiguous, page 3 not mapped. b: page 0, then pages 1.. contiguous
        // elsewhere.
        map_pages(&s, A, 3, |i| 0x20_0000 + i * PAGE);
        map_pages(&s, B, 16, |i| match i {
            0 => 0x30_0000,
            _ => 0x38_0000 + i * PAGE,
        });
        let (r, seen) = pieces(&exec(&s, 1), 8 * PAGE, Side::read(A), Some(Side::write(B)));
        let Err(Stop::Fault(f, done)) = r else {
            panic!("expected a fault, got {r:?}");
        };
        assert_eq!(
            (f.reason, f.iova, done),
            (FAULT_NOT_PRESENT, A + 3 * PAGE, 3 * PAGE)
        );
        assert_eq!(seen.len(), 2, "page 0, then pages 1..3: {seen:?}");
        let st = s.mmu.stats()[1];
        // a: pages 0..3 and the faulting page 3; b: pages 0..3.
        assert_eq!((st.translations, st.faults), (7, 1));
        assert_eq!(s.mmu.iotlb_len(), 6);
    }

    /// Run descriptor `d` from a one-entry ring in pass-through domain 0 (so IOVAs are bus
    /// addresses); what it returned.
    fn run_desc(s: &Shared, d: Descriptor) -> RunResult {
        const RING: u64 = 0x8000;
        let mem = s.mem.memory();
        mem.write_slice(&d.encode(), GuestAddress(RING)).unwrap();
        let e = exec(s, 0);
        let job = Job {
            base: RING,
            size: 64,
            head: 0,
            domain: 0,
            epoch: e.epoch,
        };
        e.run(&job, &mut Scratch::new(), &mut None)
    }

    fn bytes(s: &Shared, bus: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        s.mem
            .memory()
            .read_slice(&mut v, GuestAddress(bus))
            .unwrap();
        v
    }

    /// FILL repeats its 8-byte pattern from the first byte of the destination, whatever
    /// pieces (a region boundary at an odd offset) and scratch blocks it is written in.
    #[test]
    fn fill_keeps_the_pattern_phase_across_pieces_and_blocks() {
        let s = shared();
        // The region boundary at 4 MiB falls 0x1003 bytes in; the second piece is longer
        // than a scratch block.
        let dst = (4 << 20) - 0x1003;
        let len = 0x1003 + 2 * BLOCK as u32 + 5;
        let pattern = 0x0807_0605_0403_0201u64;
        let r = run_desc(&s, Descriptor::new(OP_FILL, len, pattern, dst));
        assert!(
            matches!(
                r,
                RunResult::Done(
                    _,
                    Outcome {
                        status: STATUS_OK,
                        ..
                    }
                )
            ),
            "{r:?}"
        );
        let got = bytes(&s, dst - 8, len as usize + 16);
        let p = pattern.to_le_bytes();
        for (i, &b) in got[8..8 + len as usize].iter().enumerate() {
            assert_eq!(b, p[i % 8], "byte {i:#x}");
        }
        assert_eq!(got[..8], [0; 8], "nothing before");
        assert_eq!(got[8 + len as usize..], [0; 8], "nothing after");
    }

    #[test]
    fn crc32c_flip_is_what_a_flipped_byte_does_to_the_crc32c() {
        let mut m: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for (at, x) in [(0usize, 1u8), (4095, 0x80), (4096, 0xff), (4999, 0x42)] {
            let before = crc32c::crc32c(&m);
            m[at] ^= x;
            assert_eq!(
                crc32c::crc32c(&m),
                before ^ crc32c_flip(m.len() as u64, at as u64, x),
                "byte {at}"
            );
            m[at] ^= x;
        }
    }

    /// The injected COPY corruption XORs exactly the byte at its offset, and none when the
    /// offset is past the copy.
    #[test]
    fn injected_copy_corruption_hits_one_byte_of_the_copy() {
        use crate::core::inject::Rule;
        let (src, dst, len) = (0x10_0000u64, 0x20_0000u64, 256u32);
        let data: Vec<u8> = (0..len + 8).map(|i| (i * 7 + 1) as u8).collect();
        for (offset, hit) in [(0, true), (255, true), (256, false), (1000, false)] {
            let s = shared();
            s.mem
                .memory()
                .write_slice(&data, GuestAddress(src))
                .unwrap();
            s.inject.set(&[Rule::CorruptCopy {
                offset,
                xor: 0x5a,
                nth: 0,
                queue: None,
            }]);
            let r = run_desc(&s, Descriptor::new(OP_COPY, len, src, dst));
            assert!(matches!(
                r,
                RunResult::Done(
                    _,
                    Outcome {
                        status: STATUS_OK,
                        ..
                    }
                )
            ));
            let got = bytes(&s, dst, len as usize + 8);
            let mut want = data[..len as usize].to_vec();
            want.extend([0; 8]);
            if hit {
                want[offset as usize] ^= 0x5a;
            }
            assert_eq!(got, want, "corruption at {offset}");
        }
    }

    #[test]
    fn a_region_boundary_starts_a_piece_even_when_bus_addresses_continue() {
        let s = shared();
        let e = exec(&s, 0);
        // Pass-through: bus = IOVA. 8 KiB before the end of the first region, 8 KiB after.
        let from = (4 << 20) - 2 * PAGE;
        let (r, seen) = pieces(&e, 4 * PAGE, Side::read(from), Some(Side::write(16 << 20)));
        assert!(r.is_ok());
        assert_eq!(
            seen,
            vec![
                (0, (from, 8192), Some((16 << 20, 8192))),
                (8192, (4 << 20, 8192), Some(((16 << 20) + 8192, 8192))),
            ]
        );
        // The same on side b.
        let (_, seen) = pieces(&e, 4 * PAGE, Side::read(16 << 20), Some(Side::write(from)));
        assert_eq!(
            seen,
            vec![
                (0, (16 << 20, 8192), Some((from, 8192))),
                (8192, ((16 << 20) + 8192, 8192), Some((4 << 20, 8192))),
            ]
        );
    }

    #[test]
    fn chunks_are_at_most_chunk_max() {
        let s = shared();
        let e = exec(&s, 0);
        let len = 2 * CHUNK_MAX + 0x1234;
        let (r, seen) = pieces(&e, len, Side::write(0x10_0000), None);
        assert!(r.is_ok());
        let c = CHUNK_MAX as usize;
        assert_eq!(
            seen,
            vec![
                (0, (0x10_0000, c), None),
                (CHUNK_MAX, (0x10_0000 + CHUNK_MAX, c), None),
                (2 * CHUNK_MAX, (0x10_0000 + 2 * CHUNK_MAX, 0x1234), None),
            ]
        );
    }

    #[test]
    fn spin_until_returns_when_the_condition_holds_or_the_time_is_up() {
        let far = Instant::now() + std::time::Duration::from_secs(10);
        let calls = std::cell::Cell::new(0);
        spin_until(
            || {
                calls.set(calls.get() + 1);
                calls.get() == 100
            },
            far,
        );
        assert_eq!(calls.get(), 100, "checked until it held, then no more");
        assert!(Instant::now() < far);
        let until = Instant::now() + std::time::Duration::from_millis(2);
        spin_until(|| false, until);
        assert!(Instant::now() >= until, "returned before the time was up");
    }

    /// Where [`file_shared`] maps its file.
    const FILE_BUS: u64 = 32 << 20;
    /// The file's length, mapped whole.
    const FILE_SIZE: u64 = 2 << 20;

    /// [`shared`] plus a memfd of [`FILE_SIZE`] bytes mapped shared at [`FILE_BUS`], as a
    /// DMA_MAP maps a client's file; and the file, to take its pages away.
    fn file_shared() -> (Shared, std::fs::File) {
        use std::os::fd::FromRawFd;

        use vm_memory::{FileOffset, MmapRegion};
        sigbus::install().unwrap();
        let name = std::ffi::CString::new("domdma-engine-test").unwrap();
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(FILE_SIZE).unwrap();
        let s = shared();
        let region = MmapRegion::build(
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            FILE_SIZE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(FILE_BUS)).unwrap();
        let gm = s.mem.memory().insert_region(Arc::new(region)).unwrap();
        s.mem.lock().unwrap().replace(gm);
        (s, file)
    }

    /// The outcome of a descriptor that ran to its end.
    #[track_caller]
    fn outcome(r: RunResult) -> Outcome {
        match r {
            RunResult::Done(_, o) => o,
            other => panic!("expected a completion, got {other:?}"),
        }
    }

    /// A file that lost pages under the mapping: the piece that touches one fails with
    /// `FAULT_BUS_ERROR` at its first lost byte, after the chunks before it have moved;
    /// from then on the mapping is refused before any byte of it is touched, until it is
    /// forgotten (unmapped).
    #[test]
    fn a_lost_page_faults_its_piece_and_the_mapping_is_not_touched_again() {
        use std::os::unix::fs::FileExt;
        let (s, file) = file_shared();
        let src = 0x10_0000;
        let data: Vec<u8> = (0..FILE_SIZE).map(|i| (i * 13) as u8).collect();
        s.mem
            .memory()
            .write_slice(&data, GuestAddress(src))
            .unwrap();
        file.set_len(0x18_0000).unwrap();
        let o = outcome(run_desc(&s, Descriptor::copy(src, FILE_BUS, 2 << 20)));
        assert_eq!(
            (o.status, o.reason, o.access, o.fault_addr),
            (
                STATUS_DMA_ERROR,
                FAULT_BUS_ERROR,
                ACCESS_WRITE,
                FILE_BUS + 0x18_0000
            ),
            "{o:x?}"
        );
        assert_eq!(o.bytes, CHUNK_MAX as u32, "the first chunk moved");
        let mut got = vec![0; CHUNK_MAX as usize];
        file.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..] == data[..CHUNK_MAX as usize]);
        assert_eq!(s.faults.stats().count, 1);
        let mem = s.mem.memory();
        let region = mem.find_region(GuestAddress(FILE_BUS)).unwrap();
        assert!(crate::core::bus::is_lost(region));

        // Its first page is still in the file, but the mapping is lost: refused, untouched.
        let o = outcome(run_desc(&s, Descriptor::fill(FILE_BUS, 0, 0x100)));
        assert_eq!(
            (o.status, o.reason, o.fault_addr, o.bytes),
            (STATUS_DMA_ERROR, FAULT_BUS_ERROR, FILE_BUS, 0)
        );
        // Read too.
        let o = outcome(run_desc(&s, Descriptor::copy(FILE_BUS, src, 0x100)));
        assert_eq!(
            (o.reason, o.access, o.fault_addr),
            (FAULT_BUS_ERROR, 0, FILE_BUS)
        );
        file.read_exact_at(&mut got[..0x100], 0).unwrap();
        assert!(
            got[..0x100] == data[..0x100],
            "the FILL did not touch the file"
        );

        // Forgotten (the mapping was removed and this is a new one): usable again.
        crate::core::bus::forget_lost(region);
        let o = outcome(run_desc(&s, Descriptor::fill(FILE_BUS, 0, 0x100)));
        assert_eq!(o.status, STATUS_OK, "{o:x?}");
    }

    /// A piece whose region another thread found lost while it moved (that thread's
    /// SIGBUS handler noted the region before replacing the page this piece may have read)
    /// fails as well, though it took no SIGBUS itself.
    #[test]
    fn a_piece_whose_region_was_lost_meanwhile_fails_too() {
        let (s, _file) = file_shared();
        let mem = s.mem.memory();
        let region = mem.find_region(GuestAddress(FILE_BUS)).unwrap();
        let (a, b) = (Side::write(0x10_0000), Side::read(FILE_BUS + 0x1000));
        let r = exec(&s, 0).transfer(0x2000, a, Some(b), false, &mut None, |_, _, _| {
            bus::note_lost_in_handler(region);
            ControlFlow::Continue(())
        });
        let f = Fault {
            reason: FAULT_BUS_ERROR,
            access: 0,
            domain: 0,
            queue: 0,
            iova: FILE_BUS + 0x1000,
            info: FILE_BUS + 0x1000,
            level: 0,
        };
        expect_fault(r, f, 0);
        assert!(is_lost(region), "noted");
        assert!(
            bus::mark_lost(region),
            "recorded by the thread that took the fault"
        );
        assert!(is_lost(region));
        bus::forget_lost(region);
        assert!(!is_lost(region));
    }

    /// Lost memory found outside the data: under a descriptor (the fetch faults), a
    /// completion record (no record), a page table (the walk's own fault, with the table's
    /// level and bus address) or the fault log's ring (the record is dropped, with
    /// `FLOG_STATUS_ERROR`).
    #[test]
    fn lost_memory_under_a_ring_a_completion_a_page_table_or_the_fault_log_is_a_fault() {
        let fault = |reason, access, domain, iova, info, level| Fault {
            reason,
            access,
            domain,
            queue: 0,
            iova,
            info,
            level,
        };
        // A descriptor.
        let (s, file) = file_shared();
        file.set_len(0).unwrap();
        let e = exec(&s, 0);
        let job = Job {
            base: FILE_BUS,
            size: 64,
            head: 1,
            domain: 0,
            epoch: e.epoch,
        };
        let at = FILE_BUS + DESC_SIZE;
        match e.run(&job, &mut Scratch::new(), &mut None) {
            RunResult::FetchFault(f) => {
                assert_eq!(f, fault(FAULT_BUS_ERROR, ACCESS_DESCRIPTOR, 0, at, at, 0))
            }
            other => panic!("expected a fetch fault, got {other:?}"),
        }

        // A completion record.
        let (s, file) = file_shared();
        file.set_len(0).unwrap();
        let at = FILE_BUS + 0x20;
        let d = Descriptor::nop().with_completion(at);
        let f = exec(&s, 0)
            .write_completion(&d, &Outcome::ok(0, 0))
            .unwrap_err();
        let flags = ACCESS_COMPLETION | ACCESS_WRITE;
        assert_eq!(f, fault(FAULT_BUS_ERROR, flags, 0, at, at, 0));

        // A page table: the root of domain 2.
        let (s, file) = file_shared();
        file.set_len(0).unwrap();
        s.mmu.set_domain(
            2,
            DomainRegs {
                root: FILE_BUS,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        let iova = 0x4000_0000;
        let (r, seen) = pieces(&exec(&s, 2), 0x1000, Side::write(iova), None);
        let flags = ACCESS_WRITE | ACCESS_PAGE_WALK;
        expect_fault(r, fault(FAULT_BUS_ERROR, flags, 2, iova, FILE_BUS, 4), 0);
        assert!(seen.is_empty());

        // The fault log's ring.
        let (s, file) = file_shared();
        file.set_len(0).unwrap();
        for (reg, value) in [
            (REG_FLOG_BASE_LO, FILE_BUS as u32),
            (REG_FLOG_BASE_HI, 0),
            (REG_FLOG_SIZE, 16),
            (REG_FLOG_CTRL, FLOG_CTRL_ENABLE),
        ] {
            s.faults.write(reg, value);
        }
        let f = fault(FAULT_NOT_PRESENT, 0, 1, 0x1000, 0, 1);
        s.faults.report(&s.mem.memory(), s.irq.as_ref(), &f);
        assert_eq!(s.faults.read(REG_FLOG_HEAD), 0, "no record");
        assert_ne!(s.faults.read(REG_FLOG_STATUS) & FLOG_STATUS_ERROR, 0);
        assert_eq!(s.faults.stats().dropped, 1);
        let mem = s.mem.memory();
        assert!(crate::core::bus::is_lost(
            mem.find_region(GuestAddress(FILE_BUS)).unwrap()
        ));
    }

    #[test]
    fn shared_state_shows_in_debug_output() {
        let s = shared();
        let shown = format!("{s:?}");
        for field in ["Shared", "config", "bus_master: true", "queues"] {
            assert!(shown.contains(field), "{field} in {shown}");
        }
    }
}
