//! The device server process (`domdma-device --socket PATH`).
//!
//! It must listen before QEMU starts: QEMU gives up at once on a socket nobody listens on. A
//! connect probe is no way to check, since the server would take it for its client, so the
//! runner waits for the socket file to exist and for the server's "listening" log line.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::info;

use crate::process::{
    describe_status, log_file_stdio, ChildGuard, Interrupt, ProcessError, StopPolicy, POLL_INTERVAL,
};
use crate::report::tail_file;

/// Time the server gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The word the server logs once it accepts connections.
pub const LISTENING_MARKER: &str = "listening";

/// Errors of device server handling.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Starting it failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// It ended before it listened.
    #[error("device server exited before listening ({status}):\n{log_tail}")]
    EarlyExit {
        /// How it ended.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// It did not listen in time.
    #[error("device server not listening on {} after {}s:\n{log_tail}", socket.display(), timeout.as_secs())]
    NotListening {
        /// The socket it should have created.
        socket: PathBuf,
        /// How long the runner waited.
        timeout: Duration,
        /// The end of its log.
        log_tail: String,
    },
    /// The runner was interrupted.
    #[error("interrupted")]
    Interrupted,
}

/// How the server ended when the runner stopped it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceStop {
    /// Its exit status, if it could be reaped.
    pub status: Option<ExitStatus>,
    /// Whether it ignored SIGTERM and needed SIGKILL.
    pub needed_kill: bool,
    /// Whether its socket file was gone afterwards.
    pub socket_removed: bool,
    /// Whether it had already ended before the runner stopped it.
    pub ended_early: bool,
}

/// A running device server.
#[derive(Debug)]
pub struct DeviceServer {
    child: ChildGuard,
    socket: PathBuf,
    log: PathBuf,
}

impl DeviceServer {
    /// Starts `bin --socket socket ARGS...` with stdout and stderr in `log` (and
    /// `RUST_LOG=info` unless the caller set `RUST_LOG`), and waits until it listens. `args`
    /// are device options (`--queues 8`, `--strict-iotlb`, ...); a server that refuses them
    /// exits at once and its message is in the error.
    pub fn start(
        bin: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
        timeout: Duration,
        interrupt: &Interrupt,
    ) -> Result<Self, DeviceError> {
        let (stdout, stderr) = log_file_stdio(log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Plain text in the log file, no colour codes.
            .env("NO_COLOR", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let child =
            ChildGuard::spawn("device server", &mut cmd, StopPolicy::terminate(STOP_GRACE))?;
        let mut server = Self {
            child,
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        server.wait_listening(timeout, interrupt)?;
        info!(pid = server.child.pid(), socket = %socket.display(), "device server listening");
        Ok(server)
    }

    fn wait_listening(
        &mut self,
        timeout: Duration,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let deadline = Instant::now() + timeout;
        loop {
            if interrupt.is_set() {
                return Err(DeviceError::Interrupted);
            }
            if let Some(status) = self.child.try_status()? {
                return Err(DeviceError::EarlyExit {
                    status: describe_status(status),
                    log_tail: tail_file(&self.log, 20),
                });
            }
            if is_listening(&self.socket, &self.log) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DeviceError::NotListening {
                    socket: self.socket.clone(),
                    timeout,
                    log_tail: tail_file(&self.log, 20),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// The end of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }

    /// Stops it with SIGTERM (SIGKILL after [`STOP_GRACE`]).
    pub fn stop(mut self) -> DeviceStop {
        let ended_early = !self.child.is_running();
        let (status, needed_kill) = self.child.stop();
        DeviceStop {
            status,
            needed_kill,
            socket_removed: !self.socket.exists(),
            ended_early,
        }
    }
}

/// The socket exists and the log says the server listens.
pub fn is_listening(socket: &Path, log: &Path) -> bool {
    let is_socket = fs::symlink_metadata(socket)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    is_socket
        && fs::read(log)
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .to_ascii_lowercase()
                    .contains(LISTENING_MARKER)
            })
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::tempdir::TempDir;

    #[test]
    fn listening_needs_socket_and_log_line() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let socket = dir.path().join("s.sock");
        let log = dir.path().join("device.log");
        assert!(!is_listening(&socket, &log));
        fs::write(&log, "INFO starting\n").unwrap();
        let _listener = UnixListener::bind(&socket).unwrap();
        assert!(!is_listening(&socket, &log));
        fs::write(&log, "INFO starting\nINFO Listening on /x\n").unwrap();
        assert!(is_listening(&socket, &log));
        // A regular file is not a socket.
        let file = dir.path().join("plain");
        fs::write(&file, "").unwrap();
        assert!(!is_listening(&file, &log));
    }

    /// A stand-in server that fails at once: the wait reports its status and log.
    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let script = dir.path().join("server.sh");
        fs::write(
            &script,
            "#!/bin/sh\necho \"bad arguments: $*\" >&2\nexit 3\n",
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let err = DeviceServer::start(
            &script,
            &["--queues".to_string(), "0".to_string()],
            &dir.path().join("s.sock"),
            &dir.path().join("device.log"),
            Duration::from_secs(5),
            &Interrupt::new(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit status 3"), "{text}");
        assert!(text.contains("bad arguments: --socket"), "{text}");
        assert!(
            text.contains("--queues 0"),
            "device options follow the socket: {text}"
        );
    }
}
