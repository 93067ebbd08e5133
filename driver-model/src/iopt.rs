//! I/O page tables for a domdma DMA domain, built in DMA memory from any [`DmaBackend`](crate::backend::DmaBackend).
//!
//! The format is device/SPEC.md "I/O page tables": four levels of 4 KiB tables of 512
//! little-endian u64 entries (x86-64 / VT-d second-level style). A 48-bit IOVA splits into
//! four 9-bit indices (bits 47:39 index the level-4 root, 38:30 a level-3 table, 29:21 a
//! level-2 table, 20:12 a level-1 table) and a 12-bit offset. An entry holds the next
//! table's (or the page's) bus address in bits 51:12, `PTE_R` and `PTE_W`, and at levels 3
//! and 2 `PTE_PS` for a 1 GiB or 2 MiB leaf.
//!
//! The tables live at **bus addresses** (the device reads them as an IOMMU reads its own
//! structures, not through a domain). They are carved out of DMA buffers the back end
//! allocates, [`TABLES_PER_CHUNK`] tables per allocation. Intermediate entries allow read
//! and write (the device ANDs permissions over the walk), so a leaf's permissions decide.
//!
//! What this builder does *not* do is tell the device: mapping a range that was not
//! present needs no invalidation (the device caches no faults), but changing or removing
//! a mapping does; see [`crate::domain`], which pairs each unmap with an IOTLB
//! invalidation. Tables emptied by an unmap are kept (not reused) until the whole page
//! table is dropped, so a walk the device may still be doing never reads a recycled table.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{fence, Ordering};

use domdma_device::spec::{self, Pte};

use crate::backend::{BackendError, BackendRef, DmaBuffer, DmaRequest};

/// Entries per table.
pub const ENTRIES: usize = spec::PTES_PER_TABLE;
/// Size of one entry in bytes.
const PTE_BYTES: usize = std::mem::size_of::<Pte>();
/// Size of one table in bytes.
pub const TABLE_SIZE: usize = ENTRIES * PTE_BYTES;
/// Tables allocated at once (one back-end allocation, one device mapping).
pub const TABLES_PER_CHUNK: usize = 16;
/// The IOVA width the format covers.
pub const MAX_IOVA_WIDTH: u32 = 48;

/// A mapping page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, a level-1 entry.
    Size4K,
    /// 2 MiB, a level-2 entry with `PTE_PS`.
    Size2M,
    /// 1 GiB, a level-3 entry with `PTE_PS`.
    Size1G,
}

impl PageSize {
    /// Every size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// The table level whose entries map pages of this size (1, 2 or 3).
    pub const fn level(self) -> u32 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The size a leaf at `level` maps.
    pub const fn at_level(level: u32) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }

    /// The `REG_CAP_PGSIZES` bit advertising this size.
    pub const fn cap_bit(self) -> u32 {
        match self {
            PageSize::Size4K => spec::PGSIZE_4K,
            PageSize::Size2M => spec::PGSIZE_2M,
            PageSize::Size1G => spec::PGSIZE_1G,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4 KiB",
            PageSize::Size2M => "2 MiB",
            PageSize::Size1G => "1 GiB",
        })
    }
}

/// Access permissions of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl Perm {
    /// Read only.
    pub const R: Perm = Perm {
        read: true,
        write: false,
    };
    /// Write only.
    pub const W: Perm = Perm {
        read: false,
        write: true,
    };
    /// Read and write.
    pub const RW: Perm = Perm {
        read: true,
        write: true,
    };

    /// The entry bits (`PTE_R`, `PTE_W`).
    pub const fn bits(self) -> u64 {
        (if self.read { spec::PTE_R } else { 0 }) | (if self.write { spec::PTE_W } else { 0 })
    }

    /// The permissions in an entry.
    pub const fn from_entry(entry: u64) -> Perm {
        Perm {
            read: entry & spec::PTE_R != 0,
            write: entry & spec::PTE_W != 0,
        }
    }
}

