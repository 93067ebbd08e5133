//! `domdma-vm`: the host runner of the guest test suite.
//!
//! `domdma-vm run` starts the device server, then QEMU with the device attached over
//! vfio-user, waits for the guest to report ready on its serial console, copies the guest test
//! binary in over SSH, runs it, and writes `junit.xml` with the device, QEMU, serial and guest
//! logs beside it. `domdma-vm kvm-probe` tells whether /dev/kvm really runs a guest.
//! `domdma-vm run --bench` runs the guest bench instead of the suite and writes `bench.json`
//! and `bench.txt` beside the logs (see [`bench`](mod@bench)).
//!
//! `cargo test` never boots a VM: the tests here cover the pure parts (command line, result
//! parsing, JUnit, serial scanning) and process handling with stand-in programs.

mod bench;
mod bench_report;
mod device;
mod kvm;
mod merge;
mod process;
mod profile;
mod qemu;
mod report;
mod results;
mod runner;
mod serial;
mod ssh;
mod tempdir;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::kvm::AccelChoice;
use crate::process::Interrupt;
use crate::profile::Profile;
use crate::qemu::{DEFAULT_KERNEL_APPEND, DEFAULT_MEMORY_MIB, DEFAULT_SMP};
use crate::runner::RunOptions;

/// Exit status when a test failed.
const EXIT_FAILED: u8 = 1;
/// Exit status when the run could not be set up.
const EXIT_SETUP: u8 = 2;
/// Exit status after SIGINT/SIGTERM (128 + SIGINT).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Parser)]
#[command(
    name = "domdma-vm",
    version,
    about = "domdma host runner: device server + QEMU + guest suite over SSH"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the device server and QEMU, run the guest suite over SSH, write JUnit XML.
    Run(Box<RunArgs>),
    /// Exit 0 if /dev/kvm runs a guest, non-zero with the reason otherwise.
    KvmProbe,
    /// Merge the runs of several guest profiles (OUT/PROFILE/junit.xml) into OUT/junit.xml
    /// and print one row per profile; exit 1 if a profile failed or has no report.
    Summary(SummaryArgs),
    /// Write DIR/report.md with SVG plots from the benchmark figures `scripts/bench` left
    /// in DIR (engine.tsv, roundtrip.json, lookaside.tsv and their meta-*.json).
    BenchReport(BenchReportArgs),
}

