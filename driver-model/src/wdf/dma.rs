//! The WDM DMA v3 interface: `IoGetDmaAdapter` with a version-3 `DEVICE_DESCRIPTION`, and
//! the `DMA_OPERATIONS` a driver calls through the adapter: `GetDmaAdapterInfo`,
//! `GetDmaDomain`, `JoinDmaDomain`, `LeaveDmaDomain`, `AllocateDomainCommonBuffer`,
//! `FreeCommonBuffer`, `PutDmaAdapter`, over [`crate::dma`].
//!
//! Calls read as in C: `(adapter.DmaOperations.AllocateDomainCommonBuffer)(&adapter, ...)`.
//! Parameter rules are DESIGN.md's (docs/wdf-behaviour-sources.md section 8 gives the
//! documented values); where Windows documents no code, the choice is written here.

#![allow(non_snake_case, non_camel_case_types, non_upper_case_globals)]

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use super::device::device_dma;
use super::object::WDFDEVICE;
use crate::dma::{Adapter, CommonBufferRequest, DmaDevice, DmaError};
use crate::irql::{KeGetCurrentIrql, PASSIVE_LEVEL};
use crate::pool::PAGE_SIZE;
use crate::status::*;
use crate::verifier::{
    bug_check, BugCheck, DMA_VIOLATION_COMMON_BUFFERS_OUTSTANDING,
    DMA_VIOLATION_EXTRA_COMMON_BUFFER_FREE, DRIVER_VERIFIER_DMA_VIOLATION,
};

/// `PHYSICAL_ADDRESS` (a `LARGE_INTEGER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PHYSICAL_ADDRESS {
    /// The address.
    pub QuadPart: i64,
}

impl PHYSICAL_ADDRESS {
    /// The address `a`.
    pub const fn new(a: u64) -> Self {
        PHYSICAL_ADDRESS { QuadPart: a as i64 }
    }
}

/// A kernel `HANDLE` (here: a DMA domain's handle value; NULL is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct HANDLE(pub u64);

impl HANDLE {
    /// The NULL handle.
    pub const NULL: HANDLE = HANDLE(0);

    /// Whether it is NULL.
    pub fn is_null(self) -> bool {
        self.0 == 0
    }
}

/// `MEMORY_CACHING_TYPE` (a value, so undefined values can be passed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MEMORY_CACHING_TYPE(pub i32);
/// Not cached.
pub const MmNonCached: MEMORY_CACHING_TYPE = MEMORY_CACHING_TYPE(0);
/// Cached.
pub const MmCached: MEMORY_CACHING_TYPE = MEMORY_CACHING_TYPE(1);
/// Write combined (refused by `AllocateDomainCommonBuffer`).
pub const MmWriteCombined: MEMORY_CACHING_TYPE = MEMORY_CACHING_TYPE(2);
/// Hardware coherent cached (refused by `AllocateDomainCommonBuffer`).
pub const MmHardwareCoherentCached: MEMORY_CACHING_TYPE = MEMORY_CACHING_TYPE(3);

/// `NODE_REQUIREMENT`: a NUMA node number or [`MM_ANY_NODE_OK`].
pub type NODE_REQUIREMENT = u32;
/// Any node will do.
pub const MM_ANY_NODE_OK: NODE_REQUIREMENT = 0x8000_0000;

/// `AllocateDomainCommonBuffer` flag: 2 MiB (`PAGE_SIZE * 512`) granularity.
pub const DOMAIN_COMMON_BUFFER_LARGE_PAGE: u32 = 1;

/// `DEVICE_DESCRIPTION_VERSION` values.
pub const DEVICE_DESCRIPTION_VERSION: u32 = 0;
/// Version 1.
pub const DEVICE_DESCRIPTION_VERSION1: u32 = 1;
/// Version 2.
pub const DEVICE_DESCRIPTION_VERSION2: u32 = 2;
/// Version 3: required for the DMA v3 operations.
pub const DEVICE_DESCRIPTION_VERSION3: u32 = 3;

