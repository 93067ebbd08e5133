//! DMA adapters, DMA domains and domain common buffers: the core under the DMA v3 calls
//! (`GetDmaAdapterInfo`, `GetDmaDomain`, `JoinDmaDomain`, `LeaveDmaDomain`,
//! `AllocateDomainCommonBuffer`, `FreeCommonBuffer`).
//!
//! - [`DmaDevice`]: one per device: the back end, the capabilities read from the device,
//!   and the pool of device domains (1..N; domain 0 stays pass-through).
//! - [`DmaDomain`]: a device domain with its I/O page table and its IOVA space (a
//!   `vm-allocator` address allocator over `[IOVA_BASE, 2^width)`), shared by every
//!   adapter that joined it; its common buffers. The model writes the page tables,
//!   installs the root, and invalidates the IOTLB when it unmaps.
//! - [`Adapter`]: an adapter (what `IoGetDmaAdapter` returns) with its address width, and
//!   the domain it is in.
//!
//! A common buffer is physically contiguous memory from the back end (on the preferred
//! NUMA node; 2 MiB pages for `LARGE_PAGE`) mapped at an IOVA of the domain: with 2 MiB
//! leaves and 2 MiB alignment in both IOVA and physical address for `LARGE_PAGE`, else 4
//! KiB leaves. Nothing falls back: no huge page is `InsufficientResources`.

use crate::verifier::low_resources::{self, Allocation};
use std::collections::BTreeMap;
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::backend::{BackendError, DmaBackend, DmaBuffer, DmaRequest};
use crate::caps::Capabilities;
use crate::domain::{Domain, DomainError};
use crate::iopt::{PageSize, Perm};

/// Lowest IOVA handed out in a domain (IOVA 0 and its neighbourhood stay unmapped, so a
/// NULL-based DMA faults).
pub const IOVA_BASE: u64 = 2 << 20;
/// Granularity of ordinary common buffers.
pub const GRANULE_4K: u64 = 4 << 10;
/// Granularity of `LARGE_PAGE` common buffers.
pub const GRANULE_2M: u64 = 2 << 20;

/// A shared back end.
pub type SharedBackend = Arc<dyn DmaBackend + Send + Sync>;

/// Why a DMA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The back end failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Programming a domain failed.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Every device domain is in use.
    #[error("all {0} translated device domains are in use")]
    NoFreeDomain(u32),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// Not enough memory or address space of the kind asked for.
    #[error("insufficient resources: {0}")]
    InsufficientResources(String),
    /// The device cannot do this.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The domain belongs to another device.
    #[error("domain {0} belongs to another device")]
    ForeignDomain(u64),
    /// The adapter is not in a domain.
    #[error("the adapter is not in a DMA domain")]
    NoDomain,
    /// A free that matches no allocation exactly.
    #[error(
        "no common buffer at logical {logical:#x} with length {length:#x} and this virtual address"
    )]
    NoSuchBuffer {
        /// Logical address passed.
        logical: u64,
        /// Length passed.
        length: u64,
    },
    /// The adapter still has common buffers in its domain.
    #[error("the adapter has {0} common buffer(s) in the domain")]
    BuffersOutstanding(usize),
}

/// Options of a common-buffer allocation, in the core's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonBufferRequest {
    /// Length in bytes (> 0).
    pub length: u64,
    /// Last logical address the buffer may occupy (inclusive); `None`: no limit beyond the
    /// adapter's address width.
    pub maximum_address: Option<u64>,
    /// 2 MiB granularity, alignment and leaves.
    pub large_page: bool,
    /// Preferred NUMA node (`None`: any).
    pub node: Option<u32>,
}

/// A live common buffer.
pub struct CommonBuffer {
    /// Logical address (IOVA in the domain).
    pub logical: u64,
    /// Length as requested.
    pub length: u64,
    /// Length mapped (rounded to the granularity).
    pub mapped: u64,
    /// `LARGE_PAGE` buffer.
    pub large_page: bool,
    /// Cached mapping (as the caller asked; kept for the free check).
    pub cached: bool,
    /// Page-table entries written to map it (leaves plus new table pointers).
    pub entries_written: usize,
    /// Adapter that allocated it.
    owner: u64,
    buffer: DmaBuffer,
}

impl CommonBuffer {
    /// The virtual address.
    pub fn virtual_address(&self) -> NonNull<u8> {
        NonNull::new(self.buffer.as_ptr()).expect("DMA buffers are never NULL")
    }

    /// The bus (physical) address of the first byte.
    pub fn physical(&self) -> u64 {
        self.buffer.bus_addr()
    }

    /// The NUMA node the memory is on, if known.
    pub fn node(&self) -> Option<u32> {
        self.buffer.node()
    }

