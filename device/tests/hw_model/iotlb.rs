//! IOTLB internals: exact hit, miss and walk counts, LRU eviction at 4 entries, and what a domain change or an invalidation does to a transfer in flight.

use super::*;

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

/// A COPY of `len` bytes of `fill` from SRC to DST (4 KiB pages in DOM), submitted and
/// seen moving; returns the destination's bus address and the ticket.
fn copy_in_flight(d: &mut Driver, len: u32, fill: u8) -> (u64, Ticket) {
    let src = d.map_new(DOM, SRC, u64::from(len), PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, u64::from(len), PAGE_4K, RW);
    d.bus.fill(src, u64::from(len), fill);
    let t = d.submit(Q, Desc::copy(SRC, DST, len));
    poll("the copy to start", || {
        (d.bus.read_u8(dst) == fill).then_some(())
    });
    (dst, t)
}

#[test]
fn domain_disabled_mid_transfer_is_in_effect_when_the_invalidation_returns() {
    let mut d = setup();
    let len = MAX_XFER;
    let (dst, _t) = copy_in_flight(&mut d, len, 0x5a);
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
    let (dst, t) = copy_in_flight(&mut d, len, 0x3c);
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