/// `DEVICE_DESCRIPTION` (zero it, then set what matters: `Version`, `Master`,
/// `ScatterGather`, `DmaAddressWidth`, `MaximumLength`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DEVICE_DESCRIPTION {
    /// Structure version.
    pub Version: u32,
    /// A bus-master device (the only kind modelled).
    pub Master: bool,
    /// Scatter/gather capable.
    pub ScatterGather: bool,
    /// System DMA demand mode (ignored).
    pub DemandMode: bool,
    /// System DMA auto-initialize (ignored).
    pub AutoInitialize: bool,
    /// 32-bit addressing (ignored with version 3).
    pub Dma32BitAddresses: bool,
    /// Ignore the DMA counter (ignored).
    pub IgnoreCount: bool,
    /// Reserved.
    pub Reserved1: bool,
    /// 64-bit addressing (ignored with version 3).
    pub Dma64BitAddresses: bool,
    /// Bus number (ignored).
    pub BusNumber: u32,
    /// System DMA channel (ignored).
    pub DmaChannel: u32,
    /// Interface type (ignored).
    pub InterfaceType: u32,
    /// System DMA width (ignored).
    pub DmaWidth: u32,
    /// System DMA speed (ignored with version 3).
    pub DmaSpeed: u32,
    /// Largest transfer in bytes.
    pub MaximumLength: u32,
    /// System DMA port (ignored).
    pub DmaPort: u32,
    /// Address width in bits (version 3: 1..=64 for a bus master).
    pub DmaAddressWidth: u32,
    /// DMA controller instance (ignored).
    pub DmaControllerInstance: u32,
    /// DMA request line (ignored).
    pub DmaRequestLine: u32,
    /// Device address (ignored).
    pub DeviceAddress: PHYSICAL_ADDRESS,
}

/// `DMA_ADAPTER_INFO_VERSION1`.
pub const DMA_ADAPTER_INFO_VERSION1: u32 = 1;

/// `DMA_ADAPTER_INFO_V1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DMA_ADAPTER_INFO_V1 {
    /// Whether `ReadDmaCounter` is available (never, for a bus master).
    pub ReadDmaCounterAvailable: u32,
    /// Largest number of scatter/gather elements of one transfer.
    pub ScatterGatherLimit: u32,
    /// Address width in bits.
    pub DmaAddressWidth: u32,
    /// No flags are defined.
    pub Flags: u32,
    /// Smallest transfer unit in bytes.
    pub MinimumTransferUnit: u32,
}

/// What the model adds to `DMA_ADAPTER_INFO` (Windows has no fields for these): the
/// device's translation capabilities as its registers advertise them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DMA_ADAPTER_INFO_DOMDMA {
    /// Supported I/O page sizes, as a mask of sizes in bytes (4 KiB | 2 MiB | 1 GiB).
    pub SupportedPageSizes: u64,
    /// The device's IOVA width in bits (the adapter's may be smaller).
    pub DeviceIovaWidth: u32,
    /// DMA domains the device has (domain 0, pass-through, included).
    pub DomainCount: u32,
    /// Largest transfer of one descriptor.
    pub MaximumTransfer: u32,
}

/// `DMA_ADAPTER_INFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DMA_ADAPTER_INFO {
    /// Must be [`DMA_ADAPTER_INFO_VERSION1`] on input.
    pub Version: u32,
    /// The version-1 information.
    pub V1: DMA_ADAPTER_INFO_V1,
    /// The model's extension.
    pub DomDma: DMA_ADAPTER_INFO_DOMDMA,
}

/// `PGET_DMA_ADAPTER_INFO`.
pub type PGET_DMA_ADAPTER_INFO =
    fn(DmaAdapter: &DMA_ADAPTER, AdapterInfo: &mut DMA_ADAPTER_INFO) -> NTSTATUS;
