//! A thin driver for one domdma descriptor queue, on any [`DmaBackend`].
//!
//! Programming sequence (device/SPEC.md): reset the device, enable bus mastering, allocate
//! a ring of `size` 64-byte descriptors in DMA memory, program `Q_BASE_LO/HI`, `Q_SIZE`,
//! `Q_DOMAIN` and `Q_MSIX_VECTOR`, set `Q_CTRL.ENABLE`. To submit, write descriptors at the
//! ring index `tail`, advance `tail` modulo the ring size and write it to `Q_TAIL` (the
//! doorbell). The device processes descriptors from `Q_HEAD` up to `Q_TAIL`; the ring holds
//! at most `size - 1` outstanding descriptors. Each descriptor may name a 32-byte completion
//! record whose status (zeroed by the driver beforehand) the device writes last.
//!
//! **Addresses are IOVAs of the queue's domain.** Every address the device uses for a
//! queue — the ring base, descriptor sources and destinations, completion records — goes
//! through the queue's DMA domain. In domain 0 after reset (pass-through) an IOVA is the
//! bus address; in a translated domain the driver maps the ring and the records (see
//! [`crate::domain::Domain`]) and gives their IOVAs: [`DmaQueue::with_ring`] and
//! [`CompletionRecords::set_device_base`].

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use domdma_device::spec;

use crate::backend::{BackendError, DmaBackend, DmaBuffer, DmaRequest};
use crate::poll::poll_until;

/// Errors of the queue driver.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The back end failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The ring size is not a power of two in the supported range.
    #[error("invalid ring size {0} (a power of two in {min}..={max})", min = spec::Q_SIZE_MIN, max = spec::Q_SIZE_MAX)]
    InvalidSize(u32),
    /// The device did not accept the queue configuration.
    #[error("queue {queue} did not come up: Q_STATUS={status:#x}")]
    EnableFailed {
        /// Queue index.
        queue: u32,
        /// The queue status register.
        status: u32,
    },
    /// No free ring entry.
    #[error("ring full ({outstanding} of {size} entries outstanding)")]
    Full {
        /// Ring size.
        size: u32,
        /// Descriptors not yet consumed by the device.
        outstanding: u32,
    },
    /// A wait ran out of time.
    #[error(
        "timed out after {waited:?} waiting for {what} (queue {queue}: head {head}, tail {tail}, \
         Q_STATUS {status:#x})"
    )]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
        /// Queue index.
        queue: u32,
        /// `Q_HEAD` at the time.
        head: u32,
        /// The driver's tail.
        tail: u32,
        /// `Q_STATUS` at the time.
        status: u32,
    },
    /// The device reset did not complete.
    #[error("device reset did not complete within {0:?} (DEV_CTRL still {1:#x})")]
    ResetTimeout(Duration, u32),
    /// The ring buffer given is too small for the ring size.
    #[error("ring buffer of {len:#x} bytes is too small for {size} descriptors")]
    RingTooSmall {
        /// Buffer length.
        len: usize,
        /// Ring size.
        size: u32,
    },
    /// The buffer given for completion records is too small.
    #[error("completion buffer of {len:#x} bytes is too small for {count} records")]
    RecordsTooSmall {
        /// Buffer length.
        len: usize,
        /// Records asked for.
        count: usize,
    },
}

pub use domdma_device::spec::{status_name, CompletionRecord, Descriptor};

/// An array of completion records in DMA memory.
///
/// The device writes them at IOVAs of the queue's domain: by default the bus address (for
/// a pass-through domain); [`CompletionRecords::set_device_base`] gives the IOVA the
/// buffer is mapped at in a translated domain.
#[derive(Debug)]
pub struct CompletionRecords {
    buf: DmaBuffer,
    count: usize,
    device_base: u64,
}

const CPL: usize = std::mem::size_of::<CompletionRecord>();
const DESC_BYTES: usize = std::mem::size_of::<Descriptor>();