#[derive(Debug, Args)]
struct BenchReportArgs {
    /// The directory holding the figures; the report and plots are written there.
    #[arg(long, value_name = "DIR", default_value = "target/domdma/bench")]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct SummaryArgs {
    /// The directory holding one directory per profile.
    #[arg(long, value_name = "DIR", default_value = "target/domdma/guest")]
    out: PathBuf,
    /// Wall-clock seconds the profiles took together (printed).
    #[arg(long, value_name = "SECS")]
    wall: Option<f64>,
    /// Also append the table and the failed tests, as Markdown, to this file (for example
    /// $GITHUB_STEP_SUMMARY).
    #[arg(long, value_name = "FILE")]
    markdown: Option<PathBuf>,
    /// The profiles, in order.
    #[arg(required = true)]
    profiles: Vec<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The device server binary (`domdma-device`).
    #[arg(
        long,
        value_name = "PATH",
        env = "DOMDMA_DEVICE_BIN",
        required_unless_present = "no_device"
    )]
    device_bin: Option<PathBuf>,
    /// Argument passed to the device server after `--socket PATH` (repeatable), e.g.
    /// `--device-arg=--iova-width --device-arg=32` or `--device-arg=--strict-iotlb`.
    #[arg(long = "device-arg", value_name = "ARG", allow_hyphen_values = true)]
    device_args: Vec<String>,
    /// Boot without the vfio-user device (debugging boot and SSH); --device-bin is ignored.
    #[arg(long)]
    no_device: bool,
    /// The guest test binary (static), or any executable printing DOMDMA-RESULT lines.
    #[arg(long, value_name = "PATH", env = "DOMDMA_GUEST_BIN")]
    guest_bin: PathBuf,
    /// Argument passed to the guest binary (repeatable).
    #[arg(long = "guest-arg", value_name = "ARG", allow_hyphen_values = true)]
    guest_args: Vec<String>,
    /// Output directory: junit.xml and the device, QEMU, serial, SSH and guest logs.
    #[arg(long, value_name = "DIR", default_value = "target/domdma/guest")]
    out: PathBuf,
    /// QEMU >= 10.1 with vfio-user-pci (the provisioned wrapper).
    #[arg(long, value_name = "PATH", env = "DOMDMA_QEMU")]
    qemu: PathBuf,
    /// Guest kernel.
    #[arg(long, value_name = "PATH", env = "DOMDMA_KERNEL")]
    kernel: PathBuf,
    /// Guest initramfs.
    #[arg(long, value_name = "PATH", env = "DOMDMA_INITRD")]
    initrd: PathBuf,
    /// ed25519 private key for root in the guest.
    #[arg(long, value_name = "PATH", env = "DOMDMA_SSH_KEY")]
    ssh_key: PathBuf,
    /// Accelerator. auto: KVM if the CPU has VMX/SVM and a throwaway VM runs (probed in a
    /// child with a time limit), else TCG; a guest that does not boot under KVM is retried
    /// under TCG.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto, env = "DOMDMA_ACCEL")]
    accel: AccelChoice,
    /// Kill QEMU while the suite runs, then run the suite on a second QEMU against the same
    /// device server (host case host.device_server_survives_qemu_kill).
    #[arg(long)]
    reconnect_check: bool,
    /// With --reconnect-check: kill QEMU #1 when this many guest results arrived (or 20 s into
    /// the suite, whichever comes first).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        requires = "reconnect_check"
    )]
    kill_after: usize,
    /// Time limit for the guest suite, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// Time limit for boot to ready, in seconds [default: 120 under TCG, 30 under KVM].
    #[arg(long, value_name = "SECS")]
    boot_timeout: Option<u64>,
    /// Guest NUMA nodes: 2 puts the device behind a PCIe expander bridge on node 1 (memory
    /// and vCPUs split evenly); 1 is a flat machine with the device on the root bus.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    numa_nodes: u8,
    /// vCPUs.
    #[arg(long, default_value_t = DEFAULT_SMP)]
    smp: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEMORY_MIB)]
    memory_mib: u64,
    /// Guest kernel command line.
    #[arg(long, default_value = DEFAULT_KERNEL_APPEND)]
    append: String,
    /// Extra QEMU argument, appended last (repeatable).
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    qemu_args: Vec<String>,
    /// A guest test that must report a result (repeatable); a missing one fails. Every
    /// test the guest binary's `--list` names is expected anyway.
    #[arg(long, value_name = "NAME")]
    expect: Vec<String>,
    /// The guest test that proves QEMU #2's guest found the device [default: the first result].
    #[arg(long, value_name = "NAME")]
    device_test: Option<String>,
    /// A guest profile (qemu/profiles/NAME.toml): NUMA nodes, IOMMU, device and guest
    /// options. Its options come before --device-arg / --guest-arg ones; its NUMA layout
    /// replaces --numa-nodes.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Run the guest bench instead of the suite (the guest binary with --bench): COPY
    /// latency (polling, MSI-X) and throughput against the guest's memcpy, measured inside
    /// the guest. Writes bench.json and bench.txt (the table) in --out and prints the table.
    /// Bench options go to the guest binary, e.g. --guest-arg=--bench-rounds
    /// --guest-arg=9 (see its --help).
    #[arg(long)]
    bench: bool,
}

impl RunArgs {
    fn into_options(mut self) -> Result<RunOptions, profile::ProfileError> {
        let mut iommu = true;
        let mut shared_memory = true;
        let mut profile_name = None;
        let mut expect_injected = None;
        if let Some(path) = &self.profile {
            let p = Profile::load(path)?;
            expect_injected = p.expect_injected.clone();
            self.numa_nodes = p.numa_nodes;
            iommu = p.iommu;
            shared_memory = p.shared_memory;
            self.device_args = p.device_args.into_iter().chain(self.device_args).collect();
            self.guest_args = ["--profile".to_string(), p.name.clone()]
                .into_iter()
                .chain(p.guest_args)
                .chain(self.guest_args)
                .collect();
            if !iommu {
                self.append = self
                    .append
                    .split_whitespace()
                    .filter(|w| !w.starts_with("intel_iommu="))
                    .collect::<Vec<_>>()
                    .join(" ");
            }
            profile_name = Some(p.name);
        }
        if self.bench {
            self.guest_args.push("--bench".into());
        }
        Ok(RunOptions {
            device_bin: if self.no_device {
                None
            } else {
                self.device_bin
            },
            device_args: self.device_args,
            expect_injected,
            guest_bin: self.guest_bin,
            guest_args: self.guest_args,
            out: self.out,
            qemu: self.qemu,
            kernel: self.kernel,
            initrd: self.initrd,
            ssh_key: self.ssh_key,
            accel: self.accel,
            reconnect_check: self.reconnect_check,
            kill_after: self.kill_after,
            timeout: Duration::from_secs(self.timeout),
            boot_timeout: self.boot_timeout.map(Duration::from_secs),
            numa: self.numa_nodes == 2,
            smp: self.smp,
            memory_mib: self.memory_mib,
            append: self.append,
            qemu_args: self.qemu_args,
            expect: self.expect,
            device_test: self.device_test,
            iommu,
            shared_memory,
            profile: profile_name,
            bench: self.bench,
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::KvmProbe => kvm_probe(),
        Command::Summary(args) => summary(&args),
        Command::BenchReport(args) => match bench_report::write_report(&args.dir) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("domdma-vm bench-report: {err}");
                ExitCode::from(EXIT_SETUP)
            }
        },
        Command::Run(args) => match args.into_options() {
            Ok(opts) => run(opts),
            Err(err) => {
                eprintln!("domdma-vm: {err}");
                ExitCode::from(EXIT_SETUP)
            }
        },
    }
}

