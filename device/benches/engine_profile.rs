//! Engine COPY profile: the device driven through registers (descriptor, doorbell, spin on
//! the completion status) beside a plain memcpy of the same buffers in the same run, for
//! the IOTLB sizes that matter (64 entries, in which a 4 KiB mapped transfer of more than
//! ~128 KiB misses on every page, and the default, `DEFAULT_IOTLB_ENTRIES` = 1024, in which
//! the pages of a 1 MiB copy stay cached), the sizes around the targets (256 KiB and up), and
//! a 4 KiB mapping whose pages are scattered in bus memory (no two consecutive IOVA pages
//! contiguous).
//!
//! The waiter busy-polls the completion record (`Driver::wait_spin`, `spin_loop` hints, no
//! sleeps or yields): on a 2-core machine it owns one core and the queue's worker the other.
//!
//! A `translate` group measures the translations of a 1 MiB copy on 4 KiB pages alone (256
//! source and 256 destination pages, alternating, as the engine asks for them): one
//! `Mmu::translate` each, or one `Mmu::translator` for all, with no IOTLB (`iotlb0`: every
//! page walks, nothing is cached: the page walk alone), the IOTLB too small (every page
//! misses, walks and fills) or large enough (every page hits), and with a
//! 2 MiB memcpy between rounds (as the engine's copy evicts the IOTLB from the caches;
//! `pollute_only` is that memcpy alone, to subtract).
//!
//! A last group compares `VolatileSlice::copy_to_volatile_slice` (what the engine uses)
//! with `ptr::copy_nonoverlapping` for 1 MiB copied in pieces of 4 KiB, 64 KiB and 1 MiB.
//!
//! Run: `cargo bench -p domdma-device --bench engine_profile -- --warm-up-time 1
//! --measurement-time 3` (a filter such as `iotlb64` or `volatile` selects a part).

mod common;

use std::hint::black_box;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use domdma_device::core::bus::Access;
use domdma_device::core::mmu::{DomainRegs, Mmu};
use domdma_device::core::DeviceConfig;
use domdma_device::spec::*;
use domdma_testkit::core_driver::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, VolatileSlice};

/// Domain (and queue) with 4 KiB mappings whose pages are scattered in bus memory.
const DOM_SCATTER: u32 = 3;

/// Page `i` of `n` in a fixed permutation in which no two consecutive indices are
/// neighbours (`i * 7 mod n` for `n` a power of two >= 16).
fn scatter(i: u64, n: u64) -> u64 {
    (i * 7) % n
}

fn copy_profile(c: &mut Criterion, iotlb_entries: u32) {
    let mut d = Driver::with_config(DeviceConfig {
        iotlb_entries,
        ..DeviceConfig::default()
    });
    let src = d.bus.alloc(MAX, PAGE_2M);
    let dst = d.bus.alloc(MAX, PAGE_2M);
    d.bus.write(src, &pattern(1, MAX as usize));
    for (dom, page) in [(DOM_4K, PAGE_4K), (DOM_2M, PAGE_2M)] {
        d.translated_domain(dom);
        d.map(dom, SRC, src, MAX, page, PTE_R);
        d.map(dom, DST, dst, MAX, page, RW);
    }
    // The scattered domain maps IOVA page i to buffer page scatter(i): the same bytes in
    // another order, so a full copy is still checkable page by page.
    let pages = MAX / PAGE_4K;
    d.translated_domain(DOM_SCATTER);
    let pt = d.pt(DOM_SCATTER);
    let sp: Vec<u64> = (0..pages)
        .map(|i| src + scatter(i, pages) * PAGE_4K)
        .collect();
    let dp: Vec<u64> = (0..pages)
        .map(|i| dst + scatter(i, pages) * PAGE_4K)
        .collect();
    pt.map_pages(&mut d.bus, SRC, &sp, PAGE_4K, PTE_R);
    pt.map_pages(&mut d.bus, DST, &dp, PAGE_4K, RW);
    for dom in [DOM_4K, DOM_2M, DOM_SCATTER] {
        d.setup_queue(dom, dom, 64);
        // Check the set-up once: a full copy lands.
        d.bus.fill(dst, MAX, 0);
        engine_copy(&mut d, dom, MAX);
        assert!(d.bus.read(dst, MAX as usize) == d.bus.read(src, MAX as usize));
    }
    let (from, to) = (d.bus.host_ptr(src), d.bus.host_ptr(dst));

    // The fixed cost of one descriptor: doorbell, worker pick-up, fetch, completion record,
    // the waiter seeing it.
    let mut group = c.benchmark_group(format!("latency_iotlb{iotlb_entries}"));
    group.bench_function("copy_64B_2m", |b| {
        b.iter(|| engine_copy(&mut d, DOM_2M, 64))
    });
    group.finish();

    let mut group = c.benchmark_group(format!("iotlb{iotlb_entries}"));
    for size in SIZES {
        group.throughput(Throughput::Bytes(size));
        group.bench_with_input(BenchmarkId::new("memcpy", label(size)), &size, |b, &n| {
            // SAFETY: `from` and `to` point at two disjoint MAX-byte ranges of the bus
            // memory mapping, which lives as long as `d`; no queue runs meanwhile.
            unsafe { bench_memcpy(b, from, to, n, 1) }
        });
        for (name, q) in [
            ("engine_4k", DOM_4K),
            ("engine_2m", DOM_2M),
            ("engine_4k_scattered", DOM_SCATTER),
        ] {
            group.bench_with_input(BenchmarkId::new(name, label(size)), &size, |b, &n| {
                b.iter(|| engine_copy(&mut d, q, n))
            });
        }
    }
    group.finish();
}

/// A small IOTLB: every page of a 4 KiB-mapped transfer of more than ~128 KiB misses.
const SMALL_IOTLB: u32 = 64;

