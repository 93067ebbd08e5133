//! Protocol loopback: the real server on a temporary socket, driven by a raw client.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use domdma_device::core::DeviceConfig;
use domdma_device::spec;
use domdma_device::vfio_user::proto::{MAX_DATA_XFER_SIZE, MAX_MESSAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

const RW: u32 = 3;
const EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);
const NONE_TRIGGER: u32 = (1 << 0) | (1 << 5);
const BOOL_TRIGGER: u32 = (1 << 1) | (1 << 5);

fn pipe() -> (std::fs::File, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: a fresh descriptor we own.
    let r = unsafe { std::fs::File::from_raw_fd(p[0]) };
    // SAFETY: a fresh descriptor we own.
    let w = unsafe { OwnedFd::from_raw_fd(p[1]) };
    (r, w)
}

/// Send `w` (a pipe's write end) to the server along with a message and drop our copy:
/// reading the read end then returns EOF exactly when the server has closed its copy.
#[track_caller]
fn assert_closed_by_server(mut r: std::fs::File) {
    let mut b = [0u8; 1];
    assert_eq!(
        r.read(&mut b).unwrap(),
        0,
        "server still holds the descriptor"
    );
}

fn eventfd() -> EventFd {
    EventFd::new(libc::EFD_NONBLOCK).unwrap()
}

fn fired(e: &EventFd) -> bool {
    e.read().is_ok()
}

#[test]
fn version_negotiation_like_qemu() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    let request = Client::version_payload(0, 0, QEMU_CAPS);
    let id = c.send(VERSION, 0, &request, &[]);
    let r = c.recv().ok(VERSION);
    assert_eq!(r.id, id);
    // QEMU receives the reply into its request buffer and rejects a larger reply
    // ("reply larger than recv buffer", hw/vfio-user/proxy.c).
    assert!(
        r.payload.len() <= request.len(),
        "{} > {}",
        r.payload.len(),
        request.len()
    );
    // Major 0, minor 0: QEMU 10.1 proposes 0.0 and rejects a higher minor.
    assert_eq!(r.payload[..4], [0, 0, 0, 0]);
    assert_eq!(
        *r.payload.last().unwrap(),
        0,
        "capabilities are NUL-terminated"
    );
    let json: serde_json::Value =
        serde_json::from_slice(&r.payload[4..r.payload.len() - 1]).unwrap();
    let caps = &json["capabilities"];
    assert_eq!(caps["max_msg_fds"], 16);
    assert_eq!(caps["max_data_xfer_size"], MAX_DATA_XFER_SIZE);
    assert_eq!(caps["pgsizes"], 4096);
    assert!(caps["max_dma_maps"].as_u64().unwrap() <= 65535);
    // Only keys QEMU knows (it warns about others).
    for key in caps.as_object().unwrap().keys() {
        assert!(
            [
                "max_msg_fds",
                "max_data_xfer_size",
                "pgsizes",
                "max_dma_maps"
            ]
            .contains(&key.as_str()),
            "{key}"
        );
    }
}

#[test]
fn version_minor_is_capped_and_bad_versions_are_refused() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    // Anything before VERSION is refused, and the stream stays usable.
    c.call(
        DEVICE_GET_INFO,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
        &[],
    )
    .err(libc::EINVAL);
    c.call(VERSION, &Client::version_payload(1, 0, "{}"), &[])
        .err(libc::ENOTSUP);
    c.call(VERSION, &Client::version_payload(0, 0, "{not json"), &[])
        .err(libc::EINVAL);
    c.call(VERSION, &[0, 0], &[]).err(libc::EINVAL);
    let r = c
        .call(VERSION, &Client::version_payload(0, 7, ""), &[])
        .ok(VERSION);
    assert_eq!(
        r.payload[..4],
        fields(&[&0u16, &1u16])[..],
        "minor capped at 1"
    );
    // A second VERSION is refused.
    c.call(VERSION, &Client::version_payload(0, 0, "{}"), &[])
        .err(libc::EINVAL);

    drop(c);
    let mut c = srv.connect();
    c.handshake();
}

