//! Conformance: queues: rings, MSI-X per queue, coalescing, halt and resume, several at once.

use domdma_driver_model::domain::set_passthrough;

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Queues,
        name: "completion_interrupt",
        needs: &[Need::Interrupts],
        run: completion_interrupt,
    },
    Scenario {
        area: Area::Queues,
        name: "ring_wraparound",
        needs: &[],
        run: ring_wraparound,
    },
    Scenario {
        area: Area::Queues,
        name: "multi_queue",
        needs: &[Need::Interrupts, Need::Queues(4), Need::Domains(4)],
        run: multi_queue,
    },
    Scenario {
        area: Area::Queues,
        name: "halt_on_fault_and_resume",
        needs: &[],
        run: halt_on_fault_and_resume,
    },
    Scenario {
        area: Area::Queues,
        name: "interrupt_coalescing",
        needs: &[Need::Interrupts],
        run: interrupt_coalescing,
    },
    Scenario {
        area: Area::Queues,
        name: "bad_configuration_halts_until_disabled",
        needs: &[],
        run: bad_configuration_halts_until_disabled,
    },
    Scenario {
        area: Area::Queues,
        name: "configuration_is_frozen_while_enabled",
        needs: &[Need::Domains(2)],
        run: configuration_is_frozen_while_enabled,
    },
    Scenario {
        area: Area::Queues,
        name: "bad_tail_halts_until_disabled",
        needs: &[],
        run: bad_tail_halts_until_disabled,
    },
    Scenario {
        area: Area::Queues,
        name: "halted_queue_takes_doorbells_and_resume_runs_them",
        needs: &[],
        run: halted_queue_takes_doorbells_and_resume_runs_them,
    },
    Scenario {
        area: Area::Queues,
        name: "without_halt_on_fault_the_queue_goes_on",
        needs: &[],
        run: without_halt_on_fault_the_queue_goes_on,
    },
    Scenario {
        area: Area::Queues,
        name: "halt_on_fault_also_for_invalid_descriptors_and_lost_completions",
        needs: &[],
        run: halt_on_fault_also_for_invalid_descriptors_and_lost_completions,
    },
    Scenario {
        area: Area::Queues,
        name: "fetch_fault_mid_ring_halts_at_that_descriptor",
        needs: &[Need::Domains(2)],
        run: fetch_fault_mid_ring_halts_at_that_descriptor,
    },
    Scenario {
        area: Area::Queues,
        name: "interrupt_only_when_asked_on_the_queue_vector",
        needs: &[Need::Interrupts, Need::Queues(3)],
        run: interrupt_only_when_asked_on_the_queue_vector,
    },
    Scenario {
        area: Area::Queues,
        name: "msix_vector_per_queue",
        needs: &[Need::Interrupts, Need::Queues(4)],
        run: msix_vector_per_queue,
    },
    Scenario {
        area: Area::Queues,
        name: "four_queues_in_four_domains_stay_isolated",
        needs: &[Need::Queues(4), Need::Domains(5), Need::HugePages(4)],
        run: four_queues_in_four_domains_stay_isolated,
    },
    Scenario {
        area: Area::Queues,
        name: "a_halted_queue_does_not_stop_the_others",
        needs: &[Need::Queues(3), Need::Domains(3)],
        run: a_halted_queue_does_not_stop_the_others,
    },
    Scenario {
        area: Area::Queues,
        name: "coalescing_count_zero_and_one_is_every_completion",
        needs: &[Need::Interrupts],
        run: coalescing_count_zero_and_one_is_every_completion,
    },
    Scenario {
        area: Area::Queues,
        name: "coalescing_counts_only_completions_that_ask",
        needs: &[Need::Interrupts],
        run: coalescing_counts_only_completions_that_ask,
    },
    Scenario {
        area: Area::Queues,
        name: "completion_counters_run_on_across_disable_and_enable",
        needs: &[],
        run: completion_counters_run_on_across_disable_and_enable,
    },
    Scenario {
        area: Area::Queues,
        name: "disable_aborts_the_descriptor_in_flight",
        needs: &[Need::HugePages(LONG_JOB_HUGE_PAGES), Need::Interrupts],
        run: disable_aborts_the_descriptor_in_flight,
    },
];

/// With the INTERRUPT flag the queue's MSI-X vector fires (after the completion is
/// written); without it, no interrupt arrives; other vectors stay silent.
fn completion_interrupt(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    dev.rearm_interrupts()?;
    let vectors = dev.msix_vectors();
    check!(vectors >= 1, "no MSI-X vectors");
    let vector = if vectors >= 2 { 1 } else { 0 };
    drain_interrupts(dev)?;
    let mut q = DmaQueue::new(dev, 0, 16, vector)?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;

    // 1. FILL with INTERRUPT: the vector fires, and the completion is already written.
    let fill = Descriptor::fill(buf.bus_addr(), 0x1111_2222_3333_4444, 4096);
    submit_tagged(&mut q, &cpl, (0, 1), &[fill.with_interrupt()])?;
    let n = dev.wait_interrupt(vector, IRQ_TIMEOUT)?;
    if n == 0 {
        let polled = match q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT) {
            Ok(c) => c.to_string(),
            Err(e) => e.to_string(),
        };
        return Err(Failure(format!(
            "no interrupt on vector {vector} within {IRQ_TIMEOUT:?} (completion by polling: \
             {polled})"
        )));
    }
    let c = cpl.read(0);
    check_status(&c, spec::STATUS_OK, "completion when the interrupt arrived")?;
    check_eq!(c.tag, 1, "tag");
    silent_elsewhere(dev, vector, "a FILL with INTERRUPT")?;

    // 2. Without the flag: completes, but no interrupt.
    let fill = Descriptor::fill(buf.bus_addr(), 0x5555, 4096).with_tag(2);
    let c = run_desc(&mut q, &cpl, 1, fill)?;
    check_status(&c, spec::STATUS_OK, "FILL without INTERRUPT")?;
    expect_irq(
        dev,
        vector,
        false,
        "a descriptor without the INTERRUPT flag",
    )?;

    // 3. A NOP with the flag, waited for by interrupt alone.
    submit_tagged(&mut q, &cpl, (2, 3), &[Descriptor::nop().with_interrupt()])?;
    let c = q.wait_completion_irq(&cpl, 2, IRQ_TIMEOUT)?;
    check_status(&c, spec::STATUS_OK, "NOP with INTERRUPT")?;
    check_eq!(c.tag, 3, "NOP tag");
    Ok(())
}

