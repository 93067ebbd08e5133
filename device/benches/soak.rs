//! Socket-level soak: many descriptors on several queues at once through the vfio-user back
//! end, against the real `domdma-device` server process (started with the test kit's
//! launcher, reached over its UNIX socket), counting what must never happen.
//!
//! One thread per queue keeps its ring full: it submits as completions arrive (one doorbell
//! for everything it refills), and finds completions by scanning every completion record of
//! the queue, woken by the queue's MSI-X vector (coalesced) or, with `--poll`, by polling.
//! Descriptors are mostly small COPYs (1 byte to 12 KiB, at unaligned offsets) of fresh
//! [`unique_data`], with a few FILLs of a fresh pattern and CRC32Cs of unique data. Each
//! carries a tag naming its queue and sequence number; the record slot it completes in is
//! its sequence number modulo the ring size, cleared as soon as it has been read. Counted:
//!
//! - **lost**: submitted, never completed: still pending after `--lost-after` seconds
//!   without any completion on its queue;
//! - **duplicated**: a completion record seen again for a descriptor already completed (a
//!   record written twice before a scan reads it is seen once: a descriptor run twice also
//!   shows in `Q_COMPLETED`, checked at the end);
//! - **mismatched**: the data is wrong at completion: a COPY's destination differs from its
//!   source data, a FILL's from its pattern, a CRC32C result from the software CRC, or a
//!   canary just before or after the destination range was overwritten;
//! - **failed**: a completion that is not STATUS_OK with the descriptor's length;
//! - **stray**: a record in a slot with a tag of no descriptor submitted there.
//!
//! At the end the queue's `Q_COMPLETED` must equal what was submitted and `Q_ERRORS` be 0,
//! and the server must still run. Any non-zero count, disagreement or error fails the run.
//!
//! Run it as `scripts/bench --soak [--descriptors N]` (release build), or
//! `cargo bench -p domdma-device --bench soak -- --help` for every option. Without
//! `--bench` (that is, under `cargo test`: `test = true` in Cargo.toml) it is four
//! libtest-style tests, so that this code cannot rot: `soak::smoke`, 20 000 descriptors
//! that must pass, and `soak::counts_planted_{mismatch,duplicate,lost}`, 2 000 descriptors
//! with one fault planted by the driver side (`--plant`), which must be counted, alone, and
//! fail the run.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use domdma_device::spec::{self, CompletionRecord, Descriptor};
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig};
use domdma_driver_model::backend::{DmaBackend, DmaBuffer, DmaRequest};
use domdma_driver_model::caps::Capabilities;
use domdma_driver_model::dma_queue::{CompletionRecords, DmaQueue, QueueConfig};
use domdma_testkit::check::{check_all, check_bytes, Failure};
use domdma_testkit::fixtures::{crc32c, fresh, pattern_bytes, unique_data, Rng, RunQueue, CANARY};
use domdma_testkit::launcher::{Launch, DEFAULT_STOP_GRACE};

/// Descriptors in the `cargo test` run.
const SMOKE_DESCRIPTORS: u64 = 20_000;
/// Descriptors by default.
const DEFAULT_DESCRIPTORS: u64 = 1_000_000;
/// Bytes of source and of destination memory per ring slot.
const STRIDE: usize = 16 << 10;
/// Largest transfer: a slot less the largest offset and a canary.
const MAX_LEN: usize = 12 << 10;
/// Canary bytes before and after a destination range.
const GUARD: usize = 8;
/// Tag: this marker in bits 63:56, the queue in 55:48, the sequence number below.
const TAG_MAGIC: u64 = 0xd5;
/// Interrupt coalescing of each queue in interrupt mode: count, and microseconds.
const COALESCE: (u32, u32) = (16, 50);
/// Longest sleep on an interrupt before the records are scanned again.
const IRQ_NAP: Duration = Duration::from_millis(20);
/// Sleep after a scan that found nothing, in polling mode.
const POLL_NAP: Duration = Duration::from_micros(50);
/// How long after the last completion late (duplicate or stray) records are looked for.
const LINGER: Duration = Duration::from_millis(100);
/// Problems described per queue (the rest are only counted).
const MAX_NOTES: usize = 8;

