//! Conformance: every operation, BATCH included, checked byte for byte.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Ops,
        name: "huge_page_buffers_on_each_node",
        needs: &[Need::HugePages(4), Need::NumaNodes(2)],
        run: huge_page_buffers_on_each_node,
    },
    Scenario {
        area: Area::Ops,
        name: "copy_1mib",
        needs: &[],
        run: copy_1mib,
    },
    Scenario {
        area: Area::Ops,
        name: "fill",
        needs: &[],
        run: fill,
    },
    Scenario {
        area: Area::Ops,
        name: "crc32c_and_compare",
        needs: &[],
        run: crc32c_and_compare,
    },
    Scenario {
        area: Area::Ops,
        name: "batch_descriptor",
        needs: &[],
        run: batch_descriptor,
    },
    Scenario {
        area: Area::Ops,
        name: "copy_hugepages",
        needs: &[Need::HugePages(2)],
        run: copy_hugepages,
    },
    Scenario {
        area: Area::Ops,
        name: "copy_sizes_and_alignments",
        needs: &[],
        run: copy_sizes_and_alignments,
    },
    Scenario {
        area: Area::Ops,
        name: "copy_of_one_byte_touches_one_byte",
        needs: &[],
        run: copy_of_one_byte_touches_one_byte,
    },
    Scenario {
        area: Area::Ops,
        name: "copy_longer_than_a_chunk_at_odd_offsets",
        needs: &[],
        run: copy_longer_than_a_chunk_at_odd_offsets,
    },
    Scenario {
        area: Area::Ops,
        name: "fill_pattern_phase_from_an_unaligned_start",
        needs: &[],
        run: fill_pattern_phase_from_an_unaligned_start,
    },
    Scenario {
        area: Area::Ops,
        name: "compare_of_equal_buffers_is_zero",
        needs: &[],
        run: compare_of_equal_buffers_is_zero,
    },
    Scenario {
        area: Area::Ops,
        name: "compare_reports_one_plus_the_first_difference",
        needs: &[],
        run: compare_reports_one_plus_the_first_difference,
    },
    Scenario {
        area: Area::Ops,
        name: "compare_stops_at_the_first_difference",
        needs: &[Need::Domains(2)],
        run: compare_stops_at_the_first_difference,
    },
    Scenario {
        area: Area::Ops,
        name: "crc32c_known_vectors",
        needs: &[],
        run: crc32c_known_vectors,
    },
    Scenario {
        area: Area::Ops,
        name: "crc32c_of_long_buffers_matches_software",
        needs: &[],
        run: crc32c_of_long_buffers_matches_software,
    },
    Scenario {
        area: Area::Ops,
        name: "nop_and_fence_run_in_order",
        needs: &[Need::Interrupts],
        run: nop_and_fence_run_in_order,
    },
    Scenario {
        area: Area::Ops,
        name: "batch_elements_run_in_order",
        needs: &[],
        run: batch_elements_run_in_order,
    },
    Scenario {
        area: Area::Ops,
        name: "batch_stops_at_a_faulting_element",
        needs: &[Need::Domains(2)],
        run: batch_stops_at_a_faulting_element,
    },
    Scenario {
        area: Area::Ops,
        name: "batch_stops_at_a_malformed_element",
        needs: &[],
        run: batch_stops_at_a_malformed_element,
    },
    Scenario {
        area: Area::Ops,
        name: "batch_max_elements_and_one_more",
        needs: &[],
        run: batch_max_elements_and_one_more,
    },
    Scenario {
        area: Area::Ops,
        name: "malformed_batch_descriptors_run_nothing",
        needs: &[],
        run: malformed_batch_descriptors_run_nothing,
    },
    Scenario {
        area: Area::Ops,
        name: "batch_list_fetch_fault",
        needs: &[Need::Domains(2)],
        run: batch_list_fetch_fault,
    },
];

/// COPY of 1 MiB of random data, verified byte for byte.
fn copy_1mib(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = RunQueue::passthrough(dev, (0, 64, 0), 4)?;
    let src = dev.alloc_dma(DmaRequest::new(MIB))?;
    let dst = dev.alloc_dma(DmaRequest::new(MIB))?;
    let mut rng = ctx.rng();
    let data = rng.bytes(MIB);
    src.write(0, &data);
    dst.fill(0, MIB, 0xee);
    let tag = rng.next_u64();
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;

    let copy = Descriptor::copy(src.bus_addr(), dst.bus_addr(), MIB as u32);
    let c = q.run_ok(copy.with_tag(tag), "COPY 1 MiB")?;
    check_eq!(
        (c.bytes, c.tag, c.fault_addr),
        (MIB as u32, tag, 0),
        "completion (bytes, tag, fault_addr)"
    );
    check_bytes(&dst.to_vec(0, MIB), &data, "destination")?;
    check_bytes(&src.to_vec(0, MIB), &data, "source after the copy")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check_eq!(q.head()?, q.tail(), "Q_HEAD after the copy");
    check_eq!(
        q.read_reg(spec::Q_COMPLETED)?.wrapping_sub(completed0),
        1,
        "Q_COMPLETED delta"
    );
    Ok(())
}

