//! The fault log: a ring of fault records in bus memory and its registers (`REG_FLOG_*`).
//!
//! The ring lives at a bus address (untranslated, as an IOMMU's own structures do). The
//! device writes a record at `REG_FLOG_HEAD` and advances it; the driver consumes records and
//! advances `REG_FLOG_TAIL`. The ring is full when head + 1 == tail: a fault that finds it
//! full is dropped and flagged (`FLOG_STATUS_OVERFLOW`). Every fault is counted, logged or
//! not. See SPEC.md, "Faults".

use std::sync::atomic::{fence, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tracing::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::bus::{self, check_range, Access};
use super::mmu::TranslationFault;
use super::remote;
use super::sigbus;
use super::stats::FaultStats;
use crate::irq::InterruptSink;
use crate::spec::*;

/// One fault, as recorded in the fault log and reported in a completion record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "DMA fault {reason} (access {access:#x}) at IOVA {iova:#x} in domain {domain}, queue {queue}"
)]
pub struct Fault {
    /// `FAULT_*` reason.
    pub reason: u8,
    /// `ACCESS_*` flags.
    pub access: u8,
    /// Domain of the access.
    pub domain: u16,
    /// Queue that made the access.
    pub queue: u16,
    /// The faulting IOVA (descriptor, data or completion address).
    pub iova: u64,
    /// Detail: the offending page-table entry (malformed), the bus address (outside RAM),
    /// else 0.
    pub info: u64,
    /// Page-table level of the fault (4..1), 0 if not in a walk.
    pub level: u32,
}

impl Fault {
    /// A fault of a translation made by `queue` in `domain` for an access with `access` flags
    /// (`ACCESS_PAGE_WALK` is added when the fault happened in the walk).
    pub fn from_translation(f: TranslationFault, access: u8, domain: u16, queue: u16) -> Self {
        let walk = if f.in_walk { ACCESS_PAGE_WALK } else { 0 };
        Self {
            reason: f.reason,
            access: access | walk,
            domain,
            queue,
            iova: f.iova,
            info: f.info,
            level: f.level,
        }
    }

    /// The fault log record of this fault with sequence number `seq`.
    pub fn record(&self, seq: u32) -> FaultRecord {
        FaultRecord {
            reason: self.reason,
            access: self.access,
            domain: self.domain,
            queue: self.queue,
            reserved: 0,
            iova: self.iova,
            info: self.info,
            level: self.level,
            seq,
        }
    }
}

/// Why the fault log refused to be enabled, or could not write a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FaultLogError {
    /// The base is not aligned to a record.
    #[error("fault log base {0:#x} is not aligned to {FAULT_RECORD_SIZE} bytes")]
    Misaligned(u64),
    /// The size is not a power of two in 2..=`FAULT_LOG_MAX`.
    #[error("fault log size {0} is not a power of two between 2 and {FAULT_LOG_MAX}")]
    BadSize(u32),
    /// The ring would run past the end of the bus address space.
    #[error("fault log ring at {0:#x} runs past the end of the bus address space")]
    Wraps(u64),
    /// The record's bus address is not mapped writable for the device (or its memory was
    /// lost earlier).
    #[error("fault record at bus address {0:#x} is not writable")]
    Unwritable(u64),
    /// The memory behind the record's bus address was found lost while writing it (SIGBUS,
    /// recovered; see [`sigbus`]).
    #[error("the memory behind the fault record at bus address {0:#x} is gone")]
    Lost(u64),
}

/// Register state of the fault log.
#[derive(Debug, Clone)]
struct Regs {
    base: u64,
    size: u32,
    enabled: bool,
    head: u32,
    tail: u32,
    /// `FLOG_STATUS_OVERFLOW` and `FLOG_STATUS_ERROR` (pending is computed).
    status: u32,
    vector: u16,
    count: u64,
    dropped: u64,
}

impl Regs {
    fn new(vector: u16) -> Self {
        Self {
            base: 0,
            size: 0,
            enabled: false,
            head: 0,
            tail: 0,
            status: 0,
            vector,
            count: 0,
            dropped: 0,
        }
    }

