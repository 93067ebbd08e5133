//! Conformance: every fault reason, the fault log, canaries.

use std::time::Instant;

use domdma_driver_model::domain::{disable_domain, invalidate, set_passthrough, write_domain};

use domdma_device::spec::fault_reason_name;

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
    let mut q = RunQueue::passthrough(dev, (0, 32, 0), 8)?;
    let size = 64 << 10;
    let src = dev.alloc_dma(DmaRequest::new(size))?;
    let dst = dev.alloc_dma(DmaRequest::new(size))?;
    src.fill(0, size, 0x11);
    const SENTINEL: u8 = 0x77;
    dst.fill(0, size, SENTINEL);
    let max_xfer = dev.read32(spec::REG_MAX_XFER)?;
    let cases = malformed_descriptors(src.bus_addr(), dst.bus_addr(), max_xfer);
    let errors0 = q.read_reg(spec::Q_ERRORS)?;

    let mut failures = Vec::new();
    for (i, (what, d)) in cases.iter().enumerate() {
        let tag = 0xbad0_0000 + i as u64;
        let c = q.run(d.with_tag(tag))?;
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
    let fill = Descriptor::fill(dst.bus_addr(), 0xdead_beef_cafe_f00d, 4096);
    q.run_ok(fill.with_tag(7), "valid FILL after the malformed ones")?;
    let rest = dst.to_vec(4096, size - 4096);
    check_all(&rest, SENTINEL, "bytes after the valid FILL")?;
    Ok(())
}

/// DMA to or from a bus address that is not mapped fails with DMA_ERROR and the faulting
/// address, and writes nothing.
fn unmapped_address(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 8)?;
    let size = 64 << 10;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    let hole = dev.reserve_unmapped(size as u64)?;
    const SENTINEL: u8 = 0x3c;
    buf.fill(0, size, SENTINEL);
    let len = 8192u32;
    let (b, src_hole) = (buf.bus_addr(), hole + 0x4000);

    // A COPY into the unmapped range, and one out of it into the mapped buffer: in
    // pass-through domain 0 the IOVA is the bus address, which the VMM never mapped.
    for (tag, d, base, write, what) in [
        (
            1,
            Descriptor::copy(b, hole, len),
            hole,
            true,
            "COPY to unmapped",
        ),
        (
            2,
            Descriptor::copy(src_hole, b, len),
            src_hole,
            false,
            "COPY from unmapped",
        ),
    ] {
        let what = format!("{what} {base:#x}");
        let c = q.run(d.with_tag(tag))?;
        check_status(&c, spec::STATUS_DMA_ERROR, &what)?;
        check!(
            c.fault_addr >= base && c.fault_addr < base + u64::from(len),
            "{what}: fault_addr {:#x} not in the unmapped range {base:#x}+{len:#x}",
            c.fault_addr
        );
        check_eq!(
            (c.bytes, c.tag, c.fault_reason),
            (0, tag, spec::FAULT_OUTSIDE_RAM),
            "{what}: (bytes, tag, fault reason)"
        );
        check_eq!(
            c.fault_access & spec::ACCESS_WRITE != 0,
            write,
            "{what}: the write bit of fault access {:#x}",
            c.fault_access
        );
        let mapped = buf.to_vec(0, size);
        check_all(&mapped, SENTINEL, format!("mapped buffer after the {what}"))?;
    }

    // The queue keeps working.
    let fill = Descriptor::fill(b, 0x4242, 4096);
    q.run_ok(fill, "FILL after the faults")?;
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
    let fv = armed_fault_vector(dev)?;
    let mut t = Translated::new(dev, 1, 0)?;
    let (caps, io) = (t.caps, t.io);
    let mut log = t.fault_log(16)?;
    let size = 64 << 10;
    let half = size / 2;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    const RW_SENTINEL: u8 = 0x5a;
    const RO_SENTINEL: u8 = 0xa0;
    buf.fill(0, half, RW_SENTINEL);
    buf.fill(half, half, RO_SENTINEL);
    let ro = io.data + 0x10_0000;
    for (iova, off, perm) in [(io.data, 0, Perm::RW), (ro, half as u64, Perm::R)] {
        let b = buf.bus_addr() + off;
        t.dom.map(iova, b, half as u64, perm, PageSize::Size4K)?;
    }
    let hole = io.data + half as u64;
    drain_interrupts(dev)?;
    let count0 = log.count()?;
    let check_untouched = |what: &str| -> TestResult {
        let (rw_half, ro_half) = (buf.to_vec(0, half), buf.to_vec(half, half));
        check_all(&rw_half, RW_SENTINEL, format!("{what}: read-write half"))?;
        check_all(&ro_half, RO_SENTINEL, format!("{what}: read-only half"))
    };

    // Not present (the walk stops at the first not-present entry: the lowest level whose
    // table exists), a write to a read-only mapping, an IOVA beyond the width: each a
    // record and the fault vector.
    let faults = [
        (
            spec::FAULT_NOT_PRESENT,
            hole,
            walk_stop_level(&t.dom, hole),
            8192,
        ),
        (spec::FAULT_PERMISSION, ro, 0, 4096),
        (spec::FAULT_IOVA_WIDTH, caps.iova_limit(), 0, 4096),
    ];
    for (i, (reason, iova, level, len)) in faults.into_iter().enumerate() {
        let what = format!("FILL of {len} bytes faulting {}", fault_reason_name(reason));
        let tag = 1 + i as u64;
        let d = Descriptor::fill(iova, 0x0bad, len).with_tag(tag);
        let c = t.q.run_fault(d, (reason, iova, true), &what)?;
        check_eq!((c.bytes, c.tag), (0, tag), "{what}: (bytes, tag)");
        expect_irq(dev, fv, true, &format!("{what}: the fault vector"))?;
        let r = log.wait(COMPLETION_TIMEOUT)?;
        progress!("         fault record: {r}");
        let seq = count0 + i as u32;
        let want = record((reason, spec::ACCESS_WRITE), (1, 0), iova, (0, level), seq);
        check_eq!(r, want, "{what}: fault record ({r})");
        let count = log.count()?;
        if count != seq + 1 {
            // Name the records nobody expected.
            let extra: Vec<String> = log.drain()?.iter().map(ToString::to_string).collect();
            return Err(Failure(format!(
                "{what}: REG_FLOG_COUNT: got {count}, expected {}; records beyond the \
                 expected: [{}]",
                seq + 1,
                extra.join("; ")
            )));
        }
        check_untouched(&what)?;
    }

    // Reading through the read-only mapping works.
    t.q.run_ok(
        Descriptor::copy(ro, io.data, 4096).with_tag(4),
        "COPY out of the read-only mapping",
    )?;
    let (copied, rest) = (buf.to_vec(0, 4096), buf.to_vec(4096, half - 4096));
    check_all(&copied, RO_SENTINEL, "copied from the read-only half")?;
    check_all(&rest, RW_SENTINEL, "rest of the read-write half")?;

    // The queue went on (no HALT_ON_FAULT); the log is drained; counters agree.
    let fill = Descriptor::fill(io.data, 0x4242_4242_4242_4242, 4096);
    t.q.run_ok(fill, "FILL after the faults")?;
    check_all(&buf.to_vec(0, 4096), 0x42, "FILL after the faults")?;
    check_eq!(
        t.q.status()? & spec::Q_STATUS_ERROR,
        0,
        "Q_STATUS error bit"
    );
    check_eq!(t.q.halt_reason()?, spec::HALT_NONE, "Q_HALT_REASON");
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
    check_eq!(t.q.read_reg(spec::Q_ERRORS)?, 3, "Q_ERRORS");
    let faults = dstat(dev, 1, spec::DSTAT_FAULTS)?;
    check!(faults >= 2, "DSTAT_FAULTS of domain 1 is {faults}");
    // No completion interrupt.
    check_eq!(
        dev.wait_interrupt(0, Duration::ZERO)?,
        0,
        "queue vector 0 interrupts"
    );
    t.q.disable()?;
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
    let seq = log.count()?;

    let fill = Descriptor::fill(io.data, 0x6060_6060_6060_6060, 4096);
    expect_fetch_halt(&mut q, &cpl, fill.with_tag(0xfe7c))?;
    let r = log.wait(COMPLETION_TIMEOUT)?;
    progress!("         fault record: {r}");
    let level = walk_stop_level(&dom, io.ring);
    let fetch = (spec::FAULT_NOT_PRESENT, spec::ACCESS_DESCRIPTOR);
    let want = record(fetch, (1, 0), io.ring, (0, level), seq);
    check_eq!(r, want, "descriptor fetch fault record ({r})");
    let what = "buffer before the ring is mapped";
    check_all(&buf.to_vec(0, 4096), 0x10, what)?;

    // Map the ring (a new mapping: no invalidation needed) and retry.
    dom.map(io.ring, q.ring_bus_addr(), 4096, Perm::R, PageSize::Size4K)?;
    let what = "FILL after mapping the ring and RESUME";
    resume_and_expect(&q, &cpl, (0, 0xfe7c, 1), what)?;
    check_all(&buf.to_vec(0, 4096), 0x60, "buffer after RESUME")?;
    Ok(q.disable()?)
}

