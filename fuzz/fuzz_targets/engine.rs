//! The device core (`domdma_device::core::Device`: registers, queues, DMA engine, MMU,
//! IOTLB, fault log) driven by arbitrary register accesses over arbitrary bus memory.
//!
//! Each input builds a small device (1-4 queues, 1-8 domains, a small IOTLB, 32- or 48-bit
//! IOVAs, strict mode or not) over fresh bus memory: 1 MiB of RAM at 1 GiB, 64 KiB of RAM
//! at bus 0 and a 64 KiB region mapped read-only (a memfd, as the server maps a read-only
//! DMA_MAP). The input is then a sequence of operations: raw BAR0/BAR2/config accesses at
//! any offset and width, targeted queue, domain, invalidation, fault-log and statistics
//! registers, doorbells, and writes of descriptors, page-table entries and plain bytes into
//! bus memory. The engine's workers run concurrently; `Wait` operations give them bounded
//! time (at most 30 ms per input in all). Then the device is reset or dropped, which stops
//! every worker after its current chunk.
//!
//! So that short inputs reach the data path, the input's `preset` bits have the harness do
//! what a driver does first: Bus Master Enable, every queue enabled on a ring in RAM, the
//! fault log enabled, and domain 1 translated through a page table the harness builds
//! (4 KiB, 2 MiB and 1 GiB leaves, `PRESET_MAPS`). `Submit` then writes descriptors into a
//! queue's ring at its tail and rings the doorbell.
//!
//! Findings are panics (anywhere, workers included), memory errors (ASan), a device access
//! to the read-only region (SIGSEGV), hangs (libFuzzer's -timeout), and these checks:
//! - with Bus Master Enable never set, bus memory is exactly what the input wrote;
//! - after a reset every queue is disabled and the scratch register reads 0.

#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use domdma_device::core::{Device, DeviceConfig, QueueState};
use domdma_device::irq::RecordingInterrupts;
use domdma_device::spec::*;
use libfuzzer_sys::fuzz_target;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

/// The main RAM region: 1 MiB at bus 1 GiB (so 2 MiB and 1 GiB leaves can point at it).
const RAM_BASE: u64 = 1 << 30;
const RAM_SIZE: u64 = 1 << 20;
/// A small RAM region at bus 0 (identity-mapped rings at low addresses, IOVA 0).
const LOW_SIZE: u64 = 64 << 10;
/// The read-only region.
const RO_BASE: u64 = 3 << 30;
const RO_SIZE: u64 = 64 << 10;

/// Longest time all `Wait` operations of one input may take together.
const WAIT_BUDGET: Duration = Duration::from_millis(8);

/// PCI command register and its bits.
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// A bus address: mostly inside one of the regions (so that tables, rings and buffers are
/// found), sometimes anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Bus {
    Ram(u32),
    Low(u16),
    Ro(u16),
    Raw(u64),
}

impl Bus {
    fn get(self) -> u64 {
        match self {
            Bus::Ram(o) => RAM_BASE + u64::from(o) % RAM_SIZE,
            Bus::Low(o) => u64::from(o) % LOW_SIZE,
            Bus::Ro(o) => RO_BASE + u64::from(o) % RO_SIZE,
            Bus::Raw(a) => a,
        }
    }

    /// Aligned down to `align` (a power of two).
    fn aligned(self, align: u64) -> u64 {
        match self {
            Bus::Raw(a) => a,
            _ => self.get() & !(align - 1),
        }
    }
}

/// An IOVA for a descriptor: a bus address (identity and pass-through domains), a small
/// IOVA built from table indices (translated domains), or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Iova {
    Bus(Bus),
    Indexed(u8, u8, u16),
    Raw(u64),
}

impl Iova {
    fn get(self) -> u64 {
        match self {
            Iova::Bus(b) => b.get(),
            Iova::Indexed(l3, l2, off) => {
                u64::from(l3 % 4) << 30 | u64::from(l2 % 4) << 21 | u64::from(off) << 4
            }
            Iova::Raw(a) => a,
        }
    }
}

