//! Conformance: registers, identity, reset and bus mastering.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Registers,
        name: "pci_identity_in_config_space",
        needs: &[],
        run: pci_identity_in_config_space,
    },
    Scenario {
        area: Area::Registers,
        name: "out_of_range_accesses_are_errors",
        needs: &[],
        run: out_of_range_accesses_are_errors,
    },
    Scenario {
        area: Area::Registers,
        name: "register_read_write",
        needs: &[],
        run: register_read_write,
    },
    Scenario {
        area: Area::Registers,
        name: "bus_master_enable",
        needs: &[],
        run: bus_master_enable,
    },
];

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
    progress!("         capabilities: {caps:?}");
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

/// PCI identity in configuration space (vendor, device, class, revision, subsystem), one
/// MSI-X vector per queue plus the fault vector as REG_CAP says, and the back end set up
/// all of them.
fn pci_identity_in_config_space(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
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
    check_eq!(
        class_rev & 0xff,
        u32::from(spec::PCI_REVISION_ID),
        "config revision"
    );
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
    let caps = Capabilities::read(dev)?;
    check_eq!(
        caps.vectors,
        caps.queues + 1,
        "REG_CAP vectors vs queues + 1"
    );
    check_eq!(
        u32::from(dev.msix_vectors()),
        caps.vectors,
        "MSI-X vectors the back end set up vs REG_CAP"
    );
    check_eq!(
        dev.info().msix_vectors,
        dev.msix_vectors(),
        "BackendInfo::msix_vectors"
    );
    Ok(())
}

/// Register accesses outside BAR0 or misaligned, configuration accesses past its end, and
/// waits on a vector that does not exist are errors of the back end, naming the region;
/// none reaches the device.
fn out_of_range_accesses_are_errors(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.write32(spec::REG_SCRATCH, 0x5eed_cafe)?;
    for bad in [
        spec::REGS_BAR_SIZE,
        spec::REGS_BAR_SIZE - 2,
        2,
        u64::MAX - 1,
    ] {
        check!(
            matches!(
                dev.read32(bad),
                Err(BackendError::OutOfRange { region: "BAR0", .. })
            ),
            "read32({bad:#x}) is not an out-of-range BAR0 error"
        );
        check!(
            matches!(dev.write32(bad, 0), Err(BackendError::OutOfRange { .. })),
            "write32({bad:#x}) is not an out-of-range error"
        );
    }
    check_eq!(
        dev.read32(spec::REG_SCRATCH)?,
        0x5eed_cafe,
        "SCRATCH after the refused writes"
    );
    let mut b = [0u8; 8];
    check!(
        matches!(
            dev.config_read(4092, &mut b),
            Err(BackendError::OutOfRange {
                region: "config space",
                ..
            })
        ),
        "an 8-byte config read at 4092 is not an out-of-range error"
    );
    check!(
        matches!(
            dev.wait_interrupt(dev.msix_vectors(), Duration::ZERO),
            Err(BackendError::NoSuchVector { .. })
        ),
        "waiting on vector {} (one past the last) is not NoSuchVector",
        dev.msix_vectors()
    );
    Ok(())
}
