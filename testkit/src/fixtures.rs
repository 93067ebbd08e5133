//! Fixtures scenarios share: device set-up, timeouts; queues run one descriptor at a time
//! ([`RunQueue`], [`RunOne`]) or submitted with tags ([`submit_tagged`],
//! [`expect_completions`], [`resume_and_expect`]); a translated domain with a queue in it
//! ([`Translated`]); fault records ([`expect_record`], [`record`]) and counters
//! ([`DomainStats`], [`QueueCounts`]); seeded data unique per page, canary-guarded buffers
//! ([`Guarded`]), a software CRC32C.

use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use domdma_device::spec::{self, BatchElement, CompletionRecord, Descriptor, FaultRecord};
use domdma_driver_model::backend::{BumpIova, DmaBackend, DmaBuffer, DmaRequest};
use domdma_driver_model::caps::{read_stat, Capabilities, Stat};
use domdma_driver_model::dma_queue::{
    reset_device, CompletionRecords, DmaQueue, QueueConfig, QueueError,
};
use domdma_driver_model::domain::Domain;
use domdma_driver_model::fault_log::FaultLog;
use domdma_driver_model::iopt::{PageSize, Perm};

use crate::check::{check_all, check_fault, check_status, Failure, TestResult};

/// How long a completion may take. The device answers in microseconds to milliseconds;
/// this bounds a TCG guest's polling and a broken device's silence, so a failing scenario
/// fails within seconds.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an expected interrupt may take.
pub const IRQ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to watch for an interrupt (or a completion) that must not come.
pub const NO_IRQ_WINDOW: Duration = Duration::from_millis(100);
/// How long a device reset may take.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// One MiB.
pub const MIB: usize = 1 << 20;
/// A base page.
pub const PAGE: usize = 4096;

/// Puts the device in a known state: reset through DEV_CTRL, bus mastering on, pending
/// interrupts discarded.
pub fn fresh(dev: &dyn DmaBackend) -> TestResult {
    reset_device(dev, RESET_TIMEOUT)?;
    dev.set_bus_master(true)?;
    drain_interrupts(dev)
}

/// Submits one descriptor with completion record `i` (cleared first) and polls for it.
pub fn run_desc(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    i: usize,
    desc: Descriptor,
) -> Result<CompletionRecord, Failure> {
    cpl.clear(i);
    q.submit(&[desc.with_completion(cpl.device_addr(i))])?;
    Ok(q.wait_completion(cpl, i, COMPLETION_TIMEOUT)?)
}

/// A queue whose ring and completion records live in a translated domain: the ring
/// mapped read-only at `ring_iova`, `records` completion records mapped read-write at
/// `cpl_iova`. Returns the enabled queue and its records.
pub fn queue_in_domain<'b>(
    dev: &'b dyn DmaBackend,
    dom: &mut Domain<'b>,
    cfg: QueueConfig,
    ring_iova: u64,
    cpl_iova: u64,
    records: usize,
) -> Result<(DmaQueue<'b>, CompletionRecords), Failure> {
    let ring = dev.alloc_dma(DmaRequest::new(cfg.ring_bytes()))?;
    dom.map_buffer(ring_iova, &ring, Perm::R)?;
    let mut cpl = CompletionRecords::new(dev, records)?;
    dom.map_buffer(cpl_iova, cpl.buffer(), Perm::RW)?;
    cpl.set_device_base(cpl_iova);
    let q = DmaQueue::with_ring(dev, cfg.in_domain(dom.index()), ring, ring_iova)?;
    Ok((q, cpl))
}

/// A queue and its completion records, run one descriptor at a time (the records used in
/// turn). It dereferences to the [`DmaQueue`] and is disabled when dropped.
pub struct RunQueue<'b> {
    q: DmaQueue<'b>,
    cpl: CompletionRecords,
    next: usize,
}

impl<'b> RunQueue<'b> {
    /// Queue `q` with the completion records `cpl`.
    pub fn new(q: DmaQueue<'b>, cpl: CompletionRecords) -> Self {
        RunQueue { q, cpl, next: 0 }
    }

    /// Queue `index` in pass-through domain 0 (`size` descriptors, on `vector`) with
    /// `records` completion records.
    pub fn passthrough(
        dev: &'b dyn DmaBackend,
        (index, size, vector): (u32, u32, u16),
        records: usize,
    ) -> Result<Self, Failure> {
        let q = DmaQueue::new(dev, index, size, vector)?;
        Ok(Self::new(q, CompletionRecords::new(dev, records)?))
    }

