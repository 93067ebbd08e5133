//! Conformance: the WDF DMA calls: adapters, DMA domains, domain common buffers.
//!
//! Every scenario loads a driver on the scenario's device and checks the DMA v3 calls'
//! documented results (../shared/DESIGN.md "Behaviour rules", docs/wdf-behaviour-sources.md
//! section 8) and what the device does with the result: data unique per page COPYed by a
//! queue bound to the adapter's domain through the buffers, faults where nothing is mapped.
//! Verifier bug checks (IRQL, mismatched frees, buffers outstanding) are not here: they are
//! driver-model/tests/wdf_dma_rules.rs's.

#![allow(non_snake_case)]

use std::sync::Arc;

use domdma_driver_model::dma::{DmaDomain, IOVA_BASE};
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

use super::prelude::*;
use crate::wdf::{
    alloc, current_domain, free, free_cached, try_alloc_req, v3_description, with_driver,
    with_mover, Cb, Driver, Mover, Req, MOVER_POISON,
};

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::WdfDma,
        name: "domain_common_buffer_copy_large_pages",
        needs: &[Need::HugePages(4)],
        run: domain_common_buffer_copy_large_pages,
    },
    Scenario {
        area: Area::WdfDma,
        name: "io_get_dma_adapter_descriptions",
        needs: &[],
        run: io_get_dma_adapter_descriptions,
    },
    Scenario {
        area: Area::WdfDma,
        name: "get_dma_adapter_info_and_width",
        needs: &[],
        run: get_dma_adapter_info_and_width,
    },
    Scenario {
        area: Area::WdfDma,
        name: "domains_join_and_leave",
        needs: &[Need::Domains(3)],
        run: domains_join_and_leave,
    },
    Scenario {
        area: Area::WdfDma,
        name: "domains_run_out",
        needs: &[Need::Domains(2)],
        run: domains_run_out,
    },
    Scenario {
        area: Area::WdfDma,
        name: "large_page_rounding_and_alignment",
        needs: &[Need::HugePages(4)],
        run: large_page_rounding_and_alignment,
    },
    Scenario {
        area: Area::WdfDma,
        name: "large_page_exhaustion_no_fallback",
        needs: &[Need::HugePages(1)],
        run: large_page_exhaustion_no_fallback,
    },
    Scenario {
        area: Area::WdfDma,
        name: "unknown_flags_and_zero_length",
        needs: &[],
        run: unknown_flags_and_zero_length,
    },
    Scenario {
        area: Area::WdfDma,
        name: "maximum_address_bounds_the_logical_address",
        needs: &[],
        run: maximum_address_bounds_the_logical_address,
    },
    Scenario {
        area: Area::WdfDma,
        name: "cache_type",
        needs: &[],
        run: cache_type,
    },
    Scenario {
        area: Area::WdfDma,
        name: "preferred_node",
        needs: &[Need::NumaNodes(2), Need::HugePages(4)],
        run: preferred_node,
    },
    Scenario {
        area: Area::WdfDma,
        name: "freed_common_buffer_faults",
        needs: &[Need::HugePages(1)],
        run: freed_common_buffer_faults,
    },
];

