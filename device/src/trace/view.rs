//! What the `domdma-trace` tool shows of a trace: a summary, a filtered listing, and the
//! Chrome / Perfetto JSON trace format (open it at <https://ui.perfetto.dev>).

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};

use serde::Serialize;
use serde_json::{json, Value};

use super::event::{Event, Injected, Record, ResetKind};
use super::file::Trace;
use crate::spec::wire::{fault_reason_name, status_name, Descriptor};
use crate::spec::*;

/// The descriptor a [`Event::Fetch`] carries.
pub fn descriptor(desc: &[u64; 8]) -> Descriptor {
    let mut raw = [0u8; DESC_SIZE as usize];
    for (i, w) in desc.iter().enumerate() {
        raw[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    Descriptor::decode(&raw)
}

/// A readable name for an opcode.
pub fn opcode_name(op: u8) -> &'static str {
    match op {
        OP_NOP => "NOP",
        OP_COPY => "COPY",
        OP_FILL => "FILL",
        OP_COMPARE => "COMPARE",
        OP_CRC32C => "CRC32C",
        OP_BATCH => "BATCH",
        _ => "unknown",
    }
}

fn page_name(size: u64) -> &'static str {
    match size {
        0 => "passthrough",
        0x1000 => "4K",
        0x20_0000 => "2M",
        0x4000_0000 => "1G",
        _ => "other",
    }
}

/// Which records to show (`domdma-trace show`); every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only events of this queue.
    pub queue: Option<u16>,
    /// Only events of this domain.
    pub domain: Option<u16>,
    /// Only events touching IOVAs in `[start, end)`.
    pub iova: Option<(u64, u64)>,
    /// Only events of these kinds ([`Event::kind`]); empty: all.
    pub kinds: Vec<String>,
}

impl Filter {
    /// Whether `event` passes.
    pub fn matches(&self, event: &Event) -> bool {
        if self.queue.is_some() && event.queue() != self.queue {
            return false;
        }
        if self.domain.is_some() && event.domain() != self.domain {
            return false;
        }
        if let Some((start, end)) = self.iova {
            match event.iova_range() {
                Some((first, len)) => {
                    let last = first.saturating_add(len.max(1) - 1);
                    if last < start || first >= end {
                        return false;
                    }
                }
                None => return false,
            }
        }
        self.kinds.is_empty() || self.kinds.iter().any(|k| k == event.kind())
    }
}

