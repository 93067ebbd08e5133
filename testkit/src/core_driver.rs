//! A test driver for the device core itself (`domdma_device::core::Device`, no back end),
//! written as a real driver drives the hardware (device/SPEC.md, register interface 0.2),
//! for the device's internal tests (`device/tests/hw_model.rs`: hostile tables, strict-mode
//! and IOTLB internals, races) and its benchmarks: bus memory built with `vm-memory`, a bump
//! allocator for it, a 4-level I/O page-table builder, and helpers for domains,
//! invalidation, the fault log, queues, descriptors and completions.
//!
//! The engine runs on worker threads, so every wait polls with a deadline ([`TIMEOUT`]);
//! nothing sleeps for a fixed time and nothing asserts on timing.
//!
//! It also holds a reference page walker ([`model_walk`]) written from SPEC.md "I/O page
//! tables", used by the fuzz tests to predict the device's answer for read-only operations.

use std::collections::BTreeMap;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use domdma_device::core::{BusMemory, Device, DeviceConfig, DeviceStats};
use domdma_device::irq::RecordingInterrupts;
use domdma_device::spec::*;
use domdma_device::trace::Tracer;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
    GuestRegionMmap, MmapRegion,
};

/// Bus address of the one RAM region the "VMM" maps for the device (1 GiB aligned).
pub const RAM_BASE: u64 = 1 << 30;
/// Size of that region (anonymous memory, allocated lazily by the kernel).
pub const RAM_SIZE: u64 = 1 << 30;
/// First bus address past the RAM region.
pub const RAM_END: u64 = RAM_BASE + RAM_SIZE;

/// Bus address of a small region the "VMM" maps read-only for the device.
pub const RO_BASE: u64 = 3 << 30;
/// Its size.
pub const RO_SIZE: u64 = 64 << 10;

/// 4 KiB.
pub const PAGE_4K: u64 = 1 << 12;
/// 2 MiB.
pub const PAGE_2M: u64 = 1 << 21;
/// 1 GiB.
pub const PAGE_1G: u64 = 1 << 30;
/// Read-write leaf or table permissions.
pub const RW: u64 = PTE_R | PTE_W;

/// How long any wait polls before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// PCI command register: memory space and bus master enable.
const PCI_COMMAND_OFFSET: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Poll `f` until it returns `Some`, failing the test after [`TIMEOUT`].
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out after {TIMEOUT:?} waiting for {what}"
        );
        spins += 1;
        if spins < 200 {
            std::thread::yield_now();
        } else {
            // A polling interval, not a wait for an event.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------

/// xorshift64*: a deterministic generator for test data and fuzzing.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// One element of a slice.
    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
}

