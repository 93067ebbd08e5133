//! One client connection's socket, shared by the connection thread (the client's commands
//! and their replies) and the device's workers (DMA_READ / DMA_WRITE to the client, for
//! memory the client mapped without a file descriptor, see [`crate::core::remote`]).
//!
//! Reading is leader/follower: whoever holds the reader reads whole messages. The
//! connection thread holds it while it waits for the next command, so in the steady state a
//! command costs the same system calls as before (blocking `recvmsg`, no `poll`). While the
//! connection thread is busy inside the device (a register write that waits for a worker,
//! say) a worker that waits for its DMA reply takes the reader itself: replies go to their
//! waiters, commands are queued in order for the connection thread. So no reply the client
//! waits for ever depends on a DMA reply (QEMU serves DMA_READ / DMA_WRITE under its big
//! lock, which the vCPU that waits for our reply holds), and no DMA reply waits for a
//! command to finish.
//!
//! Sending is under one lock, one whole message at a time.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::{debug, trace, warn};

use super::proto::*;
use crate::core::remote::{RemoteError, RemoteMemory};

/// Most descriptors Linux passes in one message (`SCM_MAX_FD`); receiving with room for
/// this many means the kernel never truncates a message's descriptors for lack of room.
pub(crate) const SCM_MAX_FD: usize = 253;
/// Chunk size when discarding an oversized message.
const DISCARD_CHUNK: usize = 64 << 10;
/// Most data in one DMA_READ / DMA_WRITE. QEMU 11.1 sends a DMA_READ reply from its main
/// loop and stalls (until the connection breaks) when the reply does not fit in the
/// socket's send buffer, so replies are kept well below the default buffer size.
pub const DMA_RW_CHUNK: usize = 64 << 10;
/// The receive tick once the device reaches memory through the client.
const SHORT_TICK: Duration = Duration::from_millis(20);

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The client closed the connection or reset it.
    Disconnected,
    /// The server was asked to stop.
    Stopped,
    /// The client broke a time limit (handshake, message, unread reply).
    TimedOut(String),
    /// The stream cannot be trusted any more (e.g. a size below the header size).
    Protocol(String),
    /// A socket error.
    Io(io::Error),
}

/// One whole message as received.
#[derive(Debug)]
pub(crate) struct Message {
    pub hdr: Header,
    /// The payload (empty for an oversized message, which was discarded).
    pub payload: Vec<u8>,
    /// Descriptors that came with it (at most [`MAX_MSG_FDS`]).
    pub fds: Vec<OwnedFd>,
    /// More than [`MAX_MSG_FDS`] descriptors came (the rest were closed).
    pub too_many_fds: bool,
    /// The kernel dropped descriptors: the server is out of them.
    pub fds_lost: bool,
    /// Larger than [`MAX_MESSAGE_SIZE`]: the payload was read and dropped.
    pub oversized: bool,
}

/// Counters of the server-to-client DMA messages (for the inspector).
#[derive(Debug, Default)]
pub struct DmaRwStats {
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// A snapshot of [`DmaRwStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DmaRwReport {
    /// Bytes read from the client with DMA_READ.
    pub read_bytes: u64,
    /// Bytes written to the client with DMA_WRITE.
    pub written_bytes: u64,
    /// DMA_READ and DMA_WRITE messages sent.
    pub requests: u64,
    /// Requests that failed (error reply, bad reply, no reply in time, aborted).
    pub errors: u64,
}

