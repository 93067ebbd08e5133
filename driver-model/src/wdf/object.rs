//! The framework object model: handles, the object table, attributes, contexts,
//! parent/child deletion and references.
//!
//! Handles are 64-bit values: a table index (plus one, so 0 is NULL) in the low half and a
//! generation in the high half. A handle names its object until the object is destroyed;
//! then the slot's generation moves on, and every later use of the handle (a use after
//! delete, a second delete) resolves to nothing and is bug check `WDF_VIOLATION` /
//! `WDF_INVALID_HANDLE` with the handle and the required type, as KMDF's handle checks
//! give. A handle of the wrong type is the same bug check.
//!
//! Life cycle, as KMDF's object state machine runs it (`fxobjectstatemachine.cpp`):
//! - an object is created with one reference and a parent (the attributes' `ParentObject`,
//!   else the default the creating call names, usually the driver);
//! - `WdfObjectDelete` disposes the subtree children first (post-order), calling each
//!   object's `EvtCleanupCallback`; then releases the creation references, children in
//!   the order they were attached, then the object itself; an object whose reference count
//!   reaches zero is destroyed: `EvtDestroyCallback`, its resources released, its handle
//!   retired. `WdfObjectReference` keeps a deleted object (and its handle) alive until the
//!   matching `WdfObjectDereference`;
//! - deleting an object that is already deleted but still referenced does nothing (KMDF
//!   drops the event); deleting the driver object or a device object with
//!   `WdfObjectDelete` is refused (logged `STATUS_CANNOT_DELETE`, no bug check, nothing
//!   deleted, as KMDF); both go at unload.
//!
//! Callbacks run with no lock held, so they may call the framework.

#![allow(non_snake_case, non_camel_case_types)]

use std::any::{Any, TypeId};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use super::driver::DriverGlobals;
use super::memory::MemoryBody;
use super::LookasideBody;
use crate::status::*;
use crate::verifier::{bug_check, fx_type, BugCheck, WDF_INVALID_HANDLE, WDF_OBJECT_ERROR};

/// A handle to any framework object.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WDFOBJECT(pub(crate) u64);

impl WDFOBJECT {
    /// The NULL handle.
    pub const NULL: WDFOBJECT = WDFOBJECT(0);

    /// The handle's value.
    pub fn raw(self) -> u64 {
        self.0
    }

    /// Whether this is the NULL handle.
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Debug for WDFOBJECT {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WDFOBJECT({:#x})", self.0)
    }
}

macro_rules! typed_handle {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[repr(transparent)]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub WDFOBJECT);

        impl $name {
            /// The NULL handle.
            pub const NULL: $name = $name(WDFOBJECT::NULL);

            /// The handle's value.
            pub fn raw(self) -> u64 {
                self.0 .0
            }

            /// Whether this is the NULL handle.
            pub fn is_null(self) -> bool {
                self.0.is_null()
            }
        }

        impl From<$name> for WDFOBJECT {
            fn from(h: $name) -> WDFOBJECT {
                h.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0 .0)
            }
        }
    };
}

typed_handle!(
    /// A framework driver object.
    WDFDRIVER
);
typed_handle!(
    /// A framework device object.
    WDFDEVICE
);
typed_handle!(
    /// A framework memory object.
    WDFMEMORY
);
typed_handle!(
    /// A framework lookaside-list object.
    WDFLOOKASIDE
);
typed_handle!(
    /// A framework request object.
    WDFREQUEST
);

/// `EvtCleanupCallback`: called when the object is deleted (children first).
pub type PFN_WDF_OBJECT_CONTEXT_CLEANUP = fn(Object: WDFOBJECT);
/// `EvtDestroyCallback`: called when the deleted object's reference count reaches zero.
pub type PFN_WDF_OBJECT_CONTEXT_DESTROY = fn(Object: WDFOBJECT);