/// `PGET_DMA_DOMAIN`.
pub type PGET_DMA_DOMAIN = fn(DmaAdapter: &DMA_ADAPTER) -> HANDLE;
/// `PJOIN_DMA_DOMAIN`.
pub type PJOIN_DMA_DOMAIN = fn(DmaAdapter: &DMA_ADAPTER, DomainHandle: HANDLE) -> NTSTATUS;
/// `PLEAVE_DMA_DOMAIN`.
pub type PLEAVE_DMA_DOMAIN = fn(DmaAdapter: &DMA_ADAPTER) -> NTSTATUS;
/// `PALLOCATE_DOMAIN_COMMON_BUFFER`.
pub type PALLOCATE_DOMAIN_COMMON_BUFFER = fn(
    DmaAdapter: &DMA_ADAPTER,
    DomainHandle: HANDLE,
    MaximumAddress: Option<&PHYSICAL_ADDRESS>,
    Length: u32,
    Flags: u32,
    CacheType: Option<&MEMORY_CACHING_TYPE>,
    PreferredNode: NODE_REQUIREMENT,
    LogicalAddress: &mut PHYSICAL_ADDRESS,
    VirtualAddress: &mut *mut c_void,
) -> NTSTATUS;
/// `PFREE_COMMON_BUFFER`.
pub type PFREE_COMMON_BUFFER = fn(
    DmaAdapter: &DMA_ADAPTER,
    Length: u32,
    LogicalAddress: PHYSICAL_ADDRESS,
    VirtualAddress: *mut c_void,
    CacheEnabled: bool,
);
/// `PPUT_DMA_ADAPTER`.
pub type PPUT_DMA_ADAPTER = fn(DmaAdapter: PDMA_ADAPTER);

/// `DMA_OPERATIONS` (the members this model implements).
#[derive(Debug)]
pub struct DMA_OPERATIONS {
    /// Size of the structure.
    pub Size: u32,
    /// Releases the adapter.
    pub PutDmaAdapter: PPUT_DMA_ADAPTER,
    /// Frees a common buffer.
    pub FreeCommonBuffer: PFREE_COMMON_BUFFER,
    /// Reports the adapter's capabilities.
    pub GetDmaAdapterInfo: PGET_DMA_ADAPTER_INFO,
    /// The adapter's DMA domain.
    pub GetDmaDomain: PGET_DMA_DOMAIN,
    /// Joins a DMA domain.
    pub JoinDmaDomain: PJOIN_DMA_DOMAIN,
    /// Leaves the DMA domain.
    pub LeaveDmaDomain: PLEAVE_DMA_DOMAIN,
    /// Allocates a common buffer in a DMA domain.
    pub AllocateDomainCommonBuffer: PALLOCATE_DOMAIN_COMMON_BUFFER,
}

/// The operations every adapter points at.
pub static DMA_OPERATIONS_V3: DMA_OPERATIONS = DMA_OPERATIONS {
    Size: std::mem::size_of::<DMA_OPERATIONS>() as u32,
    PutDmaAdapter,
    FreeCommonBuffer,
    GetDmaAdapterInfo,
    GetDmaDomain,
    JoinDmaDomain,
    LeaveDmaDomain,
    AllocateDomainCommonBuffer,
};

/// `DMA_ADAPTER`.
pub struct DMA_ADAPTER {
    /// Always 1 (as Windows returns).
    pub Version: u16,
    /// Size of the structure.
    pub Size: u16,
    /// The operations.
    pub DmaOperations: &'static DMA_OPERATIONS,
    description_version: u32,
    max_length: u32,
    adapter: Adapter,
}

impl fmt::Debug for DMA_ADAPTER {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DMA_ADAPTER")
            .field("adapter", &self.adapter)
            .finish()
    }
}

impl DMA_ADAPTER {
    /// The core adapter (for tests and tools: the domain index a queue binds to, counts).
    pub fn core(&self) -> &Adapter {
        &self.adapter
    }
}

/// A `PDMA_ADAPTER`.
pub type PDMA_ADAPTER = Arc<DMA_ADAPTER>;

/// The physical device object of a device (what `IoGetDmaAdapter` takes).
pub struct DEVICE_OBJECT {
    dma: Arc<DmaDevice>,
}

