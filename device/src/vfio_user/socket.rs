//! The server's listening UNIX sockets (the device socket and the inspector's): path
//! checks, a bounded "is it in use" probe, creation with owner-only permissions whatever
//! the umask, and removal when the server goes.
//!
//! Creation: the socket is bound inside a fresh private directory (mode 0700) next to the
//! requested path, given its mode (0600, or 0660 and a group for [`SocketAccess::group`])
//! there, and then renamed into place without replacing anything (`RENAME_NOREPLACE`). No
//! other user can connect in between, whatever the umask, and a symbolic link at the path
//! is refused, never followed (neither when checking, binding nor removing).

use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::server::ServerError;

/// Longest path a `sockaddr_un` holds (108 bytes including the terminating NUL).
pub(crate) const MAX_SOCKET_PATH: usize = 107;

/// Who may connect to a socket besides its owner.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// `None`: the owner only (mode 0600). `Some(gid)`: the owner and the members of group
    /// `gid` (mode 0660, group `gid`), e.g. when QEMU runs as another user of that group.
    pub group: Option<u32>,
}

impl SocketAccess {
    /// The file mode the socket gets.
    pub fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// A listening socket at a path, removed on drop if it is still the one created here.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl BoundSocket {
    /// Check `path` (removing a stale socket), create the socket with `access`'s mode and
    /// listen on it, non-blocking.
    pub fn bind(path: &Path, access: SocketAccess) -> Result<Self, ServerError> {
        prepare_socket_path(path)?;
        let bind_err = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let dir = parent_dir(path);
        let private = PrivateDir::create(dir).map_err(bind_err)?;
        let tmp = private.path.join("s");
        if tmp.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ServerError::PathTooLong {
                path: tmp,
                len: private.path.as_os_str().len() + 2,
            });
        }
        let listener = UnixListener::bind(&tmp).map_err(bind_err)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(access.mode())).map_err(bind_err)?;
        if let Some(gid) = access.group {
            std::os::unix::fs::lchown(&tmp, None, Some(gid)).map_err(|source| {
                ServerError::Group {
                    path: path.to_path_buf(),
                    gid,
                    source,
                }
            })?;
        }
        rename_noreplace(&tmp, path).map_err(|source| {
            if source.raw_os_error() == Some(libc::EEXIST) {
                ServerError::InUse {
                    path: path.to_path_buf(),
                }
            } else {
                ServerError::Bind {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        drop(private);
        let meta = fs::symlink_metadata(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        debug!(path = %path.display(), mode = format_args!("{:o}", access.mode()), group = ?access.group, "socket created");
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
        })
    }

    /// The listener.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        // Remove the socket file only if it is still ours (not replaced by a new server).
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.inode {
                match fs::remove_file(&self.path) {
                    Ok(()) => debug!(path = %self.path.display(), "socket removed"),
                    Err(e) => {
                        warn!(path = %self.path.display(), error = %e, "cannot remove the socket")
                    }
                }
            }
        }
    }
}

/// A directory of mode 0700 next to the socket path, removed (with anything left in it) on
/// drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create(dir: &Path) -> io::Result<Self> {
        let mut template = dir.as_os_str().as_bytes().to_vec();
        template.extend_from_slice(b"/.dd-XXXXXX\0");
        // SAFETY: `template` is a writable NUL-terminated buffer ending in six X's, as
        // mkdtemp requires; it replaces them in place and returns a pointer into it.
        let p = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if p.is_null() {
            return Err(io::Error::last_os_error());
        }
        template.pop();
        Ok(Self {
            path: PathBuf::from(OsString::from_vec(template)),
        })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.path.join("s"));
        if let Err(e) = fs::remove_dir(&self.path) {
            warn!(path = %self.path.display(), error = %e, "cannot remove the private bind directory");
        }
    }
}

/// `renameat2(from, to, RENAME_NOREPLACE)`: never replaces (nor follows) what is at `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let cstr = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (from, to) = (cstr(from)?, cstr(to)?);
    // SAFETY: both paths are valid NUL-terminated strings for the whole call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// What `path` is, in words, for error messages.
fn describe(ft: fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() || ft.is_block_device() {
        "a device node"
    } else {
        "not a regular file"
    }
}

/// Whether a server accepts connections on the socket at `path`, found without ever
/// blocking: a non-blocking connect, which succeeds (live), fails with `EAGAIN` (live, its
/// backlog full) or `ECONNREFUSED` (stale: nobody listens).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Probe {
    Live,
    Stale,
    Gone,
}

