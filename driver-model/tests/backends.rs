//! The driver model over the two back ends where this process is the VMM: the device core
//! linked in (`InProcessBackend`) and the real `domdma-device` server over vfio-user
//! (`VfioUserBackend`, one server process per test).
//!
//! The DMA tests are written once over `&dyn DmaBackend` and instantiated for both back
//! ends (modules `in_process` and `vfio_user`); they mirror the guest suite's tests
//! (guest-tests/src/suite.rs). Then come tests of one back end only: the vfio-user
//! connection life cycle (a second client, a client process killed mid-session, a server
//! that goes away) and a fake server sending hostile replies.
//!
//! Every wait polls with a deadline; the only fixed waits are the bounded windows in which
//! an interrupt must *not* arrive.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use domdma_device::core::DeviceConfig;
use domdma_device::spec;
use domdma_device::vfio_user::proto::{
    self, Capabilities, DeviceInfo, DmaUnmap, Header, IrqInfo, RegionAccess, RegionInfo, Version,
    HEADER_SIZE,
};
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::backend::vfio_user::{
    DeviceServer, VfioUserBackend, VfioUserConfig, VfioUserError,
};
use domdma_driver_model::backend::{
    BackendError, BumpIova, DmaBackend, DmaRequest, PageKind, RegisterAccess, PAGE_SIZE_2M,
    PCI_COMMAND, PCI_COMMAND_BUS_MASTER,
};
use domdma_driver_model::caps::{read_stat, Capabilities as DevCaps, Stat};
use domdma_driver_model::dma_queue::{
    reset_device, CompletionRecord, CompletionRecords, Descriptor, DmaQueue, QueueConfig,
};
use domdma_driver_model::domain::Domain;
use domdma_driver_model::fault_log::FaultLog;
use domdma_driver_model::iopt::{PageSize, Perm};
use vmm_sys_util::tempdir::TempDir;

/// How long any wait may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long an interrupt that must not come is waited for.
const NO_IRQ_WINDOW: Duration = Duration::from_millis(200);
const MIB: usize = 1 << 20;
/// Huge pages per node in the tests' guest RAM.
const HUGE: u32 = 8;

/// Small guest RAM: two nodes of 64 MiB at 4 GiB, `huge` 2 MiB pages in each.
fn phys(huge: u32) -> PhysConfig {
    PhysConfig {
        nodes: 2,
        node_size: 64 << 20,
        huge_pages_per_node: huge,
        ..PhysConfig::default()
    }
}

/// A back end, and the server process behind it (dropped after the back end).
struct Fixture {
    dev: Box<dyn DmaBackend>,
    phys: PhysConfig,
    _server: Option<DeviceServer>,
}

impl Fixture {
    fn dev(&self) -> &dyn DmaBackend {
        &*self.dev
    }
}

fn in_process(huge: u32) -> Fixture {
    let phys = phys(huge);
    let dev = InProcessBackend::new(InProcessConfig {
        device: DeviceConfig::default(),
        phys: phys.clone(),
    })
    .expect("in-process back end");
    Fixture {
        dev: Box::new(dev),
        phys,
        _server: None,
    }
}

fn spawn_server() -> DeviceServer {
    DeviceServer::spawn(&[]).unwrap_or_else(|e| panic!("{e}"))
}

fn connect(server: &DeviceServer, phys: PhysConfig) -> VfioUserBackend {
    VfioUserBackend::connect(&VfioUserConfig::new(server.socket()).with_phys(phys))
        .unwrap_or_else(|e| panic!("connecting: {e}\n--- server log ---\n{}", server.log()))
}

