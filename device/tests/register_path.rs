//! The register path is lean: once a client has negotiated, REGION_READ and REGION_WRITE
//! round trips allocate nothing in the whole server process (the payload and reply buffers
//! are kept between messages, the reply is built in place), and posted writes (no reply
//! asked) are carried out in order before a later read.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use common::*;
use domdma_device::spec::{REGS_BAR, REG_SCRATCH};

/// Counts every allocation in this test process (the server runs in it, on its threads).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for alloc.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for alloc.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A REGION_READ or REGION_WRITE of 4 bytes at REG_SCRATCH.
fn access(command: u16, flags: u32, value: Option<u32>) -> Vec<u8> {
    let count = 4u32;
    let mut payload = fields(&[&REG_SCRATCH, &(REGS_BAR as u32), &count]);
    if let Some(v) = value {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    message(7, command, flags, &payload)
}

/// Sends `req` and reads a reply of exactly `buf.len()` bytes, allocating nothing.
fn round_trip(s: &mut std::os::unix::net::UnixStream, req: &[u8], buf: &mut [u8]) {
    s.write_all(req).unwrap();
    s.read_exact(buf).unwrap();
    assert_eq!(buf[8] & 0x0f, F_REPLY as u8, "a reply");
    assert_eq!(buf[8] & F_ERROR as u8, 0, "not an error reply");
}

#[test]
fn register_round_trips_allocate_nothing() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let write = access(REGION_WRITE, 0, Some(0x1234_5678));
    let read = access(REGION_READ, 0, None);
    let mut write_reply = [0u8; 32];
    let mut read_reply = [0u8; 36];
    // Warm up: buffers reach their sizes, lazy statics are made.
    for _ in 0..200 {
        round_trip(&mut c.stream, &write, &mut write_reply);
        round_trip(&mut c.stream, &read, &mut read_reply);
    }
    const N: u64 = 10_000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..N {
        round_trip(&mut c.stream, &write, &mut write_reply);
        round_trip(&mut c.stream, &read, &mut read_reply);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert_eq!(
        u32::from_le_bytes(read_reply[32..].try_into().unwrap()),
        0x1234_5678
    );
    // Other threads (event loop, logging) may allocate now and then, never per message.
    assert!(
        allocations < N / 100,
        "{allocations} allocations for {} register round trips",
        2 * N
    );
}

#[test]
fn posted_writes_are_carried_out_in_order_before_a_later_read() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    // QEMU posts BAR writes (no reply) and sends the next message at once.
    let mut burst = Vec::new();
    for v in 1..=100u32 {
        burst.extend_from_slice(&access(REGION_WRITE, F_NO_REPLY, Some(v)));
    }
    burst.extend_from_slice(&access(REGION_READ, 0, None));
    c.stream.write_all(&burst).unwrap();
    let mut reply = [0u8; 36];
    c.stream.read_exact(&mut reply).unwrap();
    assert_eq!(u16::from_le_bytes([reply[2], reply[3]]), REGION_READ);
    assert_eq!(
        u32::from_le_bytes(reply[32..].try_into().unwrap()),
        100,
        "the read sees the last posted write"
    );
}
