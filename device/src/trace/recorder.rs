//! Recording: events go from the threads that make them to a file, off the hot path.
//!
//! Each thread that records gets a ring of its own (a wait-free single-producer,
//! single-consumer ring from `rtrb`): recording an event is a clock read, a thread-local
//! lookup and a store into the ring, with no lock and no locked instruction. A writer thread
//! drains every ring each [`DRAIN_PERIOD`] and appends what it took to the file through a
//! buffer; it runs at the lowest CPU priority ([`RecordOptions::background`]), so that on
//! a machine with no CPU to spare it is the trace that loses, not the device. A ring that
//! is full (the writer fell behind) drops the event and counts it; the writer then records
//! the total as an [`Event::Dropped`].
//!
//! Records of one thread are in time order; records of different threads are not merged
//! (each drain appends ring after ring), so readers that need one order sort by time
//! ([`super::file::read_all`] does). Times come from the CPU's invariant time-stamp counter
//! through `quanta` (the monotonic clock where there is none), converted to nanoseconds
//! by the writer.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quanta::Clock;
use rtrb::{Consumer, Producer, RingBuffer};
use tracing::warn;

use super::event::{Event, Header, Record, TraceConfig};
use super::file::{self, TraceError};
use crate::spec::DEVICE_VERSION;

/// Records each thread's ring holds (about 64 bytes each).
pub const RING_RECORDS: usize = 1 << 15;

/// How often the writer drains the rings.
pub const DRAIN_PERIOD: Duration = Duration::from_millis(2);

/// Recorder ids, so that a thread that records for two devices keeps a ring for each.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's rings, by recorder id.
    static RINGS: RefCell<Vec<(u64, Producer<Raw>)>> = const { RefCell::new(Vec::new()) };
}

/// An event as a ring holds it: with the clock's raw reading (the writer converts it to
/// nanoseconds).
#[derive(Debug, Clone, Copy)]
struct Raw {
    at: u64,
    event: Event,
}

/// How a [`Recorder`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordOptions {
    /// Records per thread's ring (a full ring drops events, counted in the trace).
    pub ring_records: usize,
    /// Also record data checksums ([`Event::Data`], `--trace-data`): a CRC32C of every
    /// byte an operation reads and writes, so that a replay can compare data. It reads
    /// the data of every transfer once more (twice for a COPY), so it is off unless asked
    /// for.
    pub data: bool,
    /// Run the writer at the lowest CPU priority (nice 19): it then takes only CPU time
    /// the device's threads and the VMM leave, and when there is none it falls behind and
    /// events are dropped (and counted) rather than the device slowed. Off: the writer
    /// competes as an equal and the trace stays complete while it keeps up.
    pub background: bool,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            ring_records: RING_RECORDS,
            data: false,
            background: true,
        }
    }
}

/// A trace being recorded to a file. Cheap to share ([`Tracer`] holds it); the file is
/// complete once the last handle is gone, or after [`Recorder::finish`].
#[derive(Debug)]
pub struct Recorder {
    id: u64,
    /// The clock events are stamped with: the CPU's time-stamp counter where it is
    /// invariant (~10 ns a reading here, against ~28 for `Instant`), else the monotonic
    /// clock.
    clock: Clock,
    path: PathBuf,
    /// Records per thread's ring.
    ring_records: usize,
    /// Data checksums are recorded ([`RecordOptions::data`]).
    data: bool,
    /// The consumer ends of every thread's ring, for the writer.
    rings: Arc<Mutex<Vec<Consumer<Raw>>>>,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    writer: Mutex<Option<JoinHandle<Result<u64, TraceError>>>>,
}

impl Recorder {
    /// Create `path` (replacing a file there), write the header and start the writer,
    /// with the default [`RecordOptions`].
    pub fn create(path: &Path, config: TraceConfig) -> Result<Arc<Self>, TraceError> {
        Self::open(path, config, RecordOptions::default())
    }

