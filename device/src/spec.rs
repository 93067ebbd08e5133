//! The device's programming interface: PCI identity, BAR map, register offsets and bits,
//! descriptor and completion layouts.
//!
//! Every constant here is documented in `device/SPEC.md`; the test `spec_doc_matches_code`
//! checks that the two agree. Drivers (the driver model, the guest tests) use these constants
//! rather than literals.

/// PCI vendor ID (the QEMU project's test vendor ID, as QEMU's `edu` device uses).
pub const PCI_VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const PCI_DEVICE_ID: u16 = 0xdd0a;
/// PCI subsystem vendor ID.
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1234;
/// PCI subsystem ID.
pub const PCI_SUBSYSTEM_ID: u16 = 0x0001;
/// PCI revision ID.
pub const PCI_REVISION_ID: u8 = 0x01;
/// PCI class code (base 0x08 system peripheral, sub-class 0x80 other, prog-if 0).
pub const PCI_CLASS_CODE: u32 = 0x08_80_00;

/// BAR holding the device registers.
pub const REGS_BAR: usize = 0;
/// Size of the register BAR in bytes.
pub const REGS_BAR_SIZE: u64 = 0x4000;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 2;
/// Size of the MSI-X BAR in bytes.
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Offset of the MSI-X table inside [`MSIX_BAR`].
pub const MSIX_TABLE_OFFSET: u64 = 0x000;
/// Offset of the MSI-X pending bit array inside [`MSIX_BAR`].
pub const MSIX_PBA_OFFSET: u64 = 0x800;
/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u16 = 4;
/// Offset of the MSI-X capability in configuration space.
pub const PCI_MSIX_CAP_OFFSET: u8 = 0x40;

/// Device magic value read from [`REG_ID`]: the bytes "DDMA" in memory order.
pub const DEVICE_ID_MAGIC: u32 = 0x414d_4444;
/// Register interface version read from [`REG_VERSION`]: major in bits 31:16, minor in 15:0.
pub const DEVICE_VERSION: u32 = 0x0000_0001;

// ---- Global registers (BAR0, 32-bit, little endian) ----

/// RO: device magic, [`DEVICE_ID_MAGIC`].
pub const REG_ID: u64 = 0x000;
/// RO: register interface version, [`DEVICE_VERSION`].
pub const REG_VERSION: u64 = 0x004;
/// RO: capabilities: number of queues (7:0), MSI-X vectors (15:8), IOVA width in bits (23:16).
pub const REG_CAP: u64 = 0x008;
/// RO: bitmap of supported opcodes (bit n set: opcode n supported).
pub const REG_CAP_OPS: u64 = 0x00c;
/// RO: maximum transfer length of one descriptor, in bytes.
pub const REG_MAX_XFER: u64 = 0x010;
/// RW: scratch register, free for the driver; reset value 0.
pub const REG_SCRATCH: u64 = 0x014;
/// RW: device control; see `DEV_CTRL_*`.
pub const REG_DEV_CTRL: u64 = 0x018;
/// RO: device status; see `DEV_STATUS_*`.
pub const REG_DEV_STATUS: u64 = 0x01c;

/// [`REG_DEV_CTRL`] bit: write 1 to reset the device (self-clearing, reads 0).
pub const DEV_CTRL_RESET: u32 = 1 << 0;
/// [`REG_DEV_STATUS`] bit: bus mastering is enabled in the PCI command register.
pub const DEV_STATUS_BUS_MASTER: u32 = 1 << 0;

/// Shift of the queue count in [`REG_CAP`].
pub const CAP_QUEUES_SHIFT: u32 = 0;
/// Shift of the MSI-X vector count in [`REG_CAP`].
pub const CAP_VECTORS_SHIFT: u32 = 8;
/// Shift of the IOVA width in [`REG_CAP`].
pub const CAP_IOVA_WIDTH_SHIFT: u32 = 16;

/// Number of descriptor queues.
pub const NUM_QUEUES: u32 = 1;
/// IOVA width of the pass-through domain, in bits.
pub const IOVA_WIDTH: u32 = 48;
/// Maximum transfer length of one descriptor ([`REG_MAX_XFER`]).
pub const MAX_XFER: u32 = 64 << 20;

// ---- Queue registers: block of QUEUE_STRIDE bytes per queue at QUEUE_BASE ----

