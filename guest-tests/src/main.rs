//! `domdma-guest-tests`: the guest side of the end-to-end run. Runs inside the QEMU guest
//! (as root, from a busybox initramfs, hence statically linked) against the domdma device
//! through VFIO: a few guest-only tests (`guest::*`: sysfs identity, the two BAR0 access
//! paths), then the whole conformance suite (`domdma_testkit::conformance`) on the VFIO
//! back end, under the same scenario names `cargo test` uses for the host back ends.
//!
//! Human progress goes to stderr. For each test, exactly one line goes to stdout, skipped
//! tests included (with the reason as the message):
//!
//! ```text
//! DOMDMA-RESULT {"name":"ops::copy_1mib","passed":true,"skipped":false,"duration_ms":12.5,"message":""}
//! ```
//!
//! `--list` prints every test name: the host runner runs it (on the host) to know which
//! results to expect. The exit status is 0 if and only if no selected test failed.
//!
//! `--bench` runs the guest bench instead of the suite (see [`bench`](mod@bench)): latency and
//! throughput as the guest sees them, each measurement reported as a `bench::*` result line
//! and its numbers as `DOMDMA-BENCH {json}` lines.

mod bench;
mod harness;
mod platform;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use domdma_driver_model::backend::vfio::{
    reserve_hugepages_2m, reserve_hugepages_2m_on_node, VfioOptions,
};
use domdma_driver_model::wdf;
use domdma_testkit::check::Failure;
use domdma_testkit::conformance::{self, Env, Outcome};
use domdma_testkit::progress;

use harness::Ctx;

/// 2 MiB pages the runner makes free before the suite: enough for every scenario's
/// huge-page buffers at once, on the device's node as well.
const HUGE_PAGES: u64 = 24;
/// Of those, on the device's NUMA node.
const HUGE_PAGES_ON_DEVICE_NODE: u64 = 12;

/// The domdma guest test suite.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Print the names of the tests that would run (after --filter), one per line, and exit.
    #[arg(long)]
    list: bool,
    /// Run only the tests whose name contains this string.
    #[arg(long, value_name = "SUBSTR")]
    filter: Option<String>,
    /// PCI address of the device (default: the first 1234:dd0a device).
    #[arg(long, value_name = "DDDD:BB:DD.F")]
    bdf: Option<String>,
    /// Access BAR0 with pread/pwrite even when VFIO offers mmap.
    #[arg(long)]
    no_mmap: bool,
    /// The guest profile this run is (named in skip reasons).
    #[arg(long, default_value = "default")]
    profile: String,
    /// Seed of the scenarios' random data (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How to reach the device: VFIO behind the emulated IOMMU, or without an IOMMU
    /// (sysfs resource0, physical addresses from /proc/self/pagemap, polling).
    #[arg(long, value_enum, default_value = "vfio")]
    backend: harness::Backend,
    #[command(flatten)]
    bench: bench::BenchArgs,
}

/// A test the binary runs.
enum Entry {
    Platform(harness::Test),
    Scenario(conformance::Scenario),
    /// A measurement of the guest bench (`--bench`).
    Bench(bench::Bench),
    /// Last: every public function of the WDF facade was called by the tests before it.
    FacadeCoverage,
}

/// Name of the facade coverage check.
const FACADE_COVERAGE: &str = "guest::wdf_facade_coverage";

impl Entry {
    fn name(&self) -> String {
        match self {
            Entry::Platform(t) => t.name.to_string(),
            Entry::Scenario(s) => s.full_name(),
            Entry::Bench(b) => b.name.to_string(),
            Entry::FacadeCoverage => FACADE_COVERAGE.to_string(),
        }
    }
}

/// The tests of a run: the suite, or with `bench` the guest bench's measurements.
fn all(bench: bool) -> Vec<Entry> {
    if bench {
        return bench::all().into_iter().map(Entry::Bench).collect();
    }
    platform::all()
        .into_iter()
        .map(Entry::Platform)
        .chain(conformance::all().into_iter().map(Entry::Scenario))
        .chain([Entry::FacadeCoverage])
        .collect()
}

