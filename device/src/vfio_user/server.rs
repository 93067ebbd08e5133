//! The vfio-user server: a UNIX socket listener that serves one client at a time and adapts
//! its messages to the device core.
//!
//! Threading: [`Server::run`] blocks the calling thread. It accepts a client and serves it
//! on the same thread, one message after another, in order (the spec requires commands to
//! be processed in the order received). The device core sits behind `Arc<Mutex<Device>>`
//! and is locked per message. Its DMA engine runs on its own worker threads, which never
//! take that mutex: they reach bus memory through the shared [`BusMemory`] and raise
//! interrupts through [`EventFdInterrupts`] (a read lock and a non-blocking eventfd write).
//! So a register write that waits for the workers (a queue disable, `DEV_CTRL` reset,
//! DEVICE_RESET) may block under the mutex without deadlock: the server holds no other
//! lock the workers need. The inspector ([`super::inspect`]) takes the mutex only for a
//! counter snapshot. Every blocking wait (accept, read, write) also watches a stop
//! eventfd, so [`StopHandle::stop`] ends the server promptly even while a client is
//! connected and idle.
//!
//! Ownership: received file descriptors are `OwnedFd`s from the moment they arrive; a
//! command takes the ones it uses (DMA_MAP one memfd, SET_IRQS eventfds) and the rest are
//! closed when the message is done. DMA mappings belong to the connection
//! ([`DmaMappings`]); MSI-X eventfds live in the shared [`EventFdInterrupts`] sink. When the
//! client goes away both are dropped, the device is reset, and the next client is accepted.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use tracing::{debug, info, trace, warn};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::irq::{eventfd_from_owned, EventFdInterrupts};
use super::memory::DmaMappings;
use super::proto::*;
use crate::core::{BusMemory, Device, DeviceConfig};
use crate::irq::InterruptSink;

/// Offset of the interrupt pin register in PCI configuration space.
const PCI_INTERRUPT_PIN: u64 = 0x3d;
/// Most descriptors Linux passes in one message (`SCM_MAX_FD`); receiving with room for
/// this many means the kernel never truncates a message's descriptors.
const SCM_MAX_FD: usize = 253;
/// Chunk size when discarding an oversized message.
const DISCARD_CHUNK: usize = 64 << 10;
/// Longest path a `sockaddr_un` holds (108 bytes including the terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Errors of the server: binding its socket, and accepting clients.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket path does not fit in a UNIX socket address.
    #[error("socket path {} is {len} bytes long, more than the {MAX_SOCKET_PATH} a UNIX socket address holds; choose a shorter path", path.display())]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// The directory that should hold the socket does not exist.
    #[error("directory {} does not exist; create it or choose a socket path in an existing directory", dir.display())]
    NoDirectory {
        /// The missing directory.
        dir: PathBuf,
    },
    /// Something other than a socket exists at the path.
    #[error("{} exists and is {kind}, not a socket; {hint}", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
        /// How to fix it.
        hint: &'static str,
    },
    /// A live server accepts connections on the path.
    #[error("{} is in use: a server is accepting connections on it; stop that server or choose another socket path", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The existing path could not be inspected.
    #[error("cannot check the existing socket {}", path.display())]
    Probe {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// bind or listen failed.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The stop eventfd could not be created.
    #[error("cannot create the stop eventfd")]
    StopFd(#[source] io::Error),
    /// Waiting for or accepting a connection failed.
    #[error("cannot accept connections")]
    Accept(#[source] io::Error),
    /// A service thread (the inspector) could not be started.
    #[error("cannot start the inspector thread")]
    Thread(#[source] io::Error),
}

/// Signals a running [`Server`] to stop. Cloneable and usable from any thread (or from a
/// signal-handling thread).
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// Ask the server to stop: [`Server::run`] returns as soon as its current wait ends.
    pub fn stop(&self) {
        // The eventfd is never read, so it stays readable for every waiter. A write can
        // only fail when the counter would overflow, which a handful of writes never reach.
        if let Err(e) = self.0.write(1) {
            warn!(error = %e, "cannot signal the stop eventfd");
        }
    }
}

/// A vfio-user server for one domdma device, listening on a UNIX socket.
///
/// The socket file is removed when the server is dropped (if it is still the one this
/// server created).
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
    config: DeviceConfig,
    device: Arc<Mutex<Device>>,
    memory: BusMemory,
    irqs: Arc<EventFdInterrupts>,
    stop: Arc<EventFd>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("path", &self.path).finish()
    }
}

