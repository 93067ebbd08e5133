//! Bus memory that vanishes: SIGBUS from the client's memory, turned into a fault.
//!
//! Bus memory is the client's: files (memfd, hugetlbfs, tmpfs) it sent with DMA_MAP and that
//! the transport mmapped `MAP_SHARED`. Touching a page of such a mapping raises SIGBUS when
//! the page has no backing any more: the client shrank the file after mapping it, a
//! hugetlbfs file has no huge page left for it, a hole of a sparse file cannot be filled on a
//! full file system, or the page has a hardware memory error. SIGBUS's default action ends
//! the whole server; here it ends the access instead:
//!
//! - [`install`] puts a process-wide SIGBUS handler in place, once (the transport calls it
//!   when it maps the first file, the device when it is created).
//! - Every access the device makes to bus memory happens on a thread armed with the bus
//!   memory snapshot it uses (`arm`), and is followed by a `take_fault` check.
//! - A SIGBUS raised by the kernel on an armed thread, for an address inside one of the
//!   armed snapshot's regions, is recovered: the handler maps an anonymous private page
//!   (`MAP_FIXED`) over the faulting page, records the page in the thread and returns.
//!   The access restarts and completes on the anonymous page (reads see zeros, writes
//!   stay in this process and go with the mapping). The page is 4 KiB, else 2 MiB, else
//!   1 GiB, whichever the kernel accepts inside the region (a hugetlbfs mapping cannot be
//!   split at 4 KiB).
//! - The thread then sees the page in `take_fault`, reports a `FAULT_BUS_ERROR` and
//!   marks the region lost (`lose`, [`super::bus::mark_lost`]): the device refuses every
//!   later access to it without touching it.
//! - Any other SIGBUS (an unarmed thread, an address outside the armed snapshot, a signal
//!   sent by a process, or a page the kernel would not replace) goes back to the action
//!   this handler replaced (for a Rust program, one that ends in the default action), so a
//!   genuine bug still ends the process with SIGBUS (or reaches a fuzzer's crash report).
//!
//! Another thread may touch the replaced page before the region is recorded as lost: the
//! handler notes the region in a lock-free table before it replaces the page
//! (`bus::note_lost_in_handler`), and every access checks, after it, whether anything
//! it touched was lost meanwhile ([`bus::any_lost`]), so no access that read a replaced
//! page completes as if it had not.
//!
//! The handler does only async-signal-safe things: it reads and writes thread-local atomics
//! (const-initialised, without destructors) and static atomics, reads the armed snapshot's
//! region list (immutable, and kept alive by the interrupted thread), and makes the `mmap`,
//! `sigaction` and `raise` system calls, preserving `errno`.

use std::ffi::c_void;
use std::io;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use tracing::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::bus;

/// Why the SIGBUS handler could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SigbusError {
    /// `sigaction` failed.
    #[error("cannot install the SIGBUS handler")]
    Install(#[source] io::Error),
}

thread_local! {
    /// The bus memory snapshot this thread is touching, null when it touches none.
    static ARMED: AtomicPtr<GuestMemoryMmap> = const { AtomicPtr::new(ptr::null_mut()) };
    /// Host address of the lowest page replaced since the last [`take_fault`], 0 if none.
    static FAULT: AtomicUsize = const { AtomicUsize::new(0) };
    /// Length of that page.
    static FAULT_LEN: AtomicUsize = const { AtomicUsize::new(0) };
}

/// A page of bus memory found lost and replaced by the SIGBUS handler: its host address
/// and length (4 KiB, 2 MiB or 1 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LostPage {
    /// Host address of the page.
    pub host: usize,
    /// Its length.
    pub len: usize,
}

/// The handler's installation: `Ok`, or the `sigaction` errno.
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// The SIGBUS action before ours, put back for a SIGBUS that is not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// SIGBUS recovered so far in this process (pages replaced).
static RECOVERED: AtomicU64 = AtomicU64::new(0);

