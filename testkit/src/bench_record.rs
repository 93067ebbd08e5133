//! The guest bench's record: what the guest binary run with `--bench` prints, one
//! `DOMDMA-BENCH {json}` line per measurement, and what the host runner (`domdma-vm run
//! --bench`) reads back. One type on both sides of the SSH pipe.

use serde::{Deserialize, Serialize};

/// The start of a bench line on stdout.
pub const BENCH_PREFIX: &str = "DOMDMA-BENCH";

/// One `DOMDMA-BENCH` line's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// Where the bench ran (first line).
    Env {
        /// The guest profile.
        profile: String,
        /// The driver model's back end ("vfio", "noiommu").
        backend: String,
        /// How BAR0 is reached.
        register_access: String,
        /// The hypervisor's CPUID signature (leaf 0x4000_0000), e.g. "KVMKVMKVM" or
        /// "TCGTCGTCGTCG"; empty when the CPU reports none.
        hypervisor: String,
        /// `model name` of the first CPU in /proc/cpuinfo.
        cpu_model: String,
        /// CPUs online in the guest.
        cpus: usize,
        /// Rounds.
        rounds: u32,
        /// Latency samples per round and mode.
        latency_samples: u32,
        /// Bytes per throughput measurement.
        throughput_bytes: u64,
    },
    /// Submit-to-completion latency.
    Latency {
        /// "poll" (completion record), "irq" (MSI-X eventfd), "memcpy" (the guest copies
        /// the same bytes: the baseline) or "clock" (the two clock reads alone).
        completion: String,
        /// Bytes per operation.
        bytes: usize,
        /// Rounds.
        rounds: u32,
        /// Samples per round.
        samples: u32,
        /// Median over rounds of the round's 50th percentile, in microseconds.
        p50_us: f64,
        /// Median over rounds of the round's 99th percentile, in microseconds.
        p99_us: f64,
        /// Smallest sample of all rounds, in microseconds.
        min_us: f64,
        /// Largest sample of all rounds, in microseconds.
        max_us: f64,
        /// Each round's 50th percentile, in microseconds.
        round_p50_us: Vec<f64>,
        /// Each round's 99th percentile, in microseconds.
        round_p99_us: Vec<f64>,
    },
    /// COPY throughput against memcpy for one page size and transfer size.
    Throughput {
        /// "2M" or "4K": the pages backing source and destination.
        pages: String,
        /// Bytes per descriptor (and per memcpy call).
        bytes: usize,
        /// Descriptors (and memcpy calls) per measurement.
        count: usize,
        /// Rounds.
        rounds: u32,
        /// Median DMA throughput, MiB/s.
        dma_mib_s: f64,
        /// Median memcpy throughput, MiB/s.
        memcpy_mib_s: f64,
        /// Median over rounds of the round's DMA/memcpy throughput ratio.
        ratio: f64,
        /// Smallest ratio of a round.
        ratio_min: f64,
        /// Largest ratio of a round.
        ratio_max: f64,
        /// Each round's DMA throughput, MiB/s.
        round_dma_mib_s: Vec<f64>,
        /// Each round's memcpy throughput, MiB/s.
        round_memcpy_mib_s: Vec<f64>,
    },
    /// A part that was not measured, and why.
    Skipped {
        /// What ("latency irq", "throughput 2M").
        what: String,
        /// Why.
        reason: String,
    },
    /// A kind a reader does not know (written by a newer guest binary): the host keeps
    /// it in the JSON only.
    #[serde(other)]
    Unknown,
}

/// The stdout line for a record.
pub fn bench_line(record: &Record) -> String {
    let json = serde_json::to_string(record).expect("serialising a plain enum cannot fail");
    format!("{BENCH_PREFIX} {json}")
}
