//! The conformance suite: device and driver behaviour, each written once as a
//! [`Scenario`] against [`DmaBackend`] and the WDF facade, run on every back end.
//!
//! Scenarios live in files by area ([`Area`]): [`registers`], [`ops`], [`domains`],
//! [`faults`], [`iotlb`], [`queues`], [`wdf_memory`], [`wdf_dma`] and [`flow`]. Each
//! declares what it needs ([`Need`]); [`run`] skips it, with the reason, where the back
//! end or the guest profile lacks that, and otherwise starts it on a freshly reset device
//! with bus mastering on and no interrupt pending. Its name, `area::name`, is the same in
//! every output: `cargo test` (in-process and vfio-user, `device/tests/conformance.rs`)
//! and the guest's JUnit report (VFIO, `domdma-guest-tests`).
//!
//! Runners decide *where* a scenario runs; [`run`] is the only way one runs, so that the
//! checks before and after it (needs, reset, panics turned into failures, the time it
//! took) are the same everywhere.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use domdma_driver_model::backend::DmaBackend;
use domdma_driver_model::caps::Capabilities;
use domdma_driver_model::dma::SharedBackend;

use crate::check::{Failure, TestResult};
use crate::fixtures::{fresh, Rng};

pub mod domains;
pub mod faults;
pub mod flow;
pub mod iotlb;
pub mod ops;
pub mod queues;
pub mod registers;
pub mod wdf_dma;
pub mod wdf_memory;

/// What a scenario file imports.
#[allow(unused_imports)]
mod prelude {
    pub use std::time::Duration;

    pub use domdma_device::spec::{self, BatchElement, CompletionRecord, Descriptor, Pte};
    pub use domdma_driver_model::backend::{
        BackendError, DmaBackend, DmaBuffer, DmaRequest, PAGE_SIZE_2M, PAGE_SIZE_4K, PCI_COMMAND,
        PCI_COMMAND_BUS_MASTER,
    };
    pub use domdma_driver_model::caps::{Capabilities, Stat};
    pub use domdma_driver_model::dma_queue::{
        CompletionRecords, DmaQueue, QueueConfig, QueueError,
    };
    pub use domdma_driver_model::domain::{
        read_domain, Domain, DomainError, DomainRegs, Invalidation,
    };
    pub use domdma_driver_model::fault_log::FaultLog;
    pub use domdma_driver_model::iopt::{PageSize, Perm};

    pub use super::{Area, Ctx, Need, Scenario};
    pub use crate::check::{
        check_all, check_bytes, check_fault, check_status, Failure, TestResult,
    };
    pub use crate::fixtures::*;
    pub use crate::{check, check_eq, progress};
}

/// The area a scenario belongs to (its file, and the first part of its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Area {
    /// Registers, identity, reset, bus mastering.
    Registers,
    /// Every operation, BATCH included, with pattern checks.
    Ops,
    /// Translated domains: 4 KiB, 2 MiB, 1 GiB and mixed leaves, permissions.
    Domains,
    /// Every fault reason, the fault log, canaries.
    Faults,
    /// IOTLB invalidation and stale use.
    Iotlb,
    /// Queues: rings, MSI-X per queue, coalescing, halt and resume, several at once.
    Queues,
    /// WDF memory: lookaside lists, memory objects, preallocated memory.
    WdfMemory,
    /// WDF DMA: adapters, domains, domain common buffers.
    WdfDma,
    /// A whole driver flow.
    Flow,
}

impl Area {
    /// The name used in scenario names.
    pub fn name(self) -> &'static str {
        match self {
            Area::Registers => "registers",
            Area::Ops => "ops",
            Area::Domains => "domains",
            Area::Faults => "faults",
            Area::Iotlb => "iotlb",
            Area::Queues => "queues",
            Area::WdfMemory => "wdf_memory",
            Area::WdfDma => "wdf_dma",
            Area::Flow => "flow",
        }
    }
}

