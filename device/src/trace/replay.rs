//! Replay: a recorded trace's inputs run through today's device core, in process, and the
//! first place where it behaves differently.
//!
//! What a trace keeps of what the device read is enough to run its control path again:
//! every register write ([`Event::RegWrite`]; doorbells are [`Event::Doorbell`]), every
//! descriptor and BATCH element fetched with its bus address, every page-table entry a walk
//! read ([`Event::PteRead`]) and the bus memory layout (DMA_MAP / DMA_UNMAP). The replay
//! builds a device with the recorded configuration over anonymous memory laid out as the
//! VMM mapped it, re-applies the register writes in order, writes each entry the original
//! read (before the descriptor that read it runs), writes each descriptor where it was
//! fetched and rings the doorbell for it alone, waiting for it to finish before going on.
//! The replayed device records its own trace; per queue, descriptor by descriptor, the
//! two are compared:
//!
//! - the translations (IOVA page to bus page, read or write, page size), not the IOTLB
//!   hits and misses (descriptors of several queues ran in parallel in the original, one at
//!   a time here, so what the IOTLB holds differs);
//! - the faults (reason, IOVA, level, access);
//! - the completion (status, bytes, whether a record was written, and the result of the
//!   operations whose result does not depend on the data: everything but COMPARE and
//!   CRC32C);
//! - with data checksums (`--trace-data`, [`Event::Data`]): that each COPY's destination
//!   holds what it read (or, as recorded, does not: a corrupted copy, or a source that
//!   changed under the DMA), and each FILL's checksum (its pattern, phase and length).
//!
//! Not compared: COMPARE descriptors (a COMPARE stops at the first difference, in data the
//! trace does not keep), and descriptors that a disable or reset stopped part way when
//! recorded (no completion, or `STATUS_ABORTED`): how far they got is a matter of timing.
//!
//! Data itself is not recorded (only its checksums), so bytes moved are zeros here, and
//! results and checksums that depend on them (COMPARE, CRC32C, a COPY's checksum itself)
//! are not compared. Bus Master Enable is on throughout, and memory is the union of what was
//! mapped at each moment (a DMA_UNMAP of part of a region removes all of it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

use super::event::{Event, Record};
use super::file::{read_all, Trace, TraceError};
use super::recorder::{RecordOptions, Recorder, Tracer};
use super::view::{descriptor, opcode_name};
use crate::core::inject::Rule;
use crate::core::{Device, DeviceConfig};
use crate::irq::RecordingInterrupts;
use crate::pci::{PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use crate::spec::*;

/// How long the replay waits for one descriptor.
pub const DESCRIPTOR_TIMEOUT: Duration = Duration::from_secs(2);

/// Pages of one descriptor's translations compared at most.
const MAX_PAGES: usize = 1 << 16;

/// What can stop a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trace (or the replay's own) could not be read or written.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// The trace lost events (its writer fell behind), so its inputs are incomplete.
    #[error("the trace lost {0} events (its writer fell behind: every CPU was busy), so it cannot be replayed; record again with less load, or fewer queues busy at once")]
    Incomplete(u64),
    /// The replay's own trace lost events (its writer fell behind).
    #[error("the replay's own trace lost {0} events (its writer fell behind); run the replay again on a less busy machine")]
    ReplayIncomplete(u64),
    /// The recorded configuration is not one this device accepts.
    #[error("the trace's device configuration is refused: {0}")]
    Config(String),
    /// Bus memory could not be made.
    #[error("cannot make {size:#x} bytes of replay memory at {addr:#x}: {why}")]
    Memory {
        /// Bus address.
        addr: u64,
        /// Size.
        size: u64,
        /// Why.
        why: String,
    },
}

/// What a replay changes in the device, to see where a changed core diverges.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Injection rules in force while replaying.
    pub inject: Vec<Rule>,
}

/// The first difference between the recording and the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Time of the recorded event that differs (its descriptor's completion, or its fetch
    /// when it did not complete).
    pub t_ns: u64,
    /// Queue.
    pub queue: u16,
    /// Ring slot of the descriptor.
    pub slot: u32,
    /// Its index among the queue's descriptors in the trace (0 = the first).
    pub index: usize,
    /// What differs ("completion status", "translation", "fault", ...).
    pub what: String,
    /// As recorded.
    pub recorded: String,
    /// As replayed.
    pub replayed: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "at {:.3} us, queue {} slot {} (descriptor {} of the queue): {}: recorded {}, replayed {}",
            self.t_ns as f64 / 1e3,
            self.queue,
            self.slot,
            self.index,
            self.what,
            self.recorded,
            self.replayed
        )
    }
}

