//! SSH into the guest with the system `ssh` client.
//!
//! One master connection (`ControlMaster`) is opened after the guest reported ready and every
//! later command rides on it, as Firecracker's test framework does: the key exchange is paid
//! once (slow under TCG), and the retries live in one place. If the master dies, `ssh` falls
//! back to a direct connection by itself.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::process::{describe_status, ChildGuard, Interrupt, ProcessError, StopPolicy};

/// The guest user.
pub const GUEST_USER: &str = "root";

/// Where the guest listens, seen from the host (QEMU's user-mode forward).
pub const GUEST_HOST: &str = "127.0.0.1";

/// Errors of SSH handling.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The private key is missing or unreadable.
    #[error("cannot use SSH key {}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// The error from `metadata`.
        #[source]
        source: io::Error,
    },
    /// ssh refuses keys other users can read.
    #[error("SSH key {} has mode {mode:o}; ssh wants 0600 or stricter", path.display())]
    KeyMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A process could not be started or waited for.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The log of the master connection could not be written.
    #[error("cannot write {}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// The error from `open`.
        #[source]
        source: io::Error,
    },
    /// The master connection never came up.
    #[error("no SSH connection after {attempts} attempts: {last}")]
    Connect {
        /// How many connections were tried.
        attempts: u32,
        /// What went wrong the last time.
        last: String,
    },
    /// A command timed out.
    #[error("`{what}` did not finish within {}s", timeout.as_secs())]
    Timeout {
        /// The command.
        what: String,
        /// Its time limit.
        timeout: Duration,
    },
    /// A command failed.
    #[error("`{what}` failed ({status}): {stderr}")]
    Failed {
        /// The command.
        what: String,
        /// How it ended.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Feeding a command's stdin failed.
    #[error("cannot read {}", path.display())]
    Input {
        /// The input file.
        path: PathBuf,
        /// The error from `open`.
        #[source]
        source: io::Error,
    },
    /// The runner was interrupted.
    #[error("interrupted")]
    Interrupted,
}

/// How to reach the guest.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Private key for the guest's root.
    pub key: PathBuf,
    /// Host port forwarded to the guest's port 22.
    pub port: u16,
    /// Control socket of the master connection.
    pub control_path: PathBuf,
}

impl SshConfig {
    /// Checks the key exists and has a mode ssh accepts.
    pub fn check_key(key: &Path) -> Result<(), SshError> {
        let meta = std::fs::metadata(key).map_err(|source| SshError::Key {
            path: key.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SshError::KeyMode {
                path: key.to_owned(),
                mode,
            });
        }
        Ok(())
    }

    /// Options and destination shared by every invocation.
    pub fn base_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["-i".into(), self.key.clone().into()];
        args.push("-p".into());
        args.push(self.port.to_string().into());
        for option in [
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            "BatchMode=yes",
            "ConnectTimeout=10",
            "IdentitiesOnly=yes",
            // A hung guest is noticed within 15 s instead of never.
            "ServerAliveInterval=5",
            "ServerAliveCountMax=3",
        ] {
            args.push("-o".into());
            args.push(option.into());
        }
        let mut control = OsString::from("ControlPath=");
        control.push(&self.control_path);
        args.push("-o".into());
        args.push(control);
        args.push(format!("{GUEST_USER}@{GUEST_HOST}").into());
        args
    }

    /// `ssh ... -- remote`, using the master connection if there is one.
    pub fn command(&self, remote: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "ControlMaster=no"])
            .args(self.base_args())
            .arg("--")
            .arg(remote);
        cmd
    }

    /// `ssh -N` holding the master connection in the foreground.
    pub fn master_command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-N", "-o", "ControlMaster=yes", "-o", "ControlPersist=no"])
            .args(self.base_args());
        cmd
    }
}

