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
];

/// COPY of 1 MiB of random data, verified byte for byte.
fn copy_1mib(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = DmaQueue::new(dev, 0, 64, 0)?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let src = dev.alloc_dma(DmaRequest::new(MIB))?;
    let dst = dev.alloc_dma(DmaRequest::new(MIB))?;
    let mut rng = ctx.rng();
    let data = rng.bytes(MIB);
    src.write(0, &data);
    dst.fill(0, MIB, 0xee);
    let tag = rng.next_u64();
    let completed0 = q.read_reg(spec::Q_COMPLETED)?;

    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(src.bus_addr(), dst.bus_addr(), MIB as u32).with_tag(tag),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY 1 MiB")?;
    check_eq!(c.bytes, MIB as u32, "completion bytes");
    check_eq!(c.tag, tag, "completion tag");
    check_eq!(c.fault_addr, 0, "completion fault_addr");
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
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 2)?;
    let size = 64 << 10;
    let buf = dev.alloc_dma(DmaRequest::new(size))?;
    const SENTINEL: u8 = 0x5a;
    buf.fill(0, size, SENTINEL);
    let pattern = 0x0123_4567_89ab_cdefu64;
    let (off, len) = (0x1040usize, 3 * 4096 + 5);
    let tag = 0xf111_0000_0000_0001;

    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(buf.bus_addr() + off as u64, pattern, len as u32).with_tag(tag),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL")?;
    check_eq!(c.bytes, len as u32, "completion bytes");
    check_eq!(c.tag, tag, "completion tag");
    let want: Vec<u8> = (0..len).map(|i| pattern.to_le_bytes()[i % 8]).collect();
    check_bytes(&buf.to_vec(off, len), &want, "filled range")?;
    check_all(&buf.to_vec(0, off), SENTINEL, "bytes before the fill")?;
    check_all(
        &buf.to_vec(off + len, size - off - len),
        SENTINEL,
        "bytes after the fill",
    )?;

    // A second fill with another pattern over part of the first.
    let pattern2 = 0xffee_ddcc_bbaa_9988u64;
    let c = run_desc(
        &mut q,
        &cpl,
        1,
        Descriptor::fill(buf.bus_addr() + 0x2000, pattern2, 64),
    )?;
    check_status(&c, spec::STATUS_OK, "second FILL")?;
    let want2: Vec<u8> = (0..64).map(|i| pattern2.to_le_bytes()[i % 8]).collect();
    check_bytes(&buf.to_vec(0x2000, 64), &want2, "second filled range")?;
    check_bytes(
        &buf.to_vec(0x2040, 8),
        &want[0x2040 - off..0x2048 - off],
        "after second fill",
    )?;
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
    let mut q = DmaQueue::new(dev, 0, 32, 0)?;
    let cpl = CompletionRecords::new(dev, 16)?;
    let size = 1 << 20;
    let a = dev.alloc_dma(DmaRequest::new(size))?;
    let b = dev.alloc_dma(DmaRequest::new(size))?;
    let mut rng = ctx.rng();
    let data = rng.bytes(size);
    a.write(0, &data);
    b.write(0, &data);

    // CRC32C.
    a.write(size - 9, b"123456789");
    let mut i = 0;
    let crc_cases: [(usize, usize, Option<u32>); 6] = [
        (size - 9, 9, Some(0xe306_9283)),
        (0, 1, None),
        (3, 4093, None),
        (4093, 8195, None),
        (0x1_0000, 0x2_0000 + 7, None),
        (0, size, None),
    ];
    for (off, len, known) in crc_cases {
        let want = crc32c(&a.to_vec(off, len));
        if let Some(k) = known {
            check_eq!(want, k, "software CRC32C of \"123456789\"");
        }
        let c = run_desc(
            &mut q,
            &cpl,
            i,
            Descriptor::crc32c(a.bus_addr() + off as u64, len as u32).with_tag(0xc0 + i as u64),
        )?;
        check_status(
            &c,
            spec::STATUS_OK,
            format!("CRC32C of {len} bytes at {off:#x}"),
        )?;
        check_eq!(
            c.result,
            u64::from(want),
            "CRC32C of {len} bytes at {off:#x}"
        );
        check_eq!(c.bytes, len as u32, "CRC32C bytes");
        check_eq!(c.tag, 0xc0 + i as u64, "CRC32C tag");
        i += 1;
    }
    a.write(size - 9, &data[size - 9..]);
    check_bytes(&a.to_vec(0, size), &data, "CRC32C source afterwards")?;

    // COMPARE.
    let cmp = |q: &mut DmaQueue<'_>, i: usize, len: usize| {
        run_desc(
            q,
            &cpl,
            i,
            Descriptor::compare(a.bus_addr(), b.bus_addr(), len as u32).with_tag(0xd0 + i as u64),
        )
    };
    let c = cmp(&mut q, i, size)?;
    check_status(&c, spec::STATUS_OK, "COMPARE of equal buffers")?;
    check_eq!(c.result, 0, "COMPARE result of equal buffers");
    check_eq!(c.bytes, size as u32, "COMPARE bytes");
    i += 1;
    for at in [0usize, 0x1234, 0x8_1000 - 1, size - 1] {
        let orig = data[at];
        b.write(at, &[orig ^ 0x40]);
        let c = cmp(&mut q, i, size)?;
        check_status(
            &c,
            spec::STATUS_OK,
            format!("COMPARE with a difference at {at:#x}"),
        )?;
        check_eq!(
            c.result,
            at as u64 + 1,
            "COMPARE result with a difference at {at:#x}"
        );
        // A shorter compare that ends before the difference sees equal bytes.
        if at > 0 {
            i += 1;
            let c = cmp(&mut q, i, at)?;
            check_status(&c, spec::STATUS_OK, format!("COMPARE of {at:#x} bytes"))?;
            check_eq!(c.result, 0, "COMPARE of the {at:#x} equal bytes before it");
        }
        b.write(at, &[orig]);
        i += 1;
        if i + 2 >= cpl.len() {
            i = 0;
        }
    }
    check_bytes(&a.to_vec(0, size), &data, "COMPARE first source afterwards")?;
    check_bytes(
        &b.to_vec(0, size),
        &data,
        "COMPARE second source afterwards",
    )?;
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
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let src = dev.alloc_dma(DmaRequest::new(64 << 10))?;
    let dst = dev.alloc_dma(DmaRequest::new(64 << 10))?;
    let list = dev.alloc_dma(DmaRequest::new(4096))?;
    let data = ctx.rng().bytes(64 << 10);
    src.write(0, &data);
    let (s, t) = (src.bus_addr(), dst.bus_addr());
    let elems = [
        Descriptor::copy(s, t, 32 << 10),
        Descriptor::nop().with_fence(),
        Descriptor::fill(t + (32 << 10), 0x5a5a_5a5a_5a5a_5a5a, 16 << 10),
        Descriptor::copy(s + (48 << 10), t + (48 << 10), 16 << 10),
    ];
    for (i, e) in elems.iter().enumerate() {
        list.write(i * spec::DESC_SIZE as usize, &e.encode());
    }
    let c = run_desc(&mut q, &cpl, 0, Descriptor::batch(list.bus_addr(), 4))?;
    check_status(&c, spec::STATUS_OK, "BATCH")?;
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
    list.write(
        spec::DESC_SIZE as usize,
        &Descriptor::compare(s, t, 64).encode(),
    );
    let c = run_desc(&mut q, &cpl, 1, Descriptor::batch(list.bus_addr(), 4))?;
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

    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let src = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M))?;
    let dst = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M))?;
    for b in [&src, &dst] {
        check_eq!(b.page_size(), PAGE_SIZE_2M, "page size");
        check_eq!(
            b.bus_addr() % PAGE_SIZE_2M as u64,
            0,
            "bus address alignment"
        );
        check_eq!(
            b.as_ptr() as usize % PAGE_SIZE_2M,
            0,
            "virtual address alignment"
        );
    }
    let data = ctx.rng().bytes(PAGE_SIZE_2M);
    src.write(0, &data);
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::copy(src.bus_addr(), dst.bus_addr(), PAGE_SIZE_2M as u32).with_tag(0x2d),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY 2 MiB between huge pages")?;
    check_eq!(c.bytes, PAGE_SIZE_2M as u32, "bytes");
    check_bytes(&dst.to_vec(0, PAGE_SIZE_2M), &data, "destination")?;
    Ok(())
}

