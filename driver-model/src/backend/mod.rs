//! Back ends: the ways the driver model reaches a domdma device.
//!
//! A back end gives a driver four things, and nothing else:
//!
//! 1. 32-bit access to the register BAR ([`DmaBackend::read32`], [`DmaBackend::write32`]);
//! 2. PCI configuration space ([`DmaBackend::config_read`], [`DmaBackend::config_write`]),
//!    which is where bus mastering is switched on;
//! 3. DMA memory: a [`DmaBuffer`] the driver can read and write through a virtual mapping
//!    and the device reaches at a bus address ([`DmaBackend::alloc_dma`]);
//! 4. MSI-X interrupts, one per vector, that can be waited for with a timeout
//!    ([`DmaBackend::wait_interrupt`]).
//!
//! Implementations:
//! - [`vfio`]: Linux, inside the QEMU guest, through VFIO type1;
//! - [`noiommu`]: Linux, inside a guest without an IOMMU: BAR0 through sysfs, DMA memory at
//!   physical addresses from `/proc/self/pagemap`, completions by polling;
//! - [`inprocess`]: the device core linked into the process, over `vm-memory` guest RAM;
//! - [`vfio_user`]: this process as the VMM, talking to the real device server over its
//!   vfio-user socket (tests start one with the test kit's launcher).
//!
//! The last two own guest RAM themselves: [`phys`] lays it out as NUMA nodes and allocates
//! physically contiguous base- and huge-page ranges from it.

use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::time::Duration;

#[cfg(target_os = "linux")]
pub mod inprocess;
#[cfg(target_os = "linux")]
pub mod noiommu;
#[cfg(target_os = "linux")]
pub mod phys;
#[cfg(target_os = "linux")]
pub mod vfio;
#[cfg(target_os = "linux")]
pub mod vfio_user;

/// PCI configuration space offset of the command register (u16).
pub const PCI_COMMAND: u64 = 0x04;
/// PCI command register bit: the device may master the bus (issue DMA).
pub const PCI_COMMAND_BUS_MASTER: u16 = 1 << 2;
/// PCI command register bit: the device decodes memory BARs.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;

/// Size of a base page.
pub const PAGE_SIZE_4K: usize = 4096;
/// Size of a large (x86-64 level-2) page.
pub const PAGE_SIZE_2M: usize = 2 << 20;

/// Errors a back end reports, whatever the back end.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A register or configuration access fell outside the region.
    #[error("{region} access at offset {offset:#x}, {len} bytes, is outside the region ({size:#x} bytes)")]
    OutOfRange {
        /// Which region ("BAR0", "config space").
        region: &'static str,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: u64,
    },
    /// An MSI-X vector the device does not have (or the back end did not set up).
    #[error("MSI-X vector {vector} is not available (the back end set up {available})")]
    NoSuchVector {
        /// The vector asked for.
        vector: u16,
        /// How many vectors are set up.
        available: u16,
    },
    /// A DMA allocation request that cannot be satisfied as asked.
    #[error("invalid DMA allocation: {0}")]
    InvalidAllocation(String),
    /// Not enough memory of the kind asked for (for 2 MiB pages: no free huge page). Never
    /// answered by falling back to another kind.
    #[error("out of DMA memory: {0}")]
    OutOfMemory(String),
    /// The back end cannot do this at all.
    #[error("not supported by the {backend} back end: {what}")]
    Unsupported {
        /// The back end's name.
        backend: &'static str,
        /// What was asked.
        what: &'static str,
    },
    /// A back-end specific failure (for example a VFIO ioctl or a sysfs write).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Result type of the back-end interface.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Waits up to `timeout` for a non-blocking eventfd (an MSI-X vector) and returns its count
