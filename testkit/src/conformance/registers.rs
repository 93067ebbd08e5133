//! Conformance: registers, identity, reset and bus mastering.

use domdma_driver_model::domain::write_domain;

use super::prelude::*;
use super::queues::LongJob;

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
    Scenario {
        area: Area::Registers,
        name: "reset_values",
        needs: &[],
        run: reset_values,
    },
    Scenario {
        area: Area::Registers,
        name: "reset_clears_programmed_state",
        needs: &[Need::Queues(2), Need::Domains(4)],
        run: reset_clears_programmed_state,
    },
    Scenario {
        area: Area::Registers,
        name: "domain_registers_read_write",
        needs: &[Need::Domains(6)],
        run: domain_registers_read_write,
    },
    Scenario {
        area: Area::Registers,
        name: "read_only_registers_ignore_writes",
        needs: &[],
        run: read_only_registers_ignore_writes,
    },
    Scenario {
        area: Area::Registers,
        name: "statistics_window",
        needs: &[Need::Interrupts, Need::Queues(2), Need::Domains(2)],
        run: statistics_window,
    },
    Scenario {
        area: Area::Registers,
        name: "reset_during_a_long_transfer_writes_no_completion",
        needs: &[
            Need::HugePages(super::queues::LONG_JOB_HUGE_PAGES),
            Need::Interrupts,
            Need::Queues(2),
            Need::Domains(2),
        ],
        run: reset_during_a_long_transfer_writes_no_completion,
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
    // The MSI-X capability (found through the capability list) has one table entry per
    // vector, whether or not the back end delivers interrupts.
    let mut cap = u64::from(dev.config_read16(0x34)? & 0xfc);
    let mut msix_table = None;
    for _ in 0..48 {
        if cap == 0 {
            break;
        }
        let id = dev.config_read16(cap)?;
        if id & 0xff == 0x11 {
            msix_table = Some(u32::from(dev.config_read16(cap + 2)? & 0x7ff) + 1);
            break;
        }
        cap = u64::from(id >> 8) & 0xfc;
    }
    check_eq!(
        cap,
        u64::from(spec::PCI_MSIX_CAP_OFFSET),
        "offset of the MSI-X capability in the capability list"
    );
    check_eq!(
        msix_table,
        Some(caps.vectors),
        "MSI-X table size vs REG_CAP"
    );
    // A back end that delivers interrupts set up every vector (the no-IOMMU back end has
    // no interrupt path at all: 0).
    if dev.msix_vectors() != 0 {
        check_eq!(
            u32::from(dev.msix_vectors()),
            caps.vectors,
            "MSI-X vectors the back end set up vs REG_CAP"
        );
    }
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

/// After a reset every register has its reset value: queues disabled and empty with
/// queue q on vector q and domain 0, domain 0 pass-through and the others disabled with
/// root 0, the fault log registers 0 with the fault vector the last one, no invalidation
/// in progress, SCRATCH and every statistic 0; a queue or domain past the last reads 0.
fn reset_values(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    check_reset_state(dev, &caps, "after reset")
}

/// DEV_CTRL reset puts back everything a driver programmed (queues with their vectors,
/// coalescing and halts, domains, the fault log, SCRATCH, the statistics selection and
/// counters) and keeps Bus Master Enable; the device works afterwards.
fn reset_clears_programmed_state(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    dev.write32(spec::REG_SCRATCH, 0x5eed_5eed)?;
    let table = dev.alloc_dma(DmaRequest::new(PAGE))?;
    write_domain(
        dev,
        3,
        DomainRegs {
            root: table.bus_addr(),
            mode: spec::DOMAIN_MODE_TRANSLATED,
        },
    )?;
    let _log = FaultLog::enable(dev, 8, 1)?;
    let mut cfg = QueueConfig::new(0, 16, 1).halting_on_fault();
    cfg.coalesce_count = 4;
    cfg.coalesce_usec = 100;
    let mut q = DmaQueue::create(dev, cfg)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(hole, 0, 8))?;
    check_fault(&c, spec::FAULT_OUTSIDE_RAM, hole, true, "FILL into a hole")?;
    check_eq!(
        wait_halted(&q)?,
        spec::HALT_FAULT,
        "Q_HALT_REASON before reset"
    );
    let _q1 = DmaQueue::new(dev, 1, 8, 0)?;
    dev.write32(
        spec::domain_reg(0, spec::D_CTRL),
        spec::DOMAIN_MODE_DISABLED,
    )?;
    dev.write32(spec::REG_INV_DOMAIN, 3)?;
    check!(
        dev.read32(spec::REG_FLOG_COUNT)? == 1 && qstat(dev, 0, spec::QSTAT_FAULTS)? == 1,
        "the fault before the reset was not counted"
    );

    dev.write32(spec::REG_DEV_CTRL, spec::DEV_CTRL_RESET)?;
    check_eq!(
        dev.read32(spec::REG_DEV_CTRL)? & spec::DEV_CTRL_RESET,
        0,
        "DEV_CTRL reset bit after the reset"
    );
    check_reset_state(dev, &caps, "after DEV_CTRL reset")?;
    check!(
        dev.config_read16(PCI_COMMAND)? & PCI_COMMAND_BUS_MASTER != 0,
        "DEV_CTRL reset cleared Bus Master Enable in the command register"
    );
    let mut q = DmaQueue::new(dev, 0, 8, 0)?;
    let buf = Guarded::new(dev, 64, PAGE)?;
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(buf.bus(), 0x7777_7777_7777_7777, 64),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL after the reset")?;
    check_all(&buf.read(), 0x77, "FILL after the reset")?;
    buf.check_guards("FILL after the reset")
}

