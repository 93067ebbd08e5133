//! The vfio-user server (`domdma_device::vfio_user::server::Server`) fed arbitrary message
//! streams with file descriptors, through its public API only: `Server::bind`, `run` on a
//! thread, as the `domdma-device` binary does.
//!
//! One server per process. Each input is one client connection: packets of raw bytes or of
//! well-formed messages (VERSION, DMA_MAP/UNMAP, region reads and writes to config space,
//! BAR0 and the MSI-X BAR, SET_IRQS, GET_*_INFO, DEVICE_RESET, any command code) with
//! arbitrary fields, some carrying SCM_RIGHTS descriptors (memfds of a few pages filled
//! with input bytes, sealed or not; eventfds; pipes; /dev/null), split into chunks as the
//! input decides; a few helpers program a queue or bus mastering through region writes, so
//! the device reaches the DMA_MAPped memfds; and the input's `preset` bits have the harness
//! do what a VMM does first (handshake, a DMA_MAP of a memfd holding the input's ring of
//! descriptors, MSI-X eventfds, bus mastering, queue 0 started on that ring), so that
//! the packets meet a device at work. Replies are drained as they come. Then the
//! client closes its side and reads until the server closes the connection (the server has
//! torn it down), and a fresh connection must complete a VERSION handshake: the server
//! is still alive and serving.
//!
//! Findings: a panic or memory error anywhere in the process (the server thread, the
//! engine's workers), a server thread that returns, a signal (SIGBUS, SIGSEGV), or a server
//! that stops reading, stops closing a finished connection or stops answering VERSION
//! within `STUCK` (a panic naming what it waited for).

#![no_main]

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use domdma_device::core::DeviceConfig;
use domdma_device::spec::*;
use domdma_device::vfio_user::proto::*;
use domdma_device::vfio_user::server::Server;
use libfuzzer_sys::fuzz_target;

/// How long the server may take to read what we send, to close a finished connection or
/// to answer VERSION before the input counts as a hang.
const STUCK: Duration = Duration::from_secs(10);

/// The server's socket path; the server runs on its own thread for the whole process.
fn server() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("domdma-fuzz-vfio-user-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket directory");
        let path = dir.join("server.sock");
        let config = DeviceConfig {
            queues: 2,
            domains: 4,
            iotlb_entries: 64,
            max_transfer: 1 << 20,
            ..DeviceConfig::default()
        };
        let server = Server::bind(&path, config).expect("bind the server socket");
        std::thread::Builder::new()
            .name("vfio-user-server".into())
            .spawn(move || {
                let r = server.run();
                panic!("the server's run() returned while clients were still coming: {r:?}");
            })
            .expect("server thread");
        path
    })
}

// ---- file descriptors -----------------------------------------------------------------

#[derive(Arbitrary, Debug, Clone)]
enum FdKind {
    /// A memfd of `pages` 4 KiB pages (0-4) plus `extra` bytes, starting with `fill`.
    Memfd {
        pages: u8,
        extra: u8,
        sealed: bool,
        fill: Vec<u8>,
    },
    Eventfd,
    Pipe,
    DevNull,
}

/// A memfd of `len` bytes starting with `fill`, sealed against resizing or not.
fn memfd(len: u64, sealed: bool, fill: &[u8]) -> OwnedFd {
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"domdma-fuzz".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: a new descriptor owned here.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).expect("memfd size");
    let n = fill.len().min(len as usize);
    file.write_all(&fill[..n]).expect("memfd fill");
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(r, 0, "F_ADD_SEALS: {}", io::Error::last_os_error());
    }
    OwnedFd::from(file)
}

