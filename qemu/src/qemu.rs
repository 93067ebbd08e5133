//! The QEMU command line, built in one place.
//!
//! Every flag the runner passes to QEMU comes from [`QemuConfig::args`], so an adjustment (a
//! new machine option, a different kernel command line) is one edit here, and the unit tests
//! below pin the line down.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest kernel command line: serial console, the guest IOMMU on (VFIO type1 needs it),
/// a panic powers the VM off at once (with `-no-reboot`), quiet boot.
pub const DEFAULT_KERNEL_APPEND: &str = "console=ttyS0 intel_iommu=on panic=-1 quiet";

/// Guest RAM in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

/// Number of vCPUs.
pub const DEFAULT_SMP: u32 = 2;

/// Guest port the SSH server listens on.
pub const GUEST_SSH_PORT: u16 = 22;

/// Errors of command-line building.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A path QEMU would receive inside an option list cannot be expressed there.
    #[error("path {} is not valid UTF-8 and cannot be passed in a QEMU option", path.display())]
    NonUtf8Path {
        /// The offending path.
        path: PathBuf,
    },
    /// Two NUMA nodes need memory and vCPUs to split evenly.
    #[error(
        "--numa needs an even vCPU count and memory size (have {smp} vCPUs, {memory_mib} MiB)"
    )]
    NumaSplit {
        /// vCPUs asked for.
        smp: u32,
        /// Memory asked for.
        memory_mib: u64,
    },
}

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Everything that varies between QEMU invocations.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The QEMU executable (or the provisioned wrapper script).
    pub qemu: PathBuf,
    /// Guest kernel image.
    pub kernel: PathBuf,
    /// Guest initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub append: String,
    /// Accelerator.
    pub accel: Accel,
    /// vCPUs.
    pub smp: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Two NUMA nodes, the device behind a PCIe expander bridge on node 1.
    pub numa: bool,
    /// The emulated IOMMU (intel-iommu with caching mode, for VFIO type1 in the guest).
    pub iommu: bool,
    /// Guest RAM shared with the device server (`memory-backend-memfd,share=on`); false:
    /// private RAM (`memory-backend-ram`), which QEMU maps without a descriptor.
    pub shared_memory: bool,
    /// File the guest's serial console is written to.
    pub serial_log: PathBuf,
    /// The vfio-user socket of the device server; `None` boots without the device.
    pub device_socket: Option<PathBuf>,
    /// Host port forwarded (on 127.0.0.1 only) to the guest's SSH port.
    pub ssh_port: u16,
    /// Extra arguments appended verbatim.
    pub extra_args: Vec<String>,
}

impl QemuConfig {
    /// The `-object` of one guest RAM backend. Not `memory-backend-memfd,share=off`: QEMU
    /// would still send its descriptor but map it privately, so the device would not see
    /// the guest's writes (docs/notes/qemu-fdless-dma.md).
    fn memory_backend(&self, id: &str, mib: u64) -> String {
        if self.shared_memory {
            format!("memory-backend-memfd,id={id},size={mib}M,share=on")
        } else {
            format!("memory-backend-ram,id={id},size={mib}M")
        }
    }