/// `len` bytes of data unique to `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed ^ 0x5eed);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// CRC32C (Castagnoli, reflected, init and final XOR 0xffffffff), bit by bit.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, t) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
        *t = c;
    }
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The byte a canary holds at bus address `addr`.
pub fn canary_byte(addr: u64) -> u8 {
    (((addr ^ 0xc3a5_c85c_97cb_3127).wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 56) as u8 | 0x01
}

fn round_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

// ---------------------------------------------------------------------------------------
// Bus memory
// ---------------------------------------------------------------------------------------

/// A range filled with a known pattern that nothing may write.
#[derive(Debug, Clone, Copy)]
pub struct Canary {
    /// First bus address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Bus memory (what the VMM mapped for the device) with a bump allocator.
pub struct Bus {
    /// The memory, shared with the device: read-write RAM and a read-only region.
    pub mem: BusMemory,
    /// A read-write mapping of the read-only region's file, for the test to fill it.
    ro_writer: GuestMemoryMmap,
    next: u64,
    canaries: Vec<Canary>,
}

impl Bus {
    /// A 1 GiB anonymous region at bus [`RAM_BASE`], and [`RO_SIZE`] bytes of a file at
    /// [`RO_BASE`] mapped read-only (the device sees it without write permission).
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "domdma-hw-model-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("read-only region's file");
        let _ = std::fs::remove_file(&path);
        file.set_len(RO_SIZE).expect("file size");
        let writer = MmapRegion::from_file(
            FileOffset::new(file.try_clone().expect("dup"), 0),
            RO_SIZE as usize,
        )
        .expect("writer mapping");
        let ro = MmapRegionBuilder::new(RO_SIZE as usize)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .expect("read-only mapping");
        let ram = MmapRegion::new(RAM_SIZE as usize).expect("RAM");
        let gm = GuestMemoryMmap::from_regions(vec![
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
        Self {
            mem: GuestMemoryAtomic::new(gm),
            ro_writer,
            next: RAM_BASE,
            canaries: Vec::new(),
        }
    }

    /// Whether `addr` is read-write bus memory (RAM).
    pub fn in_ram(addr: u64) -> bool {
        (RAM_BASE..RAM_END).contains(&addr)
    }

    /// Whether `addr` is bus memory the device may read (RAM or the read-only region).
    pub fn readable(addr: u64) -> bool {
        Self::in_ram(addr) || (RO_BASE..RO_BASE + RO_SIZE).contains(&addr)
    }

    /// Allocate `len` bytes aligned to `align` (fresh memory reads as zero).
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = round_up(self.next, align);
        let end = at + round_up(len.max(1), 64);
        assert!(end <= RAM_END, "bus memory exhausted");
        self.next = end;
        at
    }

    /// Allocate `len` bytes aligned to `align` with canaries on both sides: at least one
    /// `max(align, 4 KiB)` guard before and after, and the rest of the last page.
    pub fn alloc_guarded(&mut self, len: u64, align: u64) -> u64 {
        let g = align.max(PAGE_4K);
        let start = self.alloc(g + round_up(len, g) + g, g);
        let buf = start + g;
        self.plant(start, g);
        let end = start + g + round_up(len, g) + g;
        self.plant(buf + len, end - (buf + len));
        buf
    }

    /// Fill `[addr, addr + len)` with the canary pattern and remember it.
    pub fn plant(&mut self, addr: u64, len: u64) {
        let v: Vec<u8> = (addr..addr + len).map(canary_byte).collect();
        self.write(addr, &v);
        self.canaries.push(Canary { addr, len });
    }

    /// Forget the canaries in `[addr, addr + len)` (memory handed to the device on purpose).
    pub fn forget_canaries(&mut self, addr: u64, len: u64) {
        self.canaries
            .retain(|c| c.addr + c.len <= addr || c.addr >= addr + len);
    }

    /// Check every canary planted so far.
    pub fn check_canaries(&self) {
        for c in &self.canaries {
            let got = self.read(c.addr, c.len as usize);
            if let Some(i) = (0..got.len()).find(|&i| got[i] != canary_byte(c.addr + i as u64)) {
                panic!(
                    "canary overwritten at bus {:#x} (canary {:#x}+{:#x}): {:#04x}",
                    c.addr + i as u64,
                    c.addr,
                    c.len,
                    got[i]
                );
            }
        }
    }

    /// Write bytes at a bus address (the read-only region through its writer mapping).
    pub fn write(&self, addr: u64, data: &[u8]) {
        if (RO_BASE..RO_BASE + RO_SIZE).contains(&addr) {
            self.ro_writer
                .write_slice(data, GuestAddress(addr))
                .expect("read-only region write");
            return;
        }
        self.mem
            .memory()
            .write_slice(data, GuestAddress(addr))
            .expect("bus write");
    }

    /// Read `N` bytes at a bus address into an array (a wire type's encoded form).
    pub fn read_array<const N: usize>(&self, addr: u64) -> [u8; N] {
        let mut v = [0; N];
        self.mem
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .expect("bus read");
        v
    }

    /// Read `len` bytes at a bus address.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem
            .memory()
            .read_slice(&mut v, GuestAddress(addr))
            .expect("bus read");
        v
    }

    /// Write a little-endian u64.
    pub fn write_u64(&self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    /// Read a little-endian u64.
    pub fn read_u64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.read(addr, 8).try_into().unwrap())
    }

    /// Read a little-endian u32.
    pub fn read_u32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(self.read(addr, 4).try_into().unwrap())
    }

    /// The status of the completion record at bus address `at` (from its head word).
    pub fn cpl_status(&self, at: u64) -> u8 {
        let head = self
            .mem
            .memory()
            .read_obj::<u32>(GuestAddress(at))
            .expect("bus read");
        Completion::status_of_head(u32::from_le(head))
    }

    /// Read one byte at a bus address.
    pub fn read_u8(&self, addr: u64) -> u8 {
        self.mem
            .memory()
            .read_obj::<u8>(GuestAddress(addr))
            .expect("bus read")
    }

    /// Fill a range with one byte.
    pub fn fill(&self, addr: u64, len: u64, byte: u8) {
        const BLOCK: u64 = 1 << 20;
        let buf = vec![byte; BLOCK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(BLOCK);
            self.write(addr + done, &buf[..n as usize]);
            done += n;
        }
    }

    /// Host pointer to bus address `addr` (for memcpy baselines).
    pub fn host_ptr(&self, addr: u64) -> *mut u8 {
        use vm_memory::GuestMemoryBackend;
        self.mem
            .memory()
            .get_host_address(GuestAddress(addr))
            .expect("host address")
    }
}

impl Default for Bus {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------
// I/O page tables
// ---------------------------------------------------------------------------------------

/// Bus address offset of `iova`'s entry in a table of `level` (4 = root).
pub fn pt_offset(iova: u64, level: u32) -> u64 {
    (pte_index(iova, level) * std::mem::size_of::<Pte>()) as u64
}

/// Size mapped by a leaf at `level`.
pub fn level_page_size(level: u32) -> u64 {
    level_size(level)
}

/// Level of a leaf mapping pages of `page` bytes.
pub fn leaf_level(page: u64) -> u32 {
    match page {
        PAGE_4K => 1,
        PAGE_2M => 2,
        PAGE_1G => 3,
        _ => panic!("not a page size: {page:#x}"),
    }
}

/// A 4-level I/O page table being built in bus memory.
#[derive(Debug, Clone)]
pub struct PageTable {
    /// Bus address of the level-4 table.
    pub root: u64,
}

impl PageTable {
    /// An empty table (a zeroed root).
    pub fn new(bus: &mut Bus) -> Self {
        let root = bus.alloc(PAGE_4K, PAGE_4K);
        bus.fill(root, PAGE_4K, 0);
        Self { root }
    }

