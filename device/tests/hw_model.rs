//! The hardware model held to device/SPEC.md (register interface 0.2), driven as a driver
//! drives the device: registers through `bar_read`/`bar_write`, page tables, rings,
//! completion records and the fault log in `vm-memory` bus memory (see `driver/`).
//!
//! Every buffer the device may touch is surrounded by canaries; every fault test checks
//! that nothing outside the mapping changed.

use domdma_device::core::DeviceConfig;
use domdma_device::spec::*;
use domdma_testkit::core_driver::*;

/// The translated domain most tests use.
const DOM: u32 = 1;
/// The queue most tests use.
const Q: u32 = 0;
/// Source IOVAs (L4 0, L3 64).
const SRC: u64 = 0x10_0000_0000;
/// Destination IOVAs (L4 0, L3 68).
const DST: u64 = 0x11_0000_0000;
/// IOVAs for 2 MiB mappings (L4 0, L3 128).
const LARGE: u64 = 0x20_0000_0000;
/// A second 2 MiB-mapped region (L4 0, L3 132).
const LARGE2: u64 = 0x21_0000_0000;
/// IOVA of the 1 GiB mapping (L4 0, L3 256).
const HUGE: u64 = 0x40_0000_0000;
/// IOVAs in L4 slot 1, away from the identity-mapped rings (L4 slot 0).
const HOSTILE: u64 = 0x80_0000_0000;
/// A bus address below RAM: not mapped for the device.
const OUTSIDE: u64 = 0x10_0000;

/// A device with a fault log of 64 records, translated domain [`DOM`] and queue [`Q`] in it.
fn setup() -> Driver {
    setup_with(DeviceConfig::default())
}

fn setup_with(config: DeviceConfig) -> Driver {
    let mut d = Driver::with_config(config);
    d.enable_fault_log(64);
    d.translated_domain(DOM);
    d.setup_queue(Q, DOM, 64);
    d
}

/// `n` single guarded 4 KiB bus pages, in reverse allocation order (never contiguous).
fn scattered_pages(d: &mut Driver, n: usize) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n)
        .map(|_| d.bus.alloc_guarded(PAGE_4K, PAGE_4K))
        .collect();
    v.reverse();
    v
}

/// Write `data` at byte `off` of the span made of `pages` (each `page` bytes).
fn write_span(d: &Driver, pages: &[u64], page: u64, off: u64, data: &[u8]) {
    let mut done = 0usize;
    while done < data.len() {
        let pos = off + done as u64;
        let (i, o) = ((pos / page) as usize, pos % page);
        let n = ((page - o) as usize).min(data.len() - done);
        d.bus.write(pages[i] + o, &data[done..done + n]);
        done += n;
    }
}

/// The whole span made of `pages`.
fn read_span(d: &Driver, pages: &[u64], page: u64) -> Vec<u8> {
    pages
        .iter()
        .flat_map(|&p| d.bus.read(p, page as usize))
        .collect()
}

#[track_caller]
fn assert_ok(c: &Completion, bytes: u32) {
    assert_eq!(
        (
            c.status,
            c.fault_reason,
            c.fault_access,
            c.bytes,
            c.fault_addr
        ),
        (STATUS_OK, 0, 0, bytes, 0),
        "completion {c:x?}"
    );
}

/// Check a completion: (status, reason, access, fault address, bytes).
#[track_caller]
fn assert_cpl(c: &Completion, status: u8, reason: u8, access: u8, addr: u64, bytes: u32) {
    assert_eq!(
        (
            c.status,
            c.fault_reason,
            c.fault_access,
            c.fault_addr,
            c.bytes
        ),
        (status, reason, access, addr, bytes),
        "completion {c:x?}"
    );
}

/// Check a fault record: (reason, access, domain, queue, iova, seq).
#[track_caller]
fn assert_rec(
    r: &FaultRecord,
    reason: u8,
    access: u8,
    domain: u32,
    queue: u32,
    iova: u64,
    seq: u32,
) {
    assert_eq!(
        (
            r.reason,
            r.access,
            u32::from(r.domain),
            u32::from(r.queue),
            r.iova,
            r.seq
        ),
        (reason, access, domain, queue, iova, seq),
        "fault record {r:x?}"
    );
}

/// Poll a value until it equals `want` (counters may be updated just after a completion).
#[track_caller]
fn eventually_eq<T: PartialEq + std::fmt::Debug>(what: &str, want: T, mut f: impl FnMut() -> T) {
    let mut last = None;
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        poll(what, || {
            let v = f();
            let done = v == want;
            last = Some(v);
            done.then_some(())
        })
    }));
    if ok.is_err() {
        panic!("{what}: expected {want:?}, last read {last:?}");
    }
}

// =======================================================================================
// Identity, capabilities, reset values
// =======================================================================================

#[test]
fn capabilities_advertise_queues_domains_width_page_sizes_and_operations() {
    let mut d = Driver::new();
    assert_eq!(d.read(REG_ID), DEVICE_ID_MAGIC);
    assert_eq!(d.read(REG_VERSION), DEVICE_VERSION);
    let cap = d.read(REG_CAP);
    assert_eq!(cap >> CAP_QUEUES_SHIFT & 0xff, DEFAULT_QUEUES);
    assert_eq!(cap >> CAP_VECTORS_SHIFT & 0xff, DEFAULT_QUEUES + 1);
    assert_eq!(cap >> CAP_IOVA_WIDTH_SHIFT & 0xff, DEFAULT_IOVA_WIDTH);
    assert_eq!(cap >> CAP_DOMAINS_SHIFT & 0xff, DEFAULT_DOMAINS);
    let ops =
        (1 << OP_NOP) | (1 << OP_COPY) | (1 << OP_FILL) | (1 << OP_COMPARE) | (1 << OP_CRC32C);
    assert_eq!(d.read(REG_CAP_OPS) & ops, ops, "every operation advertised");
    assert_eq!(d.read(REG_CAP_PGSIZES), PGSIZE_4K | PGSIZE_2M | PGSIZE_1G);
    assert_eq!(d.read(REG_CAP_IOTLB), DEFAULT_IOTLB_ENTRIES);
    assert_eq!(d.read(REG_CAP_FAULT_LOG), FAULT_LOG_MAX);
    assert_eq!(d.read(REG_MAX_XFER), MAX_XFER);
    assert_eq!(d.read(REG_DEV_STATUS), DEV_STATUS_BUS_MASTER);

    let mut d = Driver::with_config(DeviceConfig {
        queues: 8,
        domains: 32,
        iotlb_entries: 128,
        iova_width: IOVA_WIDTH_32,
        max_transfer: 1 << 20,
        strict_iotlb: true,
    });
    let cap = d.read(REG_CAP);
    assert_eq!(cap >> CAP_QUEUES_SHIFT & 0xff, 8);
    assert_eq!(cap >> CAP_VECTORS_SHIFT & 0xff, 9);
    assert_eq!(cap >> CAP_IOVA_WIDTH_SHIFT & 0xff, 32);
    assert_eq!(cap >> CAP_DOMAINS_SHIFT & 0xff, 32);
    assert_eq!(d.read(REG_CAP_IOTLB), 128);
    assert_eq!(d.read(REG_MAX_XFER), 1 << 20);
    assert_eq!(
        d.read(REG_DEV_STATUS),
        DEV_STATUS_BUS_MASTER | DEV_STATUS_STRICT_IOTLB
    );
    d.bus_master(false);
    assert_eq!(d.read(REG_DEV_STATUS), DEV_STATUS_STRICT_IOTLB);
}

#[test]
fn bus_master_clear_leaves_descriptors_pending_until_set() {
    let mut d = Driver::new();
    d.setup_queue(Q, 0, 8);
    let src = d.bus.alloc_guarded(4096, PAGE_4K);
    let dst = d.bus.alloc_guarded(4096, PAGE_4K);
    let data = pattern(1, 4096);
    d.bus.write(src, &data);
    d.bus_master(false);
    let t = d.submit(Q, Desc::copy(src, dst, 4096));
    assert_eq!(d.qread(Q, Q_TAIL), 1, "the doorbell moves the tail");
    assert_eq!(d.qread(Q, Q_HEAD), 0, "nothing runs without bus mastering");
    assert_eq!(d.peek(&t).status, STATUS_PENDING);
    assert_eq!(d.bus.read(dst, 4096), vec![0; 4096]);
    d.bus_master(true);
    assert_ok(&d.wait(&t), 4096);
    assert_eq!(d.bus.read(dst, 4096), data);
    d.bus.check_canaries();
}

// =======================================================================================
// Operations
// =======================================================================================

#[test]
fn copy_through_scattered_4k_pages_moves_exactly_the_range() {
    let mut d = setup();
    let src = scattered_pages(&mut d, 6);
    let dst = scattered_pages(&mut d, 6);
    d.pt(DOM).map_pages(&mut d.bus, SRC, &src, PAGE_4K, RW);
    d.pt(DOM).map_pages(&mut d.bus, DST, &dst, PAGE_4K, RW);
    let data = pattern(1, 6 * 4096);
    write_span(&d, &src, PAGE_4K, 0, &data);
    write_span(&d, &dst, PAGE_4K, 0, &pattern(2, 6 * 4096));
    let before = read_span(&d, &dst, PAGE_4K);
    // Different offsets in the source and destination pages: chunks split on both sides.
    let (so, doff, len) = (100u64, 300u64, 5 * 4096 + 77u32);
    let c = d.run(
        Q,
        Desc::copy(SRC + so, DST + doff, len).tag(0xabcd_ef01_2345_6789),
    );
    assert_ok(&c, len);
    assert_eq!(c.tag, 0xabcd_ef01_2345_6789);
    let mut want = before;
    want[doff as usize..doff as usize + len as usize]
        .copy_from_slice(&data[so as usize..so as usize + len as usize]);
    assert_eq!(read_span(&d, &dst, PAGE_4K), want);
    assert_eq!(read_span(&d, &src, PAGE_4K), data, "source unchanged");
    assert_eq!(d.qread(Q, Q_COMPLETED), 1);
    assert_eq!(d.qread(Q, Q_ERRORS), 0);
    assert_eq!(d.read(REG_FLOG_COUNT), 0);
    d.bus.check_canaries();
}

