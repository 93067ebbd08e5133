//! The vfio-user client back end: this process is the VMM. It owns guest RAM in memfds and
//! talks to the real device server (`domdma-device`) over its UNIX socket, host-side end to
//! end without QEMU.
//!
//! Connecting ([`VfioUserBackend::connect`]), in the order QEMU's `vfio-user-pci` does it:
//!
//! 1. guest RAM: one memfd per NUMA node (`memfd_create`, `ftruncate`, mapped `MAP_SHARED`
//!    through `vm-memory`), laid out and allocated by [`PhysMemory`];
//! 2. `VERSION` with our capabilities JSON; the reply's version must not exceed ours, and
//!    its capabilities bound what we send (descriptors per message, transfer size);
//! 3. `DMA_MAP` of each node at its bus address, read and write, the memfd passed with
//!    `SCM_RIGHTS` (all of guest RAM is mapped for the device, as QEMU maps it);
//! 4. `DEVICE_GET_INFO`, `DEVICE_GET_REGION_INFO` for BAR0 and configuration space,
//!    `DEVICE_GET_IRQ_INFO` for MSI-X;
//! 5. `DEVICE_SET_IRQS`: one eventfd per MSI-X vector (action trigger, data eventfd), in
//!    messages of at most the server's `max_msg_fds` descriptors;
//! 6. Bus Master Enable through configuration space.
//!
//! Register and configuration accesses are `REGION_READ` / `REGION_WRITE` messages, one in
//! flight at a time behind a mutex, each answered (no posted writes, so every error is
//! seen). The server's bytes are untrusted: every reply header is checked (type, id,
//! command, size bounded by what the request can produce, error flag and errno) before its
//! payload is read, and every payload is parsed with length checks. A reply that breaks the
//! stream (not a reply, wrong id or command, oversized, truncated, a timeout) leaves the
//! connection unusable and every later call fails at once with the reason. An error reply
//! ([`VfioUserError::Server`]) or a well-framed reply whose payload is wrong fails that call
//! only: the stream is still in step. Interrupts are waited for by polling the vector's
//! eventfd.
//!
//! Dropping the back end quiesces the device (Bus Master Enable off, MSI-X off), sends
//! `DMA_UNMAP` for each node and closes the socket. Buffers still alive keep their memory
//! (the mappings are this process's own), but the device no longer reaches it.
//!
//! Tests start the real server with the test kit's launcher (`domdma_testkit::launcher`).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use domdma_device::spec;
use domdma_device::vfio_user::proto::{
    self, Capabilities, Command as Cmd, DeviceInfo, DmaMap, DmaUnmap, Header, IrqInfo, IrqSet,
    RegionAccess, RegionInfo, Version, HEADER_SIZE,
};
use tracing::{debug, info, trace, warn};
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::phys::{PhysConfig, PhysError, PhysMemory};
use super::{BackendError, BackendInfo, DmaBackend, RegisterAccess, Result};