fn vfio_user(huge: u32) -> Fixture {
    let server = spawn_server();
    let phys = phys(huge);
    let dev = connect(&server, phys.clone());
    Fixture {
        dev: Box::new(dev),
        phys,
        _server: Some(server),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers (as guest-tests/src/harness.rs)
// ---------------------------------------------------------------------------------------

/// Reset through DEV_CTRL, bus mastering on.
fn fresh(dev: &dyn DmaBackend) {
    reset_device(dev, TIMEOUT).expect("device reset");
    dev.set_bus_master(true).expect("bus master enable");
}

/// Submits one descriptor with completion record `i` (cleared first) and polls for it.
fn run_desc(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    i: usize,
    desc: Descriptor,
) -> CompletionRecord {
    cpl.clear(i);
    q.submit(&[desc.with_completion(cpl.device_addr(i))])
        .expect("submit");
    q.wait_completion(cpl, i, TIMEOUT).expect("completion")
}

#[track_caller]
fn assert_ok(c: &CompletionRecord, what: &str) {
    assert_eq!(c.status, spec::STATUS_OK, "{what}: {c}");
}

#[track_caller]
fn assert_fault(c: &CompletionRecord, reason: u8, addr: u64, write: bool, what: &str) {
    assert_eq!(c.status, spec::STATUS_DMA_ERROR, "{what}: {c}");
    assert_eq!(c.fault_reason, reason, "{what}: fault reason: {c}");
    assert_eq!(c.fault_addr, addr, "{what}: fault address: {c}");
    assert_eq!(
        c.fault_access & spec::ACCESS_WRITE != 0,
        write,
        "{what}: access: {c}"
    );
    assert_eq!(c.bytes, 0, "{what}: bytes: {c}");
}

/// `len` bytes of data unique to `seed` (xorshift64*).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

#[track_caller]
fn assert_all(bytes: &[u8], value: u8, what: &str) {
    if let Some(i) = bytes.iter().position(|&b| b != value) {
        panic!(
            "{what}: byte {i:#x} is {:#x}, expected {value:#x}",
            bytes[i]
        );
    }
}

fn drain_interrupts(dev: &dyn DmaBackend) {
    for v in 0..dev.msix_vectors() {
        dev.wait_interrupt(v, Duration::ZERO)
            .expect("wait_interrupt");
    }
}

/// IOVAs for translated domains: far from guest RAM's bus addresses.
struct Iovas {
    ring: u64,
    cpl: u64,
    data: u64,
    src: u64,
    dst: u64,
}

fn iovas(caps: &DevCaps) -> Iovas {
    let base = if caps.iova_width > 39 {
        BumpIova::DEFAULT_END
    } else {
        0xc000_0000
    };
    Iovas {
        ring: base,
        cpl: base + 0x10_0000,
        data: base + 0x40_0000,
        src: base + 0x1000_0000,
        dst: base + 0x2000_0000,
    }
}

/// A queue whose ring (read-only) and completion records (read-write) are mapped in `dom`.
fn queue_in_domain<'b>(
    dev: &'b dyn DmaBackend,
    dom: &mut Domain<'b>,
    cfg: QueueConfig,
    io: &Iovas,
    records: usize,
) -> (DmaQueue<'b>, CompletionRecords) {
    let ring = dev
        .alloc_dma(DmaRequest::new(cfg.ring_bytes()))
        .expect("ring");
    dom.map_buffer(io.ring, &ring, Perm::R).expect("map ring");
    let mut cpl = CompletionRecords::new(dev, records).expect("records");
    dom.map_buffer(io.cpl, cpl.buffer(), Perm::RW)
        .expect("map records");
    cpl.set_device_base(io.cpl);
    let q = DmaQueue::with_ring(dev, cfg.in_domain(dom.index()), ring, io.ring).expect("queue");
    (q, cpl)
}

fn domain_stat(dev: &dyn DmaBackend, index: u32, counter: u32) -> u64 {
    read_stat(dev, Stat::Domain { index, counter }).expect("domain counter")
}

// ---------------------------------------------------------------------------------------
// Tests written once, run on both back ends
// ---------------------------------------------------------------------------------------

/// The register BAR, configuration space, the back end's facts and its range checks.
fn registers_and_config_space(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    assert_eq!(dev.read32(spec::REG_ID).unwrap(), spec::DEVICE_ID_MAGIC);
    dev.write32(spec::REG_SCRATCH, 0x5eed_cafe).unwrap();
    assert_eq!(dev.read32(spec::REG_SCRATCH).unwrap(), 0x5eed_cafe);
    assert_eq!(dev.config_read16(0).unwrap(), spec::PCI_VENDOR_ID);
    assert_eq!(dev.config_read16(2).unwrap(), spec::PCI_DEVICE_ID);
    assert_ne!(
        dev.config_read16(PCI_COMMAND).unwrap() & PCI_COMMAND_BUS_MASTER,
        0,
        "bus mastering is on after open"
    );
    assert_ne!(
        dev.read32(spec::REG_DEV_STATUS).unwrap() & spec::DEV_STATUS_BUS_MASTER,
        0
    );
    dev.set_bus_master(false).unwrap();
    assert_eq!(
        dev.read32(spec::REG_DEV_STATUS).unwrap() & spec::DEV_STATUS_BUS_MASTER,
        0,
        "DEV_STATUS follows Bus Master Enable"
    );
    dev.set_bus_master(true).unwrap();

    let caps = DevCaps::read(dev).unwrap();
    let info = dev.info();
    assert_eq!(u32::from(info.msix_vectors), caps.vectors);
    assert_eq!(dev.msix_vectors(), info.msix_vectors);
    assert_eq!(info.numa_node, Some(1), "the device sits on node 1");
    assert_eq!(dev.numa_nodes(), 2);
    assert!(matches!(
        info.register_access,
        RegisterAccess::Direct | RegisterAccess::Message
    ));

    for bad in [
        spec::REGS_BAR_SIZE,
        spec::REGS_BAR_SIZE - 2,
        2,
        u64::MAX - 1,
    ] {
        assert!(
            matches!(
                dev.read32(bad),
                Err(BackendError::OutOfRange { region: "BAR0", .. })
            ),
            "read32({bad:#x})"
        );
        assert!(matches!(
            dev.write32(bad, 0),
            Err(BackendError::OutOfRange { .. })
        ));
    }
    let mut b = [0u8; 8];
    assert!(matches!(
        dev.config_read(252, &mut b),
        Err(BackendError::OutOfRange {
            region: "config space",
            ..
        })
    ));
    assert!(matches!(
        dev.wait_interrupt(dev.msix_vectors(), Duration::ZERO),
        Err(BackendError::NoSuchVector { .. })
    ));
}

/// COPY of 1 MiB of random data through the pass-through domain, then a FILL.
fn copy_passthrough(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    let mut q = DmaQueue::new(dev, 0, 64, 0).unwrap();
    let cpl = CompletionRecords::new(dev, 4).unwrap();
    let src = dev.alloc_dma(DmaRequest::new(MIB)).unwrap();
    let dst = dev.alloc_dma(DmaRequest::new(MIB)).unwrap();
    let data = pattern(1, MIB);
    src.write(0, &data);
    dst.fill(0, MIB, 0xee);
    let completed0 = q.read_reg(spec::Q_COMPLETED).unwrap();

    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(src.bus_addr(), dst.bus_addr(), MIB as u32).with_tag(0xc0de),
    );
    assert_ok(&c, "COPY 1 MiB");
    assert_eq!((c.bytes, c.tag, c.fault_addr), (MIB as u32, 0xc0de, 0));
    assert!(
        dst.to_vec(0, MIB) == data,
        "destination differs from the source"
    );
    assert!(src.to_vec(0, MIB) == data, "source changed");
    q.wait_idle(TIMEOUT).unwrap();
    assert_eq!(q.head().unwrap(), q.tail());
    assert_eq!(
        q.read_reg(spec::Q_COMPLETED)
            .unwrap()
            .wrapping_sub(completed0),
        1
    );

    // A FILL over an odd range; the bytes around it are untouched.
    let (off, len) = (0x1040usize, 3 * 4096 + 5);
    let pat = 0x0123_4567_89ab_cdefu64;
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::fill(dst.bus_addr() + off as u64, pat, len as u32),
    );
    assert_ok(&c, "FILL");
    let want: Vec<u8> = (0..len).map(|i| pat.to_le_bytes()[i % 8]).collect();
    assert!(dst.to_vec(off, len) == want, "filled range");
    assert!(dst.to_vec(0, off) == data[..off], "bytes before the fill");
    assert!(
        dst.to_vec(off + len, 64) == data[off + len..off + len + 64],
        "bytes after the fill"
    );
}