/// How a queue thread learns of completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The queue's MSI-X vector, every descriptor asking for it, coalesced ([`COALESCE`]).
    Interrupt,
    /// Polling the records, sleeping [`POLL_NAP`] after an empty scan.
    Poll,
}

/// A fault planted on queue 0 by the driver side, to check that the soak counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plant {
    /// One byte of the first COPY's destination flipped before it is checked.
    Mismatch,
    /// The last completion record written again after it was read and cleared.
    Duplicate,
    /// The descriptor in the middle submitted without a completion record.
    Lost,
}

/// What to run.
#[derive(Debug, Clone)]
struct Options {
    descriptors: u64,
    queues: u32,
    ring: u32,
    wake: Wake,
    lost_after: Duration,
    seed: u64,
    progress: bool,
    plant: Option<Plant>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            descriptors: DEFAULT_DESCRIPTORS,
            queues: 4,
            ring: 256,
            wake: Wake::Interrupt,
            lost_after: Duration::from_secs(10),
            seed: 0x50a4_d0d3,
            progress: true,
            plant: None,
        }
    }
}

const USAGE: &str = "\
Usage: cargo bench -p domdma-device --bench soak -- [OPTIONS]
  --descriptors N   descriptors in all, spread over the queues (default 1000000)
  --queues N        queues, one thread each (default 4; the server gets --queues N)
  --ring N          ring size, a power of two in 4..=4096 (default 256); N - 1 in flight
  --poll            poll the completion records instead of waiting for interrupts
  --lost-after S    a queue with no completion for S seconds gives up: what is still
                    pending counts as lost (default 10)
  --seed N          seed of the data, lengths and operations (default 0x50a4d0d3)
  --quiet           no progress lines
  --plant KIND      to check the soak itself: plant one fault on queue 0 (mismatch,
                    duplicate or lost); the run must then fail, counting it
Fails (exit status 1) unless lost, duplicated, mismatched, failed and stray are all 0.";

fn parse_args(args: &[String]) -> Result<Options, String> {
    fn number(flag: &str, v: Option<&String>) -> Result<u64, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        let s = v.replace('_', "");
        let n = match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        };
        n.map_err(|_| format!("{flag} takes a number, not '{v}'"))
    }
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            // What `cargo bench` passes.
            "--bench" => {}
            "--descriptors" => o.descriptors = number(a, it.next())?,
            "--queues" => {
                o.queues = u32::try_from(number(a, it.next())?)
                    .ok()
                    .filter(|q| (1..=32).contains(q))
                    .ok_or("--queues takes 1 to 32")?;
            }
            "--ring" => {
                o.ring = u32::try_from(number(a, it.next())?)
                    .ok()
                    .filter(|r| r.is_power_of_two() && (4..=spec::Q_SIZE_MAX).contains(r))
                    .ok_or("--ring takes a power of two in 4..=4096")?;
            }
            "--poll" => o.wake = Wake::Poll,
            "--lost-after" => o.lost_after = Duration::from_secs(number(a, it.next())?.max(1)),
            "--seed" => o.seed = number(a, it.next())?,
            "--quiet" => o.progress = false,
            "--plant" => {
                o.plant = Some(match it.next().map(String::as_str) {
                    Some("mismatch") => Plant::Mismatch,
                    Some("duplicate") => Plant::Duplicate,
                    Some("lost") => Plant::Lost,
                    _ => return Err("--plant takes mismatch, duplicate or lost".into()),
                })
            }
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument '{a}'")),
        }
    }
    if o.descriptors < u64::from(o.queues) {
        return Err(format!(
            "--descriptors {} is fewer than one per queue ({})",
            o.descriptors, o.queues
        ));
    }
    Ok(o)
}

/// The operations of the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Copy,
    Fill,
    Crc,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Copy => "COPY",
            Op::Fill => "FILL",
            Op::Crc => "CRC32C",
        }
    }
}

/// A descriptor in flight: what its completion must show.
#[derive(Debug)]
struct InFlight {
    seq: u64,
    op: Op,
    len: u32,
    /// Offset of the destination range in the slot (COPY, FILL).
    dst_off: usize,
    /// The destination bytes (COPY, FILL), or the CRC (its 4 bytes, little endian).
    expect: Vec<u8>,
}