/// Errors of the page-table builder.
#[derive(Debug, thiserror::Error)]
pub enum IoptError {
    /// An address or length is not aligned to the page size.
    #[error("{what} {value:#x} is not aligned to {page}")]
    Unaligned {
        /// Which value ("IOVA", "bus address", "length").
        what: &'static str,
        /// The value.
        value: u64,
        /// The page size it must be aligned to.
        page: PageSize,
    },
    /// A zero-length range.
    #[error("empty range at IOVA {iova:#x}")]
    Empty {
        /// The IOVA.
        iova: u64,
    },
    /// The range leaves the IOVA space.
    #[error("IOVA range {iova:#x}+{len:#x} is beyond the {width}-bit IOVA space")]
    BeyondWidth {
        /// First IOVA.
        iova: u64,
        /// Length.
        len: u64,
        /// IOVA width in bits.
        width: u32,
    },
    /// A bus address beyond what an entry holds (bits 51:12).
    #[error("bus address {0:#x} does not fit a page-table entry (52 bits)")]
    BusTooHigh(u64),
    /// Neither read nor write: that would be a not-present entry.
    #[error("a mapping needs read or write permission")]
    NoPermission,
    /// Something is already mapped there.
    #[error("IOVA {iova:#x} is already mapped ({what})")]
    AlreadyMapped {
        /// The IOVA.
        iova: u64,
        /// What is in the way.
        what: String,
    },
    /// Nothing is mapped there.
    #[error("IOVA {iova:#x} is not mapped")]
    NotMapped {
        /// The IOVA.
        iova: u64,
    },
    /// Unmapping part of a large page.
    #[error(
        "unmapping {iova:#x}+{len:#x} would split the {page} page at {page_iova:#x}; \
         unmap whole pages"
    )]
    SplitsPage {
        /// First IOVA of the unmap.
        iova: u64,
        /// Its length.
        len: u64,
        /// The page's size.
        page: PageSize,
        /// The page's first IOVA.
        page_iova: u64,
    },
    /// An entry the builder did not write (a raw entry, e.g. a hostile test's) is in the
    /// way.
    #[error("IOVA {iova:#x}: level-{level} entry {entry:#x} is not one this builder wrote")]
    Foreign {
        /// The IOVA.
        iova: u64,
        /// The level.
        level: u32,
        /// The entry.
        entry: u64,
    },
    /// The back end failed to allocate table memory.
    #[error("allocating page-table memory: {0}")]
    Backend(#[from] BackendError),
}

/// A translation the software walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The bus address of the IOVA.
    pub bus: u64,
    /// The leaf's permissions.
    pub perm: Perm,
    /// The page size of the leaf.
    pub page: PageSize,
}

/// Index of `iova` in a table at `level` (4..1).
pub const fn index(iova: u64, level: u32) -> usize {
    spec::pte_index(iova, level)
}

/// Bytes one entry at `level` covers.
const fn span(level: u32) -> u64 {
    spec::level_size(level)
}

/// The table leaves of one size go into, kept for the leaves of a range that share it:
/// one walk from the root per table, not per leaf.
struct TableMemo<T> {
    /// The range the table covers (`iova / span(level + 1)`) and what the walk gave.
    last: Option<(u64, T)>,
}

impl<T> Default for TableMemo<T> {
    fn default() -> Self {
        Self { last: None }
    }
}

impl<T: Copy> TableMemo<T> {
    /// The table for a `page` leaf at `iova`: the last one when `iova` is in its range,
    /// else what `walk` gives (then kept).
    fn get(
        &mut self,
        iova: u64,
        page: PageSize,
        walk: impl FnOnce() -> Result<T, IoptError>,
    ) -> Result<T, IoptError> {
        let range = iova / span(page.level() + 1);
        match self.last {
            Some((r, table)) if r == range => Ok(table),
            _ => {
                let table = walk()?;
                self.last = Some((range, table));
                Ok(table)
            }
        }
    }
}

/// Where a table is: chunk and byte offset inside it.
#[derive(Debug, Clone, Copy)]
struct Slot {
    chunk: usize,
    offset: usize,
}

/// A 4-level I/O page table in DMA memory.
pub struct IoPageTable<'b> {
    backend: BackendRef<'b>,
    iova_width: u32,
    chunks: Vec<DmaBuffer>,
    used_in_last: usize,
    /// Every table this builder allocated (freed ones too), by bus address. A B-tree, not a
    /// hash map: lookups sit on every walk, and hashing a u64 costs more than a few compares.
    tables: BTreeMap<u64, Slot>,
    /// Tables emptied by [`IoPageTable::unmap`], reused by later maps.
    free_tables: Vec<u64>,
    root: u64,
}

impl fmt::Debug for IoPageTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoPageTable")
            .field("root", &format_args!("{:#x}", self.root))
            .field("iova_width", &self.iova_width)
            .field("tables", &self.tables.len())
            .finish()
    }
}

impl<'b> IoPageTable<'b> {
    /// An empty table (a zeroed root: nothing mapped) for an IOVA space of `iova_width`
    /// bits (at most 48; `REG_CAP` tells the device's).
    pub fn new(backend: impl Into<BackendRef<'b>>, iova_width: u32) -> Result<Self, IoptError> {
        let mut t = IoPageTable {
            backend: backend.into(),
            iova_width: iova_width.min(MAX_IOVA_WIDTH),
            chunks: Vec::new(),
            used_in_last: TABLES_PER_CHUNK,
            tables: BTreeMap::new(),
            free_tables: Vec::new(),
            root: 0,
        };
        t.root = t.alloc_table()?;
        Ok(t)
    }