fn copy_iotlb_small(c: &mut Criterion) {
    copy_profile(c, SMALL_IOTLB);
}

fn copy_iotlb_default(c: &mut Criterion) {
    copy_profile(c, DEFAULT_IOTLB_ENTRIES);
}

/// `copy_to_volatile_slice` against `copy_nonoverlapping`, 1 MiB in pieces.
fn volatile_copy(c: &mut Criterion) {
    const TOTAL: usize = 1 << 20;
    let mut a = vec![1u8; TOTAL];
    let mut b = vec![0u8; TOTAL];
    let mut group = c.benchmark_group("volatile");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    for piece in [4usize << 10, 64 << 10, 1 << 20] {
        let (pa, pb) = (a.as_mut_ptr(), b.as_mut_ptr());
        group.bench_function(BenchmarkId::new("copy_to_volatile_slice", piece), |bench| {
            bench.iter(|| {
                for off in (0..TOTAL).step_by(piece) {
                    let (at_a, at_b) = (pa.wrapping_add(off), pb.wrapping_add(off));
                    // SAFETY: `a` and `b` are distinct live Vecs of TOTAL bytes and `off +
                    // piece <= TOTAL`; no reference to them is used while the slices live.
                    let from = unsafe { VolatileSlice::new(at_a, piece) };
                    // SAFETY: as for `from`.
                    let to = unsafe { VolatileSlice::new(at_b, piece) };
                    from.copy_to_volatile_slice(to);
                }
                black_box(pb);
            })
        });
        group.bench_function(BenchmarkId::new("copy_nonoverlapping", piece), |bench| {
            bench.iter(|| {
                for off in (0..TOTAL).step_by(piece) {
                    let (at_a, at_b) = (pa.wrapping_add(off), pb.wrapping_add(off));
                    // SAFETY: `piece` bytes at `at_a` and at `at_b` lie in the distinct live
                    // Vecs `a` and `b` (`off + piece <= TOTAL`), used through nothing else.
                    unsafe { std::ptr::copy_nonoverlapping(at_a, at_b, piece) };
                }
                black_box(pb);
            })
        });
    }
    group.finish();
}

/// Page tables in a small bus memory mapping 1 MiB at [`SRC`] and at [`DST`] with 4 KiB
/// pages (tables from 0x10_0000, data pages from 0x100_0000).
fn translate_setup() -> (GuestMemoryMmap, u64) {
    const ROOT: u64 = 0x10_0000;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut next = ROOT + PAGE_4K;
    for (iova0, bus0) in [(SRC, 0x100_0000u64), (DST, 0x200_0000)] {
        for p in 0..256u64 {
            let iova = iova0 + p * PAGE_4K;
            let mut table = ROOT;
            for level in (2..=4).rev() {
                let addr = table + pt_offset(iova, level);
                let mut e: u64 = mem.read_obj(GuestAddress(addr)).unwrap();
                if e == 0 {
                    e = next | RW;
                    next += PAGE_4K;
                    mem.write_obj(e, GuestAddress(addr)).unwrap();
                }
                table = e & PTE_ADDR_MASK;
            }
            let addr = table + pt_offset(iova, 1);
            mem.write_obj((bus0 + p * PAGE_4K) | RW, GuestAddress(addr))
                .unwrap();
        }
    }
    (mem, ROOT)
}

fn translate(c: &mut Criterion) {
    let (mem, root) = translate_setup();
    let mut junk = (vec![1u8; 2 << 20], vec![0u8; 2 << 20]);
    let mut pollute = move || {
        junk.1.copy_from_slice(&junk.0);
        black_box(&junk.1);
    };
    let mut group = c.benchmark_group("translate");
    group.throughput(Throughput::Elements(512));
    group.bench_function("pollute_only", |b| b.iter(&mut pollute));
    for entries in [0, SMALL_IOTLB as usize, DEFAULT_IOTLB_ENTRIES as usize] {
        let mmu = Mmu::new(2, DEFAULT_IOVA_WIDTH, entries, false);
        let regs = DomainRegs {
            root,
            mode: DOMAIN_MODE_TRANSLATED,
        };
        mmu.set_domain(1, regs);
        let pages = || (0..256u64).map(|p| p * PAGE_4K);
        for polluted in [false, true] {
            let tag = if polluted { "_polluted" } else { "" };
            group.bench_function(format!("translate{tag}/iotlb{entries}"), |b| {
                b.iter(|| {
                    for off in pages() {
                        black_box(mmu.translate(&mem, 1, SRC + off, Access::Read).unwrap());
                        black_box(mmu.translate(&mem, 1, DST + off, Access::Write).unwrap());
                    }
                    if polluted {
                        pollute();
                    }
                })
            });
            group.bench_function(format!("translator{tag}/iotlb{entries}"), |b| {
                b.iter(|| {
                    let mut tr = mmu.translator(&mem, 1);
                    for off in pages() {
                        black_box(tr.translate(SRC + off, Access::Read).unwrap());
                        black_box(tr.translate(DST + off, Access::Write).unwrap());
                    }
                    drop(tr);
                    if polluted {
                        pollute();
                    }
                })
            });
            group.bench_function(format!("translator_run{tag}/iotlb{entries}"), |b| {
                b.iter(|| {
                    let mut tr = mmu.translator(&mem, 1);
                    let n = 256 * PAGE_4K;
                    black_box(tr.translate_run(SRC, Access::Read, n).unwrap());
                    black_box(tr.translate_run(DST, Access::Write, n).unwrap());
                    drop(tr);
                    if polluted {
                        pollute();
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    copy_iotlb_small,
    copy_iotlb_default,
    translate,
    volatile_copy
);
criterion_main!(benches);
