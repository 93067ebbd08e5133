//! Shared set-up for the WDF DMA tests: a driver with one device on a given back end, a
//! version-3 adapter, and a DMA through domain common buffers that any back end runs.

#![allow(dead_code, non_snake_case)]

use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::dma_queue::{CompletionRecords, Descriptor, DmaQueue, QueueConfig};
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

/// How long a DMA is waited for.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A loaded driver with one device.
pub struct Fixture {
    /// The driver object (unload it to check for leaks).
    pub driver: DRIVER_OBJECT,
    /// The device.
    pub device: WDFDEVICE,
    /// Its PDO.
    pub pdo: PDEVICE_OBJECT,
    /// The back end.
    pub backend: SharedBackend,
}

impl Fixture {
    /// Loads a driver and creates a device on `backend`.
    pub fn new(backend: SharedBackend) -> Self {
        let mut driver = DRIVER_OBJECT::new();
        let s = WdfDriverCreate(
            &mut driver,
            r"\Registry\Machine\System\CurrentControlSet\Services\domdma",
            WDF_NO_OBJECT_ATTRIBUTES,
            &WDF_DRIVER_CONFIG::default(),
            None,
        );
        assert_eq!(s, STATUS_SUCCESS);
        let mut init = Some(WDFDEVICE_INIT::new(Arc::clone(&backend)));
        let mut device = WDFDEVICE::NULL;
        assert_eq!(
            WdfDeviceCreate(&mut init, WDF_NO_OBJECT_ATTRIBUTES, Some(&mut device)),
            STATUS_SUCCESS
        );
        let pdo = WdfDeviceWdmGetPhysicalDevice(device).expect("the device has hardware");
        Fixture {
            driver,
            device,
            pdo,
            backend,
        }
    }

    /// A version-3 bus-master adapter with `width` address bits.
    pub fn adapter(&self, width: u32) -> PDMA_ADAPTER {
        let desc = DEVICE_DESCRIPTION {
            Version: DEVICE_DESCRIPTION_VERSION3,
            Master: true,
            ScatterGather: true,
            DmaAddressWidth: width,
            MaximumLength: 1 << 20,
            ..Default::default()
        };
        let mut map_registers = 0;
        let a =
            IoGetDmaAdapter(Some(&self.pdo), &desc, &mut map_registers).expect("IoGetDmaAdapter");
        assert!(map_registers > 0);
        a
    }
}

/// A common buffer as the driver holds it.
#[derive(Debug, Clone, Copy)]
pub struct Cb {
    /// Logical address.
    pub logical: u64,
    /// Virtual address.
    pub va: *mut c_void,
    /// Length asked for.
    pub len: u32,
}

/// `AllocateDomainCommonBuffer` with the usual defaults; panics on failure.
pub fn alloc(a: &DMA_ADAPTER, domain: HANDLE, len: u32, flags: u32) -> Cb {
    let (s, cb) = try_alloc(a, domain, None, len, flags, None, MM_ANY_NODE_OK);
    assert_eq!(
        s, STATUS_SUCCESS,
        "AllocateDomainCommonBuffer({len:#x}, {flags})"
    );
    cb
}

/// `AllocateDomainCommonBuffer` returning the status.
pub fn try_alloc(
    a: &DMA_ADAPTER,
    domain: HANDLE,
    max: Option<u64>,
    len: u32,
    flags: u32,
    cache: Option<MEMORY_CACHING_TYPE>,
    node: NODE_REQUIREMENT,
) -> (NTSTATUS, Cb) {
    let mut logical = PHYSICAL_ADDRESS::default();
    let mut va: *mut c_void = std::ptr::null_mut();
    let max = max.map(PHYSICAL_ADDRESS::new);
    let s = (a.DmaOperations.AllocateDomainCommonBuffer)(
        a,
        domain,
        max.as_ref(),
        len,
        flags,
        cache.as_ref(),
        node,
        &mut logical,
        &mut va,
    );
    (
        s,
        Cb {
            logical: logical.QuadPart as u64,
            va,
            len,
        },
    )
}

/// `FreeCommonBuffer` of a cached buffer.
pub fn free(a: &DMA_ADAPTER, cb: Cb) {
    (a.DmaOperations.FreeCommonBuffer)(a, cb.len, PHYSICAL_ADDRESS::new(cb.logical), cb.va, true);
}

/// The DMA test every back end runs: through the WDF facade, a domain with 2 MiB common
/// buffers (LARGE_PAGE) for source and destination and 4 KiB ones for the ring and the
/// completion records; a COPY in that domain; the destination checked through its virtual
/// address; everything freed, no pool leak at unload.
pub fn dma_copy_through_domain_common_buffers(backend: SharedBackend) {
    let mut f = Fixture::new(backend);
    let a = f.adapter(48);
    let domain = (a.DmaOperations.GetDmaDomain)(&a);
    assert!(!domain.is_null());
    let len: u32 = 3 << 20;
    let src = alloc(&a, domain, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE);
    let dst = alloc(&a, domain, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE);
    let ring = alloc(&a, domain, 4096, 0);
    let cpl = alloc(&a, domain, 4096, 0);
    let dom = a.core().current_domain().expect("in a domain");
    for cb in [src, dst] {
        assert_eq!(cb.logical % (2 << 20), 0, "LARGE_PAGE logical alignment");
        let m = dom.translate(cb.logical).expect("mapped");
        assert_eq!(m.page, domdma_driver_model::iopt::PageSize::Size2M);
        assert_eq!(m.bus % (2 << 20), 0, "LARGE_PAGE physical alignment");
    }
    let pattern: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(131) >> 3) as u8).collect();
    // SAFETY: `src.va` is a live common buffer of `len` bytes that the device does not
    // touch until the descriptor below.
    unsafe { std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.va.cast::<u8>(), len as usize) };
    {
        let dev = &*f.backend;
        let alias = |logical| {
            dom.with_buffer(logical, |b| {
                // SAFETY: the aliases are dropped (with the queue and the records) at the
                // end of this block, before the common buffers are freed.
                unsafe { b.buffer().alias() }
            })
            .unwrap()
        };
        let (ring_buf, cpl_buf) = (alias(ring.logical), alias(cpl.logical));
        let records = CompletionRecords::with_buffer(cpl_buf, 4, cpl.logical).unwrap();
        let mut q = DmaQueue::with_ring(
            dev,
            QueueConfig::new(0, 16, 0).in_domain(dom.index()),
            ring_buf,
            ring.logical,
        )
        .unwrap();
        q.submit(&[
            Descriptor::copy(src.logical, dst.logical, len).with_completion(records.device_addr(0))
        ])
        .unwrap();
        let c = q.wait_completion(&records, 0, TIMEOUT).unwrap();
        assert!(c.is_ok(), "completion {c:?}");
        assert_eq!(c.bytes, len);
        q.wait_idle(TIMEOUT).unwrap();
        q.disable().unwrap();
    }
    // SAFETY: `dst.va` is a live common buffer of `len` bytes; the DMA has completed.
    let got = unsafe { std::slice::from_raw_parts(dst.va.cast::<u8>(), len as usize) };
    assert!(
        got == pattern.as_slice(),
        "the device copied the source into the destination"
    );
    for cb in [src, dst, ring, cpl] {
        free(&a, cb);
    }
    assert_eq!(dom.buffer_count(), 0);
    (a.DmaOperations.PutDmaAdapter)(a);
    assert!(f.driver.unload().is_empty());
}