    /// Bus address of the level-4 table: what `D_ROOT_LO/HI` take.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The IOVA width the table is built for.
    pub fn iova_width(&self) -> u32 {
        self.iova_width
    }

    /// Number of tables in use, the root included.
    pub fn table_count(&self) -> usize {
        self.tables.len() - self.free_tables.len()
    }

    /// Bus addresses of every table, the root first (for tests that check that the device
    /// reads tables at bus addresses).
    pub fn table_addrs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.tables.keys().copied().collect();
        v.retain(|&a| a != self.root && !self.free_tables.contains(&a));
        v.insert(0, self.root);
        v
    }

    fn alloc_table(&mut self) -> Result<u64, IoptError> {
        if let Some(table) = self.free_tables.pop() {
            let s = self.slot(table).expect("a freed table is one of ours");
            self.chunks[s.chunk].fill(s.offset, TABLE_SIZE, 0);
            return Ok(table);
        }
        if self.used_in_last == TABLES_PER_CHUNK {
            let buf = self
                .backend
                .alloc_dma(DmaRequest::new(TABLES_PER_CHUNK * TABLE_SIZE))?;
            // Allocations are page aligned; the format needs 4 KiB aligned tables.
            assert_eq!(
                buf.bus_addr() % TABLE_SIZE as u64,
                0,
                "table memory alignment"
            );
            self.chunks.push(buf);
            self.used_in_last = 0;
        }
        let chunk = self.chunks.len() - 1;
        let offset = self.used_in_last * TABLE_SIZE;
        self.used_in_last += 1;
        let buf = &self.chunks[chunk];
        // Zeroed by the back end; make sure anyway (a table must start all not-present).
        buf.fill(offset, TABLE_SIZE, 0);
        let bus = buf.bus_addr() + offset as u64;
        self.tables.insert(bus, Slot { chunk, offset });
        Ok(bus)
    }

    fn slot(&self, table: u64) -> Option<Slot> {
        self.tables.get(&table).copied()
    }

    fn read_entry(&self, table: u64, idx: usize) -> Option<Pte> {
        let s = self.slot(table)?;
        Some(Pte(
            self.chunks[s.chunk].read_u64(s.offset + idx * PTE_BYTES)
        ))
    }

    fn write_entry(&self, table: u64, idx: usize, value: Pte) {
        let s = self.slot(table).expect("a table this builder allocated");
        self.chunks[s.chunk].write_u64(s.offset + idx * PTE_BYTES, value.raw());
    }

    fn check_range(&self, iova: u64, len: u64) -> Result<(), IoptError> {
        if len == 0 {
            return Err(IoptError::Empty { iova });
        }
        let end = iova.checked_add(len);
        if end.is_none_or(|e| e > 1u64 << self.iova_width) {
            return Err(IoptError::BeyondWidth {
                iova,
                len,
                width: self.iova_width,
            });
        }
        Ok(())
    }

    /// The table an entry points to, if it is a table pointer this builder wrote.
    fn child(&self, entry: Pte, level: u32, iova: u64) -> Result<Option<u64>, IoptError> {
        if !entry.is_present() {
            return Ok(None);
        }
        let next = entry.addr();
        if entry.is_large() || !self.tables.contains_key(&next) {
            return Err(IoptError::AlreadyMapped {
                iova,
                what: if entry.is_large() {
                    format!("a level-{level} large page")
                } else {
                    format!("level-{level} entry {:#x}", entry.raw())
                },
            });
        }
        Ok(Some(next))
    }

    /// Maps `[iova, iova + len)` to `[bus, bus + len)` with `perm`, using leaves of `page`
    /// size. Addresses and length must be aligned to the page size, and nothing in the
    /// range may be mapped yet. Nothing is changed when an error is returned.
    ///
    /// A range that was not mapped needs no IOTLB invalidation.
    pub fn map(
        &mut self,
        iova: u64,
        bus: u64,
        len: u64,
        perm: Perm,
        page: PageSize,
    ) -> Result<(), IoptError> {
        self.check_map(iova, bus, len, perm, page)?;
        let size = page.bytes();
        let mut memo = TableMemo::default();
        let mut off = 0;
        while off < len {
            let at = iova + off;
            let table = memo.get(at, page, || self.table_for_mut(at, page.level()))?;
            self.set_leaf_in(table, at, bus + off, perm, page);
            off += size;
        }
        Ok(())
    }

    /// Maps `[iova, iova + len)` to `[bus, bus + len)` with the largest leaves up to
    /// `max_page` that alignment allows, and 4 KiB leaves elsewhere. Addresses and length
    /// must be 4 KiB aligned. Returns the number of leaves of each size (4K, 2M, 1G).
    pub fn map_auto(
        &mut self,
        iova: u64,
        bus: u64,
        len: u64,
        perm: Perm,
        max_page: PageSize,
    ) -> Result<[usize; 3], IoptError> {
        self.check_map(iova, bus, len, perm, PageSize::Size4K)?;
        // Plan first, so that a conflict leaves the table unchanged.
        let mut plan = Vec::new();
        let mut off = 0;
        while off < len {
            let page = PageSize::ALL
                .iter()
                .rev()
                .copied()
                .filter(|p| *p <= max_page)
                .find(|p| {
                    let s = p.bytes();
                    (iova + off) % s == 0 && (bus + off) % s == 0 && len - off >= s
                })
                .unwrap_or(PageSize::Size4K);
            plan.push((off, page));
            off += page.bytes();
        }
        for &(off, page) in &plan {
            self.check_free(iova + off, page)?;
        }
        let mut counts = [0; 3];
        for (off, page) in plan {
            self.set_leaf(iova + off, bus + off, perm, page)?;
            counts[page.level() as usize - 1] += 1;
        }
        Ok(counts)
    }

    fn check_map(
        &self,
        iova: u64,
        bus: u64,
        len: u64,
        perm: Perm,
        page: PageSize,
    ) -> Result<(), IoptError> {
        let size = page.bytes();
        for (what, value) in [("IOVA", iova), ("bus address", bus), ("length", len)] {
            if value % size != 0 {
                return Err(IoptError::Unaligned { what, value, page });
            }
        }
        self.check_range(iova, len)?;
        if bus
            .checked_add(len - 1)
            .is_none_or(|last| last & !spec::PTE_ADDR_MASK & !0xfff != 0)
        {
            return Err(IoptError::BusTooHigh(bus));
        }
        if perm.bits() == 0 {
            return Err(IoptError::NoPermission);
        }
        let mut memo = TableMemo::default();
        let mut off = 0;
        while off < len {
            let at = iova + off;
            let table = memo.get(at, page, || self.table_for(at, page.level()))?;
            self.check_free_in(table, at, page)?;
            off += size;
        }
        Ok(())
    }

    /// Checks that a leaf of `page` size at `iova` can be written: no present entry in
    /// the walk above it is a leaf, and its own entry is not present.
    fn check_free(&self, iova: u64, page: PageSize) -> Result<(), IoptError> {
        let table = self.table_for(iova, page.level())?;
        self.check_free_in(table, iova, page)
    }

    /// [`IoPageTable::check_free`] with the walk above done: `table` is what
    /// [`IoPageTable::table_for`] gave for `iova` at the leaf's level.
    fn check_free_in(
        &self,
        table: Option<u64>,
        iova: u64,
        page: PageSize,
    ) -> Result<(), IoptError> {
        let Some(table) = table else {
            return Ok(());
        };
        let level = page.level();
        let entry = self
            .read_entry(table, index(iova, level))
            .unwrap_or(Pte::NONE);
        if !entry.is_present() {
            return Ok(());
        }
        Err(IoptError::AlreadyMapped {
            iova,
            what: if entry.is_large() || level == 1 {
                format!("a {} page", PageSize::at_level(level).expect("1..3"))
            } else {
                format!("a level-{} table under a {page} slot", level - 1)
            },
        })
    }

    /// The table holding the level-`level` entry for `iova`, walking from the root; None
    /// when a table on the way does not exist yet; an error when a present entry above is
    /// a leaf (or a pointer this builder did not write).
    fn table_for(&self, iova: u64, level: u32) -> Result<Option<u64>, IoptError> {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let entry = self.read_entry(table, index(iova, l)).unwrap_or(Pte::NONE);
            match self.child(entry, l, iova)? {
                Some(next) => table = next,
                None => return Ok(None),
            }
        }
        Ok(Some(table))
    }

    /// The table holding the level-`level` entry for `iova`, making the missing tables
    /// on the way.
    fn table_for_mut(&mut self, iova: u64, level: u32) -> Result<u64, IoptError> {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let idx = index(iova, l);
            let entry = self.read_entry(table, idx).unwrap_or(Pte::NONE);
            table = match self.child(entry, l, iova)? {
                Some(next) => next,
                None => {
                    let next = self.alloc_table()?;
                    // The new table's zeroes must be visible before the entry that links it.
                    fence(Ordering::SeqCst);
                    self.write_entry(table, idx, Pte::table(next, spec::PTE_R | spec::PTE_W));
                    next
                }
            };
        }
        Ok(table)
    }

    fn set_leaf(
        &mut self,
        iova: u64,
        bus: u64,
        perm: Perm,
        page: PageSize,
    ) -> Result<(), IoptError> {
        let table = self.table_for_mut(iova, page.level())?;
        self.set_leaf_in(table, iova, bus, perm, page);
        Ok(())
    }

    /// Write the leaf for `iova` into `table` (from [`IoPageTable::table_for_mut`]).
    fn set_leaf_in(&self, table: u64, iova: u64, bus: u64, perm: Perm, page: PageSize) {
        let large = page != PageSize::Size4K;
        self.write_entry(
            table,
            index(iova, page.level()),
            Pte::leaf(bus, perm.bits(), large),
        );
    }

    /// Removes the mappings of `[iova, iova + len)` (4 KiB aligned). Every leaf in the
    /// range must lie entirely inside it, and the whole range must be mapped; nothing is
    /// changed when an error is returned. Returns the number of leaves removed.
    ///
    /// The device keeps using cached translations until the driver invalidates the range.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<usize, IoptError> {
        for (what, value) in [("IOVA", iova), ("length", len)] {
            if value % PageSize::Size4K.bytes() != 0 {
                return Err(IoptError::Unaligned {
                    what,
                    value,
                    page: PageSize::Size4K,
                });
            }
        }
        self.check_range(iova, len)?;
        let mut leaves = Vec::new();
        let mut off = 0;
        while off < len {
            let at = iova + off;
            let (table, idx, level) = self.leaf_of(at)?;
            let size = span(level);
            let page_iova = at & !(size - 1);
            if page_iova < iova || page_iova + size > iova + len {
                return Err(IoptError::SplitsPage {
                    iova,
                    len,
                    page: PageSize::at_level(level).expect("leaf levels are 1..3"),
                    page_iova,
                });
            }
            leaves.push((table, idx, level, page_iova));
            off = page_iova + size - iova;
        }
        for &(table, idx, _, _) in &leaves {
            self.write_entry(table, idx, Pte::NONE);
        }
        // Tables the unmap left empty are unlinked (their parent entry cleared) and kept
        // for later maps, lowest level first, so that a larger leaf can be mapped there
        // afterwards. They are reused only by a later map: invalidate the range before
        // mapping again (as `Domain::unmap` does), so the device no longer walks them.
        let mut work: std::collections::BTreeMap<(u32, u64), u64> = leaves
            .iter()
            .filter(|&&(table, _, _, _)| table != self.root)
            .map(|&(table, _, level, page_iova)| ((level, table), page_iova))
            .collect();
        while let Some(((level, table), some_iova)) = work.pop_first() {
            if level >= 4 || (0..ENTRIES).any(|i| self.read_entry(table, i) != Some(Pte::NONE)) {
                continue;
            }
            let Some(parent_entry) = self.entry_addr(some_iova, level + 1) else {
                continue;
            };
            let parent = parent_entry & !(TABLE_SIZE as u64 - 1);
            let idx = ((parent_entry - parent) / PTE_BYTES as u64) as usize;
            self.write_entry(parent, idx, Pte::NONE);
            self.free_tables.push(table);
            if parent != self.root {
                work.insert((level + 1, parent), some_iova);
            }
        }
        Ok(leaves.len())
    }

    /// The table, index and level of the leaf mapping `iova`.
    fn leaf_of(&self, iova: u64) -> Result<(u64, usize, u32), IoptError> {
        let mut table = self.root;
        for level in (1..=4).rev() {
            let idx = index(iova, level);
            let entry = self.read_entry(table, idx).unwrap_or(Pte::NONE);
            if !entry.is_present() {
                return Err(IoptError::NotMapped { iova });
            }
            if level == 1 || (entry.is_large() && level <= 3) {
                return Ok((table, idx, level));
            }
            let next = entry.addr();
            if !self.tables.contains_key(&next) {
                return Err(IoptError::Foreign {
                    iova,
                    level,
                    entry: entry.raw(),
                });
            }
            table = next;
        }
        Err(IoptError::NotMapped { iova })
    }

    /// Walks the table in software as the device would (without the IOTLB): the mapping
    /// of `iova`, or `None` when it is not mapped (or the walk meets an entry this builder
    /// did not write).
    pub fn translate(&self, iova: u64) -> Option<Mapping> {
        if iova >> self.iova_width != 0 {
            return None;
        }
        let (table, idx, level) = self.leaf_of(iova).ok()?;
        let entry = self.read_entry(table, idx)?;
        let size = span(level);
        Some(Mapping {
            bus: (entry.addr() & !(size - 1)) + (iova & (size - 1)),
            // Intermediate entries this builder writes are RW, so the leaf decides.
            perm: Perm::from_entry(entry.raw()),
            page: PageSize::at_level(level)?,
        })
    }

    /// The bus address of the entry at `level` (4..1) on the walk of `iova`, when the
    /// tables down to that level exist.
    pub fn entry_addr(&self, iova: u64, level: u32) -> Option<u64> {
        if !(1..=4).contains(&level) {
            return None;
        }
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let entry = self.read_entry(table, index(iova, l))?;
            let next = entry.addr();
            if !entry.is_present() || entry.is_large() || !self.tables.contains_key(&next) {
                return None;
            }
            table = next;
        }
        Some(table + (index(iova, level) * PTE_BYTES) as u64)
    }

    /// Reads the entry at `level` on the walk of `iova` (see [`IoPageTable::entry_addr`]).
    pub fn read_raw(&self, iova: u64, level: u32) -> Option<u64> {
        let addr = self.entry_addr(iova, level)?;
        let table = addr & !(TABLE_SIZE as u64 - 1);
        self.read_entry(table, ((addr - table) / PTE_BYTES as u64) as usize)
            .map(Pte::raw)
    }

    /// Overwrites the entry at `level` on the walk of `iova` with any value, reserved bits
    /// and all (for tests of malformed tables). Returns the old entry, or `None` when the
    /// tables down to that level do not exist. The builder may refuse to map or unmap
    /// through an entry it did not write ([`IoptError::Foreign`]).
    pub fn write_raw(&mut self, iova: u64, level: u32, value: u64) -> Option<u64> {
        let addr = self.entry_addr(iova, level)?;
        let table = addr & !(TABLE_SIZE as u64 - 1);
        let idx = ((addr - table) / PTE_BYTES as u64) as usize;
        let old = self.read_entry(table, idx)?;
        self.write_entry(table, idx, Pte(value));
        Some(old.raw())
    }
}

