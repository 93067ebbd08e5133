//! domdma test kit (`publish = false`): what the project's tests share.
//!
//! - [`conformance`]: the conformance suite. Every device and driver behaviour is a
//!   scenario written once against [`DmaBackend`](domdma_driver_model::backend::DmaBackend)
//!   and the WDF facade, in files by area, and run on every back end with the same names:
//!   in-process and vfio-user (the real server) under `cargo test`
//!   (`device/tests/conformance.rs`), VFIO inside the QEMU guest (`domdma-guest-tests`).
//!   A scenario declares what it needs ([`conformance::Need`]) and is skipped with the
//!   reason where the back end or guest profile lacks it.
//! - [`check`](mod@check): failures, the `check!` / `check_eq!` macros and the checks scenarios share
//!   (completion status, fault, bytes).
//! - [`fixtures`]: seeded random data unique per page, canary-guarded buffers, queues (in
//!   translated domains too), fault-record and counter checks, a software CRC32C.
//! - [`core_driver`]: a driver of the device core itself (no back end), for the device's
//!   internal tests and benchmarks;
//! - [`launcher`]: the one launcher of the `domdma-device` server binary (readiness by
//!   connecting to its socket, log captured, killed on drop). The binary is found by the
//!   test harness (Cargo's `CARGO_BIN_EXE_domdma-device`, or `DOMDMA_DEVICE_BIN`), never
//!   built here.

pub mod bench_record;
pub mod check;
pub mod conformance;
pub mod core_driver;
pub mod fixtures;
pub mod launcher;
pub mod wdf;
