//! Unit tests that drive the core as a driver would: registers through `bar_read`/`bar_write`,
//! descriptors, completion records and the fault log in `vm-memory` test memory.
//!
//! The engine runs on worker threads, so every wait polls with a bound (`TIMEOUT`); nothing
//! asserts on how long something took.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::*;
use crate::irq::RecordingInterrupts;
use crate::pci::{PCI_COMMAND, PCI_COMMAND_MASTER};

/// Bus memory: [0, 8 MiB) mapped, [8 MiB, 12 MiB) a hole, [12 MiB, 16 MiB) mapped.
const MEM_A: (u64, usize) = (0, 8 << 20);
const HOLE: u64 = 8 << 20;
const MEM_B: (u64, usize) = (12 << 20, 4 << 20);
/// Queue q's ring is at `RING + q * 0x1000`.
const RING: u64 = 0x1_0000;
const FLOG: u64 = 0x8_0000;
const CPL: u64 = 0x10_0000;
const SRC: u64 = 0x20_0000;
const DST: u64 = 0x40_0000;
/// Bound of every wait.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Poll `cond` until it holds; panics after `TIMEOUT`.
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[derive(Debug, Clone, Copy)]
struct Ring {
    size: u32,
    tail: u32,
}

struct TestDriver {
    dev: Device,
    mem: BusMemory,
    irq: Arc<RecordingInterrupts>,
    rings: Vec<Ring>,
}

fn desc(op: u8, flags: u8, len: u32, src: u64, dst: u64, cpl: u64, tag: u64) -> [u8; 64] {
    Descriptor {
        flags,
        completion: cpl,
        tag,
        ..Descriptor::new(op, len, src, dst)
    }
    .encode()
}

impl TestDriver {
    /// The default device over `MEM_A` and `MEM_B`, bus master on, queue 0 enabled.
    fn new() -> Self {
        Self::with(DeviceConfig::default(), &[MEM_A, MEM_B])
    }

    fn with(config: DeviceConfig, ranges: &[(u64, usize)]) -> Self {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        let gm = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        Self::over(config, gm)
    }

    fn over(config: DeviceConfig, gm: GuestMemoryMmap) -> Self {
        let mem = GuestMemoryAtomic::new(gm);
        let irq = Arc::new(RecordingInterrupts::new());
        let queues = config.queues as usize;
        let dev = Device::new(config, mem.clone(), irq.clone());
        let mut d = Self {
            dev,
            mem,
            irq,
            rings: vec![Ring { size: 0, tail: 0 }; queues],
        };
        d.bus_master(true);
        d.setup_queue(8);
        d
    }

    fn bus_master(&mut self, on: bool) {
        let v = if on { PCI_COMMAND_MASTER } else { 0 };
        self.dev.config_write(PCI_COMMAND as u64, &v.to_le_bytes());
    }

