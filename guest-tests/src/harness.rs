//! The guest binary's harness: the device opened through VFIO (once, shared by every test),
//! the guest-only tests' registry, and the result lines the host runner parses.

use std::io::Write;
use std::sync::Arc;

use domdma_driver_model::backend::vfio::{VfioBackend, VfioOptions};
use domdma_driver_model::backend::DmaBackend;
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

/// The device, opened on first use.
pub struct Ctx {
    /// How to open the device.
    pub opts: VfioOptions,
    backend: Option<Arc<VfioBackend>>,
    open_error: Option<String>,
}

impl Ctx {
    /// A context that opens the device with `opts` when a test first needs it.
    pub fn new(opts: VfioOptions) -> Self {
        Ctx {
            opts,
            backend: None,
            open_error: None,
        }
    }

    /// The open device, shared. A failure to open is remembered, so every later test fails
    /// fast with the same message.
    pub fn shared(&mut self) -> Result<Arc<VfioBackend>, Failure> {
        if let Some(e) = &self.open_error {
            return Err(Failure(format!("device unavailable: {e}")));
        }
        if self.backend.is_none() {
            match VfioBackend::open(&self.opts) {
                Ok(b) if self.adapt_to_iova_width(&b) => {
                    // Reopen with bus addresses the device can reach.
                    drop(b);
                    return self.shared();
                }
                Ok(b) => {
                    let info = b.info();
                    domdma_testkit::progress!(
                        "         device {} via {}: BAR0 by {}, {} MSI-X vectors, NUMA node {}",
                        info.location,
                        info.backend,
                        info.register_access,
                        info.msix_vectors,
                        info.numa_node
                            .map_or("unknown".to_string(), |n| n.to_string())
                    );
                    self.backend = Some(Arc::new(b));
                }
                Err(e) => {
                    let msg = Failure::from(e).0;
                    self.open_error = Some(msg.clone());
                    return Err(Failure(msg));
                }
            }
        }
        Ok(Arc::clone(self.backend.as_ref().expect("opened above")))
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

    /// Closes the device (the next [`Ctx::shared`] reopens it with the current options).
    pub fn close(&mut self) {
        self.backend = None;
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
