//! Driver scenarios that every back end runs, written against the WDF facade as a driver
//! would write them: the in-process and vfio-user integration tests and the guest suite
//! call the same functions, so "the same DMA test" is literally the same code.
//!
//! A scenario loads its own driver on the calling thread, checks every step, and returns a
//! report or the first thing that went wrong.

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::dma::SharedBackend;
use crate::dma_queue::{CompletionRecords, Descriptor, DmaQueue, QueueConfig};
use crate::iopt::PageSize;
use crate::status::*;
use crate::wdf::*;

/// How long a scenario waits for the device.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong in a scenario.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {problem}")]
pub struct ScenarioError {
    /// The step.
    pub step: &'static str,
    /// What was seen.
    pub problem: String,
}

fn fail<T>(step: &'static str, problem: impl fmt::Display) -> Result<T, ScenarioError> {
    Err(ScenarioError {
        step,
        problem: problem.to_string(),
    })
}

fn check(
    step: &'static str,
    ok: bool,
    problem: impl FnOnce() -> String,
) -> Result<(), ScenarioError> {
    if ok {
        Ok(())
    } else {
        fail(step, problem())
    }
}

/// What [`dma_copy_through_domain_common_buffers`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaCopyReport {
    /// The device domain used.
    pub device_domain: u32,
    /// Logical (IOVA) and bus address of the source.
    pub src: (u64, u64),
    /// Logical (IOVA) and bus address of the destination.
    pub dst: (u64, u64),
    /// NUMA node of the source memory, if the back end knows it.
    pub src_node: Option<u32>,
    /// Bytes copied.
    pub bytes: u32,
}

/// A common buffer as the driver holds it.
#[derive(Debug, Clone, Copy)]
struct Cb {
    logical: u64,
    va: *mut c_void,
    len: u32,
}

fn allocate(
    a: &DMA_ADAPTER,
    domain: HANDLE,
    len: u32,
    flags: u32,
    node: NODE_REQUIREMENT,
) -> Result<Cb, ScenarioError> {
    let mut logical = PHYSICAL_ADDRESS::default();
    let mut va: *mut c_void = std::ptr::null_mut();
    let s = (a.DmaOperations.AllocateDomainCommonBuffer)(
        a,
        domain,
        None,
        len,
        flags,
        None,
        node,
        &mut logical,
        &mut va,
    );
    if !NT_SUCCESS(s) {
        return fail(
            "AllocateDomainCommonBuffer",
            format!("{len:#x} bytes, flags {flags}: {s}"),
        );
    }
    Ok(Cb {
        logical: logical.QuadPart as u64,
        va,
        len,
    })
}

/// The DMA scenario: load a driver, create a device on `backend`, get a version-3 adapter
/// and its DMA domain, allocate two 3 MiB `LARGE_PAGE` common buffers (checked: 2 MiB
/// aligned in logical and bus address, 2 MiB leaves) on `node` and two 4 KiB ones for a
/// queue's ring and completion records, COPY the source to the destination through a queue
/// bound to the domain, read the destination back through its virtual address, free
/// everything and unload with no pool leak.
pub fn dma_copy_through_domain_common_buffers(
    backend: SharedBackend,
    node: NODE_REQUIREMENT,
) -> Result<DmaCopyReport, ScenarioError> {
    let mut driver = DRIVER_OBJECT::new();
    let s = WdfDriverCreate(
        &mut driver,
        r"\Registry\Machine\System\CurrentControlSet\Services\domdma_scenario",
        WDF_NO_OBJECT_ATTRIBUTES,
        &WDF_DRIVER_CONFIG::default(),
        None,
    );
    check("WdfDriverCreate", NT_SUCCESS(s), || s.to_string())?;
    let result = copy_in_domain(&backend, node);
    let leaks = driver.unload();
    let report = result?;
    check("unload", leaks.is_empty(), || {
        format!("pool leaks: {leaks:?}")
    })?;
    Ok(report)
}