    fn read(&mut self, reg: u64) -> u32 {
        let mut b = [0; 4];
        self.dev.bar_read(REGS_BAR, reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, reg: u64, v: u32) {
        self.dev.bar_write(REGS_BAR, reg, &v.to_le_bytes());
    }

    fn qread(&mut self, q: u32, reg: u64) -> u32 {
        self.read(queue_reg(q, reg))
    }

    fn qwrite(&mut self, q: u32, reg: u64, v: u32) {
        self.write(queue_reg(q, reg), v)
    }

    fn ring_base(q: u32) -> u64 {
        RING + u64::from(q) * 0x1000
    }

    /// Program queue `q` (ring at `ring_base(q)`, domain, vector = q + 1) and enable it.
    fn setup(&mut self, q: u32, size: u32, domain: u32, ctrl: u32) {
        let base = Self::ring_base(q);
        self.qwrite(q, Q_CTRL, 0);
        self.qwrite(q, Q_BASE_LO, base as u32);
        self.qwrite(q, Q_BASE_HI, (base >> 32) as u32);
        self.qwrite(q, Q_SIZE, size);
        self.qwrite(q, Q_DOMAIN, domain);
        self.qwrite(q, Q_MSIX_VECTOR, q + 1);
        self.qwrite(q, Q_CTRL, Q_CTRL_ENABLE | ctrl);
        self.rings[q as usize] = Ring { size, tail: 0 };
    }

    fn setup_queue(&mut self, size: u32) {
        self.setup(0, size, 0, 0);
    }

    fn mem(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> + '_ {
        self.mem.memory()
    }

    /// Write a raw descriptor at queue `q`'s tail (no doorbell).
    fn push_raw_q(&mut self, q: u32, raw: [u8; 64]) {
        let ring = &mut self.rings[q as usize];
        let at = Self::ring_base(q) + u64::from(ring.tail) * DESC_SIZE;
        ring.tail = (ring.tail + 1) % ring.size;
        self.mem().write_slice(&raw, GuestAddress(at)).unwrap();
    }

    /// Write a descriptor (zeroing its completion record) at queue `q`'s tail.
    #[allow(clippy::too_many_arguments)]
    fn push_q(
        &mut self,
        q: u32,
        op: u8,
        flags: u8,
        len: u32,
        src: u64,
        dst: u64,
        cpl: u64,
        tag: u64,
    ) {
        if cpl != 0 && self.mem().check_range(GuestAddress(cpl), 32) {
            self.put(cpl, &[0u8; 32]);
        }
        self.push_raw_q(q, desc(op, flags, len, src, dst, cpl, tag));
    }

    #[allow(clippy::too_many_arguments)]
    fn push(&mut self, op: u8, flags: u8, len: u32, src: u64, dst: u64, cpl: u64, tag: u64) {
        self.push_q(0, op, flags, len, src, dst, cpl, tag)
    }

    fn doorbell_q(&mut self, q: u32) {
        let t = self.rings[q as usize].tail;
        self.qwrite(q, Q_TAIL, t);
    }

    fn doorbell(&mut self) {
        self.doorbell_q(0)
    }

    /// Wait until queue `q` has completed `n` descriptors in all (Q_COMPLETED is updated
    /// under the queue lock after the record, the head and the interrupt).
    fn wait_completed(&mut self, q: u32, n: u32) {
        wait_until("completions", || self.qread(q, Q_COMPLETED) == n);
    }

    /// Submit descriptors already pushed and wait for all of them.
    fn ring_and_wait(&mut self, q: u32) {
        let before = self.qread(q, Q_COMPLETED);
        let ring = self.rings[q as usize];
        let head = self.qread(q, Q_HEAD);
        let n = (ring.tail + ring.size - head) % ring.size;
        self.doorbell_q(q);
        self.wait_completed(q, before.wrapping_add(n));
    }

    /// Submit one descriptor on queue 0 and return its completion.
    fn run(&mut self, op: u8, flags: u8, len: u32, src: u64, dst: u64) -> CompletionRecord {
        self.push(op, flags, len, src, dst, CPL, 0xfeed);
        self.ring_and_wait(0);
        self.completion(CPL)
    }

    fn completion(&self, at: u64) -> CompletionRecord {
        let mut raw = [0u8; COMPLETION_SIZE as usize];
        self.mem().read_slice(&mut raw, GuestAddress(at)).unwrap();
        CompletionRecord::decode(&raw)
    }

    fn enable_fault_log(&mut self, size: u32) {
        self.put(FLOG, &vec![0xee; size as usize * 32]);
        self.write(REG_FLOG_BASE_LO, FLOG as u32);
        self.write(REG_FLOG_BASE_HI, 0);
        self.write(REG_FLOG_SIZE, size);
        self.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
        assert_eq!(self.read(REG_FLOG_CTRL), FLOG_CTRL_ENABLE);
    }

    fn stat(&mut self, kind: u32, counter: u32, index: u32) -> u64 {
        self.write(REG_STAT_SELECT, kind << 24 | counter << 16 | index);
        u64::from(self.read(REG_STAT_VALUE_LO)) | u64::from(self.read(REG_STAT_VALUE_HI)) << 32
    }

    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem().read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    fn put(&self, at: u64, data: &[u8]) {
        self.mem().write_slice(data, GuestAddress(at)).unwrap();
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

// ---- Registers ----

#[test]
fn strict_mode_and_32_bit_capabilities() {
    let config = DeviceConfig {
        strict_iotlb: true,
        iova_width: IOVA_WIDTH_32,
        queues: 2,
        domains: 3,
        ..DeviceConfig::default()
    };
    let mut d = TestDriver::with(config, &[MEM_A]);
    assert_eq!(
        d.read(REG_DEV_STATUS),
        DEV_STATUS_BUS_MASTER | DEV_STATUS_STRICT_IOTLB
    );
    let cap = d.read(REG_CAP);
    assert_eq!(cap, 2 | 3 << 8 | 32 << 16 | 3 << 24);
    assert_eq!(d.read(REG_FLOG_MSIX_VECTOR), 2);
    // Any IOVA at or above 4 GiB faults, even in pass-through.
    let c = d.run(OP_FILL, 0, 64, 0, 1 << 32);
    assert_eq!(
        (c.status, c.fault_reason, c.fault_addr),
        (STATUS_DMA_ERROR, FAULT_IOVA_WIDTH, 1 << 32)
    );
}

#[test]
fn scratch_and_soft_reset() {
    let mut d = TestDriver::new();
    for v in [0xdead_beef, 0, u32::MAX, 0x1234_5678] {
        d.write(REG_SCRATCH, v);
        assert_eq!(d.read(REG_SCRATCH), v);
    }
    d.write(REG_ID, 0);
    assert_eq!(
        d.read(REG_ID),
        DEVICE_ID_MAGIC,
        "RO register ignores writes"
    );
    d.enable_fault_log(4);
    d.write(domain_reg(3, D_ROOT_LO), 0x10_0000);
    d.write(domain_reg(3, D_CTRL), DOMAIN_MODE_TRANSLATED);
    d.qwrite(0, Q_COAL_COUNT, 4);
    assert_eq!(d.run(OP_FILL, 0, 64, 0, HOLE).status, STATUS_DMA_ERROR);
    d.write(domain_reg(0, D_CTRL), DOMAIN_MODE_DISABLED);
    d.write(REG_STAT_SELECT, STAT_KIND_QUEUE << 24 | QSTAT_FAULTS << 16);
    assert_eq!(d.read(REG_STAT_VALUE_LO), 1);

    d.write(REG_DEV_CTRL, DEV_CTRL_RESET);
    assert_eq!(d.read(REG_DEV_CTRL), 0);
    assert_eq!(d.read(REG_SCRATCH), 0);
    assert_eq!(d.qread(0, Q_CTRL), 0, "reset disables queues");
    for reg in [
        Q_BASE_LO,
        Q_SIZE,
        Q_HEAD,
        Q_TAIL,
        Q_COMPLETED,
        Q_ERRORS,
        Q_COAL_COUNT,
    ] {
        assert_eq!(d.qread(0, reg), 0, "queue register {reg:#x}");
    }
    assert_eq!(d.read(domain_reg(0, D_CTRL)), DOMAIN_MODE_PASSTHROUGH);
    assert_eq!(d.read(domain_reg(3, D_CTRL)), DOMAIN_MODE_DISABLED);
    assert_eq!(d.read(domain_reg(3, D_ROOT_LO)), 0);
    for reg in [
        REG_FLOG_CTRL,
        REG_FLOG_BASE_LO,
        REG_FLOG_HEAD,
        REG_FLOG_COUNT,
        REG_STAT_SELECT,
    ] {
        assert_eq!(d.read(reg), 0, "register {reg:#x}");
    }
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_FAULTS, 0), 0);
    assert_eq!(d.dev.stats().faults.count, 0);
    assert_eq!(
        d.read(REG_DEV_STATUS),
        DEV_STATUS_BUS_MASTER,
        "soft reset keeps PCI state"
    );
    // A worker asleep through the reset still wakes for the next doorbell.
    wait_until("the worker sleeps", || d.dev.asleep(0));
    d.write(REG_DEV_CTRL, DEV_CTRL_RESET);
    d.setup_queue(8);
    assert_eq!(d.run(OP_NOP, 0, 0, 0, 0).status, STATUS_OK);
}

#[test]
fn sub_dword_and_qword_register_access() {
    let mut d = TestDriver::new();
    let mut b = [0u8; 2];
    d.dev.bar_read(REGS_BAR, REG_ID + 2, &mut b);
    assert_eq!(u16::from_le_bytes(b), (DEVICE_ID_MAGIC >> 16) as u16);
    d.dev.bar_write(REGS_BAR, queue_reg(0, Q_BASE_LO), &[0; 8]); // enabled: ignored
    let mut q = [0u8; 8];
    d.dev.bar_read(REGS_BAR, queue_reg(0, Q_BASE_LO), &mut q);
    assert_eq!(u64::from_le_bytes(q), RING);
    // A 64-bit write programs both halves, low first.
    d.dev.bar_write(
        REGS_BAR,
        REG_INV_ADDR_LO,
        &0x1234_5678_9abc_d000u64.to_le_bytes(),
    );
    assert_eq!(d.read(REG_INV_ADDR_HI), 0x1234_5678);
    assert_eq!(d.read(REG_INV_ADDR_LO), 0x9abc_d000);
    // Misaligned and odd-sized accesses are ignored, not fatal.
    d.dev.bar_write(REGS_BAR, REG_SCRATCH + 1, &[1, 2, 3, 4]);
    d.dev.bar_write(REGS_BAR, REG_SCRATCH, &[1, 2, 3]);
    d.dev.bar_read(REGS_BAR, REGS_BAR_SIZE - 2, &mut [0; 4]);
    d.dev.bar_read(REGS_BAR, u64::MAX - 3, &mut [0; 4]);
    d.dev.bar_write(REGS_BAR, u64::MAX - 3, &[0; 4]);
    d.dev.bar_read(5, 0, &mut [0; 4]);
    assert_eq!(d.read(REG_SCRATCH), 0);
}

// ---- Operations ----

// ---- Malformed descriptors and faults ----

#[test]
fn unmapped_addresses_fault_after_the_mapped_part() {
    let mut d = TestDriver::new();
    d.put(HOLE - 8192, &[0x11; 8192]);
    // Destination runs from mapped memory into the hole: the mapped part is written, the
    // completion reports it and the first unmapped address; nothing beyond is touched.
    let dst = HOLE - 4096;
    let c = d.run(OP_FILL, 0, 8192, 0xffff_ffff_ffff_ffff, dst);
    assert_eq!(
        c.outcome(),
        (
            STATUS_DMA_ERROR,
            FAULT_OUTSIDE_RAM,
            ACCESS_WRITE,
            4096,
            HOLE
        )
    );
    assert_eq!(d.bytes(dst, 4096), [0xff; 4096]);
    assert_eq!(d.bytes(dst - 4096, 4096), [0x11; 4096]);
    // Source in the hole.
    let c = d.run(OP_COPY, 0, 64, HOLE + 64, DST);
    assert_eq!(
        c.outcome(),
        (STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, 0, 0, HOLE + 64)
    );
    // Address arithmetic that would wrap: beyond the IOVA width.
    let c = d.run(OP_FILL, 0, 64, 0, u64::MAX - 8);
    assert_eq!(
        (c.status, c.fault_reason, c.fault_addr),
        (STATUS_DMA_ERROR, FAULT_IOVA_WIDTH, u64::MAX - 8)
    );
    assert_eq!(d.qread(0, Q_ERRORS), 3);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_FAULTS, 0), 3);
    assert_eq!(d.stat(STAT_KIND_DOMAIN, DSTAT_FAULTS, 0), 3);
    assert_eq!(d.read(REG_FLOG_COUNT), 3);
    assert_eq!(d.read(REG_FLOG_DROPPED), 3, "log disabled: not logged");
}