    /// Bus address of the table at `level` on `iova`'s path, creating missing tables with
    /// read-write entries.
    pub fn table(&self, bus: &mut Bus, iova: u64, level: u32) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=4).rev() {
            let ea = table + pt_offset(iova, l);
            let e = Pte(bus.read_u64(ea));
            if !e.is_present() {
                let t = bus.alloc(PAGE_4K, PAGE_4K);
                bus.fill(t, PAGE_4K, 0);
                bus.write_u64(ea, Pte::table(t, RW).raw());
                table = t;
            } else {
                assert!(
                    !e.is_large(),
                    "builder: {iova:#x} already mapped by a large page at level {l}"
                );
                table = e.addr();
            }
        }
        table
    }

    /// Bus address of the entry for `iova` at `level`, creating the tables above it.
    pub fn entry_addr(&self, bus: &mut Bus, iova: u64, level: u32) -> u64 {
        self.table(bus, iova, level) + pt_offset(iova, level)
    }

    /// Map `[iova, iova + len)` to `[pa, pa + len)` with pages of `page` bytes.
    pub fn map(&self, bus: &mut Bus, iova: u64, pa: u64, len: u64, page: u64, perms: u64) {
        assert_eq!(iova % page, 0, "iova alignment");
        assert_eq!(pa % page, 0, "bus alignment");
        let level = leaf_level(page);
        let mut off = 0;
        while off < len {
            let ea = self.entry_addr(bus, iova + off, level);
            // Written raw: tests map with any permission bits (0 among them).
            let leaf = Pte::leaf(pa + off, 0, level > 1).raw() | perms;
            bus.write_u64(ea, leaf);
            off += page;
        }
    }

    /// Map single pages: `iova + i * page` to `pages[i]`.
    pub fn map_pages(&self, bus: &mut Bus, iova: u64, pages: &[u64], page: u64, perms: u64) {
        for (i, &pa) in pages.iter().enumerate() {
            self.map(bus, iova + i as u64 * page, pa, page, page, perms);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Reference page walker (SPEC.md "I/O page tables")
// ---------------------------------------------------------------------------------------

/// A fault predicted by [`model_walk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelFault {
    /// `FAULT_*`.
    pub reason: u8,
    /// Level of the entry (or table) at fault, 0 outside a walk.
    pub level: u32,
    /// The entry (malformed), the bus address (outside RAM), else 0.
    pub info: u64,
    /// Reading a table failed (`ACCESS_PAGE_WALK`).
    pub walk_read: bool,
    /// The permissions accumulated before a structural fault already forbade the access:
    /// SPEC.md does not say whether that walk reports PERMISSION or the structural fault.
    pub perm_ambiguous: bool,
}

impl ModelFault {
    fn new(reason: u8, level: u32, info: u64) -> Self {
        Self {
            reason,
            level,
            info,
            walk_read: false,
            perm_ambiguous: false,
        }
    }
}

/// Translate `iova` through the table at `root` for a read or a write, as SPEC.md says.
/// Returns (bus address, page size).
pub fn model_walk(
    bus: &Bus,
    root: u64,
    iova: u64,
    write: bool,
    width: u32,
) -> Result<(u64, u64), ModelFault> {
    if width < 64 && iova >> width != 0 {
        return Err(ModelFault::new(FAULT_IOVA_WIDTH, 0, 0));
    }
    let need = if write { PTE_W } else { PTE_R };
    let mut perms = RW;
    let mut table = root & !0xfff;
    for level in (1..=4).rev() {
        let with = |mut f: ModelFault| {
            f.perm_ambiguous = perms & need == 0;
            f
        };
        if !Bus::readable(table) {
            let mut f = with(ModelFault::new(FAULT_OUTSIDE_RAM, level, table));
            f.walk_read = true;
            return Err(f);
        }
        let e = bus.read_u64(table + pt_offset(iova, level));
        if e & RW == 0 {
            return Err(with(ModelFault::new(FAULT_NOT_PRESENT, level, 0)));
        }
        let ps = e & PTE_PS != 0;
        let size = level_page_size(level);
        let malformed = e & PTE_RESERVED_MASK != 0
            || (ps && (level == 4 || level == 1))
            || (ps && (e & PTE_ADDR_MASK) & (size - 1) != 0);
        if malformed {
            return Err(with(ModelFault::new(FAULT_MALFORMED_ENTRY, level, e)));
        }
        perms &= e & RW;
        if level == 1 || ps {
            if perms & need == 0 {
                return Err(ModelFault::new(FAULT_PERMISSION, level, 0));
            }
            return Ok(((e & PTE_ADDR_MASK) | (iova & (size - 1)), size));
        }
        table = e & PTE_ADDR_MASK;
    }
    unreachable!()
}

/// What the device must report for a read-only operation over `[src, src + len)`: the
/// bytes read before the first faulting chunk, and the fault with its IOVA, or the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRead {
    /// Every byte readable: the data.
    Ok(Vec<u8>),
    /// A fault at `iova` after `bytes` bytes.
    Fault {
        /// Bytes before the fault.
        bytes: u64,
        /// The faulting IOVA.
        iova: u64,
        /// The fault.
        fault: ModelFault,
    },
}