fn copy_in_domain(
    backend: &SharedBackend,
    node: NODE_REQUIREMENT,
) -> Result<DmaCopyReport, ScenarioError> {
    let mut init = Some(WDFDEVICE_INIT::new(Arc::clone(backend)));
    let mut device = WDFDEVICE::NULL;
    let s = WdfDeviceCreate(&mut init, WDF_NO_OBJECT_ATTRIBUTES, Some(&mut device));
    check("WdfDeviceCreate", NT_SUCCESS(s), || s.to_string())?;
    let Some(pdo) = WdfDeviceWdmGetPhysicalDevice(device) else {
        return fail(
            "WdfDeviceWdmGetPhysicalDevice",
            "no DMA hardware (see the log)",
        );
    };
    let desc = DEVICE_DESCRIPTION {
        Version: DEVICE_DESCRIPTION_VERSION3,
        Master: true,
        ScatterGather: true,
        DmaAddressWidth: 64,
        MaximumLength: 1 << 20,
        ..Default::default()
    };
    let mut map_registers = 0;
    let Some(a) = IoGetDmaAdapter(Some(&pdo), &desc, &mut map_registers) else {
        return fail("IoGetDmaAdapter", "no adapter");
    };
    let domain = (a.DmaOperations.GetDmaDomain)(&a);
    check("GetDmaDomain", !domain.is_null(), || {
        "NULL domain handle".into()
    })?;
    let len: u32 = 3 << 20;
    let src = allocate(&a, domain, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, node)?;
    let dst = allocate(&a, domain, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, node)?;
    let ring = allocate(&a, domain, 4096, 0, MM_ANY_NODE_OK)?;
    let cpl = allocate(&a, domain, 4096, 0, MM_ANY_NODE_OK)?;
    let Some(dom) = a.core().current_domain() else {
        return fail("GetDmaDomain", "the adapter is not in its domain");
    };
    let mut bus = [0u64; 2];
    for (i, cb) in [src, dst].into_iter().enumerate() {
        check("LARGE_PAGE", cb.logical % (2 << 20) == 0, || {
            format!("logical {:#x} not 2 MiB aligned", cb.logical)
        })?;
        let Some(m) = dom.translate(cb.logical) else {
            return fail(
                "LARGE_PAGE",
                format!("logical {:#x} not mapped", cb.logical),
            );
        };
        check(
            "LARGE_PAGE",
            m.page == PageSize::Size2M && m.bus % (2 << 20) == 0,
            || format!("leaf {:?} at bus {:#x}", m.page, m.bus),
        )?;
        bus[i] = m.bus;
    }
    let src_node = dom.with_buffer(src.logical, |b| b.node()).flatten();
    let pattern: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(131) >> 3) as u8).collect();
    // SAFETY: `src.va` is a live common buffer of `len` bytes that the device does not
    // touch until the descriptor below.
    unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.va.cast::<u8>(), len as usize) };
    let copied = {
        let alias = |logical| {
            dom.with_buffer(logical, |b| {
                // SAFETY: the aliases are dropped (with the queue and the records) at the
                // end of this block, before the common buffers are freed.
                unsafe { b.buffer().alias() }
            })
        };
        let (Some(ring_buf), Some(cpl_buf)) = (alias(ring.logical), alias(cpl.logical)) else {
            return fail("queue", "ring or completion buffer missing");
        };
        let queue_err = |e: crate::dma_queue::QueueError| ScenarioError {
            step: "queue",
            problem: e.to_string(),
        };
        let records = CompletionRecords::with_buffer(cpl_buf, 4, cpl.logical).map_err(queue_err)?;
        let mut q = DmaQueue::with_ring(
            &**backend,
            QueueConfig::new(0, 16, 0).in_domain(dom.index()),
            ring_buf,
            ring.logical,
        )
        .map_err(queue_err)?;
        q.submit(&[
            Descriptor::copy(src.logical, dst.logical, len).with_completion(records.device_addr(0))
        ])
        .map_err(queue_err)?;
        let c = q.wait_completion(&records, 0, TIMEOUT).map_err(queue_err)?;
        q.wait_idle(TIMEOUT).map_err(queue_err)?;
        q.disable().map_err(queue_err)?;
        check("COPY", c.is_ok() && c.bytes == len, || {
            format!("completion {c:?}")
        })?;
        c.bytes
    };
    // SAFETY: `dst.va` is a live common buffer of `len` bytes; the DMA has completed.
    let got = unsafe { std::slice::from_raw_parts(dst.va.cast::<u8>(), len as usize) };
    let first_bad = got.iter().zip(&pattern).position(|(a, b)| a != b);
    check("COPY", first_bad.is_none(), || {
        format!("destination differs from the source at byte {first_bad:?}")
    })?;
    for cb in [src, dst, ring, cpl] {
        (a.DmaOperations.FreeCommonBuffer)(
            &a,
            cb.len,
            PHYSICAL_ADDRESS::new(cb.logical),
            cb.va,
            true,
        );
    }
    check("FreeCommonBuffer", dom.buffer_count() == 0, || {
        format!("{} buffer(s) left", dom.buffer_count())
    })?;
    let index = dom.index();
    drop(dom);
    (a.DmaOperations.PutDmaAdapter)(a);
    Ok(DmaCopyReport {
        device_domain: index,
        src: (src.logical, bus[0]),
        dst: (dst.logical, bus[1]),
        src_node,
        bytes: copied,
    })
}
