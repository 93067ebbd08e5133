//! Traces recorded by a device and read back: every kind of event, in order, with the
//! fields a user looks for; the summary and the Perfetto conversion of the same trace; and
//! the dropped-event count of a recorder whose writer falls behind.

use std::path::PathBuf;

use domdma_device::core::DeviceConfig;
use domdma_device::spec::*;
use domdma_device::trace::event::TraceConfig;
use domdma_device::trace::view::{perfetto, Summary};
use domdma_device::trace::{
    read_all, Event, Record, RecordOptions, Recorder, ResetKind, Tracer, Translated,
};
use domdma_testkit::core_driver::*;

/// A fresh file in the temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("domdma-trace-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const SRC: u64 = 0x40_0000_0000;
const DST: u64 = 0x41_0000_0000;
const UNMAPPED: u64 = 0x50_0000_0000;
const LEN: u32 = 64 << 10;

/// A traced device: a 64 KiB COPY on 2 MiB pages, a COPY from an unmapped IOVA (a fault),
/// a range invalidation and a device reset.
fn record(path: &std::path::Path) -> (u64, u64) {
    let config = DeviceConfig::default();
    let rec = Recorder::create(path, TraceConfig::from(&config)).unwrap();
    let mut d = Driver::with_tracer(config, Tracer::new(rec.clone()));
    let src = d.bus.alloc(PAGE_2M, PAGE_2M);
    let dst = d.bus.alloc(PAGE_2M, PAGE_2M);
    d.translated_domain(1);
    d.map(1, SRC, src, PAGE_2M, PAGE_2M, PTE_R);
    d.map(1, DST, dst, PAGE_2M, PAGE_2M, RW);
    d.enable_fault_log(16);
    d.setup_queue(0, 1, 16);
    assert_eq!(d.run(0, Desc::copy(SRC, DST, LEN)).status, STATUS_OK);
    assert_eq!(
        d.run(0, Desc::copy(UNMAPPED, DST, LEN)).status,
        STATUS_DMA_ERROR
    );
    d.invalidate_range(1, SRC, PAGE_2M);
    d.write(REG_DEV_CTRL, DEV_CTRL_RESET);
    drop(d);
    rec.finish().unwrap();
    assert_eq!(rec.dropped(), 0);
    (src, dst)
}

fn position(records: &[Record], what: impl Fn(&Event) -> bool) -> usize {
    records
        .iter()
        .position(|r| what(&r.event))
        .unwrap_or_else(|| panic!("no such event in {records:#?}"))
}

#[test]
fn a_traced_device_records_what_it_did_in_order() {
    let file = TempFile::new("order.trace");
    let (src, dst) = record(&file.0);
    let trace = read_all(&file.0).unwrap();
    assert!(!trace.truncated);
    assert_eq!(trace.header.config.queues, DeviceConfig::default().queues);
    let r = &trace.records;
    assert!(r.windows(2).all(|w| w[0].t_ns <= w[1].t_ns), "time order");

    // The good COPY: doorbell, fetch, both sides translated on 2 MiB pages, completion.
    let doorbell = position(r, |e| matches!(e, Event::Doorbell { queue: 0, tail: 1 }));
    let fetch = position(
        r,
        |e| matches!(e, Event::Fetch { queue: 0, slot: 0, desc, .. } if desc[0] >> 32 == u64::from(LEN) && desc[0] & 0xff == u64::from(OP_COPY)),
    );
    let read = position(
        r,
        |e| matches!(e, Event::Translate(Translated { domain: 1, queue: 0, iova: SRC, page_size: PAGE_2M, write: false, bus, .. }) if *bus == src),
    );
    let write = position(
        r,
        |e| matches!(e, Event::Translate(Translated { domain: 1, queue: 0, iova: DST, page_size: PAGE_2M, write: true, bus, .. }) if *bus == dst),
    );
    let done = position(r, |e| {
        matches!(
            e,
            Event::Complete {
                queue: 0,
                slot: 0,
                status: STATUS_OK,
                bytes: LEN,
                written: true,
                ..
            }
        )
    });
    assert!(doorbell < fetch && fetch < read && read < write && write < done);

    // The bad one: its fault (with the IOVA), the fault log's interrupt, a DMA error.
    let fault = position(
        r,
        |e| matches!(e, Event::Fault(f) if f.reason == FAULT_NOT_PRESENT && f.iova == UNMAPPED && f.domain == 1 && f.queue == 0 && !f.injected),
    );
    let irq = position(r, |e| {
        matches!(
            e,
            Event::Interrupt {
                queue: domdma_device::trace::NO_QUEUE,
                ..
            }
        )
    });
    let failed = position(r, |e| {
        matches!(
            e,
            Event::Complete {
                queue: 0,
                slot: 1,
                status: STATUS_DMA_ERROR,
                ..
            }
        )
    });
    assert!(done < fault && fault < irq && irq < failed);

    let inv = position(r, |e| {
        matches!(
            e,
            Event::Invalidate {
                domain: 1,
                iova: SRC,
                len: PAGE_2M,
                ..
            }
        )
    });
    let reset = position(r, |e| {
        matches!(
            e,
            Event::Reset {
                kind: ResetKind::Device
            }
        )
    });
    assert!(failed < inv && inv < reset);
}

