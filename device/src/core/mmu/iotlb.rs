//! The IOTLB: a fully associative cache of (domain, page-aligned IOVA, page size) ->
//! (bus page, R, W) with true least-recently-used replacement.
//!
//! Layout: the entries live in a slab of slots, threaded on an intrusive doubly linked
//! recency list (most recent at the head) and, for lookup, on singly linked hash chains
//! from a bucket array of at least twice the capacity. A hit is one chain walk per
//! page-size class that has entries (4 KiB first) plus four index writes to move the slot
//! to the head; a fill evicts the tail when full. Invalidation walks the (at most
//! `MAX_IOTLB_ENTRIES`) entries: it is rare and must drop every overlapping page.
//!
//! The hash keeps neighbours together: consecutive pages of one 2 MiB (for 4 KiB pages),
//! 1 GiB (2 MiB pages) or 512 GiB (1 GiB pages) IOVA range go to consecutive buckets, and
//! consecutive fills take neighbouring slots, so translating a transfer page by page walks
//! memory sequentially (the engine's hit and miss costs were dominated by cache misses on
//! a scattering hash). Chaining, unlike open addressing, does not mind such clustered
//! hashes. The range's bucket comes from a seeded mix (seeded per IOTLB at random), so a
//! guest cannot aim its IOVAs at one chain.
//!
//! The structure is not thread-safe by itself; [`super::Mmu`] keeps it behind a mutex, and
//! looks up, walks and fills under one hold of it, so a fill never carries a walk older than
//! the last invalidation. A generation number, bumped by every invalidation and reset, tells
//! a translator that re-takes the lock whether an invalidation happened meanwhile (it then
//! drops its paging-structure cache).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use super::walk::{Leaf, SIZE_1G, SIZE_2M, SIZE_4K};
use crate::spec::{PTE_R, PTE_W};

/// "No slot" in the recency list and the hash chains.
const NIL: u32 = u32::MAX;

/// Page sizes in lookup order, indexed by size class.
const CLASS_SIZES: [u64; 3] = [SIZE_4K, SIZE_2M, SIZE_1G];

/// log2 of [`CLASS_SIZES`].
const CLASS_SHIFTS: [u32; 3] = [12, 21, 30];

/// Pages of one class whose buckets are consecutive: 512, the entries of one table.
const RANGE_BITS: u32 = 9;

/// Size class of a page size (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
fn class_of(size: u64) -> u8 {
    match size {
        SIZE_1G => 2,
        SIZE_2M => 1,
        _ => 0,
    }
}

/// The 512-page range of a key (domain, class and the range's first page, packed without
/// overlap: `page >> 9` has at most 43 bits, so different ranges give different values) and
/// the page's index in it.
#[inline(always)]
fn range_of(domain: u16, class: u8, iova_page: u64) -> (u64, u64) {
    let page = iova_page >> CLASS_SHIFTS[usize::from(class)];
    let range = (page >> RANGE_BITS) | u64::from(domain) << 45 | u64::from(class) << 61;
    (range, page & ((1 << RANGE_BITS) - 1))
}

/// The murmur3 64-bit finaliser: a bijection that mixes every bit into every bit.
fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A slot before its first use.
const EMPTY: Slot = Slot {
    iova_page: 0,
    bus_page: 0,
    domain: 0,
    class: 0,
    perm: 0,
    warned: false,
    prev: NIL,
    next: NIL,
    chain: NIL,
    bucket: 0,
};

/// One cached translation.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// IOVA of the page (aligned to the class's size).
    iova_page: u64,
    /// Bus address of the page.
    bus_page: u64,
    /// Domain.
    domain: u16,
    /// Size class.
    class: u8,
    /// `PTE_R | PTE_W` of the translation.
    perm: u8,
    /// A strict-mode stale use of this entry has been logged.
    warned: bool,
    /// Next more recently used slot.
    prev: u32,
    /// Next less recently used slot.
    next: u32,
    /// Next slot in the same hash bucket.
    chain: u32,
    /// The bucket.
    bucket: u32,
}

impl Slot {
    fn is(&self, domain: u16, class: u8, iova_page: u64) -> bool {
        self.iova_page == iova_page && self.domain == domain && self.class == class
    }

    fn leaf(&self) -> Leaf {
        Leaf {
            iova_page: self.iova_page,
            bus_page: self.bus_page,
            size: CLASS_SIZES[usize::from(self.class)],
            perm: u64::from(self.perm),
        }
    }
}