/// `WDF_EXECUTION_LEVEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WDF_EXECUTION_LEVEL {
    /// Not set (invalid).
    WdfExecutionLevelInvalid = 0,
    /// Inherit from the parent (the default).
    WdfExecutionLevelInheritFromParent = 1,
    /// Callbacks at PASSIVE_LEVEL.
    WdfExecutionLevelPassive = 2,
    /// Callbacks at up to DISPATCH_LEVEL.
    WdfExecutionLevelDispatch = 3,
}

/// `WDF_SYNCHRONIZATION_SCOPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WDF_SYNCHRONIZATION_SCOPE {
    /// Not set (invalid).
    WdfSynchronizationScopeInvalid = 0,
    /// Inherit from the parent (the default).
    WdfSynchronizationScopeInheritFromParent = 1,
    /// Device-level synchronization.
    WdfSynchronizationScopeDevice = 2,
    /// Queue-level synchronization.
    WdfSynchronizationScopeQueue = 3,
    /// No synchronization.
    WdfSynchronizationScopeNone = 4,
}

/// Describes a context type (what `WDF_DECLARE_CONTEXT_TYPE_WITH_NAME` declares).
pub struct WDF_OBJECT_CONTEXT_TYPE_INFO {
    /// Size of this structure.
    pub Size: u32,
    /// The context type's name.
    pub ContextName: &'static str,
    /// `size_of` the context type.
    pub ContextSize: usize,
    /// Makes a zero-initialised (default) context.
    pub(crate) make: fn() -> Box<dyn Any + Send + Sync>,
    /// The context type.
    pub(crate) type_id: fn() -> TypeId,
}

impl fmt::Debug for WDF_OBJECT_CONTEXT_TYPE_INFO {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WDF_OBJECT_CONTEXT_TYPE_INFO")
            .field("ContextName", &self.ContextName)
            .field("ContextSize", &self.ContextSize)
            .finish()
    }
}

/// Size of [`WDF_OBJECT_CONTEXT_TYPE_INFO`] (its `Size` field).
pub const WDF_OBJECT_CONTEXT_TYPE_INFO_SIZE: u32 =
    std::mem::size_of::<WDF_OBJECT_CONTEXT_TYPE_INFO>() as u32;

/// A type usable as an object context. Implemented by
/// [`WDF_DECLARE_CONTEXT_TYPE_WITH_NAME`](crate::WDF_DECLARE_CONTEXT_TYPE_WITH_NAME);
/// `Default` plays the part of KMDF's zero-initialisation.
pub trait WdfContextType: Any + Default + Send + Sync {
    /// The type's description.
    const INFO: &'static WDF_OBJECT_CONTEXT_TYPE_INFO;
}

/// Makes a default `T` as a context (the `make` of a type info).
pub fn make_context<T: Any + Default + Send + Sync>() -> Box<dyn Any + Send + Sync> {
    Box::new(T::default())
}

/// Builds the [`WDF_OBJECT_CONTEXT_TYPE_INFO`] of `T` (used by the declaring macro).
pub const fn context_type_info<T: Any + Default + Send + Sync>(
    name: &'static str,
) -> WDF_OBJECT_CONTEXT_TYPE_INFO {
    WDF_OBJECT_CONTEXT_TYPE_INFO {
        Size: WDF_OBJECT_CONTEXT_TYPE_INFO_SIZE,
        ContextName: name,
        ContextSize: std::mem::size_of::<T>(),
        make: make_context::<T>,
        type_id: TypeId::of::<T>,
    }
}

/// Declares `$ty` as a context type and `$getter(handle) -> *mut $ty`, as
/// `WDF_DECLARE_CONTEXT_TYPE_WITH_NAME` does. The getter returns NULL when the object has
/// no context of that type; the pointer is valid until the object is destroyed.
#[macro_export]
macro_rules! WDF_DECLARE_CONTEXT_TYPE_WITH_NAME {
    ($ty:ty, $getter:ident) => {
        impl $crate::wdf::WdfContextType for $ty {
            const INFO: &'static $crate::wdf::WDF_OBJECT_CONTEXT_TYPE_INFO =
                &$crate::wdf::context_type_info::<$ty>(stringify!($ty));
        }

        /// The object's context of this type (NULL when it has none).
        #[allow(non_snake_case, dead_code)]
        pub fn $getter(Handle: impl Into<$crate::wdf::WDFOBJECT>) -> *mut $ty {
            $crate::wdf::WdfObjectGetTypedContextWorker(
                Handle.into(),
                <$ty as $crate::wdf::WdfContextType>::INFO,
            )
            .cast::<$ty>()
        }
    };
}