    /// The memory, for volatile access.
    pub fn buffer(&self) -> &DmaBuffer {
        &self.buffer
    }
}

impl fmt::Debug for CommonBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommonBuffer")
            .field("logical", &format_args!("{:#x}", self.logical))
            .field("physical", &format_args!("{:#x}", self.physical()))
            .field("length", &self.length)
            .field("large_page", &self.large_page)
            .finish()
    }
}

/// What [`Adapter::allocate_common_buffer`] reports besides the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    /// Logical address.
    pub logical: u64,
    /// Virtual address.
    pub virtual_address: NonNull<u8>,
    /// Page-table entries written.
    pub entries_written: usize,
}

struct DomainInner {
    hw: Domain<'static>,
    iova: AddressAllocator,
    buffers: BTreeMap<u64, CommonBuffer>,
    members: usize,
}

/// A DMA domain: a device domain, its page table, its IOVA space and its common buffers.
pub struct DmaDomain {
    id: u64,
    index: u32,
    device: Weak<DmaDevice>,
    inner: Mutex<DomainInner>,
}

impl fmt::Debug for DmaDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaDomain")
            .field("id", &self.id)
            .field("index", &self.index)
            .finish()
    }
}

impl DmaDomain {
    fn lock(&self) -> MutexGuard<'_, DomainInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The handle value (unique per process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The device domain index (what a queue is bound to).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Number of live common buffers.
    pub fn buffer_count(&self) -> usize {
        self.lock().buffers.len()
    }

    /// Number of adapters joined.
    pub fn members(&self) -> usize {
        self.lock().members
    }

    /// Number of page tables the domain's I/O page table uses.
    pub fn table_count(&self) -> usize {
        self.lock().hw.table().table_count()
    }

    /// What the domain's page table maps `iova` to (leaf size, bus address, permissions).
    pub fn translate(&self, iova: u64) -> Option<crate::iopt::Mapping> {
        self.lock().hw.table().translate(iova)
    }

    /// Runs `f` on the buffer at `logical`, if any.
    pub fn with_buffer<R>(&self, logical: u64, f: impl FnOnce(&CommonBuffer) -> R) -> Option<R> {
        self.lock().buffers.get(&logical).map(f)
    }

    /// Allocates and maps a common buffer for adapter `owner` whose address limit is
    /// `width_limit` (the last IOVA the adapter can reach).
    fn allocate(
        &self,
        backend: &dyn DmaBackend,
        owner: u64,
        width_limit: u64,
        req: CommonBufferRequest,
        cached: bool,
    ) -> Result<Allocated, DmaError> {
        let granule = if req.large_page {
            GRANULE_2M
        } else {
            GRANULE_4K
        };
        let mapped = req
            .length
            .checked_next_multiple_of(granule)
            .filter(|&m| m > 0)
            .ok_or_else(|| DmaError::InvalidParameter(format!("length {:#x}", req.length)))?;
        let limit = req
            .maximum_address
            .map_or(width_limit, |m| m.min(width_limit));
        // Physical memory first (the scarcer resource for large pages).
        let mut dma_req = if req.large_page {
            DmaRequest::huge(mapped as usize)
        } else {
            DmaRequest::new(mapped as usize)
        };
        dma_req.node = req.node;
        let buffer = backend.alloc_dma(dma_req).map_err(|e| match e {
            BackendError::OutOfMemory(m) => DmaError::InsufficientResources(m),
            e => DmaError::Backend(e),
        })?;
        if req.large_page && buffer.bus_addr() % GRANULE_2M != 0 {
            return Err(DmaError::InsufficientResources(format!(
                "the back end returned a 2 MiB page at {:#x}, not 2 MiB aligned",
                buffer.bus_addr()
            )));
        }
        let mut inner = self.lock();
        let range = inner
            .iova
            .allocate(mapped, granule, AllocPolicy::FirstMatch)
            .map_err(|e| {
                DmaError::InsufficientResources(format!("no IOVA range of {mapped:#x}: {e}"))
            })?;
        if range.end() > limit {
            let _ = inner.iova.free(&range);
            return Err(DmaError::InsufficientResources(format!(
                "no {mapped:#x}-byte IOVA range at or below {limit:#x}"
            )));
        }
        let logical = range.start();
        let tables_before = inner.hw.table().table_count();
        let page = if req.large_page {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        if let Err(e) = inner
            .hw
            .map(logical, buffer.bus_addr(), mapped, Perm::RW, page)
        {
            let _ = inner.iova.free(&range);
            return Err(e.into());
        }
        let entries_written =
            (mapped / page.bytes()) as usize + (inner.hw.table().table_count() - tables_before);
        let virtual_address = NonNull::new(buffer.as_ptr()).expect("DMA buffers are never NULL");
        inner.buffers.insert(
            logical,
            CommonBuffer {
                logical,
                length: req.length,
                mapped,
                large_page: req.large_page,
                cached,
                entries_written,
                owner,
                buffer,
            },
        );
        Ok(Allocated {
            logical,
            virtual_address,
            entries_written,
        })
    }

    /// Frees the buffer that matches exactly, allocated through adapter `owner` (another
    /// adapter of the same domain did not allocate it: the parameters of
    /// FreeCommonBuffer include the adapter); unmaps and invalidates before the memory
    /// goes.
    fn free(
        &self,
        owner: u64,
        logical: u64,
        length: u64,
        virtual_address: *mut u8,
        cached: bool,
    ) -> Result<(), DmaError> {
        let mut inner = self.lock();
        let matches = inner.buffers.get(&logical).is_some_and(|b| {
            b.owner == owner
                && b.length == length
                && b.buffer.as_ptr() == virtual_address
                && b.cached == cached
        });
        if !matches {
            return Err(DmaError::NoSuchBuffer { logical, length });
        }
        let b = inner.buffers.remove(&logical).expect("checked above");
        // Unmap and wait for the invalidation: after it the device cannot reach the pages,
        // and only then does the memory go back (when `b` drops).
        let unmapped = inner.hw.unmap(b.logical, b.mapped);
        let range = RangeInclusive::new(b.logical, b.logical + b.mapped - 1)
            .expect("a mapped range is non-empty");
        let _ = inner.iova.free(&range);
        drop(inner);
        if let Err(e) = unmapped {
            // The device did not confirm the invalidation: keep the memory (leak it) rather
            // than hand memory the device may still write back to the allocator.
            tracing::error!("FreeCommonBuffer at {logical:#x}: {e}; the memory is not reused");
            std::mem::forget(b);
            return Err(e.into());
        }
        drop(b);
        Ok(())
    }

    fn buffers_of(&self, owner: u64) -> usize {
        self.lock()
            .buffers
            .values()
            .filter(|b| b.owner == owner)
            .count()
    }
}

/// The DMA side of one device.
pub struct DmaDevice {
    backend: SharedBackend,
    caps: Capabilities,
    domains: Mutex<BTreeMap<u32, Weak<DmaDomain>>>,
    next_adapter: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for DmaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaDevice")
            .field("backend", &self.backend.info().backend)
            .field("caps", &self.caps)
            .finish()
    }
}

