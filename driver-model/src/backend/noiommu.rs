//! The Linux guest back end without an IOMMU: the device reached through sysfs, DMA memory
//! at guest-physical addresses.
//!
//! Many guests have no IOMMU, and Debian's kernels have no VFIO no-IOMMU mode, so this back
//! end does without VFIO:
//!
//! - **registers**: BAR0 mapped from `/sys/bus/pci/devices/BDF/resource0` (after writing
//!   `1` to the function's `enable`); configuration space through its `config` file;
//! - **DMA memory**: two pools of 2 MiB pages from hugetlbfs files, each page's physical
//!   address read from `/proc/self/pagemap` (needs root): one for 2 MiB-page requests, one
//!   that base-page requests are carved from (so that running out of huge pages leaves
//!   base pages, as on a real system). The pages are mapped in the order of their physical
//!   addresses, so physically contiguous pages are also virtually contiguous, and buffers
//!   are carved from those runs (4 KiB or 2 MiB aligned; a buffer larger than the longest
//!   run fails with [`BackendError::OutOfMemory`]). Bus address = physical address: without
//!   an IOMMU the device sees guest-physical memory;
//! - **interrupts**: none. MSI-X needs a kernel driver (VFIO, or a real one); `uio_pci_generic`
//!   only forwards INTx. [`DmaBackend::msix_vectors`] is 0 and drivers poll completion
//!   records; scenarios that need interrupts skip, naming this.
//!
//! Limits: hugetlb pages are not swapped and not migrated by compaction in practice, but the
//! kernel gives no pinning guarantee without a driver (memory hot-unplug could move them);
//! the pools are fixed at open ([`NoIommuOptions`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::info;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::vfio::{
    find_domdma, hugepages_2m, open_hugetlbfs_file, reserve_hugepages_2m, write_sysfs, PciFunction,
    VfioBackendError,
};
use super::{
    check_config_access, check_reg_access, BackendError, BackendInfo, BumpIova, DmaBackend,
    DmaBuffer, DmaRequest, PageKind, RegisterAccess, Result, PAGE_SIZE_2M, PAGE_SIZE_4K,
};
use domdma_device::spec;

/// Default size of the pool 2 MiB-page requests come from, in 2 MiB pages.
pub const DEFAULT_HUGE_POOL_PAGES: u32 = 32;
/// Default size of the pool base-page requests are carved from, in 2 MiB pages.
pub const DEFAULT_BASE_POOL_PAGES: u32 = 24;
/// First bus address [`DmaBackend::reserve_unmapped`] hands out: 1 TiB, far above the
/// guest's RAM, which is all the device can reach without an IOMMU.
const UNMAPPED_BASE: u64 = 1 << 40;

/// Errors of the no-IOMMU back end.
#[derive(Debug, thiserror::Error)]
pub enum NoIommuError {
    /// Finding the device or a sysfs file operation failed.
    #[error(transparent)]
    Sysfs(#[from] VfioBackendError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `/proc/self/pagemap` gave no physical address (not root?).
    #[error(
        "no physical address for {va:#x} in /proc/self/pagemap (entry {entry:#x}); the \
         no-IOMMU back end must run as root"
    )]
    NoPhysicalAddress {
        /// The virtual address.
        va: usize,
        /// The pagemap entry.
        entry: u64,
    },
    /// BAR0 is smaller than the register block.
    #[error("resource0 of {bdf} is {len:#x} bytes, the registers need {need:#x}", need = spec::REGS_BAR_SIZE)]
    SmallBar {
        /// PCI address.
        bdf: String,
        /// Its size.
        len: u64,
    },
}

impl From<NoIommuError> for BackendError {
    fn from(e: NoIommuError) -> Self {
        BackendError::Backend(Box::new(e))
    }
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> NoIommuError {
    let what = what.into();
    move |source| NoIommuError::Sys { what, source }
}

/// How to open a [`NoIommuBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoIommuOptions {
    /// PCI address of the device; `None` = the first domdma device.
    pub bdf: Option<String>,
    /// 2 MiB pages for 2 MiB-page requests (reserved from the kernel's pool at open).
    pub huge_pages: u32,
    /// 2 MiB pages base-page requests are carved from (reserved likewise).
    pub base_pages: u32,
}

impl Default for NoIommuOptions {
    fn default() -> Self {
        NoIommuOptions {
            bdf: None,
            huge_pages: DEFAULT_HUGE_POOL_PAGES,
            base_pages: DEFAULT_BASE_POOL_PAGES,
        }
    }
}

