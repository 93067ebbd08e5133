//! Conformance: queues: rings, MSI-X per queue, coalescing, halt and resume, several at once.

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
        needs: &[Need::Queues(4), Need::Domains(4)],
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
    for v in 0..vectors {
        dev.wait_interrupt(v, Duration::ZERO)?;
    }
    let mut q = DmaQueue::new(dev, 0, 16, vector)?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;

    // 1. FILL with INTERRUPT: the vector fires, and the completion is already written.
    cpl.clear(0);
    q.submit(&[
        Descriptor::fill(buf.bus_addr(), 0x1111_2222_3333_4444, 4096)
            .with_interrupt()
            .with_tag(1)
            .with_completion(cpl.bus_addr(0)),
    ])?;
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
    for v in (0..vectors).filter(|&v| v != vector) {
        check_eq!(
            dev.wait_interrupt(v, Duration::ZERO)?,
            0,
            "interrupts on vector {v}"
        );
    }

    // 2. Without the flag: completes, but no interrupt.
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::fill(buf.bus_addr(), 0x5555, 4096).with_tag(2),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL without INTERRUPT")?;
    let n = dev.wait_interrupt(vector, NO_IRQ_WINDOW)?;
    check_eq!(
        n,
        0,
        "interrupts for a descriptor without the INTERRUPT flag"
    );

    // 3. A NOP with the flag, waited for by interrupt alone.
    cpl.clear(2);
    q.submit(&[Descriptor::nop()
        .with_interrupt()
        .with_tag(3)
        .with_completion(cpl.bus_addr(2))])?;
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
                cpl.clear(i);
                Descriptor::fill(
                    buf.bus_addr() + (i * chunk) as u64,
                    pattern(i),
                    chunk as u32,
                )
                .with_tag(0x1000 + i as u64)
                .with_completion(cpl.bus_addr(i))
            })
            .collect();
        q.submit(&descs)
            .map_err(|e| Failure(format!("round {r}: {e}")))?;
        for i in n..n + count {
            let c = q.wait_completion(&cpl, i, COMPLETION_TIMEOUT)?;
            check_status(&c, spec::STATUS_OK, format!("round {r}, descriptor {i}"))?;
            check_eq!(c.tag, 0x1000 + i as u64, "tag of descriptor {i}");
        }
        q.wait_idle(COMPLETION_TIMEOUT)?;
        n += count;
    }
    for i in 0..total {
        let want = pattern(i).to_le_bytes().repeat(chunk / 8);
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
        Err(domdma_driver_model::dma_queue::QueueError::Full { .. }) => {}
        other => return Err(Failure(format!("pushing into a full ring: {other:?}"))),
    }
    q.doorbell()?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    Ok(())
}

