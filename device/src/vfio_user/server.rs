//! The vfio-user server: a UNIX socket listener that serves one client at a time and adapts
//! its messages to the device core.
//!
//! Threading. [`Server::run`] runs an event loop (rust-vmm's `event-manager`) on the calling
//! thread for everything that is not the served client's messages: the listener (accepted
//! clients wait in a bounded queue and are served in the order they came), the inspector
//! ([`super::inspect`]), the stop eventfd and, when asked, termination signals. The client
//! being served has a thread of its own, which reads its messages with blocking `recvmsg`
//! (no `poll` per message) and answers each in order (the spec requires commands to be
//! processed in the order received). The device core sits behind `Arc<Mutex<Device>>` and
//! is locked per message. Its DMA engine runs on its own worker threads, which never take
//! that mutex: they reach bus memory through the shared [`BusMemory`] and raise interrupts
//! through [`EventFdInterrupts`] (a read lock and a non-blocking eventfd write). So a
//! register write that waits for the workers (a queue disable, `DEV_CTRL` reset,
//! DEVICE_RESET) may block under the mutex without deadlock: the server holds no other lock
//! the workers need.
//!
//! Time limits. A client must complete the VERSION handshake within
//! [`ServerOptions::handshake_timeout`], and once a message has started arriving the rest
//! must come within [`ServerOptions::message_timeout`] (the same limit holds for a reply the
//! client does not read); a negotiated client that sends nothing is never timed out (QEMU
//! idles for hours). The client socket has a receive timeout of [`TICK`]-ish, so an idle
//! connection costs one wake-up per tick and a stop is seen within one tick even if the
//! event loop's `shutdown` of the socket could not be delivered.
//!
//! Ownership: received file descriptors are `OwnedFd`s from the moment they arrive; a
//! command takes the ones it uses (DMA_MAP one memfd, SET_IRQS eventfds) and the rest are
//! closed when the message is done. DMA mappings belong to the connection
//! ([`DmaMappings`]); MSI-X eventfds live in the shared [`EventFdInterrupts`] sink. When the
//! client goes away both are dropped, the device is reset, and the next client is served.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use tracing::{debug, info, trace, warn};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::channel::{Channel, DmaRwStats, End, Limits, Message};
use super::inspect::Inspector;
use super::irq::{eventfd_from_owned, EventFdInterrupts};
use super::memory::DmaMappings;
use super::proto::*;
use super::socket::{BoundSocket, SocketAccess, MAX_SOCKET_PATH};
use crate::core::inject::Rule;
use crate::core::remote::RemoteMemory;
use crate::core::{BusMemory, Device, DeviceConfig};
use crate::irq::InterruptSink;
use crate::spec::{QUEUE_BASE, QUEUE_STRIDE, Q_TAIL, REGS_BAR};
use crate::trace::{Event, RecordOptions, Recorder, TraceConfig, Tracer};

/// Offset of the interrupt pin register in PCI configuration space.
const PCI_INTERRUPT_PIN: u64 = 0x3d;
/// Longest wait of one `recvmsg` on the client socket: how often an idle connection wakes
/// to check its time limits and the stop flag.
pub const TICK: Duration = Duration::from_secs(1);
/// Descriptors kept free of DMA mappings: the listener, the client socket, eventfds, the
/// descriptors of one message in flight, the inspector's connections, logging.
const FD_RESERVE: u64 = 64 + super::channel::SCM_MAX_FD as u64;

