//! PCI configuration space of the device: a type-0 header, two memory BARs and the MSI-X
//! capability.
//!
//! Writes are filtered through a per-byte write mask, so read-only fields stay read-only
//! whatever the guest writes; BAR sizing (write all ones, read back the size mask) works as on
//! hardware.

use crate::spec;

/// Size of the configuration space (conventional PCI).
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Offset of the command register.
pub const PCI_COMMAND: usize = 0x04;
/// Command register bit: memory space decoding enabled.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register bit: bus mastering (DMA) enabled.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command register bit: INTx emulation disabled.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Offset of the status register.
pub const PCI_STATUS: usize = 0x06;
/// Status register bit: the capability list is valid.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// Offset of the first BAR.
pub const PCI_BAR0: usize = 0x10;
/// Offset of the capability pointer.
pub const PCI_CAPABILITY_LIST: usize = 0x34;
/// MSI-X capability ID.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// MSI-X message control bit: MSI-X enabled.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// MSI-X message control bit: all vectors masked.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;

/// The configuration space: contents plus a write mask.
#[derive(Clone)]
pub struct ConfigSpace {
    data: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("command", &self.command())
            .finish_non_exhaustive()
    }
}

impl ConfigSpace {
    /// Build the configuration space in its reset state.
    pub fn new(bar_sizes: &[u64; 6], msix_vectors: u16) -> Self {
        let mut c = Self {
            data: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
        };
        c.set16(0x00, spec::PCI_VENDOR_ID);
        c.set16(0x02, spec::PCI_DEVICE_ID);
        c.set16(PCI_STATUS, PCI_STATUS_CAP_LIST);
        c.data[0x08] = spec::PCI_REVISION_ID;
        c.set_bytes(0x09, &spec::PCI_CLASS_CODE.to_le_bytes()[..3]);
        c.set16(0x2c, spec::PCI_SUBSYSTEM_VENDOR_ID);
        c.set16(0x2e, spec::PCI_SUBSYSTEM_ID);
        c.data[PCI_CAPABILITY_LIST] = spec::PCI_MSIX_CAP_OFFSET;
        // Command: memory space, bus master, INTx disable are writable.
        let cmd_mask = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
        c.wmask[PCI_COMMAND..PCI_COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        // Cache line size and latency timer, interrupt line: plain read/write scratch.
        c.wmask[0x0c] = 0xff;
        c.wmask[0x0d] = 0xff;
        c.wmask[0x3c] = 0xff;
        // BARs: 32-bit non-prefetchable memory; writable bits are the address bits.
        for (i, &size) in bar_sizes.iter().enumerate() {
            if size == 0 {
                continue;
            }
            debug_assert!(size.is_power_of_two() && (16..=1 << 31).contains(&size));
            let mask = !(size as u32 - 1) & !0xf;
            let off = PCI_BAR0 + i * 4;
            c.wmask[off..off + 4].copy_from_slice(&mask.to_le_bytes());
        }
        // MSI-X capability.
        let cap = spec::PCI_MSIX_CAP_OFFSET as usize;
        c.data[cap] = PCI_CAP_ID_MSIX;
        c.data[cap + 1] = 0; // end of list
        c.set16(cap + 2, msix_vectors.saturating_sub(1) & 0x7ff);
        let ctrl_mask = MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK;
        c.wmask[cap + 2..cap + 4].copy_from_slice(&ctrl_mask.to_le_bytes());
        let bir = spec::MSIX_BAR as u32;
        c.set32(cap + 4, spec::MSIX_TABLE_OFFSET as u32 | bir);
        c.set32(cap + 8, spec::MSIX_PBA_OFFSET as u32 | bir);
        c
    }

    /// Read `data.len()` bytes at `offset`; bytes beyond the end read as 0xff.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.data.get(o))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// Write `data` at `offset` through the write mask; bytes beyond the end are dropped.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                return;
            };
            if o >= CONFIG_SPACE_SIZE {
                return;
            }
            let m = self.wmask[o];
            self.data[o] = (self.data[o] & !m) | (b & m);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.data[PCI_COMMAND], self.data[PCI_COMMAND + 1]])
    }

    /// Whether bus mastering (DMA) is enabled.
    pub fn bus_master(&self) -> bool {
        self.command() & PCI_COMMAND_MASTER != 0
    }

    fn set_bytes(&mut self, off: usize, b: &[u8]) {
        self.data[off..off + b.len()].copy_from_slice(b);
    }
    fn set16(&mut self, off: usize, v: u16) {
        self.set_bytes(off, &v.to_le_bytes());
    }
    fn set32(&mut self, off: usize, v: u32) {
        self.set_bytes(off, &v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MSI-X vectors of the default configuration: one per queue and one for the fault log.
    const VECTORS: u16 = spec::DEFAULT_QUEUES as u16 + 1;

    fn cfg() -> ConfigSpace {
        let mut bars = [0; 6];
        bars[0] = spec::REGS_BAR_SIZE;
        bars[2] = spec::MSIX_BAR_SIZE;
        ConfigSpace::new(&bars, VECTORS)
    }

    fn read32(c: &ConfigSpace, off: u64) -> u32 {
        let mut b = [0; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity() {
        let c = cfg();
        assert_eq!(
            read32(&c, 0),
            u32::from(spec::PCI_DEVICE_ID) << 16 | u32::from(spec::PCI_VENDOR_ID)
        );
        assert_eq!(read32(&c, 8) >> 8, spec::PCI_CLASS_CODE);
    }

    #[test]
    fn read_only_fields_ignore_writes() {
        let mut c = cfg();
        c.write(0, &[0; 4]);
        assert_eq!(read32(&c, 0) & 0xffff, u32::from(spec::PCI_VENDOR_ID));
        c.write(0x34, &[0x99]);
        assert_eq!(
            read32(&c, 0x34) & 0xff,
            u32::from(spec::PCI_MSIX_CAP_OFFSET)
        );
    }

    #[test]
    fn bar_sizing() {
        let mut c = cfg();
        c.write(0x10, &[0xff; 4]);
        assert_eq!(read32(&c, 0x10), !(spec::REGS_BAR_SIZE as u32 - 1));
        c.write(0x14, &[0xff; 4]);
        assert_eq!(read32(&c, 0x14), 0, "BAR1 is not implemented");
    }

    #[test]
    fn bus_master_bit() {
        let mut c = cfg();
        assert!(!c.bus_master());
        c.write(PCI_COMMAND as u64, &PCI_COMMAND_MASTER.to_le_bytes());
        assert!(c.bus_master());
    }

    #[test]
    fn msix_capability() {
        let c = cfg();
        let cap = u64::from(spec::PCI_MSIX_CAP_OFFSET);
        let hdr = read32(&c, cap);
        assert_eq!(hdr & 0xff, u32::from(PCI_CAP_ID_MSIX));
        assert_eq!((hdr >> 16) & 0x7ff, u32::from(VECTORS - 1));
        assert_eq!(read32(&c, cap + 4), spec::MSIX_BAR as u32);
        assert_eq!(
            read32(&c, cap + 8),
            spec::MSIX_PBA_OFFSET as u32 | spec::MSIX_BAR as u32
        );
    }

    #[test]
    fn out_of_range_is_harmless() {
        let mut c = cfg();
        let mut b = [0; 4];
        c.read(254, &mut b);
        assert_eq!(b[2..], [0xff, 0xff]);
        c.write(u64::MAX, &[1, 2, 3]);
        c.write(255, &[1, 2, 3]);
    }
}