/// The node a scenario prefers: the device's, else the last one.
fn device_node(dev: &dyn DmaBackend) -> u32 {
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
    let node = device_node(&*backend);
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

/// `GetDmaAdapterInfo` with `Version`; the status and the information.
fn adapter_info(a: &DMA_ADAPTER, version: u32) -> (NTSTATUS, DMA_ADAPTER_INFO) {
    let mut info = DMA_ADAPTER_INFO {
        Version: version,
        ..Default::default()
    };
    let s = (a.DmaOperations.GetDmaAdapterInfo)(a, &mut info);
    (s, info)
}

/// Checks that an allocation was refused with `want` and gave nothing back: no virtual
/// address, and the domain's buffer count unchanged.
fn check_refused(
    got: (NTSTATUS, Cb),
    want: NTSTATUS,
    count: (usize, usize),
    what: &str,
) -> TestResult {
    let (s, cb) = got;
    check_eq!(s, want, "AllocateDomainCommonBuffer {what}");
    check!(
        cb.va.is_null(),
        "AllocateDomainCommonBuffer {what}: refused with a virtual address {:?}; expected NULL",
        cb.va
    );
    check_eq!(
        count.1,
        count.0,
        "domain buffers after the refused allocation {what}"
    );
    Ok(())
}

/// Checks that `AllocateDomainCommonBuffer` of `req` in `domain` is refused with `want` and
/// gives nothing back ([`check_refused`]: the buffer count of the adapter's domain, if it
/// is in one, unchanged), nor adds a buffer to the adapter.
fn refused(a: &DMA_ADAPTER, domain: HANDLE, req: Req, want: NTSTATUS, what: &str) -> TestResult {
    let count = || current_domain(a).map_or(0, |d| d.buffer_count());
    let (before, mine) = (count(), a.core().buffer_count());
    let got = try_alloc_req(a, domain, req);
    check_refused(got, want, (before, count()), what)?;
    check_eq!(
        a.core().buffer_count(),
        mine,
        "the adapter's buffers after the refused allocation {what}"
    );
    Ok(())
}

/// Checks that nothing is mapped at logical `past`, just past `what`, and that a FILL there
/// faults NOT_PRESENT.
fn nothing_past(mv: &mut Mover<'_>, dom: &DmaDomain, past: u64, what: &str) -> TestResult {
    check!(
        dom.translate(past).is_none(),
        "logical {past:#x}, past {what}, is mapped"
    );
    let fill = Descriptor::fill(past, 0x0bad_f00d, PAGE as u32);
    let what = format!("FILL at {past:#x}, past {what}");
    mv.queue
        .run_fault(fill, (spec::FAULT_NOT_PRESENT, past, true), &what)?;
    Ok(())
}

/// The bytes `offset..offset + len` of the common buffer at `logical` in the adapter's
/// domain, read through the model's view of it (also past the length asked for, up to
/// the length mapped).
fn mapped_bytes(
    a: &DMA_ADAPTER,
    logical: u64,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, Failure> {
    current_domain(a)?
        .with_buffer(logical, |b| b.buffer().to_vec(offset, len))
        .ok_or_else(|| Failure(format!("no common buffer at logical {logical:#x}")))
}

/// IoGetDmaAdapter refuses (NULL) a NULL PDO, a description that is not a bus master, a
/// version-3 width of 0 or above 64, and an unknown version (4); a version-3 adapter has
/// `Version` 1, enough map registers for its MaximumLength, and moves data unique per page
/// through its domain; a version-2 adapter exists but has no DMA v3 operations: no domain
/// (GetDmaDomain NULL), GetDmaAdapterInfo, JoinDmaDomain and AllocateDomainCommonBuffer
/// STATUS_NOT_SUPPORTED.
fn io_get_dma_adapter_descriptions(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    with_driver(ctx.shared()?, |drv| {
        let mut n = 0;
        check!(
            IoGetDmaAdapter(None, &v3_description(64), &mut n).is_none(),
            "IoGetDmaAdapter with a NULL PDO returned an adapter; expected NULL"
        );
        let bad = [
            (
                "a description that is not a bus master",
                DEVICE_DESCRIPTION {
                    Master: false,
                    ..v3_description(64)
                },
            ),
            ("DmaAddressWidth 0", v3_description(0)),
            ("DmaAddressWidth 65", v3_description(65)),
            (
                "Version 4",
                DEVICE_DESCRIPTION {
                    Version: 4,
                    ..v3_description(64)
                },
            ),
        ];
        for (what, desc) in bad {
            check!(
                IoGetDmaAdapter(Some(&drv.pdo), &desc, &mut n).is_none(),
                "IoGetDmaAdapter with {what} returned an adapter; expected NULL"
            );
        }
        let mut n = 0;
        let a = IoGetDmaAdapter(Some(&drv.pdo), &v3_description(64), &mut n)
            .ok_or_else(|| Failure("IoGetDmaAdapter(version 3, 64 bits) returned NULL".into()))?;
        check_eq!(a.Version, 1, "DMA_ADAPTER.Version of a version-3 adapter");
        let need = (1u32 << 20).min(caps.max_xfer).div_ceil(PAGE as u32);
        check!(
            n >= need,
            "NumberOfMapRegisters {n}; expected at least {need} (a MaximumLength of 1 MiB, \
             capped by MAX_XFER {:#x})",
            caps.max_xfer
        );

        let v2 = DEVICE_DESCRIPTION {
            Version: DEVICE_DESCRIPTION_VERSION2,
            Master: true,
            ScatterGather: true,
            Dma64BitAddresses: true,
            MaximumLength: 1 << 20,
            ..Default::default()
        };
        let b = IoGetDmaAdapter(Some(&drv.pdo), &v2, &mut n)
            .ok_or_else(|| Failure("IoGetDmaAdapter(version 2) returned NULL".into()))?;
        let d = (b.DmaOperations.GetDmaDomain)(&b);
        check!(
            d.is_null(),
            "GetDmaDomain of a version-2 adapter: {d:?}; expected NULL"
        );
        check_eq!(
            adapter_info(&b, DMA_ADAPTER_INFO_VERSION1).0,
            STATUS_NOT_SUPPORTED,
            "GetDmaAdapterInfo of a version-2 adapter"
        );

        let mut mv = Mover::with_adapter(a, dev, (2 * PAGE) as u32)?;
        let data = ctx.rng().unique(2 * PAGE);
        mv.src.write(0, &data);
        mv.copy(2 * PAGE, "in the version-3 adapter's domain")?;
        check_bytes(&mv.dst.read(0, 2 * PAGE), &data, "destination")?;
        check_eq!(
            (b.DmaOperations.JoinDmaDomain)(&b, mv.domain),
            STATUS_NOT_SUPPORTED,
            "JoinDmaDomain of a version-2 adapter"
        );
        let what = "of a version-2 adapter";
        refused(&b, mv.domain, Req::of(4096), STATUS_NOT_SUPPORTED, what)?;
        (b.DmaOperations.PutDmaAdapter)(b);
        mv.close()
    })
}

/// GetDmaAdapterInfo (DMA_ADAPTER_INFO_VERSION1) reports, for adapters of 64, 48, 32 and
/// 24 address bits, the smaller of that width and the device's IOVA width, no DMA counter,
/// no flags, and the device's page sizes, IOVA width, domain count and maximum transfer as
/// its registers give them; other versions (0, 2) are STATUS_NOT_SUPPORTED. Each adapter's
/// common buffers lie below 2^width and the device copies data unique per page through
/// them.
fn get_dma_adapter_info_and_width(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    let mut sizes = 0u64;
    for p in PageSize::ALL {
        if caps.supports_page(p) {
            sizes |= p.bytes();
        }
    }
    with_driver(ctx.shared()?, |drv| {
        for width in [64u32, 48, 32, 24] {
            let a = drv.adapter(width)?;
            let eff = width.min(caps.iova_width);
            for v in [0, 2] {
                check_eq!(
                    adapter_info(&a, v).0,
                    STATUS_NOT_SUPPORTED,
                    "GetDmaAdapterInfo with Version {v}"
                );
            }
            let (s, info) = adapter_info(&a, DMA_ADAPTER_INFO_VERSION1);
            check_eq!(s, STATUS_SUCCESS, "GetDmaAdapterInfo({width}-bit adapter)");
            check_eq!(
                info.V1.DmaAddressWidth,
                eff,
                "{width}-bit adapter on a {}-bit device: DmaAddressWidth",
                caps.iova_width
            );
            check_eq!(
                (info.V1.ReadDmaCounterAvailable, info.V1.Flags),
                (0, 0),
                "{width}-bit adapter: (ReadDmaCounterAvailable, Flags)"
            );
            check!(
                info.V1.ScatterGatherLimit >= 1 && info.V1.MinimumTransferUnit >= 1,
                "{width}-bit adapter: ScatterGatherLimit {} MinimumTransferUnit {}; expected \
                 at least 1",
                info.V1.ScatterGatherLimit,
                info.V1.MinimumTransferUnit
            );
            check_eq!(
                info.DomDma,
                DMA_ADAPTER_INFO_DOMDMA {
                    SupportedPageSizes: sizes,
                    DeviceIovaWidth: caps.iova_width,
                    DomainCount: caps.domains,
                    MaximumTransfer: caps.max_xfer,
                },
                "{width}-bit adapter: the device's capabilities"
            );
            let len = 4 * PAGE;
            let mut mv = Mover::with_adapter(a, dev, len as u32)?;
            for (what, cb) in [("source", mv.src), ("destination", mv.dst)] {
                let last = cb.logical + u64::from(cb.len) - 1;
                check!(
                    cb.logical >= IOVA_BASE && (eff >= 64 || last >> eff == 0),
                    "{width}-bit adapter, no MaximumAddress: {what} buffer at logical \
                     {:#x}..={last:#x}; expected in [{IOVA_BASE:#x}, 2^{eff})",
                    cb.logical
                );
            }
            let data = ctx.rng().unique(len);
            mv.src.write(0, &data);
            mv.copy(len, &format!("in the {width}-bit adapter's domain"))?;
            check_bytes(
                &mv.dst.read(0, len),
                &data,
                format!("{width}-bit adapter: destination"),
            )?;
            if eff == 24 {
                // 16 MiB of IOVA space: a MaximumAddress far above does not lift the width.
                let (a, d) = (Arc::clone(&mv.adapter), mv.domain);
                let big = 8 << 20;
                let (s, first) = try_alloc_req(&a, d, Req::of(big).max(1 << 40));
                check_eq!(
                    s,
                    STATUS_SUCCESS,
                    "24-bit adapter: 8 MiB with MaximumAddress 2^40"
                );
                check!(
                    first.logical + u64::from(big) <= 1 << 24,
                    "24-bit adapter: 8 MiB buffer at logical {:#x} is not below 16 MiB",
                    first.logical
                );
                refused(
                    &a,
                    d,
                    Req::of(big).max(1 << 40),
                    STATUS_INSUFFICIENT_RESOURCES,
                    "of a second 8 MiB by a 24-bit adapter with MaximumAddress 2^40",
                )?;
                let end = u64::from(big) - PAGE as u64;
                let src = mv.src.logical;
                mv.queue.copy(
                    src,
                    first.logical + end,
                    PAGE as u32,
                    "to the top of 16 MiB",
                )?;
                check_bytes(
                    &first.read(end as usize, PAGE),
                    &data[..PAGE],
                    "24-bit adapter: last page of the 8 MiB buffer",
                )?;
                free(&a, first);
            }
            mv.close()?;
        }
        Ok(())
    })
}

/// GetDmaDomain gives an adapter its domain (the same handle every time; another adapter
/// gets another domain, on another device domain); JoinDmaDomain of an unknown handle, of
/// NULL and of a domain that is gone is STATUS_INVALID_PARAMETER and leaves the adapter
/// where it was; AllocateDomainCommonBuffer with a domain that is not the adapter's is
/// STATUS_INVALID_PARAMETER. An adapter that joins another's domain shares its IOVA space:
/// their buffers do not overlap, one page table maps both, and the device copies data
/// unique per page from one adapter's buffer to the other's and back. LeaveDmaDomain takes
/// it out (members counted); leaving again is STATUS_INVALID_DEVICE_STATE.
fn domains_join_and_leave(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        let a = drv.adapter(64)?;
        let b = drv.adapter(64)?;
        let da = (a.DmaOperations.GetDmaDomain)(&a);
        check!(!da.is_null(), "GetDmaDomain(a): NULL");
        check_eq!(
            (a.DmaOperations.GetDmaDomain)(&a),
            da,
            "second GetDmaDomain(a)"
        );
        let db = (b.DmaOperations.GetDmaDomain)(&b);
        check!(
            !db.is_null() && db != da,
            "GetDmaDomain(b): {db:?}; expected a domain other than a's {da:?}"
        );
        let (ia, ib) = (current_domain(&a)?.index(), current_domain(&b)?.index());
        check!(
            ia != ib,
            "adapters a and b in different domains share device domain {ia}"
        );

        for (what, h) in [
            ("an unknown handle", HANDLE(u64::MAX - 1)),
            ("NULL", HANDLE::NULL),
        ] {
            check_eq!(
                (a.DmaOperations.JoinDmaDomain)(&a, h),
                STATUS_INVALID_PARAMETER,
                "JoinDmaDomain of {what}"
            );
        }
        check_eq!(
            (a.DmaOperations.GetDmaDomain)(&a),
            da,
            "a's domain after refused joins"
        );
        let what = "by a with b's domain";
        refused(&a, db, Req::of(4096), STATUS_INVALID_PARAMETER, what)?;

        check_eq!(
            (b.DmaOperations.JoinDmaDomain)(&b, da),
            STATUS_SUCCESS,
            "JoinDmaDomain(b, a's domain)"
        );
        check_eq!(
            (b.DmaOperations.GetDmaDomain)(&b),
            da,
            "GetDmaDomain(b) after the join"
        );
        let dom = current_domain(&a)?;
        check!(
            Arc::ptr_eq(&dom, &current_domain(&b)?),
            "a and b joined but in two domain objects"
        );
        check_eq!(dom.members(), 2, "members of the shared domain");
        check_eq!(
            (b.DmaOperations.JoinDmaDomain)(&b, db),
            STATUS_INVALID_PARAMETER,
            "JoinDmaDomain(b, its former domain, gone with its last member)"
        );
        check_eq!(
            (b.DmaOperations.GetDmaDomain)(&b),
            da,
            "b's domain after the refused join"
        );

        const LEN: usize = 3 * PAGE;
        let mut mv = Mover::with_adapter(a, dev, LEN as u32)?;
        let y = alloc(&b, da, LEN as u32, 0, MM_ANY_NODE_OK)?;
        for (what, cb) in [("a's source", mv.src), ("a's destination", mv.dst)] {
            let apart =
                y.logical + LEN as u64 <= cb.logical || cb.logical + u64::from(cb.len) <= y.logical;
            check!(
                apart,
                "b's buffer at {:#x} overlaps {what} at {:#x} in the shared IOVA space",
                y.logical,
                cb.logical
            );
        }
        check!(
            dom.translate(y.logical).is_some(),
            "the domain's page table does not map b's buffer at {:#x}",
            y.logical
        );
        let data = ctx.rng().unique(LEN);
        mv.src.write(0, &data);
        let (src, dst) = (mv.src.logical, mv.dst.logical);
        mv.queue
            .copy(src, y.logical, LEN as u32, "a's source -> b's buffer")?;
        check_bytes(&y.read(0, LEN), &data, "b's buffer")?;
        let data2 = ctx.rng().unique(LEN);
        y.write(0, &data2);
        mv.queue
            .copy(y.logical, dst, LEN as u32, "b's buffer -> a's destination")?;
        check_bytes(&mv.dst.read(0, LEN), &data2, "a's destination")?;

        free(&b, y);
        check_eq!(
            (b.DmaOperations.LeaveDmaDomain)(&b),
            STATUS_SUCCESS,
            "LeaveDmaDomain(b)"
        );
        check_eq!(dom.members(), 1, "members after b left");
        check_eq!(
            (b.DmaOperations.LeaveDmaDomain)(&b),
            STATUS_INVALID_DEVICE_STATE,
            "LeaveDmaDomain(b) when in no domain"
        );
        let what = "by b after it left";
        refused(&b, da, Req::of(4096), STATUS_INVALID_PARAMETER, what)?;
        drop(dom);
        (b.DmaOperations.PutDmaAdapter)(b);
        mv.close()
    })
}

