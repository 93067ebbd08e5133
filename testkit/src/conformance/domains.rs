//! Conformance: translated domains: leaves of every size, permissions.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Domains,
        name: "translated_domain_2m",
        needs: &[Need::HugePages(4), Need::Domains(2)],
        run: translated_domain_2m,
    },
    Scenario {
        area: Area::Domains,
        name: "copy_through_scattered_4k_leaves",
        needs: &[Need::Domains(2)],
        run: copy_through_scattered_4k_leaves,
    },
    Scenario {
        area: Area::Domains,
        name: "copy_stops_at_the_first_unmapped_page",
        needs: &[Need::Domains(2)],
        run: copy_stops_at_the_first_unmapped_page,
    },
    Scenario {
        area: Area::Domains,
        name: "copy_across_two_non_contiguous_2m_leaves",
        needs: &[Need::HugePages(4), Need::Domains(2)],
        run: copy_across_two_non_contiguous_2m_leaves,
    },
    Scenario {
        area: Area::Domains,
        name: "copy_through_a_1g_leaf",
        needs: &[Need::Domains(2)],
        run: copy_through_a_1g_leaf,
    },
    Scenario {
        area: Area::Domains,
        name: "copy_across_4k_and_2m_leaves",
        needs: &[Need::HugePages(2), Need::Domains(2)],
        run: copy_across_4k_and_2m_leaves,
    },
    Scenario {
        area: Area::Domains,
        name: "read_only_mapping_faults_writes",
        needs: &[Need::Domains(2)],
        run: read_only_mapping_faults_writes,
    },
    Scenario {
        area: Area::Domains,
        name: "write_only_mapping_faults_reads",
        needs: &[Need::Domains(2)],
        run: write_only_mapping_faults_reads,
    },
    Scenario {
        area: Area::Domains,
        name: "permission_is_the_and_over_every_level",
        needs: &[Need::Domains(2)],
        run: permission_is_the_and_over_every_level,
    },
    Scenario {
        area: Area::Domains,
        name: "pte_bits_11_to_8_are_ignored",
        needs: &[Need::Domains(2)],
        run: pte_bits_11_to_8_are_ignored,
    },
    Scenario {
        area: Area::Domains,
        name: "domain_iovas_are_not_bus_addresses",
        needs: &[Need::Domains(2), Need::Queues(2)],
        run: domain_iovas_are_not_bus_addresses,
    },
    Scenario {
        area: Area::Domains,
        name: "domains_mapping_the_same_iova_are_isolated",
        needs: &[Need::Domains(3), Need::Queues(2)],
        run: domains_mapping_the_same_iova_are_isolated,
    },
];

/// A COPY through a translated domain mapped with 2 MiB leaves, between huge-page buffers:
/// the device works on domain IOVAs (not the bus addresses), the two source pages are
/// mapped in swapped order so the result proves the translation, and the bus addresses
/// themselves fault in that domain.
fn translated_domain_2m(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut t = Translated::with(dev, 1, QueueConfig::new(0, 16, 0), 4, None)?;
    need_page_size(&t.caps, PageSize::Size2M)?;
    let io = t.io;
    let two_m = PAGE_SIZE_2M as u64;
    let len = 2 * PAGE_SIZE_2M;
    let src = dev.alloc_dma(DmaRequest::huge(len))?;
    let dst = dev.alloc_dma(DmaRequest::huge(len))?;
    for b in [&src, &dst] {
        check_eq!(b.bus_addr() % two_m, 0, "huge buffer bus address alignment");
        check!(
            b.bus_addr() + len as u64 <= io.base || b.bus_addr() >= io.base + (1 << 30),
            "bus address {:#x} inside the IOVA window at {:#x}",
            b.bus_addr(),
            io.base
        );
    }
    // IOVA src -> the buffer's second page, src + 2 MiB -> its first page.
    for (iova, bus, bytes, perm) in [
        (io.src, src.bus_addr() + two_m, two_m, Perm::R),
        (io.src + two_m, src.bus_addr(), two_m, Perm::R),
        (io.dst, dst.bus_addr(), 2 * two_m, Perm::RW),
    ] {
        t.dom.map(iova, bus, bytes, perm, PageSize::Size2M)?;
    }
    let m = t
        .dom
        .table()
        .translate(io.src + 0x1234)
        .ok_or_else(|| Failure("software walk: source IOVA not mapped".into()))?;
    check_eq!(m.bus, src.bus_addr() + two_m + 0x1234, "software walk");
    check_eq!(m.page, PageSize::Size2M, "software walk page size");
    check_eq!(
        t.dom.table().read_raw(io.src, 2),
        Some((src.bus_addr() + two_m) | spec::PTE_R | spec::PTE_PS),
        "level-2 leaf entry"
    );
    progress!(
        "         domain 1: root {:#x}, {} tables; IOVA {:#x} -> bus {:#x} (2 MiB leaves)",
        t.dom.table().root(),
        t.dom.table().table_count(),
        io.src,
        src.bus_addr() + two_m
    );

    let data = ctx.rng().bytes(len);
    src.write(0, &data);
    dst.fill(0, len, 0xee);
    // What the device sees at IOVA src: the second page, then the first.
    let view: Vec<u8> = [&data[PAGE_SIZE_2M..], &data[..PAGE_SIZE_2M]].concat();

    // 1. 4 MiB across both pages of each side.
    let c = t.q.run_ok(
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(0x2d2d),
        "COPY 4 MiB through domain 1",
    )?;
    check_eq!(
        (c.bytes, c.tag, c.fault_addr),
        (len as u32, 0x2d2d, 0),
        "(bytes, tag, fault_addr)"
    );
    let what = "destination (pages swapped by the mapping)";
    check_bytes(&dst.to_vec(0, len), &view, what)?;
    check_bytes(&src.to_vec(0, len), &data, "source after the copy")?;

    // 2. 1 MiB whose source crosses the IOVA boundary between the two 2 MiB pages.
    let (off, n) = (PAGE_SIZE_2M / 2 + PAGE_SIZE_2M / 4, 1 << 20);
    t.q.run_ok(
        Descriptor::copy(io.src + off as u64, io.dst + 0x1000, n as u32).with_tag(2),
        "COPY across the 2 MiB boundary",
    )?;
    let mut want = view.clone();
    want[0x1000..0x1000 + n].copy_from_slice(&view[off..off + n]);
    let what = "destination after the boundary copy";
    check_bytes(&dst.to_vec(0, len), &want, what)?;

    // 3. In domain 1 a bus address is just an unmapped IOVA.
    t.q.run_fault(
        Descriptor::fill(dst.bus_addr(), 0x1111, 4096).with_tag(3),
        (spec::FAULT_NOT_PRESENT, dst.bus_addr(), true),
        "FILL at the buffer's bus address in domain 1",
    )?;
    let what = "destination after the faulting FILL";
    check_bytes(&dst.to_vec(0, len), &want, what)?;

    // 4. Every access went through domain 1: descriptors, data and completions.
    let s1 = DomainStats::read(dev, 1)?;
    progress!("         domain 1: {s1}");
    check!(s1.translations > 0, "domain 1 counted no translations");
    check!(s1.misses >= 1, "domain 1 counted no IOTLB miss");
    check!(s1.walks >= 1, "domain 1 counted no page walk");
    let tr0 = dstat(dev, 0, spec::DSTAT_TRANSLATIONS)?;
    check_eq!(tr0, 0, "translations in domain 0 (unused)");
    let bytes = qstat(dev, 0, spec::QSTAT_BYTES)?;
    check!(
        bytes >= (len + n) as u64,
        "QSTAT_BYTES {bytes} below the {} bytes copied",
        len + n
    );
    t.q.disable()?;
    Ok(())
}

