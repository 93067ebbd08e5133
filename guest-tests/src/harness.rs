//! The guest binary's harness: the device opened through VFIO (once, shared by every test),
//! the guest-only tests' registry, and the result lines the host runner parses.

use std::io::Write;
use std::sync::Arc;

use domdma_driver_model::backend::noiommu::{NoIommuBackend, NoIommuOptions};
use domdma_driver_model::backend::vfio::{hugepages_2m, VfioBackend, VfioOptions};
use domdma_driver_model::backend::DmaBackend;
use domdma_driver_model::dma::SharedBackend;
use domdma_testkit::check::Failure;
use serde::Serialize;

/// First bus address for DMA memory when the device has a 32-bit IOVA space.
pub const LOW_BUS_BASE: u64 = 0x1000_0000;
/// End of the bus addresses for DMA memory with a 32-bit IOVA space: below the domain IOVA
/// window the scenarios use there (3 GiB) and the x86 MSI window (0xfee0_0000).
pub const LOW_BUS_END: u64 = 0xb000_0000;

/// A guest-only test's result: `Ok(None)` passed, `Ok(Some(reason))` skipped.
pub type PlatformResult = Result<Option<String>, Failure>;

/// One guest-only test (VFIO and sysfs specifics, outside the conformance suite).
pub struct Test {
    /// `guest::name`.
    pub name: &'static str,
    /// The test body.
    pub run: fn(&mut Ctx) -> PlatformResult,
}

#[derive(Serialize)]
struct ResultLine<'a> {
    name: &'a str,
    passed: bool,
    skipped: bool,
    duration_ms: f64,
    message: &'a str,
}

/// The stdout line for one test: passed, failed or skipped (a skip is not a pass; its
/// message is the reason).
pub fn result_line(
    name: &str,
    passed: bool,
    skipped: bool,
    duration_ms: f64,
    message: &str,
) -> String {
    let json = serde_json::to_string(&ResultLine {
        name,
        passed,
        skipped,
        duration_ms,
        message,
    })
    .expect("serialising a plain struct cannot fail");
    format!("DOMDMA-RESULT {json}")
}

/// Prints the stdout line for one test and flushes it.
pub fn print_result(name: &str, passed: bool, skipped: bool, duration_ms: f64, message: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        result_line(name, passed, skipped, duration_ms, message)
    );
    let _ = out.flush();
}

/// Which back end the guest binary drives the device with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// VFIO type1 behind the guest's emulated IOMMU.
    Vfio,
    /// No IOMMU: BAR0 through sysfs, DMA memory at physical addresses, no interrupts.
    Noiommu,
}

/// The open device, by back end.
enum Opened {
    Vfio(Arc<VfioBackend>),
    NoIommu(Arc<NoIommuBackend>),
}

/// The device, opened on first use.
pub struct Ctx {
    /// The back end.
    pub backend: Backend,
    /// How to open the device with VFIO.
    pub opts: VfioOptions,
    opened: Option<Opened>,
    open_error: Option<String>,
}

impl Ctx {
    /// A context that opens the device with `backend` (and `opts` for VFIO) when a test
    /// first needs it.
    pub fn new(backend: Backend, opts: VfioOptions) -> Self {
        Ctx {
            backend,
            opts,
            opened: None,
            open_error: None,
        }
    }

    /// The open device as the conformance suite takes it. A failure to open is remembered,
    /// so every later test fails fast with the same message.
    pub fn shared(&mut self) -> Result<SharedBackend, Failure> {
        self.open()?;
        Ok(match self.opened.as_ref().expect("opened above") {
            Opened::Vfio(b) => b.clone(),
            Opened::NoIommu(b) => b.clone(),
        })
    }

    /// The open device through VFIO (for the VFIO-specific tests).
    pub fn vfio(&mut self) -> Result<Arc<VfioBackend>, Failure> {
        self.open()?;
        match self.opened.as_ref().expect("opened above") {
            Opened::Vfio(b) => Ok(b.clone()),
            Opened::NoIommu(_) => Err(Failure("the device is not open through VFIO".into())),
        }
    }

