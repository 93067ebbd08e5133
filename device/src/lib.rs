//! domdma device: a virtual PCI bus-master DMA device and the vfio-user server that serves it.
//!
//! Layers, from the bottom:
//! - [`spec`]: the programming interface (register offsets, layouts), mirrored by `SPEC.md`;
//! - [`pci`]: the PCI configuration space with the MSI-X capability;
//! - [`core`]: the device state machine (registers, queues, DMA engine); no sockets, guest
//!   memory only through `vm-memory`, interrupts through [`irq::InterruptSink`];
//! - [`vfio_user`]: the vfio-user protocol and a server that adapts messages to the core;
//! - [`trace`]: recording what the device did, and reading it back (`domdma-trace`).

pub mod core;
pub mod irq;
#[cfg(feature = "server")]
pub mod logging;
pub mod pci;
pub mod spec;
pub mod trace;
pub mod vfio_user;