/// How long a reply may take by default (one socket read or write).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`VfioUserBackend::connect`] retries a socket that is not (yet) accepting.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest version reply accepted: the version and a capabilities JSON.
const MAX_VERSION_REPLY: usize = Version::SIZE + 4096;
/// Most MSI-X vectors a PCI function can have.
const MAX_MSIX_VECTORS: u32 = 2048;
/// Largest configuration space (PCI Express).
const MAX_CONFIG_SIZE: u64 = 4096;
/// Largest register BAR accepted.
const MAX_BAR0_SIZE: u64 = 1 << 32;
/// Most descriptors sent in one message, whatever the server allows.
const MAX_FDS_PER_MESSAGE: u32 = 16;
/// Polling interval of the waits for a socket or a process (not a wait for an event).
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Errors of the vfio-user back end.
#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    /// The socket could not be connected.
    #[error("cannot connect to the device server at {}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("{what} ({command})")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The command it was for.
        command: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time.
    #[error("no reply to {command} within {timeout:?}")]
    Timeout {
        /// The command.
        command: &'static str,
        /// The reply timeout.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("the server closed the connection (while waiting for the reply to {command})")]
    Closed {
        /// The command.
        command: &'static str,
    },
    /// The server answered with an error reply.
    #[error("the server refused {command}: errno {errno} ({})", errno_text(*errno))]
    Server {
        /// The command.
        command: &'static str,
        /// The errno of the reply.
        errno: u32,
    },
    /// A reply that breaks the protocol.
    #[error("bad reply to {command}: {problem}")]
    Protocol {
        /// The command.
        command: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// The connection failed earlier and cannot be used.
    #[error("the connection to the device server is unusable after an earlier failure: {reason}")]
    Broken {
        /// The earlier failure.
        reason: String,
    },
    /// The server or device lacks something this back end needs.
    #[error("unsuitable device server: {0}")]
    Unsuitable(String),
    /// Creating a node's memfd failed.
    #[error("cannot create guest RAM (memfd) for node {node}")]
    Memfd {
        /// The node.
        node: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Mapping a node's memfd failed.
    #[error("cannot map guest RAM of node {node}")]
    MapRam {
        /// The node.
        node: u32,
        /// The cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Guest RAM layout or allocation.
    #[error("guest RAM")]
    Phys(#[source] PhysError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// Waiting for an interrupt failed.
    #[error("{what} (MSI-X vector {vector})")]
    Interrupt {
        /// What was being done.
        what: &'static str,
        /// The vector.
        vector: u16,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<VfioUserError> for BackendError {
    fn from(e: VfioUserError) -> Self {
        BackendError::Backend(Box::new(e))
    }
}

impl VfioUserError {
    /// Whether the stream can no longer be trusted after this error.
    fn breaks_link(&self) -> bool {
        matches!(
            self,
            VfioUserError::Socket { .. }
                | VfioUserError::Timeout { .. }
                | VfioUserError::Closed { .. }
                | VfioUserError::Protocol { .. }
        )
    }
}

fn errno_text(errno: u32) -> String {
    match i32::try_from(errno) {
        Ok(0) => "no errno given".into(),
        Ok(e) => io::Error::from_raw_os_error(e).to_string(),
        Err(_) => "not an errno".into(),
    }
}

fn command_name(c: Cmd) -> &'static str {
    match c {
        Cmd::Version => "VERSION",
        Cmd::DmaMap => "DMA_MAP",
        Cmd::DmaUnmap => "DMA_UNMAP",
        Cmd::DeviceGetInfo => "DEVICE_GET_INFO",
        Cmd::DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
        Cmd::DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
        Cmd::DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
        Cmd::DeviceSetIrqs => "DEVICE_SET_IRQS",
        Cmd::RegionRead => "REGION_READ",
        Cmd::RegionWrite => "REGION_WRITE",
        Cmd::DmaRead => "DMA_READ",
        Cmd::DmaWrite => "DMA_WRITE",
        Cmd::DeviceReset => "DEVICE_RESET",
        Cmd::DirtyPages => "DIRTY_PAGES",
        Cmd::RegionWriteMulti => "REGION_WRITE_MULTI",
        Cmd::DeviceFeature => "DEVICE_FEATURE",
        Cmd::MigDataRead => "MIG_DATA_READ",
        Cmd::MigDataWrite => "MIG_DATA_WRITE",
    }
}

/// How to connect a [`VfioUserBackend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioUserConfig {
    /// The server's socket.
    pub socket: PathBuf,
    /// Guest RAM: nodes, node size, huge pages per node, base address.
    pub phys: PhysConfig,
    /// How long one socket read or write of a message may block.
    pub reply_timeout: Duration,
    /// How long to retry a socket that does not exist yet or refuses connections.
    pub connect_timeout: Duration,
    /// BAR writes go without waiting for a reply (`VFIO_USER_NO_REPLY`), as QEMU's client
    /// sends them unless told `x-no-posted-writes=on`; configuration-space writes always
    /// wait. The server handles messages in order, so a later read sees every posted
    /// write; a posted write the server refuses goes unnoticed (as on a PCI bus).
    pub posted_writes: bool,
}

impl VfioUserConfig {
    /// The defaults for the server at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VfioUserConfig {
            socket: socket.into(),
            phys: PhysConfig::default(),
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            posted_writes: true,
        }
    }

    /// The same, with BAR writes posted or not (see [`VfioUserConfig::posted_writes`]).
    pub fn with_posted_writes(mut self, posted: bool) -> Self {
        self.posted_writes = posted;
        self
    }

    /// The same, with guest RAM laid out as `phys`.
    pub fn with_phys(mut self, phys: PhysConfig) -> Self {
        self.phys = phys;
        self
    }
}

/// The socket, or why it can no longer be used.
enum Link {
    Open(UnixStream),
    Broken(String),
}

/// The connection: one request in flight at a time.
struct Conn {
    link: Link,
    next_id: u16,
    timeout: Duration,
}

impl Conn {
    /// Sends command `cmd` with `payload` (and `fds` as SCM_RIGHTS) and returns the reply
    /// payload, which must be at most `max_reply` bytes.
    fn call(
        &mut self,
        cmd: Cmd,
        payload: &[u8],
        fds: &[RawFd],
        max_reply: usize,
    ) -> std::result::Result<Vec<u8>, VfioUserError> {
        self.on_link(cmd, |stream, id, timeout| {
            exchange(stream, id, cmd, payload, fds, max_reply, timeout)
        })
    }

    /// Sends command `cmd` with `payload` asking for no reply.
    fn post(&mut self, cmd: Cmd, payload: &[u8]) -> std::result::Result<(), VfioUserError> {
        self.on_link(cmd, |stream, id, timeout| {
            let msg = proto::encode_command(id, cmd as u16, proto::FLAGS_NO_REPLY, payload);
            send_all(stream, &msg, &[]).map_err(socket_error(
                command_name(cmd),
                "sending a request",
                timeout,
            ))
        })
    }

    /// Runs `f` on the open socket with the next message id; an error that breaks the
    /// stream marks the link broken (every later call fails with it).
    fn on_link<T>(
        &mut self,
        cmd: Cmd,
        f: impl FnOnce(&mut UnixStream, u16, Duration) -> std::result::Result<T, VfioUserError>,
    ) -> std::result::Result<T, VfioUserError> {
        let stream = match &mut self.link {
            Link::Open(s) => s,
            Link::Broken(reason) => {
                return Err(VfioUserError::Broken {
                    reason: reason.clone(),
                })
            }
        };
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let result = f(stream, id, self.timeout);
        if let Err(e) = &result {
            if e.breaks_link() {
                warn!(
                    command = command_name(cmd),
                    "vfio-user connection broken: {e}"
                );
                let _ = stream.shutdown(std::net::Shutdown::Both);
                self.link = Link::Broken(e.to_string());
            }
        }
        result
    }
}

fn socket_error(
    command: &'static str,
    what: &'static str,
    timeout: Duration,
) -> impl Fn(io::Error) -> VfioUserError {
    move |source| match source.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            VfioUserError::Timeout { command, timeout }
        }
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset => VfioUserError::Closed { command },
        _ => VfioUserError::Socket {
            what,
            command,
            source,
        },
    }
}

