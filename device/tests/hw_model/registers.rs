//! Registers beyond what a driver sees through a back end: configurations other than the default, access widths, the statistics snapshot, a function-level reset during a transfer, the coalescing timer.

use super::*;

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