/// A COPY of 5 pages + 77 bytes at different offsets in source and destination, through
/// six scattered 4 KiB leaves on each side (each page its own allocation between canary
/// pages, mapped in the reverse of allocation order): exactly the range moves, the source
/// and every other byte of the destination pages stay as they were, no canary changes; a
/// CRC32C over the scattered source pages equals the software CRC of their IOVA order.
fn copy_through_scattered_4k_leaves(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let io = t.io;
    let n = 6;
    let src = scattered_pages(dev, n)?;
    let dst = scattered_pages(dev, n)?;
    map_pages(&mut t.dom, io.src, &src, Perm::R)?;
    map_pages(&mut t.dom, io.dst, &dst, Perm::RW)?;
    for (i, p) in src.iter().enumerate() {
        let iova = io.src + (i * PAGE) as u64 + 5;
        let m = t
            .dom
            .table()
            .translate(iova)
            .ok_or_else(|| Failure(format!("software walk: IOVA {iova:#x} not mapped")))?;
        check_eq!(
            (m.bus, m.page),
            (p.bus() + 5, PageSize::Size4K),
            "software walk of source page {i}"
        );
    }
    let mut rng = ctx.rng();
    let data = rng.unique(n * PAGE);
    let before = rng.unique(n * PAGE);
    write_span(&src, &data);
    write_span(&dst, &before);

    // Different offsets in the source and destination pages: chunks split on both sides.
    let (so, doff, len) = (100usize, 300usize, 5 * PAGE + 77);
    let tag = 0xabcd_ef01_2345_6789;
    let c = t.q.run(
        Descriptor::copy(io.src + so as u64, io.dst + doff as u64, len as u32).with_tag(tag),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY through scattered 4 KiB leaves")?;
    check_eq!(c.bytes, len as u32, "bytes");
    check_eq!(c.tag, tag, "tag");
    let mut want = before.clone();
    want[doff..doff + len].copy_from_slice(&data[so..so + len]);
    check_bytes(&read_span(&dst), &want, "destination pages (in IOVA order)")?;
    check_bytes(&read_span(&src), &data, "source pages after the copy")?;
    check_guards(&src, "source pages")?;
    check_guards(&dst, "destination pages")?;

    let (off, clen) = (33usize, 4 * PAGE + 1);
    let c =
        t.q.run(Descriptor::crc32c(io.src + off as u64, clen as u32))?;
    check_status(&c, spec::STATUS_OK, "CRC32C over scattered 4 KiB leaves")?;
    check_eq!(
        c.result,
        u64::from(crc32c(&data[off..off + clen])),
        "CRC32C of the source pages in IOVA order"
    );
    check_eq!(t.q.read_reg(spec::Q_ERRORS)?, 0, "Q_ERRORS");
    check_eq!(
        dstat(dev, 1, spec::DSTAT_FAULTS)?,
        0,
        "DSTAT_FAULTS of domain 1"
    );
    let tr = dstat(dev, 1, spec::DSTAT_TRANSLATIONS)?;
    check!(
        tr >= 2 * n as u64,
        "domain 1 counted {tr} translations, fewer than the {} data pages copied",
        2 * n
    );
    Ok(())
}

/// A COPY of 64 contiguous pages into a destination whose page 40 is not mapped stops
/// before that page: the 40 pages before it moved, nothing from it on was written (nor
/// any canary), the completion reports 40 pages and NOT_PRESENT at the page's IOVA, and
/// the one fault is logged once (level 1: the missing leaf). Every page went through the
/// IOTLB (translations = hits + misses; walks = misses, or every translation in strict
/// mode). Faults are not cached: mapping the page, without invalidation, lets the same
/// COPY complete.
fn copy_stops_at_the_first_unmapped_page(ctx: &mut Ctx) -> TestResult {
    const PAGES: usize = 64;
    const HOLE: usize = 40;
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let mut log = t.fault_log(16)?;
    let io = t.io;
    let len = PAGES * PAGE;
    let mut rng = ctx.rng();
    let (src, data) = t.map_new(io.src, len, Perm::R, &mut rng)?;
    let dst = Guarded::new(dev, len, PAGE)?;
    let before = rng.unique(len);
    dst.write(0, &before);
    // Every destination page but page HOLE.
    for (from, to) in [(0, HOLE), (HOLE + 1, PAGES)] {
        let (off, bytes) = ((from * PAGE) as u64, ((to - from) * PAGE) as u64);
        t.dom.map(
            io.dst + off,
            dst.bus() + off,
            bytes,
            Perm::RW,
            PageSize::Size4K,
        )?;
    }
    let seq = log.count()?;

    let hole = io.dst + (HOLE * PAGE) as u64;
    let c = t.q.run_fault(
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(1),
        (spec::FAULT_NOT_PRESENT, hole, true),
        "COPY into a destination whose page 40 is unmapped",
    )?;
    check_eq!(
        c.bytes,
        (HOLE * PAGE) as u32,
        "bytes reported (the pages before the unmapped one)"
    );
    let got = dst.read();
    let (moved, kept) = got.split_at(HOLE * PAGE);
    let what = "destination pages before the unmapped one";
    check_bytes(moved, &data[..HOLE * PAGE], what)?;
    let what = "destination from the unmapped page on";
    check_bytes(kept, &before[HOLE * PAGE..], what)?;
    dst.check_guards("destination")?;
    check_bytes(&src.read(), &data, "source")?;

    let access = (spec::FAULT_NOT_PRESENT, spec::ACCESS_WRITE);
    let want = record(access, (1, 0), hole, (0, 1), seq);
    expect_record(&mut log, want, "the missing leaf")?;
    check_eq!(log.pending()?, 0, "fault records after the first");
    let s = DomainStats::read(dev, 1)?;
    progress!("         domain 1: {s}");
    check_eq!(s.faults, 1, "DSTAT_FAULTS: one fault, counted once");
    s.check_iotlb(t.caps.strict_iotlb)?;
    // Descriptor fetch and completion, 40 source pages, 41 destination pages.
    check!(
        s.translations >= (2 + HOLE + HOLE + 1) as u64,
        "{} translations: fewer than one per page on each side",
        s.translations
    );

    // Faults are not cached: mapping the page is enough.
    let at = dst.bus() + (HOLE * PAGE) as u64;
    t.dom
        .map(hole, at, PAGE as u64, Perm::RW, PageSize::Size4K)?;
    let c = t.q.run_ok(
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(2),
        "the COPY after mapping the page, without invalidation",
    )?;
    check_eq!(c.bytes, len as u32, "bytes");
    check_bytes(&dst.read(), &data, "destination after the second COPY")?;
    dst.check_guards("destination after the second COPY")?;
    let c = t.q.run_ok(
        Descriptor::crc32c(io.dst, len as u32),
        "CRC32C over the destination",
    )?;
    let crc = u64::from(crc32c(&data));
    check_eq!(c.result, crc, "CRC32C over the 64 destination pages");
    Ok(())
}

/// 2 MiB leaves onto four separately allocated huge pages (allocated in the reverse of
/// their IOVA order, so IOVA order is not bus order): a 1 MiB COPY that starts 512 KiB
/// before the source's 2 MiB boundary into a destination shifted to cross its own boundary
/// at another offset moves exactly that range (both destination pages checked whole), and
/// a CRC32C over nearly all 4 MiB equals the software CRC.
fn copy_across_two_non_contiguous_2m_leaves(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    need_page_size(&t.caps, PageSize::Size2M)?;
    let io = t.io;
    let two_m = PAGE_SIZE_2M;
    let s1 = huge_page(dev)?;
    let s0 = huge_page(dev)?;
    let t1 = huge_page(dev)?;
    let t0 = huge_page(dev)?;
    for (i, b) in [&s0, &s1].into_iter().enumerate() {
        t.dom.map(
            io.src + (i * two_m) as u64,
            b.bus_addr(),
            two_m as u64,
            Perm::R,
            PageSize::Size2M,
        )?;
    }
    for (i, b) in [&t0, &t1].into_iter().enumerate() {
        t.dom.map(
            io.dst + (i * two_m) as u64,
            b.bus_addr(),
            two_m as u64,
            Perm::RW,
            PageSize::Size2M,
        )?;
    }
    check_eq!(
        t.dom.table().read_raw(io.src + two_m as u64, 2),
        Some(s1.bus_addr() | spec::PTE_R | spec::PTE_PS),
        "level-2 leaf of the second source page"
    );
    let mut rng = ctx.rng();
    let data = rng.unique(2 * two_m);
    let before = rng.unique(2 * two_m);
    s0.write(0, &data[..two_m]);
    s1.write(0, &data[two_m..]);
    t0.write(0, &before[..two_m]);
    t1.write(0, &before[two_m..]);

    let (so, doff, len) = (two_m - (512 << 10), two_m - (700 << 10) + 8, MIB);
    let c = t.q.run(
        Descriptor::copy(io.src + so as u64, io.dst + doff as u64, len as u32).with_tag(0x2_2),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY across both 2 MiB boundaries")?;
    check_eq!(c.bytes, len as u32, "bytes");
    let mut want = before.clone();
    want[doff..doff + len].copy_from_slice(&data[so..so + len]);
    let got = [t0.to_vec(0, two_m), t1.to_vec(0, two_m)].concat();
    check_bytes(&got, &want, "both destination 2 MiB pages")?;
    let got = [s0.to_vec(0, two_m), s1.to_vec(0, two_m)].concat();
    check_bytes(&got, &data, "both source 2 MiB pages")?;

    let n = 2 * two_m - 2;
    let c = t.q.run(Descriptor::crc32c(io.src + 1, n as u32))?;
    check_status(&c, spec::STATUS_OK, "CRC32C over both source pages")?;
    check_eq!(
        c.result,
        u64::from(crc32c(&data[1..1 + n])),
        "CRC32C over both 2 MiB source pages"
    );
    Ok(())
}

/// One 1 GiB leaf (`PageSize::Size1G`) maps the 1 GiB-aligned bus window that holds a
/// buffer, at a 1 GiB IOVA that is not that window: a 3 MiB COPY (several chunks) between
/// two parts of the buffer through the leaf moves exactly the data (the page between them
/// and the canaries around stay), and a CRC32C through it equals the software CRC. Only
/// the allocated buffer is touched, so the rest of the window need not be memory.
fn copy_through_a_1g_leaf(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    need_page_size(&t.caps, PageSize::Size1G)?;
    let l = 3 * MIB;
    let (mem, win) = alloc_in_1g_window(dev, &t.caps, &t.io, 2 * l + PAGE)?;
    t.dom
        .map(win.iova, win.bus, GIB, Perm::RW, PageSize::Size1G)?;
    check_eq!(
        t.dom.table().read_raw(win.iova, 3),
        Some(win.bus | spec::PTE_R | spec::PTE_W | spec::PTE_PS),
        "level-3 leaf"
    );
    let src = win.iova_of(mem.bus());
    let dst = src + (l + PAGE) as u64;
    let m = t
        .dom
        .table()
        .translate(dst + 0x123)
        .ok_or_else(|| Failure("software walk: destination IOVA not mapped".into()))?;
    check_eq!(
        (m.bus, m.page),
        (mem.bus() + (l + PAGE) as u64 + 0x123, PageSize::Size1G),
        "software walk"
    );
    progress!(
        "         1 GiB leaf: IOVA {:#x} -> bus {:#x}; buffer at bus {:#x} = IOVA {src:#x}",
        win.iova,
        win.bus,
        mem.bus()
    );
    let mut rng = ctx.rng();
    let data = rng.unique(l);
    let gap = rng.unique(PAGE);
    let before = rng.unique(l);
    mem.write(0, &data);
    mem.write(l, &gap);
    mem.write(l + PAGE, &before);

    let c =
        t.q.run(Descriptor::copy(src, dst, l as u32).with_tag(0x1_6))?;
    check_status(&c, spec::STATUS_OK, "COPY 3 MiB through a 1 GiB leaf")?;
    check_eq!(c.bytes, l as u32, "bytes");
    let got = mem.read();
    check_bytes(&got[..l], &data, "source")?;
    check_bytes(
        &got[l..l + PAGE],
        &gap,
        "the page between source and destination",
    )?;
    check_bytes(&got[l + PAGE..], &data, "destination")?;
    mem.check_guards("buffer in the 1 GiB page")?;
    let c = t.q.run(Descriptor::crc32c(dst + 7, 1000))?;
    check_status(&c, spec::STATUS_OK, "CRC32C through a 1 GiB leaf")?;
    check_eq!(
        c.result,
        u64::from(crc32c(&data[7..1007])),
        "CRC32C of 1000 bytes through the 1 GiB leaf"
    );
    Ok(())
}

/// Mixed leaves: the source is two 4 KiB leaves followed by a 2 MiB leaf, the destination
/// a 2 MiB leaf followed by three 4 KiB leaves; a 20000-byte COPY crosses from 4 KiB into
/// 2 MiB on the source side and from 2 MiB into 4 KiB on the destination side, and moves
/// exactly that range.
fn copy_across_4k_and_2m_leaves(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let io = t.io;
    let two_m = PAGE_SIZE_2M;
    // Source: 4 KiB leaves at [l - 8 KiB, l), a 2 MiB leaf at l.
    let l = io.src + two_m as u64;
    let small = scattered_pages(dev, 2)?;
    map_pages(&mut t.dom, l - 2 * PAGE as u64, &small, Perm::R)?;
    let big = huge_page(dev)?;
    t.dom
        .map(l, big.bus_addr(), two_m as u64, Perm::R, PageSize::Size2M)?;
    // Destination: a 2 MiB leaf at d, 4 KiB leaves at [d + 2 MiB, d + 2 MiB + 12 KiB).
    let d = io.dst;
    let dbig = huge_page(dev)?;
    t.dom
        .map(d, dbig.bus_addr(), two_m as u64, Perm::RW, PageSize::Size2M)?;
    let dsmall = scattered_pages(dev, 3)?;
    map_pages(&mut t.dom, d + two_m as u64, &dsmall, Perm::RW)?;
    for (iova, page) in [
        (l - 1, PageSize::Size4K),
        (l, PageSize::Size2M),
        (d + two_m as u64 - 1, PageSize::Size2M),
        (d + two_m as u64, PageSize::Size4K),
    ] {
        let m = t
            .dom
            .table()
            .translate(iova)
            .ok_or_else(|| Failure(format!("software walk: IOVA {iova:#x} not mapped")))?;
        check_eq!(m.page, page, "leaf size at IOVA {iova:#x}");
    }
    let mut rng = ctx.rng();
    let sdata = rng.unique(2 * PAGE + two_m);
    write_span(&small, &sdata[..2 * PAGE]);
    big.write(0, &sdata[2 * PAGE..]);
    let dbefore = rng.unique(two_m + 3 * PAGE);
    dbig.write(0, &dbefore[..two_m]);
    write_span(&dsmall, &dbefore[two_m..]);

    // 6000 bytes in the 4 KiB leaves, then 14000 in the 2 MiB one; the destination
    // crosses from its 2 MiB leaf into its 4 KiB leaves 9000 bytes in.
    let len = 20_000usize;
    let (so, doff) = (2 * PAGE - 6000, two_m - 9000);
    let c =
        t.q.run(Descriptor::copy(l - 6000, d + doff as u64, len as u32).with_tag(0x4_2_4))?;
    check_status(&c, spec::STATUS_OK, "COPY across 4 KiB and 2 MiB leaves")?;
    check_eq!(c.bytes, len as u32, "bytes");
    let mut want = dbefore.clone();
    want[doff..doff + len].copy_from_slice(&sdata[so..so + len]);
    let got = [dbig.to_vec(0, two_m), read_span(&dsmall)].concat();
    check_bytes(&got, &want, "destination (2 MiB page, then 4 KiB pages)")?;
    let got = [read_span(&small), big.to_vec(0, two_m)].concat();
    check_bytes(&got, &sdata, "source (4 KiB pages, then 2 MiB page)")?;
    check_guards(&small, "source 4 KiB pages")?;
    check_guards(&dsmall, "destination 4 KiB pages")?;
    Ok(())
}

/// A read-only mapping: a COPY and a FILL into it fault with PERMISSION on a write at the
/// first byte they would write, report 0 bytes and write nothing (the pages, their
/// canaries); each fault is logged (level 0: a permission fault is not a walk fault).
/// Reading it works: a CRC32C over it and a COPY out of it.
fn read_only_mapping_faults_writes(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let mut log = t.fault_log(16)?;
    let io = t.io;
    let len = 2 * PAGE;
    let mut rng = ctx.rng();
    let (src, data) = t.map_new(io.src, len, Perm::R, &mut rng)?;
    let (ro, ro_data) = t.map_new(io.dst, len, Perm::R, &mut rng)?;
    let (out, _) = t.map_new(io.data, len, Perm::RW, &mut rng)?;
    let seq = log.count()?;

    let at = io.dst + PAGE as u64;
    let writes = [
        ("COPY", Descriptor::copy(io.src, io.dst, len as u32), io.dst),
        ("FILL", Descriptor::fill(at, rng.next_u64(), 16), at),
    ];
    for (what, desc, iova) in writes {
        let c = t.q.run_fault(
            desc,
            (spec::FAULT_PERMISSION, iova, true),
            &format!("{what} into a read-only mapping"),
        )?;
        check_eq!(c.bytes, 0, "bytes of the {what} into a read-only mapping");
        check_bytes(
            &ro.read(),
            &ro_data,
            format!("read-only pages after the {what}"),
        )?;
    }
    for (i, (what, _, iova)) in writes.into_iter().enumerate() {
        let access = (spec::FAULT_PERMISSION, spec::ACCESS_WRITE);
        let want = record(access, (1, 0), iova, (0, 0), seq + i as u32);
        expect_record(&mut log, want, what)?;
    }

    let c = t.q.run_ok(
        Descriptor::crc32c(io.dst, len as u32),
        "CRC32C over a read-only mapping",
    )?;
    let crc = u64::from(crc32c(&ro_data));
    check_eq!(c.result, crc, "CRC32C over the read-only pages");
    t.q.run_ok(
        Descriptor::copy(io.dst, io.data, len as u32),
        "COPY out of a read-only mapping",
    )?;
    check_bytes(&out.read(), &ro_data, "copy of the read-only pages")?;
    check_bytes(&ro.read(), &ro_data, "read-only pages at the end")?;
    check_bytes(&src.read(), &data, "source at the end")?;
    for (g, what) in [(&src, "source"), (&ro, "read-only pages"), (&out, "copy")] {
        g.check_guards(what)?;
    }
    check_eq!(t.q.read_reg(spec::Q_ERRORS)?, 2, "Q_ERRORS");
    Ok(())
}

/// A write-only mapping: a COPY and a CRC32C reading it fault with PERMISSION on a read
/// (access without the write bit) at the first byte they would read, report 0 bytes and
/// write nothing; each fault is logged. Writing it works: a FILL lands exactly where asked.
fn write_only_mapping_faults_reads(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let mut log = t.fault_log(16)?;
    let io = t.io;
    let mut rng = ctx.rng();
    let (wo, wo_data) = t.map_new(io.src, PAGE, Perm::W, &mut rng)?;
    let (dst, before) = t.map_new(io.dst, PAGE, Perm::RW, &mut rng)?;
    let seq = log.count()?;

    let reads = [
        (
            "COPY",
            Descriptor::copy(io.src + 64, io.dst, 64),
            io.src + 64,
        ),
        ("CRC32C", Descriptor::crc32c(io.src, PAGE as u32), io.src),
    ];
    for (what, desc, iova) in reads {
        let c = t.q.run_fault(
            desc,
            (spec::FAULT_PERMISSION, iova, false),
            &format!("{what} from a write-only mapping"),
        )?;
        check_eq!(c.bytes, 0, "bytes of the {what} from a write-only mapping");
        check_bytes(
            &dst.read(),
            &before,
            format!("destination of the faulting {what}"),
        )?;
    }
    for (i, (what, _, iova)) in reads.into_iter().enumerate() {
        let want = record(
            (spec::FAULT_PERMISSION, 0),
            (1, 0),
            iova,
            (0, 0),
            seq + i as u32,
        );
        expect_record(&mut log, want, what)?;
    }

    let pattern = rng.next_u64();
    let c = t.q.run_ok(
        Descriptor::fill(io.src + 8, pattern, 24),
        "FILL into a write-only mapping",
    )?;
    check_eq!(c.bytes, 24, "bytes of the FILL");
    let mut want = wo_data.clone();
    want[8..32].copy_from_slice(&pattern_bytes(pattern, 24));
    check_bytes(&wo.read(), &want, "write-only page after the FILL")?;
    wo.check_guards("write-only page")?;
    check_bytes(&dst.read(), &before, "destination at the end")?;
    dst.check_guards("destination")?;
    Ok(())
}

/// Permissions are the AND over every level of the walk: with a level-3 entry that lacks
/// W above a read-write leaf, a write faults with PERMISSION (and writes nothing) while
/// reads work; with a level-2 entry that lacks R above a read-write leaf, a read faults
/// while writes work. The entries are changed with `write_raw` and invalidated; restoring
/// them (and invalidating) makes the same COPY succeed, so the leaves were never the cause.
fn permission_is_the_and_over_every_level(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let io = t.io;
    let mut rng = ctx.rng();
    let (src, mut data) = t.map_new(io.src, PAGE, Perm::RW, &mut rng)?;
    let dst = Guarded::new(dev, PAGE, PAGE)?;
    let before = rng.unique(PAGE);
    dst.write(0, &before);
    // The destination at a 1 GiB IOVA of its own: its level-3 entry serves nothing else.
    let p = spare_1g_slot(&t.caps, &io, &[window_of(src.bus()), window_of(dst.bus())])?;
    t.dom
        .map(p, dst.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;

    // 1. Level 3 above the destination: read only.
    let l3 = raw_entry(&t.dom, p, 3)?;
    check_eq!(
        l3 & (spec::PTE_R | spec::PTE_W),
        spec::PTE_R | spec::PTE_W,
        "the builder's level-3 entry allows both"
    );
    t.dom.table_mut().write_raw(p, 3, l3 & !spec::PTE_W);
    t.dom.invalidate_range(p, PAGE as u64)?;
    let c = t.q.run_fault(
        Descriptor::copy(io.src, p, PAGE as u32),
        (spec::FAULT_PERMISSION, p, true),
        "COPY into a read-write leaf under a level-3 entry without W",
    )?;
    check_eq!(c.bytes, 0, "bytes");
    let what = "destination under the read-only level-3 entry";
    check_bytes(&dst.read(), &before, what)?;
    let c = t.q.run_ok(
        Descriptor::crc32c(p, PAGE as u32),
        "CRC32C under a level-3 entry without W",
    )?;
    let crc = u64::from(crc32c(&before));
    check_eq!(c.result, crc, "CRC32C of the destination");

    // 2. Level 2 above the source: write only.
    let l2 = raw_entry(&t.dom, io.src, 2)?;
    t.dom.table_mut().write_raw(io.src, 2, l2 & !spec::PTE_R);
    // The COPY above may have cached the source's translation.
    t.dom.invalidate_range(io.src, PAGE as u64)?;
    t.q.run_fault(
        Descriptor::crc32c(io.src, 4),
        (spec::FAULT_PERMISSION, io.src, false),
        "CRC32C of a read-write leaf under a level-2 entry without R",
    )?;
    let pattern = rng.next_u64();
    t.q.run_ok(
        Descriptor::fill(io.src + 16, pattern, 8),
        "FILL under a level-2 entry without R",
    )?;
    data[16..24].copy_from_slice(&pattern.to_le_bytes());
    check_bytes(&src.read(), &data, "source page after the FILL")?;
    let faults = dstat(dev, 1, spec::DSTAT_FAULTS)?;
    check_eq!(faults, 2, "DSTAT_FAULTS of domain 1");

    // 3. Both entries restored: the leaves allow the COPY.
    t.dom.table_mut().write_raw(p, 3, l3);
    t.dom.table_mut().write_raw(io.src, 2, l2);
    t.dom.invalidate()?;
    t.q.run_ok(
        Descriptor::copy(io.src, p, PAGE as u32),
        "COPY with the entries restored",
    )?;
    check_bytes(&dst.read(), &data, "destination after the COPY")?;
    src.check_guards("source")?;
    dst.check_guards("destination")?;
    Ok(())
}

/// PTE bits 11:8 are free for software: set in the level-4, -3 and -2 entries and the
/// leaf on the source's walk and in the destination's leaf, they change nothing (the
/// domain is invalidated after the change, so every walk sees them): a COPY moves exactly
/// its range and a CRC32C reads the result back.
fn pte_bits_11_to_8_are_ignored(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let io = t.io;
    let mut rng = ctx.rng();
    let (_src, data) = t.map_new(io.src, PAGE, Perm::R, &mut rng)?;
    let (dst, before) = t.map_new(io.dst, PAGE, Perm::RW, &mut rng)?;
    for (iova, level, bits) in [
        (io.src, 4, 0x900),
        (io.src, 3, 0xa00),
        (io.src, 2, 0x500),
        (io.src, 1, 0xf00),
        (io.dst, 1, 0x300),
    ] {
        let e = raw_entry(&t.dom, iova, level)?;
        t.dom.table_mut().write_raw(iova, level, e | bits);
        check_eq!(
            raw_entry(&t.dom, iova, level)? & 0xf00,
            bits,
            "bits 11:8 of the level-{level} entry for IOVA {iova:#x}"
        );
    }
    t.dom.invalidate()?;

    t.q.run_ok(
        Descriptor::copy(io.src + 8, io.dst + 8, (PAGE - 16) as u32),
        "COPY through entries with bits 11:8 set",
    )?;
    let mut want = before.clone();
    want[8..PAGE - 8].copy_from_slice(&data[8..PAGE - 8]);
    check_bytes(&dst.read(), &want, "destination")?;
    dst.check_guards("destination")?;
    let c = t.q.run_ok(
        Descriptor::crc32c(io.dst, PAGE as u32),
        "CRC32C through a leaf with bits 11:8 set",
    )?;
    let crc = u64::from(crc32c(&want));
    check_eq!(c.result, crc, "CRC32C of the destination");
    Ok(())
}

/// A translated domain's IOVAs are not bus addresses: a buffer mapped at a domain IOVA is
/// reached there, but its own bus address is just an unmapped IOVA in the domain (a read
/// and a write there fault NOT_PRESENT and touch nothing). In pass-through domain 0 it is
/// the other way round: the bus address reaches the buffer and the domain IOVA is no
/// memory (OUTSIDE_RAM).
fn domain_iovas_are_not_bus_addresses(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let io = t.io;
    let mut rng = ctx.rng();
    let (buf, content) = t.map_new(io.data, PAGE, Perm::RW, &mut rng)?;
    check!(
        t.dom.table().translate(buf.bus()).is_none(),
        "the buffer's bus address {:#x} is mapped in domain 1's table",
        buf.bus()
    );
    let crc = u64::from(crc32c(&content));

    let what = "CRC32C at the domain IOVA";
    let c = t.q.run_ok(Descriptor::crc32c(io.data, PAGE as u32), what)?;
    check_eq!(c.result, crc, "{what}");
    t.q.run_fault(
        Descriptor::crc32c(buf.bus(), PAGE as u32),
        (spec::FAULT_NOT_PRESENT, buf.bus(), false),
        "CRC32C at the buffer's bus address in domain 1",
    )?;
    t.q.run_fault(
        Descriptor::fill(buf.bus(), rng.next_u64(), PAGE as u32),
        (spec::FAULT_NOT_PRESENT, buf.bus(), true),
        "FILL at the buffer's bus address in domain 1",
    )?;
    check_bytes(&buf.read(), &content, "buffer after the faulting FILL")?;

    // Domain 0, pass-through: queue 1 there.
    let mut q0 = RunQueue::passthrough(dev, (1, 16, 1), 2)?;
    let what = "CRC32C at the bus address in domain 0";
    let c = q0.run_ok(Descriptor::crc32c(buf.bus(), PAGE as u32), what)?;
    check_eq!(c.result, crc, "{what}");
    q0.run_fault(
        Descriptor::fill(io.data, rng.next_u64(), 64),
        (spec::FAULT_OUTSIDE_RAM, io.data, true),
        "FILL at domain 1's IOVA in pass-through domain 0",
    )?;
    q0.disable()?;
    check_bytes(&buf.read(), &content, "buffer at the end")?;
    buf.check_guards("buffer")?;
    Ok(())
}

/// Two translated domains map the same IOVAs (ring, completions, source, destination) to
/// different memory: each queue's COPY and FILL land in its own domain's buffers only, and
/// unmapping (with invalidation) a range in one domain makes it fault there while the other
/// domain still reaches its own memory at the same IOVA.
fn domains_mapping_the_same_iova_are_isolated(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut rng = ctx.rng();
    let len = 2 * PAGE;
    struct Side<'b> {
        t: Translated<'b>,
        src: Guarded,
        dst: Guarded,
        data: Vec<u8>,
        before: Vec<u8>,
    }
    let mut sides = Vec::new();
    for (domain, queue) in [(1, 0), (2, 1)] {
        let mut t = Translated::new(dev, domain, queue)?;
        let (src, data) = t.map_new(t.io.src, len, Perm::R, &mut rng)?;
        let (dst, before) = t.map_new(t.io.dst, len, Perm::RW, &mut rng)?;
        sides.push(Side {
            t,
            src,
            dst,
            data,
            before,
        });
    }
    let io = sides[0].t.io;

    // 1. A COPY in each domain: its own buffers only.
    for i in 0..2 {
        let s = &mut sides[i];
        let c = s.t.q.run(Descriptor::copy(io.src, io.dst, len as u32))?;
        check_status(&c, spec::STATUS_OK, format!("COPY in domain {}", i + 1))?;
        let o = &sides[1 - i];
        let other = if i == 0 { &o.before } else { &o.data };
        check_bytes(
            &o.dst.read(),
            other,
            format!(
                "domain {}'s destination after domain {}'s COPY",
                2 - i,
                i + 1
            ),
        )?;
        let s = &sides[i];
        check_bytes(
            &s.dst.read(),
            &s.data,
            format!("domain {}'s destination", i + 1),
        )?;
    }
    // 2. A FILL in domain 1 at the same IOVA.
    let pattern = rng.next_u64();
    let c = sides[0]
        .t
        .q
        .run(Descriptor::fill(io.dst, pattern, PAGE as u32))?;
    check_status(&c, spec::STATUS_OK, "FILL in domain 1")?;
    let mut want = sides[0].data.clone();
    for w in want[..PAGE].chunks_mut(8) {
        w.copy_from_slice(&pattern.to_le_bytes());
    }
    check_bytes(
        &sides[0].dst.read(),
        &want,
        "domain 1's destination after its FILL",
    )?;
    check_bytes(
        &sides[1].dst.read(),
        &sides[1].data,
        "domain 2's destination after domain 1's FILL",
    )?;

    // 3. Unmapped in domain 1 (with invalidation): faults there, domain 2 still works.
    sides[0].t.dom.unmap(io.dst, len as u64)?;
    let c = sides[0]
        .t
        .q
        .run(Descriptor::fill(io.dst, rng.next_u64(), PAGE as u32))?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        io.dst,
        true,
        "FILL in domain 1 after the unmap",
    )?;
    check_bytes(
        &sides[0].dst.read(),
        &want,
        "domain 1's destination after the unmap",
    )?;
    let fresh_before = rng.unique(len);
    sides[1].dst.write(0, &fresh_before);
    let c = sides[1]
        .t
        .q
        .run(Descriptor::copy(io.src, io.dst, len as u32))?;
    check_status(
        &c,
        spec::STATUS_OK,
        "COPY in domain 2 after domain 1's unmap",
    )?;
    check_bytes(
        &sides[1].dst.read(),
        &sides[1].data,
        "domain 2's destination after domain 1's unmap",
    )?;

    for (i, s) in sides.iter().enumerate() {
        let d = i as u32 + 1;
        check_bytes(&s.src.read(), &s.data, format!("domain {d}'s source"))?;
        s.src.check_guards(&format!("domain {d}'s source"))?;
        s.dst.check_guards(&format!("domain {d}'s destination"))?;
        check!(
            dstat(dev, d, spec::DSTAT_TRANSLATIONS)? > 0,
            "domain {d} counted no translations"
        );
        check_eq!(
            dstat(dev, d, spec::DSTAT_FAULTS)?,
            u64::from(d == 1),
            "DSTAT_FAULTS of domain {d}"
        );
    }
    Ok(())
}

// ---- Helpers (also used by the IOTLB scenarios) ----

/// One GiB.
pub(super) const GIB: u64 = 1 << 30;

/// One 2 MiB huge page of DMA memory (bus address 2 MiB aligned).
pub(super) fn huge_page(dev: &dyn DmaBackend) -> Result<DmaBuffer, Failure> {
    let b = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M))?;
    check_eq!(
        b.bus_addr() % PAGE_SIZE_2M as u64,
        0,
        "huge page bus address alignment"
    );
    Ok(b)
}

