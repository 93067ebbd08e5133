//! The wire layouts the device and a driver share through memory: descriptors and BATCH
//! elements, completion records, fault records and I/O page-table entries.
//!
//! Each is a `#[repr(C)]` (or transparent) type implementing vm-memory's [`ByteValued`],
//! defined once here and used by the device core, the driver model and every test; nothing
//! else reads or writes these layouts by byte offset. Fields hold host-order values; the
//! bytes in memory are little endian: [`Descriptor::encode`] / [`Descriptor::decode`] (and
//! the same on every type) convert, and `to_le` / `from_le` do it in place for code that
//! moves the type with vm-memory's `read_obj` / `write_obj`. The spec test checks each
//! type's size and field offsets against the `DESC_*`, `CPL_*`, `FREC_*` constants and
//! SPEC.md.

use std::fmt;
use std::mem::size_of;

use vm_memory::ByteValued;

use super::*;

/// Copies the bytes of a plain value into a fixed array (the layout's encoded form).
fn bytes_of<T: ByteValued, const N: usize>(v: &T) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(v.as_slice());
    out
}

/// A plain value from its bytes (any alignment).
fn from_bytes<T: ByteValued + Default>(raw: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(raw);
    v
}

// ---- Descriptors ----

/// One 64-byte descriptor of a queue's ring (SPEC.md "Descriptors"). All fields are public
/// so that tests can build malformed descriptors; [`Descriptor::validate`] is the device's
/// rule for which are well formed.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Operation (`OP_*`).
    pub opcode: u8,
    /// Flags (`DESC_FLAG_*`).
    pub flags: u8,
    /// Reserved, must be zero.
    pub reserved_lo: u16,
    /// Transfer length in bytes (BATCH: the number of elements).
    pub len: u32,
    /// COPY, COMPARE, CRC32C: source IOVA; FILL: the 64-bit pattern; BATCH: the list.
    pub src: u64,
    /// COPY, FILL: destination IOVA; COMPARE: the second source.
    pub dst: u64,
    /// IOVA of the completion record ([`COMPLETION_SIZE`]-aligned), 0 = none.
    pub completion: u64,
    /// Driver tag, echoed in the completion record.
    pub tag: u64,
    /// Reserved, must be zero.
    pub reserved: [u8; 24],
}

// SAFETY: `repr(C)` with integer and byte-array fields only, laid out without padding (the
// size is asserted below), so every byte pattern is a valid value.
unsafe impl ByteValued for Descriptor {}

/// Why a descriptor (or a BATCH element) is malformed: SPEC.md's list, in the order the
/// device checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The opcode is not one of `OP_*`.
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A flag outside [`DESC_FLAGS_VALID`] is set.
    #[error("unknown flag in {0:#x}")]
    UnknownFlag(u8),
    /// A reserved byte is not zero.
    #[error("reserved byte set")]
    ReservedSet,
    /// The length is not allowed for the opcode (NOP: 0; BATCH: 1..=BATCH_MAX; else
    /// 1..=the maximum transfer).
    #[error("bad length {len} for opcode {opcode}")]
    BadLength {
        /// The opcode.
        opcode: u8,
        /// The length.
        len: u32,
    },
    /// The completion record address is not [`COMPLETION_SIZE`]-aligned.
    #[error("misaligned completion record {0:#x}")]
    MisalignedCompletion(u64),
    /// A BATCH list that is not [`DESC_SIZE`]-aligned, or a BATCH with a destination.
    #[error("BATCH list misaligned or destination set")]
    BadBatchList,
    /// A COPY whose source and destination ranges overlap.
    #[error("COPY ranges overlap")]
    CopyOverlap,
    /// An element of a BATCH list whose opcode is not NOP, COPY or FILL.
    #[error("opcode {0} not allowed in a BATCH list")]
    NotAllowedInBatch(u8),
    /// An element of a BATCH list with a completion record or an interrupt request.
    #[error("BATCH element with a completion record or an interrupt")]
    BatchElementReports,
}

