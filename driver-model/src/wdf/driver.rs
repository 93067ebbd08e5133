//! The driver: `WdfDriverCreate`, the driver globals every call works against, and unload
//! with the pool-leak check.
//!
//! KMDF passes a hidden `WdfDriverGlobals` pointer to every call. Here the globals are
//! bound to the thread: [`WdfDriverCreate`] binds the new driver to the calling thread, and
//! other threads enter it with [`DriverGlobals::enter`] (or [`DRIVER_OBJECT::enter`]).
//! Objects created with a parent belong to the parent's driver whatever thread creates
//! them. Each driver has its own pool ([`PoolTracker`]), so a test's leaks are its own.

#![allow(non_snake_case, non_camel_case_types)]

use std::cell::RefCell;
use std::fmt;
use std::sync::{Arc, OnceLock};

use super::object::{self, Body, Kind, NewObject, WDFDRIVER, WDFOBJECT, WDF_OBJECT_ATTRIBUTES};
use crate::irql::{KeGetCurrentIrql, PASSIVE_LEVEL};
use crate::pool::{Leak, PoolTag, PoolTracker};
use crate::status::*;
use crate::verifier::{
    bug_check, BugCheck, DRIVER_VERIFIER_DETECTED_VIOLATION, VERIFIER_POOL_LEAK_AT_UNLOAD,
};

/// KMDF's fallback pool tag, `'rDxF'` (poolmon prints "FxDr").
pub const FX_TAG: PoolTag = PoolTag::new(b"FxDr");
/// The `DriverPoolTag` value KMDF ignores (`' kdD'`, poolmon "Ddk ").
pub const DDK_DEFAULT_TAG: PoolTag = PoolTag::new(b"Ddk ");
/// Longest driver name kept (`WDF_DRIVER_GLOBALS_NAME_LEN` - 1).
pub const DRIVER_NAME_MAX: usize = 31;

/// `EvtDriverUnload`.
pub type PFN_WDF_DRIVER_UNLOAD = fn(Driver: WDFDRIVER);

/// `WDF_DRIVER_CONFIG`.
#[derive(Debug, Clone, Copy)]
pub struct WDF_DRIVER_CONFIG {
    /// Size of the structure ([`WDF_DRIVER_CONFIG_SIZE`]).
    pub Size: u32,
    /// Called when the driver unloads.
    pub EvtDriverUnload: Option<PFN_WDF_DRIVER_UNLOAD>,
    /// `WdfDriverInit*` flags (kept, not interpreted).
    pub DriverInitFlags: u32,
    /// The driver's default pool tag (0: derived from the service name).
    pub DriverPoolTag: u32,
}

/// The `Size` [`WDF_DRIVER_CONFIG_INIT`] writes.
pub const WDF_DRIVER_CONFIG_SIZE: u32 = std::mem::size_of::<WDF_DRIVER_CONFIG>() as u32;

/// `WDF_DRIVER_CONFIG_INIT` (there is no `EvtDriverDeviceAdd`: devices are created with
/// [`WdfDeviceCreate`](super::WdfDeviceCreate) directly).
pub fn WDF_DRIVER_CONFIG_INIT(Config: &mut WDF_DRIVER_CONFIG) {
    super::coverage::record(super::coverage::Api::WDF_DRIVER_CONFIG_INIT);
    *Config = WDF_DRIVER_CONFIG {
        Size: WDF_DRIVER_CONFIG_SIZE,
        EvtDriverUnload: None,
        DriverInitFlags: 0,
        DriverPoolTag: 0,
    };
}

impl Default for WDF_DRIVER_CONFIG {
    fn default() -> Self {
        let mut c = WDF_DRIVER_CONFIG {
            Size: 0,
            EvtDriverUnload: None,
            DriverInitFlags: 0,
            DriverPoolTag: 0,
        };
        WDF_DRIVER_CONFIG_INIT(&mut c);
        c
    }
}

/// A driver's framework state: name, default tag, pool.
pub struct DriverGlobals {
    name: String,
    tag: PoolTag,
    pool: Arc<PoolTracker>,
    handle: OnceLock<WDFDRIVER>,
}

