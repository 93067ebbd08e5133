//! DMA mappings (`DMA_MAP` / `DMA_UNMAP`) kept in the device's bus memory.
//!
//! A mapping that arrives with a file descriptor is mmapped (`MAP_SHARED`) and inserted into
//! the shared [`BusMemory`] at its DMA address, so the device core reaches it through
//! `vm-memory`, with the protection the client asked for (read, write or both); the core
//! checks a region's protection before every access, so a device write to a read-only
//! mapping is a DMA error, not a fault in the server. A mapping without a descriptor (or
//! with neither flag) is recorded (it occupies its range) but is not accessible: the device
//! sees it as unmapped (see [`DmaMappings::map`]).
//!
//! Unmapping follows the kernel's VFIO type1 semantics, which QEMU's VFIO code is written
//! against: a range removes every mapping that lies entirely inside it, splitting a mapping
//! is an error, and a range with no mapping in it succeeds and removes nothing. (With an
//! emulated IOMMU, QEMU unmaps whole power-of-two windows of the IOVA space when the guest
//! invalidates a context, mapped or not.)
//!
//! Each accessible mapping keeps its file descriptor open (inside `vm-memory`'s
//! `FileOffset`) and its memory mapped until the last `vm-memory` snapshot that contains it
//! is dropped, so a device still holding an older snapshot never touches unmapped memory.
//!
//! The file is the client's, and can lose pages under the mapping: see `device/DESIGN.md`
//! ("Client memory that vanishes"). What can be refused here is: a range past the end of the
//! file; on hugetlbfs, a range that is not whole huge pages, or one the huge-page pool cannot
//! back (the mapping is made without `MAP_NORESERVE`, so the kernel reserves every huge page
//! at `mmap` time and a shortage is an `ENOMEM` reply now instead of a SIGBUS later). What
//! happens later (an unsealed file shrunk, a hole that a full file system cannot fill) is
//! recovered by the device core (`core::sigbus`). The seals the client put on its file are
//! logged; none are added.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, PoisonError};

use thiserror::Error;
use tracing::debug;
use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap,
    GuestRegionCollectionError, GuestRegionMmap, MmapRegion,
};

use super::proto::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, MAX_DMA_MAPS, PGSIZES};
use crate::core::remote::{self as core_remote, RemoteMemory};
use crate::core::{bus, sigbus, BusMemory};

