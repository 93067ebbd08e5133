//! The IOTLB: a set-associative cache of (domain, page-aligned IOVA, page size) ->
//! (bus page, R, W), with least-recently-used replacement within a set, as SPEC.md "IOTLB"
//! defines it.
//!
//! `capacity` entries are spread over `ceil(capacity / 4)` sets of at most [`WAYS`] (4)
//! ways; when 4 does not divide the capacity the first sets get one way more than the rest,
//! so the IOTLB holds exactly `capacity` entries (an IOTLB of 4 entries or fewer is one
//! fully associative set). An entry's set is a fixed function of its key ([`Iotlb::set_of`]),
//! not seeded: which entry a fill evicts is deterministic, so a driver test can rely on it.
//! Consecutive pages go to consecutive sets, so a transfer streaming through pages spreads
//! over the whole IOTLB.
//!
//! A set is one 64-byte cache line: four packed keys (page | domain | class | valid in one
//! u64, one compare per way) and four data words (bus page | permissions, and in the first
//! the set's packed recency ranks, as hardware keeps LRU bits beside the entries). Empty
//! ways rank last, so the way a fill takes is always the one of the last rank: an empty one
//! when there is one, else the least recently used. A hit is at most three set probes (one
//! per page-size class that has entries, 4 KiB first) and a re-ranking of the four ways
//! (one table lookup).
//! Invalidation scans every way (at most `MAX_IOTLB_ENTRIES`): it is rare and must drop
//! every overlapping page.
//!
//! The structure is not thread-safe by itself; [`super::Mmu`] keeps it behind a mutex, and
//! looks up, walks and fills under one hold of it, so a fill never carries a walk older than
//! the last invalidation. A generation number, bumped by every invalidation and reset, tells
//! a translator that re-takes the lock whether an invalidation happened meanwhile (it then
//! drops its paging-structure cache).

use super::walk::{Leaf, SIZE_1G, SIZE_2M, SIZE_4K};
use crate::spec::{MAX_DOMAINS, PTE_R, PTE_W};

/// Ways per set.
pub(crate) const WAYS: usize = 4;

/// Page sizes in lookup order, indexed by size class.
const CLASS_SIZES: [u64; 3] = [SIZE_4K, SIZE_2M, SIZE_1G];

/// log2 of [`CLASS_SIZES`].
const CLASS_SHIFTS: [u32; 3] = [12, 21, 30];

/// Key bit 0: the way holds an entry (an empty way's key is 0, which no entry has).
const KEY_VALID: u64 = 1;
/// Key bits 2:1: the size class.
const KEY_CLASS_SHIFT: u32 = 1;
/// Key bits 11:3: the domain.
const KEY_DOMAIN_SHIFT: u32 = 3;

// The domain must fit in key bits 11:3, below the page address.
const _: () = assert!(MAX_DOMAINS <= 1 << 9);

/// Multiplier of the domain in the set index (odd, so domains spread over the sets).
pub(crate) const SET_DOMAIN_STRIDE: u64 = 97;
/// Multiplier of the size class in the set index.
pub(crate) const SET_CLASS_STRIDE: u64 = 31;

/// Size class of a page size (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
fn class_of(size: u64) -> u8 {
    match size {
        SIZE_1G => 2,
        SIZE_2M => 1,
        _ => 0,
    }
}

/// The packed key of an entry: the page address (aligned to at least 4 KiB, so its bits
/// 11:0 are free) with the domain, the class and the valid bit below it.
#[inline(always)]
fn key(domain: u16, class: u8, iova_page: u64) -> u64 {
    debug_assert!(u32::from(domain) < 1 << 9 && iova_page & (SIZE_4K - 1) == 0);
    iova_page
        | u64::from(domain) << KEY_DOMAIN_SHIFT
        | u64::from(class) << KEY_CLASS_SHIFT
        | KEY_VALID
}

/// The parts of a valid key: (domain, class, page address).
fn unkey(key: u64) -> (u16, u8, u64) {
    (
        ((key >> KEY_DOMAIN_SHIFT) & 0x1ff) as u16,
        ((key >> KEY_CLASS_SHIFT) & 3) as u8,
        key & !(SIZE_4K - 1),
    )
}

/// Where [`Iotlb::fill_victim`] puts a 4 KiB entry after [`Iotlb::probe`] missed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Victim {
    set: usize,
    way: usize,
    /// Key of the 4 KiB page probed.
    key: u64,
}