fn make_fd(kind: &FdKind) -> OwnedFd {
    let fd = match kind {
        FdKind::Memfd {
            pages,
            extra,
            sealed,
            fill,
        } => {
            // Up to 4 pages, and one case in two some bytes more (a size off the page).
            let len = u64::from(pages % 5) * 4096 + u64::from(*extra % 2) * u64::from(*extra);
            return memfd(len, *sealed, fill);
        }
        // SAFETY: eventfd with valid flags.
        FdKind::Eventfd => unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) },
        FdKind::Pipe => {
            let mut p = [0; 2];
            // SAFETY: `p` has room for the two descriptors.
            let r = unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) };
            assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
            // SAFETY: the write end is ours; closed at once.
            drop(unsafe { OwnedFd::from_raw_fd(p[1]) });
            p[0]
        }
        // SAFETY: a NUL-terminated path.
        FdKind::DevNull => unsafe {
            libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC)
        },
    };
    assert!(fd >= 0, "{kind:?}: {}", io::Error::last_os_error());
    // SAFETY: a new descriptor owned here.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

// ---- input ----------------------------------------------------------------------------

/// A bus address for DMA_MAP/UNMAP and rings: page-aligned low addresses mostly.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Page(u16),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Page(p) => u64::from(p % 64) * 4096,
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
enum Msg {
    /// Bytes as they are (no header added).
    Raw(Vec<u8>),
    /// A header with any command, flags and size correction, and a payload.
    Any {
        command: u16,
        flags: u8,
        size_delta: i8,
        payload: Vec<u8>,
    },
    Version {
        major: u16,
        minor: u16,
        json: u8,
        text: Vec<u8>,
    },
    DmaMap {
        argsz: u8,
        flags: u8,
        offset: u16,
        address: Addr,
        pages: u8,
        size: Option<u64>,
    },
    DmaUnmap {
        argsz: u8,
        flags: u8,
        address: Addr,
        size: u64,
    },
    RegionRead {
        region: u8,
        offset: u16,
        count: u16,
    },
    RegionWrite {
        region: u8,
        offset: u16,
        data: Vec<u8>,
        no_reply: bool,
    },
    /// A 32-bit BAR0 register write (posted, as QEMU sends them).
    Register {
        offset: u16,
        value: u32,
    },
    /// Program queue `q`: ring at `ring` (a DMA_MAP address), 2^size entries, enable, and
    /// ring the doorbell with `tail`.
    Queue {
        q: u8,
        ring: Addr,
        size: u8,
        domain: u8,
        tail: u16,
    },
    /// PCI command register: memory space and bus master on or off.
    BusMaster(bool),
    SetIrqs {
        argsz: u8,
        flags: u16,
        index: u8,
        start: u8,
        count: u8,
        data: Vec<u8>,
    },
    RegionInfo {
        argsz: u8,
        index: u8,
    },
    IrqInfo {
        argsz: u8,
        index: u8,
    },
    DeviceInfo {
        argsz: u8,
    },
    Reset,
}

#[derive(Arbitrary, Debug, Clone)]
struct Packet {
    msg: Msg,
    fds: Vec<FdKind>,
    /// Send in pieces of this many bytes (0: at once).
    split: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// `PRESET_*` bits: what a VMM does first, before the packets.
    preset: u8,
    /// How the client answers the server's DMA_READ / DMA_WRITE commands (`Client::answer`).
    dma_answers: [u8; 4],
    /// Descriptors in the preset ring.
    ring: Vec<DescSpec>,
    packets: Vec<Packet>,
}

/// A descriptor of the preset ring; addresses are offsets into the preset mapping (one
/// case in two), or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct DescSpec {
    opcode: u8,
    flags: u8,
    len: u16,
    src: u32,
    dst: u32,
    cpl: u32,
}

impl DescSpec {
    fn addr(v: u32) -> u64 {
        if v & 1 == 0 {
            PRESET_BUS + u64::from(v >> 1) % PRESET_SIZE
        } else {
            u64::from(v)
        }
    }

