//! Conformance: the WDF memory calls: lookaside lists, memory objects, preallocated memory.
//!
//! Every scenario loads a driver on the scenario's device, checks the calls' documented
//! results (../shared/DESIGN.md "Behaviour rules", docs/wdf-behaviour-sources.md), moves
//! the memory's data through the device where a driver would (a memory object's bytes
//! copied into a domain common buffer with `WdfMemoryCopyToBuffer`, COPYed by the device,
//! copied back into another memory object with `WdfMemoryCopyFromBuffer`), and unloads the
//! driver with no pool leak. Bug checks (NULL pointers, invalid handles) are not here: they
//! are driver-model/tests/wdf_rules.rs's.

#![allow(non_snake_case)]

use std::cell::RefCell;
use std::ffi::c_void;

use domdma_driver_model::irql::{IrqlGuard, APC_LEVEL, DISPATCH_LEVEL, HIGH_LEVEL};
use domdma_driver_model::pool::{PoolKind, PoolTag, TagStats};
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;
use domdma_driver_model::WDF_DECLARE_CONTEXT_TYPE_WITH_NAME;

use super::prelude::*;
use crate::wdf::{
    common_to_memory, copy_from_slice, copy_to_vec, current_domain, from_lookaside, list_stats,
    lookaside, memory_bytes, memory_to_common, request, with_driver, Driver, Mover,
};

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::WdfMemory,
        name: "object_attributes_contexts_and_driver",
        needs: &[],
        run: object_attributes_contexts_and_driver,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "lookaside_list_create",
        needs: &[],
        run: lookaside_list_create,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "lookaside_memory_attributes_and_parent",
        needs: &[],
        run: lookaside_memory_attributes_and_parent,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "lookaside_deleted_while_memory_out",
        needs: &[],
        run: lookaside_deleted_while_memory_out,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "lookaside_buffers_recycled_and_zeroed",
        needs: &[],
        run: lookaside_buffers_recycled_and_zeroed,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "memory_create_and_get_buffer",
        needs: &[],
        run: memory_create_and_get_buffer,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "memory_copy_bounds",
        needs: &[],
        run: memory_copy_bounds,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "preallocated_over_common_buffers",
        needs: &[],
        run: preallocated_over_common_buffers,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "assign_buffer_moves_the_object",
        needs: &[],
        run: assign_buffer_moves_the_object,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "pool_allocations_and_statistics",
        needs: &[],
        run: pool_allocations_and_statistics,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "delete_parent_deletes_memory_children",
        needs: &[],
        run: delete_parent_deletes_memory_children,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "device_and_driver_objects_cannot_be_deleted",
        needs: &[],
        run: device_and_driver_objects_cannot_be_deleted,
    },
    Scenario {
        area: Area::WdfMemory,
        name: "irql_limits",
        needs: &[],
        run: irql_limits,
    },
];

/// A tag from its four characters (as poolmon prints them).
const fn tag(chars: &[u8; 4]) -> u32 {
    u32::from_le_bytes(*chars)
}

/// The driver's service name is "domdma_conformance": its default tag is "domd".
const DRIVER_TAG: PoolTag = PoolTag::new(b"domd");

/// A handle that is not NULL (the driver's), to see an out-parameter cleared on failure.
fn not_null(drv: &Driver) -> WDFOBJECT {
    drv.handle().into()
}

/// The memory object's buffer address and size (`WdfMemoryGetBuffer`).
fn buffer(m: WDFMEMORY) -> (*mut c_void, usize) {
    let mut size = 0;
    let p = WdfMemoryGetBuffer(m, Some(&mut size));
    (p, size)
}

/// Moves the first `n` bytes of memory object `from` through the device into memory
/// object `to` at offset 0: `WdfMemoryCopyToBuffer` into the mover's source common buffer,
/// a COPY by the device into its destination, `WdfMemoryCopyFromBuffer` from there.
fn through_device(
    mv: &mut Mover<'_>,
    from: WDFMEMORY,
    to: WDFMEMORY,
    n: usize,
    what: &str,
) -> TestResult {
    let s = memory_to_common(from, 0, &mv.src, 0, n);
    check_eq!(
        s,
        STATUS_SUCCESS,
        "{what}: WdfMemoryCopyToBuffer of {n} bytes into the source common buffer"
    );
    mv.copy(n, what)?;
    let s = common_to_memory(to, 0, &mv.dst, 0, n);
    check_eq!(
        s,
        STATUS_SUCCESS,
        "{what}: WdfMemoryCopyFromBuffer of {n} bytes from the destination common buffer"
    );
    Ok(())
}

/// Checks that nothing of `tag` in `kind` pool is outstanding and that every allocation
/// was freed.
fn check_balanced(drv: &Driver, t: PoolTag, kind: PoolKind, what: &str) -> TestResult {
    let st: TagStats = drv.tag_stats(t, kind);
    check!(
        st.outstanding() == 0 && st.bytes == 0,
        "{what}: pool tag '{t}' ({kind:?}) has {} block(s), {} bytes outstanding (allocs {}, \
         frees {}); expected none",
        st.outstanding(),
        st.bytes,
        st.allocs,
        st.frees
    );
    Ok(())
}

thread_local! {
    /// Cleanup callbacks run on this thread (callbacks run on the deleting thread, and
    /// each scenario runs on one thread).
    static CLEANED: RefCell<Vec<WDFOBJECT>> = const { RefCell::new(Vec::new()) };
    /// Destroy callbacks run on this thread.
    static DESTROYED: RefCell<Vec<WDFOBJECT>> = const { RefCell::new(Vec::new()) };
}

fn log_cleanup(o: WDFOBJECT) {
    CLEANED.with(|c| c.borrow_mut().push(o));
}

fn log_destroy(o: WDFOBJECT) {
    DESTROYED.with(|d| d.borrow_mut().push(o));
}

fn take_destroyed() -> Vec<WDFOBJECT> {
    DESTROYED.with(|d| std::mem::take(&mut *d.borrow_mut()))
}

fn take_cleaned() -> Vec<WDFOBJECT> {
    CLEANED.with(|c| std::mem::take(&mut *c.borrow_mut()))
}

/// A memory object's context (the memory attributes of a lookaside list declare it).
#[derive(Default)]
struct MemCtx {
    value: u64,
}
WDF_DECLARE_CONTEXT_TYPE_WITH_NAME!(MemCtx, GetMemCtx);

