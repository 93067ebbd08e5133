//! What a trace records: the events, with their fields, and the file header.
//!
//! These are the wire layout of a trace file: each record is encoded with `postcard`
//! (serde, variable-length integers), so the types here are the format, and the
//! [`FORMAT_VERSION`] changes whenever one of them does.

use serde::{Deserialize, Serialize};

/// Version of the trace format (the types of this module).
pub const FORMAT_VERSION: u16 = 4;

/// No queue: an access made for the register front end or the transport.
pub const NO_QUEUE: u16 = u16::MAX;

/// The device configuration a trace was recorded with (what a replay builds its device
/// from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceConfig {
    /// Descriptor queues.
    pub queues: u32,
    /// DMA domains.
    pub domains: u32,
    /// IOVA width in bits.
    pub iova_width: u32,
    /// IOTLB entries.
    pub iotlb_entries: u32,
    /// Largest transfer of one descriptor, bytes.
    pub max_transfer: u32,
    /// Strict IOTLB mode.
    pub strict_iotlb: bool,
}

/// The header at the start of a trace file, after the magic and the format version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The device's version (`DEVICE_VERSION`, major << 16 | minor).
    pub device_version: u32,
    /// Wall-clock time of the trace's time 0, in nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    /// The device configuration.
    pub config: TraceConfig,
    /// Data checksums were recorded ([`Event::Data`]; `--trace-data`).
    pub data: bool,
}

/// One event with its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Nanoseconds since the trace started (a monotonic clock).
    pub t_ns: u64,
    /// What happened.
    pub event: Event,
}

/// A translation's IOTLB outcome and the page size it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translated {
    /// Domain.
    pub domain: u16,
    /// Queue whose worker translated ([`NO_QUEUE`]: the front end).
    pub queue: u16,
    /// First IOVA.
    pub iova: u64,
    /// Its bus address.
    pub bus: u64,
    /// Bytes translated from `iova`: one page's rest, or a run of pages contiguous in bus
    /// memory.
    pub len: u64,
    /// Size of the (first) page: 4 KiB, 2 MiB or 1 GiB; 0 for pass-through.
    pub page_size: u64,
    /// `ACCESS_WRITE` for a write, else 0.
    pub write: bool,
    /// Pages found in the IOTLB.
    pub hits: u32,
    /// Pages that missed and were walked.
    pub misses: u32,
}

/// A fault, as the device reports it (and writes it to the fault log, when enabled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// `FAULT_*` reason.
    pub reason: u8,
    /// `ACCESS_*` flags.
    pub access: u8,
    /// Domain.
    pub domain: u16,
    /// Queue.
    pub queue: u16,
    /// The faulting IOVA.
    pub iova: u64,
    /// Detail (the entry, or the bus address).
    pub info: u64,
    /// Page-table level, 0 outside a walk.
    pub level: u32,
    /// Sequence number in the fault log.
    pub seq: u32,
    /// Injected by an error-injection rule rather than caused by the guest.
    pub injected: bool,
}

/// What happened. Field names follow SPEC.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A write of `Q_TAIL` (the doorbell).
    Doorbell {
        /// Queue.
        queue: u16,
        /// The tail written.
        tail: u32,
    },
    /// A descriptor fetched: its bytes in full (8 little-endian words).
    Fetch {
        /// Queue.
        queue: u16,
        /// Ring slot.
        slot: u32,
        /// IOVA it was fetched from.
        iova: u64,
        /// Its bus address.
        bus: u64,
        /// The 64 bytes, as 8 little-endian u64.
        desc: [u64; 8],
    },
    /// A register write (BAR0, 32 bits) other than a doorbell: what a replay re-applies.
    RegWrite {
        /// Register offset.
        reg: u64,
        /// Value written.
        value: u32,
    },
    /// A page-table entry the device read (walks of the engine's workers), for replay.
    PteRead {
        /// The queue whose worker walked.
        queue: u16,
        /// Bus address of the entry.
        addr: u64,
        /// Its value.
        value: u64,
    },
    /// An element of a BATCH list fetched (its bytes in full, as for a descriptor).
    Element {
        /// Queue.
        queue: u16,
        /// Index in the list.
        index: u32,
        /// Bus address it was read from.
        bus: u64,
        /// The 64 bytes, as 8 little-endian u64.
        desc: [u64; 8],
    },
    /// A translation of data (of one page, or of a run of pages). Descriptor, element and
    /// completion-record translations are in those events (their IOVA and bus address).
    Translate(Translated),
    /// A descriptor finished; its completion record (when it has one) says the same.
    Complete {
        /// Queue.
        queue: u16,
        /// Ring slot.
        slot: u32,
        /// `STATUS_*`.
        status: u8,
        /// Bytes processed.
        bytes: u32,
        /// Result (COMPARE offset, CRC32C value), else 0.
        result: u64,
        /// The completion record was written (false: none asked for, or it could not be).
        written: bool,
        /// Bus address of the record (0: none written).
        record_bus: u64,
    },
    /// A fault reported.
    Fault(FaultEvent),
    /// An interrupt raised (MSI-X vector; delivery depends on the table's mask).
    Interrupt {
        /// Vector.
        vector: u16,
        /// The queue it is for ([`NO_QUEUE`]: the fault log).
        queue: u16,
    },
    /// An IOTLB invalidation (`REG_INV_CMD`).
    Invalidate {
        /// `INV_*` kind.
        kind: u8,
        /// Domain (all: `u16::MAX`).
        domain: u16,
        /// First IOVA of a range invalidation, else 0.
        iova: u64,
        /// Length of a range invalidation, else 0.
        len: u64,
    },
    /// A vfio-user DMA_MAP: bus memory added.
    DmaMap {
        /// Bus address.
        iova: u64,
        /// Size.
        size: u64,
        /// The client may let the device read.
        read: bool,
        /// The client may let the device write.
        write: bool,
        /// Mapped from a file descriptor (false: reached with DMA_READ / DMA_WRITE).
        fd: bool,
    },
    /// A vfio-user DMA_UNMAP: bus memory removed.
    DmaUnmap {
        /// Bus address.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// A reset.
    Reset {
        /// The kind of reset.
        kind: ResetKind,
    },
    /// An error-injection rule acted (see `core::inject`).
    Injected {
        /// The queue it acted on.
        queue: u16,
        /// What it did.
        what: Injected,
    },
    /// The data an operation read and wrote, by checksum (recorded with `--trace-data`):
    /// after each COPY, FILL, COMPARE and CRC32C that completed without a fault (a ring
    /// descriptor or a BATCH element), before its descriptor's completion.
    Data {
        /// Queue.
        queue: u16,
        /// `OP_*` of the operation.
        opcode: u8,
        /// Bytes the checksums cover: the transfer (a COMPARE: up to and including the
        /// first difference).
        bytes: u32,
        /// CRC32C of the bytes read from the source (COPY, COMPARE, CRC32C), else 0.
        src: u32,
        /// CRC32C of the destination after the operation wrote it (COPY, FILL), or of the
        /// second side a COMPARE read, else 0.
        dst: u32,
    },
    /// Events lost because the writer fell behind: the total so far.
    Dropped {
        /// Events dropped since the trace started.
        total: u64,
    },
}