/// More descriptors than ring entries, over several submissions of different sizes,
/// including a completely full ring (size - 1 outstanding).
fn ring_wraparound(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let ring = 8u32;
    let mut q = DmaQueue::new(dev, 0, ring, 0)?;
    let rounds = [5usize, 7, 6, 3, 7];
    let total: usize = rounds.iter().sum();
    let chunk = 256usize;
    let cpl = CompletionRecords::new(dev, total)?;
    let buf = dev.alloc_dma(DmaRequest::new(total * chunk))?;
    buf.fill(0, total * chunk, 0);
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;
    let head0 = q.head()?;
    let pattern = |i: usize| 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1);

    let mut n = 0usize;
    for (r, &count) in rounds.iter().enumerate() {
        let descs: Vec<Descriptor> = (n..n + count)
            .map(|i| {
                let at = buf.bus_addr() + (i * chunk) as u64;
                Descriptor::fill(at, pattern(i), chunk as u32)
            })
            .collect();
        let first = (n, 0x1000 + n as u64);
        submit_tagged(&mut q, &cpl, first, &descs)
            .map_err(|Failure(e)| Failure(format!("round {r}: {e}")))?;
        expect_completions(&q, &cpl, first, count, &format!("round {r}"))?;
        q.wait_idle(COMPLETION_TIMEOUT)?;
        n += count;
    }
    for i in 0..total {
        let want = pattern_bytes(pattern(i), chunk);
        check_bytes(&buf.to_vec(i * chunk, chunk), &want, format!("chunk {i}"))?;
    }
    let expect_head = (head0 + total as u32) % ring;
    check_eq!(
        q.head()?,
        expect_head,
        "Q_HEAD after {total} descriptors on a ring of {ring}"
    );
    check_eq!(
        q.read_reg(spec::Q_COMPLETED)?.wrapping_sub(completed0),
        total as u32,
        "Q_COMPLETED delta"
    );
    // The ring refuses an 8th outstanding descriptor only if the device stalls; it does
    // not here, so pushing `ring - 1` more and the doorbell must work again.
    for i in 0..(ring - 1) as usize {
        q.push(&Descriptor::nop().with_tag(i as u64))?;
    }
    match q.push(&Descriptor::nop()) {
        Err(QueueError::Full { .. }) => {}
        other => return Err(Failure(format!("pushing into a full ring: {other:?}"))),
    }
    q.doorbell()?;
    Ok(q.wait_idle(COMPLETION_TIMEOUT)?)
}

/// Two queues in two translated domains that map the same IOVAs (ring, completions,
/// source, destination) to different memory, working at the same time: each queue's
/// copies land in its own domain's buffers and raise its own vector.
fn multi_queue(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    dev.rearm_interrupts()?;
    let size = 1 << 20;
    let pieces = 8usize;
    let piece = size / pieces;

    let mut lanes = Vec::new();
    let mut rng = ctx.rng();
    for (qi, d) in [(0u32, 1u32), (1, 2)] {
        let cfg = QueueConfig::new(qi, 32, qi as u16);
        let mut t = Translated::with(dev, d, cfg, pieces, None)?;
        let io = t.io;
        let src = dev.alloc_dma(DmaRequest::new(size))?;
        let dst = dev.alloc_dma(DmaRequest::new(size))?;
        let data = rng.bytes(size);
        src.write(0, &data);
        dst.fill(0, size, 0);
        t.dom.map_buffer(io.src, &src, Perm::R)?;
        t.dom.map_buffer(io.dst, &dst, Perm::W)?;
        lanes.push((t, src, dst, data));
    }
    drain_interrupts(dev)?;
    // Fill both rings, then ring both doorbells back to back.
    for (qi, (t, ..)) in lanes.iter_mut().enumerate() {
        let io = t.io;
        for i in 0..pieces {
            let off = (i * piece) as u64;
            let cpl = t.q.records();
            cpl.clear(i);
            let mut d = Descriptor::copy(io.src + off, io.dst + off, piece as u32)
                .with_tag((qi as u64) << 32 | i as u64)
                .with_completion(cpl.device_addr(i));
            if i == pieces - 1 {
                d = d.with_interrupt();
            }
            t.q.push(&d)?;
        }
    }
    for (t, ..) in lanes.iter_mut() {
        t.q.doorbell()?;
    }
    for (qi, (t, src, dst, data)) in lanes.iter().enumerate() {
        let n = dev.wait_interrupt(qi as u16, IRQ_TIMEOUT)?;
        check!(n > 0, "queue {qi}: no interrupt on vector {qi}");
        for i in 0..pieces {
            let c = t.q.wait_completion(t.q.records(), i, COMPLETION_TIMEOUT)?;
            check_status(&c, spec::STATUS_OK, format!("queue {qi}, COPY {i}"))?;
            check_eq!(c.tag, (qi as u64) << 32 | i as u64, "queue {qi}, tag {i}");
            check_eq!(c.bytes, piece as u32, "queue {qi}, bytes {i}");
        }
        let what = format!("queue {qi}'s destination");
        check_bytes(&dst.to_vec(0, size), data, what)?;
        check_bytes(&src.to_vec(0, size), data, format!("queue {qi}'s source"))?;
        let d = t.dom.index();
        check_eq!(
            qstat(dev, qi as u32, spec::QSTAT_DESCRIPTORS)?,
            pieces as u64,
            "QSTAT_DESCRIPTORS of queue {qi}"
        );
        check!(
            dstat(dev, d, spec::DSTAT_TRANSLATIONS)? > 0,
            "domain {d} counted no translations"
        );
    }
    for (t, ..) in &lanes {
        t.q.disable()?;
    }
    Ok(())
}

/// With HALT_ON_FAULT a faulting descriptor halts the queue (HALT_FAULT) with the next
/// descriptor pending; RESUME goes on with it.
fn halt_on_fault_and_resume(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = DmaQueue::create(dev, QueueConfig::new(0, 16, 0).halting_on_fault())?;
    let cpl = CompletionRecords::new(dev, 2)?;
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;
    buf.fill(0, 4096, 0x77);
    let hole = dev.reserve_unmapped(4096)?;
    let descs = [
        Descriptor::fill(hole, 0x1, 4096),
        Descriptor::fill(buf.bus_addr(), 0x3333_3333_3333_3333, 4096),
    ];
    submit_tagged(&mut q, &cpl, (0, 1), &descs)?;
    let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
    let what = "FILL at an unmapped bus address";
    check_fault(&c, spec::FAULT_OUTSIDE_RAM, hole, true, what)?;
    check_eq!(wait_halted(&q)?, spec::HALT_FAULT, "Q_HALT_REASON");
    check_eq!(
        q.head()?,
        1,
        "Q_HEAD of a queue halted on a fault (at the next descriptor)"
    );
    check_pending(&q, &cpl, 1, "the descriptor after the fault, queue halted")?;
    let what = "buffer while the queue is halted";
    check_all(&buf.to_vec(0, 4096), 0x77, what)?;

    resume_and_expect(&q, &cpl, (1, 2, 1), "FILL after RESUME")?;
    check_all(&buf.to_vec(0, 4096), 0x33, "buffer after RESUME")?;
    Ok(q.wait_idle(COMPLETION_TIMEOUT)?)
}

