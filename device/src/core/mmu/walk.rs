//! The page walker: 4 levels of 4 KiB tables (512 little-endian u64 entries) at bus
//! addresses, as SPEC.md "I/O page tables" defines them.
//!
//! Every entry is read through `vm-memory` after [`check_range`] said the 8 bytes are mapped
//! for reading (or from the part of a cached level-1 table found mapped for reading with
//! one region lookup, [`L1Table`]), with one atomic 8-byte load (a driver rewriting an entry
//! concurrently is seen before or after, never torn). The walk has exactly as many steps as levels, so a
//! hostile table (pointing at itself, outside bus memory, full of garbage) ends in a fault
//! or a mapping after at most four reads. No arithmetic on a guest value can overflow: table
//! and page addresses are masked to bits 51:12 and combined with in-table offsets by `|`.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use crate::core::bus::{check_range, region_allows, Access};
use crate::spec::*;

/// Size of a 4 KiB page.
pub(crate) const SIZE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page.
pub(crate) const SIZE_2M: u64 = 1 << 21;
/// Size of a 1 GiB page.
pub(crate) const SIZE_1G: u64 = 1 << 30;

/// Number of levels; the root is level 4.
const LEVELS: u32 = 4;

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
    pte_index(iova, level) as u64
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

/// What one entry of a walk leads to.
enum Step {
    /// A leaf: the walk is done.
    Leaf(Leaf),
    /// A table of the next level down, and the permissions so far.
    Table(u64, u64),
}

/// Decode `entry`, read from the table of `level` for `iova`, with `perm` the permissions
/// ANDed over the levels above ([`Pte::decode_at`] is SPEC.md's rule).
#[inline(always)]
fn decode(entry: u64, level: u32, perm: u64, iova: u64) -> Result<Step, WalkFault> {
    let fault = |reason, info| WalkFault {
        reason,
        info,
        level,
        in_walk: false,
    };
    let pte = Pte(entry);
    match pte.decode_at(level) {
        Ok(PteKind::NotPresent) => Err(fault(FAULT_NOT_PRESENT, 0)),
        Err(_) => Err(fault(FAULT_MALFORMED_ENTRY, entry)),
        Ok(PteKind::Table(addr)) => Ok(Step::Table(addr, perm & pte.perm())),
        Ok(PteKind::Leaf(addr)) => {
            let size = level_size(level);
            Ok(Step::Leaf(Leaf {
                iova_page: iova & !(size - 1),
                bus_page: addr,
                size,
                perm: perm & pte.perm(),
            }))
        }
    }
}

/// Walk the table rooted at bus address `root` (bits 11:0 ignored) for `iova`.
///
/// The caller has checked `iova` against the IOVA width; bits above 47 are not looked at.
pub(crate) fn walk(mem: &GuestMemoryMmap, root: u64, iova: u64) -> Result<Leaf, WalkFault> {
    walk_from(mem, root, iova, None)
}

/// A level-1 table reached by an earlier walk: a paging-structure cache entry (as an IOMMU
/// keeps for non-leaf entries), so that the next 4 KiB page of the same 2 MiB IOVA range
/// walks with one entry read instead of four.
///
/// It caches the level-4, -3 and -2 entries on the way (the table's address and the
/// permissions they grant), for one root. Its owner ([`super::Translator`]) keeps it only
/// while no invalidation has happened (the IOTLB's generation is unchanged), so an
/// invalidation drops it as it drops leaf entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L1Table<'m> {
    /// Root the walk started from (4 KiB aligned).
    root: u64,
    /// `iova >> 21` of the IOVAs the table maps.
    range: u64,
    /// Bus address of the level-1 table.
    table: u64,
    /// `PTE_R | PTE_W` ANDed over levels 4..2.
    perm: u64,
    /// Host address of the table's first entry when it is mapped for reading and 8-byte
    /// aligned (found with one region lookup), else null.
    entries: *const AtomicU64,
    /// Entries readable from `entries` (0 to 512).
    readable: usize,
    /// The bus memory `entries` points into.
    mem: PhantomData<&'m GuestMemoryMmap>,
}

impl<'m> L1Table<'m> {
    fn new(mem: &'m GuestMemoryMmap, root: u64, iova: u64, table: u64, perm: u64) -> Self {
        let slice = mem.find_region(GuestAddress(table)).and_then(|region| {
            if !region_allows(region, Access::Read) {
                return None;
            }
            // `table` is in the region, so neither subtraction underflows.
            let avail = (region.last_addr().0 - table)
                .saturating_add(1)
                .min(SIZE_4K);
            let offset = MemoryRegionAddress(table - region.start_addr().0);
            region.get_slice(offset, avail as usize).ok()
        });
        // The pointer is the mapping's own address: vm-memory hands out plain pointers
        // (`ptr_guard`) because its `xen` feature, which maps on access, is off.
        let (entries, readable) = match slice {
            Some(s) if (s.ptr_guard().as_ptr() as usize) % 8 == 0 => {
                (s.ptr_guard().as_ptr() as *const AtomicU64, s.len() / 8)
            }
            _ => (std::ptr::null(), 0),
        };
        Self {
            root,
            range: iova >> 21,
            table,
            perm,
            entries,
            readable,
            mem: PhantomData,
        }
    }