impl fmt::Debug for DEVICE_OBJECT {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DEVICE_OBJECT")
            .field("dma", &self.dma)
            .finish()
    }
}

/// A `PDEVICE_OBJECT`.
pub type PDEVICE_OBJECT = Arc<DEVICE_OBJECT>;

/// `WdfDeviceWdmGetPhysicalDevice`: the device's PDO. `None` for a device without
/// hardware, or when the hardware could not be set up for DMA (logged).
pub fn WdfDeviceWdmGetPhysicalDevice(Device: WDFDEVICE) -> Option<PDEVICE_OBJECT> {
    super::coverage::record(super::coverage::Api::WdfDeviceWdmGetPhysicalDevice);
    device_dma(Device, "WdfDeviceWdmGetPhysicalDevice").map(|dma| Arc::new(DEVICE_OBJECT { dma }))
}

/// `IoGetDmaAdapter`: an adapter for the device described. PASSIVE_LEVEL. Returns `None`
/// for a NULL PDO, a description that is not a bus master, an unknown version, or (version
/// 3) an address width outside 1..=64. `NumberOfMapRegisters` receives the number of map
/// registers a transfer of `MaximumLength` needs (capped by the device's maximum transfer).
/// Adapters from older description versions do not support the v3 operations
/// (`STATUS_NOT_SUPPORTED`).
pub fn IoGetDmaAdapter(
    PhysicalDeviceObject: Option<&DEVICE_OBJECT>,
    DeviceDescription: &DEVICE_DESCRIPTION,
    NumberOfMapRegisters: &mut u32,
) -> Option<PDMA_ADAPTER> {
    super::coverage::record(super::coverage::Api::IoGetDmaAdapter);
    if KeGetCurrentIrql() > PASSIVE_LEVEL {
        tracing::error!("IoGetDmaAdapter above PASSIVE_LEVEL");
        return None;
    }
    let pdo = PhysicalDeviceObject?;
    let d = DeviceDescription;
    if d.Version > DEVICE_DESCRIPTION_VERSION3 || !d.Master {
        tracing::error!("IoGetDmaAdapter: version {} master {}", d.Version, d.Master);
        return None;
    }
    let width = if d.Version == DEVICE_DESCRIPTION_VERSION3 {
        if d.DmaAddressWidth == 0 || d.DmaAddressWidth > 64 {
            tracing::error!("IoGetDmaAdapter: DmaAddressWidth {}", d.DmaAddressWidth);
            return None;
        }
        d.DmaAddressWidth
    } else if d.Dma64BitAddresses {
        64
    } else {
        32
    };
    let caps = pdo.dma.caps();
    let max = d.MaximumLength.min(caps.max_xfer).max(1);
    *NumberOfMapRegisters = max.div_ceil(PAGE_SIZE as u32) + 1;
    Some(Arc::new(DMA_ADAPTER {
        Version: 1,
        Size: std::mem::size_of::<DMA_ADAPTER>() as u16,
        DmaOperations: &DMA_OPERATIONS_V3,
        description_version: d.Version,
        max_length: max,
        adapter: pdo.dma.adapter(width),
    }))
}

/// Driver Verifier's DMA IRQL check: bug check 0xE6 / 0x13 (P3 the expected IRQL, P4 the
/// current one). `false` (after the bug check in record mode) when the IRQL is wrong.
fn dma_irql_passive(api: &str) -> bool {
    let irql = KeGetCurrentIrql();
    if irql == PASSIVE_LEVEL {
        return true;
    }
    bug_check(BugCheck::new(
        DRIVER_VERIFIER_DMA_VIOLATION,
        [0x13, 0, u64::from(PASSIVE_LEVEL), u64::from(irql)],
        format!("{api} at IRQL {irql}, must be PASSIVE_LEVEL"),
    ));
    false
}

fn v3(a: &DMA_ADAPTER) -> bool {
    a.description_version == DEVICE_DESCRIPTION_VERSION3
}