impl fmt::Debug for DriverGlobals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverGlobals")
            .field("name", &self.name)
            .field("tag", &self.tag)
            .finish()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<DriverGlobals>>> = const { RefCell::new(None) };
}

impl DriverGlobals {
    /// The driver's name (the service name, at most 31 characters).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The default pool tag (`PoolTag` 0 in a call means this one).
    pub fn tag(&self) -> PoolTag {
        self.tag
    }

    /// The driver's pool.
    pub fn pool(&self) -> &Arc<PoolTracker> {
        &self.pool
    }

    /// The WDFDRIVER handle.
    pub fn handle(&self) -> WDFDRIVER {
        self.handle.get().copied().unwrap_or_default()
    }

    /// Binds the driver to the calling thread until the guard drops (the previous binding
    /// is restored).
    pub fn enter(self: &Arc<Self>) -> DriverScope {
        let previous = CURRENT.with(|c| c.replace(Some(Arc::clone(self))));
        DriverScope { previous }
    }
}

/// Keeps a driver bound to the thread; restores the previous binding on drop.
#[derive(Debug)]
#[must_use = "the driver is unbound when the scope drops"]
pub struct DriverScope {
    previous: Option<Arc<DriverGlobals>>,
}

impl Drop for DriverScope {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// The driver bound to the calling thread. A facade call without one is a harness error
/// (a Windows driver always has its globals), reported as a panic that says what to do.
pub(crate) fn current() -> Arc<DriverGlobals> {
    CURRENT
        .with(|c| c.borrow().clone())
        .expect("no WDF driver is bound to this thread: call WdfDriverCreate first, or enter the driver (DRIVER_OBJECT::enter) on this thread")
}

/// The driver bound to the calling thread, if any.
pub fn current_driver() -> Option<Arc<DriverGlobals>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The driver's default tag from its service name, as the `WdfLookasideListCreate` page
/// states it: the first four characters of the name after a leading "WDF" (any case);
/// "FxDr" when fewer than four remain. (KMDF's source falls back only at two characters or
/// fewer; the documented rule is the contract here.)
pub fn default_tag_for(service: &str) -> PoolTag {
    let name = service.as_bytes();
    let rest = if name.len() >= 3 && name[..3].eq_ignore_ascii_case(b"WDF") {
        &name[3..]
    } else {
        name
    };
    if rest.len() < 4 {
        return FX_TAG;
    }
    PoolTag::new(&[rest[0], rest[1], rest[2], rest[3]])
}

/// The service name: the last component of the registry path (cut to 31 characters);
/// "WDF" when the path has no backslash, as KMDF.
pub fn service_name(registry_path: &str) -> String {
    match registry_path.rsplit_once('\\') {
        Some((_, last)) => last.chars().take(DRIVER_NAME_MAX).collect(),
        None => "WDF".to_string(),
    }
}

/// The I/O manager's driver object (`DRIVER_OBJECT`): what `DriverEntry` receives, and
/// what unloads the driver.
#[derive(Debug, Default)]
pub struct DRIVER_OBJECT {
    globals: Option<Arc<DriverGlobals>>,
    unload: Option<PFN_WDF_DRIVER_UNLOAD>,
}

impl DRIVER_OBJECT {
    /// A driver object before `DriverEntry`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The framework globals, once `WdfDriverCreate` ran.
    pub fn globals(&self) -> Option<&Arc<DriverGlobals>> {
        self.globals.as_ref()
    }

    /// Binds the driver to the calling thread (see [`DriverGlobals::enter`]).
    pub fn enter(&self) -> Option<DriverScope> {
        self.globals.as_ref().map(DriverGlobals::enter)
    }

