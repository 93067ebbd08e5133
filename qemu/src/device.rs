//! The device server process (`domdma-device --socket PATH`), started with the test kit's
//! launcher (`domdma_testkit::launcher`), the one launcher every test and runner uses: its
//! own process group, a parent-death signal, stdout and stderr in the run's device log, and
//! ready once it **accepts a connection** on its socket (QEMU gives up at once on a socket
//! nobody listens on). The launcher's probe connection is closed before QEMU connects; the
//! server serves one client at a time and goes back to accepting.

use std::path::Path;
use std::time::Duration;

use domdma_testkit::launcher::{self, Launch, LaunchError};
use tracing::info;

use crate::process::Interrupt;
use crate::report::tail_file;

/// Time the server gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Errors of device server handling.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// It could not be started, or did not accept connections.
    #[error(transparent)]
    Launch(LaunchError),
    /// The runner was interrupted.
    #[error("interrupted")]
    Interrupted,
}

/// How the server ended when the runner stopped it.
pub type DeviceStop = launcher::Stopped;

/// A running device server.
#[derive(Debug)]
pub struct DeviceServer {
    server: launcher::DeviceServer,
}

impl DeviceServer {
    /// Starts `bin --socket socket ARGS...` with stdout and stderr in `log` (and
    /// `RUST_LOG=info` unless the caller set `RUST_LOG`), and waits until it accepts a
    /// connection. `args` are device options (`--queues 8`, `--strict-iotlb`, ...); a
    /// server that refuses them exits at once and its message is in the error.
    pub fn start(
        bin: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
        timeout: Duration,
        interrupt: &Interrupt,
    ) -> Result<Self, DeviceError> {
        let mut launch = Launch::new(bin)
            .args(args)
            .socket(socket)
            .log(log)
            .timeout(timeout)
            .cancel_on(interrupt.flag());
        if std::env::var_os("RUST_LOG").is_none() {
            launch = launch.env("RUST_LOG", "info");
        }
        let server = launch.spawn().map_err(|e| match e {
            LaunchError::Cancelled => DeviceError::Interrupted,
            e => DeviceError::Launch(e),
        })?;
        info!(pid = server.pid(), socket = %socket.display(), "device server accepting");
        Ok(Self { server })
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.server.is_running()
    }

    /// The end of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(self.server.log_path(), lines)
    }

    /// Stops it with SIGTERM (SIGKILL after [`STOP_GRACE`]).
    pub fn stop(self) -> DeviceStop {
        self.server.stop(STOP_GRACE)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::tempdir::TempDir;

    /// A stand-in server that fails at once: the error carries its status and log.
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
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("bad arguments: --socket"), "{text}");
        assert!(
            text.contains("--queues 0"),
            "device options follow the socket: {text}"
        );
    }

    /// An interrupt ends the wait for a server that never listens.
    #[test]
    fn an_interrupt_cancels_the_wait() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let script = dir.path().join("server.sh");
        fs::write(&script, "#!/bin/sh\nsleep 10\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        let interrupt = Interrupt::new();
        interrupt.set();
        let err = DeviceServer::start(
            &script,
            &[],
            &dir.path().join("s.sock"),
            &dir.path().join("device.log"),
            Duration::from_secs(5),
            &interrupt,
        )
        .unwrap_err();
        assert!(matches!(err, DeviceError::Interrupted), "{err}");
    }
}
