//! The in-process back end: the device core (`domdma_device::core::Device`) linked into
//! this process, for unit tests, fuzzing and benchmarks without a socket or a VM.
//!
//! This process plays the VMM: guest RAM is anonymous memory laid out as NUMA nodes by
//! [`PhysMemory`], and the device reaches it only through `vm-memory` (a
//! [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) over the same host mappings, at the
//! nodes' bus addresses), exactly as the vfio-user server reaches the memory QEMU maps for
//! it. The whole of guest RAM is mapped for the device, as in a VM
//! without an IOMMU: a freed buffer's bus address is still RAM; only
//! [`DmaBackend::reserve_unmapped`] addresses (above RAM) fault in a pass-through domain.
//!
//! Registers and configuration space are direct calls into the device behind a mutex (the
//! vfio-user server does the same per message). The device's DMA engine runs on its own
//! worker threads, which never take that mutex, so waiting for a completion while another
//! thread accesses registers is fine.
//!
//! MSI-X: the device raises vectors through an [`InterruptSink`] that counts them per
//! vector; [`DmaBackend::wait_interrupt`] sleeps on a condition variable and returns the
//! count since the last wait. The device's MSI-X table and masking are not emulated (QEMU
//! does that for the real device); every raise counts.
//!
//! NUMA: with more than one node the device reports node 1, mirroring the QEMU setup
//! where the device sits behind a PCIe expander bridge on node 1; with one node it
//! reports none (as Linux reports -1 on a machine without NUMA).

use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use domdma_device::core::{ConfigError, Device, DeviceConfig, DeviceStats};
use domdma_device::irq::InterruptSink;
use domdma_device::spec;
use tracing::{debug, info, trace};
use vm_memory::GuestMemoryAtomic;

use super::phys::{PhysConfig, PhysError, PhysMemory};
use super::{BackendError, BackendInfo, DmaBackend, RegisterAccess, Result};

/// Errors of the in-process back end.
#[derive(Debug, thiserror::Error)]
pub enum InProcessError {
    /// The device configuration is out of range.
    #[error("invalid device configuration")]
    Config(#[source] ConfigError),
    /// Guest RAM could not be set up.
    #[error("cannot set up guest RAM")]
    Phys(#[source] PhysError),
}

impl From<InProcessError> for BackendError {
    fn from(e: InProcessError) -> Self {
        BackendError::Backend(Box::new(e))
    }
}

/// How to build an [`InProcessBackend`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InProcessConfig {
    /// The device (queues, domains, IOVA width, ...), as the server's options set it.
    pub device: DeviceConfig,
    /// Guest RAM: nodes, node size, huge pages per node, base address.
    pub phys: PhysConfig,
}

/// MSI-X delivery into this process: a counter per vector and a condition variable.
#[derive(Debug)]
struct InterruptCounters {
    pending: Mutex<Vec<u64>>,
    arrived: Condvar,
}

impl InterruptCounters {
    fn new(vectors: u16) -> Self {
        InterruptCounters {
            pending: Mutex::new(vec![0; usize::from(vectors)]),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u64>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `timeout` for vector `v` (which exists); returns and clears its count.
    fn wait(&self, v: usize, timeout: Duration) -> u64 {
        let deadline = Instant::now().checked_add(timeout);
        let mut pending = self.lock();
        loop {
            let n = std::mem::take(&mut pending[v]);
            if n > 0 {
                return n;
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                // A timeout too long to represent: wait in long steps.
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return 0;
            }
            pending = self
                .arrived
                .wait_timeout(pending, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn clear(&self) {
        self.lock().fill(0);
    }
}

impl InterruptSink for InterruptCounters {
    fn trigger(&self, vector: u16) {
        let mut pending = self.lock();
        match pending.get_mut(usize::from(vector)) {
            Some(n) => {
                *n = n.saturating_add(1);
                trace!(vector, "MSI-X interrupt");
                self.arrived.notify_all();
            }
            None => debug!(
                vector,
                "interrupt on a vector the device does not have dropped"
            ),
        }
    }
}

/// The device core in this process, over anonymous guest RAM.
pub struct InProcessBackend {
    // Dropped first: stops and joins the engine workers.
    device: Mutex<Device>,
    irqs: Arc<InterruptCounters>,
    phys: PhysMemory,
    config: InProcessConfig,
    bar0_size: u64,
    config_size: u64,
    vectors: u16,
}

impl std::fmt::Debug for InProcessBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBackend")
            .field("config", &self.config)
            .field("phys", &self.phys)
            .finish_non_exhaustive()
    }
}

impl InProcessBackend {
    /// Builds guest RAM and the device, then enables bus mastering (as the VFIO back end
    /// does when it opens the device).
    pub fn new(config: InProcessConfig) -> std::result::Result<Self, InProcessError> {
        config.device.validate().map_err(InProcessError::Config)?;
        let phys = PhysMemory::anonymous(config.phys.clone()).map_err(InProcessError::Phys)?;
        let memory = GuestMemoryAtomic::new(phys.guest_memory().map_err(InProcessError::Phys)?);
        let vectors = config.device.msix_vectors();
        let irqs = Arc::new(InterruptCounters::new(vectors));
        let device = Device::new(config.device.clone(), memory, irqs.clone());
        let bar0_size = device.bar_size(spec::REGS_BAR);
        let config_size = device.config_size();
        let this = InProcessBackend {
            device: Mutex::new(device),
            irqs,
            phys,
            config,
            bar0_size,
            config_size,
            vectors,
        };
        this.lock().config_write(
            super::PCI_COMMAND,
            &(super::PCI_COMMAND_MEMORY | super::PCI_COMMAND_BUS_MASTER).to_le_bytes(),
        );
        info!(
            queues = this.config.device.queues,
            domains = this.config.device.domains,
            nodes = this.config.phys.nodes,
            "in-process device ready"
        );
        Ok(this)
    }

    /// The configuration the back end was built with.
    pub fn config(&self) -> &InProcessConfig {
        &self.config
    }

    /// Guest RAM.
    pub fn phys(&self) -> &PhysMemory {
        &self.phys
    }

    /// A snapshot of the device's counters (what the server's inspector serves).
    pub fn stats(&self) -> DeviceStats {
        self.lock().stats()
    }

    /// Sets the device's error-injection rules (a device that misbehaves on request;
    /// `domdma_device::core::inject`).
    pub fn set_injection(&self, rules: &[domdma_device::core::inject::Rule]) {
        self.lock().set_injection(rules);
    }

    fn lock(&self) -> MutexGuard<'_, Device> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_reg(&self, offset: u64) -> Result<()> {
        super::check_reg_access(offset, self.bar0_size)
    }

    fn check_config(&self, offset: u64, len: usize) -> Result<()> {
        super::check_config_access(offset, len, self.config_size)
    }
}

impl DmaBackend for InProcessBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "in-process",
            location: format!(
                "in-process device ({} queues, {} domains, {}-bit IOVA)",
                self.config.device.queues,
                self.config.device.domains,
                self.config.device.iova_width
            ),
            register_access: RegisterAccess::Direct,
            msix_vectors: self.vectors,
            numa_node: (self.phys.nodes() > 1).then_some(1),
        }
    }