/// Errors of DMA map and unmap requests.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// Empty, unaligned or wrapping range.
    #[error("DMA range {address:#x}+{size:#x} is empty, not 4 KiB aligned or wraps")]
    BadRange {
        /// Base address.
        address: u64,
        /// Length.
        size: u64,
    },
    /// The file offset is not page aligned.
    #[error("file offset {0:#x} is not 4 KiB aligned")]
    UnalignedOffset(u64),
    /// Flag bits we do not know or support.
    #[error("unsupported flags {0:#x}")]
    UnsupportedFlags(u32),
    /// More than one descriptor came with a DMA_MAP.
    #[error("DMA_MAP carries {0} file descriptors, at most 1 is allowed")]
    TooManyFds(usize),
    /// The new range overlaps an existing mapping.
    #[error("DMA range {address:#x}+{size:#x} overlaps the mapping at {existing:#x}")]
    Overlap {
        /// Base address.
        address: u64,
        /// Length.
        size: u64,
        /// Base of the existing mapping.
        existing: u64,
    },
    /// The mapping limit is reached.
    #[error("too many DMA mappings (limit {0})")]
    TooManyMappings(usize),
    /// The descriptor does not refer to a regular file (memfd, hugetlbfs or tmpfs file).
    #[error("the file descriptor is not a regular file")]
    NotRegularFile,
    /// The mapping would extend past the end of the file (accessing it would fault).
    #[error("file range {offset:#x}+{size:#x} extends past the end of the file ({len:#x} bytes)")]
    PastEof {
        /// File offset.
        offset: u64,
        /// Length.
        size: u64,
        /// File length.
        len: u64,
    },
    /// fstat on the descriptor failed.
    #[error("cannot stat the file descriptor")]
    Stat(#[source] io::Error),
    /// fstatfs on the descriptor failed.
    #[error("cannot stat the file system of the file descriptor")]
    StatFs(#[source] io::Error),
    /// A hugetlbfs range that is not made of whole huge pages.
    #[error("hugetlbfs range {offset:#x}+{size:#x} is not made of whole {page:#x}-byte pages")]
    HugePageAlignment {
        /// File offset.
        offset: u64,
        /// Length.
        size: u64,
        /// The file system's huge page size.
        page: u64,
    },
    /// The huge-page pool cannot back a hugetlbfs range (the kernel reserves the pages when
    /// the range is mapped).
    #[error("cannot reserve {size:#x} bytes of {page:#x}-byte huge pages for the DMA range")]
    HugePages {
        /// Length.
        size: u64,
        /// The file system's huge page size.
        page: u64,
        /// The mmap error (ENOMEM).
        #[source]
        source: io::Error,
    },
    /// mmap failed.
    #[error("cannot mmap the DMA range")]
    Mmap(#[source] MmapRegionError),
    /// An unmap range splits a mapping.
    #[error(
        "unmap range {address:#x}+{size:#x} splits the mapping {map_address:#x}+{map_size:#x}"
    )]
    Split {
        /// Base address of the unmap.
        address: u64,
        /// Length of the unmap.
        size: u64,
        /// Base of the mapping split.
        map_address: u64,
        /// Length of the mapping split.
        map_size: u64,
    },
    /// vm-memory rejected the new region list.
    #[error("cannot update the bus memory")]
    Collection(#[source] GuestRegionCollectionError),
    /// The shadow of a mapping without a descriptor could not be created.
    #[error("cannot create the shadow of a mapping without a file descriptor")]
    Shadow(#[source] io::Error),
}

impl MemoryError {
    /// The errno the client gets for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Overlap { .. } => libc::EEXIST,
            Self::TooManyMappings(_) => libc::ENOSPC,
            Self::UnsupportedFlags(_) => libc::ENOTSUP,
            Self::Stat(e) | Self::StatFs(e) | Self::Shadow(e) => {
                e.raw_os_error().unwrap_or(libc::EIO)
            }
            Self::HugePages { source, .. } => source.raw_os_error().unwrap_or(libc::ENOMEM),
            Self::Mmap(MmapRegionError::Mmap(e)) => e.raw_os_error().unwrap_or(libc::EIO),
            Self::Mmap(_) | Self::Collection(_) => libc::EIO,
            Self::BadRange { .. }
            | Self::UnalignedOffset(_)
            | Self::TooManyFds(_)
            | Self::NotRegularFile
            | Self::PastEof { .. }
            | Self::HugePageAlignment { .. }
            | Self::Split { .. } => libc::EINVAL,
        }
    }
}

/// How a recorded mapping is reached by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mapped into the bus memory with the protection of its flags.
    Mapped,
    /// No descriptor came: the device reaches the memory through the client (DMA_READ /
    /// DMA_WRITE), via a shadow region in bus memory (see [`crate::core::remote`]).
    Remote,
    /// Recorded only: neither read nor write was allowed, or no descriptor came and the
    /// connection cannot reach the client's memory.
    Recorded,
}

#[derive(Debug)]
struct Mapping {
    size: u64,
    flags: u32,
    access: Access,
}

/// The DMA mappings of one client connection. Dropping it unmaps everything.
#[derive(Debug)]
pub struct DmaMappings {
    memory: BusMemory,
    maps: BTreeMap<u64, Mapping>,
    limit: usize,
    /// How the device reaches mappings that come without a descriptor.
    remote: Option<Arc<dyn RemoteMemory>>,
    /// Whether the last unmap removed memory the device reaches directly.
    last_unmap_local: bool,
    /// Mappings reached through the client.
    remote_maps: usize,
}

fn page_aligned(v: u64) -> bool {
    v % PGSIZES == 0
}

/// What a DMA_MAP's file is, as far as losing pages goes.
#[derive(Debug, Clone, Copy)]
struct Backing {
    /// The huge page size when the file is on hugetlbfs.
    huge_page: Option<u64>,
    /// The file's seals (`F_GET_SEALS`), when it can have any (memfd, tmpfs).
    seals: Option<i32>,
}

