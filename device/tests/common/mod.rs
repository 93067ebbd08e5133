//! A small raw vfio-user client and a server harness for the loopback tests.
//!
//! The client builds messages byte by byte from the layouts in QEMU's
//! `docs/interop/vfio-user.rst`, independently of the server's own `proto` module, so a
//! layout mistake there is not mirrored here.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use domdma_device::core::{BusMemory, Device, DeviceConfig};
use domdma_device::vfio_user::{EventFdInterrupts, Server, ServerOptions, StopHandle};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

pub const VERSION: u16 = 1;
pub const DMA_MAP: u16 = 2;
pub const DMA_UNMAP: u16 = 3;
pub const DEVICE_GET_INFO: u16 = 4;
pub const DEVICE_GET_REGION_INFO: u16 = 5;
pub const DEVICE_GET_IRQ_INFO: u16 = 7;
pub const DEVICE_SET_IRQS: u16 = 8;
pub const REGION_READ: u16 = 9;
pub const REGION_WRITE: u16 = 10;
pub const DEVICE_RESET: u16 = 13;

pub const F_REPLY: u32 = 1;
pub const F_NO_REPLY: u32 = 1 << 4;
pub const F_ERROR: u32 = 1 << 5;

pub const CONFIG_REGION: u32 = 7;
pub const MSIX_IRQ: u32 = 2;

/// A server running on a thread, on a socket in a private temporary directory.
pub struct TestServer {
    pub path: PathBuf,
    pub config: DeviceConfig,
    pub device: Arc<Mutex<Device>>,
    pub memory: BusMemory,
    pub irqs: Arc<EventFdInterrupts>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    _dir: TempDir,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(DeviceConfig::default())
    }

    pub fn start_with(config: DeviceConfig) -> Self {
        Self::start_with_options(config, ServerOptions::default())
    }

    pub fn start_with_options(config: DeviceConfig, options: ServerOptions) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/domdma-it-").unwrap();
        let path = dir.as_path().join("dev.sock");
        let server = Server::bind_with(&path, config.clone(), options).unwrap();
        let device = server.device();
        let memory = server.memory();
        let irqs = server.interrupts();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.run().unwrap());
        Self {
            path,
            config,
            device,
            memory,
            irqs,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.path)
    }

    /// Wait (bounded) until `cond` holds; the server cleans up after a client on its own
    /// thread.
    #[track_caller]
    pub fn eventually(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        for _ in 0..500 {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out waiting for: {what}");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A decoded reply.
#[derive(Debug)]
pub struct Reply {
    pub id: u16,
    pub command: u16,
    pub size: u32,
    pub flags: u32,
    pub error: u32,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn is_error(&self) -> bool {
        self.flags & F_ERROR != 0
    }

    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.payload[off..off + 4].try_into().unwrap())
    }

    pub fn u64_at(&self, off: usize) -> u64 {
        u64::from_ne_bytes(self.payload[off..off + 8].try_into().unwrap())
    }

    /// Assert a successful reply to command `command`.
    #[track_caller]
    pub fn ok(self, command: u16) -> Self {
        assert_eq!(self.command, command, "{self:?}");
        assert_eq!(self.flags, F_REPLY, "not a plain reply: {self:?}");
        assert_eq!(self.size as usize, 16 + self.payload.len());
        self
    }

    /// Assert an error reply with `errno`.
    #[track_caller]
    pub fn err(self, errno: i32) {
        assert_eq!(
            self.flags,
            F_REPLY | F_ERROR,
            "not an error reply: {self:?}"
        );
        assert_eq!(self.error, errno as u32, "{self:?}");
        assert_eq!(self.size, 16, "error replies are header only");
        assert!(self.payload.is_empty());
    }
}

pub fn header(id: u16, command: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&id.to_ne_bytes());
    v.extend_from_slice(&command.to_ne_bytes());
    v.extend_from_slice(&size.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v
}

pub fn message(id: u16, command: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = header(id, command, (16 + payload.len()) as u32, flags);
    v.extend_from_slice(payload);
    v
}

/// Concatenate native-endian fields.
pub fn fields(parts: &[&dyn Field]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        p.put(&mut v);
    }
    v
}

pub trait Field {
    fn put(&self, v: &mut Vec<u8>);
}
impl Field for u16 {
    fn put(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.to_ne_bytes())
    }
}
impl Field for u32 {
    fn put(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.to_ne_bytes())
    }
}
impl Field for u64 {
    fn put(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.to_ne_bytes())
    }
}

pub struct Client {
    pub stream: UnixStream,
    next_id: u16,
}

