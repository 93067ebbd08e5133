//! The `domdma-device` binary: start-up errors, serving, and a clean exit on SIGTERM/SIGINT.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Client, TestServer};
use domdma_device::spec;
use vmm_sys_util::tempdir::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_domdma-device");

fn tmp() -> TempDir {
    TempDir::new_with_prefix("/tmp/domdma-bin-").unwrap()
}

/// A running server process and its stderr lines.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(socket: &Path) -> Self {
        let mut child = Command::new(BIN)
            .arg("--socket")
            .arg(socket)
            .env("DOMDMA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Wait for a stderr line containing `needle`.
    fn expect_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?}"),
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill with the pid of our own child process.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    p.expect_line("client disconnected");
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

fn run_err(socket: &Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("--socket")
        .arg(socket)
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

    let (code, err) = run_err(&d.join("missing/dev.sock"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not exist") && err.contains("missing"),
        "{err}"
    );

    let file = d.join("file");
    std::fs::write(&file, "x").unwrap();
    let (code, err) = run_err(&file);
    assert_eq!(code, Some(1));
    assert!(err.contains("is a regular file, not a socket"), "{err}");

    let (code, err) = run_err(d);
    assert_eq!(code, Some(1));
    assert!(err.contains("is a directory, not a socket"), "{err}");

    // A live server on the path.
    let srv = TestServer::start();
    let (code, err) = run_err(&srv.path);
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
