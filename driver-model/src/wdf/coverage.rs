//! Which facade functions a process called: the guest run checks that the conformance
//! suite calls every one of them (`guest::wdf_facade_coverage`).
//!
//! Each public function of the facade records itself on entry with one relaxed atomic
//! store (`record`); the test `every_public_function_records_itself` keeps
//! [`FUNCTIONS`] and the sources in step, so a new function cannot escape the check.

use std::sync::atomic::{AtomicBool, Ordering};

macro_rules! facade_functions {
    ($($name:ident),* $(,)?) => {
        /// A public function of the facade.
        #[allow(non_camel_case_types, missing_docs)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) enum Api {
            $($name),*
        }

        /// Every public function of the facade, by its documented name.
        pub const FUNCTIONS: &[&str] = &[$(stringify!($name)),*];
    };
}

facade_functions![
    AllocateDomainCommonBuffer,
    ExAllocatePoolWithTag,
    ExFreePool,
    ExFreePoolWithTag,
    FreeCommonBuffer,
    GetDmaAdapterInfo,
    GetDmaDomain,
    IoGetDmaAdapter,
    JoinDmaDomain,
    LeaveDmaDomain,
    PutDmaAdapter,
    WDF_DRIVER_CONFIG_INIT,
    WDF_OBJECT_ATTRIBUTES_INIT,
    WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE,
    WDF_OBJECT_ATTRIBUTES_SET_CONTEXT_TYPE,
    WdfDeviceCreate,
    WdfDeviceWdmGetPhysicalDevice,
    WdfDriverCreate,
    WdfGetDriver,
    WdfLookasideListCreate,
    WdfMemoryAssignBuffer,
    WdfMemoryCopyFromBuffer,
    WdfMemoryCopyToBuffer,
    WdfMemoryCreate,
    WdfMemoryCreateFromLookaside,
    WdfMemoryCreatePreallocated,
    WdfMemoryGetBuffer,
    WdfObjectDelete,
    WdfObjectDereference,
    WdfObjectGetTypedContextWorker,
    WdfObjectReference,
    WdfRequestCreate,
];

static CALLED: [AtomicBool; FUNCTIONS.len()] = [const { AtomicBool::new(false) }; FUNCTIONS.len()];

/// Records a call of `api`.
#[inline(always)]
pub(crate) fn record(api: Api) {
    CALLED[api as usize].store(true, Ordering::Relaxed);
}

/// The facade functions this process called so far.
pub fn called() -> Vec<&'static str> {
    FUNCTIONS
        .iter()
        .zip(&CALLED)
        .filter(|(_, c)| c.load(Ordering::Relaxed))
        .map(|(f, _)| *f)
        .collect()
}

/// The facade functions this process has not called.
pub fn not_called() -> Vec<&'static str> {
    FUNCTIONS
        .iter()
        .zip(&CALLED)
        .filter(|(_, c)| !c.load(Ordering::Relaxed))
        .map(|(f, _)| *f)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const SOURCES: &[&str] = &[
        include_str!("device.rs"),
        include_str!("dma.rs"),
        include_str!("driver.rs"),
        include_str!("memory.rs"),
        include_str!("object.rs"),
        include_str!("pool.rs"),
    ];

    /// Every `pub fn` / `pub unsafe fn` with a documented (capitalised) name is in
    /// FUNCTIONS and records itself; FUNCTIONS names nothing else.
    #[test]
    fn every_public_function_records_itself() {
        let mut public = BTreeSet::new();
        for src in SOURCES {
            for line in src.lines() {
                let Some(rest) = line
                    .strip_prefix("pub fn ")
                    .or_else(|| line.strip_prefix("pub unsafe fn "))
                else {
                    continue;
                };
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    public.insert(name);
                }
            }
        }
        let listed: BTreeSet<String> = FUNCTIONS.iter().map(|s| s.to_string()).collect();
        assert_eq!(public, listed, "update FUNCTIONS in wdf/coverage.rs");
        let all = SOURCES.concat();
        for f in FUNCTIONS {
            let call = format!("coverage::Api::{f})");
            assert!(all.contains(&call), "{f} does not call {call}");
        }
    }

    #[test]
    fn calls_are_recorded() {
        record(Api::WdfGetDriver);
        assert!(called().contains(&"WdfGetDriver"));
        assert!(!not_called().contains(&"WdfGetDriver"));
    }
}
