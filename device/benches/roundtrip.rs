//! Round trips through the real `domdma-device` server over its UNIX socket, each beside a
//! bare UNIX-socket ping-pong of the same message sizes measured in the same run.
//!
//! - **Register read / write:** `REGION_READ` of 4 bytes of BAR0 (32-byte request, 36-byte
//!   reply) and `REGION_WRITE` of 4 bytes (36 / 32), sent by a minimal client: one `send`
//!   of the whole request, then `recv` until the reply's size. The same client talks to the
//!   **bare peer**, a separate process that answers every message with one `recv` and one
//!   `send` of a reply of the size the request names (in the header's error field,
//!   reserved in commands), so the ratio server / bare is what the server adds to the
//!   kernel's socket path and the two wake-ups.
//! - **Doorbell to interrupt:** the driver model's vfio-user back end programs queue 0 with
//!   MSI-X vector 0; each sample pushes a 64-byte COPY that asks for an interrupt, then
//!   times from just before the doorbell (`REGION_WRITE` of `Q_TAIL`) to the moment a
//!   thread blocked on the vector's eventfd wakes. Its baseline is the bare ping-pong of
//!   the doorbell's sizes (36 / 32). The doorbell is a posted write (no reply), as QEMU
//!   sends BAR writes.
//! - **Doorbell, in-process:** the same with the device core in this process (the
//!   in-process back end: no socket, the waiter woken through a condition variable): the
//!   floor a doorbell path that avoided the socket (a polled shared page) could reach,
//!   measured beside the socket path for the choice in device/DESIGN.md.
//!
//! Rounds interleave the subjects (server first in even rounds, bare first in odd ones);
//! each round gives a p50 and p99 per subject, and the report gives the median over the
//! rounds of each, and of the per-round ratio to the bare p50 (with its range). A 2-vCPU
//! VM has two latency regimes (a busy vCPU answers fast, an idle one wakes slowly): the
//! interleaving and the medians are what make two figures comparable.
//!
//! Run it as `scripts/bench --roundtrip`, or
//! `cargo bench -p domdma-device --bench roundtrip -- --help` for the options. Without
//! `--bench` (under `cargo test`: `test = true` in Cargo.toml) it is a smoke test: a short
//! run whose register values and completions must be right.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use domdma_device::spec::{self, Descriptor, REGS_BAR};
use domdma_device::vfio_user::proto::{
    encode_command, Capabilities, Command, Header, RegionAccess, Version, FLAGS_ERROR,
    FLAGS_TYPE_REPLY, HEADER_SIZE,
};
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig};
use domdma_driver_model::backend::{DmaBackend, DmaRequest};
use domdma_driver_model::dma_queue::{CompletionRecords, DmaQueue, QueueConfig};
use domdma_testkit::check::Failure;
use domdma_testkit::fixtures::fresh;
use domdma_testkit::launcher::{Launch, DEFAULT_STOP_GRACE};

const USAGE: &str = "\
Usage: cargo bench -p domdma-device --bench roundtrip -- [OPTIONS]
  --rounds N      interleaved rounds (default 7)
  --samples N     round trips per subject and round (default 20000; doorbells: a tenth)
  --json FILE     also write every round's figures as JSON
  --only WHAT     only `registers` or only `doorbell`
  --server PATH   use the server already listening at PATH instead of starting one
                  (e.g. one run under `strace -c -f` to count system calls)
  --help          this text";

/// Bytes a register access carries.
const REG_BYTES: u32 = 4;
/// Bytes each doorbell's COPY moves.
const COPY_BYTES: u32 = 64;
/// Ring size of the doorbell queue.
const RING: u32 = 64;
/// Longest wait for a reply, an interrupt or the bare peer.
const STUCK: Duration = Duration::from_secs(10);
/// What the bare peer is told to do when started by this binary.
const PEER_ARG: &str = "--bare-peer";

