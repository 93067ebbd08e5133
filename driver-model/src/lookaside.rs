//! Lookaside lists: fixed-size buffers recycled through free lists, refilled from (and
//! overflowing to) the tagged pool, the core of `WdfLookasideListCreate` /
//! `WdfMemoryCreateFromLookaside`.
//!
//! As NT's lookaside lists: nothing is allocated at creation; an allocation takes a free
//! buffer or, when there is none (an allocate miss), one from the pool with the list's
//! tag; a free keeps the buffer or, when the list holds its depth (a free miss), returns
//! it to the pool. The counters are NT's `TotalAllocates`, `AllocateMisses`, `TotalFrees`
//! and `FreeMisses`. Buffers smaller than a page are zeroed on every allocation (what KMDF
//! does: its small buffers share a zeroed block with the memory object, non-paged and
//! paged alike); page-sized and larger buffers are handed out as they are.
//!
//! Layout, as NT keeps per-processor lookaside lists in front of a shared one: each thread
//! has a small cache of free buffers ([`THREAD_CACHE`] at most; `thread_local`'s
//! `ThreadLocal`, no atomic read-modify-write on the hot path), in front of a shared
//! bounded lock-free depot (`crossbeam-queue`'s `ArrayQueue`, `depth` buffers). A free
//! goes to the thread's cache, or to the depot when the cache is full, or to the pool; an
//! allocation takes from the thread's cache, else the depot, else the pool. So buffers
//! freed on one thread serve allocations on another, and a thread that only allocates or
//! only frees still recycles through the depot. Each thread's counters are written only by
//! that thread (plain relaxed load and store) and read by anyone, so the totals are exact.

use crate::verifier::low_resources::{self, Allocation};
use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;
use thread_local::ThreadLocal;

use crate::pool::{PoolKind, PoolTag, PoolTracker, PAGE_SIZE};

/// Default depth of the shared depot, NT's maximum lookaside depth.
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

/// Free buffers a thread keeps in its own cache.
pub const THREAD_CACHE: usize = 32;

/// A thread's part of a list: its cache and its counters.
struct Local {
    /// Free buffers; only the owning thread touches it (see the `Sync` impl).
    cache: UnsafeCell<Vec<NonNull<u8>>>,
    total_allocates: AtomicU64,
    allocate_misses: AtomicU64,
    total_frees: AtomicU64,
    free_misses: AtomicU64,
    /// `cache.len()`, for [`Lookaside::stats`] from other threads.
    cached: AtomicUsize,
}

// SAFETY: a `Local` holds pool blocks owned by the list and atomics; moving it to another
// thread (which `ThreadLocal` does only when the list is dropped, with exclusive access)
// moves plain addresses.
unsafe impl Send for Local {}
// SAFETY: other threads only read the atomics (`Lookaside::stats`); `cache` is accessed
// only through `Lookaside::local()`, which gives each thread its own `Local`, or with
// exclusive access (`&mut Lookaside` in `Drop`).
unsafe impl Sync for Local {}

impl Local {
    fn new() -> Self {
        Local {
            cache: UnsafeCell::new(Vec::with_capacity(THREAD_CACHE)),
            total_allocates: AtomicU64::new(0),
            allocate_misses: AtomicU64::new(0),
            total_frees: AtomicU64::new(0),
            free_misses: AtomicU64::new(0),
            cached: AtomicUsize::new(0),
        }
    }
}

/// Counts `c` up by one: only the owning thread writes it, so a relaxed load and store is
/// exact (and cheaper than an atomic add).
#[inline(always)]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// A lookaside list of `size`-byte buffers.
pub struct Lookaside {
    size: usize,
    kind: PoolKind,
    tag: PoolTag,
    zero: bool,
    locals: ThreadLocal<Local>,
    depot: ArrayQueue<NonNull<u8>>,
    pool: Arc<PoolTracker>,
}

