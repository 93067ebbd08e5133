//! The guest tests. Each starts from a freshly reset device and asserts what the register
//! map (device/src/spec.rs, device/SPEC.md) promises.

use std::time::Duration;

use domdma_device::spec;
use domdma_driver_model::backend::vfio::{
    find_domdma, hugepages_2m, reserve_hugepages_2m, VfioBackend, VfioBackendError, VfioOptions,
};
use domdma_driver_model::backend::{
    BackendError, DmaBackend, DmaRequest, RegisterAccess, PAGE_SIZE_2M, PCI_COMMAND,
    PCI_COMMAND_BUS_MASTER,
};
use domdma_driver_model::dma_queue::{CompletionRecords, Descriptor, DmaQueue};

use crate::harness::{
    check_all, check_bytes, check_status, fresh, run_desc, Ctx, Failure, Rng, Test, TestResult,
    COMPLETION_TIMEOUT, IRQ_TIMEOUT, NO_IRQ_WINDOW, RESET_TIMEOUT,
};
use crate::{check, check_eq};

/// Every test, in running order.
pub fn all() -> Vec<Test> {
    vec![
        Test {
            name: "device_found_by_ids",
            run: device_found_by_ids,
        },
        Test {
            name: "register_read_write",
            run: register_read_write,
        },
        Test {
            name: "bus_master_enable",
            run: bus_master_enable,
        },
        Test {
            name: "copy_1mib",
            run: copy_1mib,
        },
        Test {
            name: "fill",
            run: fill,
        },
        Test {
            name: "completion_interrupt",
            run: completion_interrupt,
        },
        Test {
            name: "malformed_descriptor",
            run: malformed_descriptor,
        },
        Test {
            name: "unmapped_address",
            run: unmapped_address,
        },
        Test {
            name: "ring_wraparound",
            run: ring_wraparound,
        },
        Test {
            name: "copy_hugepages",
            run: copy_hugepages,
        },
        Test {
            name: "register_access_paths",
            run: register_access_paths,
        },
    ]
}

const MIB: usize = 1 << 20;

/// The device is on the PCI bus with the domdma IDs, and VFIO sees the same IDs in its
/// configuration space.
fn device_found_by_ids(ctx: &mut Ctx) -> TestResult {
    let f = find_domdma(ctx.opts.bdf.as_deref())?;
    crate::progress!("         found {} (driver {:?})", f.bdf, f.driver);
    check_eq!(f.vendor, spec::PCI_VENDOR_ID, "sysfs vendor");
    check_eq!(f.device, spec::PCI_DEVICE_ID, "sysfs device");
    check_eq!(
        f.subsystem_vendor,
        Some(spec::PCI_SUBSYSTEM_VENDOR_ID),
        "sysfs subsystem_vendor"
    );
    check_eq!(
        f.subsystem_device,
        Some(spec::PCI_SUBSYSTEM_ID),
        "sysfs subsystem_device"
    );
    check_eq!(f.class, Some(spec::PCI_CLASS_CODE), "sysfs class");
    check_eq!(f.revision, Some(spec::PCI_REVISION_ID), "sysfs revision");

    let dev = ctx.dev()?;
    check_eq!(
        dev.pci().driver.as_deref(),
        Some("vfio-pci"),
        "bound driver"
    );
    check_eq!(
        dev.config_read16(0x00)?,
        spec::PCI_VENDOR_ID,
        "config vendor ID"
    );
    check_eq!(
        dev.config_read16(0x02)?,
        spec::PCI_DEVICE_ID,
        "config device ID"
    );
    let class_rev = dev.config_read32(0x08)?;
    check_eq!(class_rev >> 8, spec::PCI_CLASS_CODE, "config class code");
    check_eq!(class_rev as u8, spec::PCI_REVISION_ID, "config revision");
    check_eq!(
        dev.config_read16(0x2c)?,
        spec::PCI_SUBSYSTEM_VENDOR_ID,
        "config subsystem vendor"
    );
    check_eq!(
        dev.config_read16(0x2e)?,
        spec::PCI_SUBSYSTEM_ID,
        "config subsystem ID"
    );
    check_eq!(
        dev.msix_vectors(),
        spec::MSIX_VECTORS,
        "MSI-X vectors VFIO reports"
    );
    Ok(())
}