/// Two queues in two translated domains that map the same IOVAs (ring, completions,
/// source, destination) to different memory, working at the same time: each queue's
/// copies land in its own domain's buffers and raise its own vector.
fn multi_queue(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.queues >= 2,
        "need 2 queues, the device has {}",
        caps.queues
    );
    check!(
        caps.domains >= 3,
        "need 3 domains, the device has {}",
        caps.domains
    );
    let io = Iovas::for_device(&caps);
    let size = 1 << 20;
    let pieces = 8usize;
    let piece = size / pieces;

    let mut doms = Vec::new();
    let mut queues = Vec::new();
    let mut bufs = Vec::new();
    let mut rng = ctx.rng();
    for (qi, d) in [(0u32, 1u32), (1, 2)] {
        let mut dom = Domain::translated(dev, d, caps.iova_width)?;
        let (q, cpl) = queue_in_domain(
            dev,
            &mut dom,
            QueueConfig::new(qi, 32, qi as u16),
            io.ring,
            io.cpl,
            pieces,
        )?;
        let src = dev.alloc_dma(DmaRequest::new(size))?;
        let dst = dev.alloc_dma(DmaRequest::new(size))?;
        let data = rng.bytes(size);
        src.write(0, &data);
        dst.fill(0, size, 0);
        dom.map_buffer(io.src, &src, Perm::R)?;
        dom.map_buffer(io.dst, &dst, Perm::W)?;
        doms.push(dom);
        queues.push((q, cpl));
        bufs.push((src, dst, data));
    }
    drain_interrupts(dev)?;
    // Fill both rings, then ring both doorbells back to back.
    for (qi, (q, cpl)) in queues.iter_mut().enumerate() {
        for i in 0..pieces {
            cpl.clear(i);
            let off = (i * piece) as u64;
            let mut d = Descriptor::copy(io.src + off, io.dst + off, piece as u32)
                .with_tag((qi as u64) << 32 | i as u64)
                .with_completion(cpl.device_addr(i));
            if i == pieces - 1 {
                d = d.with_interrupt();
            }
            q.push(&d)?;
        }
    }
    for (q, _) in queues.iter_mut() {
        q.doorbell()?;
    }
    for (qi, (q, cpl)) in queues.iter().enumerate() {
        let n = dev.wait_interrupt(qi as u16, IRQ_TIMEOUT)?;
        check!(n > 0, "queue {qi}: no interrupt on vector {qi}");
        for i in 0..pieces {
            let c = q.wait_completion(cpl, i, COMPLETION_TIMEOUT)?;
            check_status(&c, spec::STATUS_OK, format!("queue {qi}, COPY {i}"))?;
            check_eq!(c.tag, (qi as u64) << 32 | i as u64, "queue {qi}, tag {i}");
            check_eq!(c.bytes, piece as u32, "queue {qi}, bytes {i}");
        }
    }
    for (qi, (src, dst, data)) in bufs.iter().enumerate() {
        check_bytes(
            &dst.to_vec(0, size),
            data,
            format!("queue {qi}'s destination"),
        )?;
        check_bytes(&src.to_vec(0, size), data, format!("queue {qi}'s source"))?;
    }
    for (qi, d) in [(0u32, 1u32), (1, 2)] {
        check_eq!(
            qstat(dev, qi, spec::QSTAT_DESCRIPTORS)?,
            pieces as u64,
            "QSTAT_DESCRIPTORS of queue {qi}"
        );
        check!(
            dstat(dev, d, spec::DSTAT_TRANSLATIONS)? > 0,
            "domain {d} counted no translations"
        );
    }
    for (q, _) in &queues {
        q.disable()?;
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
    cpl.clear(0);
    cpl.clear(1);
    q.submit(&[
        Descriptor::fill(hole, 0x1, 4096)
            .with_tag(1)
            .with_completion(cpl.device_addr(0)),
        Descriptor::fill(buf.bus_addr(), 0x3333_3333_3333_3333, 4096)
            .with_tag(2)
            .with_completion(cpl.device_addr(1)),
    ])?;
    let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
    check_fault(
        &c,
        spec::FAULT_OUTSIDE_RAM,
        hole,
        true,
        "FILL at an unmapped bus address",
    )?;
    check_eq!(wait_halted(&q)?, spec::HALT_FAULT, "Q_HALT_REASON");
    check_eq!(
        q.head()?,
        1,
        "Q_HEAD of a queue halted on a fault (at the next descriptor)"
    );
    check_pending(&q, &cpl, 1, "the descriptor after the fault, queue halted")?;
    check_all(
        &buf.to_vec(0, 4096),
        0x77,
        "buffer while the queue is halted",
    )?;

    q.resume()?;
    let c = q.wait_completion(&cpl, 1, COMPLETION_TIMEOUT)?;
    check_status(&c, spec::STATUS_OK, "FILL after RESUME")?;
    check_eq!(c.tag, 2, "tag");
    check_all(&buf.to_vec(0, 4096), 0x33, "buffer after RESUME")?;
    let status = q.status()?;
    check_eq!(
        status & spec::Q_STATUS_ERROR,
        0,
        "Q_STATUS after RESUME ({status:#x})"
    );
    check_eq!(
        q.halt_reason()?,
        spec::HALT_NONE,
        "Q_HALT_REASON after RESUME"
    );
    q.wait_idle(COMPLETION_TIMEOUT)?;
    Ok(())
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
    let submit = |q: &mut DmaQueue<'_>, range: std::ops::Range<usize>| -> TestResult {
        let descs: Vec<Descriptor> = range
            .map(|i| {
                cpl.clear(i);
                Descriptor::nop()
                    .with_interrupt()
                    .with_tag(i as u64)
                    .with_completion(cpl.device_addr(i))
            })
            .collect();
        q.submit(&descs)?;
        Ok(())
    };

    // 1. By count: 3 completions, no interrupt; the 4th, one.
    let mut cfg = QueueConfig::new(0, 16, vector);
    cfg.coalesce_count = 4;
    let mut q = DmaQueue::create(dev, cfg)?;
    drain_interrupts(dev)?;
    submit(&mut q, 0..3)?;
    for i in 0..3 {
        check_status(
            &q.wait_completion(&cpl, i, COMPLETION_TIMEOUT)?,
            spec::STATUS_OK,
            format!("NOP {i}"),
        )?;
    }
    check_eq!(
        dev.wait_interrupt(vector, NO_IRQ_WINDOW)?,
        0,
        "interrupts after 3 of 4 coalesced completions"
    );
    submit(&mut q, 3..4)?;
    check!(
        dev.wait_interrupt(vector, IRQ_TIMEOUT)? > 0,
        "no interrupt after the 4th coalesced completion"
    );
    check_status(
        &q.wait_completion(&cpl, 3, COMPLETION_TIMEOUT)?,
        spec::STATUS_OK,
        "NOP 3",
    )?;
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
    submit(&mut q, 4..6)?;
    check!(
        dev.wait_interrupt(vector, IRQ_TIMEOUT)? > 0,
        "no interrupt from the coalescing timer"
    );
    let waited = start.elapsed();
    progress!("         timer interrupt after {waited:?} (Q_COAL_USEC 50 ms)");
    check!(
        waited >= Duration::from_millis(45),
        "the timer interrupt came after {waited:?}, before the 50 ms"
    );
    for i in 4..6 {
        check_status(
            &q.wait_completion(&cpl, i, COMPLETION_TIMEOUT)?,
            spec::STATUS_OK,
            format!("NOP {i}"),
        )?;
    }
    check_eq!(
        dev.wait_interrupt(vector, NO_IRQ_WINDOW)?,
        0,
        "a second interrupt for the same batch"
    );
    q.disable()?;
    Ok(())
}