    fn encode(&self, slot: usize) -> [u8; DESC_SIZE as usize] {
        Descriptor {
            opcode: self.opcode % 7,
            flags: self.flags % 4,
            reserved_lo: 0,
            len: u32::from(self.len),
            src: Self::addr(self.src),
            dst: Self::addr(self.dst),
            completion: Self::addr(self.cpl),
            tag: slot as u64,
            reserved: [0; 24],
        }
        .encode()
    }
}

/// Preset: a VERSION handshake.
const PRESET_HANDSHAKE: u8 = 1 << 0;
/// Preset: DMA_MAP a sealed memfd of `PRESET_SIZE` bytes at `PRESET_BUS` (read-write),
/// holding the input's ring of descriptors at its start.
const PRESET_MAP: u8 = 1 << 1;
/// Preset: Bus Master Enable.
const PRESET_MASTER: u8 = 1 << 2;
/// Preset: queue 0 on that ring (`PRESET_RING` entries), doorbell after the descriptors.
const PRESET_QUEUE: u8 = 1 << 3;
/// Preset: an eventfd for every MSI-X vector (SET_IRQS).
const PRESET_IRQS: u8 = 1 << 4;
/// Preset: the DMA_MAP of `PRESET_MAP` without a descriptor: memory only the client
/// reaches, which the server reads and writes with DMA_READ / DMA_WRITE (QEMU's guest RAM
/// without a shared memory backend).
const PRESET_CLIENT_MEMORY: u8 = 1 << 5;
const PRESET_BUS: u64 = 0x10_0000;
const PRESET_SIZE: u64 = 64 << 10;
const PRESET_RING: usize = 64;

/// The preset's messages, with the descriptors they carry (all in one packet each).
fn preset(preset: u8, ring: &[DescSpec]) -> Vec<(Vec<u8>, Vec<OwnedFd>)> {
    let mut out = Vec::new();
    if preset & PRESET_HANDSHAKE != 0 {
        out.push((version_message(1), Vec::new()));
    }
    let descs = ring.len().min(PRESET_RING - 1);
    if preset & PRESET_MAP != 0 {
        let mut fill = Vec::with_capacity(descs * DESC_SIZE as usize);
        for (i, d) in ring.iter().take(descs).enumerate() {
            fill.extend_from_slice(&d.encode(i));
        }
        let fds = if preset & PRESET_CLIENT_MEMORY != 0 {
            Vec::new()
        } else {
            vec![memfd(PRESET_SIZE, true, &fill)]
        };
        let m = DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            address: PRESET_BUS,
            size: PRESET_SIZE,
        };
        out.push((command(2, Command::DmaMap, &m.encode()), fds));
    }
    if preset & PRESET_IRQS != 0 {
        let n = 3; // queues + 1
        let s = IrqSet {
            argsz: IrqSet::SIZE as u32,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index: PCI_MSIX_IRQ_INDEX,
            start: 0,
            count: n,
            data: Vec::new(),
        };
        let fds = (0..n).map(|_| make_fd(&FdKind::Eventfd)).collect();
        out.push((command(3, Command::DeviceSetIrqs, &s.encode()), fds));
    }
    if preset & PRESET_MASTER != 0 {
        out.push((encode(4, &Msg::BusMaster(true)), Vec::new()));
    }
    if preset & PRESET_QUEUE != 0 {
        let q = Msg::Queue {
            q: 0,
            ring: Addr::Raw(PRESET_BUS),
            size: PRESET_RING.trailing_zeros() as u8,
            domain: 0,
            tail: descs as u16,
        };
        out.push((encode(5, &q), Vec::new()));
    }
    out
}

const CONFIG_REGION: u32 = PCI_CONFIG_REGION_INDEX;

fn command(id: u16, cmd: Command, payload: &[u8]) -> Vec<u8> {
    encode_command(id, cmd as u16, 0, payload)
}