/// DOMAIN_COMMON_BUFFER_LARGE_PAGE: a 2 MiB + 4 KiB buffer allocated after 4 KiB ones (the
/// IOVA space misaligned) is 2 MiB aligned in logical and physical address, mapped with 2
/// MiB leaves and its length rounded to 4 MiB: the device reaches the rounded tail and
/// faults (NOT_PRESENT) just past it. Two such buffers carry data unique per page between
/// them. Without the flag a 10000-byte buffer is mapped with 4 KiB leaves, rounded to 12
/// KiB, and faults past that.
fn large_page_rounding_and_alignment(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    const M2: u64 = 2 << 20;
    with_mover(ctx.shared()?, dev, PAGE as u32, |mv, a, d, dom| {
        let len = (2 << 20) + PAGE as u32;
        let l1 = alloc(a, d, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, MM_ANY_NODE_OK)?;
        let l2 = alloc(a, d, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, MM_ANY_NODE_OK)?;
        for (what, cb) in [("first", l1), ("second", l2)] {
            check!(
                cb.logical % M2 == 0,
                "{what} LARGE_PAGE buffer: logical {:#x} not 2 MiB aligned",
                cb.logical
            );
            let Some((mapped, physical, large, va)) = dom.with_buffer(cb.logical, |b| {
                (
                    b.mapped,
                    b.physical(),
                    b.large_page,
                    b.virtual_address().as_ptr().cast::<std::ffi::c_void>(),
                )
            }) else {
                return Err(Failure(format!("{what}: no buffer at {:#x}", cb.logical)));
            };
            check_eq!(
                mapped,
                2 * M2,
                "{what} LARGE_PAGE buffer of {len:#x} bytes: length mapped"
            );
            check!(large, "{what} buffer not recorded as LARGE_PAGE");
            check!(
                !cb.va.is_null() && cb.va as usize % PAGE == 0 && cb.va == va,
                "{what}: VirtualAddress {:?}; expected the buffer's memory ({va:?}), page \
                 aligned",
                cb.va
            );
            check!(
                physical % M2 == 0,
                "{what}: physical {physical:#x} not 2 MiB aligned"
            );
            for off in [0, M2] {
                let m = dom.translate(cb.logical + off);
                check_eq!(
                    m.map(|m| (m.page, m.bus)),
                    Some((PageSize::Size2M, physical + off)),
                    "{what}: leaf at logical {:#x}",
                    cb.logical + off
                );
            }
        }
        // The rounded tail is the device's; past it (the second buffer is the last one
        // allocated) is nothing.
        let tail = l2.logical + 2 * M2 - PAGE as u64;
        let data = ctx.rng().unique(PAGE);
        mv.src.write(0, &data);
        let src = mv.src.logical;
        mv.queue
            .copy(src, tail, PAGE as u32, "into the rounded tail")?;
        check_bytes(
            &mapped_bytes(a, l2.logical, (2 * M2) as usize - PAGE, PAGE)?,
            &data,
            "the rounded tail's last page",
        )?;
        let what = "the LARGE_PAGE buffer's rounded 4 MiB";
        nothing_past(mv, dom, l2.logical + 2 * M2, what)?;
        let big = ctx.rng().unique(len as usize);
        l1.write(0, &big);
        mv.queue
            .copy(l1.logical, l2.logical, len, "LARGE_PAGE -> LARGE_PAGE")?;
        check_bytes(&l2.read(0, len as usize), &big, "second LARGE_PAGE buffer")?;

        let small = alloc(a, d, 10_000, 0, MM_ANY_NODE_OK)?;
        let physical = dom.with_buffer(small.logical, |b| b.physical());
        check_eq!(
            dom.translate(small.logical).map(|m| m.bus),
            physical,
            "bus address the 10000-byte buffer's logical address maps to vs its memory"
        );
        let m = dom.translate(small.logical + 8192);
        check_eq!(
            m.map(|m| m.page),
            Some(PageSize::Size4K),
            "leaf of a 10000-byte buffer's third page"
        );
        let what = "the 10000-byte buffer's rounded 12 KiB";
        nothing_past(mv, dom, small.logical + 12288, what)?;
        mv.queue.copy(
            src,
            small.logical + 8192,
            PAGE as u32,
            "into the small buffer's rounded tail",
        )?;
        check_bytes(
            &mapped_bytes(a, small.logical, 8192, PAGE)?,
            &data,
            "the small buffer's rounded tail",
        )?;
        for cb in [l1, l2, small] {
            free(a, cb);
        }
        Ok(())
    })
}