/// Object attributes (`WDF_OBJECT_ATTRIBUTES`). Start from [`WDF_OBJECT_ATTRIBUTES_INIT`]
/// or [`WDF_OBJECT_ATTRIBUTES::init`].
#[derive(Debug, Clone, Copy)]
pub struct WDF_OBJECT_ATTRIBUTES {
    /// Size of the structure ([`WDF_OBJECT_ATTRIBUTES_SIZE`]).
    pub Size: u32,
    /// Called when the object is deleted.
    pub EvtCleanupCallback: Option<PFN_WDF_OBJECT_CONTEXT_CLEANUP>,
    /// Called when the object is destroyed.
    pub EvtDestroyCallback: Option<PFN_WDF_OBJECT_CONTEXT_DESTROY>,
    /// Execution level of the object's callbacks.
    pub ExecutionLevel: WDF_EXECUTION_LEVEL,
    /// Synchronization scope of the object's callbacks.
    pub SynchronizationScope: WDF_SYNCHRONIZATION_SCOPE,
    /// The parent (NULL: the creating call's default).
    pub ParentObject: WDFOBJECT,
    /// Context size to allocate instead of the type's (must be >= the type's). The model
    /// allocates the typed context; the override is validated, not used.
    pub ContextSizeOverride: usize,
    /// The context type.
    pub ContextTypeInfo: Option<&'static WDF_OBJECT_CONTEXT_TYPE_INFO>,
}

/// The `Size` [`WDF_OBJECT_ATTRIBUTES_INIT`] writes.
pub const WDF_OBJECT_ATTRIBUTES_SIZE: u32 = std::mem::size_of::<WDF_OBJECT_ATTRIBUTES>() as u32;

/// "No attributes" for the optional attribute parameters.
pub const WDF_NO_OBJECT_ATTRIBUTES: Option<&WDF_OBJECT_ATTRIBUTES> = None;

impl WDF_OBJECT_ATTRIBUTES {
    /// Initialised attributes: size set, inherit execution level and scope, nothing else.
    pub const fn init() -> Self {
        WDF_OBJECT_ATTRIBUTES {
            Size: WDF_OBJECT_ATTRIBUTES_SIZE,
            EvtCleanupCallback: None,
            EvtDestroyCallback: None,
            ExecutionLevel: WDF_EXECUTION_LEVEL::WdfExecutionLevelInheritFromParent,
            SynchronizationScope:
                WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeInheritFromParent,
            ParentObject: WDFOBJECT::NULL,
            ContextSizeOverride: 0,
            ContextTypeInfo: None,
        }
    }

    /// Initialised attributes with context type `T`.
    pub fn init_context_type<T: WdfContextType>() -> Self {
        WDF_OBJECT_ATTRIBUTES {
            ContextTypeInfo: Some(T::INFO),
            ..Self::init()
        }
    }
}

impl Default for WDF_OBJECT_ATTRIBUTES {
    fn default() -> Self {
        Self::init()
    }
}

/// `WDF_OBJECT_ATTRIBUTES_INIT`.
pub fn WDF_OBJECT_ATTRIBUTES_INIT(Attributes: &mut WDF_OBJECT_ATTRIBUTES) {
    super::coverage::record(super::coverage::Api::WDF_OBJECT_ATTRIBUTES_INIT);
    *Attributes = WDF_OBJECT_ATTRIBUTES::init();
}