/// The first checks of a DDI for version 3 adapters at PASSIVE_LEVEL: the status to return
/// at another IRQL (`STATUS_INVALID_DEVICE_REQUEST`, after Driver Verifier's bug check) or
/// for an adapter not made from a version 3 description (`STATUS_NOT_SUPPORTED`); `None`
/// to go on.
fn v3_passive_refusal(api: &str, a: &DMA_ADAPTER) -> Option<NTSTATUS> {
    if !dma_irql_passive(api) {
        return Some(STATUS_INVALID_DEVICE_REQUEST);
    }
    (!v3(a)).then_some(STATUS_NOT_SUPPORTED)
}

/// `GetDmaAdapterInfo`: `Version` must be [`DMA_ADAPTER_INFO_VERSION1`]
/// (`STATUS_NOT_SUPPORTED` otherwise, and for a non-v3 adapter).
pub fn GetDmaAdapterInfo(DmaAdapter: &DMA_ADAPTER, AdapterInfo: &mut DMA_ADAPTER_INFO) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::GetDmaAdapterInfo);
    if !v3(DmaAdapter) || AdapterInfo.Version != DMA_ADAPTER_INFO_VERSION1 {
        return STATUS_NOT_SUPPORTED;
    }
    let caps = DmaAdapter.adapter.device().caps();
    let mut sizes = 0u64;
    for p in crate::iopt::PageSize::ALL {
        if caps.supports_page(p) {
            sizes |= p.bytes();
        }
    }
    AdapterInfo.V1 = DMA_ADAPTER_INFO_V1 {
        ReadDmaCounterAvailable: 0,
        ScatterGatherLimit: DmaAdapter.max_length.div_ceil(PAGE_SIZE as u32),
        DmaAddressWidth: DmaAdapter.adapter.width(),
        Flags: 0,
        MinimumTransferUnit: 1,
    };
    AdapterInfo.DomDma = DMA_ADAPTER_INFO_DOMDMA {
        SupportedPageSizes: sizes,
        DeviceIovaWidth: caps.iova_width,
        DomainCount: caps.domains,
        MaximumTransfer: caps.max_xfer,
    };
    STATUS_SUCCESS
}

/// `GetDmaDomain`: the adapter's DMA domain (made on a free device domain the first time).
/// NULL when no device domain is free, or for a non-v3 adapter. PASSIVE_LEVEL.
pub fn GetDmaDomain(DmaAdapter: &DMA_ADAPTER) -> HANDLE {
    super::coverage::record(super::coverage::Api::GetDmaDomain);
    if !dma_irql_passive("GetDmaDomain") || !v3(DmaAdapter) {
        return HANDLE::NULL;
    }
    match DmaAdapter.adapter.domain() {
        Ok(d) => HANDLE(d.id()),
        Err(e) => {
            tracing::error!("GetDmaDomain: {e}");
            HANDLE::NULL
        }
    }
}

/// Bug check 0xE6 / 0x07 for `n` buffers an adapter still has.
fn buffers_outstanding(api: &str, a: &DMA_ADAPTER, n: usize) {
    bug_check(BugCheck::new(
        DRIVER_VERIFIER_DMA_VIOLATION,
        [
            DMA_VIOLATION_COMMON_BUFFERS_OUTSTANDING,
            a.adapter.id(),
            n as u64,
            0,
        ],
        format!("{api}: the adapter still has {n} domain common buffer(s)"),
    ));
}

fn status_of(api: &str, a: &DMA_ADAPTER, e: DmaError) -> NTSTATUS {
    match e {
        DmaError::InvalidParameter(_) | DmaError::ForeignDomain(_) => STATUS_INVALID_PARAMETER,
        DmaError::InsufficientResources(_) | DmaError::NoFreeDomain(_) => {
            STATUS_INSUFFICIENT_RESOURCES
        }
        DmaError::NotSupported(_) => STATUS_NOT_SUPPORTED,
        DmaError::NoDomain => STATUS_INVALID_DEVICE_STATE,
        DmaError::BuffersOutstanding(n) => {
            buffers_outstanding(api, a, n);
            STATUS_INVALID_DEVICE_STATE
        }
        DmaError::NoSuchBuffer { .. } => STATUS_INVALID_PARAMETER,
        DmaError::Backend(_) | DmaError::Domain(_) => {
            tracing::error!("{api}: {e}");
            STATUS_IO_DEVICE_ERROR
        }
    }
}