    /// [`Recorder::create`] with `options`.
    pub fn open(
        path: &Path,
        config: TraceConfig,
        options: RecordOptions,
    ) -> Result<Arc<Self>, TraceError> {
        let RecordOptions {
            ring_records,
            data,
            background,
        } = options;
        let f = File::create(path).map_err(|e| TraceError::Io(path.to_owned(), e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        let clock = Clock::new();
        let start = clock.raw();
        let header = Header {
            device_version: DEVICE_VERSION,
            start_unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            config,
            data,
        };
        file::write_header(&mut out, &header).map_err(|e| TraceError::Io(path.to_owned(), e))?;
        let rings = Arc::new(Mutex::new(Vec::new()));
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (rings, dropped, stop) = (rings.clone(), dropped.clone(), stop.clone());
            let file = path.to_owned();
            let clock = clock.clone();
            std::thread::Builder::new()
                .name("domdma-trace".into())
                .spawn(move || {
                    if background {
                        lowest_priority();
                    }
                    write_loop(out, &file, &rings, &dropped, &stop, &clock, start)
                })
                .map_err(|e| TraceError::Io(path.to_owned(), e))?
        };
        Ok(Arc::new(Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            clock,
            path: path.to_owned(),
            ring_records: ring_records.max(1),
            data,
            rings,
            dropped,
            stop,
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data checksums are recorded ([`RecordOptions::data`]).
    pub fn data(&self) -> bool {
        self.data
    }

    /// Events dropped so far because a ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Record `event` now.
    #[inline]
    pub fn record(&self, event: Event) {
        let rec = Raw {
            at: self.clock.raw(),
            event,
        };
        let pushed = RINGS.with(|rings| {
            let Ok(mut rings) = rings.try_borrow_mut() else {
                return false;
            };
            if let Some((_, p)) = rings.iter_mut().find(|(id, _)| *id == self.id) {
                return p.push(rec).is_ok();
            }
            // This thread's first event for this recorder: a ring of its own. Rings of
            // recorders that are gone are dropped here.
            rings.retain(|(_, p)| !p.is_abandoned());
            let (mut p, c) = RingBuffer::new(self.ring_records);
            let ok = p.push(rec).is_ok();
            self.rings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(c);
            rings.push((self.id, p));
            ok
        });
        if !pushed {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stop the writer after it wrote everything recorded so far; returns the records
    /// written. Events recorded afterwards are dropped (and not counted). Idempotent: a
    /// second call returns 0.
    pub fn finish(&self) -> Result<u64, TraceError> {
        self.stop.store(true, Ordering::Release);
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match handle {
            Some(h) => {
                h.thread().unpark();
                h.join()
                    .unwrap_or_else(|_| Err(TraceError::WriterPanicked(self.path.clone())))
            }
            None => Ok(0),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            warn!(error = %e, "trace not completed");
        }
    }
}

/// Give this thread the lowest CPU priority of its kind (nice 19; Linux sets it per
/// thread). Best effort: a failure is logged and the writer runs as it is.
fn lowest_priority() {
    // SAFETY: gettid takes nothing and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority takes no pointers; with this thread's id it changes only its
    // nice value.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "trace writer: nice 19 refused");
    }
}

/// The writer: drain every ring and append what it held, until stopped; then a last drain
/// and flush.
fn write_loop(
    mut out: BufWriter<File>,
    path: &Path,
    rings: &Mutex<Vec<Consumer<Raw>>>,
    dropped: &AtomicU64,
    stop: &AtomicBool,
    clock: &Clock,
    start: u64,
) -> Result<u64, TraceError> {
    let io = |e| TraceError::Io(path.to_owned(), e);
    let mut written = 0u64;
    let mut dropped_seen = 0u64;
    let mut last_t = 0u64;
    loop {
        let last = stop.load(Ordering::Acquire);
        {
            let mut rings = rings.lock().unwrap_or_else(PoisonError::into_inner);
            for c in rings.iter_mut() {
                let Ok(chunk) = c.read_chunk(c.slots()) else {
                    continue;
                };
                let (a, b) = chunk.as_slices();
                for raw in a.iter().chain(b) {
                    let t_ns = clock.delta_as_nanos(start, raw.at.max(start));
                    last_t = last_t.max(t_ns);
                    let r = Record {
                        t_ns,
                        event: raw.event,
                    };
                    file::write_record(&mut out, &r).map_err(io)?;
                }
                written += chunk.len() as u64;
                chunk.commit_all();
            }
            // A ring whose thread is gone and that is empty is done with.
            rings.retain(|c| !(c.is_abandoned() && c.is_empty()));
        }
        let total = dropped.load(Ordering::Relaxed);
        if total != dropped_seen {
            dropped_seen = total;
            let r = Record {
                t_ns: last_t,
                event: Event::Dropped { total },
            };
            file::write_record(&mut out, &r).map_err(io)?;
            written += 1;
        }
        if last {
            out.flush().map_err(io)?;
            return Ok(written);
        }
        std::thread::park_timeout(DRAIN_PERIOD);
    }
}

/// The handle the device's parts record through: nothing, or a [`Recorder`]. Recording
/// through a handle with no recorder costs one branch.
#[derive(Debug, Clone, Default)]
pub struct Tracer(Option<Arc<Recorder>>);

impl Tracer {
    /// A handle that records to `recorder`.
    pub fn new(recorder: Arc<Recorder>) -> Self {
        Self(Some(recorder))
    }

    /// A handle that records nothing.
    pub fn off() -> Self {
        Self(None)
    }

    /// Whether events are recorded.
    #[inline]
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Whether data checksums are recorded ([`RecordOptions::data`]).
    #[inline]
    pub fn data(&self) -> bool {
        self.0.as_ref().is_some_and(|r| r.data)
    }

    /// The recorder, if any.
    pub fn recorder(&self) -> Option<&Arc<Recorder>> {
        self.0.as_ref()
    }

    /// Record the event `f` makes (called only when recording).
    #[inline]
    pub fn record(&self, f: impl FnOnce() -> Event) {
        if let Some(r) = &self.0 {
            r.record(f());
        }
    }
}

thread_local! {
    /// The tracer and queue of the engine worker running on this thread, for the page-table
    /// reads its walks make ([`record_pte`]); `BOUND_ON` is the fast check.
    static BOUND: RefCell<Option<(Tracer, u16)>> = const { RefCell::new(None) };
    static BOUND_ON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Make this thread (an engine worker of queue `queue`) record the page-table entries its
/// walks read through `trace` (nothing when `trace` is off).
pub fn bind_thread(trace: &Tracer, queue: u16) {
    let on = trace.on();
    BOUND_ON.with(|b| b.set(on));
    BOUND.with(|b| *b.borrow_mut() = on.then(|| (trace.clone(), queue)));
}

/// A page-table entry read at bus address `addr`: recorded when this thread is bound to a
/// tracer ([`bind_thread`]); one thread-local load otherwise.
#[inline]
pub fn record_pte(addr: u64, value: u64) {
    if BOUND_ON.with(std::cell::Cell::get) {
        BOUND.with(|b| {
            if let Some((t, queue)) = &*b.borrow() {
                t.record(|| Event::PteRead {
                    queue: *queue,
                    addr,
                    value,
                });
            }
        });
    }
}