/// WdfLookasideListCreate: BufferSize 0 is STATUS_INVALID_PARAMETER (handle NULL);
/// attributes of the wrong Size are STATUS_INFO_LENGTH_MISMATCH; a non-paged list with an
/// explicit tag and a paged list with PoolTag 0 (the driver's default tag, "domd" from the
/// service name) allocate nothing at creation and charge their memory to (tag, pool) in
/// the pool statistics; the default parent is the driver, an explicit ParentObject (the
/// device) is honoured; a paged list whose lookaside and memory attributes name two
/// different devices is STATUS_INVALID_PARAMETER, a non-paged one is not. Data unique per
/// page goes from the non-paged list's memory through the device into the paged list's.
fn lookaside_list_create(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const NP_TAG: u32 = tag(b"CfNp");
        const SIZE: usize = 3 * PAGE;
        let mut l = WDFLOOKASIDE(not_null(drv));
        let s = WdfLookasideListCreate(None, 0, NonPagedPool, None, NP_TAG, Some(&mut l));
        check_eq!(
            s,
            STATUS_INVALID_PARAMETER,
            "WdfLookasideListCreate with BufferSize 0"
        );
        check!(
            l.is_null(),
            "BufferSize 0: the handle is {l:?}, expected NULL"
        );
        let bad = WDF_OBJECT_ATTRIBUTES {
            Size: WDF_OBJECT_ATTRIBUTES_SIZE - 8,
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        for (la, ma) in [(Some(&bad), None), (None, Some(&bad))] {
            let s = WdfLookasideListCreate(la, 64, NonPagedPool, ma, NP_TAG, Some(&mut l));
            check_eq!(
                s,
                STATUS_INFO_LENGTH_MISMATCH,
                "WdfLookasideListCreate with {} attributes of Size {}",
                if la.is_some() { "lookaside" } else { "memory" },
                bad.Size
            );
        }

        check_eq!(
            drv.tag(),
            DRIVER_TAG,
            "the driver's default tag (service domdma_conformance)"
        );
        let np = lookaside(SIZE, NonPagedPool, NP_TAG, (None, None))?;
        let pg = lookaside(SIZE, PagedPool, 0, (None, None))?;
        for (what, t, kind, l) in [
            ("non-paged list", PoolTag(NP_TAG), PoolKind::NonPaged, np),
            ("paged list, PoolTag 0", DRIVER_TAG, PoolKind::Paged, pg),
        ] {
            check_eq!(
                drv.tag_stats(t, kind).allocs,
                0,
                "{what}: pool allocations of '{t}' at creation"
            );
            check_eq!(
                list_stats(l)?,
                domdma_driver_model::lookaside::LookasideStats::default(),
                "{what}: counters at creation"
            );
            check_eq!(object_parent(l), not_null(drv), "{what}: default parent");
        }
        let dev_attrs = WDF_OBJECT_ATTRIBUTES {
            ParentObject: drv.device.into(),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let on_dev = lookaside(64, NonPagedPool, NP_TAG, (Some(&dev_attrs), None))?;
        check_eq!(
            object_parent(on_dev),
            WDFOBJECT::from(drv.device),
            "parent of a list created with ParentObject = the device"
        );

        let mnp = from_lookaside(np)?;
        let mpg = from_lookaside(pg)?;
        for (what, t, kind, other) in [
            (
                "non-paged",
                PoolTag(NP_TAG),
                PoolKind::NonPaged,
                PoolKind::Paged,
            ),
            ("paged", DRIVER_TAG, PoolKind::Paged, PoolKind::NonPaged),
        ] {
            let st = drv.tag_stats(t, kind);
            check!(
                st.allocs == 1 && st.bytes == SIZE as u64,
                "{what} list's first memory: pool '{t}' ({kind:?}) allocs {} bytes {}, \
                 expected 1 block of {SIZE}",
                st.allocs,
                st.bytes
            );
            check_eq!(
                drv.tag_stats(t, other).allocs,
                0,
                "{what} list's memory charged to the {other:?} pool"
            );
        }
        let data = ctx.rng().unique(SIZE);
        check_eq!(
            copy_from_slice(mnp, 0, &data),
            STATUS_SUCCESS,
            "WdfMemoryCopyFromBuffer into the non-paged list's memory"
        );
        let mut mv = Mover::new(drv, dev, SIZE as u32)?;
        through_device(
            &mut mv,
            mnp,
            mpg,
            SIZE,
            "non-paged list memory -> paged list memory",
        )?;
        check_bytes(
            &memory_bytes(mpg),
            &data,
            "paged list memory after the device copy",
        )?;
        mv.close()?;

        // Paged lists: the two attribute sets' devices must be one (no such rule for
        // non-paged lists).
        let mut init = Some(WDFDEVICE_INIT::without_hardware());
        let mut dev2 = WDFDEVICE::NULL;
        let s = WdfDeviceCreate(&mut init, WDF_NO_OBJECT_ATTRIBUTES, Some(&mut dev2));
        check_eq!(s, STATUS_SUCCESS, "WdfDeviceCreate of a second device");
        let dev2_attrs = WDF_OBJECT_ATTRIBUTES {
            ParentObject: dev2.into(),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let mut two = WDFLOOKASIDE(not_null(drv));
        let s = WdfLookasideListCreate(
            Some(&dev_attrs),
            64,
            PagedPool,
            Some(&dev2_attrs),
            NP_TAG,
            Some(&mut two),
        );
        check_eq!(
            s,
            STATUS_INVALID_PARAMETER,
            "paged WdfLookasideListCreate with two different parent devices"
        );
        check!(two.is_null(), "refused list: handle {two:?}, expected NULL");
        let same = lookaside(64, PagedPool, NP_TAG, (Some(&dev_attrs), Some(&dev_attrs)))?;
        let mixed = lookaside(
            64,
            NonPagedPool,
            NP_TAG,
            (Some(&dev_attrs), Some(&dev2_attrs)),
        )?;

        for o in [
            WDFOBJECT::from(mnp),
            mpg.into(),
            np.into(),
            pg.into(),
            on_dev.into(),
            same.into(),
            mixed.into(),
        ] {
            WdfObjectDelete(o);
        }
        check_balanced(
            drv,
            PoolTag(NP_TAG),
            PoolKind::NonPaged,
            "after deleting the lists",
        )?;
        check_balanced(drv, DRIVER_TAG, PoolKind::Paged, "after deleting the lists")
    })
}

/// WdfMemoryCreateFromLookaside: the memory objects get the memory attributes given at
/// list creation (context type, cleanup callback); their parent is those attributes'
/// ParentObject (a request), else the driver, never the list; deleting that parent deletes
/// them (cleanup ran for each) and returns their buffers to the list (TotalFrees, depth); a
/// returned buffer serves the next allocation without a pool allocation. Each buffer
/// carries data unique per page through the device before.
fn lookaside_memory_attributes_and_parent(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const SIZE: usize = 2 * PAGE + 512;
        const TAG_A: u32 = tag(b"CfMa");
        const TAG_B: u32 = tag(b"CfMb");
        let req = request(None)?;
        let mut attrs = WDF_OBJECT_ATTRIBUTES::init_context_type::<MemCtx>();
        attrs.EvtCleanupCallback = Some(log_cleanup);
        attrs.ParentObject = req.into();
        let la = lookaside(SIZE, NonPagedPool, TAG_A, (None, Some(&attrs)))?;
        let lb = lookaside(SIZE, NonPagedPool, TAG_B, (None, None))?;
        let m1 = from_lookaside(la)?;
        let m2 = from_lookaside(la)?;
        let m3 = from_lookaside(lb)?;
        for (i, m) in [m1, m2].into_iter().enumerate() {
            check_eq!(
                object_parent(m),
                WDFOBJECT::from(req),
                "parent of memory from a list whose memory attributes name a request"
            );
            let c = GetMemCtx(m);
            check!(
                !c.is_null(),
                "memory {i} from the list has no MemCtx context; expected the memory \
                 attributes' context type"
            );
            // SAFETY: the context lives as long as the memory object; nothing else uses it.
            unsafe { (*c).value = 0x1000 + i as u64 };
        }
        check_eq!(
            object_parent(m3),
            not_null(drv),
            "parent of memory from a list without memory attributes"
        );
        check!(
            object_parent(m3) != WDFOBJECT::from(lb),
            "the list is the memory's parent; expected the driver"
        );
        check!(
            GetMemCtx(m3).is_null(),
            "memory from a list without memory attributes has a MemCtx context"
        );

        let mut mv = Mover::new(drv, dev, SIZE as u32)?;
        let data = ctx.rng().unique(SIZE);
        check_eq!(
            copy_from_slice(m1, 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer into m1"
        );
        through_device(&mut mv, m1, m2, SIZE, "m1 -> m2")?;
        through_device(&mut mv, m2, m3, SIZE, "m2 -> m3")?;
        check_bytes(&memory_bytes(m2), &data, "m2 after the device copy")?;
        check_bytes(&memory_bytes(m3), &data, "m3 after the device copy")?;
        let (c1, c2) = (GetMemCtx(m1), GetMemCtx(m2));
        // SAFETY: the contexts live until the objects are deleted, below.
        let v1 = unsafe { (*c1).value };
        // SAFETY: as above.
        let v2 = unsafe { (*c2).value };
        check_eq!((v1, v2), (0x1000, 0x1001), "the memory objects' contexts");

        take_cleaned();
        WdfObjectDelete(req);
        let cleaned = take_cleaned();
        for (name, m) in [("m1", m1), ("m2", m2)] {
            check!(
                cleaned.contains(&m.into()),
                "deleting the parent request: {name}'s cleanup callback (from the memory \
                 attributes) did not run; ran for {cleaned:?}"
            );
            check!(
                !object_is_live(m),
                "{name} is live after its parent was deleted"
            );
        }
        let st = list_stats(la)?;
        check_eq!(
            (st.total_allocates, st.total_frees, st.depth),
            (2, 2, 2),
            "list counters (allocates, frees, depth) after deleting the parent"
        );
        check!(
            object_is_live(m3),
            "m3 (parent: the driver) went with the request"
        );

        let (p3, _) = buffer(m3);
        WdfObjectDelete(m3);
        let m4 = from_lookaside(lb)?;
        check_eq!(
            buffer(m4).0,
            p3,
            "the buffer returned by m3 serves the next allocation"
        );
        let st = list_stats(lb)?;
        check_eq!(
            (st.total_allocates, st.allocate_misses),
            (2, 1),
            "(allocates, misses) of the list after recycling"
        );
        check_eq!(
            drv.tag_stats(PoolTag(TAG_B), PoolKind::NonPaged).allocs,
            1,
            "pool allocations of the recycling list"
        );
        mv.close()?;
        WdfObjectDelete(m4);
        WdfObjectDelete(la);
        WdfObjectDelete(lb);
        check_balanced(drv, PoolTag(TAG_A), PoolKind::NonPaged, "list A deleted")?;
        check_balanced(drv, PoolTag(TAG_B), PoolKind::NonPaged, "list B deleted")
    })
}

