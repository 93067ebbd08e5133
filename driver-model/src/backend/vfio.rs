//! The Linux guest back end: the device through VFIO type1 (`vfio-ioctls`).
//!
//! Inside the QEMU guest the device sits behind QEMU's emulated VT-d
//! (`-device intel-iommu,caching-mode=on`, kernel `intel_iommu=on`). Opening it:
//!
//! 1. find it in `/sys/bus/pci/devices` by vendor and device ID ([`find_devices`]);
//! 2. bind it to `vfio-pci` (`driver_override`, unbind the current driver, `drivers_probe`);
//! 3. open its IOMMU group through a type1 container and get the device fd;
//! 4. map BAR0 through the device fd when VFIO offers mmap for it, else use `pread`/`pwrite`
//!    on the region;
//! 5. set Bus Master Enable through the configuration region;
//! 6. attach one eventfd per MSI-X vector (`VFIO_DEVICE_SET_IRQS`).
//!
//! DMA memory is anonymous (pinned) or hugetlbfs memory mapped with `VFIO_IOMMU_MAP_DMA` at
//! bus addresses (IOVAs) this back end chooses from a bump allocator above 4 GiB. The guest
//! IOMMU translates them; QEMU forwards each mapping to the device server.
//!
//! Needs root, the modules `vfio`, `vfio_iommu_type1` and `vfio_pci`, and `/dev/vfio` (devtmpfs;
//! the nodes are created from sysfs when missing).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    BackendError, BackendInfo, BumpIova, DmaBackend, DmaBuffer, DmaRequest, PageKind,
    RegisterAccess, Result, PAGE_SIZE_2M, PAGE_SIZE_4K,
};
use domdma_device::spec;

/// Where PCI devices appear in sysfs.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// The hugetlbfs mount used for 2 MiB pages.
pub const HUGETLBFS_MOUNT: &str = "/dev/hugepages";
/// sysfs directory of the 2 MiB huge page pool.
pub const HUGEPAGES_2M_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Errors of the VFIO back end.
#[derive(Debug, thiserror::Error)]
pub enum VfioBackendError {
    /// No PCI device with these IDs.
    #[error(
        "device {vendor:04x}:{device:04x} not found in {SYSFS_PCI_DEVICES} \
         (is the domdma device attached to this machine?)"
    )]
    DeviceNotFound {
        /// PCI vendor ID searched for.
        vendor: u16,
        /// PCI device ID searched for.
        device: u16,
    },
    /// The PCI device named by the caller does not exist or has other IDs.
    #[error("PCI device {bdf} is not a {vendor:04x}:{device:04x} device ({found})")]
    WrongDevice {
        /// PCI address.
        bdf: String,
        /// Expected vendor ID.
        vendor: u16,
        /// Expected device ID.
        device: u16,
        /// What was found.
        found: String,
    },
    /// A sysfs or device-node file operation failed.
    #[error("{what} {path}: {source}")]
    Sysfs {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device did not end up bound to vfio-pci.
    #[error(
        "could not bind {bdf} to vfio-pci (bound to {driver}); is the vfio_pci module loaded?"
    )]
    BindFailed {
        /// PCI address.
        bdf: String,
        /// The driver it is bound to, or "nothing".
        driver: String,
    },
    /// The device has no IOMMU group.
    #[error(
        "{bdf} has no IOMMU group: the guest needs an IOMMU (QEMU -device intel-iommu, \
         kernel intel_iommu=on)"
    )]
    NoIommuGroup {
        /// PCI address.
        bdf: String,
    },
    /// A `vfio-ioctls` operation failed.
    #[error("{what}: {source}{hint}")]
    Vfio {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: vfio_ioctls::VfioError,
        /// A hint on the usual cause, or empty.
        hint: &'static str,
    },
    /// A region the device must have is missing or too small.
    #[error("VFIO region {index} ({name}): {problem}")]
    Region {
        /// VFIO region index.
        index: u32,
        /// Its name.
        name: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Not enough free 2 MiB huge pages.
    #[error(
        "no 2 MiB huge pages available: need {needed}, {free} free of {total} \
         (reserve some: echo N > /proc/sys/vm/nr_hugepages)"
    )]
    HugePagesUnavailable {
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
        /// Pages in the pool.
        total: u64,
    },
    /// hugetlbfs is not mounted where expected (or with another page size).
    #[error("{HUGETLBFS_MOUNT}: {problem}")]
    HugetlbfsMount {
        /// What is wrong.
        problem: String,
    },
    /// The bus address space of the allocator is exhausted.
    #[error("bus address space exhausted ({len:#x} bytes asked)")]
    IovaExhausted {
        /// Bytes asked for.
        len: u64,
    },
}