#[test]
fn crc32c_of_scattered_pages_matches_software() {
    let mut d = setup();
    let src = scattered_pages(&mut d, 5);
    d.pt(DOM).map_pages(&mut d.bus, SRC, &src, PAGE_4K, PTE_R);
    let data = pattern(6, 5 * 4096);
    write_span(&d, &src, PAGE_4K, 0, &data);
    let c = d.run(Q, Desc::crc32c(SRC + 33, 4 * 4096 + 1));
    assert_ok(&c, 4 * 4096 + 1);
    assert_eq!(c.result, u64::from(crc32c(&data[33..33 + 4 * 4096 + 1])));
    d.bus.check_canaries();
}

// =======================================================================================
// Mapping sizes
// =======================================================================================

#[test]
fn copy_on_2m_mappings_across_two_non_contiguous_large_pages() {
    let mut d = setup();
    // Allocated in reverse: IOVA page 0 lies above IOVA page 1 in bus memory.
    let s1 = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    let s0 = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    let t1 = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    let t0 = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    d.pt(DOM)
        .map_pages(&mut d.bus, LARGE, &[s0, s1], PAGE_2M, RW);
    d.pt(DOM)
        .map_pages(&mut d.bus, LARGE2, &[t0, t1], PAGE_2M, RW);
    let data = pattern(8, 4 << 20);
    write_span(&d, &[s0, s1], PAGE_2M, 0, &data);
    let before = read_span(&d, &[t0, t1], PAGE_2M);
    // 1 MiB starting 512 KiB before the 2 MiB boundary, destination shifted by 4 KiB + 8.
    let (so, doff, len) = (PAGE_2M - (512 << 10), PAGE_2M - (700 << 10) + 8, 1u32 << 20);
    assert_ok(&d.run(Q, Desc::copy(LARGE + so, LARGE2 + doff, len)), len);
    let mut want = before;
    want[doff as usize..doff as usize + len as usize]
        .copy_from_slice(&data[so as usize..so as usize + len as usize]);
    assert!(
        read_span(&d, &[t0, t1], PAGE_2M) == want,
        "destination content"
    );
    let crc = d.run(Q, Desc::crc32c(LARGE + 1, (4 << 20) - 2));
    assert_ok(&crc, (4 << 20) - 2);
    assert_eq!(crc.result, u64::from(crc32c(&data[1..(4 << 20) - 1])));
    d.bus.check_canaries();
}

#[test]
fn copy_on_1g_mapping() {
    let mut d = setup();
    // One 1 GiB leaf maps all of bus memory: IOVA HUGE + x -> bus RAM_BASE + x.
    d.map(DOM, HUGE, RAM_BASE, PAGE_1G, PAGE_1G, RW);
    assert_eq!(d.pte(DOM, HUGE, 3), RAM_BASE | RW | PTE_PS);
    let len = 3u32 << 20;
    let src = d.bus.alloc_guarded(u64::from(len), PAGE_4K);
    let dst = d.bus.alloc_guarded(u64::from(len), PAGE_4K);
    let data = pattern(9, len as usize);
    d.bus.write(src, &data);
    let iova = |bus: u64| HUGE + (bus - RAM_BASE);
    assert_ok(&d.run(Q, Desc::copy(iova(src), iova(dst), len)), len);
    assert!(d.bus.read(dst, len as usize) == data);
    let c = d.run(Q, Desc::crc32c(iova(dst) + 7, 1000));
    assert_eq!(c.result, u64::from(crc32c(&data[7..1007])));
    d.bus.check_canaries();
}

#[test]
fn copy_crossing_from_4k_mapped_into_2m_mapped_region_and_back() {
    let mut d = setup();
    // Source: two 4 KiB pages just below LARGE, then a 2 MiB page at LARGE.
    let small = scattered_pages(&mut d, 2);
    d.pt(DOM)
        .map_pages(&mut d.bus, LARGE - 2 * PAGE_4K, &small, PAGE_4K, RW);
    let big = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    d.map(DOM, LARGE, big, PAGE_2M, PAGE_2M, RW);
    // Destination: a 2 MiB page at LARGE2, then two 4 KiB pages above it.
    let dbig = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    d.map(DOM, LARGE2, dbig, PAGE_2M, PAGE_2M, RW);
    let dsmall = scattered_pages(&mut d, 3);
    d.pt(DOM)
        .map_pages(&mut d.bus, LARGE2 + PAGE_2M, &dsmall, PAGE_4K, RW);

    let sdata = pattern(10, 2 * 4096 + 64 * 1024);
    write_span(&d, &small, PAGE_4K, 0, &sdata[..8192]);
    d.bus.write(big, &sdata[8192..]);
    // 6000 bytes in the 4 KiB pages then 14000 in the 2 MiB page; the destination crosses
    // from its 2 MiB page into its 4 KiB pages 9000 bytes in.
    let len = 20_000u32;
    let src = LARGE - 6000;
    let dst = LARGE2 + PAGE_2M - 9000;
    assert_ok(&d.run(Q, Desc::copy(src, dst, len)), len);
    let expect = &sdata[8192 - 6000..8192 - 6000 + len as usize];
    let mut got = d.bus.read(dbig + PAGE_2M - 9000, 9000);
    got.extend(read_span(&d, &dsmall, PAGE_4K)[..len as usize - 9000].iter());
    assert!(got == expect, "data across the mapping-size boundaries");
    d.bus.check_canaries();
}

#[test]
fn pte_bits_11_to_8_are_ignored() {
    let mut d = setup();
    let src = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.write(src, b"software bits");
    let e = d.pte(DOM, SRC, 1);
    d.set_pte(DOM, SRC, 1, e | 0xf00);
    let l2 = d.pte(DOM, SRC, 2);
    d.set_pte(DOM, SRC, 2, l2 | 0x500);
    let c = d.run(Q, Desc::crc32c(SRC, 13));
    assert_ok(&c, 13);
    assert_eq!(c.result, u64::from(crc32c(b"software bits")));
}

// =======================================================================================
// Faults
// =======================================================================================

#[test]
fn fault_permission_write_to_read_only_mapping_writes_nothing() {
    let mut d = setup();
    let src = d.map_new(DOM, SRC, 8192, PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, 8192, PAGE_4K, PTE_R);
    d.bus.write(src, &pattern(12, 8192));
    d.bus.plant(dst, 8192);
    let c = d.run(Q, Desc::copy(SRC, DST, 8192));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_PERMISSION, ACCESS_WRITE, DST, 0);
    let r = d.wait_faults(1);
    assert_rec(&r[0], FAULT_PERMISSION, ACCESS_WRITE, DOM, Q, DST, 0);
    // FILL too.
    let c = d.run(Q, Desc::fill(DST + 4096, 16, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_PERMISSION,
        ACCESS_WRITE,
        DST + 4096,
        0,
    );
    // Reading it is fine.
    let c = d.run(Q, Desc::crc32c(DST, 8192));
    assert_ok(&c, 8192);
    assert_eq!(c.result, u64::from(crc32c(&d.bus.read(dst, 8192))));
    d.bus.check_canaries();
}

#[test]
fn fault_permission_read_of_write_only_mapping() {
    let mut d = setup();
    d.map_new(DOM, SRC, 4096, PAGE_4K, PTE_W);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst, 4096);
    let c = d.run(Q, Desc::copy(SRC + 64, DST, 64));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_PERMISSION, 0, SRC + 64, 0);
    let r = d.wait_faults(1);
    assert_rec(&r[0], FAULT_PERMISSION, 0, DOM, Q, SRC + 64, 0);
    // Writing it is fine.
    d.bus.forget_canaries(dst, 4096);
    let src_w = d.pte(DOM, SRC, 1) & PTE_ADDR_MASK;
    assert_ok(&d.run(Q, Desc::fill(SRC, 8, 0x1122_3344_5566_7788)), 8);
    assert_eq!(d.bus.read_u64(src_w), 0x1122_3344_5566_7788);
    d.bus.check_canaries();
}

#[test]
fn fault_permission_is_the_and_over_every_level() {
    let mut d = setup();
    let src = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.write(src, &pattern(13, 4096));
    d.bus.plant(dst, 4096);
    // The level-3 entry above DST allows reads only; the leaf allows both.
    let l3 = d.pte(DOM, DST, 3);
    d.set_pte(DOM, DST, 3, l3 & !PTE_W);
    let c = d.run(Q, Desc::copy(SRC, DST, 4096));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_PERMISSION, ACCESS_WRITE, DST, 0);
    // The level-2 entry above SRC allows writes only.
    let l2 = d.pte(DOM, SRC, 2);
    d.set_pte(DOM, SRC, 2, l2 & !PTE_R);
    // SRC's translation is cached by the COPY: the change needs an invalidation.
    assert_eq!(d.invalidate_range(DOM, SRC, 4096), 0);
    let c = d.run(Q, Desc::crc32c(SRC, 4));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_PERMISSION, 0, SRC, 0);
    let r = d.wait_faults(2);
    assert_rec(&r[0], FAULT_PERMISSION, ACCESS_WRITE, DOM, Q, DST, 0);
    assert_rec(&r[1], FAULT_PERMISSION, 0, DOM, Q, SRC, 1);
    d.bus.check_canaries();
}

#[test]
fn fault_outside_ram_table_pointer_is_a_walk_fault_with_the_table_address() {
    let mut d = setup();
    d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst, 4096);
    // The level-2 entry above SRC points at a level-1 table outside bus memory.
    d.set_pte(DOM, SRC, 2, OUTSIDE | RW);
    let c = d.run(Q, Desc::copy(SRC + 8, DST, 64));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_PAGE_WALK,
        SRC + 8,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_OUTSIDE_RAM,
        ACCESS_PAGE_WALK,
        DOM,
        Q,
        SRC + 8,
        0,
    );
    assert_eq!(r[0].info, OUTSIDE, "the table's bus address");
    assert_eq!(r[0].level, 1, "the table that could not be read");
    // The largest address an entry can hold.
    let top = 0x000f_ffff_ffff_f000;
    d.set_pte(DOM, DST, 3, top | RW);
    let c = d.run(Q, Desc::fill(DST, 8, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE | ACCESS_PAGE_WALK,
        DST,
        0,
    );
    let r = d.wait_faults(1);
    assert_eq!((r[0].info, r[0].level), (top, 2));
    d.bus.check_canaries();
}