/// One set: [`WAYS`] entries in one 64-byte cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Set {
    /// Packed keys ([`key`]); 0: empty way.
    keys: [u64; WAYS],
    /// Each way's bus page (bits 63:12) with, below it, the translation's `PTE_R | PTE_W`
    /// (bits 1:0, [`DATA_PERM`]) and the strict-mode "stale use logged" flag (bit 2,
    /// [`DATA_WARNED`]). Bits 10:3 of way 0's word hold the set's recency ranks
    /// ([`DATA_RANKS`]): two bits per way, way `w` at bits `2w+1:2w` of that byte, 0 for
    /// the most recently used. A set of `n` ways ranks them 0..n-1, empty ways last; a way
    /// `w` >= `n` it does not have keeps its initial rank `w`, is never touched and never
    /// chosen, so the four ranks are always a permutation of 0..3.
    data: [u64; WAYS],
}

/// [`Set::data`] bits holding the permissions.
const DATA_PERM: u64 = PTE_R | PTE_W;
/// [`Set::data`] bit: a stale use of the entry has been logged.
const DATA_WARNED: u64 = 1 << 2;
/// Shift of the packed ranks in way 0's [`Set::data`] word.
const DATA_RANKS_SHIFT: u32 = 3;
/// The packed ranks' bits in way 0's [`Set::data`] word.
const DATA_RANKS: u64 = 0xff << DATA_RANKS_SHIFT;
/// Ranks of a fresh set: way `w` has rank `w`.
const INITIAL_RANKS: u8 = 0b11_10_01_00;

// Permissions, flag and ranks fit below a 4 KiB-aligned bus page.
const _: () = assert!((DATA_PERM | DATA_WARNED | DATA_RANKS) & !(SIZE_4K - 1) == 0 && WAYS == 4);

/// Rank of way `w` in packed ranks `r`.
const fn rank_in(r: u8, w: usize) -> u8 {
    (r >> (2 * w)) & 3
}

/// `TOUCH[r][w]`: packed ranks `r` after way `w` is used (it gets rank 0; every way more
/// recent than it ages by one). A table, so that the hot path is one load rather than
/// four compares on ranks that change on every miss.
static TOUCH: [[u8; WAYS]; 256] = {
    let mut t = [[0u8; WAYS]; 256];
    let mut r = 0;
    while r < 256 {
        let mut w = 0;
        while w < WAYS {
            let used = rank_in(r as u8, w);
            let mut out = 0u8;
            let mut v = 0;
            while v < WAYS {
                let rv = rank_in(r as u8, v);
                let new = if v == w {
                    0
                } else if rv < used {
                    rv + 1
                } else {
                    rv
                };
                out |= new << (2 * v);
                v += 1;
            }
            t[r][w] = out;
            w += 1;
        }
        r += 1;
    }
    t
};

/// `WAY_OF_RANK[r][k]`: the way whose rank is `k` in packed ranks `r` (a permutation).
static WAY_OF_RANK: [[u8; WAYS]; 256] = {
    let mut t = [[0u8; WAYS]; 256];
    let mut r = 0;
    while r < 256 {
        let mut w = 0;
        while w < WAYS {
            t[r][rank_in(r as u8, w) as usize] = w as u8;
            w += 1;
        }
        r += 1;
    }
    t
};

impl Default for Set {
    fn default() -> Self {
        let mut data = [0; WAYS];
        data[0] = u64::from(INITIAL_RANKS) << DATA_RANKS_SHIFT;
        Self {
            keys: [0; WAYS],
            data,
        }
    }
}

impl Set {
    #[inline(always)]
    fn find(&self, key: u64) -> Option<usize> {
        self.keys.iter().position(|&k| k == key)
    }

    fn leaf(&self, w: usize) -> Leaf {
        let (_, class, iova_page) = unkey(self.keys[w]);
        Leaf {
            iova_page,
            bus_page: self.data[w] & !(SIZE_4K - 1),
            size: CLASS_SIZES[usize::from(class)],
            perm: self.data[w] & DATA_PERM,
        }
    }

    /// The packed ranks.
    #[inline(always)]
    fn ranks(&self) -> u8 {
        ((self.data[0] & DATA_RANKS) >> DATA_RANKS_SHIFT) as u8
    }

    #[inline(always)]
    fn set_ranks(&mut self, r: u8) {
        self.data[0] = (self.data[0] & !DATA_RANKS) | u64::from(r) << DATA_RANKS_SHIFT;
    }

    /// Recency rank of way `w` (0: most recently used).
    #[inline(always)]
    fn rank(&self, w: usize) -> u64 {
        u64::from(rank_in(self.ranks(), w))
    }

    /// The way of rank `r`, the victim of a set of `r + 1` ways.
    #[inline(always)]
    fn way_of_rank(&self, r: u64) -> usize {
        usize::from(WAY_OF_RANK[usize::from(self.ranks())][(r & 3) as usize])
    }