pub(crate) fn probe(path: &Path) -> io::Result<Probe> {
    match connect_nonblocking(path) {
        Ok(_) => Ok(Probe::Live),
        Err(e) => match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINPROGRESS) => Ok(Probe::Live),
            Some(libc::ECONNREFUSED) => Ok(Probe::Stale),
            Some(libc::ENOENT) => Ok(Probe::Gone),
            _ => Err(e),
        },
    }
}

/// A non-blocking `connect` to the socket at `path`: it never waits (a full backlog is
/// `EAGAIN`).
fn connect_nonblocking(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes for the whole call.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Check the socket path and remove a stale socket left by a server that is gone.
pub(crate) fn prepare_socket_path(path: &Path) -> Result<(), ServerError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ServerError::PathTooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Err(ServerError::NoDirectory {
            dir: dir.to_path_buf(),
        });
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServerError::Probe {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        let hint = if meta.file_type().is_dir() {
            "give the path of the socket file to create, e.g. a file inside that directory"
        } else if meta.file_type().is_symlink() {
            "symbolic links are never followed; remove it or give the socket's own path"
        } else {
            "remove it if it is a leftover, or choose another socket path"
        };
        return Err(ServerError::NotASocket {
            path: path.to_path_buf(),
            kind: describe(meta.file_type()),
            hint,
        });
    }
    match probe(path) {
        Ok(Probe::Live) => Err(ServerError::InUse {
            path: path.to_path_buf(),
        }),
        Ok(Probe::Stale) => {
            fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
            info!(path = %path.display(), "removed a stale socket left by a server that is no longer running");
            Ok(())
        }
        Ok(Probe::Gone) => Ok(()),
        Err(source) => Err(ServerError::Probe {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Look a group up by name (or take a number): for `--socket-group`.
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let text = fs::read_to_string("/etc/group")
        .map_err(|e| format!("cannot read /etc/group to look up group {name:?}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (n == name).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            format!("no group named {name:?} in /etc/group; give a group name or a numeric gid")
        })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;

    fn tmp_dir() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/domdma-sock-").unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn socket_is_owner_only_whatever_the_umask() {
        let dir = tmp_dir();
        let path = dir.as_path().join("dev.sock");
        // SAFETY: umask takes no pointers. It is process-wide: the other tests of this
        // binary create no files whose mode they check.
        let old = unsafe { libc::umask(0) };
        let s = BoundSocket::bind(&path, SocketAccess::default());
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let s = s.unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        UnixStream::connect(&path).unwrap();
        let leftovers: Vec<_> = fs::read_dir(dir.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers,
            vec![OsString::from("dev.sock")],
            "private dir removed"
        );
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn group_access_gives_0660_and_the_group() {
        let dir = tmp_dir();
        let path = dir.as_path().join("dev.sock");
        // SAFETY: getegid takes no arguments.
        let gid = unsafe { libc::getegid() };
        let _s = BoundSocket::bind(&path, SocketAccess { group: Some(gid) }).unwrap();
        assert_eq!(mode(&path), 0o660);
        assert_eq!(fs::symlink_metadata(&path).unwrap().gid(), gid);
    }

    #[test]
    fn a_symlink_at_the_path_is_refused_not_followed() {
        let dir = tmp_dir();
        let target = dir.as_path().join("target.sock");
        let link = dir.as_path().join("dev.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = BoundSocket::bind(&link, SocketAccess::default()).unwrap_err();
        assert!(
            e.to_string().contains("is a symbolic link, not a socket"),
            "{e}"
        );
        assert!(!target.exists(), "nothing created through the link");
        // A link to a live socket is refused the same way.
        let live = BoundSocket::bind(&target, SocketAccess::default()).unwrap();
        let e = BoundSocket::bind(&link, SocketAccess::default()).unwrap_err();
        assert!(matches!(e, ServerError::NotASocket { .. }), "{e}");
        drop(live);
    }

    #[test]
    fn in_use_check_never_blocks_on_a_full_backlog() {
        let dir = tmp_dir();
        let path = dir.as_path().join("dev.sock");
        let live = BoundSocket::bind(&path, SocketAccess::default()).unwrap();
        // Fill the listen backlog: nobody accepts.
        let mut held = Vec::new();
        loop {
            match connect_nonblocking(&path) {
                Ok(s) => held.push(s),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
                    break;
                }
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(BoundSocket::bind(&p, SocketAccess::default()).map(drop));
        });
        let t = Instant::now();
        let r = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the in-use check blocked on a live server with a full backlog");
        let e = r.unwrap_err();
        assert!(matches!(e, ServerError::InUse { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(live);
    }

    #[test]
    fn group_names_and_numbers() {
        assert_eq!(group_id("0"), Ok(0));
        assert_eq!(group_id("root"), Ok(0));
        let e = group_id("no-such-group-here").unwrap_err();
        assert!(e.contains("no group named"), "{e}");
    }
}