/// A page-table entry: a table pointer, a leaf, or any 64 bits.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum PteSpec {
    Table { to: Bus, perm: u8 },
    Leaf { to: Bus, perm: u8, large: bool },
    Raw(u64),
}

impl PteSpec {
    fn get(self) -> u64 {
        match self {
            PteSpec::Table { to, perm } => Pte::table(to.aligned(4096), u64::from(perm)).raw(),
            PteSpec::Leaf { to, perm, large } => {
                let align = if large { 1 << 21 } else { 4096 };
                Pte::leaf(to.aligned(align), u64::from(perm), large).raw()
            }
            PteSpec::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    /// A BAR0 access at any offset and width (1, 2, 4, 8 or a bad one).
    RegWrite {
        offset: u16,
        width: u8,
        value: u64,
    },
    RegRead {
        offset: u16,
        width: u8,
    },
    /// A register of queue `q` (index into its block of 32-bit registers).
    QueueReg {
        q: u8,
        reg: u8,
        value: u32,
    },
    /// A register of domain `d`.
    DomainReg {
        d: u8,
        reg: u8,
        value: u32,
    },
    /// One of the global registers (`GLOBAL_REGS`).
    GlobalReg {
        reg: u8,
        value: u32,
    },
    /// Program queue `q`: ring base, size 2^(size % 13), domain, vector, then enable.
    SetupQueue {
        q: u8,
        ring: Bus,
        size: u8,
        domain: u8,
        ctrl: u8,
        vector: u8,
        coal_count: u8,
        coal_usec: u16,
    },
    /// Write `Q_TAIL`.
    Doorbell {
        q: u8,
        tail: u16,
    },
    /// Write `count` copies of a descriptor into queue `q`'s ring at the harness's tail
    /// (a queue the harness set up), then ring the doorbell.
    Submit {
        q: u8,
        count: u8,
        opcode: u8,
        flags: u8,
        len: u16,
        src: Iova,
        dst: Iova,
        cpl: Option<Iova>,
    },
    /// A descriptor into bus memory (a ring slot or a BATCH list).
    Descriptor {
        at: Bus,
        opcode: u8,
        flags: u8,
        len: u32,
        src: Iova,
        dst: Iova,
        cpl: Iova,
        tag: u64,
        reserved: u8,
    },
    /// A page-table entry at a table address and an index.
    Pte {
        table: Bus,
        index: u16,
        pte: PteSpec,
    },
    /// Point domain `d` at a root table and set its mode.
    Domain {
        d: u8,
        root: Bus,
        mode: u8,
    },
    /// An IOTLB invalidation command.
    Invalidate {
        cmd: u8,
        domain: u8,
        addr: Iova,
        len: u32,
    },
    /// Set up the fault log.
    FaultLog {
        base: Bus,
        size: u16,
        ctrl: u8,
        vector: u8,
    },
    /// Any bytes anywhere in bus memory.
    Bytes {
        at: Bus,
        data: Vec<u8>,
    },
    /// PCI configuration space.
    Config {
        offset: u8,
        width: u8,
        value: u32,
    },
    BusMaster(bool),
    /// The MSI-X BAR.
    Msix {
        offset: u16,
        width: u8,
        value: u64,
    },
    /// Let the workers run, up to `ms` milliseconds or until every queue is idle.
    Wait {
        ms: u8,
    },
    /// `DEV_CTRL_RESET` (soft) or a function-level reset (`Device::reset`).
    Reset {
        function_level: bool,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// `PRESET_*` bits: set-up done before the operations.
    preset: u8,
    queues: u8,
    domains: u8,
    iotlb: u8,
    width32: bool,
    max_transfer: u8,
    strict: bool,
    master: bool,
    ops: Vec<Op>,
}

/// Preset: Bus Master Enable.
const PRESET_MASTER: u8 = 1 << 0;
/// Preset: every queue enabled on a ring of `PRESET_RING` entries in RAM, domain 0.
const PRESET_QUEUES: u8 = 1 << 1;
/// Preset: the fault log enabled (64 records in RAM).
const PRESET_FAULT_LOG: u8 = 1 << 2;
/// Preset: domain 1 translated through `PRESET_MAPS`, and odd queues bound to it.
const PRESET_DOMAIN: u8 = 1 << 3;
/// Preset: half of the queues halt on a fault.
const PRESET_HALT_ON_FAULT: u8 = 1 << 4;

/// Ring entries of a preset queue.
const PRESET_RING: u32 = 64;
/// Where the harness puts its structures in RAM: rings (16 KiB apart, completion records
/// 12 KiB after each ring), the fault log, the page tables; data from `RAM_DATA` on.
const RAM_RINGS: u64 = RAM_BASE;
const RAM_FAULT_LOG: u64 = RAM_BASE + 0x1_0000;
const RAM_TABLES: u64 = RAM_BASE + 0x2_0000;
const RAM_DATA: u64 = RAM_BASE + 0x4_0000;
/// Domain 1's mappings (IOVA, bus address, length, page size, permissions): 4 KiB pages at
/// IOVA 0 over RAM data, a 2 MiB and a 1 GiB page over RAM, a read-only 4 KiB page on the
/// read-only region, and a 4 KiB page at a bus address outside every region.
const PRESET_MAPS: [(u64, u64, u64, u64, u64); 5] = [
    (0, RAM_DATA, 0x8_0000, 4096, PTE_R | PTE_W),
    (1 << 21, RAM_BASE, 1 << 21, 1 << 21, PTE_R | PTE_W),
    (1 << 30, RAM_BASE, 1 << 30, 1 << 30, PTE_R | PTE_W),
    (0x10_0000, RO_BASE, 0x1_0000, 4096, PTE_R),
    (
        0x20_0000 - 0x1000,
        0x7_0000_0000,
        0x1000,
        4096,
        PTE_R | PTE_W,
    ),
];

/// The global registers a `GlobalReg` op picks from.
const GLOBAL_REGS: [u64; 26] = [
    REG_SCRATCH,
    REG_DEV_CTRL,
    REG_DEV_STATUS,
    REG_INV_DOMAIN,
    REG_INV_ADDR_LO,
    REG_INV_ADDR_HI,
    REG_INV_LEN_LO,
    REG_INV_LEN_HI,
    REG_INV_CMD,
    REG_INV_STATUS,
    REG_INV_SEQ,
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
    REG_STAT_SELECT,
    REG_STAT_VALUE_LO,
    REG_STAT_VALUE_HI,
    REG_ID,
    REG_CAP,
];

fn width_of(w: u8) -> usize {
    [1, 2, 4, 8, 3, 0][usize::from(w % 6)]
}

/// Bus memory for one input, and what the input wrote to it (for the no-DMA check).
struct Memory {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// A writable mapping of the read-only region's memfd.
    ro_writer: GuestMemoryMmap,
    /// Shadow of what the input wrote: RAM, low RAM, read-only region.
    shadow: Vec<(u64, Vec<u8>)>,
}

impl Memory {
    fn new() -> Self {
        // SAFETY: memfd_create with a NUL-terminated name and no flags beyond CLOEXEC.
        let fd = unsafe { libc::memfd_create(c"domdma-fuzz-ro".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor this function owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(RO_SIZE).expect("memfd size");
        let writer = MmapRegion::from_file(
            FileOffset::new(file.try_clone().expect("dup"), 0),
            RO_SIZE as usize,
        )
        .expect("writer mapping");
        let ro = MmapRegionBuilder::new(RO_SIZE as usize)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .expect("read-only mapping");
        let ram = MmapRegion::new(RAM_SIZE as usize).expect("RAM");
        let low = MmapRegion::new(LOW_SIZE as usize).expect("low RAM");
        let gm = GuestMemoryMmap::from_regions(vec![
            GuestRegionMmap::new(low, GuestAddress(0)).unwrap(),
            GuestRegionMmap::new(ram, GuestAddress(RAM_BASE)).unwrap(),
            GuestRegionMmap::new(ro, GuestAddress(RO_BASE)).unwrap(),
        ])
        .expect("bus memory");
        let ro_writer = GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(
            writer,
            GuestAddress(RO_BASE),
        )
        .unwrap()])
        .expect("writer");
        Memory {
            mem: GuestMemoryAtomic::new(gm),
            ro_writer,
            shadow: vec![
                (0, vec![0; LOW_SIZE as usize]),
                (RAM_BASE, vec![0; RAM_SIZE as usize]),
                (RO_BASE, vec![0; RO_SIZE as usize]),
            ],
        }
    }

    /// Zero every region and the shadows: what `new` gives.
    fn clear(&mut self) {
        use vm_memory::GuestAddressSpace;
        let zeros = vec![0u8; RAM_SIZE as usize];
        for (base, shadow) in &mut self.shadow {
            shadow.fill(0);
            let data = &zeros[..shadow.len()];
            if *base == RO_BASE {
                self.ro_writer
                    .write_slice(data, GuestAddress(*base))
                    .expect("read-only region clear");
            } else {
                self.mem
                    .memory()
                    .write_slice(data, GuestAddress(*base))
                    .expect("bus clear");
            }
        }
    }

    /// Write `data` at `addr`, clipped to the region it starts in (nothing outside one).
    fn write(&mut self, addr: u64, data: &[u8]) {
        for (base, shadow) in &mut self.shadow {
            let Some(off) = addr.checked_sub(*base) else {
                continue;
            };
            let Ok(off) = usize::try_from(off) else {
                continue;
            };
            if off >= shadow.len() {
                continue;
            }
            let n = data.len().min(shadow.len() - off);
            shadow[off..off + n].copy_from_slice(&data[..n]);
            let data = &data[..n];
            if *base == RO_BASE {
                self.ro_writer
                    .write_slice(data, GuestAddress(addr))
                    .expect("read-only region write");
            } else {
                use vm_memory::GuestAddressSpace;
                self.mem
                    .memory()
                    .write_slice(data, GuestAddress(addr))
                    .expect("bus write");
            }
            return;
        }
    }

    /// The u64 the input wrote at `addr` (from the shadow).
    fn read_u64(&self, addr: u64) -> u64 {
        for (base, shadow) in &self.shadow {
            if let Some(off) = addr.checked_sub(*base).map(|o| o as usize) {
                if off + 8 <= shadow.len() {
                    return u64::from_le_bytes(shadow[off..off + 8].try_into().unwrap());
                }
            }
        }
        0
    }

    /// Check that bus memory holds exactly what the input wrote.
    fn check_untouched(&self) {
        use vm_memory::GuestAddressSpace;
        let mem = self.mem.memory();
        for (base, shadow) in &self.shadow {
            let mut got = vec![0u8; shadow.len()];
            mem.read_slice(&mut got, GuestAddress(*base))
                .expect("bus read");
            // One memcmp first: a loop over the bytes would run a coverage callback each.
            if got == *shadow {
                continue;
            }
            if let Some(i) = (0..got.len()).find(|&i| got[i] != shadow[i]) {
                panic!(
                    "bus memory at {:#x} changed ({:#04x} -> {:#04x}) although Bus Master \
                     Enable was never set",
                    base + i as u64,
                    shadow[i],
                    got[i]
                );
            }
        }
    }
}

/// Devices kept between inputs: building one (its engine threads) and bus memory (a memfd
/// and three mappings) costs more than most inputs. Each input gets its device straight
/// after a function-level reset and its memory zeroed, the state a fresh process gives it,
/// so an input replays the same on its own. At most `MAX_CACHED_DEVICES` configurations
/// are kept; all of them share the one bus memory (only one runs at a time).
struct Cache {
    mem: Option<Memory>,
    devices: Vec<(DeviceConfig, Device, Arc<RecordingInterrupts>)>,
}

const MAX_CACHED_DEVICES: usize = 24;

thread_local! {
    static CACHE: RefCell<Cache> = const {
        RefCell::new(Cache {
            mem: None,
            devices: Vec::new(),
        })
    };
}

/// A device for `config` in its reset state, zeroed bus memory, and its interrupt recorder.
fn take_device(config: &DeviceConfig) -> (Device, Memory, Arc<RecordingInterrupts>) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let mut mem = c.mem.take().unwrap_or_else(Memory::new);
        mem.clear();
        let (dev, irq) = match c.devices.iter().position(|(k, _, _)| k == config) {
            Some(i) => {
                let (_, dev, irq) = c.devices.remove(i);
                (dev, irq)
            }
            None => {
                let irq = Arc::new(RecordingInterrupts::new());
                let dev = Device::new(config.clone(), mem.mem.clone(), irq.clone());
                (dev, irq)
            }
        };
        (dev, mem, irq)
    })
}