/// A memory object holds a reference on its lookaside list: deleting the list while
/// memory is out leaves the list object alive and its buffers usable (the device moves
/// data unique per page into and out of them), for a small non-paged and a multi-page
/// paged list; the list goes, and its pool blocks with it, when its last memory object is
/// deleted; the lists' pool statistics balance and unload finds no leak.
fn lookaside_deleted_while_memory_out(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        let mut mv = Mover::new(drv, dev, (4 * PAGE) as u32)?;
        for (size, pool, t, kind) in [
            (512, NonPagedPool, tag(b"CfDn"), PoolKind::NonPaged),
            (4 * PAGE, PagedPool, tag(b"CfDp"), PoolKind::Paged),
        ] {
            let what = format!("{size}-byte {kind:?} list");
            let l = lookaside(size, pool, t, (None, None))?;
            let m1 = from_lookaside(l)?;
            let m2 = from_lookaside(l)?;
            WdfObjectDelete(l);
            check!(
                object_is_live(l),
                "{what}: the list object is gone while two memory objects are out"
            );
            let data = ctx.rng().unique(size);
            check_eq!(
                copy_from_slice(m1, 0, &data),
                STATUS_SUCCESS,
                "{what}: CopyFromBuffer into memory of the deleted list"
            );
            through_device(&mut mv, m1, m2, size, &what)?;
            check_bytes(
                &memory_bytes(m2),
                &data,
                format!("{what}: second memory object"),
            )?;
            check_eq!(
                drv.tag_stats(PoolTag(t), kind).outstanding(),
                2,
                "{what}: pool blocks outstanding with two memory objects out"
            );
            WdfObjectDelete(m1);
            check!(
                object_is_live(l),
                "{what}: the list went with the first memory object"
            );
            WdfObjectDelete(m2);
            check!(
                !object_is_live(l),
                "{what}: the list object is live after its last memory object was deleted"
            );
            let st = drv.tag_stats(PoolTag(t), kind);
            check_eq!(
                (st.allocs, st.frees),
                (2, 2),
                "{what}: pool (allocs, frees) once the list is gone"
            );
            check_balanced(drv, PoolTag(t), kind, &what)?;
        }
        mv.close()
    })
}

/// Lookaside buffers are recycled: a deleted memory object's buffer goes back to the list
/// (TotalFrees, depth) and serves the next allocation without a pool allocation
/// (AllocateMisses unchanged); buffers smaller than a page, non-paged and paged, are zeroed
/// on every allocation, also after the device wrote data into them; page-sized and larger
/// buffers are not; WdfMemoryGetBuffer reports the size given at list creation.
fn lookaside_buffers_recycled_and_zeroed(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        let mut mv = Mover::new(drv, dev, (2 * PAGE) as u32)?;
        let t = tag(b"CfRz");
        for (size, pool, kind, zeroed) in [
            (100, NonPagedPool, PoolKind::NonPaged, true),
            (100, PagedPool, PoolKind::Paged, true),
            (PAGE - 1, NonPagedPool, PoolKind::NonPaged, true),
            (PAGE, NonPagedPool, PoolKind::NonPaged, false),
            (2 * PAGE, PagedPool, PoolKind::Paged, false),
        ] {
            let what = format!("{size}-byte {kind:?} list");
            let l = lookaside(size, pool, t, (None, None))?;
            let m = from_lookaside(l)?;
            let (p, got) = buffer(m);
            check_eq!(got, size, "{what}: WdfMemoryGetBuffer size");
            if zeroed {
                check_all(&memory_bytes(m), 0, format!("{what}: fresh buffer"))?;
            }
            // The device writes the buffer.
            let data = ctx.rng().unique(size);
            mv.src.write(0, &data);
            mv.copy(size, &what)?;
            check_eq!(
                common_to_memory(m, 0, &mv.dst, 0, size),
                STATUS_SUCCESS,
                "{what}: CopyFromBuffer from the destination common buffer"
            );
            check_bytes(
                &memory_bytes(m),
                &data,
                format!("{what}: memory after the DMA"),
            )?;
            WdfObjectDelete(m);
            let st = list_stats(l)?;
            check_eq!(
                (
                    st.total_allocates,
                    st.allocate_misses,
                    st.total_frees,
                    st.depth
                ),
                (1, 1, 1, 1),
                "{what}: (allocates, misses, frees, depth) after one allocate and delete"
            );
            let again = from_lookaside(l)?;
            check_eq!(
                buffer(again).0,
                p,
                "{what}: the returned buffer serves the next allocation"
            );
            let st = list_stats(l)?;
            check_eq!(
                (st.total_allocates, st.allocate_misses),
                (2, 1),
                "{what}: (allocates, misses) after the recycled allocation"
            );
            if zeroed {
                check_all(&memory_bytes(again), 0, format!("{what}: recycled buffer"))?;
            } else {
                check_bytes(
                    &memory_bytes(again),
                    &data,
                    format!("{what}: recycled buffer (not zeroed)"),
                )?;
            }
            WdfObjectDelete(again);
            WdfObjectDelete(l);
            check_balanced(drv, PoolTag(t), kind, &what)?;
        }
        mv.close()
    })
}