#[derive(Debug, Clone)]
struct Options {
    rounds: usize,
    samples: usize,
    json: Option<PathBuf>,
    server: Option<PathBuf>,
    only: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rounds: 7,
            samples: 20_000,
            json: None,
            server: None,
            only: None,
        }
    }
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    let number = |v: Option<&String>, what: &str| -> Result<usize, String> {
        v.and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{what} takes a positive number, e.g. {what} 5"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" => {}
            "--rounds" => o.rounds = number(it.next(), "--rounds")?,
            "--samples" => o.samples = number(it.next(), "--samples")?,
            "--json" => {
                o.json = Some(
                    it.next()
                        .ok_or("--json takes a file name, e.g. --json roundtrip.json")?
                        .into(),
                )
            }
            "--only" => match it.next().map(String::as_str) {
                Some(w @ ("registers" | "doorbell")) => o.only = Some(w.to_string()),
                _ => return Err("--only takes `registers` or `doorbell`".into()),
            },
            "--server" => {
                o.server = Some(
                    it.next()
                        .ok_or("--server takes a socket path, e.g. --server /tmp/domdma.sock")?
                        .into(),
                )
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    Ok(o)
}

// ---- the client ------------------------------------------------------------------------

/// A minimal vfio-user client: one `send` per request, `recv` until the reply is whole.
struct RawClient {
    s: UnixStream,
    buf: Vec<u8>,
}

impl RawClient {
    fn new(s: UnixStream) -> io::Result<Self> {
        s.set_read_timeout(Some(STUCK))?;
        s.set_write_timeout(Some(STUCK))?;
        Ok(RawClient {
            s,
            buf: vec![0; 64 << 10],
        })
    }

    /// Sends `req` and returns the reply (header included).
    fn call(&mut self, req: &[u8]) -> io::Result<&[u8]> {
        self.s.write_all(req)?;
        let mut got = 0;
        loop {
            let n = self.s.read(&mut self.buf[got..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
            got += n;
            if got >= HEADER_SIZE {
                let hdr = Header::parse(self.buf[..HEADER_SIZE].try_into().expect("16 bytes"));
                let size = hdr.size as usize;
                if size < HEADER_SIZE || size > self.buf.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("reply of {size} bytes"),
                    ));
                }
                if got >= size {
                    return Ok(&self.buf[..size]);
                }
            }
        }
    }

    /// `call`, then checks that the reply is a successful reply of `len` bytes.
    fn expect(&mut self, req: &[u8], len: usize) -> Result<&[u8], Failure> {
        let reply = self
            .call(req)
            .map_err(|e| Failure(format!("round trip: {e}")))?;
        let hdr = Header::parse(reply[..HEADER_SIZE].try_into().expect("16 bytes"));
        if hdr.flags & FLAGS_ERROR != 0 || hdr.flags & FLAGS_TYPE_REPLY == 0 {
            return Err(Failure(format!("error reply: {hdr:?}")));
        }
        if reply.len() != len {
            return Err(Failure(format!(
                "reply of {} bytes, {len} expected",
                reply.len()
            )));
        }
        Ok(reply)
    }
}

/// A command message asking the bare peer for a reply of `reply_len` bytes.
fn for_bare(mut msg: Vec<u8>, reply_len: usize) -> Vec<u8> {
    let mut hdr = Header::parse(msg[..HEADER_SIZE].try_into().expect("16 bytes"));
    hdr.error = reply_len as u32;
    msg[..HEADER_SIZE].copy_from_slice(&hdr.encode());
    msg
}

/// The bare peer (a process of its own): answers each message with a reply of the size
/// its header's error field names, until the connection closes.
fn bare_peer(path: &Path) -> io::Result<()> {
    let mut s = UnixStream::connect(path)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut reply = vec![0u8; 64 << 10];
    loop {
        let mut got = 0;
        let size = loop {
            let n = s.read(&mut buf[got..])?;
            if n == 0 {
                return Ok(());
            }
            got += n;
            if got >= HEADER_SIZE {
                let hdr = Header::parse(buf[..HEADER_SIZE].try_into().expect("16 bytes"));
                let size = (hdr.size as usize).clamp(HEADER_SIZE, buf.len());
                if got >= size {
                    break hdr;
                }
            }
        };
        let len = (size.error as usize).clamp(HEADER_SIZE, reply.len());
        let hdr = Header {
            size: len as u32,
            flags: FLAGS_TYPE_REPLY,
            error: 0,
            ..size
        };
        reply[..HEADER_SIZE].copy_from_slice(&hdr.encode());
        s.write_all(&reply[..len])?;
    }
}

