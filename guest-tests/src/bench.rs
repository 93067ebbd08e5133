//! The guest bench (`--bench`): what a driver inside the guest sees of the device's speed.
//!
//! Instead of the test suite the binary then runs three measurements, each reported like a
//! test (a `DOMDMA-RESULT` line: passed when it measured and the copied data checked out,
//! skipped with the reason when the profile lacks something) and, for the numbers, one or
//! more stdout lines
//!
//! ```text
//! DOMDMA-BENCH {"kind":"latency","completion":"poll","bytes":64,...}
//! ```
//!
//! that the host runner (`domdma-vm run --bench`) gathers into `bench.json` and a table:
//!
//! - `bench::latency_64b` (last, see [`all`]): submit (descriptor written, doorbell) to completion of a 64-byte
//!   COPY, one at a time, completion seen by polling the completion record and, where the
//!   back end has MSI-X, by waiting for the queue's interrupt (the VFIO eventfd); the guest
//!   copying the same 64 bytes, timed the same way, is the baseline (and the two clock
//!   reads alone show what timing costs). p50 and p99 per round, the median over rounds
//!   reported.
//! - `bench::throughput_2m_pages` / `bench::throughput_4k_pages`: COPY throughput by
//!   transfer size on buffers of 2 MiB pages (hugetlbfs) and of base pages, the queue kept
//!   busy (16 descriptors per doorbell, up to 48 in flight), against the guest's memcpy of
//!   the same buffers and the same number of bytes. DMA and memcpy alternate within each
//!   round (which goes first alternates too); the ratio DMA/memcpy is taken per round and
//!   its median reported.
//!
//! Everything runs in pass-through domain 0 on queue 0: addresses are the back end's bus
//! addresses. Under TCG the guest's memcpy is emulated while the device's copy runs natively
//! in the server, so the ratios say what a guest driver gains, not what the engine costs.

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use domdma_device::spec::{self, CompletionRecord, Descriptor};
use domdma_driver_model::backend::{DmaBackend, DmaBuffer, DmaRequest, PageKind};
use domdma_driver_model::dma_queue::{CompletionRecords, DmaQueue};
use domdma_testkit::check::{check_status, Failure};
use domdma_testkit::fixtures::{
    drain_interrupts, fresh, unique_data, COMPLETION_TIMEOUT, IRQ_TIMEOUT, MIB,
};
use domdma_testkit::{check, progress};

use crate::harness::{Ctx, PlatformResult};

pub use domdma_testkit::bench_record::{bench_line, Record};

/// Transfer size of the latency measurement.
pub const LATENCY_BYTES: usize = 64;
/// Transfer sizes of the throughput measurement.
pub const SIZES: [usize; 4] = [4 << 10, 64 << 10, 256 << 10, MIB];
/// Ring size of the bench queue.
const RING: u32 = 64;
/// Descriptors per doorbell in the throughput measurement.
const BATCH: usize = 16;
/// Descriptors in flight at most (a batch can always be queued behind the running ones).
const IN_FLIGHT: usize = 48;
/// Latency samples discarded before each round's.
const WARMUP_SAMPLES: u32 = 20;

/// The bench's command-line options (flattened into the binary's).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Run the guest bench (latency and throughput, `DOMDMA-BENCH` lines) instead of the
    /// test suite.
    #[arg(long)]
    pub bench: bool,
    /// Bench rounds; every figure is the median over them.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub bench_rounds: u32,
    /// Latency samples per round and completion mode.
    #[arg(long, value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub bench_samples: u32,
    /// MiB copied per throughput measurement (per size and round, by DMA and by memcpy
    /// each).
    #[arg(long, value_name = "MIB", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub bench_mib: u32,
}

/// One bench, run like a test.
pub struct Bench {
    /// `bench::name`.
    pub name: &'static str,
    /// The measurement: `Ok(None)` measured, `Ok(Some(reason))` skipped.
    pub run: fn(&mut Ctx, &BenchArgs) -> PlatformResult,
}

