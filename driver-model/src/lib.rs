//! domdma driver model: the guest side. Back ends that reach the device (for now the Linux
//! VFIO guest back end), a thin descriptor-queue driver and, in time, the WDF-shaped facade.

pub mod backend;
pub mod dma_queue;
