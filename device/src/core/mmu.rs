//! DMA domains: I/O page tables, the IOTLB, invalidation and strict mode.
//!
//! API contract used by the engine (see SPEC.md, "I/O page tables", "IOTLB"):
//! - [`Mmu::translate`] turns an IOVA of a domain into a bus address for one access, with
//!   how many bytes from there stay inside the same page of the mapping (so the engine can
//!   split transfers at page boundaries of whichever mapping size applies);
//! - [`Mmu::translator`] does the same for the pages of one chunk, cheaper per page: one
//!   IOTLB lock hold for many pages, counters added once, a paging-structure cache of
//!   level-1 tables, and [`Translator::translate_run`] for a run of pages contiguous in bus
//!   memory (every page still looked up, walked on a miss and filled one by one);
//! - the engine holds [`Mmu::chunk_gate`] (a read guard) while it translates and moves one
//!   chunk; [`Mmu::invalidate`] drops entries and then takes the write side, so when it
//!   returns no chunk that used a dropped entry is still moving.
//!
//! Structure: the page walker is in `walk` (at most four entry reads, each checked against
//! bus memory first; a level-1 read alone when a translator has the table cached), the
//! cache in `iotlb` (4-way set associative, LRU within a set, behind a mutex).
//! A translation checks the IOVA width, then the domain's mode, then looks the IOTLB up; a
//! miss walks from the domain's root and fills. Mode and root are read when a
//! [`Translator`] is made, once per transfer chunk (SPEC.md "Domain registers": an
//! invalidation waits for the chunk in flight). Only successful translations are cached: a
//! walk that faults, or whose mapping does not allow the access, leaves nothing behind.
//! Cached entries stay until invalidated, whatever happens to the table or the root
//! meanwhile.

mod iotlb;
pub(crate) mod walk;
pub use walk::MapRun;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use tracing::warn;
use vm_memory::GuestMemoryMmap;

use self::iotlb::Iotlb;
use self::walk::{walk, Leaf, WalkFault, SIZE_4K};
use super::bus::Access;
use super::stats::{add, add_locked, DomainCounters, DomainStats};
use crate::spec::*;
use crate::trace::{Event, Tracer, Translated, NO_QUEUE};

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
        /// Length in bytes (not 0). A range running past 2^64 ends at 2^64.
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

impl Translation {
    /// When the page `leaf` maps, reached at `next` (the IOVA right after this run),
    /// allows `access` and continues this run in bus memory: the bytes it adds.
    #[inline(always)]
    fn continued_by(&self, next: u64, leaf: &Leaf, access: Access) -> Option<u64> {
        let offset = next & (leaf.size - 1);
        let contiguous = self.bus.checked_add(self.len) == Some(leaf.bus_page | offset);
        (leaf.allows(access) && contiguous).then_some(leaf.size - offset)
    }
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
    ///
    /// Set for `FAULT_NOT_PRESENT`, `FAULT_MALFORMED_ENTRY` and `FAULT_OUTSIDE_RAM` (the
    /// level of the table whose entry faulted); 0 for `FAULT_PERMISSION` (checked against
    /// the translation, cached or walked, so the same whether it hit or missed),
    /// `FAULT_IOVA_WIDTH` and `FAULT_DOMAIN_DISABLED`.
    pub level: u32,
    /// The fault happened reading a page-table entry (`ACCESS_PAGE_WALK`): only for
    /// `FAULT_OUTSIDE_RAM` of a table (the entry's 8 bytes are not mapped for reading);
    /// `info` is then the table's bus address (4 KiB aligned, for the root too) and
    /// `level` the table's level.
    pub in_walk: bool,
}

/// Register state of one domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainRegs {
    /// Root table bus address as written (bits 11:0 ignored when walking).
    pub root: u64,
    /// `DOMAIN_MODE_*` as written (bits 1:0 of `D_CTRL`; the unassigned mode 3 behaves as
    /// `DOMAIN_MODE_DISABLED`).
    pub mode: u32,
}

/// One domain's registers, readable without a lock on the translation path.
#[derive(Debug)]
struct DomainSlot {
    root: AtomicU64,
    mode: AtomicU32,
}

impl DomainSlot {
    fn load(&self) -> DomainRegs {
        DomainRegs {
            root: self.root.load(Ordering::Acquire),
            mode: self.mode.load(Ordering::Acquire),
        }
    }

    fn store(&self, regs: DomainRegs) {
        self.root.store(regs.root, Ordering::Release);
        self.mode.store(regs.mode, Ordering::Release);
    }
}

/// The device's domains and IOTLB.
///
/// Shared by the register thread (domain registers, invalidation, statistics) and the
/// engine's workers (translation); every method takes `&self`.
#[derive(Debug)]
pub struct Mmu {
    iova_width: u32,
    /// Largest valid IOVA (2^width - 1).
    iova_limit: u64,
    strict: bool,
    iotlb_capacity: usize,
    domains: Vec<DomainSlot>,
    counters: Vec<DomainCounters>,
    /// Per engine worker (queue), its own copy of every domain's counters: one thread
    /// writes it, with plain stores ([`add_locked`]); [`Mmu::domain_stats`] adds them up.
    worker_counters: Vec<Box<[DomainCounters]>>,
    iotlb: Mutex<Iotlb>,
    /// The IOTLB's per-set versions, read without its lock ([`Mmu::recall`]).
    iotlb_versions: std::sync::Arc<[AtomicU64]>,
    gate: RwLock<()>,
    /// Threads waiting for (or holding) the gate's write side: a worker that keeps its
    /// read hold from one descriptor to the next lets it go when this is not 0.
    gate_writers: AtomicU32,
    /// Where translations are recorded (see [`crate::trace`]).
    trace: Tracer,
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
    /// An MMU with `domains` domains in their reset state, an IOVA width of `iova_width`
    /// bits (64 or more: no limit), an IOTLB of `iotlb_entries` entries (0: nothing is
    /// cached, every translation walks) and strict IOTLB mode on or off.
    ///
    /// # Panics
    ///
    /// When `domains` exceeds `MAX_DOMAINS` (the IOTLB packs the domain number into its
    /// keys; `DeviceConfig::validate` refuses such a configuration before it gets here).
    pub fn new(domains: u16, iova_width: u32, iotlb_entries: usize, strict: bool) -> Self {
        assert!(
            u32::from(domains) <= MAX_DOMAINS,
            "{domains} domains: at most {MAX_DOMAINS}"
        );
        let iotlb = Iotlb::new(iotlb_entries);
        let iova_limit = match 1u64.checked_shl(iova_width) {
            Some(top) => top.wrapping_sub(1),
            None => u64::MAX,
        };
        Self {
            iova_width,
            iova_limit,
            strict,
            iotlb_capacity: iotlb_entries,
            domains: (0..usize::from(domains))
                .map(|d| {
                    let regs = reset_regs(d);
                    DomainSlot {
                        root: AtomicU64::new(regs.root),
                        mode: AtomicU32::new(regs.mode),
                    }
                })
                .collect(),
            counters: (0..domains).map(|_| DomainCounters::default()).collect(),
            worker_counters: Vec::new(),
            iotlb_versions: iotlb.versions(),
            iotlb: Mutex::new(iotlb),
            gate: RwLock::new(()),
            gate_writers: AtomicU32::new(0),
            trace: Tracer::off(),
        }
    }

    /// The same MMU recording every translation through `trace`.
    pub fn with_tracer(mut self, trace: Tracer) -> Self {
        self.trace = trace;
        self
    }

    /// The same MMU with a copy of the domain counters for each of `workers` engine
    /// workers ([`Mmu::translator_for`]), so that a worker counts without atomic
    /// read-modify-writes (a locked instruction is ~10 ns, and a descriptor translates at
    /// least three times).
    pub fn with_workers(mut self, workers: u16) -> Self {
        let domains = self.counters.len();
        self.worker_counters = (0..workers)
            .map(|_| (0..domains).map(|_| DomainCounters::default()).collect())
            .collect();
        self
    }

    /// Number of domains.
    pub fn num_domains(&self) -> u16 {
        // `new` takes the count as a u16.
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
        self.lock_iotlb().len()
    }

    /// Register state of domain `d` (None if it does not exist).
    pub fn domain(&self, d: u16) -> Option<DomainRegs> {
        self.domains.get(usize::from(d)).map(DomainSlot::load)
    }

    /// Update domain `d`'s registers (ignored if it does not exist). Takes effect for new
    /// translations (the mode) and walks (the root); the IOTLB is not flushed.
    pub fn set_domain(&self, d: u16, regs: DomainRegs) {
        if let Some(slot) = self.domains.get(usize::from(d)) {
            slot.store(regs);
        }
    }

    /// Translate `iova` of domain `d` for one access.
    ///
    /// In order: an IOVA above the width faults `FAULT_IOVA_WIDTH` (any mode); a domain
    /// that does not exist or is disabled faults `FAULT_DOMAIN_DISABLED`; pass-through
    /// returns the IOVA; a translated domain looks the IOTLB up and on a miss walks the
    /// table and fills. The bus page returned is not checked against bus memory: the
    /// caller checks the access itself (`FAULT_OUTSIDE_RAM` "when the access happens").
    /// Counts in the domain's counters; never panics and never blocks on the chunk gate.
    ///
    /// For several translations in a row (the pages of one chunk) use [`Mmu::translator`].
    pub fn translate(
        &self,
        mem: &GuestMemoryMmap,
        d: u16,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        self.translator(mem, d).translate(iova, access)
    }

    /// A [`Translator`] for several translations in domain `d`, each exactly as
    /// [`Mmu::translate`] does it, at a lower cost per translation. Hold the chunk gate
    /// while it lives and while the translations it gave are used; drop it to publish its
    /// counts. It keeps the IOTLB locked between translations: release it
    /// ([`Translator::release`]) before the same thread translates otherwise, invalidates
    /// or moves data.
    pub fn translator<'a>(&'a self, mem: &'a GuestMemoryMmap, d: u16) -> Translator<'a> {
        self.translator_for(mem, d, None)
    }

