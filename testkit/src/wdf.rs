//! WDF fixtures: a loaded driver with one device on a back end, version-3 adapters, domain
//! common buffers as a driver holds them.

#![allow(non_snake_case)]

use std::ffi::c_void;

use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

use crate::check::{Failure, TestResult};

/// A loaded driver with one device on a back end.
pub struct Driver {
    /// The driver object ([`Driver::unload`] checks for leaks).
    pub driver: DRIVER_OBJECT,
    /// The device.
    pub device: WDFDEVICE,
    /// Its PDO (for `IoGetDmaAdapter`).
    pub pdo: PDEVICE_OBJECT,
}

impl Driver {
    /// Loads a driver (service `domdma_conformance`) and creates a device on `backend`.
    pub fn load(backend: SharedBackend) -> Result<Self, Failure> {
        let mut driver = DRIVER_OBJECT::new();
        let s = WdfDriverCreate(
            &mut driver,
            r"\Registry\Machine\System\CurrentControlSet\Services\domdma_conformance",
            WDF_NO_OBJECT_ATTRIBUTES,
            &WDF_DRIVER_CONFIG::default(),
            None,
        );
        crate::check!(NT_SUCCESS(s), "WdfDriverCreate: {s}");
        let mut init = Some(WDFDEVICE_INIT::new(backend));
        let mut device = WDFDEVICE::NULL;
        let s = WdfDeviceCreate(&mut init, WDF_NO_OBJECT_ATTRIBUTES, Some(&mut device));
        crate::check!(NT_SUCCESS(s), "WdfDeviceCreate: {s}");
        let Some(pdo) = WdfDeviceWdmGetPhysicalDevice(device) else {
            return Err(Failure(
                "WdfDeviceWdmGetPhysicalDevice: no DMA hardware (see the log)".into(),
            ));
        };
        Ok(Driver {
            driver,
            device,
            pdo,
        })
    }

    /// A version-3 bus-master scatter/gather adapter with `width` address bits.
    pub fn adapter(&self, width: u32) -> Result<PDMA_ADAPTER, Failure> {
        let desc = DEVICE_DESCRIPTION {
            Version: DEVICE_DESCRIPTION_VERSION3,
            Master: true,
            ScatterGather: true,
            DmaAddressWidth: width,
            MaximumLength: 1 << 20,
            ..Default::default()
        };
        let mut map_registers = 0;
        IoGetDmaAdapter(Some(&self.pdo), &desc, &mut map_registers)
            .ok_or_else(|| Failure(format!("IoGetDmaAdapter({width}-bit) returned NULL")))
    }

    /// Unloads the driver; fails when pool memory is left (a leak).
    pub fn unload(mut self) -> TestResult {
        let leaks = self.driver.unload();
        crate::check!(leaks.is_empty(), "pool leaks at unload: {leaks:?}");
        Ok(())
    }
}

/// A domain common buffer as the driver holds it.
#[derive(Debug, Clone, Copy)]
pub struct Cb {
    /// Logical address (the IOVA in the domain).
    pub logical: u64,
    /// Virtual address.
    pub va: *mut c_void,
    /// Length asked for.
    pub len: u32,
}

impl Cb {
    /// Copies `data` into the buffer at `offset` through its virtual address.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.len as usize,
            "outside the buffer"
        );
        let dst = self.va.cast::<u8>().wrapping_add(offset);
        // SAFETY: `va` is a live common buffer of `len` bytes (the caller has not freed
        // it) and `offset..offset + data.len()` is inside it (checked); the device does not
        // touch it concurrently in the scenarios that call this.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// The buffer's bytes `offset..offset + len`.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len as usize, "outside the buffer");
        let mut v = vec![0u8; len];
        let src = self.va.cast::<u8>().wrapping_add(offset).cast_const();
        // SAFETY: as in `write`; the DMA that wrote the buffer has completed.
        unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr(), len) };
        v
    }
}

/// `AllocateDomainCommonBuffer`, returning the status and what it gave.
#[allow(clippy::too_many_arguments)]
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

/// `AllocateDomainCommonBuffer` of `len` bytes with `flags` on `node`, which must succeed.
pub fn alloc(
    a: &DMA_ADAPTER,
    domain: HANDLE,
    len: u32,
    flags: u32,
    node: NODE_REQUIREMENT,
) -> Result<Cb, Failure> {
    let (s, cb) = try_alloc(a, domain, None, len, flags, None, node);
    crate::check!(
        NT_SUCCESS(s),
        "AllocateDomainCommonBuffer({len:#x} bytes, flags {flags}, node {node}): {s}"
    );
    Ok(cb)
}

/// `FreeCommonBuffer` of a cached buffer.
pub fn free(a: &DMA_ADAPTER, cb: Cb) {
    (a.DmaOperations.FreeCommonBuffer)(a, cb.len, PHYSICAL_ADDRESS::new(cb.logical), cb.va, true);
}
