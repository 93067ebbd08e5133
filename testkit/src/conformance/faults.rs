//! Conformance: every fault reason, the fault log, canaries.

use std::time::Instant;

use domdma_driver_model::domain::{disable_domain, invalidate, set_passthrough, write_domain};

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
        needs: &[Need::Interrupts],
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
    Scenario {
        area: Area::Faults,
        name: "not_present_stops_at_the_page_boundary",
        needs: &[Need::Interrupts, Need::Domains(2)],
        run: not_present_stops_at_the_page_boundary,
    },
    Scenario {
        area: Area::Faults,
        name: "not_present_whatever_the_other_bits",
        needs: &[Need::Domains(2)],
        run: not_present_whatever_the_other_bits,
    },
    Scenario {
        area: Area::Faults,
        name: "iova_width_faults_before_any_walk",
        needs: &[Need::IovaWidth(48), Need::Queues(2), Need::Domains(2)],
        run: iova_width_faults_before_any_walk,
    },
    Scenario {
        area: Area::Faults,
        name: "iova_width_32_faults_at_4_gib",
        needs: &[Need::IovaWidth(32), Need::Queues(2), Need::Domains(2)],
        run: iova_width_32_faults_at_4_gib,
    },
    Scenario {
        area: Area::Faults,
        name: "malformed_entries_at_every_level",
        needs: &[Need::Interrupts, Need::Domains(2)],
        run: malformed_entries_at_every_level,
    },
    Scenario {
        area: Area::Faults,
        name: "malformed_descriptor_faults_at_the_descriptor",
        needs: &[Need::Domains(2)],
        run: malformed_descriptor_faults_at_the_descriptor,
    },
    Scenario {
        area: Area::Faults,
        name: "misaligned_completion_writes_no_record",
        needs: &[],
        run: misaligned_completion_writes_no_record,
    },
    Scenario {
        area: Area::Faults,
        name: "outside_ram_in_pass_through",
        needs: &[],
        run: outside_ram_in_pass_through,
    },
    Scenario {
        area: Area::Faults,
        name: "outside_ram_tables_and_pages",
        needs: &[Need::Domains(2)],
        run: outside_ram_tables_and_pages,
    },
    Scenario {
        area: Area::Faults,
        name: "domain_disabled_halts_the_fetch",
        needs: &[Need::Interrupts, Need::Queues(2), Need::Domains(4)],
        run: domain_disabled_halts_the_fetch,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_log_overflow_counts_and_recovers",
        needs: &[Need::Interrupts],
        run: fault_log_overflow_counts_and_recovers,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_log_disabled_drops_every_fault",
        needs: &[Need::Interrupts],
        run: fault_log_disabled_drops_every_fault,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_log_bad_configuration_is_refused",
        needs: &[],
        run: fault_log_bad_configuration_is_refused,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_log_in_unmapped_memory_sets_error",
        needs: &[Need::Interrupts],
        run: fault_log_in_unmapped_memory_sets_error,
    },
    Scenario {
        area: Area::Faults,
        name: "fault_vector_is_programmable",
        needs: &[Need::Interrupts, Need::Queues(3)],
        run: fault_vector_is_programmable,
    },
    Scenario {
        area: Area::Faults,
        name: "completion_record_unwritable_counts_an_error",
        needs: &[Need::Domains(2)],
        run: completion_record_unwritable_counts_an_error,
    },
    Scenario {
        area: Area::Faults,
        name: "outside_ram_root_halts_the_fetch",
        needs: &[Need::Queues(2), Need::Domains(3)],
        run: outside_ram_root_halts_the_fetch,
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

/// A COPY into three pages of which only the first two are mapped moves exactly those two
/// and stops at the page boundary: DMA_ERROR / NOT_PRESENT at the first unmapped IOVA,
/// bytes = the mapped part, the page behind it untouched, a record with the missing
/// level-1 entry and the fault vector; an IOVA whose level-3 entry is missing faults at
/// level 3.
fn not_present_stops_at_the_page_boundary(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let mut t = Translated::new(dev, 2)?;
    let fv = t.caps.fault_vector();
    let io = t.io;
    let len = 3 * PAGE;
    let src = dev.alloc_dma(DmaRequest::new(len))?;
    let data = ctx.rng().unique(len);
    src.write(0, &data);
    t.dom.map_buffer(io.src, &src, Perm::R)?;
    let dst = Guarded::new(dev, len, PAGE)?;
    t.dom.map(
        io.dst,
        dst.bus(),
        2 * PAGE as u64,
        Perm::RW,
        PageSize::Size4K,
    )?;
    let seq = t.log.count()?;
    let errors0 = t.q.read_reg(spec::Q_ERRORS)?;
    drain_interrupts(dev)?;
    let c = run_desc(
        &mut t.q,
        &t.cpl,
        0,
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(1),
    )?;
    let hole = io.dst + 2 * PAGE as u64;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        hole,
        true,
        "COPY into 2 of 3 mapped pages",
    )?;
    check_eq!(
        (c.bytes, c.tag),
        (2 * PAGE as u32, 1),
        "bytes moved before the fault, tag"
    );
    let got = dst.read();
    check_bytes(&got[..2 * PAGE], &data[..2 * PAGE], "the two mapped pages")?;
    check_all(
        &got[2 * PAGE..],
        CANARY,
        "the page behind the missing mapping",
    )?;
    dst.check_guards("destination")?;
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_NOT_PRESENT,
            access: spec::ACCESS_WRITE,
            domain: 1,
            queue: 0,
            iova: hole,
            info: 0,
            level: 1,
            seq,
        },
        "the missing level-1 entry",
    )?;
    check!(
        dev.wait_interrupt(fv, IRQ_TIMEOUT)? > 0,
        "no interrupt on the fault vector {fv} for the record"
    );
    check_eq!(t.log.count()?, seq + 1, "REG_FLOG_COUNT");
    check_eq!(t.log.dropped()?, 0, "REG_FLOG_DROPPED");
    eventually("Q_ERRORS", errors0 + 1, || {
        Ok(t.q.read_reg(spec::Q_ERRORS)?)
    })?;

    // A level-3 entry that is not present: the walk stops there.
    let far = apart(&io) + 0x123;
    let c = run_desc(&mut t.q, &t.cpl, 1, Descriptor::crc32c(far, 10).with_tag(2))?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        far,
        false,
        "CRC32C under a missing level-3 entry",
    )?;
    check_eq!(c.bytes, 0, "bytes under a missing level-3 entry");
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_NOT_PRESENT,
            access: 0,
            domain: 1,
            queue: 0,
            iova: far,
            info: 0,
            level: 3,
            seq: seq + 1,
        },
        "the missing level-3 entry",
    )
}

