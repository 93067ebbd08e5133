//! Conformance: a driver flow end to end.
//!
//! A driver as the seeds write one: requests staged in lookaside memory objects, copied into
//! domain common buffers, moved by the device (COPY descriptors on queues bound to the
//! adapters' DMA domain), copied back into response memory, checked, and everything freed,
//! with the pool and lookaside statistics balanced at unload.

#![allow(non_snake_case)]

use domdma_driver_model::pool::{PoolKind, PoolTag};
use domdma_driver_model::status::*;
use domdma_driver_model::wdf::*;

use super::prelude::*;
use crate::wdf::{
    alloc, common_to_memory, copy_from_slice, copy_to_vec, current_domain, free, from_lookaside,
    list_stats, lookaside, memory_to_common, request, try_alloc_req, with_driver, Cb, DomainQueue,
    Driver, Req,
};

/// The scenarios of this area.
pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        area: Area::Flow,
        name: "lookaside_requests_through_domain",
        needs: &[Need::HugePages(2)],
        run: lookaside_requests_through_domain,
    },
    Scenario {
        area: Area::Flow,
        name: "two_channels_in_one_domain",
        needs: &[Need::Queues(2), Need::Domains(2)],
        run: two_channels_in_one_domain,
    },
    Scenario {
        area: Area::Flow,
        name: "a_driver_survives_low_resources",
        needs: &[],
        run: a_driver_survives_low_resources,
    },
];

/// Requests of the low resources scenario.
const LOW_REQUESTS: usize = 64;
/// Its lookaside list's tag.
const LOW_LIST_TAG: u32 = u32::from_le_bytes(*b"LrRq");
/// Its per-request context blocks' pool tag.
const LOW_CTX_TAG: u32 = u32::from_le_bytes(*b"LrCx");
/// Chance that an eligible allocation fails (Driver Verifier's default is 6%; more here,
/// so that 64 requests see every kind fail).
const LOW_PROBABILITY: f64 = 0.2;

/// Largest request, and a slot of the staging buffers.
const SLOT: usize = 8 * PAGE;
/// Requests in flight at once (one batch on a queue).
const BATCH: usize = 32;
/// Rounds of requests.
const ROUNDS: usize = 4;
/// Request list tag.
const REQ_TAG: u32 = u32::from_le_bytes(*b"FlRq");
/// Response list tag.
const RSP_TAG: u32 = u32::from_le_bytes(*b"FlRs");
/// Byte the destination slots hold before each round.
const POISON: u8 = 0x6b;

/// A request in flight: its memory, its data, where it is staged.
struct InFlight {
    memory: WDFMEMORY,
    data: Vec<u8>,
    slot: usize,
}

/// Request lengths: random in 1..=SLOT, with the edges (1 byte, a page, a whole slot, a
/// slot less one byte) in every round.
fn lengths(rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..BATCH)
        .map(|_| 1 + rng.below(SLOT as u64) as usize)
        .collect();
    v[0] = 1;
    v[1] = PAGE;
    v[2] = SLOT;
    v[3] = SLOT - 1;
    v
}

/// Stages one round of requests from `list` in `src` (one slot each), as a driver does on
/// a write request: WdfMemoryCreateFromLookaside, WdfMemoryCopyFromBuffer of the caller's
/// data, WdfMemoryCopyToBuffer into the common buffer.
fn stage(ctx: &Ctx, list: WDFLOOKASIDE, src: &Cb, round: usize) -> Result<Vec<InFlight>, Failure> {
    let mut rng = ctx.rng();
    let mut out = Vec::with_capacity(BATCH);
    for (slot, len) in lengths(&mut rng).into_iter().enumerate() {
        let memory = from_lookaside(list)?;
        let data = rng.unique(len);
        check_eq!(
            copy_from_slice(memory, 0, &data),
            STATUS_SUCCESS,
            "round {round} request {slot}: CopyFromBuffer of {len} bytes into lookaside memory"
        );
        check_eq!(
            memory_to_common(memory, 0, src, slot * SLOT, len),
            STATUS_SUCCESS,
            "round {round} request {slot}: CopyToBuffer into the staging common buffer"
        );
        out.push(InFlight { memory, data, slot });
    }
    Ok(out)
}

