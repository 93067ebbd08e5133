//! Child processes the runner owns, and the runner's own termination signals.
//!
//! Every child runs in its own process group, so a Ctrl-C in the terminal reaches only the
//! runner, which then tears the children down in order (QEMU before the device server). Each
//! child also gets a parent-death signal, so if the runner itself is killed outright the
//! children follow it instead of being left behind. [`ChildGuard`] stops its child (and the
//! child's whole process group) when dropped, which covers early returns and panics.

use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

/// How often the waiting loops look at their children and at the interrupt flag.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of process handling.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {name} ({program})")]
    Spawn {
        /// What the child is, for messages.
        name: String,
        /// The program that was executed.
        program: String,
        /// The error from `spawn`.
        #[source]
        source: io::Error,
    },
    /// A log file for a child's output could not be created.
    #[error("cannot create log file {}", path.display())]
    LogFile {
        /// The log file.
        path: PathBuf,
        /// The error from `open`.
        #[source]
        source: io::Error,
    },
    /// Waiting for a child failed.
    #[error("cannot wait for {name}")]
    Wait {
        /// What the child is.
        name: String,
        /// The error from `wait`.
        #[source]
        source: io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] io::Error),
}

/// Set when the runner received SIGINT, SIGTERM or SIGHUP; every waiting loop checks it.
///
/// The first signal only sets the flag, so the runner can tear its children down in order. A
/// second one ends the runner at once (exit status 130); the children then die through their
/// parent-death signal.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// A flag that no signal sets (tests).
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag set by SIGINT, SIGTERM and SIGHUP, with "second signal exits".
    pub fn install() -> Result<Self, ProcessError> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // The shutdown action must be registered before the flag setter: it runs first and
            // only exits once the flag is already set, i.e. on the second signal.
            signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&flag))
                .map_err(ProcessError::Signals)?;
            signal_hook::flag::register(signal, Arc::clone(&flag))
                .map_err(ProcessError::Signals)?;
        }
        Ok(Self(flag))
    }

    /// The flag itself, for waits outside this crate (the device server launcher).
    pub fn flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }

    /// Whether a termination signal arrived.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Sets the flag by hand (tests).
    #[cfg(test)]
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Opens (truncating) a log file and returns two handles for a child's stdout and stderr.
pub fn log_file_stdio(path: &Path) -> Result<(Stdio, Stdio), ProcessError> {
    let err = |source| ProcessError::LogFile {
        path: path.to_owned(),
        source,
    };
    let file = File::create(path).map_err(err)?;
    let second = file.try_clone().map_err(err)?;
    Ok((Stdio::from(file), Stdio::from(second)))
}

/// How a child is asked to stop.
#[derive(Debug, Clone, Copy)]
pub struct StopPolicy {
    /// First signal sent to the child's process group.
    pub signal: libc::c_int,
    /// How long to wait after `signal` before SIGKILL.
    pub grace: Duration,
    /// Signal the kernel sends the child when the runner dies.
    pub parent_death_signal: libc::c_int,
}

impl StopPolicy {
    /// Kill at once (QEMU, ssh): SIGKILL, no grace.
    pub const KILL: StopPolicy = StopPolicy {
        signal: libc::SIGKILL,
        grace: Duration::ZERO,
        parent_death_signal: libc::SIGKILL,
    };

    /// Ask politely first (the device server removes its socket on SIGTERM).
    pub const fn terminate(grace: Duration) -> StopPolicy {
        StopPolicy {
            signal: libc::SIGTERM,
            grace,
            parent_death_signal: libc::SIGTERM,
        }
    }
}

/// A running child in its own process group, stopped (group included) when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    policy: StopPolicy,
    status: Option<ExitStatus>,
    group_killed: bool,
}

impl ChildGuard {
    /// Spawns `cmd` as `name` in a new process group with the policy's parent-death signal.
    pub fn spawn(
        name: &str,
        cmd: &mut Command,
        policy: StopPolicy,
    ) -> Result<ChildGuard, ProcessError> {
        let death_signal = policy.parent_death_signal;
        cmd.process_group(0);
        let runner_pid = std::process::id();
        let hook = move || {
            // SAFETY: PR_SET_PDEATHSIG only sets an attribute of the calling process; prctl is
            // async-signal-safe and touches no memory of ours.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // The runner may have died between fork and prctl: then nobody will ever send the
            // death signal, so do not start at all.
            // SAFETY: getppid has no preconditions and is async-signal-safe.
            let parent = unsafe { libc::getppid() };
            if u32::try_from(parent).ok() != Some(runner_pid) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and only makes the two
        // async-signal-safe calls above; it allocates nothing and takes no locks.
        unsafe {
            cmd.pre_exec(hook);
        }
        let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            name: name.to_owned(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        debug!(name, pid = child.id(), "started");
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            policy,
            status: None,
            group_killed: false,
        })
    }

