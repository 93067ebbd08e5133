//! The device's fault log: a ring of 32-byte fault records in DMA memory at a bus address
//! (device/SPEC.md "Fault log registers", "Faults").
//!
//! The device writes a record at `REG_FLOG_HEAD` and advances it, then raises the fault
//! vector (`REG_FLOG_MSIX_VECTOR`); the driver reads records from its tail up to the head
//! and writes the new tail to `REG_FLOG_TAIL`. When the ring is full (head + 1 == tail)
//! faults are dropped: `FLOG_STATUS_OVERFLOW` and `REG_FLOG_DROPPED` say so.

use std::fmt;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use domdma_device::spec;

use crate::backend::{BackendError, DmaBackend, DmaBuffer, DmaRequest};
use crate::poll::poll_until;

/// Errors of the fault log driver.
#[derive(Debug, thiserror::Error)]
pub enum FaultLogError {
    /// The back end failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The size is not a power of two in 2..=`REG_CAP_FAULT_LOG`.
    #[error("invalid fault log size {size} (a power of two in 2..={max})")]
    InvalidSize {
        /// The size asked for.
        size: u32,
        /// The device's largest.
        max: u32,
    },
    /// The device did not enable the log.
    #[error("the fault log did not come up: FLOG_CTRL {ctrl:#x}, FLOG_STATUS {status:#x}")]
    EnableFailed {
        /// `REG_FLOG_CTRL` after enabling.
        ctrl: u32,
        /// `REG_FLOG_STATUS` after enabling.
        status: u32,
    },
    /// The head register reads an index outside the ring.
    #[error("REG_FLOG_HEAD {head} is outside the ring of {size}")]
    BadHead {
        /// The head read.
        head: u32,
        /// Ring size.
        size: u32,
    },
    /// No record arrived in time.
    #[error(
        "no fault record within {waited:?} (head {head}, tail {tail}, FLOG_STATUS {status:#x}, \
         FLOG_COUNT {count})"
    )]
    Timeout {
        /// How long.
        waited: Duration,
        /// `REG_FLOG_HEAD`.
        head: u32,
        /// The driver's tail.
        tail: u32,
        /// `REG_FLOG_STATUS`.
        status: u32,
        /// `REG_FLOG_COUNT`.
        count: u32,
    },
}

pub use domdma_device::spec::{access_names, fault_reason_name, FaultRecord};

const REC: usize = std::mem::size_of::<FaultRecord>();

/// An enabled fault log.
///
/// Dropping it disables the log before its ring's memory goes.
pub struct FaultLog<'b> {
    dev: &'b dyn DmaBackend,
    ring: DmaBuffer,
    size: u32,
    tail: u32,
    vector: u16,
}

impl fmt::Debug for FaultLog<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultLog")
            .field("ring", &self.ring)
            .field("size", &self.size)
            .field("tail", &self.tail)
            .field("vector", &self.vector)
            .finish()
    }
}

impl<'b> FaultLog<'b> {
    /// Allocates a ring of `size` records (a power of two, at least 2, at most
    /// `REG_CAP_FAULT_LOG`), programs it with MSI-X `vector` and enables it.
    pub fn enable(dev: &'b dyn DmaBackend, size: u32, vector: u16) -> Result<Self, FaultLogError> {
        let max = dev.read32(spec::REG_CAP_FAULT_LOG)?;
        if !size.is_power_of_two() || size < 2 || size > max {
            return Err(FaultLogError::InvalidSize { size, max });
        }
        let ring = dev.alloc_dma(DmaRequest::new(size as usize * REC))?;
        let base = ring.bus_addr();
        dev.write32(spec::REG_FLOG_CTRL, 0)?;
        dev.write32(spec::REG_FLOG_BASE_LO, base as u32)?;
        dev.write32(spec::REG_FLOG_BASE_HI, (base >> 32) as u32)?;
        dev.write32(spec::REG_FLOG_SIZE, size)?;
        dev.write32(spec::REG_FLOG_MSIX_VECTOR, u32::from(vector))?;
        dev.write32(
            spec::REG_FLOG_STATUS,
            spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_ERROR,
        )?;
        dev.write32(spec::REG_FLOG_CTRL, spec::FLOG_CTRL_ENABLE)?;
        let ctrl = dev.read32(spec::REG_FLOG_CTRL)?;
        let status = dev.read32(spec::REG_FLOG_STATUS)?;
        if ctrl & spec::FLOG_CTRL_ENABLE == 0 || status & spec::FLOG_STATUS_ERROR != 0 {
            return Err(FaultLogError::EnableFailed { ctrl, status });
        }
        // Start reading wherever the device writes next.
        let head = dev.read32(spec::REG_FLOG_HEAD)?;
        if head >= size {
            return Err(FaultLogError::BadHead { head, size });
        }
        dev.write32(spec::REG_FLOG_TAIL, head)?;
        Ok(FaultLog {
            dev,
            ring,
            size,
            tail: head,
            vector,
        })
    }