    /// Free 2 MiB pages for DMA memory: the kernel's pool with VFIO, the back end's own
    /// pool without an IOMMU.
    pub fn huge_pages_free(&mut self) -> Option<u32> {
        match self.backend {
            Backend::Vfio => hugepages_2m().ok().map(|(free, _)| free as u32),
            Backend::Noiommu => match &self.opened {
                Some(Opened::NoIommu(b)) => Some(b.free_huge_pages()),
                _ => None,
            },
        }
    }

    fn open(&mut self) -> Result<(), Failure> {
        if let Some(e) = &self.open_error {
            return Err(Failure(format!("device unavailable: {e}")));
        }
        if self.opened.is_some() {
            return Ok(());
        }
        let opened = match self.backend {
            Backend::Vfio => match VfioBackend::open(&self.opts) {
                Ok(b) if self.adapt_to_iova_width(&b) => {
                    // Reopen with bus addresses the device can reach.
                    drop(b);
                    return self.open();
                }
                Ok(b) => Ok(Opened::Vfio(Arc::new(b))),
                Err(e) => Err(Failure::from(e).0),
            },
            Backend::Noiommu => match NoIommuBackend::open(&NoIommuOptions {
                bdf: self.opts.bdf.clone(),
                ..NoIommuOptions::default()
            }) {
                Ok(b) => Ok(Opened::NoIommu(Arc::new(b))),
                Err(e) => Err(Failure::from(e).0),
            },
        };
        match opened {
            Ok(o) => {
                let info = match &o {
                    Opened::Vfio(b) => b.info(),
                    Opened::NoIommu(b) => b.info(),
                };
                domdma_testkit::progress!(
                    "         device {} via {}: BAR0 by {}, {} MSI-X vectors, NUMA node {}",
                    info.location,
                    info.backend,
                    info.register_access,
                    info.msix_vectors,
                    info.numa_node
                        .map_or("unknown".to_string(), |n| n.to_string())
                );
                self.opened = Some(o);
                Ok(())
            }
            Err(msg) => {
                self.open_error = Some(msg.clone());
                Err(Failure(msg))
            }
        }
    }

    /// A device in the 32-bit IOVA mode (`--iova-width 32`) cannot reach bus addresses at
    /// or above 4 GiB, not even in pass-through domain 0, so the back end must hand out
    /// bus addresses below that: [`LOW_BUS_BASE`]..[`LOW_BUS_END`]. Returns true when the
    /// options were changed (the back end must be reopened).
    fn adapt_to_iova_width(&mut self, b: &VfioBackend) -> bool {
        let Ok(cap) = b.read32(domdma_device::spec::REG_CAP) else {
            return false;
        };
        let width = (cap >> domdma_device::spec::CAP_IOVA_WIDTH_SHIFT) & 0xff;
        let limit = 1u64.checked_shl(width).unwrap_or(u64::MAX);
        if width == 0 || self.opts.iova_end <= limit {
            return false;
        }
        domdma_testkit::progress!(
            "         the device has a {width}-bit IOVA space: DMA memory at bus addresses \
             {LOW_BUS_BASE:#x}..{LOW_BUS_END:#x}"
        );
        self.opts.iova_base = LOW_BUS_BASE;
        self.opts.iova_end = LOW_BUS_END.min(limit);
        true
    }

    /// Closes the device (the next use reopens it with the current options).
    pub fn close(&mut self) {
        self.opened = None;
        self.open_error = None;
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn result_line_is_one_json_line() {
        let l = result_line(
            "ops::copy_1mib",
            false,
            false,
            1.5,
            "bad \"thing\"\nhappened",
        );
        assert!(l.starts_with("DOMDMA-RESULT {"));
        assert!(!l.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&l["DOMDMA-RESULT ".len()..]).unwrap();
        assert_eq!(v["name"], "ops::copy_1mib");
        assert_eq!(v["passed"], false);
        assert_eq!(v["skipped"], false);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["message"], "bad \"thing\"\nhappened");
    }
}
