//! The device core: a state machine with no socket code.
//!
//! It owns the configuration space, the register file, the descriptor queues and the DMA
//! engine. Bus memory (what the VMM mapped for the device) is reached only through
//! `vm-memory`; interrupts go out through an [`InterruptSink`]. Every guest-controlled value
//! is checked before use: a bad descriptor or address gives an error status in the completion
//! record (or a queue error state), never a panic, and no byte outside a mapped range is read
//! or written. See `device/SPEC.md` for the programming model.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use tracing::{debug, warn};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};

use crate::irq::InterruptSink;
use crate::pci::{ConfigSpace, PCI_COMMAND};
use crate::spec::*;

pub mod bus;
pub mod mmu;
pub mod stats;

pub use stats::DeviceStats;

/// The device's view of bus memory: what the VMM has mapped for it (DMA_MAP).
pub type BusMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Device configuration chosen at start-up (the server's options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Number of descriptor queues, 1..=`MAX_QUEUES`.
    pub queues: u32,
    /// Number of DMA domains, 1..=`MAX_DOMAINS`.
    pub domains: u32,
    /// IOTLB entries, 1..=`MAX_IOTLB_ENTRIES`.
    pub iotlb_entries: u32,
    /// IOVA width in bits: `DEFAULT_IOVA_WIDTH` (48) or `IOVA_WIDTH_32`.
    pub iova_width: u32,
    /// Maximum transfer length of one descriptor in bytes (reported in `REG_MAX_XFER`).
    pub max_transfer: u32,
    /// Strict IOTLB mode: re-walk on every hit and count stale uses.
    pub strict_iotlb: bool,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            queues: DEFAULT_QUEUES,
            domains: DEFAULT_DOMAINS,
            iotlb_entries: DEFAULT_IOTLB_ENTRIES,
            iova_width: DEFAULT_IOVA_WIDTH,
            max_transfer: MAX_XFER,
            strict_iotlb: false,
        }
    }
}

/// A configuration value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A count outside its allowed range.
    #[error("{what} must be between {min} and {max}, not {value}")]
    OutOfRange {
        /// Which option.
        what: &'static str,
        /// The value given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// An IOVA width other than 32 or 48.
    #[error("the IOVA width must be 32 or 48 bits, not {0}")]
    IovaWidth(u32),
}

impl DeviceConfig {
    /// Check every value against the limits in SPEC.md.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let range = |what, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    what,
                    value: value.into(),
                    min: min.into(),
                    max: max.into(),
                })
            }
        };
        range("queues", self.queues, 1, MAX_QUEUES)?;
        range("domains", self.domains, 1, MAX_DOMAINS)?;
        range("IOTLB entries", self.iotlb_entries, 1, MAX_IOTLB_ENTRIES)?;
        range("max transfer", self.max_transfer, 4096, 1 << 30)?;
        match self.iova_width {
            DEFAULT_IOVA_WIDTH | IOVA_WIDTH_32 => Ok(()),
            w => Err(ConfigError::IovaWidth(w)),
        }
    }

    /// Number of MSI-X vectors: one per queue and one for the fault log.
    pub fn msix_vectors(&self) -> u16 {
        (self.queues + 1) as u16
    }
}

/// Why a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFault {
    /// Enabled with a misaligned base or a size that is not a power of two in range.
    BadConfig,
    /// The doorbell was written with an index beyond the ring.
    BadTail(u32),
    /// The descriptor at this bus address could not be read.
    DescriptorUnreadable(u64),
}

/// Lifecycle of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueState {
    /// Not enabled; doorbells are ignored.
    Disabled,
    /// Enabled; doorbells start processing.
    Running,
    /// Stopped on an error until the driver disables it.
    Halted(QueueFault),
}

/// One descriptor queue.
#[derive(Debug, Clone)]
struct Queue {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
    vector: u16,
    completed: u32,
    errors: u32,
    state: QueueState,
}

impl Queue {
    fn new() -> Self {
        Self {
            base: 0,
            size: 0,
            head: 0,
            tail: 0,
            vector: 0,
            completed: 0,
            errors: 0,
            state: QueueState::Disabled,
        }
    }