/// What one queue saw.
#[derive(Debug, Default, Clone)]
struct QueueReport {
    queue: u32,
    submitted: u64,
    completed: u64,
    lost: u64,
    duplicated: u64,
    mismatched: u64,
    failed: u64,
    stray: u64,
    /// COPY, FILL, CRC32C completed.
    by_op: [u64; 3],
    /// Bytes of the completed descriptors.
    bytes: u64,
    /// Doorbells rung (`Q_TAIL` writes).
    doorbells: u64,
    q_completed: u32,
    q_errors: u32,
    /// When the last descriptor completed (or the queue gave up).
    finished: Option<Instant>,
    /// Descriptions of the first problems, and of how the queue stood when it gave up.
    notes: Vec<String>,
}

impl QueueReport {
    fn note(&mut self, msg: String) {
        if self.notes.len() < MAX_NOTES {
            self.notes.push(msg);
        }
    }

    fn problems(&self) -> u64 {
        self.lost + self.duplicated + self.mismatched + self.failed + self.stray
    }

    fn counters_agree(&self) -> bool {
        self.q_completed == self.submitted as u32 && self.q_errors == 0
    }
}

/// One queue's driver: its ring, records, source and destination memory, the descriptors
/// in flight by slot, and which sequence numbers completed.
struct QueueSoak<'b> {
    dev: &'b dyn DmaBackend,
    q: RunQueue<'b>,
    src: DmaBuffer,
    dst: DmaBuffer,
    slots: Vec<Option<InFlight>>,
    done: Vec<bool>,
    outstanding: usize,
    rng: Rng,
    wake: Wake,
    target: u64,
    /// The fault still to plant on this queue.
    plant: Option<Plant>,
    report: QueueReport,
    scratch: Vec<u8>,
}

impl<'b> QueueSoak<'b> {
    fn new(dev: &'b dyn DmaBackend, index: u32, o: &Options, target: u64) -> Result<Self, Failure> {
        let mut cfg = QueueConfig::new(index, o.ring, index as u16);
        if o.wake == Wake::Interrupt {
            (cfg.coalesce_count, cfg.coalesce_usec) = COALESCE;
        }
        let q = DmaQueue::create(dev, cfg)?;
        let q = RunQueue::new(q, CompletionRecords::new(dev, o.ring as usize)?);
        let bytes = o.ring as usize * STRIDE;
        let src = dev.alloc_dma(DmaRequest::new(bytes))?;
        let dst = dev.alloc_dma(DmaRequest::new(bytes))?;
        Ok(QueueSoak {
            dev,
            q,
            src,
            dst,
            slots: (0..o.ring).map(|_| None).collect(),
            done: vec![false; target as usize],
            outstanding: 0,
            rng: Rng::new(o.seed ^ (u64::from(index) << 32)),
            wake: o.wake,
            target,
            plant: o.plant.filter(|_| index == 0),
            report: QueueReport {
                queue: index,
                ..QueueReport::default()
            },
            scratch: Vec::with_capacity(MAX_LEN + 2 * GUARD),
        })
    }

    fn tag(&self, seq: u64) -> u64 {
        TAG_MAGIC << 56 | u64::from(self.report.queue) << 48 | seq
    }

    /// The sequence number a tag of this queue names, if it names one submitted.
    fn seq_of(&self, tag: u64) -> Option<u64> {
        let seq = tag & ((1 << 48) - 1);
        (tag >> 48 == TAG_MAGIC << 8 | u64::from(self.report.queue) && seq < self.report.submitted)
            .then_some(seq)
    }