    /// [`Mmu::translator`] for engine worker `worker` (made with [`Mmu::with_workers`]),
    /// which counts in its own copy of the domain's counters. Only that worker's thread
    /// may use it (one writer: plain stores), and [`Mmu::reset`] only while the worker is
    /// stopped. None, or a worker the MMU was not made for: the shared counters.
    pub fn translator_for<'a>(
        &'a self,
        mem: &'a GuestMemoryMmap,
        d: u16,
        worker: Option<u16>,
    ) -> Translator<'a> {
        let (counters, exclusive) = self.counters_for(d, worker);
        Translator {
            mmu: self,
            mem,
            d,
            queue: worker.unwrap_or(NO_QUEUE),
            counters,
            exclusive,
            domain: self.domains.get(usize::from(d)).map(|slot| {
                (
                    slot.mode.load(Ordering::Acquire),
                    slot.root.load(Ordering::Acquire),
                )
            }),
            iotlb: None,
            held: 0,
            l1: walk::L1Cache::default(),
            generation: 0,
            counts: Counts::default(),
            pending: [None; 2],
        }
    }

    /// Strict mode: re-walk a hit from the root (no cache) and tell whether the cached
    /// translation no longer matches the table (a different page, permissions, or a
    /// fault); log that once per cached entry. Called with the IOTLB locked (`iotlb`).
    fn is_stale(
        &self,
        mem: &GuestMemoryMmap,
        iotlb: &mut Iotlb,
        d: u16,
        root: u64,
        iova: u64,
        cached: &Leaf,
    ) -> bool {
        let fresh = walk(mem, root, iova);
        if fresh.as_ref() == Ok(cached) {
            return false;
        }
        if iotlb.mark_warned(d, cached) {
            let table = match fresh {
                Ok(leaf) => format!(
                    "bus {:#x} size {:#x} perm {:#x}",
                    leaf.bus_page, leaf.size, leaf.perm
                ),
                Err(f) => format!("fault {} at level {}", f.reason, f.level),
            };
            warn!(
                domain = d,
                iova = format_args!("{iova:#x}"),
                cached = format_args!(
                    "bus {:#x} size {:#x} perm {:#x}",
                    cached.bus_page, cached.size, cached.perm
                ),
                table = %table,
                "strict IOTLB: stale translation used (page table changed without invalidation)"
            );
        }
        true
    }

    /// The read side of the chunk gate; hold it while translating and moving one chunk.
    ///
    /// Do not take it twice in one thread: a waiting [`Mmu::invalidate`] blocks new readers,
    /// so a second read would wait for the writer, which waits for the first.
    pub fn chunk_gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until no chunk that started before this call is still moving (the chunk gate's
    /// write side, taken and released). The transport calls it after it removed a bus
    /// mapping and before it acknowledges the unmap; do not call it while holding
    /// [`Mmu::chunk_gate`].
    pub fn barrier(&self) {
        self.gate_write();
    }

    /// Take the chunk gate's write side and let it go, announced in
    /// [`Mmu::gate_wanted`] meanwhile.
    fn gate_write(&self) {
        self.gate_writers.fetch_add(1, Ordering::SeqCst);
        drop(self.gate.write().unwrap_or_else(PoisonError::into_inner));
        self.gate_writers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether a thread waits for the chunk gate's write side (an invalidation or an unmap
    /// barrier): a reader that keeps its hold across descriptors lets it go now.
    pub fn gate_wanted(&self) -> bool {
        self.gate_writers.load(Ordering::Relaxed) != 0
    }

    /// Drop IOTLB entries; returns once no chunk that used them is still moving. Returns
    /// false (and does nothing) for a domain that does not exist or a range of length 0.
    ///
    /// A range invalidation drops every entry of the domain whose page overlaps the range
    /// (a 2 MiB or 1 GiB entry goes when any byte inside it is in the range). After the
    /// entries are gone it takes the chunk gate's write side, so it waits for every chunk in
    /// flight (any of them may use a dropped entry, or a walk of the old table that was never
    /// cached); do not call it while holding [`Mmu::chunk_gate`].
    pub fn invalidate(&self, inv: Invalidation) -> bool {
        let domains = self.num_domains();
        {
            let mut iotlb = self.lock_iotlb();
            match inv {
                Invalidation::All => iotlb.invalidate_all(),
                Invalidation::Domain(d) if d < domains => iotlb.invalidate_domain(d),
                Invalidation::Range { domain, iova, len } if domain < domains && len != 0 => {
                    iotlb.invalidate_range(domain, iova, iova.saturating_add(len - 1))
                }
                _ => return false,
            };
        }
        self.gate_write();
        true
    }

    /// The shared counters of domain `d` (what translations without a worker count in;
    /// [`Mmu::domain_stats`] has the totals).
    pub fn counters(&self, d: u16) -> Option<&DomainCounters> {
        self.counters.get(usize::from(d))
    }

    /// The counters of domain `d` that `worker` counts in, and whether they are its own
    /// (one writer: add with [`add_locked`]) rather than the shared ones ([`add`]).
    pub(crate) fn counters_for(
        &self,
        d: u16,
        worker: Option<u16>,
    ) -> (Option<&DomainCounters>, bool) {
        let own = worker
            .and_then(|w| self.worker_counters.get(usize::from(w)))
            .and_then(|c| c.get(usize::from(d)));
        match own {
            Some(c) => (Some(c), true),
            None => (self.counters(d), false),
        }
    }

    /// Domain `d`'s counters: the shared ones plus every worker's.
    pub fn domain_stats(&self, d: u16) -> Option<DomainStats> {
        let d = usize::from(d);
        let mut total = self.counters.get(d)?.snapshot();
        for own in &self.worker_counters {
            if let Some(c) = own.get(d) {
                total.add(&c.snapshot());
            }
        }
        Some(total)
    }

    /// Snapshot of every domain's counters.
    pub fn stats(&self) -> Vec<DomainStats> {
        (0..self.num_domains())
            .filter_map(|d| self.domain_stats(d))
            .collect()
    }

    /// Reset: domains to their reset state, IOTLB empty, counters zero.
    ///
    /// Does not wait on the chunk gate: the caller stops the engine first.
    pub fn reset(&self) {
        for (i, slot) in self.domains.iter().enumerate() {
            slot.store(reset_regs(i));
        }
        self.lock_iotlb().invalidate_all();
        self.counters.iter().for_each(DomainCounters::clear);
        for own in &self.worker_counters {
            own.iter().for_each(DomainCounters::clear);
        }
    }

    /// A translation [`Translator::translate_remembered`] gave, for `iova` of domain `d`
    /// and `access`, if it still stands and leaves at least `want` bytes from `iova` to the
    /// end of its page: `iova` is in the part of the page it covers (the 4 KiB page
    /// translated, or the whole mapping page, see `Iotlb::whole_path`), the domain still
    /// translated, and nothing a lookup visits has changed since (the sets of smaller page
    /// sizes, where it missed, or the domain's fill counts of those sizes; and its entry's
    /// set, where the entry is still the most recently used), so a lookup would miss and
    /// hit as it did and change nothing. Counted as that
    /// lookup (a translation, an IOTLB hit) in worker `worker`'s counters (as
    /// [`Mmu::translator_for`] counts). No lock taken; valid, like any translation, while
    /// the caller holds the chunk gate (an invalidation bumps every set's version before it
    /// waits for the gate).
    pub fn recall(
        &self,
        r: &Remembered,
        d: u16,
        iova: u64,
        access: Access,
        want: u64,
        worker: Option<u16>,
    ) -> Option<Translation> {
        if r.paired {
            return None;
        }
        let t = self.still(r, d, iova, access, want)?;
        self.count_recalled(d, worker, 1)?;
        Some(t)
    }

    /// [`Mmu::recall`] of the lookups of one chunk's first page on each side, in the order
    /// the chunk made them (`a`, then `b`), remembered together
    /// ([`Translator::translate_run_remembered`], then [`Translator::refresh`] of `a`'s
    /// after `b`'s lookup): both stand or neither does. Two lookups that hit entries of
    /// one set reorder it (the first moves its entry to the front, the second its own),
    /// but the same two again leave it as they left it: while no version moved since, the
    /// pair changes nothing, whether they share a set or not. Each side is `(remembered,
    /// iova, access, want)`.
    pub fn recall_pair(
        &self,
        d: u16,
        a: (&Remembered, u64, Access, u64),
        b: Option<(&Remembered, u64, Access, u64)>,
        worker: Option<u16>,
    ) -> Option<(Translation, Option<Translation>)> {
        if a.0.paired != b.is_some() || b.is_some_and(|b| b.0.paired) {
            return None;
        }
        let ta = self.still(a.0, d, a.1, a.2, a.3)?;
        let tb = match b {
            Some((r, iova, access, want)) => Some(self.still(r, d, iova, access, want)?),
            None => None,
        };
        self.count_recalled(d, worker, 1 + u64::from(tb.is_some()))?;
        Some((ta, tb))
    }

    /// The translation `r` gives for `iova` if it still stands (see [`Mmu::recall`]), not
    /// counted.
    fn still(
        &self,
        r: &Remembered,
        d: u16,
        iova: u64,
        access: Access,
        want: u64,
    ) -> Option<Translation> {
        let off = iova.wrapping_sub(r.page);
        if r.d != d || r.access != access || off >= r.cover || r.len - off < want {
            return None;
        }
        for &(set, version) in r.path.iter().flatten() {
            if self.iotlb_versions.get(set)?.load(Ordering::Acquire) != version {
                return None;
            }
        }
        let mode = self
            .domains
            .get(usize::from(d))?
            .mode
            .load(Ordering::Acquire);
        if mode & 3 != DOMAIN_MODE_TRANSLATED {
            return None;
        }
        Some(Translation {
            bus: r.bus.wrapping_add(off),
            len: r.len - off,
            page_size: r.size,
        })
    }

    /// Count `n` recalled lookups (translations and IOTLB hits) of domain `d`.
    fn count_recalled(&self, d: u16, worker: Option<u16>, n: u64) -> Option<()> {
        let (counters, exclusive) = self.counters_for(d, worker);
        let c = counters?;
        for counter in [&c.translations, &c.iotlb_hits] {
            if exclusive {
                add_locked(counter, n);
            } else {
                add(counter, n);
            }
        }
        Some(())
    }

    fn lock_iotlb(&self) -> MutexGuard<'_, Iotlb> {
        // The IOTLB's invariants hold between method calls, none of which can panic midway
        // on guest input; a poisoned lock still holds a usable cache.
        self.iotlb.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A translation of one page that its owner may use again without the IOTLB's lock while
/// the IOTLB has not changed ([`Translator::translate_remembered`], [`Mmu::recall`]): what
/// the engine keeps of its ring's and completion records' pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remembered {
    d: u16,
    access: Access,
    /// The first IOVA a recall covers: the 4 KiB page of the IOVA translated, or the whole
    /// mapping page when the domain had no smaller entries ([`Iotlb::whole_path`]).
    page: u64,
    /// Its bus address.
    bus: u64,
    /// Bytes from `page` to the end of the mapping page.
    len: u64,
    /// Bytes from `page` a recall covers (4 KiB, or `len`).
    cover: u64,
    /// Brought up to date after the lookup that followed it ([`Translator::refresh`]):
    /// stands only for itself and that lookup, recalled together ([`Mmu::recall_pair`]).
    paired: bool,
    /// Size of the mapping page.
    size: u64,
    /// The sets a lookup visits to find it, and their versions ([`Iotlb::lookup_path`]).
    path: [Option<(usize, u64)>; 3],
}

/// Translations under one hold of the IOTLB lock before a [`Translator`] releases it to let
/// other translators in (bounds how long a worker translating a long run keeps others
/// waiting).
const LOCK_BUDGET: u32 = 64;

/// Counts of one [`Translator`], added to the domain's counters when it is dropped.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    translations: u64,
    hits: u64,
    misses: u64,
    walks: u64,
    faults: u64,
    stale: u64,
}

impl Counts {
    /// What was counted since `before`.
    fn since(&self, before: &Counts) -> Counts {
        Counts {
            translations: self.translations - before.translations,
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            walks: self.walks - before.walks,
            faults: self.faults - before.faults,
            stale: self.stale - before.stale,
        }
    }

    fn add(&mut self, n: &Counts) {
        self.translations += n.translations;
        self.hits += n.hits;
        self.misses += n.misses;
        self.walks += n.walks;
        self.faults += n.faults;
        self.stale += n.stale;
    }
}

/// A translation [`Translator::translate_run`] made ahead (the page after a run), kept for
/// the call that asks for it; its counts are added then.
#[derive(Debug, Clone, Copy)]
struct Pending {
    iova: u64,
    access: Access,
    result: Result<Translation, TranslationFault>,
    counts: Counts,
}

/// Consecutive translations in one domain (from [`Mmu::translator`]), typically the pages
/// of one chunk. Each translation has exactly the semantics of [`Mmu::translate`]: every
/// page is looked up in the IOTLB, a hit is used even when stale (strict mode re-walks it
/// from the root and counts a stale use), a miss walks and fills, faults are not cached.
/// What is cheaper:
///
/// - the IOTLB lock is taken once for up to `LOCK_BUDGET` (64) translations instead of once
///   or twice for each; walks happen under it. [`Translator::release`] drops it early, and
///   the owner releases it before moving data;
/// - the domain's counters are added to once, when the translator is dropped;
/// - [`Translator::translate_run`] translates a run of pages contiguous in bus memory in one
///   call (still page by page through the IOTLB);
/// - a miss in the 2 MiB IOVA range of a recent walk reads only the level-1 entry (a
///   paging-structure cache of a few level-1 tables, `walk::L1Cache`). That cache lives
///   only as long as the translator and only while the IOTLB's generation is unchanged, so
///   an invalidation (or a reset) drops it as it drops leaf entries, and a fill never
///   carries a walk older than the last invalidation (walk and fill happen under one hold
///   of the lock).
///
/// The owner holds the chunk gate for the translator's whole life and while it uses the
/// translations, as for [`Mmu::translate`].
#[derive(Debug)]
pub struct Translator<'a> {
    mmu: &'a Mmu,
    mem: &'a GuestMemoryMmap,
    d: u16,
    /// The queue whose worker translates ([`NO_QUEUE`]: none), for the trace.
    queue: u16,
    /// The domain's counters (None: the domain does not exist).
    counters: Option<&'a DomainCounters>,
    /// `counters` are this thread's alone (a worker's copy): plain stores.
    exclusive: bool,
    /// The domain's mode and root, read once when the translator is made (per chunk): a
    /// change reaches the device only after an invalidation, and invalidation waits for
    /// the chunk in flight, so one snapshot per chunk is what SPEC.md allows. `None`: the
    /// domain does not exist.
    domain: Option<(u32, u64)>,
    /// The IOTLB while locked.
    iotlb: Option<MutexGuard<'a, Iotlb>>,
    /// Translations under the current hold of the lock.
    held: u32,
    /// The paging-structure cache, valid in IOTLB generation `generation`.
    l1: walk::L1Cache<'a>,
    generation: u64,
    counts: Counts,
    /// The pages after the last runs (one per side of a transfer), translated ahead.
    pending: [Option<Pending>; 2],
}