/// Install the process-wide SIGBUS handler (once; later calls return the first result).
///
/// A SIGBUS it does not recover goes to the action it replaced (the Rust runtime's
/// stack-overflow handler, which ends in the default action for anything but a stack guard
/// page; a fuzzer's crash reporter), as if this handler were not there.
pub fn install() -> Result<(), SigbusError> {
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: an all-zero `sigaction` is a valid value (no flags, empty mask), which
        // `sigaction` overwrites.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: asks for the current action only.
        if unsafe { libc::sigaction(libc::SIGBUS, ptr::null(), &mut previous) } == 0 {
            let _ = PREVIOUS.set(previous);
        }
        // SAFETY: an all-zero `sigaction` is a valid value (no flags, empty mask), which
        // is then filled in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `sa_mask` is a `sigset_t` owned by `action`.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: `action` is a valid `sigaction` whose handler has the SA_SIGINFO
        // signature; the old action is not asked for.
        if unsafe { libc::sigaction(libc::SIGBUS, &action, ptr::null_mut()) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    result.map_err(|errno| SigbusError::Install(io::Error::from_raw_os_error(errno)))
}

/// [`install`], logging a failure (the device then works as before, but a SIGBUS from
/// client memory ends the process).
pub fn install_or_warn() {
    if let Err(e) = install() {
        warn!(error = %e, "client memory that vanishes will end the process (SIGBUS)");
    }
}

/// How many SIGBUS from bus memory this process has recovered (one per page replaced).
pub fn recovered() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

/// The thread is armed with a snapshot of bus memory: a SIGBUS in one of its regions is
/// recovered and reported to [`take_fault`]. Disarms when dropped (armings nest).
#[derive(Debug)]
#[must_use = "the thread is armed only while the guard lives"]
pub(crate) struct Armed<'m> {
    mem: &'m GuestMemoryMmap,
    prev: *mut GuestMemoryMmap,
    /// Not `Send`: the guard arms the thread that made it.
    _thread: PhantomData<*mut ()>,
}

/// Arm this thread with `mem`, the snapshot it is about to touch, until the guard drops.
#[inline]
pub(crate) fn arm(mem: &GuestMemoryMmap) -> Armed<'_> {
    let want = ptr::from_ref(mem).cast_mut();
    let prev = ARMED.with(|a| {
        let prev = a.load(Ordering::Relaxed);
        a.store(want, Ordering::Relaxed);
        prev
    });
    // The handler runs on this thread: a signal fence orders the arming before the
    // accesses that follow.
    compiler_fence(Ordering::SeqCst);
    Armed {
        mem,
        prev,
        _thread: PhantomData,
    }
}

impl Drop for Armed<'_> {
    #[inline]
    fn drop(&mut self) {
        compiler_fence(Ordering::SeqCst);
        ARMED.with(|a| a.store(self.prev, Ordering::Relaxed));
        if self.prev.is_null() {
            // Nothing armed any more: a fault no one took must not reach a later check,
            // and its region must be recorded while this snapshot still holds it.
            if let Some(page) = take_fault() {
                lose(self.mem, page);
            }
        }
    }
}

/// The lowest page this thread found lost (SIGBUS, recovered) since the last call, if
/// any: the accesses made since then to lost pages went to anonymous pages, see the
/// module's doc. (The lowest, not the first: a copy may touch the end of its range first.)
#[inline]
pub(crate) fn take_fault() -> Option<LostPage> {
    compiler_fence(Ordering::SeqCst);
    FAULT.with(|f| match f.load(Ordering::Relaxed) {
        0 => None,
        host => {
            f.store(0, Ordering::Relaxed);
            let len = FAULT_LEN.with(|l| l.load(Ordering::Relaxed));
            Some(LostPage { host, len })
        }
    })
}

/// The region of `mem` holding host address `host`, and the bus address of that byte.
pub(crate) fn locate(mem: &GuestMemoryMmap, host: usize) -> Option<(&GuestRegionMmap, u64)> {
    mem.iter().find_map(|r| {
        let start = r.as_ptr() as usize;
        let off = host.checked_sub(start)?;
        (off < r.size()).then(|| (r, r.start_addr().0 + off as u64))
    })
}

/// `page` was found lost (SIGBUS, recovered) while touching `mem`: mark the region holding
/// it lost (logged the first time, see [`bus::mark_lost`]); returns the page's bus address
/// (None when the page is in no region of `mem`, which the handler does not recover).
pub(crate) fn lose(mem: &GuestMemoryMmap, page: LostPage) -> Option<u64> {
    let (region, bus) = locate(mem, page.host)?;
    if bus::mark_lost(region) {
        warn!(
            mapping = format_args!("{:#x}", region.start_addr().0),
            size = format_args!("{:#x}", region.len()),
            at = format_args!("{bus:#x}"),
            "client error: the memory behind a DMA mapping is gone (file truncated, no huge \
             page, or a full file system); the device no longer uses the mapping"
        );
    }
    Some(bus)
}

