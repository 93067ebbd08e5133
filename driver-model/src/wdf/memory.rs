//! Framework memory objects and lookaside lists: `WdfMemoryCreate`,
//! `WdfMemoryCreatePreallocated`, `WdfMemoryAssignBuffer`, `WdfMemoryGetBuffer`,
//! `WdfMemoryCopyToBuffer`, `WdfMemoryCopyFromBuffer`, `WdfLookasideListCreate` and
//! `WdfMemoryCreateFromLookaside`, with KMDF's checks in KMDF's order
//! (docs/wdf-behaviour-sources.md cites the source of each).
//!
//! Functions that take a caller's raw buffer pointer are `unsafe`: the pointer must be valid
//! for the access the function makes (and, for a preallocated memory object, for as long as
//! the object may access it), as in C.

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use super::driver::{current, DriverGlobals};
use super::object::{
    self, validate_attributes, Body, Garbage, Kind, NewObject, Object, Table, WDFLOOKASIDE,
    WDFMEMORY, WDFOBJECT, WDF_OBJECT_ATTRIBUTES,
};
use super::pool::POOL_TYPE;
use crate::irql::{irql_at_most, KeGetCurrentIrql, APC_LEVEL, DISPATCH_LEVEL};
use crate::lookaside::{Lookaside, LookasideStats, DEFAULT_DEPTH};
use crate::pool::{self as core_pool, PoolKind, PoolTracker};
use crate::status::*;
use crate::verifier::{bug_check, fx_type, BugCheck, WDF_REQUIRED_PARAMETER_IS_NULL};

/// Bug check `WDF_VIOLATION` / `WDF_REQUIRED_PARAMETER_IS_NULL` for `what` in `api`.
pub(crate) fn null_parameter(api: &str, what: &str) {
    bug_check(BugCheck::wdf(
        WDF_REQUIRED_PARAMETER_IS_NULL,
        0,
        format!("{api}: required parameter {what} is NULL"),
    ));
}

/// The driver an object created with `attributes` belongs to: the parent's, else the
/// thread's.
fn driver_for(attributes: Option<&WDF_OBJECT_ATTRIBUTES>) -> Arc<DriverGlobals> {
    attributes
        .map(|a| a.ParentObject)
        .filter(|p| !p.is_null())
        .and_then(|p| {
            let t = object::table();
            t.live_index(p).map(|i| Arc::clone(t.driver(i)))
        })
        .unwrap_or_else(current)
}

/// Where a memory object's buffer comes from, and so what deleting it does.
enum Origin {
    /// `WdfMemoryCreate`: a pool block, freed when the object is destroyed.
    Pool {
        pool: Arc<PoolTracker>,
        tag: core_pool::PoolTag,
    },
    /// `WdfMemoryCreatePreallocated`: the caller's buffer, never freed by the framework.
    Preallocated,
    /// `WdfMemoryCreateFromLookaside`: returned to the list; the object holds a reference
    /// on the list object (so the list, and its core, outlive the object).
    Lookaside { list: WDFOBJECT },
}

/// A memory object's state (changed, by `WdfMemoryAssignBuffer`, with the table locked).
pub(crate) struct MemoryBody {
    /// (address, size) of the buffer.
    buffer: (usize, usize),
    origin: Origin,
}

impl MemoryBody {
    /// The list a lookaside memory object's buffer came from.
    pub(crate) fn list(&self) -> Option<WDFOBJECT> {
        match self.origin {
            Origin::Lookaside { list } => Some(list),
            Origin::Pool { .. } | Origin::Preallocated => None,
        }
    }