#[test]
fn unknown_command_gets_an_error_and_the_stream_stays_in_sync() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    // Command 0x7fff with a 4000-byte payload that looks like more headers, followed at
    // once (pipelined, one write) by a real command.
    let junk: Vec<u8> = (0..4000u32)
        .flat_map(|i| (i % 251).to_ne_bytes())
        .take(4000)
        .collect();
    let mut bytes = message(0x1111, 0x7fff, 0, &junk);
    bytes.extend(message(
        0x2222,
        DEVICE_GET_INFO,
        0,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
    ));
    c.send_raw(&bytes);
    let e = c.recv();
    assert_eq!((e.id, e.command), (0x1111, 0x7fff));
    assert_ne!(e.error, 0, "non-zero errno");
    e.err(libc::ENOTSUP);
    let r = c.recv().ok(DEVICE_GET_INFO);
    assert_eq!(r.id, 0x2222);
    assert_eq!(r.payload, fields(&[&16u32, &3u32, &9u32, &5u32]));

    // Defined but unsupported commands too (REGION_IO_FDS, WRITE_MULTI, DEVICE_FEATURE).
    for cmd in [6u16, 14, 15, 16, 17, 18] {
        c.call(cmd, &[0u8; 40], &[]).err(libc::ENOTSUP);
    }
    // Server-to-client commands are refused.
    c.call(11, &fields(&[&0u64, &8u64]), &[]).err(libc::EINVAL);
    c.read_u32(0, spec::REG_ID);
}

#[test]
fn malformed_payloads_get_einval_never_a_crash() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let cases: Vec<(u16, Vec<u8>)> = vec![
        (DEVICE_GET_INFO, fields(&[&16u32, &0u32])),
        (DEVICE_GET_INFO, fields(&[&8u32, &0u32, &0u32, &0u32])),
        (
            DEVICE_GET_REGION_INFO,
            fields(&[&16u32, &0u32, &0u32, &0u32, &0u64, &0u64]),
        ),
        (
            DEVICE_GET_REGION_INFO,
            fields(&[&32u32, &0u32, &9u32, &0u32, &0u64, &0u64]),
        ),
        (DEVICE_GET_REGION_INFO, vec![]),
        (DEVICE_GET_IRQ_INFO, fields(&[&16u32, &0u32, &5u32, &0u32])),
        (DEVICE_GET_IRQ_INFO, fields(&[&4u32, &0u32, &2u32, &0u32])),
        (DMA_MAP, fields(&[&32u32, &RW, &0u64, &0u64])),
        (
            DMA_MAP,
            fields(&[&16u32, &RW, &0u64, &0x1000u64, &0x1000u64]),
        ),
        (DMA_UNMAP, fields(&[&24u32, &0u32, &0u64])),
        (DMA_UNMAP, fields(&[&24u32, &4u32, &0u64, &0x1000u64])),
        (
            DEVICE_SET_IRQS,
            fields(&[&20u32, &EVENTFD_TRIGGER, &2u32, &0u32]),
        ),
        (
            DEVICE_SET_IRQS,
            fields(&[&20u32, &0u32, &2u32, &0u32, &1u32]),
        ),
        (
            DEVICE_SET_IRQS,
            fields(&[&20u32, &(EVENTFD_TRIGGER | 1), &2u32, &0u32, &1u32]),
        ),
        (
            DEVICE_SET_IRQS,
            fields(&[&20u32, &NONE_TRIGGER, &9u32, &0u32, &1u32]),
        ),
        (
            DEVICE_SET_IRQS,
            fields(&[&24u32, &BOOL_TRIGGER, &2u32, &0u32, &4u32]),
        ),
        (
            DEVICE_SET_IRQS,
            fields(&[&20u32, &NONE_TRIGGER, &2u32, &u32::MAX, &2u32]),
        ),
        (REGION_READ, fields(&[&0u64, &7u32])),
        (REGION_WRITE, fields(&[&0u64, &7u32, &8u32, &0u32])),
        (REGION_WRITE, fields(&[&0u64, &7u32, &u32::MAX, &0u32])),
    ];
    for (cmd, payload) in cases {
        let r = c.call(cmd, &payload, &[]);
        assert!(r.is_error(), "command {cmd} payload {payload:?}: {r:?}");
        assert_eq!(
            r.error,
            libc::EINVAL as u32,
            "command {cmd} payload {payload:?}"
        );
        // The next message is still answered correctly.
        assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
    }
}

#[test]
fn oversized_message_gets_e2big_and_is_discarded() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    // A region write just over the message bound, with its full payload.
    let data = vec![0x5a; MAX_MESSAGE_SIZE];
    let mut p = fields(&[&0u64, &0u32, &(data.len() as u32)]);
    p.extend_from_slice(&data);
    let writer = {
        let mut s = c.stream.try_clone().unwrap();
        let msg = message(0x4242, REGION_WRITE, 0, &p);
        std::thread::spawn(move || s.write_all(&msg).unwrap())
    };
    let r = c.recv();
    writer.join().unwrap();
    assert_eq!(r.id, 0x4242);
    r.err(libc::E2BIG);
    // A region read beyond max_data_xfer_size (a small message) is refused too.
    c.read_region(CONFIG_REGION, 0, MAX_DATA_XFER_SIZE + 1)
        .err(libc::E2BIG);
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
}