/// Errors of the server: binding its socket, and accepting clients.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The web view (`--http`) could not be started.
    #[error(transparent)]
    Web(#[from] super::web::WebError),
    /// The trace file (`--trace`) could not be started.
    #[error("cannot record the trace: {0}")]
    Trace(#[from] crate::trace::TraceError),
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
    /// The socket could not be given the requested group.
    #[error("cannot give {} the group {gid} (is this user a member of it?)", path.display())]
    Group {
        /// The path.
        path: PathBuf,
        /// The group.
        gid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The stop eventfd could not be created.
    #[error("cannot create the stop eventfd")]
    StopFd(#[source] io::Error),
    /// The event loop could not be set up or failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// Signal handlers could not be installed.
    #[error("cannot install the signal handlers")]
    Signals(#[source] io::Error),
    /// The connection thread could not be started.
    #[error("cannot start the connection thread")]
    Thread(#[source] io::Error),
}

/// How the server treats its sockets and clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Who may connect besides the owner (sockets are 0600 by default).
    pub access: SocketAccess,
    /// Time a client has, from when its turn comes, to complete the VERSION handshake.
    pub handshake_timeout: Duration,
    /// Time the rest of a message has once its first byte arrived, and the time a reply
    /// may wait for the client to read it.
    pub message_timeout: Duration,
    /// Clients waiting for their turn; more are closed at once.
    pub max_waiting: usize,
    /// Record a trace of what the device does to this file (see [`crate::trace`]).
    pub trace: Option<PathBuf>,
    /// How the trace is recorded (data checksums, the writer's priority).
    pub trace_options: RecordOptions,
    /// Error-injection rules in force from the start (see [`crate::core::inject`]).
    pub inject: Vec<Rule>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            access: SocketAccess::default(),
            handshake_timeout: Duration::from_secs(5),
            message_timeout: Duration::from_secs(5),
            max_waiting: 16,
            trace: None,
            trace_options: RecordOptions::default(),
            inject: Vec::new(),
        }
    }
}

/// Signals a running [`Server`] to stop. Cloneable and usable from any thread (or from a
/// signal-handling thread).
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// Ask the server to stop: [`Server::run`] returns as soon as its event loop sees it.
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
/// The socket file (and the inspector's) is removed when the server is dropped, if it is
/// still the one this server created.
pub struct Server {
    socket: BoundSocket,
    options: ServerOptions,
    config: DeviceConfig,
    device: Arc<Mutex<Device>>,
    memory: BusMemory,
    irqs: Arc<EventFdInterrupts>,
    stop: Arc<EventFd>,
    caps: Capabilities,
    inspector: Option<Inspector>,
    /// The live web view (`--http`).
    web: Option<super::web::WebView>,
    signals: Vec<(libc::c_int, UnixStream)>,
    dma_rw: Arc<DmaRwStats>,
    /// The device's trace (off without `trace` in the options).
    trace: Tracer,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("path", &self.socket.path())
            .finish()
    }
}

/// Raise the soft descriptor limit to the hard one (each DMA mapping keeps its file open)
/// and return the number of DMA mappings the process can hold beside a reserve of
/// descriptors (64 plus one message's worth), at most [`MAX_DMA_MAPS`] and at least 1.
pub fn dma_map_budget() -> u32 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the rlimit structure we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return MAX_DMA_MAPS;
    }
    if lim.rlim_cur < lim.rlim_max {
        let old = lim.rlim_cur;
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the rlimit structure we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            debug!(
                from = old,
                to = raised.rlim_cur,
                "raised the file descriptor limit"
            );
            lim = raised;
        }
    }
    let budget = lim
        .rlim_cur
        .saturating_sub(FD_RESERVE)
        .clamp(1, MAX_DMA_MAPS.into());
    // Clamped to MAX_DMA_MAPS, a u32.
    budget as u32
}

impl Server {
    /// Create the device and listen on `path` with the default [`ServerOptions`].
    ///
    /// A socket file left by a server that is no longer running is removed; a path in use
    /// by a live server, or that is not a socket, is an error that says how to fix it.
    pub fn bind(path: impl AsRef<Path>, config: DeviceConfig) -> Result<Self, ServerError> {
        Self::bind_with(path, config, ServerOptions::default())
    }