impl From<VfioBackendError> for BackendError {
    fn from(e: VfioBackendError) -> Self {
        match e {
            // No 2 MiB page is a shortage the caller reports as such (never a fallback).
            e @ VfioBackendError::HugePagesUnavailable { .. } => {
                BackendError::OutOfMemory(e.to_string())
            }
            e => BackendError::Backend(Box::new(e)),
        }
    }
}

/// `MPOL_PREFERRED` (linux/mempolicy.h): allocate on the node if it can, else anywhere.
const MPOL_PREFERRED: libc::c_long = 1;
/// `MPOL_F_NODE | MPOL_F_ADDR`: `get_mempolicy` returns the node of the page at an address.
const MPOL_F_NODE_ADDR: libc::c_long = 1 | 2;

/// Number of NUMA nodes of this system (`/sys/devices/system/node/online`, "0-1" or
/// "0"); 1 when the file is missing (a kernel without NUMA).
pub fn numa_nodes_online() -> u32 {
    fs::read_to_string("/sys/devices/system/node/online")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.parse::<u32>().ok())
                .max()
        })
        .map_or(1, |last| last + 1)
}

/// Prefers NUMA node `node` for the pages of `[addr, addr + len)` not yet faulted in.
fn prefer_node(addr: *mut libc::c_void, len: usize, node: u32) -> io::Result<()> {
    let mut mask = [0u64; 16];
    let (word, bit) = ((node / 64) as usize, node % 64);
    if word >= mask.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    mask[word] = 1 << bit;
    // SAFETY: mbind only changes the memory policy of the range, a mapping this process
    // owns; the node mask is a valid array of `16 * 64` bits.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            MPOL_PREFERRED,
            mask.as_ptr(),
            (mask.len() * 64) as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The NUMA node of the (faulted-in) page at `addr`.
fn node_of(addr: *mut libc::c_void) -> Option<u32> {
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy with MPOL_F_NODE | MPOL_F_ADDR writes one int (the node of the
    // page at `addr`, a mapped address of this process) to `node`; no node mask is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr,
            MPOL_F_NODE_ADDR,
        )
    };
    (r == 0 && node >= 0).then_some(node as u32)
}

pub(crate) fn sysfs_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> VfioBackendError {
    let path = path.to_path_buf();
    move |source| VfioBackendError::Sysfs { what, path, source }
}

pub(crate) fn read_trimmed(path: &Path) -> std::result::Result<String, VfioBackendError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(sysfs_err("reading", path))
}

pub(crate) fn write_sysfs(path: &Path, value: &str) -> std::result::Result<(), VfioBackendError> {
    fs::write(path, value).map_err(sysfs_err("writing", path))
}

fn parse_hex_u16(s: &str) -> Option<u16> {
    u16::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// A PCI function found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// PCI address, `dddd:bb:dd.f`.
    pub bdf: String,
    /// sysfs directory.
    pub path: PathBuf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: Option<u16>,
    /// Subsystem ID.
    pub subsystem_device: Option<u16>,
    /// Class code (24 bits).
    pub class: Option<u32>,
    /// Revision ID.
    pub revision: Option<u8>,
    /// The bound driver, if any.
    pub driver: Option<String>,
    /// NUMA node, if the platform reports one.
    pub numa_node: Option<u32>,
}

impl PciFunction {
    /// Reads a PCI function's sysfs directory.
    pub fn from_sysfs(path: &Path) -> std::result::Result<Self, VfioBackendError> {
        let bdf = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let hex16 = |name: &str| -> std::result::Result<u16, VfioBackendError> {
            let p = path.join(name);
            let s = read_trimmed(&p)?;
            parse_hex_u16(&s).ok_or_else(|| VfioBackendError::Sysfs {
                what: "parsing",
                path: p,
                source: io::Error::new(io::ErrorKind::InvalidData, s),
            })
        };
        let opt = |name: &str| fs::read_to_string(path.join(name)).ok();
        Ok(PciFunction {
            vendor: hex16("vendor")?,
            device: hex16("device")?,
            subsystem_vendor: opt("subsystem_vendor").and_then(|s| parse_hex_u16(&s)),
            subsystem_device: opt("subsystem_device").and_then(|s| parse_hex_u16(&s)),
            class: opt("class")
                .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()),
            revision: opt("revision")
                .and_then(|s| u8::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()),
            driver: fs::read_link(path.join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())),
            numa_node: opt("numa_node")
                .and_then(|s| s.trim().parse::<i64>().ok())
                .and_then(|n| if n >= 0 { u32::try_from(n).ok() } else { None }),
            bdf,
            path: path.to_path_buf(),
        })
    }
}