#[test]
fn hostile_sizes_end_the_connection_and_the_next_client_is_served() {
    let srv = TestServer::start();
    for size in [0u32, 8, 15, u32::MAX, 0x7fff_ffff] {
        let mut c = srv.connect();
        c.handshake();
        c.send_raw(&header(1, DEVICE_GET_INFO, size, 0));
        assert!(c.closed_by_server(), "size {size}");
    }
    let mut c = srv.connect();
    c.handshake();
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
}

#[test]
fn messages_split_across_writes_and_pipelined() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    let v = message(7, VERSION, 0, &Client::version_payload(0, 0, QEMU_CAPS));
    for b in v.chunks(5) {
        c.send_raw(b);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.recv().ok(VERSION).id, 7);
    // 50 reads in one write; replies come back in order.
    let mut bytes = Vec::new();
    for i in 0..50u16 {
        bytes.extend(message(
            i,
            REGION_READ,
            0,
            &fields(&[&spec::REG_ID, &0u32, &4u32]),
        ));
    }
    c.send_raw(&bytes);
    for i in 0..50u16 {
        let r = c.recv().ok(REGION_READ);
        assert_eq!(r.id, i);
        assert_eq!(r.u32_at(16), spec::DEVICE_ID_MAGIC);
    }
}

#[test]
fn unexpected_message_types() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    // A reply sent to the server is dropped without an answer; an unknown type is refused.
    c.send_raw(&message(1, DEVICE_GET_INFO, F_REPLY, &[0; 16]));
    let mut bad = message(
        2,
        DEVICE_GET_INFO,
        0,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
    );
    bad[8] = 5;
    c.send_raw(&bad);
    let r = c.recv();
    assert_eq!(r.id, 2);
    r.err(libc::EINVAL);
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
}

#[test]
fn device_info_and_region_info() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    // The vfio_user crate sends argsz 32 here: accepted.
    let r = c
        .call(
            DEVICE_GET_INFO,
            &fields(&[&32u32, &0u32, &0u32, &0u32]),
            &[],
        )
        .ok(DEVICE_GET_INFO);
    // argsz 16, flags PCI | RESET, 9 regions, 5 interrupt types.
    assert_eq!(r.payload, fields(&[&16u32, &3u32, &9u32, &5u32]));

    let (bars, config): (Vec<u64>, u64) = {
        let d = srv.device.lock().unwrap();
        ((0..6).map(|b| d.bar_size(b)).collect(), d.config_size())
    };
    assert_eq!(bars[spec::REGS_BAR], spec::REGS_BAR_SIZE);
    assert_eq!(bars[spec::MSIX_BAR], spec::MSIX_BAR_SIZE);
    for index in 0..9u32 {
        let r = c.region_info(index).ok(DEVICE_GET_REGION_INFO);
        let size = match index {
            0..=5 => bars[index as usize],
            7 => config,
            _ => 0,
        };
        let flags = if size > 0 { 3 } else { 0 };
        assert_eq!(r.payload.len(), 32);
        assert_eq!(r.u32_at(0), 32, "argsz");
        assert_eq!(
            r.u32_at(4),
            flags,
            "region {index} flags (read|write, no mmap)"
        );
        assert_eq!(r.u32_at(8), index);
        assert_eq!(r.u32_at(12), 0, "no capabilities");
        assert_eq!(r.u64_at(16), size, "region {index} size");
    }
    c.region_info(9).err(libc::EINVAL);
}

#[test]
fn irq_info() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let irq = |c: &mut Client, index: u32| {
        c.call(
            DEVICE_GET_IRQ_INFO,
            &fields(&[&16u32, &0u32, &index, &0u32]),
            &[],
        )
    };
    let r = irq(&mut c, MSIX_IRQ).ok(DEVICE_GET_IRQ_INFO);
    assert_eq!(r.u32_at(0), 16);
    assert_eq!(r.u32_at(4) & 1, 1, "EVENTFD");
    assert_eq!(
        r.u32_at(4) & 8,
        0,
        "not NORESIZE: QEMU may add vectors one at a time"
    );
    assert_eq!(r.u32_at(8), MSIX_IRQ);
    // One vector per queue and one for the fault log.
    assert_eq!(
        r.u32_at(12),
        u32::from(srv.config.msix_vectors()),
        "MSI-X vectors"
    );
    assert_eq!(r.u32_at(12), srv.config.queues + 1);
    // INTx: one interrupt if config space has an interrupt pin, as kernel vfio-pci does.
    let pin = {
        let mut b = [0u8];
        srv.device.lock().unwrap().config_read(0x3d, &mut b);
        b[0]
    };
    let r = irq(&mut c, 0).ok(DEVICE_GET_IRQ_INFO);
    assert_eq!(r.u32_at(12), u32::from(pin != 0));
    for index in [1, 3, 4] {
        let r = irq(&mut c, index).ok(DEVICE_GET_IRQ_INFO);
        assert_eq!(r.u32_at(12), 0, "index {index}");
    }
    irq(&mut c, 5).err(libc::EINVAL);
}

