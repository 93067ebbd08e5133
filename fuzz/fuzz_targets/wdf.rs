//! WDF facade call sequences (`domdma_driver_model::wdf`): memory objects (pool,
//! preallocated, lookaside), lookaside lists, requests, parents, references, contexts,
//! cleanup and destroy callbacks (some of which call back into the framework), pool
//! allocations, IRQL changes, and on a device over the in-process back end DMA adapters,
//! DMA domains and domain common buffers; with valid, stale, wrong-type and garbage
//! handles and parameters, as the input decides.
//!
//! The verifier runs in record mode: a documented bug check is recorded and the call
//! returns its "verifier off" status, so a sequence runs to its end; any panic is a
//! finding, as are memory errors (ASan: buffers handed out by memory objects are touched
//! through their pointers) and these checks:
//! - a callback runs at most once per object, and destroy only after cleanup;
//! - a common buffer lies inside the adapter's address width and `MaximumAddress`, and
//!   live buffers of one domain never overlap;
//! - `FreeCommonBuffer` frees exactly when its parameters match one of the adapter's
//!   allocations (at PASSIVE_LEVEL), and bug-checks otherwise;
//! - after a legal teardown (IRQL lowered, buffers freed, adapters put, pool freed, extra
//!   references dropped), unloading the driver bug-checks nothing, leaks no pool, and every
//!   object the input made has been cleaned up and destroyed exactly once.

#![no_main]
#![allow(non_snake_case)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use domdma_device::core::DeviceConfig;
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::{NodeUsage, PhysConfig};
use domdma_driver_model::dma_queue::reset_device;
use domdma_driver_model::irql::{KeGetCurrentIrql, KeLowerIrql, KeRaiseIrql, PASSIVE_LEVEL};
use domdma_driver_model::status::*;
use domdma_driver_model::verifier::{self, VerifierMode};
use domdma_driver_model::wdf::*;
use domdma_driver_model::WDF_DECLARE_CONTEXT_TYPE_WITH_NAME;
use libfuzzer_sys::fuzz_target;

/// An object context.
#[derive(Default)]
struct FuzzContext {
    touched: u64,
}

WDF_DECLARE_CONTEXT_TYPE_WITH_NAME!(FuzzContext, fuzz_context);

// ---- callbacks ----------------------------------------------------------------------

#[derive(Debug, Default, Clone, Copy)]
struct Calls {
    cleanups: u32,
    destroys: u32,
}

thread_local! {
    /// Callback calls per handle (this input's).
    static CALLS: RefCell<HashMap<u64, Calls>> = RefCell::new(HashMap::new());
    /// What the callbacks do besides counting (the input's choice).
    static REENTRY: Cell<u8> = const { Cell::new(0) };
    /// Handles of memory objects (the cleanup callback reads their buffer).
    static MEMORY: RefCell<HashMap<u64, usize>> = RefCell::new(HashMap::new());
}

fn calls(h: WDFOBJECT) -> Calls {
    CALLS.with(|c| c.borrow().get(&h.raw()).copied().unwrap_or_default())
}

fn cleanup_cb(o: WDFOBJECT) {
    let c = CALLS.with(|c| {
        let mut c = c.borrow_mut();
        let e = c.entry(o.raw()).or_default();
        e.cleanups += 1;
        *e
    });
    assert_eq!(c.cleanups, 1, "{o:?}: EvtCleanupCallback called twice");
    assert_eq!(
        c.destroys, 0,
        "{o:?}: EvtCleanupCallback after EvtDestroyCallback"
    );
    // The framework must be usable from a callback (no lock is held).
    match REENTRY.with(Cell::get) % 4 {
        1 => WdfObjectDelete(o),
        2 => {
            // A child of an object being deleted.
            let attrs = WDF_OBJECT_ATTRIBUTES {
                ParentObject: o,
                ..WDF_OBJECT_ATTRIBUTES::init()
            };
            let mut r = WDFREQUEST::NULL;
            if NT_SUCCESS(WdfRequestCreate(
                Some(&attrs),
                WDFOBJECT::NULL,
                Some(&mut r),
            )) {
                WdfObjectDelete(r);
            }
        }
        3 => {
            if let Some(size) = MEMORY.with(|m| m.borrow().get(&o.raw()).copied()) {
                let mut got = 0;
                let p = WdfMemoryGetBuffer(WDFMEMORY(o), Some(&mut got));
                assert!(!p.is_null(), "{o:?}: no buffer during its cleanup");
                assert_eq!(got, size);
                touch(p, got);
            }
        }
        _ => {}
    }
}

fn destroy_cb(o: WDFOBJECT) {
    let c = CALLS.with(|c| {
        let mut c = c.borrow_mut();
        let e = c.entry(o.raw()).or_default();
        e.destroys += 1;
        *e
    });
    assert_eq!(c.destroys, 1, "{o:?}: EvtDestroyCallback called twice");
    assert_eq!(
        c.cleanups, 1,
        "{o:?}: destroyed without a cleanup (never deleted)"
    );
    if REENTRY.with(Cell::get) & 4 != 0 {
        let p = fuzz_context(o);
        if !p.is_null() {
            // SAFETY: the context lives until the object is destroyed, which is after this
            // callback returns.
            unsafe { (*p).touched += 1 };
        }
    }
}