/// What `path` is, in words, for error messages.
fn describe(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device node"
    } else {
        "not a regular file"
    }
}

/// Check the socket path and remove a stale socket left by a server that is gone.
pub(crate) fn prepare_socket_path(path: &Path) -> Result<(), ServerError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServerError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(ServerError::NoDirectory {
            dir: dir.to_path_buf(),
        });
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        let hint = if meta.file_type().is_dir() {
            "give the path of the socket file to create, e.g. a file inside that directory"
        } else {
            "remove it if it is a leftover, or choose another socket path"
        };
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
            kind: describe(meta.file_type()),
            hint,
        });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
            info!(path = %path.display(), "removed a stale socket left by a server that is no longer running");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ServerError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

impl Server {
    /// Create the device and listen on `path`.
    ///
    /// A socket file left by a server that is no longer running is removed; a path in use
    /// by a live server, or that is not a socket, is an error that says how to fix it.
    pub fn bind(path: impl AsRef<Path>, config: DeviceConfig) -> Result<Self, ServerError> {
        let path = path.as_ref().to_path_buf();
        prepare_socket_path(&path)?;
        let listener = UnixListener::bind(&path).map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
        })?;
        let meta = fs::symlink_metadata(&path).map_err(|source| ServerError::Bind {
            path: path.clone(),
            source,
        })?;
        // Accept is only called once poll reports a pending connection; non-blocking
        // covers a client that vanished in between.
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Bind {
                path: path.clone(),
                source,
            })?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ServerError::StopFd)?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let irqs = Arc::new(EventFdInterrupts::new());
        let device = Device::new(config.clone(), memory.clone(), irqs.clone());
        Ok(Self {
            listener,
            path,
            inode: (meta.dev(), meta.ino()),
            config,
            device: Arc::new(Mutex::new(device)),
            memory,
            irqs,
            stop: Arc::new(stop),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The device this server serves.
    pub fn device(&self) -> Arc<Mutex<Device>> {
        Arc::clone(&self.device)
    }

    /// The bus memory the client's DMA mappings are inserted into.
    pub fn memory(&self) -> BusMemory {
        self.memory.clone()
    }

    /// The MSI-X eventfd sink the device raises interrupts through.
    pub fn interrupts(&self) -> Arc<EventFdInterrupts> {
        Arc::clone(&self.irqs)
    }

    /// A handle that stops [`Server::run`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(Arc::clone(&self.stop))
    }

    /// Accept and serve clients, one at a time, until stopped.
    pub fn run(&self) -> Result<(), ServerError> {
        loop {
            match wait(self.listener.as_raw_fd(), libc::POLLIN, &self.stop) {
                Ok(Wait::Ready) => {}
                Ok(Wait::Stopped) => return Ok(()),
                Err(e) => return Err(ServerError::Accept(e)),
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if accept_should_retry(&e) => continue,
                // Out of descriptors: the client stays queued; try again later rather
                // than exit.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    warn!(error = %e, "cannot accept a client: out of file descriptors");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
                Err(e) => return Err(ServerError::Accept(e)),
            };
            if matches!(self.serve_client(stream), End::Stopped) {
                return Ok(());
            }
        }
    }

    fn serve_client(&self, stream: UnixStream) -> End {
        if let Err(e) = stream.set_nonblocking(false) {
            warn!(error = %e, "cannot configure the client socket; dropping it");
            return End::Io(e);
        }
        info!("client connected");
        let mut conn = Connection::new(self, stream);
        let end = conn.serve();
        let negotiated = match conn.state {
            ConnState::Ready { minor, client } => {
                debug!(
                    minor,
                    client_max_msg_fds = client.max_msg_fds,
                    "session ended"
                );
                true
            }
            ConnState::AwaitingVersion => false,
        };
        // No more interrupts to a client that is gone, a fresh device for the next one,
        // then its memory goes.
        let irqs = self.irqs.assigned();
        self.irqs.clear_all();
        lock(&self.device).reset();
        let mappings = conn.dma.len();
        drop(conn);
        match &end {
            End::Disconnected => info!(
                mappings,
                irqs, negotiated, "client disconnected; DMA mappings and interrupt eventfds dropped, device reset"
            ),
            End::Stopped => info!(
                mappings,
                irqs, "server stopping; client dropped, DMA mappings and interrupt eventfds dropped, device reset"
            ),
            End::Protocol(why) => warn!(
                reason = %why,
                mappings, irqs, "closing the connection after a protocol violation; DMA mappings and interrupt eventfds dropped, device reset"
            ),
            End::Io(e) => warn!(
                error = %e,
                mappings, irqs, "connection failed; DMA mappings and interrupt eventfds dropped, device reset"
            ),
        }
        end
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Remove the socket file only if it is still ours (not replaced by a new server).
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                match fs::remove_file(&self.path) {
                    Ok(()) => debug!(path = %self.path.display(), "socket removed"),
                    Err(e) => {
                        warn!(path = %self.path.display(), error = %e, "cannot remove the socket")
                    }
                }
            }
        }
    }
}

