//! Replay (`domdma_device::trace::replay`, `domdma-trace replay`): a real server records a
//! trace while conformance scenarios run against it over vfio-user; the trace replays
//! through today's core with no divergence, and a deliberately changed core (an injection
//! rule that completes the fifth descriptor with an error) diverges at exactly that
//! descriptor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use domdma_device::core::inject::Rule;
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

/// Records the scenarios' run into `path`.
fn record(path: &std::path::Path) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
    let server = Launch::new(bin)
        .args(["--trace".as_ref(), path.as_os_str()])
        .spawn()
        .unwrap();
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
        for name in SCENARIOS {
            let s = all.iter().find(|s| s.full_name() == name).unwrap();
            match conformance::run(s, &dev, &env).outcome {
                Outcome::Passed | Outcome::Skipped(_) => {}
                Outcome::Failed(m) => panic!("{name}: {m}"),
            }
        }
    }
    let stopped = server.stop(Duration::from_secs(10));
    assert!(!stopped.needed_kill, "the server ignored SIGTERM");
}

#[test]
fn a_recorded_run_replays_without_divergence_and_a_changed_core_diverges_where_it_changed() {
    let file = temp("recorded.trace");
    record(&file.0);
    let trace = read_all(&file.0).unwrap();
    assert!(!trace.truncated);

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
}