/// Completes one round: checks each COPY's completion, copies each destination slot into a
/// response memory object from `responses`, checks it against the request and that the
/// device wrote nothing past the request's length, and deletes the request memory (back to
/// its list). Returns the responses.
fn complete(
    round: usize,
    reqs: Vec<InFlight>,
    completions: &[CompletionRecord],
    responses: WDFLOOKASIDE,
    dst: &Cb,
) -> Result<Vec<WDFMEMORY>, Failure> {
    let mut out = Vec::with_capacity(reqs.len());
    for (r, c) in reqs.iter().zip(completions) {
        let (len, slot) = (r.data.len(), r.slot);
        check_status(
            c,
            spec::STATUS_OK,
            format!("round {round} request {slot}: COPY"),
        )?;
        check_eq!(
            c.bytes as usize,
            len,
            "round {round} request {slot}: bytes copied"
        );
        check_eq!(
            c.tag,
            (round * BATCH + slot) as u64,
            "round {round} request {slot}: tag"
        );
        let rsp = from_lookaside(responses)?;
        check_eq!(
            common_to_memory(rsp, 0, dst, slot * SLOT, len),
            STATUS_SUCCESS,
            "round {round} request {slot}: CopyFromBuffer of the destination slot"
        );
        let (s, got) = copy_to_vec(rsp, 0, len);
        check_eq!(
            s,
            STATUS_SUCCESS,
            "round {round} request {slot}: CopyToBuffer of the response"
        );
        check_bytes(
            &got,
            &r.data,
            format!("round {round} request {slot} ({len} bytes): response"),
        )?;
        check_all(
            &dst.read(slot * SLOT + len, SLOT - len),
            POISON,
            format!("round {round} request {slot}: destination slot past {len} bytes"),
        )?;
        WdfObjectDelete(r.memory);
        out.push(rsp);
    }
    Ok(out)
}

/// Checks that `t`'s pool statistics in `kind` balance: every allocation freed.
fn check_pool_balanced(drv: &Driver, t: u32, kind: PoolKind, what: &str) -> TestResult {
    let st = drv.tag_stats(PoolTag(t), kind);
    check!(
        st.allocs > 0 && st.allocs == st.frees && st.bytes == 0,
        "{what}: pool tag '{}' ({kind:?}) allocs {}, frees {}, bytes {}; expected some \
         allocations, all freed",
        PoolTag(t),
        st.allocs,
        st.frees,
        st.bytes
    );
    Ok(())
}