    /// Queue 0 in pass-through domain 0 (16 descriptors, vector 0) with one completion
    /// record.
    pub fn first(dev: &'b dyn DmaBackend) -> Result<Self, Failure> {
        Self::passthrough(dev, (0, 16, 0), 1)
    }

    /// FILLs 8 bytes at `at`, where no memory is (pass-through), and checks the OUTSIDE_RAM
    /// fault on a write there.
    pub fn fill_hole(&mut self, at: u64, what: &str) -> Result<CompletionRecord, Failure> {
        let d = Descriptor::fill(at, 0, 8);
        self.run_fault(d, (spec::FAULT_OUTSIDE_RAM, at, true), what)
    }

    /// The completion records.
    pub fn records(&self) -> &CompletionRecords {
        &self.cpl
    }
}

impl RunOne for RunQueue<'_> {
    fn run(&mut self, desc: Descriptor) -> Result<CompletionRecord, Failure> {
        let i = self.next % self.cpl.len();
        self.next += 1;
        run_desc(&mut self.q, &self.cpl, i, desc)
    }
}

/// A queue that runs one descriptor at a time ([`RunQueue`], or the WDF fixtures'
/// [`DomainQueue`](crate::wdf::DomainQueue)), and the checks of one completion scenarios
/// make.
pub trait RunOne {
    /// Submits `desc` and waits (bounded) for its completion.
    fn run(&mut self, desc: Descriptor) -> Result<CompletionRecord, Failure>;

    /// Runs `desc` and checks that it completed with STATUS_OK.
    fn run_ok(&mut self, desc: Descriptor, what: &str) -> Result<CompletionRecord, Failure> {
        let c = self.run(desc)?;
        check_status(&c, spec::STATUS_OK, what)?;
        Ok(c)
    }

    /// Runs `desc` and checks that it completed with a DMA fault of `reason` at `addr` on
    /// a write (`write`) or a read ([`check_fault`]).
    fn run_fault(
        &mut self,
        desc: Descriptor,
        (reason, addr, write): (u8, u64, bool),
        what: &str,
    ) -> Result<CompletionRecord, Failure> {
        let c = self.run(desc)?;
        check_fault(&c, reason, addr, write, what)?;
        Ok(c)
    }
}

impl<'b> Deref for RunQueue<'b> {
    type Target = DmaQueue<'b>;

    fn deref(&self) -> &DmaQueue<'b> {
        &self.q
    }
}

impl<'b> DerefMut for RunQueue<'b> {
    fn deref_mut(&mut self) -> &mut DmaQueue<'b> {
        &mut self.q
    }
}

impl Drop for RunQueue<'_> {
    fn drop(&mut self) {
        // Best effort: the scenario's result is already decided.
        let _ = self.q.disable();
    }
}

/// A translated domain with a queue in it: ring and completion records mapped at the
/// [`Iovas`] layout.
pub struct Translated<'b> {
    dev: &'b dyn DmaBackend,
    /// The device's capabilities.
    pub caps: Capabilities,
    /// The IOVA layout.
    pub io: Iovas,
    /// The queue (dropped, so disabled, before the domain).
    pub q: RunQueue<'b>,
    /// The domain.
    pub dom: Domain<'b>,
}

impl<'b> Translated<'b> {
    /// Domain `domain`, translated, with queue `queue` (vector `queue`, 16 descriptors, 8
    /// completion records) in it.
    pub fn new(dev: &'b dyn DmaBackend, domain: u32, queue: u32) -> Result<Self, Failure> {
        Self::with(
            dev,
            domain,
            QueueConfig::new(queue, 16, queue as u16),
            8,
            None,
        )
    }

    /// Domain `domain`, translated, with the queue of `cfg` and `records` completion
    /// records in it; its page table for `table_width`-bit IOVAs (which may map more than
    /// the device takes), or the device's IOVA width.
    pub fn with(
        dev: &'b dyn DmaBackend,
        domain: u32,
        cfg: QueueConfig,
        records: usize,
        table_width: Option<u32>,
    ) -> Result<Self, Failure> {
        let caps = Capabilities::read(dev)?;
        crate::check!(
            domain < caps.domains,
            "need domain {domain}, the device has {}",
            caps.domains
        );
        crate::check!(
            cfg.index < caps.queues,
            "need queue {}, the device has {}",
            cfg.index,
            caps.queues
        );
        let io = Iovas::for_device(&caps);
        let width = table_width.unwrap_or(caps.iova_width);
        let mut dom = Domain::translated(dev, domain, width)?;
        let (q, cpl) = queue_in_domain(dev, &mut dom, cfg, io.ring, io.cpl, records)?;
        Ok(Translated {
            dev,
            caps,
            io,
            q: RunQueue::new(q, cpl),
            dom,
        })
    }