/// An entry with R = W = 0 is not present whatever else is set (PS, reserved bits): a
/// read through it faults NOT_PRESENT, not MALFORMED_ENTRY. Restored, the mapping works.
fn not_present_whatever_the_other_bits(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1)?;
    let io = t.io;
    let src = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let data = ctx.rng().unique(PAGE);
    src.write(0, &data);
    t.dom.map_buffer(io.src, &src, Perm::R)?;
    let leaf = entry(&t.dom, io.src, 1)?;
    let rw = spec::PTE_R | spec::PTE_W;
    let bad = (leaf & !rw) | spec::PTE_PS | 0x7c | 1 << 60;
    t.dom.table_mut().write_raw(io.src, 1, bad);
    t.dom.invalidate()?;
    let seq = t.log.count()?;
    let c = run_desc(&mut t.q, &t.cpl, 0, Descriptor::crc32c(io.src + 8, 8))?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        io.src + 8,
        false,
        format!("CRC32C through the entry {bad:#x}"),
    )?;
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_NOT_PRESENT,
            access: 0,
            domain: 1,
            queue: 0,
            iova: io.src + 8,
            info: 0,
            level: 1,
            seq,
        },
        "a not-present entry with other bits set",
    )?;
    t.dom.table_mut().write_raw(io.src, 1, leaf);
    t.dom.invalidate()?;
    let c = run_desc(&mut t.q, &t.cpl, 0, Descriptor::crc32c(io.src + 8, 8))?;
    check_status(&c, spec::STATUS_OK, "CRC32C through the restored entry")?;
    check_eq!(
        c.result,
        u64::from(crc32c(&data[8..16])),
        "CRC32C through the restored entry"
    );
    Ok(())
}

/// With 48-bit IOVAs, 2^48 and u64::MAX - 4095 fault IOVA_WIDTH before any walk (record
/// level 0, info 0); the last page below 2^48 works and a transfer from it stops at the
/// width with that page done; a pass-through domain is limited the same way.
fn iova_width_faults_before_any_walk(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1)?;
    let io = t.io;
    let top = 1u64 << 48;
    let mut rng = ctx.rng();
    let src = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let data = rng.unique(PAGE);
    src.write(0, &data);
    t.dom.map_buffer(io.src, &src, Perm::R)?;
    let last = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let last_data = rng.unique(PAGE);
    last.write(0, &last_data);
    t.dom.map_buffer(top - PAGE as u64, &last, Perm::R)?;
    let mut seq = t.log.count()?;
    let width_rec = |iova: u64, access: u8, domain: u16, queue: u16, seq: u32| Rec {
        reason: spec::FAULT_IOVA_WIDTH,
        access,
        domain,
        queue,
        iova,
        info: 0,
        level: 0,
        seq,
    };

    for (d, iova, write, what) in [
        (Descriptor::copy(io.src, top, 64), top, true, "COPY to 2^48"),
        (
            Descriptor::crc32c(u64::MAX - 4095, 16),
            u64::MAX - 4095,
            false,
            "CRC32C at u64::MAX - 4095",
        ),
    ] {
        let c = run_desc(&mut t.q, &t.cpl, 0, d)?;
        check_fault(&c, spec::FAULT_IOVA_WIDTH, iova, write, what)?;
        check_eq!(c.bytes, 0, "{what}: bytes");
        let access = if write { spec::ACCESS_WRITE } else { 0 };
        expect_record(&mut t.log, width_rec(iova, access, 1, 0, seq), what)?;
        seq += 1;
    }

    let c = run_desc(
        &mut t.q,
        &t.cpl,
        0,
        Descriptor::crc32c(top - PAGE as u64, PAGE as u32),
    )?;
    check_status(&c, spec::STATUS_OK, "CRC32C of the last page below 2^48")?;
    check_eq!(
        c.result,
        u64::from(crc32c(&last_data)),
        "CRC32C of the last page below 2^48"
    );
    let c = run_desc(
        &mut t.q,
        &t.cpl,
        0,
        Descriptor::crc32c(top - PAGE as u64, 2 * PAGE as u32),
    )?;
    check_fault(
        &c,
        spec::FAULT_IOVA_WIDTH,
        top,
        false,
        "CRC32C running over 2^48",
    )?;
    check_eq!(c.bytes, PAGE as u32, "bytes below the width");
    expect_record(
        &mut t.log,
        width_rec(top, 0, 1, 0, seq),
        "CRC32C running over 2^48",
    )?;
    seq += 1;

    // Pass-through domain 0: the IOVA is the bus address, still limited by the width.
    let mut q1 = DmaQueue::new(dev, 1, 8, 1)?;
    let cpl1 = CompletionRecords::new(dev, 1)?;
    let c = run_desc(&mut q1, &cpl1, 0, Descriptor::fill(top + 0x1000, 0, 8))?;
    check_fault(
        &c,
        spec::FAULT_IOVA_WIDTH,
        top + 0x1000,
        true,
        "FILL beyond 2^48 in pass-through",
    )?;
    expect_record(
        &mut t.log,
        width_rec(top + 0x1000, spec::ACCESS_WRITE, 0, 1, seq),
        "FILL beyond 2^48 in pass-through",
    )?;
    check_bytes(&src.to_vec(0, PAGE), &data, "source afterwards")
}

/// With 32-bit IOVAs (`--iova-width 32`), 4 GiB faults IOVA_WIDTH before any walk even
/// where the domain's table maps it; the last page below 4 GiB works, a COPY from it stops
/// at 4 GiB with that page done; a pass-through domain works below 4 GiB and faults at it.
fn iova_width_32_faults_at_4_gib(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let io = Iovas::for_device(&caps);
    let mut log = FaultLog::enable(dev, 16, caps.fault_vector())?;
    // A table for 48-bit IOVAs, so that it can map 4 GiB; the device only takes 32 bits.
    let mut dom = Domain::translated(dev, 1, 48)?;
    let (mut q, cpl) = queue_in_domain(
        dev,
        &mut dom,
        QueueConfig::new(0, 16, 0),
        io.ring,
        io.cpl,
        1,
    )?;
    let four_g = 1u64 << 32;
    let below = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let data = ctx.rng().unique(PAGE);
    below.write(0, &data);
    dom.map_buffer(four_g - PAGE as u64, &below, Perm::R)?;
    let above = Guarded::new(dev, PAGE, PAGE)?;
    dom.map(four_g, above.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;
    let dst = Guarded::new(dev, 2 * PAGE, PAGE)?;
    dom.map(
        io.dst,
        dst.bus(),
        2 * PAGE as u64,
        Perm::RW,
        PageSize::Size4K,
    )?;
    let seq = log.count()?;

    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(four_g - PAGE as u64, io.dst, 2 * PAGE as u32),
    )?;
    check_fault(
        &c,
        spec::FAULT_IOVA_WIDTH,
        four_g,
        false,
        "COPY from the last page below 4 GiB on",
    )?;
    check_eq!(c.bytes, PAGE as u32, "bytes below 4 GiB");
    let got = dst.read();
    check_bytes(&got[..PAGE], &data, "the page below 4 GiB, copied")?;
    check_all(&got[PAGE..], CANARY, "destination after the fault")?;
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(four_g + 64, 0, 8))?;
    check_fault(
        &c,
        spec::FAULT_IOVA_WIDTH,
        four_g + 64,
        true,
        "FILL at 4 GiB + 64, mapped in the table",
    )?;
    check_all(&above.read(), CANARY, "the page mapped at 4 GiB")?;
    for (i, (iova, access)) in [(four_g, 0), (four_g + 64, spec::ACCESS_WRITE)]
        .into_iter()
        .enumerate()
    {
        expect_record(
            &mut log,
            Rec {
                reason: spec::FAULT_IOVA_WIDTH,
                access,
                domain: 1,
                queue: 0,
                iova,
                info: 0,
                level: 0,
                seq: seq + i as u32,
            },
            "a 32-bit IOVA width fault",
        )?;
    }

    // Pass-through: bus memory below 4 GiB works; 4 GiB faults.
    let mut q1 = DmaQueue::new(dev, 1, 8, 1)?;
    let cpl1 = CompletionRecords::new(dev, 1)?;
    let buf = Guarded::new(dev, 64, PAGE)?;
    let c = run_desc(
        &mut q1,
        &cpl1,
        0,
        Descriptor::fill(buf.bus(), 0x0101_0101_0101_0101, 64),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL below 4 GiB in pass-through")?;
    check_all(&buf.read(), 1, "FILL below 4 GiB in pass-through")?;
    buf.check_guards("FILL below 4 GiB in pass-through")?;
    let c = run_desc(&mut q1, &cpl1, 0, Descriptor::fill(four_g, 0, 64))?;
    check_fault(
        &c,
        spec::FAULT_IOVA_WIDTH,
        four_g,
        true,
        "FILL at 4 GiB in pass-through",
    )?;
    dst.check_guards("destination")?;
    above.check_guards("the page mapped at 4 GiB")
}