impl Backing {
    fn of(file: &File) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        // SAFETY: an all-zero `statfs` is a valid value for fstatfs to overwrite.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a valid out pointer.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
            return Err(MemoryError::StatFs(io::Error::last_os_error()));
        }
        // The magic's integer type differs between libcs; it fits in 32 bits.
        let huge_page = (fs.f_type as u32 == libc::HUGETLBFS_MAGIC as u32)
            .then(|| u64::try_from(fs.f_bsize).unwrap_or(0))
            .filter(|&page| page > 0);
        // SAFETY: F_GET_SEALS takes no argument and only reads the file's state.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        Ok(Self {
            huge_page,
            seals: (seals >= 0).then_some(seals),
        })
    }

    /// Whether the client can still shrink the file (no `F_SEAL_SHRINK`).
    fn shrinkable(&self) -> bool {
        self.seals.is_none_or(|s| s & libc::F_SEAL_SHRINK == 0)
    }
}

/// A memfd of `size` bytes for a shadow region.
fn shadow_file(size: u64) -> Result<File, MemoryError> {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"domdma-shadow".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Shadow(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Shadow)?;
    Ok(file)
}

impl DmaMappings {
    /// An empty mapping table over `memory`, with the advertised mapping limit.
    pub fn new(memory: BusMemory) -> Self {
        Self::with_limit(memory, MAX_DMA_MAPS as usize)
    }

    /// An empty mapping table with a custom mapping limit.
    pub fn with_limit(memory: BusMemory, limit: usize) -> Self {
        Self {
            memory,
            maps: BTreeMap::new(),
            limit,
            remote: None,
            last_unmap_local: false,
            remote_maps: 0,
        }
    }