#[test]
fn config_space_and_bar_access() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let id = c.read_u32(CONFIG_REGION, 0);
    assert_eq!(id & 0xffff, u32::from(spec::PCI_VENDOR_ID));
    assert_eq!(id >> 16, u32::from(spec::PCI_DEVICE_ID));
    // Whole config space in one read, as QEMU does at realize.
    let size = srv.device.lock().unwrap().config_size();
    let r = c.read_region(CONFIG_REGION, 0, size as u32).ok(REGION_READ);
    assert_eq!(r.payload.len(), 16 + size as usize);
    assert_eq!(r.payload[16..18], spec::PCI_VENDOR_ID.to_le_bytes());

    // BAR0 registers.
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
    c.write_u32(0, spec::REG_SCRATCH, 0xdead_beef);
    assert_eq!(c.read_u32(0, spec::REG_SCRATCH), 0xdead_beef);
    // Last dword of each region is reachable; one byte further is not.
    c.read_u32(0, spec::REGS_BAR_SIZE - 4);
    c.read_u32(2, spec::MSIX_BAR_SIZE - 4);
    c.read_region(0, spec::REGS_BAR_SIZE - 2, 4)
        .err(libc::EINVAL);
    c.read_region(CONFIG_REGION, size - 3, 4).err(libc::EINVAL);
    c.read_region(CONFIG_REGION, u64::MAX - 1, 4)
        .err(libc::EINVAL);
    c.write_region(0, spec::REGS_BAR_SIZE, &[0; 4])
        .err(libc::EINVAL);
    // Absent regions: BAR1, ROM, VGA, and beyond.
    for region in [1, 6, 8, 9, 1000] {
        c.read_region(region, 0, 4).err(libc::EINVAL);
    }
    // Zero-length access inside a region is fine.
    let r = c.read_region(0, 0, 0).ok(REGION_READ);
    assert_eq!(r.payload.len(), 16);
}

#[test]
fn posted_writes_get_no_reply_even_when_they_fail() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let mut p = fields(&[&spec::REG_SCRATCH, &0u32, &4u32]);
    p.extend_from_slice(&0x1234_5678u32.to_le_bytes());
    c.send(REGION_WRITE, F_NO_REPLY, &p, &[]);
    // Out of bounds and posted: still no reply.
    let mut bad = fields(&[&spec::REGS_BAR_SIZE, &0u32, &4u32]);
    bad.extend_from_slice(&[0; 4]);
    c.send(REGION_WRITE, F_NO_REPLY, &bad, &[]);
    // The next reply is the read's, and it sees the posted write.
    let id = c.send(
        REGION_READ,
        0,
        &fields(&[&spec::REG_SCRATCH, &0u32, &4u32]),
        &[],
    );
    let r = c.recv().ok(REGION_READ);
    assert_eq!(r.id, id);
    assert_eq!(r.u32_at(16), 0x1234_5678);
}

#[test]
fn device_reset() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    c.write_u32(0, spec::REG_SCRATCH, 77);
    let r = c.call(DEVICE_RESET, &[], &[]).ok(DEVICE_RESET);
    assert!(r.payload.is_empty());
    assert_eq!(c.read_u32(0, spec::REG_SCRATCH), 0);
}