    /// `len` bytes of guarded memory ([`Guarded`]: a page of canaries each side, and the
    /// canary inside) mapped at `iova` with `perm` by 4 KiB leaves (whole pages).
    #[must_use = "the memory is freed when dropped"]
    pub fn map_guarded(&mut self, iova: u64, len: usize, perm: Perm) -> Result<Guarded, Failure> {
        let g = Guarded::new(self.dev, len, PAGE)?;
        let bytes = len.next_multiple_of(PAGE) as u64;
        self.dom.map(iova, g.bus(), bytes, perm, PageSize::Size4K)?;
        Ok(g)
    }

    /// As [`Translated::map_guarded`], holding fresh unique data from `rng`; the memory and
    /// its data.
    #[must_use = "the memory is freed when dropped"]
    pub fn map_new(
        &mut self,
        iova: u64,
        len: usize,
        perm: Perm,
        rng: &mut Rng,
    ) -> Result<(Guarded, Vec<u8>), Failure> {
        let g = self.map_guarded(iova, len, perm)?;
        let data = rng.unique(len);
        g.write(0, &data);
        Ok((g, data))
    }

    /// A fault log of `size` records on the device's fault vector.
    pub fn fault_log(&self, size: u32) -> Result<FaultLog<'b>, Failure> {
        Ok(FaultLog::enable(self.dev, size, self.caps.fault_vector())?)
    }
}

/// Checks that the device supports leaves of `size` (`REG_CAP_PGSIZES`).
pub fn need_page_size(caps: &Capabilities, size: PageSize) -> TestResult {
    let name = match size {
        PageSize::Size4K => "4 KiB",
        PageSize::Size2M => "2 MiB",
        PageSize::Size1G => "1 GiB",
    };
    crate::check!(
        caps.supports_page(size),
        "REG_CAP_PGSIZES {:#x} lacks {name}",
        caps.page_sizes
    );
    Ok(())
}

/// The entry at `level` on the walk of `iova` in `dom`'s table.
pub fn raw_entry(dom: &Domain<'_>, iova: u64, level: u32) -> Result<u64, Failure> {
    dom.table().read_raw(iova, level).ok_or_else(|| {
        Failure(format!(
            "no level-{level} entry on the walk of IOVA {iova:#x}"
        ))
    })
}

/// The level at which the walk of `iova`, which `dom` does not map, stops: the lowest
/// whose table exists.
pub fn walk_stop_level(dom: &Domain<'_>, iova: u64) -> u32 {
    (1..=4u32)
        .find(|&l| dom.table().entry_addr(iova, l).is_some())
        .unwrap_or(4)
}

/// The IOVA of the ring slot the next descriptor submitted to `q` goes to.
pub fn next_slot_iova(q: &DmaQueue<'_>) -> u64 {
    q.ring_iova() + u64::from(q.tail()) * spec::DESC_SIZE
}

/// Checks that a completion reports a malformed descriptor at `at` (a descriptor access,
/// DESCRIPTOR_INVALID) with `result` and `bytes` (what a BATCH ran before it) and `tag`.
pub fn check_invalid(
    c: &CompletionRecord,
    at: u64,
    (result, bytes): (u64, u32),
    tag: u64,
    what: &str,
) -> TestResult {
    check_status(c, spec::STATUS_INVALID_DESCRIPTOR, what)?;
    crate::check_eq!(
        (c.fault_reason, c.fault_access, c.fault_addr),
        (spec::FAULT_DESCRIPTOR_INVALID, spec::ACCESS_DESCRIPTOR, at),
        "{what}: (fault reason, access, address)"
    );
    crate::check_eq!(
        (c.result, c.bytes, c.tag),
        (result, bytes, tag),
        "{what}: (result, bytes, tag)"
    );
    Ok(())
}

