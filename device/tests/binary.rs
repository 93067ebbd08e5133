//! The `domdma-device` binary: start-up errors, serving, and a clean exit on SIGTERM/SIGINT.

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Client, TestServer, MSIX_IRQ};
use domdma_device::spec;
use domdma_testkit::launcher::{DeviceServer, Launch};
use vmm_sys_util::tempdir::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_domdma-device");

fn tmp() -> TempDir {
    TempDir::new_with_prefix("/tmp/domdma-bin-").unwrap()
}

/// A running server process (the test kit's launcher: ready once it accepts) and its log.
struct Proc(DeviceServer);

impl Proc {
    fn spawn(socket: &Path) -> Self {
        Self::spawn_with(socket, &[])
    }

    fn spawn_with(socket: &Path, args: &[&str]) -> Self {
        let server = Launch::new(BIN)
            .socket(socket)
            .args(args.iter().copied())
            .env("DOMDMA_LOG", "info")
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        Self(server)
    }

    /// Waits for the `n`-th log line containing `needle` and returns it.
    fn expect_nth_line(&self, needle: &str, n: usize) -> String {
        self.0
            .wait_log(needle, n, Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!(
                    "no {n} log line(s) containing {needle:?}; log:\n{}",
                    self.0.log()
                )
            })
    }

    /// Waits for a log line containing `needle`.
    fn expect_line(&self, needle: &str) -> String {
        self.expect_nth_line(needle, 1)
    }

    fn signal(&mut self, sig: i32) {
        self.0.signal(sig);
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.0
            .wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("server did not exit; log:\n{}", self.0.log()))
    }
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let mut p = Proc::spawn(&sock);
    let line = p.expect_line("listening on");
    assert!(line.contains(sock.to_str().unwrap()), "{line}");
    assert!(
        !line.contains('\x1b'),
        "no colour codes when stderr is not a terminal"
    );
    // It serves.
    let mut c = Client::connect(&sock);
    c.handshake();
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
    drop(c);
    // The launcher's readiness probe was the first client.
    p.expect_nth_line("client disconnected", 2);
    p.signal(libc::SIGTERM);
    let st = p.wait();
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn sigint_with_a_client_connected_exits_zero() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let mut p = Proc::spawn(&sock);
    p.expect_line("listening on");
    let mut c = Client::connect(&sock);
    c.handshake();
    // The client stays connected and idle.
    p.signal(libc::SIGINT);
    let st = p.wait();
    assert_eq!(st.code(), Some(0), "{st:?}");
    assert!(!sock.exists());
    assert!(c.closed_by_server());
}

/// Runs the binary with `args` after `--socket`, expecting it to refuse the socket or the
/// arguments: its exit code and standard error.
fn refused(socket: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn clear_start_up_errors() {
    let dir = tmp();
    let d = dir.as_path();

    let (code, err) = refused(&d.join("missing/dev.sock"), &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not exist") && err.contains("missing"),
        "{err}"
    );

    let file = d.join("file");
    std::fs::write(&file, "x").unwrap();
    let (code, err) = refused(&file, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is a regular file, not a socket"), "{err}");

    let (code, err) = refused(d, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is a directory, not a socket"), "{err}");

    // A live server on the path.
    let srv = TestServer::start();
    let (code, err) = refused(&srv.path, &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("is in use") && err.contains("stop that server"),
        "{err}"
    );

    // No --socket: clap's usage error.
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket"));
}

#[test]
fn stale_socket_is_replaced() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut p = Proc::spawn(&sock);
    p.expect_line("removed a stale socket");
    p.expect_line("listening on");
    let mut c = Client::connect(&sock);
    c.handshake();
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().code(), Some(0));
}

#[test]
fn help() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--socket <PATH>"), "{text}");
    assert!(text.contains("vfio-user-pci"), "{text}");
}

#[test]
fn bad_option_values_name_the_option_and_the_range() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--queues", "0"],
            &["--queues", "between 1 and 32", "not 0"],
        ),
        (
            &["--queues", "33"],
            &["--queues", "between 1 and 32", "not 33"],
        ),
        (&["--domains", "0"], &["--domains", "between 1 and 64"]),
        (
            &["--domains", "65"],
            &["--domains", "between 1 and 64", "not 65"],
        ),
        (
            &["--iova-width", "40"],
            &["--iova-width", "32 or 48", "not 40"],
        ),
        (
            &["--iotlb-entries", "0"],
            &["--iotlb-entries", "between 1 and 4096"],
        ),
        (
            &["--iotlb-entries", "4097"],
            &["--iotlb-entries", "between 1 and 4096"],
        ),
        (
            &["--max-transfer", "100"],
            &["--max-transfer", "between 4096 and 1073741824", "not 100"],
        ),
        (
            &["--max-transfer", "8G"],
            &[
                "--max-transfer",
                "between 4096 and 1073741824",
                "not 8589934592",
            ],
        ),
        // Not numbers at all: clap's own messages, naming the option.
        (
            &["--max-transfer", "lots"],
            &["--max-transfer", "not a byte count"],
        ),
        (&["--queues", "four"], &["--queues"]),
        (&["--inspect", "SOCKET"], &["--inspect", "another path"]),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args
            .iter()
            .map(|a| {
                if *a == "SOCKET" {
                    sock.to_str().unwrap()
                } else {
                    a
                }
            })
            .collect();
        let (code, err) = refused(&sock, &args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        for n in *needles {
            assert!(err.contains(n), "{args:?}: {n:?} not in {err:?}");
        }
        assert!(
            !sock.exists(),
            "{args:?}: no socket for a refused configuration"
        );
    }
    // Good values, at the edges of their ranges, are accepted.
    let mut p = Proc::spawn_with(
        &sock,
        &[
            "--queues",
            "32",
            "--domains",
            "64",
            "--iova-width",
            "32",
            "--iotlb-entries",
            "4096",
            "--max-transfer",
            "4K",
        ],
    );
    p.expect_line("listening on");
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().code(), Some(0));
}