#[test]
fn fault_outside_ram_page_is_never_accessed() {
    let mut d = setup();
    let src = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    d.bus.write(src, &pattern(18, 4096));
    // The destination leaf points below bus memory, the source's second page above it.
    d.map(DOM, DST, OUTSIDE, 4096, PAGE_4K, RW);
    d.map(DOM, SRC + 4096, RAM_END, 4096, PAGE_4K, RW);
    let c = d.run(Q, Desc::copy(SRC, DST, 64));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        DST,
        0,
    );
    let c = d.run(Q, Desc::crc32c(SRC, 8192));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, 0, SRC + 4096, 4096);
    let r = d.wait_faults(2);
    assert_rec(&r[0], FAULT_OUTSIDE_RAM, ACCESS_WRITE, DOM, Q, DST, 0);
    assert_eq!(
        (r[0].info, r[0].level),
        (OUTSIDE, 0),
        "the bus address, not in a walk"
    );
    assert_rec(&r[1], FAULT_OUTSIDE_RAM, 0, DOM, Q, SRC + 4096, 1);
    assert_eq!((r[1].info, r[1].level), (RAM_END, 0));
    // A 2 MiB leaf just past the end of RAM.
    d.map(DOM, LARGE, RAM_END, PAGE_2M, PAGE_2M, RW);
    let c = d.run(Q, Desc::fill(LARGE + PAGE_2M - 8, 8, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        LARGE + PAGE_2M - 8,
        0,
    );
    let r = d.wait_faults(1);
    assert_eq!(r[0].info, RAM_END + PAGE_2M - 8);
    d.bus.check_canaries();
}

// =======================================================================================
// The fault log
// =======================================================================================

// =======================================================================================
// Halting and resuming
// =======================================================================================

// =======================================================================================
// IOTLB and invalidation
// =======================================================================================

/// Domain 1 maps SRC to page A; a COPY SRC -> DST has cached it. Returns (driver, A, B,
/// dst) where B is a second page with other data.
fn stale_setup(config: DeviceConfig) -> (Driver, u64, u64, u64) {
    let mut d = setup_with(config);
    let a = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    let b = d.bus.alloc_guarded(4096, PAGE_4K);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.write(a, &[0xaa; 4096]);
    d.bus.write(b, &[0xbb; 4096]);
    assert_eq!(probe(&mut d, dst), 0xaa);
    (d, a, b, dst)
}

/// COPY 64 bytes SRC -> DST and return the byte that arrived.
fn probe(d: &mut Driver, dst: u64) -> u8 {
    d.bus.write(dst, &[0; 64]);
    let c = d.run(Q, Desc::copy(SRC, DST, 64));
    assert_ok(&c, 64);
    let got = d.bus.read(dst, 64);
    assert!(got.iter().all(|&x| x == got[0]), "one page's data");
    got[0]
}

#[test]
fn stale_translation_is_used_without_invalidation() {
    let (mut d, _, b, dst) = stale_setup(DeviceConfig::default());
    d.set_pte(DOM, SRC, 1, b | RW);
    assert_eq!(
        probe(&mut d, dst),
        0xaa,
        "cached translation to the old page"
    );
    assert_eq!(probe(&mut d, dst), 0xaa);
    // Even an unmapped entry keeps working from the IOTLB.
    d.set_pte(DOM, SRC, 1, 0);
    assert_eq!(probe(&mut d, dst), 0xaa);
    assert_eq!(d.read(REG_FLOG_COUNT), 0);
    assert_eq!(
        d.dstat(DOM, DSTAT_STALE_USES),
        0,
        "not counted outside strict mode"
    );
    d.invalidate_range(DOM, SRC, 4096);
    let c = d.run(Q, Desc::copy(SRC, DST, 64));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_NOT_PRESENT, 0, SRC, 0);
}

#[test]
fn invalidate_all_drops_the_stale_translation() {
    let (mut d, _, b, dst) = stale_setup(DeviceConfig::default());
    d.set_pte(DOM, SRC, 1, b | RW);
    assert_eq!(probe(&mut d, dst), 0xaa);
    let seq = d.read(REG_INV_SEQ);
    assert_eq!(d.invalidate_all(), 0);
    assert_eq!(d.read(REG_INV_SEQ), seq.wrapping_add(1));
    assert_eq!(probe(&mut d, dst), 0xbb);
}

#[test]
fn invalidate_domain_drops_only_that_domains_entries() {
    let (mut d, _, b, dst) = stale_setup(DeviceConfig::default());
    d.set_pte(DOM, SRC, 1, b | RW);
    assert_eq!(d.invalidate_domain(DOM + 1), 0);
    assert_eq!(probe(&mut d, dst), 0xaa, "another domain's invalidation");
    assert_eq!(d.invalidate_domain(DOM), 0);
    assert_eq!(probe(&mut d, dst), 0xbb);
}

#[test]
fn invalidate_range_drops_overlapping_pages_only() {
    let (mut d, _, b, dst) = stale_setup(DeviceConfig::default());
    d.set_pte(DOM, SRC, 1, b | RW);
    assert_eq!(d.invalidate_range(DOM, SRC + 4096, 4096), 0);
    assert_eq!(probe(&mut d, dst), 0xaa, "the next page");
    assert_eq!(d.invalidate_range(DOM, SRC - 4096, 4096), 0);
    assert_eq!(probe(&mut d, dst), 0xaa, "the previous page");
    assert_eq!(d.invalidate_range(DOM + 1, SRC, 4096), 0);
    assert_eq!(probe(&mut d, dst), 0xaa, "the same range in another domain");
    // One byte overlapping the page's last byte.
    assert_eq!(d.invalidate_range(DOM, SRC + 4095, 2), 0);
    assert_eq!(probe(&mut d, dst), 0xbb);
}

#[test]
fn invalidate_range_of_4k_inside_a_2m_entry_drops_it() {
    let mut d = setup();
    let a = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    let b = d.bus.alloc_guarded(PAGE_2M, PAGE_2M);
    d.map(DOM, LARGE, a, PAGE_2M, PAGE_2M, RW);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.write(a + 0x1000, &[0xaa; 64]);
    d.bus.write(b + 0x1000, &[0xbb; 64]);
    let copy = |d: &mut Driver| {
        assert_ok(&d.run(Q, Desc::copy(LARGE + 0x1000, DST, 64)), 64);
        d.bus.read_u8(dst)
    };
    assert_eq!(copy(&mut d), 0xaa);
    d.set_pte(DOM, LARGE, 2, b | RW | PTE_PS);
    assert_eq!(copy(&mut d), 0xaa, "stale 2 MiB entry");
    assert_eq!(d.invalidate_range(DOM, LARGE + PAGE_2M, 4096), 0);
    assert_eq!(copy(&mut d), 0xaa, "the next 2 MiB");
    // A 4 KiB range far from the used offset, inside the 2 MiB page.
    assert_eq!(d.invalidate_range(DOM, LARGE + 0x1f_f000, 4096), 0);
    assert_eq!(copy(&mut d), 0xbb);
}

#[test]
fn invalidation_errors_for_unknown_command_domain_or_empty_range() {
    let mut d = Driver::new();
    let seq = d.read(REG_INV_SEQ);
    assert_eq!(
        d.invalidate(0x7, 0, 0, 0) & INV_STATUS_ERROR,
        INV_STATUS_ERROR,
        "command"
    );
    assert_eq!(
        d.invalidate(0, 0, 0, 0) & INV_STATUS_ERROR,
        INV_STATUS_ERROR,
        "command 0"
    );
    assert_eq!(
        d.invalidate_domain(DEFAULT_DOMAINS) & INV_STATUS_ERROR,
        INV_STATUS_ERROR,
        "domain"
    );
    assert_eq!(
        d.invalidate_range(DEFAULT_DOMAINS, 0, 4096) & INV_STATUS_ERROR,
        INV_STATUS_ERROR,
        "range domain"
    );
    assert_eq!(
        d.invalidate_range(1, 0x1000, 0) & INV_STATUS_ERROR,
        INV_STATUS_ERROR,
        "len 0"
    );
    // A good command clears the error; 64-bit address and length halves are used.
    assert_eq!(d.invalidate_range(1, 0x1234_0000_0000, 1 << 33), 0);
    assert_eq!(d.invalidate_domain(DEFAULT_DOMAINS - 1), 0);
    assert_eq!(d.invalidate_all(), 0);
    assert_eq!(
        d.read(REG_INV_SEQ).wrapping_sub(seq) & 0xffff,
        3,
        "three completed"
    );
    assert_eq!(d.read(REG_INV_CMD), 0, "write-only");
}

#[test]
fn strict_mode_counts_a_stale_use_and_still_uses_the_cached_translation() {
    let strict = DeviceConfig {
        strict_iotlb: true,
        ..DeviceConfig::default()
    };
    let (mut d, _, b, dst) = stale_setup(strict);
    assert_eq!(
        d.read(REG_DEV_STATUS) & DEV_STATUS_STRICT_IOTLB,
        DEV_STATUS_STRICT_IOTLB
    );
    assert_eq!(probe(&mut d, dst), 0xaa, "unchanged table: not stale");
    assert_eq!(d.dstat(DOM, DSTAT_STALE_USES), 0);
    d.set_pte(DOM, SRC, 1, b | RW);
    assert_eq!(probe(&mut d, dst), 0xaa, "behaviour as without strict mode");
    assert_eq!(d.dstat(DOM, DSTAT_STALE_USES), 1, "one stale hit");
    assert_eq!(d.stats().domains[DOM as usize].stale_uses, 1);
    // A permission change is stale too; so is an entry that now faults.
    d.set_pte(DOM, SRC, 1, b | PTE_W);
    assert_eq!(probe(&mut d, dst), 0xaa);
    assert_eq!(d.dstat(DOM, DSTAT_STALE_USES), 2);
    d.set_pte(DOM, SRC, 1, 0);
    assert_eq!(probe(&mut d, dst), 0xaa);
    assert_eq!(d.dstat(DOM, DSTAT_STALE_USES), 3);
    assert_eq!(d.read(REG_FLOG_COUNT), 0, "a stale use is not a fault");
    // Every hit re-walks.
    let (hits, misses) = (
        d.dstat(DOM, DSTAT_IOTLB_HITS),
        d.dstat(DOM, DSTAT_IOTLB_MISSES),
    );
    assert_eq!(d.dstat(DOM, DSTAT_PAGE_WALKS), hits + misses);
    // After the invalidation the new table is used, and nothing is stale.
    d.set_pte(DOM, SRC, 1, b | RW);
    d.invalidate_domain(DOM);
    assert_eq!(probe(&mut d, dst), 0xbb);
    assert_eq!(probe(&mut d, dst), 0xbb);
    assert_eq!(d.dstat(DOM, DSTAT_STALE_USES), 3);
}