/// All PCI functions with `vendor:device` IDs, sorted by address.
pub fn find_devices(
    vendor: u16,
    device: u16,
) -> std::result::Result<Vec<PciFunction>, VfioBackendError> {
    let dir = Path::new(SYSFS_PCI_DEVICES);
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(sysfs_err("listing", dir)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(sysfs_err("listing", dir))?;
        // Devices that vanish or have unreadable IDs are simply not ours.
        if let Ok(f) = PciFunction::from_sysfs(&entry.path()) {
            if f.vendor == vendor && f.device == device {
                found.push(f);
            }
        }
    }
    found.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(found)
}

/// Finds the domdma device: the one at `bdf` if given, else the first with the domdma IDs.
pub fn find_domdma(bdf: Option<&str>) -> std::result::Result<PciFunction, VfioBackendError> {
    let (vendor, device) = (spec::PCI_VENDOR_ID, spec::PCI_DEVICE_ID);
    match bdf {
        Some(bdf) => {
            let f = PciFunction::from_sysfs(&Path::new(SYSFS_PCI_DEVICES).join(bdf))?;
            if f.vendor != vendor || f.device != device {
                return Err(VfioBackendError::WrongDevice {
                    bdf: bdf.to_string(),
                    vendor,
                    device,
                    found: format!("{:04x}:{:04x}", f.vendor, f.device),
                });
            }
            Ok(f)
        }
        None => find_devices(vendor, device)?
            .into_iter()
            .next()
            .ok_or(VfioBackendError::DeviceNotFound { vendor, device }),
    }
}

/// Binds a PCI function to `vfio-pci`: sets `driver_override`, unbinds the current driver
/// and asks the PCI core to probe again. Does nothing when it is already bound to vfio-pci.
pub fn bind_vfio_pci(f: &PciFunction) -> std::result::Result<(), VfioBackendError> {
    if f.driver.as_deref() == Some("vfio-pci") {
        return Ok(());
    }
    info!(bdf = %f.bdf, driver = ?f.driver, "binding to vfio-pci");
    write_sysfs(&f.path.join("driver_override"), "vfio-pci")?;
    if f.driver.is_some() {
        write_sysfs(&f.path.join("driver/unbind"), &f.bdf)?;
    }
    // drivers_probe fails (EINVAL/ENODEV) when no driver takes the device; the check below
    // gives the better message.
    if let Err(e) = write_sysfs(Path::new("/sys/bus/pci/drivers_probe"), &f.bdf) {
        debug!("drivers_probe: {e}");
    }
    let driver = fs::read_link(f.path.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(VfioBackendError::BindFailed {
            bdf: f.bdf.clone(),
            driver: driver.unwrap_or_else(|| "nothing".into()),
        });
    }
    Ok(())
}