/// A driver's data path: requests of 1 byte to 32 KiB (data unique per page) staged in
/// non-paged lookaside memory objects are copied into a LARGE_PAGE staging common buffer,
/// moved by the device in batches of 32 COPY descriptors on a queue bound to the adapter's
/// domain (ring and completion records in common buffers too) into a LARGE_PAGE destination,
/// copied back into paged lookaside response memory whose parent is the round's request
/// object, and checked (nothing written past each request). Four rounds: request buffers
/// recycle (allocate misses only in the first round); deleting a round's request object
/// returns its responses. At the end the lists' allocates equal their frees, every buffer
/// is freed, the pool statistics balance and unload finds no leak.
fn lookaside_requests_through_domain(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        let a = drv.adapter(64)?;
        let d = (a.DmaOperations.GetDmaDomain)(&a);
        check!(!d.is_null(), "GetDmaDomain: NULL");
        let mut q = DomainQueue::new(dev, &a, d, 0)?;
        let len = (BATCH * SLOT) as u32;
        let src = alloc(&a, d, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, MM_ANY_NODE_OK)?;
        let dst = alloc(&a, d, len, DOMAIN_COMMON_BUFFER_LARGE_PAGE, MM_ANY_NODE_OK)?;
        let requests = lookaside(SLOT, NonPagedPool, REQ_TAG, (None, None))?;
        let mut rsp_total = 0u64;
        for round in 0..ROUNDS {
            let round_req = request(None)?;
            let attrs = WDF_OBJECT_ATTRIBUTES {
                ParentObject: round_req.into(),
                ..WDF_OBJECT_ATTRIBUTES::init()
            };
            let responses = lookaside(SLOT, PagedPool, RSP_TAG, (None, Some(&attrs)))?;
            dst.write(0, &vec![POISON; len as usize]);
            let reqs = stage(ctx, requests, &src, round)?;
            let descs: Vec<Descriptor> = reqs
                .iter()
                .map(|r| {
                    let off = (r.slot * SLOT) as u64;
                    Descriptor::copy(src.logical + off, dst.logical + off, r.data.len() as u32)
                        .with_tag((round * BATCH + r.slot) as u64)
                })
                .collect();
            let completions = q.run_batch(&descs)?;
            // The responses go with the round's request object.
            complete(round, reqs, &completions, responses, &dst)?;
            let st = list_stats(responses)?;
            check_eq!(
                (st.total_allocates, st.total_frees),
                (BATCH as u64, 0),
                "round {round}: response list (allocates, frees) before the request is deleted"
            );
            WdfObjectDelete(round_req);
            let st = list_stats(responses)?;
            check_eq!(
                (st.total_allocates, st.total_frees),
                (BATCH as u64, BATCH as u64),
                "round {round}: response list (allocates, frees) after deleting the request"
            );
            rsp_total += st.total_frees;
            WdfObjectDelete(responses);
            let st = list_stats(requests)?;
            let n = ((round + 1) * BATCH) as u64;
            check_eq!(
                (st.total_allocates, st.total_frees, st.allocate_misses),
                (n, n, BATCH as u64),
                "request list (allocates, frees, misses) after round {round}"
            );
        }
        check_eq!(
            rsp_total,
            (ROUNDS * BATCH) as u64,
            "responses returned over all rounds"
        );
        let req_pool = drv.tag_stats(PoolTag(REQ_TAG), PoolKind::NonPaged);
        check_eq!(
            (req_pool.allocs, req_pool.outstanding()),
            (BATCH as u64, BATCH as u64),
            "request list pool blocks (allocated, held by the list) after all rounds"
        );
        WdfObjectDelete(requests);
        check_pool_balanced(drv, REQ_TAG, PoolKind::NonPaged, "request list deleted")?;
        check_pool_balanced(drv, RSP_TAG, PoolKind::Paged, "response lists deleted")?;

        q.close(&a)?;
        free(&a, src);
        free(&a, dst);
        let dom = current_domain(&a)?;
        check_eq!(
            dom.buffer_count(),
            0,
            "domain buffers after FreeCommonBuffer"
        );
        drop(dom);
        (a.DmaOperations.PutDmaAdapter)(a);
        Ok(())
    })
}

