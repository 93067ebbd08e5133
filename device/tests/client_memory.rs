//! Client memory that vanishes under a DMA mapping the server accepted: the server is a
//! real one on a socket, the client maps files and then takes their pages away.
//!
//! Each route once ended the whole server (and so this test process) with SIGBUS:
//! - a memfd the client shrinks after DMA_MAP, the device then writing into the cut part;
//! - a hugetlbfs memfd the huge-page pool cannot back (refused at DMA_MAP now);
//! - a sparse file on a full tmpfs, the device writing into a hole.
//!
//! The device now faults the access (`FAULT_BUS_ERROR`), stops using that mapping, and goes
//! on serving the others and the next client.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use domdma_device::spec::{self, CompletionRecord, Descriptor, FaultRecord};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempdir::TempDir;

const RW: u32 = 3;

/// Bus address of the control memory: ring, completion records, fault log.
const CTL: u64 = 0x1_0000_0000;
const CTL_SIZE: u64 = 1 << 20;
const RING: u64 = CTL;
const RING_SIZE: u32 = 64;
/// Completion record of descriptor `i`: `CPL + i * 32`.
const CPL: u64 = CTL + 0x1_0000;
const FLOG: u64 = CTL + 0x2_0000;
const FLOG_SIZE: u32 = 64;
/// Bus address of a healthy data mapping.
const DATA: u64 = 0x2_0000_0000;
const DATA_SIZE: u64 = 2 << 20;
/// Bus address of the mapping whose memory goes away.
const VICTIM: u64 = 0x3_0000_0000;

/// A client that has mapped its control memory and set the device up: bus master, fault log
/// enabled, queue 0 (pass-through domain 0, so IOVAs are bus addresses) running.
struct Rig {
    c: Client,
    ctl: File,
    tail: u32,
}

impl Rig {
    fn new(srv: &TestServer) -> Self {
        let mut c = srv.connect();
        c.handshake();
        let ctl = memfd(CTL_SIZE);
        c.dma_map(RW, 0, CTL, CTL_SIZE, Some(ctl.as_raw_fd()))
            .ok(DMA_MAP);
        let cmd = c.read_u32(CONFIG_REGION, 4) & 0xffff;
        c.write_region(CONFIG_REGION, 4, &((cmd | 0x6) as u16).to_le_bytes())
            .ok(REGION_WRITE);
        c.write_u32(0, spec::REG_FLOG_BASE_LO, FLOG as u32);
        c.write_u32(0, spec::REG_FLOG_BASE_HI, (FLOG >> 32) as u32);
        c.write_u32(0, spec::REG_FLOG_SIZE, FLOG_SIZE);
        c.write_u32(0, spec::REG_FLOG_CTRL, spec::FLOG_CTRL_ENABLE);
        let q = |reg| spec::queue_reg(0, reg);
        c.write_u32(0, q(spec::Q_BASE_LO), RING as u32);
        c.write_u32(0, q(spec::Q_BASE_HI), (RING >> 32) as u32);
        c.write_u32(0, q(spec::Q_SIZE), RING_SIZE);
        c.write_u32(0, q(spec::Q_CTRL), spec::Q_CTRL_ENABLE);
        Self { c, ctl, tail: 0 }
    }

    /// Map `len` bytes of `file` read-write at bus address `bus`.
    fn map(&mut self, file: &File, bus: u64, len: u64) {
        self.c
            .dma_map(RW, 0, bus, len, Some(file.as_raw_fd()))
            .ok(DMA_MAP);
    }