/// DOMAIN_COMMON_BUFFER_LARGE_PAGE never falls back: 2 MiB pages are allocated until the
/// device's huge pages run out (never more than the profile has), then the next request is
/// STATUS_INSUFFICIENT_RESOURCES with nothing allocated; the same length without the flag
/// still succeeds, with 4 KiB leaves; freeing one large buffer makes a large allocation
/// succeed again (2 MiB leaf), and the device copies data unique per page into it.
fn large_page_exhaustion_no_fallback(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    const M2: u32 = 2 << 20;
    with_mover(ctx.shared()?, dev, PAGE as u32, |mv, a, d, dom| {
        let limit = ctx.env.huge_pages.map_or(4096, |n| n as usize);
        let mut held: Vec<Cb> = Vec::new();
        let mut pages = 0usize;
        let mut last = (STATUS_SUCCESS, None);
        for chunk in [16usize, 1] {
            loop {
                let before = dom.buffer_count();
                let (s, cb) = try_alloc_req(
                    a,
                    d,
                    Req::of(chunk as u32 * M2).flags(DOMAIN_COMMON_BUFFER_LARGE_PAGE),
                );
                if s == STATUS_SUCCESS {
                    held.push(cb);
                    pages += chunk;
                    check!(
                        pages <= limit,
                        "{pages} 2 MiB pages allocated without INSUFFICIENT_RESOURCES; the \
                         profile has {limit}"
                    );
                    continue;
                }
                last = (s, Some(cb));
                check_refused(
                    (s, cb),
                    STATUS_INSUFFICIENT_RESOURCES,
                    (before, dom.buffer_count()),
                    &format!("LARGE_PAGE of {chunk} page(s) after {pages} pages"),
                )?;
                break;
            }
        }
        check!(
            pages >= 1 && last.1.is_some(),
            "no 2 MiB page could be allocated before exhaustion"
        );
        let plain = alloc(a, d, M2, 0, MM_ANY_NODE_OK)?;
        let leaf = dom.translate(plain.logical).map(|m| m.page);
        check_eq!(
            leaf,
            Some(PageSize::Size4K),
            "leaf of a 2 MiB buffer without the flag, huge pages exhausted"
        );
        let Some(freed) = held.pop() else {
            return Err(Failure("no large buffer held".into()));
        };
        free(a, freed);
        let again = alloc(a, d, M2, DOMAIN_COMMON_BUFFER_LARGE_PAGE, MM_ANY_NODE_OK)?;
        check_eq!(
            dom.translate(again.logical).map(|m| m.page),
            Some(PageSize::Size2M),
            "leaf of the LARGE_PAGE buffer allocated after one was freed"
        );
        let data = ctx.rng().unique(M2 as usize);
        plain.write(0, &data);
        mv.queue.copy(
            plain.logical,
            again.logical,
            M2,
            "4 KiB-leaf buffer -> 2 MiB-leaf buffer",
        )?;
        check_bytes(&again.read(0, M2 as usize), &data, "the LARGE_PAGE buffer")?;
        for cb in held.into_iter().chain([plain, again]) {
            free(a, cb);
        }
        Ok(())
    })
}

