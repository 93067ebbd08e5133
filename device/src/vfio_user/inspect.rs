//! The inspector: a UNIX socket that serves the device's counters as JSON (`--inspect PATH`).
//!
//! Each connection gets one JSON document and is closed; nothing is read from the client.
//! Try it with `socat - UNIX-CONNECT:PATH` or `nc -U PATH`. The document is a
//! [`Report`]: the server's configuration and every counter of
//! [`Device::stats`](crate::core::Device::stats) (per queue, per domain, fault log totals):
//!
//! ```json
//! {
//!   "device": "domdma",
//!   "interface_version": "0.2",
//!   "config": { "queues": 4, "domains": 16, "iova_width": 48, "iotlb_entries": 1024,
//!               "max_transfer": 67108864, "strict_iotlb": false, "msix_vectors": 5 },
//!   "queues": [ { "descriptors": 0, "bytes": 0, "errors": 0, "faults": 0, "interrupts": 0 }, ... ],
//!   "domains": [ { "translations": 0, "iotlb_hits": 0, "iotlb_misses": 0, "page_walks": 0,
//!                  "faults": 0, "stale_uses": 0 }, ... ],
//!   "faults": { "count": 0, "dropped": 0 },
//!   "iotlb_entries": 0
//! }
//! ```
//!
//! `config.iotlb_entries` is the IOTLB's size; the top-level `iotlb_entries` is how many
//! entries are in use. The counters are those of the `REG_STAT_*` window (SPEC.md,
//! "Statistics window") and are cleared by a device reset, which the server also does when
//! a client disconnects.
//!
//! Threading: the inspector runs on its own thread. It locks the device mutex only to take
//! the snapshot (the counters are atomics inside the device, so that is quick), then
//! serialises and writes with the lock released; a client that does not read cannot hold up
//! the device, and a write that does not finish within [`WRITE_TIMEOUT`] is abandoned.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use super::server::{accept_should_retry, lock, prepare_socket_path, wait, ServerError, Wait};
use crate::core::{Device, DeviceConfig, DeviceStats};
use crate::spec::DEVICE_VERSION;

/// How long writing one report may take before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The configuration part of a [`Report`]: the server options the device runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigReport {
    /// Descriptor queues (`--queues`).
    pub queues: u32,
    /// DMA domains (`--domains`).
    pub domains: u32,
    /// IOVA width in bits (`--iova-width`).
    pub iova_width: u32,
    /// IOTLB entries (`--iotlb-entries`).
    pub iotlb_entries: u32,
    /// Maximum transfer of one descriptor in bytes (`--max-transfer`).
    pub max_transfer: u32,
    /// Strict IOTLB mode (`--strict-iotlb`).
    pub strict_iotlb: bool,
    /// MSI-X vectors: one per queue and one for the fault log.
    pub msix_vectors: u16,
}

impl From<&DeviceConfig> for ConfigReport {
    fn from(c: &DeviceConfig) -> Self {
        Self {
            queues: c.queues,
            domains: c.domains,
            iova_width: c.iova_width,
            iotlb_entries: c.iotlb_entries,
            max_transfer: c.max_transfer,
            strict_iotlb: c.strict_iotlb,
            msix_vectors: c.msix_vectors(),
        }
    }
}

/// The document the inspector serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Always "domdma".
    pub device: &'static str,
    /// The register interface version, "major.minor".
    pub interface_version: String,
    /// The configuration.
    pub config: ConfigReport,
    /// Every counter; its fields (`queues`, `domains`, `faults`, `iotlb_entries`) appear at
    /// the top level of the document.
    #[serde(flatten)]
    pub stats: DeviceStats,
}

impl Report {
    /// Take a snapshot of `device`, holding its lock only for [`Device::stats`].
    pub fn snapshot(device: &Mutex<Device>, config: &DeviceConfig) -> Self {
        let stats = lock(device).stats();
        Self {
            device: "domdma",
            interface_version: format!("{}.{}", DEVICE_VERSION >> 16, DEVICE_VERSION & 0xffff),
            config: config.into(),
            stats,
        }
    }

    /// The JSON text served, ending in a newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            // Serialising plain structs of numbers cannot fail; say so if it ever does.
            format!("{{\"error\": \"cannot serialise the report: {e}\"}}")
        });
        s.push('\n');
        s
    }
}

