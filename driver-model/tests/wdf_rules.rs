//! The memory APIs' rules that only the facade itself can check: bug checks (NULL
//! parameters, invalid handles), the verifier's misuse reports, default pool tags of other
//! drivers, and the model's own IRQL and object bookkeeping. The documented behaviour every
//! back end must show (lookaside lists, memory objects, copies, IRQL limits) is the
//! conformance suite's (testkit/src/conformance/wdf_memory.rs), run on every back end.
//!
//! Each test runs on its own thread with its own driver (its own pool), so tests do not
//! see each other's objects or leaks.

#![allow(non_snake_case)]

use std::ffi::c_void;

use domdma_driver_model::irql::{IrqlGuard, DISPATCH_LEVEL};
use domdma_driver_model::pool::{PoolKind, PoolTag};
use domdma_driver_model::status::*;
use domdma_driver_model::verifier::{self, expect_bug_check, fx_type, VerifierMode, *};
use domdma_driver_model::wdf::*;

const SERVICES: &str = r"\Registry\Machine\System\CurrentControlSet\Services\";
const TAG: u32 = u32::from_le_bytes(*b"Test");

/// A loaded driver for service `name` with `config`.
fn load_with(name: &str, config: &WDF_DRIVER_CONFIG) -> (DRIVER_OBJECT, WDFDRIVER) {
    let mut obj = DRIVER_OBJECT::new();
    let mut h = WDFDRIVER::NULL;
    let s = WdfDriverCreate(
        &mut obj,
        &format!("{SERVICES}{name}"),
        WDF_NO_OBJECT_ATTRIBUTES,
        config,
        Some(&mut h),
    );
    assert_eq!(s, STATUS_SUCCESS);
    (obj, h)
}

fn load() -> (DRIVER_OBJECT, WDFDRIVER) {
    load_with("domdma", &WDF_DRIVER_CONFIG::default())
}

/// A non-paged list of `size` bytes with the test tag.
fn lookaside(size: usize, memory_attributes: Option<&WDF_OBJECT_ATTRIBUTES>) -> WDFLOOKASIDE {
    let mut l = WDFLOOKASIDE::NULL;
    let s = WdfLookasideListCreate(
        WDF_NO_OBJECT_ATTRIBUTES,
        size,
        NonPagedPool,
        memory_attributes,
        TAG,
        Some(&mut l),
    );
    assert_eq!(s, STATUS_SUCCESS);
    l
}

fn from_lookaside(l: WDFLOOKASIDE) -> WDFMEMORY {
    let mut m = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreateFromLookaside(l, Some(&mut m)),
        STATUS_SUCCESS
    );
    m
}

fn pool_stats(
    driver: &DRIVER_OBJECT,
    tag: u32,
    kind: PoolKind,
) -> domdma_driver_model::pool::TagStats {
    driver
        .globals()
        .unwrap()
        .pool()
        .tag_stats(PoolTag(tag), kind)
}

// ---- WdfLookasideListCreate ----

#[test]
fn lookaside_create_null_out_pointer_is_wdf_violation_0x4() {
    let (_d, _) = load();
    let bc = expect_bug_check(|| WdfLookasideListCreate(None, 64, NonPagedPool, None, TAG, None));
    assert_eq!(
        (bc.code, bc.subcode()),
        (WDF_VIOLATION, WDF_REQUIRED_PARAMETER_IS_NULL)
    );
}

#[test]
fn lookaside_create_invalid_parent_handle_is_wdf_violation_0x5() {
    let (_d, _) = load();
    let mut attrs = WDF_OBJECT_ATTRIBUTES::init();
    attrs.ParentObject = WDFOBJECT::NULL;
    // A handle that was never issued.
    let bogus = {
        let mut m = WDFMEMORY::NULL;
        let mut byte = 0u8;
        // SAFETY: `byte` outlives the memory object, deleted right away.
        let s = unsafe {
            WdfMemoryCreatePreallocated(None, (&mut byte as *mut u8).cast(), 1, Some(&mut m))
        };
        assert_eq!(s, STATUS_SUCCESS);
        WdfObjectDelete(m);
        m
    };
    attrs.ParentObject = bogus.into();
    let mut l = WDFLOOKASIDE::NULL;
    let bc = expect_bug_check(|| {
        WdfLookasideListCreate(Some(&attrs), 64, NonPagedPool, None, TAG, Some(&mut l))
    });
    assert_eq!(bc.code, WDF_VIOLATION);
    assert_eq!(
        bc.params[..3],
        [WDF_INVALID_HANDLE, bogus.raw(), fx_type::FX_TYPE_OBJECT]
    );
}

