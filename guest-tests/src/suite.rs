//! The guest tests. Each starts from a freshly reset device and asserts what the register
//! map (device/src/spec.rs, device/SPEC.md) promises.

use std::time::Duration;

use domdma_device::spec;
use domdma_driver_model::backend::vfio::{
    find_domdma, hugepages_2m, reserve_hugepages_2m, VfioBackend, VfioOptions,
};
use domdma_driver_model::backend::{
    BackendError, BumpIova, DmaBackend, DmaRequest, RegisterAccess, PAGE_SIZE_2M, PCI_COMMAND,
    PCI_COMMAND_BUS_MASTER,
};
use domdma_driver_model::caps::{read_stat, Capabilities, Stat};
use domdma_driver_model::dma_queue::{CompletionRecords, Descriptor, DmaQueue, QueueConfig};
use domdma_driver_model::domain::{read_domain, Domain, DomainError, DomainRegs, Invalidation};
use domdma_driver_model::fault_log::FaultLog;
use domdma_driver_model::iopt::{PageSize, Perm};

use crate::harness::{
    check_all, check_bytes, check_fault, check_status, crc32c, drain_interrupts, fresh,
    queue_in_domain, run_desc, Ctx, Failure, Rng, Test, TestResult, COMPLETION_TIMEOUT,
    IRQ_TIMEOUT, NO_IRQ_WINDOW, RESET_TIMEOUT,
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
        Test {
            name: "translated_domain_2m",
            run: translated_domain_2m,
        },
        Test {
            name: "fault_seen_from_guest",
            run: fault_seen_from_guest,
        },
        Test {
            name: "multi_queue",
            run: multi_queue,
        },
        Test {
            name: "invalidation",
            run: invalidation,
        },
        Test {
            name: "crc32c_and_compare",
            run: crc32c_and_compare,
        },
        Test {
            name: "halt_on_fault_and_resume",
            run: halt_on_fault_and_resume,
        },
        Test {
            name: "descriptor_fetch_fault",
            run: descriptor_fetch_fault,
        },
        Test {
            name: "fault_log_overflow",
            run: fault_log_overflow,
        },
        Test {
            name: "interrupt_coalescing",
            run: interrupt_coalescing,
        },
        Test {
            name: "batch_descriptor",
            run: batch_descriptor,
        },
        Test {
            name: "wdf_domain_common_buffer_dma",
            run: wdf_domain_common_buffer_dma,
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
    // One vector per queue and one for the fault log, as REG_CAP says.
    let caps = Capabilities::read(dev)?;
    check_eq!(
        u32::from(dev.msix_vectors()),
        caps.vectors,
        "MSI-X vectors VFIO reports vs REG_CAP"
    );
    check_eq!(
        caps.vectors,
        caps.queues + 1,
        "REG_CAP vectors vs queues + 1"
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
    let caps = Capabilities::read(dev)?;
    crate::progress!("         capabilities: {caps:?}");
    check!(
        (1..=spec::MAX_QUEUES).contains(&caps.queues),
        "CAP queues {} out of 1..={} (CAP={cap:#x})",
        caps.queues,
        spec::MAX_QUEUES
    );
    check_eq!(
        caps.vectors,
        caps.queues + 1,
        "CAP vectors: one per queue plus the fault vector (CAP={cap:#x})"
    );
    check!(
        caps.iova_width == spec::DEFAULT_IOVA_WIDTH || caps.iova_width == spec::IOVA_WIDTH_32,
        "CAP IOVA width {} is neither 48 nor 32 (CAP={cap:#x})",
        caps.iova_width
    );
    check!(
        (1..=spec::MAX_DOMAINS).contains(&caps.domains),
        "CAP domains {} out of 1..={} (CAP={cap:#x})",
        caps.domains,
        spec::MAX_DOMAINS
    );
    for op in [
        spec::OP_NOP,
        spec::OP_COPY,
        spec::OP_FILL,
        spec::OP_COMPARE,
        spec::OP_CRC32C,
    ] {
        check!(
            caps.supports_op(op),
            "CAP_OPS {:#x} lacks opcode {op}",
            caps.ops
        );
    }
    check_eq!(
        caps.page_sizes,
        spec::PGSIZE_4K | spec::PGSIZE_2M | spec::PGSIZE_1G,
        "REG_CAP_PGSIZES"
    );
    check!(
        (1..=spec::MAX_IOTLB_ENTRIES).contains(&caps.iotlb_entries),
        "REG_CAP_IOTLB {} out of range",
        caps.iotlb_entries
    );
    check_eq!(caps.fault_log_max, spec::FAULT_LOG_MAX, "REG_CAP_FAULT_LOG");
    check!(
        (4096..=1 << 30).contains(&caps.max_xfer),
        "REG_MAX_XFER {:#x} out of range",
        caps.max_xfer
    );
    // Domain 0 is pass-through after reset, the others disabled.
    check_eq!(
        read_domain(dev, 0)?.mode,
        spec::DOMAIN_MODE_PASSTHROUGH,
        "domain 0 mode after reset"
    );
    for d in 1..caps.domains {
        check_eq!(
            read_domain(dev, d)?,
            DomainRegs {
                root: 0,
                mode: spec::DOMAIN_MODE_DISABLED
            },
            "domain {d} after reset"
        );
    }

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
        caps.max_xfer,
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
    check_eq!(c.fault_reason, spec::FAULT_OUTSIDE_RAM, "fault reason");

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

// ---- Hardware model (register interface 0.2): domains, page tables, faults, queues ----

/// Where the tests put things in a translated domain's IOVA space. Domain IOVAs start at
/// 2^39 (48-bit mode), above every bus address the VFIO back end hands out, or at 3 GiB in
/// the 32-bit mode, above the bus addresses used then (`harness::LOW_BUS_END`): so an IOVA
/// the device uses is never also a bus address.
#[derive(Debug, Clone, Copy)]
struct Iovas {
    base: u64,
    ring: u64,
    cpl: u64,
    data: u64,
    src: u64,
    dst: u64,
}

fn iovas(caps: &Capabilities) -> Iovas {
    let base = if caps.iova_width > 39 {
        BumpIova::DEFAULT_END
    } else {
        0xc000_0000
    };
    Iovas {
        base,
        ring: base,
        cpl: base + 0x10_0000,
        data: base + 0x40_0000,
        src: base + 0x1000_0000,
        dst: base + 0x2000_0000,
    }
}

/// Reads a domain counter.
fn dstat(dev: &dyn DmaBackend, domain: u32, counter: u32) -> Result<u64, Failure> {
    Ok(read_stat(
        dev,
        Stat::Domain {
            index: domain,
            counter,
        },
    )?)
}

/// Reads a queue counter.
fn qstat(dev: &dyn DmaBackend, queue: u32, counter: u32) -> Result<u64, Failure> {
    Ok(read_stat(
        dev,
        Stat::Queue {
            index: queue,
            counter,
        },
    )?)
}

/// Waits until the queue reports `Q_STATUS_ERROR` (halted); returns `Q_HALT_REASON`.
fn wait_halted(q: &DmaQueue<'_>) -> Result<u32, Failure> {
    let start = std::time::Instant::now();
    loop {
        let status = q.status()?;
        if status & spec::Q_STATUS_ERROR != 0 {
            return Ok(q.halt_reason()?);
        }
        if start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!(
                "queue {} did not halt within {COMPLETION_TIMEOUT:?} (Q_STATUS {status:#x}, \
                 head {})",
                q.index(),
                q.head()?
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks that the descriptor behind record `i` stays pending for a while.
fn check_pending(q: &DmaQueue<'_>, cpl: &CompletionRecords, i: usize, what: &str) -> TestResult {
    match q.wait_completion(cpl, i, NO_IRQ_WINDOW) {
        Err(domdma_driver_model::dma_queue::QueueError::Timeout { .. }) => Ok(()),
        Ok(c) => Err(Failure(format!("{what}: completed: {c}"))),
        Err(e) => Err(e.into()),
    }
}

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
    let free =
        reserve_hugepages_2m(4).map_err(|e| Failure(format!("reserving huge pages: {e}")))?;
    check!(free >= 4, "only {free} free 2 MiB huge pages");
    let io = iovas(&caps);
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
    crate::progress!(
        "         domain 1: root {:#x}, {} tables; IOVA {:#x} -> bus {:#x} (2 MiB leaves)",
        dom.table().root(),
        dom.table().table_count(),
        io.src,
        src.bus_addr() + two_m
    );

    let data = Rng::from_time().bytes(len);
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
    crate::progress!(
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
    let io = iovas(&caps);
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
    crate::progress!("         fault record: {r}");
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
    let io = iovas(&caps);
    let size = 1 << 20;
    let pieces = 8usize;
    let piece = size / pieces;

    let mut doms = Vec::new();
    let mut queues = Vec::new();
    let mut bufs = Vec::new();
    let mut rng = Rng::from_time();
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

/// IOTLB invalidation: after a page-table change without invalidation the device keeps
/// using the cached translation (stale), after a range, domain or global invalidation it
/// uses the new one; an unmap with invalidation makes the IOVA fault; bad commands are
/// rejected with INV_STATUS_ERROR.
fn invalidation(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    fresh(dev)?;
    let caps = Capabilities::read(dev)?;
    check!(
        caps.domains >= 2,
        "need 2 domains, the device has {}",
        caps.domains
    );
    let io = iovas(&caps);
    let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
    let (mut q, cpl) = queue_in_domain(
        dev,
        &mut dom,
        QueueConfig::new(0, 16, 0),
        io.ring,
        io.cpl,
        8,
    )?;
    let a = dev.alloc_dma(DmaRequest::new(4096))?;
    let b = dev.alloc_dma(DmaRequest::new(4096))?;
    const SENTINEL: u8 = 0x11;
    a.fill(0, 4096, SENTINEL);
    b.fill(0, 4096, SENTINEL);
    let x = io.data;
    let page = 4096u64;
    let fill = |i: usize, byte: u8| -> Descriptor {
        Descriptor::fill(x, u64::from_ne_bytes([byte; 8]), 4096).with_tag(i as u64)
    };
    let remap = |dom: &mut Domain<'_>, to: u64| -> TestResult {
        dom.table_mut().unmap(x, page)?;
        dom.table_mut()
            .map(x, to, page, Perm::RW, PageSize::Size4K)?;
        Ok(())
    };

    // 1. X -> a: the FILL lands in a and caches the translation.
    dom.map(x, a.bus_addr(), page, Perm::RW, PageSize::Size4K)?;
    let c = run_desc(&mut q, &cpl, 0, fill(0, 0x21))?;
    check_status(&c, spec::STATUS_OK, "FILL through X -> a")?;
    check_all(&a.to_vec(0, 4096), 0x21, "a after the first FILL")?;

    // 2. X -> b in the table, no invalidation: the device still writes a.
    remap(&mut dom, b.bus_addr())?;
    let stale0 = dstat(dev, 1, spec::DSTAT_STALE_USES)?;
    let c = run_desc(&mut q, &cpl, 1, fill(1, 0x22))?;
    check_status(&c, spec::STATUS_OK, "FILL with a stale translation")?;
    check_all(&a.to_vec(0, 4096), 0x22, "a (stale translation used)")?;
    check_all(&b.to_vec(0, 4096), SENTINEL, "b (new mapping not yet seen)")?;
    let stale = dstat(dev, 1, spec::DSTAT_STALE_USES)? - stale0;
    if caps.strict_iotlb {
        check!(stale >= 1, "strict mode counted no stale use");
    } else {
        check_eq!(stale, 0, "stale uses counted outside strict mode");
    }

    // 3. Range invalidation: now b.
    let seq0 = dev.read32(spec::REG_INV_SEQ)?;
    dom.invalidate_range(x, page)?;
    check_eq!(
        dev.read32(spec::REG_INV_SEQ)?,
        seq0.wrapping_add(1),
        "REG_INV_SEQ after one invalidation"
    );
    check_eq!(
        dev.read32(spec::REG_INV_STATUS)? & (spec::INV_STATUS_BUSY | spec::INV_STATUS_ERROR),
        0,
        "REG_INV_STATUS after a range invalidation"
    );
    let c = run_desc(&mut q, &cpl, 2, fill(2, 0x23))?;
    check_status(&c, spec::STATUS_OK, "FILL after the range invalidation")?;
    check_all(&b.to_vec(0, 4096), 0x23, "b after the range invalidation")?;
    check_all(&a.to_vec(0, 4096), 0x22, "a after the range invalidation")?;

    // 4. Domain invalidation: back to a.
    remap(&mut dom, a.bus_addr())?;
    dom.invalidate()?;
    let c = run_desc(&mut q, &cpl, 3, fill(3, 0x24))?;
    check_status(&c, spec::STATUS_OK, "FILL after the domain invalidation")?;
    check_all(&a.to_vec(0, 4096), 0x24, "a after the domain invalidation")?;
    check_all(&b.to_vec(0, 4096), 0x23, "b after the domain invalidation")?;

    // 5. Global invalidation: b again.
    remap(&mut dom, b.bus_addr())?;
    domdma_driver_model::domain::invalidate(dev, Invalidation::All, COMPLETION_TIMEOUT)?;
    let c = run_desc(&mut q, &cpl, 4, fill(4, 0x25))?;
    check_status(&c, spec::STATUS_OK, "FILL after the global invalidation")?;
    check_all(&b.to_vec(0, 4096), 0x25, "b after the global invalidation")?;
    check_all(&a.to_vec(0, 4096), 0x24, "a after the global invalidation")?;

    // 6. Unmap with invalidation: X faults, nothing is written.
    dom.unmap(x, page)?;
    let c = run_desc(&mut q, &cpl, 5, fill(5, 0x26))?;
    check_fault(
        &c,
        spec::FAULT_NOT_PRESENT,
        x,
        true,
        "FILL after unmap + invalidation",
    )?;
    check_all(&a.to_vec(0, 4096), 0x24, "a after the unmap")?;
    check_all(&b.to_vec(0, 4096), 0x25, "b after the unmap")?;

    // 7. Bad commands are rejected, and a good one clears the error.
    let seq1 = dev.read32(spec::REG_INV_SEQ)?;
    for bad in [
        Invalidation::Range {
            domain: 1,
            iova: x,
            len: 0,
        },
        Invalidation::Domain(caps.domains),
    ] {
        match domdma_driver_model::domain::invalidate(dev, bad, COMPLETION_TIMEOUT) {
            Err(DomainError::InvalidationRejected { .. }) => {}
            other => {
                return Err(Failure(format!(
                    "invalidation {bad:?}: {other:?}, expected INV_STATUS_ERROR"
                )))
            }
        }
    }
    dev.write32(spec::REG_INV_CMD, 0x7f)?;
    check!(
        dev.read32(spec::REG_INV_STATUS)? & spec::INV_STATUS_ERROR != 0,
        "unknown command 0x7f not rejected"
    );
    check_eq!(
        dev.read32(spec::REG_INV_SEQ)?,
        seq1,
        "REG_INV_SEQ after rejected commands"
    );
    dom.invalidate()?;
    check_eq!(
        dev.read32(spec::REG_INV_STATUS)? & spec::INV_STATUS_ERROR,
        0,
        "INV_STATUS_ERROR after a good command"
    );
    q.disable()?;
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
    let mut rng = Rng::from_time();
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
    let io = iovas(&caps);
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
    crate::progress!("         fault record: {r}");
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
    crate::progress!("         timer interrupt after {waited:?} (Q_COAL_USEC 50 ms)");
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

/// The driver model's WDF DMA scenario (the same function the in-process and vfio-user
/// tests run): `IoGetDmaAdapter`, `GetDmaDomain`, two `LARGE_PAGE` domain common buffers
/// from hugetlbfs on the device's NUMA node, a COPY through the domain's 2 MiB mappings,
/// `FreeCommonBuffer`, unload without leaks.
fn wdf_domain_common_buffer_dma(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.shared()?;
    fresh(&*dev)?;
    let node = dev.info().numa_node.unwrap_or(0);
    // Two 3 MiB LARGE_PAGE buffers: four 2 MiB pages, all on the device's node.
    let free = domdma_driver_model::backend::vfio::reserve_hugepages_2m_on_node(node, 4)
        .map_err(|e| Failure(format!("reserving huge pages on node {node}: {e}")))?;
    check!(
        free >= 4,
        "only {free} free 2 MiB huge pages on node {node}"
    );
    let shared: domdma_driver_model::dma::SharedBackend = dev.clone();
    let report =
        domdma_driver_model::scenarios::dma_copy_through_domain_common_buffers(shared, node)
            .map_err(|e| Failure(e.to_string()))?;
    crate::progress!(
        "         domain {}: src IOVA {:#x} -> bus {:#x}, dst IOVA {:#x} -> bus {:#x}, memory on node {:?}",
        report.device_domain,
        report.src.0,
        report.src.1,
        report.dst.0,
        report.dst.1,
        report.src_node
    );
    check_eq!(report.bytes, 3 << 20, "bytes copied");
    check_eq!(report.src_node, Some(node), "PreferredNode honoured");
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
    let data = Rng::from_time().bytes(64 << 10);
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