    fn status(&self) -> u32 {
        match self.state {
            QueueState::Disabled => 0,
            QueueState::Running => Q_STATUS_ENABLED,
            QueueState::Halted(_) => Q_STATUS_ENABLED | Q_STATUS_ERROR,
        }
    }
}

/// A descriptor as fetched from the ring, not yet validated.
#[derive(Debug, Clone, Copy)]
struct Descriptor {
    opcode: u8,
    flags: u8,
    len: u32,
    src: u64,
    dst: u64,
    completion: u64,
    tag: u64,
    reserved_clear: bool,
}

impl Descriptor {
    fn parse(raw: &[u8; DESC_SIZE as usize]) -> Self {
        let u32_at = |o: u64| {
            let o = o as usize;
            u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]])
        };
        let u64_at = |o: u64| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        let reserved_clear =
            raw[2] == 0 && raw[3] == 0 && raw[DESC_RESERVED as usize..].iter().all(|&b| b == 0);
        Self {
            opcode: raw[DESC_OPCODE as usize],
            flags: raw[DESC_FLAGS as usize],
            len: u32_at(DESC_LEN),
            src: u64_at(DESC_SRC),
            dst: u64_at(DESC_DST),
            completion: u64_at(DESC_COMPLETION),
            tag: u64_at(DESC_TAG),
            reserved_clear,
        }
    }
}

/// What a descriptor's execution reports in its completion record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    status: u8,
    bytes: u32,
    fault_addr: u64,
    result: u64,
}

impl Outcome {
    fn ok(bytes: u32) -> Self {
        Self {
            status: STATUS_OK,
            bytes,
            fault_addr: 0,
            result: 0,
        }
    }
    fn invalid() -> Self {
        Self {
            status: STATUS_INVALID_DESCRIPTOR,
            bytes: 0,
            fault_addr: 0,
            result: 0,
        }
    }
    fn dma_error(addr: u64) -> Self {
        Self {
            status: STATUS_DMA_ERROR,
            bytes: 0,
            fault_addr: addr,
            result: 0,
        }
    }
}

/// Direction of a DMA access, for permission checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Check that `[addr, addr + len)` is mapped for the device with the permission `access`.
/// Returns the first bus address that is not.
fn check_range(mem: &GuestMemoryMmap, addr: u64, len: u64, access: Access) -> Result<(), u64> {
    if len == 0 {
        return Ok(());
    }
    let last = addr.checked_add(len - 1).ok_or(addr)?;
    let mut a = addr;
    loop {
        let region = mem.find_region(GuestAddress(a)).ok_or(a)?;
        let need = match access {
            Access::Read => libc::PROT_READ,
            Access::Write => libc::PROT_WRITE,
        };
        if region.prot() & need == 0 {
            return Err(a);
        }
        let region_last = region.last_addr().0;
        if region_last >= last {
            return Ok(());
        }
        a = region_last + 1;
    }
}

/// Number of bytes from `addr` to the end of the region holding it (0 when unmapped).
fn region_remaining(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.find_region(GuestAddress(addr))
        .map_or(0, |r| r.last_addr().0 - addr + 1)
}

/// The DMA device.
pub struct Device {
    config: DeviceConfig,
    pci: ConfigSpace,
    scratch: u32,
    queues: Vec<Queue>,
    msix_table: Vec<u8>,
    mem: BusMemory,
    irq: Arc<dyn InterruptSink>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("pci", &self.pci)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

const MSIX_ENTRY_SIZE: usize = 16;

fn bar_sizes() -> [u64; 6] {
    let mut bars = [0; 6];
    bars[REGS_BAR] = REGS_BAR_SIZE;
    bars[MSIX_BAR] = MSIX_BAR_SIZE;
    bars
}

impl Device {
    /// Create a device in its reset state.
    pub fn new(config: DeviceConfig, mem: BusMemory, irq: Arc<dyn InterruptSink>) -> Self {
        let self_vectors = config.msix_vectors();
        let queues = config.queues;
        let mut dev = Self {
            config,
            pci: ConfigSpace::new(&bar_sizes(), self_vectors),
            scratch: 0,
            queues: (0..queues).map(|_| Queue::new()).collect(),
            msix_table: vec![0; usize::from(self_vectors) * MSIX_ENTRY_SIZE],
            mem,
            irq,
        };
        dev.reset_msix_table();
        dev
    }