impl DmaRwStats {
    /// The counters now.
    pub fn report(&self) -> DmaRwReport {
        DmaRwReport {
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// Time limits of the connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long the rest of a started message may take.
    pub message: Duration,
    /// How long a DMA request may wait for its reply.
    pub dma_reply: Duration,
}

/// Bytes of the staging buffer: one `recvmsg` takes a whole message of up to this size,
/// header and payload together (register accesses are 32 to 40 bytes).
const STAGE_SIZE: usize = 4096;

/// The reading half: whole messages, with the partial-message limit.
///
/// Each `recvmsg` reads into a staging buffer as much as has arrived (up to
/// [`STAGE_SIZE`]), so a message sent in one piece costs one system call; a payload that
/// is already there is copied out of it (at most 4 KiB, just received), the rest of a
/// longer one is read straight into the payload. Bytes past the end of a message stay for
/// the next one (a client may send its next message before reading our reply: QEMU's
/// posted writes).
///
/// Descriptors: the kernel ends a `recvmsg` with the data of the send that carried
/// descriptors, so the descriptors of one `recvmsg` belong to the message holding the last
/// byte it returned. Each group is kept with that stream offset and handed to the message
/// whose end is at or past it.
#[derive(Debug)]
struct MsgReader {
    stream: UnixStream,
    /// When the message being read started arriving in pieces.
    partial_since: Option<Instant>,
    /// Received and not yet handed out: `stage[lo..hi]`.
    stage: Box<[u8]>,
    lo: usize,
    hi: usize,
    /// Bytes received on the connection so far (the stream offset of `stage[hi]`, or of
    /// the byte after a direct read).
    received: u64,
    /// Descriptors (and their flags) received, by the stream offset their data ended at.
    fd_groups: VecDeque<FdGroup>,
}

/// What one `recvmsg` brought besides data.
#[derive(Debug)]
struct FdGroup {
    /// Stream offset just past the last byte of that `recvmsg`.
    end: u64,
    fds: Vec<OwnedFd>,
    /// More than the limit arrived (the rest were closed).
    extra: bool,
    /// The kernel dropped descriptors (`MSG_CTRUNC`).
    truncated: bool,
}

impl MsgReader {
    fn new(stream: UnixStream) -> Self {
        MsgReader {
            stream,
            partial_since: None,
            stage: vec![0; STAGE_SIZE].into_boxed_slice(),
            lo: 0,
            hi: 0,
            received: 0,
            fd_groups: VecDeque::new(),
        }
    }
}

enum Waiter {
    Waiting,
    Done(Result<(Header, Vec<u8>), RemoteError>),
}

/// A client connection's socket (see the module docs).
pub(crate) struct Channel {
    reader: Mutex<MsgReader>,
    writer: UnixStream,
    send_lock: Mutex<()>,
    /// Commands a worker read while the connection thread was busy, in order.
    backlog: Mutex<VecDeque<Message>>,
    pending: Mutex<HashMap<u16, Waiter>>,
    replied: Condvar,
    next_id: AtomicU16,
    /// Set while DMA requests are interrupted (a command that may wait for the device).
    aborted: AtomicBool,
    /// The connection is over.
    gone: AtomicBool,
    /// The receive tick is [`SHORT_TICK`].
    short_tick: AtomicBool,
    /// The server is stopping.
    closed: Arc<AtomicBool>,
    /// Largest DMA_READ / DMA_WRITE data: the client's `max_data_xfer_size`, at most ours.
    max_xfer: AtomicUsize,
    limits: Limits,
    stats: Arc<DmaRwStats>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("fd", &self.writer.as_raw_fd())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Channel {
    /// A channel over `stream` (configured: blocking, receive tick, send limit).
    pub fn new(
        stream: UnixStream,
        closed: Arc<AtomicBool>,
        limits: Limits,
        stats: Arc<DmaRwStats>,
    ) -> io::Result<Self> {
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: Mutex::new(MsgReader::new(stream)),
            writer,
            send_lock: Mutex::new(()),
            backlog: Mutex::new(VecDeque::new()),
            pending: Mutex::new(HashMap::new()),
            replied: Condvar::new(),
            next_id: AtomicU16::new(0x8000),
            aborted: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            short_tick: AtomicBool::new(false),
            closed,
            max_xfer: AtomicUsize::new(DMA_RW_CHUNK),
            limits,
            stats,
        })
    }

    /// The client's `max_data_xfer_size` (from VERSION): DMA data per message, at most
    /// [`DMA_RW_CHUNK`].
    pub fn set_max_xfer(&self, client: u64) {
        let n = client.clamp(4096, DMA_RW_CHUNK as u64);
        // At most MAX_DATA_XFER_SIZE.
        self.max_xfer.store(n as usize, Ordering::Relaxed);
    }

    /// Interrupt DMA requests (`true`: pending and new ones end with
    /// [`RemoteError::Interrupted`], which the device retries once it has let go of its
    /// locks) or let them run again.
    pub fn set_interrupted(&self, on: bool) {
        self.aborted.store(on, Ordering::SeqCst);
        if on {
            self.fail_pending(RemoteError::Interrupted);
        }
    }

    /// The connection is over: every DMA request fails from now on.
    pub fn close(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.fail_pending(RemoteError::Gone);
    }

    fn fail_pending(&self, e: RemoteError) {
        let mut p = lock(&self.pending);
        for w in p.values_mut() {
            if matches!(w, Waiter::Waiting) {
                *w = Waiter::Done(Err(e.clone()));
            }
        }
        self.replied.notify_all();
    }

    /// A short receive tick, once the device reaches memory through the client: a worker
    /// that reads the socket while waiting for its reply then notices an interruption
    /// within the tick.
    pub fn use_short_tick(&self) {
        if !self.short_tick.swap(true, Ordering::Relaxed) {
            if let Err(e) = self.writer.set_read_timeout(Some(SHORT_TICK)) {
                warn!(error = %e, "cannot shorten the receive tick");
            }
        }
    }

    /// The next command for the connection thread: one a worker queued, else the next
    /// from the socket (replies read meanwhile go to their waiters). `Ok(None)` on an idle
    /// receive tick. `recycled` is a spent payload buffer to reuse.
    pub fn next_command(&self, recycled: Vec<u8>) -> Result<Option<Message>, End> {
        let mut buf = recycled;
        loop {
            if let Some(m) = lock(&self.backlog).pop_front() {
                return Ok(Some(m));
            }
            let mut rd = match self.reader.try_lock() {
                Ok(rd) => rd,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    // A worker reads (waiting for its DMA reply): it queues the commands it
                    // reads and says so; this thread serves them meanwhile.
                    let p = lock(&self.pending);
                    if lock(&self.backlog).is_empty() {
                        let _ = self
                            .replied
                            .wait_timeout(p, Duration::from_millis(2))
                            .unwrap_or_else(|e| e.into_inner());
                    }
                    continue;
                }
            };
            // A worker may have queued one while this thread took the reader.
            if let Some(m) = lock(&self.backlog).pop_front() {
                return Ok(Some(m));
            }
            match rd.read_message(std::mem::take(&mut buf), &self.closed, self.limits)? {
                None => return Ok(None),
                Some(m) if m.hdr.msg_type() == FLAGS_TYPE_REPLY => {
                    drop(rd);
                    buf = self.complete(m);
                }
                Some(m) => return Ok(Some(m)),
            }
        }
    }