/// A fault log of 2 records holds one: further faults are dropped, counted, and flagged
/// with FLOG_STATUS_OVERFLOW (write 1 to clear); once the driver reads the record there is
/// room again.
fn fault_log_overflow(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 2, caps.fault_vector())?;
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 4)?;
    let hole = dev.reserve_unmapped(4096)?;
    let mut fill = |i: u64, what: &str| {
        let d = Descriptor::fill(hole, 0, 4096).with_tag(i);
        q.run_fault(d, (spec::FAULT_OUTSIDE_RAM, hole, true), what)
    };
    for i in 0..3 {
        fill(i, &format!("FILL {i}"))?;
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
    let write = (spec::FAULT_OUTSIDE_RAM, spec::ACCESS_WRITE);
    let want = record(write, (0, 0), hole, (hole, 0), 0);
    check_eq!(records[0], want, "the logged record ({})", records[0]);
    log.clear_status(spec::FLOG_STATUS_OVERFLOW)?;
    check_eq!(
        log.status()? & (spec::FLOG_STATUS_OVERFLOW | spec::FLOG_STATUS_PENDING),
        0,
        "REG_FLOG_STATUS after draining and clearing"
    );
    // Room again.
    fill(3, "FILL after draining")?;
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
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 8)?;
    // FILL at the bus address of a buffer that was mapped and has been freed.
    let gone = dev.alloc_dma(DmaRequest::new(4096))?;
    let gone_addr = gone.bus_addr();
    drop(gone);
    let c = q.run(Descriptor::fill(gone_addr, 0x0f0f, 4096).with_tag(3))?;
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
    let fv = armed_fault_vector(dev)?;
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let len = 3 * PAGE;
    let (_src, data) = t.map_new(io.src, len, Perm::R, &mut ctx.rng())?;
    let dst = Guarded::new(dev, len, PAGE)?;
    let two = 2 * PAGE as u64;
    t.dom
        .map(io.dst, dst.bus(), two, Perm::RW, PageSize::Size4K)?;
    let seq = log.count()?;
    let errors0 = t.q.read_reg(spec::Q_ERRORS)?;
    drain_interrupts(dev)?;
    let hole = io.dst + two;
    let c = t.q.run_fault(
        Descriptor::copy(io.src, io.dst, len as u32).with_tag(1),
        (spec::FAULT_NOT_PRESENT, hole, true),
        "COPY into 2 of 3 mapped pages",
    )?;
    check_eq!(
        (c.bytes, c.tag),
        (2 * PAGE as u32, 1),
        "bytes moved before the fault, tag"
    );
    let got = dst.read();
    check_bytes(&got[..2 * PAGE], &data[..2 * PAGE], "the two mapped pages")?;
    let what = "the page behind the missing mapping";
    check_all(&got[2 * PAGE..], CANARY, what)?;
    dst.check_guards("destination")?;
    let write = (spec::FAULT_NOT_PRESENT, spec::ACCESS_WRITE);
    let want = record(write, (1, 0), hole, (0, 1), seq);
    expect_record(&mut log, want, "the missing level-1 entry")?;
    expect_irq(dev, fv, true, "the record on the fault vector")?;
    check_eq!(log.count()?, seq + 1, "REG_FLOG_COUNT");
    check_eq!(log.dropped()?, 0, "REG_FLOG_DROPPED");
    eventually("Q_ERRORS", errors0 + 1, || {
        Ok(t.q.read_reg(spec::Q_ERRORS)?)
    })?;

    // A level-3 entry that is not present: the walk stops there.
    let far = apart(&io) + 0x123;
    let what = "CRC32C under a missing level-3 entry";
    let c = t.q.run_fault(
        Descriptor::crc32c(far, 10).with_tag(2),
        (spec::FAULT_NOT_PRESENT, far, false),
        what,
    )?;
    check_eq!(c.bytes, 0, "bytes under a missing level-3 entry");
    let read = (spec::FAULT_NOT_PRESENT, 0);
    let want = record(read, (1, 0), far, (0, 3), seq + 1);
    expect_record(&mut log, want, "the missing level-3 entry")
}

