//! Conformance: IOTLB invalidation (all, domain, range), stale use, strict mode, and
//! the deterministic set index and LRU replacement of SPEC.md "IOTLB".

use std::collections::BTreeMap;

use domdma_driver_model::domain::{invalidate, write_domain};
use domdma_driver_model::iopt::IoPageTable;

use super::domains::{alloc_in_1g_window, huge_page, GIB};
use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Iotlb,
        name: "invalidation",
        needs: &[],
        run: invalidation,
    },
    Scenario {
        area: Area::Iotlb,
        name: "stale_translation_used_without_invalidation",
        needs: &[Need::Domains(2)],
        run: stale_translation_used_without_invalidation,
    },
    Scenario {
        area: Area::Iotlb,
        name: "invalidate_all_drops_the_stale_translation",
        needs: &[Need::Domains(2)],
        run: invalidate_all_drops_the_stale_translation,
    },
    Scenario {
        area: Area::Iotlb,
        name: "invalidate_domain_drops_only_that_domains_entries",
        needs: &[Need::IotlbAtLeast(8), Need::Domains(3), Need::Queues(2)],
        run: invalidate_domain_drops_only_that_domains_entries,
    },
    Scenario {
        area: Area::Iotlb,
        name: "invalidate_range_drops_overlapping_pages_only",
        needs: &[Need::Domains(3)],
        run: invalidate_range_drops_overlapping_pages_only,
    },
    Scenario {
        area: Area::Iotlb,
        name: "range_invalidation_inside_a_2m_entry_drops_it",
        needs: &[Need::HugePages(2), Need::Domains(2)],
        run: range_invalidation_inside_a_2m_entry_drops_it,
    },
    Scenario {
        area: Area::Iotlb,
        name: "range_invalidation_inside_a_1g_entry_drops_it",
        needs: &[Need::Domains(2)],
        run: range_invalidation_inside_a_1g_entry_drops_it,
    },
    Scenario {
        area: Area::Iotlb,
        name: "new_root_is_used_after_a_domain_invalidation",
        needs: &[Need::Domains(2)],
        run: new_root_is_used_after_a_domain_invalidation,
    },
    Scenario {
        area: Area::Iotlb,
        name: "invalidation_errors_leave_inv_seq_unchanged",
        needs: &[Need::Domains(2)],
        run: invalidation_errors_leave_inv_seq_unchanged,
    },
    Scenario {
        area: Area::Iotlb,
        name: "strict_mode_counts_stale_uses_and_uses_the_cached_translation",
        needs: &[Need::StrictIotlb, Need::Domains(2)],
        run: strict_mode_counts_stale_uses_and_uses_the_cached_translation,
    },
    Scenario {
        area: Area::Iotlb,
        name: "omitted_invalidation_is_counted_as_a_stale_use",
        needs: &[Need::IotlbAtLeast(8), Need::StrictIotlb, Need::Domains(2)],
        run: omitted_invalidation_is_counted_as_a_stale_use,
    },
    Scenario {
        area: Area::Iotlb,
        name: "eviction_follows_the_set_index_and_lru",
        needs: &[Need::IotlbAtMost(8), Need::Domains(2)],
        run: eviction_follows_the_set_index_and_lru,
    },
];

/// IOTLB invalidation: after a page-table change without invalidation the device keeps
/// using the cached translation (stale), after a range, domain or global invalidation it
/// uses the new one; an unmap with invalidation makes the IOVA fault; bad commands are
/// rejected with INV_STATUS_ERROR.
fn invalidation(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut t = Translated::new(dev, 1, 0)?;
    let caps = t.caps;
    let a = dev.alloc_dma(DmaRequest::new(4096))?;
    let b = dev.alloc_dma(DmaRequest::new(4096))?;
    const SENTINEL: u8 = 0x11;
    a.fill(0, 4096, SENTINEL);
    b.fill(0, 4096, SENTINEL);
    let x = t.io.data;
    let page = 4096u64;
    // X -> `to` in the table, without invalidation.
    let remap = |dom: &mut Domain<'_>, to: u64| -> TestResult {
        dom.table_mut().unmap(x, page)?;
        dom.table_mut()
            .map(x, to, page, Perm::RW, PageSize::Size4K)?;
        Ok(())
    };
    // A FILL of X with `byte` (tag `i`); then a and b must hold `want`.
    let fill = |t: &mut Translated<'_>, i: u64, byte: u8, want: (u8, u8), what: &str| {
        let d = Descriptor::fill(x, u64::from_ne_bytes([byte; 8]), 4096).with_tag(i);
        t.q.run_ok(d, &format!("FILL {what}"))?;
        check_all(&a.to_vec(0, 4096), want.0, format!("a {what}"))?;
        check_all(&b.to_vec(0, 4096), want.1, format!("b {what}"))
    };

    // 1. X -> a: the FILL lands in a and caches the translation.
    t.dom
        .map(x, a.bus_addr(), page, Perm::RW, PageSize::Size4K)?;
    fill(&mut t, 0, 0x21, (0x21, SENTINEL), "through X -> a")?;

    // 2. X -> b in the table, no invalidation: the device still writes a.
    remap(&mut t.dom, b.bus_addr())?;
    let stale0 = dstat(dev, 1, spec::DSTAT_STALE_USES)?;
    let what = "with a stale translation (X -> b not yet seen)";
    fill(&mut t, 1, 0x22, (0x22, SENTINEL), what)?;
    let stale = dstat(dev, 1, spec::DSTAT_STALE_USES)? - stale0;
    if caps.strict_iotlb {
        check!(stale >= 1, "strict mode counted no stale use");
    } else {
        check_eq!(stale, 0, "stale uses counted outside strict mode");
    }

    // 3. Range invalidation: now b.
    let seq0 = dev.read32(spec::REG_INV_SEQ)?;
    t.dom.invalidate_range(x, page)?;
    check_eq!(
        dev.read32(spec::REG_INV_SEQ)?,
        seq0.wrapping_add(1),
        "REG_INV_SEQ after one invalidation"
    );
    check_eq!(
        dev.read32(spec::REG_INV_STATUS)? & (spec::INV_STATUS_BUSY | spec::INV_STATUS_ERROR),
        0,
        "REG_INV_STATUS after a range invalidation"
    );
    fill(
        &mut t,
        2,
        0x23,
        (0x22, 0x23),
        "after the range invalidation",
    )?;

    // 4. Domain invalidation: back to a.
    remap(&mut t.dom, a.bus_addr())?;
    t.dom.invalidate()?;
    fill(
        &mut t,
        3,
        0x24,
        (0x24, 0x23),
        "after the domain invalidation",
    )?;

    // 5. Global invalidation: b again.
    remap(&mut t.dom, b.bus_addr())?;
    invalidate(dev, Invalidation::All, COMPLETION_TIMEOUT)?;
    fill(
        &mut t,
        4,
        0x25,
        (0x24, 0x25),
        "after the global invalidation",
    )?;

    // 6. Unmap with invalidation: X faults, nothing is written.
    t.dom.unmap(x, page)?;
    t.q.run_fault(
        Descriptor::fill(x, u64::from_ne_bytes([0x26; 8]), 4096).with_tag(5),
        (spec::FAULT_NOT_PRESENT, x, true),
        "FILL after unmap + invalidation",
    )?;
    check_all(&a.to_vec(0, 4096), 0x24, "a after the unmap")?;
    check_all(&b.to_vec(0, 4096), 0x25, "b after the unmap")?;

    // 7. Bad commands are rejected, and a good one clears the error.
    let seq1 = dev.read32(spec::REG_INV_SEQ)?;
    for bad in [
        Invalidation::Range {
            domain: 1,
            iova: x,
            len: 0,
        },
        Invalidation::Domain(caps.domains),
    ] {
        match invalidate(dev, bad, COMPLETION_TIMEOUT) {
            Err(DomainError::InvalidationRejected { .. }) => {}
            other => {
                return Err(Failure(format!(
                    "invalidation {bad:?}: {other:?}, expected INV_STATUS_ERROR"
                )))
            }
        }
    }
    dev.write32(spec::REG_INV_CMD, 0x7f)?;
    check!(
        dev.read32(spec::REG_INV_STATUS)? & spec::INV_STATUS_ERROR != 0,
        "unknown command 0x7f not rejected"
    );
    check_eq!(
        dev.read32(spec::REG_INV_SEQ)?,
        seq1,
        "REG_INV_SEQ after rejected commands"
    );
    t.dom.invalidate()?;
    check_eq!(
        dev.read32(spec::REG_INV_STATUS)? & spec::INV_STATUS_ERROR,
        0,
        "INV_STATUS_ERROR after a good command"
    );
    t.q.disable()?;
    Ok(())
}

