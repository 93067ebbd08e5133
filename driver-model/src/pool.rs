//! Tagged pool memory (`ExAllocatePoolWithTag`'s core) with poolmon-style tracking.
//!
//! Every allocation carries a four-byte tag and a pool type and is recorded in a
//! [`PoolTracker`] (one per driver): per tag and pool kind the allocations, frees and bytes
//! in use, as poolmon shows them, and the live blocks, so a free is checked against what
//! was allocated (an unknown address, a second free or a wrong tag is a `BAD_POOL_CALLER`
//! bug check) and what is still live when the driver unloads is a leak report naming tags
//! and sizes.
//!
//! Blocks come from the Rust global allocator: 16-byte aligned, page aligned from one page
//! up (as the NT pool returns them). Fresh blocks are filled with [`POOL_FILL`], not zeroed
//! (the NT pool does not zero), so code that relies on zeroing shows it.

use crate::verifier::low_resources::{self, Allocation};
use std::alloc::{self, Layout};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::verifier::{
    bug_check, BugCheck, BAD_POOL_CALLER, BAD_POOL_CALLER_BAD_ADDRESS, BAD_POOL_CALLER_DOUBLE_FREE,
    BAD_POOL_CALLER_WRONG_TAG,
};

/// The page size of the modelled system.
pub const PAGE_SIZE: usize = 4096;
/// Byte every fresh pool block is filled with.
pub const POOL_FILL: u8 = 0xCD;
/// Alignment of blocks smaller than a page.
pub const POOL_SMALL_ALIGN: usize = 16;
/// Largest single allocation accepted (larger requests fail as out of resources).
pub const POOL_MAX_ALLOCATION: usize = 1 << 32;

/// A pool tag: four characters, stored little endian (the C literal `'dcba'` is the tag
/// poolmon prints as "abcd"; here `PoolTag::new(b"abcd")`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PoolTag(pub u32);

impl PoolTag {
    /// The tag poolmon prints as `chars`.
    pub const fn new(chars: &[u8; 4]) -> Self {
        PoolTag(u32::from_le_bytes(*chars))
    }

    /// The four characters as poolmon prints them (non-printable bytes as `.`).
    pub fn chars(self) -> String {
        self.0
            .to_le_bytes()
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '.'
                }
            })
            .collect()
    }
}

impl fmt::Debug for PoolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "'{}'", self.chars())
    }
}

impl fmt::Display for PoolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.chars())
    }
}

/// Paged or non-paged: the distinction the IRQL rules and the statistics care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolKind {
    /// Non-paged pool: usable at any IRQL <= DISPATCH_LEVEL.
    NonPaged,
    /// Paged pool: only at IRQL <= APC_LEVEL.
    Paged,
}

impl fmt::Display for PoolKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolKind::NonPaged => "Nonp",
            PoolKind::Paged => "Paged",
        })
    }
}

/// A live pool block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBlock {
    /// First byte.
    pub ptr: NonNull<u8>,
    /// Size asked for.
    pub size: usize,
    /// Tag.
    pub tag: PoolTag,
    /// Pool.
    pub kind: PoolKind,
}

// SAFETY: a `PoolBlock` is a description (address, size, tag); it gives no access by
// itself, and the tracker that owns the memory is `Sync`.
unsafe impl Send for PoolBlock {}

/// Per tag and pool statistics, as poolmon shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TagStats {
    /// Allocations made.
    pub allocs: u64,
    /// Frees made.
    pub frees: u64,
    /// Allocations failed.
    pub failures: u64,
    /// Bytes in live blocks.
    pub bytes: u64,
    /// Largest `bytes` seen.
    pub peak_bytes: u64,
}

impl TagStats {
    /// Live blocks (`allocs - frees`).
    pub fn outstanding(&self) -> u64 {
        self.allocs - self.frees
    }
}

