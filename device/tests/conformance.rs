//! The conformance suite (`domdma_testkit::conformance`) on the two host back ends, under
//! the device profiles the guest runs too:
//!
//! - `in-process/<profile>/<scenario>`: the device core linked into this process;
//! - `vfio-user/<profile>/<scenario>`: this process as the VMM of a real `domdma-device`
//!   server (the binary Cargo built for this test), one server per scenario.
//!
//! Profiles: `default` (48-bit IOVA, two NUMA nodes), `dma32` (`--iova-width 32`, RAM below
//! 4 GiB), `strict` (`--strict-iotlb --iotlb-entries 8`). A scenario that needs what a
//! profile or back end lacks is reported as ignored, with the reason. When the whole suite
//! runs (no filter), a scenario that runs on neither profile of a back end fails the run,
//! unless only a guest can run it: no back end silently lacks a scenario.
//!
//! `cargo test -p domdma-device --test conformance -- --list` lists the trials;
//! `... -- ops::` runs one area.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use domdma_device::core::inject::Rule;
use domdma_device::core::DeviceConfig;
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig};
use domdma_driver_model::dma::SharedBackend;
use domdma_testkit::conformance::{self, Env, Outcome, Scenario};
use domdma_testkit::launcher::{DeviceServer, Launch};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// The back ends this test runs.
const BACKENDS: [&str; 2] = ["in-process", "vfio-user"];

/// A device and machine configuration, as a guest profile sets it.
#[derive(Debug, Clone)]
struct Profile {
    name: &'static str,
    device: DeviceConfig,
    server_args: &'static [&'static str],
    phys: PhysConfig,
}

fn profiles() -> Vec<Profile> {
    let default = Profile {
        name: "default",
        device: DeviceConfig::default(),
        server_args: &[],
        phys: PhysConfig::default(),
    };
    let dma32 = Profile {
        name: "dma32",
        device: DeviceConfig {
            iova_width: 32,
            ..DeviceConfig::default()
        },
        server_args: &["--iova-width", "32"],
        // Below 4 GiB and below the 3 GiB the scenarios' domain IOVAs start at.
        phys: PhysConfig {
            base: 1 << 30,
            ..PhysConfig::default()
        },
    };
    let strict = Profile {
        name: "strict",
        device: DeviceConfig {
            strict_iotlb: true,
            iotlb_entries: 8,
            ..DeviceConfig::default()
        },
        server_args: &["--strict-iotlb", "--iotlb-entries", "8"],
        phys: PhysConfig::default(),
    };
    vec![default, dma32, strict]
}

/// Outcomes by scenario and back end, for the coverage check.
type Ran = Arc<Mutex<BTreeMap<String, BTreeMap<&'static str, bool>>>>;

/// Starts a back end for one scenario; the server (if any) lives as long as the back end.
fn open(backend: &str, p: &Profile) -> Result<(SharedBackend, Option<DeviceServer>), String> {
    match backend {
        "in-process" => {
            let b = InProcessBackend::new(InProcessConfig {
                device: p.device.clone(),
                phys: p.phys.clone(),
            })
            .map_err(|e| format!("in-process back end: {e}"))?;
            Ok((Arc::new(b), None))
        }
        _ => {
            let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
            let server = Launch::new(bin)
                .args(p.server_args.iter().copied())
                .spawn()
                .map_err(|e| e.to_string())?;
            let b = VfioUserBackend::connect(
                &VfioUserConfig::new(server.socket()).with_phys(p.phys.clone()),
            )
            .map_err(|e| format!("connecting to the server: {e}\n{}", server.log()))?;
            Ok((Arc::new(b), Some(server)))
        }
    }
}

fn trial(backend: &'static str, p: Profile, s: Scenario, ran: Ran) -> Trial {
    let name = format!("{backend}/{}/{}", p.name, s.full_name());
    Trial::ignorable_test(name, move || {
        let (dev, server) = open(backend, &p)?;
        let env = Env {
            backend,
            profile: p.name.to_string(),
            platform_iommu: false,
            kernel_numa: false,
            huge_pages: Some(p.phys.huge_pages_per_node * p.phys.nodes),
            seed: 0x00d0_d3a0,
        };
        let report = conformance::run(&s, &dev, &env);
        ran.lock()
            .unwrap()
            .entry(s.full_name())
            .or_default()
            .entry(backend)
            .and_modify(|r| *r |= !matches!(report.outcome, Outcome::Skipped(_)))
            .or_insert(!matches!(report.outcome, Outcome::Skipped(_)));
        drop(dev);
        match report.outcome {
            Outcome::Passed => Ok(Completion::Completed),
            Outcome::Skipped(why) => Ok(Completion::ignored_with(why)),
            Outcome::Failed(m) => {
                let log = server.map(|s| format!("\nserver log:\n{}", s.log()));
                Err(Failed::from(format!("{m}{}", log.unwrap_or_default())))
            }
        }
    })
}