/// What a replay found.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    /// Descriptors of the recording.
    pub descriptors: usize,
    /// Descriptors compared (up to the divergence).
    pub compared: usize,
    /// The first divergence, if any.
    pub divergence: Option<Divergence>,
    /// What the replay could not do as recorded (a queue whose head was elsewhere, ...).
    pub notes: Vec<String>,
}

/// One descriptor as a trace shows it: what it did.
#[derive(Debug, Clone, Default, PartialEq)]
struct Outcome {
    t_ns: u64,
    slot: u32,
    opcode: u8,
    /// (write, IOVA page) -> (bus page, page size).
    pages: BTreeMap<(bool, u64), (u64, u64)>,
    faults: Vec<(u8, u64, u32, u8)>,
    complete: Option<(u8, u32, bool, u64)>,
    /// Bus addresses of the descriptor and of its completion record.
    buses: (u64, u64),
    injected: bool,
    /// Its operations' data checksums ([`Event::Data`]): (opcode, bytes, src, dst).
    data: Vec<(u8, u32, u32, u32)>,
}

/// Per queue, the descriptors of a trace in order.
fn outcomes(records: &[Record]) -> BTreeMap<u16, Vec<Outcome>> {
    let mut out: BTreeMap<u16, Vec<Outcome>> = BTreeMap::new();
    let mut open: BTreeMap<u16, Outcome> = BTreeMap::new();
    for r in records {
        match r.event {
            Event::Fetch {
                queue,
                slot,
                desc,
                bus,
                ..
            } => {
                if let Some(o) = open.remove(&queue) {
                    out.entry(queue).or_default().push(o);
                }
                open.insert(
                    queue,
                    Outcome {
                        t_ns: r.t_ns,
                        slot,
                        opcode: descriptor(&desc).opcode,
                        buses: (bus, 0),
                        ..Outcome::default()
                    },
                );
            }
            Event::Translate(t) => {
                if let Some(o) = open.get_mut(&t.queue) {
                    let page = 0x1000u64;
                    let first = t.iova & !(page - 1);
                    let end = t.iova.saturating_add(t.len);
                    let mut iova = first;
                    while iova < end && o.pages.len() < MAX_PAGES {
                        let bus = (t.bus & !(page - 1)).wrapping_add(iova - first);
                        o.pages.insert((t.write, iova), (bus, t.page_size));
                        iova += page;
                    }
                }
            }
            Event::Fault(f) => {
                if let Some(o) = open.get_mut(&f.queue) {
                    o.faults.push((f.reason, f.iova, f.level, f.access));
                }
            }
            Event::Injected { queue, .. } => {
                if let Some(o) = open.get_mut(&queue) {
                    o.injected = true;
                }
            }
            Event::Data {
                queue,
                opcode,
                bytes,
                src,
                dst,
            } => {
                if let Some(o) = open.get_mut(&queue) {
                    o.data.push((opcode, bytes, src, dst));
                }
            }
            Event::Complete {
                queue,
                status,
                bytes,
                result,
                written,
                record_bus,
                ..
            } => {
                if let Some(mut o) = open.remove(&queue) {
                    o.t_ns = r.t_ns;
                    o.buses.1 = record_bus;
                    o.complete = Some((status, bytes, written, result));
                    out.entry(queue).or_default().push(o);
                }
            }
            _ => {}
        }
    }
    for (q, o) in open {
        out.entry(q).or_default().push(o);
    }
    out
}

fn describe_complete(c: &Option<(u8, u32, bool, u64)>) -> String {
    match c {
        None => "no completion".into(),
        Some((s, b, w, r)) => format!(
            "{} bytes {b} result {r:#x}{}",
            crate::spec::wire::status_name(*s),
            if *w { "" } else { " (no record written)" }
        ),
    }
}