/// Interrupt coalescing: with `Q_COAL_COUNT` = 4 the vector fires once per four completions
/// that asked for it, not before; with a timer (`Q_COAL_USEC`) a partial batch is signalled
/// when the time is up.
fn interrupt_coalescing(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    dev.rearm_interrupts()?;
    let vector = 1u16;
    let cpl = CompletionRecords::new(dev, 8)?;
    let ask = Descriptor::nop().with_interrupt();
    let nops = |q: &mut DmaQueue<'_>, first: usize, n: usize| -> TestResult {
        let first = (first, first as u64);
        submit_tagged(q, &cpl, first, &vec![ask; n])?;
        expect_completions(q, &cpl, first, n, "NOP").map(drop)
    };

    // 1. By count: 3 completions, no interrupt; the 4th, one.
    let mut cfg = QueueConfig::new(0, 16, vector);
    cfg.coalesce_count = 4;
    let mut q = DmaQueue::create(dev, cfg)?;
    drain_interrupts(dev)?;
    nops(&mut q, 0, 3)?;
    let what = "after 3 of 4 coalesced completions";
    expect_irq(dev, vector, false, what)?;
    nops(&mut q, 3, 1)?;
    expect_irq(dev, vector, true, "the 4th coalesced completion")?;
    check_eq!(
        qstat(dev, 0, spec::QSTAT_INTERRUPTS)?,
        1,
        "QSTAT_INTERRUPTS for 4 coalesced completions"
    );
    q.disable()?;

    // 2. By time: a batch of 8 never fills up; the 50 ms timer fires for 2 completions.
    let mut cfg = QueueConfig::new(0, 16, vector);
    cfg.coalesce_count = 8;
    cfg.coalesce_usec = 50_000;
    let mut q = DmaQueue::create(dev, cfg)?;
    drain_interrupts(dev)?;
    let start = std::time::Instant::now();
    submit_tagged(&mut q, &cpl, (4, 4), &[ask; 2])?;
    expect_irq(dev, vector, true, "the coalescing timer")?;
    let waited = start.elapsed();
    progress!("         timer interrupt after {waited:?} (Q_COAL_USEC 50 ms)");
    check!(
        waited >= Duration::from_millis(45),
        "the timer interrupt came after {waited:?}, before the 50 ms"
    );
    expect_completions(&q, &cpl, (4, 4), 2, "NOP")?;
    expect_irq(dev, vector, false, "a second interrupt for the same batch")?;
    q.disable()?;
    Ok(())
}

/// Enabling a queue with a bad size (3, 0, 1, above Q_SIZE_MAX), a base not aligned to a
/// descriptor or a domain that does not exist halts it with HALT_BAD_CONFIG; it still
/// takes doorbells (the tail moves, nothing runs; one at or past the size is ignored);
/// RESUME does not clear it, disabling does; a good configuration then enables it.
fn bad_configuration_halts_until_disabled(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let ring = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let base = ring.bus_addr();
    let reg = |r| spec::queue_reg(0, r);
    let read2 =
        |a, b| -> Result<(u32, u32), Failure> { Ok((dev.read32(reg(a))?, dev.read32(reg(b))?)) };
    let halted = (
        spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR,
        spec::HALT_BAD_CONFIG,
    );
    for (what, b, size, domain) in [
        ("size 3 (not a power of two)", base, 3, 0),
        ("size 0", base, 0, 0),
        ("size 1 (below Q_SIZE_MIN)", base, 1, 0),
        ("twice Q_SIZE_MAX", base, 2 * spec::Q_SIZE_MAX, 0),
        ("a base not aligned to a descriptor", base + 32, 8, 0),
        ("a domain that does not exist", base, 8, caps.domains),
    ] {
        check_eq!(
            program(dev, 0, b, size, domain)?,
            halted,
            "queue enabled with {what}: (Q_STATUS, Q_HALT_REASON)"
        );
        if size > 1 {
            dev.write32(reg(spec::Q_TAIL), 1)?;
            check_eq!(
                read2(spec::Q_TAIL, spec::Q_HEAD)?,
                (1, 0),
                "{what}: (Q_TAIL, Q_HEAD) after a doorbell on the halted queue"
            );
        }
        if size == 3 {
            dev.write32(reg(spec::Q_TAIL), 3)?;
            check_eq!(
                read2(spec::Q_TAIL, spec::Q_HALT_REASON)?,
                (1, spec::HALT_BAD_CONFIG),
                "{what}: (Q_TAIL, Q_HALT_REASON) after a doorbell at the ring size (ignored)"
            );
        }
        dev.write32(reg(spec::Q_CTRL), spec::Q_CTRL_ENABLE | spec::Q_CTRL_RESUME)?;
        check_eq!(
            read2(spec::Q_STATUS, spec::Q_HALT_REASON)?,
            halted,
            "{what}: (Q_STATUS, Q_HALT_REASON) after RESUME"
        );
        dev.write32(reg(spec::Q_CTRL), 0)?;
        check_eq!(
            read2(spec::Q_STATUS, spec::Q_HALT_REASON)?,
            (0, spec::HALT_NONE),
            "{what}: (Q_STATUS, Q_HALT_REASON) after disabling"
        );
    }
    check_eq!(
        program(dev, 0, base, 8, 0)?,
        (spec::Q_STATUS_ENABLED, spec::HALT_NONE),
        "queue enabled with a good configuration: (Q_STATUS, Q_HALT_REASON)"
    );
    dev.write32(reg(spec::Q_CTRL), 0)?;
    let mut q = RunQueue::passthrough(dev, (0, 8, 0), 1)?;
    q.run_ok(
        Descriptor::nop().with_tag(8),
        "a NOP on the well-configured queue",
    )?;
    Ok(())
}

/// While a queue is enabled its base, size and domain ignore writes: they read as
/// programmed and the queue keeps running from its ring.
fn configuration_is_frozen_while_enabled(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::passthrough(dev, (0, 8, 0), 2)?;
    let reg = |r| spec::queue_reg(0, r);
    let regs = [
        spec::Q_BASE_LO,
        spec::Q_BASE_HI,
        spec::Q_SIZE,
        spec::Q_DOMAIN,
    ];
    let read_all =
        || -> Result<Vec<u32>, Failure> { regs.iter().map(|&r| Ok(dev.read32(reg(r))?)).collect() };
    let before = read_all()?;
    check_eq!(
        before,
        [q.ring_iova() as u32, (q.ring_iova() >> 32) as u32, 8, 0],
        "(Q_BASE_LO, Q_BASE_HI, Q_SIZE, Q_DOMAIN) as programmed"
    );
    for (r, v) in [
        (spec::Q_BASE_LO, before[0] ^ 0x1000),
        (spec::Q_BASE_HI, before[1] ^ 1),
        (spec::Q_SIZE, 16),
        (spec::Q_DOMAIN, 1),
    ] {
        dev.write32(reg(r), v)?;
    }
    check_eq!(
        read_all()?,
        before,
        "(Q_BASE_LO, Q_BASE_HI, Q_SIZE, Q_DOMAIN) after writes while enabled"
    );
    let buf = Guarded::new(dev, 64, PAGE)?;
    for i in 0..2 {
        let fill = Descriptor::fill(buf.bus(), 0x4242_4242_4242_4242, 64);
        q.run_ok(fill.with_tag(i), &format!("FILL {i} after the writes"))?;
    }
    buf.check(&[0x42; 64], "FILL after the writes")
}