pub(crate) fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a failed `accept` on a non-blocking listener is to be retried at once: nothing
/// was queued after all, a signal came, or the client gave up before it was accepted.
pub(crate) fn accept_should_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// Outcome of waiting for a descriptor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    Ready,
    Stopped,
}

/// Wait until `fd` has `events` (or an error/hangup) or `stop` is signalled.
pub(crate) fn wait(fd: RawFd, events: libc::c_short, stop: &EventFd) -> io::Result<Wait> {
    let mut fds = [
        libc::pollfd {
            fd,
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structures for the whole call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(Wait::Stopped);
        }
        if fds[0].revents != 0 {
            return Ok(Wait::Ready);
        }
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The client closed the connection or reset it.
    Disconnected,
    /// The server was asked to stop.
    Stopped,
    /// The stream cannot be trusted any more (e.g. a size below the header size).
    Protocol(String),
    /// A socket error.
    Io(io::Error),
}

/// Connection state: nothing but VERSION is served before the version handshake.
#[derive(Debug, Clone, Copy)]
enum ConnState {
    AwaitingVersion,
    Ready {
        /// The negotiated minor version.
        minor: u16,
        /// What the client said it can receive.
        client: Capabilities,
    },
}

/// A reply body, or an errno for an error reply.
type Reply = Result<Vec<u8>, i32>;

/// One client connection.
struct Connection<'s> {
    server: &'s Server,
    stream: UnixStream,
    state: ConnState,
    dma: DmaMappings,
    /// INTx trigger and unmask eventfds (accepted when the device has an interrupt pin;
    /// the device never raises INTx).
    intx: Option<EventFd>,
    intx_unmask: Option<EventFd>,
    buf: Vec<u8>,
}

impl<'s> Connection<'s> {
    fn new(server: &'s Server, stream: UnixStream) -> Self {
        Self {
            server,
            stream,
            state: ConnState::AwaitingVersion,
            dma: DmaMappings::new(server.memory.clone()),
            intx: None,
            intx_unmask: None,
            buf: Vec::new(),
        }
    }

    /// Serve messages until the client leaves, the server stops, or the stream breaks.
    fn serve(&mut self) -> End {
        loop {
            if let Err(end) = self.serve_one() {
                return end;
            }
        }
    }

    fn serve_one(&mut self) -> Result<(), End> {
        let mut fds = Vec::new();
        let mut too_many_fds = false;
        let mut hb = [0u8; HEADER_SIZE];
        if !self.read_exact(&mut hb, &mut fds, &mut too_many_fds, true)? {
            return Err(End::Disconnected);
        }
        let hdr = Header::parse(&hb);
        trace!(
            id = hdr.id,
            command = hdr.command,
            size = hdr.size,
            flags = hdr.flags,
            fds = fds.len(),
            "message"
        );
        let Some(len) = hdr.payload_len() else {
            return Err(End::Protocol(format!(
                "message size {} is smaller than the header",
                hdr.size
            )));
        };
        let size = hdr.size as usize;
        if size > MAX_DISCARD_SIZE {
            return Err(End::Protocol(format!(
                "message of {size} bytes (command {}) exceeds the {MAX_DISCARD_SIZE}-byte limit",
                hdr.command
            )));
        }
        if size > MAX_MESSAGE_SIZE {
            warn!(
                command = hdr.command,
                size, "message larger than {MAX_MESSAGE_SIZE} bytes; discarding it"
            );
            self.discard(len, &mut fds, &mut too_many_fds)?;
            drop(fds);
            return self.respond(&hdr, Err(libc::E2BIG));
        }
        let mut payload = std::mem::take(&mut self.buf);
        payload.clear();
        payload.resize(len, 0);
        let result = self
            .read_exact(&mut payload, &mut fds, &mut too_many_fds, false)
            .and_then(|_| self.handle(&hdr, &payload, fds, too_many_fds));
        self.keep(payload);
        result
    }