/// Makes sure the character device `node` exists, creating it from the `major:minor` in
/// the sysfs `dev_attr` file when devtmpfs did not (waits briefly for devtmpfs first).
fn ensure_char_node(node: &Path, dev_attr: &Path) -> std::result::Result<(), VfioBackendError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while !node.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if node.exists() {
        return Ok(());
    }
    let dev = read_trimmed(dev_attr)?;
    let (maj, min) = dev
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| VfioBackendError::Sysfs {
            what: "parsing",
            path: dev_attr.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, dev.clone()),
        })?;
    if let Some(parent) = node.parent() {
        fs::create_dir_all(parent).map_err(sysfs_err("creating", parent))?;
    }
    let c =
        CString::new(node.as_os_str().as_encoded_bytes()).map_err(|_| VfioBackendError::Sysfs {
            what: "creating",
            path: node.to_path_buf(),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    warn!(node = %node.display(), "device node missing; creating it ({maj}:{min})");
    // SAFETY: `c` is a valid NUL-terminated path; mknod does not retain it.
    let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(maj, min)) };
    if rc != 0 {
        return Err(sysfs_err("creating", node)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Free and total 2 MiB huge pages in the kernel's pool.
pub fn hugepages_2m() -> std::result::Result<(u64, u64), VfioBackendError> {
    let read = |name: &str| -> std::result::Result<u64, VfioBackendError> {
        let p = Path::new(HUGEPAGES_2M_SYSFS).join(name);
        let s = read_trimmed(&p)?;
        s.parse().map_err(|_| VfioBackendError::Sysfs {
            what: "parsing",
            path: p,
            source: io::Error::new(io::ErrorKind::InvalidData, s),
        })
    };
    Ok((read("free_hugepages")?, read("nr_hugepages")?))
}

/// Grows the 2 MiB huge page pool until at least `count` pages are free (needs root).
/// Returns the number of free pages afterwards, which can still be lower when memory is
/// short.
pub fn reserve_hugepages_2m(count: u64) -> std::result::Result<u64, VfioBackendError> {
    let (free, total) = hugepages_2m()?;
    if free >= count {
        return Ok(free);
    }
    write_sysfs(
        &Path::new(HUGEPAGES_2M_SYSFS).join("nr_hugepages"),
        &(total + (count - free)).to_string(),
    )?;
    Ok(hugepages_2m()?.0)
}

/// Makes at least `count` 2 MiB huge pages free on NUMA node `node` (through
/// `/sys/devices/system/node/nodeN/hugepages/hugepages-2048kB`). Returns the number free
/// there afterwards, which may be lower when the node has no more memory.
pub fn reserve_hugepages_2m_on_node(
    node: u32,
    count: u64,
) -> std::result::Result<u64, VfioBackendError> {
    let dir = PathBuf::from(format!(
        "/sys/devices/system/node/node{node}/hugepages/hugepages-2048kB"
    ));
    let read = |name: &str| -> std::result::Result<u64, VfioBackendError> {
        let path = dir.join(name);
        read_trimmed(&path)?
            .parse()
            .map_err(|_| VfioBackendError::Sysfs {
                what: "parsing",
                path: path.clone(),
                source: io::Error::from(io::ErrorKind::InvalidData),
            })
    };
    let (free, total) = (read("free_hugepages")?, read("nr_hugepages")?);
    if free < count {
        write_sysfs(
            &dir.join("nr_hugepages"),
            &(total + (count - free)).to_string(),
        )?;
    }
    read("free_hugepages")
}

/// Options for [`VfioBackend::open`].
#[derive(Debug, Clone)]
pub struct VfioOptions {
    /// PCI address of the device; `None` = the first domdma device.
    pub bdf: Option<String>,
    /// Map BAR0 when VFIO allows it; `false` forces `pread`/`pwrite` on the region.
    pub allow_mmap: bool,
    /// First bus address the DMA allocator hands out.
    pub iova_base: u64,
    /// End (exclusive) of the DMA allocator's bus address range.
    pub iova_end: u64,
}

impl Default for VfioOptions {
    fn default() -> Self {
        VfioOptions {
            bdf: None,
            allow_mmap: true,
            iova_base: BumpIova::DEFAULT_BASE,
            iova_end: BumpIova::DEFAULT_END,
        }
    }
}

enum Bar0 {
    /// BAR0 mapped into the process through the device fd.
    Mmap { ptr: NonNull<u8>, len: usize },
    /// Access by pread/pwrite at `offset` of the device fd.
    ReadWrite { offset: u64 },
}

/// The domdma device through VFIO type1, inside a Linux guest.
pub struct VfioBackend {
    bar0: Bar0,
    bar0_size: u64,
    config_offset: u64,
    config_size: u64,
    msix: Vec<EventFd>,
    iova: Mutex<BumpIova>,
    pci: PciFunction,
    // Dropped after the fields above; the device before the container it belongs to.
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

// SAFETY: the only non-thread-safe field is the BAR0 mapping pointer; the mapping lives as
// long as the back end and is only accessed through volatile MMIO loads and stores, which
// any thread may issue. Everything else (VFIO fds, eventfds, the mutex) is thread safe.
unsafe impl Send for VfioBackend {}
// SAFETY: as above; shared access only performs volatile MMIO or system calls.
unsafe impl Sync for VfioBackend {}

fn vfio_err(
    what: &'static str,
    hint: &'static str,
) -> impl FnOnce(vfio_ioctls::VfioError) -> VfioBackendError {
    move |source| VfioBackendError::Vfio { what, source, hint }
}

fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the destination is the unfilled tail of `buf`, valid for writes of that
        // many bytes.
        let n = unsafe { libc::pread(fd, buf[done..].as_mut_ptr().cast(), buf.len() - done, off) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn pwrite_all(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the source is the unwritten tail of `buf`, valid for reads.
        let n = unsafe { libc::pwrite(fd, buf[done..].as_ptr().cast(), buf.len() - done, off) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

impl VfioBackend {
    /// Finds the device, binds it to vfio-pci, opens it through a type1 container, maps
    /// BAR0, enables bus mastering and MSI-X.
    pub fn open(opts: &VfioOptions) -> std::result::Result<Self, VfioBackendError> {
        let pci = find_domdma(opts.bdf.as_deref())?;
        bind_vfio_pci(&pci)?;
        let pci = PciFunction::from_sysfs(&pci.path)?;

        let group = fs::read_link(pci.path.join("iommu_group"))
            .ok()
            .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .ok_or_else(|| VfioBackendError::NoIommuGroup {
                bdf: pci.bdf.clone(),
            })?;
        ensure_char_node(
            Path::new("/dev/vfio/vfio"),
            Path::new("/sys/class/misc/vfio/dev"),
        )?;
        ensure_char_node(
            &Path::new("/dev/vfio").join(&group),
            &Path::new("/sys/class/vfio").join(&group).join("dev"),
        )?;

        let container = Arc::new(VfioContainer::new(None).map_err(vfio_err(
            "opening the VFIO type1 container",
            " (is the vfio_iommu_type1 module loaded?)",
        ))?);
        let device = VfioDevice::new(&pci.path, container.clone(), false).map_err(vfio_err(
            "opening the VFIO device",
            " (is the IOMMU group viable: all its devices bound to vfio-pci or no driver?)",
        ))?;
        info!(bdf = %pci.bdf, group = %group, "VFIO device open");

        // BAR0: the registers.
        let bar_idx = VFIO_PCI_BAR0_REGION_INDEX;
        let bar0_size = device.get_region_size(bar_idx);
        let bar0_flags = device.get_region_flags(bar_idx);
        let bar0_offset = device.get_region_offset(bar_idx);
        if bar0_size < spec::REGS_BAR_SIZE
            || bar0_flags & (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE)
                != (VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE)
        {
            return Err(VfioBackendError::Region {
                index: bar_idx,
                name: "BAR0",
                problem: format!(
                    "size {bar0_size:#x} (need {:#x}), flags {bar0_flags:#x}",
                    spec::REGS_BAR_SIZE
                ),
            });
        }
        // A sparse-mmap capability restricts which parts can be mapped; only map when the
        // register block is mappable as a whole.
        let sparse_ok = device.get_region_caps(bar_idx).iter().all(|c| match c {
            VfioRegionInfoCap::SparseMmap(s) => s
                .areas
                .iter()
                .any(|a| a.offset == 0 && a.size >= spec::REGS_BAR_SIZE),
            _ => true,
        });
        let mmap_offered = bar0_flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && sparse_ok;
        let bar0 = if opts.allow_mmap && mmap_offered {
            let len = usize::try_from(bar0_size).expect("BAR size fits usize");
            let off = libc::off_t::try_from(bar0_offset).map_err(|_| VfioBackendError::Region {
                index: bar_idx,
                name: "BAR0",
                problem: format!("offset {bar0_offset:#x} out of range"),
            })?;
            // The mapping is owned by the back end and unmapped in Drop.
            match super::mmap_bar(&device, len, off) {
                Ok(ptr) => Bar0::Mmap { ptr, len },
                Err(e) => {
                    warn!("mmap of BAR0 failed ({e}); using pread/pwrite");
                    Bar0::ReadWrite {
                        offset: bar0_offset,
                    }
                }
            }
        } else {
            Bar0::ReadWrite {
                offset: bar0_offset,
            }
        };
        info!(
            mmap_offered,
            access = if matches!(bar0, Bar0::Mmap { .. }) {
                "mmap"
            } else {
                "pread/pwrite"
            },
            "BAR0 {bar0_size:#x} bytes"
        );

        let cfg_idx = VFIO_PCI_CONFIG_REGION_INDEX;
        let config_size = device.get_region_size(cfg_idx);
        if config_size < 0x40 {
            return Err(VfioBackendError::Region {
                index: cfg_idx,
                name: "config space",
                problem: format!("size {config_size:#x}"),
            });
        }
        let config_offset = device.get_region_offset(cfg_idx);

        let iova = Mutex::new(BumpIova::new(
            opts.iova_base,
            opts.iova_end,
            BumpIova::DEFAULT_GUARD,
        ));
        let mut this = VfioBackend {
            bar0,
            bar0_size,
            config_offset,
            config_size,
            msix: Vec::new(),
            iova,
            pci,
            device,
            container,
        };

        this.set_bus_master(true)
            .map_err(|e| VfioBackendError::Sys {
                what: "enabling bus mastering",
                source: io::Error::other(e.to_string()),
            })?;

        let count = this
            .device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map(|i| i.count)
            .unwrap_or(0);
        if count == 0 {
            return Err(VfioBackendError::Region {
                index: VFIO_PCI_MSIX_IRQ_INDEX,
                name: "MSI-X interrupts",
                problem: "the device reports no MSI-X vectors".into(),
            });
        }
        for _ in 0..count.min(u32::from(u16::MAX)) {
            this.msix.push(
                EventFd::new(EFD_NONBLOCK).map_err(|source| VfioBackendError::Sys {
                    what: "creating an eventfd",
                    source,
                })?,
            );
        }
        this.enable_msix()?;
        Ok(this)
    }

    fn enable_msix(&self) -> std::result::Result<(), VfioBackendError> {
        self.device
            .enable_msix(self.msix.iter().collect())
            .map_err(vfio_err("enabling MSI-X (VFIO_DEVICE_SET_IRQS)", ""))?;
        for e in &self.msix {
            // Discard anything pending (EAGAIN when nothing is).
            let _ = e.read();
        }
        Ok(())
    }

    /// The PCI function this back end drives.
    pub fn pci(&self) -> &PciFunction {
        &self.pci
    }

    /// Whether BAR0 is mapped into the process (else accesses are pread/pwrite).
    pub fn bar0_mapped(&self) -> bool {
        matches!(self.bar0, Bar0::Mmap { .. })
    }

    fn check_reg(&self, offset: u64) -> Result<()> {
        super::check_reg_access(offset, self.bar0_size)
    }

    fn check_config(&self, offset: u64, len: usize) -> Result<()> {
        super::check_config_access(offset, len, self.config_size)
    }

    fn alloc_memory(
        &self,
        len: usize,
        pages: PageKind,
        node: Option<u32>,
    ) -> std::result::Result<(NonNull<u8>, Option<File>), VfioBackendError> {
        let sys = |what| move |source| VfioBackendError::Sys { what, source };
        let (fd, file, flags) = match pages {
            PageKind::Base => (-1, None, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS),
            PageKind::Huge2M => {
                let file = open_hugetlbfs_file(len)?;
                (file.as_raw_fd(), Some(file), libc::MAP_SHARED)
            }
        };
        // With a node preference the pages are faulted in after mbind (below), not here.
        let populate = if node.is_some() {
            0
        } else {
            libc::MAP_POPULATE
        };
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address); the fd is either
        // -1 (anonymous) or an open hugetlbfs file at least `len` bytes long.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | populate,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            if pages == PageKind::Huge2M {
                let (free, total) = hugepages_2m().unwrap_or((0, 0));
                return Err(VfioBackendError::HugePagesUnavailable {
                    needed: (len / PAGE_SIZE_2M) as u64,
                    free,
                    total,
                });
            }
            return Err(sys("allocating DMA memory (mmap)")(e));
        }
        if let Some(node) = node {
            if let Err(e) = prefer_node(p, len, node) {
                debug!("mbind to node {node} failed: {e}; the memory goes anywhere");
            }
            // Fault every page in now, under the policy (hugetlbfs pages come from the
            // node's pool). A failed huge-page fault would be SIGBUS, so the pool was
            // checked before.
            for off in (0..len).step_by(pages.size()) {
                // SAFETY: `p + off` is inside the fresh writable mapping.
                unsafe { p.cast::<u8>().wrapping_add(off).write_volatile(0) };
            }
        }
        // Pinning by VFIO_IOMMU_MAP_DMA keeps the pages resident anyway; mlock documents the
        // intent and is not fatal when refused.
        // SAFETY: `p..p+len` is the mapping just created.
        if unsafe { libc::mlock(p, len) } != 0 {
            debug!("mlock of DMA memory failed: {}", io::Error::last_os_error());
        }
        Ok((
            NonNull::new(p.cast()).expect("mmap returned non-null"),
            file,
        ))
    }
}

pub(crate) fn open_hugetlbfs_file(len: usize) -> std::result::Result<File, VfioBackendError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mount = Path::new(HUGETLBFS_MOUNT);
    let c = CString::new(HUGETLBFS_MOUNT).expect("no NUL");
    // SAFETY: all-zero bytes are a valid `statfs` (plain integers).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid path and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(VfioBackendError::HugetlbfsMount {
            problem: format!("not available ({})", io::Error::last_os_error()),
        });
    }
    if st.f_type != libc::HUGETLBFS_MAGIC {
        return Err(VfioBackendError::HugetlbfsMount {
            problem: "not a hugetlbfs mount (mount -t hugetlbfs none /dev/hugepages)".into(),
        });
    }
    if st.f_bsize as u64 != PAGE_SIZE_2M as u64 {
        return Err(VfioBackendError::HugetlbfsMount {
            problem: format!("page size is {} bytes, not 2 MiB", st.f_bsize),
        });
    }
    let needed = (len / PAGE_SIZE_2M) as u64;
    let (free, total) = hugepages_2m()?;
    if free < needed {
        return Err(VfioBackendError::HugePagesUnavailable {
            needed,
            free,
            total,
        });
    }
    let path = mount.join(format!(
        "domdma-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(sysfs_err("creating", &path))?;
    // The file lives on through the open descriptor and the mapping only.
    let _ = fs::remove_file(&path);
    file.set_len(len as u64)
        .map_err(sysfs_err("sizing", &path))?;
    Ok(file)
}

/// One DMA allocation: memory plus its VFIO mapping. Unmaps and frees on drop.
struct VfioDmaMapping {
    container: Arc<VfioContainer>,
    iova: u64,
    addr: NonNull<u8>,
    len: usize,
    mapped: bool,
    _file: Option<File>,
}

// SAFETY: the mapping is exclusively owned by this object (inside its `DmaBuffer`); the
// pointer is only used to munmap, which any thread may do.
unsafe impl Send for VfioDmaMapping {}

impl Drop for VfioDmaMapping {
    fn drop(&mut self) {
        if self.mapped {
            if let Err(e) = self.container.vfio_dma_unmap(self.iova, self.len) {
                // The device may still reach the memory: leak it rather than reuse it.
                tracing::error!(
                    iova = self.iova,
                    "VFIO_IOMMU_UNMAP_DMA failed ({e}); leaking"
                );
                return;
            }
        }
        // SAFETY: `addr..addr+len` is the mapping created for this allocation; nothing
        // references it any more (the owning DmaBuffer is being dropped) and the device
        // mapping is gone.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
    }
}

impl DmaBackend for VfioBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "vfio",
            location: self.pci.bdf.clone(),
            register_access: if self.bar0_mapped() {
                RegisterAccess::Mmap
            } else {
                RegisterAccess::RegionReadWrite
            },
            msix_vectors: self.msix_vectors(),
            numa_node: self.pci.numa_node,
        }
    }

    fn read32(&self, offset: u64) -> Result<u32> {
        self.check_reg(offset)?;
        match self.bar0 {
            Bar0::Mmap { ptr, len } => {
                debug_assert!(offset as usize + 4 <= len);
                // SAFETY: in bounds of the BAR mapping (checked) and 4-byte aligned; MMIO is
                // accessed only through volatile operations.
                let v = unsafe {
                    ptr.as_ptr()
                        .wrapping_add(offset as usize)
                        .cast::<u32>()
                        .read_volatile()
                };
                Ok(u32::from_le(v))
            }
            Bar0::ReadWrite { offset: base } => {
                let mut b = [0u8; 4];
                pread_exact(self.device.as_raw_fd(), &mut b, base + offset).map_err(|source| {
                    VfioBackendError::Sys {
                        what: "reading BAR0 (pread)",
                        source,
                    }
                })?;
                Ok(u32::from_le_bytes(b))
            }
        }
    }

    fn write32(&self, offset: u64, value: u32) -> Result<()> {
        self.check_reg(offset)?;
        match self.bar0 {
            Bar0::Mmap { ptr, len } => {
                debug_assert!(offset as usize + 4 <= len);
                // Descriptors written to DMA memory must be visible before the doorbell.
                std::sync::atomic::fence(Ordering::SeqCst);
                // SAFETY: as in `read32`.
                unsafe {
                    ptr.as_ptr()
                        .wrapping_add(offset as usize)
                        .cast::<u32>()
                        .write_volatile(value.to_le())
                };
                Ok(())
            }
            Bar0::ReadWrite { offset: base } => {
                pwrite_all(self.device.as_raw_fd(), &value.to_le_bytes(), base + offset).map_err(
                    |source| VfioBackendError::Sys {
                        what: "writing BAR0 (pwrite)",
                        source,
                    },
                )?;
                Ok(())
            }
        }
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_config(offset, buf.len())?;
        pread_exact(self.device.as_raw_fd(), buf, self.config_offset + offset).map_err(
            |source| VfioBackendError::Sys {
                what: "reading config space",
                source,
            },
        )?;
        Ok(())
    }

    fn config_write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_config(offset, buf.len())?;
        pwrite_all(self.device.as_raw_fd(), buf, self.config_offset + offset).map_err(
            |source| VfioBackendError::Sys {
                what: "writing config space",
                source,
            },
        )?;
        Ok(())
    }

    fn alloc_dma(&self, req: DmaRequest) -> Result<DmaBuffer> {
        if req.len == 0 {
            return Err(BackendError::InvalidAllocation("length 0".into()));
        }
        let page = req.pages.size();
        let len = req
            .len
            .checked_next_multiple_of(page)
            .ok_or_else(|| BackendError::InvalidAllocation(format!("length {:#x}", req.len)))?;
        let iova = self
            .iova
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(len as u64, page as u64)
            .ok_or(VfioBackendError::IovaExhausted { len: len as u64 })?;
        let (addr, file) = self.alloc_memory(len, req.pages, req.node)?;
        let node = node_of(addr.as_ptr().cast());
        let mut mapping = VfioDmaMapping {
            container: self.container.clone(),
            iova,
            addr,
            len,
            mapped: false,
            _file: file,
        };
        // SAFETY: the range is a private mapping we just created and own; from here on it is
        // only accessed through `DmaBuffer`'s volatile operations, and it stays mapped until
        // `VfioDmaMapping::drop` unmaps the IOVA range before munmap.
        unsafe { self.container.vfio_dma_map(iova, len, addr.as_ptr()) }.map_err(vfio_err(
            "VFIO_IOMMU_MAP_DMA",
            " (IOVA outside the IOMMU's address width, or out of locked memory?)",
        ))?;
        mapping.mapped = true;
        debug!(iova, len, ?req.pages, "DMA buffer mapped");
        // SAFETY: `addr` is valid for `len` bytes and page aligned for as long as `mapping`
        // lives (it owns the memory), nothing else references it, and the device reaches it
        // at `iova` through the mapping just made.
        let buf = unsafe { DmaBuffer::from_raw_parts(addr, len, iova, page, Box::new(mapping)) };
        Ok(buf.with_node(node))
    }

    fn reserve_unmapped(&self, len: u64) -> Result<u64> {
        let len = len.max(1).next_multiple_of(PAGE_SIZE_4K as u64);
        Ok(self
            .iova
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .alloc(len, PAGE_SIZE_4K as u64)
            .ok_or(VfioBackendError::IovaExhausted { len })?)
    }

    fn msix_vectors(&self) -> u16 {
        self.msix.len() as u16
    }

    fn numa_nodes(&self) -> u32 {
        numa_nodes_online()
    }

    fn rearm_interrupts(&self) -> Result<()> {
        self.device
            .disable_msix()
            .map_err(vfio_err("disabling MSI-X", ""))?;
        self.enable_msix()?;
        Ok(())
    }

    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<u64> {
        let fd = super::msix_eventfd(&self.msix, vector)?;
        super::wait_eventfd(fd, timeout)
            .map_err(|(what, source)| VfioBackendError::Sys { what, source }.into())
    }
}

impl Drop for VfioBackend {
    fn drop(&mut self) {
        // Quiesce: no interrupts, no DMA, then release the BAR mapping. The device and
        // container fds close when their fields drop.
        let _ = self.device.disable_msix();
        let _ = self.set_bus_master(false);
        if let Bar0::Mmap { ptr, len } = self.bar0 {
            // SAFETY: the BAR mapping created in `open`; no access can follow (we are being
            // dropped).
            unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
        }
    }
}
