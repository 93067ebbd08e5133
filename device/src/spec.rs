//! The device's programming interface: PCI identity, BAR map, register offsets and bits,
//! descriptor, completion, page-table and fault-record layouts.
//!
//! Every constant here is documented in `device/SPEC.md`; the test `spec_doc_matches_code`
//! checks that the two agree. Drivers (the driver model, the guest tests) use these constants
//! rather than literals, and the memory layouts through the types of [`wire`] (re-exported
//! here), never by offset.

pub mod wire;
pub use wire::*;

/// PCI vendor ID (the QEMU project's test vendor ID, as QEMU's `edu` device uses).
pub const PCI_VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const PCI_DEVICE_ID: u16 = 0xdd0a;
/// PCI subsystem vendor ID.
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x1234;
/// PCI subsystem ID.
pub const PCI_SUBSYSTEM_ID: u16 = 0x0001;
/// PCI revision ID.
pub const PCI_REVISION_ID: u8 = 0x02;
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
/// Offset of the MSI-X capability in configuration space.
pub const PCI_MSIX_CAP_OFFSET: u8 = 0x40;

/// Device magic value read from [`REG_ID`]: the bytes "DDMA" in memory order.
pub const DEVICE_ID_MAGIC: u32 = 0x414d_4444;
/// Register interface version read from [`REG_VERSION`]: major in bits 31:16, minor in 15:0.
pub const DEVICE_VERSION: u32 = 0x0000_0002;

// ---- Sizes the device can be configured with (server options) ----

/// Default number of descriptor queues.
pub const DEFAULT_QUEUES: u32 = 4;
/// Largest number of descriptor queues.
pub const MAX_QUEUES: u32 = 32;
/// Default number of DMA domains.
pub const DEFAULT_DOMAINS: u32 = 16;
/// Largest number of DMA domains.
pub const MAX_DOMAINS: u32 = 64;
/// Default number of IOTLB entries: 256 sets of 4 ways, 4 MiB of 4 KiB pages, so the
/// pages of a 1 MiB copy (both sides) stay cached from one transfer to the next.
pub const DEFAULT_IOTLB_ENTRIES: u32 = 1024;
/// Largest number of IOTLB entries.
pub const MAX_IOTLB_ENTRIES: u32 = 4096;
/// Default IOVA width in bits.
pub const DEFAULT_IOVA_WIDTH: u32 = 48;
/// IOVA width of the 32-bit mode: any IOVA at or above 4 GiB faults.
pub const IOVA_WIDTH_32: u32 = 32;
/// Default maximum transfer length of one descriptor ([`REG_MAX_XFER`]).
pub const MAX_XFER: u32 = 64 << 20;
/// Largest fault log the driver may configure, in records ([`REG_CAP_FAULT_LOG`]).
pub const FAULT_LOG_MAX: u32 = 4096;

// ---- Global registers (BAR0, 32-bit, little endian) ----

/// RO: device magic, [`DEVICE_ID_MAGIC`].
pub const REG_ID: u64 = 0x000;
/// RO: register interface version, [`DEVICE_VERSION`].
pub const REG_VERSION: u64 = 0x004;
/// RO: capabilities: queues (7:0), MSI-X vectors (15:8), IOVA width (23:16), domains (31:24).
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
/// RO: supported I/O page sizes; see `PGSIZE_*`.
pub const REG_CAP_PGSIZES: u64 = 0x020;
/// RO: number of IOTLB entries.
pub const REG_CAP_IOTLB: u64 = 0x024;
/// RO: largest fault log in records, [`FAULT_LOG_MAX`].
pub const REG_CAP_FAULT_LOG: u64 = 0x028;