/// Without an invalidation the device keeps using a cached translation: IOVA X remapped
/// from page A to page B in the table, or even made not present, still reads page A
/// (no fault; `DSTAT_STALE_USES` counts each such use in strict mode only). A range
/// invalidation of X then makes the unmapped X fault NOT_PRESENT, writing nothing.
fn stale_translation_used_without_invalidation(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut s = Stale::new(ctx, dev, 1, 0, PageSize::Size4K, &[])?;
    let strict = s.t.caps.strict_iotlb;
    let faults0 = dev.read32(spec::REG_FLOG_COUNT)?;
    let stale0 = s.stale_uses()?;
    s.remap_to_b()?;
    s.expect(Seen::A, "X remapped to B without invalidation")?;
    s.expect(Seen::A, "X remapped to B without invalidation, second COPY")?;
    s.set_leaf(0)?;
    s.expect(Seen::A, "X made not present without invalidation")?;
    check_eq!(
        dev.read32(spec::REG_FLOG_COUNT)?,
        faults0,
        "REG_FLOG_COUNT (a stale use is not a fault)"
    );
    check_eq!(
        s.stale_uses()? - stale0,
        if strict { 3 } else { 0 },
        "DSTAT_STALE_USES after three stale uses (strict mode: {strict})"
    );
    s.t.dom.invalidate_range(s.x, PAGE as u64)?;
    let (c, before) = s.copy()?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        s.x,
        false,
        "COPY from X after the range invalidation",
    )?;
    check_bytes(&s.dst.read(), &before, "destination of the faulting COPY")?;
    s.dst.check_guards("destination")
}

/// INV_CMD_ALL drops a stale translation (the next COPY reads the table's page B) and
/// advances `REG_INV_SEQ` by exactly one, with `INV_STATUS` clear.
fn invalidate_all_drops_the_stale_translation(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut s = Stale::new(ctx, dev, 1, 0, PageSize::Size4K, &[])?;
    s.remap_to_b()?;
    s.expect(Seen::A, "X remapped to B without invalidation")?;
    let seq0 = dev.read32(spec::REG_INV_SEQ)?;
    let seq = invalidate(dev, Invalidation::All, COMPLETION_TIMEOUT)?;
    check_eq!(seq, seq0.wrapping_add(1), "REG_INV_SEQ after INV_CMD_ALL");
    check_eq!(
        dev.read32(spec::REG_INV_STATUS)? & (spec::INV_STATUS_BUSY | spec::INV_STATUS_ERROR),
        0,
        "REG_INV_STATUS after INV_CMD_ALL"
    );
    s.expect(Seen::B, "after INV_CMD_ALL")
}

/// INV_CMD_DOMAIN drops the entries of its domain only: domains 1 and 2 each cache X ->
/// A (their own pages, same IOVA) and then map X to B without invalidation; invalidating
/// domain 0 changes neither, invalidating domain 1 makes domain 1 read its B while domain 2
/// still reads its stale A, until domain 2 is invalidated too.
fn invalidate_domain_drops_only_that_domains_entries(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut s1 = Stale::new(ctx, dev, 1, 0, PageSize::Size4K, &[])?;
    let mut s2 = Stale::new(ctx, dev, 2, 1, PageSize::Size4K, &s1.keys())?;
    s1.remap_to_b()?;
    s2.remap_to_b()?;
    invalidate(dev, Invalidation::Domain(0), COMPLETION_TIMEOUT)?;
    s1.expect(Seen::A, "domain 1 after invalidating domain 0")?;
    s2.expect(Seen::A, "domain 2 after invalidating domain 0")?;
    s1.t.dom.invalidate()?;
    s1.expect(Seen::B, "domain 1 after invalidating domain 1")?;
    s2.expect(Seen::A, "domain 2 after invalidating domain 1")?;
    s2.t.dom.invalidate()?;
    s2.expect(Seen::B, "domain 2 after invalidating domain 2")?;
    s1.expect(Seen::B, "domain 1 at the end")
}