/// A malformed entry on the walk faults MALFORMED_ENTRY with the entry in the record's
/// info field and its level: a reserved bit (2 and 6 in a leaf, 63 in a level-2 entry, 52
/// in a level-3 entry), PS at level 1 (and at level 4 with 48-bit IOVAs), a 2 MiB and a 1
/// GiB leaf whose address is not aligned to its size; each record raises the fault
/// vector. Nothing is written; with the entry restored the same COPY works.
fn malformed_entries_at_every_level(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let mut t = Translated::new(dev, 1)?;
    let fv = t.caps.fault_vector();
    let io = t.io;
    let dst = Guarded::new(dev, 256, PAGE)?;
    t.dom
        .map(io.dst, dst.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;
    // Two pages: room for a large-page address that is not aligned.
    let src = dev.alloc_dma(DmaRequest::new(2 * PAGE))?;
    let data = ctx.rng().unique(PAGE);
    src.write(0, &data);
    let near = apart(&io);
    t.dom
        .map(near, src.bus_addr(), PAGE as u64, Perm::R, PageSize::Size4K)?;
    // Level-4 slot 2: the rings' slot keeps its entry (48-bit IOVAs only).
    let deep = 1u64 << 40;
    let wide = t.caps.iova_width > 40;
    if wide {
        t.dom
            .map(deep, src.bus_addr(), PAGE as u64, Perm::R, PageSize::Size4K)?;
    }
    let (e1, e2, e3) = (
        entry(&t.dom, near, 1)?,
        entry(&t.dom, near, 2)?,
        entry(&t.dom, near, 3)?,
    );
    let leaf_2m = Pte::leaf(misaligned(src.bus_addr(), 1 << 21), spec::PTE_R, true).raw();
    let leaf_1g = Pte::leaf(misaligned(src.bus_addr(), 1 << 30), spec::PTE_R, true).raw();
    let mut cases = vec![
        ("reserved bit 2 in a leaf", near, 1, e1 | 0x4),
        ("reserved bit 6 in a leaf", near, 1, e1 | 0x40),
        ("PS in a level-1 entry", near, 1, e1 | spec::PTE_PS),
        ("reserved bit 63 in a level-2 entry", near, 2, e2 | 1 << 63),
        ("a misaligned 2 MiB leaf", near, 2, leaf_2m),
        ("reserved bit 52 in a level-3 entry", near, 3, e3 | 1 << 52),
        ("a misaligned 1 GiB leaf", near, 3, leaf_1g),
    ];
    if wide {
        let e4 = entry(&t.dom, deep, 4)?;
        cases.push(("PS in a level-4 entry", deep, 4, e4 | spec::PTE_PS));
    } else {
        progress!("         (PS at level 4 needs 48-bit IOVAs: not checked here)");
    }
    let seq0 = t.log.count()?;
    drain_interrupts(dev)?;
    for (seq, (what, iova, level, bad)) in (seq0..).zip(cases) {
        let old = t
            .dom
            .table_mut()
            .write_raw(iova, level, bad)
            .ok_or_else(|| Failure(format!("{what}: no level-{level} entry for {iova:#x}")))?;
        t.dom.invalidate()?;
        let c = run_desc(
            &mut t.q,
            &t.cpl,
            0,
            Descriptor::copy(iova + 16, io.dst, 256),
        )?;
        check_fault(&c, spec::FAULT_MALFORMED_ENTRY, iova + 16, false, what)?;
        check_eq!(c.bytes, 0, "{what}: bytes");
        expect_record(
            &mut t.log,
            Rec {
                reason: spec::FAULT_MALFORMED_ENTRY,
                access: 0,
                domain: 1,
                queue: 0,
                iova: iova + 16,
                info: bad,
                level,
                seq,
            },
            what,
        )?;
        check!(
            dev.wait_interrupt(fv, IRQ_TIMEOUT)? > 0,
            "{what}: no interrupt on the fault vector {fv}"
        );
        check_all(&dst.read(), CANARY, format!("{what}: destination"))?;
        dst.check_guards(what)?;
        t.dom.table_mut().write_raw(iova, level, old);
        t.dom.invalidate()?;
    }
    for iova in [near, deep].into_iter().take(if wide { 2 } else { 1 }) {
        let c = run_desc(
            &mut t.q,
            &t.cpl,
            0,
            Descriptor::copy(iova + 16, io.dst, 256),
        )?;
        check_status(
            &c,
            spec::STATUS_OK,
            format!("COPY from {iova:#x} with the entries restored"),
        )?;
        check_bytes(
            &dst.read(),
            &data[16..272],
            "COPY with the entries restored",
        )?;
        dst.write(0, &[CANARY; 256]);
    }
    Ok(())
}

/// Every kind of malformed descriptor (unknown opcode or flag, reserved bytes, bad
/// lengths, overlapping COPY, BATCH of 0) completes with INVALID_DESCRIPTOR whose fault
/// address is the descriptor's own IOVA in the ring, and logs a DESCRIPTOR_INVALID record
/// for it (descriptor access, domain, queue, sequence number); no data is touched and the
/// queue goes on.
fn malformed_descriptor_faults_at_the_descriptor(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1)?;
    let io = t.io;
    let src = Guarded::new(dev, 2 * PAGE, PAGE)?;
    let dst = Guarded::new(dev, 2 * PAGE, PAGE)?;
    let data = ctx.rng().unique(2 * PAGE);
    src.write(0, &data);
    for (g, iova) in [(&src, io.src), (&dst, io.dst)] {
        t.dom
            .map(iova, g.bus(), 2 * PAGE as u64, Perm::RW, PageSize::Size4K)?;
    }
    let (s, d) = (io.src, io.dst);
    let copy = Descriptor::copy(s, d, 64);
    let reserved = |i: usize, v: u8| {
        let mut x = copy;
        x.reserved[i] = v;
        x
    };
    let mut cases: Vec<(&str, Descriptor)> = vec![
        (
            "unknown opcode",
            Descriptor {
                opcode: 0x7f,
                ..copy
            },
        ),
        (
            "undefined flag 0x04",
            Descriptor {
                flags: 0x04,
                ..copy
            },
        ),
        (
            "flag bit 7 with INTERRUPT",
            Descriptor {
                flags: 0x80 | spec::DESC_FLAG_INTERRUPT,
                ..copy
            },
        ),
        (
            "reserved byte 0x02",
            Descriptor {
                reserved_lo: 0x0001,
                ..copy
            },
        ),
        (
            "reserved byte 0x03",
            Descriptor {
                reserved_lo: 0x0100,
                ..copy
            },
        ),
        ("reserved byte 0x28", reserved(0, 1)),
        ("reserved byte 0x2d", reserved(5, 0x80)),
        ("reserved byte 0x3f", reserved(23, 1)),
        ("COPY of length 0", Descriptor::copy(s, d, 0)),
        ("FILL of length 0", Descriptor::fill(d, 1, 0)),
        ("COMPARE of length 0", Descriptor::compare(s, d, 0)),
        ("CRC32C of length 0", Descriptor::crc32c(s, 0)),
        (
            "NOP with a length",
            Descriptor {
                len: 4,
                ..Descriptor::nop()
            },
        ),
        ("overlapping COPY", Descriptor::copy(s, s + 100, 4096)),
        (
            "overlapping COPY, destination below",
            Descriptor::copy(s + 100, s, 4096),
        ),
        ("BATCH of 0 elements", Descriptor::batch(s, 0)),
    ];
    let max = t.caps.max_xfer;
    if max < u32::MAX {
        cases.push(("FILL above MAX_XFER", Descriptor::fill(d, 1, max + 1)));
        cases.push(("COPY above MAX_XFER", Descriptor::copy(s, d, max + 1)));
    }
    let errors0 = t.q.read_reg(spec::Q_ERRORS)?;
    let seq0 = t.log.count()?;
    for (i, (what, desc)) in cases.iter().enumerate() {
        let at = t.q.ring_iova() + u64::from(t.q.tail()) * spec::DESC_SIZE;
        let tag = 0x1000 + i as u64;
        let c = run_desc(&mut t.q, &t.cpl, 0, desc.with_tag(tag))?;
        check_status(&c, spec::STATUS_INVALID_DESCRIPTOR, what)?;
        check_eq!(
            (
                c.fault_reason,
                c.fault_access,
                c.fault_addr,
                c.bytes,
                c.result,
                c.tag
            ),
            (
                spec::FAULT_DESCRIPTOR_INVALID,
                spec::ACCESS_DESCRIPTOR,
                at,
                0,
                0,
                tag
            ),
            "{what}: (reason, access, fault_addr = the descriptor, bytes, result, tag)"
        );
        expect_record(
            &mut t.log,
            Rec {
                reason: spec::FAULT_DESCRIPTOR_INVALID,
                access: spec::ACCESS_DESCRIPTOR,
                domain: 1,
                queue: 0,
                iova: at,
                info: 0,
                level: 0,
                seq: seq0 + i as u32,
            },
            what,
        )?;
        check_bytes(&src.read(), &data, format!("{what}: source"))?;
        check_all(&dst.read(), CANARY, format!("{what}: destination"))?;
        src.check_guards(what)?;
        dst.check_guards(what)?;
    }
    let n = cases.len() as u32;
    eventually("Q_ERRORS", errors0 + n, || {
        Ok(t.q.read_reg(spec::Q_ERRORS)?)
    })?;
    check_eq!(
        t.q.status()? & spec::Q_STATUS_ERROR,
        0,
        "Q_STATUS error bit: malformed descriptors do not halt"
    );
    let c = run_desc(&mut t.q, &t.cpl, 0, copy.with_tag(1))?;
    check_status(&c, spec::STATUS_OK, "a valid COPY afterwards")?;
    check_bytes(&dst.read()[..64], &data[..64], "a valid COPY afterwards")
}

