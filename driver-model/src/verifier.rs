//! The verifier: bug checks as values, not process aborts.
//!
//! A Windows driver that breaks an API rule stops the machine with a bug check (a code and
//! four parameters). Here a bug check is a [`BugCheck`] value, and what happens to it is
//! the calling thread's [`VerifierMode`]:
//!
//! - [`VerifierMode::Raise`] (the default): the thread panics with the `BugCheck` as the
//!   panic payload (`std::panic::panic_any`), so the offending call does not return, as on
//!   Windows. Tests catch it with [`catch_bug_check`] and assert on code and parameters;
//! - [`VerifierMode::Record`]: the bug check is appended to the thread's record
//!   ([`take_recorded`]) and the call goes on, returning the status the rule's
//!   "verifier off" path returns (each call site documents it). For fuzzing and for code
//!   that wants to collect every violation of a run.
//!
//! Mode and record are per thread, so tests running in parallel do not see each other's
//! bug checks. Every bug check is also logged with `tracing` at error level.
//!
//! [`low_resources`] is Driver Verifier's low resources simulation: allocations that fail
//! on purpose, reproducibly, per thread.

pub mod low_resources;

use std::cell::{Cell, RefCell};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

/// `BAD_POOL_CALLER`: an invalid pool request (double free, wrong tag, bad pointer).
pub const BAD_POOL_CALLER: u32 = 0xC2;
/// `DRIVER_VERIFIER_DETECTED_VIOLATION`.
pub const DRIVER_VERIFIER_DETECTED_VIOLATION: u32 = 0xC4;
/// `DRIVER_VERIFIER_DMA_VIOLATION`.
pub const DRIVER_VERIFIER_DMA_VIOLATION: u32 = 0xE6;
/// `WDF_VIOLATION`: a KMDF driver broke a framework rule.
pub const WDF_VIOLATION: u32 = 0x10D;

/// `WDF_VIOLATION` parameter 1: a required parameter was NULL.
pub const WDF_REQUIRED_PARAMETER_IS_NULL: u64 = 0x4;
/// `WDF_VIOLATION` parameter 1: an invalid (or wrong-type, or deleted) handle (P2 the
/// handle, P3 the [`fx_type`] required).
pub const WDF_INVALID_HANDLE: u64 = 0x5;
/// `WDF_VIOLATION` parameter 1: an object-level error (for example deleting an object
/// twice, or deleting one the driver may not delete).
pub const WDF_OBJECT_ERROR: u64 = 0x7;

/// `BAD_POOL_CALLER` parameter 1: the pool block was already freed (P2 reserved, P3 the
/// block's header, P4 its address).
pub const BAD_POOL_CALLER_DOUBLE_FREE: u64 = 0x07;
/// `BAD_POOL_CALLER` parameter 1: `ExFreePoolWithTag` with a tag that is not the
/// allocation's (P2 the address, P3 the allocation's tag, P4 the tag passed).
pub const BAD_POOL_CALLER_WRONG_TAG: u64 = 0x0A;
/// `BAD_POOL_CALLER` parameter 1: the address is not a pool allocation (P2 the address).
pub const BAD_POOL_CALLER_BAD_ADDRESS: u64 = 0x46;

/// `DRIVER_VERIFIER_DETECTED_VIOLATION` parameter 1: `KeRaiseIrql` to a lower level (P2
/// the current IRQL, P3 the requested one).
pub const VERIFIER_RAISE_IRQL_LOWER: u64 = 0x30;
/// `DRIVER_VERIFIER_DETECTED_VIOLATION` parameter 1: `KeLowerIrql` to a higher level (P2
/// the current IRQL, P3 the requested one).
pub const VERIFIER_LOWER_IRQL_HIGHER: u64 = 0x31;
/// `DRIVER_VERIFIER_DETECTED_VIOLATION` parameter 1: a driver unloads with pool
/// allocations outstanding (P2 the driver's name, here 0 with the name in the message; P4
/// the number of allocations not freed).
pub const VERIFIER_POOL_LEAK_AT_UNLOAD: u64 = 0x62;

/// `DRIVER_VERIFIER_DMA_VIOLATION` parameter 1: more common buffers freed than allocated
/// (documented as "usually the same buffer twice"). The model also raises it for a free
/// whose address, length or virtual address matches no allocation exactly: Windows
/// documents no separate code for that, and it is the same bug (freeing what is not an
/// allocation).
pub const DMA_VIOLATION_EXTRA_COMMON_BUFFER_FREE: u64 = 0x03;
/// `DRIVER_VERIFIER_DMA_VIOLATION` parameter 1: an adapter was released with common buffers
/// outstanding (P2 the adapter, P3 the count). The model also raises it for
/// `LeaveDmaDomain` with domain common buffers outstanding (Windows documents nothing for
/// that case; leaving would orphan the buffers' mappings).
pub const DMA_VIOLATION_COMMON_BUFFERS_OUTSTANDING: u64 = 0x07;

/// KMDF object type codes (`fxtypes.h`), parameter 3 of `WDF_INVALID_HANDLE`: the type the
/// call required.
pub mod fx_type {
    /// Any object.
    pub const FX_TYPE_OBJECT: u64 = 0x1000;
    /// WDFDRIVER.
    pub const FX_TYPE_DRIVER: u64 = 0x1001;
    /// WDFDEVICE.
    pub const FX_TYPE_DEVICE: u64 = 0x1002;
    /// WDFREQUEST.
    pub const FX_TYPE_REQUEST: u64 = 0x1008;
    /// WDFLOOKASIDE.
    pub const FX_TYPE_LOOKASIDE: u64 = 0x1009;
    /// Any WDFMEMORY.
    pub const IFX_TYPE_MEMORY: u64 = 0x100A;
    /// A WDFMEMORY made by `WdfMemoryCreatePreallocated`.
    pub const FX_TYPE_MEMORY_PREALLOCATED: u64 = 0x1022;
}