/// INV_CMD_RANGE drops the cached pages that overlap the range, and only those: ranges
/// ending right before X's page, starting right after it, the pages before and after it,
/// and X's page in another domain all leave the stale X -> A (and each counts in
/// `REG_INV_SEQ`); two bytes overlapping X's last byte drop it.
fn invalidate_range_drops_overlapping_pages_only(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut s = Stale::new(ctx, dev, 1, 0, PageSize::Size4K, &[])?;
    s.remap_to_b()?;
    let (x, p) = (s.x, PAGE as u64);
    let seq0 = dev.read32(spec::REG_INV_SEQ)?;
    let misses = [
        ("the next page", 1, x + p, p),
        ("the previous page", 1, x - p, p),
        ("the byte before X's page", 1, x - 1, 1),
        ("the byte after X's page", 1, x + p, 1),
        ("X's page in domain 2", 2, x, p),
    ];
    for (what, domain, iova, len) in misses {
        invalidate(
            dev,
            Invalidation::Range { domain, iova, len },
            COMPLETION_TIMEOUT,
        )?;
        s.expect(Seen::A, &format!("after invalidating {what}"))?;
    }
    check_eq!(
        dev.read32(spec::REG_INV_SEQ)?,
        seq0.wrapping_add(misses.len() as u32),
        "REG_INV_SEQ after {} range invalidations",
        misses.len()
    );
    s.t.dom.invalidate_range(x + p - 1, 2)?;
    s.expect(
        Seen::B,
        "after invalidating 2 bytes overlapping X's last byte",
    )
}

/// A cached 2 MiB translation goes when any 4 KiB inside its page is invalidated: the
/// 2 MiB leaf X -> A remapped to B without invalidation stays stale after invalidating
/// the next 2 MiB and the 4 KiB before it, and is dropped by invalidating the last 4 KiB
/// of the 2 MiB page (far from the offset the COPY reads).
fn range_invalidation_inside_a_2m_entry_drops_it(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut s = Stale::new(ctx, dev, 1, 0, PageSize::Size2M, &[])?;
    check_eq!(
        raw_entry(&s.t.dom, s.x, 2)?,
        s.a.bus_addr() | spec::PTE_R | spec::PTE_W | spec::PTE_PS,
        "X's level-2 leaf"
    );
    s.remap_to_b()?;
    s.expect(Seen::A, "the 2 MiB leaf remapped to B without invalidation")?;
    let (x, two_m, p) = (s.x, PAGE_SIZE_2M as u64, PAGE as u64);
    for (what, iova) in [
        ("the next 2 MiB", x + two_m),
        ("the 4 KiB before the 2 MiB page", x - p),
    ] {
        s.t.dom.invalidate_range(iova, p)?;
        s.expect(Seen::A, &format!("after invalidating {what}"))?;
    }
    s.t.dom.invalidate_range(x + two_m - p, p)?;
    s.expect(
        Seen::B,
        "after invalidating the last 4 KiB inside the 2 MiB page",
    )
}

/// A cached 1 GiB translation goes when any 4 KiB inside its page is invalidated: a
/// read-write 1 GiB leaf made read-only in the table keeps accepting writes (the cached
/// entry) after invalidating 4 KiB outside the page, and refuses them (PERMISSION,
/// nothing written) once 4 KiB inside it, away from the buffer, is invalidated; reading
/// still works.
fn range_invalidation_inside_a_1g_entry_drops_it(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    need_page_size(&t.caps, PageSize::Size1G)?;
    let (io, p) = (t.io, PAGE as u64);
    let (mem, win) = alloc_in_1g_window(dev, &t.caps, &io, PAGE)?;
    t.dom
        .map(win.iova, win.bus, GIB, Perm::RW, PageSize::Size1G)?;
    check_fits(
        &t.caps,
        &[
            (1, io.ring, PageSize::Size4K),
            (1, io.cpl, PageSize::Size4K),
            (1, win.iova, PageSize::Size1G),
        ],
    )?;
    let iova = win.iova_of(mem.bus());
    let mut rng = ctx.rng();
    let mut fill =
        |t: &mut Translated<'_>, what: &str| -> Result<(CompletionRecord, u64), Failure> {
            let pattern = rng.next_u64();
            let c =
                t.q.run(Descriptor::fill(iova, pattern, PAGE as u32))
                    .map_err(|Failure(m)| Failure(format!("{what}: {m}")))?;
            Ok((c, pattern))
        };

    let (c, p1) = fill(&mut t, "FILL through the read-write 1 GiB leaf")?;
    check_status(
        &c,
        spec::STATUS_OK,
        "FILL through the read-write 1 GiB leaf",
    )?;
    check_bytes(
        &mem.read(),
        &pattern_bytes(p1, PAGE),
        "buffer after the first FILL",
    )?;
    t.dom
        .table_mut()
        .write_raw(win.iova, 3, win.bus | spec::PTE_R | spec::PTE_PS);
    let (c, p2) = fill(&mut t, "FILL after making the leaf read-only")?;
    check_status(
        &c,
        spec::STATUS_OK,
        "FILL after making the leaf read-only, not invalidated (cached read-write entry)",
    )?;
    check_bytes(
        &mem.read(),
        &pattern_bytes(p2, PAGE),
        "buffer after the stale FILL",
    )?;
    let outside = if win.iova + GIB < t.caps.iova_limit() {
        win.iova + GIB
    } else {
        win.iova - p
    };
    t.dom.invalidate_range(outside, p)?;
    let (c, p3) = fill(&mut t, "FILL after invalidating 4 KiB outside the page")?;
    check_status(
        &c,
        spec::STATUS_OK,
        "FILL after invalidating 4 KiB outside the 1 GiB page",
    )?;
    let want = pattern_bytes(p3, PAGE);
    check_bytes(&mem.read(), &want, "buffer after the third FILL")?;
    // 4 KiB inside the 1 GiB page that is not the buffer's.
    let last = win.iova + GIB - p;
    let inside = if last == iova { win.iova } else { last };
    t.dom.invalidate_range(inside, p)?;
    let (c, _) = fill(&mut t, "FILL after invalidating 4 KiB inside the page")?;
    check_fault(
        &c,
        spec::FAULT_PERMISSION,
        iova,
        true,
        "FILL after invalidating 4 KiB inside the now read-only 1 GiB page",
    )?;
    check_eq!(c.bytes, 0, "bytes of the refused FILL");
    check_bytes(&mem.read(), &want, "buffer after the refused FILL")?;
    let c = t.q.run(Descriptor::crc32c(iova, PAGE as u32))?;
    check_status(
        &c,
        spec::STATUS_OK,
        "CRC32C through the read-only 1 GiB leaf",
    )?;
    check_eq!(c.result, u64::from(crc32c(&want)), "CRC32C of the buffer");
    mem.check_guards("buffer in the 1 GiB page")
}

