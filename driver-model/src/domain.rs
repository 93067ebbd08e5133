//! DMA domains: programming a domain's registers, IOTLB invalidation, and [`Domain`], a
//! translated domain with its own I/O page table.
//!
//! Protocol (device/SPEC.md "Domain registers", "IOTLB"):
//! - a domain is set up with `D_ROOT_LO/HI` (the level-4 table's bus address) and `D_CTRL`
//!   (the mode); after reset domain 0 is pass-through and the others are disabled;
//! - changing a root, a mode or an existing page-table entry reaches the device only after
//!   an invalidation: program `REG_INV_DOMAIN` (and `REG_INV_ADDR_*`/`REG_INV_LEN_*` for a
//!   range), write the command to `REG_INV_CMD`, wait for `INV_STATUS_BUSY` to clear. Then
//!   every chunk that used a dropped translation has finished, and the memory may be
//!   reused;
//! - mapping a range that was not mapped needs no invalidation (faults are not cached).

use std::time::{Duration, Instant};

use domdma_device::spec;

use crate::backend::{BackendError, BackendRef, DmaBackend, DmaBuffer};
use crate::iopt::{IoPageTable, IoptError, PageSize, Perm};

/// How long [`Domain`] waits for an invalidation by default.
pub const DEFAULT_INVALIDATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of domain programming.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// The back end failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The page-table builder refused.
    #[error(transparent)]
    PageTable(#[from] IoptError),
    /// A domain the device does not have.
    #[error("domain {domain} does not exist (the device has {domains})")]
    NoSuchDomain {
        /// The domain asked for.
        domain: u32,
        /// How many the device has.
        domains: u32,
    },
    /// The device rejected an invalidation (`INV_STATUS_ERROR`).
    #[error("invalidation {inv:?} rejected (REG_INV_STATUS {status:#x})")]
    InvalidationRejected {
        /// The invalidation.
        inv: Invalidation,
        /// `REG_INV_STATUS`.
        status: u32,
    },
    /// The invalidation did not complete in time.
    #[error(
        "invalidation {inv:?} still busy after {waited:?} (REG_INV_STATUS {status:#x}, \
         REG_INV_SEQ {seq})"
    )]
    InvalidationTimeout {
        /// The invalidation.
        inv: Invalidation,
        /// How long it was waited for.
        waited: Duration,
        /// `REG_INV_STATUS` at the time.
        status: u32,
        /// `REG_INV_SEQ` at the time.
        seq: u32,
    },
    /// The domain did not take the mode written.
    #[error("domain {domain}: D_CTRL reads {got:#x} after writing mode {mode}")]
    ModeNotSet {
        /// The domain.
        domain: u32,
        /// The mode written.
        mode: u32,
        /// What `D_CTRL` reads.
        got: u32,
    },
}

/// The registers of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainRegs {
    /// `D_ROOT_HI:D_ROOT_LO`.
    pub root: u64,
    /// `D_CTRL` bits 1:0, `DOMAIN_MODE_*`.
    pub mode: u32,
}

/// Reads domain `d`'s registers.
pub fn read_domain(dev: &dyn DmaBackend, d: u32) -> Result<DomainRegs, BackendError> {
    let lo = dev.read32(spec::domain_reg(d, spec::D_ROOT_LO))?;
    let hi = dev.read32(spec::domain_reg(d, spec::D_ROOT_HI))?;
    let ctrl = dev.read32(spec::domain_reg(d, spec::D_CTRL))?;
    Ok(DomainRegs {
        root: u64::from(hi) << 32 | u64::from(lo),
        mode: ctrl & 3,
    })
}

/// Writes domain `d`'s root and then its mode. Does not invalidate.
pub fn write_domain(dev: &dyn DmaBackend, d: u32, regs: DomainRegs) -> Result<(), BackendError> {
    dev.write32(spec::domain_reg(d, spec::D_ROOT_LO), regs.root as u32)?;
    dev.write32(
        spec::domain_reg(d, spec::D_ROOT_HI),
        (regs.root >> 32) as u32,
    )?;
    dev.write32(spec::domain_reg(d, spec::D_CTRL), regs.mode)?;
    Ok(())
}

