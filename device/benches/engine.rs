//! Engine COPY throughput through the device, driven by registers as a driver drives it
//! (write a descriptor, ring the doorbell, poll the completion record's status), beside a
//! plain memcpy of the same bus memory in the same run.
//!
//! Transfers of 64 KiB, 256 KiB, 1 MiB and 16 MiB (and 4 KiB in the streaming groups), in
//! two translated domains that map the same source and destination buffers: one with 4 KiB
//! pages (`engine_4k`), one with 2 MiB pages (`engine_2m`). `memcpy` copies the same host
//! memory with `ptr::copy_nonoverlapping`.
//! Every figure is a throughput (`Throughput::Bytes`); the ratio engine / memcpy per size
//! and page size is what we quote (targets: >= 0.9x for >= 256 KiB on 2 MiB mappings,
//! >= 0.7x on 4 KiB mappings).
//!
//! Groups, with the default configuration (a 1024-entry IOTLB) unless named otherwise:
//! - `copy`: one descriptor at a time (submit, spin on its completion): throughput of a
//!   driver that waits for each transfer, so the doorbell-to-completion round trip (about
//!   1.6 us here for a 64-byte copy, `engine_profile latency_*`) counts against every
//!   transfer;
//! - `copy_stream`: the queue kept busy, as a DMA engine's throughput is measured: each
//!   iteration submits [`STREAM`] descriptors with one doorbell and then waits for the
//!   batch submitted by the iteration before, so one batch is always queued behind the one
//!   running; beside [`STREAM`] memcpys per iteration;
//!   Beside them, the same stream over a bare ring with no device (`ring_only`: a thread
//!   that polls a tail, copies and writes a status, see `common/bare_ring.rs`), the ceiling
//!   of any engine on this ring protocol and machine, and the same with six uncontended
//!   lock pairs per descriptor (`ring_locks6`, about what the engine's worker takes);
//! - `copy_stream_iotlb64`: `copy_stream` on 4 KiB pages with a 64-entry IOTLB, in which
//!   every page of a transfer of more than ~128 KiB misses, walks and fills (its own device
//!   and buffers, and its own memcpy row).
//!
//! - `copy_stream_trace`: `copy_stream` on a device that records a trace (`_traced` rows,
//!   see `domdma_device::trace`) beside one that does not: the cost of `--trace`. The
//!   trace goes to a file in the temporary directory, or to `DOMDMA_BENCH_TRACE`
//!   (`/dev/null` separates the recording's cost from the file system's).
//!
//! Run: `cargo bench -p domdma-device --bench engine -- --warm-up-time 1 --measurement-time 3`.

#[path = "common/bare_ring.rs"]
mod bare_ring;
mod common;

use bare_ring::BareRing;
use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use domdma_device::core::DeviceConfig;
use domdma_device::spec::*;
use domdma_device::trace::{RecordOptions, Recorder, TraceConfig, Tracer};
use domdma_testkit::core_driver::*;

/// Descriptors in flight in the `copy_stream` group.
const STREAM: usize = 16;

/// Transfer sizes of the streaming groups: [`SIZES`] and 4 KiB, where the cost of each
/// descriptor (fetch, completion record, chunk set-up) shows most.
const STREAM_SIZES: [u64; 5] = [4 << 10, SIZES[0], SIZES[1], SIZES[2], SIZES[3]];

/// A device with `config` whose domains [`DOM_4K`] and [`DOM_2M`] map the same source and
/// destination buffers (of [`MAX`] bytes) at [`SRC`] and [`DST`], a queue on each, and the
/// buffers' host addresses.
fn setup(config: DeviceConfig) -> (Driver, *const u8, *mut u8) {
    setup_traced(config, Tracer::off())
}

/// [`setup`] with a device that records to `trace`.
fn setup_traced(config: DeviceConfig, trace: Tracer) -> (Driver, *const u8, *mut u8) {
    let mut d = Driver::with_tracer(config, trace);
    let src = d.bus.alloc(MAX, PAGE_2M);
    let dst = d.bus.alloc(MAX, PAGE_2M);
    d.bus.write(src, &pattern(1, MAX as usize));
    d.bus.fill(dst, MAX, 0);
    for (dom, page) in [(DOM_4K, PAGE_4K), (DOM_2M, PAGE_2M)] {
        d.translated_domain(dom);
        d.map(dom, SRC, src, MAX, page, PTE_R);
        d.map(dom, DST, dst, MAX, page, RW);
        d.setup_queue(dom, dom, 64);
        // Check the set-up once: a full copy lands.
        d.bus.fill(dst, MAX, 0);
        engine_copy(&mut d, dom, MAX);
        assert!(d.bus.read(dst, MAX as usize) == d.bus.read(src, MAX as usize));
    }
    let (from, to) = (d.bus.host_ptr(src), d.bus.host_ptr(dst));
    (d, from, to)
}

/// One group of [`STREAM`] descriptors per iteration (see the module documentation) on the
/// queues `engines` names, beside [`STREAM`] memcpys of the same buffers.
fn stream_group(c: &mut Criterion, name: &str, config: DeviceConfig, engines: &[(&str, u32)]) {
    let (d, from, to) = setup(config);
    let rows: Vec<_> = engines.iter().map(|&(n, q)| (n, 0, q)).collect();
    stream_rows(c, name, from, to, &mut [d], &rows, false);
}