    /// Create the device and listen on `path`.
    pub fn bind_with(
        path: impl AsRef<Path>,
        config: DeviceConfig,
        options: ServerOptions,
    ) -> Result<Self, ServerError> {
        let socket = BoundSocket::bind(path.as_ref(), options.access)?;
        let stop =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(ServerError::StopFd)?;
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let irqs = Arc::new(EventFdInterrupts::new());
        let trace = match &options.trace {
            Some(path) => Tracer::new(Recorder::open(
                path,
                TraceConfig::from(&config),
                options.trace_options,
            )?),
            None => Tracer::off(),
        };
        let device =
            Device::with_tracer(config.clone(), memory.clone(), irqs.clone(), trace.clone());
        device.set_injection(&options.inject);
        let caps = Capabilities {
            max_dma_maps: dma_map_budget(),
            ..Capabilities::SERVER
        };
        if caps.max_dma_maps < MAX_DMA_MAPS {
            info!(
                max_dma_maps = caps.max_dma_maps,
                "the descriptor limit allows fewer DMA mappings than {MAX_DMA_MAPS}; advertising that"
            );
        }
        Ok(Self {
            socket,
            options,
            config,
            device: Arc::new(Mutex::new(device)),
            memory,
            irqs,
            stop: Arc::new(stop),
            caps,
            inspector: None,
            web: None,
            signals: Vec::new(),
            dma_rw: Arc::new(DmaRwStats::default()),
            trace,
        })
    }

    /// Also serve the device's counters as JSON on a second socket at `path` (see
    /// [`super::inspect`]), with the same access rules.
    pub fn add_inspector(&mut self, path: impl AsRef<Path>) -> Result<(), ServerError> {
        let insp = Inspector::bind(
            path.as_ref(),
            self.options.access,
            lock(&self.device).observer(),
            self.config.clone(),
            Arc::clone(&self.dma_rw),
        )?;
        info!(path = %insp.path().display(), "inspector listening");
        self.inspector = Some(insp);
        Ok(())
    }

    /// Serve the live web view on `addr` ([`super::web`]); returns the address it listens
    /// on (port 0 picks a free one).
    pub fn add_web_view(
        &mut self,
        addr: std::net::SocketAddr,
    ) -> Result<std::net::SocketAddr, ServerError> {
        let web = super::web::WebView::start(
            addr,
            lock(&self.device).observer(),
            super::inspect::ConfigReport::from(&self.config),
        )?;
        let bound = web.addr();
        self.web = Some(web);
        Ok(bound)
    }