/// With the INTERRUPT flag the queue's vector fires after the completion is written;
/// without it nothing arrives; other vectors stay silent; rearm discards pending ones.
fn completion_interrupt(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    dev.rearm_interrupts().unwrap();
    drain_interrupts(dev);
    let vector = 1;
    let mut q = DmaQueue::new(dev, 0, 16, vector).unwrap();
    let cpl = CompletionRecords::new(dev, 4).unwrap();
    let buf = dev.alloc_dma(DmaRequest::new(4096)).unwrap();

    cpl.clear(0);
    q.submit(&[Descriptor::fill(buf.bus_addr(), 0x1111, 4096)
        .with_interrupt()
        .with_tag(1)
        .with_completion(cpl.device_addr(0))])
        .unwrap();
    let n = dev.wait_interrupt(vector, TIMEOUT).unwrap();
    assert!(n >= 1, "no interrupt on vector {vector}");
    let c = cpl.read(0);
    assert_ok(&c, "completion when the interrupt arrived");
    assert_eq!(c.tag, 1);
    for v in (0..dev.msix_vectors()).filter(|&v| v != vector) {
        assert_eq!(
            dev.wait_interrupt(v, Duration::ZERO).unwrap(),
            0,
            "vector {v}"
        );
    }

    let c = run_desc(&mut q, &cpl, 1, Descriptor::fill(buf.bus_addr(), 2, 4096));
    assert_ok(&c, "FILL without INTERRUPT");
    assert_eq!(
        dev.wait_interrupt(vector, NO_IRQ_WINDOW).unwrap(),
        0,
        "an interrupt without the INTERRUPT flag"
    );

    cpl.clear(2);
    q.submit(&[Descriptor::nop()
        .with_interrupt()
        .with_tag(3)
        .with_completion(cpl.device_addr(2))])
        .unwrap();
    let c = q.wait_completion_irq(&cpl, 2, TIMEOUT).unwrap();
    assert_ok(&c, "NOP waited for by interrupt");
    assert_eq!(c.tag, 3);

    // An interrupt pending at rearm is discarded.
    let c = run_desc(
        &mut q,
        &cpl,
        3,
        Descriptor::nop().with_interrupt().with_tag(4),
    );
    assert_ok(&c, "NOP");
    dev.rearm_interrupts().unwrap();
    assert_eq!(
        dev.wait_interrupt(vector, NO_IRQ_WINDOW).unwrap(),
        0,
        "interrupt kept across rearm"
    );
}

/// A COPY through a translated domain with 2 MiB leaves between huge-page buffers; the
/// source pages are mapped in swapped order so the result proves the translation, and a
/// bus address is just an unmapped IOVA there.
fn translated_domain_2m(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    let caps = DevCaps::read(dev).unwrap();
    assert!(caps.domains >= 2 && caps.supports_page(PageSize::Size2M));
    let io = iovas(&caps);
    let two_m = PAGE_SIZE_2M as u64;
    let len = 2 * PAGE_SIZE_2M;
    let mut dom = Domain::translated(dev, 1, caps.iova_width).unwrap();
    let (mut q, cpl) = queue_in_domain(dev, &mut dom, QueueConfig::new(0, 16, 0), &io, 4);
    let src = dev.alloc_dma(DmaRequest::huge(len)).unwrap();
    let dst = dev.alloc_dma(DmaRequest::huge(len)).unwrap();
    for b in [&src, &dst] {
        assert_eq!(b.bus_addr() % two_m, 0);
        assert_eq!(b.page_size(), PAGE_SIZE_2M);
    }
    dom.map(
        io.src,
        src.bus_addr() + two_m,
        two_m,
        Perm::R,
        PageSize::Size2M,
    )
    .unwrap();
    dom.map(
        io.src + two_m,
        src.bus_addr(),
        two_m,
        Perm::R,
        PageSize::Size2M,
    )
    .unwrap();
    dom.map_buffer(io.dst, &dst, Perm::RW).unwrap();
    let m = dom.table().translate(io.dst + 0x1234).unwrap();
    assert_eq!(m.bus, dst.bus_addr() + 0x1234);
    assert_eq!(m.page, PageSize::Size2M, "map_buffer used 2 MiB leaves");

    let data = pattern(2, len);
    src.write(0, &data);
    dst.fill(0, len, 0xee);
    let view: Vec<u8> = [&data[PAGE_SIZE_2M..], &data[..PAGE_SIZE_2M]].concat();
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(0x2d),
    );
    assert_ok(&c, "COPY 4 MiB through domain 1");
    assert_eq!((c.bytes, c.tag), (len as u32, 0x2d));
    assert!(
        dst.to_vec(0, len) == view,
        "destination is not the swapped source"
    );

    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::fill(dst.bus_addr(), 0x1111, 4096).with_tag(3),
    );
    assert_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        dst.bus_addr(),
        true,
        "FILL at a bus address in domain 1",
    );
    assert!(dst.to_vec(0, len) == view, "the faulting FILL wrote");
    assert!(domain_stat(dev, 1, spec::DSTAT_TRANSLATIONS) > 0);
    assert!(domain_stat(dev, 1, spec::DSTAT_PAGE_WALKS) >= 1);
    assert_eq!(
        domain_stat(dev, 0, spec::DSTAT_TRANSLATIONS),
        0,
        "domain 0 unused"
    );
    q.disable().unwrap();
}