/// AllocateDomainCommonBuffer refuses unknown flags (alone or with LARGE_PAGE) and a
/// Length of 0 with STATUS_INVALID_PARAMETER, allocating nothing; the domain stays usable:
/// a buffer allocated next carries data unique per page through the device.
fn unknown_flags_and_zero_length(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_mover(ctx.shared()?, dev, (2 * PAGE) as u32, |mv, a, d, _| {
        for flags in [
            2,
            4,
            0x100,
            0x8000_0000,
            DOMAIN_COMMON_BUFFER_LARGE_PAGE | 2,
        ] {
            refused(
                a,
                d,
                Req::of(4096).flags(flags),
                STATUS_INVALID_PARAMETER,
                &format!("with Flags {flags:#x}"),
            )?;
        }
        for flags in [0, DOMAIN_COMMON_BUFFER_LARGE_PAGE] {
            refused(
                a,
                d,
                Req::of(0).flags(flags),
                STATUS_INVALID_PARAMETER,
                &format!("of Length 0 (Flags {flags:#x})"),
            )?;
        }
        let x = alloc(a, d, (2 * PAGE) as u32, 0, MM_ANY_NODE_OK)?;
        let data = ctx.rng().unique(2 * PAGE);
        mv.src.write(0, &data);
        let src = mv.src.logical;
        mv.queue.copy(
            src,
            x.logical,
            (2 * PAGE) as u32,
            "into a buffer allocated after the refusals",
        )?;
        check_bytes(&x.read(0, 2 * PAGE), &data, "the buffer")?;
        free(a, x);
        Ok(())
    })
}