/// One request and its reply.
fn exchange(
    stream: &mut UnixStream,
    id: u16,
    cmd: Cmd,
    payload: &[u8],
    fds: &[RawFd],
    max_reply: usize,
    timeout: Duration,
) -> std::result::Result<Vec<u8>, VfioUserError> {
    let name = command_name(cmd);
    let msg = proto::encode_command(id, cmd as u16, 0, payload);
    send_all(stream, &msg, fds).map_err(socket_error(name, "sending a request", timeout))?;
    let mut hb = [0u8; HEADER_SIZE];
    stream
        .read_exact(&mut hb)
        .map_err(socket_error(name, "reading a reply header", timeout))?;
    let h = Header::parse(&hb);
    let bad = |problem: String| VfioUserError::Protocol {
        command: name,
        problem,
    };
    if h.msg_type() != proto::FLAGS_TYPE_REPLY {
        return Err(bad(format!(
            "message type {} (flags {:#x}) is not a reply",
            h.msg_type(),
            h.flags
        )));
    }
    let Some(len) = h.payload_len() else {
        return Err(bad(format!("size {} is smaller than the header", h.size)));
    };
    if len > max_reply {
        return Err(bad(format!(
            "a reply of {len} payload bytes; at most {max_reply} expected"
        )));
    }
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .map_err(socket_error(name, "reading a reply payload", timeout))?;
    if h.id != id || h.command != cmd as u16 {
        return Err(bad(format!(
            "reply id {} command {} to request id {id} command {}",
            h.id, h.command, cmd as u16
        )));
    }
    if h.flags & proto::FLAGS_ERROR != 0 {
        debug!(command = name, errno = h.error, "error reply");
        return Err(VfioUserError::Server {
            command: name,
            errno: h.error,
        });
    }
    trace!(command = name, id, len, "reply");
    Ok(body)
}