/// `WDF_OBJECT_ATTRIBUTES_SET_CONTEXT_TYPE`.
pub fn WDF_OBJECT_ATTRIBUTES_SET_CONTEXT_TYPE<T: WdfContextType>(
    Attributes: &mut WDF_OBJECT_ATTRIBUTES,
) {
    super::coverage::record(super::coverage::Api::WDF_OBJECT_ATTRIBUTES_SET_CONTEXT_TYPE);
    Attributes.ContextTypeInfo = Some(T::INFO);
}

/// `WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE`.
pub fn WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE<T: WdfContextType>(
    Attributes: &mut WDF_OBJECT_ATTRIBUTES,
) {
    super::coverage::record(super::coverage::Api::WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE);
    *Attributes = WDF_OBJECT_ATTRIBUTES::init_context_type::<T>();
}

/// `FxValidateObjectAttributes` (no flags): the checks KMDF makes, in its order.
pub(crate) fn validate_attributes(a: Option<&WDF_OBJECT_ATTRIBUTES>) -> NTSTATUS {
    let Some(a) = a else {
        return STATUS_SUCCESS;
    };
    if a.Size != WDF_OBJECT_ATTRIBUTES_SIZE {
        return STATUS_INFO_LENGTH_MISMATCH;
    }
    if let Some(info) = a.ContextTypeInfo {
        if info.Size != WDF_OBJECT_CONTEXT_TYPE_INFO_SIZE {
            return STATUS_INFO_LENGTH_MISMATCH;
        }
        if info.ContextSize > 0 && info.ContextName.is_empty() {
            return STATUS_WDF_OBJECT_ATTRIBUTES_INVALID;
        }
    }
    if a.ContextSizeOverride > 0
        && a.ContextTypeInfo
            .is_none_or(|i| a.ContextSizeOverride < i.ContextSize)
    {
        return STATUS_WDF_OBJECT_ATTRIBUTES_INVALID;
    }
    if a.ExecutionLevel == WDF_EXECUTION_LEVEL::WdfExecutionLevelInvalid
        || a.SynchronizationScope == WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeInvalid
    {
        return STATUS_WDF_OBJECT_ATTRIBUTES_INVALID;
    }
    if !matches!(
        a.SynchronizationScope,
        WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeInheritFromParent
            | WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeNone
    ) {
        return STATUS_WDF_SYNCHRONIZATION_SCOPE_INVALID;
    }
    if a.ExecutionLevel != WDF_EXECUTION_LEVEL::WdfExecutionLevelInheritFromParent {
        return STATUS_WDF_EXECUTION_LEVEL_INVALID;
    }
    STATUS_SUCCESS
}

/// What an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Driver,
    Device,
    Request,
    Lookaside,
    /// Memory from `WdfMemoryCreate`.
    MemoryPool,
    /// Memory from `WdfMemoryCreatePreallocated`.
    MemoryPreallocated,
    /// Memory from `WdfMemoryCreateFromLookaside`.
    MemoryLookaside,
}

impl Kind {
    /// Whether an object of this kind answers a query for `fx` (KMDF's QueryInterface).
    fn is(self, fx: u64) -> bool {
        match fx {
            fx_type::FX_TYPE_OBJECT => true,
            fx_type::FX_TYPE_DRIVER => self == Kind::Driver,
            fx_type::FX_TYPE_DEVICE => self == Kind::Device,
            fx_type::FX_TYPE_REQUEST => self == Kind::Request,
            fx_type::FX_TYPE_LOOKASIDE => self == Kind::Lookaside,
            fx_type::IFX_TYPE_MEMORY => matches!(
                self,
                Kind::MemoryPool | Kind::MemoryPreallocated | Kind::MemoryLookaside
            ),
            fx_type::FX_TYPE_MEMORY_PREALLOCATED => self == Kind::MemoryPreallocated,
            _ => false,
        }
    }
}

/// What an object holds, by kind.
pub(crate) enum Body {
    None,
    Lookaside(LookasideBody),
    Memory(MemoryBody),
    Device(super::device::DeviceBody),
}

