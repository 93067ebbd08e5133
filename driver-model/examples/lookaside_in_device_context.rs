//! The `WdfMemoryCreateFromLookaside` sample: a lookaside list created at device set-up,
//! its handle kept in the device's context space, and a buffer taken from it.
//!
//! Run: `cargo run -p domdma-driver-model --example lookaside_in_device_context`

#![allow(non_snake_case, non_camel_case_types)]

mod common;

use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;
use domdma_driver_model::WDF_DECLARE_CONTEXT_TYPE_WITH_NAME;

/// Pool tag 'Smpl' (C: `'lpmS'`).
const MY_POOL_TAG: u32 = u32::from_le_bytes(*b"Smpl");

/// The buffers the driver takes from its list.
#[repr(C)]
struct MY_LOOKASIDE_BUFFER {
    Header: u64,
    Payload: [u8; 240],
}

/// The device's context: where the list handle is kept.
#[derive(Default)]
struct DEVICE_CONTEXT {
    LookasideListHandle: WDFLOOKASIDE,
}
WDF_DECLARE_CONTEXT_TYPE_WITH_NAME!(DEVICE_CONTEXT, GetDeviceContext);

fn main() {
    // DriverEntry.
    let mut driver_object = common::driver_entry();

    // EvtDriverDeviceAdd: a device with a DEVICE_CONTEXT.
    let mut attributes = WDF_OBJECT_ATTRIBUTES::init();
    WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE::<DEVICE_CONTEXT>(&mut attributes);
    let mut device_init = Some(WDFDEVICE_INIT::without_hardware());
    let mut device = WDFDEVICE::NULL;
    let status = WdfDeviceCreate(&mut device_init, Some(&attributes), Some(&mut device));
    assert!(NT_SUCCESS(status), "WdfDeviceCreate: {status}");

    let deviceContext = GetDeviceContext(device);
    // SAFETY: the context lives as long as the device object and nothing else uses it.
    let ctx = unsafe { &mut *deviceContext };
    let status = WdfLookasideListCreate(
        WDF_NO_OBJECT_ATTRIBUTES,
        std::mem::size_of::<MY_LOOKASIDE_BUFFER>(),
        NonPagedPool,
        WDF_NO_OBJECT_ATTRIBUTES,
        MY_POOL_TAG,
        Some(&mut ctx.LookasideListHandle),
    );
    assert!(NT_SUCCESS(status), "WdfLookasideListCreate: {status}");

    // Later, in an I/O path: get a buffer from the list.
    for round in 0..3u64 {
        let mut memHandle = WDFMEMORY::NULL;
        let status = WdfMemoryCreateFromLookaside(ctx.LookasideListHandle, Some(&mut memHandle));
        assert!(NT_SUCCESS(status), "WdfMemoryCreateFromLookaside: {status}");
        let mut size = 0usize;
        let buffer = WdfMemoryGetBuffer(memHandle, Some(&mut size)).cast::<MY_LOOKASIDE_BUFFER>();
        // SAFETY: the buffer is `size` >= size_of::<MY_LOOKASIDE_BUFFER>() bytes, aligned
        // for it (pool blocks are 16-byte aligned), and owned by `memHandle`.
        let b = unsafe { &mut *buffer };
        println!(
            "round {round}: buffer {buffer:p}, {size} bytes, header {:#x} (zeroed: small lookaside buffers are)",
            b.Header
        );
        b.Header = 0xfeed_0000 + round;
        b.Payload.fill(round as u8);
        // Done with it: deleting the memory object returns the buffer to the list.
        WdfObjectDelete(memHandle);
    }
    let stats = lookaside_stats(ctx.LookasideListHandle).expect("the list is live");
    println!(
        "lookaside: {} allocations, {} misses, {} frees, {} buffers kept",
        stats.total_allocates, stats.allocate_misses, stats.total_frees, stats.depth
    );
    println!(
        "{}",
        driver_object.globals().expect("loaded").pool().poolmon()
    );

    // The list is a child of the driver: unloading deletes it (and returns its buffers).
    let leaks = driver_object.unload();
    println!("unload: {} leak(s)", leaks.len());
}