    /// A reply to one of our requests: hand it to its waiter. Returns the payload buffer
    /// when nobody took it.
    fn complete(&self, m: Message) -> Vec<u8> {
        let mut p = lock(&self.pending);
        match p.get_mut(&m.hdr.id) {
            Some(w @ Waiter::Waiting) => {
                let result = if m.hdr.flags & FLAGS_ERROR != 0 {
                    Err(RemoteError::Refused(m.hdr.error))
                } else {
                    Ok((m.hdr, m.payload))
                };
                *w = Waiter::Done(result);
                self.replied.notify_all();
                Vec::new()
            }
            _ => {
                debug!(
                    id = m.hdr.id,
                    command = m.hdr.command,
                    "a reply nobody waits for (late, or never asked); dropped"
                );
                m.payload
            }
        }
    }

    /// Send one whole message.
    pub fn send(&self, bytes: &[u8]) -> Result<(), End> {
        let _g = lock(&self.send_lock);
        let mut off = 0;
        while off < bytes.len() {
            let rest = &bytes[off..];
            // SAFETY: `rest` is a valid buffer of `rest.len()` bytes for the whole call.
            // MSG_NOSIGNAL: a client that has gone gives EPIPE, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.writer.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        return Err(End::TimedOut(format!(
                            "the client did not read what it was sent for {} ms",
                            self.limits.message.as_millis()
                        )))
                    }
                    Some(libc::EPIPE | libc::ECONNRESET) if self.closed.load(Ordering::SeqCst) => {
                        return Err(End::Stopped)
                    }
                    Some(libc::EPIPE | libc::ECONNRESET) => return Err(End::Disconnected),
                    _ => return Err(End::Io(e)),
                }
            }
            // n >= 0 here.
            off += n as usize;
        }
        Ok(())
    }

    /// Send a DMA request and wait (bounded) for its reply, reading the socket meanwhile
    /// when nobody else is.
    fn request(
        &self,
        command: Command,
        fixed: DmaRw,
        data: &[u8],
    ) -> Result<(Header, Vec<u8>), RemoteError> {
        if self.gone.load(Ordering::SeqCst) || self.closed.load(Ordering::SeqCst) {
            return Err(RemoteError::Gone);
        }
        if self.aborted.load(Ordering::SeqCst) {
            return Err(RemoteError::Interrupted);
        }
        let id = {
            let mut p = lock(&self.pending);
            let mut id = self.next_id.fetch_add(1, Ordering::Relaxed);
            while p.contains_key(&id) {
                id = self.next_id.fetch_add(1, Ordering::Relaxed);
            }
            p.insert(id, Waiter::Waiting);
            id
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let msg = encode_command(id, command as u16, 0, &fixed.encode(data));
        trace!(
            id,
            ?command,
            address = format_args!("{:#x}", fixed.address),
            count = fixed.count,
            thread = std::thread::current().name().unwrap_or("?"),
            "DMA request to the client"
        );
        let result = match self.send(&msg) {
            Ok(()) => self.wait(id),
            Err(e) => {
                debug!(error = ?e, "cannot send a DMA request");
                Err(RemoteError::Gone)
            }
        };
        lock(&self.pending).remove(&id);
        if matches!(&result, Err(e) if *e != RemoteError::Interrupted) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn wait(&self, id: u16) -> Result<(Header, Vec<u8>), RemoteError> {
        let deadline = Instant::now() + self.limits.dma_reply;
        loop {
            {
                let mut p = lock(&self.pending);
                if let Some(Waiter::Done(_)) = p.get(&id) {
                    if let Some(Waiter::Done(r)) = p.remove(&id) {
                        return r;
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(RemoteError::Timeout(self.limits.dma_reply));
            }
            match self.reader.try_lock() {
                Ok(mut rd) => {
                    // Nobody reads: this thread does, until its reply is in.
                    match rd.read_message(Vec::new(), &self.closed, self.limits) {
                        Ok(None) => {}
                        Ok(Some(m)) if m.hdr.msg_type() == FLAGS_TYPE_REPLY => {
                            drop(rd);
                            self.complete(m);
                        }
                        Ok(Some(m)) => {
                            // A command: the connection thread's (it may be waiting for the
                            // reader, or busy; either way it finds it queued).
                            lock(&self.backlog).push_back(m);
                            drop(rd);
                            let _p = lock(&self.pending);
                            self.replied.notify_all();
                        }
                        Err(e) => {
                            debug!(error = ?e, "the connection failed while waiting for a DMA reply");
                            return Err(RemoteError::Gone);
                        }
                    }
                }
                Err(_) => {
                    // Someone reads and will hand the reply over.
                    let p = lock(&self.pending);
                    if matches!(p.get(&id), Some(Waiter::Waiting)) {
                        let _ = self
                            .replied
                            .wait_timeout(p, Duration::from_millis(5))
                            .unwrap_or_else(|e| e.into_inner());
                    }
                }
            }
        }
    }

    fn check_reply(
        command: Command,
        fixed: DmaRw,
        hdr: &Header,
        payload: &[u8],
        data_len: usize,
    ) -> Result<(), RemoteError> {
        if hdr.command != command as u16 {
            return Err(RemoteError::BadReply(format!(
                "reply to {command:?} names command {}",
                hdr.command
            )));
        }
        let (echo, data) =
            DmaRw::parse(payload).map_err(|e| RemoteError::BadReply(e.to_string()))?;
        if echo != fixed || data.len() != data_len {
            return Err(RemoteError::BadReply(format!(
                "asked {:#x}+{}, reply says {:#x}+{} with {} data bytes",
                fixed.address,
                fixed.count,
                echo.address,
                echo.count,
                data.len()
            )));
        }
        Ok(())
    }
}

impl RemoteMemory for Channel {
    fn read(&self, bus: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let max = self.max_xfer.load(Ordering::Relaxed);
        for (i, chunk) in buf.chunks_mut(max).enumerate() {
            let fixed = DmaRw {
                address: bus + (i * max) as u64,
                count: chunk.len() as u64,
            };
            let (hdr, payload) = self.request(Command::DmaRead, fixed, &[])?;
            Self::check_reply(Command::DmaRead, fixed, &hdr, &payload, chunk.len()).inspect_err(
                |e| {
                    warn!(error = %e, "bad DMA_READ reply");
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                },
            )?;
            chunk.copy_from_slice(&payload[DmaRw::SIZE..]);
            self.stats
                .read_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write(&self, bus: u64, data: &[u8]) -> Result<(), RemoteError> {
        let max = self.max_xfer.load(Ordering::Relaxed);
        for (i, chunk) in data.chunks(max).enumerate() {
            let fixed = DmaRw {
                address: bus + (i * max) as u64,
                count: chunk.len() as u64,
            };
            let (hdr, payload) = self.request(Command::DmaWrite, fixed, chunk)?;
            Self::check_reply(Command::DmaWrite, fixed, &hdr, &payload, 0).inspect_err(|e| {
                warn!(error = %e, "bad DMA_WRITE reply");
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            })?;
            self.stats
                .written_bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl MsgReader {
    /// Read one whole message. `Ok(None)` on a receive tick with nothing started; a started
    /// message must be complete within the message limit.
    fn read_message(
        &mut self,
        mut payload: Vec<u8>,
        closed: &AtomicBool,
        limits: Limits,
    ) -> Result<Option<Message>, End> {
        self.partial_since = None;
        let start = self.received - (self.hi - self.lo) as u64;
        match self.fill(HEADER_SIZE, closed, limits)? {
            Some(true) => {}
            Some(false) => return Err(End::Disconnected),
            None => return Ok(None),
        }
        let hb: &[u8; HEADER_SIZE] = self.stage[self.lo..self.lo + HEADER_SIZE]
            .try_into()
            .expect("HEADER_SIZE bytes");
        let hdr = Header::parse(hb);
        self.lo += HEADER_SIZE;
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
        let oversized = size > MAX_MESSAGE_SIZE;
        // What of the payload has arrived with the header.
        let staged = len.min(self.hi - self.lo);
        payload.clear();
        if oversized {
            warn!(
                command = hdr.command,
                size, "message larger than {MAX_MESSAGE_SIZE} bytes; discarding it"
            );
            self.lo += staged;
            let mut chunk = vec![0u8; DISCARD_CHUNK.min(len)];
            let mut left = len - staged;
            while left > 0 {
                let n = chunk.len().min(left);
                self.read_direct(&mut chunk[..n], closed, limits)?;
                left -= n;
            }
        } else {
            payload.resize(len, 0);
            payload[..staged].copy_from_slice(&self.stage[self.lo..self.lo + staged]);
            self.lo += staged;
            if staged < len {
                self.read_direct(&mut payload[staged..], closed, limits)?;
            }
        }
        // The descriptors that came with this message's bytes.
        let end = start + size as u64;
        let mut fds = Vec::new();
        let (mut too_many_fds, mut fds_lost) = (false, false);
        while self.fd_groups.front().is_some_and(|g| g.end <= end) {
            let g = self.fd_groups.pop_front().expect("checked");
            too_many_fds |= g.extra;
            fds_lost |= g.truncated;
            for fd in g.fds {
                if fds.len() < MAX_MSG_FDS as usize {
                    fds.push(fd);
                } else {
                    too_many_fds = true;
                }
            }
        }
        trace!(
            id = hdr.id,
            command = hdr.command,
            size = hdr.size,
            flags = hdr.flags,
            fds = fds.len(),
            "message"
        );
        Ok(Some(Message {
            hdr,
            payload,
            fds,
            too_many_fds,
            fds_lost,
            oversized,
        }))
    }

    /// Receive until `stage[lo..hi]` holds at least `need` (at most [`STAGE_SIZE`]) bytes.
    /// With nothing staged, a clean end of stream is `Some(false)` and an idle tick `None`.
    fn fill(
        &mut self,
        need: usize,
        closed: &AtomicBool,
        limits: Limits,
    ) -> Result<Option<bool>, End> {
        debug_assert!(need <= STAGE_SIZE);
        let at_boundary = self.lo == self.hi;
        if at_boundary {
            (self.lo, self.hi) = (0, 0);
        }
        while self.hi - self.lo < need {
            if self.lo > 0 && self.hi == STAGE_SIZE {
                self.stage.copy_within(self.lo..self.hi, 0);
                (self.lo, self.hi) = (0, self.hi - self.lo);
            }
            let (lo, hi) = (self.lo, self.hi);
            let mut stage = std::mem::take(&mut self.stage);
            let r = self.recv(&mut stage[hi..], hi == lo && at_boundary, closed, limits);
            self.stage = stage;
            match r? {
                Some(0) => return Ok(Some(false)),
                Some(n) => self.hi += n,
                None => return Ok(None),
            }
            if self.hi - self.lo < need {
                // The slow path: the message arrives in pieces; its clock starts.
                self.partial_since.get_or_insert_with(Instant::now);
                self.check_partial(limits)?;
            }
        }
        Ok(Some(true))
    }

    /// Read exactly `buf.len()` bytes of the message being read, past the staging buffer.
    fn read_direct(
        &mut self,
        buf: &mut [u8],
        closed: &AtomicBool,
        limits: Limits,
    ) -> Result<(), End> {
        // The payload did not come with the header: the message arrives in pieces.
        self.partial_since.get_or_insert_with(Instant::now);
        let mut got = 0;
        while got < buf.len() {
            // In the middle of a message `recv` returns data or an error, never a tick.
            if let Some(n) = self.recv(&mut buf[got..], false, closed, limits)? {
                got += n;
            }
            self.check_partial(limits)?;
        }
        Ok(())
    }

    /// One `recvmsg` into `buf`: `Some(n)` bytes (`Some(0)`: the client closed at a message
    /// boundary), `None`: an idle tick at a boundary. In the middle of a message, a tick
    /// goes on waiting until the message limit, and an end of stream is a disconnection.
    fn recv(
        &mut self,
        buf: &mut [u8],
        at_boundary: bool,
        closed: &AtomicBool,
        limits: Limits,
    ) -> Result<Option<usize>, End> {
        loop {
            let mut fds = Vec::new();
            match recv_with_fds(&self.stream, buf, &mut fds, MAX_MSG_FDS as usize) {
                Ok(r) => {
                    self.received += r.bytes as u64;
                    if !fds.is_empty() || r.extra_fds || r.truncated {
                        self.fd_groups.push_back(FdGroup {
                            end: self.received,
                            fds,
                            extra: r.extra_fds,
                            truncated: r.truncated,
                        });
                    }
                    if r.bytes == 0 {
                        if closed.load(Ordering::SeqCst) {
                            return Err(End::Stopped);
                        }
                        if at_boundary {
                            return Ok(Some(0));
                        }
                        debug!("client closed the connection in the middle of a message");
                        return Err(End::Disconnected);
                    }
                    return Ok(Some(r.bytes));
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        if closed.load(Ordering::SeqCst) {
                            return Err(End::Stopped);
                        }
                        if at_boundary {
                            return Ok(None);
                        }
                        self.partial_since.get_or_insert_with(Instant::now);
                    }
                    Some(libc::EINTR) => {}
                    Some(libc::ECONNRESET | libc::EPIPE) => return Err(End::Disconnected),
                    _ => return Err(End::Io(e)),
                },
            }
            self.check_partial(limits)?;
        }
    }

    fn check_partial(&self, limits: Limits) -> Result<(), End> {
        match self.partial_since {
            Some(since) if since.elapsed() > limits.message => Err(End::TimedOut(format!(
                "a message started but was not complete within {} ms",
                limits.message.as_millis()
            ))),
            _ => Ok(()),
        }
    }
}

/// What one [`recv_with_fds`] got.
#[derive(Debug)]
struct Received {
    /// Data bytes (0: end of stream).
    bytes: usize,
    /// Descriptors beyond the caller's limit arrived (and were closed).
    extra_fds: bool,
    /// The kernel dropped descriptors (`MSG_CTRUNC`: the process is out of descriptors).
    truncated: bool,
}

/// One `recvmsg` of data and `SCM_RIGHTS` descriptors (close-on-exec atomically), keeping
/// at most `max_fds` in `fds` in total.
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> io::Result<Received> {
    // Room for SCM_MAX_FD descriptors: the kernel never drops any for lack of room.
    const CMSG_ROOM: usize = 64 + SCM_MAX_FD * std::mem::size_of::<RawFd>();
    let mut cmsg = [0u64; CMSG_ROOM / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: `msg` points at `iov` (describing `buf`, valid for writes of its length) and
    // at `cmsg` (valid for writes of msg_controllen bytes), all alive for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut extra_fds = false;
    // SAFETY: `msg` was filled in by recvmsg; the CMSG_* helpers walk the control buffer
    // within msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` points at a complete cmsghdr inside the control buffer.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a constant computation.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (h.cmsg_len as usize).saturating_sub(header) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of an SCM_RIGHTS message is `count` descriptors.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`: the pointer stays inside the data.
                let p = unsafe { data.add(i) };
                // SAFETY: `p` points at one descriptor; the buffer may be unaligned.
                let raw = unsafe { p.read_unaligned() };
                // SAFETY: the kernel just installed this descriptor in our table; nothing
                // else refers to it, so we take ownership.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                if fds.len() < max_fds {
                    fds.push(fd);
                } else {
                    extra_fds = true;
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    Ok(Received {
        bytes: n as usize,
        extra_fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vmm_sys_util::eventfd::EventFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::*;

    const LIMITS: Limits = Limits {
        message: Duration::from_secs(2),
        dma_reply: Duration::from_secs(2),
    };

    /// A reader over one end of a socket pair (receive ticks of 10 ms), and the other end.
    fn pair() -> (MsgReader, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        (MsgReader::new(a), b)
    }

    fn read(r: &mut MsgReader) -> Message {
        let closed = AtomicBool::new(false);
        loop {
            if let Some(m) = r.read_message(Vec::new(), &closed, LIMITS).unwrap() {
                return m;
            }
        }
    }

    #[test]
    fn messages_sent_before_any_is_read_come_one_by_one_with_their_own_descriptors() {
        let (mut r, tx) = pair();
        let efd = EventFd::new(0).unwrap();
        let a = encode_command(1, Command::RegionRead as u16, 0, &[1; 16]);
        let b = encode_command(2, Command::DmaMap as u16, 0, &[2; 32]);
        let c = encode_command(3, Command::RegionWrite as u16, 0, &[3; 20]);
        tx.send_with_fds(&[&a[..]], &[]).unwrap();
        tx.send_with_fds(&[&b[..]], &[efd.as_raw_fd()]).unwrap();
        tx.send_with_fds(&[&c[..]], &[]).unwrap();
        for (want, fds) in [(&a, 0), (&b, 1), (&c, 0)] {
            let m = read(&mut r);
            assert_eq!(m.hdr.id, u16::from_le_bytes([want[0], want[1]]));
            assert_eq!(m.payload, want[HEADER_SIZE..], "message {}", m.hdr.id);
            assert_eq!(m.fds.len(), fds, "descriptors of message {}", m.hdr.id);
        }
        assert_eq!((r.lo, r.hi), (r.hi, r.hi), "nothing left over");
        assert!(r.fd_groups.is_empty());
    }

    #[test]
    fn a_message_longer_than_the_staging_buffer_is_read_whole() {
        let (mut r, mut tx) = pair();
        let payload: Vec<u8> = (0..3 * STAGE_SIZE + 7).map(|i| (i * 7) as u8).collect();
        let m1 = encode_command(1, Command::RegionWrite as u16, 0, &payload);
        let m2 = encode_command(2, Command::RegionRead as u16, 0, &[9; 16]);
        let writer = std::thread::spawn(move || {
            tx.write_all(&m1).unwrap();
            tx.write_all(&m2).unwrap();
            tx
        });
        let m = read(&mut r);
        assert_eq!(m.payload, payload);
        let m = read(&mut r);
        assert_eq!((m.hdr.id, &m.payload[..]), (2, &[9u8; 16][..]));
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_message_sent_in_pieces_is_put_together() {
        let (mut r, mut tx) = pair();
        let m = encode_command(5, Command::RegionWrite as u16, 0, &[0xab; 40]);
        let pieces = [&m[..3], &m[3..17], &m[17..30], &m[30..]];
        let owned: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = std::thread::spawn(move || {
            for p in owned {
                tx.write_all(&p).unwrap();
                std::thread::sleep(Duration::from_millis(15));
            }
            tx
        });
        let got = read(&mut r);
        assert_eq!((got.hdr.id, &got.payload[..]), (5, &[0xab; 40][..]));
        assert!(r.partial_since.is_some(), "the message arrived in pieces");
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_message_left_unfinished_times_out() {
        let (mut r, mut tx) = pair();
        let m = encode_command(5, Command::RegionWrite as u16, 0, &[0xab; 40]);
        tx.write_all(&m[..20]).unwrap();
        let closed = AtomicBool::new(false);
        let limits = Limits {
            message: Duration::from_millis(50),
            ..LIMITS
        };
        let start = Instant::now();
        let end = loop {
            match r.read_message(Vec::new(), &closed, limits) {
                Ok(None) => continue,
                Ok(Some(m)) => panic!("a whole message from half of one: {:?}", m.hdr),
                Err(e) => break e,
            }
        };
        assert!(matches!(end, End::TimedOut(_)), "{end:?}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
