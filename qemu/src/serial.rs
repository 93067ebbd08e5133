//! Watching the guest's serial console (a file QEMU appends to) for the readiness line.
//!
//! The guest init prints [`READY_MARKER`] once its SSH server is up, or [`ERROR_MARKER`] when
//! its setup failed. SSH only starts after the ready line: user-mode networking accepts TCP
//! connections before the guest listens, so a bare SSH retry loop stalls instead of failing.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Printed by the guest on its console once sshd listens.
pub const READY_MARKER: &str = "DOMDMA-GUEST-READY";

/// Printed by the guest on its console (`DOMDMA-GUEST-ERROR: what`) when part of its init
/// failed; the guest keeps running and may still report ready.
pub const ERROR_MARKER: &str = "DOMDMA-GUEST-ERROR";

/// How many lines of the console are kept for error messages.
pub const TAIL_LINES: usize = 40;

/// Longest line kept whole; longer ones are split (a console without newlines must not grow
/// memory without bound).
const MAX_LINE: usize = 4096;

/// Errors of serial watching.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The console file exists but cannot be read.
    #[error("cannot read serial log {}", path.display())]
    Read {
        /// The console file.
        path: PathBuf,
        /// The error from `read`.
        #[source]
        source: io::Error,
    },
}

/// What the console showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialEvent {
    /// The ready line.
    Ready,
    /// The error line, with what followed the marker on it.
    GuestError(String),
}

/// Reads a growing console file incrementally and recognises the markers.
#[derive(Debug)]
pub struct SerialWatcher {
    path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
    tail: VecDeque<String>,
}

impl SerialWatcher {
    /// Watches `path`, which need not exist yet.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            partial: Vec::new(),
            tail: VecDeque::with_capacity(TAIL_LINES),
        }
    }

    /// Reads what was appended since the last call; returns the markers found in it, in order.
    pub fn poll(&mut self) -> Result<Vec<SerialEvent>, SerialError> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(source) => {
                    return Err(SerialError::Read {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(Vec::new());
        };
        let mut chunk = Vec::new();
        file.read_to_end(&mut chunk)
            .map_err(|source| SerialError::Read {
                path: self.path.clone(),
                source,
            })?;
        let mut events = Vec::new();
        for &byte in &chunk {
            if byte == b'\n' || self.partial.len() >= MAX_LINE {
                let line = self.take_line();
                events.extend(classify(&line));
                if byte == b'\n' {
                    continue;
                }
            }
            self.partial.push(byte);
        }
        // The ready marker may arrive before its newline; it is complete as it is. (Callers
        // stop at the first Ready, so seeing it again once the line ends does not matter.)
        if String::from_utf8_lossy(&self.partial).contains(READY_MARKER) {
            events.push(SerialEvent::Ready);
        }
        Ok(events)
    }

    fn take_line(&mut self) -> String {
        let raw = std::mem::take(&mut self.partial);
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches('\r')
            .to_owned();
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.clone());
        line
    }

    /// The last lines seen (and the unfinished one), for error messages.
    pub fn tail(&self) -> String {
        let mut lines: Vec<&str> = self.tail.iter().map(String::as_str).collect();
        let partial = String::from_utf8_lossy(&self.partial);
        if !partial.is_empty() {
            lines.push(&partial);
        }
        lines.join("\n")
    }
}

fn classify(line: &str) -> Option<SerialEvent> {
    if let Some(pos) = line.find(ERROR_MARKER) {
        let rest = line[pos + ERROR_MARKER.len()..]
            .trim_start_matches(':')
            .trim();
        return Some(SerialEvent::GuestError(rest.to_owned()));
    }
    line.contains(READY_MARKER).then_some(SerialEvent::Ready)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;
    use crate::tempdir::TempDir;

    fn append(path: &Path, text: &str) {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn missing_file_is_not_an_error() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let mut watcher = SerialWatcher::new(&dir.path().join("serial.log"));
        assert_eq!(watcher.poll().unwrap(), []);
        assert_eq!(watcher.tail(), "");
    }

    #[test]
    fn ready_line_found_across_partial_writes() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let path = dir.path().join("serial.log");
        let mut watcher = SerialWatcher::new(&path);
        append(
            &path,
            "[    0.000000] Linux version 6.1\r\n[    1.2] random: crng ",
        );
        assert_eq!(watcher.poll().unwrap(), []);
        append(&path, "init done\r\nDOMDMA-GU");
        assert_eq!(watcher.poll().unwrap(), []);
        append(&path, "EST-READY\r\n");
        assert_eq!(watcher.poll().unwrap(), [SerialEvent::Ready]);
        // Nothing new: no event again.
        assert_eq!(watcher.poll().unwrap(), []);
        assert_eq!(
            watcher.tail(),
            "[    0.000000] Linux version 6.1\n[    1.2] random: crng init done\nDOMDMA-GUEST-READY"
        );
    }

    #[test]
    fn ready_without_newline_counts() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let path = dir.path().join("serial.log");
        let mut watcher = SerialWatcher::new(&path);
        append(&path, "boot\nDOMDMA-GUEST-READY");
        assert_eq!(watcher.poll().unwrap(), [SerialEvent::Ready]);
    }

    #[test]
    fn error_line_carries_its_reason() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let path = dir.path().join("serial.log");
        let mut watcher = SerialWatcher::new(&path);
        append(
            &path,
            "modprobe: vfio_pci not found\nDOMDMA-GUEST-ERROR: modprobe vfio_pci failed\n\
             DOMDMA-GUEST-ERROR: mount -t hugetlbfs failed\n\nDOMDMA-GUEST-READY\n",
        );
        // Every marker in one chunk is reported, the ready line after the errors included.
        assert_eq!(
            watcher.poll().unwrap(),
            [
                SerialEvent::GuestError("modprobe vfio_pci failed".into()),
                SerialEvent::GuestError("mount -t hugetlbfs failed".into()),
                SerialEvent::Ready,
            ]
        );
        assert!(watcher.tail().contains("vfio_pci not found"));
    }

    #[test]
    fn tail_is_bounded() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let path = dir.path().join("serial.log");
        let mut watcher = SerialWatcher::new(&path);
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        append(&path, &text);
        watcher.poll().unwrap();
        let tail = watcher.tail();
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.ends_with("line 99"));
        // A console that never prints a newline is split, not accumulated.
        append(&path, &"x".repeat(3 * MAX_LINE));
        watcher.poll().unwrap();
        assert!(watcher.partial.len() <= MAX_LINE);
    }
}