/// The first difference between `a` (recorded) and `b` (replayed), as (what, a, b);
/// `data`: the trace has data checksums.
fn compare(a: &Outcome, b: &Outcome, data: bool) -> Option<(String, String, String)> {
    if a.buses.0 != b.buses.0 {
        let (x, y) = (a.buses.0, b.buses.0);
        return Some((
            "descriptor bus address".into(),
            format!("{x:#x}"),
            format!("{y:#x}"),
        ));
    }
    if a.pages != b.pages {
        let diff = a
            .pages
            .iter()
            .find(|(k, v)| b.pages.get(k) != Some(v))
            .map(|(k, v)| (*k, Some(*v), b.pages.get(k).copied()))
            .or_else(|| {
                b.pages
                    .iter()
                    .find(|(k, _)| !a.pages.contains_key(k))
                    .map(|(k, v)| (*k, None, Some(*v)))
            });
        if let Some(((w, iova), ra, rb)) = diff {
            let show = |x: Option<(u64, u64)>| match x {
                Some((bus, size)) => format!("bus {bus:#x} (page {size:#x})"),
                None => "not translated".into(),
            };
            return Some((
                format!(
                    "translation of IOVA {iova:#x} ({})",
                    if w { "write" } else { "read" }
                ),
                show(ra),
                show(rb),
            ));
        }
    }
    if a.faults != b.faults {
        let show = |f: &Vec<(u8, u64, u32, u8)>| {
            let v: Vec<String> = f
                .iter()
                .map(|(r, iova, l, acc)| {
                    format!(
                        "{} at {iova:#x} level {l} access {acc:#x}",
                        crate::spec::wire::fault_reason_name(*r)
                    )
                })
                .collect();
            if v.is_empty() {
                "none".into()
            } else {
                v.join("; ")
            }
        };
        return Some(("faults".into(), show(&a.faults), show(&b.faults)));
    }
    let data_result = matches!(a.opcode, OP_COMPARE | OP_CRC32C);
    let strip = |c: &Option<(u8, u32, bool, u64)>| {
        c.map(|(s, by, w, r)| (s, by, w, if data_result { 0 } else { r }))
    };
    if a.buses.1 != b.buses.1 {
        let (x, y) = (a.buses.1, b.buses.1);
        return Some((
            "completion record bus address".into(),
            format!("{x:#x}"),
            format!("{y:#x}"),
        ));
    }
    if strip(&a.complete) != strip(&b.complete) {
        return Some((
            "completion".into(),
            describe_complete(&a.complete),
            describe_complete(&b.complete),
        ));
    }
    if data {
        return compare_data(&a.data, &b.data);
    }
    None
}

/// The first difference in data checksums, as (what, recorded, replayed). The replay's
/// memory does not hold the recorded data (a trace keeps checksums, not bytes), so what is
/// compared is what does not depend on it: that a COPY's destination holds what it read
/// (its two checksums are equal, or not, in both), and a FILL's checksum (its pattern).
/// COMPARE and CRC32C read data only; their checksums are not compared.
fn compare_data(
    a: &[(u8, u32, u32, u32)],
    b: &[(u8, u32, u32, u32)],
) -> Option<(String, String, String)> {
    if a.len() != b.len() {
        return Some((
            "data checksums (operations)".into(),
            a.len().to_string(),
            b.len().to_string(),
        ));
    }
    for (i, (&(op, bytes, src, dst), &(op_b, bytes_b, src_b, dst_b))) in a.iter().zip(b).enumerate()
    {
        let which = if a.len() > 1 {
            format!(" (data operation {i} of the BATCH)")
        } else {
            String::new()
        };
        let show = |src: u32, dst: u32| {
            let same = if src == dst {
                "the destination holds what was read"
            } else {
                "the destination differs from what was read"
            };
            format!("read crc32c {src:#010x}, wrote {dst:#010x}: {same}")
        };
        if (op, bytes) != (op_b, bytes_b) {
            return Some((
                format!("data checksums{which}"),
                format!("{} of {bytes} bytes", opcode_name(op)),
                format!("{} of {bytes_b} bytes", opcode_name(op_b)),
            ));
        }
        match op {
            OP_COPY if (src == dst) != (src_b == dst_b) => {
                return Some((
                    format!("data of the COPY{which}"),
                    show(src, dst),
                    show(src_b, dst_b),
                ));
            }
            OP_FILL if dst != dst_b => {
                return Some((
                    format!("data of the FILL{which}"),
                    format!("crc32c {dst:#010x}"),
                    format!("crc32c {dst_b:#010x}"),
                ));
            }
            _ => {}
        }
    }
    None
}

/// Replay memory: anonymous regions where the VMM mapped bus memory.
struct Memory {
    atomic: GuestMemoryAtomic<GuestMemoryMmap>,
    regions: BTreeMap<u64, Arc<GuestRegionMmap>>,
    /// Regions changed since the device last saw them (published before the next use:
    /// a VMM maps thousands of pages one by one).
    dirty: bool,
}

