//! Interoperability with an independent peer: the `vfio_user` crate's `Client` (0.1.7).
//!
//! Its quirks shape what is exercised here: it proposes version 0.1 with
//! `max_msg_fds` 1, sends `argsz` 32 in DEVICE_GET_INFO (it counts the header), reads
//! fixed-size replies without looking at the error flag (so only requests that succeed
//! are sent: an error reply would leave it reading the next reply's bytes), and
//! `resettable()` is inverted. It never uses UNMAP_ALL.

mod common;

use std::os::fd::AsRawFd;

use common::{memfd, TestServer};
use domdma_device::spec;
use vfio_user::Client;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

#[test]
fn vfio_user_crate_client_interoperates() {
    let srv = TestServer::start();
    let mut client = Client::new(&srv.path).expect("version negotiation and region discovery");

    // Regions, as discovered by the client.
    let bar0 = client.region(0).expect("BAR0");
    assert_eq!(bar0.size, spec::REGS_BAR_SIZE);
    assert_eq!(bar0.flags, 3);
    assert!(bar0.file_offset.is_none(), "no mmap");
    assert_eq!(client.region(2).unwrap().size, spec::MSIX_BAR_SIZE);
    let config = srv.device.lock().unwrap().config_size();
    assert_eq!(client.region(7).unwrap().size, config);
    assert_eq!(client.region(1).unwrap().size, 0);

    // Config space and registers.
    let mut id = [0u8; 4];
    client.region_read(7, 0, &mut id).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), spec::PCI_VENDOR_ID);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), spec::PCI_DEVICE_ID);
    client
        .region_write(0, spec::REG_SCRATCH, &0xa5a5_0001u32.to_le_bytes())
        .unwrap();
    let mut v = [0u8; 4];
    client.region_read(0, spec::REG_SCRATCH, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0xa5a5_0001);

    // Interrupts: one eventfd per message (the crate's max_msg_fds).
    let info = client.get_irq_info(2).unwrap();
    assert_eq!(info.count, u32::from(srv.config.msix_vectors()));
    assert_eq!(info.flags & 1, 1);
    let efd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    client
        .set_irqs(2, (1 << 2) | (1 << 5), 0, 1, &[efd.as_raw_fd()])
        .unwrap();
    assert_eq!(srv.irqs.assigned(), 1);
    client.set_irqs(2, (1 << 0) | (1 << 5), 0, 1, &[]).unwrap();
    assert_eq!(efd.read().unwrap(), 1, "client-triggered vector 0");

    // DMA: its dma_map sends READ|WRITE with one memfd.
    let ram = memfd(1 << 20);
    client
        .dma_map(0, 0x4000_0000, 1 << 20, ram.as_raw_fd())
        .unwrap();
    {
        let mem = srv.memory.memory();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0x55aa_u16, GuestAddress(0x4000_0010))
            .unwrap();
    }
    let mut b = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(&ram, &mut b, 0x10).unwrap();
    assert_eq!(u16::from_ne_bytes(b), 0x55aa);
    client.dma_unmap(0x4000_0000, 1 << 20).unwrap();
    assert_eq!(srv.memory.memory().num_regions(), 0);

    client.reset().unwrap();
    client.region_read(0, spec::REG_SCRATCH, &mut v).unwrap();
    assert_eq!(
        u32::from_le_bytes(v),
        0,
        "reset cleared the scratch register"
    );
    client.shutdown().unwrap();
    drop(client);

    // The server goes on to serve the next client.
    srv.eventually("cleanup", |s| s.irqs.assigned() == 0);
    let mut again = Client::new(&srv.path).unwrap();
    client_read_id(&mut again);
}

fn client_read_id(c: &mut Client) {
    let mut v = [0u8; 4];
    c.region_read(0, spec::REG_ID, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), spec::DEVICE_ID_MAGIC);
}
