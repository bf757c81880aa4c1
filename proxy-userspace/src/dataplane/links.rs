//! Attachments that outlive the process: every program is attached through a bpf_link pinned
//! under `<pin dir>/links/<program>[@<interface>]`, so the kernel keeps running it after the
//! proxy exits or is killed. A starting proxy swaps its freshly loaded program into the pinned
//! link with `BPF_LINK_UPDATE` (atomic: the attach point is never without a program, and never
//! runs two of ours); only where no link is pinned yet (or the pinned one is dead) does it
//! attach and pin a new one.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::Error;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `enum bpf_attach_type` values of the programs attached through links.
pub(super) mod attach_type {
    pub const CGROUP_SOCK_OPS: u32 = 3;
    pub const CGROUP_INET4_CONNECT: u32 = 10;
    pub const CGROUP_INET6_CONNECT: u32 = 11;
    pub const CGROUP_GETSOCKOPT: u32 = 21;
    pub const XDP: u32 = 37;
}

/// The subdirectory of the pin directory holding the links.
pub(super) const LINKS_DIR: &str = "links";

/// How a program came to be attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A pinned link of a predecessor now runs this program (`BPF_LINK_UPDATE`).
    Updated,
    /// A new link was created and pinned.
    Attached,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd` (the kernel reads `size` bytes and treats the rest as zero); every pointer in it
    // points to memory that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `BPF_OBJ_PIN` (`fd`: the object) and `BPF_OBJ_GET` (`fd`: 0) at `path`.
fn obj_at(cmd: libc::c_long, path: &Path, fd: u32) -> std::io::Result<libc::c_long> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
    };
    sys_bpf(cmd, &attr)
}

/// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = obj_at(BPF_OBJ_GET, path, 0)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pin `fd` at `path` (on bpffs).
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
    obj_at(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(drop)
}

/// `BPF_LINK_CREATE`: attach `prog` to `target` (a cgroup's descriptor, or an interface index
/// for XDP) as `attach_type`; the link lives as long as its descriptor or its pin.
pub(super) fn link_create(
    prog: BorrowedFd<'_>,
    target: u32,
    attach_type: u32,
) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct CreateAttr {
        prog_fd: u32,
        target: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = CreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target,
        attach_type,
        flags: 0,
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: make `link` run `prog` instead of its current program.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct UpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = UpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// The pin path of `program`'s link (one per interface for XDP).
pub(super) fn link_path(pin_dir: &Path, program: &str, iface: Option<&str>) -> PathBuf {
    let name = match iface {
        Some(i) => format!("{program}@{i}"),
        None => program.to_string(),
    };
    pin_dir.join(LINKS_DIR).join(name)
}

/// Run `prog` at the link pinned at `path`: swap it into the pinned link, or, when there is
/// none (or it no longer works: its interface went away), attach with `attach` and pin the new
/// link there. When a dead link is replaced, the new one is attached before the old pin goes.
pub(super) fn install(
    path: &Path,
    name: &'static str,
    prog: BorrowedFd<'_>,
    attach: impl FnOnce() -> std::io::Result<OwnedFd>,
) -> Result<How, Error> {
    if path.exists() {
        match obj_get(path).and_then(|link| link_update(link.as_fd(), prog)) {
            Ok(()) => return Ok(How::Updated),
            Err(e) => {
                tracing::warn!(link = %path.display(), error = %e, "pinned link cannot be updated; attaching a new one")
            }
        }
    }
    let link = attach().map_err(|source| Error::Io {
        what: format!("attach {name} ({})", path.display()),
        source,
    })?;
    let pin_err = |source: std::io::Error| Error::Io {
        what: format!("pin the link of {name} at {}", path.display()),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(pin_err(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(pin_err)?;
    }
    // The descriptor closes on return: the pin alone keeps the link, so removing the pin
    // (uninstall, a successor's replacement) detaches it at once.
    obj_pin(link.as_fd(), path).map_err(pin_err)?;
    Ok(How::Attached)
}

/// Remove pinned links in `pin_dir` that `keep` does not name (programs or interfaces this
/// run does not attach): removing the pin detaches them.
pub(super) fn prune(pin_dir: &Path, keep: &[PathBuf]) {
    let Ok(entries) = std::fs::read_dir(pin_dir.join(LINKS_DIR)) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if !keep.contains(&p) {
            match std::fs::remove_file(&p) {
                Ok(()) => tracing::info!(link = %p.display(), "detached: not part of this run"),
                Err(err) => tracing::warn!(link = %p.display(), error = %err, "remove pinned link"),
            }
        }
    }
}
