//! WDF fixtures: a loaded driver with one device on a back end, version-3 adapters, domain
//! common buffers as a driver holds them, a device queue bound to an adapter's DMA domain
//! ([`DomainQueue`]) and a driver's path through the device between two common buffers
//! ([`Mover`]).

#![allow(non_snake_case)]

use std::ffi::c_void;
use std::sync::Arc;

use domdma_device::spec::{self, CompletionRecord, Descriptor};
use domdma_driver_model::backend::DmaBackend;
use domdma_driver_model::dma::{DmaDomain, SharedBackend};
use domdma_driver_model::dma_queue::{CompletionRecords, DmaQueue, QueueConfig};
use domdma_driver_model::pool::{PoolKind, PoolTag, PoolTracker, TagStats};
use domdma_driver_model::status::*;
use domdma_driver_model::verifier::{self, VerifierMode};
use domdma_driver_model::wdf::*;

use crate::check::{check_status, Failure, TestResult};
use crate::fixtures::{RunOne, COMPLETION_TIMEOUT};

/// A loaded driver with one device on a back end.
pub struct Driver {
    /// The driver object ([`Driver::unload`] checks for leaks).
    pub driver: DRIVER_OBJECT,
    /// The device.
    pub device: WDFDEVICE,
    /// Its PDO (for `IoGetDmaAdapter`).
    pub pdo: PDEVICE_OBJECT,
}

impl Driver {
    /// Loads a driver (service `domdma_conformance`) and creates a device on `backend`.
    pub fn load(backend: SharedBackend) -> Result<Self, Failure> {
        let mut driver = DRIVER_OBJECT::new();
        let s = WdfDriverCreate(
            &mut driver,
            r"\Registry\Machine\System\CurrentControlSet\Services\domdma_conformance",
            WDF_NO_OBJECT_ATTRIBUTES,
            &WDF_DRIVER_CONFIG::default(),
            None,
        );
        crate::check!(NT_SUCCESS(s), "WdfDriverCreate: {s}");
        let mut init = Some(WDFDEVICE_INIT::new(backend));
        let mut device = WDFDEVICE::NULL;
        let s = WdfDeviceCreate(&mut init, WDF_NO_OBJECT_ATTRIBUTES, Some(&mut device));
        crate::check!(NT_SUCCESS(s), "WdfDeviceCreate: {s}");
        let Some(pdo) = WdfDeviceWdmGetPhysicalDevice(device) else {
            return Err(Failure(
                "WdfDeviceWdmGetPhysicalDevice: no DMA hardware (see the log)".into(),
            ));
        };
        Ok(Driver {
            driver,
            device,
            pdo,
        })
    }

    /// A version-3 bus-master scatter/gather adapter with `width` address bits
    /// ([`v3_description`]).
    pub fn adapter(&self, width: u32) -> Result<PDMA_ADAPTER, Failure> {
        let mut map_registers = 0;
        IoGetDmaAdapter(Some(&self.pdo), &v3_description(width), &mut map_registers)
            .ok_or_else(|| Failure(format!("IoGetDmaAdapter({width}-bit) returned NULL")))
    }

    /// Unloads the driver; fails when pool memory is left (a leak), naming the tags and
    /// sizes. The verifier's leak bug check is recorded, not raised, so the failure reads
    /// as one (and a scenario's own failure is not replaced by a panic).
    pub fn unload(mut self) -> TestResult {
        let before = verifier::set_mode(VerifierMode::Record);
        let leaks = self.driver.unload();
        verifier::set_mode(before);
        if before == VerifierMode::Raise {
            // The leak bug check just recorded (if any); the report below says the same.
            let _ = verifier::take_recorded();
        }
        if !leaks.is_empty() {
            let report: Vec<String> = leaks.iter().map(ToString::to_string).collect();
            return Err(Failure(format!(
                "pool leaks at unload: {}; expected none",
                report.join("; ")
            )));
        }
        Ok(())
    }

    /// The driver's framework globals.
    fn globals(&self) -> &Arc<DriverGlobals> {
        self.driver
            .globals()
            .expect("a loaded driver has its globals (WdfDriverCreate succeeded)")
    }

