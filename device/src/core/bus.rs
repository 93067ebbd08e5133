//! Bus memory checks shared by the engine, the MMU's page walker and the fault log.
//!
//! Bus memory is what the VMM mapped for the device. A range is usable only when every byte
//! of it lies in a mapped region whose protection allows the access, and whose memory has
//! not been lost; the device checks before it touches anything.
//!
//! A region is *lost* when touching it raised SIGBUS (its backing file was truncated, or
//! could not supply a page; see [`super::sigbus`]): the handler notes it at once
//! (`note_lost_in_handler`, lock-free), the thread that took the fault records it
//! ([`mark_lost`]), and from then on [`region_allows`] refuses every access to it. The
//! record is keyed by the region's backing file (the `Arc<File>` inside its `FileOffset`,
//! held weakly, so it cannot be confused with a later region at the same address) and is
//! dropped with the mapping ([`forget_lost`], or when the region itself is gone). While
//! nothing is lost a check costs one relaxed atomic load.

use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::spec::{FAULT_BUS_ERROR, FAULT_OUTSIDE_RAM};

/// Direction of an access to bus memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// Whether `region`'s protection allows `access` (a region the VMM mapped read-only is
/// mmapped `PROT_READ`, and a device write to it is a DMA error, never a SIGSEGV) and its
/// memory is not lost ([`is_lost`]).
#[inline]
pub fn region_allows(region: &GuestRegionMmap, access: Access) -> bool {
    let need = match access {
        Access::Read => libc::PROT_READ,
        Access::Write => libc::PROT_WRITE,
    };
    region.prot() & need != 0 && !is_lost(region)
}

/// The fault reason for an access to bus address `addr` that the checks refused:
/// `FAULT_BUS_ERROR` when `addr` is in a lost region, else `FAULT_OUTSIDE_RAM` (no region,
/// or one whose protection does not allow the access).
pub fn refusal(mem: &GuestMemoryMmap, addr: u64) -> u8 {
    match mem.find_region(GuestAddress(addr)) {
        Some(region) if is_lost(region) => FAULT_BUS_ERROR,
        _ => FAULT_OUTSIDE_RAM,
    }
}

/// Backing files of lost regions, held weakly (see the module's documentation).
static LOST: RwLock<Vec<Weak<File>>> = RwLock::new(Vec::new());

/// Slots of [`PENDING`]: more than the threads that touch bus memory at once (a worker
/// per queue and the fault log's writer) can fill, two regions each.
const PENDING_SLOTS: usize = 128;

/// Regions the SIGBUS handler found lost that their thread has not yet recorded in
/// [`LOST`]: the address of their backing file (`Arc::as_ptr`), 0 in a free slot. The
/// handler, which may not take a lock, fills a slot before it replaces the page; the thread
/// that took the fault moves the entry to [`LOST`] ([`mark_lost`]) before it lets go of its
/// bus memory snapshot, so the file (and so its address) lives as long as its slot.
static PENDING: [AtomicUsize; PENDING_SLOTS] = [const { AtomicUsize::new(0) }; PENDING_SLOTS];

/// Filled slots of [`PENDING`].
static PENDING_ENTRIES: AtomicUsize = AtomicUsize::new(0);

/// Entries in [`LOST`] plus filled slots of [`PENDING`]: 0 means nothing is lost, and
/// [`is_lost`] looks no further.
static LOST_ENTRIES: AtomicUsize = AtomicUsize::new(0);

fn lost() -> RwLockReadGuard<'static, Vec<Weak<File>>> {
    LOST.read().unwrap_or_else(PoisonError::into_inner)
}

fn lost_mut() -> RwLockWriteGuard<'static, Vec<Weak<File>>> {
    LOST.write().unwrap_or_else(PoisonError::into_inner)
}

/// The file behind `region`, the key of the lost registry.
fn backing(region: &GuestRegionMmap) -> Option<&Arc<File>> {
    region.file_offset().map(FileOffset::arc)
}

/// The key of `file` in [`PENDING`].
fn key(file: &Arc<File>) -> usize {
    Arc::as_ptr(file) as usize
}

/// Whether `entry` is the backing file `file`.
fn is(entry: &Weak<File>, file: &Arc<File>) -> bool {
    std::ptr::eq(entry.as_ptr(), Arc::as_ptr(file))
}

