//! Bus memory the device reaches only through its client: vfio-user DMA_MAP without a file
//! descriptor, which the server reads and writes with DMA_READ / DMA_WRITE messages.
//!
//! The core still sees every bus region through `vm-memory`: such a mapping is a region of
//! the same size and protection backed by a file of the server's own (a memfd), a
//! *shadow*, registered here with the [`RemoteMemory`] that reaches the real memory. The
//! hooks move bytes between the client and the shadow's file (`pwrite` / `pread`), so the
//! shadow can be read-only or write-only for the device, as the client mapped it. The shadow is never the truth: before
//! the device reads bytes of a shadow it fetches them from the client ([`sync_in`]), and
//! after it writes bytes there it sends them to the client ([`sync_out`]). Every access of
//! the device goes through one of the places that call these (descriptor fetch, page-table
//! entry reads, the data path's pieces, completion and fault records), so the device sees
//! what the guest wrote and the guest sees what the device wrote, at the granularity of
//! those accesses. Memory without a shadow costs one relaxed load per call.
//!
//! A client access that fails (the client refuses it, does not answer in time, or has
//! gone) is a bus error for the device: the access's descriptor ends with a DMA error and a
//! `FAULT_BUS_ERROR` record, as for client memory that vanished.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use thiserror::Error;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Why an access through the client failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RemoteError {
    /// The client answered with an error.
    #[error("the client refused the access (errno {0})")]
    Refused(u32),
    /// The client did not answer in time.
    #[error("no answer from the client within {0:?}")]
    Timeout(Duration),
    /// The connection is gone, or its accesses were cut short (reset, disconnect).
    #[error("the client connection is gone or its accesses were aborted")]
    Gone,
    /// The client's answer did not match the request.
    #[error("the client's answer does not match the request: {0}")]
    BadReply(String),
    /// The access was cut short for a while (the server serves a command that may wait for
    /// the device); it is to be tried again once the device's locks are released.
    #[error("the access was interrupted; try again")]
    Interrupted,
}

/// Reads and writes bus memory that only the client can reach (bus addresses, any length:
/// the implementation splits them as its transport needs).
pub trait RemoteMemory: Send + Sync + std::fmt::Debug {
    /// Read `buf.len()` bytes at bus address `bus`.
    fn read(&self, bus: u64, buf: &mut [u8]) -> Result<(), RemoteError>;
    /// Write `data` at bus address `bus`.
    fn write(&self, bus: u64, data: &[u8]) -> Result<(), RemoteError>;
}

#[derive(Debug)]
struct Shadow {
    /// Host address of the shadow region's first byte (its key).
    host: usize,
    remote: Arc<dyn RemoteMemory>,
}

/// Registered shadows. Few (one per fd-less mapping); read-mostly.
static SHADOWS: RwLock<Vec<Shadow>> = RwLock::new(Vec::new());
/// Entries of [`SHADOWS`]: 0 means none, and the hooks return at once.
static SHADOW_ENTRIES: AtomicUsize = AtomicUsize::new(0);

/// Bytes moved per client access from a shadow hook (a bounce buffer of this size per
/// thread).
const BOUNCE: usize = 256 << 10;

thread_local! {
    static BOUNCE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A read of this thread was interrupted ([`RemoteError::Interrupted`]).
    static INTERRUPTED: Cell<bool> = const { Cell::new(false) };
    /// Writes of this thread that were interrupted, to send again ([`flush_deferred`]).
    static DEFERRED: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
}

/// A write to the client to send again: the bytes are in the shadow's file.
struct Deferred {
    remote: Arc<dyn RemoteMemory>,
    file: Arc<File>,
    /// File offset of `bus`.
    at: u64,
    bus: u64,
    len: u64,
}

/// Whether a read of this thread was interrupted since the last call (the caller releases
/// what it holds and tries again).
pub fn take_interrupted() -> bool {
    INTERRUPTED.with(|i| i.replace(false))
}

fn defer(remote: &Arc<dyn RemoteMemory>, file: &Arc<File>, at: u64, bus: u64, len: u64) {
    DEFERRED.with(|d| {
        d.borrow_mut().push(Deferred {
            remote: Arc::clone(remote),
            file: Arc::clone(file),
            at,
            bus,
            len,
        })
    });
}

/// Whether this thread has interrupted writes to send.
pub fn has_deferred() -> bool {
    DEFERRED.with(|d| !d.borrow().is_empty())
}