/// (0 on timeout), for the back ends whose interrupts are eventfds. On error, what failed
/// ("reading an eventfd", "poll on an eventfd") and why.
#[cfg(target_os = "linux")]
pub(crate) fn wait_eventfd(
    fd: &vmm_sys_util::eventfd::EventFd,
    timeout: Duration,
) -> std::result::Result<u64, (&'static str, std::io::Error)> {
    use std::os::fd::AsRawFd;
    // A timeout beyond what Instant can represent waits (in one-hour polls) for ever.
    let deadline = std::time::Instant::now().checked_add(timeout);
    loop {
        match fd.read() {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(("reading an eventfd", e)),
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(std::time::Instant::now()),
            None => Duration::from_secs(3600),
        };
        if left.is_zero() {
            return Ok(0);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(("poll on an eventfd", e));
            }
        }
    }
}

/// The eventfd of MSI-X `vector` among `fds` (one per vector the back end set up), or
/// [`BackendError::NoSuchVector`].
#[cfg(target_os = "linux")]
pub(crate) fn msix_eventfd(
    fds: &[vmm_sys_util::eventfd::EventFd],
    vector: u16,
) -> Result<&vmm_sys_util::eventfd::EventFd> {
    fds.get(usize::from(vector))
        .ok_or(BackendError::NoSuchVector {
            vector,
            available: fds.len() as u16,
        })
}

/// Maps `len` bytes of a device's register BAR for reads and writes, shared, from `offset`
/// of `file` (a VFIO device fd at the region's offset, a sysfs `resource0` file at 0). The
/// caller owns the mapping and unmaps it (`munmap` of the pointer and `len`).
#[cfg(target_os = "linux")]
pub(crate) fn mmap_bar(
    file: &impl std::os::fd::AsRawFd,
    len: usize,
    offset: libc::off_t,
) -> std::io::Result<NonNull<u8>> {
    // SAFETY: a new shared mapping at an address the kernel picks, so nothing is replaced;
    // the kernel checks the range against the file.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(NonNull::new(p.cast()).expect("mmap returned non-null"))
}

/// Checks a 32-bit register access at `offset` of a BAR0 of `size` bytes (4-byte aligned,
/// inside the BAR): what every back end does before touching the device.
pub fn check_reg_access(offset: u64, size: u64) -> Result<()> {
    if offset % 4 != 0 || offset.checked_add(4).is_none_or(|e| e > size) {
        return Err(BackendError::OutOfRange {
            region: "BAR0",
            offset,
            len: 4,
            size,
        });
    }
    Ok(())
}

/// Checks a `len`-byte access at `offset` of a configuration space of `size` bytes.
pub fn check_config_access(offset: u64, len: usize, size: u64) -> Result<()> {
    if offset.checked_add(len as u64).is_none_or(|e| e > size) {
        return Err(BackendError::OutOfRange {
            region: "config space",
            offset,
            len,
            size,
        });
    }
    Ok(())
}

/// How the back end reaches the register BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterAccess {
    /// The BAR is mapped into the process; accesses are volatile loads and stores.
    Mmap,
    /// Each access is a read or write system call on the region (VFIO `pread`/`pwrite`).
    RegionReadWrite,
    /// The device model is called directly (in-process back end).
    Direct,
    /// Each access is a protocol message (vfio-user client back end).
    Message,
}

impl fmt::Display for RegisterAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegisterAccess::Mmap => "mmap",
            RegisterAccess::RegionReadWrite => "region pread/pwrite",
            RegisterAccess::Direct => "direct call",
            RegisterAccess::Message => "protocol message",
        })
    }
}

/// Facts about the device and how the back end reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// The back end's name ("vfio", "in-process", "vfio-user").
    pub backend: &'static str,
    /// Where the device is (a PCI address, a socket path).
    pub location: String,
    /// How registers are accessed.
    pub register_access: RegisterAccess,
    /// Number of MSI-X vectors the back end set up.
    pub msix_vectors: u16,
    /// NUMA node of the device, if known.
    pub numa_node: Option<u32>,
}