    /// Gives the buffer back to where it came from (the object is being destroyed; the
    /// table is locked): a lookaside buffer to its list now, a pool block once the table
    /// is unlocked. Returns the list whose reference the caller must then release.
    pub(crate) fn release(&self, t: &Table, garbage: &mut Garbage) -> Option<WDFOBJECT> {
        let (addr, _) = self.buffer;
        match &self.origin {
            Origin::Pool { pool, tag } => {
                garbage.free_pool(Arc::clone(pool), addr, *tag);
                None
            }
            Origin::Preallocated => None,
            Origin::Lookaside { list } => {
                let core = lookaside_core(t, *list).expect("a memory object's list outlives it");
                if let Some(p) = NonNull::new(addr as *mut u8) {
                    // SAFETY: the block came from `core.allocate()` for this object, which
                    // is being destroyed, so it is returned exactly once.
                    unsafe { core.free(p) };
                }
                Some(*list)
            }
        }
    }
}

/// The core list of lookaside object `list` (live, or destroyed and still in the tree).
fn lookaside_core(t: &Table, list: WDFOBJECT) -> Option<&Lookaside> {
    match &t.node(list)?.body {
        Body::Lookaside(b) => Some(&b.core),
        _ => None,
    }
}

/// A lookaside list object's state.
pub(crate) struct LookasideBody {
    core: Arc<Lookaside>,
    memory_attributes: Option<WDF_OBJECT_ATTRIBUTES>,
}

fn create_memory(
    g: Arc<DriverGlobals>,
    kind: Kind,
    buffer: (usize, usize),
    origin: Origin,
    attributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    api: &'static str,
) -> Result<WDFMEMORY, NTSTATUS> {
    let default_parent = g.handle().into();
    object::create(NewObject {
        kind,
        driver: g,
        body: Body::Memory(MemoryBody { buffer, origin }),
        attributes,
        default_parent,
        api,
    })
    .map(WDFMEMORY)
}

/// `WdfMemoryCreate`: a memory object with a `BufferSize`-byte buffer from `PoolType`
/// tagged `PoolTag` (0: the driver's tag). `Memory` is required (bug check 0x10D / 0x4);
/// IRQL <= APC_LEVEL for paged pool, <= DISPATCH_LEVEL otherwise
/// (`STATUS_INVALID_DEVICE_REQUEST`); `BufferSize` 0 is `STATUS_INVALID_PARAMETER`. The
/// buffer is freed when the object is deleted.
pub fn WdfMemoryCreate(
    Attributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    PoolType: POOL_TYPE,
    PoolTag: u32,
    BufferSize: usize,
    Memory: Option<&mut WDFMEMORY>,
    Buffer: Option<&mut *mut c_void>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfMemoryCreate);
    const API: &str = "WdfMemoryCreate";
    let g = driver_for(Attributes);
    let Some(memory) = Memory else {
        null_parameter(API, "Memory");
        return STATUS_INVALID_PARAMETER;
    };
    let Some(kind) = PoolType.kind() else {
        return STATUS_INVALID_PARAMETER;
    };
    let max = if kind == PoolKind::Paged {
        APC_LEVEL
    } else {
        DISPATCH_LEVEL
    };
    if !irql_at_most(API, max) {
        return STATUS_INVALID_DEVICE_REQUEST;
    }
    if BufferSize == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    *memory = WDFMEMORY::NULL;
    let status = validate_attributes(Attributes);
    if !status.is_success() {
        return status;
    }
    let tag = if PoolTag == 0 {
        g.tag()
    } else {
        core_pool::PoolTag(PoolTag)
    };
    let Some(block) = g.pool().allocate(kind, BufferSize, tag) else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    let addr = block.ptr.as_ptr() as usize;
    let pool = Arc::clone(g.pool());
    match create_memory(
        g,
        Kind::MemoryPool,
        (addr, BufferSize),
        Origin::Pool {
            pool: Arc::clone(&pool),
            tag,
        },
        Attributes,
        API,
    ) {
        Ok(h) => {
            *memory = h;
            if let Some(b) = Buffer {
                *b = addr as *mut c_void;
            }
            STATUS_SUCCESS
        }
        Err(s) => {
            pool.free(addr as *mut u8, Some(tag));
            s
        }
    }
}

