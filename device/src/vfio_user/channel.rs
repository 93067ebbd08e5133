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

/// The reading half: whole messages, with the partial-message limit.
#[derive(Debug)]
struct MsgReader {
    stream: UnixStream,
    /// When the message being read started arriving in pieces.
    partial_since: Option<Instant>,
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
            reader: Mutex::new(MsgReader {
                stream,
                partial_since: None,
            }),
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
        let mut fds = Vec::new();
        let mut flags = (false, false);
        let mut hb = [0u8; HEADER_SIZE];
        match self.read_exact(&mut hb, &mut fds, &mut flags, true, closed, limits)? {
            Some(true) => {}
            Some(false) => return Err(End::Disconnected),
            None => return Ok(None),
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
        let oversized = size > MAX_MESSAGE_SIZE;
        if oversized {
            warn!(
                command = hdr.command,
                size, "message larger than {MAX_MESSAGE_SIZE} bytes; discarding it"
            );
            let mut chunk = vec![0u8; DISCARD_CHUNK.min(len)];
            let mut left = len;
            while left > 0 {
                let n = chunk.len().min(left);
                self.read_exact(&mut chunk[..n], &mut fds, &mut flags, false, closed, limits)?;
                left -= n;
            }
            payload.clear();
        } else {
            payload.clear();
            payload.resize(len, 0);
            self.read_exact(&mut payload, &mut fds, &mut flags, false, closed, limits)?;
        }
        Ok(Some(Message {
            hdr,
            payload,
            fds,
            too_many_fds: flags.0,
            fds_lost: flags.1,
            oversized,
        }))
    }

    /// Read exactly `buf.len()` bytes. At a message boundary (`at_boundary`) a clean end of
    /// stream before the first byte is `Some(false)` and an idle tick `None`.
    fn read_exact(
        &mut self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        flags: &mut (bool, bool),
        at_boundary: bool,
        closed: &AtomicBool,
        limits: Limits,
    ) -> Result<Option<bool>, End> {
        let mut got = 0;
        while got < buf.len() {
            match recv_with_fds(&self.stream, &mut buf[got..], fds, MAX_MSG_FDS as usize) {
                Ok(r) => {
                    flags.0 |= r.extra_fds;
                    flags.1 |= r.truncated;
                    if r.bytes == 0 {
                        if closed.load(Ordering::SeqCst) {
                            return Err(End::Stopped);
                        }
                        if got == 0 && at_boundary {
                            return Ok(Some(false));
                        }
                        debug!("client closed the connection in the middle of a message");
                        return Err(End::Disconnected);
                    }
                    got += r.bytes;
                    if got < buf.len() && self.partial_since.is_none() {
                        // The slow path: the message arrives in pieces; its clock starts.
                        self.partial_since = Some(Instant::now());
                    }
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        if closed.load(Ordering::SeqCst) {
                            return Err(End::Stopped);
                        }
                        if got == 0 && at_boundary {
                            return Ok(None);
                        }
                        let since = *self.partial_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > limits.message {
                            return Err(End::TimedOut(format!(
                                "a message started but was not complete within {} ms",
                                limits.message.as_millis()
                            )));
                        }
                    }
                    Some(libc::EINTR) => {}
                    Some(libc::ECONNRESET | libc::EPIPE) => return Err(End::Disconnected),
                    _ => return Err(End::Io(e)),
                },
            }
            if let Some(since) = self.partial_since {
                if since.elapsed() > limits.message {
                    return Err(End::TimedOut(format!(
                        "a message started but was not complete within {} ms",
                        limits.message.as_millis()
                    )));
                }
            }
        }
        Ok(Some(true))
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
