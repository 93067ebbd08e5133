//! `AllocateDomainCommonBuffer` of 64 MiB through the WDF facade on the in-process back
//! end, with and without `DOMAIN_COMMON_BUFFER_LARGE_PAGE`: the time of the allocation
//! (physical memory from the back end, zeroed; IOVA; the page-table entries written) and,
//! printed once before the measurements, how many page-table entries each writes. The
//! free (unmap, IOTLB invalidation, memory back) is outside the timed part.
//!
//! A `memset_64MiB` baseline in the same run zeroes 64 MiB of already-mapped memory: the
//! part of the allocation no driver model can avoid.
//!
//! Run: `cargo bench -p domdma-driver-model --bench common_buffer -- --warm-up-time 1 --measurement-time 5`

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::dma::SharedBackend;
use domdma_driver_model::wdf::*;

const LENGTH: u32 = 64 << 20;

fn allocate(a: &DMA_ADAPTER, d: HANDLE, flags: u32) -> (PHYSICAL_ADDRESS, *mut c_void) {
    let mut l = PHYSICAL_ADDRESS::default();
    let mut va: *mut c_void = std::ptr::null_mut();
    let s = (a.DmaOperations.AllocateDomainCommonBuffer)(
        a, d, None, LENGTH, flags, None, 0, &mut l, &mut va,
    );
    assert!(s.is_success(), "AllocateDomainCommonBuffer: {s}");
    (l, va)
}

fn bench(c: &mut Criterion) {
    let backend: SharedBackend = Arc::new(
        InProcessBackend::new(InProcessConfig {
            phys: PhysConfig {
                nodes: 1,
                node_size: 512 << 20,
                huge_pages_per_node: 64,
                ..PhysConfig::default()
            },
            ..InProcessConfig::default()
        })
        .expect("in-process back end"),
    );
    let mut driver = DRIVER_OBJECT::new();
    let s = WdfDriverCreate(
        &mut driver,
        r"\Registry\Machine\System\CurrentControlSet\Services\bench",
        WDF_NO_OBJECT_ATTRIBUTES,
        &WDF_DRIVER_CONFIG::default(),
        None,
    );
    assert!(s.is_success());
    let mut init = Some(WDFDEVICE_INIT::new(Arc::clone(&backend)));
    let mut device = WDFDEVICE::NULL;
    assert!(WdfDeviceCreate(&mut init, None, Some(&mut device)).is_success());
    let pdo = WdfDeviceWdmGetPhysicalDevice(device).expect("hardware");
    let desc = DEVICE_DESCRIPTION {
        Version: DEVICE_DESCRIPTION_VERSION3,
        Master: true,
        DmaAddressWidth: 48,
        MaximumLength: 1 << 20,
        ..Default::default()
    };
    let mut n = 0;
    let a = IoGetDmaAdapter(Some(&pdo), &desc, &mut n).expect("adapter");
    let d = (a.DmaOperations.GetDmaDomain)(&a);
    let dom = a.core().current_domain().expect("domain");

    for (name, flags) in [
        ("4k_pages", 0),
        ("large_page", DOMAIN_COMMON_BUFFER_LARGE_PAGE),
    ] {
        let (l, va) = allocate(&a, d, flags);
        let entries = dom
            .with_buffer(l.QuadPart as u64, |b| b.entries_written)
            .expect("allocated");
        println!("{name}: 64 MiB common buffer writes {entries} page-table entries");
        (a.DmaOperations.FreeCommonBuffer)(&a, LENGTH, l, va, true);
    }

    let mut g = c.benchmark_group("allocate_domain_common_buffer_64MiB");
    g.sample_size(20);
    for (name, flags) in [
        ("4k_pages", 0),
        ("large_page", DOMAIN_COMMON_BUFFER_LARGE_PAGE),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let (l, va) = allocate(&a, d, flags);
                    total += start.elapsed();
                    black_box(va);
                    (a.DmaOperations.FreeCommonBuffer)(&a, LENGTH, l, va, true);
                }
                total
            })
        });
    }
    let mut plain = vec![1u8; LENGTH as usize];
    g.bench_function("memset_64MiB", |b| {
        b.iter(|| {
            plain.fill(0);
            black_box(plain.as_ptr());
        })
    });
    g.finish();
    (a.DmaOperations.PutDmaAdapter)(a);
    drop(driver.unload());
}

criterion_group!(benches, bench);
criterion_main!(benches);
