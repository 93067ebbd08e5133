//! Memory the client maps without a file descriptor: the device reaches it with DMA_READ
//! and DMA_WRITE messages to the client, chunked by the client's `max_data_xfer_size` (16 KiB here),
//! and the inspector counts the bytes moved each way.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use domdma_device::core::DeviceConfig;
use domdma_device::spec;
use domdma_device::vfio_user::Server;
use vmm_sys_util::tempdir::TempDir;

const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;
const RAM: usize = 4 << 20;
const XFER: u64 = 16 << 10;

/// Guest RAM the client keeps to itself, and what the server asked of it.
struct ClientRam {
    bytes: Vec<u8>,
    reads: Vec<u64>,
    writes: Vec<u64>,
}

impl ClientRam {
    /// Serve one server request from `c`'s socket; false on a read timeout.
    fn serve_one(&mut self, c: &mut Client) -> bool {
        let mut h = [0u8; 16];
        match c.stream.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) => panic!("reading a server request: {e}"),
        }
        let id = u16::from_ne_bytes([h[0], h[1]]);
        let cmd = u16::from_ne_bytes([h[2], h[3]]);
        let size = u32::from_ne_bytes(h[4..8].try_into().unwrap()) as usize;
        let mut p = vec![0u8; size - 16];
        c.stream.read_exact(&mut p).unwrap();
        let addr = u64::from_ne_bytes(p[0..8].try_into().unwrap()) as usize;
        let count = u64::from_ne_bytes(p[8..16].try_into().unwrap());
        assert!(
            count <= XFER,
            "a request of {count} bytes, above max_data_xfer_size"
        );
        let fixed = fields(&[&(addr as u64), &count]);
        match cmd {
            DMA_READ => {
                self.reads.push(count);
                let mut body = fixed;
                body.extend_from_slice(&self.bytes[addr..addr + count as usize]);
                c.send_raw(&message(id, DMA_READ, F_REPLY, &body));
            }
            DMA_WRITE => {
                self.writes.push(count);
                self.bytes[addr..addr + count as usize].copy_from_slice(&p[16..]);
                c.send_raw(&message(id, DMA_WRITE, F_REPLY, &fixed));
            }
            other => panic!("unexpected message {other} from the server"),
        }
        true
    }
}

#[test]
fn fd_less_memory_is_reached_with_dma_read_and_dma_write() {
    let dir = TempDir::new_with_prefix("/tmp/domdma-rw-").unwrap();
    let sock = dir.as_path().join("dev.sock");
    let insp = dir.as_path().join("inspect.sock");
    let mut server = Server::bind(&sock, DeviceConfig::default()).unwrap();
    server.add_inspector(&insp).unwrap();
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.run());

    let mut c = Client::connect(&sock);
    let caps = QEMU_CAPS.replace(
        "\"max_data_xfer_size\":1048576",
        "\"max_data_xfer_size\":16384",
    );
    assert_ne!(caps, QEMU_CAPS);
    c.call(VERSION, &Client::version_payload(0, 0, &caps), &[])
        .ok(VERSION);
    // All of guest RAM without a descriptor, as QEMU sends private RAM.
    c.dma_map(3, 0, 0, RAM as u64, None).ok(DMA_MAP);
    let cmd = c.read_u32(CONFIG_REGION, 4) & 0xffff;
    c.write_region(CONFIG_REGION, 4, &((cmd | 0x6) as u16).to_le_bytes())
        .ok(REGION_WRITE);

    let mut ram = ClientRam {
        bytes: vec![0; RAM],
        reads: Vec::new(),
        writes: Vec::new(),
    };
    let (ring, cpl, src, dst, len) = (
        0usize,
        0x1000usize,
        0x10_0000usize,
        0x20_0000usize,
        200_000usize,
    );
    for (i, b) in ram.bytes[src..src + len].iter_mut().enumerate() {
        *b = (i * 31 + 7) as u8;
    }
    let desc = spec::Descriptor::copy(src as u64, dst as u64, len as u32)
        .with_completion(cpl as u64)
        .with_tag(0xabc)
        .encode();
    ram.bytes[ring..ring + 64].copy_from_slice(&desc);
    let q = |reg| spec::queue_reg(0, reg);
    c.write_u32(0, q(spec::Q_BASE_LO), ring as u32);
    c.write_u32(0, q(spec::Q_BASE_HI), 0);
    c.write_u32(0, q(spec::Q_SIZE), 4);
    c.write_u32(0, q(spec::Q_CTRL), spec::Q_CTRL_ENABLE);
    // The doorbell as QEMU sends it: a posted write. Then serve the device's requests.
    let mut p = fields(&[&q(spec::Q_TAIL), &0u32, &4u32]);
    p.extend_from_slice(&1u32.to_le_bytes());
    c.send(REGION_WRITE, F_NO_REPLY, &p, &[]);
    c.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let status = |ram: &ClientRam| {
        let head = u32::from_le_bytes(ram.bytes[cpl..cpl + 4].try_into().unwrap());
        spec::CompletionRecord::status_of_head(head)
    };
    let start = Instant::now();
    while status(&ram) == spec::STATUS_PENDING {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no completion; the server asked {} reads, {} writes",
            ram.reads.len(),
            ram.writes.len()
        );
        ram.serve_one(&mut c);
    }
    assert_eq!(status(&ram), spec::STATUS_OK);
    assert_eq!(
        ram.bytes[dst..dst + len],
        ram.bytes[src..src + len],
        "the copy reached the client's RAM"
    );
    let read: u64 = ram.reads.iter().sum();
    let written: u64 = ram.writes.iter().sum();
    assert!(read >= len as u64 + 64, "read {read} bytes");
    assert!(written >= len as u64, "wrote {written} bytes");

    // The inspector counts both directions (the last reply may still be on its way).
    let fetch = || {
        let mut s = UnixStream::connect(&insp).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let start = Instant::now();
    let mut v = fetch();
    while v["dma_rw"]["written_bytes"] != written && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
        v = fetch();
    }
    assert_eq!(v["dma_rw"]["read_bytes"], read, "{v}");
    assert_eq!(v["dma_rw"]["written_bytes"], written, "{v}");
    assert_eq!(v["dma_rw"]["errors"], 0, "{v}");

    // A register access still works while nothing is pending.
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(c.read_u32(0, q(spec::Q_COMPLETED)), 1);
    drop(c);
    stop.stop();
    t.join().unwrap().unwrap();
}