/// A descriptor whose completion address is not 32-byte aligned is malformed and gets no
/// record at all (the bytes there and around stay as they were); it is logged, counted
/// in Q_ERRORS and Q_COMPLETED, and its FILL does not run.
fn misaligned_completion_writes_no_record(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let rec = Guarded::new(dev, 64, PAGE)?;
    let dst = Guarded::new(dev, 64, PAGE)?;
    let at = q.ring_iova() + u64::from(q.tail()) * spec::DESC_SIZE;
    let errors0 = q.read_reg(spec::Q_ERRORS)?;
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;
    let seq = log.count()?;
    q.submit(&[Descriptor::fill(dst.bus(), !0, 64)
        .with_tag(3)
        .with_completion(rec.bus() + 8)])?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    expect_record(
        &mut log,
        Rec {
            reason: spec::FAULT_DESCRIPTOR_INVALID,
            access: spec::ACCESS_DESCRIPTOR,
            domain: 0,
            queue: 0,
            iova: at,
            info: 0,
            level: 0,
            seq,
        },
        "misaligned completion address",
    )?;
    eventually("Q_ERRORS", errors0 + 1, || Ok(q.read_reg(spec::Q_ERRORS)?))?;
    eventually("Q_COMPLETED", completed0 + 1, || {
        Ok(q.read_reg(spec::Q_COMPLETED)?)
    })?;
    check_all(
        &rec.read(),
        CANARY,
        "the records around the misaligned address",
    )?;
    rec.check_guards("the records around the misaligned address")?;
    check_all(&dst.read(), CANARY, "the malformed FILL's destination")?;
    dst.check_guards("the malformed FILL's destination")
}