/// Drop the entries of regions that are gone.
fn prune(entries: &mut Vec<Weak<File>>) {
    let before = entries.len();
    entries.retain(|e| e.strong_count() > 0);
    LOST_ENTRIES.fetch_sub(before - entries.len(), Ordering::SeqCst);
}

/// Empty the [`PENDING`] slots holding `key`.
fn clear_pending(key: usize) {
    if PENDING_ENTRIES.load(Ordering::SeqCst) == 0 {
        return;
    }
    for slot in &PENDING {
        if slot
            .compare_exchange(key, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            PENDING_ENTRIES.fetch_sub(1, Ordering::SeqCst);
            LOST_ENTRIES.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Whether anything is lost at all (one load): the device re-checks what it touched
/// only then.
#[inline]
pub fn any_lost() -> bool {
    LOST_ENTRIES.load(Ordering::SeqCst) != 0
}

/// Whether `region`'s memory was lost ([`mark_lost`], or found so by the SIGBUS handler
/// and not yet recorded). One relaxed load while nothing is.
#[inline]
pub fn is_lost(region: &GuestRegionMmap) -> bool {
    LOST_ENTRIES.load(Ordering::Relaxed) != 0 && is_lost_slow(region)
}

#[cold]
#[inline(never)]
fn is_lost_slow(region: &GuestRegionMmap) -> bool {
    let Some(file) = backing(region) else {
        return false;
    };
    // Pending first: an entry leaves it only after it is in the registry.
    let k = key(file);
    let pending = PENDING_ENTRIES.load(Ordering::SeqCst) != 0
        && PENDING.iter().any(|s| s.load(Ordering::SeqCst) == k);
    pending || lost().iter().any(|e| is(e, file))
}

/// Whether bus address `addr` is in a lost region of `mem`.
#[inline]
pub fn is_lost_at(mem: &GuestMemoryMmap, addr: u64) -> bool {
    LOST_ENTRIES.load(Ordering::Relaxed) != 0
        && mem.find_region(GuestAddress(addr)).is_some_and(is_lost)
}

/// Record that `region`'s memory is lost: the device accesses it no more. Returns whether
/// this is news (so the caller logs once per mapping). A region without a backing file
/// (anonymous memory, which only a hardware error can take away) cannot be recorded: false.
pub fn mark_lost(region: &GuestRegionMmap) -> bool {
    let Some(file) = backing(region) else {
        return false;
    };
    let news = {
        let mut entries = lost_mut();
        prune(&mut entries);
        let news = !entries.iter().any(|e| is(e, file));
        if news {
            LOST_ENTRIES.fetch_add(1, Ordering::SeqCst);
            entries.push(Arc::downgrade(file));
        }
        news
    };
    // Recorded: the handler's note can go (after, so a check finds one or the other).
    clear_pending(key(file));
    news
}

/// From the SIGBUS handler, before it replaces a page of `region`: note that the region
/// is lost, without a lock or an allocation (async-signal-safe), so that other threads
/// refuse it at once. The faulting thread then records it for good ([`mark_lost`]).
pub(crate) fn note_lost_in_handler(region: &GuestRegionMmap) {
    let Some(file) = backing(region) else {
        return;
    };
    let k = key(file);
    if PENDING.iter().any(|s| s.load(Ordering::SeqCst) == k) {
        return;
    }
    // Counted before the slot is filled, so a check that finds the slot also sees a count.
    LOST_ENTRIES.fetch_add(1, Ordering::SeqCst);
    PENDING_ENTRIES.fetch_add(1, Ordering::SeqCst);
    let filled = PENDING.iter().any(|s| {
        s.compare_exchange(0, k, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    });
    if !filled {
        // More pending regions than threads can make: the faulting thread still records
        // it after its access (only others in flight may miss it meanwhile).
        PENDING_ENTRIES.fetch_sub(1, Ordering::SeqCst);
        LOST_ENTRIES.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Forget that `region` was lost: its mapping is being removed (DMA_UNMAP, or the client
/// went). Entries of regions already dropped go too.
pub fn forget_lost(region: &GuestRegionMmap) {
    if LOST_ENTRIES.load(Ordering::SeqCst) == 0 {
        return;
    }
    let Some(file) = backing(region) else {
        return;
    };
    {
        let mut entries = lost_mut();
        let before = entries.len();
        entries.retain(|e| !is(e, file));
        LOST_ENTRIES.fetch_sub(before - entries.len(), Ordering::SeqCst);
        prune(&mut entries);
    }
    clear_pending(key(file));
}

/// Check that `[addr, addr + len)` is mapped with the permission `access`. Returns the first
/// bus address that is not (or `addr` when the range wraps past 2^64).
pub fn check_range(mem: &GuestMemoryMmap, addr: u64, len: u64, access: Access) -> Result<(), u64> {
    if len == 0 {
        return Ok(());
    }
    let last = addr.checked_add(len - 1).ok_or(addr)?;
    let mut a = addr;
    loop {
        let region = mem.find_region(GuestAddress(a)).ok_or(a)?;
        if !region_allows(region, access) {
            return Err(a);
        }
        let region_last = region.last_addr().0;
        if region_last >= last {
            return Ok(());
        }
        a = region_last + 1;
    }
}

/// Number of bytes from `addr` to the end of the region holding it (0 when unmapped).
pub fn region_remaining(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.find_region(GuestAddress(addr))
        .map_or(0, |r| r.last_addr().0 - addr + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        assert_eq!(check_range(&mem, 0, 0x2000, Access::Write), Ok(()));
        assert_eq!(check_range(&mem, 0x1800, 0x1000, Access::Read), Err(0x2000));
        assert_eq!(check_range(&mem, u64::MAX, 2, Access::Read), Err(u64::MAX));
        assert_eq!(check_range(&mem, 0x9000, 0, Access::Read), Ok(()));
        assert_eq!(region_remaining(&mem, 0x4ff0), 0x10);
        assert_eq!(region_remaining(&mem, 0x3000), 0);
    }

    /// A region of a fresh memfd of `len` bytes at `bus`.
    fn file_region(bus: u64, len: usize) -> GuestRegionMmap {
        use std::os::fd::FromRawFd;

        use vm_memory::MmapRegion;
        let name = std::ffi::CString::new("domdma-bus-test").unwrap();
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let region = MmapRegion::build(Some(FileOffset::new(file, 0)), len, prot, libc::MAP_SHARED);
        GuestRegionMmap::new(region.unwrap(), GuestAddress(bus)).unwrap()
    }

    /// A lost region is refused for every access, with `FAULT_BUS_ERROR`, and only that
    /// one; the mark goes when forgotten, and never reaches a later region.
    #[test]
    fn lost_regions_are_refused_until_forgotten_and_only_they() {
        let mem = GuestMemoryMmap::from_regions(vec![
            file_region(0x1000, 0x2000),
            file_region(0x10_0000, 0x1000),
        ])
        .unwrap();
        let a = mem.find_region(GuestAddress(0x1000)).unwrap();
        let b = mem.find_region(GuestAddress(0x10_0000)).unwrap();
        assert!(!is_lost(a));
        assert!(mark_lost(a), "news");
        assert!(!mark_lost(a), "news once");
        assert!(is_lost(a) && !is_lost(b));
        assert!(!region_allows(a, Access::Read) && !region_allows(a, Access::Write));
        assert!(region_allows(b, Access::Write));
        assert_eq!(check_range(&mem, 0x2000, 8, Access::Read), Err(0x2000));
        assert_eq!(check_range(&mem, 0x10_0000, 8, Access::Write), Ok(()));
        assert_eq!(refusal(&mem, 0x2ff8), FAULT_BUS_ERROR);
        assert_eq!(refusal(&mem, 0x10_0000), FAULT_OUTSIDE_RAM);
        assert_eq!(refusal(&mem, 0x5000), FAULT_OUTSIDE_RAM);
        forget_lost(a);
        assert!(!is_lost(a));
        assert_eq!(check_range(&mem, 0x1000, 0x2000, Access::Write), Ok(()));

        // A region that goes while marked leaves nothing behind for the next one.
        let c = file_region(0x1000, 0x2000);
        assert!(mark_lost(&c));
        drop(c);
        let d = file_region(0x1000, 0x2000);
        assert!(!is_lost(&d));
        // Noted by the SIGBUS handler: lost at once, then recorded, then forgotten.
        note_lost_in_handler(b);
        note_lost_in_handler(b);
        assert!(is_lost(b) && is_lost_at(&mem, 0x10_0000) && !is_lost(a));
        assert!(mark_lost(b), "news: the handler's note is not a record");
        assert!(is_lost(b));
        forget_lost(b);
        assert!(!is_lost(b) && !is_lost_at(&mem, 0x10_0000));
        // Anonymous memory (no file) cannot be marked.
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let anon = anon.find_region(GuestAddress(0)).unwrap();
        assert!(!mark_lost(anon) && !is_lost(anon));
    }
}
