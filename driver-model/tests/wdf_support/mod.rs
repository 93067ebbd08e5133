//! Shared set-up for the WDF DMA tests: a driver with one device on a given back end, a
//! version-3 adapter, and a DMA through domain common buffers that any back end runs.

#![allow(dead_code, non_snake_case)]

use std::ffi::c_void;
use std::sync::Arc;

use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

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