/// `JoinDmaDomain`: puts the adapter in the domain (of the same device). An unknown or
/// foreign handle is `STATUS_INVALID_PARAMETER`; leaving the current domain with buffers in
/// it is Driver Verifier 0xE6 / 0x07 (`STATUS_INVALID_DEVICE_STATE` in record mode).
/// PASSIVE_LEVEL.
pub fn JoinDmaDomain(DmaAdapter: &DMA_ADAPTER, DomainHandle: HANDLE) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::JoinDmaDomain);
    const API: &str = "JoinDmaDomain";
    if let Some(status) = v3_passive_refusal(API, DmaAdapter) {
        return status;
    }
    match DmaAdapter.adapter.join(DomainHandle.0) {
        Ok(()) => STATUS_SUCCESS,
        Err(e) => status_of(API, DmaAdapter, e),
    }
}

/// `LeaveDmaDomain`: takes the adapter out of its domain. Not in a domain:
/// `STATUS_INVALID_DEVICE_STATE`. With common buffers it allocated still in the domain:
/// Driver Verifier 0xE6 / 0x07 (Windows documents nothing here; leaving would orphan the
/// buffers' mappings), `STATUS_INVALID_DEVICE_STATE` in record mode. PASSIVE_LEVEL.
pub fn LeaveDmaDomain(DmaAdapter: &DMA_ADAPTER) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::LeaveDmaDomain);
    const API: &str = "LeaveDmaDomain";
    if let Some(status) = v3_passive_refusal(API, DmaAdapter) {
        return status;
    }
    match DmaAdapter.adapter.leave() {
        Ok(()) => STATUS_SUCCESS,
        Err(e) => status_of(API, DmaAdapter, e),
    }
}

/// `AllocateDomainCommonBuffer`. PASSIVE_LEVEL (Driver Verifier 0xE6 / 0x13 otherwise).
///
/// - `DomainHandle` must be the adapter's domain (`STATUS_INVALID_PARAMETER`);
/// - `MaximumAddress`: NULL = no limit, else the inclusive last logical byte; also capped
///   by the adapter's address width (and so the device's IOVA width);
/// - `Length` > 0;
/// - `Flags`: only [`DOMAIN_COMMON_BUFFER_LARGE_PAGE`] (else `STATUS_INVALID_PARAMETER`):
///   length and alignment rounded to 2 MiB in logical and physical address, 2 MiB leaves;
///   no 2 MiB page available is `STATUS_INSUFFICIENT_RESOURCES`, never a fallback;
/// - `CacheType`: NULL (platform default: cached) or `MmCached` / `MmNonCached`, else
///   `STATUS_INVALID_PARAMETER`;
/// - `PreferredNode`: 0..N-1 or [`MM_ANY_NODE_OK`], else `STATUS_INVALID_PARAMETER`.
///
/// Returns the logical address (the IOVA in the domain) and the virtual address.
#[allow(clippy::too_many_arguments)] // The documented signature.
pub fn AllocateDomainCommonBuffer(
    DmaAdapter: &DMA_ADAPTER,
    DomainHandle: HANDLE,
    MaximumAddress: Option<&PHYSICAL_ADDRESS>,
    Length: u32,
    Flags: u32,
    CacheType: Option<&MEMORY_CACHING_TYPE>,
    PreferredNode: NODE_REQUIREMENT,
    LogicalAddress: &mut PHYSICAL_ADDRESS,
    VirtualAddress: &mut *mut c_void,
) -> NTSTATUS {
    super::coverage::record(super::coverage::Api::AllocateDomainCommonBuffer);
    const API: &str = "AllocateDomainCommonBuffer";
    if let Some(status) = v3_passive_refusal(API, DmaAdapter) {
        return status;
    }
    if Flags & !DOMAIN_COMMON_BUFFER_LARGE_PAGE != 0 || Length == 0 {
        return STATUS_INVALID_PARAMETER;
    }
    let cached = match CacheType {
        None => true,
        Some(&c) if c == MmCached => true,
        Some(&c) if c == MmNonCached => false,
        Some(_) => return STATUS_INVALID_PARAMETER,
    };
    let a = &DmaAdapter.adapter;
    let nodes = a.device().backend().numa_nodes();
    let node = match PreferredNode {
        MM_ANY_NODE_OK => None,
        n if n < nodes => Some(n),
        _ => return STATUS_INVALID_PARAMETER,
    };
    let maximum_address = match MaximumAddress {
        None => None,
        Some(m) if m.QuadPart < 0 => return STATUS_INVALID_PARAMETER,
        Some(m) => Some(m.QuadPart as u64),
    };
    let Some(domain) = a.current_domain().filter(|d| d.id() == DomainHandle.0) else {
        return STATUS_INVALID_PARAMETER;
    };
    let req = CommonBufferRequest {
        length: u64::from(Length),
        maximum_address,
        large_page: Flags & DOMAIN_COMMON_BUFFER_LARGE_PAGE != 0,
        node,
    };
    match a.allocate_common_buffer(&domain, req, cached) {
        Ok(got) => {
            *LogicalAddress = PHYSICAL_ADDRESS::new(got.logical);
            *VirtualAddress = got.virtual_address.as_ptr().cast();
            STATUS_SUCCESS
        }
        Err(e) => status_of(API, DmaAdapter, e),
    }
}

