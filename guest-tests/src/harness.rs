//! The small test harness: test registry entries, the shared device context, failures,
//! result lines, and helpers the tests share.

use std::fmt::Display;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use domdma_driver_model::backend::vfio::{VfioBackend, VfioOptions};
use domdma_driver_model::backend::{DmaBackend, DmaRequest};
use domdma_driver_model::dma_queue::{
    reset_device, status_name, CompletionRecord, CompletionRecords, Descriptor, DmaQueue,
    QueueConfig,
};
use domdma_driver_model::domain::Domain;
use domdma_driver_model::fault_log::fault_reason_name;
use domdma_driver_model::iopt::Perm;
use serde::Serialize;

/// How long a completion may take (TCG guests are slow; the device is not).
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an expected interrupt may take.
pub const IRQ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to watch for an interrupt that must not come.
pub const NO_IRQ_WINDOW: Duration = Duration::from_millis(300);
/// How long a device reset may take.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// First bus address for DMA memory when the device has a 32-bit IOVA space.
pub const LOW_BUS_BASE: u64 = 0x1000_0000;
/// End of the bus addresses for DMA memory with a 32-bit IOVA space: below the domain IOVA
/// window the tests use there (3 GiB) and the x86 MSI window (0xfee0_0000).
pub const LOW_BUS_END: u64 = 0xb000_0000;

/// A test failure: a message for the result line.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut src = e.source();
        while let Some(s) = src {
            let s_msg = s.to_string();
            if !msg.contains(&s_msg) {
                msg.push_str(": ");
                msg.push_str(&s_msg);
            }
            src = s.source();
        }
        Failure(msg)
    }
}

/// A test's result.
pub type TestResult = Result<(), Failure>;

/// Prints one line of human progress to stderr in a single write, so that it does not
/// interleave with the result lines on stdout when both streams end up in one file.
#[macro_export]
macro_rules! progress {
    ($($fmt:tt)+) => {{
        use std::io::Write as _;
        let line = format!("{}\n", format_args!($($fmt)+));
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }};
}

/// Fails the test with a formatted message unless the condition holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::harness::Failure(format!($($fmt)+)));
        }
    };
}

/// Fails the test unless the two values are equal.
#[macro_export]
macro_rules! check_eq {
    ($got:expr, $want:expr, $($fmt:tt)+) => {{
        let (got, want) = (&$got, &$want);
        if got != want {
            return Err($crate::harness::Failure(format!(
                "{}: got {}, expected {}",
                format!($($fmt)+),
                $crate::harness::show(got),
                $crate::harness::show(want)
            )));
        }
    }};
}

/// One registered test.
pub struct Test {
    /// snake_case name.
    pub name: &'static str,
    /// The test body.
    pub run: fn(&mut Ctx) -> TestResult,
}

/// The outcome of running one test.
pub enum TestOutcome {
    /// It passed.
    Passed,
    /// It failed (or panicked) with this message.
    Failed(String),
}

/// Runs one test, turning a panic into a failure.
pub fn run_test(t: &Test, ctx: &mut Ctx) -> TestOutcome {
    match catch_unwind(AssertUnwindSafe(|| (t.run)(ctx))) {
        Ok(Ok(())) => TestOutcome::Passed,
        Ok(Err(Failure(m))) => TestOutcome::Failed(m),
        Err(payload) => {
            let m = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            TestOutcome::Failed(format!("panicked: {m}"))
        }
    }
}

#[derive(Serialize)]
struct ResultLine<'a> {
    name: &'a str,
    passed: bool,
    duration_ms: f64,
    message: &'a str,
}

/// The stdout line for one test.
pub fn result_line(name: &str, passed: bool, duration_ms: f64, message: &str) -> String {
    let json = serde_json::to_string(&ResultLine {
        name,
        passed,
        duration_ms,
        message,
    })
    .expect("serialising a plain struct cannot fail");
    format!("DOMDMA-RESULT {json}")
}

/// Prints the stdout line for one test and flushes it.
pub fn print_result(name: &str, passed: bool, duration_ms: f64, message: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", result_line(name, passed, duration_ms, message));
    let _ = out.flush();
}

/// State shared by the tests: the device, opened on first use.
pub struct Ctx {
    /// How to open the device.
    pub opts: VfioOptions,
    backend: Option<std::sync::Arc<VfioBackend>>,
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

