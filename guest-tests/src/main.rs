//! `domdma-guest-tests`: the guest test suite. Runs inside the QEMU guest (as root, from a
//! busybox initramfs, hence statically linked) against the domdma device through VFIO.
//!
//! Human progress goes to stderr. For each test, exactly one line goes to stdout:
//!
//! ```text
//! DOMDMA-RESULT {"name":"copy_1mib","passed":true,"duration_ms":12.5,"message":""}
//! ```
//!
//! The exit status is 0 if and only if every selected test passed.

mod harness;
mod suite;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use domdma_driver_model::backend::vfio::VfioOptions;

use harness::{Ctx, TestOutcome};

/// The domdma guest test suite.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Print the test names, one per line, and exit.
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

    let all = suite::all();
    if args.list {
        for t in &all {
            println!("{}", t.name);
        }
        return ExitCode::SUCCESS;
    }
    let selected: Vec<_> = all
        .iter()
        .filter(|t| args.filter.as_deref().is_none_or(|f| t.name.contains(f)))
        .collect();
    if selected.is_empty() {
        progress!(
            "no test matches --filter {:?}; use --list",
            args.filter.unwrap_or_default()
        );
        return ExitCode::from(2);
    }

    let opts = VfioOptions {
        bdf: args.bdf,
        allow_mmap: !args.no_mmap,
        ..VfioOptions::default()
    };
    let mut ctx = Ctx::new(opts);
    let suite_start = Instant::now();
    let mut failed = Vec::new();
    for t in &selected {
        progress!("[ RUN  ] {}", t.name);
        let start = Instant::now();
        let outcome = harness::run_test(t, &mut ctx);
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let (passed, message) = match outcome {
            TestOutcome::Passed => (true, String::new()),
            TestOutcome::Failed(m) => (false, m),
        };
        if passed {
            progress!("[  OK  ] {} ({ms:.1} ms)", t.name);
        } else {
            progress!("[ FAIL ] {} ({ms:.1} ms): {message}", t.name);
            failed.push(t.name);
        }
        harness::print_result(t.name, passed, ms, &message);
    }
    drop(ctx);
    let _ = std::io::stdout().flush();
    progress!(
        "{} passed, {} failed, {:.1} s{}",
        selected.len() - failed.len(),
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
