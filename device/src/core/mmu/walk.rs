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

use crate::core::bus::{check_range, refusal, region_allows, Access};
use crate::core::remote;
use crate::spec::*;
use crate::trace::recorder::record_pte;

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
    /// `FAULT_NOT_PRESENT`, `FAULT_MALFORMED_ENTRY`, `FAULT_OUTSIDE_RAM` or
    /// `FAULT_BUS_ERROR` (a table in lost bus memory).
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
    check_range(mem, addr, 8, Access::Read).map_err(|bad| WalkFault {
        // A table in lost memory (see `core::sigbus`) is a bus error, not outside RAM.
        reason: refusal(mem, bad),
        ..outside
    })?;
    // The range check passed, so the region exists and holds all 8 bytes; a failure here
    // (a region refusing the access some other way) is treated as unmapped memory.
    // Memory only the client reaches: fetch the entry first (see `core::remote`).
    remote::sync_in(mem, addr, 8).map_err(|_| WalkFault {
        reason: FAULT_BUS_ERROR,
        ..outside
    })?;
    let region = mem.find_region(GuestAddress(addr)).ok_or(outside)?;
    let offset = MemoryRegionAddress(addr - region.start_addr().0);
    let entry = region
        .load::<u64>(offset, Ordering::Acquire)
        .map(u64::from_le)
        .map_err(|_| outside)?;
    record_pte(addr, entry);
    Ok(entry)
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
            // A shadow of client memory is read entry by entry through the client.
            if !region_allows(region, Access::Read) || remote::is_shadow(region) {
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
        let entry = u64::from_le(entry);
        record_pte(self.table | (index * 8), entry);
        Some(entry)
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

/// A run of IOVAs mapped by leaves of one size, contiguous in IOVA and bus addresses, with
/// one permission (`map_runs`, a view of a domain for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MapRun {
    /// First IOVA.
    pub iova: u64,
    /// Its bus address.
    pub bus: u64,
    /// Bytes.
    pub len: u64,
    /// Leaf size: 4 KiB, 2 MiB or 1 GiB.
    pub leaf: u64,
    /// `PTE_R | PTE_W` ANDed over the levels.
    pub perm: u64,
}

/// Every leaf of the table rooted at `root`, as runs ([`MapRun`]), in IOVA order, for a
/// view of a domain's map. Reads at most `budget` entries and returns at most `max_runs`
/// runs (the guest writes the tables: they may be huge, or point at themselves); the flag
/// says whether the walk saw everything. Entries that do not decode are skipped, a table
/// that cannot be read ends its branch; nothing is cached and no fault is reported. Tables
/// in memory only the client reaches are not walked (each entry would be a message).
pub(crate) fn map_runs(
    mem: &GuestMemoryMmap,
    root: u64,
    mut budget: usize,
    max_runs: usize,
) -> (Vec<MapRun>, bool) {
    let mut runs: Vec<MapRun> = Vec::new();
    let mut complete = true;
    // Depth-first, in IOVA order: (table, level, IOVA of its first entry, permissions).
    let mut stack = vec![(root & !(SIZE_4K - 1), LEVELS, 0u64, PTE_R | PTE_W, 0u64)];
    while let Some((table, level, base, perm, first)) = stack.pop() {
        let readable = mem
            .find_region(GuestAddress(table))
            .is_some_and(|r| region_allows(r, Access::Read) && !remote::is_shadow(r));
        if !readable {
            continue;
        }
        let span = level_size(level);
        for i in first..512 {
            if budget == 0 || runs.len() >= max_runs {
                return (runs, false);
            }
            budget -= 1;
            let Ok(entry) = read_entry(mem, table, i, level) else {
                complete = false;
                break;
            };
            let iova = base + i * span;
            match Pte(entry).decode_at(level) {
                Ok(PteKind::Leaf(bus)) => {
                    let perm = perm & Pte(entry).perm();
                    match runs.last_mut() {
                        Some(r)
                            if r.leaf == span
                                && r.perm == perm
                                && r.iova + r.len == iova
                                && r.bus + r.len == bus =>
                        {
                            r.len += span;
                        }
                        _ => runs.push(MapRun {
                            iova,
                            bus,
                            len: span,
                            leaf: span,
                            perm,
                        }),
                    }
                }
                Ok(PteKind::Table(next)) if level > 1 => {
                    // The rest of this table after the subtree.
                    stack.push((table, level, base, perm, i + 1));
                    stack.push((next, level - 1, iova, perm & Pte(entry).perm(), 0));
                    break;
                }
                Ok(_) => {}
                Err(_) => complete = false,
            }
        }
    }
    (runs, complete)
}