    /// A fresh descriptor for sequence number `seq` in its slot: the slot's memory
    /// prepared, its record cleared.
    fn prepare(&mut self, seq: u64) -> Descriptor {
        let ring = self.slots.len();
        let slot = (seq % ring as u64) as usize;
        assert!(
            self.slots[slot].is_none(),
            "slot {slot} reused while in flight"
        );
        let base = slot * STRIDE;
        let len = match self.rng.below(64) {
            0 => 4097 + self.rng.below((MAX_LEN - 4096) as u64),
            1..=7 => 513 + self.rng.below(4096 - 512),
            _ => 1 + self.rng.below(512),
        } as usize;
        let op = match self.rng.below(32) {
            0 => Op::Fill,
            1 => Op::Crc,
            _ => Op::Copy,
        };
        let src_off = self.rng.below(64) as usize;
        let dst_off = GUARD + self.rng.below(64) as usize;
        let src_bus = self.src.bus_addr() + (base + src_off) as u64;
        let dst_bus = self.dst.bus_addr() + (base + dst_off) as u64;
        let (desc, expect) = match op {
            Op::Copy | Op::Crc => {
                let data = unique_data(self.rng.next_u64(), len);
                self.src.write(base + src_off, &data);
                if op == Op::Copy {
                    (Descriptor::copy(src_bus, dst_bus, len as u32), data)
                } else {
                    let crc = crc32c(&data).to_le_bytes().to_vec();
                    (Descriptor::crc32c(src_bus, len as u32), crc)
                }
            }
            Op::Fill => {
                let pattern = self.rng.next_u64();
                (
                    Descriptor::fill(dst_bus, pattern, len as u32),
                    pattern_bytes(pattern, len),
                )
            }
        };
        if op != Op::Crc {
            self.dst.fill(base + dst_off - GUARD, GUARD, CANARY);
            self.dst.fill(base + dst_off + len, GUARD, CANARY);
        }
        let cpl = self.q.records();
        cpl.clear(slot);
        let mut desc = desc
            .with_tag(self.tag(seq))
            .with_completion(cpl.device_addr(slot));
        if self.plant == Some(Plant::Lost) && seq == self.target / 2 {
            self.plant = None;
            desc = desc.with_completion(0);
        }
        if self.wake == Wake::Interrupt {
            desc = desc.with_interrupt();
        }
        self.slots[slot] = Some(InFlight {
            seq,
            op,
            len: len as u32,
            dst_off,
            expect,
        });
        desc
    }

    /// Fills the ring (up to its size less one, or the target) with one doorbell. A
    /// sequence number waits while its record slot still holds a descriptor whose record was
    /// not read: a scan reads the slots one after the other while the device writes them,
    /// so it can find later completions before an earlier one, and reusing that slot would
    /// clear the earlier record unread.
    fn refill(&mut self, target: u64) -> Result<(), Failure> {
        let ring = self.slots.len();
        let mut pushed = 0;
        while self.outstanding < ring - 1 && self.report.submitted < target {
            let seq = self.report.submitted;
            if self.slots[(seq % ring as u64) as usize].is_some() {
                break;
            }
            let desc = self.prepare(seq);
            self.q.push(&desc)?;
            self.report.submitted += 1;
            self.outstanding += 1;
            pushed += 1;
        }
        if pushed > 0 {
            self.q.doorbell()?;
            self.report.doorbells += 1;
        }
        Ok(())
    }

    /// Reads every record that is no longer pending, checks it and clears it; returns how
    /// many new completions it found.
    fn scan(&mut self) -> u64 {
        let mut found = 0;
        for slot in 0..self.slots.len() {
            let cpl = self.q.records();
            if CompletionRecord::status_of_head(cpl.status(slot)) == spec::STATUS_PENDING {
                continue;
            }
            let c = cpl.read(slot);
            cpl.clear(slot);
            found += u64::from(self.complete(slot, &c));
        }
        found
    }

    /// Accounts for record `c` found in `slot`; whether it completed a descriptor.
    fn complete(&mut self, slot: usize, c: &CompletionRecord) -> bool {
        let q = self.report.queue;
        let Some(seq) = self.seq_of(c.tag) else {
            self.report.stray += 1;
            self.report
                .note(format!("queue {q}: stray record in slot {slot}: {c}"));
            return false;
        };
        if self.done[seq as usize] {
            self.report.duplicated += 1;
            self.report.note(format!(
                "queue {q}: descriptor {seq} completed again (slot {slot}): {c}"
            ));
            return false;
        }
        let Some(f) = self.slots[slot].take_if(|f| f.seq == seq) else {
            self.report.stray += 1;
            self.report.note(format!(
                "queue {q}: record of descriptor {seq} in slot {slot}, not its own \
                 ({}): {c}",
                seq % self.slots.len() as u64
            ));
            return false;
        };
        self.done[seq as usize] = true;
        self.outstanding -= 1;
        if self.plant == Some(Plant::Duplicate) && self.report.completed + 1 == self.target {
            self.plant = None;
            let cpl = self.q.records();
            cpl.buffer()
                .write(slot * std::mem::size_of::<CompletionRecord>(), &c.encode());
        }
        self.report.completed += 1;
        self.report.by_op[f.op as usize] += 1;
        self.report.bytes += u64::from(f.len);
        if !c.is_ok() || c.bytes != f.len {
            self.report.failed += 1;
            self.report.note(format!(
                "queue {q}: descriptor {seq} ({} of {} bytes) failed: {c}",
                f.op.name(),
                f.len
            ));
            return true;
        }
        if let Err(e) = self.verify(slot, &f, c) {
            self.report.mismatched += 1;
            self.report.note(format!(
                "queue {q}: descriptor {seq} ({} of {} bytes, slot {slot}): {e}",
                f.op.name(),
                f.len
            ));
        }
        true
    }