/// Submits `desc` alone to `q`, whose fetch of it must fail, with completion record 0 of
/// `cpl` (cleared first), and checks that the queue halts there: HALT_DESC_FETCH, `Q_HEAD`
/// still at it, the descriptor pending.
pub fn expect_fetch_halt(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    desc: Descriptor,
) -> TestResult {
    let at = q.tail();
    cpl.clear(0);
    q.submit(&[desc.with_completion(cpl.device_addr(0))])?;
    crate::check_eq!(wait_halted(q)?, spec::HALT_DESC_FETCH, "Q_HALT_REASON");
    crate::check_eq!(q.head()?, at, "Q_HEAD at the unfetched descriptor");
    check_pending(q, cpl, 0, "the unfetched descriptor")
}

/// A queue's `Q_COMPLETED` and `Q_ERRORS` at one time, to check what was added since.
#[derive(Debug, Clone, Copy)]
pub struct QueueCounts {
    /// `Q_COMPLETED`.
    pub completed: u32,
    /// `Q_ERRORS`.
    pub errors: u32,
}

impl QueueCounts {
    /// Reads `q`'s counters.
    pub fn read(q: &DmaQueue<'_>) -> Result<Self, Failure> {
        Ok(QueueCounts {
            completed: q.read_reg(spec::Q_COMPLETED)?,
            errors: q.read_reg(spec::Q_ERRORS)?,
        })
    }

    /// What `Q_COMPLETED` and `Q_ERRORS` of `q` have grown by since (wrapping).
    pub fn added(&self, q: &DmaQueue<'_>) -> Result<(u32, u32), Failure> {
        let now = Self::read(q)?;
        Ok((
            now.completed.wrapping_sub(self.completed),
            now.errors.wrapping_sub(self.errors),
        ))
    }

    /// Waits (bounded: counters may move just after a completion) until `Q_COMPLETED` and
    /// `Q_ERRORS` have grown by `completed` and `errors` since.
    pub fn expect_added(&self, q: &DmaQueue<'_>, (completed, errors): (u32, u32)) -> TestResult {
        let want = self.completed.wrapping_add(completed);
        eventually("Q_COMPLETED", want, || Ok(q.read_reg(spec::Q_COMPLETED)?))?;
        let want = self.errors.wrapping_add(errors);
        eventually("Q_ERRORS", want, || Ok(q.read_reg(spec::Q_ERRORS)?))
    }
}

/// An IOVA under another level-3 entry than the [`Iovas`] layout's (so that corrupting or
/// missing entries above it leaves the rings alone), below 4 GiB in the 32-bit mode.
pub fn apart(io: &Iovas) -> u64 {
    io.base ^ (2 << 30)
}

/// Waits for the next fault record and checks every field of it (reserved included)
/// against `want`.
pub fn expect_record(log: &mut FaultLog<'_>, want: FaultRecord, what: &str) -> TestResult {
    let r = log.wait(COMPLETION_TIMEOUT)?;
    crate::check_eq!(r, want, "{what}: fault record ({r})");
    Ok(())
}

/// The record of a fault of `reason` on an `access` at `iova` by queue `queue` in domain
/// `domain`, with `info` and `level`, and sequence number `seq`.
pub fn record(
    (reason, access): (u8, u8),
    (domain, queue): (u16, u16),
    iova: u64,
    (info, level): (u64, u32),
    seq: u32,
) -> FaultRecord {
    FaultRecord {
        reason,
        access,
        domain,
        queue,
        reserved: 0,
        iova,
        info,
        level,
        seq,
    }
}