/// Model a read of `[src, src + len)` in a translated domain, chunk by chunk.
pub fn model_read(bus: &Bus, root: u64, src: u64, len: u64, width: u32) -> ModelRead {
    let mut data = Vec::with_capacity(len as usize);
    let mut done = 0;
    while done < len {
        let a = src.wrapping_add(done);
        if a < src {
            // Wrapped past 2^64: beyond any width.
            return ModelRead::Fault {
                bytes: done,
                iova: a,
                fault: ModelFault::new(FAULT_IOVA_WIDTH, 0, 0),
            };
        }
        match model_walk(bus, root, a, false, width) {
            Err(fault) => {
                return ModelRead::Fault {
                    bytes: done,
                    iova: a,
                    fault,
                }
            }
            Ok((pa, size)) => {
                let n = (len - done).min(size - (a & (size - 1)));
                if !Bus::readable(pa) || !Bus::readable(pa + n - 1) {
                    return ModelRead::Fault {
                        bytes: done,
                        iova: a,
                        fault: ModelFault::new(FAULT_OUTSIDE_RAM, 0, pa),
                    };
                }
                data.extend_from_slice(&bus.read(pa, n as usize));
                done += n;
            }
        }
    }
    ModelRead::Ok(data)
}

// ---------------------------------------------------------------------------------------
// Descriptors, completions, fault records
// ---------------------------------------------------------------------------------------

/// Where a descriptor's completion record goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cpl {
    /// The driver's record for the ring slot (identity-mapped, zeroed before submission).
    #[default]
    Slot,
    /// No record (`DESC_COMPLETION` = 0).
    None,
    /// This IOVA (the test handles it).
    At(u64),
}

/// A descriptor before it is written to the ring.
#[derive(Debug, Clone, Copy, Default)]
pub struct Desc {
    /// `OP_*` (any byte).
    pub opcode: u8,
    /// Source IOVA, or the FILL pattern.
    pub src: u64,
    /// Destination IOVA, or COMPARE's second source.
    pub dst: u64,
    /// Length in bytes.
    pub len: u32,
    /// Tag echoed in the completion.
    pub tag: u64,
    /// Completion record.
    pub cpl: Cpl,
    /// `DESC_FLAG_*` (any byte).
    pub flags: u8,
    /// The reserved u16 at 0x02.
    pub reserved_lo: u16,
    /// Reserved bytes 0x28..0x40.
    pub reserved: [u8; 24],
}

impl Desc {
    /// COPY `len` bytes from `src` to `dst`.
    pub fn copy(src: u64, dst: u64, len: u32) -> Self {
        Self {
            opcode: OP_COPY,
            len,
            src,
            dst,
            tag: 0xc0b1,
            ..Self::default()
        }
    }
    /// FILL `len` bytes at `dst` with `pattern`.
    pub fn fill(dst: u64, len: u32, pattern: u64) -> Self {
        Self {
            opcode: OP_FILL,
            len,
            src: pattern,
            dst,
            tag: 0xf111,
            ..Self::default()
        }
    }
    /// COMPARE `len` bytes at `a` and `b`.
    pub fn compare(a: u64, b: u64, len: u32) -> Self {
        Self {
            opcode: OP_COMPARE,
            len,
            src: a,
            dst: b,
            tag: 0xc0e9,
            ..Self::default()
        }
    }
    /// CRC32C of `len` bytes at `src`.
    pub fn crc32c(src: u64, len: u32) -> Self {
        Self {
            opcode: OP_CRC32C,
            len,
            src,
            tag: 0xc3c3,
            ..Self::default()
        }
    }
    /// NOP.
    pub fn nop() -> Self {
        Self {
            opcode: OP_NOP,
            tag: 0x0909,
            ..Self::default()
        }
    }
    /// With these flags.
    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }
    /// With this tag.
    pub fn tag(mut self, tag: u64) -> Self {
        self.tag = tag;
        self
    }
    /// With this completion.
    pub fn cpl(mut self, cpl: Cpl) -> Self {
        self.cpl = cpl;
        self
    }

    /// The descriptor written to the ring, with the completion IOVA resolved.
    pub fn descriptor(self, cpl_iova: u64) -> Descriptor {
        Descriptor {
            opcode: self.opcode,
            flags: self.flags,
            reserved_lo: self.reserved_lo,
            len: self.len,
            src: self.src,
            dst: self.dst,
            completion: cpl_iova,
            tag: self.tag,
            reserved: self.reserved,
        }
    }

    /// The 64 bytes written to the ring, with the completion IOVA resolved.
    pub fn to_bytes(self, cpl_iova: u64) -> [u8; DESC_SIZE as usize] {
        self.descriptor(cpl_iova).encode()
    }
}

