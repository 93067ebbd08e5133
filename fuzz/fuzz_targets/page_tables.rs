//! The driver model's I/O page-table builder (`domdma_driver_model::iopt::IoPageTable`) fed
//! arbitrary map, map_auto, unmap, translate and raw-entry sequences.
//!
//! A model (a map of leaves) predicts whether each call succeeds, what `unmap` and
//! `map_auto` return and what `translate` answers; after every call the touched range is
//! checked, and at the end every leaf is walked twice: through `translate` and through the
//! table bytes themselves, decoded as the device decodes them (`Pte::decode_at`), so a
//! table the builder wrote wrong is caught even when its own walk agrees with it.
//!
//! Raw entry writes (`write_raw`, for hostile tests) make the model unreliable: after one
//! only the absence of panics is checked.

#![no_main]

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use arbitrary::Arbitrary;
use domdma_device::spec::{self, Pte, PteKind};
use domdma_driver_model::backend::{
    BackendInfo, DmaBackend, DmaBuffer, DmaRequest, RegisterAccess, Result as BResult,
};
use domdma_driver_model::iopt::{IoPageTable, PageSize, Perm};
use libfuzzer_sys::fuzz_target;

/// "DMA memory" on the heap at made-up bus addresses, remembered so the checker can read
/// the tables by bus address, as the device does.
struct HeapBackend {
    next: AtomicU64,
    /// (bus address, host address, length) of every allocation.
    chunks: Mutex<Vec<(u64, usize, usize)>>,
}

impl HeapBackend {
    fn new() -> Self {
        HeapBackend {
            next: AtomicU64::new(0x10_0000),
            chunks: Mutex::new(Vec::new()),
        }
    }

    /// The u64 at bus address `bus` (inside an allocation, 8-byte aligned).
    fn read_u64(&self, bus: u64) -> Option<u64> {
        let chunks = self.chunks.lock().unwrap();
        let &(b, host, _) = chunks
            .iter()
            .find(|&&(b, _, len)| bus >= b && bus + 8 <= b + len as u64)?;
        let p = (host + (bus - b) as usize) as *const u64;
        // SAFETY: the allocation is alive (the page table that owns it outlives every
        // check), `p` is inside it and 8-byte aligned (tables are 4 KiB aligned and entries
        // 8 bytes), and the builder only writes it through volatile stores on this thread.
        Some(unsafe { p.read_volatile() })
    }
}

impl DmaBackend for HeapBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            backend: "fuzz-heap",
            location: String::new(),
            register_access: RegisterAccess::Direct,
            msix_vectors: 0,
            numa_node: None,
        }
    }
    fn read32(&self, _: u64) -> BResult<u32> {
        Ok(0)
    }
    fn write32(&self, _: u64, _: u32) -> BResult<()> {
        Ok(())
    }
    fn config_read(&self, _: u64, _: &mut [u8]) -> BResult<()> {
        Ok(())
    }
    fn config_write(&self, _: u64, _: &[u8]) -> BResult<()> {
        Ok(())
    }
    fn alloc_dma(&self, req: DmaRequest) -> BResult<DmaBuffer> {
        let len = req.len.next_multiple_of(4096);
        let v: Box<[u64]> = vec![0u64; (len + 4096) / 8].into_boxed_slice();
        let aligned = (v.as_ptr() as usize).next_multiple_of(4096);
        let ptr = NonNull::new(aligned as *mut u8).unwrap();
        let bus = self
            .next
            .fetch_add(len as u64 + 0x1_0000, Ordering::Relaxed);
        self.chunks.lock().unwrap().push((bus, aligned, len));
        // SAFETY: the boxed slice lives in the buffer; `aligned..aligned + len` is inside it.
        Ok(unsafe { DmaBuffer::from_raw_parts(ptr, len, bus, 4096, Box::new(v)) })
    }
    fn reserve_unmapped(&self, _: u64) -> BResult<u64> {
        Ok(0)
    }
    fn msix_vectors(&self) -> u16 {
        0
    }
    fn rearm_interrupts(&self) -> BResult<()> {
        Ok(())
    }
    fn wait_interrupt(&self, _: u16, _: Duration) -> BResult<u64> {
        Ok(0)
    }
}

