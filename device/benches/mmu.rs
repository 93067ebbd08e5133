//! MMU costs per mapping size (4 KiB, 2 MiB, 1 GiB), through the public API only:
//!
//! - `walk`: a translation with no IOTLB (capacity 0), i.e. the page walk alone;
//! - `miss`: a one-entry IOTLB and two pages used in turn, so every translation walks,
//!   fills and evicts (what a working set larger than the IOTLB costs);
//! - `hit`: an IOTLB hit;
//! - `hit_strict`: an IOTLB hit in strict mode (hit plus a re-walk and a comparison);
//! - `pass_through`: the pass-through domain, for reference.
//!
//! Run: `cargo bench -p domdma-device --bench mmu`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use domdma_device::core::bus::Access;
use domdma_device::core::mmu::{DomainRegs, Mmu};
use domdma_device::spec::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const ROOT: u64 = 0x10_0000;
const RW: u64 = PTE_R | PTE_W;
const SIZES: [(&str, u64); 3] = [("4k", 1 << 12), ("2m", 1 << 21), ("1g", 1 << 30)];

/// Bus memory holding a table tree that maps, for each size, two adjacent pages at
/// `base(size)` (1 GiB pages: bus pages beyond the memory; the MMU does not touch them).
struct Setup {
    mem: GuestMemoryMmap,
    next: u64,
}

impl Setup {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut s = Setup {
            mem,
            next: ROOT + 0x1000,
        };
        for (_, size) in SIZES {
            for page in 0..2 {
                let iova = base(size) + page * size;
                s.map(iova, 0x1_0000_0000 * (page + 1) + iova, size);
            }
        }
        s
    }

    fn map(&mut self, iova: u64, bus: u64, size: u64) {
        let leaf_level = match size {
            0x1000 => 1,
            0x20_0000 => 2,
            _ => 3,
        };
        let mut table = ROOT;
        for level in (leaf_level + 1..=4).rev() {
            let addr = table + index(iova, level) * 8;
            let mut e: u64 = self.mem.read_obj(GuestAddress(addr)).unwrap();
            if e == 0 {
                e = self.next | RW;
                self.next += 0x1000;
                self.mem.write_obj(e, GuestAddress(addr)).unwrap();
            }
            table = e & PTE_ADDR_MASK;
        }
        let ps = if leaf_level > 1 { PTE_PS } else { 0 };
        let addr = table + index(iova, leaf_level) * 8;
        self.mem
            .write_obj(bus | ps | RW, GuestAddress(addr))
            .unwrap();
    }

    fn mmu(&self, iotlb_entries: usize, strict: bool) -> Mmu {
        let mmu = Mmu::new(2, DEFAULT_IOVA_WIDTH, iotlb_entries, strict);
        mmu.set_domain(
            1,
            DomainRegs {
                root: ROOT,
                mode: DOMAIN_MODE_TRANSLATED,
            },
        );
        mmu
    }
}

/// Where the two pages of `size` are mapped: separate level-4 slots, so each size has its
/// own full-depth path.
fn base(size: u64) -> u64 {
    match size {
        0x1000 => 0x10_0000_0000,
        0x20_0000 => 0x20_0000_0000,
        _ => 0x40_0000_0000,
    }
}

fn index(iova: u64, level: u32) -> u64 {
    (iova >> (12 + 9 * (level - 1))) & 511
}

fn bench(c: &mut Criterion) {
    let setup = Setup::new();
    let mem = &setup.mem;
    let mut group = c.benchmark_group("mmu");
    for (name, size) in SIZES {
        let iova = base(size) + 0x123;
        let other = iova + size;

        let mmu = setup.mmu(0, false);
        group.bench_function(format!("walk/{name}"), |b| {
            b.iter(|| {
                mmu.translate(mem, 1, black_box(iova), Access::Read)
                    .unwrap()
            })
        });

        let mmu = setup.mmu(1, false);
        let mut flip = false;
        group.bench_function(format!("miss/{name}"), |b| {
            b.iter(|| {
                flip = !flip;
                let a = if flip { iova } else { other };
                mmu.translate(mem, 1, black_box(a), Access::Write).unwrap()
            })
        });
        assert_eq!(
            mmu.counters(1).unwrap().snapshot().iotlb_hits,
            0,
            "miss/{name} must not hit"
        );

        for (label, strict) in [("hit", false), ("hit_strict", true)] {
            let mmu = setup.mmu(64, strict);
            mmu.translate(mem, 1, iova, Access::Read).unwrap();
            group.bench_function(format!("{label}/{name}"), |b| {
                b.iter(|| {
                    mmu.translate(mem, 1, black_box(iova), Access::Read)
                        .unwrap()
                })
            });
            let s = mmu.counters(1).unwrap().snapshot();
            assert_eq!(s.iotlb_misses, 1, "{label}/{name} must hit");
        }
    }
    let mmu = setup.mmu(64, false);
    group.bench_function("pass_through", |b| {
        b.iter(|| {
            mmu.translate(mem, 0, black_box(0x1234_5678), Access::Read)
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