    /// The driver's pool (what `ExAllocatePoolWithTag`, `WdfMemoryCreate` and lookaside
    /// lists allocate from), for its statistics.
    pub fn pool(&self) -> &Arc<PoolTracker> {
        self.globals().pool()
    }

    /// The driver's default pool tag (what `PoolTag` 0 means).
    pub fn tag(&self) -> PoolTag {
        self.globals().tag()
    }

    /// The WDFDRIVER handle.
    pub fn handle(&self) -> WDFDRIVER {
        self.globals().handle()
    }

    /// Pool statistics of `tag` in `kind` pool.
    pub fn tag_stats(&self, tag: PoolTag, kind: PoolKind) -> TagStats {
        self.pool().tag_stats(tag, kind)
    }
}

/// A version-3 bus-master scatter/gather description of `width` address bits and 1 MiB
/// transfers.
pub fn v3_description(width: u32) -> DEVICE_DESCRIPTION {
    DEVICE_DESCRIPTION {
        Version: DEVICE_DESCRIPTION_VERSION3,
        Master: true,
        ScatterGather: true,
        DmaAddressWidth: width,
        MaximumLength: 1 << 20,
        ..Default::default()
    }
}

/// Loads a driver on `backend`, runs `f` with it and unloads it whatever `f` returned:
/// `f`'s failure comes first, a leak found at unload after it.
pub fn with_driver(backend: SharedBackend, f: impl FnOnce(&Driver) -> TestResult) -> TestResult {
    let drv = Driver::load(backend)?;
    let result = f(&drv);
    let unloaded = drv.unload();
    match (result, unloaded) {
        (Ok(()), u) => u,
        (Err(e), Ok(())) => Err(e),
        (Err(Failure(a)), Err(Failure(b))) => Err(Failure(format!("{a}; then at unload: {b}"))),
    }
}

/// A domain common buffer as the driver holds it.
#[derive(Debug, Clone, Copy)]
pub struct Cb {
    /// Logical address (the IOVA in the domain).
    pub logical: u64,
    /// Virtual address.
    pub va: *mut c_void,
    /// Length asked for.
    pub len: u32,
}

impl Cb {
    /// Copies `data` into the buffer at `offset` through its virtual address.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.len as usize,
            "outside the buffer"
        );
        let dst = self.va.cast::<u8>().wrapping_add(offset);
        // SAFETY: `va` is a live common buffer of `len` bytes (the caller has not freed
        // it) and `offset..offset + data.len()` is inside it (checked); the device does not
        // touch it concurrently in the scenarios that call this.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// The buffer's bytes `offset..offset + len`.
    pub fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len as usize, "outside the buffer");
        let mut v = vec![0u8; len];
        let src = self.va.cast::<u8>().wrapping_add(offset).cast_const();
        // SAFETY: as in `write`; the DMA that wrote the buffer has completed.
        unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr(), len) };
        v
    }
}

/// The parameters of an `AllocateDomainCommonBuffer` besides the adapter and the domain.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    /// `MaximumAddress` (`None`: NULL).
    pub max: Option<u64>,
    /// `Length`.
    pub len: u32,
    /// `Flags`.
    pub flags: u32,
    /// `CacheType` (`None`: NULL).
    pub cache: Option<MEMORY_CACHING_TYPE>,
    /// `PreferredNode`.
    pub node: NODE_REQUIREMENT,
}

impl Req {
    /// `len` bytes: no MaximumAddress, flags or CacheType, any node.
    pub fn of(len: u32) -> Self {
        Req {
            max: None,
            len,
            flags: 0,
            cache: None,
            node: MM_ANY_NODE_OK,
        }
    }

    /// With `MaximumAddress` `max`.
    pub fn max(self, max: u64) -> Self {
        Req {
            max: Some(max),
            ..self
        }
    }

    /// With `Flags` `flags`.
    pub fn flags(self, flags: u32) -> Self {
        Req { flags, ..self }
    }

