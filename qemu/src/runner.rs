//! `domdma-vm run`: the device server beside QEMU, the guest suite over SSH, JUnit out.
//!
//! Order matters and is fixed here: device server first (QEMU refuses to start without a
//! listening socket), then QEMU, then wait for the guest's ready line on the serial console,
//! then one SSH master connection, copy the test binary in, run it and stream its output.
//! Everything started is owned by a guard that stops it on every way out (error, panic,
//! Ctrl-C); QEMU always goes before the device server.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use domdma_device::trace::view::{perfetto, Summary};
use tracing::{info, warn};

use crate::device::{DeviceError, DeviceServer};
use crate::kvm::{self, AccelChoice};
use crate::process::{
    describe_status, log_file_stdio, sleep_unless_interrupted, ChildGuard, Interrupt, StopPolicy,
    POLL_INTERVAL,
};
use crate::qemu::{shell_quote, Accel, QemuConfig, QemuError};
use crate::report::{format_duration, tail_file, tail_lines, CaseResult};
use crate::results::{parse_line, GuestResult};
use crate::serial::{SerialEvent, SerialWatcher};
use crate::ssh::{self, SshConfig, SshError};
use crate::tempdir::{fits_socket_path, TempDir, TempDirError};

/// Where the guest binary goes in the guest.
pub const GUEST_BIN_PATH: &str = "/tmp/domdma-guest-tests";

/// Time the device server gets to listen.
const DEVICE_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Time to ready under TCG.
const BOOT_TIMEOUT_TCG: Duration = Duration::from_secs(120);
/// Time to ready under KVM.
const BOOT_TIMEOUT_KVM: Duration = Duration::from_secs(30);
/// After a guest init error, time the guest still gets to report ready (its init carries on
/// after non-fatal errors so the host can look around).
const GUEST_ERROR_GRACE: Duration = Duration::from_secs(10);
/// SSH master connection attempts after the ready line, and the time each gets.
const SSH_ATTEMPTS: u32 = 5;
const SSH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Time limit for copying the guest binary in.
const COPY_TIMEOUT: Duration = Duration::from_secs(120);
/// QEMU's grace period after SIGTERM.
const QEMU_STOP_GRACE: Duration = Duration::from_secs(3);
/// With --reconnect-check, QEMU #1 is killed at the `kill_after`-th result line, or this long
/// into the suite if the results are slow to come.
const KILL_DELAY: Duration = Duration::from_secs(20);
/// After killing QEMU #1, time the server gets to notice before it is checked.
const SETTLE_AFTER_KILL: Duration = Duration::from_secs(1);
/// How often a QEMU start is retried when its SSH forward port was taken meanwhile.
const PORT_RETRIES: u32 = 3;
/// Lines of logs quoted in failure messages.
const TAIL: usize = 30;

/// Name of the host case for the QEMU-kill check.
pub const SURVIVAL_CASE: &str = "host.device_server_survives_qemu_kill";

