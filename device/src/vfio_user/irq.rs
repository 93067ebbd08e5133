//! MSI-X delivery through eventfds handed over by the client (`DEVICE_SET_IRQS`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{PoisonError, RwLock};

use thiserror::Error;
use tracing::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::irq::InterruptSink;

/// Errors of the eventfd interrupt sink.
#[derive(Debug, Error)]
pub enum IrqError {
    /// A received descriptor is not an eventfd.
    #[error("file descriptor is a {kind}, not an eventfd")]
    NotAnEventFd {
        /// What `/proc/self/fd` says the descriptor is.
        kind: String,
    },
    /// Making a received eventfd non-blocking failed.
    #[error("cannot make the eventfd non-blocking")]
    NonBlocking(#[source] io::Error),
}

/// Check that `fd` is an eventfd and make it non-blocking, so that a signal can never
/// block the device (a full pipe passed off as an eventfd would).
pub fn eventfd_from_owned(fd: OwnedFd) -> Result<EventFd, IrqError> {
    let raw = fd.as_raw_fd();
    // /proc/self/fd/N of an eventfd reads "anon_inode:[eventfd]". If /proc is unavailable
    // we cannot tell, and rely on O_NONBLOCK alone.
    if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{raw}")) {
        let target = target.to_string_lossy().into_owned();
        if target != "anon_inode:[eventfd]" {
            return Err(IrqError::NotAnEventFd { kind: target });
        }
    }
    // SAFETY: fcntl(F_GETFL) on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(IrqError::NonBlocking(io::Error::last_os_error()));
    }
    // SAFETY: fcntl(F_SETFL) on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(IrqError::NonBlocking(io::Error::last_os_error()));
    }
    // SAFETY: `into_raw_fd` gives up ownership of a valid descriptor, which the EventFd
    // takes over and closes on drop.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// An [`InterruptSink`] that signals one client-provided eventfd per MSI-X vector.
///
/// Vectors without an eventfd drop their interrupts (the client has not enabled them, or
/// has masked them by withdrawing the eventfd). The table grows as vectors are assigned;
/// the server checks vector numbers against the device's vector count.
///
/// Threading: [`InterruptSink::trigger`] is called concurrently by the device's engine
/// workers (one per queue, plus the fault log from any of them) and by the server thread.
/// It takes the table's read lock, which any number of triggers share, and does one
/// non-blocking `write(2)` to the eventfd; it never blocks and never takes the device
/// mutex. Only `DEVICE_SET_IRQS` takes the write lock, for a table update.
#[derive(Debug, Default)]
pub struct EventFdInterrupts {
    vectors: RwLock<Vec<Option<EventFd>>>,
}

impl EventFdInterrupts {
    /// An empty sink: every interrupt is dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Assign `fds` to vectors `start..start + fds.len()`, replacing (closing) any
    /// eventfds there.
    pub fn assign(&self, start: usize, fds: Vec<EventFd>) {
        let mut v = self.vectors.write().unwrap_or_else(PoisonError::into_inner);
        let end = start + fds.len();
        if v.len() < end {
            v.resize_with(end, || None);
        }
        for (slot, fd) in v[start..end].iter_mut().zip(fds) {
            *slot = Some(fd);
        }
    }

    /// Withdraw (close) the eventfds of vectors `start..start + count`.
    pub fn clear(&self, start: usize, count: usize) {
        let mut v = self.vectors.write().unwrap_or_else(PoisonError::into_inner);
        let len = v.len();
        for slot in v
            .iter_mut()
            .take(start.saturating_add(count).min(len))
            .skip(start)
        {
            *slot = None;
        }
    }

    /// Withdraw (close) every eventfd.
    pub fn clear_all(&self) {
        self.vectors
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Number of vectors that have an eventfd.
    pub fn assigned(&self) -> usize {
        self.vectors
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|s| s.is_some())
            .count()
    }
}

impl InterruptSink for EventFdInterrupts {
    fn trigger(&self, vector: u16) {
        let v = self.vectors.read().unwrap_or_else(PoisonError::into_inner);
        match v.get(usize::from(vector)) {
            Some(Some(fd)) => match fd.write(1) {
                Ok(()) => {}
                // The counter is saturated: the client has not consumed earlier signals,
                // so it will still see one. Nothing is lost.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => warn!(vector, error = %e, "cannot signal MSI-X eventfd"),
            },
            _ => debug!(vector, "MSI-X vector has no eventfd; interrupt dropped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(fd: EventFd) -> OwnedFd {
        // SAFETY: into_raw_fd transfers ownership of a valid descriptor.
        unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) }
    }

    #[test]
    fn signals_assigned_vectors_only() {
        let sink = EventFdInterrupts::new();
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        sink.assign(1, vec![a2, b2]);
        assert_eq!(sink.assigned(), 2);
        sink.trigger(0);
        sink.trigger(1);
        sink.trigger(2);
        sink.trigger(2);
        sink.trigger(999);
        assert_eq!(a.read().unwrap(), 1);
        assert_eq!(b.read().unwrap(), 2);
        sink.clear(2, 5);
        sink.trigger(2);
        assert!(b.read().is_err(), "withdrawn vector is not signalled");
        sink.clear_all();
        sink.trigger(1);
        assert!(a.read().is_err());
        assert_eq!(sink.assigned(), 0);
    }

    #[test]
    fn concurrent_triggers_from_many_threads() {
        let sink = std::sync::Arc::new(EventFdInterrupts::new());
        let fds: Vec<EventFd> = (0..4)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        sink.assign(0, fds.iter().map(|f| f.try_clone().unwrap()).collect());
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u16 {
                        sink.trigger((t + i) % 4);
                    }
                })
            })
            .collect();
        // Re-assigning meanwhile (as SET_IRQS does) is safe.
        sink.assign(3, vec![fds[3].try_clone().unwrap()]);
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = fds.iter().map(|f| f.read().unwrap()).sum();
        assert_eq!(total, 4000, "every trigger counted once");
    }

    #[test]
    fn accepts_eventfds_rejects_other_fds() {
        let e = EventFd::new(0).unwrap();
        let fd = eventfd_from_owned(owned(e)).unwrap();
        // Now non-blocking: reading an empty counter fails instead of blocking.
        assert_eq!(fd.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);

        let f = std::fs::File::open("/dev/null").unwrap();
        let err = eventfd_from_owned(OwnedFd::from(f)).unwrap_err();
        assert!(matches!(err, IrqError::NotAnEventFd { .. }), "{err}");
    }
}
