//! The DMA calls' misuse cases, which only the facade can check (bug checks and verifier
//! reports: FreeCommonBuffer mismatches, leaving a domain or putting an adapter with live
//! buffers, IRQL), on the in-process back end. The documented behaviour of
//! AllocateDomainCommonBuffer and the DMA-domain calls is the conformance suite's
//! (testkit/src/conformance/wdf_dma.rs), run on every back end.

#![allow(non_snake_case)]

use std::sync::Arc;

use domdma_device::core::DeviceConfig;
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::iopt::PageSize;
use domdma_driver_model::irql::{IrqlGuard, DISPATCH_LEVEL};
use domdma_driver_model::status::*;
use domdma_driver_model::verifier::*;
use domdma_driver_model::wdf::*;
use domdma_testkit::wdf::{free, try_alloc, Cb, Driver};

const MIB: u32 = 1 << 20;

/// `AllocateDomainCommonBuffer` on any node, which must succeed.
fn alloc(a: &DMA_ADAPTER, d: HANDLE, len: u32, flags: u32) -> Cb {
    domdma_testkit::wdf::alloc(a, d, len, flags, MM_ANY_NODE_OK).unwrap_or_else(|e| panic!("{e}"))
}

fn backend_with(device: DeviceConfig, huge_pages_per_node: u32) -> SharedBackend {
    let cfg = InProcessConfig {
        device,
        phys: PhysConfig {
            huge_pages_per_node,
            ..PhysConfig::default()
        },
    };
    Arc::new(InProcessBackend::new(cfg).expect("in-process back end"))
}

fn backend() -> SharedBackend {
    backend_with(DeviceConfig::default(), 16)
}

/// A fixture, an adapter of `width` bits and its domain.
fn setup(width: u32) -> (Driver, PDMA_ADAPTER, HANDLE) {
    let f = Driver::load(backend()).expect("driver");
    let a = f.adapter(width).expect("adapter");
    let d = (a.DmaOperations.GetDmaDomain)(&a);
    assert!(!d.is_null());
    (f, a, d)
}

#[test]
fn allocate_domain_common_buffer_is_passive_level_only() {
    let (_f, a, d) = setup(48);
    let _g = IrqlGuard::raise(DISPATCH_LEVEL);
    let bc = expect_bug_check(|| try_alloc(&a, d, None, 4096, 0, None, MM_ANY_NODE_OK));
    assert_eq!(
        (bc.code, bc.params[0]),
        (DRIVER_VERIFIER_DMA_VIOLATION, 0x13)
    );
    assert_eq!(bc.params[2..], [0, u64::from(DISPATCH_LEVEL)]);
}

#[test]
fn large_page_fits_where_freed_small_buffers_were() {
    let (_f, a, d) = setup(48);
    let small = alloc(&a, d, 4 * MIB, 0);
    free(&a, small);
    let large = alloc(&a, d, 4 * MIB, DOMAIN_COMMON_BUFFER_LARGE_PAGE);
    assert_eq!(
        large.logical, small.logical,
        "the freed IOVA range is reused"
    );
    let dom = a.core().current_domain().unwrap();
    assert_eq!(dom.translate(large.logical).unwrap().page, PageSize::Size2M);
}

#[test]
fn free_common_buffer_must_match_the_allocation_exactly() {
    let (_f, a, d) = setup(48);
    let cb = alloc(&a, d, 8192, 0);
    let wrong = [
        (cb.len - 1, cb.logical, cb.va, true),
        (cb.len, cb.logical + 4096, cb.va, true),
        (
            cb.len,
            cb.logical,
            cb.va.cast::<u8>().wrapping_add(8).cast(),
            true,
        ),
        (cb.len, cb.logical, cb.va, false),
    ];
    for (len, logical, va, cached) in wrong {
        let bc = expect_bug_check(|| {
            (a.DmaOperations.FreeCommonBuffer)(&a, len, PHYSICAL_ADDRESS::new(logical), va, cached)
        });
        assert_eq!(
            (bc.code, bc.params[0]),
            (
                DRIVER_VERIFIER_DMA_VIOLATION,
                DMA_VIOLATION_EXTRA_COMMON_BUFFER_FREE
            )
        );
    }
    let dom = a.core().current_domain().unwrap();
    assert_eq!(dom.buffer_count(), 1, "a mismatched free frees nothing");
    free(&a, cb);
    assert_eq!(dom.buffer_count(), 0);
    assert!(dom.translate(cb.logical).is_none(), "unmapped");
    let bc = expect_bug_check(|| free(&a, cb));
    assert_eq!(
        bc.params[0], DMA_VIOLATION_EXTRA_COMMON_BUFFER_FREE,
        "double free"
    );
}