/// A doorbell at or beyond the ring size halts the queue with HALT_BAD_TAIL; RESUME does
/// not clear it, disabling does, and the queue works again once re-enabled.
fn bad_tail_halts_until_disabled(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let reg = |r| spec::queue_reg(0, r);
    for tail in [8u32, 9, 0xffff_ffff] {
        let q = DmaQueue::new(dev, 0, 8, 0)?;
        dev.write32(reg(spec::Q_TAIL), tail)?;
        check_eq!(
            (q.status()? & spec::Q_STATUS_ERROR, q.halt_reason()?),
            (spec::Q_STATUS_ERROR, spec::HALT_BAD_TAIL),
            "doorbell {tail:#x} on a ring of 8: (Q_STATUS error bit, Q_HALT_REASON)"
        );
        q.resume()?;
        check_eq!(
            q.halt_reason()?,
            spec::HALT_BAD_TAIL,
            "Q_HALT_REASON after RESUME (doorbell {tail:#x})"
        );
        q.disable()?;
        check_eq!(
            (q.status()?, q.halt_reason()?),
            (0, spec::HALT_NONE),
            "(Q_STATUS, Q_HALT_REASON) after disabling (doorbell {tail:#x})"
        );
    }
    let mut q = RunQueue::passthrough(dev, (0, 8, 0), 1)?;
    q.run_ok(Descriptor::nop().with_tag(1), "a NOP after re-enabling")?;
    Ok(())
}

/// A queue halted by a fault (HALT_ON_FAULT) is enabled, in error and not busy, with its
/// head after the faulting descriptor; a doorbell then moves the tail only; RESUME (which
/// reads back 0) runs the pending descriptors in order; every descriptor is counted.
fn halted_queue_takes_doorbells_and_resume_runs_them(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = DmaQueue::create(dev, QueueConfig::new(0, 16, 0).halting_on_fault())?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let dst = Guarded::new(dev, 32, PAGE)?;
    let mut rng = ctx.rng();
    let p: Vec<u64> = (0..4).map(|_| rng.next_u64()).collect();
    let counts = QueueCounts::read(&q)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    fill_around_a_hole(&mut q, &cpl, &dst, hole, [p[0], p[1], p[2]])?;
    check_eq!(wait_halted(&q)?, spec::HALT_FAULT, "Q_HALT_REASON");
    check_eq!(
        q.status()? & (spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR | spec::Q_STATUS_BUSY),
        spec::Q_STATUS_ENABLED | spec::Q_STATUS_ERROR,
        "Q_STATUS of a halted queue (not busy)"
    );
    check_eq!(q.head()?, 2, "Q_HEAD: after the faulting descriptor");
    let fill = Descriptor::fill(dst.bus() + 16, p[3], 8);
    submit_tagged(&mut q, &cpl, (3, 3), &[fill])?;
    check_eq!(
        (q.read_reg(spec::Q_TAIL)?, q.head()?),
        (4, 2),
        "(Q_TAIL, Q_HEAD) after a doorbell on the halted queue"
    );
    check_pending(&q, &cpl, 2, "the descriptor after the fault")?;
    check_pending(&q, &cpl, 3, "the descriptor rung in while halted")?;
    check_all(&dst.read()[8..], CANARY, "destination while halted")?;

    resume_and_expect(&q, &cpl, (2, 2, 2), "FILL after RESUME")?;
    let mut want = Vec::new();
    for v in [p[0], p[2], p[3]] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    want.extend_from_slice(&[CANARY; 8]);
    dst.check(&want, "destination after RESUME")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check_eq!(
        (q.halt_reason()?, q.read_reg(spec::Q_CTRL)?),
        (
            spec::HALT_NONE,
            spec::Q_CTRL_ENABLE | spec::Q_CTRL_HALT_ON_FAULT
        ),
        "(Q_HALT_REASON, Q_CTRL) after RESUME (RESUME reads 0)"
    );
    poll_until("Q_STATUS to read enabled only", || {
        Ok(q.status()? == spec::Q_STATUS_ENABLED)
    })?;
    let what = "(Q_COMPLETED, Q_ERRORS) deltas";
    check_eq!(counts.added(&q)?, (4, 1), "{what}");
    Ok(())
}

/// Without HALT_ON_FAULT a faulting descriptor completes with its error and the queue goes
/// on with the next one, never halting.
fn without_halt_on_fault_the_queue_goes_on(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 3)?;
    let dst = Guarded::new(dev, 16, PAGE)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let p = [
        0x1111_1111_1111_1111,
        0x2222_2222_2222_2222,
        0x3333_3333_3333_3333,
    ];
    fill_around_a_hole(&mut q, &cpl, &dst, hole, p)?;
    expect_completions(&q, &cpl, (2, 2), 1, "FILL after the fault")?;
    let mut want = vec![0x11; 8];
    want.extend_from_slice(&[0x33; 8]);
    dst.check(&want, "destination")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check_eq!(
        (q.status()? & spec::Q_STATUS_ERROR, q.halt_reason()?),
        (0, spec::HALT_NONE),
        "(Q_STATUS error bit, Q_HALT_REASON)"
    );
    Ok(())
}

/// Disabling and enabling a queue puts `Q_HEAD` and `Q_TAIL` back to 0; `Q_COMPLETED` and
/// `Q_ERRORS` count on (only a reset clears them).
fn completion_counters_run_on_across_disable_and_enable(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let cpl = CompletionRecords::new(dev, 3)?;
    let dst = Guarded::new(dev, 16, PAGE)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let counts = |q: &DmaQueue<'_>| -> Result<(u32, u32), QueueError> {
        Ok((q.read_reg(spec::Q_COMPLETED)?, q.read_reg(spec::Q_ERRORS)?))
    };
    let before = {
        let mut q = DmaQueue::new(dev, 0, 16, 0)?;
        let before = counts(&q)?;
        fill_around_a_hole(&mut q, &cpl, &dst, hole, [1, 2, 3])?;
        q.wait_idle(COMPLETION_TIMEOUT)?;
        q.disable()?;
        before
    };
    let q = DmaQueue::new(dev, 0, 16, 0)?;
    check_eq!(
        (q.head()?, q.read_reg(spec::Q_TAIL)?),
        (0, 0),
        "(Q_HEAD, Q_TAIL) after the disable and enable"
    );
    let after = counts(&q)?;
    check_eq!(
        (
            after.0.wrapping_sub(before.0),
            after.1.wrapping_sub(before.1)
        ),
        (3, 1),
        "(Q_COMPLETED, Q_ERRORS) added before the disable, read after the enable"
    );
    Ok(())
}