#[test]
fn lookaside_create_pool_tag_zero_uses_configured_driver_tag() {
    let config = WDF_DRIVER_CONFIG {
        DriverPoolTag: u32::from_le_bytes(*b"Cfgd"),
        ..Default::default()
    };
    let (mut d, _) = load_with("domdma", &config);
    let mut l = WDFLOOKASIDE::NULL;
    assert_eq!(
        WdfLookasideListCreate(None, 64, NonPagedPool, None, 0, Some(&mut l)),
        STATUS_SUCCESS
    );
    let m = from_lookaside(l);
    assert_eq!(
        pool_stats(&d, u32::from_le_bytes(*b"Cfgd"), PoolKind::NonPaged).allocs,
        1
    );
    WdfObjectDelete(m);
    WdfObjectDelete(l);
    assert!(d.unload().is_empty());
}

#[test]
fn lookaside_create_pool_tag_zero_uses_service_name_after_wdf_prefix() {
    for (service, tag) in [
        ("domdma", *b"domd"),
        ("WDFdomdma", *b"domd"),
        ("wdfSerial", *b"Seri"),
        ("Wdf", *b"FxDr"),
        ("WDFab", *b"FxDr"),
        ("abc", *b"FxDr"),
    ] {
        let (mut d, _) = load_with(service, &WDF_DRIVER_CONFIG::default());
        assert_eq!(
            d.globals().unwrap().tag(),
            PoolTag::new(&tag),
            "service {service}"
        );
        let mut l = WDFLOOKASIDE::NULL;
        assert_eq!(
            WdfLookasideListCreate(None, 32, NonPagedPool, None, 0, Some(&mut l)),
            STATUS_SUCCESS
        );
        let m = from_lookaside(l);
        assert_eq!(
            pool_stats(&d, u32::from_le_bytes(tag), PoolKind::NonPaged).allocs,
            1,
            "service {service}"
        );
        WdfObjectDelete(m);
        assert!(d.unload().is_empty());
    }
}

#[test]
fn lookaside_create_pool_tag_zero_falls_back_to_fxdr() {
    // A driver config tag of ' kdD' (the DDK default) is ignored, and a service name of
    // fewer than four characters after "WDF" gives 'FxDr'.
    let config = WDF_DRIVER_CONFIG {
        DriverPoolTag: DDK_DEFAULT_TAG.0,
        ..Default::default()
    };
    let (_d, _) = load_with("WDFx", &config);
    assert_eq!(_d.globals().unwrap().tag(), FX_TAG);
}

// ---- WdfMemoryCreateFromLookaside ----

#[test]
fn create_from_lookaside_invalid_handle_is_wdf_violation_0x5() {
    let (_d, _) = load();
    let mut req = WDFREQUEST::NULL;
    assert_eq!(
        WdfRequestCreate(None, WDFOBJECT::NULL, Some(&mut req)),
        STATUS_SUCCESS
    );
    let mut m = WDFMEMORY::NULL;
    let bc =
        expect_bug_check(|| WdfMemoryCreateFromLookaside(WDFLOOKASIDE(req.into()), Some(&mut m)));
    assert_eq!(
        bc.params[..3],
        [WDF_INVALID_HANDLE, req.raw(), fx_type::FX_TYPE_LOOKASIDE]
    );
    let l = lookaside(8, None);
    let bc = expect_bug_check(|| WdfMemoryCreateFromLookaside(l, None));
    assert_eq!(bc.subcode(), WDF_REQUIRED_PARAMETER_IS_NULL);
}

// ---- WdfMemoryCreatePreallocated / WdfMemoryAssignBuffer ----

#[test]
fn preallocated_null_buffer_is_wdf_violation_0x4() {
    let (_d, _) = load();
    let mut m = WDFMEMORY::NULL;
    // SAFETY: a NULL buffer is never accessed (the call bug checks first).
    let bc = expect_bug_check(|| unsafe {
        WdfMemoryCreatePreallocated(None, std::ptr::null_mut(), 16, Some(&mut m))
    });
    assert_eq!(
        (bc.code, bc.subcode()),
        (WDF_VIOLATION, WDF_REQUIRED_PARAMETER_IS_NULL)
    );
}