/// `len` bytes of FILL's output: byte i is byte i mod 8 of the little-endian `pattern`.
pub fn pattern_bytes(pattern: u64, len: usize) -> Vec<u8> {
    pattern
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// A BATCH list of `elems` in fresh DMA memory (at least a page; at its bus address: for
/// a pass-through domain, or to map into a translated one).
pub fn write_list(dev: &dyn DmaBackend, elems: &[Descriptor]) -> Result<DmaBuffer, Failure> {
    let size = spec::DESC_SIZE as usize;
    let list = dev.alloc_dma(DmaRequest::new((elems.len() * size).max(PAGE)))?;
    for (i, e) in elems.iter().enumerate() {
        list.write(i * size, &BatchElement(*e).encode());
    }
    Ok(list)
}

/// Polls `read` until it gives `want` (counters may move just after a completion), for at
/// most [`COMPLETION_TIMEOUT`].
pub fn eventually<T: PartialEq + std::fmt::LowerHex>(
    what: &str,
    want: T,
    mut read: impl FnMut() -> Result<T, Failure>,
) -> TestResult {
    let start = Instant::now();
    loop {
        let got = read()?;
        if got == want {
            return Ok(());
        }
        if start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!(
                "{what}: {got:#x} after {COMPLETION_TIMEOUT:?}, expected {want:#x}"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls `cond` until it holds, for at most [`COMPLETION_TIMEOUT`].
pub fn poll_until(what: &str, mut cond: impl FnMut() -> Result<bool, Failure>) -> TestResult {
    let start = Instant::now();
    while !cond()? {
        if start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!("waited {COMPLETION_TIMEOUT:?} for {what}")));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    Ok(())
}

/// `d` changed by `f` (a malformed descriptor from a well-formed one).
pub fn altered(d: Descriptor, f: impl FnOnce(&mut Descriptor)) -> Descriptor {
    let mut d = d;
    f(&mut d);
    d
}

/// Checks that an interrupt arrives on `vector` within [`IRQ_TIMEOUT`] (`expected`), or
/// that none does within [`NO_IRQ_WINDOW`].
pub fn expect_irq(dev: &dyn DmaBackend, vector: u16, expected: bool, what: &str) -> TestResult {
    if expected {
        crate::check!(
            dev.wait_interrupt(vector, IRQ_TIMEOUT)? > 0,
            "{what}: no interrupt on vector {vector} within {IRQ_TIMEOUT:?}"
        );
    } else {
        crate::check_eq!(
            dev.wait_interrupt(vector, NO_IRQ_WINDOW)?,
            0,
            "{what}: interrupts on vector {vector}"
        );
    }
    Ok(())
}

/// RESUMEs the halted `q` and checks that it runs the `n` pending descriptors of
/// [`submit_tagged`]`(q, cpl, (first, tag0), ..)` ([`expect_completions`]) and is halted
/// no longer.
pub fn resume_and_expect(
    q: &DmaQueue<'_>,
    cpl: &CompletionRecords,
    (first, tag0, n): (usize, u64, usize),
    what: &str,
) -> Result<Vec<CompletionRecord>, Failure> {
    q.resume()?;
    let done = expect_completions(q, cpl, (first, tag0), n, what)?;
    let status = q.status()?;
    crate::check_eq!(
        (status & spec::Q_STATUS_ERROR, q.halt_reason()?),
        (0, spec::HALT_NONE),
        "{what}: (Q_STATUS error bit, Q_HALT_REASON) after RESUME (Q_STATUS {status:#x})"
    );
    Ok(done)
}

/// Re-arms the device's interrupts ([`DmaBackend::rearm_interrupts`]) and returns its
/// fault vector (the last one).
pub fn armed_fault_vector(dev: &dyn DmaBackend) -> Result<u16, Failure> {
    dev.rearm_interrupts()?;
    Ok(Capabilities::read(dev)?.fault_vector())
}

/// Submits `descs` to `q` with one doorbell: descriptor `k` with tag `tag0 + k` and
/// completion record `first + k` of `cpl` (cleared first).
pub fn submit_tagged(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    (first, tag0): (usize, u64),
    descs: &[Descriptor],
) -> TestResult {
    let descs: Vec<Descriptor> = (first..)
        .zip(descs)
        .map(|(i, d)| {
            cpl.clear(i);
            d.with_tag(tag0 + (i - first) as u64)
                .with_completion(cpl.device_addr(i))
        })
        .collect();
    q.submit(&descs)?;
    Ok(())
}

/// Waits (each at most [`COMPLETION_TIMEOUT`]) for the `n` completions of
/// [`submit_tagged`]`(q, cpl, (first, tag0), ..)` and checks that each is STATUS_OK with
/// its tag; returns them.
pub fn expect_completions(
    q: &DmaQueue<'_>,
    cpl: &CompletionRecords,
    (first, tag0): (usize, u64),
    n: usize,
    what: &str,
) -> Result<Vec<CompletionRecord>, Failure> {
    let mut out = Vec::with_capacity(n);
    for k in 0..n {
        let c = q.wait_completion(cpl, first + k, COMPLETION_TIMEOUT)?;
        check_status(&c, spec::STATUS_OK, format!("{what}, descriptor {k}"))?;
        crate::check_eq!(c.tag, tag0 + k as u64, "{what}, descriptor {k}: tag");
        out.push(c);
    }
    Ok(out)
}

/// Reads and discards pending interrupts on every vector.
pub fn drain_interrupts(dev: &dyn DmaBackend) -> TestResult {
    for v in 0..dev.msix_vectors() {
        dev.wait_interrupt(v, Duration::ZERO)?;
    }
    Ok(())
}

/// Reads a domain counter.
pub fn dstat(dev: &dyn DmaBackend, domain: u32, counter: u32) -> Result<u64, Failure> {
    Ok(read_stat(
        dev,
        Stat::Domain {
            index: domain,
            counter,
        },
    )?)
}

/// Reads a queue counter.
pub fn qstat(dev: &dyn DmaBackend, queue: u32, counter: u32) -> Result<u64, Failure> {
    Ok(read_stat(
        dev,
        Stat::Queue {
            index: queue,
            counter,
        },
    )?)
}

/// A domain's statistics counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainStats {
    /// `DSTAT_TRANSLATIONS`.
    pub translations: u64,
    /// `DSTAT_IOTLB_HITS`.
    pub hits: u64,
    /// `DSTAT_IOTLB_MISSES`.
    pub misses: u64,
    /// `DSTAT_PAGE_WALKS`.
    pub walks: u64,
    /// `DSTAT_FAULTS`.
    pub faults: u64,
    /// `DSTAT_STALE_USES`.
    pub stale_uses: u64,
}

impl DomainStats {
    /// Reads the counters of domain `d`.
    pub fn read(dev: &dyn DmaBackend, d: u32) -> Result<Self, Failure> {
        Ok(DomainStats {
            translations: dstat(dev, d, spec::DSTAT_TRANSLATIONS)?,
            hits: dstat(dev, d, spec::DSTAT_IOTLB_HITS)?,
            misses: dstat(dev, d, spec::DSTAT_IOTLB_MISSES)?,
            walks: dstat(dev, d, spec::DSTAT_PAGE_WALKS)?,
            faults: dstat(dev, d, spec::DSTAT_FAULTS)?,
            stale_uses: dstat(dev, d, spec::DSTAT_STALE_USES)?,
        })
    }

    /// Checks that the IOTLB counters agree: every translation is a hit or a miss, and
    /// every miss walks the table (in strict mode every hit too).
    pub fn check_iotlb(&self, strict: bool) -> TestResult {
        let s = self;
        crate::check_eq!(
            s.translations,
            s.hits + s.misses,
            "DSTAT_TRANSLATIONS = hits + misses ({s})"
        );
        let walks = if strict { s.translations } else { s.misses };
        crate::check_eq!(
            s.walks,
            walks,
            "DSTAT_PAGE_WALKS (strict IOTLB: {strict}; {s})"
        );
        Ok(())
    }
}

impl std::fmt::Display for DomainStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} translations, {} hits, {} misses, {} walks, {} faults, {} stale uses",
            self.translations, self.hits, self.misses, self.walks, self.faults, self.stale_uses
        )
    }
}