#[test]
fn copy_across_regions_is_split() {
    let mut d = TestDriver::new();
    let data = pattern(8192, 3);
    d.put(MEM_B.0, &data);
    let c = d.run(OP_COPY, 0, 8192, MEM_B.0, DST);
    assert_eq!(c.status, STATUS_OK);
    assert_eq!(d.bytes(DST, 8192), data);
}

#[test]
fn read_only_mapping_is_not_written() {
    use vm_memory::{GuestRegionMmap, MmapRegion};
    const RO: u64 = 16 << 20;
    let rw = GuestRegionMmap::new(MmapRegion::new(8 << 20).unwrap(), GuestAddress(0)).unwrap();
    let ro_map = vm_memory::mmap::MmapRegionBuilder::new(4096)
        .with_mmap_prot(libc::PROT_READ)
        .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
        .build()
        .unwrap();
    let ro = GuestRegionMmap::new(ro_map, GuestAddress(RO)).unwrap();
    let gm = GuestMemoryMmap::from_regions(vec![rw, ro]).unwrap();
    let mut d = TestDriver::over(DeviceConfig::default(), gm);
    let c = d.run(OP_FILL, 0, 64, 1, RO);
    assert_eq!(
        (c.status, c.fault_reason, c.fault_addr),
        (STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, RO)
    );
    // Reading from it is allowed.
    assert_eq!(d.run(OP_COPY, 0, 64, RO, DST).status, STATUS_OK);
    assert_eq!(
        d.run(OP_CRC32C, 0, 64, RO, 0).result,
        u64::from(crc32c::crc32c(&[0; 64]))
    );
}