    /// The child's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdout pipe, if it was spawned with one.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's stderr pipe, if it was spawned with one.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The exit status if the child has ended (reaps it), `None` while it runs.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| ProcessError::Wait {
                name: self.name.clone(),
                source,
            })?;
            if let Some(status) = self.status {
                debug!(name = %self.name, status = %describe_status(status), "ended");
            }
        }
        Ok(self.status)
    }

    /// Whether the child still runs. A failing `wait` counts as "not running".
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Waits up to `timeout` for the child to end.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL_INTERVAL.min(Duration::from_millis(10)));
        }
    }

    /// Sends `signal` to the child's whole process group.
    pub fn signal_group(&mut self, signal: libc::c_int) {
        if self.group_killed {
            return;
        }
        let Ok(pgid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: killpg only sends a signal. The group id is our child's pid; the kernel keeps
        // that number allocated while the child is unreaped or any member of its group lives,
        // so it cannot name somebody else's group while there is anything of ours to signal.
        let rc = unsafe { libc::killpg(pgid, signal) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                // Nobody left in the group.
                self.group_killed = true;
            } else {
                warn!(name = %self.name, %err, "killpg failed");
            }
        }
        if signal == libc::SIGKILL {
            self.group_killed = true;
        }
    }

    /// SIGKILLs the child's process group at once and reaps the child.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            // The child still exists (maybe as a zombie), so its pid still names the group.
            self.signal_group(libc::SIGKILL);
        }
        match self.wait_timeout(Duration::from_secs(5)) {
            Ok(status) => status,
            Err(err) => {
                warn!(name = %self.name, %err, "cannot reap");
                None
            }
        }
    }

    /// Stops the child by its policy (signal, grace period, then SIGKILL) and returns how it
    /// ended, plus whether it needed SIGKILL.
    pub fn stop(&mut self) -> (Option<ExitStatus>, bool) {
        if let Ok(Some(status)) = self.try_status() {
            // Leftover members of its group (a wrapper's children) go too.
            self.signal_group(libc::SIGKILL);
            return (Some(status), false);
        }
        self.signal_group(self.policy.signal);
        if self.policy.signal != libc::SIGKILL {
            if let Ok(Some(status)) = self.wait_timeout(self.policy.grace) {
                self.signal_group(libc::SIGKILL);
                return (Some(status), false);
            }
            warn!(
                name = %self.name,
                grace_ms = self.policy.grace.as_millis() as u64,
                "did not stop in time; killing"
            );
            return (self.kill(), true);
        }
        (self.kill(), false)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !matches!(self.try_status(), Ok(Some(_))) {
            debug!(name = %self.name, "stopping on drop");
        }
        let _ = self.stop();
    }
}

/// Describes an exit status for humans: "exit status 3" or "killed by signal 9".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".to_owned(),
    }
}

/// Sleeps for up to `duration` in small steps, returning early (false) on interrupt.
pub fn sleep_unless_interrupted(interrupt: &Interrupt, duration: Duration) -> bool {
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        if interrupt.is_set() {
            return false;
        }
        thread::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())));
    }
    !interrupt.is_set()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_terminates_the_whole_group() {
        // A shell whose own child ignores nothing: both must be gone after stop().
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & echo $! ; wait"])
            .stdout(Stdio::piped());
        let mut guard = ChildGuard::spawn(
            "sh",
            &mut cmd,
            StopPolicy::terminate(Duration::from_secs(2)),
        )
        .unwrap();
        let mut out = guard.take_stdout().unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        io::BufReader::new(&mut out).read_line(&mut line).unwrap();
        let grandchild: libc::pid_t = line.trim().parse().unwrap();
        let (status, killed) = guard.stop();
        assert!(status.is_some());
        assert!(!killed);
        // The grandchild got SIGTERM through the group; give the kernel a moment to reap it.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            // SAFETY: signal 0 only checks for existence; no signal is delivered.
            let alive = unsafe { libc::kill(grandchild, 0) } == 0;
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "grandchild survived");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn stop_escalates_to_sigkill() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; while :; do sleep 0.05; done"]);
        let mut guard = ChildGuard::spawn(
            "stubborn",
            &mut cmd,
            StopPolicy::terminate(Duration::from_millis(300)),
        )
        .unwrap();
        thread::sleep(Duration::from_millis(100));
        let (status, killed) = guard.stop();
        assert!(killed);
        assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
    }

    #[test]
    fn describe_status_names_signals() {
        let mut guard =
            ChildGuard::spawn("true", &mut Command::new("true"), StopPolicy::KILL).unwrap();
        let status = guard.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(describe_status(status), "exit status 0");
        assert_eq!(
            describe_status(ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9"
        );
    }

    #[test]
    fn sleep_returns_early_on_interrupt() {
        let interrupt = Interrupt::new();
        interrupt.set();
        let start = Instant::now();
        assert!(!sleep_unless_interrupted(
            &interrupt,
            Duration::from_secs(5)
        ));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
