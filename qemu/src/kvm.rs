//! Does /dev/kvm really run a guest? Decides between KVM and TCG.
//!
//! A /dev/kvm that opens is not enough: on our own machines it is a nested PVM (`kvm_pvm`, no
//! VMX/SVM in the CPU flags) that cannot boot a stock kernel, yet runs simple real-mode code
//! correctly. So the probe first asks for hardware virtualisation, then creates throwaway VMs
//! with one vCPU, runs `mov al, 0x42; out 0x10, al; hlt` in real mode and again in 64-bit
//! long mode with paging, and checks it sees the port write with the right value and then the
//! halt. It runs in a child process (`domdma-vm kvm-probe`) with a time limit, because a
//! broken KVM may hang in `KVM_RUN` rather than fail.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::time::Duration;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use tracing::{debug, info};

use crate::process::{describe_status, ChildGuard, StopPolicy};
use crate::qemu::Accel;

/// Size of the probe guest's memory, mapped at guest physical address 0.
const MEM_SIZE: usize = 0x10000;
/// Where the real-mode code goes.
const REAL_MODE_CODE: u64 = 0x1000;
/// Long-mode page tables: PML4, PDPT and PD, one page each.
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
/// Where the long-mode code goes (identity-mapped by a 2 MiB page).
const LONG_MODE_CODE: u64 = 0x8000;
/// The port the probe writes to.
const PROBE_PORT: u16 = 0x10;
/// The value the probe writes.
const PROBE_VALUE: u8 = 0x42;
/// `mov al, 0x42; out 0x10, al; hlt` (the same bytes in real and in long mode).
const PROBE_CODE: [u8; 5] = [0xb0, PROBE_VALUE, 0xe6, PROBE_PORT as u8, 0xf4];
/// At most this many exits before giving up (a broken KVM may loop on spurious exits).
const MAX_EXITS: usize = 16;

/// Time limit for the probe child.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the KVM probe.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// The error from the ioctl.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The probe memory could not be mapped.
    #[error("cannot map probe memory")]
    Mmap(#[source] std::io::Error),
    /// The CPU has no VMX or SVM, so /dev/kvm is not hardware-assisted.
    #[error("no VMX or SVM in /proc/cpuinfo: /dev/kvm comes from {module}, which cannot boot a stock kernel")]
    NoHardwareVirtualisation {
        /// What provides /dev/kvm.
        module: &'static str,
    },
    /// The vCPU did something other than the probe's port write and halt.
    #[error("unexpected vCPU exit in {mode} mode: {exit}")]
    UnexpectedExit {
        /// Real or long mode.
        mode: String,
        /// The exit.
        exit: String,
    },
    /// The vCPU kept exiting without reaching the halt.
    #[error("no halt after {MAX_EXITS} exits")]
    NoHalt,
}

/// Anonymous memory for the probe guest, unmapped on drop.
struct ProbeMemory {
    addr: NonNull<u8>,
    len: usize,
}