/// Writes all of `msg`; `fds` go with the first byte.
fn send_all(stream: &UnixStream, msg: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut off = 0;
    let mut fds = fds;
    while off < msg.len() {
        match stream.send_with_fds(&[&msg[off..]], fds) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                off += n;
                fds = &[];
            }
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
    Ok(())
}

/// Connects, retrying while the socket is missing or refuses, until `timeout`.
fn connect_socket(
    path: &Path,
    timeout: Duration,
) -> std::result::Result<UnixStream, VfioUserError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && start.elapsed() < timeout =>
            {
                std::thread::sleep(POLL_INTERVAL);
            }
            Err(source) => {
                return Err(VfioUserError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// One memfd-backed, shared mapping per node.
fn memfd_ram(config: &PhysConfig) -> std::result::Result<Vec<Arc<MmapRegion>>, VfioUserError> {
    config.validate().map_err(VfioUserError::Phys)?;
    (0..config.nodes)
        .map(|node| {
            let name = CString::new(format!("domdma-guest-ram-node{node}")).map_err(|e| {
                VfioUserError::Memfd {
                    node,
                    source: io::Error::other(e),
                }
            })?;
            // SAFETY: a valid NUL-terminated name; the result is checked below.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(VfioUserError::Memfd {
                    node,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(config.node_size)
                .map_err(|source| VfioUserError::Memfd { node, source })?;
            // validate() checked that the node size fits usize.
            MmapRegion::from_file(FileOffset::new(file, 0), config.node_size as usize)
                .map(Arc::new)
                .map_err(|source| VfioUserError::MapRam { node, source })
        })
        .collect()
}

/// The domdma device served by a vfio-user server, reached over its socket.
pub struct VfioUserBackend {
    conn: Mutex<Conn>,
    msix: Vec<EventFd>,
    phys: PhysMemory,
    /// Bus ranges mapped with DMA_MAP (unmapped on drop).
    mapped: Vec<(u64, u64)>,
    socket: PathBuf,
    bar0_size: u64,
    config_size: u64,
    /// Largest region access in one message.
    max_xfer: usize,
    /// Most descriptors in one message.
    max_fds: usize,
    /// BAR writes are posted ([`VfioUserConfig::posted_writes`]).
    posted_writes: bool,
    server_caps: Capabilities,
    version: (u16, u16),
}

impl std::fmt::Debug for VfioUserBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserBackend")
            .field("socket", &self.socket)
            .field("version", &self.version)
            .field("server_caps", &self.server_caps)
            .field("msix_vectors", &self.msix.len())
            .field("bar0_size", &self.bar0_size)
            .field("config_size", &self.config_size)
            .finish_non_exhaustive()
    }
}

