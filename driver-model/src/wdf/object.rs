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
use std::cell::UnsafeCell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    /// Boxed: lists are few, and the box keeps every slot of the table small.
    Lookaside(Box<LookasideBody>),
    Memory(MemoryBody),
    /// Shared: the DMA calls use it with the table unlocked.
    Device(Arc<super::device::DeviceBody>),
}

/// An object's context: its type and the zero-initialised (default) value.
type Context = (TypeId, Box<dyn Any + Send + Sync>);

/// "No slot" in the child links.
const NIL: u32 = u32::MAX;

/// A framework object, stored in its slot of the [`Table`]. What it is and holds is fixed
/// at creation (except a preallocated memory object's buffer); its references, deletion
/// state and place in the tree change with the table locked.
pub(crate) struct Object {
    pub handle: WDFOBJECT,
    pub kind: Kind,
    /// The driver it belongs to; `None` for a lookaside memory object, which belongs to
    /// its list's driver and holds a reference on the list (see [`Table::driver`]): no
    /// reference count to move per memory object.
    driver: Option<Arc<DriverGlobals>>,
    pub body: Body,
    context: Option<Context>,
    cleanup: Option<PFN_WDF_OBJECT_CONTEXT_CLEANUP>,
    destroy: Option<PFN_WDF_OBJECT_CONTEXT_DESTROY>,
    refs: u32,
    deleted: bool,
    destroyed: bool,
    /// The parent's handle (NULL: none). It stays set after the parent takes its child
    /// list back in `release_tree`, until the child's own turn, as in KMDF.
    parent: WDFOBJECT,
    /// Whether the object is on its parent's child list (then `links.prev` and
    /// `links.next` link it to its siblings, in attach order).
    listed: bool,
    links: Links,
}

/// An object's place in the intrusive child lists: slot indices, [`NIL`] for none. Kept
/// together (and set as one value) so that creating an object writes it in one store.
#[derive(Clone, Copy)]
struct Links {
    /// The previous sibling.
    prev: u32,
    /// The next sibling.
    next: u32,
    /// The first child.
    first_child: u32,
    /// The last child.
    last_child: u32,
}

impl Links {
    const NONE: Links = Links {
        prev: NIL,
        next: NIL,
        first_child: NIL,
        last_child: NIL,
    };
}

impl Object {
    /// An object to [`Table::insert`]: one reference, no parent yet. `driver` is `None`
    /// exactly for a lookaside memory object.
    #[inline(always)]
    pub fn new(
        kind: Kind,
        driver: Option<Arc<DriverGlobals>>,
        body: Body,
        context: Option<Context>,
        attributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    ) -> Self {
        debug_assert_eq!(driver.is_none(), kind == Kind::MemoryLookaside);
        Object {
            handle: WDFOBJECT::NULL,
            kind,
            driver,
            body,
            context,
            cleanup: attributes.and_then(|a| a.EvtCleanupCallback),
            destroy: attributes.and_then(|a| a.EvtDestroyCallback),
            refs: 1,
            deleted: false,
            destroyed: false,
            parent: WDFOBJECT::NULL,
            listed: false,
            links: Links::NONE,
        }
    }

    /// The parent's handle (NULL for none).
    pub fn parent(&self) -> WDFOBJECT {
        self.parent
    }
}

/// A slot of the handle table.
struct Slot {
    /// The generation a handle to this slot must carry. It moves on when the object is
    /// retired, so every older handle is stale from then on, also after the slot is
    /// reused.
    generation: u32,
    /// The object, while it lives, and after it is retired until it leaves the tree (a
    /// "zombie", reachable only through the tree's links and its old handle by the
    /// deletion in progress, never through a lookup).
    object: Option<Object>,
}

/// The handle table: every framework object of the process, in slots addressed by handle.
///
/// Design, for speed without giving up a check:
/// - one lock for the whole object model, taken once per call on the common paths
///   (`WdfMemoryCreateFromLookaside` and `WdfObjectDelete` of a leaf memory object each
///   lock it exactly once): a handle is resolved, its generation and type checked, the
///   parent found and the tree changed in one critical section, with no per-object locks
///   and no reference-counted pointers to clone;
/// - objects live inline in their slots (no allocation per object; freed slots are
///   reused, last freed first) and children are an intrusive doubly linked list through
///   the slots (O(1) attach and detach, attach order kept, no allocation);
/// - a handle is the slot index plus one (so 0 is NULL) in the low half and the slot's
///   generation in the high half, so a stale handle is told from a reused slot's new
///   handle by one compare;
/// - nothing that can call back into the framework runs with the table locked: cleanup
///   and destroy callbacks, context values' `Drop`, the release of pool blocks and the
///   dropping of a list's or a device's state happen with the lock released (see
///   [`Garbage`]), and bug checks are raised after unlocking.
#[derive(Default)]
pub(crate) struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

static TABLE: TableLock = TableLock {
    locked: AtomicBool::new(false),
    table: UnsafeCell::new(Table {
        slots: Vec::new(),
        free: Vec::new(),
    }),
};

/// The lock of the handle table: test-and-test-and-set, so that taking it is one atomic
/// read-modify-write and releasing it a plain store (a parking mutex needs a second
/// read-modify-write to release, to see whether anyone sleeps). The critical sections are
/// short and never wait (no callbacks, no bug checks, no I/O run under it), so a waiter
/// spins briefly, then yields its processor until the lock is free.
struct TableLock {
    locked: AtomicBool,
    table: UnsafeCell<Table>,
}