/// Resets `dev` (every worker stopped: nothing touches bus memory afterwards) and keeps it
/// and the memory for the next input.
fn give_back(config: DeviceConfig, mut dev: Device, mem: Memory, irq: Arc<RecordingInterrupts>) {
    dev.reset();
    let _ = irq.take();
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        c.mem = Some(mem);
        if c.devices.len() == MAX_CACHED_DEVICES {
            c.devices.remove(0);
        }
        c.devices.push((config, dev, irq));
    });
}

struct Harness {
    dev: Device,
    mem: Memory,
    config: DeviceConfig,
    /// Bus Master Enable has been set at some point.
    ever_master: bool,
    wait_left: Duration,
    /// Queues the harness set up: (ring base, size, next tail).
    rings: Vec<Option<(u64, u32, u32)>>,
}

impl Harness {
    fn write(&mut self, reg: u64, value: u32) {
        self.dev.bar_write(REGS_BAR, reg, &value.to_le_bytes());
    }

    fn read(&mut self, reg: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(REGS_BAR, reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn config_write(&mut self, offset: u64, data: &[u8]) {
        self.dev.config_write(offset, data);
        let mut cmd = [0u8; 2];
        self.dev.config_read(PCI_COMMAND, &mut cmd);
        if u16::from_le_bytes(cmd) & PCI_COMMAND_MASTER != 0 {
            self.ever_master = true;
        }
    }

    fn bus_master(&mut self, on: bool) {
        let v = PCI_COMMAND_MEMORY | if on { PCI_COMMAND_MASTER } else { 0 };
        self.config_write(PCI_COMMAND, &v.to_le_bytes());
    }

    /// Poll until no queue is busy, for at most `limit` (and the input's wait budget).
    fn wait_idle(&mut self, limit: Duration) {
        let limit = limit.min(self.wait_left);
        let start = Instant::now();
        loop {
            let busy = (0..self.config.queues).any(|q| {
                let s = self.read(queue_reg(q, Q_STATUS));
                s & Q_STATUS_BUSY != 0 && s & Q_STATUS_ENABLED != 0
            });
            if !busy || start.elapsed() >= limit {
                break;
            }
            std::thread::yield_now();
        }
        self.wait_left = self.wait_left.saturating_sub(start.elapsed());
    }

    /// A 4-level page table in RAM at `RAM_TABLES` for `PRESET_MAPS`; returns its root.
    fn build_tables(&mut self) -> u64 {
        let mut next = RAM_TABLES;
        let mut alloc = |m: &mut Memory| {
            let t = next;
            next += 4096;
            m.write(t, &[0u8; 4096]);
            t
        };
        let root = alloc(&mut self.mem);
        for (iova, bus, len, page, perm) in PRESET_MAPS {
            let leaf_level = match page {
                4096 => 1,
                0x20_0000 => 2,
                _ => 3,
            };
            let mut off = 0;
            while off < len {
                let at = iova + off;
                let mut table = root;
                for level in (leaf_level + 1..=4).rev() {
                    let ea = table + (pte_index(at, level) * 8) as u64;
                    let e = Pte(self.mem.read_u64(ea));
                    table = if e.is_present() {
                        e.addr()
                    } else {
                        let t = alloc(&mut self.mem);
                        self.mem
                            .write(ea, &Pte::table(t, PTE_R | PTE_W).raw().to_le_bytes());
                        t
                    };
                }
                let leaf = Pte::leaf(bus + off, perm, leaf_level > 1).raw();
                let ea = table + (pte_index(at, leaf_level) * 8) as u64;
                self.mem.write(ea, &leaf.to_le_bytes());
                off += page;
            }
        }
        root
    }

    fn preset(&mut self, preset: u8) {
        if preset & PRESET_MASTER != 0 {
            self.bus_master(true);
        }
        if preset & PRESET_FAULT_LOG != 0 {
            self.write(REG_FLOG_BASE_LO, RAM_FAULT_LOG as u32);
            self.write(REG_FLOG_BASE_HI, (RAM_FAULT_LOG >> 32) as u32);
            self.write(REG_FLOG_SIZE, 64);
            self.write(REG_FLOG_MSIX_VECTOR, self.config.queues);
            self.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        }
        let translated = preset & PRESET_DOMAIN != 0 && self.config.domains > 1;
        if translated {
            let root = self.build_tables();
            self.write(domain_reg(1, D_ROOT_LO), root as u32);
            self.write(domain_reg(1, D_ROOT_HI), (root >> 32) as u32);
            self.write(domain_reg(1, D_CTRL), DOMAIN_MODE_TRANSLATED);
        }
        if preset & PRESET_QUEUES != 0 {
            for q in 0..self.config.queues {
                let ring = RAM_RINGS + u64::from(q) * 0x4000;
                let domain = u32::from(translated && q % 2 == 1);
                // A translated queue reaches its ring through domain 1's 1 GiB page, which
                // maps IOVA 1 GiB + x to RAM_BASE + x.
                let ring_iova = if domain == 1 {
                    ring - RAM_BASE + (1 << 30)
                } else {
                    ring
                };
                let halt = preset & PRESET_HALT_ON_FAULT != 0 && q % 2 == 0;
                self.write(queue_reg(q, Q_BASE_LO), ring_iova as u32);
                self.write(queue_reg(q, Q_BASE_HI), (ring_iova >> 32) as u32);
                self.write(queue_reg(q, Q_SIZE), PRESET_RING);
                self.write(queue_reg(q, Q_DOMAIN), domain);
                let ctrl = Q_CTRL_ENABLE | if halt { Q_CTRL_HALT_ON_FAULT } else { 0 };
                self.write(queue_reg(q, Q_CTRL), ctrl);
                self.rings[q as usize] = Some((ring, PRESET_RING, 0));
            }
        }
    }

    fn check_reset(&mut self) {
        for q in 0..self.config.queues as usize {
            assert_eq!(
                self.dev.queue_state(q),
                Some(QueueState::Disabled),
                "queue {q} after a reset"
            );
        }
        assert_eq!(self.read(REG_SCRATCH), 0, "scratch after a reset");
    }

    fn run(&mut self, op: Op) {
        let queues = self.config.queues;
        let domains = self.config.domains;
        match op {
            Op::RegWrite {
                offset,
                width,
                value,
            } => {
                let w = width_of(width);
                let off = u64::from(offset) % (REGS_BAR_SIZE + 16);
                self.dev.bar_write(REGS_BAR, off, &value.to_le_bytes()[..w]);
            }
            Op::RegRead { offset, width } => {
                let mut b = [0u8; 8];
                let w = width_of(width);
                let off = u64::from(offset) % (REGS_BAR_SIZE + 16);
                self.dev.bar_read(REGS_BAR, off, &mut b[..w]);
            }
            Op::QueueReg { q, reg, value } => {
                let q = u32::from(q) % (queues + 1);
                self.write(queue_reg(q, u64::from(reg % 16) * 4), value);
            }
            Op::DomainReg { d, reg, value } => {
                let d = u32::from(d) % (domains + 1);
                self.write(domain_reg(d, u64::from(reg % 4) * 4), value);
            }
            Op::GlobalReg { reg, value } => {
                let reg = GLOBAL_REGS[usize::from(reg) % GLOBAL_REGS.len()];
                self.write(reg, value);
                let _ = self.read(reg);
            }
            Op::SetupQueue {
                q,
                ring,
                size,
                domain,
                ctrl,
                vector,
                coal_count,
                coal_usec,
            } => {
                let q = u32::from(q) % queues;
                let base = ring.aligned(64);
                self.write(queue_reg(q, Q_CTRL), 0);
                self.write(queue_reg(q, Q_BASE_LO), base as u32);
                self.write(queue_reg(q, Q_BASE_HI), (base >> 32) as u32);
                self.write(queue_reg(q, Q_SIZE), 1 << (size % 13));
                self.write(queue_reg(q, Q_DOMAIN), u32::from(domain) % (domains + 1));
                self.write(
                    queue_reg(q, Q_MSIX_VECTOR),
                    u32::from(vector) % (queues + 2),
                );
                self.write(queue_reg(q, Q_COAL_COUNT), u32::from(coal_count % 8));
                self.write(queue_reg(q, Q_COAL_USEC), u32::from(coal_usec % 2000));
                self.write(queue_reg(q, Q_CTRL), u32::from(ctrl % 8) | Q_CTRL_ENABLE);
                self.rings[q as usize] = Some((base, 1 << (size % 13), 0));
            }
            Op::Submit {
                q,
                count,
                opcode,
                flags,
                len,
                src,
                dst,
                cpl,
            } => {
                let q = u32::from(q) % queues;
                let Some((ring, size, tail)) = self.rings[q as usize] else {
                    return;
                };
                let mut t = tail;
                for i in 0..u32::from(count % 8) + 1 {
                    // A completion record per slot after the ring, unless the input names one.
                    let cpl = match cpl {
                        Some(c) => c.get(),
                        // (A ring the input placed anywhere: wrapping, as the device's own
                        // address arithmetic must be.)
                        None => ring
                            .wrapping_add(0x3000)
                            .wrapping_add(u64::from(t % 128) * COMPLETION_SIZE),
                    };
                    let d = Descriptor {
                        opcode: opcode % 7,
                        flags: flags % 4,
                        reserved_lo: 0,
                        len: u32::from(len) + i,
                        src: src.get(),
                        dst: dst.get(),
                        completion: cpl,
                        tag: u64::from(t),
                        reserved: [0; 24],
                    };
                    let at = ring.wrapping_add(u64::from(t) * DESC_SIZE);
                    self.mem.write(at, &d.encode());
                    t = (t + 1) % size;
                }
                self.rings[q as usize] = Some((ring, size, t));
                self.write(queue_reg(q, Q_TAIL), t);
            }
            Op::Doorbell { q, tail } => {
                let q = u32::from(q) % queues;
                self.write(queue_reg(q, Q_TAIL), u32::from(tail));
            }
            Op::Descriptor {
                at,
                opcode,
                flags,
                len,
                src,
                dst,
                cpl,
                tag,
                reserved,
            } => {
                let mut r = [0u8; 24];
                if reserved % 16 == 15 {
                    r[usize::from(reserved) % 24] = reserved;
                }
                let d = Descriptor {
                    opcode: opcode % 8,
                    flags: flags % 8,
                    reserved_lo: u16::from(reserved % 32 == 31),
                    // Mostly short transfers; sometimes anything (the device must refuse
                    // or bound them).
                    len: if len & 0x8000_0000 != 0 {
                        len
                    } else {
                        len % 0x1_2000
                    },
                    src: src.get(),
                    dst: dst.get(),
                    completion: cpl.get(),
                    tag,
                    reserved: r,
                };
                self.mem.write(at.aligned(8), &d.encode());
            }
            Op::Pte { table, index, pte } => {
                let at = table.aligned(4096).wrapping_add(u64::from(index % 512) * 8);
                self.mem.write(at, &pte.get().to_le_bytes());
            }
            Op::Domain { d, root, mode } => {
                let d = u32::from(d) % (domains + 1);
                let root = root.aligned(4096);
                self.write(domain_reg(d, D_ROOT_LO), root as u32);
                self.write(domain_reg(d, D_ROOT_HI), (root >> 32) as u32);
                self.write(domain_reg(d, D_CTRL), u32::from(mode % 4));
            }
            Op::Invalidate {
                cmd,
                domain,
                addr,
                len,
            } => {
                let a = addr.get();
                self.write(REG_INV_DOMAIN, u32::from(domain) % (domains + 1));
                self.write(REG_INV_ADDR_LO, a as u32);
                self.write(REG_INV_ADDR_HI, (a >> 32) as u32);
                self.write(REG_INV_LEN_LO, len);
                self.write(REG_INV_LEN_HI, 0);
                self.write(REG_INV_CMD, u32::from(cmd % 5));
                let _ = self.read(REG_INV_STATUS);
            }
            Op::FaultLog {
                base,
                size,
                ctrl,
                vector,
            } => {
                let b = base.aligned(32);
                self.write(REG_FLOG_CTRL, 0);
                self.write(REG_FLOG_BASE_LO, b as u32);
                self.write(REG_FLOG_BASE_HI, (b >> 32) as u32);
                self.write(REG_FLOG_SIZE, u32::from(size % 4200));
                self.write(REG_FLOG_MSIX_VECTOR, u32::from(vector) % (queues + 2));
                self.write(REG_FLOG_CTRL, u32::from(ctrl % 4));
            }
            Op::Bytes { at, data } => {
                let data = &data[..data.len().min(4096)];
                self.mem.write(at.get(), data);
            }
            Op::Config {
                offset,
                width,
                value,
            } => {
                let w = width_of(width).min(4);
                self.config_write(u64::from(offset), &value.to_le_bytes()[..w]);
                let mut b = [0u8; 4];
                self.dev.config_read(u64::from(offset), &mut b[..w]);
            }
            Op::BusMaster(on) => self.bus_master(on),
            Op::Msix {
                offset,
                width,
                value,
            } => {
                let w = width_of(width);
                let off = u64::from(offset) % (MSIX_BAR_SIZE + 16);
                self.dev.bar_write(MSIX_BAR, off, &value.to_le_bytes()[..w]);
                let mut b = [0u8; 8];
                self.dev.bar_read(MSIX_BAR, off, &mut b[..w]);
            }
            Op::Wait { ms } => self.wait_idle(Duration::from_millis(u64::from(ms % 8))),
            Op::Reset { function_level } => {
                if function_level {
                    self.dev.reset();
                } else {
                    self.write(REG_DEV_CTRL, DEV_CTRL_RESET);
                }
                self.check_reset();
                self.rings.iter_mut().for_each(|r| *r = None);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let config = DeviceConfig {
        queues: u32::from(input.queues % 4) + 1,
        domains: u32::from(input.domains % 8) + 1,
        iotlb_entries: [1, 4, 8, 64][usize::from(input.iotlb % 4)],
        iova_width: if input.width32 {
            IOVA_WIDTH_32
        } else {
            DEFAULT_IOVA_WIDTH
        },
        max_transfer: [4096, 64 << 10, 1 << 20][usize::from(input.max_transfer % 3)],
        strict_iotlb: input.strict,
    };
    config.validate().expect("a valid configuration");
    let config_queues = config.queues as usize;
    let (dev, mem, irq) = take_device(&config);
    let mut h = Harness {
        dev,
        mem,
        config,
        ever_master: false,
        wait_left: WAIT_BUDGET,
        rings: vec![None; config_queues],
    };
    if input.master {
        h.bus_master(true);
    }
    h.preset(input.preset);
    for op in input.ops.into_iter().take(512) {
        h.run(op);
    }
    // A last bounded chance for the workers, then stop them.
    h.wait_idle(Duration::from_millis(2));
    if !h.ever_master {
        h.mem.check_untouched();
    }
    let Harness {
        dev, mem, config, ..
    } = h;
    give_back(config, dev, mem, irq);
});