/// Opens the master connection, retrying a bounded number of times. Its stderr is appended to
/// `log`. Returns the master process; the connection lives as long as it does.
pub fn connect_master(
    config: &SshConfig,
    log: &Path,
    attempts: u32,
    per_attempt: Duration,
    interrupt: &Interrupt,
) -> Result<ChildGuard, SshError> {
    let mut last = String::from("not tried");
    for attempt in 1..=attempts {
        if interrupt.is_set() {
            return Err(SshError::Interrupted);
        }
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| SshError::Log {
                path: log.to_owned(),
                source,
            })?;
        let _ = std::fs::remove_file(&config.control_path);
        let mut cmd = config.master_command();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(stderr));
        let mut master = ChildGuard::spawn("ssh master", &mut cmd, StopPolicy::KILL)?;
        let deadline = Instant::now() + per_attempt;
        loop {
            if interrupt.is_set() {
                return Err(SshError::Interrupted);
            }
            if is_socket(&config.control_path) {
                info!(attempt, port = config.port, "SSH connection up");
                return Ok(master);
            }
            if let Some(status) = master.try_status()? {
                last = format!(
                    "ssh exited ({}): {}",
                    describe_status(status),
                    crate::report::tail_file(log, 3)
                );
                break;
            }
            if Instant::now() >= deadline {
                last = format!("no connection within {}s", per_attempt.as_secs());
                master.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        warn!(attempt, attempts, reason = %last, "SSH attempt failed");
        if attempt < attempts
            && !crate::process::sleep_unless_interrupted(interrupt, Duration::from_secs(1))
        {
            return Err(SshError::Interrupted);
        }
    }
    Err(SshError::Connect { attempts, last })
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Runs `remote` with `input` on its stdin, waiting at most `timeout`.
pub fn run_with_input(
    config: &SshConfig,
    remote: &str,
    input: &Path,
    timeout: Duration,
    interrupt: &Interrupt,
) -> Result<(), SshError> {
    let file = File::open(input).map_err(|source| SshError::Input {
        path: input.to_owned(),
        source,
    })?;
    let mut cmd = config.command(remote);
    cmd.stdin(Stdio::from(file))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    debug!(remote, input = %input.display(), "ssh");
    let mut child = ChildGuard::spawn("ssh", &mut cmd, StopPolicy::KILL)?;
    let mut stderr = child.take_stderr();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if interrupt.is_set() {
            child.kill();
            return Err(SshError::Interrupted);
        }
        if let Some(status) = child.try_status()? {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill();
            return Err(SshError::Timeout {
                what: remote.to_owned(),
                timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    if let Some(stderr) = stderr.as_mut() {
        let _ = stderr.read_to_string(&mut text);
    }
    Err(SshError::Failed {
        what: remote.to_owned(),
        status: describe_status(status),
        stderr: text.trim().to_owned(),
    })
}

/// Copies a local file to `remote_path` in the guest and makes it executable (the guest has
/// no scp or sftp: `cat` on the far side).
pub fn copy_executable(
    config: &SshConfig,
    local: &Path,
    remote_path: &str,
    timeout: Duration,
    interrupt: &Interrupt,
) -> Result<(), SshError> {
    let quoted = crate::qemu::shell_quote(remote_path);
    let remote = format!("cat > {quoted} && chmod +x {quoted}");
    run_with_input(config, &remote, local, timeout, interrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tempdir::TempDir;

    fn config() -> SshConfig {
        SshConfig {
            key: "/cache/id_ed25519".into(),
            port: 40022,
            control_path: "/tmp/x/ssh.ctl".into(),
        }
    }

    fn words(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_has_the_batch_options_and_destination() {
        let args = words(&config().command("uname -a"));
        let joined = args.join(" ");
        for needle in [
            "-i /cache/id_ed25519",
            "-p 40022",
            "-o StrictHostKeyChecking=no",
            "-o UserKnownHostsFile=/dev/null",
            "-o LogLevel=ERROR",
            "-o BatchMode=yes",
            "-o ConnectTimeout=10",
            "-o ControlMaster=no",
            "-o ControlPath=/tmp/x/ssh.ctl",
        ] {
            assert!(joined.contains(needle), "{needle} missing from {joined}");
        }
        assert_eq!(
            &args[args.len() - 3..],
            ["root@127.0.0.1", "--", "uname -a"]
        );
    }

    #[test]
    fn master_runs_in_the_foreground() {
        let args = words(&config().master_command());
        assert_eq!(args[0], "-N");
        assert!(args
            .join(" ")
            .contains("ControlMaster=yes -o ControlPersist=no"));
        assert_eq!(args.last().unwrap(), "root@127.0.0.1");
    }

    #[test]
    fn key_mode_is_checked() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SshConfig::check_key(&key),
            Err(SshError::KeyMode { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        SshConfig::check_key(&key).unwrap();
        assert!(matches!(
            SshConfig::check_key(&dir.path().join("missing")),
            Err(SshError::Key { .. })
        ));
    }
}