impl Descriptor {
    /// A descriptor of `opcode` with the three operands and nothing else set.
    pub const fn new(opcode: u8, len: u32, src: u64, dst: u64) -> Self {
        Descriptor {
            opcode,
            flags: 0,
            reserved_lo: 0,
            len,
            src,
            dst,
            completion: 0,
            tag: 0,
            reserved: [0; 24],
        }
    }

    /// A no-op.
    pub const fn nop() -> Self {
        Self::new(OP_NOP, 0, 0, 0)
    }

    /// Copy `len` bytes from IOVA `src` to `dst`.
    pub const fn copy(src: u64, dst: u64, len: u32) -> Self {
        Self::new(OP_COPY, len, src, dst)
    }

    /// Fill `len` bytes at `dst` with the 64-bit little-endian `pattern`.
    pub const fn fill(dst: u64, pattern: u64, len: u32) -> Self {
        Self::new(OP_FILL, len, pattern, dst)
    }

    /// Compare `len` bytes at `a` and `b`; the result is 0 when equal, else 1 plus the
    /// offset of the first difference.
    pub const fn compare(a: u64, b: u64, len: u32) -> Self {
        Self::new(OP_COMPARE, len, a, b)
    }

    /// CRC32C (Castagnoli) of `len` bytes at `src`; the result is the CRC.
    pub const fn crc32c(src: u64, len: u32) -> Self {
        Self::new(OP_CRC32C, len, src, 0)
    }

    /// Run the `count` [`BatchElement`]s of the list at IOVA `list` ([`DESC_SIZE`]-aligned)
    /// as one descriptor; the result is the number of elements completed.
    pub const fn batch(list: u64, count: u32) -> Self {
        Self::new(OP_BATCH, count, list, 0)
    }

    /// Sets the FENCE flag (start only after every earlier descriptor completed).
    pub const fn with_fence(mut self) -> Self {
        self.flags |= DESC_FLAG_FENCE;
        self
    }

    /// Requests the queue's completion interrupt.
    pub const fn with_interrupt(mut self) -> Self {
        self.flags |= DESC_FLAG_INTERRUPT;
        self
    }

    /// Sets the completion record address (an IOVA of the queue's domain).
    pub const fn with_completion(mut self, iova: u64) -> Self {
        self.completion = iova;
        self
    }