    /// Stop [`Server::run`] when one of `signals` (e.g. SIGTERM, SIGINT) arrives: the
    /// signal handler writes to a pipe the event loop watches.
    pub fn stop_on_signals(&mut self, signals: &[libc::c_int]) -> Result<(), ServerError> {
        for &sig in signals {
            let (read, write) = UnixStream::pair().map_err(ServerError::Signals)?;
            read.set_nonblocking(true).map_err(ServerError::Signals)?;
            signal_hook::low_level::pipe::register(sig, write).map_err(ServerError::Signals)?;
            self.signals.push((sig, read));
        }
        Ok(())
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.socket.path()
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// The trace the device records to (off unless [`ServerOptions::trace`] was given).
    pub fn tracer(&self) -> &Tracer {
        &self.trace
    }

    /// The capabilities the server advertises in VERSION (`max_dma_maps` from the
    /// descriptor limit, see [`dma_map_budget`]).
    pub fn capabilities(&self) -> Capabilities {
        self.caps
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

    /// Accept and serve clients, one at a time in the order they connected, until stopped.
    pub fn run(&self) -> Result<(), ServerError> {
        let lobby = Lobby::default();
        std::thread::scope(|s| {
            let conn = std::thread::Builder::new()
                .name("vfio-user".into())
                .spawn_scoped(s, || self.serve_clients(&lobby))
                .map_err(ServerError::Thread)?;
            let result = self.event_loop(&lobby);
            lobby.close();
            if conn.join().is_err() {
                warn!("the connection thread panicked");
            }
            result
        })
    }

    fn event_loop(&self, lobby: &Lobby) -> Result<(), ServerError> {
        let em_err = |e: event_manager::Error| ServerError::EventLoop(e.to_string());
        let mut em: EventManager<Box<dyn MutEventSubscriber + '_>> =
            EventManager::new().map_err(em_err)?;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        em.add_subscriber(Box::new(StopWatch {
            stop: &self.stop,
            signals: &self.signals,
            done: Arc::clone(&done),
        }));
        em.add_subscriber(Box::new(Acceptor {
            listener: self.socket.listener(),
            lobby,
            max_waiting: self.options.max_waiting,
            reserve: reserve_fd(),
        }));
        if let Some(insp) = &self.inspector {
            em.add_subscriber(Box::new(InspectorService(insp)));
        }
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            match em.run() {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(em_err(e)),
            }
        }
        Ok(())
    }

    /// The connection thread: serve clients from the lobby until it closes.
    fn serve_clients(&self, lobby: &Lobby) {
        while let Some(stream) = lobby.next() {
            if matches!(self.serve_client(stream, lobby), End::Stopped) {
                return;
            }
        }
    }

    fn serve_client(&self, stream: UnixStream, lobby: &Lobby) -> End {
        if let Err(e) = configure_client(&stream, &self.options) {
            warn!(error = %e, "cannot configure the client socket; dropping it");
            return End::Io(e);
        }
        info!("client connected");
        lobby.set_current(stream.try_clone().ok());
        let limits = Limits {
            message: self.options.message_timeout,
            dma_reply: self.options.message_timeout,
        };
        let channel = match Channel::new(
            stream,
            lobby.closed_flag(),
            limits,
            Arc::clone(&self.dma_rw),
        ) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                warn!(error = %e, "cannot set up the client connection; dropping it");
                lobby.set_current(None);
                return End::Io(e);
            }
        };
        let mut conn = Connection::new(self, Arc::clone(&channel), lobby);
        let end = conn.serve();
        // DMA requests to a client that is gone fail at once from here on.
        channel.close();
        lobby.set_current(None);
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
            End::TimedOut(why) => warn!(
                reason = %why,
                mappings, irqs, "closing the connection: the client took too long; DMA mappings and interrupt eventfds dropped, device reset"
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

/// Blocking I/O with the receive tick and the send limit.
fn configure_client(stream: &UnixStream, options: &ServerOptions) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let tick = TICK
        .min(options.handshake_timeout / 4)
        .min(options.message_timeout / 4)
        .max(Duration::from_millis(10));
    stream.set_read_timeout(Some(tick))?;
    stream.set_write_timeout(Some(options.message_timeout.max(Duration::from_millis(10))))
}

/// A descriptor kept open so that, when the process is out of descriptors, one can be freed
/// to accept a client and close it (instead of leaving it queued, and the listener readable
/// forever).
fn reserve_fd() -> Option<File> {
    File::open("/dev/null").ok()
}

pub(crate) fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a failed `accept` on a non-blocking listener is to be retried: nothing was
/// queued after all, a signal came, or the client gave up before it was accepted.
pub(crate) fn accept_should_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
    )
}

/// Clients waiting for their turn, and the one being served.
#[derive(Debug, Default)]
struct Lobby {
    state: Mutex<LobbyState>,
    changed: Condvar,
    /// Set once the server stops (the connection's channel reads it too).
    closed: Arc<AtomicBool>,
}

#[derive(Debug, Default)]
struct LobbyState {
    waiting: VecDeque<UnixStream>,
    /// A second handle of the served client's socket, to shut it down on stop.
    current: Option<UnixStream>,
}

impl Lobby {
    fn lock(&self) -> MutexGuard<'_, LobbyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue a client; false (and the client is dropped) when `max` are waiting already.
    fn enqueue(&self, stream: UnixStream, max: usize) -> bool {
        let mut s = self.lock();
        if s.waiting.len() >= max {
            return false;
        }
        s.waiting.push_back(stream);
        self.changed.notify_one();
        true
    }