#[test]
fn ring_at_the_top_of_the_address_space_halts_without_overflow() {
    let mut d = TestDriver::new();
    d.qwrite(0, Q_CTRL, 0);
    d.qwrite(0, Q_BASE_LO, 0xffff_ffc0);
    d.qwrite(0, Q_BASE_HI, 0xffff_ffff);
    d.qwrite(0, Q_SIZE, 4096);
    d.qwrite(0, Q_CTRL, Q_CTRL_ENABLE);
    d.qwrite(0, Q_TAIL, 3);
    wait_until("halt", || d.qread(0, Q_STATUS) & Q_STATUS_ERROR != 0);
    assert_eq!(d.qread(0, Q_HALT_REASON), HALT_DESC_FETCH);
    // Resume on a ring that still cannot be fetched halts again, at the same descriptor.
    d.qwrite(0, Q_CTRL, Q_CTRL_ENABLE | Q_CTRL_RESUME);
    wait_until("halt", || d.qread(0, Q_STATUS) & Q_STATUS_ERROR != 0);
    assert_eq!(d.dev.stats().faults.count, 2);
    assert_eq!(d.qread(0, Q_HEAD), 0);
}

#[test]
fn function_level_reset_clears_config_space() {
    let mut d = TestDriver::new();
    d.dev.bar_write(MSIX_BAR, 12, &[0]);
    d.dev.reset();
    assert_eq!(d.read(REG_DEV_STATUS), 0);
    assert_eq!(d.dev.queue_state(0), Some(QueueState::Disabled));
    let mut b = [0u8; 16];
    d.dev.bar_read(MSIX_BAR, 0, &mut b);
    assert_eq!(b[12], 1, "MSI-X vectors reset masked");
    // After reset, the device works again once the driver programs it.
    d.bus_master(true);
    d.setup_queue(8);
    assert_eq!(d.run(OP_NOP, 0, 0, 0, 0).status, STATUS_OK);
}