/// DMA memory of 2 MiB pages asked for on each NUMA node: rounded up to whole 2 MiB pages,
/// 2 MiB aligned, on that node, zeroed; a FILL across the boundary of its two pages writes
/// exactly its 16 bytes; base pages on a node too.
fn huge_page_buffers_on_each_node(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 2)?;
    for node in [1, 0] {
        let h = dev.alloc_dma(DmaRequest::huge(PAGE_SIZE_2M + 1).on_node(node))?;
        check_eq!(h.len(), 2 * PAGE_SIZE_2M, "length rounded to 2 MiB pages");
        check_eq!(h.page_size(), PAGE_SIZE_2M, "page size");
        check_eq!(
            h.bus_addr() % PAGE_SIZE_2M as u64,
            0,
            "bus address alignment"
        );
        check_eq!(
            h.node(),
            Some(node),
            "node of huge pages asked for on node {node}"
        );
        check_all(&h.to_vec(0, h.len()), 0, "fresh huge pages")?;
        let c = run_desc(
            &mut q,
            &cpl,
            0,
            Descriptor::fill(h.bus_addr() + PAGE_SIZE_2M as u64 - 8, 0x77, 16),
        )?;
        check_status(&c, spec::STATUS_OK, "FILL across the two huge pages")?;
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
