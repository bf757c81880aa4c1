//! The bpf(2) commands aya 0.14 does not offer: pinning and opening objects, creating and
//! updating links, and lookup-and-delete on hash maps. One system-call wrapper for all.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
pub(super) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let fd = obj_at(BPF_OBJ_GET, path, 0)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_PIN`: pin `fd` at `path` (on bpffs).
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> std::io::Result<()> {
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
pub(super) fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
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

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on a hash map: read and remove an entry in one system call
/// (aya 0.14 offers it only for queues and stacks). `Ok(None)`: no such key.
pub(super) fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
) -> std::io::Result<Option<V>> {
    /// The map-element member of `union bpf_attr` (`map_fd`, `key`, `value`, `flags`).
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // `key` and `value` point to live values of the map's key and value types (K and V are
    // the map's `#[repr(C)]` ABI types); the kernel writes at most the value size.
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) {
        Ok(_) => {
            // SAFETY: the call succeeded, so the kernel wrote the entry's value (plain data).
            Ok(Some(unsafe { value.assume_init() }))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
