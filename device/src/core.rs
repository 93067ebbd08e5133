//! The device core: a state machine with no socket code.
//!
//! It owns the configuration space, the register file, the descriptor queues, the DMA
//! domains (through [`mmu::Mmu`]), the fault log and the DMA engine, whose workers run one
//! thread per queue (see [`engine`]). Bus memory (what the VMM mapped for the device) is
//! reached only through `vm-memory`; interrupts go out through an [`InterruptSink`]. Every
//! guest-controlled value is checked before use: a bad descriptor or address gives an error
//! status in the completion record, a fault record or a halted queue, never a panic, and no
//! byte outside a valid mapping is read or written; bus memory whose backing vanishes
//! (SIGBUS) faults the access and is not used again ([`sigbus`]). See `device/SPEC.md` for the
//! programming model and `device/DESIGN.md` for the threading.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, warn};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::irq::InterruptSink;
use crate::pci::ConfigSpace;
use crate::spec::*;
use crate::trace::{Event, ResetKind, Tracer};

pub mod bus;
pub mod engine;
pub mod faults;
pub mod inject;
pub mod mmu;
mod queue;
pub mod remote;
pub mod sigbus;
pub mod stats;
pub mod view;

use engine::Shared;
use faults::FaultLog;
use mmu::{Invalidation, Mmu};
pub use queue::{HaltReason, QueueState};
use queue::{Limits, QueueSlot};
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

/// IOTLB invalidation registers (`REG_INV_*`).
#[derive(Debug, Clone, Copy, Default)]
struct InvRegs {
    domain: u32,
    addr: u64,
    len: u64,
    status: u32,
    seq: u32,
}

/// The DMA device: the register front end. The engine's state is shared with the workers
/// (see [`engine`]), which reach it without this struct, so they never need the mutex the
/// transport keeps it behind.
pub struct Device {
    config: DeviceConfig,
    pci: ConfigSpace,
    scratch: u32,
    inv: InvRegs,
    stat_select: u32,
    stat_value: u64,
    msix_table: Vec<u8>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("pci", &self.pci)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// A handle on the device's shared state for those who watch it (the inspector, the web
/// view): counters, the view of queues and domains, and the error-injection rules. It
/// reaches only the state the workers share ([`engine`]), each part behind its own lock,
/// so a snapshot (which may walk a domain's page tables) never holds the lock a transport
/// keeps around [`Device`], and never delays a register access. It keeps that state alive
/// after the device is dropped (the workers are stopped then; the counters stay as they
/// were).
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observer").finish_non_exhaustive()
    }
}

impl Observer {
    /// Replaces the error-injection rules ([`inject`]; counts start again); an empty list
    /// clears them.
    pub fn set_injection(&self, rules: &[inject::Rule]) {
        if !rules.is_empty() {
            let names: Vec<String> = rules.iter().map(ToString::to_string).collect();
            warn!(rules = %names.join(" "), "error injection on: the device misbehaves on purpose");
        }
        self.shared.inject.set(rules);
    }

    /// The error-injection rules in force.
    pub fn injection(&self) -> Vec<inject::Rule> {
        self.shared.inject.get()
    }