/// One record as one line of text.
pub fn line(r: &Record) -> String {
    let mut s = format!("{:>14.3} us  {:<10} ", r.t_ns as f64 / 1e3, r.event.kind());
    let _ = match r.event {
        Event::Doorbell { queue, tail } => write!(s, "q{queue} tail={tail}"),
        Event::RegWrite { reg, value } => write!(s, "reg {reg:#05x} <- {value:#x}"),
        Event::PteRead { queue, addr, value } => {
            write!(s, "q{queue} entry at bus {addr:#x} = {value:#x}")
        }
        Event::Element {
            queue, index, bus, ..
        } => write!(s, "q{queue} BATCH element {index} at bus {bus:#x}"),
        Event::Fetch {
            queue,
            slot,
            iova,
            bus,
            desc,
        } => {
            let d = descriptor(&desc);
            write!(
                s,
                "q{queue} slot={slot} iova={iova:#x} bus={bus:#x} {} len={} src={:#x} dst={:#x} cpl={:#x} tag={:#x} flags={:#x}",
                opcode_name(d.opcode),
                d.len,
                d.src,
                d.dst,
                d.completion,
                d.tag,
                d.flags
            )
        }
        Event::Translate(t) => write!(
            s,
            "q{} dom{} iova={:#x} -> bus={:#x} len={:#x} page={} {} hits={} misses={}",
            queue_name(t.queue),
            t.domain,
            t.iova,
            t.bus,
            t.len,
            page_name(t.page_size),
            if t.write { "write" } else { "read" },
            t.hits,
            t.misses
        ),
        Event::Complete {
            queue,
            slot,
            status,
            bytes,
            result,
            written,
            record_bus,
        } => write!(
            s,
            "q{queue} slot={slot} status={} bytes={bytes} result={result:#x}{}",
            status_name(status),
            if written {
                format!(" record at bus {record_bus:#x}")
            } else {
                " (no record written)".to_owned()
            }
        ),
        Event::Fault(f) => write!(
            s,
            "q{} dom{} {} access={:#x} iova={:#x} info={:#x} level={} seq={}{}",
            queue_name(f.queue),
            f.domain,
            fault_reason_name(f.reason),
            f.access,
            f.iova,
            f.info,
            f.level,
            f.seq,
            if f.injected { " (injected)" } else { "" }
        ),
        Event::Interrupt { vector, queue } => {
            write!(s, "vector={vector} for {}", queue_or_log(queue))
        }
        Event::Invalidate {
            kind,
            domain,
            iova,
            len,
        } => match u32::from(kind) {
            INV_CMD_ALL => write!(s, "all"),
            INV_CMD_DOMAIN => write!(s, "dom{domain}"),
            _ => write!(s, "dom{domain} iova={iova:#x} len={len:#x}"),
        },
        Event::DmaMap {
            iova,
            size,
            read,
            write,
            fd,
        } => write!(
            s,
            "bus={iova:#x} size={size:#x} {}{}{}",
            if read { "r" } else { "-" },
            if write { "w" } else { "-" },
            if fd { " fd" } else { " dma_read/dma_write" }
        ),
        Event::DmaUnmap { iova, size } => write!(s, "bus={iova:#x} size={size:#x}"),
        Event::Reset { kind } => match kind {
            ResetKind::Device => write!(s, "device (DEV_CTRL_RESET)"),
            ResetKind::Function => write!(s, "function-level"),
        },
        Event::Injected { queue, what } => write!(s, "q{queue} {}", injected_name(&what)),
        Event::Data {
            queue,
            opcode,
            bytes,
            src,
            dst,
        } => write!(
            s,
            "q{queue} {} bytes={bytes} src_crc32c={src:#010x} dst_crc32c={dst:#010x}",
            opcode_name(opcode)
        ),
        Event::Dropped { total } => write!(s, "{total} events dropped so far (writer behind)"),
    };
    s
}

/// What an injection did, in words.
pub fn injected_name(what: &Injected) -> String {
    match *what {
        Injected::CorruptCopy { offset, xor } => {
            format!("corrupt-copy: byte {offset:#x} XORed with {xor:#x}")
        }
        Injected::ErrorStatus { status } => {
            format!("error-status: completed with {}", status_name(status))
        }
        Injected::DropInterrupt { vector } => format!("drop-interrupt: vector {vector} not sent"),
        Injected::DelayInterrupt { vector, us } => {
            format!("delay-interrupt: vector {vector} sent {us} us late")
        }
        Injected::Stall => "stall-queue: the queue stopped fetching".into(),
        Injected::SpuriousFault => "spurious-fault: a fault nobody caused".into(),
        Injected::NeverComplete => "never-complete: this descriptor will not complete".into(),
    }
}

fn queue_name(q: u16) -> String {
    if q == super::NO_QUEUE {
        "-".into()
    } else {
        q.to_string()
    }
}

fn queue_or_log(q: u16) -> String {
    if q == super::NO_QUEUE {
        "the fault log".into()
    } else {
        format!("queue {q}")
    }
}