/// Faults reach the fault log: a FILL to an unmapped IOVA and a write to a read-only
/// mapping each leave a record with the domain, queue, IOVA and access, and the fault
/// vector fires; nothing outside the mappings is touched and the queue carries on.
fn fault_in_log(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    dev.rearm_interrupts().unwrap();
    let caps = DevCaps::read(dev).unwrap();
    let io = iovas(&caps);
    let fv = caps.fault_vector();
    let mut log = FaultLog::enable(dev, 16, fv).unwrap();
    let mut dom = Domain::translated(dev, 1, caps.iova_width).unwrap();
    let (mut q, cpl) = queue_in_domain(dev, &mut dom, QueueConfig::new(0, 16, 0), &io, 4);
    let half = 32 << 10;
    let buf = dev.alloc_dma(DmaRequest::new(2 * half)).unwrap();
    buf.fill(0, half, 0x5a);
    buf.fill(half, half, 0xa0);
    dom.map(
        io.data,
        buf.bus_addr(),
        half as u64,
        Perm::RW,
        PageSize::Size4K,
    )
    .unwrap();
    let ro = io.data + 0x10_0000;
    dom.map(
        ro,
        buf.bus_addr() + half as u64,
        half as u64,
        Perm::R,
        PageSize::Size4K,
    )
    .unwrap();
    let hole = io.data + half as u64;
    drain_interrupts(dev);
    let count0 = log.count().unwrap();

    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(hole, 0x0bad, 8192).with_tag(1),
    );
    assert_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        hole,
        true,
        "FILL to an unmapped IOVA",
    );
    assert!(
        dev.wait_interrupt(fv, TIMEOUT).unwrap() > 0,
        "fault vector {fv} did not fire"
    );
    let r = log.wait(TIMEOUT).unwrap();
    assert_eq!(
        (r.reason, r.domain, r.queue, r.iova, r.is_write(), r.seq),
        (spec::FAULT_NOT_PRESENT, 1, 0, hole, true, count0),
        "record {r}"
    );

    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::fill(ro, 0x0bad, 4096).with_tag(2),
    );
    assert_fault(
        &c,
        spec::FAULT_PERMISSION,
        ro,
        true,
        "FILL into a read-only mapping",
    );
    let r = log.wait(TIMEOUT).unwrap();
    assert_eq!(
        (r.reason, r.domain, r.iova, r.is_write()),
        (spec::FAULT_PERMISSION, 1, ro, true),
        "record {r}"
    );
    assert_all(&buf.to_vec(0, half), 0x5a, "read-write half");
    assert_all(&buf.to_vec(half, half), 0xa0, "read-only half");

    let c = run_desc(
        &mut q,
        &cpl,
        2,
        Descriptor::fill(io.data, 0x4242_4242_4242_4242, 4096),
    );
    assert_ok(&c, "FILL after the faults");
    assert_all(&buf.to_vec(0, 4096), 0x42, "FILL after the faults");
    assert_eq!(log.pending().unwrap(), 0);
    assert_eq!(log.count().unwrap(), count0 + 2);
    assert_eq!(log.dropped().unwrap(), 0);
    assert_eq!(
        dev.wait_interrupt(0, Duration::ZERO).unwrap(),
        0,
        "queue vector"
    );
    q.disable().unwrap();
}

/// A DMA to a bus address the back end reserved as never mapped faults (outside RAM),
/// and the queue keeps working.
fn unmapped_bus_address(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    let mut q = DmaQueue::new(dev, 0, 16, 0).unwrap();
    let cpl = CompletionRecords::new(dev, 2).unwrap();
    let buf = dev.alloc_dma(DmaRequest::new(16 << 10)).unwrap();
    buf.fill(0, buf.len(), 0x3c);
    let hole = dev.reserve_unmapped(16 << 10).unwrap();
    assert!(
        f.phys.node_of(hole).is_none(),
        "reserved {hole:#x} is guest RAM"
    );
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(buf.bus_addr(), hole, 8192).with_tag(1),
    );
    assert_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        hole,
        true,
        "COPY to an unmapped bus address",
    );
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::copy(hole, buf.bus_addr(), 8192),
    );
    assert_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        hole,
        false,
        "COPY from an unmapped bus address",
    );
    assert_all(&buf.to_vec(0, buf.len()), 0x3c, "buffer after the faults");
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(buf.bus_addr(), 0x4242, 64),
    );
    assert_ok(&c, "FILL after the faults");
}

