//! vfio-user transport: the protocol ([`proto`]) and a server ([`server`]) that adapts its
//! messages to the device core.
//!
//! The transport is a thin adapter; beside it, [`inspect`] serves the device's counters as
//! JSON on a second socket (`--inspect PATH`). Region reads and writes go to
//! [`Device::config_read`](crate::core::Device::config_read) and friends, DMA mappings
//! become `vm-memory` regions in the device's [`BusMemory`](crate::core::BusMemory)
//! ([`memory`]), and MSI-X interrupts are delivered through client eventfds ([`irq`]). All
//! device behaviour is the core's.
//!
//! # What QEMU's client (10.1+, `hw/vfio-user/`) expects
//!
//! Written against `docs/interop/vfio-user.rst` and checked against QEMU 11.1:
//! - VERSION: QEMU proposes 0.0 and refuses a reply with a higher minor, so the reply is
//!   `min(proposed, 1)`. It refuses `max_msg_fds` above 16, `max_data_xfer_size` above
//!   64 MiB and `max_dma_maps` above 65535, and the JSON must end in a NUL (`proxy.c`).
//! - Every reply must fit in the buffer of its request (`reply larger than recv buffer`):
//!   the version reply must not be longer than QEMU's own capabilities, and replies echo at
//!   most the request structure.
//! - DMA_MAP carries flags READ|WRITE and the file offset of the range; DMA_UNMAP uses
//!   `VFIO_DMA_UNMAP_FLAG_ALL` (bit 1) when a 2^64-byte section goes (`container.c`).
//! - With an emulated IOMMU, QEMU unmaps whole power-of-two windows of the IOVA space on
//!   every context change, mapped or not; so unmapping follows VFIO type1 semantics (see
//!   [`memory`]) instead of failing each of them.
//! - SET_IRQS with eventfds: `argsz` is 20 and the eventfds travel only as SCM_RIGHTS;
//!   runs of "no eventfd" (-1) are sent as DATA_EVENTFD with `count` n and no descriptors,
//!   meaning de-assign. Without NORESIZE QEMU assigns MSI-X vectors one by one as the guest
//!   enables them; it disables with DATA_NONE|TRIGGER and count 0 (`device.c`, `pci.c`).
//! - Posted writes (BAR writes) carry No_reply; any reply to them, even an error, would be
//!   an "unexpected reply" to QEMU.
//! - QEMU emulates the MSI-X table and masking itself and reads the PBA from the device.
//! - ERR IRQ count 0 makes QEMU warn "Could not enable error recovery for the device",
//!   as it does for any conventional-PCI device under kernel VFIO.

#[cfg(feature = "server")]
pub mod channel;
#[cfg(feature = "server")]
pub mod inspect;
#[cfg(feature = "server")]
pub mod irq;
#[cfg(feature = "server")]
pub mod memory;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod socket;
#[cfg(feature = "server")]
pub mod web;

#[cfg(feature = "server")]
pub use inspect::{Inspector, Report};
#[cfg(feature = "server")]
pub use irq::EventFdInterrupts;
#[cfg(feature = "server")]
pub use memory::DmaMappings;
#[cfg(feature = "server")]
pub use server::{Server, ServerError, ServerOptions, StopHandle};
#[cfg(feature = "server")]
pub use socket::SocketAccess;
#[cfg(feature = "server")]
pub use web::WebView;