/// With HALT_ON_FAULT, a malformed descriptor (a DESCRIPTOR_INVALID fault) and a
/// completion record that cannot be written halt the queue too (HALT_FAULT), with the next
/// descriptor pending until RESUME; both faults are logged.
fn halt_on_fault_also_for_invalid_descriptors_and_lost_completions(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut q = DmaQueue::create(dev, QueueConfig::new(0, 16, 0).halting_on_fault())?;
    let cpl = CompletionRecords::new(dev, 3)?;
    let dst = Guarded::new(dev, 16, PAGE)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let seq = log.count()?;

    // 1. A malformed descriptor.
    let bad_at = next_slot_iova(&q);
    let descs = [
        Descriptor::copy(dst.bus(), dst.bus() + 8, 0),
        Descriptor::fill(dst.bus(), 0x1111_1111_1111_1111, 8),
    ];
    submit_tagged(&mut q, &cpl, (0, 1), &descs)?;
    let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
    check_invalid(&c, bad_at, (0, 0), 1, "COPY of length 0")?;
    let what = "Q_HALT_REASON after a malformed descriptor";
    check_eq!(wait_halted(&q)?, spec::HALT_FAULT, "{what}");
    check_pending(&q, &cpl, 1, "the descriptor after the malformed one")?;
    resume_and_expect(&q, &cpl, (1, 2, 1), "FILL after RESUME")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;

    // 2. A completion record that cannot be written.
    cpl.clear(2);
    q.submit(&[
        Descriptor::fill(dst.bus() + 8, 0x2222_2222_2222_2222, 8)
            .with_tag(3)
            .with_completion(hole),
        Descriptor::fill(dst.bus(), 0x3333_3333_3333_3333, 8)
            .with_tag(4)
            .with_completion(cpl.bus_addr(2)),
    ])?;
    let what = "Q_HALT_REASON after a lost completion";
    check_eq!(wait_halted(&q)?, spec::HALT_FAULT, "{what}");
    check_pending(&q, &cpl, 2, "the descriptor after the lost completion")?;
    check_bytes(
        &dst.read(),
        &[[0x11u8; 8], [0x22; 8]].concat(),
        "destination while halted (the FILL whose record was lost ran)",
    )?;
    resume_and_expect(&q, &cpl, (2, 4, 1), "FILL after the second RESUME")?;
    dst.check(&[[0x33u8; 8], [0x22; 8]].concat(), "destination")?;
    let invalid = (spec::FAULT_DESCRIPTOR_INVALID, spec::ACCESS_DESCRIPTOR);
    let want = record(invalid, (0, 0), bad_at, (0, 0), seq);
    expect_record(&mut log, want, "the first fault")?;
    let lost = (
        spec::FAULT_OUTSIDE_RAM,
        spec::ACCESS_WRITE | spec::ACCESS_COMPLETION,
    );
    let want = record(lost, (0, 0), hole, (hole, 0), seq + 1);
    expect_record(&mut log, want, "the second fault")
}

/// A 128-descriptor ring whose second page is not mapped in the queue's domain: the 64
/// descriptors of the first page run, the fetch of the 65th faults (NOT_PRESENT, a
/// descriptor read at its IOVA) and the queue halts with its head at it; once that page
/// is mapped, RESUME runs it and the rest.
fn fetch_fault_mid_ring_halts_at_that_descriptor(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let io = Iovas::for_device(&caps);
    let mut log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
    let cfg = QueueConfig::new(0, 128, 0).in_domain(1);
    let ring = dev.alloc_dma(DmaRequest::new(cfg.ring_bytes()))?;
    let p = PAGE as u64;
    dom.map(io.ring, ring.bus_addr(), p, Perm::R, PageSize::Size4K)?;
    let n = 66usize;
    let mut cpl = CompletionRecords::new(dev, n)?;
    dom.map_buffer(io.cpl, cpl.buffer(), Perm::RW)?;
    cpl.set_device_base(io.cpl);
    let mut q = DmaQueue::with_ring(dev, cfg, ring, io.ring)?;
    let seq = log.count()?;
    submit_tagged(&mut q, &cpl, (0, 0x500), &vec![Descriptor::nop(); n])?;
    expect_completions(&q, &cpl, (0, 0x500), 64, "NOP")?;
    check_eq!(wait_halted(&q)?, spec::HALT_DESC_FETCH, "Q_HALT_REASON");
    check_eq!(q.head()?, 64, "Q_HEAD at the unfetchable descriptor");
    let at = io.ring + 64 * spec::DESC_SIZE;
    let fetch = (spec::FAULT_NOT_PRESENT, spec::ACCESS_DESCRIPTOR);
    expect_record(
        &mut log,
        record(fetch, (1, 0), at, (0, 1), seq),
        "the fetch",
    )?;
    check_pending(&q, &cpl, 64, "the unfetched descriptor")?;
    // A new mapping: no invalidation needed.
    let second = q.ring_bus_addr() + p;
    dom.map(io.ring + p, second, p, Perm::R, PageSize::Size4K)?;
    resume_and_expect(&q, &cpl, (64, 0x500 + 64, n - 64), "NOP after RESUME")?;
    Ok(q.disable()?)
}

/// A queue's completion interrupt goes to its Q_MSIX_VECTOR (here 3, not its default)
/// and only for descriptors that ask: not for a NOP without the flag; for one with it;
/// for an error completion that asked; not for a descriptor with an unknown flag (its
/// flags are not trusted). No other vector fires.
fn interrupt_only_when_asked_on_the_queue_vector(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let v = 3u16;
    let mut q = RunQueue::passthrough(dev, (1, 16, v), 1)?;
    check_eq!(
        q.read_reg(spec::Q_MSIX_VECTOR)?,
        u32::from(v),
        "Q_MSIX_VECTOR of queue 1"
    );
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let interrupts0 = qstat(dev, 1, spec::QSTAT_INTERRUPTS)?;
    drain_interrupts(dev)?;
    let nop = Descriptor::nop();
    let unknown = spec::DESC_FLAG_INTERRUPT | 0x80;
    let cases = [
        ("a NOP without INTERRUPT", nop, spec::STATUS_OK, false),
        (
            "a NOP with INTERRUPT",
            nop.with_interrupt(),
            spec::STATUS_OK,
            true,
        ),
        (
            "a faulting FILL with INTERRUPT",
            Descriptor::fill(hole, 0, 8).with_interrupt(),
            spec::STATUS_DMA_ERROR,
            true,
        ),
        (
            "a NOP with INTERRUPT and the unknown flag 0x80",
            altered(nop, |x| x.flags = unknown),
            spec::STATUS_INVALID_DESCRIPTOR,
            false,
        ),
    ];
    for (what, d, status, irq) in cases {
        let c = q.run(d)?;
        check_status(&c, status, what)?;
        expect_irq(dev, v, irq, what)?;
        silent_elsewhere(dev, v, what)?;
    }
    let interrupts = qstat(dev, 1, spec::QSTAT_INTERRUPTS)? - interrupts0;
    check_eq!(interrupts, 2, "QSTAT_INTERRUPTS of queue 1");
    Ok(())
}