    /// Run descriptor `d` on queue 0 and wait for its completion record.
    #[track_caller]
    fn run(&mut self, d: Descriptor) -> CompletionRecord {
        let i = self.tail;
        let cpl = CPL + u64::from(i) * spec::COMPLETION_SIZE;
        let d = d.with_completion(cpl).with_tag(0x7a60 + u64::from(i));
        self.ctl
            .write_all_at(&d.encode(), RING - CTL + u64::from(i) * spec::DESC_SIZE)
            .unwrap();
        self.ctl.write_all_at(&[0; 4], cpl - CTL).unwrap();
        self.tail = (i + 1) % RING_SIZE;
        self.c
            .write_u32(0, spec::queue_reg(0, spec::Q_TAIL), self.tail);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut raw = [0u8; spec::COMPLETION_SIZE as usize];
            self.ctl.read_exact_at(&mut raw, cpl - CTL).unwrap();
            let rec = CompletionRecord::decode(&raw);
            if rec.status != spec::STATUS_PENDING {
                assert_eq!(rec.tag, d.tag, "{rec:x?}");
                return rec;
            }
            assert!(Instant::now() < deadline, "no completion for {d:x?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The fault records written so far.
    fn faults(&mut self) -> Vec<FaultRecord> {
        let head = self.c.read_u32(0, spec::REG_FLOG_HEAD);
        (0..head)
            .map(|i| {
                let mut raw = [0u8; spec::FAULT_RECORD_SIZE as usize];
                let at = FLOG - CTL + u64::from(i) * spec::FAULT_RECORD_SIZE;
                self.ctl.read_exact_at(&mut raw, at).unwrap();
                FaultRecord::decode(&raw)
            })
            .collect()
    }
}

/// A memfd of `len` bytes holding a recognisable pattern.
fn patterned(len: u64, seed: u8) -> File {
    let f = memfd(len);
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    f.write_all_at(&bytes, 0).unwrap();
    f
}

fn read(f: &File, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, at).unwrap();
    v
}

/// Expect `c` to be the bus error of an access with `access` flags at `iova`.
#[track_caller]
fn assert_bus_error(c: &CompletionRecord, access: u8, iova: u64) {
    assert_eq!(
        (c.status, c.fault_reason, c.fault_access, c.fault_addr),
        (spec::STATUS_DMA_ERROR, spec::FAULT_BUS_ERROR, access, iova),
        "{c:x?}"
    );
}

/// Expect `r` to be the record of that bus error, bus address `bus`, on queue 0.
#[track_caller]
fn assert_bus_error_record(r: &FaultRecord, access: u8, iova: u64, bus: u64) {
    assert_eq!(
        (r.reason, r.access, r.domain, r.queue, r.iova, r.info),
        (spec::FAULT_BUS_ERROR, access, 0, 0, iova, bus),
        "{r:x?}"
    );
}

/// A COPY that works: the mapping at `from` and `to` are usable.
#[track_caller]
fn assert_copy_works(rig: &mut Rig, from: u64, to: u64, len: u32) {
    let c = rig.run(Descriptor::copy(from, to, len));
    assert_eq!(
        (c.status, c.bytes),
        (spec::STATUS_OK, len),
        "COPY {from:#x} -> {to:#x}: {c:x?}"
    );
}

/// Route (a): the client shrinks an unsealed memfd after DMA_MAP. A COPY into the cut part
/// ends with a DMA error and a fault record; the mapping is not used again (not even its
/// part still in the file); a COPY from another shrunk memfd faults as a read; COPYs
/// between healthy mappings still work, and so does the next client.
#[test]
fn a_memfd_shrunk_after_dma_map_faults_the_copy_not_the_server() {
    let srv = TestServer::start();
    let mut rig = Rig::new(&srv);
    let data = patterned(DATA_SIZE, 1);
    rig.map(&data, DATA, DATA_SIZE);
    let victim = memfd(2 << 20);
    rig.map(&victim, VICTIM, 2 << 20);
    // The source of the later read fault.
    let gone = patterned(1 << 20, 2);
    let gone_bus = VICTIM + (4 << 20);
    rig.map(&gone, gone_bus, 1 << 20);
    assert_copy_works(&mut rig, DATA, VICTIM + 0x1000, 0x1000);

    victim.set_len(0x4000).unwrap();
    gone.set_len(0).unwrap();

    // Into the cut part.
    let dst = VICTIM + (1 << 20) + 0x80;
    let c = rig.run(Descriptor::copy(DATA, dst, 0x10000));
    assert_bus_error(&c, spec::ACCESS_WRITE, dst);
    assert_eq!(c.bytes, 0, "{c:x?}");
    let f = rig.faults();
    assert_eq!(f.len(), 1, "{f:x?}");
    assert_bus_error_record(&f[0], spec::ACCESS_WRITE, dst, dst);

    // The mapping is lost: its first page, still in the file, is refused without a touch.
    let c = rig.run(Descriptor::copy(DATA, VICTIM, 0x100));
    assert_bus_error(&c, spec::ACCESS_WRITE, VICTIM);
    assert_eq!(
        read(&victim, 0, 0x100),
        vec![0; 0x100],
        "written after the loss"
    );
    // Reading a page that is gone.
    let src = gone_bus + 0x2000;
    let c = rig.run(Descriptor::copy(src, DATA + (1 << 20), 0x1000));
    assert_bus_error(&c, 0, src);
    let f = rig.faults();
    assert_eq!(f.len(), 3, "{f:x?}");
    assert_bus_error_record(&f[1], spec::ACCESS_WRITE, VICTIM, VICTIM);
    assert_bus_error_record(&f[2], 0, src, src);

    // Healthy mappings still work, both ways.
    assert_copy_works(&mut rig, DATA, CTL + 0x8_0000, 0x8000);
    assert_eq!(read(&rig.ctl, 0x8_0000, 0x8000), read(&data, 0, 0x8000));
    assert_copy_works(&mut rig, CTL + 0x8_0000, DATA + 0x10_0000, 0x8000);
    assert_eq!(read(&data, 0x10_0000, 0x8000), read(&data, 0, 0x8000));
    // The client may unmap the lost mapping and map something else there.
    rig.c.dma_unmap(0, VICTIM, 2 << 20).ok(DMA_UNMAP);
    let fresh = memfd(2 << 20);
    rig.map(&fresh, VICTIM, 2 << 20);
    assert_copy_works(&mut rig, DATA, VICTIM + (1 << 20), 0x1000);
    assert_eq!(read(&fresh, 1 << 20, 0x1000), read(&data, 0, 0x1000));

    // The next client, with memory at the same bus addresses, is served as usual.
    drop(rig);
    let mut rig = Rig::new(&srv);
    let data = patterned(DATA_SIZE, 3);
    rig.map(&data, DATA, DATA_SIZE);
    let victim = memfd(2 << 20);
    rig.map(&victim, VICTIM, 2 << 20);
    assert_copy_works(&mut rig, DATA, VICTIM + (1 << 20), 0x10000);
    assert_eq!(read(&victim, 1 << 20, 0x10000), read(&data, 0, 0x10000));
    assert!(rig.faults().is_empty());
}

/// `(huge page size, pages the pool could still give)` from /proc/meminfo and the
/// overcommit limit.
fn huge_page_pool() -> (u64, u64) {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        let line = meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not in /proc/meminfo"));
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap()
    };
    let page = field("Hugepagesize:") * 1024;
    let free = field("HugePages_Free:") - field("HugePages_Rsvd:").min(field("HugePages_Free:"));
    let overcommit: u64 = std::fs::read_to_string("/proc/sys/vm/nr_overcommit_hugepages")
        .map(|s| s.trim().parse().unwrap_or(0))
        .unwrap_or(0);
    let surplus = field("HugePages_Surp:");
    (page, free + overcommit.saturating_sub(surplus))
}

