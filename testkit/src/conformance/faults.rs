//! Conformance: every fault reason, the fault log, canaries.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Faults,
        name: "malformed_descriptor",
        needs: &[],
        run: malformed_descriptor,
    },
    Scenario {
        area: Area::Faults,
        name: "freed_dma_memory_is_unreachable",
        needs: &[Need::PlatformIommu],
        run: freed_dma_memory_is_unreachable,
    },
    Scenario {
        area: Area::Faults,
        name: "unmapped_address",
        needs: &[],
        run: unmapped_address,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_seen_from_guest",
        needs: &[],
        run: fault_seen_from_guest,
    },
    Scenario {
        area: Area::Faults,
        name: "descriptor_fetch_fault",
        needs: &[],
        run: descriptor_fetch_fault,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_log_overflow",
        needs: &[Need::Interrupts],
        run: fault_log_overflow,
    },
];

/// Malformed descriptors complete with INVALID_DESCRIPTOR and touch no memory but their
/// completion record; the queue keeps working afterwards.
fn malformed_descriptor(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = DmaQueue::new(dev, 0, 32, 0)?;
    let cases_len = 12;
    let cpl = CompletionRecords::new(dev, cases_len + 1)?;
    let size = 64 << 10;
    let src = dev.alloc_dma(DmaRequest::new(size))?;
    let dst = dev.alloc_dma(DmaRequest::new(size))?;
    src.fill(0, size, 0x11);
    const SENTINEL: u8 = 0x77;
    dst.fill(0, size, SENTINEL);
    let max_xfer = dev.read32(spec::REG_MAX_XFER)?;

    let fill = Descriptor::fill(dst.bus_addr(), 0xdead_beef_cafe_f00d, 4096);
    let copy = Descriptor::copy(src.bus_addr(), dst.bus_addr(), 4096);
    let tail = |mut d: Descriptor, i: usize, v: u8| {
        d.reserved[i] = v;
        d
    };
    let mut cases: Vec<(&str, Descriptor)> = vec![
        (
            "bad opcode 0xff",
            Descriptor {
                opcode: 0xff,
                ..fill
            },
        ),
        (
            "unknown flag 0x80",
            Descriptor {
                flags: 0x80,
                ..fill
            },
        ),
        (
            "unknown flag 0x04 with INTERRUPT",
            Descriptor {
                flags: 0x04 | spec::DESC_FLAG_INTERRUPT,
                ..copy
            },
        ),
        (
            "COPY with overlapping ranges",
            Descriptor::copy(dst.bus_addr(), dst.bus_addr() + 2048, 4096),
        ),
        (
            "COMPARE with len 0",
            Descriptor::compare(src.bus_addr(), dst.bus_addr(), 0),
        ),
        (
            "reserved u16 at 0x02 non-zero",
            Descriptor {
                reserved_lo: 0x0100,
                ..fill
            },
        ),
        ("reserved byte at 0x28 non-zero", tail(fill, 0, 1)),
        ("reserved byte at 0x3f non-zero", tail(copy, 23, 0x80)),
        ("FILL with len 0", Descriptor { len: 0, ..fill }),
        ("COPY with len 0", Descriptor { len: 0, ..copy }),
        (
            "NOP with len 8",
            Descriptor {
                opcode: spec::OP_NOP,
                len: 8,
                ..fill
            },
        ),
    ];
    if max_xfer < u32::MAX {
        cases.push((
            "FILL with len MAX_XFER + 1",
            Descriptor {
                len: max_xfer + 1,
                ..fill
            },
        ));
    }
    assert!(cases.len() <= cases_len);
    let errors0 = q.read_reg(spec::Q_ERRORS)?;

    let mut failures = Vec::new();
    for (i, (what, d)) in cases.iter().enumerate() {
        let tag = 0xbad0_0000 + i as u64;
        let c = run_desc(&mut q, &cpl, i, d.with_tag(tag))?;
        let mut problems = Vec::new();
        if c.status != spec::STATUS_INVALID_DESCRIPTOR {
            problems.push(format!(
                "status {:#x} ({})",
                c.status,
                domdma_driver_model::dma_queue::status_name(c.status)
            ));
        }
        if c.bytes != 0 {
            problems.push(format!("bytes {}", c.bytes));
        }
        if c.tag != tag {
            problems.push(format!("tag {:#x} (expected {tag:#x})", c.tag));
        }
        if let Err(Failure(m)) = check_all(&dst.to_vec(0, size), SENTINEL, "destination") {
            problems.push(m);
            dst.fill(0, size, SENTINEL);
        }
        if !problems.is_empty() {
            failures.push(format!("{what}: {}", problems.join(", ")));
        }
    }
    check!(failures.is_empty(), "{}", failures.join("; "));
    check_all(&src.to_vec(0, size), 0x11, "source")?;
    check_eq!(
        q.read_reg(spec::Q_ERRORS)?.wrapping_sub(errors0),
        cases.len() as u32,
        "Q_ERRORS delta"
    );
    check!(
        q.status()? & spec::Q_STATUS_ERROR == 0,
        "queue stopped with an error after malformed descriptors (Q_STATUS {:#x})",
        q.status()?
    );

    // The queue still works.
    let c = run_desc(&mut q, &cpl, cases_len, Descriptor { tag: 7, ..fill })?;
    check_status(&c, spec::STATUS_OK, "valid FILL after the malformed ones")?;
    check_all(
        &dst.to_vec(4096, size - 4096),
        SENTINEL,
        "bytes after the valid FILL",
    )?;
    Ok(())
}