// SAFETY: the buffers in the depot and the thread caches are pool blocks owned by the list
// (no one else holds them while they are free); `ArrayQueue` and `ThreadLocal` are safe to
// share for `Send` items, and `Local` is `Sync` (see there).
unsafe impl Send for Lookaside {}
// SAFETY: as for `Send`.
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
    /// keeping at most `depth` (> 0) free buffers in its shared depot (plus up to
    /// [`THREAD_CACHE`] in each thread's cache).
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
            locals: ThreadLocal::new(),
            depot: ArrayQueue::new(depth),
            pool,
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

    /// Runs `f` on the calling thread's part and its cache. `f` must not use the list's
    /// caches again (none of the callers below do: the slow paths use the depot and the
    /// pool only).
    #[inline(always)]
    fn with_local<R>(&self, f: impl FnOnce(&Local, &mut Vec<NonNull<u8>>) -> R) -> R {
        let local = self.locals.get_or(Local::new);
        // SAFETY: `ThreadLocal::get_or` returns the calling thread's own `Local`, so no
        // other thread accesses this cache (other threads read only its atomics), and this
        // thread holds no other borrow of it: the borrow lives only during `f`, which does
        // not reenter.
        let cache = unsafe { &mut *local.cache.get() };
        f(local, cache)
    }

    /// Takes a buffer (from the thread's cache, else the depot, else the pool). `None` when
    /// the pool is out of memory, or when the verifier's low resources simulation fails it
    /// (whatever the list holds).
    #[inline]
    pub fn allocate(&self) -> Option<NonNull<u8>> {
        if low_resources::fails(Allocation::Lookaside(self.tag)) {
            return None;
        }
        let p = self.with_local(|local, cache| {
            bump(&local.total_allocates);
            match cache.pop() {
                Some(p) => {
                    local.cached.store(cache.len(), Ordering::Relaxed);
                    Some(p)
                }
                None => self.allocate_slow(local),
            }
        })?;
        if self.zero {
            // SAFETY: `p` is a block of `size` bytes owned by this list and now handed to
            // the caller; nothing else accesses it.
            unsafe { p.as_ptr().write_bytes(0, self.size) };
        }
        Some(p)
    }

    /// The thread's cache is empty: the depot, else the pool (an allocate miss).
    #[cold]
    fn allocate_slow(&self, local: &Local) -> Option<NonNull<u8>> {
        if let Some(p) = self.depot.pop() {
            return Some(p);
        }
        bump(&local.allocate_misses);
        Some(
            self.pool
                .allocate_for_list(self.kind, self.size, self.tag)?
                .ptr,
        )
    }

    /// Returns a buffer.
    ///
    /// # Safety
    ///
    /// `p` must come from this list's [`Lookaside::allocate`] and not have been freed since;
    /// the caller gives up every access to it.
    #[inline]
    pub unsafe fn free(&self, p: NonNull<u8>) {
        self.with_local(|local, cache| {
            bump(&local.total_frees);
            if cache.len() < THREAD_CACHE {
                cache.push(p);
                local.cached.store(cache.len(), Ordering::Relaxed);
            } else {
                self.free_slow(local, p);
            }
        })
    }

    /// The thread's cache is full: the depot, else the pool (a free miss).
    #[cold]
    fn free_slow(&self, local: &Local, p: NonNull<u8>) {
        if let Err(p) = self.depot.push(p) {
            bump(&local.free_misses);
            self.pool.free(p.as_ptr(), Some(self.tag));
        }
    }

    /// The counters, summed over every thread that used the list (exact once the threads'
    /// operations are done).
    pub fn stats(&self) -> LookasideStats {
        let mut s = LookasideStats {
            depth: self.depot.len(),
            ..LookasideStats::default()
        };
        for l in self.locals.iter() {
            s.total_allocates += l.total_allocates.load(Ordering::Relaxed);
            s.allocate_misses += l.allocate_misses.load(Ordering::Relaxed);
            s.total_frees += l.total_frees.load(Ordering::Relaxed);
            s.free_misses += l.free_misses.load(Ordering::Relaxed);
            s.depth += l.cached.load(Ordering::Relaxed);
        }
        s
    }

    /// Returns the depot's and the calling thread's free buffers to the pool (other
    /// threads' caches are returned when the list is dropped).
    pub fn trim(&self) {
        self.with_local(|local, cache| {
            for p in cache.drain(..) {
                self.pool.free(p.as_ptr(), Some(self.tag));
            }
            local.cached.store(0, Ordering::Relaxed);
        });
        while let Some(p) = self.depot.pop() {
            self.pool.free(p.as_ptr(), Some(self.tag));
        }
    }
}