/// [`REG_DEV_CTRL`] bit: write 1 to reset the device (self-clearing, reads 0).
pub const DEV_CTRL_RESET: u32 = 1 << 0;
/// [`REG_DEV_STATUS`] bit: bus mastering is enabled in the PCI command register.
pub const DEV_STATUS_BUS_MASTER: u32 = 1 << 0;
/// [`REG_DEV_STATUS`] bit: the server runs in strict IOTLB mode (stale uses are counted).
pub const DEV_STATUS_STRICT_IOTLB: u32 = 1 << 1;

/// Shift of the queue count in [`REG_CAP`].
pub const CAP_QUEUES_SHIFT: u32 = 0;
/// Shift of the MSI-X vector count in [`REG_CAP`].
pub const CAP_VECTORS_SHIFT: u32 = 8;
/// Shift of the IOVA width in [`REG_CAP`].
pub const CAP_IOVA_WIDTH_SHIFT: u32 = 16;
/// Shift of the domain count in [`REG_CAP`].
pub const CAP_DOMAINS_SHIFT: u32 = 24;

/// [`REG_CAP_PGSIZES`] bit: 4 KiB pages.
pub const PGSIZE_4K: u32 = 1 << 0;
/// [`REG_CAP_PGSIZES`] bit: 2 MiB pages.
pub const PGSIZE_2M: u32 = 1 << 1;
/// [`REG_CAP_PGSIZES`] bit: 1 GiB pages.
pub const PGSIZE_1G: u32 = 1 << 2;

// ---- IOTLB invalidation registers ----

/// RW: domain of a domain or range invalidation.
pub const REG_INV_DOMAIN: u64 = 0x040;
/// RW: first IOVA of a range invalidation, bits 31:0.
pub const REG_INV_ADDR_LO: u64 = 0x048;
/// RW: first IOVA of a range invalidation, bits 63:32.
pub const REG_INV_ADDR_HI: u64 = 0x04c;
/// RW: length in bytes of a range invalidation, bits 31:0.
pub const REG_INV_LEN_LO: u64 = 0x050;
/// RW: length in bytes of a range invalidation, bits 63:32.
pub const REG_INV_LEN_HI: u64 = 0x054;
/// WO: invalidation command, `INV_CMD_*`; reads 0.
pub const REG_INV_CMD: u64 = 0x058;
/// RO: invalidation status; see `INV_STATUS_*`.
pub const REG_INV_STATUS: u64 = 0x05c;
/// RO: number of invalidations completed (wraps at 2^32).
pub const REG_INV_SEQ: u64 = 0x060;

/// [`REG_INV_CMD`]: invalidate every IOTLB entry.
pub const INV_CMD_ALL: u32 = 1;
/// [`REG_INV_CMD`]: invalidate every entry of [`REG_INV_DOMAIN`].
pub const INV_CMD_DOMAIN: u32 = 2;
/// [`REG_INV_CMD`]: invalidate entries of [`REG_INV_DOMAIN`] overlapping the range.
pub const INV_CMD_RANGE: u32 = 3;
/// [`REG_INV_STATUS`] bit: an invalidation is in progress.
pub const INV_STATUS_BUSY: u32 = 1 << 0;
/// [`REG_INV_STATUS`] bit: the last command was rejected (unknown command or domain, or a
/// range of length 0).
pub const INV_STATUS_ERROR: u32 = 1 << 1;

// ---- Fault log registers ----

/// RW: fault log ring base bus address, bits 31:0 ([`FAULT_RECORD_SIZE`]-aligned).
pub const REG_FLOG_BASE_LO: u64 = 0x080;
/// RW: fault log ring base bus address, bits 63:32.
pub const REG_FLOG_BASE_HI: u64 = 0x084;
/// RW: fault log size in records: a power of two in 2..=[`FAULT_LOG_MAX`].
pub const REG_FLOG_SIZE: u64 = 0x088;
/// RW: fault log control; see `FLOG_CTRL_*`.
pub const REG_FLOG_CTRL: u64 = 0x08c;
/// RO: index of the next record the device writes.
pub const REG_FLOG_HEAD: u64 = 0x090;
/// RW: index of the next record the driver reads; the driver advances it.
pub const REG_FLOG_TAIL: u64 = 0x094;
/// RO/W1C: fault log status; see `FLOG_STATUS_*`.
pub const REG_FLOG_STATUS: u64 = 0x098;
/// RW: MSI-X vector raised when a record is written.
pub const REG_FLOG_MSIX_VECTOR: u64 = 0x09c;
/// RO: faults detected since reset (wraps at 2^32), logged or not.
pub const REG_FLOG_COUNT: u64 = 0x0a0;
/// RO: faults not logged (log disabled, full, or not writable) since reset.
pub const REG_FLOG_DROPPED: u64 = 0x0a4;

