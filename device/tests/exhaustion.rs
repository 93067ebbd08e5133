//! Exhaustion gets error replies on a connection that stays: DMA mappings past the
//! advertised `max_dma_maps` (which the descriptor limit sizes), a message whose
//! descriptors the kernel drops because the server is out of descriptors, and address
//! space that runs out under a DMA_MAP.
//!
//! One test in its own binary: it lowers this process's resource limits.

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;

use common::*;

const RW: u32 = 3;
const FD_LIMIT: u64 = 400;
/// What the server keeps free of mappings (server.rs FD_RESERVE).
const RESERVE: u64 = 64 + 253;

fn set_limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the structure we pass.
    assert_eq!(unsafe { libc::setrlimit(resource, &lim) }, 0, "setrlimit");
}

fn advertised_max_dma_maps(r: &Reply) -> u64 {
    let json = std::str::from_utf8(&r.payload[4..r.payload.len() - 1]).unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["capabilities"]["max_dma_maps"].as_u64().unwrap()
}

fn vm_size() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        << 10
}

#[test]
fn exhaustion_gets_error_replies_and_the_connection_stays() {
    // The server raises the soft limit to the hard one: lower both.
    set_limit(libc::RLIMIT_NOFILE, FD_LIMIT, FD_LIMIT);
    let srv = TestServer::start();
    let mut c = srv.connect();
    let v = c.handshake();
    let max = advertised_max_dma_maps(&v);
    assert_eq!(
        max,
        FD_LIMIT - RESERVE,
        "max_dma_maps follows the descriptor limit"
    );

    // Maps up to the advertised number succeed; one more is ENOSPC.
    let ram = memfd(4096 * (max + 1));
    for i in 0..max {
        c.dma_map(RW, i * 4096, 0x10_0000 + i * 4096, 4096, Some(raw(&ram)))
            .ok(DMA_MAP);
    }
    c.dma_map(
        RW,
        max * 4096,
        0x10_0000 + max * 4096,
        4096,
        Some(raw(&ram)),
    )
    .err(libc::ENOSPC);
    c.dma_unmap(2, 0, 0).ok(DMA_UNMAP);

    // Out of descriptors: the kernel drops the DMA_MAP's memfd; the reply says EMFILE.
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
        assert!(fillers.len() < FD_LIMIT as usize, "never ran out");
    }
    c.dma_map(RW, 0, 0x10_0000, 4096, Some(raw(&ram)))
        .err(libc::EMFILE);
    drop(fillers);
    c.dma_map(RW, 0, 0x10_0000, 4096, Some(raw(&ram)))
        .ok(DMA_MAP);
    c.dma_unmap(2, 0, 0).ok(DMA_UNMAP);

    // Out of address space: mmap fails, the reply says ENOMEM.
    let big = memfd(1 << 30);
    let limit = vm_size() + (256 << 20);
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the structure we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut old) }, 0);
    set_limit(libc::RLIMIT_AS, limit, old.rlim_max);
    let r = c.dma_map(RW, 0, 0x4000_0000, 1 << 30, Some(big.as_raw_fd()));
    set_limit(libc::RLIMIT_AS, old.rlim_cur, old.rlim_max);
    r.err(libc::ENOMEM);

    // The connection is still good.
    c.dma_map(RW, 0, 0x10_0000, 4096, Some(raw(&ram)))
        .ok(DMA_MAP);
    c.call(
        DEVICE_GET_INFO,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
        &[],
    )
    .ok(DEVICE_GET_INFO);
}