/// What an injection rule did ([`Event::Injected`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Injected {
    /// `corrupt-copy`: the byte at `offset` of the COPY was XORed with `xor`.
    CorruptCopy {
        /// Offset in the COPY.
        offset: u32,
        /// The XOR.
        xor: u8,
    },
    /// `error-status`: the descriptor completed with `status` without running.
    ErrorStatus {
        /// The status.
        status: u8,
    },
    /// `drop-interrupt`: the interrupt on `vector` was not sent.
    DropInterrupt {
        /// The vector.
        vector: u16,
    },
    /// `delay-interrupt`: the interrupt on `vector` is sent `us` later.
    DelayInterrupt {
        /// The vector.
        vector: u16,
        /// The delay, microseconds.
        us: u64,
    },
    /// `stall-queue`: the queue stopped fetching.
    Stall,
    /// `spurious-fault`: a fault nobody caused was reported (the fault event follows).
    SpuriousFault,
    /// `never-complete`: the descriptor fetched will not complete.
    NeverComplete,
}

/// Which reset a [`Event::Reset`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetKind {
    /// `DEV_CTRL_RESET`: queues, domains, IOTLB, fault log and statistics.
    Device,
    /// Function-level reset (the VMM's device reset, or a client's disconnection): the
    /// device reset, configuration space and the MSI-X table.
    Function,
}

impl Event {
    /// The event's kind, as the tools name it (`domdma-trace show --kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Doorbell { .. } => "doorbell",
            Event::RegWrite { .. } => "reg_write",
            Event::PteRead { .. } => "pte_read",
            Event::Element { .. } => "element",
            Event::Fetch { .. } => "fetch",
            Event::Translate(_) => "translate",
            Event::Complete { .. } => "complete",
            Event::Fault(_) => "fault",
            Event::Interrupt { .. } => "interrupt",
            Event::Invalidate { .. } => "invalidate",
            Event::DmaMap { .. } => "dma_map",
            Event::DmaUnmap { .. } => "dma_unmap",
            Event::Reset { .. } => "reset",
            Event::Injected { .. } => "injected",
            Event::Data { .. } => "data",
            Event::Dropped { .. } => "dropped",
        }
    }

    /// Every kind [`Event::kind`] returns.
    pub const KINDS: [&'static str; 16] = [
        "doorbell",
        "reg_write",
        "pte_read",
        "element",
        "fetch",
        "translate",
        "complete",
        "fault",
        "interrupt",
        "invalidate",
        "dma_map",
        "dma_unmap",
        "reset",
        "injected",
        "data",
        "dropped",
    ];

    /// The queue the event belongs to, if any.
    pub fn queue(&self) -> Option<u16> {
        let q = match *self {
            Event::Doorbell { queue, .. }
            | Event::Fetch { queue, .. }
            | Event::Complete { queue, .. }
            | Event::Interrupt { queue, .. }
            | Event::PteRead { queue, .. }
            | Event::Element { queue, .. }
            | Event::Data { queue, .. }
            | Event::Injected { queue, .. } => queue,
            Event::Translate(t) => t.queue,
            Event::Fault(f) => f.queue,
            _ => NO_QUEUE,
        };
        (q != NO_QUEUE).then_some(q)
    }

    /// The domain the event belongs to, if any.
    pub fn domain(&self) -> Option<u16> {
        match *self {
            Event::Translate(t) => Some(t.domain),
            Event::Fault(f) => Some(f.domain),
            Event::Invalidate { domain, .. } if domain != u16::MAX => Some(domain),
            _ => None,
        }
    }

    /// The IOVA range the event touches, if any (first, length).
    pub fn iova_range(&self) -> Option<(u64, u64)> {
        match *self {
            Event::Fetch { iova, .. } => Some((iova, 64)),
            Event::Translate(t) => Some((t.iova, t.len)),
            Event::Fault(f) => Some((f.iova, 1)),
            Event::Invalidate { iova, len, .. } if len != 0 => Some((iova, len)),
            Event::DmaMap { iova, size, .. } | Event::DmaUnmap { iova, size } => Some((iova, size)),
            _ => None,
        }
    }
}