/// `WdfMemoryCreatePreallocated`: a memory object for the caller's buffer. NULL `Buffer`
/// or `Memory` is bug check 0x10D / 0x4; `BufferSize` 0 is `STATUS_INVALID_PARAMETER`;
/// above DISPATCH_LEVEL `STATUS_INVALID_DEVICE_REQUEST`. The framework never frees the
/// buffer.
///
/// # Safety
///
/// `Buffer` must be valid for reads and writes of `BufferSize` bytes for as long as the
/// memory object may be used to access it (until it is deleted or given another buffer).
pub unsafe fn WdfMemoryCreatePreallocated(
    Attributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    Buffer: *mut c_void,
    BufferSize: usize,
    Memory: Option<&mut WDFMEMORY>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfMemoryCreatePreallocated);
    const API: &str = "WdfMemoryCreatePreallocated";
    let g = driver_for(Attributes);
    if Buffer.is_null() {
        null_parameter(API, "Buffer");
        return STATUS_INVALID_PARAMETER;
    }
    let Some(memory) = Memory else {
        null_parameter(API, "Memory");
        return STATUS_INVALID_PARAMETER;
    };
    *memory = WDFMEMORY::NULL;
    if BufferSize == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    // The seed's IRQL rule (KMDF has only the SAL annotation; the model's verifier checks).
    if !irql_at_most(API, DISPATCH_LEVEL) {
        return STATUS_INVALID_DEVICE_REQUEST;
    }
    let status = validate_attributes(Attributes);
    if !status.is_success() {
        return status;
    }
    match create_memory(
        g,
        Kind::MemoryPreallocated,
        (Buffer as usize, BufferSize),
        Origin::Preallocated,
        Attributes,
        API,
    ) {
        Ok(h) => {
            *memory = h;
            STATUS_SUCCESS
        }
        Err(s) => s,
    }
}

/// `WdfMemoryAssignBuffer`: gives a preallocated memory object another buffer (the old
/// one is not freed). A memory object not made by `WdfMemoryCreatePreallocated` is bug
/// check 0x10D / 0x5 with type 0x1022; NULL `Buffer` 0x10D / 0x4; size 0
/// `STATUS_INVALID_PARAMETER`.
///
/// # Safety
///
/// As for [`WdfMemoryCreatePreallocated`].
pub unsafe fn WdfMemoryAssignBuffer(
    Memory: WDFMEMORY,
    Buffer: *mut c_void,
    BufferSize: usize,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfMemoryAssignBuffer);
    const API: &str = "WdfMemoryAssignBuffer";
    let h = Memory.into();
    let mut t = object::table();
    let i = match t.resolve(h, fx_type::FX_TYPE_MEMORY_PREALLOCATED) {
        Ok(i) => i,
        Err(found) => {
            drop(t);
            object::invalid_handle(h, fx_type::FX_TYPE_MEMORY_PREALLOCATED, API, found);
            return STATUS_INVALID_HANDLE;
        }
    };
    if Buffer.is_null() {
        drop(t);
        null_parameter(API, "Buffer");
        return STATUS_INVALID_PARAMETER;
    }
    if BufferSize == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    let Body::Memory(m) = &mut t.at_mut(i).body else {
        unreachable!("a preallocated memory object has a memory body")
    };
    m.buffer = (Buffer as usize, BufferSize);
    STATUS_SUCCESS
}

/// The (address, size) of memory object `Memory`'s buffer. The buffer stays valid while
/// the object lives (the driver's business, as in KMDF).
fn memory_body(Memory: WDFMEMORY, api: &str) -> Option<(usize, usize)> {
    object::with_resolved(Memory.into(), fx_type::IFX_TYPE_MEMORY, api, |o| {
        match &o.body {
            Body::Memory(m) => m.buffer,
            _ => unreachable!("a memory object has a memory body"),
        }
    })
}