/// DMA to or from a bus address that is not mapped fails with DMA_ERROR and the faulting
/// address, and writes nothing.
fn unmapped_address(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 8)?;
    let size = 64 << 10;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    let hole = dev.reserve_unmapped(size as u64)?;
    const SENTINEL: u8 = 0x3c;
    buf.fill(0, size, SENTINEL);
    let len = 8192u32;
    let in_range = |a: u64, base: u64| a >= base && a < base + u64::from(len);

    // 1. COPY into an unmapped destination.
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(buf.bus_addr(), hole, len).with_tag(1),
    )?;
    check_status(
        &c,
        spec::STATUS_DMA_ERROR,
        format!("COPY to unmapped {hole:#x}"),
    )?;
    check!(
        in_range(c.fault_addr, hole),
        "fault_addr {:#x} not in the unmapped destination {hole:#x}+{len:#x}",
        c.fault_addr
    );
    check_eq!(c.bytes, 0, "bytes completed into an unmapped destination");
    check_eq!(c.tag, 1, "tag");
    // In pass-through domain 0 the IOVA is the bus address, which the VMM never mapped.
    check_eq!(
        c.fault_reason,
        spec::FAULT_OUTSIDE_RAM,
        "fault reason of a COPY to an unmapped bus address"
    );
    check!(
        c.fault_access & spec::ACCESS_WRITE != 0,
        "fault access {:#x} of a COPY's destination is not a write",
        c.fault_access
    );

    // 2. COPY from an unmapped source: the mapped destination is untouched.
    let src_hole = hole + 0x4000;
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::copy(src_hole, buf.bus_addr(), len).with_tag(2),
    )?;
    check_status(
        &c,
        spec::STATUS_DMA_ERROR,
        format!("COPY from unmapped {src_hole:#x}"),
    )?;
    check!(
        in_range(c.fault_addr, src_hole),
        "fault_addr {:#x} not in the unmapped source {src_hole:#x}+{len:#x}",
        c.fault_addr
    );
    check_eq!(c.fault_reason, spec::FAULT_OUTSIDE_RAM, "fault reason");
    check!(
        c.fault_access & spec::ACCESS_WRITE == 0,
        "fault access {:#x} of a COPY's source is a write",
        c.fault_access
    );
    check_all(
        &buf.to_vec(0, size),
        SENTINEL,
        "destination of a COPY from an unmapped source",
    )?;

    // 3. The queue keeps working, and the buffer was never written.
    check_all(
        &buf.to_vec(0, size),
        SENTINEL,
        "mapped buffer after the faults",
    )?;
    let c = run_desc(
        &mut q,
        &cpl,
        3,
        Descriptor::fill(buf.bus_addr(), 0x4242, 4096),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL after the faults")?;
    check!(
        buf.to_vec(0, 2) == [0x42, 0x42],
        "FILL after the faults did not write"
    );
    Ok(())
}