    /// Size of configuration space in bytes.
    pub fn config_size(&self) -> u64 {
        crate::pci::CONFIG_SPACE_SIZE as u64
    }

    /// Read configuration space. Bytes beyond its end read as 0xff.
    pub fn config_read(&mut self, offset: u64, data: &mut [u8]) {
        self.pci.read(offset, data);
    }

    /// Write configuration space. Read-only bits keep their value. Setting Bus Master Enable
    /// starts processing of descriptors submitted while it was clear.
    pub fn config_write(&mut self, offset: u64, data: &[u8]) {
        let was_master = self.pci.bus_master();
        self.pci.write(offset, data);
        let touches_command = offset <= PCI_COMMAND as u64 + 1
            && offset.saturating_add(data.len() as u64) > PCI_COMMAND as u64;
        if touches_command && !was_master && self.pci.bus_master() {
            debug!("bus mastering enabled");
            for q in 0..self.queues.len() {
                self.process(q);
            }
        }
    }

    /// Size of BAR `bar` in bytes, 0 when the BAR is not implemented.
    pub fn bar_size(&self, bar: usize) -> u64 {
        bar_sizes().get(bar).copied().unwrap_or(0)
    }

    /// Read from a BAR. Accesses outside the BAR, or of a size other than 1, 2, 4 or 8
    /// bytes, read as zero.
    pub fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match bar {
            REGS_BAR => {
                let Some((reg, shift)) = reg_access(offset, data.len()) else {
                    warn!(offset, len = data.len(), "guest error: bad register read");
                    return;
                };
                let mut value = u64::from(self.reg_read(reg)) >> shift;
                if data.len() == 8 {
                    value |= u64::from(self.reg_read(reg + 4)) << 32;
                }
                data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
            }
            MSIX_BAR => self.msix_read(offset, data),
            _ => warn!(bar, offset, "guest error: read of an absent BAR"),
        }
    }

