//! domdma driver model: the guest side. Back ends that reach the device (for now the Linux
//! VFIO guest back end) and, in time, the WDF-shaped facade.

pub mod backend;