    /// Reach mappings that come without a descriptor through `remote` (the client's
    /// DMA_READ / DMA_WRITE) instead of only recording them.
    pub fn with_remote(mut self, remote: Arc<dyn RemoteMemory>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Whether any mapping is reached through the client (see [`Access::Remote`]).
    pub fn has_remote(&self) -> bool {
        self.remote_maps > 0
    }

    /// Whether the last [`DmaMappings::unmap`] (or [`DmaMappings::unmap_all`]) removed
    /// memory the device reaches directly (so DMA in flight must be waited for), not only
    /// memory it reaches through the client.
    pub fn last_unmap_was_local(&self) -> bool {
        self.last_unmap_local
    }

    /// Number of recorded mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there are no mappings.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// How the mapping at exactly `address` is reached, if there is one.
    pub fn access(&self, address: u64) -> Option<Access> {
        self.maps.get(&address).map(|m| m.access)
    }

    /// Add a mapping of `size` bytes at DMA address `address`, backed by `fd` at `offset`.
    ///
    /// With a descriptor and the read and/or write flag, the range is mmapped with that
    /// protection and becomes reachable by the device (the core refuses accesses the
    /// protection does not allow). Without a descriptor, or with neither flag, the range is
    /// only recorded (see [`Access::Recorded`]).
    pub fn map(
        &mut self,
        flags: u32,
        offset: u64,
        address: u64,
        size: u64,
        fds: Vec<OwnedFd>,
    ) -> Result<Access, MemoryError> {
        let known = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        if flags & !known != 0 {
            return Err(MemoryError::UnsupportedFlags(flags & !known));
        }
        if fds.len() > 1 {
            return Err(MemoryError::TooManyFds(fds.len()));
        }
        let end = address.checked_add(size);
        if size == 0 || end.is_none() || !page_aligned(address) || !page_aligned(size) {
            return Err(MemoryError::BadRange { address, size });
        }
        if let Some(existing) = self.overlapping(address, size) {
            return Err(MemoryError::Overlap {
                address,
                size,
                existing,
            });
        }
        if self.maps.len() >= self.limit {
            return Err(MemoryError::TooManyMappings(self.limit));
        }
        let fd = fds.into_iter().next();
        let mut prot = 0;
        if flags & DMA_MAP_FLAG_READ != 0 {
            prot |= libc::PROT_READ;
        }
        if flags & DMA_MAP_FLAG_WRITE != 0 {
            prot |= libc::PROT_WRITE;
        }
        let (access, backing) = match (fd, self.remote.clone()) {
            _ if prot == 0 => (Access::Recorded, None),
            (Some(fd), _) => {
                let backing = self.insert(File::from(fd), offset, address, size, prot, |_| {})?;
                (Access::Mapped, Some(backing))
            }
            (None, Some(remote)) => {
                // A shadow of the client's memory: a memfd of our own, synced with the
                // client around every access of the device.
                let file = shadow_file(size)?;
                self.insert(file, 0, address, size, prot, |region| {
                    core_remote::register(region, remote)
                })?;
                self.remote_maps += 1;
                (Access::Remote, None)
            }
            (None, None) => (Access::Recorded, None),
        };
        self.maps.insert(
            address,
            Mapping {
                size,
                flags,
                access,
            },
        );
        debug!(
            address = format_args!("{address:#x}"),
            size = format_args!("{size:#x}"),
            offset = format_args!("{offset:#x}"),
            flags,
            ?access,
            huge_page = backing.and_then(|b| b.huge_page),
            seals = backing.and_then(|b| b.seals),
            shrinkable = backing.is_some_and(|b| b.shrinkable()),
            "DMA map"
        );
        Ok(access)
    }

    /// Remove every mapping inside `address..address + size`; returns how many.
    pub fn unmap(&mut self, address: u64, size: u64) -> Result<usize, MemoryError> {
        let end = match address.checked_add(size) {
            Some(end) if size != 0 => end,
            _ => return Err(MemoryError::BadRange { address, size }),
        };
        let split = |(&a, m): (&u64, &Mapping)| MemoryError::Split {
            address,
            size,
            map_address: a,
            map_size: m.size,
        };
        // A mapping starting before the range must end before it.
        if let Some((a, m)) = self.maps.range(..address).next_back() {
            if a + m.size > address {
                return Err(split((a, m)));
            }
        }
        // The last mapping starting inside the range must end inside it.
        if let Some((a, m)) = self.maps.range(address..end).next_back() {
            if a + m.size > end {
                return Err(split((a, m)));
            }
        }
        let victims: Vec<(u64, u64, Access)> = self
            .maps
            .range(address..end)
            .map(|(&a, m)| (a, m.size, m.access))
            .collect();
        for &(a, _, _) in &victims {
            self.maps.remove(&a);
        }
        self.last_unmap_local = victims.iter().any(|v| v.2 == Access::Mapped);
        self.remote_maps -= victims.iter().filter(|v| v.2 == Access::Remote).count();
        self.remove_from_memory(&victims)?;
        debug!(
            address = format_args!("{address:#x}"),
            size = format_args!("{size:#x}"),
            removed = victims.len(),
            "DMA unmap"
        );
        Ok(victims.len())
    }

    /// Remove every mapping; returns how many there were.
    pub fn unmap_all(&mut self) -> usize {
        let n = self.maps.len();
        self.maps.clear();
        self.remote_maps = 0;
        let guard = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        for region in self.memory.memory().iter() {
            bus::forget_lost(region);
            core_remote::unregister(region);
        }
        self.last_unmap_local = true;
        guard.replace(GuestMemoryMmap::new());
        if n > 0 {
            debug!(mappings = n, "all DMA mappings removed");
        }
        n
    }

    /// Base address of a mapping overlapping `address..address + size`, if any.
    fn overlapping(&self, address: u64, size: u64) -> Option<u64> {
        let end = address + size;
        let (&a, m) = self.maps.range(..end).next_back()?;
        (a + m.size > address).then_some(a)
    }

    /// Map `size` bytes of `file` at `offset` into bus memory at `address` with `prot`.
    fn insert(
        &mut self,
        file: File,
        offset: u64,
        address: u64,
        size: u64,
        prot: i32,
        before_insert: impl FnOnce(&GuestRegionMmap),
    ) -> Result<Backing, MemoryError> {
        if !page_aligned(offset) {
            return Err(MemoryError::UnalignedOffset(offset));
        }
        let meta = file.metadata().map_err(MemoryError::Stat)?;
        let ft = meta.file_type();
        if !ft.is_file() {
            return Err(MemoryError::NotRegularFile);
        }
        // Touching a MAP_SHARED page beyond the end of the file raises SIGBUS: refuse.
        // (A client could still shrink an unsealed file later; QEMU seals its memfds.)
        match offset.checked_add(size) {
            Some(file_end) if file_end <= meta.len() => {}
            _ => {
                return Err(MemoryError::PastEof {
                    offset,
                    size,
                    len: meta.len(),
                })
            }
        }
        let backing = Backing::of(&file)?;
        // hugetlbfs: whole huge pages only (the kernel maps, reserves and unmaps nothing
        // smaller), reserved now: without MAP_NORESERVE a pool too small for the range is
        // an ENOMEM here rather than a SIGBUS at the device's first touch.
        let flags = match backing.huge_page {
            Some(page) if offset % page != 0 || size % page != 0 => {
                return Err(MemoryError::HugePageAlignment { offset, size, page });
            }
            Some(_) => libc::MAP_SHARED,
            None => libc::MAP_SHARED | libc::MAP_NORESERVE,
        };
        let len = usize::try_from(size).map_err(|_| MemoryError::BadRange { address, size })?;
        // The device recovers from pages that vanish later (see the module's doc).
        sigbus::install_or_warn();
        let region = MmapRegion::build(Some(FileOffset::new(file, offset)), len, prot, flags)
            .map_err(|e| match (e, backing.huge_page) {
                (MmapRegionError::Mmap(source), Some(page))
                    if source.raw_os_error() == Some(libc::ENOMEM) =>
                {
                    MemoryError::HugePages { size, page, source }
                }
                (e, _) => MemoryError::Mmap(e),
            })?;
        let region = GuestRegionMmap::new(region, GuestAddress(address))
            .ok_or(MemoryError::BadRange { address, size })?;
        before_insert(&region);
        let guard = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let updated = self
            .memory
            .memory()
            .insert_region(Arc::new(region))
            .map_err(MemoryError::Collection)?;
        guard.replace(updated);
        Ok(backing)
    }

    fn remove_from_memory(&mut self, victims: &[(u64, u64, Access)]) -> Result<(), MemoryError> {
        let in_memory = |a: Access| matches!(a, Access::Mapped | Access::Remote);
        if !victims.iter().any(|v| in_memory(v.2)) {
            return Ok(());
        }
        let guard = self.memory.lock().unwrap_or_else(PoisonError::into_inner);
        let mut current: GuestMemoryMmap = (*self.memory.memory()).clone();
        for &(a, size, access) in victims {
            if in_memory(access) {
                let (rest, removed) = current
                    .remove_region(GuestAddress(a), size)
                    .map_err(MemoryError::Collection)?;
                bus::forget_lost(&removed);
                core_remote::unregister(&removed);
                current = rest;
            }
        }
        guard.replace(current);
        Ok(())
    }

    /// Flags of the mapping at exactly `address`, if there is one.
    pub fn flags(&self, address: u64) -> Option<u32> {
        self.maps.get(&address).map(|m| m.flags)
    }
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        self.unmap_all();
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::fd::FromRawFd;

    use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryBackend};

