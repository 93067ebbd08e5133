//! Conformance: translated domains: leaves of every size, permissions.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[Scenario {
    area: Area::Domains,
    name: "translated_domain_2m",
    needs: &[Need::HugePages(4), Need::Domains(2)],
    run: translated_domain_2m,
}];

/// A COPY through a translated domain mapped with 2 MiB leaves, between huge-page buffers:
/// the device works on domain IOVAs (not the bus addresses), the two source pages are
/// mapped in swapped order so the result proves the translation, and the bus addresses
/// themselves fault in that domain.
fn translated_domain_2m(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.domains >= 2,
        "need 2 domains, the device has {}",
        caps.domains
    );
    check!(
        caps.supports_page(PageSize::Size2M),
        "REG_CAP_PGSIZES {:#x} lacks 2 MiB",
        caps.page_sizes
    );
    let io = Iovas::for_device(&caps);
    let two_m = PAGE_SIZE_2M as u64;
    let len = 2 * PAGE_SIZE_2M;

    let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
    let (mut q, cpl) = queue_in_domain(
        dev,
        &mut dom,
        QueueConfig::new(0, 16, 0),
        io.ring,
        io.cpl,
        4,
    )?;
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
    dom.map(
        io.src,
        src.bus_addr() + two_m,
        two_m,
        Perm::R,
        PageSize::Size2M,
    )?;
    dom.map(
        io.src + two_m,
        src.bus_addr(),
        two_m,
        Perm::R,
        PageSize::Size2M,
    )?;
    dom.map(
        io.dst,
        dst.bus_addr(),
        2 * two_m,
        Perm::RW,
        PageSize::Size2M,
    )?;
    let m = dom
        .table()
        .translate(io.src + 0x1234)
        .ok_or_else(|| Failure("software walk: source IOVA not mapped".into()))?;
    check_eq!(m.bus, src.bus_addr() + two_m + 0x1234, "software walk");
    check_eq!(m.page, PageSize::Size2M, "software walk page size");
    check_eq!(
        dom.table().read_raw(io.src, 2),
        Some((src.bus_addr() + two_m) | spec::PTE_R | spec::PTE_PS),
        "level-2 leaf entry"
    );
    progress!(
        "         domain 1: root {:#x}, {} tables; IOVA {:#x} -> bus {:#x} (2 MiB leaves)",
        dom.table().root(),
        dom.table().table_count(),
        io.src,
        src.bus_addr() + two_m
    );

    let data = ctx.rng().bytes(len);
    src.write(0, &data);
    dst.fill(0, len, 0xee);
    // What the device sees at IOVA src: the second page, then the first.
    let view: Vec<u8> = [&data[PAGE_SIZE_2M..], &data[..PAGE_SIZE_2M]].concat();

    // 1. 4 MiB across both pages of each side.
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(0x2d2d),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY 4 MiB through domain 1")?;
    check_eq!(c.bytes, len as u32, "bytes");
    check_eq!(c.tag, 0x2d2d, "tag");
    check_eq!(c.fault_addr, 0, "fault_addr");
    check_bytes(
        &dst.to_vec(0, len),
        &view,
        "destination (pages swapped by the mapping)",
    )?;
    check_bytes(&src.to_vec(0, len), &data, "source after the copy")?;

    // 2. 1 MiB whose source crosses the IOVA boundary between the two 2 MiB pages.
    let (off, n) = (PAGE_SIZE_2M / 2 + PAGE_SIZE_2M / 4, 1 << 20);
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::copy(io.src + off as u64, io.dst + 0x1000, n as u32).with_tag(2),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY across the 2 MiB boundary")?;
    let mut want = view.clone();
    want[0x1000..0x1000 + n].copy_from_slice(&view[off..off + n]);
    check_bytes(
        &dst.to_vec(0, len),
        &want,
        "destination after the boundary copy",
    )?;

    // 3. In domain 1 a bus address is just an unmapped IOVA.
    let c = run_desc(
        &mut q,
        &cpl,
        2,
        Descriptor::fill(dst.bus_addr(), 0x1111, 4096).with_tag(3),
    )?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        dst.bus_addr(),
        true,
        "FILL at the buffer's bus address in domain 1",
    )?;
    check_bytes(
        &dst.to_vec(0, len),
        &want,
        "destination after the faulting FILL",
    )?;

    // 4. Every access went through domain 1: descriptors, data and completions.
    let tr1 = dstat(dev, 1, spec::DSTAT_TRANSLATIONS)?;
    let miss1 = dstat(dev, 1, spec::DSTAT_IOTLB_MISSES)?;
    let walks1 = dstat(dev, 1, spec::DSTAT_PAGE_WALKS)?;
    progress!(
        "         domain 1: {tr1} translations, {} hits, {miss1} misses, {walks1} walks",
        dstat(dev, 1, spec::DSTAT_IOTLB_HITS)?
    );
    check!(tr1 > 0, "domain 1 counted no translations");
    check!(miss1 >= 1, "domain 1 counted no IOTLB miss");
    check!(walks1 >= 1, "domain 1 counted no page walk");
    check_eq!(
        dstat(dev, 0, spec::DSTAT_TRANSLATIONS)?,
        0,
        "translations in domain 0 (unused)"
    );
    check!(
        qstat(dev, 0, spec::QSTAT_BYTES)? >= (len + n) as u64,
        "QSTAT_BYTES {} below the {} bytes copied",
        qstat(dev, 0, spec::QSTAT_BYTES)?,
        len + n
    );
    q.disable()?;
    Ok(())
}