/// Per-queue figures of a [`Summary`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueSummary {
    /// Doorbells.
    pub doorbells: u64,
    /// Descriptors fetched.
    pub fetched: u64,
    /// Descriptors completed.
    pub completed: u64,
    /// Completed with a status other than OK.
    pub errors: u64,
    /// Bytes processed.
    pub bytes: u64,
    /// Fetch-to-completion time, median, microseconds.
    pub latency_p50_us: f64,
    /// Fetch-to-completion time, 99th percentile, microseconds.
    pub latency_p99_us: f64,
    /// Interrupts raised for the queue.
    pub interrupts: u64,
}

/// Per-domain figures of a [`Summary`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DomainSummary {
    /// Translation events.
    pub translations: u64,
    /// Pages found in the IOTLB.
    pub hits: u64,
    /// Pages walked.
    pub misses: u64,
    /// Translations by page size ("4K", "2M", "1G", "passthrough").
    pub page_sizes: BTreeMap<String, u64>,
    /// Faults.
    pub faults: u64,
}

/// What a trace holds, in figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Records.
    pub records: u64,
    /// Data checksums were recorded (`--trace-data`).
    pub data_checksums: bool,
    /// Time from the first record to the last, microseconds.
    pub duration_us: f64,
    /// Records by kind.
    pub kinds: BTreeMap<String, u64>,
    /// By queue.
    pub queues: BTreeMap<u16, QueueSummary>,
    /// By domain.
    pub domains: BTreeMap<u16, DomainSummary>,
    /// Faults by reason name.
    pub faults: BTreeMap<String, u64>,
    /// Events the recorder dropped (its writer fell behind).
    pub dropped: u64,
    /// The file ended inside a record.
    pub truncated: bool,
}

impl Summary {
    /// Summarize `trace`.
    pub fn of(trace: &Trace) -> Self {
        let mut s = Summary {
            records: trace.records.len() as u64,
            data_checksums: trace.header.data,
            truncated: trace.truncated,
            ..Default::default()
        };
        if let (Some(first), Some(last)) = (trace.records.first(), trace.records.last()) {
            s.duration_us = (last.t_ns - first.t_ns) as f64 / 1e3;
        }
        let mut fetched_at: HashMap<u16, u64> = HashMap::new();
        let mut latencies: HashMap<u16, Vec<u64>> = HashMap::new();
        for r in &trace.records {
            *s.kinds.entry(r.event.kind().into()).or_default() += 1;
            match r.event {
                Event::Doorbell { queue, .. } => s.queues.entry(queue).or_default().doorbells += 1,
                Event::Fetch { queue, .. } => {
                    s.queues.entry(queue).or_default().fetched += 1;
                    fetched_at.insert(queue, r.t_ns);
                }
                Event::Complete {
                    queue,
                    status,
                    bytes,
                    ..
                } => {
                    let q = s.queues.entry(queue).or_default();
                    q.completed += 1;
                    q.bytes += u64::from(bytes);
                    if status != STATUS_OK {
                        q.errors += 1;
                    }
                    if let Some(t) = fetched_at.remove(&queue) {
                        latencies.entry(queue).or_default().push(r.t_ns - t);
                    }
                }
                Event::Translate(t) => {
                    let d = s.domains.entry(t.domain).or_default();
                    d.translations += 1;
                    d.hits += u64::from(t.hits);
                    d.misses += u64::from(t.misses);
                    *d.page_sizes
                        .entry(page_name(t.page_size).into())
                        .or_default() += 1;
                }
                Event::Fault(f) => {
                    s.domains.entry(f.domain).or_default().faults += 1;
                    *s.faults
                        .entry(fault_reason_name(f.reason).into())
                        .or_default() += 1;
                }
                Event::Interrupt { queue, .. } if queue != super::NO_QUEUE => {
                    s.queues.entry(queue).or_default().interrupts += 1;
                }
                Event::Dropped { total } => s.dropped = s.dropped.max(total),
                _ => {}
            }
        }
        for (q, mut l) in latencies {
            l.sort_unstable();
            let at = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize] as f64 / 1e3;
            let qs = s.queues.entry(q).or_default();
            qs.latency_p50_us = at(0.5);
            qs.latency_p99_us = at(0.99);
        }
        s
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} records over {:.3} ms{}{}",
            self.records,
            self.duration_us / 1e3,
            if self.data_checksums {
                ", with data checksums"
            } else {
                ""
            },
            if self.truncated {
                " (the file ends inside a record: the recorder was stopped mid-write)"
            } else {
                ""
            }
        )?;
        if self.dropped > 0 {
            writeln!(
                f,
                "{} events DROPPED (the writer fell behind)",
                self.dropped
            )?;
        }
        let kinds: Vec<_> = self.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(f, "events: {}", kinds.join(", "))?;
        for (q, s) in &self.queues {
            writeln!(
                f,
                "queue {q}: {} doorbells, {} fetched, {} completed ({} errors), {} bytes, fetch->completion p50 {:.1} us p99 {:.1} us, {} interrupts",
                s.doorbells, s.fetched, s.completed, s.errors, s.bytes, s.latency_p50_us, s.latency_p99_us, s.interrupts
            )?;
        }
        for (d, s) in &self.domains {
            let pages = s.hits + s.misses;
            let rate = if pages == 0 {
                0.0
            } else {
                100.0 * s.hits as f64 / pages as f64
            };
            let sizes: Vec<_> = s
                .page_sizes
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(
                f,
                "domain {d}: {} translations ({}), IOTLB {} hits / {} misses ({rate:.1}% hit), {} faults",
                s.translations,
                sizes.join(", "),
                s.hits,
                s.misses,
                s.faults
            )?;
        }
        if !self.faults.is_empty() {
            let faults: Vec<_> = self
                .faults
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            writeln!(f, "faults: {}", faults.join(", "))?;
        }
        Ok(())
    }
}