/// A shared mapping this back end owns.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only accessed through volatile operations or handed out as
// `DmaBuffer`s of disjoint ranges; unmapping (in Drop) is valid from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared accesses are volatile loads and stores of device registers or
// of DMA memory whose ranges are owned by one buffer each.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping this object created and nothing references
        // it any more (its owner is being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A run of physically (and virtually) contiguous 2 MiB pages of the pool, and its
/// allocator of physical ranges.
#[derive(Debug)]
struct Run {
    /// Physical address of its first byte.
    phys: u64,
    /// Its virtual address.
    va: usize,
    /// Its length.
    len: u64,
    alloc: AddressAllocator,
}

/// The DMA pool: a hugetlbfs file's pages in physical order.
#[derive(Debug)]
struct Pool {
    _file: File,
    map: Mapping,
    runs: Mutex<Vec<Run>>,
}

impl Pool {
    fn new(pages: u32) -> std::result::Result<Self, NoIommuError> {
        let page = PAGE_SIZE_2M;
        let len = pages as usize * page;
        let file = open_hugetlbfs_file(len)?;
        // 1. Fault every page in once to learn its physical address.
        let probe = map_file(&file, None, len, 0)?;
        let mut phys = Vec::with_capacity(pages as usize);
        let pagemap =
            File::open("/proc/self/pagemap").map_err(sys("opening /proc/self/pagemap"))?;
        for i in 0..pages as usize {
            let va = probe.ptr.as_ptr() as usize + i * page;
            phys.push((physical_address(&pagemap, va)?, i));
        }
        drop(probe);
        // 2. Map them again, in physical order, into one reserved range.
        phys.sort_unstable();
        let reserve = reserve_va(len + page)?;
        let base = (reserve.ptr.as_ptr() as usize).next_multiple_of(page);
        for (slot, &(_, file_page)) in phys.iter().enumerate() {
            let at = base + slot * page;
            let m = map_file(&file, Some(at), page, (file_page * page) as u64)?;
            // Now part of `reserve`, which unmaps the whole range.
            std::mem::forget(m);
        }
        // 3. Runs of physically contiguous pages, each with an allocator of its range.
        let mut spans: Vec<(u64, usize, u64)> = Vec::new();
        for (slot, &(pa, _)) in phys.iter().enumerate() {
            match spans.last_mut() {
                Some((start, _, len)) if *start + *len == pa => *len += page as u64,
                _ => spans.push((pa, base + slot * page, page as u64)),
            }
        }
        let runs = spans
            .into_iter()
            .map(|(phys, va, len)| {
                let alloc = AddressAllocator::new(phys, len)
                    .map_err(|e| sys("pool allocator")(io::Error::other(e.to_string())))?;
                Ok(Run {
                    phys,
                    va,
                    len,
                    alloc,
                })
            })
            .collect::<std::result::Result<Vec<Run>, NoIommuError>>()?;
        info!(
            pages,
            runs = runs.len(),
            longest = runs.iter().map(|r| r.len).max().unwrap_or(0),
            "no-IOMMU DMA pool ready"
        );
        Ok(Pool {
            _file: file,
            map: reserve,
            runs: Mutex::new(runs),
        })
    }

    /// Free 2 MiB-aligned pages.
    fn free_huge_pages(&self) -> u32 {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        // Count by probing: allocate 2 MiB pages until none is left, then give them back.
        let mut taken = Vec::new();
        for r in runs.iter_mut() {
            while let Ok(range) = r.alloc.allocate(
                PAGE_SIZE_2M as u64,
                PAGE_SIZE_2M as u64,
                AllocPolicy::FirstMatch,
            ) {
                taken.push((r.phys, range));
            }
        }
        let n = taken.len() as u32;
        for (phys, range) in taken {
            if let Some(r) = runs.iter_mut().find(|r| r.phys == phys) {
                let _ = r.alloc.free(&range);
            }
        }
        n
    }
}

/// What a pool allocation returns to the pool when its buffer is dropped.
struct PoolRange {
    pool: Arc<Pool>,
    run_phys: u64,
    range: RangeInclusive,
}

impl Drop for PoolRange {
    fn drop(&mut self) {
        let mut runs = self
            .pool
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = runs.iter_mut().find(|r| r.phys == self.run_phys) {
            let _ = r.alloc.free(&self.range);
        }
    }
}

