//! Lookaside lists: fixed-size buffers recycled through a bounded lock-free free list,
//! refilled from (and overflowing to) the tagged pool, the core of
//! `WdfLookasideListCreate` / `WdfMemoryCreateFromLookaside`.
//!
//! As NT's lookaside lists: nothing is allocated at creation; an allocation takes a buffer
//! from the free list or, when it is empty (an allocate miss), from the pool with the
//! list's tag; a free puts the buffer back or, when the list is at its depth (a free miss),
//! returns it to the pool. The counters are NT's `TotalAllocates`, `AllocateMisses`,
//! `TotalFrees` and `FreeMisses`. Buffers smaller than a page are zeroed on every
//! allocation (what KMDF does: its small buffers share a zeroed block with the memory
//! object, non-paged and paged alike); page-sized and larger buffers are handed out as
//! they are.
//!
//! The free list is a `crossbeam-queue` [`ArrayQueue`]: lock-free and bounded, so a get or
//! put is one compare-and-swap on a hit, from any thread.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::pool::{PoolKind, PoolTag, PoolTracker, PAGE_SIZE};

/// Default depth (buffers kept on the free list), NT's maximum lookaside depth.
pub const DEFAULT_DEPTH: usize = 256;

/// A lookaside list's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LookasideStats {
    /// Allocations.
    pub total_allocates: u64,
    /// Allocations the free list could not serve (taken from the pool).
    pub allocate_misses: u64,
    /// Frees.
    pub total_frees: u64,
    /// Frees the free list could not take (returned to the pool).
    pub free_misses: u64,
    /// Buffers on the free list now.
    pub depth: usize,
}

/// A lookaside list of `size`-byte buffers.
pub struct Lookaside {
    size: usize,
    kind: PoolKind,
    tag: PoolTag,
    zero: bool,
    free: ArrayQueue<NonNull<u8>>,
    pool: Arc<PoolTracker>,
    total_allocates: AtomicU64,
    allocate_misses: AtomicU64,
    total_frees: AtomicU64,
    free_misses: AtomicU64,
}

// SAFETY: the buffers on the free list are pool blocks owned by the list (no one else
// holds them while they are queued); `ArrayQueue` is `Sync` for `Send` items, and a block
// address is just an address until handed out.
unsafe impl Send for Lookaside {}
// SAFETY: as for `Send`; every shared operation is on the lock-free queue or atomics.
unsafe impl Sync for Lookaside {}

impl std::fmt::Debug for Lookaside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookaside")
            .field("size", &self.size)
            .field("kind", &self.kind)
            .field("tag", &self.tag)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Lookaside {
    /// A list of `size`-byte buffers (`size` > 0) from `pool`'s `kind` pool, tagged `tag`,
    /// keeping at most `depth` (> 0) free buffers.
    pub fn new(
        size: usize,
        kind: PoolKind,
        tag: PoolTag,
        depth: usize,
        pool: Arc<PoolTracker>,
    ) -> Self {
        assert!(
            size > 0 && depth > 0,
            "lookaside of size {size}, depth {depth}"
        );
        Lookaside {
            size,
            kind,
            tag,
            zero: size < PAGE_SIZE,
            free: ArrayQueue::new(depth),
            pool,
            total_allocates: AtomicU64::new(0),
            allocate_misses: AtomicU64::new(0),
            total_frees: AtomicU64::new(0),
            free_misses: AtomicU64::new(0),
        }
    }

    /// Buffer size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Pool kind.
    pub fn kind(&self) -> PoolKind {
        self.kind
    }

    /// Pool tag of the buffers.
    pub fn tag(&self) -> PoolTag {
        self.tag
    }

    /// Whether buffers are zeroed on allocation.
    pub fn zeroes(&self) -> bool {
        self.zero
    }

    /// Takes a buffer (from the free list, else the pool). `None` when the pool is out of
    /// memory.
    #[inline]
    pub fn allocate(&self) -> Option<NonNull<u8>> {
        self.total_allocates.fetch_add(1, Ordering::Relaxed);
        let p = match self.free.pop() {
            Some(p) => p,
            None => {
                self.allocate_misses.fetch_add(1, Ordering::Relaxed);
                self.pool.allocate(self.kind, self.size, self.tag)?.ptr
            }
        };
        if self.zero {
            // SAFETY: `p` is a block of `size` bytes owned by this list and now handed to
            // the caller; nothing else accesses it.
            unsafe { p.as_ptr().write_bytes(0, self.size) };
        }
        Some(p)
    }

    /// Returns a buffer.
    ///
    /// # Safety
    ///
    /// `p` must come from this list's [`Lookaside::allocate`] and not have been freed since;
    /// the caller gives up every access to it.
    #[inline]
    pub unsafe fn free(&self, p: NonNull<u8>) {
        self.total_frees.fetch_add(1, Ordering::Relaxed);
        if let Err(p) = self.free.push(p) {
            self.free_misses.fetch_add(1, Ordering::Relaxed);
            self.pool.free(p.as_ptr(), Some(self.tag));
        }
    }

    /// The counters (exact when no allocation or free runs concurrently).
    pub fn stats(&self) -> LookasideStats {
        LookasideStats {
            total_allocates: self.total_allocates.load(Ordering::Relaxed),
            allocate_misses: self.allocate_misses.load(Ordering::Relaxed),
            total_frees: self.total_frees.load(Ordering::Relaxed),
            free_misses: self.free_misses.load(Ordering::Relaxed),
            depth: self.free.len(),
        }
    }

    /// Returns every free buffer to the pool.
    pub fn trim(&self) {
        while let Some(p) = self.free.pop() {
            self.pool.free(p.as_ptr(), Some(self.tag));
        }
    }
}