/// [`REG_FLOG_CTRL`] bit: the fault log is enabled.
pub const FLOG_CTRL_ENABLE: u32 = 1 << 0;
/// [`REG_FLOG_STATUS`] bit: a fault was dropped because the log was full (write 1 to clear).
pub const FLOG_STATUS_OVERFLOW: u32 = 1 << 0;
/// [`REG_FLOG_STATUS`] bit: records are waiting (head != tail).
pub const FLOG_STATUS_PENDING: u32 = 1 << 1;
/// [`REG_FLOG_STATUS`] bit: a record could not be written to the ring (write 1 to clear).
pub const FLOG_STATUS_ERROR: u32 = 1 << 2;

// ---- Statistics window ----

/// RW: selects a counter: index in 15:0, counter in 23:16, kind in 31:24 (`STAT_KIND_*`).
/// Writing it latches the counter's 64-bit value into `REG_STAT_VALUE_*`.
pub const REG_STAT_SELECT: u64 = 0x0c0;
/// RO: latched counter value, bits 31:0.
pub const REG_STAT_VALUE_LO: u64 = 0x0c4;
/// RO: latched counter value, bits 63:32.
pub const REG_STAT_VALUE_HI: u64 = 0x0c8;

/// Statistics kind: a queue's counters (index = queue).
pub const STAT_KIND_QUEUE: u32 = 0;
/// Statistics kind: a domain's counters (index = domain).
pub const STAT_KIND_DOMAIN: u32 = 1;
/// Queue counter: descriptors completed.
pub const QSTAT_DESCRIPTORS: u32 = 0;
/// Queue counter: bytes transferred.
pub const QSTAT_BYTES: u32 = 1;
/// Queue counter: descriptors completed with an error status.
pub const QSTAT_ERRORS: u32 = 2;
/// Queue counter: faults raised by this queue.
pub const QSTAT_FAULTS: u32 = 3;
/// Queue counter: MSI-X interrupts raised.
pub const QSTAT_INTERRUPTS: u32 = 4;
/// Domain counter: translations requested.
pub const DSTAT_TRANSLATIONS: u32 = 0;
/// Domain counter: IOTLB hits.
pub const DSTAT_IOTLB_HITS: u32 = 1;
/// Domain counter: IOTLB misses.
pub const DSTAT_IOTLB_MISSES: u32 = 2;
/// Domain counter: page walks.
pub const DSTAT_PAGE_WALKS: u32 = 3;
/// Domain counter: faults.
pub const DSTAT_FAULTS: u32 = 4;
/// Domain counter: IOTLB hits whose cached translation no longer matched the page table
/// (strict mode only).
pub const DSTAT_STALE_USES: u32 = 5;

// ---- Queue registers: block of QUEUE_STRIDE bytes per queue at QUEUE_BASE ----