    /// With `CacheType` `cache`.
    pub fn cache(self, cache: Option<MEMORY_CACHING_TYPE>) -> Self {
        Req { cache, ..self }
    }

    /// With `PreferredNode` `node`.
    pub fn node(self, node: NODE_REQUIREMENT) -> Self {
        Req { node, ..self }
    }
}

/// `AllocateDomainCommonBuffer`, returning the status and what it gave ([`try_alloc_req`]
/// with each parameter given).
#[allow(clippy::too_many_arguments)]
pub fn try_alloc(
    a: &DMA_ADAPTER,
    domain: HANDLE,
    max: Option<u64>,
    len: u32,
    flags: u32,
    cache: Option<MEMORY_CACHING_TYPE>,
    node: NODE_REQUIREMENT,
) -> (NTSTATUS, Cb) {
    let req = Req {
        max,
        len,
        flags,
        cache,
        node,
    };
    try_alloc_req(a, domain, req)
}

/// `AllocateDomainCommonBuffer` of `req` in `domain`, returning the status and what it
/// gave.
pub fn try_alloc_req(a: &DMA_ADAPTER, domain: HANDLE, req: Req) -> (NTSTATUS, Cb) {
    let mut logical = PHYSICAL_ADDRESS::default();
    let mut va: *mut c_void = std::ptr::null_mut();
    let max = req.max.map(PHYSICAL_ADDRESS::new);
    let s = (a.DmaOperations.AllocateDomainCommonBuffer)(
        a,
        domain,
        max.as_ref(),
        req.len,
        req.flags,
        req.cache.as_ref(),
        req.node,
        &mut logical,
        &mut va,
    );
    let len = req.len;
    let logical = logical.QuadPart as u64;
    (s, Cb { logical, va, len })
}

/// `AllocateDomainCommonBuffer` of `len` bytes with `flags` on `node`, which must succeed.
pub fn alloc(
    a: &DMA_ADAPTER,
    domain: HANDLE,
    len: u32,
    flags: u32,
    node: NODE_REQUIREMENT,
) -> Result<Cb, Failure> {
    let (s, cb) = try_alloc_req(a, domain, Req::of(len).flags(flags).node(node));
    crate::check!(
        NT_SUCCESS(s),
        "AllocateDomainCommonBuffer({len:#x} bytes, flags {flags}, node {node}): {s}"
    );
    Ok(cb)
}

/// `FreeCommonBuffer` of a cached buffer.
pub fn free(a: &DMA_ADAPTER, cb: Cb) {
    (a.DmaOperations.FreeCommonBuffer)(a, cb.len, PHYSICAL_ADDRESS::new(cb.logical), cb.va, true);
}

/// `FreeCommonBuffer` of a buffer allocated with `cache` (`CacheEnabled` is FALSE only for
/// `MmNonCached`).
pub fn free_cached(a: &DMA_ADAPTER, cb: Cb, cache: Option<MEMORY_CACHING_TYPE>) {
    let cached = cache != Some(MmNonCached);
    (a.DmaOperations.FreeCommonBuffer)(a, cb.len, PHYSICAL_ADDRESS::new(cb.logical), cb.va, cached);
}

/// The domain adapter `a` is in now (the model's view of it, for its page table and
/// buffers).
pub fn current_domain(a: &DMA_ADAPTER) -> Result<Arc<DmaDomain>, Failure> {
    a.core()
        .current_domain()
        .ok_or_else(|| Failure("the adapter is in no DMA domain; expected one".into()))
}

/// Size of the rings [`DomainQueue`] uses (descriptors).
pub const DOMAIN_QUEUE_SIZE: u32 = 64;

/// A device queue bound to an adapter's DMA domain, its ring and its completion records in
/// two 4 KiB domain common buffers of that adapter: how a driver has the device work on
/// its common buffers. [`DomainQueue::close`] idles and disables the queue and frees its
/// buffers; dropping it without closing only disables the queue (the buffers go with the
/// adapter's domain).
pub struct DomainQueue<'b> {
    /// The queue and its records (`None` once closed).
    live: Option<(DmaQueue<'b>, CompletionRecords)>,
    ring: Cb,
    cpl: Cb,
    records: usize,
    next: usize,
}