pub use domdma_device::spec::{CompletionRecord as Completion, FaultRecord};

/// A submitted descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    /// Queue.
    pub q: u32,
    /// Ring slot.
    pub slot: u32,
    /// Bus address of its completion record, when the driver knows it.
    pub cpl_bus: Option<u64>,
    /// The tag it carries.
    pub tag: u64,
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// A queue the driver set up.
#[derive(Debug, Clone)]
pub struct QueueCtx {
    /// Ring base (bus address = IOVA: identity mapped).
    pub ring: u64,
    /// Completion records, one per slot (bus address = IOVA).
    pub cpl: u64,
    /// Ring size.
    pub size: u32,
    /// Next slot to write.
    pub tail: u32,
    /// The device's head as last read (`Q_HEAD`): the ring has at least the room this
    /// leaves, since the head only moves towards the tail.
    pub head_seen: u32,
    /// Domain.
    pub domain: u32,
}

/// The fault log the driver set up.
#[derive(Debug, Clone, Copy)]
pub struct FaultLogCtx {
    /// Ring base bus address.
    pub base: u64,
    /// Records.
    pub size: u32,
    /// Next record to read.
    pub tail: u32,
}

/// A driver for one device over its own bus memory.
pub struct Driver {
    /// The device.
    pub dev: Device,
    /// Bus memory.
    pub bus: Bus,
    /// The configuration the device was made with.
    pub config: DeviceConfig,
    irq: Arc<RecordingInterrupts>,
    irq_seen: Vec<u16>,
    tables: BTreeMap<u32, PageTable>,
    queues: BTreeMap<u32, QueueCtx>,
    /// The fault log, once set up.
    pub flog: Option<FaultLogCtx>,
}

impl Driver {
    /// A device with the default configuration, bus mastering on.
    pub fn new() -> Self {
        Self::with_config(DeviceConfig::default())
    }

    /// A device with `config`, bus mastering on.
    pub fn with_config(config: DeviceConfig) -> Self {
        Self::with_tracer(config, Tracer::off())
    }

    /// A device with `config` that records to `trace`, bus mastering on.
    pub fn with_tracer(config: DeviceConfig, trace: Tracer) -> Self {
        let bus = Bus::new();
        let irq = Arc::new(RecordingInterrupts::new());
        let dev = Device::with_tracer(config.clone(), bus.mem.clone(), irq.clone(), trace);
        let mut d = Self {
            dev,
            bus,
            config,
            irq,
            irq_seen: Vec::new(),
            tables: BTreeMap::new(),
            queues: BTreeMap::new(),
            flog: None,
        };
        d.bus_master(true);
        d
    }

    /// Set or clear Bus Master Enable (PCI command bit 2), memory space on.
    pub fn bus_master(&mut self, on: bool) {
        let v = PCI_COMMAND_MEMORY | if on { PCI_COMMAND_MASTER } else { 0 };
        self.dev.config_write(PCI_COMMAND_OFFSET, &v.to_le_bytes());
    }

    // ---- registers ----

    /// Read a 32-bit register.
    pub fn read(&mut self, reg: u64) -> u32 {
        let mut b = [0; 4];
        self.dev.bar_read(REGS_BAR, reg, &mut b);
        u32::from_le_bytes(b)
    }

    /// Write a 32-bit register.
    pub fn write(&mut self, reg: u64, v: u32) {
        self.dev.bar_write(REGS_BAR, reg, &v.to_le_bytes());
    }

    /// Read queue `q`'s register.
    pub fn qread(&mut self, q: u32, reg: u64) -> u32 {
        self.read(queue_reg(q, reg))
    }

    /// Write queue `q`'s register.
    pub fn qwrite(&mut self, q: u32, reg: u64, v: u32) {
        self.write(queue_reg(q, reg), v)
    }

    /// Read domain `d`'s register.
    pub fn dread(&mut self, d: u32, reg: u64) -> u32 {
        self.read(domain_reg(d, reg))
    }

    /// Write domain `d`'s register.
    pub fn dwrite(&mut self, d: u32, reg: u64, v: u32) {
        self.write(domain_reg(d, reg), v)
    }

    /// Latch a counter through the statistics window.
    pub fn stat(&mut self, kind: u32, counter: u32, index: u32) -> u64 {
        self.write(REG_STAT_SELECT, kind << 24 | counter << 16 | index);
        u64::from(self.read(REG_STAT_VALUE_LO)) | u64::from(self.read(REG_STAT_VALUE_HI)) << 32
    }

    /// A queue counter through the window.
    pub fn qstat(&mut self, q: u32, counter: u32) -> u64 {
        self.stat(STAT_KIND_QUEUE, counter, q)
    }

    /// A domain counter through the window.
    pub fn dstat(&mut self, d: u32, counter: u32) -> u64 {
        self.stat(STAT_KIND_DOMAIN, counter, d)
    }

    /// The device's snapshot.
    pub fn stats(&self) -> DeviceStats {
        self.dev.stats()
    }