impl CompletionRecords {
    /// Allocates `count` zeroed records.
    pub fn new(backend: &dyn DmaBackend, count: usize) -> Result<Self, QueueError> {
        let buf = backend.alloc_dma(DmaRequest::new(count.max(1) * CPL))?;
        let device_base = buf.bus_addr();
        Ok(CompletionRecords {
            buf,
            count,
            device_base,
        })
    }

    /// Records in memory the caller allocated (at least `count` records long), which the
    /// device reaches at `device_base` in the queue's domain (for example a domain common
    /// buffer and its logical address). The records are cleared.
    pub fn with_buffer(buf: DmaBuffer, count: usize, device_base: u64) -> Result<Self, QueueError> {
        if buf.len() < count * CPL {
            return Err(QueueError::RecordsTooSmall {
                len: buf.len(),
                count,
            });
        }
        buf.fill(0, count * CPL, 0);
        Ok(CompletionRecords {
            buf,
            count,
            device_base,
        })
    }

    /// The DMA buffer holding the records (to map it into a domain).
    pub fn buffer(&self) -> &DmaBuffer {
        &self.buf
    }

    /// Sets the IOVA at which the device reaches record 0 (the buffer's mapping in the
    /// queue's domain).
    pub fn set_device_base(&mut self, iova: u64) {
        self.device_base = iova;
    }

    /// The address the device writes record `i` at: what a descriptor's completion field
    /// takes.
    pub fn device_addr(&self, i: usize) -> u64 {
        assert!(i < self.count, "completion record {i} of {}", self.count);
        self.device_base + (i * CPL) as u64
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bus address of record `i` (equal to [`CompletionRecords::device_addr`] in a
    /// pass-through domain).
    pub fn bus_addr(&self, i: usize) -> u64 {
        assert!(i < self.count, "completion record {i} of {}", self.count);
        self.buf.bus_addr() + (i * CPL) as u64
    }

    /// Zeroes record `i` (status PENDING); do this before submitting its descriptor.
    pub fn clear(&self, i: usize) {
        assert!(i < self.count, "completion record {i} of {}", self.count);
        self.buf.fill(i * CPL, CPL, 0);
    }

    /// The head word of record `i` (status, fault reason and access), which the device
    /// writes last (volatile read); [`CompletionRecord::status_of_head`] gives the status.
    pub fn status(&self, i: usize) -> u32 {
        assert!(i < self.count, "completion record {i} of {}", self.count);
        self.buf.read_u32(i * CPL)
    }

    /// Reads record `i`: the head word first, then the whole record; the status is the one
    /// read first (the rest of a completed record is in memory before it).
    pub fn read(&self, i: usize) -> CompletionRecord {
        let head = self.status(i);
        fence(Ordering::Acquire);
        let mut raw = [0u8; CPL];
        self.buf.read(i * CPL, &mut raw);
        CompletionRecord {
            status: CompletionRecord::status_of_head(head),
            ..CompletionRecord::decode(&raw)
        }
    }
}

/// Resets the device through `DEV_CTRL` and waits for the bit to clear (it reads 0: the
/// reset completes before the register write returns; the wait guards against a device
/// that does otherwise).
pub fn reset_device(backend: &dyn DmaBackend, timeout: Duration) -> Result<(), QueueError> {
    backend.write32(spec::REG_DEV_CTRL, spec::DEV_CTRL_RESET)?;
    let mut v = 0;
    poll_until(timeout, Duration::from_millis(1), || {
        v = backend.read32(spec::REG_DEV_CTRL)?;
        Ok::<_, QueueError>((v & spec::DEV_CTRL_RESET == 0).then_some(()))
    })?
    .map_err(|_| QueueError::ResetTimeout(timeout, v))
}

/// How to program a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue index.
    pub index: u32,
    /// Ring size in descriptors: a power of two in `Q_SIZE_MIN..=Q_SIZE_MAX`.
    pub size: u32,
    /// MSI-X vector for completions (`Q_MSIX_VECTOR`).
    pub vector: u16,
    /// DMA domain (`Q_DOMAIN`); every address the queue uses is an IOVA of it.
    pub domain: u32,
    /// Halt after a descriptor that faulted (`Q_CTRL_HALT_ON_FAULT`).
    pub halt_on_fault: bool,
    /// Interrupt coalescing by count (`Q_COAL_COUNT`; 0 and 1: every completion).
    pub coalesce_count: u32,
    /// Interrupt coalescing by time in microseconds (`Q_COAL_USEC`; 0: no timer).
    pub coalesce_usec: u32,
}

impl QueueConfig {
    /// Queue `index` with a ring of `size`, MSI-X `vector`, domain 0, no halting, no
    /// coalescing.
    pub fn new(index: u32, size: u32, vector: u16) -> Self {
        QueueConfig {
            index,
            size,
            vector,
            domain: 0,
            halt_on_fault: false,
            coalesce_count: 0,
            coalesce_usec: 0,
        }
    }