/// Domain registers are read/write: D_ROOT_LO keeps bits 11:0 as written, D_ROOT_HI all
/// 32 bits, D_CTRL only the mode (bits 1:0); writes to a domain past the last go nowhere.
fn domain_registers_read_write(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let reg = |d: u32, r: u64| spec::domain_reg(d, r);
    let result = (|| -> TestResult {
        dev.write32(reg(5, spec::D_ROOT_LO), 0x0020_1234)?;
        dev.write32(reg(5, spec::D_ROOT_HI), 0x1)?;
        dev.write32(reg(5, spec::D_CTRL), 0xffff_fffe)?;
        check_eq!(
            (
                dev.read32(reg(5, spec::D_ROOT_LO))?,
                dev.read32(reg(5, spec::D_ROOT_HI))?,
                dev.read32(reg(5, spec::D_CTRL))?
            ),
            (0x0020_1234, 1, spec::DOMAIN_MODE_TRANSLATED),
            "domain 5 (D_ROOT_LO with bits 11:0 kept, D_ROOT_HI, D_CTRL = bits 1:0)"
        );
        let regs = DomainRegs {
            root: 0x1234_5000_7000,
            mode: spec::DOMAIN_MODE_TRANSLATED,
        };
        write_domain(dev, 3, regs)?;
        check_eq!(read_domain(dev, 3)?, regs, "domain 3 as written");
        for mode in [
            spec::DOMAIN_MODE_PASSTHROUGH,
            spec::DOMAIN_MODE_DISABLED,
            spec::DOMAIN_MODE_TRANSLATED,
        ] {
            dev.write32(reg(3, spec::D_CTRL), mode)?;
            check_eq!(
                dev.read32(reg(3, spec::D_CTRL))?,
                mode,
                "D_CTRL of domain 3 after writing mode {mode}"
            );
        }
        check_eq!(
            read_domain(dev, 4)?,
            DomainRegs {
                root: 0,
                mode: spec::DOMAIN_MODE_DISABLED
            },
            "domain 4 (next to the ones written)"
        );
        let past = caps.domains;
        dev.write32(reg(past, spec::D_ROOT_LO), 0x1000)?;
        dev.write32(reg(past, spec::D_CTRL), spec::DOMAIN_MODE_PASSTHROUGH)?;
        check_eq!(
            (
                dev.read32(reg(past, spec::D_ROOT_LO))?,
                dev.read32(reg(past, spec::D_CTRL))?
            ),
            (0, 0),
            "registers of domain {past}, past the last"
        );
        check_eq!(
            read_domain(dev, past - 1)?,
            DomainRegs {
                root: 0,
                mode: spec::DOMAIN_MODE_DISABLED
            },
            "the last domain after writes past it"
        );
        Ok(())
    })();
    for d in [3, 5] {
        write_domain(
            dev,
            d,
            DomainRegs {
                root: 0,
                mode: spec::DOMAIN_MODE_DISABLED,
            },
        )?;
    }
    result
}

