//! One test per behaviour rule of ../shared/DESIGN.md ("The driver model") for the memory
//! APIs, named after the rule, plus the misuse cases the verifier must catch. The DMA
//! rules (AllocateDomainCommonBuffer) are in wdf_dma_rules.rs.
//!
//! Each test runs on its own thread with its own driver (its own pool), so tests do not
//! see each other's objects or leaks.

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use domdma_driver_model::irql::{IrqlGuard, APC_LEVEL, DISPATCH_LEVEL, HIGH_LEVEL};
use domdma_driver_model::pool::{PoolKind, PoolTag};
use domdma_driver_model::status::*;
use domdma_driver_model::verifier::{self, expect_bug_check, fx_type, VerifierMode, *};
use domdma_driver_model::wdf::*;
use domdma_driver_model::WDF_DECLARE_CONTEXT_TYPE_WITH_NAME;

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

fn buffer(m: WDFMEMORY) -> (*mut u8, usize) {
    let mut size = 0;
    let p = WdfMemoryGetBuffer(m, Some(&mut size));
    (p.cast(), size)
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
fn lookaside_create_buffer_size_zero_is_invalid_parameter() {
    let (mut d, _) = load();
    let mut l = WDFLOOKASIDE::NULL;
    let s = WdfLookasideListCreate(None, 0, NonPagedPool, None, TAG, Some(&mut l));
    assert_eq!(s, STATUS_INVALID_PARAMETER);
    assert!(l.is_null());
    assert!(d.unload().is_empty());
}

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

#[test]
fn lookaside_create_default_parent_is_driver() {
    let (_d, driver) = load();
    let l = lookaside(64, None);
    assert_eq!(object_parent(l), driver.into());
}

#[test]
fn lookaside_create_preallocates_nothing() {
    let (d, _) = load();
    let l = lookaside(64, None);
    assert!(
        d.globals().unwrap().pool().leaks().is_empty(),
        "no buffer allocated at create"
    );
    let st = lookaside_stats(l).unwrap();
    assert_eq!((st.total_allocates, st.depth), (0, 0));
}

#[test]
fn lookaside_create_paged_requires_irql_at_most_apc_level() {
    let (_d, _) = load();
    let mut l = WDFLOOKASIDE::NULL;
    {
        let _apc = IrqlGuard::raise(APC_LEVEL);
        assert_eq!(
            WdfLookasideListCreate(None, 64, PagedPool, None, TAG, Some(&mut l)),
            STATUS_SUCCESS
        );
    }
    let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
    let mut l2 = WDFLOOKASIDE::NULL;
    assert_eq!(
        WdfLookasideListCreate(None, 64, PagedPool, None, TAG, Some(&mut l2)),
        STATUS_INVALID_DEVICE_REQUEST
    );
    assert!(l2.is_null());
}

#[test]
fn lookaside_create_nonpaged_requires_irql_at_most_dispatch_level() {
    let (_d, _) = load();
    let mut l = WDFLOOKASIDE::NULL;
    {
        let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
        assert_eq!(
            WdfLookasideListCreate(None, 64, NonPagedPool, None, TAG, Some(&mut l)),
            STATUS_SUCCESS
        );
    }
    let _high = IrqlGuard::raise(HIGH_LEVEL);
    assert_eq!(
        WdfLookasideListCreate(None, 64, NonPagedPool, None, TAG, Some(&mut l)),
        STATUS_INVALID_DEVICE_REQUEST
    );
}

// ---- WdfMemoryCreateFromLookaside ----

#[derive(Default)]
struct MemCtx {
    value: u32,
}
WDF_DECLARE_CONTEXT_TYPE_WITH_NAME!(MemCtx, GetMemCtx);

static CLEANUPS: AtomicU32 = AtomicU32::new(0);
fn count_cleanup(_: WDFOBJECT) {
    CLEANUPS.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn lookaside_memory_uses_memory_attributes_from_list_creation() {
    let (_d, _) = load();
    let mut attrs = WDF_OBJECT_ATTRIBUTES::init_context_type::<MemCtx>();
    attrs.EvtCleanupCallback = Some(count_cleanup);
    let l = lookaside(64, Some(&attrs));
    let m = from_lookaside(l);
    let ctx = GetMemCtx(m);
    assert!(
        !ctx.is_null(),
        "the memory object has the list's memory context type"
    );
    // SAFETY: the context lives as long as the memory object; nothing else accesses it.
    unsafe { (*ctx).value = 7 };
    let before = CLEANUPS.load(Ordering::SeqCst);
    WdfObjectDelete(m);
    assert_eq!(
        CLEANUPS.load(Ordering::SeqCst),
        before + 1,
        "the memory attributes' cleanup ran"
    );
}

#[test]
fn lookaside_memory_parent_is_memory_attributes_parent() {
    let (_d, _) = load();
    let mut req = WDFREQUEST::NULL;
    assert_eq!(
        WdfRequestCreate(None, WDFOBJECT::NULL, Some(&mut req)),
        STATUS_SUCCESS
    );
    let mut attrs = WDF_OBJECT_ATTRIBUTES::init();
    attrs.ParentObject = req.into();
    let l = lookaside(64, Some(&attrs));
    let m = from_lookaside(l);
    assert_eq!(object_parent(m), req.into());
}

#[test]
fn lookaside_memory_parent_defaults_to_driver_not_list() {
    let (_d, driver) = load();
    let l = lookaside(64, None);
    let m = from_lookaside(l);
    assert_eq!(object_parent(m), driver.into());
    assert_ne!(object_parent(m), l.into());
}

#[test]
fn lookaside_memory_holds_reference_on_list() {
    let (mut d, _) = load();
    let l = lookaside(64, None);
    let m = from_lookaside(l);
    let (p, size) = buffer(m);
    WdfObjectDelete(l);
    assert!(
        object_is_live(l),
        "the list object lives while its memory is out"
    );
    // The buffer is still usable.
    // SAFETY: the memory object is live and its buffer is `size` bytes.
    unsafe { p.write_bytes(0xAB, size) };
    WdfObjectDelete(m);
    assert!(
        !object_is_live(l),
        "the list went with its last memory object"
    );
    assert!(d.unload().is_empty(), "the list's storage was freed");
}

#[test]
fn deleting_lookaside_memory_returns_buffer_to_list() {
    let (_d, _) = load();
    let l = lookaside(64, None);
    let m = from_lookaside(l);
    let (p, _) = buffer(m);
    WdfObjectDelete(m);
    let st = lookaside_stats(l).unwrap();
    assert_eq!((st.total_allocates, st.total_frees, st.depth), (1, 1, 1));
    let m2 = from_lookaside(l);
    assert_eq!(buffer(m2).0, p, "the same buffer comes back");
    assert_eq!(lookaside_stats(l).unwrap().allocate_misses, 1);
}

#[test]
fn deleting_parent_of_lookaside_memory_returns_buffer() {
    let (_d, _) = load();
    let mut req = WDFREQUEST::NULL;
    assert_eq!(
        WdfRequestCreate(None, WDFOBJECT::NULL, Some(&mut req)),
        STATUS_SUCCESS
    );
    let mut attrs = WDF_OBJECT_ATTRIBUTES::init();
    attrs.ParentObject = req.into();
    let l = lookaside(64, Some(&attrs));
    let m1 = from_lookaside(l);
    let m2 = from_lookaside(l);
    WdfObjectDelete(req);
    assert!(!object_is_live(m1) && !object_is_live(m2));
    let st = lookaside_stats(l).unwrap();
    assert_eq!((st.total_frees, st.depth), (2, 2));
}

#[test]
fn small_lookaside_buffers_are_zeroed_on_every_allocation() {
    let (_d, _) = load();
    for pool in [NonPagedPool, PagedPool] {
        let mut l = WDFLOOKASIDE::NULL;
        assert_eq!(
            WdfLookasideListCreate(None, 100, pool, None, TAG, Some(&mut l)),
            STATUS_SUCCESS
        );
        let m = from_lookaside(l);
        let (p, size) = buffer(m);
        // SAFETY: the buffer is live and `size` bytes.
        unsafe { p.write_bytes(0xEE, size) };
        WdfObjectDelete(m);
        let m = from_lookaside(l);
        let (q, size) = buffer(m);
        assert_eq!(p, q);
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts(q, size) };
        assert!(
            bytes.iter().all(|&b| b == 0),
            "{pool:?}: recycled small buffer zeroed"
        );
    }
}

#[test]
fn page_sized_lookaside_buffers_are_not_zeroed() {
    let (_d, _) = load();
    let l = lookaside(4096, None);
    let m = from_lookaside(l);
    let (p, size) = buffer(m);
    // SAFETY: the buffer is live and `size` bytes.
    unsafe { p.write_bytes(0xEE, size) };
    WdfObjectDelete(m);
    let m = from_lookaside(l);
    let (q, size) = buffer(m);
    assert_eq!(p, q);
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts(q, size) };
    assert!(
        bytes.iter().all(|&b| b == 0xEE),
        "page-sized buffers keep their contents"
    );
}