/// Route (b): an `MFD_HUGETLB` memfd larger than the huge-page pool can back. Mapped with
/// `MAP_NORESERVE` it faulted at the device's first touch; now DMA_MAP reserves the pages
/// and fails with ENOMEM, and the connection goes on.
#[test]
fn a_hugetlb_dma_map_the_pool_cannot_back_is_refused_up_front() {
    let (page, available) = huge_page_pool();
    let len = (available + 1) * page;
    let name = CString::new("domdma-huge").unwrap();
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_HUGETLB) };
    assert!(
        fd >= 0,
        "memfd_create(MFD_HUGETLB): {} (no hugetlbfs in this kernel?)",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor we own.
    let huge = unsafe { File::from_raw_fd(fd) };
    huge.set_len(len).unwrap();

    let srv = TestServer::start();
    let mut rig = Rig::new(&srv);
    rig.c
        .dma_map(RW, 0, VICTIM, len, Some(huge.as_raw_fd()))
        .err(libc::ENOMEM);
    // Not whole huge pages: refused too.
    rig.c
        .dma_map(RW, 0, VICTIM, 0x1000, Some(huge.as_raw_fd()))
        .err(libc::EINVAL);
    // The connection is usable: the range is free, and the device works.
    let data = patterned(DATA_SIZE, 4);
    rig.map(&data, VICTIM, DATA_SIZE);
    assert_copy_works(&mut rig, VICTIM, CTL + 0x8_0000, 0x4000);
    assert_eq!(read(&rig.ctl, 0x8_0000, 0x4000), read(&data, 0, 0x4000));
    assert!(rig.faults().is_empty());
}