    /// The same, in `domain`.
    pub fn in_domain(mut self, domain: u32) -> Self {
        self.domain = domain;
        self
    }

    /// The same, halting on faults.
    pub fn halting_on_fault(mut self) -> Self {
        self.halt_on_fault = true;
        self
    }

    fn check_size(&self) -> Result<(), QueueError> {
        if !self.size.is_power_of_two()
            || !(spec::Q_SIZE_MIN..=spec::Q_SIZE_MAX).contains(&self.size)
        {
            return Err(QueueError::InvalidSize(self.size));
        }
        Ok(())
    }

    /// Bytes a ring of this size takes.
    pub fn ring_bytes(&self) -> usize {
        self.size as usize * DESC_BYTES
    }
}

/// One programmed descriptor queue.
pub struct DmaQueue<'b> {
    backend: &'b dyn DmaBackend,
    index: u32,
    ring: DmaBuffer,
    ring_iova: u64,
    size: u32,
    tail: u32,
    head_cache: u32,
    vector: u16,
    domain: u32,
}

impl std::fmt::Debug for DmaQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaQueue")
            .field("index", &self.index)
            .field("ring", &self.ring)
            .field("ring_iova", &format_args!("{:#x}", self.ring_iova))
            .field("size", &self.size)
            .field("tail", &self.tail)
            .field("vector", &self.vector)
            .field("domain", &self.domain)
            .finish()
    }
}

impl<'b> DmaQueue<'b> {
    /// Allocates a ring of `size` descriptors for queue `index`, programs it with MSI-X
    /// `vector` in domain 0 (pass-through after reset: the ring's IOVA is its bus address)
    /// and enables it. The device should be freshly reset with bus mastering on.
    pub fn new(
        backend: &'b dyn DmaBackend,
        index: u32,
        size: u32,
        vector: u16,
    ) -> Result<Self, QueueError> {
        Self::create(backend, QueueConfig::new(index, size, vector))
    }

    /// Allocates a ring and programs the queue as `cfg` says, with the ring at its bus
    /// address: right for a pass-through domain.
    pub fn create(backend: &'b dyn DmaBackend, cfg: QueueConfig) -> Result<Self, QueueError> {
        cfg.check_size()?;
        let ring = backend.alloc_dma(DmaRequest::new(cfg.ring_bytes()))?;
        let iova = ring.bus_addr();
        Self::with_ring(backend, cfg, ring, iova)
    }