// ---- Statistics ----

#[test]
fn statistics_window_and_inspector() {
    let mut d = TestDriver::new();
    d.run(OP_FILL, 0, 4096, 0, DST);
    d.run(OP_COPY, 0, 1000, DST, SRC);
    d.run(OP_FILL, DESC_FLAG_INTERRUPT, 64, 0, HOLE);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_DESCRIPTORS, 0), 3);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_BYTES, 0), 5096);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_ERRORS, 0), 1);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_FAULTS, 0), 1);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_INTERRUPTS, 0), 1);
    assert_eq!(d.stat(STAT_KIND_DOMAIN, DSTAT_FAULTS, 0), 1);
    // Unknown selections read 0; the selection reads back.
    assert_eq!(d.stat(STAT_KIND_QUEUE, 99, 0), 0);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_DESCRIPTORS, 1), 0);
    assert_eq!(d.stat(STAT_KIND_QUEUE, QSTAT_DESCRIPTORS, 999), 0);
    assert_eq!(d.stat(STAT_KIND_DOMAIN, DSTAT_FAULTS, 999), 0);
    assert_eq!(d.stat(7, 0, 0), 0);
    assert_eq!(d.read(REG_STAT_SELECT), 7 << 24);
    // The latched value does not move until the next selection.
    d.write(
        REG_STAT_SELECT,
        STAT_KIND_QUEUE << 24 | QSTAT_DESCRIPTORS << 16,
    );
    d.run(OP_NOP, 0, 0, 0, 0);
    assert_eq!(d.read(REG_STAT_VALUE_LO), 3);
    let s = d.dev.stats();
    assert_eq!(s.queues.len(), DEFAULT_QUEUES as usize);
    assert_eq!(s.domains.len(), DEFAULT_DOMAINS as usize);
    assert_eq!(s.queues[0].descriptors, 4);
    assert_eq!(s.queues[0].bytes, 5096);
    assert_eq!((s.faults.count, s.faults.dropped), (1, 1));
    assert_eq!(s.domains[0].faults, 1);
}

// ---- Coalescing ----

#[test]
fn coalescing_timer_fires_during_a_long_transfer() {
    let big = 160usize << 20;
    let mut d = TestDriver::with(DeviceConfig::default(), &[(0, big)]);
    d.qwrite(0, Q_COAL_COUNT, 100);
    d.qwrite(0, Q_COAL_USEC, 1);
    d.irq.take();
    let len = MAX_XFER;
    d.push(OP_NOP, DESC_FLAG_INTERRUPT, 0, 0, 0, CPL, 1);
    d.push(OP_COPY, 0, len, 16 << 20, 96 << 20, CPL + 32, 2);
    d.ring_and_wait(0);
    // The timer of the NOP fired at the latest when the copy ended; nothing else raised.
    let mut got = Vec::new();
    wait_until("the coalescing timer", || {
        got.extend(d.irq.take());
        !got.is_empty()
    });
    assert_eq!(got, vec![1]);
    assert_eq!(d.completion(CPL + 32).status, STATUS_OK);
}

// ---- Threads: concurrency, long transfers, disable, reset ----

/// A device over 160 MiB with a 64 MiB COPY from 16 MiB to 96 MiB pushed on queue 0.
fn long_copy() -> TestDriver {
    let mut d = TestDriver::with(DeviceConfig::default(), &[(0, 160 << 20)]);
    d.push(
        OP_COPY,
        DESC_FLAG_INTERRUPT,
        MAX_XFER,
        16 << 20,
        96 << 20,
        CPL,
        0x10,
    );
    d
}

#[test]
fn register_access_while_a_long_dma_runs() {
    let mut d = long_copy();
    d.put(16 << 20, &pattern(4096, 1));
    d.doorbell();
    // The doorbell returned with the descriptor outstanding: the engine is busy.
    assert_ne!(d.qread(0, Q_STATUS) & Q_STATUS_BUSY, 0);
    assert_eq!(d.read(REG_ID), DEVICE_ID_MAGIC);
    d.write(REG_SCRATCH, 5);
    assert_eq!(d.read(REG_SCRATCH), 5);
    d.wait_completed(0, 1);
    assert_eq!(d.qread(0, Q_STATUS), Q_STATUS_ENABLED);
    let c = d.completion(CPL);
    assert_eq!((c.status, c.bytes), (STATUS_OK, MAX_XFER));
    assert_eq!(d.bytes(96 << 20, 4096), pattern(4096, 1));
    assert_eq!(d.irq.take(), vec![1]);
}