/// WdfMemoryCreate: BufferSize 0 is STATUS_INVALID_PARAMETER; PoolTag 0 charges the
/// driver's tag, an explicit tag its own, in the pool asked for; the Buffer out-parameter
/// is what WdfMemoryGetBuffer returns, with the size asked (not rounded); the memory
/// carries data unique per page through the device; deleting it frees its pool block, and
/// so does deleting its parent (a request).
fn memory_create_and_get_buffer(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const SIZE: usize = 12345;
        const T: u32 = tag(b"CfMc");
        let mut m = WDFMEMORY::NULL;
        let s = WdfMemoryCreate(None, NonPagedPool, T, 0, Some(&mut m), None);
        check_eq!(s, STATUS_INVALID_PARAMETER, "WdfMemoryCreate of 0 bytes");
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::NonPaged).allocs,
            0,
            "pool allocations of a refused WdfMemoryCreate"
        );

        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut m1 = WDFMEMORY::NULL;
        let s = WdfMemoryCreate(None, PagedPool, 0, SIZE, Some(&mut m1), Some(&mut buf));
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryCreate(PagedPool, PoolTag 0, {SIZE})"
        );
        check!(!buf.is_null(), "WdfMemoryCreate: NULL Buffer out-parameter");
        check_eq!(
            buffer(m1),
            (buf, SIZE),
            "WdfMemoryGetBuffer (address, size) vs WdfMemoryCreate's Buffer"
        );
        let st = drv.tag_stats(DRIVER_TAG, PoolKind::Paged);
        check_eq!(
            (st.allocs, st.bytes),
            (1, SIZE as u64),
            "pool '{DRIVER_TAG}' (Paged) (allocs, bytes) for PoolTag 0"
        );

        let req = request(None)?;
        let attrs = WDF_OBJECT_ATTRIBUTES {
            ParentObject: req.into(),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let mut m2 = WDFMEMORY::NULL;
        let s = WdfMemoryCreate(Some(&attrs), NonPagedPool, T, SIZE, Some(&mut m2), None);
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryCreate(NonPagedPool, '{}', {SIZE})",
            PoolTag(T)
        );
        check_eq!(object_parent(m2), WDFOBJECT::from(req), "memory parent");
        check_eq!(buffer(m2).1, SIZE, "WdfMemoryGetBuffer size");
        let st = drv.tag_stats(PoolTag(T), PoolKind::NonPaged);
        check_eq!(
            (st.allocs, st.bytes),
            (1, SIZE as u64),
            "pool '{}' (allocs, bytes)",
            PoolTag(T)
        );
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::Paged).allocs,
            0,
            "a non-paged WdfMemoryCreate charged to the paged pool"
        );

        let data = ctx.rng().unique(SIZE);
        check_eq!(
            copy_from_slice(m1, 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer into m1"
        );
        let mut mv = Mover::new(drv, dev, SIZE as u32)?;
        through_device(&mut mv, m1, m2, SIZE, "WdfMemoryCreate memory -> memory")?;
        check_bytes(&memory_bytes(m2), &data, "m2 after the device copy")?;
        mv.close()?;

        WdfObjectDelete(m1);
        check_balanced(drv, DRIVER_TAG, PoolKind::Paged, "m1 deleted")?;
        WdfObjectDelete(req);
        check!(
            !object_is_live(m2),
            "m2 is live after its parent request was deleted"
        );
        check_balanced(drv, PoolTag(T), PoolKind::NonPaged, "m2's parent deleted")
    })
}

/// WdfMemoryCopyToBuffer / WdfMemoryCopyFromBuffer: 0 bytes is STATUS_INVALID_PARAMETER;
/// a range past the memory's end (too long, starting inside, at or past the end) is
/// STATUS_BUFFER_TOO_SMALL to a buffer and STATUS_INVALID_BUFFER_SIZE from one, and a
/// refused copy moves no byte; ranges ending exactly at the end succeed: a part at an
/// offset of one memory object goes through the device and lands at an offset of another.
fn memory_copy_bounds(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const SIZE: usize = 4 * PAGE;
        const T: u32 = tag(b"CfCb");
        let create = || -> Result<WDFMEMORY, Failure> {
            let mut m = WDFMEMORY::NULL;
            let s = WdfMemoryCreate(None, NonPagedPool, T, SIZE, Some(&mut m), None);
            check_eq!(s, STATUS_SUCCESS, "WdfMemoryCreate({SIZE})");
            Ok(m)
        };
        let (a, b) = (create()?, create()?);
        let data = ctx.rng().unique(SIZE);
        check_eq!(
            copy_from_slice(a, 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer of all of a"
        );
        const B_FILL: u8 = 0x11;
        check_eq!(
            copy_from_slice(b, 0, &[B_FILL; SIZE]),
            STATUS_SUCCESS,
            "CopyFromBuffer of all of b"
        );
        let mut mv = Mover::new(drv, dev, (SIZE + 2 * PAGE) as u32)?;
        const CB_FILL: u8 = 0xee;
        mv.src.write(0, &[CB_FILL; SIZE + 2 * PAGE]);

        check_eq!(
            memory_to_common(a, 0, &mv.src, 0, 0),
            STATUS_INVALID_PARAMETER,
            "CopyToBuffer of 0 bytes"
        );
        check_eq!(
            common_to_memory(a, 0, &mv.src, 0, 0),
            STATUS_INVALID_PARAMETER,
            "CopyFromBuffer of 0 bytes"
        );
        let past = [
            (0, SIZE + 1, "one byte too long"),
            (2 * PAGE, 2 * PAGE + 1, "from the middle, one byte too long"),
            (SIZE, 1, "at the end"),
            (SIZE + PAGE, 1, "past the end"),
        ];
        for (off, n, what) in past {
            check_eq!(
                memory_to_common(a, off, &mv.src, 0, n),
                STATUS_BUFFER_TOO_SMALL,
                "CopyToBuffer {what} (offset {off:#x}, {n:#x} bytes of {SIZE:#x})"
            );
            check_eq!(
                common_to_memory(b, off, &mv.src, 0, n),
                STATUS_INVALID_BUFFER_SIZE,
                "CopyFromBuffer {what} (offset {off:#x}, {n:#x} bytes of {SIZE:#x})"
            );
        }
        check_all(
            &mv.src.read(0, SIZE + 2 * PAGE),
            CB_FILL,
            "common buffer after refused CopyToBuffer calls",
        )?;
        check_all(
            &memory_bytes(b),
            B_FILL,
            "memory after refused CopyFromBuffer calls",
        )?;

        // Ranges that end exactly at the end: a[off..] through the device to b[SIZE - n..].
        let off = PAGE + 100;
        let n = SIZE - off;
        check_eq!(
            memory_to_common(a, off, &mv.src, 0, n),
            STATUS_SUCCESS,
            "CopyToBuffer of a[{off:#x}..{SIZE:#x}]"
        );
        mv.copy(n, "a's tail")?;
        let at = SIZE - n;
        check_eq!(
            common_to_memory(b, at, &mv.dst, 0, n),
            STATUS_SUCCESS,
            "CopyFromBuffer to b[{at:#x}..{SIZE:#x}]"
        );
        let got = memory_bytes(b);
        check_all(&got[..at], B_FILL, "b before the copied range")?;
        check_bytes(&got[at..], &data[off..], "b's tail after the device copy")?;
        let (s, whole) = copy_to_vec(b, 0, SIZE);
        check_eq!(s, STATUS_SUCCESS, "CopyToBuffer of all of b");
        check_bytes(&whole, &got, "CopyToBuffer of all of b vs its buffer")?;
        mv.close()?;
        WdfObjectDelete(a);
        WdfObjectDelete(b);
        check_balanced(drv, PoolTag(T), PoolKind::NonPaged, "a and b deleted")
    })
}

