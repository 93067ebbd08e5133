//! Guest-physical memory for the back ends where this process is the VMM (in-process and
//! vfio-user): guest RAM as NUMA nodes, and an allocator of physically contiguous DMA memory
//! in it.
//!
//! # Layout
//!
//! Guest RAM is `nodes` NUMA nodes of `node_size` bytes each. Node `n` is one contiguous
//! range of bus (guest-physical) addresses, `base + n * node_size ..`, backed by one host
//! mapping (a `vm-memory` [`MmapRegion`]: anonymous memory for the in-process back end, a
//! memfd for the vfio-user back end, whose server maps the same file). By default there
//! are two nodes of 512 MiB at 4 GiB, so every bus address needs 64-bit addressing.
//!
//! ```text
//!  bus:  base                         base + node_size                   base + 2 * node_size
//!        | node 0: base pages | huge pool | node 1: base pages | huge pool |   (unmapped)
//! ```
//!
//! Each node is split in two: the top `huge_pages_per_node * 2 MiB` are the node's huge page
//! pool (as the kernel reserves its hugetlb pool out of a node's memory), the rest is for
//! base pages. The two never borrow from each other, so a 2 MiB request either gets whole,
//! 2 MiB aligned pages from a pool or fails with [`PhysError::HugePagesExhausted`] (or
//! [`PhysError::NoHugePages`] when the pool is empty by configuration): it **never** falls
//! back to base pages. Both map to [`BackendError::OutOfMemory`].
//!
//! # Allocation
//!
//! Ranges come from a `vm-allocator` [`AddressAllocator`] per pool (first fit, freed ranges
//! merge with their neighbours): base pages at 4 KiB granularity and alignment, huge pages
//! at 2 MiB. Memory is zeroed before it is handed out and returns to its pool when the
//! [`DmaBuffer`] is dropped. The buffer keeps the host mapping alive, so it stays valid even
//! after the back end that allocated it is gone.
//!
//! # NUMA placement
//!
//! [`DmaRequest::node`] is a preference, as `MmAllocateContiguousMemorySpecifyCacheNode`
//! treats `PreferredNode`: the preferred node is tried first, then the other nodes in
//! ascending order, for base and huge pages alike (a node change is not a page-size change;
//! the huge page rule above still holds on every node). The node the memory came from is
//! recorded with [`DmaBuffer::with_node`]; a caller that needs a strict placement checks
//! [`DmaBuffer::node`]. With no preference, nodes are tried in ascending order. A node that
//! does not exist (`>= nodes`) is a caller error ([`PhysError::NoSuchNode`], mapped to
//! [`BackendError::InvalidAllocation`]): "any node" is `None`, not a magic number.
//!
//! # Unmapped bus addresses
//!
//! [`PhysMemory::reserve_unmapped`] hands out bus addresses above guest RAM (from the next
//! 1 GiB boundary past the last node plus 1 GiB), which are never mapped: a DMA there is a
//! fault. With the device in 32-bit IOVA mode, RAM itself must lie below 4 GiB
//! ([`PhysConfig::base`]) for pass-through DMA to reach it.

use std::fmt;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tracing::{debug, error};
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::{BackendError, BumpIova, DmaBuffer, DmaRequest, PageKind, PAGE_SIZE_2M, PAGE_SIZE_4K};

/// Default bus address of node 0: 4 GiB, so that DMA needs 64-bit addressing.
pub const DEFAULT_RAM_BASE: u64 = 4 << 30;
/// Default number of NUMA nodes (the QEMU setup has two, the device on node 1).
pub const DEFAULT_NODES: u32 = 2;
/// Default size of each node.
pub const DEFAULT_NODE_SIZE: u64 = 512 << 20;
/// Default number of 2 MiB huge pages in each node's pool.
pub const DEFAULT_HUGE_PAGES_PER_NODE: u32 = 64;
/// Most NUMA nodes a layout may have.
pub const MAX_NODES: u32 = 64;
/// Highest bus address (exclusive) guest RAM may reach: the 48-bit IOVA space.
pub const MAX_RAM_END: u64 = 1 << 48;
/// Size of the unmapped bus address window [`PhysMemory::reserve_unmapped`] draws from.
pub const UNMAPPED_WINDOW: u64 = 64 << 30;

const GIB: u64 = 1 << 30;
const PAGE_4K: u64 = PAGE_SIZE_4K as u64;
const PAGE_2M: u64 = PAGE_SIZE_2M as u64;