/// FILL with a 64-bit pattern over an odd length; the bytes around it are untouched.
fn fill(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 2)?;
    let size = 64 << 10;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    const SENTINEL: u8 = 0x5a;
    buf.fill(0, size, SENTINEL);
    let pattern = 0x0123_4567_89ab_cdefu64;
    let (off, len) = (0x1040usize, 3 * 4096 + 5);
    let tag = 0xf111_0000_0000_0001;

    let at = buf.bus_addr() + off as u64;
    let c = q.run_ok(
        Descriptor::fill(at, pattern, len as u32).with_tag(tag),
        "FILL",
    )?;
    check_eq!(
        (c.bytes, c.tag),
        (len as u32, tag),
        "completion (bytes, tag)"
    );
    let want = pattern_bytes(pattern, len);
    check_bytes(&buf.to_vec(off, len), &want, "filled range")?;
    check_all(&buf.to_vec(0, off), SENTINEL, "bytes before the fill")?;
    let after = buf.to_vec(off + len, size - off - len);
    check_all(&after, SENTINEL, "bytes after the fill")?;

    // A second fill with another pattern over part of the first.
    let pattern2 = 0xffee_ddcc_bbaa_9988u64;
    let at = buf.bus_addr() + 0x2000;
    q.run_ok(Descriptor::fill(at, pattern2, 64), "second FILL")?;
    let want2 = pattern_bytes(pattern2, 64);
    check_bytes(&buf.to_vec(0x2000, 64), &want2, "second filled range")?;
    let first = &want[0x2040 - off..0x2048 - off];
    check_bytes(&buf.to_vec(0x2040, 8), first, "after second fill")?;
    Ok(())
}

/// CRC32C of several lengths and alignments, against a software CRC and the standard
/// check value; COMPARE of equal buffers (result 0) and of buffers that differ at the
/// first, a middle and the last byte (result 1 + offset).
fn crc32c_and_compare(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    for op in [spec::OP_COMPARE, spec::OP_CRC32C] {
        check!(
            caps.supports_op(op),
            "CAP_OPS {:#x} lacks opcode {op}",
            caps.ops
        );
    }
    let mut q = RunQueue::passthrough(dev, (0, 32, 0), 16)?;
    let size = 1 << 20;
    let a = dev.alloc_dma(DmaRequest::new(size))?;
    let b = dev.alloc_dma(DmaRequest::new(size))?;
    let mut rng = ctx.rng();
    let data = rng.bytes(size);
    a.write(0, &data);
    b.write(0, &data);

    // CRC32C.
    a.write(size - 9, b"123456789");
    let crc_cases: [(usize, usize, Option<u32>); 6] = [
        (size - 9, 9, Some(0xe306_9283)),
        (0, 1, None),
        (3, 4093, None),
        (4093, 8195, None),
        (0x1_0000, 0x2_0000 + 7, None),
        (0, size, None),
    ];
    for (i, (off, len, known)) in crc_cases.into_iter().enumerate() {
        let want = crc32c(&a.to_vec(off, len));
        if let Some(k) = known {
            check_eq!(want, k, "software CRC32C of \"123456789\"");
        }
        let what = format!("CRC32C of {len} bytes at {off:#x}");
        let tag = 0xc0 + i as u64;
        let d = Descriptor::crc32c(a.bus_addr() + off as u64, len as u32);
        let c = q.run_ok(d.with_tag(tag), &what)?;
        check_eq!(
            (c.result, c.bytes, c.tag),
            (u64::from(want), len as u32, tag),
            "{what}: (result, bytes, tag)"
        );
    }
    a.write(size - 9, &data[size - 9..]);
    check_bytes(&a.to_vec(0, size), &data, "CRC32C source afterwards")?;

    // COMPARE: equal buffers, then a difference at each of a few offsets (a shorter
    // compare that ends before the difference sees equal bytes).
    let mut cmp = |len: usize, want: u64, what: &str| -> TestResult {
        let d = Descriptor::compare(a.bus_addr(), b.bus_addr(), len as u32);
        let c = q.run_ok(d.with_tag(0xd0 + len as u64), what)?;
        check_eq!(
            (c.result, c.bytes),
            (want, len as u32),
            "{what}: (result, bytes)"
        );
        Ok(())
    };
    cmp(size, 0, "COMPARE of equal buffers")?;
    for at in [0usize, 0x1234, 0x8_1000 - 1, size - 1] {
        let orig = data[at];
        b.write(at, &[orig ^ 0x40]);
        let what = format!("COMPARE with a difference at {at:#x}");
        cmp(size, at as u64 + 1, &what)?;
        if at > 0 {
            let what = format!("COMPARE of the {at:#x} equal bytes before it");
            cmp(at, 0, &what)?;
        }
        b.write(at, &[orig]);
    }
    check_bytes(&a.to_vec(0, size), &data, "COMPARE first source afterwards")?;
    let what = "COMPARE second source afterwards";
    check_bytes(&b.to_vec(0, size), &data, what)?;
    Ok(())
}