/// Faults seen from the guest: a FILL to an unmapped IOVA of a translated domain completes
/// with DMA_ERROR / NOT_PRESENT, a record with the domain, queue, IOVA and level lands in
/// the fault log and the fault vector fires; a write to a read-only mapping and an IOVA
/// beyond the width fault the same way; nothing outside the mappings is touched and the
/// queue carries on.
fn fault_seen_from_guest(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.domains >= 2,
        "need 2 domains, the device has {}",
        caps.domains
    );
    let io = Iovas::for_device(&caps);
    let fv = caps.fault_vector();
    let mut log = FaultLog::enable(dev, 16, fv)?;
    let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
    let (mut q, cpl) = queue_in_domain(
        dev,
        &mut dom,
        QueueConfig::new(0, 16, 0),
        io.ring,
        io.cpl,
        8,
    )?;
    let size = 64 << 10;
    let half = size / 2;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    const RW_SENTINEL: u8 = 0x5a;
    const RO_SENTINEL: u8 = 0xa0;
    buf.fill(0, half, RW_SENTINEL);
    buf.fill(half, half, RO_SENTINEL);
    dom.map(
        io.data,
        buf.bus_addr(),
        half as u64,
        Perm::RW,
        PageSize::Size4K,
    )?;
    let ro = io.data + 0x10_0000;
    dom.map(
        ro,
        buf.bus_addr() + half as u64,
        half as u64,
        Perm::R,
        PageSize::Size4K,
    )?;
    let hole = io.data + half as u64;
    drain_interrupts(dev)?;
    let count0 = log.count()?;
    let check_untouched = |what: &str| -> TestResult {
        check_all(
            &buf.to_vec(0, half),
            RW_SENTINEL,
            format!("{what}: read-write half"),
        )?;
        check_all(
            &buf.to_vec(half, half),
            RO_SENTINEL,
            format!("{what}: read-only half"),
        )
    };

    // 1. Not present.
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(hole, 0x0bad, 8192).with_tag(1),
    )?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        hole,
        true,
        "FILL to an unmapped IOVA",
    )?;
    check_eq!(c.bytes, 0, "bytes of a FILL to an unmapped IOVA");
    check_eq!(c.tag, 1, "tag");
    let n = dev.wait_interrupt(fv, IRQ_TIMEOUT)?;
    check!(
        n > 0,
        "fault vector {fv} did not fire within {IRQ_TIMEOUT:?}"
    );
    let r = log.wait(COMPLETION_TIMEOUT)?;
    progress!("         fault record: {r}");
    check_eq!(r.reason, spec::FAULT_NOT_PRESENT, "record reason ({r})");
    check_eq!(r.domain, 1, "record domain ({r})");
    check_eq!(r.queue, 0, "record queue ({r})");
    check_eq!(r.iova, hole, "record IOVA ({r})");
    check!(
        r.is_write(),
        "record access {:#x} is not a write ({r})",
        r.access
    );
    check_eq!(
        r.access & (spec::ACCESS_DESCRIPTOR | spec::ACCESS_COMPLETION),
        0,
        "record access: not a descriptor or completion access ({r})"
    );
    // The walk stops at the first not-present entry: the lowest level whose table exists.
    let want_level = (1..=4u32)
        .find(|&l| dom.table().entry_addr(hole, l).is_some())
        .unwrap_or(4);
    check_eq!(r.level, want_level, "record level ({r})");
    check_eq!(r.seq, count0, "record sequence number ({r})");
    check_eq!(log.count()?, count0 + 1, "REG_FLOG_COUNT");
    check_untouched("after the not-present fault")?;

    // 2. Write to a read-only mapping; reading through it works.
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::fill(ro, 0x0bad, 4096).with_tag(2),
    )?;
    check_fault(
        &c,
        spec::FAULT_PERMISSION,
        ro,
        true,
        "FILL into a read-only mapping",
    )?;
    let r = log.wait(COMPLETION_TIMEOUT)?;
    check_eq!(
        (r.reason, r.domain, r.queue, r.iova, r.is_write()),
        (spec::FAULT_PERMISSION, 1, 0, ro, true),
        "permission fault record ({r})"
    );
    check_untouched("after the permission fault")?;
    let c = run_desc(
        &mut q,
        &cpl,
        2,
        Descriptor::copy(ro, io.data, 4096).with_tag(3),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY out of the read-only mapping")?;
    check_all(
        &buf.to_vec(0, 4096),
        RO_SENTINEL,
        "copied from the read-only half",
    )?;
    check_all(
        &buf.to_vec(4096, half - 4096),
        RW_SENTINEL,
        "rest of the read-write half",
    )?;
    buf.fill(0, half, RW_SENTINEL);

    // 3. An IOVA beyond the width.
    let beyond = caps.iova_limit();
    let c = run_desc(
        &mut q,
        &cpl,
        3,
        Descriptor::fill(beyond, 0x0bad, 4096).with_tag(4),
    )?;
    check_fault(
        &c,
        spec::FAULT_IOVA_WIDTH,
        beyond,
        true,
        "FILL beyond the IOVA width",
    )?;
    let r = log.wait(COMPLETION_TIMEOUT)?;
    check_eq!(
        (r.reason, r.iova, r.level),
        (spec::FAULT_IOVA_WIDTH, beyond, 0),
        "IOVA width fault record ({r})"
    );
    check_untouched("after the IOVA width fault")?;

    // 4. The queue went on (no HALT_ON_FAULT); the log is drained; counters agree.
    let c = run_desc(
        &mut q,
        &cpl,
        4,
        Descriptor::fill(io.data, 0x4242_4242_4242_4242, 4096),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL after the faults")?;
    check_all(&buf.to_vec(0, 4096), 0x42, "FILL after the faults")?;
    check_eq!(q.status()? & spec::Q_STATUS_ERROR, 0, "Q_STATUS error bit");
    check_eq!(q.halt_reason()?, spec::HALT_NONE, "Q_HALT_REASON");
    check_eq!(log.pending()?, 0, "records left in the log");
    let status = log.status()?;
    check_eq!(
        status & (spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_ERROR | spec::FLOG_STATUS_PENDING),
        0,
        "REG_FLOG_STATUS ({status:#x})"
    );
    check_eq!(log.dropped()?, 0, "REG_FLOG_DROPPED");
    check_eq!(qstat(dev, 0, spec::QSTAT_FAULTS)?, 3, "QSTAT_FAULTS");
    check_eq!(qstat(dev, 0, spec::QSTAT_ERRORS)?, 3, "QSTAT_ERRORS");
    check_eq!(q.read_reg(spec::Q_ERRORS)?, 3, "Q_ERRORS");
    check!(
        dstat(dev, 1, spec::DSTAT_FAULTS)? >= 2,
        "DSTAT_FAULTS of domain 1 is {}",
        dstat(dev, 1, spec::DSTAT_FAULTS)?
    );
    // Three records, three fault interrupts (possibly merged), no completion interrupt.
    check_eq!(
        dev.wait_interrupt(0, Duration::ZERO)?,
        0,
        "queue vector 0 interrupts"
    );
    q.disable()?;
    Ok(())
}

/// A ring whose IOVA is not mapped in the queue's domain: the fetch faults (a record with
/// ACCESS_DESCRIPTOR at the ring's IOVA), the queue halts with HALT_DESC_FETCH at that
/// descriptor; after the ring is mapped, RESUME fetches and runs it.
fn descriptor_fetch_fault(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.domains >= 2,
        "need 2 domains, the device has {}",
        caps.domains
    );
    let io = Iovas::for_device(&caps);
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
    let mut cpl = CompletionRecords::new(dev, 1)?;
    dom.map_buffer(io.cpl, cpl.buffer(), Perm::RW)?;
    cpl.set_device_base(io.cpl);
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;
    buf.fill(0, 4096, 0x10);
    dom.map_buffer(io.data, &buf, Perm::RW)?;
    let cfg = QueueConfig::new(0, 8, 0).in_domain(1);
    let ring = dev.alloc_dma(DmaRequest::new(cfg.ring_bytes()))?;
    let mut q = DmaQueue::with_ring(dev, cfg, ring, io.ring)?;

    cpl.clear(0);
    q.submit(&[Descriptor::fill(io.data, 0x6060_6060_6060_6060, 4096)
        .with_tag(0xfe7c)
        .with_completion(cpl.device_addr(0))])?;
    check_eq!(wait_halted(&q)?, spec::HALT_DESC_FETCH, "Q_HALT_REASON");
    check_eq!(q.head()?, 0, "Q_HEAD at the unfetchable descriptor");
    let r = log.wait(COMPLETION_TIMEOUT)?;
    progress!("         fault record: {r}");
    check_eq!(
        (r.reason, r.domain, r.queue, r.iova),
        (spec::FAULT_NOT_PRESENT, 1, 0, io.ring),
        "descriptor fetch fault record ({r})"
    );
    check!(
        r.access & spec::ACCESS_DESCRIPTOR != 0 && !r.is_write(),
        "record access {:#x} is not a descriptor read ({r})",
        r.access
    );
    check_pending(&q, &cpl, 0, "the unfetched descriptor")?;
    check_all(
        &buf.to_vec(0, 4096),
        0x10,
        "buffer before the ring is mapped",
    )?;

    // Map the ring (a new mapping: no invalidation needed) and retry.
    dom.map(io.ring, q.ring_bus_addr(), 4096, Perm::R, PageSize::Size4K)?;
    q.resume()?;
    let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
    check_status(
        &c,
        spec::STATUS_OK,
        "FILL after mapping the ring and RESUME",
    )?;
    check_eq!(c.tag, 0xfe7c, "tag");
    check_all(&buf.to_vec(0, 4096), 0x60, "buffer after RESUME")?;
    check_eq!(
        q.halt_reason()?,
        spec::HALT_NONE,
        "Q_HALT_REASON after RESUME"
    );
    q.disable()?;
    Ok(())
}

