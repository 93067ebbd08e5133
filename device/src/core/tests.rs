//! Unit tests that drive the core as a driver would: registers through `bar_read`/`bar_write`,
//! descriptors and completion records in `vm-memory` test memory.

use super::*;
use crate::irq::RecordingInterrupts;
use crate::pci::PCI_COMMAND_MASTER;

/// Bus memory: [0, 8 MiB) mapped, [8 MiB, 12 MiB) a hole, [12 MiB, 16 MiB) mapped.
const MEM_A: (u64, usize) = (0, 8 << 20);
const HOLE: u64 = 8 << 20;
const MEM_B: (u64, usize) = (12 << 20, 4 << 20);
const RING: u64 = 0x1000;
const CPL: u64 = 0x10_0000;
const SRC: u64 = 0x20_0000;
const DST: u64 = 0x40_0000;

struct TestDriver {
    dev: Device,
    mem: BusMemory,
    irq: Arc<RecordingInterrupts>,
    tail: u32,
    size: u32,
}

impl TestDriver {
    fn new() -> Self {
        let gm = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(MEM_A.0), MEM_A.1),
            (GuestAddress(MEM_B.0), MEM_B.1),
        ])
        .unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        let irq = Arc::new(RecordingInterrupts::new());
        let dev = Device::new(DeviceConfig::default(), mem.clone(), irq.clone());
        let mut d = Self {
            dev,
            mem,
            irq,
            tail: 0,
            size: 8,
        };
        d.bus_master(true);
        d.setup_queue(d.size);
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

    fn setup_queue(&mut self, size: u32) {
        self.write(queue_reg(0, Q_CTRL), 0);
        self.write(queue_reg(0, Q_BASE_LO), RING as u32);
        self.write(queue_reg(0, Q_BASE_HI), (RING >> 32) as u32);
        self.write(queue_reg(0, Q_SIZE), size);
        self.write(queue_reg(0, Q_MSIX_VECTOR), 1);
        self.write(queue_reg(0, Q_CTRL), Q_CTRL_ENABLE);
        self.size = size;
        self.tail = 0;
    }

    fn mem(&self) -> impl std::ops::Deref<Target = GuestMemoryMmap> + '_ {
        self.mem.memory()
    }

    /// Write a raw descriptor at the tail (no doorbell); returns its completion address.
    fn push_raw(&mut self, raw: [u8; 64]) {
        let at = RING + u64::from(self.tail) * DESC_SIZE;
        self.mem().write_slice(&raw, GuestAddress(at)).unwrap();
        self.tail = (self.tail + 1) % self.size;
    }

    #[allow(clippy::too_many_arguments)]
    fn push(&mut self, op: u8, flags: u8, len: u32, src: u64, dst: u64, cpl: u64, tag: u64) {
        let mut raw = [0u8; 64];
        raw[0] = op;
        raw[1] = flags;
        raw[4..8].copy_from_slice(&len.to_le_bytes());
        raw[8..16].copy_from_slice(&src.to_le_bytes());
        raw[16..24].copy_from_slice(&dst.to_le_bytes());
        raw[24..32].copy_from_slice(&cpl.to_le_bytes());
        raw[32..40].copy_from_slice(&tag.to_le_bytes());
        if cpl != 0 && self.mem().check_range(GuestAddress(cpl), 32) {
            self.mem()
                .write_slice(&[0u8; 32], GuestAddress(cpl))
                .unwrap();
        }
        self.push_raw(raw);
    }

    fn doorbell(&mut self) {
        let t = self.tail;
        self.write(queue_reg(0, Q_TAIL), t);
    }

    /// Submit one descriptor and return its completion (status, bytes, fault, tag).
    fn run(&mut self, op: u8, flags: u8, len: u32, src: u64, dst: u64) -> (u32, u32, u64, u64) {
        self.push(op, flags, len, src, dst, CPL, 0xfeed);
        self.doorbell();
        self.completion(CPL)
    }

    fn completion(&self, at: u64) -> (u32, u32, u64, u64) {
        let m = self.mem();
        (
            m.read_obj::<u32>(GuestAddress(at)).unwrap(),
            m.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
            m.read_obj::<u64>(GuestAddress(at + 8)).unwrap(),
            m.read_obj::<u64>(GuestAddress(at + 24)).unwrap(),
        )
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
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn identity_and_capability_registers() {
    let mut d = TestDriver::new();
    assert_eq!(d.read(REG_ID), DEVICE_ID_MAGIC);
    assert_eq!(d.read(REG_VERSION), DEVICE_VERSION);
    let cap = d.read(REG_CAP);
    assert_eq!(cap & 0xff, NUM_QUEUES);
    assert_eq!((cap >> CAP_VECTORS_SHIFT) & 0xff, u32::from(MSIX_VECTORS));
    assert_eq!((cap >> CAP_IOVA_WIDTH_SHIFT) & 0xff, IOVA_WIDTH);
    assert_eq!(d.read(REG_MAX_XFER), MAX_XFER);
    assert_eq!(d.read(REG_CAP_OPS), 0b111);
    assert_eq!(d.read(REG_DEV_STATUS), DEV_STATUS_BUS_MASTER);
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
    d.write(REG_DEV_CTRL, DEV_CTRL_RESET);
    assert_eq!(d.read(REG_SCRATCH), 0);
    assert_eq!(d.read(queue_reg(0, Q_CTRL)), 0, "reset disables queues");
    assert_eq!(
        d.read(REG_DEV_STATUS),
        DEV_STATUS_BUS_MASTER,
        "soft reset keeps PCI state"
    );
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
    // Misaligned and odd-sized accesses are ignored, not fatal.
    d.dev.bar_write(REGS_BAR, REG_SCRATCH + 1, &[1, 2, 3, 4]);
    d.dev.bar_write(REGS_BAR, REG_SCRATCH, &[1, 2, 3]);
    d.dev.bar_read(REGS_BAR, REGS_BAR_SIZE - 2, &mut [0; 4]);
    assert_eq!(d.read(REG_SCRATCH), 0);
}

#[test]
fn copy_1mib() {
    let mut d = TestDriver::new();
    let data = pattern(1 << 20, 7);
    d.put(SRC, &data);
    let (status, bytes, fault, tag) = d.run(OP_COPY, 0, 1 << 20, SRC, DST);
    assert_eq!((status, bytes, fault, tag), (STATUS_OK, 1 << 20, 0, 0xfeed));
    assert_eq!(d.bytes(DST, 1 << 20), data);
    assert_eq!(d.read(queue_reg(0, Q_HEAD)), 1);
    assert_eq!(d.read(queue_reg(0, Q_COMPLETED)), 1);
    assert_eq!(d.read(queue_reg(0, Q_ERRORS)), 0);
}

#[test]
fn fill_pattern_and_neighbours_untouched() {
    let mut d = TestDriver::new();
    d.put(DST - 16, &[0xaa; 16 + 1001 + 16]);
    let (status, bytes, ..) = d.run(OP_FILL, 0, 1001, 0x0807_0605_0403_0201, DST);
    assert_eq!((status, bytes), (STATUS_OK, 1001));
    let got = d.bytes(DST - 16, 16 + 1001 + 16);
    assert!(got[..16].iter().all(|&b| b == 0xaa));
    assert!(got[16 + 1001..].iter().all(|&b| b == 0xaa));
    for (i, &b) in got[16..16 + 1001].iter().enumerate() {
        assert_eq!(b, (i % 8) as u8 + 1, "byte {i}");
    }
}

#[test]
fn interrupt_only_when_requested() {
    let mut d = TestDriver::new();
    d.run(OP_FILL, 0, 64, 0, DST);
    assert!(d.irq.take().is_empty());
    d.run(OP_FILL, DESC_FLAG_INTERRUPT, 64, 0, DST);
    assert_eq!(d.irq.take(), vec![1]);
}

#[test]
fn malformed_descriptors_error_and_touch_nothing() {
    let mut d = TestDriver::new();
    d.put(DST, &[0x5a; 4096]);
    // Unknown opcode, unknown flag, zero length, too long, NOP with a length.
    for (op, flags, len) in [
        (9, 0, 64),
        (OP_FILL, 0x80, 64),
        (OP_FILL, 0, 0),
        (OP_COPY, 0, MAX_XFER + 1),
        (OP_NOP, 0, 4),
    ] {
        let (status, bytes, ..) = d.run(op, flags, len, SRC, DST);
        assert_eq!(
            (status, bytes),
            (STATUS_INVALID_DESCRIPTOR, 0),
            "op {op} flags {flags} len {len}"
        );
    }
    // Reserved bytes set.
    let mut raw = [0u8; 64];
    raw[0] = OP_FILL;
    raw[4..8].copy_from_slice(&64u32.to_le_bytes());
    raw[16..24].copy_from_slice(&DST.to_le_bytes());
    raw[24..32].copy_from_slice(&CPL.to_le_bytes());
    raw[63] = 1;
    d.push_raw(raw);
    d.doorbell();
    assert_eq!(d.completion(CPL).0, STATUS_INVALID_DESCRIPTOR);
    // Overlapping copy.
    assert_eq!(
        d.run(OP_COPY, 0, 256, DST, DST + 128).0,
        STATUS_INVALID_DESCRIPTOR
    );
    assert!(d.bytes(DST, 4096).iter().all(|&b| b == 0x5a));
    assert_eq!(d.read(queue_reg(0, Q_ERRORS)), 7);
    assert_eq!(d.dev.queue_state(0), Some(QueueState::Running));
}

#[test]
fn unmapped_addresses_give_dma_error_with_fault_address() {
    let mut d = TestDriver::new();
    d.put(MEM_A.1 as u64 - 4096, &[0x11; 4096]);
    // Destination runs from mapped memory into the hole: nothing may be written.
    let dst = HOLE - 4096;
    let (status, _, fault, _) = d.run(OP_FILL, 0, 8192, 0xffff_ffff_ffff_ffff, dst);
    assert_eq!((status, fault), (STATUS_DMA_ERROR, HOLE));
    assert!(d.bytes(dst, 4096).iter().all(|&b| b == 0x11));
    // Source in the hole.
    let (status, _, fault, _) = d.run(OP_COPY, 0, 64, HOLE + 64, DST);
    assert_eq!((status, fault), (STATUS_DMA_ERROR, HOLE + 64));
    // Address arithmetic that wraps.
    let (status, _, fault, _) = d.run(OP_FILL, 0, 64, 0, u64::MAX - 8);
    assert_eq!((status, fault), (STATUS_DMA_ERROR, u64::MAX - 8));
}

#[test]
fn copy_across_regions_is_split() {
    let mut d = TestDriver::new();
    // Both regions are mapped but not contiguous, so a copy from one to the other works
    // while a range spanning the hole faults.
    let data = pattern(8192, 3);
    d.put(MEM_B.0, &data);
    let (status, ..) = d.run(OP_COPY, 0, 8192, MEM_B.0, DST);
    assert_eq!(status, STATUS_OK);
    assert_eq!(d.bytes(DST, 8192), data);
}

#[test]
fn unreadable_ring_halts_queue_until_restart() {
    let mut d = TestDriver::new();
    d.write(queue_reg(0, Q_CTRL), 0);
    d.write(queue_reg(0, Q_BASE_LO), HOLE as u32);
    d.write(queue_reg(0, Q_CTRL), Q_CTRL_ENABLE);
    d.write(queue_reg(0, Q_TAIL), 1);
    assert_eq!(
        d.dev.queue_state(0),
        Some(QueueState::Halted(QueueFault::DescriptorUnreadable(HOLE)))
    );
    assert_eq!(
        d.read(queue_reg(0, Q_STATUS)),
        Q_STATUS_ENABLED | Q_STATUS_ERROR
    );
    d.setup_queue(8);
    assert_eq!(d.read(queue_reg(0, Q_STATUS)), Q_STATUS_ENABLED);
}

#[test]
fn bad_queue_configuration_and_doorbell() {
    let mut d = TestDriver::new();
    d.setup_queue(3);
    assert_eq!(
        d.dev.queue_state(0),
        Some(QueueState::Halted(QueueFault::BadConfig))
    );
    d.setup_queue(8);
    d.write(queue_reg(0, Q_TAIL), 8);
    assert_eq!(
        d.dev.queue_state(0),
        Some(QueueState::Halted(QueueFault::BadTail(8)))
    );
}

#[test]
fn completion_record_unwritable_counts_error() {
    let mut d = TestDriver::new();
    d.push(OP_FILL, 0, 64, 0, DST, HOLE, 1);
    d.doorbell();
    assert_eq!(d.read(queue_reg(0, Q_ERRORS)), 1);
    assert_eq!(d.read(queue_reg(0, Q_HEAD)), 1);
}

#[test]
fn ring_wraps_around() {
    let mut d = TestDriver::new();
    for round in 0..5u64 {
        for i in 0..5u64 {
            let cpl = CPL + (i * 32);
            d.push(OP_FILL, 0, 8, round * 10 + i, DST + i * 8, cpl, i);
        }
        d.doorbell();
        for i in 0..5u64 {
            assert_eq!(d.completion(CPL + i * 32).0, STATUS_OK);
            assert_eq!(d.bytes(DST + i * 8, 8), (round * 10 + i).to_le_bytes());
        }
    }
    assert_eq!(d.read(queue_reg(0, Q_HEAD)), 25 % 8);
    assert_eq!(d.read(queue_reg(0, Q_COMPLETED)), 25);
}

#[test]
fn no_dma_without_bus_master() {
    let mut d = TestDriver::new();
    d.bus_master(false);
    d.push(OP_FILL, 0, 64, 0x4242_4242_4242_4242, DST, CPL, 1);
    d.doorbell();
    assert_eq!(d.completion(CPL).0, STATUS_PENDING);
    assert_eq!(d.read(queue_reg(0, Q_HEAD)), 0);
    d.bus_master(true);
    assert_eq!(d.completion(CPL).0, STATUS_OK);
    assert_eq!(d.bytes(DST, 8), [0x42; 8]);
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
    let irq = Arc::new(RecordingInterrupts::new());
    let mut dev = Device::new(DeviceConfig::default(), GuestMemoryAtomic::new(gm), irq);
    let mut d = TestDriver {
        mem: dev.mem.clone(),
        dev: {
            dev.config_write(PCI_COMMAND as u64, &PCI_COMMAND_MASTER.to_le_bytes());
            dev
        },
        irq: Arc::new(RecordingInterrupts::new()),
        tail: 0,
        size: 8,
    };
    d.setup_queue(8);
    let (status, _, fault, _) = d.run(OP_FILL, 0, 64, 1, RO);
    assert_eq!((status, fault), (STATUS_DMA_ERROR, RO));
    // Reading from it is allowed.
    assert_eq!(d.run(OP_COPY, 0, 64, RO, DST).0, STATUS_OK);
}

#[test]
fn function_level_reset_clears_config_space() {
    let mut d = TestDriver::new();
    d.dev.reset();
    assert_eq!(d.read(REG_DEV_STATUS), 0);
    assert_eq!(d.dev.queue_state(0), Some(QueueState::Disabled));
    let mut b = [0u8; 16];
    d.dev.bar_read(MSIX_BAR, 0, &mut b);
    assert_eq!(b[12], 1, "MSI-X vectors reset masked");
}

#[test]
fn ring_at_the_top_of_the_address_space_halts_without_overflow() {
    let mut d = TestDriver::new();
    d.write(queue_reg(0, Q_CTRL), 0);
    d.write(queue_reg(0, Q_BASE_LO), 0xffff_ffc0);
    d.write(queue_reg(0, Q_BASE_HI), 0xffff_ffff);
    d.write(queue_reg(0, Q_SIZE), 4096);
    d.write(queue_reg(0, Q_CTRL), Q_CTRL_ENABLE);
    d.write(queue_reg(0, Q_TAIL), 3);
    assert!(matches!(
        d.dev.queue_state(0),
        Some(QueueState::Halted(QueueFault::DescriptorUnreadable(_)))
    ));
}
