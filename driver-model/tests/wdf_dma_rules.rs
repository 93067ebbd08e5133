//! One test per DMA behaviour rule of ../shared/DESIGN.md ("AllocateDomainCommonBuffer",
//! domains, FreeCommonBuffer), on the in-process back end (the device core linked in),
//! named after the rule, plus the DMA misuse cases.

#![allow(non_snake_case)]

mod wdf_support;

use std::sync::Arc;

use domdma_device::core::DeviceConfig;
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::dma::{SharedBackend, IOVA_BASE};
use domdma_driver_model::iopt::PageSize;
use domdma_driver_model::irql::{IrqlGuard, DISPATCH_LEVEL};
use domdma_driver_model::status::*;
use domdma_driver_model::verifier::*;
use domdma_driver_model::wdf::*;
use wdf_support::*;

const MIB: u32 = 1 << 20;

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
fn setup(width: u32) -> (Fixture, PDMA_ADAPTER, HANDLE) {
    let f = Fixture::new(backend());
    let a = f.adapter(width);
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
fn maximum_address_null_means_no_limit_but_the_address_width() {
    let (_f, a, d) = setup(48);
    let cb = alloc(&a, d, 8192, 0);
    assert!(cb.logical >= IOVA_BASE && cb.logical + 8192 <= 1 << 48);
}

#[test]
fn maximum_address_is_the_inclusive_last_logical_byte() {
    let (_f, a, d) = setup(48);
    // The first buffer would go at IOVA_BASE: a limit one byte short refuses it...
    let (s, _) = try_alloc(
        &a,
        d,
        Some(IOVA_BASE + 0x2000 - 2),
        0x2000,
        0,
        None,
        MM_ANY_NODE_OK,
    );
    assert_eq!(s, STATUS_INSUFFICIENT_RESOURCES);
    // ...and the inclusive last byte accepts it.
    let (s, cb) = try_alloc(
        &a,
        d,
        Some(IOVA_BASE + 0x2000 - 1),
        0x2000,
        0,
        None,
        MM_ANY_NODE_OK,
    );
    assert_eq!(s, STATUS_SUCCESS);
    assert_eq!(cb.logical, IOVA_BASE);
    // A limit above IOVA_BASE + 0x2000 puts the next buffer just after it.
    let (s, cb2) = try_alloc(
        &a,
        d,
        Some(IOVA_BASE + 0x4000 - 1),
        0x2000,
        0,
        None,
        MM_ANY_NODE_OK,
    );
    assert_eq!(s, STATUS_SUCCESS);
    assert!(cb2.logical + 0x2000 <= IOVA_BASE + 0x4000);
}

#[test]
fn maximum_address_is_capped_by_the_adapter_address_width() {
    // A 24-bit adapter reaches 16 MiB: above IOVA_BASE there is room for 14 MiB.
    let (_f, a, d) = setup(24);
    let huge_limit = Some(1u64 << 40);
    let (s, cb) = try_alloc(&a, d, huge_limit, 8 * MIB, 0, None, MM_ANY_NODE_OK);
    assert_eq!(s, STATUS_SUCCESS);
    assert!(cb.logical + u64::from(8 * MIB) <= 1 << 24);
    let (s, _) = try_alloc(&a, d, huge_limit, 8 * MIB, 0, None, MM_ANY_NODE_OK);
    assert_eq!(
        s, STATUS_INSUFFICIENT_RESOURCES,
        "MaximumAddress does not lift the width"
    );
}

#[test]
fn adapter_width_is_capped_by_the_device_iova_width() {
    let f = Fixture::new(backend_with(
        DeviceConfig {
            iova_width: 32,
            ..DeviceConfig::default()
        },
        4,
    ));
    let a = f.adapter(64);
    let mut info = DMA_ADAPTER_INFO {
        Version: DMA_ADAPTER_INFO_VERSION1,
        ..Default::default()
    };
    assert_eq!(
        (a.DmaOperations.GetDmaAdapterInfo)(&a, &mut info),
        STATUS_SUCCESS
    );
    assert_eq!(info.V1.DmaAddressWidth, 32);
    assert_eq!(info.DomDma.DeviceIovaWidth, 32);
    let d = (a.DmaOperations.GetDmaDomain)(&a);
    let cb = alloc(&a, d, 4096, 0);
    assert!(cb.logical < 1 << 32);
}

#[test]
fn get_dma_adapter_info_reports_the_device_capabilities() {
    let (_f, a, _) = setup(48);
    let mut info = DMA_ADAPTER_INFO {
        Version: DMA_ADAPTER_INFO_VERSION1,
        ..Default::default()
    };
    assert_eq!(
        (a.DmaOperations.GetDmaAdapterInfo)(&a, &mut info),
        STATUS_SUCCESS
    );
    assert_eq!(info.V1.DmaAddressWidth, 48);
    assert_eq!(info.V1.ReadDmaCounterAvailable, 0);
    assert_eq!(
        info.DomDma.SupportedPageSizes,
        (4 << 10) | (2 << 20) | (1 << 30)
    );
    let mut bad = DMA_ADAPTER_INFO {
        Version: 2,
        ..Default::default()
    };
    assert_eq!(
        (a.DmaOperations.GetDmaAdapterInfo)(&a, &mut bad),
        STATUS_NOT_SUPPORTED
    );
}

#[test]
fn length_zero_is_invalid_parameter() {
    let (_f, a, d) = setup(48);
    let (s, _) = try_alloc(&a, d, None, 0, 0, None, MM_ANY_NODE_OK);
    assert_eq!(s, STATUS_INVALID_PARAMETER);
}

#[test]
fn large_page_rounds_to_2m_in_logical_and_physical_address_with_2m_leaves() {
    let (_f, a, d) = setup(48);
    // Misalign the IOVA space first with a small buffer.
    let _small = alloc(&a, d, 4096, 0);
    let cb = alloc(&a, d, 3 * MIB, DOMAIN_COMMON_BUFFER_LARGE_PAGE);
    assert_eq!(cb.logical % (2 << 20), 0, "logical 2 MiB aligned");
    assert_eq!(cb.va as usize % 4096, 0);
    let dom = a.core().current_domain().unwrap();
    let (mapped, physical) = dom
        .with_buffer(cb.logical, |b| (b.mapped, b.physical()))
        .unwrap();
    assert_eq!(mapped, 4 << 20, "length rounded up to 2 MiB");
    assert_eq!(physical % (2 << 20), 0, "physical 2 MiB aligned");
    for off in [0, 2 << 20] {
        let m = dom.translate(cb.logical + off).unwrap();
        assert_eq!(
            (m.page, m.bus),
            (PageSize::Size2M, physical + off),
            "2 MiB leaf"
        );
    }
    assert!(
        dom.translate(cb.logical + (4 << 20)).is_none(),
        "nothing mapped past it"
    );
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
fn small_pages_map_with_4k_leaves() {
    let (_f, a, d) = setup(48);
    let cb = alloc(&a, d, 10_000, 0);
    let dom = a.core().current_domain().unwrap();
    let m = dom.translate(cb.logical + 8192).unwrap();
    assert_eq!(m.page, PageSize::Size4K);
    assert!(
        dom.translate(cb.logical + 12288).is_none(),
        "rounded to 4 KiB, no further"
    );
}

#[test]
fn large_page_unavailable_fails_instead_of_falling_back() {
    let f = Fixture::new(backend_with(DeviceConfig::default(), 0));
    let a = f.adapter(48);
    let d = (a.DmaOperations.GetDmaDomain)(&a);
    let (s, cb) = try_alloc(
        &a,
        d,
        None,
        2 * MIB,
        DOMAIN_COMMON_BUFFER_LARGE_PAGE,
        None,
        0,
    );
    assert_eq!(s, STATUS_INSUFFICIENT_RESOURCES);
    assert!(cb.va.is_null());
    assert_eq!(
        a.core().current_domain().unwrap().buffer_count(),
        0,
        "no fallback buffer"
    );
    // Without the flag the same length works.
    let (s, _) = try_alloc(&a, d, None, 2 * MIB, 0, None, 0);
    assert_eq!(s, STATUS_SUCCESS);
}

#[test]
fn unknown_flags_are_invalid_parameter() {
    let (_f, a, d) = setup(48);
    for flags in [2, 0x8000_0000, DOMAIN_COMMON_BUFFER_LARGE_PAGE | 4] {
        let (s, _) = try_alloc(&a, d, None, 4096, flags, None, MM_ANY_NODE_OK);
        assert_eq!(s, STATUS_INVALID_PARAMETER, "flags {flags:#x}");
    }
}

#[test]
fn cache_type_is_cached_non_cached_or_null() {
    let (_f, a, d) = setup(48);
    for bad in [
        MmWriteCombined,
        MmHardwareCoherentCached,
        MEMORY_CACHING_TYPE(-1),
    ] {
        let (s, _) = try_alloc(&a, d, None, 4096, 0, Some(bad), MM_ANY_NODE_OK);
        assert_eq!(s, STATUS_INVALID_PARAMETER, "{bad:?}");
    }
    let (s, nc) = try_alloc(&a, d, None, 4096, 0, Some(MmNonCached), MM_ANY_NODE_OK);
    assert_eq!(s, STATUS_SUCCESS);
    let (s, c) = try_alloc(&a, d, None, 4096, 0, Some(MmCached), MM_ANY_NODE_OK);
    assert_eq!(s, STATUS_SUCCESS);
    let (s, _) = try_alloc(&a, d, None, 4096, 0, None, MM_ANY_NODE_OK);
    assert_eq!(s, STATUS_SUCCESS);
    // A non-cached buffer is freed with CacheEnabled FALSE.
    (a.DmaOperations.FreeCommonBuffer)(&a, nc.len, PHYSICAL_ADDRESS::new(nc.logical), nc.va, false);
    free(&a, c);
}

#[test]
fn preferred_node_is_in_range_or_any_node() {
    let (_f, a, d) = setup(48);
    let dom = a.core().current_domain().unwrap();
    for node in [0u32, 1] {
        let (s, cb) = try_alloc(
            &a,
            d,
            None,
            2 * MIB,
            DOMAIN_COMMON_BUFFER_LARGE_PAGE,
            None,
            node,
        );
        assert_eq!(s, STATUS_SUCCESS);
        assert_eq!(
            dom.with_buffer(cb.logical, |b| b.node()).unwrap(),
            Some(node)
        );
    }
    let (s, _) = try_alloc(&a, d, None, 4096, 0, None, MM_ANY_NODE_OK);
    assert_eq!(s, STATUS_SUCCESS);
    let (s, _) = try_alloc(&a, d, None, 4096, 0, None, 2);
    assert_eq!(
        s, STATUS_INVALID_PARAMETER,
        "2 nodes: node 2 is out of range"
    );
}

#[test]
fn returns_the_logical_and_the_virtual_address() {
    let (_f, a, d) = setup(48);
    let cb = alloc(&a, d, 4096, 0);
    assert!(!cb.va.is_null());
    let dom = a.core().current_domain().unwrap();
    let physical = dom.with_buffer(cb.logical, |b| b.physical()).unwrap();
    assert_eq!(dom.translate(cb.logical).unwrap().bus, physical);
    // The virtual address is the memory the device reaches.
    let buf = dom
        .with_buffer(cb.logical, |b| b.virtual_address())
        .unwrap();
    assert_eq!(buf.as_ptr().cast(), cb.va);
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

#[test]
fn adapters_joined_to_one_domain_share_its_iova_space() {
    let (f, a, d) = setup(48);
    let b = f.adapter(48);
    assert_eq!((b.DmaOperations.JoinDmaDomain)(&b, d), STATUS_SUCCESS);
    let x = alloc(&a, d, 8192, 0);
    let y = alloc(&b, d, 8192, 0);
    assert!(
        x.logical + 8192 <= y.logical || y.logical + 8192 <= x.logical,
        "no overlap"
    );
    let (da, db) = (
        a.core().current_domain().unwrap(),
        b.core().current_domain().unwrap(),
    );
    assert!(Arc::ptr_eq(&da, &db));
    assert_eq!(da.members(), 2);
    // Each sees the other's mapping: one page table.
    assert!(da.translate(y.logical).is_some());
    free(&b, y);
    assert_eq!((b.DmaOperations.LeaveDmaDomain)(&b), STATUS_SUCCESS);
    assert_eq!(da.members(), 1);
}

#[test]
fn join_of_an_unknown_domain_is_invalid_parameter() {
    let (_f, a, _d) = setup(48);
    assert_eq!(
        (a.DmaOperations.JoinDmaDomain)(&a, HANDLE(0xdead)),
        STATUS_INVALID_PARAMETER
    );
}

#[test]
fn leaving_a_domain_with_live_buffers_is_a_verifier_error() {
    let (f, a, d) = setup(48);
    let b = f.adapter(48);
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

#[test]
fn io_get_dma_adapter_refuses_bad_descriptions() {
    let f = Fixture::new(backend());
    let mut n = 0;
    for desc in [
        DEVICE_DESCRIPTION {
            Version: DEVICE_DESCRIPTION_VERSION3,
            Master: false,
            DmaAddressWidth: 48,
            ..Default::default()
        },
        DEVICE_DESCRIPTION {
            Version: DEVICE_DESCRIPTION_VERSION3,
            Master: true,
            DmaAddressWidth: 0,
            ..Default::default()
        },
        DEVICE_DESCRIPTION {
            Version: 4,
            Master: true,
            DmaAddressWidth: 48,
            ..Default::default()
        },
    ] {
        assert!(
            IoGetDmaAdapter(Some(&f.pdo), &desc, &mut n).is_none(),
            "{desc:?}"
        );
    }
    let v2 = DEVICE_DESCRIPTION {
        Version: DEVICE_DESCRIPTION_VERSION2,
        Master: true,
        Dma64BitAddresses: true,
        ..Default::default()
    };
    let a = IoGetDmaAdapter(Some(&f.pdo), &v2, &mut n).unwrap();
    assert!(
        (a.DmaOperations.GetDmaDomain)(&a).is_null(),
        "no v3 operations"
    );
}

#[test]
fn no_free_device_domain_gives_a_null_domain_handle() {
    let f = Fixture::new(backend_with(
        DeviceConfig {
            domains: 2,
            ..DeviceConfig::default()
        },
        4,
    ));
    let a = f.adapter(48);
    let b = f.adapter(48);
    assert!(!(a.DmaOperations.GetDmaDomain)(&a).is_null());
    assert!(
        (b.DmaOperations.GetDmaDomain)(&b).is_null(),
        "one translated domain only"
    );
}