/// `n` 4 KiB pages, each its own allocation between two canary pages, in the reverse of
/// allocation order: no two are adjacent in bus memory.
fn scattered_pages(dev: &dyn DmaBackend, n: usize) -> Result<Vec<Guarded>, Failure> {
    let mut v = (0..n)
        .map(|_| Guarded::new(dev, PAGE, PAGE))
        .collect::<Result<Vec<_>, _>>()?;
    v.reverse();
    Ok(v)
}

/// Maps the single pages `pages` at consecutive 4 KiB IOVAs from `iova`.
fn map_pages(dom: &mut Domain<'_>, iova: u64, pages: &[Guarded], perm: Perm) -> TestResult {
    for (i, p) in pages.iter().enumerate() {
        check_eq!(p.len, PAGE, "length of page {i}");
        dom.map(
            iova + (i * PAGE) as u64,
            p.bus(),
            PAGE as u64,
            perm,
            PageSize::Size4K,
        )?;
    }
    Ok(())
}

/// Writes `data` across the single pages `pages`.
fn write_span(pages: &[Guarded], data: &[u8]) {
    for (p, d) in pages.iter().zip(data.chunks(PAGE)) {
        p.write(0, d);
    }
}

/// The single pages `pages`, one after the other.
fn read_span(pages: &[Guarded]) -> Vec<u8> {
    pages.iter().flat_map(Guarded::read).collect()
}