    /// Whether this table is the level-1 table for `iova` under `root` (4 KiB aligned).
    #[inline(always)]
    pub fn covers(&self, root: u64, iova: u64) -> bool {
        self.root == root && self.range == iova >> 21
    }

    /// The 4 KiB page mapping `iova` (which this table covers) when its entry is in the
    /// readable part of the table and is a valid leaf (present, no reserved bit, no
    /// page-size bit); None for anything else, which a full decode then handles (a fault,
    /// or an entry outside the readable part). Gives exactly what [`walk`] gives then.
    #[inline(always)]
    pub fn leaf_4k(&self, iova: u64) -> Option<Leaf> {
        let pte = Pte(self.mapped(index(iova, 1))?);
        pte.is_plain().then_some(Leaf {
            iova_page: iova & !(SIZE_4K - 1),
            bus_page: pte.addr(),
            size: SIZE_4K,
            perm: self.perm & pte.perm(),
        })
    }

    /// Read entry `index`: from the mapping when it holds the entry, else exactly as a walk
    /// reads any entry ([`read_entry`], which faults for bytes not mapped for reading).
    #[inline(always)]
    fn read(&self, mem: &GuestMemoryMmap, index: u64) -> Result<u64, WalkFault> {
        match self.mapped(index) {
            Some(entry) => Ok(entry),
            None => read_entry(mem, self.table, index, 1),
        }
    }

    /// Entry `index` when it is in the readable part of the table found at creation.
    #[inline(always)]
    fn mapped(&self, index: u64) -> Option<u64> {
        let i = usize::try_from(index).ok().filter(|&i| i < self.readable)?;
        // SAFETY: `entries` points at `readable` 8-byte-aligned entries of a region of
        // `mem`, which is borrowed for 'm and so stays mapped while `self` lives; `i` is
        // below `readable`. Guest memory is shared with the guest, so the entry is read
        // with one atomic load, as every entry read is.
        let entry = unsafe { &*self.entries.wrapping_add(i) }.load(Ordering::Acquire);
        Some(u64::from_le(entry))
    }
}

/// Level-1 tables of recent walks ([`L1Table`]): a few, so that the two sides of a copy
/// (each walking its own level-1 table) both find theirs; the oldest goes first.
#[derive(Debug, Default)]
pub(crate) struct L1Cache<'m> {
    tables: [Option<L1Table<'m>>; 4],
    /// Where the next table goes.
    next: usize,
    /// The table found last (looked at first: pages come in runs).
    last: usize,
}

impl<'m> L1Cache<'m> {
    /// Forget every table.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    #[inline(always)]
    fn find(&mut self, root: u64, iova: u64) -> Option<&L1Table<'m>> {
        let is = |t: &Option<L1Table<'m>>| t.is_some_and(|t| t.covers(root, iova));
        if !is(&self.tables[self.last]) {
            self.last = self.tables.iter().position(is)?;
        }
        self.tables[self.last].as_ref()
    }

    /// The cached level-1 table for `iova` under `root` (4 KiB aligned), if any.
    #[inline(always)]
    pub fn table(&mut self, root: u64, iova: u64) -> Option<L1Table<'m>> {
        self.find(root, iova).copied()
    }

    fn insert(&mut self, table: L1Table<'m>) {
        self.tables[self.next] = Some(table);
        self.next = (self.next + 1) % self.tables.len();
    }
}

/// Walk like [`walk`], starting from `cache` when it holds the level-1 table for `iova`
/// under `root`, and adding to `cache` the level-1 table a full walk reaches.
///
/// The result is the one [`walk`] gives as long as the level-4..2 entries the cached table
/// was found through are unchanged; a driver that changes them must invalidate (SPEC.md
/// "IOTLB"), which makes the owner clear the cache.
#[inline(always)]
pub(crate) fn walk_cached<'m>(
    mem: &'m GuestMemoryMmap,
    root: u64,
    iova: u64,
    cache: &mut L1Cache<'m>,
) -> Result<Leaf, WalkFault> {
    let root = root & !(SIZE_4K - 1);
    if let Some(l1) = cache.find(root, iova) {
        let entry = l1.read(mem, index(iova, 1))?;
        // Level 1 holds only leaves; were it otherwise, a full walk decides.
        if let Step::Leaf(leaf) = decode(entry, 1, l1.perm, iova)? {
            return Ok(leaf);
        }
    }
    walk_from(mem, root, iova, Some(cache))
}

#[inline(never)]
fn walk_from<'m>(
    mem: &'m GuestMemoryMmap,
    root: u64,
    iova: u64,
    mut cache: Option<&mut L1Cache<'m>>,
) -> Result<Leaf, WalkFault> {
    let root = root & !(SIZE_4K - 1);
    let mut table = root;
    let mut perm = PTE_R | PTE_W;
    let mut level = LEVELS;
    loop {
        let entry = read_entry(mem, table, index(iova, level), level)?;
        match decode(entry, level, perm, iova)? {
            Step::Leaf(leaf) => return Ok(leaf),
            Step::Table(next, p) => {
                table = next;
                perm = p;
                level -= 1;
                if level == 1 {
                    if let Some(cache) = cache.as_deref_mut() {
                        cache.insert(L1Table::new(mem, root, iova, table, perm));
                    }
                }
            }
        }
    }
}