struct State {
    parent: Option<Arc<Object>>,
    /// Children by attach sequence number (attach order, O(log n) removal).
    children: std::collections::BTreeMap<u64, Arc<Object>>,
    refs: u32,
    deleted: bool,
    destroyed: bool,
}

/// A framework object.
pub(crate) struct Object {
    pub handle: WDFOBJECT,
    /// Creation sequence number (orders a parent's children).
    seq: u64,
    pub kind: Kind,
    pub driver: Arc<DriverGlobals>,
    pub body: Body,
    context: Option<(TypeId, Box<dyn Any + Send + Sync>)>,
    cleanup: Option<PFN_WDF_OBJECT_CONTEXT_CLEANUP>,
    destroy: Option<PFN_WDF_OBJECT_CONTEXT_DESTROY>,
    state: Mutex<State>,
}

impl Object {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The parent's handle.
    pub fn parent(&self) -> Option<WDFOBJECT> {
        self.lock().parent.as_ref().map(|p| p.handle)
    }
}

struct Entry {
    generation: u32,
    object: Option<Arc<Object>>,
}

#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    free: Vec<u32>,
}

static TABLE: LazyLock<Mutex<Table>> = LazyLock::new(|| Mutex::new(Table::default()));

fn table() -> MutexGuard<'static, Table> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

fn handle_of(index: u32, generation: u32) -> WDFOBJECT {
    WDFOBJECT(u64::from(generation) << 32 | (u64::from(index) + 1))
}

/// The live object `h` names, if any.
pub(crate) fn lookup(h: WDFOBJECT) -> Option<Arc<Object>> {
    let index = (h.0 & 0xffff_ffff).checked_sub(1)?;
    let generation = (h.0 >> 32) as u32;
    let t = table();
    let e = t.entries.get(usize::try_from(index).ok()?)?;
    if e.generation != generation {
        return None;
    }
    e.object.clone()
}

/// Resolves `h` as an object answering `fx`; a NULL, stale or wrong-type handle is bug
/// check `WDF_VIOLATION` / `WDF_INVALID_HANDLE` (P2 the handle, P3 `fx`). `None` after
/// the bug check in record mode.
pub(crate) fn resolve(h: WDFOBJECT, fx: u64, api: &str) -> Option<Arc<Object>> {
    match lookup(h) {
        Some(o) if o.kind.is(fx) => Some(o),
        found => {
            let why = match found {
                Some(o) => format!("is a {:?}", o.kind),
                None if h.is_null() => "is NULL".to_string(),
                None => "names no live object (deleted or never created)".to_string(),
            };
            bug_check(BugCheck::new(
                crate::verifier::WDF_VIOLATION,
                [WDF_INVALID_HANDLE, h.0, fx, 0],
                format!("{api}: handle {:#x} {why}, type {fx:#x} required", h.0),
            ));
            None
        }
    }
}

/// Everything needed to create an object.
pub(crate) struct NewObject<'a> {
    pub kind: Kind,
    pub driver: Arc<DriverGlobals>,
    pub body: Body,
    pub attributes: Option<&'a WDF_OBJECT_ATTRIBUTES>,
    /// Parent when the attributes name none.
    pub default_parent: Option<Arc<Object>>,
    /// The API creating it (for messages).
    pub api: &'static str,
}