    /// Make way `w` the most recently used: every way more recent than it ages by one.
    /// Returns whether the ranks changed (false: `w` was the most recently used already).
    #[inline(always)]
    fn touch(&mut self, w: usize) -> bool {
        let (old, new) = (self.ranks(), TOUCH[usize::from(self.ranks())][w & 3]);
        self.set_ranks(new);
        old != new
    }

    /// Move way `w` (just emptied) behind the other ways of a set of `ways` ways.
    fn demote(&mut self, w: usize, ways: usize) {
        let (r, old) = (self.rank(w) as u8, self.ranks());
        if usize::from(r) >= ways {
            return;
        }
        let mut out = old;
        for v in 0..ways {
            let rv = rank_in(old, v);
            let new = if v == w {
                ways as u8 - 1
            } else if rv > r {
                rv - 1
            } else {
                rv
            };
            out = (out & !(3 << (2 * v))) | new << (2 * v);
        }
        self.set_ranks(out);
    }

    /// Write way `w`'s translation (clearing its stale flag), keeping the set's ranks.
    fn set_data(&mut self, w: usize, bus_page: u64, perm: u64) {
        self.data[w] =
            (bus_page & !(SIZE_4K - 1)) | (perm & DATA_PERM) | (self.data[w] & DATA_RANKS);
    }
}

/// The IOTLB.
#[derive(Debug)]
pub(crate) struct Iotlb {
    capacity: usize,
    sets: Vec<Set>,
    /// `sets.len() - 1` when that is a power of two (the set index is then a mask).
    mask: Option<u64>,
    /// Ways of every set from `wide` on; the sets before have one more.
    ways: usize,
    /// Number of sets with `ways + 1` ways.
    wide: usize,
    /// Entries cached.
    len: usize,
    /// Entries per size class, so a lookup skips classes that have none.
    per_class: [u32; 3],
    generation: u64,
    /// Per set, bumped by every change of what the set holds or of its recency order (a
    /// fill, an eviction, an invalidation, a hit on an entry that was not the set's most
    /// recent), under the lock; read without it ([`Iotlb::versions`]) by the engine's
    /// remembered translations, which stand for a hit on the most recently used entry of
    /// a set, a hit that changes nothing, and are valid while the set's version has not
    /// moved. After the sets' versions come the fill counts ([`Iotlb::whole_path`]).
    versions: std::sync::Arc<[std::sync::atomic::AtomicU64]>,
    /// Entries of the two smaller classes (4 KiB, 2 MiB) per domain, at index
    /// `class * MAX_DOMAINS + domain`. While a domain has none of a class, a lookup there
    /// misses wherever it looks (and a miss changes nothing).
    small: Vec<u32>,
}

/// Domains the IOTLB counts entries of per class ([`Iotlb::whole_path`]).
const DOMAINS: usize = MAX_DOMAINS as usize;