/// Every bench, in running order: throughput first. Under TCG, after the latency bench's
/// ten thousand MSI-X round trips the guest's memcpy on 2 MiB pages ran 20-40 times slower
/// for the next tens of seconds (three runs of three; 4 KiB pages and the noiommu profile,
/// which has no MSI-X, unaffected; cause not found), which spoiled the baseline.
pub fn all() -> Vec<Bench> {
    vec![
        Bench {
            name: "bench::throughput_2m_pages",
            run: |ctx, args| throughput(ctx, args, PageKind::Huge2M),
        },
        Bench {
            name: "bench::throughput_4k_pages",
            run: |ctx, args| throughput(ctx, args, PageKind::Base),
        },
        Bench {
            name: "bench::latency_64b",
            run: latency,
        },
    ]
}

/// Prints a record's line and flushes it.
pub fn emit(record: &Record) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", bench_line(record));
    let _ = out.flush();
}

/// The value at percentile `p` (0-100) of `samples`, nearest rank; NaN when empty.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of `values` (the mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// MiB/s for `bytes` moved in `time`.
pub fn mib_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / time.as_secs_f64().max(1e-9)
}

/// The `Env` record: where the bench runs.
pub fn env_record(ctx: &mut Ctx, profile: &str, args: &BenchArgs) -> Result<Record, Failure> {
    let dev = ctx.shared()?;
    let info = dev.info();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    Ok(Record::Env {
        profile: profile.to_owned(),
        backend: info.backend.to_owned(),
        register_access: info.register_access.to_string(),
        hypervisor: hypervisor_signature(),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rounds: args.bench_rounds,
        latency_samples: args.bench_samples,
        throughput_bytes: u64::from(args.bench_mib) * MIB as u64,
    })
}

/// The hypervisor's CPUID signature (leaf 0x4000_0000, EBX ECX EDX), trimmed of NULs.
fn hypervisor_signature() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        // `__cpuid` is safe from Rust 1.87 on; the workspace's minimum is older.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU and only reads identification registers.
        let leaf1 = unsafe { std::arch::x86_64::__cpuid(1) };
        // ECX bit 31: running under a hypervisor.
        if leaf1.ecx & (1 << 31) == 0 {
            return String::new();
        }
        #[allow(unused_unsafe)]
        // SAFETY: as above; leaf 0x4000_0000 is reserved for hypervisors (answered with
        // zeros or the highest basic leaf's data where there is none).
        let r = unsafe { std::arch::x86_64::__cpuid(0x4000_0000) };
        let bytes: Vec<u8> = [r.ebx, r.ecx, r.edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .filter(|&b| b != 0)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::new()
}

/// The bench's queue: queue 0 of a freshly reset device, a ring of [`RING`] descriptors in
/// domain 0 with MSI-X vector 0, and [`RING`] completion records.
fn bench_queue(dev: &dyn DmaBackend) -> Result<(DmaQueue<'_>, CompletionRecords), Failure> {
    fresh(dev)?;
    let q = DmaQueue::new(dev, 0, RING, 0)?;
    let cpl = CompletionRecords::new(dev, RING as usize)?;
    Ok((q, cpl))
}

/// Spins on completion record `i` until the device wrote it (no sleeping: a sleep would be
/// measured); fails after [`COMPLETION_TIMEOUT`].
fn spin_completion(cpl: &CompletionRecords, i: usize) -> Result<CompletionRecord, Failure> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if CompletionRecord::status_of_head(cpl.status(i)) != spec::STATUS_PENDING {
            return Ok(cpl.read(i));
        }
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 && start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!(
                "completion record {i} still pending after {COMPLETION_TIMEOUT:?}: the device \
                 stopped completing (see device.log)"
            )));
        }
        std::hint::spin_loop();
    }
}