fn region_write(id: u16, region: u32, offset: u64, data: &[u8], no_reply: bool) -> Vec<u8> {
    let access = RegionAccess {
        offset,
        region,
        count: data.len() as u32,
    };
    let flags = if no_reply { FLAGS_NO_REPLY } else { 0 };
    encode_command(id, Command::RegionWrite as u16, flags, &access.encode(data))
}

fn version_message(id: u16) -> Vec<u8> {
    let v = Version {
        major: VERSION_MAJOR,
        minor: 0,
        caps: Capabilities::DEFAULT,
    };
    command(id, Command::Version, &v.encode())
}

/// The bytes of one message.
fn encode(id: u16, msg: &Msg) -> Vec<u8> {
    match msg {
        Msg::Raw(b) => b.clone(),
        Msg::Any {
            command,
            flags,
            size_delta,
            payload,
        } => {
            let mut v = encode_command(id, *command, 0, payload);
            // Any flags (type bits included) and a size that may lie.
            v[8..12].copy_from_slice(&u32::from(*flags).to_ne_bytes());
            if *size_delta != 0 {
                let size = (v.len() as i64 + i64::from(*size_delta)).max(0) as u32;
                let size = if *size_delta == i8::MIN {
                    u32::MAX
                } else {
                    size
                };
                v[4..8].copy_from_slice(&size.to_ne_bytes());
            }
            v
        }
        Msg::Version {
            major,
            minor,
            json,
            text,
        } => {
            let mut p = Vec::new();
            p.extend_from_slice(&major.to_ne_bytes());
            p.extend_from_slice(&minor.to_ne_bytes());
            let caps = |c: Capabilities| c.to_json().into_bytes();
            match json % 6 {
                0 => {}
                1 => p.extend_from_slice(&caps(Capabilities::DEFAULT)),
                2 => p.extend_from_slice(&caps(Capabilities {
                    max_msg_fds: 0,
                    max_data_xfer_size: 0,
                    pgsizes: 0,
                    max_dma_maps: 0,
                })),
                3 => p.extend_from_slice(br#"{"capabilities":{"max_msg_fds":-1,"pgsizes":1e99}}"#),
                _ => p.extend_from_slice(text),
            }
            if json & 0x80 == 0 {
                p.push(0);
            }
            command(id, Command::Version, &p)
        }
        Msg::DmaMap {
            argsz,
            flags,
            offset,
            address,
            pages,
            size,
        } => {
            let m = DmaMap {
                argsz: if *argsz < 200 {
                    32
                } else {
                    u32::from(*argsz) - 200
                },
                flags: u32::from(flags % 8),
                offset: u64::from(*offset) & !0xfff | if offset & 1 == 1 { 0x10 } else { 0 },
                address: address.get(),
                size: size.unwrap_or(u64::from(pages % 5) * 4096),
            };
            command(id, Command::DmaMap, &m.encode())
        }
        Msg::DmaUnmap {
            argsz,
            flags,
            address,
            size,
        } => {
            let m = DmaUnmap {
                argsz: if *argsz < 200 {
                    24
                } else {
                    u32::from(*argsz) - 200
                },
                flags: u32::from(flags % 8),
                address: address.get(),
                size: if size >> 63 == 1 {
                    *size
                } else {
                    size % (64 << 12)
                },
            };
            command(id, Command::DmaUnmap, &m.encode())
        }
        Msg::RegionRead {
            region,
            offset,
            count,
        } => {
            let a = RegionAccess {
                offset: u64::from(*offset),
                region: u32::from(region % 10),
                count: u32::from(*count),
            };
            command(id, Command::RegionRead, &a.encode(&[]))
        }
        Msg::RegionWrite {
            region,
            offset,
            data,
            no_reply,
        } => region_write(
            id,
            u32::from(region % 10),
            u64::from(*offset),
            data,
            *no_reply,
        ),
        Msg::Register { offset, value } => region_write(
            id,
            REGS_BAR as u32,
            u64::from(offset % REGS_BAR_SIZE as u16) & !3,
            &value.to_le_bytes(),
            true,
        ),
        Msg::Queue {
            q,
            ring,
            size,
            domain,
            tail,
        } => {
            let q = u32::from(q % 3);
            let ring = ring.get();
            let mut v = Vec::new();
            for (reg, value) in [
                (Q_CTRL, 0),
                (Q_BASE_LO, ring as u32),
                (Q_BASE_HI, (ring >> 32) as u32),
                (Q_SIZE, 1 << (size % 9)),
                (Q_DOMAIN, u32::from(domain % 5)),
                (Q_CTRL, Q_CTRL_ENABLE),
                (Q_TAIL, u32::from(*tail)),
            ] {
                v.extend(region_write(
                    id,
                    REGS_BAR as u32,
                    queue_reg(q, reg),
                    &value.to_le_bytes(),
                    true,
                ));
            }
            v
        }
        Msg::BusMaster(on) => {
            let cmd: u16 = 2 | if *on { 4 } else { 0 };
            region_write(id, CONFIG_REGION, 4, &cmd.to_le_bytes(), false)
        }
        Msg::SetIrqs {
            argsz,
            flags,
            index,
            start,
            count,
            data,
        } => {
            let s = IrqSet {
                argsz: if *argsz < 200 {
                    20
                } else {
                    u32::from(*argsz) - 200
                },
                flags: u32::from(*flags),
                index: u32::from(index % 6),
                start: u32::from(*start),
                count: u32::from(*count),
                data: data.clone(),
            };
            command(id, Command::DeviceSetIrqs, &s.encode())
        }
        Msg::RegionInfo { argsz, index } => {
            let r = RegionInfo {
                argsz: if *argsz < 200 {
                    32
                } else {
                    u32::from(*argsz) - 200
                },
                index: u32::from(index % 12),
                ..RegionInfo::default()
            };
            command(id, Command::DeviceGetRegionInfo, &r.encode())
        }
        Msg::IrqInfo { argsz, index } => {
            let r = IrqInfo {
                argsz: if *argsz < 200 {
                    16
                } else {
                    u32::from(*argsz) - 200
                },
                index: u32::from(index % 7),
                ..IrqInfo::default()
            };
            command(id, Command::DeviceGetIrqInfo, &r.encode())
        }
        Msg::DeviceInfo { argsz } => {
            let r = DeviceInfo {
                argsz: if *argsz < 200 {
                    16
                } else {
                    u32::from(*argsz) - 200
                },
                ..DeviceInfo::default()
            };
            command(id, Command::DeviceGetInfo, &r.encode())
        }
        Msg::Reset => command(id, Command::DeviceReset, &[]),
    }
}

// ---- the client side ------------------------------------------------------------------

/// `sendmsg` of `data` with `fds` as SCM_RIGHTS, non-blocking.
fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: `msg` has a control buffer of `space` bytes, enough for one header with
        // `fds.len()` descriptors; the header and data pointers the macros return point into
        // it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
        }
    }
    // SAFETY: `msg` describes valid buffers for the whole call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Wait for `events` on the socket for up to `timeout`; returns the revents.