/// A BATCH descriptor: a list of COPY, FILL and NOP elements in DMA memory runs as one
/// descriptor with one completion (result: elements completed); a COMPARE element stops the
/// batch as a malformed element, after the elements before it ran.
fn batch_descriptor(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.supports_op(spec::OP_BATCH),
        "CAP_OPS {:#x} lacks BATCH",
        caps.ops
    );
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 4)?;
    let src = dev.alloc_dma(DmaRequest::new(64 << 10))?;
    let dst = dev.alloc_dma(DmaRequest::new(64 << 10))?;
    let data = ctx.rng().bytes(64 << 10);
    src.write(0, &data);
    let (s, t) = (src.bus_addr(), dst.bus_addr());
    let list = write_list(
        dev,
        &[
            Descriptor::copy(s, t, 32 << 10),
            Descriptor::nop().with_fence(),
            Descriptor::fill(t + (32 << 10), 0x5a5a_5a5a_5a5a_5a5a, 16 << 10),
            Descriptor::copy(s + (48 << 10), t + (48 << 10), 16 << 10),
        ],
    )?;
    let c = q.run_ok(Descriptor::batch(list.bus_addr(), 4), "BATCH")?;
    check_eq!(c.bytes, 64 << 10, "BATCH bytes");
    check_eq!(c.result, 4, "BATCH elements completed");
    let got = dst.to_vec(0, 64 << 10);
    check!(got[..32 << 10] == data[..32 << 10], "first COPY element");
    check!(
        got[32 << 10..48 << 10].iter().all(|&b| b == 0x5a),
        "FILL element"
    );
    check!(got[48 << 10..] == data[48 << 10..], "last COPY element");

    // A COMPARE element is not allowed: the batch stops there.
    let bad = BatchElement(Descriptor::compare(s, t, 64));
    list.write(spec::DESC_SIZE as usize, &bad.encode());
    let c = q.run(Descriptor::batch(list.bus_addr(), 4))?;
    check_status(&c, spec::STATUS_INVALID_DESCRIPTOR, "BATCH with COMPARE")?;
    check_eq!(c.result, 1, "elements completed before the bad one");
    check_eq!(
        c.fault_addr,
        list.bus_addr() + spec::DESC_SIZE,
        "fault address = the bad element"
    );
    Ok(())
}

/// DMA memory from 2 MiB huge pages: 2 MiB aligned bus addresses, a 2 MiB COPY across the
/// whole page; asking for more pages than are free fails cleanly.
fn copy_hugepages(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    // More than is free (more than any machine here has, when the profile does not say):
    // a clear error, no fallback to base pages.
    let free_now = ctx.env.huge_pages.unwrap_or(1 << 16);
    match dev.alloc_dma(DmaRequest::huge((free_now as usize + 1) * PAGE_SIZE_2M)) {
        // A shortage of 2 MiB pages is `OutOfMemory` (what AllocateDomainCommonBuffer turns
        // into STATUS_INSUFFICIENT_RESOURCES), naming what was needed.
        Err(BackendError::OutOfMemory(m)) if m.contains("huge pages") => {}
        Err(e) => {
            return Err(Failure(format!(
                "over-asking huge pages: unexpected error {e}"
            )))
        }
        Ok(b) => {
            return Err(Failure(format!(
                "asked for {} huge pages with {free_now} free and got {b:?}",
                free_now + 1
            )))
        }
    }

    let mut q = RunQueue::first(dev)?;
    let src = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M))?;
    let dst = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M))?;
    for b in [&src, &dst] {
        check_eq!(b.page_size(), PAGE_SIZE_2M, "page size");
        check_eq!(
            (
                b.bus_addr() % PAGE_SIZE_2M as u64,
                b.as_ptr() as usize % PAGE_SIZE_2M
            ),
            (0, 0),
            "(bus, virtual) address alignment"
        );
    }
    let data = ctx.rng().bytes(PAGE_SIZE_2M);
    src.write(0, &data);
    let copy = Descriptor::copy(src.bus_addr(), dst.bus_addr(), PAGE_SIZE_2M as u32);
    let c = q.run_ok(copy.with_tag(0x2d), "COPY 2 MiB between huge pages")?;
    check_eq!(c.bytes, PAGE_SIZE_2M as u32, "bytes");
    check_bytes(&dst.to_vec(0, PAGE_SIZE_2M), &data, "destination")?;
    Ok(())
}

/// DMA memory of 2 MiB pages asked for on each NUMA node: rounded up to whole 2 MiB pages,
/// 2 MiB aligned, on that node, zeroed; a FILL across the boundary of its two pages writes
/// exactly its 16 bytes; base pages on a node too.
fn huge_page_buffers_on_each_node(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::passthrough(dev, (0, 16, 0), 2)?;
    for node in [1, 0] {
        let h = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M + 1).on_node(node))?;
        check_eq!(
            (h.len(), h.page_size(), h.bus_addr() % PAGE_SIZE_2M as u64),
            (2 * PAGE_SIZE_2M, PAGE_SIZE_2M, 0),
            "(length rounded to 2 MiB pages, page size, bus address alignment)"
        );
        check_eq!(
            h.node(),
            Some(node),
            "node of huge pages asked for on node {node}"
        );
        check_all(&h.to_vec(0, h.len()), 0, "fresh huge pages")?;
        let at = h.bus_addr() + PAGE_SIZE_2M as u64 - 8;
        let fill = Descriptor::fill(at, 0x77, 16);
        q.run_ok(fill, "FILL across the two huge pages")?;
        check_eq!(
            h.to_vec(PAGE_SIZE_2M - 9, 18),
            [0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0],
            "bytes around the page boundary"
        );
    }
    let b = dev.alloc_dma(DmaRequest::new(PAGE_SIZE_4K).on_node(1))?;
    check_eq!(b.node(), Some(1), "node of base pages asked for on node 1");
    check_eq!(b.page_size(), PAGE_SIZE_4K, "base page size");
    Ok(())
}