    /// Sets the tag.
    pub const fn with_tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }

    /// The value with its multi-byte fields converted from little endian to host order.
    pub fn from_le(self) -> Self {
        Descriptor {
            reserved_lo: u16::from_le(self.reserved_lo),
            len: u32::from_le(self.len),
            src: u64::from_le(self.src),
            dst: u64::from_le(self.dst),
            completion: u64::from_le(self.completion),
            tag: u64::from_le(self.tag),
            ..self
        }
    }

    /// The value with its multi-byte fields converted to little endian (the memory form).
    pub fn to_le(self) -> Self {
        // Byte swapping is its own inverse.
        self.from_le()
    }

    /// The descriptor's bytes as the device reads them.
    pub fn encode(&self) -> [u8; DESC_SIZE as usize] {
        bytes_of(&self.to_le())
    }

    /// A descriptor from the bytes read from a ring.
    pub fn decode(raw: &[u8; DESC_SIZE as usize]) -> Self {
        from_bytes::<Self>(raw).from_le()
    }

    /// Whether every reserved field is zero.
    pub fn reserved_clear(&self) -> bool {
        self.reserved_lo == 0 && self.reserved.iter().all(|&b| b == 0)
    }

    /// Whether the descriptor asks for an interrupt (only when its flags are all known).
    pub fn wants_interrupt(&self) -> bool {
        self.flags & !DESC_FLAGS_VALID == 0 && self.flags & DESC_FLAG_INTERRUPT != 0
    }

    /// The device's check of a descriptor of a ring (SPEC.md "Malformed descriptors"), for
    /// a device whose maximum transfer is `max_transfer` bytes.
    pub fn validate(&self, max_transfer: u32) -> Result<(), DescriptorError> {
        if !matches!(
            self.opcode,
            OP_NOP | OP_COPY | OP_FILL | OP_COMPARE | OP_CRC32C | OP_BATCH
        ) {
            return Err(DescriptorError::UnknownOpcode(self.opcode));
        }
        if self.flags & !DESC_FLAGS_VALID != 0 {
            return Err(DescriptorError::UnknownFlag(self.flags));
        }
        if !self.reserved_clear() {
            return Err(DescriptorError::ReservedSet);
        }
        let len_ok = match self.opcode {
            OP_NOP => self.len == 0,
            OP_BATCH => (1..=BATCH_MAX).contains(&self.len),
            _ => self.len != 0 && self.len <= max_transfer,
        };
        if !len_ok {
            return Err(DescriptorError::BadLength {
                opcode: self.opcode,
                len: self.len,
            });
        }
        if self.completion % COMPLETION_SIZE != 0 {
            return Err(DescriptorError::MisalignedCompletion(self.completion));
        }
        if self.opcode == OP_BATCH && (self.dst != 0 || self.src % DESC_SIZE != 0) {
            return Err(DescriptorError::BadBatchList);
        }
        if self.opcode == OP_COPY {
            let len = u64::from(self.len);
            if self.src < self.dst.saturating_add(len) && self.dst < self.src.saturating_add(len) {
                return Err(DescriptorError::CopyOverlap);
            }
        }
        Ok(())
    }
}

/// One element of a BATCH list: a descriptor's layout, restricted to a NOP, COPY or FILL
/// without a completion record or an interrupt request (SPEC.md "BATCH").
#[repr(transparent)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchElement(pub Descriptor);

// SAFETY: a transparent wrapper of a `ByteValued` type.
unsafe impl ByteValued for BatchElement {}

impl BatchElement {
    /// Size of one element in a list.
    pub const SIZE: u64 = DESC_SIZE;

    /// The element's bytes as the device reads them.
    pub fn encode(&self) -> [u8; DESC_SIZE as usize] {
        self.0.encode()
    }

    /// An element from the bytes read from a list.
    pub fn decode(raw: &[u8; DESC_SIZE as usize]) -> Self {
        BatchElement(Descriptor::decode(raw))
    }

    /// The device's check of a list element: a well-formed descriptor, of an opcode allowed
    /// in a list, that reports nothing itself.
    pub fn validate(&self, max_transfer: u32) -> Result<(), DescriptorError> {
        let d = &self.0;
        d.validate(max_transfer)?;
        if !matches!(d.opcode, OP_NOP | OP_COPY | OP_FILL) {
            return Err(DescriptorError::NotAllowedInBatch(d.opcode));
        }
        if d.completion != 0 || d.flags & DESC_FLAG_INTERRUPT != 0 {
            return Err(DescriptorError::BatchElementReports);
        }
        Ok(())
    }
}

impl From<Descriptor> for BatchElement {
    fn from(d: Descriptor) -> Self {
        BatchElement(d)
    }
}

// ---- Completion records ----

/// A descriptor's 32-byte completion record (SPEC.md "Completion records"). The device
/// writes [`CompletionRecord::body`] first and [`CompletionRecord::head`] (status, fault
/// reason and access) last, as one 32-bit store.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompletionRecord {
    /// Status (`STATUS_*`).
    pub status: u8,
    /// Fault reason (`FAULT_*`), 0 if none.
    pub fault_reason: u8,
    /// Fault access flags (`ACCESS_*`).
    pub fault_access: u8,
    /// Reserved, written as zero.
    pub reserved: u8,
    /// Bytes completed.
    pub bytes: u32,
    /// Faulting IOVA (of the queue's domain), 0 if none.
    pub fault_addr: u64,
    /// Operation result (COMPARE, CRC32C, BATCH), else 0.
    pub result: u64,
    /// The descriptor's tag.
    pub tag: u64,
}

