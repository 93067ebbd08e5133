//! `ExAllocatePoolWithTag` / `ExFreePoolWithTag` and `POOL_TYPE`, over the calling
//! driver's [`PoolTracker`](crate::pool::PoolTracker), with Driver Verifier's checks.

#![allow(non_snake_case, non_camel_case_types, non_upper_case_globals)]

use std::ffi::c_void;

use super::driver::current;
use crate::irql::{KeGetCurrentIrql, APC_LEVEL, DISPATCH_LEVEL};
use crate::pool::{PoolKind, PoolTag};
use crate::verifier::{bug_check, BugCheck, DRIVER_VERIFIER_DETECTED_VIOLATION};

/// `POOL_TYPE`: a value, so that undefined values can be passed (and refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct POOL_TYPE(pub i32);

/// Non-paged pool.
pub const NonPagedPool: POOL_TYPE = POOL_TYPE(0);
/// Non-paged, executable (same as `NonPagedPool`).
pub const NonPagedPoolExecute: POOL_TYPE = POOL_TYPE(0);
/// Paged pool.
pub const PagedPool: POOL_TYPE = POOL_TYPE(1);
/// Obsolete; refused.
pub const NonPagedPoolMustSucceed: POOL_TYPE = POOL_TYPE(2);
/// Reserved; refused.
pub const DontUseThisType: POOL_TYPE = POOL_TYPE(3);
/// Non-paged, cache aligned.
pub const NonPagedPoolCacheAligned: POOL_TYPE = POOL_TYPE(4);
/// Paged, cache aligned.
pub const PagedPoolCacheAligned: POOL_TYPE = POOL_TYPE(5);
/// Non-paged, no-execute.
pub const NonPagedPoolNx: POOL_TYPE = POOL_TYPE(512);
/// Non-paged, no-execute, cache aligned.
pub const NonPagedPoolNxCacheAligned: POOL_TYPE = POOL_TYPE(516);

impl POOL_TYPE {
    /// Paged or non-paged; `None` for a type this model does not accept.
    pub fn kind(self) -> Option<PoolKind> {
        match self.0 {
            0 | 4 | 512 | 516 => Some(PoolKind::NonPaged),
            1 | 5 => Some(PoolKind::Paged),
            _ => None,
        }
    }
}

/// Driver Verifier `0xC4` parameter 1: paged pool allocated above APC_LEVEL.
pub const VERIFIER_PAGED_ALLOC_IRQL: u64 = 0x01;
/// Driver Verifier `0xC4` parameter 1: non-paged pool allocated above DISPATCH_LEVEL.
pub const VERIFIER_NONPAGED_ALLOC_IRQL: u64 = 0x02;
/// Driver Verifier `0xC4` parameter 1: a zero-byte allocation.
pub const VERIFIER_ZERO_ALLOCATION: u64 = 0x00;
/// Driver Verifier `0xC4` parameter 1: paged pool freed above APC_LEVEL.
pub const VERIFIER_PAGED_FREE_IRQL: u64 = 0x11;
/// Driver Verifier `0xC4` parameter 1: non-paged pool freed above DISPATCH_LEVEL.
pub const VERIFIER_NONPAGED_FREE_IRQL: u64 = 0x12;

fn max_irql(kind: PoolKind) -> u8 {
    match kind {
        PoolKind::Paged => APC_LEVEL,
        PoolKind::NonPaged => DISPATCH_LEVEL,
    }
}

/// `ExAllocatePoolWithTag`: `NumberOfBytes` from `PoolType` tagged `Tag`, or NULL.
///
/// Driver Verifier checks (bug check 0xC4): paged pool above APC_LEVEL (0x01), non-paged
/// above DISPATCH_LEVEL (0x02), zero bytes (0x00). An undefined pool type returns NULL.
/// The memory is not zeroed.
pub fn ExAllocatePoolWithTag(PoolType: POOL_TYPE, NumberOfBytes: usize, Tag: u32) -> *mut c_void {
    super::coverage::record(super::coverage::Api::ExAllocatePoolWithTag);
    let Some(kind) = PoolType.kind() else {
        tracing::error!(
            "ExAllocatePoolWithTag: pool type {} is not supported",
            PoolType.0
        );
        return std::ptr::null_mut();
    };
    let irql = KeGetCurrentIrql();
    if irql > max_irql(kind) {
        let sub = match kind {
            PoolKind::Paged => VERIFIER_PAGED_ALLOC_IRQL,
            PoolKind::NonPaged => VERIFIER_NONPAGED_ALLOC_IRQL,
        };
        bug_check(BugCheck::new(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                sub,
                u64::from(irql),
                PoolType.0 as u64,
                NumberOfBytes as u64,
            ],
            format!("ExAllocatePoolWithTag({kind}) at IRQL {irql}"),
        ));
        return std::ptr::null_mut();
    }
    if NumberOfBytes == 0 {
        bug_check(BugCheck::new(
            DRIVER_VERIFIER_DETECTED_VIOLATION,
            [
                VERIFIER_ZERO_ALLOCATION,
                u64::from(irql),
                PoolType.0 as u64,
                0,
            ],
            "ExAllocatePoolWithTag of zero bytes",
        ));
        return std::ptr::null_mut();
    }
    current()
        .pool()
        .allocate(kind, NumberOfBytes, PoolTag(Tag))
        .map_or(std::ptr::null_mut(), |b| b.ptr.as_ptr().cast())
}

/// `ExFreePoolWithTag`: frees `P`, which must be a live block tagged `Tag`
/// (`BAD_POOL_CALLER` otherwise: 0x07 double free, 0x0A wrong tag, 0x46 not a pool
/// address). Driver Verifier's IRQL checks: 0xC4 / 0x11 (paged above APC_LEVEL), 0x12
/// (non-paged above DISPATCH_LEVEL).
pub fn ExFreePoolWithTag(P: *mut c_void, Tag: u32) {
    super::coverage::record(super::coverage::Api::ExFreePoolWithTag);
    free(P, Some(PoolTag(Tag)));
}

/// `ExFreePool`: as [`ExFreePoolWithTag`] without the tag check.
pub fn ExFreePool(P: *mut c_void) {
    super::coverage::record(super::coverage::Api::ExFreePool);
    free(P, None);
}

fn free(p: *mut c_void, tag: Option<PoolTag>) {
    let g = current();
    if let Some(block) = g.pool().block(p.cast()) {
        let irql = KeGetCurrentIrql();
        if irql > max_irql(block.kind) {
            let sub = match block.kind {
                PoolKind::Paged => VERIFIER_PAGED_FREE_IRQL,
                PoolKind::NonPaged => VERIFIER_NONPAGED_FREE_IRQL,
            };
            bug_check(BugCheck::new(
                DRIVER_VERIFIER_DETECTED_VIOLATION,
                [sub, u64::from(irql), 0, p as u64],
                format!("ExFreePool({}) at IRQL {irql}", block.kind),
            ));
            return;
        }
    }
    g.pool().free(p.cast(), tag);
}