/// WdfMemoryCreatePreallocated: BufferSize 0 is STATUS_INVALID_PARAMETER (handle NULL);
/// memory objects over a driver's two common buffers describe them (WdfMemoryGetBuffer is
/// the virtual address and size): CopyFromBuffer into the source's object is what the
/// device reads, CopyToBuffer from the destination's returns what it wrote. Deleting the
/// objects (one through its parent request) never frees the buffers: the device copies
/// through them again and FreeCommonBuffer of each succeeds. Over an ExAllocatePoolWithTag
/// block the same: the block stays allocated until the driver frees it.
fn preallocated_over_common_buffers(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const LEN: usize = 3 * PAGE;
        const T: u32 = tag(b"CfPa");
        let mut mv = Mover::new(drv, dev, LEN as u32)?;
        let mut m = WDFMEMORY(not_null(drv));
        // SAFETY: size 0: nothing is accessed.
        let s = unsafe { WdfMemoryCreatePreallocated(None, mv.src.va, 0, Some(&mut m)) };
        check_eq!(
            s,
            STATUS_INVALID_PARAMETER,
            "WdfMemoryCreatePreallocated of 0 bytes"
        );
        check!(
            m.is_null(),
            "refused preallocated memory: handle {m:?}, expected NULL"
        );

        let req = request(None)?;
        let attrs = WDF_OBJECT_ATTRIBUTES {
            ParentObject: req.into(),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let (mut ms, mut md) = (WDFMEMORY::NULL, WDFMEMORY::NULL);
        // SAFETY: the source common buffer is live until `mv.close()`, after the object is
        // deleted.
        let s = unsafe { WdfMemoryCreatePreallocated(None, mv.src.va, LEN, Some(&mut ms)) };
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryCreatePreallocated over the source buffer"
        );
        // SAFETY: as above, for the destination (its object goes with the request).
        let s = unsafe { WdfMemoryCreatePreallocated(Some(&attrs), mv.dst.va, LEN, Some(&mut md)) };
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryCreatePreallocated over the destination"
        );
        check_eq!(
            buffer(ms),
            (mv.src.va, LEN),
            "WdfMemoryGetBuffer of the source object"
        );
        check_eq!(
            buffer(md),
            (mv.dst.va, LEN),
            "WdfMemoryGetBuffer of the destination object"
        );

        let data = ctx.rng().unique(LEN);
        check_eq!(
            copy_from_slice(ms, 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer into ms"
        );
        check_bytes(
            &mv.src.read(0, LEN),
            &data,
            "source buffer written through its object",
        )?;
        mv.copy(LEN, "source -> destination")?;
        let (s, got) = copy_to_vec(md, 0, LEN);
        check_eq!(s, STATUS_SUCCESS, "CopyToBuffer from md");
        check_bytes(&got, &data, "destination read through its object")?;

        let dom = current_domain(&mv.adapter)?;
        let before = dom.buffer_count();
        WdfObjectDelete(ms);
        WdfObjectDelete(req);
        check!(
            !object_is_live(md),
            "md is live after its parent request was deleted"
        );
        check_eq!(
            dom.buffer_count(),
            before,
            "common buffers after deleting the objects"
        );
        let data2 = ctx.rng().unique(LEN);
        mv.src.write(0, &data2);
        mv.copy(LEN, "after the objects were deleted")?;
        check_bytes(
            &mv.dst.read(0, LEN),
            &data2,
            "destination after the objects went",
        )?;

        // A pool block: never freed by the framework either, also not when the object's
        // parent is deleted.
        let p = ExAllocatePoolWithTag(NonPagedPool, PAGE, T);
        check!(!p.is_null(), "ExAllocatePoolWithTag({PAGE}) returned NULL");
        let req2 = request(None)?;
        let attrs2 = WDF_OBJECT_ATTRIBUTES {
            ParentObject: req2.into(),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let mut mp = WDFMEMORY::NULL;
        // SAFETY: `p` is a live PAGE-byte pool block, freed below after the object is gone.
        let s = unsafe { WdfMemoryCreatePreallocated(Some(&attrs2), p, PAGE, Some(&mut mp)) };
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryCreatePreallocated over a pool block"
        );
        check_eq!(
            common_to_memory(mp, 0, &mv.dst, PAGE, PAGE),
            STATUS_SUCCESS,
            "CopyFromBuffer of the device's data into the pool block's object"
        );
        // SAFETY: `p` is live and PAGE bytes long.
        let raw = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), PAGE) }.to_vec();
        check_bytes(
            &raw,
            &data2[PAGE..2 * PAGE],
            "pool block read through its pointer",
        )?;
        WdfObjectDelete(req2);
        check!(
            !object_is_live(mp),
            "the pool block's object is live after its parent request was deleted"
        );
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::NonPaged).outstanding(),
            1,
            "pool blocks of '{}' after deleting the preallocated object's parent",
            PoolTag(T)
        );
        ExFreePoolWithTag(p, T);
        check_balanced(
            drv,
            PoolTag(T),
            PoolKind::NonPaged,
            "the driver freed its block",
        )?;
        // Frees both buffers exactly as allocated: they were never freed by the framework.
        mv.close()
    })
}

/// WdfMemoryAssignBuffer: size 0 is STATUS_INVALID_PARAMETER and leaves the object on its
/// buffer; an assignment makes WdfMemoryGetBuffer and the copy functions use the new buffer
/// and size (a copy past the new size is refused, one past the old size but inside the
/// new one succeeds) and frees neither buffer (pool statistics), also not when the object
/// is deleted. An object moved from the device path's source to its destination carries
/// data unique per page through the device.
fn assign_buffer_moves_the_object(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const T: u32 = tag(b"CfAb");
        const LEN: usize = 2 * PAGE;
        let a = ExAllocatePoolWithTag(NonPagedPool, 64, T);
        let b = ExAllocatePoolWithTag(NonPagedPool, 128, T);
        check!(
            !a.is_null() && !b.is_null(),
            "ExAllocatePoolWithTag returned NULL"
        );
        let mut m = WDFMEMORY::NULL;
        // SAFETY: `a` and `b` are live pool blocks of 64 and 128 bytes, freed below after
        // the object is deleted.
        let s = unsafe { WdfMemoryCreatePreallocated(None, a, 64, Some(&mut m)) };
        check_eq!(s, STATUS_SUCCESS, "WdfMemoryCreatePreallocated(64)");
        // SAFETY: as above.
        let s = unsafe { WdfMemoryAssignBuffer(m, b, 0) };
        check_eq!(
            s,
            STATUS_INVALID_PARAMETER,
            "WdfMemoryAssignBuffer of 0 bytes"
        );
        check_eq!(buffer(m), (a, 64), "the object after a refused assignment");
        // SAFETY: as above.
        let s = unsafe { WdfMemoryAssignBuffer(m, b, 128) };
        check_eq!(s, STATUS_SUCCESS, "WdfMemoryAssignBuffer(128)");
        check_eq!(buffer(m), (b, 128), "the object after the assignment");
        check_eq!(
            copy_from_slice(m, 64, &[0x42; 64]),
            STATUS_SUCCESS,
            "CopyFromBuffer past the old size, inside the new one"
        );
        check_eq!(
            copy_from_slice(m, 128, &[0x42; 1]),
            STATUS_INVALID_BUFFER_SIZE,
            "CopyFromBuffer at the new size"
        );
        // SAFETY: `b` is live and 128 bytes long.
        let tail =
            unsafe { std::slice::from_raw_parts(b.cast::<u8>().wrapping_add(64), 64) }.to_vec();
        check_all(
            &tail,
            0x42,
            "the new buffer's second half written through the object",
        )?;
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::NonPaged).outstanding(),
            2,
            "pool blocks after the assignment (the old one is not freed)"
        );

        let mut mv = Mover::new(drv, dev, LEN as u32)?;
        // SAFETY: the common buffers are live until `mv.close()`, after the object is
        // deleted; the object is moved off the source before the device writes anything.
        let s = unsafe { WdfMemoryAssignBuffer(m, mv.src.va, LEN) };
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryAssignBuffer(source common buffer)"
        );
        let data = ctx.rng().unique(LEN);
        check_eq!(
            copy_from_slice(m, 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer into the source"
        );
        mv.copy(LEN, "source -> destination")?;
        // SAFETY: as above.
        let s = unsafe { WdfMemoryAssignBuffer(m, mv.dst.va, LEN) };
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryAssignBuffer(destination common buffer)"
        );
        let (s, got) = copy_to_vec(m, 0, LEN);
        check_eq!(
            s,
            STATUS_SUCCESS,
            "CopyToBuffer from the destination's object"
        );
        check_bytes(
            &got,
            &data,
            "destination read through the reassigned object",
        )?;
        WdfObjectDelete(m);
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::NonPaged).outstanding(),
            2,
            "pool blocks after deleting the object (it frees neither)"
        );
        ExFreePoolWithTag(a, T);
        ExFreePoolWithTag(b, T);
        check_balanced(drv, PoolTag(T), PoolKind::NonPaged, "both blocks freed")?;
        mv.close()
    })
}