/// One line of a leak report: what a tag still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    /// Tag.
    pub tag: PoolTag,
    /// Pool.
    pub kind: PoolKind,
    /// Live blocks.
    pub blocks: u64,
    /// Their total size.
    pub bytes: u64,
    /// Their sizes, smallest first.
    pub sizes: Vec<usize>,
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tag '{}' ({}): {} block(s), {} bytes, sizes {:?}",
            self.tag, self.kind, self.blocks, self.bytes, self.sizes
        )
    }
}

#[derive(Default)]
struct State {
    live: HashMap<usize, PoolBlock>,
    /// Addresses freed since their block was last allocated, to tell a double free from a
    /// wild pointer (bounded: forgotten oldest first).
    freed: HashMap<usize, PoolTag>,
    stats: BTreeMap<(PoolTag, PoolKind), TagStats>,
}

/// Bound on remembered freed addresses.
const FREED_MEMORY: usize = 4096;

/// The pool of one driver (or of the system): allocation, checked free, statistics.
#[derive(Default)]
pub struct PoolTracker {
    state: Mutex<State>,
}

impl fmt::Debug for PoolTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("PoolTracker")
            .field("live", &s.live.len())
            .finish()
    }
}

fn layout(size: usize) -> Option<Layout> {
    let align = if size >= PAGE_SIZE {
        PAGE_SIZE
    } else {
        POOL_SMALL_ALIGN
    };
    Layout::from_size_align(size.max(1), align).ok()
}