    /// Write to a BAR. Register writes must be 4 or 8 bytes wide and aligned; others are
    /// ignored and logged as guest errors.
    pub fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            REGS_BAR => match (reg_access(offset, data.len()), data.len()) {
                (Some((reg, 0)), 4) => {
                    self.reg_write(reg, u32::from_le_bytes(data.try_into().unwrap_or([0; 4])))
                }
                (Some((reg, 0)), 8) => {
                    let v = u64::from_le_bytes(data.try_into().unwrap_or([0; 8]));
                    self.reg_write(reg, v as u32);
                    self.reg_write(reg + 4, (v >> 32) as u32);
                }
                _ => warn!(offset, len = data.len(), "guest error: bad register write"),
            },
            MSIX_BAR => self.msix_write(offset, data),
            _ => warn!(bar, offset, "guest error: write to an absent BAR"),
        }
    }

    /// Number of MSI-X vectors.
    pub fn msix_vectors(&self) -> u16 {
        self.config.msix_vectors()
    }

    /// A snapshot of every counter (served by the inspector).
    pub fn stats(&self) -> DeviceStats {
        DeviceStats::default()
    }

    /// The state of queue `q`, if it exists.
    pub fn queue_state(&self, q: usize) -> Option<QueueState> {
        self.queues.get(q).map(|q| q.state)
    }

    /// Function-level reset: registers, queues, MSI-X table and configuration space return
    /// to their reset values. Bus memory mappings and interrupt routes belong to the
    /// transport and are kept.
    pub fn reset(&mut self) {
        self.soft_reset();
        self.pci = ConfigSpace::new(&bar_sizes(), self.config.msix_vectors());
        self.reset_msix_table();
    }

    /// The reset started by `DEV_CTRL_RESET`: registers and queues only.
    fn soft_reset(&mut self) {
        debug!("device reset");
        self.scratch = 0;
        self.queues.iter_mut().for_each(|q| *q = Queue::new());
    }

    fn reset_msix_table(&mut self) {
        self.msix_table.fill(0);
        for entry in self.msix_table.chunks_mut(MSIX_ENTRY_SIZE) {
            entry[12] = 1; // vector control: masked
        }
    }

    fn reg_read(&self, reg: u64) -> u32 {
        match reg {
            REG_ID => DEVICE_ID_MAGIC,
            REG_VERSION => DEVICE_VERSION,
            REG_CAP => {
                self.config.queues << CAP_QUEUES_SHIFT
                    | u32::from(self.config.msix_vectors()) << CAP_VECTORS_SHIFT
                    | self.config.iova_width << CAP_IOVA_WIDTH_SHIFT
                    | self.config.domains << CAP_DOMAINS_SHIFT
            }
            REG_CAP_OPS => 1 << OP_NOP | 1 << OP_COPY | 1 << OP_FILL,
            REG_MAX_XFER => self.config.max_transfer,
            REG_SCRATCH => self.scratch,
            REG_DEV_CTRL => 0,
            REG_DEV_STATUS => {
                if self.pci.bus_master() {
                    DEV_STATUS_BUS_MASTER
                } else {
                    0
                }
            }
            _ => match queue_of(reg, self.queues.len()) {
                Some((q, r)) => self.queue_reg_read(q, r),
                None => {
                    debug!(reg, "read of an unimplemented register");
                    0
                }
            },
        }
    }

    fn reg_write(&mut self, reg: u64, value: u32) {
        match reg {
            REG_SCRATCH => self.scratch = value,
            REG_DEV_CTRL => {
                if value & DEV_CTRL_RESET != 0 {
                    self.soft_reset();
                }
            }
            _ => match queue_of(reg, self.queues.len()) {
                Some((q, r)) => self.queue_reg_write(q, r, value),
                None => debug!(reg, value, "write to a read-only or unimplemented register"),
            },
        }
    }

    fn queue_reg_read(&self, q: usize, reg: u64) -> u32 {
        let queue = &self.queues[q];
        match reg {
            Q_BASE_LO => queue.base as u32,
            Q_BASE_HI => (queue.base >> 32) as u32,
            Q_SIZE => queue.size,
            Q_CTRL => {
                if queue.state == QueueState::Disabled {
                    0
                } else {
                    Q_CTRL_ENABLE
                }
            }
            Q_HEAD => queue.head,
            Q_TAIL => queue.tail,
            Q_STATUS => queue.status(),
            Q_MSIX_VECTOR => u32::from(queue.vector),
            Q_COMPLETED => queue.completed,
            Q_ERRORS => queue.errors,
            _ => 0,
        }
    }

    fn queue_reg_write(&mut self, q: usize, reg: u64, value: u32) {
        let vectors = self.config.msix_vectors();
        let queue = &mut self.queues[q];
        let configurable = queue.state == QueueState::Disabled;
        match reg {
            Q_BASE_LO | Q_BASE_HI | Q_SIZE if !configurable => {
                warn!(
                    q,
                    reg, "guest error: queue reconfigured while enabled; ignored"
                )
            }
            Q_BASE_LO => queue.base = (queue.base & !0xffff_ffff) | u64::from(value),
            Q_BASE_HI => queue.base = (queue.base & 0xffff_ffff) | u64::from(value) << 32,
            Q_SIZE => queue.size = value,
            Q_MSIX_VECTOR => match u16::try_from(value) {
                Ok(v) if v < vectors => queue.vector = v,
                _ => warn!(q, value, "guest error: MSI-X vector out of range; ignored"),
            },
            Q_CTRL => {
                let enable = value & Q_CTRL_ENABLE != 0;
                match (queue.state, enable) {
                    (QueueState::Disabled, true) => {
                        queue.head = 0;
                        queue.tail = 0;
                        let size_ok = (Q_SIZE_MIN..=Q_SIZE_MAX).contains(&queue.size)
                            && queue.size.is_power_of_two();
                        queue.state = if size_ok && queue.base % DESC_SIZE == 0 {
                            QueueState::Running
                        } else {
                            warn!(
                                q,
                                base = queue.base,
                                size = queue.size,
                                "guest error: bad queue configuration"
                            );
                            QueueState::Halted(QueueFault::BadConfig)
                        };
                    }
                    (_, false) => {
                        queue.state = QueueState::Disabled;
                        queue.head = 0;
                        queue.tail = 0;
                    }
                    (_, true) => {}
                }
            }
            Q_TAIL => match queue.state {
                QueueState::Running if value < queue.size => {
                    queue.tail = value;
                    self.process(q);
                }
                QueueState::Running => {
                    warn!(q, value, "guest error: doorbell beyond the ring");
                    queue.state = QueueState::Halted(QueueFault::BadTail(value));
                }
                _ => debug!(q, value, "doorbell on a queue that is not running; ignored"),
            },
            _ => debug!(q, reg, value, "write to a read-only queue register"),
        }
    }

    /// Process queue `q` from head to tail (when it runs and bus mastering is on).
    fn process(&mut self, q: usize) {
        if !self.pci.bus_master() {
            debug!(
                q,
                "doorbell with bus mastering disabled; descriptors stay pending"
            );
            return;
        }
        let mem = self.mem.memory();
        while self.queues[q].state == QueueState::Running
            && self.queues[q].head != self.queues[q].tail
        {
            let queue = &self.queues[q];
            // The base is guest-controlled: the slot address may wrap.
            let addr = queue.base.wrapping_add(u64::from(queue.head) * DESC_SIZE);
            let mut raw = [0u8; DESC_SIZE as usize];
            if addr < queue.base
                || check_range(&mem, addr, DESC_SIZE, Access::Read).is_err()
                || mem.read_slice(&mut raw, GuestAddress(addr)).is_err()
            {
                warn!(
                    q,
                    addr, "guest error: descriptor not readable; queue halted"
                );
                self.queues[q].state = QueueState::Halted(QueueFault::DescriptorUnreadable(addr));
                break;
            }
            let desc = Descriptor::parse(&raw);
            let outcome = self.execute(&mem, &desc);
            let completion_written = self.complete(&mem, &desc, &outcome);
            let queue = &mut self.queues[q];
            queue.head = (queue.head + 1) % queue.size;
            queue.completed = queue.completed.wrapping_add(1);
            if outcome.status != STATUS_OK || !completion_written {
                queue.errors = queue.errors.wrapping_add(1);
            }
            if desc.flags & !DESC_FLAGS_VALID == 0 && desc.flags & DESC_FLAG_INTERRUPT != 0 {
                self.irq.trigger(queue.vector);
            }
        }
    }

    /// Validate and run one descriptor.
    fn execute(&self, mem: &GuestMemoryMmap, d: &Descriptor) -> Outcome {
        let known_op = matches!(d.opcode, OP_NOP | OP_COPY | OP_FILL);
        let len_ok = match d.opcode {
            OP_NOP => d.len == 0,
            _ => d.len != 0 && d.len <= self.config.max_transfer,
        };
        if !known_op
            || !len_ok
            || d.flags & !DESC_FLAGS_VALID != 0
            || !d.reserved_clear
            || d.completion % COMPLETION_SIZE != 0
        {
            debug!(?d, "malformed descriptor");
            return Outcome::invalid();
        }
        let len = u64::from(d.len);
        match d.opcode {
            OP_COPY => {
                let overlap =
                    d.src < d.dst.saturating_add(len) && d.dst < d.src.saturating_add(len);
                if overlap {
                    debug!(?d, "COPY with overlapping ranges");
                    return Outcome::invalid();
                }
                if let Err(a) = check_range(mem, d.src, len, Access::Read)
                    .and_then(|()| check_range(mem, d.dst, len, Access::Write))
                {
                    warn!(addr = a, "DMA to or from an unmapped address");
                    return Outcome::dma_error(a);
                }
                match copy(mem, d.src, d.dst, len) {
                    Ok(()) => Outcome::ok(d.len),
                    Err(a) => Outcome::dma_error(a),
                }
            }
            OP_FILL => {
                if let Err(a) = check_range(mem, d.dst, len, Access::Write) {
                    warn!(addr = a, "DMA to an unmapped address");
                    return Outcome::dma_error(a);
                }
                match fill(mem, d.dst, len, d.src) {
                    Ok(()) => Outcome::ok(d.len),
                    Err(a) => Outcome::dma_error(a),
                }
            }
            _ => Outcome::ok(0),
        }
    }

    /// Write the completion record, status last. Returns false when there was a record to
    /// write and it could not be written.
    fn complete(&self, mem: &GuestMemoryMmap, d: &Descriptor, o: &Outcome) -> bool {
        if d.completion == 0 {
            return true;
        }
        if d.completion % COMPLETION_SIZE != 0
            || check_range(mem, d.completion, COMPLETION_SIZE, Access::Write).is_err()
        {
            warn!(
                addr = d.completion,
                "guest error: completion record not writable"
            );
            return false;
        }
        let mut body = [0u8; (COMPLETION_SIZE - CPL_BYTES) as usize];
        let mut put = |off: u64, bytes: &[u8]| {
            let o = (off - CPL_BYTES) as usize;
            body[o..o + bytes.len()].copy_from_slice(bytes);
        };
        put(CPL_BYTES, &o.bytes.to_le_bytes());
        put(CPL_FAULT_ADDR, &o.fault_addr.to_le_bytes());
        put(CPL_RESULT, &o.result.to_le_bytes());
        put(CPL_TAG, &d.tag.to_le_bytes());
        let body_ok = mem
            .write_slice(&body, GuestAddress(d.completion + CPL_BYTES))
            .is_ok();
        // The status must become visible only after the rest of the record.
        fence(Ordering::Release);
        let status_ok = mem
            .write_obj(u32::from(o.status).to_le(), GuestAddress(d.completion + CPL_STATUS))
            .is_ok();
        body_ok && status_ok
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.msix_table.get(off..off.saturating_add(data.len())) {
            data.copy_from_slice(src);
        }
        // The PBA and the gap read as zero: the device keeps no pending bits, as the VMM
        // emulates masking (see SPEC.md, "Interrupts").
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        match self.msix_table.get_mut(off..off.saturating_add(data.len())) {
            Some(dst) => dst.copy_from_slice(data),
            None => debug!(offset, "write outside the MSI-X table ignored"),
        }
    }
}

