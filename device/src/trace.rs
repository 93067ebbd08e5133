//! Device traces: what the device did, event by event, recorded to a file
//! (`domdma-device --trace FILE`) and read back by the `domdma-trace` tool.
//!
//! - [`event`]: the events and the file header (the format's types);
//! - [`recorder`]: recording off the hot path (a ring per thread, a writer thread, a
//!   dropped-event count), and the [`Tracer`] handle the device records through;
//! - [`file`](mod@file): the framing, and a reader that treats the file as hostile input;
//! - [`view`]: what the tool shows: summary, filtered listing, Perfetto / Chrome JSON.
//!
//! What is recorded: every doorbell, descriptor fetched (its 64 bytes), translation
//! (domain, IOVA, bus address, page size, IOTLB hits and misses; a run of pages contiguous
//! in bus memory is one event), completion, fault, interrupt, IOTLB invalidation, DMA_MAP,
//! DMA_UNMAP and reset, each with the time since the trace started.

pub mod event;
pub mod file;
pub mod recorder;
pub mod replay;
pub mod view;

pub use event::{Event, Record, ResetKind, TraceConfig, Translated, NO_QUEUE};
pub use file::{read_all, Trace, TraceError, TraceReader};
pub use recorder::{RecordOptions, Recorder, Tracer};

impl From<&crate::core::DeviceConfig> for TraceConfig {
    fn from(c: &crate::core::DeviceConfig) -> Self {
        Self {
            queues: c.queues,
            domains: c.domains,
            iova_width: c.iova_width,
            iotlb_entries: c.iotlb_entries,
            max_transfer: c.max_transfer,
            strict_iotlb: c.strict_iotlb,
        }
    }
}

impl From<&TraceConfig> for crate::core::DeviceConfig {
    fn from(c: &TraceConfig) -> Self {
        Self {
            queues: c.queues,
            domains: c.domains,
            iova_width: c.iova_width,
            iotlb_entries: c.iotlb_entries,
            max_transfer: c.max_transfer,
            strict_iotlb: c.strict_iotlb,
        }
    }
}