/// A new root (`D_ROOT`) reaches the device only with a domain invalidation: switched to
/// a second table that maps X to page B (and ring, records and destination as before),
/// the domain keeps reading the cached A until it is invalidated, then reads B; back to
/// the first table and invalidated, A again.
fn new_root_is_used_after_a_domain_invalidation(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut s = Stale::new(ctx, dev, 1, 0, PageSize::Size4K, &[])?;
    let io = s.t.io;
    let p = PAGE as u64;
    let mut pt2 = IoPageTable::new(dev, s.t.caps.iova_width)?;
    pt2.map(io.ring, s.t.q.ring_bus_addr(), p, Perm::R, PageSize::Size4K)?;
    let cpl = s.t.q.records().buffer();
    pt2.map(
        io.cpl,
        cpl.bus_addr(),
        (cpl.len() as u64).next_multiple_of(p),
        Perm::RW,
        PageSize::Size4K,
    )?;
    pt2.map(s.dst_iova, s.dst.bus(), p, Perm::RW, PageSize::Size4K)?;
    pt2.map(s.x, s.b.bus_addr(), p, Perm::RW, PageSize::Size4K)?;
    let old = read_domain(dev, 1)?;
    check_eq!(old.root, s.t.dom.table().root(), "D_ROOT of domain 1");
    let new = DomainRegs {
        root: pt2.root(),
        mode: spec::DOMAIN_MODE_TRANSLATED,
    };
    write_domain(dev, 1, new)?;
    check_eq!(
        read_domain(dev, 1)?,
        new,
        "domain 1's registers after the write"
    );
    s.expect(
        Seen::A,
        "new root, not invalidated (the old table's cached translation)",
    )?;
    s.t.dom.invalidate()?;
    s.expect(Seen::B, "new root after the domain invalidation")?;
    write_domain(dev, 1, old)?;
    s.t.dom.invalidate()?;
    s.expect(
        Seen::A,
        "the first root again, after the domain invalidation",
    )
}

/// Rejected invalidations set `INV_STATUS_ERROR` and leave `REG_INV_SEQ` alone: unknown
/// commands (7 and 0), a domain the device lacks (domain and range commands), a range of
/// length 0, a domain beyond 16 bits (not truncated). `REG_INV_CMD` reads 0. Good commands
/// clear the error and count one each: a range whose length is only in `REG_INV_LEN_HI`
/// (2^32 bytes: both halves are used), the last domain, INV_CMD_ALL.
fn invalidation_errors_leave_inv_seq_unchanged(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let io = Iovas::for_device(&caps);
    let p = PAGE as u64;
    let seq0 = dev.read32(spec::REG_INV_SEQ)?;
    let bad = [
        ("unknown command 7", 1, io.src, p, 7),
        ("command 0", 1, io.src, p, 0),
        (
            "INV_CMD_DOMAIN of a domain the device lacks",
            caps.domains,
            0,
            0,
            spec::INV_CMD_DOMAIN,
        ),
        (
            "INV_CMD_RANGE in a domain the device lacks",
            caps.domains,
            io.src,
            p,
            spec::INV_CMD_RANGE,
        ),
        (
            "INV_CMD_RANGE of length 0",
            1,
            io.src,
            0,
            spec::INV_CMD_RANGE,
        ),
        (
            "INV_CMD_RANGE in domain 0x1_0001 (beyond 16 bits)",
            0x1_0001,
            io.src,
            p,
            spec::INV_CMD_RANGE,
        ),
        (
            "INV_CMD_DOMAIN of domain 0x1_0001 (beyond 16 bits)",
            0x1_0001,
            0,
            0,
            spec::INV_CMD_DOMAIN,
        ),
    ];
    for (what, domain, addr, len, cmd) in bad {
        let status = raw_invalidate(dev, domain, addr, len, cmd)?;
        check_eq!(
            status & (spec::INV_STATUS_ERROR | spec::INV_STATUS_BUSY),
            spec::INV_STATUS_ERROR,
            "{what}: REG_INV_STATUS"
        );
        check_eq!(
            dev.read32(spec::REG_INV_SEQ)?,
            seq0,
            "{what}: REG_INV_SEQ (a rejected command does not count)"
        );
    }
    check_eq!(
        dev.read32(spec::REG_INV_CMD)?,
        0,
        "REG_INV_CMD (write-only)"
    );
    let good = [
        (
            "INV_CMD_RANGE of 2^32 bytes (REG_INV_LEN_LO 0)",
            1,
            io.src,
            1u64 << 32,
            spec::INV_CMD_RANGE,
        ),
        (
            "INV_CMD_DOMAIN of the last domain",
            caps.domains - 1,
            0,
            0,
            spec::INV_CMD_DOMAIN,
        ),
        ("INV_CMD_ALL", 0, 0, 0, spec::INV_CMD_ALL),
    ];
    for (i, (what, domain, addr, len, cmd)) in good.into_iter().enumerate() {
        let status = raw_invalidate(dev, domain, addr, len, cmd)?;
        check_eq!(status, 0, "{what}: REG_INV_STATUS");
        check_eq!(
            dev.read32(spec::REG_INV_SEQ)?,
            seq0.wrapping_add(i as u32 + 1),
            "{what}: REG_INV_SEQ"
        );
    }
    Ok(())
}