#[test]
fn get_buffer_reports_the_requested_size() {
    let (_d, _) = load();
    let l = lookaside(100, None);
    let m = from_lookaside(l);
    assert_eq!(buffer(m).1, 100);
    let mut mc = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreate(None, NonPagedPool, TAG, 12345, Some(&mut mc), None),
        STATUS_SUCCESS
    );
    assert_eq!(buffer(mc).1, 12345);
}

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
fn preallocated_size_zero_is_invalid_parameter() {
    let (_d, _) = load();
    let mut byte = 0u8;
    let mut m = WDFMEMORY::NULL;
    // SAFETY: size 0: nothing is accessed.
    let s = unsafe {
        WdfMemoryCreatePreallocated(None, (&mut byte as *mut u8).cast(), 0, Some(&mut m))
    };
    assert_eq!(s, STATUS_INVALID_PARAMETER);
    assert!(m.is_null());
}

#[test]
fn preallocated_requires_irql_at_most_dispatch_level() {
    let (_d, _) = load();
    let mut byte = 0u8;
    let p: *mut c_void = (&mut byte as *mut u8).cast();
    let mut m = WDFMEMORY::NULL;
    {
        let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
        // SAFETY: `byte` outlives the memory object.
        let s = unsafe { WdfMemoryCreatePreallocated(None, p, 1, Some(&mut m)) };
        assert_eq!(s, STATUS_SUCCESS);
    }
    WdfObjectDelete(m);
    let _high = IrqlGuard::raise(HIGH_LEVEL);
    // SAFETY: as above.
    let s = unsafe { WdfMemoryCreatePreallocated(None, p, 1, Some(&mut m)) };
    assert_eq!(s, STATUS_INVALID_DEVICE_REQUEST);
}