impl Translator<'_> {
    /// Translate `iova` for one access, as [`Mmu::translate`] does.
    #[inline]
    pub fn translate(
        &mut self,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        if self.mmu.trace.on() {
            let before = self.counts;
            let result = self.translate_untraced(iova, access);
            self.trace(iova, access, &result, &before);
            return result;
        }
        self.translate_untraced(iova, access)
    }

    /// [`Translator::translate`] without a trace event: for the small accesses whose own
    /// event carries the address (descriptor and element fetches, completion records).
    #[inline]
    pub fn translate_quiet(
        &mut self,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        self.translate_untraced(iova, access)
    }

    /// [`Translator::translate_quiet`], and what the caller may remember of it for
    /// [`Mmu::recall`]: a page the IOTLB now holds as its set's most recently used entry
    /// (it hit or was filled just now; never in strict mode, where every hit walks again,
    /// nor without an IOTLB).
    pub fn translate_remembered(
        &mut self,
        iova: u64,
        access: Access,
    ) -> Result<(Translation, Option<Remembered>), TranslationFault> {
        let t = self.translate_now(iova, access)?;
        let remembered = self.remember(iova, access, &t);
        Ok((t, remembered))
    }

    /// [`Translator::translate_run`], and what the caller may remember of it for
    /// [`Mmu::recall`] when the run is the first page alone, translated now (not ahead by
    /// an earlier call) with no look-ahead after it: the run then stands for one lookup.
    pub fn translate_run_remembered(
        &mut self,
        iova: u64,
        access: Access,
        want: u64,
    ) -> (Result<Translation, TranslationFault>, Option<Remembered>) {
        let ahead = self
            .pending
            .iter()
            .flatten()
            .any(|p| p.iova == iova && p.access == access);
        let run = self.translate_run(iova, access, want);
        let remembered = match &run {
            Ok(t) if !ahead && t.len >= want && t.page_size.is_power_of_two() => {
                let in_page = t.page_size - (iova & (t.page_size - 1));
                if t.len == in_page {
                    self.remember(iova, access, t)
                } else {
                    None
                }
            }
            _ => None,
        };
        (run, remembered)
    }

    /// Where this translator is in its hold of the IOTLB's lock, for [`Translator::refresh`].
    pub fn mark(&self) -> u32 {
        self.held
    }

    /// Bring `r`'s versions up to date after exactly one more lookup by this translator
    /// under the same hold of the IOTLB's lock as `r`'s own (`since`: the
    /// [`Translator::mark`] taken right after `r` was remembered; see
    /// [`Mmu::recall_pair`]). False (and `r` unchanged) otherwise.
    ///
    /// The lookup that followed may have evicted `r`'s entry (a set of one way), or cached
    /// a smaller entry in its domain (which ends a whole-page cover): then false too. The
    /// path is taken again as [`Translator::translate_remembered`] takes it.
    pub fn refresh(&self, r: &mut Remembered, since: u32) -> bool {
        let Some(g) = self.iotlb.as_ref() else {
            return false;
        };
        if self.held != since.wrapping_add(1) || !g.holds(r.d, r.page, r.size) {
            return false;
        }
        let path = if r.cover > SIZE_4K {
            g.whole_path(r.d, r.page, r.size)
        } else {
            Some(g.lookup_path(r.d, r.page, r.size))
        };
        let Some(path) = path else {
            return false;
        };
        r.path = path;
        r.paired = true;
        true
    }

    /// What a caller may remember of `t`, the translation of `iova` just made by a lookup
    /// (under the lock still held): its entry is its set's most recently used. Nothing in
    /// strict mode (every hit walks again) or without an IOTLB.
    fn remember(&self, iova: u64, access: Access, t: &Translation) -> Option<Remembered> {
        let cached = !self.mmu.strict && self.mmu.iotlb_capacity > 0 && t.page_size != 0;
        let g = self.iotlb.as_ref().filter(|_| cached)?;
        let size = t.page_size;
        let (page, cover, path) = match g.whole_path(self.d, iova, size) {
            Some(path) => (iova & !(size - 1), size, path),
            None => (
                iova & !(SIZE_4K - 1),
                SIZE_4K,
                g.lookup_path(self.d, iova, size),
            ),
        };
        let off = iova - page;
        let len = t.len + off;
        let cover = cover.min(len);
        Some(Remembered {
            d: self.d,
            access,
            page,
            bus: t.bus - off,
            len,
            cover,
            paired: false,
            size,
            path,
        })
    }

    /// Record a translation made from `iova` (the counts before it: `before`).
    #[cold]
    fn trace(
        &self,
        iova: u64,
        access: Access,
        result: &Result<Translation, TranslationFault>,
        before: &Counts,
    ) {
        let Ok(t) = result else {
            // Faults are recorded as the faults they become.
            return;
        };
        let n = self.counts.since(before);
        self.mmu.trace.record(|| {
            Event::Translate(Translated {
                domain: self.d,
                queue: self.queue,
                iova,
                bus: t.bus,
                len: t.len,
                page_size: t.page_size,
                write: access == Access::Write,
                hits: n.hits as u32,
                misses: n.misses as u32,
            })
        });
    }

    #[inline]
    fn translate_untraced(
        &mut self,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        for slot in &mut self.pending {
            if let Some(p) = slot.filter(|p| p.iova == iova && p.access == access) {
                *slot = None;
                self.counts.add(&p.counts);
                return p.result;
            }
        }
        self.translate_now(iova, access)
    }

    /// Translate the pages from `iova` on for one access, each as [`Translator::translate`]
    /// does, until they cover `want` bytes or a page does not continue the previous one in
    /// bus memory. Returns the translation of `iova` with `len` the bytes from `iova` to the
    /// end of the last page of that contiguous run (at least to the end of `iova`'s page;
    /// a run may end short of `want`, or beyond it).
    ///
    /// A page after the first that does not continue the run, or faults, has been
    /// translated ahead: it is kept for the next call that asks for it (with the same
    /// access), which returns it without translating again; its counts (and its fault's)
    /// are added only then, so a page translated ahead but never asked for (the transfer
    /// stopped before it) is not counted. It is valid, like every translation, while the
    /// owner holds the chunk gate.
    pub fn translate_run(
        &mut self,
        iova: u64,
        access: Access,
        want: u64,
    ) -> Result<Translation, TranslationFault> {
        if self.mmu.trace.on() {
            let before = self.counts;
            let result = self.translate_run_untraced(iova, access, want);
            self.trace(iova, access, &result, &before);
            return result;
        }
        self.translate_run_untraced(iova, access, want)
    }

    #[inline]
    fn translate_run_untraced(
        &mut self,
        iova: u64,
        access: Access,
        want: u64,
    ) -> Result<Translation, TranslationFault> {
        let mut run = self.translate_untraced(iova, access)?;
        while run.len < want {
            self.extend_run(&mut run, iova, access, want);
            if run.len >= want {
                break;
            }
            let Some(next) = iova.checked_add(run.len) else {
                break;
            };
            let before = self.counts;
            match self.translate_now(next, access) {
                Ok(t) if run.bus.checked_add(run.len) == Some(t.bus) => {
                    run.len = run.len.saturating_add(t.len);
                }
                result => {
                    let counts = self.counts.since(&before);
                    self.counts = before;
                    // One per access (the two sides of a copy): replace this access's,
                    // else take a free slot, else the first.
                    let same = |p: &Option<Pending>| p.is_some_and(|p| p.access == access);
                    let i = (self.pending.iter().position(same))
                        .or_else(|| self.pending.iter().position(Option::is_none));
                    self.pending[i.unwrap_or(0)] = Some(Pending {
                        iova: next,
                        access,
                        result,
                        counts,
                    });
                    break;
                }
            }
        }
        Ok(run)
    }

    /// [`Translator::translate_run`]'s fast path: extend `run` (the translation of `iova`
    /// so far) by the pages after it that translate without a fault, continue it in bus
    /// memory and need no strict-mode re-walk, looking each up, walking and filling on a
    /// miss, and counting it, exactly as [`Translator::translate_now`] would. It stops
    /// before the first page that is anything else (a fault, a gap, strict mode, the end
    /// of the lock budget, the end of the IOVA space) with nothing of that page counted or
    /// cached; the general path then translates that page again from the start (a lookup
    /// that hit has only made its entry the most recent, which the second lookup does
    /// again; a walk has filled nothing).
    #[inline(always)]
    fn extend_run(&mut self, run: &mut Translation, iova: u64, access: Access, want: u64) {
        let mmu = self.mmu;
        let (Some((mode, root)), Some(_)) = (self.domain, self.counters) else {
            return;
        };
        if mmu.strict || mode & 3 != DOMAIN_MODE_TRANSLATED {
            return;
        }
        let Some(iotlb) = self.iotlb.as_deref_mut() else {
            return;
        };
        let (d, mem, l1) = (self.d, self.mem, &mut self.l1);
        let root = root & !(walk::SIZE_4K - 1);
        let mut table: Option<walk::L1Table<'_>> = None;
        // Counted in locals, added once: the loop then keeps them in registers.
        let budget = LOCK_BUDGET.saturating_sub(self.held);
        let (mut hits, mut misses) = (0u32, 0u32);
        let mut next = iova.wrapping_add(run.len);
        while run.len < want && hits + misses < budget {
            // The run's end is below 2^64 here (translate_run stops a run that reaches it).
            if next > mmu.iova_limit || next < iova {
                break;
            }
            // The hit and the miss each check and count on their own: merging the two
            // leaves into one value made the compiler pass it through the stack, with
            // store-forwarding stalls on every page.
            let step = match iotlb.probe(d, next) {
                Ok(cached) => {
                    let Some(step) = run.continued_by(next, &cached, access) else {
                        break;
                    };
                    hits += 1;
                    step
                }
                Err(victim) => {
                    // The level-1 table of this 2 MiB range, kept across its pages.
                    let fast = table
                        .filter(|t| t.covers(root, next))
                        .and_then(|t| t.leaf_4k(next));
                    let leaf = match fast {
                        Some(leaf) => leaf,
                        None => {
                            let Ok(leaf) = walk::walk_cached(mem, root, next, l1) else {
                                break;
                            };
                            table = l1.table(root, next);
                            leaf
                        }
                    };
                    let Some(step) = run.continued_by(next, &leaf, access) else {
                        break;
                    };
                    // Probed and walked under this hold of the lock: not cached, the
                    // generation is current and the victim is still the way to fill.
                    iotlb.fill_victim(victim, d, leaf);
                    misses += 1;
                    step
                }
            };
            run.len = run.len.saturating_add(step);
            next = next.wrapping_add(step);
        }
        self.held += hits + misses;
        self.counts.translations += u64::from(hits + misses);
        self.counts.hits += u64::from(hits);
        self.counts.misses += u64::from(misses);
        self.counts.walks += u64::from(misses);
    }

    /// Translate `iova` (not looking at a pending translation) and count it.
    #[inline(always)]
    fn translate_now(
        &mut self,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        let counted = u64::from(self.counters.is_some());
        self.counts.translations += counted;
        let result = self.translate_uncounted(iova, access);
        if result.is_err() {
            self.counts.faults += counted;
        }
        result
    }

    /// Release the IOTLB lock; the next translation takes it again. Call before moving
    /// data.
    pub fn release(&mut self) {
        self.iotlb = None;
    }

    /// Forget what this translator derived from reading page tables, other than IOTLB
    /// entries: the paging-structure cache and the pages translated ahead. For an owner
    /// that found a walk read lost bus memory (zeros, see `core::sigbus`): the next
    /// translation walks again from the root, through the bus memory checks that now
    /// refuse the lost region. (The IOTLB holds only leaves of walks that succeeded; a
    /// walk that read zeros found nothing present and filled nothing.)
    pub fn forget_walks(&mut self) {
        self.l1.clear();
        self.pending = [None; 2];
    }

    #[inline(always)]
    fn translate_uncounted(
        &mut self,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        let fault = |reason| TranslationFault {
            reason,
            iova,
            info: 0,
            level: 0,
            in_walk: false,
        };
        let mmu = self.mmu;
        if iova > mmu.iova_limit {
            return Err(fault(FAULT_IOVA_WIDTH));
        }
        let (Some((mode, root)), Some(_)) = (self.domain, self.counters) else {
            return Err(fault(FAULT_DOMAIN_DISABLED));
        };
        match mode & 3 {
            DOMAIN_MODE_PASSTHROUGH => {
                return Ok(Translation {
                    bus: iova,
                    len: (mmu.iova_limit - iova).saturating_add(1),
                    page_size: 0,
                })
            }
            DOMAIN_MODE_TRANSLATED => {}
            _ => return Err(fault(FAULT_DOMAIN_DISABLED)),
        }
        let iotlb = relock(
            mmu,
            &mut self.iotlb,
            &mut self.held,
            &mut self.l1,
            &mut self.generation,
        );
        let leaf = match iotlb.probe(self.d, iova) {
            Ok(cached) => {
                self.counts.hits += 1;
                if mmu.strict {
                    self.counts.walks += 1;
                    if mmu.is_stale(self.mem, iotlb, self.d, root, iova, &cached) {
                        self.counts.stale += 1;
                    }
                }
                cached
            }
            Err(victim) => {
                self.counts.misses += 1;
                self.counts.walks += 1;
                let leaf = walk::walk_cached(self.mem, root, iova, &mut self.l1)
                    .map_err(|f| walk_fault(f, iova))?;
                if leaf.allows(access) {
                    // Probed and walked under this hold of the lock: not cached, the
                    // generation is current and the victim is still the way to fill.
                    iotlb.fill_victim(victim, self.d, leaf);
                }
                leaf
            }
        };
        if !leaf.allows(access) {
            return Err(fault(FAULT_PERMISSION));
        }
        let offset = iova & (leaf.size - 1);
        Ok(Translation {
            bus: leaf.bus_page | offset,
            len: leaf.size - offset,
            page_size: leaf.size,
        })
    }
}