// SAFETY: `repr(C)` with integer fields only and no padding (the size is asserted below).
unsafe impl ByteValued for CompletionRecord {}

/// Offset of the record's body: the part written before the head.
const CPL_BODY: usize = std::mem::offset_of!(CompletionRecord, bytes);

impl CompletionRecord {
    /// The value with its multi-byte fields converted from little endian to host order.
    pub fn from_le(self) -> Self {
        CompletionRecord {
            bytes: u32::from_le(self.bytes),
            fault_addr: u64::from_le(self.fault_addr),
            result: u64::from_le(self.result),
            tag: u64::from_le(self.tag),
            ..self
        }
    }

    /// The value with its multi-byte fields converted to little endian (the memory form).
    pub fn to_le(self) -> Self {
        self.from_le()
    }

    /// The record's bytes as the device writes them.
    pub fn encode(&self) -> [u8; COMPLETION_SIZE as usize] {
        bytes_of(&self.to_le())
    }

    /// A record from its bytes.
    pub fn decode(raw: &[u8; COMPLETION_SIZE as usize]) -> Self {
        from_bytes::<Self>(raw).from_le()
    }

    /// The first four bytes (status, fault reason, fault access, reserved) as the one
    /// little-endian 32-bit word the device stores last.
    pub fn head(&self) -> u32 {
        u32::from_le_bytes([
            self.status,
            self.fault_reason,
            self.fault_access,
            self.reserved,
        ])
    }

    /// The status byte of a head word read from memory (see [`CompletionRecord::head`]).
    pub fn status_of_head(head: u32) -> u8 {
        head.to_le_bytes()[0]
    }

    /// Offset in the record of the body, the bytes written before the head.
    pub const BODY_OFFSET: u64 = CPL_BODY as u64;

    /// The bytes after the head, written before it.
    pub fn body(&self) -> [u8; COMPLETION_SIZE as usize - CPL_BODY] {
        let all = self.encode();
        let mut out = [0u8; COMPLETION_SIZE as usize - CPL_BODY];
        out.copy_from_slice(&all[CPL_BODY..]);
        out
    }

    /// Whether the status is [`STATUS_OK`].
    pub fn is_ok(&self) -> bool {
        self.status == STATUS_OK
    }

    /// What the descriptor came to, without its result and tag: (status, fault reason,
    /// fault access, bytes completed, fault address).
    pub fn outcome(&self) -> (u8, u8, u8, u32, u64) {
        (
            self.status,
            self.fault_reason,
            self.fault_access,
            self.bytes,
            self.fault_addr,
        )
    }
}

impl fmt::Display for CompletionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status {:#x} ({}), fault {} access {}, bytes {}, fault_addr {:#x}, result {:#x}, tag {:#x}",
            self.status,
            status_name(self.status),
            fault_reason_name(self.fault_reason),
            access_names(self.fault_access),
            self.bytes,
            self.fault_addr,
            self.result,
            self.tag
        )
    }
}

// ---- Fault records ----

/// One 32-byte record of the fault log (SPEC.md "Faults").
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultRecord {
    /// Reason (`FAULT_*`).
    pub reason: u8,
    /// Access flags (`ACCESS_*`).
    pub access: u8,
    /// The domain of the access.
    pub domain: u16,
    /// The queue that made the access.
    pub queue: u16,
    /// Reserved, written as zero.
    pub reserved: u16,
    /// The faulting IOVA.
    pub iova: u64,
    /// Detail: the offending page-table entry (malformed), the bus address (outside RAM),
    /// else 0.
    pub info: u64,
    /// Page-table level of the fault (4..1), 0 if not in a walk.
    pub level: u32,
    /// The fault's sequence number ([`REG_FLOG_COUNT`] before it was counted).
    pub seq: u32,
}