/// How a latency sample sees its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Completion {
    Poll,
    Irq,
}

/// One round of `n` latency samples of a `LATENCY_BYTES` COPY, in microseconds.
fn dma_latency_round(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    src: &DmaBuffer,
    dst: &DmaBuffer,
    mode: Completion,
    n: u32,
) -> Result<Vec<f64>, Failure> {
    let mut desc = Descriptor::copy(src.bus_addr(), dst.bus_addr(), LATENCY_BYTES as u32)
        .with_completion(cpl.device_addr(0));
    if mode == Completion::Irq {
        desc = desc.with_interrupt();
    }
    let mut samples = Vec::with_capacity(n as usize);
    for i in 0..WARMUP_SAMPLES + n {
        cpl.clear(0);
        let start = Instant::now();
        q.push(&desc)?;
        q.doorbell()?;
        let c = match mode {
            Completion::Poll => spin_completion(cpl, 0)?,
            Completion::Irq => q.wait_completion_irq(cpl, 0, IRQ_TIMEOUT)?,
        };
        let took = start.elapsed();
        check_status(&c, spec::STATUS_OK, "64-byte COPY")?;
        check!(
            c.bytes as usize == LATENCY_BYTES,
            "64-byte COPY completed {} bytes",
            c.bytes
        );
        if i >= WARMUP_SAMPLES {
            samples.push(took.as_secs_f64() * 1e6);
        }
    }
    check!(
        dst.to_vec(0, LATENCY_BYTES) == src.to_vec(0, LATENCY_BYTES),
        "the 64-byte COPY's destination does not hold the source's bytes"
    );
    Ok(samples)
}

/// One round of `n` samples of the guest copying `LATENCY_BYTES` between the same buffers,
/// timed like a DMA sample, in microseconds.
fn memcpy_latency_round(src: &DmaBuffer, dst: &DmaBuffer, n: u32) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n as usize);
    for i in 0..WARMUP_SAMPLES + n {
        let start = Instant::now();
        // SAFETY: no descriptor is outstanding (every one completed before this round), so
        // the device does not touch either buffer; both are valid for their length, which
        // is at least LATENCY_BYTES, and distinct allocations.
        unsafe { guest_memcpy(src, dst, LATENCY_BYTES) };
        let took = start.elapsed();
        if i >= WARMUP_SAMPLES {
            samples.push(took.as_secs_f64() * 1e6);
        }
    }
    samples
}

/// One round of `n` samples of nothing but the two clock reads every sample takes (what
/// the timer itself costs; under TCG it is most of the memcpy baseline), in microseconds.
fn clock_round(n: u32) -> Vec<f64> {
    let mut samples = Vec::with_capacity(n as usize);
    for i in 0..WARMUP_SAMPLES + n {
        let start = black_box(Instant::now());
        let took = start.elapsed();
        if i >= WARMUP_SAMPLES {
            samples.push(took.as_secs_f64() * 1e6);
        }
    }
    samples
}

/// The guest's own copy of `len` bytes from `src` to `dst` (what the baseline measures).
///
/// # Safety
///
/// The device must not be accessing either buffer (no descriptor naming them outstanding),
/// `len` must not exceed either length, and the buffers must not overlap.
unsafe fn guest_memcpy(src: &DmaBuffer, dst: &DmaBuffer, len: usize) {
    assert!(
        len <= src.len() && len <= dst.len(),
        "memcpy beyond a buffer"
    );
    // SAFETY: both pointers are valid for `len` bytes (asserted), the ranges do not overlap
    // and nothing else accesses them meanwhile (the caller's contract); the pointers go
    // through black_box so that repeated identical copies are not merged.
    unsafe {
        std::ptr::copy_nonoverlapping(
            black_box(src.as_ptr().cast_const()),
            black_box(dst.as_ptr()),
            len,
        )
    }
}