/// A running inspector. Dropping it stops its thread and removes its socket (if the socket
/// is still the one it created).
#[derive(Debug)]
pub struct Inspector {
    path: PathBuf,
    inode: (u64, u64),
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Inspector {
    /// Listen on `path` and serve reports about `device` on a new thread.
    ///
    /// The path is checked like the server's socket path: a stale socket is replaced, a
    /// live one or anything that is not a socket is an error that says how to fix it.
    pub fn start(
        path: impl AsRef<Path>,
        device: Arc<Mutex<Device>>,
        config: DeviceConfig,
    ) -> Result<Self, ServerError> {
        let path = path.as_ref().to_path_buf();
        prepare_socket_path(&path)?;
        let bind_err = |source| ServerError::Bind {
            path: path.clone(),
            source,
        };
        let listener = UnixListener::bind(&path).map_err(bind_err)?;
        let meta = fs::symlink_metadata(&path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ServerError::StopFd)?,
        );
        let thread_stop = Arc::clone(&stop);
        let mut this = Self {
            path: path.clone(),
            inode: (meta.dev(), meta.ino()),
            stop,
            thread: None,
        };
        // On failure `this` is dropped, which removes the socket.
        let thread = std::thread::Builder::new()
            .name("inspector".into())
            .spawn(move || serve(&listener, &device, &config, &thread_stop))
            .map_err(ServerError::Thread)?;
        this.thread = Some(thread);
        info!(path = %path.display(), "inspector listening");
        Ok(this)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Inspector {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            warn!(error = %e, "cannot signal the inspector to stop");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the inspector thread panicked");
            }
        }
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                match fs::remove_file(&self.path) {
                    Ok(()) => debug!(path = %self.path.display(), "inspector socket removed"),
                    Err(e) => warn!(
                        path = %self.path.display(),
                        error = %e,
                        "cannot remove the inspector socket"
                    ),
                }
            }
        }
    }
}

/// Accept connections until stopped; each gets one report.
fn serve(listener: &UnixListener, device: &Mutex<Device>, config: &DeviceConfig, stop: &EventFd) {
    loop {
        match wait(listener.as_raw_fd(), libc::POLLIN, stop) {
            Ok(Wait::Ready) => {}
            Ok(Wait::Stopped) => return,
            Err(e) => {
                warn!(error = %e, "inspector: cannot wait for connections; inspector stopped");
                return;
            }
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, device, config) {
                    debug!(error = %e, "inspector: report not delivered");
                }
            }
            Err(e) if accept_should_retry(&e) => {}
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(error = %e, "inspector: cannot accept a connection");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn answer(mut stream: UnixStream, device: &Mutex<Device>, config: &DeviceConfig) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let json = Report::snapshot(device, config).to_json();
    stream.write_all(json.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Both)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::irq::RecordingInterrupts;

    fn device(config: &DeviceConfig) -> Arc<Mutex<Device>> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        Arc::new(Mutex::new(Device::new(
            config.clone(),
            mem,
            Arc::new(RecordingInterrupts::new()),
        )))
    }

    fn fetch(path: &Path) -> serde_json::Value {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn serves_one_document_per_connection_and_cleans_up() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-insp-").unwrap();
        let path = dir.as_path().join("inspect.sock");
        let config = DeviceConfig {
            queues: 3,
            domains: 5,
            strict_iotlb: true,
            ..DeviceConfig::default()
        };
        let insp = Inspector::start(&path, device(&config), config.clone()).unwrap();
        for _ in 0..2 {
            let v = fetch(&path);
            assert_eq!(v["device"], "domdma");
            assert_eq!(v["config"]["queues"], 3);
            assert_eq!(v["config"]["domains"], 5);
            assert_eq!(v["config"]["msix_vectors"], 4);
            assert_eq!(v["config"]["strict_iotlb"], true);
            assert!(v["queues"].is_array(), "{v}");
            assert!(v["domains"].is_array(), "{v}");
            assert!(v["faults"]["count"].is_u64(), "{v}");
        }
        drop(insp);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn refuses_a_path_in_use() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-insp-").unwrap();
        let path = dir.as_path().join("inspect.sock");
        let config = DeviceConfig::default();
        let dev = device(&config);
        let a = Inspector::start(&path, Arc::clone(&dev), config.clone()).unwrap();
        let e = Inspector::start(&path, dev, config).unwrap_err();
        assert!(matches!(e, ServerError::InUse { .. }), "{e}");
        drop(a);
    }
}