/// Errors of the guest-physical memory provider.
#[derive(Debug, thiserror::Error)]
pub enum PhysError {
    /// The layout is not usable.
    #[error("invalid guest RAM layout: {0}")]
    InvalidConfig(String),
    /// The host mappings given do not match the layout.
    #[error("guest RAM backing: {0}")]
    Backing(String),
    /// Creating a node's host mapping failed.
    #[error("cannot map {len:#x} bytes of guest RAM for node {node}")]
    Mmap {
        /// The node.
        node: u32,
        /// Its size.
        len: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// `vm-memory` refused the node regions.
    #[error("cannot build the guest memory from the nodes")]
    GuestMemory(#[source] vm_memory::GuestRegionCollectionError),
    /// A request that cannot be satisfied as asked (length 0, or too large to round).
    #[error("{0}")]
    InvalidRequest(String),
    /// A NUMA node that does not exist.
    #[error("NUMA node {node} does not exist (nodes are 0..{nodes}; None means any node)")]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// How many nodes there are.
        nodes: u32,
    },
    /// The layout has no huge pages at all.
    #[error("no 2 MiB huge pages: the layout has 0 per node (huge pages are never replaced by base pages)")]
    NoHugePages,
    /// No node has enough contiguous free huge pages.
    #[error(
        "no node has {pages} contiguous free 2 MiB huge pages (free per node: {free:?} of \
         {per_node}; huge pages are never replaced by base pages)"
    )]
    HugePagesExhausted {
        /// Pages asked for.
        pages: u64,
        /// Free pages per node (possibly fragmented).
        free: Vec<u64>,
        /// Pool size per node.
        per_node: u32,
    },
    /// No node has enough contiguous free base-page memory.
    #[error("no node has {len:#x} contiguous free bytes of base pages (free per node: {free:x?})")]
    Exhausted {
        /// Bytes asked for.
        len: u64,
        /// Free bytes per node (possibly fragmented).
        free: Vec<u64>,
    },
    /// The unmapped bus address window is used up.
    #[error("unmapped bus address space exhausted ({len:#x} bytes asked)")]
    UnmappedExhausted {
        /// Bytes asked for.
        len: u64,
    },
}

impl From<PhysError> for BackendError {
    fn from(e: PhysError) -> Self {
        match e {
            PhysError::NoHugePages
            | PhysError::HugePagesExhausted { .. }
            | PhysError::Exhausted { .. }
            | PhysError::UnmappedExhausted { .. } => BackendError::OutOfMemory(e.to_string()),
            PhysError::InvalidRequest(_) | PhysError::NoSuchNode { .. } => {
                BackendError::InvalidAllocation(e.to_string())
            }
            e => BackendError::Backend(Box::new(e)),
        }
    }
}

/// The guest RAM layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhysConfig {
    /// Bus address of node 0 (2 MiB aligned).
    pub base: u64,
    /// Number of NUMA nodes, `1..=MAX_NODES`.
    pub nodes: u32,
    /// Size of each node in bytes (a multiple of 2 MiB).
    pub node_size: u64,
    /// 2 MiB huge pages in each node's pool (0: none; a 2 MiB request then fails).
    pub huge_pages_per_node: u32,
}

impl Default for PhysConfig {
    fn default() -> Self {
        PhysConfig {
            base: DEFAULT_RAM_BASE,
            nodes: DEFAULT_NODES,
            node_size: DEFAULT_NODE_SIZE,
            huge_pages_per_node: DEFAULT_HUGE_PAGES_PER_NODE,
        }
    }
}

