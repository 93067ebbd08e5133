//! What the device advertises (the capability registers), and its statistics window.
//!
//! A driver reads these instead of assuming: the number of queues, domains and MSI-X
//! vectors, the IOVA width (48, or 32 in the server's 32-bit mode), the supported
//! operations and page sizes, the IOTLB size and the largest fault log
//! (device/SPEC.md, "Global registers").

use domdma_device::spec;

use crate::backend::{DmaBackend, Result};
use crate::iopt::PageSize;

/// The capability registers, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `REG_VERSION`: major in 31:16, minor in 15:0.
    pub version: u32,
    /// Descriptor queues.
    pub queues: u32,
    /// MSI-X vectors (queues + 1: the last is the fault log's by default).
    pub vectors: u32,
    /// IOVA width in bits.
    pub iova_width: u32,
    /// DMA domains.
    pub domains: u32,
    /// Bitmap of supported opcodes (`REG_CAP_OPS`).
    pub ops: u32,
    /// Largest transfer of one descriptor (`REG_MAX_XFER`).
    pub max_xfer: u32,
    /// Supported page sizes (`REG_CAP_PGSIZES`, `PGSIZE_*`).
    pub page_sizes: u32,
    /// IOTLB entries.
    pub iotlb_entries: u32,
    /// Largest fault log, in records.
    pub fault_log_max: u32,
    /// Strict IOTLB mode is on (`DEV_STATUS_STRICT_IOTLB`).
    pub strict_iotlb: bool,
}

impl Capabilities {
    /// Reads the capability registers.
    pub fn read(dev: &dyn DmaBackend) -> Result<Self> {
        let cap = dev.read32(spec::REG_CAP)?;
        let field = |shift: u32| (cap >> shift) & 0xff;
        Ok(Capabilities {
            version: dev.read32(spec::REG_VERSION)?,
            queues: field(spec::CAP_QUEUES_SHIFT),
            vectors: field(spec::CAP_VECTORS_SHIFT),
            iova_width: field(spec::CAP_IOVA_WIDTH_SHIFT),
            domains: field(spec::CAP_DOMAINS_SHIFT),
            ops: dev.read32(spec::REG_CAP_OPS)?,
            max_xfer: dev.read32(spec::REG_MAX_XFER)?,
            page_sizes: dev.read32(spec::REG_CAP_PGSIZES)?,
            iotlb_entries: dev.read32(spec::REG_CAP_IOTLB)?,
            fault_log_max: dev.read32(spec::REG_CAP_FAULT_LOG)?,
            strict_iotlb: dev.read32(spec::REG_DEV_STATUS)? & spec::DEV_STATUS_STRICT_IOTLB != 0,
        })
    }

    /// Whether opcode `op` is supported.
    pub fn supports_op(&self, op: u8) -> bool {
        op < 32 && self.ops & (1 << op) != 0
    }

    /// Whether pages of `size` can be mapped.
    pub fn supports_page(&self, size: PageSize) -> bool {
        self.page_sizes & size.cap_bit() != 0
    }

    /// The largest supported page size.
    pub fn largest_page(&self) -> PageSize {
        PageSize::ALL
            .iter()
            .rev()
            .copied()
            .find(|p| self.supports_page(*p))
            .unwrap_or(PageSize::Size4K)
    }

    /// One past the last IOVA the device accepts (2^width).
    pub fn iova_limit(&self) -> u64 {
        1u64.checked_shl(self.iova_width).unwrap_or(u64::MAX)
    }

    /// The fault log's default vector: the last one.
    pub fn fault_vector(&self) -> u16 {
        self.vectors.saturating_sub(1) as u16
    }
}

/// Which statistics counter to read through `REG_STAT_SELECT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// A queue counter (`QSTAT_*`) of queue `index`.
    Queue {
        /// Queue index.
        index: u32,
        /// `spec::QSTAT_*`.
        counter: u32,
    },
    /// A domain counter (`DSTAT_*`) of domain `index`.
    Domain {
        /// Domain index.
        index: u32,
        /// `spec::DSTAT_*`.
        counter: u32,
    },
}

impl Stat {
    /// The `REG_STAT_SELECT` value.
    pub fn select(self) -> u32 {
        let (kind, index, counter) = match self {
            Stat::Queue { index, counter } => (spec::STAT_KIND_QUEUE, index, counter),
            Stat::Domain { index, counter } => (spec::STAT_KIND_DOMAIN, index, counter),
        };
        kind << 24 | (counter & 0xff) << 16 | (index & 0xffff)
    }
}

/// Latches and reads one 64-bit counter through the statistics window.
///
/// The window is one latch shared by every user of the device: callers that may race
/// (several threads) must serialise reads themselves.
pub fn read_stat(dev: &dyn DmaBackend, stat: Stat) -> Result<u64> {
    dev.write32(spec::REG_STAT_SELECT, stat.select())?;
    let lo = dev.read32(spec::REG_STAT_VALUE_LO)?;
    let hi = dev.read32(spec::REG_STAT_VALUE_HI)?;
    Ok(u64::from(hi) << 32 | u64::from(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_selection_layout() {
        assert_eq!(
            Stat::Domain {
                index: 3,
                counter: spec::DSTAT_PAGE_WALKS
            }
            .select(),
            1 << 24 | 3 << 16 | 3
        );
        assert_eq!(
            Stat::Queue {
                index: 0x1f,
                counter: spec::QSTAT_BYTES
            }
            .select(),
            1 << 16 | 0x1f
        );
    }
}