/// Accumulates a latency mode's rounds.
#[derive(Default)]
struct LatencyRounds {
    p50: Vec<f64>,
    p99: Vec<f64>,
    min: f64,
    max: f64,
}

impl LatencyRounds {
    fn add(&mut self, samples: &[f64]) {
        self.p50.push(percentile(samples, 50.0));
        self.p99.push(percentile(samples, 99.0));
        let lo = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = samples.iter().copied().fold(0.0, f64::max);
        self.min = if self.p50.len() == 1 {
            lo
        } else {
            self.min.min(lo)
        };
        self.max = self.max.max(hi);
    }

    fn record(&self, completion: &str, args: &BenchArgs) -> Record {
        Record::Latency {
            completion: completion.to_owned(),
            bytes: LATENCY_BYTES,
            rounds: self.p50.len() as u32,
            samples: args.bench_samples,
            p50_us: median(&self.p50),
            p99_us: median(&self.p99),
            min_us: self.min,
            max_us: self.max,
            round_p50_us: self.p50.clone(),
            round_p99_us: self.p99.clone(),
        }
    }
}

/// `bench::latency_64b`: polling, MSI-X (when the back end has it) and memcpy, interleaved
/// round by round.
fn latency(ctx: &mut Ctx, args: &BenchArgs) -> PlatformResult {
    let dev = ctx.shared()?;
    let dev: &dyn DmaBackend = &*dev;
    let (mut q, cpl) = bench_queue(dev)?;
    let src = dev.alloc_dma(DmaRequest::new(4096))?;
    let dst = dev.alloc_dma(DmaRequest::new(4096))?;
    let irq = if dev.msix_vectors() == 0 {
        Err(format!(
            "the {} back end has no MSI-X (completions by polling only)",
            dev.info().backend
        ))
    } else {
        Ok(())
    };
    let (mut poll, mut msix, mut memcpy, mut clock) = (
        LatencyRounds::default(),
        LatencyRounds::default(),
        LatencyRounds::default(),
        LatencyRounds::default(),
    );
    for round in 0..args.bench_rounds {
        src.write(0, &unique_data(u64::from(round) + 1, LATENCY_BYTES));
        poll.add(&dma_latency_round(
            &mut q,
            &cpl,
            &src,
            &dst,
            Completion::Poll,
            args.bench_samples,
        )?);
        if irq.is_ok() {
            // The polled round asked for no interrupt; discard any stray one all the same.
            drain_interrupts(dev)?;
            msix.add(&dma_latency_round(
                &mut q,
                &cpl,
                &src,
                &dst,
                Completion::Irq,
                args.bench_samples,
            )?);
        }
        memcpy.add(&memcpy_latency_round(&src, &dst, args.bench_samples));
        clock.add(&clock_round(args.bench_samples));
        progress!(
            "         round {}: poll p50 {:.1} us{}, memcpy p50 {:.2} us",
            round + 1,
            poll.p50[round as usize],
            msix.p50
                .get(round as usize)
                .map_or(String::new(), |p| format!(", MSI-X p50 {p:.1} us")),
            memcpy.p50[round as usize]
        );
    }
    emit(&poll.record("poll", args));
    match &irq {
        Ok(()) => emit(&msix.record("irq", args)),
        Err(reason) => emit(&Record::Skipped {
            what: "latency irq".into(),
            reason: reason.clone(),
        }),
    }
    emit(&memcpy.record("memcpy", args));
    emit(&clock.record("clock", args));
    Ok(None)
}