    fn read32(&self, offset: u64) -> Result<u32> {
        self.check_reg(offset)?;
        let mut b = [0u8; 4];
        self.lock().bar_read(spec::REGS_BAR, offset, &mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&self, offset: u64, value: u32) -> Result<()> {
        self.check_reg(offset)?;
        // Descriptors written to DMA memory must be visible before the doorbell.
        fence(Ordering::SeqCst);
        self.lock()
            .bar_write(spec::REGS_BAR, offset, &value.to_le_bytes());
        Ok(())
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_config(offset, buf.len())?;
        self.lock().config_read(offset, buf);
        Ok(())
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_config(offset, buf.len())?;
        self.lock().config_write(offset, buf);
        Ok(())
    }

    super::phys::dma_memory_from_phys!();

    fn msix_vectors(&self) -> u16 {
        self.vectors
    }

    fn rearm_interrupts(&self) -> Result<()> {
        self.irqs.clear();
        Ok(())
    }

    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<u64> {
        if vector >= self.vectors {
            return Err(BackendError::NoSuchVector {
                vector,
                available: self.vectors,
            });
        }
        Ok(self.irqs.wait(usize::from(vector), timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_counters_count_wait_and_clear() {
        let c = Arc::new(InterruptCounters::new(3));
        assert_eq!(c.wait(1, Duration::ZERO), 0);
        c.trigger(1);
        c.trigger(1);
        c.trigger(7); // no such vector: dropped
        assert_eq!(c.wait(0, Duration::ZERO), 0);
        assert_eq!(c.wait(1, Duration::ZERO), 2, "count since the last wait");
        assert_eq!(c.wait(1, Duration::ZERO), 0);
        c.trigger(2);
        c.clear();
        assert_eq!(c.wait(2, Duration::ZERO), 0, "cleared");
        // A waiter is woken by a trigger from another thread.
        let c2 = Arc::clone(&c);
        let t = std::thread::spawn(move || c2.wait(0, Duration::from_secs(30)));
        // Whether the waiter is asleep yet or not, the count is there for it.
        c.trigger(0);
        assert_eq!(t.join().unwrap(), 1);
        // A timeout far beyond Instant's range does not overflow.
        c.trigger(2);
        assert_eq!(c.wait(2, Duration::MAX), 1);
    }
}
