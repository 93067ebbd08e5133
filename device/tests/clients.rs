//! Clients that misbehave in time or in number cannot stop the server: a silent or slow
//! client is dropped after the handshake or message limit, a negotiated idle client is
//! kept, waiting clients are served in the order they came, a client that does not read
//! its replies is dropped, and a message whose descriptors the kernel had to drop (the
//! server out of descriptors) gets an error reply on a connection that stays.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use domdma_device::core::DeviceConfig;
use domdma_device::vfio_user::ServerOptions;

const LIMIT: Duration = Duration::from_millis(400);

fn server() -> TestServer {
    TestServer::start_with_options(
        DeviceConfig::default(),
        ServerOptions {
            handshake_timeout: LIMIT,
            message_timeout: LIMIT,
            ..ServerOptions::default()
        },
    )
}

/// Wait (bounded) until the server closes `s`; returns how long that took.
#[track_caller]
fn closed_within(s: &mut UnixStream, max: Duration) -> Duration {
    let t = Instant::now();
    s.set_read_timeout(Some(max)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return t.elapsed(),
            Ok(_) => {}
            Err(e) => panic!("the server did not close the connection within {max:?}: {e}"),
        }
    }
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_limit_and_the_next_is_served() {
    let srv = server();
    let mut silent = UnixStream::connect(&srv.path).unwrap();
    let t = Instant::now();
    // Queued behind the silent one; served once it is dropped.
    let mut next = srv.connect();
    next.handshake();
    assert!(
        t.elapsed() >= LIMIT,
        "served before the silent client's limit"
    );
    closed_within(&mut silent, Duration::from_secs(5));
    next.call(
        DEVICE_GET_INFO,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
        &[],
    )
    .ok(DEVICE_GET_INFO);
}

#[test]
fn commands_without_version_do_not_extend_the_handshake() {
    let srv = server();
    let mut c = srv.connect();
    let t = Instant::now();
    let get_info = message(
        1,
        DEVICE_GET_INFO,
        0,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
    );
    loop {
        // Each gets an error reply (no VERSION yet) until the server drops the client.
        if std::io::Write::write_all(&mut c.stream, &get_info).is_err() {
            break;
        }
        let mut h = [0u8; 16];
        if c.stream.read_exact(&mut h).is_err() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never dropped");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(t.elapsed() >= LIMIT);
}

#[test]
fn a_partial_header_is_dropped_after_the_message_limit() {
    let srv = server();
    let mut c = srv.connect();
    c.handshake();
    c.send_raw(&header(1, REGION_READ, 32, 0)[..8]);
    let took = closed_within(&mut c.stream, Duration::from_secs(5));
    assert!(took >= LIMIT, "dropped after {took:?}, before the limit");
    srv.connect().handshake();
}

#[test]
fn a_message_trickled_byte_by_byte_is_dropped_after_the_message_limit() {
    let srv = server();
    let mut c = srv.connect();
    c.handshake();
    let msg = message(1, REGION_READ, 0, &fields(&[&0u64, &0u32, &4u32]));
    let t = Instant::now();
    let mut dropped = false;
    for b in &msg[..msg.len() - 1] {
        if std::io::Write::write_all(&mut c.stream, &[*b]).is_err() {
            dropped = true;
            break;
        }
        std::thread::sleep(LIMIT / 8);
        if t.elapsed() > LIMIT * 4 {
            break;
        }
    }
    if !dropped {
        closed_within(&mut c.stream, Duration::from_secs(5));
    }
    assert!(
        t.elapsed() < LIMIT * 6,
        "the trickle held the connection too long"
    );
}

#[test]
fn a_negotiated_idle_client_is_never_timed_out() {
    let srv = server();
    let mut c = srv.connect();
    c.handshake();
    std::thread::sleep(LIMIT * 4);
    // Still served, and a complete message takes no limit.
    let info = c
        .call(
            DEVICE_GET_INFO,
            &fields(&[&16u32, &0u32, &0u32, &0u32]),
            &[],
        )
        .ok(DEVICE_GET_INFO);
    assert_eq!(info.u32_at(8), 9, "num_regions");
}

#[test]
fn waiting_clients_are_served_in_the_order_they_came() {
    let srv = server();
    let mut first = srv.connect();
    first.handshake();
    // Three more queue up, each with its VERSION sent.
    let mut waiting: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = srv.connect();
            c.send(VERSION, 0, &Client::version_payload(0, 0, QEMU_CAPS), &[]);
            std::thread::sleep(Duration::from_millis(20));
            c
        })
        .collect();
    drop(first);
    for i in 0..waiting.len() {
        let r = waiting[i].recv();
        assert_eq!(r.command, VERSION, "client {i}");
        assert!(!r.is_error(), "client {i}: {r:?}");
        // The ones behind it have had no answer yet.
        for (j, later) in waiting.iter_mut().enumerate().skip(i + 1) {
            later.stream.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let e = later.stream.read(&mut b).unwrap_err();
            assert_eq!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "client {j} served before {i}"
            );
            later.stream.set_nonblocking(false).unwrap();
        }
        waiting[i]
            .stream
            .shutdown(std::net::Shutdown::Both)
            .unwrap();
    }
}

#[test]
fn a_client_that_does_not_read_its_replies_is_dropped() {
    let srv = server();
    let mut c = srv.connect();
    c.handshake();
    // Ask for big replies and never read them: the socket buffers fill, the reply send
    // waits, and the message limit ends the connection.
    let read = message(
        1,
        REGION_READ,
        0,
        &fields(&[&0u64, &CONFIG_REGION, &256u32]),
    );
    c.stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    while std::io::Write::write_all(&mut c.stream, &read).is_ok() {
        assert!(t.elapsed() < Duration::from_secs(20), "never dropped");
    }
    // The next client is served.
    srv.connect().handshake();
}