/// Copies `len` bytes `count` times from `src` to `dst` by DMA, queue kept busy; returns
/// the time from the first descriptor written to the last completion seen.
fn dma_copies(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    src: &DmaBuffer,
    dst: &DmaBuffer,
    len: usize,
    count: usize,
) -> Result<Duration, Failure> {
    let desc = Descriptor::copy(src.bus_addr(), dst.bus_addr(), len as u32);
    let records = cpl.len();
    let start = Instant::now();
    let (mut submitted, mut completed) = (0usize, 0usize);
    while completed < count {
        let mut pushed = false;
        loop {
            let n = BATCH.min(count - submitted);
            if n == 0 || IN_FLIGHT - (submitted - completed) < n {
                break;
            }
            for k in submitted..submitted + n {
                let r = k % records;
                cpl.clear(r);
                q.push(&desc.with_completion(cpl.device_addr(r)))?;
            }
            submitted += n;
            pushed = true;
        }
        if pushed {
            q.doorbell()?;
        }
        let c = spin_completion(cpl, completed % records)?;
        check_status(&c, spec::STATUS_OK, format_args!("{len}-byte COPY"))?;
        check!(
            c.bytes as usize == len,
            "{len}-byte COPY completed {} bytes",
            c.bytes
        );
        completed += 1;
    }
    Ok(start.elapsed())
}

/// The guest copies `len` bytes `count` times from `src` to `dst`.
fn memcpy_copies(src: &DmaBuffer, dst: &DmaBuffer, len: usize, count: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..count {
        // SAFETY: every descriptor naming the buffers completed before this call (the DMA
        // measurement waits for all of them), `len` is at most the buffers' length (checked
        // by the caller's allocation) and they are distinct allocations.
        unsafe { guest_memcpy(src, dst, len) };
    }
    start.elapsed()
}

/// Marks the ends of `dst[..len]` so that a DMA that did not rewrite them shows.
fn mark(dst: &DmaBuffer, len: usize) {
    dst.write_u64(0, !0);
    dst.write_u64(len - 8, !0);
}

/// Checks that `dst[..len]` equals `src[..len]` at the marked ends (or everywhere).
fn check_copied(src: &DmaBuffer, dst: &DmaBuffer, len: usize, whole: bool) -> PlatformResult {
    if whole {
        check!(
            dst.to_vec(0, len) == src.to_vec(0, len),
            "after the {len}-byte COPYs the destination does not hold the source's bytes"
        );
    } else {
        for at in [0, len - 8] {
            check!(
                dst.read_u64(at) == src.read_u64(at),
                "after the {len}-byte COPYs the destination's word at {at:#x} is {:#x}, the \
                 source's {:#x}",
                dst.read_u64(at),
                src.read_u64(at)
            );
        }
    }
    Ok(None)
}