/// Writes to the read-only registers (identity, capabilities, status, invalidation status
/// and sequence, fault log head and counters, the statistics value, a queue's head,
/// status, counters and halt reason) change nothing, and the queue goes on from where it
/// was.
fn read_only_registers_ignore_writes(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let _log = FaultLog::enable(dev, 8, caps.fault_vector())?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    let buf = Guarded::new(dev, 8, PAGE)?;
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(hole, 0, 8))?;
    check_fault(&c, spec::FAULT_OUTSIDE_RAM, hole, true, "FILL into a hole")?;
    let c = run_desc(&mut q, &cpl, 0, Descriptor::fill(buf.bus(), 1, 8))?;
    check_status(&c, spec::STATUS_OK, "FILL")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check!(
        dev.read32(spec::REG_FLOG_HEAD)? == 1,
        "the fault was not logged before the writes"
    );
    dev.write32(
        spec::REG_STAT_SELECT,
        Stat::Queue {
            index: 0,
            counter: spec::QSTAT_DESCRIPTORS,
        }
        .select(),
    )?;
    let regs = [
        spec::REG_ID,
        spec::REG_VERSION,
        spec::REG_CAP,
        spec::REG_CAP_OPS,
        spec::REG_MAX_XFER,
        spec::REG_DEV_STATUS,
        spec::REG_CAP_PGSIZES,
        spec::REG_CAP_IOTLB,
        spec::REG_CAP_FAULT_LOG,
        spec::REG_INV_STATUS,
        spec::REG_INV_SEQ,
        spec::REG_FLOG_HEAD,
        spec::REG_FLOG_COUNT,
        spec::REG_FLOG_DROPPED,
        spec::REG_STAT_VALUE_LO,
        spec::REG_STAT_VALUE_HI,
        spec::queue_reg(0, spec::Q_HEAD),
        spec::queue_reg(0, spec::Q_STATUS),
        spec::queue_reg(0, spec::Q_COMPLETED),
        spec::queue_reg(0, spec::Q_ERRORS),
        spec::queue_reg(0, spec::Q_HALT_REASON),
    ];
    let read_all = || -> Result<Vec<u32>, Failure> {
        regs.iter()
            .map(|&r| Ok(dev.read32(r)?))
            .collect::<Result<Vec<u32>, Failure>>()
    };
    let before = read_all()?;
    for &r in &regs {
        dev.write32(r, 0x5a5a_5a5a)?;
    }
    let after = read_all()?;
    for (i, r) in regs.iter().enumerate() {
        check_eq!(after[i], before[i], "register {r:#x} after a write");
    }
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        Descriptor::fill(buf.bus(), 0x0202_0202_0202_0202, 8),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL after the writes")?;
    check_all(&buf.read(), 2, "FILL after the writes")?;
    q.wait_idle(COMPLETION_TIMEOUT)?;
    check_eq!(
        q.head()?,
        3,
        "Q_HEAD after the writes and one more descriptor"
    );
    Ok(())
}

