//! The WDF-shaped facade: the seeds' APIs with their documented names, parameters,
//! handles, `NTSTATUS` results, object attributes and parent/child deletion, over the
//! crate's idiomatic core ([`crate::pool`], [`crate::lookaside`], [`crate::irql`],
//! [`crate::verifier`]).
//!
//! Code written against the documented APIs reads the same here:
//!
//! ```
//! use domdma_driver_model::status::*;
//! use domdma_driver_model::wdf::*;
//!
//! let mut driver_object = DRIVER_OBJECT::new();
//! let config = WDF_DRIVER_CONFIG::default();
//! let status = WdfDriverCreate(&mut driver_object, r"\Registry\Machine\System\CurrentControlSet\Services\domdma",
//!     WDF_NO_OBJECT_ATTRIBUTES, &config, None);
//! assert!(NT_SUCCESS(status));
//!
//! let mut lookaside = WDFLOOKASIDE::NULL;
//! let status = WdfLookasideListCreate(WDF_NO_OBJECT_ATTRIBUTES, 256, NonPagedPool,
//!     WDF_NO_OBJECT_ATTRIBUTES, u32::from_le_bytes(*b"Look"), Some(&mut lookaside));
//! assert_eq!(status, STATUS_SUCCESS);
//!
//! let mut memory = WDFMEMORY::NULL;
//! assert_eq!(WdfMemoryCreateFromLookaside(lookaside, Some(&mut memory)), STATUS_SUCCESS);
//! let mut size = 0;
//! let buffer = WdfMemoryGetBuffer(memory, Some(&mut size));
//! assert!(!buffer.is_null() && size == 256);
//! WdfObjectDelete(memory);
//! WdfObjectDelete(lookaside);
//! assert!(driver_object.unload().is_empty(), "no pool leaks");
//! ```
//!
//! Every rule this facade implements, with the source it comes from, is listed in
//! docs/wdf-behaviour-sources.md; driver-model/tests/wdf_rules.rs has one test per rule.

pub mod coverage;
mod device;
mod dma;
mod driver;
mod memory;
mod object;
mod pool;

pub use device::*;
pub use dma::*;
pub use driver::*;
pub use memory::*;
pub use object::*;
pub use pool::*;

pub(crate) use memory::LookasideBody;
