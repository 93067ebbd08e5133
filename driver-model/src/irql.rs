//! IRQL, modelled per thread.
//!
//! Windows runs each processor at an interrupt request level; code at `DISPATCH_LEVEL` or
//! above may not wait or touch pageable memory, and the seeds' IRQL rules (for example "a
//! paged-pool lookaside list is created at IRQL <= APC_LEVEL") are about that level. Here
//! every thread has a level, `PASSIVE_LEVEL` at start; [`KeRaiseIrql`] and [`KeLowerIrql`]
//! move it with the same rules as the kernel (raising to a lower level or lowering to a
//! higher one is a bug check), and the facade's checks read it with [`KeGetCurrentIrql`].
//! [`IrqlGuard`] is the idiomatic form: raise now, restore on drop.

#![allow(non_snake_case)]

use std::cell::Cell;

use crate::verifier::{
    bug_check, BugCheck, DRIVER_VERIFIER_DETECTED_VIOLATION, VERIFIER_LOWER_IRQL_HIGHER,
    VERIFIER_RAISE_IRQL_LOWER,
};

/// An interrupt request level.
pub type KIRQL = u8;

/// Threads run at this level normally.
pub const PASSIVE_LEVEL: KIRQL = 0;
/// Asynchronous procedure calls are masked.
pub const APC_LEVEL: KIRQL = 1;
/// The dispatcher (scheduler) is masked: no waiting, no pageable memory.
pub const DISPATCH_LEVEL: KIRQL = 2;
/// The highest level.
pub const HIGH_LEVEL: KIRQL = 15;

thread_local! {
    static IRQL: Cell<KIRQL> = const { Cell::new(PASSIVE_LEVEL) };
}

/// The calling thread's IRQL.
pub fn KeGetCurrentIrql() -> KIRQL {
    IRQL.with(Cell::get)
}

/// Raises the thread's IRQL to `NewIrql` and stores the previous level in `OldIrql`.
/// Raising to a level below the current one is Driver Verifier's bug check 0xC4 / 0x30.
pub fn KeRaiseIrql(NewIrql: KIRQL, OldIrql: &mut KIRQL) {
    let current = KeGetCurrentIrql();
    if NewIrql < current || NewIrql > HIGH_LEVEL {
        bug_check(BugCheck::new(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                VERIFIER_RAISE_IRQL_LOWER,
                u64::from(current),
                u64::from(NewIrql),
                0,
            ],
            format!("KeRaiseIrql to {NewIrql} from {current}"),
        ));
        *OldIrql = current;
        return;
    }
    *OldIrql = current;
    IRQL.with(|l| l.set(NewIrql));
}

/// Lowers the thread's IRQL to `NewIrql` (the value `KeRaiseIrql` returned). Lowering to a
/// level above the current one is Driver Verifier's bug check 0xC4 / 0x31.
pub fn KeLowerIrql(NewIrql: KIRQL) {
    let current = KeGetCurrentIrql();
    if NewIrql > current {
        bug_check(BugCheck::new(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                VERIFIER_LOWER_IRQL_HIGHER,
                u64::from(current),
                u64::from(NewIrql),
                0,
            ],
            format!("KeLowerIrql to {NewIrql} from {current}"),
        ));
        return;
    }
    IRQL.with(|l| l.set(NewIrql));
}

/// Raises the thread's IRQL for the guard's lifetime.
#[derive(Debug)]
#[must_use = "the IRQL is restored when the guard is dropped"]
pub struct IrqlGuard {
    old: KIRQL,
}

impl IrqlGuard {
    /// Raises to `level` (which must not be below the current level).
    pub fn raise(level: KIRQL) -> Self {
        let mut old = PASSIVE_LEVEL;
        KeRaiseIrql(level, &mut old);
        IrqlGuard { old }
    }

    /// The level the guard restores.
    pub fn previous(&self) -> KIRQL {
        self.old
    }
}

impl Drop for IrqlGuard {
    fn drop(&mut self) {
        // Never raise a second bug check while unwinding from one.
        if KeGetCurrentIrql() >= self.old {
            IRQL.with(|l| l.set(self.old));
        }
    }
}

/// The WDF verifier's IRQL check (`FxVerifierCheckIrqlLevel`): whether the caller runs at
/// `max` or below. KMDF does not bug check here: the call fails with
/// `STATUS_INVALID_DEVICE_REQUEST` and the violation is logged (a debugger break on
/// Windows); the caller returns that status when this is `false`.
pub(crate) fn irql_at_most(api: &str, max: KIRQL) -> bool {
    let current = KeGetCurrentIrql();
    if current <= max {
        return true;
    }
    tracing::error!(
        target: "verifier",
        "{api} called at IRQL {current}, must be <= {max}: STATUS_INVALID_DEVICE_REQUEST"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verifier::expect_bug_check;

    #[test]
    fn raise_and_lower_round_trip() {
        assert_eq!(KeGetCurrentIrql(), PASSIVE_LEVEL);
        let mut old = HIGH_LEVEL;
        KeRaiseIrql(DISPATCH_LEVEL, &mut old);
        assert_eq!(old, PASSIVE_LEVEL);
        assert_eq!(KeGetCurrentIrql(), DISPATCH_LEVEL);
        KeLowerIrql(old);
        assert_eq!(KeGetCurrentIrql(), PASSIVE_LEVEL);
    }

    #[test]
    fn guard_restores() {
        {
            let g = IrqlGuard::raise(APC_LEVEL);
            assert_eq!(g.previous(), PASSIVE_LEVEL);
            let _inner = IrqlGuard::raise(DISPATCH_LEVEL);
            assert_eq!(KeGetCurrentIrql(), DISPATCH_LEVEL);
        }
        assert_eq!(KeGetCurrentIrql(), PASSIVE_LEVEL);
    }

    #[test]
    fn irql_is_per_thread() {
        let _g = IrqlGuard::raise(DISPATCH_LEVEL);
        let other = std::thread::spawn(KeGetCurrentIrql).join().unwrap();
        assert_eq!(other, PASSIVE_LEVEL);
    }

    #[test]
    fn raising_to_a_lower_level_is_a_bug_check() {
        let _g = IrqlGuard::raise(DISPATCH_LEVEL);
        let bc = expect_bug_check(|| {
            let mut old = 0;
            KeRaiseIrql(APC_LEVEL, &mut old);
        });
        assert_eq!(bc.code, DRIVER_VERIFIER_DETECTED_VIOLATION);
        assert_eq!(bc.params[..3], [VERIFIER_RAISE_IRQL_LOWER, 2, 1]);
    }

    #[test]
    fn lowering_to_a_higher_level_is_a_bug_check() {
        let bc = expect_bug_check(|| KeLowerIrql(DISPATCH_LEVEL));
        assert_eq!(bc.code, DRIVER_VERIFIER_DETECTED_VIOLATION);
        assert_eq!(bc.params[..3], [VERIFIER_LOWER_IRQL_HIGHER, 0, 2]);
        assert_eq!(KeGetCurrentIrql(), PASSIVE_LEVEL);
    }
}
