//! Back-end specifics outside the conformance suite (which runs device and driver
//! behaviour on every back end: testkit/src/conformance, run by
//! device/tests/conformance.rs): the in-process back end's facts and statistics, and the
//! vfio-user back end against a fake server sending hostile replies (the real server's
//! connection life cycle is device/tests/vfio_user_backend.rs).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;
use std::time::Duration;

use domdma_device::core::DeviceConfig;
use domdma_device::spec;
use domdma_device::vfio_user::proto::{
    self, Capabilities, DeviceInfo, DmaUnmap, Header, IrqInfo, RegionAccess, RegionInfo, Version,
    HEADER_SIZE,
};
use domdma_driver_model::backend::inprocess::{InProcessBackend, InProcessConfig};
use domdma_driver_model::backend::phys::PhysConfig;
use domdma_driver_model::backend::vfio_user::{VfioUserBackend, VfioUserConfig, VfioUserError};
use domdma_driver_model::backend::{DmaBackend, DmaRequest, RegisterAccess};
use domdma_driver_model::dma_queue::{CompletionRecords, Descriptor, DmaQueue};
use vmm_sys_util::tempdir::TempDir;

/// How long any wait may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Small guest RAM: two nodes of 64 MiB at 4 GiB, `huge` 2 MiB pages in each.
fn phys(huge: u32) -> PhysConfig {
    PhysConfig {
        nodes: 2,
        node_size: 64 << 20,
        huge_pages_per_node: huge,
        ..PhysConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// In-process only
// ---------------------------------------------------------------------------------------

#[test]
fn in_process_info_and_stats() {
    let dev = InProcessBackend::new(InProcessConfig {
        device: DeviceConfig {
            queues: 2,
            ..DeviceConfig::default()
        },
        phys: PhysConfig {
            nodes: 1,
            ..phys(0)
        },
    })
    .unwrap();
    let info = dev.info();
    assert_eq!(info.backend, "in-process");
    assert_eq!(info.register_access, RegisterAccess::Direct);
    assert_eq!(info.msix_vectors, 3, "two queues and the fault vector");
    assert_eq!(info.numa_node, None, "one node: no NUMA");
    let mut q = DmaQueue::new(&dev, 1, 8, 0).unwrap();
    let cpl = CompletionRecords::new(&dev, 1).unwrap();
    let buf = dev.alloc_dma(DmaRequest::new(8192)).unwrap();
    cpl.clear(0);
    q.submit(&[Descriptor::fill(buf.bus_addr(), 1, 8192).with_completion(cpl.bus_addr(0))])
        .unwrap();
    let c = q.wait_completion(&cpl, 0, TIMEOUT).unwrap();
    assert!(c.is_ok(), "FILL: {c}");
    assert_eq!(dev.stats().queues[1].bytes, 8192);

    let bad = InProcessBackend::new(InProcessConfig {
        device: DeviceConfig {
            queues: 0,
            ..DeviceConfig::default()
        },
        phys: phys(0),
    });
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("device configuration"));
}

// ---------------------------------------------------------------------------------------
// vfio-user only: a fake server with hostile replies
// ---------------------------------------------------------------------------------------

/// What the fake server does with one message.
enum Act {
    /// The reply a well-behaved domdma server would send.
    Good,
    /// These bytes instead.
    Send(Vec<u8>),
    /// These bytes, then close the connection.
    SendThenClose(Vec<u8>),
    /// No reply (the connection stays open).
    Silent,
    /// Close the connection.
    Close,
}

fn reply(h: &Header, payload: &[u8]) -> Vec<u8> {
    proto::encode_reply(h, payload)
}

/// A well-behaved reply for a domdma device with 5 MSI-X vectors.
fn good_reply(h: &Header, payload: &[u8]) -> Vec<u8> {
    use proto::Command as C;
    match h.cmd() {
        Some(C::Version) => reply(
            h,
            &Version {
                major: 0,
                minor: 0,
                caps: Capabilities::SERVER,
            }
            .encode(),
        ),
        Some(C::DmaMap | C::DeviceSetIrqs | C::DeviceReset) => reply(h, &[]),
        Some(C::DeviceGetInfo) => reply(
            h,
            &DeviceInfo {
                argsz: 16,
                flags: proto::DEVICE_FLAGS_PCI,
                num_regions: proto::PCI_NUM_REGIONS,
                num_irqs: proto::PCI_NUM_IRQS,
            }
            .encode(),
        ),
        Some(C::DeviceGetRegionInfo) => {
            let r = RegionInfo::parse(payload).unwrap();
            let size = match r.index {
                0 => spec::REGS_BAR_SIZE,
                7 => 256,
                _ => 0,
            };
            reply(
                h,
                &RegionInfo {
                    argsz: 32,
                    flags: proto::REGION_INFO_FLAG_READ | proto::REGION_INFO_FLAG_WRITE,
                    size,
                    ..r
                }
                .encode(),
            )
        }
        Some(C::DeviceGetIrqInfo) => {
            let r = IrqInfo::parse(payload).unwrap();
            reply(
                h,
                &IrqInfo {
                    argsz: 16,
                    flags: proto::IRQ_INFO_EVENTFD,
                    count: 5,
                    ..r
                }
                .encode(),
            )
        }
        Some(C::RegionRead) => {
            let a = RegionAccess::parse_read(payload).unwrap();
            reply(h, &a.encode(&vec![0; a.count as usize]))
        }
        Some(C::RegionWrite) => {
            let (a, _) = RegionAccess::parse_write(payload).unwrap();
            reply(h, &a.encode(&[]))
        }
        Some(C::DmaUnmap) => reply(h, &DmaUnmap::parse(payload).unwrap().encode()),
        _ => proto::encode_error(h, libc::ENOTSUP as u32).to_vec(),
    }
}

/// A fake server on a fresh socket serving one client; `act` decides per message.
struct FakeServer {
    path: std::path::PathBuf,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl FakeServer {
    fn start(mut act: impl FnMut(&Header, &[u8]) -> Act + Send + 'static) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/domdma-fake-").unwrap();
        let path = dir.as_path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            loop {
                let mut hb = [0u8; HEADER_SIZE];
                if s.read_exact(&mut hb).is_err() {
                    return; // the client went away
                }
                let h = Header::parse(&hb);
                let mut payload = vec![0u8; h.payload_len().unwrap()];
                if s.read_exact(&mut payload).is_err() {
                    return;
                }
                let (bytes, close) = match act(&h, &payload) {
                    Act::Good => (good_reply(&h, &payload), false),
                    Act::Send(b) => (b, false),
                    Act::SendThenClose(b) => (b, true),
                    Act::Silent => continue,
                    Act::Close => return,
                };
                if s.write_all(&bytes).is_err() || close {
                    return;
                }
            }
        });
        FakeServer {
            path,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn config(&self) -> VfioUserConfig {
        VfioUserConfig {
            reply_timeout: Duration::from_millis(500),
            ..VfioUserConfig::new(&self.path).with_phys(PhysConfig {
                nodes: 1,
                node_size: 4 << 20,
                huge_pages_per_node: 0,
                ..PhysConfig::default()
            })
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // Ends when the client closes its end (the back end or its error dropped it).
            t.join().unwrap();
        }
    }
}

/// Connecting against a server whose reply to command `cmd` is `bad`; returns the error.
fn connect_with_bad_reply(
    cmd: proto::Command,
    bad: impl Fn(&Header) -> Act + Send + 'static,
) -> VfioUserError {
    let fake = FakeServer::start(move |h, _| {
        if h.cmd() == Some(cmd) {
            bad(h)
        } else {
            Act::Good
        }
    });
    let e = VfioUserBackend::connect(&fake.config()).expect_err("connected despite a bad reply");
    drop(fake);
    e
}

fn header(h: &Header, f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut r = Header {
        size: HEADER_SIZE as u32,
        flags: proto::FLAGS_TYPE_REPLY,
        error: 0,
        ..*h
    };
    f(&mut r);
    r.encode().to_vec()
}

#[test]
fn vfio_user_fake_server_is_well_behaved() {
    let fake = FakeServer::start(|_, _| Act::Good);
    let dev = VfioUserBackend::connect(&fake.config()).unwrap();
    assert_eq!(dev.msix_vectors(), 5);
    assert_eq!(dev.read32(spec::REG_ID).unwrap(), 0, "the fake reads zeros");
    drop(dev);
}

#[test]
fn vfio_user_hostile_replies_are_errors_not_panics() {
    use proto::Command as C;
    let protocol = |e: VfioUserError, want: &str| match e {
        VfioUserError::Protocol { problem, .. } => assert!(problem.contains(want), "{problem}"),
        e => panic!("expected a protocol error with {want:?}: {e:?}"),
    };
    protocol(
        connect_with_bad_reply(C::Version, |h| {
            Act::Send(header(h, |r| r.id = h.id.wrapping_add(1)))
        }),
        "reply id",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| Act::Send(header(h, |r| r.size = u32::MAX))),
        "at most",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| Act::Send(header(h, |r| r.size = 8))),
        "smaller than the header",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| {
            Act::Send(header(h, |r| r.flags = proto::FLAGS_TYPE_COMMAND))
        }),
        "not a reply",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| {
            let v = Version {
                major: 1,
                minor: 0,
                caps: Capabilities::SERVER,
            };
            Act::Send(reply(h, &v.encode()))
        }),
        "version 1.0",
    );
    protocol(
        connect_with_bad_reply(C::Version, |h| Act::Send(reply(h, b"\0\0\0\0{not json\0"))),
        "not JSON",
    );
    protocol(
        connect_with_bad_reply(C::DeviceGetRegionInfo, |h| Act::Send(reply(h, &[0u8; 8]))),
        "payload is 8 bytes",
    );
    match connect_with_bad_reply(C::DmaMap, |h| {
        Act::Send(proto::encode_error(h, libc::EEXIST as u32).to_vec())
    }) {
        VfioUserError::Server { command, errno } => {
            assert_eq!((command, errno), ("DMA_MAP", libc::EEXIST as u32))
        }
        e => panic!("{e:?}"),
    }
    assert!(matches!(
        connect_with_bad_reply(C::DeviceGetInfo, |_| Act::Close),
        VfioUserError::Closed { .. }
    ));
    assert!(matches!(
        connect_with_bad_reply(C::DeviceGetIrqInfo, |_| Act::Silent),
        VfioUserError::Timeout { .. }
    ));
    // A reply cut short, then the server hangs up; or it just stops sending.
    assert!(matches!(
        connect_with_bad_reply(C::Version, |h| {
            let mut b = header(h, |r| r.size = 100);
            b.extend_from_slice(&[0; 10]);
            Act::SendThenClose(b)
        }),
        VfioUserError::Closed { .. }
    ));
    assert!(matches!(
        connect_with_bad_reply(C::Version, |h| {
            let mut b = header(h, |r| r.size = 100);
            b.extend_from_slice(&[0; 10]);
            Act::Send(b)
        }),
        VfioUserError::Timeout { .. }
    ));
    match connect_with_bad_reply(C::DeviceGetInfo, |h| {
        Act::Send(reply(
            h,
            &DeviceInfo {
                argsz: 16,
                flags: 0,
                num_regions: 9,
                num_irqs: 5,
            }
            .encode(),
        ))
    }) {
        VfioUserError::Unsuitable(m) => assert!(m.contains("not a PCI device"), "{m}"),
        e => panic!("{e:?}"),
    }
    match connect_with_bad_reply(C::DeviceGetIrqInfo, |h| {
        let r = IrqInfo {
            argsz: 16,
            flags: proto::IRQ_INFO_EVENTFD,
            index: proto::PCI_MSIX_IRQ_INDEX,
            count: 100_000,
        };
        Act::Send(reply(h, &r.encode()))
    }) {
        VfioUserError::Unsuitable(m) => assert!(m.contains("100000 vectors"), "{m}"),
        e => panic!("{e:?}"),
    }
}

