//! Fixtures scenarios share: device set-up, queues, timeouts, seeded data unique per page,
//! canary-guarded buffers, a software CRC32C.

use std::time::{Duration, Instant};

use domdma_device::spec::{self, CompletionRecord, Descriptor};
use domdma_driver_model::backend::{BumpIova, DmaBackend, DmaBuffer, DmaRequest};
use domdma_driver_model::caps::{read_stat, Capabilities, Stat};
use domdma_driver_model::dma_queue::{
    reset_device, CompletionRecords, DmaQueue, QueueConfig, QueueError,
};
use domdma_driver_model::domain::Domain;
use domdma_driver_model::iopt::Perm;

use crate::check::{check_all, Failure, TestResult};

/// How long a completion may take. The device answers in microseconds to milliseconds;
/// this bounds a TCG guest's polling and a broken device's silence, so a failing scenario
/// fails within seconds.
pub const COMPLETION_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an expected interrupt may take.
pub const IRQ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to watch for an interrupt (or a completion) that must not come.
pub const NO_IRQ_WINDOW: Duration = Duration::from_millis(100);
/// How long a device reset may take.
pub const RESET_TIMEOUT: Duration = Duration::from_secs(2);
/// One MiB.
pub const MIB: usize = 1 << 20;
/// A base page.
pub const PAGE: usize = 4096;