impl PoolTracker {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps inconsistent (every update
        // is a single insert or remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates `size` bytes tagged `tag`, filled with [`POOL_FILL`]. `None` when the
    /// request is too large, memory is exhausted, or the verifier's low resources
    /// simulation fails it (each counted as a failure of the tag).
    pub fn allocate(&self, kind: PoolKind, size: usize, tag: PoolTag) -> Option<PoolBlock> {
        if low_resources::fails(Allocation::Pool(tag)) {
            let mut s = self.lock();
            s.stats.entry((tag, kind)).or_default().failures += 1;
            return None;
        }
        self.allocate_for_list(kind, size, tag)
    }

    /// [`PoolTracker::allocate`] without the low resources simulation: for a lookaside
    /// list's own refill, whose allocation the simulation already judged
    /// ([`crate::lookaside::Lookaside::allocate`]).
    pub(crate) fn allocate_for_list(
        &self,
        kind: PoolKind,
        size: usize,
        tag: PoolTag,
    ) -> Option<PoolBlock> {
        let block = layout(size)
            .filter(|_| size <= POOL_MAX_ALLOCATION)
            .and_then(|l| {
                // SAFETY: the layout has a non-zero size (`size.max(1)`).
                let p = unsafe { alloc::alloc(l) };
                NonNull::new(p)
            });
        let mut s = self.lock();
        let stats = s.stats.entry((tag, kind)).or_default();
        let Some(ptr) = block else {
            stats.failures += 1;
            return None;
        };
        // SAFETY: `ptr` was just allocated with at least `size` bytes.
        unsafe { ptr.as_ptr().write_bytes(POOL_FILL, size) };
        stats.allocs += 1;
        stats.bytes += size as u64;
        stats.peak_bytes = stats.peak_bytes.max(stats.bytes);
        let block = PoolBlock {
            ptr,
            size,
            tag,
            kind,
        };
        s.freed.remove(&(ptr.as_ptr() as usize));
        s.live.insert(ptr.as_ptr() as usize, block);
        Some(block)
    }

    /// Frees the block at `ptr`. `tag` is the tag the caller claims (`None`: any, as
    /// `ExFreePool`). An address that is not a live block, or a wrong tag, is a
    /// `BAD_POOL_CALLER` bug check; in record mode the call then does nothing.
    pub fn free(&self, ptr: *mut u8, tag: Option<PoolTag>) {
        let addr = ptr as usize;
        let mut s = self.lock();
        let Some(block) = s.live.get(&addr).copied() else {
            let (sub, what) = if s.freed.contains_key(&addr) {
                (BAD_POOL_CALLER_DOUBLE_FREE, "already freed")
            } else {
                (BAD_POOL_CALLER_BAD_ADDRESS, "not a pool allocation")
            };
            drop(s);
            bug_check(BugCheck::new(
                BAD_POOL_CALLER,
                if sub == BAD_POOL_CALLER_DOUBLE_FREE {
                    [sub, 0, 0, addr as u64]
                } else {
                    [sub, addr as u64, 0, 0]
                },
                format!("free of {addr:#x}: {what}"),
            ));
            return;
        };
        if let Some(tag) = tag {
            if tag != block.tag {
                drop(s);
                bug_check(BugCheck::new(
                    BAD_POOL_CALLER,
                    [
                        BAD_POOL_CALLER_WRONG_TAG,
                        addr as u64,
                        u64::from(block.tag.0),
                        u64::from(tag.0),
                    ],
                    format!(
                        "ExFreePoolWithTag({addr:#x}, '{tag}'): the block is tagged '{}'",
                        block.tag
                    ),
                ));
                return;
            }
        }
        s.live.remove(&addr);
        if s.freed.len() >= FREED_MEMORY {
            s.freed.clear();
        }
        s.freed.insert(addr, block.tag);
        let stats = s.stats.entry((block.tag, block.kind)).or_default();
        stats.frees += 1;
        stats.bytes -= block.size as u64;
        drop(s);
        let l = layout(block.size).expect("the layout was valid at allocation");
        // SAFETY: `block` was allocated by `allocate` with this layout and was live (it is
        // now removed from the live set, so it is freed once).
        unsafe { alloc::dealloc(block.ptr.as_ptr(), l) };
    }

    /// The live block containing `ptr`'s first byte exactly (blocks are looked up by their
    /// first byte).
    pub fn block(&self, ptr: *const u8) -> Option<PoolBlock> {
        self.lock().live.get(&(ptr as usize)).copied()
    }

    /// Statistics per tag and pool, sorted by tag.
    pub fn stats(&self) -> Vec<(PoolTag, PoolKind, TagStats)> {
        self.lock()
            .stats
            .iter()
            .map(|(&(t, k), &s)| (t, k, s))
            .collect()
    }

    /// Statistics of one tag in one pool.
    pub fn tag_stats(&self, tag: PoolTag, kind: PoolKind) -> TagStats {
        self.lock()
            .stats
            .get(&(tag, kind))
            .copied()
            .unwrap_or_default()
    }

    /// What is still allocated, per tag and pool (empty when nothing leaks).
    pub fn leaks(&self) -> Vec<Leak> {
        let s = self.lock();
        let mut by: BTreeMap<(PoolTag, PoolKind), Vec<usize>> = BTreeMap::new();
        for b in s.live.values() {
            by.entry((b.tag, b.kind)).or_default().push(b.size);
        }
        by.into_iter()
            .map(|((tag, kind), mut sizes)| {
                sizes.sort_unstable();
                Leak {
                    tag,
                    kind,
                    blocks: sizes.len() as u64,
                    bytes: sizes.iter().map(|&x| x as u64).sum(),
                    sizes,
                }
            })
            .collect()
    }

    /// A poolmon-like table: tag, pool, allocs, frees, diff, bytes.
    pub fn poolmon(&self) -> String {
        let mut out = String::from("Tag  Type   Allocs   Frees    Diff     Bytes\n");
        for (tag, kind, s) in self.stats() {
            out.push_str(&format!(
                "{tag:<4} {kind:<5} {:>8} {:>7} {:>7} {:>9}\n",
                s.allocs,
                s.frees,
                s.outstanding(),
                s.bytes
            ));
        }
        out
    }

    /// Frees every live block (the driver is gone; its memory goes back), returning what
    /// was live.
    pub fn release_all(&self) -> Vec<Leak> {
        let leaks = self.leaks();
        let blocks: Vec<PoolBlock> = self.lock().live.values().copied().collect();
        for b in blocks {
            self.free(b.ptr.as_ptr(), Some(b.tag));
        }
        leaks
    }
}

impl Drop for PoolTracker {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for b in s.live.values() {
            let l = layout(b.size).expect("valid at allocation");
            // SAFETY: every live block was allocated with this layout and not freed.
            unsafe { alloc::dealloc(b.ptr.as_ptr(), l) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::expect_bug_check;

    const TAG: PoolTag = PoolTag::new(b"Test");

    #[test]
    fn tags_print_like_poolmon() {
        assert_eq!(TAG.chars(), "Test");
        assert_eq!(PoolTag(0x6463_6261).chars(), "abcd");
        assert_eq!(PoolTag(0x0000_0161).chars(), "a...");
    }

    #[test]
    fn allocate_free_and_statistics() {
        let p = PoolTracker::new();
        let a = p.allocate(PoolKind::NonPaged, 100, TAG).unwrap();
        let b = p.allocate(PoolKind::NonPaged, 8192, TAG).unwrap();
        assert_eq!(a.ptr.as_ptr() as usize % POOL_SMALL_ALIGN, 0);
        assert_eq!(
            b.ptr.as_ptr() as usize % PAGE_SIZE,
            0,
            "page-sized blocks are page aligned"
        );
        let last = a.ptr.as_ptr().wrapping_add(99);
        // SAFETY: `a` is live and 100 bytes long.
        assert_eq!(unsafe { last.read() }, POOL_FILL);
        let s = p.tag_stats(TAG, PoolKind::NonPaged);
        assert_eq!((s.allocs, s.frees, s.bytes), (2, 0, 8292));
        p.free(a.ptr.as_ptr(), Some(TAG));
        let s = p.tag_stats(TAG, PoolKind::NonPaged);
        assert_eq!(
            (s.allocs, s.frees, s.bytes, s.peak_bytes),
            (2, 1, 8192, 8292)
        );
        let leaks = p.leaks();
        assert_eq!(leaks.len(), 1);
        assert_eq!(
            (leaks[0].tag, leaks[0].blocks, leaks[0].bytes),
            (TAG, 1, 8192)
        );
        assert!(p.poolmon().contains("Test Nonp"));
        p.free(b.ptr.as_ptr(), None);
        assert!(p.leaks().is_empty());
    }

    #[test]
    fn double_free_is_bad_pool_caller() {
        let p = PoolTracker::new();
        let a = p.allocate(PoolKind::Paged, 10, TAG).unwrap();
        p.free(a.ptr.as_ptr(), Some(TAG));
        let bc = expect_bug_check(|| p.free(a.ptr.as_ptr(), Some(TAG)));
        assert_eq!(
            (bc.code, bc.params[0]),
            (BAD_POOL_CALLER, BAD_POOL_CALLER_DOUBLE_FREE)
        );
    }

    #[test]
    fn wrong_tag_and_wild_pointer_are_bad_pool_caller() {
        let p = PoolTracker::new();
        let a = p.allocate(PoolKind::NonPaged, 10, TAG).unwrap();
        let bc = expect_bug_check(|| p.free(a.ptr.as_ptr(), Some(PoolTag::new(b"Othr"))));
        assert_eq!(
            (bc.code, bc.params[0]),
            (BAD_POOL_CALLER, BAD_POOL_CALLER_WRONG_TAG)
        );
        assert_eq!(p.leaks().len(), 1, "the block is still live");
        let mut x = 0u8;
        let bc = expect_bug_check(|| p.free(&mut x, None));
        assert_eq!(bc.params[0], BAD_POOL_CALLER_BAD_ADDRESS);
        p.free(a.ptr.as_ptr(), Some(TAG));
    }

    #[test]
    fn huge_requests_fail_and_are_counted() {
        let p = PoolTracker::new();
        assert!(p
            .allocate(PoolKind::NonPaged, usize::MAX / 2, TAG)
            .is_none());
        assert_eq!(p.tag_stats(TAG, PoolKind::NonPaged).failures, 1);
    }
}