/// The statistics window: each queue and domain counter latched by REG_STAT_SELECT
/// (which reads back) counts what happened; an unknown kind, counter, queue or domain
/// reads 0; the latched value does not move until the next selection; a translated
/// domain's translations are its hits plus misses, its walks its misses (plus a re-walk
/// per hit in strict mode).
fn statistics_window(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let mut q = DmaQueue::new(dev, 0, 16, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let a = Guarded::new(dev, PAGE, PAGE)?;
    let b = Guarded::new(dev, 1000, PAGE)?;
    let hole = dev.reserve_unmapped(PAGE as u64)?;
    for (d, status) in [
        (Descriptor::fill(a.bus(), 3, PAGE as u32), spec::STATUS_OK),
        (Descriptor::copy(a.bus(), b.bus(), 1000), spec::STATUS_OK),
        (
            Descriptor::fill(hole, 0, 64).with_interrupt(),
            spec::STATUS_DMA_ERROR,
        ),
    ] {
        check_status(&run_desc(&mut q, &cpl, 0, d)?, status, "workload")?;
    }
    check!(
        dev.wait_interrupt(0, IRQ_TIMEOUT)? > 0,
        "no interrupt for the error completion that asked"
    );
    for (counter, want, name) in [
        (spec::QSTAT_DESCRIPTORS, 3, "QSTAT_DESCRIPTORS"),
        (spec::QSTAT_BYTES, PAGE as u64 + 1000, "QSTAT_BYTES"),
        (spec::QSTAT_ERRORS, 1, "QSTAT_ERRORS"),
        (spec::QSTAT_FAULTS, 1, "QSTAT_FAULTS"),
        (spec::QSTAT_INTERRUPTS, 1, "QSTAT_INTERRUPTS"),
    ] {
        check_eq!(qstat(dev, 0, counter)?, want, "{name} of queue 0");
        check_eq!(
            dev.read32(spec::REG_STAT_SELECT)?,
            Stat::Queue { index: 0, counter }.select(),
            "REG_STAT_SELECT after selecting {name}"
        );
    }
    check_eq!(
        dstat(dev, 0, spec::DSTAT_FAULTS)?,
        1,
        "DSTAT_FAULTS of domain 0"
    );
    check_eq!(
        qstat(dev, 1, spec::QSTAT_DESCRIPTORS)?,
        0,
        "QSTAT_DESCRIPTORS of idle queue 1"
    );
    for (sel, what) in [
        (7 << 24, "kind 7"),
        (spec::STAT_KIND_QUEUE << 24 | 99 << 16, "queue counter 99"),
        (spec::STAT_KIND_DOMAIN << 24 | 99 << 16, "domain counter 99"),
        (
            spec::STAT_KIND_QUEUE << 24 | spec::QSTAT_DESCRIPTORS << 16 | 999,
            "queue 999",
        ),
        (
            spec::STAT_KIND_DOMAIN << 24 | spec::DSTAT_FAULTS << 16 | 999,
            "domain 999",
        ),
    ] {
        check_eq!(stat_raw(dev, sel)?, 0, "statistic of {what}");
        check_eq!(
            dev.read32(spec::REG_STAT_SELECT)?,
            sel,
            "REG_STAT_SELECT reads back the selection of {what}"
        );
    }
    // The value is latched at selection.
    let sel = Stat::Queue {
        index: 0,
        counter: spec::QSTAT_DESCRIPTORS,
    }
    .select();
    check_eq!(stat_raw(dev, sel)?, 3, "QSTAT_DESCRIPTORS latched");
    check_status(
        &run_desc(&mut q, &cpl, 0, Descriptor::nop())?,
        spec::STATUS_OK,
        "NOP",
    )?;
    check_eq!(
        (
            dev.read32(spec::REG_STAT_VALUE_LO)?,
            dev.read32(spec::REG_STAT_VALUE_HI)?
        ),
        (3, 0),
        "REG_STAT_VALUE_LO/HI before selecting again"
    );
    check_eq!(stat_raw(dev, sel)?, 4, "QSTAT_DESCRIPTORS selected again");
    a.check_guards("workload buffer")?;
    b.check_guards("workload buffer")?;

    // A translated domain's counters: translations are hits plus misses; page walks are
    // the misses (plus a re-walk per hit in strict mode); a fault is counted.
    let mut t1 = Translated::with(dev, 1, QueueConfig::new(1, 8, 1), 1, None)?;
    let (io, strict) = (t1.io, t1.caps.strict_iotlb);
    t1.dom
        .map(io.data, a.bus(), PAGE as u64, Perm::R, PageSize::Size4K)?;
    for i in 0..3 {
        let crc = Descriptor::crc32c(io.data, PAGE as u32);
        t1.q.run_ok(crc, &format!("CRC32C {i} in domain 1"))?;
    }
    let hole = io.data + PAGE as u64;
    t1.q.run_fault(
        Descriptor::crc32c(hole, 4),
        (spec::FAULT_NOT_PRESENT, hole, false),
        "CRC32C of an unmapped page in domain 1",
    )?;
    let s = DomainStats::read(dev, 1)?;
    progress!("         domain 1: {s}");
    // 4 fetches, 4 records, 3 reads of the mapped page, 1 of the unmapped one.
    check!(
        s.translations >= 12,
        "DSTAT_TRANSLATIONS of domain 1 is {}, expected at least 12",
        s.translations
    );
    check!(
        s.hits > 0,
        "no IOTLB hit in domain 1 after reading one page three times"
    );
    s.check_iotlb(strict)?;
    check_eq!(
        (s.faults, s.stale_uses),
        (1, 0),
        "(DSTAT_FAULTS, DSTAT_STALE_USES) of domain 1"
    );
    t1.q.disable()?;
    Ok(())
}

/// DEV_CTRL reset while a long transfer runs (a 1 GiB BATCH of copies on queue 0, two
/// NOPs behind it) stops it without writing its completion (nor raising the interrupt it
/// asked for) and runs nothing after it; the destination does not change afterwards; every register is back to its reset value;
/// the IOTLB is empty (a table entry changed without invalidation is walked afresh); the
/// device works.
fn reset_during_a_long_transfer_writes_no_completion(ctx: &mut Ctx) -> TestResult {
    let dev = ctx.dev()?;
    dev.rearm_interrupts()?;
    let caps = Capabilities::read(dev)?;
    let mut rng = ctx.rng();
    let job = LongJob::new(dev, &caps, &mut rng)?;
    for attempt in 1..=3 {
        if reset_during(dev, &caps, &job, &mut rng)? {
            return Ok(());
        }
        progress!("         attempt {attempt}: the BATCH finished before the reset");
    }
    Err(Failure(format!(
        "a BATCH of {} bytes finished before the reset in 3 attempts: never caught in flight",
        job.total()
    )))
}

/// One try of [`reset_during_a_long_transfer_writes_no_completion`]: `Ok(false)` when the
/// transfer finished before the reset.
fn reset_during(
    dev: &dyn DmaBackend,
    caps: &Capabilities,
    job: &LongJob,
    rng: &mut Rng,
) -> Result<bool, Failure> {
    let io = Iovas::for_device(caps);
    // A translation of page A, cached by a CRC32C through domain 1.
    let mut dom = Domain::translated(dev, 1, caps.iova_width)?;
    let (mut q1, cpl1) =
        queue_in_domain(dev, &mut dom, QueueConfig::new(1, 8, 1), io.ring, io.cpl, 1)?;
    let pages = dev.alloc_dma(DmaRequest::new(2 * PAGE))?;
    let data = rng.unique(2 * PAGE);
    pages.write(0, &data);
    dom.map(
        io.data,
        pages.bus_addr(),
        PAGE as u64,
        Perm::R,
        PageSize::Size4K,
    )?;
    let crc = |q: &mut DmaQueue<'_>, cpl: &CompletionRecords| -> Result<u64, Failure> {
        let c = run_desc(q, cpl, 0, Descriptor::crc32c(io.data, PAGE as u32))?;
        check_status(&c, spec::STATUS_OK, "CRC32C through domain 1")?;
        Ok(c.result)
    };
    check_eq!(
        crc(&mut q1, &cpl1)?,
        u64::from(crc32c(&data[..PAGE])),
        "CRC32C of page A through domain 1"
    );

    // The long transfer on queue 0, pass-through.
    job.reset_destination();
    let mut q0 = DmaQueue::new(dev, 0, 8, 0)?;
    let cpl0 = CompletionRecords::new(dev, 3)?;
    drain_interrupts(dev)?;
    for i in 0..3 {
        cpl0.clear(i);
    }
    q0.submit(&[
        job.descriptor()
            .with_interrupt()
            .with_tag(0x7e5e7)
            .with_completion(cpl0.bus_addr(0)),
        Descriptor::nop()
            .with_tag(1)
            .with_completion(cpl0.bus_addr(1)),
        Descriptor::nop()
            .with_tag(2)
            .with_completion(cpl0.bus_addr(2)),
    ])?;
    job.wait_started()?;
    dev.write32(spec::REG_DEV_CTRL, spec::DEV_CTRL_RESET)?;
    check_eq!(
        dev.read32(spec::REG_DEV_CTRL)? & spec::DEV_CTRL_RESET,
        0,
        "DEV_CTRL reset bit (the reset completes before the write returns)"
    );
    let c = cpl0.read(0);
    if c.status == spec::STATUS_OK {
        return Ok(false);
    }
    check_eq!(
        c,
        CompletionRecord::default(),
        "the completion record of the transfer stopped by the reset (no byte written)"
    );
    let frozen = job.image_now();
    check_reset_state(dev, caps, "after a reset during a long transfer")?;
    check!(
        dev.read32(spec::REG_DEV_STATUS)? & spec::DEV_STATUS_BUS_MASTER != 0,
        "DEV_STATUS.BUS_MASTER after DEV_CTRL reset"
    );
    check_eq!(
        dev.wait_interrupt(0, NO_IRQ_WINDOW)?,
        0,
        "interrupts for the transfer stopped by the reset"
    );
    for i in 0..3 {
        check_eq!(
            cpl0.read(i),
            CompletionRecord::default(),
            "completion record {i} a while after the reset (the transfer, then two NOPs \
             behind it)"
        );
    }
    job.check_destination(&frozen, "the destination a while after the reset")?;

    // The reset emptied the IOTLB: page A's entry, now pointing at page B, is walked
    // afresh without any invalidation once domain 1 is back with the same table.
    dom.table_mut().write_raw(
        io.data,
        1,
        Pte::leaf(pages.bus_addr() + PAGE as u64, spec::PTE_R, false).raw(),
    );
    write_domain(
        dev,
        1,
        DomainRegs {
            root: dom.table().root(),
            mode: spec::DOMAIN_MODE_TRANSLATED,
        },
    )?;
    let (mut q1, cpl1) = queue_in_domain(
        dev,
        &mut dom,
        QueueConfig::new(1, 8, 1),
        io.ring + 0x1_0000,
        io.cpl + 0x1_0000,
        1,
    )?;
    check_eq!(
        crc(&mut q1, &cpl1)?,
        u64::from(crc32c(&data[PAGE..])),
        "CRC32C through domain 1 after the reset (page B: no stale IOTLB entry)"
    );

    // Queue 0 works again.
    let mut q0 = DmaQueue::new(dev, 0, 8, 0)?;
    let dst = Guarded::new(dev, PAGE, PAGE)?;
    let c = run_desc(
        &mut q0,
        &cpl0,
        0,
        Descriptor::copy(pages.bus_addr(), dst.bus(), PAGE as u32),
    )?;
    check_status(&c, spec::STATUS_OK, "COPY after the reset")?;
    check_bytes(&dst.read(), &data[..PAGE], "COPY after the reset")?;
    dst.check_guards("COPY after the reset")?;
    Ok(true)
}