#[test]
fn options_reach_the_device() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let mut p = Proc::spawn_with(
        &sock,
        &[
            "--queues",
            "3",
            "--domains",
            "7",
            "--iova-width",
            "32",
            "--iotlb-entries",
            "128",
            "--max-transfer",
            "1M",
            "--strict-iotlb",
        ],
    );
    p.expect_line("listening on");
    let mut c = Client::connect(&sock);
    c.handshake();
    let cap = c.read_u32(0, spec::REG_CAP);
    assert_eq!((cap >> spec::CAP_QUEUES_SHIFT) & 0xff, 3, "{cap:#x}");
    assert_eq!((cap >> spec::CAP_VECTORS_SHIFT) & 0xff, 4, "{cap:#x}");
    assert_eq!((cap >> spec::CAP_IOVA_WIDTH_SHIFT) & 0xff, 32, "{cap:#x}");
    assert_eq!((cap >> spec::CAP_DOMAINS_SHIFT) & 0xff, 7, "{cap:#x}");
    assert_eq!(c.read_u32(0, spec::REG_MAX_XFER), 1 << 20);
    assert_eq!(c.read_u32(0, spec::REG_CAP_IOTLB), 128);
    assert_ne!(
        c.read_u32(0, spec::REG_DEV_STATUS) & spec::DEV_STATUS_STRICT_IOTLB,
        0
    );
    // The MSI-X vector count VFIO clients see: queues + 1.
    let r = c
        .call(
            common::DEVICE_GET_IRQ_INFO,
            &common::fields(&[&16u32, &0u32, &MSIX_IRQ, &0u32]),
            &[],
        )
        .ok(common::DEVICE_GET_IRQ_INFO);
    assert_eq!(r.u32_at(12), 4);
    drop(c);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().code(), Some(0));
}

fn fetch_json(path: &Path) -> serde_json::Value {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn inspect_serves_json_and_is_removed_at_exit() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let insp = dir.as_path().join("inspect.sock");
    let mut p = Proc::spawn_with(
        &sock,
        &[
            "--queues",
            "3",
            "--domains",
            "5",
            "--inspect",
            insp.to_str().unwrap(),
        ],
    );
    p.expect_line("listening on");
    assert!(insp.exists(), "inspector socket created");
    // A client connected meanwhile does not stop the inspector answering.
    let mut c = Client::connect(&sock);
    c.handshake();
    for _ in 0..2 {
        let v = fetch_json(&insp);
        assert_eq!(v["device"], "domdma", "{v}");
        assert_eq!(v["config"]["queues"], 3, "{v}");
        assert_eq!(v["config"]["domains"], 5, "{v}");
        assert_eq!(v["config"]["msix_vectors"], 4, "{v}");
        assert_eq!(v["config"]["iova_width"], 48, "{v}");
        assert_eq!(v["config"]["strict_iotlb"], false, "{v}");
        let queues = v["queues"].as_array().unwrap_or_else(|| panic!("{v}"));
        let domains = v["domains"].as_array().unwrap_or_else(|| panic!("{v}"));
        assert_eq!(queues.len(), 3, "one entry per queue: {v}");
        assert_eq!(domains.len(), 5, "one entry per domain: {v}");
        for q in queues {
            assert!(q["descriptors"].is_u64() && q["bytes"].is_u64(), "{q}");
        }
        for d in domains {
            assert!(d["iotlb_hits"].is_u64() && d["page_walks"].is_u64(), "{d}");
        }
        assert!(v["faults"]["count"].is_u64(), "{v}");
    }
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
    drop(c);
    p.signal(libc::SIGTERM);
    assert_eq!(p.wait().code(), Some(0));
    assert!(!sock.exists(), "device socket removed");
    assert!(!insp.exists(), "inspector socket removed");
}

/// A stderr nobody reads cannot stall the server: with its stderr a pipe that is never
/// read (the pipe fills after some hundred lines), a thousand clients that each make the
/// server warn are all served.
#[test]
fn a_stderr_nobody_reads_never_stalls_the_server() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let mut child = Command::new(BIN)
        .arg("--socket")
        .arg(&sock)
        .env("DOMDMA_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Hold the read end open, never read it.
    let _stderr = child.stderr.take();
    let ready = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(ready.elapsed() < Duration::from_secs(10), "never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = std::time::Instant::now();
    for i in 0..1000 {
        let mut c = Client::connect(&sock);
        c.handshake();
        // A malformed DMA_MAP: a warning (and debug lines) per client.
        let r = c.call(common::DMA_MAP, &[0u8; 8], &[]);
        assert!(r.is_error(), "client {i}: {r:?}");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "stalled after {i} clients"
        );
    }
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// Client-triggered warnings are rate-limited per call site, with the suppressed count.
#[test]
fn client_triggered_warnings_are_rate_limited() {
    let dir = tmp();
    let sock = dir.as_path().join("dev.sock");
    let p = Proc::spawn(&sock);
    let mut c = Client::connect(&sock);
    c.handshake();
    for _ in 0..500 {
        let r = c.call(common::DMA_MAP, &[0u8; 8], &[]);
        assert!(r.is_error());
    }
    // The same warning after the window reports what was suppressed.
    p.expect_line("malformed message");
    let log = p.0.log();
    let n = log.matches("malformed message").count();
    assert!(
        (1..=domdma_device::logging::BURST as usize).contains(&n),
        "{n} lines of the same warning for 500 malformed messages"
    );
}