// SAFETY: `repr(C)` with integer fields only and no padding (the size is asserted below).
unsafe impl ByteValued for FaultRecord {}

impl FaultRecord {
    /// The value with its multi-byte fields converted from little endian to host order.
    pub fn from_le(self) -> Self {
        FaultRecord {
            domain: u16::from_le(self.domain),
            queue: u16::from_le(self.queue),
            reserved: u16::from_le(self.reserved),
            iova: u64::from_le(self.iova),
            info: u64::from_le(self.info),
            level: u32::from_le(self.level),
            seq: u32::from_le(self.seq),
            ..self
        }
    }

    /// The value with its multi-byte fields converted to little endian (the memory form).
    pub fn to_le(self) -> Self {
        self.from_le()
    }

    /// The record's bytes as the device writes them.
    pub fn encode(&self) -> [u8; FAULT_RECORD_SIZE as usize] {
        bytes_of(&self.to_le())
    }

    /// A record from its bytes.
    pub fn decode(raw: &[u8; FAULT_RECORD_SIZE as usize]) -> Self {
        from_bytes::<Self>(raw).from_le()
    }

    /// Whether the faulting access was a write.
    pub fn is_write(&self) -> bool {
        self.access & ACCESS_WRITE != 0
    }
}

impl fmt::Display for FaultRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} ({}) domain {} queue {} IOVA {:#x} access {} info {:#x} level {}",
            self.seq,
            fault_reason_name(self.reason),
            self.reason,
            self.domain,
            self.queue,
            self.iova,
            access_names(self.access),
            self.info,
            self.level
        )
    }
}

// ---- Page-table entries ----

/// Number of entries in one 4 KiB page table.
pub const PTES_PER_TABLE: usize = 512;

/// One 8-byte I/O page-table entry (SPEC.md "I/O page tables"): R and W permission bits,
/// PS (a level-2 entry maps 2 MiB, a level-3 entry 1 GiB), the address in bits 51:12, the
/// rest reserved. An entry with R = W = 0 is not present.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Pte(pub u64);

// SAFETY: a transparent wrapper of a `u64`.
unsafe impl ByteValued for Pte {}

/// How an entry at a given level decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PteKind {
    /// R = W = 0: nothing mapped here.
    NotPresent,
    /// A pointer to the next level's table at this bus address.
    Table(u64),
    /// A leaf mapping the level's page size at this bus address.
    Leaf(u64),
}

/// Why an entry is malformed at its level ([`FAULT_MALFORMED_ENTRY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PteError {
    /// A reserved bit is set.
    #[error("reserved bits {0:#x} set")]
    Reserved(u64),
    /// PS set at a level where no large page exists (4 or 1).
    #[error("page-size bit at level {0}")]
    LargeNotAllowed(u32),
    /// A large-page address not aligned to its page size.
    #[error("large-page address {0:#x} misaligned")]
    Misaligned(u64),
}

impl Pte {
    /// The empty (not present) entry.
    pub const NONE: Pte = Pte(0);

    /// An entry pointing to the next level's table at `table` (4 KiB aligned) with
    /// permissions `perm` (`PTE_R | PTE_W` bits; both for a table that holds both kinds).
    pub const fn table(table: u64, perm: u64) -> Pte {
        Pte((table & PTE_ADDR_MASK) | (perm & (PTE_R | PTE_W)))
    }

    /// A leaf mapping bus address `addr` with permissions `perm`; `large` sets PS (for a
    /// level-2 or level-3 leaf).
    pub const fn leaf(addr: u64, perm: u64, large: bool) -> Pte {
        let ps = if large { PTE_PS } else { 0 };
        Pte((addr & PTE_ADDR_MASK) | (perm & (PTE_R | PTE_W)) | ps)
    }

    /// The raw value.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// Whether R or W is set.
    pub const fn is_present(self) -> bool {
        self.0 & (PTE_R | PTE_W) != 0
    }

    /// Whether PS is set.
    pub const fn is_large(self) -> bool {
        self.0 & PTE_PS != 0
    }