#[test]
fn summary_and_perfetto_show_the_queue_the_descriptors_and_the_fault() {
    let file = TempFile::new("views.trace");
    record(&file.0);
    let trace = read_all(&file.0).unwrap();

    let s = Summary::of(&trace);
    let q = &s.queues[&0];
    assert_eq!((q.fetched, q.completed, q.errors), (2, 2, 1));
    assert_eq!(q.bytes, u64::from(LEN));
    assert_eq!(s.faults.get("NOT_PRESENT"), Some(&1));
    assert_eq!(s.domains[&1].page_sizes.get("2M"), Some(&2));
    assert_eq!(s.dropped, 0);
    let text = s.to_string();
    assert!(
        text.contains("queue 0: 1 doorbells") || text.contains("queue 0: 2 doorbells"),
        "{text}"
    );

    let json = perfetto(&trace);
    let events = json["traceEvents"].as_array().unwrap();
    let has = |f: &dyn Fn(&serde_json::Value) -> bool| events.iter().any(f);
    assert!(has(
        &|e| e["name"] == "thread_name" && e["args"]["name"] == "queue 0"
    ));
    assert!(has(&|e| e["ph"] == "X"
        && e["name"] == "COPY"
        && e["args"]["status"] == "OK"));
    assert!(has(&|e| e["ph"] == "X"
        && e["name"] == "COPY"
        && e["args"]["status"] == "DMA_ERROR"));
    assert!(has(&|e| e["ph"] == "i"
        && e["s"] == "g"
        && e["name"] == "fault NOT_PRESENT"));
    assert!(has(&|e| e["ph"] == "i"
        && e["s"] == "g"
        && e["name"] == "invalidate"));
    // Every slice and instant has a time and a track.
    for e in events.iter().filter(|e| e["ph"] != "M") {
        assert!(e["ts"].is_number() && e["tid"].is_number(), "{e}");
    }
}

#[test]
fn a_writer_that_falls_behind_counts_what_it_dropped() {
    let file = TempFile::new("dropped.trace");
    let path = &file.0;
    let config = DeviceConfig::default();
    // Rings of 4 records: a burst of 1000 from one thread overflows long before the writer
    // drains (every 2 ms).
    let rec = Recorder::open(
        path,
        TraceConfig::from(&config),
        RecordOptions {
            ring_records: 4,
            ..RecordOptions::default()
        },
    )
    .unwrap();
    for tail in 0..1000 {
        rec.record(Event::Doorbell { queue: 0, tail });
    }
    let written = rec.finish().unwrap();
    let dropped = rec.dropped();
    assert!(dropped > 0, "nothing dropped");
    let trace = read_all(path).unwrap();
    let doorbells = trace
        .records
        .iter()
        .filter(|r| matches!(r.event, Event::Doorbell { .. }))
        .count() as u64;
    assert_eq!(doorbells + dropped, 1000);
    let totals: Vec<u64> = trace
        .records
        .iter()
        .filter_map(|r| match r.event {
            Event::Dropped { total } => Some(total),
            _ => None,
        })
        .collect();
    assert_eq!(
        totals.last(),
        Some(&dropped),
        "the last Dropped record has the total"
    );
    assert!(totals.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(written, doorbells + totals.len() as u64);
    assert_eq!(Summary::of(&trace).dropped, dropped);
    // A trace that lost events is not replayed: its inputs are incomplete.
    let scratch = TempFile::new("dropped-replayed.trace");
    let err = domdma_device::trace::replay::replay(
        path,
        &scratch.0,
        &domdma_device::trace::replay::ReplayOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("the trace lost {dropped} events")),
        "{err}"
    );
}