/// Huge pages: 2 MiB aligned and granular, on the node asked for, zeroed, reachable by
/// the device; a request no pool can hold is OutOfMemory, never base pages.
fn huge_pages_on_nodes(f: &Fixture) {
    let dev = f.dev();
    fresh(dev);
    let mut q = DmaQueue::new(dev, 0, 16, 0).unwrap();
    let cpl = CompletionRecords::new(dev, 2).unwrap();
    for node in [1, 0] {
        let h = dev
            .alloc_dma(DmaRequest::huge(PAGE_SIZE_2M + 1).on_node(node))
            .unwrap();
        assert_eq!(h.len(), 2 * PAGE_SIZE_2M, "rounded to 2 MiB");
        assert_eq!(h.page_size(), PAGE_SIZE_2M);
        assert_eq!(h.bus_addr() % PAGE_SIZE_2M as u64, 0, "2 MiB aligned");
        assert_eq!(h.node(), Some(node));
        assert_eq!(
            f.phys.node_of(h.bus_addr()),
            Some(node),
            "bus address on node"
        );
        assert_eq!(
            f.phys.node_of(h.bus_addr() + h.len() as u64 - 1),
            Some(node)
        );
        assert_all(&h.to_vec(0, h.len()), 0, "fresh huge pages");
        let c = run_desc(
            &mut q,
            &cpl,
            0,
            Descriptor::fill(h.bus_addr() + PAGE_SIZE_2M as u64 - 8, 0x77, 16),
        );
        assert_ok(&c, "FILL across the two huge pages");
        assert_eq!(
            h.to_vec(PAGE_SIZE_2M - 8, 9),
            [0x77, 0, 0, 0, 0, 0, 0, 0, 0x77]
        );
    }
    let b = dev.alloc_dma(DmaRequest::new(4096).on_node(1)).unwrap();
    assert_eq!(b.node(), Some(1));
    assert_eq!(f.phys.node_of(b.bus_addr()), Some(1));
    assert_eq!(b.page_size(), 4096);

    let too_many = DmaRequest {
        len: (HUGE as usize + 1) * PAGE_SIZE_2M,
        pages: PageKind::Huge2M,
        node: Some(1),
    };
    match dev.alloc_dma(too_many) {
        Err(BackendError::OutOfMemory(m)) => assert!(m.contains("huge pages"), "{m}"),
        other => panic!("{} huge pages from pools of {HUGE}: {other:?}", HUGE + 1),
    }
    // Take every huge page: the next request fails although base pages are plentiful.
    let all: Vec<_> = (0..2 * HUGE)
        .map(|_| dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M)).unwrap())
        .collect();
    assert_eq!(
        all.iter().filter(|b| b.node() == Some(1)).count(),
        HUGE as usize
    );
    assert!(matches!(
        dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M)),
        Err(BackendError::OutOfMemory(_))
    ));
    drop(all);
    assert!(
        dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M)).is_ok(),
        "freed pages reused"
    );
}

/// With no huge pages configured, a 2 MiB request is OutOfMemory on every node; base pages
/// still work.
fn no_huge_pages(f: &Fixture) {
    let dev = f.dev();
    assert_eq!(f.phys.huge_pages_per_node, 0);
    for req in [
        DmaRequest::huge(PAGE_SIZE_2M),
        DmaRequest::huge(4096).on_node(1),
    ] {
        match dev.alloc_dma(req) {
            Err(BackendError::OutOfMemory(m)) => assert!(m.contains("0 per node"), "{m}"),
            other => panic!("{req:?}: {other:?}"),
        }
    }
    let b = dev
        .alloc_dma(DmaRequest::new(PAGE_SIZE_2M).on_node(1))
        .unwrap();
    assert_eq!((b.page_size(), b.node()), (4096, Some(1)));
}

macro_rules! backend_tests {
    ($module:ident, $fixture:path) => {
        mod $module {
            #[test]
            fn registers_and_config_space() {
                super::registers_and_config_space(&$fixture(super::HUGE));
            }
            #[test]
            fn copy_passthrough() {
                super::copy_passthrough(&$fixture(super::HUGE));
            }
            #[test]
            fn completion_interrupt() {
                super::completion_interrupt(&$fixture(super::HUGE));
            }
            #[test]
            fn translated_domain_2m() {
                super::translated_domain_2m(&$fixture(super::HUGE));
            }
            #[test]
            fn fault_in_log() {
                super::fault_in_log(&$fixture(super::HUGE));
            }
            #[test]
            fn unmapped_bus_address() {
                super::unmapped_bus_address(&$fixture(super::HUGE));
            }
            #[test]
            fn huge_pages_on_nodes() {
                super::huge_pages_on_nodes(&$fixture(super::HUGE));
            }
            #[test]
            fn no_huge_pages() {
                super::no_huge_pages(&$fixture(0));
            }
        }
    };
}

backend_tests!(in_process, super::in_process);
backend_tests!(vfio_user, super::vfio_user);

// ---------------------------------------------------------------------------------------
// In-process only
// ---------------------------------------------------------------------------------------