/// Offset of queue 0's register block in BAR0.
pub const QUEUE_BASE: u64 = 0x1000;
/// Distance between two queues' register blocks.
pub const QUEUE_STRIDE: u64 = 0x80;
/// RW: ring base address (in the queue's domain), low 32 bits (64-byte aligned).
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
/// RW: the DMA domain the queue's accesses go through (only while disabled).
pub const Q_DOMAIN: u64 = 0x28;
/// RW: interrupt coalescing by count: raise the vector once this many completions asked
/// for an interrupt (0 and 1: every one).
pub const Q_COAL_COUNT: u64 = 0x2c;
/// RW: interrupt coalescing by time: raise a pending interrupt at most this many
/// microseconds after the first completion that asked for it (0: no timer).
pub const Q_COAL_USEC: u64 = 0x30;
/// RO: why the queue halted; see `HALT_*`.
pub const Q_HALT_REASON: u64 = 0x34;

/// [`Q_CTRL`] bit: queue enabled. Base and size must be valid when it is set.
pub const Q_CTRL_ENABLE: u32 = 1 << 0;
/// [`Q_CTRL`] bit: halt the queue after a descriptor that faulted (else continue).
pub const Q_CTRL_HALT_ON_FAULT: u32 = 1 << 1;
/// [`Q_CTRL`] bit (write-only): resume a queue halted on a fault, at the next descriptor.
pub const Q_CTRL_RESUME: u32 = 1 << 2;
/// [`Q_STATUS`] bit: the queue is enabled and accepts doorbells.
pub const Q_STATUS_ENABLED: u32 = 1 << 0;
/// [`Q_STATUS`] bit: the queue halted; [`Q_HALT_REASON`] says why.
pub const Q_STATUS_ERROR: u32 = 1 << 1;
/// [`Q_STATUS`] bit: the engine is working on this queue's descriptors.
pub const Q_STATUS_BUSY: u32 = 1 << 2;
/// Smallest ring size.
pub const Q_SIZE_MIN: u32 = 2;
/// Largest ring size.
pub const Q_SIZE_MAX: u32 = 4096;

/// [`Q_HALT_REASON`]: not halted.
pub const HALT_NONE: u32 = 0;
/// [`Q_HALT_REASON`]: enabled with a bad base, size or domain; disable to clear.
pub const HALT_BAD_CONFIG: u32 = 1;
/// [`Q_HALT_REASON`]: the doorbell was written with an index beyond the ring.
pub const HALT_BAD_TAIL: u32 = 2;
/// [`Q_HALT_REASON`]: a descriptor could not be fetched (a fault was logged).
pub const HALT_DESC_FETCH: u32 = 3;
/// [`Q_HALT_REASON`]: a descriptor faulted and [`Q_CTRL_HALT_ON_FAULT`] is set.
pub const HALT_FAULT: u32 = 4;

// ---- Domain registers: block of DOMAIN_STRIDE bytes per domain at DOMAIN_BASE ----

/// Offset of domain 0's register block in BAR0.
pub const DOMAIN_BASE: u64 = 0x2000;
/// Distance between two domains' register blocks.
pub const DOMAIN_STRIDE: u64 = 0x20;
/// RW: bus address of the domain's level-4 page table, bits 31:0 (4 KiB aligned).
pub const D_ROOT_LO: u64 = 0x00;
/// RW: bus address of the level-4 page table, bits 63:32.
pub const D_ROOT_HI: u64 = 0x04;
/// RW: domain control: the mode in bits 1:0, `DOMAIN_MODE_*`.
pub const D_CTRL: u64 = 0x08;

/// Domain mode: disabled; any DMA through it faults ([`FAULT_DOMAIN_DISABLED`]).
pub const DOMAIN_MODE_DISABLED: u32 = 0;
/// Domain mode: pass-through, IOVA = bus address (domain 0's reset mode).
pub const DOMAIN_MODE_PASSTHROUGH: u32 = 1;
/// Domain mode: translated through the domain's page table.
pub const DOMAIN_MODE_TRANSLATED: u32 = 2;

// ---- I/O page tables (4 levels, 512 entries of 8 bytes per 4 KiB table) ----