/// Four queues, each with its own MSI-X vector (queue q on vector 3 - q): each queue's
/// completion interrupt arrives on its vector and on no other.
fn msix_vector_per_queue(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let mut queues = Vec::new();
    for qi in 0..4u32 {
        let v = (3 - qi) as u16;
        let q = RunQueue::passthrough(dev, (qi, 8, v), 1)?;
        check_eq!(
            q.read_reg(spec::Q_MSIX_VECTOR)?,
            u32::from(v),
            "Q_MSIX_VECTOR of queue {qi}"
        );
        queues.push((q, v));
    }
    drain_interrupts(dev)?;
    for (qi, (q, v)) in queues.iter_mut().enumerate() {
        let what = format!("NOP on queue {qi}");
        let nop = Descriptor::nop().with_interrupt().with_tag(qi as u64);
        q.run_ok(nop, &what)?;
        expect_irq(dev, *v, true, &what)?;
        silent_elsewhere(dev, *v, &what)?;
    }
    expect_irq(dev, 0, false, "a late interrupt after the four NOPs")?;
    silent_elsewhere(dev, 0, "after the four NOPs")
}

/// Four queues in four translated domains that map the same IOVAs (ring, completions,
/// source, destination) to different memory (4 KiB leaves in two domains, 2 MiB leaves in
/// the other two) run random COPY, FILL and CRC32C at once: every destination holds
/// exactly its own queue's image and nothing around it changes, every CRC is its own
/// source's.
fn four_queues_in_four_domains_stay_isolated(ctx: &mut Ctx) -> TestResult {
    struct Lane<'b> {
        t: Translated<'b>,
        src: DmaBuffer,
        data: Vec<u8>,
        dst: DmaBuffer,
        image: Vec<u8>,
        want: Vec<(u32, u64)>,
    }
    const SIZE: usize = 256 << 10;
    const OPS: usize = 30;
    let dev = ctx.dev()?;
    let mut rng = ctx.rng();
    let mut lanes = Vec::new();
    for qi in 0..4u32 {
        let cfg = QueueConfig::new(qi, 64, qi as u16);
        let mut t = Translated::with(dev, qi + 1, cfg, OPS, None)?;
        let io = t.io;
        // Odd queues: 2 MiB pages, mapped with 2 MiB leaves (the IOVAs are 2 MiB aligned).
        let large = qi % 2 == 1;
        let src = match large {
            true => dev.alloc_dma(DmaRequest::huge(SIZE))?,
            false => dev.alloc_dma(DmaRequest::new(SIZE))?,
        };
        let data = rng.unique(SIZE);
        src.write(0, &data);
        t.dom.map_buffer(io.src, &src, Perm::R)?;
        // The destination range at `off` in `dst`, the rest of it canary.
        let (dst, off) = match large {
            true => (dev.alloc_dma(DmaRequest::huge(SIZE))?, 0),
            false => (dev.alloc_dma(DmaRequest::new(SIZE + 2 * PAGE))?, PAGE),
        };
        dst.fill(0, dst.len(), CANARY);
        if large {
            t.dom.map_buffer(io.dst, &dst, Perm::RW)?;
        } else {
            let bus = dst.bus_addr() + off as u64;
            t.dom
                .map(io.dst, bus, SIZE as u64, Perm::RW, PageSize::Size4K)?;
        }
        let mut image = vec![CANARY; dst.len()];
        let range = &mut image[off..off + SIZE];
        let mut want = Vec::new();
        let mut descs = Vec::new();
        for _ in 0..OPS {
            let len = 1 + rng.below(16 << 10) as usize;
            let a = rng.below((SIZE - len) as u64) as usize;
            let b = rng.below((SIZE - len) as u64) as usize;
            let (s, d) = (io.src + a as u64, io.dst + b as u64);
            descs.push(match rng.below(3) {
                0 => {
                    range[b..b + len].copy_from_slice(&data[a..a + len]);
                    want.push((len as u32, 0));
                    Descriptor::copy(s, d, len as u32)
                }
                1 => {
                    let p = rng.next_u64();
                    range[b..b + len].copy_from_slice(&pattern_bytes(p, len));
                    want.push((len as u32, 0));
                    Descriptor::fill(d, p, len as u32)
                }
                _ => {
                    want.push((len as u32, u64::from(crc32c(&data[a..a + len]))));
                    Descriptor::crc32c(s, len as u32)
                }
            });
        }
        for (i, d) in descs.iter().enumerate() {
            let cpl = t.q.records();
            cpl.clear(i);
            let d = d.with_tag(u64::from(qi) << 32 | i as u64);
            let d = d.with_completion(cpl.device_addr(i));
            t.q.push(&d)?;
        }
        lanes.push(Lane {
            t,
            src,
            data,
            dst,
            image,
            want,
        });
    }
    for l in lanes.iter_mut() {
        l.t.q.doorbell()?;
    }
    for (qi, l) in lanes.iter().enumerate() {
        let what = format!("queue {qi}");
        let tags = (0, (qi as u64) << 32);
        let done = expect_completions(&l.t.q, l.t.q.records(), tags, OPS, &what)?;
        for (i, (c, &want)) in done.iter().zip(&l.want).enumerate() {
            check_eq!(
                (c.bytes, c.result),
                want,
                "queue {qi}, descriptor {i}: bytes, result"
            );
        }
    }
    for (qi, l) in lanes.iter().enumerate() {
        let got = l.dst.to_vec(0, l.dst.len());
        if got != l.image {
            check_bytes(&got, &l.image, format!("queue {qi}'s destination buffer"))?;
        }
        let what = format!("queue {qi}'s source");
        check_bytes(&l.src.to_vec(0, SIZE), &l.data, what)?;
        check_eq!(
            qstat(dev, qi as u32, spec::QSTAT_DESCRIPTORS)?,
            OPS as u64,
            "QSTAT_DESCRIPTORS of queue {qi}"
        );
        let faults = dstat(dev, qi as u32 + 1, spec::DSTAT_FAULTS)?;
        check_eq!(faults, 0, "DSTAT_FAULTS of domain {}", qi + 1);
    }
    for l in &lanes {
        l.t.q.disable()?;
    }
    Ok(())
}