    /// Handle one complete message and send its reply.
    fn handle(
        &mut self,
        hdr: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        too_many_fds: bool,
    ) -> Result<(), End> {
        let reply = match hdr.msg_type() {
            FLAGS_TYPE_COMMAND if too_many_fds => {
                warn!(
                    command = hdr.command,
                    "message carries more than {MAX_MSG_FDS} file descriptors"
                );
                Err(libc::EINVAL)
            }
            FLAGS_TYPE_COMMAND => self.dispatch(hdr, payload, fds),
            FLAGS_TYPE_REPLY => {
                // We never send commands, so there is nothing this can answer.
                debug!(id = hdr.id, "ignoring an unexpected reply");
                return Ok(());
            }
            t => {
                warn!(command = hdr.command, "unknown message type {t}");
                Err(libc::EINVAL)
            }
        };
        self.respond(hdr, reply)
    }

    /// Keep the payload buffer for the next message unless it grew large.
    fn keep(&mut self, payload: Vec<u8>) {
        if payload.capacity() <= 64 << 10 {
            self.buf = payload;
        }
    }

    /// Send the reply (or error reply) unless the client asked for none.
    fn respond(&mut self, hdr: &Header, reply: Reply) -> Result<(), End> {
        if hdr.no_reply() {
            if let Err(errno) = reply {
                debug!(
                    command = hdr.command,
                    errno, "command without reply failed (no reply sent)"
                );
            }
            return Ok(());
        }
        match reply {
            Ok(body) => self.send(&encode_reply(hdr, &body)),
            Err(errno) => {
                debug!(id = hdr.id, command = hdr.command, errno, "error reply");
                // Errno values are small positive numbers.
                self.send(&encode_error(hdr, errno.unsigned_abs()))
            }
        }
    }

    fn dispatch(&mut self, hdr: &Header, payload: &[u8], fds: Vec<OwnedFd>) -> Reply {
        let cmd = hdr.cmd();
        if cmd == Some(Command::Version) {
            return self.version(payload);
        }
        if matches!(self.state, ConnState::AwaitingVersion) {
            warn!(
                command = hdr.command,
                "command before the VERSION handshake"
            );
            return Err(libc::EINVAL);
        }
        let malformed = |e: ProtoError| {
            warn!(error = %e, "malformed message");
            libc::EINVAL
        };
        match cmd {
            Some(Command::DmaMap) => self.dma_map(DmaMap::parse(payload).map_err(malformed)?, fds),
            Some(Command::DmaUnmap) => self.dma_unmap(DmaUnmap::parse(payload).map_err(malformed)?),
            Some(Command::DeviceGetInfo) => {
                DeviceInfo::parse(payload).map_err(malformed)?;
                Ok(DeviceInfo {
                    argsz: DeviceInfo::SIZE as u32,
                    flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
                    num_regions: PCI_NUM_REGIONS,
                    num_irqs: PCI_NUM_IRQS,
                }
                .encode())
            }
            Some(Command::DeviceGetRegionInfo) => {
                self.region_info(RegionInfo::parse(payload).map_err(malformed)?)
            }
            Some(Command::DeviceGetIrqInfo) => {
                self.irq_info(IrqInfo::parse(payload).map_err(malformed)?)
            }
            Some(Command::DeviceSetIrqs) => {
                self.set_irqs(IrqSet::parse(payload).map_err(malformed)?, fds)
            }
            Some(Command::RegionRead) => {
                self.region_read(RegionAccess::parse_read(payload).map_err(malformed)?)
            }
            Some(Command::RegionWrite) => {
                let (access, data) = RegionAccess::parse_write(payload).map_err(malformed)?;
                self.region_write(access, data)
            }
            Some(Command::DeviceReset) => {
                lock(&self.server.device).reset();
                debug!("device reset");
                Ok(Vec::new())
            }
            Some(Command::DmaRead | Command::DmaWrite) => {
                warn!(
                    command = hdr.command,
                    "server-to-client command sent by the client"
                );
                Err(libc::EINVAL)
            }
            Some(c) => {
                debug!(command = ?c, "unsupported command");
                Err(libc::ENOTSUP)
            }
            None => {
                warn!(command = hdr.command, "unknown command");
                Err(libc::ENOTSUP)
            }
        }
    }