/// Something a scenario needs from the back end, the device configuration or the guest
/// profile. An unmet need skips the scenario with [`Need::unmet`]'s reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// MSI-X interrupts delivered to the driver.
    Interrupts,
    /// At least this many free 2 MiB pages for DMA memory.
    HugePages(u32),
    /// At least this many NUMA nodes to place memory on.
    NumaNodes(u32),
    /// The device in this IOVA width (`--iova-width`).
    IovaWidth(u32),
    /// The device in strict IOTLB mode (`--strict-iotlb`).
    StrictIotlb,
    /// The device not in strict IOTLB mode.
    NonStrictIotlb,
    /// An IOTLB of at most this many entries (`--iotlb-entries`).
    IotlbAtMost(u32),
    /// An IOTLB of at least this many entries (room for the entries a scenario keeps).
    IotlbAtLeast(u32),
    /// At least this many queues.
    Queues(u32),
    /// At least this many DMA domains.
    Domains(u32),
    /// Behind a platform IOMMU (the guest's emulated one): only a guest has one.
    PlatformIommu,
    /// NUMA placement by a real kernel (memory and the device on nodes the kernel
    /// reports): only a guest has one.
    KernelNuma,
}

impl Need {
    /// Whether only a guest can meet this need (a scenario with one runs on one back end).
    pub fn guest_only(self) -> bool {
        matches!(self, Need::PlatformIommu | Need::KernelNuma)
    }

    /// Why the need is not met on this back end, device and profile; `None` when it is.
    pub fn unmet(self, dev: &dyn DmaBackend, caps: &Capabilities, env: &Env) -> Option<String> {
        let no = |why: String| Some(why);
        match self {
            Need::Interrupts if dev.msix_vectors() == 0 => no(format!(
                "needs MSI-X interrupts; the {} back end set up none",
                env.backend
            )),
            Need::HugePages(n) => match env.huge_pages {
                Some(free) if free < n => no(format!(
                    "needs {n} free 2 MiB pages; profile {} has {free}",
                    env.profile
                )),
                _ => None,
            },
            Need::NumaNodes(n) if dev.numa_nodes() < n => no(format!(
                "needs {n} NUMA nodes; profile {} has {}",
                env.profile,
                dev.numa_nodes()
            )),
            Need::IovaWidth(w) if caps.iova_width != w => no(format!(
                "needs a {w}-bit IOVA device; profile {} runs it with {} bits",
                env.profile, caps.iova_width
            )),
            Need::StrictIotlb if !caps.strict_iotlb => no(format!(
                "needs strict IOTLB mode; profile {} is not strict",
                env.profile
            )),
            Need::NonStrictIotlb if caps.strict_iotlb => no(format!(
                "needs a non-strict IOTLB; profile {} is strict",
                env.profile
            )),
            Need::IotlbAtMost(n) if caps.iotlb_entries > n => no(format!(
                "needs an IOTLB of at most {n} entries; profile {} has {}",
                env.profile, caps.iotlb_entries
            )),
            Need::Queues(n) if caps.queues < n => {
                no(format!("needs {n} queues; the device has {}", caps.queues))
            }
            Need::Domains(n) if caps.domains < n => no(format!(
                "needs {n} DMA domains; the device has {}",
                caps.domains
            )),
            Need::PlatformIommu if !env.platform_iommu => no(format!(
                "needs a platform IOMMU, which only a guest has (back end {})",
                env.backend
            )),
            Need::KernelNuma if !env.kernel_numa => no(format!(
                "needs NUMA placement by a real kernel, which only a guest has (back end {})",
                env.backend
            )),
            _ => None,
        }
    }
}

/// One behaviour, written once.
#[derive(Clone, Copy)]
pub struct Scenario {
    /// The area (the file it is in).
    pub area: Area,
    /// Its name within the area (snake_case).
    pub name: &'static str,
    /// What it needs.
    pub needs: &'static [Need],
    /// The body.
    pub run: fn(&mut Ctx) -> TestResult,
}

impl Scenario {
    /// `area::name`: the name in every report.
    pub fn full_name(&self) -> String {
        format!("{}::{}", self.area.name(), self.name)
    }

    /// Whether only a guest can run it.
    pub fn guest_only(&self) -> bool {
        self.needs.iter().any(|n| n.guest_only())
    }
}

impl fmt::Debug for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scenario")
            .field("name", &self.full_name())
            .field("needs", &self.needs)
            .finish()
    }
}

/// Every scenario, by area.
pub fn all() -> Vec<Scenario> {
    [
        registers::SCENARIOS,
        ops::SCENARIOS,
        domains::SCENARIOS,
        faults::SCENARIOS,
        iotlb::SCENARIOS,
        queues::SCENARIOS,
        wdf_memory::SCENARIOS,
        wdf_dma::SCENARIOS,
        flow::SCENARIOS,
    ]
    .concat()
}