/// In pass-through, DMA to or from a bus address the VMM never mapped faults OUTSIDE_RAM
/// with that address as the IOVA and in the record's info, at level 0 (no walk); nothing
/// is written.
fn outside_ram_in_pass_through(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(2 * PAGE as u64)?;
    let dst = Guarded::new(dev, 64, PAGE)?;
    let seq = log.count()?;
    let faults0 = qstat(dev, 0, spec::QSTAT_FAULTS)?;
    for (i, (d, iova, write, what)) in [
        (
            Descriptor::fill(hole + 0x10, 0x5a5a, 64),
            hole + 0x10,
            true,
            "FILL into the hole",
        ),
        (
            Descriptor::copy(hole + PAGE as u64 + 0x40, dst.bus(), 64),
            hole + PAGE as u64 + 0x40,
            false,
            "COPY out of the hole",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let c = run_desc(&mut q, &cpl, 0, d)?;
        check_fault(&c, spec::FAULT_OUTSIDE_RAM, iova, write, what)?;
        check_eq!(c.bytes, 0, "{what}: bytes");
        expect_record(
            &mut log,
            Rec {
                reason: spec::FAULT_OUTSIDE_RAM,
                access: if write { spec::ACCESS_WRITE } else { 0 },
                domain: 0,
                queue: 0,
                iova,
                info: iova,
                level: 0,
                seq: seq + i as u32,
            },
            what,
        )?;
    }
    check_all(
        &dst.read(),
        CANARY,
        "destination of the COPY out of the hole",
    )?;
    dst.check_guards("destination of the COPY out of the hole")?;
    check_eq!(
        qstat(dev, 0, spec::QSTAT_FAULTS)? - faults0,
        2,
        "QSTAT_FAULTS delta"
    );
    Ok(())
}

/// In a translated domain, a table or a page outside the memory the VMM mapped faults
/// OUTSIDE_RAM: a level-1 (or level-2) table outside it is a page-walk fault with the
/// table's address and level in the record; a leaf whose page is outside it faults when
/// the access happens (level 0, the page's bus address in the record), after the pages
/// before it.
fn outside_ram_tables_and_pages(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1)?;
    let io = t.io;
    let src = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let data = ctx.rng().unique(PAGE);
    src.write(0, &data);
    t.dom.map_buffer(io.src, &src, Perm::R)?;
    let dst = Guarded::new(dev, PAGE, PAGE)?;
    t.dom
        .map(io.dst, dst.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;
    let hole = dev.reserve_unmapped(4 * PAGE as u64)?;
    let mut seq = t.log.count()?;

    // 1. The level-2 entry above the source points at a level-1 table outside RAM.
    let rw = spec::PTE_R | spec::PTE_W;
    let old = entry(&t.dom, io.src, 2)?;
    t.dom
        .table_mut()
        .write_raw(io.src, 2, Pte::table(hole, rw).raw());
    t.dom.invalidate()?;
    let c = run_desc(
        &mut t.q,
        &t.cpl,
        0,
        Descriptor::copy(io.src + 8, io.dst, 64),
    )?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        io.src + 8,
        false,
        "COPY through a table outside RAM",
    )?;
    check_eq!(
        (c.fault_access, c.bytes),
        (spec::ACCESS_PAGE_WALK, 0),
        "COPY through a table outside RAM: (access, bytes)"
    );
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_OUTSIDE_RAM,
            access: spec::ACCESS_PAGE_WALK,
            domain: 1,
            queue: 0,
            iova: io.src + 8,
            info: hole,
            level: 1,
            seq,
        },
        "a table outside RAM",
    )?;
    seq += 1;
    t.dom.table_mut().write_raw(io.src, 2, old);
    t.dom.invalidate()?;

    // 2. A destination leaf whose page is outside RAM.
    let page = hole + PAGE as u64;
    t.dom
        .map(io.data, page, PAGE as u64, Perm::RW, PageSize::Size4K)?;
    let c = run_desc(&mut t.q, &t.cpl, 0, Descriptor::copy(io.src, io.data, 64))?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        io.data,
        true,
        "COPY to a page outside RAM",
    )?;
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_OUTSIDE_RAM,
            access: spec::ACCESS_WRITE,
            domain: 1,
            queue: 0,
            iova: io.data,
            info: page,
            level: 0,
            seq,
        },
        "a page outside RAM",
    )?;
    seq += 1;

    // 3. A source whose second page is outside RAM: the first is read, then the fault.
    let page = hole + 2 * PAGE as u64;
    t.dom.map(
        io.src + PAGE as u64,
        page,
        PAGE as u64,
        Perm::R,
        PageSize::Size4K,
    )?;
    let c = run_desc(
        &mut t.q,
        &t.cpl,
        0,
        Descriptor::crc32c(io.src, 2 * PAGE as u32),
    )?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        io.src + PAGE as u64,
        false,
        "CRC32C running onto a page outside RAM",
    )?;
    check_eq!(c.bytes, PAGE as u32, "bytes before the page outside RAM");
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_OUTSIDE_RAM,
            access: 0,
            domain: 1,
            queue: 0,
            iova: io.src + PAGE as u64,
            info: page,
            level: 0,
            seq,
        },
        "a source page outside RAM",
    )?;
    seq += 1;

    // 4. A level-3 entry (under another one than the rings') pointing at a level-2 table
    // outside RAM, on a write.
    let far = apart(&io);
    let page = Guarded::new(dev, PAGE, PAGE)?;
    t.dom
        .map(far, page.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;
    let table = hole + 3 * PAGE as u64;
    let old = entry(&t.dom, far, 3)?;
    t.dom
        .table_mut()
        .write_raw(far, 3, Pte::table(table, rw).raw());
    t.dom.invalidate()?;
    let c = run_desc(&mut t.q, &t.cpl, 0, Descriptor::fill(far, 0, 8))?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        far,
        true,
        "FILL through a level-2 table outside RAM",
    )?;
    check_eq!(
        c.fault_access,
        spec::ACCESS_WRITE | spec::ACCESS_PAGE_WALK,
        "access of a FILL through a level-2 table outside RAM"
    );
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_OUTSIDE_RAM,
            access: spec::ACCESS_WRITE | spec::ACCESS_PAGE_WALK,
            domain: 1,
            queue: 0,
            iova: far,
            info: table,
            level: 2,
            seq,
        },
        "a level-2 table outside RAM",
    )?;
    t.dom.table_mut().write_raw(far, 3, old);
    t.dom.invalidate()?;
    check_all(&page.read(), CANARY, "the page under the level-2 table")?;
    page.check_guards("the page under the level-2 table")?;
    check_all(&dst.read(), CANARY, "destination")?;
    dst.check_guards("destination")
}

/// A queue in a disabled domain halts at the descriptor fetch (HALT_DESC_FETCH, head at
/// the descriptor, not busy) with a DOMAIN_DISABLED record of a descriptor access and the
/// fault vector; once the domain is pass-through (and invalidated) RESUME runs that same
/// descriptor.
fn domain_disabled_halts_the_fetch(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let fv = caps.fault_vector();
    let mut log = FaultLog::enable(dev, 8, fv)?;
    check_eq!(
        read_domain(dev, 3)?.mode,
        spec::DOMAIN_MODE_DISABLED,
        "domain 3 after reset"
    );
    let mut q = DmaQueue::create(dev, QueueConfig::new(1, 8, 1).in_domain(3))?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let dst = Guarded::new(dev, 64, PAGE)?;
    let pattern = ctx.rng().next_u64();
    let seq = log.count()?;
    drain_interrupts(dev)?;
    cpl.clear(0);
    q.submit(&[Descriptor::fill(dst.bus(), pattern, 64)
        .with_tag(0xd15)
        .with_completion(cpl.bus_addr(0))])?;
    check_eq!(wait_halted(&q)?, spec::HALT_DESC_FETCH, "Q_HALT_REASON");
    let status = q.status()?;
    check_eq!(
        status & (spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR | spec::Q_STATUS_BUSY),
        spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR,
        "Q_STATUS of a queue halted at the fetch"
    );
    check_eq!(q.head()?, 0, "Q_HEAD at the unfetched descriptor");
    expect_record(
        &mut log,
        Rec {
            reason: spec::FAULT_DOMAIN_DISABLED,
            access: spec::ACCESS_DESCRIPTOR,
            domain: 3,
            queue: 1,
            iova: q.ring_iova(),
            info: 0,
            level: 0,
            seq,
        },
        "fetch in a disabled domain",
    )?;
    check!(
        dev.wait_interrupt(fv, IRQ_TIMEOUT)? > 0,
        "no interrupt on the fault vector {fv}"
    );
    check_pending(&q, &cpl, 0, "the unfetched descriptor")?;
    check_all(&dst.read(), CANARY, "destination while halted")?;
    check_eq!(
        dstat(dev, 3, spec::DSTAT_FAULTS)?,
        1,
        "DSTAT_FAULTS of domain 3"
    );

    set_passthrough(dev, 3, COMPLETION_TIMEOUT)?;
    q.resume()?;
    let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
    check_status(
        &c,
        spec::STATUS_OK,
        "the same FILL after the fix and RESUME",
    )?;
    check_eq!(c.tag, 0xd15, "tag");
    check_bytes(
        &dst.read(),
        &pattern.to_le_bytes().repeat(8),
        "FILL after RESUME",
    )?;
    dst.check_guards("FILL after RESUME")?;
    check_eq!(
        q.halt_reason()?,
        spec::HALT_NONE,
        "Q_HALT_REASON after RESUME"
    );
    Ok(())
}