/// `WdfMemoryGetBuffer`: the buffer's address, and its size in `BufferSize` (the size
/// requested at creation).
pub fn WdfMemoryGetBuffer(Memory: WDFMEMORY, BufferSize: Option<&mut usize>) -> *mut c_void {
    super::coverage::record(super::coverage::Api::WdfMemoryGetBuffer);
    let Some((addr, size)) = memory_body(Memory, "WdfMemoryGetBuffer") else {
        return std::ptr::null_mut();
    };
    if let Some(s) = BufferSize {
        *s = size;
    }
    addr as *mut c_void
}

/// `WdfMemoryCopyToBuffer`: copies `NumBytesToCopyTo` bytes at `SourceOffset` of the
/// memory object into `Buffer`. NULL `Buffer` is bug check 0x10D / 0x4; 0 bytes
/// `STATUS_INVALID_PARAMETER`; a range outside the memory `STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
///
/// `Buffer` must be valid for writes of `NumBytesToCopyTo` bytes and must not overlap the
/// memory object's buffer.
pub unsafe fn WdfMemoryCopyToBuffer(
    SourceMemory: WDFMEMORY,
    SourceOffset: usize,
    Buffer: *mut c_void,
    NumBytesToCopyTo: usize,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfMemoryCopyToBuffer);
    const API: &str = "WdfMemoryCopyToBuffer";
    let Some((addr, size)) = memory_body(SourceMemory, API) else {
        return STATUS_INVALID_HANDLE;
    };
    if Buffer.is_null() {
        null_parameter(API, "Buffer");
        return STATUS_INVALID_PARAMETER;
    }
    if NumBytesToCopyTo == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    if (SourceOffset != 0 && SourceOffset >= size) || NumBytesToCopyTo > size - SourceOffset {
        return STATUS_BUFFER_TOO_SMALL;
    }
    // SAFETY: the source range is inside the memory object's buffer (checked above; the
    // buffer is valid while the object lives, which the driver ensures by not deleting it
    // during the call, as in KMDF); the destination is the caller's promise.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (addr + SourceOffset) as *const u8,
            Buffer.cast::<u8>(),
            NumBytesToCopyTo,
        )
    };
    STATUS_SUCCESS
}

/// `WdfMemoryCopyFromBuffer`: copies `NumBytesToCopyFrom` bytes from `Buffer` to
/// `DestinationOffset` of the memory object. NULL `Buffer` is bug check 0x10D / 0x4; 0
/// bytes `STATUS_INVALID_PARAMETER`; a range outside the memory
/// `STATUS_INVALID_BUFFER_SIZE`.
///
/// # Safety
///
/// `Buffer` must be valid for reads of `NumBytesToCopyFrom` bytes and must not overlap
/// the memory object's buffer.
pub unsafe fn WdfMemoryCopyFromBuffer(
    DestinationMemory: WDFMEMORY,
    DestinationOffset: usize,
    Buffer: *const c_void,
    NumBytesToCopyFrom: usize,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfMemoryCopyFromBuffer);
    const API: &str = "WdfMemoryCopyFromBuffer";
    let Some((addr, size)) = memory_body(DestinationMemory, API) else {
        return STATUS_INVALID_HANDLE;
    };
    if Buffer.is_null() {
        null_parameter(API, "Buffer");
        return STATUS_INVALID_PARAMETER;
    }
    if NumBytesToCopyFrom == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    if (DestinationOffset != 0 && DestinationOffset >= size)
        || NumBytesToCopyFrom > size - DestinationOffset
    {
        return STATUS_INVALID_BUFFER_SIZE;
    }
    // SAFETY: as in `WdfMemoryCopyToBuffer`, in the other direction.
    unsafe {
        std::ptr::copy_nonoverlapping(
            Buffer.cast::<u8>(),
            (addr + DestinationOffset) as *mut u8,
            NumBytesToCopyFrom,
        )
    };
    STATUS_SUCCESS
}

