//! Device and request objects: the parents a driver hangs its memory on.
//!
//! `WdfDeviceCreate` here takes a [`WDFDEVICE_INIT`] that names the back end the device is
//! reached through (the PnP manager's part in Windows); the DMA calls find the device's
//! hardware through it. `WdfRequestCreate` makes a driver-created request, the parent the
//! seeds' preallocated-memory example uses.

#![allow(non_snake_case, non_camel_case_types)]

use std::fmt;
use std::sync::{Arc, Mutex};

use super::driver::current;
use super::memory::null_parameter;
use super::object::{
    self, validate_attributes, Body, Kind, NewObject, WDFDEVICE, WDFOBJECT, WDFREQUEST,
    WDF_OBJECT_ATTRIBUTES,
};
use crate::dma::DmaDevice;
use crate::irql::{KeGetCurrentIrql, PASSIVE_LEVEL};
use crate::status::*;
use crate::verifier::fx_type;

pub use crate::dma::SharedBackend;

/// `WDFDEVICE_INIT`: what the device is created from.
pub struct WDFDEVICE_INIT {
    backend: Option<SharedBackend>,
}

impl fmt::Debug for WDFDEVICE_INIT {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WDFDEVICE_INIT")
            .field("backend", &self.backend.as_ref().map(|b| b.info().backend))
            .finish()
    }
}

impl WDFDEVICE_INIT {
    /// A device reached through `backend`.
    pub fn new(backend: SharedBackend) -> Box<Self> {
        Box::new(WDFDEVICE_INIT {
            backend: Some(backend),
        })
    }

    /// A device without hardware (for memory-only use).
    pub fn without_hardware() -> Box<Self> {
        Box::new(WDFDEVICE_INIT { backend: None })
    }
}

/// A device object's state.
pub(crate) struct DeviceBody {
    backend: Option<SharedBackend>,
    /// The DMA side, set up on first use.
    dma: Mutex<Option<Arc<DmaDevice>>>,
}

/// `WdfDeviceCreate`: creates a device object (parent: the driver) and consumes
/// `DeviceInit` (set to `None` on success, as KMDF frees it). PASSIVE_LEVEL only.
pub fn WdfDeviceCreate(
    DeviceInit: &mut Option<Box<WDFDEVICE_INIT>>,
    DeviceAttributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    Device: Option<&mut WDFDEVICE>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfDeviceCreate);
    const API: &str = "WdfDeviceCreate";
    let Some(out) = Device else {
        null_parameter(API, "Device");
        return STATUS_INVALID_PARAMETER;
    };
    let Some(init) = DeviceInit.as_ref() else {
        null_parameter(API, "DeviceInit");
        return STATUS_INVALID_PARAMETER;
    };
    if KeGetCurrentIrql() > PASSIVE_LEVEL {
        return STATUS_INVALID_DEVICE_REQUEST;
    }
    let s = validate_attributes(DeviceAttributes);
    if !s.is_success() {
        return s;
    }
    if DeviceAttributes.is_some_and(|a| !a.ParentObject.is_null()) {
        return STATUS_WDF_PARENT_ASSIGNMENT_NOT_ALLOWED;
    }
    let g = current();
    let default_parent = g.handle().into();
    match object::create(NewObject {
        kind: Kind::Device,
        driver: g,
        body: Body::Device(Arc::new(DeviceBody {
            backend: init.backend.clone(),
            dma: Mutex::new(None),
        })),
        attributes: DeviceAttributes,
        default_parent,
        api: API,
    }) {
        Ok(h) => {
            *DeviceInit = None;
            *out = WDFDEVICE(h);
            STATUS_SUCCESS
        }
        Err(s) => s,
    }
}

/// `WdfRequestCreate`: a driver-created request (no I/O target in this model:
/// `IoTarget` must be NULL). Parent: the attributes' `ParentObject`, else the driver.
pub fn WdfRequestCreate(
    RequestAttributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    IoTarget: WDFOBJECT,
    Request: Option<&mut WDFREQUEST>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfRequestCreate);
    const API: &str = "WdfRequestCreate";
    let Some(out) = Request else {
        null_parameter(API, "Request");
        return STATUS_INVALID_PARAMETER;
    };
    *out = WDFREQUEST::NULL;
    if !IoTarget.is_null() {
        return STATUS_NOT_SUPPORTED;
    }
    let s = validate_attributes(RequestAttributes);
    if !s.is_success() {
        return s;
    }
    let g = current();
    let default_parent = g.handle().into();
    match object::create(NewObject {
        kind: Kind::Request,
        driver: g,
        body: Body::None,
        attributes: RequestAttributes,
        default_parent,
        api: API,
    }) {
        Ok(h) => {
            *out = WDFREQUEST(h);
            STATUS_SUCCESS
        }
        Err(s) => s,
    }
}

/// The device `h` is or hangs under (KMDF's `_SearchForDevice`), if any.
pub(crate) fn device_ancestor(h: WDFOBJECT) -> Option<WDFOBJECT> {
    let t = object::table();
    let mut cur = t.live(h)?;
    loop {
        if cur.kind == Kind::Device {
            return Some(cur.handle);
        }
        cur = t.live(cur.parent())?;
    }
}

/// The DMA side of device `Device` (set up on first use: capabilities read, bus mastering
/// on). `None` for a device without hardware or when the set-up fails (logged). An invalid
/// handle is bug check 0x10D / 0x5.
pub(crate) fn device_dma(Device: WDFDEVICE, api: &str) -> Option<Arc<DmaDevice>> {
    // The DMA set-up talks to the hardware: done with the table unlocked.
    let d = object::with_resolved(Device.into(), fx_type::FX_TYPE_DEVICE, api, |o| {
        match &o.body {
            Body::Device(d) => Some(Arc::clone(d)),
            _ => None,
        }
    })??;
    let backend = d.backend.clone()?;
    let mut slot = d.dma.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dma) = &*slot {
        return Some(Arc::clone(dma));
    }
    match DmaDevice::new(backend) {
        Ok(dma) => {
            *slot = Some(Arc::clone(&dma));
            Some(dma)
        }
        Err(e) => {
            tracing::error!("{api}: setting up DMA on the device: {e}");
            None
        }
    }
}