#[test]
fn iotlb_hits_are_counted_and_non_strict_walks_only_on_misses() {
    let mut d = setup();
    let src = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    d.bus.write(src, &[7; 4096]);
    for _ in 0..5 {
        assert_ok(&d.run(Q, Desc::crc32c(SRC, 4096)), 4096);
    }
    let (t, h, m, w) = (
        d.dstat(DOM, DSTAT_TRANSLATIONS),
        d.dstat(DOM, DSTAT_IOTLB_HITS),
        d.dstat(DOM, DSTAT_IOTLB_MISSES),
        d.dstat(DOM, DSTAT_PAGE_WALKS),
    );
    assert_eq!(t, h + m);
    assert_eq!(w, m, "no re-walks outside strict mode");
    // 5 x (descriptor fetch, source, completion); ring, record and source pages are
    // missed once each, then hit.
    assert_eq!((t, h, m), (15, 12, 3));
}

#[test]
fn iotlb_evicts_least_recently_used_entry_when_full() {
    // Two entries: ring and record pages hit, each new source page evicts the oldest.
    let mut d = setup_with(DeviceConfig {
        iotlb_entries: 4,
        ..DeviceConfig::default()
    });
    let pages = scattered_pages(&mut d, 8);
    d.pt(DOM).map_pages(&mut d.bus, SRC, &pages, PAGE_4K, RW);
    for p in &pages {
        d.bus.write(*p, &[(*p >> 12) as u8; 8]);
    }
    for i in 0..8u64 {
        assert_ok(&d.run(Q, Desc::crc32c(SRC + i * 4096, 8)), 8);
    }
    // Remap page 0 and page 7 to page 1's frame without invalidation: page 0 was evicted
    // (fresh walk sees the change), page 7 is still cached.
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.set_pte(DOM, SRC, 1, pages[1] | RW);
    d.set_pte(DOM, SRC + 7 * 4096, 1, pages[1] | RW);
    assert_ok(&d.run(Q, Desc::copy(SRC + 7 * 4096, DST, 8)), 8);
    assert_eq!(
        d.bus.read_u8(dst),
        (pages[7] >> 12) as u8,
        "recent entry cached"
    );
    assert_ok(&d.run(Q, Desc::copy(SRC, DST, 8)), 8);
    assert_eq!(
        d.bus.read_u8(dst),
        (pages[1] >> 12) as u8,
        "old entry evicted"
    );
    assert!(d.stats().iotlb_entries <= 4);
}

#[test]
fn iotlb_is_set_associative_as_spec_defines() {
    // Eight entries: two sets of four (SPEC.md "IOTLB"). Consecutive 4 KiB pages alternate
    // between the sets, so page 0 and the odd pages never share one.
    let mut d = setup_with(DeviceConfig {
        iotlb_entries: 8,
        ..DeviceConfig::default()
    });
    let pages = scattered_pages(&mut d, 17);
    d.pt(DOM).map_pages(&mut d.bus, SRC, &pages, PAGE_4K, RW);
    for p in &pages {
        d.bus.write(*p, &[(*p >> 12) as u8; 8]);
    }
    assert_ok(&d.run(Q, Desc::crc32c(SRC, 8)), 8);
    // Eight newer pages, all in the other set: a fully associative 8-entry LRU would have
    // evicted page 0 (ring and record pages are newer still); its own set, holding at most
    // page 0, the ring page and the record page, has had no reason to.
    for i in (1..16u64).step_by(2) {
        assert_ok(&d.run(Q, Desc::crc32c(SRC + i * 4096, 8)), 8);
    }
    // Remap page 0 and page 1 to page 16's frame without invalidation: page 0 is still
    // cached (stale), page 1 was evicted from its set by the seven pages after it.
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.set_pte(DOM, SRC, 1, pages[16] | RW);
    d.set_pte(DOM, SRC + 4096, 1, pages[16] | RW);
    assert_ok(&d.run(Q, Desc::copy(SRC, DST, 8)), 8);
    assert_eq!(
        d.bus.read_u8(dst),
        (pages[0] >> 12) as u8,
        "page 0 still cached"
    );
    assert_ok(&d.run(Q, Desc::copy(SRC + 4096, DST, 8)), 8);
    assert_eq!(
        d.bus.read_u8(dst),
        (pages[16] >> 12) as u8,
        "page 1 evicted"
    );
    assert!(d.stats().iotlb_entries <= 8);
}

// =======================================================================================
// The 32-bit mode
// =======================================================================================

// =======================================================================================
// Concurrency
// =======================================================================================

// =======================================================================================
// Reset
// =======================================================================================

/// A 64 MiB COPY on 4 KiB pages in domain 1, plus two NOPs behind it; returns when the
/// queue reads busy with nothing completed. Returns (driver, tickets, dst bus address).
fn long_copy_in_flight() -> (Driver, Vec<Ticket>, u64) {
    let mut d = setup();
    d.write(REG_SCRATCH, 0x5a5a);
    let len = MAX_XFER;
    let src = d.map_new(DOM, SRC, u64::from(len), PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, u64::from(len), PAGE_4K, RW);
    d.bus.fill(src, u64::from(len), 0xc7);
    let ts = d.submit_many(Q, &[Desc::copy(SRC, DST, len), Desc::nop(), Desc::nop()]);
    d.wait_status(Q, "queue busy", |s| s & Q_STATUS_BUSY != 0);
    poll("the copy to start", || {
        (d.bus.read_u8(dst) == 0xc7).then_some(())
    });
    assert_eq!(d.qread(Q, Q_COMPLETED), 0, "the copy is still running");
    (d, ts, dst)
}

/// Everything SPEC.md "Reset" clears.
fn assert_reset_state(d: &mut Driver) {
    for q in 0..DEFAULT_QUEUES {
        assert_eq!(d.qread(q, Q_STATUS), 0, "queue {q} disabled");
        assert_eq!((d.qread(q, Q_HEAD), d.qread(q, Q_TAIL)), (0, 0));
        assert_eq!((d.qread(q, Q_COMPLETED), d.qread(q, Q_ERRORS)), (0, 0));
        assert_eq!(d.qread(q, Q_HALT_REASON), HALT_NONE);
    }
    assert_eq!(d.dread(0, D_CTRL), DOMAIN_MODE_PASSTHROUGH);
    for dom in 1..DEFAULT_DOMAINS {
        assert_eq!(d.dread(dom, D_CTRL), DOMAIN_MODE_DISABLED);
        assert_eq!((d.dread(dom, D_ROOT_LO), d.dread(dom, D_ROOT_HI)), (0, 0));
    }
    assert_eq!(d.read(REG_SCRATCH), 0);
    for reg in [
        REG_FLOG_BASE_LO,
        REG_FLOG_BASE_HI,
        REG_FLOG_SIZE,
        REG_FLOG_CTRL,
        REG_FLOG_HEAD,
        REG_FLOG_TAIL,
        REG_FLOG_STATUS,
        REG_FLOG_COUNT,
        REG_FLOG_DROPPED,
    ] {
        assert_eq!(d.read(reg), 0, "fault log register {reg:#x}");
    }
    assert_eq!(d.qstat(Q, QSTAT_DESCRIPTORS), 0);
    assert_eq!(d.dstat(DOM, DSTAT_TRANSLATIONS), 0);
    let s = d.stats();
    assert!(s.queues.iter().all(|q| *q == Default::default()), "{s:?}");
    assert!(s.domains.iter().all(|q| *q == Default::default()), "{s:?}");
    assert_eq!(
        (s.faults.count, s.faults.dropped, s.iotlb_entries),
        (0, 0, 0)
    );
}

/// After a reset: the old records stay pending while the device is reprogrammed and used,
/// and the old destination does not change.
fn check_usable_after_reset(d: &mut Driver, old: &[Ticket], old_dst: u64) {
    for t in old {
        assert_eq!(
            d.peek(t).status,
            STATUS_PENDING,
            "no completion after reset"
        );
    }
    let snapshot = d.bus.read(old_dst, MAX_XFER as usize);
    // Reprogram: domain 1 with its old table, the fault log, queue 0; run a copy.
    // The reset emptied the IOTLB: SRC's first page, remapped in the old table, is walked
    // afresh without any invalidation.
    let fresh = d.bus.alloc_guarded(4096, PAGE_4K);
    d.bus.write(fresh, &pattern(33, 4096));
    d.set_pte(DOM, SRC, 1, fresh | RW);
    let root = d.pt(DOM).root;
    d.set_domain(DOM, root, DOMAIN_MODE_TRANSLATED);
    d.enable_fault_log(16);
    d.setup_queue(Q, DOM, 16);
    let c = d.run(Q, Desc::crc32c(SRC, 4096));
    assert_ok(&c, 4096);
    assert_eq!(
        c.result,
        u64::from(crc32c(&pattern(33, 4096))),
        "stale entry after reset"
    );
    let src = d.map_new(DOM, LARGE, 1 << 20, PAGE_2M, RW);
    let dst = d.map_new(DOM, LARGE2, 1 << 20, PAGE_2M, RW);
    let data = pattern(21, 1 << 20);
    d.bus.write(src, &data);
    assert_ok(&d.run(Q, Desc::copy(LARGE, LARGE2, 1 << 20)), 1 << 20);
    assert!(d.bus.read(dst, 1 << 20) == data);
    assert_eq!(d.read(REG_FLOG_COUNT), 0);
    for t in old {
        assert_eq!(
            d.peek(t).status,
            STATUS_PENDING,
            "no completion after reset"
        );
    }
    assert!(
        d.bus.read(old_dst, MAX_XFER as usize) == snapshot,
        "the aborted copy's destination did not change after reset"
    );
    d.bus.check_canaries();
}