/// `bench::throughput_*`: COPY against memcpy for every size, on `pages`.
fn throughput(ctx: &mut Ctx, args: &BenchArgs, pages: PageKind) -> PlatformResult {
    let label = match pages {
        PageKind::Base => "4K",
        PageKind::Huge2M => "2M",
    };
    let dev = ctx.shared()?;
    let dev: &dyn DmaBackend = &*dev;
    let (mut q, cpl) = bench_queue(dev)?;
    let largest = SIZES[SIZES.len() - 1];
    let req = DmaRequest {
        len: largest,
        pages,
        node: None,
    };
    let buffers = dev
        .alloc_dma(req)
        .and_then(|s| dev.alloc_dma(req).map(|d| (s, d)));
    let (src, dst) = match buffers {
        Ok(b) => b,
        Err(e) if pages == PageKind::Huge2M => {
            let reason = format!("no two 2 MiB-page DMA buffers in this guest profile: {e}");
            emit(&Record::Skipped {
                what: format!("throughput {label}"),
                reason: reason.clone(),
            });
            return Ok(Some(reason));
        }
        Err(e) => return Err(e.into()),
    };
    let total = u64::from(args.bench_mib) * MIB as u64;
    src.write(0, &unique_data(0x5eed, largest));
    // Warm-up, untimed: every size once each way; the first DMA of each size is checked
    // byte for byte.
    for &len in &SIZES {
        dst.fill(0, len, 0);
        dma_copies(&mut q, &cpl, &src, &dst, len, 1)?;
        check_copied(&src, &dst, len, true)?;
        memcpy_copies(&src, &dst, len, 1);
    }
    let mut dma = vec![Vec::new(); SIZES.len()];
    let mut cpu = vec![Vec::new(); SIZES.len()];
    for round in 0..args.bench_rounds {
        for (s, &len) in SIZES.iter().enumerate() {
            let count = (total as usize / len).max(1);
            let bytes = (count * len) as u64;
            let dma_first = (round as usize + s) % 2 == 0;
            for part in 0..2 {
                if (part == 0) == dma_first {
                    mark(&dst, len);
                    let t = dma_copies(&mut q, &cpl, &src, &dst, len, count)?;
                    check_copied(&src, &dst, len, false)?;
                    dma[s].push(mib_per_s(bytes, t));
                } else {
                    let t = memcpy_copies(&src, &dst, len, count);
                    cpu[s].push(mib_per_s(bytes, t));
                }
            }
        }
        progress!(
            "         round {} ({label} pages): {}",
            round + 1,
            SIZES
                .iter()
                .enumerate()
                .map(|(s, &len)| format!(
                    "{} KiB {:.2}x",
                    len >> 10,
                    dma[s][round as usize] / cpu[s][round as usize]
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (s, &len) in SIZES.iter().enumerate() {
        let ratios: Vec<f64> = dma[s].iter().zip(&cpu[s]).map(|(d, c)| d / c).collect();
        emit(&Record::Throughput {
            pages: label.to_owned(),
            bytes: len,
            count: (total as usize / len).max(1),
            rounds: args.bench_rounds,
            dma_mib_s: median(&dma[s]),
            memcpy_mib_s: median(&cpu[s]),
            ratio: median(&ratios),
            ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratio_max: ratios.iter().copied().fold(0.0, f64::max),
            round_dma_mib_s: dma[s].clone(),
            round_memcpy_mib_s: cpu[s].clone(),
        });
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn mib_per_s_of_a_second() {
        assert_eq!(mib_per_s(3 << 20, Duration::from_secs(1)), 3.0);
        assert_eq!(mib_per_s(1 << 20, Duration::from_millis(500)), 2.0);
    }

    #[test]
    fn latency_rounds_take_medians_and_extremes() {
        let mut r = LatencyRounds::default();
        r.add(&[5.0, 1.0, 3.0]);
        r.add(&[10.0, 2.0, 6.0]);
        r.add(&[4.0, 4.0, 4.0]);
        assert_eq!(r.p50, [3.0, 6.0, 4.0]);
        assert_eq!(r.min, 1.0);
        assert_eq!(r.max, 10.0);
        let args = BenchArgs {
            bench: true,
            bench_rounds: 3,
            bench_samples: 3,
            bench_mib: 1,
        };
        match r.record("poll", &args) {
            Record::Latency {
                p50_us,
                p99_us,
                rounds,
                ..
            } => {
                assert_eq!(p50_us, 4.0);
                assert_eq!(p99_us, 5.0);
                assert_eq!(rounds, 3);
            }
            other => panic!("not a latency record: {other:?}"),
        }
    }

    #[test]
    fn bench_line_is_one_tagged_json_line() {
        let l = bench_line(&Record::Skipped {
            what: "latency irq".into(),
            reason: "no \"MSI-X\"\nhere".into(),
        });
        assert!(l.starts_with("DOMDMA-BENCH {"), "{l}");
        assert!(!l.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&l["DOMDMA-BENCH ".len()..]).unwrap();
        assert_eq!(v["kind"], "skipped");
        assert_eq!(v["what"], "latency irq");
        assert_eq!(v["reason"], "no \"MSI-X\"\nhere");
    }

    #[test]
    fn bench_names_are_distinct_and_prefixed() {
        let names: Vec<&str> = all().iter().map(|b| b.name).collect();
        assert!(names.iter().all(|n| n.starts_with("bench::")), "{names:?}");
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }
}