/// Read and write the first and last byte of a buffer a memory object handed out.
fn touch(p: *mut c_void, size: usize) {
    if size == 0 {
        return;
    }
    let p = p.cast::<u8>();
    // SAFETY: `p` is the buffer of a live memory object, valid for `size` bytes (what the
    // facade promises; ASan checks it for pool and lookaside buffers).
    unsafe {
        let a = p.read_volatile();
        p.write_volatile(a ^ 0x5a);
        let last = p.add(size - 1);
        let b = last.read_volatile();
        last.write_volatile(b.wrapping_add(1));
    }
}

// ---- input --------------------------------------------------------------------------

/// A handle: one this input made (live or not), a special one, or any value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum HandleSel {
    Made(u8),
    Null,
    Driver,
    Device,
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Attrs {
    parent: Option<HandleSel>,
    context: bool,
    /// Something wrong with them, one case in two.
    bad: u8,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    MemoryCreate {
        attrs: Option<Attrs>,
        pool: u8,
        tag: u8,
        size: u16,
        buffer: bool,
        null_out: bool,
    },
    MemoryCreatePreallocated {
        attrs: Option<Attrs>,
        buf: u8,
        size: u16,
    },
    AssignBuffer {
        mem: HandleSel,
        buf: u8,
        size: u16,
    },
    GetBuffer {
        mem: HandleSel,
    },
    CopyTo {
        mem: HandleSel,
        offset: u16,
        len: u16,
    },
    CopyFrom {
        mem: HandleSel,
        offset: u16,
        len: u16,
        byte: u8,
    },
    LookasideCreate {
        attrs: Option<Attrs>,
        memory: Option<Attrs>,
        size: u16,
        pool: u8,
        tag: u8,
    },
    FromLookaside {
        list: HandleSel,
    },
    RequestCreate {
        attrs: Option<Attrs>,
        io_target: bool,
    },
    DeviceCreate {
        attrs: Option<Attrs>,
    },
    Delete {
        h: HandleSel,
    },
    Reference {
        h: HandleSel,
    },
    Dereference {
        h: HandleSel,
    },
    Context {
        h: HandleSel,
    },
    Parent {
        h: HandleSel,
    },
    ExAllocate {
        pool: u8,
        size: u16,
        tag: u8,
    },
    ExFree {
        block: u8,
        how: u8,
    },
    Raise {
        level: u8,
    },
    Lower {
        level: u8,
    },
    GetAdapter {
        version: u8,
        master: bool,
        width: u8,
        max_length: u32,
        dma64: bool,
        no_pdo: bool,
    },
    AdapterInfo {
        a: u8,
        version: u8,
    },
    GetDomain {
        a: u8,
    },
    Join {
        a: u8,
        domain: DomainSel,
    },
    Leave {
        a: u8,
    },
    Alloc {
        a: u8,
        domain: DomainSel,
        max: Option<i64>,
        len: u32,
        flags: u8,
        cache: u8,
        node: u8,
    },
    Free {
        cb: u8,
        mangle: u8,
    },
    Touch {
        cb: u8,
        offset: u32,
    },
    Put {
        a: u8,
    },
    Reentry(u8),
    /// AllocateDomainCommonBuffer in the adapter's own domain (GetDmaDomain first), the
    /// way a driver calls it.
    AllocOwn {
        a: u8,
        len: u32,
        flags: u8,
        cache: u8,
        node: u8,
    },
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum DomainSel {
    Seen(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// `PRESET_*` bits: what the driver does before the operations.
    preset: u8,
    pool_tag: u32,
    ops: Vec<Op>,
}

/// Preset: a device on the in-process back end (else no DMA hardware at all).
const PRESET_HARDWARE: u8 = 1 << 0;
/// Preset: a version-3 adapter of 64 address bits.
const PRESET_ADAPTER_64: u8 = 1 << 1;
/// Preset: a version-3 adapter of 32 address bits.
const PRESET_ADAPTER_32: u8 = 1 << 2;
/// Preset: each preset adapter's DMA domain (GetDmaDomain).
const PRESET_DOMAINS: u8 = 1 << 3;
/// Preset: a lookaside list with tracked memory objects, and a request.
const PRESET_OBJECTS: u8 = 1 << 4;

// ---- harness ------------------------------------------------------------------------

/// An object the input made.
struct Made {
    h: WDFOBJECT,
    /// Created with our callbacks (so its deletion is known).
    tracked: bool,
    lookaside: bool,
}

/// A live domain common buffer.
#[derive(Debug, Clone, Copy)]
struct Cb {
    adapter: u64,
    domain: u64,
    logical: u64,
    va: *mut c_void,
    len: u32,
    cached: bool,
}

struct Harness {
    driver: WDFDRIVER,
    device: WDFDEVICE,
    pdo: Option<PDEVICE_OBJECT>,
    made: Vec<Made>,
    /// References the input added (WdfObjectReference), per handle.
    refs: HashMap<u64, u32>,
    /// Live ExAllocatePoolWithTag blocks (address, tag), and freed ones.
    blocks: Vec<(usize, u32)>,
    freed: Vec<usize>,
    /// Buffers for preallocated memory objects (alive until the driver is unloaded).
    bufs: Vec<Box<[u8]>>,
    adapters: Vec<PDMA_ADAPTER>,
    domains: Vec<HANDLE>,
    cbs: Vec<Cb>,
}

const TAGS: [u32; 4] = [
    0,
    u32::from_le_bytes(*b"Fuzz"),
    u32::from_le_bytes(*b"Ddk "),
    1,
];
const POOLS: [POOL_TYPE; 6] = [
    NonPagedPool,
    PagedPool,
    NonPagedPoolNx,
    PagedPoolCacheAligned,
    NonPagedPoolMustSucceed,
    POOL_TYPE(-1),
];

impl Harness {
    fn handle(&self, s: HandleSel) -> WDFOBJECT {
        match s {
            HandleSel::Made(i) if !self.made.is_empty() => {
                self.made[usize::from(i) % self.made.len()].h
            }
            HandleSel::Made(_) | HandleSel::Null => WDFOBJECT::NULL,
            HandleSel::Driver => self.driver.into(),
            HandleSel::Device => self.device.into(),
            HandleSel::Raw(v) => match self.made.first() {
                // A real slot with another generation (a stale handle), or any value.
                Some(m) if v & 1 == 1 => raw_handle(m.h.raw() ^ (v & !0xffff_ffff)),
                _ => raw_handle(v),
            },
        }
    }

    fn attrs(&self, a: Attrs) -> WDF_OBJECT_ATTRIBUTES {
        let mut at = WDF_OBJECT_ATTRIBUTES::init();
        at.EvtCleanupCallback = Some(cleanup_cb);
        at.EvtDestroyCallback = Some(destroy_cb);
        if a.context {
            at.ContextTypeInfo = Some(<FuzzContext as WdfContextType>::INFO);
        }
        if let Some(p) = a.parent {
            at.ParentObject = self.handle(p);
        }
        match a.bad % 16 {
            1 => at.Size += 8,
            2 => at.ContextSizeOverride = 1,
            3 => at.ExecutionLevel = WDF_EXECUTION_LEVEL::WdfExecutionLevelPassive,
            4 => at.SynchronizationScope = WDF_SYNCHRONIZATION_SCOPE::WdfSynchronizationScopeDevice,
            5 => at.ExecutionLevel = WDF_EXECUTION_LEVEL::WdfExecutionLevelInvalid,
            6 => at.ContextSizeOverride = 4096,
            _ => {}
        }
        at
    }

    fn made(&mut self, h: WDFOBJECT, tracked: bool, lookaside: bool) {
        self.made.push(Made {
            h,
            tracked,
            lookaside,
        });
    }

    fn adapter(&self, i: u8) -> Option<PDMA_ADAPTER> {
        (!self.adapters.is_empty())
            .then(|| Arc::clone(&self.adapters[usize::from(i) % self.adapters.len()]))
    }

    fn domain(&self, d: DomainSel) -> HANDLE {
        match d {
            DomainSel::Seen(i) if !self.domains.is_empty() => {
                self.domains[usize::from(i) % self.domains.len()]
            }
            DomainSel::Seen(_) => HANDLE::NULL,
            DomainSel::Raw(v) => HANDLE(v),
        }
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::MemoryCreate {
                attrs,
                pool,
                tag,
                size,
                buffer,
                null_out,
            } => {
                let at = attrs.map(|a| self.attrs(a));
                let mut m = WDFMEMORY::NULL;
                let mut b: *mut c_void = std::ptr::null_mut();
                let size = usize::from(size % 9000);
                let s = WdfMemoryCreate(
                    at.as_ref(),
                    POOLS[usize::from(pool) % POOLS.len()],
                    TAGS[usize::from(tag) % TAGS.len()],
                    size,
                    (!null_out).then_some(&mut m),
                    buffer.then_some(&mut b),
                );
                if NT_SUCCESS(s) {
                    assert!(
                        !null_out && !m.is_null(),
                        "WdfMemoryCreate: success, no handle"
                    );
                    if buffer {
                        touch(b, size);
                    }
                    MEMORY.with(|x| x.borrow_mut().insert(m.raw(), size));
                    self.made(m.into(), attrs.is_some(), false);
                }
            }
            Op::MemoryCreatePreallocated { attrs, buf, size } => {
                let at = attrs.map(|a| self.attrs(a));
                let i = usize::from(buf) % (self.bufs.len() + 1);
                let (p, size) = match self.bufs.get_mut(i) {
                    Some(b) => (
                        b.as_mut_ptr().cast::<c_void>(),
                        usize::from(size) % (b.len() + 1),
                    ),
                    None => (std::ptr::null_mut(), usize::from(size)),
                };
                let mut m = WDFMEMORY::NULL;
                // SAFETY: `p` is NULL or one of the harness's buffers, which live until the
                // driver is unloaded (after every memory object is destroyed), and `size`
                // is within it.
                let s = unsafe { WdfMemoryCreatePreallocated(at.as_ref(), p, size, Some(&mut m)) };
                if NT_SUCCESS(s) {
                    MEMORY.with(|x| x.borrow_mut().insert(m.raw(), size));
                    self.made(m.into(), attrs.is_some(), false);
                }
            }
            Op::AssignBuffer { mem, buf, size } => {
                let h = WDFMEMORY(self.handle(mem));
                let i = usize::from(buf) % (self.bufs.len() + 1);
                let (p, size) = match self.bufs.get_mut(i) {
                    Some(b) => (
                        b.as_mut_ptr().cast::<c_void>(),
                        usize::from(size) % (b.len() + 1),
                    ),
                    None => (std::ptr::null_mut(), usize::from(size)),
                };
                // SAFETY: as for WdfMemoryCreatePreallocated.
                let s = unsafe { WdfMemoryAssignBuffer(h, p, size) };
                if NT_SUCCESS(s) {
                    MEMORY.with(|x| x.borrow_mut().insert(h.raw(), size));
                }
            }
            Op::GetBuffer { mem } => {
                let mut size = 0;
                let p = WdfMemoryGetBuffer(WDFMEMORY(self.handle(mem)), Some(&mut size));
                if !p.is_null() {
                    touch(p, size);
                }
            }
            Op::CopyTo { mem, offset, len } => {
                let mut v = vec![0u8; usize::from(len).max(1)];
                // SAFETY: `v` holds at least `len` bytes and is no memory object's buffer.
                let _ = unsafe {
                    WdfMemoryCopyToBuffer(
                        WDFMEMORY(self.handle(mem)),
                        usize::from(offset),
                        v.as_mut_ptr().cast(),
                        usize::from(len),
                    )
                };
            }
            Op::CopyFrom {
                mem,
                offset,
                len,
                byte,
            } => {
                let v = vec![byte; usize::from(len).max(1)];
                // SAFETY: as above.
                let _ = unsafe {
                    WdfMemoryCopyFromBuffer(
                        WDFMEMORY(self.handle(mem)),
                        usize::from(offset),
                        v.as_ptr().cast(),
                        usize::from(len),
                    )
                };
            }
            Op::LookasideCreate {
                attrs,
                memory,
                size,
                pool,
                tag,
            } => {
                let at = attrs.map(|a| self.attrs(a));
                let mt = memory.map(|a| self.attrs(a));
                let mut l = WDFLOOKASIDE::NULL;
                let s = WdfLookasideListCreate(
                    at.as_ref(),
                    usize::from(size % 9000),
                    POOLS[usize::from(pool) % POOLS.len()],
                    mt.as_ref(),
                    TAGS[usize::from(tag) % TAGS.len()],
                    Some(&mut l),
                );
                if NT_SUCCESS(s) {
                    LIST_MEMORY_TRACKED.with(|t| t.borrow_mut().insert(l.raw(), memory.is_some()));
                    self.made(l.into(), attrs.is_some(), true);
                }
            }
            Op::FromLookaside { list } => {
                let l = WDFLOOKASIDE(self.handle(list));
                let mut m = WDFMEMORY::NULL;
                if NT_SUCCESS(WdfMemoryCreateFromLookaside(l, Some(&mut m))) {
                    let mut size = 0;
                    let p = WdfMemoryGetBuffer(m, Some(&mut size));
                    assert!(!p.is_null(), "new lookaside memory without a buffer");
                    touch(p, size);
                    MEMORY.with(|x| x.borrow_mut().insert(m.raw(), size));
                    let tracked = LIST_MEMORY_TRACKED
                        .with(|t| t.borrow().get(&l.raw()).copied())
                        .unwrap_or(false);
                    self.made(m.into(), tracked, false);
                }
            }
            Op::RequestCreate { attrs, io_target } => {
                let at = attrs.map(|a| self.attrs(a));
                let target = if io_target {
                    self.driver.into()
                } else {
                    WDFOBJECT::NULL
                };
                let mut r = WDFREQUEST::NULL;
                if NT_SUCCESS(WdfRequestCreate(at.as_ref(), target, Some(&mut r))) {
                    self.made(r.into(), attrs.is_some(), false);
                }
            }
            Op::DeviceCreate { attrs } => {
                let at = attrs.map(|a| self.attrs(a));
                let mut init = Some(WDFDEVICE_INIT::without_hardware());
                let mut d = WDFDEVICE::NULL;
                if NT_SUCCESS(WdfDeviceCreate(&mut init, at.as_ref(), Some(&mut d))) {
                    assert!(init.is_none(), "WdfDeviceCreate keeps DeviceInit");
                    // Device objects cannot be deleted by the driver: not tracked.
                    self.made(d.into(), false, false);
                }
            }
            Op::Delete { h } => WdfObjectDelete(self.handle(h)),
            Op::Reference { h } => {
                let h = self.handle(h);
                let live = object_is_live(h);
                WdfObjectReference(h);
                if live {
                    *self.refs.entry(h.raw()).or_default() += 1;
                }
            }
            Op::Dereference { h } => {
                let h = self.handle(h);
                let live = object_is_live(h);
                let ours = self.refs.get(&h.raw()).copied().unwrap_or(0);
                if ours > 0 {
                    *self.refs.get_mut(&h.raw()).unwrap() -= 1;
                    WdfObjectDereference(h);
                    return;
                }
                // Without a reference of ours, only where the rule is a documented bug check
                // (the creation reference of an object not yet deleted) or the handle is
                // stale; never on a lookaside list, which its memory objects reference.
                let made = self.made.iter().find(|m| m.h == h);
                let legal = match made {
                    Some(m) => m.tracked && !m.lookaside && calls(h).cleanups == 0,
                    None => !live,
                };
                if legal {
                    WdfObjectDereference(h);
                }
            }
            Op::Context { h } => {
                let p = fuzz_context(self.handle(h));
                if !p.is_null() {
                    // SAFETY: a context pointer is valid while its object lives (it does:
                    // the handle resolved just now, on this thread).
                    unsafe { (*p).touched += 1 };
                }
            }
            Op::Parent { h } => {
                let _ = object_parent(self.handle(h));
            }
            Op::ExAllocate { pool, size, tag } => {
                let tag = TAGS[usize::from(tag) % TAGS.len()];
                let p = ExAllocatePoolWithTag(
                    POOLS[usize::from(pool) % POOLS.len()],
                    usize::from(size),
                    tag,
                );
                if !p.is_null() {
                    touch(p, usize::from(size));
                    self.blocks.push((p as usize, tag));
                }
            }
            Op::ExFree { block, how } => {
                let live =
                    (!self.blocks.is_empty()).then(|| usize::from(block) % self.blocks.len());
                match (how % 5, live) {
                    (0, Some(i)) => {
                        let (p, tag) = self.blocks[i];
                        let _ = verifier::take_recorded();
                        ExFreePoolWithTag(p as *mut c_void, tag);
                        // Above the pool's IRQL: a bug check, nothing freed.
                        if verifier::take_recorded().is_empty() {
                            self.blocks.swap_remove(i);
                            self.freed.push(p);
                        }
                    }
                    (1, Some(i)) => {
                        let (p, tag) = self.blocks[i];
                        // The wrong tag: a bug check, nothing freed.
                        ExFreePoolWithTag(p as *mut c_void, tag ^ 0x2020_2020);
                    }
                    (2, Some(i)) => {
                        let (p, _) = self.blocks[i];
                        let _ = verifier::take_recorded();
                        ExFreePool(p as *mut c_void);
                        if verifier::take_recorded().is_empty() {
                            self.blocks.swap_remove(i);
                            self.freed.push(p);
                        }
                    }
                    (3, _) if !self.freed.is_empty() => {
                        // A double free, unless the address is a live block again: the
                        // pool may have handed it to this input (`blocks`) or to the
                        // framework (a memory object's buffer, a lookaside entry), and
                        // freeing that is a use of a stale pointer, not a double free:
                        // the owner's own free would then bug-check at unload.
                        let p = self.freed[usize::from(block) % self.freed.len()];
                        let reused = current_driver()
                            .is_some_and(|g| g.pool().block(p as *const u8).is_some());
                        if !reused {
                            ExFreePool(p as *mut c_void);
                        }
                    }
                    _ => ExFreePool(usize::from(block).wrapping_mul(0x1010) as *mut c_void),
                }
            }
            Op::Raise { level } => {
                let mut old = 0;
                KeRaiseIrql(level % 17, &mut old);
            }
            Op::Lower { level } => KeLowerIrql(level % 17),
            Op::GetAdapter {
                version,
                master,
                width,
                max_length,
                dma64,
                no_pdo,
            } => {
                let d = DEVICE_DESCRIPTION {
                    Version: u32::from(version % 5),
                    Master: master,
                    ScatterGather: true,
                    DmaAddressWidth: u32::from(width % 70),
                    MaximumLength: max_length,
                    Dma64BitAddresses: dma64,
                    ..Default::default()
                };
                let mut map_registers = 0;
                let pdo = if no_pdo { None } else { self.pdo.as_deref() };
                if let Some(a) = IoGetDmaAdapter(pdo, &d, &mut map_registers) {
                    self.adapters.push(a);
                }
            }
            Op::AdapterInfo { a, version } => {
                if let Some(a) = self.adapter(a) {
                    let mut info = DMA_ADAPTER_INFO {
                        Version: u32::from(version % 3),
                        ..Default::default()
                    };
                    let _ = (a.DmaOperations.GetDmaAdapterInfo)(&a, &mut info);
                }
            }
            Op::GetDomain { a } => {
                if let Some(a) = self.adapter(a) {
                    let d = (a.DmaOperations.GetDmaDomain)(&a);
                    if !d.is_null() && !self.domains.contains(&d) {
                        self.domains.push(d);
                    }
                }
            }
            Op::Join { a, domain } => {
                if let Some(a) = self.adapter(a) {
                    let _ = (a.DmaOperations.JoinDmaDomain)(&a, self.domain(domain));
                }
            }
            Op::Leave { a } => {
                if let Some(a) = self.adapter(a) {
                    let _ = (a.DmaOperations.LeaveDmaDomain)(&a);
                }
            }
            Op::Alloc {
                a,
                domain,
                max,
                len,
                flags,
                cache,
                node,
            } => self.alloc(a, domain, max, len, flags, cache, node),
            Op::Free { cb, mangle } => self.free(cb, mangle),
            Op::Touch { cb, offset } => {
                if !self.cbs.is_empty() {
                    let cb = self.cbs[usize::from(cb) % self.cbs.len()];
                    let off = (offset as usize) % cb.len as usize;
                    // SAFETY: a live common buffer (not freed, its adapter kept) of `len`
                    // bytes, mapped by the back end.
                    unsafe { cb.va.cast::<u8>().add(off).write_volatile(0xa5) };
                }
            }
            Op::Put { a } => {
                if self.adapters.is_empty() {
                    return;
                }
                let i = usize::from(a) % self.adapters.len();
                let adapter = Arc::clone(&self.adapters[i]);
                let outstanding = adapter.core().buffer_count();
                (adapter.DmaOperations.PutDmaAdapter)(Arc::clone(&adapter));
                if outstanding == 0 {
                    self.adapters.swap_remove(i);
                }
            }
            Op::Reentry(r) => REENTRY.with(|x| x.set(r)),
            Op::AllocOwn {
                a,
                len,
                flags,
                cache,
                node,
            } => {
                let Some(adapter) = self.adapter(a) else {
                    return;
                };
                let d = (adapter.DmaOperations.GetDmaDomain)(&adapter);
                if d.is_null() {
                    return;
                }
                if !self.domains.contains(&d) {
                    self.domains.push(d);
                }
                let i = self.domains.iter().position(|&x| x == d).unwrap() as u8;
                self.alloc(a, DomainSel::Seen(i), None, len, flags, cache, node);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn alloc(
        &mut self,
        a: u8,
        domain: DomainSel,
        max: Option<i64>,
        len: u32,
        flags: u8,
        cache: u8,
        node: u8,
    ) {
        let Some(adapter) = self.adapter(a) else {
            return;
        };
        let len = match len >> 30 {
            0 => len % (64 << 10),
            1 => len % (4 << 20),
            2 => len,
            _ => 4096,
        };
        let cache = match cache % 5 {
            0 => None,
            1 => Some(MmCached),
            2 => Some(MmNonCached),
            3 => Some(MmWriteCombined),
            _ => Some(MmHardwareCoherentCached),
        };
        let node = match node % 4 {
            0 => MM_ANY_NODE_OK,
            n => u32::from(n - 1),
        };
        let domain = self.domain(domain);
        let max_addr = max.map(|m| PHYSICAL_ADDRESS { QuadPart: m });
        let mut logical = PHYSICAL_ADDRESS::default();
        let mut va: *mut c_void = std::ptr::null_mut();
        let s = (adapter.DmaOperations.AllocateDomainCommonBuffer)(
            &adapter,
            domain,
            max_addr.as_ref(),
            len,
            u32::from(flags % 3),
            cache.as_ref(),
            node,
            &mut logical,
            &mut va,
        );
        if !NT_SUCCESS(s) {
            return;
        }
        let logical = logical.QuadPart as u64;
        assert!(
            !va.is_null(),
            "AllocateDomainCommonBuffer: success with a NULL VA"
        );
        assert!(len > 0);
        let last = logical
            .checked_add(u64::from(len) - 1)
            .unwrap_or_else(|| panic!("common buffer {logical:#x}+{len:#x} wraps past 2^64"));
        let width = adapter.core().width();
        assert!(
            width >= 64 || last >> width == 0,
            "common buffer {logical:#x}+{len:#x} beyond the adapter's {width}-bit width"
        );
        if let Some(m) = max {
            assert!(
                last <= m as u64,
                "common buffer {logical:#x}+{len:#x} above MaximumAddress {m:#x}"
            );
        }
        for c in self.cbs.iter().filter(|c| c.domain == domain.0) {
            let c_last = c.logical + u64::from(c.len) - 1;
            assert!(
                last < c.logical || logical > c_last,
                "common buffers {logical:#x}+{len:#x} and {:#x}+{:#x} overlap in one domain",
                c.logical,
                c.len
            );
            let (va0, cva) = (va as usize, c.va as usize);
            assert!(
                va0 + len as usize <= cva || cva + c.len as usize <= va0,
                "common buffers overlap in virtual memory"
            );
        }
        let cb = Cb {
            adapter: adapter.core().id(),
            domain: domain.0,
            logical,
            va,
            len,
            cached: cache != Some(MmNonCached),
        };
        // SAFETY: the buffer was just allocated with `len` bytes at `va`.
        unsafe {
            cb.va.cast::<u8>().write_volatile(1);
            cb.va.cast::<u8>().add(len as usize - 1).write_volatile(2);
        }
        self.cbs.push(cb);
    }

    fn free(&mut self, cb: u8, mangle: u8) {
        if self.cbs.is_empty() {
            return;
        }
        let i = usize::from(cb) % self.cbs.len();
        let c = self.cbs[i];
        let Some(owner) = self
            .adapters
            .iter()
            .find(|a| a.core().id() == c.adapter)
            .cloned()
        else {
            return;
        };
        let mut adapter = Arc::clone(&owner);
        let (mut len, mut logical, mut va, mut cached) = (c.len, c.logical, c.va, c.cached);
        match mangle % 8 {
            1 => len = len.wrapping_add(1),
            2 => logical = logical.wrapping_add(4096),
            3 => va = va.cast::<u8>().wrapping_add(1).cast(),
            4 => cached = !cached,
            5 => {
                if let Some(other) = self.adapters.iter().find(|a| a.core().id() != c.adapter) {
                    adapter = Arc::clone(other);
                }
            }
            _ => {}
        }
        let exact = len == c.len
            && logical == c.logical
            && va == c.va
            && cached == c.cached
            && Arc::ptr_eq(&adapter, &owner);
        let passive = KeGetCurrentIrql() == PASSIVE_LEVEL;
        let before = owner.core().buffer_count();
        let _ = verifier::take_recorded();
        (adapter.DmaOperations.FreeCommonBuffer)(
            &adapter,
            len,
            PHYSICAL_ADDRESS {
                QuadPart: logical as i64,
            },
            va,
            cached,
        );
        let bug_checks = verifier::take_recorded();
        let after = owner.core().buffer_count();
        if exact && passive {
            assert_eq!(after + 1, before, "an exact FreeCommonBuffer freed nothing");
            assert!(
                bug_checks.is_empty(),
                "an exact FreeCommonBuffer: {bug_checks:?}"
            );
            self.cbs.swap_remove(i);
        } else {
            assert_eq!(
                after,
                before,
                "a FreeCommonBuffer that matches no allocation ({}) freed one",
                if passive {
                    "mangled"
                } else {
                    "above PASSIVE_LEVEL"
                }
            );
            assert!(
                !bug_checks.is_empty(),
                "a mismatched FreeCommonBuffer: no bug check"
            );
        }
    }

    fn preset(&mut self, preset: u8) {
        for (bit, width) in [(PRESET_ADAPTER_64, 64), (PRESET_ADAPTER_32, 32)] {
            if preset & bit == 0 {
                continue;
            }
            let d = DEVICE_DESCRIPTION {
                Version: DEVICE_DESCRIPTION_VERSION3,
                Master: true,
                ScatterGather: true,
                DmaAddressWidth: width,
                MaximumLength: 1 << 20,
                ..Default::default()
            };
            let mut map_registers = 0;
            if let Some(a) = IoGetDmaAdapter(self.pdo.as_deref(), &d, &mut map_registers) {
                if preset & PRESET_DOMAINS != 0 {
                    let d = (a.DmaOperations.GetDmaDomain)(&a);
                    if !d.is_null() && !self.domains.contains(&d) {
                        self.domains.push(d);
                    }
                }
                self.adapters.push(a);
            }
        }
        if preset & PRESET_OBJECTS != 0 {
            let memory = Attrs {
                parent: None,
                context: true,
                bad: 0,
            };
            self.run(Op::LookasideCreate {
                attrs: Some(memory),
                memory: Some(memory),
                size: 256,
                pool: 0,
                tag: 1,
            });
            self.run(Op::RequestCreate {
                attrs: Some(memory),
                io_target: false,
            });
        }
    }

    /// A legal driver's teardown before unload.
    fn teardown(&mut self) {
        while KeGetCurrentIrql() > PASSIVE_LEVEL {
            KeLowerIrql(PASSIVE_LEVEL);
        }
        let _ = verifier::take_recorded();
        while !self.cbs.is_empty() {
            let before = self.cbs.len();
            self.free(0, 0);
            if self.cbs.len() == before {
                // Its adapter is gone (put with no buffers cannot be): drop the record.
                self.cbs.swap_remove(0);
            }
        }
        for a in self.adapters.drain(..) {
            assert_eq!(a.core().buffer_count(), 0);
            (a.DmaOperations.PutDmaAdapter)(a);
        }
        for (p, tag) in self.blocks.drain(..) {
            ExFreePoolWithTag(p as *mut c_void, tag);
        }
        for (&h, &n) in &self.refs {
            for _ in 0..n {
                WdfObjectDereference(raw_handle(h));
            }
        }
        self.refs.clear();
        let bc = verifier::take_recorded();
        assert!(bc.is_empty(), "a legal teardown bug-checked: {bc:?}");
    }
}

thread_local! {
    /// Whether a lookaside list's memory objects get our callbacks.
    static LIST_MEMORY_TRACKED: RefCell<HashMap<u64, bool>> = RefCell::new(HashMap::new());
}

thread_local! {
    /// The device and guest RAM behind inputs that ask for hardware: built once, reset
    /// before each input (building them costs more than most inputs: a 64 MiB mapping
    /// faulted in page by page, and the engine's threads).
    static HARDWARE: Arc<InProcessBackend> = Arc::new(
        InProcessBackend::new(InProcessConfig {
            device: DeviceConfig {
                queues: 1,
                domains: 4,
                iotlb_entries: 64,
                ..DeviceConfig::default()
            },
            phys: PhysConfig {
                nodes: 2,
                node_size: 32 << 20,
                huge_pages_per_node: 4,
                ..PhysConfig::default()
            },
        })
        .expect("in-process back end"),
    );
    /// What `HARDWARE`'s guest RAM looks like with nothing allocated.
    static FREE_USAGE: Vec<NodeUsage> = HARDWARE.with(|b| b.phys().usage());
}

/// Any 64-bit value as a handle: handles are plain numbers that the facade checks, but
/// `WDFOBJECT`'s field is private to the driver model.
fn raw_handle(v: u64) -> WDFOBJECT {
    // SAFETY: WDFOBJECT is #[repr(transparent)] over a u64, and every u64 is a value a
    // caller may pass as a handle.
    unsafe { std::mem::transmute::<u64, WDFOBJECT>(v) }
}

fuzz_target!(|input: Input| {
    CALLS.with(|c| c.borrow_mut().clear());
    MEMORY.with(|m| m.borrow_mut().clear());
    LIST_MEMORY_TRACKED.with(|m| m.borrow_mut().clear());
    REENTRY.with(|r| r.set(0));
    let before = verifier::set_mode(VerifierMode::Record);

    let mut driver = DRIVER_OBJECT::new();
    let config = WDF_DRIVER_CONFIG {
        DriverPoolTag: input.pool_tag,
        ..WDF_DRIVER_CONFIG::default()
    };
    let mut handle = WDFDRIVER::NULL;
    let s = WdfDriverCreate(
        &mut driver,
        r"\Registry\Machine\System\CurrentControlSet\Services\domdma_fuzz",
        None,
        &config,
        Some(&mut handle),
    );
    assert!(NT_SUCCESS(s), "WdfDriverCreate: {s:?}");

    let backend = (input.preset & PRESET_HARDWARE != 0).then(|| {
        let b = HARDWARE.with(Arc::clone);
        // Each input starts from a reset device with all of its memory free.
        reset_device(&*b, Duration::from_secs(1)).expect("device reset");
        assert_eq!(
            b.phys().usage(),
            *FREE_USAGE.with(|u| u.clone()),
            "DMA memory still allocated before the driver loaded"
        );
        b
    });
    let mut device = WDFDEVICE::NULL;
    let mut pdo = None;
    if let Some(b) = &backend {
        let shared: SharedBackend = b.clone();
        let mut init = Some(WDFDEVICE_INIT::new(shared));
        let s = WdfDeviceCreate(&mut init, None, Some(&mut device));
        assert!(NT_SUCCESS(s), "WdfDeviceCreate: {s:?}");
        pdo = WdfDeviceWdmGetPhysicalDevice(device);
        assert!(pdo.is_some(), "no PDO for a device with hardware");
    }
    let mut h = Harness {
        driver: handle,
        device,
        pdo,
        made: Vec::new(),
        refs: HashMap::new(),
        blocks: Vec::new(),
        freed: Vec::new(),
        bufs: (0..3)
            .map(|i| vec![0u8; 512 << i].into_boxed_slice())
            .collect(),
        adapters: Vec::new(),
        domains: Vec::new(),
        cbs: Vec::new(),
    };
    h.preset(input.preset);
    for op in input.ops.into_iter().take(400) {
        h.run(op);
    }
    h.teardown();
    let made: Vec<(WDFOBJECT, bool)> = h.made.iter().map(|m| (m.h, m.tracked)).collect();
    h.pdo = None;
    let leaks = driver.unload();
    let bc = verifier::take_recorded();
    assert!(
        leaks.is_empty(),
        "pool leaks at unload after a legal teardown: {leaks:?}"
    );
    assert!(
        bc.is_empty(),
        "bug checks at unload after a legal teardown: {bc:?}"
    );
    for (o, tracked) in made {
        assert!(!object_is_live(o), "{o:?} outlived its driver");
        if tracked {
            let c = calls(o);
            assert_eq!(
                (c.cleanups, c.destroys),
                (1, 1),
                "{o:?}: cleanup and destroy callbacks after unload"
            );
        }
    }
    drop(h);
    if let Some(b) = backend {
        assert_eq!(
            b.phys().usage(),
            *FREE_USAGE.with(|u| u.clone()),
            "DMA memory still allocated after the driver unloaded"
        );
    }
    verifier::set_mode(before);
});