/// Page-table entry bit: reads allowed.
pub const PTE_R: u64 = 1 << 0;
/// Page-table entry bit: writes allowed.
pub const PTE_W: u64 = 1 << 1;
/// Page-table entry bit: page size; a level-2 entry maps 2 MiB, a level-3 entry 1 GiB.
pub const PTE_PS: u64 = 1 << 7;
/// Page-table entry: the address field (bits 51:12).
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page-table entry: reserved bits that must be zero (bits 63:52 and 6:2).
pub const PTE_RESERVED_MASK: u64 = 0xfff0_0000_0000_007c;

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
/// Byte offset of the source address (COPY, COMPARE, CRC32C) or 64-bit pattern (FILL).
pub const DESC_SRC: u64 = 0x08;
/// Byte offset of the destination address (COPY, FILL) or second source (COMPARE) (u64).
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
/// Opcode: compare `len` bytes at `src` and `dst`; result 0 if equal, else 1 + the offset
/// of the first difference.
pub const OP_COMPARE: u8 = 3;
/// Opcode: CRC32C (Castagnoli) of `len` bytes at `src`; result the CRC.
pub const OP_CRC32C: u8 = 4;
/// Opcode: run the `len` descriptors of the list at `src` (NOP, COPY, FILL) in order as
/// one descriptor; result the number of elements completed.
pub const OP_BATCH: u8 = 5;
/// Most elements in one BATCH list.
pub const BATCH_MAX: u32 = 64;

/// Descriptor flag: raise the queue's MSI-X vector when this descriptor completes.
pub const DESC_FLAG_INTERRUPT: u8 = 1 << 0;
/// Descriptor flag: start only after every earlier descriptor of the queue has completed.
pub const DESC_FLAG_FENCE: u8 = 1 << 1;
/// All defined descriptor flags.
pub const DESC_FLAGS_VALID: u8 = DESC_FLAG_INTERRUPT | DESC_FLAG_FENCE;

// ---- Completion records ----

/// Size of a completion record in bytes (and its required alignment).
pub const COMPLETION_SIZE: u64 = 32;
/// Byte offset of the status (u8); the first 4 bytes are written last, together.
pub const CPL_STATUS: u64 = 0x00;
/// Byte offset of the fault reason (u8, `FAULT_*`, 0 if none).
pub const CPL_FAULT_REASON: u64 = 0x01;
/// Byte offset of the fault access flags (u8, `ACCESS_*`).
pub const CPL_FAULT_ACCESS: u64 = 0x02;
/// Byte offset of the number of bytes completed (u32).
pub const CPL_BYTES: u64 = 0x04;
/// Byte offset of the faulting address (u64, an IOVA of the queue's domain; 0 if none).
pub const CPL_FAULT_ADDR: u64 = 0x08;
/// Byte offset of the operation result (u64: COMPARE and CRC32C; 0 otherwise).
pub const CPL_RESULT: u64 = 0x10;
/// Byte offset of the descriptor's tag (u64).
pub const CPL_TAG: u64 = 0x18;

/// Completion status: not yet completed (the driver writes it before submitting).
pub const STATUS_PENDING: u8 = 0;
/// Completion status: success.
pub const STATUS_OK: u8 = 1;
/// Completion status: malformed descriptor (bad opcode, flags, length or reserved bytes).
pub const STATUS_INVALID_DESCRIPTOR: u8 = 0x10;
/// Completion status: a DMA access faulted; reason, access and address are in the record.
pub const STATUS_DMA_ERROR: u8 = 0x11;
/// Completion status: the queue was disabled while the descriptor was in flight.
pub const STATUS_ABORTED: u8 = 0x12;

// ---- Faults ----

