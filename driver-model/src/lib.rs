//! domdma driver model: the guest side. Back ends that reach the device (for now the Linux
//! VFIO guest back end), and the building blocks of a driver for it, all over
//! [`backend::DmaBackend`] so that they run on every back end:
//!
//! - [`caps`]: the capability registers and the statistics window;
//! - [`dma_queue`]: a descriptor queue (ring, doorbell, completion records), in any domain;
//! - [`iopt`]: 4-level I/O page tables with 4 KiB, 2 MiB and 1 GiB leaves, in DMA memory;
//! - [`domain`]: DMA domains (root, mode) and IOTLB invalidation;
//! - [`fault_log`]: the fault log ring and its records.
//!
//! The WDF-shaped facade is built on these.

pub mod backend;
pub mod caps;
pub mod dma;
pub mod dma_queue;
pub mod domain;
pub mod fault_log;
pub mod iopt;
pub mod irql;
pub mod lookaside;
pub mod pool;
pub mod status;
pub mod verifier;
pub mod wdf;