fn poll(sock: RawFd, events: libc::c_short, timeout: Duration) -> libc::c_short {
    let mut p = libc::pollfd {
        fd: sock,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(1000) as i32) };
    if r <= 0 {
        0
    } else {
        p.revents
    }
}

/// The client end of one connection: what it sends, and the answers it gives to the
/// server's own commands (DMA_READ / DMA_WRITE of memory mapped without a descriptor).
struct Client {
    s: UnixStream,
    deadline: Instant,
    /// Bytes received and not yet parsed.
    rx: Vec<u8>,
    /// Answers to the server's commands, sent at the next message boundary of ours.
    answers: Vec<u8>,
    /// How to answer the n-th command: `policy[n % 4] % 6` (see `answer`).
    policy: [u8; 4],
    commands: usize,
    /// The client's own memory behind `PRESET_BUS` (what an fd-less DMA_MAP there shows).
    memory: Vec<u8>,
    open: bool,
}

impl Client {
    /// Read whatever the server sent and prepare answers to its commands; false once it
    /// closed the connection.
    fn pump(&mut self) -> bool {
        let mut buf = [0u8; 64 << 10];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => {
                    self.open = false;
                    break;
                }
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Reset by the server (it closed with unread data): closed.
                Err(_) => {
                    self.open = false;
                    break;
                }
            }
        }
        while self.rx.len() >= HEADER_SIZE {
            let hdr = Header::parse(self.rx[..HEADER_SIZE].try_into().unwrap());
            let size = hdr.size as usize;
            assert!(
                size >= HEADER_SIZE,
                "the server sent a message of {size} bytes (less than its header): {hdr:?}"
            );
            if self.rx.len() < size {
                break;
            }
            let msg: Vec<u8> = self.rx.drain(..size).collect();
            if hdr.msg_type() == FLAGS_TYPE_COMMAND {
                self.answer(&hdr, &msg[HEADER_SIZE..]);
            }
        }
        self.open
    }

    /// Prepare the answer to a command of the server: per the input's policy, a correct
    /// reply (twice as likely), an error reply, a reply that does not match, or none.
    fn answer(&mut self, hdr: &Header, payload: &[u8]) {
        let how = self.policy[self.commands % 4] % 6;
        self.commands += 1;
        let cmd = hdr.cmd();
        let rw = DmaRw::parse(payload)
            .ok()
            .map(|(rw, data)| (rw, data.len()));
        let reply = match (cmd, rw, how) {
            (_, _, 5) => return,
            (Some(Command::DmaRead), Some((rw, _)), 0 | 1) if rw.count <= 1 << 20 => {
                let mut data = vec![0u8; rw.count as usize];
                self.read_memory(rw.address, &mut data);
                encode_reply(hdr, &rw.encode(&data))
            }
            (Some(Command::DmaWrite), Some((rw, len)), 0 | 1) => {
                if len as u64 == rw.count {
                    self.write_memory(rw.address, &payload[DmaRw::SIZE..]);
                }
                encode_reply(hdr, &rw.encode(&[]))
            }
            (_, Some((rw, _)), 3) => {
                // Half the data, and the count of the request.
                let data = vec![0xa5; (rw.count as usize / 2).min(4096)];
                encode_reply(hdr, &rw.encode(&data))
            }
            (_, _, 4) => {
                let mut h = *hdr;
                h.id ^= 0x5a5a;
                encode_reply(&h, payload)
            }
            _ => encode_error(hdr, libc::EFAULT as u32).to_vec(),
        };
        self.answers.extend_from_slice(&reply);
    }

    fn read_memory(&self, address: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let a = address.wrapping_add(i as u64).wrapping_sub(PRESET_BUS);
            *b = self.memory.get(a as usize).copied().unwrap_or(0);
        }
    }

    fn write_memory(&mut self, address: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let a = address.wrapping_add(i as u64).wrapping_sub(PRESET_BUS);
            if let Some(m) = self.memory.get_mut(a as usize) {
                *m = b;
            }
        }
    }

    /// Send `data` (the first byte carrying `fds`), reading meanwhile. False when the
    /// server closed the connection.
    fn send_raw(&mut self, data: &[u8], fds: &[RawFd]) -> bool {
        let mut sent = 0;
        let mut fds = fds;
        while sent < data.len() {
            match send_with_fds(self.s.as_raw_fd(), &data[sent..], fds) {
                Ok(n) => {
                    sent += n;
                    fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < self.deadline,
                        "the server stopped reading its connection for {STUCK:?}"
                    );
                    let r = poll(self.s.as_raw_fd(), libc::POLLIN | libc::POLLOUT, STUCK);
                    if r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !self.pump() {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The server closed the connection (a protocol violation ends it).
                Err(_) => {
                    self.open = false;
                    return false;
                }
            }
        }
        self.pump()
    }

    /// Send a chunk of ours; at a message boundary also the answers that are due.
    fn send(&mut self, data: &[u8], fds: &[RawFd], boundary: bool) -> bool {
        if !self.send_raw(data, fds) {
            return false;
        }
        if boundary {
            // Answers prepared while they went out are sent too, until none is due.
            while !self.answers.is_empty() {
                let answers = std::mem::take(&mut self.answers);
                if !self.send_raw(&answers, &[]) {
                    return false;
                }
            }
        }
        true
    }
}