/// An IOTLB invalidation command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation {
    /// Every entry of every domain (`INV_CMD_ALL`).
    All,
    /// Every entry of a domain (`INV_CMD_DOMAIN`).
    Domain(u32),
    /// Entries of a domain whose page overlaps `[iova, iova + len)` (`INV_CMD_RANGE`).
    Range {
        /// The domain.
        domain: u32,
        /// First IOVA.
        iova: u64,
        /// Length in bytes (0 is rejected by the device).
        len: u64,
    },
}

/// Starts an invalidation and waits up to `timeout` for `INV_STATUS_BUSY` to clear.
/// Returns `REG_INV_SEQ` afterwards.
pub fn invalidate(
    dev: &dyn DmaBackend,
    inv: Invalidation,
    timeout: Duration,
) -> Result<u32, DomainError> {
    let cmd = match inv {
        Invalidation::All => spec::INV_CMD_ALL,
        Invalidation::Domain(d) => {
            dev.write32(spec::REG_INV_DOMAIN, d)?;
            spec::INV_CMD_DOMAIN
        }
        Invalidation::Range { domain, iova, len } => {
            dev.write32(spec::REG_INV_DOMAIN, domain)?;
            dev.write32(spec::REG_INV_ADDR_LO, iova as u32)?;
            dev.write32(spec::REG_INV_ADDR_HI, (iova >> 32) as u32)?;
            dev.write32(spec::REG_INV_LEN_LO, len as u32)?;
            dev.write32(spec::REG_INV_LEN_HI, (len >> 32) as u32)?;
            spec::INV_CMD_RANGE
        }
    };
    dev.write32(spec::REG_INV_CMD, cmd)?;
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let status = dev.read32(spec::REG_INV_STATUS)?;
        if status & spec::INV_STATUS_BUSY == 0 {
            if status & spec::INV_STATUS_ERROR != 0 {
                return Err(DomainError::InvalidationRejected { inv, status });
            }
            return Ok(dev.read32(spec::REG_INV_SEQ)?);
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(DomainError::InvalidationTimeout {
                inv,
                waited,
                status,
                seq: dev.read32(spec::REG_INV_SEQ)?,
            });
        }
        spins += 1;
        if spins > 64 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// Sets domain `d` to pass-through (IOVA = bus address) and invalidates it.
pub fn set_passthrough(dev: &dyn DmaBackend, d: u32, timeout: Duration) -> Result<(), DomainError> {
    set_untranslated(dev, d, spec::DOMAIN_MODE_PASSTHROUGH, timeout)
}

/// Disables domain `d` (every DMA through it faults) and invalidates it.
pub fn disable_domain(dev: &dyn DmaBackend, d: u32, timeout: Duration) -> Result<(), DomainError> {
    set_untranslated(dev, d, spec::DOMAIN_MODE_DISABLED, timeout)
}

/// Sets domain `d` to `mode`, one without page tables (its root 0), and invalidates it.
fn set_untranslated(
    dev: &dyn DmaBackend,
    d: u32,
    mode: u32,
    timeout: Duration,
) -> Result<(), DomainError> {
    write_domain(dev, d, DomainRegs { root: 0, mode })?;
    invalidate(dev, Invalidation::Domain(d), timeout)?;
    Ok(())
}

/// A translated domain and its I/O page table.
///
/// Created enabled with an empty table; [`Domain::map`] adds mappings, [`Domain::unmap`]
/// removes them and invalidates. Dropping it disables the domain and invalidates it
/// before the tables' memory goes, so the device never walks freed tables.
pub struct Domain<'b> {
    dev: BackendRef<'b>,
    index: u32,
    table: IoPageTable<'b>,
    timeout: Duration,
}