/// ExAllocatePoolWithTag / ExFreePoolWithTag: each allocation and free is counted per tag
/// and pool (allocs, frees, bytes in use, peak), paged and non-paged apart; blocks of a
/// page or more are page aligned, smaller ones 16-byte aligned; pool memory is the driver's
/// staging memory: data unique per page written into one block goes through the device into
/// another. Everything freed, the statistics balance and unload finds no leak.
fn pool_allocations_and_statistics(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const T: u32 = tag(b"CfPl");
        const LEN: usize = 2 * PAGE;
        let np1 = ExAllocatePoolWithTag(NonPagedPool, LEN, T);
        let np2 = ExAllocatePoolWithTag(NonPagedPoolNx, LEN, T);
        let pg = ExAllocatePoolWithTag(PagedPool, 1000, T);
        check!(
            !np1.is_null() && !np2.is_null() && !pg.is_null(),
            "ExAllocatePoolWithTag returned NULL ({np1:?}, {np2:?}, {pg:?})"
        );
        for (what, p, align) in [("np1", np1, PAGE), ("np2", np2, PAGE), ("pg", pg, 16)] {
            check!(
                p as usize % align == 0,
                "{what} at {p:?} is not {align}-byte aligned"
            );
        }
        let np = |st: TagStats| (st.allocs, st.frees, st.bytes, st.peak_bytes);
        check_eq!(
            np(drv.tag_stats(PoolTag(T), PoolKind::NonPaged)),
            (2, 0, 2 * LEN as u64, 2 * LEN as u64),
            "non-paged (allocs, frees, bytes, peak) of '{}'",
            PoolTag(T)
        );
        check_eq!(
            np(drv.tag_stats(PoolTag(T), PoolKind::Paged)),
            (1, 0, 1000, 1000),
            "paged (allocs, frees, bytes, peak) of '{}'",
            PoolTag(T)
        );

        let data = ctx.rng().unique(LEN);
        // SAFETY: `np1` is a live LEN-byte block; `data` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), np1.cast::<u8>(), LEN) };
        let mut mv = Mover::new(drv, dev, LEN as u32)?;
        // SAFETY: as above.
        let staged = unsafe { std::slice::from_raw_parts(np1.cast::<u8>(), LEN) }.to_vec();
        mv.src.write(0, &staged);
        mv.copy(LEN, "pool block -> pool block")?;
        let out = mv.dst.read(0, LEN);
        // SAFETY: `np2` is a live LEN-byte block; `out` is another allocation.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), np2.cast::<u8>(), LEN) };
        // SAFETY: as above.
        let got = unsafe { std::slice::from_raw_parts(np2.cast::<u8>(), LEN) }.to_vec();
        check_bytes(&got, &data, "second pool block after the device copy")?;
        mv.close()?;

        ExFreePoolWithTag(np1, T);
        check_eq!(
            np(drv.tag_stats(PoolTag(T), PoolKind::NonPaged)),
            (2, 1, LEN as u64, 2 * LEN as u64),
            "non-paged (allocs, frees, bytes, peak) after one free"
        );
        ExFreePoolWithTag(np2, T);
        ExFreePoolWithTag(pg, T);
        check_balanced(drv, PoolTag(T), PoolKind::NonPaged, "all freed")?;
        check_balanced(drv, PoolTag(T), PoolKind::Paged, "all freed")
    })
}

/// WdfObjectDelete of a parent deletes its memory children of every kind, each child's
/// cleanup callback before the parent's: pool memory frees its block, lookaside memory
/// returns its buffer to the list, preallocated memory leaves the caller's buffer (a
/// common buffer the device keeps using) alone; unreferenced children are destroyed at the
/// delete, while a child and the parent referenced with WdfObjectReference outlive it
/// (destroy callbacks not yet run, the child's data still readable), each until its
/// WdfObjectDereference.
fn delete_parent_deletes_memory_children(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const T: u32 = tag(b"CfDc");
        const LEN: usize = 2 * PAGE;
        let parent_attrs = WDF_OBJECT_ATTRIBUTES {
            EvtCleanupCallback: Some(log_cleanup),
            EvtDestroyCallback: Some(log_destroy),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let req = request(Some(&parent_attrs))?;
        let attrs = WDF_OBJECT_ATTRIBUTES {
            ParentObject: req.into(),
            EvtCleanupCallback: Some(log_cleanup),
            EvtDestroyCallback: Some(log_destroy),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let mut mp = WDFMEMORY::NULL;
        let s = WdfMemoryCreate(Some(&attrs), NonPagedPool, T, LEN, Some(&mut mp), None);
        check_eq!(s, STATUS_SUCCESS, "WdfMemoryCreate under the request");
        let l = lookaside(LEN, NonPagedPool, T, (None, Some(&attrs)))?;
        let ml = from_lookaside(l)?;
        let mut mv = Mover::new(drv, dev, LEN as u32)?;
        let mut mpre = WDFMEMORY::NULL;
        // SAFETY: the source common buffer lives until `mv.close()`, after the object is
        // deleted.
        let s =
            unsafe { WdfMemoryCreatePreallocated(Some(&attrs), mv.src.va, LEN, Some(&mut mpre)) };
        check_eq!(
            s,
            STATUS_SUCCESS,
            "WdfMemoryCreatePreallocated under the request"
        );

        let data = ctx.rng().unique(LEN);
        check_eq!(
            copy_from_slice(mp, 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer into mp"
        );
        through_device(&mut mv, mp, ml, LEN, "pool memory -> lookaside memory")?;
        check_bytes(
            &memory_bytes(ml),
            &data,
            "lookaside memory after the device copy",
        )?;

        WdfObjectReference(mp);
        WdfObjectReference(req);
        take_cleaned();
        take_destroyed();
        WdfObjectDelete(req);
        let cleaned = take_cleaned();
        let want = [WDFOBJECT::from(mp), ml.into(), mpre.into()];
        check!(
            cleaned.len() == 4
                && cleaned[3] == WDFOBJECT::from(req)
                && want.iter().all(|c| cleaned[..3].contains(c)),
            "cleanup callbacks ran for {cleaned:?}; expected the three children {want:?} \
             (in any order), then the parent {req:?}"
        );
        let destroyed = take_destroyed();
        check!(
            destroyed.len() == 2
                && destroyed.contains(&ml.into())
                && destroyed.contains(&mpre.into()),
            "destroy callbacks at the delete ran for {destroyed:?}; expected the two \
             unreferenced children {ml:?} and {mpre:?} (not the referenced child or parent)"
        );
        check!(
            !object_is_live(ml) && !object_is_live(mpre),
            "an unreferenced child is live after the delete"
        );
        check!(
            object_is_live(mp) && object_is_live(req),
            "a referenced object was destroyed at the delete (child live: {}, parent live: \
             {})",
            object_is_live(mp),
            object_is_live(req)
        );
        let st = list_stats(l)?;
        check_eq!(
            (st.total_frees, st.depth),
            (1, 1),
            "list (frees, depth): the lookaside child's buffer returned"
        );
        check_bytes(&memory_bytes(mp), &data, "the referenced child's data")?;
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::NonPaged).outstanding(),
            2,
            "pool blocks: the referenced child's and the list's free buffer"
        );
        WdfObjectDereference(req);
        check_eq!(
            take_destroyed(),
            vec![WDFOBJECT::from(req)],
            "destroy callbacks at the parent's last dereference"
        );
        check!(
            !object_is_live(req) && object_is_live(mp),
            "after the parent's dereference: parent live {}, referenced child live {}; \
             expected the parent gone, the child live",
            object_is_live(req),
            object_is_live(mp)
        );
        WdfObjectDereference(mp);
        check_eq!(
            take_destroyed(),
            vec![WDFOBJECT::from(mp)],
            "destroy callbacks at the child's last dereference"
        );
        check!(
            !object_is_live(mp),
            "the child is live after the last dereference"
        );
        check_eq!(
            drv.tag_stats(PoolTag(T), PoolKind::NonPaged).outstanding(),
            1,
            "pool blocks after the dereference (the list's free buffer)"
        );

        // The preallocated child's buffer is still the driver's: the device uses it.
        let data2 = ctx.rng().unique(LEN);
        mv.src.write(0, &data2);
        mv.copy(
            LEN,
            "through the preallocated child's buffer after the delete",
        )?;
        check_bytes(&mv.dst.read(0, LEN), &data2, "destination")?;
        mv.close()?;
        WdfObjectDelete(l);
        check_balanced(drv, PoolTag(T), PoolKind::NonPaged, "list deleted")
    })
}