#[test]
fn reset_during_a_long_transfer() {
    let mut d = long_copy();
    d.irq.take();
    d.doorbell();
    wait_until("the worker takes the copy", || d.dev.in_flight(0));
    d.write(REG_DEV_CTRL, DEV_CTRL_RESET);
    // Drained: no worker in flight, nothing completed, the queue back to reset.
    assert!(!d.dev.in_flight(0));
    assert_eq!(d.completion(CPL).status, STATUS_PENDING);
    assert_eq!(d.completion(CPL).tag, 0, "no part of the record written");
    assert_eq!(d.qread(0, Q_STATUS), 0);
    assert_eq!(d.qread(0, Q_BASE_LO), 0);
    assert_eq!(d.qread(0, Q_COMPLETED), 0);
    assert!(d.irq.take().is_empty());
    assert_eq!(d.dev.stats().queues[0].descriptors, 0);
}

#[test]
fn function_level_reset_during_a_long_transfer() {
    let mut d = long_copy();
    d.doorbell();
    wait_until("the worker takes the copy", || d.dev.in_flight(0));
    d.dev.reset();
    assert!(!d.dev.in_flight(0));
    assert_eq!(d.completion(CPL).status, STATUS_PENDING);
    assert_eq!(d.read(REG_DEV_STATUS), 0);
}

#[test]
fn disable_aborts_the_descriptor_in_flight() {
    let mut d = long_copy();
    d.irq.take();
    d.doorbell();
    wait_until("the worker takes the copy", || d.dev.in_flight(0));
    d.qwrite(0, Q_CTRL, 0);
    // Disable returned after the worker left the descriptor, completed ABORTED.
    assert!(!d.dev.in_flight(0));
    let c = d.completion(CPL);
    assert_eq!((c.status, c.tag), (STATUS_ABORTED, 0x10));
    assert!(c.bytes <= MAX_XFER);
    assert_eq!(
        (d.qread(0, Q_HEAD), d.qread(0, Q_TAIL), d.qread(0, Q_STATUS)),
        (0, 0, 0)
    );
    assert_eq!(d.qread(0, Q_ERRORS), 1);
    assert!(
        d.irq.take().is_empty(),
        "an aborted descriptor does not interrupt"
    );
    // The queue can be enabled again.
    d.setup_queue(8);
    assert_eq!(d.run(OP_NOP, 0, 0, 0, 0).status, STATUS_OK);
}

#[test]
fn drop_stops_a_busy_worker() {
    let mut d = long_copy();
    d.doorbell();
    wait_until("the worker takes the copy", || d.dev.in_flight(0));
    drop(d);
}

// ---- Translated domains (the MMU's page tables, through the engine) ----

/// Page tables from bus 0x60_0000 up: map 4 KiB `iova` -> `bus` (R and W as given) in the
/// tree rooted at `TABLE_ROOT`.
const TABLE_ROOT: u64 = 0x60_0000;

fn map_4k(d: &TestDriver, next: &mut u64, iova: u64, bus: u64, perm: u64) {
    let mut table = TABLE_ROOT;
    for level in (2..=4).rev() {
        let at = table + ((iova >> (12 + 9 * (level - 1))) & 511) * 8;
        let mut e: u64 = d.mem().read_obj(GuestAddress(at)).unwrap();
        if e == 0 {
            e = *next | PTE_R | PTE_W;
            *next += 0x1000;
            d.mem().write_obj(e, GuestAddress(at)).unwrap();
        }
        table = e & PTE_ADDR_MASK;
    }
    let at = table + ((iova >> 12) & 511) * 8;
    d.mem().write_obj(bus | perm, GuestAddress(at)).unwrap();
}

/// A translated domain 1 for queue 0 (ring and completions identity-mapped) whose source
/// pages at `SRC_IOVA` map to `src_bus(p)` (read-only) and destination pages at `DST_IOVA`
/// to `dst_bus(p)` (write-only, `None`: not mapped). Returns the next free table address.
fn translated_copy_setup(
    d: &mut TestDriver,
    pages: u64,
    src_bus: impl Fn(u64) -> u64,
    dst_bus: impl Fn(u64) -> Option<u64>,
) -> u64 {
    let mut next = TABLE_ROOT + 0x1000;
    map_4k(d, &mut next, RING, RING, PTE_R);
    map_4k(d, &mut next, CPL, CPL, PTE_R | PTE_W);
    for p in 0..pages {
        map_4k(d, &mut next, SRC_IOVA + p * 0x1000, src_bus(p), PTE_R);
        if let Some(bus) = dst_bus(p) {
            map_4k(d, &mut next, DST_IOVA + p * 0x1000, bus, PTE_W);
        }
    }
    d.write(domain_reg(1, D_ROOT_LO), TABLE_ROOT as u32);
    d.write(domain_reg(1, D_CTRL), DOMAIN_MODE_TRANSLATED);
    d.setup(0, 8, 1, 0);
    next
}