impl std::fmt::Debug for DomainQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainQueue")
            .field("ring", &format_args!("{:#x}", self.ring.logical))
            .field("cpl", &format_args!("{:#x}", self.cpl.logical))
            .finish()
    }
}

impl<'b> DomainQueue<'b> {
    /// Queue `index` of the device on `dev`, bound to the domain adapter `a` is in
    /// (`domain`, its handle), with a ring of [`DOMAIN_QUEUE_SIZE`] descriptors.
    pub fn new(
        dev: &'b dyn DmaBackend,
        a: &DMA_ADAPTER,
        domain: HANDLE,
        index: u32,
    ) -> Result<Self, Failure> {
        let dom = current_domain(a)?;
        crate::check!(
            dom.id() == domain.0,
            "the adapter's domain has handle {:#x}, expected {:#x}",
            dom.id(),
            domain.0
        );
        let ring = alloc(a, domain, 4096, 0, MM_ANY_NODE_OK)?;
        let cpl = alloc(a, domain, 4096, 0, MM_ANY_NODE_OK)?;
        let alias = |logical| {
            dom.with_buffer(logical, |b| {
                // SAFETY: the aliases live in the queue and the records, which `close` (or
                // the drop) disposes of before the buffers are freed; the buffers are freed
                // only by `close`, after that. Nothing else frees them while the adapter's
                // domain lives.
                unsafe { b.buffer().alias() }
            })
        };
        let (Some(ring_buf), Some(cpl_buf)) = (alias(ring.logical), alias(cpl.logical)) else {
            return Err(Failure(
                "the ring or completion common buffer is not in the domain".into(),
            ));
        };
        let records = 4096 / std::mem::size_of::<CompletionRecord>();
        let cpls = CompletionRecords::with_buffer(cpl_buf, records, cpl.logical)?;
        let q = DmaQueue::with_ring(
            dev,
            QueueConfig::new(index, DOMAIN_QUEUE_SIZE, 0).in_domain(dom.index()),
            ring_buf,
            ring.logical,
        )?;
        Ok(DomainQueue {
            live: Some((q, cpls)),
            ring,
            cpl,
            records,
            next: 0,
        })
    }

    fn live(&mut self) -> Result<&mut (DmaQueue<'b>, CompletionRecords), Failure> {
        self.live
            .as_mut()
            .ok_or_else(|| Failure("the domain queue is closed".into()))
    }

    /// Submits `descs` (at most [`DOMAIN_QUEUE_SIZE`] - 1) as one submission, each with
    /// its own completion record (cleared first); returns the records' indices, for
    /// [`DomainQueue::wait`].
    pub fn submit(&mut self, descs: &[Descriptor]) -> Result<std::ops::Range<usize>, Failure> {
        let n = descs.len();
        crate::check!(
            n < DOMAIN_QUEUE_SIZE as usize && n <= self.records,
            "a batch of {n} descriptors does not fit the ring of {DOMAIN_QUEUE_SIZE}"
        );
        let first = if self.next + n > self.records {
            0
        } else {
            self.next
        };
        self.next = first + n;
        let (q, cpls) = self.live()?;
        let mut with = Vec::with_capacity(n);
        for (k, d) in descs.iter().enumerate() {
            cpls.clear(first + k);
            with.push(d.with_completion(cpls.device_addr(first + k)));
        }
        q.submit(&with)?;
        Ok(first..first + n)
    }

    /// Waits (each at most [`COMPLETION_TIMEOUT`]) for the completions of `records` and
    /// returns them in order.
    pub fn wait(
        &mut self,
        records: std::ops::Range<usize>,
    ) -> Result<Vec<CompletionRecord>, Failure> {
        let (q, cpls) = self.live()?;
        let mut out = Vec::with_capacity(records.len());
        for i in records {
            out.push(q.wait_completion(cpls, i, COMPLETION_TIMEOUT)?);
        }
        Ok(out)
    }

