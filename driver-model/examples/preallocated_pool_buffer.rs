//! The `WdfMemoryCreatePreallocated` sample: a buffer from `ExAllocatePoolWithTag`,
//! wrapped in a memory object whose parent is a request, so that completing (deleting) the
//! request deletes the memory object, while the buffer stays the driver's to free.
//!
//! Run: `cargo run -p domdma-driver-model --example preallocated_pool_buffer`

#![allow(non_snake_case)]

mod common;

use std::ffi::c_void;

use domdma_driver_model::pool::{PoolKind, PoolTag};
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

/// Pool tag 'Drv1'.
const MY_DRIVER_TAG: u32 = u32::from_le_bytes(*b"Drv1");
const MY_BUFFER_SIZE: usize = 1024;

fn main() {
    let mut driver_object = common::driver_entry();

    // A driver-created request stands for the request the driver is processing.
    let mut requestHandle = WDFREQUEST::NULL;
    let status = WdfRequestCreate(
        WDF_NO_OBJECT_ATTRIBUTES,
        WDFOBJECT::NULL,
        Some(&mut requestHandle),
    );
    assert!(NT_SUCCESS(status));

    // The sample, line by line.
    let pBuffer: *mut c_void = ExAllocatePoolWithTag(NonPagedPool, MY_BUFFER_SIZE, MY_DRIVER_TAG);
    if pBuffer.is_null() {
        eprintln!("ExAllocatePoolWithTag failed");
        std::process::exit(1);
    }
    let mut attributes = WDF_OBJECT_ATTRIBUTES::init();
    WDF_OBJECT_ATTRIBUTES_INIT(&mut attributes);
    attributes.ParentObject = requestHandle.into();
    let mut memHandle = WDFMEMORY::NULL;
    // SAFETY: `pBuffer` is a live MY_BUFFER_SIZE-byte pool block, freed below only after
    // the memory object is gone.
    let status = unsafe {
        WdfMemoryCreatePreallocated(
            Some(&attributes),
            pBuffer,
            MY_BUFFER_SIZE,
            Some(&mut memHandle),
        )
    };
    assert!(NT_SUCCESS(status), "WdfMemoryCreatePreallocated: {status}");

    let message = b"payload for the I/O target";
    // SAFETY: `message` is valid for its length and is not the memory object's buffer.
    let status =
        unsafe { WdfMemoryCopyFromBuffer(memHandle, 0, message.as_ptr().cast(), message.len()) };
    assert!(NT_SUCCESS(status));
    println!(
        "memory object {memHandle:?} describes {pBuffer:p}, parent {:?}",
        object_parent(memHandle)
    );

    // Completing the request deletes it and its child memory object...
    WdfObjectDelete(requestHandle);
    println!(
        "request deleted; memory object live: {}",
        object_is_live(memHandle)
    );
    // ...but the framework never frees a preallocated buffer: it is still allocated.
    let pool = driver_object.globals().expect("loaded").pool().clone();
    let tag = PoolTag(MY_DRIVER_TAG);
    println!(
        "pool tag '{tag}': {} block(s) outstanding before ExFreePoolWithTag",
        pool.tag_stats(tag, PoolKind::NonPaged).outstanding()
    );
    ExFreePoolWithTag(pBuffer, MY_DRIVER_TAG);
    println!("{}", pool.poolmon());
    let leaks = driver_object.unload();
    println!("unload: {} leak(s)", leaks.len());
}