/// An address: mostly built from table indices, so that ranges meet and collide; sometimes
/// any 64-bit value.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    /// (level-4 index: a few low ones and the top of the 48-bit and 32-bit spaces,
    /// level-3, level-2, level-1 indices, byte offset).
    Indexed(u8, u16, u16, u16, u16),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Indexed(l4, l3, l2, l1, off) => {
                let l4 = match l4 % 8 {
                    0..=3 => u64::from(l4 % 4),
                    4 => 511,
                    5 => 255,
                    _ => u64::from(l4),
                } % 512;
                // One case in 8: an address below 4 GiB (the 32-bit IOVA space).
                let l4 = if l3 % 8 == 7 { 0 } else { l4 };
                let l3 = u64::from(l3 % 512);
                let off = if off < 0xf000 {
                    0
                } else {
                    u64::from(off) & 0xfff
                };
                l4 << 39 | l3 << 30 | u64::from(l2 % 512) << 21 | u64::from(l1 % 512) << 12 | off
            }
            Addr::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    /// Pages of the operation's page size (at most 1024).
    Pages(u16),
    Raw(u64),
}

impl Size {
    fn get(self, page: u64) -> u64 {
        match self {
            Size::Pages(n) => u64::from(n % 1025) * page,
            Size::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Map {
        iova: Addr,
        bus: Addr,
        len: Size,
        perm: u8,
        page: u8,
    },
    MapAuto {
        iova: Addr,
        bus: Addr,
        len: Size,
        perm: u8,
        max_page: u8,
    },
    Unmap {
        iova: Addr,
        len: Size,
        page: u8,
    },
    Translate {
        iova: Addr,
    },
    ReadRaw {
        iova: Addr,
        level: u8,
    },
    WriteRaw {
        iova: Addr,
        level: u8,
        value: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    width: u8,
    ops: Vec<Op>,
}

fn page_of(b: u8) -> PageSize {
    PageSize::ALL[usize::from(b % 3)]
}

fn perm_of(b: u8) -> Perm {
    Perm {
        read: b & 1 != 0,
        write: b & 2 != 0,
    }
}

/// One leaf of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Leaf {
    bus: u64,
    perm: Perm,
    page: PageSize,
}

/// What the table should hold: leaves by first IOVA.
struct Model {
    width: u32,
    leaves: BTreeMap<u64, Leaf>,
}

impl Model {
    /// The leaf covering `iova`, with its first IOVA.
    fn leaf_at(&self, iova: u64) -> Option<(u64, Leaf)> {
        let (&start, &leaf) = self.leaves.range(..=iova).next_back()?;
        (iova - start < leaf.page.bytes()).then_some((start, leaf))
    }

    /// Whether any leaf overlaps `[start, start + len)`.
    fn overlaps(&self, start: u64, len: u64) -> bool {
        if self.leaf_at(start).is_some() {
            return true;
        }
        self.leaves.range(start..start + len).next().is_some()
    }

    /// The argument checks `map` and `map_auto` make (alignment to `align`, range, bus
    /// address, permission).
    fn args_ok(&self, iova: u64, bus: u64, len: u64, perm: Perm, align: u64) -> bool {
        iova % align == 0
            && bus % align == 0
            && len % align == 0
            && len != 0
            && iova
                .checked_add(len)
                .is_some_and(|end| end <= 1u64 << self.width)
            && bus
                .checked_add(len - 1)
                .is_some_and(|last| last & !spec::PTE_ADDR_MASK & !0xfff == 0)
            && perm.bits() != 0
    }

    /// What `translate(iova)` must return.
    fn translate(&self, iova: u64) -> Option<(u64, Perm, PageSize)> {
        if iova >> self.width != 0 {
            return None;
        }
        let (start, leaf) = self.leaf_at(iova)?;
        Some((leaf.bus + (iova - start), leaf.perm, leaf.page))
    }

    /// The leaves `unmap(iova, len)` removes, or None when it must fail.
    fn unmap_plan(&self, iova: u64, len: u64) -> Option<Vec<u64>> {
        if iova % 4096 != 0 || len % 4096 != 0 || len == 0 {
            return None;
        }
        let end = iova.checked_add(len)?;
        if end > 1u64 << self.width {
            return None;
        }
        let mut out = Vec::new();
        let mut at = iova;
        while at < end {
            let (start, leaf) = self.leaf_at(at)?;
            if start < iova || start + leaf.page.bytes() > end {
                return None;
            }
            out.push(start);
            at = start + leaf.page.bytes();
        }
        Some(out)
    }

    /// The pages `map_auto` chooses, or None when the arguments are refused.
    fn auto_plan(
        &self,
        iova: u64,
        bus: u64,
        len: u64,
        perm: Perm,
        max: PageSize,
    ) -> Option<Vec<(u64, PageSize)>> {
        if !self.args_ok(iova, bus, len, perm, 4096) {
            return None;
        }
        let mut plan = Vec::new();
        let mut off = 0;
        while off < len {
            let page = PageSize::ALL
                .iter()
                .rev()
                .copied()
                .filter(|p| *p <= max)
                .find(|p| {
                    let s = p.bytes();
                    (iova + off) % s == 0 && (bus + off) % s == 0 && len - off >= s
                })
                .unwrap_or(PageSize::Size4K);
            plan.push((off, page));
            off += page.bytes();
        }
        Some(plan)
    }
}

/// Walk `iova` through the table bytes as the device decodes them. Every entry the
/// builder wrote must decode cleanly: tables are R|W pointers, leaves carry the leaf bits.
fn device_walk(b: &HeapBackend, root: u64, iova: u64) -> Option<(u64, Perm, PageSize)> {
    let mut table = root;
    for level in (1..=4).rev() {
        let ea = table + (spec::pte_index(iova, level) * 8) as u64;
        let raw = b
            .read_u64(ea)
            .unwrap_or_else(|| panic!("walk of {iova:#x}: table {table:#x} is no allocation"));
        let pte = Pte(u64::from_le(raw));
        match pte.decode_at(level) {
            Ok(PteKind::NotPresent) => return None,
            Ok(PteKind::Table(next)) => {
                assert_eq!(
                    pte.perm(),
                    spec::PTE_R | spec::PTE_W,
                    "walk of {iova:#x}: level-{level} table pointer {pte:?} is not R|W"
                );
                table = next;
            }
            Ok(PteKind::Leaf(addr)) => {
                let size = spec::level_size(level);
                let page = PageSize::at_level(level)
                    .unwrap_or_else(|| panic!("walk of {iova:#x}: leaf at level {level}"));
                return Some((
                    addr + (iova & (size - 1)),
                    Perm::from_entry(pte.raw()),
                    page,
                ));
            }
            Err(e) => panic!("walk of {iova:#x}: level-{level} entry {pte:?} is malformed: {e}"),
        }
    }
    unreachable!("level 1 entries are leaves or not present")
}

/// Check `translate` and the device's walk at `iova` against the model.
fn check_at(t: &IoPageTable<'_>, b: &HeapBackend, m: &Model, iova: u64) {
    let want = m.translate(iova);
    let got = t.translate(iova).map(|g| (g.bus, g.perm, g.page));
    assert_eq!(got, want, "translate({iova:#x})");
    if iova >> m.width == 0 {
        assert_eq!(
            device_walk(b, t.root(), iova),
            want,
            "device walk of {iova:#x}"
        );
    }
}

/// A few addresses of `[iova, iova + len)`: both ends, the middle, and just outside.
fn probes(iova: u64, len: u64) -> impl Iterator<Item = u64> {
    let last = iova.saturating_add(len.saturating_sub(1));
    [
        iova,
        last,
        iova.saturating_add(len / 2),
        iova.wrapping_sub(1),
        last.wrapping_add(1),
    ]
    .into_iter()
}

fuzz_target!(|input: Input| {
    let backend = HeapBackend::new();
    let mut t = IoPageTable::new(&backend, u32::from(input.width)).expect("an empty table");
    let mut m = Model {
        width: t.iova_width(),
        leaves: BTreeMap::new(),
    };
    assert!(m.width <= 48);
    // Set by a raw entry write: the model no longer describes the table.
    let mut tainted = false;
    // Bound the work per input: leaves written in total.
    let mut budget: u64 = 1 << 11;
    for op in input.ops.iter().take(256).copied() {
        match op {
            Op::Map {
                iova,
                bus,
                len,
                perm,
                page,
            } => {
                let page = page_of(page);
                let (iova, bus, len, perm) =
                    (iova.get(), bus.get(), len.get(page.bytes()), perm_of(perm));
                let leaves = len / page.bytes();
                if leaves > budget {
                    continue;
                }
                budget -= leaves;
                let ok = m.args_ok(iova, bus, len, perm, page.bytes())
                    && !(0..leaves).any(|i| m.overlaps(iova + i * page.bytes(), page.bytes()));
                let r = t.map(iova, bus, len, perm, page);
                if tainted {
                    continue;
                }
                assert_eq!(
                    r.is_ok(),
                    ok,
                    "map({iova:#x}, {bus:#x}, {len:#x}, {perm:?}, {page}): {r:?}"
                );
                if ok {
                    for i in 0..leaves {
                        let off = i * page.bytes();
                        m.leaves.insert(
                            iova + off,
                            Leaf {
                                bus: bus + off,
                                perm,
                                page,
                            },
                        );
                    }
                }
                for p in probes(iova, len) {
                    check_at(&t, &backend, &m, p);
                }
            }
            Op::MapAuto {
                iova,
                bus,
                len,
                perm,
                max_page,
            } => {
                let max = page_of(max_page);
                let (iova, bus, len, perm) = (iova.get(), bus.get(), len.get(4096), perm_of(perm));
                if len / 4096 > budget {
                    continue;
                }
                budget -= len / 4096;
                let plan = m.auto_plan(iova, bus, len, perm, max).filter(|plan| {
                    !plan
                        .iter()
                        .any(|&(off, page)| m.overlaps(iova + off, page.bytes()))
                });
                let r = t.map_auto(iova, bus, len, perm, max);
                if tainted {
                    continue;
                }
                match (&r, &plan) {
                    (Ok(counts), Some(plan)) => {
                        let mut want = [0usize; 3];
                        for &(off, page) in plan {
                            want[page.level() as usize - 1] += 1;
                            m.leaves.insert(
                                iova + off,
                                Leaf {
                                    bus: bus + off,
                                    perm,
                                    page,
                                },
                            );
                        }
                        assert_eq!(*counts, want, "map_auto({iova:#x}, {bus:#x}, {len:#x})");
                    }
                    (Err(_), None) => {}
                    _ => panic!(
                        "map_auto({iova:#x}, {bus:#x}, {len:#x}, {perm:?}, {max}): {r:?}, model {plan:?}"
                    ),
                }
                for p in probes(iova, len) {
                    check_at(&t, &backend, &m, p);
                }
            }
            Op::Unmap { iova, len, page } => {
                let (iova, len) = (iova.get(), len.get(page_of(page).bytes()));
                let plan = m.unmap_plan(iova, len);
                let r = t.unmap(iova, len);
                if tainted {
                    continue;
                }
                match (&r, &plan) {
                    (Ok(n), Some(leaves)) => {
                        assert_eq!(*n, leaves.len(), "unmap({iova:#x}, {len:#x})");
                        for l in leaves {
                            m.leaves.remove(l);
                        }
                    }
                    (Err(_), None) => {}
                    _ => panic!("unmap({iova:#x}, {len:#x}): {r:?}, model {plan:?}"),
                }
                if m.leaves.is_empty() {
                    assert_eq!(
                        t.table_count(),
                        1,
                        "everything unmapped: only the root left"
                    );
                }
                for p in probes(iova, len) {
                    check_at(&t, &backend, &m, p);
                }
            }
            Op::Translate { iova } => {
                let iova = iova.get();
                if tainted {
                    let _ = t.translate(iova);
                } else {
                    check_at(&t, &backend, &m, iova);
                }
            }
            Op::ReadRaw { iova, level } => {
                let (iova, level) = (iova.get(), u32::from(level % 6));
                let raw = t.read_raw(iova, level);
                let addr = t.entry_addr(iova, level);
                assert_eq!(raw.is_some(), addr.is_some(), "read_raw vs entry_addr");
                if let (Some(raw), Some(addr)) = (raw, addr) {
                    assert_eq!(backend.read_u64(addr).map(u64::from_le), Some(raw));
                }
            }
            Op::WriteRaw { iova, level, value } => {
                let (iova, level) = (iova.get(), u32::from(level % 6));
                if t.write_raw(iova, level, value).is_some() {
                    tainted = true;
                }
            }
        }
    }
    if !tainted {
        for (&start, leaf) in m.leaves.iter().take(512) {
            check_at(&t, &backend, &m, start);
            check_at(&t, &backend, &m, start + leaf.page.bytes() - 1);
        }
        assert!(t.table_count() >= 1);
        assert_eq!(t.table_addrs().len(), t.table_count());
    }
});
