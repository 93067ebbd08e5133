//! Guest-only tests: what only VFIO inside a guest has (sysfs identity, the two ways VFIO
//! reaches BAR0). Device and driver behaviour is the conformance suite's.

use domdma_device::spec;
use domdma_driver_model::backend::vfio::{find_domdma, VfioBackend, VfioOptions};
use domdma_driver_model::backend::{DmaBackend, DmaRequest, RegisterAccess};
use domdma_driver_model::caps::Capabilities;
use domdma_driver_model::dma_queue::{reset_device, CompletionRecords, DmaQueue};
use domdma_testkit::check::{check_all, check_status, Failure, TestResult};
use domdma_testkit::fixtures::{fresh, run_desc, RESET_TIMEOUT};
use domdma_testkit::{check_eq, progress};

use crate::harness::{Backend, Ctx, PlatformResult, Test};

/// Every guest-only test, in running order.
pub fn all() -> Vec<Test> {
    vec![
        Test {
            name: "guest::device_found_by_ids",
            run: device_found_by_ids,
        },
        Test {
            name: "guest::bar0_by_mmap",
            run: bar0_by_mmap,
        },
        Test {
            name: "guest::bar0_by_pread_pwrite",
            run: bar0_by_pread_pwrite,
        },
    ]
}

/// The device is on the PCI bus with the domdma IDs, bound to vfio-pci, and VFIO sees the
/// same IDs in its configuration space; VFIO set up one MSI-X vector per queue plus the
/// fault vector, as REG_CAP says.
fn device_found_by_ids(ctx: &mut Ctx) -> PlatformResult {
    let f = find_domdma(ctx.opts.bdf.as_deref())?;
    progress!("         found {} (driver {:?})", f.bdf, f.driver);
    check_eq!(f.vendor, spec::PCI_VENDOR_ID, "sysfs vendor");
    check_eq!(f.device, spec::PCI_DEVICE_ID, "sysfs device");
    check_eq!(
        f.subsystem_vendor,
        Some(spec::PCI_SUBSYSTEM_VENDOR_ID),
        "sysfs subsystem_vendor"
    );
    check_eq!(
        f.subsystem_device,
        Some(spec::PCI_SUBSYSTEM_ID),
        "sysfs subsystem_device"
    );
    check_eq!(f.class, Some(spec::PCI_CLASS_CODE), "sysfs class");
    check_eq!(f.revision, Some(spec::PCI_REVISION_ID), "sysfs revision");

    let dev = ctx.shared()?;
    if ctx.backend == Backend::Vfio {
        let vfio = ctx.vfio()?;
        check_eq!(
            vfio.pci().driver.as_deref(),
            Some("vfio-pci"),
            "bound driver"
        );
    }
    let class_rev = dev.config_read32(0x08)?;
    check_eq!(class_rev >> 8, spec::PCI_CLASS_CODE, "config class code");
    let caps = Capabilities::read(&*dev)?;
    if ctx.backend == Backend::Vfio {
        check_eq!(
            u32::from(dev.msix_vectors()),
            caps.vectors,
            "MSI-X vectors VFIO reports vs REG_CAP"
        );
    }
    Ok(None)
}

/// Registers and a FILL with BAR0 mapped into the process. Skipped, visibly, when VFIO does
/// not offer mmap for the region.
fn bar0_by_mmap(ctx: &mut Ctx) -> PlatformResult {
    with_access(ctx, true, RegisterAccess::Mmap)
}

/// Registers and a FILL with BAR0 reached by pread/pwrite on the VFIO region.
fn bar0_by_pread_pwrite(ctx: &mut Ctx) -> PlatformResult {
    with_access(ctx, false, RegisterAccess::RegionReadWrite)
}

fn with_access(ctx: &mut Ctx, allow_mmap: bool, want: RegisterAccess) -> PlatformResult {
    if ctx.backend != Backend::Vfio {
        return Ok(Some(format!(
            "no VFIO with the {:?} back end (BAR0 through sysfs resource0)",
            ctx.backend
        )));
    }
    let saved = ctx.opts.clone();
    ctx.close();
    ctx.opts = VfioOptions {
        allow_mmap,
        ..saved.clone()
    };
    let result = (|| -> PlatformResult {
        let dev = ctx.vfio()?;
        let access = dev.info().register_access;
        if access != want {
            if allow_mmap {
                return Ok(Some(format!(
                    "VFIO offers no mmap for BAR0 (registers go by {access})"
                )));
            }
            return Err(Failure(format!(
                "BAR0 by {access} with mmap refused, expected {want}"
            )));
        }
        exercise(&dev).map_err(|Failure(m)| Failure(format!("BAR0 by {access}: {m}")))?;
        Ok(None)
    })();
    ctx.close();
    ctx.opts = saved;
    result
}

fn exercise(dev: &VfioBackend) -> TestResult {
    fresh(dev)?;
    check_eq!(dev.read32(spec::REG_ID)?, spec::DEVICE_ID_MAGIC, "REG_ID");
    for p in [0x0bad_f00d_u32, 0xffff_0000] {
        dev.write32(spec::REG_SCRATCH, p)?;
        check_eq!(dev.read32(spec::REG_SCRATCH)?, p, "SCRATCH");
    }
    let mut q = DmaQueue::new(dev, 0, 4, 0)?;
    let cpl = CompletionRecords::new(dev, 1)?;
    let buf = dev.alloc_dma(DmaRequest::new(4096))?;
    let c = run_desc(
        &mut q,
        &cpl,
        0,
        spec::Descriptor::fill(buf.bus_addr(), 0x6666_6666_6666_6666, 4096),
    )?;
    check_status(&c, spec::STATUS_OK, "FILL")?;
    check_all(&buf.to_vec(0, 4096), 0x66, "filled buffer")?;
    drop(q);
    reset_device(dev, RESET_TIMEOUT)?;
    check_eq!(dev.read32(spec::REG_SCRATCH)?, 0, "SCRATCH after reset");
    Ok(())
}
