//! The IOTLB: a fully associative cache of (domain, page-aligned IOVA, page size) ->
//! (bus page, R, W) with true least-recently-used replacement.
//!
//! Layout: a hash map from key to a slot index, and the slots in a slab threaded on an
//! intrusive doubly linked recency list (most recent at the head). A hit is at most three
//! hash probes (one per page-size class that has entries, 4 KiB first) plus four index
//! writes to move the slot to the head; a fill evicts the tail when full. Invalidation scans
//! the (at most `MAX_IOTLB_ENTRIES`) slots: it is rare and must drop every overlapping page.
//!
//! The structure is not thread-safe by itself; [`super::Mmu`] keeps it behind a mutex.
//! A generation number, bumped by every invalidation and reset, lets a translation that
//! walked the table before an invalidation skip its fill afterwards (so an invalidation
//! racing with a walk of the old table cannot leave the old translation cached).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use super::walk::{Leaf, SIZE_1G, SIZE_2M, SIZE_4K};

/// "No slot" in the recency list.
const NIL: u32 = u32::MAX;

/// Page sizes in lookup order, indexed by size class.
const CLASS_SIZES: [u64; 3] = [SIZE_4K, SIZE_2M, SIZE_1G];

/// Size class of a page size (0: 4 KiB, 1: 2 MiB, 2: 1 GiB).
fn class_of(size: u64) -> u8 {
    match size {
        SIZE_1G => 2,
        SIZE_2M => 1,
        _ => 0,
    }
}

/// What an entry is looked up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    /// IOVA of the page (aligned to the class's size).
    iova_page: u64,
    /// Domain.
    domain: u16,
    /// Size class.
    class: u8,
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The IOVA is page aligned, so its low 12 bits are free for the domain's low bits and
        // the class; equality still compares every field.
        state.write_u64(self.iova_page ^ (u64::from(self.domain) << 2) ^ u64::from(self.class));
    }
}

/// A cheap hasher for [`Key`]: the murmur3 64-bit finaliser of the written words.
#[derive(Debug, Default, Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = self.0.rotate_left(29) ^ v;
    }

    fn finish(&self) -> u64 {
        let mut k = self.0;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
}

/// One cached translation.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: Key,
    leaf: Leaf,
    /// A strict-mode stale use of this entry has been logged.
    warned: bool,
    /// Next more recently used slot.
    prev: u32,
    /// Next less recently used slot.
    next: u32,
}

/// The IOTLB.
#[derive(Debug)]
pub(crate) struct Iotlb {
    capacity: usize,
    map: HashMap<Key, u32, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Most recently used slot.
    head: u32,
    /// Least recently used slot.
    tail: u32,
    /// Entries per size class, so a lookup skips classes that have none.
    per_class: [u32; 3],
    generation: u64,
}

impl Iotlb {
    /// An empty IOTLB of `capacity` entries (0: nothing is ever cached).
    pub fn new(capacity: usize) -> Self {
        // Slot indices are u32 with NIL reserved; no configuration comes close.
        let capacity = capacity.min(NIL as usize - 1);
        let reserve = capacity.min(1 << 16);
        Self {
            capacity,
            map: HashMap::with_capacity_and_hasher(reserve, BuildHasherDefault::default()),
            slots: Vec::with_capacity(reserve),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            per_class: [0; 3],
            generation: 0,
        }
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The current generation; pass it to [`Iotlb::fill`] after a walk.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Look `iova` of `domain` up and make the entry the most recently used; returns the
    /// cached translation of the page holding it.
    pub fn lookup(&mut self, domain: u16, iova: u64) -> Option<Leaf> {
        for (class, size) in CLASS_SIZES.iter().enumerate() {
            if self.per_class[class] == 0 {
                continue;
            }
            let key = Key {
                iova_page: iova & !(size - 1),
                domain,
                class: class as u8,
            };
            if let Some(&i) = self.map.get(&key) {
                self.touch(i);
                return Some(self.slots[i as usize].leaf);
            }
        }
        None
    }

    /// Cache `leaf` for `domain`, unless an invalidation happened since `generation` was
    /// read (the walk may have seen the table before the driver changed it). Evicts the least
    /// recently used entry when full.
    pub fn fill(&mut self, domain: u16, leaf: Leaf, generation: u64) {
        if generation != self.generation || self.capacity == 0 {
            return;
        }
        let key = Key {
            iova_page: leaf.iova_page,
            domain,
            class: class_of(leaf.size),
        };
        if let Some(&i) = self.map.get(&key) {
            // Another thread filled the same page meanwhile: keep the newer walk.
            let slot = &mut self.slots[i as usize];
            slot.leaf = leaf;
            slot.warned = false;
            self.touch(i);
            return;
        }
        if self.map.len() >= self.capacity {
            self.remove(self.tail);
        }
        let slot = Slot {
            key,
            leaf,
            warned: false,
            prev: NIL,
            next: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        self.push_front(i);
        self.map.insert(key, i);
        self.per_class[usize::from(key.class)] += 1;
    }

    /// Strict mode: note that the entry caching `leaf` for `domain` was used stale. Returns
    /// true the first time for that entry (the caller logs then), false after; an entry no
    /// longer cached counts as a first time.
    pub fn mark_warned(&mut self, domain: u16, leaf: &Leaf) -> bool {
        let key = Key {
            iova_page: leaf.iova_page,
            domain,
            class: class_of(leaf.size),
        };
        match self.map.get(&key) {
            Some(&i) => {
                let slot = &mut self.slots[i as usize];
                !std::mem::replace(&mut slot.warned, true)
            }
            None => true,
        }
    }

    /// Drop every entry; returns how many were dropped.
    pub fn invalidate_all(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        self.slots.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
        self.per_class = [0; 3];
        self.generation = self.generation.wrapping_add(1);
        n
    }

    /// Drop every entry of `domain` whose page overlaps `[first, last]` (inclusive, so a
    /// range reaching the top of the IOVA space needs no overflow); returns how many.
    pub fn invalidate_range(&mut self, domain: u16, first: u64, last: u64) -> usize {
        self.invalidate_where(|key, size| {
            // The page is [iova_page, iova_page + size - 1]; it is size-aligned, so the
            // sum cannot overflow.
            key.domain == domain && key.iova_page <= last && first <= key.iova_page + (size - 1)
        })
    }

    /// Drop every entry of `domain`; returns how many.
    pub fn invalidate_domain(&mut self, domain: u16) -> usize {
        self.invalidate_where(|key, _| key.domain == domain)
    }

    /// Drop the entries `drop(key, page size)` selects; bumps the generation.
    fn invalidate_where(&mut self, drop: impl Fn(&Key, u64) -> bool) -> usize {
        self.generation = self.generation.wrapping_add(1);
        let victims: Vec<u32> = self
            .map
            .iter()
            .filter(|(key, &i)| drop(key, self.slots[i as usize].leaf.size))
            .map(|(_, &i)| i)
            .collect();
        for &i in &victims {
            self.remove(i);
        }
        victims.len()
    }

    /// Unlink slot `i` from the recency list, the map and its class.
    fn remove(&mut self, i: u32) {
        if i == NIL {
            return;
        }
        self.unlink(i);
        let key = self.slots[i as usize].key;
        self.map.remove(&key);
        self.per_class[usize::from(key.class)] -= 1;
        self.free.push(i);
    }

    /// Make slot `i` (linked) the most recently used.
    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

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
            if slot.key.domain == domain {
                out.push(slot.key.iova_page);
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
}