#[test]
fn dma_map_memfd_unmap_and_unmap_all() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let ram = memfd(4 << 20);
    ram.write_all_at(b"guest", 0x10_0000).unwrap();
    let base = 0x1_0000_0000u64;
    // Like QEMU: flags READ|WRITE, the file offset of the range, one memfd.
    let r = c
        .dma_map(RW, 0x10_0000, base, 0x20_0000, Some(ram.as_raw_fd()))
        .ok(DMA_MAP);
    assert!(r.payload.is_empty());
    {
        let mem = srv.memory.memory();
        assert_eq!(mem.num_regions(), 1);
        let mut b = [0u8; 5];
        mem.read_slice(&mut b, GuestAddress(base)).unwrap();
        assert_eq!(&b, b"guest");
        mem.write_slice(b"device", GuestAddress(base + 0x1000))
            .unwrap();
        assert!(mem
            .write_slice(b"x", GuestAddress(base + 0x20_0000))
            .is_err());
    }
    let mut b = [0u8; 6];
    ram.read_exact_at(&mut b, 0x10_1000).unwrap();
    assert_eq!(&b, b"device", "MAP_SHARED: the device writes guest RAM");

    // Overlap, unaligned, past the end of the file, no access flags known.
    c.dma_map(RW, 0, base + 0x1000, 0x1000, Some(ram.as_raw_fd()))
        .err(libc::EEXIST);
    c.dma_map(RW, 0, 0x1234, 0x1000, Some(ram.as_raw_fd()))
        .err(libc::EINVAL);
    c.dma_map(RW, 4 << 20, 0, 0x1000, Some(ram.as_raw_fd()))
        .err(libc::EINVAL);
    c.dma_map(RW | 8, 0, 0, 0x1000, Some(ram.as_raw_fd()))
        .err(libc::ENOTSUP);
    // A map without a descriptor gets a shadow region in bus memory (the device reaches
    // it through the client: DMA_READ / DMA_WRITE); one with no access flag is recorded.
    c.dma_map(RW, 0, 0x8000_0000, 0x1000, None).ok(DMA_MAP);
    assert_eq!(srv.memory.memory().num_regions(), 2);
    c.dma_map(0, 0, 0x9000_0000, 0x1000, None).ok(DMA_MAP);
    assert_eq!(srv.memory.memory().num_regions(), 2);
    c.dma_unmap(0, 0x8000_0000, 0x1000).ok(DMA_UNMAP);
    c.dma_unmap(0, 0x9000_0000, 0x1000).ok(DMA_UNMAP);
    assert_eq!(srv.memory.memory().num_regions(), 1);

    // Unmap: splitting a mapping is refused; the reply echoes the request.
    c.dma_unmap(0, base, 0x1000).err(libc::EINVAL);
    let r = c.dma_unmap(0, base, 0x20_0000).ok(DMA_UNMAP);
    assert_eq!(r.payload, fields(&[&24u32, &0u32, &base, &0x20_0000u64]));
    assert_eq!(srv.memory.memory().num_regions(), 0);
    // Nothing left there: succeeds and removes nothing (VFIO type1 semantics, which
    // QEMU's vIOMMU path relies on).
    c.dma_unmap(0, base, 0x20_0000).ok(DMA_UNMAP);

    // UNMAP_ALL is bit 1 (VFIO_DMA_UNMAP_FLAG_ALL); bit 2 (the vfio_user crate's
    // UNMAP_ALL) is VFIO_DMA_UNMAP_FLAG_VADDR and is refused.
    c.dma_map(RW, 0, base, 0x1000, Some(ram.as_raw_fd()))
        .ok(DMA_MAP);
    c.dma_map(RW, 0x1000, base + 0x10_0000, 0x1000, Some(ram.as_raw_fd()))
        .ok(DMA_MAP);
    assert_eq!(srv.memory.memory().num_regions(), 2);
    c.dma_unmap(4, 0, 0).err(libc::EINVAL);
    assert_eq!(srv.memory.memory().num_regions(), 2);
    c.dma_unmap(2, 0, 0).ok(DMA_UNMAP);
    assert_eq!(srv.memory.memory().num_regions(), 0);
    // Everything is gone, including the recorded map.
    c.dma_map(RW, 0, 0x8000_0000, 0x1000, None).ok(DMA_MAP);
}