/// MaximumAddress is the inclusive last logical byte: with room for exactly four 4 KiB
/// buffers at or below it, four are allocated there and the fifth is
/// STATUS_INSUFFICIENT_RESOURCES (without the limit it succeeds, above); a limit below
/// every free address is refused the same way; a 32-bit limit (0xFFFFFFFF) keeps a buffer
/// below 4 GiB. The device copies data unique per page into every limited buffer.
fn maximum_address_bounds_the_logical_address(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_mover(ctx.shared()?, dev, PAGE as u32, |mv, a, d, dom| {
        // Where the next buffer goes: the lowest free logical address.
        let probe = alloc(a, d, PAGE as u32, 0, MM_ANY_NODE_OK)?;
        free(a, probe);
        let short = probe.logical + PAGE as u64 - 2;
        refused(
            a,
            d,
            Req::of(PAGE as u32).max(short),
            STATUS_INSUFFICIENT_RESOURCES,
            &format!(
                "with MaximumAddress {short:#x}, one byte short of the free page at {:#x}",
                probe.logical
            ),
        )?;
        let limit = probe.logical + 4 * PAGE as u64 - 1;
        let mut limited = Vec::new();
        loop {
            let before = dom.buffer_count();
            let (s, cb) = try_alloc_req(a, d, Req::of(PAGE as u32).max(limit));
            if s != STATUS_SUCCESS {
                check_refused(
                    (s, cb),
                    STATUS_INSUFFICIENT_RESOURCES,
                    (before, dom.buffer_count()),
                    &format!(
                        "with MaximumAddress {limit:#x} after {} buffers",
                        limited.len()
                    ),
                )?;
                break;
            }
            check!(
                cb.logical + PAGE as u64 - 1 <= limit,
                "buffer at logical {:#x}..{:#x} is above MaximumAddress {limit:#x}",
                cb.logical,
                cb.logical + PAGE as u64
            );
            limited.push(cb);
            check!(
                limited.len() <= 4,
                "more than four 4 KiB buffers at or below {limit:#x}"
            );
        }
        check_eq!(
            limited.len(),
            4,
            "4 KiB buffers allocated at or below MaximumAddress {limit:#x}"
        );
        let mut at: Vec<u64> = limited.iter().map(|cb| cb.logical).collect();
        at.sort_unstable();
        check_eq!(
            at.last().map(|&l| l + PAGE as u64 - 1),
            Some(limit),
            "last byte of the highest limited buffer vs MaximumAddress (inclusive)"
        );
        let above = alloc(a, d, PAGE as u32, 0, MM_ANY_NODE_OK)?;
        check!(
            above.logical > limit,
            "without the limit: logical {:#x}, expected above {limit:#x}",
            above.logical
        );
        refused(
            a,
            d,
            Req::of(PAGE as u32).max(IOVA_BASE - 1),
            STATUS_INSUFFICIENT_RESOURCES,
            &format!(
                "with MaximumAddress {:#x}, below the domain's first address",
                IOVA_BASE - 1
            ),
        )?;
        let len32 = 16 * PAGE;
        let low = {
            let (s, cb) = try_alloc_req(a, d, Req::of(len32 as u32).max(0xffff_ffff));
            check_eq!(
                s,
                STATUS_SUCCESS,
                "AllocateDomainCommonBuffer with MaximumAddress 0xffffffff"
            );
            cb
        };
        check!(
            low.logical + len32 as u64 - 1 <= 0xffff_ffff,
            "buffer at logical {:#x} + {len32:#x} is above 4 GiB",
            low.logical
        );
        let src = mv.src.logical;
        for (i, cb) in limited.iter().enumerate() {
            let data = ctx.rng().unique(PAGE);
            mv.src.write(0, &data);
            mv.queue.copy(
                src,
                cb.logical,
                PAGE as u32,
                &format!("into limited buffer {i}"),
            )?;
            check_bytes(&cb.read(0, PAGE), &data, format!("limited buffer {i}"))?;
        }
        let data = ctx.rng().unique(len32);
        low.write(0, &data);
        let dst = mv.dst.logical;
        for p in 0..16 {
            let off = (p * PAGE) as u64;
            mv.queue.copy(
                low.logical + off,
                dst,
                PAGE as u32,
                &format!("page {p} of the buffer below 4 GiB"),
            )?;
            check_bytes(
                &mv.dst.read(0, PAGE),
                &data[p * PAGE..(p + 1) * PAGE],
                format!("page {p} below 4 GiB"),
            )?;
        }
        for cb in limited.into_iter().chain([above, low]) {
            free(a, cb);
        }
        Ok(())
    })
}