    /// Programs the queue as `cfg` says with a ring the caller allocated and made
    /// reachable at `ring_iova` in the queue's domain (for a translated domain: mapped
    /// there), and enables it.
    pub fn with_ring(
        backend: &'b dyn DmaBackend,
        cfg: QueueConfig,
        ring: DmaBuffer,
        ring_iova: u64,
    ) -> Result<Self, QueueError> {
        cfg.check_size()?;
        if ring.len() < cfg.ring_bytes() {
            return Err(QueueError::RingTooSmall {
                len: ring.len(),
                size: cfg.size,
            });
        }
        ring.fill(0, cfg.ring_bytes(), 0);
        let index = cfg.index;
        let reg = |r| spec::queue_reg(index, r);
        backend.write32(reg(spec::Q_CTRL), 0)?;
        backend.write32(reg(spec::Q_BASE_LO), ring_iova as u32)?;
        backend.write32(reg(spec::Q_BASE_HI), (ring_iova >> 32) as u32)?;
        backend.write32(reg(spec::Q_SIZE), cfg.size)?;
        backend.write32(reg(spec::Q_DOMAIN), cfg.domain)?;
        backend.write32(reg(spec::Q_MSIX_VECTOR), u32::from(cfg.vector))?;
        backend.write32(reg(spec::Q_COAL_COUNT), cfg.coalesce_count)?;
        backend.write32(reg(spec::Q_COAL_USEC), cfg.coalesce_usec)?;
        let halt = if cfg.halt_on_fault {
            spec::Q_CTRL_HALT_ON_FAULT
        } else {
            0
        };
        backend.write32(reg(spec::Q_CTRL), spec::Q_CTRL_ENABLE | halt)?;
        let status = backend.read32(reg(spec::Q_STATUS))?;
        if status & spec::Q_STATUS_ENABLED == 0 || status & spec::Q_STATUS_ERROR != 0 {
            return Err(QueueError::EnableFailed {
                queue: index,
                status,
            });
        }
        let head = backend.read32(reg(spec::Q_HEAD))?;
        Ok(DmaQueue {
            backend,
            index,
            ring,
            ring_iova,
            size: cfg.size,
            tail: head,
            head_cache: head,
            vector: cfg.vector,
            domain: cfg.domain,
        })
    }

    fn reg(&self, r: u64) -> u64 {
        spec::queue_reg(self.index, r)
    }

    /// Queue index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Ring size in descriptors.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The MSI-X vector programmed for the queue.
    pub fn vector(&self) -> u16 {
        self.vector
    }

    /// Bus address of the ring.
    pub fn ring_bus_addr(&self) -> u64 {
        self.ring.bus_addr()
    }

    /// IOVA of the ring in the queue's domain (`Q_BASE`).
    pub fn ring_iova(&self) -> u64 {
        self.ring_iova
    }

    /// The queue's domain.
    pub fn domain(&self) -> u32 {
        self.domain
    }

    /// `Q_HALT_REASON` (`spec::HALT_*`).
    pub fn halt_reason(&self) -> Result<u32, QueueError> {
        Ok(self.backend.read32(self.reg(spec::Q_HALT_REASON))?)
    }

    /// Restarts a queue halted by a fault (`Q_CTRL_RESUME`), keeping the other control
    /// bits.
    pub fn resume(&self) -> Result<(), QueueError> {
        let ctrl = self.backend.read32(self.reg(spec::Q_CTRL))?;
        let keep = ctrl & (spec::Q_CTRL_ENABLE | spec::Q_CTRL_HALT_ON_FAULT);
        self.backend
            .write32(self.reg(spec::Q_CTRL), keep | spec::Q_CTRL_RESUME)?;
        Ok(())
    }

    /// The driver's tail: the ring index the next descriptor goes to.
    pub fn tail(&self) -> u32 {
        self.tail
    }

    /// Reads `Q_HEAD`.
    pub fn head(&self) -> Result<u32, QueueError> {
        Ok(self.backend.read32(self.reg(spec::Q_HEAD))?)
    }

    /// Reads `Q_STATUS`.
    pub fn status(&self) -> Result<u32, QueueError> {
        Ok(self.backend.read32(self.reg(spec::Q_STATUS))?)
    }

    /// Reads a queue register (`spec::Q_*`).
    pub fn read_reg(&self, r: u64) -> Result<u32, QueueError> {
        Ok(self.backend.read32(self.reg(r))?)
    }

    fn outstanding(&self, head: u32) -> u32 {
        self.tail.wrapping_sub(head) & (self.size - 1)
    }

