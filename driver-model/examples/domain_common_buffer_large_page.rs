//! `AllocateDomainCommonBuffer` with `DOMAIN_COMMON_BUFFER_LARGE_PAGE`, then a DMA into it:
//! the device fills the buffer through the DMA domain's 2 MiB mappings, and the driver reads
//! the pattern back through the virtual address.
//!
//! The device is the domdma device core linked into this process (the in-process back
//! end); the same code drives the real device server over vfio-user or inside the QEMU
//! guest through the other back ends.
//!
//! Run: `cargo run -p domdma-driver-model --example domain_common_buffer_large_page`

#![allow(non_snake_case)]

mod common;

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::dma_queue::{CompletionRecords, Descriptor, DmaQueue, QueueConfig};
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

const LENGTH: u32 = 4 << 20;
const PATTERN: u64 = 0x0123_4567_89ab_cdef;

fn allocate(
    a: &DMA_ADAPTER,
    domain: HANDLE,
    length: u32,
    flags: u32,
) -> (PHYSICAL_ADDRESS, *mut c_void) {
    let mut LogicalAddress = PHYSICAL_ADDRESS::default();
    let mut VirtualAddress: *mut c_void = std::ptr::null_mut();
    let cache = MmCached;
    let status = (a.DmaOperations.AllocateDomainCommonBuffer)(
        a,
        domain,
        None, // MaximumAddress: no limit beyond the adapter's width
        length,
        flags,
        Some(&cache),
        1, // PreferredNode: the device's node
        &mut LogicalAddress,
        &mut VirtualAddress,
    );
    assert!(
        NT_SUCCESS(status),
        "AllocateDomainCommonBuffer({length:#x}, {flags}): {status}"
    );
    (LogicalAddress, VirtualAddress)
}

fn main() {
    let backend: SharedBackend =
        Arc::new(InProcessBackend::new(InProcessConfig::default()).expect("in-process device"));
    let mut driver_object = common::driver_entry();
    let mut device_init = Some(WDFDEVICE_INIT::new(Arc::clone(&backend)));
    let mut device = WDFDEVICE::NULL;
    assert!(NT_SUCCESS(WdfDeviceCreate(
        &mut device_init,
        WDF_NO_OBJECT_ATTRIBUTES,
        Some(&mut device)
    )));

    // IoGetDmaAdapter with a version-3 description.
    let pdo = WdfDeviceWdmGetPhysicalDevice(device).expect("the device has hardware");
    let description = DEVICE_DESCRIPTION {
        Version: DEVICE_DESCRIPTION_VERSION3,
        Master: true,
        ScatterGather: true,
        DmaAddressWidth: 64,
        MaximumLength: 1 << 20,
        ..Default::default()
    };
    let mut NumberOfMapRegisters = 0;
    let adapter =
        IoGetDmaAdapter(Some(&pdo), &description, &mut NumberOfMapRegisters).expect("adapter");
    let ops = adapter.DmaOperations;
    let mut info = DMA_ADAPTER_INFO {
        Version: DMA_ADAPTER_INFO_VERSION1,
        ..Default::default()
    };
    assert!(NT_SUCCESS((ops.GetDmaAdapterInfo)(&adapter, &mut info)));
    println!(
        "adapter: {}-bit addresses, page sizes {:#x}, {} map registers",
        info.V1.DmaAddressWidth, info.DomDma.SupportedPageSizes, NumberOfMapRegisters
    );

    let domain = (ops.GetDmaDomain)(&adapter);
    assert!(!domain.is_null(), "GetDmaDomain");
    let (logical, va) = allocate(&adapter, domain, LENGTH, DOMAIN_COMMON_BUFFER_LARGE_PAGE);
    let dom = adapter.core().current_domain().expect("in a domain");
    let m = dom.translate(logical.QuadPart as u64).expect("mapped");
    println!(
        "LARGE_PAGE buffer: logical {:#x}, virtual {va:p}, physical {:#x}, leaf {:?}, device domain {}",
        logical.QuadPart,
        m.bus,
        m.page,
        dom.index()
    );

    // A queue whose ring and completion records are domain common buffers too.
    let (ring_logical, _) = allocate(&adapter, domain, 4096, 0);
    let (cpl_logical, _) = allocate(&adapter, domain, 4096, 0);
    {
        let alias = |l: PHYSICAL_ADDRESS| {
            dom.with_buffer(l.QuadPart as u64, |b| {
                // SAFETY: the aliases live in the queue and records, dropped at the end of
                // this block, before the buffers are freed.
                unsafe { b.buffer().alias() }
            })
            .expect("allocated above")
        };
        let records =
            CompletionRecords::with_buffer(alias(cpl_logical), 1, cpl_logical.QuadPart as u64)
                .expect("records");
        let mut queue = DmaQueue::with_ring(
            &*backend,
            QueueConfig::new(0, 16, 0).in_domain(dom.index()),
            alias(ring_logical),
            ring_logical.QuadPart as u64,
        )
        .expect("queue");
        queue
            .submit(&[Descriptor::fill(logical.QuadPart as u64, PATTERN, LENGTH)
                .with_completion(records.device_addr(0))])
            .expect("submit");
        let c = queue
            .wait_completion(&records, 0, Duration::from_secs(10))
            .expect("completion");
        println!("FILL completed: status {}, {} bytes", c.status, c.bytes);
        queue.wait_idle(Duration::from_secs(10)).expect("idle");
        queue.disable().expect("disable");
    }
    // SAFETY: `va` is the live LENGTH-byte common buffer; the DMA has completed.
    let bytes = unsafe { std::slice::from_raw_parts(va.cast::<u8>(), LENGTH as usize) };
    let ok = bytes
        .chunks_exact(8)
        .all(|w| u64::from_le_bytes(w.try_into().unwrap()) == PATTERN);
    println!("the driver reads the pattern back through the virtual address: {ok}");
    assert!(ok);

    for (l, len) in [(logical, LENGTH), (ring_logical, 4096), (cpl_logical, 4096)] {
        let va = dom
            .with_buffer(l.QuadPart as u64, |b| b.virtual_address().as_ptr().cast())
            .expect("allocated");
        (ops.FreeCommonBuffer)(&adapter, len, l, va, true);
    }
    (ops.PutDmaAdapter)(adapter);
    let leaks = driver_object.unload();
    println!("unload: {} leak(s)", leaks.len());
}