/// `WdfObjectDelete` on the WDFDEVICE and on the WDFDRIVER is refused as KMDF refuses it
/// (both are "no delete DDI" objects: STATUS_CANNOT_DELETE logged, no bug check, nothing
/// deleted): the objects, memory parented to them and a lookaside list under the device
/// stay live with no cleanup callback run, the device still moves data, and unload
/// deletes everything.
fn device_and_driver_objects_cannot_be_deleted(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const T: u32 = tag(b"CfNd");
        const LEN: usize = PAGE;
        let driver = WdfGetDriver();
        let mut children = Vec::new();
        for parent in [WDFOBJECT::from(drv.device), driver.into()] {
            let attrs = WDF_OBJECT_ATTRIBUTES {
                ParentObject: parent,
                EvtCleanupCallback: Some(log_cleanup),
                EvtDestroyCallback: Some(log_destroy),
                ..WDF_OBJECT_ATTRIBUTES::init()
            };
            let mut m = WDFMEMORY::NULL;
            let s = WdfMemoryCreate(Some(&attrs), NonPagedPool, T, LEN, Some(&mut m), None);
            check_eq!(s, STATUS_SUCCESS, "WdfMemoryCreate under {parent:?}");
            children.push(m);
        }
        let list_attrs = WDF_OBJECT_ATTRIBUTES {
            ParentObject: drv.device.into(),
            ..WDF_OBJECT_ATTRIBUTES::init()
        };
        let l = lookaside(LEN, NonPagedPool, T, (Some(&list_attrs), None))?;
        let data = ctx.rng().unique(LEN);
        check_eq!(
            copy_from_slice(children[0], 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer into the device's child"
        );
        take_cleaned();
        take_destroyed();

        WdfObjectDelete(drv.device);
        WdfObjectDelete(driver);

        check!(
            object_is_live(drv.device) && object_is_live(driver),
            "WdfObjectDelete deleted a no-delete object (device live: {}, driver live: {})",
            object_is_live(drv.device),
            object_is_live(driver)
        );
        check!(
            children.iter().all(|&m| object_is_live(m)) && object_is_live(l),
            "a child of the device or driver was deleted with the refused delete"
        );
        check_eq!(
            (take_cleaned(), take_destroyed()),
            (Vec::new(), Vec::new()),
            "cleanup and destroy callbacks run by the refused deletes"
        );
        let ml = from_lookaside(l)?;
        let mut mv = Mover::new(drv, dev, LEN as u32)?;
        through_device(
            &mut mv,
            children[0],
            ml,
            LEN,
            "device child -> lookaside memory",
        )?;
        check_bytes(
            &memory_bytes(ml),
            &data,
            "the device still moves data after the refused delete",
        )?;
        mv.close()?;
        WdfObjectDelete(ml);
        // Unload (in `with_driver`) deletes the rest and checks the pool.
        Ok(())
    })?;
    check_eq!(
        take_cleaned().len(),
        2,
        "cleanup callbacks of the two children at unload"
    );
    check_eq!(
        take_destroyed().len(),
        2,
        "destroy callbacks of the two children at unload"
    );
    Ok(())
}

/// The IRQL rules the memory calls answer with STATUS_INVALID_DEVICE_REQUEST (no bug
/// check), the IRQL modelled per thread: a paged lookaside list, memory from one and a
/// paged WdfMemoryCreate need IRQL <= APC_LEVEL (they succeed at APC_LEVEL and fail at
/// DISPATCH_LEVEL, handles NULL); their non-paged forms and WdfMemoryCreatePreallocated
/// need <= DISPATCH_LEVEL (they succeed there and fail at HIGH_LEVEL). Memory created at
/// DISPATCH_LEVEL is ordinary memory: filled there, its data goes through the device at
/// PASSIVE_LEVEL into memory created at APC_LEVEL.
fn irql_limits(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        const T: u32 = tag(b"CfIq");
        const SIZE: usize = 2 * PAGE;
        let block = ExAllocatePoolWithTag(NonPagedPool, SIZE, T);
        check!(
            !block.is_null(),
            "ExAllocatePoolWithTag({SIZE}) returned NULL"
        );
        let (lp, m_apc) = {
            let _apc = IrqlGuard::raise(APC_LEVEL);
            let lp = lookaside(SIZE, PagedPool, T, (None, None))?;
            let mut m = WDFMEMORY::NULL;
            let s = WdfMemoryCreate(None, PagedPool, T, SIZE, Some(&mut m), None);
            check_eq!(s, STATUS_SUCCESS, "paged WdfMemoryCreate at APC_LEVEL");
            let mp = from_lookaside(lp)?;
            WdfObjectDelete(mp);
            (lp, m)
        };
        let data = ctx.rng().unique(SIZE);
        let (ln, mn, mc, mpre) = {
            let _dispatch = IrqlGuard::raise(DISPATCH_LEVEL);
            let mut l = WDFLOOKASIDE(not_null(drv));
            let s = WdfLookasideListCreate(None, SIZE, PagedPool, None, T, Some(&mut l));
            check_eq!(
                s,
                STATUS_INVALID_DEVICE_REQUEST,
                "paged WdfLookasideListCreate at DISPATCH_LEVEL"
            );
            check!(l.is_null(), "refused list: handle {l:?}, expected NULL");
            let mut m = WDFMEMORY(not_null(drv));
            let s = WdfMemoryCreateFromLookaside(lp, Some(&mut m));
            check_eq!(
                s,
                STATUS_INVALID_DEVICE_REQUEST,
                "WdfMemoryCreateFromLookaside of a paged list at DISPATCH_LEVEL"
            );
            check!(m.is_null(), "refused memory: handle {m:?}, expected NULL");
            let s = WdfMemoryCreate(None, PagedPool, T, SIZE, Some(&mut m), None);
            check_eq!(
                s,
                STATUS_INVALID_DEVICE_REQUEST,
                "paged WdfMemoryCreate at DISPATCH_LEVEL"
            );
            let ln = lookaside(SIZE, NonPagedPool, T, (None, None))?;
            let mn = from_lookaside(ln)?;
            let mut mc = WDFMEMORY::NULL;
            let s = WdfMemoryCreate(None, NonPagedPool, T, SIZE, Some(&mut mc), None);
            check_eq!(
                s,
                STATUS_SUCCESS,
                "non-paged WdfMemoryCreate at DISPATCH_LEVEL"
            );
            let mut mpre = WDFMEMORY::NULL;
            // SAFETY: `block` is a live SIZE-byte pool block, freed after the object is gone.
            let s = unsafe { WdfMemoryCreatePreallocated(None, block, SIZE, Some(&mut mpre)) };
            check_eq!(
                s,
                STATUS_SUCCESS,
                "WdfMemoryCreatePreallocated at DISPATCH_LEVEL"
            );
            check_eq!(
                copy_from_slice(mn, 0, &data),
                STATUS_SUCCESS,
                "CopyFromBuffer at DISPATCH_LEVEL"
            );
            {
                let _high = IrqlGuard::raise(HIGH_LEVEL);
                let mut l = WDFLOOKASIDE::NULL;
                let s = WdfLookasideListCreate(None, SIZE, NonPagedPool, None, T, Some(&mut l));
                check_eq!(
                    s,
                    STATUS_INVALID_DEVICE_REQUEST,
                    "non-paged WdfLookasideListCreate at HIGH_LEVEL"
                );
                let mut m = WDFMEMORY::NULL;
                let s = WdfMemoryCreateFromLookaside(ln, Some(&mut m));
                check_eq!(
                    s,
                    STATUS_INVALID_DEVICE_REQUEST,
                    "WdfMemoryCreateFromLookaside of a non-paged list at HIGH_LEVEL"
                );
                let s = WdfMemoryCreate(None, NonPagedPool, T, SIZE, Some(&mut m), None);
                check_eq!(
                    s,
                    STATUS_INVALID_DEVICE_REQUEST,
                    "non-paged WdfMemoryCreate at HIGH_LEVEL"
                );
                // SAFETY: as above (the call is refused before the object exists).
                let s = unsafe { WdfMemoryCreatePreallocated(None, block, SIZE, Some(&mut m)) };
                check_eq!(
                    s,
                    STATUS_INVALID_DEVICE_REQUEST,
                    "WdfMemoryCreatePreallocated at HIGH_LEVEL"
                );
            }
            (ln, mn, mc, mpre)
        };
        let mut mv = Mover::new(drv, dev, SIZE as u32)?;
        through_device(
            &mut mv,
            mn,
            m_apc,
            SIZE,
            "DISPATCH_LEVEL memory -> APC_LEVEL memory",
        )?;
        check_bytes(&memory_bytes(m_apc), &data, "memory created at APC_LEVEL")?;
        through_device(
            &mut mv,
            m_apc,
            mc,
            SIZE,
            "-> non-paged memory created at DISPATCH_LEVEL",
        )?;
        through_device(
            &mut mv,
            mc,
            mpre,
            SIZE,
            "-> preallocated memory created at DISPATCH_LEVEL",
        )?;
        // SAFETY: `block` is live and SIZE bytes long.
        let raw = unsafe { std::slice::from_raw_parts(block.cast::<u8>(), SIZE) }.to_vec();
        check_bytes(&raw, &data, "the pool block behind the preallocated memory")?;
        mv.close()?;
        for o in [
            WDFOBJECT::from(m_apc),
            mn.into(),
            mc.into(),
            mpre.into(),
            lp.into(),
            ln.into(),
        ] {
            WdfObjectDelete(o);
        }
        ExFreePoolWithTag(block, T);
        check_balanced(drv, PoolTag(T), PoolKind::NonPaged, "everything deleted")?;
        check_balanced(drv, PoolTag(T), PoolKind::Paged, "everything deleted")
    })
}