#[test]
fn set_irqs_with_eventfds() {
    // Three queues: four vectors.
    let srv = TestServer::start_with(DeviceConfig {
        queues: 3,
        ..DeviceConfig::default()
    });
    let mut c = srv.connect();
    c.handshake();
    let n = u32::from(srv.config.msix_vectors());
    assert_eq!(n, 4);
    let efds: Vec<EventFd> = (0..n).map(|_| eventfd()).collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    // All vectors in one message (max_msg_fds >= vectors).
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 0, n, &raw)
        .ok(DEVICE_SET_IRQS);
    assert_eq!(srv.irqs.assigned(), n as usize);
    // Client-side trigger (DATA_NONE) signals the eventfds.
    c.set_irqs(NONE_TRIGGER, MSIX_IRQ, 1, 2, &[])
        .ok(DEVICE_SET_IRQS);
    let got: Vec<bool> = efds.iter().map(fired).collect();
    assert_eq!(got, [false, true, true, false]);
    // DATA_BOOL selects vectors.
    let mut p = fields(&[&24u32, &BOOL_TRIGGER, &MSIX_IRQ, &0u32, &4u32]);
    p.extend_from_slice(&[1, 0, 0, 1]);
    c.call(DEVICE_SET_IRQS, &p, &[]).ok(DEVICE_SET_IRQS);
    let got: Vec<bool> = efds.iter().map(fired).collect();
    assert_eq!(got, [true, false, false, true]);
    // The device's own interrupts go through the same eventfds.
    {
        use domdma_device::irq::InterruptSink;
        srv.irqs.trigger(2);
    }
    assert!(fired(&efds[2]));
    // DATA_EVENTFD without descriptors withdraws vectors (QEMU's "fd -1").
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 1, 1, &[])
        .ok(DEVICE_SET_IRQS);
    c.set_irqs(NONE_TRIGGER, MSIX_IRQ, 0, 2, &[])
        .ok(DEVICE_SET_IRQS);
    assert!(fired(&efds[0]));
    assert!(!fired(&efds[1]));
    // One vector at a time, as QEMU does when the guest enables vectors.
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 1, 1, &raw[1..2])
        .ok(DEVICE_SET_IRQS);
    assert_eq!(srv.irqs.assigned(), n as usize);
    // Errors: beyond the vector count, count/descriptor mismatch, not an eventfd, masking.
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, n - 1, 2, &raw[..2])
        .err(libc::EINVAL);
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 0, 2, &raw[..1])
        .err(libc::EINVAL);
    let mem = memfd(4096);
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 0, 1, &[mem.as_raw_fd()])
        .err(libc::EINVAL);
    c.set_irqs((1 << 0) | (1 << 3), MSIX_IRQ, 0, 1, &[])
        .err(libc::ENOTSUP);
    c.set_irqs(EVENTFD_TRIGGER, 1, 0, 1, &raw[..1])
        .err(libc::EINVAL);
    // DATA_NONE + TRIGGER with count 0 disables everything.
    c.set_irqs(NONE_TRIGGER, MSIX_IRQ, 0, 0, &[])
        .ok(DEVICE_SET_IRQS);
    assert_eq!(srv.irqs.assigned(), 0);
    // Disabling other types is accepted (QEMU disables MSI/INTx on reset).
    for index in [0, 1, 3, 4] {
        c.set_irqs(NONE_TRIGGER, index, 0, 0, &[])
            .ok(DEVICE_SET_IRQS);
    }
}

#[test]
fn received_descriptors_are_closed() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    // A command that takes no descriptor.
    let (r, w) = pipe();
    c.call(
        DEVICE_GET_INFO,
        &fields(&[&16u32, &0u32, &0u32, &0u32]),
        &[w.as_raw_fd()],
    )
    .ok(DEVICE_GET_INFO);
    drop(w);
    assert_closed_by_server(r);
    // An unknown command with a descriptor.
    let (r, w) = pipe();
    c.call(0x7fff, &[1, 2, 3], &[w.as_raw_fd()])
        .err(libc::ENOTSUP);
    drop(w);
    assert_closed_by_server(r);
    // A refused DMA_MAP (a pipe is not mappable memory).
    let (r, w) = pipe();
    c.dma_map(RW, 0, 0, 0x1000, Some(w.as_raw_fd()))
        .err(libc::EINVAL);
    drop(w);
    assert_closed_by_server(r);
    // More than max_msg_fds: refused, all closed, stream in sync.
    let (r, w) = pipe();
    let many = [w.as_raw_fd(); 17];
    let efd = eventfd();
    let mut fds = vec![efd.as_raw_fd()];
    fds.extend(&many[1..]);
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 0, 1, &fds[..17])
        .err(libc::EINVAL);
    drop(w);
    assert_closed_by_server(r);
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
    // Extra descriptors with a SET_IRQS that uses one: refused (count mismatch) and closed.
    let (r, w) = pipe();
    c.set_irqs(
        EVENTFD_TRIGGER,
        MSIX_IRQ,
        0,
        1,
        &[efd.as_raw_fd(), w.as_raw_fd()],
    )
    .err(libc::EINVAL);
    drop(w);
    assert_closed_by_server(r);
}