    /// Ring size in records.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The fault vector programmed.
    pub fn vector(&self) -> u16 {
        self.vector
    }

    /// Bus address of the ring.
    pub fn ring_bus_addr(&self) -> u64 {
        self.ring.bus_addr()
    }

    /// `REG_FLOG_HEAD`.
    pub fn head(&self) -> Result<u32, FaultLogError> {
        let head = self.dev.read32(spec::REG_FLOG_HEAD)?;
        if head >= self.size {
            return Err(FaultLogError::BadHead {
                head,
                size: self.size,
            });
        }
        Ok(head)
    }

    /// `REG_FLOG_STATUS`.
    pub fn status(&self) -> Result<u32, FaultLogError> {
        Ok(self.dev.read32(spec::REG_FLOG_STATUS)?)
    }

    /// Clears status bits (write 1 to clear: `FLOG_STATUS_OVERFLOW`, `FLOG_STATUS_ERROR`).
    pub fn clear_status(&self, bits: u32) -> Result<(), FaultLogError> {
        self.dev.write32(spec::REG_FLOG_STATUS, bits)?;
        Ok(())
    }

    /// `REG_FLOG_COUNT`: faults detected since reset.
    pub fn count(&self) -> Result<u32, FaultLogError> {
        Ok(self.dev.read32(spec::REG_FLOG_COUNT)?)
    }

    /// `REG_FLOG_DROPPED`: faults not logged since reset.
    pub fn dropped(&self) -> Result<u32, FaultLogError> {
        Ok(self.dev.read32(spec::REG_FLOG_DROPPED)?)
    }

    /// Records waiting to be read.
    pub fn pending(&self) -> Result<u32, FaultLogError> {
        Ok(self.head()?.wrapping_sub(self.tail) & (self.size - 1))
    }

    /// Reads the next record, if any, and hands its slot back to the device.
    pub fn pop(&mut self) -> Result<Option<FaultRecord>, FaultLogError> {
        let head = self.head()?;
        if head == self.tail {
            return Ok(None);
        }
        // The record is complete once the head has moved past it.
        fence(Ordering::Acquire);
        let mut b = [0u8; REC];
        self.ring.read(self.tail as usize * REC, &mut b);
        self.tail = (self.tail + 1) & (self.size - 1);
        self.dev.write32(spec::REG_FLOG_TAIL, self.tail)?;
        Ok(Some(FaultRecord::decode(&b)))
    }

    /// Reads every waiting record.
    pub fn drain(&mut self) -> Result<Vec<FaultRecord>, FaultLogError> {
        let mut v = Vec::new();
        while let Some(r) = self.pop()? {
            v.push(r);
        }
        Ok(v)
    }

    /// Polls for the next record for at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<FaultRecord, FaultLogError> {
        poll_until(timeout, Duration::from_micros(200), || self.pop())?.map_err(|waited| {
            FaultLogError::Timeout {
                waited,
                head: self.head().unwrap_or(u32::MAX),
                tail: self.tail,
                status: self.status().unwrap_or(u32::MAX),
                count: self.count().unwrap_or(u32::MAX),
            }
        })
    }

    /// Disables the log (`REG_FLOG_CTRL` = 0).
    pub fn disable(&self) -> Result<(), FaultLogError> {
        self.dev.write32(spec::REG_FLOG_CTRL, 0)?;
        Ok(())
    }
}

impl Drop for FaultLog<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.disable() {
            tracing::warn!("disabling the fault log on drop: {e}");
        }
    }
}