/// CacheType: NULL (the platform default), MmCached and MmNonCached are accepted, and the
/// device copies data unique per page into each such buffer; MmWriteCombined,
/// MmHardwareCoherentCached, MmNonCachedUnordered, MmUSWCCached and out-of-range values
/// are STATUS_INVALID_PARAMETER with nothing allocated. Each buffer is freed with the
/// CacheEnabled it was allocated with.
fn cache_type(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    const LEN: usize = 2 * PAGE;
    with_mover(ctx.shared()?, dev, LEN as u32, |mv, a, d, dom| {
        let bad = [
            ("MmWriteCombined", MmWriteCombined),
            ("MmHardwareCoherentCached", MmHardwareCoherentCached),
            ("MmNonCachedUnordered", MEMORY_CACHING_TYPE(4)),
            ("MmUSWCCached", MEMORY_CACHING_TYPE(5)),
            ("MmMaximumCacheType", MEMORY_CACHING_TYPE(6)),
            ("MmNotMapped (-1)", MEMORY_CACHING_TYPE(-1)),
        ];
        for (what, c) in bad {
            refused(
                a,
                d,
                Req::of(LEN as u32).cache(Some(c)),
                STATUS_INVALID_PARAMETER,
                &format!("with CacheType {what}"),
            )?;
        }
        let src = mv.src.logical;
        for (what, c) in [
            ("NULL", None),
            ("MmCached", Some(MmCached)),
            ("MmNonCached", Some(MmNonCached)),
        ] {
            let (s, cb) = try_alloc_req(a, d, Req::of(LEN as u32).cache(c));
            check_eq!(
                s,
                STATUS_SUCCESS,
                "AllocateDomainCommonBuffer with CacheType {what}"
            );
            let data = ctx.rng().unique(LEN);
            mv.src.write(0, &data);
            mv.queue.copy(
                src,
                cb.logical,
                LEN as u32,
                &format!("into a {what} buffer"),
            )?;
            check_bytes(&cb.read(0, LEN), &data, format!("{what} buffer"))?;
            let before = dom.buffer_count();
            free_cached(a, cb, c);
            check_eq!(
                dom.buffer_count(),
                before - 1,
                "buffers after freeing the {what} buffer"
            );
        }
        Ok(())
    })
}

/// PreferredNode: each node in range gets its buffers there (4 KiB and LARGE_PAGE), and the
/// device copies data unique per page between the nodes' buffers; MM_ANY_NODE_OK is
/// accepted; a node out of range (the node count, beyond it, MM_ANY_NODE_OK with a node
/// bit) is STATUS_INVALID_PARAMETER with nothing allocated.
fn preferred_node(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    let nodes = dev.numa_nodes();
    const M2: u32 = 2 << 20;
    with_mover(ctx.shared()?, dev, PAGE as u32, |mv, a, d, dom| {
        let mut per_node = Vec::new();
        for node in 0..nodes {
            let small = alloc(a, d, (2 * PAGE) as u32, 0, node)?;
            let large = alloc(a, d, M2, DOMAIN_COMMON_BUFFER_LARGE_PAGE, node)?;
            for (what, cb) in [("4 KiB", small), ("LARGE_PAGE", large)] {
                let on = dom.with_buffer(cb.logical, |b| b.node()).flatten();
                check_eq!(
                    on,
                    Some(node),
                    "node of a {what} buffer with PreferredNode {node}"
                );
            }
            per_node.push((small, large));
        }
        let any = alloc(a, d, PAGE as u32, 0, MM_ANY_NODE_OK)?;
        for node in [nodes, nodes + 1, 0x7fff_ffff, MM_ANY_NODE_OK | 1] {
            refused(
                a,
                d,
                Req::of(PAGE as u32).node(node),
                STATUS_INVALID_PARAMETER,
                &format!("with PreferredNode {node:#x} ({nodes} nodes)"),
            )?;
        }
        let data = ctx.rng().unique(M2 as usize);
        let small_data = ctx.rng().unique(2 * PAGE);
        per_node[0].1.write(0, &data);
        per_node[0].0.write(0, &small_data);
        for n in 1..per_node.len() {
            let (from, to) = (per_node[n - 1], per_node[n]);
            mv.queue.copy(
                from.1.logical,
                to.1.logical,
                M2,
                &format!("LARGE_PAGE node {} -> node {n}", n - 1),
            )?;
            check_bytes(
                &to.1.read(0, M2 as usize),
                &data,
                format!("LARGE_PAGE buffer on node {n}"),
            )?;
            mv.queue.copy(
                from.0.logical,
                to.0.logical,
                (2 * PAGE) as u32,
                &format!("4 KiB node {} -> node {n}", n - 1),
            )?;
            check_bytes(
                &to.0.read(0, 2 * PAGE),
                &small_data,
                format!("4 KiB buffer on node {n}"),
            )?;
        }
        free(a, any);
        for (small, large) in per_node {
            free(a, small);
            free(a, large);
        }
        Ok(())
    })
}

