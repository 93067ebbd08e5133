//! Bus memory checks shared by the engine, the MMU's page walker and the fault log.
//!
//! Bus memory is what the VMM mapped for the device. A range is usable only when every byte
//! of it lies in a mapped region whose protection allows the access; the device checks
//! before it touches anything.

use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Direction of an access to bus memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// Whether `region`'s protection allows `access` (a region the VMM mapped read-only is
/// mmapped `PROT_READ`, and a device write to it is a DMA error, never a SIGSEGV).
pub fn region_allows(region: &GuestRegionMmap, access: Access) -> bool {
    let need = match access {
        Access::Read => libc::PROT_READ,
        Access::Write => libc::PROT_WRITE,
    };
    region.prot() & need != 0
}

/// Check that `[addr, addr + len)` is mapped with the permission `access`. Returns the first
/// bus address that is not (or `addr` when the range wraps past 2^64).
pub fn check_range(mem: &GuestMemoryMmap, addr: u64, len: u64, access: Access) -> Result<(), u64> {
    if len == 0 {
        return Ok(());
    }
    let last = addr.checked_add(len - 1).ok_or(addr)?;
    let mut a = addr;
    loop {
        let region = mem.find_region(GuestAddress(a)).ok_or(a)?;
        if !region_allows(region, access) {
            return Err(a);
        }
        let region_last = region.last_addr().0;
        if region_last >= last {
            return Ok(());
        }
        a = region_last + 1;
    }
}

/// Number of bytes from `addr` to the end of the region holding it (0 when unmapped).
pub fn region_remaining(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.find_region(GuestAddress(addr))
        .map_or(0, |r| r.last_addr().0 - addr + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        assert_eq!(check_range(&mem, 0, 0x2000, Access::Write), Ok(()));
        assert_eq!(check_range(&mem, 0x1800, 0x1000, Access::Read), Err(0x2000));
        assert_eq!(check_range(&mem, u64::MAX, 2, Access::Read), Err(u64::MAX));
        assert_eq!(check_range(&mem, 0x9000, 0, Access::Read), Ok(()));
        assert_eq!(region_remaining(&mem, 0x4ff0), 0x10);
        assert_eq!(region_remaining(&mem, 0x3000), 0);
    }
}