    /// A snapshot of every counter (served by the inspector).
    pub fn stats(&self) -> DeviceStats {
        DeviceStats {
            queues: self
                .shared
                .queues
                .iter()
                .map(|s| s.counters.snapshot())
                .collect(),
            domains: self.shared.mmu.stats(),
            faults: self.shared.faults.stats(),
            iotlb_entries: self.shared.mmu.iotlb_len() as u64,
        }
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
    /// Create a device in its reset state and start one engine worker per queue.
    ///
    /// # Panics
    ///
    /// When the host cannot start a thread.
    pub fn new(config: DeviceConfig, mem: BusMemory, irq: Arc<dyn InterruptSink>) -> Self {
        Self::with_tracer(config, mem, irq, Tracer::off())
    }

    /// [`Device::new`], recording what the device does through `trace` (see
    /// [`crate::trace`]).
    ///
    /// # Panics
    ///
    /// When the host cannot start a thread.
    pub fn with_tracer(
        config: DeviceConfig,
        mem: BusMemory,
        irq: Arc<dyn InterruptSink>,
        trace: Tracer,
    ) -> Self {
        // Bus memory that vanishes under the engine faults its access rather than ending
        // the process (see `sigbus`).
        sigbus::install_or_warn();
        let vectors = config.msix_vectors();
        let domains = u16::try_from(config.domains).unwrap_or(u16::MAX);
        let queues = u16::try_from(config.queues).unwrap_or(u16::MAX);
        let shared = Arc::new(Shared {
            mmu: Mmu::new(
                domains,
                config.iova_width,
                config.iotlb_entries as usize,
                config.strict_iotlb,
            )
            .with_workers(queues)
            .with_tracer(trace.clone()),
            faults: FaultLog::new(queues, vectors),
            queues: (0..queues).map(QueueSlot::new).collect(),
            bus_master: AtomicBool::new(false),
            inject: inject::Rules::default(),
            trace,
            recent_faults: Default::default(),
            config: config.clone(),
            mem,
            irq,
        });
        let workers = (0..shared.queues.len())
            .map(|q| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("domdma-q{q}"))
                    .spawn(move || engine::worker(shared, q))
                    .expect("cannot start a DMA engine worker thread")
            })
            .collect();
        let mut dev = Self {
            pci: ConfigSpace::new(&bar_sizes(), vectors),
            scratch: 0,
            inv: InvRegs::default(),
            stat_select: 0,
            stat_value: 0,
            msix_table: vec![0; usize::from(vectors) * MSIX_ENTRY_SIZE],
            config,
            shared,
            workers,
        };
        dev.reset_msix_table();
        dev
    }

    /// The trace this device records to (off unless made with [`Device::with_tracer`]);
    /// the transport records its DMA_MAP and DMA_UNMAP through it.
    pub fn tracer(&self) -> &Tracer {
        &self.shared.trace
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
        let master = self.pci.bus_master();
        if master != was_master {
            debug!(master, "bus mastering changed");
            self.shared.set_bus_master(master);
        }
    }

    /// Size of BAR `bar` in bytes, 0 when the BAR is not implemented.
    pub fn bar_size(&self, bar: usize) -> u64 {
        bar_sizes().get(bar).copied().unwrap_or(0)
    }

    /// Read from a BAR. Accesses outside the BAR, or of a size other than 1, 2, 4 or 8
    /// bytes, read as zero. Never waits for a DMA.
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
    /// ignored and logged as guest errors. A doorbell returns at once; disabling a queue,
    /// invalidating the IOTLB and resetting wait for at most one chunk per worker.
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

    /// Wait until no DMA access that started with the old bus memory is still in progress.
    /// The transport calls it after removing a mapping (DMA_UNMAP) and before replying, so
    /// the device never touches memory the VMM has taken back.
    pub fn dma_barrier(&self) {
        self.shared.mmu.barrier();
    }

    /// Replaces the error-injection rules ([`inject`]; counts start again); an empty list
    /// clears them.
    pub fn set_injection(&self, rules: &[inject::Rule]) {
        self.observer().set_injection(rules);
    }

    /// The error-injection rules in force.
    pub fn injection(&self) -> Vec<inject::Rule> {
        self.observer().injection()
    }

    /// A snapshot of every counter (served by the inspector).
    pub fn stats(&self) -> DeviceStats {
        self.observer().stats()
    }

    /// A handle for those who watch the device (the inspector, the web view): counters,
    /// [`view::DeviceView`] and the injection rules, without the `&mut Device` (or the
    /// transport's lock around it) that register accesses need.
    pub fn observer(&self) -> Observer {
        Observer {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The state of queue `q`, if it exists.
    pub fn queue_state(&self, q: usize) -> Option<QueueState> {
        self.shared.queues.get(q).map(QueueSlot::state)
    }

    /// Function-level reset: the device reset of `DEV_CTRL_RESET`, then configuration space
    /// and the MSI-X table. Bus memory mappings and interrupt routes belong to the transport
    /// and are kept. Returns once every worker has stopped.
    pub fn reset(&mut self) {
        self.shared.trace.record(|| Event::Reset {
            kind: ResetKind::Function,
        });
        self.soft_reset();
        self.pci = ConfigSpace::new(&bar_sizes(), self.config.msix_vectors());
        self.shared.set_bus_master(false);
        self.reset_msix_table();
    }

    /// The reset of `DEV_CTRL_RESET`: every worker finishes its chunk and stops without
    /// completing its descriptor; then queues, domains, IOTLB, fault log, statistics and
    /// the scratch register return to their reset values.
    fn soft_reset(&mut self) {
        debug!("device reset");
        // Stop every queue first, so no worker touches the MMU or the fault log below.
        for slot in &self.shared.queues {
            slot.reset();
        }
        self.shared.mmu.reset();
        self.shared.faults.reset();
        self.shared.recent_faults.clear();
        self.scratch = 0;
        self.inv = InvRegs::default();
        self.stat_select = 0;
        self.stat_value = 0;
    }

    fn reset_msix_table(&mut self) {
        self.msix_table.fill(0);
        for entry in self.msix_table.chunks_mut(MSIX_ENTRY_SIZE) {
            entry[12] = 1; // vector control: masked
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            vectors: self.config.msix_vectors(),
            domains: self.config.domains,
        }
    }

    fn reg_read(&self, reg: u64) -> u32 {
        match reg {
            REG_ID => DEVICE_ID_MAGIC,
            REG_VERSION => DEVICE_VERSION,
            REG_CAP => {
                (self.config.queues & 0xff) << CAP_QUEUES_SHIFT
                    | (u32::from(self.config.msix_vectors()) & 0xff) << CAP_VECTORS_SHIFT
                    | (self.config.iova_width & 0xff) << CAP_IOVA_WIDTH_SHIFT
                    | (self.config.domains & 0xff) << CAP_DOMAINS_SHIFT
            }
            REG_CAP_OPS => {
                1 << OP_NOP
                    | 1 << OP_COPY
                    | 1 << OP_FILL
                    | 1 << OP_COMPARE
                    | 1 << OP_CRC32C
                    | 1 << OP_BATCH
            }
            REG_MAX_XFER => self.config.max_transfer,
            REG_SCRATCH => self.scratch,
            REG_DEV_CTRL => 0,
            REG_DEV_STATUS => {
                let master = if self.pci.bus_master() {
                    DEV_STATUS_BUS_MASTER
                } else {
                    0
                };
                let strict = if self.config.strict_iotlb {
                    DEV_STATUS_STRICT_IOTLB
                } else {
                    0
                };
                master | strict
            }
            REG_CAP_PGSIZES => PGSIZE_4K | PGSIZE_2M | PGSIZE_1G,
            REG_CAP_IOTLB => self.config.iotlb_entries,
            REG_CAP_FAULT_LOG => FAULT_LOG_MAX,
            REG_INV_DOMAIN => self.inv.domain,
            REG_INV_ADDR_LO => self.inv.addr as u32,
            REG_INV_ADDR_HI => (self.inv.addr >> 32) as u32,
            REG_INV_LEN_LO => self.inv.len as u32,
            REG_INV_LEN_HI => (self.inv.len >> 32) as u32,
            REG_INV_STATUS => self.inv.status,
            REG_INV_SEQ => self.inv.seq,
            REG_FLOG_BASE_LO..=REG_FLOG_DROPPED => self.shared.faults.read(reg),
            REG_STAT_SELECT => self.stat_select,
            REG_STAT_VALUE_LO => self.stat_value as u32,
            REG_STAT_VALUE_HI => (self.stat_value >> 32) as u32,
            _ => {
                if let Some((q, r)) =
                    block_of(reg, QUEUE_BASE, QUEUE_STRIDE, self.shared.queues.len())
                {
                    self.shared.queues[q].read(r)
                } else if let Some((d, r)) = block_of(
                    reg,
                    DOMAIN_BASE,
                    DOMAIN_STRIDE,
                    self.config.domains as usize,
                ) {
                    self.domain_reg_read(d as u16, r)
                } else {
                    debug!(reg, "read of an unimplemented register");
                    0
                }
            }
        }
    }

    fn reg_write(&mut self, reg: u64, value: u32) {
        if self.shared.trace.on() {
            let doorbell = block_of(reg, QUEUE_BASE, QUEUE_STRIDE, self.shared.queues.len())
                .is_some_and(|(_, r)| r == Q_TAIL);
            if !doorbell {
                self.shared.trace.record(|| Event::RegWrite { reg, value });
            }
        }
        match reg {
            REG_SCRATCH => self.scratch = value,
            REG_DEV_CTRL => {
                if value & DEV_CTRL_RESET != 0 {
                    self.shared.trace.record(|| Event::Reset {
                        kind: ResetKind::Device,
                    });
                    self.soft_reset();
                }
            }
            REG_INV_DOMAIN => self.inv.domain = value,
            REG_INV_ADDR_LO => self.inv.addr = (self.inv.addr & !0xffff_ffff) | u64::from(value),
            REG_INV_ADDR_HI => {
                self.inv.addr = (self.inv.addr & 0xffff_ffff) | u64::from(value) << 32
            }
            REG_INV_LEN_LO => self.inv.len = (self.inv.len & !0xffff_ffff) | u64::from(value),
            REG_INV_LEN_HI => self.inv.len = (self.inv.len & 0xffff_ffff) | u64::from(value) << 32,
            REG_INV_CMD => self.invalidate(value),
            REG_FLOG_BASE_LO..=REG_FLOG_DROPPED => self.shared.faults.write(reg, value),
            REG_STAT_SELECT => {
                self.stat_select = value;
                self.stat_value = self.stat(value);
            }
            _ => {
                if let Some((q, r)) =
                    block_of(reg, QUEUE_BASE, QUEUE_STRIDE, self.shared.queues.len())
                {
                    let limits = self.limits();
                    if r == Q_TAIL {
                        self.shared.trace.record(|| Event::Doorbell {
                            queue: q as u16,
                            tail: value,
                        });
                    }
                    self.shared.queues[q].write(r, value, limits);
                } else if let Some((d, r)) = block_of(
                    reg,
                    DOMAIN_BASE,
                    DOMAIN_STRIDE,
                    self.config.domains as usize,
                ) {
                    self.domain_reg_write(d as u16, r, value);
                } else {
                    debug!(reg, value, "write to a read-only or unimplemented register");
                }
            }
        }
    }

    /// Run an IOTLB invalidation command. It completes before the register write returns
    /// (every chunk that used a dropped entry has finished), so `INV_STATUS_BUSY` never
    /// reads set.
    fn invalidate(&mut self, cmd: u32) {
        let domain = u16::try_from(self.inv.domain).ok();
        let inv = match (cmd, domain) {
            (INV_CMD_ALL, _) => Some(Invalidation::All),
            (INV_CMD_DOMAIN, Some(d)) => Some(Invalidation::Domain(d)),
            (INV_CMD_RANGE, Some(d)) => Some(Invalidation::Range {
                domain: d,
                iova: self.inv.addr,
                len: self.inv.len,
            }),
            _ => None,
        };
        self.inv.status = INV_STATUS_BUSY;
        let done = inv.is_some_and(|inv| self.shared.mmu.invalidate(inv));
        if done {
            let (domain, iova, len) = match inv {
                Some(Invalidation::Range { domain, iova, len }) => (domain, iova, len),
                Some(Invalidation::Domain(d)) => (d, 0, 0),
                _ => (u16::MAX, 0, 0),
            };
            self.shared.trace.record(|| Event::Invalidate {
                kind: cmd as u8,
                domain,
                iova,
                len,
            });
            self.inv.status = 0;
            self.inv.seq = self.inv.seq.wrapping_add(1);
        } else {
            warn!(
                cmd,
                domain = self.inv.domain,
                len = self.inv.len,
                "guest error: invalidation rejected"
            );
            self.inv.status = INV_STATUS_ERROR;
        }
    }

    /// The 64-bit counter a `REG_STAT_SELECT` value selects (0 when unknown).
    fn stat(&self, select: u32) -> u64 {
        let kind = select >> 24;
        let counter = (select >> 16) & 0xff;
        let index = (select & 0xffff) as u16;
        match kind {
            STAT_KIND_QUEUE => {
                let Some(slot) = self.shared.queues.get(usize::from(index)) else {
                    return 0;
                };
                let s = slot.counters.snapshot();
                match counter {
                    QSTAT_DESCRIPTORS => s.descriptors,
                    QSTAT_BYTES => s.bytes,
                    QSTAT_ERRORS => s.errors,
                    QSTAT_FAULTS => s.faults,
                    QSTAT_INTERRUPTS => s.interrupts,
                    _ => 0,
                }
            }
            STAT_KIND_DOMAIN => {
                let Some(s) = self.shared.mmu.domain_stats(index) else {
                    return 0;
                };
                match counter {
                    DSTAT_TRANSLATIONS => s.translations,
                    DSTAT_IOTLB_HITS => s.iotlb_hits,
                    DSTAT_IOTLB_MISSES => s.iotlb_misses,
                    DSTAT_PAGE_WALKS => s.page_walks,
                    DSTAT_FAULTS => s.faults,
                    DSTAT_STALE_USES => s.stale_uses,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    fn domain_reg_read(&self, d: u16, reg: u64) -> u32 {
        let Some(regs) = self.shared.mmu.domain(d) else {
            return 0;
        };
        match reg {
            D_ROOT_LO => regs.root as u32,
            D_ROOT_HI => (regs.root >> 32) as u32,
            D_CTRL => regs.mode,
            _ => 0,
        }
    }

    fn domain_reg_write(&mut self, d: u16, reg: u64, value: u32) {
        let mmu = &self.shared.mmu;
        let Some(mut regs) = mmu.domain(d) else {
            return;
        };
        match reg {
            D_ROOT_LO => regs.root = (regs.root & !0xffff_ffff) | u64::from(value),
            D_ROOT_HI => regs.root = (regs.root & 0xffff_ffff) | u64::from(value) << 32,
            D_CTRL => regs.mode = value & 3,
            _ => {
                debug!(d, reg, value, "write to an unimplemented domain register");
                return;
            }
        }
        debug!(
            d,
            root = regs.root,
            mode = regs.mode,
            "domain registers written"
        );
        mmu.set_domain(d, regs);
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = self.msix_table.get(off..off.saturating_add(data.len())) {
            data.copy_from_slice(src);
        }
        // The PBA and the gap read as zero: the device keeps no pending bits, as the VMM
        // emulates masking (see SPEC.md, "BARs and interrupts").
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

    /// Whether queue `q`'s worker is running a descriptor (tests wait on it).
    #[cfg(test)]
    fn in_flight(&self, q: usize) -> bool {
        self.shared.queues[q].lock().in_flight
    }

    /// Whether queue `q`'s worker sleeps on its condition variable (tests wait on it).
    #[cfg(test)]
    fn asleep(&self, q: usize) -> bool {
        self.shared.queues[q].lock().sleeping
    }
}

impl Drop for Device {
    /// Stop every worker (the descriptor in flight stops at its next chunk, without a
    /// completion) and join them.
    fn drop(&mut self) {
        for slot in &self.shared.queues {
            slot.shutdown();
        }
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                warn!("a DMA engine worker panicked");
            }
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

/// Map a register offset to (block index, register within the block) for `count` blocks
/// of `stride` bytes at `base`.
fn block_of(reg: u64, base: u64, stride: u64, count: usize) -> Option<(usize, u64)> {
    let rel = reg.checked_sub(base)?;
    let i = usize::try_from(rel / stride).ok()?;
    (i < count).then_some((i, rel % stride))
}

#[cfg(test)]
mod tests;