impl ProbeMemory {
    fn new(len: usize) -> Result<Self, KvmError> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choice; it does
        // not alias any Rust object, and the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(KvmError::Mmap(std::io::Error::last_os_error()));
        }
        let addr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| KvmError::Mmap(std::io::Error::other("mmap returned NULL")))?;
        Ok(Self { addr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` readable and writable bytes, lives as long as `self`,
        // and this exclusive borrow of `self` is the only Rust reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.addr.as_ptr(), self.len) }
    }
}

impl Drop for ProbeMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; nothing refers to it any more
        // (the VM that used it is dropped before this memory, see `probe`).
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

/// Runs the probe in this process. Returns `Ok` if the CPU offers hardware virtualisation and
/// KVM ran the probe code correctly in real mode and in 64-bit long mode (where a stock kernel
/// runs).
pub fn probe() -> Result<(), KvmError> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !has_hardware_virtualisation(&cpuinfo) {
        let module = if Path::new("/sys/module/kvm_pvm").exists() {
            "kvm_pvm"
        } else {
            "a software KVM"
        };
        return Err(KvmError::NoHardwareVirtualisation { module });
    }
    run_probe_guest(Mode::Real)?;
    run_probe_guest(Mode::Long)
}

/// Whether /proc/cpuinfo lists VMX or SVM. Without either, /dev/kvm is a software
/// implementation (PVM on our machines) that runs only guest kernels built for it.
pub fn has_hardware_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(|line| line.split_whitespace())
        .any(|flag| flag == "vmx" || flag == "svm")
}

/// The CPU mode the probe code runs in.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// 16-bit real mode, as the vCPU comes out of reset.
    Real,
    /// 64-bit long mode with paging, ring 0, identity map.
    Long,
}

fn run_probe_guest(mode: Mode) -> Result<(), KvmError> {
    let ioctl = |what| move |source| KvmError::Ioctl { what, source };
    // Declared first so it is dropped last, after the VM that maps it.
    let mut memory = ProbeMemory::new(MEM_SIZE)?;
    let mem = memory.as_mut_slice();
    let entry = match mode {
        Mode::Real => REAL_MODE_CODE,
        Mode::Long => {
            write_u64(mem, PML4, PDPT | 0x3); // present, writable
            write_u64(mem, PDPT, PD | 0x3);
            write_u64(mem, PD, 0x83); // present, writable, 2 MiB page at 0
            LONG_MODE_CODE
        }
    };
    let at = entry as usize;
    mem[at..at + PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);

    let kvm = Kvm::new().map_err(KvmError::Open)?;
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: memory.addr.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the region describes `memory`, a live mapping of MEM_SIZE bytes that outlives
    // `vm` (declared before it, so dropped after it), and overlaps no other slot.
    unsafe { vm.set_user_memory_region(region) }.map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(ioctl("KVM_CREATE_VCPU"))?;

    let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    match mode {
        Mode::Real => {
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
        }
        Mode::Long => {
            let code = kvm_segment {
                base: 0,
                limit: 0xffff_ffff,
                selector: 0x8,
                type_: 0xb, // execute/read, accessed
                present: 1,
                dpl: 0,
                db: 0,
                s: 1,
                l: 1,
                g: 1,
                ..Default::default()
            };
            let data = kvm_segment {
                selector: 0x10,
                type_: 0x3, // read/write, accessed
                db: 1,
                l: 0,
                ..code
            };
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr3 = PML4;
            sregs.cr4 |= 1 << 5; // PAE
            sregs.cr0 |= (1 << 0) | (1 << 31); // PE, PG
            sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        }
    }
    vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let mut regs = vcpu.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
    regs.rip = entry;
    regs.rax = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(ioctl("KVM_SET_REGS"))?;

    let mut saw_out = false;
    for _ in 0..MAX_EXITS {
        match vcpu.run().map_err(ioctl("KVM_RUN"))? {
            VcpuExit::IoOut(PROBE_PORT, [PROBE_VALUE]) if !saw_out => saw_out = true,
            VcpuExit::Hlt if saw_out => return Ok(()),
            VcpuExit::Intr => continue,
            other => {
                return Err(KvmError::UnexpectedExit {
                    mode: format!("{mode:?}"),
                    exit: format!("{other:?}"),
                })
            }
        }
    }
    Err(KvmError::NoHalt)
}

fn write_u64(mem: &mut [u8], at: u64, value: u64) {
    let at = at as usize;
    mem[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Runs the probe in a child process (`self_exe kvm-probe`) with [`PROBE_TIMEOUT`]; the child
/// is killed if it hangs. Returns whether KVM works and why.
pub fn probe_in_child(self_exe: &Path) -> (bool, String) {
    if !Path::new("/dev/kvm").exists() {
        return (false, "/dev/kvm does not exist".to_owned());
    }
    let mut cmd = Command::new(self_exe);
    cmd.arg("kvm-probe")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = match ChildGuard::spawn("kvm probe", &mut cmd, StopPolicy::KILL) {
        Ok(child) => child,
        Err(err) => return (false, format!("cannot run the probe: {err}")),
    };
    let mut stderr = child.take_stderr();
    let status = child.wait_timeout(PROBE_TIMEOUT);
    let mut text = String::new();
    match status {
        Ok(Some(status)) => {
            if let Some(stderr) = stderr.as_mut() {
                let _ = stderr.read_to_string(&mut text);
            }
            let text = text.trim();
            if status.success() {
                (true, "KVM probe ran a guest".to_owned())
            } else if text.is_empty() {
                (
                    false,
                    format!("KVM probe failed ({})", describe_status(status)),
                )
            } else {
                (false, format!("KVM probe failed: {text}"))
            }
        }
        Ok(None) => {
            child.kill();
            (
                false,
                format!(
                    "KVM probe hung for {}s and was killed",
                    PROBE_TIMEOUT.as_secs()
                ),
            )
        }
        Err(err) => (false, format!("cannot wait for the KVM probe: {err}")),
    }
}

/// What the user asked for on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM if the probe shows it runs a guest, TCG otherwise.
    Auto,
    /// KVM, no probe.
    Kvm,
    /// TCG.
    Tcg,
}

/// Resolves the accelerator and says why.
pub fn choose(choice: AccelChoice, self_exe: &Path) -> (Accel, String) {
    let (accel, reason) = match choice {
        AccelChoice::Kvm => (Accel::Kvm, "requested with --accel kvm".to_owned()),
        AccelChoice::Tcg => (Accel::Tcg, "requested with --accel tcg".to_owned()),
        AccelChoice::Auto => {
            let (works, reason) = probe_in_child(self_exe);
            debug!(works, %reason, "KVM probe");
            if works {
                (Accel::Kvm, reason)
            } else {
                (Accel::Tcg, reason)
            }
        }
    };
    info!(%accel, %reason, "accelerator");
    (accel, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_code_is_what_the_doc_says() {
        // mov al, imm8 / out imm8, al / hlt
        assert_eq!(PROBE_CODE, [0xb0, 0x42, 0xe6, 0x10, 0xf4]);
    }

    #[test]
    fn hardware_virtualisation_from_cpuinfo() {
        let amd = "processor\t: 0\nflags\t\t: fpu vme de pse svm lahf_lm\n";
        let intel = "flags\t\t: fpu vmx ept\n";
        let pvm = "flags\t\t: fpu vme de pse hypervisor lahf_lm\n";
        assert!(has_hardware_virtualisation(amd));
        assert!(has_hardware_virtualisation(intel));
        assert!(!has_hardware_virtualisation(pvm));
        assert!(!has_hardware_virtualisation(""));
    }

    #[test]
    fn explicit_choices_need_no_probe() {
        let exe = Path::new("/nonexistent");
        assert_eq!(choose(AccelChoice::Tcg, exe).0, Accel::Tcg);
        assert_eq!(choose(AccelChoice::Kvm, exe).0, Accel::Kvm);
    }

    #[test]
    fn probe_memory_is_writable() {
        let mut memory = ProbeMemory::new(MEM_SIZE).unwrap();
        let slice = memory.as_mut_slice();
        slice[MEM_SIZE - 1] = 7;
        assert_eq!(slice.len(), MEM_SIZE);
        assert_eq!(slice[MEM_SIZE - 1], 7);
    }
}