    /// The open device. A failure to open is remembered, so every later test fails fast
    /// with the same message.
    pub fn dev(&mut self) -> Result<&VfioBackend, Failure> {
        if let Some(e) = &self.open_error {
            return Err(Failure(format!("device unavailable: {e}")));
        }
        if self.backend.is_none() {
            match VfioBackend::open(&self.opts) {
                Ok(b) if self.adapt_to_iova_width(&b) => {
                    // Reopen with bus addresses the device can reach.
                    drop(b);
                    return self.dev();
                }
                Ok(b) => {
                    let info = b.info();
                    crate::progress!(
                        "         device {} via {}: BAR0 by {}, {} MSI-X vectors, NUMA node {}",
                        info.location,
                        info.backend,
                        info.register_access,
                        info.msix_vectors,
                        info.numa_node
                            .map_or("unknown".to_string(), |n| n.to_string())
                    );
                    self.backend = Some(std::sync::Arc::new(b));
                }
                Err(e) => {
                    let msg = Failure::from(e).0;
                    self.open_error = Some(msg.clone());
                    return Err(Failure(msg));
                }
            }
        }
        Ok(self.backend.as_deref().expect("opened above"))
    }

    /// The open device, shared (for code that keeps the back end, such as the WDF facade's
    /// devices).
    pub fn shared(&mut self) -> Result<std::sync::Arc<VfioBackend>, Failure> {
        self.dev()?;
        Ok(std::sync::Arc::clone(
            self.backend.as_ref().expect("opened above"),
        ))
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
        crate::progress!(
            "         the device has a {width}-bit IOVA space: DMA memory at bus addresses \
             {LOW_BUS_BASE:#x}..{LOW_BUS_END:#x}"
        );
        self.opts.iova_base = LOW_BUS_BASE;
        self.opts.iova_end = LOW_BUS_END.min(limit);
        true
    }

    /// Closes the device (the next [`Ctx::dev`] reopens it with the current options).
    pub fn close(&mut self) {
        self.backend = None;
        self.open_error = None;
    }
}

/// A value for a failure message: hexadecimal debug form, on one line.
pub fn show(v: &impl std::fmt::Debug) -> String {
    let s = format!("{v:#x?}");
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("( ", "(")
        .replace(", )", ")")
}

/// Puts the device in a known state: reset through DEV_CTRL, bus mastering on.
pub fn fresh(dev: &dyn DmaBackend) -> TestResult {
    reset_device(dev, RESET_TIMEOUT)?;
    dev.set_bus_master(true)?;
    Ok(())
}

/// Submits one descriptor with completion record `i` (cleared first) and polls for it.
pub fn run_desc(
    q: &mut DmaQueue<'_>,
    cpl: &CompletionRecords,
    i: usize,
    desc: Descriptor,
) -> Result<CompletionRecord, Failure> {
    cpl.clear(i);
    q.submit(&[desc.with_completion(cpl.device_addr(i))])?;
    Ok(q.wait_completion(cpl, i, COMPLETION_TIMEOUT)?)
}

/// Checks a completion's status, with a readable message.
pub fn check_status(c: &CompletionRecord, want: u8, what: impl Display) -> TestResult {
    if c.status != want {
        return Err(Failure(format!(
            "{what}: status {:#x} ({}), expected {:#x} ({}); completion: {c}",
            c.status,
            status_name(c.status),
            want,
            status_name(want)
        )));
    }
    Ok(())
}

/// Checks that a completion reports a DMA fault of `reason` at `addr` whose access has
/// (`write`) or lacks the write bit.
pub fn check_fault(
    c: &CompletionRecord,
    reason: u8,
    addr: u64,
    write: bool,
    what: impl Display,
) -> TestResult {
    check_status(c, domdma_device::spec::STATUS_DMA_ERROR, &what)?;
    if c.fault_reason != reason {
        return Err(Failure(format!(
            "{what}: fault reason {} ({}), expected {reason} ({}); completion: {c}",
            c.fault_reason,
            fault_reason_name(c.fault_reason),
            fault_reason_name(reason)
        )));
    }
    if c.fault_addr != addr {
        return Err(Failure(format!(
            "{what}: fault address {:#x}, expected {addr:#x}; completion: {c}",
            c.fault_addr
        )));
    }
    let is_write = c.fault_access & domdma_device::spec::ACCESS_WRITE != 0;
    if is_write != write {
        return Err(Failure(format!(
            "{what}: fault access {:#x} is a {}, expected a {}; completion: {c}",
            c.fault_access,
            if is_write { "write" } else { "read" },
            if write { "write" } else { "read" }
        )));
    }
    Ok(())
}

