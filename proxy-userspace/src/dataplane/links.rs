//! Attachments that outlive the process: every program is attached through a bpf_link pinned
//! under `<pin dir>/links/<program>[@<interface>]`, so the kernel keeps running it after the
//! proxy exits or is killed. A starting proxy swaps its freshly loaded program into the pinned
//! link with `BPF_LINK_UPDATE` (atomic: the attach point is never without a program, and never
//! runs two of ours); only where no link is pinned yet (or the pinned one is dead) does it
//! attach and pin a new one.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::Error;
pub(super) use super::sys::{attach_type, link_create};
use super::sys::{link_update, obj_get, obj_pin};

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
