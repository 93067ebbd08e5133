//! Statistics counters: updated lock-free by the engine and the MMU, read as snapshots by
//! the register window (`REG_STAT_*`) and the server's inspector.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters of one queue.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Descriptors completed (changed only under the queue lock, [`add_locked`]).
    pub descriptors: AtomicU64,
    /// Bytes transferred (changed only under the queue lock).
    pub bytes: AtomicU64,
    /// Descriptors completed with an error status (changed only under the queue lock).
    pub errors: AtomicU64,
    /// Faults raised.
    pub faults: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

/// A snapshot of one queue's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Descriptors completed.
    pub descriptors: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// Descriptors completed with an error status.
    pub errors: u64,
    /// Faults raised.
    pub faults: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

impl QueueCounters {
    /// Take a snapshot.
    pub fn snapshot(&self) -> QueueStats {
        QueueStats {
            descriptors: self.descriptors.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
        }
    }

    /// Zero every counter.
    pub fn clear(&self) {
        for c in [
            &self.descriptors,
            &self.bytes,
            &self.errors,
            &self.faults,
            &self.interrupts,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Live counters of one domain.
#[derive(Debug, Default)]
pub struct DomainCounters {
    /// Translations requested.
    pub translations: AtomicU64,
    /// IOTLB hits.
    pub iotlb_hits: AtomicU64,
    /// IOTLB misses.
    pub iotlb_misses: AtomicU64,
    /// Page walks.
    pub page_walks: AtomicU64,
    /// Translation faults.
    pub faults: AtomicU64,
    /// Strict mode: hits whose cached translation no longer matched the table.
    pub stale_uses: AtomicU64,
}

/// A snapshot of one domain's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DomainStats {
    /// Translations requested.
    pub translations: u64,
    /// IOTLB hits.
    pub iotlb_hits: u64,
    /// IOTLB misses.
    pub iotlb_misses: u64,
    /// Page walks.
    pub page_walks: u64,
    /// Translation faults.
    pub faults: u64,
    /// Strict mode: hits whose cached translation no longer matched the table.
    pub stale_uses: u64,
}

impl DomainStats {
    /// Add `other` to these.
    pub fn add(&mut self, other: &DomainStats) {
        self.translations = self.translations.wrapping_add(other.translations);
        self.iotlb_hits = self.iotlb_hits.wrapping_add(other.iotlb_hits);
        self.iotlb_misses = self.iotlb_misses.wrapping_add(other.iotlb_misses);
        self.page_walks = self.page_walks.wrapping_add(other.page_walks);
        self.faults = self.faults.wrapping_add(other.faults);
        self.stale_uses = self.stale_uses.wrapping_add(other.stale_uses);
    }
}

impl DomainCounters {
    /// Take a snapshot.
    pub fn snapshot(&self) -> DomainStats {
        DomainStats {
            translations: self.translations.load(Ordering::Relaxed),
            iotlb_hits: self.iotlb_hits.load(Ordering::Relaxed),
            iotlb_misses: self.iotlb_misses.load(Ordering::Relaxed),
            page_walks: self.page_walks.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            stale_uses: self.stale_uses.load(Ordering::Relaxed),
        }
    }

    /// Zero every counter.
    pub fn clear(&self) {
        for c in [
            &self.translations,
            &self.iotlb_hits,
            &self.iotlb_misses,
            &self.page_walks,
            &self.faults,
            &self.stale_uses,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// Fault log totals.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FaultStats {
    /// Faults detected since reset.
    pub count: u64,
    /// Faults not logged since reset.
    pub dropped: u64,
}

/// Everything the device counts, as served by the inspector.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStats {
    /// Per queue, by index.
    pub queues: Vec<QueueStats>,
    /// Per domain, by index.
    pub domains: Vec<DomainStats>,
    /// Fault log totals.
    pub faults: FaultStats,
    /// IOTLB entries in use.
    pub iotlb_entries: u64,
}

/// Add `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Add `n` to a counter that one thread at a time changes, under a lock that every other
/// writer of it (and [`QueueCounters::clear`]) holds too: a load and a store, without the
/// cost of a read-modify-write (readers still see whole values).
pub fn add_locked(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}