/// Split a BAR0 access into (dword register offset, bit shift). Accesses must be naturally
/// aligned and 1, 2, 4 or 8 bytes wide, and stay inside the BAR.
fn reg_access(offset: u64, len: usize) -> Option<(u64, u32)> {
    let len64 = len as u64;
    let in_bar = offset
        .checked_add(len64)
        .is_some_and(|end| end <= REGS_BAR_SIZE);
    if !matches!(len, 1 | 2 | 4 | 8) || offset % len64 != 0 || !in_bar {
        return None;
    }
    Some((offset & !3, ((offset & 3) * 8) as u32))
}

/// Map a register offset to (queue index, register within the queue block).
fn queue_of(reg: u64, num_queues: usize) -> Option<(usize, u64)> {
    let rel = reg.checked_sub(QUEUE_BASE)?;
    let q = usize::try_from(rel / QUEUE_STRIDE).ok()?;
    (q < num_queues).then_some((q, rel % QUEUE_STRIDE))
}

/// Copy between two ranges already checked to be mapped. Returns the failing address if
/// the memory changed under us.
fn copy(mem: &GuestMemoryMmap, src: u64, dst: u64, len: u64) -> Result<(), u64> {
    let mut done = 0;
    while done < len {
        let (s, d) = (src + done, dst + done);
        let chunk = (len - done)
            .min(region_remaining(mem, s))
            .min(region_remaining(mem, d));
        if chunk == 0 {
            return Err(if region_remaining(mem, s) == 0 { s } else { d });
        }
        let n = chunk as usize;
        let from = mem.get_slice(GuestAddress(s), n).map_err(|_| s)?;
        let to = mem.get_slice(GuestAddress(d), n).map_err(|_| d)?;
        from.copy_to_volatile_slice(to);
        done += chunk;
    }
    Ok(())
}

/// Fill a range already checked to be mapped with a repeated 64-bit little-endian pattern.
fn fill(mem: &GuestMemoryMmap, dst: u64, len: u64, pattern: u64) -> Result<(), u64> {
    const BLOCK: usize = 4096;
    let mut buf = [0u8; BLOCK + 8];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern.to_le_bytes()[i % 8];
    }
    let mut done = 0u64;
    while done < len {
        let phase = (done % 8) as usize;
        let n = (len - done).min(BLOCK as u64) as usize;
        mem.write_slice(&buf[phase..phase + n], GuestAddress(dst + done))
            .map_err(|_| dst + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