    /// Unloads the driver as the I/O manager does: `EvtDriverUnload`, then the driver
    /// object and every object under it are deleted, then Driver Verifier's pool check:
    /// pool still allocated is bug check `DRIVER_VERIFIER_DETECTED_VIOLATION` (0xC4) /
    /// 0x62 with the number of blocks in parameter 4. Returns the leak report (empty when
    /// clean; in record mode the leaked blocks are then released).
    pub fn unload(&mut self) -> Vec<Leak> {
        let Some(g) = self.globals.take() else {
            return Vec::new();
        };
        let _scope = g.enter();
        let h = g.handle();
        if let Some(cb) = self.unload.take() {
            cb(h);
        }
        object::delete_tree(h.into());
        let leaks = g.pool.leaks();
        if !leaks.is_empty() {
            let blocks: u64 = leaks.iter().map(|l| l.blocks).sum();
            let report: Vec<String> = leaks.iter().map(ToString::to_string).collect();
            bug_check(BugCheck::new(
                DRIVER_VERIFIER_DETECTED_VIOLATION,
                [VERIFIER_POOL_LEAK_AT_UNLOAD, 0, 0, blocks],
                format!(
                    "driver '{}' unloaded with {blocks} pool allocation(s) outstanding: {}",
                    g.name,
                    report.join("; ")
                ),
            ));
            g.pool.release_all();
        }
        leaks
    }
}

impl Drop for DRIVER_OBJECT {
    /// A driver object dropped without [`DRIVER_OBJECT::unload`] (a test that stops early)
    /// deletes its framework objects, so they do not stay in the handle table; there is no
    /// leak check and no bug check here (a drop may run while a bug check unwinds). Pool
    /// blocks go back when the last object that may use them is gone.
    fn drop(&mut self) {
        let Some(g) = self.globals.take() else {
            return;
        };
        if std::thread::panicking() {
            return;
        }
        let _scope = g.enter();
        object::delete_tree(g.handle().into());
    }
}

/// `WdfDriverCreate`: creates the framework driver object for `DriverObject`, binds it to
/// the calling thread, and returns its handle in `Driver` (optional, as in KMDF).
///
/// PASSIVE_LEVEL only. `DriverConfig.Size` must be [`WDF_DRIVER_CONFIG_SIZE`] and the
/// driver object must not have a framework driver yet (else `STATUS_INVALID_PARAMETER`).
pub fn WdfDriverCreate(
    DriverObject: &mut DRIVER_OBJECT,
    RegistryPath: &str,
    DriverAttributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    DriverConfig: &WDF_DRIVER_CONFIG,
    Driver: Option<&mut WDFDRIVER>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfDriverCreate);
    if KeGetCurrentIrql() > PASSIVE_LEVEL {
        return STATUS_INVALID_DEVICE_REQUEST;
    }
    if DriverConfig.Size != WDF_DRIVER_CONFIG_SIZE || DriverObject.globals.is_some() {
        return STATUS_INVALID_PARAMETER;
    }
    let status = object::validate_attributes(DriverAttributes);
    if !status.is_success() {
        return status;
    }
    if DriverAttributes.is_some_and(|a| !a.ParentObject.is_null()) {
        return STATUS_WDF_PARENT_ASSIGNMENT_NOT_ALLOWED;
    }
    let name = service_name(RegistryPath);
    let configured = PoolTag(DriverConfig.DriverPoolTag);
    let tag = if configured.0 != 0 && configured != DDK_DEFAULT_TAG {
        configured
    } else {
        default_tag_for(&name)
    };
    let globals = Arc::new(DriverGlobals {
        name,
        tag,
        pool: Arc::new(PoolTracker::new()),
        handle: OnceLock::new(),
    });
    let created = object::create(NewObject {
        kind: Kind::Driver,
        driver: Arc::clone(&globals),
        body: Body::None,
        attributes: DriverAttributes,
        default_parent: WDFOBJECT::NULL,
        api: "WdfDriverCreate",
    });
    let h = match created {
        Ok(h) => WDFDRIVER(h),
        Err(s) => return s,
    };
    let _ = globals.handle.set(h);
    CURRENT.with(|c| *c.borrow_mut() = Some(Arc::clone(&globals)));
    DriverObject.globals = Some(globals);
    DriverObject.unload = DriverConfig.EvtDriverUnload;
    if let Some(out) = Driver {
        *out = h;
    }
    STATUS_SUCCESS
}

/// `WdfGetDriver`: the driver bound to the calling thread.
pub fn WdfGetDriver() -> WDFDRIVER {
    super::coverage::record(super::coverage::Api::WdfGetDriver);
    current_driver().map(|g| g.handle()).unwrap_or_default()
}