/// Maps `len` bytes of `file` at `offset`, shared, read-write, populated; at `at` (fixed)
/// when given.
fn map_file(
    file: &File,
    at: Option<usize>,
    len: usize,
    offset: u64,
) -> std::result::Result<Mapping, NoIommuError> {
    let flags =
        libc::MAP_SHARED | libc::MAP_POPULATE | if at.is_some() { libc::MAP_FIXED } else { 0 };
    let off = libc::off_t::try_from(offset)
        .map_err(|_| sys("mapping the pool")(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: a new shared mapping of our own hugetlbfs file; with MAP_FIXED the target is
    // inside a PROT_NONE reservation this back end owns (`reserve_va`), so nothing else is
    // replaced.
    let p = unsafe {
        libc::mmap(
            at.map_or(std::ptr::null_mut(), |a| a as *mut libc::c_void),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            file.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys("mapping the hugetlbfs pool")(io::Error::last_os_error()));
    }
    Ok(Mapping {
        ptr: NonNull::new(p.cast()).expect("mmap returned non-null"),
        len,
    })
}

/// Reserves `len` bytes of address space (no access, no memory).
fn reserve_va(len: usize) -> std::result::Result<Mapping, NoIommuError> {
    // SAFETY: a new private anonymous mapping with no access; nothing is replaced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys("reserving address space for the pool")(
            io::Error::last_os_error(),
        ));
    }
    Ok(Mapping {
        ptr: NonNull::new(p.cast()).expect("mmap returned non-null"),
        len,
    })
}

/// The physical address of the (faulted-in) page at `va`, from `/proc/self/pagemap`.
fn physical_address(pagemap: &File, va: usize) -> std::result::Result<u64, NoIommuError> {
    let mut entry = [0u8; 8];
    let index = (va / PAGE_SIZE_4K) as u64;
    pagemap
        .read_exact_at(&mut entry, index * 8)
        .map_err(sys("reading /proc/self/pagemap"))?;
    let entry = u64::from_ne_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry & (1 << 63) == 0 || pfn == 0 {
        return Err(NoIommuError::NoPhysicalAddress { va, entry });
    }
    Ok(pfn * PAGE_SIZE_4K as u64 + (va % PAGE_SIZE_4K) as u64)
}

/// The device without an IOMMU: BAR0 and configuration space through sysfs, DMA memory at
/// guest-physical addresses, no interrupts.
pub struct NoIommuBackend {
    pci: PciFunction,
    bar0: Mapping,
    config: File,
    config_size: u64,
    huge: Arc<Pool>,
    base: Arc<Pool>,
    unmapped: Mutex<BumpIova>,
}

impl std::fmt::Debug for NoIommuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoIommuBackend")
            .field("bdf", &self.pci.bdf)
            .finish_non_exhaustive()
    }
}

impl NoIommuBackend {
    /// Finds the device, enables it, maps BAR0 from `resource0`, opens its configuration
    /// space and builds the DMA pool. Bus mastering is switched on.
    pub fn open(opts: &NoIommuOptions) -> std::result::Result<Self, NoIommuError> {
        let pci = find_domdma(opts.bdf.as_deref())?;
        // Power and memory decoding on (what a kernel driver's pci_enable_device does).
        write_sysfs(&pci.path.join("enable"), "1")?;
        let res0 = pci.path.join("resource0");
        let bar_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&res0)
            .map_err(sys(format!("opening {}", res0.display())))?;
        let bar_len = bar_file
            .metadata()
            .map_err(sys(format!("sizing {}", res0.display())))?
            .len();
        if bar_len < spec::REGS_BAR_SIZE {
            return Err(NoIommuError::SmallBar {
                bdf: pci.bdf.clone(),
                len: bar_len,
            });
        }
        let len = spec::REGS_BAR_SIZE as usize;
        // The device's BAR0 through its sysfs resource file; owned by the back end,
        // unmapped in Drop.
        let ptr = super::mmap_bar(&bar_file, len, 0)
            .map_err(sys(format!("mapping {}", res0.display())))?;
        let bar0 = Mapping { ptr, len };
        let cfg_path = pci.path.join("config");
        let config = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg_path)
            .map_err(sys(format!("opening {}", cfg_path.display())))?;
        let config_size = config
            .metadata()
            .map_err(sys(format!("sizing {}", cfg_path.display())))?
            .len();
        reserve_hugepages_2m(u64::from(opts.huge_pages + opts.base_pages))?;
        let huge = Arc::new(Pool::new(opts.huge_pages)?);
        let base = Arc::new(Pool::new(opts.base_pages)?);
        let dev = NoIommuBackend {
            pci,
            bar0,
            config,
            config_size,
            huge,
            base,
            unmapped: Mutex::new(BumpIova::new(UNMAPPED_BASE, UNMAPPED_BASE << 1, 0)),
        };
        dev.set_bus_master(true)
            .map_err(|e| sys("enabling bus mastering")(io::Error::other(e.to_string())))?;
        info!(bdf = %dev.pci.bdf, "device open without an IOMMU (sysfs resource0, pagemap)");
        Ok(dev)
    }

    /// The PCI function.
    pub fn pci(&self) -> &PciFunction {
        &self.pci
    }

    /// Free 2 MiB pages for 2 MiB-page requests.
    pub fn free_huge_pages(&self) -> u32 {
        self.huge.free_huge_pages()
    }

    fn reg(&self, offset: u64) -> *mut u32 {
        self.bar0.ptr.as_ptr().wrapping_add(offset as usize).cast()
    }
}