/// COPY of sizes from 1 byte to 64 KiB, from and to offsets 0..63 of a page and near the
/// end of one (so that the ranges cross page boundaries): the destination range holds the
/// source bytes, nothing around it changes, the source is untouched.
fn copy_sizes_and_alignments(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let mut rng = ctx.rng();
    let mut cases = Vec::new();
    for len in [1usize, 7, 63, 4095, 4096, 4097, 65535, 65536 + 13] {
        cases.push((len, 0, 0));
        cases.push((len, PAGE - 3, PAGE - 5));
        for _ in 0..2 {
            cases.push((len, rng.below(64) as usize, rng.below(64) as usize));
        }
    }
    for (len, so, doff) in cases {
        let tag = rng.next_u64();
        let c = copy_between_offsets(dev, &mut q, &mut rng, (len, so, doff), tag)?;
        check_eq!(
            (c.result, c.fault_addr),
            (0, 0),
            "COPY of {len} bytes from page offset {so} to page offset {doff}: (result, \
             fault_addr)"
        );
    }
    Ok(())
}

/// A 1-byte COPY from the last byte of a page to an odd offset changes exactly one byte.
fn copy_of_one_byte_touches_one_byte(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let src = Guarded::new(dev, 1, 2 * PAGE - 1)?;
    let dst = Guarded::new(dev, 1, PAGE + 17)?;
    check_eq!(
        src.bus() % PAGE as u64,
        PAGE as u64 - 1,
        "the source byte is the last of its page"
    );
    let mut rng = ctx.rng();
    let byte = rng
        .unique(64)
        .into_iter()
        .find(|&b| b != CANARY)
        .unwrap_or(0);
    src.write(0, &[byte]);
    let copy = Descriptor::copy(src.bus(), dst.bus(), 1).with_tag(1);
    let c = q.run_ok(copy, "1-byte COPY")?;
    check_eq!(c.bytes, 1, "1-byte COPY bytes");
    dst.check(&[byte], "1-byte COPY destination")?;
    src.check(&[byte], "1-byte COPY source")
}

/// COPY of 3 MiB + 12345 bytes (longer than a transfer chunk) between odd offsets: every
/// byte lands, nothing around the range changes.
fn copy_longer_than_a_chunk_at_odd_offsets(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let mut rng = ctx.rng();
    let len = 3 * MIB + 12345;
    let so = 1 + 2 * rng.below(32) as usize;
    let doff = (so + 1 + rng.below(62) as usize) % 64;
    for (so, doff) in [(so, doff), (63, 0)] {
        copy_between_offsets(dev, &mut q, &mut rng, (len, so, doff), 0x3c)?;
    }
    Ok(())
}

/// FILL repeats its 64-bit little-endian pattern from the first byte of the range, whatever
/// the range's alignment (byte i is byte i mod 8 of the pattern), across page boundaries;
/// the bytes around the range are untouched; result 0.
fn fill_pattern_phase_from_an_unaligned_start(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let mut rng = ctx.rng();
    for (lead, len) in [
        (PAGE - 3, 5000usize),
        (PAGE + 1, 7),
        (PAGE + 5, 200_001),
        (2 * PAGE - 1, 3 * PAGE + 5),
    ] {
        let what = format!("FILL of {len} bytes at page offset {}", lead % PAGE);
        let dst = Guarded::new(dev, len, lead)?;
        let pattern = rng.next_u64();
        let fill = Descriptor::fill(dst.bus(), pattern, len as u32);
        let c = q.run_ok(fill.with_tag(pattern), &what)?;
        check_eq!(
            (c.bytes, c.result, c.tag),
            (len as u32, 0, pattern),
            "{what}: bytes, result, tag"
        );
        dst.check(&pattern_bytes(pattern, len), &what)?;
    }
    Ok(())
}

/// COMPARE of two equal ranges (at an offset, over page boundaries) completes with result 0
/// and bytes = length; neither side is written.
fn compare_of_equal_buffers_is_zero(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let len = 3 * PAGE - 10;
    let (a, b, data) = equal_pair(dev, len, PAGE + 5, &mut ctx.rng())?;
    let what = "COMPARE of equal ranges";
    let cmp = Descriptor::compare(a.bus(), b.bus(), len as u32);
    let c = q.run_ok(cmp.with_tag(0xc0), what)?;
    check_eq!(
        (c.result, c.bytes, c.tag),
        (0, len as u32, 0xc0),
        "{what}: result, bytes, tag"
    );
    a.check(&data, "first source afterwards")?;
    b.check(&data, "second source afterwards")
}

/// COMPARE reports 1 + the offset of the first difference (relative to the start of the
/// compared range): at the first byte, the second, either side of page and 64 KiB
/// boundaries and the last byte; of two differences the first counts; bytes is the length
/// whatever the result; the sources are only read.
fn compare_reports_one_plus_the_first_difference(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let len = 300_000usize;
    let (a, b, data) = equal_pair(dev, len, PAGE + 3, &mut ctx.rng())?;
    let mut cmp = |off: usize, n: usize, what: &str| -> Result<u64, Failure> {
        let (x, y) = (a.bus() + off as u64, b.bus() + off as u64);
        let c = q.run_ok(Descriptor::compare(x, y, n as u32), what)?;
        check_eq!(c.bytes, n as u32, "{what}: bytes");
        Ok(c.result)
    };
    for at in [0usize, 1, 4095, 4096, 65535, 65536, 131_071, len - 1] {
        b.write(at, &[!data[at]]);
        let what = format!("COMPARE with a difference at {at:#x}");
        check_eq!(cmp(0, len, &what)?, at as u64 + 1, "{what}: result");
        b.write(at, &[data[at]]);
    }
    // Two differences: the first counts.
    b.write(5000, &[!data[5000]]);
    b.write(9000, &[!data[9000]]);
    check_eq!(
        cmp(0, len, "COMPARE with differences at 5000 and 9000")?,
        5001,
        "COMPARE with differences at 5000 and 9000: result"
    );
    // From an offset: relative to the start of the range.
    check_eq!(
        cmp(4000, 2000, "COMPARE of 2000 bytes at 4000")?,
        1001,
        "COMPARE of 2000 bytes from 4000 with a difference at 5000: result"
    );
    check_eq!(
        cmp(5001, 3000, "COMPARE of 3000 bytes at 5001")?,
        0,
        "COMPARE of the equal bytes between the differences"
    );
    b.write(5000, &[data[5000]]);
    b.write(9000, &[data[9000]]);
    a.check(&data, "first source afterwards")?;
    b.check(&data, "second source afterwards")
}