impl Drop for Lookaside {
    fn drop(&mut self) {
        for l in self.locals.iter_mut() {
            for p in l.cache.get_mut().drain(..) {
                self.pool.free(p.as_ptr(), Some(self.tag));
            }
        }
        while let Some(p) = self.depot.pop() {
            self.pool.free(p.as_ptr(), Some(self.tag));
        }
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
        // Depot of 2: THREAD_CACHE frees stay in the thread's cache, 2 go to the depot,
        // the last one back to the pool.
        let (pool, l) = list(64, PoolKind::NonPaged, 2);
        let n = THREAD_CACHE + 3;
        let bufs: Vec<_> = (0..n).map(|_| LookasideBuffer::new(&l).unwrap()).collect();
        assert_eq!(l.stats().allocate_misses, n as u64);
        drop(bufs);
        let s = l.stats();
        assert_eq!(
            (s.total_allocates, s.total_frees, s.free_misses, s.depth),
            (n as u64, n as u64, 1, THREAD_CACHE + 2)
        );
        let again = LookasideBuffer::new(&l).unwrap();
        assert_eq!(
            l.stats().allocate_misses,
            n as u64,
            "served from the free list"
        );
        drop(again);
        assert_eq!(
            pool.tag_stats(TAG, PoolKind::NonPaged).outstanding(),
            (THREAD_CACHE + 2) as u64
        );
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
            assert_eq!(l.zeroes(), zeroed);
            let mut b = LookasideBuffer::new(&l).unwrap();
            assert_eq!(b.as_mut_slice().len(), size);
            b.as_mut_slice().fill(0xEE);
            drop(b);
            let b = LookasideBuffer::new(&l).unwrap();
            // The whole buffer: a check over an empty slice would pass whatever it held.
            assert_eq!(b.as_slice().len(), size);
            let expect = if zeroed { 0 } else { 0xEE };
            assert!(
                b.as_slice().iter().all(|&x| x == expect),
                "size {size} {kind:?}: zeroed {zeroed}"
            );
        }
    }

    #[test]
    fn fresh_buffers_are_zeroed_only_when_small() {
        use crate::pool::POOL_FILL;
        for (size, first) in [(8, 0), (PAGE_SIZE - 8, 0), (PAGE_SIZE, POOL_FILL)] {
            let (_pool, l) = list(size, PoolKind::NonPaged, 4);
            let b = LookasideBuffer::new(&l).unwrap();
            assert_eq!(b.as_slice().len(), size);
            assert!(
                b.as_slice().iter().all(|&x| x == first),
                "size {size}: a pool block, zeroed only below a page"
            );
        }
    }

    #[test]
    fn list_reports_what_it_was_made_with() {
        let (_pool, l) = list(200, PoolKind::Paged, 4);
        assert_eq!(
            (l.size(), l.kind(), l.tag(), l.zeroes()),
            (200, PoolKind::Paged, TAG, true)
        );
        let b = LookasideBuffer::new(&l).unwrap();
        assert!(Arc::ptr_eq(b.list(), &l));
        let shown = format!("{l:?}");
        assert!(
            shown.contains("size: 200") && shown.contains("total_allocates: 1"),
            "{shown}"
        );
    }

    #[test]
    fn allocation_fails_when_the_pool_has_no_memory() {
        // Larger than any pool allocation: every allocation misses and fails.
        let size = crate::pool::POOL_MAX_ALLOCATION + 1;
        let (pool, l) = list(size, PoolKind::NonPaged, 4);
        assert!(LookasideBuffer::new(&l).is_none());
        assert!(l.allocate().is_none());
        let s = l.stats();
        assert_eq!((s.total_allocates, s.allocate_misses, s.depth), (2, 2, 0));
        assert_eq!(pool.tag_stats(TAG, PoolKind::NonPaged).failures, 2);
    }

    #[test]
    fn trim_returns_this_threads_and_the_depots_buffers_to_the_pool() {
        let (pool, l) = list(64, PoolKind::NonPaged, 4);
        let outstanding = || pool.tag_stats(TAG, PoolKind::NonPaged).outstanding();
        l.trim();
        assert_eq!((l.stats().depth, outstanding()), (0, 0), "nothing to trim");
        let mut bufs: Vec<_> = (0..THREAD_CACHE + 6)
            .map(|_| LookasideBuffer::new(&l).unwrap())
            .collect();
        let keep = bufs.pop().unwrap();
        let mine = bufs.split_off(THREAD_CACHE + 2);
        // Another thread frees THREAD_CACHE + 2: its cache fills, 2 go to the depot; this
        // thread frees 3 into its own cache.
        std::thread::scope(|s| {
            s.spawn(move || drop(bufs));
        });
        drop(mine);
        assert_eq!(l.stats().depth, THREAD_CACHE + 5);
        assert_eq!(outstanding(), (THREAD_CACHE + 6) as u64);
        l.trim();
        // The other thread's cache stays (until the list goes).
        assert_eq!(l.stats().depth, THREAD_CACHE);
        assert_eq!(outstanding(), (THREAD_CACHE + 1) as u64);
        let misses = l.stats().allocate_misses;
        let again = LookasideBuffer::new(&l).unwrap();
        assert_eq!(l.stats().allocate_misses, misses + 1, "nothing left here");
        drop((again, keep));
        drop(l);
        assert!(pool.leaks().is_empty());
    }

    #[test]
    fn buffers_freed_on_one_thread_serve_another() {
        let (pool, l) = list(64, PoolKind::NonPaged, 64);
        let n = THREAD_CACHE + 8;
        let bufs: Vec<_> = (0..n).map(|_| LookasideBuffer::new(&l).unwrap()).collect();
        // Freed on another thread: its cache keeps THREAD_CACHE, the rest goes to the depot.
        std::thread::scope(|s| {
            s.spawn(move || drop(bufs));
        });
        assert_eq!(l.stats().depth, n);
        let again: Vec<_> = (0..8).map(|_| LookasideBuffer::new(&l).unwrap()).collect();
        assert_eq!(
            l.stats().allocate_misses,
            n as u64,
            "no new misses: taken from the depot"
        );
        drop(again);
        drop(l);
        assert!(
            pool.leaks().is_empty(),
            "every thread's cache went back to the pool"
        );
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