/// Where the suite runs: facts a back end cannot report through [`DmaBackend`].
#[derive(Debug, Clone)]
pub struct Env {
    /// The back end's name ("in-process", "vfio-user", "vfio").
    pub backend: &'static str,
    /// The profile (device options and machine) it runs under.
    pub profile: String,
    /// Bus addresses are IOVAs of a platform IOMMU (a guest's VFIO type1).
    pub platform_iommu: bool,
    /// NUMA nodes are a real kernel's.
    pub kernel_numa: bool,
    /// Free 2 MiB pages for DMA memory, when known.
    pub huge_pages: Option<u32>,
    /// Seed of the scenarios' random data (each scenario mixes in its name).
    pub seed: u64,
}

/// What a scenario gets: the back end, the environment, seeded generators.
pub struct Ctx {
    backend: SharedBackend,
    /// Where it runs.
    pub env: Env,
    seed: std::cell::Cell<u64>,
}

impl Ctx {
    /// A new random generator, seeded from [`Env::seed`], the scenario's name and how
    /// many generators the scenario took before: a seed reproduces a run.
    pub fn rng(&self) -> Rng {
        let mut r = Rng::new(self.seed.get());
        self.seed.set(r.next_u64());
        r
    }

    /// The device's back end.
    pub fn dev(&self) -> Result<&dyn DmaBackend, Failure> {
        Ok(&*self.backend)
    }

    /// The back end, shared (for code that keeps it, such as the WDF facade's devices).
    pub fn shared(&self) -> Result<SharedBackend, Failure> {
        Ok(SharedBackend::clone(&self.backend))
    }
}

/// How a scenario ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed (or panicked) with this message.
    Failed(String),
    /// It did not run, for this reason.
    Skipped(String),
}

/// A scenario's outcome and how long it took.
#[derive(Debug, Clone)]
pub struct Report {
    /// The outcome.
    pub outcome: Outcome,
    /// Time from the reset before it to its end.
    pub duration: Duration,
}

/// FNV-1a of a name: mixes the scenario into the seed, so that each scenario's data
/// differs but a seed reproduces a run.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Runs one scenario on `backend`: skips it when a need is unmet, else resets the device
/// and runs it, turning a panic (a modelled bug check among them) into a failure.
pub fn run(s: &Scenario, backend: &SharedBackend, env: &Env) -> Report {
    let start = Instant::now();
    let outcome = run_inner(s, backend, env);
    Report {
        outcome,
        duration: start.elapsed(),
    }
}

fn run_inner(s: &Scenario, backend: &SharedBackend, env: &Env) -> Outcome {
    let dev: &dyn DmaBackend = &**backend;
    let caps = match Capabilities::read(dev) {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("reading the capabilities: {e}")),
    };
    if let Some(why) = s.needs.iter().find_map(|n| n.unmet(dev, &caps, env)) {
        return Outcome::Skipped(why);
    }
    if let Err(Failure(m)) = fresh(dev) {
        return Outcome::Failed(format!("resetting the device before the scenario: {m}"));
    }
    let mut ctx = Ctx {
        backend: SharedBackend::clone(backend),
        env: env.clone(),
        seed: std::cell::Cell::new(env.seed ^ name_hash(&s.full_name())),
    };
    match catch_unwind(AssertUnwindSafe(|| (s.run)(&mut ctx))) {
        Ok(Ok(())) => Outcome::Passed,
        Ok(Err(Failure(m))) => Outcome::Failed(m),
        Err(payload) => Outcome::Failed(format!("panicked: {}", panic_message(&*payload))),
    }
}

/// The text of a panic payload (a string, or a modelled bug check's description).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        return (*s).to_string();
    }
    if let Some(s) = payload.downcast_ref::<String>() {
        return s.clone();
    }
    if let Some(b) = payload.downcast_ref::<domdma_driver_model::verifier::BugCheck>() {
        return b.to_string();
    }
    "unknown panic payload".into()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn names_are_unique_and_snake_case() {
        let all = all();
        let names: HashSet<String> = all.iter().map(Scenario::full_name).collect();
        assert_eq!(names.len(), all.len(), "duplicate scenario names");
        for s in &all {
            assert!(
                s.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{} is not snake_case",
                s.name
            );
        }
    }
}