/// The SIGBUS handler (see the module's documentation).
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _context: *mut c_void) {
    // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO handler.
    let info = unsafe { &*info };
    // SAFETY: reads the union's address field, the faulting address for the fault codes
    // looked at below (and some number, unused, for others).
    let addr = unsafe { info.si_addr() } as usize;
    let code = info.si_code;
    let fault = code == libc::BUS_ADRERR || code == libc::BUS_MCEERR_AR;
    if fault && recover(addr) {
        return;
    }
    // Not ours: back to the action before ours (the default one if it is unknown), as
    // without this handler.
    let previous = PREVIOUS.get().copied().unwrap_or_else(|| {
        // SAFETY: an all-zero `sigaction` with `SIG_DFL` is the default action.
        let mut default: libc::sigaction = unsafe { std::mem::zeroed() };
        default.sa_sigaction = libc::SIG_DFL;
        default
    });
    // SAFETY: a valid action; `sigaction` is async-signal-safe.
    unsafe { libc::sigaction(sig, &previous, ptr::null_mut()) };
    if code <= 0 {
        // Sent by a process (kill, tgkill, sigqueue): returning would lose it; raised
        // again it is delivered to that action when this handler returns.
        // SAFETY: `raise` is async-signal-safe.
        unsafe { libc::raise(sig) };
    }
    // A fault: returning runs the faulting instruction again, which faults again into
    // that action.
}