    /// Checks what descriptor `f`, completed OK with `c`, left: the destination and its
    /// canaries, or the CRC.
    fn verify(&mut self, slot: usize, f: &InFlight, c: &CompletionRecord) -> Result<(), Failure> {
        if f.op == Op::Crc {
            let want = u64::from(u32::from_le_bytes(f.expect[..4].try_into().expect("4")));
            return if c.result == want {
                Ok(())
            } else {
                Err(Failure(format!(
                    "CRC32C result {:#x}, expected {want:#x}",
                    c.result
                )))
            };
        }
        let len = f.len as usize;
        if self.plant == Some(Plant::Mismatch) && f.op == Op::Copy {
            self.plant = None;
            let at = slot * STRIDE + f.dst_off + len / 2;
            let b = self.dst.to_vec(at, 1)[0];
            self.dst.write(at, &[!b]);
        }
        self.scratch.resize(len + 2 * GUARD, 0);
        self.dst
            .read(slot * STRIDE + f.dst_off - GUARD, &mut self.scratch);
        let (before, rest) = self.scratch.split_at(GUARD);
        let (data, after) = rest.split_at(len);
        check_bytes(data, &f.expect, "destination")?;
        check_all(before, CANARY, "canary before the destination")?;
        check_all(after, CANARY, "canary after the destination")
    }

    /// Runs `target` descriptors (every one submitted, then every one completed or given
    /// up on), adding each completion to `progress`.
    fn run(
        &mut self,
        target: u64,
        lost_after: Duration,
        progress: &AtomicU64,
    ) -> Result<(), Failure> {
        let mut last = Instant::now();
        loop {
            self.refill(target)?;
            let mut found = self.scan();
            if found == 0 {
                match self.wake {
                    Wake::Interrupt => {
                        let left = lost_after.saturating_sub(last.elapsed());
                        self.dev
                            .wait_interrupt(self.q.vector(), left.min(IRQ_NAP))?;
                    }
                    Wake::Poll => std::thread::sleep(POLL_NAP),
                }
                found = self.scan();
            }
            if found > 0 {
                last = Instant::now();
                progress.fetch_add(found, Ordering::Relaxed);
            }
            if self.report.submitted == target && self.outstanding == 0 {
                break;
            }
            if last.elapsed() >= lost_after {
                self.give_up(lost_after)?;
                break;
            }
        }
        self.report.finished = Some(Instant::now());
        // A record written late (a duplicate, or a stray) shows up here.
        std::thread::sleep(LINGER);
        self.scan();
        self.report.q_completed = self.q.read_reg(spec::Q_COMPLETED)?;
        self.report.q_errors = self.q.read_reg(spec::Q_ERRORS)?;
        Ok(())
    }

    /// Counts what is still pending as lost, noting how the queue stands.
    fn give_up(&mut self, waited: Duration) -> Result<(), Failure> {
        let q = self.report.queue;
        let pending: Vec<u64> = self.slots.iter().flatten().map(|f| f.seq).collect();
        debug_assert_eq!(pending.len(), self.outstanding);
        self.report.lost = pending.len() as u64;
        let mut msg = format!(
            "queue {q}: no completion for {waited:?} with {} pending (descriptor {} first); \
             Q_HEAD {}, tail {}, Q_STATUS {:#x}, Q_COMPLETED {}, Q_ERRORS {}, Q_HALT_REASON {}",
            pending.len(),
            pending.iter().min().unwrap_or(&0),
            self.q.head()?,
            self.q.tail(),
            self.q.status()?,
            self.q.read_reg(spec::Q_COMPLETED)?,
            self.q.read_reg(spec::Q_ERRORS)?,
            self.q.halt_reason()?,
        );
        if pending.len() >= self.slots.len() - 1 {
            let _ = write!(msg, " (the ring is full)");
        }
        self.report.notes.push(msg);
        Ok(())
    }
}