/// An entry with R = W = 0 is not present whatever else is set (PS, reserved bits): a
/// read through it faults NOT_PRESENT, not MALFORMED_ENTRY. Restored, the mapping works.
fn not_present_whatever_the_other_bits(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let (_src, data) = t.map_new(io.src, PAGE, Perm::R, &mut ctx.rng())?;
    let leaf = raw_entry(&t.dom, io.src, 1)?;
    let rw = spec::PTE_R | spec::PTE_W;
    let bad = (leaf & !rw) | spec::PTE_PS | 0x7c | 1 << 60;
    t.dom.table_mut().write_raw(io.src, 1, bad);
    t.dom.invalidate()?;
    let seq = log.count()?;
    let at = io.src + 8;
    t.q.run_fault(
        Descriptor::crc32c(at, 8),
        (spec::FAULT_NOT_PRESENT, at, false),
        &format!("CRC32C through the entry {bad:#x}"),
    )?;
    let want = record((spec::FAULT_NOT_PRESENT, 0), (1, 0), at, (0, 1), seq);
    expect_record(&mut log, want, "a not-present entry with other bits set")?;
    t.dom.table_mut().write_raw(io.src, 1, leaf);
    t.dom.invalidate()?;
    let what = "CRC32C through the restored entry";
    let c = t.q.run_ok(Descriptor::crc32c(at, 8), what)?;
    check_eq!(c.result, u64::from(crc32c(&data[8..16])), "{what}");
    Ok(())
}

/// With 48-bit IOVAs, 2^48 and u64::MAX - 4095 fault IOVA_WIDTH before any walk (record
/// level 0, info 0); the last page below 2^48 works and a transfer from it stops at the
/// width with that page done; a pass-through domain is limited the same way.
fn iova_width_faults_before_any_walk(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let top = 1u64 << 48;
    let last = top - PAGE as u64;
    let mut rng = ctx.rng();
    let (src, data) = t.map_new(io.src, PAGE, Perm::R, &mut rng)?;
    let (_last, last_data) = t.map_new(last, PAGE, Perm::R, &mut rng)?;
    let mut q1 = RunQueue::passthrough(dev, (1, 8, 1), 1)?;

    let what = "CRC32C of the last page below 2^48";
    let c = t.q.run_ok(Descriptor::crc32c(last, PAGE as u32), what)?;
    check_eq!(c.result, u64::from(crc32c(&last_data)), "{what}");
    let seq = log.count()?;
    // (in pass-through, descriptor, IOVA, a write, bytes, what)
    let faults = [
        (
            false,
            Descriptor::copy(io.src, top, 64),
            top,
            true,
            0,
            "COPY to 2^48",
        ),
        (
            false,
            Descriptor::crc32c(u64::MAX - 4095, 16),
            u64::MAX - 4095,
            false,
            0,
            "CRC32C at u64::MAX - 4095",
        ),
        (
            false,
            Descriptor::crc32c(last, 2 * PAGE as u32),
            top,
            false,
            PAGE as u32,
            "CRC32C running over 2^48",
        ),
        // Pass-through domain 0: the IOVA is the bus address, still limited by the width.
        (
            true,
            Descriptor::fill(top + 0x1000, 0, 8),
            top + 0x1000,
            true,
            0,
            "FILL beyond 2^48 in pass-through",
        ),
    ];
    for (i, (pass, d, iova, write, bytes, what)) in faults.into_iter().enumerate() {
        let q = if pass { &mut q1 } else { &mut t.q };
        let c = q.run_fault(d, (spec::FAULT_IOVA_WIDTH, iova, write), what)?;
        check_eq!(c.bytes, bytes, "{what}: bytes below the width");
        let access = if write { spec::ACCESS_WRITE } else { 0 };
        let at = if pass { (0, 1) } else { (1, 0) };
        let want = record(
            (spec::FAULT_IOVA_WIDTH, access),
            at,
            iova,
            (0, 0),
            seq + i as u32,
        );
        expect_record(&mut log, want, what)?;
    }
    check_bytes(&src.read(), &data, "source afterwards")
}