fn next_domain_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl DmaDevice {
    /// Reads the device's capabilities and enables bus mastering.
    pub fn new(backend: SharedBackend) -> Result<Arc<Self>, DmaError> {
        let caps = Capabilities::read(&*backend)?;
        backend.set_bus_master(true)?;
        Ok(Arc::new(DmaDevice {
            backend,
            caps,
            domains: Mutex::new(BTreeMap::new()),
            next_adapter: std::sync::atomic::AtomicU64::new(1),
        }))
    }

    /// The back end.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// The device's capabilities.
    pub fn caps(&self) -> &Capabilities {
        &self.caps
    }

    /// A new adapter with an address width of `width` bits (capped by the device's).
    pub fn adapter(self: &Arc<Self>, width: u32) -> Adapter {
        let id = self
            .next_adapter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Adapter {
            id,
            device: Arc::clone(self),
            width: width.min(self.caps.iova_width),
            domain: Mutex::new(None),
        }
    }

    /// A new domain on a free device domain.
    fn new_domain(self: &Arc<Self>) -> Result<Arc<DmaDomain>, DmaError> {
        let mut domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        domains.retain(|_, d| d.strong_count() > 0);
        let n = self.caps.domains;
        let index = (1..n)
            .find(|i| !domains.contains_key(i))
            .ok_or(DmaError::NoFreeDomain(n.saturating_sub(1)))?;
        let width = self.caps.iova_width;
        let hw = Domain::translated(Arc::clone(&self.backend), index, width)?;
        let end = 1u64 << width;
        let iova = AddressAllocator::new(IOVA_BASE, end - IOVA_BASE).map_err(|e| {
            DmaError::InsufficientResources(format!("IOVA space of {width} bits: {e}"))
        })?;
        let d = Arc::new(DmaDomain {
            id: next_domain_id(),
            index,
            device: Arc::downgrade(self),
            inner: Mutex::new(DomainInner {
                hw,
                iova,
                buffers: BTreeMap::new(),
                members: 0,
            }),
        });
        domains.insert(index, Arc::downgrade(&d));
        Ok(d)
    }

    /// The live domain with handle value `id`.
    pub fn domain(&self, id: u64) -> Option<Arc<DmaDomain>> {
        let domains = self.domains.lock().unwrap_or_else(|e| e.into_inner());
        domains
            .values()
            .filter_map(Weak::upgrade)
            .find(|d| d.id == id)
    }
}