/// A fresh connection completes a VERSION handshake.
fn check_alive() {
    let path = server();
    let mut s = UnixStream::connect(path).expect("connect to the server after an input");
    s.set_read_timeout(Some(STUCK)).unwrap();
    s.set_write_timeout(Some(STUCK)).unwrap();
    s.write_all(&version_message(0x7777))
        .expect("send VERSION on a fresh connection");
    let mut hdr = [0u8; HEADER_SIZE];
    s.read_exact(&mut hdr)
        .unwrap_or_else(|e| panic!("no VERSION reply on a fresh connection within {STUCK:?}: {e}"));
    let h = Header::parse(&hdr);
    assert_eq!(
        (h.id, h.command, h.flags),
        (0x7777, Command::Version as u16, FLAGS_TYPE_REPLY),
        "VERSION reply on a fresh connection: {h:?}"
    );
    let mut payload = vec![0u8; h.payload_len().expect("reply size")];
    s.read_exact(&mut payload).expect("VERSION reply payload");
    let v = Version::parse(&payload).expect("a valid VERSION reply");
    assert_eq!(v.major, VERSION_MAJOR);
}

fuzz_target!(|input: Input| {
    let path = server();
    let s = UnixStream::connect(path).expect("connect to the server");
    s.set_nonblocking(true).unwrap();
    let mut memory = vec![0u8; PRESET_SIZE as usize];
    for (i, d) in input.ring.iter().take(PRESET_RING - 1).enumerate() {
        let at = i * DESC_SIZE as usize;
        memory[at..at + DESC_SIZE as usize].copy_from_slice(&d.encode(i));
    }
    let mut c = Client {
        s,
        deadline: Instant::now() + STUCK,
        rx: Vec::new(),
        answers: Vec::new(),
        policy: input.dma_answers,
        commands: 0,
        memory,
        open: true,
    };
    let mut open = true;
    for (data, fds) in preset(input.preset, &input.ring) {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if open {
            open = c.send(&data, &raw, true);
        }
    }
    let mut id: u16 = 16;
    for p in input.packets.iter().take(64) {
        if !open {
            break;
        }
        let data = encode(id, &p.msg);
        id = id.wrapping_add(1);
        let fds: Vec<OwnedFd> = p.fds.iter().take(20).map(make_fd).collect();
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        if data.is_empty() {
            continue;
        }
        let split = usize::from(p.split);
        if split == 0 || split >= data.len() {
            open = c.send(&data, &raw, true);
        } else {
            let chunks = data.len().div_ceil(split);
            for (k, chunk) in data.chunks(split).enumerate() {
                let with: &[RawFd] = if k == 0 { &raw } else { &[] };
                open = c.send(chunk, with, k + 1 == chunks);
                if !open {
                    break;
                }
            }
        }
        // Our copies of the descriptors go now; the server keeps its own.
        drop(fds);
    }
    // Close our side; the server tears the connection down and closes its end.
    let _ = c.s.shutdown(std::net::Shutdown::Write);
    while open {
        assert!(
            Instant::now() < c.deadline + STUCK,
            "the server did not close a connection whose client had closed, within {STUCK:?}"
        );
        let _ = poll(c.s.as_raw_fd(), libc::POLLIN, STUCK);
        open = c.pump();
    }
    drop(c);
    check_alive();
});