    fn version(&mut self, payload: &[u8]) -> Reply {
        if let ConnState::Ready { .. } = self.state {
            warn!("VERSION sent twice");
            return Err(libc::EINVAL);
        }
        let v = Version::parse(payload).map_err(|e| {
            warn!(error = %e, "malformed VERSION");
            libc::EINVAL
        })?;
        if v.major != VERSION_MAJOR {
            warn!(
                major = v.major,
                minor = v.minor,
                "client proposes an unsupported major version"
            );
            return Err(libc::ENOTSUP);
        }
        let minor = v.minor.min(VERSION_MINOR);
        self.state = ConnState::Ready {
            minor,
            client: v.caps,
        };
        info!(
            version = format_args!("{VERSION_MAJOR}.{minor}"),
            client_max_msg_fds = v.caps.max_msg_fds,
            client_max_data_xfer_size = v.caps.max_data_xfer_size,
            "vfio-user version negotiated"
        );
        Ok(Version {
            major: VERSION_MAJOR,
            minor,
            caps: Capabilities::SERVER,
        }
        .encode())
    }

    fn dma_map(&mut self, m: DmaMap, fds: Vec<OwnedFd>) -> Reply {
        self.dma
            .map(m.flags, m.offset, m.address, m.size, fds)
            .map_err(|e| {
                warn!(error = %e, "DMA_MAP refused");
                e.errno()
            })?;
        Ok(Vec::new())
    }