/// Track (thread id) of the device-wide events in the Perfetto JSON.
const DEVICE_TRACK: u64 = 0;
/// Track of the fault log's interrupts and the fault list.
const FAULT_TRACK: u64 = 1;

fn queue_track(q: u16) -> u64 {
    10 + u64::from(q)
}

/// `trace` in the Chrome / Perfetto JSON trace format: one track per queue (each
/// descriptor a slice from its fetch to its completion, with doorbells, translations and
/// interrupts as instants on it), a "device" track (DMA_MAP / DMA_UNMAP, resets, drops)
/// and a "faults" track; faults and invalidations are also global instants.
pub fn perfetto(trace: &Trace) -> Value {
    let pid = 1;
    let us = |t: u64| t as f64 / 1e3;
    let mut events = vec![
        json!({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": "domdma device"}}),
        json!({"ph": "M", "pid": pid, "tid": DEVICE_TRACK, "name": "thread_name", "args": {"name": "device"}}),
        json!({"ph": "M", "pid": pid, "tid": FAULT_TRACK, "name": "thread_name", "args": {"name": "faults"}}),
    ];
    for q in 0..trace.header.config.queues.min(u32::from(u16::MAX)) as u16 {
        events.push(
            json!({"ph": "M", "pid": pid, "tid": queue_track(q), "name": "thread_name",
            "args": {"name": format!("queue {q}")}}),
        );
        events.push(
            json!({"ph": "M", "pid": pid, "tid": queue_track(q), "name": "thread_sort_index",
            "args": {"sort_index": 10 + u32::from(q)}}),
        );
    }
    let mut open: HashMap<u16, (u64, Descriptor, u32)> = HashMap::new();
    let instant = |name: String, t: u64, tid: u64, scope: &str, args: Value| json!({"ph": "i", "pid": pid, "tid": tid, "ts": us(t), "name": name, "s": scope, "args": args});
    for r in &trace.records {
        let t = r.t_ns;
        match r.event {
            Event::Doorbell { queue, tail } => events.push(instant(
                "doorbell".into(),
                t,
                queue_track(queue),
                "t",
                json!({"tail": tail}),
            )),
            Event::Fetch {
                queue, slot, desc, ..
            } => {
                open.insert(queue, (t, descriptor(&desc), slot));
            }
            Event::Complete {
                queue,
                slot,
                status,
                bytes,
                result,
                ..
            } => {
                let (start, d, _) = open
                    .remove(&queue)
                    .unwrap_or((t, Descriptor::default(), slot));
                events.push(json!({
                    "ph": "X", "pid": pid, "tid": queue_track(queue), "ts": us(start),
                    "dur": us(t.saturating_sub(start)),
                    "name": opcode_name(d.opcode),
                    "args": {"slot": slot, "status": status_name(status), "bytes": bytes,
                             "len": d.len, "src": format!("{:#x}", d.src),
                             "dst": format!("{:#x}", d.dst), "tag": format!("{:#x}", d.tag),
                             "result": format!("{result:#x}")},
                }));
            }
            Event::Translate(x) if x.queue != super::NO_QUEUE => events.push(instant(
                format!(
                    "translate {} {}",
                    page_name(x.page_size),
                    if x.misses > 0 { "miss" } else { "hit" }
                ),
                t,
                queue_track(x.queue),
                "t",
                json!({"domain": x.domain, "iova": format!("{:#x}", x.iova),
                       "bus": format!("{:#x}", x.bus), "len": x.len,
                       "hits": x.hits, "misses": x.misses, "write": x.write}),
            )),
            Event::Translate(_)
            | Event::Data { .. }
            | Event::RegWrite { .. }
            | Event::PteRead { .. }
            | Event::Element { .. } => {}
            Event::Fault(f) => {
                let args = json!({"queue": f.queue, "domain": f.domain,
                    "iova": format!("{:#x}", f.iova), "access": f.access,
                    "info": format!("{:#x}", f.info), "level": f.level, "seq": f.seq,
                    "injected": f.injected});
                let name = format!("fault {}", fault_reason_name(f.reason));
                events.push(instant(name, t, FAULT_TRACK, "g", args));
            }
            Event::Interrupt { vector, queue } => {
                let tid = if queue == super::NO_QUEUE {
                    FAULT_TRACK
                } else {
                    queue_track(queue)
                };
                events.push(instant(
                    format!("MSI-X {vector}"),
                    t,
                    tid,
                    "t",
                    json!({"vector": vector}),
                ));
            }
            Event::Invalidate {
                kind,
                domain,
                iova,
                len,
            } => events.push(instant(
                "invalidate".into(),
                t,
                DEVICE_TRACK,
                "g",
                json!({"kind": kind, "domain": domain, "iova": format!("{iova:#x}"), "len": len}),
            )),
            Event::DmaMap { iova, size, .. } => events.push(instant(
                "DMA_MAP".into(),
                t,
                DEVICE_TRACK,
                "t",
                json!({"bus": format!("{iova:#x}"), "size": size}),
            )),
            Event::DmaUnmap { iova, size } => events.push(instant(
                "DMA_UNMAP".into(),
                t,
                DEVICE_TRACK,
                "t",
                json!({"bus": format!("{iova:#x}"), "size": size}),
            )),
            Event::Reset { kind } => events.push(instant(
                "reset".into(),
                t,
                DEVICE_TRACK,
                "g",
                json!({"kind": format!("{kind:?}")}),
            )),
            Event::Injected { queue, what } => events.push(instant(
                format!("injected {}", injected_name(&what)),
                t,
                queue_track(queue),
                "g",
                json!({"queue": queue}),
            )),
            Event::Dropped { total } => events.push(instant(
                "events dropped".into(),
                t,
                DEVICE_TRACK,
                "t",
                json!({"total": total}),
            )),
        }
    }
    json!({"traceEvents": events, "displayTimeUnit": "ns",
           "otherData": {"device_version": trace.header.device_version,
                         "config": trace.header.config}})
}