#[test]
fn function_level_reset_during_64mib_copy_stops_without_completion_and_device_is_usable() {
    let (mut d, ts, dst) = long_copy_in_flight();
    // MSI-X entry 0 unmasked (vector control at +12); the reset masks it again.
    d.dev
        .bar_write(MSIX_BAR, MSIX_TABLE_OFFSET + 12, &0u32.to_le_bytes());
    d.dev.reset();
    let mut ctl = [0u8; 4];
    d.dev.bar_read(MSIX_BAR, MSIX_TABLE_OFFSET + 12, &mut ctl);
    assert_eq!(u32::from_le_bytes(ctl) & 1, 1, "MSI-X entries reset masked");
    let mut pba = [0xffu8; 8];
    d.dev.bar_read(MSIX_BAR, MSIX_PBA_OFFSET, &mut pba);
    assert_eq!(pba, [0; 8], "the PBA reads as zero");
    assert_eq!(
        d.read(REG_DEV_STATUS),
        0,
        "configuration space reset: no bus master"
    );
    d.bus_master(true);
    assert_reset_state(&mut d);
    check_usable_after_reset(&mut d, &ts, dst);
}

// =======================================================================================
// Hostile page tables
// =======================================================================================

#[test]
fn hostile_table_pointing_at_itself_maps_itself_and_cannot_loop() {
    let mut d = setup();
    let root = d.pt(DOM).root;
    // root[1] points at the root: walking L4 index 1, L3 index 1, L2 index 1, L1 index 1
    // reuses the root at every level and ends in the root page itself.
    d.bus.write_u64(root + 8, root | RW);
    let me = HOSTILE | (1 << 30) | (1 << 21) | (1 << 12);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst + 16, 48);
    d.bus.plant(dst + 72, 4096 - 72);
    let c = d.run(Q, Desc::copy(me, DST, 16));
    assert_ok(&c, 16);
    assert_eq!(
        d.bus.read(dst, 16),
        d.bus.read(root, 16),
        "the root page's bytes"
    );
    assert_eq!(d.bus.read_u64(dst + 8), root | RW);
    // Index 2 at level 1 is empty: not present, at level 1.
    let c = d.run(Q, Desc::crc32c(me + 4096, 8));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_NOT_PRESENT, 0, me + 4096, 0);
    // A self pointer with PS at level 4 is malformed.
    d.bus.write_u64(root + 3 * 8, root | RW | PTE_PS);
    let c = d.run(Q, Desc::crc32c(3 << 39, 8));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_MALFORMED_ENTRY, 0, 3 << 39, 0);
    // An L1 entry pointing at its own table.
    let l1 = d.pte_addr(DOM, HOSTILE | (2 << 30), 1) & !0xfff;
    d.bus.write_u64(l1, l1 | PTE_R);
    let c = d.run(Q, Desc::copy(HOSTILE | (2 << 30), DST + 64, 8));
    assert_ok(&c, 8);
    assert_eq!(d.bus.read_u64(dst + 64), l1 | PTE_R);
    let r = d.wait_faults(2);
    assert_eq!((r[0].reason, r[0].level), (FAULT_NOT_PRESENT, 1));
    assert_eq!(
        (r[1].reason, r[1].level, r[1].info),
        (FAULT_MALFORMED_ENTRY, 4, root | RW | PTE_PS)
    );
    d.bus.check_canaries();
}

#[test]
fn hostile_entries_pointing_outside_ram_fault_at_every_level_and_size() {
    let mut d = setup();
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.plant(dst, 4096);
    let outside = [
        0u64,
        0x1000,
        RAM_BASE - PAGE_4K,
        RAM_END,
        RAM_END + 2 * PAGE_1G,
        0x000f_ffff_ffe0_0000,
    ];
    let root = d.pt(DOM).root;
    let mut seq = 0;
    let mut expect = |d: &mut Driver, iova: u64, access: u8, info: u64, level: u32| {
        let c = d.run(Q, Desc::copy(iova, DST, 8));
        assert_cpl(&c, STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, access, iova, 0);
        let r = d.wait_faults(1);
        assert_rec(&r[0], FAULT_OUTSIDE_RAM, access, DOM, Q, iova, seq);
        assert_eq!((r[0].info, r[0].level), (info, level), "{r:x?}");
        seq += 1;
    };
    for (i, &bad) in outside.iter().enumerate() {
        // As a table pointer at levels 4, 3 and 2: the table below cannot be read.
        let iova = (2 + i as u64) << 39;
        d.bus.write_u64(root + (2 + i as u64) * 8, bad | RW);
        expect(&mut d, iova + 0x40, ACCESS_PAGE_WALK, bad, 3);
        let region = |k: u64| HOSTILE + (4 * i as u64 + k) * PAGE_1G;
        d.set_pte(DOM, region(0), 3, bad | RW);
        expect(&mut d, region(0) + 0x123, ACCESS_PAGE_WALK, bad, 2);
        d.set_pte(DOM, region(1), 2, bad | RW);
        expect(&mut d, region(1) + 0x40, ACCESS_PAGE_WALK, bad, 1);
        // As a leaf of each size: a fault when the access happens, not in the walk.
        d.set_pte(DOM, region(2), 1, bad | RW);
        expect(&mut d, region(2) + 8, 0, bad + 8, 0);
        let big = bad & !(PAGE_2M - 1);
        d.set_pte(DOM, region(3), 2, big | RW | PTE_PS);
        expect(&mut d, region(3) + 0x1000, 0, big + 0x1000, 0);
    }
    // 1 GiB leaves outside RAM.
    for (k, bad) in [RAM_END, RAM_END + 2 * PAGE_1G, 0].into_iter().enumerate() {
        let iova = HOSTILE + (100 + k as u64) * PAGE_1G;
        d.set_pte(DOM, iova, 3, bad | RW | PTE_PS);
        expect(&mut d, iova + 0x3000_0000, 0, bad + 0x3000_0000, 0);
    }
    d.bus.check_canaries();
}

/// A random page-table entry: mostly plausible, often wrong. Never a writable mapping of
/// memory outside `sandbox` (16 MiB, 2 MiB aligned) and the `tables`.
fn random_entry(rng: &mut Rng, tables: &[u64], sandbox: u64) -> u64 {
    let perms = rng.pick(&[RW, RW, RW, RW, PTE_R, PTE_W]) | (rng.below(16) << 8);
    let outside = [
        0u64,
        0x1000,
        RAM_BASE - PAGE_2M,
        RAM_END,
        0x000f_ffff_c000_0000,
    ];
    match rng.below(12) {
        0 => 0,
        1 => rng.next_u64() & !RW,
        2 => rng.next_u64(),
        3..=5 => rng.pick(tables) | perms,
        6 => ((sandbox + rng.below(16 << 20)) & !0xfff) | perms,
        7 => (sandbox + rng.below(8) * PAGE_2M) | perms | PTE_PS,
        8 => rng.pick(&outside) | perms | if rng.chance(1, 2) { PTE_PS } else { 0 },
        9 => rng.pick(tables) | perms | PTE_PS,
        10 => rng.pick(tables) | perms | (1 << rng.pick(&[2u64, 3, 4, 5, 6, 52, 55, 63])),
        _ => ((sandbox + rng.below(16 << 20)) & !0xfff) | perms | (rng.below(2) << 7),
    }
}

/// A random IOVA in L4 slots 1..=3 with small indices below (so walks meet the entries).
fn random_hostile_iova(rng: &mut Rng) -> u64 {
    let l4 = 1 + rng.below(3);
    (l4 << 39)
        | (rng.below(6) << 30)
        | (rng.below(6) << 21)
        | (rng.below(6) << 12)
        | rng.below(4096)
}

/// Fill `tables` with random entries and point root slots 1..=3 into them.
fn randomize_tables(d: &mut Driver, rng: &mut Rng, root: u64, tables: &[u64], sandbox: u64) {
    for &t in tables {
        let v: Vec<u8> = (0..512)
            .flat_map(|_| random_entry(rng, tables, sandbox).to_le_bytes())
            .collect();
        d.bus.write(t, &v);
    }
    for slot in 1..=3u64 {
        let e = if rng.chance(9, 10) {
            rng.pick(tables) | RW
        } else {
            random_entry(rng, tables, sandbox)
        };
        d.bus.write_u64(root + slot * 8, e);
    }
}

#[test]
fn hostile_garbage_roots_halt_the_fetch_with_the_modelled_fault() {
    let mut d = Driver::new();
    d.enable_fault_log(64);
    let mut rng = Rng::new(0x9a5b);
    let mut seq = 0;
    for round in 0..24 {
        // A root page of pure garbage, no structure at all.
        let root = d.bus.alloc(4096, PAGE_4K);
        let garbage: Vec<u8> = (0..512)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect();
        d.bus.write(root, &garbage);
        d.set_domain(5, root | (rng.next_u64() & 0xfff), DOMAIN_MODE_TRANSLATED);
        assert_eq!(d.invalidate_domain(5), 0);
        d.setup_queue_with(1, 5, 8, 0);
        let ring = d.queue(1).ring;
        d.submit(1, Desc::nop());
        let want = model_walk(&d.bus, root, ring, false, 48);
        match want {
            Err(f) => {
                d.wait_status(1, "queue halt", |s| s & Q_STATUS_ERROR != 0);
                assert_eq!(d.qread(1, Q_HALT_REASON), HALT_DESC_FETCH, "round {round}");
                let r = d.wait_faults(1);
                let access = ACCESS_DESCRIPTOR | if f.walk_read { ACCESS_PAGE_WALK } else { 0 };
                assert_rec(&r[0], f.reason, access, 5, 1, ring, seq);
                assert_eq!((r[0].level, r[0].info), (f.level, f.info), "round {round}");
                seq += 1;
            }
            Ok(_) => {
                // The garbage happened to map the ring somewhere in RAM: any answer but a
                // panic is fine; stop the queue.
            }
        }
        d.qwrite(1, Q_CTRL, 0);
    }
}