    /// Runs `descs` (at most [`DOMAIN_QUEUE_SIZE`] - 1) as one submission and returns
    /// their completions in order.
    pub fn run_batch(&mut self, descs: &[Descriptor]) -> Result<Vec<CompletionRecord>, Failure> {
        let records = self.submit(descs)?;
        self.wait(records)
    }

    /// Runs one descriptor and returns its completion.
    pub fn run(&mut self, desc: Descriptor) -> Result<CompletionRecord, Failure> {
        let mut c = self.run_batch(&[desc])?;
        Ok(c.remove(0))
    }

    /// COPYs `len` bytes from logical `src` to logical `dst` of the domain and checks that
    /// it completed with STATUS_OK and `len` bytes.
    pub fn copy(&mut self, src: u64, dst: u64, len: u32, what: &str) -> TestResult {
        let c = self.run(Descriptor::copy(src, dst, len))?;
        check_status(&c, spec::STATUS_OK, format!("COPY {what}"))?;
        crate::check_eq!(c.bytes, len, "COPY {what}: bytes completed");
        Ok(())
    }

    /// Waits for the queue to go idle, disables it and frees its ring and completion
    /// buffers with `a` (the adapter that allocated them).
    pub fn close(mut self, a: &DMA_ADAPTER) -> TestResult {
        if let Some((mut q, cpls)) = self.live.take() {
            q.wait_idle(COMPLETION_TIMEOUT)?;
            q.disable()?;
            drop(q);
            drop(cpls);
            free(a, self.ring);
            free(a, self.cpl);
        }
        Ok(())
    }
}

impl RunOne for DomainQueue<'_> {
    fn run(&mut self, desc: Descriptor) -> Result<CompletionRecord, Failure> {
        DomainQueue::run(self, desc)
    }
}

impl Drop for DomainQueue<'_> {
    fn drop(&mut self) {
        if let Some((q, _)) = &self.live {
            // Best effort: a scenario that failed leaves no queue running on its memory.
            let _ = q.disable();
        }
    }
}

/// A driver's path through the device: a version-3 adapter, its DMA domain, a
/// [`DomainQueue`] bound to it, and a source and a destination common buffer of the same
/// size that the device copies between. Scenarios stage data in `src` (through its virtual
/// address, e.g. with `WdfMemoryCopyToBuffer`), have the device move it with
/// [`Mover::copy`], and take it from `dst`. [`Mover::close`] frees everything and puts the
/// adapter.
pub struct Mover<'b> {
    /// The adapter.
    pub adapter: PDMA_ADAPTER,
    /// Its DMA domain.
    pub domain: HANDLE,
    /// The source buffer.
    pub src: Cb,
    /// The destination buffer.
    pub dst: Cb,
    /// The queue.
    pub queue: DomainQueue<'b>,
}

impl std::fmt::Debug for Mover<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mover")
            .field("domain", &self.domain)
            .field("src", &self.src)
            .field("dst", &self.dst)
            .finish()
    }
}

/// Byte a [`Mover`]'s destination is filled with before each copy, so that a copy the
/// device skipped shows.
pub const MOVER_POISON: u8 = 0x5a;

impl<'b> Mover<'b> {
    /// A path with a new 64-bit adapter of `drv`'s device and buffers of `len` bytes.
    pub fn new(drv: &Driver, dev: &'b dyn DmaBackend, len: u32) -> Result<Self, Failure> {
        Self::with_adapter(drv.adapter(64)?, dev, len)
    }

    /// A path with `adapter` (its DMA domain is created or reused) and buffers of `len`
    /// bytes.
    pub fn with_adapter(
        adapter: PDMA_ADAPTER,
        dev: &'b dyn DmaBackend,
        len: u32,
    ) -> Result<Self, Failure> {
        let domain = (adapter.DmaOperations.GetDmaDomain)(&adapter);
        crate::check!(!domain.is_null(), "GetDmaDomain: NULL; expected a domain");
        let queue = DomainQueue::new(dev, &adapter, domain, 0)?;
        let src = alloc(&adapter, domain, len, 0, MM_ANY_NODE_OK)?;
        let dst = alloc(&adapter, domain, len, 0, MM_ANY_NODE_OK)?;
        Ok(Mover {
            adapter,
            domain,
            src,
            dst,
            queue,
        })
    }

