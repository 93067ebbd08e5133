//! What the engine benches share: transfer sizes, the IOVAs and domains they map, labels,
//! and one COPY through the registers (the test driver of device/tests/driver).

use std::hint::black_box;

use criterion::Bencher;

use domdma_device::spec::*;

use domdma_testkit::core_driver::{Desc, Driver};

/// Transfer sizes.
pub const SIZES: [u64; 4] = [64 << 10, 256 << 10, 1 << 20, 16 << 20];
/// Buffer size: the largest transfer.
pub const MAX: u64 = 16 << 20;
/// Source IOVA in every domain.
pub const SRC: u64 = 0x10_0000_0000;
/// Destination IOVA in every domain.
pub const DST: u64 = 0x11_0000_0000;
/// Domain (and queue) with 4 KiB mappings.
pub const DOM_4K: u32 = 1;
/// Domain (and queue) with 2 MiB mappings.
pub const DOM_2M: u32 = 2;

/// "64KiB", "1MiB".
pub fn label(size: u64) -> String {
    if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else {
        format!("{}KiB", size >> 10)
    }
}

/// The baseline: `times` plain memcpys of `n` bytes from `from` to `to` per iteration.
///
/// # Safety
///
/// `from` and `to` must point at two disjoint ranges of at least `n` bytes of the bus
/// memory mapping, alive for the whole benchmark, that no queue touches meanwhile.
pub unsafe fn bench_memcpy(
    b: &mut Bencher<'_>,
    from: *const u8,
    to: *mut u8,
    n: u64,
    times: usize,
) {
    b.iter(|| {
        for _ in 0..times {
            // SAFETY: the function's contract: two disjoint live ranges of `n` bytes that
            // nothing else writes meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(from, to, n as usize) };
            black_box(to);
        }
    })
}

/// Submit one COPY of `len` bytes from [`SRC`] to [`DST`] on queue `q` and spin on its
/// completion.
pub fn engine_copy(d: &mut Driver, q: u32, len: u64) {
    let t = d.submit(q, Desc::copy(SRC, DST, len as u32));
    let c = d.wait_spin(&t);
    assert_eq!((c.status, u64::from(c.bytes)), (STATUS_OK, len), "{c:x?}");
    black_box(c);
}