    // ---- interrupts ----

    /// Every vector raised so far, in order.
    pub fn irqs(&mut self) -> Vec<u16> {
        let new = self.irq.take();
        self.irq_seen.extend(new);
        self.irq_seen.clone()
    }

    /// How many times `v` was raised so far.
    pub fn irq_count(&mut self, v: u16) -> usize {
        self.irqs().iter().filter(|&&x| x == v).count()
    }

    /// Wait until `v` was raised at least `n` times.
    pub fn wait_irq_count(&mut self, v: u16, n: usize) {
        poll(&format!("{n} interrupts on vector {v}"), || {
            (self.irq_count(v) >= n).then_some(())
        });
    }

    /// Forget the interrupts seen so far.
    pub fn clear_irqs(&mut self) {
        self.irqs();
        self.irq_seen.clear();
    }

    // ---- domains ----

    /// Program domain `d`'s root and mode (no invalidation).
    pub fn set_domain(&mut self, d: u32, root: u64, mode: u32) {
        self.dwrite(d, D_ROOT_LO, root as u32);
        self.dwrite(d, D_ROOT_HI, (root >> 32) as u32);
        self.dwrite(d, D_CTRL, mode);
    }

    /// Make `d` a translated domain with a fresh, empty page table; invalidates it.
    pub fn translated_domain(&mut self, d: u32) -> u64 {
        let pt = PageTable::new(&mut self.bus);
        let root = pt.root;
        self.tables.insert(d, pt);
        self.set_domain(d, root, DOMAIN_MODE_TRANSLATED);
        assert_eq!(self.invalidate_domain(d) & INV_STATUS_ERROR, 0);
        root
    }

    /// Domain `d`'s page table.
    pub fn pt(&self, d: u32) -> PageTable {
        self.tables.get(&d).expect("translated domain").clone()
    }

    /// Map `[iova, iova + len)` to `[pa, pa + len)` in domain `d`.
    pub fn map(&mut self, d: u32, iova: u64, pa: u64, len: u64, page: u64, perms: u64) {
        let pt = self.pt(d);
        pt.map(&mut self.bus, iova, pa, len, page, perms);
    }

    /// Allocate guarded bus memory for `len` bytes and map it at `iova` in domain `d` with
    /// `page`-sized pages. Returns the bus address.
    pub fn map_new(&mut self, d: u32, iova: u64, len: u64, page: u64, perms: u64) -> u64 {
        // Canaries sit before the buffer, after it, and in the mapped pages beyond `len`.
        let pa = self.bus.alloc_guarded(len, page);
        self.map(d, iova, pa, round_up(len, page), page, perms);
        pa
    }

    /// Identity-map `[pa, pa + len)` (4 KiB pages, read-write) in domain `d`.
    pub fn identity_map(&mut self, d: u32, pa: u64, len: u64) {
        let start = pa & !(PAGE_4K - 1);
        let end = round_up(pa + len, PAGE_4K);
        self.map(d, start, start, end - start, PAGE_4K, RW);
    }

    /// Bus address of domain `d`'s entry for `iova` at `level` (tables above created).
    pub fn pte_addr(&mut self, d: u32, iova: u64, level: u32) -> u64 {
        let pt = self.pt(d);
        pt.entry_addr(&mut self.bus, iova, level)
    }

    /// Read domain `d`'s entry for `iova` at `level`.
    pub fn pte(&mut self, d: u32, iova: u64, level: u32) -> u64 {
        let a = self.pte_addr(d, iova, level);
        self.bus.read_u64(a)
    }

    /// Overwrite domain `d`'s entry for `iova` at `level`.
    pub fn set_pte(&mut self, d: u32, iova: u64, level: u32, v: u64) {
        let a = self.pte_addr(d, iova, level);
        self.bus.write_u64(a, v);
    }

    // ---- invalidation ----

    /// Start an invalidation and wait for `INV_STATUS_BUSY` to clear; returns the status.
    pub fn invalidate(&mut self, cmd: u32, domain: u32, addr: u64, len: u64) -> u32 {
        self.write(REG_INV_DOMAIN, domain);
        self.write(REG_INV_ADDR_LO, addr as u32);
        self.write(REG_INV_ADDR_HI, (addr >> 32) as u32);
        self.write(REG_INV_LEN_LO, len as u32);
        self.write(REG_INV_LEN_HI, (len >> 32) as u32);
        self.write(REG_INV_CMD, cmd);
        poll("INV_STATUS_BUSY to clear", || {
            let s = self.read(REG_INV_STATUS);
            (s & INV_STATUS_BUSY == 0).then_some(s)
        })
    }

    /// Invalidate everything.
    pub fn invalidate_all(&mut self) -> u32 {
        self.invalidate(INV_CMD_ALL, 0, 0, 0)
    }

    /// Invalidate domain `d`.
    pub fn invalidate_domain(&mut self, d: u32) -> u32 {
        self.invalidate(INV_CMD_DOMAIN, d, 0, 0)
    }