    /// Fills `dst[..len]` with [`MOVER_POISON`], then has the device COPY `src[..len]` to
    /// it, checking the completion.
    pub fn copy(&mut self, len: usize, what: &str) -> TestResult {
        crate::check!(
            len <= self.src.len as usize,
            "{what}: {len} bytes do not fit the {}-byte buffers",
            self.src.len
        );
        self.dst.write(0, &vec![MOVER_POISON; len]);
        let (src, dst) = (self.src.logical, self.dst.logical);
        self.queue.copy(src, dst, len as u32, what)
    }

    /// Closes the queue, frees the buffers and puts the adapter.
    pub fn close(self) -> TestResult {
        let Mover {
            adapter,
            src,
            dst,
            queue,
            ..
        } = self;
        queue.close(&adapter)?;
        free(&adapter, src);
        free(&adapter, dst);
        let left = adapter.core().buffer_count();
        crate::check_eq!(
            left,
            0,
            "common buffers the adapter still has before PutDmaAdapter"
        );
        (adapter.DmaOperations.PutDmaAdapter)(adapter);
        Ok(())
    }
}

/// Loads a driver on `backend`, sets up a [`Mover`] of `len`-byte buffers on the device
/// `dev` and runs `f` with it, its adapter, the adapter's DMA domain (handle) and the
/// model's view of that domain; then closes the mover (buffers freed, adapter put) and
/// unloads the driver, checking for leaks ([`with_driver`]).
pub fn with_mover(
    backend: SharedBackend,
    dev: &dyn DmaBackend,
    len: u32,
    f: impl FnOnce(&mut Mover<'_>, &DMA_ADAPTER, HANDLE, &DmaDomain) -> TestResult,
) -> TestResult {
    with_driver(backend, |drv| {
        let mut mv = Mover::new(drv, dev, len)?;
        let (a, d) = (Arc::clone(&mv.adapter), mv.domain);
        let dom = current_domain(&a)?;
        f(&mut mv, &a, d, &dom)?;
        // The adapter is put by the mover, with no other reference to it left.
        drop(dom);
        drop(a);
        mv.close()
    })
}

/// The bytes of memory object `m`: its whole buffer, as `WdfMemoryGetBuffer` describes it.
pub fn memory_bytes(m: WDFMEMORY) -> Vec<u8> {
    let mut size = 0;
    let p = WdfMemoryGetBuffer(m, Some(&mut size)).cast::<u8>();
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: a live memory object's buffer is valid for reads of the size it reports, and
    // the scenarios read it only while nothing (the device included) writes it.
    unsafe { std::slice::from_raw_parts(p, size) }.to_vec()
}

/// `WdfMemoryCopyFromBuffer` of `data` to `offset` of `m`.
pub fn copy_from_slice(m: WDFMEMORY, offset: usize, data: &[u8]) -> NTSTATUS {
    // SAFETY: `data` is valid for reads of its length and is not the memory's buffer.
    unsafe { WdfMemoryCopyFromBuffer(m, offset, data.as_ptr().cast(), data.len()) }
}

/// `WdfMemoryCopyToBuffer` of `n` bytes at `offset` of `m` into a new vector (zeroed
/// first); the status and the vector.
pub fn copy_to_vec(m: WDFMEMORY, offset: usize, n: usize) -> (NTSTATUS, Vec<u8>) {
    let mut v = vec![0u8; n];
    // SAFETY: `v` is valid for writes of `n` bytes and is not the memory's buffer.
    let s = unsafe { WdfMemoryCopyToBuffer(m, offset, v.as_mut_ptr().cast(), n) };
    (s, v)
}

/// The address of byte `cb_offset` of common buffer `cb`, checking that `n` bytes from
/// there are inside it.
fn cb_range(cb: &Cb, cb_offset: usize, n: usize) -> *mut u8 {
    assert!(
        cb_offset + n <= cb.len as usize,
        "{n} bytes at {cb_offset:#x} are outside the {}-byte common buffer",
        cb.len
    );
    cb.va.cast::<u8>().wrapping_add(cb_offset)
}

/// `WdfMemoryCopyToBuffer` of `n` bytes at `off` of `m` into common buffer `cb` at `cb_off`
/// (which must hold them). `cb` must not have been freed.
pub fn memory_to_common(m: WDFMEMORY, off: usize, cb: &Cb, cb_off: usize, n: usize) -> NTSTATUS {
    let dst = cb_range(cb, cb_off, n);
    // SAFETY: `cb` is a live common buffer (the caller's promise) and the range is inside
    // it (checked); the device does not access it during the copy; it is not the memory
    // object's buffer unless a scenario made a preallocated object over it, which it does
    // not pass here.
    unsafe { WdfMemoryCopyToBuffer(m, off, dst.cast(), n) }
}

/// `WdfMemoryCopyFromBuffer` of `n` bytes of common buffer `cb` at `cb_off` (which must hold
/// them) to `off` of `m`. `cb` must not have been freed.
pub fn common_to_memory(m: WDFMEMORY, off: usize, cb: &Cb, cb_off: usize, n: usize) -> NTSTATUS {
    let src = cb_range(cb, cb_off, n).cast_const();
    // SAFETY: as in `memory_to_common`, in the other direction (the DMA that wrote the
    // buffer has completed).
    unsafe { WdfMemoryCopyFromBuffer(m, off, src.cast(), n) }
}

/// A driver-created request (`WdfRequestCreate`, no I/O target): the parent scenarios hang
/// memory on. `attributes` may name cleanup callbacks.
pub fn request(attributes: Option<&WDF_OBJECT_ATTRIBUTES>) -> Result<WDFREQUEST, Failure> {
    let mut r = WDFREQUEST::NULL;
    let s = WdfRequestCreate(attributes, WDFOBJECT::NULL, Some(&mut r));
    crate::check_eq!(s, STATUS_SUCCESS, "WdfRequestCreate");
    Ok(r)
}

/// Object attributes of a lookaside list and of its memory objects.
pub type ListAttributes<'a> = (
    Option<&'a WDF_OBJECT_ATTRIBUTES>,
    Option<&'a WDF_OBJECT_ATTRIBUTES>,
);