/// A fault log of 4 records holds 3 (full when head + 1 == tail): of 5 faults 2 are
/// dropped and counted, OVERFLOW and PENDING are set, the fault vector fires once per
/// record written; the records hold sequence numbers 0..2. Once read, PENDING clears;
/// OVERFLOW stays until written 1; the next fault is record 3 with sequence number 5 and
/// the head wraps.
fn fault_log_overflow_counts_and_recovers(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let fv = caps.fault_vector();
    let mut log = FaultLog::enable(dev, 4, fv)?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(16 * PAGE as u64)?;
    let iova = |i: u64| hole + i * PAGE as u64 + 8 * i;
    drain_interrupts(dev)?;
    for i in 0..5 {
        let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(iova(i), 0, 8))?;
        check_fault(
            &c,
            spec::FAULT_OUTSIDE_RAM,
            iova(i),
            true,
            format!("fault {i}"),
        )?;
        // Taken one fault at a time: MSI-X is edge-triggered, and two interrupts that
        // arrive before the first is handled merge (QEMU and a guest kernel do merge them).
        irq_per_record(dev, fv, i < 3, &format!("fault {i}"))?;
    }
    eventually("REG_FLOG_COUNT", 5, || Ok(log.count()?))?;
    check_eq!(log.dropped()?, 2, "REG_FLOG_DROPPED");
    check_eq!(log.head()?, 3, "REG_FLOG_HEAD");
    check_eq!(
        log.status()?
            & (spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_PENDING | spec::FLOG_STATUS_ERROR),
        spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_PENDING,
        "REG_FLOG_STATUS with a full log"
    );

    let records = log.drain()?;
    check_eq!(records.len(), 3, "records in the log");
    for (i, r) in records.iter().enumerate() {
        let a = iova(i as u64);
        check_eq!(
            Rec::of(r),
            Rec {
                reason: spec::FAULT_OUTSIDE_RAM,
                access: spec::ACCESS_WRITE,
                domain: 0,
                queue: 0,
                iova: a,
                info: a,
                level: 0,
                seq: i as u32,
            },
            "record {i} ({r})"
        );
    }
    let status = log.status()?;
    check_eq!(
        status & (spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_PENDING),
        spec::FLOG_STATUS_OVERFLOW,
        "REG_FLOG_STATUS after reading the records (OVERFLOW until cleared)"
    );
    log.clear_status(spec::FLOG_STATUS_OVERFLOW)?;
    check_eq!(
        log.status()? & spec::FLOG_STATUS_OVERFLOW,
        0,
        "OVERFLOW after writing 1 to it"
    );
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(iova(9), 0, 8))?;
    check_fault(&c, spec::FAULT_OUTSIDE_RAM, iova(9), true, "fault 5")?;
    let r = log.wait(COMPLETION_TIMEOUT)?;
    check_eq!(
        (r.seq, r.iova),
        (5, iova(9)),
        "the record after recovery ({r})"
    );
    check_eq!(log.head()?, 0, "REG_FLOG_HEAD wrapped");
    check_eq!(log.dropped()?, 2, "REG_FLOG_DROPPED afterwards");
    check_eq!(
        count_interrupts(dev, fv, 1)?,
        1,
        "fault vector interrupts for the record after recovery"
    );
    Ok(())
}

/// With the fault log disabled (after reset) every fault is counted and counted as
/// dropped, without OVERFLOW, the head stays 0 and the fault vector stays silent.
fn fault_log_disabled_drops_every_fault(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let fv = caps.fault_vector();
    check_eq!(
        dev.read32(spec::REG_FLOG_CTRL)?,
        0,
        "REG_FLOG_CTRL after reset"
    );
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    drain_interrupts(dev)?;
    for i in 0..2u64 {
        let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(hole + 64 * i, 0, 8))?;
        check_fault(
            &c,
            spec::FAULT_OUTSIDE_RAM,
            hole + 64 * i,
            true,
            format!("fault {i}"),
        )?;
    }
    eventually(
        "REG_FLOG_COUNT",
        2,
        || Ok(dev.read32(spec::REG_FLOG_COUNT)?),
    )?;
    check_eq!(
        dev.read32(spec::REG_FLOG_DROPPED)?,
        2,
        "REG_FLOG_DROPPED with the log disabled"
    );
    check_eq!(
        dev.read32(spec::REG_FLOG_STATUS)? & spec::FLOG_STATUS_OVERFLOW,
        0,
        "FLOG_STATUS_OVERFLOW with the log disabled"
    );
    check_eq!(dev.read32(spec::REG_FLOG_HEAD)?, 0, "REG_FLOG_HEAD");
    check_eq!(
        dev.wait_interrupt(fv, NO_IRQ_WINDOW)?,
        0,
        "fault vector interrupts with the log disabled"
    );
    Ok(())
}

/// Enabling the fault log with a bad size (3, 1, 0, twice the maximum) or a base not
/// aligned to a record leaves it disabled with FLOG_STATUS_ERROR (write 1 to clear); a
/// power-of-two size from 2 to the maximum at an aligned base enables it.
fn fault_log_bad_configuration_is_refused(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let max = caps.fault_log_max;
    let buf = dev.alloc_dma(DmaRequest::new(max as usize * 32 + PAGE))?;
    let base = buf.bus_addr();
    let attempt = |base: u64, size: u32| -> Result<(u32, u32), Failure> {
        dev.write32(spec::REG_FLOG_CTRL, 0)?;
        dev.write32(spec::REG_FLOG_STATUS, spec::FLOG_STATUS_ERROR)?;
        dev.write32(spec::REG_FLOG_BASE_LO, base as u32)?;
        dev.write32(spec::REG_FLOG_BASE_HI, (base >> 32) as u32)?;
        dev.write32(spec::REG_FLOG_SIZE, size)?;
        dev.write32(spec::REG_FLOG_CTRL, spec::FLOG_CTRL_ENABLE)?;
        Ok((
            dev.read32(spec::REG_FLOG_CTRL)? & spec::FLOG_CTRL_ENABLE,
            dev.read32(spec::REG_FLOG_STATUS)? & spec::FLOG_STATUS_ERROR,
        ))
    };
    let result = (|| -> TestResult {
        for (what, b, size) in [
            ("size 3 (not a power of two)", base, 3),
            ("size 1", base, 1),
            ("size 0", base, 0),
            ("twice the maximum size", base, 2 * max),
            ("a base not aligned to a record", base + 16, 8),
        ] {
            check_eq!(
                attempt(b, size)?,
                (0, spec::FLOG_STATUS_ERROR),
                "fault log with {what}: (FLOG_CTRL enable bit, FLOG_STATUS_ERROR)"
            );
            dev.write32(spec::REG_FLOG_STATUS, spec::FLOG_STATUS_ERROR)?;
            check_eq!(
                dev.read32(spec::REG_FLOG_STATUS)? & spec::FLOG_STATUS_ERROR,
                0,
                "FLOG_STATUS_ERROR after writing 1 to it ({what})"
            );
        }
        for (what, b, size) in [
            ("size 2", base, 2),
            ("size 8", base, 8),
            ("the maximum size", base + 32, max),
        ] {
            check_eq!(
                attempt(b, size)?,
                (spec::FLOG_CTRL_ENABLE, 0),
                "fault log with {what}: (FLOG_CTRL enable bit, FLOG_STATUS_ERROR)"
            );
        }
        Ok(())
    })();
    dev.write32(spec::REG_FLOG_CTRL, 0)?;
    result
}