/// In a translated domain, a COMPARE whose first difference is in its second page ends
/// there: the fifth page of the second range, which is not mapped, is never translated
/// (result 1 + offset, no fault). Without the difference the same COMPARE faults at that
/// page, so it really is missing.
fn compare_stops_at_the_first_difference(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let mut log = t.fault_log(8)?;
    let io = t.io;
    let len = 5 * PAGE;
    let (a, data) = t.map_new(io.src, len, Perm::R, &mut ctx.rng())?;
    let b = Guarded::new(dev, len, PAGE)?;
    b.write(0, &data);
    let four = 4 * PAGE as u64;
    t.dom
        .map(io.dst, b.bus(), four, Perm::R, PageSize::Size4K)?;
    b.write(0x1234, &[!data[0x1234]]);
    let count0 = log.count()?;
    let cmp = Descriptor::compare(io.src, io.dst, len as u32);
    let what = "COMPARE with a difference in page 1";
    let c = t.q.run_ok(cmp.with_tag(1), what)?;
    check_eq!(c.result, 0x1235, "COMPARE result");
    check_eq!(log.count()?, count0, "REG_FLOG_COUNT (no fault)");
    let faults = dstat(dev, 1, spec::DSTAT_FAULTS)?;
    check_eq!(faults, 0, "DSTAT_FAULTS of domain 1");

    b.write(0x1234, &[data[0x1234]]);
    let what = "COMPARE of equal pages up to the unmapped one";
    let hole = io.dst + four;
    t.q.run_fault(
        cmp.with_tag(2),
        (spec::FAULT_NOT_PRESENT, hole, false),
        what,
    )?;
    let read = (spec::FAULT_NOT_PRESENT, 0);
    let want = record(read, (1, 0), hole, (0, 1), count0);
    expect_record(&mut log, want, what)?;
    a.check(&data, "first source afterwards")?;
    b.check(&data, "second source afterwards")
}

/// CRC32C check values: "123456789" (here across a page boundary) is 0xe3069283, 32 zero
/// bytes are 0x8a9136aa (RFC 3720 B.4), as the software CRC says too.
fn crc32c_known_vectors(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    check_eq!(crc32c(b"123456789"), 0xe306_9283, "software CRC32C");
    check_eq!(crc32c(&[0; 32]), 0x8a91_36aa, "software CRC32C of 32 zeros");
    let buf = dev.alloc_dma(DmaRequest::new(2 * PAGE))?;
    buf.write(PAGE - 4, b"123456789");
    buf.fill(PAGE + 64, 32, 0);
    for (off, len, want, what) in [
        (
            PAGE - 4,
            9usize,
            0xe306_9283u64,
            "\"123456789\" across a page boundary",
        ),
        (PAGE + 64, 32, 0x8a91_36aa, "32 zero bytes"),
    ] {
        let what = format!("CRC32C of {what}");
        let d = Descriptor::crc32c(buf.bus_addr() + off as u64, len as u32);
        let c = q.run_ok(d.with_tag(len as u64), &what)?;
        check_eq!(
            (c.result, c.bytes, c.tag),
            (want, len as u32, len as u64),
            "{what}: result, bytes, tag"
        );
    }
    check_eq!(
        buf.to_vec(PAGE - 4, 9),
        b"123456789".to_vec(),
        "CRC32C source afterwards"
    );
    Ok(())
}

/// CRC32C of long and odd ranges (over several transfer chunks, at odd offsets, one
/// byte) equals the software CRC32C; the source is only read.
fn crc32c_of_long_buffers_matches_software(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let size = 3 * MIB;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    let data = ctx.rng().unique(size);
    buf.write(0, &data);
    for (off, len) in [
        (1usize, 2 * MIB + 777),
        (33, 4 * PAGE + 1),
        (PAGE - 1, 1),
        (3 * PAGE + 7, 65535),
        (0, size),
    ] {
        let what = format!("CRC32C of {len} bytes at {off:#x}");
        let d = Descriptor::crc32c(buf.bus_addr() + off as u64, len as u32);
        let c = q.run_ok(d, &what)?;
        check_eq!(
            (c.result, c.bytes),
            (u64::from(crc32c(&data[off..off + len])), len as u32),
            "{what}: result, bytes"
        );
    }
    check_bytes(&buf.to_vec(0, size), &data, "CRC32C source afterwards")
}