/// Identity, version and capability registers; SCRATCH is read/write; RO registers ignore
/// writes; DEV_CTRL reset self-clears and resets SCRATCH.
fn register_read_write(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    check_eq!(dev.read32(spec::REG_ID)?, spec::DEVICE_ID_MAGIC, "REG_ID");
    check_eq!(
        dev.read32(spec::REG_VERSION)?,
        spec::DEVICE_VERSION,
        "REG_VERSION"
    );
    let cap = dev.read32(spec::REG_CAP)?;
    check_eq!(
        (cap >> spec::CAP_QUEUES_SHIFT) & 0xff,
        spec::NUM_QUEUES,
        "CAP queues (CAP={cap:#x})"
    );
    check_eq!(
        (cap >> spec::CAP_VECTORS_SHIFT) & 0xff,
        u32::from(spec::MSIX_VECTORS),
        "CAP vectors (CAP={cap:#x})"
    );
    check_eq!(
        (cap >> spec::CAP_IOVA_WIDTH_SHIFT) & 0xff,
        spec::IOVA_WIDTH,
        "CAP IOVA width (CAP={cap:#x})"
    );
    let ops = dev.read32(spec::REG_CAP_OPS)?;
    for op in [spec::OP_NOP, spec::OP_COPY, spec::OP_FILL] {
        check!(ops & (1 << op) != 0, "CAP_OPS {ops:#x} lacks opcode {op}");
    }
    check_eq!(
        dev.read32(spec::REG_MAX_XFER)?,
        spec::MAX_XFER,
        "REG_MAX_XFER"
    );

    // Read-only registers ignore writes.
    dev.write32(spec::REG_ID, 0)?;
    dev.write32(spec::REG_VERSION, 0xffff_ffff)?;
    check_eq!(
        dev.read32(spec::REG_ID)?,
        spec::DEVICE_ID_MAGIC,
        "REG_ID after a write"
    );
    check_eq!(
        dev.read32(spec::REG_VERSION)?,
        spec::DEVICE_VERSION,
        "REG_VERSION after a write"
    );

    check_eq!(dev.read32(spec::REG_SCRATCH)?, 0, "SCRATCH after reset");
    let mut patterns = vec![
        0xffff_ffff,
        0,
        0xa5a5_a5a5,
        0x5a5a_5a5a,
        0x1234_5678,
        0x8000_0001,
    ];
    patterns.extend((0..32).step_by(7).map(|b| 1u32 << b));
    for p in patterns {
        dev.write32(spec::REG_SCRATCH, p)?;
        check_eq!(
            dev.read32(spec::REG_SCRATCH)?,
            p,
            "SCRATCH readback of {p:#x}"
        );
    }
    // A neighbouring register is not aliased onto SCRATCH.
    dev.write32(spec::REG_SCRATCH, 0xdead_beef)?;
    check_eq!(
        dev.read32(spec::REG_MAX_XFER)?,
        spec::MAX_XFER,
        "REG_MAX_XFER next to SCRATCH"
    );

    dev.write32(spec::REG_DEV_CTRL, spec::DEV_CTRL_RESET)?;
    let ctrl = dev.read32(spec::REG_DEV_CTRL)?;
    check!(
        ctrl & spec::DEV_CTRL_RESET == 0,
        "DEV_CTRL reset bit did not self-clear ({ctrl:#x})"
    );
    check_eq!(
        dev.read32(spec::REG_SCRATCH)?,
        0,
        "SCRATCH after DEV_CTRL reset"
    );
    check_eq!(
        dev.read32(spec::REG_ID)?,
        spec::DEVICE_ID_MAGIC,
        "REG_ID after DEV_CTRL reset"
    );
    Ok(())
}