/// Send this thread's interrupted writes, in order, retrying while they are interrupted.
/// Call with no device lock held. `Ok(true)`: all sent. `Ok(false)`: `give_up()` said to
/// stop while they were still interrupted; what is left stays for a later call. `Err`: the
/// first bus address the client refused (the rest are dropped).
pub fn flush_deferred(give_up: impl Fn() -> bool) -> Result<bool, u64> {
    let mut pending: std::collections::VecDeque<Deferred> = DEFERRED
        .with(|d| std::mem::take(&mut *d.borrow_mut()))
        .into();
    let mut buf = vec![0u8; BOUNCE];
    while let Some(mut d) = pending.pop_front() {
        while d.len > 0 {
            let n = d.len.min(BOUNCE as u64) as usize;
            let chunk = &mut buf[..n];
            if d.file.read_exact_at(chunk, d.at).is_err() {
                return Err(d.bus);
            }
            match d.remote.write(d.bus, chunk) {
                Ok(()) => {
                    d.at += n as u64;
                    d.bus += n as u64;
                    d.len -= n as u64;
                }
                Err(RemoteError::Interrupted) if give_up() => {
                    pending.push_front(d);
                    DEFERRED.with(|q| {
                        let mut q = q.borrow_mut();
                        let later = std::mem::take(&mut *q);
                        q.extend(pending);
                        q.extend(later);
                    });
                    return Ok(false);
                }
                Err(RemoteError::Interrupted) => {
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(_) => return Err(d.bus),
            }
        }
    }
    Ok(true)
}

fn host(region: &GuestRegionMmap) -> usize {
    region.as_ptr() as usize
}

/// Make `region` the shadow of memory that `remote` reaches. The region must be backed by
/// a file of the server's own (a memfd the size of the mapping, mapped `MAP_SHARED`): the
/// hooks write and read that file, whatever protection the region has.
pub fn register(region: &GuestRegionMmap, remote: Arc<dyn RemoteMemory>) {
    let mut s = SHADOWS.write().unwrap_or_else(PoisonError::into_inner);
    s.push(Shadow {
        host: host(region),
        remote,
    });
    SHADOW_ENTRIES.fetch_add(1, Ordering::SeqCst);
}

/// Forget `region` (its mapping is being removed).
pub fn unregister(region: &GuestRegionMmap) {
    let mut s = SHADOWS.write().unwrap_or_else(PoisonError::into_inner);
    let before = s.len();
    let h = host(region);
    s.retain(|e| e.host != h);
    SHADOW_ENTRIES.fetch_sub(before - s.len(), Ordering::SeqCst);
}

/// The client access behind `region`, if it is a shadow.
#[inline]
pub fn remote_of(region: &GuestRegionMmap) -> Option<Arc<dyn RemoteMemory>> {
    if SHADOW_ENTRIES.load(Ordering::Relaxed) == 0 {
        return None;
    }
    lookup(region)
}

#[cold]
#[inline(never)]
fn lookup(region: &GuestRegionMmap) -> Option<Arc<dyn RemoteMemory>> {
    let h = host(region);
    SHADOWS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .find(|e| e.host == h)
        .map(|e| Arc::clone(&e.remote))
}

/// Whether `region` is a shadow.
#[inline]
pub fn is_shadow(region: &GuestRegionMmap) -> bool {
    remote_of(region).is_some()
}

/// Whether any shadow exists (one load).
#[inline]
pub fn any() -> bool {
    SHADOW_ENTRIES.load(Ordering::Relaxed) != 0
}

/// The direction of a hook.
#[derive(Clone, Copy)]
enum Dir {
    In,
    Out,
}

/// Before the device reads `[bus, bus + len)` of `mem`: fetch the shadowed parts from the
/// client. Returns the first bus address whose fetch failed. Ranges outside bus memory
/// are left to the caller's own checks.
#[inline]
pub fn sync_in(mem: &GuestMemoryMmap, bus: u64, len: u64) -> Result<(), u64> {
    if !any() {
        return Ok(());
    }
    sync(mem, bus, len, Dir::In)
}

/// After the device wrote `[bus, bus + len)` of `mem`: send the shadowed parts to the
/// client. Returns the first bus address whose write failed.
#[inline]
pub fn sync_out(mem: &GuestMemoryMmap, bus: u64, len: u64) -> Result<(), u64> {
    if !any() {
        return Ok(());
    }
    sync(mem, bus, len, Dir::Out)
}

#[cold]
#[inline(never)]
fn sync(mem: &GuestMemoryMmap, bus: u64, len: u64, dir: Dir) -> Result<(), u64> {
    let end = bus.saturating_add(len);
    let mut a = bus;
    while a < end {
        let Some(region) = mem.find_region(GuestAddress(a)) else {
            return Ok(());
        };
        let region_end = region.last_addr().0.saturating_add(1);
        let upto = end.min(region_end);
        if let Some(remote) = lookup(region) {
            sync_region(region, &remote, a, upto, dir)?;
        }
        a = upto;
    }
    Ok(())
}

fn sync_region(
    region: &GuestRegionMmap,
    remote: &Arc<dyn RemoteMemory>,
    from: u64,
    to: u64,
    dir: Dir,
) -> Result<(), u64> {
    let Some(fo) = region.file_offset() else {
        // Registered shadows are file backed (see `register`).
        return Err(from);
    };
    let file = fo.file();
    BOUNCE_BUF.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.len() < BOUNCE {
            buf.resize(BOUNCE, 0);
        }
        let mut a = from;
        while a < to {
            // Bounded by BOUNCE, a usize.
            let n = (to - a).min(BOUNCE as u64) as usize;
            let at = fo.start() + (a - region.start_addr().0);
            let chunk = &mut buf[..n];
            let ok = match dir {
                Dir::In => match remote.read(a, chunk) {
                    Ok(()) => file.write_all_at(chunk, at).is_ok(),
                    Err(RemoteError::Interrupted) => {
                        INTERRUPTED.with(|i| i.set(true));
                        false
                    }
                    Err(_) => false,
                },
                Dir::Out if has_deferred() => {
                    // Writes reach the client in the order the device made them: behind
                    // the interrupted ones.
                    defer(remote, fo.arc(), at, a, to - a);
                    return Ok(());
                }
                Dir::Out => {
                    if file.read_exact_at(chunk, at).is_err() {
                        return Err(a);
                    }
                    match remote.write(a, chunk) {
                        Ok(()) => true,
                        Err(RemoteError::Interrupted) => {
                            // The bytes are in the shadow: send them (and the rest of
                            // this range) once the caller has let go of its locks.
                            defer(remote, fo.arc(), at, a, to - a);
                            return Ok(());
                        }
                        Err(_) => false,
                    }
                }
            };
            if !ok {
                return Err(a);
            }
            a += n as u64;
        }
        Ok(())
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use vm_memory::mmap::MmapRegion;
    use vm_memory::{Bytes, FileOffset};

    use super::*;

    /// Client memory in a vector, at bus address `base`; counts the bytes moved.
    #[derive(Debug)]
    pub(crate) struct VecMemory {
        pub base: u64,
        pub bytes: Mutex<Vec<u8>>,
        pub moved: AtomicUsize,
        /// Accesses that reach this bus address or beyond are refused.
        pub fail_from: std::sync::atomic::AtomicU64,
    }

    impl VecMemory {
        pub(crate) fn new(base: u64, len: usize) -> Arc<Self> {
            Arc::new(Self {
                base,
                bytes: Mutex::new(vec![0; len]),
                moved: AtomicUsize::new(0),
                fail_from: std::sync::atomic::AtomicU64::new(u64::MAX),
            })
        }

        fn range(&self, bus: u64, len: usize) -> Result<std::ops::Range<usize>, RemoteError> {
            if bus.saturating_add(len as u64) > self.fail_from.load(Ordering::Relaxed) {
                return Err(RemoteError::Refused(libc::EFAULT as u32));
            }
            let start = bus
                .checked_sub(self.base)
                .ok_or(RemoteError::Refused(libc::ENODEV as u32))? as usize;
            let end = start + len;
            if end > self.bytes.lock().unwrap().len() {
                return Err(RemoteError::Refused(libc::ENODEV as u32));
            }
            self.moved.fetch_add(len, Ordering::Relaxed);
            Ok(start..end)
        }
    }

    impl RemoteMemory for VecMemory {
        fn read(&self, bus: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
            let r = self.range(bus, buf.len())?;
            buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
            Ok(())
        }

        fn write(&self, bus: u64, data: &[u8]) -> Result<(), RemoteError> {
            let r = self.range(bus, data.len())?;
            self.bytes.lock().unwrap()[r].copy_from_slice(data);
            Ok(())
        }
    }

    /// A shadow region of `len` bytes at `base` (a memfd, mapped read-write).
    pub(crate) fn shadow(base: u64, len: usize) -> GuestRegionMmap {
        let name = std::ffi::CString::new("shadow").unwrap();
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64).unwrap();
        let r = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .unwrap();
        GuestRegionMmap::new(r, GuestAddress(base)).unwrap()
    }

    #[test]
    fn hooks_move_shadowed_bytes_and_report_the_first_failure() {
        let client = VecMemory::new(0x10_0000, 0x4000);
        let region = shadow(0x10_0000, 0x4000);
        register(&region, client.clone());
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let region = mem.find_region(GuestAddress(0x10_0000)).unwrap();
        client.bytes.lock().unwrap()[0x10..0x20].copy_from_slice(&[7; 16]);
        sync_in(&mem, 0x10_0010, 16).unwrap();
        let mut got = [0u8; 16];
        mem.read_slice(&mut got, GuestAddress(0x10_0010)).unwrap();
        assert_eq!(got, [7; 16]);
        mem.write_slice(&[9; 8], GuestAddress(0x10_1000)).unwrap();
        assert_eq!(client.bytes.lock().unwrap()[0x1000], 0, "not yet sent");
        sync_out(&mem, 0x10_1000, 8).unwrap();
        assert_eq!(client.bytes.lock().unwrap()[0x1000..0x1008], [9; 8]);
        client.fail_from.store(0x10_2000, Ordering::Relaxed);
        assert_eq!(sync_in(&mem, 0x10_2000, 8), Err(0x10_2000));
        unregister(region);
    }
}