/// The locked IOTLB of a translator (its `iotlb`, `held`, `l1` and `generation` fields),
/// re-taking the lock after [`LOCK_BUDGET`] translations. Taking it drops the
/// paging-structure cache when an invalidation happened since that was filled.
#[inline(always)]
fn relock<'g, 'a>(
    mmu: &'a Mmu,
    iotlb: &'g mut Option<MutexGuard<'a, Iotlb>>,
    held: &mut u32,
    l1: &mut walk::L1Cache<'a>,
    generation: &mut u64,
) -> &'g mut Iotlb {
    if *held >= LOCK_BUDGET || iotlb.is_none() {
        lock(mmu, iotlb, held, l1, generation);
    }
    *held += 1;
    iotlb.get_or_insert_with(|| mmu.lock_iotlb())
}

/// [`relock`]'s slow path: (re-)take the lock.
#[cold]
fn lock<'a>(
    mmu: &'a Mmu,
    iotlb: &mut Option<MutexGuard<'a, Iotlb>>,
    held: &mut u32,
    l1: &mut walk::L1Cache<'a>,
    generation: &mut u64,
) {
    *iotlb = None;
    let locked = mmu.lock_iotlb();
    if locked.generation() != *generation {
        l1.clear();
        *generation = locked.generation();
    }
    *iotlb = Some(locked);
    *held = 0;
}

impl Drop for Translator<'_> {
    fn drop(&mut self) {
        self.iotlb = None;
        let Some(c) = self.counters else {
            return;
        };
        let n = self.counts;
        for (counter, v) in [
            (&c.translations, n.translations),
            (&c.iotlb_hits, n.hits),
            (&c.iotlb_misses, n.misses),
            (&c.page_walks, n.walks),
            (&c.faults, n.faults),
            (&c.stale_uses, n.stale),
        ] {
            if v != 0 && self.exclusive {
                add_locked(counter, v);
            } else if v != 0 {
                add(counter, v);
            }
        }
    }
}

/// A small deterministic random source for the randomized tests (xorshift64): `next(n)` is
/// in `0..n`.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