/// NOP and FENCE: one doorbell submits COPY, a fenced NOP, a fenced CRC32C and a fenced
/// COMPARE of the copy's destination, and a fenced NOP asking for an interrupt; all
/// complete in order with their tags, NOPs move nothing (bytes 0, result 0), the CRC and
/// the COMPARE see the copied data, and one interrupt arrives.
fn nop_and_fence_run_in_order(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 5)?;
    let len = 2 * PAGE;
    let src = dev.alloc_dma(DmaRequest::new(len))?;
    let dst = Guarded::new(dev, len, PAGE)?;
    let data = ctx.rng().unique(len);
    src.write(0, &data);
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;
    let descs = [
        Descriptor::copy(src.bus_addr(), dst.bus(), len as u32),
        Descriptor::nop().with_fence(),
        Descriptor::crc32c(dst.bus(), len as u32).with_fence(),
        Descriptor::compare(src.bus_addr(), dst.bus(), len as u32).with_fence(),
        Descriptor::nop().with_fence().with_interrupt(),
    ];
    drain_interrupts(dev)?;
    submit_tagged(&mut q, &cpl, (0, 0x100), &descs)?;
    let want = [
        (len as u32, 0u64),
        (0, 0),
        (len as u32, u64::from(crc32c(&data))),
        (len as u32, 0),
        (0, 0),
    ];
    for (i, (bytes, result)) in want.into_iter().enumerate() {
        let c = q.wait_completion(&cpl, i, COMPLETION_TIMEOUT)?;
        check_status(&c, spec::STATUS_OK, format!("descriptor {i}"))?;
        check_eq!(
            (c.tag, c.bytes, c.result),
            (0x100 + i as u64, bytes, result),
            "descriptor {i}: tag, bytes, result"
        );
    }
    dst.check(&data, "COPY destination")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check_eq!(
        q.read_reg(spec::Q_COMPLETED)?.wrapping_sub(completed0),
        5,
        "Q_COMPLETED delta"
    );
    expect_irq(dev, 0, true, "the last NOP")?;
    check_eq!(
        dev.wait_interrupt(0, NO_IRQ_WINDOW)?,
        0,
        "interrupts beyond the one the last NOP asked for"
    );
    Ok(())
}

/// A BATCH runs its elements in order as one descriptor: COPY, fenced NOP, a FILL over
/// part of what the COPY wrote (so the order shows), a second COPY. One completion with
/// bytes = the sum, result = 4 elements, the tag; counted as one descriptor.
fn batch_elements_run_in_order(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let len = 3 * PAGE;
    let src = dev.alloc_dma(DmaRequest::new(len))?;
    let dst = Guarded::new(dev, len, PAGE)?;
    let mut rng = ctx.rng();
    let data = rng.unique(len);
    src.write(0, &data);
    let pattern = rng.next_u64();
    let (s, d, p) = (src.bus_addr(), dst.bus(), PAGE as u64);
    let list = write_list(
        dev,
        &[
            Descriptor::copy(s, d, 2 * PAGE as u32),
            Descriptor::nop().with_fence(),
            Descriptor::fill(d + p, pattern, 100),
            Descriptor::copy(s + 2 * p, d + 2 * p, PAGE as u32),
        ],
    )?;
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;
    let descriptors0 = qstat(dev, 0, spec::QSTAT_DESCRIPTORS)?;
    let batch = Descriptor::batch(list.bus_addr(), 4).with_tag(0xba7c);
    let c = q.run_ok(batch, "BATCH")?;
    check_eq!(
        (c.bytes, c.result, c.tag),
        ((3 * PAGE + 100) as u32, 4, 0xba7c),
        "BATCH bytes, result, tag"
    );
    let mut want = data.clone();
    want[PAGE..PAGE + 100].copy_from_slice(&pattern_bytes(pattern, 100));
    dst.check(&want, "BATCH destination")?;
    check_bytes(&src.to_vec(0, len), &data, "source afterwards")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check_eq!(
        q.read_reg(spec::Q_COMPLETED)?.wrapping_sub(completed0),
        1,
        "Q_COMPLETED delta: a BATCH is one descriptor"
    );
    check_eq!(
        qstat(dev, 0, spec::QSTAT_DESCRIPTORS)? - descriptors0,
        1,
        "QSTAT_DESCRIPTORS delta: a BATCH is one descriptor"
    );
    Ok(())
}

/// A BATCH whose second element faults (its destination runs off a one-page mapping)
/// stops there: DMA_ERROR with the fault, bytes = the first element's plus what the second
/// moved before its fault, result 1; the third element, which would write a guarded
/// buffer, does not run; the fault is logged.
fn batch_stops_at_a_faulting_element(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let mut log = t.fault_log(8)?;
    let io = t.io;
    let (_src, data) = t.map_new(io.src, 2 * PAGE, Perm::R, &mut ctx.rng())?;
    // One destination page mapped; the guards around it are not.
    let dst = t.map_guarded(io.dst, PAGE, Perm::RW)?;
    let later = t.map_guarded(io.data, PAGE, Perm::RW)?;
    let list_iova = io.data + 0x10_0000;
    let list = write_list(
        dev,
        &[
            Descriptor::copy(io.src, io.dst, 1000),
            Descriptor::copy(io.src + PAGE as u64, io.dst + 2000, PAGE as u32),
            Descriptor::fill(io.data, 0xffff_ffff_ffff_ffff, 64),
        ],
    )?;
    let (list_bus, p) = (list.bus_addr(), PAGE as u64);
    t.dom
        .map(list_iova, list_bus, p, Perm::R, PageSize::Size4K)?;
    let seq = log.count()?;
    let hole = io.dst + p;
    let c = t.q.run_fault(
        Descriptor::batch(list_iova, 3).with_tag(0xba7d),
        (spec::FAULT_NOT_PRESENT, hole, true),
        "BATCH whose second element runs off its mapping",
    )?;
    check_eq!(
        (c.bytes, c.result, c.tag),
        (1000 + (PAGE as u32 - 2000), 1, 0xba7d),
        "BATCH bytes, elements completed, tag"
    );
    let mut want = vec![CANARY; PAGE];
    want[..1000].copy_from_slice(&data[..1000]);
    want[2000..].copy_from_slice(&data[PAGE..2 * PAGE - 2000]);
    dst.check(&want, "destination of the first two elements")?;
    let what = "the third element's destination (it must not run)";
    later.check(&[CANARY; PAGE], what)?;
    let write = (spec::FAULT_NOT_PRESENT, spec::ACCESS_WRITE);
    let want = record(write, (1, 0), hole, (0, 1), seq);
    expect_record(&mut log, want, "the second element's fault")
}