impl PhysConfig {
    /// Checks the layout: node count in range, sizes and base 2 MiB aligned, the huge pool
    /// fits in a node, RAM ends below [`MAX_RAM_END`] and each node fits the host's address
    /// space.
    pub fn validate(&self) -> Result<(), PhysError> {
        let bad = |s: String| Err(PhysError::InvalidConfig(s));
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return bad(format!(
                "{} NUMA nodes (1 to {MAX_NODES} allowed)",
                self.nodes
            ));
        }
        if self.node_size == 0 || self.node_size % PAGE_2M != 0 {
            return bad(format!(
                "node size {:#x} is not a non-zero multiple of 2 MiB",
                self.node_size
            ));
        }
        if usize::try_from(self.node_size).is_err() || self.node_size > isize::MAX as u64 {
            return bad(format!(
                "node size {:#x} does not fit the host",
                self.node_size
            ));
        }
        if self.base % PAGE_2M != 0 {
            return bad(format!("base {:#x} is not 2 MiB aligned", self.base));
        }
        if self.huge_pool_bytes() > self.node_size {
            return bad(format!(
                "{} huge pages ({:#x} bytes) do not fit in a node of {:#x} bytes",
                self.huge_pages_per_node,
                self.huge_pool_bytes(),
                self.node_size
            ));
        }
        match self.ram_end() {
            Some(end) if end <= MAX_RAM_END => Ok(()),
            _ => bad(format!(
                "{} nodes of {:#x} bytes at {:#x} end beyond {MAX_RAM_END:#x}",
                self.nodes, self.node_size, self.base
            )),
        }
    }

    /// Bytes of each node's huge page pool.
    pub fn huge_pool_bytes(&self) -> u64 {
        u64::from(self.huge_pages_per_node) * PAGE_2M
    }

    /// Bus address range of node `node` (`None` when it does not exist or overflows).
    pub fn node_range(&self, node: u32) -> Option<Range<u64>> {
        if node >= self.nodes {
            return None;
        }
        let start = self
            .base
            .checked_add(u64::from(node).checked_mul(self.node_size)?)?;
        Some(start..start.checked_add(self.node_size)?)
    }

    /// First bus address past guest RAM (`None` on overflow).
    pub fn ram_end(&self) -> Option<u64> {
        self.base
            .checked_add(u64::from(self.nodes).checked_mul(self.node_size)?)
    }

    /// The node holding bus address `addr`, if it is in guest RAM.
    pub fn node_of(&self, addr: u64) -> Option<u32> {
        (0..self.nodes).find(|&n| self.node_range(n).is_some_and(|r| r.contains(&addr)))
    }
}

/// How much of one node is free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUsage {
    /// The node.
    pub node: u32,
    /// Its bus address range.
    pub range: Range<u64>,
    /// Bytes of the base-page area.
    pub base_total: u64,
    /// Free bytes of the base-page area (possibly fragmented).
    pub base_free: u64,
    /// Huge pages in the pool.
    pub huge_total: u64,
    /// Free huge pages (possibly fragmented).
    pub huge_free: u64,
}

/// One node: its place on the bus and its host mapping.
struct Node {
    bus: Range<u64>,
    /// First bus address of the huge page pool (the end of the base-page area).
    huge_start: u64,
    mapping: Arc<MmapRegion>,
}

/// The allocators, behind the provider's mutex.
struct Pools {
    /// Per node: the base-page area (`None` when the huge pool fills the node).
    base: Vec<Option<AddressAllocator>>,
    /// Per node: the huge page pool (`None` when it is empty).
    huge: Vec<Option<AddressAllocator>>,
    base_free: Vec<u64>,
    huge_free: Vec<u64>,
    unmapped: BumpIova,
}

struct Inner {
    config: PhysConfig,
    nodes: Vec<Node>,
    pools: Mutex<Pools>,
}

impl Inner {
    fn pools(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Guest RAM and its allocator. Cheap to clone (shared); every [`DmaBuffer`] it hands out
/// holds a reference, so the memory stays mapped while any buffer lives.
#[derive(Clone)]
pub struct PhysMemory {
    inner: Arc<Inner>,
}

impl fmt::Debug for PhysMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhysMemory")
            .field("config", &self.inner.config)
            .field("usage", &self.usage())
            .finish()
    }
}

/// The [`DmaBackend`](super::DmaBackend) methods of a back end whose DMA memory is the
/// guest RAM of its `phys` field, a [`PhysMemory`]: allocations, unmapped reservations and
/// NUMA nodes all come from there. Used inside the back end's `impl DmaBackend`.
macro_rules! dma_memory_from_phys {
    () => {
        fn alloc_dma(
            &self,
            req: $crate::backend::DmaRequest,
        ) -> $crate::backend::Result<$crate::backend::DmaBuffer> {
            Ok(self.phys.alloc(req)?)
        }

        fn reserve_unmapped(&self, len: u64) -> $crate::backend::Result<u64> {
            Ok(self.phys.reserve_unmapped(len)?)
        }

        fn numa_nodes(&self) -> u32 {
            self.phys.nodes()
        }
    };
}
pub(crate) use dma_memory_from_phys;