/// A fault log of 2 records holds one: further faults are dropped, counted, and flagged
/// with FLOG_STATUS_OVERFLOW (write 1 to clear); once the driver reads the record there is
/// room again.
fn fault_log_overflow(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 2, caps.fault_vector())?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let hole = dev.reserve_unmapped(4096)?;
    for i in 0..3 {
        let c = run_desc(
            &mut q,
            &cpl,
            i,
            Descriptor::fill(hole, 0, 4096).with_tag(i as u64),
        )?;
        check_fault(&c, spec::FAULT_OUTSIDE_RAM, hole, true, format!("FILL {i}"))?;
    }
    check_eq!(log.count()?, 3, "REG_FLOG_COUNT");
    check_eq!(log.dropped()?, 2, "REG_FLOG_DROPPED");
    let status = log.status()?;
    check!(
        status & spec::FLOG_STATUS_OVERFLOW != 0,
        "FLOG_STATUS_OVERFLOW not set ({status:#x})"
    );
    check!(
        status & spec::FLOG_STATUS_PENDING != 0,
        "FLOG_STATUS_PENDING not set with a record waiting ({status:#x})"
    );
    let records = log.drain()?;
    check_eq!(records.len(), 1, "records logged ({records:?})");
    check_eq!(
        (records[0].reason, records[0].seq, records[0].iova),
        (spec::FAULT_OUTSIDE_RAM, 0, hole),
        "the logged record ({})",
        records[0]
    );
    log.clear_status(spec::FLOG_STATUS_OVERFLOW)?;
    check_eq!(
        log.status()? & (spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_PENDING),
        0,
        "REG_FLOG_STATUS after draining and clearing"
    );
    // Room again.
    let c = run_desc(&mut q, &cpl, 3, Descriptor::fill(hole, 0, 4096).with_tag(3))?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        hole,
        true,
        "FILL after draining",
    )?;
    let r = log.wait(COMPLETION_TIMEOUT)?;
    check_eq!(r.seq, 3, "sequence number of the fourth fault ({r})");
    check_eq!(log.dropped()?, 2, "REG_FLOG_DROPPED afterwards");
    Ok(())
}

/// Behind a platform IOMMU, DMA memory a driver freed is unmapped: the device's FILL at
/// its bus address fails with OUTSIDE_RAM at that address. (A VMM's own guest RAM, the
/// in-process and vfio-user back ends', stays mapped after a driver frees a buffer in it,
/// as RAM does.)
fn freed_dma_memory_is_unreachable(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 8)?;
    // FILL at the bus address of a buffer that was mapped and has been freed.
    let gone = dev.alloc_dma(DmaRequest::new(4096))?;
    let gone_addr = gone.bus_addr();
    drop(gone);
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(gone_addr, 0x0f0f, 4096).with_tag(3),
    )?;
    check_status(
        &c,
        spec::STATUS_DMA_ERROR,
        format!("FILL at freed {gone_addr:#x}"),
    )?;
    check_eq!(
        c.fault_addr,
        gone_addr,
        "fault_addr of a FILL at a freed buffer"
    );
    check_eq!(c.fault_reason, spec::FAULT_OUTSIDE_RAM, "fault reason");

    Ok(())
}