/// A bug check: the code, its four parameters and a message saying what was wrong.
#[derive(Clone, PartialEq, Eq)]
pub struct BugCheck {
    /// Bug check code (`WDF_VIOLATION`, `BAD_POOL_CALLER`, ...).
    pub code: u32,
    /// Parameters 1..4 (parameter 1 is the subcode for the codes that have one).
    pub params: [u64; 4],
    /// What the verifier saw, for people.
    pub message: String,
}

impl BugCheck {
    /// A bug check with `code`, parameters and message.
    pub fn new(code: u32, params: [u64; 4], message: impl Into<String>) -> Self {
        BugCheck {
            code,
            params,
            message: message.into(),
        }
    }

    /// A `WDF_VIOLATION` with `subcode` as parameter 1 and `param2` (usually the handle or
    /// pointer concerned).
    pub fn wdf(subcode: u64, param2: u64, message: impl Into<String>) -> Self {
        Self::new(WDF_VIOLATION, [subcode, param2, 0, 0], message)
    }

    /// Parameter 1, the subcode.
    pub fn subcode(&self) -> u64 {
        self.params[0]
    }
}

impl fmt::Debug for BugCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BugCheck {:#x} ({:#x}, {:#x}, {:#x}, {:#x}): {}",
            self.code, self.params[0], self.params[1], self.params[2], self.params[3], self.message
        )
    }
}

impl fmt::Display for BugCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a thread does with a bug check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifierMode {
    /// Panic with the [`BugCheck`] as payload (the call does not return).
    #[default]
    Raise,
    /// Record it and let the call return its fallback status.
    Record,
}

thread_local! {
    static MODE: Cell<VerifierMode> = const { Cell::new(VerifierMode::Raise) };
    static RECORDED: RefCell<Vec<BugCheck>> = const { RefCell::new(Vec::new()) };
}

/// The calling thread's mode.
pub fn mode() -> VerifierMode {
    MODE.with(Cell::get)
}

/// Sets the calling thread's mode; returns the previous one.
pub fn set_mode(mode: VerifierMode) -> VerifierMode {
    MODE.with(|m| m.replace(mode))
}

/// Takes the bug checks recorded on this thread (in [`VerifierMode::Record`]).
pub fn take_recorded() -> Vec<BugCheck> {
    RECORDED.with(|r| std::mem::take(&mut *r.borrow_mut()))
}

/// Raises or records `bc` as the thread's mode says. Returns only in record mode.
#[track_caller]
pub fn bug_check(bc: BugCheck) {
    tracing::error!(target: "verifier", "{bc:?}");
    match mode() {
        VerifierMode::Raise => {
            install_quiet_hook();
            panic::panic_any(bc)
        }
        VerifierMode::Record => RECORDED.with(|r| r.borrow_mut().push(bc)),
    }
}

/// Installs (once) a panic hook that prints a bug-check panic as one line and leaves every
/// other panic to the previous hook.
fn install_quiet_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if let Some(bc) = info.payload().downcast_ref::<BugCheck>() {
                eprintln!("*** STOP: {bc:?}");
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f` in [`VerifierMode::Raise`] and returns the bug check it raised, or `Ok` with
/// its result. Any other panic is resumed.
pub fn catch_bug_check<R>(f: impl FnOnce() -> R) -> Result<R, BugCheck> {
    install_quiet_hook();
    let before = set_mode(VerifierMode::Raise);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    set_mode(before);
    match result {
        Ok(r) => Ok(r),
        Err(payload) => match payload.downcast::<BugCheck>() {
            Ok(bc) => Err(*bc),
            Err(other) => panic::resume_unwind(other),
        },
    }
}

/// Runs `f` and returns the bug check it raised; panics (failing the test) when it raised
/// none.
#[track_caller]
pub fn expect_bug_check<R>(f: impl FnOnce() -> R) -> BugCheck {
    match catch_bug_check(f) {
        Ok(_) => panic!("expected a bug check, the call returned normally"),
        Err(bc) => bc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_mode_unwinds_with_the_bug_check() {
        let bc = expect_bug_check(|| {
            bug_check(BugCheck::wdf(WDF_INVALID_HANDLE, 0x1234, "test"));
            unreachable!("bug_check returned in raise mode")
        });
        assert_eq!(bc.code, WDF_VIOLATION);
        assert_eq!(bc.params, [WDF_INVALID_HANDLE, 0x1234, 0, 0]);
    }

    #[test]
    fn record_mode_returns_and_keeps_the_record() {
        let before = set_mode(VerifierMode::Record);
        bug_check(BugCheck::new(BAD_POOL_CALLER, [7, 0, 0, 0], "double free"));
        set_mode(before);
        let recorded = take_recorded();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].code, BAD_POOL_CALLER);
        assert!(take_recorded().is_empty(), "taking empties the record");
    }

    #[test]
    fn other_panics_pass_through() {
        let r = panic::catch_unwind(|| catch_bug_check(|| panic!("plain")));
        assert!(r.is_err(), "a non-bug-check panic is resumed");
    }
}