#[test]
fn disconnect_drops_mappings_and_eventfds_and_the_next_client_is_served() {
    let srv = TestServer::start();
    let ram = memfd(1 << 20);
    let efd = eventfd();
    {
        let mut c = srv.connect();
        c.handshake();
        c.dma_map(RW, 0, 0x10_0000, 1 << 20, Some(ram.as_raw_fd()))
            .ok(DMA_MAP);
        c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 0, 1, &[efd.as_raw_fd()])
            .ok(DEVICE_SET_IRQS);
        c.write_u32(0, spec::REG_SCRATCH, 5);
        assert_eq!(srv.memory.memory().num_regions(), 1);
        assert_eq!(srv.irqs.assigned(), 1);
        // Gone without a word, in the middle of a message.
        c.send_raw(&header(9, REGION_READ, 32, 0));
    }
    srv.eventually("cleanup after disconnect", |s| {
        s.memory.memory().num_regions() == 0 && s.irqs.assigned() == 0
    });
    let mut c = srv.connect();
    c.handshake();
    assert_eq!(c.read_u32(0, spec::REG_SCRATCH), 0, "device was reset");
    // The old mapping is gone: mapping the same range again works.
    c.dma_map(RW, 0, 0x10_0000, 1 << 20, Some(ram.as_raw_fd()))
        .ok(DMA_MAP);
}

#[test]
fn one_client_at_a_time() {
    let srv = TestServer::start();
    let mut first = srv.connect();
    first.handshake();
    let mut second = srv.connect();
    second.send(VERSION, 0, &Client::version_payload(0, 0, QEMU_CAPS), &[]);
    second
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 1];
    assert!(second.stream.read(&mut b).is_err(), "second client waits");
    second
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    drop(first);
    second.recv().ok(VERSION);
    assert_eq!(second.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
}