/// A driver's per-request context.
#[derive(Default)]
struct RequestCtx {
    sequence: u64,
}
WDF_DECLARE_CONTEXT_TYPE_WITH_NAME!(RequestCtx, GetRequestCtx);

/// Another context type, never given to the object below.
#[derive(Default)]
struct OtherCtx {
    _unused: u8,
}
WDF_DECLARE_CONTEXT_TYPE_WITH_NAME!(OtherCtx, GetOtherCtx);

/// Object attributes and contexts as a driver uses them: WDF_OBJECT_ATTRIBUTES_INIT then
/// WDF_OBJECT_ATTRIBUTES_SET_CONTEXT_TYPE, and WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE,
/// give memory objects a zero-initialised context of that type (NULL for another type)
/// that keeps what the driver stores in it; a sequence number kept there follows a buffer
/// through a device COPY; WdfGetDriver names the loaded driver;
/// ExAllocatePoolWithTag memory is given back with ExFreePool.
fn object_attributes_contexts_and_driver(ctx: &mut Ctx) -> TestResult {
    let data = ctx.rng().unique(PAGE);
    with_driver(ctx.shared()?, |drv| {
        check!(
            WdfGetDriver() == drv.driver.globals().map(|g| g.handle()).unwrap_or_default()
                && WdfGetDriver() != WDFDRIVER::default(),
            "WdfGetDriver does not name the loaded driver"
        );
        let mut set = WDF_OBJECT_ATTRIBUTES::default();
        WDF_OBJECT_ATTRIBUTES_INIT(&mut set);
        check!(
            set.ContextTypeInfo.is_none(),
            "WDF_OBJECT_ATTRIBUTES_INIT set a context type"
        );
        WDF_OBJECT_ATTRIBUTES_SET_CONTEXT_TYPE::<RequestCtx>(&mut set);
        let mut init = WDF_OBJECT_ATTRIBUTES::default();
        WDF_OBJECT_ATTRIBUTES_INIT_CONTEXT_TYPE::<RequestCtx>(&mut init);
        let mut objects = Vec::new();
        for (i, attrs) in [&set, &init].into_iter().enumerate() {
            let mut m = WDFMEMORY::NULL;
            let s = WdfMemoryCreate(Some(attrs), NonPagedPool, 0, PAGE, Some(&mut m), None);
            check_eq!(
                s,
                STATUS_SUCCESS,
                "WdfMemoryCreate with a context type ({i})"
            );
            let c = GetRequestCtx(m);
            check!(!c.is_null(), "object {i} has no RequestCtx context");
            // SAFETY: the context lives as long as the object, which is alive here.
            let seq = unsafe { &mut (*c).sequence };
            check_eq!(*seq, 0, "a fresh context is zero-initialised ({i})");
            *seq = 0x5e9_0000 + i as u64;
            check!(
                GetOtherCtx(m).is_null(),
                "object {i} has a context of another type"
            );
            objects.push(m);
        }
        // The first object's bytes go through the device into the second.
        let page = PAGE as u32;
        check_eq!(
            copy_from_slice(objects[0], 0, &data),
            STATUS_SUCCESS,
            "CopyFromBuffer"
        );
        let dev = ctx.dev()?;
        let mut mover = Mover::new(drv, dev, page)?;
        let s = memory_to_common(objects[0], 0, &mover.src, 0, PAGE);
        check_eq!(
            s,
            STATUS_SUCCESS,
            "CopyToBuffer into the source common buffer"
        );
        mover.copy(PAGE, "COPY of the first object's bytes")?;
        let s = common_to_memory(objects[1], 0, &mover.dst, 0, PAGE);
        check_eq!(
            s,
            STATUS_SUCCESS,
            "CopyFromBuffer from the destination common buffer"
        );
        check_bytes(
            &memory_bytes(objects[1]),
            &data,
            "memory object after the device COPY",
        )?;
        for (i, m) in objects.iter().enumerate() {
            // SAFETY: as above; the objects are still alive.
            let seq = unsafe { (*GetRequestCtx(*m)).sequence };
            check_eq!(
                seq,
                0x5e9_0000 + i as u64,
                "context of object {i} after the COPY"
            );
        }
        mover.close()?;
        for m in objects {
            WdfObjectDelete(m);
        }
        let p = ExAllocatePoolWithTag(NonPagedPool, 256, u32::from_le_bytes(*b"Ctxt"));
        check!(!p.is_null(), "ExAllocatePoolWithTag(256) returned NULL");
        ExFreePool(p);
        Ok(())
    })
}
