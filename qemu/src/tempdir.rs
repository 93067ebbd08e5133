//! A private temporary directory, removed when dropped.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use tracing::warn;

/// Errors of temporary directory handling.
#[derive(Debug, thiserror::Error)]
pub enum TempDirError {
    /// `mkdtemp` failed.
    #[error("cannot create a temporary directory under {}", parent.display())]
    Create {
        /// Where it was to be created.
        parent: PathBuf,
        /// The error from `mkdtemp`.
        #[source]
        source: io::Error,
    },
}

/// A directory only the current user can enter (mode 0700, from `mkdtemp`), removed with its
/// contents when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/<prefix>XXXXXX`.
    pub fn new(prefix: &str) -> Result<TempDir, TempDirError> {
        let parent = std::env::temp_dir();
        let err = |source| TempDirError::Create {
            parent: parent.clone(),
            source,
        };
        let mut template = parent.join(format!("{prefix}XXXXXX")).into_os_string();
        template.push("\0");
        let template = CString::from_vec_with_nul(template.into_vec())
            .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let raw = template.into_raw();
        // SAFETY: `raw` is a NUL-terminated buffer we own (from `CString::into_raw`); mkdtemp
        // only rewrites the trailing XXXXXX in place and does not change its length.
        let rc = unsafe { libc::mkdtemp(raw) };
        let os_err = io::Error::last_os_error();
        // SAFETY: `raw` came from `CString::into_raw` above and is reclaimed exactly once.
        let template = unsafe { CString::from_raw(raw) };
        if rc.is_null() {
            return Err(err(os_err));
        }
        let path = PathBuf::from(OsString::from_vec(template.into_bytes()));
        Ok(TempDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            if err.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.path.display(), %err, "cannot remove temporary directory");
            }
        }
    }
}

/// Whether a path fits into a UNIX socket address (`sun_path`, 108 bytes with the NUL).
pub fn fits_socket_path(path: &Path) -> bool {
    path.as_os_str().as_bytes().len() < 108
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn private_and_removed_on_drop() {
        let dir = TempDir::new("domdma-test.").unwrap();
        let path = dir.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(path.join("file"), b"x").unwrap();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn socket_path_limit() {
        assert!(fits_socket_path(Path::new(
            "/tmp/domdma-vm.abcdef/device.sock"
        )));
        assert!(!fits_socket_path(&PathBuf::from("/".repeat(108))));
    }
}
