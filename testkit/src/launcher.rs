//! The one launcher of the `domdma-device` server binary, for every test and runner.
//!
//! [`Launch`] starts `domdma-device --socket PATH ARGS...` with its stdout and stderr in a
//! log file, in its own process group and with a parent-death signal (so neither a Ctrl-C
//! meant for the test nor a killed test leaves a server behind), and waits until the
//! server **accepts a connection on its socket**: the only readiness that cannot be
//! fooled by a stale socket file or a log line written too early. The probe connection is
//! closed at once; the server serves clients one at a time and goes back to accepting.
//!
//! [`DeviceServer`] is the running server: its socket, its log, [`DeviceServer::stop`]
//! (SIGTERM, then SIGKILL after a grace period, with what happened), and on drop SIGKILL.
//!
//! The binary is given by the caller: the test harness knows it (Cargo's
//! `CARGO_BIN_EXE_domdma-device` in the device crate's tests, `DOMDMA_DEVICE_BIN`
//! ([`binary_from_env`]) or a runner's option). Nothing here runs `cargo`.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

/// Environment variable naming a built `domdma-device` binary.
pub const DEVICE_BIN_ENV: &str = "DOMDMA_DEVICE_BIN";
/// How long [`Launch::spawn`] waits for the server to accept by default.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`DeviceServer::stop`] waits after SIGTERM by default.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How often the waits look at the server.
const POLL: Duration = Duration::from_millis(10);
/// Most of the log returned in messages.
const MAX_LOG: u64 = 16 << 10;

/// Why the server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No binary was given.
    #[error("no domdma-device binary: set {DEVICE_BIN_ENV} to a built one (cargo build -p domdma-device)")]
    NoBinary,
    /// The binary given does not exist.
    #[error("{} is not a file: build it with cargo build -p domdma-device, or fix {DEVICE_BIN_ENV}", .0.display())]
    MissingBinary(PathBuf),
    /// A file the launcher needs could not be created.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The process could not be started.
    #[error("cannot run {}", bin.display())]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// It exited before accepting a connection.
    #[error("domdma-device exited before accepting connections ({status}); its log:\n{log}")]
    EarlyExit {
        /// How it ended.
        status: String,
        /// The end of its log.
        log: String,
    },
    /// It did not accept a connection in time.
    #[error("domdma-device did not accept a connection on {} within {timeout:?}; its log:\n{log}", socket.display())]
    NotListening {
        /// The socket.
        socket: PathBuf,
        /// How long the launcher waited.
        timeout: Duration,
        /// The end of its log.
        log: String,
    },
    /// The caller cancelled the wait.
    #[error("cancelled while waiting for the device server")]
    Cancelled,
}

/// The binary named by `DOMDMA_DEVICE_BIN`.
pub fn binary_from_env() -> Result<PathBuf, LaunchError> {
    std::env::var_os(DEVICE_BIN_ENV)
        .map(PathBuf::from)
        .ok_or(LaunchError::NoBinary)
}

/// How to start a server. `Launch::new(bin).args([...]).spawn()`.
#[derive(Debug, Clone)]
pub struct Launch {
    bin: PathBuf,
    args: Vec<OsString>,
    socket: Option<PathBuf>,
    log: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
    cancel: Option<Arc<AtomicBool>>,
}

impl Launch {
    /// A launch of `bin` with no device options, on a socket in a private temporary
    /// directory, logging there.
    pub fn new(bin: impl Into<PathBuf>) -> Self {
        Launch {
            bin: bin.into(),
            args: Vec::new(),
            socket: None,
            log: None,
            env: Vec::new(),
            timeout: DEFAULT_START_TIMEOUT,
            cancel: None,
        }
    }