/// `FreeCommonBuffer`: the adapter, `Length`, `LogicalAddress`, `VirtualAddress` and
/// `CacheEnabled` must match an allocation exactly (`CacheEnabled` is TRUE for a cached
/// buffer; another adapter of the same domain did not allocate it). A
/// mismatch is Driver Verifier 0xE6 / 0x03 (freeing what is not an allocation) and frees
/// nothing. The mapping is removed and the IOTLB invalidated before the memory is
/// released. PASSIVE_LEVEL.
pub fn FreeCommonBuffer(
    DmaAdapter: &DMA_ADAPTER,
    Length: u32,
    LogicalAddress: PHYSICAL_ADDRESS,
    VirtualAddress: *mut c_void,
    CacheEnabled: bool,
) {
    super::coverage::record(super::coverage::Api::FreeCommonBuffer);
    const API: &str = "FreeCommonBuffer";
    if !dma_irql_passive(API) {
        return;
    }
    let logical = LogicalAddress.QuadPart as u64;
    match DmaAdapter.adapter.free_common_buffer(
        u64::from(Length),
        logical,
        VirtualAddress.cast(),
        CacheEnabled,
    ) {
        Ok(()) => {}
        Err(e @ (DmaError::NoSuchBuffer { .. } | DmaError::NoDomain)) => bug_check(BugCheck::new(
            DRIVER_VERIFIER_DMA_VIOLATION,
            [
                DMA_VIOLATION_EXTRA_COMMON_BUFFER_FREE,
                1,
                logical,
                u64::from(Length),
            ],
            format!("{API}: {e}"),
        )),
        Err(e) => tracing::error!("{API}: {e}"),
    }
}

/// `PutDmaAdapter`: releases the adapter. With common buffers outstanding it is Driver
/// Verifier 0xE6 / 0x07 (as documented). The adapter leaves its domain.
pub fn PutDmaAdapter(DmaAdapter: PDMA_ADAPTER) {
    super::coverage::record(super::coverage::Api::PutDmaAdapter);
    let n = DmaAdapter.adapter.buffer_count();
    if n > 0 {
        buffers_outstanding("PutDmaAdapter", &DmaAdapter, n);
        return;
    }
    let _ = DmaAdapter.adapter.leave();
}