/// A hugetlbfs memfd shrunk after DMA_MAP: the kernel frees the cut huge page, and the
/// device's touch there is recovered by replacing a whole huge page (a hugetlbfs mapping
/// cannot be split at 4 KiB). Needs two free huge pages, which test machines usually lack.
#[test]
#[ignore = "needs 2 free huge pages (echo 2 > /proc/sys/vm/nr_hugepages); run with --ignored"]
fn a_hugetlb_memfd_shrunk_after_dma_map_faults_the_copy_not_the_server() {
    let (page, available) = huge_page_pool();
    assert!(available >= 2, "needs 2 free huge pages, has {available}");
    let name = CString::new("domdma-huge").unwrap();
    // SAFETY: a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_HUGETLB) };
    assert!(fd >= 0, "memfd_create(MFD_HUGETLB)");
    // SAFETY: a fresh descriptor we own.
    let huge = unsafe { File::from_raw_fd(fd) };
    huge.set_len(2 * page).unwrap();

    let srv = TestServer::start();
    let mut rig = Rig::new(&srv);
    let data = patterned(DATA_SIZE, 6);
    rig.map(&data, DATA, DATA_SIZE);
    rig.map(&huge, VICTIM, 2 * page);
    assert_copy_works(&mut rig, DATA, VICTIM + page, 0x1000);
    huge.set_len(page).unwrap();
    let dst = VICTIM + page + 0x1000;
    let c = rig.run(Descriptor::copy(DATA, dst, 0x1000));
    assert_bus_error(&c, spec::ACCESS_WRITE, dst);
    let c = rig.run(Descriptor::copy(DATA, VICTIM, 0x1000));
    assert_bus_error(&c, spec::ACCESS_WRITE, VICTIM);
    assert_copy_works(&mut rig, DATA, CTL + 0x8_0000, 0x1000);
    let f = rig.faults();
    assert_eq!(f.len(), 2, "{f:x?}");
    assert_bus_error_record(&f[0], spec::ACCESS_WRITE, dst, dst);
}

/// Raw system calls for a forked child of this (threaded) process, which may neither
/// allocate nor take a lock: each takes what the parent prepared.
mod sys {
    use std::ffi::CStr;
    use std::os::fd::RawFd;
    use std::ptr;

    /// unshare(2); whether it worked.
    pub fn unshare(flags: libc::c_int) -> bool {
        // SAFETY: no memory is passed.
        unsafe { libc::unshare(flags) == 0 }
    }