/// Checks the canaries around each of `pages`.
fn check_guards(pages: &[Guarded], what: &str) -> TestResult {
    for (i, p) in pages.iter().enumerate() {
        p.check_guards(&format!("{what}, page {i}"))?;
    }
    Ok(())
}

/// The 1 GiB-aligned bus window holding `bus`.
pub(super) fn window_of(bus: u64) -> u64 {
    bus & !(GIB - 1)
}

/// Where a 1 GiB leaf goes: IOVA `iova` maps the 1 GiB-aligned bus window at `bus`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Window1G {
    /// The leaf's IOVA (1 GiB aligned).
    pub(super) iova: u64,
    /// The bus window it maps (1 GiB aligned).
    pub(super) bus: u64,
}

impl Window1G {
    /// The IOVA of bus address `bus` (inside the window) through the leaf.
    pub(super) fn iova_of(&self, bus: u64) -> u64 {
        self.iova + (bus - self.bus)
    }
}

/// A 1 GiB-aligned IOVA whose level-3 entry serves nothing else: inside the IOVA width,
/// outside the gigabyte of the [`Iovas`] layout, and none of the bus windows in `avoid`
/// (so that an IOVA there is never the bus address of the memory it maps, and a device
/// that skipped the translation could not pass).
pub(super) fn spare_1g_slot(
    caps: &Capabilities,
    io: &Iovas,
    avoid: &[u64],
) -> Result<u64, Failure> {
    let layout = window_of(io.base);
    [layout + GIB, layout + 2 * GIB, 2 * GIB, GIB, 0]
        .into_iter()
        .find(|&s| {
            s.checked_add(GIB).is_some_and(|e| e <= caps.iova_limit())
                && s != layout
                && !avoid.contains(&s)
        })
        .ok_or_else(|| {
            Failure(format!(
                "no spare 1 GiB IOVA in a {}-bit IOVA space besides the layout at {:#x} and \
                 bus windows {avoid:#x?}",
                caps.iova_width, io.base
            ))
        })
}

/// `len` bytes of guarded DMA memory (canaries and all) inside one 1 GiB-aligned bus
/// window, and where a 1 GiB leaf maps that window ([`spare_1g_slot`]). An allocation
/// that straddles two windows is kept aside and another taken (at most 4 tries).
pub(super) fn alloc_in_1g_window(
    dev: &dyn DmaBackend,
    caps: &Capabilities,
    io: &Iovas,
    len: usize,
) -> Result<(Guarded, Window1G), Failure> {
    let mut straddling = Vec::new();
    for _ in 0..4 {
        let g = Guarded::new(dev, len, PAGE)?;
        let first = window_of(g.buf.bus_addr());
        let last = window_of(g.buf.bus_addr() + g.buf.len() as u64 - 1);
        if first == last {
            let iova = spare_1g_slot(caps, io, &[first])?;
            return Ok((g, Window1G { iova, bus: first }));
        }
        straddling.push(g);
    }
    Err(Failure(format!(
        "4 allocations of {len} bytes each straddled a 1 GiB bus boundary: {:#x?}",
        straddling
            .iter()
            .map(|g| g.buf.bus_addr())
            .collect::<Vec<_>>()
    )))
}