    fn dma_unmap(&mut self, m: DmaUnmap) -> Reply {
        if m.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if m.flags != DMA_UNMAP_FLAG_ALL {
                warn!(flags = m.flags, "DMA_UNMAP: unsupported flag combination");
                return Err(libc::EINVAL);
            }
            self.dma.unmap_all();
        } else if m.flags != 0 {
            warn!(flags = m.flags, "DMA_UNMAP: unsupported flags");
            return Err(if m.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
                libc::ENOTSUP
            } else {
                libc::EINVAL
            });
        } else {
            self.dma.unmap(m.address, m.size).map_err(|e| {
                warn!(error = %e, "DMA_UNMAP refused");
                e.errno()
            })?;
        }
        // The VMM reuses the memory as soon as it has the reply: wait until no DMA that may
        // still use the old mapping is moving.
        lock(&self.server.device).dma_barrier();
        // The spec: the reply carries the original DMA entry.
        Ok(DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            ..m
        }
        .encode())
    }

    /// Size of region `index` (0 when absent).
    fn region_size(&self, index: u32) -> u64 {
        let dev = lock(&self.server.device);
        match index {
            0..=5 => dev.bar_size(index as usize),
            PCI_CONFIG_REGION_INDEX => dev.config_size(),
            _ => 0,
        }
    }

    fn region_info(&mut self, req: RegionInfo) -> Reply {
        if req.index >= PCI_NUM_REGIONS {
            warn!(index = req.index, "GET_REGION_INFO: no such region");
            return Err(libc::EINVAL);
        }
        let size = self.region_size(req.index);
        let flags = if size > 0 {
            REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
        } else {
            0
        };
        Ok(RegionInfo {
            argsz: RegionInfo::SIZE as u32,
            flags,
            index: req.index,
            cap_offset: 0,
            size,
            offset: 0,
        }
        .encode())
    }

    /// Number of interrupts of type `index`, or `None` for an unknown index.
    fn irq_count(&self, index: u32) -> Option<u32> {
        match index {
            PCI_INTX_IRQ_INDEX => {
                let mut pin = [0u8];
                lock(&self.server.device).config_read(PCI_INTERRUPT_PIN, &mut pin);
                Some(u32::from(pin[0] != 0))
            }
            PCI_MSIX_IRQ_INDEX => Some(u32::from(lock(&self.server.device).msix_vectors())),
            PCI_MSI_IRQ_INDEX | PCI_ERR_IRQ_INDEX | PCI_REQ_IRQ_INDEX => Some(0),
            _ => None,
        }
    }

    fn irq_info(&mut self, req: IrqInfo) -> Reply {
        let Some(count) = self.irq_count(req.index) else {
            warn!(index = req.index, "GET_IRQ_INFO: no such interrupt type");
            return Err(libc::EINVAL);
        };
        let flags = match req.index {
            PCI_INTX_IRQ_INDEX if count > 0 => {
                IRQ_INFO_EVENTFD | IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
            }
            _ => IRQ_INFO_EVENTFD,
        };
        Ok(IrqInfo {
            argsz: IrqInfo::SIZE as u32,
            flags,
            index: req.index,
            count,
        }
        .encode())
    }

    fn set_irqs(&mut self, req: IrqSet, fds: Vec<OwnedFd>) -> Reply {
        let data = req.flags & IRQ_SET_DATA_TYPE_MASK;
        let action = req.flags & IRQ_SET_ACTION_TYPE_MASK;
        if req.flags & !(IRQ_SET_DATA_TYPE_MASK | IRQ_SET_ACTION_TYPE_MASK) != 0
            || data.count_ones() != 1
            || action.count_ones() != 1
        {
            warn!(flags = req.flags, "SET_IRQS: invalid flags");
            return Err(libc::EINVAL);
        }
        let Some(max) = self.irq_count(req.index) else {
            warn!(index = req.index, "SET_IRQS: no such interrupt type");
            return Err(libc::EINVAL);
        };
        if data != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            warn!("SET_IRQS: file descriptors without DATA_EVENTFD");
            return Err(libc::EINVAL);
        }
        // count 0 with DATA_NONE and TRIGGER disables every interrupt of the type.
        if data == IRQ_SET_DATA_NONE && action == IRQ_SET_ACTION_TRIGGER && req.count == 0 {
            match req.index {
                PCI_MSIX_IRQ_INDEX => self.server.irqs.clear_all(),
                PCI_INTX_IRQ_INDEX => {
                    self.intx = None;
                    self.intx_unmask = None;
                }
                _ => {}
            }
            debug!(index = req.index, "interrupts disabled");
            return Ok(Vec::new());
        }
        match req.start.checked_add(req.count) {
            Some(end) if end <= max => {}
            _ => {
                warn!(
                    index = req.index,
                    start = req.start,
                    count = req.count,
                    max,
                    "SET_IRQS: range beyond the interrupt count"
                );
                return Err(libc::EINVAL);
            }
        }
        if req.count == 0 {
            return Ok(Vec::new());
        }
        let (start, count) = (req.start as usize, req.count as usize);
        // Which sub-indexes a DATA_NONE / DATA_BOOL action applies to.
        let selected: Vec<usize> = match data {
            IRQ_SET_DATA_BOOL => (start..start + count)
                .zip(&req.data)
                .filter(|(_, &b)| b != 0)
                .map(|(i, _)| i)
                .collect(),
            _ => (start..start + count).collect(),
        };
        match (req.index, action, data) {
            (PCI_MSIX_IRQ_INDEX, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
                if fds.is_empty() {
                    // No descriptors: de-assign (QEMU sends unused vectors this way).
                    self.server.irqs.clear(start, count);
                    debug!(start, count, "MSI-X eventfds withdrawn");
                } else if fds.len() == count {
                    let eventfds = to_eventfds(fds)?;
                    self.server.irqs.assign(start, eventfds);
                    debug!(start, count, "MSI-X eventfds assigned");
                } else {
                    warn!(
                        count,
                        fds = fds.len(),
                        "SET_IRQS: eventfd count does not match"
                    );
                    return Err(libc::EINVAL);
                }
            }
            (PCI_MSIX_IRQ_INDEX, IRQ_SET_ACTION_TRIGGER, _) => {
                for v in selected {
                    // v < msix_vectors, a u16.
                    self.server.irqs.trigger(v as u16);
                }
            }
            (PCI_MSIX_IRQ_INDEX, _, _) => {
                debug!("SET_IRQS: MSI-X mask/unmask is not supported");
                return Err(libc::ENOTSUP);
            }
            (
                PCI_INTX_IRQ_INDEX,
                IRQ_SET_ACTION_TRIGGER | IRQ_SET_ACTION_UNMASK,
                IRQ_SET_DATA_EVENTFD,
            ) => {
                let fd = match fds.len() {
                    0 => None,
                    1 => to_eventfds(fds)?.pop(),
                    n => {
                        warn!(fds = n, "SET_IRQS: INTx takes one eventfd");
                        return Err(libc::EINVAL);
                    }
                };
                if action == IRQ_SET_ACTION_TRIGGER {
                    self.intx = fd;
                } else {
                    self.intx_unmask = fd;
                }
            }
            (PCI_INTX_IRQ_INDEX, IRQ_SET_ACTION_TRIGGER, _) => {
                if let (Some(fd), false) = (&self.intx, selected.is_empty()) {
                    let _ = fd.write(1);
                }
            }
            (PCI_INTX_IRQ_INDEX, IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK, _) => {
                // The device never asserts INTx: nothing to mask.
            }
            _ => {
                warn!(
                    index = req.index,
                    flags = req.flags,
                    "SET_IRQS: unsupported action"
                );
                return Err(libc::EINVAL);
            }
        }
        Ok(Vec::new())
    }

    /// Check a region access; returns the region size.
    fn check_access(&self, a: &RegionAccess) -> Result<(), i32> {
        if a.count > MAX_DATA_XFER_SIZE {
            warn!(
                count = a.count,
                "region access larger than max_data_xfer_size"
            );
            return Err(libc::E2BIG);
        }
        let size = if a.region < PCI_NUM_REGIONS {
            self.region_size(a.region)
        } else {
            0
        };
        match a.offset.checked_add(u64::from(a.count)) {
            Some(end) if size > 0 && end <= size => Ok(()),
            _ => {
                warn!(
                    region = a.region,
                    offset = format_args!("{:#x}", a.offset),
                    count = a.count,
                    size,
                    "region access out of bounds"
                );
                Err(libc::EINVAL)
            }
        }
    }

    fn region_read(&mut self, a: RegionAccess) -> Reply {
        self.check_access(&a)?;
        let mut data = vec![0u8; a.count as usize];
        {
            let mut dev = lock(&self.server.device);
            if a.region == PCI_CONFIG_REGION_INDEX {
                dev.config_read(a.offset, &mut data);
            } else {
                dev.bar_read(a.region as usize, a.offset, &mut data);
            }
        }
        trace!(
            region = a.region,
            offset = a.offset,
            count = a.count,
            "region read"
        );
        Ok(a.encode(&data))
    }

    fn region_write(&mut self, a: RegionAccess, data: &[u8]) -> Reply {
        self.check_access(&a)?;
        {
            let mut dev = lock(&self.server.device);
            if a.region == PCI_CONFIG_REGION_INDEX {
                dev.config_write(a.offset, data);
            } else {
                dev.bar_write(a.region as usize, a.offset, data);
            }
        }
        trace!(
            region = a.region,
            offset = a.offset,
            count = a.count,
            "region write"
        );
        Ok(a.encode(&[]))
    }

    /// Read exactly `buf.len()` bytes, collecting any descriptors that come with them.
    /// Returns `Ok(false)` on a clean end of stream before the first byte when
    /// `at_boundary`.
    fn read_exact(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        too_many: &mut bool,
        at_boundary: bool,
    ) -> Result<bool, End> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.recv(&mut buf[got..], fds, too_many)?;
            if n == 0 {
                if got == 0 && at_boundary {
                    return Ok(false);
                }
                debug!("client closed the connection in the middle of a message");
                return Err(End::Disconnected);
            }
            got += n;
        }
        Ok(true)
    }

    /// Read and drop `len` bytes in bounded chunks.
    fn discard(
        &mut self,
        mut len: usize,
        fds: &mut Vec<OwnedFd>,
        too_many: &mut bool,
    ) -> Result<(), End> {
        let mut chunk = vec![0u8; DISCARD_CHUNK.min(len)];
        while len > 0 {
            let n = chunk.len().min(len);
            self.read_exact(&mut chunk[..n], fds, too_many, false)?;
            len -= n;
        }
        Ok(())
    }

    /// One `recvmsg`: data into `buf`, descriptors appended to `fds` (beyond
    /// [`MAX_MSG_FDS`] they are closed at once and `too_many` is set).
    fn recv(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        too_many: &mut bool,
    ) -> Result<usize, End> {
        loop {
            match wait(self.stream.as_raw_fd(), libc::POLLIN, &self.server.stop) {
                Ok(Wait::Ready) => {}
                Ok(Wait::Stopped) => return Err(End::Stopped),
                Err(e) => return Err(End::Io(e)),
            }
            let mut raw = [-1 as RawFd; SCM_MAX_FD];
            let mut iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: the iovec describes `buf`, which is valid for writes of its length
            // and outlives the call; `raw` has room for SCM_MAX_FD descriptors.
            let r = unsafe { self.stream.recv_with_fds(&mut iov, &mut raw) };
            match r {
                Ok((n, nfds)) => {
                    for &fd in &raw[..nfds] {
                        // SAFETY: the kernel just installed these descriptors in our
                        // table; nothing else refers to them, so we take ownership.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        set_cloexec(&fd);
                        if fds.len() < MAX_MSG_FDS as usize {
                            fds.push(fd);
                        } else {
                            *too_many = true;
                        }
                    }
                    return Ok(n);
                }
                Err(e) => match e.errno() {
                    libc::EINTR | libc::EAGAIN => continue,
                    libc::ECONNRESET | libc::EPIPE => return Err(End::Disconnected),
                    // Our descriptor table is full (or the control data was truncated):
                    // the kernel dropped descriptors after the data was consumed, so the
                    // message cannot be processed and the stream is out of step.
                    libc::ENOBUFS => {
                        return Err(End::Protocol(
                            "received file descriptors were truncated (out of descriptors?)".into(),
                        ))
                    }
                    errno => return Err(End::Io(io::Error::from_raw_os_error(errno))),
                },
            }
        }
    }

    /// Write all of `bytes`.
    fn send(&mut self, bytes: &[u8]) -> Result<(), End> {
        let mut off = 0;
        while off < bytes.len() {
            match wait(self.stream.as_raw_fd(), libc::POLLOUT, &self.server.stop) {
                Ok(Wait::Ready) => {}
                Ok(Wait::Stopped) => return Err(End::Stopped),
                Err(e) => return Err(End::Io(e)),
            }
            let rest = &bytes[off..];
            // SAFETY: `rest` is a valid buffer of `rest.len()` bytes for the whole call.
            // MSG_NOSIGNAL: a client that has gone gives EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN) => continue,
                    Some(libc::EPIPE | libc::ECONNRESET) => return Err(End::Disconnected),
                    _ => return Err(End::Io(e)),
                }
            }
            // n >= 0 here.
            off += n as usize;
        }
        Ok(())
    }
}