#[test]
fn vfio_user_bad_register_replies_fail_only_that_access() {
    use proto::Command as C;
    // After setup: BAR0 reads at 0x10 get a reply with the wrong offset, BAR0 writes at
    // 0x14 an error reply.
    let fake = FakeServer::start(|h, payload| match h.cmd() {
        Some(C::RegionRead) => {
            let a = RegionAccess::parse_read(payload).unwrap();
            if a.region == 0 && a.offset == 0x10 {
                let lie = RegionAccess { offset: 0x20, ..a };
                Act::Send(reply(h, &lie.encode(&[1, 2, 3, 4])))
            } else {
                Act::Good
            }
        }
        Some(C::RegionWrite) => {
            let (a, _) = RegionAccess::parse_write(payload).unwrap();
            if a.region == 0 && a.offset == 0x14 {
                Act::Send(proto::encode_error(h, libc::EINVAL as u32).to_vec())
            } else {
                Act::Good
            }
        }
        _ => Act::Good,
    });
    // Writes wait for their reply here: a posted write's error reply is never read.
    let dev = VfioUserBackend::connect(&fake.config().with_posted_writes(false)).unwrap();
    // An error reply fails that access only.
    let e = dev.write32(0x14, 1).unwrap_err();
    assert!(e.to_string().contains("errno 22"), "{e}");
    assert!(dev.is_connected());
    assert_eq!(
        dev.read32(0x4).unwrap(),
        0,
        "still usable after an error reply"
    );
    // A well-framed reply about another access fails that access; the stream is still in
    // step (right id, command and size), so the connection stays.
    let e = dev.read32(0x10).unwrap_err();
    assert!(e.to_string().contains("the reply says"), "{e}");
    assert!(dev.is_connected());
    assert_eq!(dev.read32(0x4).unwrap(), 0);
    drop(dev);
    drop(fake);
}