/// What a whole run saw.
#[derive(Debug)]
struct Report {
    options: Options,
    queues: Vec<QueueReport>,
    wall: Duration,
    server_pid: u32,
    server_alive: bool,
    server_log: String,
}

impl Report {
    fn total(&self, f: impl Fn(&QueueReport) -> u64) -> u64 {
        self.queues.iter().map(f).sum()
    }

    fn passed(&self) -> bool {
        self.server_alive
            && self
                .queues
                .iter()
                .all(|q| q.problems() == 0 && q.counters_agree() && q.completed == q.submitted)
    }

    fn print(&self) {
        let o = &self.options;
        println!(
            "soak: {} descriptors on {} queues through the vfio-user back end (domdma-device \
             pid {}), ring {} ({} in flight per queue), completions by {}",
            o.descriptors,
            o.queues,
            self.server_pid,
            o.ring,
            o.ring - 1,
            match o.wake {
                Wake::Interrupt => format!(
                    "interrupt (coalesced: {} completions or {} us)",
                    COALESCE.0, COALESCE.1
                ),
                Wake::Poll => "polling the records".into(),
            }
        );
        println!(
            "  queue  submitted  completed  lost  dup  mismatch  failed  stray  Q_COMPLETED  \
             Q_ERRORS"
        );
        for q in &self.queues {
            println!(
                "  {:>5}  {:>9}  {:>9}  {:>4}  {:>3}  {:>8}  {:>6}  {:>5}  {:>11}  {:>8}{}",
                q.queue,
                q.submitted,
                q.completed,
                q.lost,
                q.duplicated,
                q.mismatched,
                q.failed,
                q.stray,
                q.q_completed,
                q.q_errors,
                if q.counters_agree() {
                    ""
                } else {
                    "  <- device counters disagree"
                }
            );
        }
        for q in &self.queues {
            for n in &q.notes {
                println!("  ! {n}");
            }
        }
        let secs = self.wall.as_secs_f64();
        let completed = self.total(|q| q.completed);
        let bytes = self.total(|q| q.bytes);
        println!(
            "  completed: {completed} of {} submitted (COPY {}, FILL {}, CRC32C {}), {:.1} MiB",
            self.total(|q| q.submitted),
            self.total(|q| q.by_op[Op::Copy as usize]),
            self.total(|q| q.by_op[Op::Fill as usize]),
            self.total(|q| q.by_op[Op::Crc as usize]),
            bytes as f64 / f64::from(1 << 20)
        );
        let doorbells = self.total(|q| q.doorbells);
        println!(
            "  {doorbells} doorbells, {:.1} descriptors per doorbell",
            self.total(|q| q.submitted) as f64 / doorbells.max(1) as f64
        );
        println!(
            "  lost {}, duplicated {}, mismatched {}, failed {}, stray {}",
            self.total(|q| q.lost),
            self.total(|q| q.duplicated),
            self.total(|q| q.mismatched),
            self.total(|q| q.failed),
            self.total(|q| q.stray)
        );
        println!(
            "  wall time {secs:.2} s (first submission to last completion), {:.0} \
             descriptors/s, {:.1} MiB/s",
            completed as f64 / secs,
            bytes as f64 / f64::from(1 << 20) / secs
        );
        if !self.server_alive {
            println!("  ! the server process ended during the run");
        }
        if !self.passed() {
            let log = self.server_log.trim_end();
            if log.is_empty() {
                println!("  server log: empty");
            } else {
                println!("  server log (end):\n{log}");
            }
        }
        println!("soak: {}", if self.passed() { "PASSED" } else { "FAILED" });
    }
}