/// Checks every register SPEC.md "Reset" puts back (see [`reset_values`]).
fn check_reset_state(dev: &dyn DmaBackend, caps: &Capabilities, what: &str) -> TestResult {
    check_eq!(
        dev.read32(spec::REG_STAT_SELECT)?,
        0,
        "{what}: REG_STAT_SELECT"
    );
    check_eq!(dev.read32(spec::REG_SCRATCH)?, 0, "{what}: REG_SCRATCH");
    for q in 0..caps.queues {
        for (r, want, name) in [
            (spec::Q_BASE_LO, 0, "Q_BASE_LO"),
            (spec::Q_BASE_HI, 0, "Q_BASE_HI"),
            (spec::Q_SIZE, 0, "Q_SIZE"),
            (spec::Q_CTRL, 0, "Q_CTRL"),
            (spec::Q_HEAD, 0, "Q_HEAD"),
            (spec::Q_TAIL, 0, "Q_TAIL"),
            (spec::Q_STATUS, 0, "Q_STATUS"),
            (spec::Q_MSIX_VECTOR, q, "Q_MSIX_VECTOR"),
            (spec::Q_COMPLETED, 0, "Q_COMPLETED"),
            (spec::Q_ERRORS, 0, "Q_ERRORS"),
            (spec::Q_DOMAIN, 0, "Q_DOMAIN"),
            (spec::Q_COAL_COUNT, 0, "Q_COAL_COUNT"),
            (spec::Q_COAL_USEC, 0, "Q_COAL_USEC"),
            (spec::Q_HALT_REASON, spec::HALT_NONE, "Q_HALT_REASON"),
        ] {
            check_eq!(
                dev.read32(spec::queue_reg(q, r))?,
                want,
                "{what}: {name} of queue {q}"
            );
        }
        for counter in spec::QSTAT_DESCRIPTORS..=spec::QSTAT_INTERRUPTS {
            check_eq!(
                qstat(dev, q, counter)?,
                0,
                "{what}: queue {q} counter {counter}"
            );
        }
    }
    for d in 0..caps.domains {
        let mode = if d == 0 {
            spec::DOMAIN_MODE_PASSTHROUGH
        } else {
            spec::DOMAIN_MODE_DISABLED
        };
        check_eq!(
            read_domain(dev, d)?,
            DomainRegs { root: 0, mode },
            "{what}: domain {d}"
        );
        for counter in spec::DSTAT_TRANSLATIONS..=spec::DSTAT_STALE_USES {
            check_eq!(
                dstat(dev, d, counter)?,
                0,
                "{what}: domain {d} counter {counter}"
            );
        }
    }
    for (r, name) in [
        (spec::REG_FLOG_BASE_LO, "REG_FLOG_BASE_LO"),
        (spec::REG_FLOG_BASE_HI, "REG_FLOG_BASE_HI"),
        (spec::REG_FLOG_SIZE, "REG_FLOG_SIZE"),
        (spec::REG_FLOG_CTRL, "REG_FLOG_CTRL"),
        (spec::REG_FLOG_HEAD, "REG_FLOG_HEAD"),
        (spec::REG_FLOG_TAIL, "REG_FLOG_TAIL"),
        (spec::REG_FLOG_STATUS, "REG_FLOG_STATUS"),
        (spec::REG_FLOG_COUNT, "REG_FLOG_COUNT"),
        (spec::REG_FLOG_DROPPED, "REG_FLOG_DROPPED"),
        (spec::REG_INV_STATUS, "REG_INV_STATUS"),
        (spec::REG_INV_CMD, "REG_INV_CMD"),
    ] {
        check_eq!(dev.read32(r)?, 0, "{what}: {name}");
    }
    check_eq!(
        dev.read32(spec::REG_FLOG_MSIX_VECTOR)?,
        caps.vectors - 1,
        "{what}: REG_FLOG_MSIX_VECTOR (the last vector)"
    );
    if caps.queues < spec::MAX_QUEUES {
        for (r, name) in [
            (spec::Q_MSIX_VECTOR, "Q_MSIX_VECTOR"),
            (spec::Q_SIZE, "Q_SIZE"),
        ] {
            check_eq!(
                dev.read32(spec::queue_reg(caps.queues, r))?,
                0,
                "{what}: {name} of queue {}, past the last",
                caps.queues
            );
        }
    }
    check_eq!(
        dev.read32(spec::domain_reg(caps.domains, spec::D_CTRL))?,
        0,
        "{what}: D_CTRL of domain {}, past the last",
        caps.domains
    );
    Ok(())
}

/// Latches selection `sel` in the statistics window and reads the 64-bit value.
fn stat_raw(dev: &dyn DmaBackend, sel: u32) -> Result<u64, Failure> {
    dev.write32(spec::REG_STAT_SELECT, sel)?;
    let lo = dev.read32(spec::REG_STAT_VALUE_LO)?;
    let hi = dev.read32(spec::REG_STAT_VALUE_HI)?;
    Ok(u64::from(hi) << 32 | u64::from(lo))
}