/// Two channels of one driver in one DMA domain: adapter A owns the domain and the staging
/// buffer, adapter B joins it and allocates the destination, and each has its own queue
/// bound to the domain (rings and records in the adapters' common buffers). Requests staged
/// from one lookaside list are split between the two queues, submitted on both before
/// either is waited for, and checked in response memory; B then sends the data back to A
/// (a second staging area) on its queue. Everything is freed, B leaves the domain, and the
/// lookaside and pool statistics balance.
fn two_channels_in_one_domain(ctx: &mut Ctx) -> TestResult {
    let ctx = &*ctx;
    let dev = ctx.dev()?;
    with_driver(ctx.shared()?, |drv| {
        let a = drv.adapter(64)?;
        let b = drv.adapter(64)?;
        let d = (a.DmaOperations.GetDmaDomain)(&a);
        check!(!d.is_null(), "GetDmaDomain(A): NULL");
        check_eq!(
            (b.DmaOperations.JoinDmaDomain)(&b, d),
            STATUS_SUCCESS,
            "JoinDmaDomain(B, A's domain)"
        );
        let mut qa = DomainQueue::new(dev, &a, d, 0)?;
        let mut qb = DomainQueue::new(dev, &b, d, 1)?;
        let len = (BATCH * SLOT) as u32;
        let src = alloc(&a, d, len, 0, MM_ANY_NODE_OK)?;
        let back = alloc(&a, d, len, 0, MM_ANY_NODE_OK)?;
        let dst = alloc(&b, d, len, 0, MM_ANY_NODE_OK)?;
        let requests = lookaside(SLOT, NonPagedPool, REQ_TAG, (None, None))?;
        let responses = lookaside(SLOT, NonPagedPool, RSP_TAG, (None, None))?;
        for round in 0..2 {
            dst.write(0, &vec![POISON; len as usize]);
            back.write(0, &vec![POISON; len as usize]);
            let reqs = stage(ctx, requests, &src, round)?;
            let desc = |r: &InFlight| {
                let off = (r.slot * SLOT) as u64;
                Descriptor::copy(src.logical + off, dst.logical + off, r.data.len() as u32)
                    .with_tag((round * BATCH + r.slot) as u64)
            };
            let (even, odd): (Vec<&InFlight>, Vec<&InFlight>) =
                reqs.iter().partition(|r| r.slot % 2 == 0);
            let on_a: Vec<Descriptor> = even.iter().map(|r| desc(r)).collect();
            let on_b: Vec<Descriptor> = odd.iter().map(|r| desc(r)).collect();
            let ra = qa.submit(&on_a)?;
            let rb = qb.submit(&on_b)?;
            let ca = qa.wait(ra)?;
            let cb = qb.wait(rb)?;
            // Completions back in request order.
            let mut completions = vec![CompletionRecord::default(); BATCH];
            for (r, c) in even.iter().zip(&ca).chain(odd.iter().zip(&cb)) {
                completions[r.slot] = *c;
            }
            let lens: Vec<(usize, usize)> = reqs.iter().map(|r| (r.slot, r.data.len())).collect();
            let datas: Vec<Vec<u8>> = reqs.iter().map(|r| r.data.clone()).collect();
            let rsps = complete(round, reqs, &completions, responses, &dst)?;
            for m in rsps {
                WdfObjectDelete(m);
            }
            // Back from B's destination to A's second staging area, on B's queue.
            let descs: Vec<Descriptor> = lens
                .iter()
                .map(|&(slot, n)| {
                    let off = (slot * SLOT) as u64;
                    Descriptor::copy(dst.logical + off, back.logical + off, n as u32)
                })
                .collect();
            for (c, &(slot, n)) in qb.run_batch(&descs)?.iter().zip(&lens) {
                check_status(
                    c,
                    spec::STATUS_OK,
                    format!("round {round} slot {slot}: COPY back"),
                )?;
                check_bytes(
                    &back.read(slot * SLOT, n),
                    &datas[slot],
                    format!("round {round} slot {slot}: data back in A's buffer"),
                )?;
            }
        }
        qa.close(&a)?;
        qb.close(&b)?;
        free(&a, src);
        free(&a, back);
        free(&b, dst);
        check_eq!(
            (b.DmaOperations.LeaveDmaDomain)(&b),
            STATUS_SUCCESS,
            "LeaveDmaDomain(B)"
        );
        let dom = current_domain(&a)?;
        check_eq!(
            (dom.buffer_count(), dom.members()),
            (0, 1),
            "domain (buffers, members) at the end"
        );
        drop(dom);
        (b.DmaOperations.PutDmaAdapter)(b);
        (a.DmaOperations.PutDmaAdapter)(a);
        for (what, l) in [("request", requests), ("response", responses)] {
            let st = list_stats(l)?;
            check_eq!(
                (st.total_allocates, st.total_frees),
                (2 * BATCH as u64, 2 * BATCH as u64),
                "{what} list (allocates, frees)"
            );
            WdfObjectDelete(l);
        }
        check_pool_balanced(drv, REQ_TAG, PoolKind::NonPaged, "request list deleted")?;
        check_pool_balanced(drv, RSP_TAG, PoolKind::NonPaged, "response list deleted")
    })
}