#[cfg(test)]
mod tests {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{GuestRegionMmap, MmapRegion};

    use super::*;

    const RW: u64 = PTE_R | PTE_W;
    /// Where a builder's tables start.
    const TABLES: u64 = 0x10_0000;
    /// A 2 MiB IOVA range (L4 1, L3 0, L2 0).
    const RANGE: u64 = 0x80_0000_0000;

    /// 4 MiB of bus memory at 0.
    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// A driver's page-table builder: 4 KiB tables from a bump allocator at [`TABLES`].
    struct Pt<'m> {
        mem: &'m GuestMemoryMmap,
        root: u64,
        next: u64,
    }

    impl<'m> Pt<'m> {
        fn new(mem: &'m GuestMemoryMmap) -> Self {
            let mut pt = Pt {
                mem,
                root: 0,
                next: TABLES,
            };
            pt.root = pt.alloc();
            pt
        }

        fn alloc(&mut self) -> u64 {
            let table = self.next;
            self.next += SIZE_4K;
            self.mem
                .write_slice(&[0; SIZE_4K as usize], GuestAddress(table))
                .unwrap();
            table
        }

        fn read(&self, addr: u64) -> u64 {
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        fn write(&self, addr: u64, entry: u64) {
            self.mem.write_obj(entry, GuestAddress(addr)).unwrap();
        }

        /// Bus address of the entry for `iova` at `level`, making RW tables on the way.
        fn slot(&mut self, iova: u64, level: u32) -> u64 {
            let mut table = self.root;
            for l in (level + 1..=LEVELS).rev() {
                let at = table | (index(iova, l) * 8);
                let mut e = self.read(at);
                if e & RW == 0 {
                    e = Pte::table(self.alloc(), RW).raw();
                    self.write(at, e);
                }
                table = e & PTE_ADDR_MASK;
            }
            table | (index(iova, level) * 8)
        }

        /// Write `entry` at `level` for `iova`; returns its bus address.
        fn set(&mut self, iova: u64, level: u32, entry: u64) -> u64 {
            let at = self.slot(iova, level);
            self.write(at, entry);
            at
        }
    }

    /// The map view: contiguous 4 KiB leaves make one run, a gap or another permission
    /// starts one, a 2 MiB leaf is its own; a malformed entry is skipped and reported as
    /// an incomplete walk; a budget that runs out says so too.
    #[test]
    fn map_runs_merge_contiguous_leaves_and_bound_the_walk() {
        let mem = memory();
        let mut pt = Pt::new(&mem);
        for i in 0..3 {
            pt.set(
                RANGE + i * SIZE_4K,
                1,
                Pte::leaf(0x1000 * (i + 1), RW, false).raw(),
            );
        }
        pt.set(
            RANGE + 3 * SIZE_4K,
            1,
            Pte::leaf(0x4000, PTE_R, false).raw(),
        );
        pt.set(RANGE + 5 * SIZE_4K, 1, Pte::leaf(0x6000, RW, false).raw());
        let big = RANGE + (1 << 30);
        pt.set(big, 2, Pte::leaf(0x20_0000, RW, true).raw());
        let (runs, complete) = map_runs(&mem, pt.root, 1 << 16, 100);
        assert!(complete);
        let got: Vec<_> = runs
            .iter()
            .map(|r| (r.iova, r.bus, r.len, r.leaf, r.perm))
            .collect();
        assert_eq!(
            got,
            vec![
                (RANGE, 0x1000, 3 * SIZE_4K, SIZE_4K, RW),
                (RANGE + 3 * SIZE_4K, 0x4000, SIZE_4K, SIZE_4K, PTE_R),
                (RANGE + 5 * SIZE_4K, 0x6000, SIZE_4K, SIZE_4K, RW),
                (big, 0x20_0000, 1 << 21, 1 << 21, RW),
            ]
        );
        pt.set(RANGE + 7 * SIZE_4K, 1, RW | PTE_RESERVED_MASK);
        assert!(
            !map_runs(&mem, pt.root, 1 << 16, 100).1,
            "a malformed entry"
        );
        let (short, complete) = map_runs(&mem, pt.root, 600, 100);
        assert!(!complete && short.len() < runs.len(), "the budget");
        assert_eq!(
            map_runs(&mem, pt.root, 1 << 16, 2).0.len(),
            2,
            "the run limit"
        );
    }

    fn leaf(iova: u64, bus: u64, perm: u64) -> Leaf {
        Leaf {
            iova_page: iova & !(SIZE_4K - 1),
            bus_page: bus,
            size: SIZE_4K,
            perm,
        }
    }

    fn not_present(level: u32) -> WalkFault {
        WalkFault {
            reason: FAULT_NOT_PRESENT,
            info: 0,
            level,
            in_walk: false,
        }
    }

    /// Every kind of level-1 entry, under level-2 entries granting RW (first range) and R
    /// only (second range): a cached walk and `leaf_4k` give what a full walk gives.
    #[test]
    fn cached_walks_and_leaf_4k_agree_with_a_walk() {
        let mem = memory();
        let mut pt = Pt::new(&mem);
        let entries = [
            Pte::leaf(0x30_0000, RW, false).raw(),
            Pte::leaf(0x31_0000, PTE_R, false).raw(),
            Pte::leaf(0x32_0000, PTE_W, false).raw(),
            // High address bits, outside bus memory (the walk does not check pages).
            Pte::leaf(0x000f_ffff_ffff_f000, RW, false).raw(),
            Pte::NONE.raw(),
            // Address bits without R or W: not present.
            0x33_0000,
            Pte::leaf(0x34_0000, RW, false).raw() | 1 << 2,
            Pte::leaf(0x35_0000, RW, false).raw() | 1 << 63,
            Pte::leaf(0x36_0000, RW, true).raw(),
        ];
        let second = RANGE + SIZE_2M;
        for (i, &e) in entries.iter().enumerate() {
            pt.set(RANGE + i as u64 * SIZE_4K, 1, e);
            pt.set(second + i as u64 * SIZE_4K, 1, e);
        }
        let l2 = pt.slot(second, 2);
        pt.write(l2, (pt.read(l2) & PTE_ADDR_MASK) | PTE_R);
        let mut cache = L1Cache::default();
        for base in [RANGE, second] {
            // Past the last entry written too (not present).
            for i in 0..=entries.len() as u64 {
                for off in [0, 0x8, 0x7ff, 0xfff] {
                    let iova = base + i * SIZE_4K + off;
                    let want = walk(&mem, pt.root, iova);
                    // Bits 11:0 of the root are ignored.
                    let got = walk_cached(&mem, pt.root | 0xabc, iova, &mut cache);
                    assert_eq!(got, want, "iova {iova:#x}");
                    let table = cache
                        .table(pt.root, iova)
                        .expect("the walk cached the table");
                    assert_eq!(table.leaf_4k(iova), want.ok(), "iova {iova:#x}");
                }
            }
        }
        // What the full walk gives, spelled out for a few.
        let at = |i: u64| RANGE + i * SIZE_4K + 0x123;
        assert_eq!(walk(&mem, pt.root, at(0)), Ok(leaf(at(0), 0x30_0000, RW)));
        assert_eq!(
            walk(&mem, pt.root, second + SIZE_4K),
            Ok(leaf(second + SIZE_4K, 0x31_0000, PTE_R))
        );
        assert_eq!(
            walk(&mem, pt.root, second + 2 * SIZE_4K),
            Ok(leaf(second + 2 * SIZE_4K, 0x32_0000, 0)),
            "R above, W here: neither"
        );
        assert_eq!(walk(&mem, pt.root, at(4)), Err(not_present(1)));
        assert_eq!(
            walk(&mem, pt.root, at(6)),
            Err(WalkFault {
                reason: FAULT_MALFORMED_ENTRY,
                info: entries[6],
                level: 1,
                in_walk: false
            })
        );
        assert_eq!(
            walk(&mem, pt.root, at(8)).map_err(|f| (f.reason, f.info)),
            Err((FAULT_MALFORMED_ENTRY, entries[8])),
            "no large page at level 1"
        );
    }

    /// The paging-structure cache: a cached level-1 table is read without the levels above
    /// (a driver that changes those must invalidate), for its 2 MiB range and root only.
    #[test]
    fn a_cached_table_is_used_without_the_levels_above() {
        let mem = memory();
        let mut pt = Pt::new(&mem);
        pt.set(RANGE, 1, Pte::leaf(0x30_0000, RW, false).raw());
        let l1 = pt.set(RANGE + SIZE_4K, 1, Pte::leaf(0x31_0000, PTE_R, false).raw());
        pt.set(RANGE + SIZE_2M, 1, Pte::leaf(0x32_0000, RW, false).raw());
        let mut cache = L1Cache::default();
        assert_eq!(
            walk_cached(&mem, pt.root, RANGE, &mut cache),
            Ok(leaf(RANGE, 0x30_0000, RW))
        );
        // The driver clears the root's entry (without invalidating).
        pt.write(pt.root | (index(RANGE, 4) * 8), 0);
        let next = RANGE + SIZE_4K + 0x10;
        assert_eq!(walk(&mem, pt.root, next), Err(not_present(4)));
        assert_eq!(
            walk_cached(&mem, pt.root, next, &mut cache),
            Ok(leaf(next, 0x31_0000, PTE_R)),
            "one level-1 read"
        );
        // The cached table's own entries are read every time.
        pt.write(l1, Pte::leaf(0x33_0000, RW, false).raw());
        assert_eq!(
            walk_cached(&mem, pt.root, next, &mut cache),
            Ok(leaf(next, 0x33_0000, RW))
        );
        pt.write(l1, 0);
        assert_eq!(
            walk_cached(&mem, pt.root, next, &mut cache),
            Err(not_present(1))
        );
        // Another 2 MiB range, or the same range under another root: a full walk.
        assert_eq!(
            walk_cached(&mem, pt.root, RANGE + SIZE_2M, &mut cache),
            Err(not_present(4))
        );
        let other = pt.alloc();
        assert_eq!(
            walk_cached(&mem, other, RANGE, &mut cache),
            Err(not_present(4))
        );
        assert!(cache.table(other, RANGE).is_none());
        assert!(cache.table(pt.root, RANGE + SIZE_2M).is_none());
        // Cleared (an invalidation), the cache is empty.
        cache.clear();
        assert!(cache.table(pt.root, RANGE).is_none());
        assert_eq!(
            walk_cached(&mem, pt.root, RANGE, &mut cache),
            Err(not_present(4))
        );
    }

    /// The cache keeps the level-1 tables of the four most recent walks, the oldest going
    /// first, and finds each whatever order they are asked for in.
    #[test]
    fn the_cache_keeps_the_four_most_recent_tables() {
        let mem = memory();
        let mut pt = Pt::new(&mem);
        let range = |k: u64| RANGE + k * SIZE_2M;
        for k in 0..6 {
            pt.set(
                range(k),
                1,
                Pte::leaf(0x30_0000 + k * SIZE_4K, RW, false).raw(),
            );
        }
        let mut cache = L1Cache::default();
        for k in 0..6 {
            walk_cached(&mem, pt.root, range(k), &mut cache).unwrap();
        }
        // Only the cache can answer now.
        pt.write(pt.root | (index(RANGE, 4) * 8), 0);
        for k in [5, 2, 4, 3, 3, 2, 5, 4, 2] {
            assert_eq!(
                walk_cached(&mem, pt.root, range(k) + 0x40, &mut cache),
                Ok(leaf(range(k), 0x30_0000 + k * SIZE_4K, RW)),
                "range {k}"
            );
            assert!(cache.table(pt.root, range(k)).is_some());
        }
        for k in [0, 1] {
            assert_eq!(
                walk_cached(&mem, pt.root, range(k), &mut cache),
                Err(not_present(4)),
                "range {k} was evicted"
            );
            assert!(cache.table(pt.root, range(k)).is_none());
        }
    }

    /// A level-1 table whose first half is at the end of one region: the entries there are
    /// read from the cached mapping, the others as any entry is read, from the next region
    /// when there is one, else faulting with the table's address.
    #[test]
    fn a_level_1_table_partly_in_one_region() {
        const T: u64 = 0x20_0000;
        for next_region in [true, false] {
            let mut ranges = vec![(GuestAddress(0), (T + 0x800) as usize)];
            if next_region {
                ranges.push((GuestAddress(T + 0x800), 0x1000));
            }
            let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
            let mut pt = Pt::new(&mem);
            pt.set(RANGE, 2, Pte::table(T, RW).raw());
            let bus = |i: u64| 0x30_0000 + i * SIZE_4K;
            let mapped = |i: u64| i < 256 || next_region;
            for i in (0..512).filter(|&i| mapped(i)) {
                pt.write(T + i * 8, Pte::leaf(bus(i), RW, false).raw());
            }
            let mut cache = L1Cache::default();
            for i in [0, 1, 255, 256, 257, 300, 511, 254] {
                let iova = RANGE + i * SIZE_4K + 0x10;
                let want = if mapped(i) {
                    Ok(leaf(iova, bus(i), RW))
                } else {
                    Err(WalkFault {
                        reason: FAULT_OUTSIDE_RAM,
                        info: T,
                        level: 1,
                        in_walk: true,
                    })
                };
                assert_eq!(walk(&mem, pt.root, iova), want, "entry {i}");
                assert_eq!(
                    walk_cached(&mem, pt.root, iova, &mut cache),
                    want,
                    "entry {i}, next region {next_region}"
                );
                let table = cache.table(pt.root, iova).unwrap();
                let fast = if i < 256 { want.ok() } else { None };
                assert_eq!(table.leaf_4k(iova), fast, "entry {i}: readable part only");
            }
        }
    }

    /// A level-1 table in a region the device may not read: every read of it faults, cached
    /// or not.
    #[test]
    fn a_level_1_table_the_device_may_not_read() {
        const T: u64 = 0x40_0000;
        let rw = GuestRegionMmap::new(MmapRegion::new(4 << 20).unwrap(), GuestAddress(0)).unwrap();
        let wo = MmapRegionBuilder::new(SIZE_4K as usize)
            .with_mmap_prot(libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
            .build()
            .unwrap();
        let wo = GuestRegionMmap::new(wo, GuestAddress(T)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![rw, wo]).unwrap();
        let mut pt = Pt::new(&mem);
        pt.set(RANGE, 2, Pte::table(T, RW).raw());
        pt.write(T, Pte::leaf(0x30_0000, RW, false).raw());
        pt.write(T + 8, Pte::leaf(0x31_0000, RW, false).raw());
        let fault = Err(WalkFault {
            reason: FAULT_OUTSIDE_RAM,
            info: T,
            level: 1,
            in_walk: true,
        });
        let mut cache = L1Cache::default();
        for iova in [RANGE, RANGE + SIZE_4K, RANGE] {
            assert_eq!(walk(&mem, pt.root, iova), fault);
            assert_eq!(walk_cached(&mem, pt.root, iova, &mut cache), fault);
            assert_eq!(cache.table(pt.root, iova).unwrap().leaf_4k(iova), None);
        }
    }
}