/// Three queues at once: queue 0 in pass-through domain 0 copies 2 MiB in 32 pieces,
/// queue 1 in domain 1 (made pass-through) fills 32 pages, queue 2 in disabled domain 2
/// halts at its first fetch; the halted queue stops neither of the others.
fn a_halted_queue_does_not_stop_the_others(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 16, caps.fault_vector())?;
    set_passthrough(dev, 1, COMPLETION_TIMEOUT)?;
    let n = 32usize;
    let piece = 64 << 10;
    let mut q0 = DmaQueue::new(dev, 0, 64, 0)?;
    let mut q1 = DmaQueue::create(dev, QueueConfig::new(1, 64, 1).in_domain(1))?;
    let mut q2 = DmaQueue::create(dev, QueueConfig::new(2, 8, 2).in_domain(2))?;
    let (cpl0, cpl1, cpl2) = (
        CompletionRecords::new(dev, n)?,
        CompletionRecords::new(dev, n)?,
        CompletionRecords::new(dev, 1)?,
    );
    let src = dev.alloc_dma(DmaRequest::new(n * piece))?;
    let data = ctx.rng().unique(n * piece);
    src.write(0, &data);
    let dst = Guarded::new(dev, n * piece, PAGE)?;
    let fills = Guarded::new(dev, n * PAGE, PAGE)?;
    let pattern = |i: usize| 0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1);
    for i in 0..n {
        let off = (i * piece) as u64;
        let copy = Descriptor::copy(src.bus_addr() + off, dst.bus() + off, piece as u32);
        let at = fills.bus() + (i * PAGE) as u64;
        let fill = Descriptor::fill(at, pattern(i), PAGE as u32);
        for (q, cpl, d) in [(&mut q0, &cpl0, copy), (&mut q1, &cpl1, fill)] {
            cpl.clear(i);
            q.push(&d.with_tag(i as u64).with_completion(cpl.bus_addr(i)))?;
        }
    }
    cpl2.clear(0);
    q2.push(&Descriptor::nop().with_completion(cpl2.bus_addr(0)))?;
    let seq = log.count()?;
    q2.doorbell()?;
    q0.doorbell()?;
    q1.doorbell()?;
    expect_completions(&q0, &cpl0, (0, 0), n, "queue 0")?;
    expect_completions(&q1, &cpl1, (0, 0), n, "queue 1")?;
    let what = "queue 2's Q_HALT_REASON";
    check_eq!(wait_halted(&q2)?, spec::HALT_DESC_FETCH, "{what}");
    check_pending(&q2, &cpl2, 0, "queue 2's NOP")?;
    let fetch = (spec::FAULT_DOMAIN_DISABLED, spec::ACCESS_DESCRIPTOR);
    let want = record(fetch, (2, 2), q2.ring_iova(), (0, 0), seq);
    expect_record(&mut log, want, "queue 2's fault")?;
    dst.check(&data, "queue 0's destination")?;
    let want: Vec<u8> = (0..n)
        .flat_map(|i| pattern_bytes(pattern(i), PAGE))
        .collect();
    fills.check(&want, "queue 1's pages")?;
    check_eq!(
        (
            qstat(dev, 0, spec::QSTAT_BYTES)?,
            qstat(dev, 1, spec::QSTAT_BYTES)?
        ),
        ((n * piece) as u64, (n * PAGE) as u64),
        "QSTAT_BYTES of queues 0 and 1"
    );
    q2.disable()?;
    Ok(())
}

/// Q_COAL_COUNT 0 and 1 both mean no coalescing: every completion that asks raises the
/// vector.
fn coalescing_count_zero_and_one_is_every_completion(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    for count in [0u32, 1] {
        let mut cfg = QueueConfig::new(0, 16, 0);
        cfg.coalesce_count = count;
        let mut q = RunQueue::new(DmaQueue::create(dev, cfg)?, CompletionRecords::new(dev, 1)?);
        check_eq!(q.read_reg(spec::Q_COAL_COUNT)?, count, "Q_COAL_COUNT");
        let interrupts0 = qstat(dev, 0, spec::QSTAT_INTERRUPTS)?;
        drain_interrupts(dev)?;
        for i in 0..3 {
            let what = format!("Q_COAL_COUNT {count}, completion {i}");
            q.run_ok(Descriptor::nop().with_interrupt(), &what)?;
            expect_irq(dev, 0, true, &what)?;
        }
        check_eq!(
            qstat(dev, 0, spec::QSTAT_INTERRUPTS)? - interrupts0,
            3,
            "QSTAT_INTERRUPTS with Q_COAL_COUNT {count}"
        );
        q.disable()?;
    }
    Ok(())
}

/// With Q_COAL_COUNT 3 and no timer only completions that ask for an interrupt count:
/// two asking among three that do not raise nothing, the third asking raises one; a
/// partial batch stays pending until the count is reached.
fn coalescing_counts_only_completions_that_ask(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let mut cfg = QueueConfig::new(0, 16, 0);
    cfg.coalesce_count = 3;
    let mut q = DmaQueue::create(dev, cfg)?;
    let cpl = CompletionRecords::new(dev, 8)?;
    let interrupts0 = qstat(dev, 0, spec::QSTAT_INTERRUPTS)?;
    drain_interrupts(dev)?;
    let (ask, quiet) = (Descriptor::nop().with_interrupt(), Descriptor::nop());
    for (descs, irq, what) in [
        (
            &[ask, quiet, quiet, ask, quiet][..],
            false,
            "2 asking and 3 quiet completions (count 3)",
        ),
        (&[ask], true, "the third asking completion"),
        (
            &[quiet, quiet, quiet, ask, ask],
            false,
            "a partial batch of 2",
        ),
        (&[ask], true, "the second batch complete"),
    ] {
        submit_tagged(&mut q, &cpl, (0, 0), descs)?;
        expect_completions(&q, &cpl, (0, 0), descs.len(), "NOP")?;
        expect_irq(dev, 0, irq, what)?;
    }
    let interrupts = qstat(dev, 0, spec::QSTAT_INTERRUPTS)? - interrupts0;
    check_eq!(interrupts, 2, "QSTAT_INTERRUPTS");
    Ok(())
}

/// Disabling a queue aborts the descriptor in flight: a BATCH of 64 COPY elements of up
/// to 16 MiB each (1 GiB in all, so that it cannot finish first), alternating between two
/// sources into one destination, is disabled once its first bytes have landed. Its
/// completion is ABORTED with the tag and the bytes moved so far; the destination holds
/// exactly what those bytes say (the element in flight over the one before it) and
/// nothing changes afterwards; the queue is disabled with head = tail = 0; the descriptor
/// counts as completed with an error and raises no interrupt although it asked. (Should
/// it finish before the disable all the same, it is tried again, up to 3 times.)
fn disable_aborts_the_descriptor_in_flight(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let job = LongJob::new(dev, &caps, &mut ctx.rng())?;
    let cpl = CompletionRecords::new(dev, 1)?;
    for attempt in 1..=3 {
        job.reset_destination();
        let mut q = DmaQueue::new(dev, 0, 8, 0)?;
        let counts = QueueCounts::read(&q)?;
        drain_interrupts(dev)?;
        let batch = job.descriptor().with_interrupt();
        submit_tagged(&mut q, &cpl, (0, 0xab07), &[batch])?;
        job.wait_started()?;
        q.disable()?;
        let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
        if c.status == spec::STATUS_OK {
            progress!("         attempt {attempt}: the BATCH finished before the disable");
            continue;
        }
        check_status(&c, spec::STATUS_ABORTED, "BATCH disabled in flight")?;
        check_eq!(
            (c.tag, c.fault_reason, c.fault_access, c.fault_addr),
            (0xab07, 0, 0, 0),
            "aborted completion (tag, reason, access, fault_addr)"
        );
        check!(
            u64::from(c.bytes) < job.total(),
            "an aborted BATCH reports {} bytes of {}",
            c.bytes,
            job.total()
        );
        let image = job.image_after(c.bytes);
        job.check_destination(&image, "the destination when the completion was read")?;
        let what = "the aborted BATCH (it asked for one)";
        expect_irq(dev, 0, false, what)?;
        job.check_destination(&image, "the destination a while later")?;
        check_eq!(
            (q.status()?, q.head()?, q.read_reg(spec::Q_TAIL)?),
            (0, 0, 0),
            "(Q_STATUS, Q_HEAD, Q_TAIL) after the disable"
        );
        let what = "(Q_COMPLETED, Q_ERRORS) deltas";
        check_eq!(counts.added(&q)?, (1, 1), "{what}");
        let mut q = DmaQueue::new(dev, 0, 8, 0)?;
        let c = run_desc(&mut q, &cpl, 0, Descriptor::nop().with_tag(1))?;
        return check_status(&c, spec::STATUS_OK, "a NOP on the queue enabled again");
    }
    Err(Failure(format!(
        "a BATCH of {} bytes finished before the disable in 3 attempts: never caught in \
         flight",
        job.total()
    )))
}