/// Backing of a DMA allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PageKind {
    /// Ordinary 4 KiB pages (anonymous memory, pinned).
    #[default]
    Base,
    /// 2 MiB huge pages; the length is rounded up to 2 MiB and the bus address is 2 MiB
    /// aligned. Fails when no huge pages are available; never falls back to base pages.
    Huge2M,
}

impl PageKind {
    /// The page size in bytes.
    pub fn size(self) -> usize {
        match self {
            PageKind::Base => PAGE_SIZE_4K,
            PageKind::Huge2M => PAGE_SIZE_2M,
        }
    }
}

/// A request for DMA memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaRequest {
    /// Length in bytes (rounded up to the page size).
    pub len: usize,
    /// Page backing.
    pub pages: PageKind,
    /// Preferred NUMA node (`None`: any). A back end places the memory there when it can
    /// and reports where it went in [`DmaBuffer::node`]; a preference it cannot honour is
    /// not an error (as `MmAllocateContiguousMemorySpecifyCacheNode` treats it).
    pub node: Option<u32>,
}

impl DmaRequest {
    /// `len` bytes of base pages.
    pub fn new(len: usize) -> Self {
        DmaRequest {
            len,
            pages: PageKind::Base,
            node: None,
        }
    }

    /// `len` bytes of 2 MiB pages.
    pub fn huge(len: usize) -> Self {
        DmaRequest {
            len,
            pages: PageKind::Huge2M,
            node: None,
        }
    }

    /// The same request, preferring NUMA node `node`.
    pub fn on_node(self, node: u32) -> Self {
        DmaRequest {
            node: Some(node),
            ..self
        }
    }
}

/// A back end as a page table or domain holds it: borrowed for a scope, or shared (for
/// long-lived objects such as the WDF facade's DMA domains).
#[derive(Clone)]
pub enum BackendRef<'b> {
    /// Borrowed.
    Borrowed(&'b dyn DmaBackend),
    /// Shared ownership.
    Shared(std::sync::Arc<dyn DmaBackend + Send + Sync>),
}

impl<'b> std::ops::Deref for BackendRef<'b> {
    type Target = dyn DmaBackend + 'b;

    fn deref(&self) -> &Self::Target {
        match self {
            BackendRef::Borrowed(b) => *b,
            BackendRef::Shared(b) => &**b,
        }
    }
}

impl fmt::Debug for BackendRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendRef({})", self.info().backend)
    }
}

impl<'b> From<&'b dyn DmaBackend> for BackendRef<'b> {
    fn from(b: &'b dyn DmaBackend) -> Self {
        BackendRef::Borrowed(b)
    }
}

impl<'b, T: DmaBackend> From<&'b T> for BackendRef<'b> {
    fn from(b: &'b T) -> Self {
        BackendRef::Borrowed(b)
    }
}

impl From<std::sync::Arc<dyn DmaBackend + Send + Sync>> for BackendRef<'static> {
    fn from(b: std::sync::Arc<dyn DmaBackend + Send + Sync>) -> Self {
        BackendRef::Shared(b)
    }
}

/// The interface every back end implements. Object safe: drivers hold a `&dyn DmaBackend`
/// (or share an `Arc`); back ends are `Send + Sync`, so a driver may use one from several
/// threads.
///
/// Register offsets are byte offsets into the register BAR (BAR0); accesses are 32 bits,
/// little endian, 4-byte aligned.
pub trait DmaBackend: Send + Sync {
    /// What the back end is and how it reaches the device.
    fn info(&self) -> BackendInfo;

    /// Reads the 32-bit register at `offset` in the register BAR.
    fn read32(&self, offset: u64) -> Result<u32>;

    /// Writes the 32-bit register at `offset` in the register BAR.
    fn write32(&self, offset: u64, value: u32) -> Result<()>;