/// `WdfLookasideListCreate`: a lookaside list of `BufferSize`-byte buffers from `PoolType`
/// tagged `PoolTag` (0: the driver's default tag), whose memory objects get
/// `MemoryAttributes`.
///
/// In KMDF's order: NULL `Lookaside` is bug check 0x10D / 0x4; `BufferSize` 0
/// `STATUS_INVALID_PARAMETER`; invalid attributes their status; a paged list at IRQL >
/// APC_LEVEL, or any list above DISPATCH_LEVEL, `STATUS_INVALID_DEVICE_REQUEST`; for a
/// paged list, attributes whose parents are two different devices
/// `STATUS_INVALID_PARAMETER`. No buffer is allocated here. The default parent is the
/// driver.
pub fn WdfLookasideListCreate(
    LookasideAttributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    BufferSize: usize,
    PoolType: POOL_TYPE,
    MemoryAttributes: Option<&WDF_OBJECT_ATTRIBUTES>,
    PoolTag: u32,
    Lookaside: Option<&mut WDFLOOKASIDE>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfLookasideListCreate);
    const API: &str = "WdfLookasideListCreate";
    let g = driver_for(LookasideAttributes.or(MemoryAttributes));
    let Some(out) = Lookaside else {
        null_parameter(API, "Lookaside");
        return STATUS_INVALID_PARAMETER;
    };
    *out = WDFLOOKASIDE::NULL;
    if BufferSize == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    for a in [LookasideAttributes, MemoryAttributes] {
        let s = validate_attributes(a);
        if !s.is_success() {
            return s;
        }
    }
    let tag = if PoolTag == 0 {
        g.tag()
    } else {
        core_pool::PoolTag(PoolTag)
    };
    let Some(kind) = PoolType.kind() else {
        return STATUS_INVALID_PARAMETER;
    };
    let max = match kind {
        PoolKind::Paged => APC_LEVEL,
        PoolKind::NonPaged => DISPATCH_LEVEL,
    };
    if !irql_at_most(API, max) {
        return STATUS_INVALID_DEVICE_REQUEST;
    }
    if kind == PoolKind::Paged {
        let device_of = |a: Option<&WDF_OBJECT_ATTRIBUTES>| {
            a.map(|a| a.ParentObject)
                .filter(|p| !p.is_null())
                .and_then(super::device::device_ancestor)
        };
        if let (Some(a), Some(b)) = (device_of(LookasideAttributes), device_of(MemoryAttributes)) {
            if a != b {
                return STATUS_INVALID_PARAMETER;
            }
        }
    }
    let core = Arc::new(Lookaside::new(
        BufferSize,
        kind,
        tag,
        DEFAULT_DEPTH,
        Arc::clone(g.pool()),
    ));
    let default_parent = g.handle().into();
    match object::create(NewObject {
        kind: Kind::Lookaside,
        driver: g,
        body: Body::Lookaside(Box::new(LookasideBody {
            core,
            memory_attributes: MemoryAttributes.copied(),
        })),
        attributes: LookasideAttributes,
        default_parent,
        api: API,
    }) {
        Ok(h) => {
            *out = WDFLOOKASIDE(h);
            STATUS_SUCCESS
        }
        Err(s) => s,
    }
}