/// Length of each of a [`LongJob`]'s buffers (three, of 2 MiB pages).
const LONG_JOB_LEN: usize = 8 << 20;
/// The 2 MiB pages a [`LongJob`] takes.
pub(super) const LONG_JOB_HUGE_PAGES: u32 = (3 * LONG_JOB_LEN / PAGE_SIZE_2M) as u32;

/// A transfer that takes long: a BATCH of [`spec::BATCH_MAX`] COPY elements of up to 8
/// MiB, alternating between two sources into one destination, all in pass-through memory.
pub(super) struct LongJob {
    _srcs: [DmaBuffer; 2],
    data: [Vec<u8>; 2],
    dst: DmaBuffer,
    list: DmaBuffer,
    len: usize,
}

impl LongJob {
    pub(super) fn new(
        dev: &dyn DmaBackend,
        caps: &Capabilities,
        rng: &mut Rng,
    ) -> Result<Self, Failure> {
        let len = caps.max_xfer.min(LONG_JOB_LEN as u32) as usize;
        // 2 MiB pages: behind a platform IOMMU every 4 KiB page would be its own mapping
        // for the VMM to forward (thousands for these buffers).
        let mk = |rng: &mut Rng| -> Result<(DmaBuffer, Vec<u8>), Failure> {
            let b = dev.alloc_dma(DmaRequest::huge(len))?;
            let d = rng.unique(len);
            b.write(0, &d);
            Ok((b, d))
        };
        let (a, da) = mk(rng)?;
        let (b, db) = mk(rng)?;
        let dst = dev.alloc_dma(DmaRequest::huge(len))?;
        let elems: Vec<Descriptor> = (0..spec::BATCH_MAX)
            .map(|i| {
                let s = if i % 2 == 0 { &a } else { &b };
                Descriptor::copy(s.bus_addr(), dst.bus_addr(), len as u32)
            })
            .collect();
        let list = write_list(dev, &elems)?;
        Ok(LongJob {
            _srcs: [a, b],
            data: [da, db],
            dst,
            list,
            len,
        })
    }

    /// The BATCH descriptor.
    pub(super) fn descriptor(&self) -> Descriptor {
        Descriptor::batch(self.list.bus_addr(), spec::BATCH_MAX)
    }

    /// Bytes the whole BATCH moves.
    pub(super) fn total(&self) -> u64 {
        u64::from(spec::BATCH_MAX) * self.len as u64
    }

    /// Fills the destination with the canary.
    pub(super) fn reset_destination(&self) {
        self.dst.fill(0, self.len, CANARY);
    }

    /// Waits until the first bytes have landed in the destination.
    pub(super) fn wait_started(&self) -> TestResult {
        poll_until("the BATCH to start", || {
            Ok(self.dst.to_vec(0, 8) != [CANARY; 8])
        })
    }

    /// The destination after `bytes` of the BATCH moved: the element in flight over the
    /// one before it (or the canary).
    pub(super) fn image_after(&self, bytes: u32) -> Vec<u8> {
        let (e, p) = (bytes as usize / self.len, bytes as usize % self.len);
        let mut image = match e {
            0 => vec![CANARY; self.len],
            _ => self.data[(e - 1) % 2].clone(),
        };
        image[..p].copy_from_slice(&self.data[e % 2][..p]);
        image
    }

    /// The destination's bytes now.
    pub(super) fn image_now(&self) -> Vec<u8> {
        self.dst.to_vec(0, self.len)
    }

    /// Checks the destination against `image`.
    pub(super) fn check_destination(&self, image: &[u8], what: &str) -> TestResult {
        let got = self.dst.to_vec(0, self.len);
        // A slice comparison first: it is fast; check_bytes then names the difference.
        if got != image {
            check_bytes(&got, image, what)?;
        }
        Ok(())
    }
}

/// Submits three FILLs of 8 bytes with `patterns` (tags 0, 1, 2, completion records 0, 1,
/// 2 of `cpl`): into `dst`, into `hole` (no memory there), into `dst` + 8; checks that the
/// first completes and the second faults OUTSIDE_RAM at the hole.
fn fill_around_a_hole(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    dst: &Guarded,
    hole: u64,
    patterns: [u64; 3],
) -> TestResult {
    let descs = [
        Descriptor::fill(dst.bus(), patterns[0], 8),
        Descriptor::fill(hole, patterns[1], 8),
        Descriptor::fill(dst.bus() + 8, patterns[2], 8),
    ];
    submit_tagged(q, cpl, (0, 0), &descs)?;
    expect_completions(q, cpl, (0, 0), 1, "FILL before the fault")?;
    let c = q.wait_completion(cpl, 1, COMPLETION_TIMEOUT)?;
    check_fault(&c, spec::FAULT_OUTSIDE_RAM, hole, true, "FILL into a hole")
}

/// Programs queue `q` with raw register writes (disabling it first), enables it, and
/// returns `(Q_STATUS, Q_HALT_REASON)`.
fn program(
    dev: &dyn DmaBackend,
    q: u32,
    base: u64,
    size: u32,
    domain: u32,
) -> Result<(u32, u32), Failure> {
    let reg = |r| spec::queue_reg(q, r);
    dev.write32(reg(spec::Q_CTRL), 0)?;
    dev.write32(reg(spec::Q_BASE_LO), base as u32)?;
    dev.write32(reg(spec::Q_BASE_HI), (base >> 32) as u32)?;
    dev.write32(reg(spec::Q_SIZE), size)?;
    dev.write32(reg(spec::Q_DOMAIN), domain)?;
    dev.write32(reg(spec::Q_CTRL), spec::Q_CTRL_ENABLE)?;
    Ok((
        dev.read32(reg(spec::Q_STATUS))?,
        dev.read32(reg(spec::Q_HALT_REASON))?,
    ))
}

/// Checks that no vector but `except` has an interrupt pending.
fn silent_elsewhere(dev: &dyn DmaBackend, except: u16, what: &str) -> TestResult {
    for v in (0..dev.msix_vectors()).filter(|&v| v != except) {
        check_eq!(
            dev.wait_interrupt(v, Duration::ZERO)?,
            0,
            "{what}: interrupts on vector {v}"
        );
    }
    Ok(())
}
