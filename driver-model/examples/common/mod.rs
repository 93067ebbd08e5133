//! What every example's `DriverEntry` does.

use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

/// `DriverEntry`: `WdfDriverCreate` for the `domdma_sample` service with the default
/// configuration. The returned driver object owns every framework object the example makes.
pub fn driver_entry() -> DRIVER_OBJECT {
    let mut driver_object = DRIVER_OBJECT::new();
    let status = WdfDriverCreate(
        &mut driver_object,
        r"\Registry\Machine\System\CurrentControlSet\Services\domdma_sample",
        WDF_NO_OBJECT_ATTRIBUTES,
        &WDF_DRIVER_CONFIG::default(),
        None,
    );
    assert!(NT_SUCCESS(status), "WdfDriverCreate: {status}");
    driver_object
}