    /// open(2).
    pub fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> RawFd {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::open(path.as_ptr(), flags, mode) }
    }

    /// write(2).
    pub fn write(fd: RawFd, data: &[u8]) -> isize {
        // SAFETY: `data` is valid for reads of its length.
        unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) }
    }

    /// close(2).
    pub fn close(fd: RawFd) {
        // SAFETY: closes a descriptor the caller owns.
        unsafe { libc::close(fd) };
    }

    /// Write `data` to the file at `path` (a /proc file: one write).
    pub fn write_file(path: &CStr, data: &[u8]) -> bool {
        let fd = open(path, libc::O_WRONLY | libc::O_CLOEXEC, 0);
        let ok = fd >= 0 && write(fd, data) == data.len() as isize;
        if fd >= 0 {
            close(fd);
        }
        ok
    }

    /// mount(2); whether it worked.
    pub fn mount(
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> bool {
        let p = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
        // SAFETY: NUL-terminated strings or nulls, as mount(2) takes them.
        unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) == 0 }
    }

    /// ftruncate(2); whether it worked.
    pub fn ftruncate(fd: RawFd, len: libc::off_t) -> bool {
        // SAFETY: no memory is passed.
        unsafe { libc::ftruncate(fd, len) == 0 }
    }

    /// This thread's errno.
    pub fn errno() -> libc::c_int {
        // SAFETY: no preconditions; returns this thread's errno location.
        let at = unsafe { libc::__errno_location() };
        // SAFETY: `at` points at this thread's errno.
        unsafe { *at }
    }

    /// Send one byte `byte` and descriptor `fd` over socket `sock` (SCM_RIGHTS).
    pub fn send_fd(sock: RawFd, byte: u8, fd: RawFd) -> bool {
        let mut iov = libc::iovec {
            iov_base: ptr::from_ref(&byte).cast_mut().cast(),
            iov_len: 1,
        };
        let mut space = [0u64; 4];
        // SAFETY: an all-zero msghdr is valid (no name, no data, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.as_mut_ptr().cast();
        // SAFETY: pure arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as _;
        // SAFETY: `msg` has a control buffer of `msg_controllen` (<= 32) bytes.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: `cmsg` is the first header, inside `space`, aligned for it.
        let header = unsafe { &mut *cmsg };
        header.cmsg_level = libc::SOL_SOCKET;
        header.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: pure arithmetic.
        header.cmsg_len = unsafe { libc::CMSG_LEN(size_of::<RawFd>() as u32) } as _;
        // SAFETY: the header's data follows it inside `space`, room for one descriptor.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: `data` has room for one descriptor, maybe unaligned.
        unsafe { data.cast::<RawFd>().write_unaligned(fd) };
        // SAFETY: `msg` and everything it points at live across the call.
        unsafe { libc::sendmsg(sock, &msg, 0) == 1 }
    }

    /// _exit(2): leave without running anything of the parent's.
    pub fn exit(code: libc::c_int) -> ! {
        // SAFETY: ends the process.
        unsafe { libc::_exit(code) }
    }
}

/// What the child of [`sparse_file_on_a_full_tmpfs`] works on, made before the fork.
struct FullTmpfs {
    uid_map: (CString, String),
    setgroups: CString,
    gid_map: (CString, String),
    root: CString,
    mountpoint: CString,
    tmpfs: CString,
    size: CString,
    sparse: CString,
    filler: CString,
}

/// Why the child failed, by the byte it sends back.
const FULL_TMPFS_STEPS: [&str; 12] = [
    "ok",
    "unshare(CLONE_NEWUSER | CLONE_NEWNS): no user namespaces here?",
    "writing uid_map",
    "writing setgroups",
    "writing gid_map",
    "making / private",
    "mounting the tmpfs",
    "creating the sparse file",
    "sizing the sparse file",
    "creating the filler file",
    "filling the tmpfs (expected ENOSPC)",
    "sending the descriptor",
];

impl FullTmpfs {
    /// The child: in new user and mount namespaces, a 64 KiB tmpfs holding a sparse 1 MiB
    /// file and a filler up to ENOSPC; sends the sparse file over `sock`. Returns the step
    /// that failed (an index of [`FULL_TMPFS_STEPS`]), 0 when the file was sent.
    fn child(&self, sock: RawFd) -> u8 {
        if !sys::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) {
            return 1;
        }
        if !sys::write_file(&self.uid_map.0, self.uid_map.1.as_bytes()) {
            return 2;
        }
        if !sys::write_file(&self.setgroups, b"deny") {
            return 3;
        }
        if !sys::write_file(&self.gid_map.0, self.gid_map.1.as_bytes()) {
            return 4;
        }
        let private = libc::MS_REC | libc::MS_PRIVATE;
        if !sys::mount(None, &self.root, None, private, None) {
            return 5;
        }
        let (tmpfs, size) = (Some(self.tmpfs.as_c_str()), Some(self.size.as_c_str()));
        if !sys::mount(tmpfs, &self.mountpoint, tmpfs, 0, size) {
            return 6;
        }
        let create = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        let fd = sys::open(&self.sparse, create, 0o600);
        if fd < 0 {
            return 7;
        }
        if !sys::ftruncate(fd, 1 << 20) {
            return 8;
        }
        let fill = sys::open(&self.filler, create, 0o600);
        if fill < 0 {
            return 9;
        }
        let block = [0x5au8; 4096];
        while sys::write(fill, &block) > 0 {}
        if sys::errno() != libc::ENOSPC {
            return 10;
        }
        if !sys::send_fd(sock, 0, fd) {
            return 11;
        }
        0
    }
}