impl PhysMemory {
    /// Guest RAM over the host mappings given, one per node in node order, each exactly
    /// `node_size` bytes.
    pub fn new(config: PhysConfig, mappings: Vec<Arc<MmapRegion>>) -> Result<Self, PhysError> {
        config.validate()?;
        if mappings.len() != config.nodes as usize {
            return Err(PhysError::Backing(format!(
                "{} host mappings for {} nodes",
                mappings.len(),
                config.nodes
            )));
        }
        let mut nodes = Vec::with_capacity(mappings.len());
        let mut pools = Pools {
            base: Vec::new(),
            huge: Vec::new(),
            base_free: Vec::new(),
            huge_free: Vec::new(),
            unmapped: unmapped_window(&config)?,
        };
        for (n, mapping) in (0u32..).zip(mappings) {
            if mapping.size() as u64 != config.node_size {
                return Err(PhysError::Backing(format!(
                    "node {n}: host mapping of {:#x} bytes, the node has {:#x}",
                    mapping.size(),
                    config.node_size
                )));
            }
            if (mapping.as_ptr() as usize) % PAGE_SIZE_4K != 0 {
                return Err(PhysError::Backing(format!(
                    "node {n}: host mapping is not page aligned"
                )));
            }
            let bus = config
                .node_range(n)
                .ok_or_else(|| PhysError::InvalidConfig(format!("node {n} overflows")))?;
            let huge_start = bus.end - config.huge_pool_bytes();
            let base_len = huge_start - bus.start;
            pools.base.push(allocator(bus.start, base_len)?);
            pools.base_free.push(base_len);
            pools
                .huge
                .push(allocator(huge_start, config.huge_pool_bytes())?);
            pools.huge_free.push(u64::from(config.huge_pages_per_node));
            nodes.push(Node {
                bus,
                huge_start,
                mapping,
            });
        }
        debug!(?config, "guest RAM ready");
        Ok(PhysMemory {
            inner: Arc::new(Inner {
                config,
                nodes,
                pools: Mutex::new(pools),
            }),
        })
    }

