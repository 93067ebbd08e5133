//! The device core: a state machine with no socket code. (API stub; implementation in progress.)

use std::sync::Arc;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::irq::InterruptSink;

/// The device's view of bus memory: what the VMM has mapped for it (DMA_MAP).
pub type BusMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Device configuration chosen at start-up.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {}

/// The DMA device.
pub struct Device {
    _mem: BusMemory,
    _irq: Arc<dyn InterruptSink>,
}

impl Device {
    /// Create a device in its reset state.
    pub fn new(_config: DeviceConfig, mem: BusMemory, irq: Arc<dyn InterruptSink>) -> Self {
        Self { _mem: mem, _irq: irq }
    }
    /// Size of configuration space in bytes.
    pub fn config_size(&self) -> u64 {
        256
    }
    /// Read configuration space. Bytes beyond its end read as 0xff.
    pub fn config_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    /// Write configuration space.
    pub fn config_write(&mut self, _offset: u64, _data: &[u8]) {}
    /// Size of BAR `bar` in bytes, 0 when the BAR is not implemented.
    pub fn bar_size(&self, bar: usize) -> u64 {
        match bar {
            crate::spec::REGS_BAR => crate::spec::REGS_BAR_SIZE,
            crate::spec::MSIX_BAR => crate::spec::MSIX_BAR_SIZE,
            _ => 0,
        }
    }
    /// Read from a BAR. The caller has checked `offset + data.len() <= bar_size(bar)`.
    pub fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0)
    }
    /// Write to a BAR. The caller has checked `offset + data.len() <= bar_size(bar)`.
    pub fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> u16 {
        crate::spec::MSIX_VECTORS
    }
    /// Reset the device (function-level reset).
    pub fn reset(&mut self) {}
}