/// Fault reason: no valid entry (R = W = 0) maps the IOVA.
pub const FAULT_NOT_PRESENT: u8 = 1;
/// Fault reason: the mapping does not allow the access (write to read-only, read of
/// write-only).
pub const FAULT_PERMISSION: u8 = 2;
/// Fault reason: the IOVA is beyond the device's IOVA width.
pub const FAULT_IOVA_WIDTH: u8 = 3;
/// Fault reason: a page-table entry has a reserved bit set, or a page-size bit where none
/// is allowed, or a misaligned large-page address.
pub const FAULT_MALFORMED_ENTRY: u8 = 4;
/// Fault reason: a malformed descriptor.
pub const FAULT_DESCRIPTOR_INVALID: u8 = 5;
/// Fault reason: a bus address (a page table, or the translated address) is outside the
/// memory the VMM mapped for the device ("guest-physical address outside guest RAM").
pub const FAULT_OUTSIDE_RAM: u8 = 6;
/// Fault reason: the queue's domain is disabled or does not exist.
pub const FAULT_DOMAIN_DISABLED: u8 = 7;
/// Fault reason: the memory behind a mapped bus address is gone (the VMM's backing for
/// the mapping failed: a truncated file, no huge page, a full file system); the device
/// does not use that mapping again.
pub const FAULT_BUS_ERROR: u8 = 8;

/// Fault access bit: the access was a write (else a read).
pub const ACCESS_WRITE: u8 = 1 << 0;
/// Fault access bit: the access fetched a descriptor.
pub const ACCESS_DESCRIPTOR: u8 = 1 << 1;
/// Fault access bit: the access wrote a completion record.
pub const ACCESS_COMPLETION: u8 = 1 << 2;
/// Fault access bit: the access read a page-table entry during a walk.
pub const ACCESS_PAGE_WALK: u8 = 1 << 3;

/// Size of a fault record in bytes (and the fault log's alignment).
pub const FAULT_RECORD_SIZE: u64 = 32;
/// Fault record: reason (u8, `FAULT_*`).
pub const FREC_REASON: u64 = 0x00;
/// Fault record: access flags (u8, `ACCESS_*`).
pub const FREC_ACCESS: u64 = 0x01;
/// Fault record: domain (u16).
pub const FREC_DOMAIN: u64 = 0x02;
/// Fault record: queue (u16).
pub const FREC_QUEUE: u64 = 0x04;
/// Fault record: the faulting IOVA (u64).
pub const FREC_IOVA: u64 = 0x08;
/// Fault record: detail (u64): the offending page-table entry, or the bus address.
pub const FREC_INFO: u64 = 0x10;
/// Fault record: page-table level of the fault (u32, 0 if none).
pub const FREC_LEVEL: u64 = 0x18;
/// Fault record: fault sequence number (u32, [`REG_FLOG_COUNT`] at the fault).
pub const FREC_SEQ: u64 = 0x1c;

/// Offset of queue `q`'s register `reg` in BAR0.
pub const fn queue_reg(q: u32, reg: u64) -> u64 {
    QUEUE_BASE + q as u64 * QUEUE_STRIDE + reg
}