#[test]
fn assign_buffer_on_memory_not_created_preallocated_is_wdf_violation_0x5() {
    let (_d, _) = load();
    let mut m = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreate(None, NonPagedPool, TAG, 64, Some(&mut m), None),
        STATUS_SUCCESS
    );
    let mut other = [0u8; 64];
    // SAFETY: the call bug checks before touching the buffer.
    let bc =
        expect_bug_check(|| unsafe { WdfMemoryAssignBuffer(m, other.as_mut_ptr().cast(), 64) });
    assert_eq!(bc.code, WDF_VIOLATION);
    assert_eq!(
        bc.params[..3],
        [
            WDF_INVALID_HANDLE,
            m.raw(),
            fx_type::FX_TYPE_MEMORY_PREALLOCATED
        ]
    );
    let l = lookaside(64, None);
    let lm = from_lookaside(l);
    // SAFETY: as above.
    let bc =
        expect_bug_check(|| unsafe { WdfMemoryAssignBuffer(lm, other.as_mut_ptr().cast(), 64) });
    assert_eq!(bc.params[2], fx_type::FX_TYPE_MEMORY_PREALLOCATED);
}

// ---- WdfMemoryCopyToBuffer / WdfMemoryCopyFromBuffer ----

fn memory_of(size: usize) -> WDFMEMORY {
    let mut m = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreate(None, NonPagedPool, TAG, size, Some(&mut m), None),
        STATUS_SUCCESS
    );
    m
}

#[test]
fn copy_null_buffer_is_wdf_violation_0x4() {
    let (_d, _) = load();
    let m = memory_of(16);
    // SAFETY: the call bug checks before touching the buffer.
    let bc = expect_bug_check(|| unsafe { WdfMemoryCopyToBuffer(m, 0, std::ptr::null_mut(), 4) });
    assert_eq!(bc.subcode(), WDF_REQUIRED_PARAMETER_IS_NULL);
}

// ---- Bug checks and IRQL ----

#[test]
fn bug_checks_are_recorded_not_aborting_in_record_mode() {
    let (_d, _) = load();
    let before = verifier::set_mode(VerifierMode::Record);
    let s = WdfLookasideListCreate(None, 64, NonPagedPool, None, TAG, None);
    verifier::set_mode(before);
    assert_eq!(
        s, STATUS_INVALID_PARAMETER,
        "the call returns after the recorded bug check"
    );
    let rec = verifier::take_recorded();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        (rec[0].code, rec[0].subcode()),
        (WDF_VIOLATION, WDF_REQUIRED_PARAMETER_IS_NULL)
    );
}

#[test]
fn irql_is_modelled_per_thread() {
    let (d, _) = load();
    let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
    let globals = d.globals().unwrap().clone();
    let status = std::thread::spawn(move || {
        let _scope = globals.enter();
        let mut l = WDFLOOKASIDE::NULL;
        WdfLookasideListCreate(None, 64, PagedPool, None, TAG, Some(&mut l))
    })
    .join()
    .unwrap();
    assert_eq!(
        status, STATUS_SUCCESS,
        "the other thread runs at PASSIVE_LEVEL"
    );
}

// ---- Object model ----

// ---- Misuse caught by the verifier ----

#[test]
fn misuse_double_delete_is_wdf_violation_0x5() {
    let (_d, _) = load();
    let m = memory_of(8);
    WdfObjectDelete(m);
    let bc = expect_bug_check(|| WdfObjectDelete(m));
    assert_eq!(
        bc.params[..3],
        [WDF_INVALID_HANDLE, m.raw(), fx_type::FX_TYPE_OBJECT]
    );
}

#[test]
fn misuse_use_after_delete_is_wdf_violation_0x5() {
    let (_d, _) = load();
    let l = lookaside(8, None);
    let m = from_lookaside(l);
    WdfObjectDelete(m);
    let bc = expect_bug_check(|| WdfMemoryGetBuffer(m, None));
    assert_eq!(
        bc.params[..3],
        [WDF_INVALID_HANDLE, m.raw(), fx_type::IFX_TYPE_MEMORY]
    );
    WdfObjectDelete(l);
    let mut m2 = WDFMEMORY::NULL;
    let bc = expect_bug_check(|| WdfMemoryCreateFromLookaside(l, Some(&mut m2)));
    assert_eq!(
        bc.params[..3],
        [WDF_INVALID_HANDLE, l.raw(), fx_type::FX_TYPE_LOOKASIDE]
    );
}

#[test]
fn misuse_leak_at_unload_is_verifier_0xc4_0x62_naming_tags_and_sizes() {
    let (mut d, _) = load();
    let a = ExAllocatePoolWithTag(NonPagedPool, 100, u32::from_le_bytes(*b"Leak"));
    let b = ExAllocatePoolWithTag(PagedPool, 300, u32::from_le_bytes(*b"Leak"));
    assert!(!a.is_null() && !b.is_null());
    let l = lookaside(64, None);
    let _m = from_lookaside(l); // deleted with the driver: not a leak
    let bc = expect_bug_check(|| d.unload());
    assert_eq!(bc.code, DRIVER_VERIFIER_DETECTED_VIOLATION);
    assert_eq!(
        (bc.params[0], bc.params[3]),
        (VERIFIER_POOL_LEAK_AT_UNLOAD, 2)
    );
    assert!(
        bc.message.contains("'Leak' (Nonp): 1 block(s), 100 bytes"),
        "{}",
        bc.message
    );
    assert!(
        bc.message.contains("'Leak' (Paged): 1 block(s), 300 bytes"),
        "{}",
        bc.message
    );
}