    /// The next client in order, waiting for one; None once closed.
    fn next(&self) -> Option<UnixStream> {
        let mut s = self.lock();
        loop {
            if self.is_closed() {
                return None;
            }
            if let Some(c) = s.waiting.pop_front() {
                return Some(c);
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn set_current(&self, stream: Option<UnixStream>) {
        self.lock().current = stream;
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn closed_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.closed)
    }

    /// Stop: no more clients; the served one's socket is shut down, which ends its
    /// blocking reads and writes at once.
    fn close(&self) {
        let mut s = self.lock();
        // Set under the lock, so `next` cannot miss it between its check and its wait.
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        s.waiting.clear();
        if let Some(c) = &s.current {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        self.changed.notify_all();
    }
}

/// The stop eventfd and the signal pipes.
struct StopWatch<'a> {
    stop: &'a EventFd,
    signals: &'a [(libc::c_int, UnixStream)],
    done: Arc<std::sync::atomic::AtomicBool>,
}

impl MutEventSubscriber for StopWatch<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        add_interest(ops, Events::new(self.stop, EventSet::IN), "stop eventfd");
        for (sig, pipe) in self.signals {
            add_interest(
                ops,
                Events::with_data(pipe, *sig as u32, EventSet::IN),
                "signal pipe",
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.stop.as_raw_fd() {
            let name = match events.data() as libc::c_int {
                libc::SIGTERM => "SIGTERM".to_string(),
                libc::SIGINT => "SIGINT".to_string(),
                n => format!("signal {n}"),
            };
            info!("received {name}; shutting down");
        }
        self.done.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Registers `events`; a failure here is a bug (a descriptor registered twice).
fn add_interest(ops: &mut EventOps, events: Events, what: &str) {
    if let Err(e) = ops.add(events) {
        warn!(error = %e, "cannot watch the {what}");
    }
}

/// Accepts clients into the lobby.
struct Acceptor<'a> {
    listener: &'a UnixListener,
    lobby: &'a Lobby,
    max_waiting: usize,
    reserve: Option<File>,
}

impl MutEventSubscriber for Acceptor<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        add_interest(ops, Events::new(self.listener, EventSet::IN), "listener");
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !self.lobby.enqueue(stream, self.max_waiting) {
                        warn!(
                            max_waiting = self.max_waiting,
                            "too many clients waiting for their turn; closing a new one"
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if accept_should_retry(&e) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    // Free the reserve, take the client off the queue and close it: the
                    // listener would stay readable (and this loop spin) otherwise.
                    warn!(error = %e, "cannot accept a client: out of file descriptors; closing it");
                    self.reserve = None;
                    drop(self.listener.accept());
                    self.reserve = reserve_fd();
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept a client");
                    return;
                }
            }
        }
    }
}

/// Serves the inspector's connections.
struct InspectorService<'a>(&'a Inspector);

impl MutEventSubscriber for InspectorService<'_> {
    fn init(&mut self, ops: &mut EventOps) {
        add_interest(
            ops,
            Events::new(self.0.listener(), EventSet::IN),
            "inspector listener",
        );
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.0.serve_pending();
    }
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
    lobby: &'s Lobby,
    channel: Arc<Channel>,
    state: ConnState,
    /// When this client's turn began (the handshake limit counts from here).
    since: Instant,
    dma: DmaMappings,
    /// INTx trigger and unmask eventfds (accepted when the device has an interrupt pin;
    /// the device never raises INTx).
    intx: Option<EventFd>,
    intx_unmask: Option<EventFd>,
    /// The reply being built: header room, then the body (kept between messages, so a
    /// register access allocates nothing).
    out: Vec<u8>,
}

impl<'s> Connection<'s> {
    fn new(server: &'s Server, channel: Arc<Channel>, lobby: &'s Lobby) -> Self {
        let remote: Arc<dyn RemoteMemory> = channel.clone();
        Self {
            server,
            lobby,
            channel,
            state: ConnState::AwaitingVersion,
            since: Instant::now(),
            dma: DmaMappings::with_limit(server.memory.clone(), server.caps.max_dma_maps as usize)
                .with_remote(remote),
            intx: None,
            intx_unmask: None,
            out: Vec::new(),
        }
    }

    /// Serve messages until the client leaves, the server stops, or the stream breaks.
    fn serve(&mut self) -> End {
        let mut spare = Vec::new();
        loop {
            let step = match self.channel.next_command(std::mem::take(&mut spare)) {
                Ok(Some(m)) => self.handle(m).map(|buf| spare = buf),
                Ok(None) if self.lobby.is_closed() => Err(End::Stopped),
                Ok(None) => Ok(()),
                Err(end) => Err(end),
            };
            if let Err(end) = step.and_then(|()| self.check_handshake()) {
                return end;
            }
        }
    }