/// Whether the run called every public function of the WDF facade (only meaningful when
/// every scenario ran).
fn facade_coverage(whole_suite: bool) -> Outcome {
    if !whole_suite {
        return Outcome::Skipped("only checked when the whole suite runs (no --filter)".into());
    }
    let missing = wdf::coverage::not_called();
    if missing.is_empty() {
        Outcome::Passed
    } else {
        Outcome::Failed(format!(
            "{} of {} public WDF facade functions were never called by the suite: {}",
            missing.len(),
            wdf::coverage::FUNCTIONS.len(),
            missing.join(", ")
        ))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,vfio_ioctls=error")),
        )
        .try_init();

    let all = all(args.bench.bench);
    let selected: Vec<&Entry> = all
        .iter()
        .filter(|t| args.filter.as_deref().is_none_or(|f| t.name().contains(f)))
        .collect();
    if args.list {
        for t in &selected {
            println!("{}", t.name());
        }
        return ExitCode::SUCCESS;
    }
    if selected.is_empty() {
        progress!(
            "no test matches --filter {:?}; use --list",
            args.filter.unwrap_or_default()
        );
        return ExitCode::from(2);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    progress!("seed {seed} (--seed {seed} repeats this run's data)");

    let opts = VfioOptions {
        bdf: args.bdf.clone(),
        allow_mmap: !args.no_mmap,
        ..VfioOptions::default()
    };
    let mut ctx = Ctx::new(args.backend, opts);
    reserve_huge_pages(&mut ctx);
    if args.bench.bench {
        match bench::env_record(&mut ctx, &args.profile, &args.bench) {
            Ok(env) => bench::emit(&env),
            Err(Failure(m)) => progress!("         the bench has no device: {m}"),
        }
    }
    let suite_start = Instant::now();
    let (mut failed, mut skipped) = (Vec::new(), 0usize);
    for t in &selected {
        let name = t.name();
        progress!("[ RUN  ] {name}");
        let start = Instant::now();
        let outcome = match t {
            Entry::Platform(p) => match (p.run)(&mut ctx) {
                Ok(None) => Outcome::Passed,
                Ok(Some(why)) => Outcome::Skipped(why),
                Err(Failure(m)) => Outcome::Failed(m),
            },
            Entry::Bench(b) => match (b.run)(&mut ctx, &args.bench) {
                Ok(None) => Outcome::Passed,
                Ok(Some(why)) => Outcome::Skipped(why),
                Err(Failure(m)) => Outcome::Failed(m),
            },
            Entry::FacadeCoverage => facade_coverage(selected.len() == all.len()),
            Entry::Scenario(s) => match ctx.shared() {
                Ok(backend) => {
                    let env = Env {
                        backend: backend.info().backend,
                        profile: args.profile.clone(),
                        platform_iommu: args.backend == harness::Backend::Vfio,
                        kernel_numa: true,
                        huge_pages: ctx.huge_pages_free(),
                        seed,
                    };
                    conformance::run(s, &backend, &env).outcome
                }
                Err(Failure(m)) => Outcome::Failed(m),
            },
        };
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let (passed, skip, message) = match &outcome {
            Outcome::Passed => (true, false, String::new()),
            Outcome::Skipped(why) => (false, true, why.clone()),
            Outcome::Failed(m) => (false, false, m.clone()),
        };
        match &outcome {
            Outcome::Passed => progress!("[  OK  ] {name} ({ms:.1} ms)"),
            Outcome::Skipped(why) => {
                skipped += 1;
                progress!("[ SKIP ] {name}: {why}")
            }
            Outcome::Failed(m) => {
                progress!("[ FAIL ] {name} ({ms:.1} ms): {m}");
                failed.push(name.clone());
            }
        }
        harness::print_result(&name, passed, skip, ms, &message);
    }
    drop(ctx);
    let _ = std::io::stdout().flush();
    progress!(
        "{} passed, {} failed, {skipped} skipped, {:.1} s{}",
        selected.len() - failed.len() - skipped,
        failed.len(),
        suite_start.elapsed().as_secs_f64(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" (failed: {})", failed.join(", "))
        }
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Makes 2 MiB pages free for the scenarios' huge-page buffers, on the device's node too.
/// A shortage is not fatal: scenarios that need more pages than are free skip, naming it.
fn reserve_huge_pages(ctx: &mut Ctx) {
    if let Err(e) = reserve_hugepages_2m(HUGE_PAGES) {
        progress!("         reserving {HUGE_PAGES} huge pages: {e}");
    }
    if ctx.backend != harness::Backend::Vfio {
        return;
    }
    let node = ctx
        .shared()
        .ok()
        .and_then(|d| d.info().numa_node)
        .unwrap_or(0);
    if let Err(e) = reserve_hugepages_2m_on_node(node, HUGE_PAGES_ON_DEVICE_NODE) {
        progress!("         reserving {HUGE_PAGES_ON_DEVICE_NODE} huge pages on node {node}: {e}");
    }
}