impl Iotlb {
    /// An empty IOTLB of `capacity` entries (0: nothing is ever cached).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.min(MAX_CAPACITY);
        let n = capacity.div_ceil(WAYS).max(1);
        Self {
            capacity,
            sets: vec![Set::default(); n],
            mask: n.is_power_of_two().then_some(n as u64 - 1),
            ways: capacity / n,
            wide: capacity % n,
            len: 0,
            per_class: [0; 3],
            generation: 0,
            versions: (0..n + 2 * DOMAINS).map(|_| Default::default()).collect(),
            small: vec![0; 2 * DOMAINS],
        }
    }

    /// Index in `versions` of the fill count of `class` (0 or 1) in `domain`: bumped by
    /// every entry of that class and domain cached.
    fn fill_count(&self, class: u8, domain: u16) -> usize {
        self.sets.len() + usize::from(class) * DOMAINS + usize::from(domain) % DOMAINS
    }

    /// Count an entry of `class` in `domain` coming (`+1`) or going (`-1`).
    #[inline(always)]
    fn count_small(&mut self, class: u8, domain: u16, coming: bool) {
        if class < 2 {
            let i = usize::from(class) * DOMAINS + usize::from(domain) % DOMAINS;
            if coming {
                self.small[i] += 1;
                self.bump(self.fill_count(class, domain));
            } else {
                self.small[i] -= 1;
            }
        }
    }

    /// Note a change of set `s` (see `versions`). One writer (the lock holder): a load and
    /// a store.
    #[inline(always)]
    fn bump(&self, s: usize) {
        use std::sync::atomic::Ordering;
        if let Some(v) = self.versions.get(s) {
            v.store(v.load(Ordering::Relaxed).wrapping_add(1), Ordering::Release);
        }
    }

    /// The sets a lookup of `iova` in `domain` visits until it finds the entry of a page of
    /// `size` (the sets of the smaller classes, where it missed, then the entry's own),
    /// with their versions now (see `versions`); unused slots are `None`. While none of
    /// them moves, a lookup of any IOVA in the same 4 KiB page misses where it missed and
    /// hits the same entry.
    pub fn lookup_path(&self, domain: u16, iova: u64, size: u64) -> [Option<(usize, u64)>; 3] {
        let mut path = [None; 3];
        for (class, size) in CLASS_SIZES
            .iter()
            .enumerate()
            .take(usize::from(class_of(size)) + 1)
        {
            let s = self.set_of(domain, class as u8, iova & !(size - 1));
            let v = self
                .versions
                .get(s)
                .map(|v| v.load(std::sync::atomic::Ordering::Relaxed));
            path[class] = v.map(|v| (s, v));
        }
        path
    }

    /// [`Iotlb::lookup_path`] for a lookup of *any* IOVA in the page of `size` holding
    /// `iova`, when `domain` has no entry of a smaller class: the page's own set, and the
    /// fill counts of the smaller classes in the domain in place of the sets a lookup would
    /// miss in (which differ from one 4 KiB page to the next). While none of them moves,
    /// every such lookup misses where it would miss and hits the same entry. None when the
    /// domain has smaller entries.
    pub fn whole_path(
        &self,
        domain: u16,
        iova: u64,
        size: u64,
    ) -> Option<[Option<(usize, u64)>; 3]> {
        let load = |i: usize| {
            self.versions
                .get(i)
                .map(|v| (i, v.load(std::sync::atomic::Ordering::Relaxed)))
        };
        let class = class_of(size);
        let mut path = [None; 3];
        for c in 0..class {
            if self.small[usize::from(c) * DOMAINS + usize::from(domain) % DOMAINS] != 0 {
                return None;
            }
            path[usize::from(c)] = Some(load(self.fill_count(c, domain))?);
        }
        let s = self.set_of(domain, class, iova & !(size - 1));
        path[usize::from(class)] = Some(load(s)?);
        Some(path)
    }

    /// Whether the entry of the page of `size` holding `iova` in `domain` is cached (a look
    /// that changes nothing, not a lookup).
    pub fn holds(&self, domain: u16, iova: u64, size: u64) -> bool {
        let class = class_of(size);
        let page = iova & !(size - 1);
        let s = self.set_of(domain, class, page);
        self.sets[s].find(key(domain, class, page)).is_some()
    }

    /// The sets' versions, to read without the lock.
    pub fn versions(&self) -> std::sync::Arc<[std::sync::atomic::AtomicU64]> {
        std::sync::Arc::clone(&self.versions)
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The current generation; pass it to [`Iotlb::fill`] after a walk.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The set of a key: `(page number + 97 * domain + 31 * class) mod sets`, the page
    /// number being the IOVA divided by the page size (SPEC.md "IOTLB").
    #[inline(always)]
    fn set_of(&self, domain: u16, class: u8, iova_page: u64) -> usize {
        let h = (iova_page >> CLASS_SHIFTS[usize::from(class)])
            .wrapping_add(SET_DOMAIN_STRIDE * u64::from(domain))
            .wrapping_add(SET_CLASS_STRIDE * u64::from(class));
        match self.mask {
            Some(mask) => (h & mask) as usize,
            None => (h % self.sets.len() as u64) as usize,
        }
    }

    /// Ways of set `s`.
    #[inline(always)]
    fn ways_of(&self, s: usize) -> usize {
        self.ways + usize::from(s < self.wide)
    }

    /// Look `iova` of `domain` up and make the entry its set's most recently used; returns
    /// the cached translation of the page holding it.
    #[cfg(test)]
    pub fn lookup(&mut self, domain: u16, iova: u64) -> Option<Leaf> {
        self.probe(domain, iova).ok()
    }

    /// [`Iotlb::lookup`], returning on a miss where a 4 KiB entry for `iova` would go, for
    /// [`Iotlb::fill_victim`] (an empty way of its set, else the least recently used).
    #[inline(always)]
    pub fn probe(&mut self, domain: u16, iova: u64) -> Result<Leaf, Victim> {
        let page = iova & !(SIZE_4K - 1);
        let s = self.set_of(domain, 0, page);
        let k = key(domain, 0, page);
        if let Some(w) = self.sets[s].find(k) {
            let set = &mut self.sets[s];
            let moved = set.touch(w);
            // A 4 KiB entry: built from what is known rather than decoded from the key.
            let leaf = Leaf {
                iova_page: page,
                bus_page: set.data[w] & !(SIZE_4K - 1),
                size: SIZE_4K,
                perm: set.data[w] & DATA_PERM,
            };
            if moved {
                self.bump(s);
            }
            return Ok(leaf);
        }
        for (class, size) in CLASS_SIZES.iter().enumerate().skip(1) {
            if self.per_class[class] == 0 {
                continue;
            }
            let (class, iova_page) = (class as u8, iova & !(size - 1));
            let s = self.set_of(domain, class, iova_page);
            if let Some(w) = self.sets[s].find(key(domain, class, iova_page)) {
                let set = &mut self.sets[s];
                let moved = set.touch(w);
                let leaf = set.leaf(w);
                if moved {
                    self.bump(s);
                }
                return Ok(leaf);
            }
        }
        let ways = self.ways_of(s).max(1) as u64;
        Err(Victim {
            set: s,
            way: self.sets[s].way_of_rank(ways - 1),
            key: k,
        })
    }

    /// Cache `leaf` for `domain`, unless an invalidation happened since `generation` was
    /// read (the walk may have seen the table before the driver changed it). Replaces the
    /// set's least recently used entry when the set is full. (The MMU walks under the lock
    /// and uses [`Iotlb::fill_victim`]; this is the general form, for tests.)
    #[cfg(test)]
    pub fn fill(&mut self, domain: u16, leaf: Leaf, generation: u64) {
        if generation != self.generation || self.capacity == 0 {
            return;
        }
        let class = class_of(leaf.size);
        let s = self.set_of(domain, class, leaf.iova_page);
        if let Some(w) = self.sets[s].find(key(domain, class, leaf.iova_page)) {
            // Another thread filled the same page meanwhile: keep the newer walk.
            let set = &mut self.sets[s];
            set.set_data(w, leaf.bus_page, leaf.perm);
            set.touch(w);
            self.bump(s);
            return;
        }
        self.insert(domain, leaf);
    }

    /// Cache `leaf` for `domain`, known not to be cached: [`Iotlb::probe`] of an IOVA in it
    /// missed, returning `victim`, and the lock has been held since (so the generation is
    /// current too, and the victim is still the way a fill would take). Replaces the set's
    /// least recently used entry when the set is full.
    #[inline(always)]
    pub fn fill_victim(&mut self, victim: Victim, domain: u16, leaf: Leaf) {
        if self.capacity == 0 {
            return;
        }
        let class = class_of(leaf.size);
        debug_assert!({
            let s = self.set_of(domain, class, leaf.iova_page);
            self.sets[s]
                .find(key(domain, class, leaf.iova_page))
                .is_none()
        });
        if class != 0 || key(domain, 0, leaf.iova_page) != victim.key {
            // A larger page: it goes to its own set.
            return self.insert(domain, leaf);
        }
        self.put(victim.set, victim.way, victim.key, leaf);
    }

    /// Add an entry not cached yet, in its set's victim way (an empty one when there is
    /// one, else the least recently used).
    fn insert(&mut self, domain: u16, leaf: Leaf) {
        let class = class_of(leaf.size);
        let s = self.set_of(domain, class, leaf.iova_page);
        let ways = self.ways_of(s).max(1) as u64;
        let w = self.sets[s].way_of_rank(ways - 1);
        self.put(s, w, key(domain, class, leaf.iova_page), leaf);
    }

    /// Write entry `key` -> `leaf` into way `w` of set `s` (empty, or evicted now) and make
    /// it the set's most recently used.
    #[inline(always)]
    fn put(&mut self, s: usize, w: usize, key: u64, leaf: Leaf) {
        let (domain, class, _) = unkey(key);
        let old = self.sets[s].keys[w];
        if old == 0 {
            self.len += 1;
            self.per_class[usize::from(class)] += 1;
        } else {
            // Counts change only when the class does (the common case, a 4 KiB entry
            // replacing another, writes nothing a following lookup reads).
            let (old_domain, old, _) = unkey(old);
            if old != class {
                self.per_class[usize::from(old)] -= 1;
                self.per_class[usize::from(class)] += 1;
            }
            self.count_small(old, old_domain, false);
        }
        self.count_small(class, domain, true);
        let set = &mut self.sets[s];
        set.keys[w] = key;
        // A walk's permissions are R and W ANDed over the levels: nothing else survives.
        set.set_data(w, leaf.bus_page, leaf.perm);
        set.touch(w);
        self.bump(s);
    }

    /// Strict mode: note that the entry caching `leaf` for `domain` was used stale. Returns
    /// true the first time for that entry (the caller logs then), false after; an entry no
    /// longer cached counts as a first time.
    pub fn mark_warned(&mut self, domain: u16, leaf: &Leaf) -> bool {
        let class = class_of(leaf.size);
        let s = self.set_of(domain, class, leaf.iova_page);
        let set = &mut self.sets[s];
        let first = match set.find(key(domain, class, leaf.iova_page)) {
            Some(w) => {
                let first = set.data[w] & DATA_WARNED == 0;
                set.data[w] |= DATA_WARNED;
                first
            }
            None => true,
        };
        self.bump(s);
        first
    }

    /// Drop every entry; returns how many were dropped.
    pub fn invalidate_all(&mut self) -> usize {
        (0..self.sets.len()).for_each(|s| self.bump(s));
        let n = self.len;
        self.sets.fill(Set::default());
        self.len = 0;
        self.per_class = [0; 3];
        self.small.fill(0);
        self.generation = self.generation.wrapping_add(1);
        n
    }

    /// Drop every entry of `domain` whose page overlaps `[first, last]` (inclusive, so a
    /// range reaching the top of the IOVA space needs no overflow); returns how many.
    pub fn invalidate_range(&mut self, domain: u16, first: u64, last: u64) -> usize {
        self.invalidate_where(|d, class, iova_page| {
            // The page is [iova_page, iova_page + size - 1]; it is size-aligned, so the
            // sum cannot overflow.
            let size = CLASS_SIZES[usize::from(class)];
            d == domain && iova_page <= last && first <= iova_page + (size - 1)
        })
    }

    /// Drop every entry of `domain`; returns how many.
    pub fn invalidate_domain(&mut self, domain: u16) -> usize {
        self.invalidate_where(|d, _, _| d == domain)
    }

    /// Drop the entries `drop(domain, class, page)` selects; bumps the generation.
    fn invalidate_where(&mut self, drop: impl Fn(u16, u8, u64) -> bool) -> usize {
        self.generation = self.generation.wrapping_add(1);
        // Every set: an invalidation is rare, and a remembered translation must not
        // outlive one that might have dropped it.
        (0..self.sets.len()).for_each(|s| self.bump(s));
        let mut dropped = 0;
        for s in 0..self.sets.len() {
            let ways = self.ways_of(s);
            let set = &mut self.sets[s];
            for w in 0..WAYS {
                if set.keys[w] == 0 {
                    continue;
                }
                let (d, class, page) = unkey(set.keys[w]);
                if drop(d, class, page) {
                    set.keys[w] = 0;
                    set.demote(w, ways);
                    self.per_class[usize::from(class)] -= 1;
                    if class < 2 {
                        self.small[usize::from(class) * DOMAINS + usize::from(d) % DOMAINS] -= 1;
                    }
                    dropped += 1;
                }
            }
        }
        self.len -= dropped;
        dropped
    }

    /// IOVAs (page-aligned) of `domain`, set by set, from most to least recently used in
    /// each set; for tests.
    #[cfg(test)]
    pub fn recency(&self, domain: u16) -> Vec<u64> {
        let mut out = Vec::new();
        for set in &self.sets {
            let mut ways: Vec<usize> = (0..WAYS).collect();
            ways.sort_by_key(|&w| set.rank(w));
            for w in ways {
                let k = set.keys[w];
                if k != 0 && unkey(k).0 == domain {
                    out.push(unkey(k).2);
                }
            }
        }
        out
    }
}