impl VfioUserBackend {
    /// Creates guest RAM, connects to the server and sets the device up (see the module
    /// documentation). On failure the connection is closed; the server drops whatever was
    /// mapped when a client goes away.
    pub fn connect(config: &VfioUserConfig) -> std::result::Result<Self, VfioUserError> {
        let phys = PhysMemory::new(config.phys.clone(), memfd_ram(&config.phys)?)
            .map_err(VfioUserError::Phys)?;
        let stream = connect_socket(&config.socket, config.connect_timeout)?;
        let timeout = config.reply_timeout;
        for r in [
            stream.set_read_timeout(Some(timeout)),
            stream.set_write_timeout(Some(timeout)),
        ] {
            r.map_err(|source| VfioUserError::Connect {
                path: config.socket.clone(),
                source,
            })?;
        }
        let mut conn = Conn {
            link: Link::Open(stream),
            next_id: 1,
            timeout,
        };
        let (version, server_caps) = negotiate(&mut conn)?;
        let max_fds = server_caps.max_msg_fds.min(MAX_FDS_PER_MESSAGE) as usize;
        let max_xfer = server_caps
            .max_data_xfer_size
            .min(proto::MAX_DATA_XFER_SIZE) as usize;
        if max_fds == 0 || max_xfer < 4 || server_caps.pgsizes & 4096 == 0 {
            return Err(VfioUserError::Unsuitable(format!(
                "capabilities {server_caps:?}: need max_msg_fds >= 1, max_data_xfer_size >= \
                 4 and 4 KiB DMA pages"
            )));
        }
        if server_caps.max_dma_maps < phys.nodes() {
            return Err(VfioUserError::Unsuitable(format!(
                "max_dma_maps {} is below the {} nodes of guest RAM",
                server_caps.max_dma_maps,
                phys.nodes()
            )));
        }
        // From here on, Drop undoes what was done.
        let mut this = VfioUserBackend {
            conn: Mutex::new(conn),
            msix: Vec::new(),
            phys,
            mapped: Vec::new(),
            socket: config.socket.clone(),
            bar0_size: 0,
            config_size: 0,
            max_xfer,
            max_fds,
            posted_writes: config.posted_writes,
            server_caps,
            version,
        };
        this.map_ram()?;
        this.read_device_info()?;
        let vectors = this.msix_info()?;
        this.msix = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(VfioUserError::EventFd))
            .collect::<std::result::Result<_, _>>()?;
        this.set_irqs()?;
        this.enable_bus_master()?;
        info!(
            socket = %this.socket.display(),
            version = format_args!("{}.{}", version.0, version.1),
            vectors,
            nodes = this.phys.nodes(),
            "vfio-user device ready"
        );
        Ok(this)
    }

    fn conn(&self) -> MutexGuard<'_, Conn> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn call(
        &self,
        cmd: Cmd,
        payload: &[u8],
        fds: &[RawFd],
        max_reply: usize,
    ) -> std::result::Result<Vec<u8>, VfioUserError> {
        self.conn().call(cmd, payload, fds, max_reply)
    }

    /// Sets Memory Space and Bus Master Enable in the PCI command register.
    fn enable_bus_master(&self) -> std::result::Result<(), VfioUserError> {
        let mut b = [0u8; 2];
        self.region_read(proto::PCI_CONFIG_REGION_INDEX, super::PCI_COMMAND, &mut b)?;
        let cmd = u16::from_le_bytes(b) | super::PCI_COMMAND_MEMORY | super::PCI_COMMAND_BUS_MASTER;
        self.region_write(
            proto::PCI_CONFIG_REGION_INDEX,
            super::PCI_COMMAND,
            &cmd.to_le_bytes(),
        )
    }

    /// DMA_MAP of every node, with its memfd.
    fn map_ram(&mut self) -> std::result::Result<(), VfioUserError> {
        for node in 0..self.phys.nodes() {
            let (Some(range), Some(mapping)) =
                (self.phys.node_range(node), self.phys.node_mapping(node))
            else {
                return Err(VfioUserError::Unsuitable(format!("node {node} missing")));
            };
            let Some(fd) = mapping.file_offset().map(|f| f.file().as_raw_fd()) else {
                return Err(VfioUserError::Unsuitable(format!(
                    "node {node} is not file backed"
                )));
            };
            let size = range.end - range.start;
            let req = DmaMap {
                argsz: DmaMap::SIZE as u32,
                flags: proto::DMA_MAP_FLAG_READ | proto::DMA_MAP_FLAG_WRITE,
                offset: 0,
                address: range.start,
                size,
            };
            self.call(Cmd::DmaMap, &req.encode(), &[fd], DmaMap::SIZE)?;
            debug!(
                node,
                address = range.start,
                size,
                "guest RAM mapped for the device"
            );
            self.mapped.push((range.start, size));
        }
        Ok(())
    }

    /// DEVICE_GET_INFO and the region sizes of BAR0 and configuration space.
    fn read_device_info(&mut self) -> std::result::Result<(), VfioUserError> {
        let name = command_name(Cmd::DeviceGetInfo);
        let req = DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            ..Default::default()
        };
        let reply = self.call(Cmd::DeviceGetInfo, &req.encode(), &[], DeviceInfo::SIZE)?;
        let info = DeviceInfo::parse(&reply).map_err(proto_error(name))?;
        if info.flags & proto::DEVICE_FLAGS_PCI == 0
            || info.num_regions <= proto::PCI_CONFIG_REGION_INDEX
            || info.num_irqs <= proto::PCI_MSIX_IRQ_INDEX
        {
            return Err(VfioUserError::Unsuitable(format!(
                "not a PCI device with configuration space and MSI-X: {info:?}"
            )));
        }
        let bar0 = self.region_info(spec::REGS_BAR as u32)?;
        if !(spec::REGS_BAR_SIZE..=MAX_BAR0_SIZE).contains(&bar0.size) {
            return Err(VfioUserError::Unsuitable(format!(
                "BAR0 is {:#x} bytes; the registers need {:#x} (at most {MAX_BAR0_SIZE:#x} accepted)",
                bar0.size,
                spec::REGS_BAR_SIZE
            )));
        }
        let config = self.region_info(proto::PCI_CONFIG_REGION_INDEX)?;
        if !(0x40..=MAX_CONFIG_SIZE).contains(&config.size) {
            return Err(VfioUserError::Unsuitable(format!(
                "configuration space is {:#x} bytes (0x40 to {MAX_CONFIG_SIZE:#x} expected)",
                config.size
            )));
        }
        self.bar0_size = bar0.size;
        self.config_size = config.size;
        Ok(())
    }

    fn region_info(&self, index: u32) -> std::result::Result<RegionInfo, VfioUserError> {
        let name = command_name(Cmd::DeviceGetRegionInfo);
        let req = RegionInfo {
            argsz: RegionInfo::SIZE as u32,
            index,
            ..Default::default()
        };
        let reply = self.call(
            Cmd::DeviceGetRegionInfo,
            &req.encode(),
            &[],
            RegionInfo::SIZE,
        )?;
        let info = RegionInfo::parse(&reply).map_err(proto_error(name))?;
        if info.index != index {
            return Err(VfioUserError::Protocol {
                command: name,
                problem: format!("asked for region {index}, got region {}", info.index),
            });
        }
        let rw = proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE;
        if info.flags & rw != rw {
            return Err(VfioUserError::Unsuitable(format!(
                "region {index} is not readable and writable (flags {:#x})",
                info.flags
            )));
        }
        Ok(info)
    }

    /// DEVICE_GET_IRQ_INFO for MSI-X: the number of vectors.
    fn msix_info(&self) -> std::result::Result<u32, VfioUserError> {
        let name = command_name(Cmd::DeviceGetIrqInfo);
        let req = IrqInfo {
            argsz: IrqInfo::SIZE as u32,
            index: proto::PCI_MSIX_IRQ_INDEX,
            ..Default::default()
        };
        let reply = self.call(Cmd::DeviceGetIrqInfo, &req.encode(), &[], IrqInfo::SIZE)?;
        let info = IrqInfo::parse(&reply).map_err(proto_error(name))?;
        if info.index != proto::PCI_MSIX_IRQ_INDEX {
            return Err(VfioUserError::Protocol {
                command: name,
                problem: format!(
                    "asked for interrupt type {}, got {}",
                    proto::PCI_MSIX_IRQ_INDEX,
                    info.index
                ),
            });
        }
        if info.flags & proto::IRQ_INFO_EVENTFD == 0
            || !(1..=MAX_MSIX_VECTORS).contains(&info.count)
        {
            return Err(VfioUserError::Unsuitable(format!(
                "MSI-X: {} vectors, flags {:#x} (1 to {MAX_MSIX_VECTORS} vectors signalling \
                 eventfds needed)",
                info.count, info.flags
            )));
        }
        Ok(info.count)
    }

    /// DEVICE_SET_IRQS: our eventfds for every MSI-X vector.
    fn set_irqs(&self) -> std::result::Result<(), VfioUserError> {
        for (i, chunk) in self.msix.chunks(self.max_fds).enumerate() {
            let fds: Vec<RawFd> = chunk.iter().map(AsRawFd::as_raw_fd).collect();
            // Both are bounded by MAX_MSIX_VECTORS.
            let req = IrqSet {
                argsz: IrqSet::SIZE as u32,
                flags: proto::IRQ_SET_DATA_EVENTFD | proto::IRQ_SET_ACTION_TRIGGER,
                index: proto::PCI_MSIX_IRQ_INDEX,
                start: (i * self.max_fds) as u32,
                count: chunk.len() as u32,
                data: Vec::new(),
            };
            self.call(Cmd::DeviceSetIrqs, &req.encode(), &fds, IrqSet::SIZE)?;
        }
        debug!(vectors = self.msix.len(), "MSI-X eventfds assigned");
        Ok(())
    }

    /// DEVICE_SET_IRQS with no data and count 0: every MSI-X vector off.
    fn disable_irqs(&self) -> std::result::Result<(), VfioUserError> {
        let req = IrqSet {
            argsz: IrqSet::SIZE as u32,
            flags: proto::IRQ_SET_DATA_NONE | proto::IRQ_SET_ACTION_TRIGGER,
            index: proto::PCI_MSIX_IRQ_INDEX,
            start: 0,
            count: 0,
            data: Vec::new(),
        };
        self.call(Cmd::DeviceSetIrqs, &req.encode(), &[], IrqSet::SIZE)?;
        Ok(())
    }

    /// Reads `buf.len()` bytes of region `region` at `offset`, in messages of at most the
    /// negotiated transfer size.
    fn region_read(
        &self,
        region: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), VfioUserError> {
        let name = command_name(Cmd::RegionRead);
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(self.max_xfer);
            // n <= max_xfer <= MAX_DATA_XFER_SIZE, a u32.
            let access = RegionAccess {
                offset: offset + done as u64,
                region,
                count: n as u32,
            };
            let reply = self.call(
                Cmd::RegionRead,
                &access.encode(&[]),
                &[],
                RegionAccess::SIZE + n,
            )?;
            let echo = RegionAccess::parse_read(&reply).map_err(proto_error(name))?;
            let data = &reply[RegionAccess::SIZE..];
            if echo != access || data.len() != n {
                return Err(VfioUserError::Protocol {
                    command: name,
                    problem: format!(
                        "asked {access:?}, the reply says {echo:?} with {} data bytes",
                        data.len()
                    ),
                });
            }
            buf[done..done + n].copy_from_slice(data);
            done += n;
        }
        Ok(())
    }

    /// Writes `data` to region `region` at `offset`, in messages of at most the negotiated
    /// transfer size, each answered.
    fn region_write(
        &self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), VfioUserError> {
        let name = command_name(Cmd::RegionWrite);
        let posted = self.posted_writes && region != proto::PCI_CONFIG_REGION_INDEX;
        for (i, chunk) in data.chunks(self.max_xfer).enumerate() {
            let access = RegionAccess {
                offset: offset + (i * self.max_xfer) as u64,
                region,
                count: chunk.len() as u32,
            };
            if posted {
                self.conn().post(Cmd::RegionWrite, &access.encode(chunk))?;
                continue;
            }
            let reply = self.call(
                Cmd::RegionWrite,
                &access.encode(chunk),
                &[],
                RegionAccess::SIZE,
            )?;
            let echo = RegionAccess::parse_read(&reply).map_err(proto_error(name))?;
            if echo != access {
                return Err(VfioUserError::Protocol {
                    command: name,
                    problem: format!("wrote {access:?}, the reply says {echo:?}"),
                });
            }
        }
        Ok(())
    }

    /// VFIO_USER_DEVICE_RESET: a function-level reset of the device. Bus Master Enable is
    /// clear afterwards, as after any function-level reset; DMA mappings and interrupt
    /// eventfds stay.
    pub fn device_reset(&self) -> std::result::Result<(), VfioUserError> {
        self.call(Cmd::DeviceReset, &[], &[], 0)?;
        Ok(())
    }

    /// The negotiated protocol version (major, minor).
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    /// The capabilities the server announced.
    pub fn server_capabilities(&self) -> Capabilities {
        self.server_caps
    }

    /// Guest RAM.
    pub fn phys(&self) -> &PhysMemory {
        &self.phys
    }

    /// Whether the connection is still usable (no stream-breaking failure so far).
    pub fn is_connected(&self) -> bool {
        matches!(self.conn().link, Link::Open(_))
    }

    fn check_reg(&self, offset: u64) -> Result<()> {
        super::check_reg_access(offset, self.bar0_size)
    }

    fn check_config(&self, offset: u64, len: usize) -> Result<()> {
        super::check_config_access(offset, len, self.config_size)
    }
}