#[cfg(test)]
mod tests {
    use std::ptr::NonNull;
    use std::time::Duration;

    use super::*;
    use crate::backend::{BackendInfo, DmaBackend, RegisterAccess, Result as BResult};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A back end with heap "DMA memory" at fake bus addresses, enough for the builder.
    struct HeapBackend {
        next: AtomicU64,
    }

    impl HeapBackend {
        fn new() -> Self {
            HeapBackend {
                next: AtomicU64::new(0x10_0000),
            }
        }
    }

    impl DmaBackend for HeapBackend {
        fn info(&self) -> BackendInfo {
            BackendInfo {
                backend: "heap",
                location: String::new(),
                register_access: RegisterAccess::Direct,
                msix_vectors: 0,
                numa_node: None,
            }
        }
        fn read32(&self, _: u64) -> BResult<u32> {
            Ok(0)
        }
        fn write32(&self, _: u64, _: u32) -> BResult<()> {
            Ok(())
        }
        fn config_read(&self, _: u64, _: &mut [u8]) -> BResult<()> {
            Ok(())
        }
        fn config_write(&self, _: u64, _: &[u8]) -> BResult<()> {
            Ok(())
        }
        fn alloc_dma(&self, req: DmaRequest) -> BResult<DmaBuffer> {
            let len = req.len.next_multiple_of(4096);
            // Over-allocate to align to 4 KiB inside the box.
            let v: Box<[u64]> = vec![0u64; (len + 4096) / 8].into_boxed_slice();
            let base = v.as_ptr() as usize;
            let aligned = base.next_multiple_of(4096);
            let ptr = NonNull::new(aligned as *mut u8).unwrap();
            let bus = self
                .next
                .fetch_add(len as u64 + 0x1_0000, Ordering::Relaxed);
            // SAFETY: the boxed slice stays alive inside the buffer, and `aligned..+len`
            // lies inside it.
            Ok(unsafe { DmaBuffer::from_raw_parts(ptr, len, bus, 4096, Box::new(v)) })
        }
        fn reserve_unmapped(&self, _: u64) -> BResult<u64> {
            Ok(0)
        }
        fn msix_vectors(&self) -> u16 {
            0
        }
        fn rearm_interrupts(&self) -> BResult<()> {
            Ok(())
        }
        fn wait_interrupt(&self, _: u16, _: Duration) -> BResult<u64> {
            Ok(0)
        }
    }