/// What QEMU 10.1 proposes (hw/vfio-user/proxy.c, caps_json()).
pub const QEMU_CAPS: &str = r#"{"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#;

impl Client {
    pub fn connect(path: &std::path::Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            stream,
            next_id: 0x100,
        }
    }

    pub fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let n = self.stream.send_with_fds(&[bytes], fds).unwrap();
        if n < bytes.len() {
            self.stream.write_all(&bytes[n..]).unwrap();
        }
    }

    /// Send a command; returns its id.
    pub fn send(&mut self, command: u16, flags: u32, payload: &[u8], fds: &[RawFd]) -> u16 {
        let id = self.id();
        let msg = message(id, command, flags, payload);
        self.send_with_fds(&msg, fds);
        id
    }

    pub fn recv(&mut self) -> Reply {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h).unwrap();
        let u16_at = |o: usize| u16::from_ne_bytes(h[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_ne_bytes(h[o..o + 4].try_into().unwrap());
        let size = u32_at(4);
        let mut payload = vec![0u8; size as usize - 16];
        self.stream.read_exact(&mut payload).unwrap();
        Reply {
            id: u16_at(0),
            command: u16_at(2),
            size,
            flags: u32_at(8),
            error: u32_at(12),
            payload,
        }
    }

    /// Send a command and read its reply, checking the id is echoed.
    pub fn call(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.send(command, 0, payload, fds);
        let r = self.recv();
        assert_eq!(r.id, id, "reply id");
        assert_eq!(r.command, command, "reply command");
        r
    }

    /// Whether the server has closed the connection (read returns EOF).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
    }

    pub fn version_payload(major: u16, minor: u16, json: &str) -> Vec<u8> {
        let mut p = fields(&[&major, &minor]);
        p.extend_from_slice(json.as_bytes());
        p.push(0);
        p
    }

    /// Negotiate like QEMU: version 0.0 with QEMU's capabilities.
    pub fn handshake(&mut self) -> Reply {
        let r = self
            .call(VERSION, &Self::version_payload(0, 0, QEMU_CAPS), &[])
            .ok(VERSION);
        assert_eq!(r.payload[..4], [0, 0, 0, 0]);
        r
    }

    pub fn region_info(&mut self, index: u32) -> Reply {
        self.call(
            DEVICE_GET_REGION_INFO,
            &fields(&[&32u32, &0u32, &index, &0u32, &0u64, &0u64]),
            &[],
        )
    }

    pub fn read_region(&mut self, region: u32, offset: u64, count: u32) -> Reply {
        self.call(REGION_READ, &fields(&[&offset, &region, &count]), &[])
    }

    pub fn write_region(&mut self, region: u32, offset: u64, data: &[u8]) -> Reply {
        let mut p = fields(&[&offset, &region, &(data.len() as u32)]);
        p.extend_from_slice(data);
        self.call(REGION_WRITE, &p, &[])
    }

    #[track_caller]
    pub fn read_u32(&mut self, region: u32, offset: u64) -> u32 {
        let r = self.read_region(region, offset, 4).ok(REGION_READ);
        assert_eq!(r.u64_at(0), offset);
        assert_eq!(r.u32_at(8), region);
        assert_eq!(r.u32_at(12), 4);
        r.u32_at(16)
    }

    #[track_caller]
    pub fn write_u32(&mut self, region: u32, offset: u64, v: u32) {
        let r = self
            .write_region(region, offset, &v.to_le_bytes())
            .ok(REGION_WRITE);
        assert_eq!(r.payload, fields(&[&offset, &region, &4u32]));
    }

    pub fn dma_map(
        &mut self,
        flags: u32,
        offset: u64,
        addr: u64,
        size: u64,
        fd: Option<RawFd>,
    ) -> Reply {
        let p = fields(&[&32u32, &flags, &offset, &addr, &size]);
        match fd {
            Some(fd) => self.call(DMA_MAP, &p, &[fd]),
            None => self.call(DMA_MAP, &p, &[]),
        }
    }

    pub fn dma_unmap(&mut self, flags: u32, addr: u64, size: u64) -> Reply {
        self.call(DMA_UNMAP, &fields(&[&24u32, &flags, &addr, &size]), &[])
    }

    pub fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
    ) -> Reply {
        self.call(
            DEVICE_SET_IRQS,
            &fields(&[&20u32, &flags, &index, &start, &count]),
            fds,
        )
    }
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> File {
    let name = CString::new("domdma-guest-ram").unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// Number of open descriptors in this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

pub fn raw(f: &impl AsRawFd) -> RawFd {
    f.as_raw_fd()
}
