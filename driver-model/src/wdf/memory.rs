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
use std::sync::{Arc, Mutex};

use super::driver::{current, DriverGlobals};
use super::object::{
    self, validate_attributes, Body, Kind, NewObject, Object, WDFLOOKASIDE, WDFMEMORY,
    WDF_OBJECT_ATTRIBUTES,
};
use super::pool::POOL_TYPE;
use crate::irql::{irql_at_most, APC_LEVEL, DISPATCH_LEVEL};
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
        .and_then(object::lookup)
        .map(|o| Arc::clone(&o.driver))
        .unwrap_or_else(current)
}

fn driver_object(g: &DriverGlobals) -> Option<Arc<Object>> {
    object::lookup(g.handle().into())
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
    /// on the list object.
    Lookaside {
        list: Arc<Object>,
        core: Arc<Lookaside>,
    },
}

/// A memory object's state.
pub(crate) struct MemoryBody {
    /// (address, size) of the buffer.
    buffer: Mutex<(usize, usize)>,
    origin: Origin,
}

impl MemoryBody {
    fn get(&self) -> (usize, usize) {
        *self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the buffer back to where it came from (the object is being destroyed).
    pub(crate) fn release(&self) {
        let (addr, _) = self.get();
        match &self.origin {
            Origin::Pool { pool, tag } => pool.free(addr as *mut u8, Some(*tag)),
            Origin::Preallocated => {}
            Origin::Lookaside { list, core } => {
                if let Some(p) = NonNull::new(addr as *mut u8) {
                    // SAFETY: the block came from `core.allocate()` for this object, which
                    // is being destroyed, so it is returned exactly once.
                    unsafe { core.free(p) };
                }
                object::release(list);
            }
        }
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
    let default_parent = driver_object(&g);
    object::create(NewObject {
        kind,
        driver: g,
        body: Body::Memory(MemoryBody {
            buffer: Mutex::new(buffer),
            origin,
        }),
        attributes,
        default_parent,
        api,
    })
    .map(|o| WDFMEMORY(o.handle))
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
    let Some(o) = object::resolve(Memory.into(), fx_type::FX_TYPE_MEMORY_PREALLOCATED, API) else {
        return STATUS_INVALID_HANDLE;
    };
    if Buffer.is_null() {
        null_parameter(API, "Buffer");
        return STATUS_INVALID_PARAMETER;
    }
    if BufferSize == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    let Body::Memory(m) = &o.body else {
        unreachable!("a preallocated memory object has a memory body")
    };
    *m.buffer.lock().unwrap_or_else(|e| e.into_inner()) = (Buffer as usize, BufferSize);
    STATUS_SUCCESS
}

fn memory_body(Memory: WDFMEMORY, api: &str) -> Option<(Arc<Object>, (usize, usize))> {
    let o = object::resolve(Memory.into(), fx_type::IFX_TYPE_MEMORY, api)?;
    let Body::Memory(m) = &o.body else {
        unreachable!("a memory object has a memory body")
    };
    let b = m.get();
    Some((o, b))
}

/// `WdfMemoryGetBuffer`: the buffer's address, and its size in `BufferSize` (the size
/// requested at creation).
pub fn WdfMemoryGetBuffer(Memory: WDFMEMORY, BufferSize: Option<&mut usize>) -> *mut c_void {
    super::coverage::record(super::coverage::Api::WdfMemoryGetBuffer);
    let Some((_, (addr, size))) = memory_body(Memory, "WdfMemoryGetBuffer") else {
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
    let Some((_o, (addr, size))) = memory_body(SourceMemory, API) else {
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
    // buffer is valid while the object lives, which `_o` ensures); the destination is the
    // caller's promise.
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
    let Some((_o, (addr, size))) = memory_body(DestinationMemory, API) else {
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
    let default_parent = driver_object(&g);
    match object::create(NewObject {
        kind: Kind::Lookaside,
        driver: g,
        body: Body::Lookaside(LookasideBody {
            core,
            memory_attributes: MemoryAttributes.copied(),
        }),
        attributes: LookasideAttributes,
        default_parent,
        api: API,
    }) {
        Ok(o) => {
            *out = WDFLOOKASIDE(o.handle);
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
    let Some(list) = object::resolve(Lookaside.into(), fx_type::FX_TYPE_LOOKASIDE, API) else {
        return STATUS_INVALID_HANDLE;
    };
    let Some(out) = Memory else {
        null_parameter(API, "Memory");
        return STATUS_INVALID_PARAMETER;
    };
    *out = WDFMEMORY::NULL;
    let Body::Lookaside(body) = &list.body else {
        unreachable!("a lookaside object has a lookaside body")
    };
    let max = match body.core.kind() {
        PoolKind::Paged => APC_LEVEL,
        PoolKind::NonPaged => DISPATCH_LEVEL,
    };
    if !irql_at_most(API, max) {
        return STATUS_INVALID_DEVICE_REQUEST;
    }
    let Some(buf) = body.core.allocate() else {
        return STATUS_INSUFFICIENT_RESOURCES;
    };
    object::reference(&list);
    let g = Arc::clone(&list.driver);
    match create_memory(
        g,
        Kind::MemoryLookaside,
        (buf.as_ptr() as usize, body.core.size()),
        Origin::Lookaside {
            list: Arc::clone(&list),
            core: Arc::clone(&body.core),
        },
        body.memory_attributes.as_ref(),
        API,
    ) {
        Ok(h) => {
            *out = h;
            STATUS_SUCCESS
        }
        Err(s) => {
            // SAFETY: `buf` came from this list's `allocate` and was never handed out.
            unsafe { body.core.free(buf) };
            object::release(&list);
            s
        }
    }
}

/// The lookaside list's counters (the NT `GENERAL_LOOKASIDE` fields; a model inspection
/// helper, not a KMDF DDI).
pub fn lookaside_stats(Lookaside: WDFLOOKASIDE) -> Option<LookasideStats> {
    let o = object::lookup(Lookaside.into())?;
    match &o.body {
        Body::Lookaside(b) => Some(b.core.stats()),
        _ => None,
    }
}
