//! domdma driver model: the guest side of domdma, in two layers.
//!
//! **Back ends** reach the device, all behind [`backend::DmaBackend`]:
//! [`backend::vfio`] inside the QEMU guest (VFIO type1, hugetlbfs, NUMA from sysfs),
//! [`backend::inprocess`] with the device core linked in, and [`backend::vfio_user`] as
//! the VMM of the real device server; the last two over guest RAM from [`backend::phys`].
//!
//! **The idiomatic core**, which runs on every back end:
//! - [`caps`]: the capability registers and the statistics window;
//! - [`dma_queue`]: a descriptor queue (ring, doorbell, completion records), in any domain;
//! - [`iopt`]: 4-level I/O page tables with 4 KiB, 2 MiB and 1 GiB leaves, in DMA memory;
//! - [`domain`]: DMA domains (root, mode) and IOTLB invalidation;
//! - [`fault_log`]: the fault log ring and its records;
//! - [`dma`]: DMA adapters, shared DMA domains with an IOVA allocator, domain common
//!   buffers;
//! - [`pool`], [`lookaside`]: tagged pool memory with poolmon statistics and leak reports,
//!   lookaside lists;
//! - [`irql`], [`verifier`], [`status`]: per-thread IRQL, bug checks as values, NTSTATUS.
//!
//! **The WDF-shaped facade**, [`wdf`]: the seeds' APIs with their documented names,
//! parameters, handles and status codes.
//!
//! The conformance suite that runs this library on every back end is the test kit's
//! (`testkit/`), not part of this API.

pub mod backend;
pub mod caps;
pub mod dma;
pub mod dma_queue;
pub mod domain;
pub mod fault_log;
pub mod iopt;
pub mod irql;
pub mod lookaside;
mod poll;
pub mod pool;
pub mod status;
pub mod verifier;
pub mod wdf;