    /// Invalidate `[iova, iova + len)` of domain `d`.
    pub fn invalidate_range(&mut self, d: u32, iova: u64, len: u64) -> u32 {
        self.invalidate(INV_CMD_RANGE, d, iova, len)
    }

    // ---- fault log ----

    /// Set up and enable a fault log of `size` records (a power of two).
    pub fn enable_fault_log(&mut self, size: u32) -> u64 {
        let base = self.bus.alloc(u64::from(size) * FAULT_RECORD_SIZE, PAGE_4K);
        self.bus.fill(base, u64::from(size) * FAULT_RECORD_SIZE, 0);
        self.write(REG_FLOG_CTRL, 0);
        self.write(REG_FLOG_BASE_LO, base as u32);
        self.write(REG_FLOG_BASE_HI, (base >> 32) as u32);
        self.write(REG_FLOG_SIZE, size);
        self.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        assert_eq!(
            self.read(REG_FLOG_STATUS) & FLOG_STATUS_ERROR,
            0,
            "fault log rejected"
        );
        assert_eq!(self.read(REG_FLOG_CTRL), FLOG_CTRL_ENABLE);
        let tail = self.read(REG_FLOG_TAIL);
        self.flog = Some(FaultLogCtx { base, size, tail });
        base
    }

    /// Records written but not yet read.
    pub fn pending_faults(&mut self) -> u32 {
        let f = self.flog.expect("fault log");
        let head = self.read(REG_FLOG_HEAD);
        (head + f.size - f.tail) % f.size
    }

    /// Read the records between tail and head; advances `REG_FLOG_TAIL`.
    pub fn take_faults(&mut self) -> Vec<FaultRecord> {
        let mut f = self.flog.expect("fault log");
        let head = self.read(REG_FLOG_HEAD);
        let mut out = Vec::new();
        while f.tail != head {
            let at = f.base + u64::from(f.tail) * FAULT_RECORD_SIZE;
            out.push(FaultRecord::decode(&self.bus.read_array(at)));
            f.tail = (f.tail + 1) % f.size;
        }
        self.write(REG_FLOG_TAIL, f.tail);
        self.flog = Some(f);
        out
    }

    /// Wait until at least `n` records are pending, then take them all.
    pub fn wait_faults(&mut self, n: u32) -> Vec<FaultRecord> {
        poll(&format!("{n} fault records"), || {
            (self.pending_faults() >= n).then_some(())
        });
        self.take_faults()
    }

    // ---- queues ----

    /// Set up queue `q` in domain `domain` with `size` slots and `Q_CTRL` = ENABLE | `ctrl`.
    /// Ring and completion records are identity-mapped when the domain is translated.
    pub fn setup_queue_with(&mut self, q: u32, domain: u32, size: u32, ctrl: u32) {
        let ring_len = u64::from(size) * DESC_SIZE;
        let cpl_len = u64::from(size) * COMPLETION_SIZE;
        let ring = self.bus.alloc(ring_len, PAGE_4K);
        let cpl = self.bus.alloc(cpl_len, PAGE_4K);
        if self.tables.contains_key(&domain) {
            self.identity_map(domain, ring, ring_len);
            self.identity_map(domain, cpl, cpl_len);
        }
        self.qwrite(q, Q_CTRL, 0);
        self.qwrite(q, Q_BASE_LO, ring as u32);
        self.qwrite(q, Q_BASE_HI, (ring >> 32) as u32);
        self.qwrite(q, Q_SIZE, size);
        self.qwrite(q, Q_DOMAIN, domain);
        self.qwrite(q, Q_CTRL, Q_CTRL_ENABLE | ctrl);
        self.queues.insert(
            q,
            QueueCtx {
                ring,
                cpl,
                size,
                tail: 0,
                head_seen: 0,
                domain,
            },
        );
    }

    /// Set up queue `q` in `domain` with `size` slots, continuing after faults, and check
    /// it came up enabled without error.
    pub fn setup_queue(&mut self, q: u32, domain: u32, size: u32) {
        self.setup_queue_with(q, domain, size, 0);
        assert_eq!(
            self.qread(q, Q_STATUS) & (Q_STATUS_ENABLED | Q_STATUS_ERROR),
            Q_STATUS_ENABLED,
            "queue {q} did not come up"
        );
    }

    /// The driver's view of queue `q`.
    pub fn queue(&self, q: u32) -> QueueCtx {
        self.queues.get(&q).expect("queue set up").clone()
    }

    /// Forget the driver's tail (after the device reset the queue).
    pub fn reset_tail(&mut self, q: u32) {
        if let Some(c) = self.queues.get_mut(&q) {
            c.tail = 0;
            c.head_seen = 0;
        }
    }