// SAFETY: the table is reached only through a `TableGuard`, and at most one exists at a
// time (`locked`), so access is exclusive; the `Acquire`/`Release` pair orders each holder
// after the previous one. What it holds may move between threads: `Table` is `Send`
// (checked below), as a `Mutex<Table>` would require.
unsafe impl Sync for TableLock {}

const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<Table>()
};

/// Exclusive access to the handle table until dropped.
pub(crate) struct TableGuard {
    /// Not `Send`: released on the thread that took it.
    _not_send: PhantomData<*const ()>,
}

impl TableLock {
    #[inline]
    fn lock(&'static self) -> TableGuard {
        if self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended();
        }
        TableGuard {
            _not_send: PhantomData,
        }
    }

    #[cold]
    fn lock_contended(&self) {
        let mut spins = 0u32;
        loop {
            while self.locked.load(Ordering::Relaxed) {
                if spins < 100 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            if self
                .locked
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }
}

impl std::ops::Deref for TableGuard {
    type Target = Table;

    #[inline]
    fn deref(&self) -> &Table {
        // SAFETY: the guard holds the lock, so nothing else accesses the table.
        unsafe { &*TABLE.table.get() }
    }
}

impl std::ops::DerefMut for TableGuard {
    #[inline]
    fn deref_mut(&mut self) -> &mut Table {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow through the guard.
        unsafe { &mut *TABLE.table.get() }
    }
}

impl Drop for TableGuard {
    #[inline]
    fn drop(&mut self) {
        TABLE.locked.store(false, Ordering::Release);
    }
}

/// Locks the handle table. Never held across a callback or a bug check.
#[inline]
pub(crate) fn table() -> TableGuard {
    TABLE.lock()
}

fn handle_of(index: u32, generation: u32) -> WDFOBJECT {
    WDFOBJECT(u64::from(generation) << 32 | (u64::from(index) + 1))
}

/// The slot index a handle names (whatever its generation).
fn index_of(h: WDFOBJECT) -> Option<usize> {
    let index = (h.0 & 0xffff_ffff).checked_sub(1)?;
    usize::try_from(index).ok()
}

impl Table {
    /// The slot index of the live object `h` names: the slot holds an object and its
    /// generation is the handle's.
    #[inline]
    pub fn live_index(&self, h: WDFOBJECT) -> Option<usize> {
        let i = index_of(h)?;
        let s = self.slots.get(i)?;
        (s.generation == (h.0 >> 32) as u32 && s.object.is_some()).then_some(i)
    }

    /// The live object `h` names, if any.
    #[inline]
    pub fn live(&self, h: WDFOBJECT) -> Option<&Object> {
        self.live_index(h).map(|i| self.at(i))
    }

    /// The object `h` was the handle of, live or retired but still in the tree: the
    /// deletion in progress follows the tree by these handles.
    fn node_index(&self, h: WDFOBJECT) -> Option<usize> {
        let i = index_of(h)?;
        self.slots
            .get(i)?
            .object
            .as_ref()
            .is_some_and(|o| o.handle == h)
            .then_some(i)
    }

    /// The object `h` was the handle of, live or retired but still in the tree.
    pub fn node(&self, h: WDFOBJECT) -> Option<&Object> {
        self.node_index(h).map(|i| self.at(i))
    }

    /// The driver the object in slot `i` belongs to: its own, or for a lookaside memory
    /// object its list's (the list outlives it).
    #[inline]
    pub fn driver(&self, i: usize) -> &Arc<DriverGlobals> {
        let o = self.at(i);
        match (&o.driver, &o.body) {
            (Some(d), _) => d,
            (None, Body::Memory(m)) => {
                let list = m
                    .list()
                    .and_then(|l| self.node(l))
                    .expect("a lookaside memory object's list outlives it");
                list.driver.as_ref().expect("a list has its own driver")
            }
            (None, _) => unreachable!("only lookaside memory objects borrow a driver"),
        }
    }

    /// The object in slot `i` (which must hold one).
    #[inline]
    pub fn at(&self, i: usize) -> &Object {
        self.slots[i].object.as_ref().expect("an occupied slot")
    }

    /// The object in slot `i` (which must hold one), mutable.
    #[inline]
    pub fn at_mut(&mut self, i: usize) -> &mut Object {
        self.slots[i].object.as_mut().expect("an occupied slot")
    }

    /// Resolves `h` as a live object answering `fx` (KMDF's handle check): its slot, or
    /// what was found instead (`None`: nothing live; `Some(kind)`: an object of another
    /// type), for [`invalid_handle`] once the table is unlocked.
    #[inline]
    pub fn resolve(&self, h: WDFOBJECT, fx: u64) -> Result<usize, Option<Kind>> {
        match self.live_index(h) {
            Some(i) if self.at(i).kind.is(fx) => Ok(i),
            Some(i) => Err(Some(self.at(i).kind)),
            None => Err(None),
        }
    }

    /// Puts the object `make` builds in a slot, with one reference, under `parent` (a
    /// live slot) if any, and returns its handle. A parent already deleted is
    /// `STATUS_DELETE_PENDING`; `make` is not called and comes back, so that the caller
    /// drops what it holds with the table unlocked.
    ///
    /// Inlined, with the object made by a closure, so that it is built in its slot
    /// rather than built elsewhere and copied there.
    #[inline(always)]
    pub fn insert<F: FnOnce() -> Object>(
        &mut self,
        parent: Option<usize>,
        make: F,
    ) -> Result<WDFOBJECT, (NTSTATUS, F)> {
        if parent.is_some_and(|p| self.at(p).deleted) {
            return Err((STATUS_DELETE_PENDING, make));
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => match u32::try_from(self.slots.len()) {
                Ok(i) if i < NIL => {
                    self.slots.push(Slot {
                        generation: 1,
                        object: None,
                    });
                    i
                }
                _ => return Err((STATUS_INSUFFICIENT_RESOURCES, make)),
            },
        };
        let i = index as usize;
        let h = handle_of(index, self.slots[i].generation);
        self.slots[i].object = Some(make());
        self.at_mut(i).handle = h;
        if let Some(p) = parent {
            self.attach(p, i);
        }
        Ok(h)
    }

    /// Appends child `c` to the list of parent `p`.
    fn attach(&mut self, p: usize, c: usize) {
        let (ph, tail) = {
            let po = self.at(p);
            (po.handle, po.links.last_child)
        };
        {
            let co = self.at_mut(c);
            co.parent = ph;
            co.listed = true;
            co.links.prev = tail;
            co.links.next = NIL;
        }
        if tail == NIL {
            self.at_mut(p).links.first_child = c as u32;
        } else {
            self.at_mut(tail as usize).links.next = c as u32;
        }
        self.at_mut(p).links.last_child = c as u32;
    }

    /// Takes `c` off its parent's list (if it is on one) and clears its parent.
    fn detach(&mut self, c: usize) {
        let (parent, listed, prev, next) = {
            let co = self.at_mut(c);
            let r = (co.parent, co.listed, co.links.prev, co.links.next);
            co.parent = WDFOBJECT::NULL;
            co.listed = false;
            co.links.prev = NIL;
            co.links.next = NIL;
            r
        };
        if !listed {
            return;
        }
        // A listed child's parent is in the tree: it takes its list back (which unlists
        // every child) before it can leave.
        let p = self.node_index(parent).expect("a listed child's parent");
        if prev == NIL {
            self.at_mut(p).links.first_child = next;
        } else {
            self.at_mut(prev as usize).links.next = next;
        }
        if next == NIL {
            self.at_mut(p).links.last_child = prev;
        } else {
            self.at_mut(next as usize).links.prev = prev;
        }
    }

    /// The handles of `p`'s children in attach order.
    fn children(&self, p: usize) -> Vec<WDFOBJECT> {
        if self.at(p).links.first_child == NIL {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut c = self.at(p).links.first_child;
        while c != NIL {
            let co = self.at(c as usize);
            out.push(co.handle);
            c = co.links.next;
        }
        out
    }

    /// Empties `p`'s child list and returns the children in attach order; they keep `p` as
    /// their parent until each is released.
    fn take_children(&mut self, p: usize) -> Vec<WDFOBJECT> {
        if self.at(p).links.first_child == NIL {
            return Vec::new();
        }
        let out = self.children(p);
        let mut c = self.at(p).links.first_child;
        while c != NIL {
            let co = self.at_mut(c as usize);
            c = co.links.next;
            co.listed = false;
            co.links.prev = NIL;
            co.links.next = NIL;
        }
        let po = self.at_mut(p);
        po.links.first_child = NIL;
        po.links.last_child = NIL;
        out
    }

    /// Retires the object in slot `i` (it was destroyed): its handle goes stale. The slot
    /// is freed now if the object has left the tree, else when it does ([`Table::reap`]).
    fn retire(&mut self, i: usize, garbage: &mut Garbage) {
        let s = &mut self.slots[i];
        s.generation = s.generation.wrapping_add(1).max(1);
        self.reap(i, garbage);
    }

    /// Frees slot `i` if its object is retired and out of the tree (on no list, with no
    /// children); the object goes to `garbage`.
    fn reap(&mut self, i: usize, garbage: &mut Garbage) {
        let s = &mut self.slots[i];
        let out = s.object.as_ref().is_some_and(|o| {
            o.handle.0 >> 32 != u64::from(s.generation) && !o.listed && o.links.first_child == NIL
        });
        if out {
            // An object without a context whose body is memory or nothing holds only
            // plain data and reference counts whose release cannot call back: dropped
            // here, in place. Contexts (the driver's `Drop`), lists (their buffers go back
            // to the pool) and devices (their hardware) go with the table unlocked.
            let plain = s.object.as_ref().is_some_and(|o| {
                o.context.is_none() && matches!(o.body, Body::Memory(_) | Body::None)
            });
            if plain {
                s.object = None;
            } else if let Some(o) = s.object.take() {
                garbage.push(Deferred::Drop(o));
            }
            self.free.push(i as u32);
        }
    }
}

/// Work that must run with the table unlocked, collected while it is locked.
pub(crate) enum Deferred {
    /// A retired object: its context's and its state's `Drop` may call the framework.
    Drop(Object),
    /// A pool block to free (`PoolTracker::free` may raise a bug check).
    PoolFree(Arc<crate::pool::PoolTracker>, usize, crate::pool::PoolTag),
}

/// [`Deferred`] work, done in order when dropped (after the table guard: declare it
/// before the guard). The first item is kept inline so the common case (one object
/// retired) does not allocate.
#[derive(Default)]
pub(crate) struct Garbage {
    first: Option<Deferred>,
    rest: Vec<Deferred>,
}

impl Garbage {
    fn push(&mut self, d: Deferred) {
        if self.first.is_none() {
            self.first = Some(d);
        } else {
            self.rest.push(d);
        }
    }

    /// Queues a pool block to be freed once the table is unlocked.
    pub fn free_pool(
        &mut self,
        pool: Arc<crate::pool::PoolTracker>,
        addr: usize,
        tag: crate::pool::PoolTag,
    ) {
        self.push(Deferred::PoolFree(pool, addr, tag));
    }

    /// Does the queued work. Call with the table unlocked.
    #[inline]
    fn flush(&mut self) {
        if self.first.is_some() {
            self.flush_queued();
        }
    }

    #[cold]
    fn flush_queued(&mut self) {
        for d in self.first.take().into_iter().chain(self.rest.drain(..)) {
            match d {
                Deferred::Drop(o) => drop(o),
                Deferred::PoolFree(pool, addr, tag) => pool.free(addr as *mut u8, Some(tag)),
            }
        }
    }
}

impl Drop for Garbage {
    #[inline]
    fn drop(&mut self) {
        self.flush();
    }
}

/// Bug check `WDF_VIOLATION` / `WDF_INVALID_HANDLE` (P2 the handle, P3 `fx`) for a handle
/// that [`Table::resolve`] refused, with what it found. Call with the table unlocked.
#[cold]
pub(crate) fn invalid_handle(h: WDFOBJECT, fx: u64, api: &str, found: Option<Kind>) {
    let why = match found {
        Some(kind) => format!("is a {kind:?}"),
        None if h.is_null() => "is NULL".to_string(),
        None => "names no live object (deleted or never created)".to_string(),
    };
    bug_check(BugCheck::new(
        crate::verifier::WDF_VIOLATION,
        [WDF_INVALID_HANDLE, h.0, fx, 0],
        format!("{api}: handle {:#x} {why}, type {fx:#x} required", h.0),
    ));
}

/// Resolves `h` as an object answering `fx` and runs `f` on it with the table locked; a
/// NULL, stale or wrong-type handle is bug check `WDF_VIOLATION` / `WDF_INVALID_HANDLE`
/// (P2 the handle, P3 `fx`), and `None` after it in record mode.
pub(crate) fn with_resolved<R>(
    h: WDFOBJECT,
    fx: u64,
    api: &str,
    f: impl FnOnce(&mut Object) -> R,
) -> Option<R> {
    let mut t = table();
    match t.resolve(h, fx) {
        Ok(i) => Some(f(t.at_mut(i))),
        Err(found) => {
            drop(t);
            invalid_handle(h, fx, api, found);
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
    /// Parent when the attributes name none (NULL, or an object no longer live: none).
    pub default_parent: WDFOBJECT,
    /// The API creating it (for messages).
    pub api: &'static str,
}

/// Creates an object and attaches it to its parent. The attributes must have been
/// validated. Fails with `STATUS_DELETE_PENDING` when the parent is being deleted; an
/// invalid parent handle is a bug check (`STATUS_INVALID_HANDLE` after it in record mode).
/// On failure the body is dropped.
pub(crate) fn create(new: NewObject<'_>) -> Result<WDFOBJECT, NTSTATUS> {
    let attrs = new.attributes;
    let named_parent = attrs.map(|a| a.ParentObject).filter(|p| !p.is_null());
    let info = attrs.and_then(|a| a.ContextTypeInfo);
    // The context's `Default` is the driver's code: made with the table unlocked, after
    // the parent handle was checked (KMDF checks the parent first).
    let context = match info {
        Some(info) => {
            if let Some(p) = named_parent {
                let t = table();
                if let Err(found) = t.resolve(p, fx_type::FX_TYPE_OBJECT) {
                    drop(t);
                    invalid_handle(p, fx_type::FX_TYPE_OBJECT, new.api, found);
                    return Err(STATUS_INVALID_HANDLE);
                }
            }
            Some(((info.type_id)(), (info.make)()))
        }
        None => None,
    };
    let object = Object::new(new.kind, Some(new.driver), new.body, context, attrs);
    let mut t = table();
    let parent = match named_parent {
        Some(p) => match t.resolve(p, fx_type::FX_TYPE_OBJECT) {
            Ok(i) => Some(i),
            // Checked above, and gone since: it was deleted in between.
            Err(_) if info.is_some() => {
                drop(t);
                drop(object);
                return Err(STATUS_DELETE_PENDING);
            }
            Err(found) => {
                drop(t);
                drop(object);
                invalid_handle(p, fx_type::FX_TYPE_OBJECT, new.api, found);
                return Err(STATUS_INVALID_HANDLE);
            }
        },
        None => t.live_index(new.default_parent),
    };
    match t.insert(parent, move || object) {
        Ok(h) => Ok(h),
        Err((s, object)) => {
            drop(t);
            drop(object);
            Err(s)
        }
    }
}

/// `WdfObjectDelete` on a resolved object. The driver and device objects are marked
/// "no delete DDI" in KMDF (the model has no control devices, the one kind of WDFDEVICE a
/// driver may delete): the call logs `STATUS_CANNOT_DELETE` and does nothing, so the
/// object and its children stay; the framework deletes them at unload.
fn delete(t: TableGuard, i: usize) {
    let o = t.at(i);
    let (what, h) = match o.kind {
        Kind::Driver => ("the driver object", o.handle),
        Kind::Device => ("a device object (WDFDEVICE)", o.handle),
        _ => {
            let h = o.handle;
            let mut garbage = Garbage::default();
            delete_tree_locked(t, h, &mut garbage);
            return;
        }
    };
    drop(t);
    tracing::warn!(
        target: "verifier",
        "WdfObjectDelete({h:?}): {what} cannot be deleted by the driver \
         (STATUS_CANNOT_DELETE); the call does nothing"
    );
}

/// Deletes the object `h` names (if it is live) and its subtree; what the driver does at
/// unload.
pub(crate) fn delete_tree(h: WDFOBJECT) {
    let mut garbage = Garbage::default();
    let t = table();
    if t.live_index(h).is_some() {
        delete_tree_locked(t, h, &mut garbage);
    }
}

/// Deletes `h` and its subtree: cleanup post-order, then creation references released.
/// Consumes the guard (the table is unlocked on return, before `garbage` is dropped).
fn delete_tree_locked(mut t: TableGuard, h: WDFOBJECT, garbage: &mut Garbage) {
    let Some(i) = t.node_index(h).filter(|&i| !t.at(i).deleted) else {
        drop(t);
        tracing::debug!("delete of {h:?}: already deleted, ignored");
        return;
    };
    let o = t.at_mut(i);
    if o.links.first_child == NIL && o.cleanup.is_none() {
        // A leaf without a cleanup callback (the common case, a memory object): what
        // `dispose`, the detach and `release_tree` below do for it, without their walks.
        o.deleted = true;
        t.detach(i);
        drop(release_locked(t, h, garbage));
        return;
    }
    let mut t = dispose(t, h);
    // Detach from the parent: the parent no longer lists it.
    if let Some(i) = t.node_index(h) {
        t.detach(i);
    }
    drop(release_tree(t, h, garbage));
}

/// Marks the subtree deleted and calls cleanup callbacks, children first. The table is
/// unlocked only around the callbacks.
fn dispose(mut t: TableGuard, h: WDFOBJECT) -> TableGuard {
    let Some(i) = t.node_index(h) else {
        return t;
    };
    let o = t.at_mut(i);
    if o.deleted {
        return t;
    }
    o.deleted = true;
    let cleanup = o.cleanup;
    if o.links.first_child != NIL {
        for c in t.children(i) {
            t = dispose(t, c);
        }
    }
    if let Some(cb) = cleanup {
        drop(t);
        cb(h);
        t = table();
    }
    t
}

/// Releases the creation references of the subtree: children in attach order, then `h`.
fn release_tree(mut t: TableGuard, h: WDFOBJECT, garbage: &mut Garbage) -> TableGuard {
    let Some(i) = t.node_index(h) else {
        return t;
    };
    let children = if t.at(i).links.first_child == NIL {
        Vec::new()
    } else {
        t.take_children(i)
    };
    for c in children {
        if let Some(ci) = t.node_index(c) {
            t.at_mut(ci).parent = WDFOBJECT::NULL;
        }
        t = release_tree(t, c, garbage);
    }
    t = release_locked(t, h, garbage);
    // An object destroyed before its list was taken back (released to zero during its
    // own or an ancestor's cleanup) leaves the table now.
    if let Some(i) = t.node_index(h) {
        t.reap(i, garbage);
    }
    t
}

/// Drops one reference on `h` with the table locked; destroys the object at zero: its
/// `EvtDestroyCallback` (table unlocked), its resources released ([`finalize`]), its
/// handle retired.
#[inline]
pub(crate) fn release_locked(t: TableGuard, h: WDFOBJECT, garbage: &mut Garbage) -> TableGuard {
    let Some(i) = t.node_index(h) else {
        return t;
    };
    let mut t = t;
    let o = t.at_mut(i);
    if o.refs == 0 {
        return t;
    }
    o.refs -= 1;
    if o.refs > 0 {
        return t;
    }
    destroy(t, i, h, garbage)
}

/// The last reference of `h` (in slot `i`) went: a deleted object is destroyed, an
/// undeleted one is a bug check.
fn destroy(mut t: TableGuard, i: usize, h: WDFOBJECT, garbage: &mut Garbage) -> TableGuard {
    let o = t.at_mut(i);
    if !o.deleted {
        // The driver dropped the creation reference of an object that was never
        // deleted: KMDF's ~FxObject check for an object with a parent or children.
        o.refs = 1;
        drop(t);
        released_undeleted(h);
        return table();
    }
    // A reference taken during the destroy callback and dropped again must not destroy
    // (and release the buffer) twice.
    let again = std::mem::replace(&mut o.destroyed, true);
    if let Some(cb) = o.destroy {
        drop(t);
        // What earlier destructions released is released before the driver runs again.
        garbage.flush();
        cb(h);
        t = table();
    }
    let Some(i) = t.node_index(h) else {
        return t;
    };
    if again {
        return t;
    }
    t = finalize(t, i, garbage);
    if let Some(i) = t.node_index(h) {
        t.retire(i, garbage);
    }
    t
}

/// Bug check `WDF_VIOLATION` / `WDF_OBJECT_ERROR`: the last reference of `h` went before
/// the object was deleted. Call with the table unlocked.
#[cold]
fn released_undeleted(h: WDFOBJECT) {
    bug_check(BugCheck::new(
        crate::verifier::WDF_VIOLATION,
        [WDF_OBJECT_ERROR, h.0, 0, 0],
        format!("{h:?}: reference count fell to zero before the object was deleted"),
    ));
}

/// Releases what the object in slot `i` holds: a lookaside buffer goes back to its list
/// (and the list's reference is dropped), a pool buffer is freed.
fn finalize(mut t: TableGuard, i: usize, garbage: &mut Garbage) -> TableGuard {
    let list = match &t.at(i).body {
        Body::Memory(m) => match m.release(&t, garbage) {
            Some(list) => list,
            None => return t,
        },
        Body::Lookaside(_) | Body::Device(_) | Body::None => return t,
    };
    t = release_locked(t, list, garbage);
    t
}

/// Adds a reference (`WdfObjectReference`).
pub(crate) fn reference(o: &mut Object) {
    o.refs += 1;
}

/// Adds a reference on the object in slot `i` (a lookaside memory object's hold on its
/// list).
pub(crate) fn reference_at(t: &mut Table, i: usize) {
    reference(t.at_mut(i));
}

/// `WdfObjectGetTypedContextWorker`: the object's context if it is of `TypeInfo`'s type,
/// else NULL. An invalid handle is a bug check.
pub fn WdfObjectGetTypedContextWorker(
    Handle: WDFOBJECT,
    TypeInfo: &WDF_OBJECT_CONTEXT_TYPE_INFO,
) -> *mut std::ffi::c_void {
    super::coverage::record(super::coverage::Api::WdfObjectGetTypedContextWorker);
    let want = (TypeInfo.type_id)();
    with_resolved(
        Handle,
        fx_type::FX_TYPE_OBJECT,
        "WdfObjectGetTypedContext",
        |o| match &mut o.context {
            Some((id, ctx)) if *id == want => {
                // The context is boxed (stable address) and lives as long as the object;
                // the caller gets a raw pointer, as KMDF's accessor returns one.
                let p: *mut (dyn Any + Send + Sync) = &mut **ctx;
                p as *mut std::ffi::c_void
            }
            _ => std::ptr::null_mut(),
        },
    )
    .unwrap_or(std::ptr::null_mut())
}

/// `WdfObjectDelete`.
pub fn WdfObjectDelete(Object: impl Into<WDFOBJECT>) {
    super::coverage::record(super::coverage::Api::WdfObjectDelete);
    let h = Object.into();
    let t = table();
    match t.resolve(h, fx_type::FX_TYPE_OBJECT) {
        Ok(i) => delete(t, i),
        Err(found) => {
            drop(t);
            invalid_handle(h, fx_type::FX_TYPE_OBJECT, "WdfObjectDelete", found);
        }
    }
}

/// `WdfObjectReference`.
pub fn WdfObjectReference(Handle: impl Into<WDFOBJECT>) {
    super::coverage::record(super::coverage::Api::WdfObjectReference);
    with_resolved(
        Handle.into(),
        fx_type::FX_TYPE_OBJECT,
        "WdfObjectReference",
        reference,
    );
}

/// `WdfObjectDereference`.
pub fn WdfObjectDereference(Handle: impl Into<WDFOBJECT>) {
    super::coverage::record(super::coverage::Api::WdfObjectDereference);
    let h = Handle.into();
    let t = table();
    match t.resolve(h, fx_type::FX_TYPE_OBJECT) {
        Ok(_) => {
            let mut garbage = Garbage::default();
            drop(release_locked(t, h, &mut garbage));
        }
        Err(found) => {
            drop(t);
            invalid_handle(h, fx_type::FX_TYPE_OBJECT, "WdfObjectDereference", found);
        }
    }
}

/// The parent of an object (`WdfObjectGetParent` is not a KMDF DDI; this is the model's
/// inspection helper). NULL for none; an invalid handle is a bug check.
pub fn object_parent(Handle: impl Into<WDFOBJECT>) -> WDFOBJECT {
    with_resolved(
        Handle.into(),
        fx_type::FX_TYPE_OBJECT,
        "object_parent",
        |o| o.parent,
    )
    .unwrap_or_default()
}

/// Whether `Handle` names a live (not yet destroyed) object: the model's inspection helper,
/// never a bug check.
pub fn object_is_live(Handle: impl Into<WDFOBJECT>) -> bool {
    table().live_index(Handle.into()).is_some()
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::pool::PoolKind;
    use crate::verifier::{expect_bug_check, WDF_VIOLATION};
    use crate::wdf::{
        lookaside_stats, NonPagedPool, WdfDriverCreate, WdfLookasideListCreate, WdfMemoryCreate,
        WdfMemoryCreateFromLookaside, WdfMemoryGetBuffer, WdfRequestCreate, DRIVER_OBJECT,
        WDFLOOKASIDE, WDFMEMORY, WDFREQUEST, WDF_DRIVER_CONFIG, WDF_NO_OBJECT_ATTRIBUTES,
    };

    /// A loaded driver for service `name`, bound to this thread.
    fn load(name: &str) -> DRIVER_OBJECT {
        let mut obj = DRIVER_OBJECT::new();
        let s = WdfDriverCreate(
            &mut obj,
            &format!(r"\Registry\Machine\System\CurrentControlSet\Services\{name}"),
            WDF_NO_OBJECT_ATTRIBUTES,
            &WDF_DRIVER_CONFIG::default(),
            None,
        );
        assert_eq!(s, STATUS_SUCCESS);
        obj
    }

    fn list(size: usize, memory: Option<&WDF_OBJECT_ATTRIBUTES>) -> WDFLOOKASIDE {
        let mut l = WDFLOOKASIDE::NULL;
        let s = WdfLookasideListCreate(None, size, NonPagedPool, memory, 0, Some(&mut l));
        assert_eq!(s, STATUS_SUCCESS);
        l
    }

    fn from(l: WDFLOOKASIDE) -> WDFMEMORY {
        let mut m = WDFMEMORY::NULL;
        assert_eq!(
            WdfMemoryCreateFromLookaside(l, Some(&mut m)),
            STATUS_SUCCESS
        );
        m
    }

    fn request(parent: WDFOBJECT) -> WDFREQUEST {
        let mut a = WDF_OBJECT_ATTRIBUTES::init();
        a.ParentObject = parent;
        a.EvtCleanupCallback = Some(note_cleanup);
        a.EvtDestroyCallback = Some(note_destroy);
        let mut r = WDFREQUEST::NULL;
        let s = WdfRequestCreate(Some(&a), WDFOBJECT::NULL, Some(&mut r));
        assert_eq!(s, STATUS_SUCCESS);
        r
    }

    thread_local! {
        static EVENTS: RefCell<Vec<(&'static str, WDFOBJECT)>> = const { RefCell::new(Vec::new()) };
    }

    fn note_cleanup(h: WDFOBJECT) {
        EVENTS.with(|e| e.borrow_mut().push(("cleanup", h)));
    }

    fn note_destroy(h: WDFOBJECT) {
        EVENTS.with(|e| e.borrow_mut().push(("destroy", h)));
    }

    fn events() -> Vec<(&'static str, WDFOBJECT)> {
        EVENTS.with(|e| std::mem::take(&mut *e.borrow_mut()))
    }

    /// An object for a private table (no driver needed).
    fn plain() -> Object {
        Object::new(Kind::MemoryLookaside, None, Body::None, None, None)
    }

    /// A freed slot is reused by the next object, under the next generation, so the old
    /// handle names nothing; the generation wraps past 0 (never used, so no handle of a
    /// used slot is ever all-index).
    #[test]
    fn a_reused_slot_gets_a_new_generation() {
        let mut t = Table::default();
        let mut garbage = Garbage::default();
        let old = t.insert(None, plain).ok().unwrap();
        let i = index_of(old).unwrap();
        t.retire(i, &mut garbage);
        assert!(t.live_index(old).is_none() && t.node_index(old).is_none());
        let new = t.insert(None, plain).ok().unwrap();
        assert_eq!(index_of(new), Some(i), "the freed slot is reused first");
        assert_eq!(new.0 >> 32, (old.0 >> 32) + 1);
        assert_eq!(t.live_index(new), Some(i));
        assert_eq!(t.resolve(old, fx_type::FX_TYPE_OBJECT), Err(None));
        assert_eq!(t.resolve(new, fx_type::FX_TYPE_OBJECT), Ok(i));
        t.slots[i].generation = u32::MAX;
        t.at_mut(i).handle = handle_of(i as u32, u32::MAX);
        t.retire(i, &mut garbage);
        assert_eq!(t.slots[i].generation, 1, "wraps to 1, not 0");
    }

    /// The old handle of a deleted object is rejected (bug check 0x10D / 0x5 with that
    /// handle) while new objects take slots, and never reaches a new object.
    #[test]
    fn a_stale_handle_stays_invalid_after_its_slot_is_reused() {
        let mut driver = load("stale");
        let l = list(64, None);
        let old = from(l);
        WdfObjectDelete(old);
        let new = from(l);
        assert_ne!(old, new);
        assert!(!object_is_live(old) && object_is_live(new));
        let bc = expect_bug_check(|| WdfObjectDelete(old));
        assert_eq!(bc.code, WDF_VIOLATION);
        assert_eq!(
            bc.params[..3],
            [WDF_INVALID_HANDLE, old.raw(), fx_type::FX_TYPE_OBJECT]
        );
        let bc = expect_bug_check(|| WdfMemoryGetBuffer(old, None));
        assert_eq!(
            bc.params[..3],
            [WDF_INVALID_HANDLE, old.raw(), fx_type::IFX_TYPE_MEMORY]
        );
        assert!(
            object_is_live(new),
            "the stale handle's uses left the new object alone"
        );
        // The table is usable after the bug checks (the lock was released).
        let mut size = 0;
        assert!(!WdfMemoryGetBuffer(new, Some(&mut size)).is_null());
        assert_eq!(size, 64);
        WdfObjectDelete(new);
        let s = lookaside_stats(l).unwrap();
        assert_eq!((s.total_allocates, s.total_frees), (2, 2));
        WdfObjectDelete(l);
        assert!(driver.unload().is_empty());
    }

    /// Children are kept in attach order through a detach in the middle of the list:
    /// deleting the parent cleans up the remaining children in that order, then the
    /// parent, and destroys them in the same order.
    #[test]
    fn child_lists_keep_attach_order_across_detaches() {
        let mut driver = load("children");
        let parent = request(WDFOBJECT::NULL);
        let [a, b, c, d] = [(); 4].map(|_| request(parent.into()).0);
        WdfObjectDelete(b);
        assert_eq!(events(), [("cleanup", b), ("destroy", b)]);
        WdfObjectDelete(d);
        assert_eq!(events(), [("cleanup", d), ("destroy", d)]);
        let e = request(parent.into()).0;
        assert_eq!(object_parent(e), parent.0);
        WdfObjectDelete(parent);
        let p = parent.0;
        assert_eq!(
            events(),
            [
                ("cleanup", a),
                ("cleanup", c),
                ("cleanup", e),
                ("cleanup", p),
                ("destroy", a),
                ("destroy", c),
                ("destroy", e),
                ("destroy", p),
            ]
        );
        assert!([a, b, c, d, e, p].iter().all(|&h| !object_is_live(h)));
        assert!(driver.unload().is_empty());
    }

    fn over_dereference(h: WDFOBJECT) {
        note_cleanup(h);
        WdfObjectDereference(h);
    }

    /// An object whose last reference goes during its own cleanup (a driver that
    /// dereferences once too often) is destroyed then, with its children still attached:
    /// its handle goes stale at once, and its slot is freed only after the deletion has
    /// released the children, which are destroyed as usual (their buffers freed).
    #[test]
    fn an_object_destroyed_while_it_has_children_releases_them() {
        let mut driver = load("zombie");
        let mut a = WDF_OBJECT_ATTRIBUTES::init();
        a.EvtCleanupCallback = Some(over_dereference);
        a.EvtDestroyCallback = Some(note_destroy);
        let mut r = WDFREQUEST::NULL;
        let s = WdfRequestCreate(Some(&a), WDFOBJECT::NULL, Some(&mut r));
        assert_eq!(s, STATUS_SUCCESS);
        let child = request(r.into()).0;
        let mut m = WDFMEMORY::NULL;
        let mut under = WDF_OBJECT_ATTRIBUTES::init();
        under.ParentObject = r.into();
        let s = WdfMemoryCreate(Some(&under), NonPagedPool, 0, 32, Some(&mut m), None);
        assert_eq!(s, STATUS_SUCCESS);
        let g = Arc::clone(driver.globals().unwrap());
        let outstanding = || {
            g.pool()
                .tag_stats(g.tag(), PoolKind::NonPaged)
                .outstanding()
        };
        assert_eq!(outstanding(), 1);
        WdfObjectDelete(r);
        let r = r.0;
        assert_eq!(
            events(),
            [
                ("cleanup", child),
                ("cleanup", r),
                ("destroy", r),
                ("destroy", child),
            ]
        );
        assert!(!object_is_live(r) && !object_is_live(child) && !object_is_live(m));
        assert_eq!(outstanding(), 0, "the child memory's buffer was freed");
        // Every slot left the tree: the next objects take them again, and the table's
        // links are sound (a new parent and child delete cleanly).
        let again = request(WDFOBJECT::NULL);
        let kid = request(again.into());
        assert_eq!(object_parent(kid), again.0);
        WdfObjectDelete(again);
        assert_eq!(events().len(), 4);
        assert!(driver.unload().is_empty());
    }

    /// A lookaside memory object has no driver of its own: it belongs to its list's
    /// driver, also for objects created under it from a thread bound to another driver.
    #[test]
    fn lookaside_memory_belongs_to_its_lists_driver() {
        let mut alpha = load("alpha");
        let l = list(48, None);
        let m = from(l);
        let mut bravo = load("bravo");
        let mut under = WDF_OBJECT_ATTRIBUTES::init();
        under.ParentObject = m.into();
        let mut child = WDFMEMORY::NULL;
        let s = WdfMemoryCreate(Some(&under), NonPagedPool, 0, 16, Some(&mut child), None);
        assert_eq!(s, STATUS_SUCCESS);
        let allocs = |d: &DRIVER_OBJECT| {
            let g = d.globals().unwrap();
            g.pool().tag_stats(g.tag(), PoolKind::NonPaged).allocs
        };
        assert_eq!((allocs(&alpha), allocs(&bravo)), (2, 0), "alpha's pool");
        assert!(bravo.unload().is_empty());
        {
            let _alpha = alpha.enter();
            WdfObjectDelete(m);
        }
        assert!(!object_is_live(child), "deleted with its parent");
        assert!(alpha.unload().is_empty());
    }

    /// Two threads creating and deleting memory from one list at once: every buffer goes
    /// back, every handle is retired, nothing leaks.
    #[test]
    fn concurrent_create_and_delete_keep_the_table_consistent() {
        const N: usize = 2000;
        let mut driver = load("concurrent");
        let l = list(64, None);
        let g = Arc::clone(driver.globals().unwrap());
        let handles: Vec<Vec<WDFMEMORY>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let g = Arc::clone(&g);
                    s.spawn(move || {
                        let _scope = g.enter();
                        let mut seen = Vec::with_capacity(N);
                        let mut held = Vec::new();
                        for i in 0..N {
                            let m = from(l);
                            seen.push(m);
                            held.push(m);
                            if i % 3 != 0 {
                                WdfObjectDelete(held.swap_remove(0));
                            }
                        }
                        for m in held {
                            WdfObjectDelete(m);
                        }
                        seen
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let all: Vec<WDFMEMORY> = handles.concat();
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), 2 * N, "no handle was handed out twice");
        assert!(all.iter().all(|&m| !object_is_live(m)));
        let s = lookaside_stats(l).unwrap();
        assert_eq!(
            (s.total_allocates, s.total_frees),
            (2 * N as u64, 2 * N as u64)
        );
        WdfObjectDelete(l);
        assert!(driver.unload().is_empty());
    }
}