/// With 32-bit IOVAs (`--iova-width 32`), 4 GiB faults IOVA_WIDTH before any walk even
/// where the domain's table maps it; the last page below 4 GiB works, a COPY from it stops
/// at 4 GiB with that page done; a pass-through domain works below 4 GiB and faults at it.
fn iova_width_32_faults_at_4_gib(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    // A table for 48-bit IOVAs, so that it can map 4 GiB; the device only takes 32 bits.
    let mut t = Translated::with(dev, 1, QueueConfig::new(0, 16, 0), 1, Some(48))?;
    let mut log = t.fault_log(16)?;
    let io = t.io;
    let four_g = 1u64 << 32;
    let below = four_g - PAGE as u64;
    let (_below, data) = t.map_new(below, PAGE, Perm::R, &mut ctx.rng())?;
    let above = t.map_guarded(four_g, PAGE, Perm::RW)?;
    let dst = t.map_guarded(io.dst, 2 * PAGE, Perm::RW)?;
    let seq = log.count()?;

    let what = "COPY from the last page below 4 GiB on";
    let c = t.q.run_fault(
        Descriptor::copy(below, io.dst, 2 * PAGE as u32),
        (spec::FAULT_IOVA_WIDTH, four_g, false),
        what,
    )?;
    check_eq!(c.bytes, PAGE as u32, "bytes below 4 GiB");
    let got = dst.read();
    check_bytes(&got[..PAGE], &data, "the page below 4 GiB, copied")?;
    check_all(&got[PAGE..], CANARY, "destination after the fault")?;
    t.q.run_fault(
        Descriptor::fill(four_g + 64, 0, 8),
        (spec::FAULT_IOVA_WIDTH, four_g + 64, true),
        "FILL at 4 GiB + 64, mapped in the table",
    )?;
    check_all(&above.read(), CANARY, "the page mapped at 4 GiB")?;
    for (i, (iova, access)) in [(four_g, 0), (four_g + 64, spec::ACCESS_WRITE)]
        .into_iter()
        .enumerate()
    {
        let want = record(
            (spec::FAULT_IOVA_WIDTH, access),
            (1, 0),
            iova,
            (0, 0),
            seq + i as u32,
        );
        expect_record(&mut log, want, "a 32-bit IOVA width fault")?;
    }

    // Pass-through: bus memory below 4 GiB works; 4 GiB faults.
    let mut q1 = RunQueue::passthrough(dev, (1, 8, 1), 1)?;
    let buf = Guarded::new(dev, 64, PAGE)?;
    let what = "FILL below 4 GiB in pass-through";
    q1.run_ok(Descriptor::fill(buf.bus(), 0x0101_0101_0101_0101, 64), what)?;
    buf.check(&[1; 64], what)?;
    q1.run_fault(
        Descriptor::fill(four_g, 0, 64),
        (spec::FAULT_IOVA_WIDTH, four_g, true),
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
    let fv = armed_fault_vector(dev)?;
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let dst = t.map_guarded(io.dst, 256, Perm::RW)?;
    // Two pages: room for a large-page address that is not aligned.
    let src = dev.alloc_dma(DmaRequest::new(2 * PAGE))?;
    let data = ctx.rng().unique(PAGE);
    src.write(0, &data);
    let near = apart(&io);
    // Level-4 slot 2: the rings' slot keeps its entry (48-bit IOVAs only).
    let deep = 1u64 << 40;
    let wide = t.caps.iova_width > 40;
    let sources: &[u64] = if wide { &[near, deep] } else { &[near] };
    for &iova in sources {
        t.dom
            .map(iova, src.bus_addr(), PAGE as u64, Perm::R, PageSize::Size4K)?;
    }
    let (e1, e2, e3) = (
        raw_entry(&t.dom, near, 1)?,
        raw_entry(&t.dom, near, 2)?,
        raw_entry(&t.dom, near, 3)?,
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
        let e4 = raw_entry(&t.dom, deep, 4)?;
        cases.push(("PS in a level-4 entry", deep, 4, e4 | spec::PTE_PS));
    } else {
        progress!("         (PS at level 4 needs 48-bit IOVAs: not checked here)");
    }
    let seq0 = log.count()?;
    drain_interrupts(dev)?;
    for (seq, (what, iova, level, bad)) in (seq0..).zip(cases) {
        let old = t
            .dom
            .table_mut()
            .write_raw(iova, level, bad)
            .ok_or_else(|| Failure(format!("{what}: no level-{level} entry for {iova:#x}")))?;
        t.dom.invalidate()?;
        let c = t.q.run_fault(
            Descriptor::copy(iova + 16, io.dst, 256),
            (spec::FAULT_MALFORMED_ENTRY, iova + 16, false),
            what,
        )?;
        check_eq!(c.bytes, 0, "{what}: bytes");
        let read = (spec::FAULT_MALFORMED_ENTRY, 0);
        let want = record(read, (1, 0), iova + 16, (bad, level), seq);
        expect_record(&mut log, want, what)?;
        expect_irq(dev, fv, true, &format!("{what}: the fault vector"))?;
        dst.check(&[CANARY; 256], &format!("{what}: destination"))?;
        t.dom.table_mut().write_raw(iova, level, old);
        t.dom.invalidate()?;
    }
    for &iova in sources {
        let what = format!("COPY from {iova:#x} with the entries restored");
        t.q.run_ok(Descriptor::copy(iova + 16, io.dst, 256), &what)?;
        check_bytes(&dst.read(), &data[16..272], &what)?;
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
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let (src, data) = t.map_new(io.src, 2 * PAGE, Perm::RW, &mut ctx.rng())?;
    let dst = t.map_guarded(io.dst, 2 * PAGE, Perm::RW)?;
    let cases = malformed_descriptors(io.src, io.dst, t.caps.max_xfer);
    let errors0 = t.q.read_reg(spec::Q_ERRORS)?;
    let seq0 = log.count()?;
    for (i, (what, desc)) in cases.iter().enumerate() {
        let at = next_slot_iova(&t.q);
        let tag = 0x1000 + i as u64;
        let c = t.q.run(desc.with_tag(tag))?;
        check_invalid(&c, at, (0, 0), tag, what)?;
        let invalid = (spec::FAULT_DESCRIPTOR_INVALID, spec::ACCESS_DESCRIPTOR);
        let want = record(invalid, (1, 0), at, (0, 0), seq0 + i as u32);
        expect_record(&mut log, want, what)?;
        src.check(&data, &format!("{what}: source"))?;
        dst.check(&[CANARY; 2 * PAGE], &format!("{what}: destination"))?;
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
    let what = "a valid COPY afterwards";
    t.q.run_ok(Descriptor::copy(io.src, io.dst, 64).with_tag(1), what)?;
    check_bytes(&dst.read()[..64], &data[..64], what)
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
    let at = next_slot_iova(&q);
    let counts = QueueCounts::read(&q)?;
    let seq = log.count()?;
    let fill = Descriptor::fill(dst.bus(), !0, 64).with_tag(3);
    q.submit(&[fill.with_completion(rec.bus() + 8)])?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    let invalid = (spec::FAULT_DESCRIPTOR_INVALID, spec::ACCESS_DESCRIPTOR);
    let want = record(invalid, (0, 0), at, (0, 0), seq);
    expect_record(&mut log, want, "misaligned completion address")?;
    counts.expect_added(&q, (1, 1))?;
    let what = "the records around the misaligned address";
    rec.check(&[CANARY; 64], what)?;
    dst.check(&[CANARY; 64], "the malformed FILL's destination")
}

/// In pass-through, DMA to or from a bus address the VMM never mapped faults OUTSIDE_RAM
/// with that address as the IOVA and in the record's info, at level 0 (no walk); nothing
/// is written.
fn outside_ram_in_pass_through(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 1)?;
    let hole = dev.reserve_unmapped(2 * PAGE as u64)?;
    let dst = Guarded::new(dev, 64, PAGE)?;
    let seq = log.count()?;
    let faults0 = qstat(dev, 0, spec::QSTAT_FAULTS)?;
    let (w, r) = (hole + 0x10, hole + PAGE as u64 + 0x40);
    for (i, (d, iova, write, what)) in [
        (
            Descriptor::fill(w, 0x5a5a, 64),
            w,
            true,
            "FILL into the hole",
        ),
        (
            Descriptor::copy(r, dst.bus(), 64),
            r,
            false,
            "COPY out of the hole",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let c = q.run_fault(d, (spec::FAULT_OUTSIDE_RAM, iova, write), what)?;
        check_eq!(c.bytes, 0, "{what}: bytes");
        let access = if write { spec::ACCESS_WRITE } else { 0 };
        let want = record(
            (spec::FAULT_OUTSIDE_RAM, access),
            (0, 0),
            iova,
            (iova, 0),
            seq + i as u32,
        );
        expect_record(&mut log, want, what)?;
    }
    let faults = qstat(dev, 0, spec::QSTAT_FAULTS)? - faults0;
    check_eq!(faults, 2, "QSTAT_FAULTS delta");
    dst.check(&[CANARY; 64], "destination of the COPY out of the hole")
}

/// In a translated domain, a table or a page outside the memory the VMM mapped faults
/// OUTSIDE_RAM: a level-1 (or level-2) table outside it is a page-walk fault with the
/// table's address and level in the record; a leaf whose page is outside it faults when
/// the access happens (level 0, the page's bus address in the record), after the pages
/// before it.
fn outside_ram_tables_and_pages(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let (_src, _) = t.map_new(io.src, PAGE, Perm::R, &mut ctx.rng())?;
    let dst = t.map_guarded(io.dst, PAGE, Perm::RW)?;
    let hole = dev.reserve_unmapped(4 * PAGE as u64)?;
    let seq = log.count()?;
    let rw = spec::PTE_R | spec::PTE_W;
    let (p, outside) = (PAGE as u64, spec::FAULT_OUTSIDE_RAM);

    // 1. The level-2 entry above the source points at a level-1 table outside RAM.
    let old = raw_entry(&t.dom, io.src, 2)?;
    t.dom
        .table_mut()
        .write_raw(io.src, 2, Pte::table(hole, rw).raw());
    t.dom.invalidate()?;
    let what = "COPY through a table outside RAM";
    let c = t.q.run_fault(
        Descriptor::copy(io.src + 8, io.dst, 64),
        (outside, io.src + 8, false),
        what,
    )?;
    check_eq!(
        (c.fault_access, c.bytes),
        (spec::ACCESS_PAGE_WALK, 0),
        "{what}: (access, bytes)"
    );
    let walk = (outside, spec::ACCESS_PAGE_WALK);
    let want = record(walk, (1, 0), io.src + 8, (hole, 1), seq);
    expect_record(&mut log, want, "a table outside RAM")?;
    t.dom.table_mut().write_raw(io.src, 2, old);
    t.dom.invalidate()?;

    // 2. A destination leaf whose page is outside RAM.
    t.dom
        .map(io.data, hole + p, p, Perm::RW, PageSize::Size4K)?;
    let what = "COPY to a page outside RAM";
    let c = Descriptor::copy(io.src, io.data, 64);
    t.q.run_fault(c, (outside, io.data, true), what)?;
    let want = record(
        (outside, spec::ACCESS_WRITE),
        (1, 0),
        io.data,
        (hole + p, 0),
        seq + 1,
    );
    expect_record(&mut log, want, "a page outside RAM")?;

    // 3. A source whose second page is outside RAM: the first is read, then the fault.
    t.dom
        .map(io.src + p, hole + 2 * p, p, Perm::R, PageSize::Size4K)?;
    let what = "CRC32C running onto a page outside RAM";
    let d = Descriptor::crc32c(io.src, 2 * PAGE as u32);
    let c = t.q.run_fault(d, (outside, io.src + p, false), what)?;
    check_eq!(c.bytes, PAGE as u32, "bytes before the page outside RAM");
    let want = record((outside, 0), (1, 0), io.src + p, (hole + 2 * p, 0), seq + 2);
    expect_record(&mut log, want, "a source page outside RAM")?;

    // 4. A level-3 entry (under another one than the rings') pointing at a level-2 table
    // outside RAM, on a write.
    let far = apart(&io);
    let page = t.map_guarded(far, PAGE, Perm::RW)?;
    let table = hole + 3 * p;
    let old = raw_entry(&t.dom, far, 3)?;
    t.dom
        .table_mut()
        .write_raw(far, 3, Pte::table(table, rw).raw());
    t.dom.invalidate()?;
    let what = "FILL through a level-2 table outside RAM";
    let c =
        t.q.run_fault(Descriptor::fill(far, 0, 8), (outside, far, true), what)?;
    let access = spec::ACCESS_WRITE | spec::ACCESS_PAGE_WALK;
    check_eq!(c.fault_access, access, "access of a {what}");
    let want = record((outside, access), (1, 0), far, (table, 2), seq + 3);
    expect_record(&mut log, want, "a level-2 table outside RAM")?;
    t.dom.table_mut().write_raw(far, 3, old);
    t.dom.invalidate()?;
    page.check(&[CANARY; PAGE], "the page under the level-2 table")?;
    dst.check(&[CANARY; PAGE], "destination")
}

/// A queue in a disabled domain halts at the descriptor fetch (HALT_DESC_FETCH, head at
/// the descriptor, not busy) with a DOMAIN_DISABLED record of a descriptor access and the
/// fault vector; once the domain is pass-through (and invalidated) RESUME runs that same
/// descriptor.
fn domain_disabled_halts_the_fetch(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let fv = armed_fault_vector(dev)?;
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
    let fill = Descriptor::fill(dst.bus(), pattern, 64).with_tag(0xd15);
    expect_fetch_halt(&mut q, &cpl, fill)?;
    let status = q.status()?;
    check_eq!(
        status & (spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR | spec::Q_STATUS_BUSY),
        spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR,
        "Q_STATUS of a queue halted at the fetch"
    );
    let fetch = (spec::FAULT_DOMAIN_DISABLED, spec::ACCESS_DESCRIPTOR);
    let want = record(fetch, (3, 1), q.ring_iova(), (0, 0), seq);
    expect_record(&mut log, want, "fetch in a disabled domain")?;
    expect_irq(dev, fv, true, "the fault vector")?;
    check_all(&dst.read(), CANARY, "destination while halted")?;
    let faults = dstat(dev, 3, spec::DSTAT_FAULTS)?;
    check_eq!(faults, 1, "DSTAT_FAULTS of domain 3");

    set_passthrough(dev, 3, COMPLETION_TIMEOUT)?;
    let what = "the same FILL after the fix and RESUME";
    resume_and_expect(&q, &cpl, (0, 0xd15, 1), what)?;
    dst.check(&pattern_bytes(pattern, 64), "FILL after RESUME")
}

/// A fault log of 4 records holds 3 (full when head + 1 == tail): of 5 faults 2 are
/// dropped and counted, OVERFLOW and PENDING are set, the fault vector fires once per
/// record written; the records hold sequence numbers 0..2. Once read, PENDING clears;
/// OVERFLOW stays until written 1; the next fault is record 3 with sequence number 5 and
/// the head wraps.
fn fault_log_overflow_counts_and_recovers(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let fv = armed_fault_vector(dev)?;
    let mut log = FaultLog::enable(dev, 4, fv)?;
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 1)?;
    let hole = dev.reserve_unmapped(16 * PAGE as u64)?;
    let iova = |i: u64| hole + i * PAGE as u64 + 8 * i;
    drain_interrupts(dev)?;
    for i in 0..5 {
        let fate = if i < 3 { "logged" } else { "dropped" };
        let what = format!("fault {i} ({fate})");
        q.fill_hole(iova(i), &what)?;
        // Taken one fault at a time: MSI-X is edge-triggered, and two interrupts that
        // arrive before the first is handled merge (QEMU and a guest kernel do merge them).
        expect_irq(dev, fv, i < 3, &what)?;
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
        let write = (spec::FAULT_OUTSIDE_RAM, spec::ACCESS_WRITE);
        let want = record(write, (0, 0), a, (a, 0), i as u32);
        check_eq!(*r, want, "record {i} ({r})");
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
    q.fill_hole(iova(9), "fault 5")?;
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
    let fv = armed_fault_vector(dev)?;
    let ctrl = dev.read32(spec::REG_FLOG_CTRL)?;
    check_eq!(ctrl, 0, "REG_FLOG_CTRL after reset");
    let (mut q, hole) = faulting_queue(dev)?;
    for i in 0..2u64 {
        q.fill_hole(hole + 64 * i, &format!("fault {i}"))?;
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
    expect_irq(dev, fv, false, "the fault vector with the log disabled")
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
        program_log(dev, base, size)?;
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
            clear_log_error(dev, what)?;
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
    let fv = armed_fault_vector(dev)?;
    let ring = dev.reserve_unmapped(PAGE as u64)?;
    program_log(dev, ring, 8)?;
    let (mut q, hole) = faulting_queue(dev)?;
    q.fill_hole(hole, "FILL into a hole")?;
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
    expect_irq(dev, fv, false, "the fault vector without a record")?;
    clear_log_error(dev, "the log in unmapped memory")?;
    dev.write32(spec::REG_FLOG_CTRL, 0)?;
    Ok(())
}

/// The fault vector is the last one after reset and programmable: with
/// REG_FLOG_MSIX_VECTOR = 2 three faults raise vector 2 three times and the default vector
/// never; moved to vector 1, the next fault raises vector 1 only.
fn fault_vector_is_programmable(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let fv = armed_fault_vector(dev)?;
    let vector = || dev.read32(spec::REG_FLOG_MSIX_VECTOR);
    let what = "REG_FLOG_MSIX_VECTOR after reset: the last vector";
    check_eq!(vector()?, u32::from(fv), "{what}");
    let mut log = FaultLog::enable(dev, 16, 2)?;
    check_eq!(vector()?, 2, "REG_FLOG_MSIX_VECTOR");
    let (mut q, hole) = faulting_queue(dev)?;
    for i in 0..3u64 {
        q.fill_hole(hole + 64 * i, &format!("fault {i}"))?;
        expect_irq(dev, 2, true, &format!("record {i} on vector 2"))?;
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
    check_eq!(vector()?, 1, "REG_FLOG_MSIX_VECTOR moved");
    q.fill_hole(hole + 0x800, "fault after moving the vector")?;
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
    let lost = spec::ACCESS_WRITE | spec::ACCESS_COMPLETION;
    let pattern = ctx.rng().next_u64();
    {
        let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
        let (mut q, hole) = faulting_queue(dev)?;
        let dst = Guarded::new(dev, 64, PAGE)?;
        let fill = Descriptor::fill(dst.bus(), pattern, 64).with_tag(5);
        let want = record((spec::FAULT_OUTSIDE_RAM, lost), (0, 0), hole, (hole, 0), 0);
        lost_completion(&mut q, &mut log, fill, want, &dst)?;
        q.run_ok(Descriptor::nop().with_tag(6), "a NOP afterwards")?;
        q.disable()?;
    }

    // In a translated domain: a completion IOVA that is not mapped (under a missing
    // level-3 entry).
    let (mut t, mut log) = logged(dev)?;
    let io = t.io;
    let dst = t.map_guarded(io.dst, 64, Perm::RW)?;
    let nowhere = apart(&io);
    let fill = Descriptor::fill(io.dst, !pattern, 64).with_tag(7);
    let want = record((spec::FAULT_NOT_PRESENT, lost), (1, 0), nowhere, (0, 3), 0);
    lost_completion(&mut t.q, &mut log, fill, want, &dst)
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
    let mode = spec::DOMAIN_MODE_TRANSLATED;
    write_domain(dev, 2, DomainRegs { root, mode })?;
    invalidate(dev, Invalidation::Domain(2), COMPLETION_TIMEOUT)?;
    let result = (|| -> TestResult {
        let mut q = DmaQueue::create(dev, QueueConfig::new(1, 8, 1).in_domain(2))?;
        let cpl = CompletionRecords::new(dev, 1)?;
        let seq = log.count()?;
        expect_fetch_halt(&mut q, &cpl, Descriptor::nop().with_tag(9))?;
        let walk = spec::ACCESS_DESCRIPTOR | spec::ACCESS_PAGE_WALK;
        let want = record(
            (spec::FAULT_OUTSIDE_RAM, walk),
            (2, 1),
            q.ring_iova(),
            (root, 4),
            seq,
        );
        expect_record(&mut log, want, "a root outside RAM")?;
        q.disable()?;
        Ok(())
    })();
    disable_domain(dev, 2, COMPLETION_TIMEOUT)?;
    result
}

// ---- Helpers ----

/// Malformed descriptors, each a well-formed one with one thing wrong (unknown opcode or
/// flag, reserved bytes, bad lengths, overlapping COPY, BATCH of 0), for sources at `s` and
/// destinations at `d` (two pages each) on a device whose MAX_XFER is `max_xfer`.
fn malformed_descriptors(s: u64, d: u64, max_xfer: u32) -> Vec<(&'static str, Descriptor)> {
    let copy = Descriptor::copy(s, d, 64);
    let fill = Descriptor::fill(d, 0xdead_beef_cafe_f00d, 4096);
    let interrupt = spec::DESC_FLAG_INTERRUPT;
    let mut cases = vec![
        ("unknown opcode 0x7f", altered(copy, |x| x.opcode = 0x7f)),
        ("unknown opcode 0xff", altered(fill, |x| x.opcode = 0xff)),
        ("undefined flag 0x04", altered(copy, |x| x.flags = 0x04)),
        ("undefined flag 0x80", altered(fill, |x| x.flags = 0x80)),
        (
            "flag 0x04 with INTERRUPT",
            altered(copy, |x| x.flags = 0x04 | interrupt),
        ),
        (
            "flag 0x80 with INTERRUPT",
            altered(copy, |x| x.flags = 0x80 | interrupt),
        ),
        (
            "reserved byte 0x02",
            altered(copy, |x| x.reserved_lo = 0x0001),
        ),
        (
            "reserved byte 0x03",
            altered(fill, |x| x.reserved_lo = 0x0100),
        ),
        ("reserved byte 0x28", altered(fill, |x| x.reserved[0] = 1)),
        (
            "reserved byte 0x2d",
            altered(copy, |x| x.reserved[5] = 0x80),
        ),
        (
            "reserved byte 0x3f",
            altered(copy, |x| x.reserved[23] = 0x80),
        ),
        ("COPY of length 0", altered(copy, |x| x.len = 0)),
        ("FILL of length 0", altered(fill, |x| x.len = 0)),
        ("COMPARE of length 0", Descriptor::compare(s, d, 0)),
        ("CRC32C of length 0", Descriptor::crc32c(s, 0)),
        (
            "NOP with a length",
            altered(Descriptor::nop(), |x| x.len = 4),
        ),
        (
            "NOP with a length and addresses",
            altered(fill, |x| x.opcode = spec::OP_NOP),
        ),
        ("overlapping COPY", Descriptor::copy(s, s + 100, 4096)),
        (
            "overlapping COPY, destination below",
            Descriptor::copy(s + 100, s, 4096),
        ),
        (
            "overlapping COPY in the destination",
            Descriptor::copy(d, d + 2048, 4096),
        ),
        ("BATCH of 0 elements", Descriptor::batch(s, 0)),
    ];
    if max_xfer < u32::MAX {
        cases.push((
            "FILL above MAX_XFER",
            altered(fill, |x| x.len = max_xfer + 1),
        ));
        cases.push((
            "COPY above MAX_XFER",
            altered(copy, |x| x.len = max_xfer + 1),
        ));
    }
    cases
}

/// Domain 1 translated with queue 0 in it, and a fault log of 32 records.
fn logged(dev: &dyn DmaBackend) -> Result<(Translated<'_>, FaultLog<'_>), Failure> {
    let t = Translated::new(dev, 1, 0)?;
    let log = t.fault_log(32)?;
    Ok((t, log))
}

/// Queue 0 in pass-through with one completion record, and a page of bus addresses where
/// there is no memory; interrupts drained.
fn faulting_queue(dev: &dyn DmaBackend) -> Result<(RunQueue<'_>, u64), Failure> {
    let q = RunQueue::passthrough(dev, (0, 16, 0), 1)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    drain_interrupts(dev)?;
    Ok((q, hole))
}

/// Runs `fill` (64 bytes into `dst`) with its completion record at `want.iova`, where it
/// cannot be written: the record is lost and `want` is logged (its sequence number the
/// log's count before), Q_ERRORS and Q_COMPLETED count it, the head moves on and the FILL
/// itself happened.
fn lost_completion(
    q: &mut DmaQueue<'_>,
    log: &mut FaultLog<'_>,
    fill: Descriptor,
    want: spec::FaultRecord,
    dst: &Guarded,
) -> TestResult {
    let counts = QueueCounts::read(q)?;
    let seq = log.count()?;
    q.submit(&[fill.with_completion(want.iova)])?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    let want = spec::FaultRecord { seq, ..want };
    expect_record(log, want, "the lost completion record")?;
    counts.expect_added(q, (1, 1))?;
    check_eq!(q.head()?, q.tail(), "Q_HEAD after the lost record");
    // A FILL's source field is its pattern.
    dst.check(
        &pattern_bytes(fill.src, 64),
        "the FILL whose record was lost",
    )
}

/// Programs the fault log's base and size and enables it (raw register writes).
fn program_log(dev: &dyn DmaBackend, base: u64, size: u32) -> TestResult {
    dev.write32(spec::REG_FLOG_BASE_LO, base as u32)?;
    dev.write32(spec::REG_FLOG_BASE_HI, (base >> 32) as u32)?;
    dev.write32(spec::REG_FLOG_SIZE, size)?;
    dev.write32(spec::REG_FLOG_CTRL, spec::FLOG_CTRL_ENABLE)?;
    Ok(())
}

/// Writes 1 to FLOG_STATUS_ERROR and checks that it cleared.
fn clear_log_error(dev: &dyn DmaBackend, what: &str) -> TestResult {
    dev.write32(spec::REG_FLOG_STATUS, spec::FLOG_STATUS_ERROR)?;
    check_eq!(
        dev.read32(spec::REG_FLOG_STATUS)? & spec::FLOG_STATUS_ERROR,
        0,
        "FLOG_STATUS_ERROR after writing 1 to it ({what})"
    );
    Ok(())
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