/// A queue whose ring and completion records live in a translated domain: the ring
/// mapped read-only at `ring_iova`, `records` completion records mapped read-write at
/// `cpl_iova`. Returns the enabled queue and its records.
pub fn queue_in_domain<'b>(
    dev: &'b dyn DmaBackend,
    dom: &mut Domain<'b>,
    cfg: QueueConfig,
    ring_iova: u64,
    cpl_iova: u64,
    records: usize,
) -> Result<(DmaQueue<'b>, CompletionRecords), Failure> {
    let ring = dev.alloc_dma(DmaRequest::new(cfg.ring_bytes()))?;
    dom.map_buffer(ring_iova, &ring, Perm::R)?;
    let mut cpl = CompletionRecords::new(dev, records)?;
    dom.map_buffer(cpl_iova, cpl.buffer(), Perm::RW)?;
    cpl.set_device_base(cpl_iova);
    let q = DmaQueue::with_ring(dev, cfg.in_domain(dom.index()), ring, ring_iova)?;
    Ok((q, cpl))
}

/// Reads and discards pending interrupts on every vector.
pub fn drain_interrupts(dev: &dyn DmaBackend) -> TestResult {
    for v in 0..dev.msix_vectors() {
        dev.wait_interrupt(v, Duration::ZERO)?;
    }
    Ok(())
}

/// CRC32C (Castagnoli, reflected, initial value and final XOR 0xffffffff), in software.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82f6_3b78;
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |crc, &b| {
        table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// Compares two byte strings, reporting the first difference and the number of differing
/// bytes.
pub fn check_bytes(got: &[u8], want: &[u8], what: impl Display) -> TestResult {
    if got.len() != want.len() {
        return Err(Failure(format!(
            "{what}: length {} != {}",
            got.len(),
            want.len()
        )));
    }
    if let Some(first) = got.iter().zip(want).position(|(a, b)| a != b) {
        let bad = got.iter().zip(want).filter(|(a, b)| a != b).count();
        return Err(Failure(format!(
            "{what}: {bad} of {} bytes differ; first at offset {first:#x}: got {:#04x}, \
             expected {:#04x}",
            got.len(),
            got[first],
            want[first]
        )));
    }
    Ok(())
}

/// Checks that every byte of `got` is `byte`.
pub fn check_all(got: &[u8], byte: u8, what: impl Display) -> TestResult {
    if let Some(first) = got.iter().position(|&b| b != byte) {
        let bad = got.iter().filter(|&&b| b != byte).count();
        return Err(Failure(format!(
            "{what}: {bad} of {} bytes changed; first at offset {first:#x}: {:#04x}, \
             expected {byte:#04x}",
            got.len(),
            got[first]
        )));
    }
    Ok(())
}

/// A small, seedable random generator (SplitMix64); good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock and the process ID.
    pub fn from_time() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Rng(t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn result_line_is_one_json_line() {
        let l = result_line("copy_1mib", false, 1.5, "bad \"thing\"\nhappened");
        assert!(l.starts_with("DOMDMA-RESULT {"));
        assert!(!l.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&l["DOMDMA-RESULT ".len()..]).unwrap();
        assert_eq!(v["name"], "copy_1mib");
        assert_eq!(v["passed"], false);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["message"], "bad \"thing\"\nhappened");
    }

    #[test]
    fn values_show_on_one_line() {
        assert_eq!(show(&Some(0x1234u16)), "Some(0x1234)");
        assert_eq!(show(&17u32), "0x11");
        assert_eq!(show(&Some("vfio-pci")), "Some(\"vfio-pci\")");
    }

    #[test]
    fn crc32c_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn byte_checks_report_first_difference() {
        assert!(check_bytes(&[1, 2, 3], &[1, 2, 3], "x").is_ok());
        let e = check_bytes(&[1, 9, 3, 8], &[1, 2, 3, 4], "x")
            .unwrap_err()
            .0;
        assert!(
            e.contains("2 of 4 bytes differ; first at offset 0x1"),
            "{e}"
        );
        assert!(check_all(&[5, 5], 5, "y").is_ok());
        assert!(check_all(&[5, 6], 5, "y").is_err());
    }

    #[test]
    fn panics_become_failures() {
        let t = Test {
            name: "boom",
            run: |_| panic!("kaboom"),
        };
        let mut ctx = Ctx::new(VfioOptions::default());
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let out = run_test(&t, &mut ctx);
        std::panic::set_hook(prev);
        match out {
            TestOutcome::Failed(m) => assert!(m.contains("kaboom")),
            TestOutcome::Passed => panic!("a panicking test passed"),
        }
    }
}
