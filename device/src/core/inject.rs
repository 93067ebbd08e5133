//! Error injection: the device misbehaving on request, so that the error paths of a driver
//! (and of a test suite) run. Nothing is injected unless a rule is set
//! ([`crate::core::Device::set_injection`]).
//!
//! The rules are read on the data path with one relaxed atomic load per descriptor.

use std::sync::atomic::{AtomicU64, Ordering};

/// After every COPY longer than `offset` bytes, the destination byte at `offset` is XORed
/// with `xor` (after the data moved, before the completion record is written): a device
/// that corrupts what it copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptCopy {
    /// Offset in the COPY of the byte corrupted.
    pub offset: u32,
    /// What it is XORed with (not 0).
    pub xor: u8,
}

/// The injection rules in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Injection {
    /// Corrupt one byte of every COPY.
    pub corrupt_copy: Option<CorruptCopy>,
}

/// The rules, as the engine reads them: packed in one atomic word (0: none).
#[derive(Debug, Default)]
pub(crate) struct Rules(AtomicU64);

impl Rules {
    /// Sets the rules.
    pub fn set(&self, inj: Injection) {
        let word = match inj.corrupt_copy {
            Some(c) if c.xor != 0 => 1 << 63 | u64::from(c.xor) << 32 | u64::from(c.offset),
            _ => 0,
        };
        self.0.store(word, Ordering::Relaxed);
    }

    /// The COPY corruption rule, if set.
    #[inline]
    pub fn corrupt_copy(&self) -> Option<CorruptCopy> {
        let w = self.0.load(Ordering::Relaxed);
        (w != 0).then_some(CorruptCopy {
            offset: w as u32,
            xor: (w >> 32) as u8,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_round_trip() {
        let r = Rules::default();
        assert_eq!(r.corrupt_copy(), None);
        let c = CorruptCopy {
            offset: 0xffff_ffff,
            xor: 0x80,
        };
        r.set(Injection {
            corrupt_copy: Some(c),
        });
        assert_eq!(r.corrupt_copy(), Some(c));
        r.set(Injection {
            corrupt_copy: Some(CorruptCopy { offset: 1, xor: 0 }),
        });
        assert_eq!(r.corrupt_copy(), None, "XOR with 0 corrupts nothing");
        r.set(Injection::default());
        assert_eq!(r.corrupt_copy(), None);
    }
}