/// Errors that stop a run before any test could run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The output directory could not be prepared.
    #[error("cannot prepare output directory {}", path.display())]
    OutDir {
        /// The directory.
        path: PathBuf,
        /// The error from the file system.
        #[source]
        source: std::io::Error,
    },
    /// An input file is missing.
    #[error("{what} {} does not exist (see --help for the options and environment variables)", path.display())]
    MissingInput {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The SSH key is unusable.
    #[error(transparent)]
    Ssh(#[from] SshError),
    /// No private temporary directory.
    #[error(transparent)]
    TempDir(#[from] TempDirError),
    /// The socket path is too long for a UNIX socket.
    #[error("socket path {} is too long for a UNIX socket; set TMPDIR to a shorter directory", path.display())]
    SocketPath {
        /// The path.
        path: PathBuf,
    },
    /// The runner's own executable could not be found (for the KVM probe).
    #[error("cannot find the runner's own executable")]
    SelfExe(#[source] std::io::Error),
    /// The guest binary's `--list` (run on the host) failed.
    #[error("cannot list the guest tests ({0}); is the guest binary built for this machine?")]
    GuestList(String),
}

/// The tests the guest binary will run: `GUEST_BIN --list` with the run's guest arguments,
/// run on the host (the binary is a static x86-64 Linux executable; `--list` touches no
/// device). Every one of them must report a result, skipped ones included.
pub fn expected_guest_tests(opts: &RunOptions) -> Result<Vec<String>, RunError> {
    let out = std::process::Command::new(&opts.guest_bin)
        .arg("--list")
        .args(&opts.guest_args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RunError::GuestList(format!("running {}: {e}", opts.guest_bin.display())))?;
    if !out.status.success() {
        return Err(RunError::GuestList(format!(
            "{} --list: {}: {}",
            opts.guest_bin.display(),
            describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    for name in &opts.expect {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    Ok(names)
}

/// What `domdma-vm run` was asked to do.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The device server binary; `None` boots without the device (`--no-device`).
    pub device_bin: Option<PathBuf>,
    /// Arguments for the device server after `--socket PATH` (device options).
    pub device_args: Vec<String>,
    /// The profile injects a fault: the text every guest failure must contain
    /// ([`crate::profile::Profile::expect_injected`]).
    pub expect_injected: Option<String>,
    /// The guest test binary (or any executable that prints result lines).
    pub guest_bin: PathBuf,
    /// Arguments for the guest binary.
    pub guest_args: Vec<String>,
    /// Output directory for logs and the JUnit file.
    pub out: PathBuf,
    /// QEMU executable or wrapper.
    pub qemu: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Private key for root in the guest.
    pub ssh_key: PathBuf,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Kill QEMU mid-suite and run the suite again on a second QEMU against the same server.
    pub reconnect_check: bool,
    /// Time limit for the guest suite.
    pub timeout: Duration,
    /// Time limit for boot to ready; `None` picks by accelerator.
    pub boot_timeout: Option<Duration>,
    /// Two NUMA nodes with the device on node 1 (else one node, device on the root bus).
    pub numa: bool,
    /// vCPUs.
    pub smp: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel command line.
    pub append: String,
    /// Extra QEMU arguments.
    pub qemu_args: Vec<String>,
    /// Guest tests that must report a result.
    pub expect: Vec<String>,
    /// With `reconnect_check`: kill QEMU #1 when this many result lines arrived.
    pub kill_after: usize,
    /// The guest test proving the device was found (for the reconnect check); `None` means
    /// the first result line.
    pub device_test: Option<String>,
    /// An emulated IOMMU in the guest.
    pub iommu: bool,
    /// Guest RAM shared with the device server (memfd); false: private RAM, which the
    /// device reaches through QEMU (DMA_READ / DMA_WRITE).
    pub shared_memory: bool,
    /// The guest profile's name, when the run is one.
    pub profile: Option<String>,
    /// A bench run (the guest binary runs with `--bench`): its `DOMDMA-BENCH` lines are
    /// kept in [`RunOutcome::bench`].
    pub bench: bool,
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutcome {
    /// All cases, host and guest, in order.
    pub cases: Vec<CaseResult>,
    /// Whether a termination signal cut the run short.
    pub interrupted: bool,
    /// Files worth pointing the user at.
    pub files: Vec<(&'static str, PathBuf)>,
    /// The accelerator the (last) guest ran under and why it was chosen; `None` when no
    /// guest was started.
    pub accel: Option<(Accel, String)>,
    /// The guest's bench records (`DOMDMA-BENCH` lines) of the main session, in order.
    pub bench: Vec<serde_json::Value>,
}

/// Names of one QEMU session's files in the output directory.
#[derive(Debug, Clone)]
struct SessionFiles {
    qemu_log: PathBuf,
    serial_log: PathBuf,
    cmdline: PathBuf,
    guest_log: PathBuf,
    ssh_log: PathBuf,
}

impl SessionFiles {
    fn new(out: &Path, suffix: &str) -> Self {
        Self {
            qemu_log: out.join(format!("qemu{suffix}.log")),
            serial_log: out.join(format!("serial{suffix}.log")),
            cmdline: out.join(format!("qemu{suffix}.cmdline")),
            guest_log: out.join(format!("guest{suffix}.log")),
            ssh_log: out.join(format!("ssh{suffix}.log")),
        }
    }

    fn all(&self) -> [&Path; 5] {
        [
            &self.qemu_log,
            &self.serial_log,
            &self.cmdline,
            &self.guest_log,
            &self.ssh_log,
        ]
    }
}

/// Fixed for the whole run.
struct Ctx<'a> {
    opts: &'a RunOptions,
    /// Every guest test that must report a result.
    expected: Vec<String>,
    accel: Accel,
    boot_timeout: Duration,
    socket: Option<PathBuf>,
    tmp: &'a Path,
    interrupt: &'a Interrupt,
}

/// What one QEMU session produced.
#[derive(Debug, Default)]
struct Session {
    /// host.boot, host.ssh, guest cases, host.guest_suite, missing expected tests.
    cases: Vec<CaseResult>,
    /// The guest's result lines.
    results: Vec<GuestResult>,
    /// The guest's bench records.
    bench: Vec<serde_json::Value>,
    /// Whether the guest binary was started.
    suite_started: bool,
    /// Whether QEMU was killed by the runner while the suite ran (kill mode).
    killed_mid_suite: bool,
    /// The first thing that went wrong.
    failure: Option<String>,
    /// Whether QEMU failed to start or the guest never reported ready.
    boot_failed: bool,
    interrupted: bool,
}

impl Session {
    fn fail(&mut self, case: CaseResult) {
        if self.failure.is_none() {
            self.failure = Some(format!("{}: {}", case.name, case.message));
        }
        self.cases.push(case);
    }
}

/// Runs everything and returns the cases. Only setup problems are errors; everything from the
/// device server start on becomes a (failed) case.
pub fn run(opts: &RunOptions, interrupt: &Interrupt) -> Result<RunOutcome, RunError> {
    let out = &opts.out;
    fs::create_dir_all(out).map_err(|source| RunError::OutDir {
        path: out.clone(),
        source,
    })?;
    let main_files = SessionFiles::new(out, "");
    let first_files = SessionFiles::new(out, "-1");
    let device_log = out.join("device.log");
    let junit = out.join("junit.xml");
    let trace = TraceFiles::new(out);
    // A bench run replaces the last bench report; a suite run leaves it.
    let bench_files = [out.join("bench.json"), out.join("bench.txt")];
    let stale_bench = if opts.bench { &bench_files[..] } else { &[] };
    // Stale files from an earlier run would mislead.
    for path in main_files
        .all()
        .into_iter()
        .chain(first_files.all())
        .chain([device_log.as_path(), junit.as_path()])
        .chain(trace.all())
        .chain(stale_bench.iter().map(PathBuf::as_path))
    {
        match fs::remove_file(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(RunError::OutDir {
                    path: path.to_owned(),
                    source: err,
                })
            }
            _ => {}
        }
    }
    let mut inputs = vec![
        ("guest binary", &opts.guest_bin),
        ("QEMU", &opts.qemu),
        ("kernel", &opts.kernel),
        ("initrd", &opts.initrd),
    ];
    if let Some(bin) = &opts.device_bin {
        inputs.push(("device server binary", bin));
    }
    for (what, path) in inputs {
        if !path.exists() {
            return Err(RunError::MissingInput {
                what,
                path: path.clone(),
            });
        }
    }
    SshConfig::check_key(&opts.ssh_key)?;
    let expected = expected_guest_tests(opts)?;
    if let Some(profile) = &opts.profile {
        println!("profile {profile}: {} guest tests expected", expected.len());
    }
    let self_exe = std::env::current_exe().map_err(RunError::SelfExe)?;

    let tmp = TempDir::new("domdma-vm.")?;
    let socket = tmp.path().join("device.sock");
    if !fits_socket_path(&socket) {
        return Err(RunError::SocketPath { path: socket });
    }

    let mut files: Vec<(&'static str, PathBuf)> = vec![("junit", junit.clone())];
    let mut cases = Vec::new();
    let mut interrupted = false;
    let mut accel_used = None;
    let mut bench = Vec::new();

    let mut device = None;
    // The server's inspector: its counters are saved at the end of the run.
    let inspect = tmp.path().join("inspect.sock");
    let counters = opts.out.join("device-counters.json");
    let mut device_args = opts.device_args.clone();
    let own_inspector = !device_args.iter().any(|a| a == "--inspect");
    if own_inspector {
        device_args.push("--inspect".into());
        device_args.push(inspect.display().to_string());
    }
    // The device's trace, with data checksums (so that the replay compares data too) and
    // a writer that competes for the CPU as an equal (the replay needs every event),
    // beside the JUnit file; not in a bench run (it measures the device without one).
    let own_trace = !opts.bench && !device_args.iter().any(|a| a == "--trace");
    if own_trace {
        device_args.push("--trace".into());
        device_args.push(trace.trace.display().to_string());
        device_args.push("--trace-data".into());
        device_args.push("--trace-writer=equal".into());
    }
    if let Some(bin) = &opts.device_bin {
        files.push(("device log", device_log.clone()));
        let started = Instant::now();
        match DeviceServer::start(
            bin,
            &device_args,
            &socket,
            &device_log,
            DEVICE_START_TIMEOUT,
            interrupt,
        ) {
            Ok(server) => device = Some(server),
            Err(DeviceError::Interrupted) => interrupted = true,
            Err(err) => {
                let text = err.to_string();
                let first = text.lines().next().unwrap_or_default();
                cases.push(CaseResult::host_fail(
                    "host.device_server",
                    started.elapsed(),
                    format!(
                        "device server did not start: {}",
                        first.trim_end_matches(':')
                    ),
                    Some(text.clone()),
                ));
            }
        }
    }
    let device_ok = opts.device_bin.is_none() || device.is_some();

    if device_ok && !interrupted {
        let (accel, accel_reason) = kvm::choose(opts.accel, &self_exe);
        println!("accelerator: {accel} ({accel_reason})");
        let mut ctx = Ctx {
            opts,
            expected: expected.clone(),
            accel,
            boot_timeout: opts.boot_timeout.unwrap_or(match accel {
                Accel::Kvm => BOOT_TIMEOUT_KVM,
                Accel::Tcg => BOOT_TIMEOUT_TCG,
            }),
            socket: device.as_ref().map(|_| socket.clone()),
            tmp: tmp.path(),
            interrupt,
        };

        let mut survival = None;
        if opts.reconnect_check {
            files.push(("qemu #1 log", first_files.qemu_log.clone()));
            files.push(("serial #1 log", first_files.serial_log.clone()));
            files.push(("guest #1 log", first_files.guest_log.clone()));
            println!("reconnect check: QEMU #1, killed while the suite runs");
            let started = Instant::now();
            let first = session_with_fallback(&mut ctx, &first_files, true, device.as_mut());
            interrupted |= first.interrupted;
            let alive_after_kill = if interrupted {
                false
            } else {
                sleep_unless_interrupted(interrupt, SETTLE_AFTER_KILL);
                device.as_mut().is_some_and(DeviceServer::is_running)
            };
            if let Some(server) = device.as_ref() {
                println!(
                    "reconnect check: device server (pid {}) {}",
                    server.pid(),
                    if alive_after_kill {
                        "still running"
                    } else {
                        "NOT running"
                    }
                );
            }
            survival = Some((first, alive_after_kill, started.elapsed()));
            if !interrupted {
                println!("reconnect check: QEMU #2 against the same device server");
            }
        }

        if !interrupted {
            files.push(("qemu log", main_files.qemu_log.clone()));
            files.push(("serial log", main_files.serial_log.clone()));
            files.push(("guest log", main_files.guest_log.clone()));
            files.push(("qemu cmdline", main_files.cmdline.clone()));
            let main = session_with_fallback(&mut ctx, &main_files, false, device.as_mut());
            interrupted |= main.interrupted;
            bench = main.bench.clone();
            if let Some((first, alive_after_kill, first_time)) = survival {
                cases.push(survival_case(
                    &first,
                    alive_after_kill,
                    &main,
                    device.as_mut(),
                    opts.device_test.as_deref(),
                    first_time,
                ));
            }
            cases.splice(0..0, main.cases);
            if let Some(text) = &opts.expect_injected {
                let verdict = expect_injected(&mut cases, text);
                cases.push(verdict);
            }
        }
        // The fallback to TCG changes the accelerator (and says so in host.boot).
        let reason = if ctx.accel == accel {
            accel_reason
        } else {
            format!("KVM ({accel_reason}) did not boot the guest")
        };
        accel_used = Some((ctx.accel, reason));
    }

    if interrupted {
        cases.push(CaseResult::host_fail(
            "host.interrupted",
            Duration::ZERO,
            "interrupted by a signal; the run was cut short",
            None,
        ));
    }
    if let Some(server) = device {
        if own_inspector && !interrupted {
            files.push(("device counters", counters.clone()));
            cases.push(memory_path_case(&inspect, &counters, opts.shared_memory));
        }
        cases.push(stop_device(server));
        // The server has stopped: its trace is complete.
        if own_trace && !interrupted {
            files.push(("device trace", trace.trace.clone()));
            files.push(("device trace summary", trace.summary.clone()));
            files.push(("device trace (Perfetto JSON)", trace.perfetto.clone()));
            cases.push(trace_case(&trace));
            cases.push(replay_case(&trace, tmp.path()));
        }
    }
    drop(tmp);
    Ok(RunOutcome {
        cases,
        interrupted,
        files,
        accel: accel_used,
        bench,
    })
}

/// A run whose device injects a fault: guest failures that name it (contain `text`) are
/// what the profile expects, and are reported as passed with the failure quoted; the host
/// case `host.injection` fails when no guest test noticed the fault. Failures that do not
/// name it stay failures.
fn expect_injected(cases: &mut [CaseResult], text: &str) -> CaseResult {
    const NAME: &str = "host.injection";
    let mut named = Vec::new();
    for c in cases
        .iter_mut()
        .filter(|c| c.origin == crate::report::Origin::Guest && c.failed())
    {
        if c.message.contains(text) {
            c.passed = true;
            c.message = format!("failed as injected (expected): {}", c.message);
            named.push(c.name.clone());
        }
    }
    if named.is_empty() {
        CaseResult::host_fail(
            NAME,
            Duration::ZERO,
            format!("the device injected a fault, yet no guest test failed naming {text:?}"),
            None,
        )
    } else {
        CaseResult::host_pass(
            NAME,
            Duration::ZERO,
            format!(
                "{} guest test(s) failed naming the injected fault ({text:?}): {}",
                named.len(),
                named.join(", ")
            ),
        )
    }
}

/// The device trace of a run and what is made of it, in the output directory.
struct TraceFiles {
    /// What `domdma-device --trace` wrote.
    trace: PathBuf,
    /// `domdma-trace summary` of it.
    summary: PathBuf,
    /// `domdma-trace perfetto` of it.
    perfetto: PathBuf,
}

impl TraceFiles {
    fn new(out: &Path) -> Self {
        Self {
            trace: out.join("device.trace"),
            summary: out.join("device-trace-summary.txt"),
            perfetto: out.join("device.trace.perfetto.json"),
        }
    }

    fn all(&self) -> [&Path; 3] {
        [&self.trace, &self.summary, &self.perfetto]
    }
}

/// Reads the device's trace of the run, writes its summary and its Perfetto JSON beside it,
/// and checks that it holds the run: whole, with descriptors fetched and completed.
fn trace_case(files: &TraceFiles) -> CaseResult {
    const NAME: &str = "host.device_trace";
    let started = Instant::now();
    let made = (|| -> Result<String, String> {
        let trace = domdma_device::trace::read_all(&files.trace).map_err(|e| e.to_string())?;
        let summary = Summary::of(&trace);
        let write = |path: &Path, bytes: &[u8]| {
            fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(&files.summary, summary.to_string().as_bytes())?;
        let json = serde_json::to_vec(&perfetto(&trace)).map_err(|e| e.to_string())?;
        write(&files.perfetto, &json)?;
        let kind = |k: &str| summary.kinds.get(k).copied().unwrap_or(0);
        let line = format!(
            "{} records: {} descriptors fetched, {} completed, {} translations, {} faults, {} dropped ({}; Perfetto: {})",
            summary.records,
            kind("fetch"),
            kind("complete"),
            kind("translate"),
            kind("fault"),
            summary.dropped,
            files.summary.display(),
            files.perfetto.display()
        );
        if trace.truncated {
            return Err(format!("the trace ends inside a record: {line}"));
        }
        if kind("fetch") == 0 || kind("complete") == 0 {
            return Err(format!("the trace holds no descriptor: {line}"));
        }
        Ok(line)
    })();
    match made {
        Ok(line) => CaseResult::host_pass(NAME, started.elapsed(), line),
        Err(problem) => CaseResult::host_fail(NAME, started.elapsed(), problem, None),
    }
}

/// Replays the run's trace through this build's device core (`domdma-trace replay`): the
/// run must replay with no divergence, unless an injection rule acted where it diverges.
fn replay_case(files: &TraceFiles, tmp: &Path) -> CaseResult {
    use domdma_device::trace::replay::{replay, ReplayOptions};
    const NAME: &str = "host.device_trace_replay";
    let started = Instant::now();
    let scratch = tmp.join("replay.trace");
    let report = replay(&files.trace, &scratch, &ReplayOptions::default());
    let _ = fs::remove_file(&scratch);
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            return CaseResult::host_fail(NAME, started.elapsed(), format!("replay: {e}"), None)
        }
    };
    let notes = if report.notes.is_empty() {
        String::new()
    } else {
        format!("; notes: {}", report.notes.join("; "))
    };
    match report.divergence {
        None => CaseResult::host_pass(
            NAME,
            started.elapsed(),
            format!(
                "{} descriptors replayed through this build's core: no divergence{notes}",
                report.descriptors
            ),
        ),
        Some(d) if d.what.contains("injection rule") => CaseResult::host_pass(
            NAME,
            started.elapsed(),
            format!("diverges where an injection rule acted, as it should: {d}{notes}"),
        ),
        Some(d) => CaseResult::host_fail(
            NAME,
            started.elapsed(),
            format!(
                "the trace diverges after {} of {} descriptors: {d}",
                report.compared - 1,
                report.descriptors
            ),
            Some(notes),
        ),
    }
}

/// Saves the server's counters (its inspector's JSON) in `out` and checks how the device
/// reached guest RAM: directly when it is shared (no DMA_READ / DMA_WRITE at all), through
/// QEMU with DMA_READ / DMA_WRITE when it is private (bytes moved both ways).
fn memory_path_case(inspect: &Path, out: &Path, shared_memory: bool) -> CaseResult {
    const NAME: &str = "host.device_memory_path";
    let started = Instant::now();
    let fetched = (|| -> Result<serde_json::Value, String> {
        let mut s = std::os::unix::net::UnixStream::connect(inspect)
            .map_err(|e| format!("cannot connect to the inspector: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut s, &mut text)
            .map_err(|e| format!("cannot read the inspector: {e}"))?;
        std::fs::write(out, &text).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("the inspector's JSON: {e}"))
    })();
    let v = match fetched {
        Ok(v) => v,
        Err(problem) => return CaseResult::host_fail(NAME, started.elapsed(), problem, None),
    };
    let n = |k: &str| v["dma_rw"][k].as_u64().unwrap_or(0);
    let (read, written, requests) = (n("read_bytes"), n("written_bytes"), n("requests"));
    let summary = format!(
        "DMA_READ {read} bytes, DMA_WRITE {written} bytes, {requests} requests ({})",
        out.display()
    );
    let ok = if shared_memory {
        requests == 0
    } else {
        read > 0 && written > 0
    };
    if ok {
        CaseResult::host_pass(NAME, started.elapsed(), summary)
    } else if shared_memory {
        CaseResult::host_fail(
            NAME,
            started.elapsed(),
            format!("guest RAM is shared, yet the device asked QEMU for it: {summary}"),
            None,
        )
    } else {
        CaseResult::host_fail(
            NAME,
            started.elapsed(),
            format!("guest RAM is private, yet the device moved nothing through QEMU: {summary}"),
            None,
        )
    }
}

/// Stops the device server and reports whether it behaved: still running at the end, clean
/// exit on SIGTERM, socket removed.
fn stop_device(server: DeviceServer) -> CaseResult {
    let started = Instant::now();
    let tail = server.log_tail(TAIL);
    let stop = server.stop();
    let status = stop
        .status
        .map(describe_status)
        .unwrap_or_else(|| "not reaped".into());
    let problem = if stop.ended_early {
        Some(format!("device server died during the run ({status})"))
    } else if stop.needed_kill {
        Some("device server ignored SIGTERM and was killed".to_owned())
    } else if !stop.status.is_some_and(|s| s.success()) {
        Some(format!("device server exited with {status} on SIGTERM"))
    } else if !stop.socket_removed {
        Some("device server left its socket behind".to_owned())
    } else {
        None
    };
    match problem {
        None => CaseResult::host_pass(
            "host.device_server",
            started.elapsed(),
            "ran throughout; clean exit on SIGTERM; socket removed",
        ),
        Some(problem) => {
            CaseResult::host_fail("host.device_server", started.elapsed(), problem, Some(tail))
        }
    }
}

/// The host case of the reconnect check.
fn survival_case(
    first: &Session,
    alive_after_kill: bool,
    second: &Session,
    device: Option<&mut DeviceServer>,
    device_test: Option<&str>,
    first_time: Duration,
) -> CaseResult {
    let alive_at_end = device.map(DeviceServer::is_running).unwrap_or(false);
    let found_device = match device_test {
        Some(name) => second.results.iter().any(|r| r.name == name && r.passed),
        None => second.results.first().is_some_and(|r| r.passed),
    };
    let mut problems = Vec::new();
    if !first.killed_mid_suite {
        problems.push(format!(
            "QEMU #1 was not killed during the suite ({})",
            first
                .failure
                .as_deref()
                .unwrap_or("the suite never started")
        ));
    }
    if !alive_after_kill {
        problems.push("the device server did not survive the QEMU kill".to_owned());
    }
    if !found_device {
        problems.push(match device_test {
            Some(name) => format!("QEMU #2's guest did not pass {name}"),
            None => "QEMU #2's guest reported no passing first test".to_owned(),
        });
    }
    if !alive_at_end {
        problems.push("the device server was not running after QEMU #2".to_owned());
    }
    let first_results = first.results.len();
    if problems.is_empty() {
        CaseResult::host_pass(
            SURVIVAL_CASE,
            first_time,
            format!(
                "QEMU #1 killed after {first_results} result(s); server stayed up; QEMU #2 ran {} test(s)",
                second.results.len()
            ),
        )
    } else {
        CaseResult::host_fail(SURVIVAL_CASE, first_time, problems.join("; "), None)
    }
}

/// A free TCP port on 127.0.0.1 (free now; QEMU binds it moments later).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Starts QEMU; retries with another port if the forward port was taken meanwhile.
fn start_qemu(ctx: &Ctx<'_>, files: &SessionFiles) -> Result<(ChildGuard, u16, Instant), String> {
    let mut last = String::new();
    for _ in 0..PORT_RETRIES {
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let config = QemuConfig {
            qemu: ctx.opts.qemu.clone(),
            kernel: ctx.opts.kernel.clone(),
            initrd: ctx.opts.initrd.clone(),
            append: ctx.opts.append.clone(),
            accel: ctx.accel,
            smp: ctx.opts.smp,
            memory_mib: ctx.opts.memory_mib,
            numa: ctx.opts.numa,
            iommu: ctx.opts.iommu,
            shared_memory: ctx.opts.shared_memory,
            serial_log: files.serial_log.clone(),
            device_socket: ctx.socket.clone(),
            ssh_port: port,
            extra_args: ctx.opts.qemu_args.clone(),
        };
        let line = config.shell_line().map_err(|e: QemuError| e.to_string())?;
        let _ = fs::write(&files.cmdline, format!("{line}\n"));
        info!(cmdline = %line, "starting QEMU");
        let mut cmd = config.command().map_err(|e| e.to_string())?;
        let (stdout, stderr) = log_file_stdio(&files.qemu_log).map_err(|e| e.to_string())?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let started = Instant::now();
        let mut qemu = ChildGuard::spawn("QEMU", &mut cmd, StopPolicy::terminate(QEMU_STOP_GRACE))
            .map_err(|e| e.to_string())?;
        // A taken port makes QEMU exit at once with a hostfwd error.
        thread::sleep(Duration::from_millis(300));
        if let Ok(Some(status)) = qemu.try_status() {
            let log = tail_file(&files.qemu_log, TAIL);
            if log.contains("hostfwd") || log.contains("host forwarding") {
                warn!(port, "SSH forward port taken; retrying with another");
                last = log;
                continue;
            }
            return Err(format!(
                "QEMU exited at start ({})\n{log}",
                describe_status(status)
            ));
        }
        return Ok((qemu, port, started));
    }
    Err(format!("QEMU could not bind an SSH forward port:\n{last}"))
}

/// [`run_session`]; if KVM was chosen by the probe (`--accel auto`) and the guest did not
/// boot under it, once more under TCG, which then stays in use for the rest of the run.
fn session_with_fallback(
    ctx: &mut Ctx<'_>,
    files: &SessionFiles,
    kill_mode: bool,
    mut device: Option<&mut DeviceServer>,
) -> Session {
    let session = run_session(ctx, files, kill_mode, device.as_deref_mut());
    let fall_back = ctx.accel == Accel::Kvm
        && ctx.opts.accel == AccelChoice::Auto
        && session.boot_failed
        && !session.interrupted;
    if !fall_back {
        return session;
    }
    let reason = session.failure.clone().unwrap_or_default();
    warn!(%reason, "boot under KVM failed; retrying under TCG");
    println!("boot under KVM failed ({reason}); retrying under TCG");
    ctx.accel = Accel::Tcg;
    if ctx.opts.boot_timeout.is_none() {
        ctx.boot_timeout = BOOT_TIMEOUT_TCG;
    }
    let mut session = run_session(ctx, files, kill_mode, device);
    if let Some(boot) = session.cases.iter_mut().find(|c| c.name == "host.boot") {
        boot.message = format!("{} (KVM boot failed first: {reason})", boot.message);
    }
    session
}

/// One QEMU: boot, SSH, copy, run the suite. With `kill_mode`, QEMU is SIGKILLed at the
/// `kill_after`-th result line (or [`KILL_DELAY`] into the suite) and the session ends there.
fn run_session(
    ctx: &Ctx<'_>,
    files: &SessionFiles,
    kill_mode: bool,
    mut device: Option<&mut DeviceServer>,
) -> Session {
    let mut session = Session::default();
    let interrupt = ctx.interrupt;

    // Boot.
    let (mut qemu, port, started) = match start_qemu(ctx, files) {
        Ok(started) => started,
        Err(message) => {
            session.boot_failed = true;
            session.fail(CaseResult::host_fail(
                "host.boot",
                Duration::ZERO,
                "QEMU did not start",
                Some(message),
            ));
            return session;
        }
    };
    let mut watcher = SerialWatcher::new(&files.serial_log);
    let mut guest_errors: Vec<String> = Vec::new();
    let mut error_deadline = None;
    let boot = loop {
        if interrupt.is_set() {
            session.interrupted = true;
            return session;
        }
        let events = match watcher.poll() {
            Ok(events) => events,
            Err(err) => break Err(err.to_string()),
        };
        if events.contains(&SerialEvent::Ready) {
            break Ok(started.elapsed());
        }
        for event in events {
            if let SerialEvent::GuestError(reason) = event {
                warn!(%reason, "guest init reported an error");
                guest_errors.push(reason);
                error_deadline.get_or_insert_with(|| Instant::now() + GUEST_ERROR_GRACE);
            }
        }
        if device.as_deref_mut().is_some_and(|d| !d.is_running()) {
            break Err("the device server died during boot".to_owned());
        }
        if error_deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break Err(format!("guest init failed: {}", guest_errors.join("; ")));
        }
        if let Ok(Some(status)) = qemu.try_status() {
            let _ = watcher.poll();
            break Err(format!(
                "QEMU exited during boot ({})",
                describe_status(status)
            ));
        }
        if started.elapsed() >= ctx.boot_timeout {
            break Err(format!(
                "no {} on the serial console within {}s",
                crate::serial::READY_MARKER,
                ctx.boot_timeout.as_secs()
            ));
        }
        thread::sleep(POLL_INTERVAL);
    };
    let boot_time = match boot {
        Ok(time) => time,
        Err(message) => {
            let output = format!(
                "--- serial console (tail) ---\n{}\n--- qemu log (tail) ---\n{}",
                watcher.tail(),
                tail_file(&files.qemu_log, TAIL)
            );
            session.boot_failed = true;
            session.fail(CaseResult::host_fail(
                "host.boot",
                started.elapsed(),
                message,
                Some(output),
            ));
            return session;
        }
    };
    info!(boot_ms = boot_time.as_millis() as u64, "guest ready");
    println!(
        "guest ready after {} ({})",
        format_duration(boot_time),
        ctx.accel
    );
    session.cases.push(CaseResult::host_pass(
        "host.boot",
        boot_time,
        format!("boot to ready under {}", ctx.accel),
    ));
    if !guest_errors.is_empty() {
        // Ready anyway: carry on (the suite's results still help), but the run fails.
        session.fail(CaseResult::host_fail(
            "host.guest_init",
            boot_time,
            format!("guest init reported errors: {}", guest_errors.join("; ")),
            Some(watcher.tail()),
        ));
    }

    // SSH.
    let ssh_started = Instant::now();
    let ssh_config = SshConfig {
        key: ctx.opts.ssh_key.clone(),
        port,
        control_path: ctx.tmp.join("ssh.ctl"),
    };
    let master = ssh::connect_master(
        &ssh_config,
        &files.ssh_log,
        SSH_ATTEMPTS,
        SSH_ATTEMPT_TIMEOUT,
        interrupt,
    )
    .and_then(|master| {
        let connected = ssh_started.elapsed();
        ssh::copy_executable(
            &ssh_config,
            &ctx.opts.guest_bin,
            GUEST_BIN_PATH,
            COPY_TIMEOUT,
            interrupt,
        )
        .map(|()| (master, connected))
    });
    let (mut master, connected) = match master {
        Ok(master) => master,
        Err(SshError::Interrupted) => {
            session.interrupted = true;
            return session;
        }
        Err(err) => {
            session.fail(CaseResult::host_fail(
                "host.ssh",
                ssh_started.elapsed(),
                err.to_string(),
                Some(format!(
                    "--- ssh log (tail) ---\n{}\n--- serial console (tail) ---\n{}",
                    tail_file(&files.ssh_log, TAIL),
                    tail_file(&files.serial_log, TAIL)
                )),
            ));
            return session;
        }
    };
    let copy_time = ssh_started.elapsed().saturating_sub(connected);
    let size_mib = fs::metadata(&ctx.opts.guest_bin)
        .map(|m| m.len() as f64 / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    session.cases.push(CaseResult::host_pass(
        "host.ssh",
        ssh_started.elapsed(),
        format!(
            "connected in {}; guest binary ({size_mib:.1} MiB) copied in {}",
            format_duration(connected),
            format_duration(copy_time)
        ),
    ));

    // The suite.
    session.suite_started = true;
    let mut suite = run_suite(
        ctx,
        files,
        &ssh_config,
        kill_mode.then_some(&mut qemu),
        device,
    );
    if suite.ssh_lost {
        // ssh exits 255 both when the connection drops and when the remote program dies of a
        // signal; a master connection and a QEMU still up mean the latter.
        suite.killed_by_signal = master.is_running() && qemu.is_running();
        // QEMU's sockets close a moment before its exit status can be collected.
        if !suite.killed_by_signal {
            if let Ok(Some(status)) = qemu.wait_timeout(Duration::from_secs(1)) {
                suite.status = Some(format!("QEMU {}", describe_status(status)));
            }
        }
    }
    session.interrupted |= suite.interrupted;
    session.killed_mid_suite = suite.killed_qemu_mid_suite;
    session.results = suite.results.clone();
    session.bench = suite.bench.clone();
    for result in &suite.results {
        session.cases.push(CaseResult::from_guest(result));
    }
    if !kill_mode && !suite.interrupted {
        let missing: Vec<&String> = ctx
            .expected
            .iter()
            .filter(|name| !suite.results.iter().any(|r| &r.name == *name))
            .collect();
        for name in &missing {
            session.fail(CaseResult {
                origin: crate::report::Origin::Guest,
                ..CaseResult::host_fail(
                    name,
                    Duration::ZERO,
                    "expected test reported no result",
                    Some(tail_lines(&suite.output, TAIL)),
                )
            });
        }
        let case = suite_case(&suite, ctx.opts.timeout, files);
        if case.passed {
            session.cases.push(case);
        } else {
            session.fail(case);
        }
    } else if suite.failure.is_some() {
        session.failure = suite.failure.clone();
    }
    // `master` and `qemu` stop here, the master first (reverse declaration order).
    session
}

/// What the guest binary run produced.
#[derive(Debug, Default)]
struct SuiteRun {
    results: Vec<GuestResult>,
    /// `DOMDMA-BENCH` records (a bench run).
    bench: Vec<serde_json::Value>,
    malformed: Vec<String>,
    output: String,
    status: Option<String>,
    success: bool,
    ssh_lost: bool,
    /// The device server died while the suite ran (the suite was stopped).
    device_died: bool,
    /// With `ssh_lost`: the connection was fine, the remote program died of a signal.
    killed_by_signal: bool,
    timed_out: bool,
    interrupted: bool,
    killed_qemu_mid_suite: bool,
    failure: Option<String>,
    duration: Duration,
}

/// The host case for the guest binary run as a whole.
fn suite_case(suite: &SuiteRun, timeout: Duration, files: &SessionFiles) -> CaseResult {
    let failed = suite
        .results
        .iter()
        .filter(|r| !r.passed && !r.skipped)
        .count();
    let problem = if suite.device_died {
        Some("the device server died during the suite; the suite was stopped".to_owned())
    } else if suite.timed_out {
        Some(format!(
            "guest suite did not finish within {}s",
            timeout.as_secs()
        ))
    } else if suite.ssh_lost && suite.killed_by_signal {
        Some("guest binary died of a signal (ssh exit status 255, connection still up)".to_owned())
    } else if suite.ssh_lost {
        Some(format!(
            "SSH connection lost during the suite ({})",
            suite.status.as_deref().unwrap_or("?")
        ))
    } else if suite.results.is_empty() {
        Some(format!(
            "guest binary reported no results ({})",
            suite.status.as_deref().unwrap_or("?")
        ))
    } else if !suite.malformed.is_empty() {
        Some(format!(
            "{} malformed result line(s): {}",
            suite.malformed.len(),
            suite.malformed.join(" | ")
        ))
    } else if !suite.success && failed == 0 {
        Some(format!(
            "guest binary failed ({}) although every reported test passed",
            suite.status.as_deref().unwrap_or("?")
        ))
    } else if suite.success && failed > 0 {
        Some("guest binary exited 0 although tests failed".to_owned())
    } else {
        None
    };
    match problem {
        None => CaseResult::host_pass(
            "host.guest_suite",
            suite.duration,
            format!(
                "{} result(s), {}",
                suite.results.len(),
                suite.status.as_deref().unwrap_or("?")
            ),
        ),
        Some(problem) => {
            let mut output = format!(
                "--- guest output (tail) ---\n{}",
                tail_lines(&suite.output, TAIL)
            );
            if suite.ssh_lost || suite.timed_out {
                output.push_str(&format!(
                    "\n--- serial console (tail) ---\n{}",
                    tail_file(&files.serial_log, TAIL)
                ));
            }
            CaseResult::host_fail("host.guest_suite", suite.duration, problem, Some(output))
        }
    }
}

/// A line from the guest binary's stdout or stderr, or the end of one of them.
enum StreamMsg {
    Line { stderr: bool, text: String },
    Closed,
}

fn spawn_reader(stream: impl Read + Send + 'static, stderr: bool, tx: Sender<StreamMsg>) {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned();
                    if tx.send(StreamMsg::Line { stderr, text }).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(StreamMsg::Closed);
    });
}

/// Runs the guest binary over SSH, streaming its output to the terminal and the guest log.
/// With `kill_qemu`, QEMU is SIGKILLed at the `kill_after`-th result line (or [`KILL_DELAY`]
/// in).
fn run_suite(
    ctx: &Ctx<'_>,
    files: &SessionFiles,
    ssh_config: &SshConfig,
    mut kill_qemu: Option<&mut ChildGuard>,
    mut device: Option<&mut DeviceServer>,
) -> SuiteRun {
    let mut run = SuiteRun::default();
    let mut log = File::create(&files.guest_log).ok();
    let mut remote = format!("env RUST_BACKTRACE=1 {GUEST_BIN_PATH}");
    for arg in &ctx.opts.guest_args {
        remote.push(' ');
        remote.push_str(&shell_quote(arg));
    }
    let mut cmd = ssh_config.command(&remote);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = match ChildGuard::spawn("ssh (guest suite)", &mut cmd, StopPolicy::KILL) {
        Ok(child) => child,
        Err(err) => {
            run.failure = Some(err.to_string());
            run.status = Some(err.to_string());
            return run;
        }
    };
    let (tx, rx): (Sender<StreamMsg>, Receiver<StreamMsg>) = mpsc::channel();
    if let Some(stdout) = child.take_stdout() {
        spawn_reader(stdout, false, tx.clone());
    }
    if let Some(stderr) = child.take_stderr() {
        spawn_reader(stderr, true, tx.clone());
    }
    drop(tx);
    let deadline = started + ctx.opts.timeout;
    let mut open = 2;
    while open > 0 {
        if ctx.interrupt.is_set() {
            run.interrupted = true;
            child.kill();
            break;
        }
        if device.as_deref_mut().is_some_and(|d| !d.is_running()) {
            warn!("device server died during the suite");
            run.device_died = true;
            child.kill();
            break;
        }
        if Instant::now() >= deadline {
            run.timed_out = true;
            child.kill();
            break;
        }
        if let Some(qemu) = kill_qemu.as_deref_mut() {
            if !run.killed_qemu_mid_suite
                && (run.results.len() >= ctx.opts.kill_after.max(1)
                    || started.elapsed() >= KILL_DELAY)
            {
                let pid = qemu.pid();
                qemu.kill();
                run.killed_qemu_mid_suite = true;
                println!(
                    "reconnect check: QEMU #1 (pid {pid}) killed with SIGKILL after {} result(s)",
                    run.results.len()
                );
            }
        }
        match rx.recv_timeout(POLL_INTERVAL) {
            Ok(StreamMsg::Line { stderr, text }) => handle_line(&mut run, &mut log, stderr, text),
            Ok(StreamMsg::Closed) => open -= 1,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // Drain what arrived before the break.
    while let Ok(msg) = rx.try_recv() {
        if let StreamMsg::Line { stderr, text } = msg {
            handle_line(&mut run, &mut log, stderr, text);
        }
    }
    let status = if run.timed_out || run.interrupted || run.device_died {
        child.kill()
    } else {
        match child.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(status)) => Some(status),
            _ => child.kill(),
        }
    };
    run.duration = started.elapsed();
    if let Some(status) = status {
        run.success = status.success() && !run.timed_out && !run.interrupted && !run.device_died;
        // ssh itself exits 255 when the connection fails or drops.
        run.ssh_lost = status.code() == Some(255);
        run.status = Some(format!("guest binary: {}", describe_status(status)));
    }
    if kill_qemu.is_some() && !run.killed_qemu_mid_suite {
        run.failure = Some(format!(
            "the suite ended before QEMU #1 could be killed ({})",
            run.status.as_deref().unwrap_or("?")
        ));
    }
    run
}

fn handle_line(run: &mut SuiteRun, log: &mut Option<File>, stderr: bool, text: String) {
    if let Some(file) = log.as_mut() {
        let _ = writeln!(file, "{text}");
    }
    run.output.push_str(&text);
    run.output.push('\n');
    if !stderr {
        match crate::bench::parse_line(&text) {
            Some(Ok(record)) => {
                run.bench.push(record);
                return;
            }
            Some(Err(err)) => {
                warn!(%err, line = %text, "malformed bench line");
                run.malformed.push(text.clone());
            }
            None => {}
        }
        match parse_line(&text) {
            Some(Ok(result)) => {
                println!(
                    "  {} {} ({}){}",
                    if result.passed {
                        "ok  "
                    } else if result.skipped {
                        "skip"
                    } else {
                        "FAIL"
                    },
                    result.name,
                    format_duration(result.duration()),
                    if result.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", result.message)
                    }
                );
                run.results.push(result);
                return;
            }
            Some(Err(err)) => {
                warn!(%err, line = %text, "malformed result line");
                run.malformed.push(text.clone());
            }
            None => {}
        }
    }
    if stderr {
        eprintln!("guest| {text}");
    } else {
        println!("guest| {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, passed: bool) -> GuestResult {
        GuestResult {
            name: name.into(),
            passed,
            skipped: false,
            duration_ms: 1.0,
            message: String::new(),
        }
    }

    fn files() -> SessionFiles {
        SessionFiles::new(Path::new("/nonexistent"), "")
    }

    #[test]
    fn failures_that_name_the_injected_fault_are_expected_and_others_stay() {
        let failing = |name: &str, message: &str| {
            CaseResult::from_guest(&GuestResult {
                message: message.into(),
                ..result(name, false)
            })
        };
        let mut cases = vec![
            CaseResult::from_guest(&result("ops::fill", true)),
            failing("ops::copy", "byte differs at offset 0x10"),
            failing("ops::crc", "CRC mismatch"),
        ];
        let verdict = expect_injected(&mut cases, "offset 0x10");
        assert!(
            verdict.passed && verdict.message.contains("ops::copy"),
            "{verdict:?}"
        );
        assert!(cases[1].passed && cases[1].message.starts_with("failed as injected"));
        assert!(
            cases[2].failed(),
            "a failure that does not name the fault stays"
        );
        let mut quiet = vec![CaseResult::from_guest(&result("ops::fill", true))];
        let verdict = expect_injected(&mut quiet, "offset 0x10");
        assert!(verdict.failed() && verdict.message.contains("no guest test failed"));
    }

    #[test]
    fn session_files_are_suffixed() {
        let f = SessionFiles::new(Path::new("/out"), "-1");
        assert_eq!(f.qemu_log, Path::new("/out/qemu-1.log"));
        assert_eq!(f.serial_log, Path::new("/out/serial-1.log"));
        assert_eq!(f.guest_log, Path::new("/out/guest-1.log"));
        assert_eq!(files().qemu_log, Path::new("/nonexistent/qemu.log"));
    }

    #[test]
    fn suite_case_passes_only_when_consistent() {
        let timeout = Duration::from_secs(60);
        let mut suite = SuiteRun {
            results: vec![result("a", true), result("b", true)],
            success: true,
            status: Some("guest binary: exit status 0".into()),
            ..SuiteRun::default()
        };
        assert!(suite_case(&suite, timeout, &files()).passed);

        // Crash after the results: the binary failed though every test passed.
        suite.success = false;
        suite.status = Some("guest binary: exit status 139".into());
        let case = suite_case(&suite, timeout, &files());
        assert!(!case.passed);
        assert!(case.message.contains("139"), "{}", case.message);

        // A failing test and a non-zero exit are consistent: the test case carries the blame.
        suite.results.push(result("c", false));
        assert!(suite_case(&suite, timeout, &files()).passed);

        // No results at all.
        let empty = SuiteRun {
            success: true,
            ..SuiteRun::default()
        };
        assert!(!suite_case(&empty, timeout, &files()).passed);

        // Lost connection.
        let lost = SuiteRun {
            results: vec![result("a", true)],
            ssh_lost: true,
            output: "x\n".into(),
            ..SuiteRun::default()
        };
        let case = suite_case(&lost, timeout, &files());
        assert!(!case.passed);
        assert!(case.output.unwrap().contains("guest output"));
    }

    #[test]
    fn handle_line_separates_results_from_output() {
        let mut run = SuiteRun::default();
        let mut log = None;
        handle_line(&mut run, &mut log, false, "starting".into());
        handle_line(
            &mut run,
            &mut log,
            false,
            r#"DOMDMA-RESULT {"name":"t","passed":true,"duration_ms":1}"#.into(),
        );
        handle_line(&mut run, &mut log, false, "DOMDMA-RESULT {oops".into());
        // Result-looking lines on stderr are not results.
        handle_line(
            &mut run,
            &mut log,
            true,
            r#"DOMDMA-RESULT {"name":"e","passed":true,"duration_ms":2}"#.into(),
        );
        handle_line(
            &mut run,
            &mut log,
            false,
            r#"DOMDMA-BENCH {"kind":"skipped","what":"x","reason":"y"}"#.into(),
        );
        assert_eq!(run.results, vec![result("t", true)]);
        assert_eq!(
            run.bench.len(),
            1,
            "the bench line is a record, not a result"
        );
        assert_eq!(run.bench[0]["what"], "x");
        assert_eq!(run.malformed.len(), 1);
        assert_eq!(run.output.lines().count(), 5);
    }

    #[test]
    fn survival_needs_kill_alive_server_and_second_run() {
        let first = Session {
            killed_mid_suite: true,
            ..Session::default()
        };
        let second = Session {
            results: vec![result("device_found", true), result("copy", false)],
            ..Session::default()
        };
        // No device server handle: "not running after QEMU #2".
        let case = survival_case(&first, true, &second, None, None, Duration::ZERO);
        assert!(!case.passed);
        assert!(case.message.contains("not running after QEMU #2"));
        let case = survival_case(&first, false, &second, None, Some("copy"), Duration::ZERO);
        assert!(case.message.contains("did not survive"));
        assert!(case.message.contains("did not pass copy"));
        let not_killed = Session::default();
        let case = survival_case(&not_killed, true, &second, None, None, Duration::ZERO);
        assert!(case.message.contains("was not killed"));
    }

    #[test]
    fn free_port_is_loopback_and_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