    fn check(&self) -> Result<(), FaultLogError> {
        if self.base % FAULT_RECORD_SIZE != 0 {
            return Err(FaultLogError::Misaligned(self.base));
        }
        if !(2..=FAULT_LOG_MAX).contains(&self.size) || !self.size.is_power_of_two() {
            return Err(FaultLogError::BadSize(self.size));
        }
        let bytes = u64::from(self.size) * FAULT_RECORD_SIZE;
        if self.base.checked_add(bytes - 1).is_none() {
            return Err(FaultLogError::Wraps(self.base));
        }
        Ok(())
    }
}

/// The fault log: registers and the writer of records. Shared by the register front end and
/// the engine's workers; one mutex guards the registers and the ring's head.
#[derive(Debug)]
pub struct FaultLog {
    regs: Mutex<Regs>,
    default_vector: u16,
    vectors: u16,
}

impl FaultLog {
    /// A disabled fault log raising `default_vector` (of `vectors`) by default.
    pub fn new(default_vector: u16, vectors: u16) -> Self {
        Self {
            regs: Mutex::new(Regs::new(default_vector)),
            default_vector,
            vectors,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Read fault log register `reg` (a `REG_FLOG_*` offset).
    pub fn read(&self, reg: u64) -> u32 {
        let r = self.lock();
        match reg {
            REG_FLOG_BASE_LO => r.base as u32,
            REG_FLOG_BASE_HI => (r.base >> 32) as u32,
            REG_FLOG_SIZE => r.size,
            REG_FLOG_CTRL if r.enabled => FLOG_CTRL_ENABLE,
            REG_FLOG_CTRL => 0,
            REG_FLOG_HEAD => r.head,
            REG_FLOG_TAIL => r.tail,
            REG_FLOG_STATUS => {
                let pending = if r.head != r.tail {
                    FLOG_STATUS_PENDING
                } else {
                    0
                };
                r.status | pending
            }
            REG_FLOG_MSIX_VECTOR => u32::from(r.vector),
            REG_FLOG_COUNT => r.count as u32,
            REG_FLOG_DROPPED => r.dropped as u32,
            _ => 0,
        }
    }

    /// Write fault log register `reg` (a `REG_FLOG_*` offset).
    pub fn write(&self, reg: u64, value: u32) {
        let mut r = self.lock();
        match reg {
            REG_FLOG_BASE_LO | REG_FLOG_BASE_HI | REG_FLOG_SIZE if r.enabled => {
                warn!(
                    reg,
                    value, "guest error: fault log reconfigured while enabled; ignored"
                );
            }
            REG_FLOG_BASE_LO => r.base = (r.base & !0xffff_ffff) | u64::from(value),
            REG_FLOG_BASE_HI => r.base = (r.base & 0xffff_ffff) | u64::from(value) << 32,
            REG_FLOG_SIZE => r.size = value,
            REG_FLOG_CTRL => match (r.enabled, value & FLOG_CTRL_ENABLE != 0) {
                (false, true) => match r.check() {
                    Ok(()) => {
                        r.enabled = true;
                        r.head = 0;
                        r.tail = 0;
                        debug!(base = r.base, size = r.size, "fault log enabled");
                    }
                    Err(e) => {
                        warn!(error = %e, "guest error: fault log not enabled");
                        r.status |= FLOG_STATUS_ERROR;
                    }
                },
                (true, false) => r.enabled = false,
                _ => {}
            },
            REG_FLOG_TAIL => {
                if r.enabled && value < r.size {
                    r.tail = value;
                } else {
                    warn!(
                        value,
                        size = r.size,
                        enabled = r.enabled,
                        "guest error: bad fault log tail; ignored"
                    );
                }
            }
            REG_FLOG_STATUS => r.status &= !(value & (FLOG_STATUS_OVERFLOW | FLOG_STATUS_ERROR)),
            REG_FLOG_MSIX_VECTOR => match u16::try_from(value) {
                Ok(v) if v < self.vectors => r.vector = v,
                _ => warn!(
                    value,
                    "guest error: fault log MSI-X vector out of range; ignored"
                ),
            },
            _ => debug!(reg, value, "write to a read-only fault log register"),
        }
    }

    /// Count `fault` and, when the log is enabled and has room, write its record at the head,
    /// advance the head and raise the fault vector. Returns the fault's sequence number and
    /// the vector raised, if any.
    pub fn report(
        &self,
        mem: &GuestMemoryMmap,
        irq: &dyn InterruptSink,
        fault: &Fault,
    ) -> (u32, Option<u16>) {
        let mut r = self.lock();
        let seq = r.count as u32;
        r.count += 1;
        // A guest can fault at will: log the first few, then every power of two.
        let loud = r.count <= 16 || r.count.is_power_of_two();
        if loud {
            warn!(%fault, seq, "guest error: DMA fault (the first 16 and every 2^n-th are logged)");
        } else {
            debug!(%fault, seq, "guest error: DMA fault");
        }
        if !r.enabled {
            r.dropped += 1;
            return (seq, None);
        }
        let next = (r.head + 1) & (r.size - 1);
        if next == r.tail {
            r.dropped += 1;
            r.status |= FLOG_STATUS_OVERFLOW;
            if loud {
                warn!(seq, "fault log full; fault dropped");
            }
            return (seq, None);
        }
        // Cannot overflow: enabling checked base + size * record size.
        let addr = r.base + u64::from(r.head) * FAULT_RECORD_SIZE;
        let armed = sigbus::arm(mem);
        let mut written = check_range(mem, addr, FAULT_RECORD_SIZE, Access::Write)
            .map_err(FaultLogError::Unwritable)
            .and_then(|()| {
                mem.write_slice(&fault.record(seq).encode(), GuestAddress(addr))
                    .map_err(|_| FaultLogError::Unwritable(addr))
            })
            .and_then(|()| {
                // Memory only the client reaches (see `core::remote`).
                remote::sync_out(mem, addr, FAULT_RECORD_SIZE).map_err(FaultLogError::Unwritable)
            });
        if let Some(page) = sigbus::take_fault() {
            // The record went to a page that replaced the lost one.
            sigbus::lose(mem, page);
            written = Err(FaultLogError::Lost(addr));
        } else if written.is_ok() && bus::is_lost_at(mem, addr) {
            // Lost by another thread while this one wrote it.
            written = Err(FaultLogError::Lost(addr));
        }
        drop(armed);
        if let Err(e) = written {
            warn!(error = %e, "guest error: fault record not written");
            r.dropped += 1;
            r.status |= FLOG_STATUS_ERROR;
            return (seq, None);
        }
        // The record is complete before the head moves past it.
        fence(Ordering::Release);
        r.head = next;
        let vector = r.vector;
        drop(r);
        irq.trigger(vector);
        (seq, Some(vector))
    }

    /// Totals for the inspector.
    pub fn stats(&self) -> FaultStats {
        let r = self.lock();
        FaultStats {
            count: r.count,
            dropped: r.dropped,
        }
    }

    /// Back to the reset state: disabled, registers 0, vector the default.
    pub fn reset(&self) {
        *self.lock() = Regs::new(self.default_vector);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_carries_every_field() {
        let f = Fault {
            reason: FAULT_PERMISSION,
            access: ACCESS_WRITE | ACCESS_PAGE_WALK,
            domain: 0x1234,
            queue: 3,
            iova: 0x1122_3344_5566_7788,
            info: 0xdead_beef,
            level: 2,
        };
        let r = FaultRecord::decode(&f.record(0x0102_0304).encode());
        let back = Fault {
            reason: r.reason,
            access: r.access,
            domain: r.domain,
            queue: r.queue,
            iova: r.iova,
            info: r.info,
            level: r.level,
        };
        assert_eq!(back, f);
        assert_eq!((r.seq, r.reserved), (0x0102_0304, 0));
    }

    #[test]
    fn enable_checks_base_and_size() {
        let log = FaultLog::new(4, 5);
        for (base, size) in [
            (0x1010, 8),
            (0x1000, 3),
            (0x1000, 0),
            (0x1000, 8192),
            (u64::MAX - 31, 4),
        ] {
            log.write(REG_FLOG_BASE_LO, base as u32);
            log.write(REG_FLOG_BASE_HI, (base >> 32) as u32);
            log.write(REG_FLOG_SIZE, size);
            log.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
            assert_eq!(log.read(REG_FLOG_CTRL), 0, "base {base:#x} size {size}");
            assert_eq!(log.read(REG_FLOG_STATUS), FLOG_STATUS_ERROR);
            log.write(REG_FLOG_STATUS, FLOG_STATUS_ERROR);
            assert_eq!(log.read(REG_FLOG_STATUS), 0);
        }
        log.write(REG_FLOG_BASE_HI, 0);
        log.write(REG_FLOG_BASE_LO, 0x1000);
        log.write(REG_FLOG_SIZE, 2);
        log.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        assert_eq!(log.read(REG_FLOG_CTRL), FLOG_CTRL_ENABLE);
        log.write(REG_FLOG_SIZE, 4);
        assert_eq!(log.read(REG_FLOG_SIZE), 2, "size is fixed while enabled");
        assert_eq!(log.read(REG_FLOG_MSIX_VECTOR), 4);
        log.write(REG_FLOG_MSIX_VECTOR, 5);
        assert_eq!(
            log.read(REG_FLOG_MSIX_VECTOR),
            4,
            "vector out of range ignored"
        );
        log.reset();
        assert_eq!(log.read(REG_FLOG_BASE_LO), 0);
        assert_eq!(log.read(REG_FLOG_CTRL), 0);
    }

    use crate::irq::RecordingInterrupts;

    /// Bus memory of the ring tests: 64 KiB at 0.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap()
    }

    /// Program the log at `base` with `size` records and try to enable it.
    fn configure(log: &FaultLog, base: u64, size: u32) {
        log.write(REG_FLOG_BASE_LO, base as u32);
        log.write(REG_FLOG_BASE_HI, (base >> 32) as u32);
        log.write(REG_FLOG_SIZE, size);
        log.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
    }

    fn fault(iova: u64) -> Fault {
        Fault {
            reason: FAULT_NOT_PRESENT,
            access: ACCESS_WRITE,
            domain: 1,
            queue: 2,
            iova,
            info: 0,
            level: 1,
        }
    }

    /// The record in slot `slot` of a ring at `base`.
    fn record_at(mem: &GuestMemoryMmap, base: u64, slot: u64) -> FaultRecord {
        let mut raw = [0u8; FAULT_RECORD_SIZE as usize];
        mem.read_slice(&mut raw, GuestAddress(base + slot * FAULT_RECORD_SIZE))
            .unwrap();
        FaultRecord::decode(&raw)
    }

    #[test]
    fn base_halves_read_back_and_each_write_keeps_the_other_half() {
        let log = FaultLog::new(0, 1);
        log.write(REG_FLOG_BASE_LO, 0x1234_5680);
        log.write(REG_FLOG_BASE_HI, 0x0000_abcd);
        assert_eq!(log.read(REG_FLOG_BASE_LO), 0x1234_5680);
        assert_eq!(log.read(REG_FLOG_BASE_HI), 0x0000_abcd);
        log.write(REG_FLOG_BASE_LO, 0x8765_4320);
        assert_eq!(log.read(REG_FLOG_BASE_HI), 0x0000_abcd, "LO keeps HI");
        log.write(REG_FLOG_BASE_HI, 0x0000_0001);
        assert_eq!(log.read(REG_FLOG_BASE_LO), 0x8765_4320, "HI keeps LO");
        log.write(REG_FLOG_SIZE, 4);
        log.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        assert_eq!(log.read(REG_FLOG_CTRL), FLOG_CTRL_ENABLE);
        log.write(REG_FLOG_BASE_LO, 0);
        log.write(REG_FLOG_BASE_HI, 0);
        assert_eq!(
            (log.read(REG_FLOG_BASE_LO), log.read(REG_FLOG_BASE_HI)),
            (0x8765_4320, 1),
            "the base is fixed while enabled"
        );
        // Disabled again, the base can be changed.
        log.write(REG_FLOG_CTRL, 0);
        assert_eq!(log.read(REG_FLOG_CTRL), 0);
        log.write(REG_FLOG_BASE_HI, 0);
        assert_eq!(log.read(REG_FLOG_BASE_HI), 0);
    }

    #[test]
    fn ring_may_end_at_the_last_bus_byte_but_not_past_it() {
        let ok = |base: u64, size: u32| {
            let mut r = Regs::new(0);
            (r.base, r.size) = (base, size);
            r.check()
        };
        let ring = |size: u32| u64::from(size) * FAULT_RECORD_SIZE;
        // Ending exactly at 2^64 - 1 is fine; one record higher wraps.
        assert_eq!(ok(0u64.wrapping_sub(ring(4)), 4), Ok(()));
        let high = 0u64.wrapping_sub(ring(4)) + FAULT_RECORD_SIZE;
        assert_eq!(ok(high, 4), Err(FaultLogError::Wraps(high)));
        let top = 0u64.wrapping_sub(ring(FAULT_LOG_MAX));
        assert_eq!(ok(top, FAULT_LOG_MAX), Ok(()));
        assert_eq!(
            ok(top + FAULT_RECORD_SIZE, FAULT_LOG_MAX),
            Err(FaultLogError::Wraps(top + FAULT_RECORD_SIZE))
        );
        // Sizes: powers of two from 2 to FAULT_LOG_MAX.
        for size in [2, 4, FAULT_LOG_MAX / 2, FAULT_LOG_MAX] {
            assert_eq!(ok(0x1000, size), Ok(()), "size {size}");
        }
        for size in [0, 1, 3, 6, FAULT_LOG_MAX - 1, FAULT_LOG_MAX * 2, u32::MAX] {
            assert_eq!(ok(0x1000, size), Err(FaultLogError::BadSize(size)));
        }
        // Alignment: the record size.
        assert_eq!(ok(0x1000 + 16, 2), Err(FaultLogError::Misaligned(0x1010)));
        assert_eq!(ok(0x1000 + FAULT_RECORD_SIZE, 2), Ok(()));
        // Through the registers: the top ring enables, without an error.
        let log = FaultLog::new(0, 1);
        configure(&log, 0u64.wrapping_sub(ring(2)), 2);
        assert_eq!(log.read(REG_FLOG_CTRL), FLOG_CTRL_ENABLE);
        assert_eq!(log.read(REG_FLOG_STATUS), 0);
    }

    #[test]
    fn status_write_clears_only_the_bits_written() {
        let (mem, irq) = (memory(), RecordingInterrupts::new());
        let log = FaultLog::new(3, 4);
        // ERROR: a refused enable; OVERFLOW: a full ring of 2 (one record fits).
        configure(&log, 0x1010, 2);
        configure(&log, 0x1000, 2);
        log.report(&mem, &irq, &fault(0x5000));
        log.report(&mem, &irq, &fault(0x6000));
        let all = FLOG_STATUS_OVERFLOW | FLOG_STATUS_ERROR | FLOG_STATUS_PENDING;
        assert_eq!(log.read(REG_FLOG_STATUS), all);
        // PENDING is computed: writing it changes nothing.
        log.write(REG_FLOG_STATUS, FLOG_STATUS_PENDING);
        assert_eq!(log.read(REG_FLOG_STATUS), all);
        log.write(REG_FLOG_STATUS, FLOG_STATUS_OVERFLOW);
        assert_eq!(
            log.read(REG_FLOG_STATUS),
            FLOG_STATUS_ERROR | FLOG_STATUS_PENDING
        );
        log.write(REG_FLOG_STATUS, FLOG_STATUS_ERROR);
        assert_eq!(log.read(REG_FLOG_STATUS), FLOG_STATUS_PENDING);
        // And the other way round.
        log.report(&mem, &irq, &fault(0x7000));
        log.write(REG_FLOG_CTRL, 0);
        configure(&log, 0x1008, 2);
        assert_eq!(
            log.read(REG_FLOG_STATUS),
            FLOG_STATUS_OVERFLOW | FLOG_STATUS_ERROR | FLOG_STATUS_PENDING
        );
        log.write(REG_FLOG_STATUS, FLOG_STATUS_ERROR);
        assert_eq!(
            log.read(REG_FLOG_STATUS),
            FLOG_STATUS_OVERFLOW | FLOG_STATUS_PENDING
        );
        // Enabling starts the ring over (nothing pending); OVERFLOW stays until cleared.
        configure(&log, 0x1000, 2);
        assert_eq!(log.read(REG_FLOG_STATUS), FLOG_STATUS_OVERFLOW);
        log.write(REG_FLOG_STATUS, FLOG_STATUS_OVERFLOW);
        assert_eq!(log.read(REG_FLOG_STATUS), 0);
        // Consuming a record clears PENDING.
        log.report(&mem, &irq, &fault(0x8000));
        assert_eq!(log.read(REG_FLOG_STATUS), FLOG_STATUS_PENDING);
        log.write(REG_FLOG_TAIL, 1);
        assert_eq!(log.read(REG_FLOG_STATUS), 0);
    }

    #[test]
    fn records_fill_the_ring_in_order_and_wrap() {
        let (mem, irq) = (memory(), RecordingInterrupts::new());
        let base = 0x2000;
        let log = FaultLog::new(3, 4);
        log.write(REG_FLOG_MSIX_VECTOR, 2);
        configure(&log, base, 4);
        // Three records fit in a ring of four (head + 1 == tail is full).
        for i in 0..3u64 {
            assert_eq!(log.report(&mem, &irq, &fault(0x1000 * i)).0, i as u32);
            assert_eq!(log.read(REG_FLOG_HEAD), i as u32 + 1);
        }
        assert_eq!(irq.take(), vec![2, 2, 2]);
        for i in 0..3u64 {
            let r = record_at(&mem, base, i);
            assert_eq!((r.iova, r.seq), (0x1000 * i, i as u32), "record {i}");
            assert_eq!(
                (r.reason, r.access, r.domain, r.queue, r.level),
                (FAULT_NOT_PRESENT, ACCESS_WRITE, 1, 2, 1)
            );
        }
        assert_eq!(record_at(&mem, base, 3), FaultRecord::decode(&[0; 32]));
        // Full: counted, dropped, flagged, no interrupt, the head stays.
        assert_eq!(log.report(&mem, &irq, &fault(0x9000)).0, 3);
        assert_eq!(log.read(REG_FLOG_HEAD), 3);
        assert!(irq.take().is_empty());
        assert_eq!(
            (log.read(REG_FLOG_COUNT), log.read(REG_FLOG_DROPPED)),
            (4, 1)
        );
        assert_eq!(
            log.stats(),
            FaultStats {
                count: 4,
                dropped: 1
            }
        );
        assert_ne!(log.read(REG_FLOG_STATUS) & FLOG_STATUS_OVERFLOW, 0);
        // The driver consumes two: the next record goes to slot 3, then the head wraps to 0.
        log.write(REG_FLOG_TAIL, 2);
        assert_eq!(log.read(REG_FLOG_TAIL), 2);
        assert_eq!(log.report(&mem, &irq, &fault(0xa000)).0, 4);
        assert_eq!(log.read(REG_FLOG_HEAD), 0);
        assert_eq!(log.report(&mem, &irq, &fault(0xb000)).0, 5);
        assert_eq!(log.read(REG_FLOG_HEAD), 1);
        assert_eq!(irq.take(), vec![2, 2]);
        assert_eq!(
            (record_at(&mem, base, 3).iova, record_at(&mem, base, 3).seq),
            (0xa000, 4)
        );
        assert_eq!(
            (record_at(&mem, base, 0).iova, record_at(&mem, base, 0).seq),
            (0xb000, 5)
        );
        // Nothing was written outside the ring.
        assert_eq!(record_at(&mem, base, 4), FaultRecord::decode(&[0; 32]));
        // Now full again (head 1 + 1 == tail 2).
        log.report(&mem, &irq, &fault(0xc000));
        assert_eq!(
            (log.read(REG_FLOG_HEAD), log.read(REG_FLOG_DROPPED)),
            (1, 2)
        );
    }

    #[test]
    fn tail_must_be_inside_an_enabled_ring() {
        let log = FaultLog::new(0, 1);
        log.write(REG_FLOG_SIZE, 8);
        log.write(REG_FLOG_TAIL, 3);
        assert_eq!(log.read(REG_FLOG_TAIL), 0, "ignored while disabled");
        configure(&log, 0x1000, 8);
        log.write(REG_FLOG_TAIL, 7);
        assert_eq!(log.read(REG_FLOG_TAIL), 7);
        log.write(REG_FLOG_TAIL, 8);
        assert_eq!(log.read(REG_FLOG_TAIL), 7, "past the ring: ignored");
        // Re-enabling starts the ring over.
        log.write(REG_FLOG_CTRL, 0);
        log.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        assert_eq!((log.read(REG_FLOG_HEAD), log.read(REG_FLOG_TAIL)), (0, 0));
        // Enable while enabled changes nothing.
        log.write(REG_FLOG_TAIL, 5);
        log.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        assert_eq!(log.read(REG_FLOG_TAIL), 5);
        // Read-only and unknown registers.
        log.write(REG_FLOG_HEAD, 4);
        log.write(REG_FLOG_COUNT, 4);
        assert_eq!((log.read(REG_FLOG_HEAD), log.read(REG_FLOG_COUNT)), (0, 0));
        assert_eq!(log.read(REG_FLOG_BASE_LO + 0x40), 0);
    }

    #[test]
    fn faults_without_a_log_or_with_an_unwritable_ring_are_counted_and_dropped() {
        let (mem, irq) = (memory(), RecordingInterrupts::new());
        let log = FaultLog::new(3, 4);
        assert_eq!(log.report(&mem, &irq, &fault(0x1000)).0, 0);
        assert_eq!(
            (log.read(REG_FLOG_COUNT), log.read(REG_FLOG_DROPPED)),
            (1, 1)
        );
        assert_eq!(log.read(REG_FLOG_STATUS), 0, "disabled: no error");
        // A ring outside bus memory: the record is not written, the head stays.
        configure(&log, 0x10_0000, 4);
        assert_eq!(log.read(REG_FLOG_CTRL), FLOG_CTRL_ENABLE);
        assert_eq!(log.report(&mem, &irq, &fault(0x2000)).0, 1);
        assert_eq!(log.read(REG_FLOG_HEAD), 0);
        assert_eq!(log.read(REG_FLOG_STATUS), FLOG_STATUS_ERROR);
        assert_eq!(
            (log.read(REG_FLOG_COUNT), log.read(REG_FLOG_DROPPED)),
            (2, 2)
        );
        assert!(irq.take().is_empty());
        // A ring whose second record is past the end of bus memory.
        log.write(REG_FLOG_CTRL, 0);
        configure(&log, 0x1_0000 - FAULT_RECORD_SIZE, 4);
        log.report(&mem, &irq, &fault(0x3000));
        assert_eq!(log.read(REG_FLOG_HEAD), 1);
        assert_eq!(irq.take(), vec![3]);
        log.report(&mem, &irq, &fault(0x4000));
        assert_eq!(log.read(REG_FLOG_HEAD), 1);
        assert!(irq.take().is_empty());
        assert_eq!(log.read(REG_FLOG_DROPPED), 3);
    }

    /// A tracing subscriber counting WARN events (installed for one test's thread).
    struct CountWarnings(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl tracing::Subscriber for CountWarnings {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            if *event.metadata().level() == tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A guest can fault at will: the first 16 faults and then every 2^n-th are logged as
    /// warnings, the others at debug level only (every one is counted).
    #[test]
    fn fault_warnings_are_rate_limited() {
        let (mem, irq) = (memory(), RecordingInterrupts::new());
        let log = FaultLog::new(0, 1);
        let warnings = std::sync::Arc::default();
        let subscriber = CountWarnings(std::sync::Arc::clone(&warnings));
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..70 {
                log.report(&mem, &irq, &fault(i * 0x1000));
            }
        });
        // 1..=16, 32 and 64.
        assert_eq!(warnings.load(Ordering::Relaxed), 18);
        assert_eq!(
            log.stats(),
            FaultStats {
                count: 70,
                dropped: 70
            }
        );
    }

    #[test]
    fn vector_takes_every_allocated_vector() {
        let log = FaultLog::new(0, 3);
        log.write(REG_FLOG_MSIX_VECTOR, 2);
        assert_eq!(log.read(REG_FLOG_MSIX_VECTOR), 2);
        log.write(REG_FLOG_MSIX_VECTOR, 0x1_0000);
        assert_eq!(log.read(REG_FLOG_MSIX_VECTOR), 2, "not a u16: ignored");
        log.reset();
        assert_eq!(log.read(REG_FLOG_MSIX_VECTOR), 0, "reset: the default");
    }

    #[test]
    fn translation_faults_in_the_walk_carry_the_page_walk_flag() {
        let t = TranslationFault {
            reason: FAULT_OUTSIDE_RAM,
            iova: 0x1234,
            info: 0x10_0000,
            level: 3,
            in_walk: true,
        };
        let f = Fault::from_translation(t, ACCESS_WRITE, 5, 6);
        assert_eq!(
            f,
            Fault {
                reason: FAULT_OUTSIDE_RAM,
                access: ACCESS_WRITE | ACCESS_PAGE_WALK,
                domain: 5,
                queue: 6,
                iova: 0x1234,
                info: 0x10_0000,
                level: 3,
            }
        );
        let f = Fault::from_translation(
            TranslationFault {
                in_walk: false,
                ..t
            },
            ACCESS_WRITE,
            5,
            6,
        );
        assert_eq!(f.access, ACCESS_WRITE);
    }
}