/// Strict mode (`--strict-iotlb`): every hit also re-walks the table
/// (`DSTAT_PAGE_WALKS` = hits + misses); a use whose walk disagrees with the cached
/// translation — a different page, different permissions (the leaf made write-only), or
/// a fault (the leaf made not present) — counts one `DSTAT_STALE_USES` and still uses the
/// cached translation (page A is read, no fault); an unchanged table is not stale, and
/// after an invalidation nothing is.
fn strict_mode_counts_stale_uses_and_uses_the_cached_translation(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    check!(
        dev.read32(spec::REG_DEV_STATUS)? & spec::DEV_STATUS_STRICT_IOTLB != 0,
        "DEV_STATUS_STRICT_IOTLB clear on a strict device"
    );
    let mut s = Stale::new(ctx, dev, 1, 0, PageSize::Size4K, &[])?;
    let faults0 = dev.read32(spec::REG_FLOG_COUNT)?;
    s.expect(Seen::A, "table unchanged")?;
    check_eq!(
        s.stale_uses()?,
        0,
        "DSTAT_STALE_USES with the table unchanged"
    );
    s.remap_to_b()?;
    s.expect(Seen::A, "X remapped to B without invalidation")?;
    check_eq!(
        s.stale_uses()?,
        1,
        "DSTAT_STALE_USES after a use of a remapped page"
    );
    let b = s.b.bus_addr();
    s.set_leaf(b | spec::PTE_W)?;
    s.expect(Seen::A, "X's leaf made write-only without invalidation")?;
    check_eq!(
        s.stale_uses()?,
        2,
        "DSTAT_STALE_USES after a use whose permissions changed"
    );
    s.set_leaf(0)?;
    s.expect(Seen::A, "X made not present without invalidation")?;
    check_eq!(
        s.stale_uses()?,
        3,
        "DSTAT_STALE_USES after a use whose walk now faults"
    );
    check_eq!(
        dev.read32(spec::REG_FLOG_COUNT)?,
        faults0,
        "REG_FLOG_COUNT (a stale use is not a fault)"
    );
    check_eq!(dstat(dev, 1, spec::DSTAT_FAULTS)?, 0, "DSTAT_FAULTS");
    let hits = dstat(dev, 1, spec::DSTAT_IOTLB_HITS)?;
    let misses = dstat(dev, 1, spec::DSTAT_IOTLB_MISSES)?;
    let walks = dstat(dev, 1, spec::DSTAT_PAGE_WALKS)?;
    check!(hits > 0, "no IOTLB hits counted");
    check_eq!(
        walks,
        hits + misses,
        "DSTAT_PAGE_WALKS (every hit re-walks)"
    );
    s.remap_to_b()?;
    s.t.dom.invalidate()?;
    s.expect(Seen::B, "after the domain invalidation")?;
    s.expect(Seen::B, "after the domain invalidation, second COPY")?;
    check_eq!(
        s.stale_uses()?,
        3,
        "DSTAT_STALE_USES after the invalidation (nothing stale)"
    );
    Ok(())
}

/// The mistake strict mode exists to catch: a driver unmaps the middle page of a
/// three-page buffer and maps the IOVA to other memory without invalidating. The next
/// COPY of the run still reads the old middle page (the cached translation, inside a run
/// of contiguous pages), and strict mode counts exactly that one stale use. A one-byte
/// range invalidation of the page fixes it: the new page is read, nothing more is counted.
fn omitted_invalidation_is_counted_as_a_stale_use(ctx: &mut Ctx) -> TestResult {
    const RUN: usize = 3;
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let (io, p) = (t.io, PAGE as u64);
    // Where the IOTLB holds ring, records and both runs at once (first choice: odd first
    // pages, so that in a two-set IOTLB each run's pages alternate between the sets).
    let run_keys = |src: u64, dst: u64| {
        let mut keys = vec![
            (1, io.ring, PageSize::Size4K),
            (1, io.cpl, PageSize::Size4K),
        ];
        for i in 0..RUN as u64 {
            keys.push((1, src + i * p, PageSize::Size4K));
            keys.push((1, dst + i * p, PageSize::Size4K));
        }
        keys
    };
    let firsts = |base: u64| {
        (1..8)
            .chain(0..1)
            .map(move |k| base + k * p)
            .collect::<Vec<_>>()
    };
    let (src_iova, dst_iova) = fitting(&t.caps, &firsts(io.src), &firsts(io.dst), run_keys)?;
    let src = Guarded::new(dev, RUN * PAGE, PAGE)?;
    let dst = Guarded::new(dev, RUN * PAGE, PAGE)?;
    let other = Guarded::new(dev, PAGE, PAGE)?;
    t.dom.map(
        src_iova,
        src.bus(),
        (RUN * PAGE) as u64,
        Perm::R,
        PageSize::Size4K,
    )?;
    t.dom.map(
        dst_iova,
        dst.bus(),
        (RUN * PAGE) as u64,
        Perm::RW,
        PageSize::Size4K,
    )?;
    let mut rng = ctx.rng();
    let data = rng.unique(RUN * PAGE);
    let other_data = rng.unique(PAGE);
    src.write(0, &data);
    other.write(0, &other_data);
    let mut copy_run = |t: &mut Translated<'_>, want: &[u8], what: &str| -> TestResult {
        dst.write(0, &rng.unique(RUN * PAGE));
        let c =
            t.q.run(Descriptor::copy(src_iova, dst_iova, (RUN * PAGE) as u32))?;
        check_status(&c, spec::STATUS_OK, what)?;
        check_bytes(&dst.read(), want, format!("{what}: destination"))?;
        dst.check_guards(what)
    };

    copy_run(&mut t, &data, "COPY of the run (caches its pages)")?;
    let mid = src_iova + p;
    let stale0 = dstat(dev, 1, spec::DSTAT_STALE_USES)?;
    // The driver's mistake: unmap and reuse the IOVA, no invalidation in between.
    t.dom.table_mut().unmap(mid, p)?;
    t.dom
        .table_mut()
        .map(mid, other.bus(), p, Perm::R, PageSize::Size4K)?;
    copy_run(
        &mut t,
        &data,
        "COPY after the middle page was remapped without invalidation (the old page)",
    )?;
    check_eq!(
        dstat(dev, 1, spec::DSTAT_STALE_USES)? - stale0,
        1,
        "DSTAT_STALE_USES: the one stale use of the middle page"
    );
    t.dom.invalidate_range(mid, 1)?;
    let mut want = data.clone();
    want[PAGE..2 * PAGE].copy_from_slice(&other_data);
    copy_run(
        &mut t,
        &want,
        "COPY after the range invalidation (the new page)",
    )?;
    check_eq!(
        dstat(dev, 1, spec::DSTAT_STALE_USES)? - stale0,
        1,
        "DSTAT_STALE_USES after the invalidation"
    );
    check_bytes(&src.read(), &data, "source run")?;
    check_bytes(&other.read(), &other_data, "the other page")?;
    src.check_guards("source run")?;
    other.check_guards("the other page")
}

