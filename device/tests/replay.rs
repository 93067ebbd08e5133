//! Replay (`domdma_device::trace::replay`, `domdma-trace replay`): a real server records a
//! trace while conformance scenarios run against it over vfio-user; the trace replays
//! through today's core with no divergence, and a deliberately changed core (an injection
//! rule that completes the fifth descriptor with an error) diverges at exactly that
//! descriptor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use domdma_device::core::inject::Rule;
use domdma_device::spec::OP_COPY;
use domdma_device::trace::replay::{replay, ReplayOptions};
use domdma_device::trace::{read_all, Event};
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig};
use domdma_driver_model::dma::SharedBackend;
use domdma_testkit::conformance::{self, Env, Outcome};
use domdma_testkit::launcher::Launch;

/// Scenarios that exercise translations on every leaf size, faults, BATCH, halts and
/// invalidations.
const SCENARIOS: [&str; 8] = [
    "ops::copy_1mib",
    "ops::batch_descriptor",
    "domains::copy_across_4k_and_2m_leaves",
    "domains::copy_through_scattered_4k_leaves",
    "domains::copy_stops_at_the_first_unmapped_page",
    "faults::fault_seen_from_guest",
    "queues::halt_on_fault_and_resume",
    "iotlb::invalidate_range_drops_overlapping_pages_only",
];

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp(name: &str) -> TempFile {
    TempFile(std::env::temp_dir().join(format!("domdma-replay-{}-{name}", std::process::id())))
}

/// Records the run of `scenarios` into `path` (with data checksums), on a server started
/// with `extra` arguments; returns the scenarios that failed, with their messages.
fn record(path: &std::path::Path, scenarios: &[&str], extra: &[&str]) -> Vec<(String, String)> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
    let mut args = vec![
        "--trace".as_ref(),
        path.as_os_str(),
        "--trace-data".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let server = Launch::new(bin).args(args).spawn().unwrap();
    let mut failed = Vec::new();
    {
        let b = VfioUserBackend::connect(&VfioUserConfig::new(server.socket())).unwrap();
        let dev: SharedBackend = Arc::new(b);
        let env = Env {
            backend: "vfio-user",
            profile: "replay".into(),
            platform_iommu: false,
            kernel_numa: false,
            huge_pages: None,
            seed: 7,
        };
        let all = conformance::all();
        for &name in scenarios {
            let s = all.iter().find(|s| s.full_name() == name).unwrap();
            match conformance::run(s, &dev, &env).outcome {
                Outcome::Passed | Outcome::Skipped(_) => {}
                Outcome::Failed(m) => failed.push((name.to_owned(), m)),
            }
        }
    }
    let stopped = server.stop(Duration::from_secs(10));
    assert!(!stopped.needed_kill, "the server ignored SIGTERM");
    failed
}

#[test]
fn a_recorded_run_replays_without_divergence_and_a_changed_core_diverges_where_it_changed() {
    let file = temp("recorded.trace");
    assert_eq!(record(&file.0, &SCENARIOS, &[]), vec![]);
    let trace = read_all(&file.0).unwrap();
    assert!(!trace.truncated);
    assert!(trace.header.data);
    let copies = trace
        .records
        .iter()
        .filter(|r| matches!(r.event, Event::Data { opcode: OP_COPY, src, dst, .. } if src == dst))
        .count();
    assert!(copies > 5, "{copies} COPYs with data checksums");

    let scratch = temp("replayed.trace");
    let report = replay(&file.0, &scratch.0, &ReplayOptions::default()).unwrap();
    assert!(
        report.descriptors > 15,
        "{} descriptors",
        report.descriptors
    );
    assert_eq!(report.divergence, None, "notes: {:?}", report.notes);
    assert_eq!(report.compared, report.descriptors);

    // The fifth descriptor fetched, as recorded.
    let (queue, slot) = trace
        .records
        .iter()
        .filter_map(|r| match r.event {
            Event::Fetch { queue, slot, .. } => Some((queue, slot)),
            _ => None,
        })
        .nth(4)
        .unwrap();
    let changed = ReplayOptions {
        inject: vec!["error-status:status=0x11,nth=5".parse::<Rule>().unwrap()],
    };
    let report = replay(&file.0, &scratch.0, &changed).unwrap();
    let d = report.divergence.expect("a changed core diverges");
    assert_eq!((d.queue, d.slot), (queue, slot), "{d}");
    // Its first event that differs: the data it no longer translates (a COPY or FILL),
    // or its completion status.
    assert!(
        (d.what.starts_with("translation") && d.replayed == "not translated")
            || (d.what.starts_with("completion") && d.replayed.starts_with("DMA_ERROR")),
        "{d}"
    );

    // A core that corrupts the third COPY it runs: the data checksums diverge there.
    let (queue, slot) = nth_copy(&trace, 3);
    let changed = ReplayOptions {
        inject: vec!["corrupt-copy:offset=0x10,xor=0x1,nth=3"
            .parse::<Rule>()
            .unwrap()],
    };
    let report = replay(&file.0, &scratch.0, &changed).unwrap();
    let d = report
        .divergence
        .expect("a core that corrupts data diverges");
    assert_eq!((d.queue, d.slot), (queue, slot), "{d}");
    assert!(d.what.starts_with("data of the COPY"), "{d}");
    assert!(d.recorded.ends_with("holds what was read"), "{d}");
    assert!(d.replayed.ends_with("differs from what was read"), "{d}");
}

/// Queue and slot of the `n`-th (from 1) COPY that completed with data checksums: a ring
/// descriptor, or the BATCH holding it.
fn nth_copy(trace: &domdma_device::trace::Trace, n: usize) -> (u16, u32) {
    let mut slot_of = std::collections::HashMap::new();
    let mut seen = 0;
    for r in &trace.records {
        match r.event {
            Event::Fetch { queue, slot, .. } => {
                slot_of.insert(queue, slot);
            }
            Event::Data {
                queue,
                opcode: OP_COPY,
                ..
            } => {
                seen += 1;
                if seen == n {
                    return (queue, slot_of[&queue]);
                }
            }
            _ => {}
        }
    }
    panic!("fewer than {n} COPYs");
}

/// A run the device broke on purpose (a corrupted COPY) leaves a trace whose replay points
/// at the corrupted COPY: what it wrote differs from what it read, as recorded, not as
/// replayed.
#[test]
fn a_run_with_a_corrupted_copy_replays_to_a_divergence_at_that_copy() {
    let file = temp("corrupted.trace");
    let failed = record(
        &file.0,
        &["ops::copy_1mib"],
        &["--inject", "corrupt-copy:offset=0x1234,xor=0x40,nth=1"],
    );
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].1.contains("0x1234"), "{failed:?}");
    let trace = read_all(&file.0).unwrap();
    let (queue, slot) = nth_copy(&trace, 1);

    let scratch = temp("corrupted-replayed.trace");
    let report = replay(&file.0, &scratch.0, &ReplayOptions::default()).unwrap();
    let d = report.divergence.expect("the corrupted COPY diverges");
    assert_eq!((d.queue, d.slot), (queue, slot), "{d}");
    assert!(d.what.starts_with("data of the COPY"), "{d}");
    assert!(d.what.contains("an injection rule acted on it"), "{d}");
    assert!(d.recorded.ends_with("differs from what was read"), "{d}");
    assert!(d.replayed.ends_with("holds what was read"), "{d}");
}