    /// Writes a descriptor's raw bytes into the next ring entry without ringing the
    /// doorbell. Fails with [`QueueError::Full`] when `size - 1` entries are outstanding.
    pub fn push_raw(&mut self, bytes: &[u8; DESC_BYTES]) -> Result<(), QueueError> {
        if self.outstanding(self.head_cache) >= self.size - 1 {
            self.head_cache = self.head()?;
            let outstanding = self.outstanding(self.head_cache);
            if outstanding >= self.size - 1 {
                return Err(QueueError::Full {
                    size: self.size,
                    outstanding,
                });
            }
        }
        self.ring.write(self.tail as usize * DESC_BYTES, bytes);
        self.tail = (self.tail + 1) & (self.size - 1);
        Ok(())
    }

    /// Writes a descriptor into the next ring entry without ringing the doorbell.
    pub fn push(&mut self, desc: &Descriptor) -> Result<(), QueueError> {
        self.push_raw(&desc.encode())
    }

    /// Publishes the pushed descriptors: writes the tail to `Q_TAIL`.
    pub fn doorbell(&mut self) -> Result<(), QueueError> {
        // Descriptors must be in memory before the device sees the new tail.
        fence(Ordering::SeqCst);
        self.backend.write32(self.reg(spec::Q_TAIL), self.tail)?;
        Ok(())
    }

    /// Pushes `descs` and rings the doorbell once.
    pub fn submit(&mut self, descs: &[Descriptor]) -> Result<(), QueueError> {
        for d in descs {
            self.push(d)?;
        }
        self.doorbell()
    }

    fn timeout(&self, what: String, waited: Duration) -> QueueError {
        QueueError::Timeout {
            what,
            waited,
            queue: self.index,
            head: self.head().unwrap_or(u32::MAX),
            tail: self.tail,
            status: self.status().unwrap_or(u32::MAX),
        }
    }

    /// Polls completion record `i` until its status is not PENDING, for at most `timeout`.
    pub fn wait_completion(
        &self,
        records: &CompletionRecords,
        i: usize,
        timeout: Duration,
    ) -> Result<CompletionRecord, QueueError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if CompletionRecord::status_of_head(records.status(i)) != spec::STATUS_PENDING {
                return Ok(records.read(i));
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(self.timeout(format!("completion record {i}"), waited));
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                let nap = Duration::from_micros(u64::from(spins.min(1000)));
                std::thread::sleep(nap.min(timeout.saturating_sub(waited)));
            }
        }
    }

    /// Waits for the queue's MSI-X vector, then reads completion record `i`. Fails with a
    /// timeout if no interrupt arrives; the record may still be pending if the device
    /// signalled before writing it (a device bug worth seeing).
    pub fn wait_completion_irq(
        &self,
        records: &CompletionRecords,
        i: usize,
        timeout: Duration,
    ) -> Result<CompletionRecord, QueueError> {
        let start = Instant::now();
        if self.backend.wait_interrupt(self.vector, timeout)? == 0 {
            return Err(self.timeout(format!("MSI-X vector {}", self.vector), start.elapsed()));
        }
        Ok(records.read(i))
    }

    /// Waits until the device has consumed everything up to the tail (`Q_HEAD == tail`).
    pub fn wait_idle(&mut self, timeout: Duration) -> Result<(), QueueError> {
        let drained = poll_until(timeout, Duration::from_micros(200), || {
            self.head().map(|head| (head == self.tail).then_some(head))
        })?;
        match drained {
            Ok(head) => {
                self.head_cache = head;
                Ok(())
            }
            Err(waited) => Err(self.timeout("the queue to drain".into(), waited)),
        }
    }

    /// Disables the queue (`Q_CTRL = 0`).
    pub fn disable(&self) -> Result<(), QueueError> {
        self.backend.write32(self.reg(spec::Q_CTRL), 0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names() {
        assert_eq!(status_name(spec::STATUS_DMA_ERROR), "DMA_ERROR");
        assert_eq!(status_name(0x77), "unknown");
    }
}