/// Eviction in a small IOTLB, as SPEC.md "IOTLB" defines it: with `E` entries there are
/// `S = ceil(E / 4)` sets, a 4 KiB entry of domain `d` lives in set
/// `(IOVA / 4 KiB + 97 * d) mod S`, a fill into a full set evicts its least recently used
/// entry, and a hit makes its entry the most recently used. P0 is a page cached and then
/// remapped in the table without invalidation, so where a FILL at P0 lands tells whether
/// it was still cached (old page; strict mode counts the stale use) or walked (new page).
/// The spec guarantees, and this checks:
///
/// 1. (two sets or more) after E newer pages, more than the IOTLB holds, all in sets other
///    than P0's, P0 is still cached;
/// 2. after as many newer pages in P0's own set as that set has ways, with no use of P0 in
///    between, P0 is gone: the next FILL walks and lands in the new page;
/// 3. (P0's set holding neither ring nor records) LRU, not first-in first-out: P0 cached
///    again and remapped back, `ways - 1` newer pages fill its set, a hit on P0 makes it
///    the most recently used, so one more new page evicts another entry and P0 stays.
fn eviction_follows_the_set_index_and_lru(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let (caps, io, p) = (t.caps, t.io, PAGE as u64);
    let e = caps.iotlb_entries;
    let sets = iotlb_sets(e);
    let set_of = |iova: u64| iotlb_set(e, 1, iova, PageSize::Size4K);
    let shared = [set_of(io.ring), set_of(io.cpl)];
    // P0 in a set without the ring and records, if there is one.
    let p0 = (0..sets)
        .map(|k| io.data + k * p)
        .find(|&v| !shared.contains(&set_of(v)))
        .unwrap_or(io.data);
    let s0 = set_of(p0);
    let ways = iotlb_ways(e, s0);
    let sharing = shared.iter().filter(|&&s| s == s0).count() as u64;
    // Part 1 needs another set, and room in P0's set for P0 beside ring and records.
    let part1 = sets >= 2 && ways > sharing;
    let part3 = part1 && sharing == 0;
    let others: Vec<u64> = if part1 {
        (1..)
            .map(|k| p0 + k * p)
            .filter(|&v| set_of(v) != s0)
            .take(e as usize)
            .collect()
    } else {
        Vec::new()
    };
    // Pages of P0's set: `ways` for part 2, `ways` more for part 3.
    let same: Vec<u64> = (1..)
        .map(|k| p0 + k * p)
        .filter(|&v| set_of(v) == s0)
        .take(ways as usize * if part3 { 2 } else { 1 })
        .collect();
    let (same2, same3) = same.split_at(ways as usize);
    progress!(
        "         IOTLB: {e} entries, {sets} sets; P0 at IOVA {p0:#x} in set {s0} of {ways} \
         ways; {} pages in other sets, {} in P0's",
        others.len(),
        same.len()
    );
    if !part1 {
        progress!("         (one set, or no room beside ring and records: part 1 skipped)");
    }
    if !part3 {
        progress!("         (ring or records share P0's set: part 3 skipped)");
    }

    let old = Guarded::new(dev, PAGE, PAGE)?;
    let new = Guarded::new(dev, PAGE, PAGE)?;
    let read_only: Vec<u64> = others.iter().chain(&same).copied().collect();
    let frames = Guarded::new(dev, read_only.len() * PAGE, PAGE)?;
    t.dom.map(p0, old.bus(), p, Perm::RW, PageSize::Size4K)?;
    for (j, &iova) in read_only.iter().enumerate() {
        t.dom.map(
            iova,
            frames.bus() + j as u64 * p,
            p,
            Perm::R,
            PageSize::Size4K,
        )?;
    }
    let mut rng = ctx.rng();
    let mut old_data = rng.unique(PAGE);
    let mut new_data = rng.unique(PAGE);
    let frames_data = rng.unique(read_only.len() * PAGE);
    old.write(0, &old_data);
    new.write(0, &new_data);
    frames.write(0, &frames_data);
    // CRC32C of read-only pages (their index in `read_only` gives their data).
    let touch = |t: &mut Translated<'_>, pages: &[u64]| -> TestResult {
        for &iova in pages {
            let j = read_only
                .iter()
                .position(|&v| v == iova)
                .ok_or_else(|| Failure(format!("page {iova:#x} not mapped")))?;
            let what = format!("CRC32C of page {iova:#x} (set {})", set_of(iova));
            let c = t.q.run(Descriptor::crc32c(iova, PAGE as u32))?;
            check_status(&c, spec::STATUS_OK, &what)?;
            let data = &frames_data[j * PAGE..(j + 1) * PAGE];
            check_eq!(c.result, u64::from(crc32c(data)), "{what}: CRC32C");
        }
        Ok(())
    };
    // A FILL at P0; returns the page it must have written.
    let mut fill_p0 = |t: &mut Translated<'_>, what: &str| -> Result<Vec<u8>, Failure> {
        let pattern = rng.next_u64();
        let c = t.q.run(Descriptor::fill(p0, pattern, PAGE as u32))?;
        check_status(&c, spec::STATUS_OK, what)?;
        Ok(pattern_bytes(pattern, PAGE))
    };
    let stale = || dstat(dev, 1, spec::DSTAT_STALE_USES);
    let strict = u64::from(caps.strict_iotlb);

    let c = t.q.run(Descriptor::crc32c(p0, PAGE as u32))?;
    check_status(&c, spec::STATUS_OK, "CRC32C of P0 (caches it)")?;
    check_eq!(c.result, u64::from(crc32c(&old_data)), "CRC32C of P0");
    touch(&mut t, &others)?;
    // P0 -> the new page in the table, not invalidated.
    let leaf = |bus: u64| bus | spec::PTE_R | spec::PTE_W;
    let gone = || Failure("P0's leaf is gone".into());
    t.dom
        .table_mut()
        .write_raw(p0, 1, leaf(new.bus()))
        .ok_or_else(gone)?;
    if part1 {
        let stale0 = stale()?;
        let what = format!(
            "P0 after {} newer pages, none in its set (still cached: the old page)",
            others.len()
        );
        old_data = fill_p0(&mut t, &what)?;
        check_bytes(&old.read(), &old_data, format!("{what}: old page"))?;
        check_bytes(&new.read(), &new_data, format!("{what}: new page"))?;
        check_eq!(stale()? - stale0, strict, "{what}: DSTAT_STALE_USES");
    }

    touch(&mut t, same2)?;
    let stale0 = stale()?;
    let what = format!(
        "P0 after {} newer pages in its set of {ways} ways (evicted: walks to the new page)",
        same2.len()
    );
    new_data = fill_p0(&mut t, &what)?;
    check_bytes(&new.read(), &new_data, format!("{what}: new page"))?;
    check_bytes(&old.read(), &old_data, format!("{what}: old page"))?;
    check_eq!(stale()?, stale0, "{what}: DSTAT_STALE_USES");

    if part3 {
        // P0 is cached (-> new) as the most recent of its set; the table goes back to old.
        t.dom
            .table_mut()
            .write_raw(p0, 1, leaf(old.bus()))
            .ok_or_else(gone)?;
        let (fill_up, last) = same3.split_at(same3.len() - 1);
        touch(&mut t, fill_up)?;
        let stale0 = stale()?;
        let what = format!(
            "P0 after {} newer pages in its set (least recently used, still cached)",
            fill_up.len()
        );
        new_data = fill_p0(&mut t, &what)?;
        check_bytes(&new.read(), &new_data, format!("{what}: new page"))?;
        check_bytes(&old.read(), &old_data, format!("{what}: old page"))?;
        touch(&mut t, last)?;
        let what = "P0 after a hit made it most recently used and one more page filled its \
                    set (another entry evicted: still cached)";
        new_data = fill_p0(&mut t, what)?;
        check_bytes(&new.read(), &new_data, format!("{what}: new page"))?;
        check_bytes(&old.read(), &old_data, format!("{what}: old page"))?;
        check_eq!(stale()? - stale0, 2 * strict, "{what}: DSTAT_STALE_USES");
    }
    check_bytes(&frames.read(), &frames_data, "the pages only read")?;
    for (g, what) in [
        (&old, "old page"),
        (&new, "new page"),
        (&frames, "pages read"),
    ] {
        g.check_guards(what)?;
    }
    Ok(())
}