#[test]
fn hostile_random_tables_fuzz_gives_modelled_faults_never_a_panic() {
    const ROUNDS: usize = 12;
    const READS: usize = 220;
    const WRITES: usize = 120;
    let mut d = Driver::new();
    d.enable_fault_log(FAULT_LOG_MAX);
    let root = d.translated_domain(DOM);
    d.setup_queue(Q, DOM, 256);
    let sandbox = d.bus.alloc_guarded(16 << 20, PAGE_2M);
    let tables: Vec<u64> = (0..24).map(|i| sandbox + i * PAGE_4K).collect();
    d.bus.write(sandbox, &pattern(22, 16 << 20));
    let mut rng = Rng::new(0xf022_2024);
    let mut seq = 0u32;
    let mut faults_total = 0u32;
    let mut modelled = [0usize; 8];
    for round in 0..ROUNDS {
        randomize_tables(&mut d, &mut rng, root, &tables, sandbox);
        assert_eq!(d.invalidate_domain(DOM), 0);

        // Read phase: CRC32C only, so the tables cannot change; the model predicts all.
        let descs: Vec<Desc> = (0..READS)
            .map(|i| {
                let src = if rng.chance(1, 30) {
                    (1u64 << 48) + rng.below(1 << 40)
                } else {
                    random_hostile_iova(&mut rng)
                };
                let len = 1 + rng.below(3 * 4096) as u32;
                Desc::crc32c(src, len).tag((round as u64) << 32 | i as u64)
            })
            .collect();
        let models: Vec<ModelRead> = descs
            .iter()
            .map(|x| model_read(&d.bus, root, x.src, u64::from(x.len), 48))
            .collect();
        let ts = d.submit_many(Q, &descs);
        let mut want_faults = Vec::new();
        for ((t, desc), model) in ts.iter().zip(&descs).zip(&models) {
            let c = d.wait(t);
            match model {
                ModelRead::Ok(data) => {
                    modelled[0] += 1;
                    assert_ok(&c, desc.len);
                    assert_eq!(c.result, u64::from(crc32c(data)), "{desc:x?}");
                }
                ModelRead::Fault { bytes, iova, fault } => {
                    modelled[fault.reason as usize] += 1;
                    let access = if fault.walk_read { ACCESS_PAGE_WALK } else { 0 };
                    let reason_ok = c.fault_reason == fault.reason
                        || (fault.perm_ambiguous && c.fault_reason == FAULT_PERMISSION);
                    assert!(
                        c.status == STATUS_DMA_ERROR
                            && reason_ok
                            && c.fault_access == access
                            && c.fault_addr == *iova
                            && u64::from(c.bytes) == *bytes,
                        "{desc:x?}: device {c:x?}, model {model:x?}"
                    );
                    want_faults.push((c.fault_reason, *iova, *fault));
                }
            }
        }
        let recs = d.wait_faults(want_faults.len() as u32);
        assert_eq!(recs.len(), want_faults.len());
        for (r, (reason, iova, f)) in recs.iter().zip(&want_faults) {
            let access = if f.walk_read { ACCESS_PAGE_WALK } else { 0 };
            assert_rec(r, *reason, access, DOM, Q, *iova, seq);
            if *reason == f.reason && matches!(f.reason, FAULT_MALFORMED_ENTRY | FAULT_OUTSIDE_RAM)
            {
                assert_eq!((r.info, r.level), (f.info, f.level), "{r:x?} vs {f:x?}");
            }
            seq += 1;
        }
        faults_total += want_faults.len() as u32;

        // Write phase: anything goes, including malformed descriptors; the tables may be
        // overwritten by the device itself. Only sanity is checked.
        let errors_before = d.qread(Q, Q_ERRORS);
        let count_before = d.read(REG_FLOG_COUNT);
        let descs: Vec<Desc> = (0..WRITES)
            .map(|i| {
                let len = match rng.below(10) {
                    0 => 0,
                    1 => MAX_XFER + 1,
                    _ => 1 + rng.below(2 * 4096) as u32,
                };
                let (a, b) = (random_hostile_iova(&mut rng), random_hostile_iova(&mut rng));
                let mut x = match rng.below(6) {
                    0 | 1 => Desc::copy(a, b, len),
                    2 => Desc::fill(b, len, rng.next_u64()),
                    3 => Desc::compare(a, b, len),
                    4 => Desc::crc32c(a, len),
                    _ => Desc {
                        opcode: rng.below(256) as u8,
                        len,
                        src: a,
                        dst: b,
                        ..Desc::default()
                    },
                };
                if rng.chance(1, 20) {
                    x.flags = rng.below(256) as u8;
                }
                if rng.chance(1, 30) {
                    x.reserved[rng.below(24) as usize] = 1;
                }
                if rng.chance(1, 10) {
                    x.cpl = Cpl::None;
                }
                x.tag((round as u64) << 32 | 0x8000_0000 | i as u64)
            })
            .collect();
        let ts = d.submit_many(Q, &descs);
        let fence = d.submit(Q, Desc::nop());
        assert_ok(&d.wait(&fence), 0);
        for (t, x) in ts.iter().zip(&descs) {
            if t.cpl_bus.is_none() {
                continue;
            }
            let c = d.wait(t);
            match c.status {
                STATUS_OK => {
                    let want = if x.opcode == OP_NOP { 0 } else { x.len };
                    assert_ok(&c, want);
                }
                STATUS_INVALID_DESCRIPTOR => {
                    assert_eq!(
                        (c.fault_reason, c.bytes),
                        (FAULT_DESCRIPTOR_INVALID, 0),
                        "{x:x?}"
                    )
                }
                STATUS_DMA_ERROR => {
                    assert!(
                        (1..=7).contains(&c.fault_reason)
                            && c.fault_reason != FAULT_DESCRIPTOR_INVALID,
                        "{x:x?}: {c:x?}"
                    );
                    assert!(c.bytes < x.len, "{x:x?}: {c:x?}");
                    let in_range =
                        |base: u64| c.fault_addr >= base && c.fault_addr - base < u64::from(x.len);
                    assert!(in_range(x.src) || in_range(x.dst), "{x:x?}: {c:x?}");
                }
                s => panic!("status {s:#x} for {x:x?}"),
            }
        }
        let errors = d.qread(Q, Q_ERRORS).wrapping_sub(errors_before);
        let count = d.read(REG_FLOG_COUNT).wrapping_sub(count_before);
        assert_eq!(errors, count, "one fault per failed descriptor");
        let recs = d.wait_faults(count);
        for r in &recs {
            assert!((1..=7).contains(&r.reason), "{r:x?}");
            assert_eq!(r.seq, seq);
            seq += 1;
        }
        faults_total += count;
        d.bus.check_canaries();
    }
    assert_eq!(d.read(REG_FLOG_COUNT), faults_total);
    assert_eq!(d.read(REG_FLOG_DROPPED), 0);
    // The fuzz must have exercised the interesting outcomes.
    for reason in [
        FAULT_NOT_PRESENT,
        FAULT_PERMISSION,
        FAULT_MALFORMED_ENTRY,
        FAULT_OUTSIDE_RAM,
        FAULT_IOVA_WIDTH,
    ] {
        assert!(
            modelled[reason as usize] > 5,
            "reason {reason}: {modelled:?}"
        );
    }
    assert!(modelled[0] > 20, "successful reads: {modelled:?}");
}

// =======================================================================================
// Statistics
// =======================================================================================