    /// Write a descriptor at the tail without ringing; zeroes its slot record.
    pub fn push(&mut self, q: u32, desc: Desc) -> Ticket {
        let c = self.queue(q);
        // Flow control: keep one slot free (head == tail means empty). As a driver does,
        // read the head register only when the head last seen leaves no room (a register
        // read per descriptor would contend with the device for the queue).
        if (c.tail + 1) % c.size == c.head_seen {
            let head = poll(&format!("room in queue {q}"), || {
                let head = self.qread(q, Q_HEAD);
                ((c.tail + 1) % c.size != head).then_some(head)
            });
            self.queues.get_mut(&q).unwrap().head_seen = head;
        }
        let slot = c.tail;
        let slot_cpl = c.cpl + u64::from(slot) * COMPLETION_SIZE;
        let (cpl_iova, cpl_bus) = match desc.cpl {
            Cpl::Slot => (slot_cpl, Some(slot_cpl)),
            Cpl::None => (0, None),
            Cpl::At(a) => (a, None),
        };
        if let Some(b) = cpl_bus {
            self.bus.write(b, &[0u8; COMPLETION_SIZE as usize]);
        }
        self.bus.write(
            c.ring + u64::from(slot) * DESC_SIZE,
            &desc.to_bytes(cpl_iova),
        );
        self.queues.get_mut(&q).unwrap().tail = (slot + 1) % c.size;
        Ticket {
            q,
            slot,
            cpl_bus,
            tag: desc.tag,
        }
    }

    /// Ring queue `q`'s doorbell with the driver's tail.
    pub fn doorbell(&mut self, q: u32) {
        let t = self.queue(q).tail;
        // The descriptor bytes must be visible before the doorbell.
        fence(Ordering::Release);
        self.qwrite(q, Q_TAIL, t);
    }

    /// Submit one descriptor.
    pub fn submit(&mut self, q: u32, desc: Desc) -> Ticket {
        let t = self.push(q, desc);
        self.doorbell(q);
        t
    }

    /// Submit several descriptors, ringing once per ring-full.
    pub fn submit_many(&mut self, q: u32, descs: &[Desc]) -> Vec<Ticket> {
        let room = self.queue(q).size as usize - 1;
        let mut out = Vec::with_capacity(descs.len());
        for chunk in descs.chunks(room) {
            for &d in chunk {
                out.push(self.push(q, d));
            }
            self.doorbell(q);
        }
        out
    }

    /// Wait for the completion record at bus address `at`.
    pub fn wait_at(&self, at: u64) -> Completion {
        poll(&format!("completion at {at:#x}"), || {
            (self.bus.cpl_status(at) != STATUS_PENDING).then_some(())
        });
        fence(Ordering::Acquire);
        Completion::decode(&self.bus.read_array(at))
    }

    /// Wait for a ticket's completion and check the tag.
    pub fn wait(&self, t: &Ticket) -> Completion {
        let at = t
            .cpl_bus
            .expect("ticket without a driver-known completion record");
        let c = self.wait_at(at);
        assert_eq!(c.tag, t.tag, "completion tag of slot {}", t.slot);
        c
    }

    /// Wait for a ticket's completion by spinning (benchmarks: no sleeps in the loop).
    pub fn wait_spin(&self, t: &Ticket) -> Completion {
        let at = t.cpl_bus.expect("ticket with a record");
        let start = Instant::now();
        let mut spins = 0u32;
        while self.bus.cpl_status(at) == STATUS_PENDING {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 4096 == 0 {
                assert!(start.elapsed() < TIMEOUT, "timed out waiting for {at:#x}");
            }
        }
        fence(Ordering::Acquire);
        Completion::decode(&self.bus.read_array(at))
    }

    /// The completion record of a ticket as it is now (status may be pending).
    pub fn peek(&self, t: &Ticket) -> Completion {
        let at = t.cpl_bus.expect("ticket with a record");
        Completion::decode(&self.bus.read_array(at))
    }

    /// Wait for a ticket's completion, or for its queue to halt without completing it:
    /// `Err(Q_HALT_REASON)`.
    pub fn wait_or_halt(&mut self, t: &Ticket) -> Result<Completion, u32> {
        let at = t.cpl_bus.expect("ticket with a record");
        let halted = poll(&format!("completion at {at:#x} or a halt"), || {
            if self.bus.cpl_status(at) != STATUS_PENDING {
                return Some(false);
            }
            (self.qread(t.q, Q_STATUS) & Q_STATUS_ERROR != 0).then_some(true)
        });
        if halted && self.bus.cpl_status(at) == STATUS_PENDING {
            return Err(self.qread(t.q, Q_HALT_REASON));
        }
        Ok(self.wait(t))
    }

    /// Submit one descriptor and wait for its completion.
    pub fn run(&mut self, q: u32, desc: Desc) -> Completion {
        let t = self.submit(q, desc);
        self.wait(&t)
    }

    /// Wait until queue `q`'s head reaches the driver's tail (everything submitted done).
    pub fn wait_idle(&mut self, q: u32) {
        let tail = self.queue(q).tail;
        poll(&format!("queue {q} head to reach {tail}"), || {
            (self.qread(q, Q_HEAD) == tail).then_some(())
        });
    }

    /// Wait until `Q_STATUS` of `q` satisfies `pred`; returns it.
    pub fn wait_status(&mut self, q: u32, what: &str, pred: impl Fn(u32) -> bool) -> u32 {
        poll(what, || {
            let s = self.qread(q, Q_STATUS);
            pred(s).then_some(s)
        })
    }
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}
