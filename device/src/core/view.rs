//! What the device looks like now, for people: every queue's registers and ring
//! occupancy, every domain's mode and map (walked from its page tables, by leaf size), the
//! counters, the faults reported lately and the injection rules in force. The web view
//! (`--http`) serves it as JSON and draws it.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use vm_memory::GuestAddressSpace;

use super::mmu::walk::map_runs;
use super::mmu::MapRun;
use super::queue::QueueState;
use super::stats::{DomainStats, FaultStats, QueueStats};
use super::Observer;
use crate::spec::*;
use crate::trace::event::FaultEvent;

/// Entries of page tables one view reads at most per domain (a guest's tables may be huge).
pub const MAP_BUDGET: usize = 1 << 16;
/// Runs one view lists at most per domain.
pub const MAP_RUNS: usize = 512;
/// Faults the device keeps for the view.
pub const RECENT_FAULTS: usize = 64;

/// One queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    /// Index.
    pub index: u16,
    /// "disabled", "running" or "halted: REASON".
    pub state: String,
    /// Ring size (entries).
    pub size: u32,
    /// Next descriptor the device runs.
    pub head: u32,
    /// The driver's tail (last doorbell).
    pub tail: u32,
    /// Descriptors between head and tail.
    pub occupancy: u32,
    /// The queue's domain.
    pub domain: u32,
    /// Its MSI-X vector.
    pub vector: u16,
    /// Counters.
    pub stats: QueueStats,
}

/// One domain.
#[derive(Debug, Clone, Serialize)]
pub struct DomainView {
    /// Index.
    pub index: u16,
    /// "disabled", "pass-through" or "translated".
    pub mode: &'static str,
    /// Page-table root (bus address).
    pub root: u64,
    /// Counters.
    pub stats: DomainStats,
    /// Translated domains: the mapped IOVA ranges, by leaf size, in IOVA order.
    pub map: Vec<MapRun>,
    /// The walk saw every entry (false: budget or run limit reached, or an entry or table
    /// that could not be read or decoded).
    pub map_complete: bool,
}

/// The device.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceView {
    /// Queues.
    pub queues: Vec<QueueView>,
    /// Domains.
    pub domains: Vec<DomainView>,
    /// IOTLB entries in use, and its size.
    pub iotlb: (u64, u64),
    /// Fault log totals.
    pub fault_log: FaultStats,
    /// The last faults reported (oldest first).
    pub recent_faults: Vec<FaultEvent>,
    /// Error-injection rules in force (`NAME:KEY=VALUE,...`).
    pub injection: Vec<String>,
}

/// The faults reported lately, for the view: a bounded ring.
#[derive(Debug, Default)]
pub(crate) struct RecentFaults(Mutex<VecDeque<FaultEvent>>);

impl RecentFaults {
    /// Keep `f` (dropping the oldest beyond [`RECENT_FAULTS`]).
    pub fn push(&self, f: FaultEvent) {
        let mut q = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() == RECENT_FAULTS {
            q.pop_front();
        }
        q.push_back(f);
    }

    /// The faults kept, oldest first.
    pub fn get(&self) -> Vec<FaultEvent> {
        let q = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        q.iter().copied().collect()
    }

    /// Forget them (device reset).
    pub fn clear(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

fn state_name(s: QueueState) -> String {
    match s {
        QueueState::Disabled => "disabled".into(),
        QueueState::Running => "running".into(),
        QueueState::Halted(why) => format!("halted: {why:?}"),
    }
}

impl Observer {
    /// What the device looks like now ([`DeviceView`]). Walks each translated domain's
    /// page tables (bounded by [`MAP_BUDGET`] entries), so it costs up to a few
    /// milliseconds; it takes no lock a worker holds while moving data, and not the
    /// transport's lock on [`super::Device`]. Nor the chunk gate: a walk is not ordered
    /// with a DMA_UNMAP and may read a table the VMM has just taken back (through the
    /// device's own mapping, kept alive by the snapshot: the map shown is then stale).
    pub fn view(&self) -> DeviceView {
        let shared = &self.shared;
        let queues = shared
            .queues
            .iter()
            .map(|slot| {
                let r = slot.lock();
                let (head, tail) = (slot.head(), slot.tail());
                let mask = r.size.wrapping_sub(1);
                QueueView {
                    index: slot.index,
                    state: state_name(r.state),
                    size: r.size,
                    head,
                    tail,
                    occupancy: if r.size == 0 {
                        0
                    } else {
                        tail.wrapping_sub(head) & mask
                    },
                    domain: r.domain,
                    vector: r.vector,
                    stats: slot.counters.snapshot(),
                }
            })
            .collect();
        let mem = shared.mem.memory();
        let _armed = super::sigbus::arm(&mem);
        let stats = shared.mmu.stats();
        let domains = (0..shared.mmu.num_domains())
            .filter_map(|d| {
                let regs = shared.mmu.domain(d)?;
                let mode = match regs.mode & 3 {
                    DOMAIN_MODE_PASSTHROUGH => "pass-through",
                    DOMAIN_MODE_TRANSLATED => "translated",
                    _ => "disabled",
                };
                let (map, map_complete) = if mode == "translated" {
                    map_runs(&mem, regs.root, MAP_BUDGET, MAP_RUNS)
                } else {
                    (Vec::new(), true)
                };
                Some(DomainView {
                    index: d,
                    mode,
                    root: regs.root,
                    stats: stats.get(usize::from(d)).copied().unwrap_or_default(),
                    map,
                    map_complete,
                })
            })
            .collect();
        if let Some(page) = super::sigbus::take_fault() {
            // A table in memory that vanished: the walk read zeros there; mark it lost.
            super::sigbus::lose(&mem, page);
        }
        DeviceView {
            queues,
            domains,
            iotlb: (
                shared.mmu.iotlb_len() as u64,
                shared.mmu.iotlb_capacity() as u64,
            ),
            fault_log: shared.faults.stats(),
            recent_faults: shared.recent_faults.get(),
            injection: shared
                .inject
                .get()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}