/// The IOTLB.
#[derive(Debug)]
pub(crate) struct Iotlb {
    capacity: usize,
    /// Heads of the hash chains; a power of two of them.
    buckets: Vec<u32>,
    /// `buckets.len() - 1`.
    mask: u64,
    /// Random seed of the hash.
    seed: u64,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Entries cached.
    len: usize,
    /// Most recently used slot.
    head: u32,
    /// Least recently used slot.
    tail: u32,
    /// Entries per size class, so a lookup skips classes that have none.
    per_class: [u32; 3],
    generation: u64,
    /// The last 4 KiB key [`Iotlb::lookup`] missed, and its bucket (domain, IOVA page,
    /// bucket): the key [`Iotlb::fill_missed`] most likely fills next.
    missed: (u16, u64, usize),
    /// The last range [`Iotlb::lookup`] hashed and its mix (pages are looked up in runs).
    memo: (u64, u64),
}

impl Iotlb {
    /// An empty IOTLB of `capacity` entries (0: nothing is ever cached).
    pub fn new(capacity: usize) -> Self {
        // Slot indices are u32 with NIL reserved; no configuration comes close.
        let capacity = capacity.min(1 << 24);
        let buckets = (capacity * 2).max(16).next_power_of_two();
        Self {
            capacity,
            buckets: vec![NIL; buckets],
            mask: buckets as u64 - 1,
            seed: RandomState::new().hash_one(0x10_71b_u64),
            slots: Vec::with_capacity(capacity.min(1 << 16)),
            free: Vec::new(),
            len: 0,
            head: NIL,
            tail: NIL,
            per_class: [0; 3],
            generation: 0,
            missed: (0, u64::MAX, 0),
            memo: (u64::MAX, 0),
        }
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The current generation; pass it to [`Iotlb::fill`] after a walk.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bucket of a key: a mix of its 512-page range (seeded), plus the page's index in it.
    #[inline(always)]
    fn bucket(&self, domain: u16, class: u8, iova_page: u64) -> usize {
        let (range, index) = range_of(domain, class, iova_page);
        (mix(range ^ self.seed).wrapping_add(index) & self.mask) as usize
    }

    /// [`Iotlb::bucket`], remembering the last range's mix.
    #[inline(always)]
    fn bucket_memo(&mut self, domain: u16, class: u8, iova_page: u64) -> usize {
        let (range, index) = range_of(domain, class, iova_page);
        if self.memo.0 != range {
            self.memo = (range, mix(range ^ self.seed));
        }
        (self.memo.1.wrapping_add(index) & self.mask) as usize
    }

    /// The slot holding a key.
    #[inline]
    fn find(&self, domain: u16, class: u8, iova_page: u64) -> Option<u32> {
        self.find_in(
            self.bucket(domain, class, iova_page),
            domain,
            class,
            iova_page,
        )
    }

    /// The slot holding a key whose bucket is `b`.
    #[inline(always)]
    fn find_in(&self, b: usize, domain: u16, class: u8, iova_page: u64) -> Option<u32> {
        let mut i = self.buckets[b];
        while i != NIL {
            let slot = &self.slots[i as usize];
            if slot.is(domain, class, iova_page) {
                return Some(i);
            }
            i = slot.chain;
        }
        None
    }

    /// Look `iova` of `domain` up and make the entry the most recently used; returns the
    /// cached translation of the page holding it.
    #[inline(always)]
    pub fn lookup(&mut self, domain: u16, iova: u64) -> Option<Leaf> {
        for (class, size) in CLASS_SIZES.iter().enumerate() {
            if self.per_class[class] == 0 {
                continue;
            }
            let (class, iova_page) = (class as u8, iova & !(size - 1));
            let b = self.bucket_memo(domain, class, iova_page);
            if let Some(i) = self.find_in(b, domain, class, iova_page) {
                self.touch(i);
                return Some(self.slots[i as usize].leaf());
            }
            if class == 0 {
                self.missed = (domain, iova_page, b);
            }
        }
        None
    }

    /// Cache `leaf` for `domain`, unless an invalidation happened since `generation` was
    /// read (the walk may have seen the table before the driver changed it). Evicts the least
    /// recently used entry when full. (The MMU walks under the lock and uses
    /// [`Iotlb::fill_missed`]; this is the general form, for tests.)
    #[cfg(test)]
    pub fn fill(&mut self, domain: u16, leaf: Leaf, generation: u64) {
        if generation != self.generation || self.capacity == 0 {
            return;
        }
        let class = class_of(leaf.size);
        // A walk's permissions are R and W ANDed over the levels: nothing else survives.
        let perm = (leaf.perm & (PTE_R | PTE_W)) as u8;
        if let Some(i) = self.find(domain, class, leaf.iova_page) {
            // Another thread filled the same page meanwhile: keep the newer walk.
            let slot = &mut self.slots[i as usize];
            slot.bus_page = leaf.bus_page;
            slot.perm = perm;
            slot.warned = false;
            self.touch(i);
            return;
        }
        self.insert(domain, leaf);
    }

    /// Cache `leaf` for `domain`, known not to be cached: [`Iotlb::lookup`] of an IOVA in
    /// it missed and the lock has been held since (so the generation is current too).
    /// Evicts the least recently used entry when full.
    #[inline(always)]
    pub fn fill_missed(&mut self, domain: u16, leaf: Leaf) {
        if self.capacity == 0 {
            return;
        }
        debug_assert!(self
            .find(domain, class_of(leaf.size), leaf.iova_page)
            .is_none());
        self.insert(domain, leaf);
    }

    /// Add an entry not cached yet, evicting the least recently used when full (its slot
    /// takes the new entry).
    #[inline(always)]
    fn insert(&mut self, domain: u16, leaf: Leaf) {
        let class = class_of(leaf.size);
        let b = match self.missed {
            (d, page, b) if class == 0 && d == domain && page == leaf.iova_page => b,
            _ => self.bucket(domain, class, leaf.iova_page),
        };
        let i = if self.len >= self.capacity && self.tail != NIL {
            let i = self.tail;
            self.detach(i);
            i
        } else {
            self.len += 1;
            match self.free.pop() {
                Some(i) => i,
                None => {
                    self.slots.push(EMPTY);
                    (self.slots.len() - 1) as u32
                }
            }
        };
        let old = self.head;
        let slot = &mut self.slots[i as usize];
        *slot = Slot {
            iova_page: leaf.iova_page,
            bus_page: leaf.bus_page,
            domain,
            class,
            // A walk's permissions are R and W ANDed over the levels: nothing else survives.
            perm: (leaf.perm & (PTE_R | PTE_W)) as u8,
            warned: false,
            prev: NIL,
            next: old,
            chain: self.buckets[b],
            bucket: b as u32,
        };
        self.buckets[b] = i;
        match old {
            NIL => self.tail = i,
            h => self.slots[h as usize].prev = i,
        }
        self.head = i;
        self.per_class[usize::from(class)] += 1;
    }

    /// Strict mode: note that the entry caching `leaf` for `domain` was used stale. Returns
    /// true the first time for that entry (the caller logs then), false after; an entry no
    /// longer cached counts as a first time.
    pub fn mark_warned(&mut self, domain: u16, leaf: &Leaf) -> bool {
        match self.find(domain, class_of(leaf.size), leaf.iova_page) {
            Some(i) => {
                let slot = &mut self.slots[i as usize];
                !std::mem::replace(&mut slot.warned, true)
            }
            None => true,
        }
    }

    /// Drop every entry; returns how many were dropped.
    pub fn invalidate_all(&mut self) -> usize {
        let n = self.len;
        self.buckets.fill(NIL);
        self.slots.clear();
        self.free.clear();
        self.len = 0;
        self.head = NIL;
        self.tail = NIL;
        self.per_class = [0; 3];
        self.generation = self.generation.wrapping_add(1);
        n
    }

    /// Drop every entry of `domain` whose page overlaps `[first, last]` (inclusive, so a
    /// range reaching the top of the IOVA space needs no overflow); returns how many.
    pub fn invalidate_range(&mut self, domain: u16, first: u64, last: u64) -> usize {
        self.invalidate_where(|slot| {
            // The page is [iova_page, iova_page + size - 1]; it is size-aligned, so the
            // sum cannot overflow.
            let size = CLASS_SIZES[usize::from(slot.class)];
            slot.domain == domain && slot.iova_page <= last && first <= slot.iova_page + (size - 1)
        })
    }

    /// Drop every entry of `domain`; returns how many.
    pub fn invalidate_domain(&mut self, domain: u16) -> usize {
        self.invalidate_where(|slot| slot.domain == domain)
    }

    /// Drop the entries `drop` selects; bumps the generation.
    fn invalidate_where(&mut self, drop: impl Fn(&Slot) -> bool) -> usize {
        self.generation = self.generation.wrapping_add(1);
        let mut victims = Vec::new();
        let mut i = self.head;
        while i != NIL {
            let slot = &self.slots[i as usize];
            if drop(slot) {
                victims.push(i);
            }
            i = slot.next;
        }
        for &i in &victims {
            self.remove(i);
        }
        victims.len()
    }

    /// Drop slot `i` (linked): unlink it and free it.
    fn remove(&mut self, i: u32) {
        self.detach(i);
        self.len -= 1;
        self.free.push(i);
    }

    /// Unlink slot `i` from the recency list, its hash chain and its class.
    #[inline]
    fn detach(&mut self, i: u32) {
        self.unlink(i);
        let Slot {
            class,
            chain,
            bucket,
            ..
        } = self.slots[i as usize];
        let b = bucket as usize;
        if self.buckets[b] == i {
            self.buckets[b] = chain;
        } else {
            let mut p = self.buckets[b];
            while p != NIL {
                let next = self.slots[p as usize].chain;
                if next == i {
                    self.slots[p as usize].chain = chain;
                    break;
                }
                p = next;
            }
        }
        self.per_class[usize::from(class)] -= 1;
    }

    /// Make slot `i` (linked) the most recently used.
    #[inline]
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    #[inline]
    fn unlink(&mut self, i: u32) {
        let Slot { prev, next, .. } = self.slots[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    #[inline]
    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let slot = &mut self.slots[i as usize];
            slot.prev = NIL;
            slot.next = old;
        }
        match old {
            NIL => self.tail = i,
            h => self.slots[h as usize].prev = i,
        }
        self.head = i;
    }

    /// IOVAs (page-aligned) of `domain` from most to least recently used; for tests.
    #[cfg(test)]
    pub fn recency(&self, domain: u16) -> Vec<u64> {
        let mut out = Vec::new();
        let mut i = self.head;
        while i != NIL {
            let slot = &self.slots[i as usize];
            if slot.domain == domain {
                out.push(slot.iova_page);
            }
            i = slot.next;
        }
        out
    }
}

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
    fn stale_generation_is_not_filled() {
        let mut t = Iotlb::new(4);
        let g = t.generation();
        t.invalidate_domain(1);
        t.fill(1, leaf(0x1000, SIZE_4K), g);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn slots_are_reused_after_invalidation() {
        let mut t = Iotlb::new(2);
        for round in 0..100u64 {
            t.fill(1, leaf(round << 12, SIZE_4K), t.generation());
            if round % 3 == 0 {
                t.invalidate_range(1, round << 12, round << 12);
            }
        }
        assert!(t.len() <= 2);
        assert!(t.slots.len() <= 2);
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut t = Iotlb::new(0);
        t.fill(1, leaf(0x1000, SIZE_4K), t.generation());
        assert_eq!(t.len(), 0);
        assert!(t.lookup(1, 0x1000).is_none());
    }

    /// A reference IOTLB: a list in recency order (most recent first).
    struct Model {
        capacity: usize,
        entries: Vec<(u16, Leaf)>,
    }

    impl Model {
        fn lookup(&mut self, domain: u16, iova: u64) -> Option<Leaf> {
            for size in CLASS_SIZES {
                let page = iova & !(size - 1);
                let found = self
                    .entries
                    .iter()
                    .position(|&(d, l)| d == domain && l.size == size && l.iova_page == page);
                if let Some(i) = found {
                    let e = self.entries.remove(i);
                    self.entries.insert(0, e);
                    return Some(e.1);
                }
            }
            None
        }

        fn fill(&mut self, domain: u16, leaf: Leaf) {
            if self.capacity == 0 {
                return;
            }
            self.entries.retain(|&(d, l)| {
                !(d == domain && l.size == leaf.size && l.iova_page == leaf.iova_page)
            });
            self.entries.insert(0, (domain, leaf));
            self.entries.truncate(self.capacity);
        }

        fn invalidate(&mut self, drop: impl Fn(u16, &Leaf) -> bool) -> usize {
            let before = self.entries.len();
            self.entries.retain(|(d, l)| !drop(*d, l));
            before - self.entries.len()
        }

        fn recency(&self, domain: u16) -> Vec<u64> {
            (self.entries.iter())
                .filter(|(d, _)| *d == domain)
                .map(|(_, l)| l.iova_page)
                .collect()
        }
    }

    #[test]
    fn matches_a_reference_lru_under_random_operations() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for capacity in [0, 1, 2, 7, 64] {
            let mut t = Iotlb::new(capacity);
            let mut m = Model {
                capacity,
                entries: Vec::new(),
            };
            for step in 0..20_000 {
                let domain = next(3) as u16;
                // Few pages, so that hits, refills and overlapping sizes are frequent; 4 KiB
                // pages on both sides of a 2 MiB boundary, some 2 MiB and 1 GiB pages.
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
                        let (cached, modelled) = (t.lookup(domain, iova), m.lookup(domain, iova));
                        assert_eq!(cached, modelled, "{step}");
                        if cached.is_none() {
                            t.fill_missed(domain, l);
                        } else {
                            t.fill(domain, l, t.generation());
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
                if step % 64 == 0 {
                    for d in 0..3 {
                        assert_eq!(t.recency(d), m.recency(d), "{step}");
                    }
                }
            }
        }
    }
}