    use super::*;

    fn memfd(len: u64) -> File {
        let name = CString::new("domdma-test").unwrap();
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn fds(f: &File) -> Vec<OwnedFd> {
        vec![OwnedFd::from(f.try_clone().unwrap())]
    }

    const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

    fn new_maps() -> (BusMemory, DmaMappings) {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let maps = DmaMappings::new(mem.clone());
        (mem, maps)
    }

    #[test]
    fn map_is_shared_with_the_file() {
        use std::os::unix::fs::FileExt;
        let (mem, mut maps) = new_maps();
        let f = memfd(0x4000);
        f.write_all_at(b"hello", 0x1000).unwrap();
        assert_eq!(
            maps.map(RW, 0x1000, 0x10_0000, 0x2000, fds(&f)).unwrap(),
            Access::Mapped
        );
        let m = mem.memory();
        let mut buf = [0u8; 5];
        m.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&buf, b"hello");
        m.write_slice(b"world", GuestAddress(0x10_1ffb)).unwrap();
        let mut back = [0u8; 5];
        f.read_exact_at(&mut back, 0x2ffb).unwrap();
        assert_eq!(&back, b"world");
        // One byte past the mapping is not reachable.
        assert!(m.write_slice(b"!", GuestAddress(0x10_2000)).is_err());
    }