    #[test]
    fn unmap_unlinks_emptied_tables_so_a_large_page_fits_later() {
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 48).unwrap();
        let iova = 0x4000_0000;
        t.map(iova, 0x1000_0000, 4 << 20, Perm::RW, PageSize::Size4K)
            .unwrap();
        // Root, level 3, level 2, two level-1 tables.
        assert_eq!(t.table_count(), 5);
        t.unmap(iova, 4 << 20).unwrap();
        assert_eq!(t.table_count(), 1, "emptied tables unlinked up to the root");
        assert!(t.translate(iova).is_none());
        t.map(iova, 0x2000_0000, 4 << 20, Perm::RW, PageSize::Size2M)
            .unwrap();
        let m = t.translate(iova + (2 << 20) + 5).unwrap();
        assert_eq!((m.page, m.bus), (PageSize::Size2M, 0x2020_0005));
        assert_eq!(t.table_count(), 3, "freed tables reused");
        // A partly emptied table stays.
        t.map(0x8000_0000, 0x3000_0000, 0x2000, Perm::R, PageSize::Size4K)
            .unwrap();
        t.unmap(0x8000_0000, 0x1000).unwrap();
        assert!(t.translate(0x8000_1000).is_some());
    }

    #[test]
    fn spec_example_2m_page() {
        // device/SPEC.md: IOVA 0x4020_0000 -> bus 0x1_0000_0000 as a 2 MiB page.
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 48).unwrap();
        t.map(
            0x4020_0000,
            0x1_0000_0000,
            2 << 20,
            Perm::RW,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(t.table_count(), 3, "L4, L3, L2");
        let tables = t.table_addrs();
        let (l4, l3, l2) = (tables[0], tables[1], tables[2]);
        assert_eq!(t.read_raw(0x4020_0000, 4), Some(l3 | 3));
        assert_eq!(t.read_raw(0x4020_0000, 3), Some(l2 | 3));
        assert_eq!(t.read_raw(0x4020_0000, 2), Some(0x1_0000_0083));
        assert_eq!(t.entry_addr(0x4020_0000, 4), Some(l4));
        assert_eq!(t.entry_addr(0x4020_0000, 3), Some(l3 + 8));
        assert_eq!(t.entry_addr(0x4020_0000, 2), Some(l2 + 8));
        assert_eq!(
            t.translate(0x4020_1234),
            Some(Mapping {
                bus: 0x1_0000_1234,
                perm: Perm::RW,
                page: PageSize::Size2M
            })
        );
        assert_eq!(t.translate(0x4000_0000), None);
    }

    #[test]
    fn every_page_size_and_unmap() {
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 48).unwrap();
        t.map(0x1000, 0x5000, 0x2000, Perm::R, PageSize::Size4K)
            .unwrap();
        t.map(1 << 30, 3 << 30, 1 << 30, Perm::W, PageSize::Size1G)
            .unwrap();
        t.map(
            0x80_0000_0000,
            0x20_0000,
            4 << 20,
            Perm::RW,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(t.translate(0x1fff).unwrap().bus, 0x5fff);
        assert_eq!(t.translate(0x2000).unwrap().bus, 0x6000);
        assert_eq!(t.translate(0x2000).unwrap().perm, Perm::R);
        let g = t.translate((1 << 30) + 0x1234_5678).unwrap();
        assert_eq!(
            (g.bus, g.perm, g.page),
            ((3 << 30) + 0x1234_5678, Perm::W, PageSize::Size1G)
        );
        assert_eq!(
            t.translate(0x80_0000_0000 + (3 << 20)).unwrap().bus,
            0x20_0000 + (3 << 20)
        );

        // Conflicts leave the table unchanged.
        let before = t.table_count();
        assert!(matches!(
            t.map(0x0, 0x9000, 0x2000, Perm::RW, PageSize::Size4K),
            Err(IoptError::AlreadyMapped { iova: 0x1000, .. })
        ));
        assert!(t.translate(0x0).is_none(), "the first page was not mapped");
        assert!(matches!(
            t.map(0, 0, 2 << 20, Perm::RW, PageSize::Size2M),
            Err(IoptError::AlreadyMapped { .. })
        ));
        assert!(matches!(
            t.map((1 << 30) + 0x1000, 0, 0x1000, Perm::RW, PageSize::Size4K),
            Err(IoptError::AlreadyMapped { .. })
        ));
        assert_eq!(t.table_count(), before);

        // Unmapping splits nothing.
        assert!(matches!(
            t.unmap(0x80_0000_0000 + 0x1000, 0x1000),
            Err(IoptError::SplitsPage {
                page: PageSize::Size2M,
                ..
            })
        ));
        assert!(matches!(
            t.unmap(0x3000, 0x1000),
            Err(IoptError::NotMapped { iova: 0x3000 })
        ));
        assert_eq!(t.unmap(0x80_0000_0000, 4 << 20).unwrap(), 2);
        assert!(t.translate(0x80_0000_0000).is_none());
        assert_eq!(t.unmap(0x1000, 0x2000).unwrap(), 2);
        assert_eq!(t.unmap(1 << 30, 1 << 30).unwrap(), 1);
        // And the space can be mapped again.
        t.map(
            0x80_0000_0000,
            0x40_0000,
            2 << 20,
            Perm::RW,
            PageSize::Size2M,
        )
        .unwrap();
    }

    #[test]
    fn map_auto_picks_the_largest_pages() {
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 48).unwrap();
        // 4K-aligned start: 4K pages up to the 2M boundary, then 2M pages, then 4K.
        let iova = (2 << 20) - 0x3000;
        let bus = (8 << 20) - 0x3000;
        let len = 0x3000 + (4 << 20) + 0x1000;
        let counts = t
            .map_auto(iova, bus, len, Perm::RW, PageSize::Size1G)
            .unwrap();
        assert_eq!(counts, [4, 2, 0]);
        assert_eq!(t.translate(2 << 20).unwrap().page, PageSize::Size2M);
        assert_eq!(t.translate(iova).unwrap().bus, bus);
        assert_eq!(t.translate(iova + len - 1).unwrap().bus, bus + len - 1);
        // Misaligned bus: 4K pages only.
        let counts = t
            .map_auto(
                1 << 31,
                (1 << 31) + 0x1000,
                2 << 20,
                Perm::R,
                PageSize::Size1G,
            )
            .unwrap();
        assert_eq!(counts, [512, 0, 0]);
        // Capped at 4K.
        let counts = t
            .map_auto(1 << 32, 1 << 32, 2 << 20, Perm::R, PageSize::Size4K)
            .unwrap();
        assert_eq!(counts, [512, 0, 0]);
    }

    #[test]
    fn checks_arguments() {
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 32).unwrap();
        assert!(matches!(
            t.map(0x1000, 0x1001, 0x1000, Perm::RW, PageSize::Size4K),
            Err(IoptError::Unaligned {
                what: "bus address",
                ..
            })
        ));
        assert!(matches!(
            t.map(0x1000, 0, 0x1000, Perm::RW, PageSize::Size2M),
            Err(IoptError::Unaligned { what: "IOVA", .. })
        ));
        assert!(matches!(
            t.map(0xffff_f000, 0, 0x2000, Perm::RW, PageSize::Size4K),
            Err(IoptError::BeyondWidth { width: 32, .. })
        ));
        assert!(matches!(
            t.map(0, 0, 0, Perm::RW, PageSize::Size4K),
            Err(IoptError::Empty { .. })
        ));
        assert!(matches!(
            t.map(0, 1 << 52, 0x1000, Perm::RW, PageSize::Size4K),
            Err(IoptError::BusTooHigh(_))
        ));
        let none = Perm {
            read: false,
            write: false,
        };
        assert!(matches!(
            t.map(0, 0, 0x1000, none, PageSize::Size4K),
            Err(IoptError::NoPermission)
        ));
        t.map(0xffff_f000, 0x1000, 0x1000, Perm::RW, PageSize::Size4K)
            .unwrap();
    }

    #[test]
    fn a_map_across_tables_writes_every_leaf_and_a_conflict_changes_nothing() {
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 48).unwrap();
        // 4 MiB + 8 KiB of 4 KiB leaves from 4 KiB below a 1 GiB boundary: level-1, -2 and
        // -3 tables change along the range (one walk per table, not per leaf).
        let (iova, len, bus) = ((1u64 << 30) - 0x1000, (4u64 << 20) + 0x2000, 0x8000_0000);
        // A page already mapped in the middle, in the range's third level-1 table.
        let taken = iova + (3 << 20);
        t.map(taken, 0x1234_5000, 0x1000, Perm::RW, PageSize::Size4K)
            .unwrap();
        let tables = t.table_count();
        let err = t.map(iova, bus, len, Perm::RW, PageSize::Size4K);
        assert!(
            matches!(err, Err(IoptError::AlreadyMapped { iova: at, .. }) if at == taken),
            "{err:?}"
        );
        assert_eq!(t.table_count(), tables, "nothing made");
        assert!(t.translate(iova).is_none());
        t.unmap(taken, 0x1000).unwrap();
        t.map(iova, bus, len, Perm::RW, PageSize::Size4K).unwrap();
        for p in 0..len / 0x1000 {
            let m = t.translate(iova + p * 0x1000 + 8).unwrap();
            assert_eq!((m.bus, m.page), (bus + p * 0x1000 + 8, PageSize::Size4K));
        }
        assert!(t.translate(iova + len).is_none());
    }

    #[test]
    fn raw_entries_for_hostile_tests() {
        let b = HeapBackend::new();
        let mut t = IoPageTable::new(&b, 48).unwrap();
        t.map(0x20_0000, 0x60_0000, 0x1000, Perm::RW, PageSize::Size4K)
            .unwrap();
        let old = t
            .write_raw(0x20_0000, 1, 0x60_0000 | spec::PTE_R | 0x4)
            .unwrap();
        assert_eq!(old, 0x60_0003);
        assert_eq!(t.read_raw(0x20_0000, 1), Some(0x60_0005));
        // A level-2 entry turned into a foreign pointer: walks refuse it.
        t.write_raw(0x20_0000, 2, 0xdead_0000 | 3).unwrap();
        assert!(t.translate(0x20_0000).is_none());
        assert!(matches!(
            t.unmap(0x20_0000, 0x1000),
            Err(IoptError::Foreign { level: 2, .. })
        ));
        assert_eq!(t.entry_addr(0x20_0000, 1), None);
        assert_eq!(t.entry_addr(0x20_0000, 5), None);
    }
}