/// The bare peer process and our connection to it.
struct Bare {
    child: Child,
    client: RawClient,
}

impl Bare {
    fn start(dir: &Path) -> Result<Self, Failure> {
        let path = dir.join("bare.sock");
        let listener = UnixListener::bind(&path)
            .map_err(|e| Failure(format!("binding {}: {e}", path.display())))?;
        let exe = std::env::current_exe().map_err(|e| Failure(format!("current_exe: {e}")))?;
        let child = Process::new(exe)
            .arg(PEER_ARG)
            .arg(&path)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| Failure(format!("starting the bare peer: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Failure(e.to_string()))?;
        let start = Instant::now();
        let s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < STUCK => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(Failure(format!("the bare peer did not connect: {e}"))),
            }
        };
        s.set_nonblocking(false)
            .map_err(|e| Failure(e.to_string()))?;
        let client = RawClient::new(s).map_err(|e| Failure(e.to_string()))?;
        Ok(Bare { child, client })
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let _ = self.client.s.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

// ---- statistics --------------------------------------------------------------------------

/// Quantiles kept of each round for the distribution plots of the report: every 2% from
/// 0 to 98%, then 99% and 99.9%.
fn cdf_quantiles() -> impl Iterator<Item = f64> {
    (0..50).map(|i| f64::from(i) / 50.0).chain([0.99, 0.999])
}

/// p50 and p99 of one subject in one round, in nanoseconds, and its distribution.
#[derive(Debug, Clone, Default)]
struct Round {
    p50: f64,
    p99: f64,
    /// `(quantile, ns)` at [`cdf_quantiles`].
    cdf: Vec<(f64, f64)>,
}

impl Round {
    fn of(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64;
        Round {
            p50: at(0.50),
            p99: at(0.99),
            cdf: cdf_quantiles().map(|q| (q, at(q))).collect(),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One comparison: a subject against the bare ping-pong of its sizes, round by round.
#[derive(Debug, Clone)]
struct Pair {
    name: &'static str,
    sizes: (usize, usize),
    subject: Vec<Round>,
    bare: Vec<Round>,
}

impl Pair {
    fn new(name: &'static str, sizes: (usize, usize)) -> Self {
        Pair {
            name,
            sizes,
            subject: Vec::new(),
            bare: Vec::new(),
        }
    }

    fn ratios(&self, f: fn(&Round) -> f64) -> Vec<f64> {
        self.subject
            .iter()
            .zip(&self.bare)
            .map(|(s, b)| f(s) / f(b))
            .collect()
    }

    fn line(&self, out: &mut String) {
        let med = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect()) / 1e3;
        let p50 = |r: &Round| r.p50;
        let p99 = |r: &Round| r.p99;
        let r50 = self.ratios(p50);
        let r99 = self.ratios(p99);
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{lo:.2}-{hi:.2}")
        };
        let _ = writeln!(
            out,
            "{:<22} {:>4}/{:<4} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:<19} {:<19}",
            self.name,
            self.sizes.0,
            self.sizes.1,
            med(&self.subject, p50),
            med(&self.bare, p50),
            med(&self.subject, p99),
            med(&self.bare, p99),
            format!("{:.3} ({})", median(r50.clone()), range(&r50)),
            format!("{:.3} ({})", median(r99.clone()), range(&r99)),
        );
    }

    /// Every round's figures (p50, p99 and the quantiles of [`cdf_quantiles`]) and the
    /// median ratios; `domdma-vm bench-report` plots them.
    fn json(&self) -> serde_json::Value {
        let rounds = |v: &[Round]| {
            v.iter()
                .map(|r| {
                    serde_json::json!({
                        "p50_ns": r.p50.round(),
                        "p99_ns": r.p99.round(),
                        "cdf": r.cdf.iter().map(|&(q, ns)| [q, ns.round()]).collect::<Vec<_>>(),
                    })
                })
                .collect::<Vec<_>>()
        };
        serde_json::json!({
            "name": self.name,
            "request_bytes": self.sizes.0,
            "reply_bytes": self.sizes.1,
            "subject": rounds(&self.subject),
            "bare": rounds(&self.bare),
            "ratio_p50_median": median(self.ratios(|r| r.p50)),
            "ratio_p99_median": median(self.ratios(|r| r.p99)),
        })
    }
}

// ---- the measurements ----------------------------------------------------------------

/// `n` timed round trips of `req` (whose reply is `len` bytes).
fn time_calls(c: &mut RawClient, req: &[u8], len: usize, n: usize) -> Result<Round, Failure> {
    // A few untimed ones first: both ends awake, buffers warm.
    for _ in 0..n.min(200) {
        c.expect(req, len)?;
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        c.expect(req, len)?;
        t.push(start.elapsed().as_nanos() as u64);
    }
    Ok(Round::of(&mut t))
}

/// The VERSION handshake.
fn handshake(c: &mut RawClient) -> Result<(), Failure> {
    let v = Version {
        major: 0,
        minor: 1,
        caps: Capabilities::DEFAULT,
    };
    let reply = c
        .call(&encode_command(1, Command::Version as u16, 0, &v.encode()))
        .map_err(|e| Failure(format!("VERSION: {e}")))?;
    let hdr = Header::parse(reply[..HEADER_SIZE].try_into().expect("16 bytes"));
    if hdr.flags & FLAGS_ERROR != 0 {
        return Err(Failure(format!("VERSION refused: {hdr:?}")));
    }
    Ok(())
}

/// Register read and write round trips against the server and the bare peer.
fn registers(
    socket: &Path,
    bare: &mut Bare,
    o: &Options,
    check: bool,
) -> Result<[Pair; 2], Failure> {
    let s = UnixStream::connect(socket).map_err(|e| Failure(format!("connecting: {e}")))?;
    let mut c = RawClient::new(s).map_err(|e| Failure(e.to_string()))?;
    handshake(&mut c)?;
    let access = RegionAccess {
        offset: spec::REG_SCRATCH,
        region: REGS_BAR as u32,
        count: REG_BYTES,
    };
    let value = 0x5eed_cafe_u32;
    let write = encode_command(
        2,
        Command::RegionWrite as u16,
        0,
        &access.encode(&value.to_le_bytes()),
    );
    let read = encode_command(3, Command::RegionRead as u16, 0, &access.encode(&[]));
    let read_reply = HEADER_SIZE + RegionAccess::SIZE + REG_BYTES as usize;
    let write_reply = HEADER_SIZE + RegionAccess::SIZE;
    c.expect(&write, write_reply)?;
    let got = c.expect(&read, read_reply)?;
    let back = u32::from_le_bytes(got[read_reply - 4..].try_into().expect("4 bytes"));
    if back != value {
        return Err(Failure(format!(
            "REG_SCRATCH reads {back:#x} after writing {value:#x}"
        )));
    }
    let bare_read = for_bare(read.clone(), read_reply);
    let bare_write = for_bare(write.clone(), write_reply);
    let mut pairs = [
        Pair::new("register read", (read.len(), read_reply)),
        Pair::new("register write", (write.len(), write_reply)),
    ];
    for round in 0..o.rounds {
        for (pair, (req, bare_req, len)) in pairs.iter_mut().zip([
            (&read, &bare_read, read_reply),
            (&write, &bare_write, write_reply),
        ]) {
            let (s, b) = if round % 2 == 0 {
                let s = time_calls(&mut c, req, len, o.samples)?;
                (s, time_calls(&mut bare.client, bare_req, len, o.samples)?)
            } else {
                let b = time_calls(&mut bare.client, bare_req, len, o.samples)?;
                (time_calls(&mut c, req, len, o.samples)?, b)
            };
            pair.subject.push(s);
            pair.bare.push(b);
        }
        progress(round, o.rounds, "registers");
    }
    if check {
        let got = c.expect(&read, read_reply)?;
        let back = u32::from_le_bytes(got[read_reply - 4..].try_into().expect("4 bytes"));
        if back != value {
            return Err(Failure(format!(
                "REG_SCRATCH reads {back:#x} after the run, {value:#x} written"
            )));
        }
    }
    Ok(pairs)
}

/// Doorbell to MSI-X eventfd for a 64-byte COPY over vfio-user (a posted `REGION_WRITE`,
/// as QEMU sends BAR writes), against the bare ping-pong of the doorbell's sizes.
fn doorbell(socket: &Path, bare: &mut Bare, o: &Options) -> Result<Pair, Failure> {
    let dev = VfioUserBackend::connect(&VfioUserConfig::new(socket))?;
    doorbell_on(&dev, "doorbell to eventfd", bare, o)
}

/// The same doorbell to interrupt with the device core in this process (no socket: a
/// register write, the engine's worker, the waiter woken through a condition variable):
/// what a doorbell path that avoided the socket could at best reach.
fn doorbell_in_process(bare: &mut Bare, o: &Options) -> Result<Pair, Failure> {
    let dev = InProcessBackend::new(InProcessConfig::default())
        .map_err(|e| Failure(format!("in-process device: {e}")))?;
    doorbell_on(&dev, "doorbell, in-process", bare, o)
}

/// Doorbell to interrupt on `dev`: each sample pushes a 64-byte COPY asking for an
/// interrupt on vector 0 and times from the doorbell until a thread blocked on the vector
/// wakes.
fn doorbell_on(
    dev: &dyn DmaBackend,
    name: &'static str,
    bare: &mut Bare,
    o: &Options,
) -> Result<Pair, Failure> {
    fresh(dev)?;
    let mut q = DmaQueue::create(dev, QueueConfig::new(0, RING, 0))?;
    let records = CompletionRecords::new(dev, RING as usize)?;
    let src = dev.alloc_dma(DmaRequest::new(4096))?;
    let dst = dev.alloc_dma(DmaRequest::new(4096))?;
    src.write(0, &[0xa5; COPY_BYTES as usize]);
    let samples = (o.samples / 10).max(20);

    // The waiter: blocked on vector 0's eventfd, it stamps each wake-up.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Result<Instant, String>>();
    let doorbell_len = HEADER_SIZE + RegionAccess::SIZE + REG_BYTES as usize;
    let reply_len = HEADER_SIZE + RegionAccess::SIZE;
    let bare_req = for_bare(
        encode_command(
            9,
            Command::RegionWrite as u16,
            0,
            &RegionAccess {
                offset: spec::queue_reg(0, spec::Q_TAIL),
                region: REGS_BAR as u32,
                count: REG_BYTES,
            }
            .encode(&[0; 4]),
        ),
        reply_len,
    );
    let mut pair = Pair::new(name, (doorbell_len, reply_len));
    std::thread::scope(|scope| {
        let stop2 = stop.clone();
        scope.spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let r = match dev.wait_interrupt(0, Duration::from_millis(200)) {
                    Ok(0) => continue,
                    Ok(_) => Ok(Instant::now()),
                    Err(e) => Err(e.to_string()),
                };
                if tx.send(r).is_err() {
                    break;
                }
            }
        });
        let mut i = 0usize;
        let mut one = |q: &mut DmaQueue<'_>| -> Result<u64, Failure> {
            let slot = i % RING as usize;
            i += 1;
            records.clear(slot);
            q.push(
                &Descriptor::copy(src.bus_addr(), dst.bus_addr(), COPY_BYTES)
                    .with_interrupt()
                    .with_completion(records.device_addr(slot)),
            )?;
            let start = Instant::now();
            q.doorbell()?;
            let woke = rx
                .recv_timeout(STUCK)
                .map_err(|_| Failure("no interrupt within 10 s".into()))?
                .map_err(Failure)?;
            let rec = records.read(slot);
            if rec.status != spec::STATUS_OK {
                return Err(Failure(format!("COPY completed with {rec:?}")));
            }
            Ok(woke.saturating_duration_since(start).as_nanos() as u64)
        };
        let result = (|| -> Result<(), Failure> {
            for _ in 0..samples.min(100) {
                one(&mut q)?;
            }
            for round in 0..o.rounds {
                let mut measure = |q: &mut DmaQueue<'_>| -> Result<Round, Failure> {
                    let mut t = Vec::with_capacity(samples);
                    for _ in 0..samples {
                        t.push(one(q)?);
                    }
                    Ok(Round::of(&mut t))
                };
                let (s, b) = if round % 2 == 0 {
                    let s = measure(&mut q)?;
                    (
                        s,
                        time_calls(&mut bare.client, &bare_req, reply_len, samples)?,
                    )
                } else {
                    let b = time_calls(&mut bare.client, &bare_req, reply_len, samples)?;
                    (measure(&mut q)?, b)
                };
                pair.subject.push(s);
                pair.bare.push(b);
                progress(round, o.rounds, "doorbells");
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let mut copied = [0u8; COPY_BYTES as usize];
    dst.read(0, &mut copied);
    if copied != [0xa5; COPY_BYTES as usize] {
        return Err(Failure("the COPY's destination is wrong".into()));
    }
    Ok(pair)
}

fn progress(round: usize, rounds: usize, what: &str) {
    eprint!("\r  {what}: round {}/{rounds} ", round + 1);
    if round + 1 == rounds {
        eprintln!();
    }
}

/// Starts a server (unless told to use one) and the bare peer and measures everything.
fn run(o: &Options, check: bool) -> Result<Vec<Pair>, Failure> {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-roundtrip-")
        .map_err(|e| Failure(format!("temporary directory: {e}")))?;
    let mut bare = Bare::start(dir.as_path())?;
    let measure = |socket: &Path, bare: &mut Bare| {
        let mut pairs = Vec::new();
        if o.only.as_deref() != Some("doorbell") {
            pairs.extend(registers(socket, bare, o, check)?);
        }
        // The register connection is closed: the server takes the next client.
        if o.only.as_deref() != Some("registers") {
            pairs.push(doorbell(socket, bare, o)?);
            pairs.push(doorbell_in_process(bare, o)?);
        }
        Ok(pairs)
    };
    if let Some(socket) = &o.server {
        return measure(socket, &mut bare);
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
    let server = Launch::new(bin).spawn()?;
    let result = measure(server.socket(), &mut bare);
    let log = server.log();
    server.stop(DEFAULT_STOP_GRACE);
    result.map_err(|Failure(e)| Failure(format!("{e}\nserver log:\n{log}")))
}

fn report(o: &Options, pairs: &[Pair]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "round trips over UNIX sockets: {} interleaved rounds of {} samples (doorbells: {}); \
         medians over the rounds; times in µs",
        o.rounds,
        o.samples,
        (o.samples / 10).max(20)
    );
    let _ = writeln!(
        out,
        "{:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:<19} {:<19}",
        "subject",
        "req/reply",
        "p50",
        "bare p50",
        "p99",
        "bare p99",
        "p50 ratio (range)",
        "p99 ratio (range)"
    );
    for p in pairs {
        p.line(&mut out);
    }
    out
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(PEER_ARG) {
        let Some(path) = args.get(1) else {
            eprintln!("{PEER_ARG} needs the socket path");
            return ExitCode::from(2);
        };
        return match bare_peer(Path::new(path)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bare peer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if !args.iter().any(|a| a == "--bench") {
        return test_main();
    }
    let o = match parse_args(&args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&o, false) {
        Ok(pairs) => {
            print!("{}", report(&o, &pairs));
            if let Some(path) = &o.json {
                let body = serde_json::json!({
                    "rounds": o.rounds,
                    "samples": o.samples,
                    "pairs": pairs.iter().map(Pair::json).collect::<Vec<_>>(),
                })
                .to_string();
                if let Err(e) = std::fs::write(path, body) {
                    eprintln!("roundtrip: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("roundtrip: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo test`: a short run whose values and completions must be right (the figures are
/// printed, not judged: timing is for `--bench`).
fn test_main() -> ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let smoke = libtest_mimic::Trial::test("roundtrip::smoke", || {
        let o = Options {
            rounds: 2,
            samples: 300,
            ..Options::default()
        };
        let pairs = run(&o, true).map_err(|e| e.0)?;
        print!("{}", report(&o, &pairs));
        for p in &pairs {
            if p.subject.len() != o.rounds || p.bare.len() != o.rounds {
                return Err(format!("{}: rounds missing", p.name).into());
            }
        }
        Ok(())
    });
    libtest_mimic::run(&args, vec![smoke]).exit_code()
}