/// Waits until the queue reports `Q_STATUS_ERROR` (halted); returns `Q_HALT_REASON`.
pub fn wait_halted(q: &DmaQueue<'_>) -> Result<u32, Failure> {
    let start = Instant::now();
    loop {
        let status = q.status()?;
        if status & spec::Q_STATUS_ERROR != 0 {
            return Ok(q.halt_reason()?);
        }
        if start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!(
                "queue {} did not halt within {COMPLETION_TIMEOUT:?} (Q_STATUS {status:#x}, \
                 head {})",
                q.index(),
                q.head()?
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks that the descriptor behind record `i` stays pending for [`NO_IRQ_WINDOW`].
pub fn check_pending(
    q: &DmaQueue<'_>,
    cpl: &CompletionRecords,
    i: usize,
    what: &str,
) -> TestResult {
    match q.wait_completion(cpl, i, NO_IRQ_WINDOW) {
        Err(QueueError::Timeout { .. }) => Ok(()),
        Ok(c) => Err(Failure(format!("{what}: completed: {c}"))),
        Err(e) => Err(e.into()),
    }
}

/// Where scenarios put things in a translated domain's IOVA space. Domain IOVAs start at
/// 2^39 (48-bit mode), above every bus address the back ends hand out, or at 3 GiB in the
/// 32-bit mode, above the bus addresses used then: so an IOVA the device uses is never
/// also a bus address, and a translation that was skipped faults instead of passing.
#[derive(Debug, Clone, Copy)]
pub struct Iovas {
    /// First IOVA of the layout.
    pub base: u64,
    /// Rings.
    pub ring: u64,
    /// Completion records.
    pub cpl: u64,
    /// Small data.
    pub data: u64,
    /// Sources.
    pub src: u64,
    /// Destinations.
    pub dst: u64,
}

impl Iovas {
    /// The layout for a device with these capabilities.
    pub fn for_device(caps: &Capabilities) -> Self {
        let base = if caps.iova_width > 39 {
            BumpIova::DEFAULT_END
        } else {
            0xc000_0000
        };
        Iovas {
            base,
            ring: base,
            cpl: base + 0x10_0000,
            data: base + 0x40_0000,
            src: base + 0x1000_0000,
            dst: base + 0x2000_0000,
        }
    }
}

/// A small, seedable random generator (SplitMix64): test data and choices that a seed
/// reproduces.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// `len` bytes of [`unique_data`] under a fresh random seed.
    pub fn unique(&mut self, len: usize) -> Vec<u8> {
        unique_data(self.next_u64(), len)
    }
}

/// SplitMix64's output function.
fn mix(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` bytes in which every 8-byte word is a hash of `seed` and the word's index: no
/// two pages (and no two words) of one buffer hold the same bytes, and buffers under
/// different seeds differ, so a device that maps the wrong page, or copies from the wrong
/// offset, cannot pass a byte-for-byte check.
pub fn unique_data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(&mix(seed ^ mix(i)).to_le_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// CRC32C (Castagnoli, reflected, initial value and final XOR 0xffffffff), in software:
/// the reference the device's CRC32C is checked against.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82f6_3b78;
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// Canary byte written around guarded ranges.
pub const CANARY: u8 = 0xc5;

/// DMA memory with a canary-filled guard before and after the range a scenario uses:
/// [`Guarded::check_guards`] proves the device wrote nothing outside it.
#[derive(Debug)]
pub struct Guarded {
    /// The whole allocation.
    pub buf: DmaBuffer,
    /// Offset of the used range in `buf`.
    pub off: usize,
    /// Length of the used range.
    pub len: usize,
}

impl Guarded {
    /// `len` bytes at offset `guard` of an allocation with `guard` canary bytes on each
    /// side (the whole allocation is filled with the canary).
    pub fn new(dev: &dyn DmaBackend, len: usize, guard: usize) -> Result<Self, Failure> {
        let buf = dev.alloc_dma(DmaRequest::new(len + 2 * guard))?;
        buf.fill(0, buf.len(), CANARY);
        Ok(Guarded {
            buf,
            off: guard,
            len,
        })
    }

    /// Bus address of the used range.
    pub fn bus(&self) -> u64 {
        self.buf.bus_addr() + self.off as u64
    }

    /// Writes `data` at `at` in the used range.
    pub fn write(&self, at: usize, data: &[u8]) {
        assert!(
            at + data.len() <= self.len,
            "write outside the guarded range"
        );
        self.buf.write(self.off + at, data);
    }

    /// The used range's bytes.
    pub fn read(&self) -> Vec<u8> {
        self.buf.to_vec(self.off, self.len)
    }

    /// Checks that the used range holds `want` and both guards only the canary.
    pub fn check(&self, want: &[u8], what: &str) -> TestResult {
        crate::check::check_bytes(&self.read(), want, what)?;
        self.check_guards(what)
    }

    /// Checks that both guards still hold only the canary.
    pub fn check_guards(&self, what: &str) -> TestResult {
        check_all(
            &self.buf.to_vec(0, self.off),
            CANARY,
            format!("{what}: guard before the range"),
        )?;
        let end = self.off + self.len;
        check_all(
            &self.buf.to_vec(end, self.buf.len() - end),
            CANARY,
            format!("{what}: guard after the range"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn unique_data_differs_per_page_and_seed() {
        let a = unique_data(7, 64 * 4096);
        let pages: std::collections::HashSet<&[u8]> = a.chunks(4096).collect();
        assert_eq!(pages.len(), 64, "every page distinct");
        let words: std::collections::HashSet<&[u8]> = a.chunks(8).collect();
        assert_eq!(words.len(), a.len() / 8, "every word distinct");
        assert_ne!(unique_data(8, 4096), a[..4096]);
        assert_eq!(unique_data(7, 100), a[..100], "a prefix of the same stream");
    }
}
