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
//!   "dma_rw": { "read_bytes": 0, "written_bytes": 0, "requests": 0, "errors": 0 },
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
//! Threading: the inspector is served by the server's event loop (see
//! [`super::server`]). It reads the counters through an [`Observer`], without the
//! transport's lock on the device (the counters are atomics the workers share), then
//! serialises and sends the document
//! with one non-blocking write: a client that does not read can hold up neither the device
//! nor the event loop (the document is far smaller than a socket buffer; a write that does
//! not complete at once is abandoned).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tracing::{debug, warn};

use super::channel::{DmaRwReport, DmaRwStats};
use super::server::{accept_should_retry, ServerError};
use super::socket::{BoundSocket, SocketAccess};
use crate::core::{DeviceConfig, DeviceStats, Observer};
use crate::spec::DEVICE_VERSION;

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
    /// Bytes the device moved through the client (DMA_READ / DMA_WRITE, for memory the
    /// client mapped without a file descriptor).
    pub dma_rw: DmaRwReport,
    /// Every counter; its fields (`queues`, `domains`, `faults`, `iotlb_entries`) appear at
    /// the top level of the document.
    #[serde(flatten)]
    pub stats: DeviceStats,
}

impl Report {
    /// Take a snapshot of the device `observer` watches ([`Observer::stats`]).
    pub fn snapshot(observer: &Observer, config: &DeviceConfig) -> Self {
        let stats = observer.stats();
        Self {
            device: "domdma",
            interface_version: format!("{}.{}", DEVICE_VERSION >> 16, DEVICE_VERSION & 0xffff),
            config: config.into(),
            dma_rw: DmaRwReport::default(),
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

/// The inspector's socket, served by the server's event loop
/// ([`super::Server::add_inspector`]). Dropping it removes its socket (if the socket is still
/// the one it created).
#[derive(Debug)]
pub struct Inspector {
    socket: BoundSocket,
    device: Observer,
    config: DeviceConfig,
    dma_rw: Arc<DmaRwStats>,
}

impl Inspector {
    /// Listen on `path` for reports about `device`.
    ///
    /// The path is checked like the server's socket path: a stale socket is replaced, a
    /// live one or anything that is not a socket is an error that says how to fix it.
    pub fn bind(
        path: &Path,
        access: SocketAccess,
        device: Observer,
        config: DeviceConfig,
        dma_rw: Arc<DmaRwStats>,
    ) -> Result<Self, ServerError> {
        Ok(Self {
            socket: BoundSocket::bind(path, access)?,
            device,
            config,
            dma_rw,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// The listener (non-blocking).
    pub(crate) fn listener(&self) -> &UnixListener {
        self.socket.listener()
    }

    /// Answer every pending connection with one report each; never blocks.
    pub(crate) fn serve_pending(&self) {
        loop {
            match self.listener().accept() {
                Ok((stream, _)) => {
                    if let Err(e) = self.answer(&stream) {
                        debug!(error = %e, "inspector: report not delivered");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if accept_should_retry(&e) => {}
                Err(e) => {
                    // Out of descriptors and the like: the event loop calls again.
                    warn!(error = %e, "inspector: cannot accept a connection");
                    return;
                }
            }
        }
    }

    fn answer(&self, stream: &UnixStream) -> io::Result<()> {
        let mut report = Report::snapshot(&self.device, &self.config);
        report.dma_rw = self.dma_rw.report();
        let json = report.to_json();
        // SAFETY: `json` is a valid buffer of its length for the whole call.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                json.as_ptr().cast(),
                json.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != json.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("only {n} of {} bytes fitted the socket buffer", json.len()),
            ));
        }
        stream.shutdown(std::net::Shutdown::Both)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::vfio_user::Server;

    fn fetch(path: &Path) -> serde_json::Value {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn paths(dir: &vmm_sys_util::tempdir::TempDir) -> (PathBuf, PathBuf) {
        (
            dir.as_path().join("dev.sock"),
            dir.as_path().join("inspect.sock"),
        )
    }

    #[test]
    fn serves_one_document_per_connection_and_cleans_up() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-insp-").unwrap();
        let (sock, path) = paths(&dir);
        let config = DeviceConfig {
            queues: 3,
            domains: 5,
            strict_iotlb: true,
            ..DeviceConfig::default()
        };
        let mut server = Server::bind(&sock, config).unwrap();
        server.add_inspector(&path).unwrap();
        let stop = server.stop_handle();
        let t = std::thread::spawn(move || server.run());
        // A connection that never reads does not hold the inspector up.
        let _silent = UnixStream::connect(&path).unwrap();
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
        stop.stop();
        t.join().unwrap().unwrap();
        assert!(!path.exists(), "socket removed with the server");
    }

    #[test]
    fn refuses_a_path_in_use() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-insp-").unwrap();
        let (sock, path) = paths(&dir);
        let mut a = Server::bind(&sock, DeviceConfig::default()).unwrap();
        a.add_inspector(&path).unwrap();
        let mut b = Server::bind(dir.as_path().join("b.sock"), DeviceConfig::default()).unwrap();
        let e = b.add_inspector(&path).unwrap_err();
        assert!(matches!(e, ServerError::InUse { .. }), "{e}");
    }
}