    #[test]
    fn recorded_maps_are_not_accessible() {
        let (mem, mut maps) = new_maps();
        let f = memfd(0x1000);
        assert_eq!(
            maps.map(RW, 0, 0x1000, 0x1000, vec![]).unwrap(),
            Access::Recorded
        );
        assert_eq!(
            maps.map(0, 0, 0x2000, 0x1000, fds(&f)).unwrap(),
            Access::Recorded
        );
        assert_eq!(mem.memory().num_regions(), 0);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps.flags(0x2000), Some(0));
        // Recorded maps still occupy their range.
        assert_eq!(
            maps.map(RW, 0, 0x1000, 0x1000, vec![]).unwrap_err().errno(),
            libc::EEXIST
        );
        assert_eq!(maps.unmap(0x1000, 0x2000).unwrap(), 2);
    }

    #[test]
    fn read_only_maps_are_mapped_read_only() {
        use std::os::unix::fs::FileExt;

        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let (mem, mut maps) = new_maps();
        let f = memfd(0x1000);
        f.write_all_at(b"ro", 0).unwrap();
        assert_eq!(
            maps.map(DMA_MAP_FLAG_READ, 0, 0x2000, 0x1000, fds(&f))
                .unwrap(),
            Access::Mapped
        );
        let m = mem.memory();
        let region = m.find_region(GuestAddress(0x2000)).unwrap();
        assert_eq!(region.prot(), libc::PROT_READ);
        assert_eq!(region.len(), 0x1000);
        let mut buf = [0u8; 2];
        m.read_slice(&mut buf, GuestAddress(0x2000)).unwrap();
        assert_eq!(&buf, b"ro");
    }

    #[test]
    fn hostile_maps_are_refused() {
        let (mem, mut maps) = new_maps();
        let f = memfd(0x2000);
        let errno = |r: Result<Access, MemoryError>| r.unwrap_err().errno();
        assert_eq!(errno(maps.map(RW, 0, 0, 0, fds(&f))), libc::EINVAL);
        assert_eq!(
            errno(maps.map(RW, 0, 0x1001, 0x1000, fds(&f))),
            libc::EINVAL
        );
        assert_eq!(errno(maps.map(RW, 0, 0x1000, 0x800, fds(&f))), libc::EINVAL);
        assert_eq!(
            errno(maps.map(RW, 0, u64::MAX - 0xfff, 0x2000, fds(&f))),
            libc::EINVAL
        );
        assert_eq!(errno(maps.map(RW, 0x10, 0, 0x1000, fds(&f))), libc::EINVAL);
        // Past the end of the file: would SIGBUS on access.
        assert_eq!(
            errno(maps.map(RW, 0x1000, 0, 0x2000, fds(&f))),
            libc::EINVAL
        );
        assert_eq!(
            errno(maps.map(RW, u64::MAX - 0xfff, 0, 0x1000, fds(&f))),
            libc::EINVAL
        );
        assert_eq!(
            errno(maps.map(RW | 4, 0, 0, 0x1000, fds(&f))),
            libc::ENOTSUP
        );
        let mut two = fds(&f);
        two.extend(fds(&f));
        assert_eq!(errno(maps.map(RW, 0, 0, 0x1000, two)), libc::EINVAL);
        let pipe = {
            let mut p = [0; 2];
            // SAFETY: pipe writes two descriptors into the array.
            assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
            // SAFETY: a fresh descriptor we own.
            let r = unsafe { OwnedFd::from_raw_fd(p[0]) };
            // SAFETY: a fresh descriptor we own.
            let w = unsafe { OwnedFd::from_raw_fd(p[1]) };
            (r, w)
        };
        assert_eq!(
            errno(maps.map(RW, 0, 0, 0x1000, vec![pipe.0])),
            libc::EINVAL
        );
        assert!(maps.is_empty());
        assert_eq!(mem.memory().num_regions(), 0);
    }

    #[test]
    fn overlap_and_limit() {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut maps = DmaMappings::with_limit(mem, 2);
        maps.map(RW, 0, 0x2000, 0x2000, vec![]).unwrap();
        for (a, s) in [(0x1000, 0x2000), (0x3000, 0x1000), (0x0, 0x10000)] {
            assert_eq!(
                maps.map(RW, 0, a, s, vec![]).unwrap_err().errno(),
                libc::EEXIST
            );
        }
        maps.map(RW, 0, 0x1000, 0x1000, vec![]).unwrap();
        assert_eq!(
            maps.map(RW, 0, 0x8000, 0x1000, vec![]).unwrap_err().errno(),
            libc::ENOSPC
        );
    }

    #[test]
    fn unmap_semantics() {
        let (mem, mut maps) = new_maps();
        let f = memfd(0x10000);
        maps.map(RW, 0, 0x10000, 0x2000, fds(&f)).unwrap();
        maps.map(RW, 0x2000, 0x12000, 0x1000, fds(&f)).unwrap();
        maps.map(RW, 0x3000, 0x20000, 0x1000, fds(&f)).unwrap();
        assert_eq!(mem.memory().num_regions(), 3);
        // Splitting a mapping at either end is refused and removes nothing.
        assert_eq!(
            maps.unmap(0x11000, 0x1000).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(
            maps.unmap(0x10000, 0x1000).unwrap_err().errno(),
            libc::EINVAL
        );
        assert_eq!(maps.len(), 3);
        // Bad ranges.
        assert_eq!(maps.unmap(0x10000, 0).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(maps.unmap(u64::MAX, 2).unwrap_err().errno(), libc::EINVAL);
        // Nothing there: succeeds, removes nothing.
        assert_eq!(maps.unmap(0x40000, 0x1000).unwrap(), 0);
        // Exact match.
        assert_eq!(maps.unmap(0x20000, 0x1000).unwrap(), 1);
        // A window covering several mappings.
        assert_eq!(maps.unmap(0, 1 << 40).unwrap(), 2);
        assert!(maps.is_empty());
        assert_eq!(mem.memory().num_regions(), 0);
    }

    /// hugetlbfs: whole huge pages only, and reserved when mapped, so a pool that cannot
    /// back the range fails the map (ENOMEM) instead of the device's first touch.
    #[test]
    fn hugetlb_maps_are_whole_pages_reserved_up_front() {
        let name = CString::new("domdma-test-huge").unwrap();
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_HUGETLB) };
        assert!(fd >= 0, "memfd_create(MFD_HUGETLB): no hugetlbfs here?");
        // SAFETY: a fresh descriptor we own.
        let f = unsafe { File::from_raw_fd(fd) };
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = (meminfo.lines())
            .find_map(|l| l.strip_prefix("Hugepagesize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("Hugepagesize in /proc/meminfo");
        let page = kib << 10;
        // More pages than any test machine has spare (ftruncate reserves nothing).
        let len = 1 << 40;
        f.set_len(len).unwrap();
        let (mem, mut maps) = new_maps();
        let errno = |r: Result<Access, MemoryError>| r.unwrap_err().errno();
        for (offset, size) in [(0, 0x1000), (0x1000, page), (0, page + 0x1000)] {
            let e = maps.map(RW, offset, 0, size, fds(&f)).unwrap_err();
            assert!(matches!(e, MemoryError::HugePageAlignment { .. }), "{e}");
            assert_eq!(e.errno(), libc::EINVAL);
        }
        let e = maps.map(RW, 0, 0, len, fds(&f)).unwrap_err();
        assert!(matches!(e, MemoryError::HugePages { .. }), "{e}");
        assert_eq!(e.errno(), libc::ENOMEM);
        assert_eq!(errno(maps.map(RW, 0, 0, len, fds(&f))), libc::ENOMEM);
        assert!(maps.is_empty());
        assert_eq!(mem.memory().num_regions(), 0);
    }

    /// A mapping marked lost (see `core::bus`) is forgotten when it is unmapped, even while
    /// an older snapshot keeps its region alive.
    #[test]
    fn unmapping_forgets_lost_mappings() {
        let (mem, mut maps) = new_maps();
        let f = memfd(0x2000);
        maps.map(RW, 0, 0x1000, 0x1000, fds(&f)).unwrap();
        maps.map(RW, 0x1000, 0x8000, 0x1000, fds(&f)).unwrap();
        let snapshot = mem.memory();
        let region = |a| snapshot.find_region(GuestAddress(a)).unwrap();
        assert!(bus::mark_lost(region(0x1000)) && bus::mark_lost(region(0x8000)));
        maps.unmap(0x1000, 0x1000).unwrap();
        assert!(!bus::is_lost(region(0x1000)));
        assert!(bus::is_lost(region(0x8000)));
        maps.unmap_all();
        assert!(!bus::is_lost(region(0x8000)));
    }

    #[test]
    fn snapshots_keep_memory_alive_and_drop_unmaps() {
        let (mem, mut maps) = new_maps();
        let f = memfd(0x1000);
        maps.map(RW, 0, 0x1000, 0x1000, fds(&f)).unwrap();
        let snapshot = mem.memory();
        maps.unmap_all();
        // The old snapshot still reaches its (still mapped) memory.
        snapshot.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.memory().num_regions(), 0);
        maps.map(RW, 0, 0x1000, 0x1000, fds(&f)).unwrap();
        assert_eq!(mem.memory().num_regions(), 1);
        drop(maps);
        assert_eq!(mem.memory().num_regions(), 0);
    }
}