#[test]
fn misuse_leak_report_in_record_mode() {
    let (mut d, _) = load();
    let _a = ExAllocatePoolWithTag(NonPagedPool, 100, TAG);
    let before = verifier::set_mode(VerifierMode::Record);
    let leaks = d.unload();
    verifier::set_mode(before);
    assert_eq!(leaks.len(), 1);
    assert_eq!(
        (leaks[0].tag, leaks[0].sizes.clone()),
        (PoolTag(TAG), vec![100])
    );
    assert_eq!(verifier::take_recorded().len(), 1);
}

#[test]
fn misuse_pool_double_free_and_wrong_tag_are_bad_pool_caller() {
    let (_d, _) = load();
    let p = ExAllocatePoolWithTag(NonPagedPool, 10, TAG);
    let bc = expect_bug_check(|| ExFreePoolWithTag(p, u32::from_le_bytes(*b"Othr")));
    assert_eq!(
        (bc.code, bc.params[0]),
        (BAD_POOL_CALLER, BAD_POOL_CALLER_WRONG_TAG)
    );
    ExFreePoolWithTag(p, TAG);
    let bc = expect_bug_check(|| ExFreePoolWithTag(p, TAG));
    assert_eq!(
        (bc.code, bc.params[0]),
        (BAD_POOL_CALLER, BAD_POOL_CALLER_DOUBLE_FREE)
    );
}

#[test]
fn misuse_paged_pool_at_dispatch_level_is_verifier_0xc4_0x01() {
    let (_d, _) = load();
    let _g = IrqlGuard::raise(DISPATCH_LEVEL);
    let bc = expect_bug_check(|| ExAllocatePoolWithTag(PagedPool, 10, TAG));
    assert_eq!(
        (bc.code, bc.params[0]),
        (
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            VERIFIER_PAGED_ALLOC_IRQL
        )
    );
    assert!(
        !ExAllocatePoolWithTag(NonPagedPool, 10, TAG).is_null(),
        "non-paged is fine"
    );
}

#[test]
fn dropping_a_driver_object_without_unload_deletes_its_objects() {
    let (d, driver) = load();
    let l = lookaside(64, None);
    let m = from_lookaside(l);
    drop(d);
    for h in [driver.into(), WDFOBJECT::from(l), m.into()] {
        assert!(!object_is_live(h), "{h:?} still in the handle table");
    }
}

#[test]
fn memory_create_irql_size_and_default_tag_rules() {
    let (d, _) = load();
    let mut m = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreate(None, NonPagedPool, 0, 0, Some(&mut m), None),
        STATUS_INVALID_PARAMETER,
        "size 0"
    );
    let mut buf: *mut c_void = std::ptr::null_mut();
    assert_eq!(
        WdfMemoryCreate(None, PagedPool, 0, 32, Some(&mut m), Some(&mut buf)),
        STATUS_SUCCESS
    );
    assert!(!buf.is_null());
    let tag = d.globals().unwrap().tag();
    assert_eq!(
        pool_stats(&d, tag.0, PoolKind::Paged).allocs,
        1,
        "PoolTag 0: driver tag"
    );
    WdfObjectDelete(m);
    assert_eq!(
        pool_stats(&d, tag.0, PoolKind::Paged).outstanding(),
        0,
        "freed on delete"
    );
    let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
    assert_eq!(
        WdfMemoryCreate(None, PagedPool, TAG, 32, Some(&mut m), None),
        STATUS_INVALID_DEVICE_REQUEST
    );
    assert_eq!(
        WdfMemoryCreate(None, NonPagedPool, TAG, 32, Some(&mut m), None),
        STATUS_SUCCESS
    );
    let bc = expect_bug_check(|| WdfMemoryCreate(None, NonPagedPool, TAG, 32, None, None));
    assert_eq!(bc.subcode(), WDF_REQUIRED_PARAMETER_IS_NULL);
}

#[test]
fn misuse_zero_byte_pool_allocation_is_verifier_0xc4_0x00() {
    let (_d, _) = load();
    let bc = expect_bug_check(|| ExAllocatePoolWithTag(NonPagedPool, 0, TAG));
    assert_eq!(
        (bc.code, bc.params[0]),
        (DRIVER_VERIFIER_DETECTED_VIOLATION, VERIFIER_ZERO_ALLOCATION)
    );
}