/// A BATCH with a malformed second element (an opcode not allowed in a list, a nested
/// BATCH, an element with a completion record or an interrupt, length 0, an unknown
/// opcode) completes with INVALID_DESCRIPTOR at that element's address after the first
/// element ran (result 1, bytes 64), and logs a DESCRIPTOR_INVALID record for that
/// element; the third element and the element's completion record are never written.
fn batch_stops_at_a_malformed_element(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut log = FaultLog::enable(dev, 16, caps.fault_vector())?;
    let mut q = RunQueue::first(dev)?;
    let src = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let data = ctx.rng().unique(PAGE);
    src.write(0, &data);
    let dst = Guarded::new(dev, 64, PAGE)?;
    let later = Guarded::new(dev, 64, PAGE)?;
    let spare = Guarded::new(dev, 32, PAGE)?;
    let (s, o) = (src.bus_addr(), dev.alloc_dma(DmaRequest::new(PAGE))?);
    let good = Descriptor::copy(s, dst.bus(), 64);
    let bad: [(&str, Descriptor); 7] = [
        ("COMPARE", Descriptor::compare(s, o.bus_addr(), 64)),
        ("CRC32C", Descriptor::crc32c(s, 64)),
        ("nested BATCH", Descriptor::batch(o.bus_addr(), 1)),
        (
            "element with a completion record",
            Descriptor::copy(s, o.bus_addr(), 64).with_completion(spare.bus()),
        ),
        (
            "element asking for an interrupt",
            Descriptor::copy(s, o.bus_addr(), 64).with_interrupt(),
        ),
        ("element of length 0", Descriptor::copy(s, o.bus_addr(), 0)),
        ("unknown opcode", altered(good, |x| x.opcode = 0x7f)),
    ];
    for (seq, (what, b)) in (log.count()?..).zip(bad) {
        let what = format!("BATCH with {what}");
        dst.write(0, &[CANARY; 64]);
        let third = Descriptor::fill(later.bus(), 0xffff_ffff_ffff_ffff, 64);
        let list = write_list(dev, &[good, b, third])?;
        let c = q.run(Descriptor::batch(list.bus_addr(), 3).with_tag(7))?;
        let at = list.bus_addr() + spec::DESC_SIZE;
        check_invalid(&c, at, (1, 64), 7, &what)?;
        let invalid = (spec::FAULT_DESCRIPTOR_INVALID, spec::ACCESS_DESCRIPTOR);
        expect_record(&mut log, record(invalid, (0, 0), at, (0, 0), seq), &what)?;
        dst.check(&data[..64], &format!("{what}: first element"))?;
        let third = format!("{what}: the element after the bad one");
        later.check(&[CANARY; 64], &third)?;
        let record = format!("{what}: the element's completion record");
        spare.check(&[CANARY; 32], &record)?;
        let bad_dst = format!("{what}: the bad element's destination");
        check_all(&o.to_vec(0, PAGE), 0, bad_dst)?;
    }
    Ok(())
}

/// A BATCH of BATCH_MAX (64) FILL elements runs them all (result 64, every slot its own
/// pattern); a BATCH of 65 is malformed: INVALID_DESCRIPTOR at the BATCH descriptor's own
/// address, result 0, bytes 0, and none of its elements runs.
fn batch_max_elements_and_one_more(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.supports_op(spec::OP_BATCH),
        "CAP_OPS {:#x} lacks BATCH",
        caps.ops
    );
    let mut q = RunQueue::first(dev)?;
    let n = spec::BATCH_MAX as usize;
    let slot = 64usize;
    let mut rng = ctx.rng();
    let dst = Guarded::new(dev, n * slot, PAGE)?;
    let patterns: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    let fill = |g: &Guarded, i: usize, p: u64| {
        Descriptor::fill(g.bus() + (i * slot) as u64, p, slot as u32)
    };
    let elems: Vec<Descriptor> = (0..n).map(|i| fill(&dst, i, patterns[i])).collect();
    let list = write_list(dev, &elems)?;
    let what = "BATCH of BATCH_MAX elements";
    let c = q.run_ok(
        Descriptor::batch(list.bus_addr(), n as u32).with_tag(64),
        what,
    )?;
    check_eq!(
        (c.result, c.bytes, c.tag),
        (n as u64, (n * slot) as u32, 64),
        "{what}: result, bytes, tag"
    );
    let want: Vec<u8> = patterns
        .iter()
        .flat_map(|&p| pattern_bytes(p, slot))
        .collect();
    dst.check(&want, "the 64 filled slots")?;

    let other = Guarded::new(dev, (n + 1) * slot, PAGE)?;
    let elems: Vec<Descriptor> = (0..=n).map(|i| fill(&other, i, !0)).collect();
    let list = write_list(dev, &elems)?;
    let at = next_slot_iova(&q);
    let c = q.run(Descriptor::batch(list.bus_addr(), n as u32 + 1).with_tag(65))?;
    check_invalid(&c, at, (0, 0), 65, "BATCH of BATCH_MAX + 1 elements")?;
    let what = "elements of the refused BATCH";
    other.check(&vec![CANARY; (n + 1) * slot], what)
}

