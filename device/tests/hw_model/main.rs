//! The hardware model held to device/SPEC.md (register interface 0.2), driven as a driver
//! drives the device: registers through `bar_read`/`bar_write`, page tables, rings,
//! completion records and the fault log in `vm-memory` bus memory (`testkit::core_driver`).
//!
//! Only what the conformance suite (testkit/src/conformance) cannot show through a back end
//! is here, by area: [`hostile`] tables and bus addresses, [`iotlb`] internals and races,
//! [`registers`] beyond the default configuration.
//!
//! Every buffer the device may touch is surrounded by canaries; every fault test checks
//! that nothing outside the mapping changed.

mod hostile;
mod iotlb;
mod registers;

use domdma_device::core::DeviceConfig;
use domdma_device::spec::*;
use domdma_testkit::core_driver::*;

/// The translated domain most tests use.
pub(crate) const DOM: u32 = 1;
/// The queue most tests use.
pub(crate) const Q: u32 = 0;
/// Source IOVAs (L4 0, L3 64).
pub(crate) const SRC: u64 = 0x10_0000_0000;
/// Destination IOVAs (L4 0, L3 68).
pub(crate) const DST: u64 = 0x11_0000_0000;
/// IOVAs for 2 MiB mappings (L4 0, L3 128).
pub(crate) const LARGE: u64 = 0x20_0000_0000;
/// A second 2 MiB-mapped region (L4 0, L3 132).
pub(crate) const LARGE2: u64 = 0x21_0000_0000;
/// IOVAs in L4 slot 1, away from the identity-mapped rings (L4 slot 0).
pub(crate) const HOSTILE: u64 = 0x80_0000_0000;
/// A bus address below RAM: not mapped for the device.
pub(crate) const OUTSIDE: u64 = 0x10_0000;

/// A device with a fault log of 64 records, translated domain [`DOM`] and queue [`Q`] in it.
pub(crate) fn setup() -> Driver {
    setup_with(DeviceConfig::default())
}

pub(crate) fn setup_with(config: DeviceConfig) -> Driver {
    let mut d = Driver::with_config(config);
    d.enable_fault_log(64);
    d.translated_domain(DOM);
    d.setup_queue(Q, DOM, 64);
    d
}

/// `n` single guarded 4 KiB bus pages, in reverse allocation order (never contiguous).
pub(crate) fn scattered_pages(d: &mut Driver, n: usize) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n)
        .map(|_| d.bus.alloc_guarded(PAGE_4K, PAGE_4K))
        .collect();
    v.reverse();
    v
}

#[track_caller]
pub(crate) fn assert_ok(c: &Completion, bytes: u32) {
    assert_cpl(c, STATUS_OK, 0, 0, 0, bytes);
}

/// Check a completion: (status, reason, access, fault address, bytes).
#[track_caller]
pub(crate) fn assert_cpl(
    c: &Completion,
    status: u8,
    reason: u8,
    access: u8,
    addr: u64,
    bytes: u32,
) {
    assert_eq!(
        c.outcome(),
        (status, reason, access, bytes, addr),
        "completion {c:x?}"
    );
}

/// Check a fault record: (reason, access, domain, queue, iova, seq).
#[track_caller]
pub(crate) fn assert_rec(
    r: &FaultRecord,
    reason: u8,
    access: u8,
    domain: u32,
    queue: u32,
    iova: u64,
    seq: u32,
) {
    assert_eq!(
        (
            r.reason,
            r.access,
            u32::from(r.domain),
            u32::from(r.queue),
            r.iova,
            r.seq
        ),
        (reason, access, domain, queue, iova, seq),
        "fault record {r:x?}"
    );
}

/// Poll a value until it equals `want` (counters may be updated just after a completion).
#[track_caller]
pub(crate) fn eventually_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    want: T,
    mut f: impl FnMut() -> T,
) {
    let mut last = None;
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        poll(what, || {
            let v = f();
            let done = v == want;
            last = Some(v);
            done.then_some(())
        })
    }));
    if ok.is_err() {
        panic!("{what}: expected {want:?}, last read {last:?}");
    }
}

