//! Conformance: the WDF DMA calls: adapters, DMA domains, domain common buffers.

#![allow(non_snake_case)]

use domdma_driver_model::wdf::*;

use super::prelude::*;
use crate::wdf::{alloc, free, Driver};

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[Scenario {
    area: Area::WdfDma,
    name: "domain_common_buffer_copy_large_pages",
    needs: &[Need::HugePages(4)],
    run: domain_common_buffer_copy_large_pages,
}];

/// The node a scenario prefers: the device's, else the last one.
fn preferred_node(dev: &dyn DmaBackend) -> u32 {
    dev.info()
        .numa_node
        .unwrap_or(dev.numa_nodes().saturating_sub(1))
}

/// Load a driver, create a device, get a version-3 adapter and its DMA domain, allocate two
/// 3 MiB `LARGE_PAGE` common buffers (2 MiB aligned in logical and bus address, mapped with
/// 2 MiB leaves) on the device's node and two 4 KiB ones for a queue's ring and completion
/// records, COPY data unique per page from the source to the destination through a queue
/// bound to the domain, read it back through the virtual address, free everything and
/// unload with no pool leak.
fn domain_common_buffer_copy_large_pages(ctx: &mut Ctx) -> TestResult {
    let backend = ctx.shared()?;
    let node = preferred_node(&*backend);
    let drv = Driver::load(backend.clone())?;
    // The driver unloads (and is checked for leaks) whatever the scenario's result.
    let result = copy_in_domain(ctx, &drv, &*backend, node);
    let unloaded = drv.unload();
    result.and(unloaded)
}

fn copy_in_domain(ctx: &Ctx, drv: &Driver, backend: &dyn DmaBackend, node: u32) -> TestResult {
    let a = drv.adapter(64)?;
    let domain = (a.DmaOperations.GetDmaDomain)(&a);
    check!(!domain.is_null(), "GetDmaDomain: NULL domain handle");
    let len: u32 = 3 << 20;
    let src = alloc(&a, domain, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, node)?;
    let dst = alloc(&a, domain, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, node)?;
    let ring = alloc(&a, domain, 4096, 0, MM_ANY_NODE_OK)?;
    let cpl = alloc(&a, domain, 4096, 0, MM_ANY_NODE_OK)?;
    let Some(dom) = a.core().current_domain() else {
        return Err(Failure(
            "GetDmaDomain: the adapter is not in its domain".into(),
        ));
    };
    for cb in [src, dst] {
        check!(
            cb.logical % (2 << 20) == 0,
            "LARGE_PAGE: logical {:#x} not 2 MiB aligned",
            cb.logical
        );
        let Some(m) = dom.translate(cb.logical) else {
            return Err(Failure(format!(
                "LARGE_PAGE: logical {:#x} not mapped",
                cb.logical
            )));
        };
        check!(
            m.page == PageSize::Size2M && m.bus % (2 << 20) == 0,
            "LARGE_PAGE: leaf {:?} at bus {:#x}",
            m.page,
            m.bus
        );
    }
    let src_node = dom.with_buffer(src.logical, |b| b.node()).flatten();
    if backend.numa_nodes() > 1 {
        check_eq!(src_node, Some(node), "PreferredNode {node} honoured");
    }
    let data = ctx.rng().unique(len as usize);
    src.write(0, &data);
    {
        let alias = |logical| {
            dom.with_buffer(logical, |b| {
                // SAFETY: the aliases are dropped (with the queue and the records) at the
                // end of this block, before the common buffers are freed.
                unsafe { b.buffer().alias() }
            })
        };
        let (Some(ring_buf), Some(cpl_buf)) = (alias(ring.logical), alias(cpl.logical)) else {
            return Err(Failure("ring or completion buffer missing".into()));
        };
        let records = CompletionRecords::with_buffer(cpl_buf, 4, cpl.logical)?;
        let mut q = DmaQueue::with_ring(
            backend,
            QueueConfig::new(0, 16, 0).in_domain(dom.index()),
            ring_buf,
            ring.logical,
        )?;
        let c = run_desc(
            &mut q,
            &records,
            0,
            Descriptor::copy(src.logical, dst.logical, len),
        )?;
        q.wait_idle(COMPLETION_TIMEOUT)?;
        q.disable()?;
        check_status(&c, spec::STATUS_OK, "COPY between LARGE_PAGE buffers")?;
        check_eq!(c.bytes, len, "bytes copied");
    }
    check_bytes(&dst.read(0, len as usize), &data, "destination")?;
    for cb in [src, dst, ring, cpl] {
        free(&a, cb);
    }
    check_eq!(dom.buffer_count(), 0, "buffers left after FreeCommonBuffer");
    drop(dom);
    (a.DmaOperations.PutDmaAdapter)(a);
    Ok(())
}