/// VERSION: proposes ours, checks the answer. Returns the version and the server's
/// capabilities.
fn negotiate(conn: &mut Conn) -> std::result::Result<((u16, u16), Capabilities), VfioUserError> {
    let name = command_name(Cmd::Version);
    let ours = Version {
        major: proto::VERSION_MAJOR,
        minor: proto::VERSION_MINOR,
        caps: Capabilities {
            // We receive no descriptors.
            max_msg_fds: 0,
            max_data_xfer_size: proto::MAX_DATA_XFER_SIZE,
            pgsizes: 4096,
            max_dma_maps: proto::MAX_DMA_MAPS,
        },
    };
    let reply = conn.call(Cmd::Version, &ours.encode(), &[], MAX_VERSION_REPLY)?;
    let v = Version::parse(&reply).map_err(proto_error(name))?;
    if v.major != ours.major || v.minor > ours.minor {
        return Err(VfioUserError::Protocol {
            command: name,
            problem: format!(
                "version {}.{} answered to our {}.{}",
                v.major, v.minor, ours.major, ours.minor
            ),
        });
    }
    debug!(major = v.major, minor = v.minor, caps = ?v.caps, "vfio-user version negotiated");
    Ok(((v.major, v.minor), v.caps))
}

fn proto_error(command: &'static str) -> impl Fn(proto::ProtoError) -> VfioUserError {
    move |e| VfioUserError::Protocol {
        command,
        problem: e.to_string(),
    }
}

