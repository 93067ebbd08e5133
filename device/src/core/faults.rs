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

use super::bus::{check_range, Access};
use super::mmu::TranslationFault;
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
    /// The record's bus address is not mapped writable for the device.
    #[error("fault record at bus address {0:#x} is not writable")]
    Unwritable(u64),
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
    /// advance the head and raise the fault vector. Returns the fault's sequence number.
    pub fn report(&self, mem: &GuestMemoryMmap, irq: &dyn InterruptSink, fault: &Fault) -> u32 {
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
            return seq;
        }
        let next = (r.head + 1) & (r.size - 1);
        if next == r.tail {
            r.dropped += 1;
            r.status |= FLOG_STATUS_OVERFLOW;
            if loud {
                warn!(seq, "fault log full; fault dropped");
            }
            return seq;
        }
        // Cannot overflow: enabling checked base + size * record size.
        let addr = r.base + u64::from(r.head) * FAULT_RECORD_SIZE;
        let written = check_range(mem, addr, FAULT_RECORD_SIZE, Access::Write)
            .map_err(FaultLogError::Unwritable)
            .and_then(|()| {
                mem.write_slice(&fault.record(seq).encode(), GuestAddress(addr))
                    .map_err(|_| FaultLogError::Unwritable(addr))
            });
        if let Err(e) = written {
            warn!(error = %e, "guest error: fault record not written");
            r.dropped += 1;
            r.status |= FLOG_STATUS_ERROR;
            return seq;
        }
        // The record is complete before the head moves past it.
        fence(Ordering::Release);
        r.head = next;
        let vector = r.vector;
        drop(r);
        irq.trigger(vector);
        seq
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
}