    /// The `PTE_R | PTE_W` bits.
    pub const fn perm(self) -> u64 {
        self.0 & (PTE_R | PTE_W)
    }

    /// The address field.
    pub const fn addr(self) -> u64 {
        self.0 & PTE_ADDR_MASK
    }

    /// The reserved bits that are set.
    pub const fn reserved_bits(self) -> u64 {
        self.0 & PTE_RESERVED_MASK
    }

    /// Whether this is a clean present 4 KiB leaf or table pointer: R or W, no PS, no
    /// reserved bit (the translation fast path's test).
    pub const fn is_plain(self) -> bool {
        self.is_present() && self.0 & (PTE_RESERVED_MASK | PTE_PS) == 0
    }

    /// The device's decoding of the entry at page-table `level` (4..1), SPEC.md's rules.
    pub fn decode_at(self, level: u32) -> Result<PteKind, PteError> {
        if !self.is_present() {
            return Ok(PteKind::NotPresent);
        }
        if self.reserved_bits() != 0 {
            return Err(PteError::Reserved(self.reserved_bits()));
        }
        let large = self.is_large();
        if large && (level == 4 || level == 1) {
            return Err(PteError::LargeNotAllowed(level));
        }
        if level == 1 {
            return Ok(PteKind::Leaf(self.addr()));
        }
        if large {
            let size = 1u64 << (12 + 9 * (level - 1));
            if self.addr() % size != 0 {
                return Err(PteError::Misaligned(self.addr()));
            }
            return Ok(PteKind::Leaf(self.addr()));
        }
        Ok(PteKind::Table(self.addr()))
    }

    /// The entry's bytes in memory.
    pub fn encode(self) -> [u8; 8] {
        self.0.to_le_bytes()
    }

    /// An entry from its bytes in memory.
    pub fn decode(raw: [u8; 8]) -> Self {
        Pte(u64::from_le_bytes(raw))
    }

    /// The value from its memory form (little endian) to host order.
    pub fn from_le(self) -> Self {
        Pte(u64::from_le(self.0))
    }

    /// The value in its memory form (little endian).
    pub fn to_le(self) -> Self {
        self.from_le()
    }
}

impl fmt::Debug for Pte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pte({:#x}", self.0)?;
        if self.0 & PTE_R != 0 {
            f.write_str(" R")?;
        }
        if self.0 & PTE_W != 0 {
            f.write_str(" W")?;
        }
        if self.0 & PTE_PS != 0 {
            f.write_str(" PS")?;
        }
        f.write_str(")")
    }
}

/// Index into the page table of `level` (4..1) for `iova`.
pub const fn pte_index(iova: u64, level: u32) -> usize {
    ((iova >> (12 + 9 * (level - 1))) & 0x1ff) as usize
}

/// Bytes mapped by one entry at `level` (4..1): 4 KiB at level 1, 2 MiB at 2, 1 GiB at 3.
pub const fn level_size(level: u32) -> u64 {
    1 << (12 + 9 * (level - 1))
}

// ---- Names, for messages ----

/// A readable name for a completion status.
pub fn status_name(status: u8) -> &'static str {
    match status {
        STATUS_PENDING => "PENDING",
        STATUS_OK => "OK",
        STATUS_INVALID_DESCRIPTOR => "INVALID_DESCRIPTOR",
        STATUS_DMA_ERROR => "DMA_ERROR",
        STATUS_ABORTED => "ABORTED",
        _ => "unknown",
    }
}

/// A readable name for a fault reason ("none" for 0).
pub fn fault_reason_name(reason: u8) -> &'static str {
    match reason {
        0 => "none",
        FAULT_NOT_PRESENT => "NOT_PRESENT",
        FAULT_PERMISSION => "PERMISSION",
        FAULT_IOVA_WIDTH => "IOVA_WIDTH",
        FAULT_MALFORMED_ENTRY => "MALFORMED_ENTRY",
        FAULT_DESCRIPTOR_INVALID => "DESCRIPTOR_INVALID",
        FAULT_OUTSIDE_RAM => "OUTSIDE_RAM",
        FAULT_DOMAIN_DISABLED => "DOMAIN_DISABLED",
        FAULT_BUS_ERROR => "BUS_ERROR",
        _ => "unknown",
    }
}