/// Bus Master Enable in the PCI command register shows in DEV_STATUS, and the device does
/// no DMA while it is clear: a doorbell leaves the descriptor pending and memory untouched
/// until bus mastering is back on and the doorbell rung again.
fn bus_master_enable(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    check!(
        dev.config_read16(PCI_COMMAND)? & PCI_COMMAND_BUS_MASTER != 0,
        "command register lost Bus Master Enable"
    );
    check!(
        dev.read32(spec::REG_DEV_STATUS)? & spec::DEV_STATUS_BUS_MASTER != 0,
        "DEV_STATUS.BUS_MASTER clear with Bus Master Enable set"
    );
    let mut q = DmaQueue::new(dev, 0, 8, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;
    buf.fill(0, 4096, 0x99);

    dev.set_bus_master(false)?;
    let gated = (|| -> TestResult {
        let status = dev.read32(spec::REG_DEV_STATUS)?;
        check!(
            status & spec::DEV_STATUS_BUS_MASTER == 0,
            "DEV_STATUS.BUS_MASTER set ({status:#x}) with Bus Master Enable clear"
        );
        cpl.clear(0);
        q.submit(&[Descriptor::fill(buf.bus_addr(), 0x1234, 4096)
            .with_tag(0xb1)
            .with_completion(cpl.bus_addr(0))])?;
        match q.wait_completion(&cpl, 0, NO_IRQ_WINDOW) {
            Err(domdma_driver_model::dma_queue::QueueError::Timeout { .. }) => {}
            Ok(c) => {
                return Err(Failure(format!(
                    "descriptor completed with Bus Master Enable clear: {c}"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        check_all(
            &buf.to_vec(0, 4096),
            0x99,
            "memory with Bus Master Enable clear",
        )?;
        Ok(())
    })();
    dev.set_bus_master(true)?;
    gated?;
    check!(
        dev.read32(spec::REG_DEV_STATUS)? & spec::DEV_STATUS_BUS_MASTER != 0,
        "DEV_STATUS.BUS_MASTER clear after re-enabling"
    );
    q.doorbell()?;
    let c = q.wait_completion(&cpl, 0, COMPLETION_TIMEOUT)?;
    check_status(
        &c,
        spec::STATUS_OK,
        "pending FILL after re-enabling bus mastering",
    )?;
    check_eq!(c.tag, 0xb1, "tag");
    check!(
        buf.to_vec(0, 2) == [0x34, 0x12],
        "the pending FILL did not write"
    );
    Ok(())
}

/// COPY of 1 MiB of random data, verified byte for byte.
fn copy_1mib(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = DmaQueue::new(dev, 0, 64, 0)?;
    let cpl = CompletionRecords::new(dev, 4)?;
    let src = dev.alloc_dma(DmaRequest::new(MIB))?;
    let dst = dev.alloc_dma(DmaRequest::new(MIB))?;
    let mut rng = Rng::from_time();
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

/// Malformed descriptors complete with INVALID_DESCRIPTOR and touch no memory but their
/// completion record; the queue keeps working afterwards.
fn malformed_descriptor(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let mut q = DmaQueue::new(dev, 0, 32, 0)?;
    let cases_len = 10;
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
        d.reserved_tail[i] = v;
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
            "unknown flag 0x02 with INTERRUPT",
            Descriptor {
                flags: 0x02 | spec::DESC_FLAG_INTERRUPT,
                ..copy
            },
        ),
        (
            "reserved u16 at 0x02 non-zero",
            Descriptor {
                reserved: 0x0100,
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
    check_all(
        &buf.to_vec(0, size),
        SENTINEL,
        "destination of a COPY from an unmapped source",
    )?;

    // 3. FILL at the bus address of a buffer that was mapped and has been freed.
    let gone = dev.alloc_dma(DmaRequest::new(4096))?;
    let gone_addr = gone.bus_addr();
    drop(gone);
    let c = run_desc(
        &mut q,
        &cpl,
        2,
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

    // 4. The queue keeps working, and the buffer was never written.
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

/// DMA memory from 2 MiB huge pages: 2 MiB aligned bus addresses, a 2 MiB COPY across the
/// whole page; asking for more pages than are free fails cleanly.
fn copy_hugepages(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let free =
        reserve_hugepages_2m(2).map_err(|e| Failure(format!("reserving huge pages: {e}")))?;
    check!(
        free >= 2,
        "only {free} free 2 MiB huge pages after asking the kernel for 2"
    );

    // More than is free: a clear error, no fallback to base pages.
    let (free_now, _) = hugepages_2m()?;
    match dev.alloc_dma(DmaRequest::huge((free_now as usize + 1) * PAGE_SIZE_2M)) {
        Err(BackendError::Backend(e))
            if matches!(
                e.downcast_ref::<VfioBackendError>(),
                Some(VfioBackendError::HugePagesUnavailable { .. })
            ) => {}
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
    let data = Rng::from_time().bytes(PAGE_SIZE_2M);
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

/// Registers and a FILL work both with BAR0 mapped and with pread/pwrite on the region.
fn register_access_paths(ctx: &mut Ctx) -> TestResult {
    let saved = ctx.opts.clone();
    let mut seen = Vec::new();
    let result = (|| -> TestResult {
        for allow_mmap in [true, false] {
            ctx.close();
            ctx.opts = VfioOptions {
                allow_mmap,
                ..saved.clone()
            };
            let dev = ctx.dev()?;
            let access = dev.info().register_access;
            seen.push(access);
            exercise(dev).map_err(|Failure(m)| Failure(format!("BAR0 by {access}: {m}")))?;
        }
        Ok(())
    })();
    ctx.close();
    ctx.opts = saved;
    result?;
    check!(
        seen.contains(&RegisterAccess::RegionReadWrite),
        "pread/pwrite path never used ({seen:?})"
    );
    if !seen.contains(&RegisterAccess::Mmap) {
        crate::progress!(
            "         note: VFIO does not offer mmap for BAR0; only pread/pwrite tested"
        );
    }
    Ok(())
}

fn exercise(dev: &VfioBackend) -> TestResult {
    fresh(dev)?;
    check_eq!(dev.read32(spec::REG_ID)?, spec::DEVICE_ID_MAGIC, "REG_ID");
    for p in [0x0bad_f00d_u32, 0xffff_0000] {
        dev.write32(spec::REG_SCRATCH, p)?;
        check_eq!(dev.read32(spec::REG_SCRATCH)?, p, "SCRATCH");
    }
    let mut q = DmaQueue::new(dev, 0, 4, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(buf.bus_addr(), 0x6666_6666_6666_6666, 4096),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL")?;
    check_all(&buf.to_vec(0, 4096), 0x66, "filled buffer")?;
    reset_then_scratch_zero(dev)
}

fn reset_then_scratch_zero(dev: &VfioBackend) -> TestResult {
    domdma_driver_model::dma_queue::reset_device(dev, RESET_TIMEOUT)?;
    check_eq!(dev.read32(spec::REG_SCRATCH)?, 0, "SCRATCH after reset");
    Ok(())
}