/// Driver Verifier's low resources simulation (`verifier::low_resources`): a driver's
/// request path with a fifth of its pool, lookaside and common-buffer allocations failing on
/// purpose (seeded from the run's seed, so a failure is reproducible). Each request takes
/// lookaside memory for its data, a pool context block and two 4 KiB domain common buffers,
/// stages the data, has the device COPY it and checks it. A request whose allocation fails
/// is refused with `STATUS_INSUFFICIENT_RESOURCES` after freeing what it held; the others
/// go through. Every kind must have failed at least once, every failure must have refused
/// exactly one request, some requests must have gone through, and at the end the domain
/// holds no buffer, the list and the pool balance, and unload finds no leak.
fn a_driver_survives_low_resources(ctx: &mut Ctx) -> TestResult {
    use domdma_driver_model::verifier::low_resources::{self, LowResources};

    let ctx = &*ctx;
    let dev = ctx.dev()?;
    let mut rng = ctx.rng();
    let seed = rng.next_u64();
    with_driver(ctx.shared()?, |drv| {
        // Set up under normal conditions, as a driver does at start.
        let a = drv.adapter(64)?;
        let d = (a.DmaOperations.GetDmaDomain)(&a);
        check!(!d.is_null(), "GetDmaDomain: NULL");
        let mut q = DomainQueue::new(dev, &a, d, 0)?;
        let list = lookaside(PAGE, NonPagedPool, LOW_LIST_TAG, (None, None))?;

        let sim = LowResources::random(LOW_PROBABILITY, seed);
        let (outcome, counts) = low_resources::with(sim, || -> Result<(u64, u64), Failure> {
            let (mut served, mut refused) = (0u64, 0u64);
            for i in 0..LOW_REQUESTS {
                let len = 1 + rng.below(PAGE as u64) as usize;
                let what = format!("request {i} ({len} bytes)");
                // 1. Memory for the request's data.
                let mut m = WDFMEMORY::NULL;
                let s = WdfMemoryCreateFromLookaside(list, Some(&mut m));
                if s == STATUS_INSUFFICIENT_RESOURCES {
                    check!(m.is_null(), "{what}: a failed create left a handle");
                    refused += 1;
                    continue;
                }
                check_eq!(s, STATUS_SUCCESS, "{what}: WdfMemoryCreateFromLookaside");
                // 2. A context block.
                let block = ExAllocatePoolWithTag(NonPagedPool, 128, LOW_CTX_TAG);
                if block.is_null() {
                    WdfObjectDelete(m);
                    refused += 1;
                    continue;
                }
                // 3. Two bounce buffers in the domain.
                let (s, src) = try_alloc_req(&a, d, Req::of(PAGE as u32));
                if s == STATUS_INSUFFICIENT_RESOURCES {
                    ExFreePoolWithTag(block, LOW_CTX_TAG);
                    WdfObjectDelete(m);
                    refused += 1;
                    continue;
                }
                check_eq!(
                    s,
                    STATUS_SUCCESS,
                    "{what}: AllocateDomainCommonBuffer (source)"
                );
                let (s, dst) = try_alloc_req(&a, d, Req::of(PAGE as u32));
                if s == STATUS_INSUFFICIENT_RESOURCES {
                    free(&a, src);
                    ExFreePoolWithTag(block, LOW_CTX_TAG);
                    WdfObjectDelete(m);
                    refused += 1;
                    continue;
                }
                check_eq!(
                    s,
                    STATUS_SUCCESS,
                    "{what}: AllocateDomainCommonBuffer (destination)"
                );
                // 4. Through the device.
                let data = rng.unique(len);
                check_eq!(
                    copy_from_slice(m, 0, &data),
                    STATUS_SUCCESS,
                    "{what}: CopyFromBuffer"
                );
                check_eq!(
                    memory_to_common(m, 0, &src, 0, len),
                    STATUS_SUCCESS,
                    "{what}: CopyToBuffer into the source"
                );
                dst.write(0, &vec![POISON; PAGE]);
                q.copy(src.logical, dst.logical, len as u32, &what)?;
                check_bytes(&dst.read(0, len), &data, format!("{what}: destination"))?;
                free(&a, src);
                free(&a, dst);
                ExFreePoolWithTag(block, LOW_CTX_TAG);
                WdfObjectDelete(m);
                served += 1;
            }
            Ok((served, refused))
        });
        let (served, refused) = outcome?;
        progress!(
            "         low resources (p {LOW_PROBABILITY}, seed {seed:#x}): {served} served, \
             {refused} refused; failed (pool, lookaside, common buffer) {:?} of {:?}",
            counts.failed,
            counts.eligible
        );
        check!(
            counts.failed.iter().all(|&n| n > 0),
            "every kind should have failed at least once: failed (pool, lookaside, common \
             buffer) {:?} of {:?} eligible",
            counts.failed,
            counts.eligible
        );
        check_eq!(
            refused,
            counts.total_failed(),
            "requests refused against allocations failed by the simulation"
        );
        check!(served > 0, "no request went through ({refused} refused)");
        check_eq!(
            served + refused,
            LOW_REQUESTS as u64,
            "requests served and refused"
        );

        let st = list_stats(list)?;
        check_eq!(
            st.total_allocates,
            st.total_frees,
            "lookaside list (allocates, frees)"
        );
        WdfObjectDelete(list);
        check_pool_balanced(drv, LOW_CTX_TAG, PoolKind::NonPaged, "context blocks")?;
        q.close(&a)?;
        let dom = current_domain(&a)?;
        check_eq!(dom.buffer_count(), 0, "domain buffers at the end");
        drop(dom);
        (a.DmaOperations.PutDmaAdapter)(a);
        Ok(())
    })
}