/// A sparse 1 MiB file on a 64 KiB tmpfs that another file has filled: every page of it is
/// a hole that cannot be filled. Made in a child process with its own user and mount
/// namespaces (so no privilege is needed); the child sends the file back over a socket.
/// Panics, saying which step failed, when that is not possible here (no user namespaces).
fn sparse_file_on_a_full_tmpfs() -> File {
    let dir = TempDir::new_with_prefix("/tmp/domdma-tmpfs-").unwrap();
    let mnt = dir.as_path().to_owned();
    let c = |s: &str| CString::new(s).unwrap();
    // SAFETY: no preconditions, cannot fail.
    let uid = unsafe { libc::getuid() };
    // SAFETY: no preconditions, cannot fail.
    let gid = unsafe { libc::getgid() };
    let plan = FullTmpfs {
        uid_map: (c("/proc/self/uid_map"), format!("0 {uid} 1\n")),
        setgroups: c("/proc/self/setgroups"),
        gid_map: (c("/proc/self/gid_map"), format!("0 {gid} 1\n")),
        root: c("/"),
        mountpoint: c(mnt.to_str().unwrap()),
        tmpfs: c("tmpfs"),
        size: c("size=64k"),
        sparse: c(mnt.join("sparse").to_str().unwrap()),
        filler: c(mnt.join("filler").to_str().unwrap()),
    };
    let (parent, child) = UnixStream::pair().unwrap();
    // SAFETY: the child only runs `FullTmpfs::child` (raw system calls on memory prepared
    // above) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let sock = child.as_raw_fd();
        let step = plan.child(sock);
        if step != 0 {
            sys::write(sock, &[step]);
        }
        sys::exit(i32::from(step));
    }
    drop(child);
    let mut step = [0xffu8; 1];
    let (n, file) = parent.recv_with_fd(&mut step).unwrap();
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let what = FULL_TMPFS_STEPS
        .get(usize::from(step[0]))
        .copied()
        .unwrap_or("?");
    match file {
        Some(file) if n == 1 && step[0] == 0 => file,
        _ => panic!(
            "making a full tmpfs in a user namespace failed at: {what} (child status {status:#x})"
        ),
    }
}

/// Route (c): a sparse file on a full tmpfs. A COPY into a hole ends with a DMA error and a
/// fault record; the server and the other mappings go on.
#[test]
fn a_hole_a_full_tmpfs_cannot_fill_faults_the_copy_not_the_server() {
    let sparse = sparse_file_on_a_full_tmpfs();
    // The premise: the file is 1 MiB of holes that cannot be filled.
    assert_eq!(sparse.metadata().unwrap().len(), 1 << 20);
    let err = sparse.write_at(&[1], 0x8000).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");

    let srv = TestServer::start();
    let mut rig = Rig::new(&srv);
    let data = patterned(DATA_SIZE, 5);
    rig.map(&data, DATA, DATA_SIZE);
    rig.map(&sparse, VICTIM, 1 << 20);
    let dst = VICTIM + 0x8000;
    let c = rig.run(Descriptor::copy(DATA, dst, 0x1000));
    assert_bus_error(&c, spec::ACCESS_WRITE, dst);
    let f = rig.faults();
    assert_eq!(f.len(), 1, "{f:x?}");
    assert_bus_error_record(&f[0], spec::ACCESS_WRITE, dst, dst);
    // A FILL there is refused before it touches anything.
    let c = rig.run(Descriptor::fill(VICTIM, 0x0101_0101_0101_0101, 0x100));
    assert_bus_error(&c, spec::ACCESS_WRITE, VICTIM);
    // The rest of the device works.
    assert_copy_works(&mut rig, DATA, CTL + 0x8_0000, 0x10000);
    assert_eq!(read(&rig.ctl, 0x8_0000, 0x10000), read(&data, 0, 0x10000));
    assert_eq!(rig.c.read_u32(0, spec::REG_ID), spec::DEVICE_ID_MAGIC);
}