// ---- Helpers ----

/// Which page a stale-translation probe read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Page A: what X mapped when the translation was cached.
    A,
    /// Page B: what X maps in the table now.
    B,
}

/// The stale-translation probe: a translated domain with a queue in it, IOVA `x` mapped
/// (read-write, by a leaf of `size`) to page A in the table, a page B with other data,
/// and a guarded destination page: a COPY of 4 KiB from `x + off` shows which page the
/// device reads.
struct Stale<'b> {
    dev: &'b dyn DmaBackend,
    t: Translated<'b>,
    size: PageSize,
    x: u64,
    off: usize,
    dst_iova: u64,
    a: DmaBuffer,
    b: DmaBuffer,
    a_data: Vec<u8>,
    b_data: Vec<u8>,
    dst: Guarded,
    rng: Rng,
}

impl<'b> Stale<'b> {
    /// Sets the probe up in `domain` with queue `queue` and runs the first COPY, which
    /// caches X -> A.
    fn new(
        ctx: &Ctx,
        dev: &'b dyn DmaBackend,
        domain: u32,
        queue: u32,
        size: PageSize,
        taken: &[IotlbKey],
    ) -> Result<Self, Failure> {
        let mut t = Translated::new(dev, domain, queue)?;
        let io = t.io;
        let (a, b, off) = match size {
            PageSize::Size4K => (
                dev.alloc_dma(DmaRequest::new(PAGE))?,
                dev.alloc_dma(DmaRequest::new(PAGE))?,
                0,
            ),
            PageSize::Size2M => (huge_page(dev)?, huge_page(dev)?, 0x1000),
            PageSize::Size1G => {
                return Err(Failure(
                    "the stale probe has no second 1 GiB page to remap to".into(),
                ))
            }
        };
        // X and the destination where the IOTLB holds them beside ring, records and
        // `taken` (first choice: X at the source IOVA, the destination at an odd page).
        let xs: Vec<u64> = (0..8).map(|k| io.src + k * size.bytes()).collect();
        let dsts: Vec<u64> = (1..16)
            .chain(0..1)
            .map(|j| io.dst + j * PAGE as u64)
            .collect();
        let (x, dst_iova) = fitting(&t.caps, &xs, &dsts, |x, dst| {
            [taken, &stale_keys(domain, &io, x, size, dst)].concat()
        })?;
        let dst = Guarded::new(dev, PAGE, PAGE)?;
        t.dom.map(x, a.bus_addr(), size.bytes(), Perm::RW, size)?;
        t.dom
            .map(dst_iova, dst.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;
        let mut rng = ctx.rng();
        let a_data = rng.unique(a.len());
        let b_data = rng.unique(b.len());
        a.write(0, &a_data);
        b.write(0, &b_data);
        let mut s = Stale {
            dev,
            t,
            size,
            x,
            off,
            dst_iova,
            a,
            b,
            a_data,
            b_data,
            dst,
            rng,
        };
        s.expect(Seen::A, "the first COPY from X (caches X -> A)")?;
        Ok(s)
    }

    /// The IOTLB entries the probe keeps: ring, records, X, destination.
    fn keys(&self) -> Vec<IotlbKey> {
        stale_keys(
            self.t.dom.index(),
            &self.t.io,
            self.x,
            self.size,
            self.dst_iova,
        )
    }

    /// Writes X's leaf in the table, without invalidation.
    fn set_leaf(&mut self, value: u64) -> TestResult {
        self.t
            .dom
            .table_mut()
            .write_raw(self.x, self.size.level(), value)
            .ok_or_else(|| Failure(format!("X's level-{} leaf is gone", self.size.level())))?;
        Ok(())
    }

    /// Maps X to page B (read-write) in the table, without invalidation.
    fn remap_to_b(&mut self) -> TestResult {
        let ps = if self.size == PageSize::Size4K {
            0
        } else {
            spec::PTE_PS
        };
        self.set_leaf(self.b.bus_addr() | spec::PTE_R | spec::PTE_W | ps)
    }

    /// `DSTAT_STALE_USES` of the probe's domain.
    fn stale_uses(&self) -> Result<u64, Failure> {
        dstat(self.dev, self.t.dom.index(), spec::DSTAT_STALE_USES)
    }

    /// Fills the destination with fresh data and runs the COPY from X; returns the
    /// completion and what the destination held before.
    fn copy(&mut self) -> Result<(CompletionRecord, Vec<u8>), Failure> {
        let before = self.rng.unique(PAGE);
        self.dst.write(0, &before);
        let c = self.t.q.run(Descriptor::copy(
            self.x + self.off as u64,
            self.dst_iova,
            PAGE as u32,
        ))?;
        Ok((c, before))
    }

    /// Runs the COPY from X and checks that it read page `want`.
    fn expect(&mut self, want: Seen, what: &str) -> TestResult {
        let (c, _) = self.copy()?;
        check_status(&c, spec::STATUS_OK, format!("{what}: COPY from X"))?;
        let got = self.dst.read();
        let a = &self.a_data[self.off..self.off + PAGE];
        let b = &self.b_data[self.off..self.off + PAGE];
        let (want_data, other, name, other_name) = match want {
            Seen::A => (
                a,
                b,
                "page A (the cached translation)",
                "page B (the table's)",
            ),
            Seen::B => (b, a, "page B (the table's)", "page A (a stale translation)"),
        };
        if got == other {
            return Err(Failure(format!(
                "{what}: the device read {other_name}, expected {name}"
            )));
        }
        check_bytes(
            &got,
            want_data,
            format!("{what}: destination, expected {name}"),
        )?;
        self.dst.check_guards(what)?;
        check_bytes(
            &self.a.to_vec(0, self.a.len()),
            &self.a_data,
            format!("{what}: page A"),
        )?;
        check_bytes(
            &self.b.to_vec(0, self.b.len()),
            &self.b_data,
            format!("{what}: page B"),
        )
    }
}

/// SPEC.md "IOTLB": the number of sets of an IOTLB of `entries` entries.
fn iotlb_sets(entries: u32) -> u64 {
    u64::from(entries.div_ceil(4).max(1))
}

/// SPEC.md "IOTLB": the set of the entry of `domain` for the page of `iova`, of `size`.
fn iotlb_set(entries: u32, domain: u32, iova: u64, size: PageSize) -> u64 {
    let class = u64::from(size.level() - 1);
    (iova / size.bytes() + 97 * u64::from(domain) + 31 * class) % iotlb_sets(entries)
}

/// SPEC.md "IOTLB": the ways of set `set`.
fn iotlb_ways(entries: u32, set: u64) -> u64 {
    let sets = iotlb_sets(entries);
    u64::from(entries) / sets + u64::from(set < u64::from(entries) % sets)
}

/// An IOTLB entry a scenario keeps: (domain, IOVA, page size).
type IotlbKey = (u32, u64, PageSize);

/// The entries of a stale probe: ring, records, X, destination.
fn stale_keys(domain: u32, io: &Iovas, x: u64, size: PageSize, dst: u64) -> Vec<IotlbKey> {
    vec![
        (domain, io.ring, PageSize::Size4K),
        (domain, io.cpl, PageSize::Size4K),
        (domain, x, size),
        (domain, dst, PageSize::Size4K),
    ]
}

/// The first pair of candidates `(a, b)` whose entries `keys(a, b)` the IOTLB holds at
/// once ([`check_fits`]); the first pair's failure when none does.
fn fitting(
    caps: &Capabilities,
    cands_a: &[u64],
    cands_b: &[u64],
    keys: impl Fn(u64, u64) -> Vec<IotlbKey>,
) -> Result<(u64, u64), Failure> {
    for &a in cands_a {
        for &b in cands_b {
            if check_fits(caps, &keys(a, b)).is_ok() {
                return Ok((a, b));
            }
        }
    }
    check_fits(caps, &keys(cands_a[0], cands_b[0]))?;
    Err(Failure("no layout fits the IOTLB".into()))
}

/// Checks that the IOTLB can hold every entry of `keys` (domain, IOVA, page size) at
/// once: no set gets more of them than it has ways, so nothing a scenario cached is
/// evicted by the scenario's own accesses.
fn check_fits(caps: &Capabilities, keys: &[IotlbKey]) -> TestResult {
    let e = caps.iotlb_entries;
    let mut per_set: BTreeMap<u64, Vec<IotlbKey>> = BTreeMap::new();
    for &(d, iova, size) in keys {
        let key = (d, iova & !(size.bytes() - 1), size);
        let v = per_set.entry(iotlb_set(e, d, iova, size)).or_default();
        if !v.contains(&key) {
            v.push(key);
        }
    }
    for (set, v) in per_set {
        let ways = iotlb_ways(e, set);
        check!(
            v.len() as u64 <= ways,
            "the scenario's translations {v:x?} share IOTLB set {set} of {ways} ways (of \
             {e} entries): SPEC.md \"IOTLB\" lets them evict each other"
        );
    }
    Ok(())
}

/// Writes an invalidation command's registers and the command, waits (bounded) for
/// `INV_STATUS_BUSY` to clear and returns `REG_INV_STATUS`.
fn raw_invalidate(
    dev: &dyn DmaBackend,
    domain: u32,
    addr: u64,
    len: u64,
    cmd: u32,
) -> Result<u32, Failure> {
    dev.write32(spec::REG_INV_DOMAIN, domain)?;
    dev.write32(spec::REG_INV_ADDR_LO, addr as u32)?;
    dev.write32(spec::REG_INV_ADDR_HI, (addr >> 32) as u32)?;
    dev.write32(spec::REG_INV_LEN_LO, len as u32)?;
    dev.write32(spec::REG_INV_LEN_HI, (len >> 32) as u32)?;
    dev.write32(spec::REG_INV_CMD, cmd)?;
    let start = std::time::Instant::now();
    loop {
        let status = dev.read32(spec::REG_INV_STATUS)?;
        if status & spec::INV_STATUS_BUSY == 0 {
            return Ok(status);
        }
        check!(
            start.elapsed() < COMPLETION_TIMEOUT,
            "invalidation command {cmd} still busy after {COMPLETION_TIMEOUT:?} \
             (REG_INV_STATUS {status:#x})"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
}