fn summary(args: &SummaryArgs) -> ExitCode {
    match merge::merge(&args.out, &args.profiles) {
        Ok(rows) => {
            let wall = args.wall.and_then(|s| Duration::try_from_secs_f64(s).ok());
            print!("{}", merge::table(&rows, wall));
            println!("  junit          {}", args.out.join("junit.xml").display());
            if let Some(path) = &args.markdown {
                use std::io::Write as _;
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(merge::markdown(&rows).as_bytes()));
                if let Err(e) = written {
                    eprintln!("domdma-vm: writing {}: {e}", path.display());
                    return ExitCode::from(EXIT_SETUP);
                }
            }
            if rows.iter().all(merge::Row::ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(err) => {
            eprintln!("domdma-vm: {}", error_chain(&err));
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn kvm_probe() -> ExitCode {
    match kvm::probe() {
        Ok(()) => {
            println!("KVM ran the probe guest");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}", error_chain(&err));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(opts: RunOptions) -> ExitCode {
    let interrupt = match Interrupt::install() {
        Ok(interrupt) => interrupt,
        Err(err) => {
            eprintln!("domdma-vm: {}", error_chain(&err));
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if let Ok(version) = std::env::var("DOMDMA_QEMU_VERSION") {
        tracing::info!(%version, qemu = %opts.qemu.display(), "QEMU");
    }
    let started = Instant::now();
    let load_at_start = bench::HostLoad::now();
    let outcome = match runner::run(&opts, &interrupt) {
        Ok(outcome) => outcome,
        Err(err) => {
            eprintln!("domdma-vm: {}", error_chain(&err));
            return ExitCode::from(if interrupt.is_set() {
                EXIT_INTERRUPTED
            } else {
                EXIT_SETUP
            });
        }
    };
    let total = started.elapsed();
    let junit = opts.out.join("junit.xml");
    let mut code = if !outcome.cases.iter().any(|c| c.failed()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    };
    if let Err(err) = report::write_junit(&junit, &outcome.cases, total) {
        eprintln!("domdma-vm: {}", error_chain(&err));
        code = ExitCode::from(EXIT_FAILED);
    }
    if opts.bench {
        let load = [load_at_start, bench::HostLoad::now()];
        if let Err(err) = write_bench(&opts, &outcome, load) {
            eprintln!("domdma-vm: {}", error_chain(&err));
            code = ExitCode::from(EXIT_FAILED);
        }
    }
    println!();
    print!("{}", report::summary(&outcome.cases, total, &outcome.files));
    if outcome.interrupted {
        return ExitCode::from(EXIT_INTERRUPTED);
    }
    code
}

/// Writes the bench report (bench.json, bench.txt) of a `--bench` run and prints the table.
/// A run that measured nothing still gets its report (saying so); the bench::* cases carry
/// the failure.
fn write_bench(
    opts: &RunOptions,
    outcome: &runner::RunOutcome,
    host_load: [bench::HostLoad; 2],
) -> Result<(), bench::BenchError> {
    let (accelerator, accelerator_reason) = match &outcome.accel {
        Some((accel, why)) => (accel.to_string(), why.clone()),
        None => ("none".to_owned(), "no guest was started".to_owned()),
    };
    let report = bench::BenchReport {
        profile: opts.profile.clone(),
        accelerator,
        accelerator_reason,
        qemu_version: std::env::var("DOMDMA_QEMU_VERSION").ok(),
        device_args: opts.device_args.clone(),
        host_load,
        records: outcome.bench.clone(),
    };
    let (json, txt) = report.write(&opts.out)?;
    println!();
    print!("{}", report.table());
    println!("  bench report   {}", json.display());
    println!("  bench table    {}", txt.display());
    Ok(())
}

/// "message: cause: cause" for an error and its sources.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `domdma-vm run` with the required inputs (no device) and `extra`.
    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec![
            "domdma-vm",
            "run",
            "--guest-bin",
            "g",
            "--qemu",
            "q",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--ssh-key",
            "s",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => Ok(*args),
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn run_args_parse_with_defaults() {
        let args = run_args(&[
            "--no-device",
            "--qemu-arg",
            "-d",
            "--qemu-arg",
            "guest_errors",
        ]);
        let opts = args.unwrap().into_options().unwrap();
        assert!(opts.device_bin.is_none());
        assert_eq!(opts.out, PathBuf::from("target/domdma/guest"));
        assert_eq!(opts.accel, AccelChoice::Auto);
        assert_eq!(opts.timeout, Duration::from_secs(300));
        assert_eq!(opts.qemu_args, ["-d", "guest_errors"]);
        assert_eq!(opts.append, DEFAULT_KERNEL_APPEND);
        assert!(opts.numa && opts.iommu);
        assert_eq!(opts.profile, None);
        assert!(!opts.bench);
    }

    /// --bench runs the guest binary with --bench, after the profile's arguments.
    #[test]
    fn bench_passes_bench_to_the_guest() {
        let opts = run_args(&[
            "--no-device",
            "--bench",
            "--guest-arg=--bench-rounds",
            "--guest-arg=3",
        ])
        .unwrap()
        .into_options()
        .unwrap();
        assert!(opts.bench);
        assert_eq!(opts.guest_args, ["--bench-rounds", "3", "--bench"]);
    }

    #[test]
    fn numa_nodes_are_one_or_two() {
        let one = run_args(&["--no-device", "--numa-nodes", "1"]).expect("--numa-nodes 1");
        assert!(!one.into_options().unwrap().numa);
        assert!(run_args(&["--no-device", "--numa-nodes", "3"]).is_err());
        assert!(run_args(&["--no-device", "--numa-nodes", "0"]).is_err());
    }

    #[test]
    fn device_bin_is_required_unless_no_device() {
        // The environment may provide it; only check when it does not.
        if std::env::var_os("DOMDMA_DEVICE_BIN").is_none() {
            assert!(run_args(&[]).is_err());
        }
        assert!(run_args(&["--device-bin", "d"]).is_ok());
    }

    /// A profile sets the NUMA layout and the IOMMU, and its options come before the
    /// command line's; without an IOMMU the kernel is not told to use one.
    #[test]
    fn a_profile_sets_layout_iommu_and_options() {
        let dir = crate::tempdir::TempDir::new("domdma-profile.").unwrap();
        let path = dir.path().join("bare.toml");
        std::fs::write(
            &path,
            "description = \"x\"\nnuma_nodes = 1\niommu = false\n\
             device_args = [\"--queues\", \"2\"]\nguest_args = [\"--backend\", \"noiommu\"]\n",
        )
        .unwrap();
        let args = run_args(&[
            "--no-device",
            "--profile",
            path.to_str().unwrap(),
            "--device-arg=--strict-iotlb",
            "--guest-arg=--seed",
            "--guest-arg=7",
        ]);
        let opts = args.unwrap().into_options().unwrap();
        assert!(!opts.numa && !opts.iommu);
        assert_eq!(opts.profile.as_deref(), Some("bare"));
        assert_eq!(opts.device_args, ["--queues", "2", "--strict-iotlb"]);
        assert_eq!(
            opts.guest_args,
            ["--profile", "bare", "--backend", "noiommu", "--seed", "7"]
        );
        assert!(!opts.append.contains("intel_iommu"), "{}", opts.append);
        let missing = run_args(&["--no-device", "--profile", "/nonexistent/x.toml"]);
        let e = missing.unwrap().into_options().unwrap_err().to_string();
        assert!(e.contains("qemu/profiles/NAME.toml"), "{e}");
    }

    #[test]
    fn error_chain_joins_sources() {
        let err = report::ReportError::Write {
            path: "/x/junit.xml".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        let text = error_chain(&err);
        assert!(
            text.starts_with("cannot write /x/junit.xml: No space left"),
            "{text}"
        );
    }
}