const SRC_IOVA: u64 = 0x7_0000_0000;
const DST_IOVA: u64 = 0x7_0010_0000;

#[test]
fn a_stale_page_inside_a_run_is_used_until_invalidated() {
    const S: u64 = 0x20_0000;
    const D: u64 = 0x30_0000;
    const X: u64 = 0x40_0000;
    for strict in [false, true] {
        let config = DeviceConfig {
            strict_iotlb: strict,
            ..DeviceConfig::default()
        };
        let mut d = TestDriver::with(config, &[MEM_A, MEM_B]);
        let mut next =
            translated_copy_setup(&mut d, 16, |p| S + p * 0x1000, |p| Some(D + p * 0x1000));
        let data = pattern(16 << 12, 4);
        d.put(S, &data);
        d.put(X, &[0x5a; 0x1000]);
        assert_eq!(
            d.run(OP_COPY, 0, 16 << 12, SRC_IOVA, DST_IOVA).status,
            STATUS_OK
        );
        // Page 5 remapped without an invalidation: the cached translation is still used,
        // inside a run of contiguous pages as alone.
        map_4k(&d, &mut next, SRC_IOVA + (5 << 12), X, PTE_R);
        d.put(D, &[0; 16 << 12]);
        assert_eq!(
            d.run(OP_COPY, 0, 16 << 12, SRC_IOVA, DST_IOVA).status,
            STATUS_OK
        );
        assert!(
            d.bytes(D, 16 << 12) == data,
            "strict {strict}: stale page used"
        );
        let stale = |d: &mut TestDriver| d.stat(STAT_KIND_DOMAIN, DSTAT_STALE_USES, 1);
        assert_eq!(
            stale(&mut d),
            u64::from(strict),
            "one stale use, in strict mode"
        );
        // After a range invalidation of that page the new mapping is used.
        d.write(REG_INV_DOMAIN, 1);
        d.write(REG_INV_ADDR_LO, (SRC_IOVA + (5 << 12)) as u32);
        d.write(REG_INV_ADDR_HI, ((SRC_IOVA + (5 << 12)) >> 32) as u32);
        d.write(REG_INV_LEN_LO, 1);
        d.write(REG_INV_CMD, INV_CMD_RANGE);
        assert_eq!(d.read(REG_INV_STATUS), 0);
        assert_eq!(
            d.run(OP_COPY, 0, 16 << 12, SRC_IOVA, DST_IOVA).status,
            STATUS_OK
        );
        let mut want = data.clone();
        want[5 << 12..6 << 12].fill(0x5a);
        assert!(
            d.bytes(D, 16 << 12) == want,
            "strict {strict}: new page used"
        );
        assert_eq!(stale(&mut d), u64::from(strict));
    }
}

/// Bus memory only the client reaches (a shadow region, see `remote`): the ring, the data
/// and the completion record all come from and go to the client's memory, never the
/// shadow; a client that refuses the access ends the descriptor with a DMA error and a
/// `FAULT_BUS_ERROR` record.
#[test]
fn client_only_memory_is_reached_through_the_client() {
    const LEN: usize = 16 << 20;
    let client = remote::tests::VecMemory::new(0, LEN);
    let region = remote::tests::shadow(0, LEN);
    remote::register(&region, client.clone());
    let gm = GuestMemoryMmap::from_regions(vec![region]).unwrap();
    let mut d = TestDriver::over(DeviceConfig::default(), gm);
    let put = |at: u64, data: &[u8]| {
        client.bytes.lock().unwrap()[at as usize..][..data.len()].copy_from_slice(data)
    };
    let get = |at: u64, n: usize| client.bytes.lock().unwrap()[at as usize..][..n].to_vec();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    put(SRC, &data);
    put(
        TestDriver::ring_base(0),
        &desc(OP_COPY, 0, 8192, SRC, DST, CPL, 0x77),
    );
    d.qwrite(0, Q_TAIL, 1);
    let status = |at: u64| {
        let head = u32::from_le_bytes(get(at, 4).try_into().unwrap());
        CompletionRecord::status_of_head(head)
    };
    wait_until("the completion in the client's memory", || {
        status(CPL) != STATUS_PENDING
    });
    assert_eq!(status(CPL), STATUS_OK);
    assert_eq!(get(DST, 8192), data, "the copy reached the client's memory");
    let mut shadow = vec![0u8; 8192];
    d.mem().read_slice(&mut shadow, GuestAddress(DST)).unwrap();
    assert_eq!(shadow, data, "the shadow holds what was sent");

    // The client refuses: a DMA error and a bus-error fault record, and the server lives.
    client
        .fail_from
        .store(SRC, std::sync::atomic::Ordering::Relaxed);
    put(
        TestDriver::ring_base(0) + DESC_SIZE,
        &desc(OP_COPY, 0, 8192, SRC, DST, CPL + 32, 0x78),
    );
    d.qwrite(0, Q_TAIL, 2);
    wait_until("the second completion", || {
        status(CPL + 32) != STATUS_PENDING
    });
    assert_eq!(status(CPL + 32), STATUS_DMA_ERROR);
    let stats = d.dev.stats();
    assert_eq!(stats.queues[0].errors, 1, "{stats:?}");
    assert_eq!(stats.faults.count, 1, "{stats:?}");
    let mem = d.mem();
    remote::unregister(mem.find_region(GuestAddress(0)).unwrap());
}