/// A walker fault as a translation fault of `iova`.
fn walk_fault(f: WalkFault, iova: u64) -> TranslationFault {
    TranslationFault {
        reason: f.reason,
        iova,
        info: f.info,
        level: f.level,
        in_walk: f.in_walk,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::walk::{SIZE_1G, SIZE_2M, SIZE_4K};
    use super::*;
    use crate::core::bus::check_range;

    const RW: u64 = PTE_R | PTE_W;
    /// Bus memory: 16 MiB at 0 (tables from 0x10_0000, small pages above 0x20_0000),
    /// unmapped from 16 MiB to 1 GiB, then a 1 GiB region at 1 GiB (lazily allocated).
    const LOW: u64 = 16 << 20;
    const GAP: u64 = 0x2000_0000;
    const HIGH: u64 = 0x4000_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), LOW as usize),
            (GuestAddress(HIGH), SIZE_1G as usize),
        ])
        .unwrap()
    }

    /// A test driver's page-table builder: tables from a bump allocator in low memory.
    struct Tables {
        mem: GuestMemoryMmap,
        root: u64,
        next: u64,
    }

    impl Tables {
        fn new() -> Self {
            Self::with_memory(memory())
        }

        fn with_memory(mem: GuestMemoryMmap) -> Self {
            let mut t = Tables {
                mem,
                root: 0,
                next: 0x10_0000,
            };
            t.root = t.alloc();
            t
        }

        fn alloc(&mut self) -> u64 {
            let table = self.next;
            self.next += SIZE_4K;
            self.mem
                .write_slice(&[0u8; SIZE_4K as usize], GuestAddress(table))
                .unwrap();
            table
        }

        fn read(&self, addr: u64) -> u64 {
            self.mem.read_obj::<u64>(GuestAddress(addr)).unwrap()
        }

        fn write(&self, addr: u64, entry: u64) {
            self.mem.write_obj(entry, GuestAddress(addr)).unwrap();
        }

        /// Bus address of the entry for `iova` at `level`, making tables on the way.
        fn slot(&mut self, iova: u64, level: u32) -> u64 {
            let mut table = self.root;
            for l in (level + 1..=4).rev() {
                let addr = table + index(iova, l) * 8;
                let mut e = self.read(addr);
                if e & RW == 0 {
                    e = self.alloc() | RW;
                    self.write(addr, e);
                }
                table = e & PTE_ADDR_MASK;
            }
            table + index(iova, level) * 8
        }

        /// Map the page of `size` at `iova` to `bus` with `perm` (and PS for large pages).
        fn map(&mut self, iova: u64, bus: u64, size: u64, perm: u64) -> u64 {
            let (level, ps) = match size {
                SIZE_4K => (1, 0),
                SIZE_2M => (2, PTE_PS),
                _ => (3, PTE_PS),
            };
            self.set(iova, level, bus | ps | perm)
        }

        /// Write `entry` at `level` for `iova`; returns the entry's bus address.
        fn set(&mut self, iova: u64, level: u32, entry: u64) -> u64 {
            let addr = self.slot(iova, level);
            self.write(addr, entry);
            addr
        }

        fn mmu(&self, strict: bool) -> Mmu {
            self.mmu_with(48, 64, strict)
        }

        fn mmu_with(&self, width: u32, entries: usize, strict: bool) -> Mmu {
            let mmu = Mmu::new(4, width, entries, strict);
            mmu.set_domain(
                1,
                DomainRegs {
                    root: self.root,
                    mode: DOMAIN_MODE_TRANSLATED,
                },
            );
            mmu
        }
    }

    fn index(iova: u64, level: u32) -> u64 {
        (iova >> (12 + 9 * (level - 1))) & 511
    }

    fn tr(
        mmu: &Mmu,
        t: &Tables,
        iova: u64,
        access: Access,
    ) -> Result<Translation, TranslationFault> {
        mmu.translate(&t.mem, 1, iova, access)
    }

    /// Tables of domain 1 mapping the 4 KiB pages 0..4 to 0x30_0000 onwards, read-write.
    fn four_pages() -> Tables {
        let mut t = Tables::new();
        for i in 0..4 {
            t.map(i * SIZE_4K, 0x30_0000 + i * SIZE_4K, SIZE_4K, RW);
        }
        t
    }

    fn ok(bus: u64, len: u64, page_size: u64) -> Result<Translation, TranslationFault> {
        Ok(Translation {
            bus,
            len,
            page_size,
        })
    }

    fn err(
        reason: u8,
        iova: u64,
        info: u64,
        level: u32,
        in_walk: bool,
    ) -> Result<Translation, TranslationFault> {
        Err(TranslationFault {
            reason,
            iova,
            info,
            level,
            in_walk,
        })
    }

    fn stats(mmu: &Mmu, d: u16) -> DomainStats {
        mmu.stats()[usize::from(d)]
    }

    #[test]
    fn spec_worked_example_2m() {
        // SPEC.md "Example: mapping a 2 MiB page", entry for entry.
        let t = Tables::new();
        assert_eq!(t.root, 0x10_0000);
        t.write(0x10_0000, 0x0000_0000_0010_1003);
        t.write(0x10_1000 + 8, 0x0000_0000_0010_2003);
        t.write(0x10_2000 + 8, 0x0000_0001_0000_0083);
        let mmu = t.mmu(false);
        assert_eq!(
            tr(&mmu, &t, 0x4020_1234, Access::Write),
            ok(0x1_0000_1234, SIZE_2M - 0x1234, SIZE_2M)
        );
    }

    #[test]
    fn maps_4k_2m_1g_with_lengths_to_page_end() {
        let mut t = Tables::new();
        t.map(0x7000, 0x30_0000, SIZE_4K, RW);
        t.map(0x20_0000, 0x60_0000, SIZE_2M, RW);
        t.map(0x8000_0000, HIGH, SIZE_1G, RW);
        t.map(0x1_2345_6000, 0x31_0000, SIZE_4K, PTE_R); // deep in other tables
        let mmu = t.mmu(false);
        let cases = [
            (0x7000, ok(0x30_0000, SIZE_4K, SIZE_4K)),
            (0x7abc, ok(0x30_0abc, 0x544, SIZE_4K)),
            (0x7fff, ok(0x30_0fff, 1, SIZE_4K)),
            (0x20_0000, ok(0x60_0000, SIZE_2M, SIZE_2M)),
            (0x30_1000, ok(0x70_1000, 0xf_f000, SIZE_2M)),
            (0x3f_ffff, ok(0x7f_ffff, 1, SIZE_2M)),
            (0x8000_0000, ok(HIGH, SIZE_1G, SIZE_1G)),
            (0x8000_1234, ok(HIGH + 0x1234, SIZE_1G - 0x1234, SIZE_1G)),
            (0xbfff_ffff, ok(HIGH + SIZE_1G - 1, 1, SIZE_1G)),
        ];
        for (iova, want) in cases {
            for access in [Access::Read, Access::Write] {
                // Twice: once walked, once from the IOTLB.
                assert_eq!(tr(&mmu, &t, iova, access), want, "{iova:#x}");
                assert_eq!(tr(&mmu, &t, iova, access), want, "{iova:#x}");
            }
            let got = want.unwrap();
            assert_eq!(check_range(&t.mem, got.bus, got.len, Access::Write), Ok(()));
        }
        assert_eq!(
            tr(&mmu, &t, 0x1_2345_6789, Access::Read),
            ok(0x31_0789, 0x877, SIZE_4K)
        );
        // The next page after each mapping is not mapped.
        for iova in [0x8000, 0x40_0000, 0xc000_0000] {
            assert_eq!(
                tr(&mmu, &t, iova, Access::Read).unwrap_err().reason,
                FAULT_NOT_PRESENT
            );
        }
    }

    #[test]
    fn not_present_at_each_level() {
        let mut t = Tables::new();
        let mmu = t.mmu(false);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            err(FAULT_NOT_PRESENT, 0x1000, 0, 4, false)
        );
        t.slot(0x1000, 3);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            err(FAULT_NOT_PRESENT, 0x1000, 0, 3, false)
        );
        t.slot(0x1000, 2);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            err(FAULT_NOT_PRESENT, 0x1000, 0, 2, false)
        );
        t.slot(0x1000, 1);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            err(FAULT_NOT_PRESENT, 0x1000, 0, 1, false)
        );
        // R = W = 0 is not present whatever the other bits say.
        t.set(
            0x1000,
            1,
            PTE_RESERVED_MASK | PTE_PS | PTE_ADDR_MASK | 0xf00,
        );
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            err(FAULT_NOT_PRESENT, 0x1000, 0, 1, false)
        );
        // Bits 11:8 are ignored.
        t.set(0x1000, 1, 0x30_0000 | 0xf00 | PTE_R);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            ok(0x30_0000, SIZE_4K, SIZE_4K)
        );
        let s = stats(&mmu, 1);
        assert_eq!(
            (s.translations, s.faults, s.page_walks, s.iotlb_misses),
            (6, 5, 6, 6)
        );
        assert_eq!(mmu.iotlb_len(), 1, "faults are not cached");
    }

    #[test]
    fn malformed_entries() {
        let mut t = Tables::new();
        let mmu = t.mmu(false);
        let fault = |t: &Tables, iova| tr(&mmu, t, iova, Access::Read);

        // PS at level 4.
        let l4 = 0x20_0000 | PTE_PS | RW;
        t.set(0x1000, 4, l4);
        assert_eq!(
            fault(&t, 0x1000),
            err(FAULT_MALFORMED_ENTRY, 0x1000, l4, 4, false)
        );
        t.set(0x1000, 4, 0);

        // PS at level 1.
        let l1 = 0x30_0000 | PTE_PS | RW;
        t.set(0x1000, 1, l1);
        assert_eq!(
            fault(&t, 0x1000),
            err(FAULT_MALFORMED_ENTRY, 0x1000, l1, 1, false)
        );

        // Misaligned 2 MiB leaf (bits 20:12 not zero).
        let l2 = 0x60_1000 | PTE_PS | RW;
        t.set(0x4000_0000, 2, l2);
        assert_eq!(
            fault(&t, 0x4000_0000),
            err(FAULT_MALFORMED_ENTRY, 0x4000_0000, l2, 2, false)
        );
        t.set(0x4000_0000, 2, 0x60_0000 | PTE_PS | RW);
        assert_eq!(fault(&t, 0x4000_0000), ok(0x60_0000, SIZE_2M, SIZE_2M));

        // Misaligned 1 GiB leaf (bits 29:12 not zero), a 2 MiB-aligned address included.
        for bus in [HIGH + 0x20_0000, HIGH + 0x1000] {
            let l3 = bus | PTE_PS | RW;
            t.set(0x80_0000_0000, 3, l3);
            assert_eq!(
                fault(&t, 0x80_0000_0000),
                err(FAULT_MALFORMED_ENTRY, 0x80_0000_0000, l3, 3, false)
            );
        }

        // Reserved bits, at a table level and at a leaf, each reserved bit alone.
        for bit in (0..64).filter(|b| PTE_RESERVED_MASK & (1u64 << b) != 0) {
            let leaf = 0x30_0000 | RW | (1u64 << bit);
            t.set(0x1000, 1, leaf);
            assert_eq!(
                fault(&t, 0x1000),
                err(FAULT_MALFORMED_ENTRY, 0x1000, leaf, 1, false)
            );
        }
        t.set(0x1000, 1, 0x30_0000 | RW);
        let addr = t.slot(0x1000, 3);
        let good = t.read(addr);
        t.write(addr, good | (1 << 63));
        assert_eq!(
            fault(&t, 0x1000),
            err(FAULT_MALFORMED_ENTRY, 0x1000, good | (1 << 63), 3, false)
        );
        t.write(addr, good);
        assert_eq!(fault(&t, 0x1000), ok(0x30_0000, SIZE_4K, SIZE_4K));
    }

    #[test]
    fn tables_outside_bus_memory() {
        let mut t = Tables::new();
        let mmu = t.mmu(false);
        // The root itself in the gap.
        mmu.set_domain(
            1,
            DomainRegs {
                root: GAP | 0xabc,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        let iova = 0x80_4000_0000; // L4 index 1
        assert_eq!(
            tr(&mmu, &t, iova, Access::Read),
            err(FAULT_OUTSIDE_RAM, iova, GAP, 4, true)
        );
        mmu.set_domain(
            1,
            DomainRegs {
                root: t.root,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        // A level-3 table in the gap, a level-1 table past the end of the address field.
        t.set(iova, 4, GAP | RW);
        assert_eq!(
            tr(&mmu, &t, iova, Access::Read),
            err(FAULT_OUTSIDE_RAM, iova, GAP, 3, true)
        );
        t.set(0x1000, 2, PTE_ADDR_MASK | RW);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            err(FAULT_OUTSIDE_RAM, 0x1000, PTE_ADDR_MASK, 1, true)
        );
        // The last page of a region is a usable table.
        t.set(0x1000, 2, (LOW - SIZE_4K) | RW);
        t.write(LOW - SIZE_4K + 8, 0x30_0000 | RW);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            ok(0x30_0000, SIZE_4K, SIZE_4K)
        );
        // A leaf pointing outside bus memory translates; the access itself is the caller's.
        t.write(LOW - SIZE_4K + 8, GAP | RW);
        mmu.invalidate(Invalidation::All);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read),
            ok(GAP, SIZE_4K, SIZE_4K)
        );
    }

    #[test]
    fn table_partly_outside_bus_memory() {
        // A region that ends half-way through a table (a VMM may map any length): the
        // entries inside work, the others fault with the table's address.
        let half = 0x20_0000;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (half + 0x800) as usize)]).unwrap();
        let mut t = Tables::with_memory(mem);
        t.set(0, 2, half | RW);
        t.write(half, 0x30_0000 | RW);
        let mmu = t.mmu(false);
        assert_eq!(
            tr(&mmu, &t, 0x80, Access::Read),
            ok(0x30_0080, 0xf80, SIZE_4K)
        );
        let iova = 300 * SIZE_4K;
        assert_eq!(
            tr(&mmu, &t, iova, Access::Read),
            err(FAULT_OUTSIDE_RAM, iova, half, 1, true)
        );
    }

    #[test]
    fn self_pointing_table_maps_itself() {
        let t = Tables::new();
        // L4[0] points at the root, and so does every level below: four reads of the root.
        t.write(t.root, t.root | RW);
        let mmu = t.mmu(false);
        assert_eq!(
            tr(&mmu, &t, 0x123, Access::Write),
            ok(t.root + 0x123, SIZE_4K - 0x123, SIZE_4K)
        );
        assert_eq!(stats(&mmu, 1).page_walks, 1);
        // With PS the root is a misaligned large page.
        t.write(t.root, t.root | PTE_PS | RW);
        mmu.invalidate(Invalidation::All);
        assert_eq!(
            tr(&mmu, &t, 0, Access::Read).unwrap_err().reason,
            FAULT_MALFORMED_ENTRY
        );
    }

    #[test]
    fn garbage_tables_never_panic() {
        let t = Tables::new();
        let mmu = t.mmu_with(48, 8, true);
        // Fill sixteen tables (the root and what follows it) with pseudo-random entries, with
        // a bias towards present entries pointing back into them.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..16 * 512 {
            let r = rng();
            let e = match r % 4 {
                0 => r,
                1 => (t.root + (r >> 8) % 16 * SIZE_4K) | (r & 0x83),
                2 => (r & PTE_ADDR_MASK) | RW | (r & PTE_PS),
                _ => t.root | RW,
            };
            t.write(t.root + i * 8, e);
        }
        let mut reasons = [0u32; 8];
        for _ in 0..20_000 {
            let iova = rng() & ((1 << 48) - 1);
            let access = if iova & 1 == 0 {
                Access::Read
            } else {
                Access::Write
            };
            match tr(&mmu, &t, iova, access) {
                Ok(tl) => {
                    assert!(tl.len >= 1 && tl.len <= tl.page_size);
                    reasons[0] += 1;
                }
                Err(f) => {
                    assert!(matches!(
                        f.reason,
                        FAULT_NOT_PRESENT
                            | FAULT_PERMISSION
                            | FAULT_MALFORMED_ENTRY
                            | FAULT_OUTSIDE_RAM
                    ));
                    assert!(f.level <= 4);
                    reasons[usize::from(f.reason)] += 1;
                }
            }
        }
        // The seed is fixed; it reaches every outcome a table can give.
        for outcome in [
            0,
            FAULT_NOT_PRESENT,
            FAULT_PERMISSION,
            FAULT_MALFORMED_ENTRY,
            FAULT_OUTSIDE_RAM,
        ] {
            assert!(reasons[usize::from(outcome)] > 0, "{reasons:?}");
        }
        assert!(mmu.iotlb_len() <= 8);
        let s = stats(&mmu, 1);
        assert_eq!(s.translations, 20_000);
        assert_eq!(s.iotlb_hits + s.iotlb_misses, 20_000);
        assert!(s.page_walks >= s.iotlb_misses);
    }

    #[test]
    fn permissions_are_anded_over_levels() {
        let mut t = Tables::new();
        t.map(0x1000, 0x30_0000, SIZE_4K, RW);
        t.map(0x2000, 0x31_0000, SIZE_4K, PTE_R);
        t.map(0x3000, 0x32_0000, SIZE_4K, PTE_W);
        // Under an L4 entry that only allows reads, a RW leaf is read-only.
        let big = 0x80_0000_0000;
        t.map(big, 0x33_0000, SIZE_4K, RW);
        let l4 = t.slot(big, 4);
        t.write(l4, t.read(l4) & !PTE_W);
        // Under a write-only L2 entry, a RW 2 MiB leaf... is a leaf: an L3 table entry that is
        // write-only makes the leaf below it write-only.
        let w_only = 0x4000_0000;
        t.map(w_only, 0x60_0000, SIZE_2M, RW);
        let l3 = t.slot(w_only, 3);
        t.write(l3, t.read(l3) & !PTE_R);
        let mmu = t.mmu(false);
        let perm = |iova| TranslationFault {
            reason: FAULT_PERMISSION,
            iova,
            info: 0,
            level: 0,
            in_walk: false,
        };
        for round in 0..2 {
            // Round 0 walks, round 1 hits what round 0 cached.
            assert!(tr(&mmu, &t, 0x1000, Access::Write).is_ok(), "{round}");
            assert!(tr(&mmu, &t, 0x2000, Access::Read).is_ok());
            assert_eq!(tr(&mmu, &t, 0x2000, Access::Write), Err(perm(0x2000)));
            assert!(tr(&mmu, &t, 0x3000, Access::Write).is_ok());
            assert_eq!(tr(&mmu, &t, 0x3000, Access::Read), Err(perm(0x3000)));
            assert!(tr(&mmu, &t, big, Access::Read).is_ok());
            assert_eq!(tr(&mmu, &t, big + 8, Access::Write), Err(perm(big + 8)));
            assert!(tr(&mmu, &t, w_only, Access::Write).is_ok());
            assert_eq!(
                tr(&mmu, &t, w_only + 8, Access::Read),
                Err(perm(w_only + 8))
            );
        }
        let s = stats(&mmu, 1);
        assert_eq!(s.faults, 8);
        assert_eq!(
            s.iotlb_misses, 5,
            "one walk per page; the permission faults hit"
        );
        assert_eq!(s.iotlb_hits, 13);
    }

    #[test]
    fn permission_fault_on_a_miss_is_not_cached() {
        let mut t = Tables::new();
        t.map(0x2000, 0x31_0000, SIZE_4K, PTE_R);
        let mmu = t.mmu(false);
        assert_eq!(
            tr(&mmu, &t, 0x2000, Access::Write).unwrap_err().reason,
            FAULT_PERMISSION
        );
        assert_eq!(mmu.iotlb_len(), 0);
        // The driver grants the write; without an invalidation the next write walks again.
        t.map(0x2000, 0x31_0000, SIZE_4K, RW);
        assert!(tr(&mmu, &t, 0x2000, Access::Write).is_ok());
        assert_eq!(stats(&mmu, 1).page_walks, 2);
    }

    #[test]
    fn iova_width_32_in_every_mode() {
        let mut t = Tables::new();
        t.map(0xffff_f000, 0x30_0000, SIZE_4K, RW);
        t.map(0x1_0000_0000, 0x31_0000, SIZE_4K, RW);
        let mmu = t.mmu_with(IOVA_WIDTH_32, 64, false);
        mmu.set_domain(
            2,
            DomainRegs {
                root: 0,
                mode: DOMAIN_MODE_DISABLED,
            },
        );
        assert_eq!(
            tr(&mmu, &t, 0xffff_ffff, Access::Read),
            ok(0x30_0fff, 1, SIZE_4K)
        );
        for d in 0..=3 {
            for iova in [1 << 32, 0x1_0000_0fff, u64::MAX] {
                assert_eq!(
                    mmu.translate(&t.mem, d, iova, Access::Read),
                    err(FAULT_IOVA_WIDTH, iova, 0, 0, false),
                    "domain {d}"
                );
            }
        }
        // Pass-through: up to the top of the 4 GiB space.
        assert_eq!(
            mmu.translate(&t.mem, 0, 0xffff_f000, Access::Write),
            ok(0xffff_f000, 0x1000, 0)
        );
        assert_eq!(mmu.translate(&t.mem, 0, 0, Access::Read), ok(0, 1 << 32, 0));
        // No walk for a width fault; faults counted for existing domains.
        let s = stats(&mmu, 1);
        assert_eq!((s.translations, s.faults, s.page_walks), (4, 3, 1));
        assert_eq!(stats(&mmu, 0).faults, 3);
    }

    #[test]
    fn iova_width_48_pass_through_and_domain_modes() {
        let t = Tables::new();
        let mmu = t.mmu(false);
        let top = (1u64 << 48) - 1;
        assert_eq!(mmu.translate(&t.mem, 0, top, Access::Read), ok(top, 1, 0));
        assert_eq!(
            mmu.translate(&t.mem, 0, top + 1, Access::Read),
            err(FAULT_IOVA_WIDTH, top + 1, 0, 0, false)
        );
        for d in [2, 3, 4, 100, u16::MAX] {
            assert_eq!(
                mmu.translate(&t.mem, d, 0x1000, Access::Read),
                err(FAULT_DOMAIN_DISABLED, 0x1000, 0, 0, false)
            );
        }
        mmu.set_domain(
            3,
            DomainRegs {
                root: t.root,
                mode: 3,
            },
        );
        assert_eq!(
            mmu.translate(&t.mem, 3, 0, Access::Read)
                .unwrap_err()
                .reason,
            FAULT_DOMAIN_DISABLED
        );
        assert_eq!(stats(&mmu, 0).page_walks, 0);
        assert_eq!(stats(&mmu, 3).faults, 2);
        // Width 64 (no limit) does not overflow.
        let wide = Mmu::new(1, 64, 4, false);
        assert_eq!(
            wide.translate(&t.mem, 0, u64::MAX, Access::Read),
            ok(u64::MAX, 1, 0)
        );
    }

    #[test]
    fn iotlb_hits_misses_and_lru_eviction() {
        let t = four_pages();
        let mmu = t.mmu_with(48, 3, false);
        let (a, b, c, d) = (0, SIZE_4K, 2 * SIZE_4K, 3 * SIZE_4K);
        let walks = |mmu: &Mmu| stats(mmu, 1).page_walks;
        for iova in [a, b, c] {
            tr(&mmu, &t, iova, Access::Read).unwrap();
        }
        assert_eq!((mmu.iotlb_len(), walks(&mmu)), (3, 3));
        tr(&mmu, &t, a + 8, Access::Read).unwrap(); // hit: recency a, c, b
        assert_eq!(walks(&mmu), 3);
        tr(&mmu, &t, d, Access::Read).unwrap(); // miss: evicts b
        assert_eq!((mmu.iotlb_len(), walks(&mmu)), (3, 4));
        tr(&mmu, &t, a, Access::Read).unwrap(); // hit
        tr(&mmu, &t, c, Access::Read).unwrap(); // hit
        assert_eq!(walks(&mmu), 4);
        tr(&mmu, &t, b, Access::Read).unwrap(); // miss: b was evicted; evicts d
        assert_eq!(walks(&mmu), 5);
        tr(&mmu, &t, d, Access::Read).unwrap(); // miss
        assert_eq!(walks(&mmu), 6);
        let s = stats(&mmu, 1);
        assert_eq!(
            (s.translations, s.iotlb_hits, s.iotlb_misses, s.faults),
            (9, 3, 6, 0)
        );
        assert_eq!(mmu.iotlb_len(), 3);
        assert_eq!(mmu.iotlb_capacity(), 3);
    }

    /// Two lookups remembered together (a chunk's first page on each side) stand for the
    /// same two lookups again: recalled as a pair while no version moved since the second,
    /// even when they share a set whose order each reorders, and leaving the IOTLB as the
    /// two real lookups leave it; not after a third lookup in their set, nor remembered
    /// when another lookup came between them.
    #[test]
    fn a_pair_of_lookups_is_recalled_while_the_iotlb_is_unchanged() {
        let t = four_pages();
        // One set of three ways: every page shares it.
        let mmu = t.mmu_with(48, 3, false);
        let (a, b, c) = (0, SIZE_4K, 2 * SIZE_4K);
        let pair = |first: u64, second: u64| {
            let mut tr = mmu.translator(&t.mem, 1);
            let (_, ra) = tr.translate_run_remembered(first, Access::Read, 64);
            let mark = tr.mark();
            let (_, rb) = tr.translate_run_remembered(second, Access::Write, 64);
            let mut ra = ra.unwrap();
            (tr.refresh(&mut ra, mark), ra, rb.unwrap())
        };
        let (refreshed, ra, rb) = pair(a, b); // two misses: fills a, then b
        assert!(refreshed);
        // Alone, a's lookup no longer stands for a hit that changes nothing (b came after).
        assert_eq!(mmu.recall(&ra, 1, a, Access::Read, 1, None), None);
        let recency = mmu.lock_iotlb().recency(1);
        let before = stats(&mmu, 1);
        let recalled = mmu.recall_pair(
            1,
            (&ra, a + 8, Access::Read, 64),
            Some((&rb, b + 8, Access::Write, 64)),
            None,
        );
        assert_eq!(
            recalled,
            Some((
                ok(0x30_0008, SIZE_4K - 8, SIZE_4K).unwrap(),
                Some(ok(0x30_1008, SIZE_4K - 8, SIZE_4K).unwrap())
            ))
        );
        let after = stats(&mmu, 1);
        assert_eq!(after.translations - before.translations, 2);
        assert_eq!(after.iotlb_hits - before.iotlb_hits, 2);
        // The real lookups, a then b, reorder the set twice and leave it as it was.
        assert_eq!(mmu.lock_iotlb().recency(1), recency);
        tr(&mmu, &t, a, Access::Read).unwrap();
        tr(&mmu, &t, b, Access::Write).unwrap();
        assert_eq!(mmu.lock_iotlb().recency(1), recency);
        let (_, ra2, rb2) = pair(a, b);
        assert!(mmu
            .recall_pair(
                1,
                (&ra2, a, Access::Read, 1),
                Some((&rb2, b, Access::Write, 1)),
                None
            )
            .is_some());
        // Each side's access and coverage count.
        assert_eq!(
            mmu.recall_pair(
                1,
                (&ra2, a, Access::Write, 1),
                Some((&rb2, b, Access::Write, 1)),
                None
            ),
            None
        );
        assert_eq!(
            mmu.recall_pair(
                1,
                (&ra2, a, Access::Read, SIZE_4K + 1),
                Some((&rb2, b, Access::Write, 1)),
                None
            ),
            None
        );
        // A third lookup in the set: the pair no longer stands.
        tr(&mmu, &t, c, Access::Read).unwrap();
        assert_eq!(
            mmu.recall_pair(
                1,
                (&ra2, a, Access::Read, 1),
                Some((&rb2, b, Access::Write, 1)),
                None
            ),
            None
        );
        // Another lookup between the two: a's cannot be brought up to date.
        let mut tr2 = mmu.translator(&t.mem, 1);
        let (_, ra) = tr2.translate_run_remembered(a, Access::Read, 64);
        let mark = tr2.mark();
        tr2.translate_run(c, Access::Read, 64).unwrap();
        tr2.translate_run(b, Access::Read, 64).unwrap();
        assert!(!tr2.refresh(&mut ra.unwrap(), mark));
        // A set of one way: b's fill evicts a, whose pair cannot stand (a real lookup of a
        // would miss and walk).
        let one = t.mmu_with(48, 1, false);
        let mut tr1 = one.translator(&t.mem, 1);
        let (_, ra) = tr1.translate_run_remembered(a, Access::Read, 64);
        let mark = tr1.mark();
        let (_, rb) = tr1.translate_run_remembered(b, Access::Write, 64);
        assert!(rb.is_some());
        assert!(!tr1.refresh(&mut ra.unwrap(), mark), "a was evicted by b");
    }

    /// A remembered translation stands for a hit on its set's most recently used entry: it
    /// is recalled (and counted as that hit) while nothing in the IOTLB changes, and not
    /// after a hit that reorders its set, a fill, an invalidation, a domain disabled or a
    /// reset; nothing is remembered in strict mode or without an IOTLB.
    #[test]
    fn remembered_translations_last_while_the_iotlb_is_unchanged() {
        let mut t = four_pages();
        // Three entries: one set of three ways, so every page shares it.
        let mmu = t.mmu_with(48, 3, false);
        let remember = |iova: u64, access: Access| {
            mmu.translator(&t.mem, 1)
                .translate_remembered(iova, access)
                .unwrap()
        };
        let (a, b) = (0, SIZE_4K);
        let (ta, r) = remember(a + 8, Access::Read); // miss: fills a
        let r = r.expect("a cached page is remembered");
        assert_eq!(ta, ok(0x30_0008, SIZE_4K - 8, SIZE_4K).unwrap());
        let before = stats(&mmu, 1);
        // The same page, another offset: recalled, counted as a hit.
        assert_eq!(
            mmu.recall(&r, 1, a + 0x100, Access::Read, 1, None),
            Some(Translation {
                bus: 0x30_0100,
                len: SIZE_4K - 0x100,
                page_size: SIZE_4K
            })
        );
        let after = stats(&mmu, 1);
        assert_eq!(after.translations - before.translations, 1);
        assert_eq!(after.iotlb_hits - before.iotlb_hits, 1);
        assert_eq!(after.page_walks, before.page_walks);
        // Another page, another access or another domain: not this one.
        assert_eq!(mmu.recall(&r, 1, b, Access::Read, 1, None), None);
        assert_eq!(mmu.recall(&r, 1, a, Access::Write, 1, None), None);
        assert_eq!(mmu.recall(&r, 2, a, Access::Read, 1, None), None);
        // A hit on a (already the most recent) changes nothing: still recalled.
        tr(&mmu, &t, a, Access::Read).unwrap();
        assert!(mmu.recall(&r, 1, a, Access::Read, 1, None).is_some());
        // More than the page leaves from there: not recalled (and not counted).
        let before = stats(&mmu, 1);
        assert_eq!(mmu.recall(&r, 1, a + 8, Access::Read, SIZE_4K, None), None);
        assert_eq!(stats(&mmu, 1).translations, before.translations);
        // A fill of b changes the set: no longer recalled; remembered again, it is.
        tr(&mmu, &t, b, Access::Read).unwrap();
        assert_eq!(mmu.recall(&r, 1, a, Access::Read, 1, None), None);
        let r = remember(a, Access::Read).1.unwrap(); // hit: a is the most recent again
        assert!(mmu.recall(&r, 1, a, Access::Read, 1, None).is_some());
        // A hit on b reorders the set (b before a): the recall would skip that reordering.
        tr(&mmu, &t, b, Access::Read).unwrap();
        assert_eq!(mmu.recall(&r, 1, a, Access::Read, 1, None), None);
        // An invalidation, a disabled domain, a reset.
        let r = remember(a, Access::Read).1.unwrap();
        mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 3 * SIZE_4K,
            len: SIZE_4K,
        });
        assert_eq!(mmu.recall(&r, 1, a, Access::Read, 1, None), None);
        let r = remember(a, Access::Read).1.unwrap();
        mmu.set_domain(
            1,
            DomainRegs {
                root: t.root,
                mode: DOMAIN_MODE_DISABLED,
            },
        );
        assert_eq!(mmu.recall(&r, 1, a, Access::Read, 1, None), None);
        mmu.set_domain(
            1,
            DomainRegs {
                root: t.root,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        assert!(mmu.recall(&r, 1, a, Access::Read, 1, None).is_some());
        mmu.reset();
        assert_eq!(mmu.recall(&r, 1, a, Access::Read, 1, None), None);
        // A large page in a domain with no smaller entry cached: a recall covers the whole
        // page (a lookup of any 4 KiB page in it misses in the 4 KiB sets, whichever it
        // visits, and hits the same entry)...
        t.map(0x40_0000, 0x60_0000, SIZE_2M, RW);
        let mmu = t.mmu_with(48, 3, false);
        let remember_big = |iova: u64| {
            mmu.translator(&t.mem, 1)
                .translate_remembered(iova, Access::Read)
                .unwrap()
        };
        let (big, r) = remember_big(0x40_0008);
        assert_eq!(big, ok(0x60_0008, SIZE_2M - 8, SIZE_2M).unwrap());
        let r = r.unwrap();
        for (iova, bus) in [(0x40_0ff0, 0x60_0ff0), (0x41_2340, 0x61_2340)] {
            assert_eq!(
                mmu.recall(&r, 1, iova, Access::Read, 1, None),
                Some(Translation {
                    bus,
                    len: SIZE_2M - (iova - 0x40_0000),
                    page_size: SIZE_2M
                })
            );
        }
        assert_eq!(mmu.recall(&r, 1, 0x60_0000, Access::Read, 1, None), None);
        // ... until the domain caches a 4 KiB entry (which a lookup of its page would
        // find first); remembered then, a large page covers its 4 KiB page alone.
        tr(&mmu, &t, a, Access::Write).unwrap();
        assert_eq!(mmu.recall(&r, 1, 0x41_2340, Access::Read, 1, None), None);
        let r = remember_big(0x40_0008).1.unwrap();
        assert!(mmu
            .recall(&r, 1, 0x40_0ff0, Access::Read, 1, None)
            .is_some());
        assert_eq!(mmu.recall(&r, 1, 0x40_1000, Access::Read, 1, None), None);
        // Once the 4 KiB entry is invalidated, the whole page again.
        mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: a,
            len: SIZE_4K,
        });
        let r = remember_big(0x40_0008).1.unwrap();
        assert!(mmu
            .recall(&r, 1, 0x41_2340, Access::Read, 1, None)
            .is_some());
        // Strict mode re-walks every hit; no IOTLB caches nothing: nothing remembered.
        for mmu in [t.mmu_with(48, 3, true), t.mmu_with(48, 0, false)] {
            let (_, r) = mmu
                .translator(&t.mem, 1)
                .translate_remembered(a, Access::Read)
                .unwrap();
            assert_eq!(r, None);
        }
    }

    #[test]
    fn domains_do_not_share_entries() {
        let mut t = Tables::new();
        t.map(0x1000, 0x30_0000, SIZE_4K, RW);
        let mmu = t.mmu(false);
        mmu.set_domain(
            2,
            DomainRegs {
                root: t.root,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        tr(&mmu, &t, 0x1000, Access::Read).unwrap();
        mmu.translate(&t.mem, 2, 0x1000, Access::Read).unwrap();
        assert_eq!(stats(&mmu, 1).iotlb_misses, 1);
        assert_eq!(stats(&mmu, 2).iotlb_misses, 1);
        assert_eq!(mmu.iotlb_len(), 2);
    }

    /// Map 0x1000 to `bus` (no invalidation).
    fn remap(t: &mut Tables, bus: u64) {
        t.map(0x1000, bus, SIZE_4K, RW);
    }

    #[test]
    fn stale_without_invalidation_correct_after_each_kind() {
        let (x, y) = (0x30_0000, 0x31_0000);
        let mut t = Tables::new();
        remap(&mut t, x);
        let mmu = t.mmu(false);
        let bus = |mmu: &Mmu, t: &Tables| tr(mmu, t, 0x1000, Access::Read).unwrap().bus;
        assert_eq!(bus(&mmu, &t), x);

        let kinds = [
            Invalidation::Range {
                domain: 1,
                iova: 0x1fff,
                len: 1,
            },
            Invalidation::Domain(1),
            Invalidation::All,
        ];
        let mut now = x;
        for inv in kinds {
            let next = if now == x { y } else { x };
            remap(&mut t, next);
            assert_eq!(bus(&mmu, &t), now, "stale before {inv:?}");
            // Invalidations that miss the entry leave it.
            assert!(mmu.invalidate(Invalidation::Domain(2)));
            assert!(mmu.invalidate(Invalidation::Range {
                domain: 1,
                iova: 0x2000,
                len: 0x1000
            }));
            assert!(mmu.invalidate(Invalidation::Range {
                domain: 1,
                iova: 0,
                len: 0x1000
            }));
            assert!(mmu.invalidate(Invalidation::Range {
                domain: 2,
                iova: 0,
                len: u64::MAX
            }));
            assert_eq!(bus(&mmu, &t), now, "stale after unrelated invalidations");
            assert!(mmu.invalidate(inv));
            assert_eq!(bus(&mmu, &t), next, "fresh after {inv:?}");
            now = next;
        }

        // A removed mapping stays usable until invalidated, then faults.
        t.set(0x1000, 1, 0);
        assert_eq!(bus(&mmu, &t), now);
        assert!(mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 0x1000,
            len: 1
        }));
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read).unwrap_err().reason,
            FAULT_NOT_PRESENT
        );
        assert_eq!(stats(&mmu, 1).stale_uses, 0, "not strict: nothing counted");
    }

    #[test]
    fn root_change_needs_invalidation() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        let mmu = t.mmu(false);
        tr(&mmu, &t, 0x1000, Access::Read).unwrap();
        let empty = t.alloc();
        mmu.set_domain(
            1,
            DomainRegs {
                root: empty,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        assert_eq!(tr(&mmu, &t, 0x1000, Access::Read).unwrap().bus, 0x30_0000);
        assert_eq!(
            tr(&mmu, &t, 0x2000, Access::Read).unwrap_err().reason,
            FAULT_NOT_PRESENT
        );
        // The mode is a register, not cached: disabling takes effect at once.
        mmu.set_domain(
            1,
            DomainRegs {
                root: empty,
                mode: DOMAIN_MODE_DISABLED,
            },
        );
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read).unwrap_err().reason,
            FAULT_DOMAIN_DISABLED
        );
        mmu.set_domain(
            1,
            DomainRegs {
                root: empty,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        assert!(mmu.invalidate(Invalidation::Domain(1)));
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read).unwrap_err().reason,
            FAULT_NOT_PRESENT
        );
    }

    #[test]
    fn range_invalidation_drops_overlapping_large_pages() {
        let mut t = Tables::new();
        t.map(0x20_0000, 0x60_0000, SIZE_2M, RW);
        t.map(0x4000_0000, HIGH, SIZE_1G, RW);
        let mmu = t.mmu(false);
        tr(&mmu, &t, 0x20_0000, Access::Read).unwrap();
        tr(&mmu, &t, 0x4000_0000, Access::Read).unwrap();
        assert_eq!(mmu.iotlb_len(), 2);
        // Ranges ending just before or starting just after leave them.
        for (iova, len) in [(0x1f_f000, 0x1000), (0x8000_0000, 0x1000), (0, 0x20_0000)] {
            assert!(mmu.invalidate(Invalidation::Range {
                domain: 1,
                iova,
                len
            }));
        }
        assert_eq!(mmu.iotlb_len(), 2);
        // The last 4 KiB inside the 2 MiB page drops it; one byte drops the 1 GiB page.
        assert!(mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 0x3f_f000,
            len: 0x1000
        }));
        assert_eq!(mmu.iotlb_len(), 1);
        assert!(mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 0x7fff_ffff,
            len: 1
        }));
        assert_eq!(mmu.iotlb_len(), 0);
        // Changing the 2 MiB leaf is seen only after the range invalidation.
        tr(&mmu, &t, 0x20_0000, Access::Read).unwrap();
        t.map(0x20_0000, 0xa0_0000, SIZE_2M, RW);
        assert_eq!(
            tr(&mmu, &t, 0x2a_0000, Access::Read).unwrap().bus,
            0x6a_0000
        );
        assert!(mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 0x21_0000,
            len: 0x10
        }));
        assert_eq!(
            tr(&mmu, &t, 0x2a_0000, Access::Read).unwrap().bus,
            0xaa_0000
        );
        // A range running past 2^64 does not overflow.
        assert!(mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: u64::MAX - 1,
            len: u64::MAX
        }));
        assert!(mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 0,
            len: u64::MAX
        }));
        assert_eq!(mmu.iotlb_len(), 0);
    }

    #[test]
    fn invalid_invalidations_are_rejected() {
        let t = Tables::new();
        let mmu = t.mmu(false);
        assert!(!mmu.invalidate(Invalidation::Domain(4)));
        assert!(!mmu.invalidate(Invalidation::Domain(u16::MAX)));
        assert!(!mmu.invalidate(Invalidation::Range {
            domain: 4,
            iova: 0,
            len: 1
        }));
        assert!(!mmu.invalidate(Invalidation::Range {
            domain: 1,
            iova: 0,
            len: 0
        }));
        assert!(mmu.invalidate(Invalidation::All));
        assert!(mmu.invalidate(Invalidation::Domain(3)));
    }

    #[test]
    fn strict_mode_counts_stale_uses_and_uses_the_cache() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        t.map(0x20_0000, 0x60_0000, SIZE_2M, PTE_R);
        let mmu = t.mmu(true);
        assert!(mmu.strict());
        let read = |mmu: &Mmu, t: &Tables, iova| tr(mmu, t, iova, Access::Read).unwrap().bus;
        assert_eq!(read(&mmu, &t, 0x1000), 0x30_0000);
        assert_eq!(read(&mmu, &t, 0x1000), 0x30_0000);
        let s = stats(&mmu, 1);
        assert_eq!(
            (s.iotlb_hits, s.page_walks, s.stale_uses),
            (1, 2, 0),
            "a matching hit"
        );

        // Different page: the cached page is still used, and each use counts.
        remap(&mut t, 0x31_0000);
        assert_eq!(read(&mmu, &t, 0x1000), 0x30_0000);
        assert_eq!(read(&mmu, &t, 0x1abc), 0x30_0abc);
        let s = stats(&mmu, 1);
        assert_eq!((s.iotlb_hits, s.page_walks, s.stale_uses), (3, 4, 2));
        // Removed from the table: a fault on re-walk is a stale use, not a fault.
        t.set(0x1000, 1, 0);
        assert_eq!(read(&mmu, &t, 0x1000), 0x30_0000);
        let s = stats(&mmu, 1);
        assert_eq!((s.stale_uses, s.faults), (3, 0));
        // After the invalidation the table is used (a walk fault is now a fault).
        assert!(mmu.invalidate(Invalidation::Domain(1)));
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read).unwrap_err().reason,
            FAULT_NOT_PRESENT
        );
        assert_eq!(stats(&mmu, 1).stale_uses, 3);

        // Permissions: granting W without invalidating is stale, and the cached read-only
        // entry still refuses the write.
        assert_eq!(read(&mmu, &t, 0x20_0000), 0x60_0000);
        t.map(0x20_0000, 0x60_0000, SIZE_2M, RW);
        assert_eq!(
            tr(&mmu, &t, 0x20_0000, Access::Write).unwrap_err().reason,
            FAULT_PERMISSION
        );
        // Page size: the 2 MiB page split into 4 KiB pages is stale too.
        let l2 = t.slot(0x20_0000, 2);
        t.write(l2, 0);
        t.map(0x20_0000, 0x60_0000, SIZE_4K, PTE_R);
        assert_eq!(read(&mmu, &t, 0x20_0000), 0x60_0000);
        let s = stats(&mmu, 1);
        assert_eq!((s.stale_uses, s.faults), (5, 2));
    }

    #[test]
    fn non_strict_mode_does_not_rewalk() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        let mmu = t.mmu(false);
        tr(&mmu, &t, 0x1000, Access::Read).unwrap();
        remap(&mut t, 0x31_0000);
        assert_eq!(tr(&mmu, &t, 0x1000, Access::Read).unwrap().bus, 0x30_0000);
        let s = stats(&mmu, 1);
        assert_eq!((s.page_walks, s.stale_uses), (1, 0));
    }

    #[test]
    fn invalidation_waits_for_a_chunk_in_flight() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        let t = Arc::new(t);
        let mmu = Arc::new(t.mmu(false));
        tr(&mmu, &t, 0x1000, Access::Read).unwrap();

        let (events, log) = mpsc::channel::<&'static str>();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (held_tx, held_rx) = mpsc::channel::<()>();
        let chunk = {
            let (mmu, t, events) = (mmu.clone(), t.clone(), events.clone());
            thread::spawn(move || {
                let gate = mmu.chunk_gate();
                tr(&mmu, &t, 0x1000, Access::Read).unwrap();
                held_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                events.send("chunk done").unwrap();
                drop(gate);
            })
        };
        held_rx.recv().unwrap();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let inval = {
            let mmu = mmu.clone();
            thread::spawn(move || {
                assert!(mmu.invalidate(Invalidation::Domain(1)));
                events.send("invalidated").unwrap();
                done_tx.send(()).unwrap();
            })
        };
        // Give the invalidation a chance to get stuck on the gate: it must not finish while
        // the chunk holds it (the sleep only makes a broken gate more likely to show).
        thread::sleep(Duration::from_millis(20));
        assert!(
            done_rx.try_recv().is_err(),
            "invalidate returned while a chunk held the gate"
        );
        go_tx.send(()).unwrap();
        chunk.join().unwrap();
        inval.join().unwrap();
        let order: Vec<_> = log.iter().collect();
        assert_eq!(order, ["chunk done", "invalidated"]);
        // The entries were dropped before it waited.
        assert_eq!(mmu.iotlb_len(), 0);
    }

    #[test]
    fn concurrent_translation_in_several_domains() {
        let mut t = Tables::new();
        for i in 0..64 {
            t.map(i * SIZE_4K, 0x30_0000 + i * SIZE_4K, SIZE_4K, RW);
        }
        t.map(0x20_0000, 0x60_0000, SIZE_2M, RW);
        let mmu = Mmu::new(4, 48, 16, false);
        for d in 1..4 {
            mmu.set_domain(
                d,
                DomainRegs {
                    root: t.root,
                    mode: DOMAIN_MODE_TRANSLATED,
                },
            );
        }
        thread::scope(|s| {
            for d in 1..4u16 {
                let (mmu, t) = (&mmu, &t);
                s.spawn(move || {
                    for n in 0..5_000u64 {
                        let iova = if n % 2 == 0 {
                            (n % 64) * SIZE_4K
                        } else {
                            0x20_0000 + n
                        };
                        let got = mmu.translate(&t.mem, d, iova, Access::Write).unwrap();
                        let want = if n % 2 == 0 {
                            0x30_0000 + iova
                        } else {
                            0x60_0000 + n
                        };
                        assert_eq!(got.bus, want);
                    }
                });
            }
            s.spawn(|| {
                for _ in 0..200 {
                    mmu.invalidate(Invalidation::Domain(2));
                }
            });
        });
        for d in 1..4 {
            let s = stats(&mmu, d);
            assert_eq!(s.translations, 5_000);
            assert_eq!(s.iotlb_hits + s.iotlb_misses, 5_000);
            assert_eq!(s.faults, 0);
        }
        assert!(mmu.iotlb_len() <= 16);
    }

    #[test]
    fn reset_restores_domains_and_clears_iotlb_and_counters() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        let mmu = t.mmu(true);
        tr(&mmu, &t, 0x1000, Access::Read).unwrap();
        mmu.reset();
        assert_eq!(mmu.iotlb_len(), 0);
        assert_eq!(mmu.stats()[1], DomainStats::default());
        assert_eq!(
            mmu.domain(0),
            Some(DomainRegs {
                root: 0,
                mode: DOMAIN_MODE_PASSTHROUGH
            })
        );
        assert_eq!(
            mmu.domain(1),
            Some(DomainRegs {
                root: 0,
                mode: DOMAIN_MODE_DISABLED
            })
        );
        assert_eq!(mmu.domain(4), None);
        assert_eq!(
            tr(&mmu, &t, 0x1000, Access::Read).unwrap_err().reason,
            FAULT_DOMAIN_DISABLED
        );
    }

    #[test]
    fn workers_count_in_their_own_copies_and_the_totals_add_them_up() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        let mmu = t.mmu_with(48, 16, false).with_workers(2);
        // Worker 0: a miss; worker 1: a hit; no worker: a hit; a worker the MMU was not
        // made for counts in the shared counters; a fault in worker 1's.
        let one = |worker: Option<u16>, iova: u64| {
            mmu.translator_for(&t.mem, 1, worker)
                .translate(iova, Access::Read)
        };
        one(Some(0), 0x1000).unwrap();
        one(Some(1), 0x1000).unwrap();
        one(None, 0x1000).unwrap();
        one(Some(7), 0x1000).unwrap();
        assert!(one(Some(1), 0x40_0000).is_err());
        let shared = mmu.counters(1).unwrap().snapshot();
        assert_eq!((shared.translations, shared.iotlb_hits), (2, 2));
        let want = DomainStats {
            translations: 5,
            iotlb_hits: 3,
            iotlb_misses: 2,
            page_walks: 2,
            faults: 1,
            stale_uses: 0,
        };
        assert_eq!(mmu.domain_stats(1), Some(want));
        assert_eq!(stats(&mmu, 1), want);
        assert_eq!(mmu.domain_stats(4), None);
        mmu.reset();
        assert_eq!(mmu.domain_stats(1), Some(DomainStats::default()));
    }

    #[test]
    fn zero_capacity_always_walks() {
        let mut t = Tables::new();
        remap(&mut t, 0x30_0000);
        let mmu = t.mmu_with(48, 0, false);
        for _ in 0..3 {
            tr(&mmu, &t, 0x1000, Access::Read).unwrap();
        }
        assert_eq!(stats(&mmu, 1).page_walks, 3);
        assert_eq!(mmu.iotlb_len(), 0);
    }

    #[test]
    fn translator_gives_what_translate_gives() {
        // 4 KiB pages, a 2 MiB page, a hole, a read-only page and a malformed entry, each
        // translated one by one through a translator and through `translate`, for reads and
        // writes, with the same results and the same counts.
        let mut t = Tables::new();
        for p in 0..8u64 {
            t.map(0x1000 + p * SIZE_4K, 0x30_0000 + p * SIZE_4K, SIZE_4K, RW);
        }
        t.map(0x9000, 0x40_0000, SIZE_4K, PTE_R);
        t.set(0xa000, 1, 0x41_0000 | RW | 0x4);
        t.map(0x20_0000, 0x60_0000, SIZE_2M, RW);
        let iovas: Vec<u64> = (0..16u64)
            .map(|p| p * SIZE_4K + 0x10)
            .chain([0x20_0000, 0x2f_f000, 1 << 47])
            .collect();
        let (one, many) = (t.mmu(false), t.mmu(false));
        let mut translator = many.translator(&t.mem, 1);
        for round in 0..2 {
            for &iova in &iovas {
                for access in [Access::Read, Access::Write] {
                    assert_eq!(
                        translator.translate(iova, access),
                        tr(&one, &t, iova, access),
                        "round {round} iova {iova:#x} {access:?}"
                    );
                }
            }
        }
        drop(translator);
        assert_eq!(stats(&many, 1), stats(&one, 1));
        assert_eq!(many.iotlb_len(), one.iotlb_len());
    }

    #[test]
    fn translator_level_1_cache_is_dropped_by_an_invalidation() {
        let mut t = Tables::new();
        t.map(0x1000, 0x30_0000, SIZE_4K, RW);
        t.map(0x2000, 0x31_0000, SIZE_4K, RW);
        let mmu = t.mmu(false);
        // The same memory (a clone shares the mappings), so `t` can change the tables.
        let mem = t.mem.clone();
        // Walking 0x1000 caches its level-1 table in the translator.
        let mut translator = mmu.translator(&mem, 1);
        assert_eq!(
            translator.translate(0x1000, Access::Read).unwrap().bus,
            0x30_0000
        );
        // The driver points the level-2 entry at a new level-1 table mapping 0x2000
        // elsewhere.
        let l2 = t.slot(0x1000, 2);
        let new_l1 = t.alloc();
        t.write(l2, new_l1 | RW);
        t.map(0x2000, 0x50_0000, SIZE_4K, RW);
        // Without an invalidation the cached table may still be used (as an IOMMU's
        // paging-structure cache would be) ...
        assert_eq!(
            translator.translate(0x2000, Access::Read).unwrap().bus,
            0x31_0000
        );
        // ... but not by a new translator, which walks from the root (the translator holds
        // the IOTLB lock between translations: release it first) ...
        translator.release();
        assert_eq!(
            tr(&mmu, &t, 0x3000, Access::Read).unwrap_err().reason,
            FAULT_NOT_PRESENT
        );
        // ... nor after an invalidation: taking the lock again sees the new generation.
        assert!(mmu.invalidate(Invalidation::Domain(1)));
        assert_eq!(
            translator.translate(0x2000, Access::Read).unwrap().bus,
            0x50_0000
        );
        assert_eq!(
            translator
                .translate(0x1000, Access::Read)
                .unwrap_err()
                .reason,
            FAULT_NOT_PRESENT
        );
    }

    /// `translate_run` (its fast path and its general path) against a reference made of
    /// `Mmu::translate` calls page by page, on random tables (runs, gaps, holes, read-only
    /// and write-only pages, malformed entries, a 2 MiB leaf), IOTLB sizes and strict mode:
    /// the same result, the same IOTLB contents in the same recency order, and the same
    /// counters except for the page a run translated ahead (looked up and filled, counted
    /// only when asked for).
    #[test]
    fn translate_run_matches_page_by_page_translation() {
        let mut next = super::test_rng(0x2545_f491_4f6c_dd1d);
        // 96 pages from 48 pages below a 2 MiB boundary; the 2 MiB range after them is
        // sometimes one 2 MiB leaf. In 32-bit rounds the pages end 16 pages below 4 GiB, so
        // runs reach the IOVA limit.
        let zip = |a: DomainStats, b: DomainStats, f: fn(u64, u64) -> u64| DomainStats {
            translations: f(a.translations, b.translations),
            iotlb_hits: f(a.iotlb_hits, b.iotlb_hits),
            iotlb_misses: f(a.iotlb_misses, b.iotlb_misses),
            page_walks: f(a.page_walks, b.page_walks),
            faults: f(a.faults, b.faults),
            stale_uses: f(a.stale_uses, b.stale_uses),
        };
        let minus = move |a, b| zip(a, b, |x, y| x - y);
        for round in 0..60 {
            let width = [48, 48, 32][next(3) as usize];
            let base = match width {
                32 => (1 << 32) - 112 * SIZE_4K,
                _ => 0x4000_0000 - 48 * SIZE_4K,
            };
            let mut t = Tables::new();
            let mut bus = 0x40_0000;
            for p in 0..96u64 {
                let perm = [RW, RW, RW, PTE_R, PTE_W][next(5) as usize];
                if next(8) == 0 {
                    bus += (1 + next(3)) * SIZE_4K; // a gap in bus memory
                }
                match next(24) {
                    0 => {} // not present
                    1 => {
                        t.set(base + p * SIZE_4K, 1, bus | perm | 1 << 60); // malformed
                    }
                    _ => {
                        t.map(base + p * SIZE_4K, bus, SIZE_4K, perm);
                    }
                }
                bus += SIZE_4K;
            }
            if width == 48 && next(2) == 0 {
                t.map(base + 48 * SIZE_4K + SIZE_2M, HIGH, SIZE_2M, RW);
            }
            let entries = [1, 4, 8, 64, 1024][next(5) as usize];
            let strict = next(4) == 0;
            let (a, b) = (
                t.mmu_with(width, entries, strict),
                t.mmu_with(width, entries, strict),
            );
            let mut ahead = DomainStats::default();
            for step in 0..40 {
                let iova = base + next(96 + 512) * SIZE_4K + next(2) * next(SIZE_4K);
                let access = [Access::Read, Access::Write][next(2) as usize];
                // Up to 300 pages: runs that cross the lock budget (64 translations).
                let want = 1 + next(300 * SIZE_4K);
                let mut translator = a.translator(&t.mem, 1);
                // Single translations first, so the run starts part-way into a lock hold.
                for _ in 0..next(80) {
                    let single = base + next(96) * SIZE_4K;
                    let got = translator.translate(single, access);
                    assert_eq!(got, tr(&b, &t, single, access), "round {round} step {step}");
                }
                let got = translator.translate_run(iova, access, want);
                drop(translator);
                let mut expected = tr(&b, &t, iova, access);
                if let Ok(run) = expected.as_mut() {
                    while run.len < want {
                        let Some(page) = iova.checked_add(run.len) else {
                            break;
                        };
                        let before = stats(&b, 1);
                        match tr(&b, &t, page, access) {
                            Ok(n) if run.bus.checked_add(run.len) == Some(n.bus) => {
                                run.len += n.len;
                            }
                            _ => {
                                let d = minus(stats(&b, 1), before);
                                ahead = zip(ahead, d, |x, y| x + y);
                                break;
                            }
                        }
                    }
                }
                let at = format!("round {round} step {step}: {iova:#x} {access:?} {want:#x}");
                assert_eq!(got, expected, "{at}");
                assert_eq!(stats(&a, 1), minus(stats(&b, 1), ahead), "{at}");
                assert_eq!(a.lock_iotlb().recency(1), b.lock_iotlb().recency(1), "{at}");
            }
        }
    }

    #[test]
    fn translate_run_stops_at_a_gap_and_counts_pages_translated_ahead_when_used() {
        let mut t = Tables::new();
        // Pages 0..8 contiguous, page 8 elsewhere, page 9 missing.
        for p in 0..8u64 {
            t.map(p * SIZE_4K, 0x30_0000 + p * SIZE_4K, SIZE_4K, RW);
        }
        t.map(8 * SIZE_4K, 0x50_0000, SIZE_4K, RW);
        let mmu = t.mmu(false);
        let mut translator = mmu.translator(&t.mem, 1);
        // A run from the middle of page 0: up to the end of page 7.
        let run = translator
            .translate_run(0x10, Access::Write, 1 << 20)
            .unwrap();
        assert_eq!((run.bus, run.len), (0x30_0010, 8 * SIZE_4K - 0x10));
        // Page 8 was translated ahead; asking for it uses that translation.
        let run = translator
            .translate_run(8 * SIZE_4K, Access::Write, 1 << 20)
            .unwrap();
        assert_eq!((run.bus, run.len), (0x50_0000, SIZE_4K));
        // A run covering `want` stops there (within its last page).
        let run = translator
            .translate_run(0x1000, Access::Read, 0x1800)
            .unwrap();
        assert_eq!((run.bus, run.len), (0x30_1000, 0x2000));
        drop(translator);
        // Page 9 faulted ahead but was never asked for: not counted. Every other page once.
        let s = stats(&mmu, 1);
        assert_eq!(
            (s.translations, s.iotlb_misses, s.iotlb_hits, s.faults),
            (11, 9, 2, 0)
        );
        assert_eq!(s.page_walks, s.iotlb_misses);
        // Asked for, the fault is counted.
        let mut translator = mmu.translator(&t.mem, 1);
        translator
            .translate_run(7 * SIZE_4K, Access::Read, 1 << 20)
            .unwrap();
        let f = translator
            .translate_run(9 * SIZE_4K, Access::Read, 1)
            .unwrap_err();
        assert_eq!(
            (f.reason, f.iova, f.level),
            (FAULT_NOT_PRESENT, 9 * SIZE_4K, 1)
        );
        drop(translator);
        // Pages 7 and 9 counted; page 8, translated ahead of the run from page 7, was not
        // asked for.
        let s = stats(&mmu, 1);
        assert_eq!((s.translations, s.faults), (13, 1));
        assert_eq!(s.translations, s.iotlb_hits + s.iotlb_misses);
    }
}
