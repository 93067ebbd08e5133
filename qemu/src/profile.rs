//! Guest profiles: a machine and device configuration as data (`qemu/profiles/NAME.toml`),
//! chosen with `domdma-vm run --profile FILE` (and `scripts/run --profile NAME|all`).
//!
//! ```toml
//! description = "Two NUMA nodes, the device behind pxb-pcie on node 1"
//! numa_nodes = 2                        # 1 (flat, device on the root bus) or 2
//! iommu = true                          # emulated intel-iommu, VFIO type1 in the guest
//! shared_memory = true                  # guest RAM shared with the device server (memfd);
//!                                       # false: private RAM, reached by DMA_READ/WRITE
//! device_args = ["--iova-width", "32"]  # domdma-device options
//! guest_args = []                       # domdma-guest-tests options
//! ```
//!
//! The profile's name is its file name; the guest binary gets `--profile NAME`, so that
//! skip reasons name it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors of profile loading: each names the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file cannot be read.
    #[error("cannot read profile {}: {source} (profiles are qemu/profiles/NAME.toml)", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a valid profile.
    #[error("profile {} is not valid: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
}

/// A guest profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Its name (the file name without `.toml`).
    #[serde(skip)]
    pub name: String,
    /// One line for humans.
    pub description: String,
    /// 1 or 2 NUMA nodes; with 2 the device sits behind a PCIe expander bridge on node 1.
    #[serde(default = "default_numa_nodes")]
    pub numa_nodes: u8,
    /// An emulated IOMMU (intel-iommu, `intel_iommu=on`): what VFIO type1 in the guest
    /// needs.
    #[serde(default = "default_true")]
    pub iommu: bool,
    /// Guest RAM shared with the device server (`memory-backend-memfd,share=on`: QEMU's
    /// DMA_MAP carries the memory's descriptor). `false`: plain private RAM
    /// (`memory-backend-ram`), which QEMU maps without a descriptor, so the device reaches
    /// it through QEMU with DMA_READ / DMA_WRITE.
    #[serde(default = "default_true")]
    pub shared_memory: bool,
    /// Options for the device server.
    #[serde(default)]
    pub device_args: Vec<String>,
    /// Options for the guest test binary.
    #[serde(default)]
    pub guest_args: Vec<String>,
    /// A profile whose device misbehaves on purpose (`--inject` in `device_args`): the
    /// text every guest failure must contain (the injected fault, e.g. `offset 0x10`). The
    /// run passes when at least one guest test fails naming it and no test fails otherwise;
    /// those failures are reported as expected.
    #[serde(default)]
    pub expect_injected: Option<String>,
}

fn default_numa_nodes() -> u8 {
    2
}

fn default_true() -> bool {
    true
}

impl Profile {
    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("profile")
            .to_owned();
        Self::parse(&name, &text).map_err(|message| ProfileError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a profile's text.
    pub fn parse(name: &str, text: &str) -> Result<Self, String> {
        let mut p: Profile = toml::from_str(text).map_err(|e| e.to_string())?;
        if !(1..=2).contains(&p.numa_nodes) {
            return Err(format!(
                "numa_nodes = {} (use 1 for a flat machine or 2 for the device on node 1)",
                p.numa_nodes
            ));
        }
        p.name = name.to_owned();
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults() {
        let p = Profile::parse("numa", "description = \"x\"\n").unwrap();
        assert_eq!(
            p,
            Profile {
                name: "numa".into(),
                description: "x".into(),
                numa_nodes: 2,
                iommu: true,
                shared_memory: true,
                device_args: vec![],
                expect_injected: None,
                guest_args: vec![],
            }
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Profile::parse("x", "description = \"x\"\nnuma_nodes = 3\n").unwrap_err();
        assert!(e.contains("numa_nodes = 3"), "{e}");
        let e = Profile::parse("x", "description = \"x\"\nnuma = 1\n").unwrap_err();
        assert!(e.contains("unknown field `numa`"), "{e}");
        let e = Profile::parse("x", "numa_nodes = 1\n").unwrap_err();
        assert!(e.contains("missing field `description`"), "{e}");
    }

    /// Every profile shipped in qemu/profiles/ loads.
    #[test]
    fn shipped_profiles_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let p = Profile::load(&path).unwrap_or_else(|e| panic!("{e}"));
                names.push(p.name);
            }
        }
        names.sort();
        for want in ["dma32", "flat", "noiommu", "numa", "strict"] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
    }
}