/// The `copy_stream` rows `rows` (row name, index in `drivers`, queue), beside one memcpy
/// row of the buffers at `from` and `to`.
fn stream_rows(
    c: &mut Criterion,
    name: &str,
    from: *const u8,
    to: *mut u8,
    drivers: &mut [Driver],
    rows: &[(&str, usize, u32)],
    bare: bool,
) {
    let mut group = c.benchmark_group(name);
    for size in STREAM_SIZES {
        group.throughput(Throughput::Bytes(size * STREAM as u64));
        group.bench_with_input(BenchmarkId::new("memcpy", label(size)), &size, |b, &n| {
            // SAFETY: `from` and `to` point at two disjoint MAX-byte ranges of the bus
            // memory mapping of a device in `drivers`, which lives as long as they do; no
            // queue runs meanwhile.
            unsafe { bench_memcpy(b, from, to, n, STREAM) }
        });
        for &(engine, i, q) in rows {
            let d = &mut drivers[i];
            let descs = vec![Desc::copy(SRC, DST, size as u32); STREAM];
            let mut queued: Vec<Ticket> = Vec::new();
            group.bench_with_input(BenchmarkId::new(engine, label(size)), &size, |b, &n| {
                b.iter(|| {
                    let next = d.submit_many(q, &descs);
                    for t in queued.drain(..) {
                        let c = d.wait_spin(&t);
                        assert_eq!((c.status, u64::from(c.bytes)), (STATUS_OK, n), "{c:x?}");
                    }
                    queued = next;
                })
            });
            for t in queued.drain(..) {
                assert_eq!(d.wait_spin(&t).status, STATUS_OK);
            }
        }
        // The ceiling: the same stream over a bare ring with no device, and with as many
        // lock pairs per descriptor as the engine's worker takes.
        for (row, locks) in [("ring_only", 0), ("ring_locks6", 6)]
            .into_iter()
            .filter(|_| bare)
        {
            // SAFETY: `from` and `to` are two disjoint MAX-byte ranges of the bus memory of
            // a device in `drivers`, which outlives the ring; no queue runs meanwhile.
            let mut ring = unsafe { BareRing::new(2 * STREAM, from, to, locks) };
            group.bench_with_input(BenchmarkId::new(row, label(size)), &size, |b, &n| {
                b.iter(|| ring.stream(STREAM, n))
            });
        }
    }
    group.finish();
}

fn copy_throughput(c: &mut Criterion) {
    let (mut d, from, to) = setup(DeviceConfig::default());
    let mut group = c.benchmark_group("copy");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size));
        group.bench_with_input(BenchmarkId::new("memcpy", label(size)), &size, |b, &n| {
            // SAFETY: `from` and `to` point at two disjoint MAX-byte ranges of the bus
            // memory mapping, which lives as long as `d`; no queue runs meanwhile.
            unsafe { bench_memcpy(b, from, to, n, 1) }
        });
        for (name, q) in [("engine_4k", DOM_4K), ("engine_2m", DOM_2M)] {
            group.bench_with_input(BenchmarkId::new(name, label(size)), &size, |b, &n| {
                b.iter(|| engine_copy(&mut d, q, n))
            });
        }
    }
    group.finish();
    drop(d);

    let engines = [("engine_4k", DOM_4K), ("engine_2m", DOM_2M)];
    {
        let (d, from, to) = setup(DeviceConfig::default());
        let rows: Vec<_> = engines.iter().map(|&(n, q)| (n, 0, q)).collect();
        stream_rows(c, "copy_stream", from, to, &mut [d], &rows, true);
    }
    // The same with a 64-entry IOTLB, in which every page of a 4 KiB-mapped copy of more
    // than ~128 KiB misses, walks and fills.
    let small = DeviceConfig {
        iotlb_entries: 64,
        ..DeviceConfig::default()
    };
    stream_group(c, "copy_stream_iotlb64", small, &engines[..1]);

    // The cost of recording a trace (`--trace`): the same stream on a device that records
    // to a file, beside one that does not, and memcpy.
    // A file of ours in the temporary directory (removed at the end), or the one named by
    // DOMDMA_BENCH_TRACE (left alone: it may be /dev/null). DOMDMA_BENCH_TRACE_WRITER=equal
    // runs the writer at normal priority (a complete trace, at the cost of the CPU time
    // it takes from the bench) rather than in the background (the default: nice 19).
    let named = std::env::var_os("DOMDMA_BENCH_TRACE").map(std::path::PathBuf::from);
    let own = named.is_none();
    let path = named.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("domdma-bench-{}.trace", std::process::id()))
    });
    let background = std::env::var("DOMDMA_BENCH_TRACE_WRITER").map_or(true, |w| w != "equal");
    let config = DeviceConfig::default();
    let rec = Recorder::open(
        &path,
        TraceConfig::from(&config),
        RecordOptions {
            background,
            ..RecordOptions::default()
        },
    )
    .expect("trace file");
    let (plain, from, to) = setup(config.clone());
    let (traced, _, _) = setup_traced(config, Tracer::new(rec.clone()));
    let rows = [
        ("engine_2m", 0, DOM_2M),
        ("engine_2m_traced", 1, DOM_2M),
        ("engine_4k", 0, DOM_4K),
        ("engine_4k_traced", 1, DOM_4K),
    ];
    stream_rows(
        c,
        "copy_stream_trace",
        from,
        to,
        &mut [plain, traced],
        &rows,
        false,
    );
    if let Ok(n) = rec.finish() {
        let dropped = rec.dropped();
        eprintln!(
            "trace: {n} records written, {dropped} dropped ({:.0}% kept; {:.0} MB; writer {})",
            100.0 * n as f64 / (n + dropped).max(1) as f64,
            std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / 1e6,
            if background {
                "in the background, nice 19"
            } else {
                "at normal priority"
            }
        );
    }
    if own {
        let _ = std::fs::remove_file(&path);
    }
}

criterion_group!(benches, copy_throughput);
criterion_main!(benches);