/// `WdfMemoryCreateFromLookaside`: a memory object with a buffer from the list. An invalid
/// list handle is bug check 0x10D / 0x5 (type 0x1009), NULL `Memory` 0x10D / 0x4; a paged
/// list above APC_LEVEL (or any above DISPATCH_LEVEL) `STATUS_INVALID_DEVICE_REQUEST`; no
/// memory `STATUS_INSUFFICIENT_RESOURCES`.
///
/// The memory object gets the memory attributes given at list creation; its parent is
/// their `ParentObject`, else the driver (never the list). It holds a reference on the
/// list, so deleting the list while memory is out is safe. Deleting the memory object (or
/// its parent) returns the buffer. Buffers smaller than a page are zeroed; larger ones are
/// not.
pub fn WdfMemoryCreateFromLookaside(
    Lookaside: WDFLOOKASIDE,
    Memory: Option<&mut WDFMEMORY>,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::WdfMemoryCreateFromLookaside);
    const API: &str = "WdfMemoryCreateFromLookaside";
    // One critical section on the common path (no context type in the memory attributes):
    // the list is resolved, the buffer taken, the object made and attached, and the list
    // referenced under one lock of the handle table. The checks are KMDF's, in its order.
    let lh: WDFOBJECT = Lookaside.into();
    let irql = KeGetCurrentIrql();
    let mut context = None;
    let mut Memory = Memory;
    let mut t = object::table();
    let list = loop {
        let list = match t.resolve(lh, fx_type::FX_TYPE_LOOKASIDE) {
            Ok(i) => i,
            Err(found) => {
                drop(t);
                object::invalid_handle(lh, fx_type::FX_TYPE_LOOKASIDE, API, found);
                return STATUS_INVALID_HANDLE;
            }
        };
        let Some(out) = Memory.as_deref_mut() else {
            drop(t);
            null_parameter(API, "Memory");
            return STATUS_INVALID_PARAMETER;
        };
        *out = WDFMEMORY::NULL;
        let Body::Lookaside(body) = &t.at(list).body else {
            unreachable!("a lookaside object has a lookaside body")
        };
        let max = match body.core.kind() {
            PoolKind::Paged => APC_LEVEL,
            PoolKind::NonPaged => DISPATCH_LEVEL,
        };
        if irql > max {
            drop(t);
            // Logs the violation (and answers `false`).
            irql_at_most(API, max);
            return STATUS_INVALID_DEVICE_REQUEST;
        }
        // A context type: its `Default` is the driver's code, run with the table unlocked;
        // then the list is resolved again.
        match body.memory_attributes.and_then(|a| a.ContextTypeInfo) {
            Some(info) if context.is_none() => {
                drop(t);
                context = Some(((info.type_id)(), (info.make)()));
                t = object::table();
            }
            _ => break list,
        }
    };
    let Body::Lookaside(body) = &t.at(list).body else {
        unreachable!("a lookaside object has a lookaside body")
    };
    let attributes = body.memory_attributes;
    let size = body.core.size();
    let Some(buf) = body.core.allocate() else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    let give_back = |t: &Table| {
        let Body::Lookaside(b) = &t.at(list).body else {
            unreachable!("a lookaside object has a lookaside body")
        };
        // SAFETY: `buf` came from this list's `allocate`, was never handed out, and is
        // given back once (on a failure path that returns right after).
        unsafe { b.core.free(buf) }
    };
    // The parent: the memory attributes' ParentObject, else the list's driver (never the
    // list).
    let named_parent = attributes.map(|a| a.ParentObject).filter(|p| !p.is_null());
    let parent = match named_parent {
        Some(p) => match t.resolve(p, fx_type::FX_TYPE_OBJECT) {
            Ok(i) => Some(i),
            Err(found) => {
                give_back(&t);
                drop(t);
                object::invalid_handle(p, fx_type::FX_TYPE_OBJECT, API, found);
                return STATUS_INVALID_HANDLE;
            }
        },
        None => t.live_index(t.driver(list).handle().into()),
    };
    let make = move || {
        Object::new(
            Kind::MemoryLookaside,
            None,
            Body::Memory(MemoryBody {
                buffer: (buf.as_ptr() as usize, size),
                origin: Origin::Lookaside { list: lh },
            }),
            context,
            attributes.as_ref(),
        )
    };
    match t.insert(parent, make) {
        Ok(h) => {
            object::reference_at(&mut t, list);
            drop(t);
            if let Some(out) = Memory {
                *out = WDFMEMORY(h);
            }
            STATUS_SUCCESS
        }
        Err((s, make)) => {
            give_back(&t);
            drop(t);
            // What it holds (a context) goes with the table unlocked.
            drop(make);
            s
        }
    }
}