/// FreeCommonBuffer with the allocation's exact parameters frees it: the domain has one
/// buffer less, nothing is mapped at its logical address, and the device faults there: a
/// COPY from it and a FILL into it complete with STATUS_DMA_ERROR / FAULT_NOT_PRESENT at
/// that address (read, write), moving nothing; the same for a freed LARGE_PAGE buffer
/// inside its 2 MiB page. A buffer allocated next (possibly at the same address) gives the
/// device its new data, not the freed buffer's.
fn freed_common_buffer_faults(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    const LEN: usize = 2 * PAGE;
    const M2: u32 = 2 << 20;
    with_mover(ctx.shared()?, dev, LEN as u32, |mv, a, d, dom| {
        let x = alloc(a, d, LEN as u32, 0, MM_ANY_NODE_OK)?;
        let xl = alloc(a, d, M2, DOMAIN_COMMON_BUFFER_LARGE_PAGE, MM_ANY_NODE_OK)?;
        let dst = mv.dst.logical;
        let data = ctx.rng().unique(LEN);
        x.write(0, &data);
        mv.queue.copy(
            x.logical,
            dst,
            LEN as u32,
            "from the buffer before the free",
        )?;
        check_bytes(&mv.dst.read(0, LEN), &data, "destination before the free")?;
        let big = ctx.rng().unique(M2 as usize);
        xl.write(0, &big);
        let mid = 1 << 20;
        mv.queue.copy(
            xl.logical + mid,
            dst,
            LEN as u32,
            "from the LARGE_PAGE buffer before the free",
        )?;
        check_bytes(
            &mv.dst.read(0, LEN),
            &big[mid as usize..mid as usize + LEN],
            "destination (LARGE_PAGE source)",
        )?;

        for (what, cb, at) in [
            ("4 KiB", x, x.logical),
            ("LARGE_PAGE", xl, xl.logical + mid),
        ] {
            let before = dom.buffer_count();
            free(a, cb);
            check_eq!(
                dom.buffer_count(),
                before - 1,
                "domain buffers after freeing the {what} buffer"
            );
            check!(
                dom.with_buffer(cb.logical, |_| ()).is_none(),
                "the freed {what} buffer is still listed at {:#x}",
                cb.logical
            );
            check!(
                dom.translate(at).is_none(),
                "logical {at:#x} of the freed {what} buffer is still mapped"
            );
            mv.dst.write(0, &[MOVER_POISON; LEN]);
            let c = mv.queue.run_fault(
                Descriptor::copy(at, dst, LEN as u32),
                (spec::FAULT_NOT_PRESENT, at, false),
                &format!("COPY from the freed {what} buffer"),
            )?;
            check_eq!(c.bytes, 0, "bytes copied from the freed {what} buffer");
            check_all(
                &mv.dst.read(0, LEN),
                MOVER_POISON,
                format!("destination of a COPY from the freed {what} buffer"),
            )?;
            let c = mv.queue.run_fault(
                Descriptor::fill(at, 0x0bad_f00d_0bad_f00d, LEN as u32),
                (spec::FAULT_NOT_PRESENT, at, true),
                &format!("FILL into the freed {what} buffer"),
            )?;
            check_eq!(c.bytes, 0, "bytes filled into the freed {what} buffer");
        }

        let y = alloc(a, d, LEN as u32, 0, MM_ANY_NODE_OK)?;
        let fresh = ctx.rng().unique(LEN);
        y.write(0, &fresh);
        mv.queue.copy(
            y.logical,
            dst,
            LEN as u32,
            "from the buffer allocated after the frees",
        )?;
        check_bytes(
            &mv.dst.read(0, LEN),
            &fresh,
            format!(
                "destination (new buffer at {:#x}, freed one was at {:#x})",
                y.logical, x.logical
            ),
        )?;
        free(a, y);
        Ok(())
    })
}

/// Each adapter's DMA domain takes one translated device domain (domain 0 stays
/// pass-through): as many adapters as the device has domains less one get a domain, each
/// on its own device domain index; the next adapter's GetDmaDomain is NULL; when an adapter
/// is put, its device domain is free again and a new adapter gets a domain there, through
/// which the device copies data unique per page.
fn domains_run_out(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    let caps = Capabilities::read(dev)?;
    with_driver(ctx.shared()?, |drv| {
        let mut held = Vec::new();
        let mut indices = std::collections::BTreeSet::new();
        for i in 1..caps.domains {
            let a = drv.adapter(64)?;
            let d = (a.DmaOperations.GetDmaDomain)(&a);
            check!(
                !d.is_null(),
                "GetDmaDomain of adapter {i}: NULL with {} of {} device domains in use",
                i - 1,
                caps.domains
            );
            let index = current_domain(&a)?.index();
            check!(
                index != 0 && indices.insert(index),
                "adapter {i}'s domain is on device domain {index}, already used or \
                 pass-through (used: {indices:?})"
            );
            held.push(a);
        }
        let extra = drv.adapter(64)?;
        let d = (extra.DmaOperations.GetDmaDomain)(&extra);
        check!(
            d.is_null(),
            "GetDmaDomain with all {} translated device domains in use: {d:?}; expected NULL",
            caps.domains - 1
        );
        let Some(released) = held.pop() else {
            return Err(Failure("the device has no translated domain".into()));
        };
        let index = current_domain(&released)?.index();
        (released.DmaOperations.PutDmaAdapter)(released);
        let mut mv = Mover::with_adapter(extra, dev, (2 * PAGE) as u32)?;
        check_eq!(
            current_domain(&mv.adapter)?.index(),
            index,
            "device domain of the adapter created after one was put"
        );
        let data = ctx.rng().unique(2 * PAGE);
        mv.src.write(0, &data);
        mv.copy(2 * PAGE, "in the reused device domain")?;
        check_bytes(&mv.dst.read(0, 2 * PAGE), &data, "destination")?;
        mv.close()?;
        for a in held {
            (a.DmaOperations.PutDmaAdapter)(a);
        }
        Ok(())
    })
}