/// A DMA adapter.
pub struct Adapter {
    id: u64,
    device: Arc<DmaDevice>,
    width: u32,
    domain: Mutex<Option<Arc<DmaDomain>>>,
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("id", &self.id)
            .field("width", &self.width)
            .finish()
    }
}

impl Adapter {
    /// The adapter's id (unique per device).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The device.
    pub fn device(&self) -> &Arc<DmaDevice> {
        &self.device
    }

    /// Address width in bits: the smaller of the device's and the device description's.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Last logical address the adapter can reach.
    pub fn address_limit(&self) -> u64 {
        if self.width >= 64 {
            u64::MAX
        } else {
            (1u64 << self.width) - 1
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<DmaDomain>>> {
        self.domain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The adapter's domain, created (on a free device domain) on first use.
    pub fn domain(&self) -> Result<Arc<DmaDomain>, DmaError> {
        let mut slot = self.slot();
        if let Some(d) = &*slot {
            return Ok(Arc::clone(d));
        }
        let d = self.device.new_domain()?;
        d.lock().members += 1;
        *slot = Some(Arc::clone(&d));
        Ok(d)
    }

    /// The domain the adapter is in now, if any.
    pub fn current_domain(&self) -> Option<Arc<DmaDomain>> {
        self.slot().clone()
    }

    /// Joins domain `id` of the same device. The adapter first leaves its current domain,
    /// which fails while it has buffers there.
    pub fn join(&self, id: u64) -> Result<(), DmaError> {
        let d = self.device.domain(id).ok_or(DmaError::ForeignDomain(id))?;
        if d.device
            .upgrade()
            .is_none_or(|dev| !Arc::ptr_eq(&dev, &self.device))
        {
            return Err(DmaError::ForeignDomain(id));
        }
        let mut slot = self.slot();
        if let Some(cur) = &*slot {
            if Arc::ptr_eq(cur, &d) {
                return Ok(());
            }
            let n = cur.buffers_of(self.id);
            if n > 0 {
                return Err(DmaError::BuffersOutstanding(n));
            }
            cur.lock().members -= 1;
        }
        d.lock().members += 1;
        *slot = Some(d);
        Ok(())
    }

    /// Leaves the current domain. Fails (and stays) while the adapter has buffers there.
    pub fn leave(&self) -> Result<(), DmaError> {
        let mut slot = self.slot();
        let Some(cur) = &*slot else {
            return Err(DmaError::NoDomain);
        };
        let n = cur.buffers_of(self.id);
        if n > 0 {
            return Err(DmaError::BuffersOutstanding(n));
        }
        cur.lock().members -= 1;
        *slot = None;
        Ok(())
    }

    /// Allocates a common buffer in domain `domain` (which must be the adapter's).
    pub fn allocate_common_buffer(
        &self,
        domain: &Arc<DmaDomain>,
        req: CommonBufferRequest,
        cached: bool,
    ) -> Result<Allocated, DmaError> {
        let mine = self.slot().as_ref().is_some_and(|d| Arc::ptr_eq(d, domain));
        if !mine {
            return Err(DmaError::InvalidParameter(format!(
                "domain {} is not the adapter's",
                domain.id
            )));
        }
        if low_resources::fails(Allocation::CommonBuffer) {
            return Err(DmaError::InsufficientResources(
                "the verifier's low resources simulation failed the allocation".into(),
            ));
        }
        if req.large_page && !self.device.caps.supports_page(PageSize::Size2M) {
            return Err(DmaError::InsufficientResources(
                "the device does not support 2 MiB pages".into(),
            ));
        }
        if let Some(node) = req.node {
            if node >= self.device.backend.numa_nodes() {
                return Err(DmaError::InvalidParameter(format!(
                    "node {node} (the system has {})",
                    self.device.backend.numa_nodes()
                )));
            }
        }
        domain.allocate(
            &*self.device.backend,
            self.id,
            self.address_limit(),
            req,
            cached,
        )
    }

    /// Frees the common buffer that matches (`logical`, `length`, `virtual_address`,
    /// `cached`) exactly, in the adapter's domain.
    pub fn free_common_buffer(
        &self,
        length: u64,
        logical: u64,
        virtual_address: *mut u8,
        cached: bool,
    ) -> Result<(), DmaError> {
        let d = self.current_domain().ok_or(DmaError::NoDomain)?;
        d.free(self.id, logical, length, virtual_address, cached)
    }

    /// Live buffers this adapter allocated in its current domain.
    pub fn buffer_count(&self) -> usize {
        self.current_domain().map_or(0, |d| d.buffers_of(self.id))
    }
}