impl std::fmt::Debug for Domain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("index", &self.index)
            .field("table", &self.table)
            .finish()
    }
}

impl<'b> Domain<'b> {
    /// Builds an empty page table for domain `index`, installs its root, sets the mode to
    /// translated and invalidates the domain. `iova_width` is the device's (`REG_CAP`).
    pub fn translated(
        dev: impl Into<BackendRef<'b>>,
        index: u32,
        iova_width: u32,
    ) -> Result<Self, DomainError> {
        let dev = dev.into();
        let domains = (dev.read32(spec::REG_CAP)? >> spec::CAP_DOMAINS_SHIFT) & 0xff;
        if index >= domains {
            return Err(DomainError::NoSuchDomain {
                domain: index,
                domains,
            });
        }
        let table = IoPageTable::new(dev.clone(), iova_width)?;
        let d = Domain {
            dev: dev.clone(),
            index,
            table,
            timeout: DEFAULT_INVALIDATION_TIMEOUT,
        };
        write_domain(
            &*dev,
            index,
            DomainRegs {
                root: d.table.root(),
                mode: spec::DOMAIN_MODE_TRANSLATED,
            },
        )?;
        let got = dev.read32(spec::domain_reg(index, spec::D_CTRL))? & 3;
        if got != spec::DOMAIN_MODE_TRANSLATED {
            return Err(DomainError::ModeNotSet {
                domain: index,
                mode: spec::DOMAIN_MODE_TRANSLATED,
                got,
            });
        }
        d.invalidate()?;
        Ok(d)
    }

    /// The domain's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The page table.
    pub fn table(&self) -> &IoPageTable<'b> {
        &self.table
    }

    /// The page table, for changes the caller invalidates itself (e.g. stale-translation
    /// tests, or raw entries).
    pub fn table_mut(&mut self) -> &mut IoPageTable<'b> {
        &mut self.table
    }

    /// How long invalidations are waited for.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Maps `[iova, iova + len)` to bus addresses `[bus, bus + len)` with leaves of `page`
    /// size. The range must not be mapped yet (so no invalidation is needed).
    pub fn map(
        &mut self,
        iova: u64,
        bus: u64,
        len: u64,
        perm: Perm,
        page: PageSize,
    ) -> Result<(), DomainError> {
        self.table.map(iova, bus, len, perm, page)?;
        Ok(())
    }

    /// Maps all of `buf` at `iova`, with the buffer's own page size (2 MiB leaves for a
    /// huge-page buffer when the IOVA is 2 MiB aligned, else 4 KiB leaves).
    pub fn map_buffer(
        &mut self,
        iova: u64,
        buf: &DmaBuffer,
        perm: Perm,
    ) -> Result<(), DomainError> {
        let max = if buf.page_size() >= PageSize::Size2M.bytes() as usize {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        self.table
            .map_auto(iova, buf.bus_addr(), buf.len() as u64, perm, max)?;
        Ok(())
    }

    /// Removes the mappings of `[iova, iova + len)` and invalidates the range; when it
    /// returns, the device no longer reaches the old pages.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<(), DomainError> {
        self.table.unmap(iova, len)?;
        self.invalidate_range(iova, len)
    }

    /// Invalidates the whole domain.
    pub fn invalidate(&self) -> Result<(), DomainError> {
        invalidate(&*self.dev, Invalidation::Domain(self.index), self.timeout)?;
        Ok(())
    }

    /// Invalidates `[iova, iova + len)` of the domain.
    pub fn invalidate_range(&self, iova: u64, len: u64) -> Result<(), DomainError> {
        invalidate(
            &*self.dev,
            Invalidation::Range {
                domain: self.index,
                iova,
                len,
            },
            self.timeout,
        )?;
        Ok(())
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        // Best effort: the device may have been reset or be gone.
        if let Err(e) = disable_domain(&*self.dev, self.index, self.timeout) {
            tracing::warn!(domain = self.index, "disabling the domain on drop: {e}");
        }
    }
}