/// `WdfLookasideListCreate` of `size`-byte buffers from `pool` tagged `tag`, with the list's
/// and its memory objects' attributes `(list, memory)`, which must succeed.
pub fn lookaside(
    size: usize,
    pool: POOL_TYPE,
    tag: u32,
    (list, memory): ListAttributes<'_>,
) -> Result<WDFLOOKASIDE, Failure> {
    let mut l = WDFLOOKASIDE::NULL;
    let s = WdfLookasideListCreate(list, size, pool, memory, tag, Some(&mut l));
    crate::check_eq!(
        s,
        STATUS_SUCCESS,
        "WdfLookasideListCreate({size} bytes, pool {pool:?}, tag {})",
        PoolTag(tag)
    );
    crate::check!(
        !l.is_null(),
        "WdfLookasideListCreate: success with a NULL handle"
    );
    Ok(l)
}

/// `WdfMemoryCreateFromLookaside`, which must succeed.
pub fn from_lookaside(l: WDFLOOKASIDE) -> Result<WDFMEMORY, Failure> {
    let mut m = WDFMEMORY::NULL;
    let s = WdfMemoryCreateFromLookaside(l, Some(&mut m));
    crate::check_eq!(s, STATUS_SUCCESS, "WdfMemoryCreateFromLookaside({l:?})");
    crate::check!(
        !m.is_null(),
        "WdfMemoryCreateFromLookaside: success with a NULL handle"
    );
    Ok(m)
}

/// The lookaside list's counters (it must be live).
pub fn list_stats(
    l: WDFLOOKASIDE,
) -> Result<domdma_driver_model::lookaside::LookasideStats, Failure> {
    lookaside_stats(l).ok_or_else(|| Failure(format!("{l:?} is not a live lookaside list")))
}