/// Starts a server, connects, runs every queue's soak in its own thread.
fn soak(o: &Options) -> Result<Report, Failure> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
    let mut server = Launch::new(bin)
        .args(["--queues".to_string(), o.queues.to_string()])
        .spawn()?;
    let dev = VfioUserBackend::connect(&VfioUserConfig::new(server.socket())).map_err(|e| {
        Failure(format!(
            "connecting: {}\n{}",
            Failure::from(e),
            server.log()
        ))
    })?;
    fresh(&dev)?;
    let caps = Capabilities::read(&dev)?;
    domdma_testkit::check!(
        caps.queues >= o.queues,
        "the device has {} queues, {} asked for",
        caps.queues,
        o.queues
    );
    let progress = AtomicU64::new(0);
    let start = Instant::now();
    let per_queue = |q: u32| {
        o.descriptors / u64::from(o.queues)
            + u64::from(u64::from(q) < o.descriptors % u64::from(o.queues))
    };
    let results: Vec<Result<QueueReport, Failure>> = std::thread::scope(|s| {
        let dev: &dyn DmaBackend = &dev;
        let progress = &progress;
        let handles: Vec<_> = (0..o.queues)
            .map(|q| {
                s.spawn(move || {
                    let target = per_queue(q);
                    let mut qs = QueueSoak::new(dev, q, o, target)?;
                    let r = qs.run(target, o.lost_after, progress);
                    r.map(|()| qs.report.clone())
                        .map_err(|e| Failure(format!("queue {q}: {e}")))
                })
            })
            .collect();
        let mut next = Duration::from_secs(5);
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if o.progress && start.elapsed() >= next {
                let done = progress.load(Ordering::Relaxed);
                eprintln!(
                    "soak: {done} of {} completed after {:.0} s ({:.0}/s)",
                    o.descriptors,
                    start.elapsed().as_secs_f64(),
                    done as f64 / start.elapsed().as_secs_f64()
                );
                next += Duration::from_secs(5);
            }
        }
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Failure("queue thread panicked".into())))
            })
            .collect()
    });
    let server_alive = server.is_running();
    let server_pid = server.pid();
    let server_log = server.log();
    let queues = results
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure(format!("{e}\nserver log (end):\n{server_log}")))?;
    let end = queues.iter().filter_map(|q| q.finished).max();
    let wall = end.map_or(start.elapsed(), |e| e - start);
    drop(dev);
    let _ = server.stop(DEFAULT_STOP_GRACE);
    Ok(Report {
        options: o.clone(),
        queues,
        wall,
        server_pid,
        server_alive,
        server_log,
    })
}

/// `cargo test`: a short soak that must pass, and one per planted fault that must count
/// it (and nothing else) and fail.
fn test_main() -> ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let smoke = libtest_mimic::Trial::test("soak::smoke", || {
        let o = Options {
            descriptors: SMOKE_DESCRIPTORS,
            lost_after: Duration::from_secs(5),
            progress: false,
            ..Options::default()
        };
        let r = soak(&o).map_err(|e| e.0)?;
        if r.passed() {
            Ok(())
        } else {
            r.print();
            Err("the soak counted problems (above)".into())
        }
    });
    let planted = [
        ("mismatch", Plant::Mismatch),
        ("duplicate", Plant::Duplicate),
        ("lost", Plant::Lost),
    ]
    .map(|(name, plant)| {
        libtest_mimic::Trial::test(format!("soak::counts_planted_{name}"), move || {
            let o = Options {
                descriptors: 2_000,
                lost_after: Duration::from_secs(1),
                progress: false,
                plant: Some(plant),
                ..Options::default()
            };
            let r = soak(&o).map_err(|e| e.0)?;
            let counts = [
                r.total(|q| q.mismatched),
                r.total(|q| q.duplicated),
                r.total(|q| q.lost),
                r.total(|q| q.failed + q.stray),
            ];
            let want = match plant {
                Plant::Mismatch => [1, 0, 0, 0],
                Plant::Duplicate => [0, 1, 0, 0],
                Plant::Lost => [0, 0, 1, 0],
            };
            if counts == want && !r.passed() {
                Ok(())
            } else {
                r.print();
                Err(format!(
                    "planted {name}: (mismatched, duplicated, lost, failed + stray) = \
                     {counts:?}, expected {want:?}, and a failed run"
                )
                .into())
            }
        })
    });
    let mut trials = vec![smoke];
    trials.extend(planted);
    libtest_mimic::run(&args, trials).exit_code()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    match soak(&o) {
        Ok(r) => {
            r.print();
            if r.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("soak: error: {e}");
            ExitCode::FAILURE
        }
    }
}