/// Domain 1 maps SRC to page A; a COPY SRC -> DST has cached it. Returns (driver, A, B,
/// dst) where B is a second page with other data.
pub(crate) fn stale_setup(config: DeviceConfig) -> (Driver, u64, u64, u64) {
    let mut d = setup_with(config);
    let a = d.map_new(DOM, SRC, 4096, PAGE_4K, RW);
    let b = d.bus.alloc_guarded(4096, PAGE_4K);
    let dst = d.map_new(DOM, DST, 4096, PAGE_4K, RW);
    d.bus.write(a, &[0xaa; 4096]);
    d.bus.write(b, &[0xbb; 4096]);
    assert_eq!(probe(&mut d, dst), 0xaa);
    (d, a, b, dst)
}

/// COPY 64 bytes SRC -> DST and return the byte that arrived.
pub(crate) fn probe(d: &mut Driver, dst: u64) -> u8 {
    d.bus.write(dst, &[0; 64]);
    let c = d.run(Q, Desc::copy(SRC, DST, 64));
    assert_ok(&c, 64);
    let got = d.bus.read(dst, 64);
    assert!(got.iter().all(|&x| x == got[0]), "one page's data");
    got[0]
}

/// A 64 MiB COPY on 4 KiB pages in domain 1, plus two NOPs behind it; returns when the
/// queue reads busy with nothing completed. Returns (driver, tickets, dst bus address).
pub(crate) fn long_copy_in_flight() -> (Driver, Vec<Ticket>, u64) {
    let mut d = setup();
    d.write(REG_SCRATCH, 0x5a5a);
    let len = MAX_XFER;
    let src = d.map_new(DOM, SRC, u64::from(len), PAGE_4K, RW);
    let dst = d.map_new(DOM, DST, u64::from(len), PAGE_4K, RW);
    d.bus.fill(src, u64::from(len), 0xc7);
    let ts = d.submit_many(Q, &[Desc::copy(SRC, DST, len), Desc::nop(), Desc::nop()]);
    d.wait_status(Q, "queue busy", |s| s & Q_STATUS_BUSY != 0);
    poll("the copy to start", || {
        (d.bus.read_u8(dst) == 0xc7).then_some(())
    });
    assert_eq!(d.qread(Q, Q_COMPLETED), 0, "the copy is still running");
    (d, ts, dst)
}

/// Everything SPEC.md "Reset" clears.
pub(crate) fn assert_reset_state(d: &mut Driver) {
    for q in 0..DEFAULT_QUEUES {
        assert_eq!(d.qread(q, Q_STATUS), 0, "queue {q} disabled");
        assert_eq!((d.qread(q, Q_HEAD), d.qread(q, Q_TAIL)), (0, 0));
        assert_eq!((d.qread(q, Q_COMPLETED), d.qread(q, Q_ERRORS)), (0, 0));
        assert_eq!(d.qread(q, Q_HALT_REASON), HALT_NONE);
    }
    assert_eq!(d.dread(0, D_CTRL), DOMAIN_MODE_PASSTHROUGH);
    for dom in 1..DEFAULT_DOMAINS {
        assert_eq!(d.dread(dom, D_CTRL), DOMAIN_MODE_DISABLED);
        assert_eq!((d.dread(dom, D_ROOT_LO), d.dread(dom, D_ROOT_HI)), (0, 0));
    }
    assert_eq!(d.read(REG_SCRATCH), 0);
    // Every fault log register but the vector.
    let flog_regs = (REG_FLOG_BASE_LO..=REG_FLOG_DROPPED).step_by(4);
    for reg in flog_regs.filter(|&reg| reg != REG_FLOG_MSIX_VECTOR) {
        assert_eq!(d.read(reg), 0, "fault log register {reg:#x}");
    }
    assert_eq!(d.qstat(Q, QSTAT_DESCRIPTORS), 0);
    assert_eq!(d.dstat(DOM, DSTAT_TRANSLATIONS), 0);
    let s = d.stats();
    assert!(s.queues.iter().all(|q| *q == Default::default()), "{s:?}");
    assert!(s.domains.iter().all(|q| *q == Default::default()), "{s:?}");
    assert_eq!(
        (s.faults.count, s.faults.dropped, s.iotlb_entries),
        (0, 0, 0)
    );
}