    /// The full argument list (without the program).
    pub fn args(&self) -> Result<Vec<OsString>, QemuError> {
        let mut args = Args::default();
        let kvm = self.accel == Accel::Kvm;
        let mut machine = String::from("q35");
        if !self.numa {
            machine.push_str(",memory-backend=mem");
        }
        if kvm {
            // The emulated IOMMU's interrupt remapping needs the IOAPIC in QEMU.
            machine.push_str(",kernel-irqchip=split");
        }
        args.flag("-machine", machine);
        args.flag("-accel", self.accel.to_string());
        args.flag("-cpu", if kvm { "host" } else { "max" });
        args.flag("-smp", self.smp.to_string());
        args.flag("-m", format!("{}M", self.memory_mib));
        if self.numa {
            if self.smp % 2 != 0 || self.memory_mib % 2 != 0 {
                return Err(QemuError::NumaSplit {
                    smp: self.smp,
                    memory_mib: self.memory_mib,
                });
            }
            let half_mem = self.memory_mib / 2;
            let half_cpus = self.smp / 2;
            for node in 0..2 {
                args.flag(
                    "-object",
                    self.memory_backend(&format!("mem{node}"), half_mem),
                );
            }
            for node in 0..2 {
                let first = node * half_cpus;
                let last = first + half_cpus - 1;
                args.flag(
                    "-numa",
                    format!("node,nodeid={node},cpus={first}-{last},memdev=mem{node}"),
                );
            }
        } else {
            args.flag("-object", self.memory_backend("mem", self.memory_mib));
        }
        args.flag("-display", "none");
        args.plain("-nodefaults");
        args.plain("-no-reboot");
        args.flag(
            "-chardev",
            format!("file,id=serial0,path={}", qemu_opt_path(&self.serial_log)?),
        );
        args.flag("-serial", "chardev:serial0");
        // The IOMMU must come before any device it translates for.
        if self.iommu {
            args.flag("-device", "intel-iommu,caching-mode=on");
        }
        if let Some(socket) = &self.device_socket {
            let socket = socket.to_str().ok_or_else(|| QemuError::NonUtf8Path {
                path: socket.clone(),
            })?;
            let mut device = serde_json::json!({
                "driver": "vfio-user-pci",
                "id": "domdma0",
                "socket": {"type": "unix", "path": socket},
            });
            if self.numa {
                args.flag(
                    "-device",
                    "pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0",
                );
                args.flag("-device", "pcie-root-port,id=rp1,bus=pxb1,chassis=1");
                device["bus"] = "rp1".into();
            }
            args.flag("-device", device.to_string());
        }
        args.flag(
            "-netdev",
            format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:{GUEST_SSH_PORT}",
                self.ssh_port
            ),
        );
        // Pinned to the root bus: QEMU would otherwise put it behind the expander bridge,
        // which takes only bridges.
        args.flag(
            "-device",
            if self.numa {
                "virtio-net-pci,netdev=n0,bus=pcie.0"
            } else {
                "virtio-net-pci,netdev=n0"
            },
        );
        args.flag("-kernel", self.kernel.as_os_str());
        args.flag("-initrd", self.initrd.as_os_str());
        args.flag("-append", self.append.as_str());
        for extra in &self.extra_args {
            args.plain(extra.as_str());
        }
        Ok(args.0)
    }

    /// A `Command` running QEMU with [`Self::args`].
    pub fn command(&self) -> Result<Command, QemuError> {
        let mut cmd = Command::new(&self.qemu);
        cmd.args(self.args()?);
        Ok(cmd)
    }

    /// The command line as one shell-quoted line, for `qemu.cmdline` and for pasting.
    pub fn shell_line(&self) -> Result<String, QemuError> {
        let mut words = vec![shell_quote(&self.qemu.to_string_lossy())];
        words.extend(
            self.args()?
                .iter()
                .map(|arg| shell_quote(&arg.to_string_lossy())),
        );
        Ok(words.join(" "))
    }
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn plain(&mut self, arg: impl Into<OsString>) {
        self.0.push(arg.into());
    }

    fn flag(&mut self, flag: &str, value: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(value.into());
    }
}

/// A path inside a QEMU option list: commas are doubled, as QemuOpts wants.
fn qemu_opt_path(path: &Path) -> Result<String, QemuError> {
    let text = path.to_str().ok_or_else(|| QemuError::NonUtf8Path {
        path: path.to_owned(),
    })?;
    Ok(text.replace(',', ",,"))
}