// ---- A busy queue: descriptors taken without the queue lock ----

/// Descriptors in [`busy_stream`]'s ring (one slot stays free).
const BUSY: u32 = 1023;

/// Queue 0 with a ring of 1024 and 1023 FILLs of 1 MiB at `DST` (one chunk each) pushed
/// and rung: it stays busy for a while (about 1 GiB written), completing descriptors one
/// after the other without the queue lock and with one hold of the chunk gate
/// (`engine::Exec::complete_fast`), over bus memory `gm`. Returns once the first completed.
fn busy_stream(gm: GuestMemoryMmap) -> TestDriver {
    let mut d = TestDriver::over(DeviceConfig::default(), gm);
    d.setup_queue(BUSY + 1);
    for i in 0..u64::from(BUSY) {
        d.push(OP_FILL, 0, 1 << 20, i, DST, CPL + 32 * i, i);
    }
    d.doorbell();
    wait_until("the first FILL", || d.qread(0, Q_COMPLETED) >= 1);
    d
}

#[test]
fn an_invalidation_does_not_wait_for_a_busy_queue_to_drain() {
    // The worker keeps its hold of the chunk gate from one descriptor to the next while
    // the queue stays busy; an invalidation (which takes the gate's write side) must still
    // get in at the next descriptor or chunk, not when the queue is empty.
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MEM_A.0), MEM_A.1)]).unwrap();
    let mut d = busy_stream(gm);
    d.write(REG_INV_CMD, INV_CMD_ALL);
    assert_eq!(d.read(REG_INV_STATUS), 0, "invalidation status");
    let done = d.qread(0, Q_COMPLETED);
    assert!(
        done < BUSY,
        "the invalidation waited for the queue to drain"
    );
    d.wait_completed(0, BUSY);
    for i in 0..u64::from(BUSY) {
        assert_eq!(d.completion(CPL + 32 * i).status, STATUS_OK, "FILL {i}");
    }
}

#[test]
fn memory_mapped_while_a_queue_streams_is_seen_by_the_descriptors_rung_after() {
    // Only MEM_A at first; MEM_B is mapped while the queue is busy, then a FILL into it is
    // rung: a worker that kept its snapshot of bus memory from before the doorbell would
    // find no memory there (FAULT_OUTSIDE_RAM).
    use vm_memory::GuestRegionMmap;
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(MEM_A.0), MEM_A.1)]).unwrap();
    let mut d = busy_stream(gm);
    let region = GuestRegionMmap::from_range(GuestAddress(MEM_B.0), MEM_B.1, None).unwrap();
    let gm = d.mem.memory().insert_region(Arc::new(region)).unwrap();
    d.mem.lock().unwrap().replace(gm);
    // The ring is full: the FILL goes in the slot of the first, completed already.
    let cpl = CPL + 32 * u64::from(BUSY);
    d.push(OP_FILL, 0, 4096, 0x5a, MEM_B.0, cpl, 0xb);
    d.doorbell();
    assert!(
        d.qread(0, Q_COMPLETED) < BUSY,
        "the queue was no longer busy"
    );
    d.wait_completed(0, BUSY + 1);
    let c = d.completion(cpl);
    assert_eq!(
        (c.status, c.fault_reason, c.fault_addr),
        (STATUS_OK, 0, 0),
        "the FILL into memory mapped meanwhile"
    );
    assert_eq!(d.bytes(MEM_B.0, 8), [0x5a, 0, 0, 0, 0, 0, 0, 0]);
}