    /// Device options (`--queues 8`, `--iova-width 32`, ...), after `--socket PATH`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Listen on this socket instead of one in a temporary directory.
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// Write stdout and stderr to this file instead of one in a temporary directory.
    pub fn log(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// An environment variable for the server.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How long to wait for the server to accept.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Give up waiting (with [`LaunchError::Cancelled`]) when this flag is set.
    pub fn cancel_on(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Starts the server and waits until it accepts a connection on its socket.
    pub fn spawn(self) -> Result<DeviceServer, LaunchError> {
        if !self.bin.is_file() {
            return Err(LaunchError::MissingBinary(self.bin));
        }
        let dir = if self.socket.is_none() || self.log.is_none() {
            // Short, fixed prefix: a socket path must stay below 108 bytes.
            Some(
                tempfile::Builder::new()
                    .prefix("domdma-dev-")
                    .tempdir_in("/tmp")
                    .map_err(|source| LaunchError::Io {
                        what: "creating a temporary directory in",
                        path: "/tmp".into(),
                        source,
                    })?,
            )
        } else {
            None
        };
        let in_dir = |name: &str| dir.as_ref().expect("made above").path().join(name);
        let socket = self.socket.unwrap_or_else(|| in_dir("dev.sock"));
        let log_path = self.log.unwrap_or_else(|| in_dir("device.log"));
        let log = File::create(&log_path).map_err(|source| LaunchError::Io {
            what: "creating the log file",
            path: log_path.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| LaunchError::Io {
            what: "duplicating the log file",
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&socket)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            // Plain text in the log file.
            .env("NO_COLOR", "1")
            // Its own process group: a terminal's Ctrl-C reaches the test, which then
            // stops the server in order.
            .process_group(0);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // The hook runs in the child between fork and exec: follow the parent if it dies
        // without stopping us.
        let follow_parent = || {
            // SAFETY: prctl(2) with PR_SET_PDEATHSIG takes two integers and touches no
            // memory; it is async-signal-safe, as a pre-exec hook must be.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook only calls prctl(2) (above): no allocation, no lock, nothing of
        // the parent's state, as code between fork and exec must.
        unsafe { cmd.pre_exec(follow_parent) };
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            bin: self.bin.clone(),
            source,
        })?;
        let mut server = DeviceServer {
            child,
            socket,
            log: log_path,
            _dir: dir,
        };
        server.wait_accepting(self.timeout, self.cancel.as_deref())?;
        debug!(pid = server.pid(), socket = %server.socket.display(), "device server up");
        Ok(server)
    }
}

/// How a server ended when it was stopped.
#[derive(Debug, Clone, Copy)]
pub struct Stopped {
    /// Its exit status, when it could be reaped.
    pub status: Option<ExitStatus>,
    /// Whether it ignored SIGTERM and needed SIGKILL.
    pub needed_kill: bool,
    /// Whether its socket file was gone afterwards.
    pub socket_removed: bool,
    /// Whether it had already ended before it was stopped.
    pub ended_early: bool,
}

/// A running `domdma-device`. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct DeviceServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    // Removed (with the socket and the log) after the child is gone.
    _dir: Option<tempfile::TempDir>,
}

impl DeviceServer {
    fn wait_accepting(
        &mut self,
        timeout: Duration,
        cancel: Option<&AtomicBool>,
    ) -> Result<(), LaunchError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Err(LaunchError::EarlyExit {
                    status: status.to_string(),
                    log: self.log(),
                });
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(LaunchError::Cancelled);
            }
            if start.elapsed() >= timeout {
                return Err(LaunchError::NotListening {
                    socket: self.socket.clone(),
                    timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The socket the server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The server's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The end (at most 16 KiB) of what the server wrote so far.
    pub fn log(&self) -> String {
        let read = || -> io::Result<String> {
            let mut f = File::open(&self.log)?;
            let len = f.metadata()?.len();
            f.seek(SeekFrom::Start(len.saturating_sub(MAX_LOG)))?;
            let mut b = Vec::new();
            f.take(MAX_LOG).read_to_end(&mut b)?;
            Ok(String::from_utf8_lossy(&b).into_owned())
        };
        read().unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Sends `signal` to the server's process group.
    pub fn signal(&mut self, signal: libc::c_int) {
        if !self.is_running() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on the process group our own unreaped child leads (it runs,
            // so its PID cannot have been reused); no memory is passed.
            unsafe { libc::kill(-pid, signal) };
        }
    }

    /// Waits up to `timeout` for the server to exit by itself (after a signal the caller
    /// sent); its status, or `None` when it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits up to `timeout` until the log holds `count` lines containing `needle`;
    /// returns the last of them, or `None` on timeout.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            let log = self.log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
            if lines.len() >= count {
                return lines.last().map(|l| l.to_string());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops the server: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) -> Stopped {
        let ended_early = !self.is_running();
        let mut needed_kill = false;
        if !ended_early {
            self.signal(libc::SIGTERM);
            let start = Instant::now();
            while self.is_running() && start.elapsed() < grace {
                std::thread::sleep(POLL);
            }
            if self.is_running() {
                needed_kill = true;
                self.signal(libc::SIGKILL);
            }
        }
        let status = self.child.wait().ok();
        Stopped {
            status,
            needed_kill,
            socket_removed: !self.socket.exists(),
            ended_early,
        }
    }
}

impl Drop for DeviceServer {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("server.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let bin = script(dir.path(), "echo \"bad arguments: $*\" >&2\nexit 3");
        let err = Launch::new(bin)
            .args(["--queues", "0"])
            .spawn()
            .unwrap_err()
            .to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("bad arguments: --socket"), "{err}");
        assert!(
            err.contains("--queues 0"),
            "options follow the socket: {err}"
        );
    }

    #[test]
    fn a_socket_file_alone_is_not_readiness() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        // Binds the socket, never listens... by exiting the binder at once: the file stays.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let bin = script(dir.path(), "sleep 5");
        let err = Launch::new(bin)
            .socket(&sock)
            .timeout(Duration::from_millis(300))
            .spawn()
            .unwrap_err();
        assert!(matches!(err, LaunchError::NotListening { .. }), "{err}");
    }

    #[test]
    fn a_missing_binary_names_the_fix() {
        let err = Launch::new("/nonexistent/domdma-device")
            .spawn()
            .unwrap_err()
            .to_string();
        assert!(err.contains("cargo build -p domdma-device"), "{err}");
    }
}