/// Quotes a word for a POSIX shell (only when needed).
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=,+@%".contains(&b));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            qemu: "/cache/qemu".into(),
            kernel: "/cache/vmlinuz".into(),
            initrd: "/cache/initrd.img".into(),
            append: DEFAULT_KERNEL_APPEND.to_owned(),
            accel: Accel::Tcg,
            smp: DEFAULT_SMP,
            memory_mib: DEFAULT_MEMORY_MIB,
            numa: false,
            iommu: true,
            shared_memory: true,
            serial_log: "/out/serial.log".into(),
            device_socket: Some("/tmp/domdma-vm.x/device.sock".into()),
            ssh_port: 40022,
            extra_args: Vec::new(),
        }
    }

    fn args_of(config: &QemuConfig) -> Vec<String> {
        config
            .args()
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_line_has_everything_the_device_needs() {
        let args = args_of(&config());
        assert_eq!(value_of(&args, "-machine"), ["q35,memory-backend=mem"]);
        assert_eq!(value_of(&args, "-accel"), ["tcg"]);
        assert_eq!(value_of(&args, "-cpu"), ["max"]);
        assert_eq!(value_of(&args, "-smp"), ["2"]);
        assert_eq!(value_of(&args, "-m"), ["1024M"]);
        assert_eq!(
            value_of(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=1024M,share=on"]
        );
        assert_eq!(
            value_of(&args, "-netdev"),
            ["user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22"]
        );
        assert_eq!(
            value_of(&args, "-chardev"),
            ["file,id=serial0,path=/out/serial.log"]
        );
        assert_eq!(value_of(&args, "-serial"), ["chardev:serial0"]);
        assert_eq!(value_of(&args, "-display"), ["none"]);
        assert_eq!(value_of(&args, "-append"), [DEFAULT_KERNEL_APPEND]);
        assert!(args.iter().any(|a| a == "-nodefaults"));
        assert!(args.iter().any(|a| a == "-no-reboot"));
    }

    #[test]
    fn iommu_comes_before_the_device_in_json_form() {
        let args = args_of(&config());
        let devices = value_of(&args, "-device");
        assert_eq!(devices[0], "intel-iommu,caching-mode=on");
        let json: serde_json::Value = serde_json::from_str(devices[1]).unwrap();
        assert_eq!(json["driver"], "vfio-user-pci");
        assert_eq!(json["socket"]["type"], "unix");
        assert_eq!(json["socket"]["path"], "/tmp/domdma-vm.x/device.sock");
        assert_eq!(devices[2], "virtio-net-pci,netdev=n0");
    }

    #[test]
    fn kvm_uses_host_cpu_and_split_irqchip() {
        let mut cfg = config();
        cfg.accel = Accel::Kvm;
        let args = args_of(&cfg);
        assert_eq!(
            value_of(&args, "-machine"),
            ["q35,memory-backend=mem,kernel-irqchip=split"]
        );
        assert_eq!(value_of(&args, "-accel"), ["kvm"]);
        assert_eq!(value_of(&args, "-cpu"), ["host"]);
    }

    #[test]
    fn no_device_boots_without_vfio_user() {
        let mut cfg = config();
        cfg.device_socket = None;
        let args = args_of(&cfg);
        assert!(!args.iter().any(|a| a.contains("vfio-user")));
        assert_eq!(value_of(&args, "-device")[0], "intel-iommu,caching-mode=on");
    }

    #[test]
    fn numa_puts_the_device_on_node_one() {
        let mut cfg = config();
        cfg.numa = true;
        let args = args_of(&cfg);
        assert_eq!(value_of(&args, "-machine"), ["q35"]);
        assert_eq!(
            value_of(&args, "-object"),
            [
                "memory-backend-memfd,id=mem0,size=512M,share=on",
                "memory-backend-memfd,id=mem1,size=512M,share=on"
            ]
        );
        assert_eq!(
            value_of(&args, "-numa"),
            [
                "node,nodeid=0,cpus=0-0,memdev=mem0",
                "node,nodeid=1,cpus=1-1,memdev=mem1"
            ]
        );
        let devices = value_of(&args, "-device");
        assert_eq!(devices[0], "intel-iommu,caching-mode=on");
        assert!(devices[1].starts_with("pxb-pcie,") && devices[1].contains("numa_node=1"));
        let json: serde_json::Value = serde_json::from_str(devices[3]).unwrap();
        assert_eq!(json["bus"], "rp1");
        cfg.smp = 3;
        assert!(matches!(cfg.args(), Err(QemuError::NumaSplit { .. })));
    }

    #[test]
    fn commas_in_the_serial_path_are_escaped() {
        let mut cfg = config();
        cfg.serial_log = "/out/a,b/serial.log".into();
        let args = args_of(&cfg);
        assert_eq!(
            value_of(&args, "-chardev"),
            ["file,id=serial0,path=/out/a,,b/serial.log"]
        );
    }

    #[test]
    fn shell_line_quotes_json_and_spaces() {
        let line = config().shell_line().unwrap();
        assert!(line.starts_with("/cache/qemu -machine q35,memory-backend=mem "));
        assert!(line.contains(r#"'{"driver":"vfio-user-pci""#));
        assert!(line.contains("-append 'console=ttyS0 intel_iommu=on panic=-1 quiet'"));
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn extra_args_come_last() {
        let mut cfg = config();
        cfg.extra_args = vec!["-d".into(), "guest_errors".into()];
        let args = args_of(&cfg);
        assert_eq!(&args[args.len() - 2..], ["-d", "guest_errors"]);
    }
}