impl DmaBackend for NoIommuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "noiommu",
            location: self.pci.bdf.clone(),
            register_access: RegisterAccess::Mmap,
            msix_vectors: 0,
            numa_node: self.pci.numa_node,
        }
    }

    fn read32(&self, offset: u64) -> Result<u32> {
        check_reg_access(offset, self.bar0.len as u64)?;
        // SAFETY: inside the mapped BAR (checked) and 4-byte aligned; a device register is
        // read with one volatile load.
        Ok(u32::from_le(unsafe { self.reg(offset).read_volatile() }))
    }

    fn write32(&self, offset: u64, value: u32) -> Result<()> {
        check_reg_access(offset, self.bar0.len as u64)?;
        // SAFETY: as in `read32`, one volatile store.
        unsafe { self.reg(offset).write_volatile(value.to_le()) };
        Ok(())
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_config_access(offset, buf.len(), self.config_size)?;
        self.config
            .read_exact_at(buf, offset)
            .map_err(|e| BackendError::from(sys("reading config space")(e)))
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        check_config_access(offset, buf.len(), self.config_size)?;
        self.config
            .write_all_at(buf, offset)
            .map_err(|e| BackendError::from(sys("writing config space")(e)))
    }

    fn alloc_dma(&self, req: DmaRequest) -> Result<DmaBuffer> {
        let page = req.pages.size();
        if req.len == 0 {
            return Err(BackendError::InvalidAllocation("length 0".into()));
        }
        let len = req.len.next_multiple_of(page);
        let pool = match req.pages {
            PageKind::Base => &self.base,
            PageKind::Huge2M => &self.huge,
        };
        let mut runs = pool.runs.lock().unwrap_or_else(PoisonError::into_inner);
        let found = runs.iter_mut().find_map(|r| {
            r.alloc
                .allocate(len as u64, page as u64, AllocPolicy::FirstMatch)
                .ok()
                .map(|range| (r.phys, r.va, range))
        });
        drop(runs);
        let Some((run_phys, run_va, range)) = found else {
            let kind = match req.pages {
                PageKind::Base => "physically contiguous memory",
                PageKind::Huge2M => "huge pages",
            };
            return Err(BackendError::OutOfMemory(format!(
                "no-IOMMU pool: no {len:#x} bytes of {kind} free (pool of {} 2 MiB pages; \
                 see NoIommuOptions::huge_pages)",
                pool.map.len / PAGE_SIZE_2M
            )));
        };
        let bus = range.start();
        let va = run_va + (bus - run_phys) as usize;
        let ptr = NonNull::new(va as *mut u8).expect("inside the pool mapping");
        let backing = PoolRange {
            pool: Arc::clone(pool),
            run_phys,
            range,
        };
        // SAFETY: `va..va+len` is inside the pool mapping (the allocator's range of a run
        // mapped contiguously), 2 MiB or 4 KiB aligned, owned by this allocation only until
        // `backing` returns it; the device reaches it at physical address `bus`.
        let buf = unsafe { DmaBuffer::from_raw_parts(ptr, len, bus, page, Box::new(backing)) };
        buf.fill(0, len, 0);
        Ok(buf.with_node(self.pci.numa_node))
    }

    fn reserve_unmapped(&self, len: u64) -> Result<u64> {
        self.unmapped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .alloc(len, PAGE_SIZE_4K as u64)
            .ok_or_else(|| BackendError::OutOfMemory("unmapped window exhausted".into()))
    }

    fn msix_vectors(&self) -> u16 {
        0
    }

    fn rearm_interrupts(&self) -> Result<()> {
        Ok(())
    }

    fn wait_interrupt(&self, vector: u16, _timeout: Duration) -> Result<u64> {
        Err(BackendError::NoSuchVector {
            vector,
            available: 0,
        })
    }
}

impl Drop for NoIommuBackend {
    fn drop(&mut self) {
        // Quiesce: no DMA into memory that is about to go back to the kernel.
        let _ = self.set_bus_master(false);
    }
}

/// Free 2 MiB pages in the kernel's pool (for callers that size the DMA pool).
pub fn kernel_free_huge_pages() -> std::result::Result<u64, VfioBackendError> {
    Ok(hugepages_2m()?.0)
}