/// Offset of queue 0's register block in BAR0.
pub const QUEUE_BASE: u64 = 0x1000;
/// Distance between two queues' register blocks.
pub const QUEUE_STRIDE: u64 = 0x80;
/// RW: ring base address, low 32 bits (64-byte aligned).
pub const Q_BASE_LO: u64 = 0x00;
/// RW: ring base address, high 32 bits.
pub const Q_BASE_HI: u64 = 0x04;
/// RW: ring size in descriptors, a power of two in [`Q_SIZE_MIN`, `Q_SIZE_MAX`].
pub const Q_SIZE: u64 = 0x08;
/// RW: queue control; see `Q_CTRL_*`.
pub const Q_CTRL: u64 = 0x0c;
/// RO: index of the next descriptor the device will process.
pub const Q_HEAD: u64 = 0x10;
/// RW: doorbell: index one past the last descriptor the driver has written.
pub const Q_TAIL: u64 = 0x14;
/// RO: queue status; see `Q_STATUS_*`.
pub const Q_STATUS: u64 = 0x18;
/// RW: MSI-X vector raised on completions of this queue.
pub const Q_MSIX_VECTOR: u64 = 0x1c;
/// RO: number of descriptors completed (wraps at 2^32).
pub const Q_COMPLETED: u64 = 0x20;
/// RO: number of descriptors completed with an error status (wraps at 2^32).
pub const Q_ERRORS: u64 = 0x24;

/// [`Q_CTRL`] bit: queue enabled. Base and size must be valid when it is set.
pub const Q_CTRL_ENABLE: u32 = 1 << 0;
/// [`Q_STATUS`] bit: the queue is enabled and accepts doorbells.
pub const Q_STATUS_ENABLED: u32 = 1 << 0;
/// [`Q_STATUS`] bit: the queue stopped on an error (bad configuration or an unreadable
/// descriptor); disable and re-enable it to restart.
pub const Q_STATUS_ERROR: u32 = 1 << 1;
/// Smallest ring size.
pub const Q_SIZE_MIN: u32 = 2;
/// Largest ring size.
pub const Q_SIZE_MAX: u32 = 4096;

// ---- Descriptors ----

/// Size of one descriptor in bytes.
pub const DESC_SIZE: u64 = 64;
/// Byte offset of the opcode (u8).
pub const DESC_OPCODE: u64 = 0x00;
/// Byte offset of the flags (u8).
pub const DESC_FLAGS: u64 = 0x01;
/// Byte offset of the reserved u16 after the flags (must be zero).
pub const DESC_RESERVED_LO: u64 = 0x02;
/// Byte offset of the transfer length (u32).
pub const DESC_LEN: u64 = 0x04;
/// Byte offset of the source address (COPY) or 64-bit pattern (FILL) (u64).
pub const DESC_SRC: u64 = 0x08;
/// Byte offset of the destination address (u64).
pub const DESC_DST: u64 = 0x10;
/// Byte offset of the completion record address (u64, 32-byte aligned, 0 = none).
pub const DESC_COMPLETION: u64 = 0x18;
/// Byte offset of the driver's tag, echoed in the completion (u64).
pub const DESC_TAG: u64 = 0x20;
/// First reserved byte; bytes from here to [`DESC_SIZE`] must be zero.
pub const DESC_RESERVED: u64 = 0x28;

/// Opcode: no operation (length must be 0).
pub const OP_NOP: u8 = 0;
/// Opcode: copy `len` bytes from `src` to `dst`.
pub const OP_COPY: u8 = 1;
/// Opcode: fill `len` bytes at `dst` with the 64-bit little-endian pattern in `src`.
pub const OP_FILL: u8 = 2;

/// Descriptor flag: raise the queue's MSI-X vector when this descriptor completes.
pub const DESC_FLAG_INTERRUPT: u8 = 1 << 0;
/// All defined descriptor flags.
pub const DESC_FLAGS_VALID: u8 = DESC_FLAG_INTERRUPT;

// ---- Completion records ----

/// Size of a completion record in bytes (and its required alignment).
pub const COMPLETION_SIZE: u64 = 32;
/// Byte offset of the status (u32), written last.
pub const CPL_STATUS: u64 = 0x00;
/// Byte offset of the number of bytes completed (u32).
pub const CPL_BYTES: u64 = 0x04;
/// Byte offset of the faulting device address (u64, 0 if none).
pub const CPL_FAULT_ADDR: u64 = 0x08;
/// Byte offset of the operation result (u64, 0 for COPY and FILL).
pub const CPL_RESULT: u64 = 0x10;
/// Byte offset of the descriptor's tag (u64).
pub const CPL_TAG: u64 = 0x18;

/// Completion status: not yet completed (the driver writes it before submitting).
pub const STATUS_PENDING: u32 = 0;
/// Completion status: success.
pub const STATUS_OK: u32 = 1;
/// Completion status: malformed descriptor (bad opcode, flags, length or reserved bytes).
pub const STATUS_INVALID_DESCRIPTOR: u32 = 0x10;
/// Completion status: a source or destination address is not mapped for the device.
pub const STATUS_DMA_ERROR: u32 = 0x11;
/// Completion status: the device was reset while the descriptor was in flight.
pub const STATUS_ABORTED: u32 = 0x12;