    /// Guest RAM in anonymous memory (private, not reserved: pages are allocated on first
    /// touch), one mapping per node.
    pub fn anonymous(config: PhysConfig) -> Result<Self, PhysError> {
        config.validate()?;
        let mappings = (0..config.nodes)
            .map(|node| {
                // validate() checked that the node size fits usize.
                MmapRegion::new(config.node_size as usize)
                    .map(Arc::new)
                    .map_err(|source| PhysError::Mmap {
                        node,
                        len: config.node_size,
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(config, mappings)
    }

    /// The layout.
    pub fn config(&self) -> &PhysConfig {
        &self.inner.config
    }

    /// Number of NUMA nodes.
    pub fn nodes(&self) -> u32 {
        self.inner.config.nodes
    }

    /// Bus address range of node `node`.
    pub fn node_range(&self, node: u32) -> Option<Range<u64>> {
        self.inner.nodes.get(node as usize).map(|n| n.bus.clone())
    }

    /// Bus address range of node `node`'s huge page pool (empty when it has none).
    pub fn huge_pool_range(&self, node: u32) -> Option<Range<u64>> {
        self.inner
            .nodes
            .get(node as usize)
            .map(|n| n.huge_start..n.bus.end)
    }

    /// The host mapping of node `node` (to share with a device model).
    pub fn node_mapping(&self, node: u32) -> Option<Arc<MmapRegion>> {
        self.inner
            .nodes
            .get(node as usize)
            .map(|n| Arc::clone(&n.mapping))
    }

    /// All of guest RAM as `vm-memory` guest memory at its bus addresses, sharing the host
    /// mappings: what a device model in this process reaches its bus memory through.
    pub fn guest_memory(&self) -> Result<GuestMemoryMmap, PhysError> {
        let regions = self
            .inner
            .nodes
            .iter()
            .map(|n| {
                GuestRegionMmap::with_arc(Arc::clone(&n.mapping), GuestAddress(n.bus.start))
                    .map(Arc::new)
                    .ok_or_else(|| {
                        PhysError::InvalidConfig(format!("node at {:#x} overflows", n.bus.start))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        GuestMemoryMmap::from_arc_regions(regions).map_err(PhysError::GuestMemory)
    }

    /// What is free on each node.
    pub fn usage(&self) -> Vec<NodeUsage> {
        let pools = self.inner.pools();
        (0u32..)
            .zip(&self.inner.nodes)
            .map(|(i, n)| NodeUsage {
                node: i,
                range: n.bus.clone(),
                base_total: n.huge_start - n.bus.start,
                base_free: pools.base_free[i as usize],
                huge_total: u64::from(self.inner.config.huge_pages_per_node),
                huge_free: pools.huge_free[i as usize],
            })
            .collect()
    }

    /// Allocates zeroed, physically contiguous memory as `req` asks (see the module
    /// documentation for the page and node rules). The range returns to its pool when the
    /// buffer is dropped.
    pub fn alloc(&self, req: DmaRequest) -> Result<DmaBuffer, PhysError> {
        if req.len == 0 {
            return Err(PhysError::InvalidRequest("length 0".into()));
        }
        let page = req.pages.size();
        let len = req
            .len
            .checked_next_multiple_of(page)
            .ok_or_else(|| PhysError::InvalidRequest(format!("length {:#x}", req.len)))?
            as u64;
        let nodes = self.inner.config.nodes;
        let order: Vec<u32> = match req.node {
            Some(n) if n >= nodes => return Err(PhysError::NoSuchNode { node: n, nodes }),
            Some(n) => std::iter::once(n)
                .chain((0..nodes).filter(|&m| m != n))
                .collect(),
            None => (0..nodes).collect(),
        };
        let (node, range) = {
            let mut pools = self.inner.pools();
            let found = order.iter().find_map(|&n| {
                let pool = match req.pages {
                    PageKind::Base => pools.base[n as usize].as_mut(),
                    PageKind::Huge2M => pools.huge[n as usize].as_mut(),
                }?;
                pool.allocate(len, page as u64, AllocPolicy::FirstMatch)
                    .ok()
                    .map(|r| (n, r))
            });
            let Some((node, range)) = found else {
                return Err(match req.pages {
                    PageKind::Huge2M if self.inner.config.huge_pages_per_node == 0 => {
                        PhysError::NoHugePages
                    }
                    PageKind::Huge2M => PhysError::HugePagesExhausted {
                        pages: len / PAGE_2M,
                        free: pools.huge_free.clone(),
                        per_node: self.inner.config.huge_pages_per_node,
                    },
                    PageKind::Base => PhysError::Exhausted {
                        len,
                        free: pools.base_free.clone(),
                    },
                });
            };
            match req.pages {
                PageKind::Base => pools.base_free[node as usize] -= len,
                PageKind::Huge2M => pools.huge_free[node as usize] -= len / PAGE_2M,
            }
            (node, range)
        };
        if req.node.is_some_and(|n| n != node) {
            debug!(
                preferred = req.node,
                node, len, "preferred NUMA node full; allocated on another node"
            );
        }
        let backing = PhysAllocation {
            inner: Arc::clone(&self.inner),
            node,
            pages: req.pages,
            range,
        };
        let ptr = backing.host_ptr();
        // The allocation is ours alone until it is handed out: nobody else (the device
        // included, which is only told bus addresses by the driver) uses it now.
        // SAFETY: `ptr..ptr + len` lies inside the node's host mapping (the range is inside
        // the node, checked by the allocator's bounds), which `backing` keeps alive; no Rust
        // reference to that memory exists.
        unsafe { ptr.as_ptr().write_bytes(0, len as usize) };
        debug!(
            node,
            bus = format_args!("{:#x}", range.start()),
            len,
            pages = ?req.pages,
            "DMA memory allocated"
        );
        let bus = range.start();
        // SAFETY: `ptr` is valid for reads and writes of `len` bytes and page aligned for as
        // long as `backing` (which owns the range and keeps the mapping alive) lives; no
        // references to it exist; and the device reaches it at `bus` because guest RAM is
        // mapped for the device as a whole.
        let buf =
            unsafe { DmaBuffer::from_raw_parts(ptr, len as usize, bus, page, Box::new(backing)) };
        Ok(buf.with_node(Some(node)))
    }

    /// Reserves `len` bytes (rounded up to 4 KiB) of bus address space above guest RAM
    /// that is never mapped. Ranges are not reused, and a 64 KiB guard gap separates them.
    pub fn reserve_unmapped(&self, len: u64) -> Result<u64, PhysError> {
        let len = len
            .max(1)
            .checked_next_multiple_of(PAGE_4K)
            .ok_or(PhysError::UnmappedExhausted { len })?;
        self.inner
            .pools()
            .unmapped
            .alloc(len, PAGE_4K)
            .ok_or(PhysError::UnmappedExhausted { len })
    }
}

/// An allocator over `[start, start + len)`, `None` when empty.
fn allocator(start: u64, len: u64) -> Result<Option<AddressAllocator>, PhysError> {
    if len == 0 {
        return Ok(None);
    }
    AddressAllocator::new(start, len)
        .map(Some)
        .map_err(|e| PhysError::InvalidConfig(format!("range {start:#x}+{len:#x}: {e}")))
}

/// The window of never-mapped bus addresses: from the 1 GiB boundary past RAM plus 1 GiB.
fn unmapped_window(config: &PhysConfig) -> Result<BumpIova, PhysError> {
    let start = config
        .ram_end()
        .and_then(|e| e.checked_next_multiple_of(GIB))
        .and_then(|e| e.checked_add(GIB));
    let end = start.and_then(|s| s.checked_add(UNMAPPED_WINDOW));
    match (start, end) {
        (Some(start), Some(end)) => Ok(BumpIova::new(start, end, BumpIova::DEFAULT_GUARD)),
        _ => Err(PhysError::InvalidConfig(
            "no room for unmapped bus addresses above RAM".into(),
        )),
    }
}

/// One allocation: returns its range to the pool when dropped (inside its `DmaBuffer`).
struct PhysAllocation {
    inner: Arc<Inner>,
    node: u32,
    pages: PageKind,
    range: RangeInclusive,
}

impl PhysAllocation {
    /// The host address of the first byte.
    fn host_ptr(&self) -> NonNull<u8> {
        let n = &self.inner.nodes[self.node as usize];
        // The range lies inside the node: `start - bus.start < node_size`, which fits usize.
        let off = (self.range.start() - n.bus.start) as usize;
        NonNull::new(n.mapping.as_ptr().wrapping_add(off))
            .expect("a host mapping is never at address 0")
    }
}

impl Drop for PhysAllocation {
    fn drop(&mut self) {
        let mut pools = self.inner.pools();
        let n = self.node as usize;
        let pool = match self.pages {
            PageKind::Base => pools.base[n].as_mut(),
            PageKind::Huge2M => pools.huge[n].as_mut(),
        };
        match pool.map(|p| p.free(&self.range)) {
            Some(Ok(())) => match self.pages {
                PageKind::Base => pools.base_free[n] += self.range.len(),
                PageKind::Huge2M => pools.huge_free[n] += self.range.len() / PAGE_2M,
            },
            // Cannot happen (the range came from this pool); losing the range is the safe
            // outcome.
            Some(Err(e)) => error!(
                node = self.node,
                start = self.range.start(),
                "cannot return DMA memory to its pool: {e}"
            ),
            None => error!(
                node = self.node,
                "DMA memory from a pool that does not exist"
            ),
        }
        debug!(
            node = self.node,
            bus = format_args!("{:#x}", self.range.start()),
            "DMA memory freed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    fn small(huge: u32) -> PhysConfig {
        PhysConfig {
            base: DEFAULT_RAM_BASE,
            nodes: 2,
            node_size: 16 * MIB,
            huge_pages_per_node: huge,
        }
    }

    fn oom(e: PhysError) -> String {
        match BackendError::from(e) {
            BackendError::OutOfMemory(m) => m,
            other => panic!("not OutOfMemory: {other:?}"),
        }
    }

    #[test]
    fn config_validation() {
        assert!(PhysConfig::default().validate().is_ok());
        let d = PhysConfig::default();
        for bad in [
            PhysConfig {
                nodes: 0,
                ..d.clone()
            },
            PhysConfig {
                nodes: MAX_NODES + 1,
                ..d.clone()
            },
            PhysConfig {
                node_size: 0,
                ..d.clone()
            },
            PhysConfig {
                node_size: 3 * MIB,
                ..d.clone()
            },
            PhysConfig {
                base: 0x1000,
                ..d.clone()
            },
            PhysConfig {
                huge_pages_per_node: 257,
                ..d.clone()
            },
            PhysConfig {
                base: MAX_RAM_END - 2 * MIB,
                ..d.clone()
            },
            PhysConfig {
                base: u64::MAX - (2 * MIB - 1),
                ..d.clone()
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(PhysError::InvalidConfig(_))),
                "{bad:?} accepted"
            );
        }
        // A pool filling the whole node is allowed: no base pages then.
        let all_huge = PhysConfig {
            huge_pages_per_node: 8,
            node_size: 16 * MIB,
            ..d
        };
        assert!(all_huge.validate().is_ok());
        assert_eq!(
            all_huge.node_range(1),
            Some(DEFAULT_RAM_BASE + 16 * MIB..DEFAULT_RAM_BASE + 32 * MIB)
        );
        assert_eq!(all_huge.node_range(2), None);
        assert_eq!(all_huge.node_of(DEFAULT_RAM_BASE + 16 * MIB), Some(1));
        assert_eq!(all_huge.node_of(DEFAULT_RAM_BASE - 1), None);
    }

    #[test]
    fn backings_must_match_the_layout() {
        let c = small(2);
        let one = vec![Arc::new(MmapRegion::new((16 * MIB) as usize).unwrap())];
        assert!(matches!(
            PhysMemory::new(c.clone(), one),
            Err(PhysError::Backing(_))
        ));
        let wrong_size = vec![
            Arc::new(MmapRegion::new((16 * MIB) as usize).unwrap()),
            Arc::new(MmapRegion::new((8 * MIB) as usize).unwrap()),
        ];
        let e = PhysMemory::new(c, wrong_size).unwrap_err();
        assert!(e.to_string().contains("node 1"), "{e}");
    }

    #[test]
    fn base_pages_are_4k_aligned_and_granular_on_the_requested_node() {
        let p = PhysMemory::anonymous(small(2)).unwrap();
        let a = p.alloc(DmaRequest::new(100)).unwrap();
        assert_eq!(a.len(), 4096, "rounded up to 4 KiB");
        assert_eq!(a.page_size(), 4096);
        assert_eq!(a.bus_addr() % 4096, 0);
        assert_eq!(a.node(), Some(0), "no preference: node 0 first");
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        let b = p.alloc(DmaRequest::new(5000).on_node(1)).unwrap();
        assert_eq!(b.len(), 8192);
        assert_eq!(b.node(), Some(1));
        assert!(p.node_range(1).unwrap().contains(&b.bus_addr()));
        assert!(
            b.bus_addr() + 8192 <= p.huge_pool_range(1).unwrap().start,
            "base pages stay out of the huge pool"
        );
        let usage = p.usage();
        assert_eq!(usage[0].base_free, usage[0].base_total - 4096);
        assert_eq!(usage[1].base_free, usage[1].base_total - 8192);
    }

    #[test]
    fn huge_pages_are_2m_aligned_granular_and_from_the_pool() {
        let p = PhysMemory::anonymous(small(3)).unwrap();
        let h = p
            .alloc(DmaRequest::huge(PAGE_SIZE_2M + 1).on_node(1))
            .unwrap();
        assert_eq!(h.len(), 2 * PAGE_SIZE_2M, "rounded up to 2 MiB");
        assert_eq!(h.page_size(), PAGE_SIZE_2M);
        assert_eq!(h.bus_addr() % PAGE_2M, 0);
        assert_eq!(h.as_ptr() as usize % 4096, 0);
        assert_eq!(h.node(), Some(1));
        assert!(p.huge_pool_range(1).unwrap().contains(&h.bus_addr()));
        assert_eq!(p.usage()[1].huge_free, 1);
        assert_eq!(p.usage()[0].huge_free, 3);
    }

    #[test]
    fn huge_budget_exhaustion_never_falls_back_to_base_pages() {
        let p = PhysMemory::anonymous(small(2)).unwrap();
        let a = p
            .alloc(DmaRequest::huge(2 * PAGE_SIZE_2M).on_node(0))
            .unwrap();
        assert_eq!(a.node(), Some(0));
        // Node 0's pool is empty: the preference moves to node 1, still huge pages.
        let b = p.alloc(DmaRequest::huge(PAGE_SIZE_2M).on_node(0)).unwrap();
        assert_eq!(b.node(), Some(1));
        assert_eq!(b.page_size(), PAGE_SIZE_2M);
        let c = p.alloc(DmaRequest::huge(PAGE_SIZE_2M)).unwrap();
        assert_eq!(c.node(), Some(1));
        // Every pool is empty while megabytes of base pages are free: no fallback.
        let m = oom(p.alloc(DmaRequest::huge(PAGE_SIZE_2M)).unwrap_err());
        assert!(m.contains("huge pages") && m.contains("[0, 0]"), "{m}");
        assert!(p.usage().iter().all(|u| u.base_free == u.base_total));
        // More contiguous pages than a pool holds.
        drop((a, b, c));
        let m = oom(p.alloc(DmaRequest::huge(3 * PAGE_SIZE_2M)).unwrap_err());
        assert!(m.contains("3 contiguous"), "{m}");
    }

    #[test]
    fn zero_huge_budget_means_no_huge_pages() {
        let p = PhysMemory::anonymous(small(0)).unwrap();
        let e = p
            .alloc(DmaRequest::huge(PAGE_SIZE_2M).on_node(1))
            .unwrap_err();
        assert!(matches!(e, PhysError::NoHugePages), "{e:?}");
        assert!(oom(e).contains("0 per node"));
        // Base pages can use the whole node.
        let all = p.alloc(DmaRequest::new((16 * MIB) as usize)).unwrap();
        assert_eq!(all.bus_addr(), DEFAULT_RAM_BASE);
    }

    #[test]
    fn base_exhaustion_prefers_then_moves_then_fails() {
        let p = PhysMemory::anonymous(small(4)).unwrap(); // 8 MiB of base pages per node
        let a = p
            .alloc(DmaRequest::new((8 * MIB) as usize).on_node(1))
            .unwrap();
        assert_eq!(a.node(), Some(1));
        let b = p.alloc(DmaRequest::new(4096).on_node(1)).unwrap();
        assert_eq!(b.node(), Some(0), "node 1 full: allocated on node 0");
        let e = p.alloc(DmaRequest::new((8 * MIB) as usize)).unwrap_err();
        assert!(matches!(e, PhysError::Exhausted { .. }), "{e:?}");
        assert!(oom(e).contains("contiguous free bytes"));
    }

    #[test]
    fn bad_requests_are_invalid_allocations() {
        let p = PhysMemory::anonymous(small(1)).unwrap();
        for (req, what) in [
            (DmaRequest::new(0), "length 0"),
            (DmaRequest::new(4096).on_node(2), "does not exist"),
            (DmaRequest::huge(usize::MAX), "length"),
        ] {
            match BackendError::from(p.alloc(req).unwrap_err()) {
                BackendError::InvalidAllocation(m) => assert!(m.contains(what), "{m}"),
                other => panic!("{req:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn freed_memory_is_reused_and_zeroed() {
        let p = PhysMemory::anonymous(small(1)).unwrap();
        let a = p.alloc(DmaRequest::new(3 * 4096)).unwrap();
        let addr = a.bus_addr();
        a.fill(0, a.len(), 0xa5);
        drop(a);
        assert_eq!(p.usage()[0].base_free, p.usage()[0].base_total);
        let b = p.alloc(DmaRequest::new(3 * 4096)).unwrap();
        assert_eq!(b.bus_addr(), addr, "first fit reuses the freed range");
        assert!(b.to_vec(0, b.len()).iter().all(|&x| x == 0), "not zeroed");

        let h = p.alloc(DmaRequest::huge(PAGE_SIZE_2M)).unwrap();
        let haddr = h.bus_addr();
        h.fill(0, h.len(), 0x5a);
        drop(h);
        let h = p.alloc(DmaRequest::huge(PAGE_SIZE_2M)).unwrap();
        assert_eq!(h.bus_addr(), haddr);
        assert!(
            h.to_vec(0, h.len()).iter().all(|&x| x == 0),
            "huge page not zeroed"
        );
    }

    #[test]
    fn freed_neighbours_merge() {
        let p = PhysMemory::anonymous(small(0)).unwrap();
        let bufs: Vec<_> = (0..4)
            .map(|_| p.alloc(DmaRequest::new(4096)).unwrap())
            .collect();
        let first = bufs[0].bus_addr();
        drop(bufs);
        let big = p.alloc(DmaRequest::new(4 * 4096)).unwrap();
        assert_eq!(big.bus_addr(), first, "the four freed pages merged");
    }

    #[test]
    fn buffers_outlive_the_provider_and_the_device_sees_them() {
        let p = PhysMemory::anonymous(small(1)).unwrap();
        let mem = p.guest_memory().unwrap();
        assert_eq!(mem.num_regions(), 2);
        let b = p.alloc(DmaRequest::new(4096).on_node(1)).unwrap();
        drop(p);
        b.write_u64(8, 0x0123_4567_89ab_cdef);
        let v: u64 = mem.read_obj(GuestAddress(b.bus_addr() + 8)).unwrap();
        assert_eq!(
            v, 0x0123_4567_89ab_cdef,
            "device view and driver view differ"
        );
        mem.write_obj(0xfeed_u32, GuestAddress(b.bus_addr() + 16))
            .unwrap();
        assert_eq!(b.read_u32(16), 0xfeed);
    }

    #[test]
    fn unmapped_ranges_are_outside_ram_and_distinct() {
        let p = PhysMemory::anonymous(small(1)).unwrap();
        let mem = p.guest_memory().unwrap();
        let ram_end = p.config().ram_end().unwrap();
        let a = p.reserve_unmapped(1).unwrap();
        let b = p.reserve_unmapped(64 << 10).unwrap();
        assert!(a >= ram_end + GIB, "{a:#x}");
        assert_eq!(a % 4096, 0);
        assert!(
            b >= a + 4096 + BumpIova::DEFAULT_GUARD,
            "{b:#x} overlaps {a:#x}"
        );
        assert!(mem.find_region(GuestAddress(a)).is_none());
        assert!(mem.find_region(GuestAddress(b + 0xffff)).is_none());
        assert!(matches!(
            p.reserve_unmapped(UNMAPPED_WINDOW + 1),
            Err(PhysError::UnmappedExhausted { .. })
        ));
    }
}