/// Readable access flags, e.g. "write|page-walk" ("read" when no write bit is set).
pub fn access_names(access: u8) -> String {
    let mut s = String::from(if access & ACCESS_WRITE != 0 {
        "write"
    } else {
        "read"
    });
    for (bit, name) in [
        (ACCESS_DESCRIPTOR, "descriptor"),
        (ACCESS_COMPLETION, "completion"),
        (ACCESS_PAGE_WALK, "page-walk"),
    ] {
        if access & bit != 0 {
            s.push('|');
            s.push_str(name);
        }
    }
    let unknown =
        access & !(ACCESS_WRITE | ACCESS_DESCRIPTOR | ACCESS_COMPLETION | ACCESS_PAGE_WALK);
    if unknown != 0 {
        s.push_str(&format!("|{unknown:#x}"));
    }
    s
}

// The layouts have no padding: each size is the sum of its fields (checked again, field by
// field, against SPEC.md in the spec test).
const _: () = assert!(size_of::<Descriptor>() == DESC_SIZE as usize);
const _: () = assert!(size_of::<BatchElement>() == DESC_SIZE as usize);
const _: () = assert!(size_of::<CompletionRecord>() == COMPLETION_SIZE as usize);
const _: () = assert!(size_of::<FaultRecord>() == FAULT_RECORD_SIZE as usize);
const _: () = assert!(size_of::<Pte>() == 8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_round_trips_in_little_endian() {
        let d = Descriptor::copy(0x1122_3344_5566_7788, 0x99aa, 0x0102_0304)
            .with_completion(0x40)
            .with_tag(0xfeed)
            .with_interrupt();
        let raw = d.encode();
        assert_eq!(raw[0], OP_COPY);
        assert_eq!(raw[1], DESC_FLAG_INTERRUPT);
        assert_eq!(raw[4..8], [4, 3, 2, 1], "length little endian");
        assert_eq!(raw[8], 0x88, "source low byte first");
        assert_eq!(Descriptor::decode(&raw), d);
    }

    #[test]
    fn validate_names_each_malformation() {
        let ok = Descriptor::copy(0x1000, 0x2000, 16);
        assert_eq!(ok.validate(MAX_XFER), Ok(()));
        let cases = [
            (
                Descriptor { opcode: 9, ..ok },
                DescriptorError::UnknownOpcode(9),
            ),
            (
                Descriptor { flags: 0x80, ..ok },
                DescriptorError::UnknownFlag(0x80),
            ),
            (
                Descriptor {
                    reserved_lo: 1,
                    ..ok
                },
                DescriptorError::ReservedSet,
            ),
            (
                Descriptor {
                    reserved: {
                        let mut r = [0; 24];
                        r[23] = 1;
                        r
                    },
                    ..ok
                },
                DescriptorError::ReservedSet,
            ),
            (
                Descriptor { len: 0, ..ok },
                DescriptorError::BadLength {
                    opcode: OP_COPY,
                    len: 0,
                },
            ),
            (
                ok.with_completion(0x10),
                DescriptorError::MisalignedCompletion(0x10),
            ),
            (
                Descriptor::copy(0x1000, 0x1008, 16),
                DescriptorError::CopyOverlap,
            ),
            (Descriptor::batch(0x1020, 1), DescriptorError::BadBatchList),
        ];
        for (d, want) in cases {
            assert_eq!(d.validate(MAX_XFER), Err(want), "{d:?}");
        }
        assert_eq!(
            Descriptor::copy(0, 0x2000, 17).validate(16),
            Err(DescriptorError::BadLength {
                opcode: OP_COPY,
                len: 17
            })
        );
    }

    #[test]
    fn batch_elements_are_restricted() {
        let copy = BatchElement(Descriptor::copy(0x1000, 0x2000, 8));
        assert_eq!(copy.validate(MAX_XFER), Ok(()));
        assert_eq!(
            BatchElement(Descriptor::crc32c(0x1000, 8)).validate(MAX_XFER),
            Err(DescriptorError::NotAllowedInBatch(OP_CRC32C))
        );
        assert_eq!(
            BatchElement(copy.0.with_interrupt()).validate(MAX_XFER),
            Err(DescriptorError::BatchElementReports)
        );
        assert_eq!(
            BatchElement(copy.0.with_completion(0x40)).validate(MAX_XFER),
            Err(DescriptorError::BatchElementReports)
        );
    }

    #[test]
    fn completion_head_is_written_last_and_holds_the_status() {
        let c = CompletionRecord {
            status: STATUS_DMA_ERROR,
            fault_reason: FAULT_PERMISSION,
            fault_access: ACCESS_WRITE,
            bytes: 0x1000,
            fault_addr: 0xdead_0000,
            result: 7,
            tag: 0xabcd,
            ..Default::default()
        };
        let raw = c.encode();
        assert_eq!(CompletionRecord::decode(&raw), c);
        assert_eq!(c.head().to_le_bytes(), raw[..4]);
        assert_eq!(CompletionRecord::status_of_head(c.head()), STATUS_DMA_ERROR);
        assert_eq!(c.body()[..], raw[CompletionRecord::BODY_OFFSET as usize..]);
        assert!(c.to_string().contains("PERMISSION"), "{c}");
    }

    #[test]
    fn fault_record_round_trips() {
        let f = FaultRecord {
            reason: FAULT_MALFORMED_ENTRY,
            access: ACCESS_WRITE | ACCESS_PAGE_WALK,
            domain: 0x0102,
            queue: 3,
            iova: 0x1234_5000,
            info: 0xffff,
            level: 2,
            seq: 9,
            ..Default::default()
        };
        let raw = f.encode();
        assert_eq!(raw[2..4], [2, 1]);
        assert_eq!(FaultRecord::decode(&raw), f);
        assert_eq!(access_names(f.access), "write|page-walk");
        assert_eq!(access_names(0x80), "read|0x80");
    }

    #[test]
    fn pte_decodes_by_level() {
        let rw = PTE_R | PTE_W;
        assert_eq!(Pte::NONE.decode_at(4), Ok(PteKind::NotPresent));
        assert_eq!(
            Pte::table(0x5000, rw).decode_at(4),
            Ok(PteKind::Table(0x5000))
        );
        assert_eq!(
            Pte::leaf(0x20_0000, PTE_R, true).decode_at(2),
            Ok(PteKind::Leaf(0x20_0000))
        );
        assert_eq!(
            Pte::leaf(0x20_1000, PTE_R, true).decode_at(2),
            Err(PteError::Misaligned(0x20_1000))
        );
        assert_eq!(
            Pte::leaf(0x4000_0000, rw, true).decode_at(4),
            Err(PteError::LargeNotAllowed(4))
        );
        assert_eq!(
            Pte::leaf(0x1000, rw, true).decode_at(1),
            Err(PteError::LargeNotAllowed(1))
        );
        assert_eq!(
            Pte(0x1000 | PTE_R | 1 << 60).decode_at(1),
            Err(PteError::Reserved(1 << 60))
        );
        assert!(Pte::leaf(0x1000, PTE_W, false).is_plain());
        assert!(!Pte::leaf(0x20_0000, PTE_W, true).is_plain());
        assert_eq!(Pte::decode(Pte(0x1003).encode()), Pte(0x1003));
        assert_eq!(pte_index(0x0000_4020_0000_3000, 4), 0x80);
        assert_eq!(level_size(3), 1 << 30);
    }
}