#[test]
fn preallocated_buffer_is_never_freed_by_the_framework() {
    let (mut d, _) = load();
    let p = ExAllocatePoolWithTag(NonPagedPool, 256, TAG);
    assert!(!p.is_null());
    let mut req = WDFREQUEST::NULL;
    assert_eq!(
        WdfRequestCreate(None, WDFOBJECT::NULL, Some(&mut req)),
        STATUS_SUCCESS
    );
    let mut attrs = WDF_OBJECT_ATTRIBUTES::init();
    attrs.ParentObject = req.into();
    let mut m = WDFMEMORY::NULL;
    // SAFETY: `p` is a live 256-byte pool block, freed only below, after the object is gone.
    let s = unsafe { WdfMemoryCreatePreallocated(Some(&attrs), p, 256, Some(&mut m)) };
    assert_eq!(s, STATUS_SUCCESS);
    WdfObjectDelete(req);
    assert!(
        !object_is_live(m),
        "deleting the parent deleted the memory object"
    );
    assert_eq!(
        pool_stats(&d, TAG, PoolKind::NonPaged).outstanding(),
        1,
        "buffer still allocated"
    );
    ExFreePoolWithTag(p, TAG);
    assert!(d.unload().is_empty());
}

#[test]
fn assign_buffer_does_not_free_the_previous_buffer() {
    let (mut d, _) = load();
    let a = ExAllocatePoolWithTag(NonPagedPool, 64, TAG);
    let b = ExAllocatePoolWithTag(NonPagedPool, 128, TAG);
    let mut m = WDFMEMORY::NULL;
    // SAFETY: both blocks outlive the memory object (freed after it is deleted).
    let s = unsafe { WdfMemoryCreatePreallocated(None, a, 64, Some(&mut m)) };
    assert_eq!(s, STATUS_SUCCESS);
    // SAFETY: as above.
    let s = unsafe { WdfMemoryAssignBuffer(m, b, 128) };
    assert_eq!(s, STATUS_SUCCESS);
    assert_eq!(
        buffer(m),
        (b.cast(), 128),
        "the object now describes the new buffer"
    );
    assert_eq!(
        pool_stats(&d, TAG, PoolKind::NonPaged).outstanding(),
        2,
        "old buffer not freed"
    );
    WdfObjectDelete(m);
    assert_eq!(
        pool_stats(&d, TAG, PoolKind::NonPaged).outstanding(),
        2,
        "delete frees neither"
    );
    ExFreePoolWithTag(a, TAG);
    ExFreePoolWithTag(b, TAG);
    assert!(d.unload().is_empty());
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

/// `WdfMemoryCopyToBuffer` into `buf` (at most `buf.len()` bytes).
fn copy_to(m: WDFMEMORY, offset: usize, buf: &mut [u8], n: usize) -> NTSTATUS {
    assert!(n <= buf.len());
    let dst: *mut c_void = buf.as_mut_ptr().cast();
    // SAFETY: `dst` is valid for `n` bytes of writes and is not the memory's buffer.
    unsafe { WdfMemoryCopyToBuffer(m, offset, dst, n) }
}

/// `WdfMemoryCopyFromBuffer` from `buf` (at most `buf.len()` bytes).
fn copy_from(m: WDFMEMORY, offset: usize, buf: &[u8], n: usize) -> NTSTATUS {
    assert!(n <= buf.len());
    let src: *const c_void = buf.as_ptr().cast();
    // SAFETY: `src` is valid for `n` bytes of reads and is not the memory's buffer.
    unsafe { WdfMemoryCopyFromBuffer(m, offset, src, n) }
}

#[test]
fn copy_length_zero_is_invalid_parameter() {
    let (_d, _) = load();
    let m = memory_of(16);
    let mut buf = [0u8; 16];
    assert_eq!(copy_to(m, 0, &mut buf, 0), STATUS_INVALID_PARAMETER);
    assert_eq!(copy_from(m, 0, &buf, 0), STATUS_INVALID_PARAMETER);
}

#[test]
fn copy_to_buffer_beyond_the_memory_is_buffer_too_small() {
    let (_d, _) = load();
    let m = memory_of(16);
    let mut buf = [0u8; 32];
    assert_eq!(copy_to(m, 0, &mut buf, 17), STATUS_BUFFER_TOO_SMALL);
    assert_eq!(copy_to(m, 8, &mut buf, 9), STATUS_BUFFER_TOO_SMALL);
    assert_eq!(copy_to(m, 16, &mut buf, 1), STATUS_BUFFER_TOO_SMALL);
    assert_eq!(copy_to(m, 8, &mut buf, 8), STATUS_SUCCESS);
}

#[test]
fn copy_from_buffer_beyond_the_memory_is_invalid_buffer_size() {
    let (_d, _) = load();
    let m = memory_of(16);
    let src: Vec<u8> = (0..32).collect();
    assert_eq!(copy_from(m, 0, &src, 17), STATUS_INVALID_BUFFER_SIZE);
    assert_eq!(copy_from(m, 8, &src, 9), STATUS_INVALID_BUFFER_SIZE);
    assert_eq!(copy_from(m, 16, &src, 1), STATUS_INVALID_BUFFER_SIZE);
    assert_eq!(copy_from(m, 8, &src, 8), STATUS_SUCCESS);
    let mut out = [0u8; 16];
    assert_eq!(copy_to(m, 0, &mut out, 16), STATUS_SUCCESS);
    assert_eq!(&out[8..], &src[..8]);
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

static ORDER: Mutex<Vec<(char, u64)>> = Mutex::new(Vec::new());
fn cleanup_log(o: WDFOBJECT) {
    ORDER.lock().unwrap().push(('c', o.raw()));
}
fn destroy_log(o: WDFOBJECT) {
    ORDER.lock().unwrap().push(('d', o.raw()));
}

#[test]
fn delete_cleans_up_children_first_and_destroys_after_the_last_reference() {
    let (_d, _) = load();
    let mut attrs = WDF_OBJECT_ATTRIBUTES::init();
    attrs.EvtCleanupCallback = Some(cleanup_log);
    attrs.EvtDestroyCallback = Some(destroy_log);
    let mut parent = WDFREQUEST::NULL;
    assert_eq!(
        WdfRequestCreate(Some(&attrs), WDFOBJECT::NULL, Some(&mut parent)),
        STATUS_SUCCESS
    );
    let mut child_attrs = attrs;
    child_attrs.ParentObject = parent.into();
    let mut child = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreate(
            Some(&child_attrs),
            NonPagedPool,
            TAG,
            8,
            Some(&mut child),
            None
        ),
        STATUS_SUCCESS
    );
    WdfObjectReference(parent);
    ORDER.lock().unwrap().retain(|_| false);
    WdfObjectDelete(parent);
    let log: Vec<(char, u64)> = std::mem::take(&mut *ORDER.lock().unwrap())
        .into_iter()
        .filter(|(_, h)| *h == parent.raw() || *h == child.raw())
        .collect();
    assert_eq!(
        log,
        [('c', child.raw()), ('c', parent.raw()), ('d', child.raw())],
        "children cleaned up first; the referenced parent is not destroyed yet"
    );
    assert!(object_is_live(parent));
    WdfObjectDereference(parent);
    assert!(!object_is_live(parent));
    let log = std::mem::take(&mut *ORDER.lock().unwrap());
    assert!(log.contains(&('d', parent.raw())));
}

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
fn misuse_paged_lookaside_at_dispatch_level_is_invalid_device_request() {
    let (_d, _) = load();
    let _g = IrqlGuard::raise(DISPATCH_LEVEL);
    let mut l = WDFLOOKASIDE::NULL;
    assert_eq!(
        WdfLookasideListCreate(None, 64, PagedPool, None, TAG, Some(&mut l)),
        STATUS_INVALID_DEVICE_REQUEST
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
fn create_from_lookaside_paged_requires_apc_level_nonpaged_dispatch_level() {
    let (_d, _) = load();
    let mut paged = WDFLOOKASIDE::NULL;
    assert_eq!(
        WdfLookasideListCreate(None, 64, PagedPool, None, TAG, Some(&mut paged)),
        STATUS_SUCCESS
    );
    let nonpaged = lookaside(64, None);
    let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
    let mut m = WDFMEMORY::NULL;
    assert_eq!(
        WdfMemoryCreateFromLookaside(paged, Some(&mut m)),
        STATUS_INVALID_DEVICE_REQUEST
    );
    assert!(m.is_null());
    assert_eq!(
        WdfMemoryCreateFromLookaside(nonpaged, Some(&mut m)),
        STATUS_SUCCESS
    );
    WdfObjectDelete(m);
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