/// Replace the page at `addr` if this thread is armed and `addr` is in its snapshot;
/// whether it was. Runs in the signal handler.
fn recover(addr: usize) -> bool {
    let Ok(mem) = ARMED.try_with(|a| a.load(Ordering::Relaxed)) else {
        return false;
    };
    if mem.is_null() {
        return false;
    }
    // SAFETY: an armed thread holds the snapshot (`Armed` borrows it) until it disarms,
    // and this handler runs on that thread, interrupting it: the snapshot is alive, and
    // immutable like every published `GuestMemoryMmap`.
    let mem = unsafe { &*mem };
    let Some((region, start, end)) = mem.iter().find_map(|r| {
        let start = r.as_ptr() as usize;
        let end = start.checked_add(r.size())?;
        (start..end).contains(&addr).then_some((r, start, end))
    }) else {
        return false;
    };
    // Before the page is replaced: another thread that then reads the replacement's zeros
    // finds the region lost when it checks after its access.
    bus::note_lost_in_handler(region);
    // SAFETY: `__errno_location` has no preconditions; it returns this thread's errno,
    // which is saved and restored around the system calls below so the interrupted code
    // sees its own.
    let errno_at = unsafe { libc::__errno_location() };
    // SAFETY: `errno_at` points at this thread's errno.
    let errno = unsafe { *errno_at };
    let mut replaced = None;
    for size in [1usize << 12, 1 << 21, 1 << 30] {
        let page = addr & !(size - 1);
        if page < start || end - page < size {
            continue;
        }
        // SAFETY: `page..page + size` lies inside the region's own mapping, which the
        // armed snapshot keeps mapped; the device reaches those bytes only through
        // vm-memory's volatile accesses, so replacing them with an anonymous mapping
        // (zeros) changes values under no Rust reference. Nothing else is unmapped.
        let p = unsafe {
            libc::mmap(
                page as *mut c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            replaced = Some((page, size));
            break;
        }
    }
    // SAFETY: as above.
    unsafe { *errno_at = errno };
    let Some((page, size)) = replaced else {
        return false;
    };
    let _ = FAULT.try_with(|f| {
        let lowest = f.load(Ordering::Relaxed);
        if lowest == 0 || page < lowest {
            f.store(page, Ordering::Relaxed);
            let _ = FAULT_LEN.try_with(|l| l.store(size, Ordering::Relaxed));
        }
    });
    RECOVERED.fetch_add(1, Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};

    use vm_memory::{Bytes, FileOffset, GuestAddress, MmapRegion};

    use super::*;

    /// A memfd of `len` bytes.
    fn memfd(len: u64) -> File {
        let name = CString::new("domdma-sigbus-test").unwrap();
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    /// Bus memory of one region at `bus`, `len` bytes of `file` mapped shared.
    fn file_memory(file: &File, bus: u64, len: usize) -> GuestMemoryMmap {
        let region = MmapRegion::build(
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(bus)).unwrap();
        GuestMemoryMmap::from_regions(vec![region]).unwrap()
    }

    /// An armed thread that touches a page whose file was truncated away survives: reads
    /// give zeros, writes land nowhere, and the fault names the first address.
    #[test]
    fn an_armed_access_to_a_truncated_page_is_recovered_and_reported() {
        install().unwrap();
        let file = memfd(0x4000);
        let mem = file_memory(&file, 0x10_0000, 0x4000);
        mem.write_obj(0x55u8, GuestAddress(0x10_2000)).unwrap();
        file.set_len(0x1000).unwrap();
        let host = |bus: u64| mem.get_host_address(GuestAddress(bus)).unwrap() as usize;
        let before = recovered();
        let lowest = LostPage {
            host: host(0x10_2000),
            len: 0x1000,
        };
        {
            let _armed = arm(&mem);
            assert_eq!(take_fault(), None);
            // Still backed: no fault.
            mem.write_obj(1u32, GuestAddress(0x10_0ff0)).unwrap();
            assert_eq!(take_fault(), None);
            mem.write_obj(7u64, GuestAddress(0x10_3008)).unwrap();
            let v: u8 = mem.read_obj(GuestAddress(0x10_2010)).unwrap();
            assert_eq!(v, 0, "the replacement page reads as zeros");
            let v: u64 = mem.read_obj(GuestAddress(0x10_3008)).unwrap();
            assert_eq!(v, 7, "the write landed on the replacement page");
            assert_eq!(take_fault(), Some(lowest), "the lowest page, not the first");
            assert_eq!(take_fault(), None, "taken");
        }
        assert_eq!(recovered() - before, 2, "two pages replaced");
        assert_eq!(file.metadata().unwrap().len(), 0x1000, "not in the file");
        assert_eq!(locate(&mem, host(0x10_3008)).map(|l| l.1), Some(0x10_3008));
        assert!(locate(&mem, 0x1000).is_none());
        let region = mem.iter().next().unwrap();
        assert!(bus::is_lost(region), "noted by the handler");
        assert_eq!(lose(&mem, lowest), Some(0x10_2000));
        assert!(bus::is_lost(region), "recorded");
        bus::forget_lost(region);
        assert!(!bus::is_lost(region));
    }

    /// Armings nest; a fault nobody took is dropped when the outermost guard goes.
    #[test]
    fn armings_nest_and_an_untaken_fault_does_not_outlive_them() {
        install().unwrap();
        let file = memfd(0x2000);
        let mem = file_memory(&file, 0, 0x2000);
        file.set_len(0).unwrap();
        {
            let _outer = arm(&mem);
            {
                let _inner = arm(&mem);
            }
            // Still armed by the outer guard.
            let _: u8 = mem.read_obj(GuestAddress(0x1000)).unwrap();
        }
        assert_eq!(take_fault(), None);
    }

    /// Wait for child `pid`; how it ended.
    fn wait(pid: libc::pid_t) -> libc::c_int {
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(r, pid, "waitpid");
        status
    }

    /// Fork a child that runs `child` (raw system calls only: the parent has threads) and
    /// then exits 0; its wait status.
    fn in_child(child: impl FnOnce()) -> libc::c_int {
        // SAFETY: the child only makes raw system calls (and touches memory), then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: no core file for the SIGBUS this child may die of.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
            child();
            // SAFETY: leave without running the parent's atexit handlers or destructors.
            unsafe { libc::_exit(0) };
        }
        wait(pid)
    }

    /// With the handler installed, a SIGBUS on a thread that is not armed, or for memory
    /// outside the armed snapshot, still ends the process with SIGBUS (through the action
    /// it replaced: here the Rust runtime's, which ends in the default one).
    #[test]
    fn a_sigbus_the_device_did_not_arm_for_still_kills() {
        install().unwrap();
        let file = memfd(0x2000);
        let mem = file_memory(&file, 0, 0x1000);
        let other = memfd(0x1000);
        // SAFETY: a fresh shared mapping of a file we own.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                0x1000,
                libc::PROT_READ,
                libc::MAP_SHARED,
                other.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let died_of_sigbus = |status: libc::c_int| {
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGBUS
        };
        // Unarmed.
        let status = in_child(|| {
            // SAFETY: raw calls on descriptors the child inherited.
            unsafe { libc::ftruncate(file.as_raw_fd(), 0) };
            let _ = mem.read_obj::<u8>(GuestAddress(0x10));
        });
        assert!(died_of_sigbus(status), "unarmed: status {status:#x}");
        // Armed, but the address is not in the armed snapshot.
        let status = in_child(|| {
            // SAFETY: raw calls on descriptors the child inherited.
            unsafe { libc::ftruncate(other.as_raw_fd(), 0) };
            let _armed = arm(&mem);
            // SAFETY: `p` is a live mapping of `other`; the read faults (SIGBUS).
            let _ = unsafe { ptr::read_volatile(p.cast::<u8>()) };
        });
        assert!(died_of_sigbus(status), "outside: status {status:#x}");
        // And a recovered one exits normally.
        let status = in_child(|| {
            // SAFETY: raw calls on descriptors the child inherited.
            unsafe { libc::ftruncate(file.as_raw_fd(), 0) };
            let _armed = arm(&mem);
            let _ = mem.read_obj::<u8>(GuestAddress(0x10));
            if take_fault().is_none() {
                // SAFETY: raw call.
                unsafe { libc::_exit(3) };
            }
        });
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "recovered: status {status:#x}"
        );
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p, 0x1000) };
    }
}