/// Malformed BATCH descriptors (no elements, a list not aligned to a descriptor, a
/// destination set) complete with INVALID_DESCRIPTOR, result 0, bytes 0, and run none of
/// the list's (valid) elements.
fn malformed_batch_descriptors_run_nothing(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = RunQueue::first(dev)?;
    let dst = Guarded::new(dev, 2 * 64, PAGE)?;
    let list = write_list(
        dev,
        &[
            Descriptor::fill(dst.bus(), !0, 64),
            Descriptor::fill(dst.bus() + 64, !0, 64),
        ],
    )?;
    let l = list.bus_addr();
    for (what, d) in [
        ("BATCH of 0 elements", Descriptor::batch(l, 0)),
        ("BATCH with a misaligned list", Descriptor::batch(l + 8, 1)),
        (
            "BATCH with a destination",
            altered(Descriptor::batch(l, 1), |x| x.dst = dst.bus()),
        ),
    ] {
        let at = next_slot_iova(&q);
        let c = q.run(d.with_tag(0xbad))?;
        check_invalid(&c, at, (0, 0), 0xbad, what)?;
        dst.check(&[CANARY; 128], &format!("{what}: the list's elements"))?;
    }
    // The list itself is fine.
    let what = "the same list in a well-formed BATCH";
    q.run_ok(Descriptor::batch(l, 2), what)?;
    dst.check(&[0xff; 128], what)
}

/// A BATCH list that runs into an unmapped page of the queue's domain: the first element
/// (the last descriptor of the mapped page) runs, the fetch of the second faults
/// (NOT_PRESENT, a descriptor read at the page boundary): DMA_ERROR, result 1, bytes 64.
fn batch_list_fetch_fault(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut t = Translated::new(dev, 1, 0)?;
    let mut log = t.fault_log(8)?;
    let io = t.io;
    let dst = t.map_guarded(io.dst, PAGE, Perm::RW)?;
    let pattern = ctx.rng().next_u64();
    let list = dev.alloc_dma(DmaRequest::new(PAGE))?;
    let last = BatchElement(Descriptor::fill(io.dst, pattern, 64));
    list.write(PAGE - spec::DESC_SIZE as usize, &last.encode());
    let p = PAGE as u64;
    t.dom
        .map(io.data, list.bus_addr(), p, Perm::R, PageSize::Size4K)?;
    let end = io.data + p;
    let seq = log.count()?;
    let batch = Descriptor::batch(end - spec::DESC_SIZE, 2).with_tag(2);
    let what = "BATCH list running into an unmapped page";
    let c =
        t.q.run_fault(batch, (spec::FAULT_NOT_PRESENT, end, false), what)?;
    check_eq!(
        (c.fault_access, c.result, c.bytes),
        (spec::ACCESS_DESCRIPTOR, 1, 64),
        "BATCH list fetch fault: (access, result, bytes)"
    );
    let mut want = pattern_bytes(pattern, 64);
    want.resize(PAGE, CANARY);
    dst.check(&want, "the first element's destination")?;
    let fetch = (spec::FAULT_NOT_PRESENT, spec::ACCESS_DESCRIPTOR);
    expect_record(&mut log, record(fetch, (1, 0), end, (0, 1), seq), what)
}

// ---- Helpers ----

/// A COPY of `len` bytes from page offset `so` to page offset `doff` (each range in its own
/// guarded buffer) with `tag`: it completes with `len` bytes and the tag, the destination
/// holds the source's data, the source is unchanged and no canary moved.
fn copy_between_offsets(
    dev: &dyn DmaBackend,
    q: &mut RunQueue<'_>,
    rng: &mut Rng,
    (len, so, doff): (usize, usize, usize),
    tag: u64,
) -> Result<CompletionRecord, Failure> {
    let what = format!("COPY of {len} bytes from page offset {so} to page offset {doff}");
    let src = Guarded::new(dev, len, PAGE + so)?;
    let dst = Guarded::new(dev, len, PAGE + doff)?;
    let data = rng.unique(len);
    src.write(0, &data);
    let copy = Descriptor::copy(src.bus(), dst.bus(), len as u32);
    let c = q.run_ok(copy.with_tag(tag), &what)?;
    check_eq!((c.bytes, c.tag), (len as u32, tag), "{what}: bytes, tag");
    dst.check(&data, &format!("{what}: destination"))?;
    src.check(&data, &format!("{what}: source afterwards"))?;
    Ok(c)
}

/// Two guarded ranges of `len` bytes (`guard` bytes of canary before and after each)
/// holding the same fresh data; the ranges and the data.
fn equal_pair(
    dev: &dyn DmaBackend,
    len: usize,
    guard: usize,
    rng: &mut Rng,
) -> Result<(Guarded, Guarded, Vec<u8>), Failure> {
    let a = Guarded::new(dev, len, guard)?;
    let b = Guarded::new(dev, len, guard)?;
    let data = rng.unique(len);
    a.write(0, &data);
    b.write(0, &data);
    Ok((a, b, data))
}