/// Creates an object and attaches it to its parent. The attributes must have been
/// validated. Fails with `STATUS_DELETE_PENDING` when the parent is being deleted; an
/// invalid parent handle is a bug check.
pub(crate) fn create(new: NewObject<'_>) -> Result<Arc<Object>, NTSTATUS> {
    let attrs = new.attributes.copied();
    let parent = match attrs.map(|a| a.ParentObject).filter(|p| !p.is_null()) {
        Some(p) => Some(resolve(p, fx_type::FX_TYPE_OBJECT, new.api).ok_or(STATUS_INVALID_HANDLE)?),
        None => new.default_parent,
    };
    let context = attrs
        .and_then(|a| a.ContextTypeInfo)
        .map(|info| ((info.type_id)(), (info.make)()));
    let object = {
        let mut t = table();
        let index = match t.free.pop() {
            Some(i) => i,
            None => {
                let i =
                    u32::try_from(t.entries.len()).map_err(|_| STATUS_INSUFFICIENT_RESOURCES)?;
                t.entries.push(Entry {
                    generation: 1,
                    object: None,
                });
                i
            }
        };
        let e = &mut t.entries[index as usize];
        let object = Arc::new(Object {
            handle: handle_of(index, e.generation),
            seq: {
                static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            kind: new.kind,
            driver: new.driver,
            body: new.body,
            context,
            cleanup: attrs.and_then(|a| a.EvtCleanupCallback),
            destroy: attrs.and_then(|a| a.EvtDestroyCallback),
            state: Mutex::new(State {
                parent: None,
                children: std::collections::BTreeMap::new(),
                refs: 1,
                deleted: false,
                destroyed: false,
            }),
        });
        e.object = Some(Arc::clone(&object));
        object
    };
    if let Some(parent) = parent {
        let mut ps = parent.lock();
        if ps.deleted {
            drop(ps);
            retire(&object);
            return Err(STATUS_DELETE_PENDING);
        }
        ps.children.insert(object.seq, Arc::clone(&object));
        drop(ps);
        object.lock().parent = Some(parent);
    }
    Ok(object)
}

/// Frees the object's table slot (its handle goes stale).
fn retire(o: &Object) {
    let index = ((o.handle.0 & 0xffff_ffff) - 1) as usize;
    let mut t = table();
    let e = &mut t.entries[index];
    if e.object.as_ref().is_some_and(|x| x.handle == o.handle) {
        e.object = None;
        e.generation = e.generation.wrapping_add(1).max(1);
        t.free.push(index as u32);
    }
}

/// `WdfObjectDelete` on a resolved object. The driver and device objects are marked
/// "no delete DDI" in KMDF (the model has no control devices, the one kind of WDFDEVICE a
/// driver may delete): the call logs `STATUS_CANNOT_DELETE` and does nothing, so the
/// object and its children stay; the framework deletes them at unload.
pub(crate) fn delete(o: &Arc<Object>) {
    let what = match o.kind {
        Kind::Driver => "the driver object",
        Kind::Device => "a device object (WDFDEVICE)",
        _ => return delete_tree(o),
    };
    tracing::warn!(
        target: "verifier",
        "WdfObjectDelete({:?}): {what} cannot be deleted by the driver \
         (STATUS_CANNOT_DELETE); the call does nothing",
        o.handle
    );
}

/// Deletes `o` and its subtree: cleanup post-order, then creation references released.
pub(crate) fn delete_tree(o: &Arc<Object>) {
    if o.lock().deleted {
        tracing::debug!("delete of {:?}: already deleted, ignored", o.handle);
        return;
    }
    dispose(o);
    // Detach from the parent: the parent no longer lists it.
    let parent = o.lock().parent.take();
    if let Some(p) = parent {
        p.lock().children.remove(&o.seq);
    }
    release_tree(o);
}

/// Marks the subtree deleted and calls cleanup callbacks, children first.
fn dispose(o: &Arc<Object>) {
    let children = {
        let mut s = o.lock();
        if s.deleted {
            return;
        }
        s.deleted = true;
        s.children.values().cloned().collect::<Vec<_>>()
    };
    for c in &children {
        dispose(c);
    }
    if let Some(cb) = o.cleanup {
        cb(o.handle);
    }
}

/// Releases the creation references of the subtree: children in attach order, then `o`.
fn release_tree(o: &Arc<Object>) {
    let children = std::mem::take(&mut o.lock().children);
    for c in children.values() {
        c.lock().parent = None;
        release_tree(c);
    }
    release(o);
}

/// Drops one reference; destroys the object at zero.
pub(crate) fn release(o: &Arc<Object>) {
    let destroy = {
        let mut s = o.lock();
        if s.refs == 0 {
            return;
        }
        s.refs -= 1;
        if s.refs > 0 {
            return;
        }
        if !s.deleted {
            // The driver dropped the creation reference of an object that was never
            // deleted: KMDF's ~FxObject check for an object with a parent or children.
            let h = o.handle;
            s.refs = 1;
            drop(s);
            bug_check(BugCheck::new(
                crate::verifier::WDF_VIOLATION,
                [WDF_OBJECT_ERROR, h.0, 0, 0],
                format!("{h:?}: reference count fell to zero before the object was deleted"),
            ));
            return;
        }
        s.destroyed = true;
        true
    };
    if destroy {
        if let Some(cb) = o.destroy {
            cb(o.handle);
        }
        finalize(o);
        retire(o);
    }
}

/// Releases what the object holds (returns lookaside buffers, frees pool buffers).
fn finalize(o: &Arc<Object>) {
    match &o.body {
        Body::Memory(m) => m.release(),
        Body::Lookaside(_) | Body::Device(_) | Body::None => {}
    }
}

/// Adds a reference (`WdfObjectReference`).
pub(crate) fn reference(o: &Arc<Object>) {
    o.lock().refs += 1;
}

/// `WdfObjectGetTypedContextWorker`: the object's context if it is of `TypeInfo`'s type,
/// else NULL. An invalid handle is a bug check.
pub fn WdfObjectGetTypedContextWorker(
    Handle: WDFOBJECT,
    TypeInfo: &WDF_OBJECT_CONTEXT_TYPE_INFO,
) -> *mut std::ffi::c_void {
    super::coverage::record(super::coverage::Api::WdfObjectGetTypedContextWorker);
    let Some(o) = resolve(Handle, fx_type::FX_TYPE_OBJECT, "WdfObjectGetTypedContext") else {
        return std::ptr::null_mut();
    };
    match &o.context {
        Some((id, ctx)) if *id == (TypeInfo.type_id)() => {
            // The context is boxed (stable address) and lives as long as the object; the
            // caller gets a raw pointer, as KMDF's accessor returns one.
            let p: *const (dyn Any + Send + Sync) = &**ctx;
            p as *mut std::ffi::c_void
        }
        _ => std::ptr::null_mut(),
    }
}

/// `WdfObjectDelete`.
pub fn WdfObjectDelete(Object: impl Into<WDFOBJECT>) {
    super::coverage::record(super::coverage::Api::WdfObjectDelete);
    let h = Object.into();
    if let Some(o) = resolve(h, fx_type::FX_TYPE_OBJECT, "WdfObjectDelete") {
        delete(&o);
    }
}

/// `WdfObjectReference`.
pub fn WdfObjectReference(Handle: impl Into<WDFOBJECT>) {
    super::coverage::record(super::coverage::Api::WdfObjectReference);
    if let Some(o) = resolve(Handle.into(), fx_type::FX_TYPE_OBJECT, "WdfObjectReference") {
        reference(&o);
    }
}

/// `WdfObjectDereference`.
pub fn WdfObjectDereference(Handle: impl Into<WDFOBJECT>) {
    super::coverage::record(super::coverage::Api::WdfObjectDereference);
    if let Some(o) = resolve(
        Handle.into(),
        fx_type::FX_TYPE_OBJECT,
        "WdfObjectDereference",
    ) {
        release(&o);
    }
}

/// The parent of an object (`WdfObjectGetParent` is not a KMDF DDI; this is the model's
/// inspection helper). NULL for none; an invalid handle is a bug check.
pub fn object_parent(Handle: impl Into<WDFOBJECT>) -> WDFOBJECT {
    resolve(Handle.into(), fx_type::FX_TYPE_OBJECT, "object_parent")
        .and_then(|o| o.parent())
        .unwrap_or_default()
}

/// Whether `Handle` names a live (not yet destroyed) object: the model's inspection helper,
/// never a bug check.
pub fn object_is_live(Handle: impl Into<WDFOBJECT>) -> bool {
    lookup(Handle.into()).is_some()
}
