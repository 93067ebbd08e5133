//! Interrupt delivery, behind a trait so the core never sees eventfds.

use std::sync::Mutex;

/// Where the device core sends MSI-X interrupts.
pub trait InterruptSink: Send + Sync {
    /// Raise MSI-X vector `vector`. Vectors nobody listens to are dropped.
    fn trigger(&self, vector: u16);
}

/// An [`InterruptSink`] that records every raised vector; for tests.
#[derive(Debug, Default)]
pub struct RecordingInterrupts {
    raised: Mutex<Vec<u16>>,
}

impl RecordingInterrupts {
    /// Create an empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Return and clear the vectors raised so far, in order.
    pub fn take(&self) -> Vec<u16> {
        std::mem::take(&mut *self.raised.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl InterruptSink for RecordingInterrupts {
    fn trigger(&self, vector: u16) {
        self.raised
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(vector);
    }
}