/// Offset of domain `d`'s register `reg` in BAR0.
pub const fn domain_reg(d: u32, reg: u64) -> u64 {
    DOMAIN_BASE + d as u64 * DOMAIN_STRIDE + reg
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
        PCI_MSIX_CAP_OFFSET,
        DEVICE_ID_MAGIC,
        DEVICE_VERSION,
        DEFAULT_QUEUES,
        MAX_QUEUES,
        DEFAULT_DOMAINS,
        MAX_DOMAINS,
        DEFAULT_IOTLB_ENTRIES,
        MAX_IOTLB_ENTRIES,
        DEFAULT_IOVA_WIDTH,
        IOVA_WIDTH_32,
        MAX_XFER,
        FAULT_LOG_MAX,
        REG_ID,
        REG_VERSION,
        REG_CAP,
        REG_CAP_OPS,
        REG_MAX_XFER,
        REG_SCRATCH,
        REG_DEV_CTRL,
        REG_DEV_STATUS,
        REG_CAP_PGSIZES,
        REG_CAP_IOTLB,
        REG_CAP_FAULT_LOG,
        DEV_CTRL_RESET,
        DEV_STATUS_BUS_MASTER,
        DEV_STATUS_STRICT_IOTLB,
        CAP_QUEUES_SHIFT,
        CAP_VECTORS_SHIFT,
        CAP_IOVA_WIDTH_SHIFT,
        CAP_DOMAINS_SHIFT,
        PGSIZE_4K,
        PGSIZE_2M,
        PGSIZE_1G,
        REG_INV_DOMAIN,
        REG_INV_ADDR_LO,
        REG_INV_ADDR_HI,
        REG_INV_LEN_LO,
        REG_INV_LEN_HI,
        REG_INV_CMD,
        REG_INV_STATUS,
        REG_INV_SEQ,
        INV_CMD_ALL,
        INV_CMD_DOMAIN,
        INV_CMD_RANGE,
        INV_STATUS_BUSY,
        INV_STATUS_ERROR,
        REG_FLOG_BASE_LO,
        REG_FLOG_BASE_HI,
        REG_FLOG_SIZE,
        REG_FLOG_CTRL,
        REG_FLOG_HEAD,
        REG_FLOG_TAIL,
        REG_FLOG_STATUS,
        REG_FLOG_MSIX_VECTOR,
        REG_FLOG_COUNT,
        REG_FLOG_DROPPED,
        FLOG_CTRL_ENABLE,
        FLOG_STATUS_OVERFLOW,
        FLOG_STATUS_PENDING,
        FLOG_STATUS_ERROR,
        REG_STAT_SELECT,
        REG_STAT_VALUE_LO,
        REG_STAT_VALUE_HI,
        STAT_KIND_QUEUE,
        STAT_KIND_DOMAIN,
        QSTAT_DESCRIPTORS,
        QSTAT_BYTES,
        QSTAT_ERRORS,
        QSTAT_FAULTS,
        QSTAT_INTERRUPTS,
        DSTAT_TRANSLATIONS,
        DSTAT_IOTLB_HITS,
        DSTAT_IOTLB_MISSES,
        DSTAT_PAGE_WALKS,
        DSTAT_FAULTS,
        DSTAT_STALE_USES,
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
        Q_DOMAIN,
        Q_COAL_COUNT,
        Q_COAL_USEC,
        Q_HALT_REASON,
        Q_CTRL_ENABLE,
        Q_CTRL_HALT_ON_FAULT,
        Q_CTRL_RESUME,
        Q_STATUS_ENABLED,
        Q_STATUS_ERROR,
        Q_STATUS_BUSY,
        Q_SIZE_MIN,
        Q_SIZE_MAX,
        HALT_NONE,
        HALT_BAD_CONFIG,
        HALT_BAD_TAIL,
        HALT_DESC_FETCH,
        HALT_FAULT,
        DOMAIN_BASE,
        DOMAIN_STRIDE,
        D_ROOT_LO,
        D_ROOT_HI,
        D_CTRL,
        DOMAIN_MODE_DISABLED,
        DOMAIN_MODE_PASSTHROUGH,
        DOMAIN_MODE_TRANSLATED,
        PTE_R,
        PTE_W,
        PTE_PS,
        PTE_ADDR_MASK,
        PTE_RESERVED_MASK,
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
        OP_COMPARE,
        OP_CRC32C,
        OP_BATCH,
        BATCH_MAX,
        DESC_FLAG_INTERRUPT,
        DESC_FLAG_FENCE,
        DESC_FLAGS_VALID,
        COMPLETION_SIZE,
        CPL_STATUS,
        CPL_FAULT_REASON,
        CPL_FAULT_ACCESS,
        CPL_BYTES,
        CPL_FAULT_ADDR,
        CPL_RESULT,
        CPL_TAG,
        STATUS_PENDING,
        STATUS_OK,
        STATUS_INVALID_DESCRIPTOR,
        STATUS_DMA_ERROR,
        STATUS_ABORTED,
        FAULT_NOT_PRESENT,
        FAULT_PERMISSION,
        FAULT_IOVA_WIDTH,
        FAULT_MALFORMED_ENTRY,
        FAULT_DESCRIPTOR_INVALID,
        FAULT_OUTSIDE_RAM,
        FAULT_DOMAIN_DISABLED,
        FAULT_BUS_ERROR,
        ACCESS_WRITE,
        ACCESS_DESCRIPTOR,
        ACCESS_COMPLETION,
        ACCESS_PAGE_WALK,
        FAULT_RECORD_SIZE,
        FREC_REASON,
        FREC_ACCESS,
        FREC_DOMAIN,
        FREC_QUEUE,
        FREC_IOVA,
        FREC_INFO,
        FREC_LEVEL,
        FREC_SEQ,
    ];

    /// The wire types' sizes and field offsets are the documented `*_SIZE` and offset
    /// constants (which the test below checks against SPEC.md).
    #[test]
    fn wire_types_match_the_documented_layouts() {
        use std::mem::{offset_of, size_of};
        let at = |o: usize| o as u64;
        assert_eq!(size_of::<Descriptor>() as u64, DESC_SIZE);
        assert_eq!(size_of::<BatchElement>() as u64, DESC_SIZE);
        assert_eq!(at(offset_of!(Descriptor, opcode)), DESC_OPCODE);
        assert_eq!(at(offset_of!(Descriptor, flags)), DESC_FLAGS);
        assert_eq!(at(offset_of!(Descriptor, reserved_lo)), DESC_RESERVED_LO);
        assert_eq!(at(offset_of!(Descriptor, len)), DESC_LEN);
        assert_eq!(at(offset_of!(Descriptor, src)), DESC_SRC);
        assert_eq!(at(offset_of!(Descriptor, dst)), DESC_DST);
        assert_eq!(at(offset_of!(Descriptor, completion)), DESC_COMPLETION);
        assert_eq!(at(offset_of!(Descriptor, tag)), DESC_TAG);
        assert_eq!(at(offset_of!(Descriptor, reserved)), DESC_RESERVED);

        assert_eq!(size_of::<CompletionRecord>() as u64, COMPLETION_SIZE);
        assert_eq!(at(offset_of!(CompletionRecord, status)), CPL_STATUS);
        assert_eq!(
            at(offset_of!(CompletionRecord, fault_reason)),
            CPL_FAULT_REASON
        );
        assert_eq!(
            at(offset_of!(CompletionRecord, fault_access)),
            CPL_FAULT_ACCESS
        );
        assert_eq!(at(offset_of!(CompletionRecord, bytes)), CPL_BYTES);
        assert_eq!(at(offset_of!(CompletionRecord, fault_addr)), CPL_FAULT_ADDR);
        assert_eq!(at(offset_of!(CompletionRecord, result)), CPL_RESULT);
        assert_eq!(at(offset_of!(CompletionRecord, tag)), CPL_TAG);

        assert_eq!(size_of::<FaultRecord>() as u64, FAULT_RECORD_SIZE);
        assert_eq!(at(offset_of!(FaultRecord, reason)), FREC_REASON);
        assert_eq!(at(offset_of!(FaultRecord, access)), FREC_ACCESS);
        assert_eq!(at(offset_of!(FaultRecord, domain)), FREC_DOMAIN);
        assert_eq!(at(offset_of!(FaultRecord, queue)), FREC_QUEUE);
        assert_eq!(at(offset_of!(FaultRecord, iova)), FREC_IOVA);
        assert_eq!(at(offset_of!(FaultRecord, info)), FREC_INFO);
        assert_eq!(at(offset_of!(FaultRecord, level)), FREC_LEVEL);
        assert_eq!(at(offset_of!(FaultRecord, seq)), FREC_SEQ);

        assert_eq!(size_of::<Pte>(), 8);
        assert_eq!(size_of::<Pte>() * PTES_PER_TABLE, 4096);
    }

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