/// The whole path: guest RAM as a memfd, MSI-X through an eventfd, a FILL descriptor
/// submitted through BAR0 writes, the completion read back from "guest RAM".
#[test]
fn device_dma_and_interrupt_through_the_socket() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let ram = memfd(2 << 20);
    let bus = 0x1_0000_0000u64;
    c.dma_map(RW, 0, bus, 2 << 20, Some(ram.as_raw_fd()))
        .ok(DMA_MAP);
    let efd = eventfd();
    c.set_irqs(EVENTFD_TRIGGER, MSIX_IRQ, 1, 1, &[efd.as_raw_fd()])
        .ok(DEVICE_SET_IRQS);
    // Bus master + memory space on.
    let cmd = c.read_u32(CONFIG_REGION, 4) & 0xffff;
    c.write_region(CONFIG_REGION, 4, &((cmd | 0x6) as u16).to_le_bytes())
        .ok(REGION_WRITE);

    let ring = 0u64;
    let cpl = 0x1000u64;
    let dst = 0x2000u64;
    let desc = spec::Descriptor::fill(bus + dst, 0x0123_4567_89ab_cdef, 4096)
        .with_interrupt()
        .with_completion(bus + cpl)
        .with_tag(0xfeed)
        .encode();
    ram.write_all_at(&desc, ring).unwrap();

    let q = |reg| spec::queue_reg(0, reg);
    c.write_u32(0, q(spec::Q_BASE_LO), (bus + ring) as u32);
    c.write_u32(0, q(spec::Q_BASE_HI), ((bus + ring) >> 32) as u32);
    c.write_u32(0, q(spec::Q_SIZE), 4);
    c.write_u32(0, q(spec::Q_MSIX_VECTOR), 1);
    c.write_u32(0, q(spec::Q_CTRL), spec::Q_CTRL_ENABLE);
    // The doorbell as QEMU sends it: a posted write.
    let mut p = fields(&[&q(spec::Q_TAIL), &0u32, &4u32]);
    p.extend_from_slice(&1u32.to_le_bytes());
    c.send(REGION_WRITE, F_NO_REPLY, &p, &[]);
    // The engine runs on its own threads: the doorbell returns at once, the completion
    // follows.
    let mut status = [0u8; 4];
    for _ in 0..1000 {
        ram.read_exact_at(&mut status, cpl).unwrap();
        if spec::CompletionRecord::status_of_head(u32::from_le_bytes(status))
            != spec::STATUS_PENDING
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        spec::CompletionRecord::status_of_head(u32::from_le_bytes(status)),
        spec::STATUS_OK,
        "completion status"
    );
    let mut completed = 0;
    for _ in 0..500 {
        completed = c.read_u32(0, q(spec::Q_COMPLETED));
        if completed == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(completed, 1, "Q_COMPLETED");
    let mut data = vec![0u8; 4096];
    ram.read_exact_at(&mut data, dst).unwrap();
    assert!(data
        .chunks(8)
        .all(|w| w == 0x0123_4567_89ab_cdefu64.to_le_bytes()));
    // The vector is raised after the completion record is written; allow for the worker.
    let mut signalled = false;
    for _ in 0..500 {
        if fired(&efd) {
            signalled = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(signalled, "MSI-X vector 1 signalled");
}

/// Random messages (valid framing, random commands, flags and payloads) and then raw
/// garbage: the server survives and serves the next client.
#[test]
fn random_messages_never_kill_the_server() {
    let srv = TestServer::start();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..20 {
        let mut c = srv.connect();
        if round % 2 == 0 {
            c.handshake();
        }
        let mut bytes = Vec::new();
        for _ in 0..200 {
            let cmd = (rnd() % 20) as u16;
            let flags = (rnd() % 64) as u32 & !F_REPLY;
            let len = (rnd() % 64) as usize;
            let mut payload: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            // Plausible argsz and region fields now and then.
            if len >= 16 && rnd() % 2 == 0 {
                payload[..4].copy_from_slice(&(len as u32).to_ne_bytes());
                payload[8..12].copy_from_slice(&((rnd() % 10) as u32).to_ne_bytes());
            }
            bytes.extend(message(rnd() as u16, cmd, flags, &payload));
        }
        if round % 5 == 4 {
            bytes.extend((0..256).map(|_| rnd() as u8));
        }
        // The server may close on garbage; that is fine.
        let _ = c.stream.write_all(&bytes);
        drop(c);
    }
    let mut c = srv.connect();
    c.handshake();
    assert_eq!(c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
}

/// DMA_UNMAP must stop the device's access to the range before the reply: a VMM reuses the
/// memory as soon as the reply arrives (with an emulated IOMMU, the guest's unmapped pages).
/// Here a 64 MiB FILL is in flight when its destination is unmapped: after the reply no
/// byte of the memfd may change, and the descriptor ends with a DMA error.
#[test]
fn dma_unmap_stops_device_access() {
    let srv = TestServer::start();
    let mut c = srv.connect();
    c.handshake();
    let len: u64 = 64 << 20;
    let ctl = memfd(1 << 20);
    let big = memfd(len);
    let (bus_ctl, bus_big) = (0x1_0000_0000u64, 0x2_0000_0000u64);
    c.dma_map(RW, 0, bus_ctl, 1 << 20, Some(ctl.as_raw_fd()))
        .ok(DMA_MAP);
    c.dma_map(RW, 0, bus_big, len, Some(big.as_raw_fd()))
        .ok(DMA_MAP);
    let cmd = c.read_u32(CONFIG_REGION, 4) & 0xffff;
    c.write_region(CONFIG_REGION, 4, &((cmd | 0x6) as u16).to_le_bytes())
        .ok(REGION_WRITE);
    let mut desc = [0u8; spec::DESC_SIZE as usize];
    let put = |d: &mut [u8], off: u64, v: &[u8]| {
        d[off as usize..off as usize + v.len()].copy_from_slice(v)
    };
    put(&mut desc, spec::DESC_OPCODE, &[spec::OP_FILL]);
    put(&mut desc, spec::DESC_LEN, &(len as u32).to_le_bytes());
    put(
        &mut desc,
        spec::DESC_SRC,
        &0x5a5a_5a5a_5a5a_5a5au64.to_le_bytes(),
    );
    put(&mut desc, spec::DESC_DST, &bus_big.to_le_bytes());
    put(
        &mut desc,
        spec::DESC_COMPLETION,
        &(bus_ctl + 0x1000).to_le_bytes(),
    );
    ctl.write_all_at(&desc, 0).unwrap();
    let q = |reg| spec::queue_reg(0, reg);
    c.write_u32(0, q(spec::Q_BASE_LO), bus_ctl as u32);
    c.write_u32(0, q(spec::Q_BASE_HI), (bus_ctl >> 32) as u32);
    c.write_u32(0, q(spec::Q_SIZE), 4);
    c.write_u32(0, q(spec::Q_CTRL), spec::Q_CTRL_ENABLE);
    c.write_u32(0, q(spec::Q_TAIL), 1);
    c.dma_unmap(0, bus_big, len).ok(DMA_UNMAP);
    let mut after_reply = vec![0u8; len as usize];
    big.read_exact_at(&mut after_reply, 0).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut later = vec![0u8; len as usize];
    big.read_exact_at(&mut later, 0).unwrap();
    let changed = after_reply
        .iter()
        .zip(&later)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(changed, 0, "bytes written after the DMA_UNMAP reply");
    let mut status = [0u8; 4];
    ctl.read_exact_at(&mut status, 0x1000 + spec::CPL_STATUS)
        .unwrap();
    if after_reply.contains(&0) {
        // The transfer was cut short by the unmap.
        assert_eq!(
            status[0],
            spec::STATUS_DMA_ERROR,
            "status of the cut transfer"
        );
    }
}