#[test]
fn statistics_window_and_snapshot_agree_with_what_happened() {
    let mut d = Driver::new();
    d.translated_domain(DOM);
    d.setup_queue(0, DOM, 16);
    d.setup_queue(1, 0, 16);
    let src = d.map_new(DOM, SRC, 3 * 4096, PAGE_4K, RW);
    d.map_new(DOM, DST, 3 * 4096, PAGE_4K, RW);
    d.bus.write(src, &pattern(23, 3 * 4096));
    let ts = d.submit_many(
        0,
        &[
            Desc::copy(SRC, DST, 3 * 4096).flags(DESC_FLAG_INTERRUPT),
            Desc::fill(DST, 1000, 7).flags(DESC_FLAG_INTERRUPT),
            Desc::crc32c(SRC + 0x10_0000, 4), // not mapped
            Desc::nop(),
        ],
    );
    for t in &ts {
        d.wait(t);
    }
    let buf = d.bus.alloc_guarded(100, PAGE_4K);
    assert_ok(&d.run(1, Desc::fill(buf, 100, 1)), 100);

    eventually_eq("QSTAT_DESCRIPTORS", 4, || d.qstat(0, QSTAT_DESCRIPTORS));
    eventually_eq("QSTAT_INTERRUPTS", 2, || d.qstat(0, QSTAT_INTERRUPTS));
    assert_eq!(d.qstat(0, QSTAT_BYTES), 3 * 4096 + 1000);
    assert_eq!(d.qstat(0, QSTAT_ERRORS), 1);
    assert_eq!(d.qstat(0, QSTAT_FAULTS), 1);
    eventually_eq("queue 1 descriptors", 1, || d.qstat(1, QSTAT_DESCRIPTORS));
    assert_eq!(d.qstat(1, QSTAT_BYTES), 100);
    assert_eq!(
        (
            d.qstat(1, QSTAT_ERRORS),
            d.qstat(1, QSTAT_FAULTS),
            d.qstat(1, QSTAT_INTERRUPTS)
        ),
        (0, 0, 0)
    );
    assert_eq!(d.irq_count(0), 2);
    let (t, h, m, w, f) = (
        d.dstat(DOM, DSTAT_TRANSLATIONS),
        d.dstat(DOM, DSTAT_IOTLB_HITS),
        d.dstat(DOM, DSTAT_IOTLB_MISSES),
        d.dstat(DOM, DSTAT_PAGE_WALKS),
        d.dstat(DOM, DSTAT_FAULTS),
    );
    assert_eq!(f, 1);
    assert_eq!(t, h + m);
    assert_eq!(w, m);
    // 4 fetches, 3 + 3 copy pages, 1 fill page, 1 faulting read, 4 records.
    assert!(t >= 16, "translations {t}");
    assert_eq!(d.dstat(DOM, DSTAT_STALE_USES), 0);
    assert_eq!(d.read(REG_FLOG_COUNT), 1);

    let s = d.stats();
    assert_eq!(s.queues.len(), DEFAULT_QUEUES as usize);
    assert_eq!(s.domains.len(), DEFAULT_DOMAINS as usize);
    for q in 0..2u32 {
        let sq = s.queues[q as usize];
        assert_eq!(
            [
                sq.descriptors,
                sq.bytes,
                sq.errors,
                sq.faults,
                sq.interrupts
            ],
            [
                d.qstat(q, QSTAT_DESCRIPTORS),
                d.qstat(q, QSTAT_BYTES),
                d.qstat(q, QSTAT_ERRORS),
                d.qstat(q, QSTAT_FAULTS),
                d.qstat(q, QSTAT_INTERRUPTS)
            ],
            "queue {q}"
        );
    }
    let sd = s.domains[DOM as usize];
    assert_eq!(
        [
            sd.translations,
            sd.iotlb_hits,
            sd.iotlb_misses,
            sd.page_walks,
            sd.faults,
            sd.stale_uses
        ],
        [t, h, m, w, f, 0]
    );
    assert_eq!((s.faults.count, s.faults.dropped), (1, 1));
    assert!(s.iotlb_entries > 0 && s.iotlb_entries <= u64::from(DEFAULT_IOTLB_ENTRIES));
    // High half and unknown selections.
    assert_eq!(d.read(REG_STAT_VALUE_HI), 0);
    assert_eq!(d.stat(7, 0, 0), 0, "unknown kind");
    assert_eq!(d.stat(STAT_KIND_QUEUE, 9, 0), 0, "unknown counter");
    assert_eq!(
        d.stat(STAT_KIND_QUEUE, QSTAT_DESCRIPTORS, 99),
        0,
        "no such queue"
    );
    assert_eq!(
        d.stat(STAT_KIND_DOMAIN, DSTAT_TRANSLATIONS, 99),
        0,
        "no such domain"
    );
}

// =======================================================================================
// Interrupts
// =======================================================================================

#[test]
fn coalescing_by_time_raises_a_partial_batch() {
    let mut d = Driver::new();
    d.setup_queue(0, 0, 16);
    d.qwrite(0, Q_COAL_COUNT, 100);
    d.qwrite(0, Q_COAL_USEC, 500);
    assert_eq!(d.qread(0, Q_COAL_USEC), 500);
    let irq = Desc::nop().flags(DESC_FLAG_INTERRUPT);
    for t in d.submit_many(0, &[irq, irq, irq]) {
        d.wait(&t);
    }
    d.wait_irq_count(0, 1);
    eventually_eq("QSTAT_INTERRUPTS", 1, || d.qstat(0, QSTAT_INTERRUPTS));
    // The timer took the whole batch: the next one starts from zero.
    d.qwrite(0, Q_COAL_USEC, 0);
    d.qwrite(0, Q_COAL_COUNT, 2);
    for t in d.submit_many(0, &[irq, irq]) {
        d.wait(&t);
    }
    d.wait_irq_count(0, 2);
    assert_ok(&d.run(0, Desc::nop()), 0);
    assert_eq!(d.irq_count(0), 2);
}

// =======================================================================================
// More of the register interface
// =======================================================================================

#[test]
fn domain_root_change_reaches_the_device_only_after_invalidation() {
    let (mut d, _, b, dst) = stale_setup(DeviceConfig::default());
    // A second table mapping the same ring, records and destination, and SRC to page B.
    let c = d.queue(Q);
    let pt2 = PageTable::new(&mut d.bus);
    pt2.map(&mut d.bus, c.ring, c.ring, 64 * DESC_SIZE, PAGE_4K, RW);
    pt2.map(&mut d.bus, c.cpl, c.cpl, PAGE_4K, PAGE_4K, RW);
    pt2.map(&mut d.bus, DST, dst, PAGE_4K, PAGE_4K, RW);
    pt2.map(&mut d.bus, SRC, b, PAGE_4K, PAGE_4K, RW);
    d.dwrite(DOM, D_ROOT_LO, pt2.root as u32);
    d.dwrite(DOM, D_ROOT_HI, (pt2.root >> 32) as u32);
    assert_eq!(
        probe(&mut d, dst),
        0xaa,
        "cached translation of the old table"
    );
    assert_eq!(d.invalidate_domain(DOM), 0);
    assert_eq!(probe(&mut d, dst), 0xbb);
}

#[test]
fn domain_mode_is_read_per_chunk_and_cached_translations_return_with_it() {
    let (mut d, _, b, dst) = stale_setup(DeviceConfig::default());
    // SRC now maps page B in the table, but the IOTLB still holds page A.
    d.set_pte(DOM, SRC, 1, b | RW);
    // SPEC.md "Domain registers": disabling takes effect from the next chunk (here: the
    // next descriptor's fetch), without invalidation.
    d.dwrite(DOM, D_CTRL, DOMAIN_MODE_DISABLED);
    d.bus.write(dst, &[0; 64]);
    let t = d.submit(Q, Desc::copy(SRC, DST, 64));
    assert_eq!(d.wait_or_halt(&t), Err(HALT_DESC_FETCH));
    let ring_slot = d.queue(Q).ring + u64::from(t.slot) * DESC_SIZE;
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_DOMAIN_DISABLED,
        ACCESS_DESCRIPTOR,
        DOM,
        Q,
        ring_slot,
        0,
    );
    // Back to translated without an invalidation: the cached translations are used again.
    d.dwrite(DOM, D_CTRL, DOMAIN_MODE_TRANSLATED);
    d.qwrite(Q, Q_CTRL, Q_CTRL_ENABLE | Q_CTRL_RESUME);
    assert_ok(&d.wait(&t), 64);
    assert_eq!(
        d.bus.read_u8(dst),
        0xaa,
        "the cached page A, not the table's B"
    );
    // Pass-through at once: IOVA = bus address (ring and records are identity-mapped).
    d.dwrite(DOM, D_CTRL, DOMAIN_MODE_PASSTHROUGH);
    d.bus.write(dst, &[0; 64]);
    assert_ok(&d.run(Q, Desc::copy(b, dst, 64)), 64);
    assert_eq!(d.bus.read_u8(dst), 0xbb);
    // SRC as a bus address is not bus memory.
    let c = d.run(Q, Desc::copy(SRC, dst, 64));
    assert_cpl(&c, STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, 0, SRC, 0);
    d.bus.check_canaries();
}

#[test]
fn domain_disabled_mid_transfer_is_in_effect_when_the_invalidation_returns() {
    let mut d = setup();
    let len = MAX_XFER;
    let src = d.map_new(DOM, SRC, u64::from(len), PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, u64::from(len), PAGE_4K, RW);
    d.bus.fill(src, u64::from(len), 0x5a);
    let _t = d.submit(Q, Desc::copy(SRC, DST, len));
    poll("the copy to start", || {
        (d.bus.read_u8(dst) == 0x5a).then_some(())
    });
    // Disable the domain mid-transfer and invalidate it: when the invalidation returns the
    // chunk in flight has finished, and the next chunk reads the new mode.
    d.dwrite(DOM, D_CTRL, DOMAIN_MODE_DISABLED);
    assert_eq!(d.invalidate_domain(DOM), 0);
    let snapshot = d.bus.read(dst, len as usize);
    let r = d.wait_faults(1);
    assert_eq!(
        (r[0].reason, r[0].domain, r[0].queue),
        (FAULT_DOMAIN_DISABLED, DOM as u16, Q as u16),
        "{:x?}",
        r[0]
    );
    let done = r[0].iova - SRC;
    assert!(
        done > 0 && done < u64::from(len) && done % 4096 == 0,
        "stopped at {done:#x}"
    );
    assert!(
        d.bus.read(dst, len as usize) == snapshot,
        "written after the invalidation"
    );
    assert!(d.bus.read(dst, done as usize).iter().all(|&x| x == 0x5a));
    d.bus.check_canaries();
}

#[test]
fn invalidation_returns_after_the_chunk_in_flight_so_unmapped_pages_are_free() {
    let mut d = setup();
    let len = MAX_XFER;
    let src = d.map_new(DOM, SRC, u64::from(len), PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, u64::from(len), PAGE_4K, RW);
    d.bus.fill(src, u64::from(len), 0x3c);
    let t = d.submit(Q, Desc::copy(SRC, DST, len));
    poll("the copy to start", || {
        (d.bus.read_u8(dst) == 0x3c).then_some(())
    });
    // Unmap the whole destination (its level-2 entries), invalidate, then the old pages
    // belong to the driver again: the device must not write them any more.
    for i in 0..u64::from(len) / PAGE_2M {
        d.set_pte(DOM, DST + i * PAGE_2M, 2, 0);
    }
    assert_eq!(d.invalidate_range(DOM, DST, u64::from(len)), 0);
    let snapshot = d.bus.read(dst, len as usize);
    let c = d.wait(&t);
    let done = u64::from(c.bytes);
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_NOT_PRESENT,
        ACCESS_WRITE,
        DST + done,
        c.bytes,
    );
    assert!(
        done > 0 && done < u64::from(len) && done % 4096 == 0,
        "bytes {done:#x}"
    );
    assert!(
        d.bus.read(dst, len as usize) == snapshot,
        "written after the invalidation"
    );
    assert!(d.bus.read(dst, done as usize).iter().all(|&b| b == 0x3c));
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_NOT_PRESENT,
        ACCESS_WRITE,
        DOM,
        Q,
        DST + done,
        0,
    );
    assert_eq!(r[0].level, 2);
    d.bus.check_canaries();
}