#[test]
fn in_process_info_and_stats() {
    let dev = InProcessBackend::new(InProcessConfig {
        device: DeviceConfig {
            queues: 2,
            ..DeviceConfig::default()
        },
        phys: PhysConfig {
            nodes: 1,
            ..phys(0)
        },
    })
    .unwrap();
    let info = dev.info();
    assert_eq!(info.backend, "in-process");
    assert_eq!(info.register_access, RegisterAccess::Direct);
    assert_eq!(info.msix_vectors, 3, "two queues and the fault vector");
    assert_eq!(info.numa_node, None, "one node: no NUMA");
    let mut q = DmaQueue::new(&dev, 1, 8, 0).unwrap();
    let cpl = CompletionRecords::new(&dev, 1).unwrap();
    let buf = dev.alloc_dma(DmaRequest::new(8192)).unwrap();
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(buf.bus_addr(), 1, 8192));
    assert_ok(&c, "FILL");
    assert_eq!(dev.stats().queues[1].bytes, 8192);

    let bad = InProcessBackend::new(InProcessConfig {
        device: DeviceConfig {
            queues: 0,
            ..DeviceConfig::default()
        },
        phys: phys(0),
    });
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("device configuration"));
}

// ---------------------------------------------------------------------------------------
// vfio-user only: connection life cycle
// ---------------------------------------------------------------------------------------

#[test]
fn vfio_user_second_client_after_a_clean_close() {
    let server = spawn_server();
    let a = connect(&server, phys(2));
    assert_eq!(a.info().backend, "vfio-user");
    assert_eq!(a.info().register_access, RegisterAccess::Message);
    assert_eq!(a.info().location, server.socket().display().to_string());
    assert!(a.version().0 == 0 && a.server_capabilities().max_msg_fds >= 1);
    fresh(&a);
    a.write32(spec::REG_SCRATCH, 0xa11c_e000).unwrap();
    let kept = a.alloc_dma(DmaRequest::new(4096)).unwrap();
    drop(a);
    // The buffer outlives its back end (the device just no longer reaches it).
    kept.write_u32(0, 7);
    assert_eq!(kept.read_u32(0), 7);

    let b = connect(&server, phys(2));
    assert_eq!(
        b.read32(spec::REG_SCRATCH).unwrap(),
        0,
        "the server resets the device between clients"
    );
    copy_passthrough(&Fixture {
        dev: Box::new(b),
        phys: phys(2),
        _server: None,
    });
}

#[test]
fn vfio_user_device_reset_message() {
    let server = spawn_server();
    let dev = connect(&server, phys(0));
    dev.write32(spec::REG_SCRATCH, 0x1234).unwrap();
    dev.device_reset().unwrap();
    assert_eq!(dev.read32(spec::REG_SCRATCH).unwrap(), 0);
    assert_eq!(
        dev.config_read16(PCI_COMMAND).unwrap() & PCI_COMMAND_BUS_MASTER,
        0,
        "Bus Master Enable clear after a function-level reset"
    );
    // Interrupt routes survive the reset.
    dev.set_bus_master(true).unwrap();
    let mut q = DmaQueue::new(&dev, 0, 8, 2).unwrap();
    let cpl = CompletionRecords::new(&dev, 1).unwrap();
    cpl.clear(0);
    q.submit(&[Descriptor::nop()
        .with_interrupt()
        .with_completion(cpl.device_addr(0))])
        .unwrap();
    let c = q.wait_completion_irq(&cpl, 0, TIMEOUT).unwrap();
    assert_ok(&c, "NOP after DEVICE_RESET");
}

#[test]
fn vfio_user_server_gone_fails_fast() {
    let server = spawn_server();
    let dev = connect(&server, phys(0));
    assert!(dev.is_connected());
    let pid = server.pid();
    drop(server); // SIGTERM: the server stops and closes the connection
    let e = dev.read32(spec::REG_ID).unwrap_err();
    let BackendError::Backend(inner) = &e else {
        panic!("{e:?}")
    };
    assert!(
        matches!(
            inner.downcast_ref::<VfioUserError>(),
            Some(VfioUserError::Closed { .. } | VfioUserError::Socket { .. })
        ),
        "server {pid} gone: {e}"
    );
    assert!(!dev.is_connected());
    let start = Instant::now();
    let e = dev.write32(spec::REG_SCRATCH, 1).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(dev); // does not hang on a broken connection
}

const CHILD_ENV: &str = "DOMDMA_TEST_CRASH_CHILD_SOCKET";
const CHILD_READY: &str = "DOMDMA-CRASH-CHILD-READY";

/// Run only as a child process of `vfio_user_server_survives_a_killed_client`: connects,
/// starts DMA and waits to be killed.
#[test]
#[ignore = "helper: run in a child process by vfio_user_server_survives_a_killed_client"]
fn crash_child() {
    let Some(socket) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dev = VfioUserBackend::connect(&VfioUserConfig::new(socket).with_phys(phys(0))).unwrap();
    fresh(&dev);
    dev.write32(spec::REG_SCRATCH, 0xdead_beef).unwrap();
    let mut q = DmaQueue::new(&dev, 0, 64, 0).unwrap();
    let buf = dev.alloc_dma(DmaRequest::new(8 * MIB)).unwrap();
    let work: Vec<_> = (0..32)
        .map(|i| Descriptor::fill(buf.bus_addr(), i, 8 * MIB as u32).with_interrupt())
        .collect();
    q.submit(&work).unwrap();
    println!("{CHILD_READY}");
    std::io::stdout().flush().unwrap();
    // Blocks until the parent kills us (or goes away itself, closing our stdin).
    let _ = std::io::stdin().read(&mut [0u8]);
}

