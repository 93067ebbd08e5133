//! The page walker: 4 levels of 4 KiB tables (512 little-endian u64 entries) at bus
//! addresses, as SPEC.md "I/O page tables" defines them.
//!
//! Every entry is read through `vm-memory` after [`check_range`] said the 8 bytes are mapped
//! for reading, with one atomic 8-byte load (a driver rewriting an entry concurrently is
//! seen before or after, never torn). The walk has exactly as many steps as levels, so a
//! hostile table (pointing at itself, outside bus memory, full of garbage) ends in a fault
//! or a mapping after at most four reads. No arithmetic on a guest value can overflow: table
//! and page addresses are masked to bits 51:12 and combined with in-table offsets by `|`.

use std::sync::atomic::Ordering;

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::core::bus::{check_range, Access};
use crate::spec::*;

/// Size of a 4 KiB page.
pub(crate) const SIZE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page.
pub(crate) const SIZE_2M: u64 = 1 << 21;
/// Size of a 1 GiB page.
pub(crate) const SIZE_1G: u64 = 1 << 30;

/// Number of levels; the root is level 4.
const LEVELS: u32 = 4;
/// Index bits per level.
const INDEX_BITS: u32 = 9;
/// Bits of the offset inside a 4 KiB page.
const PAGE_SHIFT: u32 = 12;

/// What a successful walk found for an IOVA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leaf {
    /// The IOVA rounded down to the page (of `size`).
    pub iova_page: u64,
    /// Bus address of the page (aligned to `size`).
    pub bus_page: u64,
    /// Page size: [`SIZE_4K`], [`SIZE_2M`] or [`SIZE_1G`].
    pub size: u64,
    /// `PTE_R | PTE_W` ANDed over every level walked.
    pub perm: u64,
}

impl Leaf {
    /// Whether the mapping allows `access`.
    pub fn allows(&self, access: Access) -> bool {
        self.perm & perm_bit(access) != 0
    }
}

/// The PTE bit an access needs.
pub(crate) fn perm_bit(access: Access) -> u64 {
    match access {
        Access::Read => PTE_R,
        Access::Write => PTE_W,
    }
}

/// Why a walk failed (the IOVA is added by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalkFault {
    /// `FAULT_NOT_PRESENT`, `FAULT_MALFORMED_ENTRY` or `FAULT_OUTSIDE_RAM`.
    pub reason: u8,
    /// The malformed entry, or the bus address of the table that could not be read, else 0.
    pub info: u64,
    /// Level of the table whose entry faulted (4..1).
    pub level: u32,
    /// The entry itself could not be read (its table is outside bus memory).
    pub in_walk: bool,
}

/// Index of `iova` in a table of `level` (4..1).
fn index(iova: u64, level: u32) -> u64 {
    (iova >> (PAGE_SHIFT + INDEX_BITS * (level - 1))) & ((1 << INDEX_BITS) - 1)
}

/// Read entry `index` of the table of `level` at bus address `table` (4 KiB aligned). When
/// the entry's 8 bytes are not mapped for reading the fault carries the table's address
/// (SPEC.md: "with the table's bus address in the record's info field").
fn read_entry(mem: &GuestMemoryMmap, table: u64, index: u64, level: u32) -> Result<u64, WalkFault> {
    let outside = WalkFault {
        reason: FAULT_OUTSIDE_RAM,
        info: table,
        level,
        in_walk: true,
    };
    let addr = table | (index * 8);
    check_range(mem, addr, 8, Access::Read).map_err(|_| outside)?;
    // The range check passed, so the region exists and holds all 8 bytes; a failure here
    // (a region refusing the access some other way) is treated as unmapped memory.
    let region = mem.find_region(GuestAddress(addr)).ok_or(outside)?;
    let offset = MemoryRegionAddress(addr - region.start_addr().0);
    region
        .load::<u64>(offset, Ordering::Acquire)
        .map(u64::from_le)
        .map_err(|_| outside)
}

/// Walk the table rooted at bus address `root` (bits 11:0 ignored) for `iova`.
///
/// The caller has checked `iova` against the IOVA width; bits above 47 are not looked at.
pub(crate) fn walk(mem: &GuestMemoryMmap, root: u64, iova: u64) -> Result<Leaf, WalkFault> {
    let mut table = root & !(SIZE_4K - 1);
    let mut perm = PTE_R | PTE_W;
    let mut level = LEVELS;
    loop {
        let entry = read_entry(mem, table, index(iova, level), level)?;
        let fault = |reason, info| WalkFault {
            reason,
            info,
            level,
            in_walk: false,
        };
        if entry & (PTE_R | PTE_W) == 0 {
            return Err(fault(FAULT_NOT_PRESENT, 0));
        }
        let large = entry & PTE_PS != 0;
        if entry & PTE_RESERVED_MASK != 0 || (large && (level == 4 || level == 1)) {
            return Err(fault(FAULT_MALFORMED_ENTRY, entry));
        }
        perm &= entry;
        let addr = entry & PTE_ADDR_MASK;
        let size = match (level, large) {
            (1, _) => SIZE_4K,
            (2, true) => SIZE_2M,
            (3, true) => SIZE_1G,
            // A table pointer at level 4, 3 or 2: one level down (level 1 never gets here).
            _ => {
                table = addr;
                level -= 1;
                continue;
            }
        };
        if addr & (size - 1) != 0 {
            return Err(fault(FAULT_MALFORMED_ENTRY, entry));
        }
        return Ok(Leaf {
            iova_page: iova & !(size - 1),
            bus_page: addr,
            size,
            perm,
        });
    }
}