/// Puts the device in a known state: reset through DEV_CTRL, bus mastering on, pending
/// interrupts discarded.
pub fn fresh(dev: &dyn DmaBackend) -> TestResult {
    reset_device(dev, RESET_TIMEOUT)?;
    dev.set_bus_master(true)?;
    drain_interrupts(dev)
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

/// Reads a domain counter.
pub fn dstat(dev: &dyn DmaBackend, domain: u32, counter: u32) -> Result<u64, Failure> {
    Ok(read_stat(
        dev,
        Stat::Domain {
            index: domain,
            counter,
        },
    )?)
}

/// Reads a queue counter.
pub fn qstat(dev: &dyn DmaBackend, queue: u32, counter: u32) -> Result<u64, Failure> {
    Ok(read_stat(
        dev,
        Stat::Queue {
            index: queue,
            counter,
        },
    )?)
}

/// Waits until the queue reports `Q_STATUS_ERROR` (halted); returns `Q_HALT_REASON`.
pub fn wait_halted(q: &DmaQueue<'_>) -> Result<u32, Failure> {
    let start = Instant::now();
    loop {
        let status = q.status()?;
        if status & spec::Q_STATUS_ERROR != 0 {
            return Ok(q.halt_reason()?);
        }
        if start.elapsed() >= COMPLETION_TIMEOUT {
            return Err(Failure(format!(
                "queue {} did not halt within {COMPLETION_TIMEOUT:?} (Q_STATUS {status:#x}, \
                 head {})",
                q.index(),
                q.head()?
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks that the descriptor behind record `i` stays pending for [`NO_IRQ_WINDOW`].
pub fn check_pending(
    q: &DmaQueue<'_>,
    cpl: &CompletionRecords,
    i: usize,
    what: &str,
) -> TestResult {
    match q.wait_completion(cpl, i, NO_IRQ_WINDOW) {
        Err(QueueError::Timeout { .. }) => Ok(()),
        Ok(c) => Err(Failure(format!("{what}: completed: {c}"))),
        Err(e) => Err(e.into()),
    }
}

/// Where scenarios put things in a translated domain's IOVA space. Domain IOVAs start at
/// 2^39 (48-bit mode), above every bus address the back ends hand out, or at 3 GiB in the
/// 32-bit mode, above the bus addresses used then: so an IOVA the device uses is never
/// also a bus address, and a translation that was skipped faults instead of passing.
#[derive(Debug, Clone, Copy)]
pub struct Iovas {
    /// First IOVA of the layout.
    pub base: u64,
    /// Rings.
    pub ring: u64,
    /// Completion records.
    pub cpl: u64,
    /// Small data.
    pub data: u64,
    /// Sources.
    pub src: u64,
    /// Destinations.
    pub dst: u64,
}

impl Iovas {
    /// The layout for a device with these capabilities.
    pub fn for_device(caps: &Capabilities) -> Self {
        let base = if caps.iova_width > 39 {
            BumpIova::DEFAULT_END
        } else {
            0xc000_0000
        };
        Iovas {
            base,
            ring: base,
            cpl: base + 0x10_0000,
            data: base + 0x40_0000,
            src: base + 0x1000_0000,
            dst: base + 0x2000_0000,
        }
    }
}

/// A small, seedable random generator (SplitMix64): test data and choices that a seed
/// reproduces.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
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

    /// `len` bytes of [`unique_data`] under a fresh random seed.
    pub fn unique(&mut self, len: usize) -> Vec<u8> {
        unique_data(self.next_u64(), len)
    }
}

/// SplitMix64's output function.
fn mix(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` bytes in which every 8-byte word is a hash of `seed` and the word's index: no
/// two pages (and no two words) of one buffer hold the same bytes, and buffers under
/// different seeds differ, so a device that maps the wrong page, or copies from the wrong
/// offset, cannot pass a byte-for-byte check.
pub fn unique_data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(&mix(seed ^ mix(i)).to_le_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// CRC32C (Castagnoli, reflected, initial value and final XOR 0xffffffff), in software:
/// the reference the device's CRC32C is checked against.
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

/// Canary byte written around guarded ranges.
pub const CANARY: u8 = 0xc5;

/// DMA memory with a canary-filled guard before and after the range a scenario uses:
/// [`Guarded::check_guards`] proves the device wrote nothing outside it.
#[derive(Debug)]
pub struct Guarded {
    /// The whole allocation.
    pub buf: DmaBuffer,
    /// Offset of the used range in `buf`.
    pub off: usize,
    /// Length of the used range.
    pub len: usize,
}

impl Guarded {
    /// `len` bytes at offset `guard` of an allocation with `guard` canary bytes on each
    /// side (the whole allocation is filled with the canary).
    pub fn new(dev: &dyn DmaBackend, len: usize, guard: usize) -> Result<Self, Failure> {
        let buf = dev.alloc_dma(DmaRequest::new(len + 2 * guard))?;
        buf.fill(0, buf.len(), CANARY);
        Ok(Guarded {
            buf,
            off: guard,
            len,
        })
    }

    /// Bus address of the used range.
    pub fn bus(&self) -> u64 {
        self.buf.bus_addr() + self.off as u64
    }

    /// Writes `data` at `at` in the used range.
    pub fn write(&self, at: usize, data: &[u8]) {
        assert!(
            at + data.len() <= self.len,
            "write outside the guarded range"
        );
        self.buf.write(self.off + at, data);
    }

    /// The used range's bytes.
    pub fn read(&self) -> Vec<u8> {
        self.buf.to_vec(self.off, self.len)
    }

    /// Checks that both guards still hold only the canary.
    pub fn check_guards(&self, what: &str) -> TestResult {
        check_all(
            &self.buf.to_vec(0, self.off),
            CANARY,
            format!("{what}: guard before the range"),
        )?;
        let end = self.off + self.len;
        check_all(
            &self.buf.to_vec(end, self.buf.len() - end),
            CANARY,
            format!("{what}: guard after the range"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn unique_data_differs_per_page_and_seed() {
        let a = unique_data(7, 64 * 4096);
        let pages: std::collections::HashSet<&[u8]> = a.chunks(4096).collect();
        assert_eq!(pages.len(), 64, "every page distinct");
        let words: std::collections::HashSet<&[u8]> = a.chunks(8).collect();
        assert_eq!(words.len(), a.len() / 8, "every word distinct");
        assert_ne!(unique_data(8, 4096), a[..4096]);
        assert_eq!(unique_data(7, 100), a[..100], "a prefix of the same stream");
    }
}