/// Offset of queue `q`'s register `reg` in BAR0.
pub const fn queue_reg(q: u32, reg: u64) -> u64 {
    QUEUE_BASE + q as u64 * QUEUE_STRIDE + reg
}

#[cfg(test)]
mod doc {
    //! Keeps `device/SPEC.md` and this module in step.

    use std::collections::BTreeSet;

    use super::*;

    /// Every public constant of this module with its value.
    macro_rules! constants {
        ($($name:ident),* $(,)?) => {
            &[$((stringify!($name), $name as u64)),*]
        };
    }

    const CONSTANTS: &[(&str, u64)] = constants![
        PCI_VENDOR_ID,
        PCI_DEVICE_ID,
        PCI_SUBSYSTEM_VENDOR_ID,
        PCI_SUBSYSTEM_ID,
        PCI_REVISION_ID,
        PCI_CLASS_CODE,
        REGS_BAR,
        REGS_BAR_SIZE,
        MSIX_BAR,
        MSIX_BAR_SIZE,
        MSIX_TABLE_OFFSET,
        MSIX_PBA_OFFSET,
        MSIX_VECTORS,
        PCI_MSIX_CAP_OFFSET,
        DEVICE_ID_MAGIC,
        DEVICE_VERSION,
        REG_ID,
        REG_VERSION,
        REG_CAP,
        REG_CAP_OPS,
        REG_MAX_XFER,
        REG_SCRATCH,
        REG_DEV_CTRL,
        REG_DEV_STATUS,
        DEV_CTRL_RESET,
        DEV_STATUS_BUS_MASTER,
        CAP_QUEUES_SHIFT,
        CAP_VECTORS_SHIFT,
        CAP_IOVA_WIDTH_SHIFT,
        NUM_QUEUES,
        IOVA_WIDTH,
        MAX_XFER,
        QUEUE_BASE,
        QUEUE_STRIDE,
        Q_BASE_LO,
        Q_BASE_HI,
        Q_SIZE,
        Q_CTRL,
        Q_HEAD,
        Q_TAIL,
        Q_STATUS,
        Q_MSIX_VECTOR,
        Q_COMPLETED,
        Q_ERRORS,
        Q_CTRL_ENABLE,
        Q_STATUS_ENABLED,
        Q_STATUS_ERROR,
        Q_SIZE_MIN,
        Q_SIZE_MAX,
        DESC_SIZE,
        DESC_OPCODE,
        DESC_FLAGS,
        DESC_RESERVED_LO,
        DESC_LEN,
        DESC_SRC,
        DESC_DST,
        DESC_COMPLETION,
        DESC_TAG,
        DESC_RESERVED,
        OP_NOP,
        OP_COPY,
        OP_FILL,
        DESC_FLAG_INTERRUPT,
        DESC_FLAGS_VALID,
        COMPLETION_SIZE,
        CPL_STATUS,
        CPL_BYTES,
        CPL_FAULT_ADDR,
        CPL_RESULT,
        CPL_TAG,
        STATUS_PENDING,
        STATUS_OK,
        STATUS_INVALID_DESCRIPTOR,
        STATUS_DMA_ERROR,
        STATUS_ABORTED,
    ];

    fn parse_number(cell: &str) -> Option<u64> {
        let cell = cell.trim();
        match cell.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => cell.parse().ok(),
        }
    }

    #[test]
    fn spec_doc_matches_code() {
        let spec_md = include_str!("../SPEC.md");
        let source = include_str!("spec.rs");

        // The table above lists every `pub const` of this module.
        let declared: BTreeSet<&str> = source
            .lines()
            .filter_map(|l| l.trim().strip_prefix("pub const "))
            .filter_map(|l| l.split(':').next())
            .filter(|name| {
                name.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
            })
            .collect();
        let listed: BTreeSet<&str> = CONSTANTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(declared, listed, "update the CONSTANTS list in spec.rs");

        // Each constant has a table row in SPEC.md whose first cell is its value.
        for (name, value) in CONSTANTS {
            let needle = format!("| `{name}` |");
            let row = spec_md
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&needle))
                .unwrap_or_else(|| panic!("SPEC.md has no table row for `{name}`"));
            let first = row.split('|').nth(1).unwrap_or_default();
            assert_eq!(
                parse_number(first),
                Some(*value),
                "SPEC.md gives `{name}` as {first:?}, code has {value:#x}"
            );
        }
    }
}