#[test]
fn invalidate_range_of_4k_inside_a_1g_entry_drops_it() {
    let mut d = setup();
    d.map(DOM, HUGE, RAM_BASE, PAGE_1G, PAGE_1G, RW);
    let buf = d.bus.alloc_guarded(64, PAGE_4K);
    let iova = HUGE + (buf - RAM_BASE);
    assert_ok(&d.run(Q, Desc::fill(iova, 8, 1)), 8);
    // Read-only now; the cached read-write entry is still used until invalidated.
    d.set_pte(DOM, HUGE, 3, RAM_BASE | PTE_R | PTE_PS);
    assert_ok(&d.run(Q, Desc::fill(iova, 8, 2)), 8);
    assert_eq!(d.bus.read_u64(buf), 2);
    assert_eq!(d.invalidate_range(DOM, HUGE + PAGE_1G, 4096), 0);
    assert_ok(&d.run(Q, Desc::fill(iova, 8, 3)), 8);
    // 4 KiB far from the buffer, inside the same 1 GiB page.
    assert_eq!(d.invalidate_range(DOM, HUGE + 0x2345_6000, 4096), 0);
    let c = d.run(Q, Desc::fill(iova, 8, 4));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_PERMISSION,
        ACCESS_WRITE,
        iova,
        0,
    );
    assert_eq!(d.bus.read_u64(buf), 3);
    d.bus.check_canaries();
}

#[test]
fn register_access_widths_8_byte_pairs_and_ignored_odd_accesses() {
    let mut d = Driver::new();
    let read = |d: &mut Driver, off: u64, n: usize| {
        let mut b = vec![0u8; n];
        d.dev.bar_read(REGS_BAR, off, &mut b);
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&b);
        u64::from_le_bytes(v)
    };
    // An 8-byte write covers two registers, low first; an 8-byte read returns both.
    let root = 0x0000_1234_5678_9000u64;
    d.dev
        .bar_write(REGS_BAR, domain_reg(2, D_ROOT_LO), &root.to_le_bytes());
    assert_eq!(d.dread(2, D_ROOT_LO), 0x5678_9000);
    assert_eq!(d.dread(2, D_ROOT_HI), 0x1234);
    assert_eq!(read(&mut d, domain_reg(2, D_ROOT_LO), 8), root);
    // Byte and half-word reads of the magic: "DDMA" in memory order.
    let magic: Vec<u8> = (0..4).map(|i| read(&mut d, REG_ID + i, 1) as u8).collect();
    assert_eq!(magic, b"DDMA");
    assert_eq!(
        read(&mut d, REG_ID + 2, 2),
        u64::from(DEVICE_ID_MAGIC >> 16)
    );
    // Writes of 1 or 2 bytes, and misaligned accesses, are ignored; misaligned reads are 0.
    d.write(REG_SCRATCH, 0x1122_3344);
    d.dev.bar_write(REGS_BAR, REG_SCRATCH, &[0xff]);
    d.dev.bar_write(REGS_BAR, REG_SCRATCH, &[0xff, 0xff]);
    d.dev.bar_write(REGS_BAR, REG_SCRATCH + 1, &[0xff; 4]);
    d.dev.bar_write(REGS_BAR, REG_SCRATCH, &[0xff; 8]); // 0x14 is not 8-byte aligned
    assert_eq!(d.read(REG_SCRATCH), 0x1122_3344);
    assert_eq!(read(&mut d, REG_ID + 1, 4), 0);
    assert_eq!(read(&mut d, REG_ID + 2, 4), 0);
    assert_eq!(
        read(&mut d, REG_SCRATCH, 8),
        0,
        "8-byte read at a 4-byte boundary"
    );
    // Unimplemented offsets read 0 and ignore writes; the BAR ends at REGS_BAR_SIZE.
    d.write(0x0f00, 0xffff_ffff);
    assert_eq!(d.read(0x0f00), 0);
    assert_eq!(read(&mut d, REGS_BAR_SIZE - 2, 4), 0);
    // Registers of queues and domains beyond the configured counts read 0.
    assert_eq!(d.qread(DEFAULT_QUEUES, Q_MSIX_VECTOR), 0);
    d.dwrite(DEFAULT_DOMAINS, D_CTRL, DOMAIN_MODE_TRANSLATED);
    assert_eq!(d.dread(DEFAULT_DOMAINS, D_CTRL), 0);
}

#[test]
fn vmm_read_only_memory_is_readable_and_never_written() {
    let mut d = setup();
    d.enable_fault_log(16);
    let data = pattern(30, RO_SIZE as usize);
    d.bus.write(RO_BASE, &data);
    // A level-1 table in the read-only region (walks only read tables) for LARGE.
    let ram_page = d.bus.alloc_guarded(4096, PAGE_4K);
    let page_data = pattern(31, 4096);
    d.bus.write(ram_page, &page_data);
    let l1 = RO_BASE + 0xc000;
    d.bus.write(l1, &[0; 4096]);
    d.bus.write_u64(l1, ram_page | PTE_R);
    d.set_pte(DOM, LARGE, 2, l1 | RW);
    let before = d.bus.read(RO_BASE, RO_SIZE as usize);

    // Pass-through: reads work, writes fault OUTSIDE_RAM.
    d.setup_queue(1, 0, 8);
    let dst = d.bus.alloc_guarded(4096, PAGE_4K);
    assert_ok(&d.run(1, Desc::copy(RO_BASE + 4096, dst, 4096)), 4096);
    assert_eq!(d.bus.read(dst, 4096), data[4096..8192]);
    let c = d.run(1, Desc::fill(RO_BASE + 64, 8, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        RO_BASE + 64,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        0,
        1,
        RO_BASE + 64,
        0,
    );
    assert_eq!((r[0].info, r[0].level), (RO_BASE + 64, 0));
    // A completion record there cannot be written: no record, an error, a fault.
    d.submit(1, Desc::nop().cpl(Cpl::At(RO_BASE + 0x100)));
    d.wait_idle(1);
    let r = d.wait_faults(1);
    assert_rec(
        &r[0],
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE | ACCESS_COMPLETION,
        0,
        1,
        RO_BASE + 0x100,
        1,
    );
    eventually_eq("Q_ERRORS", 2, || d.qread(1, Q_ERRORS));

    // Translated: a read-write leaf on a read-only bus page still cannot be written.
    d.map(DOM, SRC, RO_BASE + 8192, 4096, PAGE_4K, RW);
    let tdst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    assert_ok(&d.run(Q, Desc::copy(SRC + 8, DST, 100)), 100);
    assert_eq!(d.bus.read(tdst, 100), data[8192 + 8..8192 + 108]);
    let c = d.run(Q, Desc::copy(DST, SRC + 8, 100));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        SRC + 8,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(&r[0], FAULT_OUTSIDE_RAM, ACCESS_WRITE, DOM, Q, SRC + 8, 2);
    assert_eq!((r[0].info, r[0].level), (RO_BASE + 8192 + 8, 0));
    // The table in read-only memory is walked.
    let c = d.run(Q, Desc::crc32c(LARGE, 4096));
    assert_ok(&c, 4096);
    assert_eq!(c.result, u64::from(crc32c(&page_data)));

    // A fault log in read-only memory: rejected at enable or failing at the first record.
    d.write(REG_FLOG_CTRL, 0);
    d.write(REG_FLOG_BASE_LO, RO_BASE as u32);
    d.write(REG_FLOG_BASE_HI, (RO_BASE >> 32) as u32);
    d.write(REG_FLOG_SIZE, 8);
    d.write(REG_FLOG_CTRL, FLOG_CTRL_ENABLE);
    let dropped = d.read(REG_FLOG_DROPPED);
    let c = d.run(Q, Desc::crc32c(SRC + 0x10_0000, 4));
    assert_eq!(c.fault_reason, FAULT_NOT_PRESENT);
    eventually_eq("REG_FLOG_DROPPED", dropped + 1, || d.read(REG_FLOG_DROPPED));
    assert_ne!(d.read(REG_FLOG_STATUS) & FLOG_STATUS_ERROR, 0);

    assert!(
        d.bus.read(RO_BASE, RO_SIZE as usize) == before,
        "read-only memory changed"
    );
    d.bus.check_canaries();
}

#[test]
fn pass_through_dma_outside_bus_memory_faults_outside_ram() {
    let mut d = Driver::new();
    d.enable_fault_log(16);
    d.setup_queue(Q, 0, 8);
    let c = d.run(Q, Desc::fill(OUTSIDE, 64, 0));
    assert_cpl(
        &c,
        STATUS_DMA_ERROR,
        FAULT_OUTSIDE_RAM,
        ACCESS_WRITE,
        OUTSIDE,
        0,
    );
    let r = d.wait_faults(1);
    assert_rec(&r[0], FAULT_OUTSIDE_RAM, ACCESS_WRITE, 0, Q, OUTSIDE, 0);
    assert_eq!((r[0].info, r[0].level), (OUTSIDE, 0));
    // A source that runs off the end of bus memory: nothing beyond it is read, and only
    // whole chunks before it are reported.
    let src = RAM_END - 4096;
    let data = pattern(32, 4096);
    d.bus.write(src, &data);
    let dst = d.bus.alloc_guarded(8192, PAGE_4K);
    let c = d.run(Q, Desc::copy(src, dst, 8192));
    assert_eq!(
        (c.status, c.fault_reason, c.fault_access, c.fault_addr),
        (STATUS_DMA_ERROR, FAULT_OUTSIDE_RAM, 0, RAM_END),
        "{c:x?}"
    );
    assert!(c.bytes == 0 || c.bytes == 4096, "{c:x?}");
    let got = d.bus.read(dst, 8192);
    assert_eq!(got[..c.bytes as usize], data[..c.bytes as usize]);
    assert!(
        got[c.bytes as usize..].iter().all(|&b| b == 0),
        "nothing after the fault"
    );
    let r = d.wait_faults(1);
    assert_eq!(
        (r[0].reason, r[0].info, r[0].iova),
        (FAULT_OUTSIDE_RAM, RAM_END, RAM_END)
    );
    d.bus.check_canaries();
}

// ---- BATCH ----