impl Memory {
    /// Let the device see the regions as they are now.
    fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let regions: Vec<_> = self.regions.values().cloned().collect();
        if let Ok(m) = GuestMemoryMmap::from_arc_regions(regions) {
            let guard = self.atomic.lock().expect("replay memory lock");
            guard.replace(m);
        }
    }

    fn map(&mut self, addr: u64, size: u64) -> Result<(), ReplayError> {
        let bad = |why: String| ReplayError::Memory { addr, size, why };
        self.unmap(addr, size);
        let len = usize::try_from(size).map_err(|_| bad("too large".into()))?;
        let m = MmapRegion::new(len).map_err(|e| bad(e.to_string()))?;
        let r =
            GuestRegionMmap::new(m, GuestAddress(addr)).ok_or_else(|| bad("bad range".into()))?;
        self.regions.insert(addr, Arc::new(r));
        self.dirty = true;
        Ok(())
    }

    fn unmap(&mut self, addr: u64, size: u64) {
        let end = addr.saturating_add(size);
        let gone: Vec<u64> = self
            .regions
            .iter()
            .filter(|(&a, r)| {
                a < end && a.saturating_add(vm_memory::GuestMemoryRegion::len(&***r)) > addr
            })
            .map(|(&a, _)| a)
            .collect();
        for a in &gone {
            self.regions.remove(a);
        }
        self.dirty |= !gone.is_empty();
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        self.publish();
        let _ = self.atomic.memory().write_slice(bytes, GuestAddress(addr));
    }
}