/// After a reset: the old records stay pending while the device is reprogrammed and used,
/// and the old destination does not change.
pub(crate) fn check_usable_after_reset(d: &mut Driver, old: &[Ticket], old_dst: u64) {
    for t in old {
        assert_eq!(
            d.peek(t).status,
            STATUS_PENDING,
            "no completion after reset"
        );
    }
    let snapshot = d.bus.read(old_dst, MAX_XFER as usize);
    // Reprogram: domain 1 with its old table, the fault log, queue 0; run a copy.
    // The reset emptied the IOTLB: SRC's first page, remapped in the old table, is walked
    // afresh without any invalidation.
    let fresh = d.bus.alloc_guarded(4096, PAGE_4K);
    d.bus.write(fresh, &pattern(33, 4096));
    d.set_pte(DOM, SRC, 1, fresh | RW);
    let root = d.pt(DOM).root;
    d.set_domain(DOM, root, DOMAIN_MODE_TRANSLATED);
    d.enable_fault_log(16);
    d.setup_queue(Q, DOM, 16);
    let c = d.run(Q, Desc::crc32c(SRC, 4096));
    assert_ok(&c, 4096);
    assert_eq!(
        c.result,
        u64::from(crc32c(&pattern(33, 4096))),
        "stale entry after reset"
    );
    let src = d.map_new(DOM, LARGE, 1 << 20, PAGE_2M, RW);
    let dst = d.map_new(DOM, LARGE2, 1 << 20, PAGE_2M, RW);
    let data = pattern(21, 1 << 20);
    d.bus.write(src, &data);
    assert_ok(&d.run(Q, Desc::copy(LARGE, LARGE2, 1 << 20)), 1 << 20);
    assert!(d.bus.read(dst, 1 << 20) == data);
    assert_eq!(d.read(REG_FLOG_COUNT), 0);
    for t in old {
        assert_eq!(
            d.peek(t).status,
            STATUS_PENDING,
            "no completion after reset"
        );
    }
    assert!(
        d.bus.read(old_dst, MAX_XFER as usize) == snapshot,
        "the aborted copy's destination did not change after reset"
    );
    d.bus.check_canaries();
}

/// A random page-table entry: mostly plausible, often wrong. Never a writable mapping of
/// memory outside `sandbox` (16 MiB, 2 MiB aligned) and the `tables`.
pub(crate) fn random_entry(rng: &mut Rng, tables: &[u64], sandbox: u64) -> u64 {
    let perms = rng.pick(&[RW, RW, RW, RW, PTE_R, PTE_W]) | (rng.below(16) << 8);
    let outside = [
        0u64,
        0x1000,
        RAM_BASE - PAGE_2M,
        RAM_END,
        0x000f_ffff_c000_0000,
    ];
    match rng.below(12) {
        0 => 0,
        1 => rng.next_u64() & !RW,
        2 => rng.next_u64(),
        3..=5 => rng.pick(tables) | perms,
        6 => ((sandbox + rng.below(16 << 20)) & !0xfff) | perms,
        7 => (sandbox + rng.below(8) * PAGE_2M) | perms | PTE_PS,
        8 => rng.pick(&outside) | perms | if rng.chance(1, 2) { PTE_PS } else { 0 },
        9 => rng.pick(tables) | perms | PTE_PS,
        10 => rng.pick(tables) | perms | (1 << rng.pick(&[2u64, 3, 4, 5, 6, 52, 55, 63])),
        _ => ((sandbox + rng.below(16 << 20)) & !0xfff) | perms | (rng.below(2) << 7),
    }
}

/// A random IOVA in L4 slots 1..=3 with small indices below (so walks meet the entries).
pub(crate) fn random_hostile_iova(rng: &mut Rng) -> u64 {
    let l4 = 1 + rng.below(3);
    (l4 << 39)
        | (rng.below(6) << 30)
        | (rng.below(6) << 21)
        | (rng.below(6) << 12)
        | rng.below(4096)
}

/// Fill `tables` with random entries and point root slots 1..=3 into them.
pub(crate) fn randomize_tables(
    d: &mut Driver,
    rng: &mut Rng,
    root: u64,
    tables: &[u64],
    sandbox: u64,
) {
    for &t in tables {
        let v: Vec<u8> = (0..512)
            .flat_map(|_| random_entry(rng, tables, sandbox).to_le_bytes())
            .collect();
        d.bus.write(t, &v);
    }
    for slot in 1..=3u64 {
        let e = if rng.chance(9, 10) {
            rng.pick(tables) | RW
        } else {
            random_entry(rng, tables, sandbox)
        };
        d.bus.write_u64(root + slot * 8, e);
    }
}

// ---- BATCH ----