    /// A client that has not negotiated within the handshake limit is dropped (whatever
    /// else it sends meanwhile).
    fn check_handshake(&self) -> Result<(), End> {
        let limit = self.server.options.handshake_timeout;
        if matches!(self.state, ConnState::AwaitingVersion) && self.since.elapsed() > limit {
            return Err(End::TimedOut(format!(
                "no VERSION handshake within {} ms",
                limit.as_millis()
            )));
        }
        Ok(())
    }

    /// Handle one command and send its reply; returns the payload buffer for reuse.
    fn handle(&mut self, m: Message) -> Result<Vec<u8>, End> {
        let hdr = m.hdr;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.resize(HEADER_SIZE, 0);
        let reply = match hdr.msg_type() {
            _ if m.oversized => Err(libc::E2BIG),
            FLAGS_TYPE_COMMAND if m.fds_lost => {
                warn!(
                    command = hdr.command,
                    "the kernel dropped the message's file descriptors: the server is out of descriptors"
                );
                Err(libc::EMFILE)
            }
            FLAGS_TYPE_COMMAND if m.too_many_fds => {
                warn!(
                    command = hdr.command,
                    "message carries more than {MAX_MSG_FDS} file descriptors"
                );
                Err(libc::EINVAL)
            }
            FLAGS_TYPE_COMMAND => self.dispatch(&hdr, &m.payload, m.fds, &mut out),
            t => {
                warn!(command = hdr.command, "unknown message type {t}");
                Err(libc::EINVAL)
            }
        };
        let sent = self.respond(&hdr, reply, &mut out);
        // Large buffers (a big read or write) are not kept.
        if out.capacity() <= 64 << 10 {
            self.out = out;
        }
        sent?;
        let mut payload = m.payload;
        if payload.capacity() > 64 << 10 {
            payload = Vec::new();
        }
        Ok(payload)
    }