fn bytes_of(words: &[u64; 8]) -> [u8; 64] {
    let mut b = [0u8; 64];
    for (i, w) in words.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// Replay the trace at `path` (see the module documentation); the replay's own trace goes
/// to `scratch` (a file the caller may delete).
pub fn replay(
    path: &Path,
    scratch: &Path,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    let trace = read_all(path)?;
    replay_trace(&trace, scratch, opts)
}

/// [`replay`] of a trace already read.
pub fn replay_trace(
    trace: &Trace,
    scratch: &Path,
    opts: &ReplayOptions,
) -> Result<ReplayReport, ReplayError> {
    match trace.dropped() {
        0 => {}
        n => return Err(ReplayError::Incomplete(n)),
    }
    let c = &trace.header.config;
    let config = DeviceConfig::from(c);
    config
        .validate()
        .map_err(|e| ReplayError::Config(e.to_string()))?;
    let mut mem = Memory {
        atomic: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        regions: BTreeMap::new(),
        dirty: false,
    };
    let recorder = Recorder::open(
        scratch,
        c.clone(),
        RecordOptions {
            data: trace.header.data,
            // The replay's own trace must be complete: its writer competes as an equal.
            background: false,
            ..RecordOptions::default()
        },
    )?;
    let irq = Arc::new(RecordingInterrupts::new());
    let mut dev = Device::with_tracer(
        config.clone(),
        mem.atomic.clone(),
        irq,
        Tracer::new(Arc::clone(&recorder)),
    );
    dev.set_injection(&opts.inject);
    let cmd = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    dev.config_write(PCI_COMMAND as u64, &cmd.to_le_bytes());

    let records = &trace.records;
    let mut notes = Vec::new();
    let qreg = |q: u16, r: u64| QUEUE_BASE + u64::from(q) * QUEUE_STRIDE + r;
    let read_reg = |dev: &mut Device, reg: u64| {
        let mut b = [0u8; 4];
        dev.bar_read(REGS_BAR, reg, &mut b);
        u32::from_le_bytes(b)
    };
    for (i, r) in records.iter().enumerate() {
        match r.event {
            Event::DmaMap { iova, size, .. } => mem.map(iova, size)?,
            Event::DmaUnmap { iova, size } => mem.unmap(iova, size),
            Event::RegWrite { reg, value } => {
                mem.publish();
                dev.bar_write(REGS_BAR, reg, &value.to_le_bytes());
            }
            Event::PteRead { addr, value, .. } => mem.write(addr, &value.to_le_bytes()),
            Event::Fetch {
                queue,
                slot,
                bus,
                desc,
                ..
            } => {
                // What this descriptor will read: its entries and BATCH elements (recorded
                // after its fetch), written before it runs.
                let mut completes = false;
                for later in &records[i + 1..] {
                    match later.event {
                        Event::PteRead {
                            queue: q,
                            addr,
                            value,
                        } if q == queue => mem.write(addr, &value.to_le_bytes()),
                        Event::Element {
                            queue: q,
                            bus,
                            desc,
                            ..
                        } if q == queue => mem.write(bus, &bytes_of(&desc)),
                        Event::Complete { queue: q, .. } if q == queue => {
                            completes = true;
                            break;
                        }
                        Event::Fetch { queue: q, .. } if q == queue => break,
                        _ => {}
                    }
                }
                mem.write(bus, &bytes_of(&desc));
                mem.publish();
                let head = read_reg(&mut dev, qreg(queue, Q_HEAD));
                if head != slot {
                    notes.push(format!(
                        "queue {queue}: the replayed head was {head} where slot {slot} was fetched"
                    ));
                }
                let size = read_reg(&mut dev, qreg(queue, Q_SIZE)).max(1);
                dev.bar_write(
                    REGS_BAR,
                    qreg(queue, Q_TAIL),
                    &(slot.wrapping_add(1) % size).to_le_bytes(),
                );
                // A descriptor the recording never saw complete (a disable or reset stopped
                // it) runs here until the recording's next register write, at most.
                let wait = if completes {
                    DESCRIPTOR_TIMEOUT
                } else {
                    records[i + 1..]
                        .iter()
                        .find(|l| matches!(l.event, Event::RegWrite { .. }))
                        .map_or(Duration::ZERO, |l| {
                            Duration::from_nanos(l.t_ns.saturating_sub(r.t_ns))
                        })
                        .min(DESCRIPTOR_TIMEOUT)
                };
                {
                    let until = Instant::now() + wait;
                    loop {
                        let head = read_reg(&mut dev, qreg(queue, Q_HEAD));
                        let status = read_reg(&mut dev, qreg(queue, Q_STATUS));
                        if head != slot {
                            break;
                        }
                        if status & Q_STATUS_ENABLED == 0 || status & Q_STATUS_ERROR != 0 {
                            notes.push(format!(
                                "queue {queue} slot {slot}: the replayed queue stopped (Q_STATUS {status:#x})"
                            ));
                            break;
                        }
                        if Instant::now() > until {
                            if completes {
                                notes.push(format!(
                                    "queue {queue} slot {slot}: did not complete within {DESCRIPTOR_TIMEOUT:?}"
                                ));
                            }
                            break;
                        }
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
            _ => {}
        }
    }
    drop(dev);
    recorder.finish()?;
    if recorder.dropped() > 0 {
        return Err(ReplayError::ReplayIncomplete(recorder.dropped()));
    }
    let replayed = read_all(scratch)?;

    let a = outcomes(records);
    let b = outcomes(&replayed.records);
    let descriptors = a.values().map(Vec::len).sum();
    // In the order the recording completed them.
    let mut order: Vec<(u64, u16, usize)> = a
        .iter()
        .flat_map(|(&q, v)| v.iter().enumerate().map(move |(i, o)| (o.t_ns, q, i)))
        .collect();
    order.sort_unstable();
    let empty = Vec::new();
    // Each recorded descriptor's replayed one, in queue order. A descriptor a disable or
    // reset stopped when recorded may not have been fetched at all in the replay (the stop
    // came first): then it has none, and the next recorded one pairs with the next
    // replayed one.
    let stopped =
        |o: &Outcome| o.complete.is_none() || matches!(o.complete, Some((STATUS_ABORTED, ..)));
    let pairs: BTreeMap<u16, Vec<Option<usize>>> = a
        .iter()
        .map(|(&q, recorded)| {
            let replayed = b.get(&q).unwrap_or(&empty);
            let mut j = 0;
            let pair = recorded
                .iter()
                .map(|ra| {
                    let same = replayed
                        .get(j)
                        .is_some_and(|rb| rb.slot == ra.slot && rb.buses.0 == ra.buses.0);
                    if !same && stopped(ra) {
                        return None;
                    }
                    let at = (j < replayed.len()).then_some(j);
                    j += 1;
                    at
                })
                .collect();
            (q, pair)
        })
        .collect();
    let mut compared = 0;
    let mut divergence = None;
    for (t_ns, q, i) in order {
        let ra = &a[&q][i];
        let rb = pairs[&q][i].and_then(|j| b.get(&q).unwrap_or(&empty).get(j));
        if stopped(ra) || ra.opcode == OP_COMPARE {
            // Stopped part way by a disable or reset when recorded (how far it got depends
            // on timing, not on the core), or a COMPARE (it stops at the first difference,
            // in data the trace does not keep). Counted, not compared.
            compared += 1;
            continue;
        }
        let found = match rb {
            None => Some((
                "descriptor".into(),
                describe_complete(&ra.complete),
                "not run".into(),
            )),
            Some(rb) => compare(ra, rb, trace.header.data),
        };
        compared += 1;
        if let Some((what, recorded, replayed)) = found {
            let what = if ra.injected {
                format!("{what} (an injection rule acted on it when it was recorded)")
            } else {
                what
            };
            divergence = Some(Divergence {
                t_ns,
                queue: q,
                slot: ra.slot,
                index: i,
                what,
                recorded,
                replayed,
            });
            break;
        }
    }
    Ok(ReplayReport {
        descriptors,
        compared,
        divergence,
        notes,
    })
}