/// A fault log whose ring is in memory the VMM never mapped: the first fault cannot be
/// logged: it is counted and dropped, FLOG_STATUS_ERROR is set (write 1 to clear), the
/// head stays 0 and the fault vector stays silent.
fn fault_log_in_unmapped_memory_sets_error(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let fv = caps.fault_vector();
    let ring = dev.reserve_unmapped(PAGE as u64)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    dev.write32(spec::REG_FLOG_BASE_LO, ring as u32)?;
    dev.write32(spec::REG_FLOG_BASE_HI, (ring >> 32) as u32)?;
    dev.write32(spec::REG_FLOG_SIZE, 8)?;
    dev.write32(spec::REG_FLOG_CTRL, spec::FLOG_CTRL_ENABLE)?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    drain_interrupts(dev)?;
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(hole, 0, 8))?;
    check_fault(&c, spec::FAULT_OUTSIDE_RAM, hole, true, "FILL into a hole")?;
    // Refused at enable or failing at the first record: either way nothing is logged.
    eventually(
        "REG_FLOG_COUNT",
        1,
        || Ok(dev.read32(spec::REG_FLOG_COUNT)?),
    )?;
    check_eq!(dev.read32(spec::REG_FLOG_DROPPED)?, 1, "REG_FLOG_DROPPED");
    check_eq!(dev.read32(spec::REG_FLOG_HEAD)?, 0, "REG_FLOG_HEAD");
    let status = dev.read32(spec::REG_FLOG_STATUS)?;
    check!(
        status & spec::FLOG_STATUS_ERROR != 0,
        "FLOG_STATUS_ERROR not set with the log in unmapped memory ({status:#x})"
    );
    check_eq!(
        dev.wait_interrupt(fv, NO_IRQ_WINDOW)?,
        0,
        "fault vector interrupts without a record"
    );
    dev.write32(spec::REG_FLOG_STATUS, spec::FLOG_STATUS_ERROR)?;
    check_eq!(
        dev.read32(spec::REG_FLOG_STATUS)? & spec::FLOG_STATUS_ERROR,
        0,
        "FLOG_STATUS_ERROR after writing 1 to it"
    );
    dev.write32(spec::REG_FLOG_CTRL, 0)?;
    Ok(())
}

/// The fault vector is the last one after reset and programmable: with
/// REG_FLOG_MSIX_VECTOR = 2 three faults raise vector 2 three times and the default vector
/// never; moved to vector 1, the next fault raises vector 1 only.
fn fault_vector_is_programmable(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let fv = caps.fault_vector();
    check_eq!(
        dev.read32(spec::REG_FLOG_MSIX_VECTOR)?,
        u32::from(fv),
        "REG_FLOG_MSIX_VECTOR after reset: the last vector"
    );
    let mut log = FaultLog::enable(dev, 16, 2)?;
    check_eq!(
        dev.read32(spec::REG_FLOG_MSIX_VECTOR)?,
        2,
        "REG_FLOG_MSIX_VECTOR"
    );
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    drain_interrupts(dev)?;
    for i in 0..3u64 {
        let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(hole + 64 * i, 0, 8))?;
        check_fault(
            &c,
            spec::FAULT_OUTSIDE_RAM,
            hole + 64 * i,
            true,
            format!("fault {i}"),
        )?;
        irq_per_record(dev, 2, true, &format!("record {i} on vector 2"))?;
    }
    for v in [fv, 0] {
        check_eq!(
            dev.wait_interrupt(v, Duration::ZERO)?,
            0,
            "interrupts on vector {v}"
        );
    }
    check_eq!(log.drain()?.len(), 3, "records");
    dev.write32(spec::REG_FLOG_MSIX_VECTOR, 1)?;
    check_eq!(
        dev.read32(spec::REG_FLOG_MSIX_VECTOR)?,
        1,
        "REG_FLOG_MSIX_VECTOR moved"
    );
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(hole + 0x800, 0, 8))?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        hole + 0x800,
        true,
        "fault after moving the vector",
    )?;
    check_eq!(
        count_interrupts(dev, 1, 1)?,
        1,
        "interrupts on vector 1 after moving the fault vector"
    );
    check_eq!(
        dev.wait_interrupt(2, Duration::ZERO)?,
        0,
        "interrupts on the old fault vector 2"
    );
    Ok(())
}

/// A completion record that cannot be written is lost: in pass-through (its address
/// outside RAM) the transfer itself happened, a record OUTSIDE_RAM of a completion write
/// is logged with the address, Q_ERRORS and Q_COMPLETED count it, the head moves on and
/// the queue goes on; in a translated domain (its IOVA not mapped) the same with
/// NOT_PRESENT.
fn completion_record_unwritable_counts_an_error(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let dst = Guarded::new(dev, 64, PAGE)?;
    let pattern = ctx.rng().next_u64();
    let errors0 = q.read_reg(spec::Q_ERRORS)?;
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;
    let seq = log.count()?;
    q.submit(&[Descriptor::fill(dst.bus(), pattern, 64)
        .with_tag(5)
        .with_completion(hole)])?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    expect_record(
        &mut log,
        Rec {
            reason: spec::FAULT_OUTSIDE_RAM,
            access: spec::ACCESS_WRITE | spec::ACCESS_COMPLETION,
            domain: 0,
            queue: 0,
            iova: hole,
            info: hole,
            level: 0,
            seq,
        },
        "the lost completion record",
    )?;
    eventually("Q_ERRORS", errors0 + 1, || Ok(q.read_reg(spec::Q_ERRORS)?))?;
    eventually("Q_COMPLETED", completed0 + 1, || {
        Ok(q.read_reg(spec::Q_COMPLETED)?)
    })?;
    check_eq!(q.head()?, q.tail(), "Q_HEAD after the lost record");
    check_bytes(
        &dst.read(),
        &pattern.to_le_bytes().repeat(8),
        "the FILL itself happened",
    )?;
    dst.check_guards("FILL destination")?;
    let c = run_desc(&mut q, &cpl, 0, Descriptor::nop().with_tag(6))?;
    check_status(&c, spec::STATUS_OK, "a NOP afterwards")?;
    q.disable()?;
    drop(log);

    // In a translated domain: a completion IOVA that is not mapped (under a missing
    // level-3 entry).
    let mut t = Translated::new(dev, 1)?;
    let io = t.io;
    let dst = Guarded::new(dev, 64, PAGE)?;
    t.dom
        .map(io.dst, dst.bus(), PAGE as u64, Perm::RW, PageSize::Size4K)?;
    let nowhere = apart(&io);
    let errors0 = t.q.read_reg(spec::Q_ERRORS)?;
    let completed0 = t.q.read_reg(spec::Q_COMPLETED)?;
    let seq = t.log.count()?;
    t.q.submit(&[Descriptor::fill(io.dst, !pattern, 64)
        .with_tag(7)
        .with_completion(nowhere)])?;
    t.q.wait_idle(COMPLETION_TIMEOUT)?;
    expect_record(
        &mut t.log,
        Rec {
            reason: spec::FAULT_NOT_PRESENT,
            access: spec::ACCESS_WRITE | spec::ACCESS_COMPLETION,
            domain: 1,
            queue: 0,
            iova: nowhere,
            info: 0,
            level: 3,
            seq,
        },
        "the completion record at an unmapped IOVA",
    )?;
    eventually("Q_ERRORS", errors0 + 1, || {
        Ok(t.q.read_reg(spec::Q_ERRORS)?)
    })?;
    eventually("Q_COMPLETED", completed0 + 1, || {
        Ok(t.q.read_reg(spec::Q_COMPLETED)?)
    })?;
    check_bytes(
        &dst.read(),
        &(!pattern).to_le_bytes().repeat(8),
        "the FILL whose record was lost",
    )?;
    dst.check_guards("the FILL whose record was lost")
}