    /// Send the reply whose body `out` holds after its header room (or the error reply)
    /// unless the client asked for none.
    fn respond(&mut self, hdr: &Header, reply: Result<(), i32>, out: &mut [u8]) -> Result<(), End> {
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
            Ok(()) => {
                reply_header(hdr, out.len()).encode_to(&mut out[..HEADER_SIZE]);
                self.channel.send(out)
            }
            Err(errno) => {
                debug!(id = hdr.id, command = hdr.command, errno, "error reply");
                // Errno values are small positive numbers.
                self.channel.send(&encode_error(hdr, errno.unsigned_abs()))
            }
        }
    }

    /// Run `f`, a command that may wait for the device's workers, with the client's DMA
    /// requests interrupted when the device reaches memory through the client: a worker
    /// waiting for a DMA reply lets go of its locks and tries again afterwards (the client
    /// may only send that reply once it has ours: QEMU serves DMA under the lock its
    /// waiting vCPU holds).
    fn interrupting_client_dma<T>(&self, f: impl FnOnce() -> T) -> T {
        if !self.dma.has_remote() {
            return f();
        }
        self.channel.set_interrupted(true);
        let r = f();
        self.channel.set_interrupted(false);
        r
    }

    /// Carry out a command; a successful reply's body is appended to `out`.
    fn dispatch(
        &mut self,
        hdr: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        out: &mut Vec<u8>,
    ) -> Result<(), i32> {
        let cmd = hdr.cmd();
        let body = if cmd == Some(Command::Version) {
            self.version(payload)?
        } else if matches!(self.state, ConnState::AwaitingVersion) {
            warn!(
                command = hdr.command,
                "command before the VERSION handshake"
            );
            return Err(libc::EINVAL);
        } else {
            match cmd {
                // The register path builds its reply in place.
                Some(Command::RegionRead) => {
                    let access = RegionAccess::parse_read(payload).map_err(malformed)?;
                    return self.region_read(access, out);
                }
                Some(Command::RegionWrite) => {
                    let (access, data) = RegionAccess::parse_write(payload).map_err(malformed)?;
                    return self.region_write(access, data, out);
                }
                _ => self.dispatch_negotiated(hdr, cmd, payload, fds)?,
            }
        };
        out.extend_from_slice(&body);
        Ok(())
    }

    /// The commands of a negotiated client but VERSION and the register accesses.
    fn dispatch_negotiated(
        &mut self,
        hdr: &Header,
        cmd: Option<Command>,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Reply {
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
            Some(Command::DeviceReset) => {
                self.interrupting_client_dma(|| lock(&self.server.device).reset());
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
        self.channel.set_max_xfer(v.caps.max_data_xfer_size.into());
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
            caps: self.server.caps,
        }
        .encode())
    }

    fn dma_map(&mut self, m: DmaMap, fds: Vec<OwnedFd>) -> Reply {
        if fds.is_empty() {
            self.channel.use_short_tick();
        }
        let fd = !fds.is_empty();
        self.dma
            .map(m.flags, m.offset, m.address, m.size, fds)
            .map_err(|e| {
                warn!(error = %e, "DMA_MAP refused");
                e.errno()
            })?;
        self.server.trace.record(|| Event::DmaMap {
            iova: m.address,
            size: m.size,
            read: m.flags & DMA_MAP_FLAG_READ != 0,
            write: m.flags & DMA_MAP_FLAG_WRITE != 0,
            fd,
        });
        Ok(Vec::new())
    }

    fn dma_unmap(&mut self, m: DmaUnmap) -> Reply {
        if m.flags & DMA_UNMAP_FLAG_ALL != 0 {
            if m.flags != DMA_UNMAP_FLAG_ALL {
                warn!(flags = m.flags, "DMA_UNMAP: unsupported flag combination");
                return Err(libc::EINVAL);
            }
            self.dma.unmap_all();
            self.server.trace.record(|| Event::DmaUnmap {
                iova: 0,
                size: u64::MAX,
            });
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
            self.server.trace.record(|| Event::DmaUnmap {
                iova: m.address,
                size: m.size,
            });
        }
        // The VMM reuses the memory as soon as it has the reply: wait until no DMA that may
        // still use the old mapping is moving. Memory the device reaches only through the
        // client needs no wait (the client checks each access itself) and must not get
        // one: a worker may be waiting for a DMA reply the client sends only after this.
        if self.dma.last_unmap_was_local() {
            self.interrupting_client_dma(|| lock(&self.server.device).dma_barrier());
        }
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

    /// REGION_READ: the reply (access header, then the data) goes straight into `out`.
    fn region_read(&mut self, a: RegionAccess, out: &mut Vec<u8>) -> Result<(), i32> {
        self.check_access(&a)?;
        a.encode_to(out);
        let at = out.len();
        out.resize(at + a.count as usize, 0);
        let data = &mut out[at..];
        {
            let mut dev = lock(&self.server.device);
            if a.region == PCI_CONFIG_REGION_INDEX {
                dev.config_read(a.offset, data);
            } else {
                dev.bar_read(a.region as usize, a.offset, data);
            }
        }
        trace!(
            region = a.region,
            offset = a.offset,
            count = a.count,
            "region read"
        );
        Ok(())
    }

    /// REGION_WRITE: the reply (the access header) goes into `out`.
    fn region_write(&mut self, a: RegionAccess, data: &[u8], out: &mut Vec<u8>) -> Result<(), i32> {
        self.check_access(&a)?;
        // A doorbell only records the tail; anything else may wait for the workers.
        let doorbell = a.region == REGS_BAR as u32
            && a.offset >= QUEUE_BASE
            && (a.offset - QUEUE_BASE) % QUEUE_STRIDE == Q_TAIL;
        let write = || {
            let mut dev = lock(&self.server.device);
            if a.region == PCI_CONFIG_REGION_INDEX {
                dev.config_write(a.offset, data);
            } else {
                dev.bar_write(a.region as usize, a.offset, data);
            }
        };
        if doorbell {
            write();
        } else {
            self.interrupting_client_dma(write);
        }
        trace!(
            region = a.region,
            offset = a.offset,
            count = a.count,
            "region write"
        );
        a.encode_to(out);
        Ok(())
    }
}

/// A malformed payload: logged, and `EINVAL` for the reply.
fn malformed(e: ProtoError) -> i32 {
    warn!(error = %e, "malformed message");
    libc::EINVAL
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
    use std::fs;

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