/// Each error-injection rule (`domdma-device --inject RULE`, SPEC.md "Error injection"),
/// the scenario run under it over vfio-user, and what its failure must say.
const INJECTIONS: &[(&str, &str, &str)] = &[
    (
        "corrupt-copy:offset=0x1234,xor=0x40",
        "ops::copy_1mib",
        "offset 0x1234",
    ),
    ("error-status:status=0x11", "ops::copy_1mib", "DMA_ERROR"),
    (
        "drop-interrupt",
        "queues::completion_interrupt",
        "no interrupt on vector",
    ),
    (
        // Later than the scenario waits for an interrupt (IRQ_TIMEOUT, 2 s).
        "delay-interrupt:us=3000000",
        "queues::completion_interrupt",
        "no interrupt on vector",
    ),
    (
        "stall-queue:queue=0",
        "ops::copy_1mib",
        "waiting for completion record 0 (queue 0: head 0, tail 1",
    ),
    (
        "never-complete:nth=1",
        "ops::copy_1mib",
        "waiting for completion record 0 (queue 0: head 0, tail 1",
    ),
    (
        "spurious-fault:iova=0xdead0000,nth=1",
        "faults::fault_seen_from_guest",
        "0xdead0000",
    ),
];

/// The suite fails, naming the fault, on a device server started with `--inject rule`.
fn suite_names_an_injected_fault(rule: &str, scenario: &str, names: &str) -> Result<(), Failed> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_domdma-device"));
    let server = Launch::new(bin)
        .args(["--inject", rule])
        .spawn()
        .map_err(|e| e.to_string())?;
    let b = VfioUserBackend::connect(&VfioUserConfig::new(server.socket()))
        .map_err(|e| format!("connecting to the server: {e}\n{}", server.log()))?;
    let dev: SharedBackend = Arc::new(b);
    let env = Env {
        backend: "vfio-user",
        profile: format!("inject {rule}"),
        platform_iommu: false,
        kernel_numa: false,
        huge_pages: None,
        seed: 1,
    };
    let s = conformance::all()
        .into_iter()
        .find(|s| s.full_name() == scenario)
        .ok_or_else(|| format!("no scenario {scenario}"))?;
    match conformance::run(&s, &dev, &env).outcome {
        Outcome::Failed(m) if m.contains(names) => Ok(()),
        other => Err(format!(
            "{scenario} on a server with --inject {rule}: {other:?}, expected a failure \
             that says {names:?}"
        )
        .into()),
    }
}

/// The suite can fail: on an in-process device that corrupts one byte of every COPY (at
/// offset 0x1234 of the copy), scenarios that copy data fail, and the failure names the
/// offset of the corrupted byte.
fn suite_catches_a_corrupted_copy() -> Result<(), Failed> {
    let b = InProcessBackend::new(InProcessConfig::default()).map_err(|e| e.to_string())?;
    b.set_injection(&[Rule::CorruptCopy {
        offset: 0x1234,
        xor: 0x40,
        nth: 0,
        queue: None,
    }]);
    let dev: SharedBackend = Arc::new(b);
    let env = Env {
        backend: "in-process",
        profile: "corrupting".into(),
        platform_iommu: false,
        kernel_numa: false,
        huge_pages: None,
        seed: 1,
    };
    let all = conformance::all();
    for name in [
        "ops::copy_1mib",
        "ops::copy_sizes_and_alignments",
        "domains::translated_domain_2m",
        "wdf_dma::domain_common_buffer_copy_large_pages",
    ] {
        let s = all
            .iter()
            .find(|s| s.full_name() == name)
            .ok_or_else(|| format!("no scenario {name}"))?;
        match conformance::run(s, &dev, &env).outcome {
            Outcome::Failed(m) if m.contains("offset 0x1234") => {}
            other => {
                return Err(format!(
                    "{name} on a device corrupting byte 0x1234 of each COPY: {other:?}, \
                     expected a failure naming offset 0x1234"
                )
                .into())
            }
        }
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let ran: Ran = Arc::default();
    let all = conformance::all();
    let mut trials = Vec::new();
    for backend in BACKENDS {
        for p in profiles() {
            for s in &all {
                trials.push(trial(backend, p.clone(), *s, Arc::clone(&ran)));
            }
        }
    }
    trials.push(Trial::test(
        "suite_catches_a_corrupted_copy",
        suite_catches_a_corrupted_copy,
    ));
    for &(rule, scenario, names) in INJECTIONS {
        trials.push(Trial::test(
            format!("injection/{}", rule.split(':').next().unwrap_or(rule)),
            move || suite_names_an_injected_fault(rule, scenario, names),
        ));
    }
    let whole_suite = args.filter.is_none() && args.skip.is_empty() && !args.list;
    let conclusion = libtest_mimic::run(&args, trials);
    if whole_suite {
        let ran = ran.lock().unwrap();
        let mut missing = Vec::new();
        for s in all.iter().filter(|s| !s.guest_only()) {
            for backend in BACKENDS {
                let on = ran
                    .get(&s.full_name())
                    .and_then(|m| m.get(backend))
                    .copied();
                if on != Some(true) {
                    missing.push(format!("{} on {backend}", s.full_name()));
                }
            }
        }
        if !missing.is_empty() {
            eprintln!(
                "error: these scenarios ran on no profile of a back end (every scenario \
                 that is not guest-only must run on both): {}",
                missing.join(", ")
            );
            std::process::exit(101);
        }
    }
    conclusion.exit();
}
