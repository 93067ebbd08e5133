//! DMA domains: I/O page tables, the IOTLB, invalidation and strict mode.
//!
//! API contract used by the engine (see SPEC.md, "I/O page tables", "IOTLB"):
//! - [`Mmu::translate`] turns an IOVA of a domain into a bus address for one access, with
//!   how many bytes from there stay inside the same page of the mapping (so the engine can
//!   split transfers at page boundaries of whichever mapping size applies);
//! - the engine holds [`Mmu::chunk_gate`] (a read guard) while it translates and moves one
//!   chunk; [`Mmu::invalidate`] drops entries and then takes the write side, so when it
//!   returns no chunk that used a dropped entry is still moving.
//!
//! STATUS: interface stub. Pass-through domains work; translated domains fault NOT_PRESENT
//! until the page walker and IOTLB land.

use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};

use vm_memory::GuestMemoryMmap;

use super::bus::Access;
use super::stats::{DomainCounters, DomainStats};
use crate::spec::*;

/// An invalidation command (`REG_INV_CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Every entry.
    All,
    /// Every entry of a domain.
    Domain(u16),
    /// Entries of a domain whose page overlaps `[iova, iova + len)`.
    Range {
        /// The domain.
        domain: u16,
        /// First IOVA.
        iova: u64,
        /// Length in bytes (not 0).
        len: u64,
    },
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Bus address of the IOVA.
    pub bus: u64,
    /// Bytes from the IOVA to the end of its page (for pass-through: to the end of the IOVA
    /// space). Never 0.
    pub len: u64,
    /// Size of the mapping page: 4 KiB, 2 MiB or 1 GiB (0 for pass-through).
    pub page_size: u64,
}

/// A failed translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TranslationFault {
    /// `FAULT_*` reason.
    pub reason: u8,
    /// The IOVA that failed.
    pub iova: u64,
    /// Detail: the offending entry (malformed), the bus address (outside RAM), else 0.
    pub info: u64,
    /// Page-table level of the fault (4..1), 0 if not in a walk.
    pub level: u32,
    /// The fault happened reading a page-table entry.
    pub in_walk: bool,
}

/// Register state of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainRegs {
    /// Root table bus address as written (bits 11:0 ignored when walking).
    pub root: u64,
    /// `DOMAIN_MODE_*` as written (bits 1:0 of `D_CTRL`).
    pub mode: u32,
}

/// The device's domains and IOTLB.
#[derive(Debug)]
pub struct Mmu {
    iova_width: u32,
    strict: bool,
    iotlb_capacity: usize,
    domains: Mutex<Vec<DomainRegs>>,
    counters: Vec<DomainCounters>,
    gate: RwLock<()>,
}

fn reset_regs(d: usize) -> DomainRegs {
    DomainRegs {
        root: 0,
        mode: if d == 0 {
            DOMAIN_MODE_PASSTHROUGH
        } else {
            DOMAIN_MODE_DISABLED
        },
    }
}

impl Mmu {
    /// An MMU with `domains` domains in their reset state.
    pub fn new(domains: u16, iova_width: u32, iotlb_entries: usize, strict: bool) -> Self {
        Self {
            iova_width,
            strict,
            iotlb_capacity: iotlb_entries,
            domains: Mutex::new((0..usize::from(domains)).map(reset_regs).collect()),
            counters: (0..domains).map(|_| DomainCounters::default()).collect(),
            gate: RwLock::new(()),
        }
    }

    /// Number of domains.
    pub fn num_domains(&self) -> u16 {
        self.counters.len() as u16
    }

    /// IOVA width in bits.
    pub fn iova_width(&self) -> u32 {
        self.iova_width
    }

    /// Whether strict IOTLB mode is on.
    pub fn strict(&self) -> bool {
        self.strict
    }

    /// IOTLB capacity in entries.
    pub fn iotlb_capacity(&self) -> usize {
        self.iotlb_capacity
    }

    /// Entries currently cached.
    pub fn iotlb_len(&self) -> usize {
        0
    }

    /// Register state of domain `d` (None if it does not exist).
    pub fn domain(&self, d: u16) -> Option<DomainRegs> {
        self.domains
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(usize::from(d))
            .copied()
    }

    /// Update domain `d`'s registers. Takes effect for new walks; the IOTLB is not flushed.
    pub fn set_domain(&self, d: u16, regs: DomainRegs) {
        if let Some(slot) = self
            .domains
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(usize::from(d))
        {
            *slot = regs;
        }
    }

    /// Translate `iova` of domain `d` for one access.
    pub fn translate(
        &self,
        mem: &GuestMemoryMmap,
        d: u16,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        let _ = (mem, access);
        let fault = |reason| TranslationFault {
            reason,
            iova,
            info: 0,
            level: 0,
            in_walk: false,
        };
        let limit = if self.iova_width >= 64 {
            u64::MAX
        } else {
            (1u64 << self.iova_width) - 1
        };
        if iova > limit {
            return Err(fault(FAULT_IOVA_WIDTH));
        }
        match self.domain(d).map(|r| r.mode & 3) {
            Some(DOMAIN_MODE_PASSTHROUGH) => Ok(Translation {
                bus: iova,
                len: (limit - iova).saturating_add(1),
                page_size: 0,
            }),
            Some(DOMAIN_MODE_TRANSLATED) => Err(fault(FAULT_NOT_PRESENT)),
            _ => Err(fault(FAULT_DOMAIN_DISABLED)),
        }
    }

    /// The read side of the chunk gate; hold it while translating and moving one chunk.
    pub fn chunk_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drop IOTLB entries; returns once no chunk that used them is still moving. Returns
    /// false (and does nothing) for a domain that does not exist or a range of length 0.
    pub fn invalidate(&self, inv: Invalidation) -> bool {
        let ok = match inv {
            Invalidation::All => true,
            Invalidation::Domain(d) => d < self.num_domains(),
            Invalidation::Range { domain, len, .. } => domain < self.num_domains() && len != 0,
        };
        if ok {
            drop(self.gate.write().unwrap_or_else(PoisonError::into_inner));
        }
        ok
    }

    /// Counters of domain `d`.
    pub fn counters(&self, d: u16) -> Option<&DomainCounters> {
        self.counters.get(usize::from(d))
    }

    /// Snapshot of every domain's counters.
    pub fn stats(&self) -> Vec<DomainStats> {
        self.counters.iter().map(DomainCounters::snapshot).collect()
    }

    /// Reset: domains to their reset state, IOTLB empty, counters zero.
    pub fn reset(&self) {
        let mut domains = self.domains.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, d) in domains.iter_mut().enumerate() {
            *d = reset_regs(i);
        }
        self.counters.iter().for_each(DomainCounters::clear);
    }
}