#[test]
fn vfio_user_server_survives_a_killed_client() {
    let mut server = spawn_server();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, server.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let left = TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(CHILD_READY) => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the child never got ready; stdout {seen:?}, stderr:\n{}\n--- server log ---\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    server.log()
                );
            }
        }
    }
    // SIGKILL: no destructor runs, nothing is unmapped or quiesced, DMA is in flight.
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();
    assert!(
        server.is_running(),
        "server died with its client:\n{}",
        server.log()
    );

    let dev = connect(&server, phys(HUGE));
    assert_eq!(
        dev.read32(spec::REG_SCRATCH).unwrap(),
        0,
        "the device was reset after the killed client"
    );
    let f = Fixture {
        dev: Box::new(dev),
        phys: phys(HUGE),
        _server: Some(server),
    };
    copy_passthrough(&f);
    completion_interrupt(&f);
}

// ---------------------------------------------------------------------------------------
// vfio-user only: a fake server with hostile replies
// ---------------------------------------------------------------------------------------

/// What the fake server does with one message.
enum Act {
    /// The reply a well-behaved domdma server would send.
    Good,
    /// These bytes instead.
    Send(Vec<u8>),
    /// These bytes, then close the connection.
    SendThenClose(Vec<u8>),
    /// No reply (the connection stays open).
    Silent,
    /// Close the connection.
    Close,
}

fn reply(h: &Header, payload: &[u8]) -> Vec<u8> {
    proto::encode_reply(h, payload)
}

/// A well-behaved reply for a domdma device with 5 MSI-X vectors.
fn good_reply(h: &Header, payload: &[u8]) -> Vec<u8> {
    use proto::Command as C;
    match h.cmd() {
        Some(C::Version) => reply(
            h,
            &Version {
                major: 0,
                minor: 0,
                caps: Capabilities::SERVER,
            }
            .encode(),
        ),
        Some(C::DmaMap | C::DeviceSetIrqs | C::DeviceReset) => reply(h, &[]),
        Some(C::DeviceGetInfo) => reply(
            h,
            &DeviceInfo {
                argsz: 16,
                flags: proto::DEVICE_FLAGS_PCI,
                num_regions: proto::PCI_NUM_REGIONS,
                num_irqs: proto::PCI_NUM_IRQS,
            }
            .encode(),
        ),
        Some(C::DeviceGetRegionInfo) => {
            let r = RegionInfo::parse(payload).unwrap();
            let size = match r.index {
                0 => spec::REGS_BAR_SIZE,
                7 => 256,
                _ => 0,
            };
            reply(
                h,
                &RegionInfo {
                    argsz: 32,
                    flags: proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE,
                    size,
                    ..r
                }
                .encode(),
            )
        }
        Some(C::DeviceGetIrqInfo) => {
            let r = IrqInfo::parse(payload).unwrap();
            reply(
                h,
                &IrqInfo {
                    argsz: 16,
                    flags: proto::IRQ_INFO_EVENTFD,
                    count: 5,
                    ..r
                }
                .encode(),
            )
        }
        Some(C::RegionRead) => {
            let a = RegionAccess::parse_read(payload).unwrap();
            reply(h, &a.encode(&vec![0; a.count as usize]))
        }
        Some(C::RegionWrite) => {
            let (a, _) = RegionAccess::parse_write(payload).unwrap();
            reply(h, &a.encode(&[]))
        }
        Some(C::DmaUnmap) => reply(h, &DmaUnmap::parse(payload).unwrap().encode()),
        _ => proto::encode_error(h, libc::ENOTSUP as u32).to_vec(),
    }
}