/// The lookaside list's counters (the NT `GENERAL_LOOKASIDE` fields; a model inspection
/// helper, not a KMDF DDI).
pub fn lookaside_stats(Lookaside: WDFLOOKASIDE) -> Option<LookasideStats> {
    let core = match &object::table().live(Lookaside.into())?.body {
        Body::Lookaside(b) => Arc::clone(&b.core),
        _ => return None,
    };
    Some(core.stats())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wdf::{
        NonPagedPool, PagedPool, WdfDeviceCreate, WdfDriverCreate, WdfGetDriver, WdfObjectDelete,
        WdfRequestCreate, DRIVER_OBJECT, WDFDEVICE, WDFDEVICE_INIT, WDFDRIVER, WDFOBJECT,
        WDFREQUEST, WDF_DRIVER_CONFIG, WDF_NO_OBJECT_ATTRIBUTES,
    };

    const TAG: u32 = u32::from_le_bytes(*b"MmTs");

    /// A loaded driver, current on this thread (each test runs on its own thread).
    fn load() -> DRIVER_OBJECT {
        load_named("memtest")
    }

    /// A loaded driver for service `name`, now the one bound to this thread.
    fn load_named(name: &str) -> DRIVER_OBJECT {
        let mut obj = DRIVER_OBJECT::new();
        let mut h = WDFDRIVER::NULL;
        let s = WdfDriverCreate(
            &mut obj,
            &format!(r"\Registry\Machine\System\CurrentControlSet\Services\{name}"),
            WDF_NO_OBJECT_ATTRIBUTES,
            &WDF_DRIVER_CONFIG::default(),
            Some(&mut h),
        );
        assert_eq!(s, STATUS_SUCCESS);
        obj
    }

    fn device() -> WDFDEVICE {
        let mut init = Some(WDFDEVICE_INIT::without_hardware());
        let mut d = WDFDEVICE::NULL;
        assert_eq!(
            WdfDeviceCreate(&mut init, None, Some(&mut d)),
            STATUS_SUCCESS
        );
        d
    }

    fn under(parent: impl Into<WDFOBJECT>) -> WDF_OBJECT_ATTRIBUTES {
        let mut a = WDF_OBJECT_ATTRIBUTES::init();
        a.ParentObject = parent.into();
        a
    }

    /// `WdfLookasideListCreate` of 64-byte buffers; the status, and whether a list came out.
    fn create(
        pool: POOL_TYPE,
        list: Option<&WDF_OBJECT_ATTRIBUTES>,
        memory: Option<&WDF_OBJECT_ATTRIBUTES>,
    ) -> (NTSTATUS, bool) {
        // Not NULL before the call: a refused call sets it to NULL.
        let mut l = WDFLOOKASIDE(WDFOBJECT(1));
        let s = WdfLookasideListCreate(list, 64, pool, memory, TAG, Some(&mut l));
        (s, !l.is_null())
    }

    /// An object belongs to its parent's driver, whichever driver the thread is bound to:
    /// its buffer comes from that driver's pool, with that driver's default tag.
    #[test]
    fn objects_belong_to_their_parents_driver() {
        let alpha = load_named("alpha");
        let dev = device();
        let bravo = load_named("bravo");
        let stats = |d: &DRIVER_OBJECT, kind| {
            let g = d.globals().unwrap();
            g.pool().tag_stats(g.tag(), kind)
        };
        let mut m = WDFMEMORY::NULL;
        let s = WdfMemoryCreate(Some(&under(dev)), NonPagedPool, 0, 32, Some(&mut m), None);
        assert_eq!(s, STATUS_SUCCESS);
        assert_eq!(stats(&alpha, PoolKind::NonPaged).allocs, 1, "alpha's pool");
        assert_eq!(stats(&bravo, PoolKind::NonPaged).allocs, 0);
        // Without a parent: the thread's driver.
        let s = WdfMemoryCreate(None, NonPagedPool, 0, 32, Some(&mut m), None);
        assert_eq!(s, STATUS_SUCCESS);
        assert_eq!(stats(&bravo, PoolKind::NonPaged).allocs, 1);
        // A list on alpha's device takes its buffers from alpha's pool, with alpha's tag.
        let mut l = WDFLOOKASIDE::NULL;
        let s = WdfLookasideListCreate(Some(&under(dev)), 48, PagedPool, None, 0, Some(&mut l));
        assert_eq!(s, STATUS_SUCCESS);
        assert_eq!(
            WdfMemoryCreateFromLookaside(l, Some(&mut m)),
            STATUS_SUCCESS
        );
        assert_eq!(stats(&alpha, PoolKind::Paged).allocs, 1);
        assert_eq!(stats(&bravo, PoolKind::Paged).allocs, 0);
    }

    /// The list's counters (NT's lookaside fields) through its handle; None for a handle
    /// that is not a list.
    #[test]
    fn lookaside_stats_counts_the_lists_buffers() {
        let _driver = load();
        let mut l = WDFLOOKASIDE::NULL;
        let s = WdfLookasideListCreate(None, 64, NonPagedPool, None, TAG, Some(&mut l));
        assert_eq!(s, STATUS_SUCCESS);
        assert_eq!(lookaside_stats(l), Some(LookasideStats::default()));
        let mut m = [WDFMEMORY::NULL; 2];
        for m in &mut m {
            assert_eq!(WdfMemoryCreateFromLookaside(l, Some(m)), STATUS_SUCCESS);
        }
        WdfObjectDelete(m[0]);
        let want = LookasideStats {
            total_allocates: 2,
            allocate_misses: 2,
            total_frees: 1,
            free_misses: 0,
            depth: 1,
        };
        assert_eq!(lookaside_stats(l), Some(want));
        assert_eq!(
            lookaside_stats(WDFLOOKASIDE(m[1].0)),
            None,
            "a memory object"
        );
        WdfObjectDelete(l);
        WdfObjectDelete(m[1]);
        assert_eq!(lookaside_stats(l), None, "deleted");
    }

    /// A paged list's buffers may be touched only at PASSIVE/APC level, which KMDF ties to
    /// one device: a list and its memory objects parented on two different devices is
    /// refused; a non-paged list, or parents on one device, is fine.
    #[test]
    fn paged_list_parents_on_two_devices_are_refused() {
        let _driver = load();
        let (a, b) = (device(), device());
        let mut request = WDFREQUEST::NULL;
        assert_eq!(
            WdfRequestCreate(Some(&under(b)), WDFOBJECT::NULL, Some(&mut request)),
            STATUS_SUCCESS
        );
        let (a, b, on_b) = (under(a), under(b), under(request));
        let refused = (STATUS_INVALID_PARAMETER, false);
        let made = (STATUS_SUCCESS, true);
        assert_eq!(create(PagedPool, Some(&a), Some(&b)), refused);
        assert_eq!(
            create(PagedPool, Some(&on_b), Some(&a)),
            refused,
            "a request on device b is on device b"
        );
        assert_eq!(create(NonPagedPool, Some(&a), Some(&b)), made);
        assert_eq!(create(PagedPool, Some(&b), Some(&on_b)), made);
        assert_eq!(create(PagedPool, Some(&a), Some(&a)), made);
        assert_eq!(create(PagedPool, Some(&a), None), made);
        assert_eq!(create(PagedPool, None, Some(&b)), made);
        let driver = under(WdfGetDriver());
        assert_eq!(
            create(PagedPool, Some(&driver), Some(&b)),
            made,
            "the driver is on no device"
        );
        let null_parent = WDF_OBJECT_ATTRIBUTES::init();
        assert_eq!(create(PagedPool, Some(&null_parent), Some(&a)), made);
    }
}