    /// Reads `buf.len()` bytes of PCI configuration space at `offset`.
    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` to PCI configuration space at `offset`.
    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()>;

    /// Allocates zeroed DMA memory and makes it reachable by the device at a bus address the
    /// back end chooses. The mapping is removed when the buffer is dropped.
    fn alloc_dma(&self, req: DmaRequest) -> Result<DmaBuffer>;

    /// Reserves `len` bytes of bus address space that is never mapped for the device
    /// (for fault tests: a DMA there must fail). Returns its first bus address.
    fn reserve_unmapped(&self, len: u64) -> Result<u64>;

    /// Number of MSI-X vectors set up.
    fn msix_vectors(&self) -> u16;

    /// Number of NUMA nodes memory can be requested from (nodes are `0..n`).
    fn numa_nodes(&self) -> u32 {
        1
    }

    /// (Re-)programs the MSI-X vectors (for example after a device reset) and discards
    /// interrupts that were pending.
    fn rearm_interrupts(&self) -> Result<()>;

    /// Waits up to `timeout` for MSI-X `vector`. Returns the number of interrupts that
    /// arrived since the last wait (0 on timeout). Never blocks longer than `timeout`.
    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<u64>;

    /// Reads a 16-bit configuration register.
    fn config_read16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a 16-bit configuration register.
    fn config_write16(&self, offset: u64, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// Reads a 32-bit configuration register.
    fn config_read32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Sets or clears Bus Master Enable in the PCI command register (read-modify-write).
    /// The device does no DMA while it is clear.
    fn set_bus_master(&self, enable: bool) -> Result<()> {
        let cmd = self.config_read16(PCI_COMMAND)?;
        let new = if enable {
            cmd | PCI_COMMAND_BUS_MASTER | PCI_COMMAND_MEMORY
        } else {
            cmd & !PCI_COMMAND_BUS_MASTER
        };
        if new != cmd {
            self.config_write16(PCI_COMMAND, new)?;
        }
        Ok(())
    }
}

/// DMA memory: a virtual mapping the driver accesses and a bus address the device uses.
///
/// The device may read and write the memory at any time, so the driver only accesses it
/// through volatile operations (the methods here); no Rust reference to the contents is
/// ever handed out. Accessors panic when the range is outside the buffer, like slice
/// indexing.
pub struct DmaBuffer {
    ptr: NonNull<u8>,
    len: usize,
    bus_addr: u64,
    page_size: usize,
    node: Option<u32>,
    // Releases the memory and the device mapping when dropped.
    _backing: Box<dyn Any + Send>,
}

// SAFETY: the buffer exclusively owns its mapping (the backing object is `Send`), and every
// access goes through volatile operations on the raw pointer, which are valid from any
// thread.
unsafe impl Send for DmaBuffer {}

impl fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("bus_addr", &format_args!("{:#x}", self.bus_addr))
            .field("page_size", &self.page_size)
            .field("node", &self.node)
            .finish()
    }
}

impl DmaBuffer {
    /// Wraps memory a back end allocated and mapped for the device.
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of `len` bytes, 8-byte aligned, until
    /// `backing` is dropped; nothing else may create Rust references to that memory; and the
    /// device must reach it at `bus_addr..bus_addr + len`. Dropping `backing` releases the
    /// device mapping and the memory.
    pub unsafe fn from_raw_parts(
        ptr: NonNull<u8>,
        len: usize,
        bus_addr: u64,
        page_size: usize,
        backing: Box<dyn Any + Send>,
    ) -> Self {
        DmaBuffer {
            ptr,
            len,
            bus_addr,
            page_size,
            node: None,
            _backing: backing,
        }
    }

    /// A second handle to the same memory that does not own it (dropping it releases
    /// nothing): for structures that take a `DmaBuffer` (a queue ring, completion records)
    /// built in memory something else owns, such as a domain common buffer.
    ///
    /// # Safety
    ///
    /// The alias must be dropped before `self` (and before the memory is otherwise
    /// released); accesses through both follow the same volatile rules.
    pub unsafe fn alias(&self) -> DmaBuffer {
        DmaBuffer {
            ptr: self.ptr,
            len: self.len,
            bus_addr: self.bus_addr,
            page_size: self.page_size,
            node: self.node,
            _backing: Box::new(()),
        }
    }

    /// Records the NUMA node the memory is on (back ends call this when they know it).
    pub fn with_node(mut self, node: Option<u32>) -> Self {
        self.node = node;
        self
    }

    /// The NUMA node the memory is on, when the back end knows it.
    pub fn node(&self) -> Option<u32> {
        self.node
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty (never, for a back end's allocation).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device's (bus) address of the first byte.
    pub fn bus_addr(&self) -> u64 {
        self.bus_addr
    }

    /// The page size backing the buffer.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The virtual address of the first byte (for diagnostics and system calls only).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "DMA buffer access {offset:#x}+{len:#x} outside the buffer ({:#x} bytes)",
            self.len
        );
    }

    /// Volatile read of a little-endian u32 at `offset` (4-byte aligned).
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        assert_eq!(offset % 4, 0, "unaligned u32 access");
        // SAFETY: in bounds (checked) and aligned (the base is 8-byte aligned, the offset a
        // multiple of 4); the memory is valid for the buffer's lifetime.
        u32::from_le(unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u32>()
                .read_volatile()
        })
    }

    /// Volatile write of a little-endian u32 at `offset` (4-byte aligned).
    pub fn write_u32(&self, offset: usize, value: u32) {
        self.check(offset, 4);
        assert_eq!(offset % 4, 0, "unaligned u32 access");
        // SAFETY: as in `read_u32`.
        unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u32>()
                .write_volatile(value.to_le())
        }
    }

    /// Volatile read of a little-endian u64 at `offset` (8-byte aligned).
    pub fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        assert_eq!(offset % 8, 0, "unaligned u64 access");
        // SAFETY: in bounds and 8-byte aligned; the memory is valid for the buffer's lifetime.
        u64::from_le(unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u64>()
                .read_volatile()
        })
    }

    /// Volatile write of a little-endian u64 at `offset` (8-byte aligned).
    pub fn write_u64(&self, offset: usize, value: u64) {
        self.check(offset, 8);
        assert_eq!(offset % 8, 0, "unaligned u64 access");
        // SAFETY: as in `read_u64`.
        unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(offset)
                .cast::<u64>()
                .write_volatile(value.to_le())
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the buffer (volatile reads).
    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < buf.len() {
            let at = offset + i;
            if at % 8 == 0 && buf.len() - i >= 8 {
                // SAFETY: in bounds (checked above) and 8-byte aligned.
                let v = unsafe { base.wrapping_add(at).cast::<u64>().read_volatile() };
                buf[i..i + 8].copy_from_slice(&v.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: in bounds (checked above).
                buf[i] = unsafe { base.wrapping_add(at).read_volatile() };
                i += 1;
            }
        }
    }

    /// Copies `data` into the buffer at `offset` (volatile writes).
    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < data.len() {
            let at = offset + i;
            if at % 8 == 0 && data.len() - i >= 8 {
                let v = u64::from_ne_bytes(data[i..i + 8].try_into().expect("8 bytes"));
                // SAFETY: in bounds (checked above) and 8-byte aligned.
                unsafe { base.wrapping_add(at).cast::<u64>().write_volatile(v) };
                i += 8;
            } else {
                // SAFETY: in bounds (checked above).
                unsafe { base.wrapping_add(at).write_volatile(data[i]) };
                i += 1;
            }
        }
    }

    /// Sets `len` bytes at `offset` to `byte` (volatile writes).
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        self.check(offset, len);
        let base = self.ptr.as_ptr();
        let word = u64::from_ne_bytes([byte; 8]);
        let mut i = 0;
        while i < len {
            let at = offset + i;
            if at % 8 == 0 && len - i >= 8 {
                // SAFETY: in bounds (checked above) and 8-byte aligned.
                unsafe { base.wrapping_add(at).cast::<u64>().write_volatile(word) };
                i += 8;
            } else {
                // SAFETY: in bounds (checked above).
                unsafe { base.wrapping_add(at).write_volatile(byte) };
                i += 1;
            }
        }
    }

    /// Copies `len` bytes at `offset` into a new vector.
    pub fn to_vec(&self, offset: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v);
        v
    }
}

/// A simple bump allocator of bus addresses: each allocation is aligned, and consecutive
/// allocations are separated by an unmapped guard gap so that an overrun faults instead of
/// landing in the neighbour. Addresses are never reused.
#[derive(Debug, Clone)]
pub struct BumpIova {
    next: u64,
    end: u64,
    guard: u64,
}

impl BumpIova {
    /// First bus address handed out by default (above 4 GiB, clear of the x86 MSI window and
    /// of low memory, so it exercises 64-bit addressing).
    pub const DEFAULT_BASE: u64 = 0x1_0000_0000;
    /// Default end (exclusive) of the range: 2^39, the smallest common VT-d address width.
    pub const DEFAULT_END: u64 = 1 << 39;
    /// Default guard gap between allocations.
    pub const DEFAULT_GUARD: u64 = 0x1_0000;

    /// An allocator over `[base, end)` with `guard` bytes left unmapped after each range.
    pub fn new(base: u64, end: u64, guard: u64) -> Self {
        BumpIova {
            next: base,
            end,
            guard,
        }
    }

    /// Allocates `len` bytes aligned to `align` (a power of two). `None` when exhausted.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two());
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end.checked_add(self.guard)?;
        Some(start)
    }
}

impl Default for BumpIova {
    fn default() -> Self {
        BumpIova::new(Self::DEFAULT_BASE, Self::DEFAULT_END, Self::DEFAULT_GUARD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_iova_aligns_and_leaves_gaps() {
        let mut a = BumpIova::new(0x1000, 0x100_0000, 0x1000);
        let x = a.alloc(0x3000, 0x1000).unwrap();
        assert_eq!(x, 0x1000);
        let y = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(y, 0x5000, "guard gap after the first range");
        let z = a.alloc(0x1000, 0x20_0000).unwrap();
        assert_eq!(z, 0x20_0000);
        assert!(
            a.alloc(0x100_0000, 0x1000).is_none(),
            "exhaustion is reported"
        );
    }

    fn heap_buffer(len: usize) -> DmaBuffer {
        let v: Box<[u64]> = vec![0u64; len / 8].into_boxed_slice();
        let ptr = NonNull::new(v.as_ptr() as *mut u8).unwrap();
        // SAFETY: the boxed slice stays alive inside the buffer (moving a Box does not move
        // its heap allocation), is 8-byte aligned, `len` bytes long and not otherwise
        // referenced.
        unsafe { DmaBuffer::from_raw_parts(ptr, len, 0x1000, 4096, Box::new(v)) }
    }

    #[test]
    fn dma_buffer_accessors_round_trip() {
        let b = heap_buffer(64);
        b.write_u32(4, 0xdead_beef);
        assert_eq!(b.read_u32(4), 0xdead_beef);
        b.write_u64(8, 0x0102_0304_0506_0708);
        assert_eq!(b.to_vec(8, 8), [8, 7, 6, 5, 4, 3, 2, 1]);
        let data: Vec<u8> = (0..29u8).collect();
        b.write(3, &data);
        assert_eq!(b.to_vec(3, 29), data);
        b.fill(1, 40, 0xa5);
        assert!(b.to_vec(1, 40).iter().all(|&x| x == 0xa5));
        assert_eq!(b.to_vec(0, 1), [0], "byte before the fill untouched");
        assert_eq!(b.to_vec(41, 1), [0], "byte after the fill untouched");
    }

    #[test]
    #[should_panic(expected = "outside the buffer")]
    fn dma_buffer_bounds_are_checked() {
        let b = heap_buffer(16);
        b.read_u64(16);
    }
}