/// The adapter is one of the parameters that must match: another adapter of the same domain
/// freeing the buffer with its exact length, addresses and cache flag is 0xE6 / 0x03 and
/// frees nothing (found by the `wdf` fuzz target; the seed
/// fuzz/corpus/wdf/free-common-buffer-by-another-adapter replays it).
#[test]
fn free_common_buffer_through_another_adapter_of_the_domain_frees_nothing() {
    let (f, a, d) = setup(48);
    let b = f.adapter(48).expect("adapter");
    assert_eq!((b.DmaOperations.JoinDmaDomain)(&b, d), STATUS_SUCCESS);
    let cb = alloc(&a, d, 8192, 0);
    let bc = expect_bug_check(|| free(&b, cb));
    assert_eq!(
        (bc.code, bc.params[0]),
        (
            DRIVER_VERIFIER_DMA_VIOLATION,
            DMA_VIOLATION_EXTRA_COMMON_BUFFER_FREE
        )
    );
    let dom = a.core().current_domain().unwrap();
    assert_eq!(
        a.core().buffer_count(),
        1,
        "the owner's buffer is still there"
    );
    assert!(dom.translate(cb.logical).is_some(), "and still mapped");
    free(&a, cb);
    assert_eq!(dom.buffer_count(), 0);
    assert_eq!((b.DmaOperations.LeaveDmaDomain)(&b), STATUS_SUCCESS);
}

#[test]
fn leaving_a_domain_with_live_buffers_is_a_verifier_error() {
    let (f, a, d) = setup(48);
    let b = f.adapter(48).expect("adapter");
    assert_eq!((b.DmaOperations.JoinDmaDomain)(&b, d), STATUS_SUCCESS);
    let y = alloc(&b, d, 4096, 0);
    let bc = expect_bug_check(|| (b.DmaOperations.LeaveDmaDomain)(&b));
    assert_eq!(
        (bc.code, bc.params[0], bc.params[2]),
        (
            DRIVER_VERIFIER_DMA_VIOLATION,
            DMA_VIOLATION_COMMON_BUFFERS_OUTSTANDING,
            1
        )
    );
    // Record mode: the call fails and the adapter stays.
    let before = set_mode(VerifierMode::Record);
    let s = (b.DmaOperations.LeaveDmaDomain)(&b);
    set_mode(before);
    assert_eq!(s, STATUS_INVALID_DEVICE_STATE);
    assert_eq!(take_recorded().len(), 1);
    assert!(b.core().current_domain().is_some());
    free(&b, y);
    assert_eq!((b.DmaOperations.LeaveDmaDomain)(&b), STATUS_SUCCESS);
    // A buffer another adapter allocated does not keep `b` in.
    let _x = alloc(&a, d, 4096, 0);
    assert_eq!((b.DmaOperations.JoinDmaDomain)(&b, d), STATUS_SUCCESS);
    assert_eq!((b.DmaOperations.LeaveDmaDomain)(&b), STATUS_SUCCESS);
}

#[test]
fn put_dma_adapter_with_buffers_is_verifier_0xe6_0x07() {
    let (_f, a, d) = setup(48);
    let _cb = alloc(&a, d, 4096, 0);
    let bc = expect_bug_check(|| (a.DmaOperations.PutDmaAdapter)(Arc::clone(&a)));
    assert_eq!(bc.params[0], DMA_VIOLATION_COMMON_BUFFERS_OUTSTANDING);
}