/// A fake server on a fresh socket serving one client; `act` decides per message.
struct FakeServer {
    path: std::path::PathBuf,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl FakeServer {
    fn start(mut act: impl FnMut(&Header, &[u8]) -> Act + Send + 'static) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/domdma-fake-").unwrap();
        let path = dir.as_path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            loop {
                let mut hb = [0u8; HEADER_SIZE];
                if s.read_exact(&mut hb).is_err() {
                    return; // the client went away
                }
                let h = Header::parse(&hb);
                let mut payload = vec![0u8; h.payload_len().unwrap()];
                if s.read_exact(&mut payload).is_err() {
                    return;
                }
                let (bytes, close) = match act(&h, &payload) {
                    Act::Good => (good_reply(&h, &payload), false),
                    Act::Send(b) => (b, false),
                    Act::SendThenClose(b) => (b, true),
                    Act::Silent => continue,
                    Act::Close => return,
                };
                if s.write_all(&bytes).is_err() || close {
                    return;
                }
            }
        });
        FakeServer {
            path,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn config(&self) -> VfioUserConfig {
        VfioUserConfig {
            reply_timeout: Duration::from_millis(500),
            ..VfioUserConfig::new(&self.path).with_phys(PhysConfig {
                nodes: 1,
                node_size: 4 << 20,
                huge_pages_per_node: 0,
                ..PhysConfig::default()
            })
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // Ends when the client closes its end (the back end or its error dropped it).
            t.join().unwrap();
        }
    }
}

/// Connecting against a server whose reply to command `cmd` is `bad`; returns the error.
fn connect_with_bad_reply(
    cmd: proto::Command,
    bad: impl Fn(&Header) -> Act + Send + 'static,
) -> VfioUserError {
    let fake = FakeServer::start(move |h, _| {
        if h.cmd() == Some(cmd) {
            bad(h)
        } else {
            Act::Good
        }
    });
    let e = VfioUserBackend::connect(&fake.config()).expect_err("connected despite a bad reply");
    drop(fake);
    e
}

fn header(h: &Header, f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut r = Header {
        size: HEADER_SIZE as u32,
        flags: proto::FLAGS_TYPE_REPLY,
        error: 0,
        ..*h
    };
    f(&mut r);
    r.encode().to_vec()
}

#[test]
fn vfio_user_fake_server_is_well_behaved() {
    let fake = FakeServer::start(|_, _| Act::Good);
    let dev = VfioUserBackend::connect(&fake.config()).unwrap();
    assert_eq!(dev.msix_vectors(), 5);
    assert_eq!(dev.read32(spec::REG_ID).unwrap(), 0, "the fake reads zeros");
    drop(dev);
}

#[test]
fn vfio_user_hostile_replies_are_errors_not_panics() {
    use proto::Command as C;
    let protocol = |e: VfioUserError, want: &str| match e {
        VfioUserError::Protocol { problem, .. } => assert!(problem.contains(want), "{problem}"),
        e => panic!("expected a protocol error with {want:?}: {e:?}"),
    };
    protocol(
        connect_with_bad_reply(C::Version, |h| {
            Act::Send(header(h, |r| r.id = h.id.wrapping_add(1)))
        }),
        "reply id",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| Act::Send(header(h, |r| r.size = u32::MAX))),
        "at most",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| Act::Send(header(h, |r| r.size = 8))),
        "smaller than the header",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| {
            Act::Send(header(h, |r| r.flags = proto::FLAGS_TYPE_COMMAND))
        }),
        "not a reply",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| {
            let v = Version {
                major: 1,
                minor: 0,
                caps: Capabilities::SERVER,
            };
            Act::Send(reply(h, &v.encode()))
        }),
        "version 1.0",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| Act::Send(reply(h, b"\0\0\0\0{not json\0"))),
        "not JSON",
    );
    protocol(
        connect_with_bad_reply(C::DeviceGetRegionInfo, |h| Act::Send(reply(h, &[0u8; 8]))),
        "payload is 8 bytes",
    );
    match connect_with_bad_reply(C::DmaMap, |h| {
        Act::Send(proto::encode_error(h, libc::EEXIST as u32).to_vec())
    }) {
        VfioUserError::Server { command, errno } => {
            assert_eq!((command, errno), ("DMA_MAP", libc::EEXIST as u32))
        }
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        connect_with_bad_reply(C::DeviceGetInfo, |_| Act::Close),
        VfioUserError::Closed { .. }
    ));
    assert!(matches!(
        connect_with_bad_reply(C::DeviceGetIrqInfo, |_| Act::Silent),
        VfioUserError::Timeout { .. }
    ));
    // A reply cut short, then the server hangs up; or it just stops sending.
    assert!(matches!(
        connect_with_bad_reply(C::Version, |h| {
            let mut b = header(h, |r| r.size = 100);
            b.extend_from_slice(&[0; 10]);
            Act::SendThenClose(b)
        }),
        VfioUserError::Closed { .. }
    ));
    assert!(matches!(
        connect_with_bad_reply(C::Version, |h| {
            let mut b = header(h, |r| r.size = 100);
            b.extend_from_slice(&[0; 10]);
            Act::Send(b)
        }),
        VfioUserError::Timeout { .. }
    ));
    match connect_with_bad_reply(C::DeviceGetInfo, |h| {
        Act::Send(reply(
            h,
            &DeviceInfo {
                argsz: 16,
                flags: 0,
                num_regions: 9,
                num_irqs: 5,
            }
            .encode(),
        ))
    }) {
        VfioUserError::Unsuitable(m) => assert!(m.contains("not a PCI device"), "{m}"),
        e => panic!("{e:?}"),
    }
    match connect_with_bad_reply(C::DeviceGetIrqInfo, |h| {
        let r = IrqInfo {
            argsz: 16,
            flags: proto::IRQ_INFO_EVENTFD,
            index: proto::PCI_MSIX_IRQ_INDEX,
            count: 100_000,
        };
        Act::Send(reply(h, &r.encode()))
    }) {
        VfioUserError::Unsuitable(m) => assert!(m.contains("100000 vectors"), "{m}"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn vfio_user_bad_register_replies_fail_only_that_access() {
    use proto::Command as C;
    // After setup: BAR0 reads at 0x10 get a reply with the wrong offset, BAR0 writes at
    // 0x14 an error reply.
    let fake = FakeServer::start(|h, payload| match h.cmd() {
        Some(C::RegionRead) => {
            let a = RegionAccess::parse_read(payload).unwrap();
            if a.region == 0 && a.offset == 0x10 {
                let lie = RegionAccess { offset: 0x20, ..a };
                Act::Send(reply(h, &lie.encode(&[1, 2, 3, 4])))
            } else {
                Act::Good
            }
        }
        Some(C::RegionWrite) => {
            let (a, _) = RegionAccess::parse_write(payload).unwrap();
            if a.region == 0 && a.offset == 0x14 {
                Act::Send(proto::encode_error(h, libc::EINVAL as u32).to_vec())
            } else {
                Act::Good
            }
        }
        _ => Act::Good,
    });
    let dev = VfioUserBackend::connect(&fake.config()).unwrap();
    // An error reply fails that access only.
    let e = dev.write32(0x14, 1).unwrap_err();
    assert!(e.to_string().contains("errno 22"), "{e}");
    assert!(dev.is_connected());
    assert_eq!(
        dev.read32(0x4).unwrap(),
        0,
        "still usable after an error reply"
    );
    // A well-framed reply about another access fails that access; the stream is still in
    // step (right id, command and size), so the connection stays.
    let e = dev.read32(0x10).unwrap_err();
    assert!(e.to_string().contains("the reply says"), "{e}");
    assert!(dev.is_connected());
    assert_eq!(dev.read32(0x4).unwrap(), 0);
    drop(dev);
    drop(fake);
}
