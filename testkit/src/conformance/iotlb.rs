//! Conformance: iOTLB invalidation (all, domain, range) and stale use.

use super::prelude::*;

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[Scenario {
    area: Area::Iotlb,
    name: "invalidation",
    needs: &[],
    run: invalidation,
}];

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
    let io = Iovas::for_device(&caps);
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