/// Close-on-exec for a received descriptor (SCM_RIGHTS descriptors arrive without it).
fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl(F_SETFD) on a descriptor we own; no memory is passed.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
}

/// Turn received descriptors into eventfds; any that is not one fails the command.
fn to_eventfds(fds: Vec<OwnedFd>) -> Result<Vec<EventFd>, i32> {
    fds.into_iter()
        .map(|fd| {
            eventfd_from_owned(fd).map_err(|e| {
                warn!(error = %e, "SET_IRQS: refused descriptor");
                libc::EINVAL
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-srv-").unwrap()
    }

    #[test]
    fn bind_errors_say_what_and_how() {
        let dir = tmp_dir();
        let d = dir.as_path();

        let missing = d.join("nope/dev.sock");
        let e = Server::bind(&missing, DeviceConfig::default()).unwrap_err();
        assert!(matches!(e, ServerError::NoDirectory { .. }), "{e}");
        assert!(e.to_string().contains("does not exist"), "{e}");

        let file = d.join("file");
        fs::write(&file, b"x").unwrap();
        let e = Server::bind(&file, DeviceConfig::default()).unwrap_err();
        assert!(
            e.to_string().contains("is a regular file, not a socket"),
            "{e}"
        );

        let e = Server::bind(d, DeviceConfig::default()).unwrap_err();
        assert!(
            e.to_string().contains("is a directory, not a socket"),
            "{e}"
        );

        let long = d.join("x".repeat(120));
        let e = Server::bind(&long, DeviceConfig::default()).unwrap_err();
        assert!(matches!(e, ServerError::PathTooLong { .. }), "{e}");
    }

    #[test]
    fn live_socket_is_refused_stale_socket_is_replaced() {
        let dir = tmp_dir();
        let path = dir.as_path().join("dev.sock");
        let live = Server::bind(&path, DeviceConfig::default()).unwrap();
        let e = Server::bind(&path, DeviceConfig::default()).unwrap_err();
        assert!(matches!(e, ServerError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("stop that server"), "{e}");
        drop(live);
        assert!(!path.exists(), "dropping the server removes its socket");

        // A stale socket: bound, then its listener closed without unlinking.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let s = Server::bind(&path, DeviceConfig::default()).unwrap();
        assert!(path.exists());
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn drop_leaves_a_replaced_socket_alone() {
        let dir = tmp_dir();
        let path = dir.as_path().join("dev.sock");
        let s = Server::bind(&path, DeviceConfig::default()).unwrap();
        fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(s);
        assert!(path.exists(), "someone else's socket is not removed");
        drop(other);
    }

    #[test]
    fn stop_handle_ends_run() {
        let dir = tmp_dir();
        let path = dir.as_path().join("dev.sock");
        let s = Server::bind(&path, DeviceConfig::default()).unwrap();
        let stop = s.stop_handle();
        let t = std::thread::spawn(move || s.run());
        // An idle client connected and silent: stop still ends the server.
        let _c = UnixStream::connect(&path).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        stop.stop();
        t.join().unwrap().unwrap();
        assert!(!path.exists());
    }
}