/// Largest capacity [`Iotlb::new`] honours (more is clamped): far above `MAX_IOTLB_ENTRIES`.
const MAX_CAPACITY: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{PTE_R, PTE_W};

    fn leaf(iova_page: u64, size: u64) -> Leaf {
        Leaf {
            iova_page,
            bus_page: iova_page + 0x1_0000_0000,
            size,
            perm: PTE_R | PTE_W,
        }
    }

    #[test]
    fn lru_order_and_eviction() {
        // Three entries: one fully associative set.
        let mut t = Iotlb::new(3);
        for p in [0x1000, 0x2000, 0x3000] {
            t.fill(1, leaf(p, SIZE_4K), t.generation());
        }
        assert_eq!(t.recency(1), vec![0x3000, 0x2000, 0x1000]);
        assert!(t.lookup(1, 0x1fff).is_some());
        assert_eq!(t.recency(1), vec![0x1000, 0x3000, 0x2000]);
        t.fill(1, leaf(0x4000, SIZE_4K), t.generation());
        assert_eq!(t.recency(1), vec![0x4000, 0x1000, 0x3000]);
        assert_eq!(t.len(), 3);
        assert!(t.lookup(1, 0x2000).is_none());
    }

    #[test]
    fn a_full_set_evicts_its_own_lru_entry_not_another_sets() {
        // Eight entries: two sets of four; in domain 0, even 4 KiB pages go to set 0.
        let mut t = Iotlb::new(8);
        t.fill(0, leaf(0x1000, SIZE_4K), t.generation()); // set 1, the oldest entry
        for p in [0, 2, 4, 6] {
            t.fill(0, leaf(p << 12, SIZE_4K), t.generation());
        }
        assert!(t.lookup(0, 0).is_some()); // page 0 is now set 0's most recent
        t.fill(0, leaf(8 << 12, SIZE_4K), t.generation());
        // Set 0 was full: its least recently used (page 2) went; page 1 (set 1) stays
        // although it is older.
        assert_eq!(t.len(), 5);
        assert!(t.lookup(0, 2 << 12).is_none());
        for p in [0, 1, 4, 6, 8] {
            assert!(t.lookup(0, p << 12).is_some(), "page {p}");
        }
        // Domain 1 shifts the index by 97: its page 1 lands in set 0.
        assert_eq!(t.set_of(1, 0, 0x1000), 0);
    }

    #[test]
    fn odd_capacities_hold_exactly_their_entries() {
        for capacity in [1, 2, 3, 5, 6, 7, 9, 10, 63, 65, 4095] {
            let mut t = Iotlb::new(capacity);
            // Far more pages than entries, in every set.
            for p in 0..(capacity as u64 * 8) {
                let victim = t.probe(0, p << 12).expect_err("never cached");
                t.fill_victim(victim, 0, leaf(p << 12, SIZE_4K));
            }
            assert_eq!(t.len(), capacity, "capacity {capacity}");
            let n = t.sets.len();
            let ways: usize = (0..n).map(|s| t.ways_of(s)).sum();
            assert_eq!(ways, capacity);
            assert!((0..n).all(|s| (1..=WAYS).contains(&t.ways_of(s))));
        }
    }

    #[test]
    fn size_classes_and_domains() {
        let mut t = Iotlb::new(8);
        t.fill(1, leaf(0x4000_0000, SIZE_1G), t.generation());
        t.fill(1, leaf(0x20_0000, SIZE_2M), t.generation());
        t.fill(2, leaf(0x1000, SIZE_4K), t.generation());
        assert_eq!(t.lookup(1, 0x7fff_ffff).unwrap().size, SIZE_1G);
        assert_eq!(t.lookup(1, 0x3f_ffff).unwrap().size, SIZE_2M);
        assert!(t.lookup(1, 0x1000).is_none());
        assert!(t.lookup(2, 0x20_0000).is_none());
        assert_eq!(t.invalidate_range(1, 0x3f_f000, 0x3f_ffff), 1);
        assert_eq!(t.invalidate_range(1, 0, u64::MAX), 1);
        assert_eq!(t.invalidate_domain(2), 1);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn keys_keep_every_address_bit() {
        // Pages far apart (beyond 48 bits when the IOVA width has no limit) never alias.
        let mut t = Iotlb::new(64);
        let high = 0xffff_f000_0000_0000;
        t.fill(3, leaf(high, SIZE_4K), t.generation());
        assert!(t.lookup(3, 0).is_none());
        assert_eq!(t.lookup(3, high | 0xfff).unwrap().iova_page, high);
    }

    #[test]
    fn stale_generation_is_not_filled() {
        let mut t = Iotlb::new(4);
        let g = t.generation();
        t.invalidate_domain(1);
        t.fill(1, leaf(0x1000, SIZE_4K), g);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn ways_are_reused_after_invalidation() {
        let mut t = Iotlb::new(2);
        for round in 0..100u64 {
            t.fill(1, leaf(round << 12, SIZE_4K), t.generation());
            if round % 3 == 0 {
                t.invalidate_range(1, round << 12, round << 12);
            }
            assert!(t.len() <= 2);
        }
        // Round 99 was dropped: one way is free again.
        assert_eq!(t.len(), 1);
        t.fill(1, leaf(1000 << 12, SIZE_4K), t.generation());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut t = Iotlb::new(0);
        t.fill(1, leaf(0x1000, SIZE_4K), t.generation());
        assert_eq!(t.len(), 0);
        assert!(t.lookup(1, 0x1000).is_none());
    }

    /// A reference IOTLB written from SPEC.md's rule: entries with a last-use time; a fill
    /// into a full set drops that set's least recently used entry.
    struct Model {
        capacity: usize,
        time: u64,
        /// (domain, leaf, last use).
        entries: Vec<(u16, Leaf, u64)>,
    }

    impl Model {
        fn sets(&self) -> u64 {
            self.capacity.div_ceil(4).max(1) as u64
        }

        fn set(&self, domain: u16, l: &Leaf) -> u64 {
            let class = CLASS_SIZES.iter().position(|&s| s == l.size).unwrap() as u64;
            (l.iova_page / l.size + 97 * u64::from(domain) + 31 * class) % self.sets()
        }

        fn ways(&self, set: u64) -> usize {
            let n = self.sets();
            (self.capacity as u64 / n + u64::from(set < self.capacity as u64 % n)) as usize
        }

        fn lookup(&mut self, domain: u16, iova: u64) -> Option<Leaf> {
            self.time += 1;
            for size in CLASS_SIZES {
                let page = iova & !(size - 1);
                for e in &mut self.entries {
                    if e.0 == domain && e.1.size == size && e.1.iova_page == page {
                        e.2 = self.time;
                        return Some(e.1);
                    }
                }
            }
            None
        }

        fn fill(&mut self, domain: u16, leaf: Leaf) {
            self.time += 1;
            if self.capacity == 0 {
                return;
            }
            self.entries.retain(|&(d, l, _)| {
                !(d == domain && l.size == leaf.size && l.iova_page == leaf.iova_page)
            });
            let set = self.set(domain, &leaf);
            let mut same: Vec<(u64, usize)> = (self.entries.iter().enumerate())
                .filter(|(_, (d, l, _))| self.set(*d, l) == set)
                .map(|(i, e)| (e.2, i))
                .collect();
            if same.len() >= self.ways(set) {
                same.sort_unstable();
                self.entries.remove(same[0].1);
            }
            self.entries.push((domain, leaf, self.time));
        }

        fn invalidate(&mut self, drop: impl Fn(u16, &Leaf) -> bool) -> usize {
            let before = self.entries.len();
            self.entries.retain(|(d, l, _)| !drop(*d, l));
            before - self.entries.len()
        }

        fn recency(&self, domain: u16) -> Vec<u64> {
            // Set by set, most recent first in each.
            let mut e: Vec<_> = (self.entries.iter())
                .filter(|(d, _, _)| *d == domain)
                .map(|(d, l, t)| (self.set(*d, l), std::cmp::Reverse(*t), l.iova_page))
                .collect();
            e.sort_unstable();
            e.into_iter().map(|(_, _, p)| p).collect()
        }
    }

    #[test]
    fn matches_a_reference_set_associative_lru_under_random_operations() {
        let mut next = crate::core::mmu::test_rng(0x9e37_79b9_7f4a_7c15);
        for capacity in [0, 1, 2, 4, 7, 10, 64] {
            let mut t = Iotlb::new(capacity);
            let mut m = Model {
                capacity,
                time: 0,
                entries: Vec::new(),
            };
            for step in 0..20_000 {
                let domain = next(3) as u16;
                // Few pages, so that hits, refills, set conflicts and overlapping sizes are
                // frequent; 4 KiB pages on both sides of a 2 MiB boundary, some 2 MiB and
                // 1 GiB pages.
                let size = [SIZE_4K, SIZE_4K, SIZE_4K, SIZE_2M, SIZE_1G][next(5) as usize];
                let iova = match size {
                    SIZE_4K => 0x1f_0000 + next(48) * SIZE_4K + next(SIZE_4K),
                    SIZE_2M => next(3) * SIZE_2M + next(SIZE_2M),
                    _ => next(2) * SIZE_1G + next(SIZE_1G),
                };
                match next(10) {
                    0..=4 => assert_eq!(t.lookup(domain, iova), m.lookup(domain, iova), "{step}"),
                    5..=7 => {
                        let mut l = leaf(iova & !(size - 1), size);
                        l.bus_page += next(4) * size;
                        let modelled = m.lookup(domain, iova);
                        match t.probe(domain, iova) {
                            Ok(cached) => {
                                assert_eq!(Some(cached), modelled, "{step}");
                                t.fill(domain, l, t.generation());
                            }
                            Err(victim) => {
                                assert_eq!(None, modelled, "{step}");
                                t.fill_victim(victim, domain, l);
                            }
                        }
                        m.fill(domain, l);
                    }
                    8 => {
                        let (first, len) = (iova, next(3 * SIZE_2M) + 1);
                        let last = first + len - 1;
                        assert_eq!(
                            t.invalidate_range(domain, first, last),
                            m.invalidate(|d, l| {
                                d == domain && l.iova_page <= last && first < l.iova_page + l.size
                            }),
                            "{step}"
                        );
                    }
                    _ if next(20) == 0 => {
                        assert_eq!(t.invalidate_all(), m.invalidate(|_, _| true));
                    }
                    _ => assert_eq!(
                        t.invalidate_domain(domain),
                        m.invalidate(|d, _| d == domain),
                        "{step}"
                    ),
                }
                assert_eq!(t.len(), m.entries.len(), "{step}");
                // The per-domain counts of the smaller classes match the entries.
                for d in 0..3u16 {
                    for class in 0..2u8 {
                        let held = (m.entries.iter())
                            .filter(|(dd, l, _)| *dd == d && class_of(l.size) == class)
                            .count();
                        let i = usize::from(class) * DOMAINS + usize::from(d);
                        assert_eq!(
                            t.small[i] as usize, held,
                            "{step}: domain {d} class {class}"
                        );
                    }
                }
                if step % 64 == 0 {
                    for d in 0..3 {
                        assert_eq!(t.recency(d), m.recency(d), "{step}");
                    }
                }
            }
        }
    }
}