/// A translated domain whose root table is outside the memory the VMM mapped: a queue in
/// it halts at its first fetch (HALT_DESC_FETCH, head at the descriptor) with an
/// OUTSIDE_RAM record of a descriptor read in a page walk, the root's address and level 4;
/// no completion is written.
fn outside_ram_root_halts_the_fetch(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let root = dev.reserve_unmapped(PAGE as u64)?;
    write_domain(
        dev,
        2,
        DomainRegs {
            root,
            mode: spec::DOMAIN_MODE_TRANSLATED,
        },
    )?;
    invalidate(dev, Invalidation::Domain(2), COMPLETION_TIMEOUT)?;
    let result = (|| -> TestResult {
        let mut q = DmaQueue::create(dev, QueueConfig::new(1, 8, 1).in_domain(2))?;
        let cpl = CompletionRecords::new(dev, 1)?;
        let seq = log.count()?;
        cpl.clear(0);
        q.submit(&[Descriptor::nop()
            .with_tag(9)
            .with_completion(cpl.bus_addr(0))])?;
        check_eq!(wait_halted(&q)?, spec::HALT_DESC_FETCH, "Q_HALT_REASON");
        check_eq!(q.head()?, 0, "Q_HEAD at the unfetched descriptor");
        expect_record(
            &mut log,
            Rec {
                reason: spec::FAULT_OUTSIDE_RAM,
                access: spec::ACCESS_DESCRIPTOR | spec::ACCESS_PAGE_WALK,
                domain: 2,
                queue: 1,
                iova: q.ring_iova(),
                info: root,
                level: 4,
                seq,
            },
            "a root outside RAM",
        )?;
        check_pending(&q, &cpl, 0, "the NOP of a queue whose root is outside RAM")?;
        q.disable()?;
        Ok(())
    })();
    disable_domain(dev, 2, COMPLETION_TIMEOUT)?;
    result
}

/// A fault record's fields, compared in one go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    reason: u8,
    access: u8,
    domain: u16,
    queue: u16,
    iova: u64,
    info: u64,
    level: u32,
    seq: u32,
}

impl Rec {
    fn of(r: &spec::FaultRecord) -> Rec {
        Rec {
            reason: r.reason,
            access: r.access,
            domain: r.domain,
            queue: r.queue,
            iova: r.iova,
            info: r.info,
            level: r.level,
            seq: r.seq,
        }
    }
}

/// Waits for the next fault record and checks every field of it.
fn expect_record(log: &mut FaultLog<'_>, want: Rec, what: &str) -> TestResult {
    let r = log.wait(COMPLETION_TIMEOUT)?;
    check_eq!(Rec::of(&r), want, "{what}: fault record ({r})");
    Ok(())
}

/// Domain 1 translated, queue 0 in it (ring and completion records mapped at the
/// layout's IOVAs), a fault log of 32 records on the default fault vector.
struct Translated<'b> {
    dom: Domain<'b>,
    q: DmaQueue<'b>,
    cpl: CompletionRecords,
    log: FaultLog<'b>,
    io: Iovas,
    caps: Capabilities,
}

impl<'b> Translated<'b> {
    fn new(dev: &'b dyn DmaBackend, records: usize) -> Result<Self, Failure> {
        let caps = Capabilities::read(dev)?;
        let io = Iovas::for_device(&caps);
        let log = FaultLog::enable(dev, 32, caps.fault_vector())?;
        let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
        let (q, cpl) = queue_in_domain(
            dev,
            &mut dom,
            QueueConfig::new(0, 16, 0),
            io.ring,
            io.cpl,
            records,
        )?;
        Ok(Translated {
            dom,
            q,
            cpl,
            log,
            io,
            caps,
        })
    }
}

/// An IOVA under another level-3 entry than the layout's (so that corrupting or missing
/// entries above it leaves the rings alone), below 4 GiB in the 32-bit mode.
fn apart(io: &Iovas) -> u64 {
    io.base ^ (2 << 30)
}

/// The entry at `level` on the walk of `iova`.
fn entry(dom: &Domain<'_>, iova: u64, level: u32) -> Result<u64, Failure> {
    dom.table()
        .read_raw(iova, level)
        .ok_or_else(|| Failure(format!("no level-{level} entry for {iova:#x}")))
}

/// A page-aligned address in the two pages at `bus` that is not aligned to `size`.
fn misaligned(bus: u64, size: u64) -> u64 {
    if bus % size == 0 {
        bus + PAGE as u64
    } else {
        bus
    }
}

/// Interrupts on `vector`: waits until `want` arrived (at most [`IRQ_TIMEOUT`]), then for
/// [`NO_IRQ_WINDOW`] more; the total.
/// After one fault: an interrupt on `vector` when a record was written (`expected`), none
/// when the fault was dropped.
fn irq_per_record(dev: &dyn DmaBackend, vector: u16, expected: bool, what: &str) -> TestResult {
    if expected {
        check!(
            dev.wait_interrupt(vector, IRQ_TIMEOUT)? > 0,
            "{what}: no interrupt on vector {vector} for the record written"
        );
    } else {
        check_eq!(
            dev.wait_interrupt(vector, NO_IRQ_WINDOW)?,
            0,
            "{what}: interrupts on vector {vector} for a dropped fault"
        );
    }
    Ok(())
}

fn count_interrupts(dev: &dyn DmaBackend, vector: u16, want: u64) -> Result<u64, Failure> {
    let start = Instant::now();
    let mut n = 0;
    while n < want {
        let left = IRQ_TIMEOUT.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        n += dev.wait_interrupt(vector, left)?;
    }
    Ok(n + dev.wait_interrupt(vector, NO_IRQ_WINDOW)?)
}

/// Polls a register until it reads `want` (counters may move just after a completion),
/// for at most [`COMPLETION_TIMEOUT`].
fn eventually(what: &str, want: u32, mut read: impl FnMut() -> Result<u32, Failure>) -> TestResult {
    let start = Instant::now();
    loop {
        let got = read()?;
        if got == want {
            return Ok(());
        }
        if start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!(
                "{what}: {got:#x} after {COMPLETION_TIMEOUT:?}, expected {want:#x}"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