impl DmaBackend for VfioUserBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "vfio-user",
            location: self.socket.display().to_string(),
            register_access: RegisterAccess::Message,
            msix_vectors: self.msix_vectors(),
            // As in the QEMU setup, the device sits on node 1 when there are two or more.
            numa_node: (self.phys.nodes() > 1).then_some(1),
        }
    }

    fn read32(&self, offset: u64) -> Result<u32> {
        self.check_reg(offset)?;
        let mut b = [0u8; 4];
        self.region_read(spec::REGS_BAR as u32, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn write32(&self, offset: u64, value: u32) -> Result<()> {
        self.check_reg(offset)?;
        // Descriptors written to DMA memory must be visible before the doorbell (the
        // system call orders them anyway; this documents it).
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.region_write(spec::REGS_BAR as u32, offset, &value.to_le_bytes())?;
        Ok(())
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_config(offset, buf.len())?;
        self.region_read(proto::PCI_CONFIG_REGION_INDEX, offset, buf)?;
        Ok(())
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_config(offset, buf.len())?;
        self.region_write(proto::PCI_CONFIG_REGION_INDEX, offset, buf)?;
        Ok(())
    }

    super::phys::dma_memory_from_phys!();

    fn msix_vectors(&self) -> u16 {
        // At most MAX_MSIX_VECTORS.
        self.msix.len() as u16
    }

    fn rearm_interrupts(&self) -> Result<()> {
        self.set_irqs()?;
        for e in &self.msix {
            // Discard anything pending (EAGAIN when nothing is).
            let _ = e.read();
        }
        Ok(())
    }

    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<u64> {
        let fd = super::msix_eventfd(&self.msix, vector)?;
        super::wait_eventfd(fd, timeout).map_err(|(what, source)| {
            VfioUserError::Interrupt {
                what,
                vector,
                source,
            }
            .into()
        })
    }
}

impl Drop for VfioUserBackend {
    /// Quiesces the device, withdraws guest RAM from it and closes the connection. Every
    /// step is best effort: the server resets the device and drops the mappings of a client
    /// that goes away in any case.
    fn drop(&mut self) {
        if !self.is_connected() {
            debug!("vfio-user connection already broken; closing");
            return;
        }
        if self.config_size > 0 {
            if let Err(e) = self.set_bus_master(false) {
                warn!("clearing Bus Master Enable on close: {e}");
            }
        }
        if !self.msix.is_empty() {
            if let Err(e) = self.disable_irqs() {
                warn!("disabling MSI-X on close: {e}");
            }
        }
        let name = command_name(Cmd::DmaUnmap);
        for &(address, size) in &self.mapped {
            let req = DmaUnmap {
                argsz: DmaUnmap::SIZE as u32,
                flags: 0,
                address,
                size,
            };
            let result = self
                .call(Cmd::DmaUnmap, &req.encode(), &[], DmaUnmap::SIZE)
                .and_then(|reply| DmaUnmap::parse(&reply).map_err(proto_error(name)));
            match result {
                Ok(echo) if echo.address == address && echo.size == size => {
                    debug!(address, size, "guest RAM unmapped")
                }
                Ok(echo) => warn!(address, size, ?echo, "DMA_UNMAP reply names another range"),
                Err(e) => warn!(address, size, "DMA_UNMAP on close: {e}"),
            }
        }
        if let Link::Open(s) = &self.conn().link {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        info!(socket = %self.socket.display(), "vfio-user connection closed");
    }
}