impl Drop for Lookaside {
    fn drop(&mut self) {
        self.trim();
    }
}

/// A buffer from an `Arc<Lookaside>`, returned to it on drop: the safe form.
#[derive(Debug)]
pub struct LookasideBuffer {
    list: Arc<Lookaside>,
    ptr: NonNull<u8>,
}

// SAFETY: the buffer exclusively owns its block until dropped; the list is `Sync`.
unsafe impl Send for LookasideBuffer {}

impl LookasideBuffer {
    /// Takes a buffer from `list`.
    pub fn new(list: &Arc<Lookaside>) -> Option<Self> {
        let ptr = list.allocate()?;
        Some(LookasideBuffer {
            list: Arc::clone(list),
            ptr,
        })
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block is `size` bytes, initialised (pool fill or zero or earlier
        // contents) and exclusively ours while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.list.size) }
    }

    /// The buffer's bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.list.size) }
    }

    /// The list it came from.
    pub fn list(&self) -> &Arc<Lookaside> {
        &self.list
    }
}

impl Drop for LookasideBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `list.allocate()` and is returned exactly once, here.
        unsafe { self.list.free(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: PoolTag = PoolTag::new(b"LkAs");

    fn list(size: usize, kind: PoolKind, depth: usize) -> (Arc<PoolTracker>, Arc<Lookaside>) {
        let pool = Arc::new(PoolTracker::new());
        let l = Arc::new(Lookaside::new(size, kind, TAG, depth, Arc::clone(&pool)));
        (pool, l)
    }

    #[test]
    fn nothing_is_preallocated() {
        let (pool, l) = list(64, PoolKind::NonPaged, 4);
        assert_eq!(l.stats(), LookasideStats::default());
        assert!(pool.leaks().is_empty());
    }

    #[test]
    fn misses_hits_and_free_misses_are_counted() {
        let (pool, l) = list(64, PoolKind::NonPaged, 2);
        let bufs: Vec<_> = (0..3).map(|_| LookasideBuffer::new(&l).unwrap()).collect();
        assert_eq!(l.stats().allocate_misses, 3);
        drop(bufs);
        let s = l.stats();
        assert_eq!(
            (s.total_allocates, s.total_frees, s.free_misses, s.depth),
            (3, 3, 1, 2)
        );
        let again = LookasideBuffer::new(&l).unwrap();
        assert_eq!(l.stats().allocate_misses, 3, "served from the free list");
        drop(again);
        assert_eq!(pool.tag_stats(TAG, PoolKind::NonPaged).outstanding(), 2);
        drop(l);
        assert!(
            pool.leaks().is_empty(),
            "dropping the list frees its buffers"
        );
    }

    #[test]
    fn small_buffers_are_zeroed_large_ones_are_not() {
        for (size, kind, zeroed) in [
            (64, PoolKind::NonPaged, true),
            (PAGE_SIZE - 1, PoolKind::NonPaged, true),
            (PAGE_SIZE, PoolKind::NonPaged, false),
            (64, PoolKind::Paged, true),
            (PAGE_SIZE, PoolKind::Paged, false),
        ] {
            let (_pool, l) = list(size, kind, 4);
            let mut b = LookasideBuffer::new(&l).unwrap();
            b.as_mut_slice().fill(0xEE);
            drop(b);
            let b = LookasideBuffer::new(&l).unwrap();
            let expect = if zeroed { 0 } else { 0xEE };
            assert!(
                b.as_slice().iter().all(|&x| x == expect),
                "size {size} {kind:?}: zeroed {zeroed}"
            );
        }
    }

    #[test]
    fn concurrent_get_put_keeps_counts() {
        let (pool, l) = list(128, PoolKind::NonPaged, 8);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        let mut b = LookasideBuffer::new(&l).unwrap();
                        b.as_mut_slice()[0] = 1;
                    }
                });
            }
        });
        let st = l.stats();
        assert_eq!((st.total_allocates, st.total_frees), (20_000, 20_000));
        drop(l);
        assert!(pool.leaks().is_empty());
    }
}
